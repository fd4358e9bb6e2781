"""Reading PyTorch checkpoints without torch and without running code from the file.

Three containers are understood:

* the zip format of ``torch.save`` (``<root>/data.pkl`` plus one record
  ``<root>/data/<key>`` of raw bytes per storage, and ``byteorder``/``version`` records);
* the legacy format (``_use_new_zipfile_serialization=False``): a pickled magic number,
  protocol version and system info, then the object pickle whose storages are
  persistent ids, then a pickled list of storage keys, then for each key an int64
  element count followed by the storage's raw bytes;
* plain pickles such as NVIDIA's stylegan2-ada / stylegan3 network snapshots, where
  tensors are reduced through ``torch._utils._rebuild_tensor_v2`` and storages through
  ``torch.storage._load_from_bytes(blob)`` (``blob`` is itself a ``torch.save`` file).

Every pickle is read by a restricted unpickler: a global is resolved only when it is on a
short allowlist of value constructors (tensor rebuilds, storage types, dtypes,
``collections.OrderedDict``, numpy scalars/arrays of numeric dtype, NVIDIA's persistent
object hook; ``argparse.Namespace``, as saved by training scripts, comes back as a dict of
its attributes), and each allowed name maps to a function written here, never to the torch
or NVIDIA original. Anything else (``os.system``, ``builtins.eval``, ``subprocess.Popen``,
any class) raises :class:`UnsafeFileError` when the pickle names it, before it could be
called. NVIDIA network objects carry their class's source code; it is never executed:
modules come back as :class:`NvidiaModule` records of their weights and attributes.

Tensors come back as numpy arrays with the stored dtype (``bfloat16`` and ``float8``
through ``ml_dtypes``), shape and strides, copied out of the storage so they own their
memory; a tensor whose offset, sizes and strides reach outside its storage is refused.

A small hostile file cannot take unbounded time, memory or stack either: only regular
files are read; every pickle's opcodes are scanned before it is loaded, refusing values
nested more than ``_MAX_DEPTH`` deep, dict keys / set elements / persistent ids whose hash
would walk too many (shared) tuple elements, oversized memo indices and arguments longer
than the data; zip records are checked against the archive's size (each and all together)
before anything is read, and read no further than their declared size; the arrays
returned may not exceed a few times the file's size (stride-0 views); network objects
whose submodules are shared along many paths are refused.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import itertools
import math
import os
import pickle
import pickletools
import re
import stat
import struct
import zipfile
from typing import Any, Callable

import ml_dtypes
import numpy as np

__all__ = [
    "CorruptFileError",
    "NvidiaModule",
    "UnsafeFileError",
    "brief_repr",
    "load_any",
    "load_nvidia_pickle",
    "load_torch",
    "module_state_dict",
]


class UnsafeFileError(ValueError):
  """The file asks the unpickler for something outside the allowlist (it could run code)."""


class CorruptFileError(ValueError):
  """The file is empty, truncated, or not a checkpoint this reader understands."""


@dataclasses.dataclass(frozen=True)
class NvidiaModule:
  """A ``torch_utils.persistence`` network object, rebuilt as plain data.

  Attributes:
    class_name: the persistent class's name, e.g. ``"Generator"``.
    init_args: positional arguments the object was constructed with.
    init_kwargs: keyword arguments it was constructed with (nested ``EasyDict`` values
      become plain dicts).
    state_dict: torch-style flattened names to numpy arrays, parameters then persistent
      buffers then submodules, e.g. ``"mapping.fc0.weight"``, ``"mapping.w_avg"``,
      ``"synthesis.b4.conv1.noise_const"`` (the order of ``Module.state_dict()``).
    attributes: the plain (non-tensor, non-module) attributes of the object and of every
      submodule under dotted names, e.g. ``"num_ws"``, ``"synthesis.b8.conv0.up"``.
  """

  class_name: str
  init_args: tuple
  init_kwargs: dict
  state_dict: dict[str, np.ndarray]
  attributes: dict[str, Any] = dataclasses.field(default_factory=dict)


# --------------------------------------------------------------------------- dtypes

_STORAGE_DTYPES: dict[str, np.dtype] = {
    "DoubleStorage": np.dtype(np.float64),
    "FloatStorage": np.dtype(np.float32),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
    "ComplexFloatStorage": np.dtype(np.complex64),
    "ComplexDoubleStorage": np.dtype(np.complex128),
    "UntypedStorage": np.dtype(np.uint8),
}

_TORCH_DTYPES: dict[str, np.dtype] = {
    "float64": np.dtype(np.float64), "double": np.dtype(np.float64),
    "float32": np.dtype(np.float32), "float": np.dtype(np.float32),
    "float16": np.dtype(np.float16), "half": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float8_e4m3fn": np.dtype(ml_dtypes.float8_e4m3fn),
    "float8_e5m2": np.dtype(ml_dtypes.float8_e5m2),
    "float8_e4m3fnuz": np.dtype(ml_dtypes.float8_e4m3fnuz),
    "float8_e5m2fnuz": np.dtype(ml_dtypes.float8_e5m2fnuz),
    "int64": np.dtype(np.int64), "long": np.dtype(np.int64),
    "int32": np.dtype(np.int32), "int": np.dtype(np.int32),
    "int16": np.dtype(np.int16), "short": np.dtype(np.int16),
    "int8": np.dtype(np.int8),
    "uint8": np.dtype(np.uint8), "uint16": np.dtype(np.uint16),
    "uint32": np.dtype(np.uint32), "uint64": np.dtype(np.uint64),
    "bool": np.dtype(np.bool_),
    "complex64": np.dtype(np.complex64), "cfloat": np.dtype(np.complex64),
    "complex128": np.dtype(np.complex128), "cdouble": np.dtype(np.complex128),
}

_MEMORY_FORMATS = ("contiguous_format", "channels_last", "channels_last_3d", "preserve_format")

# numpy dtype strings accepted inside pickles: numeric kinds only (no objects, no records).
_NUMPY_DTYPE_RE = re.compile(r"^[<>|=]?(?:[biufc][1248]|c16|b1|\?)$")

_LEGACY_MAGIC = 0x1950a86a20f9469cfc6c
_LEGACY_PROTOCOL = 1001
_LEGACY_PREFIXES = tuple(pickle.dumps(_LEGACY_MAGIC, protocol=p) for p in range(2, 6))
_ZIP_SIGNATURE = b"PK\x03\x04"
_MAX_NESTING = 4
_ZIP_BOMB_MIN = 64 << 20
_ZIP_BOMB_RATIO = 200
# Budgets that keep a small hostile file from taking unbounded time or memory. Real
# checkpoints stay far inside them: containers nest a few dozen levels at most, dict keys
# and set elements are strings, ints or short tuples, and tensors copy out about the
# bytes the file stores (views of one storage may repeat a few times).
_MAX_DEPTH = 100                  # containers inside containers (also bounds recursion)
_MAX_KEY_ELEMENTS = 1000          # tuple elements reached when hashing one key
_HASH_WORK_MIN = 1_000_000        # tuple elements hashed in all, plus 16 per pickle byte
_MAX_PERSISTENT_ID_ELEMENTS = 256  # elements of one persistent id
_MAX_RECORD_ITEMS = 500_000       # submodule visits plus entries of all module records
_EXPAND_RATIO = 4                 # bytes read out of records / arrays returned, per file byte
_EXPAND_SLACK = 64 << 20          # ... plus this much
_MAX_SMALL_RECORD = 64            # bytes of the byteorder / version records


def brief_repr(x: Any, level: int = 3) -> str:
  """A short repr of untrusted data: bounded in depth, length and work.

  Example:
    >>> brief_repr({"a": [1, 2, 3]})
    "{'a': [1, 2, 3]}"
  """
  if x is None or isinstance(x, (bool, float, complex, np.generic)):
    return repr(x)[:80]
  if isinstance(x, int):
    return repr(x) if x.bit_length() <= 128 else f"<int of {x.bit_length()} bits>"
  if isinstance(x, (str, bytes, bytearray)):
    return repr(x[:60]) + ("..." if len(x) > 60 else "")
  if isinstance(x, (_Call, _StorageType)):
    return repr(x)
  if isinstance(x, (tuple, list, set, frozenset, dict)):
    name = type(x).__name__
    if level <= 0:
      return f"<{name} of {len(x)}>"
    if isinstance(x, dict):
      parts = [f"{brief_repr(k, level - 1)}: {brief_repr(v, level - 1)}"
               for k, v in itertools.islice(x.items(), 6)]
    else:
      parts = [brief_repr(v, level - 1) for v in itertools.islice(x, 6)]
    if len(x) > 6:
      parts.append(f"... {len(x)} in all")
    body = ", ".join(parts)
    if isinstance(x, tuple):
      return f"({body}{',' if len(x) == 1 else ''})"
    if isinstance(x, list):
      return f"[{body}]"
    if type(x) is dict:
      return f"{{{body}}}"
    return f"{name}({{{body}}})"
  return f"<{type(x).__name__}>"


def _key_elements(source: str, value: Any, what: str, budget: list[int]) -> None:
  """Refuses a value whose hash would walk too many tuple elements.

  Hashing a tuple hashes its elements again (nothing is cached), so a tuple built of one
  shared tuple doubled forty times takes 2**40 steps. ``budget`` holds the elements still
  allowed for the whole file.
  """
  count = 0
  todo = [value]
  while todo:
    x = todo.pop()
    count += 1
    if count > _MAX_KEY_ELEMENTS:
      raise UnsafeFileError(f"{source}: refused a {what} of more than {_MAX_KEY_ELEMENTS} "
                            "nested elements (expected a string, number or short tuple)")
    if isinstance(x, tuple):
      todo.extend(x)
  budget[0] -= count
  if budget[0] < 0:
    raise UnsafeFileError(f"{source}: refused the file: its dict keys and set elements "
                          "would take too long to hash")


# ------------------------------------------------------------------ lazy placeholders

class _Sealed:
  """Objects of the reader that a pickle may hold but never modify.

  The ``BUILD`` opcode calls ``__setstate__`` on whatever is on the stack; refusing it
  keeps a crafted file from changing these objects (or the functions behind them).
  """

  def __setstate__(self, state):
    raise UnsafeFileError(f"refused to set state on {type(self).__name__.lstrip('_')}")


class _Call(_Sealed):
  """An allowlisted global: a fresh wrapper per lookup around a function of this module."""

  def __init__(self, fn: Callable, name: str):
    self.fn = fn
    self.name = name

  def __call__(self, *args, **kwargs):
    return self.fn(*args, **kwargs)

  def __repr__(self):
    return self.name


class _TorchDtype(_Sealed):
  """What a ``torch.<dtype>`` global resolves to."""

  def __init__(self, name: str, dtype: np.dtype):
    self.name = name
    self.dtype = dtype


class _StorageType(_Sealed):
  """What a ``torch.<X>Storage`` global resolves to: a name and the element dtype."""

  def __init__(self, name: str, dtype: np.dtype):
    self.name = name
    self.dtype = dtype

  def __repr__(self):
    return f"torch.{self.name}"


class _Storage(_Sealed):
  """A storage: ``numel`` elements of ``dtype``; bytes filled in now (zip) or later (legacy).

  A legacy storage view shares its root's bytes from ``offset_bytes`` on.
  """

  def __init__(self, source: str, key: str, dtype: np.dtype, numel: int, data=None,
               root: _Storage | None = None, offset_bytes: int = 0, byteorder: str = "little"):
    self.source = source
    self.byteorder = root.byteorder if root is not None else byteorder
    self.key = key
    self.dtype = dtype
    self.numel = numel
    self.data = data
    self.root = root
    self.offset_bytes = offset_bytes

  @property
  def nbytes(self) -> int:
    return self.numel * self.dtype.itemsize

  def buffer(self) -> memoryview:
    if self.root is not None:
      base = self.root.buffer()
      view = base[self.offset_bytes:self.offset_bytes + self.nbytes]
    else:
      if self.data is None:
        raise CorruptFileError(
            f"{self.source}: storage {brief_repr(self.key)} has no data (file truncated?)")
      view = memoryview(self.data)[:self.nbytes]
    if len(view) < self.nbytes:
      raise CorruptFileError(
          f"{self.source}: storage {brief_repr(self.key)}: expected {self.nbytes} bytes, "
          f"got {len(view)}")
    return view


class _TensorRef(_Sealed):
  """A tensor to be cut out of a storage once all storage bytes are known."""

  def __init__(self, storage: _Storage, offset: int, shape: tuple, stride: tuple,
               dtype: np.dtype):
    self.storage = storage
    self.offset = offset
    self.shape = shape
    self.stride = stride
    self.dtype = dtype

  def materialize(self) -> np.ndarray:
    buf = self.storage.buffer()
    itemsize = self.dtype.itemsize
    count = len(buf) // itemsize
    _check_extent(self.storage.source, self.offset, self.shape, self.stride, count, self.dtype)
    if any(s == 0 for s in self.shape):
      return np.zeros(self.shape, self.dtype)
    stored = self.dtype.newbyteorder(">") if self.storage.byteorder == "big" else self.dtype
    # The strided view is cut out of raw items of the same size and reinterpreted after
    # the copy: ``as_strided`` rebuilds its array from a type string, which numpy cannot
    # parse for some ``ml_dtypes`` (float8_e5m2 reports '<f1').
    flat = np.frombuffer(buf, dtype=np.dtype((np.void, itemsize)), count=count)
    view = np.lib.stride_tricks.as_strided(
        flat[self.offset:], shape=self.shape,
        strides=tuple(s * itemsize for s in self.stride), writeable=False).view(stored)
    out = np.array(view, copy=True)
    if out.dtype != self.dtype:
      out = out.astype(self.dtype)
    return out


def _check_extent(source, offset, shape, stride, count, dtype):
  """Refuses a tensor whose last element lies outside a storage of ``count`` elements."""
  values = (offset, *shape, *stride)
  if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
    raise UnsafeFileError(f"{source}: tensor geometry must be non-negative ints, got offset "
                          f"{brief_repr(offset)}, shape {brief_repr(shape)}, stride {brief_repr(stride)}")
  if any(s == 0 for s in shape):
    return
  last = offset + sum((n - 1) * st for n, st in zip(shape, stride))
  if offset >= count or last >= count:
    raise UnsafeFileError(
        f"{source}: tensor of shape {tuple(shape)}, stride {tuple(stride)} at storage offset "
        f"{offset} reaches element {last}, outside its storage of {count} {dtype} elements; "
        "refusing to read it")


class _DtypeHolder:
  """``numpy.dtype(name, align, copy)`` from a pickle, restricted to numeric dtypes."""

  def __init__(self, source: str, name, *_):
    if isinstance(name, bytes):
      name = name.decode("ascii", "replace")
    if not isinstance(name, str) or not _NUMPY_DTYPE_RE.match(name):
      raise UnsafeFileError(
          f"{source}: refused numpy dtype {brief_repr(name)} (only numeric dtypes load)")
    self.dtype = np.dtype(name)

  def __setstate__(self, state):
    if isinstance(state, tuple) and len(state) > 1 and state[1] in ("<", ">"):
      self.dtype = self.dtype.newbyteorder(state[1])


class _NdarrayType(_Sealed):
  """What ``numpy.ndarray`` resolves to: only usable as ``_reconstruct``'s first argument."""


