"""The edit log: revert and replay bit for bit, save and load as one file, the CLI table."""

from __future__ import annotations

import argparse
import io
import json
import os
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import memedit
from memedit import sequential as sq
from memedit.sequential.cli import add_subcommand
from memedit.tree import get_leaf

DENSE = ("params", "fc", "kernel")
CONV = ("params", "conv", "kernel")
HALF = ("params", "head", "kernel")


def base_params():
  rng = np.random.default_rng(0)
  return {"params": {
      "fc": {"kernel": jnp.asarray(rng.standard_normal((6, 5)), jnp.float32),
             "bias": jnp.zeros((5,), jnp.float32)},
      "conv": {"kernel": jnp.asarray(rng.standard_normal((3, 3, 4, 5)), jnp.float32)},
      "head": {"kernel": jnp.asarray(rng.standard_normal((5, 3)), jnp.bfloat16)}}}


def random_entry(rng, path, shape, kind, rank, label=None):
  d = memedit.key_dim(shape, kind)
  D = rng.standard_normal((rank, d)).astype(np.float32)
  lam = rng.standard_normal(memedit.lambda_shape(shape, rank, kind)).astype(np.float32)
  edit = memedit.make_edit(path, lam, D, kind=kind, method="test",
                           settings={"seed": int(rng.integers(1 << 30))}, label=label)
  keys = rng.standard_normal((int(rng.integers(1, 5)), d)).astype(np.float32)
  return edit, keys


def build_log(seed=1):
  rng = np.random.default_rng(seed)
  params = base_params()
  log = sq.log_init()
  specs = [(DENSE, "dense", 2, "a"), (CONV, "conv", 1, None), (DENSE, "dense", 1, None),
           (HALF, "dense", 1, "h"), (CONV, "conv", 2, "c2"), (DENSE, "dense", 3, None)]
  for path, kind, rank, label in specs:
    edit, keys = random_entry(rng, path, get_leaf(params, path).shape, kind, rank, label)
    values = rng.standard_normal((keys.shape[0], 2)).astype(np.float32)
    weights = rng.uniform(0.1, 1.0, keys.shape[0]).astype(np.float32) if rank > 1 else None
    log = sq.log_append(log, edit, keys, values if label else None, weights=weights)
  return params, log


def same_bits(a, b):
  la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
  return len(la) == len(lb) and all(
      np.asarray(x).dtype == np.asarray(y).dtype
      and np.asarray(x).tobytes() == np.asarray(y).tobytes() for x, y in zip(la, lb))


def test_revert_and_replay_are_bit_exact():
  params, log = build_log()
  full, history = sq.log_history(params, log)
  assert not same_bits(full, params)
  for i in range(len(log)):
    reverted = sq.log_apply(params, sq.log_revert(log, i))
    never = sq.log_apply(params, sq.EditLog(log.entries[:i] + log.entries[i + 1:]))
    assert same_bits(reverted, never), i
    by_core, _ = memedit.revert_edit(full, log.entries[i].edit, history)
    assert same_bits(reverted, by_core), i
    replayed = sq.log_apply(params, sq.log_replay(sq.log_revert(log, i), i))
    assert same_bits(replayed, full), i
  # The order of the entries does not change the bits.
  order = [3, 0, 5, 1, 4, 2]
  assert same_bits(sq.log_apply(params, sq.EditLog(tuple(log.entries[k] for k in order))), full)
  # Reverting every edit of a leaf gives the original leaf back, bit for bit.
  on_dense = [i for i, e in enumerate(log.entries) if e.edit.path == DENSE]
  partial = log
  for i in on_dense:
    partial = sq.log_revert(partial, log.names[i])
  out = sq.log_apply(params, partial)
  assert np.asarray(get_leaf(out, DENSE)).tobytes() == np.asarray(get_leaf(params, DENSE)).tobytes()
  assert get_leaf(out, ("params", "fc", "bias")) is get_leaf(params, ("params", "fc", "bias"))
  # Revert and replay refuse entries in the wrong state.
  with pytest.raises(ValueError, match="an active entry"):
    sq.log_revert(sq.log_revert(log, 0), 0)
  with pytest.raises(ValueError, match="a reverted entry"):
    sq.log_replay(log, "a")
  with pytest.raises(ValueError, match="entry number"):
    sq.log_revert(log, 6)


