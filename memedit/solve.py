"""Solving for Λ in W1 = W0 + ΔK(Λ, D) for any pure f(W, k), inside one jitted program.

The subspace D is fixed (:func:`memedit.context_directions`) and only Λ is optimised, by
Λ-space Adam (:func:`memedit.optim.adam_scan`) or by Levenberg–Marquardt Gauss–Newton with
matrix-free conjugate gradients. The kernel layouts ΔK(Λ, D) are those of
:mod:`memedit.layouts`; linear memories have closed forms in :mod:`memedit.closed_form`.
A progress hook (``solve_lambda(..., progress=)``) sees the loss while the compiled solve
runs, through ``jax.debug.callback``, without changing its result.
"""

from __future__ import annotations

import functools
import itertools
import threading
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from memedit._convs import patched
from memedit._factored import factored_forward
from memedit.checks import (as_array, check_positive_int, check_real, check_scalar,
                            expand_weights, is_traced, weights_fit)
from memedit.layouts import kernel_delta, key_dim, lambda_shape
from memedit.optim import LOSSES, OPTIMIZERS, adam_scan, check_choice, residual_loss

__all__ = ["SolveResult", "lambda_loss_fn", "solve_lambda"]


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

  Example:
    >>> import jax.numpy as jnp, memedit
    >>> res = memedit.solve_lambda(lambda K, k: k @ K, jnp.zeros((2, 1)), jnp.eye(2)[:1],
    ...                            jnp.eye(2)[:1], jnp.ones((1, 1)), steps=3)
    >>> res.lam.shape, res.losses.shape, bool(res.finite)
    ((1, 1), (3,), True)
  """

  lam: jax.Array
  losses: jax.Array
  final_loss: jax.Array
  finite: jax.Array


def _weighted_loss(pred, targets, weights, loss):
  r = pred - targets
  if weights is None:
    return residual_loss(r, loss)
  e = jnp.abs(r) if loss == "l1" else r * r
  w = expand_weights(weights, targets.shape).astype(jnp.float32)
  return jnp.sum(w * e) / jnp.maximum(jnp.sum(w), 1e-30)


def _check_weight_values(weights) -> None:
  """Concrete weights must be finite and non-negative with a positive one (a negative
  weight makes the loss unbounded below; all zero weights leave nothing to fit)."""
  if is_traced(weights):
    return
  w = np.asarray(weights)
  if not np.isfinite(w).all():
    raise ValueError("weights: expected finite weights, got NaN or inf")
  if (w < 0).any():
    raise ValueError(f"weights: expected non-negative weights, got {int((w < 0).sum())} "
                     f"negative (smallest {float(w.min()):.3g})")
  if not (w > 0).any():
    raise ValueError("weights: expected at least one positive weight (a position to fit), "
                     "got all zero")


def solve_lambda(
    f: Callable[[jax.Array, Any], Any],
    kernel0: Any,
    D: Any,
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
    factored: bool = True,
    lam_mask: Any = None,
    progress: Callable[[int, float], Any] | None = None,
    progress_every: int | None = None,
    keep_best: bool = True,
    chunk_steps: int | None = None,
) -> SolveResult:
  """Finds Λ = argmin_Λ loss(f(K0 + ΔK(Λ, D), keys), targets) inside one jitted program.

  This is the paper's eq. 8 for a non-linear memory (e.g. StyleGAN2's modulated convolution,
  whose demodulation depends on the kernel): D is fixed and only Λ is optimised.

  - ``optimizer="adam"`` (Λ-space Adam with the reference's settings): optax Adam with
    ``learning_rate`` for ``steps`` steps inside ``lax.scan``, gradients by ``jax.grad``
    (:func:`memedit.optim.adam_scan`). Adam does not lower the loss at every step; the
    result is the point of lowest loss among Λ_0 … Λ_steps (``keep_best``, the default),
    or, with ``keep_best=False``, the last point Λ_steps as in the reference.
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

  Progress: ``progress(step, loss)`` is called while the compiled solve runs, from the
  runtime's callback thread (``jax.debug.callback`` inside the loop), with the loss
  before step ``step`` (= ``losses[step]``) every ``progress_every`` steps, and once at
  the end with ``(steps, final_loss)``. With a hook the solve runs in chunks of
  ``chunk_steps`` steps, each a call of one compiled scan with the solver's state carried
  from the last (the start, which makes the solver's state, and the end are two more
  programs, without the step; when ``steps`` is not a multiple of ``chunk_steps`` the
  start also runs the first ``steps mod chunk_steps`` steps, a second program of the
  step). The hook only observes: the chunks are the same steps with a host call added,
  and give the same Λ and losses bit for bit; the programs serve every hook (hooks are
  looked up by a number passed as an argument), and the chunk and end programs every
  number of steps, so a new hook does not recompile. An exception the hook raises stops
  the solve at the end of the chunk it was raised in, and ``solve_lambda`` raises it (the
  hook is not called again): a hook that raises when asked to is how a running solve is
  cancelled. A hook needs an eager call (not under ``jax.jit`` or ``jax.vmap``).

  Args:
    f: pure function (kernel, keys) → values; kernel in its own layout, keys any pytree.
    kernel0: the original kernel K0.
    D: (r, d), the edit subspace.
    keys: keys (any pytree f accepts).
    targets: target values V*, shaped like f's output.
    kind, in_ndim: kernel layout (see the module docstring).
    weights: optional non-negative position weights aligned with the targets' leading
      axes from the left (above), at least one positive; other shapes, and concrete
      weights that are negative, NaN, inf or all zero, raise.
    loss: "l1" or "l2".
    optimizer: "adam" or "gauss_newton".
    steps: optimiser steps.
    learning_rate: Adam's learning rate, a positive number (or a traced scalar).
    lam0: initial Λ (zeros by default).
    cg_steps: CG iterations per Gauss–Newton step.
    damping: initial Levenberg–Marquardt μ ≥ 0, relative to the curvature along the
      gradient. μ then follows Nielsen's rule (shrunk by the gain ratio of actual to
      predicted loss reduction, doubled geometrically while steps are refused). Small
      values (1e-3) take the fastest first steps on mild problems; the default 0.1 makes
      a saturating f (e.g. tanh) less likely to jump into a plateau it cannot leave, but
      does not rule it out: on 16 random tanh(k K) problems with reachable targets
      (64→32, two keys, rank 2, L2, 30 steps) it ended on such a plateau in 2, where
      Adam did not.
    conv_as_matmul: compute f's convolutions as patches × kernel (same values). XLA:CPU
      runs kernel-gradient convolutions inside compiled loops 20–35× slower than outside
      them; this form avoids that. Default: on when the backend is the CPU.
    factored: split f's linear uses of the kernel (a ``dot_general`` or ungrouped
      convolution contracting the keys with the kernel's key axes, possibly after
      scalings, casts, reversals, transposes and reshapes of the kernel) into K0's part,
      computed once before the loop, and ΔK's, computed from the keys projected onto D:
      contract(keys, K0 + ΔK) = contract(keys, K0) + contract(keys·Dᵀ, Λ). A step then
      costs r/d of the full contraction there; the other uses of the kernel (e.g. a
      demodulation) see K0 + ΔK as before. Same values up to float rounding. Default on;
      off computes f on the full kernel at every step.
    lam_mask: optional 0/1 array broadcastable to Λ's shape: the edit is ΔK(Λ ⊙ M, D), so
      Λ is confined to M's non-zero entries, and the returned Λ is zero elsewhere (e.g.
      a convolution edit restricted to some kernel taps, see
      :func:`memedit.generators.own_taps`).
    progress: optional hook ``progress(step: int, loss: float)`` (see Progress above).
    progress_every: steps between calls of the hook (default: every step up to 200
      steps, else about 200 calls in all, and at least one call per chunk of
      ``chunk_steps``, so that a hook that raises stops the solve within a chunk).
    keep_best: Adam only: return the visited Λ of lowest loss (the start, each step's
      point and the last; the earliest of equal losses) instead of the last one. Gauss–
      Newton keeps a step only when it lowers the loss, so its last point is its best.
    chunk_steps: steps per compiled chunk of a solve with a progress hook (default:
      ``CHUNK_STEPS[optimizer]``, 100 Adam or 5 Gauss–Newton steps); only with ``progress``.

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
    >>> seen = []
    >>> res = memedit.solve_lambda(f, K0, D, keys, v, loss="l2", optimizer="gauss_newton",
    ...                            steps=5, progress=lambda t, l: seen.append(t))
    >>> seen
    [0, 1, 2, 3, 4, 5]
  """
  check_choice(loss, LOSSES, "loss")
  check_choice(optimizer, OPTIMIZERS, "optimizer")
  steps = check_positive_int(steps, "steps")
  try:
    check_scalar(learning_rate, "learning_rate")
    positive = is_traced(learning_rate) or float(np.asarray(learning_rate)) > 0
  except ValueError:
    positive = False
  if not positive:
    raise ValueError(f"learning_rate: expected a positive number, got {learning_rate!r}")
  check_scalar(damping, "damping")
  kernel0 = jnp.asarray(as_array(kernel0, "kernel0"))
  D = jnp.asarray(as_array(D, "D"))
  check_real(kernel0, "kernel0")
  check_real(D, "D")
  kshape = tuple(kernel0.shape)
  d = key_dim(kshape, kind, in_ndim)
  if D.ndim != 2 or D.shape[1] != d:
    raise ValueError(f"D: expected shape (r, {d}) for a kernel of shape {kshape}, "
                     f"got {tuple(D.shape)}")
  lshape = lambda_shape(kshape, D.shape[0], kind, in_ndim)
  for leaf in jax.tree_util.tree_leaves(keys):  # keys: any pytree f accepts
    check_real(leaf, "keys")
  out = jax.eval_shape(f, kernel0, keys)
  if jnp.issubdtype(out.dtype, jnp.complexfloating):
    raise ValueError(f"f: expected real outputs (the loss is taken of real residuals), got "
                     f"dtype {out.dtype}")
  targets = jnp.asarray(as_array(targets, "targets"))
  check_real(targets, "targets")
  # Λ and the solver's state follow the problem's dtype (float64 for a float64 problem
  # under jax_enable_x64), at least float32.
  dtype = jnp.promote_types(jnp.result_type(kernel0.dtype, out.dtype, targets.dtype),
                            jnp.float32)
  if lam0 is None:
    lam0 = jnp.zeros(lshape, dtype)
  else:
    lam0 = jnp.asarray(as_array(lam0, "lam0"))
    check_real(lam0, "lam0")
    lam0 = lam0.astype(dtype)
    if lam0.shape != lshape:
      raise ValueError(f"lam0: expected shape {lshape}, got {tuple(lam0.shape)}")
  if tuple(out.shape) != tuple(targets.shape):
    raise ValueError(f"targets: expected shape {tuple(out.shape)} (the output of f), "
                     f"got {tuple(targets.shape)}")
  if weights is not None:
    weights = jnp.asarray(as_array(weights, "weights"))
    check_real(weights, "weights")
    weights = weights.astype(jnp.float32)
    if not weights_fit(weights.shape, targets.shape):
      raise ValueError(f"weights: expected a shape broadcastable to a leading part of the "
                       f"targets' shape {tuple(targets.shape)} (aligned with its leading "
                       f"axes, from the left), got {tuple(weights.shape)}")
    _check_weight_values(weights)
  lam_mask = _check_lam_mask(lam_mask, lshape)
  if conv_as_matmul is None:
    conv_as_matmul = jax.default_backend() == "cpu"
  cg_steps = check_positive_int(cg_steps, "cg_steps")
  chunk = _check_chunk(chunk_steps, progress, optimizer)
  every, hook = _hook(progress, progress_every, steps,
                      (kernel0, D, keys, targets, weights, lam0, lam_mask))
  if progress_every is None:
    # The hook is called in every chunk, so one that raises stops the solve within one.
    every = min(every, chunk)
  try:
    if hook:
      res = _solve_in_chunks(
          chunk, hook, every, (f, kind, in_ndim, loss, optimizer, cg_steps, bool(factored),
                               bool(conv_as_matmul), bool(keep_best)),
          (kernel0, D, keys, targets, weights, lam_mask), lam0, jnp.float32(learning_rate),
          jnp.float32(damping), steps)
      if res is not None:
        jax.block_until_ready(res)
        jax.effects_barrier()
    else:
      res = _solve(f, kind, in_ndim, loss, optimizer, steps, cg_steps, every, bool(factored),
                   bool(conv_as_matmul), bool(keep_best), kernel0, D, keys,
                   targets, weights, lam0, jnp.float32(learning_rate), jnp.float32(damping),
                   lam_mask, jnp.int32(hook))
  finally:
    entry = _HOOKS.pop(hook, None)
  if entry is not None and entry[1] is not None:
    raise entry[1]
  if not isinstance(res.finite, jax.core.Tracer) and not bool(res.finite):
    raise _non_finite(res, optimizer)
  return res


_HOOKS: dict[int, list] = {}
_HOOK_IDS = itertools.count(1)
_HOOK_LOCK = threading.Lock()


def _hook(progress, progress_every, steps, args) -> tuple[int, int]:
  """(every, hook number) of a progress hook; (0, 0) without one."""
  if progress_every is not None:
    progress_every = check_positive_int(progress_every, "progress_every")
  if progress is None:
    return 0, 0
  if not callable(progress):
    raise ValueError(f"progress: expected a callable progress(step, loss), got "
                     f"{type(progress).__name__}")
  if any(isinstance(a, jax.core.Tracer) for a in jax.tree_util.tree_leaves(args)):
    raise ValueError("progress: expected an eager call of solve_lambda, got traced inputs "
                     "(under jax.jit or jax.vmap); call it without progress there")
  every = max(1, -(-steps // 200)) if progress_every is None else progress_every
  with _HOOK_LOCK:
    hook = (next(_HOOK_IDS) - 1) % (2 ** 31 - 2) + 1  # an int32 > 0; 0 is no hook
    _HOOKS[hook] = [progress, None]
  return every, hook


def _check_chunk(chunk_steps, progress, optimizer) -> int:
  """Steps per compiled chunk of a solve with a progress hook."""
  if chunk_steps is None:
    return CHUNK_STEPS[optimizer]
  chunk_steps = check_positive_int(chunk_steps, "chunk_steps")
  if progress is None:
    raise ValueError(f"chunk_steps: expected only with a progress hook (chunks let the hook "
                     f"stop the solve), got chunk_steps={chunk_steps} without progress")
  return chunk_steps


def _dispatch(hook, step, loss):
  """Calls the hook registered under number ``hook`` (host side of the callback)."""
  entry = _HOOKS.get(int(hook))
  if entry is None or entry[1] is not None:
    return
  try:
    entry[0](int(step), float(loss))
  except BaseException as e:  # noqa: BLE001 - raised by solve_lambda when the solve ends
    entry[1] = e


def _emitter(every: int, steps: int, hook):
  """``emit(t, loss)`` calling the host hook on every ``every``-th step and at t = steps
  (inside the traced solve); None without a hook."""
  if isinstance(every, int) and not every:
    return None

  def emit(t, loss):
    due = jnp.logical_or(t % every == 0, t >= steps)
    lax.cond(due, lambda: jax.debug.callback(_dispatch, hook, t, loss), lambda: None)

  return emit


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
  m = jnp.asarray(as_array(lam_mask, "lam_mask"))
  check_real(m, "lam_mask")
  m = m.astype(jnp.float32)
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


def lambda_loss_fn(f, kernel0, D, keys, targets, *, kind="dense", in_ndim=1,
                   weights=None, loss="l1", lam_mask=None, factored=True
                   ) -> Callable[[jax.Array], jax.Array]:
  """The scalar loss Λ ↦ loss(f(K0 + ΔK(Λ, D), keys), targets) that :func:`solve_lambda`
  minimises (useful for checking gradients or plotting).

  Args:
    f, kernel0, D, keys, targets, kind, in_ndim, weights, loss, lam_mask, factored: as in
      :func:`solve_lambda` (factored: the Λ-independent part is computed here, once).

  Returns:
    A pure function of Λ (shape ``lambda_shape(kernel0.shape, r, kind, in_ndim)``, else
    ValueError) returning a () loss. Called on concrete values it raises a
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
  fn = _loss_fn(f, kernel0, D, keys, targets, kind, in_ndim, weights, loss,
                lam_mask, factored)
  lshape = lambda_shape(tuple(np.shape(kernel0)), np.shape(D)[0], kind, in_ndim)

  def checked(lam):
    if tuple(np.shape(lam)) != tuple(lshape):
      raise ValueError(f"lam: expected shape {tuple(lshape)} (lambda_shape of the kernel "
                       f"{tuple(np.shape(kernel0))} at rank {np.shape(D)[0]}), got "
                       f"{tuple(np.shape(lam))}")
    val = fn(lam)
    if not isinstance(val, jax.core.Tracer) and not np.isfinite(np.asarray(val)):
      raise ValueError(f"loss: expected a finite loss, got {float(val)} at this Λ: f's "
                       f"output, the keys, the targets or the weights hold NaN or inf there "
                       f"(or f overflows)")
    return val

  return checked


