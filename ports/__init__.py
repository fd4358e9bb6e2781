"""Ports of pretrained generators from PyTorch checkpoints to Flax.

``ports.torchfile`` reads PyTorch and NVIDIA checkpoint files without torch and without
running code stored in them; ``ports.dcgan`` and ``ports.stylegan2`` hold the Flax models
and their converters, ``ports.gpt2`` the GPT-2 language model and its converter from
Hugging Face checkpoints. :func:`load_converted` opens any converted checkpoint.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import numpy as np

__all__ = ["check_finite", "check_variables", "detect_format", "find_generator_entry",
           "load_converted", "read_config", "shown_keys", "strip_module_prefix", "to_numpy",
           "validate_state_dict"]

# Config fields each architecture's loader needs, all positive integers ("channels" a
# list of them).
_CONFIG_FIELDS = {
    "dcgan": ("resolution", "z_dim", "ngf", "image_channels", "num_layers"),
    "stylegan2": ("resolution", "z_dim", "w_dim", "n_mlp", "num_layers", "channels"),
    "gpt2": ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"),
}


def shown_keys(mapping: Mapping, n: int = 8) -> str:
  """The first ``n`` keys of a mapping, sorted by their text, for error messages (keys of
  any types, e.g. the int and str keys of a damaged checkpoint)."""
  from ports.torchfile import brief_repr

  keys = sorted((brief_repr(k, 0) for k in mapping), key=str)
  return "[" + ", ".join(keys[:n]) + (f", ... {len(keys)} in all]" if len(keys) > n else "]")


def to_numpy(value: Any) -> Any:
  """A torch tensor handed in by a caller as a numpy array (on the CPU, detached); dtypes
  numpy lacks (bfloat16, float8) are widened to float32, which holds them exactly.
  Anything else is returned as it is."""
  if not hasattr(value, "detach"):
    return value
  t = value.detach().cpu()
  try:
    return t.numpy()
  except TypeError:  # "Got unsupported ScalarType BFloat16" and the like
    if not t.is_floating_point():
      raise
    return t.float().numpy()


#: Name prefixes that wrappers put before every name of a model's state dict:
#: ``torch.nn.DataParallel`` / ``DistributedDataParallel`` and ``torch.compile``.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def strip_module_prefix(sd: Any) -> Any:
  """A state dict without the prefixes wrappers put before every name: ``module.``
  (``DataParallel``, ``DistributedDataParallel``) and ``_orig_mod.`` (``torch.compile``),
  in any nesting (``module._orig_mod.conv1.weight`` -> ``conv1.weight``). A prefix is
  removed only when every name carries it; anything else (or not a mapping) is returned
  as it is.

  Example:
    >>> strip_module_prefix({"module.a.weight": 1, "module._orig_mod.b": 2})
    {'a.weight': 1, '_orig_mod.b': 2}
    >>> strip_module_prefix({"_orig_mod.module.a": 1})
    {'a': 1}
  """
  while isinstance(sd, Mapping) and sd:
    prefix = next((p for p in _WRAPPER_PREFIXES
                   if all(isinstance(k, str) and k.startswith(p) for k in sd)), None)
    if prefix is None:
      break
    sd = {k[len(prefix):]: v for k, v in sd.items()}
  return sd


def _numeric(dtype: np.dtype) -> bool:
  """Whether a state dict may hold arrays of ``dtype``: booleans, integers and floats,
  including the ``ml_dtypes`` floats torch files store (bfloat16, float8), whose numpy
  kind is 'V' for some of them."""
  if dtype.kind in "biuf":
    return True
  if dtype.kind != "V" or dtype.fields is not None:
    return False
  try:
    import ml_dtypes
    ml_dtypes.finfo(dtype)
  except (ImportError, ValueError, TypeError):
    return False
  return True


def validate_state_dict(sd: Any, where: str) -> Mapping[str, Any]:
  """Checks that ``sd`` is a state dict: a mapping from str names to numeric arrays
  (numpy arrays or scalars of bool, int or float dtypes, bfloat16 and float8 included,
  or tensors handed in by a caller).

  Args:
    sd: the candidate state dict.
    where: what it is, for error messages (e.g. ``"rosinality checkpoint: 'g_ema'"``).

  Returns:
    ``sd``.

  Raises:
    ValueError: ``sd`` is not a mapping, a key is not a str, or a value is not a numeric
      array; the message names the key.
  """
  from ports.torchfile import brief_repr

  if not isinstance(sd, Mapping):
    raise ValueError(f"{where}: expected a state dict (names to tensors), got "
                     f"{type(sd).__name__} {brief_repr(sd)}")
  for name, value in sd.items():
    if not isinstance(name, str):
      raise ValueError(f"{where}: expected a state dict with str names, got the "
                       f"{type(name).__name__} key {brief_repr(name)} among {shown_keys(sd)}")
    if hasattr(value, "detach"):  # a torch tensor handed in by a caller
      continue
    if not isinstance(value, (np.ndarray, np.generic)) or not _numeric(value.dtype):
      got = (f"an array of {value.dtype}" if isinstance(value, (np.ndarray, np.generic))
             else f"{type(value).__name__} {brief_repr(value)}")
      raise ValueError(f"{where}: {name}: expected a numeric tensor, got {got}")
  return sd


def check_finite(name: str, value: Any, where: str) -> None:
  """Refuses a parameter holding NaN or infinite values (after a float32 cast, so that
  float64 values beyond float32's range count as infinite).

  Raises:
    ValueError: naming the parameter and how many values are NaN or infinite.
  """
  value = to_numpy(value)
  with np.errstate(over="ignore", invalid="ignore"):
    a = np.asarray(value, np.float32)
  finite = np.isfinite(a)
  if not finite.all():
    nan = int(np.isnan(a).sum())
    raise ValueError(f"{where}: {name}: expected finite weights, got {nan} NaN and "
                     f"{a.size - int(finite.sum()) - nan} infinite of {a.size} values")


def check_variables(module: Any, variables: Any, inputs: tuple, where: str) -> None:
  """Checks loaded variables against those ``module.init(key, *inputs)`` makes (found
  by shape alone, nothing is computed): the same names, shapes and dtypes, so that a
  checkpoint whose arrays do not fit its config fails here, by name, instead of inside
  the model.

  Args:
    module: the Flax Linen module the config describes.
    variables: the loaded variables (nested dicts of arrays).
    inputs: example inputs of ``module.init`` (arrays or ``jax.ShapeDtypeStruct``).
    where: the checkpoint, for error messages.

  Raises:
    ValueError: a variable is missing or unexpected, or has another shape or dtype; the
      message names it.
  """
  import jax

  def leaves(tree):
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path): leaf
            for path, leaf in flat}

  want = leaves(jax.eval_shape(lambda *xs: module.init(jax.random.key(0), *xs), *inputs))
  got = leaves(variables)
  missing = sorted(set(want) - set(got))
  extra = sorted(set(got) - set(want))
  if missing or extra:
    problems = [f"{len(names)} {what} {names[:4]}"
                for what, names in (("missing", missing), ("unexpected", extra)) if names]
    raise ValueError(f"{where}: expected the variables its config describes, got "
                     f"{' and '.join(problems)}; the checkpoint is damaged: convert it again")
  for name, spec in want.items():
    leaf = got[name]
    shape = tuple(np.shape(leaf))
    dtype = np.dtype(leaf.dtype if hasattr(leaf, "dtype") else np.asarray(leaf).dtype)
    if shape != tuple(spec.shape) or dtype != spec.dtype:
      raise ValueError(f"{where}: {name}: expected shape {tuple(spec.shape)} and dtype "
                       f"{spec.dtype} (from its config), got shape {shape} and dtype {dtype}; "
                       "the checkpoint is damaged: convert it again")


def read_config(path: str | os.PathLike) -> dict:
  """The JSON config stored with a converted checkpoint directory."""
  from memedit import _io

  meta_file = os.path.join(os.fspath(path), _io._META_FILE)
  if not os.path.isfile(meta_file):
    raise FileNotFoundError(f"{os.fspath(path)}: not a converted checkpoint "
                            f"(expected {_io._META_FILE} inside it)")
  config = _io.read_json(meta_file)
  if not isinstance(config, dict):
    raise ValueError(f"{meta_file}: expected a JSON object, got {type(config).__name__}")
  return config


def _check_config(config: dict, path: str) -> None:
  """Checks the fields the architecture's loader needs before anything is built."""
  from memedit import _io

  meta_file = os.path.join(path, _io._META_FILE)
  arch = config.get("architecture")
  for field in _CONFIG_FIELDS.get(arch, ()):
    value = config.get(field)
    items = value if field == "channels" and isinstance(value, list) and value else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in items):
      got = "nothing (the field is missing)" if field not in config else repr(value)[:60]
      want = "a list of positive integers" if field == "channels" else "a positive integer"
      raise ValueError(f"{meta_file}: {field}: expected {want}, got {got}; the checkpoint "
                       "is damaged or incomplete: convert it again")


