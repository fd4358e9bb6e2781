"""Pieces the StyleGAN2 checkpoint converters share (:mod:`ports.stylegan2.convert`).

Torch → Flax weight layouts (:func:`dense_kernel`, :func:`conv_kernel`, :func:`to_float32`)
and the checks every state dict passes before it is mapped: names and shapes against the
architecture a config describes (:func:`check_keys`, :func:`tensor_shape`), finite values
(:func:`check_finite_tensors`) and the [1,3,3,1] resampling filters (:func:`check_filters`);
plus the format version and the source-file record written into every converted config.
"""

from __future__ import annotations

import os
import re
from typing import Any, Mapping

import numpy as np

from memedit import _io
from ports import check_finite, shown_keys, to_numpy

__all__ = ["BLUR", "FORMAT_VERSION", "check_filters", "check_finite_tensors",
           "check_float_tensors", "check_keys",
           "conv_kernel", "count_indices", "dense_kernel", "source_info", "tensor_shape",
           "to_float32"]

#: Version of the converted config this converter writes.
FORMAT_VERSION = 1
#: The resampling filter taps of both flavours (the [1,3,3,1] binomial).
BLUR = (1.0, 3.0, 3.0, 1.0)


def to_float32(value: Any) -> np.ndarray:
  """A float32 numpy copy of an array-like (numpy, or a torch tensor of any float dtype)."""
  return np.array(to_numpy(value), dtype=np.float32)


def _blur_2d(gain: float) -> np.ndarray:
  k = np.asarray(BLUR, np.float64)
  k2 = np.outer(k, k)
  return (k2 / k2.sum() * gain).astype(np.float32)


def tensor_shape(flavour: str, sd: Mapping[str, Any], key: str, ndim: int, what: str
                 ) -> tuple[int, ...]:
  """The shape of ``sd[key]`` after checking it exists and has ``ndim`` axes."""
  if key not in sd:
    raise ValueError(f"{flavour} StyleGAN2 state dict: expected {key!r} ({what}), not found "
                     f"among {shown_keys(sd)}")
  shape = tuple(int(n) for n in np.shape(sd[key]))
  if len(shape) != ndim:
    raise ValueError(f"{flavour} StyleGAN2 state dict: {key}: expected a {ndim}-d tensor "
                     f"({what}), got shape {shape}")
  return shape


def check_finite_tensors(flavour: str, sd: Mapping[str, Any], keys) -> None:
  """Refuses NaN or infinite values in ``sd[k]`` for each ``k`` of ``keys``
  (:func:`ports.check_finite`, naming the flavour's state dict)."""
  for k in keys:
    check_finite(k, sd[k], f"{flavour} StyleGAN2 state dict")


def check_float_tensors(flavour: str, sd: Mapping[str, Any], keys) -> None:
  """Refuses weights ``sd[k]`` that are not floating-point (e.g. the int8 of a quantised or
  damaged checkpoint), which a float32 cast would silently turn into other weights."""
  for k in keys:
    value = sd[k]
    if hasattr(value, "detach"):  # a torch tensor handed in by a caller
      floating, dtype = value.is_floating_point(), value.dtype
    else:  # numpy; kind 'V' is one of the ml_dtypes floats (bfloat16, float8)
      dtype = np.asarray(value).dtype
      floating = dtype.kind in "fV"
    if not floating:
      raise ValueError(f"{flavour} StyleGAN2 state dict: {k}: expected floating-point "
                       f"weights, got {dtype} (quantised or damaged checkpoints are not "
                       "supported)")


def check_keys(flavour: str, sd: Mapping[str, Any], expected: dict[str, tuple[int, ...]],
               ignore: tuple[str, ...] = ()) -> None:
  """Raises ValueError listing missing/unexpected keys and shape mismatches."""
  problems = []
  missing = [k for k in expected if k not in sd]
  unexpected = [k for k in sd if k not in expected and not k.startswith(ignore)]
  if missing:
    problems.append(f"missing {len(missing)} keys (e.g. {missing[:6]})")
  if unexpected:
    problems.append(f"unexpected {len(unexpected)} keys (e.g. {unexpected[:6]})")
  bad = [f"{k}: expected {expected[k]}, got {tuple(np.shape(sd[k]))}"
         for k in expected if k in sd and tuple(np.shape(sd[k])) != tuple(expected[k])]
  if bad:
    problems.append(f"{len(bad)} shape mismatches (e.g. {bad[:4]})")
  if problems:
    raise ValueError(f"{flavour} StyleGAN2 state dict: architecture not recognised: "
                     + "; ".join(problems))


def check_filters(flavour: str, sd: Mapping[str, Any], keys: list[str], gain: float):
  """Refuses a resampling filter ``sd[k]`` (``k`` in ``keys``) other than the [1,3,3,1]
  filter outer(k, k) / sum(outer(k, k)) · ``gain``."""
  want = _blur_2d(gain)
  for k in keys:
    got = to_float32(sd[k])
    if got.shape != want.shape or not np.allclose(got, want, rtol=1e-6, atol=1e-7):
      raise ValueError(f"{flavour} StyleGAN2: {k}: expected the [1,3,3,1] filter "
                       f"{want.round(5).tolist()}, got {got.round(5).tolist()}")


def count_indices(sd: Mapping[str, Any], pattern: str) -> int:
  """How many distinct values the first group of ``pattern`` takes over the names of
  ``sd`` (e.g. the layers ``style.N.weight``)."""
  rx = re.compile(pattern)
  return len({m.group(1) for k in sd if (m := rx.fullmatch(k))})


def dense_kernel(weight: Any) -> np.ndarray:
  """torch (out, in) → Flax (in, out)."""
  return np.ascontiguousarray(to_float32(weight).T)


def conv_kernel(weight: Any) -> np.ndarray:
  """torch (C_out, C_in, kh, kw) (optionally with a leading 1) → HWIO."""
  w = to_float32(weight)
  if w.ndim == 5:
    w = w[0]
  return np.ascontiguousarray(w.transpose(2, 3, 1, 0))


def source_info(src_path: str | os.PathLike) -> dict:
  """The record of a converted file kept in the config: name, sha256, size."""
  return {"file": os.path.basename(os.fspath(src_path)),
          "sha256": _io.sha256_file(src_path), "bytes": os.path.getsize(src_path)}
