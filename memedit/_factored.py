"""A layer's function of Λ with its linear uses of the kernel split into K0's part and ΔK's.

The Λ solve evaluates v(Λ) = f(K0 + ΔK(Λ, D), keys) at every step. Wherever f contracts
the kernel with the keys (a ``dot_general`` or an ungrouped convolution over the kernel's
key axes), linearity gives

    contract(keys, T(K0 + ΔK)) = contract(keys, T(K0)) + contract(keys·Dᵀ, T_r(L(Λ)))

for T a chain of structural linear maps (scalings, dtype casts, reversals, transposes and
reshapes that keep the key axes together), with L(Λ) the kernel's layout whose key axes
are one axis of length r, and ΔK[…, i, …] = Σ_d L[…, d, …] D[d, i]. The first term does
not depend on Λ: it is computed once, before the solve's loop. The second costs r/d of
the full contraction. Any other use of the kernel (e.g. StyleGAN2's demodulation, which
squares it) sees the full K0 + ΔK(Λ, D), formed as before. The function computed is the
same (up to float rounding); only its cost changes: a step of a rank-1 solve on a
512-channel 3×3 convolution does O(pixels · 9 · 512) work instead of O(pixels · 9 · 512²).

:func:`factored_forward` is called once inside the compiled solve, outside its loop (its
Λ-independent values are then loop constants), and returns the per-step function of Λ.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend import core as jcore

from memedit._convs import bind_eqn, eval_jaxpr

__all__ = ["factored_forward"]

HIGHEST = lax.Precision.HIGHEST


class _Op(NamedTuple):
  """One structural linear map of the kernel: ``prim`` with the kernel at ``pos`` among
  ``operands`` (the others known), with params for the kernel and for its r-form."""
  prim: Any
  kparams: dict
  lparams: dict
  operands: tuple
  pos: int


class _Kern(NamedTuple):
  """T(K0 + ΔK): the kernel through the maps ``ops``; ``base`` = T(K0) (known), ``kaxes``
  the (contiguous, ordered) axes of the key index in T's output."""
  base: Any
  kaxes: tuple
  ops: tuple


_DEFERRED = object()  # a value that depends on Λ other than through a _Kern


def _r_axis(kaxes, j):
  """The axis of the r-form holding axis j of the kernel form (j not a key axis)."""
  return j if j < kaxes[0] else j - len(kaxes) + 1


def _structural(eqn, kern: _Kern, invals, pos):
  """The _Kern after ``eqn`` (a structural linear map of ``kern``), or None."""
  name = eqn.primitive.name
  params = dict(eqn.params)
  shape = tuple(np.shape(kern.base))
  kaxes = kern.kaxes
  others = [v for i, v in enumerate(invals) if i != pos]
  if any(isinstance(v, _Kern) or v is _DEFERRED for v in others):
    return None
  lparams = params
  if name in ("mul", "div"):
    if name == "div" and pos != 0:
      return None
    if any(np.ndim(v) != 0 for v in others):
      return None
    new_kaxes = kaxes
  elif name in ("neg", "copy", "copy_p"):
    new_kaxes = kaxes
  elif name == "convert_element_type":
    if not jnp.issubdtype(params["new_dtype"], jnp.floating):
      return None
    new_kaxes = kaxes
  elif name == "rev":
    dims = tuple(params["dimensions"])
    if set(dims) & set(kaxes):
      return None
    lparams = dict(params, dimensions=tuple(_r_axis(kaxes, j) for j in dims))
    new_kaxes = kaxes
  elif name == "transpose":
    perm = tuple(params["permutation"])
    out_pos = [perm.index(k) for k in kaxes]
    if out_pos != list(range(out_pos[0], out_pos[0] + len(kaxes))):
      return None
    lperm = []
    for p in perm:
      if p == kaxes[0]:
        lperm.append(kaxes[0])
      elif p not in kaxes:
        lperm.append(_r_axis(kaxes, p))
    lparams = dict(params, permutation=tuple(lperm))
    new_kaxes = tuple(out_pos)
  elif name == "reshape":
    if params.get("dimensions") is not None:
      return None
    new = tuple(int(s) for s in params["new_sizes"])
    pre = math.prod(shape[:kaxes[0]])
    d = math.prod(shape[k] for k in kaxes)
    found = None
    for a in range(len(new)):
      if math.prod(new[:a]) != pre or new[a] == 1:
        continue
      for b in range(a + 1, len(new) + 1):
        if math.prod(new[a:b]) == d:
          found = (a, b)
          break
        if math.prod(new[a:b]) > d:
          break
      if found:
        break
    if found is None:
      return None
    a, b = found
    lparams = dict(params, new_sizes=new[:a] + (-1,) + new[b:])
    new_kaxes = tuple(range(a, b))
  else:
    return None
  base = bind_eqn(eqn, [kern.base if i == pos else v for i, v in enumerate(invals)])[0]
  operands = tuple(None if i == pos else v for i, v in enumerate(invals))
  return _Kern(base, new_kaxes, kern.ops + (_Op(eqn.primitive, params, lparams, operands,
                                                 pos),))


