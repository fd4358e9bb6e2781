"""Memory views: exact inserts, substitution, edited forward passes, edits on model state."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import memedit
from memedit.tree import get_leaf
import models
from memedit.layers import (capture, edited_forward, insert_through_view, layer_forward,
                            memory_view, register_layer_kind, substitute)


def _leaves(tree):
  """Leaves as numpy arrays (typed PRNG keys as their key data)."""
  out = []
  for a in jax.tree_util.tree_leaves(tree):
    if jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
      a = jax.random.key_data(a)
    out.append(np.array(a))
  return out


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _build(framework, name):
  """(model, params, run(params, x), inputs(n, seed))."""
  if name == "mlp":
    inputs = lambda n, s: jax.random.normal(jax.random.key(s), (n, 6))
    nnx_cls, linen_cls = models.MLP, models.LMLP
  elif name == "gen":
    inputs = lambda n, s: jax.random.normal(jax.random.key(s), (n, 8))
    nnx_cls, linen_cls = models.Generator, models.LGenerator
  else:
    inputs = lambda n, s: jax.random.randint(jax.random.key(s), (n, 5), 0, 11)
    nnx_cls, linen_cls = models.Transformer, models.LTransformer
  if framework == "nnx":
    gd, st = nnx.split(models.build(nnx_cls))
    return (gd, st), st, jax.jit(lambda p, x: nnx.merge(gd, p)(x)), inputs
  mod = linen_cls()
  var = models.linen_init(mod, inputs(1, 0))
  return (mod, var), var, jax.jit(mod.apply), inputs


CASES = [
    ("nnx", "mlp", ("blocks", 1, "fc1"), False),
    ("linen", "mlp", ("LBlock_1", "fc1"), False),
    ("nnx", "gen", ("mid",), True),        # Conv 3x3, patch keys
    ("linen", "gen", ("mid",), True),
    ("nnx", "gen", ("up1",), True),        # ConvTranspose 4x4 stride 2, patch keys
    ("linen", "gen", ("up1",), True),
    ("nnx", "tf", ("attn", "query"), False),  # LinearGeneral d -> (heads, head_dim)
    ("nnx", "tf", ("attn", "out"), False),    # LinearGeneral (heads, head_dim) -> d
    ("linen", "tf", ("attn", "value"), False),
    ("linen", "tf", ("attn", "out"), False),
]


@pytest.mark.parametrize("framework,name,address,patch", CASES,
                         ids=["-".join([c[0], c[1], *map(str, c[2])]) for c in CASES])
def test_insert_through_view_is_exact_and_specific(framework, name, address, patch):
  model, params, run, inputs = _build(framework, name)
  n_keep = {"mlp": 3, "gen": 1, "tf": 2}[name]
  x_stats, x_keep, x_src = inputs(6, 1), inputs(n_keep, 2), inputs(1, 3)
  view = memory_view(model, address, x_keep, patch=patch)
  assert view.weight_path[-1] == "kernel" and view.stacked == 0
  d = view.key_dim
  # One compiled capture for all inputs, split per example afterwards.
  c = capture(model, address, jnp.concatenate([x_stats, x_keep, x_src]), single=True)
  per_example = np.asarray(view.keys(c.keys), np.float64).reshape(len(c.keys), -1, d)
  ks, k_keep, k_gen = (per_example[:6].reshape(-1, d), per_example[6:6 + n_keep].reshape(-1, d),
                       per_example[6 + n_keep:].reshape(-1, d))

  C = ks.T @ ks / len(ks)
  C = C + 0.1 * np.trace(C) / d * np.eye(d)  # dead ReLU units would make C singular
  # A new key k* whose direction D = C⁻¹k* is orthogonal to every key of x_keep.
  A = np.linalg.solve(C, k_keep.T)
  q, _ = np.linalg.qr(A)
  k0 = k_gen[len(k_gen) // 2]
  k_star = k0 - q @ (q.T @ k0)
  assert np.abs(k_keep @ np.linalg.solve(C, k_star)).max() < 1e-9 * np.linalg.norm(k_star)

  kernel0 = view.kernel()
  bias = memedit.layers.edit.layer_bias(view)
  if patch:
    layer = lambda K, k: k @ K.reshape(d, -1) + bias
    native = jnp.asarray(k_star[None], jnp.float32)
  elif view.kind == "conv":
    layer = lambda K, k: view.apply(K, k).reshape(-1)
    native = jnp.asarray(k_star.reshape(1, 1, 1, d), jnp.float32)
  else:
    layer = lambda K, k: view.apply(K, k).reshape(-1)
    native = view.native_keys(jnp.asarray(k_star[None], jnp.float32))
  v0 = np.asarray(layer(kernel0, native)).reshape(-1)
  v_star = v0 + np.random.default_rng(0).normal(size=v0.shape) * 0.2 * (np.std(v0) + 0.1)

  edit = insert_through_view(view, jnp.asarray(C, jnp.float32), k_star[None], v_star[None])
  assert edit.path == view.weight_path
  new_params, hist = memedit.apply_edit(params, edit)
  kernel1 = get_leaf(new_params, view.weight_path)
  assert _rel(np.asarray(layer(kernel1, native)).reshape(-1), v_star) <= 1e-5

  y0, y1 = run(params, x_keep), run(new_params, x_keep)
  assert _rel(y1, y0) <= 1e-5, _rel(y1, y0)
  # The edit is not vacuous: the layer's output for a generic key changes.
  k_src = jnp.asarray(k_gen[:1], jnp.float32)
  if not patch:
    k_src = view.native_keys(k_src)
  assert _rel(layer(kernel1, k_src), layer(kernel0, k_src)) > 1e-4

  back, _ = memedit.revert_edit(new_params, edit, hist)
  np.testing.assert_array_equal(get_leaf(back, view.weight_path), kernel0)


def test_one_by_one_conv_per_pixel_insert_is_exact():
  for model, x in ((models.build(models.Generator, 0), jnp.ones((1, 8))),):
    view = memory_view(model, ("rgb",))
    assert (view.kind, view.key_dim, view.value_dim) == ("conv", 8, 3)
    c = capture(model, ("rgb",), jax.random.normal(jax.random.key(1), (2, 8)), single=True)
    k = np.asarray(c.keys, np.float64).reshape(-1, 8)
    C = k.T @ k / len(k) + 0.1 * np.eye(8)
    rng = np.random.default_rng(0)
    keep = rng.normal(size=(5, 8))
    q, _ = np.linalg.qr(np.linalg.solve(C, keep.T))
    k0 = rng.normal(size=8)
    k_star = k0 - q @ (q.T @ k0)
    v_star = np.array([0.3, -0.2, 0.1])
    edit = insert_through_view(view, jnp.asarray(C, jnp.float32), k_star[None], v_star[None])
    assert edit.kind == "conv" and edit.lam.shape == (1, 1, 3, 1)
    k1 = view.kernel() + memedit.edit_delta(edit, view.kernel_shape)
    px = lambda K, kk: view.apply(K, jnp.asarray(kk, jnp.float32).reshape(1, -1, 1, 8))
    assert _rel(px(k1, k_star), v_star) <= 1e-5
    assert _rel(px(k1, keep), px(view.kernel(), keep)) <= 1e-5


def test_patch_view_matches_the_layer_and_per_pixel_kxk_insert_is_refused():
  g = models.build(models.Generator, 0)
  z = jax.random.normal(jax.random.key(1), (2, 8))
  for name in ("up1", "mid", "up2"):
    view = memory_view(g, (name,), patch=True)
    c = capture(g, (name,), z, single=True)
    k = np.asarray(view.kernel(), np.float64)  # float64 numpy reference: no eager ops
    y = (np.asarray(view.keys(c.keys), np.float64) @ k.reshape(-1, k.shape[-1])
         + np.asarray(getattr(g, name).bias[...], np.float64))
    np.testing.assert_allclose(y, c.values, rtol=1e-5, atol=1e-5)
  # Strides, explicit and VALID padding, dilation: patches @ kernel reproduce the layer.
  import flax.linen as nn
  x = jax.random.normal(jax.random.key(2), (2, 7, 6, 3))
  layers = [nnx.Conv(3, 4, (3, 3), strides=2, padding="VALID", rngs=nnx.Rngs(0)),
            nnx.Conv(3, 4, (3, 2), padding=((1, 2), (0, 1)), kernel_dilation=(2, 1),
                     rngs=nnx.Rngs(0)),
            nnx.ConvTranspose(3, 4, (3, 3), strides=(2, 2), padding="VALID", rngs=nnx.Rngs(0)),
            nnx.ConvTranspose(3, 4, (5, 3), strides=(3, 2), padding="SAME", rngs=nnx.Rngs(0))]
  lin = nn.ConvTranspose(4, (4, 4), strides=(2, 2), padding=((2, 1), (1, 1)))
  models_ = [(l, None) for l in layers] + [((lin, models.linen_init(lin, x)), lin)]
  for model, _ in models_:
    view = memory_view(model, (), x, patch=True)
    c = capture(model, (), x, single=True, jit=False)
    k = np.asarray(view.kernel(), np.float64)
    bias = np.asarray(memedit.layers.edit.layer_bias(view), np.float64)
    y = np.asarray(view.keys(c.keys), np.float64) @ k.reshape(-1, k.shape[-1]) + bias
    np.testing.assert_allclose(y, c.values, rtol=1e-5, atol=1e-5)
  view = memory_view(g, ("mid",))
  assert (view.kind, view.key_dim) == ("conv", 8)
  with pytest.raises(ValueError, match="patch=True"):
    insert_through_view(view, jnp.eye(8), jnp.ones((1, 8)), jnp.ones((1, 8)))


def test_per_tap_lambda_solve_on_kxk_conv_reaches_target():
  """For a 3x3 conv with per-pixel keys (the paper's layout), core solve_lambda over the
  per-tap Λ, with f = the layer run alone through the view, makes the pixel hit v*."""
  g = models.build(models.Generator, 0)
  z = jax.random.normal(jax.random.key(1), (1, 8))
  view = memory_view(g, ("mid",))
  c = capture(g, ("mid",), z, single=True)
  x = c.keys  # (1, 8, 8, C_in) layer input
  k = x.reshape(-1, 8)
  C = k.T @ k / k.shape[0] + 1e-2 * jnp.eye(8)
  D = memedit.solve_psd(C, x[0, 4, 4])[None]
  D = D / jnp.linalg.norm(D)
  target = c.values[0, 4, 4] + 0.5
  f = lambda K, inp: view.apply(K, inp)[0, 4, 4]
  res = memedit.solve_lambda(f, view.kernel(), D, x, target, kind="conv", loss="l2",
                             optimizer="gauss_newton", steps=10)
  out = layer_forward(view, res.lam, D, x)[0, 4, 4]
  assert _rel(out, target) <= 1e-5


def test_custom_layer_lambda_solve_with_extra_argument():
  register_layer_kind(models.StyleMemory, weight="w", kind="dense", in_ndim=1)
  m = models.build(models.Styled, 0)
  x = jax.random.normal(jax.random.key(2), (1, 6))
  s = jax.random.normal(jax.random.key(3), (1, 3))
  view = memory_view(m, ("memory",))
  c = capture(m, ("memory",), x, s, single=True)
  D = c.keys / jnp.linalg.norm(c.keys)
  target = c.values + 1.0
  f = lambda K, k: view.apply(K, k, *c.extra_args)
  res = memedit.solve_lambda(f, view.kernel(), D, c.keys, target, loss="l2",
                             optimizer="gauss_newton", steps=5)
  new = substitute(m, view, view.kernel() + memedit.kernel_delta(res.lam, D, view.kernel_shape))
  assert _rel(new(x, s), target) <= 1e-5


def test_edited_forward_gradient_wrt_lambda_under_jit():
  model, params, run, inputs = _build("nnx", "tf")
  toks = inputs(2, 1)
  view = memory_view(model, ("attn", "query"))
  D = jax.random.normal(jax.random.key(4), (1, 16))
  lam = 0.1 * jax.random.normal(jax.random.key(5), memedit.lambda_shape(view.kernel_shape, 1))
  loss = lambda l: jnp.sum(edited_forward(model, view, l, D, toks) ** 2)
  g = jax.jit(jax.grad(loss))(lam)
  assert g.shape == lam.shape and float(jnp.abs(g).max()) > 0
  u = jax.random.normal(jax.random.key(6), lam.shape)
  eps = 1e-2
  fd = (loss(lam + eps * u) - loss(lam - eps * u)) / (2 * eps)
  np.testing.assert_allclose(float(jnp.sum(g * u)), float(fd), rtol=2e-2)
  # Λ = 0 reproduces the model.
  np.testing.assert_allclose(edited_forward(model, view, 0 * lam, D, toks), run(params, toks),
                             rtol=1e-6, atol=1e-6)


def test_edits_compose_and_revert_on_nnx_state_and_linen_variables():
  for framework, address in (("nnx", ("blocks", 0, "fc2")), ("linen", ("LBlock_0", "fc2"))):
    model, params, run, inputs = _build(framework, "mlp")
    x = inputs(2, 1)
    view = memory_view(model, address, x)
    rng = np.random.default_rng(1)
    e1 = memedit.make_edit(view.weight_path, rng.normal(size=(16, 1)), rng.normal(size=(1, 32)),
                           kind="dense", label="a")
    e2 = memedit.make_edit(view.weight_path, rng.normal(size=(16, 2)), rng.normal(size=(2, 32)),
                           kind="dense", label="b")
    p1, h = memedit.apply_edit(params, e1)
    p2, h = memedit.apply_edit(p1, e2, h)
    both = view.kernel() + (memedit.kernel_delta(e1.lam, e1.D, view.kernel_shape)
                            + memedit.kernel_delta(e2.lam, e2.D, view.kernel_shape))
    np.testing.assert_allclose(get_leaf(p2, view.weight_path), both, rtol=1e-5, atol=1e-5)
    assert _rel(run(p2, x), run(params, x)) > 1e-3
    p3, h = memedit.revert_edit(p2, e1, h)
    p4, h = memedit.revert_edit(p3, "b", h)
    for a, b in zip(jax.tree_util.tree_leaves(p4), jax.tree_util.tree_leaves(params)):
      np.testing.assert_array_equal(a, b)


def test_callers_model_and_parameters_are_untouched(tmp_path):
  m = models.build(models.MLP, 0)
  x = jax.random.normal(jax.random.key(1), (3, 6))
  before = [np.array(a) for a in jax.tree_util.tree_leaves(nnx.state(m))]
  ids = {p: id(mod) for p, mod in nnx.iter_modules(m)}
  types = {p: type(mod) for p, mod in nnx.iter_modules(m)}
  y0 = np.array(m(x))

  view = memory_view(m, lambda mm: mm.blocks[1].fc1)
  capture(m, ("blocks", 1, "fc1"), x)
  capture(m, ("alias",), x, jit=False)
  new = substitute(m, view, jnp.zeros(view.kernel_shape))
  edited_forward(m, view, jnp.ones((32, 1)), jnp.ones((1, 16)), x)
  insert_through_view(view, jnp.eye(16), jnp.ones((1, 16)), jnp.zeros((1, 32)))
  memedit.layers.layer_covariance(m, ("shared",), [x], progress=False)

  after = [np.array(a) for a in jax.tree_util.tree_leaves(nnx.state(m))]
  assert len(before) == len(after)
  for a, b in zip(before, after):
    np.testing.assert_array_equal(a, b)
  assert {p: id(mod) for p, mod in nnx.iter_modules(m)} == ids
  assert {p: type(mod) for p, mod in nnx.iter_modules(m)} == types
  assert type(m.blocks[1].fc1) is nnx.Linear and m.alias is m.shared
  np.testing.assert_array_equal(np.array(m(x)), y0)
  assert float(jnp.abs(new.blocks[1].fc1.kernel[...]).max()) == 0.0
  assert new.alias is new.shared and new is not m

  # A model whose forward pass advances RNG state: runs happen on copies.
  dm = models.build(models.DropMLP, 0)
  dbefore = _leaves(nnx.state(dm))
  for jit in (True, False):
    capture(dm, ("head",), x, jit=jit)
  memedit.layers.layer_covariance(dm, ("head",), [x], progress=False)
  memedit.layers.layer_covariance(dm, ("head",), [x], cache_dir=tmp_path, progress=False)
  dafter = _leaves(nnx.state(dm))
  assert len(dafter) == len(dbefore)
  for a, b in zip(dbefore, dafter):
    np.testing.assert_array_equal(a, b)

  lm = models.LMLP()
  lv = models.linen_init(lm, x)
  lbefore = jax.tree_util.tree_map(np.array, lv)
  lview = memory_view((lm, lv), ("LBlock_0", "fc1"), x)
  _, lnew = substitute((lm, lv), lview, jnp.zeros(lview.kernel_shape))
  capture((lm, lv), ("LBlock_0", "fc1"), x)
  jax.tree_util.tree_map(np.testing.assert_array_equal, lv, lbefore)
  assert float(jnp.abs(lnew["params"]["LBlock_0"]["fc1"]["kernel"]).max()) == 0.0


def test_einsum_layers_nnx_and_linen_insert_exactly():
  import flax.linen as nn

  x = jax.random.normal(jax.random.key(7), (2, 5, 6))
  nmod = nnx.Einsum("btd,dnh->btnh", (6, 2, 3), (2, 3), rngs=nnx.Rngs(0))
  lmod = nn.Einsum((6, 2, 3), "btd,dnh->btnh")
  for model in (nmod, (lmod, models.linen_init(lmod, x))):
    view = memory_view(model, (), x)
    assert (view.kind, view.in_ndim, view.key_dim, view.value_dim) == ("dense", 1, 6, 6)
    k = np.asarray(x, np.float64).reshape(-1, 6)
    C = k.T @ k / len(k)
    k_star = np.array([[1.0, -0.5, 0.2, 0.0, 0.3, 0.1]])
    v_star = np.arange(6.0).reshape(1, 2, 3)
    edit = insert_through_view(view, jnp.asarray(C, jnp.float32), k_star, v_star)
    k1 = view.kernel() + memedit.edit_delta(edit, view.kernel_shape)
    out = view.apply(k1, jnp.asarray(k_star, jnp.float32).reshape(1, 1, 6))
    assert _rel(out.reshape(-1), v_star.reshape(-1)) <= 1e-5
  with pytest.raises(ValueError, match="einsum string"):
    memory_view(nnx.Einsum("dnh,btd->btnh", (6, 2, 3), rngs=nnx.Rngs(0)), ())


def test_statistics_split_over_two_devices_match_one(tmp_path):
  import os
  import subprocess
  import sys
  import textwrap

  script = textwrap.dedent("""
      import jax, jax.numpy as jnp, numpy as np
      import memedit, models
      from memedit.layers import layer_covariance
      assert len(jax.devices()) == 2
      g = models.build(models.Generator, 0)
      zs = [jax.random.normal(jax.random.key(i), (4, 8)) for i in range(3)]
      a = memedit.second_moment(layer_covariance(g, ("mid",), zs, devices=1))
      b = memedit.second_moment(layer_covariance(g, ("mid",), zs, devices=2))
      print(float(jnp.linalg.norm(a - b) / jnp.linalg.norm(a)))
  """)
  here = os.path.dirname(os.path.abspath(__file__))
  root = os.path.dirname(os.path.dirname(os.path.dirname(here)))
  env = dict(os.environ,
             XLA_FLAGS=os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2",
             PYTHONPATH=os.pathsep.join([root, here]))
  out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                       cwd=tmp_path, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  assert float(out.stdout.strip().splitlines()[-1]) <= 1e-6


class _General(nnx.Module):
  """One nnx.LinearGeneral on inputs ``x`` of shape ``(N, *rest)``, called once."""

  def __init__(self, in_features, out_features, axis):
    self.lg = nnx.LinearGeneral(in_features, out_features, axis=axis, rngs=nnx.Rngs(3))

  def __call__(self, x):
    return self.lg(x)


# in_features, out_features, positive axis, its negative twin, input shape
POSITIVE_AXES = [
    (3, (2, 4), 2, -1, (5, 7, 3)),           # the last axis of a rank-3 input
    ((2, 3), 4, (1, 2), (-2, -1), (6, 2, 3)),  # two trailing axes
    (2, 3, 1, -2, (6, 2, 5)),                # an axis that is not the last
]


@pytest.mark.parametrize("in_f,out_f,axis,negative,shape", POSITIVE_AXES)
def test_linear_general_with_positive_axis_needs_no_example_inputs(in_f, out_f, axis,
                                                                   negative, shape):
  model = _General(in_f, out_f, axis)
  x = jax.random.normal(jax.random.key(1), shape)
  view = memory_view(model, "lg")  # no example inputs: the input rank is unknown
  twin = memory_view(_General(in_f, out_f, negative), "lg", x)
  assert (view.key_dim, view.value_dim) == (twin.key_dim, twin.value_dim)
  # One call's input gives the keys the layer contracts, as with a negative axis.
  c = capture(model, "lg", x, single=True)
  keys = view.keys(c.keys).reshape(-1, view.key_dim)
  np.testing.assert_allclose(keys, twin.keys(x).reshape(-1, view.key_dim), rtol=1e-6)
  # Flat keys back to inputs the layer runs on: its own output is W k + b.
  k = jax.random.normal(jax.random.key(2), (4, view.key_dim))
  native = view.native_keys(k)
  out = model.lg(native).reshape(4, -1)
  want = (np.asarray(k, np.float64) @ np.asarray(view.math_weight(), np.float64).T
          + np.asarray(model.lg.bias[...], np.float64).reshape(-1))
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(view.keys(native).reshape(4, -1), k, rtol=1e-6)
  # An exact insert through the view: the edited layer outputs the targets at the keys.
  n = min(2, view.key_dim - 1)  # independent keys
  C = jnp.eye(view.key_dim) + 0.1
  targets = jax.random.normal(jax.random.key(4), (n, view.value_dim))
  edit = insert_through_view(view, C, k[:n], targets)
  state, _ = memedit.apply_edit(nnx.state(model), edit)
  edited = nnx.merge(nnx.graphdef(model), state)
  np.testing.assert_allclose(edited.lg(view.native_keys(k[:n])).reshape(n, -1), targets,
                             rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(edited_forward(model, view, edit.lam, edit.D, x),
                             edited(x), rtol=1e-5, atol=1e-5)


def test_linear_general_with_positive_axis_refuses_stacked_inputs_without_examples():
  class Twice(nnx.Module):
    def __init__(self):
      self.lg = nnx.LinearGeneral(2, 3, axis=1, rngs=nnx.Rngs(0))

    def __call__(self, x):
      return self.lg(x) + self.lg(jnp.tanh(x))

  model, x = Twice(), jax.random.normal(jax.random.key(0), (5, 2, 4))
  stacked = capture(model, "lg", x).keys  # (2 calls, 5, 2, 4)
  with pytest.raises(ValueError, match=r"x: expected one call's input of layer \('lg',\), "
                     r"with the dims \(2,\) on its axes \(1,\).*got shape \(2, 5, 2, 4\); "
                     r".*make the view with example inputs"):
    memory_view(model, "lg").keys(stacked)
  keys = memory_view(model, "lg", x).keys(stacked)  # with examples: counted from the end
  want = np.stack([np.moveaxis(np.asarray(x), 1, -1), np.moveaxis(np.tanh(x), 1, -1)])
  np.testing.assert_allclose(keys, want, rtol=1e-6)
