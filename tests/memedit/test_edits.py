"""Edits apply, compose and revert bit for bit, on Linen dicts and NNX state, and persist."""

from __future__ import annotations

import dataclasses
import itertools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx

import memedit
from memedit.tree import get_leaf, leaf_paths, replace_leaf

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")


def linen_params():
  model = nn.Sequential([nn.Dense(6), nn.relu, nn.Conv(4, (3, 3))])
  variables = model.init(jax.random.key(0), jnp.ones((1, 5, 5, 3)))
  return model, variables


def random_edit(rng, path, shape, kind, rank=2, in_ndim=1, label=None):
  d = memedit.key_dim(shape, kind, in_ndim)
  D = np.linalg.qr(rng.standard_normal((d, rank)))[0].T.astype(np.float32)
  lam = rng.standard_normal(memedit.lambda_shape(shape, rank, kind, in_ndim)).astype(np.float32)
  return memedit.make_edit(path, lam, D, kind=kind, in_ndim=in_ndim, method="test",
                           settings={"seed": int(rng.integers(1 << 30))}, label=label)


def leaves_equal(a, b):
  la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
  return len(la) == len(lb) and all(
      np.asarray(x).dtype == np.asarray(y).dtype and np.array_equal(np.asarray(x), np.asarray(y))
      for x, y in zip(la, lb))


def test_apply_changes_only_the_target_and_matches_the_delta():
  rng = np.random.default_rng(0)
  _, params = linen_params()
  path = ("params", "layers_2", "kernel")
  kernel = get_leaf(params, path)
  e = random_edit(rng, path, kernel.shape, "conv")
  new, hist = memedit.apply_edit(params, e)
  np.testing.assert_allclose(get_leaf(new, path),
                             kernel + memedit.kernel_delta(e.lam, e.D, kernel.shape, "conv"),
                             rtol=1e-6, atol=1e-6)
  other = ("params", "layers_0", "kernel")
  assert get_leaf(new, other) is get_leaf(params, other)
  assert hist.names == (e.name,)


def test_compose_and_revert_bit_for_bit_in_any_order():
  rng = np.random.default_rng(1)
  _, params = linen_params()
  conv = ("params", "layers_2", "kernel")
  dense = ("params", "layers_0", "kernel")
  edits = [random_edit(rng, conv, get_leaf(params, conv).shape, "conv"),
           random_edit(rng, conv, get_leaf(params, conv).shape, "conv"),
           random_edit(rng, dense, get_leaf(params, dense).shape, "dense")]
  original = jax.tree_util.tree_map(np.array, params)

  results = []
  for order in itertools.permutations(range(3)):
    p, h = params, None
    for i in order:
      p, h = memedit.apply_edit(p, edits[i], h)
    results.append(p)
    # Revert in every order: each intermediate equals applying only the remaining edits.
    for rev in itertools.permutations(range(3)):
      q, hq = p, h
      for j, i in enumerate(rev):
        q, hq = memedit.revert_edit(q, edits[i], hq)
        ref, hr = params, None
        for k in sorted(rev[j + 1:]):
          ref, hr = memedit.apply_edit(ref, edits[k], hr)
        assert leaves_equal(q, ref)
      assert leaves_equal(q, original)
      assert hq.edits == () and hq.originals == {}
  for r in results[1:]:
    assert leaves_equal(r, results[0])
  # The caller's parameters were never touched.
  assert leaves_equal(params, original)