def _replay(ops, x, rform: bool = False):
  """T(x): the maps ``ops`` applied to x in the kernel's form, or (``rform``) to x in the
  r-form, whose reshapes get their r axis (the -1) from x's size."""
  for op in ops:
    params = op.lparams if rform else op.kparams
    if rform and op.prim.name == "reshape" and -1 in params["new_sizes"]:
      sizes = list(params["new_sizes"])
      sizes[sizes.index(-1)] = int(np.size(x)) // math.prod(s for s in sizes if s != -1)
      params = dict(params, new_sizes=tuple(sizes))
    args = list(op.operands)
    args[op.pos] = x
    x = op.prim.bind(*args, **params)
  return x


def _project(x, dims, D):
  """x·Dᵀ: x's axes ``dims`` (in the key index's row-major order) contracted with D (r, d);
  the other axes keep their order and the axis of length r comes last."""
  rest = [a for a in range(np.ndim(x)) if a not in dims]
  xt = jnp.transpose(x, rest + list(dims))
  xt = xt.reshape(xt.shape[:len(rest)] + (-1,))
  out = jnp.einsum("...i,di->...d", xt, D.astype(jnp.result_type(x, D)), precision=HIGHEST)
  return out.astype(jnp.result_type(x))


def _split(eqn, invals, D):
  """(known part, r-form recipe) when ``eqn`` contracts a _Kern with known keys over its
  key axes, else None."""
  name = eqn.primitive.name
  params = dict(eqn.params)
  if name == "dot_general":
    (lc, rc), (lb, rb) = params["dimension_numbers"]
    if lb or rb:
      return None
    kinds = [isinstance(v, _Kern) for v in invals]
    if kinds.count(True) != 1 or any(v is _DEFERRED for v in invals):
      return None
    pos = kinds.index(True)
    kern, other = invals[pos], invals[1 - pos]
    kc, oc = (lc, rc) if pos == 0 else (rc, lc)
    if sorted(kc) != list(kern.kaxes):
      return None
    odims = [o for _, o in sorted(zip(kc, oc))]
    known = bind_eqn(eqn, [kern.base, other] if pos == 0 else [other, kern.base])[0]
    xd = _project(other, odims, D)  # (other's free axes, r)
    r_axis = kern.kaxes[0]
    last = xd.ndim - 1
    dn = (((r_axis,), (last,)), ((), ())) if pos == 0 else (((last,), (r_axis,)), ((), ()))
    return known, ("dot", pos, xd, dict(params, dimension_numbers=dn), kern.ops)
  if name == "conv_general_dilated":
    lhs, rhs = invals
    if not isinstance(rhs, _Kern) or isinstance(lhs, _Kern) or lhs is _DEFERRED:
      return None
    if params["feature_group_count"] != 1 or params["batch_group_count"] != 1:
      return None
    lhs_spec, rhs_spec, _ = params["dimension_numbers"]
    if tuple(rhs.kaxes) != (rhs_spec[1],):
      return None
    known = bind_eqn(eqn, [lhs, rhs.base])[0]
    xd = jnp.moveaxis(_project(lhs, [lhs_spec[1]], D), -1, lhs_spec[1])
    return known, ("conv", 1, xd, params, rhs.ops)
  return None


def _initial_kaxes(kshape, kind, in_ndim):
  if kind == "matrix":
    return (1,)
  if kind == "conv":
    return (len(kshape) - 2,)
  return tuple(range(in_ndim))


