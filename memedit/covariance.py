"""Streaming second moments of keys: the C = E[k kᵀ] of a layer viewed as a memory.

The state is a NamedTuple pytree; ``covariance_init`` / ``covariance_update`` /
``covariance_merge`` are pure functions in the style of optax's init/update pairs, and
``stream_covariance`` folds a stream of batches through them inside compiled
``lax.scan`` programs, over all local devices when there are several.

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

import functools
import hashlib
import itertools
import json
import os
import sys
import time
from typing import Any, Callable, Iterable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from memedit import _io

HIGHEST = lax.Precision.HIGHEST
_TWO32 = 4294967296.0


class CovarianceState(NamedTuple):
  """Shifted streaming sums of keys of dimension d.

  Attributes:
    count: (2,) uint32, the exact number of keys folded with non-zero weight, as
      [low word, high word].
    weight: (2,) float, total weight W as a compensated pair [sum, compensation].
    shift: (d,) float, the shift c the sums are taken about.
    has_shift: () bool, whether ``shift`` is fixed (set by the first non-empty batch).
    sum: (d,) float, s = Σ wᵢ (kᵢ − c).
    sum_sq: (d, d) float, S = Σ wᵢ (kᵢ − c)(kᵢ − c)ᵀ.
    nonfinite: () uint32, number of keys with non-zero weight that were refused: a key
      holding NaN or ±inf, or a NaN, ±inf or negative weight (they are not folded).

  The float fields share one dtype: float32, or float64 (see the module docstring).
  """

  count: jax.Array
  weight: jax.Array
  shift: jax.Array
  has_shift: jax.Array
  sum: jax.Array
  sum_sq: jax.Array
  nonfinite: jax.Array

  @property
  def dim(self) -> int:
    return int(self.shift.shape[-1])


def _float_dtype(dtype) -> np.dtype:
  """The dtype sums are kept in for inputs of ``dtype``: float64 for float64 (when JAX has
  x64 enabled; otherwise JAX holds float64 data as float32), float32 for anything else."""
  dt = jax.dtypes.canonicalize_dtype(dtype)
  return np.dtype(np.float64) if dt == np.float64 else np.dtype(np.float32)


def _as_dtype(state: CovarianceState, dtype) -> CovarianceState:
  """``state`` with its float fields in ``dtype`` (exact when widening)."""
  return state._replace(weight=state.weight.astype(dtype), shift=state.shift.astype(dtype),
                        sum=state.sum.astype(dtype), sum_sq=state.sum_sq.astype(dtype))


def covariance_init(dim: int, shift: Any = None, dtype: Any = jnp.float32) -> CovarianceState:
  """Creates an empty state for keys of dimension ``dim``.

  Args:
    dim: key dimension d (a positive int).
    shift: optional (d,) shift c to accumulate about. When None, the weighted mean of the
      first non-empty batch is used.
    dtype: float dtype of the sums: float32 (default) or float64 (with ``jax_enable_x64``;
      without it float32). Any other dtype gives float32.

  Returns:
    A :class:`CovarianceState` with zero sums.

  Example:
    >>> import jax.numpy as jnp, memedit
    >>> s = memedit.covariance_init(3)
    >>> s = memedit.covariance_update(s, jnp.eye(3))
    >>> memedit.key_count(s)
    3
  """
  if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim <= 0:
    raise ValueError(f"dim: expected a positive int, got {dim!r}")
  dim = int(dim)
  dt = _float_dtype(dtype)
  if shift is None:
    c = jnp.zeros((dim,), dt)
    has = jnp.asarray(False)
  else:
    c = jnp.asarray(shift, dt)
    if c.shape != (dim,):
      raise ValueError(f"shift: expected shape ({dim},), got {c.shape}")
    has = jnp.asarray(True)
  return CovarianceState(
      count=jnp.zeros((2,), jnp.uint32),
      weight=jnp.zeros((2,), dt),
      shift=c,
      has_shift=has,
      sum=jnp.zeros((dim,), dt),
      sum_sq=jnp.zeros((dim, dim), dt),
      nonfinite=jnp.zeros((), jnp.uint32),
  )


def _weights_fit(weights_shape, lead) -> bool:
  """Whether weights of ``weights_shape`` fit keys of leading shape ``lead``: aligned with
  its leading axes from the left, each axis of size 1 or of the keys' size."""
  ws, lead = tuple(weights_shape), tuple(lead)
  return len(ws) <= len(lead) and all(a == 1 or a == b for a, b in zip(ws, lead))


def _weights_error(name: str, weights_shape, lead) -> ValueError:
  """The error for weights that do not fit keys of leading shape ``lead``."""
  return ValueError(
      f"{name}: expected a shape that broadcasts to a leading part of the keys' leading "
      f"shape {tuple(lead)} (weights align with the keys' leading axes, from the left: "
      f"(B,) weights each of B images of keys (B, h, w, d)), got {tuple(weights_shape)}")


def _expand_weights(weights, lead):
  """Weights that fit ``lead`` (see :func:`_weights_fit`), broadcast to shape ``lead``."""
  w = jnp.asarray(weights)
  w = jnp.reshape(w, tuple(w.shape) + (1,) * (len(lead) - w.ndim))
  return jnp.broadcast_to(w, tuple(lead))