def test_nnx_state_paths_and_jit():
  class Block(nnx.Module):

    def __init__(self, rngs):
      self.layers = nnx.List([nnx.Linear(4, 5, rngs=rngs), nnx.Linear(5, 3, rngs=rngs)])

    def __call__(self, x):
      return self.layers[1](jax.nn.relu(self.layers[0](x)))

  model = Block(nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  before = jax.tree_util.tree_map(np.array, state)
  path = ("layers", 1, "kernel")
  assert path in leaf_paths(state)
  rng = np.random.default_rng(2)
  e = random_edit(rng, path, get_leaf(state, path).shape, "dense", rank=1)
  new_state, hist = jax.jit(memedit.apply_edit)(state, e)
  edited = nnx.merge(graphdef, new_state)
  x = rng.standard_normal((2, 4)).astype(np.float32)
  h = np.asarray(jax.nn.relu(model.layers[0](x)))
  W = np.asarray(get_leaf(state, path))
  expected = h @ (W + np.asarray(memedit.kernel_delta(e.lam, e.D, W.shape))) + np.asarray(
      model.layers[1].bias[...])
  np.testing.assert_allclose(edited(x), expected, rtol=1e-5, atol=1e-5)
  back, _ = memedit.revert_edit(new_state, e, hist)
  assert leaves_equal(back, before)
  assert leaves_equal(nnx.state(model), before)


def test_non_finite_factors_and_integer_leaves_are_refused():
  params = {"k": jnp.ones((6, 4))}
  with pytest.raises(ValueError,
                     match="lam: expected finite values, got NaN or inf \\(a solve"):
    memedit.make_edit(("k",), jnp.full((4, 1), jnp.nan), jnp.ones((1, 6)))
  with pytest.raises(ValueError,
                     match="D: expected finite values, got NaN or inf \\(a solve"):
    memedit.make_edit(("k",), jnp.ones((4, 1)), jnp.full((1, 6), jnp.inf))
  # A failed solve under jit gives NaN factors: no edit is made of them.
  sol = jax.jit(memedit.insert_closed_form)(jnp.ones((4, 6)), jnp.eye(6),
                                            jnp.stack([jnp.ones(6), 2 * jnp.ones(6)]),
                                            jnp.zeros((2, 4)))
  with pytest.raises(ValueError,
                     match="lam: expected finite values, got NaN or inf \\(a solve"):
    memedit.make_edit(("k",), sol.lam, sol.D)
  # An Edit built without make_edit is checked when applied; params stay as they were.
  good = memedit.make_edit(("k",), jnp.ones((4, 1)), jnp.ones((1, 6)))
  nan_edit = dataclasses.replace(good, lam=jnp.full((4, 1), jnp.nan))
  with pytest.raises(ValueError,
                     match="lam: expected finite values, got NaN or inf \\(a solve"):
    memedit.apply_edit(params, nan_edit)
  np.testing.assert_array_equal(params["k"], np.ones((6, 4)))
  with pytest.raises(ValueError, match="expected a floating-point kernel at \\('k',\\), got int32"):
    memedit.apply_edit({"k": jnp.ones((6, 4), jnp.int32)}, good)
  # Traced factors pass make_edit's check (it runs on concrete values only).
  assert jax.eval_shape(lambda l: memedit.make_edit(("k",), l, jnp.ones((1, 6))).lam,
                        jnp.ones((4, 1))).shape == (4, 1)


def test_save_load_roundtrip_and_errors(tmp_path):
  rng = np.random.default_rng(3)
  _, params = linen_params()
  path = ("params", "layers_2", "kernel")
  e = random_edit(rng, path, get_leaf(params, path).shape, "conv", rank=3)
  out = memedit.save_edit(tmp_path / "edit", e)
  meta = json.loads((tmp_path / "edit" / "meta.json").read_text())
  assert meta["path"] == list(path) and meta["kind"] == "conv"
  loaded = memedit.load_edit(out)
  assert loaded.name == e.name and loaded.path == e.path and loaded.settings == e.settings
  assert loaded.kind == e.kind and loaded.in_ndim == e.in_ndim and loaded.method == e.method
  np.testing.assert_array_equal(loaded.lam, e.lam)
  np.testing.assert_array_equal(loaded.D, e.D)
  a, _ = memedit.apply_edit(params, e)
  b, _ = memedit.apply_edit(params, loaded)
  assert leaves_equal(a, b)
  # Only the factors are stored: the directory is small next to the model.
  size = sum(f.stat().st_size for f in (tmp_path / "edit").rglob("*") if f.is_file())
  assert size < 64 * 1024
  # Overwriting is atomic: a failing save leaves the earlier edit intact.
  e2 = random_edit(rng, path, get_leaf(params, path).shape, "conv", rank=3)
  import memedit._io as io

  class Boom(Exception):
    pass

  real = io.json.dump

  def failing(*args, **kwargs):
    raise Boom

  io.json.dump = failing
  try:
    with pytest.raises(Boom):
      memedit.save_edit(tmp_path / "edit", e2)
  finally:
    io.json.dump = real
  assert memedit.load_edit(out).name == e.name
  assert [p.name for p in tmp_path.iterdir()] == ["edit"]
  memedit._io.save_tree(tmp_path / "other", {"x": np.zeros(2)}, {"format": "something"})
  with pytest.raises(ValueError, match="expected a saved memedit edit"):
    memedit.load_edit(tmp_path / "other")


def test_bad_input():
  rng = np.random.default_rng(4)
  _, params = linen_params()
  with pytest.raises(ValueError, match="path: expected the path of a leaf.*closest"):
    get_leaf(params, ("params", "layers_2", "kernal"))
  e = random_edit(rng, ("params", "layers_2", "kernel"), (3, 3, 6, 5), "conv")
  with pytest.raises(ValueError, match=r"D: expected shape \(r, 3\)|lam: expected shape"):
    memedit.apply_edit(params, e)
  good = random_edit(rng, ("params", "layers_2", "kernel"),
                     get_leaf(params, ("params", "layers_2", "kernel")).shape, "conv")
  p, h = memedit.apply_edit(params, good)
  with pytest.raises(ValueError, match="already applied"):
    memedit.apply_edit(p, good, h)
  with pytest.raises(ValueError, match="expected one of the applied edits"):
    memedit.revert_edit(p, "nope", h)
  with pytest.raises(ValueError, match="kind: expected one of"):
    memedit.make_edit(("a",), np.ones((2, 1)), np.ones((1, 3)), kind="linear")
  with pytest.raises(ValueError, match=r"lam: expected shape \(\.\.\., 1\)"):
    memedit.make_edit(("a",), np.ones((2, 2)), np.ones((1, 3)))


def test_changes_made_between_edits_are_kept():
  rng = np.random.default_rng(5)
  _, params = linen_params()
  path = ("params", "layers_2", "kernel")
  kernel = np.asarray(get_leaf(params, path))
  e1, e2 = (random_edit(rng, path, kernel.shape, "conv", label=n) for n in ("e1", "e2"))
  d1, d2 = (np.asarray(memedit.edit_delta(e, kernel.shape), np.float64) for e in (e1, e2))
  # Fine-tuning after the first edit changes half of the kernel's entries.
  change = np.where(rng.random(kernel.shape) < 0.5, 0.01 * rng.standard_normal(kernel.shape), 0)
  untouched = change == 0
  for jit in (False, True):
    apply = jax.jit(memedit.apply_edit) if jit else memedit.apply_edit
    revert = jax.jit(memedit.revert_edit, static_argnums=1) if jit else memedit.revert_edit
    p, h = apply(params, e1)
    tuned = np.asarray(get_leaf(p, path), np.float64) + change
    p = replace_leaf(p, path, jnp.asarray(tuned, jnp.float32))
    p, h = apply(p, e2, h)
    np.testing.assert_allclose(get_leaf(p, path), tuned + d2, rtol=0, atol=2e-6)
    p, h = revert(p, "e1", h)
    np.testing.assert_allclose(get_leaf(p, path), kernel + change + d2, rtol=0,
                               atol=2e-6)
    p, h = revert(p, "e2", h)
    back = np.asarray(get_leaf(p, path))
    # Reverting every edit gives the fine-tuned kernel without the edits; the entries the
    # fine-tuning left alone come back bit for bit.
    np.testing.assert_allclose(back, kernel + change, rtol=0, atol=2e-6)
    np.testing.assert_array_equal(back[untouched], kernel[untouched])
    assert h.edits == () and h.originals == {} and h.fingerprints == {}
  # Without changes in between the original comes back bit for bit, eager and jit mixed.
  p, h = jax.jit(memedit.apply_edit)(params, e1)
  p, h = memedit.apply_edit(p, e2, h)
  p, h = jax.jit(memedit.revert_edit, static_argnums=1)(p, "e1", h)
  p, h = memedit.revert_edit(p, "e2", h)
  assert leaves_equal(p, params)
  # A leaf whose dtype or shape changed in between is refused, naming it.
  p, h = memedit.apply_edit(params, e1)
  cast = replace_leaf(p, path, get_leaf(p, path).astype(jnp.bfloat16))
  with pytest.raises(ValueError, match=r"params: expected the edited leaf at \('params', "
                                       r"'layers_2', 'kernel'\) to keep its shape \(3, 3, 6, "
                                       r"4\) and dtype float32, got shape \(3, 3, 6, 4\) and "
                                       r"dtype bfloat16"):
    memedit.apply_edit(cast, e2, h)
  with pytest.raises(ValueError, match="params: expected the edited leaf"):
    memedit.revert_edit(cast, e1, h)


def legacy_factors():
  """The factors of tests/memedit/data/edit_v1, an edit written by the first release's
  save_edit (before Edit became a frozen dataclass)."""
  rng = np.random.default_rng(0)
  lam = rng.normal(size=(3, 3, 4, 2)).astype(np.float32)
  D = rng.normal(size=(2, 5)).astype(np.float32)
  return lam, D


def test_edit_is_a_frozen_pytree_of_its_factors():
  rng = np.random.default_rng(6)
  e = random_edit(rng, ("params", "k"), (3, 3, 6, 4), "conv", rank=2)
  with pytest.raises(dataclasses.FrozenInstanceError):
    e.lam = e.lam * 2
  leaves, treedef = jax.tree_util.tree_flatten(e)
  assert len(leaves) == 2 and leaves[0] is e.lam and leaves[1] is e.D
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(e)[0]]
  assert paths == [".lam", ".D"]
  doubled = jax.tree_util.tree_map(lambda x: 2 * x, e)
  assert (doubled.path, doubled.kind, doubled.method, doubled.settings, doubled.index) == (
      e.path, e.kind, e.method, e.settings, e.index)
  np.testing.assert_array_equal(doubled.lam, 2 * np.asarray(e.lam))
  # The name follows the content: a mapped or replaced edit is named anew.
  assert doubled.name != e.name
  assert dataclasses.replace(e, lam=2 * e.lam, D=2 * e.D).name == doubled.name
  assert dataclasses.replace(e, method="other").name != e.name
  assert jax.tree_util.tree_map(lambda x: x, e).name == e.name