def load_converted(path: str | os.PathLike) -> tuple[Any, Any, dict]:
  """Loads a converted checkpoint, whatever its architecture.

  Args:
    path: a directory written by ``ports.dcgan.convert_dcgan``, a ``ports.stylegan2``
      converter or ``ports.gpt2.convert_gpt2``.

  Returns:
    ``(module, variables, config)``: a Flax Linen module, its variables and the config.

  Raises:
    ValueError: the config names an architecture no port provides, or lacks a field its
      loader needs (e.g. ``z_dim``).
  """
  config = read_config(path)
  _check_config(config, os.fspath(path))
  arch = config.get("architecture")
  if arch == "dcgan":
    from ports.dcgan import load_dcgan
    return load_dcgan(path)
  if arch == "stylegan2":
    from ports.stylegan2 import load_stylegan2
    return load_stylegan2(path)
  if arch == "gpt2":
    from ports.gpt2 import load_gpt2
    return load_gpt2(path)
  raise ValueError(f"{os.fspath(path)}: architecture: expected 'dcgan', 'stylegan2' or "
                   f"'gpt2', got {arch!r}")


def detect_format(path: str | os.PathLike) -> str:
  """Guesses a checkpoint's format from its content: 'dcgan', 'rosinality' or 'nvidia'.

  A plain pickle (neither a torch zip archive nor the legacy torch format) holding
  network objects is an NVIDIA snapshot; a ``torch.save`` dict with ``g_ema`` is a
  rosinality StyleGAN2 checkpoint; one with ``netG_state_dict`` or ``main.0.weight`` is
  a DCGAN generator (names may carry the ``module.`` / ``_orig_mod.`` prefixes of
  wrappers); so is a training checkpoint with one entry holding a complete DCGAN or
  rosinality generator state dict (:func:`find_generator_entry`). The file is read with
  :mod:`ports.torchfile` (no code runs).

  Raises:
    ValueError: the content matches none of these, or two entries hold generators (the
      message names them; GPT-2 weights are named as such:
      :func:`ports.gpt2.convert_gpt2` converts their folder).
  """
  from ports import torchfile

  obj = torchfile.load_any(path)
  source = os.fspath(path)
  if not isinstance(obj, dict):
    raise ValueError(f"{source}: expected a checkpoint dict, got {type(obj).__name__}")
  if any(isinstance(v, torchfile.NvidiaModule) for v in obj.values()):
    return "nvidia"
  if "g_ema" in obj:
    return "rosinality"
  inner = strip_module_prefix(obj.get("netG_state_dict", obj.get("state_dict", obj)))
  if isinstance(inner, Mapping) and "main.0.weight" in inner:
    return "dcgan"
  from ports.dcgan.convert import check_state_dict, find_state_dict_entry
  from ports.stylegan2.rosinality import _is_generator_quiet, find_rosinality_entry

  dcgan_sd, _ = find_state_dict_entry(obj, f"{source}: DCGAN checkpoint")
  try:  # one entry holds a complete DCGAN generator (training checkpoints)
    check_state_dict(dcgan_sd)
    return "dcgan"
  except ValueError:
    pass
  ros_sd, _ = find_rosinality_entry(obj, f"{source}: rosinality checkpoint")
  if _is_generator_quiet(ros_sd):
    return "rosinality"
  keys = sorted(map(str, obj))[:8]
  if isinstance(inner, Mapping) and any(k in inner for k in ("wte.weight",
                                                             "transformer.wte.weight")):
    raise ValueError(f"{source}: expected a generator checkpoint (NVIDIA, rosinality or "
                     f"DCGAN), got GPT-2 weights (found keys {keys}); convert the Hugging "
                     "Face folder holding them (`memedit convert FOLDER OUT`, or "
                     "ports.gpt2.convert_gpt2(folder, out))")
  raise ValueError(f"{source}: cannot tell the checkpoint format: expected NVIDIA network "
                   f"objects, a 'g_ema' entry or DCGAN 'main.N' weights, found keys {keys}; "
                   "pass --format")


