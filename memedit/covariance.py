"""Streaming second moments of keys: the C = E[k kᵀ] of a layer viewed as a memory.

The public face of memedit's statistics, and the results read from a state:

- the state and its arithmetic (:mod:`memedit.moments`): :class:`CovarianceState`,
  ``covariance_init`` / ``covariance_update`` / ``covariance_merge``, pure functions in
  the style of optax's init/update pairs;
- streams of batches folded inside compiled programs (:mod:`memedit.stream`):
  :func:`stream_covariance`, cached under :func:`covariance_cache_key`;
- the results: :func:`key_count`, :func:`total_weight`, :func:`key_mean`,
  :func:`centered_covariance`, :func:`second_moment` (defined here).

The fold's O(n d²) step, the Gram matrix of a chunk, is :func:`memedit.gram.gram`: BLAS
``syrk`` (half a GEMM) on CPU, XLA's GEMM on GPU and TPU.

Accuracy. Sums are accumulated *shifted*: with a shift c (the weighted mean of the first
batch) the state holds

  W = Σ wᵢ,   s = Σ wᵢ (kᵢ − c),   S = Σ wᵢ (kᵢ − c)(kᵢ − c)ᵀ,

from which

  mean μ = c + s / W,
  centered Σ = S / W − (s / W)(s / W)ᵀ,
  uncentered C = E[k kᵀ] = Σ + μ μᵀ.

Shifting keeps both C and Σ accurate in float32 even when the keys' mean is many standard
deviations away from zero. All matmuls use ``Precision.HIGHEST`` with accumulation in the
state's dtype. The number of keys is kept exactly as two uint32 words (exact up to 2⁶⁴)
and the total weight as a compensated (Kahan) pair, so neither degrades past 2²⁴ keys the
way a float32 counter would.

Dtypes. A state is float32 unless made float64 (``covariance_init(..., dtype=float64)``,
or by :func:`covariance_update` with float64 keys); float64 needs ``jax_enable_x64``, and
without it float64 inputs are float32 arrays to JAX and are folded in float32.

Weights. Sample weights are aligned with the keys' *leading* axes, numpy-style from the
left: weights of shape (a₀, …, a_{m−1}) on keys (n₀, …, n_{p−1}, d) need m ≤ p and
aᵢ ∈ {1, nᵢ}, and are repeated over the remaining axes; so (B,) weights weight each of B
images of keys (B, h, w, d) and (B, h, w) weights each pixel. Other shapes are refused.

Invalid inputs. A key holding NaN or ±inf, or whose weight is NaN, ±inf or negative, is
not folded; it is counted in ``nonfinite``. The result functions (:func:`key_mean`,
:func:`centered_covariance`, :func:`second_moment`) refuse a state with such keys, with no
key of positive weight, or with sums or a result that are not finite (finite keys whose
squares overflow the state's dtype): eagerly with a ``ValueError``; under ``jax.jit``,
where nothing can be raised, their result is all NaN instead.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np

from memedit.checks import is_traced
from memedit.moments import (CovarianceState, check_state, covariance_init, covariance_merge,
                             covariance_update)
from memedit.stream import stream_covariance
from memedit.stream_cache import covariance_cache_key

__all__ = ["CovarianceState", "centered_covariance", "covariance_cache_key", "covariance_init",
           "covariance_merge", "covariance_update", "key_count", "key_mean", "second_moment",
           "stream_covariance", "total_weight"]


def key_count(state: CovarianceState) -> int:
  """The exact number of keys folded into ``state`` (finite, non-zero weight).

  Args:
    state: a :class:`CovarianceState`.

  Returns:
    A Python int (exact past 2³² keys: the count is kept as two uint32 words).

  Raises:
    ValueError: ``state`` is traced (a Python int cannot be returned under ``jax.jit``
      or ``jax.vmap``), or is a batch of states.

  Example:
    >>> import numpy as np, memedit
    >>> memedit.key_count(memedit.covariance_update(memedit.covariance_init(2), np.ones((5, 2))))
    5
  """
  check_state(state)
  if is_traced(state.count):
    raise ValueError(
        "key_count: expected a concrete state (it returns a Python int), got a traced one "
        "(under jax.jit, jax.vmap or another transformation); call it outside, or read the "
        "count inside as state.count, two uint32 words [low, high]")
  c = np.asarray(state.count, np.uint64)
  return int(c[0]) + (int(c[1]) << 32)


def total_weight(state: CovarianceState) -> jax.Array:
  """The total weight W = Σ wᵢ (equals the key count when no weights were given).

  Args:
    state: a :class:`CovarianceState`.

  Returns:
    () in the state's dtype (float32 or float64).

  Example:
    >>> import numpy as np, memedit
    >>> s = memedit.covariance_update(memedit.covariance_init(2), np.ones((4, 2)), np.full(4, 0.5))
    >>> float(memedit.total_weight(s))
    2.0
  """
  check_state(state)
  return state.weight[0] - state.weight[1]


def _values(state: CovarianceState, kind: str):
  """A result read from ``state`` and what its checks need, in one traceable function:
  (value, total weight, sums finite, value finite)."""
  w = state.weight[0] - state.weight[1]
  m = state.sum / w
  if kind == "key_mean":
    value = state.shift + m
  elif kind == "centered_covariance":
    cov = state.sum_sq / w - jnp.outer(m, m)
    value = 0.5 * (cov + cov.T)
  else:
    mu = state.shift + m
    c = state.sum_sq / w - jnp.outer(m, m) + jnp.outer(mu, mu)
    value = 0.5 * (c + c.T)
  sums_finite = (jnp.all(jnp.isfinite(state.weight)) & jnp.all(jnp.isfinite(state.shift))
                 & jnp.all(jnp.isfinite(state.sum)) & jnp.all(jnp.isfinite(state.sum_sq)))
  return value, w, sums_finite, jnp.all(jnp.isfinite(value))


# Eagerly a result is read by one compiled program per dimension and dtype (op by op,
# the reads and their checks would be a dozen small programs, each compiled and
# dispatched on its own).
_read_values = jax.jit(_values, static_argnums=1)


def _result(state: CovarianceState, kind: str, on_checked=None) -> jax.Array:
  """The result ``kind`` read from ``state``. Eagerly the state and the result are
  checked (ValueError naming what failed; ``on_checked`` runs after the state's checks,
  before the result's); under jit the result is all NaN where a check fails."""
  check_state(state, kind)
  if is_traced(state):
    value, w, sums_finite, value_finite = _values(state, kind)
    ok = (state.nonfinite == 0) & (w > 0) & sums_finite & value_finite
    return jnp.where(ok, value, jnp.nan)
  value, w, sums_finite, value_finite = _read_values(state, kind)
  bad = int(np.asarray(state.nonfinite))
  if bad:
    raise ValueError(
        f"{kind}: expected finite keys, got {bad} key(s) holding NaN or inf, or with a NaN, "
        f"inf or negative weight, among {key_count(state) + bad}")
  w = float(np.asarray(w))
  if np.isfinite(w) and w <= 0:
    raise ValueError(f"{kind}: expected at least one key with positive weight, got none")
  if not bool(sums_finite):
    raise ValueError(
        f"{kind}: expected finite accumulated sums, got NaN or inf (the keys' weighted "
        f"squares or the total weight overflow {state.sum.dtype}); rescale the keys or "
        f"weights, or fold them in float64")
  if on_checked is not None:
    on_checked()
  if not bool(value_finite):
    mu = np.asarray(state.shift) + np.asarray(state.sum) / w
    raise ValueError(
        f"{kind}: expected a finite result, got NaN or inf: it overflows {value.dtype} "
        f"(the keys' mean reaches {np.abs(mu).max():.3g}); rescale the keys, use "
        f"centered_covariance, or fold them in float64")
  return value


def key_mean(state: CovarianceState) -> jax.Array:
  """Weighted mean of the keys, μ = c + s / W.

  Args:
    state: a :class:`CovarianceState` of dimension d.

  Returns:
    (d,) in the state's dtype (float32 or float64).

  Raises:
    ValueError: keys were refused (NaN or inf keys, NaN, inf or negative weights), no key
      had positive weight, or the sums or the result are not finite. Under ``jax.jit``
      nothing is raised: the result is all NaN instead.

  Example:
    >>> import numpy as np, memedit
    >>> s = memedit.covariance_update(memedit.covariance_init(2), np.array([[1.0, 2.0], [3.0, 4.0]]))
    >>> np.asarray(memedit.key_mean(s))
    array([2., 3.], dtype=float32)
  """
  return _result(state, "key_mean")


def centered_covariance(state: CovarianceState) -> jax.Array:
  """Weighted centered covariance Σ = S / W − (s / W)(s / W)ᵀ (population normalisation).

  Args:
    state: a :class:`CovarianceState` of dimension d.

  Returns:
    (d, d), symmetric, in the state's dtype (float32 or float64).

  Raises:
    ValueError: keys were refused (NaN or inf keys, NaN, inf or negative weights), no key
      had positive weight, or the sums or the result are not finite. Under ``jax.jit``
      nothing is raised: the result is all NaN instead.

  Example:
    >>> import numpy as np, memedit
    >>> s = memedit.covariance_update(memedit.covariance_init(1), np.array([[1.0], [3.0]]))
    >>> np.asarray(memedit.centered_covariance(s))
    array([[1.]], dtype=float32)
  """
  return _result(state, "centered_covariance")


def second_moment(state: CovarianceState) -> jax.Array:
  """The uncentered second moment C = E[k kᵀ] = Σ + μ μᵀ of the method.

  Args:
    state: a :class:`CovarianceState` of dimension d.

  Returns:
    (d, d), symmetric, in the state's dtype (float32 or float64).

  Raises:
    ValueError: keys were refused (NaN or inf keys, NaN, inf or negative weights), no key
      had positive weight, or the sums or the result are not finite. Under ``jax.jit``
      nothing is raised: the result is all NaN instead.

  Warns:
    UserWarning: fewer keys than the dimension d (C is then singular).

  Example:
    >>> import numpy as np, memedit
    >>> k = np.ones((10, 2), np.float32)
    >>> np.asarray(memedit.second_moment(memedit.covariance_update(memedit.covariance_init(2), k)))
    array([[1., 1.],
           [1., 1.]], dtype=float32)
  """
  def warn_rank():
    n, d = key_count(state), int(state.sum.shape[-1])
    if 0 < n < d:
      warnings.warn(
          f"second_moment: C from {n} keys of dimension {d} has rank at most {n}: solves "
          f"floor its zero eigenvalues (rcond), and keys C⁻¹-orthogonal to an edit keep "
          f"their outputs only to about cond(C)·ε; collect at least {d} keys",
          UserWarning, stacklevel=4)

  return _result(state, "second_moment", warn_rank)


# ----------------------------------------------------------------------------------------
# Streaming driver.
