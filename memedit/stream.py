"""Streaming the keys of a data set into a covariance state: :func:`stream_covariance`.

The driver takes a stream's batches ``group`` at a time and folds every group with one
compiled program (:mod:`memedit.fold_programs`): host batches stacked and scanned, over
several local devices when there are several; device-resident and global arrays where
they live; several processes (``jax.distributed``) each folding their part and merging
exactly. It overlaps the host's work (reading and transferring group i+1) with the fold
of group i, saves and resumes through a cache (:mod:`memedit.stream_cache`) and shows a
progress bar. A thread may ask its runs to stop between groups (:func:`stop_when`).
"""

from __future__ import annotations

import collections.abc
import contextlib
import itertools
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterable, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, Mesh, NamedSharding
import numpy as np

from memedit import fold_programs
from memedit.checks import as_array, check_positive_int
from memedit.fold_programs import (BatchTemplate, check_key_output, group_input_sharding,
                                   identity, is_resident, on_several_devices, pad_rows,
                                   padded_rows, replicated_sharding, split_keys, with_params)
from memedit.moments import (CovarianceState, check_key_dtype, covariance_init, fold_keys,
                             host_keys)
from memedit.stream_cache import (StreamCache, allgather, batch_digest, host_state, merge_all,
                                  place_state, unstack_state)

__all__ = ["Stopped", "stop_when", "stream_covariance"]


class Stopped(Exception):
  """A :func:`stream_covariance` run stopped between groups because :func:`stop_when`'s
  ``should_stop`` said so; a cache keeps what was saved before (not marked complete)."""


_STOP = threading.local()


@contextlib.contextmanager
def stop_when(should_stop: Callable[[], bool]):
  """Within the block, :func:`stream_covariance` runs of this thread call
  ``should_stop()`` before each group of batches is folded and raise :class:`Stopped`
  when it is true, once the fold in flight has ended (nothing computes after the raise).
  A run with a cache has saved what it folded up to its last save, marked incomplete: a
  later run resumes from there. Other threads' runs are not affected; blocks nest (the
  innermost applies). Several processes (``jax.distributed``) must stop at the same
  group: the others would wait for the one that stopped.

  Example:
    >>> import threading, numpy as np
    >>> stop = threading.Event()
    >>> stop.set()
    >>> with stop_when(stop.is_set):
    ...   try:
    ...     stream_covariance([np.ones((4, 3), np.float32)], progress=False)
    ...   except Stopped as e:
    ...     print(e)
    stream_covariance: stopped before group 1 (0 batches folded), as asked
  """
  if not callable(should_stop):
    raise TypeError(f"should_stop: expected a function of no arguments returning a bool, "
                    f"got {type(should_stop).__name__}")
  outer = getattr(_STOP, "check", None)
  _STOP.check = should_stop
  try:
    yield
  finally:
    _STOP.check = outer


def _stop_asked() -> bool:
  check = getattr(_STOP, "check", None)
  return check is not None and bool(check())


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


class _Prepared(NamedTuple):
  """A group ready to fold: the program calls ``fn(state, *args)`` in order, the rows it
  holds, and (over several devices, before the first fold) the batches that set the
  common shift."""

  calls: list
  rows: int
  shift_from: Any
  slot: int | None = None
  shift: Any = None


def _aligned_empty(shape: tuple, dtype) -> np.ndarray:
  """An uninitialised C-contiguous array whose data starts on a 64-byte boundary (XLA:CPU
  then uses it in place: ``device_put`` aliases it instead of copying)."""
  dtype = np.dtype(dtype)
  nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
  raw = np.empty(nbytes + 64, np.uint8)
  start = (-raw.ctypes.data) % 64
  return raw[start:start + nbytes].view(dtype).reshape(shape)


#: Staging buffers of at most this many bytes are kept after a stream ends, for the next
#: stream of raw host keys on the CPU (1 GiB: two groups of 16 chunks of 15,625 × 512
#: float32 keys).
RETAIN_BYTES = 1 << 30
_kept: list = []
_kept_lock = threading.Lock()


def _take_staging() -> "_Staging":
  with _kept_lock:
    return _kept.pop() if _kept else _Staging()


def _keep_staging(staging: "_Staging") -> None:
  staging.settle()
  if staging.nbytes() <= RETAIN_BYTES:
    with _kept_lock:
      if not _kept:
        _kept.append(staging)


