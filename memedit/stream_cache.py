"""Where a streamed state is saved, resumed and gathered across processes.

:func:`covariance_cache_key` names collected statistics by content; :class:`StreamCache`
saves a stream's state (atomically, with the batches consumed) and resumes it, also for
several processes (``jax.distributed``) writing one cache; the other helpers move states
between devices, the host and processes.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from memedit import _io
from memedit.moments import CovarianceState, covariance_merge

__all__ = ["StreamCache", "allgather", "batch_digest", "covariance_cache_key", "host_state",
           "host_value", "merge_all", "place_state", "unstack_state"]


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
  def text_of(obj):
    # Other objects are named by their text (paths, dtypes, ...), unless that text holds
    # a memory address ("<object at 0x7f…>"): it changes every run, and so would the key.
    out = str(obj)
    if re.search(r" at 0x[0-9a-fA-F]+", out):
      raise TypeError(out)
    return out

  try:
    spec_text = json.dumps(spec, sort_keys=True, default=text_of)
  except (TypeError, ValueError) as e:
    raise ValueError(f"spec: expected a JSON-serialisable description (objects whose text "
                     f"holds a memory address change every run), got {spec!r}") from e
  text = json.dumps([str(content_hash), spec_text, str(jnp.dtype(dtype))])
  return hashlib.sha256(text.encode()).hexdigest()


def host_value(x: Any) -> np.ndarray:
  """A host copy of a (replicated) array, also when it spans other processes' devices.

  Example:
    >>> import jax.numpy as jnp
    >>> host_value(jnp.arange(3)).tolist()
    [0, 1, 2]
  """
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return np.asarray(x.addressable_data(0))
  return np.asarray(x)


def host_state(state: CovarianceState) -> CovarianceState:
  """``state`` with numpy fields (see :func:`host_value`).

  Example:
    >>> import memedit
    >>> type(host_state(memedit.covariance_init(2)).sum_sq).__name__
    'ndarray'
  """
  return CovarianceState(*(host_value(x) for x in state))


def place_state(state: CovarianceState, sharding: Any) -> CovarianceState:
  """``state`` as arrays with ``sharding`` (None: the default device).

  Example:
    >>> import memedit
    >>> st = place_state(host_state(memedit.covariance_init(2)), None)
    >>> type(st.sum_sq).__name__
    'ArrayImpl'
  """
  if sharding is None:
    return CovarianceState(*(jnp.asarray(x) for x in state))
  return CovarianceState(*(
      jax.make_array_from_callback(np.shape(x), sharding, lambda idx, x=np.asarray(x): x[idx])
      for x in state))


def allgather(x: Any) -> Any:
  """``x`` from every process, stacked on a new leading axis (jax.distributed).

  Example:
    >>> import numpy as np
    >>> allgather(np.arange(2)).tolist()  # one process
    [[0, 1]]
  """
  from jax.experimental import multihost_utils

  return multihost_utils.process_allgather(x)


def merge_all(states: list[CovarianceState]) -> CovarianceState:
  """Merges states in the given order (the same on every process: identical results).

  Example:
    >>> import numpy as np, memedit
    >>> st = memedit.covariance_update(memedit.covariance_init(2), np.ones((3, 2)))
    >>> memedit.key_count(merge_all([st, st, st]))
    9
  """
  out = states[0]
  for s in states[1:]:
    out = covariance_merge(out, s)
  return out


def unstack_state(tree: dict, i: int) -> CovarianceState:
  """Row ``i`` of a dict of the state's fields stacked on a leading axis.

  Example:
    >>> import numpy as np, memedit
    >>> tree = {k: np.stack([v, v]) for k, v in memedit.covariance_init(2)._asdict().items()}
    >>> unstack_state(tree, 1).sum_sq.shape
    (2, 2)
  """
  return CovarianceState(**{k: jnp.asarray(np.asarray(v)[i]) for k, v in tree.items()})


def batch_digest(batch: Any) -> str | None:
  """Hex sha256 of a batch's leaves (in order: dtype, shape and bytes of each, in the
  dtype JAX computes with), or None when a leaf is an array spanning other processes'
  devices (not readable here).

  The tree's structure is left out (its text may name objects by memory address, which
  changes every run): two runs of one stream give one digest.

  Example:
    >>> import numpy as np
    >>> batch_digest(np.zeros(2)) == batch_digest([np.zeros(2)])
    True
  """
  h = hashlib.sha256()
  for leaf in jax.tree_util.tree_leaves(batch):
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
      return None
    if jnp.issubdtype(getattr(leaf, "dtype", None), jax.dtypes.prng_key):
      leaf = jax.random.key_data(leaf)  # typed PRNG keys: their words
    a = np.asarray(leaf)
    # In the dtype JAX computes with (float64 data is float32 without jax_enable_x64):
    # the same batch passed as float64 or float32 then is the same stream.
    a = np.ascontiguousarray(a, jax.dtypes.canonicalize_dtype(a.dtype))
    h.update(f"{a.dtype.str}{a.shape}".encode())
    h.update(a.tobytes())
  return h.hexdigest()


def _is_count(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool) and value >= 0


class StreamCache:
  """Where a stream's state is saved and resumed: one directory written by process 0.

  With several processes (``jax.distributed``) the directory holds every process's state
  stacked on a leading axis and the batches each has consumed; every process resumes
  from its own row.

  A cache saved by one process also records the dtype of its statistics (that of the
  arrays) and the digest (:func:`batch_digest`) of the first batch of the stream that
  started it (``first_batch_sha256`` in meta.json, when :attr:`first_batch` is set): a
  stream resumes it only with keys of that dtype and the same first batch
  (:meth:`check_stream`). A cache saved without a digest resumes any stream.

  Example:
    >>> StreamCache(None, None, 1).path is None
    True
  """

  def __init__(self, cache_dir, cache_key, n_proc: int):
    self.n_proc = n_proc
    self.path = None
    #: Digest of the first batch of the stream being folded (saved with every state).
    self.first_batch: str | None = None
    #: What :meth:`load` found: the statistics' dtype and the digest of the first batch
    #: of the stream that started the cache (None: not recorded).
    self.saved_dtype: str | None = None
    self.saved_first_batch: str | None = None
    if cache_dir is None and cache_key is None:
      return
    if (cache_dir is None) != (cache_key is None):
      raise ValueError("cache_dir and cache_key: expected both or neither, got only one")
    if (not isinstance(cache_key, str) or cache_key in ("", ".", "..")
        or "/" in cache_key or os.sep in cache_key or (os.altsep or "/") in cache_key):
      # The key names one folder inside cache_dir: a path would write (and replace) a
      # folder elsewhere, or cache_dir itself.
      raise ValueError(f"cache_key: expected a folder name inside cache_dir (a non-empty str "
                       f"without path separators, not '.' or '..'), got {cache_key!r}")
    root = os.fspath(cache_dir)
    if os.path.exists(root) and not os.path.isdir(root):
      raise ValueError(f"cache_dir: expected a directory (or a path to create one at), got "
                       f"a file: {root}")
    ancestor, problem = _io.parent_problem(os.path.join(os.path.abspath(root), cache_key))
    if problem == "file":
      raise ValueError(f"cache_dir: expected a directory (or a path to create one at), got "
                       f"{root}, inside {ancestor}, which is a file")
    try:
      name_max = os.pathconf(ancestor, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):
      name_max = 255
    # Saves write a hidden sibling ".tmp-<key>-<8 hex digits>" first: 14 bytes more.
    limit = name_max - 14
    size = len(os.fsencode(cache_key))
    if "\x00" in cache_key or (n_proc == 1 and size > limit):
      shown = repr(cache_key[:40]) + ("..." if len(cache_key) > 40 else "")
      raise ValueError(f"cache_key: expected a folder name this file system can hold (at most "
                       f"{limit} bytes, no NUL character), got {shown} ({size} bytes)")
    key = cache_key
    if n_proc > 1:
      # One key for the whole run: the hash of every process's key, in process order.
      digest = np.frombuffer(hashlib.sha256(key.encode()).digest(), np.uint8)
      key = hashlib.sha256(np.asarray(allgather(digest)).tobytes()).hexdigest()
    self.path = os.path.join(root, key)
    if os.path.islink(self.path):
      # A link to the cache's folder (e.g. on another disk): the folder it names is read
      # and replaced, and the link is kept (a save never replaces a link itself).
      self.path = os.path.realpath(self.path)

  def load(self):
    """``(states, batches consumed per process, complete)``, or None when nothing is saved.

    Raises:
      ValueError: the cache holds another number of processes' states, or is not what
        :meth:`save` writes (a field of meta.json, an array's name, shape or dtype; the
        message names it).
    """
    if self.path is None:
      return None
    with _io.path_lock(self.path):  # another thread of this process may be saving it
      return self._load()

  def _load(self):
    # A save killed between its two renames left the last state moved aside: put it back.
    _io.recover(self.path)
    if os.path.lexists(self.path) and not os.path.isdir(self.path):
      raise ValueError(f"statistics cache {self.path}: expected a folder saved by "
                       f"stream_covariance, got a file")
    if not os.path.isdir(self.path):
      return None
    if not os.listdir(self.path):
      return None  # an empty folder (e.g. made ahead of the run) holds nothing saved
    if not (os.path.isfile(os.path.join(self.path, "meta.json"))
            and os.path.isdir(os.path.join(self.path, "arrays"))):
      # Another folder under this name (it is never replaced: save refuses it too).
      names = sorted(os.listdir(self.path))
      shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
      raise ValueError(f"statistics cache {self.path}: expected a folder saved by "
                       f"stream_covariance (arrays/ and meta.json), got a folder holding "
                       f"{shown}; pass another cache_key or cache_dir, or remove it")
    # Another memedit output under this name (an edit, a model, another saved tree) is
    # not a damaged cache: it is named, and left alone, without restoring its arrays.
    kind = _io.output_kind(self.path)
    got = f"a memedit {kind!r} output" if kind not in (None, "tree") else None
    if kind == "tree":
      meta = _io.read_json(os.path.join(self.path, "meta.json"))
      if isinstance(meta, dict) and not {"batches", "complete"} & set(meta):
        got = "a saved memedit tree whose meta.json holds no 'batches' or 'complete'"
    if got is not None:
      raise ValueError(f"statistics cache {self.path}: expected a folder saved by "
                       f"stream_covariance, got {got} (not a statistics cache); pass another "
                       f"cache_key or cache_dir (that folder is left as it is)")
    tree, meta = _io.load_tree(self.path)
    procs = meta.get("processes")
    if procs is not None and not (_is_count(procs) and procs >= 1):
      raise self._damaged("'processes' in meta.json: a positive integer", repr(procs)[:60])
    if (procs or 1) != self.n_proc:
      raise ValueError(
          f"statistics cache {self.path}: expected the state of {self.n_proc} process(es), "
          f"got one written by {procs or 1}")
    self._check_saved(tree, meta, procs)
    digest = meta.get("first_batch_sha256")
    if digest is not None and not (isinstance(digest, str)
                                   and re.fullmatch(r"[0-9a-f]{64}", digest)):
      raise self._damaged("'first_batch_sha256' in meta.json: 64 hex digits",
                          repr(digest)[:80])
    self.saved_first_batch = digest
    self.saved_dtype = str(np.asarray(tree["sum_sq"]).dtype)
    if procs is None:
      states = [CovarianceState(**{k: jnp.asarray(v) for k, v in tree.items()})]
      consumed = [int(meta["batches"])]
    else:
      states = [unstack_state(tree, i) for i in range(procs)]
      consumed = [int(b) for b in meta["batches"]]
    return states, consumed, bool(meta.get("complete"))

  def _damaged(self, want: str, got: str) -> ValueError:
    return ValueError(f"statistics cache {self.path}: expected {want}, got {got}; the cache "
                      "is damaged: remove it to collect the statistics again")

  def _check_saved(self, tree, meta: dict, procs: int | None) -> None:
    """Checks a loaded cache against what :meth:`save` writes: the batches consumed,
    the completion flag and the state's fields, with shapes of one key dimension and
    the state's dtypes (a cache of another program, or edited by hand, fails here)."""
    batches = meta.get("batches")
    if procs is None:
      ok = _is_count(batches)
      want = "'batches' in meta.json: a non-negative integer"
    else:
      ok = (isinstance(batches, list) and len(batches) == procs
            and all(_is_count(b) for b in batches))
      want = f"'batches' in meta.json: a list of {procs} non-negative integers"
    if not ok:
      raise self._damaged(want, repr(batches)[:60])
    if not isinstance(meta.get("complete"), bool):
      raise self._damaged("'complete' in meta.json: true or false",
                          repr(meta.get("complete"))[:60])
    fields = sorted(CovarianceState._fields)
    if not (isinstance(tree, dict) and sorted(map(str, tree)) == fields):
      got = sorted(map(str, tree)) if isinstance(tree, dict) else type(tree).__name__
      raise self._damaged(f"the arrays {fields}", str(got)[:200])
    lead = () if procs is None else (procs,)
    d = meta.get("dim", np.shape(tree["shift"])[-1] if np.ndim(tree["shift"]) else -1)
    if not (_is_count(d) and d >= 1):
      raise self._damaged("'dim' in meta.json: a positive integer", repr(d)[:60])
    floats = sorted({str(np.asarray(tree[k]).dtype) for k in ("weight", "shift", "sum",
                                                              "sum_sq")})
    if len(floats) != 1 or floats[0] not in ("float32", "float64"):
      raise self._damaged("weight, shift, sum and sum_sq of one dtype, float32 or float64",
                          f"the dtypes {floats}")
    want = {"count": ((2,), "uint32"), "weight": ((2,), floats[0]),
            "shift": ((d,), floats[0]), "has_shift": ((), "bool"), "sum": ((d,), floats[0]),
            "sum_sq": ((d, d), floats[0]), "nonfinite": ((), "uint32")}
    for k, (shape, dtype) in want.items():
      a = np.asarray(tree[k])
      if a.shape != lead + shape or str(a.dtype) != dtype:
        raise self._damaged(f"{k} of shape {lead + shape} and dtype {dtype} (key dimension "
                            f"{d})", f"shape {a.shape} and dtype {a.dtype}")

  def check_stream(self, key_dtype: Any, first_batch: str | None) -> None:
    """Refuses to resume the loaded cache with keys of another dtype than its statistics
    (the result would silently have the cache's dtype, or mix both), or with a stream
    whose first batch has another digest than the one that started it (the result would
    mix two streams). A digest that is unknown on either side is not compared."""
    want = str(jnp.dtype(key_dtype))
    if self.saved_dtype is not None and self.saved_dtype != want:
      raise ValueError(
          f"statistics cache {self.path}: expected statistics in the keys' dtype {want}, got "
          f"statistics in {self.saved_dtype} (collected from {self.saved_dtype} keys, e.g. "
          f"with jax_enable_x64 {'on' if self.saved_dtype == 'float64' else 'off'}); resume "
          f"it with {self.saved_dtype} keys, or pass another cache_key or cache_dir to "
          f"collect {want} statistics")
    if (self.saved_first_batch is not None and first_batch is not None
        and self.saved_first_batch != first_batch):
      raise ValueError(
          f"statistics cache {self.path}: expected the stream that started it (first batch "
          f"sha256 {self.saved_first_batch[:16]}...), got a stream whose first batch differs "
          f"(sha256 {first_batch[:16]}...); pass that same stream to resume it, or another "
          f"cache_key (or remove the cache) to collect this stream's statistics")

  def check_writable(self) -> None:
    """Refuses, before anything is folded, a cache this process cannot save to: its
    folder (or the nearest existing one above it) is read-only."""
    if self.path is None or jax.process_index() != 0:
      return
    ancestor, problem = _io.parent_problem(os.path.abspath(self.path))
    if problem == "read-only":
      raise ValueError(f"statistics cache {self.path}: expected a folder this process may "
                       f"write in, got one in {ancestor}, which is read-only for it; make it "
                       f"writable, or pass another cache_dir")

  def save(self, states, consumed, complete: bool):
    """Saves the states atomically; a failed write (a full disk, a folder that refuses
    writes) leaves the state saved before in place and raises an OSError that names the
    cache and says how to go on."""
    if jax.process_index() != 0:
      return
    meta = {"complete": complete, "dim": int(np.shape(states[0].shift)[-1])}
    digest = self.first_batch or self.saved_first_batch
    if digest is not None and self.n_proc == 1:
      meta["first_batch_sha256"] = digest
    if self.n_proc == 1:
      tree = host_state(states[0])._asdict()
      meta["batches"] = int(consumed[0])
    else:
      tree = {k: np.stack([np.asarray(getattr(s, k)) for s in states])
              for k in CovarianceState._fields}
      meta.update(batches=[int(c) for c in consumed], processes=self.n_proc)
    with _io.path_lock(self.path):
      if not complete and self._finished_on_disk():
        # Another writer (a thread or process folding the same stream) finished the
        # cache since it was loaded: a partial state never replaces finished statistics.
        return
      self._write(tree, meta, consumed)

  def _finished_on_disk(self) -> bool:
    try:
      meta = _io.read_json(os.path.join(self.path, "meta.json"))
    except (OSError, ValueError):
      return False
    return isinstance(meta, dict) and meta.get("complete") is True

  def _write(self, tree, meta: dict, consumed) -> None:
    # What may not be replaced is refused as it is (the message names the folder); a
    # failure while writing is named below.
    _io.check_output(self.path, "tree")
    try:
      _io.save_tree(self.path, tree, meta)
    except Exception as e:
      kept = ("the state saved before is kept" if os.path.isdir(self.path)
              else "nothing was saved yet")
      what = " ".join(str(e).split())
      if len(what) > 400:  # the cause (e.g. "No space left on device") is often at the end
        what = what[:200] + " ... " + what[-200:]
      code = getattr(e, "errno", None)
      raise OSError(*([code] if code else []),
                    f"statistics cache {self.path}: could not save the state of "
                    f"{sum(int(c) for c in consumed)} batch(es) ({type(e).__name__}: {what}); "
                    f"{kept}: make room on the disk (or fix the folder) and call again with "
                    f"the same cache_dir and cache_key to resume") from e
