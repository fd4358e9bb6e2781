"""Ports of pretrained generators from PyTorch checkpoints to Flax.

``ports.torchfile`` reads PyTorch and NVIDIA checkpoint files without torch and without
running code stored in them; ``ports.dcgan`` and ``ports.stylegan2`` hold the Flax models
and their converters. :func:`load_converted` opens any converted checkpoint.
"""

from __future__ import annotations

import os
from typing import Any

__all__ = ["detect_format", "load_converted", "read_config"]


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


def load_converted(path: str | os.PathLike) -> tuple[Any, Any, dict]:
  """Loads a converted checkpoint, whatever its architecture.

  Args:
    path: a directory written by ``ports.dcgan.convert_dcgan`` or a ``ports.stylegan2``
      converter.

  Returns:
    ``(module, variables, config)``: a Flax Linen module, its variables and the config.

  Raises:
    ValueError: the config names an architecture no port provides.
  """
  arch = read_config(path).get("architecture")
  if arch == "dcgan":
    from ports.dcgan import load_dcgan
    return load_dcgan(path)
  if arch == "stylegan2":
    from ports.stylegan2 import load_stylegan2
    return load_stylegan2(path)
  raise ValueError(
      f"{os.fspath(path)}: architecture: expected 'dcgan' or 'stylegan2', got {arch!r}")


def detect_format(path: str | os.PathLike) -> str:
  """Guesses a checkpoint's format from its content: 'dcgan', 'rosinality' or 'nvidia'.

  A plain pickle (neither a torch zip archive nor the legacy torch format) holding
  network objects is an NVIDIA snapshot; a ``torch.save`` dict with ``g_ema`` is a
  rosinality StyleGAN2 checkpoint; one with ``netG_state_dict`` or ``main.0.weight`` is
  a DCGAN generator. The file is read with :mod:`ports.torchfile` (no code runs).

  Raises:
    ValueError: the content matches none of these.
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
  inner = obj.get("netG_state_dict", obj.get("state_dict", obj))
  if isinstance(inner, dict) and any(
      k in inner for k in ("main.0.weight", "module.main.0.weight")):
    return "dcgan"
  keys = sorted(map(str, obj))[:8]
  raise ValueError(f"{source}: cannot tell the checkpoint format: expected NVIDIA network "
                   f"objects, a 'g_ema' entry or DCGAN 'main.N' weights, found keys {keys}; "
                   "pass --format")
