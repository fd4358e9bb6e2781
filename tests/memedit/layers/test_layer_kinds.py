"""Static call flags, Linen attributes built at run time, weight gains and the kind
contract, string addresses, the eigenvalue floor and embeddings as memories."""

from __future__ import annotations

import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import memedit
from memedit.tree import get_leaf, replace_leaf
from memedit.layers import (capture, insert_through_view, layer_covariance, memory_view,
                            register_layer_kind)


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


X = jax.random.normal(jax.random.key(0), (5, 6))


# ------------------------------------------------------------------------ static flags


class FlagNet(nnx.Module):
  def __init__(self, *, rngs):
    self.fc = nnx.Linear(6, 8, rngs=rngs)
    self.head = nnx.Linear(8, 3, rngs=rngs)

  def __call__(self, x, train=False):
    h = jnp.tanh(self.fc(x))
    if train:
      h = 0.5 * h
    return self.head(h)


class LFlagNet(nn.Module):
  @nn.compact
  def __call__(self, x, deterministic=True):
    h = jnp.tanh(nn.Dense(8, name="fc")(x))
    if not deterministic:
      h = 0.5 * h
    return nn.Dense(3, name="head")(h)


def test_python_flags_pass_through_view_capture_and_statistics():
  m = FlagNet(rngs=nnx.Rngs(0))
  lm = LFlagNet()
  lv = lm.init(jax.random.key(0), X)
  h = {True: jnp.tanh(m.fc(X)), False: 0.5 * jnp.tanh(m.fc(X))}  # keys by "not train"
  lfc = lv["params"]["fc"]
  lh = {True: jnp.tanh(X @ lfc["kernel"] + lfc["bias"])}
  lh[False] = 0.5 * lh[True]
  for model, flag, ref in ((m, "train", {False: h[True], True: h[False]}),
                           ((lm, lv), "deterministic", {True: lh[True], False: lh[False]})):
    for value in (False, True):
      view = memory_view(model, "head", X, **{flag: value})
      assert view.key_dim == 8
      view = memory_view(model, "head", X, value)  # positionally
      for jit in (True, False):
        c = capture(model, "head", X, value, single=True, jit=jit)
        np.testing.assert_allclose(c.keys, ref[value], rtol=1e-6, atol=1e-6)
        c = capture(model, "head", X, single=True, jit=jit, **{flag: value})
        np.testing.assert_allclose(c.keys, ref[value], rtol=1e-6, atol=1e-6)
      st = layer_covariance(model, "head", [X], call_kwargs={flag: value})
      k = np.asarray(ref[value], np.float64)
      with pytest.warns(UserWarning, match="has rank at most"):  # 5 keys of dimension 8
        C = memedit.second_moment(st)
      assert _rel(C, k.T @ k / len(k)) <= 1e-6
    # A method given as a function, for NNX as for Linen.
    other = flag == "train"  # the non-default value of the flag
    c = capture(model, "head", X, method=lambda mod, x: mod(x, **{flag: other}), single=True)
    np.testing.assert_allclose(c.keys, ref[other], rtol=1e-6, atol=1e-6)
  # A flag given as an array is traced: the error names the fix.
  with pytest.raises(ValueError, match="call_kwargs"):
    capture(m, "head", X, jnp.array(True))
  with pytest.raises(ValueError, match="method: expected None, a method name or a function"):
    capture(m, "head", X, method=3)


# ------------------------------------------------ Linen attributes built in the parent


class OffsetDense(nn.Module):
  """y = x @ kernel + offset, with ``offset`` an array the parent computes at run time."""
  features: int
  offset: Any = None

  @nn.compact
  def __call__(self, x):
    k = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], self.features))
    return x @ k + self.offset


class LNoisy(nn.Module):
  @nn.compact
  def __call__(self, x):
    _, sub = jax.random.split(jax.random.key(7))
    off = jax.random.normal(sub, (3,))
    return OffsetDense(3, offset=off, name="fc")(jnp.tanh(nn.Dense(4, name="inp")(x)))


