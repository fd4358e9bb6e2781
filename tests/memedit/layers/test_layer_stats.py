"""Statistics of a layer's keys collected through whole models."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import memedit
import models
from compilations import Compilations
from memedit.layers import (capture, layer_cache_key, layer_covariance, layer_key_fn,
                            memory_view, substitute)


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _numpy_c(keys, weights=None):
  k = np.asarray(keys, np.float64).reshape(-1, keys.shape[-1])
  w = np.ones(len(k)) if weights is None else np.asarray(weights, np.float64).reshape(-1)
  return (k * w[:, None]).T @ k / w.sum()


def test_conv_patch_statistics_match_float64_numpy():
  g = models.build(models.Generator, 0)
  batches = [jax.random.normal(jax.random.key(i), (4, 8)) for i in range(3)]
  view = memory_view(g, ("mid",), patch=True)
  st = layer_covariance(g, view, batches, group=2)  # two compiled groups, the last padded
  assert memedit.key_count(st) == 3 * 4 * 8 * 8
  c = capture(g, ("mid",), jnp.concatenate(batches), single=True)
  ref = _numpy_c(view.keys(c.keys))
  assert _rel(memedit.second_moment(st), ref) <= 1e-6


def test_masked_token_statistics_through_linen_attention():
  lm = models.LTransformer()
  toks = [jax.random.randint(jax.random.key(i), (3, 5), 0, 11) for i in range(2)]
  masks = [jax.random.uniform(jax.random.key(10 + i), (3, 5)) for i in range(2)]
  var = models.linen_init(lm, toks[0])
  st = layer_covariance((lm, var), ("attn", "out"), list(zip(toks, masks)), masked=True)
  view = memory_view((lm, var), ("attn", "out"), toks[0])
  c = capture((lm, var), ("attn", "out"), jnp.concatenate(toks), single=True)
  ref = _numpy_c(view.keys(c.keys), jnp.concatenate(masks))
  assert view.key_dim == 16
  assert _rel(memedit.second_moment(st), ref) <= 1e-6


def test_per_pixel_statistics_with_resized_spatial_mask():
  lg = models.LGenerator()
  z = jax.random.normal(jax.random.key(0), (2, 8))
  var = models.linen_init(lg, z)
  mask = (jax.random.uniform(jax.random.key(1), (2, 8, 8)) > 0.5).astype(jnp.float32)
  st = layer_covariance((lg, var), ("up1",), [(z, mask)], masked=True)
  c = capture((lg, var), ("up1",), z, single=True)  # keys (2, 4, 4, 16): mask is resized
  w = jax.image.resize(mask, (2, 4, 4), "linear")
  assert _rel(memedit.second_moment(st), _numpy_c(c.keys, w)) <= 1e-6


def test_masked_statistics_of_1d_and_3d_convolutions_resize_the_mask():
  rngs = nnx.Rngs(0)
  conv1 = nnx.Sequential(nnx.Conv(2, 4, (3,), strides=(2,), rngs=rngs), nnx.relu,
                         nnx.Conv(4, 4, (3,), rngs=rngs))
  conv3 = nnx.Sequential(nnx.Conv(2, 3, (3, 3, 3), strides=(2, 2, 2), rngs=rngs), nnx.relu,
                         nnx.Conv(3, 2, (3, 3, 3), rngs=rngs))
  cases = [(conv1, (2, 8, 2), (2, 8), False, (2, 4)),  # per-pixel keys at length 4
           (conv3, (2, 4, 4, 4, 2), (2, 4, 4, 4), True, (2, 2, 2, 2))]  # patch keys
  for i, (model, x_shape, m_shape, patch, key_sp) in enumerate(cases):
    x = jax.random.normal(jax.random.key(i), x_shape)
    mask = jax.random.uniform(jax.random.key(10 + i), m_shape)
    st = layer_covariance(model, ("layers", 2), [(x, mask)], masked=True, patch=patch)
    view = memory_view(model, ("layers", 2), patch=patch)
    keys = view.keys(capture(model, ("layers", 2), x, single=True).keys)
    assert keys.shape[:-1] == key_sp
    w = jax.image.resize(mask, key_sp, "linear")
    few = memedit.key_count(st) < view.key_dim  # the patch keys: 16 of dimension 81
    with pytest.warns(UserWarning, match="has rank at most") if few else warnings.catch_warnings():
      if not few:
        warnings.simplefilter("error")
      C = memedit.second_moment(st)
    assert _rel(C, _numpy_c(keys, w)) <= 1e-6
  with pytest.raises(ValueError, match=r"expected shape \(B, L\) for a conv layer with 1 "):
    layer_covariance(conv1, ("layers", 2), [(jnp.ones((2, 8, 2)), jnp.ones((2, 8, 4)))],
                     masked=True)


def test_scanned_layer_statistics_pool_every_step():
  s = models.build(models.ScanMLP, 1)
  xs = [jax.random.normal(jax.random.key(i), (4, 6)) for i in range(2)]
  st = layer_covariance(s, ("blocks", "fc2"), xs)
  c = capture(s, ("blocks", "fc2"), jnp.concatenate(xs))
  assert c.keys.shape == (3, 8, 32) and memedit.key_count(st) == 3 * 8
  with pytest.warns(UserWarning, match="has rank at most"):  # 24 keys of dimension 32
    C = memedit.second_moment(st)
  assert _rel(C, _numpy_c(c.keys)) <= 1e-6


def test_key_function_only_runs_the_model_up_to_the_layer():
  g = models.build(models.Generator, 0)
  z = jnp.ones((2, 8))
  for name, convs in (("up1", 0), ("up2", 2)):
    fn = layer_key_fn(g, memory_view(g, (name,)))
    hlo = jax.jit(fn).lower(z).compile().as_text()
    # up1's keys need no convolution; up2's need up1 and mid but not up2 or rgb.
    assert hlo.count("convolution(") == convs, name


def test_statistics_cache_by_content_address_spec_and_dtype(tmp_path):
  m = models.build(models.MLP, 0)
  xs = [jax.random.normal(jax.random.key(i), (4, 6)) for i in range(2)]
  view = memory_view(m, ("blocks", 0, "fc1"))
  a = layer_covariance(m, view, xs, cache_dir=tmp_path)
  b = layer_covariance(m, view, xs, cache_dir=tmp_path)
  assert len(list(tmp_path.iterdir())) == 1
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)
  key = layer_cache_key(m, view, {"n": 2})
  assert key == layer_cache_key(nnx.split(m), view, {"n": 2})
  assert key != layer_cache_key(m, view, {"n": 3})
  assert key != layer_cache_key(m, view, {"n": 2}, dtype=jnp.bfloat16)
  assert key != layer_cache_key(m, memory_view(m, ("blocks", 1, "fc1")), {"n": 2})
  edited = substitute(m, view, view.kernel() + 1.0)
  assert key != layer_cache_key(edited, view, {"n": 2})
  with pytest.raises(ValueError, match="spec: expected a description"):
    layer_covariance(m, view, iter(xs), cache_dir=tmp_path)


def test_two_parameter_sets_of_one_model_share_the_compiled_statistics_programs():
  batches = [jax.random.normal(jax.random.key(i), (4, 8)) for i in range(3)]
  for seed in (0, 1):
    g = models.build(models.Generator, seed)
    with Compilations() as compiled:
      st = layer_covariance(g, ("mid",), batches, patch=True, group=2)
    if seed == 1:  # a new model object, new parameters: nothing compiles again
      assert compiled.count == 0, compiled.events
    c = capture(g, ("mid",), jnp.concatenate(batches), single=True)
    view = memory_view(g, ("mid",), patch=True)
    assert _rel(memedit.second_moment(st), _numpy_c(view.keys(c.keys))) <= 1e-6
