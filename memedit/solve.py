"""Solving for the update W1 = W0 + Λ Dᵀ: closed forms for linear memories and a jitted
gradient solve over Λ for any pure f(W, k).

Kernel layouts (``kind``):

- ``"matrix"``: W of shape (out, in), the math layout; ΔW = Λ D with Λ (out, r), D (r, in).
- ``"dense"``: a Flax kernel of shape (*in_dims, *out_dims) with ``in_ndim`` leading input
  axes (Dense, DenseGeneral, Einsum); with the kernel flattened to (in, out),
  ΔK = Dᵀ Λᵀ, Λ (prod(out_dims), r), D (r, prod(in_dims)).
- ``"conv"``: a convolution kernel (*taps, C_in, C_out) with 1, 2 or 3 spatial axes
  (HWIO (kh, kw, C_in, C_out) in 2-D) and a Λ per tap:
  ΔK[y, x, i, o] = Σ_d Λ[y, x, o, d] D[d, i], Λ (kh, kw, C_out, r) (1-D: Λ (k, C_out, r),
  3-D: Λ (kd, kh, kw, C_out, r)).

Grouped convolutions (kernel (*taps, C_in/G, C_out)) use these layouts on their kernel;
:func:`grouped_factors` turns factors over the full C_in keys into such factors.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from memedit._convs import conv_as_matmul as conv_as_matmul_fn
from memedit.covariance import _weights_fit
from memedit.directions import (_check_scalar, _dtype_of, _eigh, _floor, _spectrum_ok,
                                check_covariance)

HIGHEST = lax.Precision.HIGHEST
KINDS = ("matrix", "dense", "conv")
LOSSES = ("l1", "l2")
OPTIMIZERS = ("adam", "gauss_newton")


# ----------------------------------------------------------------------------------------
# Kernel layouts.


def _check_kind(kind, kernel_shape, in_ndim):
  if kind not in KINDS:
    raise ValueError(f"kind: expected one of {KINDS}, got {kind!r}")
  nd = len(kernel_shape)
  if kind == "matrix" and nd != 2:
    raise ValueError(f"kernel: expected shape (out, in) for kind 'matrix', got {tuple(kernel_shape)}")
  if kind == "conv" and nd < 3:
    raise ValueError(f"kernel: expected an HWIO shape (kh, kw, C_in, C_out) (or with another "
                     f"number of spatial dims) for kind 'conv', got {tuple(kernel_shape)}")
  if kind == "dense" and not 1 <= in_ndim < nd:
    raise ValueError(f"in_ndim: expected 1..{nd - 1} for a dense kernel of shape "
                     f"{tuple(kernel_shape)}, got {in_ndim}")


def key_dim(kernel_shape, kind: str = "dense", in_ndim: int = 1) -> int:
  """The key dimension d of a kernel: the length of D's rows.

  Args:
    kernel_shape: the kernel's shape.
    kind: "matrix" (d = in of (out, in)), "dense" (d = prod(in_dims)) or "conv"
      (d = C_in of HWIO).
    in_ndim: leading input axes of a dense kernel.

  Returns:
    d as an int.

  Example:
    >>> import memedit
    >>> memedit.key_dim((3, 3, 16, 32), "conv"), memedit.key_dim((8, 4, 2), "dense", in_ndim=2)
    (16, 32)
  """
  _check_kind(kind, kernel_shape, in_ndim)
  if kind == "matrix":
    return int(kernel_shape[1])
  if kind == "conv":
    return int(kernel_shape[-2])
  return int(np.prod(kernel_shape[:in_ndim]))


def lambda_shape(kernel_shape, rank: int, kind: str = "dense", in_ndim: int = 1) -> tuple:
  """Shape of Λ for a kernel of ``kernel_shape`` and a rank-r subspace.

  Args:
    kernel_shape: the kernel's shape.
    rank: r, the number of rows of D.
    kind: "matrix", "dense" or "conv".
    in_ndim: leading input axes of a dense kernel.

  Returns:
    matrix: (out, r); dense: (prod(out_dims), r); conv: (*spatial, C_out, r).

  Example:
    >>> import memedit
    >>> memedit.lambda_shape((3, 3, 16, 32), 2, kind="conv")
    (3, 3, 32, 2)
  """
  _check_kind(kind, kernel_shape, in_ndim)
  if kind == "matrix":
    return (int(kernel_shape[0]), rank)
  if kind == "conv":
    return tuple(int(s) for s in kernel_shape[:-2]) + (int(kernel_shape[-1]), rank)
  return (int(np.prod(kernel_shape[in_ndim:])), rank)


def kernel_delta(lam: Any, directions: Any, kernel_shape, kind: str = "dense",
                 in_ndim: int = 1) -> jax.Array:
  """The kernel change ΔK = Λ Dᵀ laid out like the kernel.

  Args:
    lam: Λ of shape ``lambda_shape(kernel_shape, r, kind, in_ndim)``.
    directions: D of shape (r, d).
    kernel_shape: the kernel's shape.
    kind: "matrix", "dense" or "conv" (see the module docstring).
    in_ndim: leading input axes of a dense kernel.

  Returns:
    ΔK with shape ``kernel_shape``.

  Example:
    >>> import jax.numpy as jnp, memedit
    >>> memedit.kernel_delta(jnp.ones((2, 1)), jnp.array([[1.0, 0.0, 0.0]]), (3, 2)).shape
    (3, 2)
  """
  kernel_shape = tuple(int(s) for s in kernel_shape)
  lam = jnp.asarray(lam)
  directions = jnp.asarray(directions)
  d = key_dim(kernel_shape, kind, in_ndim)
  if directions.ndim != 2 or directions.shape[1] != d:
    raise ValueError(f"directions: expected shape (r, {d}) for a kernel of shape {kernel_shape}, "
                     f"got {tuple(directions.shape)}")
  want = lambda_shape(kernel_shape, directions.shape[0], kind, in_ndim)
  if tuple(lam.shape) != want:
    raise ValueError(f"lam: expected shape {want}, got {tuple(lam.shape)}")
  return _delta(lam, directions, kernel_shape, kind, in_ndim)


def _delta(lam, D, kernel_shape, kind, in_ndim):
  if kind == "matrix":
    return jnp.matmul(lam, D, precision=HIGHEST)
  if kind == "conv":
    return jnp.einsum("...od,di->...io", lam, D, precision=HIGHEST)
  flat = jnp.einsum("od,di->io", lam, D, precision=HIGHEST)
  return flat.reshape(kernel_shape)


def grouped_factors(lam: Any, directions: Any, groups: int, taps: int = 1
                    ) -> tuple[jax.Array, jax.Array]:
  """Factors of a grouped convolution's kernel edit, from factors over its full keys.

  A convolution with ``G`` feature groups acts as a block-diagonal dense kernel: the
  output channels of group g read only the input channels of group g. For factors Λ
  (..., C_out, r) and D (r, taps·C_in) over the full keys (tap-major, channel-minor), its
  edit keeps the diagonal blocks of Λ D; on the grouped kernel (*spatial, C_in/G, C_out)
  that is ΔK(Λ_G, D_G) of rank G·r with

    D_G[g·r + d, (t, i)] = D[d, (t, g·C_in/G + i)],  Λ_G[..., o, g·r + d] = Λ[..., o, d]·[o ∈ g].

  With ``taps=1`` (per-pixel keys) use them with ``kind="conv"`` (Λ (*spatial, C_out, r));
  with ``taps = prod(kernel_size)`` (patch keys) with ``kind="dense"`` and ``in_ndim =
  len(kernel_size) + 1``. To solve for Λ_G directly (:func:`solve_lambda`), pass
  ``lam_mask = grouped_factors(jnp.ones(lam_shape), D, G)[0]``: Λ_G is then confined to
  its diagonal blocks.

  Args:
    lam: Λ (..., C_out, r).
    directions: D (r, taps·C_in).
    groups: G, the layer's ``feature_group_count``.
    taps: kernel taps per key (1 for per-pixel keys).

  Returns:
    ``(lam_G, directions_G)``: (..., C_out, G·r) and (G·r, taps·C_in/G).

  Example:
    >>> import jax.numpy as jnp, memedit
    >>> lam_g, d_g = memedit.grouped_factors(jnp.ones((3, 4, 1)), jnp.ones((1, 4)), groups=4)
    >>> lam_g.shape, d_g.shape
    ((3, 4, 4), (4, 1))
  """
  lam = jnp.asarray(lam)
  D = jnp.asarray(directions)
  if D.ndim != 2 or lam.ndim < 2 or lam.shape[-1] != D.shape[0]:
    raise ValueError(f"lam, directions: expected shapes (..., C_out, r) and (r, d), got "
                     f"{tuple(lam.shape)} and {tuple(D.shape)}")
  r, d = D.shape
  cout = lam.shape[-2]
  if groups < 1 or taps < 1 or d % (taps * groups) or cout % groups:
    raise ValueError(f"groups: expected {groups} to divide C_out {cout} and the key's "
                     f"{d // max(taps, 1)} channels ({d} = taps {taps} x C_in), got "
                     f"C_out {cout} and key dimension {d}")
  cig = d // taps // groups
  dg = D.reshape(r, taps, groups, cig).transpose(2, 0, 1, 3).reshape(groups * r, taps * cig)
  l = lam.reshape(lam.shape[:-2] + (groups, cout // groups, r))
  lg = jnp.einsum("...gor,gh->...gohr", l, jnp.eye(groups, dtype=lam.dtype))
  return lg.reshape(lam.shape[:-2] + (cout, groups * r)), dg


# ----------------------------------------------------------------------------------------
# Closed forms for linear memories.


class LinearSolution(NamedTuple):
  """ΔW = lam @ directions for a matrix W (out, in).

  Attributes:
    lam: (out, n) Λ.
    directions: (n, in) D, the rows C⁻¹kᵢ (exact insert) or the ridge directions.
  """

  lam: jax.Array
  directions: jax.Array


def _check_linear(W, C, keys, values):
  W = jnp.asarray(W)
  keys = jnp.asarray(keys)
  values = jnp.asarray(values)
  if W.ndim != 2:
    raise ValueError(f"W: expected a matrix of shape (out, in), got {tuple(W.shape)}")
  out, din = W.shape
  check_covariance(C, din)
  if keys.ndim != 2 or keys.shape[1] != din:
    raise ValueError(f"keys: expected shape (n, {din}), got {tuple(keys.shape)}")
  if values.ndim != 2 or values.shape != (keys.shape[0], out):
    raise ValueError(f"values: expected shape ({keys.shape[0]}, {out}) to match keys "
                     f"{tuple(keys.shape)} and W {tuple(W.shape)}, got {tuple(values.shape)}")
  for name, x in (("keys", keys), ("values", values), ("W", W)):
    if not isinstance(x, jax.core.Tracer) and not np.all(np.isfinite(np.asarray(x))):
      raise ValueError(f"{name}: expected finite values, got NaN or inf")
  # Float64 inputs (with jax_enable_x64) are solved in float64, all others in float32.
  dt = _dtype_of(W, C, keys, values)
  return W.astype(dt), jnp.asarray(C).astype(dt), keys.astype(dt), values.astype(dt)


# The exact insert needs K C⁻¹ Kᵀ's smallest eigenvalue above this times its largest.
_INDEPENDENT = 1e-6


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
  ``directions`` are all NaN when one fails.

  Args:
    W: (out, in) weight (math layout; a Flax Dense kernel is Wᵀ).
    C: (in, in) second moment of keys.
    keys: (n, in) keys K*, linearly independent.
    values: (n, out) target values V*.
    rcond: relative eigenvalue floor of C.

  Returns:
    :class:`LinearSolution` (lam (out, n), directions (n, in)): float64 when any input is
    float64 (with x64), else float32.

  Example:
    >>> import jax.numpy as jnp, memedit
    >>> W = jnp.zeros((2, 3)); k = jnp.array([[1.0, 0.0, 0.0]]); v = jnp.array([[1.0, 2.0]])
    >>> s = memedit.insert_closed_form(W, jnp.eye(3), k, v)
    >>> (W + s.lam @ s.directions) @ k[0]
    Array([1., 2.], dtype=float32)
  """
  W, C, keys, values = _check_linear(W, C, keys, values)
  if not isinstance(keys, jax.core.Tracer) and not isinstance(C, jax.core.Tracer):
    k = np.asarray(keys, np.float64)
    gram = k @ np.linalg.lstsq(np.asarray(C, np.float64), k.T, rcond=None)[0]
    ev = np.linalg.eigvalsh(0.5 * (gram + gram.T))
    if ev[0] <= _INDEPENDENT * max(ev[-1], 1e-30):
      raise ValueError(
          f"keys: expected linearly independent keys (K C⁻¹ Kᵀ positive definite), got a "
          f"Gram matrix with eigenvalues from {ev[0]:.3g} to {ev[-1]:.3g}; use insert_ridge "
          f"or fewer keys")
  return _insert_exact(W, C, keys, values, rcond)