def test_revert_is_bit_exact_under_jit():
  params, log = build_log(seed=2)
  apply = jax.jit(sq.log_apply)
  full = apply(params, log)
  eager = sq.log_apply(params, log)
  for x, y in zip(jax.tree_util.tree_leaves(full), jax.tree_util.tree_leaves(eager)):
    np.testing.assert_allclose(np.asarray(x, np.float32), np.asarray(y, np.float32),
                               rtol=1e-6, atol=1e-6)
  reverted = apply(params, sq.log_revert(log, 2))
  never = apply(params, sq.EditLog(log.entries[:2] + log.entries[3:]))
  assert same_bits(reverted, never)


def test_save_load_round_trip(tmp_path):
  params, log = build_log()
  log = sq.log_revert(log, 1)
  f = sq.save_log(tmp_path / "edits.npz", log)
  assert os.path.isfile(f) and sorted(os.listdir(tmp_path)) == ["edits.npz"]
  assert os.path.getsize(f) < 20_000  # factors and keys, not the model
  back = sq.load_log(f)
  assert back.names == log.names and back.active == log.active
  for a, b in zip(log.entries, back.entries):
    assert a.edit.fingerprint == b.edit.fingerprint and a.edit.label == b.edit.label
    assert (a.edit.path, a.edit.kind, a.edit.index, a.edit.method, a.edit.settings) == \
           (b.edit.path, b.edit.kind, b.edit.index, b.edit.method, b.edit.settings)
    for x, y in ((a.keys, b.keys), (a.values, b.values), (a.weights, b.weights)):
      assert (x is None) == (y is None)
      if x is not None:
        assert np.asarray(x).tobytes() == np.asarray(y).tobytes()
  assert same_bits(sq.log_apply(params, back), sq.log_apply(params, log))
  # An earlier log is replaced; another file only with force; a damaged one is refused.
  sq.save_log(f, sq.log_replay(log, 1))
  assert sq.load_log(f).active == log.names
  other = tmp_path / "notes.txt"
  other.write_text("keep me")
  with pytest.raises(ValueError, match="another file"):
    sq.save_log(other, log)
  assert other.read_text() == "keep me"
  with pytest.raises(ValueError, match=r"expected a saved memedit edit log \(.npz, a zip "
                                       r"archive\), got a file that starts with b'keep'") as info:
    sq.load_log(other)
  assert "pickle" not in str(info.value)  # no advice to unpickle a stranger's file
  zipped = tmp_path / "other.zip"
  with zipfile.ZipFile(zipped, "w") as zf:
    zf.writestr("a.txt", "not an array")
  with pytest.raises(ValueError, match="does not read as one"):
    sq.load_log(zipped)
  with np.load(f) as z:
    arrays = {k: z[k] for k in z.files}
  arrays["e0_lam"] = arrays["e0_lam"] + 1.0
  buf = io.BytesIO()
  np.savez(buf, **arrays)
  bad = tmp_path / "bad.npz"
  bad.write_bytes(buf.getvalue())
  with pytest.raises(ValueError, match="damaged"):
    sq.load_log(bad)