def _folds_on_host_cpu() -> bool:
  """Whether programs without a placement run on the host's CPU (where a numpy buffer and
  a device buffer can be the same memory)."""
  dev = jax.config.jax_default_device
  platform = getattr(dev, "platform", dev) if dev is not None else jax.default_backend()
  return platform == "cpu"


class _Staging:
  """Host batches of raw keys staged for the CPU fold: each batch minus the stream's
  shift, written into reused 64-byte-aligned buffers that the device arrays alias.

  Measured on a 2-core CPU, 10⁶ keys of dimension 512 in chunks of 15,625, OpenBLAS on
  one thread per call: the fold of staged, pre-shifted keys took 1.7–2.1 s where the same
  program on the raw chunks took 3.6–4.0 s. Writing x − c in the reader thread costs one
  pass, on the core the fold leaves free; in the program XLA's subtraction costs a pass
  plus a fresh 32 MB buffer per chunk, and each transferred numpy chunk (numpy aligns
  large arrays to 16 bytes only) another copy into fresh memory. Fresh memory is what
  costs most on a virtual machine whose host backs pages only when first touched: the
  same stream took 1.9–2.4 s with buffers kept from an earlier call and 2.2–5.8 s with
  new ones. So two slots of ``group`` buffers are used in turn (the group being written
  and the one folding; a slot is written again only once the program that read it has
  finished), and one set of them is kept between calls (:data:`RETAIN_BYTES`).

  The column sums are taken while staging, a block of rows at a time while it is in the
  cache (:func:`_shifted_copy`): summed in the program, they cost a pass over the keys
  that XLA does not overlap with the syrk calls, 402 ms per group of 16 chunks against
  455–480 ms with the sums in the program (1.5 ms of numpy per chunk).
  """

  SLOTS = 2

  def __init__(self):
    self.buffers = [[] for _ in range(self.SLOTS)]
    self.busy = [None] * self.SLOTS
    self.next = 0

  def nbytes(self) -> int:
    return sum(b.nbytes for bufs in self.buffers for b in bufs if b is not None)

  def settle(self) -> None:
    """Waits for every program reading the buffers."""
    for i, state in enumerate(self.busy):
      if state is not None:
        jax.block_until_ready(state)
        self.busy[i] = None

  def stage(self, chunk: list, shift: np.ndarray, dtype,
            alone: bool = False) -> tuple[int, tuple]:
    """Writes each batch of ``chunk`` minus ``shift`` into the next slot's buffers and
    returns the slot and the device arrays (keys − shift, their column sums) for the
    program; with ``alone`` (no fold running yet: the stream's first group) two threads
    share the work."""
    slot = self.next
    self.next = (slot + 1) % self.SLOTS
    if self.busy[slot] is not None:
      jax.block_until_ready(self.busy[slot])
      self.busy[slot] = None
    bufs = self.buffers[slot]
    while len(bufs) < len(chunk):
      bufs.append(None)
    for i, x in enumerate(chunk):
      if bufs[i] is None or bufs[i].shape != x.shape or bufs[i].dtype != dtype:
        bufs[i] = _aligned_empty(x.shape, dtype)
    jobs = [(x, bufs[i], shift) for i, x in enumerate(chunk)]
    if alone and len(jobs) > 1:
      half = len(jobs) // 2
      with ThreadPoolExecutor(1, "memedit-stage") as pool:
        rest = pool.submit(lambda: [_shifted_copy(*job) for job in jobs[half:]])
        sums = [_shifted_copy(*job) for job in jobs[:half]] + rest.result()
    else:
      sums = [_shifted_copy(*job) for job in jobs]
    staged = [(buf, s.astype(dtype)) for (_, buf, _), s in zip(jobs, sums)]
    return slot, tuple(jax.device_put(staged))


#: Rows summed one after another in the keys' dtype before the partial sums are added in
#: float64 (numpy adds the rows of an (n, d) array along axis 0 one by one: the error of
#: a float32 column sum of n rows grows like n).
SUM_ROWS = 64


