"""Context directions: the edit subspace D spanned by C⁻¹k* for a few context keys.

All solves with C go through its eigendecomposition C = U diag(λ) Uᵀ with eigenvalues
floored at ``max(rcond · λ_max, tiny)`` (optionally after adding a ridge ``ridge · I``),
never through an explicit inverse. The floor bounds the condition number used by the
solve at 1 / rcond; the condition number of C itself is reported.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

HIGHEST = lax.Precision.HIGHEST
_TINY = 1e-30


class Directions(NamedTuple):
  """An edit subspace.

  Attributes:
    directions: (r, d) array with orthonormal rows spanning the context's C⁻¹ directions,
      each row's sign chosen so that it has a non-negative dot product with the mean key.
    condition_number: () float, λ_max / λ_min of C (inf when C is singular).
  """

  directions: jax.Array
  condition_number: jax.Array


METHODS = ("zca", "svd", "mean")


def _eigh_floored(C, rcond, ridge):
  C = jnp.asarray(C, jnp.float32)
  C = 0.5 * (C + C.T)
  lam, U = jnp.linalg.eigh(C)
  lmax = jnp.max(jnp.abs(lam))
  cond = lmax / jnp.maximum(lam[0], 0.0)
  lam = lam + ridge
  lam = jnp.maximum(lam, jnp.maximum(rcond * (lmax + ridge), _TINY))
  return lam, U, cond


def check_covariance(C: Any, dim: int | None = None, name: str = "C") -> np.ndarray | None:
  """Validates a (d, d) second-moment matrix eagerly when it is concrete.

  Raises:
    ValueError: wrong shape, non-finite entries, asymmetric, or not positive
      semi-definite (an eigenvalue below −1e-5·λ_max).
  """
  shape = tuple(np.shape(C))
  if len(shape) != 2 or shape[0] != shape[1] or (dim is not None and shape[0] != dim):
    want = f"({dim}, {dim})" if dim is not None else "(d, d)"
    raise ValueError(f"{name}: expected a square matrix of shape {want}, got {shape}")
  if isinstance(C, jax.core.Tracer):
    return None
  c = np.asarray(C, np.float64)
  if not np.all(np.isfinite(c)):
    raise ValueError(f"{name}: expected finite entries, got NaN or inf")
  scale = max(np.abs(c).max(), _TINY)
  asym = np.abs(c - c.T).max() / scale
  if asym > 1e-4:
    raise ValueError(f"{name}: expected a symmetric matrix, got max |C - Cᵀ| / max |C| = {asym:.3g}")
  ev = np.linalg.eigvalsh(0.5 * (c + c.T))
  if ev[0] < -1e-5 * max(ev[-1], _TINY):
    raise ValueError(
        f"{name}: expected a positive semi-definite matrix, got smallest eigenvalue "
        f"{ev[0]:.3g} (largest {ev[-1]:.3g})")
  return c


def _check_finite(x, name):
  if not isinstance(x, jax.core.Tracer) and not np.all(np.isfinite(np.asarray(x))):
    raise ValueError(f"{name}: expected finite values, got NaN or inf")


def solve_psd(C: Any, b: Any, *, rcond: float = 1e-6, ridge: float = 0.0) -> jax.Array:
  """Solves C x = b for a symmetric positive semi-definite C without forming C⁻¹.

  x = U diag(1 / max(λ + ridge, rcond·λ_max)) Uᵀ b, with C = U diag(λ) Uᵀ.

  Args:
    C: (d, d) symmetric PSD matrix.
    b: (d,) or (d, n) right-hand side.
    rcond: relative eigenvalue floor.
    ridge: added to every eigenvalue (C + ridge·I).

  Returns:
    x with the shape of b, float32.

  Example:
    >>> import jax.numpy as jnp, memedit
    >>> memedit.solve_psd(jnp.diag(jnp.array([2.0, 4.0])), jnp.array([2.0, 2.0]))
    Array([1. , 0.5], dtype=float32)
  """
  d = np.shape(C)[0] if np.ndim(C) == 2 else None
  check_covariance(C, d)
  b = jnp.asarray(b, jnp.float32)
  if b.ndim not in (1, 2) or b.shape[0] != np.shape(C)[0]:
    raise ValueError(f"b: expected shape ({np.shape(C)[0]},) or ({np.shape(C)[0]}, n), got {b.shape}")
  return _solve_psd(jnp.asarray(C), b, rcond, ridge)


@jax.jit
def _solve_psd(C, b, rcond, ridge):
  lam, U, _ = _eigh_floored(C, rcond, ridge)
  ub = jnp.einsum("di,d...->i...", U, b, precision=HIGHEST)
  ub = ub / lam.reshape((-1,) + (1,) * (b.ndim - 1))
  return jnp.einsum("di,i...->d...", U, ub, precision=HIGHEST)


def context_directions(
    C: Any,
    keys: Any,
    weights: Any = None,
    *,
    rank: int = 1,
    method: str = "zca",
    rcond: float = 1e-6,
    ridge: float = 0.0,
) -> Directions:
  """The edit subspace D (r × d) of a set of weighted context keys K*.

  Methods (all give the C⁻¹ direction of a single key):

  - ``zca`` (default): whiten the weighted keys with C^{-1/2}, take the top-r right
    singular vectors V_r of √w ⊙ K* C^{-1/2}, map them back, D = V_r C^{-1/2}.
  - ``svd``: the top-r right singular vectors of √w ⊙ (C⁻¹ K*ᵀ)ᵀ.
  - ``mean``: the normalised weighted mean of C⁻¹ kᵢ (rank 1 only).

  The rows are then orthonormalised (QR) and each is flipped to have a non-negative dot
  product with the weighted mean key.

  Args:
    C: (d, d) second moment of the layer's keys (see :func:`memedit.second_moment`).
    keys: (..., d) context keys K*.
    weights: optional non-negative weights broadcastable to ``keys.shape[:-1]`` (masks).
    rank: r, 1 ≤ r ≤ min(number of keys, d).
    method: "zca", "svd" or "mean".
    rcond: relative eigenvalue floor for the C solves.
    ridge: ridge added to C's eigenvalues.

  Returns:
    :class:`Directions` with ``directions`` of shape (r, d).

  Example:
    >>> import jax.numpy as jnp, memedit
    >>> D = memedit.context_directions(jnp.eye(3), jnp.array([[0.0, 2.0, 0.0]])).directions
    >>> D.shape, float(D[0, 1])
    ((1, 3), 1.0)
  """
  if method not in METHODS:
    raise ValueError(f"method: expected one of {METHODS}, got {method!r}")
  keys = jnp.asarray(keys)
  d = np.shape(C)[0] if np.ndim(C) == 2 else None
  check_covariance(C, d)
  if keys.ndim < 1 or keys.shape[-1] != d:
    raise ValueError(f"keys: expected shape (..., {d}) to match C of shape {np.shape(C)}, "
                     f"got {tuple(keys.shape)}")
  _check_finite(keys, "keys")
  k = keys.reshape(-1, d)
  n = k.shape[0]
  if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank < 1:
    raise ValueError(f"rank: expected a positive int, got {rank!r}")
  if rank > n:
    raise ValueError(f"rank: expected at most the number of context keys ({n}), got {rank}")
  if rank > d:
    raise ValueError(f"rank: expected at most the key dimension ({d}), got {rank}")
  if method == "mean" and rank != 1:
    raise ValueError(f"rank: method 'mean' gives rank 1, got rank={rank}")
  if weights is None:
    w = jnp.ones((n,), jnp.float32)
  else:
    weights = jnp.asarray(weights, jnp.float32)
    try:
      w = jnp.broadcast_to(weights, keys.shape[:-1]).reshape(-1)
    except ValueError:
      raise ValueError(f"weights: expected a shape broadcastable to {keys.shape[:-1]}, "
                       f"got {weights.shape}") from None
    _check_finite(w, "weights")
    if not isinstance(w, jax.core.Tracer):
      wn = np.asarray(w)
      if (wn < 0).any():
        raise ValueError("weights: expected non-negative weights, got a negative one")
      if int((wn > 0).sum()) < rank:
        raise ValueError(f"rank: expected at most the number of context keys with positive "
                         f"weight ({int((wn > 0).sum())}), got {rank}")
  return _directions(jnp.asarray(C), k.astype(jnp.float32), w, rank, method, rcond, ridge)


@functools.partial(jax.jit, static_argnums=(3, 4))
def _directions(C, k, w, rank, method, rcond, ridge):
  lam, U, cond = _eigh_floored(C, rcond, ridge)
  sw = jnp.sqrt(w)[:, None]
  mean_key = jnp.einsum("n,nd->d", w, k, precision=HIGHEST) / jnp.maximum(jnp.sum(w), _TINY)
  if method == "zca":
    # Rows of k C^{-1/2}, whitened keys, weighted.
    whiten = jnp.matmul(U * lam ** -0.5, U.T, precision=HIGHEST)
    kw = sw * jnp.matmul(k, whiten, precision=HIGHEST)
    _, _, vt = jnp.linalg.svd(kw, full_matrices=False)
    raw = jnp.matmul(vt[:rank], whiten, precision=HIGHEST)
  elif method == "svd":
    cinv_k = jnp.einsum("di,ni->nd", U, jnp.einsum("di,nd->ni", U, k, precision=HIGHEST) / lam,
                        precision=HIGHEST)
    _, _, vt = jnp.linalg.svd(sw * cinv_k, full_matrices=False)
    raw = vt[:rank]
  else:
    cinv_k = jnp.einsum("di,ni->nd", U, jnp.einsum("di,nd->ni", U, k, precision=HIGHEST) / lam,
                        precision=HIGHEST)
    raw = (jnp.einsum("n,nd->d", w, cinv_k, precision=HIGHEST))[None]
  q, r = jnp.linalg.qr(raw.T)
  q = q * jnp.where(jnp.diag(r) < 0, -1.0, 1.0)
  dirs = q.T
  sign = jnp.where(jnp.matmul(dirs, mean_key, precision=HIGHEST) < 0, -1.0, 1.0)
  return Directions(dirs * sign[:, None], cond)