def test_append_validates_and_log_keys_stack():
  params, log = build_log()
  e = log.entries[0].edit
  with pytest.raises(ValueError, match="new to the log"):
    sq.log_append(log, e, np.ones((1, 6)))
  edit = memedit.make_edit(DENSE, np.ones((5, 1)), np.ones((1, 6)), label="new")
  with pytest.raises(ValueError, match=r"keys: expected shape \(n, 6\)"):
    sq.log_append(log, edit, np.ones((2, 5)))
  with pytest.raises(ValueError, match="non-negative"):
    sq.log_append(log, edit, np.ones((2, 6)), weights=np.array([1.0, -1.0]))
  with pytest.raises(ValueError, match="weights: expected shape"):
    sq.log_append(log, edit, np.ones((2, 6)), weights=np.ones(3))
  with pytest.raises(ValueError, match="finite"):
    sq.log_append(log, edit, np.full((2, 6), np.nan))
  keys, w = sq.log_keys(log, DENSE)
  dense = [x for x in log.entries if x.edit.path == DENSE]
  np.testing.assert_array_equal(keys, np.concatenate([x.keys for x in dense]))
  want_w = np.concatenate([np.ones(len(x.keys)) if x.weights is None else x.weights
                           for x in dense])
  np.testing.assert_array_equal(w, want_w)
  k1, _ = sq.log_keys(sq.log_revert(log, 0), DENSE)
  assert k1.shape[0] == keys.shape[0] - log.entries[0].keys.shape[0]
  k2, _ = sq.log_keys(log, DENSE, before=1)
  assert k2.shape == log.entries[0].keys.shape
  assert sq.log_keys(log, ("params", "nothing"))[0].shape == (0, 0)


def _parser():
  parser = argparse.ArgumentParser(prog="memedit")
  add_subcommand(parser.add_subparsers(dest="command"))
  return parser


def test_cli_prints_the_log(tmp_path, capsys):
  from ports.dcgan import variables_from_state_dict
  from ports.dcgan.convert import expected_shapes
  from memedit import _io

  sd = {k: np.full(s, 0.1, np.float32) for k, s in expected_shapes(16, 2, 3).items()}
  model = _io.save_tree(tmp_path / "model", *variables_from_state_dict(sd))
  variables = _io.load_tree(model)[0]
  path = ("params", "convt2", "kernel")
  shape = get_leaf(variables, path).shape
  rng = np.random.default_rng(3)
  log = sq.log_init()
  for label in ("first", "second", "third"):
    edit, keys = random_entry(rng, path, shape, "conv", 1, label)
    log = sq.log_append(log, edit, keys)
  f = sq.save_log(tmp_path / "log.npz", sq.log_revert(log, "second"))
  args = _parser().parse_args(["log", f, "--model", model, "--relative-to", "output",
                               "--json", str(tmp_path / "r.json")])
  assert args.run(args) == 0
  out = capsys.readouterr().out
  assert "3 edits (2 active)" in out and "reverted" in out and "growth" in out
  report = json.loads((tmp_path / "r.json").read_text())
  assert report["names"] == ["first", "third"] and len(report["growth"]) == 2
  want = sq.interference_matrix(sq.load_log(f), params=variables, relative_to="output")
  np.testing.assert_allclose(report["interference"], want.matrix)
  for argv, match in ((["log", f, "--threshold", "-1"], "threshold"),
                      (["log", f, "--relative-to", "output"], "--model"),
                      (["log", str(tmp_path / "missing.npz")], "does not exist")):
    args = _parser().parse_args(argv)
    with pytest.raises(ValueError, match=match):
      args.run(args)


def test_cli_json_never_replaces_inputs_or_other_files(tmp_path, capsys, monkeypatch):
  from memedit import _io

  e = memedit.make_edit(("k",), jnp.ones((2, 1)), jnp.array([[1.0, 0.0]]), label="a")
  f = sq.save_log(tmp_path / "edits.npz", sq.log_append(sq.log_init(), e, jnp.eye(2)[:1]))
  notes = tmp_path / "notes.txt"
  notes.write_text('{"a": 1}')
  a_file = tmp_path / "afile.txt"
  a_file.write_text("")
  before = {p: open(p, "rb").read() for p in (f, notes)}
  for argv, match in (
      (["--json", f], "--json: expected an output file apart from the inputs, got '.*', "
       "which is the input"),
      (["--json", str(notes)], "--json: expected a new file or an earlier `memedit log "
       "--json` report to replace, got '.*notes.txt', an existing file of 8 bytes"),
      (["--json", str(a_file / "r.json")], "--json: expected a path inside folders, got "
       "'.*afile.txt/r.json', whose parent '.*afile.txt' is a file"),
      (["--json", str(tmp_path)], "--json: expected a file to write, got the folder")):
    args = _parser().parse_args(["log", f, *argv])
    with pytest.raises(ValueError, match=match):
      args.run(args)
    assert capsys.readouterr().out == ""  # refused before the table is printed
  assert before == {p: open(p, "rb").read() for p in before}
  # An earlier report, or an empty file, is replaced.
  report = tmp_path / "r.json"
  report.write_text("")
  for _ in range(2):
    args = _parser().parse_args(["log", f, "--json", str(report)])
    assert args.run(args) == 0
  assert json.loads(report.read_text())["names"] == ["a"]
  # A write that fails names the user's path, not the temporary sibling.

  def failing(path, data):
    raise FileNotFoundError(2, "No such file or directory",
                            os.path.join(os.path.dirname(os.path.abspath(path)),
                                         ".tmp-r.json-ad75ef90"))

  monkeypatch.setattr(_io, "atomic_write_bytes", failing)
  args = _parser().parse_args(["log", f, "--json", str(report)])
  with pytest.raises(ValueError, match=r"--json: expected a place you may write to, got "
                     r"'.*r.json': cannot write there \(No such file or directory\)"):
    args.run(args)


