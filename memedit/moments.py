"""The state of streamed second moments and its arithmetic: init, fold, merge.

A :class:`CovarianceState` holds shifted sums of weighted keys about a shift c (the
weighted mean of the first batch): W = Σ wᵢ, s = Σ wᵢ (kᵢ − c), S = Σ wᵢ (kᵢ − c)(kᵢ − c)ᵀ,
with the number of keys kept exactly as two uint32 words and W as a compensated pair
(see :mod:`memedit.covariance` for the accuracy this gives, the dtype and weight rules,
and the results read from a state). ``covariance_init`` / ``covariance_update`` /
``covariance_merge`` are pure functions in the style of optax's init/update pairs;
:func:`fold_keys` and :func:`merge_states` are their traced cores, which
:mod:`memedit.stream` runs inside its compiled programs. The fold's O(n d²) step, the
Gram matrix of a chunk, is :func:`memedit.gram.gram`: BLAS ``syrk`` (half a GEMM) on CPU,
XLA's GEMM elsewhere.
"""

from __future__ import annotations

import functools

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from memedit.checks import (as_array, check_positive_int, check_real, expand_weights,
                            float_dtype, weights_error, weights_fit)
from memedit.gram import gram

__all__ = ["CovarianceState", "add_pair", "as_dtype", "check_key_dtype", "check_state",
           "covariance_init", "covariance_merge", "covariance_update", "fold_keys",
           "host_keys", "merge_states"]


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

  The float fields share one dtype: float32, or float64 (see :mod:`memedit.covariance`).

  Example:
    >>> import numpy as np, memedit
    >>> st = memedit.covariance_update(memedit.covariance_init(2), np.array([[1.0, 2.0], [3.0, 4.0]]))
    >>> st.count.tolist(), st.shift.tolist(), st.sum_sq.tolist()
    ([2, 0], [2.0, 3.0], [[2.0, 2.0], [2.0, 2.0]])
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


def as_dtype(state: CovarianceState, dtype: Any) -> CovarianceState:
  """``state`` with its float fields in ``dtype`` (exact when widening).

  Example:
    >>> import jax.numpy as jnp
    >>> as_dtype(covariance_init(2), jnp.float16).sum_sq.dtype
    dtype('float16')
  """
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
  dim = check_positive_int(dim, "dim")
  dt = float_dtype(dtype)
  count, weight, zero_shift, zero_sum, sum_sq, nonfinite = _empty(dim, jnp.dtype(dt))
  if shift is None:
    c = zero_shift
    has = jax.device_put(np.bool_(False))  # a transfer (jnp.asarray compiles a program)
  else:
    shift = jnp.asarray(as_array(shift, "shift"))
    check_real(shift, "shift")
    c = shift.astype(dt)
    if c.shape != (dim,):
      raise ValueError(f"shift: expected shape ({dim},), got {c.shape}")
    if not isinstance(c, jax.core.Tracer) and not bool(jnp.all(jnp.isfinite(c))):
      raise ValueError(f"shift: expected finite values, got NaN or inf in {shift!r}")
    has = jax.device_put(np.bool_(True))
  return CovarianceState(count=count, weight=weight, shift=c, has_shift=has, sum=zero_sum,
                         sum_sq=sum_sq, nonfinite=nonfinite)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _empty(dim: int, dt) -> tuple:
  """The zero fields of an empty state (count, weight, shift, sum, sum_sq, nonfinite),
  made by one compiled program per dimension and dtype (op by op, each would be a program
  of its own, compiled on a first call); distinct buffers, so a state can be donated."""
  return (jnp.zeros((2,), jnp.uint32), jnp.zeros((2,), dt), jnp.zeros((dim,), dt),
          jnp.zeros((dim,), dt), jnp.zeros((dim, dim), dt), jnp.zeros((), jnp.uint32))


def check_key_dtype(dtype) -> None:
  """Raises unless keys of ``dtype`` can be folded: a real floating, integer or boolean
  dtype (booleans fold as 0 and 1).

  Example:
    >>> import numpy as np
    >>> check_key_dtype(np.complex64)
    Traceback (most recent call last):
    ...
    ValueError: keys: expected a real dtype (floating, integer or boolean), got complex64
  """
  if not (jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer)
          or jnp.issubdtype(dtype, jnp.bool_)):
    raise ValueError(f"keys: expected a real dtype (floating, integer or boolean), got "
                     f"{jnp.dtype(dtype)}")