def _check_keys(state: CovarianceState, keys, weights):
  d = state.shift.shape[-1]
  if keys.ndim < 1 or keys.shape[-1] != d:
    raise ValueError(f"keys: expected shape (..., {d}), got {tuple(keys.shape)}")
  if not (jnp.issubdtype(keys.dtype, jnp.floating) or jnp.issubdtype(keys.dtype, jnp.integer)):
    raise ValueError(f"keys: expected a real dtype, got {keys.dtype}")
  if weights is not None:
    if not (jnp.issubdtype(weights.dtype, jnp.floating)
            or jnp.issubdtype(weights.dtype, jnp.integer)
            or jnp.issubdtype(weights.dtype, jnp.bool_)):
      raise ValueError(f"weights: expected a real dtype, got {weights.dtype}")
    if not _weights_fit(weights.shape, keys.shape[:-1]):
      raise _weights_error("weights", weights.shape, keys.shape[:-1])


def _add_count(count, n):
  """Adds uint32 ``n`` to a [low, high] uint32 pair with carry."""
  n = jnp.asarray(n, jnp.uint32)
  lo = count[0] + n
  hi = count[1] + (lo < count[0]).astype(jnp.uint32)
  return jnp.stack([lo, hi])


def _add_pair(a, b):
  """Adds two [low, high] uint32 pairs with carry."""
  lo = a[0] + b[0]
  hi = a[1] + b[1] + (lo < a[0]).astype(jnp.uint32)
  return jnp.stack([lo, hi])


def _kahan_add(pair, x):
  """Compensated addition of float32 ``x`` to a [sum, compensation] pair."""
  y = x - pair[1]
  t = pair[0] + y
  comp = (t - pair[0]) - y
  return jnp.stack([t, comp])


def _fold(state: CovarianceState, keys, weights) -> CovarianceState:
  d = state.shift.shape[-1]
  dt = state.sum.dtype
  x = jnp.reshape(keys, (-1, d)).astype(dt)
  if weights is None:
    w = jnp.ones((x.shape[0],), dt)
  else:
    w = jnp.reshape(_expand_weights(jnp.asarray(weights).astype(dt), keys.shape[:-1]), (-1,))
  used = w != 0

  def sums(wf, xf):
    wsum = jnp.sum(wf)
    # The first non-empty batch fixes the shift at its weighted mean.
    take = jnp.logical_and(~state.has_shift, wsum > 0)
    shift = lax.cond(
        take,
        lambda: jnp.einsum("n,nd->d", wf, xf, precision=HIGHEST) / jnp.maximum(wsum, 1e-30),
        lambda: state.shift)
    # xs = √w ⊙ (x − c): one materialised operand, used on both sides of the Gram matrix
    # (rows of weight 0 are exactly 0).
    sw = jnp.sqrt(wf)
    xs = (xf - shift) * sw[:, None]
    s = jnp.einsum("n,nd->d", sw, xs, precision=HIGHEST)
    ss = jnp.einsum("nd,ne->de", xs, xs, precision=HIGHEST, preferred_element_type=dt)
    return wsum, shift, s, ss

  def masked():
    # Rows are checked one by one only here: a row is refused (weight 0, counted) when an
    # entry of its key is NaN or ±inf, or its weight is NaN, ±inf or negative. The test is
    # elementwise, so a finite row of large entries is kept (a row sum could overflow).
    ok = jnp.all(jnp.isfinite(x), axis=-1) & jnp.isfinite(w) & (w >= 0)
    out = sums(jnp.where(ok, w, 0.0), jnp.where(ok[:, None], x, 0.0))
    return out + (jnp.sum(ok & used, dtype=jnp.uint32),
                  jnp.sum(~ok & used, dtype=jnp.uint32))

  # The common case folds every row unmasked; a NaN or ±inf key, or a NaN, ±inf or
  # negative weight (√w is NaN), shows in W + Σ s + tr S, and only then is the batch
  # folded again with those rows masked. (Finite keys whose squares overflow also take
  # that path, are kept, and leave non-finite sums that the result functions refuse.)
  n_used = jnp.sum(used, dtype=jnp.uint32)
  plain = sums(w, x) + (n_used, jnp.zeros_like(n_used))
  clean = jnp.isfinite(plain[0] + jnp.sum(plain[2]) + jnp.trace(plain[3]))
  wsum, shift, s, ss, n, nonfinite = lax.cond(clean, lambda: plain, masked)
  return CovarianceState(
      count=_add_count(state.count, n),
      weight=_kahan_add(state.weight, wsum),
      shift=shift,
      has_shift=jnp.logical_or(state.has_shift, wsum > 0),
      sum=state.sum + s,
      sum_sq=state.sum_sq + ss,
      nonfinite=state.nonfinite + nonfinite,
  )


_fold_jit = jax.jit(_fold)


@jax.jit
def _fold_many_jit(state, batches):
  for b in batches:
    state = _fold(state, b, None)
  return state