def _gram_solve(W, C, keys, values, rcond, penalty):
  """Λ = Rᵀ (penalty·I + K C⁻¹ Kᵀ)⁻¹ and D = (C⁻¹ Kᵀ)ᵀ (Cholesky on the n × n Gram), with
  the in-graph checks: NaN factors when an input fails them (penalty 0: the exact
  insert, which also needs independent keys)."""
  lam_raw, U = _eigh(C)
  lam_c = _floor(lam_raw, rcond, 0.0)
  cinv_kt = jnp.matmul(U, jnp.matmul(U.T, keys.T, precision=HIGHEST) / lam_c[:, None],
                       precision=HIGHEST)  # (in, n)
  gram = jnp.matmul(keys, cinv_kt, precision=HIGHEST)  # (n, n)
  gram = 0.5 * (gram + gram.T)
  ev = jnp.linalg.eigvalsh(gram)
  ok = (_spectrum_ok(lam_raw) & jnp.all(jnp.isfinite(W)) & jnp.all(jnp.isfinite(keys))
        & jnp.all(jnp.isfinite(values)) & jnp.isfinite(penalty) & (penalty >= 0)
        & ((penalty > 0) | (ev[0] > _INDEPENDENT * jnp.maximum(ev[-1], 1e-30))))
  gram = gram + penalty * jnp.eye(gram.shape[0], dtype=gram.dtype)
  resid = values - jnp.matmul(keys, W.T, precision=HIGHEST)  # (n, out)
  lam_t = jax.scipy.linalg.cho_solve(jax.scipy.linalg.cho_factor(gram, lower=True), resid)
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
  ``lam`` and ``directions`` all NaN instead of an error.

  Args:
    W: (out, in) weight. C: (in, in) second moment. keys: (n, in). values: (n, out).
    penalty: λ > 0, a number or a JAX scalar (passed by position or by name).
    rcond: relative eigenvalue floor.

  Returns:
    :class:`LinearSolution`, float64 when any input is float64 (with x64), else float32.

  Example:
    >>> import jax.numpy as jnp, memedit
    >>> s = memedit.insert_ridge(jnp.zeros((1, 2)), jnp.eye(2), jnp.array([[1.0, 0.0]]),
    ...                          jnp.array([[2.0]]), penalty=1.0)
    >>> (s.lam @ s.directions).round(3)
    Array([[1., 0.]], dtype=float32)
  """
  try:
    _check_scalar("penalty", penalty)
    positive = isinstance(penalty, jax.core.Tracer) or float(np.asarray(penalty)) > 0
  except ValueError:
    positive = False
  if not positive:
    raise ValueError(f"penalty: expected a positive number, got {penalty!r}")
  W, C, keys, values = _check_linear(W, C, keys, values)
  return _insert_ridge(W, C, keys, values, jnp.asarray(penalty, W.dtype), rcond)


@jax.jit
def _insert_ridge(W, C, keys, values, penalty, rcond):
  # Push-through identity: K (λC + KᵀK)⁻¹ = (λI + K C⁻¹ Kᵀ)⁻¹ K C⁻¹, which keeps the
  # solve well conditioned for small λ and shares D = (C⁻¹Kᵀ)ᵀ with the exact insert.
  # A non-positive λ (possible only when traced) fails the checks: NaN factors.
  sol = _gram_solve(W, C, keys, values, rcond, penalty)
  ok = penalty > 0
  return LinearSolution(jnp.where(ok, sol.lam, jnp.nan), jnp.where(ok, sol.directions, jnp.nan))


def least_squares_lambda(W: Any, directions: Any, keys: Any, values: Any) -> jax.Array:
  """Λ minimising ‖V − K (W + Λ D)ᵀ‖² for a linear memory and fixed D (closed form).

  Args:
    W: (out, in) weight.
    directions: (r, in) D.
    keys: (n, in) keys.
    values: (n, out) targets.

  Returns:
    Λ (out, r) = lstsq(K Dᵀ, V − K Wᵀ)ᵀ.

  Raises:
    ValueError: called eagerly, when an input holds NaN or inf or Λ is not finite. Under
      ``jax.jit`` the same conditions are evaluated in the program and Λ is all NaN when
      one fails.

  Example:
    >>> import jax.numpy as jnp, memedit
    >>> lam = memedit.least_squares_lambda(jnp.zeros((1, 2)), jnp.array([[1.0, 0.0]]),
    ...                                    jnp.array([[2.0, 5.0]]), jnp.array([[4.0]]))
    >>> lam.round(3)
    Array([[2.]], dtype=float32)
  """
  W = jnp.asarray(W, jnp.float32)
  D = jnp.asarray(directions, jnp.float32)
  keys = jnp.asarray(keys, jnp.float32)
  values = jnp.asarray(values, jnp.float32)
  inputs = (("W", W), ("directions", D), ("keys", keys), ("values", values))
  for name, x in inputs:
    if not isinstance(x, jax.core.Tracer) and not np.all(np.isfinite(np.asarray(x))):
      raise ValueError(f"{name}: expected finite values, got NaN or inf")
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


# ----------------------------------------------------------------------------------------
# The Λ solve for any pure f.


class SolveResult(NamedTuple):
  """Result of :func:`solve_lambda`.

  Attributes:
    lam: Λ with ``lambda_shape(kernel0.shape, r, kind, in_ndim)``.
    losses: (steps,) loss before each step.
    final_loss: () loss at the returned Λ.
    finite: () bool, whether the solve ended with a finite Λ and loss. Called eagerly,
      :func:`solve_lambda` raises instead of returning a result with ``finite`` False;
      under ``jax.jit`` or ``jax.vmap`` this flag (one per problem under vmap) is the
      check, and ``lam`` is then all NaN.
  """

  lam: jax.Array
  losses: jax.Array
  final_loss: jax.Array
  finite: jax.Array


def _expand_weights(weights, shape):
  """Broadcasts position weights over a leading part of ``shape`` to the full shape."""
  w = jnp.broadcast_to(weights, shape[:weights.ndim])
  w = w.reshape(w.shape + (1,) * (len(shape) - w.ndim))
  return jnp.broadcast_to(w, shape).astype(jnp.float32)


def _weighted_loss(pred, targets, weights, loss):
  r = pred - targets
  e = jnp.abs(r) if loss == "l1" else r * r
  if weights is None:
    return jnp.mean(e)
  w = _expand_weights(weights, targets.shape)
  return jnp.sum(w * e) / jnp.maximum(jnp.sum(w), 1e-30)


def solve_lambda(
    f: Callable[[jax.Array, Any], Any],
    kernel0: Any,
    directions: Any,
    keys: Any,
    targets: Any,
    *,
    kind: str = "dense",
    in_ndim: int = 1,
    weights: Any = None,
    loss: str = "l1",
    optimizer: str = "adam",
    steps: int = 2001,
    learning_rate: float = 0.05,
    lam0: Any = None,
    cg_steps: int = 32,
    damping: float = 0.1,
    conv_as_matmul: bool | None = None,
    lam_mask: Any = None,
) -> SolveResult:
  """Finds Λ = argmin_Λ loss(f(K0 + ΔK(Λ, D), keys), targets) inside one jitted program.

  This is the paper's eq. 8 for a non-linear memory (e.g. StyleGAN2's modulated convolution,
  whose demodulation depends on the kernel): D is fixed and only Λ is optimised.

  - ``optimizer="adam"`` (Λ-space Adam with the reference's settings): optax Adam with
    ``learning_rate`` for ``steps`` steps inside ``lax.scan``, gradients by ``jax.grad``.
  - ``optimizer="gauss_newton"``: Levenberg–Marquardt Gauss–Newton steps (``steps`` of
    them, typically 5–30) whose normal equations (JᵀΩJ + μI) δ = −JᵀΩr are solved
    matrix-free by ``cg_steps`` conjugate-gradient iterations with ``jax.linearize`` and
    its transpose; for the L1 loss Ω are iteratively reweighted least-squares weights
    w/|r|. A step is kept if it lowers the loss or, when it changes the loss by less
    than the loss's rounding error (which then cannot rank the two Λ), if it lowers the
    gradient's norm (the losses may then rise by that rounding error): the solve goes on
    to Λ accurate to about the dtype's eps instead of stopping at its square root. μ
    adapts (Nielsen's gain-ratio rule, at most 1/eps).

  Λ, the losses and the solver's state follow the problem's dtype: float64 when the
  kernel, f's output or the targets are float64 (with ``jax_enable_x64``), else float32.

  Non-finite results: called eagerly, a solve that ends with a NaN or infinite Λ or loss
  (e.g. targets or f's output holding NaN) raises a ``ValueError``; under ``jax.jit`` or
  ``jax.vmap`` nothing can be raised, and the result's ``finite`` flag is False and its
  ``lam`` all NaN instead.

  The loss is the (weighted) mean of |r| (L1, the reference's default) or r² (L2) over
  r = f(K0 + ΔK, keys) − targets; ``weights`` weight the positions. Like the weights of
  :func:`memedit.covariance_update` and :func:`memedit.context_directions` they align
  with the targets' leading axes from the left: shape (a₀, …, a_{m−1}) on targets
  (n₀, …, n_{p−1}) needs m ≤ p and aᵢ ∈ {1, nᵢ} (e.g. (B,) per image, or (B, h, w) a
  paste mask over positions), and is repeated over the remaining axes.

  Works under ``jax.vmap`` over a batch of independent problems, and calls with the same
  shapes, ``f`` and static settings reuse one compiled program.

  Args:
    f: pure function (kernel, keys) → values; kernel in its own layout, keys any pytree.
    kernel0: the original kernel K0.
    directions: D (r, d).
    keys: keys (any pytree f accepts).
    targets: target values V*, shaped like f's output.
    kind, in_ndim: kernel layout (see the module docstring).
    weights: optional non-negative position weights aligned with the targets' leading
      axes from the left (above); other shapes raise.
    loss: "l1" or "l2".
    optimizer: "adam" or "gauss_newton".
    steps: optimiser steps.
    learning_rate: Adam's learning rate.
    lam0: initial Λ (zeros by default).
    cg_steps: CG iterations per Gauss–Newton step.
    damping: initial Levenberg–Marquardt μ, relative to the curvature along the gradient.
      μ then follows Nielsen's rule (shrunk by the gain ratio of actual to predicted loss
      reduction, doubled geometrically while steps are refused). Small values (1e-3) take
      the fastest first steps on mild problems; the default 0.1 makes a saturating f
      (e.g. tanh) less likely to jump into a plateau it cannot leave, but does not rule
      it out: on 16 random tanh(k K) problems with reachable targets (64→32, two keys,
      rank 2, L2, 30 steps) it ended on such a plateau in 2, where Adam did not.
    conv_as_matmul: compute f's convolutions as patches × kernel (same values). XLA:CPU
      runs kernel-gradient convolutions inside compiled loops 20–35× slower than outside
      them; this form avoids that. Default: on when the backend is the CPU.
    lam_mask: optional 0/1 array broadcastable to Λ's shape: the edit is ΔK(Λ ⊙ M, D), so
      Λ is confined to M's non-zero entries, and the returned Λ is zero elsewhere (e.g.
      a convolution edit restricted to some kernel taps, see
      :func:`memedit.rewrite.own_taps`).

  Returns:
    :class:`SolveResult`.

  Example:
    >>> import jax.numpy as jnp, memedit
    >>> f = lambda K, k: k @ K                      # a Dense layer, kernel (in, out)
    >>> K0 = jnp.zeros((3, 2)); D = jnp.array([[1.0, 0.0, 0.0]])
    >>> keys = jnp.array([[1.0, 0.0, 0.0]]); v = jnp.array([[1.0, -1.0]])
    >>> res = memedit.solve_lambda(f, K0, D, keys, v, loss="l2", optimizer="gauss_newton",
    ...                            steps=5)
    >>> bool(res.final_loss < 1e-8)
    True
  """
  if loss not in LOSSES:
    raise ValueError(f"loss: expected one of {LOSSES}, got {loss!r}")
  if optimizer not in OPTIMIZERS:
    raise ValueError(f"optimizer: expected one of {OPTIMIZERS}, got {optimizer!r}")
  if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
    raise ValueError(f"steps: expected a positive int, got {steps!r}")
  kernel0 = jnp.asarray(kernel0)
  directions = jnp.asarray(directions)
  kshape = tuple(kernel0.shape)
  d = key_dim(kshape, kind, in_ndim)
  if directions.ndim != 2 or directions.shape[1] != d:
    raise ValueError(f"directions: expected shape (r, {d}) for a kernel of shape {kshape}, "
                     f"got {tuple(directions.shape)}")
  lshape = lambda_shape(kshape, directions.shape[0], kind, in_ndim)
  out = jax.eval_shape(f, kernel0, keys)
  targets = jnp.asarray(targets)
  # Λ and the solver's state follow the problem's dtype (float64 for a float64 problem
  # under jax_enable_x64), at least float32.
  dtype = jnp.promote_types(jnp.result_type(kernel0.dtype, out.dtype, targets.dtype),
                            jnp.float32)
  if lam0 is None:
    lam0 = jnp.zeros(lshape, dtype)
  else:
    lam0 = jnp.asarray(lam0, dtype)
    if lam0.shape != lshape:
      raise ValueError(f"lam0: expected shape {lshape}, got {tuple(lam0.shape)}")
  if tuple(out.shape) != tuple(targets.shape):
    raise ValueError(f"targets: expected shape {tuple(out.shape)} (the output of f), "
                     f"got {tuple(targets.shape)}")
  if weights is not None:
    weights = jnp.asarray(weights, jnp.float32)
    if not _weights_fit(weights.shape, targets.shape):
      raise ValueError(f"weights: expected a shape broadcastable to a leading part of the "
                       f"targets' shape {tuple(targets.shape)} (aligned with its leading "
                       f"axes, from the left), got {tuple(weights.shape)}")
  lam_mask = _check_lam_mask(lam_mask, lshape)
  if conv_as_matmul is None:
    conv_as_matmul = jax.default_backend() == "cpu"
  if conv_as_matmul:
    f = _patched(f)
  res = _solve(f, kind, in_ndim, loss, optimizer, int(steps), int(cg_steps),
               kernel0, directions, keys, targets, weights, lam0,
               jnp.float32(learning_rate), jnp.float32(damping), lam_mask)
  if not isinstance(res.finite, jax.core.Tracer) and not bool(res.finite):
    raise _non_finite(res, optimizer)
  return res


def _non_finite(res, optimizer):
  """The eager error for a solve that ended with a NaN or infinite Λ or loss."""
  losses = np.asarray(res.losses)
  bad = np.nonzero(~np.isfinite(losses))[0]
  if bad.size and bad[0] == 0:
    why = ("the loss is NaN or inf already at Λ0: f's output, the keys, the targets or the "
           "weights hold NaN or inf there (or f overflows)")
  elif bad.size:
    why = f"the loss became NaN or inf at step {bad[0]}" + (
        "; a smaller learning_rate may keep Adam finite" if optimizer == "adam" else "")
  else:
    why = "f's output at the returned Λ holds NaN or inf"
  return ValueError(f"lam: expected solve_lambda to end with a finite Λ and loss, got a "
                    f"final loss of {float(res.final_loss)}; {why}")


def _check_lam_mask(lam_mask, lshape):
  if lam_mask is None:
    return None
  m = jnp.asarray(lam_mask, jnp.float32)
  try:
    ok = tuple(np.broadcast_shapes(m.shape, lshape)) == tuple(lshape)
  except ValueError:
    ok = False
  if not ok:
    raise ValueError(f"lam_mask: expected a shape broadcastable to Λ's {tuple(lshape)}, got "
                     f"{tuple(m.shape)}")
  return m


def _masked(lam, lam_mask):
  return lam if lam_mask is None else lam * lam_mask


@functools.lru_cache(maxsize=128)
def _patched(f):
  # Cached so that the same f keeps one compiled solve.
  return conv_as_matmul_fn(f)


def lambda_loss_fn(f, kernel0, directions, keys, targets, *, kind="dense", in_ndim=1,
                   weights=None, loss="l1", lam_mask=None) -> Callable[[jax.Array], jax.Array]:
  """The scalar loss Λ ↦ loss(f(K0 + ΔK(Λ, D), keys), targets) that :func:`solve_lambda`
  minimises (useful for checking gradients or plotting).

  Args:
    f, kernel0, directions, keys, targets, kind, in_ndim, weights, loss, lam_mask: as in
      :func:`solve_lambda`.

  Returns:
    A pure function of Λ returning a () loss. Called on concrete values it raises a
    ``ValueError`` when the loss is NaN or inf; under a transformation (``jax.jit``,
    ``jax.grad``, ``jax.vmap``) it returns the value unchecked, for the caller to test
    with ``jnp.isfinite``.

  Example:
    >>> import jax, jax.numpy as jnp, memedit
    >>> fn = memedit.lambda_loss_fn(lambda K, k: k @ K, jnp.zeros((2, 1)),
    ...                             jnp.array([[1.0, 0.0]]), jnp.array([[1.0, 0.0]]),
    ...                             jnp.array([[3.0]]), loss="l2")
    >>> float(fn(jnp.zeros((1, 1)))), float(jax.grad(fn)(jnp.zeros((1, 1)))[0, 0])
    (9.0, -6.0)
  """
  fn = _loss_fn(f, kernel0, directions, keys, targets, kind, in_ndim, weights, loss,
                lam_mask)

  def checked(lam):
    val = fn(lam)
    if not isinstance(val, jax.core.Tracer) and not np.isfinite(np.asarray(val)):
      raise ValueError(f"loss: expected a finite loss, got {float(val)} at this Λ: f's "
                       f"output, the keys, the targets or the weights hold NaN or inf there "
                       f"(or f overflows)")
    return val

  return checked


def _loss_fn(f, kernel0, directions, keys, targets, kind, in_ndim, weights, loss, lam_mask):
  kshape = tuple(jnp.shape(kernel0))

  def fn(lam):
    kernel = kernel0 + _delta(_masked(lam, lam_mask), directions, kshape, kind,
                              in_ndim).astype(kernel0.dtype)
    return _weighted_loss(f(kernel, keys), targets, weights, loss)

  return fn


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4, 5, 6))
def _solve(f, kind, in_ndim, loss, optimizer, steps, cg_steps, kernel0, directions, keys,
           targets, weights, lam0, learning_rate, damping, lam_mask):
  kshape = kernel0.shape
  loss_fn = _loss_fn(f, kernel0, directions, keys, targets, kind, in_ndim, weights, loss,
                     lam_mask)

  def result(lam, losses, final_loss):
    lam = _masked(lam, lam_mask)
    finite = jnp.logical_and(jnp.isfinite(final_loss), jnp.all(jnp.isfinite(lam)))
    return SolveResult(jnp.where(finite, lam, jnp.nan), losses, final_loss, finite)

  if optimizer == "adam":
    opt = optax.adam(learning_rate)

    def step(carry, _):
      lam, st = carry
      val, g = jax.value_and_grad(loss_fn)(lam)
      upd, st = opt.update(g, st, lam)
      return (optax.apply_updates(lam, upd), st), val

    (lam, _), losses = lax.scan(step, (lam0, opt.init(lam0)), None, length=steps)
    return result(lam, losses, loss_fn(lam))

  # Gauss–Newton / Levenberg–Marquardt with matrix-free CG, in Λ's dtype throughout.
  dt = lam0.dtype
  if weights is None:
    wfull = jnp.ones(targets.shape, dt)
  else:
    wfull = _expand_weights(weights, targets.shape).astype(dt)

  def resid_fn(lam):
    kernel = kernel0 + _delta(_masked(lam, lam_mask), directions, kshape, kind,
                              in_ndim).astype(kernel0.dtype)
    return (f(kernel, keys) - targets).astype(dt)

  def value_and_grad(lam):
    val, g = jax.value_and_grad(loss_fn)(lam)
    return val.astype(dt), g

  # The quadratic model's reduction is c·Σ ω (r² − (r + Jδ)²) / Σ w: c = 1 for L2, and
  # c = ½ for L1, whose IRLS model |x| ≤ x²/(2|r|) + |r|/2 majorises the loss.
  half = 0.5 if loss == "l1" else 1.0
  norm = jnp.maximum(jnp.sum(wfull), 1e-30)
  # The coarsest precision the loss is computed in (kernel, f's output, targets, Λ).
  out_dtype = jax.eval_shape(f, kernel0, keys).dtype
  eps = max(float(jnp.finfo(t).eps) for t in (dt, kernel0.dtype, out_dtype, targets.dtype)
            if jnp.issubdtype(t, jnp.floating))
  # μ stays below 1/eps: a larger one only gives steps too small to change Λ.
  mu_max = 1.0 / eps

  def gn_step(carry, _):
    lam, cur, gsq, mu, nu = carry
    r, jvp = jax.linearize(resid_fn, lam)
    vjp = jax.linear_transpose(jvp, lam)
    if loss == "l1":
      eps_r = 1e-3 * jnp.sum(wfull * jnp.abs(r)) / norm + 1e-12
      omega = wfull / jnp.maximum(jnp.abs(r), eps_r)
    else:
      omega = wfull
    g = vjp(omega * r)[0]

    def normal(v):
      return vjp(omega * jvp(v))[0]

    # Scale μ by the mean curvature along the gradient direction.
    gn = jnp.sqrt(jnp.sum(g * g)) + 1e-30
    scale = jnp.sum(g * normal(g / gn) / gn)
    lm = mu * jnp.maximum(scale, 1e-30)

    def cg_body(c, _):
      x, rr, p, rs = c
      ap = normal(p) + lm * p
      alpha = rs / jnp.maximum(jnp.sum(p * ap), 1e-30)
      x = x + alpha * p
      rr = rr - alpha * ap
      rs_new = jnp.sum(rr * rr)
      p = rr + (rs_new / jnp.maximum(rs, 1e-30)) * p
      return (x, rr, p, rs_new), None

    b = -g
    (delta, _, _, _), _ = lax.scan(cg_body, (jnp.zeros_like(lam), b, b, jnp.sum(b * b)), None,
                                   length=cg_steps)
    cand = lam + delta
    new, g_new = value_and_grad(cand)
    gsq_new = jnp.sum(g_new * g_new)
    jd = jvp(delta)
    predicted = -half * jnp.sum(omega * jd * (2.0 * r + jd)) / norm
    # Loss values closer than their rounding cannot rank two Λ: each residual carries an
    # error of about eps·|f|, which moves the loss by up to eps·Σ w |ψ'(r)| |f| / Σ w
    # (ψ' = sign(r) for L1, 2r for L2), and summing adds about eps·loss. A step that
    # changes the loss by less is kept when it lowers the gradient's norm, so the solve
    # goes on past the loss's resolution (Λ to about eps, not √eps) instead of stalling.
    slope = 1.0 if loss == "l1" else 2.0 * jnp.abs(r)
    fabs = jnp.abs(r + targets.astype(dt))
    noise = eps * (jnp.abs(cur) + jnp.sum(wfull * slope * fabs) / norm)
    lower = new < cur
    tie = jnp.logical_and(jnp.abs(new - cur) <= noise, gsq_new < gsq)
    ok = jnp.logical_and(jnp.logical_and(jnp.isfinite(new), jnp.isfinite(gsq_new)),
                         jnp.logical_or(lower, tie))
    lam = jnp.where(ok, cand, lam)
    # Nielsen's rule: shrink μ by how well the model predicted the actual reduction
    # (gain ratio ρ), grow it geometrically while steps are refused. Where both
    # reductions are below the loss's resolution ρ says nothing, and a kept step counts
    # as well predicted.
    rho = (cur - new) / jnp.maximum(predicted, 1e-30)
    rho = jnp.where(jnp.maximum(predicted, jnp.abs(cur - new)) <= noise, 1.0, rho)
    shrink = jnp.maximum(1.0 / 3.0, 1.0 - (2.0 * jnp.clip(rho, 0.0, 1.0) - 1.0) ** 3)
    mu = jnp.where(ok, jnp.maximum(mu * shrink, 1e-9), jnp.minimum(mu * nu, mu_max))
    nu = jnp.where(ok, 2.0, jnp.minimum(nu * 2.0, 2.0 ** 20))
    carry = (lam, jnp.where(ok, new, cur), jnp.where(ok, gsq_new, gsq), mu, nu)
    return carry, cur

  cur0, g0 = value_and_grad(lam0)
  init = (lam0, cur0, jnp.sum(g0 * g0), damping.astype(dt), jnp.asarray(2.0, dt))
  (lam, cur, _, _, _), losses = lax.scan(gn_step, init, None, length=steps)
  return result(lam, losses, cur)
