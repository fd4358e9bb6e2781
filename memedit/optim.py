"""Minimisation inside one compiled program: the solver choices and Adam in ``lax.scan``.

Every first-order solve in memedit (the Λ-space Adam of :func:`memedit.solve_lambda`,
the whole-kernel runs of the projected and overfit baselines) is :func:`adam_scan`: one
``lax.scan`` of optax Adam steps with gradients by ``jax.grad``, so a run of any length is
one program and compiles once per problem structure.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax import lax

__all__ = ["LOSSES", "OPTIMIZERS", "adam_scan", "check_choice", "residual_loss"]

#: Residual losses: mean absolute error (the reference's) and mean squared error.
LOSSES = ("l1", "l2")
#: Λ solvers: Adam (the reference's) and Gauss–Newton / Levenberg–Marquardt.
OPTIMIZERS = ("adam", "gauss_newton")


def check_choice(value: Any, choices: tuple[str, ...], name: str) -> str:
  """Returns ``value`` if it is one of ``choices``, else raises a ValueError naming both.

  Example:
    >>> check_choice("l1", LOSSES, "loss")
    'l1'
  """
  if not isinstance(value, str) or value not in choices:
    raise ValueError(f"{name}: expected one of {choices}, got {value!r}")
  return value


def residual_loss(residual: jax.Array, loss: str) -> jax.Array:
  """mean|r| for ``loss="l1"``, mean r² for ``"l2"`` over every element of ``residual``.

  Example:
    >>> float(residual_loss(jnp.array([1.0, -3.0]), "l2"))
    5.0
  """
  check_choice(loss, LOSSES, "loss")
  return jnp.mean(jnp.abs(residual)) if loss == "l1" else jnp.mean(jnp.square(residual))


def adam_scan(loss_fn: Callable[[Any], jax.Array], x0: Any, steps: int,
              learning_rate: float | jax.Array, *, opt_state: Any = None,
              b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
              callback: Callable[[jax.Array, jax.Array], Any] | None = None,
              keep_best: bool = False
              ) -> tuple[Any, Any, jax.Array]:
  """``steps`` optax Adam steps on ``loss_fn`` from ``x0``, as one ``lax.scan``.

  x_{t+1} = x_t + adam(∇loss(x_t)); traceable (call it inside ``jax.jit``), the learning
  rate may be a traced scalar, ``steps`` must be a static Python int ≥ 0.

  Args:
    loss_fn: pytree x → scalar loss.
    x0: the starting point, any pytree of float arrays.
    steps: the number of steps (static).
    learning_rate: Adam's step size (float or traced scalar).
    opt_state: Adam's state to continue from (None: fresh, zero moments).
    b1, b2, eps: Adam's constants (optax's defaults).
    callback: optional ``callback(t, loss_t)``, called while tracing the loop's body with
      the traced step index t (int32) and loss before step t, e.g. to emit progress with
      ``jax.debug.callback``; its return value is ignored (None: the loop is unchanged).
    keep_best: also carry the point of lowest loss among x_0 … x_{steps−1} through the
      loop (Adam's iterates do not lower the loss monotonically; with a step size too
      large for the problem its last point can be worse than its start), see Returns.

  Returns:
    (x, opt_state, losses): the point after the steps, Adam's state there (to continue a
    run, e.g. between projections), and the (steps,) losses, losses[t] = loss(x_t) before
    step t. With ``keep_best``, (x, opt_state, losses, best, best_loss): the same, plus
    the visited point of lowest loss (the first of equals; ties and NaN never replace
    it) and its loss, +inf and x_0 when ``steps`` is 0 or every loss is NaN. x_steps is
    not among them: its loss is not computed here.

  Example:
    >>> x, _, losses = adam_scan(lambda x: jnp.sum((x - 3.0) ** 2), jnp.zeros(2), 500, 0.1)
    >>> bool(jnp.allclose(x, 3.0, atol=1e-2)), losses.shape
    (True, (500,))
  """
  if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
    raise ValueError(f"steps: expected a non-negative Python int, got {steps!r}")
  opt = optax.adam(learning_rate, b1=b1, b2=b2, eps=eps)
  state = opt.init(x0) if opt_state is None else opt_state

  def step(carry, t):
    x, st = carry[:2]
    val, g = jax.value_and_grad(loss_fn)(x)
    if callback is not None:
      callback(t, val)
    upd, st = opt.update(g, st, x)
    new = (optax.apply_updates(x, upd), st)
    if keep_best:
      best, best_val = carry[2:]
      better = val < best_val
      best = jax.tree.map(lambda a, b: jnp.where(better, a, b), x, best)
      new += (best, jnp.where(better, val, best_val))
    return new, val

  xs = None if callback is None else jnp.arange(steps, dtype=jnp.int32)
  carry = (x0, state)
  out = jax.eval_shape(loss_fn, x0)
  if keep_best:
    carry += (x0, jnp.full(out.shape, jnp.inf, out.dtype))
  if not steps:  # the initial state alone: no step is traced or compiled
    return (*carry[:2], jnp.zeros((0, *out.shape), out.dtype), *carry[2:])
  carry, losses = lax.scan(step, carry, xs, length=steps)
  return (*carry[:2], losses, *carry[2:])
