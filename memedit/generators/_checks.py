"""Eager checks of the workflow's inputs: image numbers, canvas masks, key units, learning
rates and batch sizes, each raising a ValueError that says what was expected and what was
given before any work is done."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from memedit.specs import MAX_IMAGES


def _is_int(value: Any) -> bool:
  return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _shown(value: Any) -> str:
  """repr of a value, numpy scalars as their Python value (1.5, not np.float64(1.5))."""
  return repr(value.item() if isinstance(value, np.generic) else value)


def check_imgnum(value: Any, where: str = "imgnum") -> int:
  """An image number as a Python int: an integer 0 <= i < :data:`memedit.specs.MAX_IMAGES`.

  Args:
    value: the image number. where: its name in error messages.

  Returns:
    The image number.

  Raises:
    ValueError: not an integer (a float, a bool) or out of range.

  Example:
    >>> check_imgnum(1.5)
    Traceback (most recent call last):
    ...
    ValueError: imgnum: expected an integer image number, got 1.5
  """
  if not _is_int(value):
    raise ValueError(f"{where}: expected an integer image number, got {_shown(value)}")
  if not 0 <= int(value) < MAX_IMAGES:
    raise ValueError(f"{where}: expected an image number 0 <= i < {MAX_IMAGES} "
                     f"(memedit.specs.MAX_IMAGES), got {int(value)}")
  return int(value)


def image_numbers(imgnums: Any, where: str = "imgnums") -> np.ndarray:
  """Image numbers as an (n,) int64 array: an int n >= 0 (images 0..n-1, e.g. the samples
  of statistics) or a sequence of integer image numbers i >= 0 (image i's latent is
  drawn with the i before it, so a very large i needs that much memory; the workflow's
  single image numbers are bounded by :func:`check_imgnum`).

  Args:
    imgnums: the int or the sequence. where: its name in error messages.

  Returns:
    (n,) int64.

  Raises:
    ValueError: a bool, a float or another non-integer, or a number out of range.

  Example:
    >>> image_numbers(3).tolist(), image_numbers([4, 0]).tolist()
    ([0, 1, 2], [4, 0])
  """
  if _is_int(imgnums):
    n = int(imgnums)
    if n < 0:
      raise ValueError(f"{where}: expected a number of images n >= 0, got {n}")
    return np.arange(n, dtype=np.int64)
  if isinstance(imgnums, (str, bytes)) or np.ndim(imgnums) == 0:
    raise ValueError(f"{where}: expected an int n or a sequence of integer image numbers, "
                     f"got {_shown(imgnums)}")
  arr = np.asarray(imgnums)
  if arr.size == 0:
    return np.zeros(0, np.int64)
  if arr.dtype.kind not in "iu":
    for v in np.asarray(imgnums, dtype=object).reshape(-1):
      if not _is_int(v):
        raise ValueError(f"{where}: expected an integer image number, got {_shown(v)}")
    arr = np.asarray(np.asarray(imgnums, dtype=object).reshape(-1).tolist(), np.int64)
  nums = arr.reshape(-1)
  if (nums < 0).any():
    raise ValueError(f"{where}: expected image numbers i >= 0, got {int(nums[nums < 0][0])}")
  return nums.astype(np.int64)


def check_mask(mask: Any, canvas: int, where: str = "mask") -> np.ndarray:
  """A canvas mask as float32 (canvas, canvas) after checking its shape and values.

  Args:
    mask: (R, R) array in [0, 1] with R the canvas resolution.
    canvas: R. where: its name in error messages.

  Returns:
    The mask as a float32 numpy array.

  Raises:
    ValueError: another shape, a non-numeric array, or a value that is NaN, infinite,
      negative or above 1.

  Example:
    >>> check_mask(np.ones((4, 4)), 8)
    Traceback (most recent call last):
    ...
    ValueError: mask: expected shape (8, 8) (the canvas), got (4, 4)
  """
  arr = np.asarray(mask)
  if arr.shape != (canvas, canvas):
    raise ValueError(f"{where}: expected shape {(canvas, canvas)} (the canvas), got "
                     f"{arr.shape}")
  if arr.dtype.kind not in "biuf":
    raise ValueError(f"{where}: expected a numeric array, got dtype {arr.dtype}")
  m = arr.astype(np.float32)
  bad = ~((m >= 0) & (m <= 1))
  if bad.any():
    v = m[bad].reshape(-1)[0]
    raise ValueError(f"{where}: expected values in [0, 1], got {float(v)!r} (at "
                     f"{tuple(int(i) for i in np.argwhere(bad)[0])})")
  return m


def check_units(units: Any, key_dim: int) -> np.ndarray:
  """Key units (channels) as an (n,) int64 array of distinct integers 0 <= u < key_dim.

  Args:
    units: a sequence of unit indices. key_dim: the layer's C_in.

  Returns:
    (n,) int64, n >= 1.

  Raises:
    ValueError: none, a non-integer, one out of range, or a repeated unit.

  Example:
    >>> check_units([7], 5)
    Traceback (most recent call last):
    ...
    ValueError: units: expected integers 0 <= unit < 5, got 7
  """
  if isinstance(units, (str, bytes)) or np.ndim(units) != 1:
    raise ValueError(f"units: expected a sequence of integers 0 <= unit < {key_dim}, got "
                     f"{units!r}")
  items = list(units)
  if not items:
    raise ValueError("units: expected at least one unit, got none")
  for u in items:
    if not _is_int(u) or not 0 <= int(u) < key_dim:
      raise ValueError(f"units: expected integers 0 <= unit < {key_dim}, got {_shown(u)}")
  out = np.asarray([int(u) for u in items], np.int64)
  values, counts = np.unique(out, return_counts=True)
  if (counts > 1).any():
    raise ValueError(f"units: expected distinct units, got {int(values[counts > 1][0])} "
                     f"{int(counts[counts > 1][0])} times")
  return out


def check_learning_rate(value: Any) -> float:
  """A learning rate as a float: a finite positive number.

  Raises:
    ValueError: a bool, a non-number, NaN, ±inf, zero or a negative number.

  Example:
    >>> check_learning_rate(-1.0)
    Traceback (most recent call last):
    ...
    ValueError: learning_rate: expected a finite positive number, got -1.0
  """
  ok = (isinstance(value, (int, float, np.integer, np.floating))
        and not isinstance(value, (bool, np.bool_)))
  if not ok or not (math.isfinite(float(value)) and float(value) > 0):
    raise ValueError(f"learning_rate: expected a finite positive number, got {_shown(value)}")
  return float(value)


def check_batch_size(value: Any, where: str = "batch_size") -> int:
  """A batch size (latents per compiled call) as a Python int: a positive integer.

  Args:
    value: the batch size. where: its name in error messages.

  Returns:
    The batch size.

  Raises:
    ValueError: a bool, a float or another non-integer, zero or a negative number.

  Example:
    >>> check_batch_size(0)
    Traceback (most recent call last):
    ...
    ValueError: batch_size: expected a positive int, got 0
  """
  if not _is_int(value) or int(value) < 1:
    raise ValueError(f"{where}: expected a positive int, got {_shown(value)}")
  return int(value)
