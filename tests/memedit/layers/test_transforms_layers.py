"""Layers living inside Flax's transformations (Linen ``nn.vmap``, ``nn.remat``, ``nn.jit``,
``nn.cond``, ``nn.map_variables``; NNX ``nnx.vmap``, ``nnx.scan``, ``nnx.remat``, shared
modules, containers, LoRA, BatchNorm) as memories: keys, C and exact inserts against
float64 numpy, and refusals of what memedit cannot read as the layer's memory."""

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

D = 3


def _c64(keys):
  k = np.asarray(keys, np.float64).reshape(-1, np.shape(keys)[-1])
  return k.T @ k / len(k)


def _c_orthogonal(C, keys, n, seed=1):
  """``n`` keys q with q C^-1 K*^T = 0 (float64)."""
  C, K = np.asarray(C, np.float64), np.asarray(keys, np.float64)
  A = np.linalg.solve(C, K.T).T  # rows K* C^-1
  q = np.random.default_rng(seed).normal(size=(n, K.shape[-1]))
  return q - (q @ A.T) @ np.linalg.solve(A @ A.T, A)


def _insert_and_check(model, view, C, keys, rebuild, params, x, address, single=True):
  """Inserts random targets at ``keys`` (the first keys of the layer at ``x``), checks
  them at the layer in the rebuilt model, C-orthogonal keys unchanged and edited_forward."""
  targets = np.random.default_rng(0).normal(size=(len(keys), view.value_dim)).astype(np.float32)
  edit = insert_through_view(view, C, keys, targets)
  params1, _ = memedit.apply_edit(params, edit)
  model1 = rebuild(params1)
  got = np.asarray(capture(model1, address, x, single=single).values).reshape(-1, view.value_dim)
  np.testing.assert_allclose(got[:len(keys)], targets, rtol=0, atol=2e-5)
  q = jnp.asarray(_c_orthogonal(C, keys, 3), jnp.float32)
  k0, k1 = view.read_kernel(params), view.read_kernel(params1)
  np.testing.assert_allclose(view.apply(k1, q), view.apply(k0, q), rtol=0, atol=1e-4)
  out = edited_forward(model, view, edit.lam, edit.D, x)
  want = model1(x) if isinstance(model1, nnx.Module) else model1[0].apply(model1[1], x)
  np.testing.assert_allclose(out, want, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------- layers mapped over the examples


class _NnxPerExample(nnx.Module):
  """A Linear run per example by nnx.vmap (its parameters broadcast)."""

  def __init__(self, *, rngs):
    self.fc = nnx.Linear(D, 2, rngs=rngs)
    self.head = nnx.Linear(2, 2, rngs=rngs)

  def __call__(self, x):
    axes = nnx.StateAxes({nnx.Intermediate: 0, ...: None})
    return self.head(nnx.vmap(lambda m, xi: m(xi), in_axes=(axes, 0))(self.fc, x))


class _LPerExample(nn.Module):
  @nn.compact
  def __call__(self, x):
    per = nn.vmap(nn.Dense, variable_axes={"params": None, "intermediates": 0},
                  split_rngs={"params": False}, in_axes=0)
    return nn.Dense(2, name="head")(per(2, name="fc")(x))


@pytest.mark.parametrize("framework", ["nnx", "linen"])
def test_layer_mapped_over_the_examples_gives_each_example_key_to_its_statistics(framework):
  # One batch of as many rows as the key has entries (3), one of 4: the vmap's axis is the
  # batch axis, not a stack of layers in front of it.
  batches = [jax.random.normal(jax.random.key(i), (b, D)) for i, b in enumerate((3, 4, 3))]
  x = batches[0]
  if framework == "nnx":
    model = _NnxPerExample(rngs=nnx.Rngs(0))
    gd, params = nnx.split(model)
    rebuild = lambda p: nnx.merge(gd, p)
    view = memory_view(model, "fc")
  else:
    lm = _LPerExample()
    params = lm.init(jax.random.key(0), x)
    model, rebuild = (lm, params), lambda p: (lm, p)
    view = memory_view(model, "fc", x)
  st = layer_covariance(model, view, batches, progress=False)
  keys = np.concatenate([np.asarray(b, np.float64) for b in batches])
  assert memedit.key_count(st) == len(keys)
  C = memedit.second_moment(st)
  np.testing.assert_allclose(C, _c64(keys), rtol=0, atol=1e-6)
  _insert_and_check(model, view, C, np.asarray(x[:2]), rebuild, params, x, "fc")


class _Ensemble(nnx.Module):
  """E members made by nnx.vmap, each run on the whole batch by nnx.vmap."""

  def __init__(self, members, *, rngs):
    @nnx.split_rngs(splits=members)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(rngs):
      return nnx.Linear(D, 2, rngs=rngs)
    self.pre = nnx.Linear(D, D, rngs=rngs)
    self.ens = make(rngs)

  def __call__(self, x):
    h = jnp.tanh(self.pre(x))
    return nnx.vmap(lambda m, h: m(h), in_axes=(0, None), out_axes=0)(self.ens, h)


def test_one_member_of_an_nnx_vmap_ensemble_is_its_own_memory():
  # As many members as rows in the batch: the member axis must still not be taken for it.
  model = _Ensemble(4, rngs=nnx.Rngs(0))
  batches = [jax.random.normal(jax.random.key(i), (4, D)) for i in range(2)]
  x = batches[0]
  hidden = np.concatenate([np.tanh(np.asarray(model.pre(b), np.float64)) for b in batches])
  whole = layer_covariance(model, "ens", batches, progress=False)
  assert memedit.key_count(whole) == 4 * len(hidden)
  np.testing.assert_allclose(memedit.second_moment(whole), _c64(hidden), rtol=0, atol=1e-6)
  view = memory_view(model, ("ens", 2))
  assert (view.index, view.kernel_shape) == (2, (D, 2))
  st = layer_covariance(model, view, batches, progress=False)
  assert memedit.key_count(st) == len(hidden)
  C = memedit.second_moment(st)
  np.testing.assert_allclose(C, _c64(hidden), rtol=0, atol=1e-6)
  gd, params = nnx.split(model)
  keys = np.tanh(np.asarray(model.pre(x[:2])))
  _insert_and_check(model, view, C, keys, lambda p: nnx.merge(gd, p), params, x, ("ens", 2))
  edit = insert_through_view(view, C, keys, np.zeros((2, 2), np.float32))
  params1, _ = memedit.apply_edit(params, edit)
  for k in (0, 1, 3):  # the other members keep their bits
    np.testing.assert_array_equal(params1["ens"]["kernel"][...][k], params["ens"]["kernel"][...][k])


# ------------------------------------------------------------- nn.map_variables


def _double(tree):
  return jax.tree_util.tree_map(lambda a: 2.0 * a, tree)


class _LScanBlock(nn.Module):
  @nn.compact
  def __call__(self, x, _):
    return nn.Dense(D, name="dense")(x), None


class _LMapped(nn.Module):
  mapping: str

  @nn.compact
  def __call__(self, x):
    init = self.is_initializing()
    mapped = lambda target, trans=_double, col="params", init=init: nn.map_variables(
        target, col, trans_in_fn=trans, init=init)
    if self.mapping == "scaled":
      h = mapped(nn.Dense)(D, name="fc")(x)
    elif self.mapping == "scaled_init":  # Flax cannot apply it with a mutable collection
      h = mapped(nn.Dense, init=True)(D, name="fc")(x)
    elif self.mapping == "block":  # the layer inside a mapped module
      h = mapped(_LScanBlock)(name="fc")(x, None)[0]
    elif self.mapping == "scanned":  # a mapped scan over blocks: the layer sees slices
      scan = nn.scan(_LScanBlock, variable_axes={"params": 0, "intermediates": 0},
                     split_rngs={"params": True}, length=2)
      h = mapped(scan)(name="fc")(x, None)[0]
    elif self.mapping == "identity":
      h = mapped(nn.Dense, trans=lambda v: v)(D, name="fc")(x)
    else:  # another collection mapped: the parameters reach the layer as stored
      h = mapped(nn.Dense, col="batch_stats")(D, name="fc")(x)
    return nn.Dense(2, name="head")(jnp.tanh(h))


@pytest.mark.parametrize("mapping", ["scaled", "block", "scanned"])
def test_a_layer_run_inside_linen_map_variables_is_refused(mapping):
  x = jax.random.normal(jax.random.key(0), (5, D))
  lm = _LMapped(mapping)
  model = (lm, lm.init(jax.random.key(0), x))
  address = {"block": "fc/dense", "scanned": "fc/1/dense"}.get(mapping, "fc")
  match = r"run inside linen\.map_variables \('.*map_variables\(fc\).*'\).*trans_in_fn"
  for make in (lambda: memory_view(model, address, x),
               lambda: capture(model, address.replace("/1/", "/"), x),
               lambda: layer_covariance(model, address, [x], progress=False)):
    with pytest.raises(ValueError, match=match):
      make()
  assert memory_view(model, "head", x).key_dim == D  # the rest of the model stays editable


def test_a_model_flax_cannot_run_with_intermediates_is_named():
  # map_variables(init=True) finds its variables empty when any collection is mutable.
  x = jax.random.normal(jax.random.key(0), (5, D))
  lm = _LMapped("scaled_init")
  model = (lm, lm.init(jax.random.key(0), x))
  with pytest.raises(ValueError, match=r"map_variables\(\.\.\., init=True\).*"
                                       r"init=self\.is_initializing\(\)"):
    capture(model, "head", x)
  with pytest.raises(ValueError, match=r"run inside linen\.map_variables.*init=True"):
    capture(model, "fc", x)  # the mapped layer itself


@pytest.mark.parametrize("mapping", ["identity", "other_collection"])
def test_linen_map_variables_that_leaves_the_parameters_alone_edits_exactly(mapping):
  batches = [jax.random.normal(jax.random.key(i), (6, D)) for i in range(2)]
  x = batches[0]
  lm = _LMapped(mapping)
  params = lm.init(jax.random.key(0), x)
  model = (lm, params)
  view = memory_view(model, "fc", x)
  C = memedit.second_moment(layer_covariance(model, view, batches, progress=False))
  np.testing.assert_allclose(C, _c64(np.concatenate(batches)), rtol=0, atol=1e-6)
  _insert_and_check(model, view, C, np.asarray(x[:2]), lambda p: (lm, p), params, x, "fc")


class _LWhile(nn.Module):
  @nn.compact
  def __call__(self, x):
    fc = nn.Dense(D, name="fc")
    if self.is_initializing():
      fc(x)  # nn.while_loop cannot create variables
    body = lambda mdl, c: (c[0] + 1, jnp.tanh(mdl(c[1])))
    return nn.while_loop(lambda mdl, c: c[0] < 3, body, fc, (0, x))[1]


def test_a_layer_in_a_linen_while_loop_is_said_to_give_back_no_records():
  x = jax.random.normal(jax.random.key(0), (4, D))
  lm = _LWhile()
  model = (lm, lm.init(jax.random.key(0), x))
  match = r"inside Linen's while_loop \(at 'while_loop\(fc\)'\).*call the layer outside it"
  with pytest.raises(ValueError, match=match):
    capture(model, "fc", x)
  with pytest.raises(ValueError, match=match):
    layer_covariance(model, memory_view(model, "fc", x), [x], progress=False)


# ------------------------------------------------ layers in Linen and NNX model styles


class _LStyles(nn.Module):
  """remat, checkpoint, jit and cond around layers; a tied (setup) layer called twice; a
  Dense inside nn.Sequential."""

  def setup(self):
    self.tied = nn.Dense(D)
    self.seq = nn.Sequential([nn.Dense(D), nn.tanh, nn.Dense(2)])
    self.remat = nn.remat(nn.Dense)(D)
    self.ckpt = nn.checkpoint(_LScanBlock)()
    self.jit = nn.jit(nn.Dense)(D)
    self.branch = nn.Dense(D)

  def __call__(self, x):
    h = jnp.tanh(self.remat(x))
    h = jnp.tanh(self.ckpt(h, None)[0])
    h = jnp.tanh(self.jit(h))
    h = nn.cond(True, lambda m, h: m(h), lambda m, h: -m(h), self.branch, h)
    h = self.tied(jnp.tanh(self.tied(jnp.tanh(h))))
    return self.seq(x + h)


@pytest.mark.parametrize("address", ["remat", "ckpt/dense", "jit", "branch", "seq/layers_2"])
def test_linen_layers_under_remat_jit_cond_and_in_sequential_edit_exactly(address):
  batches = [jax.random.normal(jax.random.key(i), (6, D)) for i in range(2)]
  x = batches[0]
  lm = _LStyles()
  params = lm.init(jax.random.key(0), x)
  model = (lm, params)
  view = memory_view(model, address, x)
  C = memedit.second_moment(layer_covariance(model, view, batches, progress=False))
  keys = np.concatenate([capture(model, address, b, single=True).keys for b in batches])
  np.testing.assert_allclose(C, _c64(keys), rtol=0, atol=1e-6)
  _insert_and_check(model, view, C, keys[:2], lambda p: (lm, p), params, x, address)


def test_tied_linen_layer_pools_both_calls():
  batches = [jax.random.normal(jax.random.key(i), (6, D)) for i in range(2)]
  lm = _LStyles()
  model = (lm, lm.init(jax.random.key(0), batches[0]))
  got = capture(model, "tied", batches[0])
  assert got.calls == 2 and got.keys.shape == (2, 6, D)
  np.testing.assert_allclose(got.keys[1], jnp.tanh(got.values[0]), rtol=1e-6, atol=1e-6)
  st = layer_covariance(model, memory_view(model, "tied", batches[0]), batches, progress=False)
  keys = np.concatenate([capture(model, "tied", b).keys.reshape(-1, D) for b in batches])
  assert memedit.key_count(st) == len(keys) == 24
  np.testing.assert_allclose(memedit.second_moment(st), _c64(keys), rtol=0, atol=1e-6)


class _MyParam(nnx.Param):
  pass


class _NnxStyles(nnx.Module):
  """nnx.List / nnx.Dict containers, nnx.remat, a shared Linear, a kernel held in an
  nnx.Param subclass, LoRALinear and BatchNorm, with __call__ under nnx.jit."""

  def __init__(self, *, rngs):
    self.lst = nnx.List([nnx.Linear(D, D, rngs=rngs), nnx.Linear(D, D, rngs=rngs)])
    self.dct = nnx.Dict({"a": nnx.Linear(D, D, rngs=rngs)})
    self.shared = nnx.Linear(D, D, rngs=rngs)
    self.custom = nnx.Linear(D, D, rngs=rngs)
    self.custom.kernel = _MyParam(self.custom.kernel[...])
    self.lora = nnx.LoRALinear(D, D, lora_rank=2, rngs=rngs)
    self.lora.lora.lora_b[...] = jax.random.normal(jax.random.key(9), (2, D))
    self.bn = nnx.BatchNorm(D, rngs=rngs)
    self.head = nnx.Linear(D, 2, rngs=rngs)

  @nnx.jit
  def __call__(self, x):
    h = jnp.tanh(self.lst[0](x))
    h = nnx.remat(lambda m, h: jnp.tanh(m(h)))(self.lst[1], h)
    h = jnp.tanh(self.dct["a"](h))
    h = jnp.tanh(self.shared(jnp.tanh(self.shared(h))))
    h = jnp.tanh(self.custom(h))
    h = self.bn(jnp.tanh(self.lora(h)))
    return self.head(h)


def _statistics_and_insert_are_exact(model, address, batches):
  """C of the NNX layer at ``address`` equals its captured keys' (float64), and an insert
  through its view is exact, specific and reverts (on the first batch)."""
  gd, params = nnx.split(model)
  view = memory_view(model, address)
  C = memedit.second_moment(layer_covariance(model, view, batches, progress=False))
  keys = np.concatenate([capture(model, address, b, single=True).keys for b in batches])
  np.testing.assert_allclose(C, _c64(keys), rtol=0, atol=1e-6)
  _insert_and_check(model, view, C, keys[:2], lambda p: nnx.merge(gd, p), params,
                    batches[0], address)


@pytest.mark.parametrize("address", ["lst/1", "dct/a", "custom", "lora", "head"])
def test_nnx_layers_in_containers_remat_param_subclasses_lora_and_after_batchnorm(address):
  batches = [jax.random.normal(jax.random.key(i), (6, D)) for i in range(2)]
  model = _NnxStyles(rngs=nnx.Rngs(0))
  model.bn.mean[...] = jnp.full((D,), 0.1)  # running statistics away from their init
  model.eval()
  before = nnx.state(model, nnx.BatchStat)
  _statistics_and_insert_are_exact(model, address, batches)
  after = nnx.state(model, nnx.BatchStat)
  jax.tree_util.tree_map(np.testing.assert_array_equal, before, after)


def test_nnx_layer_after_batchnorm_in_training_mode_sees_batch_statistics():
  batches = [jax.random.normal(jax.random.key(i), (6, D)) for i in range(2)]
  x = batches[0]
  model = _NnxStyles(rngs=nnx.Rngs(0))
  model.train()
  before = jax.tree_util.tree_map(np.array, nnx.state(model, nnx.BatchStat))
  gd, params = nnx.split(model)
  view = memory_view(model, "head")
  st = layer_covariance(model, view, batches, progress=False)
  keys = []
  for b in batches:  # BatchNorm normalises with each batch's own mean and variance
    h = np.asarray(capture(model, "bn", b, single=True).keys, np.float64)
    z = (h - h.mean(0)) / np.sqrt(h.var(0) + model.bn.epsilon)
    keys.append(z * np.asarray(model.bn.scale[...]) + np.asarray(model.bn.bias[...]))
  keys = np.concatenate(keys)
  np.testing.assert_allclose(memedit.second_moment(st), _c64(keys), rtol=0, atol=1e-5)
  _insert_and_check(model, view, memedit.second_moment(st), keys[:2].astype(np.float32),
                    lambda p: nnx.merge(gd, p), params, x, "head")
  jax.tree_util.tree_map(np.testing.assert_array_equal, before, nnx.state(model, nnx.BatchStat))


# ------------------------------------------------ NNX layers held in plain containers


class _NnxData(nnx.Module):
  """Layers in a plain list, dict and tuple held as data, and in an nnx.Dict under keys
  made of digits."""

  def __init__(self, *, rngs):
    self.pl = nnx.data([nnx.Linear(D, D, rngs=rngs), nnx.Linear(D, D, rngs=rngs)])
    self.pd = nnx.data({"a": nnx.Linear(D, D, rngs=rngs)})
    self.tup = nnx.data((nnx.Linear(D, D, rngs=rngs),))
    self.digits = nnx.Dict({"0": nnx.Linear(D, 2, rngs=rngs)})

  def __call__(self, x):
    h = jnp.tanh(self.pl[1](jnp.tanh(self.pl[0](x))))
    h = jnp.tanh(self.tup[0](jnp.tanh(self.pd["a"](h))))
    return self.digits["0"](h)


@pytest.mark.parametrize("address", ["pl/1", "pd/a", "tup/0", "digits/0"])
def test_nnx_layers_in_plain_lists_dicts_and_tuples_are_captured_and_edited(address):
  batches = [jax.random.normal(jax.random.key(i), (6, D)) for i in range(2)]
  model = _NnxData(rngs=nnx.Rngs(0))
  _statistics_and_insert_are_exact(model, address, batches)
  assert isinstance(model.tup[0], nnx.Linear)  # the caller's model keeps its layers


class _NnxSquare(nnx.Module):
  """Layers whose parameters all share a leading size (3) without being a stack."""

  def __init__(self, *, rngs):
    self.attn = nnx.Dict({"q": nnx.Linear(D, D, rngs=rngs), "k": nnx.Linear(D, D, rngs=rngs)})
    self.lst = nnx.List([nnx.Linear(D, D, rngs=rngs)])

  def __call__(self, x):
    return self.lst[0](self.attn["k"](self.attn["q"](x)))


def test_nnx_indices_into_unstacked_layers_and_lists_are_named_as_such():
  model = _NnxSquare(rngs=nnx.Rngs(0))
  for address in ("attn/1/q", ("attn", "q", 1)):
    with pytest.raises(ValueError, match=r"layer \('attn', 'q'\) is not stacked \(its kernel "
                                         r"\(3, 3\) carries no layer axis\)"):
      memory_view(model, address)
  with pytest.raises(ValueError, match=r"no layer at \('lst', 3\); valid paths near it: "
                                       r"'lst/0'"):
    memory_view(model, "lst/3")
  # Linen: the parameters alone cannot tell; the error says both readings.
  x = jnp.ones((2, D))
  lm = nn.Sequential([nn.Dense(D), nn.Dense(D)])
  linen = (lm, lm.init(jax.random.key(0), x))
  with pytest.raises(ValueError, match=r"or, if the model is not scanned \(every parameter "
                                       r"of it merely has 3 rows\), layer \('layers_0',\) "
                                       r"is not stacked"):
    memory_view(linen, "layers_0/1", x)


# ------------------------------------------------ reparametrisations written in a subclass


class _NormedLinear(nnx.Linear):
  """A user's weight normalisation inside a subclass of a registered layer: W / |W|."""

  def __call__(self, x):
    k = self.kernel[...]
    return x @ (k / jnp.linalg.norm(k)) + self.bias[...]


class _NnxNormed(nnx.Module):
  def __init__(self, *, rngs):
    self.fc = _NormedLinear(D, D, rngs=rngs)

  def __call__(self, x):
    return self.fc(x)


def test_subclass_dividing_its_kernel_by_its_norm_fails_the_contract_check():
  # Its output at a zero kernel is NaN: the check must not pass on NaN comparisons.
  x = jax.random.normal(jax.random.key(0), (6, D))
  model = _NnxNormed(rngs=nnx.Rngs(0))
  view = memory_view(model, "fc")
  keys = capture(model, "fc", x, single=True).keys
  with pytest.raises(ValueError, match=r"\(_NormedLinear\): expected finite outputs .* not "
                                       r"affine in its kernel"):
    view.check_contract()
  with pytest.raises(ValueError, match=r"expected finite outputs"):
    insert_through_view(view, jnp.asarray(_c64(keys), jnp.float32), keys[:2],
                        jnp.zeros((2, D)))


# ------------------------------------------------ Linen ensembles made with nn.vmap


class _LEnsemble(nn.Module):
  records_axis: int

  @nn.compact
  def __call__(self, x):
    members = nn.vmap(nn.Dense, variable_axes={"params": 0, "intermediates": self.records_axis},
                      split_rngs={"params": True}, in_axes=None, out_axes=0, axis_size=3)
    return members(2, name="fc")(x)


def test_linen_vmap_ensemble_member_is_its_own_memory_and_a_records_axis_apart_is_refused():
  batches = [jax.random.normal(jax.random.key(i), (3, D)) for i in range(2)]  # 3 rows, 3 members
  x = batches[0]
  lm = _LEnsemble(0)
  params = lm.init(jax.random.key(0), x)
  model = (lm, params)
  view = memory_view(model, "fc/1", x)
  kernel = np.asarray(params["params"]["fc"]["kernel"][1], np.float64)
  got = capture(model, view, x, single=True)
  np.testing.assert_array_equal(got.keys, x)
  np.testing.assert_allclose(got.values, np.asarray(x, np.float64) @ kernel
                             + np.asarray(params["params"]["fc"]["bias"][1]), rtol=0, atol=1e-6)
  C = memedit.second_moment(layer_covariance(model, view, batches, progress=False))
  np.testing.assert_allclose(C, _c64(np.concatenate(batches)), rtol=0, atol=1e-6)
  _insert_and_check(model, view, C, np.asarray(x[:2]), lambda p: (lm, p), params, x, view)
  # Records mapped on axis 1: axis 0 is then the batch, as long as the member axis.
  apart = (_LEnsemble(1), params)
  for make in (lambda: capture(apart, "fc/1", x),
               lambda: layer_covariance(apart, memory_view(apart, "fc/1", x), batches,
                                        progress=False)):
    with pytest.raises(ValueError, match=r"records whose axis 0 follows the batch \(3 rows, "
                                         r"as many as layers\).*'intermediates': 0"):
      make()
  with pytest.raises(ValueError, match=r"got keys of shape \(4, 3, 3\).*'intermediates': 0"):
    capture(apart, "fc/1", jnp.ones((4, D)))