def covariance_update(state: CovarianceState, keys: Any, weights: Any = None) -> CovarianceState:
  """Folds a batch of keys into the state (jit-compiled; shapes are checked eagerly).

  For keys kᵢ with weights wᵢ (1 when omitted), adds
  W += Σ wᵢ, s += Σ wᵢ (kᵢ − c), S += Σ wᵢ (kᵢ − c)(kᵢ − c)ᵀ.
  Keys holding NaN or ±inf, and keys with a NaN or ±inf weight, are counted in
  ``state.nonfinite`` and left out; the result functions then raise (NaN under jit).
  Negative weights raise a ``ValueError`` here when the weights are concrete; under
  ``jax.jit`` they cannot, and those keys are counted and left out in the same way.

  Float64 keys (with ``jax_enable_x64``) make the state float64 (its sums are widened
  exactly); other keys are folded in the state's dtype.

  Args:
    state: the running :class:`CovarianceState` for dimension d.
    keys: (n₀, …, n_{p−1}, d) array; every leading position is one key (pixels, tokens,
      batch).
    weights: optional non-negative array aligned with the keys' leading axes from the
      left: shape (a₀, …, a_{m−1}) with m ≤ p and aᵢ ∈ {1, nᵢ} (so (n₀,) weights whole
      images and (n₀, …, n_{p−1}) single keys, e.g. a soft mask). Other shapes raise.

  Returns:
    The updated state.

  Example:
    >>> import numpy as np, memedit
    >>> k = np.random.default_rng(0).normal(size=(100, 4)).astype("float32")
    >>> s = memedit.covariance_update(memedit.covariance_init(4), k)
    >>> bool(np.allclose(memedit.second_moment(s), k.T @ k / 100, atol=1e-5))
    True
  """
  keys = jnp.asarray(keys)
  weights = None if weights is None else jnp.asarray(weights)
  _check_keys(state, keys, weights)
  if weights is not None and not isinstance(weights, jax.core.Tracer):
    if bool(jnp.any(weights < 0)):
      raise ValueError("weights: expected non-negative weights, got a negative one")
  dt = jnp.promote_types(state.sum.dtype, _float_dtype(keys.dtype))
  if dt != state.sum.dtype:
    state = _as_dtype(state, dt)
  return _fold_jit(state, keys, weights)


def covariance_merge(a: CovarianceState, b: CovarianceState) -> CovarianceState:
  """Combines two states as if all their keys had been folded into one (associative).

  b's sums are re-expressed about a's shift: with δ = c_b − c_a,
  s = s_a + s_b + W_b δ and S = S_a + S_b + s_b δᵀ + δ s_bᵀ + W_b δ δᵀ.
  An empty ``a`` takes ``b``'s shift.

  Args:
    a: a state of dimension d.
    b: another state of dimension d.

  Returns:
    The merged state.

  Example:
    >>> import numpy as np, memedit
    >>> k = np.random.default_rng(0).normal(size=(10, 3)).astype("float32")
    >>> init = memedit.covariance_init(3)
    >>> a = memedit.covariance_update(init, k[:4])
    >>> b = memedit.covariance_update(init, k[4:])
    >>> whole = memedit.covariance_update(init, k)
    >>> m = memedit.covariance_merge(a, b)
    >>> bool(np.allclose(memedit.second_moment(m), memedit.second_moment(whole), atol=1e-6))
    True
  """
  if a.shift.shape != b.shift.shape:
    raise ValueError(
        f"covariance_merge: expected states of the same dimension, got {a.shift.shape[-1]} "
        f"and {b.shift.shape[-1]}")
  dt = jnp.promote_types(a.sum.dtype, b.sum.dtype)
  return _merge_jit(_as_dtype(a, dt), _as_dtype(b, dt))


def _merge(a: CovarianceState, b: CovarianceState) -> CovarianceState:
  shift = jnp.where(a.has_shift, a.shift, b.shift)
  wb = b.weight[0] - b.weight[1]
  delta = jnp.where(b.has_shift, b.shift - shift, 0.0)
  sb = b.sum + wb * delta
  sqb = (b.sum_sq + jnp.outer(b.sum, delta) + jnp.outer(delta, b.sum)
         + wb * jnp.outer(delta, delta))
  return CovarianceState(
      count=_add_pair(a.count, b.count),
      weight=_kahan_add(_kahan_add(a.weight, b.weight[0]), -b.weight[1]),
      shift=shift,
      has_shift=jnp.logical_or(a.has_shift, b.has_shift),
      sum=a.sum + sb,
      sum_sq=a.sum_sq + sqb,
      nonfinite=a.nonfinite + b.nonfinite,
  )


_merge_jit = jax.jit(_merge)


def key_count(state: CovarianceState) -> int:
  """The exact number of keys folded into ``state`` (finite, non-zero weight).

  Args:
    state: a :class:`CovarianceState`.

  Returns:
    A Python int (exact past 2³² keys: the count is kept as two uint32 words).

  Example:
    >>> import numpy as np, memedit
    >>> memedit.key_count(memedit.covariance_update(memedit.covariance_init(2), np.ones((5, 2))))
    5
  """
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
  return state.weight[0] - state.weight[1]


def _traced(*xs) -> bool:
  return any(isinstance(x, jax.core.Tracer) for x in jax.tree_util.tree_leaves(xs))


def _check_result_state(state: CovarianceState, what: str):
  """Eager checks of a state before a result is read from it (none under jit)."""
  if _traced(state):
    return
  bad = int(np.asarray(state.nonfinite))
  if bad:
    raise ValueError(
        f"{what}: expected finite keys, got {bad} key(s) holding NaN or inf, or with a NaN, "
        f"inf or negative weight, among {key_count(state) + bad}")
  w = float(np.asarray(total_weight(state)))
  if np.isfinite(w) and w <= 0:
    raise ValueError(f"{what}: expected at least one key with positive weight, got none")
  sums = (state.weight, state.shift, state.sum, state.sum_sq)
  if not all(bool(jnp.all(jnp.isfinite(x))) for x in sums):
    raise ValueError(
        f"{what}: expected finite accumulated sums, got NaN or inf (the keys' weighted "
        f"squares or the total weight overflow {state.sum.dtype}); rescale the keys or "
        f"weights, or fold them in float64")


