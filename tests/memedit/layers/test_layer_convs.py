"""Grouped, depthwise, 1-D and 3-D convolutions and padding modes as exact memories."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import memedit
from memedit.tree import get_leaf
from memedit.layers import (capture, edited_kernel, insert_through_view, layer_covariance,
                            memory_view)
from memedit.layers.edit import layer_bias as _layer_bias


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


class DWBlock(nnx.Module):
  """A ConvNeXt-like block: 7x7 depthwise conv, pointwise MLP, residual."""

  def __init__(self, c, *, rngs):
    self.dw = nnx.Conv(c, c, (7, 7), feature_group_count=c, padding="SAME", rngs=rngs)
    self.pw = nnx.Linear(c, c, rngs=rngs)

  def __call__(self, x):
    return x + self.pw(nnx.gelu(self.dw(x)))


class Grouped3D(nnx.Module):
  def __init__(self, *, rngs):
    self.conv = nnx.Conv(4, 6, (2, 2, 2), feature_group_count=2, padding="VALID", rngs=rngs)
    self.head = nnx.Linear(6, 2, rngs=rngs)

  def __call__(self, x):
    return self.head(jnp.tanh(self.conv(x)))


class Reflect1D(nnx.Module):
  def __init__(self, *, rngs):
    self.conv = nnx.Conv(3, 5, 3, padding="REFLECT", rngs=rngs)

  def __call__(self, x):
    return jnp.tanh(self.conv(x))


class LMambaConv(nn.Module):
  """Mamba2-like: input projection, causal depthwise Conv1d over the sequence, output."""

  @nn.compact
  def __call__(self, x):  # (B, L, 5)
    h = nn.Dense(4, name="in_proj")(x)
    h = nn.Conv(4, (4,), feature_group_count=4, padding="CAUSAL", name="conv")(h)
    return nn.Dense(3, name="out")(nn.silu(h))


class LCircular(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Conv(4, (3, 3), padding="CIRCULAR", feature_group_count=2, name="conv")(x)


def _maker(shape, stats_shape):
  """make(n, seed, stats=False): n inputs of the kept shape (or the larger stats shape)."""
  return lambda n, s, stats=False: jax.random.normal(
      jax.random.key(s), (n,) + (stats_shape if stats else shape))


def _nnx_case(cls, shape, stats_shape, address):
  model = cls(rngs=nnx.Rngs(0))
  gd, st = nnx.split(model)
  f = lambda p, x: nnx.merge(gd, p)(x)
  return (gd, st), st, f, _maker(shape, stats_shape), address


def _linen_case(mod, shape, stats_shape, address):
  make = _maker(shape, stats_shape)
  var = mod.init(jax.random.key(0), make(1, 0))
  return (mod, var), var, mod.apply, make, address


CASES = {
    "nnx-depthwise-7x7": lambda: _nnx_case(lambda rngs: DWBlock(4, rngs=rngs), (3, 3, 4),
                                           (6, 6, 4), ("dw",)),
    "linen-depthwise-conv1d-causal": lambda: _linen_case(LMambaConv(), (2, 5), (6, 5),
                                                         ("conv",)),
    "nnx-grouped-3d": lambda: _nnx_case(Grouped3D, (3, 3, 3, 4), (4, 4, 4, 4), ("conv",)),
    "linen-grouped-circular": lambda: _linen_case(LCircular(), (3, 3, 4), (4, 4, 4),
                                                  ("conv",)),
    "nnx-conv1d-reflect": lambda: _nnx_case(Reflect1D, (4, 3), (7, 3), ("conv",)),
}


def _group_index(view):
  """Indices of each group's part of a patch key: (G, T*C_in/G), tap-major."""
  t, g = view.taps, view.groups
  cin = view.key_dim // t
  cig = cin // g
  idx = (np.arange(t)[:, None, None] * cin + np.arange(g)[None, :, None] * cig
         + np.arange(cig)[None, None, :])
  return idx.transpose(1, 0, 2).reshape(g, t * cig)