class _ArrayHolder:
  """A numpy array being rebuilt by ``_reconstruct`` followed by ``BUILD``."""

  def __init__(self, source: str):
    self.source = source
    self.array = None

  def __setstate__(self, state):
    if self.array is not None:
      raise UnsafeFileError(f"{self.source}: numpy array state set twice")
    if not (isinstance(state, tuple) and len(state) == 5):
      raise CorruptFileError(f"{self.source}: unexpected numpy array state")
    _, shape, dtype, fortran, raw = state
    dtype = dtype.dtype if isinstance(dtype, _DtypeHolder) else dtype
    if not isinstance(dtype, np.dtype) or dtype.kind not in "biufc":
      raise UnsafeFileError(f"{self.source}: refused numpy array of dtype {brief_repr(dtype)}")
    if isinstance(raw, str):
      raw = raw.encode("latin1")
    if not isinstance(raw, (bytes, bytearray)):
      raise UnsafeFileError(f"{self.source}: refused numpy array whose data is not raw bytes")
    if not isinstance(shape, tuple) or len(shape) > 64:
      raise CorruptFileError(f"{self.source}: numpy array shape must be a tuple of at most 64 "
                             f"ints, got {brief_repr(shape)}")
    self.array = _numpy_array(self.source, shape, dtype, bool(fortran), raw)