def _shifted_copy(x: np.ndarray, out: np.ndarray, shift: np.ndarray) -> np.ndarray:
  """Writes x − shift into ``out`` and returns its column sums (float64), a block of
  rows (about 1 MB) at a time: each block is summed while it is still in the cache (the
  sum then costs about a fifth of the copy instead of another pass over memory), by
  runs of :data:`SUM_ROWS` rows whose sums are added in float64."""
  d = x.shape[-1]
  x2, out2 = x.reshape(-1, d), out.reshape(-1, d)
  block = max(1, (1 << 20) // max(d * out.itemsize * SUM_ROWS, 1)) * SUM_ROWS
  total = np.zeros(d, np.float64)
  with np.errstate(over="ignore", invalid="ignore"):
    for i in range(0, x2.shape[0], block):
      part = out2[i:i + block]
      np.subtract(x2[i:i + block], shift, out=part)
      whole = part.shape[0] - part.shape[0] % SUM_ROWS
      if whole:
        runs = part[:whole].reshape(-1, SUM_ROWS, d).sum(axis=1)
        total += runs.sum(axis=0, dtype=np.float64)
      total += part[whole:].sum(axis=0, dtype=np.float64)
    if not np.isfinite(total).all():
      # A finite key whose difference from the shift overflows is no NaN or inf key: the
      # fold (which sees only x − c) would refuse it as one. Written as the dtype's
      # largest value instead, its square still overflows, so the sums are not finite and
      # the result functions refuse them, as for the same key through covariance_update.
      over = np.isinf(out2) & np.isfinite(x2)
      if over.any():
        out2[over] = np.copysign(np.finfo(out2.dtype).max, out2[over])
  return total


def _eager_only(driver: str) -> str:
  return (f"{driver} is an eager driver that reads the stream and runs its own compiled "
          f"programs, so it cannot be called inside jax.jit, jax.vmap, jax.grad or another "
          f"transformation; call it outside the transformation (inside one, fold keys with "
          f"memedit.covariance_update)")


def refuse_under_jit(driver: str) -> None:
  """Raises when the caller is being traced by ``jax.jit``: there every operation gives a
  tracer, also of constants, so the folds' states would be traced even when the batches
  are not. (A ``device_put`` of a constant tells, and eagerly compiles nothing.)"""
  if isinstance(jax.device_put(np.int32(0)), jax.core.Tracer):
    raise ValueError(f"{driver}: expected an eager call, got one traced by jax.jit: "
                     + _eager_only(driver))


def refuse_traced(tree: Any, name: str, driver: str = "stream_covariance") -> None:
  """Raises when ``tree`` holds a traced value: ``driver`` is an eager driver (it reads
  the stream, compiles and runs its own programs and may save a cache), which cannot run
  inside ``jax.jit``, ``jax.vmap``, ``jax.grad`` or another transformation."""
  leaves = jax.tree_util.tree_leaves(tree)
  traced = next((x for x in leaves if isinstance(x, jax.core.Tracer)), None)
  if traced is not None:
    raise ValueError(f"{name}: expected concrete arrays, got a traced value of shape "
                     f"{tuple(traced.shape)}: " + _eager_only(driver))


def _host_ready(batches: list, raw_keys: bool = False) -> list:
  """The batches with every host leaf checked by :func:`memedit.checks.as_array`: numpy
  leaves in non-native byte order (e.g. big-endian chunks read from a file) become
  native-order copies, on the host; leaves that are not numbers raise. Device arrays and
  valid native leaves are kept as they are (no copy), except that arrays sharded over a
  mesh with explicit axes are viewed on the same mesh with automatic axes
  (:func:`_auto_axes`). With ``raw_keys`` (no key_fn: the leaves are keys and weights),
  integer leaves JAX would narrow are made float32 on the host
  (:func:`memedit.moments.host_keys`)."""
  fix = host_keys if raw_keys else (lambda x: x)
  return [jax.tree_util.tree_map(lambda x: _auto_axes(fix(as_array(x, "batches"))), b)
          for b in batches]


def _is_prng_key(x) -> bool:
  return isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def _auto_axes(x):
  """``x`` itself, or when it is sharded over a mesh with explicit axes (what
  ``jax.make_mesh`` makes by default), the same shards on the same devices under a mesh
  whose axes are automatic: the fold's contraction over the sharded batch axis leaves
  the sharding of C to XLA (a replicated sum), which explicit axes refuse to guess."""
  s = getattr(x, "sharding", None)
  if not (isinstance(x, jax.Array) and isinstance(s, NamedSharding)
          and isinstance(s.mesh, Mesh)
          and any(t == AxisType.Explicit for t in s.mesh.axis_types)):
    return x
  mesh = Mesh(s.mesh.devices, s.mesh.axis_names,
              axis_types=(AxisType.Auto,) * len(s.mesh.axis_names))
  return jax.device_put(x, NamedSharding(mesh, s.spec))


def _finite_mean(x: np.ndarray, dtype) -> np.ndarray | None:
  """The mean (accumulated in float64) of the rows of keys ``x`` (B, ..., d) whose
  entries are all finite, in ``dtype``; None when no row is."""
  x = x.reshape(-1, x.shape[-1])
  if x.shape[0] == 0:
    return None
  with np.errstate(all="ignore"):
    mean = x.mean(axis=0, dtype=np.float64)
    if not np.isfinite(mean).all():
      x = x[np.isfinite(x).all(axis=1)]
      if x.shape[0] == 0:
        return None
      mean = x.mean(axis=0, dtype=np.float64)
  return mean.astype(dtype) if np.isfinite(mean).all() else None


class _Folder:
  """Folds groups of a stream into one state, the way the batches' kind requires."""

  def __init__(self, key_fn, group: int, n_dev: int, params):
    self.ident = key_fn is None
    self.kfn = identity if self.ident else key_fn
    self.params = params
    self.has_params = params is not None
    self.keys_of = with_params(self.kfn, self.has_params)
    self.group, self.n_dev = group, n_dev
    self.template = None
    self.resident = False
    self.partitioned = False
    self.sharding = None
    self.devices = None
    self.dim = None
    self.first_rows = None
    self.keys_per_row = 0
    self.shift_ready = False
    self.dtype = jnp.float32
    self.staging = None
    self.host_shift = None
    # While the shift is unknown: the state after each group's fold, by group number
    # (written by run in the main thread while the reader thread prepares the next group:
    # both take the lock).
    self.folded = {}
    self.folded_lock = threading.Lock()
    self.n_prepared = self.n_run = 0

  def known_shift(self, state) -> None:
    """Takes the shift of the state the stream starts from (a resumed cache), if it has
    one: staged keys must be shifted by the state's own shift."""
    if bool(state.has_shift):
      self.host_shift = np.asarray(state.shift, self.dtype)

  def start(self, first, dim):
    """Reads the stream's template, kind and key dimension from its first batch."""
    self.template = BatchTemplate.of(first)
    self.first_rows = self.template.rows(first)
    self.resident = is_resident(first)
    if self.resident:
      self.sharding = replicated_sharding(first)
      self.partitioned = on_several_devices(first)
    out = jax.eval_shape(self.keys_of, self.params, first)
    # Keys (B, ..., d) with the batch axis first (ragged batches are padded along it),
    # and weights that fit them: refused here, before anything is folded.
    check_key_output(out, rows=self.first_rows, name="batches" if self.ident else "key_fn")
    first_keys, _ = split_keys(out)
    d = int(first_keys.shape[-1])
    if dim is not None and d != dim:
      raise ValueError(f"keys: expected last dimension {dim}, got {d}")
    check_key_dtype(first_keys.dtype)
    self.dim = d
    self.keys_per_row = int(np.prod(first_keys.shape[:-1])) // max(self.first_rows, 1)
    # float64 keys (under jax_enable_x64) are folded in float64; all others in float32.
    self.dtype = jnp.float64 if first_keys.dtype == jnp.float64 else jnp.float32
    return d

  def _common_shift(self, state, batches):
    """Over several devices every device folds about one shift: unless the state has
    one, the weighted mean of the finite keys of the group's first batch that has a key
    of positive weight (an empty, all-NaN or zero-weight batch fixes none: a shift of 0
    would cost the sums their accuracy for keys far from 0). When no batch of the group
    has one, the state keeps none (see :meth:`run`)."""
    if bool(state.has_shift):
      self.shift_ready = True
      return state
    fold = jax.jit(fold_keys)
    for batch in batches:
      k0, w0 = split_keys(jax.jit(self.keys_of)(self.params, batch))
      st0 = fold(covariance_init(self.dim, dtype=self.dtype), k0, w0)
      if bool(st0.has_shift):
        self.shift_ready = True
        # On the host: a batch or parameters committed to one device leave st0 there,
        # and the program then runs on the data mesh.
        return state._replace(shift=jnp.asarray(np.asarray(st0.shift)),
                              has_shift=jnp.asarray(True))
    return state

  def place(self, state):
    if self.resident and self.sharding is not None:
      return place_state(host_state(state), self.sharding)
    return state

  def prepare(self, chunk, place: bool) -> _Prepared:
    """The program calls that fold ``chunk``; with ``place`` its host batches are sent to
    the device(s) now (asynchronously), not when the program is dispatched."""
    if self.template is None:
      self.start(chunk[0], self.dim)
    index, self.n_prepared = self.n_prepared, self.n_prepared + 1
    sizes = [self.template.rows(b) for b in chunk]
    resident = self.resident and all(is_resident(b) for b in chunk)
    if resident:
      self._check_devices(chunk)
    if resident and (self.sharding is not None or len(set(sizes)) == 1):
      fn = fold_programs.make_resident_fn(self.kfn, self.dim, self.sharding, self.has_params,
                                          self.partitioned)
      if len(set(sizes)) == 1:
        return _Prepared([(fn, (self.params, tuple(chunk)))], sum(sizes), None)
      # Global arrays of several shapes: one program per distinct shape.
      return _Prepared([(fn, (self.params, (b,))) for b in chunk], sum(sizes), None)
    n_dev = 1 if resident else self.n_dev
    uniform = all(s == self.first_rows for s in sizes)
    if self.ident and self.n_dev == 1 and uniform:
      # Raw keys of the stream's own batch size: folded as they are, without first being
      # copied into a stacked array (a short last group by a program of its own length).
      first = index == 0
      fixes = first and self.host_shift is None
      shift = self._shift_for(chunk, index) if not resident else None
      if shift is not None:
        # On the CPU, once the shift is known: staged and folded pre-shifted (_Staging).
        if self.staging is None:
          self.staging = _take_staging()
        slot, batches = self.staging.stage(chunk, shift, self.dtype, alone=first)
        fn = fold_programs.make_resident_fn(identity, self.dim, None, preshifted=True)
        return _Prepared([(fn, (None, batches))], sum(sizes), None, slot,
                         shift if fixes else None)
      fn = fold_programs.make_resident_fn(identity, self.dim, None)
      batches = tuple(chunk)
      if place and not resident:
        batches = jax.device_put(batches)
      return _Prepared([(fn, (None, batches))], sum(sizes), None)
    # Stacked and scanned: a group of full batches keeps the first batch's size (rounded
    # up to the devices); any other group is padded to a power of two with zero-weight
    # rows, so a ragged stream compiles one program per power of two at most.
    rows = self.first_rows if uniform else padded_rows(max(sizes), n_dev)
    rows = -(-rows // n_dev) * n_dev
    def on_host(x):  # typed PRNG keys have no numpy form: they stay jax.Arrays
      return x if resident or _is_prng_key(x) else np.asarray(x)

    padded = [jax.tree_util.tree_map(lambda x: pad_rows(on_host(x), rows), b) for b in chunk]
    # A short group is padded with zero-weight batches to a power of two (at most
    # log2(group) + 1 group lengths, and under twice the work of its own batches).
    n_batches = min(self.group, padded_rows(len(chunk), 1))
    padded += [padded[-1]] * (n_batches - len(chunk))
    stacked = jax.tree_util.tree_map(
        lambda *xs: (jnp if isinstance(xs[0], jax.Array) else np).stack(xs), *padded)
    valid = np.zeros((n_batches, rows), bool)
    for i, s in enumerate(sizes):
      valid[i, :s] = True
    if place:
      stacked, valid = jax.device_put((stacked, valid), group_input_sharding(n_dev))
    fn = fold_programs.make_group_fn(self.kfn, self.dim, n_dev, self.has_params)
    return _Prepared([(fn, (self.params, stacked, valid))], sum(sizes),
                     chunk if n_dev > 1 else None)

  def _check_devices(self, chunk) -> None:
    """Raises unless every committed ``jax.Array`` leaf of ``chunk`` lies on the devices
    of the stream's first committed leaf: a fold runs where its batches are, and never
    moves them (uncommitted arrays go where the fold runs)."""
    for batch in chunk:
      for x in jax.tree_util.tree_leaves(batch):
        if not x.committed:
          continue
        ids = sorted(dev.id for dev in x.sharding.device_set)
        if self.devices is None:
          self.devices = ids
        elif ids != self.devices:
          raise ValueError(
              f"batches: expected every jax.Array batch on the devices of the stream's "
              f"first one (device ids {self.devices}), got one on device ids {ids}; "
              f"device_put the batches onto one device or one mesh")

  def _shift_for(self, chunk, index: int) -> np.ndarray | None:
    """The stream's shift as a host array, when ``chunk`` (the group numbered ``index``)
    can be staged (numpy arrays of the fold's dtype, folded on the host's CPU) and the
    shift is known: from the state the stream resumes, from the first batch for the
    first group, or from the fold of the group two before (waiting for it if it is still
    running); else None."""
    if not (all(type(x) is np.ndarray and x.dtype == self.dtype for x in chunk)
            and _folds_on_host_cpu()):
      return None
    if self.host_shift is None and index >= 2:
      # The fold of the group two before (the one before may still be being dispatched
      # while this group is read: with or without prefetch the same groups are staged).
      with self.folded_lock:
        source = self.folded.pop(index - 2, None)
        for old in [i for i in self.folded if i < index - 2]:
          del self.folded[old]
      if source is not None and bool(source.has_shift):  # waits for that fold
        self.host_shift = np.asarray(source.shift, self.dtype)
    elif self.host_shift is None and index == 0:
      # The stream's first group: the shift is the mean of its first batch's finite
      # rows, as a fold of that batch would fix it (here in float64, on the host); set on
      # the state when this group runs. (Later groups learn it from a fold's result,
      # never from their own batches: a group prepared while the first folds must use
      # the first's shift.)
      self.host_shift = _finite_mean(chunk[0], self.dtype)
    return self.host_shift

  def run(self, state, prepared: _Prepared):
    """Dispatches the group's programs (asynchronously) and returns the new state."""
    if prepared.shift_from is not None and not self.shift_ready:
      state = self._common_shift(state, prepared.shift_from)
    if prepared.shift is not None and not bool(state.has_shift):
      state = state._replace(shift=jnp.asarray(prepared.shift),
                             has_shift=jnp.asarray(True))
    for fn, args in prepared.calls:
      state = fn(state, *args)
    if prepared.shift_from is not None and not self.shift_ready:
      # No key of positive weight yet (the sums are still 0): the next group's first
      # such key fixes the shift, not the 0 the sharded fold marked as fixed.
      state = state._replace(has_shift=jnp.logical_and(state.has_shift, False))
    if prepared.slot is not None:
      self.staging.busy[prepared.slot] = state
    if self.host_shift is None and self.ident:
      with self.folded_lock:
        self.folded[self.n_run] = state
    self.n_run += 1
    return state


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
    prefetch: bool = True,
) -> CovarianceState:
  """Folds a stream of batches into a :class:`CovarianceState` inside compiled programs.

  Batches are taken ``group`` at a time and folded by one compiled program per group.
  While group i folds, group i+1 is read from the stream and (with ``prefetch``, by a
  reader thread) transferred to the device(s). At most those two groups are in flight:
  the host waits for group i−1's fold before dispatching group i+1's, so memory stays flat
  however long the stream. A save of the cache waits for its group's fold and happens
  before the next group is read: a run killed while reading has saved all it folded.

  - Host batches (numpy arrays, Python iterators, data loaders such as grain): raw key
    arrays of the stream's batch size are folded in place; otherwise the group is stacked
    and scanned with ``lax.scan`` (a short last group is padded with zero-weight batches
    to a power of two). Batches may differ in their leading (batch) size, e.g. the ragged
    last batch of a data set: a group holding any batch of another size than the first
    batch is padded to the next power of two with zero-weight rows, so a stream of sizes
    up to B compiles at most ⌈log2 B⌉ + 3 programs. With several local devices each batch's leading axis is
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
      The cache records the dtype of its statistics and (one process) a digest of the
      stream's first batch: a call whose keys have another dtype (e.g. float64 under
      jax_enable_x64 for a float32 cache, or the converse), or whose first batch differs
      (another stream under the same key), is refused with a ValueError naming the cache
      instead of resuming or returning it (a cache saved without the digest resumes any
      stream; a stream of no batches reads any finished cache). A folder this process
      may not write in is refused before anything is folded; a save that fails (e.g. a
      full disk) raises an OSError naming the cache, which keeps the state saved before.
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
    prefetch: read and transfer each group of host batches in a reader thread while the
      previous group folds (the results are bit-identical either way; without it the
      next group is read after the current one is dispatched, and transferred when its
      program is). The stream is then advanced from that thread, never from two at once.

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
  group = check_positive_int(group, "group")
  save_every = check_positive_int(save_every, "save_every")
  if total is not None and (isinstance(total, bool) or not isinstance(total, (int, np.integer))
                            or total < 0):
    # Checked now: the progress bar reads it only after the first group has folded.
    raise ValueError(f"total: expected None or a non-negative int (the number of batches, "
                     f"for the progress bar), got {total!r}")
  if total is None and hasattr(batches, "__len__"):
    total = len(batches)
  if key_fn is not None and not callable(key_fn):
    raise TypeError(f"key_fn: expected a function batch → keys or (keys, weights), got "
                    f"{type(key_fn).__name__}")
  n_avail = len(jax.local_devices())
  if devices is not None and (isinstance(devices, bool)
                              or not isinstance(devices, (int, np.integer))):
    raise ValueError(f"devices: expected an int in 1..{n_avail}, got {devices!r}")
  n_dev = n_avail if devices is None else int(devices)
  if not 1 <= n_dev <= n_avail:
    raise ValueError(f"devices: expected 1..{n_avail}, got {devices}")

  if dim is not None:
    dim = check_positive_int(dim, "dim")
  refuse_traced(params, "params")
  if (isinstance(batches, (collections.abc.Mapping, str, bytes))
      or (isinstance(batches, (np.ndarray, jax.Array))
          and np.ndim(batches) < (3 if key_fn is None else 2))):
    # Iterating a dict gives its keys, a (B, d) array of keys its rows: never batches.
    what = (f"an array of shape {tuple(np.shape(batches))}"
            if isinstance(batches, (np.ndarray, jax.Array)) else type(batches).__name__)
    raise ValueError(f"batches: expected an iterable of batches (a list or iterator of "
                     f"arrays (B, ..., d) or of pytrees for key_fn, or one array of stacked "
                     f"batches (n, B, ..., d)), got a single batch: {what}; pass [batch]")
  it = iter(batches)
  chunk = list(itertools.islice(it, group))
  refuse_traced(chunk, "batches")
  refuse_under_jit("stream_covariance")
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
  cache = StreamCache(cache_dir, cache_key, n_run)
  if params is not None and key_fn is None:
    raise ValueError("params: expected a key_fn(params, batch) to pass them to, got none")
  if params is not None:
    params = jax.tree_util.tree_map(lambda x: as_array(x, "params"), params)
  folder = _Folder(key_fn, group, n_dev, params)

  saved = cache.load()
  done = 0
  state = None
  prepared = None  # the first group when it was read (and the folder started) below
  ready = None  # the first group once checked by _host_ready (done once)
  if cache.path is not None and chunk and n_run == 1:
    # The first batch names the stream in the cache: another stream under the same key
    # is refused instead of resuming (and mixing into) this one's statistics.
    chunk = ready = _host_ready(chunk, key_fn is None)
    cache.first_batch = batch_digest(chunk[0])
  if saved is not None:
    states, consumed, complete = saved
    want, source = dim, ""
    keys_dim = None
    if chunk:
      # The stream's own key dimension and dtype (from its first batch's shapes; nothing
      # is folded): a finished cache is returned without reading the stream further, and
      # must not be the statistics of other keys saved under the same key.
      chunk = prepared = chunk if chunk is ready else _host_ready(chunk, key_fn is None)
      keys_dim = folder.start(chunk[0], None)
      if want is None:
        want, source = keys_dim, " (the stream's first batch)"
    if want is not None and states[0].dim != want:  # a cache written by another stream
      raise ValueError(f"statistics cache {cache.path}: expected the statistics of keys of "
                       f"dimension {want}{source}, got those of dimension {states[0].dim}; "
                       f"pass another cache_key, or remove the cache")
    if keys_dim is not None:
      if keys_dim != want:
        raise ValueError(f"keys: expected last dimension {want}, got {keys_dim}")
      cache.check_stream(folder.dtype, cache.first_batch)
    if complete:
      return merge_all(states)
    state, done = states[me], consumed[me]
    if done:
      # Skip what was folded before, without computing its keys.
      it = itertools.chain(chunk, it)
      skipped = sum(1 for _ in itertools.islice(it, done))
      if skipped < done and not across_processes:
        # A stream shorter than the part already folded is not the stream that wrote the
        # cache: its state would be returned (and marked complete) as if it were.
        raise ValueError(
            f"batches: expected the stream that wrote the statistics cache {cache.path} "
            f"(it holds {done} batches folded), got a stream of {skipped} batch(es); pass "
            f"the same stream, or another cache_key")
      chunk = list(itertools.islice(it, group))
  cache.check_writable()  # before anything is folded: a save would fail after it

  if chunk is prepared:  # read and started above (a cache was found), from this same group
    d = folder.dim
  else:
    chunk = chunk if chunk is ready else _host_ready(chunk, key_fn is None)
    if chunk:
      d = folder.start(chunk[0], dim)
    else:
      d = dim if dim is not None else (state.dim if state is not None else -1)
  if across_processes:
    # Every process learns the key dimension (a process may have no batches at all) and
    # the total for the progress bar.
    info = np.asarray(allgather(np.array([d, -1 if total is None else total], np.int64)))
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
  folder.known_shift(state)

  bar = _Progress(total, progress and jax.process_index() == 0, "covariance")
  consumed = [done] * n_run
  consumed_all = sum(consumed) if saved is None else sum(saved[1])
  keys_all = 0
  groups = 0

  def gather():
    """Every process's state and position, in process order."""
    if not across_processes:
      return [state], [consumed[0]]
    host = host_state(state)
    tree = allgather({k: np.asarray(getattr(host, k)) for k in CovarianceState._fields})
    positions = [int(c) for c in np.asarray(allgather(np.int64(consumed[me])))]
    return [unstack_state(tree, i) for i in range(n_run)], positions

  def save(complete: bool):
    if cache.path is not None:
      cache.save(*gather(), complete)

  def read():
    """The next group, read from the stream and prepared (with ``prefetch``, placed)."""
    batches = _host_ready(list(itertools.islice(it, group)), key_fn is None)
    return batches, (folder.prepare(batches, prefetch) if batches else None)

  # With prefetch, a reader thread reads and places group i+1 while group i folds (on a
  # CPU a fold that calls BLAS runs synchronously in this thread). JAX's thread-local
  # settings (x64, default device) are carried over to it.
  reader = ThreadPoolExecutor(1, "memedit-prefetch") if prefetch else None
  x64, device = jax.config.jax_enable_x64, jax.config.jax_default_device

  def read_in_thread():
    with jax.enable_x64(x64), jax.default_device(device):
      return read()

  prepared = folder.prepare(chunk, prefetch) if chunk else None
  pending = None
  try:
    while True:
      if chunk and _stop_asked():
        jax.block_until_ready(state)  # the fold in flight ends before the run does
        raise Stopped(f"stream_covariance: stopped before group {groups + 1} "
                      f"({consumed_all} batches folded), as asked")
      n = len(chunk)
      rows = 0
      before = state
      if chunk:
        # A save waits for this group's fold and comes before anything more is read.
        if reader is not None and not (cache.path is not None
                                       and (groups + 1) % save_every == 0):
          pending = reader.submit(read_in_thread)
        state = folder.run(state, prepared)  # dispatched; it may run while the host goes on
        rows = prepared.rows
      consumed[me] += n
      step = np.array([n, rows * folder.keys_per_row], np.int64)
      if across_processes:
        step = np.asarray(allgather(step)).sum(axis=0)
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
      if pending is not None:
        (chunk, prepared), pending = pending.result(), None
      else:
        chunk, prepared = read()
      # In flight now: this group's fold and the next group's inputs. The previous fold
      # (whose inputs are then freed) ends before the next program is dispatched.
      jax.block_until_ready(before)
  finally:
    if reader is not None:
      reader.shutdown(wait=True)
    if folder.staging is not None:
      _keep_staging(folder.staging)
  bar(consumed_all, keys_all, final=True)
  states, positions = gather()
  if cache.path is not None:
    cache.save(states, positions, True)
  if across_processes:
    return merge_all(states)
  if global_arrays:
    # Spanning other processes' devices: every process gets its own (equal) copy.
    return place_state(host_state(state), None)
  return state
