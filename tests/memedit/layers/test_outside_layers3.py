"""Flax models as users write them, through the layer workflow (capture, memory_view,
layer_covariance, insert_through_view, apply / revert, edited_forward): keyword inputs
(train flags, masks, an ``nnx.Rngs`` for dropout), two inputs and dict outputs, attention
projections with several axes, a tied embedding read by ``attend`` and one layer applied
twice; numbers against float64 numpy, the caller's model and objects untouched."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import memedit
from memedit.layers import (capture, edited_forward, insert_through_view, layer_covariance,
                            memory_view)

RNG = np.random.default_rng(0)


def _c64(keys, key_dim):
  k = np.asarray(keys, np.float64).reshape(-1, key_dim)
  return k.T @ k / len(k)


def _snapshot(model):
  """Every array of an NNX model's state, PRNG keys as their data, copied."""
  data = lambda a: jax.random.key_data(a) if jnp.issubdtype(a.dtype, jax.dtypes.prng_key) else a
  return jax.tree_util.tree_map(lambda a: np.array(data(a)), nnx.state(model))


def _assert_same(a, b):
  jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)


def _insert_revert(model, view, C, keys, targets, x, **kw):
  """Inserts ``keys -> targets``; returns the edited NNX model after checking the layer's
  outputs at the keys, edited_forward against it and a bit-exact revert."""
  edit = insert_through_view(view, C, keys, targets)
  gd, state = nnx.split(model)
  state1, history = memedit.apply_edit(state, edit)
  edited = nnx.merge(gd, state1)
  native = view.native_keys(keys) if keys.shape[-1:] == (view.key_dim,) else keys
  got = view.apply(view.read_kernel(state1), native).reshape(targets.shape)
  np.testing.assert_allclose(got, targets, rtol=0, atol=1e-5)
  out = edited_forward(model, view, edit.lam, edit.D, *x, **kw)
  _assert_same(jax.tree_util.tree_map(np.asarray, out), edited(*x, **kw))
  state2, _ = memedit.revert_edit(state1, edit, history)
  _assert_same(nnx.state(state2, nnx.Param), nnx.state(model, nnx.Param))
  return edited


# ------------------------------------- keyword inputs, two inputs, dict and tuple outputs


class _Conditioned(nnx.Module):
  """Two inputs (x, condition), BatchNorm and Dropout switched by a train keyword, a mask
  keyword, a dict output holding a tuple."""

  def __init__(self, *, rngs):
    self.fc1 = nnx.Linear(4, 5, rngs=rngs)
    self.cond = nnx.Linear(2, 5, rngs=rngs)
    self.bn = nnx.BatchNorm(5, rngs=rngs)
    self.drop = nnx.Dropout(0.5, rngs=rngs)
    self.fc2 = nnx.Linear(5, 3, rngs=rngs)

  def __call__(self, x, c, *, train=False, mask=None):
    h = self.bn(self.fc1(x) + self.cond(c), use_running_average=not train)
    h = self.drop(jnp.tanh(h), deterministic=not train)
    if mask is not None:
      h = h * mask
    y = self.fc2(h)
    return {"y": y, "aux": (h, y.sum())}


def _conditioned_keys(m, x, c, mask):
  p = lambda v: np.asarray(v[...], np.float64)
  h = (np.asarray(x, np.float64) @ p(m.fc1.kernel) + p(m.fc1.bias)
       + np.asarray(c, np.float64) @ p(m.cond.kernel) + p(m.cond.bias))
  h = (h - p(m.bn.mean)) / np.sqrt(p(m.bn.var) + m.bn.epsilon) * p(m.bn.scale) + p(m.bn.bias)
  return np.tanh(h) * np.asarray(mask)