def _numpy_array(source: str, shape: tuple, dtype: np.dtype, fortran: bool,
                 raw: bytes | bytearray) -> np.ndarray:
  """A native-order copy of the array of ``shape`` and ``dtype`` whose bytes are ``raw``."""
  shape = tuple(int(s) for s in shape)
  if math.prod(shape) * dtype.itemsize != len(raw) or min(shape, default=0) < 0:
    raise CorruptFileError(f"{source}: numpy array of shape {shape} and dtype {dtype} "
                           f"needs {math.prod(shape) * dtype.itemsize} bytes, got {len(raw)}")
  arr = np.frombuffer(raw, dtype=dtype).reshape(shape, order="F" if fortran else "C")
  return np.array(arr.astype(dtype.newbyteorder("=")), copy=True)


class _FrozenClass(type):
  """A metaclass whose classes refuse attribute assignment (a pickle cannot patch them)."""

  def __setattr__(cls, name, value):
    raise UnsafeFileError(f"refused to set attribute {brief_repr(name)} on {cls.__name__}")


class _EasyDict(dict, metaclass=_FrozenClass):
  """``dnnlib.EasyDict`` rebuilt as a dict (attribute access is not reproduced).

  Pickles create it empty (``NEWOBJ``) and fill it with ``SETITEMS``, whose keys the
  opcode scan checks; building it from arguments (which would hash them unchecked) is
  refused.
  """

  def __init__(self, *args, **kwargs):
    if args or kwargs:
      raise UnsafeFileError("refused an EasyDict built from arguments (expected NEWOBJ "
                            "followed by SETITEMS)")
    super().__init__()

  def __setstate__(self, state):
    if state:
      raise CorruptFileError("unexpected attribute state on an EasyDict")


class _Namespace(dict, metaclass=_FrozenClass):
  """``argparse.Namespace`` (the ``args`` that training scripts such as rosinality's save
  beside the weights) rebuilt as a dict of its attributes.

  Pickles create it empty (``NEWOBJ``) and give its attributes with ``BUILD`` (a dict
  whose keys the opcode scan checks); building it from arguments is refused, and so is
  any state but a dict of str names.
  """

  def __init__(self, *args, **kwargs):
    if args or kwargs:
      raise UnsafeFileError("refused a Namespace built from arguments (expected NEWOBJ "
                            "followed by BUILD)")
    super().__init__()

  def __setstate__(self, state):
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
      raise CorruptFileError(f"expected the attributes of an argparse.Namespace as a dict "
                             f"of str names, got {type(state).__name__} {brief_repr(state)}")
    self.update(state)


class _TensorType(_Sealed):
  """What ``torch.Tensor`` / ``torch.nn.Parameter`` resolve to (a marker, not the class)."""

  def __init__(self, name: str):
    self.name = name


class _PersistentObj(_Sealed):
  """A ``torch_utils.persistence`` object: its class name and its ``__dict__`` state."""

  def __init__(self, source: str, meta):
    if not isinstance(meta, dict):
      raise CorruptFileError(f"{source}: persistent object metadata is not a dict")
    if meta.get("type") != "class":
      raise UnsafeFileError(
          f"{source}: refused persistent object of type {brief_repr(meta.get('type'))}")
    name = meta.get("class_name")
    state = meta.get("state")
    if not isinstance(name, str) or not isinstance(state, dict):
      raise CorruptFileError(f"{source}: persistent object without class_name/state")
    self.class_name = name
    self.state = state
    self.version = meta.get("version")
    # meta["module_src"] (the class's source code) is deliberately dropped unread.


# ----------------------------------------------------------------------- pickle scan

_SCALAR = (1, 0)  # (elements hashed, nesting depth) of a value that holds no other value
_PUSH_SCALAR = frozenset((
    "INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4", "STRING", "BINSTRING",
    "SHORT_BINSTRING", "BINBYTES", "SHORT_BINBYTES", "BINBYTES8", "UNICODE",
    "SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "NONE", "NEWTRUE", "NEWFALSE", "FLOAT",
    "BINFLOAT", "GLOBAL", "EXT1", "EXT2", "EXT4", "PERSID", "NEXT_BUFFER"))
_PUSH_MUTABLE = frozenset(("EMPTY_LIST", "EMPTY_DICT", "EMPTY_SET", "BYTEARRAY8"))


