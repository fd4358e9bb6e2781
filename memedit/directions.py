"""Context directions: the edit subspace D spanned by C⁻¹k* for a few context keys.

:func:`context_directions` computes the eigenvalues of C (its condition number is
reported with the subspace) and applies the eigenvalue floor of :mod:`memedit.linalg`
(eigenvalues of C + ridge·I raised to ``max(rcond, 1e-30) · (λ_max + ridge)``, relative to
C's scale). Where the floor changes nothing, the solves and the whitening use the
Cholesky factor L of C + ridge·I (L⁻¹ in place of C^{-1/2}: the same singular values and
subspace, accurate to about κ·ε); otherwise the floored eigendecomposition
C = U diag(λ) Uᵀ. No solve forms an explicit inverse.

Ridge. As everywhere in memedit, ``ridge`` is a multiple of the identity added to C
(Tikhonov), in the units of C's eigenvalues.

Dtypes. Float64 inputs (with ``jax_enable_x64``) are computed in float64, all others in
float32; matmuls use ``Precision.HIGHEST``.

Checks under ``jax.jit``. The inputs are checked eagerly (ValueError) when they are
concrete. Under ``jax.jit`` nothing can be raised, so the same conditions are evaluated
inside the program and a result that fails them is returned all NaN.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from memedit.checks import (TINY, as_array, check_covariance, check_finite, check_positive_int,
                            check_real, check_scalar, compute_dtype, covariance_arg,
                            expand_weights, weights_error, weights_fit)
from memedit.linalg import floor_eigenvalues, spectrum_ok, symmetric_eigh

__all__ = ["METHODS", "Subspace", "context_directions"]

HIGHEST = lax.Precision.HIGHEST


class Subspace(NamedTuple):
  """An edit subspace and the conditioning of the C it was computed with.

  Attributes:
    D: (r, d) array with orthonormal rows spanning the context's C⁻¹ directions,
      each row's sign chosen so that it has a non-negative dot product with the mean key
      (all NaN when computed under ``jax.jit`` from inputs that fail the checks).
    condition_number: () float, λ_max / λ_min of C (inf when C is singular).

  Example:
    >>> import jax.numpy as jnp, memedit
    >>> s = memedit.context_directions(jnp.diag(jnp.array([1.0, 4.0])), jnp.ones((1, 2)))
    >>> s.D.shape, float(s.condition_number)
    ((1, 2), 4.0)
  """

  D: jax.Array
  condition_number: jax.Array


#: The ways :func:`context_directions` turns context keys into a subspace.
METHODS = ("zca", "svd", "mean")


def _independence_tol(dtype) -> float:
  """Relative singular-value threshold of an independent direction: √ε of the dtype."""
  return float(np.sqrt(np.finfo(dtype).eps))


def context_directions(
    C: Any,
    keys: Any,
    weights: Any = None,
    *,
    rank: int = 1,
    method: str = "zca",
    rcond: float = 1e-6,
    ridge: float = 0.0,
) -> Subspace:
  """The edit subspace D (r × d) of a set of weighted context keys K*.

  With M = (C + ridge·I)^{-1/2} (eigenvalues floored, see the module docstring) and wᵢ
  the keys' weights (all methods give the C⁻¹ direction of a single key):

  - ``zca`` (default): whiten the weighted keys, Z = diag(w) K* M (rows wᵢ M kᵢ), take
    the top-r right singular vectors V_r of Z and map them back, D = V_r M.
  - ``svd``: the top-r right singular vectors of diag(w) (C⁻¹ K*ᵀ)ᵀ (rows wᵢ C⁻¹ kᵢ).
  - ``mean``: the normalised Σ wᵢ C⁻¹ kᵢ (rank 1 only).

  The rows are then orthonormalised (QR) and each is flipped to have a non-negative dot
  product with the weighted mean key.

  Weighting. Each key is scaled by its weight, as in the reference implementation (a
  key half inside a mask counts as half that key), so the singular vectors are those of
  Σ wᵢ² zᵢ zᵢᵀ. For 0/1 masks this is the same as any other weighting.

  Independence. Rank r needs r independent directions among the weighted keys: the r-th
  singular value of the matrix whose singular vectors are taken (Z for ``zca``, whose
  singular values are those of the keys' C⁻¹ directions in the C-metric; diag(w) K* C⁻¹
  for ``svd``) must exceed √ε times the first (ε the dtype's machine epsilon: 3.5e-4 in
  float32, 1.5e-8 in float64); below that the r-th direction would be set by rounding,
  not by the keys. For ``mean``, ‖Σ wᵢ C⁻¹ kᵢ‖ must exceed √ε · Σ wᵢ ‖C⁻¹ kᵢ‖.

  Under ``jax.jit`` the checks that raise eagerly on values (C finite, PSD, with a
  positive eigenvalue; keys and weights finite; weights non-negative; at least r keys
  of positive weight; r independent directions) are evaluated in the program, and
  ``D`` is all NaN when one fails. Shape and rank checks raise in both.

  Args:
    C: (d, d) second moment of the layer's keys (see :func:`memedit.second_moment`).
    keys: (n₀, …, n_{p−1}, d) context keys K*.
    weights: optional non-negative weights (masks) aligned with the keys' leading axes
      from the left: shape (a₀, …, a_{m−1}) with m ≤ p and aᵢ ∈ {1, nᵢ}, so (n₀,)
      weights whole images and (n₀, …, n_{p−1}) single keys. Other shapes raise.
    rank: r, 1 ≤ r ≤ min(number of keys, d), and at most the number of independent
      directions (above).
    method: "zca", "svd" or "mean".
    rcond: relative eigenvalue floor for the C solves, in [0, 1).
    ridge: ≥ 0, added to C as ridge·I before the solves.

  Returns:
    :class:`Subspace` with ``D`` of shape (r, d), float64 when C or the keys
    are float64 (with x64), else float32.

  Raises:
    ValueError: bad shapes, method or rank; C not finite, symmetric and PSD with a
      positive eigenvalue; keys or weights not finite; negative weights; fewer than r
      keys of positive weight or fewer than r independent directions; inputs that pass
      these checks in their own dtype but fail them in the compute dtype (e.g. a float32
      C whose entries underflow), which would give D all NaN.

  Example:
    >>> import jax.numpy as jnp, memedit
    >>> D = memedit.context_directions(jnp.eye(3), jnp.array([[0.0, 2.0, 0.0]])).D
    >>> D.shape, float(D[0, 1])
    ((1, 3), 1.0)
  """
  if method not in METHODS:
    raise ValueError(f"method: expected one of {METHODS}, got {method!r}")
  C, d = covariance_arg(C)
  keys = jnp.asarray(as_array(keys, "keys"))
  check_real(keys, "keys")
  check_covariance(C, d)
  if keys.ndim < 1 or keys.shape[-1] != d:
    raise ValueError(f"keys: expected shape (..., {d}) to match C of shape {np.shape(C)}, "
                     f"got {tuple(keys.shape)}")
  check_finite(keys, "keys")
  k = keys.reshape(-1, d)
  n = k.shape[0]
  rank = check_positive_int(rank, "rank")
  if rank > n:
    raise ValueError(f"rank: expected at most the number of context keys ({n}), got {rank}")
  if rank > d:
    raise ValueError(f"rank: expected at most the key dimension ({d}), got {rank}")
  if method == "mean" and rank != 1:
    raise ValueError(f"rank: method 'mean' gives rank 1, got rank={rank}")
  check_scalar(rcond, "rcond", hi=1.0)
  check_scalar(ridge, "ridge")
  rcond, ridge = as_array(rcond, "rcond"), as_array(ridge, "ridge")
  dt = compute_dtype(C, keys)
  if weights is None:
    w = jnp.ones((n,), dt)
  else:
    weights = jnp.asarray(as_array(weights, "weights"))
    check_real(weights, "weights")
    if not weights_fit(weights.shape, keys.shape[:-1]):
      raise weights_error("weights", weights.shape, keys.shape[:-1])
    w = expand_weights(weights.astype(dt), keys.shape[:-1]).reshape(-1)
    check_finite(w, "weights")
    if not isinstance(w, jax.core.Tracer):
      wn = np.asarray(w)
      if (wn < 0).any():
        raise ValueError("weights: expected non-negative weights, got a negative one")
      if int((wn > 0).sum()) < rank:
        raise ValueError(f"rank: expected at most the number of context keys with positive "
                         f"weight ({int((wn > 0).sum())}), got {rank}")
  res, sv, independent = _directions(jnp.asarray(C).astype(dt), k.astype(dt), w, rank, method,
                                     rcond, ridge)
  if not any(isinstance(x, jax.core.Tracer) for x in (res.D, sv, independent)):
    if not bool(independent):
      _raise_dependent(np.asarray(sv, np.float64), rank, method, _independence_tol(dt))
    # The inputs passed the checks in their own dtype; the in-graph checks, in the
    # compute dtype, may still fail (e.g. C's entries underflow in float32).
    check_finite(res.D, "D", f" (the inputs passed the checks, but not in the compute dtype "
                 f"{dt}: C or the keys under- or overflow there; rescale them, or use "
                 f"float64 with jax_enable_x64)")
  return res


def _raise_dependent(sv, rank, method, tol):
  if method == "mean":
    raise ValueError(
        f"keys: expected weighted context keys whose C⁻¹ directions do not cancel, got "
        f"‖Σ wᵢ C⁻¹ kᵢ‖ = {sv[0]:.3g} against Σ wᵢ ‖C⁻¹ kᵢ‖ = {sv[1]:.3g} (it must exceed "
        f"{tol:.2g} times that)")
  m = int(np.sum(sv > tol * sv[0])) if sv[0] > 0 else 0
  what = "whitened keys diag(w) K C^{-1/2}" if method == "zca" else "keys' directions diag(w) K C⁻¹"
  shown = ", ".join(f"{x:.3g}" for x in sv[:rank + 1])
  raise ValueError(
      f"rank: expected at most the number of independent directions among the weighted "
      f"context keys ({m}), got {rank}: the leading singular values of the weighted {what} "
      f"are {shown}, and a direction counts when its singular value exceeds {tol:.2g} "
      f"times the largest")


@functools.partial(jax.jit, static_argnums=(3, 4))
def _directions(C, k, w, rank, method, rcond, ridge):
  """(Subspace, singular values, independent) for checked shapes; see
  :func:`context_directions`. D is NaN when the inputs fail the checks."""
  dt = C.dtype
  rcond = jnp.asarray(rcond, dt)
  ridge = jnp.asarray(ridge, dt)
  lam_c, U = symmetric_eigh(C)
  cond = jnp.max(jnp.abs(lam_c)) / jnp.maximum(lam_c[0], 0.0)
  lam = floor_eigenvalues(lam_c, rcond, ridge)
  tol = _independence_tol(dt)
  mean_key = jnp.einsum("n,nd->d", w, k, precision=HIGHEST) / jnp.maximum(jnp.sum(w), TINY)

  # When the floor changes nothing (λ_min + ridge at or above it), C + ridge·I is solved
  # and whitened by its Cholesky factor L, which is more accurate than the eigenvectors
  # (about κ·ε against several times that); otherwise by the floored eigendecomposition.
  A = C + ridge * jnp.eye(C.shape[0], dtype=dt)
  L = jnp.linalg.cholesky(0.5 * (A + A.T))
  use_chol = ((lam[0] == lam_c[0] + ridge) & jnp.all(jnp.isfinite(L))
              & (jnp.min(jnp.diagonal(L)) > 0))

  def via_cholesky():
    solve = functools.partial(jax.scipy.linalg.solve_triangular, L, lower=True)
    if method == "zca":
      # Z = diag(w) K L⁻ᵀ has Z Zᵀ = diag(w) K C⁻¹ Kᵀ diag(w) as with C^{-1/2}: the same
      # singular values, and right singular vectors V' with D = V'ᵀ L⁻¹.
      _, sv, vt = jnp.linalg.svd(solve(k.T * w).T, full_matrices=False)
      return solve(vt[:rank].T, trans=1).T, sv
    ck = jax.scipy.linalg.cho_solve((L, True), k.T).T
    return directions_of(ck)

  def via_eigh():
    def cinv(x):
      return jnp.einsum("di,ni->nd", U, jnp.einsum("di,nd->ni", U, x, precision=HIGHEST)
                        / lam, precision=HIGHEST)

    if method == "zca":
      # Rows wᵢ kᵢ C^{-1/2}: whitened keys, weighted.
      whiten = jnp.matmul(U * lam ** -0.5, U.T, precision=HIGHEST)
      kw = w[:, None] * jnp.matmul(k, whiten, precision=HIGHEST)
      _, sv, vt = jnp.linalg.svd(kw, full_matrices=False)
      return jnp.matmul(vt[:rank], whiten, precision=HIGHEST), sv
    return directions_of(cinv(k))

  def directions_of(ck):
    if method == "svd":
      _, sv, vt = jnp.linalg.svd(w[:, None] * ck, full_matrices=False)
      return vt[:rank], sv
    m = jnp.einsum("n,nd->d", w, ck, precision=HIGHEST)
    total = jnp.sum(jnp.abs(w) * jnp.linalg.norm(ck, axis=-1))
    return m[None], jnp.stack([jnp.linalg.norm(m), total])

  raw, sv = lax.cond(use_chol, via_cholesky, via_eigh)
  if method == "mean":
    independent = sv[0] > tol * sv[1]
  else:
    independent = sv[rank - 1] > tol * sv[0]
  q, r = jnp.linalg.qr(raw.T)
  q = q * jnp.where(jnp.diag(r) < 0, -1.0, 1.0)
  dirs = q.T
  sign = jnp.where(jnp.matmul(dirs, mean_key, precision=HIGHEST) < 0, -1.0, 1.0)
  dirs = dirs * sign[:, None]
  ok = (spectrum_ok(lam_c) & jnp.all(jnp.isfinite(k)) & jnp.all(jnp.isfinite(w))
        & jnp.all(w >= 0) & (jnp.sum(w > 0) >= rank) & independent
        & (ridge >= 0) & (rcond >= 0) & (rcond < 1))
  return Subspace(jnp.where(ok, dirs, jnp.nan), cond), sv, independent
