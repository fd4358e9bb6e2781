"""Reading Hugging Face GPT-2 checkpoint files without torch and without running code.

:func:`checkpoint_files` finds the weights and ``config.json`` of a ``save_pretrained``
folder (``model.safetensors``, ``pytorch_model.bin`` or shards listed by their index);
:func:`read_state_dict` reads and merges them (``.bin`` files through
:func:`ports.torchfile.load_torch`, ``.safetensors`` files through
:func:`load_safetensors`, which checks every header field before it reads a tensor byte),
and checks shards against their index (:func:`locate_checkpoint` finds it);
:func:`read_hf_config` reads the config; :func:`looks_like_safetensors` tells a
safetensors file by its first bytes, whatever its name. :mod:`ports.gpt2.convert` maps the
result onto the Flax model and re-exports the readers.
"""

from __future__ import annotations

import json
import math
import os
import stat
import struct
from typing import Any, Mapping

import ml_dtypes
import numpy as np

from ports.gpt2.model import GPT2Config
from ports.torchfile import CorruptFileError, brief_repr

__all__ = ["SAFETENSORS_DTYPES", "checkpoint_files", "load_safetensors", "locate_checkpoint",
           "looks_like_safetensors", "read_hf_config", "read_state_dict"]


#: safetensors dtype names the reader understands, and the numpy dtype each tensor is read
#: as (floats, integers of every width and booleans; bfloat16 and float8 from ml_dtypes).
SAFETENSORS_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64), "I32": np.dtype(np.int32), "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8), "U64": np.dtype(np.uint64), "U32": np.dtype(np.uint32),
    "U16": np.dtype(np.uint16), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
# How the bytes of the dtypes numpy cannot read as stored are read first: raw unsigned words
# of the same width (reinterpreted, or for BOOL checked to be 0 or 1).
_RAW_DTYPES = {"BF16": np.dtype("<u2"), "F8_E4M3": np.dtype("u1"), "F8_E5M2": np.dtype("u1"),
               "BOOL": np.dtype("u1")}
_MAX_HEADER = 100 << 20  # bytes of JSON header (the safetensors library's own bound)
_MAX_NDIM = 8
_MAX_JSON = 16 << 20  # bytes of a config.json or an index file

_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")


def _open_regular(path: str, what: str):
  """A binary file object for a regular file; directories, devices and pipes are refused
  before anything is read."""
  fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
  try:
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
      kind = "a directory" if stat.S_ISDIR(st.st_mode) else "a device, pipe or socket"
      raise CorruptFileError(f"{path}: expected {what} (a regular file), got {kind}")
  except BaseException:
    os.close(fd)
    raise
  return os.fdopen(fd, "rb"), st.st_size


def _torch_kind(head: bytes) -> str:
  """What a file whose first bytes are ``head`` is, when it is a torch file ('' if not)."""
  if head.startswith(b"PK\x03\x04"):
    return "a torch.save zip archive"
  if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
    return "a pickle (torch.save's legacy format)"
  return ""


def _not_safetensors(head: bytes) -> str:
  """A hint for a file read as safetensors that fails its first checks, when its content
  is a torch file under a safetensors name."""
  kind = _torch_kind(head)
  return (f"; the content is {kind}, not safetensors: name it pytorch_model.bin (or *.bin)"
          if kind else "")


def looks_like_safetensors(path: str | os.PathLike) -> bool:
  """Whether a file starts like a safetensors file: a header length that fits the file,
  then a JSON object (whatever its name; nothing past the first 9 bytes is read).

  Args:
    path: the file.

  Returns:
    False as well for a folder, a device or pipe, or a file that cannot be opened.

  Example:
    >>> import os, tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "weights.bin")
    >>> with open(path, "wb") as f:
    ...   _ = f.write(len(b"{}").to_bytes(8, "little") + b"{}")
    >>> looks_like_safetensors(path), looks_like_safetensors(os.path.dirname(path))
    (True, False)
  """
  path = os.fspath(path)
  try:
    f, size = _open_regular(path, "a weights file")
  except (OSError, ValueError):
    return False
  with f:
    head = f.read(9)
  return (len(head) == 9 and head[8:9] == b"{"
          and struct.unpack("<Q", head[:8])[0] <= size - 8)