def _forward(f, kernel0, D, keys, kind, in_ndim, lam_mask, factored, patch):
  """Λ ↦ f(K0 + ΔK(Λ ⊙ M, D), keys); ``factored``: with the kernel's linear uses split
  (:mod:`memedit._factored`, their K0 part computed here, once)."""
  kshape = tuple(jnp.shape(kernel0))

  def delta(lam):
    return kernel_delta(lam, D, kshape, kind, in_ndim).astype(kernel0.dtype)

  if factored:
    fwd = factored_forward(f, kernel0, D, keys, kind, in_ndim, delta=delta, patch=patch)
    return lambda lam: fwd(_masked(lam, lam_mask))
  fp = patched(f) if patch else f
  return lambda lam: fp(kernel0 + delta(_masked(lam, lam_mask)), keys)


def _loss_fn(f, kernel0, D, keys, targets, kind, in_ndim, weights, loss, lam_mask,
             factored=True, patch=False):
  forward = _forward(f, kernel0, D, keys, kind, in_ndim, lam_mask, factored, patch)
  return lambda lam: _weighted_loss(forward(lam), targets, weights, loss)


def _result(lam, losses, final_loss, lam_mask, finite=True):
  lam = _masked(lam, lam_mask)
  finite = jnp.logical_and(finite, jnp.logical_and(jnp.isfinite(final_loss),
                                                   jnp.all(jnp.isfinite(lam))))
  return SolveResult(jnp.where(finite, lam, jnp.nan), losses, final_loss, finite)