def host_keys(x: Any) -> Any:
  """Host integer keys that JAX would narrow, as float32 on the host; anything else as is.

  Without ``jax_enable_x64`` JAX holds an int64 or uint64 numpy array as int32 or uint32,
  which wraps values of 2³¹ and beyond (2³² for uint64) silently; the fold would then sum
  the wrapped numbers. Such keys are converted to float32 here instead, on the host (each
  value rounded once, to float32's 24 bits, as float64 keys are without x64). Keys JAX
  holds as they are (other dtypes, int64 under x64, device arrays) are returned unchanged.

  Args:
    x: keys (…, d) as passed by a user: a numpy array, a ``jax.Array``, a list…

  Returns:
    ``x``, or a float32 numpy copy of it when it is a numpy integer array JAX would narrow.

  Example:
    >>> import numpy as np
    >>> float(host_keys(np.array([[2**31 + 2**8]], np.int64))[0, 0])
    2147483904.0
  """
  if (isinstance(x, (np.ndarray, np.generic)) and x.dtype.kind in "iu"
      and jax.dtypes.canonicalize_dtype(x.dtype) != x.dtype):
    return np.asarray(x).astype(np.float32)
  return x


def check_state(state: Any, name: str = "state") -> None:
  """Raises a ``TypeError`` unless ``state`` is a :class:`CovarianceState`, and a
  ``ValueError`` unless its fields have the shapes of one state of some dimension d (a
  batch of states stacked by ``jax.vmap``, read outside it, is named as such).

  Example:
    >>> import numpy as np
    >>> check_state(np.eye(2))
    Traceback (most recent call last):
    ...
    TypeError: state: expected a CovarianceState (from covariance_init or stream_covariance), got ndarray
  """
  if not isinstance(state, CovarianceState):
    raise TypeError(f"{name}: expected a CovarianceState (from covariance_init or "
                    f"stream_covariance), got {type(state).__name__}")
  shapes = {f: tuple(np.shape(getattr(state, f))) for f in state._fields}

  def want(d, lead=()):
    return {"count": lead + (2,), "weight": lead + (2,), "shift": lead + (d,),
            "has_shift": lead, "sum": lead + (d,), "sum_sq": lead + (d, d), "nonfinite": lead}

  d = shapes["shift"][-1] if shapes["shift"] else 0
  if d > 0 and shapes == want(d):
    return
  lead = shapes["has_shift"]
  if lead and d > 0 and shapes == want(d, lead):
    raise ValueError(
        f"{name}: expected a single state, got a batch of states stacked over leading axes "
        f"{lead} (e.g. made by jax.vmap); map over them with jax.vmap (as they were made) "
        f"or take one, e.g. jax.tree.map(lambda x: x[i], state)")
  raise ValueError(
      f"{name}: expected a state's fields with shapes count (2,), weight (2,), shift (d,), "
      f"has_shift (), sum (d,), sum_sq (d, d), nonfinite () for one d ≥ 1, got "
      + ", ".join(f"{f} {shapes[f]}" for f in state._fields))


def _check_keys(state: CovarianceState, keys, weights):
  d = state.shift.shape[-1]
  if keys.ndim < 1 or keys.shape[-1] != d:
    raise ValueError(f"keys: expected shape (..., {d}), got {tuple(keys.shape)}")
  check_key_dtype(keys.dtype)
  if weights is not None:
    if not (jnp.issubdtype(weights.dtype, jnp.floating)
            or jnp.issubdtype(weights.dtype, jnp.integer)
            or jnp.issubdtype(weights.dtype, jnp.bool_)):
      raise ValueError(f"weights: expected a real dtype, got {weights.dtype}")
    if not weights_fit(weights.shape, keys.shape[:-1]):
      raise weights_error("weights", weights.shape, keys.shape[:-1])


def _add_count(count, n):
  """Adds uint32 ``n`` to a [low, high] uint32 pair with carry."""
  n = jnp.asarray(n, jnp.uint32)
  lo = count[0] + n
  hi = count[1] + (lo < count[0]).astype(jnp.uint32)
  return jnp.stack([lo, hi])


