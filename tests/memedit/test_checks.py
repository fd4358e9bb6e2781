"""User arrays in non-native byte order or of non-numeric dtypes at memedit's entry points
(:func:`memedit.checks.as_array`): big-endian numbers give the same results as native
ones; objects, strings, bytes, structured records and dates raise a ValueError naming the
argument."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import enable_x64

import memedit
from memedit.checks import as_array
from memedit.sequential import insert_null_space, null_space

MESSAGE = r"expected an array of numbers \(float, int or bool\), got dtype"


def big(x, dtype=None):
  """``x`` (as ``dtype``) in big-endian byte order, with the same values."""
  x = np.asarray(x) if dtype is None else np.asarray(x, dtype)
  out = x.astype(x.dtype.newbyteorder(">"))
  assert not out.dtype.isnative and np.array_equal(out, x)
  return out


def assert_same_state(a, b):
  for name in memedit.CovarianceState._fields:
    x, y = getattr(a, name), getattr(b, name)
    assert x.dtype == y.dtype, name
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=name)


def keys_of(dtype, shape=(6, 3), seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=shape) * 4
  return x.round().astype(dtype) if np.dtype(dtype).kind == "i" else x.astype(dtype)


BAD = {
    "object": np.array([[1, 2, 3]], object),
    "str": np.array([["a", "b", "c"]]),
    "bytes": np.array([[b"a", b"b", b"c"]]),
    "structured": np.zeros((1, 3), [("a", "f4"), ("b", "i4")]),
    "datetime": np.zeros((1, 3), "datetime64[s]"),
    "timedelta": np.zeros((1, 3), "timedelta64[s]"),
    "list of str": [["a", "b", "c"]],
}


# as_array itself.

def test_as_array_makes_big_endian_native_with_the_same_values():
  for dtype in ("f2", "f4", "f8", "i2", "i8", "u4", "c8"):
    x = big(keys_of("f8") if dtype[0] != "u" else np.arange(6), dtype)
    y = as_array(x, "keys")
    assert type(y) is np.ndarray and y.dtype.isnative, dtype
    assert y.dtype == np.dtype(dtype), dtype
    np.testing.assert_array_equal(y, x)


def test_as_array_keeps_valid_inputs_as_they_are():
  for x in (np.ones(3, jnp.bfloat16), np.array([True, False]), np.ones(2, np.float16),
            np.ones(2, np.float32), np.float32(2.0), 3.0, 2, [1.0, 2.0], [[1, 2]]):
    assert as_array(x, "keys") is x
  assert as_array(np.ones(2, jnp.bfloat16), "keys").dtype == jnp.bfloat16
  a = jnp.ones((2, 3))
  assert as_array(a, "keys") is a  # no copy of a jax.Array
  parts = [jnp.ones(2), jnp.zeros(2)]
  assert as_array(parts, "keys") is parts


def test_as_array_passes_traced_values_through():
  seen = []

  def f(x):
    y = as_array(x, "keys")
    seen.append(y is x and isinstance(y, jax.core.Tracer))
    return jnp.asarray(as_array([y, y], "keys")).sum()

  assert float(jax.jit(f)(jnp.ones(2))) == 4.0
  assert seen == [True]


@pytest.mark.parametrize("kind", sorted(BAD))
def test_as_array_refuses_what_is_not_numbers(kind):
  with pytest.raises(ValueError, match="my_arg: " + MESSAGE):
    as_array(BAD[kind], "my_arg")


# The entry points.

@pytest.mark.parametrize("dtype", ["f4", "f8", "i4"])
def test_covariance_update_big_endian_keys_and_weights(dtype):
  with enable_x64(dtype == "f8"):
    k = keys_of(dtype)
    w = np.linspace(0.5, 2.0, k.shape[0])
    init = memedit.covariance_init(3)
    want = memedit.covariance_update(init, k, w)
    got = memedit.covariance_update(init, big(k), big(w))
    assert_same_state(got, want)
    shifted = memedit.covariance_init(3, shift=big(k[0], "f4"))
    np.testing.assert_array_equal(shifted.shift, k[0].astype("f4"))


def test_stream_covariance_big_endian_chunks():
  chunks = [keys_of("f4", (8, 3), seed) for seed in range(3)]
  want = memedit.stream_covariance(chunks, progress=False, group=2)
  got = memedit.stream_covariance([big(c) for c in chunks], progress=False, group=2)
  assert_same_state(got, want)
  # A key function's batches (any pytree) and its parameters are made native too.
  fn = lambda p, b: b["x"] * p
  ints = [{"x": keys_of("i4", (8, 3), seed)} for seed in range(3)]
  want = memedit.stream_covariance(ints, key_fn=fn, params=np.float32(2.0), progress=False,
                                   group=2)
  got = memedit.stream_covariance([{"x": big(b["x"])} for b in ints], key_fn=fn,
                                  params=big(2.0, "f4"), progress=False, group=2)
  assert_same_state(got, want)


def test_context_directions_and_null_space_big_endian():
  k = keys_of("f4", (40, 3))
  C = k.T @ k / 40
  ctx = keys_of("f4", (2, 3), seed=1)
  w = np.array([1.0, 0.5], np.float32)
  want = memedit.context_directions(C, ctx, w, rank=2)
  got = memedit.context_directions(big(C), big(ctx), big(w), rank=2, rcond=big(1e-6, "f8"))
  np.testing.assert_array_equal(got.D, want.D)
  np.testing.assert_array_equal(got.condition_number, want.condition_number)
  ns = null_space(big(C), keys=big(ctx), weights=big(w), threshold=0.5)
  np.testing.assert_array_equal(ns.P, null_space(C, keys=ctx, weights=w, threshold=0.5).P)


def test_insert_null_space_big_endian():
  P = np.diag([1.0, 1.0, 0.0]).astype(np.float32)
  W, K, V = np.zeros((1, 3), np.float32), np.array([[10.0, 0.0, 5.0]], np.float32), \
      np.ones((1, 1), np.float32)
  want = insert_null_space(W, K, V, P, l2=1e-3)
  got = insert_null_space(big(W), big(K), big(V), big(P), l2=big(1e-3, "f8"))
  np.testing.assert_array_equal(got.lam, want.lam)
  np.testing.assert_array_equal(got.D, want.D)


def test_solve_lambda_big_endian():
  rng = np.random.default_rng(0)
  W = rng.standard_normal((2, 3)).astype(np.float32)
  K = rng.standard_normal((4, 3)).astype(np.float32)
  V = rng.standard_normal((4, 2)).astype(np.float32)
  D = np.eye(3, dtype=np.float32)[:2]
  w = np.array([1.0, 1.0, 0.5, 0.0], np.float32)
  lam0 = np.full((2, 2), 0.1, np.float32)
  matrix = lambda Wm, keys: keys @ Wm.T
  kw = dict(kind="matrix", loss="l2", optimizer="gauss_newton", steps=3)
  want = memedit.solve_lambda(matrix, W, D, K, V, weights=w, lam0=lam0,
                              lam_mask=np.ones((2, 2)), **kw)
  got = memedit.solve_lambda(matrix, big(W), big(D), K, big(V), weights=big(w),
                             lam0=big(lam0), lam_mask=big(np.ones((2, 2))), **kw)
  np.testing.assert_array_equal(got.lam, want.lam)
  np.testing.assert_array_equal(got.final_loss, want.final_loss)
  with pytest.raises(ValueError, match="targets: " + MESSAGE):
    memedit.solve_lambda(matrix, W, D, K, V.astype(object), **kw)
  with pytest.raises(ValueError, match="kernel0: " + MESSAGE):
    memedit.solve_lambda(matrix, W.astype("U8"), D, K, V, **kw)


def test_apply_edit_to_a_big_endian_leaf():
  e = memedit.make_edit(("kernel",), jnp.ones((2, 1)), jnp.array([[1.0, 0, 0]]))
  base = keys_of("f4", (3, 2))
  new, hist = memedit.apply_edit({"kernel": big(base)}, e)
  want, _ = memedit.apply_edit({"kernel": base}, e)
  np.testing.assert_array_equal(new["kernel"], want["kernel"])
  old, _ = memedit.revert_edit(new, e, hist)
  np.testing.assert_array_equal(old["kernel"], base)
  with pytest.raises(ValueError, match=r"params at \('kernel',\): " + MESSAGE):
    memedit.apply_edit({"kernel": BAD["str"].reshape(3, 1)}, e)


@pytest.mark.parametrize("kind", sorted(BAD))
def test_entry_points_refuse_what_is_not_numbers(kind):
  bad = BAD[kind]
  init = memedit.covariance_init(3)
  ok = np.ones((1, 3), np.float32)
  with pytest.raises(ValueError, match="keys: " + MESSAGE):
    memedit.covariance_update(init, bad)
  with pytest.raises(ValueError, match="weights: " + MESSAGE):
    memedit.covariance_update(init, ok, np.asarray(bad).reshape(-1)[:1])
  with pytest.raises(ValueError, match="batches: " + MESSAGE):
    memedit.stream_covariance([bad], progress=False)
  with pytest.raises(ValueError, match="keys: " + MESSAGE):
    memedit.context_directions(jnp.eye(3), bad)
  with pytest.raises(ValueError, match="C: " + MESSAGE):
    memedit.context_directions(np.asarray(bad).repeat(3, axis=0), ok)
  with pytest.raises(ValueError, match="keys: " + MESSAGE):
    null_space(jnp.eye(3), keys=bad)


def test_closed_form_inserts_and_edits_take_big_endian_arrays():
  rng = np.random.default_rng(5)
  W = rng.normal(size=(2, 3)).astype(np.float32)
  k = rng.normal(size=(8, 3)).astype(np.float32)
  C = (k.T @ k / 8 + 0.1 * np.eye(3)).astype(np.float32)
  keys, values = k[:1], rng.normal(size=(1, 2)).astype(np.float32)
  big = lambda a: a.astype(a.dtype.newbyteorder(">"))
  for fn in (memedit.insert_closed_form, memedit.insert_ridge):
    native = fn(W, C, keys, values)
    swapped = fn(big(W), big(C), big(keys), big(values))
    np.testing.assert_array_equal(np.asarray(swapped.lam), np.asarray(native.lam))
    np.testing.assert_array_equal(np.asarray(swapped.D), np.asarray(native.D))
  D = native.D
  lam = memedit.least_squares_lambda(W, D, keys, values)
  np.testing.assert_array_equal(
      np.asarray(memedit.least_squares_lambda(big(W), big(np.asarray(D)), big(keys),
                                              big(values))), np.asarray(lam))
  e1 = memedit.make_edit(("k",), big(np.asarray(lam)), big(np.asarray(D)), kind="matrix")
  e0 = memedit.make_edit(("k",), np.asarray(lam), np.asarray(D), kind="matrix")
  assert e1.fingerprint == e0.fingerprint
  for fn, args in ((memedit.insert_ridge, (W, C, keys.astype(object), values)),
                   (memedit.least_squares_lambda, (W, D, keys, values.astype(str)))):
    with pytest.raises(ValueError, match=r"^(keys|values): expected an array of numbers"):
      fn(*args)
  with pytest.raises(ValueError, match=r"^lam: expected an array of numbers"):
    memedit.make_edit(("k",), np.asarray(lam).astype(object), np.asarray(D), kind="matrix")
