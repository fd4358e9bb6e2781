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
deviations away from zero. All matmuls use ``Precision.HIGHEST`` with float32
accumulation. The number of keys is kept exactly as two uint32 words (exact up to 2⁶⁴)
and the total weight as a compensated (Kahan) float32 pair, so neither degrades past 2²⁴
keys the way a float32 counter would.
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
    weight: (2,) float32, total weight W as a compensated pair [sum, compensation].
    shift: (d,) float32, the shift c the sums are taken about.
    has_shift: () bool, whether ``shift`` is fixed (set by the first non-empty batch).
    sum: (d,) float32, s = Σ wᵢ (kᵢ − c).
    sum_sq: (d, d) float32, S = Σ wᵢ (kᵢ − c)(kᵢ − c)ᵀ.
    nonfinite: () uint32, number of keys that held NaN or ±inf (they are not folded).
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


def covariance_init(dim: int, shift: Any = None) -> CovarianceState:
  """Creates an empty state for keys of dimension ``dim``.

  Args:
    dim: key dimension d (a positive int).
    shift: optional (d,) shift c to accumulate about. When None, the weighted mean of the
      first non-empty batch is used.

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
  if shift is None:
    c = jnp.zeros((dim,), jnp.float32)
    has = jnp.asarray(False)
  else:
    c = jnp.asarray(shift, jnp.float32)
    if c.shape != (dim,):
      raise ValueError(f"shift: expected shape ({dim},), got {c.shape}")
    has = jnp.asarray(True)
  return CovarianceState(
      count=jnp.zeros((2,), jnp.uint32),
      weight=jnp.zeros((2,), jnp.float32),
      shift=c,
      has_shift=has,
      sum=jnp.zeros((dim,), jnp.float32),
      sum_sq=jnp.zeros((dim, dim), jnp.float32),
      nonfinite=jnp.zeros((), jnp.uint32),
  )


def _check_keys(state: CovarianceState, keys, weights):
  d = state.shift.shape[-1]
  if keys.ndim < 1 or keys.shape[-1] != d:
    raise ValueError(f"keys: expected shape (..., {d}), got {tuple(keys.shape)}")
  if not (jnp.issubdtype(keys.dtype, jnp.floating) or jnp.issubdtype(keys.dtype, jnp.integer)):
    raise ValueError(f"keys: expected a real dtype, got {keys.dtype}")
  if weights is not None:
    lead = keys.shape[:-1]
    try:
      np.broadcast_shapes(tuple(weights.shape), lead)
      ok = len(weights.shape) <= len(lead) and np.broadcast_shapes(tuple(weights.shape), lead) == lead
    except ValueError:
      ok = False
    if not ok:
      raise ValueError(
          f"weights: expected a shape that broadcasts to the keys' leading shape {lead}, "
          f"got {tuple(weights.shape)}")


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
  x = jnp.reshape(keys, (-1, d)).astype(jnp.float32)
  if weights is None:
    w = jnp.ones((x.shape[0],), jnp.float32)
  else:
    w = jnp.reshape(jnp.broadcast_to(jnp.asarray(weights, jnp.float32), keys.shape[:-1]), (-1,))
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
    ss = jnp.einsum("nd,ne->de", xs, xs, precision=HIGHEST, preferred_element_type=jnp.float32)
    return wsum, shift, s, ss

  def masked():
    # A row is finite iff its sum is (NaN and ±inf propagate); such rows get weight 0.
    finite = jnp.isfinite(jnp.sum(x, axis=-1))
    out = sums(jnp.where(finite, w, 0.0), jnp.where(finite[:, None], x, 0.0))
    return out + (jnp.sum(finite & used, dtype=jnp.uint32),
                  jnp.sum(~finite & used, dtype=jnp.uint32))

  # The common case folds every row unmasked; any NaN or ±inf among them shows in
  # Σ s + tr S, and only then is the batch folded again with those rows masked.
  n_used = jnp.sum(used, dtype=jnp.uint32)
  plain = sums(w, x) + (n_used, jnp.zeros_like(n_used))
  clean = jnp.isfinite(jnp.sum(plain[2]) + jnp.trace(plain[3]))
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
  Keys holding NaN or ±inf are counted in ``state.nonfinite`` and left out; the result
  functions then raise.

  Args:
    state: the running :class:`CovarianceState` for dimension d.
    keys: (..., d) array; every leading position is one key (pixels, tokens, batch).
    weights: optional non-negative array broadcastable to ``keys.shape[:-1]`` (e.g. a
      soft mask).

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
  return _merge_jit(a, b)


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
    () float32.

  Example:
    >>> import numpy as np, memedit
    >>> s = memedit.covariance_update(memedit.covariance_init(2), np.ones((4, 2)), np.full(4, 0.5))
    >>> float(memedit.total_weight(s))
    2.0
  """
  return state.weight[0] - state.weight[1]