def _scan_pickle(f, source: str) -> None:
  """Walks one pickle's opcodes without building anything, then rewinds ``f``.

  The stack is simulated with a ``(hash cost, depth)`` pair per value (a list where the
  value can still grow). Refused: values nested deeper than ``_MAX_DEPTH`` (hashing a
  deeply nested tuple recurses in C without a guard and overflows the stack), dict keys,
  set elements and persistent ids whose hash would walk too many tuple elements, memo
  indices far beyond the pickle's length (the C reader sizes its memo by the largest
  index), and arguments whose declared length exceeds the data (read before allocation).

  Raises:
    UnsafeFileError: one of the limits above is exceeded.
    CorruptFileError: the opcode stream is malformed.
  """
  start = f.tell()
  size = f.seek(0, io.SEEK_END) - start
  f.seek(start)
  hash_budget = _HASH_WORK_MIN + 16 * size
  stack: list = []
  marks: list[int] = []
  memo: dict[int, Any] = {}

  def underflow():
    return CorruptFileError(f"{source}: malformed pickle (stack underflow)")

  def pop(n=1):
    fence = marks[-1] if marks else 0
    if len(stack) - n < fence:
      raise underflow()
    items = stack[len(stack) - n:]
    del stack[len(stack) - n:]
    return items

  def pop_mark():
    if not marks:
      raise CorruptFileError(f"{source}: malformed pickle (no MARK before a container)")
    k = marks.pop()
    items = stack[k:]
    del stack[k:]
    return items

  def depth_of(items):
    d = 1 + max((n[1] for n in items), default=0)
    if d > _MAX_DEPTH:
      raise UnsafeFileError(f"{source}: refused values nested deeper than {_MAX_DEPTH} levels")
    return d

  def cost_of(items):
    return min(1 + sum(n[0] for n in items), _MAX_KEY_ELEMENTS + 1)

  def keys(items, what):
    nonlocal hash_budget
    for n in items:
      if n[0] > _MAX_KEY_ELEMENTS:
        raise UnsafeFileError(f"{source}: refused a {what} of more than {_MAX_KEY_ELEMENTS} "
                              "nested elements (expected a string, number or short tuple)")
      hash_budget -= n[0]
    if hash_budget < 0:
      raise UnsafeFileError(f"{source}: refused the file: its dict keys and set elements "
                            "would take too long to hash")

  def grow(items):  # the top of the stack takes in ``items`` (APPEND, SETITEM, BUILD ...)
    if not stack or len(stack) <= (marks[-1] if marks else 0):
      raise underflow()
    top = stack[-1]
    if isinstance(top, list) and items:
      top[1] = max(top[1], depth_of(items))

  try:
    for n_ops, (op, arg, _) in enumerate(pickletools.genops(f)):
      name = op.name  # the most frequent opcodes first
      if name in _PUSH_SCALAR:
        stack.append(_SCALAR)
      elif name in ("PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"):
        idx = len(memo) if name == "MEMOIZE" else arg
        if idx > n_ops:
          raise UnsafeFileError(f"{source}: refused memo index {idx} in a pickle of "
                                f"{n_ops} opcodes so far (expected at most {n_ops})")
        if len(stack) <= (marks[-1] if marks else 0):
          raise underflow()
        memo[idx] = stack[-1]
      elif name in ("GET", "BINGET", "LONG_BINGET"):
        if arg not in memo:
          raise CorruptFileError(f"{source}: malformed pickle (memo index {arg} unset)")
        stack.append(memo[arg])
      elif name in _PUSH_MUTABLE:
        stack.append([1, 1])
      elif name == "EMPTY_TUPLE":
        stack.append((1, 1))
      elif name in ("PROTO", "FRAME", "STOP"):
        pass
      elif name == "MARK":
        marks.append(len(stack))
      elif name == "POP":
        if marks and marks[-1] == len(stack):
          marks.pop()
        else:
          pop()
      elif name == "POP_MARK":
        pop_mark()
      elif name == "DUP":
        stack.append(pop()[0])
        stack.append(stack[-1])
      elif name == "STACK_GLOBAL":
        pop(2)
        stack.append(_SCALAR)
      elif name == "READONLY_BUFFER":
        stack.append(pop()[0])
      elif name == "BINPERSID":
        (pid,) = pop()
        if pid[0] > _MAX_PERSISTENT_ID_ELEMENTS:
          raise UnsafeFileError(f"{source}: refused a persistent id of more than "
                                f"{_MAX_PERSISTENT_ID_ELEMENTS} nested elements (expected a "
                                "short tuple naming a storage)")
        stack.append(_SCALAR)
      elif name in ("TUPLE", "TUPLE1", "TUPLE2", "TUPLE3", "FROZENSET"):
        items = pop_mark() if name in ("TUPLE", "FROZENSET") else pop(int(name[-1]))
        if name == "FROZENSET":  # a frozenset caches its hash: hashing it again is cheap
          keys(items, "set element")
          stack.append((1, depth_of(items)))
        else:
          stack.append((cost_of(items), depth_of(items)))
      elif name == "LIST":
        items = pop_mark()
        stack.append([1, depth_of(items)])
      elif name == "DICT":
        items = pop_mark()
        keys(items[0::2], "dict key")
        stack.append([1, depth_of(items)])
      elif name in ("APPEND", "APPENDS", "ADDITEMS", "SETITEM", "SETITEMS", "BUILD"):
        items = pop_mark() if name.endswith("S") else pop(2 if name == "SETITEM" else 1)
        if name.startswith("SETITEM"):
          keys(items[0::2], "dict key")
        elif name == "ADDITEMS":
          keys(items, "set element")
        grow(items)
      elif name in ("REDUCE", "NEWOBJ", "NEWOBJ_EX", "INST", "OBJ"):
        if name in ("INST", "OBJ"):
          items = pop_mark()
        else:
          items = pop({"REDUCE": 2, "NEWOBJ": 2, "NEWOBJ_EX": 3}[name])
        # A constructed value hashes by identity or through its arguments.
        stack.append([cost_of(items), depth_of(items)])
      else:
        raise CorruptFileError(f"{source}: unsupported pickle opcode {name}")
  except (UnsafeFileError, CorruptFileError):
    raise
  except (ValueError, struct.error, OverflowError, EOFError) as e:
    # pickletools: unknown opcode, truncated or malformed argument, no STOP
    raise CorruptFileError(f"{source}: malformed pickle ({str(e)[:200]})") from e
  finally:
    f.seek(start)


# ------------------------------------------------------------------------- unpickler