def _adam_result(loss_fn, lam, losses, best, keep_best, emit, steps, lam_mask,
                 losses_finite=None):
  """The result of an Adam run that ended at ``lam`` with ``best`` = (Λ, loss) the best
  visited point (keep_best); ``losses_finite``: whether every loss is finite (None: from
  ``losses``)."""
  final = loss_fn(lam)
  finite = True
  if keep_best:
    # The best of Λ_0 … Λ_steps; a run that met a NaN or inf loss on the way still
    # fails (Adam's iterates do not come back from NaN), as without keep_best.
    best_lam, best_loss = best
    last = jnp.logical_not(best_loss <= final)
    lam = jnp.where(last, lam, best_lam)
    final = jnp.where(last, final, best_loss).astype(final.dtype)
    finite = jnp.all(jnp.isfinite(losses)) if losses_finite is None else losses_finite
  if emit is not None:
    emit(steps, final)
  return _result(lam, losses, final, lam_mask, finite)


def _gauss_newton(f, forward, loss_fn, loss, cg_steps, kernel0, keys, targets, weights,
                  dt, emit):
  """(init(lam0, damping) → carry, step(carry, t) → (carry, loss before step t)) of the
  Levenberg–Marquardt Gauss–Newton solve, in Λ's dtype ``dt`` throughout."""
  if weights is None:
    wfull = jnp.ones(targets.shape, dt)
  else:
    wfull = expand_weights(weights, targets.shape).astype(dt)

  def resid_fn(lam):
    return (forward(lam) - targets).astype(dt)

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

  def gn_step(carry, t):
    lam, cur, gsq, mu, nu = carry
    if emit is not None:
      emit(t, cur)
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
    # μ stays at least 1e-9 either way: grown from an initial damping of 0 (or below
    # 1e-9), a refused step would otherwise leave μ = 0 and refuse every later step.
    mu = jnp.where(ok, jnp.maximum(mu * shrink, 1e-9),
                   jnp.minimum(jnp.maximum(mu * nu, 1e-9), mu_max))
    nu = jnp.where(ok, 2.0, jnp.minimum(nu * 2.0, 2.0 ** 20))
    carry = (lam, jnp.where(ok, new, cur), jnp.where(ok, gsq_new, gsq), mu, nu)
    return carry, cur

  def init(lam0, damping):
    cur0, g0 = value_and_grad(lam0)
    return (lam0, cur0, jnp.sum(g0 * g0), damping.astype(dt), jnp.asarray(2.0, dt))

  return init, gn_step


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10))
def _solve(f, kind, in_ndim, loss, optimizer, steps, cg_steps, every, factored, patch,
           keep_best, kernel0, D, keys, targets, weights, lam0, learning_rate, damping,
           lam_mask, hook):
  emit = _emitter(every, steps, hook)
  forward = _forward(f, kernel0, D, keys, kind, in_ndim, lam_mask, factored, patch)

  def loss_fn(lam):
    return _weighted_loss(forward(lam), targets, weights, loss)

  if optimizer == "adam":
    lam, _, losses, *best = adam_scan(loss_fn, lam0, steps, learning_rate, callback=emit,
                                      keep_best=keep_best)
    return _adam_result(loss_fn, lam, losses, best, keep_best, emit, jnp.int32(steps),
                        lam_mask)

  init, gn_step = _gauss_newton(f, forward, loss_fn, loss, cg_steps, kernel0, keys, targets,
                                weights, lam0.dtype, emit)
  xs = None if emit is None else jnp.arange(steps, dtype=jnp.int32)
  (lam, cur, _, _, _), losses = lax.scan(gn_step, init(lam0, damping), xs, length=steps)
  if emit is not None:
    emit(jnp.int32(steps), cur)
  return _result(lam, losses, cur, lam_mask)


