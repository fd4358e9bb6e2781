"""The crop problem in the coordinates of the edit subspace: keys projected onto D.

An insert changes the kernel only along D, ΔK(Λ, D) = Λ D on the key axis. For a layer
that is affine in its kernel and contracts the kernel's key axis with the key channels
(a convolution, a transposed convolution, a dense layer), the output change depends on
the keys only through their projections D k:

  f(K0 + ΔK(Λ, D), x) = f(K0, x) + [f(Λ̃, x Dᵀ) − f(0, x Dᵀ)],

where Λ̃ = ΔK(Λ, I_r) is Λ laid out as a kernel with r key channels. The right-hand side
is the same function of Λ, computed on r channels instead of C_in: for the rank-1 edits
of the workflow a C_in-fold smaller contraction in every Jacobian product of the solve
(e.g. 256-fold for DCGAN's convt2). :func:`subspace_problem` builds it and checks on a
random Λ that it equals the layer's own function; a layer for which it does not (e.g.
StyleGAN2's modulated convolution, whose demodulation is not affine in the kernel) keeps
the full problem.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from memedit.generators.crop import LayerOnCrop
from memedit.layouts import kernel_delta, lambda_shape

__all__ = ["ProjectedLayer", "SubspaceProblem", "subspace_problem"]

HIGHEST = lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class ProjectedLayer:
  """``f_D(K̃, (x Dᵀ, layer_params, extra, offset)) = offset + f(K̃, (x Dᵀ, layer_params,
  extra))``: a :class:`memedit.generators.LayerOnCrop` run on keys projected onto D.

  Attributes:
    f: the layer on its crop; K̃ is its kernel with r key channels.

  Example:
    >>> import jax.numpy as jnp, flax.linen as nn
    >>> f = LayerOnCrop("linen", nn.Conv(2, (1, 1), use_bias=False), "kernel")
    >>> g = ProjectedLayer(f)
    >>> keys = (jnp.ones((1, 2, 2, 1)), {"params": {}}, (), jnp.full((1, 2, 2, 2), 5.0))
    >>> g(jnp.ones((1, 1, 1, 2)), keys)[0, 0, 0].tolist()
    [6.0, 6.0]
  """

  f: Callable

  def __call__(self, kernel, keys):
    xr, params, extra, offset = keys
    return offset + self.f(kernel, (xr, params, extra))


class SubspaceProblem(NamedTuple):
  """The arguments of :func:`memedit.solve_lambda` for the projected problem.

  Solving ``solve_lambda(f, kernel0, D, keys, targets, kind=...)`` with these gives the Λ
  of the original problem (same shape, same loss up to float rounding).

  Attributes:
    f: the :class:`ProjectedLayer`.
    kernel0: zeros shaped like the kernel with r key channels.
    D: (r, r) the identity.
    keys: (x Dᵀ, layer_params, extra, offset) with offset = f(K0, x) − f(0, x Dᵀ).
    error: the relative difference of the two problems' outputs on the random probe Λ.
  """

  f: ProjectedLayer
  kernel0: jax.Array
  D: jax.Array
  keys: Any
  error: float


def _reduced_shape(kshape, kind, in_ndim, r):
  if kind == "conv" and len(kshape) >= 3:
    return kshape[:-2] + (r, kshape[-1])
  if kind == "dense" and in_ndim == 1 and len(kshape) == 2:
    return (r, kshape[1])
  return None


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _setup(f, kind, in_ndim, kernel0, D, x, params, extra, lam):
  """(x Dᵀ, offset, relative error of the projected problem at the probe Λ)."""
  r = D.shape[0]
  rshape = _reduced_shape(tuple(kernel0.shape), kind, in_ndim, r)
  xr = jnp.einsum("...i,di->...d", x, D.astype(x.dtype), precision=HIGHEST)
  eye = jnp.eye(r, dtype=kernel0.dtype)
  base = f(kernel0, (x, params, extra))
  offset = base - f(jnp.zeros(rshape, kernel0.dtype), (xr, params, extra))
  full = f(kernel0 + kernel_delta(lam, D, kernel0.shape, kind, in_ndim).astype(kernel0.dtype),
           (x, params, extra))
  red = offset + f(kernel_delta(lam, eye, rshape, kind, in_ndim).astype(kernel0.dtype),
                   (xr, params, extra))
  scale = jnp.max(jnp.abs(full - base))
  err = jnp.max(jnp.abs(full - red)) / jnp.maximum(scale, jnp.finfo(full.dtype).tiny)
  return xr, offset, jnp.where(jnp.isfinite(err), err, jnp.inf)


def subspace_problem(f: Callable, kernel0: Any, D: Any, keys: Any, *, kind: str = "conv",
                     in_ndim: int = 1, rtol: float = 1e-4) -> SubspaceProblem | None:
  """The crop problem on keys projected onto D, or None where it does not apply.

  Applies to a :class:`memedit.generators.LayerOnCrop` ``f`` with a per-tap convolution
  kernel (*taps, C_in, C_out) (kind "conv") or a dense (C_in, C_out) kernel, whose keys'
  last axis is C_in, and r < C_in directions. On a random probe Λ (standard normal,
  seed 0) the projected output must equal the layer's own to ``rtol`` of the output's
  change, max|f(K0 + ΔK) − f_D(Λ̃)| ≤ rtol · max|f(K0 + ΔK) − f(K0)|, which holds to
  float rounding for a layer affine in its kernel and fails by order one for one that is
  not (or that cannot run on r channels).

  Args:
    f: the layer on its crop (:func:`memedit.generators.crop_problem`).
    kernel0: the layer's kernel K0. D: (r, C_in) directions.
    keys: f's keys ``(x, layer_params, extra)``.
    kind, in_ndim: the kernel's layout (:func:`memedit.solve_lambda`'s).
    rtol: the probe's tolerance.

  Returns:
    :class:`SubspaceProblem`, or None (another ``f``, kernel layout or key shape, r ≥
    C_in, or a probe that disagrees).

  Example:
    >>> import numpy as np, jax.numpy as jnp, memedit
    >>> import flax.linen as nn
    >>> f = LayerOnCrop("linen", nn.Conv(3, (3, 3), padding="SAME"), "kernel")
    >>> rs = np.random.RandomState(0)
    >>> K0 = jnp.asarray(rs.randn(3, 3, 8, 3), jnp.float32)
    >>> keys = (jnp.asarray(rs.randn(1, 5, 5, 8), jnp.float32),
    ...         {"params": {"bias": jnp.ones(3)}}, ())
    >>> D = jnp.asarray(np.linalg.qr(rs.randn(8, 2))[0].T, jnp.float32)
    >>> p = subspace_problem(f, K0, D, keys)
    >>> p.kernel0.shape, p.keys[0].shape, p.error < 1e-5
    ((3, 3, 2, 3), (1, 5, 5, 2), True)
    >>> lam = jnp.asarray(rs.randn(3, 3, 3, 2), jnp.float32)
    >>> full = f(K0 + memedit.kernel_delta(lam, D, K0.shape, "conv"), keys)
    >>> red = p.f(memedit.kernel_delta(lam, p.D, p.kernel0.shape, "conv"), p.keys)
    >>> bool(jnp.allclose(full, red, atol=1e-4))
    True
  """
  if not isinstance(f, LayerOnCrop) or not isinstance(keys, tuple) or len(keys) != 3:
    return None
  x, params, extra = keys
  kernel0 = jnp.asarray(kernel0)
  D = jnp.asarray(D)
  kshape = tuple(kernel0.shape)
  if D.ndim != 2 or not 0 < D.shape[0] < D.shape[1]:
    return None
  r, c_in = D.shape
  rshape = _reduced_shape(kshape, kind, in_ndim, r)
  if rshape is None or kshape[-2] != c_in or np.shape(x)[-1] != c_in:
    return None
  rs = np.random.default_rng(0)
  lam = jnp.asarray(rs.standard_normal(lambda_shape(kshape, r, kind, in_ndim)), kernel0.dtype)
  try:
    xr, offset, err = _setup(f, kind, in_ndim, kernel0, D, jnp.asarray(x), params,
                             tuple(extra), lam)
  except Exception:  # noqa: BLE001 - a layer that cannot run on r key channels (a shape
    return None       # check of its own) keeps the full problem
  err = float(err)
  if not err <= rtol:
    return None
  return SubspaceProblem(ProjectedLayer(f), jnp.zeros(rshape, kernel0.dtype),
                         jnp.eye(r, dtype=kernel0.dtype), (xr, params, tuple(extra), offset),
                         err)