class _Unpickler(pickle.Unpickler):
  """A pickle reader that resolves only allowlisted globals, each to a local function."""

  def __init__(self, file, source: str, *, persistent: Callable | None, depth: int = 0,
               no_globals: bool = False):
    super().__init__(file, encoding="utf-8")
    self._file = file
    self.source = source
    start = file.tell()
    self._hash_budget = [_HASH_WORK_MIN + 16 * (file.seek(0, io.SEEK_END) - start)]
    file.seek(start)
    self._persistent = persistent
    self._depth = depth
    self._no_globals = no_globals
    self._rebuilds = (self._rebuild_tensor, self._rebuild_tensor_v2, self._rebuild_tensor_v3,
                      _rebuild_parameter)
    # Functions are handed out wrapped in a fresh _Call, markers as fresh objects; the
    # classes are immutable builtins or frozen, so no BUILD opcode can alter any of them.
    allowed: dict[tuple[str, str], Any] = {
        ("torch._utils", "_rebuild_tensor"): self._rebuild_tensor,
        ("torch._utils", "_rebuild_tensor_v2"): self._rebuild_tensor_v2,
        ("torch._utils", "_rebuild_tensor_v3"): self._rebuild_tensor_v3,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
        ("torch._tensor", "_rebuild_from_type_v2"): self._rebuild_from_type_v2,
        ("torch.tensor", "_rebuild_from_type_v2"): self._rebuild_from_type_v2,
        ("torch", "Size"): _torch_size,
        ("torch", "device"): _torch_device,
        ("torch.storage", "_load_from_bytes"): self._load_from_bytes,
        ("torch_utils.persistence", "_reconstruct_persistent_obj"): self._persistent_obj,
        ("numpy", "dtype"): self._np_dtype,
        ("_codecs", "encode"): _codecs_encode,
        ("collections", "OrderedDict"): self._ordered_dict,
        ("builtins", "bytearray"): self._bytearray,
    }
    for mod in ("builtins", "__builtin__"):
      allowed[(mod, "set")] = self._set
      allowed[(mod, "frozenset")] = self._frozenset
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
      allowed[(mod, "scalar")] = self._np_scalar
      allowed[(mod, "_reconstruct")] = self._np_reconstruct
    for mod in ("numpy.core.numeric", "numpy._core.numeric"):  # pickle protocol 5 arrays
      allowed[(mod, "_frombuffer")] = self._np_frombuffer
    self._allowed = allowed

  def load(self):
    """Checks the opcode stream against the reader's limits, then unpickles it."""
    _scan_pickle(self._file, self.source)
    return super().load()

  # -- containers whose construction hashes their elements
  def _elements(self, items, what) -> list:
    if not isinstance(items, (list, tuple)):
      raise UnsafeFileError(f"{self.source}: {what}s must come as a list or tuple, got "
                            f"{type(items).__name__}")
    for x in items:
      _key_elements(self.source, x[0] if what == "dict key" and isinstance(
          x, (tuple, list)) and x else x, what, self._hash_budget)
    return list(items)

  def _set(self, items=()):
    return set(self._elements(items, "set element"))

  def _frozenset(self, items=()):
    return frozenset(self._elements(items, "set element"))

  def _ordered_dict(self, items=()):
    return collections.OrderedDict(self._elements(items, "dict key"))

  def _bytearray(self, data=b"", encoding=None):
    if isinstance(data, (bytes, bytearray)) and encoding is None:
      return bytearray(data)
    if isinstance(data, str) and encoding in ("latin1", "latin-1"):
      return bytearray(data, "latin-1")
    raise UnsafeFileError(f"{self.source}: refused bytearray({type(data).__name__}"
                          f"{', ' + brief_repr(encoding) if encoding is not None else ''}): "
                          "expected bytes, or a str with encoding 'latin-1'")

  # -- the two hooks of pickle.Unpickler
  def find_class(self, module, name):
    key = (module, name)
    if self._no_globals:
      raise UnsafeFileError(f"{self.source}: refused to load global '{module}.{name}' in a "
                            "file header, where none belongs")
    if key in self._allowed:
      return _Call(self._allowed[key], f"{module}.{name}")
    if key in _ALLOWED_CLASSES:
      return _ALLOWED_CLASSES[key]
    if key in (("torch", "Tensor"), ("torch.nn.parameter", "Parameter")):
      return _TensorType(f"{module}.{name}")
    if key == ("numpy", "ndarray"):
      return _NdarrayType()
    if module in ("torch", "torch.storage") and name == "UntypedStorage":
      return _StorageType(name, np.dtype(np.uint8))
    if module == "torch":
      if name in _STORAGE_DTYPES:
        return _StorageType(name, _STORAGE_DTYPES[name])
      if name in _TORCH_DTYPES:
        return _TorchDtype(f"torch.{name}", _TORCH_DTYPES[name])
      if name in _MEMORY_FORMATS:
        return f"torch.{name}"
    if module == "dnnlib.tflib" or module.startswith("dnnlib.tflib."):
      raise UnsafeFileError(
          f"{self.source}: expected a PyTorch checkpoint, got a TensorFlow StyleGAN network "
          f"pickle (global '{module}.{name}'), which this reader does not load; convert it "
          "to PyTorch first (e.g. rosinality's convert_weight.py, or legacy.py of NVIDIA's "
          "stylegan2-ada-pytorch), then convert that file")
    hint = ""
    if module == "__main__" or module.startswith(("torch.nn.", "transformers.")):
      hint = ("; it looks like a whole model saved with torch.save(model): save its weights "
              "with torch.save(model.state_dict(), path) (or save_pretrained) and convert "
              "that file")
    raise UnsafeFileError(
        f"{self.source}: refused to load global '{module}.{name}': it is not on the allowlist "
        "of tensor, storage, dtype and container constructors, and loading it could run code"
        + hint)

  def persistent_load(self, pid):
    if self._persistent is None:
      raise CorruptFileError(
          f"{self.source}: unexpected persistent id {brief_repr(pid)} in a plain pickle")
    return self._persistent(pid)

  # -- tensor rebuilds
  def _tensor(self, storage, offset, size, stride, dtype=None):
    if not isinstance(storage, _Storage):
      raise UnsafeFileError(f"{self.source}: tensor rebuild with a non-storage argument "
                            f"{type(storage).__name__}")
    offset = _as_int(self.source, offset, "storage offset")
    size = tuple(_as_int(self.source, s, "size") for s in _as_seq(self.source, size, "size"))
    stride = tuple(_as_int(self.source, s, "stride")
                   for s in _as_seq(self.source, stride, "stride"))
    if len(size) != len(stride):
      raise CorruptFileError(
          f"{self.source}: tensor size {size} and stride {stride} differ in rank")
    dtype = storage.dtype if dtype is None else dtype
    dtype = dtype.dtype if isinstance(dtype, _TorchDtype) else dtype
    if not isinstance(dtype, np.dtype):
      raise CorruptFileError(f"{self.source}: tensor dtype {brief_repr(dtype)} is not a known dtype")
    count = storage.nbytes // dtype.itemsize
    _check_extent(self.source, offset, size, stride, count, dtype)
    return _TensorRef(storage, offset, size, stride, dtype)

  def _rebuild_tensor(self, storage, storage_offset, size, stride):
    return self._tensor(storage, storage_offset, size, stride)

  def _rebuild_tensor_v2(self, storage, storage_offset, size, stride, requires_grad=False,
                         backward_hooks=None, metadata=None):
    del requires_grad, backward_hooks, metadata
    return self._tensor(storage, storage_offset, size, stride)

  def _rebuild_tensor_v3(self, storage, storage_offset, size, stride, requires_grad, backward_hooks,
                         dtype, metadata=None):
    del requires_grad, backward_hooks, metadata
    return self._tensor(storage, storage_offset, size, stride, dtype)

  def _rebuild_from_type_v2(self, func, new_type, args, state=None):
    del state
    if not isinstance(new_type, _TensorType):
      raise UnsafeFileError(f"{self.source}: refused tensor subclass {brief_repr(new_type)}")
    if not (isinstance(func, _Call) and func.fn in self._rebuilds):
      raise UnsafeFileError(f"{self.source}: refused tensor rebuild function {brief_repr(func)}")
    if not isinstance(args, tuple):
      raise CorruptFileError(f"{self.source}: tensor rebuild arguments are not a tuple")
    return func(*args)

  # -- storages inside plain pickles
  def _load_from_bytes(self, blob):
    if not isinstance(blob, (bytes, bytearray)):
      raise CorruptFileError(f"{self.source}: embedded storage is not bytes")
    if self._depth >= _MAX_NESTING:
      raise UnsafeFileError(f"{self.source}: embedded storages nested too deeply")
    return _load_torch_bytes(bytes(blob), f"{self.source} (embedded storage)", self._depth + 1)

  # -- NVIDIA persistent objects
  def _persistent_obj(self, meta):
    return _PersistentObj(self.source, meta)

  # -- numpy values
  def _np_dtype(self, name, *args):
    return _DtypeHolder(self.source, name, *args)

  def _np_scalar(self, dtype, data=None):
    dtype = dtype.dtype if isinstance(dtype, _DtypeHolder) else dtype
    if not isinstance(dtype, np.dtype) or dtype.kind not in "biufc":
      raise UnsafeFileError(f"{self.source}: refused numpy scalar of dtype {brief_repr(dtype)}")
    if isinstance(data, str):
      data = data.encode("latin1")
    if not isinstance(data, (bytes, bytearray)) or len(data) != dtype.itemsize:
      raise CorruptFileError(f"{self.source}: numpy scalar of dtype {dtype} with bad data")
    return np.frombuffer(data, dtype=dtype)[0].astype(dtype.newbyteorder("="))

  def _np_frombuffer(self, buf, dtype, shape, order):
    """numpy's protocol-5 array constructor: the array of ``shape`` and ``dtype`` whose
    bytes are ``buf`` (in-band), in C or Fortran ``order``."""
    dtype = dtype.dtype if isinstance(dtype, _DtypeHolder) else dtype
    if not isinstance(dtype, np.dtype) or dtype.kind not in "biufc":
      raise UnsafeFileError(f"{self.source}: refused numpy array of dtype {brief_repr(dtype)}")
    if not isinstance(buf, (bytes, bytearray)):
      raise UnsafeFileError(f"{self.source}: refused numpy array whose data is not in-band "
                            f"bytes, got {type(buf).__name__}")
    if (not isinstance(shape, tuple) or len(shape) > 64
        or not all(isinstance(n, int) and not isinstance(n, bool) for n in shape)):
      raise CorruptFileError(f"{self.source}: numpy array shape must be a tuple of at most 64 "
                             f"ints, got {brief_repr(shape)}")
    if order not in ("C", "F"):
      raise CorruptFileError(f"{self.source}: numpy array order: expected 'C' or 'F', got "
                             f"{brief_repr(order)}")
    holder = _ArrayHolder(self.source)
    holder.array = _numpy_array(self.source, shape, dtype, order == "F", buf)
    return holder

  def _np_reconstruct(self, cls, shape=(0,), code=b"b"):
    del shape, code
    if not isinstance(cls, _NdarrayType):
      raise UnsafeFileError(f"{self.source}: refused numpy reconstruction of {brief_repr(cls)}")
    return _ArrayHolder(self.source)


