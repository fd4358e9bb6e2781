"""Flax layers and usages the other layer tests do not bring, checked against numpy."""

from __future__ import annotations

import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import memedit
from memedit.layers import capture, insert_through_view, layer_covariance, memory_view
from memedit.tree import get_leaf


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _np_patches(x, window, strides, pads, lhs_dilation, rhs_dilation):
  """Patches ``(N, *out, T*C)`` (tap-major) of ``x (N, *spatial, C)`` by explicit loops."""
  x = np.asarray(x, np.float64)
  n = len(window)
  dil = tuple((s - 1) * l + 1 for s, l in zip(x.shape[1:1 + n], lhs_dilation))
  xd = np.zeros((x.shape[0],) + dil + x.shape[-1:])
  xd[(slice(None),) + tuple(slice(None, None, l) for l in lhs_dilation)] = x
  xd = np.pad(xd, [(0, 0)] + list(pads) + [(0, 0)])
  span = [(k - 1) * d + 1 for k, d in zip(window, rhs_dilation)]
  out = [(xd.shape[1 + i] - span[i]) // strides[i] + 1 for i in range(n)]
  p = np.zeros((x.shape[0],) + tuple(out) + (int(np.prod(window)) * x.shape[-1],))
  for pos in itertools.product(*map(range, out)):
    taps = [xd[(slice(None),) + tuple(q * s + t * d for q, s, t, d in
                                      zip(pos, strides, tap, rhs_dilation))]
            for tap in itertools.product(*map(range, window))]
    p[(slice(None),) + pos] = np.concatenate(taps, -1)
  return p


class _PerImage(nnx.Module):
  """Runs its conv on one unbatched image (H, W, C), as Flax convs allow."""

  def __init__(self, *, rngs):
    self.conv = nnx.Conv(2, 3, (3, 3), padding="SAME", rngs=rngs)

  def __call__(self, x):
    return jnp.tanh(self.conv(x))


def test_unbatched_conv_inputs_give_patch_keys_statistics_and_exact_inserts():
  model = _PerImage(rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (5, 5, 2))
  conv = model.conv
  view = memory_view(model, "conv", x, patch=True)
  keys = view.keys(x)
  ref = _np_patches(x[None], (3, 3), (1, 1), ((1, 1), (1, 1)), (1, 1), (1, 1))[0]
  assert keys.shape == (5, 5, 18)
  np.testing.assert_allclose(keys, ref, rtol=0, atol=1e-6)
  w = np.asarray(conv.kernel[...], np.float64).reshape(18, 3)
  np.testing.assert_allclose(ref @ w + np.asarray(conv.bias[...]), conv(x), rtol=1e-5,
                             atol=1e-5)
  k = ref.reshape(-1, 18)
  st = layer_covariance(model, "conv", [x], patch=True)
  assert memedit.key_count(st) == 25
  np.testing.assert_allclose(memedit.second_moment(st), k.T @ k / 25, rtol=1e-5, atol=1e-6)
  # A 1x1 conv's per-pixel keys go through the same patches.
  one = nnx.Conv(2, 3, (1, 1), rngs=nnx.Rngs(0))
  st1 = layer_covariance(one, (), [x])
  np.testing.assert_allclose(memedit.second_moment(st1),
                             np.einsum("hwi,hwj->ij", x, x) / 25, rtol=1e-5, atol=1e-6)
  # The edited layer, run on the unbatched image, writes v* at the key's pixel.
  C = k.T @ k / 25 + 0.1 * np.eye(18)
  v_star = np.array([0.5, -1.0, 2.0])
  edit = insert_through_view(view, jnp.asarray(C, jnp.float32), keys[1, 2][None],
                             v_star[None])
  params, hist = memedit.apply_edit(nnx.state(model), edit)
  k1 = get_leaf(params, view.weight_path)
  y1 = view.apply(k1, x)
  assert _rel(y1[1, 2], v_star) <= 1e-5
  d = np.linalg.solve(C, k[7])
  expect = np.asarray(conv(x)).reshape(25, 3) + np.outer(
      k @ d / (k[7] @ d), v_star - np.asarray(conv(x))[1, 2])
  assert _rel(np.asarray(y1).reshape(25, 3), expect) <= 1e-5
  back, _ = memedit.revert_edit(params, edit, hist)
  np.testing.assert_array_equal(get_leaf(back, view.weight_path), conv.kernel[...])


def test_input_and_kernel_dilated_patch_keys_match_numpy():
  x = jax.random.normal(jax.random.key(2), (1, 3, 4, 2))
  layers = [  # (layer, numpy window, strides, pads, lhs dilation, rhs dilation)
      (nnx.Conv(2, 3, (3, 2), input_dilation=(2, 1), strides=(1, 2),
                padding=((1, 1), (2, 0)), rngs=nnx.Rngs(0)),
       (3, 2), (1, 2), ((1, 1), (2, 0)), (2, 1), (1, 1)),
      (nnx.ConvTranspose(2, 3, (2, 2), strides=2, kernel_dilation=2, padding="SAME",
                         rngs=nnx.Rngs(0)),  # as lax.conv_transpose: pads (2, 1)
       (2, 2), (1, 1), ((2, 1), (2, 1)), (2, 2), (2, 2)),
  ]
  for layer, window, strides, pads, lhs, rhs in layers:
    view = memory_view(layer, (), x, patch=True)
    ref = _np_patches(x, window, strides, pads, lhs, rhs)
    np.testing.assert_allclose(view.keys(x), ref, rtol=0, atol=1e-6)
    w = np.asarray(view.math_weight(), np.float64)
    np.testing.assert_allclose(ref @ w.T + np.asarray(layer.bias[...]), layer(x), rtol=1e-5,
                               atol=1e-5)


class _NnxWrapped(nnx.Module):

  def __init__(self, wrapper, *, rngs):
    lin = nnx.Linear(4, 3, rngs=rngs)
    self.norm = wrapper(lin, rngs=rngs)
    self.head = nnx.Linear(3, 2, rngs=rngs)

  def __call__(self, x):
    if isinstance(self.norm, nnx.SpectralNorm):
      return self.head(self.norm(x, update_stats=False))
    return self.head(self.norm(x))


class _LWrapped(nn.Module):
  wrapper: str

  @nn.compact
  def __call__(self, x):
    dense = nn.Dense(3, name="dense")
    if self.wrapper == "spectral":
      h = nn.SpectralNorm(dense, name="norm")(x, update_stats=False)
    else:
      h = nn.WeightNorm(dense, name="norm")(x)
    return nn.Dense(2, name="head")(h)


@pytest.mark.parametrize("wrapper", ["spectral", "weight"])
def test_layers_whose_kernel_a_norm_wrapper_rewrites_are_refused(wrapper):
  x = jax.random.normal(jax.random.key(0), (5, 4))
  name = {"spectral": "SpectralNorm", "weight": "WeightNorm"}[wrapper]
  model = _NnxWrapped(getattr(nnx, name), rngs=nnx.Rngs(0))
  for make in (lambda: memory_view(model, "norm/layer_instance"),
               lambda: memory_view(model, "norm/layer_instance", x),
               lambda: capture(model, "norm/layer_instance", x),
               lambda: layer_covariance(model, "norm/layer_instance", [x])):
    with pytest.raises(ValueError, match=rf"wrapped by nnx\.{name}, which rewrites the kernel"):
      make()
  assert memory_view(model, "head", x).key_dim == 3  # the rest of the model stays editable
  lmod = _LWrapped(wrapper)
  variables = lmod.init(jax.random.key(0), x)
  for make in (lambda: memory_view((lmod, variables), "dense", x),
               lambda: capture((lmod, variables), "dense", x)):
    with pytest.raises(ValueError, match=rf"wrapped by linen\.{name}, which rewrites the kernel"):
      make()
  assert memory_view((lmod, variables), "head", x).key_dim == 3


class _PerExample(nnx.Module):

  def __init__(self, axes, *, rngs):
    self.fc = nnx.Linear(3, 2, rngs=rngs)
    self.axes = axes

  def __call__(self, x):
    return nnx.vmap(lambda m, xi: m(xi), in_axes=(self.axes, 0))(self.fc, x)


def test_layer_under_nnx_vmap_capture_says_how_its_records_come_out():
  x = jax.random.normal(jax.random.key(0), (4, 3))
  with pytest.raises(ValueError, match=r"inside nnx.vmap with its module broadcast.*StateAxes"):
    capture(_PerExample(None, rngs=nnx.Rngs(0)), "fc", x)
  model = _PerExample(nnx.StateAxes({nnx.Intermediate: 0, ...: None}), rngs=nnx.Rngs(0))
  got = capture(model, "fc", x, single=True)
  np.testing.assert_array_equal(got.keys, x)
  np.testing.assert_allclose(got.values, x @ model.fc.kernel[...] + model.fc.bias[...],
                             rtol=1e-6, atol=1e-6)
