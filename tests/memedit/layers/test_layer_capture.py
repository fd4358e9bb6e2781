"""Capturing keys and values of layers in models that were not prepared for it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
import flax.linen as nn

import memedit
import models
from memedit.layers import capture, layer_covariance, memory_view, register_layer_kind

X = jax.random.normal(jax.random.key(3), (2, 6))


def _fc1_reference(m, x):
  """Keys and values of blocks[1].fc1 computed by hand from the module's parameters."""
  h = nnx.relu(m.inp(x))
  h = m.blocks[0](h)
  return h, m.blocks[1].fc1(h)


@pytest.mark.parametrize("jit", [True, False])
def test_nnx_capture_eager_and_jit_match_hand_computation(jit):
  m = models.build(models.MLP, 0)
  c = capture(m, ("blocks", 1, "fc1"), X, single=True, jit=jit)
  k, v = _fc1_reference(m, X)
  assert c.calls == 1 and c.keys.shape == (2, 16) and c.values.shape == (2, 32)
  np.testing.assert_allclose(c.keys, k, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(c.values, v, rtol=1e-6, atol=1e-6)
  # Selector and string addresses name the same layer.
  c2 = capture(m, lambda mm: mm.blocks[1].fc1, X)
  c3 = capture(nnx.split(m), "blocks/1/fc1", X)
  np.testing.assert_array_equal(c2.keys, c.keys)
  np.testing.assert_array_equal(c3.values, c.values)


def test_capture_accepts_a_memory_view_as_the_address():
  m = models.build(models.MLP, 0)
  c = capture(m, memory_view(m, ("blocks", 1, "fc1")), X, single=True)
  k, v = _fc1_reference(m, X)
  np.testing.assert_allclose(c.keys, k, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(c.values, v, rtol=1e-6, atol=1e-6)
  lm = models.LMLP()
  lv = models.linen_init(lm, X)
  view = memory_view((lm, lv), ("LBlock_1", "fc1"), X)
  c = capture((lm, lv), view, X, single=True)
  ref = capture((lm, lv), ("LBlock_1", "fc1"), X, single=True)
  np.testing.assert_array_equal(c.keys, ref.keys)
  np.testing.assert_array_equal(c.values, ref.values)


def test_nnx_capture_under_remat_and_scan():
  m = models.build(models.MLP, 0, remat=True)
  c = capture(m, ("blocks", 1, "fc1"), X, single=True)
  k, v = _fc1_reference(m, X)
  np.testing.assert_allclose(c.values, v, rtol=1e-6, atol=1e-6)

  s = models.build(models.ScanMLP, 1)
  c = capture(s, ("blocks", "fc1"), X)
  assert c.calls == 1 and c.keys.shape == (3, 2, 16) and c.values.shape == (3, 2, 32)
  # Step i of the scan is block i: its fc1 applied to its key gives its value.
  kern = s.blocks.fc1.kernel[...]
  bias = s.blocks.fc1.bias[...]
  for i in range(3):
    np.testing.assert_allclose(c.values[i], c.keys[i] @ kern[i] + bias[i], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(c.keys[0], nnx.relu(s.inp(X)), rtol=1e-6, atol=1e-6)
  assert memory_view(s, ("blocks", "fc1")).stacked == 1


def test_shared_module_calls_are_stacked_and_single_call_is_enforced():
  m = models.build(models.MLP, 0)
  c = capture(m, ("alias",), X)
  assert c.calls == 2 and c.keys.shape == (2, 2, 16)
  np.testing.assert_allclose(c.keys[1], jnp.tanh(c.values[0]), rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match="expected exactly one call.*2 times"):
    capture(m, ("shared",), X, single=True)
  with pytest.raises(ValueError, match="called 0 times"):
    capture(m, ("head",), X, method="features")


def test_wrong_address_lists_valid_paths_near_it():
  m = models.build(models.MLP, 0)
  with pytest.raises(ValueError, match=r"no layer at \('blocks', 1, 'fc3'\).*'blocks/1/fc1'"):
    capture(m, ("blocks", 1, "fc3"), X)
  with pytest.raises(ValueError, match="blocks/1/fc1"):
    memory_view(m, "blockz/1/fc1")
  lm = models.LMLP()
  lv = models.linen_init(lm, X)
  with pytest.raises(ValueError, match="LBlock_1/fc1"):
    capture((lm, lv), ("LBlock_1", "fc3"), X)
  with pytest.raises(ValueError, match="tuple of module names"):
    capture((lm, lv), lambda mm: mm.head, X)


def test_unsupported_layer_kind_says_how_to_register():
  m = models.build(models.Styled, 0)
  with pytest.raises(ValueError, match="register_layer_kind\\(StyleMemory, weight="):
    memory_view(m, ("memory",))
  with pytest.raises(ValueError, match="not a registered memory layer"):
    memory_view(models.build(models.Transformer, 0), ("ln1",))


def test_custom_layer_with_extra_call_argument():
  register_layer_kind(models.StyleMemory, weight="w", kind="dense", in_ndim=1)
  m = models.build(models.Styled, 0)
  s = jax.random.normal(jax.random.key(4), (2, 3))
  c = capture(m, ("memory",), X, s, single=True)
  style = 1.0 + m.style(s)
  np.testing.assert_allclose(c.extra_args[0], style, rtol=1e-6, atol=1e-6)
  view = memory_view(m, ("memory",))
  assert view.weight_path == ("memory", "w") and view.key_dim == 16
  np.testing.assert_allclose(view.apply(view.kernel(), c.keys, *c.extra_args), c.values,
                             rtol=1e-6, atol=1e-6)


def test_linen_capture_nested_remat_and_scan():
  lm = models.LMLP()
  lv = models.linen_init(lm, X)
  c = capture((lm, lv), ("LBlock_1", "fc1"), X, single=True, jit=False)
  p = lv["params"]["LBlock_1"]["fc1"]
  np.testing.assert_allclose(c.values, c.keys @ p["kernel"] + p["bias"], rtol=1e-5, atol=1e-6)

  rm = models.LRematMLP()
  rv = models.linen_init(rm, X)
  c = capture((rm, rv), ("blk", "fc2"), X, single=True)
  p = rv["params"]["blk"]["fc2"]
  np.testing.assert_allclose(c.values, c.keys @ p["kernel"] + p["bias"], rtol=1e-5, atol=1e-6)

  sm = models.LScanMLP()
  sv = models.linen_init(sm, X)
  c = capture((sm, sv), ("stack", "blk", "fc1"), X)
  p = sv["params"]["stack"]["blk"]["fc1"]
  assert c.keys.shape == (3, 2, 16) and p["kernel"].shape == (3, 16, 32)
  for i in range(3):
    np.testing.assert_allclose(c.values[i], c.keys[i] @ p["kernel"][i] + p["bias"][i],
                               rtol=1e-5, atol=1e-5)
  view = memory_view((sm, sv), ("stack", "blk", "fc1"), X)
  assert view.stacked == 1 and view.weight_path == ("params", "stack", "blk", "fc1", "kernel")

  # A scan that does not carry the 'intermediates' collection drops captures: say so.
  nm = models.LScanMLP(with_intermediates=False)
  with pytest.raises(ValueError, match="'intermediates': 0"):
    capture((nm, sv), ("stack", "blk", "fc1"), X)


def test_flax_shipped_models_rnn_and_attention():
  """Classes we did not write: flax's nnx.RNN(nnx.LSTMCell) (an nnx.scan over time inside
  flax) and nn.MultiHeadDotProductAttention."""
  rnn = nnx.RNN(nnx.LSTMCell(5, 7, rngs=nnx.Rngs(0)))
  seq = jax.random.normal(jax.random.key(5), (2, 4, 5))  # (batch, time, features)
  c = capture(rnn, ("cell", "ii"), seq, single=True)
  assert c.keys.shape == (4, 2, 5)  # stacked over the time steps of flax's scan
  np.testing.assert_allclose(c.keys, jnp.swapaxes(seq, 0, 1), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(c.values, c.keys @ rnn.cell.ii.kernel[...], rtol=1e-5, atol=1e-5)
  view = memory_view(rnn, ("cell", "ii"))
  assert view.layer_type is nnx.Linear and view.weight_path == ("cell", "ii", "kernel")
  with pytest.raises(ValueError, match="scan carry"):
    layer_covariance(rnn, view, [seq])

  att = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8)
  toks = jax.random.normal(jax.random.key(6), (2, 5, 8))
  av = models.linen_init(att, toks)
  c = capture((att, av), ("query",), toks, single=True)
  np.testing.assert_array_equal(c.keys, toks)
  assert c.values.shape == (2, 5, 2, 4)
  view = memory_view((att, av), ("out",), toks)
  assert (view.in_ndim, view.key_dim, view.value_dim) == (2, 8, 8)



class _LConfigured(nn.Module):
  """A Linen model with a dict attribute (unhashable, as many configs are)."""
  config: dict

  @nn.compact
  def __call__(self, x):
    return nn.Dense(3, name="out")(jnp.tanh(nn.Dense(self.config["hidden"], name="hid")(x)))


class _LTrainBN(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = True):
    h = nn.BatchNorm(use_running_average=not train, name="bn")(nn.Dense(4, name="inp")(x))
    return nn.Dense(3, name="out")(h)


class _LVmapped(nn.Module):
  @nn.compact
  def __call__(self, x):  # (B, 2, 6): one Dense per slot of axis 1
    dense = nn.vmap(nn.Dense, in_axes=1, out_axes=1, variable_axes={"params": 0},
                    split_rngs={"params": True})
    return dense(3, name="vd")(x)


def test_linen_models_with_dict_attributes_or_batch_stats_in_training_capture():
  m = _LConfigured({"hidden": 5})
  var = m.init(jax.random.key(0), X)
  c = capture((m, var), "out", X, single=True)
  p = var["params"]
  h = jnp.tanh(X @ p["hid"]["kernel"] + p["hid"]["bias"])
  np.testing.assert_allclose(c.keys, h, rtol=1e-6, atol=1e-6)

  # BatchNorm in training mode updates batch_stats: captured, the variables untouched.
  xb = jax.random.normal(jax.random.key(4), (8, 6))
  bm = _LTrainBN()
  bvar = bm.init(jax.random.key(0), xb, train=False)
  before = [np.asarray(a).copy() for a in jax.tree.leaves(bvar)]
  c = capture((bm, bvar), "out", xb, train=True, single=True)
  inp = {k: np.asarray(v, np.float64) for k, v in bvar["params"]["inp"].items()}
  pre = np.asarray(xb, np.float64) @ inp["kernel"] + inp["bias"]
  ref = (pre - pre.mean(0)) / np.sqrt(pre.var(0) + 1e-5)  # batch statistics, scale 1
  np.testing.assert_allclose(c.keys, ref, rtol=1e-4, atol=1e-4)
  st = layer_covariance((bm, bvar), "out", [xb], call_kwargs={"train": True})
  assert memedit.key_count(st) == 8
  np.testing.assert_allclose(memedit.second_moment(st), ref.T @ ref / 8, rtol=1e-4, atol=1e-4)
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(bvar), before))

  # A layer inside nn.vmap without 'intermediates' in variable_axes: the error says so.
  vm = _LVmapped()
  vvar = vm.init(jax.random.key(0), jnp.ones((2, 2, 6)))
  with pytest.raises(ValueError, match=r"nn\.vmap.*'intermediates': 0"):
    capture((vm, vvar), "vd", jnp.ones((2, 2, 6)))