_ALLOWED_CLASSES: dict[tuple[str, str], type] = {
    ("builtins", "complex"): complex,
    ("__builtin__", "complex"): complex,  # protocol 2 pickles (torch.save) name it so
    ("dnnlib.util", "EasyDict"): _EasyDict,
    ("dnnlib", "EasyDict"): _EasyDict,
    ("argparse", "Namespace"): _Namespace,
}


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
  del requires_grad, backward_hooks, state
  if not isinstance(data, _TensorRef):
    raise UnsafeFileError("parameter rebuild of something that is not a tensor")
  return data


def _torch_size(dims=()):
  return tuple(int(d) for d in dims)


def _torch_device(kind, index=None):
  if not isinstance(kind, str):
    raise CorruptFileError(f"torch.device: expected a device name, got {type(kind).__name__}")
  return f"{kind}:{int(index)}" if index is not None else kind


def _codecs_encode(obj, encoding="utf-8"):
  if not isinstance(obj, str) or encoding not in ("latin1", "latin-1"):
    raise UnsafeFileError(f"refused _codecs.encode({type(obj).__name__}, {brief_repr(encoding)})")
  return obj.encode("latin1")


def _as_int(source, value, what):
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
    raise CorruptFileError(
        f"{source}: tensor {what} must be a non-negative int, got {brief_repr(value)}")
  return int(value)


def _as_seq(source, value, what):
  if not isinstance(value, (tuple, list)):
    raise CorruptFileError(f"{source}: tensor {what} must be a tuple, got {brief_repr(value)}")
  return value


# ------------------------------------------------------------------------- containers

def _storage_type(source, stype):
  if not isinstance(stype, _StorageType):
    raise UnsafeFileError(f"{source}: storage of unknown type {brief_repr(stype)}")
  return stype


def _read_record(zf: zipfile.ZipFile, info: zipfile.ZipInfo, source: str) -> bytes:
  """A record's bytes, read no further than its declared size (plus one byte to notice more)."""
  with zf.open(info) as f:
    blob = f.read(info.file_size + 1)
  if len(blob) != info.file_size:
    raise CorruptFileError(f"{source}: record {info.filename!r} holds "
                           f"{'more than ' if len(blob) > info.file_size else ''}{len(blob)} "
                           f"bytes, its directory entry declares {info.file_size}")
  return blob


def _load_zip(data: bytes, source: str, depth: int) -> Any:
  with zipfile.ZipFile(io.BytesIO(data)) as zf:
    infolist = zf.infolist()
    names = [i.filename for i in infolist]
    # Before reading anything: torch stores records uncompressed, so a record (or all of
    # them together) expanding far beyond the archive's size is a zip bomb.
    for info in infolist:
      if info.file_size > max(_ZIP_BOMB_MIN, _ZIP_BOMB_RATIO * info.compress_size):
        raise UnsafeFileError(f"{source}: record {info.filename!r} would expand "
                              f"{info.compress_size} bytes to {info.file_size}; refusing it")
    total = sum(i.file_size for i in infolist)
    allowed = _EXPAND_RATIO * len(data) + _EXPAND_SLACK
    if total > allowed:
      raise UnsafeFileError(f"{source}: records would expand the {len(data)}-byte archive to "
                            f"{total} bytes, expected at most {allowed}; refusing it")
    pkls = [n for n in names if n == "data.pkl" or n.endswith("/data.pkl")]
    pkls = [n for n in pkls if n.count("/") <= 1]
    if len(pkls) != 1:
      raise CorruptFileError(f"{source}: zip archive without exactly one data.pkl record "
                             f"(found {pkls[:8] or 'none'}); not a torch.save file")
    prefix = pkls[0][:-len("data.pkl")]
    infos = {i.filename: i for i in infolist}
    byteorder = "little"
    if prefix + "byteorder" in infos:
      info = infos[prefix + "byteorder"]
      if info.file_size > _MAX_SMALL_RECORD:
        raise CorruptFileError(f"{source}: byteorder record of {info.file_size} bytes, "
                               "expected 'little' or 'big'")
      byteorder = _read_record(zf, info, source).decode("ascii", "replace").strip()
      if byteorder not in ("little", "big"):
        raise CorruptFileError(f"{source}: unknown byteorder record {brief_repr(byteorder)}")
    raw: dict[str, bytes] = {}

    def persistent(pid):
      if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] in ("storage", b"storage")):
        raise CorruptFileError(f"{source}: unexpected persistent id {brief_repr(pid)}")
      _, stype, key, _location, numel = pid
      stype = _storage_type(source, stype)
      if not isinstance(key, str):
        raise CorruptFileError(f"{source}: storage key {brief_repr(key)} is not a string")
      numel = _as_int(source, numel, "storage size")
      nbytes = numel * stype.dtype.itemsize
      if key not in raw:
        name = f"{prefix}data/{key}"
        info = infos.get(name)
        if info is None:
          raise CorruptFileError(f"{source}: storage record {name!r} is missing")
        if info.file_size != nbytes:
          raise CorruptFileError(f"{source}: storage record {name!r} holds {info.file_size} bytes, "
                                 f"expected {nbytes} ({numel} x {stype.dtype})")
        raw[key] = _read_record(zf, info, source)
      if len(raw[key]) < nbytes:
        raise CorruptFileError(f"{source}: storage {brief_repr(key)} is smaller than declared")
      return _Storage(source, key, stype.dtype, numel, data=raw[key], byteorder=byteorder)

    pickled = _read_record(zf, infos[pkls[0]], source)
    return _Unpickler(io.BytesIO(pickled), source, persistent=persistent, depth=depth).load()