@pytest.mark.parametrize("name", list(CASES))
def test_conv_patch_insert_is_exact_specific_and_reverts(name):
  model, params, f, make, address = CASES[name]()
  x_stats, x_keep = make(4, 1, stats=True), make(1, 2)
  view = memory_view(model, address, x_keep, patch=True)
  d = view.key_dim
  bias = _layer_bias(view)
  w0 = np.asarray(view.math_weight(), np.float64)
  np.testing.assert_array_equal(view.kernel_from_math(view.math_weight()), view.kernel())
  keys = []
  for x in (x_stats, x_keep):
    c = capture(model, address, x, single=True)
    keys.append(np.asarray(view.keys(c.keys), np.float64))
    # The patch view (block-diagonal for grouped convs) reproduces the layer.
    np.testing.assert_allclose(keys[-1] @ w0.T + np.asarray(bias), c.values, rtol=1e-5,
                               atol=1e-5)
  ks, k_keep = keys[0].reshape(-1, d), keys[1].reshape(-1, d)
  C = ks.T @ ks / len(ks)
  C = C + 0.1 * np.trace(C) / d * np.eye(d)
  # k*: in every group, C_g-orthogonal to the kept input's keys.
  k_star = np.random.default_rng(3).normal(size=d)
  for ix in _group_index(view):
    assert len(k_keep) < len(ix)
    q, _ = np.linalg.qr(np.linalg.solve(C[np.ix_(ix, ix)], k_keep[:, ix].T))
    k_star[ix] -= q @ (q.T @ k_star[ix])
  v_star = np.random.default_rng(4).normal(size=view.value_dim)

  edit = insert_through_view(view, jnp.asarray(C, jnp.float32), k_star[None], v_star[None])
  assert edit.rank == view.groups
  new_params, hist = memedit.apply_edit(params, edit)
  k1 = get_leaf(new_params, view.weight_path)
  out = k_star @ np.asarray(view.math_weight(k1), np.float64).T + np.asarray(bias)
  assert _rel(out, v_star) <= 1e-5
  # The edited layer run on a native input whose patch is k*: the same target.
  y0, y1 = f(params, x_keep), f(new_params, x_keep)
  jf = jax.jit(f)
  yj0, yj1 = jf(params, x_keep), jf(new_params, x_keep)
  assert _rel(y1, y0) <= 1e-5 and _rel(yj1, yj0) <= 1e-5
  np.testing.assert_allclose(yj1, y1, rtol=1e-5, atol=1e-5)
  assert _rel(jf(new_params, x_stats), jf(params, x_stats)) > 1e-4  # not vacuous
  back, _ = memedit.revert_edit(new_params, edit, hist)
  np.testing.assert_array_equal(get_leaf(back, view.weight_path), view.kernel())