def test_edit_equality_is_identity_and_fingerprints_compare_content():
  lam, D = np.ones((2, 1), np.float32), np.ones((1, 3), np.float32)
  a = memedit.make_edit(("k",), lam, D)
  b = memedit.make_edit(("k",), lam.copy(), D.copy())
  assert a == a and a != b and len({a, b}) == 2
  assert a.fingerprint == b.fingerprint and a.name == a.fingerprint
  named = memedit.make_edit(("k",), lam, D, label="smile")
  assert named.name == "smile" and named.fingerprint == a.fingerprint
  # The fingerprint is sha256 of the metadata and the factors' shapes and bytes.
  import hashlib
  h = hashlib.sha256(json.dumps([["k"], "dense", 1, "", "{}"]).encode())
  for x in (lam, D):
    h.update(str(x.shape).encode())
    h.update(x.tobytes())
  assert a.fingerprint == h.hexdigest()[:16]


def test_traced_edits_keep_the_fingerprint_of_their_arguments():
  rng = np.random.default_rng(7)
  e = random_edit(rng, ("k",), (4, 3), "dense", rank=1)
  traces = []

  def name_inside(edit):
    traces.append(edit.name)
    return edit.lam.sum()

  fn = jax.jit(name_inside)
  fn(e)
  fn(memedit.make_edit(e.path, e.lam, e.D, method=e.method, settings=e.settings))
  assert traces == [e.name]  # same content: no retrace
  other = dataclasses.replace(e, lam=e.lam + 1)
  fn(other)
  assert traces == [e.name, other.name]
  # An edit built inside the trace from traced factors has no fingerprint; a label names it.
  with pytest.raises(ValueError, match="expected concrete"):
    jax.jit(lambda lam: memedit.make_edit(("k",), lam, e.D).name)(e.lam)
  assert jax.jit(lambda lam: memedit.make_edit(("k",), lam, e.D, label="x").lam)(e.lam).shape