def _one_entry_log(label="a"):
  e = memedit.make_edit(("k",), jnp.ones((2, 1)), jnp.array([[1.0, 0.0, 0.0]]), label=label)
  return sq.log_append(sq.log_init(), e, jnp.eye(3), jnp.ones((3, 2)))


def test_log_functions_refuse_what_is_not_a_log():
  log = _one_entry_log()
  for call in (lambda: sq.log_revert([], 0), lambda: sq.log_replay((), 0),
               lambda: sq.log_entry(None, 0), lambda: sq.log_keys([], ("k",))):
    with pytest.raises(ValueError, match="log: expected an EditLog, got"):
      call()
  for before in ("1", 1.5, True):
    with pytest.raises(ValueError, match="before: expected None or an int"):
      sq.log_keys(log, ("k",), before=before)
  assert sq.log_keys(log, ("k",), before=np.int64(1))[0].shape == (3, 3)


def test_append_takes_big_endian_keys_and_names_bad_ones():
  e = memedit.make_edit(("k",), jnp.ones((2, 1)), jnp.array([[1.0, 0.0, 0.0]]), label="a")
  keys = np.arange(6, dtype=">f4").reshape(2, 3)  # as read from a big-endian file
  entry = sq.log_append(sq.log_init(), e, keys, np.ones((2, 2), ">f8"),
                        weights=np.ones(2, ">f4")).entries[0]
  np.testing.assert_array_equal(entry.keys, np.arange(6, dtype=np.float32).reshape(2, 3))
  assert entry.keys.dtype == jnp.float32 and entry.values.dtype == jnp.float32
  for bad in (None, "abc", [[1.0, 2.0, 3.0], [1.0]]):
    with pytest.raises(ValueError, match="keys: expected"):
      sq.log_append(sq.log_init(), e, bad)


def _rewrite(src, dst, change):
  """The saved log at ``src`` with ``change(arrays, meta)`` applied, written to ``dst``."""
  with np.load(src) as z:
    arrays = {k: z[k] for k in z.files}
  meta = json.loads(bytes(arrays["meta"]).decode("utf-8"))
  change(arrays, meta)
  arrays["meta"] = np.frombuffer(json.dumps(meta).encode("utf-8"), np.uint8)
  np.savez(dst, **arrays)
  return dst


def test_load_refuses_malformed_records_with_a_clear_error(tmp_path):
  f = sq.save_log(tmp_path / "log.npz", _one_entry_log())
  cases = {
      "entries": (lambda a, m: m.pop("entries"), "expected a list of entries"),
      "not_list": (lambda a, m: m.update(entries=5), "expected a list of entries"),
      "no_kind": (lambda a, m: m["entries"][0].pop("kind"),
                  "entry 0: expected a field 'kind' of type str in its record, got none"),
      "active": (lambda a, m: m["entries"][0].update(active="false"),
                 "expected a field 'active' of type bool in its record, got 'false'"),
      "entry": (lambda a, m: m.update(entries=[7]), "expected a JSON object"),
      "path": (lambda a, m: m["entries"][0].update(path=[]), "a field 'path'"),
      "version": (lambda a, m: m.update(version=True), "expected edit log version 1, got True"),
  }
  for name, (change, match) in cases.items():
    bad = _rewrite(f, tmp_path / f"{name}.npz", change)
    with pytest.raises(ValueError, match=match):
      sq.load_log(bad)


