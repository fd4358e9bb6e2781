"""One layer of a scanned stack (Linen ``nn.scan``; NNX ``nnx.vmap`` + ``nnx.scan``) as a
memory: its view, its own keys and C, and exact edits that leave the other layers' bits."""

from __future__ import annotations

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import memedit
from memedit.tree import get_leaf
from memedit.layers import (capture, insert_through_view, layer_covariance, memory_view,
                            substitute)
from memedit.layers import stats as _stats

D = 16
LAYERS = 3


# ----------------------------------------------------------------------------- models


class Block(nnx.Module):
  def __init__(self, d, *, rngs):
    self.fc1 = nnx.Linear(d, 2 * d, rngs=rngs)
    self.fc2 = nnx.Linear(2 * d, d, rngs=rngs)

  def __call__(self, x):
    return x + self.fc2(nnx.relu(self.fc1(x)))


class Stack(nnx.Module):
  """Blocks created with nnx.vmap (parameters stacked on axis 0), run with nnx.scan."""

  def __init__(self, *, rngs):
    self.inp = nnx.Linear(6, D, rngs=rngs)

    @nnx.split_rngs(splits=LAYERS)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(rngs):
      return Block(D, rngs=rngs)
    self.stack = make(rngs)
    self.head = nnx.Linear(D, 4, rngs=rngs)

  def __call__(self, x):
    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def step(h, blk):
      return blk(h)
    return self.head(step(nnx.relu(self.inp(x)), self.stack))


class LBlock(nn.Module):
  @nn.compact
  def __call__(self, x, _):
    h = nn.relu(nn.Dense(2 * D, name="fc1")(x))
    return x + nn.Dense(D, name="fc2")(h), None