def test_edits_written_by_the_first_release_load(tmp_path):
  lam, D = legacy_factors()
  e = memedit.load_edit(os.path.join(DATA, "edit_v1"))
  np.testing.assert_array_equal(e.lam, lam)
  np.testing.assert_array_equal(e.D, D)
  assert (e.path, e.kind, e.in_ndim, e.method, e.index) == (
      ("params", "conv", "kernel"), "conv", 1, "insert/zca", 1)
  assert e.settings == {"rank": 2, "rcond": 1e-6}
  # Its stored name was the content hash: it is the fingerprint, not a label.
  assert e.name == e.fingerprint == "18e538b916b3f1fb" and e.label is None
  same = memedit.make_edit(e.path, lam, D, kind="conv", method="insert/zca",
                           settings={"rank": 2, "rcond": 1e-6}, index=1)
  assert same.name == e.name
  # Saved again, the file keeps the same format (arrays "lam" and "directions").
  out = memedit.save_edit(tmp_path / "again", e)
  meta = json.loads((tmp_path / "again" / "meta.json").read_text())
  old = json.loads(open(os.path.join(DATA, "edit_v1", "meta.json")).read())
  assert meta == old
  labelled = memedit.save_edit(tmp_path / "labelled", dataclasses.replace(e, label="smile"))
  back = memedit.load_edit(labelled)
  assert back.label == "smile" and back.name == "smile" and back.fingerprint == e.fingerprint
  assert memedit.load_edit(out).label is None