def _read_json_file(path: str, what: str) -> Any:
  """The value of a small JSON file (at most ``_MAX_JSON`` bytes)."""
  f, size = _open_regular(path, what)
  with f:
    if size > _MAX_JSON:
      raise CorruptFileError(f"{path}: expected {what} of at most {_MAX_JSON} bytes, got "
                             f"{size} bytes")
    data = f.read(_MAX_JSON + 1)
  try:
    return json.loads(data.decode("utf-8"))
  except (ValueError, RecursionError) as e:  # UnicodeDecodeError, JSONDecodeError, nesting
    raise CorruptFileError(f"{path}: expected {what} in UTF-8 JSON, got {len(data)} bytes "
                           f"that do not parse ({str(e)[:200]})") from None


def _unique_object(pairs):
  keys = [k for k, _ in pairs]
  if len(set(keys)) != len(keys):
    dup = next(k for k in keys if keys.count(k) > 1)
    raise ValueError(f"the key {brief_repr(dup)} appears more than once")
  return dict(pairs)


def _is_count(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def load_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads a ``.safetensors`` file without the ``safetensors`` package or torch.

  The format: an 8-byte little-endian header length ``n``, ``n`` bytes of UTF-8 JSON
  mapping each tensor name to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (plus
  an optional ``"__metadata__"`` object of strings), then the raw little-endian tensor
  bytes, offsets counted from the end of the header. Every field is checked before any
  tensor byte is read: the header length fits the file and at most 100 MiB; the JSON is an
  object without repeated names; each entry has exactly those three fields; the dtype is
  one of :data:`SAFETENSORS_DTYPES` (F64, F32, F16, BF16, F8_E4M3, F8_E5M2, I64, I32,
  I16, I8, U64, U32, U16, U8, BOOL); the shape is a list of at most 8 non-negative
  integers; the offsets are two integers ``0 <= begin <= end <=`` the data size;
  ``end - begin`` equals the shape's element count times the dtype's size; no two tensors
  share a byte. BOOL bytes must be 0 or 1.

  Args:
    path: the file.

  Returns:
    Name -> numpy array of the stored dtype (as :data:`SAFETENSORS_DTYPES` maps it, e.g.
    float64, int64, bool or ``ml_dtypes.bfloat16``; nothing is cast) and shape, in native
    byte order, each owning its memory.

  Raises:
    ports.torchfile.CorruptFileError: (a ValueError) the file breaks any rule above, or is
      not a regular file; the message names the file, the tensor and the field.

  Example:
    >>> import json, os, struct, tempfile
    >>> import numpy as np
    >>> header = json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}})
    >>> path = os.path.join(tempfile.mkdtemp(), "tiny.safetensors")
    >>> with open(path, "wb") as f:
    ...   _ = f.write(struct.pack("<Q", len(header)) + header.encode()
    ...               + np.array([1.5, -2.0], "<f4").tobytes())
    >>> load_safetensors(path)["w"].tolist()
    [1.5, -2.0]
  """
  source = os.fspath(path)
  f, size = _open_regular(source, "a safetensors file")
  with f:
    if size < 8:
      raise CorruptFileError(f"{source}: expected a safetensors file (an 8-byte header "
                             f"length first), got {size} bytes")
    head = f.read(8)
    (n,) = struct.unpack("<Q", head)
    if n > _MAX_HEADER:
      raise CorruptFileError(f"{source}: header length: expected at most {_MAX_HEADER} "
                             f"bytes, got {n}" + _not_safetensors(head))
    if n > size - 8:
      raise CorruptFileError(f"{source}: header length: expected at most the {size - 8} "
                             f"bytes after the length field, got {n} (past the end of the "
                             "file: truncated or not a safetensors file)"
                             + _not_safetensors(head))
    raw = f.read(n)
    try:
      header = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_object)
    except (ValueError, RecursionError) as e:
      raise CorruptFileError(f"{source}: header: expected a UTF-8 JSON object, got "
                             f"{n} bytes that do not parse ({str(e)[:200]})"
                             + _not_safetensors(head)) from None
    if not isinstance(header, dict):
      raise CorruptFileError(f"{source}: header: expected a JSON object, got "
                             f"{type(header).__name__}")
    data_size = size - 8 - n
    entries = _check_header(source, header, data_size)
    out = {}
    for name, (dtype_name, shape, begin, end) in entries.items():
      f.seek(8 + n + begin)
      buf = f.read(end - begin)
      if len(buf) != end - begin:
        raise CorruptFileError(f"{source}: {name}: expected {end - begin} bytes of data, got "
                               f"{len(buf)} (the file changed while it was read)")
      out[name] = _decode(source, name, dtype_name, buf).reshape(shape)
  return out


def _decode(source: str, name: str, dtype_name: str, buf: bytes) -> np.ndarray:
  """A tensor's little-endian bytes as a native-order array of its dtype, owning its memory."""
  want = SAFETENSORS_DTYPES[dtype_name]
  raw = _RAW_DTYPES.get(dtype_name, want.newbyteorder("<"))
  a = np.frombuffer(buf, raw).astype(raw.newbyteorder("="))
  if dtype_name == "BOOL":
    if a.size and a.max() > 1:
      raise CorruptFileError(f"{source}: tensor {brief_repr(name)}: expected BOOL bytes 0 or "
                             f"1, got {int(a.max())}")
    return a.astype(np.bool_)
  if dtype_name in _RAW_DTYPES:
    return a.view(want)
  return a