#: Steps per compiled chunk of a solve with a progress hook, by optimizer (a Gauss–Newton
#: step costs about cg_steps + 4 passes through f, an Adam step about 2).
CHUNK_STEPS = {"adam": 100, "gauss_newton": 5}


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10))
def _solve_part(part, f, kind, in_ndim, loss, optimizer, n, cg_steps, factored, patch,
                keep_best, kernel0, D, keys, targets, weights, lam_mask, learning_rate, hook,
                every, steps, t0, state):
  """One part of a solve run in chunks: ``part`` "start" (``state`` = (Λ0, damping)),
  "chunk" (``state`` = the solver's carry) each running ``n`` steps from step ``t0`` and
  returning (carry, their losses) (a "start" of 0 steps returns the carry alone), or
  "finish" (``state`` = (carry, whether every loss is finite), ``n`` unused) returning
  the :class:`SolveResult` without its losses (None). ``steps`` (the total) and
  ``every`` (the hook's interval) are traced, so the chunk and finish programs serve
  every total; the steps are :func:`_solve`'s, op for op."""
  emit = _emitter(every, steps, hook)
  forward = _forward(f, kernel0, D, keys, kind, in_ndim, lam_mask, factored, patch)

  def loss_fn(lam):
    return _weighted_loss(forward(lam), targets, weights, loss)

  shifted = lambda t, value: emit(t + t0, value)
  if optimizer == "adam":
    if part == "finish":
      (lam, _, *best), finite = state
      return _adam_result(loss_fn, lam, None, best, keep_best, emit, steps, lam_mask, finite)
    if part == "start":  # with n = 0, the solver's state at Λ0 alone
      lam, opt_state, losses, *best = adam_scan(loss_fn, state[0], n, learning_rate,
                                                callback=shifted, keep_best=keep_best)
      return ((lam, opt_state, *best), losses) if n else (lam, opt_state, *best)
    lam, opt_state, *best = state
    lam, opt_state, losses, *found = adam_scan(loss_fn, lam, n, learning_rate,
                                               opt_state=opt_state, callback=shifted,
                                               keep_best=keep_best)
    if keep_best:  # the earliest point of lowest loss over the chunks, as in one scan
      better = found[1] < best[1]
      best = [jnp.where(better, found[0], best[0]), jnp.where(better, found[1], best[1])]
    return (lam, opt_state, *best), losses

  dt = (state[0][0] if part == "finish" else state[0]).dtype  # Λ's
  init, gn_step = _gauss_newton(f, forward, loss_fn, loss, cg_steps, kernel0, keys, targets,
                                weights, dt, emit)
  if part == "finish":
    (lam, cur, _, _, _), _ = state
    emit(steps, cur)
    return _result(lam, None, cur, lam_mask)
  carry = init(*state) if part == "start" else state
  if not n:
    return carry
  xs = t0 + jnp.arange(n, dtype=jnp.int32)
  return lax.scan(gn_step, carry, xs, length=n)


