"""insert_through_view on keys with positions: a sequence's (B, L, d) as `capture` gives
them, and a patch view's (N, H, W, key_dim); each position is a key with its own value."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import memedit


class Attention(nnx.Module):
  def __init__(self):
    self.att = nnx.MultiHeadAttention(num_heads=2, in_features=8, qkv_features=8,
                                      decode=False, rngs=nnx.Rngs(0))

  def __call__(self, x):
    return self.att(x)


class Dilated(nnx.Module):
  def __init__(self):
    self.c = nnx.Conv(3, 4, (3, 3), kernel_dilation=2, strides=2, rngs=nnx.Rngs(0))

  def __call__(self, x):
    return self.c(x)


def _delta(edit, kernel):
  return np.asarray(memedit.edit_delta(edit, kernel.shape), np.float64)


def _closed_form(W, C, K, V):
  """float64 ΔW (math layout, (out, in)) of the exact insert: W1 K = V, ΔW = Λ (C⁻¹K)ᵀ."""
  W, C, K, V = (np.asarray(a, np.float64) for a in (W, C, K, V))
  D = np.linalg.solve(C, K.T)                      # (in, n)
  lam = (V - K @ W.T).T @ np.linalg.inv(K @ D)     # (out, n)
  return lam @ D.T


@pytest.fixture(scope="module")
def attention():
  model = Attention()
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(64, 5, 8)), jnp.float32)
  return model, x


@pytest.mark.parametrize("name", ["query", "out"])
def test_sequence_keys_are_one_key_per_position(attention, name):
  model, x = attention
  view = memedit.memory_view(model, ("att", name))
  C = memedit.second_moment(memedit.layer_covariance(model, view, [x]))
  cap = memedit.capture(model, view, x[:1], single=True)      # keys (1, 5, ...)
  targets = jnp.asarray(np.random.default_rng(1).normal(size=cap.values.shape), jnp.float32)
  edit = memedit.insert_through_view(view, C, cap.keys, targets)

  flat_keys = np.asarray(view.keys(cap.keys)).reshape(5, view.key_dim)
  flat = memedit.insert_through_view(view, C, flat_keys, targets.reshape(5, -1))
  kernel = view.kernel()
  np.testing.assert_allclose(_delta(edit, kernel), _delta(flat, kernel), atol=1e-6)

  W = np.asarray(view.math_weight(kernel)).reshape(view.value_dim, view.key_dim)
  bias = np.asarray(cap.values).reshape(5, -1) - flat_keys @ W.T
  want = _closed_form(W, C, flat_keys, np.asarray(targets).reshape(5, -1) - bias)
  got = np.asarray(view.math_weight(jnp.asarray(_delta(edit, kernel), jnp.float32)))
  np.testing.assert_allclose(got.reshape(want.shape), want, atol=2e-4 * np.abs(want).max())

  state, _ = memedit.apply_edit(nnx.state(model), edit)
  edited = nnx.merge(nnx.graphdef(model), state)
  out = memedit.capture(edited, view, x[:1], single=True).values
  np.testing.assert_allclose(np.asarray(out), np.asarray(targets), atol=1e-4)


def test_sequence_values_must_match_the_key_positions(attention):
  model, x = attention
  view = memedit.memory_view(model, ("att", "query"))
  keys = x[:1]                                             # (1, 5, 8): five keys
  with pytest.raises(ValueError, match=r"values: expected one value per key position, "
                                       r"leading shape \(1, 5\).*got shape \(1, 4, 2, 4\)"):
    memedit.insert_through_view(view, jnp.eye(8), keys, jnp.zeros((1, 4, 2, 4)))
  with pytest.raises(ValueError, match=r"keys: expected flat keys \(1, 8\) or the layer's "
                                       r"native inputs, got shape \(1, 5, 7\)"):
    memedit.insert_through_view(view, jnp.eye(8), jnp.zeros((1, 5, 7)), jnp.zeros((1, 5, 8)))


def test_patch_keys_with_pixel_axes_are_one_key_per_pixel():
  model = Dilated()
  x = jnp.asarray(np.random.default_rng(2).normal(size=(8, 9, 9, 3)), jnp.float32)
  view = memedit.memory_view(model, ("c",), patch=True)
  assert view.key_dim == 27
  C = memedit.second_moment(memedit.layer_covariance(model, view, [x]))
  patches = view.keys(x[:1])                               # (1, 5, 5, 27): 25 keys
  targets = jnp.zeros(patches.shape[:-1] + (4,))
  edit = memedit.insert_through_view(view, C, patches, targets)
  flat = memedit.insert_through_view(view, C, patches.reshape(25, 27), targets.reshape(25, 4))
  kernel = view.kernel()
  np.testing.assert_allclose(_delta(edit, kernel), _delta(flat, kernel), atol=1e-6)

  state, _ = memedit.apply_edit(nnx.state(model), edit)
  out = nnx.merge(nnx.graphdef(model), state)(x[:1])
  assert float(jnp.abs(out).max()) < 1e-4

  with pytest.raises(ValueError, match=r"keys: expected patch keys with last dimension 27 "
                                       r"\(view.keys\(x\).*got shape \(1, 9, 9, 3\)"):
    memedit.insert_through_view(view, C, x[:1], jnp.zeros((1, 5, 5, 4)))
  with pytest.raises(ValueError, match=r"values: expected one value per key, leading shape "
                                       r"\(1, 5, 5\), got shape \(1, 5, 4, 4\)"):
    memedit.insert_through_view(view, C, patches, jnp.zeros((1, 5, 4, 4)))