class LStack(nn.Module):
  """Blocks stacked by nn.scan (MaxText-style), named 'stack'."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(D, name="inp")(x))
    scan = nn.scan(LBlock, variable_axes={"params": 0, "intermediates": 0},
                   split_rngs={"params": True}, length=LAYERS)
    x, _ = scan(name="stack")(x, None)
    return nn.Dense(4, name="head")(x)


X = jax.random.normal(jax.random.key(0), (8, 6))
BATCHES = [jax.random.normal(jax.random.key(10 + i), (16, 6)) for i in range(3)]


def _model(framework):
  """(model, example args for memory_view, leaf path prefix, params, rebuild(params))."""
  if framework == "nnx":
    model = nnx.jit(lambda: Stack(rngs=nnx.Rngs(0)))()
    gd, state = nnx.split(model)
    return model, (), (), state, lambda p: nnx.merge(gd, p)
  lm = LStack()
  variables = jax.jit(lm.init)(jax.random.key(0), X)
  return (lm, variables), (X,), ("params",), variables, lambda p: (lm, p)


def _numpy_c(keys):
  k = np.asarray(keys, np.float64).reshape(-1, keys.shape[-1])
  return k.T @ k / len(k)


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize("framework", ["nnx", "linen"])
def test_middle_layer_of_a_scanned_stack_is_an_editable_memory(framework):
  model, ex, prefix, params, rebuild = _model(framework)
  leaf_path = prefix + ("stack", "fc2", "kernel")
  leaf = get_leaf(params, leaf_path)
  assert leaf.shape == (LAYERS, 2 * D, D)

  # The view of layer 1 alone: one layer's kernel and dimensions, the index recorded.
  view = memory_view(model, ("stack", 1, "fc2"), *ex)
  assert view.address == ("stack", 1, "fc2") and view.module_path == ("stack", "fc2")
  assert (view.index, view.stack_size, view.stacked) == (1, LAYERS, 0)
  assert view.weight_path == leaf_path
  assert view.kernel_shape == (2 * D, D) and (view.key_dim, view.value_dim) == (2 * D, D)
  np.testing.assert_array_equal(view.kernel(model), leaf[1])
  assert memory_view(model, "stack/1/fc2", *ex).address == view.address

  # Its keys and values only, eagerly and under jit; layer 1 is fc2 of block 1.
  whole = capture(model, ("stack", "fc2"), X)
  assert whole.keys.shape == (LAYERS, 8, 2 * D)
  for jit in (True, False):
    c = capture(model, "stack/1/fc2", X, jit=jit)
    assert c.calls == 1 and c.keys.shape == (8, 2 * D) and c.values.shape == (8, D)
    np.testing.assert_array_equal(c.keys, whole.keys[1])
    np.testing.assert_array_equal(c.values, whole.values[1])
  bias = get_leaf(params, prefix + ("stack", "fc2", "bias"))[1]
  np.testing.assert_allclose(c.values, np.asarray(c.keys, np.float64) @ np.asarray(
      leaf[1], np.float64) + np.asarray(bias, np.float64), rtol=1e-5, atol=1e-5)

  # Its own C: keys of layer 1 only (float64 numpy on that layer's captured keys).
  st = layer_covariance(model, ("stack", 1, "fc2"), BATCHES)
  assert memedit.key_count(st) == 3 * 16
  keys1 = capture(model, ("stack", 1, "fc2"), jnp.concatenate(BATCHES)).keys
  C = memedit.second_moment(st)
  assert _rel(C, _numpy_c(keys1)) <= 1e-6
  pooled = capture(model, ("stack", "fc2"), jnp.concatenate(BATCHES)).keys
  assert _rel(C, _numpy_c(pooled)) > 1e-2  # not the stack's pooled C
  # Two layers never share a compiled statistics program or a cache entry.
  m = memedit.layers.model.as_model(model)
  kw = dict(masked=False, method=None, dtype=jnp.float32, call_kwargs=None)
  view0 = memory_view(model, ("stack", 0, "fc2"), *ex)
  k0, k1 = _stats._LayerKeys(m, view0, **kw), _stats._LayerKeys(m, view, **kw)
  assert k0 != k1 and k0.key != k1.key
  assert (memedit.layers.layer_cache_key(model, view0, {"n": 1})
          != memedit.layers.layer_cache_key(model, view, {"n": 1}))

  # Exact insert at layer 1: its output at the chosen keys is the target.
  targets = jax.random.normal(jax.random.key(5), (3, D))
  edit = insert_through_view(view, C, c.keys[:3], targets)
  assert edit.path == leaf_path and edit.index == 1
  params1, history = memedit.apply_edit(params, edit)
  edited = rebuild(params1)
  out = capture(edited, ("stack", 1, "fc2"), X[:3]).values
  np.testing.assert_allclose(out, targets, rtol=1e-5, atol=1e-5)
  # Layers 0 and 2 keep their bits; layer 1 changed.
  new = get_leaf(params1, leaf_path)
  np.testing.assert_array_equal(new[0], leaf[0])
  np.testing.assert_array_equal(new[2], leaf[2])
  assert not np.array_equal(new[1], leaf[1])
  # The edited model equals substituting layer 1's edited kernel.
  sub = substitute(model, view, memedit.layers.edited_kernel(view, leaf[1], edit.lam,
                                                             edit.D))
  np.testing.assert_array_equal(get_leaf(memedit.layers.model.as_model(sub).params,
                                                 leaf_path), new)
  # Revert: bit-exact.
  params2, history = memedit.revert_edit(params1, edit, history)
  np.testing.assert_array_equal(get_leaf(params2, leaf_path), leaf)
  assert history.edits == ()


def test_stack_addresses_and_edits_say_what_is_valid():
  model, _, _, params, _ = _model("nnx")
  with pytest.raises(ValueError, match=r"index 3 .* has 3 layers \(expected 0 <= index < 3\)"):
    memory_view(model, ("stack", 3, "fc2"))
  with pytest.raises(ValueError, match=r"index 3 .*expected 0 <= index < 3"):
    capture(model, "stack/3/fc2", X)
  with pytest.raises(ValueError, match=r"right after the scanned module's name 'stack': "
                                       r"expected \('stack', 1, 'fc2'\)"):
    memory_view(model, (1, "stack", "fc2"))
  with pytest.raises(ValueError, match=r"layer \('inp',\) is not stacked"):
    memory_view(model, ("inp", 0))
  # The whole stack cannot be inserted into; the message says how to address one layer.
  whole = memory_view(model, ("stack", "fc2"))
  assert whole.stacked == 1 and whole.index is None and whole.stack_size == LAYERS
  with pytest.raises(ValueError, match=r"e\.g\. \('stack', 0, 'fc2'\) or 'stack/0/fc2' "
                                       r"\(index 0 to 2\)"):
    insert_through_view(whole, jnp.eye(2 * D), jnp.ones((1, 2 * D)), jnp.zeros((1, D)))
  # An edit of a layer the stacked leaf does not have.
  edit = memedit.make_edit(("stack", "fc2", "kernel"), jnp.ones((D, 1)),
                           jnp.ones((1, 2 * D)), index=LAYERS)
  with pytest.raises(ValueError, match=r"expected a layer 0 <= index < 3 of the stacked leaf"):
    memedit.apply_edit(params, edit)
  with pytest.raises(ValueError, match="index: expected None or a non-negative int"):
    memedit.make_edit(("k",), jnp.ones((D, 1)), jnp.ones((1, 2 * D)), index=-1)


def test_layer_edit_keeps_other_layers_bits_even_negative_zeros_and_saves_its_index(tmp_path):
  leaf = jnp.asarray(np.random.default_rng(0).normal(size=(LAYERS, 4, 2)), jnp.bfloat16)
  leaf = leaf.at[0, 0].set(-0.0).at[2].set(-0.0)
  params = {"blk": {"kernel": leaf}}
  edit = memedit.make_edit(("blk", "kernel"), jnp.ones((2, 1)), jnp.ones((1, 4)), index=1)
  assert edit.name != memedit.make_edit(("blk", "kernel"), jnp.ones((2, 1)),
                                        jnp.ones((1, 4)), index=2).name
  new, history = memedit.apply_edit(params, edit)
  bits = lambda x: np.asarray(x).view(np.uint16)
  np.testing.assert_array_equal(bits(new["blk"]["kernel"][0]), bits(leaf[0]))
  np.testing.assert_array_equal(bits(new["blk"]["kernel"][2]), bits(leaf[2]))
  np.testing.assert_array_equal(new["blk"]["kernel"][1],
                                (leaf[1].astype(jnp.float32) + 1.0).astype(jnp.bfloat16))
  back, _ = memedit.revert_edit(new, edit.name, history)
  np.testing.assert_array_equal(bits(back["blk"]["kernel"]), bits(leaf))
  loaded = memedit.load_edit(memedit.save_edit(tmp_path / "edit", edit))
  assert loaded.index == 1 and loaded.name == edit.name and "index=1" in repr(loaded)


# ------------------------------------------------- where the index of a layer goes


class _OneFc(nnx.Module):
  def __init__(self, *, rngs):
    self.fc = nnx.Linear(4, 4, rngs=rngs)


class _NnxStackOnly(nnx.Module):
  """A module holding nothing but a stack of 3 blocks of one layer (vmap + scan)."""

  def __init__(self, *, rngs):
    @nnx.split_rngs(splits=LAYERS)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(rngs):
      return _OneFc(rngs=rngs)
    self.stack = make(rngs)

  def __call__(self, x):
    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def step(h, blk):
      return h + blk.fc(h)
    return step(x, self.stack)


class _NnxEnc(nnx.Module):
  def __init__(self, *, rngs):
    self.enc = _NnxStackOnly(rngs=rngs)

  def __call__(self, x):
    return self.enc(x)


class _LOneFc(nn.Module):
  @nn.compact
  def __call__(self, x, _):
    return x + nn.Dense(4, name="fc")(x), None


class _LStackOnly(nn.Module):
  @nn.compact
  def __call__(self, x):
    scan = nn.scan(_LOneFc, variable_axes={"params": 0, "intermediates": 0},
                   split_rngs={"params": True}, length=LAYERS)
    return scan(name="stack")(x, None)[0]


class _LEnc(nn.Module):
  @nn.compact
  def __call__(self, x):
    return _LStackOnly(name="enc")(x)


@pytest.mark.parametrize("framework", ["nnx", "linen"])
@pytest.mark.parametrize("nested", [False, True], ids=["top", "in_enc"])
def test_index_goes_right_after_the_scanned_module_and_nowhere_else(framework, nested):
  """A model holding nothing but the stack (or a parent 'enc' holding nothing but it): the
  index goes right after 'stack', the view's address is that form and round-trips, every
  other place is refused naming 'stack', and an index out of range names the stack."""
  x = jnp.ones((2, 4))
  if framework == "nnx":
    model = (_NnxEnc if nested else _NnxStackOnly)(rngs=nnx.Rngs(0))
    ex, params, prefix = (), nnx.state(model), ()
  else:
    lm = _LEnc() if nested else _LStackOnly()
    params = lm.init(jax.random.key(0), x)
    model, ex, prefix = (lm, params), (x,), ("params",)
  enc = ("enc",) if nested else ()
  want = enc + ("stack", 1, "fc")
  leaf = get_leaf(params, prefix + enc + ("stack", "fc", "kernel"))
  assert leaf.shape == (LAYERS, 4, 4)

  view = memory_view(model, want, *ex)
  assert view.address == want and view.module_path == enc + ("stack", "fc")
  assert (view.index, view.stack_size, view.slice_at) == (1, LAYERS, len(enc) + 1)
  np.testing.assert_array_equal(view.kernel(model), leaf[1])
  # The address round-trips, as a tuple and as its string.
  assert memedit.layers.model.path_str(want) == "/".join(map(str, want))
  for a in (view.address, memedit.layers.model.path_str(view.address)):
    again = memory_view(model, a, *ex)
    assert (again.address, again.index, again.weight_path) == (want, 1, view.weight_path)

  # Anywhere else, the index is refused: the message names 'stack' and the address.
  expected = re.escape(f"right after the scanned module's name 'stack': expected {want!r} "
                       f"({'/'.join(map(str, want))!r}), got ")
  misplaced = [(1,) + enc + ("stack", "fc"), enc + ("stack", "fc", 1)]
  if nested:
    # 'enc' holds nothing but the stack: its parameters cannot tell it from the scanned
    # module, so an index after its name is read the same way (and reported canonically).
    same = memory_view(model, ("enc", 1, "stack", "fc"), *ex)
    assert (same.address, same.index, same.weight_path) == (want, 1, view.weight_path)
  for bad in misplaced:
    with pytest.raises(ValueError, match=expected + re.escape(repr(bad))):
      memory_view(model, bad, *ex)
  with pytest.raises(ValueError, match=expected):
    memory_view(model, "/".join(map(str, misplaced[-1])), *ex)

  # Out of range: the stack by its path, and the valid range.
  stack = "/".join(enc + ("stack",))
  with pytest.raises(ValueError, match=re.escape(
      f"index 5 in {enc + ('stack', 5, 'fc')!r} is out of range: the scanned stack "
      f"{stack!r} has 3 layers (expected 0 <= index < 3)")):
    memory_view(model, enc + ("stack", 5, "fc"), *ex)

  # The whole stack says where an index goes.
  whole = memory_view(model, enc + ("stack", "fc"), *ex)
  example = enc + ("stack", 0, "fc")
  with pytest.raises(ValueError, match=re.escape(f"e.g. {example!r}")):
    insert_through_view(whole, jnp.eye(4), jnp.ones((1, 4)), jnp.zeros((1, 4)))


def test_a_stack_of_single_layers_takes_its_index_after_the_layer_name():
  """``nnx.vmap`` of an ``nnx.Linear``: the layer is the scanned module itself."""

  class Lin(nnx.Module):
    def __init__(self, *, rngs):
      @nnx.split_rngs(splits=LAYERS)
      @nnx.vmap(in_axes=(0,), out_axes=0)
      def make(rngs):
        return nnx.Linear(4, 4, rngs=rngs)
      self.stack = make(rngs)

  model = Lin(rngs=nnx.Rngs(0))
  view = memory_view(model, "stack/2")
  assert (view.address, view.index, view.module_path) == (("stack", 2), 2, ("stack",))
  with pytest.raises(ValueError, match=re.escape("right after the scanned module's name "
                                                 "'stack': expected ('stack', 2)")):
    memory_view(model, (2, "stack"))


class _LMlp(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(4, name="fc1")(x)


class _LMlpOnly(nn.Module):
  @nn.compact
  def __call__(self, x, _):
    return x + _LMlp(name="mlp")(x), None


def test_a_scanned_block_holding_one_module_takes_the_index_after_either_name():
  """Blocks holding nothing but 'mlp': the parameters cannot tell 'stack' from 'mlp', so
  the index is read after either name; before 'stack' or after the layer it is refused."""

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      scan = nn.scan(_LMlpOnly, variable_axes={"params": 0, "intermediates": 0},
                     split_rngs={"params": True}, length=LAYERS)
      return scan(name="stack")(x, None)[0]

  x = jnp.ones((2, 4))
  net = Net()
  model = (net, net.init(jax.random.key(0), x))
  views = [memory_view(model, a, x) for a in (("stack", 1, "mlp", "fc1"), "stack/mlp/1/fc1")]
  assert {(v.index, v.weight_path, v.address) for v in views} == {
      (1, views[0].weight_path, ("stack", "mlp", 1, "fc1"))}
  for bad in ((1, "stack", "mlp", "fc1"), ("stack", "mlp", "fc1", 1)):
    with pytest.raises(ValueError, match=re.escape("expected ('stack', 'mlp', 1, 'fc1')")):
      memory_view(model, bad, x)
