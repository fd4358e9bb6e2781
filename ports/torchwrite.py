"""Writing ``torch.save`` files without torch: the zip layout torch reads.

:func:`save_torch` writes what ``torch.save(obj, path)`` writes for ``obj`` made of
dicts (``collections.OrderedDict`` kept as such), lists, tuples, str, int, float, bool,
None and numeric numpy arrays, which become tensors. ``torch.load(path)`` and
``torch.load(path, weights_only=True)`` read it back (tensors of the arrays' dtypes,
shapes and values), and so does :func:`ports.torchfile.load_torch`.

Layout of the archive (stored records, no compression, every record's data aligned to
64 bytes as torch aligns them)::

  archive/data.pkl      pickle (protocol 2) of the object; each tensor is
                        torch._utils._rebuild_tensor_v2(storage, 0, size, stride, False,
                        OrderedDict()) and each storage the persistent id
                        ('storage', torch.<Type>Storage, '<n>', 'cpu', numel)
  archive/byteorder     'little'
  archive/data/<n>      the n-th array's bytes, C order, little-endian
  archive/version       '3\\n'

The pickle is emitted opcode by opcode (no Python object is pickled by reference), so the
only globals the file names are ``collections.OrderedDict``,
``torch._utils._rebuild_tensor_v2`` and the storage types. The output is deterministic
(fixed timestamps): the same object gives the same bytes. The file is written
atomically (a temporary sibling, synced, then renamed over ``path``): a failed or
interrupted write leaves any earlier file whole.
"""

from __future__ import annotations

import collections
import io
import math
import os
import struct
import zipfile
from typing import Any

import ml_dtypes
import numpy as np

__all__ = ["save_torch", "torch_bytes"]

ARCHIVE = "archive"
ALIGNMENT = 64
_DATE = (1980, 1, 1, 0, 0, 0)
_PAD_HEADER_ID = 0x4246  # "FB", the extra-field id torch's own writer pads with

_STORAGE_TYPES = {
    np.dtype(np.float32): "FloatStorage",
    np.dtype(np.float64): "DoubleStorage",
    np.dtype(np.float16): "HalfStorage",
    np.dtype(ml_dtypes.bfloat16): "BFloat16Storage",
    np.dtype(np.int64): "LongStorage",
    np.dtype(np.int32): "IntStorage",
    np.dtype(np.int16): "ShortStorage",
    np.dtype(np.int8): "CharStorage",
    np.dtype(np.uint8): "ByteStorage",
    np.dtype(np.bool_): "BoolStorage",
}

# Pickle opcodes (protocol 2).
_PROTO, _STOP = b"\x80", b"."
_MARK, _TUPLE, _EMPTY_TUPLE = b"(", b"t", b")"
_TUPLE1, _TUPLE2, _TUPLE3 = b"\x85", b"\x86", b"\x87"
_EMPTY_LIST, _APPENDS = b"]", b"e"
_EMPTY_DICT, _SETITEMS = b"}", b"u"
_NONE, _NEWTRUE, _NEWFALSE = b"N", b"\x88", b"\x89"
_BININT, _BININT1, _BININT2, _LONG1 = b"J", b"K", b"M", b"\x8a"
_BINFLOAT, _BINUNICODE = b"G", b"X"
_GLOBAL, _REDUCE, _BINPERSID = b"c", b"R", b"Q"
_MAX_DEPTH = 100