def _check_header(source: str, header: dict, data_size: int) -> dict:
  """Validates a parsed safetensors header: name -> (dtype, shape, begin, end)."""
  entries = {}
  for name, entry in header.items():
    if name == "__metadata__":
      if not (isinstance(entry, dict) and all(isinstance(v, str) for v in entry.values())):
        raise CorruptFileError(f"{source}: __metadata__: expected an object of strings, "
                               f"got {brief_repr(entry)}")
      continue
    where = f"{source}: tensor {brief_repr(name)}"
    if not isinstance(entry, dict):
      raise CorruptFileError(f"{where}: expected an object with dtype, shape and "
                             f"data_offsets, got {type(entry).__name__} {brief_repr(entry)}")
    fields = {"dtype", "shape", "data_offsets"}
    if set(entry) != fields:
      raise CorruptFileError(f"{where}: expected the fields {sorted(fields)}, got "
                             f"{sorted(map(str, entry))}")
    dtype_name = entry["dtype"]
    if dtype_name not in SAFETENSORS_DTYPES:
      raise CorruptFileError(f"{where}: dtype: expected one of {sorted(SAFETENSORS_DTYPES)}, "
                             f"got {brief_repr(dtype_name)}")
    shape = entry["shape"]
    if (not isinstance(shape, list) or len(shape) > _MAX_NDIM
        or not all(_is_count(s) for s in shape)):
      raise CorruptFileError(f"{where}: shape: expected a list of at most {_MAX_NDIM} "
                             f"non-negative integers, got {brief_repr(shape)}")
    offsets = entry["data_offsets"]
    if (not isinstance(offsets, list) or len(offsets) != 2
        or not all(_is_count(o) for o in offsets) or offsets[0] > offsets[1]):
      raise CorruptFileError(f"{where}: data_offsets: expected [begin, end] with "
                             f"0 <= begin <= end, got {brief_repr(offsets)}")
    begin, end = offsets
    if end > data_size:
      raise CorruptFileError(f"{where}: data_offsets: expected end <= {data_size} (the data "
                             f"after the header), got [{begin}, {end}] (past the end of the "
                             "file)")
    nbytes = math.prod(shape) * SAFETENSORS_DTYPES[dtype_name].itemsize
    if end - begin != nbytes:
      raise CorruptFileError(f"{where}: expected {nbytes} bytes for shape {shape} of "
                             f"{dtype_name}, got data_offsets [{begin}, {end}] "
                             f"({end - begin} bytes)")
    entries[name] = (dtype_name, tuple(shape), begin, end)
  spans = sorted((b, e, name) for name, (_, _, b, e) in entries.items() if e > b)
  for (b0, e0, n0), (b1, e1, n1) in zip(spans, spans[1:]):
    if b1 < e0:
      raise CorruptFileError(f"{source}: tensors {brief_repr(n0)} [{b0}, {e0}] and "
                             f"{brief_repr(n1)} [{b1}, {e1}]: expected disjoint data_offsets, "
                             "got overlapping bytes")
  return entries


