"""Converter from Hugging Face GPT-2 checkpoints (``save_pretrained`` folders).

A checkpoint folder holds ``config.json`` and the weights as ``model.safetensors``,
``pytorch_model.bin`` or shards listed by ``model.safetensors.index.json`` /
``pytorch_model.bin.index.json``. Neither format is read with torch or the
``safetensors`` package, and nothing in a file is run:

* ``.bin`` files (``torch.save`` zip or legacy format) go through
  :func:`ports.torchfile.load_torch`, whose restricted unpickler refuses any global
  outside its allowlist (:class:`ports.torchfile.UnsafeFileError`);
* ``.safetensors`` files go through :func:`load_safetensors`, which checks every field of
  the header before it reads a byte of tensor data.

Weight layout. Hugging Face's GPT-2 projections are ``Conv1D`` modules computing
``x @ W + b`` with ``W`` stored ``(in, out)``: that is already the Flax ``nn.Dense``
kernel, so ``c_attn``, ``attn.c_proj``, ``c_fc`` and ``mlp.c_proj`` weights are copied
as they are (no transpose). LayerNorm ``weight`` becomes ``scale``; embeddings become
``embedding``. Keys may carry the ``transformer.`` prefix (``GPT2LMHeadModel``) or not
(``GPT2Model`` and OpenAI's original uploads); the causal-mask buffers ``attn.bias`` /
``attn.masked_bias`` of older files are dropped; an ``lm_head.weight`` must equal
``wte.weight`` (GPT-2 ties them). Half-precision weights are widened to float32.

The result is one directory written atomically by :func:`memedit._io.save_tree`: the Flax
variables plus a JSON config (the :class:`ports.gpt2.model.GPT2Config` fields,
``architecture: 'gpt2'`` and the source files' names and sha256).
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
import struct
from typing import Any, Mapping

import ml_dtypes
import numpy as np

from memedit import _io
from ports import check_finite, shown_keys, validate_state_dict
from ports.gpt2.model import GPT2Config, GPT2LMHeadModel
from ports.torchfile import CorruptFileError, brief_repr

__all__ = ["ARCHITECTURE", "FORMAT_VERSION", "checkpoint_files", "convert_gpt2",
           "load_gpt2", "load_safetensors", "read_hf_config", "read_state_dict",
           "state_dict_to_params"]

ARCHITECTURE = "gpt2"
FORMAT_VERSION = 1

# safetensors dtype names the reader understands, as little-endian numpy dtypes; BF16 is
# read as raw 16-bit words and reinterpreted.
SAFETENSORS_DTYPES = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2")}
_MAX_HEADER = 100 << 20  # bytes of JSON header (the safetensors library's own bound)
_MAX_NDIM = 8
_MAX_JSON = 16 << 20  # bytes of a config.json or an index file
_BF16 = np.dtype(ml_dtypes.bfloat16)

_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")
_BUFFER = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)")


# ----------------------------------------------------------------------------------------
# Files.


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
  F32, F16 or BF16; the shape is a list of at most 8 non-negative integers; the offsets
  are two integers ``0 <= begin <= end <=`` the data size; ``end - begin`` equals the
  shape's element count times the dtype's size; no two tensors share a byte.

  Args:
    path: the file.

  Returns:
    Name -> numpy array of the stored dtype (float32, float16 or ``ml_dtypes.bfloat16``)
    and shape, in native byte order, each owning its memory.

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
    (n,) = struct.unpack("<Q", f.read(8))
    if n > _MAX_HEADER:
      raise CorruptFileError(f"{source}: header length: expected at most {_MAX_HEADER} "
                             f"bytes, got {n}")
    if n > size - 8:
      raise CorruptFileError(f"{source}: header length: expected at most the {size - 8} "
                             f"bytes after the length field, got {n} (past the end of the "
                             "file: truncated or not a safetensors file)")
    raw = f.read(n)
    try:
      header = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_object)
    except (ValueError, RecursionError) as e:
      raise CorruptFileError(f"{source}: header: expected a UTF-8 JSON object, got "
                             f"{n} bytes that do not parse ({str(e)[:200]})") from None
    if not isinstance(header, dict):
      raise CorruptFileError(f"{source}: header: expected a JSON object, got "
                             f"{type(header).__name__}")
    data_size = size - 8 - n
    entries = _check_header(source, header, data_size)
    out = {}
    for name, (dtype, shape, begin, end) in entries.items():
      f.seek(8 + n + begin)
      buf = f.read(end - begin)
      if len(buf) != end - begin:
        raise CorruptFileError(f"{source}: {name}: expected {end - begin} bytes of data, got "
                               f"{len(buf)} (the file changed while it was read)")
      a = np.frombuffer(buf, dtype).astype(dtype.newbyteorder("="))
      if dtype.kind == "u":  # BF16 words
        a = a.view(ml_dtypes.bfloat16)
      out[name] = a.reshape(shape)
  return out


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
    dtype = SAFETENSORS_DTYPES[dtype_name]
    nbytes = math.prod(shape) * dtype.itemsize
    if end - begin != nbytes:
      raise CorruptFileError(f"{where}: expected {nbytes} bytes for shape {shape} of "
                             f"{dtype_name}, got data_offsets [{begin}, {end}] "
                             f"({end - begin} bytes)")
    entries[name] = (dtype, tuple(shape), begin, end)
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
      names looked for).
    ValueError: an index file is malformed or names a file outside its folder.
  """
  src = os.fspath(src)
  if os.path.isdir(src):
    folder = src
    found = [name for name in _WEIGHT_FILES if os.path.isfile(os.path.join(src, name))]
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
    return _shards(weights), config_file
  return [weights], config_file