def _check_result_state(state: CovarianceState, what: str):
  if isinstance(state.nonfinite, jax.core.Tracer):
    return
  bad = int(np.asarray(state.nonfinite))
  if bad:
    raise ValueError(
        f"{what}: expected finite keys, got {bad} key(s) holding NaN or inf among "
        f"{key_count(state) + bad}")
  if not isinstance(state.weight, jax.core.Tracer) and float(np.asarray(total_weight(state))) <= 0:
    raise ValueError(f"{what}: expected at least one key with positive weight, got none")


def key_mean(state: CovarianceState) -> jax.Array:
  """Weighted mean of the keys, μ = c + s / W.

  Args:
    state: a :class:`CovarianceState` of dimension d.

  Returns:
    (d,) float32.

  Raises:
    ValueError: non-finite keys were folded, or no key had positive weight.

  Example:
    >>> import numpy as np, memedit
    >>> s = memedit.covariance_update(memedit.covariance_init(2), np.array([[1.0, 2.0], [3.0, 4.0]]))
    >>> np.asarray(memedit.key_mean(s))
    array([2., 3.], dtype=float32)
  """
  _check_result_state(state, "key_mean")
  return state.shift + state.sum / total_weight(state)


def centered_covariance(state: CovarianceState) -> jax.Array:
  """Weighted centered covariance Σ = S / W − (s / W)(s / W)ᵀ (population normalisation).

  Args:
    state: a :class:`CovarianceState` of dimension d.

  Returns:
    (d, d) float32, symmetric.

  Raises:
    ValueError: non-finite keys were folded, or no key had positive weight.

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
  return 0.5 * (cov + cov.T)


def second_moment(state: CovarianceState) -> jax.Array:
  """The uncentered second moment C = E[k kᵀ] = Σ + μ μᵀ of the method.

  Args:
    state: a :class:`CovarianceState` of dimension d.

  Returns:
    (d, d) float32, symmetric.

  Raises:
    ValueError: non-finite keys were folded, or no key had positive weight.

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
  return 0.5 * (c + c.T)


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