def add_pair(a: jax.Array, b: jax.Array) -> jax.Array:
  """Adds two exact counts kept as [low, high] uint32 words, with carry.

  Args:
    a: (2,) uint32 [low, high].
    b: (2,) uint32 [low, high].

  Returns:
    (2,) uint32, a + b modulo 2⁶⁴.

  Example:
    >>> import jax.numpy as jnp
    >>> add_pair(jnp.array([2**32 - 1, 0], jnp.uint32), jnp.array([1, 0], jnp.uint32)).tolist()
    [0, 1]
  """
  lo = a[0] + b[0]
  hi = a[1] + b[1] + (lo < a[0]).astype(jnp.uint32)
  return jnp.stack([lo, hi])


def _kahan_add(pair, x):
  """Compensated addition of float32 ``x`` to a [sum, compensation] pair."""
  y = x - pair[1]
  t = pair[0] + y
  comp = (t - pair[0]) - y
  return jnp.stack([t, comp])


def fold_keys(state: CovarianceState, keys: jax.Array, weights: jax.Array | None = None, *,
              partitioned: bool = False, preshifted: bool = False,
              sums: jax.Array | None = None) -> CovarianceState:
  """The traced fold behind :func:`covariance_update`, without its eager checks.

  Folds keys (…, d) with optional weights (aligned with the keys' leading axes) into
  ``state`` in the state's dtype: W += Σ wᵢ, s += Σ wᵢ (kᵢ − c), S += Σ wᵢ (kᵢ − c)(kᵢ − c)ᵀ,
  the Gram matrix by :func:`memedit.gram.gram`. Rows with a NaN or ±inf key or a NaN,
  ±inf or negative weight are counted in ``nonfinite`` and left out.

  Args:
    state: the running state of dimension d.
    keys: (…, d) array.
    weights: None or an array aligned with the keys' leading axes.
    partitioned: the program is SPMD-partitioned over a mesh (the Gram matrix is then
      XLA's GEMM, never a host callback).
    preshifted: ``keys`` are already kᵢ − c for the state's shift c (the state has one):
      the fold uses them as they are and keeps c. The shift then depends on no earlier
      fold inside the program, so the Gram matrices of a group's batches are independent
      and can run side by side.

  Returns:
    The updated state.

  Example:
    >>> import jax, numpy as np
    >>> st = jax.jit(fold_keys)(covariance_init(2), np.ones((3, 2), np.float32))
    >>> st.count.tolist(), st.sum_sq.tolist()
    ([3, 0], [[0.0, 0.0], [0.0, 0.0]])
  """
  d = state.shift.shape[-1]
  dt = state.sum.dtype
  if sums is not None and (not preshifted or weights is not None):
    raise ValueError("sums: expected only with preshifted keys and no weights, got "
                     f"preshifted={preshifted} and weights "
                     f"{'None' if weights is None else 'given'}")
  x = jnp.reshape(as_array(keys, "keys"), (-1, d)).astype(dt)
  if weights is None:
    w = jnp.ones((x.shape[0],), dt)
  else:
    w = jnp.asarray(as_array(weights, "weights")).astype(dt)
    w = jnp.reshape(expand_weights(w, keys.shape[:-1]), (-1,))
  used = w != 0

  def fold_sums(wf, xf, known=None):
    wsum = jnp.sum(wf)
    sw = jnp.sqrt(wf)
    # Raw keys already shifted are used as they are (no copy for the Gram matrix).
    plain = preshifted and weights is None
    if preshifted:
      shift = state.shift
      xs = xf if plain else xf * sw[:, None]
    else:
      # The first non-empty batch fixes the shift at its weighted mean.
      take = jnp.logical_and(~state.has_shift, wsum > 0)
      shift = lax.cond(
          take, lambda: jnp.sum(wf[:, None] * xf, axis=0) / jnp.maximum(wsum, 1e-30),
          lambda: state.shift)
      # xs = √w ⊙ (x − c): one materialised operand, used on both sides of the Gram
      # matrix (rows of weight 0 are exactly 0). The sums are a reduction rather than a
      # GEMV, whose float32 error was 5× larger (relative 3.8e-6 against 7.5e-7, 15,625
      # keys on CPU).
      xs = (xf - shift) * sw[:, None]
    if known is not None:
      s = jnp.reshape(known, (d,)).astype(dt)
    else:
      s = jnp.sum(xs if plain else xs * sw[:, None], axis=0)
    return wsum, shift, s, gram(xs, partitioned=partitioned, side_by_side=preshifted)

  def masked():
    # Rows are checked one by one only here: a row is refused (weight 0, counted) when an
    # entry of its key is NaN or ±inf, or its weight is NaN, ±inf or negative. The test is
    # elementwise, so a finite row of large entries is kept (a row sum could overflow).
    ok = jnp.all(jnp.isfinite(x), axis=-1) & jnp.isfinite(w) & (w >= 0)
    out = fold_sums(jnp.where(ok, w, 0.0), jnp.where(ok[:, None], x, 0.0))
    return out + (jnp.sum(ok & used, dtype=jnp.uint32),
                  jnp.sum(~ok & used, dtype=jnp.uint32))

  # The common case folds every row unmasked; a NaN or ±inf key, or a NaN, ±inf or
  # negative weight (√w is NaN), shows in W + Σ s + tr S, and only then is the batch
  # folded again with those rows masked. (Finite keys whose squares overflow also take
  # that path, are kept, and leave non-finite sums that the result functions refuse.)
  n_used = jnp.sum(used, dtype=jnp.uint32)
  plain = fold_sums(w, x, sums) + (n_used, jnp.zeros_like(n_used))
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