def _solve_in_chunks(chunk, hook, every, statics, arrays, lam0, learning_rate, damping,
                     steps):
  """:func:`_solve` with a progress hook as a start and chunks of ``chunk`` steps (three
  programs, one of them with the step when ``chunk`` divides the total; else the start
  runs the first steps, and its program depends on the total), the solver's state
  carried between them; stops after the part in which the hook raised (None then). The
  hook's interval ``every`` and the total are program arguments, not compiled in."""
  total = np.int32(steps)
  first = steps - chunk * ((steps - 1) // chunk)  # in [1, chunk]; the rest are chunks
  run = lambda part, n, t0, state: _solve_part(part, *statics[:5], n, *statics[5:], *arrays,
                                               learning_rate, np.int32(hook), np.int32(every),
                                               total, np.int32(t0), state)

  def stopped(losses):
    parts.append(np.asarray(losses))  # waits for the part
    jax.effects_barrier()  # and for its calls of the hook
    return _HOOKS[hook][1] is not None

  parts: list = []
  if first == chunk:  # every step in a chunk: the start only makes the solver's state
    carry, first = run("start", 0, 0, (lam0, damping)), 0
  else:
    carry, losses = run("start", first, 0, (lam0, damping))
    if stopped(losses):
      return None
  for t0 in range(first, steps, chunk):
    carry, losses = run("chunk", chunk, t0, carry)
    if stopped(losses):
      return None
  losses = np.concatenate(parts)
  res = run("finish", 0, steps, (carry, np.isfinite(losses).all()))
  return res._replace(losses=jax.device_put(losses))