@functools.lru_cache(maxsize=64)
def _make_group_fn(key_fn, dim, n_dev):
  """Compiles the fold of a group of stacked batches (G, B, ...) into a state."""

  def fold_group(state, batches, valid):
    def body(st, inp):
      batch, ok = inp
      keys, w = _split_keys(key_fn(batch))
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

  def sharded(state, batches, valid):
    # Every device folds its share of each batch into an empty state with the common
    # shift, then the partial sums are reduced across devices with psum.
    def per_device(st0, b, v):
      local = covariance_init(dim)._replace(shift=st0.shift, has_shift=st0.has_shift)
      local = jax.tree_util.tree_map(lambda x: lax.pcast(x, ("data",), to="varying"), local)
      part = fold_group(local, b, v)
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
                       in_specs=(rep, P(None, "data"), P(None, "data")),
                       out_specs=rep)
    total = fn(state, batches, valid)
    return _merge(state._replace(has_shift=jnp.asarray(True)), total)

  in_sharding = NamedSharding(mesh, P(None, "data"))
  jitted = jax.jit(sharded)

  def run(state, batches, valid):
    batches = jax.device_put(batches, in_sharding)
    valid = jax.device_put(valid, in_sharding)
    return jitted(state, batches, valid)

  return run


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
) -> CovarianceState:
  """Folds a stream of batches into a :class:`CovarianceState` inside compiled programs.

  Batches are taken ``group`` at a time and folded by one compiled program per group:
  raw key arrays are folded in place; with ``key_fn`` the group is stacked and scanned
  with ``lax.scan`` (the last group is padded with zero-weight batches, so one program
  serves the whole stream). With several local devices each batch's leading axis is split across them with
  ``jax.shard_map`` and the partial sums are combined with ``psum`` (batches whose size
  does not divide evenly are padded with zero-weight rows).

  Args:
    batches: iterable of arrays of equal shape; with ``key_fn``, any pytree of arrays
      whose leaves share a leading batch axis.
    dim: key dimension d; inferred from the first batch when omitted.
    key_fn: optional pure function batch → keys (B, ..., d) or (keys, weights); it is
      traced inside the compiled program (e.g. a model run as far as a layer).
    group: batches per compiled fold.
    total: number of batches, for the progress bar (``len(batches)`` when available).
    progress: show a progress bar on stderr.
    cache_dir, cache_key: when both are given, the state is saved atomically (orbax) under
      ``cache_dir/cache_key`` every ``save_every`` groups with the number of batches
      consumed, and a later call with the same key resumes from it, skipping those
      batches without computing their keys. A finished run is returned from the cache.
    save_every: groups between checkpoints.
    devices: number of local devices to use (default: all local devices).

  Returns:
    The folded state; read C with :func:`second_moment`.

  Example:
    >>> import numpy as np, memedit
    >>> rng = np.random.default_rng(0)
    >>> data = [rng.normal(size=(64, 8)).astype("float32") for _ in range(5)]
    >>> st = memedit.stream_covariance(data, progress=False)
    >>> memedit.key_count(st)
    320
  """
  if group < 1:
    raise ValueError(f"group: expected a positive int, got {group}")
  if total is None and hasattr(batches, "__len__"):
    total = len(batches)
  n_avail = len(jax.local_devices())
  n_dev = n_avail if devices is None else int(devices)
  if not 1 <= n_dev <= n_avail:
    raise ValueError(f"devices: expected 1..{n_avail}, got {devices}")
  ident = key_fn is None
  kfn = _identity if ident else key_fn

  cache_path = None
  done = 0
  state = None
  if cache_dir is not None and cache_key is not None:
    cache_path = os.path.join(os.fspath(cache_dir), str(cache_key))
    if os.path.isdir(cache_path):
      tree, meta = _io.load_tree(cache_path)
      state = CovarianceState(**{k: jnp.asarray(v) for k, v in tree.items()})
      done = int(meta["batches"])
      if meta.get("complete"):
        return state
  elif (cache_dir is None) != (cache_key is None):
    raise ValueError("cache_dir and cache_key: expected both or neither, got only one")

  it = iter(batches)
  if done:
    it = itertools.islice(it, done, None)
  bar = _Progress(total, progress, "covariance")
  group_fn = None
  template = None
  consumed = done
  groups_since_save = 0

  def save(complete: bool):
    _io.save_tree(cache_path, state._asdict(),
                  {"batches": consumed, "complete": complete, "dim": int(state.dim)})

  while True:
    chunk = list(itertools.islice(it, group))
    if not chunk:
      break
    if template is None:
      template = jax.tree_util.tree_map(np.shape, chunk[0])
      first_keys, _ = _split_keys(jax.eval_shape(kfn, chunk[0]))
      d = int(first_keys.shape[-1])
      keys_per_batch = int(np.prod(first_keys.shape[:-1]))
      if dim is not None and d != dim:
        raise ValueError(f"keys: expected last dimension {dim}, got {d}")
      dim = d
      if state is None and n_dev > 1:
        # A common shift for every device: the mean of the first batch's keys. (On one
        # device the first fold sets it from the first batch.)
        k0, w0 = _split_keys(jax.jit(kfn)(chunk[0]))
        st0 = _fold_jit(covariance_init(dim), k0, w0)
        state = covariance_init(dim, shift=st0.shift)
      elif state is None:
        state = covariance_init(dim)
      elif state.dim != dim:
        raise ValueError(f"cached state: expected dimension {dim}, got {state.dim}")
      group_fn = _make_group_fn(kfn, dim, n_dev)
    for b in chunk:
      shape = jax.tree_util.tree_map(np.shape, b)
      if shape != template:
        raise ValueError(f"batches: expected every batch to have shape {template}, got {shape}")
    n = len(chunk)
    if ident and n_dev == 1:
      # Raw keys on one device: fold the group's arrays as they are, in one compiled
      # program, without first copying them into a stacked array.
      state = _fold_many_jit(state, tuple(chunk))
    else:
      stacked = jax.tree_util.tree_map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *chunk)
      bsz = jax.tree_util.tree_leaves(stacked)[0].shape[1]
      pad_b = (-bsz) % n_dev
      if n < group or pad_b:
        stacked = jax.tree_util.tree_map(
            lambda x: np.pad(x, [(0, group - n), (0, pad_b)] + [(0, 0)] * (x.ndim - 2)), stacked)
      valid = np.zeros((group, bsz + pad_b), bool)
      valid[:n, :bsz] = True
      state = group_fn(state, stacked, valid)
    consumed += n
    groups_since_save += 1
    bar(consumed, (consumed - done) * keys_per_batch)
    if cache_path is not None and groups_since_save >= save_every:
      save(False)
      groups_since_save = 0
  if state is None:
    raise ValueError("batches: expected at least one batch, got an empty stream")
  bar(consumed, (consumed - done) * keys_per_batch, final=True)
  if cache_path is not None:
    save(True)
  return state