def _state_ok(state: CovarianceState) -> jax.Array:
  """In-graph form of :func:`_check_result_state`: () bool."""
  w = total_weight(state)
  finite = (jnp.all(jnp.isfinite(state.weight)) & jnp.all(jnp.isfinite(state.shift))
            & jnp.all(jnp.isfinite(state.sum)) & jnp.all(jnp.isfinite(state.sum_sq)))
  return (state.nonfinite == 0) & (w > 0) & finite


def _checked(value: jax.Array, state: CovarianceState, what: str) -> jax.Array:
  """A result read from a checked state: eagerly it must be finite (else ValueError);
  under jit it is replaced by NaN when the state or the result fails the checks."""
  if _traced(state, value):
    ok = _state_ok(state) & jnp.all(jnp.isfinite(value))
    return jnp.where(ok, value, jnp.nan)
  if not bool(jnp.all(jnp.isfinite(value))):
    mu = np.asarray(state.shift + state.sum / total_weight(state))
    raise ValueError(
        f"{what}: expected a finite result, got NaN or inf: it overflows {value.dtype} "
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
  _check_result_state(state, "key_mean")
  return _checked(state.shift + state.sum / total_weight(state), state, "key_mean")


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
  _check_result_state(state, "centered_covariance")
  w = total_weight(state)
  m = state.sum / w
  cov = state.sum_sq / w - jnp.outer(m, m)
  return _checked(0.5 * (cov + cov.T), state, "centered_covariance")


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

  Example:
    >>> import numpy as np, memedit
    >>> k = np.ones((10, 2), np.float32)
    >>> np.asarray(memedit.second_moment(memedit.covariance_update(memedit.covariance_init(2), k)))
    array([[1., 1.],
           [1., 1.]], dtype=float32)
  """
  _check_result_state(state, "second_moment")
  w = total_weight(state)
  m = state.sum / w
  mu = state.shift + m
  c = state.sum_sq / w - jnp.outer(m, m) + jnp.outer(mu, mu)
  return _checked(0.5 * (c + c.T), state, "second_moment")


# ----------------------------------------------------------------------------------------
# Streaming driver.


def covariance_cache_key(content_hash: str, spec: Any, dtype: Any = jnp.float32) -> str:
  """A cache key for collected statistics: sha256 of (content hash, sample spec, dtype).

  Args:
    content_hash: hash of what produces the keys (e.g. ``memedit._io.tree_hash(params)``
      combined with the layer's address).
    spec: JSON-serialisable description of the input stream (seed, count, batch size,
      truncation, ...).
    dtype: dtype the keys are computed in.

  Returns:
    A 64-character hex string.

  Example:
    >>> import memedit
    >>> len(memedit.covariance_cache_key("params-sha", {"seed": 1, "n": 1000}, "float32"))
    64
  """
  try:
    spec_text = json.dumps(spec, sort_keys=True, default=str)
  except TypeError as e:
    raise ValueError(f"spec: expected a JSON-serialisable description, got {spec!r}") from e
  text = json.dumps([str(content_hash), spec_text, str(jnp.dtype(dtype))])
  return hashlib.sha256(text.encode()).hexdigest()


class _Progress:
  """A minimal progress bar on stderr (no third-party dependency)."""

  def __init__(self, total: int | None, enabled: bool, label: str):
    self.total, self.enabled, self.label = total, enabled, label
    self.start = time.perf_counter()
    self.last = 0.0

  def __call__(self, done_batches: int, keys: int, final: bool = False):
    if not self.enabled:
      return
    now = time.perf_counter()
    if not final and now - self.last < 0.2:
      return
    self.last = now
    rate = keys / max(now - self.start, 1e-9)
    if self.total:
      frac = min(done_batches / self.total, 1.0)
      bar = "#" * int(30 * frac) + "." * (30 - int(30 * frac))
      msg = f"\r{self.label} [{bar}] {done_batches}/{self.total} batches, {rate:,.0f} keys/s"
    else:
      msg = f"\r{self.label} {done_batches} batches, {rate:,.0f} keys/s"
    sys.stderr.write(msg + ("\n" if final else ""))
    sys.stderr.flush()


def _split_keys(out):
  if isinstance(out, tuple):
    if len(out) != 2:
      raise ValueError(f"key_fn: expected keys or (keys, weights), got a tuple of {len(out)}")
    return out
  return out, None


def _identity(batch):
  return batch


def _padded_rows(n: int, multiple: int) -> int:
  """Rows a ragged batch of ``n`` rows is padded to: the next power of two, rounded up to
  a multiple of ``multiple`` (the number of devices the batch is split over)."""
  p = 1 << max(n - 1, 0).bit_length()
  return -(-p // multiple) * multiple


def _pad_rows(x, rows: int):
  """``x`` with its leading axis extended to ``rows`` by repeating its last row (real,
  finite inputs for the model; the padded rows get weight 0). Device arrays are padded on
  their device, host arrays on the host."""
  xp = jnp if isinstance(x, jax.Array) else np
  n = x.shape[0]
  if n == rows:
    return x
  widths = [(0, rows - n)] + [(0, 0)] * (x.ndim - 1)
  return xp.pad(x, widths) if n == 0 else xp.pad(x, widths, mode="edge")


class _Template(NamedTuple):
  """What every batch of a stream shares with the first: tree structure and the shapes of
  its leaves after the leading (batch) axis."""

  treedef: Any
  tails: tuple

  @classmethod
  def of(cls, batch) -> "_Template":
    leaves, treedef = jax.tree_util.tree_flatten(batch)
    return cls(treedef, tuple(tuple(np.shape(x))[1:] for x in leaves))

  def rows(self, batch) -> int:
    """The batch's leading size, after checking it against the template."""
    leaves, treedef = jax.tree_util.tree_flatten(batch)
    shapes = [tuple(np.shape(x)) for x in leaves]
    leads = {s[0] for s in shapes if s}
    if (treedef != self.treedef or any(len(s) == 0 for s in shapes) or len(leads) != 1
        or tuple(s[1:] for s in shapes) != self.tails):
      want = jax.tree_util.tree_unflatten(self.treedef, [("B",) + t for t in self.tails])
      got = jax.tree_util.tree_unflatten(treedef, shapes)
      raise ValueError(
          f"batches: expected every batch to have shape {want} (any batch size B, one for "
          f"all leaves), got {got}")
    return leads.pop()


def _is_resident(batch) -> bool:
  leaves = jax.tree_util.tree_leaves(batch)
  return bool(leaves) and all(isinstance(x, jax.Array) for x in leaves)


def _replicated(batch):
  """The replicated sharding over the mesh of a batch's first leaf, when it is a
  ``NamedSharding`` over several devices; else None (the fold runs where the data is)."""
  from jax.sharding import NamedSharding, PartitionSpec as P

  s = jax.tree_util.tree_leaves(batch)[0].sharding
  if isinstance(s, NamedSharding) and len(s.device_set) > 1:
    return NamedSharding(s.mesh, P())
  return None


def _with_params(key_fn, has_params: bool):
  """``key_fn`` as a function of (params, batch)."""
  if has_params:
    return key_fn
  return lambda params, batch: key_fn(batch)


@functools.lru_cache(maxsize=64)
def _make_group_fn(key_fn, dim, n_dev, has_params=False):
  """Compiles the fold of a group of stacked host batches (G, B, ...) into a state.

  The program takes ``(state, params, batches, valid)``: parameters are an argument, not
  constants, so one program serves every parameter set of the same shapes.
  """
  keys_of = _with_params(key_fn, has_params)

  def fold_group(state, params, batches, valid):
    def body(st, inp):
      batch, ok = inp
      keys, w = _split_keys(keys_of(params, batch))
      if keys.shape[-1] != dim:
        raise ValueError(f"key_fn: expected keys of shape (..., {dim}), got {keys.shape}")
      okw = ok.astype(jnp.float32)
      lead = keys.shape[:-1]
      okw = jnp.reshape(okw, okw.shape + (1,) * (len(lead) - okw.ndim))
      w = okw if w is None else jnp.asarray(w, jnp.float32) * okw
      return _fold(st, keys, w), None

    return lax.scan(body, state, (batches, valid))[0]

  if n_dev == 1:
    return jax.jit(fold_group)

  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

  mesh = Mesh(np.asarray(jax.local_devices()[:n_dev]), ("data",))

  def sharded(state, params, batches, valid):
    # Every device folds its share of each batch into an empty state with the common
    # shift, then the partial sums are reduced across devices with psum.
    def per_device(st0, prm, b, v):
      local = covariance_init(dim, dtype=st0.sum.dtype)._replace(shift=st0.shift,
                                                                has_shift=st0.has_shift)
      local = jax.tree_util.tree_map(lambda x: lax.pcast(x, ("data",), to="varying"), local)
      part = fold_group(local, prm, b, v)
      lo16 = lax.psum(part.count[0] & 0xFFFF, "data")
      hi16 = lax.psum(part.count[0] >> 16, "data")
      hi = lax.psum(part.count[1], "data")
      count = _add_pair(jnp.stack([lo16, hi]), jnp.stack([hi16 << 16, hi16 >> 16]))
      return CovarianceState(
          count=count,
          weight=jnp.stack([lax.psum(part.weight[0], "data"), lax.psum(part.weight[1], "data")]),
          shift=st0.shift, has_shift=st0.has_shift,
          sum=lax.psum(part.sum, "data"), sum_sq=lax.psum(part.sum_sq, "data"),
          nonfinite=lax.psum(part.nonfinite, "data"))

    rep = jax.tree_util.tree_map(lambda _: P(), state)
    fn = jax.shard_map(per_device, mesh=mesh,
                       in_specs=(rep, P(), P(None, "data"), P(None, "data")),
                       out_specs=rep)
    total = fn(state, params, batches, valid)
    return _merge(state._replace(has_shift=jnp.asarray(True)), total)

  in_sharding = NamedSharding(mesh, P(None, "data"))
  jitted = jax.jit(sharded)

  def run(state, params, batches, valid):
    batches = jax.device_put(batches, in_sharding)
    valid = jax.device_put(valid, in_sharding)
    return jitted(state, params, batches, valid)

  return run


@functools.lru_cache(maxsize=64)
def _make_resident_fn(key_fn, dim, out_sharding, has_params=False):
  """Compiles the fold of a tuple of batches that stay where they are.

  Arrays already on devices (one device, or a global ``jax.Array`` sharded over a mesh)
  are folded in place: XLA partitions the program over the arrays' shardings, so each
  device folds the rows it holds and only the (d, d) partial sums are reduced.
  """

  keys_of = _with_params(key_fn, has_params)

  def fold(state, params, batches):
    for batch in batches:
      keys, w = _split_keys(keys_of(params, batch))
      if keys.shape[-1] != dim:
        raise ValueError(f"key_fn: expected keys of shape (..., {dim}), got {keys.shape}")
      state = _fold(state, keys, w)
    return state

  if out_sharding is None:
    return jax.jit(fold)
  return jax.jit(fold, out_shardings=jax.tree_util.tree_map(
      lambda _: out_sharding, covariance_init(dim)))


def _host_value(x) -> np.ndarray:
  """A host copy of a (replicated) array, also when it spans other processes' devices."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return np.asarray(x.addressable_data(0))
  return np.asarray(x)


def _host_state(state: CovarianceState) -> CovarianceState:
  return CovarianceState(*(_host_value(x) for x in state))


def _place_state(state: CovarianceState, sharding) -> CovarianceState:
  """``state`` as arrays with ``sharding`` (None: the default device)."""
  if sharding is None:
    return CovarianceState(*(jnp.asarray(x) for x in state))
  return CovarianceState(*(
      jax.make_array_from_callback(np.shape(x), sharding, lambda idx, x=np.asarray(x): x[idx])
      for x in state))


def _allgather(x):
  """``x`` from every process, stacked on a new leading axis (jax.distributed)."""
  from jax.experimental import multihost_utils

  return multihost_utils.process_allgather(x)


def _merge_all(states) -> CovarianceState:
  """Merges states in the given order (the same on every process: identical results)."""
  out = states[0]
  for s in states[1:]:
    out = _merge_jit(out, s)
  return out


def _unstack(tree: dict, i: int) -> CovarianceState:
  return CovarianceState(**{k: jnp.asarray(np.asarray(v)[i]) for k, v in tree.items()})


class _Cache:
  """Where a stream's state is saved and resumed: one directory written by process 0.

  With several processes (``jax.distributed``) the directory holds every process's state
  stacked on a leading axis and the batches each has consumed; every process resumes
  from its own row.
  """

  def __init__(self, cache_dir, cache_key, n_proc: int):
    self.n_proc = n_proc
    self.path = None
    if cache_dir is None and cache_key is None:
      return
    if (cache_dir is None) != (cache_key is None):
      raise ValueError("cache_dir and cache_key: expected both or neither, got only one")
    key = str(cache_key)
    if n_proc > 1:
      # One key for the whole run: the hash of every process's key, in process order.
      digest = np.frombuffer(hashlib.sha256(key.encode()).digest(), np.uint8)
      key = hashlib.sha256(np.asarray(_allgather(digest)).tobytes()).hexdigest()
    self.path = os.path.join(os.fspath(cache_dir), key)

  def load(self):
    """``(states, batches consumed per process, complete)``, or None when nothing is saved."""
    if self.path is None or not os.path.isdir(self.path):
      return None
    tree, meta = _io.load_tree(self.path)
    procs = meta.get("processes")
    if (procs or 1) != self.n_proc:
      raise ValueError(
          f"statistics cache {self.path}: expected the state of {self.n_proc} process(es), "
          f"got one written by {procs or 1}")
    if procs is None:
      states = [CovarianceState(**{k: jnp.asarray(v) for k, v in tree.items()})]
      consumed = [int(meta["batches"])]
    else:
      states = [_unstack(tree, i) for i in range(procs)]
      consumed = [int(b) for b in meta["batches"]]
    return states, consumed, bool(meta.get("complete"))

  def save(self, states, consumed, complete: bool):
    if jax.process_index() != 0:
      return
    meta = {"complete": complete, "dim": int(np.shape(states[0].shift)[-1])}
    if self.n_proc == 1:
      tree = _host_state(states[0])._asdict()
      meta["batches"] = int(consumed[0])
    else:
      tree = {k: np.stack([np.asarray(getattr(s, k)) for s in states])
              for k in CovarianceState._fields}
      meta.update(batches=[int(c) for c in consumed], processes=self.n_proc)
    _io.save_tree(self.path, tree, meta)


class _Folder:
  """Folds chunks of a stream into one state, the way the batches' kind requires."""

  def __init__(self, key_fn, group: int, n_dev: int, params):
    self.ident = key_fn is None
    self.kfn = _identity if self.ident else key_fn
    self.params = params
    self.has_params = params is not None
    self.keys_of = _with_params(self.kfn, self.has_params)
    self.group, self.n_dev = group, n_dev
    self.template = None
    self.resident = False
    self.sharding = None
    self.dim = None
    self.first_rows = None
    self.keys_per_row = 0
    self.shift_ready = False
    self.dtype = jnp.float32

  def start(self, first, dim):
    """Reads the stream's template, kind and key dimension from its first batch."""
    self.template = _Template.of(first)
    self.first_rows = self.template.rows(first)
    self.resident = _is_resident(first)
    if self.resident:
      self.sharding = _replicated(first)
    first_keys, _ = _split_keys(jax.eval_shape(self.keys_of, self.params, first))
    d = int(first_keys.shape[-1])
    if dim is not None and d != dim:
      raise ValueError(f"keys: expected last dimension {dim}, got {d}")
    self.dim = d
    self.keys_per_row = int(np.prod(first_keys.shape[:-1])) // max(self.first_rows, 1)
    # float64 keys (under jax_enable_x64) are folded in float64; all others in float32.
    self.dtype = jnp.float64 if first_keys.dtype == jnp.float64 else jnp.float32
    return d

  def _common_shift(self, state, first):
    """Over several devices every device folds about one shift: unless the state has
    one, the mean of the first batch's keys (one device sets it from its first batch)."""
    self.shift_ready = True
    if bool(state.has_shift):
      return state
    k0, w0 = _split_keys(jax.jit(self.keys_of)(self.params, first))
    st0 = _fold_jit(covariance_init(self.dim, dtype=self.dtype), k0, w0)
    return state._replace(shift=st0.shift, has_shift=jnp.asarray(True))

  def place(self, state):
    if self.resident and self.sharding is not None:
      return _place_state(_host_state(state), self.sharding)
    return state

  def fold(self, state, chunk):
    sizes = [self.template.rows(b) for b in chunk]
    resident = self.resident and all(_is_resident(b) for b in chunk)
    if resident and (self.sharding is not None or len(set(sizes)) == 1):
      fn = _make_resident_fn(self.kfn, self.dim, self.sharding, self.has_params)
      if len(set(sizes)) == 1:
        return fn(state, self.params, tuple(chunk)), sum(sizes)
      # Global arrays of several shapes: one program per distinct shape.
      for b in chunk:
        state = fn(state, self.params, (b,))
      return state, sum(sizes)
    n_dev = 1 if resident else self.n_dev
    if n_dev > 1 and not self.shift_ready:
      state = self._common_shift(state, chunk[0])
    uniform = all(s == self.first_rows for s in sizes)
    if self.ident and self.n_dev == 1 and uniform and len(chunk) == self.group:
      # Raw keys of the stream's own batch size: folded as they are, without first being
      # copied into a stacked array.
      fn = _make_resident_fn(_identity, self.dim, None)
      return fn(state, None, tuple(chunk)), sum(sizes)
    # Stacked and scanned: a group of full batches keeps the first batch's size (rounded
    # up to the devices); any other group is padded to a power of two with zero-weight
    # rows, so a ragged stream compiles one program per power of two at most.
    rows = self.first_rows if uniform else _padded_rows(max(sizes), n_dev)
    rows = -(-rows // n_dev) * n_dev
    n = len(chunk)
    xp = jnp if resident else np
    padded = [jax.tree_util.tree_map(lambda x: _pad_rows(x if resident else np.asarray(x), rows), b)
              for b in chunk]
    padded += [padded[-1]] * (self.group - n)
    stacked = jax.tree_util.tree_map(lambda *xs: xp.stack(xs), *padded)
    valid = np.zeros((self.group, rows), bool)
    for i, s in enumerate(sizes):
      valid[i, :s] = True
    fn = _make_group_fn(self.kfn, self.dim, n_dev, self.has_params)
    return fn(state, self.params, stacked, valid), sum(sizes)


def stream_covariance(
    batches: Iterable[Any],
    dim: int | None = None,
    *,
    key_fn: Callable[[Any], Any] | None = None,
    group: int = 8,
    total: int | None = None,
    progress: bool = True,
    cache_dir: str | os.PathLike | None = None,
    cache_key: str | None = None,
    save_every: int = 1,
    devices: int | None = None,
    across_processes: bool | None = None,
    params: Any = None,
) -> CovarianceState:
  """Folds a stream of batches into a :class:`CovarianceState` inside compiled programs.

  Batches are taken ``group`` at a time and folded by one compiled program per group.

  - Host batches (numpy arrays, Python iterators, data loaders such as grain): raw key
    arrays of the stream's batch size are folded in place; otherwise the group is stacked
    and scanned with ``lax.scan`` (a short last group is padded with zero-weight batches).
    Batches may differ in their leading (batch) size, e.g. the ragged last batch of a
    data set: a group holding any batch of another size than the first batch is padded
    to the next power of two with zero-weight rows, so a stream of sizes up to B compiles
    at most ⌈log2 B⌉ + 2 programs. With several local devices each batch's leading axis is
    split across them with ``jax.shard_map`` and the partial sums are combined with
    ``psum``.
  - ``jax.Array`` batches are folded where they live, without a copy to the host: on
    their device, or, for a global array sharded over a mesh (any ``NamedSharding``), by
    one program that XLA partitions over the mesh: each device folds its rows and only
    the (d, d) partial sums are all-reduced (no gather of the inputs). The state comes
    back replicated over that mesh. A group whose batches differ in shape is folded batch
    by batch (one program per distinct shape).
  - Several processes (``jax.distributed``): by default, when ``jax.process_count() > 1``
    and the batches are process-local, every process folds its own part of the stream on
    its local devices and all processes end with the same state, merged exactly (integer
    counts, compensated weights) from every process's state in process order. Every
    process must call this function; the processes move in step one group at a time, so
    their streams may have any lengths. Global arrays that span several processes are
    folded as one program instead (every process passes the same global batches).

  Args:
    batches: iterable of arrays (raw keys ``(B, ..., d)``) or, with ``key_fn``, of any
      pytrees of arrays whose leaves share a leading batch axis. Every batch has the first
      batch's structure and trailing shapes; its batch size B may vary.
    dim: key dimension d; inferred from the first batch when omitted.
    key_fn: optional pure function batch → keys (B, ..., d) or (keys, weights); it is
      traced inside the compiled program (e.g. a model run as far as a layer).
    group: batches per compiled fold.
    total: number of batches, for the progress bar (``len(batches)`` when available).
    progress: show a progress bar on stderr (on process 0, with the global counts).
    cache_dir, cache_key: when both are given, the state is saved atomically (orbax) under
      ``cache_dir/cache_key`` every ``save_every`` groups with the number of batches
      consumed, and a later call with the same key resumes from it, skipping those
      batches without computing their keys. A finished run is returned from the cache.
      With several processes, process 0 writes one cache holding every process's state
      (the directory name hashes all processes' keys) and every process resumes from it;
      ``cache_dir`` must then be a folder that all processes can read.
    save_every: groups between checkpoints.
    devices: number of local devices to split host batches over (default: all local
      devices). ``jax.Array`` batches run on the devices that hold them.
    across_processes: merge the states of all processes (default: when
      ``jax.process_count() > 1`` and the batches are process-local).
    params: optional pytree of arrays passed to ``key_fn(params, batch)`` (then called
      with two arguments). Parameters enter the compiled programs as arguments, not as
      constants: programs are cached by ``key_fn`` and shapes, so a new parameter set of
      the same shapes reuses them, and no program holds on to old parameters.

  Returns:
    The folded state; read C with :func:`second_moment`.

  Example:
    >>> import numpy as np, memedit
    >>> rng = np.random.default_rng(0)
    >>> data = [rng.normal(size=(64, 8)).astype("float32") for _ in range(5)]
    >>> data.append(rng.normal(size=(7, 8)).astype("float32"))  # a ragged last batch
    >>> st = memedit.stream_covariance(data, progress=False)
    >>> memedit.key_count(st)
    327
  """
  for name, value in (("group", group), ("save_every", save_every)):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
      raise ValueError(f"{name}: expected a positive int, got {value!r}")
  if total is None and hasattr(batches, "__len__"):
    total = len(batches)
  n_avail = len(jax.local_devices())
  n_dev = n_avail if devices is None else int(devices)
  if not 1 <= n_dev <= n_avail:
    raise ValueError(f"devices: expected 1..{n_avail}, got {devices}")

  it = iter(batches)
  chunk = list(itertools.islice(it, group))
  global_arrays = bool(chunk) and any(
      isinstance(x, jax.Array) and not x.is_fully_addressable
      for x in jax.tree_util.tree_leaves(chunk[0]))
  n_proc = jax.process_count()
  if across_processes is None:
    across_processes = n_proc > 1 and not global_arrays
  if across_processes and global_arrays:
    raise ValueError("across_processes: expected False for global arrays that span several "
                     "processes (they are folded as one program), got True")
  n_run = n_proc if across_processes else 1
  me = jax.process_index() if across_processes else 0
  cache = _Cache(cache_dir, cache_key, n_run)
  if params is not None and key_fn is None:
    raise ValueError("params: expected a key_fn(params, batch) to pass them to, got none")
  folder = _Folder(key_fn, group, n_dev, params)

  saved = cache.load()
  done = 0
  state = None
  if saved is not None:
    states, consumed, complete = saved
    if complete:
      return _merge_all(states)
    state, done = states[me], consumed[me]
    if done:
      # Skip what was folded before, without computing its keys.
      rest = itertools.chain(chunk, it)
      it = itertools.islice(rest, done, None)
      chunk = list(itertools.islice(it, group))

  if chunk:
    d = folder.start(chunk[0], dim)
  else:
    d = dim if dim is not None else (state.dim if state is not None else -1)
  if across_processes:
    # Every process learns the key dimension (a process may have no batches at all) and
    # the total for the progress bar.
    info = np.asarray(_allgather(np.array([d, -1 if total is None else total], np.int64)))
    dims = {int(x) for x in info[:, 0] if x >= 0}
    if len(dims) != 1:
      raise ValueError(f"keys: expected one key dimension on every process, got "
                       f"{sorted(dims) or 'none (no process has a batch)'}")
    d = dims.pop()
    total = None if (info[:, 1] < 0).any() else int(info[:, 1].sum())
    if not chunk:
      folder.dim = d
  elif not chunk and state is None:
    raise ValueError("batches: expected at least one batch, got an empty stream")
  if state is None:
    state = folder.place(covariance_init(d, dtype=folder.dtype))
  elif state.dim != d:
    raise ValueError(f"cached state: expected dimension {d}, got {state.dim}")
  else:
    state = folder.place(state)

  bar = _Progress(total, progress and jax.process_index() == 0, "covariance")
  consumed = [done] * n_run
  consumed_all = sum(consumed) if saved is None else sum(saved[1])
  keys_all = 0
  groups = 0

  def gather():
    """Every process's state and position, in process order."""
    if not across_processes:
      return [state], [consumed[0]]
    host = _host_state(state)
    tree = _allgather({k: np.asarray(getattr(host, k)) for k in CovarianceState._fields})
    positions = [int(c) for c in np.asarray(_allgather(np.int64(consumed[me])))]
    return [_unstack(tree, i) for i in range(n_run)], positions

  def save(complete: bool):
    if cache.path is not None:
      cache.save(*gather(), complete)

  while True:
    n = len(chunk)
    rows = 0
    if chunk:
      if folder.template is None:
        folder.start(chunk[0], d)
      state, rows = folder.fold(state, chunk)
    consumed[me] += n
    step = np.array([n, rows * folder.keys_per_row], np.int64)
    if across_processes:
      step = np.asarray(_allgather(step)).sum(axis=0)
      if step[0] == 0:
        break
    elif n == 0:
      break
    consumed_all += int(step[0])
    keys_all += int(step[1])
    groups += 1
    bar(consumed_all, keys_all)
    if groups % save_every == 0:
      save(False)
    chunk = list(itertools.islice(it, group))
  bar(consumed_all, keys_all, final=True)
  states, positions = gather()
  if cache.path is not None:
    cache.save(states, positions, True)
  if across_processes:
    return _merge_all(states)
  if global_arrays:
    # Spanning other processes' devices: every process gets its own (equal) copy.
    return _place_state(_host_state(state), None)
  return state
