"""Context directions: the edit subspace D spanned by C⁻¹k* for a few context keys.

No solve forms an explicit inverse.

- :func:`solve_psd` factors C + ridge·I by Cholesky (with one step of iterative
  refinement), accurate to about κ·ε (κ the condition number, ε the dtype's machine
  epsilon), and falls back to the eigendecomposition with floored eigenvalues (below)
  only when C + ridge·I is not numerically positive definite: the factorisation fails,
  or its condition number, estimated from below by power and inverse iteration, exceeds
  1 / rcond.
- :func:`context_directions` needs C^{-1/2} and uses the eigendecomposition
  C = U diag(λ) Uᵀ with the floor.

The floor. Eigenvalues of C + ridge·I are raised to ``max(rcond · (λ_max + ridge), tiny)``
(tiny = 1e-30), which bounds the condition number the solve uses at 1 / rcond; it changes
nothing when C's condition number is at most 1 / rcond. The condition number of C itself
is reported by :func:`context_directions`.

Ridge. Everywhere in memedit ``ridge`` is a multiple of the identity added to C: the
solves use C + ridge·I (Tikhonov). It is an absolute amount, in the units of C's
eigenvalues. (The weight λ of the C-norm penalty of the soft insert ΔW = Rᵀ K (λC + KᵀK)⁻¹
is ``penalty`` of :func:`memedit.insert_ridge`.)

Dtypes. Float64 inputs (with ``jax_enable_x64``) are computed in float64, all others in
float32; matmuls use ``Precision.HIGHEST``.

Checks under ``jax.jit``. The inputs are checked eagerly (ValueError) when they are
concrete. Under ``jax.jit`` nothing can be raised, so the same conditions are evaluated
inside the program and a result that fails them is returned all NaN (see each function).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from memedit.covariance import _expand_weights, _float_dtype, _weights_error, _weights_fit

HIGHEST = lax.Precision.HIGHEST
_TINY = 1e-30
# Power and inverse iterations of the condition estimate in solve_psd.
_COND_ITERS = 10


class Directions(NamedTuple):
  """An edit subspace.

  Attributes:
    directions: (r, d) array with orthonormal rows spanning the context's C⁻¹ directions,
      each row's sign chosen so that it has a non-negative dot product with the mean key
      (all NaN when computed under ``jax.jit`` from inputs that fail the checks).
    condition_number: () float, λ_max / λ_min of C (inf when C is singular).
  """

  directions: jax.Array
  condition_number: jax.Array


METHODS = ("zca", "svd", "mean")


def _dtype_of(*xs) -> np.dtype:
  """The compute dtype for inputs ``xs``: float64 when any is float64 (with x64), else
  float32."""
  dts = [_float_dtype(x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype) for x in xs]
  return np.dtype(np.float64) if any(d == np.float64 for d in dts) else np.dtype(np.float32)


def _eigh(C):
  """Eigenvalues (ascending) and eigenvectors of the symmetric part of C."""
  return jnp.linalg.eigh(0.5 * (C + C.T))


def _floor(lam, rcond, ridge):
  """Eigenvalues of C + ridge·I floored at max(rcond · (λ_max + ridge), tiny)."""
  lmax = jnp.max(jnp.abs(lam))
  lam = lam + ridge
  return jnp.maximum(lam, jnp.maximum(rcond * (lmax + ridge), _TINY))


def _spectrum_ok(lam):
  """In-graph form of :func:`check_covariance`'s spectral tests: finite, a positive
  eigenvalue, none below −1e-5 · λ_max."""
  lmax = jnp.max(lam)
  return jnp.all(jnp.isfinite(lam)) & (lmax > 0) & (lam[0] >= -1e-5 * lmax)


def check_covariance(C: Any, dim: int | None = None, name: str = "C") -> np.ndarray | None:
  """Validates a (d, d) second-moment matrix eagerly when it is concrete.

  Args:
    C: the (d, d) matrix.
    dim: the expected d, or None for any.
    name: the argument's name in error messages.

  Returns:
    C as a float64 numpy array, or None when C is traced (nothing but its shape is
    checked then).

  Raises:
    ValueError: wrong shape, non-finite entries, asymmetric, not positive semi-definite
      (an eigenvalue below −1e-5·λ_max), or no positive eigenvalue (e.g. all zero).
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
  if ev[-1] <= 0:
    raise ValueError(
        f"{name}: expected a matrix with a positive eigenvalue, got largest eigenvalue "
        f"{ev[-1]:.3g} (an all-zero second moment: no keys, or only zero keys)")
  return c