def test_nnx_model_with_keyword_flags_two_inputs_and_a_dict_output():
  model = _Conditioned(rngs=nnx.Rngs(0))
  model.bn.mean[...] = jnp.full((5,), 0.2)  # running statistics away from their init
  model.bn.var[...] = jnp.full((5,), 1.5)
  before = _snapshot(model)
  xs = [jnp.asarray(RNG.normal(size=(6, 4)), jnp.float32) for _ in range(2)]
  cs = [jnp.asarray(RNG.normal(size=(6, 2)), jnp.float32) for _ in range(2)]
  mask = jnp.asarray(RNG.integers(0, 2, size=(6, 5)), jnp.float32)
  kw = {"train": False, "mask": mask}
  view = memory_view(model, "fc2", xs[0], cs[0], **kw)
  assert (view.key_dim, view.value_dim) == (5, 3)
  keys = capture(model, "fc2", xs[0], cs[0], single=True, **kw).keys
  ref = [_conditioned_keys(model, x, c, mask) for x, c in zip(xs, cs)]
  np.testing.assert_allclose(keys, ref[0], rtol=0, atol=1e-5)
  C = memedit.second_moment(layer_covariance(model, view, list(zip(xs, cs)), call_kwargs=kw))
  np.testing.assert_allclose(C, _c64(np.concatenate(ref), 5), rtol=0, atol=1e-6)
  targets = jnp.asarray(RNG.normal(size=(2, 3)), jnp.float32)
  edited = _insert_revert(model, view, C, keys[:2], targets, (xs[0], cs[0]), **kw)
  np.testing.assert_allclose(edited(xs[0], cs[0], **kw)["y"][:2], targets, rtol=0, atol=1e-5)
  _assert_same(before, _snapshot(model))


# --------------------------------------------------------- an nnx.Rngs as a call keyword


class _Noisy(nnx.Module):
  """Dropout drawing from the Rngs its caller passes (``model(x, rngs=rngs)``)."""

  def __init__(self, *, rngs):
    self.fc = nnx.Linear(3, 8, rngs=rngs)
    self.drop = nnx.Dropout(0.5)
    self.out = nnx.Linear(8, 2, rngs=rngs)

  def __call__(self, x, rngs=None):
    return self.out(self.drop(self.fc(x), deterministic=rngs is None, rngs=rngs))


def test_an_rngs_call_keyword_reaches_statistics_and_the_callers_rngs_stay_as_they_were():
  model = _Noisy(rngs=nnx.Rngs(0))
  batches = [jnp.asarray(RNG.normal(size=(4, 3)), jnp.float32) for _ in range(2)]
  rngs = nnx.Rngs(dropout=5)
  view = memory_view(model, "out", batches[0], rngs=rngs)
  # Before, the fold's trace could not advance an Rngs made outside it: Flax raised
  # TraceContextError ("Cannot mutate RngCount from a different trace level").
  st = layer_covariance(model, view, batches, call_kwargs={"rngs": rngs})
  keys = [np.asarray(capture(model, "out", b, rngs=rngs, single=True).keys) for b in batches]
  assert 0 < np.mean(np.concatenate(keys) == 0) < 1  # dropout ran
  for b, k in zip(batches, keys):  # each run draws from the caller's Rngs as it stands
    h = (np.asarray(b, np.float64) @ np.asarray(model.fc.kernel[...], np.float64)
         + np.asarray(model.fc.bias[...], np.float64))
    np.testing.assert_allclose(k, np.where(k == 0, 0, 2 * h), rtol=0, atol=1e-5)
  assert memedit.key_count(st) == 8
  np.testing.assert_allclose(memedit.second_moment(st), _c64(np.concatenate(keys), 8),
                             rtol=0, atol=1e-6)
  assert int(rngs.dropout.count[...]) == 0
  C = memedit.second_moment(layer_covariance(model, view, batches))  # deterministic
  targets = jnp.asarray(RNG.normal(size=(2, 2)), jnp.float32)
  _insert_revert(model, view, C, jnp.asarray(keys[0][:2]), targets, (batches[0],))


# ---------------------------------------------- attention projections with several axes


