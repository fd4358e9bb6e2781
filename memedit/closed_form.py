"""Closed-form inserts into a linear memory W (out, in): v = W k.

With K (n, in) the new keys as rows, V (n, out) their values, R = V − K Wᵀ the residuals
and C the keys' second moment:

- :func:`insert_closed_form`: the exact constrained insert, min ‖ΔW‖²_C subject to
  (W + ΔW) kᵢ = vᵢ, ΔW = Rᵀ (K C⁻¹ Kᵀ)⁻¹ (C⁻¹ Kᵀ)ᵀ.
- :func:`insert_ridge`: the soft insert ΔW = Rᵀ K (λ C + Kᵀ K)⁻¹ (MEMIT / TIME form).
- :func:`least_squares_lambda`: Λ for a fixed subspace D, min ‖V − K (W + Λ D)ᵀ‖².

Each result is factored as ΔW = Λ D (:class:`LinearSolution`), the form an
:class:`memedit.Edit` stores. Float64 inputs (with ``jax_enable_x64``) are solved in
float64, all others in float32; matmuls use ``Precision.HIGHEST``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from memedit.checks import (TINY, as_array, check_covariance, check_finite, check_real,
                            check_scalar, compute_dtype, is_traced)
from memedit.linalg import _psd_solve, symmetric_eigh

__all__ = ["LinearSolution", "insert_closed_form", "insert_ridge", "least_squares_lambda"]

HIGHEST = lax.Precision.HIGHEST


class LinearSolution(NamedTuple):
  """ΔW = lam @ D for a matrix W (out, in).

  Attributes:
    lam: (out, n) Λ.
    D: (n, in), the rows C⁻¹kᵢ of the exact and the soft insert.

  Example:
    >>> import jax.numpy as jnp, memedit
    >>> s = memedit.insert_closed_form(jnp.zeros((1, 2)), jnp.eye(2), jnp.ones((1, 2)),
    ...                                jnp.ones((1, 1)))
    >>> s.lam.shape, s.D.shape
    ((1, 1), (1, 2))
  """

  lam: jax.Array
  D: jax.Array


def _check_linear(W, C, keys, values):
  W = jnp.asarray(as_array(W, "W"))
  C = as_array(C, "C")
  if is_traced(C):  # a list holding traced values: a traced matrix
    C = jnp.asarray(C)
  keys = jnp.asarray(as_array(keys, "keys"))
  values = jnp.asarray(as_array(values, "values"))
  for name, x in (("W", W), ("C", C), ("keys", keys), ("values", values)):
    check_real(x, name)
  if W.ndim != 2:
    raise ValueError(f"W: expected a matrix of shape (out, in), got {tuple(W.shape)}")
  out, din = W.shape
  cshape = tuple(np.shape(C))
  if (len(cshape) == 2 and cshape[0] == cshape[1] != din and keys.ndim == 2
      and keys.shape[1] == cshape[0]):
    # C and the keys agree on the key dimension: W is the odd one out.
    hint = (" (transposed? a Flax Dense kernel (in, out) is Wᵀ)" if out == cshape[0] else "")
    raise ValueError(f"W: expected shape (out, {cshape[0]}) in the math layout, to match C "
                     f"{cshape} and keys {tuple(keys.shape)}, got {tuple(W.shape)}{hint}")
  check_covariance(C, din)
  if keys.ndim != 2 or keys.shape[1] != din:
    raise ValueError(f"keys: expected shape (n, {din}), got {tuple(keys.shape)}")
  if keys.shape[0] == 0:
    raise ValueError(f"keys: expected at least one key, got shape {tuple(keys.shape)}")
  if values.ndim != 2 or values.shape != (keys.shape[0], out):
    raise ValueError(f"values: expected shape ({keys.shape[0]}, {out}) to match keys "
                     f"{tuple(keys.shape)} and W {tuple(W.shape)}, got {tuple(values.shape)}")
  for name, x in (("keys", keys), ("values", values), ("W", W)):
    check_finite(x, name)
  # Float64 inputs (with jax_enable_x64) are solved in float64, all others in float32.
  dt = compute_dtype(W, C, keys, values)
  return W.astype(dt), jnp.asarray(C).astype(dt), keys.astype(dt), values.astype(dt)


# The exact insert needs K C⁻¹ Kᵀ's smallest eigenvalue above this times its largest.
_INDEPENDENT = 1e-6


def _check_rcond(rcond, C) -> None:
  """rcond a number in [0, 1) (or traced); with rcond = 0, C (concrete) must be positive
  definite (its computed eigenvalues all positive), since it is inverted as it is."""
  if is_traced(rcond):
    check_scalar(rcond, "rcond")  # the shape of a traced rcond; its range in the program
    return
  try:
    check_scalar(rcond, "rcond")
    value = float(np.asarray(rcond))
  except (ValueError, TypeError):
    value = float("nan")
  if not 0.0 <= value < 1.0:
    raise ValueError(f"rcond: expected a number in [0, 1), got {rcond!r}")
  if value > 0.0 or is_traced(C):
    return
  ev = np.asarray(symmetric_eigh(C)[0], np.float64)
  if not ev[0] > 0.0:
    raise ValueError(
        f"C: expected a positive definite second moment with rcond=0 (floor=0: C inverted "
        f"as it is), got eigenvalues from {ev[0]:.3g} to {ev[-1]:.3g} (C from fewer keys "
        f"than its dimension?); pass rcond > 0 (floor > 0 through a layer view; e.g. 1e-6) to "
        f"floor its eigenvalues")


def _refuse_nonfinite(sol: LinearSolution) -> LinearSolution:
  """Eagerly, factors that overflowed are an error rather than a NaN model."""
  hint = (" (the inputs passed the checks; C or the keys' Gram matrix is too "
          "ill-conditioned for the compute dtype: raise rcond or use insert_ridge)")
  check_finite(sol.lam, "lam", hint)
  check_finite(sol.D, "D", hint)
  return sol


def insert_closed_form(W: Any, C: Any, keys: Any, values: Any, *,
                       rcond: float = 1e-6) -> LinearSolution:
  """The exact constrained insert of n pairs (kᵢ, vᵢ) into a linear memory W.

  Solves min ‖ΔW‖²_C = tr(ΔW C ΔWᵀ) subject to (W + ΔW) kᵢ = vᵢ. With K (n, in) the keys
  as rows and R = V − K Wᵀ the residuals, the solution is

    ΔW = Λ D,  D = (C⁻¹ Kᵀ)ᵀ,  Λ = Rᵀ (K C⁻¹ Kᵀ)⁻¹,

  so any key k with kᵀ C⁻¹ Kᵀ = 0 keeps its output W k.

  Checks: W, C, keys and values finite; C symmetric PSD with a positive eigenvalue; the
  keys linearly independent in the C⁻¹ metric (the smallest eigenvalue of K C⁻¹ Kᵀ above
  1e-6 times the largest). Eagerly a failed check raises a ``ValueError``; under
  ``jax.jit`` the same conditions are evaluated in the program and ``lam`` and
  ``D`` are all NaN when one fails.

  Args:
    W: (out, in) weight (math layout; a Flax Dense kernel is Wᵀ).
    C: (in, in) second moment of keys.
    keys: (n, in) keys K*, linearly independent.
    values: (n, out) target values V*.
    rcond: relative eigenvalue floor of C, in [0, 1); 0 inverts C as it is, which must
      then be positive definite (else ValueError); its accuracy is then about cond(C)
      times the compute dtype's resolution.

  Returns:
    :class:`LinearSolution` (lam (out, n), D (n, in)): float64 when any input is
    float64 (with x64), else float32.

  Example:
    >>> import jax.numpy as jnp, memedit
    >>> W = jnp.zeros((2, 3)); k = jnp.array([[1.0, 0.0, 0.0]]); v = jnp.array([[1.0, 2.0]])
    >>> s = memedit.insert_closed_form(W, jnp.eye(3), k, v)
    >>> (W + s.lam @ s.D) @ k[0]
    Array([1., 2.], dtype=float32)
  """
  W, C, keys, values = _check_linear(W, C, keys, values)
  _check_rcond(rcond, C)
  if not is_traced(keys, C, rcond):
    # K C⁻¹ Kᵀ with the C⁻¹ the insert uses: C's eigenvalues floored as in the solve
    # (an unfloored pseudo-inverse of a singular C inverts its rounding errors).
    k, c = np.asarray(keys, np.float64), np.asarray(C, np.float64)
    ev_c, U = np.linalg.eigh(0.5 * (c + c.T))
    floor = max(float(np.asarray(rcond)), TINY) * np.abs(ev_c).max()
    ev_c = np.maximum(ev_c, max(floor, float(np.finfo(C.dtype).tiny)))
    kU = k @ U
    gram = (kU / ev_c) @ kU.T
    ev = np.linalg.eigvalsh(0.5 * (gram + gram.T))
    if ev[0] <= _INDEPENDENT * max(ev[-1], 0.0):
      raise ValueError(
          f"keys: expected linearly independent keys (K C⁻¹ Kᵀ positive definite), got a "
          f"Gram matrix with eigenvalues from {ev[0]:.3g} to {ev[-1]:.3g}; use insert_ridge "
          f"or fewer keys")
  return _refuse_nonfinite(_insert_exact(W, C, keys, values, rcond))


def _gram_solve(W, C, keys, values, rcond, penalty):
  """Λ = Rᵀ (penalty·I + K C⁻¹ Kᵀ)⁻¹ and D = (C⁻¹ Kᵀ)ᵀ, with the in-graph checks: NaN
  factors when an input fails them (penalty 0: the exact insert, which also needs
  independent keys).

  The Gram matrix G = K C⁻¹ Kᵀ is never formed: forming it squares the condition number
  of the keys in the C⁻¹ metric, and ΔW = Λ D lost accuracy accordingly. With Kᵀ = Q_k R_k
  (QR), Y = C⁻¹ Q_k (orthonormal right-hand sides: no cancellation between nearly
  dependent keys) and Q_kᵀ Y = L_m L_mᵀ (Cholesky, condition number at most C's),
  G = Fᵀ F with F = L_mᵀ R_k upper triangular, so Λᵀ = F⁻¹ F⁻ᵀ R by two triangular solves
  (with a penalty, F is the R factor of [F; √penalty·I]) and D = (Y R_k)ᵀ. C⁻¹ is applied
  by Cholesky when C is well conditioned (the floor then changes nothing), else by the
  eigendecomposition with floored eigenvalues."""
  n, din = keys.shape
  qk, rk = jnp.linalg.qr(keys.T)  # (in, m), (m, n), m = min(in, n)
  # The floor only acts when κ(C) > 1 / rcond; κ is estimated from below, so the
  # Cholesky route is kept to κ ≤ 0.1 / rcond.
  y, c_ok = _psd_solve(C, qk, rcond, jnp.zeros((), C.dtype), refine=False, margin=0.1)
  m = jnp.matmul(qk.T, y, precision=HIGHEST)
  lm = jnp.linalg.cholesky(0.5 * (m + m.T))
  f = jnp.matmul(lm.T, rk, precision=HIGHEST)  # (m, n), G = fᵀ f
  sv = jnp.linalg.svd(f, compute_uv=False)  # singular values² = G's eigenvalues
  if n > din:
    independent = jnp.zeros((), bool)  # more keys than dimensions
  else:
    # G's eigenvalue ratio above _INDEPENDENT, without squaring (no under/overflow).
    independent = sv[-1] > np.sqrt(_INDEPENDENT) * sv[0]
  ok = (c_ok & jnp.all(jnp.isfinite(W)) & jnp.all(jnp.isfinite(keys))
        & jnp.all(jnp.isfinite(values)) & jnp.isfinite(penalty) & (penalty >= 0)
        & ((penalty > 0) | independent))
  # G + penalty·I = f'ᵀ f' (QR of [f; √penalty·I]; for penalty 0, f' = f).
  root = jnp.sqrt(jnp.maximum(penalty, 0.0))
  stacked = jnp.concatenate([f, root * jnp.eye(n, dtype=f.dtype)])
  fp = jnp.linalg.qr(stacked, mode="r")
  resid = values - jnp.matmul(keys, W.T, precision=HIGHEST)  # (n, out)
  t = jax.scipy.linalg.solve_triangular(fp, resid, trans=1, lower=False)
  lam_t = jax.scipy.linalg.solve_triangular(fp, t, lower=False)
  cinv_kt = jnp.matmul(y, rk, precision=HIGHEST)  # (in, n)
  cinv_kt = jnp.where(cinv_kt == 0, 0.0, cinv_kt)  # no −0.0 from the QR's signs
  return LinearSolution(jnp.where(ok, lam_t.T, jnp.nan), jnp.where(ok, cinv_kt.T, jnp.nan))


@jax.jit
def _insert_exact(W, C, keys, values, rcond):
  return _gram_solve(W, C, keys, values, rcond, jnp.zeros((), W.dtype))


def insert_ridge(W: Any, C: Any, keys: Any, values: Any, penalty: float = 1.0, *,
                 rcond: float = 1e-6) -> LinearSolution:
  """The soft insert ΔW = Rᵀ K (λ C + Kᵀ K)⁻¹ (MEMIT / TIME form), λ = ``penalty``.

  It minimises ‖(W + ΔW) Kᵀ − Vᵀ‖² + λ tr(ΔW C ΔWᵀ); as λ → 0 it approaches the exact
  insert. By the push-through identity it is factored as Λ = Rᵀ (λI + K C⁻¹ Kᵀ)⁻¹ (out, n)
  and D = (C⁻¹ Kᵀ)ᵀ (n, in), the exact insert's directions. λ weights the C-norm penalty
  and so scales C; it is not a ``ridge`` (in memedit a ridge is always a multiple of the
  identity added to C, see :func:`memedit.solve_psd`).

  Checks as :func:`insert_closed_form`, but the keys may be dependent. Under
  ``jax.jit`` inputs that fail them, or a penalty that is not a positive number, give
  ``lam`` and ``D`` all NaN instead of an error.

  Args:
    W: (out, in) weight. C: (in, in) second moment. keys: (n, in). values: (n, out).
    penalty: λ > 0, a number or a JAX scalar (passed by position or by name).
    rcond: relative eigenvalue floor, as in :func:`insert_closed_form`.

  Returns:
    :class:`LinearSolution`, float64 when any input is float64 (with x64), else float32.

  Example:
    >>> import jax.numpy as jnp, memedit
    >>> s = memedit.insert_ridge(jnp.zeros((1, 2)), jnp.eye(2), jnp.array([[1.0, 0.0]]),
    ...                          jnp.array([[2.0]]), penalty=1.0)
    >>> (s.lam @ s.D).round(3)
    Array([[1., 0.]], dtype=float32)
  """
  try:
    check_scalar(penalty, "penalty")
    positive = isinstance(penalty, jax.core.Tracer) or float(np.asarray(penalty)) > 0
  except ValueError:
    positive = False
  if not positive:
    raise ValueError(f"penalty: expected a positive number, got {penalty!r}")
  W, C, keys, values = _check_linear(W, C, keys, values)
  _check_rcond(rcond, C)
  return _refuse_nonfinite(
      _insert_ridge(W, C, keys, values, jnp.asarray(penalty, W.dtype), rcond))


@jax.jit
def _insert_ridge(W, C, keys, values, penalty, rcond):
  # Push-through identity: K (λC + KᵀK)⁻¹ = (λI + K C⁻¹ Kᵀ)⁻¹ K C⁻¹, which keeps the
  # solve well conditioned for small λ and shares D = (C⁻¹Kᵀ)ᵀ with the exact insert.
  # A non-positive λ (possible only when traced) fails the checks: NaN factors.
  sol = _gram_solve(W, C, keys, values, rcond, penalty)
  ok = penalty > 0
  return LinearSolution(jnp.where(ok, sol.lam, jnp.nan), jnp.where(ok, sol.D, jnp.nan))


def least_squares_lambda(W: Any, D: Any, keys: Any, values: Any) -> jax.Array:
  """Λ minimising ‖V − K (W + Λ D)ᵀ‖² for a linear memory and fixed D (closed form).

  Args:
    W: (out, in) weight.
    D: (r, in), the edit subspace.
    keys: (n, in) keys.
    values: (n, out) targets.

  Returns:
    Λ (out, r) = lstsq(K Dᵀ, V − K Wᵀ)ᵀ: float64 when any input is float64 (with x64),
    else float32.

  Raises:
    ValueError: inputs of the wrong shape; called eagerly, when an input holds NaN or inf
      or Λ is not finite. Under ``jax.jit`` the same conditions are evaluated in the
      program and Λ is all NaN when one fails.

  Example:
    >>> import jax.numpy as jnp, memedit
    >>> lam = memedit.least_squares_lambda(jnp.zeros((1, 2)), jnp.array([[1.0, 0.0]]),
    ...                                    jnp.array([[2.0, 5.0]]), jnp.array([[4.0]]))
    >>> lam.round(3)
    Array([[2.]], dtype=float32)
  """
  W, D, keys, values = (jnp.asarray(as_array(x, name)) for x, name in
                        ((W, "W"), (D, "D"), (keys, "keys"), (values, "values")))
  for name, x in (("W", W), ("D", D), ("keys", keys), ("values", values)):
    check_real(x, name)
  if W.ndim != 2:
    raise ValueError(f"W: expected a matrix of shape (out, in), got {tuple(W.shape)}")
  out, din = W.shape
  if D.ndim != 2 or D.shape[1] != din:
    raise ValueError(f"D: expected shape (r, {din}) to match W {tuple(W.shape)}, got "
                     f"{tuple(D.shape)}")
  if keys.ndim != 2 or keys.shape[1] != din:
    raise ValueError(f"keys: expected shape (n, {din}) to match W {tuple(W.shape)}, got "
                     f"{tuple(keys.shape)}")
  if values.shape != (keys.shape[0], out):
    raise ValueError(f"values: expected shape ({keys.shape[0]}, {out}) to match keys "
                     f"{tuple(keys.shape)} and W {tuple(W.shape)}, got {tuple(values.shape)}")
  # Float64 inputs (with jax_enable_x64) are solved in float64, all others in float32.
  dt = compute_dtype(W, D, keys, values)
  W, D, keys, values = (x.astype(dt) for x in (W, D, keys, values))
  inputs = (("W", W), ("D", D), ("keys", keys), ("values", values))
  for name, x in inputs:
    check_finite(x, name)
  A = jnp.matmul(keys, D.T, precision=HIGHEST)  # (n, r)
  R = values - jnp.matmul(keys, W.T, precision=HIGHEST)
  lam = jnp.linalg.lstsq(A, R)[0].T
  ok = jnp.all(jnp.isfinite(lam))
  for _, x in inputs:
    ok = jnp.logical_and(ok, jnp.all(jnp.isfinite(x)))
  if not isinstance(ok, jax.core.Tracer) and not bool(ok):
    raise ValueError("lam: expected a finite Λ, got NaN or inf (K Dᵀ or the residuals "
                     "overflow)")
  return jnp.where(ok, lam, jnp.nan)
