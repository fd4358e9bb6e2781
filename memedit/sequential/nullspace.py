"""Null-space projected inserts (AlphaEdit, Fang et al., ICLR 2025) in memedit's terms.

Sequential edits interfere: a later ΔW moves the values stored at earlier keys. AlphaEdit
confines each update to the null space of the keys to preserve, so that those keys keep
their values.

- :func:`null_space`: the projector P = Û Ûᵀ, Û the eigenvectors of the preserved second
  moment M = C + Σ wᵢ kᵢ kᵢᵀ (C the layer's key statistics, kᵢ the keys of earlier edits)
  whose eigenvalues lie below ``threshold · λ_max(C)``. A key k with Pk = 0 is preserved
  exactly by any update ΔW = ΔW P; for a preserved key uᵀk ≤ √(threshold·λ_max(C)) along
  every kept eigenvector u (since uᵀMu ≥ (uᵀk)²), so ‖Pk‖ is small.
- :func:`insert_null_space`: AlphaEdit's closed form for a linear memory W (out, d).
  In the columns-are-keys notation of the paper, with K₁ (d, n) the new keys, R (out, n)
  their residuals V₁ − W K₁ and K_p (d, m) the preserved keys,

      ΔW = R K₁ᵀ P (K_p K_pᵀ P + K₁ K₁ᵀ P + l2·I)⁻¹,

  the minimiser over Δ of ‖(W + ΔP) K₁ − V₁‖² + l2 ‖ΔP‖² + ‖ΔP K_p‖² (l2 = 1 in the
  paper). It satisfies ΔW = ΔW P, so it is zero on range(I − P).
- :func:`project_directions`: for a layer that is not linear in its kernel (Λ solved by
  :func:`memedit.solve_lambda`), the directions are projected before the solve,
  D ← D P (each row projected, i.e. P Dᵀ as columns), and re-orthonormalised; every
  ΔK(Λ, D) then reads only the projected part of a key: ΔK(k) = Λ D P k.

Dtypes: float64 inputs (with ``jax_enable_x64``) are computed in float64, all others in
float32 (complex inputs are refused: they would lose their imaginary parts); matmuls use
``Precision.HIGHEST``.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from memedit.checks import (as_array, check_covariance, check_finite, check_real,
                            check_scalar, compute_dtype, is_traced)
from memedit.closed_form import LinearSolution
from memedit.linalg import symmetric_eigh

__all__ = ["NullSpace", "insert_null_space", "key_moment", "null_space", "project_directions"]

HIGHEST = lax.Precision.HIGHEST


class NullSpace(NamedTuple):
  """The null space of the preserved keys and its projector.

  Attributes:
    P: (d, d) the orthogonal projector Û Ûᵀ.
    eigenvalues: (d,) eigenvalues of M = C + Σ wᵢ kᵢ kᵢᵀ, ascending.
    basis: (d, d) the eigenvectors of M (columns, in the order of ``eigenvalues``).
    kept: (d,) bool, the eigenvectors in Û (eigenvalue below ``cutoff``).
    cutoff: () the absolute eigenvalue threshold, ``max(threshold, 4·ε) · λ_max(C)``.

  Example:
    >>> import jax.numpy as jnp
    >>> from memedit.sequential import null_space
    >>> ns = null_space(jnp.diag(jnp.array([1e-4, 1.0])), threshold=1e-2)
    >>> int(ns.dim), ns.P.tolist()
    (1, [[1.0, 0.0], [0.0, 0.0]])
  """

  P: jax.Array
  eigenvalues: jax.Array
  basis: jax.Array
  kept: jax.Array
  cutoff: jax.Array

  @property
  def dim(self) -> jax.Array:
    """() int32, the dimension of the null space (columns of Û)."""
    return jnp.sum(self.kept.astype(jnp.int32))


def _device_array(x, name):
  """``jnp.asarray(as_array(x, name))``, with host data put on the device as it is:
  ``jnp.asarray`` of a numpy array compiles a staging program for every new shape."""
  a = as_array(x, name)
  if isinstance(a, (jax.Array, jax.core.Tracer)) or is_traced(a):
    return jnp.asarray(a)
  return jax.device_put(np.asarray(a))


def _check_keys(keys, weights, d, name="keys"):
  """Keys (m, d) (m may be 0; None or shape (0, 0): no keys) and weights (m,)."""
  if keys is None or tuple(np.shape(keys)) == (0, 0):
    return None, None
  check_real(as_array(keys, name), name)
  keys = _device_array(keys, name)
  if keys.ndim != 2 or keys.shape[1] != d:
    raise ValueError(f"{name}: expected shape (m, {d}), got {tuple(keys.shape)}")
  check_finite(keys, name)
  if weights is None:  # built on the host: no program per number of keys
    weights = (jnp.ones(keys.shape[:1], keys.dtype) if is_traced(keys)
               else jax.device_put(np.ones(keys.shape[:1], keys.dtype)))
  else:
    check_real(as_array(weights, "weights"), "weights")
    weights = _device_array(weights, "weights")
    if tuple(weights.shape) != tuple(keys.shape[:1]):
      raise ValueError(f"weights: expected shape ({keys.shape[0]},) (one per key), got "
                       f"{tuple(weights.shape)}")
    check_finite(weights, "weights")
    if not isinstance(weights, jax.core.Tracer) and bool(np.any(np.asarray(weights) < 0)):
      raise ValueError("weights: expected non-negative weights, got a negative one")
  return keys, weights


def key_moment(keys: Any, weights: Any = None, *, dtype: Any = None) -> jax.Array:
  """Σ wᵢ kᵢ kᵢᵀ = Kᵀ diag(w) K, the (unnormalised) second moment of some keys.

  Args:
    keys: (m, d) keys as rows (m may be 0).
    weights: (m,) non-negative weights, or None for 1.
    dtype: the result's dtype (default: float64 for float64 keys with x64, else float32).

  Returns:
    (d, d) symmetric matrix.

  Example:
    >>> import jax.numpy as jnp
    >>> from memedit.sequential import key_moment
    >>> key_moment(jnp.array([[1.0, 2.0]]), jnp.array([2.0]))
    Array([[2., 4.],
           [4., 8.]], dtype=float32)
  """
  check_real(as_array(keys, "keys"), "keys")
  keys = _device_array(keys, "keys")
  if keys.ndim != 2:
    raise ValueError(f"keys: expected shape (m, d), got {tuple(keys.shape)}")
  if keys.shape == (0, 0):  # no keys of no dimension (_check_keys reads it as "none")
    if weights is not None and tuple(np.shape(weights)) != (0,):
      raise ValueError(f"weights: expected shape (0,) (one per key), got "
                       f"{tuple(np.shape(weights))}")
    return jnp.zeros((0, 0), compute_dtype(keys) if dtype is None else dtype)
  keys, weights = _check_keys(keys, weights, keys.shape[1])
  dt = compute_dtype(keys) if dtype is None else dtype
  return _moment_of(keys, weights, dt)


def _moment_of(keys, weights, dt):
  """Σ wᵢ kᵢ kᵢᵀ in ``dt``. Concrete keys are padded on the host with zero-weight rows to
  a power of two, so a log that grows by an edit at a time compiles one program per
  doubling of its keys, not one per edit."""
  if is_traced(keys, weights):
    return _moment(keys.astype(dt), weights.astype(dt))
  k, w = np.asarray(keys, dt), np.asarray(weights, dt)
  m = k.shape[0]
  rows = 1 << max(0, m - 1).bit_length()
  kp = np.zeros((rows, k.shape[1]), dt)
  wp = np.zeros((rows,), dt)
  kp[:m], wp[:m] = k, w
  return _moment(jax.device_put(kp), jax.device_put(wp))


@jax.jit
def _moment(keys, weights):
  return jnp.einsum("md,m,me->de", keys, weights, keys, precision=HIGHEST)


def null_space(C: Any, keys: Any = None, weights: Any = None, *,
               threshold: float = 1e-2) -> NullSpace:
  """The null space of the preserved keys: P = Û Ûᵀ from M = C + Σ wᵢ kᵢ kᵢᵀ.

  Û are the eigenvectors of M whose eigenvalues are below ``threshold · λ_max(C)``
  (relative to C's largest eigenvalue, so adding keys of large norm does not move the
  cutoff). A threshold below 4·ε (ε the dtype's machine epsilon) counts as 4·ε:
  eigenvalues that small are zero to rounding (the float32 eigenvalues of an exactly
  rank-deficient C come out within about ε·λ_max of zero, of either sign, at any d from 6
  to 2,048), and their computed signs would otherwise decide the null space
  (``threshold=0`` gives the null space of M up to rounding). With no keys this is AlphaEdit's P of the preserved
  statistics alone; the keys of earlier edits (:func:`memedit.sequential.log_keys`) add
  their directions to the preserved set. C is a mean (E[k kᵀ]) and the keys enter as a
  sum, so one key k counts as much as a direction of C with eigenvalue ‖k‖².

  Args:
    C: (d, d) second moment of the layer's keys (PSD, with a positive eigenvalue).
    keys: (m, d) keys to preserve besides C (None or (0, 0): none).
    weights: (m,) non-negative key weights (None: 1).
    threshold: relative cutoff ≥ 0 (AlphaEdit thresholds C's eigenvalues at 1e-2).

  Returns:
    :class:`NullSpace` (P all zero when no eigenvalue is below the cutoff).

  Raises:
    ValueError: C not a finite symmetric PSD matrix with a positive eigenvalue, keys of
      the wrong shape or not finite, negative weights, or a negative threshold.

  Example:
    >>> import jax.numpy as jnp
    >>> from memedit.sequential import null_space
    >>> C = jnp.diag(jnp.array([1.0, 1e-4, 1e-4]))
    >>> ns = null_space(C, keys=jnp.array([[0.0, 1.0, 0.0]]))
    >>> int(ns.dim), ns.P.round(6).tolist()
    (1, [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
  """
  C = as_array(C, "C")
  check_real(C, "C")  # a complex C would lose its imaginary part in the checks and eigh
  d = np.shape(C)[0] if np.ndim(C) == 2 else None
  check_covariance(C, d)
  check_scalar(threshold, "threshold")
  threshold = as_array(threshold, "threshold")
  keys, weights = _check_keys(keys, weights, d)
  dt = compute_dtype(C) if keys is None else compute_dtype(C, keys)
  C = jnp.asarray(C).astype(dt)
  S = jnp.zeros_like(C) if keys is None else _moment_of(keys, weights, dt)
  return _null_space(C, S, jnp.asarray(threshold, dt))


@jax.jit
def _null_space(C, S, threshold):
  lam_c, _ = symmetric_eigh(C)
  floor = 4 * float(np.finfo(C.dtype).eps)  # zero to rounding (see null_space)
  cutoff = jnp.maximum(threshold, floor) * jnp.max(jnp.abs(lam_c))
  ev, U = symmetric_eigh(C + S)
  kept = ev < cutoff
  P = jnp.matmul(U * kept.astype(U.dtype), U.T, precision=HIGHEST)
  return NullSpace(P, ev, U, kept, cutoff)


def project_directions(D: Any, P: Any, *, orthonormalize: bool = True) -> jax.Array:
  """Directions projected onto the null space, D ← D P, for a Λ solve.

  Each row dᵢ becomes P dᵢ (P symmetric); with ``orthonormalize`` the rows are then
  replaced by an orthonormal basis of their span (QR, each row keeping a positive dot
  product with its projected row), so that the solver's Λ keeps its scale. Either way
  every row lies in range(P): an edit ΔK(Λ, D) leaves any key with Pk = 0 unchanged.

  Args:
    D: (r, d) directions (e.g. :func:`memedit.context_directions`).
    P: (d, d) projector (:attr:`NullSpace.P`).
    orthonormalize: return an orthonormal basis of the projected rows.

  Returns:
    (r, d) projected directions; under ``jax.jit`` all NaN when the check below fails.

  Raises:
    ValueError: shapes that do not match, non-finite inputs, or (eagerly) projected rows
      that are no longer independent: a row keeps less than √ε of its norm (ε the dtype's
      machine epsilon) or the rows' span loses a dimension. The directions then lie in
      the preserved keys' span: the edit would change nothing.

  Example:
    >>> import jax.numpy as jnp
    >>> from memedit.sequential import project_directions
    >>> P = jnp.diag(jnp.array([0.0, 1.0, 1.0]))
    >>> project_directions(jnp.array([[3.0, 4.0, 0.0]]), P).tolist() == [[0.0, 1.0, 0.0]]
    True
  """
  D = _device_array(D, "D")
  P = _device_array(P, "P")
  check_real(D, "D")
  check_real(P, "P")
  if D.ndim != 2 or D.shape[0] < 1 or D.shape[1] < 1:
    raise ValueError(f"D: expected shape (r, d) with r ≥ 1 directions of dimension d ≥ 1, "
                     f"got {tuple(D.shape)}")
  d = D.shape[1]
  if tuple(P.shape) != (d, d):
    raise ValueError(f"P: expected shape ({d}, {d}) to match D {tuple(D.shape)}, got "
                     f"{tuple(P.shape)}")
  check_finite(D, "D")
  check_finite(P, "P")
  dt = compute_dtype(D, P)
  out, kept, ok = _project(D.astype(dt), P.astype(dt), bool(orthonormalize))
  if not isinstance(ok, jax.core.Tracer) and not bool(ok):
    shown = ", ".join(f"{x:.3g}" for x in np.asarray(kept))
    raise ValueError(f"D: expected directions with a part outside the preserved keys' span, "
                     f"got rows keeping {shown} of their norm after the projection (or "
                     f"rows that are no longer independent); raise the threshold, preserve "
                     f"fewer keys, or edit without projecting")
  return out


@functools.partial(jax.jit, static_argnums=2)  # one program (eagerly: not one per op)
def _project(D, P, orthonormalize):
  X = jnp.matmul(D, P, precision=HIGHEST)
  tol = float(np.sqrt(np.finfo(D.dtype).eps))
  kept = jnp.linalg.norm(X, axis=1) / jnp.maximum(jnp.linalg.norm(D, axis=1), 1e-30)
  ok = jnp.all(kept > tol)
  if orthonormalize:
    q, r = jnp.linalg.qr(X.T)
    diag = jnp.diagonal(r)
    ok = ok & jnp.all(jnp.abs(diag) > tol * jnp.max(jnp.abs(diag)))
    X = (q * jnp.where(diag < 0, -1.0, 1.0).astype(q.dtype)).T
  return jnp.where(ok, X, jnp.nan), kept, ok


def _check_linear(W, keys, values):
  W = _device_array(W, "W")
  keys = _device_array(keys, "keys")
  values = _device_array(values, "values")
  for name, x in (("W", W), ("keys", keys), ("values", values)):
    check_real(x, name)
  if W.ndim != 2:
    raise ValueError(f"W: expected a matrix of shape (out, in), got {tuple(W.shape)}")
  out, d = W.shape
  if keys.ndim != 2 or keys.shape[1] != d:
    raise ValueError(f"keys: expected shape (n, {d}), got {tuple(keys.shape)}")
  if keys.shape[0] == 0:
    raise ValueError(f"keys: expected at least one key, got shape {tuple(keys.shape)}")
  if values.shape != (keys.shape[0], out):
    raise ValueError(f"values: expected shape ({keys.shape[0]}, {out}) to match keys "
                     f"{tuple(keys.shape)} and W {tuple(W.shape)}, got {tuple(values.shape)}")
  for name, x in (("W", W), ("keys", keys), ("values", values)):
    check_finite(x, name)
  return W, keys, values


def insert_null_space(W: Any, keys: Any, values: Any, P: Any, preserved_keys: Any = None,
                      preserved_weights: Any = None, *, l2: float = 1.0) -> LinearSolution:
  """AlphaEdit's null-space projected insert of n pairs (kᵢ, vᵢ) into a linear memory.

  With K (n, d) the new keys as rows, R = V − K Wᵀ (n, out) the residuals, K_p (m, d)
  the preserved keys with weights w and A = Kᵀ K + K_pᵀ diag(w) K_p,

    ΔW = Rᵀ K P (A P + l2·I)⁻¹ = Λ D,  Λ = Rᵀ (out, n),  D = [P (P A P + l2·I)⁻¹ P Kᵀ]ᵀ (n, d),

  which is the paper's ΔW = R K₁ᵀ P (K_p K_pᵀ P + K₁ K₁ᵀ P + I)⁻¹ (keys as columns) for
  l2 = 1 (the two forms are equal because P (A P + l2·I) = (P A P + l2·I) P; the second
  is solved by Cholesky of the symmetric positive definite P A P + l2·I, for l2 > 0).
  ΔW = ΔW P: keys with Pk = 0 keep W k exactly.
  It is a soft insert: the new keys reach their values up to the l2 and K_p terms, more
  closely when ‖P k‖² ≫ l2.

  Args:
    W: (out, d) weight (math layout; a Flax Dense kernel is Wᵀ).
    keys: (n, d) new keys. values: (n, out) their target values.
    P: (d, d) projector (:func:`null_space`).
    preserved_keys: (m, d) keys of earlier edits (None: none). preserved_weights: (m,).
    l2: > 0, the weight of ‖ΔW‖² (AlphaEdit's ``L2`` hyper-parameter).

  Returns:
    :class:`memedit.LinearSolution` (lam (out, n), D (n, d)), float64 when any input is
    float64 (with x64), else float32; under ``jax.jit`` all NaN where the solve fails.

  Raises:
    ValueError: shapes that do not match, non-finite inputs, negative weights, l2
      not a positive number, (eagerly) a key that keeps less than √ε of its norm
      after the projection (ε the dtype's machine epsilon: nothing would be written
      there), or (eagerly) an l2 too small next to ‖A‖ for the solve in the dtype
      (P A P + l2·I not positive definite to rounding).

  Example:
    >>> import jax.numpy as jnp
    >>> from memedit.sequential import insert_null_space
    >>> P = jnp.diag(jnp.array([1.0, 1.0, 0.0]))
    >>> s = insert_null_space(jnp.zeros((1, 3)), jnp.array([[10.0, 0.0, 5.0]]),
    ...                       jnp.array([[1.0]]), P, l2=1e-3)
    >>> dW = s.lam @ s.D
    >>> float(dW[0, 2]), round(float(dW[0] @ jnp.array([10.0, 0.0, 5.0])), 4)
    (0.0, 1.0)
  """
  W, keys, values = _check_linear(W, keys, values)
  d = W.shape[1]
  P = _device_array(P, "P")
  check_real(P, "P")
  if tuple(P.shape) != (d, d):
    raise ValueError(f"P: expected shape ({d}, {d}), got {tuple(P.shape)}")
  check_finite(P, "P")
  check_scalar(l2, "l2")
  l2 = as_array(l2, "l2")
  if not isinstance(l2, jax.core.Tracer) and not float(np.asarray(l2)) > 0:
    raise ValueError(f"l2: expected a positive number, got {l2!r}")
  pk, pw = _check_keys(preserved_keys, preserved_weights, d, "preserved_keys")
  dt = compute_dtype(W, keys, values, P) if pk is None else compute_dtype(W, keys, values,
                                                                          P, pk)
  _check_writable(keys, P, dt)
  S = jnp.zeros((d, d), dt) if pk is None else _moment_of(pk, pw, dt)
  sol = _alphaedit_padded(W.astype(dt), keys, values, P.astype(dt), S, jnp.asarray(l2, dt),
                          dt)
  if not is_traced(sol) and not bool(np.isfinite(np.asarray(sol.D)).all()):
    # The inputs are finite (checked above): the Cholesky factorisation failed.
    scale = float(np.linalg.norm(np.asarray(keys, np.float64), 2) ** 2
                  + np.linalg.norm(np.asarray(S, np.float64), 2))
    raise ValueError(f"l2: expected a weight large enough for the {np.dtype(dt).name} "
                     f"solve next to ‖A‖ ≈ {scale:.3g} (A = KᵀK + K_pᵀ diag(w) K_p), got "
                     f"l2={float(np.asarray(l2)):.3g}, with which P A P + l2·I is not "
                     f"positive definite to rounding; raise l2 (or solve in float64)")
  return sol


def _check_writable(keys, P, dt) -> None:
  """Refuses (eagerly) keys whose projection P k keeps less than √ε of their norm: the
  insert could not change their outputs (ΔW = ΔW P), so it would write nothing there."""
  if is_traced(keys, P):
    return
  k = np.asarray(keys, np.float64)
  norms = np.linalg.norm(k, axis=1)
  kept = np.linalg.norm(k @ np.asarray(P, np.float64), axis=1) / np.maximum(norms, 1e-300)
  tol = float(np.sqrt(np.finfo(dt).eps))
  bad = np.flatnonzero(~(kept > tol))
  if bad.size:
    shown = ", ".join(f"key {i}: {kept[i]:.3g}" for i in bad[:5])
    raise ValueError(f"keys: expected keys with a part outside the preserved keys' span (at "
                     f"least {tol:.2g} of their norm after the projection), got {bad.size} of "
                     f"{len(k)} without ({shown}{', …' if bad.size > 5 else ''}): the insert "
                     f"would leave their values unchanged; raise the threshold, preserve "
                     f"fewer keys, or insert without projecting")


def _alphaedit_padded(W, keys, values, P, S, l2, dt):
  """:func:`_alphaedit` of the new keys in ``dt``. Concrete keys and values are padded on
  the host with zero rows (keys of weight zero: they add nothing to KᵀK, and their
  residuals and directions are zero) to a power of two, and the padding is cut off the
  result on the host, so that inserts of a new number of keys compile one program per
  doubling, not one per number."""
  if is_traced(keys, values):
    return _alphaedit(W, keys.astype(dt), values.astype(dt), P, S, l2)
  k, v = np.asarray(keys, dt), np.asarray(values, dt)
  n = k.shape[0]
  rows = 1 << max(0, n - 1).bit_length()
  kp = np.zeros((rows, k.shape[1]), dt)
  vp = np.zeros((rows, v.shape[1]), dt)
  kp[:n], vp[:n] = k, v
  sol = _alphaedit(W, jax.device_put(kp), jax.device_put(vp), P, S, l2)
  if is_traced(sol):  # W, P, S or l2 traced: cut inside the trace (static n)
    return LinearSolution(sol.lam[:, :n], sol.D[:n])
  return LinearSolution(jax.device_put(np.asarray(sol.lam)[:, :n]),
                        jax.device_put(np.asarray(sol.D)[:n]))


@jax.jit
def _alphaedit(W, K, V, P, S, l2):
  # P (A P + l2·I)⁻¹ = (P A P + l2·I)⁻¹ P = P (P A P + l2·I)⁻¹ P, since
  # P (A P + l2·I) = (P A P + l2·I) P. The middle matrix is symmetric positive definite
  # (Cholesky), and the outer P keeps D in range(P) to rounding even where a small l2
  # makes the solve ill-conditioned along range(I − P).
  d = W.shape[1]
  A = jnp.matmul(K.T, K, precision=HIGHEST) + S
  G = jnp.matmul(P, jnp.matmul(A, P, precision=HIGHEST), precision=HIGHEST)
  G = 0.5 * (G + G.T) + l2 * jnp.eye(d, dtype=W.dtype)
  Y = jax.scipy.linalg.cho_solve(jax.scipy.linalg.cho_factor(G, lower=True),
                                 jnp.matmul(P, K.T, precision=HIGHEST))
  D = jnp.matmul(P, Y, precision=HIGHEST).T  # (n, d)
  R = V - jnp.matmul(K, W.T, precision=HIGHEST)  # (n, out)
  ok = jnp.all(jnp.isfinite(D)) & jnp.all(jnp.isfinite(R)) & (l2 > 0)
  return LinearSolution(jnp.where(ok, R.T, jnp.nan), jnp.where(ok, D, jnp.nan))