def _shards(index_file: str) -> list[str]:
  """The shard files an index's ``weight_map`` names, each once, in order."""
  index = _read_json_file(index_file, "a checkpoint index")
  weight_map = index.get("weight_map") if isinstance(index, dict) else None
  if not (isinstance(weight_map, dict) and weight_map
          and all(isinstance(v, str) for v in weight_map.values())):
    raise CorruptFileError(f"{index_file}: weight_map: expected an object of tensor names to "
                           f"shard file names, got {brief_repr(weight_map)}")
  folder = os.path.dirname(os.path.abspath(index_file))
  files = []
  for name in dict.fromkeys(weight_map.values()):
    if os.path.basename(name) != name or name in ("", ".", ".."):
      raise CorruptFileError(f"{index_file}: weight_map: expected shard names inside the "
                             f"index's folder, got {brief_repr(name)}")
    files.append(os.path.join(folder, name))
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

  sd = load_torch(path)
  if not isinstance(sd, Mapping):
    raise ValueError(f"{path}: expected a GPT-2 state dict (names to tensors), got "
                     f"{type(sd).__name__} {brief_repr(sd)}")
  return dict(sd)


def read_state_dict(files: list[str]) -> dict[str, Any]:
  """The state dict held by one weights file or by the shards of an index, merged.

  Raises:
    ValueError: a file is unsafe (:class:`ports.torchfile.UnsafeFileError`) or damaged
      (:class:`ports.torchfile.CorruptFileError`), or two shards hold the same name.
  """
  sd: dict[str, Any] = {}
  for path in files:
    part = _read_weights(os.fspath(path))
    twice = sorted(set(part) & set(sd))
    if twice:
      raise CorruptFileError(f"{path}: expected each tensor in one shard, got "
                             f"{brief_repr(twice[0])} in two of them")
    sd.update(part)
  return sd


# ----------------------------------------------------------------------------------------
# State dict -> Flax variables.


def _expected(config: GPT2Config) -> dict[str, tuple[int, ...]]:
  d, f = config.n_embd, config.inner_dim
  exp = {"wte.weight": (config.vocab_size, d), "wpe.weight": (config.n_positions, d),
         "ln_f.weight": (d,), "ln_f.bias": (d,)}
  for i in range(config.n_layer):
    p = f"h.{i}"
    exp.update({
        f"{p}.ln_1.weight": (d,), f"{p}.ln_1.bias": (d,),
        f"{p}.attn.c_attn.weight": (d, 3 * d), f"{p}.attn.c_attn.bias": (3 * d,),
        f"{p}.attn.c_proj.weight": (d, d), f"{p}.attn.c_proj.bias": (d,),
        f"{p}.ln_2.weight": (d,), f"{p}.ln_2.bias": (d,),
        f"{p}.mlp.c_fc.weight": (d, f), f"{p}.mlp.c_fc.bias": (f,),
        f"{p}.mlp.c_proj.weight": (f, d), f"{p}.mlp.c_proj.bias": (d,),
    })
  return exp