def checkpoint_files(src: str | os.PathLike) -> tuple[list[str], str]:
  """The weight files and the config file of a Hugging Face GPT-2 checkpoint.

  Args:
    src: a ``save_pretrained`` folder, or one weights file (``.safetensors``, ``.bin``,
      or a ``*.index.json`` listing shards) with ``config.json`` beside it. In a folder,
      ``model.safetensors`` is preferred, then its index, then ``pytorch_model.bin``,
      then its index.

  Returns:
    ``(weight_files, config_file)``: shard files in the order the index names them.

  Raises:
    FileNotFoundError: no weights or no ``config.json`` found (the message lists the
      names looked for), or a shard an index names is missing.
    ValueError: an index file is malformed or names a file outside its folder, or the
      preferred weights name in a folder is a directory (or another non-file).
  """
  files, config_file, _ = locate_checkpoint(src)
  return files, config_file


def locate_checkpoint(src: str | os.PathLike) -> tuple[list[str], str, str | None]:
  """:func:`checkpoint_files` and the index file the shards come from.

  Returns:
    ``(weight_files, config_file, index_file)``; ``index_file`` is None for one weights
    file. Pass it to :func:`read_state_dict` so that the shards are checked against it.

  Raises:
    As :func:`checkpoint_files`.
  """
  src = os.fspath(src)
  if os.path.isdir(src):
    folder = src
    found = [name for name in _WEIGHT_FILES if os.path.isfile(os.path.join(src, name))]
    odd = [name for name in _WEIGHT_FILES
           if os.path.lexists(os.path.join(src, name)) and name not in found]
    if odd and (not found or _WEIGHT_FILES.index(odd[0]) < _WEIGHT_FILES.index(found[0])):
      what = "a directory" if os.path.isdir(os.path.join(src, odd[0])) else "not a regular file"
      raise CorruptFileError(f"{os.path.join(src, odd[0])}: expected GPT-2 weights (a regular "
                             f"file), got {what}")
    if not found:
      raise FileNotFoundError(f"{src}: expected GPT-2 weights in the folder, one of "
                              f"{list(_WEIGHT_FILES)}; found {sorted(os.listdir(src))[:8]}")
    weights = os.path.join(src, found[0])
  else:
    if not os.path.exists(src):
      raise FileNotFoundError(f"{src}: no such file or folder")
    folder = os.path.dirname(os.path.abspath(src))
    weights = src
  config_file = os.path.join(folder, "config.json")
  if not os.path.isfile(config_file):
    raise FileNotFoundError(f"{config_file}: expected the checkpoint's config.json next to "
                            "its weights (Hugging Face's save_pretrained writes it)")
  if weights.endswith(".index.json"):
    return _shards(weights), config_file, weights
  return [weights], config_file, None


def _weight_map(index_file: str) -> dict[str, str]:
  """An index file's ``weight_map`` (tensor name -> shard file name), checked."""
  index = _read_json_file(index_file, "a checkpoint index")
  weight_map = index.get("weight_map") if isinstance(index, dict) else None
  if not (isinstance(weight_map, dict) and weight_map
          and all(isinstance(v, str) for v in weight_map.values())):
    raise CorruptFileError(f"{index_file}: weight_map: expected an object of tensor names to "
                           f"shard file names, got {brief_repr(weight_map)}")
  return weight_map