def _rewrite_meta(folder, **changes):
  """Changes fields of a saved edit's meta.json and re-signs it in the marker, as a file of
  another version (or edited by hand) would be."""
  from memedit import _io

  meta_file = os.path.join(folder, "meta.json")
  meta = json.loads(open(meta_file).read())
  meta.update(changes)
  for k in [k for k, v in changes.items() if v is _DROP]:
    del meta[k]
  with open(meta_file, "w") as f:
    json.dump(meta, f)
  marker_file = os.path.join(folder, _io.MARKER_FILE)
  marker = json.loads(open(marker_file).read())
  marker["sha256"]["meta.json"] = _io.sha256_file(meta_file)
  with open(marker_file, "w") as f:
    json.dump(marker, f)


_DROP = object()


@pytest.mark.parametrize("changes, message", [
    ({"path": _DROP}, r"meta.json: expected the fields .*, missing \['path'\]"),
    ({"path": "k2"}, r"meta.json: path: expected a non-empty list of str/int keys, got 'k2'"),
    ({"kind": "weird"}, r"meta.json: kind: expected one of \('matrix', 'dense', 'conv'\), "
                        r"got 'weird'"),
    ({"in_ndim": "x"}, r"meta.json: in_ndim: expected a positive int, got 'x'"),
    ({"in_ndim": -1}, r"meta.json: in_ndim: expected a positive int, got -1"),
    ({"method": 5}, r"meta.json: method: expected a str, got 5"),
    ({"name": 5}, r"meta.json: name: expected a str, got 5"),
    ({"index": "x"}, r"meta.json: index: expected a non-negative int, got 'x'"),
    ({"lam_shape": [5, 5]}, r"lam: expected the shape \[5, 5\] recorded in meta.json "
                            r"\(lam_shape\), got \[2, 1\]"),
])
def test_load_edit_checks_every_metadata_field(tmp_path, changes, message):
  e = memedit.make_edit(("k",), jnp.ones((2, 1)), jnp.ones((1, 3)), label="a")
  out = memedit.save_edit(tmp_path / "e", e)
  _rewrite_meta(out, **changes)
  with pytest.raises(ValueError, match=message):
    memedit.load_edit(out)