class _Projections(nnx.Module):
  """nnx.MultiHeadAttention (LinearGeneral projections to and from (heads, head_dim)), a
  LinearGeneral contracting non-trailing axes and an Einsum contracting two axes."""

  def __init__(self, *, rngs):
    self.att = nnx.MultiHeadAttention(num_heads=2, in_features=8, qkv_features=6,
                                      decode=False, rngs=rngs)
    self.mix = nnx.LinearGeneral((2, 3), 4, axis=(1, 2), rngs=rngs)  # (B, 2, 3, d) -> (B, d, 4)
    self.head = nnx.Einsum("bhk,hko->bo", (2, 4, 3), (3,), rngs=rngs)

  def __call__(self, x):
    y = self.att(x)  # (B, 6, 8)
    z = jnp.tanh(self.mix(y.reshape(-1, 2, 3, 8)))  # (B, 8, 4)
    return self.head(z.reshape(-1, 2, 4, 4).sum(-1))  # (B, 2, 4) -> (B, 3)


@pytest.mark.parametrize("address,key_dim,value_dim", [("att/out", 6, 8), ("mix", 6, 4),
                                                       ("head", 8, 3)])
def test_projections_contracting_several_axes_are_exact_memories(address, key_dim, value_dim):
  model = _Projections(rngs=nnx.Rngs(1))
  batches = [jnp.asarray(RNG.normal(size=(5, 6, 8)), jnp.float32) for _ in range(2)]
  view = memory_view(model, address, batches[0])
  assert (view.key_dim, view.value_dim) == (key_dim, value_dim)
  caps = [capture(model, address, b, single=True) for b in batches]
  flat = [np.asarray(view.keys(c.keys), np.float64).reshape(-1, key_dim) for c in caps]
  kernel = np.asarray(view.read_kernel(nnx.state(model)), np.float64).reshape(key_dim, -1)
  bias = np.asarray(getattr(view.layer_module, "bias")[...], np.float64).reshape(-1)
  np.testing.assert_allclose(np.asarray(caps[0].values).reshape(-1, value_dim),
                             flat[0] @ kernel + bias, rtol=0, atol=1e-5)
  C = memedit.second_moment(layer_covariance(model, view, batches))
  np.testing.assert_allclose(C, _c64(np.concatenate(flat), key_dim), rtol=0, atol=1e-6)
  targets = jnp.asarray(RNG.normal(size=(2, value_dim)), jnp.float32)
  _insert_revert(model, view, C, jnp.asarray(flat[0][:2], jnp.float32), targets,
                 (batches[0],))


# ------------------------------------------------ a tied embedding read back by attend


class _TiedLM(nnx.Module):
  def __init__(self, *, rngs):
    self.emb = nnx.Embed(11, 6, rngs=rngs)
    self.mid = nnx.Linear(6, 6, rngs=rngs)

  def __call__(self, tokens):
    return self.emb.attend(jnp.tanh(self.mid(self.emb(tokens))))


class _AttendOnly(nnx.Module):
  def __init__(self, *, rngs):
    self.emb = nnx.Embed(11, 6, rngs=rngs)

  def __call__(self, h):
    return self.emb.attend(h)


def test_tied_embedding_rows_are_rewritten_for_both_its_call_and_attend():
  model = _TiedLM(rngs=nnx.Rngs(2))
  tokens = [jnp.asarray(RNG.integers(0, 11, size=(3, 4)), jnp.int32) for _ in range(2)]
  view = memory_view(model, "emb", tokens[0])
  cap = capture(model, "emb", tokens[0])
  assert cap.calls == 1  # attend is not the layer's __call__: only the lookup is a key
  np.testing.assert_array_equal(cap.keys, tokens[0])
  C = memedit.second_moment(layer_covariance(model, view, tokens))
  counts = np.bincount(np.concatenate([np.ravel(t) for t in tokens]), minlength=11) / 24
  np.testing.assert_allclose(np.diag(C), counts, rtol=0, atol=1e-7)
  ids = jnp.asarray([3, 5])
  targets = jnp.asarray(RNG.normal(size=(2, 6)), jnp.float32)
  edited = _insert_revert(model, view, jnp.diag(jnp.diag(C)), ids, targets, (tokens[0],))
  table0 = np.asarray(model.emb.embedding[...])
  table1 = np.asarray(edited.emb.embedding[...])
  np.testing.assert_allclose(table1[[3, 5]], targets, rtol=0, atol=1e-6)
  np.testing.assert_array_equal(np.delete(table1, [3, 5], 0), np.delete(table0, [3, 5], 0))
  h = jnp.asarray(RNG.normal(size=(2, 6)), jnp.float32)  # the tied output sees the rows
  np.testing.assert_allclose(edited.emb.attend(h), np.asarray(h, np.float64) @ table1.T,
                             rtol=0, atol=1e-5)