class _Pickle:
  """Emits the pickle of an object tree; arrays become tensors over numbered storages."""

  def __init__(self):
    self.out = io.BytesIO()
    self.storages: list[np.ndarray] = []

  def write(self, *parts: bytes) -> None:
    for p in parts:
      self.out.write(p)

  def global_(self, module: str, name: str) -> None:
    self.write(_GLOBAL, f"{module}\n{name}\n".encode("ascii"))

  def save(self, obj: Any, where: str, depth: int = 0) -> None:
    if depth > _MAX_DEPTH:
      raise ValueError(f"{where}: expected containers nested at most {_MAX_DEPTH} deep")
    if obj is None:
      self.write(_NONE)
    elif isinstance(obj, (bool, np.bool_)):
      self.write(_NEWTRUE if obj else _NEWFALSE)
    elif isinstance(obj, int):
      self.int_(obj)
    elif isinstance(obj, float):
      self.write(_BINFLOAT, struct.pack(">d", obj))
    elif isinstance(obj, str):
      data = obj.encode("utf-8", "surrogatepass")
      self.write(_BINUNICODE, struct.pack("<I", len(data)), data)
    elif isinstance(obj, (np.ndarray, np.generic)):
      self.tensor(np.asarray(obj), where)
    elif isinstance(obj, tuple):
      self.tuple_(obj, where, depth)
    elif isinstance(obj, list):
      self.write(_EMPTY_LIST)
      if obj:
        self.write(_MARK)
        for i, v in enumerate(obj):
          self.save(v, f"{where}[{i}]", depth + 1)
        self.write(_APPENDS)
    elif isinstance(obj, dict):
      if isinstance(obj, collections.OrderedDict):
        self.global_("collections", "OrderedDict")
        self.write(_EMPTY_TUPLE, _REDUCE)
      elif type(obj) is dict:
        self.write(_EMPTY_DICT)
      else:
        raise ValueError(f"{where}: expected a dict or OrderedDict, got {type(obj).__name__}")
      if obj:
        self.write(_MARK)
        for k, v in obj.items():
          if not isinstance(k, (str, int)) or isinstance(k, bool):
            raise ValueError(f"{where}: expected str or int keys, got the "
                             f"{type(k).__name__} key {k!r}")
          self.save(k, where, depth + 1)
          self.save(v, f"{where}.{k}" if where else str(k), depth + 1)
        self.write(_SETITEMS)
    else:
      raise ValueError(f"{where or 'obj'}: expected None, bool, int, float, str, a numeric "
                       f"numpy array, list, tuple or dict, got {type(obj).__name__}")

  def int_(self, v: int) -> None:
    if 0 <= v < 256:
      self.write(_BININT1, struct.pack("<B", v))
    elif 0 <= v < 65536:
      self.write(_BININT2, struct.pack("<H", v))
    elif -2 ** 31 <= v < 2 ** 31:
      self.write(_BININT, struct.pack("<i", v))
    else:
      n = (v.bit_length() + 8) // 8
      if n > 255:
        raise ValueError(f"int: expected at most 2040 bits, got {v.bit_length()}")
      self.write(_LONG1, struct.pack("<B", n), v.to_bytes(n, "little", signed=True))

  def tuple_(self, items: tuple, where: str, depth: int) -> None:
    if not items:
      self.write(_EMPTY_TUPLE)
      return
    if len(items) > 3:
      self.write(_MARK)
    for i, v in enumerate(items):
      self.save(v, f"{where}[{i}]", depth + 1)
    self.write({1: _TUPLE1, 2: _TUPLE2, 3: _TUPLE3}.get(len(items), _TUPLE))

  def tensor(self, a: np.ndarray, where: str) -> None:
    storage_type = _STORAGE_TYPES.get(a.dtype.newbyteorder("="))
    if storage_type is None:
      raise ValueError(f"{where}: expected an array of one of "
                       f"{sorted(str(d) for d in _STORAGE_TYPES)}, got {a.dtype}")
    a = np.array(a, dtype=a.dtype.newbyteorder("<"), order="C")  # keeps 0-d arrays 0-d
    key = str(len(self.storages))
    self.storages.append(a)
    strides = tuple(int(math.prod(a.shape[i + 1:])) for i in range(a.ndim))
    self.global_("torch._utils", "_rebuild_tensor_v2")
    self.write(_MARK)
    # The storage: a persistent id ('storage', type, key, location, numel).
    self.write(_MARK)
    self.save("storage", where)
    self.global_("torch", storage_type)
    self.save(key, where)
    self.save("cpu", where)
    self.int_(int(a.size))
    self.write(_TUPLE, _BINPERSID)
    self.int_(0)                                   # storage offset
    self.tuple_(tuple(int(s) for s in a.shape), where, 0)
    self.tuple_(strides, where, 0)
    self.write(_NEWFALSE)                          # requires_grad
    self.global_("collections", "OrderedDict")     # backward hooks
    self.write(_EMPTY_TUPLE, _REDUCE)
    self.write(_TUPLE, _REDUCE)


def _aligned_info(name: str, offset: int) -> zipfile.ZipInfo:
  """A stored record whose data starts on a multiple of :data:`ALIGNMENT` in the file."""
  info = zipfile.ZipInfo(name, date_time=_DATE)
  info.compress_type = zipfile.ZIP_STORED
  info.create_system = 0
  start = offset + 30 + len(name.encode("utf-8")) + 4  # local header + pad field header
  info.extra = struct.pack("<HH", _PAD_HEADER_ID, -start % ALIGNMENT) + b"Z" * (
      -start % ALIGNMENT)
  return info


def torch_bytes(obj: Any) -> bytes:
  """The bytes of the ``torch.save`` file of ``obj`` (see :func:`save_torch`)."""
  p = _Pickle()
  p.write(_PROTO, b"\x02")
  p.save(obj, "")
  p.write(_STOP)
  records = [("data.pkl", p.out.getvalue()), ("byteorder", b"little")]
  records += [(f"data/{i}", a.tobytes()) for i, a in enumerate(p.storages)]
  records.append(("version", b"3\n"))
  buf = io.BytesIO()
  with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
    for name, data in records:
      zf.writestr(_aligned_info(f"{ARCHIVE}/{name}", buf.tell()), data)
  return buf.getvalue()


def save_torch(path: str | os.PathLike, obj: Any) -> str:
  """Writes ``obj`` as a ``torch.save`` zip file, atomically.

  Args:
    path: destination file (replaced whole if it exists).
    obj: nested dict / OrderedDict / list / tuple of str, int, float, bool, None and
      numeric numpy arrays (float16/32/64, bfloat16, int8–64, uint8, bool); arrays are
      written as CPU tensors (C order, little-endian), 0-d arrays and numpy scalars as
      0-d tensors. Dict keys must be str or int.

  Returns:
    The absolute path written.

  Raises:
    ValueError: an unsupported value, naming where in ``obj`` it is; nothing is written.
  """
  from memedit import _io

  data = torch_bytes(obj)
  dst = os.path.abspath(os.fspath(path))
  _io.atomic_write_bytes(dst, data)
  return dst