def test_make_edit_refuses_a_non_positive_in_ndim():
  for n in (0, -1):
    with pytest.raises(ValueError, match=rf"in_ndim: expected a positive int \(the leading "
                                         rf"input axes of a dense kernel\), got {n}"):
      memedit.make_edit(("k",), np.ones((2, 1)), np.ones((1, 3)), kind="conv", in_ndim=n)


def test_apply_edits_gives_the_bits_of_apply_edit_in_turn():
  """apply_edits computes each leaf once; it must equal apply_edit of each edit in turn,
  also from a history whose leaf was changed since (the base moves), and name a bad edit."""
  rs = np.random.RandomState(3)
  params = {"a": jnp.asarray(rs.randn(5, 4), jnp.float32),
            "b": jnp.asarray(rs.randn(3, 3, 2, 4), jnp.float32)}
  first = memedit.make_edit(("a",), rs.randn(4, 1), rs.randn(1, 5), label="first")
  params, hist = memedit.apply_edit(params, first)
  params = {**params, "a": params["a"] + 0.25}  # changed between edits (e.g. fine-tuned)
  edits = [memedit.make_edit(("a",), rs.randn(4, 2), rs.randn(2, 5), label=f"a{i}")
           for i in range(3)]
  edits += [memedit.make_edit(("b",), rs.randn(3, 3, 4, 1), rs.randn(1, 2), kind="conv",
                              label=f"b{i}") for i in range(2)]
  edits = [edits[0], edits[3], edits[1], edits[4], edits[2]]
  want_p, want_h = params, hist
  for e in edits:
    want_p, want_h = memedit.apply_edit(want_p, e, want_h)
  for fn in (memedit.apply_edits, jax.jit(memedit.apply_edits)):
    got_p, got_h = fn(params, edits, hist)
    for k in ("a", "b"):
      np.testing.assert_array_equal(np.asarray(got_p[k]), np.asarray(want_p[k]))
      np.testing.assert_array_equal(np.asarray(got_h.fingerprints[(k,)]),
                                    np.asarray(want_h.fingerprints[(k,)]))
    assert got_h.names == want_h.names
    for k in want_h.originals:
      np.testing.assert_array_equal(np.asarray(got_h.originals[k]),
                                    np.asarray(want_h.originals[k]))
  # Reverting continues from the returned history as from apply_edit's.
  back, _ = memedit.revert_edit(got_p, "a1", got_h)
  ref, _ = memedit.revert_edit(want_p, "a1", want_h)
  np.testing.assert_array_equal(np.asarray(back["a"]), np.asarray(ref["a"]))
  bad = memedit.make_edit(("a",), rs.randn(4, 1), rs.randn(1, 7), label="wide")
  with pytest.raises(ValueError, match=r"edits\[1\] \('wide', at \('a',\)\): D: expected shape "
                     r"\(r, 5\)"):
    memedit.apply_edits(params, [edits[0], bad], hist)
  with pytest.raises(ValueError, match=r"edits\[1\] \('a0', at \('a',\)\): edit: 'a0' is "
                     "already applied"):
    memedit.apply_edits(params, [edits[0], edits[0]], hist)