def _f32(value: Any) -> np.ndarray:
  if hasattr(value, "detach"):  # a torch tensor handed in by a caller
    value = value.detach().cpu().float().numpy()
  return np.ascontiguousarray(np.asarray(value, dtype=np.float32))


def state_dict_to_params(sd: Mapping[str, Any], config: GPT2Config) -> dict:
  """Maps a Hugging Face GPT-2 state dict onto the variables of
  :class:`ports.gpt2.model.GPT2LMHeadModel`.

  Args:
    sd: name -> array (numpy, or torch tensors), with or without the ``transformer.``
      prefix; ``Conv1D`` weights ``(in, out)``.
    config: the architecture the weights must match.

  Returns:
    ``{'params': ...}`` of float32 numpy arrays; a ``Conv1D`` weight ``W (in, out)``
    becomes the Dense kernel ``W`` unchanged, e.g. ``h.1.mlp.c_proj.weight``
    ``(d_ff, d)`` -> ``params['h_1']['mlp']['c_proj']['kernel']`` ``(d_ff, d)``.

  Raises:
    ValueError: names missing or unexpected, shapes that differ from ``config`` (the
      message lists them), non-finite weights, or an ``lm_head.weight`` that differs from
      ``wte.weight`` (an untied head).

  Example:
    >>> import numpy as np
    >>> cfg = GPT2Config(vocab_size=5, n_positions=4, n_embd=4, n_layer=1, n_head=2)
    >>> sd = {k: np.zeros(s, np.float32) for k, s in _expected(cfg).items()}
    >>> p = state_dict_to_params(sd, cfg)["params"]
    >>> p["h_0"]["mlp"]["c_proj"]["kernel"].shape, p["ln_f"]["scale"].shape
    ((16, 4), (4,))
  """
  where = "GPT-2 state dict"
  if isinstance(sd, Mapping):  # bfloat16 (a numpy 'V' kind) is widened before the checks
    sd = {k: v.astype(np.float32) if isinstance(v, np.ndarray) and v.dtype == _BF16 else v
          for k, v in sd.items()}
  validate_state_dict(sd, where)
  flat: dict[str, Any] = {}
  for key, value in sd.items():
    name = key[len("transformer."):] if key.startswith("transformer.") else key
    if name in flat:
      raise ValueError(f"{where}: expected one of {key!r} and {name!r}, got both")
    flat[name] = value
  head = flat.pop("lm_head.weight", None)
  exp = _expected(config)
  missing = [k for k in exp if k not in flat]
  unexpected = [k for k in flat if k not in exp and not _BUFFER.fullmatch(k)]
  bad = [f"{k}: expected {exp[k]}, got {tuple(np.shape(flat[k]))}"
         for k in exp if k in flat and tuple(np.shape(flat[k])) != exp[k]]
  problems = []
  if missing:
    problems.append(f"missing {len(missing)} names (e.g. {missing[:6]})")
  if unexpected:
    problems.append(f"unexpected {len(unexpected)} names (e.g. {unexpected[:6]})")
  if bad:
    problems.append(f"{len(bad)} shape mismatches (e.g. {bad[:4]})")
  if problems:
    raise ValueError(f"{where}: expected the GPT-2 of {config} (names and shapes), got "
                     + "; ".join(problems) + f"; names found: {shown_keys(flat)}")
  for k in exp:
    check_finite(k, flat[k], where)
  wte = _f32(flat["wte.weight"])
  if head is not None:
    lm_head = _f32(head)
    if lm_head.shape != wte.shape or not np.array_equal(lm_head, wte):
      raise ValueError(f"{where}: lm_head.weight: expected the tied token embedding "
                       f"wte.weight {wte.shape}, got a different matrix of shape "
                       f"{lm_head.shape} (untied heads are not supported)")

  def dense(prefix):
    return {"kernel": _f32(flat[f"{prefix}.weight"]), "bias": _f32(flat[f"{prefix}.bias"])}

  def norm(prefix):
    return {"scale": _f32(flat[f"{prefix}.weight"]), "bias": _f32(flat[f"{prefix}.bias"])}

  params: dict[str, Any] = {"wte": {"embedding": wte},
                            "wpe": {"embedding": _f32(flat["wpe.weight"])},
                            "ln_f": norm("ln_f")}
  for i in range(config.n_layer):
    p = f"h.{i}"
    params[f"h_{i}"] = {
        "ln_1": norm(f"{p}.ln_1"), "ln_2": norm(f"{p}.ln_2"),
        "attn": {"c_attn": dense(f"{p}.attn.c_attn"), "c_proj": dense(f"{p}.attn.c_proj")},
        "mlp": {"c_fc": dense(f"{p}.mlp.c_fc"), "c_proj": dense(f"{p}.mlp.c_proj")},
    }
  return {"params": params}