def test_load_checks_entries_like_append(tmp_path):
  f = sq.save_log(tmp_path / "log.npz", _one_entry_log())

  def twice(a, m):
    m["entries"].append(dict(m["entries"][0]))
    a.update({k.replace("e0_", "e1_"): v for k, v in a.items() if k.startswith("e0_")})

  cases = {
      "nan_keys": (lambda a, m: a.update(e0_keys=np.full((3, 3), np.nan, np.float32)),
                   "keys: expected finite values"),
      "nan_values": (lambda a, m: a.update(e0_values=np.full((3, 2), np.inf, np.float32)),
                     "values: expected finite values"),
      "key_dim": (lambda a, m: a.update(e0_keys=np.ones((3, 5), np.float32)),
                  r"keys: expected shape \(n, 3\)"),
      "weights": (lambda a, m: (a.update(e0_weights=-np.ones(3, np.float32)),
                                m["entries"][0].update(weights=True)), "non-negative"),
      "twice": (twice, "expected a name new to the log"),
  }
  for name, (change, match) in cases.items():
    bad = _rewrite(f, tmp_path / f"{name}.npz", change)
    with pytest.raises(ValueError, match=f"entry [01] \\('a'\\): .*{match}.*damaged"):
      sq.load_log(bad)
  ints = _rewrite(f, tmp_path / "ints.npz", lambda a, m: a.update(e0_keys=np.eye(3, dtype=int)))
  assert sq.load_log(ints).entries[0].keys.dtype == jnp.float32  # as documented


def test_save_refuses_what_load_could_not_give_back(tmp_path):
  f = sq.save_log(tmp_path / "log.npz", _one_entry_log())
  before = open(f, "rb").read()
  e = memedit.Edit(np.ones((2, 1)), np.array([[1.0, 0.0, 0.0]]), ("k",), label="f64")
  log = sq.log_append(sq.log_init(), e, jnp.eye(3))
  with pytest.raises(ValueError, match="expected float32 factors .* got lam of dtype float64"):
    sq.save_log(f, log)
  assert open(f, "rb").read() == before  # the old log is intact
  folder = str(tmp_path / "logs") + os.sep
  with pytest.raises(ValueError, match="expected a file to write the log to, got a folder"):
    sq.save_log(folder, _one_entry_log())
  assert sorted(os.listdir(tmp_path)) == ["log.npz"]


def test_sequential_insert_checks_index_C_kernel_and_log():
  C = jnp.diag(jnp.array([1.0, 1e-4, 1e-4]))
  keys, values = jnp.array([[0.0, 5.0, 0.0]]), jnp.array([[1.0]])
  stacked = {"k": jnp.zeros((2, 3, 1))}
  for project in (True, False):
    opt = {"l2": 1e-3} if project else {"penalty": 1e-3}
    # JAX clamps leaf[5] to leaf[1]: the insert must not solve for another layer.
    with pytest.raises(ValueError, match=r"index: expected .* 0 <= index < 2 .* got 5"):
      sq.sequential_insert(stacked, sq.log_init(), C, keys, values, ("k",), index=5,
                           project=project, **opt)
    with pytest.raises(ValueError, match=r"C: expected shape \(3, 3\) .* got \(4, 4\)"):
      sq.sequential_insert({"k": jnp.zeros((3, 1))}, sq.log_init(), jnp.eye(4), keys, values,
                           ("k",), project=project, **opt)
    with pytest.raises(ValueError, match="log: expected an EditLog, got list"):
      sq.sequential_insert({"k": jnp.zeros((3, 1))}, [], C, keys, values, ("k",),
                           project=project)
    with pytest.raises(ValueError, match="params: expected a floating-point kernel"):
      sq.sequential_insert({"k": jnp.zeros((3, 1), jnp.int32)}, sq.log_init(), C, keys,
                           values, ("k",), project=project, **opt)
  with pytest.raises(ValueError, match=r"C: expected shape \(3, 3\)"):
    sq.sequential_directions(sq.log_init(), jnp.eye(4), jnp.ones((1, 3)), ("k",))
  big = {"k": np.zeros((3, 1), ">f4")}
  log, e = sq.sequential_insert(big, sq.log_init(), C, np.asarray(keys, ">f4"), values, ("k",),
                                l2=1e-3)
  _, want = sq.sequential_insert({"k": jnp.zeros((3, 1))}, sq.log_init(), C, keys, values,
                                 ("k",), l2=1e-3)
  np.testing.assert_array_equal(e.lam, want.lam)


