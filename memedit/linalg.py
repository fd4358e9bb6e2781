"""Dense symmetric linear algebra in the dtype of the inputs, never forming an inverse.

- :func:`solve_psd` factors C + ridge·I by Cholesky (with one step of iterative
  refinement), accurate to about κ·ε (κ the condition number, ε the dtype's machine
  epsilon), and falls back to the eigendecomposition with floored eigenvalues (below)
  only when C + ridge·I is not numerically positive definite: the factorisation fails,
  or its condition number, estimated from below by power and inverse iteration, exceeds
  1 / rcond.
- :func:`symmetric_eigh`, :func:`floor_eigenvalues` and :func:`spectrum_ok` are the
  pieces of the eigendecomposition route, shared with :func:`memedit.context_directions`
  (which uses C's Cholesky factor instead where the floor changes nothing). The inserts
  (:func:`memedit.insert_closed_form`) apply C⁻¹ by the same two routes as
  :func:`solve_psd`.

The floor. Eigenvalues of C + ridge·I are raised to ``max(rcond, 1e-30) · (λ_max + ridge)``
(and at least the dtype's smallest normal number), which bounds the condition number the
solve uses at 1 / rcond; it is relative to λ_max, so it changes nothing when C's condition
number is at most 1 / rcond (and at most 1e30), whatever the scale of C.

Ridge. Everywhere in memedit ``ridge`` is a multiple of the identity added to C: the
solves use C + ridge·I (Tikhonov). It is an absolute amount, in the units of C's
eigenvalues. (The weight λ of the C-norm penalty of the soft insert ΔW = Rᵀ K (λC + KᵀK)⁻¹
is ``penalty`` of :func:`memedit.insert_ridge`.)

Dtypes. Float64 inputs (with ``jax_enable_x64``) are computed in float64, all others in
float32; matmuls use ``Precision.HIGHEST``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from memedit.checks import (TINY, as_array, check_covariance, check_finite, check_real,
                            check_scalar, compute_dtype, covariance_arg, is_traced)

__all__ = ["floor_eigenvalues", "solve_psd", "spectrum_ok", "symmetric_eigh"]

HIGHEST = lax.Precision.HIGHEST
# Power and inverse iterations of the condition estimate in solve_psd.
_COND_ITERS = 10


def symmetric_eigh(C: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Eigenvalues (ascending) and eigenvectors of the symmetric part of C.

  Args:
    C: (d, d) matrix.

  Returns:
    ``(lam, U)``: (d,) eigenvalues λ in ascending order and (d, d) orthonormal U with
    ½(C + Cᵀ) = U diag(λ) Uᵀ.

  Example:
    >>> import jax.numpy as jnp
    >>> lam, U = symmetric_eigh(jnp.array([[2.0, 1.0], [1.0, 2.0]]))
    >>> lam.round(4)
    Array([1., 3.], dtype=float32)
  """
  return jnp.linalg.eigh(0.5 * (C + C.T))


def floor_eigenvalues(lam: jax.Array, rcond: Any, ridge: Any) -> jax.Array:
  """Eigenvalues of C + ridge·I floored at max(rcond, 1e-30) · (λ_max + ridge).

  With λ the eigenvalues of C, returns max(λᵢ + ridge, max(rcond, 1e-30) · (max |λ| +
  ridge), tiny) (tiny the smallest normal number of λ's dtype), so the floored matrix has
  condition number at most 1 / rcond. The floor is relative: scaling C scales the result
  and nothing else.

  Args:
    lam: (d,) eigenvalues of C (from :func:`symmetric_eigh`).
    rcond: relative floor in [0, 1) (number or traced scalar).
    ridge: ≥ 0 added to every eigenvalue.

  Returns:
    (d,) floored eigenvalues of C + ridge·I.

  Example:
    >>> import jax.numpy as jnp
    >>> floor_eigenvalues(jnp.array([0.0, 1e-9, 4.0]), 1e-3, 0.0)
    Array([0.004, 0.004, 4.   ], dtype=float32)
  """
  lmax = jnp.max(jnp.abs(lam))
  lam = lam + ridge
  floor = jnp.maximum(rcond, TINY) * (lmax + ridge)
  return jnp.maximum(lam, jnp.maximum(floor, jnp.finfo(lam.dtype).tiny))


def spectrum_ok(lam: jax.Array) -> jax.Array:
  """In-graph form of :func:`memedit.checks.check_covariance`'s spectral tests.

  Args:
    lam: (d,) eigenvalues in ascending order.

  Returns:
    () bool: all finite, λ_max > 0 and λ_min ≥ −1e-5 · λ_max.

  Example:
    >>> import jax.numpy as jnp
    >>> bool(spectrum_ok(jnp.array([0.0, 1.0]))), bool(spectrum_ok(jnp.array([-1.0, 1.0])))
    (True, False)
  """
  lmax = jnp.max(lam)
  return jnp.all(jnp.isfinite(lam)) & (lmax > 0) & (lam[0] >= -1e-5 * lmax)