# ----------------------------------------------------------------------------------------
# Conversion and loading.


def _source_info(path: str) -> dict:
  return {"file": os.path.basename(path), "sha256": _io.sha256_file(path),
          "bytes": os.path.getsize(path)}


def convert_gpt2(src: str | os.PathLike, out_dir: str | os.PathLike, *,
                 force: bool = False) -> str:
  """Converts a Hugging Face GPT-2 checkpoint into a Flax checkpoint directory.

  Args:
    src: a ``save_pretrained`` folder (``config.json`` plus ``model.safetensors``,
      ``pytorch_model.bin`` or sharded weights with their index), or one of its weight
      files (see :func:`checkpoint_files`).
    out_dir: destination directory (an orbax checkpoint plus JSON config), written
      atomically. An existing one is replaced only when it is a converted checkpoint (or
      empty; any kind with ``force``), and never when it holds the source.
    force: replace an existing ``out_dir`` of another kind.

  Returns:
    ``out_dir`` as an absolute path.

  Raises:
    FileNotFoundError: no weights or no ``config.json``.
    ValueError: the config is not GPT-2, the weights do not match it, or a file is unsafe
      (:class:`ports.torchfile.UnsafeFileError`: a pickle naming anything but tensor
      constructors, refused before it runs) or damaged
      (:class:`ports.torchfile.CorruptFileError`, e.g. a safetensors header pointing past
      the end of the file).
  """
  src = os.fspath(src)
  _io.check_output(out_dir, "converted", force=force, protect=(src,))
  files, config_file = checkpoint_files(src)
  config = read_hf_config(config_file)
  sd = read_state_dict(files)
  dtypes = sorted({str(np.asarray(v).dtype) for v in sd.values()})
  variables = state_dict_to_params(sd, config)
  meta = {"architecture": ARCHITECTURE, "format_version": FORMAT_VERSION,
          **config.to_dict(), "inner_dim": config.inner_dim,
          "source": {"config": _source_info(config_file),
                     "weights": [_source_info(f) for f in files],
                     "format": "safetensors" if files[0].endswith(".safetensors") else "torch",
                     "dtypes": dtypes}}
  return _io.save_tree(out_dir, variables, meta, kind="converted", force=force,
                       protect=(src,))


def load_gpt2(path: str | os.PathLike) -> tuple[GPT2LMHeadModel, dict, dict]:
  """Loads a checkpoint written by :func:`convert_gpt2`.

  Returns:
    ``(module, variables, config)``: the :class:`ports.gpt2.model.GPT2LMHeadModel`, its
    variables ``{'params': ...}`` (jax arrays) and the JSON config;
    ``module.apply(variables, ids)`` maps ``(N, T)`` token ids to ``(N, T, V)`` logits.

  Raises:
    FileNotFoundError: ``path`` is not a complete checkpoint.
    ValueError: the checkpoint is not a GPT-2 conversion, or its config is damaged.
  """
  import jax
  import jax.numpy as jnp

  tree, meta = _io.load_tree(path)
  if meta.get("architecture") != ARCHITECTURE:
    raise ValueError(f"{os.fspath(path)}: architecture: expected {ARCHITECTURE!r}, "
                     f"got {meta.get('architecture')!r}")
  try:
    config = GPT2Config.from_dict(meta)
  except ValueError as e:
    raise ValueError(f"{os.fspath(path)}: {e}; the checkpoint is damaged: convert it "
                     "again") from None
  return GPT2LMHeadModel(config), jax.tree_util.tree_map(jnp.asarray, tree), meta
