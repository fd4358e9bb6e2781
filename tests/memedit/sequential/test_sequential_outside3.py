"""Sequential edits tried from outside: an edit of another key dimension on a leaf the log
already edits, saved logs whose keys, values or weights were altered, the programs an
insert compiles per number of new keys, layer indices that disagree with the log, and
negative entry numbers."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
from compilations import Compilations

import memedit
from memedit import sequential as sq
from memedit.sequential import nullspace


def _edit(label, d, path=("k",), index=None):
  return memedit.make_edit(path, np.ones((2, 1), np.float32), np.ones((1, d), np.float32),
                           label=label, index=index)


def test_an_edit_of_another_key_dimension_on_a_leaf_of_the_log_is_refused_when_appended():
  log = sq.log_append(sq.log_init(), _edit("a", 3), np.eye(3))
  with pytest.raises(ValueError, match=r"edit: expected key dimension 3 on the leaf "
                     r"\('k',\) \(that of the log's entry 0, 'a'\), got 'b' with key "
                     r"dimension 4"):
    sq.log_append(log, _edit("b", 4), np.eye(4))
  # a reverted entry still counts: log_replay could bring it back
  with pytest.raises(ValueError, match="expected key dimension 3 .* got 'b' with key "
                     "dimension 4"):
    sq.log_append(sq.log_revert(log, "a"), _edit("b", 4), np.eye(4))
  # the layers of a stacked leaf are named, and each keeps its own dimension
  stacked = sq.log_append(sq.log_init(), _edit("s0", 3, index=0), np.eye(3))
  with pytest.raises(ValueError, match=r"on the leaf \('k',\)\[0\] .* key dimension 2"):
    sq.log_append(stacked, _edit("s0b", 2, index=0), np.eye(2))
  stacked = sq.log_append(stacked, _edit("s1", 2, index=1), np.eye(2))
  # another leaf, and the same dimension on the same leaf, are appended as before
  log = sq.log_append(log, _edit("c", 4, path=("other",)), np.eye(4))
  log = sq.log_append(log, _edit("d", 3), np.ones((2, 3)))
  assert log.names == ("a", "c", "d") and stacked.names == ("s0", "s1")
  assert sq.log_keys(log, ("k",))[0].shape == (5, 3)


def _saved_log(tmp_path):
  log = sq.log_append(sq.log_init(), _edit("a", 3), np.eye(3), np.arange(6.0).reshape(3, 2),
                      weights=np.array([1.0, 0.5, 2.0]))
  log = sq.log_append(log, _edit("b", 3), np.ones((1, 3)))
  return log, sq.save_log(tmp_path / "log.npz", log)


def _rewrite(src, dst, arrays=None, meta=None):
  with np.load(src) as z:
    data = {k: z[k] for k in z.files}
  record = json.loads(bytes(data.pop("meta")).decode("utf-8"))
  if meta:
    meta(record)
  if arrays:
    arrays(data)
  data["meta"] = np.frombuffer(json.dumps(record).encode("utf-8"), np.uint8)
  np.savez(dst, **data)
  return dst


def _same_entries(a, b):
  assert a.names == b.names and a.active == b.active
  for x, y in zip(a.entries, b.entries):
    for u, v in ((x.keys, y.keys), (x.values, y.values), (x.weights, y.weights)):
      assert (u is None) == (v is None)
      if u is not None:
        assert np.array_equal(np.asarray(u), np.asarray(v))


def test_a_saved_log_whose_keys_values_or_weights_were_altered_is_refused(tmp_path):
  log, f = _saved_log(tmp_path)
  _same_entries(sq.load_log(f), log)
  cases = {  # changes every check of an appended entry lets through
      "keys": lambda d: d.update(e0_keys=d["e0_keys"] * np.float32(2)),
      "one_bit": lambda d: d.update(e1_keys=(d["e1_keys"].view(np.uint32) ^ np.uint32(1))
                                    .view(np.float32)),
      "values_truncated": lambda d: d.update(e0_values=d["e0_values"][:2]),
      "values_reshaped": lambda d: d.update(e0_values=d["e0_values"].reshape(2, 3)),
      "weights": lambda d: d.update(e0_weights=d["e0_weights"][::-1].copy()),
  }
  for name, change in cases.items():
    bad = _rewrite(f, tmp_path / f"{name}.npz", arrays=change)
    entry = "entry 1 \\('b'\\)" if name == "one_bit" else "entry 0 \\('a'\\)"
    array = "e1_keys" if name == "one_bit" else f"e0_{name.split('_')[0]}"
    with pytest.raises(ValueError, match=f"{entry}: expected array {array} with the sha256 "
                       f"[0-9a-f]{{64}} recorded when it was saved, got sha256 [0-9a-f]{{64}}"
                       f".*altered or truncated; the file is damaged"):
      sq.load_log(bad)
  # a record whose sha256 field is malformed, or leaves out a stored array, is refused
  for name, change, match in (
      ("short", lambda m: m["entries"][0]["sha256"].update(keys="00"),
       "entry 0: expected a field 'sha256' mapping some of .* to 64 hex digits"),
      ("not_dict", lambda m: m["entries"][1].update(sha256=[]), "entry 1: expected a field "
       "'sha256'"),
      ("dropped", lambda m: m["entries"][0]["sha256"].pop("weights"),
       r"entry 0 \('a'\): expected the sha256 of each of its stored arrays \['keys', "
       r"'values', 'weights'\] in its record, got those of \['keys', 'values'\]"),
      ("not_hex", lambda m: m["entries"][1]["sha256"].update(keys="z" * 64),
       "entry 1: expected a field 'sha256' mapping some of")):
    with pytest.raises(ValueError, match=f"{match}.*the file is damaged"):
      sq.load_log(_rewrite(f, tmp_path / f"{name}.npz", meta=change))


def test_a_log_saved_without_the_arrays_sha256_still_loads(tmp_path):
  log, f = _saved_log(tmp_path)

  def strip(record):
    for m in record["entries"]:
      del m["sha256"]

  old = _rewrite(f, tmp_path / "old.npz", meta=strip)
  _same_entries(sq.load_log(old), log)
  # and byte order is not content: a big-endian copy of the arrays matches its sha256
  swapped = _rewrite(f, tmp_path / "big.npz", arrays=lambda d: d.update(
      {k: v.astype(v.dtype.newbyteorder(">")) for k, v in d.items()}))
  _same_entries(sq.load_log(swapped), log)
  # a reverted entry comes back reverted, and saving again records the sha256
  back = sq.load_log(sq.save_log(tmp_path / "again.npz", sq.log_revert(sq.load_log(old), 1)))
  assert back.active == ("a",)
  with np.load(tmp_path / "again.npz") as z:
    record = json.loads(bytes(z["meta"]).decode("utf-8"))
  assert sorted(record["entries"][0]["sha256"]) == ["keys", "values", "weights"]
  assert sorted(record["entries"][1]["sha256"]) == ["keys"]


def test_inserts_of_a_new_number_of_keys_compile_only_at_powers_of_two():
  rng = np.random.default_rng(3)
  d, out = 7, 2  # shapes of this test alone: the programs it counts are its own
  W = rng.standard_normal((out, d)).astype(np.float32)
  C = np.diag(np.r_[np.ones(2), np.full(d - 2, 1e-4)]).astype(np.float32)
  pk = rng.standard_normal((2, d)).astype(np.float32)
  P = sq.null_space(C, pk).P

  def pair(n):
    return (rng.standard_normal((n, d)).astype(np.float32),
            rng.standard_normal((n, out)).astype(np.float32))

  def unpadded(K, V):  # the solve on exactly n rows
    S = sq.key_moment(pk)
    return nullspace._alphaedit(jnp.asarray(W), jnp.asarray(K), jnp.asarray(V),
                                jnp.asarray(P), S, jnp.float32(1e-2))

  sq.insert_null_space(W, *pair(5), P, pk, l2=1e-2)  # compiles the programs for 8 rows
  counts = {}
  for n in (6, 7, 8, 9, 12, 16, 5):
    K, V = pair(n)
    with Compilations(this_thread=True) as c:
      sol = sq.insert_null_space(W, K, V, P, pk, l2=1e-2)
    counts[n] = c.count
    want = unpadded(K, V)
    assert sol.lam.shape == (out, n) and sol.D.shape == (n, d)
    for got, ref in ((sol.lam, want.lam), (sol.D, want.D)):
      got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
      assert np.abs(got - ref).max() <= 1e-6 * np.abs(ref).max(), n
  assert counts == {6: 0, 7: 0, 8: 0, 9: 1, 12: 0, 16: 0, 5: 0}

  # through sequential_insert (one edit into a fresh log each time)
  params = {"w": jnp.asarray(W.T)}
  sq.sequential_insert(params, sq.log_init(), C, *pair(3), ("w",), l2=1e-2, check=False)
  with Compilations(this_thread=True) as c:
    for n in (4, 3):
      log, edit = sq.sequential_insert(params, sq.log_init(), C, *pair(n), ("w",), l2=1e-2,
                                       check=False)
      assert edit.lam.shape == (out, n) and log.entries[0].keys.shape == (n, d)
  assert c.count == 0


def test_a_layer_index_that_disagrees_with_the_log_is_refused():
  C = jnp.diag(jnp.array([1.0, 1e-4, 1e-4]))
  D = jnp.array([[1.0, 1.0, 1.0]])
  e = memedit.make_edit(("k",), jnp.ones((2, 1)), jnp.array([[0, 1.0, 0]]), label="a")
  log = sq.log_append(sq.log_init(), e, jnp.array([[0.0, 1.0, 0.0]]))
  # the log's key on the unstacked leaf is preserved: D keeps no part along it
  assert np.allclose(sq.sequential_directions(log, C, D, ("k",)), [[0.0, 0.0, 1.0]],
                     atol=1e-5)
  with pytest.raises(ValueError, match=r"index: expected None for the leaf at \('k',\), "
                     r"which the log's edits hold unstacked \(entry 0, 'a', has no index\), "
                     r"got 0"):
    sq.sequential_directions(log, C, D, ("k",), index=0)
  for bad in (-1, True, "0", 1.0):
    with pytest.raises(ValueError, match=r"index: expected None or a layer >= 0 of the "
                       r"stacked leaf at \('k',\), got"):
      sq.sequential_directions(log, C, D, ("k",), index=bad)
  # a stacked leaf: its layer is required, and the layer's keys are preserved
  s = memedit.make_edit(("s",), jnp.ones((2, 1)), jnp.array([[0, 1.0, 0]]), label="s1",
                        index=1)
  slog = sq.log_append(log, s, jnp.array([[0.0, 1.0, 0.0]]))
  with pytest.raises(ValueError, match=r"index: expected the layer of the stacked leaf at "
                     r"\('s',\), which the log's edits hold stacked \(entry 1, 's1', has "
                     r"index 1\), got None"):
    sq.sequential_directions(slog, C, D, ("s",))
  assert np.allclose(sq.sequential_directions(slog, C, D, ("s",), index=1),
                     [[0.0, 0.0, 1.0]], atol=1e-5)
  # another layer of it holds no edit yet: only C is preserved
  assert np.allclose(sq.sequential_directions(slog, C, D, ("s",), index=0),
                     [[0.0, 2 ** -0.5, 2 ** -0.5]], atol=1e-5)
  # sequential_insert refuses the same way
  params = {"s": jnp.zeros((2, 3, 1))}
  with pytest.raises(ValueError, match=r"index: expected the layer of the stacked leaf"):
    sq.sequential_insert(params, slog, C, jnp.array([[0.0, 0.0, 5.0]]), jnp.array([[1.0]]),
                         ("s",), l2=1e-3, check=False)


def test_negative_entry_numbers_count_from_the_end_and_the_message_says_so():
  log = sq.log_init()
  for name in "abc":
    log = sq.log_append(log, _edit(name, 3), np.eye(3))
  assert sq.log_revert(log, -1).active == ("a", "b")
  assert sq.log_revert(log, -3).active == ("b", "c")
  assert sq.log_entry(log, -2).name == "b"
  assert sq.log_replay(sq.log_revert(log, 2), -1).active == ("a", "b", "c")
  for bad in (3, -4):
    with pytest.raises(ValueError, match=rf"edit: expected an entry number in \[-3, 3\) "
                       rf"\(negative numbers count from the end\), got {bad}$"):
      sq.log_revert(log, bad)
  with pytest.raises(ValueError, match="expected an entry of the log, got entry number -1 "
                     "of an empty log"):
    sq.log_revert(sq.log_init(), -1)