def test_an_embedding_used_only_through_attend_is_named_as_giving_no_keys():
  model = _AttendOnly(rngs=nnx.Rngs(3))
  with pytest.raises(ValueError, match=r"called 0 times.*__call__.*Embed\.attend"):
    capture(model, "emb", jnp.ones((2, 6)))


# ------------------------------------------------------------ one layer applied twice


class _Aliased(nnx.Module):
  """One Linear held under two names, applied twice."""

  def __init__(self, *, rngs):
    shared = nnx.Linear(4, 4, rngs=rngs)
    self.enc, self.dec = shared, shared
    self.out = nnx.Linear(4, 2, rngs=rngs)

  def __call__(self, x):
    return self.out(jnp.tanh(self.dec(jnp.tanh(self.enc(x)))))


class _LChild(nn.Module):
  shared: nn.Module

  @nn.compact
  def __call__(self, x):
    return jnp.tanh(self.shared(x))


class _LShared(nn.Module):
  """One Dense handed to two children (setup style), a dict of heads."""

  def setup(self):
    self.dense = nn.Dense(4)
    self.first, self.second = _LChild(self.dense), _LChild(self.dense)
    self.heads = {"a": nn.Dense(2), "b": nn.Dense(2)}

  def __call__(self, x):
    h = self.second(self.first(x))
    return self.heads["a"](h) + self.heads["b"](-h)


@pytest.mark.parametrize("framework", ["nnx", "linen"])
def test_a_layer_applied_twice_pools_both_calls_and_an_insert_at_both_is_exact(framework):
  batches = [jnp.asarray(RNG.normal(size=(3, 4)), jnp.float32) for _ in range(2)]
  if framework == "nnx":
    model = _Aliased(rngs=nnx.Rngs(4))
    params, address = nnx.state(model), "dec"
    rebuild = lambda p: nnx.merge(nnx.graphdef(model), p)
  else:
    lm = _LShared()
    params, address = lm.init(jax.random.key(4), batches[0]), "dense"
    model, rebuild = (lm, params), lambda p: (lm, p)
  view = memory_view(model, address, batches[0])
  cap = capture(model, address, batches[0])
  assert cap.calls == 2 and cap.keys.shape == (2, 3, 4)
  kernel = np.asarray(view.read_kernel(params), np.float64)
  np.testing.assert_allclose(cap.keys[1], np.tanh(cap.values[0]), rtol=0, atol=1e-6)
  np.testing.assert_allclose(cap.values[0], np.asarray(batches[0], np.float64) @ kernel
                             + np.asarray(view.layer_module.bias[...] if framework == "nnx"
                                          else params["params"]["dense"]["bias"]),
                             rtol=0, atol=1e-5)
  st = layer_covariance(model, view, batches)
  keys = np.concatenate([capture(model, address, b).keys.reshape(-1, 4) for b in batches])
  assert memedit.key_count(st) == len(keys) == 12
  C = memedit.second_moment(st)
  np.testing.assert_allclose(C, _c64(keys, 4), rtol=0, atol=1e-6)
  # The keys of both calls, (calls, B, 4) as capture gives them, each with its value.
  k, targets = cap.keys[:, :1], jnp.asarray(RNG.normal(size=(2, 1, 4)), jnp.float32)
  edit = insert_through_view(view, C, k, targets)
  params1, history = memedit.apply_edit(params, edit)
  np.testing.assert_allclose(view.apply(view.read_kernel(params1), k), targets, rtol=0,
                             atol=1e-5)
  rerun = capture(rebuild(params1), address, batches[0])  # the first call reads x itself
  np.testing.assert_allclose(rerun.values[0, :1], targets[0], rtol=0, atol=1e-5)
  restored, _ = memedit.revert_edit(params1, edit, history)
  _assert_same(restored, params)