def _lam_rform(lam, kshape, kind, in_ndim, dtype):
  """L(Λ): the kernel's layout with its key axes as one axis of length r."""
  lam = lam.astype(dtype)
  if kind == "matrix":
    return lam
  if kind == "conv":
    return jnp.swapaxes(lam, -1, -2)
  return lam.T.reshape((lam.shape[1],) + tuple(kshape[in_ndim:]))


def factored_forward(f: Callable, kernel0, D, keys, kind: str, in_ndim: int, *,
                     delta: Callable[[jax.Array], jax.Array], patch: bool = False
                     ) -> Callable[[jax.Array], Any]:
  """Λ ↦ f(K0 + ΔK(Λ, D), keys), with the Λ-independent work done now.

  Args:
    f: pure (kernel, keys) → pytree of arrays.
    kernel0: K0. D: (r, d). keys: f's keys (any pytree).
    kind, in_ndim: the kernel layout (:mod:`memedit.layouts`).
    delta: Λ ↦ ΔK(Λ, D) in the kernel's layout and dtype (for the uses of the kernel that
      are not split).
    patch: compute the convolutions left in the per-step function as patch matmuls.

  Returns:
    The per-step function of Λ (any Λ already masked), returning f's output pytree.
  """
  leaves, treedef = jax.tree_util.tree_flatten(keys)
  closed, out_shape = jax.make_jaxpr(lambda k, *ls: f(k, jax.tree_util.tree_unflatten(
      treedef, ls)), return_shape=True)(kernel0, *leaves)
  flat = jax.make_jaxpr(lambda *a: eval_jaxpr(closed.jaxpr, closed.consts, *a,
                                              patch=False))(kernel0, *leaves)
  jaxpr = flat.jaxpr
  env: dict = {}

  def read(v):
    return v.val if isinstance(v, jcore.Literal) else env[v]

  for v, c in zip(jaxpr.constvars, flat.consts):
    env[v] = c
  env[jaxpr.invars[0]] = _Kern(kernel0, _initial_kaxes(kernel0.shape, kind, in_ndim), ())
  for v, a in zip(jaxpr.invars[1:], leaves):
    env[v] = a
  splits: dict[int, tuple] = {}
  for i, eqn in enumerate(jaxpr.eqns):
    invals = [read(v) for v in eqn.invars]
    kerns = [j for j, v in enumerate(invals) if isinstance(v, _Kern)]
    deferred = any(v is _DEFERRED for v in invals)
    outs = None
    if not kerns and not deferred:
      outs = bind_eqn(eqn, invals)
    elif len(kerns) == 1 and not deferred:
      new = _structural(eqn, invals[kerns[0]], invals, kerns[0])
      if new is not None:
        outs = [new]
      else:
        split = _split(eqn, invals, D)
        if split is not None:
          splits[i] = split
    if outs is None:
      outs = [_DEFERRED] * len(eqn.outvars)
    for v, o in zip(eqn.outvars, outs):
      if not isinstance(v, jcore.DropVar):
        env[v] = o
  kshape = tuple(kernel0.shape)

  def forward(lam):
    step: dict = {}
    full = []  # K0 + ΔK(Λ, D), formed once if some use of the kernel needs it

    def value(v):
      if isinstance(v, jcore.Literal):
        return v.val
      x = step[v] if v in step else env[v]
      if isinstance(x, _Kern):
        if not full:
          full.append(kernel0 + delta(lam))
        return _replay(x.ops, full[0])
      return x

    L = _lam_rform(lam, kshape, kind, in_ndim, kernel0.dtype)
    for i, eqn in enumerate(jaxpr.eqns):
      if not any(isinstance(v, jcore.Var) and env.get(v) is _DEFERRED for v in eqn.outvars):
        continue
      if i in splits:
        base, (form, pos, xd, params, ops) = splits[i]
        lr = _replay(ops, L, rform=True)
        if form == "dot":
          low = lax.dot_general(*((lr, xd) if pos == 0 else (xd, lr)),
                                params["dimension_numbers"], precision=params["precision"],
                                preferred_element_type=params["preferred_element_type"])
        else:
          low = bind_eqn(eqn, [xd, lr], patch)[0]
        outs = [base + low.astype(base.dtype)]
      else:
        outs = bind_eqn(eqn, [value(v) for v in eqn.invars], patch)
      for v, o in zip(eqn.outvars, outs):
        if not isinstance(v, jcore.DropVar):
          step[v] = o
    outs = [value(v) for v in jaxpr.outvars]
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(out_shape), outs)

  return forward