def solve_psd(C: Any, b: Any, *, rcond: float = 1e-6, ridge: float = 0.0) -> jax.Array:
  """Solves (C + ridge·I) x = b for a symmetric positive semi-definite C, never forming C⁻¹.

  With A = C + ridge·I: when A is numerically positive definite, x comes from A's
  Cholesky factor and one step of iterative refinement (accurate to about κ(A)·ε of the
  exact solution, ε the dtype's machine epsilon). Otherwise, when the factorisation
  fails or A's condition number, estimated from below by power and inverse iteration,
  exceeds 1 / rcond, x = U diag(1 / max(λ + ridge, rcond·(λ_max + ridge))) Uᵀ b with
  C = U diag(λ) Uᵀ: the eigenvalue floor, which bounds the condition number the solve
  uses at 1 / rcond.

  Under ``jax.jit``: a C that is not finite, has no positive eigenvalue or (on the
  eigendecomposition route) an eigenvalue below −1e-5·λ_max, or a negative ridge or an
  rcond outside [0, 1), gives x all NaN instead of an error.

  Args:
    C: (d, d) symmetric PSD matrix.
    b: (d,) or (d, n) right-hand side.
    rcond: relative eigenvalue floor, in [0, 1).
    ridge: ≥ 0, added to C as ridge·I (a number or a JAX scalar).

  Returns:
    x with the shape of b: float64 when C or b is float64 (with x64), else float32.

  Raises:
    ValueError: C or b of the wrong shape or complex, C not finite, symmetric and PSD
      with a positive eigenvalue, b not finite, or rcond, ridge out of range (when
      concrete).

  Example:
    >>> import jax.numpy as jnp, memedit
    >>> memedit.solve_psd(jnp.diag(jnp.array([2.0, 4.0])), jnp.array([2.0, 2.0]))
    Array([1. , 0.5], dtype=float32)
  """
  C, d = covariance_arg(C)
  b = jnp.asarray(as_array(b, "b"))
  check_real(b, "b")
  check_covariance(C, d)
  check_scalar(rcond, "rcond", hi=1.0)
  check_scalar(ridge, "ridge")
  dt = compute_dtype(C, b)
  b = b.astype(dt)
  if b.ndim not in (1, 2) or b.shape[0] != np.shape(C)[0]:
    raise ValueError(f"b: expected shape ({np.shape(C)[0]},) or ({np.shape(C)[0]}, n), got {b.shape}")
  check_finite(b, "b")
  x = _solve_psd(jnp.asarray(C).astype(dt), b, rcond, ridge)
  if not is_traced(x, rcond, ridge):
    # The inputs passed the checks in their own dtype; the in-graph checks, in the
    # compute dtype, may still fail (e.g. C's entries underflow in float32).
    check_finite(x, "x", f" (C and b passed the checks, but not in the compute dtype {dt}: "
                 f"C under- or overflows there; rescale it, or use float64 with "
                 f"jax_enable_x64)")
  return x


def _cond_estimate(A, L):
  """κ(A) estimated from below: λ_max by power iteration on A, 1 / λ_min by inverse
  iteration with A's Cholesky factor L, from a fixed pseudo-random start."""
  d = A.shape[0]
  v0 = jax.random.normal(jax.random.PRNGKey(0), (d,), A.dtype)
  v0 = v0 / jnp.linalg.norm(v0)

  def power(apply):
    def body(_, v):
      u = apply(v)
      return u / jnp.maximum(jnp.linalg.norm(u), jnp.finfo(u.dtype).tiny)
    v = lax.fori_loop(0, _COND_ITERS, body, v0)
    return jnp.linalg.norm(apply(v))

  lmax = power(lambda v: jnp.matmul(A, v, precision=HIGHEST))
  inv_lmin = power(lambda v: jax.scipy.linalg.cho_solve((L, True), v))
  return lmax * inv_lmin


@jax.jit
def _solve_psd(C, b, rcond, ridge):
  x, ok = _psd_solve(C, b, rcond, ridge)
  return jnp.where(ok, x, jnp.nan)


def _psd_solve(C, b, rcond, ridge, *, refine: bool = True, margin: float = 1.0):
  """(x, ok): the solve of :func:`solve_psd` (traceable, no NaN masking) and its in-graph
  checks.

  The Cholesky route is taken when the factorisation succeeds and the condition number
  estimate κ satisfies κ·rcond ≤ ``margin``; ``margin`` < 1 keeps the eigenvalue floor's
  result exactly where it could be active (κ is estimated from below). Without
  ``refine`` the columns of x all come from the same factor (x = L⁻ᵀ L⁻¹ b), so linear
  combinations of b's columns are solved as accurately as the columns themselves.
  """
  dt = C.dtype
  rcond = jnp.asarray(rcond, dt)
  ridge = jnp.asarray(ridge, dt)
  C = 0.5 * (C + C.T)
  A = C + ridge * jnp.eye(C.shape[0], dtype=dt)
  L = jnp.linalg.cholesky(A)
  diag = jnp.diagonal(L)
  factored = jnp.all(jnp.isfinite(L)) & (jnp.min(diag) > 0)
  kappa = _cond_estimate(A, jnp.where(factored, L, jnp.eye(C.shape[0], dtype=dt)))
  chol = factored & jnp.isfinite(kappa) & (kappa * rcond <= margin)

  def by_cholesky():
    x = jax.scipy.linalg.cho_solve((L, True), b)
    if refine:
      # One step of iterative refinement with the same factor: it leaves the norm-wise
      # error at about κ·ε but removes the last-bit errors of well-conditioned components.
      r = b - jnp.matmul(A, x, precision=HIGHEST)
      x = x + jax.scipy.linalg.cho_solve((L, True), r)
    # A PSD C with a zero diagonal is zero: no positive eigenvalue.
    return x, jnp.all(jnp.isfinite(C)) & (jnp.max(jnp.diagonal(C)) > 0)

  def by_eigh():
    lam, U = symmetric_eigh(C)
    lamf = floor_eigenvalues(lam, rcond, ridge)
    ub = jnp.einsum("di,d...->i...", U, b, precision=HIGHEST)
    ub = ub / lamf.reshape((-1,) + (1,) * (b.ndim - 1))
    return jnp.einsum("di,i...->d...", U, ub, precision=HIGHEST), spectrum_ok(lam)

  x, ok = lax.cond(chol, by_cholesky, by_eigh)
  return x, ok & (ridge >= 0) & (rcond >= 0) & (rcond < 1)