def _plain_load(f, source):
  """Loads a header pickle that may hold no globals and no persistent ids at all."""
  return _Unpickler(f, source, persistent=None, no_globals=True).load()


def _load_legacy(data: bytes, source: str, depth: int) -> Any:
  f = io.BytesIO(data)
  if _plain_load(f, source) != _LEGACY_MAGIC:
    raise CorruptFileError(f"{source}: bad magic number; not a torch.save file")
  protocol = _plain_load(f, source)
  if protocol != _LEGACY_PROTOCOL:
    raise CorruptFileError(f"{source}: unknown legacy protocol version {brief_repr(protocol)}")
  sys_info = _plain_load(f, source)
  if not isinstance(sys_info, dict):
    raise CorruptFileError(f"{source}: legacy system info is not a dict")
  byteorder = "little" if sys_info.get("little_endian", True) else "big"
  storages: dict[str, _Storage] = {}
  views: dict[str, _Storage] = {}

  def persistent(pid):
    if isinstance(pid, tuple) and pid and pid[0] in ("module", b"module"):
      raise UnsafeFileError(f"{source}: refused a pickled module class (torch.save of a whole "
                            "model); save its state_dict instead")
    if not (isinstance(pid, tuple) and len(pid) == 6 and pid[0] in ("storage", b"storage")):
      raise CorruptFileError(f"{source}: unexpected persistent id {brief_repr(pid)}")
    _, stype, key, _location, numel, view = pid
    stype = _storage_type(source, stype)
    if not isinstance(key, str):
      raise CorruptFileError(f"{source}: storage key {brief_repr(key)} is not a string")
    numel = _as_int(source, numel, "storage size")
    if key not in storages:
      storages[key] = _Storage(source, key, stype.dtype, numel, byteorder=byteorder)
    root = storages[key]
    if view is None:
      if root.dtype != stype.dtype or root.numel != numel:
        return _Storage(source, key, stype.dtype, numel, root=root)
      return root
    if not (isinstance(view, tuple) and len(view) == 3):
      raise CorruptFileError(f"{source}: bad storage view {brief_repr(view)}")
    view_key, offset, view_size = view
    offset = _as_int(source, offset, "view offset")
    view_size = _as_int(source, view_size, "view size")
    if (offset + view_size) * stype.dtype.itemsize > numel * stype.dtype.itemsize:
      raise UnsafeFileError(
          f"{source}: storage view {brief_repr(view_key)} reaches outside its storage")
    if view_key not in views:
      views[view_key] = _Storage(source, str(view_key), stype.dtype, view_size, root=root,
                                 offset_bytes=offset * stype.dtype.itemsize)
    return views[view_key]

  result = _Unpickler(f, source, persistent=persistent, depth=depth).load()
  keys = _plain_load(f, source)
  if not isinstance(keys, list):
    raise CorruptFileError(f"{source}: legacy storage key list is not a list")
  for key in keys:
    if not isinstance(key, str):
      raise CorruptFileError(f"{source}: storage key {brief_repr(key)} is not a string")
    if key not in storages:
      raise CorruptFileError(f"{source}: storage key {brief_repr(key)} listed but never used")
    storage = storages[key]
    header = f.read(8)
    if len(header) != 8:
      raise CorruptFileError(f"{source}: truncated before storage {brief_repr(key)}")
    (count,) = struct.unpack("<q" if byteorder == "little" else ">q", header)
    if count < 0:
      raise CorruptFileError(f"{source}: negative size for storage {brief_repr(key)}")
    nbytes = count * storage.dtype.itemsize
    blob = f.read(nbytes)
    if len(blob) != nbytes:
      raise CorruptFileError(f"{source}: truncated inside storage {brief_repr(key)} "
                             f"(expected {nbytes} bytes, got {len(blob)})")
    if nbytes < storage.nbytes:
      raise CorruptFileError(f"{source}: storage {brief_repr(key)} holds {nbytes} bytes, "
                             f"declared {storage.nbytes}")
    storage.data = blob
  return result


def _load_torch_bytes(data: bytes, source: str, depth: int = 0) -> Any:
  """Parses a torch.save blob (zip or legacy) into placeholder objects."""
  if not data:
    raise CorruptFileError(f"{source}: empty file")
  if data.startswith(_ZIP_SIGNATURE):
    return _load_zip(data, source, depth)
  if data.startswith(_LEGACY_PREFIXES):
    return _load_legacy(data, source, depth)
  raise CorruptFileError(f"{source}: not a torch.save file (neither a zip archive nor the "
                         "legacy magic number)")


def _guarded(source: str, fn: Callable[[], Any]) -> Any:
  try:
    return fn()
  except (UnsafeFileError, CorruptFileError) as e:
    if source not in str(e):  # raised by an object that does not know the file
      raise type(e)(f"{source}: {e}") from e
    raise
  except RecursionError as e:
    raise CorruptFileError(f"{source}: nesting too deep to read") from e
  except Exception as e:  # pickle, zip and struct errors on damaged input
    # A KeyError's text is the repr of its key, which the file chose: keep it short.
    detail = brief_repr(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)[:500]
    raise CorruptFileError(f"{source}: cannot read ({type(e).__name__}: {detail})") from e