def test_linen_layer_with_an_array_attribute_built_by_its_parent():
  register_layer_kind(OffsetDense, kind="dense", in_ndim=1)
  lm = LNoisy()
  lv = lm.init(jax.random.key(0), X)
  view = memory_view((lm, lv), ("fc",), X)
  c = capture((lm, lv), ("fc",), X, single=True)
  np.testing.assert_allclose(view.apply(view.kernel(), c.keys), c.values, rtol=1e-6, atol=1e-6)
  k = np.asarray(c.keys, np.float64)
  C = jnp.asarray(k.T @ k / len(k) + 0.1 * np.eye(4), jnp.float32)
  k_star, v_star = c.keys[:1], jnp.array([[1.0, -2.0, 0.5]])
  edit = insert_through_view(view, C, k_star, v_star)
  new, hist = memedit.apply_edit(lv, edit)
  k1 = get_leaf(new, view.weight_path)
  assert _rel(view.apply(k1, k_star), v_star) <= 1e-5
  assert _rel(jax.jit(view.apply)(k1, k_star), v_star) <= 1e-5
  res = memedit.solve_lambda(view.apply, view.kernel(), edit.D, k_star, v_star,
                             loss="l2", optimizer="gauss_newton", steps=6)
  assert _rel(view.apply(view.kernel() + memedit.kernel_delta(
      res.lam, edit.D, view.kernel_shape), k_star), v_star) <= 1e-4
  back, _ = memedit.revert_edit(new, edit, hist)
  np.testing.assert_array_equal(get_leaf(back, view.weight_path), view.kernel())


# ---------------------------------------------------- weight gains and the contract


class EqualLinear(nnx.Module):
  """Equalised learning rate: y = x (g W) + b with g = 1/sqrt(fan_in)."""

  def __init__(self, i, o, *, rngs):
    self.w = nnx.Param(jax.random.normal(rngs.params(), (i, o)))
    self.b = nnx.Param(jnp.zeros((o,)))
    self.scale = 1.0 / np.sqrt(i)

  def __call__(self, x):
    return x @ (self.scale * self.w[...]) + self.b[...]


class UndeclaredEqualLinear(EqualLinear):
  pass


class TanhLinear(EqualLinear):
  def __call__(self, x):
    return jnp.tanh(x @ self.w[...])


class GainNet(nnx.Module):
  def __init__(self, layer_cls, *, rngs):
    self.inp = nnx.Linear(6, 8, rngs=rngs)
    self.eq = layer_cls(8, 3, rngs=rngs)

  def __call__(self, x):
    return self.eq(jnp.tanh(self.inp(x)))


def test_declared_weight_gain_gives_the_exact_target_and_the_contract_is_checked():
  register_layer_kind(EqualLinear, weight="w", kind="dense", gain=lambda m: m.scale)
  register_layer_kind(UndeclaredEqualLinear, weight="w", kind="dense")
  register_layer_kind(TanhLinear, weight="w", kind="dense")
  m = GainNet(EqualLinear, rngs=nnx.Rngs(0))
  view = memory_view(m, "eq")
  view.check_contract()
  c = capture(m, "eq", X, single=True)
  k = np.asarray(c.keys, np.float64)
  C = jnp.asarray(k.T @ k / len(k) + 0.1 * np.eye(8), jnp.float32)
  keep = np.asarray(c.keys[1:4], np.float64)
  q, _ = np.linalg.qr(np.linalg.solve(np.asarray(C, np.float64), keep.T))
  k_star = np.random.default_rng(0).normal(size=8)
  k_star = jnp.asarray(k_star - q @ (q.T @ k_star), jnp.float32)[None]
  v_star = jnp.array([[0.3, -1.0, 2.0]])
  edit = insert_through_view(view, C, k_star, v_star)
  gd, st = nnx.split(m)
  st1, hist = memedit.apply_edit(st, edit)
  new = nnx.merge(gd, st1)
  assert _rel(new.eq(k_star), v_star) <= 1e-5
  assert _rel(jax.jit(lambda s, x: nnx.merge(gd, s).eq(x))(st1, k_star), v_star) <= 1e-5
  assert _rel(new.eq(keep), m.eq(keep)) <= 1e-5
  back, _ = memedit.revert_edit(st1, edit, hist)
  np.testing.assert_array_equal(back["eq"]["w"][...], m.eq.w[...])

  undeclared = memory_view(GainNet(UndeclaredEqualLinear, rngs=nnx.Rngs(0)), "eq")
  with pytest.raises(ValueError, match=r"least-squares gain would be 0\.35.*gain=\.\.\."):
    insert_through_view(undeclared, C, k_star, v_star)
  with pytest.raises(ValueError, match="linear in its kernel"):
    memory_view(GainNet(TanhLinear, rngs=nnx.Rngs(0)), "eq").check_contract()
  with pytest.raises(ValueError, match="gain: expected a finite non-zero number"):
    register_layer_kind(TanhLinear, weight="w", gain=0.0)


