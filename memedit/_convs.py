"""Convolutions as patch matmuls, for solves that loop on XLA:CPU.

Inside a compiled loop (``lax.scan`` / ``while``), XLA:CPU runs the kernel-gradient
("backward filter") convolution on a slow path: measured here 20–35× slower than the same
convolution outside a loop. The Λ solve differentiates a layer with respect to its kernel
at every step, so on the CPU :func:`conv_as_matmul` re-expresses every convolution of the
layer's function as patches (taken once from the keys) times the reshaped kernel, whose
kernel gradient is a plain matrix product. The function computed is the same.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend import core as jcore

from memedit.layers.conv import extract_patches

__all__ = ["bind_eqn", "conv_as_matmul", "eval_jaxpr", "is_patchable", "patched"]


def _conv_by_patches(lhs, rhs, *, window_strides, padding, lhs_dilation, rhs_dilation,
                     dimension_numbers, feature_group_count, batch_group_count, precision,
                     preferred_element_type, **unused):
  del unused, feature_group_count, batch_group_count  # both 1 here
  lhs_spec, rhs_spec, out_spec = dimension_numbers
  n = len(lhs_spec) - 2
  x = jnp.transpose(lhs, (lhs_spec[0],) + tuple(lhs_spec[2:]) + (lhs_spec[1],))  # (N, *sp, C)
  w = jnp.transpose(rhs, tuple(rhs_spec[2:]) + (rhs_spec[1], rhs_spec[0]))  # (*window, I, O)
  patches = extract_patches(x, w.shape[:n], strides=window_strides, padding=padding,
                            lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation)
  out = lax.dot_general(patches, w.reshape(-1, w.shape[-1]),
                        (((patches.ndim - 1,), (0,)), ((), ())), precision=precision,
                        preferred_element_type=preferred_element_type)  # (N, *out, O)
  out = jnp.transpose(out, (0, n + 1) + tuple(range(1, n + 1)))  # (N, O, *out)
  return jnp.transpose(out, np.argsort(out_spec)).astype(
      preferred_element_type or jnp.result_type(lhs, rhs))


def is_patchable(eqn) -> bool:
  """Whether ``eqn`` is a convolution :func:`conv_as_matmul` computes as a patch matmul."""
  return (eqn.primitive.name == "conv_general_dilated"
          and eqn.params["feature_group_count"] == 1 and eqn.params["batch_group_count"] == 1)


def bind_eqn(eqn, invals, patch: bool = False) -> list:
  """Evaluates one equation on ``invals`` (a patchable convolution as patches × kernel
  when ``patch``); returns its outputs as a list."""
  if patch and is_patchable(eqn):
    return [_conv_by_patches(*invals, **eqn.params)]
  outs = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(eqn.params))
  return list(outs) if eqn.primitive.multiple_results else [outs]


def eval_jaxpr(jaxpr, consts, *args, patch: bool = True) -> list:
  """Evaluates ``jaxpr`` with nested ``jit`` calls inlined (and convolutions as patch
  matmuls when ``patch``); traced under ``jax.make_jaxpr`` it gives a flat jaxpr."""
  env = {}

  def read(v):
    return v.val if isinstance(v, jcore.Literal) else env[v]

  for v, c in zip(jaxpr.constvars, consts):
    env[v] = c
  for v, a in zip(jaxpr.invars, args):
    env[v] = a
  for eqn in jaxpr.eqns:
    invals = [read(v) for v in eqn.invars]
    if eqn.primitive.name in ("pjit", "jit", "closed_call", "core_call"):
      inner = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
      if isinstance(inner, jcore.ClosedJaxpr):
        outs = eval_jaxpr(inner.jaxpr, inner.consts, *invals, patch=patch)
      else:
        outs = eval_jaxpr(inner, (), *invals, patch=patch)
    else:
      outs = bind_eqn(eqn, invals, patch)
    for v, o in zip(eqn.outvars, outs):
      if not isinstance(v, jcore.DropVar):
        env[v] = o
  return [read(v) for v in jaxpr.outvars]


@functools.lru_cache(maxsize=128)
def patched(f):
  """:func:`conv_as_matmul` of ``f``, cached so that the same f keeps one compiled
  program."""
  return conv_as_matmul(f)


def conv_as_matmul(f):
  """``f`` with every (ungrouped) convolution computed as patches × reshaped kernel.

  Args:
    f: a pure function of arrays (pytrees allowed).

  Returns:
    A function computing the same values; its kernel gradients are matrix products.
  """

  @functools.wraps(f)
  def wrapped(*args):
    closed, out_shape = jax.make_jaxpr(f, return_shape=True)(*args)
    outs = eval_jaxpr(closed.jaxpr, closed.consts, *jax.tree_util.tree_leaves(args))
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(out_shape), outs)

  return wrapped
