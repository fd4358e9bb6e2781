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