def test_bfloat16_layers_pass_the_contract_at_their_own_precision():
  rng = np.random.default_rng(2)
  k_star = jnp.asarray(rng.normal(size=(1, 8)), jnp.float32)
  v_star = jnp.array([[0.5, -1.0, 0.25]])
  for dtype, param_dtype in ((jnp.bfloat16, jnp.bfloat16), (jnp.bfloat16, jnp.float32),
                             (jnp.float32, jnp.bfloat16)):
    lin = nnx.Linear(8, 3, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0))
    view = memory_view(lin, ())
    view.check_contract()  # bfloat16 rounding is within 4 ulps of bfloat16
    with pytest.raises(ValueError, match="linear in its kernel"):
      view.check_contract(rtol=1e-4)  # float32's tolerance is finer than bfloat16 holds
    edit = insert_through_view(view, jnp.eye(8), k_star, v_star)
    gd, st = nnx.split(lin)
    st1, _ = memedit.apply_edit(st, edit)
    got = nnx.merge(gd, st1)(k_star.astype(dtype))
    assert got.dtype == dtype and st1["kernel"][...].dtype == param_dtype
    assert _rel(got.astype(jnp.float32), v_star) <= 3e-2
  # A layer that is not linear in its kernel is still refused at bfloat16's tolerance.
  register_layer_kind(TanhLinear, weight="w", kind="dense")
  tanh = TanhLinear(8, 3, rngs=nnx.Rngs(0))
  tanh.w[...] = tanh.w[...].astype(jnp.bfloat16)
  with pytest.raises(ValueError, match="linear in its kernel"):
    memory_view(tanh, ()).check_contract()


def test_hostile_inputs_get_errors_naming_what_was_expected():
  m = nnx.Sequential(nnx.Linear(3, 6, rngs=nnx.Rngs(0)), nnx.relu,
                     nnx.Linear(6, 4, rngs=nnx.Rngs(1)))
  view = memory_view(m, "layers/2")
  with pytest.raises(ValueError, match=r"values: expected one row per key, got keys of "
                                       r"shape \(1, 6\) and values of shape \(2, 4\)"):
    insert_through_view(view, jnp.eye(6), jnp.ones((1, 6)), jnp.ones((2, 4)))
  with pytest.raises(ValueError, match=r"keys: expected flat keys \(1, 6\) or the layer's "
                                       r"native inputs, got shape \(1, 5\)"):
    insert_through_view(view, jnp.eye(6), jnp.ones((1, 5)), jnp.ones((1, 4)))
  # An index into a list of layers that holds no layer with parameters there.
  for index in (7, 1):  # past the end; nnx.relu
    with pytest.raises(ValueError, match=rf"no layer at \('layers', {index}\); valid paths "
                                         r"near it: 'layers/2', 'layers/0'"):
      memory_view(m, f"layers/{index}")
  with pytest.raises(ValueError, match=r"inputs: expected \(inputs, mask\) pairs"):
    layer_covariance(m, "layers/2", [jnp.ones((2, 3))], masked=True)
  with pytest.raises(ValueError, match=r"keys: expected a real dtype \(floating, integer or "
                     r"boolean\), got complex64"):
    memedit.stream_covariance([jnp.ones((4, 2)) * (1 + 1j)], progress=False)
  # An edit of one layer of a stack applied to a leaf that is not stacked that way.
  edit = memedit.make_edit(("k",), jnp.ones((4, 1)), jnp.ones((1, 6)), index=3)
  with pytest.raises(ValueError, match=r"index: expected a leaf stacked over a leading "
                                       r"layer axis.*got the leaf \(6, 4\)"):
    memedit.apply_edit({"k": jnp.ones((6, 4))}, edit)


# ------------------------------------------------------------------- string addresses


class Dotted(nnx.Module):
  def __init__(self, *, rngs):
    setattr(self, "blocks.2", nnx.Linear(6, 4, rngs=rngs))
    self.head = nnx.Linear(4, 2, rngs=rngs)

  def __call__(self, x):
    return self.head(getattr(self, "blocks.2")(x))