def find_generator_entry(obj: Any, accepts, *, preferred: tuple[str, ...] = (),
                         what: str = "generator", where: str = "checkpoint"
                         ) -> tuple[Any, str | None]:
  """The generator's state dict inside a checkpoint saved the ways users save them.

  Looked for, in this order: ``obj`` itself; the first of the ``preferred`` entries
  (e.g. ``'g_ema'``) that ``accepts`` takes; else every nested dict (two levels deep)
  and every group of names sharing a first component (a Lightning module's
  ``{'state_dict': {'generator.main.0.weight': ...}}``) that ``accepts`` takes.
  ``module.`` / ``_orig_mod.`` wrapper prefixes are removed first.

  Args:
    obj: the loaded checkpoint.
    accepts: ``accepts(sd) -> bool``, whether a mapping (prefixes removed) is a complete
      state dict of the generator.
    preferred: entry names that hold the generator by convention.
    what: the generator, for error messages (e.g. ``'DCGAN generator'``).
    where: the checkpoint, for error messages (e.g. its file name).

  Returns:
    ``(state dict, entry)``: ``entry`` describes where it was found (``None`` for ``obj``
    itself). When nothing is found, the first ``preferred`` entry present (else ``obj``)
    is returned as it is, prefixes removed, for the caller's checks to describe.

  One state dict saved under several entries (``torch.save({'g': sd, 'g_ema': sd})``,
  or two dicts of the same tensor objects) is one generator, found at its first entry.

  Raises:
    ValueError: two or more entries are different generator state dicts (the message
      names them).
  """
  def ok(sd):
    try:
      return isinstance(sd, Mapping) and bool(sd) and bool(accepts(sd))
    except (ValueError, TypeError):
      return False

  top = strip_module_prefix(obj)
  if ok(top):
    return top, None
  present = [k for k in preferred if isinstance(obj, Mapping) and k in obj]
  for key in present:
    if ok(strip_module_prefix(obj[key])):
      return strip_module_prefix(obj[key]), repr(key)
  found: list[tuple[str, Any]] = []

  def visit(node, path, depth):
    if not isinstance(node, Mapping) or depth > 2:
      return
    if path and ok(strip_module_prefix(node)):
      found.append((path, strip_module_prefix(node)))
      return
    groups: dict[str, dict] = {}
    for k, v in node.items():
      if isinstance(v, Mapping):
        visit(v, f"{path}[{k!r}]" if path else repr(k), depth + 1)
      elif isinstance(k, str) and "." in k:
        head, _, rest = k.partition(".")
        groups.setdefault(head, {})[rest] = v
    if groups:
      for head, sd in groups.items():
        if ok(strip_module_prefix(sd)):
          name = f"names under {head + '.'!r}"
          name = f"{path} ({name})" if path else name
          found.append((name, strip_module_prefix(sd)))

  visit(obj, "", 0)
  found = [(name, sd) for i, (name, sd) in enumerate(found)
           if not any(_same_state_dict(sd, earlier) for _, earlier in found[:i])]
  if len(found) > 1:
    raise ValueError(f"{where}: expected one {what}, got {len(found)}: "
                     f"{', '.join(name for name, _ in found[:6])}; save the one to convert "
                     "alone (torch.save(that_state_dict, path)) and convert that file")
  if found:
    return found[0][1], found[0][0]
  if present and isinstance(obj[present[0]], Mapping):  # for the caller to describe
    return strip_module_prefix(obj[present[0]]), repr(present[0])
  return top, None


def _same_state_dict(a: Mapping, b: Mapping) -> bool:
  """Whether two state dicts are one saved twice: the same object, or the same names
  bound to the same tensor objects (a copy of the dict, or one with wrapper prefixes)."""
  return a is b or (a.keys() == b.keys() and all(a[k] is b[k] for k in a))