def test_a_donated_base_or_leaf_is_refused_by_name_and_a_kept_copy_reverts_exactly():
  """The history keeps the original leaf itself; donating it made revert_edit (and a
  later edit of the leaf) fail with XLA's raw 'buffer has been deleted or donated'."""
  rng = np.random.default_rng(7)
  shape = (5, 3)
  kernel = rng.standard_normal(shape).astype(np.float32)
  e1 = random_edit(rng, ("k",), shape, "dense", rank=1, label="e1")
  e2 = random_edit(rng, ("k",), shape, "dense", rank=1, label="e2")
  double = jax.jit(lambda p: jax.tree_util.tree_map(lambda x: 2 * x, p), donate_argnums=0)

  params = {"k": jnp.asarray(kernel)}
  new, hist = memedit.apply_edit(params, e1)
  double(params)  # a training step that donates the original params
  assert hist.originals[("k",)].is_deleted()
  base = r"history: the base leaf kept for \('k',\) .* has been deleted or donated"
  with pytest.raises(ValueError, match=base + r".*keep a copy of those params"):
    memedit.revert_edit(new, e1, hist)
  with pytest.raises(ValueError, match=base):
    memedit.apply_edit(new, e2, hist)
  with pytest.raises(ValueError, match=r"edits\[0\] \('e2', at \('k',\)\): " + base):
    memedit.apply_edits(new, [e2], hist)

  # The current params donated instead: the message names the params leaf.
  new, hist = memedit.apply_edit({"k": jnp.asarray(kernel)}, e1)
  double(new)
  with pytest.raises(ValueError, match=r"params: the leaf at \('k',\) has been deleted or "
                     r"donated .*pass the params the donating function returned"):
    memedit.revert_edit(new, e1, hist)
  with pytest.raises(ValueError, match=r"params: the leaf at \('k',\) has been deleted"):
    memedit.apply_edit(new, e2)

  # An edit whose factors were donated.
  gone = jax.tree_util.tree_map(jnp.copy, e2)
  gone.lam.delete()
  with pytest.raises(ValueError, match=r"edit: the factors \(lam, D\) of the edit at "
                     r"\('k',\) were deleted or donated"):
    memedit.apply_edit({"k": jnp.asarray(kernel)}, gone)

  # Keeping a copy of the params the history refers to: revert is bit-exact afterwards.
  params = {"k": jnp.asarray(kernel)}
  new, hist = memedit.apply_edit(jax.tree_util.tree_map(jnp.copy, params), e1)
  new, hist = memedit.apply_edit(new, e2, hist)
  trained = double(params)
  assert params["k"].is_deleted()
  back, hist = memedit.revert_edit(new, e2, hist)
  back, hist = memedit.revert_edit(back, e1, hist)
  assert np.array_equal(np.asarray(back["k"]), kernel) and hist.originals == {}
  np.testing.assert_array_equal(np.asarray(trained["k"]), 2 * kernel)


def test_a_numpy_leaf_written_into_after_apply_still_reverts_to_the_original():
  """The history kept the caller's numpy array itself: writing into it later (in-place
  updates, loading other weights into the same buffer) changed what revert restored."""
  rng = np.random.default_rng(8)
  kernel = rng.standard_normal((4, 3)).astype(np.float32)
  params = {"k": kernel.copy()}
  e1 = random_edit(rng, ("k",), kernel.shape, "dense", rank=1, label="e1")
  e2 = random_edit(rng, ("k",), kernel.shape, "dense", rank=1, label="e2")
  new, hist = memedit.apply_edit(params, e1)
  params["k"][...] = 5.0
  params["k"] += 1.0
  partly, hist2 = memedit.apply_edit(new, e2, hist)
  back, _ = memedit.revert_edit(new, e1, hist)
  assert np.array_equal(np.asarray(back["k"]), kernel)
  back, hist2 = memedit.revert_edit(partly, "e2", hist2)
  back, _ = memedit.revert_edit(back, "e1", hist2)
  assert np.array_equal(np.asarray(back["k"]), kernel)


def test_a_leafs_fingerprint_is_one_program_and_the_same_op_by_op():
  from compilations import Compilations
  from memedit import edits

  for x in (np.random.default_rng(3).normal(size=(13, 3)).astype(np.float32),
            np.arange(10, dtype=np.int32).reshape(2, 5),
            np.random.default_rng(4).normal(size=(3, 2, 3))):
    x = jnp.asarray(x)
    with Compilations() as c:
      fp = edits._fingerprint(x)
    assert c.count <= 1, c.events  # was one program per operation
    with jax.disable_jit():
      np.testing.assert_array_equal(np.asarray(fp), np.asarray(edits._fingerprint(x)))