def test_sequential_insert_refuses_the_settings_of_the_other_mode():
  """A setting the chosen mode does not use was silently ignored (penalty= with the
  projected insert, l2= with the ridge one): refused by name."""
  C = jnp.diag(jnp.array([1.0, 1e-4, 1e-4]))
  keys, values = jnp.array([[0.0, 5.0, 0.0]]), jnp.array([[1.0]])
  params = {"k": jnp.zeros((3, 1))}
  for project, name in ((True, "penalty"), (False, "threshold"), (False, "key_weight"),
                        (False, "l2")):
    with pytest.raises(ValueError, match=rf"{name}: applies to project={not project} only, "
                                         rf"got {name}=0.5 with project={project}"):
      sq.sequential_insert(params, sq.log_init(), C, keys, values, ("k",), project=project,
                           **{name: 0.5})
  # The defaults of each mode are those documented.
  _, a = sq.sequential_insert(params, sq.log_init(), C, keys, values, ("k",))
  _, b = sq.sequential_insert(params, sq.log_init(), C, keys, values, ("k",), threshold=1e-2,
                              key_weight=1.0, l2=1.0)
  _, c = sq.sequential_insert(params, sq.log_init(), C, keys, values, ("k",), project=False)
  _, d = sq.sequential_insert(params, sq.log_init(), C, keys, values, ("k",), project=False,
                              penalty=1.0)
  np.testing.assert_array_equal(a.lam, b.lam)
  np.testing.assert_array_equal(c.lam, d.lam)
  assert a.settings == b.settings and c.settings == d.settings


def test_projected_insert_runs_under_jit():
  C = jnp.diag(jnp.array([1.0, 1e-4, 1e-4]))
  params = {"k": jnp.zeros((3, 1))}
  keys, values = jnp.array([[0.0, 5.0, 0.0]]), jnp.array([[1.0]])

  def insert(p, k, v, check=False):
    return sq.sequential_insert(p, sq.log_init(), C, k, v, ("k",), l2=1e-3, label="a",
                                check=check)[1]

  got = jax.jit(insert)(params, keys, values)
  want = insert(params, keys, values)
  np.testing.assert_allclose(got.lam @ got.D, want.lam @ want.D, rtol=1e-5, atol=1e-7)
  assert got.settings["null_dim"] is None and want.settings["null_dim"] == 2
  with pytest.raises(ValueError, match="check=False under jax.jit"):
    jax.jit(lambda p, k, v: insert(p, k, v, check=True))(params, keys, values)


def test_loading_a_saved_edit_as_a_log_says_how_to_make_one(tmp_path):
  """`memedit log` on a `rewrite` output said only "got a folder"."""
  e = memedit.make_edit(("k",), np.ones((2, 1)), np.ones((1, 3)))
  folder = memedit.save_edit(tmp_path / "edit1", e)
  with pytest.raises(FileNotFoundError, match=r"expected a saved edit log file, got a folder "
                                              r"holding one saved edit \(memedit.load_edit\); "
                                              r"a log is built from edits with "
                                              r"memedit.sequential.log_append"):
    sq.load_log(folder)
  (tmp_path / "other").mkdir()
  with pytest.raises(FileNotFoundError, match=r"expected a saved edit log file, got a folder$"):
    sq.load_log(tmp_path / "other")