def _read(path) -> tuple[bytes, str]:
  """A regular file's bytes; devices, pipes and sockets are refused before any read."""
  source = os.fspath(path)
  # Non-blocking: opening a FIFO must not wait for a writer before it can be refused.
  fd = os.open(source, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
  try:
    st = os.fstat(fd)
    if stat.S_ISDIR(st.st_mode):
      raise CorruptFileError(f"{source}: is a directory, expected a checkpoint file")
    if not stat.S_ISREG(st.st_mode):
      raise CorruptFileError(f"{source}: is not a regular file (a device, pipe or socket), "
                             "expected a checkpoint file")
  except BaseException:
    os.close(fd)
    raise
  with os.fdopen(fd, "rb") as f:
    data = f.read(st.st_size + 1)
  if not data:
    raise CorruptFileError(f"{source}: empty file")
  if len(data) > st.st_size:
    raise CorruptFileError(f"{source}: grew while it was read (expected {st.st_size} bytes)")
  return data, source


# ------------------------------------------------------------------------- finishing

class _Memo(dict):
  """``_finalize``'s memo (``id`` -> result) and the budgets of one file.

  Attributes:
    source: the file, for messages.
    depth: containers being finished right now, one inside the other.
    bytes_left: array bytes that may still be returned (a stride-0 view of a few bytes
      could otherwise become gigabytes).
    items_left: submodule visits and module-record entries that may still be made (a
      module graph sharing submodules is visited once per path).
  """

  def __init__(self, source: str, file_size: int):
    super().__init__()
    self.source = source
    self.depth = 0
    self.allowed_bytes = _EXPAND_RATIO * file_size + _EXPAND_SLACK
    self.bytes_left = self.allowed_bytes
    self.items_left = _MAX_RECORD_ITEMS

  def spend_bytes(self, ref: _TensorRef) -> None:
    nbytes = math.prod(ref.shape) * ref.dtype.itemsize
    self.bytes_left -= nbytes
    if self.bytes_left < 0:
      raise UnsafeFileError(
          f"{self.source}: tensors would take more than {self.allowed_bytes} bytes "
          f"({_EXPAND_RATIO}x the file plus {_EXPAND_SLACK >> 20} MiB); the last one, of shape "
          f"{brief_repr(ref.shape)} and stride {brief_repr(ref.stride)}, needs {nbytes} bytes from a "
          f"storage of {ref.storage.nbytes} (stride-0 or overlapping views?); refusing it")

  def spend_items(self, n: int) -> None:
    self.items_left -= n
    if self.items_left < 0:
      raise UnsafeFileError(f"{self.source}: network objects expand to more than "
                            f"{_MAX_RECORD_ITEMS} submodules and entries (submodules shared "
                            "along many paths?); refusing them")


def _finalize(obj: Any, memo: _Memo) -> Any:
  """Turns placeholders into numpy arrays / records and copies containers."""
  key = id(obj)
  if key in memo:
    return memo[key]
  if obj is None or isinstance(obj, (bool, int, float, complex, str, bytes, np.generic,
                                     np.dtype)):
    return obj
  memo.depth += 1
  try:
    if memo.depth > _MAX_DEPTH:
      raise CorruptFileError(f"{memo.source}: values nested deeper than {_MAX_DEPTH} levels")
    return _finalize_new(obj, memo)
  finally:
    memo.depth -= 1


def _finalize_new(obj: Any, memo: _Memo) -> Any:
  key = id(obj)
  if isinstance(obj, _TensorRef):
    memo.spend_bytes(obj)
    out = obj.materialize()
  elif isinstance(obj, _Storage):
    ref = _TensorRef(obj, 0, (obj.numel,), (1,), obj.dtype)
    memo.spend_bytes(ref)
    out = ref.materialize()
  elif isinstance(obj, _DtypeHolder):
    out = obj.dtype
  elif isinstance(obj, _ArrayHolder):
    if obj.array is None:
      raise CorruptFileError(f"{obj.source}: numpy array without data")
    out = obj.array
  elif isinstance(obj, np.ndarray):
    out = obj
  elif isinstance(obj, _PersistentObj):
    out = _module_record(obj, memo)
  elif isinstance(obj, _TorchDtype):
    out = obj.dtype
  elif isinstance(obj, (_StorageType, _TensorType, _Call)):
    out = repr(obj) if not isinstance(obj, _TensorType) else obj.name
  elif isinstance(obj, bytearray):
    out = bytes(obj)
  elif isinstance(obj, dict):
    out = collections.OrderedDict() if isinstance(obj, collections.OrderedDict) else {}
    memo[key] = out
    for k, v in obj.items():
      out[_finalize(k, memo)] = _finalize(v, memo)
    return out
  elif isinstance(obj, list):
    out = []
    memo[key] = out
    out.extend(_finalize(v, memo) for v in obj)
    return out
  elif isinstance(obj, tuple):
    out = tuple(_finalize(v, memo) for v in obj)
  elif isinstance(obj, (set, frozenset)):
    out = type(obj)(_finalize(v, memo) for v in obj)
  else:
    raise CorruptFileError(f"unexpected object of type {type(obj).__name__} in the file")
  memo[key] = out
  return out


def _module_record(obj: _PersistentObj, memo: _Memo) -> NvidiaModule:
  state_dict: dict[str, np.ndarray] = {}
  attributes: dict[str, Any] = {}
  _flatten_module(obj, "", state_dict, attributes, memo, depth=0)
  init_args = _finalize(obj.state.get("_init_args", ()), memo)
  init_kwargs = _finalize(obj.state.get("_init_kwargs", {}), memo)
  return NvidiaModule(obj.class_name, tuple(init_args), dict(init_kwargs), state_dict, attributes)


def _flatten_module(obj, prefix, state_dict, attributes, memo, depth):
  if depth > 64:
    raise CorruptFileError("module nesting too deep")
  state = obj.state
  params = state.get("_parameters") or {}
  buffers = state.get("_buffers") or {}
  skip = state.get("_non_persistent_buffers_set") or set()
  modules = state.get("_modules") or {}
  memo.spend_items(1 + len(state) + len(params) + len(buffers) + len(modules))
  for name, value in params.items():
    if value is not None:
      state_dict[prefix + name] = _finalize(value, memo)
  for name, value in buffers.items():
    if value is not None and name not in skip:
      state_dict[prefix + name] = _finalize(value, memo)
  for name, value in state.items():
    if name.startswith("_") or name == "training" or isinstance(value, _PersistentObj):
      continue
    attributes[prefix + name] = _finalize(value, memo)
  for name, child in modules.items():
    if child is None:
      continue
    if not isinstance(child, _PersistentObj):
      raise CorruptFileError(f"submodule {brief_repr(prefix + name)} is a {type(child).__name__}, "
                             "expected a persistent network object")
    _flatten_module(child, f"{prefix}{name}.", state_dict, attributes, memo, depth + 1)


# ---------------------------------------------------------------------------- public

def load_torch(path: str | os.PathLike) -> Any:
  """Reads a ``torch.save`` file (zip or legacy format) without torch and without code.

  Args:
    path: the checkpoint file.

  Returns:
    The saved object with every tensor as a numpy array (its dtype, shape and values;
    views are copied out, so arrays own their memory) and containers as dict /
    OrderedDict / list / tuple.

  Raises:
    UnsafeFileError: the pickle names a global outside the allowlist, or a tensor
      reaches outside its storage.
    CorruptFileError: the file is empty, truncated or not a torch.save file.
  """
  data, source = _read(path)
  return _guarded(source,
                  lambda: _finalize(_load_torch_bytes(data, source), _Memo(source, len(data))))


def load_any(path: str | os.PathLike) -> Any:
  """Like :func:`load_torch`, but also reads a plain pickle (e.g. an NVIDIA snapshot).

  Persistent network objects come back as :class:`NvidiaModule` records.
  """
  data, source = _read(path)

  def parse():
    if data.startswith(_ZIP_SIGNATURE) or data.startswith(_LEGACY_PREFIXES):
      raw = _load_torch_bytes(data, source)
    else:
      raw = _Unpickler(io.BytesIO(data), source, persistent=None).load()
    return _finalize(raw, _Memo(source, len(data)))

  return _guarded(source, parse)


def load_nvidia_pickle(path: str | os.PathLike) -> dict:
  """Reads an NVIDIA stylegan2-ada / stylegan3 network pickle without running its code.

  Args:
    path: a ``.pkl`` snapshot, a dict such as ``{'G': ..., 'D': ..., 'G_ema': ...,
      'augment_pipe': ..., 'training_set_kwargs': ...}``.

  Returns:
    The dict with every network object as an :class:`NvidiaModule` (weights flattened
    under torch ``state_dict`` names) and other entries as plain Python / numpy values.

  Raises:
    UnsafeFileError, CorruptFileError: as for :func:`load_torch`; CorruptFileError also
      when the pickle does not hold a dict.
  """
  result = load_any(path)
  if not isinstance(result, dict):
    raise CorruptFileError(f"{os.fspath(path)}: expected a pickled dict of networks, "
                           f"got {type(result).__name__}")
  return result


def module_state_dict(record: NvidiaModule, prefix: str) -> dict[str, np.ndarray]:
  """The entries of ``record.state_dict`` under ``prefix`` (``"mapping."``), prefix removed."""
  return {k[len(prefix):]: v for k, v in record.state_dict.items() if k.startswith(prefix)}