def test_string_addresses_with_dotted_names_and_valid_suggestions():
  m = Dotted(rngs=nnx.Rngs(0))
  for address in ("blocks.2", "blocks\\.2", ("blocks.2",)):
    view = memory_view(m, address)
    assert view.weight_path == ("blocks.2", "kernel")
  c = capture(m, "blocks\\.2", X, single=True)
  np.testing.assert_array_equal(c.keys, X)
  with pytest.raises(ValueError) as err:
    memory_view(m, "blocks.3")
  suggested = re.findall(r"'((?:[^'\\]|\\.)*)'", str(err.value).split("near it:")[1])
  suggested = [s.encode().decode("unicode_escape") for s in suggested]
  assert "blocks\\.2" in suggested
  for s in suggested:  # every suggestion is a valid address
    memory_view(m, s)


# ---------------------------------------------------------------- eigenvalue floor


def test_floor_zero_keeps_c_orthogonal_keys_exactly_on_an_ill_conditioned_c():
  lin = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
  view = memory_view(lin, ())
  C = np.diag([1.0, 1e-2, 1e-5, 1e-8])
  rng = np.random.default_rng(1)
  k_star = rng.normal(size=4)
  keep = rng.normal(size=(2, 4))
  d = np.linalg.solve(C, k_star)
  keep -= np.outer(keep @ d, d) / (d @ d)  # keep ⟂ C⁻¹k*
  v_star = jnp.array([[1.0, 2.0, 3.0]])
  out = lambda e, k: view.apply(view.kernel() + memedit.edit_delta(e, view.kernel_shape),
                                jnp.asarray(k, jnp.float32))
  y0 = view.apply(view.kernel(), jnp.asarray(keep, jnp.float32))
  exact = insert_through_view(view, jnp.asarray(C, jnp.float32), k_star[None], v_star, floor=0)
  assert _rel(out(exact, k_star[None]), v_star) <= 1e-5
  assert _rel(out(exact, keep), y0) <= 1e-6
  floored = insert_through_view(view, jnp.asarray(C, jnp.float32), k_star[None], v_star)
  assert floored.settings["floor"] == 1e-6
  assert _rel(out(floored, keep), y0) > 1e-3  # the default floor changes the inverse
  with pytest.raises(ValueError, match=r"floor: expected a number in \[0, 1\)"):
    insert_through_view(view, jnp.asarray(C, jnp.float32), k_star[None], v_star, floor=-1.0)


# ------------------------------------------------------------------------ embeddings


class EmbedNet(nnx.Module):
  def __init__(self, *, rngs):
    self.embed = nnx.Embed(11, 6, rngs=rngs)
    self.out = nnx.Linear(6, 3, rngs=rngs)

  def __call__(self, tokens):
    return self.out(jnp.tanh(self.embed(tokens)))


class LEmbedNet(nn.Module):
  @nn.compact
  def __call__(self, tokens):
    return nn.Dense(3, name="out")(jnp.tanh(nn.Embed(11, 6, name="embed")(tokens)))