def _check_finite(x, name):
  if not isinstance(x, jax.core.Tracer) and not np.all(np.isfinite(np.asarray(x))):
    raise ValueError(f"{name}: expected finite values, got NaN or inf")


def _check_scalar(name, x, *, lo=0.0, hi=None):
  """Eagerly checks a real scalar setting (a number or a concrete JAX scalar) against
  lo ≤ x (< hi); traced values pass (their check happens in the program)."""
  if isinstance(x, jax.core.Tracer):
    if np.ndim(x) != 0:
      raise ValueError(f"{name}: expected a scalar, got shape {tuple(np.shape(x))}")
    return
  want = f"a number in [{lo}, {hi})" if hi is not None else f"a number ≥ {lo}"
  if isinstance(x, bool) or np.ndim(x) != 0 or np.asarray(x).dtype.kind not in "iuf":
    raise ValueError(f"{name}: expected {want}, got {x!r}")
  v = float(np.asarray(x))
  if not np.isfinite(v) or v < lo or (hi is not None and v >= hi):
    raise ValueError(f"{name}: expected {want}, got {x!r}")


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
    ValueError: C or b of the wrong shape, C not finite, symmetric and PSD with a
      positive eigenvalue, or rcond, ridge out of range (when concrete).

  Example:
    >>> import jax.numpy as jnp, memedit
    >>> memedit.solve_psd(jnp.diag(jnp.array([2.0, 4.0])), jnp.array([2.0, 2.0]))
    Array([1. , 0.5], dtype=float32)
  """
  d = np.shape(C)[0] if np.ndim(C) == 2 else None
  check_covariance(C, d)
  _check_scalar("rcond", rcond, hi=1.0)
  _check_scalar("ridge", ridge)
  dt = _dtype_of(C, b)
  b = jnp.asarray(b).astype(dt)
  if b.ndim not in (1, 2) or b.shape[0] != np.shape(C)[0]:
    raise ValueError(f"b: expected shape ({np.shape(C)[0]},) or ({np.shape(C)[0]}, n), got {b.shape}")
  return _solve_psd(jnp.asarray(C).astype(dt), b, rcond, ridge)


def _cond_estimate(A, L):
  """κ(A) estimated from below: λ_max by power iteration on A, 1 / λ_min by inverse
  iteration with A's Cholesky factor L, from a fixed pseudo-random start."""
  d = A.shape[0]
  v0 = jax.random.normal(jax.random.PRNGKey(0), (d,), A.dtype)
  v0 = v0 / jnp.linalg.norm(v0)

  def power(apply):
    def body(_, v):
      u = apply(v)
      return u / jnp.maximum(jnp.linalg.norm(u), _TINY)
    v = lax.fori_loop(0, _COND_ITERS, body, v0)
    return jnp.linalg.norm(apply(v))

  lmax = power(lambda v: jnp.matmul(A, v, precision=HIGHEST))
  inv_lmin = power(lambda v: jax.scipy.linalg.cho_solve((L, True), v))
  return lmax * inv_lmin