def _shards(index_file: str) -> list[str]:
  """The shard files an index's ``weight_map`` names, each once, in order."""
  weight_map = _weight_map(index_file)
  folder = os.path.dirname(os.path.abspath(index_file))
  files = []
  for name in dict.fromkeys(weight_map.values()):
    if os.path.basename(name) != name or name in ("", ".", ".."):
      raise CorruptFileError(f"{index_file}: weight_map: expected shard names inside the "
                             f"index's folder, got {brief_repr(name)}")
    files.append(os.path.join(folder, name))
  # Before any shard is read: a missing one would otherwise surface only after the others.
  missing = [os.path.basename(f) for f in files if not os.path.lexists(f)]
  if missing:
    raise FileNotFoundError(f"{index_file}: weight_map: expected the shard files it names "
                            f"beside it, missing {missing[:8]} ({len(missing)} of "
                            f"{len(files)}); the checkpoint is incomplete")
  return files


def read_hf_config(path: str | os.PathLike) -> GPT2Config:
  """The :class:`GPT2Config` of a Hugging Face ``config.json``.

  Raises:
    ValueError: the file is not JSON, not a GPT-2 config, or asks for a setting the port
      does not compute (see :meth:`GPT2Config.from_hf`); the message names the file.
  """
  source = os.fspath(path)
  return GPT2Config.from_hf(_read_json_file(source, "a GPT-2 config.json"), where=source)


def _read_weights(path: str) -> dict[str, Any]:
  if path.endswith(".safetensors"):
    return load_safetensors(path)
  from ports.torchfile import load_torch

  try:
    sd = load_torch(path)
  except CorruptFileError as e:
    if not looks_like_safetensors(path):
      raise
    raise CorruptFileError(f"{e}; the content is a safetensors file: name it "
                           "model.safetensors (or *.safetensors)") from None
  if not isinstance(sd, Mapping):
    raise ValueError(f"{path}: expected a GPT-2 state dict (names to tensors), got "
                     f"{type(sd).__name__} {brief_repr(sd)}")
  return dict(sd)


def read_state_dict(files: list[str], *, index: str | os.PathLike | None = None
                    ) -> dict[str, Any]:
  """The state dict held by one weights file or by the shards of an index, merged.

  Args:
    files: the weights file, or the shard files (see :func:`locate_checkpoint`).
    index: the ``*.index.json`` the shards come from; each shard must then hold exactly
      the tensors the index's ``weight_map`` assigns to it.

  Raises:
    ValueError: a file is unsafe (:class:`ports.torchfile.UnsafeFileError`) or damaged
      (:class:`ports.torchfile.CorruptFileError`), two shards hold the same name, or a
      shard and the index disagree (a tensor the index assigns to a shard that does not
      hold it, or a tensor in a shard that the index does not assign to it); the message
      names the tensor and the shard.
  """
  weight_map = None if index is None else _weight_map(os.fspath(index))
  sd: dict[str, Any] = {}
  for path in files:
    part = _read_weights(os.fspath(path))
    twice = sorted(set(part) & set(sd))
    if twice:
      raise CorruptFileError(f"{path}: expected each tensor in one shard, got "
                             f"{brief_repr(twice[0])} in two of them")
    if weight_map is not None:
      _check_shard(os.fspath(index), weight_map, os.fspath(path), part)
    sd.update(part)
  return sd


def _check_shard(index: str, weight_map: dict[str, str], path: str, part: Mapping) -> None:
  """Refuses a shard whose tensors differ from those the index assigns to it."""
  shard = os.path.basename(path)
  for name in part:
    if name not in weight_map:
      raise CorruptFileError(f"{index}: weight_map: tensor {brief_repr(name)}: expected only "
                             f"the tensors the index lists, got one it does not list in "
                             f"shard {shard!r}")
    if weight_map[name] != shard:
      raise CorruptFileError(f"{index}: weight_map: tensor {brief_repr(name)}: expected in "
                             f"shard {weight_map[name]!r} (where the index puts it), got it "
                             f"in shard {shard!r}")
  for name, where in weight_map.items():
    if where == shard and name not in part:
      raise CorruptFileError(f"{index}: weight_map: tensor {brief_repr(name)}: expected in "
                             f"shard {shard!r} (where the index puts it), got a shard without "
                             f"it (it holds {len(part)} tensors)")