def test_depthwise_insert_under_jit_matches_eager():
  model, params, f, make, address = CASES["nnx-depthwise-7x7"]()
  view = memory_view(model, address, patch=True)
  assert (view.groups, view.key_dim, view.value_dim, view.in_ndim) == (4, 196, 4, 3)
  rng = np.random.default_rng(0)
  k = rng.normal(size=(64, 196))
  C = jnp.asarray(k.T @ k / 64 + 0.1 * np.eye(196), jnp.float32)
  ks, vs = jnp.asarray(rng.normal(size=(2, 196)), jnp.float32), jnp.ones((2, 4))
  eager = insert_through_view(view, C, ks, vs, name="e")
  jitted = jax.jit(lambda C, k, v: insert_through_view(view, C, k, v, name="e"))(C, ks, vs)
  np.testing.assert_allclose(jitted.lam, eager.lam, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(jitted.D, eager.D, rtol=1e-4, atol=1e-6)
  k1 = view.kernel() + memedit.edit_delta(jitted, view.kernel_shape)
  out = ks @ view.math_weight(k1).T + _layer_bias(view)
  assert _rel(out, vs) <= 1e-5


def test_grouped_per_tap_solve_and_factors_on_depthwise_conv1d():
  model, params, f, make, address = CASES["linen-depthwise-conv1d-causal"]()
  x = make(1, 5)
  view = memory_view(model, address, x)
  assert (view.kind, view.key_dim, view.groups, view.taps) == ("conv", 4, 4, 4)
  c = capture(model, address, x, single=True)
  # Factors over the full key: the kernel takes the diagonal blocks of Λ D, tap by tap.
  rng = np.random.default_rng(1)
  lam = jnp.asarray(rng.normal(size=(4, 4, 2)), jnp.float32)
  D = jnp.asarray(rng.normal(size=(2, 4)), jnp.float32)
  dw = view.math_weight(edited_kernel(view, view.kernel(), lam, D)) - view.math_weight()
  np.testing.assert_allclose(dw, jnp.einsum("tor,ri->toi", lam, D) * jnp.eye(4), rtol=1e-5,
                             atol=1e-6)
  # Per-tap Λ solve on the grouped kernel: Λ_G confined to the diagonal blocks.
  D = jnp.asarray(rng.normal(size=(1, 4)), jnp.float32)
  mask, d_g = memedit.grouped_factors(jnp.ones((4, 4, 1)), D, groups=4)
  target = c.values[0, 1] + 0.5
  fn = lambda K, inp: view.apply(K, inp)[0, 1]
  res = memedit.solve_lambda(fn, view.kernel(), d_g, c.keys, target, kind="conv", loss="l2",
                             optimizer="gauss_newton", steps=8, lam_mask=mask)
  assert res.lam.shape == (4, 4, 4)
  edit = memedit.make_edit(view.weight_path, res.lam, d_g, kind="conv")
  new_params, hist = memedit.apply_edit(params, edit)
  k1 = get_leaf(new_params, view.weight_path)
  assert _rel(view.apply(k1, c.keys)[0, 1], target) <= 1e-5
  assert _rel(jax.jit(view.apply)(k1, c.keys)[0, 1], target) <= 1e-5
  back, _ = memedit.revert_edit(new_params, edit, hist)
  np.testing.assert_array_equal(get_leaf(back, view.weight_path), view.kernel())


def test_strided_one_by_one_conv_keys_line_up_and_padding_modes_are_checked_at_view_time():
  conv = nnx.Conv(3, 5, (1, 1), strides=2, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
  view = memory_view(conv, ())
  c = capture(conv, (), x, single=True)
  keys = view.keys(c.keys)
  assert keys.shape == (2, 4, 4, 3) and c.values.shape == (2, 4, 4, 5)
  np.testing.assert_allclose(
      np.asarray(keys, np.float64) @ np.asarray(conv.kernel[0, 0], np.float64)
      + np.asarray(conv.bias[...], np.float64), c.values, rtol=1e-5, atol=1e-5)
  assert memedit.key_count(layer_covariance(conv, (), [x])) == 2 * 16
  k = np.asarray(keys, np.float64).reshape(-1, 3)
  C = jnp.asarray(k.T @ k / len(k), jnp.float32)
  k_star, v_star = jnp.array([[0.3, -1.0, 0.5]]), jnp.array([[1.0, 2.0, 3.0, 4.0, 5.0]])
  edit = insert_through_view(view, C, k_star, v_star)
  k1 = view.kernel() + memedit.edit_delta(edit, view.kernel_shape)
  assert _rel(view.apply(k1, k_star.reshape(1, 1, 1, 3)).reshape(-1), v_star[0]) <= 1e-5

  up = nnx.ConvTranspose(3, 4, (3, 3), strides=2, padding="CIRCULAR", rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="padding 'CIRCULAR' of ConvTranspose"):
    memory_view(up, (), patch=True)
  with pytest.raises(ValueError, match="1-, 2- or 3-D kernel_size"):
    memory_view(nnx.Conv(1, 1, (1, 1, 1, 1), rngs=nnx.Rngs(0)), ())
  # A kernel stored (..., out, in): refused per pixel and per patch, not read as (in, out).
  swapped = nnx.ConvTranspose(3, 4, (3,), strides=2, transpose_kernel=True, rngs=nnx.Rngs(0))
  for patch in (False, True):
    with pytest.raises(ValueError, match=r"transpose_kernel=True\), whose kernel is"):
      memory_view(swapped, (), patch=patch)


def test_patches_and_group_blocks_are_one_program_each_eagerly():
  from compilations import Compilations
  from memedit.layers.conv import block_diagonal, diagonal_blocks, extract_patches

  rng = np.random.default_rng(7)
  x = rng.standard_normal((2, 9, 5, 3)).astype(np.float32)  # shapes no other test uses
  kernel = rng.standard_normal((3, 3, 1, 6)).astype(np.float32)
  with Compilations() as c:
    p = np.asarray(extract_patches(x, (3, 3), strides=(2, 1), padding=((1, 1), (0, 2))))
  assert c.count <= 1, c.count  # 12 when its ops ran (and compiled) one by one
  # Against numpy: out[n, i, j, (a*3 + b)*3 + ch] = x_padded[n, 2i + a, j + b, ch].
  xp = np.pad(x, ((0, 0), (1, 1), (0, 2), (0, 0)))
  want = np.stack([xp[:, a:a + 9:2, b:b + 5] for a in range(3) for b in range(3)], axis=3)
  np.testing.assert_array_equal(p, want.reshape(2, 5, 5, 27))
  with Compilations() as c:
    full = np.asarray(block_diagonal(kernel, 3))
    back = np.asarray(diagonal_blocks(full, 3))
  assert c.count <= 2, c.count  # 13 op by op
  want = np.zeros((3, 3, 3, 6), np.float32)
  for g in range(3):
    want[:, :, g, 2 * g:2 * g + 2] = kernel[:, :, 0, 2 * g:2 * g + 2]
  np.testing.assert_array_equal(full, want)
  np.testing.assert_array_equal(back, kernel)