def test_embeddings_are_exact_memories_of_one_hot_keys():
  toks = jax.random.randint(jax.random.key(1), (4, 5), 0, 11)
  toks = jnp.where(toks == 3, 4, toks)  # token 3 is the one rewritten
  lm = LEmbedNet()
  for model in (EmbedNet(rngs=nnx.Rngs(0)), (lm, lm.init(jax.random.key(0), toks))):
    view = memory_view(model, "embed", toks)
    assert (view.key_dim, view.value_dim, view.weight_path[-1]) == (11, 6, "embedding")
    c = capture(model, "embed", toks, single=True)
    np.testing.assert_array_equal(c.values, view.kernel()[toks])
    keys = view.keys(c.keys)
    assert keys.shape == (4, 5, 11)
    np.testing.assert_array_equal(keys @ view.kernel(), c.values)
    st = layer_covariance(model, "embed", [toks[:2], toks[2:]])
    counts = np.bincount(np.asarray(toks).reshape(-1), minlength=11)
    np.testing.assert_allclose(memedit.second_moment(st), np.diag(counts / counts.sum()),
                               rtol=1e-6, atol=1e-7)
    C = memedit.second_moment(st)
    v_star = jnp.array([[0.5, -0.5, 1.0, 0.0, 2.0, -1.0]])
    edit = insert_through_view(view, C, jnp.array([3]), v_star)
    if isinstance(model, nnx.Module):
      gd, params = nnx.split(model)
      run = lambda p, t: nnx.merge(gd, p)(t)
    else:
      params, run = model[1], model[0].apply
    new, hist = memedit.apply_edit(params, edit)
    e1 = get_leaf(new, view.weight_path)
    np.testing.assert_allclose(e1[3], v_star[0], rtol=1e-6, atol=1e-6)
    others = np.arange(11) != 3
    np.testing.assert_allclose(e1[others], view.kernel()[others], rtol=0, atol=1e-6)
    for f in (run, jax.jit(run)):
      np.testing.assert_allclose(f(new, toks), f(params, toks), rtol=0, atol=1e-6)
      by_hand = replace_leaf(params, view.weight_path, view.kernel().at[3].set(v_star[0]))
      np.testing.assert_allclose(f(new, jnp.array([[3]])), run(by_hand, jnp.array([[3]])),
                                 rtol=1e-5, atol=1e-6)
    # One-hot rows are accepted as keys too; other vectors are refused.
    edit2 = insert_through_view(view, C, jax.nn.one_hot(jnp.array([3]), 11), v_star)
    np.testing.assert_allclose(edit2.lam, edit.lam, rtol=1e-6)
    with pytest.raises(ValueError, match="one-hot rows"):
      insert_through_view(view, C, jnp.full((1, 11), 0.5), v_star)
    back, _ = memedit.revert_edit(new, edit, hist)
    np.testing.assert_array_equal(get_leaf(back, view.weight_path), view.kernel())
  with pytest.raises(ValueError, match="normalisation layer"):
    memory_view(nnx.LayerNorm(4, rngs=nnx.Rngs(0)), ())


def test_token_ids_outside_an_embeddings_table_are_refused():
  toks = jnp.array([[1, 2, 3], [4, 5, 6]])
  lm = LEmbedNet()
  for model in (EmbedNet(rngs=nnx.Rngs(0)), (lm, lm.init(jax.random.key(0), toks))):
    view = memory_view(model, "embed", toks)
    v_star = jnp.zeros((1, 6))
    # Eagerly, before any work: the layer would read a NaN row (11) or wrap around (-1).
    for bad, got in (([11], "11"), ([-1], "-1"), ([3, 11, -2, 11], "-2, 11")):
      with pytest.raises(ValueError, match=rf"^token ids: expected integers 0 <= id < 11 "
                                           rf"\(the embedding's num_embeddings\), got {got}$"):
        insert_through_view(view, jnp.eye(11), jnp.array(bad), jnp.zeros((len(bad), 6)))
      with pytest.raises(ValueError, match=rf"expected integers 0 <= id < 11.*got {got}$"):
        view.keys(jnp.array(bad))
    with pytest.raises(ValueError, match="expected integer token ids, got dtype float32"):
      insert_through_view(view, jnp.eye(11), jnp.array([3.0]), v_star)
    # Statistics: ids out of range come out of the compiled key function as NaN keys, which
    # are never folded; layer_covariance says why instead of returning C of the others.
    with pytest.raises(ValueError, match=r"token ids: expected integers 0 <= id < 11 .* at "
                                         r"layer \('embed',\), got 2 id\(s\) out of that range"):
      layer_covariance(model, "embed", [toks, jnp.array([[1, 11, 2], [-1, 3, 4]])])
    # A masked-out id is no key (weight 0), so it is not refused.
    st = layer_covariance(model, "embed", [(jnp.array([[1, 2, -1], [4, 5, 6]]),
                                            jnp.array([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]]))],
                          masked=True)
    assert memedit.key_count(st) == 5
    # capture records what the layer read and returned (flax wraps -1 to the last row);
    # its keys enter the memory only through view.keys, which refuses them.
    c = capture(model, view, jnp.array([[1, -1, 2]]), single=True)
    np.testing.assert_array_equal(c.keys, [[1, -1, 2]])
    np.testing.assert_array_equal(c.values[0, 1], view.kernel()[10])
    with pytest.raises(ValueError, match="got -1$"):
      view.keys(c.keys)


# ------------------------------------------------------- DenseGeneral axes, refusals


class LReversedGeneral(nn.Module):
  """A DenseGeneral given its axes out of order: Flax sorts them, kernel (4a, 4b, 3)."""

  @nn.compact
  def __call__(self, x):  # (B, 4, 4)
    return nn.DenseGeneral(3, axis=(-1, -2), name="g")(x)