@jax.jit
def _solve_psd(C, b, rcond, ridge):
  dt = C.dtype
  rcond = jnp.asarray(rcond, dt)
  ridge = jnp.asarray(ridge, dt)
  C = 0.5 * (C + C.T)
  A = C + ridge * jnp.eye(C.shape[0], dtype=dt)
  L = jnp.linalg.cholesky(A)
  diag = jnp.diagonal(L)
  factored = jnp.all(jnp.isfinite(L)) & (jnp.min(diag) > 0)
  kappa = _cond_estimate(A, jnp.where(factored, L, jnp.eye(C.shape[0], dtype=dt)))
  chol = factored & jnp.isfinite(kappa) & (kappa * rcond <= 1)

  def by_cholesky():
    x = jax.scipy.linalg.cho_solve((L, True), b)
    # One step of iterative refinement with the same factor: it leaves the norm-wise error
    # at about κ·ε but removes the last-bit errors of well-conditioned components.
    r = b - jnp.matmul(A, x, precision=HIGHEST)
    x = x + jax.scipy.linalg.cho_solve((L, True), r)
    # A PSD C with a zero diagonal is zero: no positive eigenvalue.
    return x, jnp.all(jnp.isfinite(C)) & (jnp.max(jnp.diagonal(C)) > 0)

  def by_eigh():
    lam, U = _eigh(C)
    lamf = _floor(lam, rcond, ridge)
    ub = jnp.einsum("di,d...->i...", U, b, precision=HIGHEST)
    ub = ub / lamf.reshape((-1,) + (1,) * (b.ndim - 1))
    return jnp.einsum("di,i...->d...", U, ub, precision=HIGHEST), _spectrum_ok(lam)

  x, ok = lax.cond(chol, by_cholesky, by_eigh)
  ok = ok & (ridge >= 0) & (rcond >= 0) & (rcond < 1)
  return jnp.where(ok, x, jnp.nan)


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
) -> Directions:
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
  ``directions`` is all NaN when one fails. Shape and rank checks raise in both.

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
    :class:`Directions` with ``directions`` of shape (r, d), float64 when C or the keys
    are float64 (with x64), else float32.

  Raises:
    ValueError: bad shapes, method or rank; C not finite, symmetric and PSD with a
      positive eigenvalue; keys or weights not finite; negative weights; fewer than r
      keys of positive weight or fewer than r independent directions.

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
  _check_scalar("rcond", rcond, hi=1.0)
  _check_scalar("ridge", ridge)
  dt = _dtype_of(C, keys)
  if weights is None:
    w = jnp.ones((n,), dt)
  else:
    weights = jnp.asarray(weights)
    if not _weights_fit(weights.shape, keys.shape[:-1]):
      raise _weights_error("weights", weights.shape, keys.shape[:-1])
    w = _expand_weights(weights.astype(dt), keys.shape[:-1]).reshape(-1)
    _check_finite(w, "weights")
    if not isinstance(w, jax.core.Tracer):
      wn = np.asarray(w)
      if (wn < 0).any():
        raise ValueError("weights: expected non-negative weights, got a negative one")
      if int((wn > 0).sum()) < rank:
        raise ValueError(f"rank: expected at most the number of context keys with positive "
                         f"weight ({int((wn > 0).sum())}), got {rank}")
  res, sv, independent = _directions(jnp.asarray(C).astype(dt), k.astype(dt), w, rank, method,
                                     rcond, ridge)
  if not any(isinstance(x, jax.core.Tracer) for x in (res.directions, sv, independent)):
    if not bool(independent):
      _raise_dependent(np.asarray(sv, np.float64), rank, method, _independence_tol(dt))
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
  """(Directions, singular values, independent) for checked shapes; see
  :func:`context_directions`. Directions are NaN when the inputs fail the checks."""
  dt = C.dtype
  rcond = jnp.asarray(rcond, dt)
  ridge = jnp.asarray(ridge, dt)
  lam_c, U = _eigh(C)
  cond = jnp.max(jnp.abs(lam_c)) / jnp.maximum(lam_c[0], 0.0)
  lam = _floor(lam_c, rcond, ridge)
  tol = _independence_tol(dt)
  mean_key = jnp.einsum("n,nd->d", w, k, precision=HIGHEST) / jnp.maximum(jnp.sum(w), _TINY)

  def cinv(x):
    return jnp.einsum("di,ni->nd", U, jnp.einsum("di,nd->ni", U, x, precision=HIGHEST) / lam,
                      precision=HIGHEST)

  if method == "zca":
    # Rows wᵢ kᵢ C^{-1/2}: whitened keys, weighted.
    whiten = jnp.matmul(U * lam ** -0.5, U.T, precision=HIGHEST)
    kw = w[:, None] * jnp.matmul(k, whiten, precision=HIGHEST)
    _, sv, vt = jnp.linalg.svd(kw, full_matrices=False)
    raw = jnp.matmul(vt[:rank], whiten, precision=HIGHEST)
    independent = sv[rank - 1] > tol * sv[0]
  elif method == "svd":
    _, sv, vt = jnp.linalg.svd(w[:, None] * cinv(k), full_matrices=False)
    raw = vt[:rank]
    independent = sv[rank - 1] > tol * sv[0]
  else:
    ck = cinv(k)
    m = jnp.einsum("n,nd->d", w, ck, precision=HIGHEST)
    total = jnp.sum(jnp.abs(w) * jnp.linalg.norm(ck, axis=-1))
    sv = jnp.stack([jnp.linalg.norm(m), total])
    raw = m[None]
    independent = sv[0] > tol * sv[1]
  q, r = jnp.linalg.qr(raw.T)
  q = q * jnp.where(jnp.diag(r) < 0, -1.0, 1.0)
  dirs = q.T
  sign = jnp.where(jnp.matmul(dirs, mean_key, precision=HIGHEST) < 0, -1.0, 1.0)
  dirs = dirs * sign[:, None]
  ok = (_spectrum_ok(lam_c) & jnp.all(jnp.isfinite(k)) & jnp.all(jnp.isfinite(w))
        & jnp.all(w >= 0) & (jnp.sum(w > 0) >= rank) & independent
        & (ridge >= 0) & (rcond >= 0) & (rcond < 1))
  return Directions(jnp.where(ok, dirs, jnp.nan), cond), sv, independent