_fold_jit = jax.jit(fold_keys, static_argnames="partitioned")


def _on_several_devices(x) -> bool:
  """Whether ``x`` is a concrete array spread over several devices (under an enclosing
  ``jax.jit`` nothing is known of the placement: the platform's kernel runs)."""
  return (isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer)
          and len(x.sharding.device_set) > 1)


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
  check_state(state)
  keys = jnp.asarray(host_keys(as_array(keys, "keys")))
  weights = None if weights is None else jnp.asarray(host_keys(as_array(weights, "weights")))
  _check_keys(state, keys, weights)
  if weights is not None and not isinstance(weights, jax.core.Tracer):
    if bool(jnp.any(weights < 0)):
      raise ValueError("weights: expected non-negative weights, got a negative one")
  dt = jnp.promote_types(state.sum.dtype, float_dtype(keys.dtype))
  if dt != state.sum.dtype:
    state = as_dtype(state, dt)
  return _fold_jit(state, keys, weights, partitioned=_on_several_devices(keys))


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
  check_state(a, "covariance_merge: a")
  check_state(b, "covariance_merge: b")
  if a.shift.shape != b.shift.shape:
    raise ValueError(
        f"covariance_merge: expected states of the same dimension, got {a.shift.shape[-1]} "
        f"and {b.shift.shape[-1]}")
  dt = jnp.promote_types(a.sum.dtype, b.sum.dtype)
  return _merge_jit(as_dtype(a, dt), as_dtype(b, dt))


def merge_states(a: CovarianceState, b: CovarianceState) -> CovarianceState:
  """The traced merge behind :func:`covariance_merge` (states of one dimension and dtype).

  Args:
    a: a state. b: a state of the same dimension and dtype.

  Returns:
    The merged state (a's shift, or b's when a has none).

  Example:
    >>> import numpy as np
    >>> a = covariance_update(covariance_init(2), np.ones((2, 2), np.float32))
    >>> merge_states(a, a).count.tolist()
    [4, 0]
  """
  # An empty ``a`` (no key of non-zero weight: its sums are exactly 0) takes b's shift,
  # even one made with an explicit shift: b's sums keep the accuracy of b's own shift.
  a_empty = (a.count[0] == 0) & (a.count[1] == 0)
  shift = jnp.where(a.has_shift & ~(a_empty & b.has_shift), a.shift, b.shift)
  wb = b.weight[0] - b.weight[1]
  delta = jnp.where(b.has_shift, b.shift - shift, 0.0)
  sb = b.sum + wb * delta
  sqb = (b.sum_sq + jnp.outer(b.sum, delta) + jnp.outer(delta, b.sum)
         + wb * jnp.outer(delta, delta))
  return CovarianceState(
      count=add_pair(a.count, b.count),
      weight=_kahan_add(_kahan_add(a.weight, b.weight[0]), -b.weight[1]),
      shift=shift,
      has_shift=jnp.logical_or(a.has_shift, b.has_shift),
      sum=a.sum + sb,
      sum_sq=a.sum_sq + sqb,
      nonfinite=a.nonfinite + b.nonfinite,
  )


_merge_jit = jax.jit(merge_states)