class LSharedPositiveAxis(nn.Module):
  """A DenseGeneral over a positive axis, called twice (its captures stack on axis 0)."""

  @nn.compact
  def __call__(self, x):  # (B, 5, 2)
    g = nn.DenseGeneral(5, axis=1, name="g")
    return g(jnp.swapaxes(jnp.tanh(g(x)), 1, 2))


def test_dense_general_keys_follow_flax_sorted_axes_and_inserts_are_exact():
  xs = jax.random.normal(jax.random.key(1), (32, 4, 4))
  m = LReversedGeneral()
  var = m.init(jax.random.key(0), xs)
  view = memory_view((m, var), "g", xs)
  assert view.key_axes == (-2, -1)
  p = {k: np.asarray(v, np.float64) for k, v in var["params"]["g"].items()}
  k64 = np.asarray(xs, np.float64).reshape(32, 16)  # Flax: x[b, i, j] * kernel[i, j, o]
  w0 = p["kernel"].reshape(16, 3).T
  c = capture((m, var), "g", xs, single=True)
  np.testing.assert_allclose(np.asarray(view.keys(c.keys)).reshape(32, 16), k64, rtol=1e-6)
  np.testing.assert_allclose(k64 @ w0.T + p["bias"], c.values, rtol=1e-5, atol=1e-5)
  C = k64.T @ k64 / 32 + 0.1 * np.eye(16)
  k_star, v_star = k64[:1], np.array([[1.0, -2.0, 0.5]])
  edit = insert_through_view(view, jnp.asarray(C, jnp.float32), xs[:1], v_star)
  new, hist = memedit.apply_edit(var, edit)
  w1 = np.asarray(new["params"]["g"]["kernel"], np.float64).reshape(16, 3).T
  assert _rel(k_star @ w1.T + p["bias"], v_star) < 1e-5
  np.testing.assert_allclose(m.apply(new, xs[:1]), v_star, rtol=1e-4, atol=1e-5)
  u = np.random.default_rng(0).normal(size=(1, 16))
  d = np.linalg.solve(C, k_star[0])
  u -= np.outer(u @ d, d) / (d @ d)  # uᵀ C⁻¹ k* = 0
  assert float(np.abs(u @ (w1 - w0).T).max()) < 1e-5 * float(np.abs(u @ w0.T).max())
  back, _ = memedit.revert_edit(new, edit, hist)
  np.testing.assert_array_equal(back["params"]["g"]["kernel"], var["params"]["g"]["kernel"])

  # A positive axis stays the layer's when captures carry a leading call axis.
  x2 = jax.random.normal(jax.random.key(2), (3, 5, 2))
  m2 = LSharedPositiveAxis()
  var2 = m2.init(jax.random.key(0), x2)
  view2 = memory_view((m2, var2), "g", x2)
  c2 = capture((m2, var2), "g", x2)
  assert c2.keys.shape == (2, 3, 5, 2) and view2.keys(c2.keys).shape == (2, 3, 2, 5)
  kern = np.asarray(var2["params"]["g"]["kernel"], np.float64)
  np.testing.assert_allclose(
      np.asarray(view2.keys(c2.keys), np.float64) @ kern + np.asarray(var2["params"]["g"]["bias"]),
      c2.values, rtol=1e-5, atol=1e-5)


def test_batched_general_layers_and_masked_convs_are_refused_naming_what_they_got():
  x = jnp.ones((4, 3, 5))

  class LBatched(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.DenseGeneral(4, axis=-1, batch_dims=(0,), name="g")(x)

  class LMasked(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Conv(4, (3,), mask=jnp.ones((3, 5, 4)), name="g")(x)

  for mod, text in ((LBatched(), r"expected batch_dims=\(\).*got batch_dims=\(0,\)"),
                    (LMasked(), r"expected an unmasked kernel.*got a mask of shape \(3, 5, 4\)")):
    var = mod.init(jax.random.key(0), x)
    with pytest.raises(ValueError, match=text):
      memory_view((mod, var), "g", x)
  lg = nnx.LinearGeneral(5, 4, axis=-1, batch_axis={0: 4}, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"expected no batch_axis.*got batch_axis=\{0: 4\}"):
    memory_view(nnx.Sequential(lg), "layers/0")
