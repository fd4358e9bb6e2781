"""Pictures of a generator's images: uint8 conversion, side-by-side grids, PNG files.

Images are NHWC float arrays with values in about [-1, 1] (a generator's output); pixels
are ``round((x + 1) · 127.5)`` clipped to [0, 255].
"""

from __future__ import annotations

import io
import os
from typing import Any

import numpy as np

from memedit import _io

__all__ = ["comparison_grid", "save_png", "to_uint8"]


def to_uint8(images: Any) -> np.ndarray:
  """Images in [-1, 1] as uint8 pixels.

  Args:
    images: (N, R, R, C) (any shape) floats, about in [-1, 1].

  Returns:
    uint8 array of the same shape: round((x + 1) · 127.5) clipped to [0, 255].

  Raises:
    ValueError: NaN or infinite values (a model or an edit with non-finite weights).

  Example:
    >>> to_uint8(np.array([-1.0, 0.0, 1.0, 2.0])).tolist()
    [0, 128, 255, 255]
  """
  images = np.asarray(images)
  bad = images.size - int(np.isfinite(images).sum())
  if bad:
    raise ValueError(f"images: expected finite values, got {bad} NaN or infinite of "
                     f"{images.size} (a model or an edit with non-finite weights)")
  return np.clip(np.round((images + 1.0) * 127.5), 0, 255).astype(np.uint8)


def comparison_grid(original: Any, edited_images: Any, *, columns: int = 4, pad: int = 2,
                    scale: int = 2) -> np.ndarray:
  """A uint8 grid of (original, edited) pairs side by side, ``columns`` pairs per row.

  Args:
    original: (N, R, R, C) images in [-1, 1].
    edited_images: (N, R, R, C) images in [-1, 1], the same latents after an edit.
    columns: pairs per row.
    pad: white pixels between and around the cells (after scaling).
    scale: nearest-neighbour magnification of every image.

  Returns:
    (rows · (R' + pad) + pad, columns · (2 R' + 3 pad) + pad, C) uint8 with R' = scale · R
    and rows = ceil(N / columns): pair i at row i // columns, column i % columns, the
    original left and the edited image right.

  Raises:
    ValueError: images of different shapes, or non-finite values.

  Example:
    >>> a = np.zeros((3, 4, 4, 3)); b = np.ones((3, 4, 4, 3))
    >>> grid = comparison_grid(a, b, columns=2, pad=1, scale=1)
    >>> grid.shape, grid[1, 1].tolist(), grid[1, 6].tolist()
    ((11, 23, 3), [128, 128, 128], [255, 255, 255])
  """
  a, b = to_uint8(original), to_uint8(edited_images)
  if a.shape != b.shape:
    raise ValueError(f"edited_images: expected shape {a.shape}, got {b.shape}")
  n, R, _, c = a.shape
  if scale > 1:
    a = a.repeat(scale, 1).repeat(scale, 2)
    b = b.repeat(scale, 1).repeat(scale, 2)
    R *= scale
  rows = -(-n // columns)
  cell_w = 2 * R + pad
  grid = np.full((rows * (R + pad) + pad, columns * (cell_w + 2 * pad) + pad, c), 255,
                 np.uint8)
  for i in range(n):
    r, col = divmod(i, columns)
    y = pad + r * (R + pad)
    x = pad + col * (cell_w + 2 * pad)
    grid[y:y + R, x:x + R] = a[i]
    grid[y:y + R, x + R + pad:x + 2 * R + pad] = b[i]
  return grid


def save_png(path: str | os.PathLike, array: Any) -> None:
  """Writes an (H, W, C) pixel array as a PNG file, atomically.

  Args:
    path: the file to write (replaced atomically).
    array: uint8 (H, W, C) (C = 1, 2, 3 or 4) or (H, W) pixels; an array of another type
      must hold finite values in [0, 255].

  Returns:
    None.

  Raises:
    ValueError: values that are not finite or outside [0, 255]; a shape other than (H, W)
      or (H, W, C) with C = 1, 2 (grey and alpha), 3 or 4.

  Example:
    >>> import os, tempfile
    >>> from PIL import Image
    >>> path = os.path.join(tempfile.mkdtemp(), "a.png")
    >>> save_png(path, np.zeros((2, 3, 3), np.uint8))
    >>> Image.open(path).size
    (3, 2)
    >>> save_png(path, np.zeros((2, 3, 1), np.uint8))  # a grey image
    >>> Image.open(path).mode
    'L'
  """
  from PIL import Image

  a = np.asarray(array)
  if not (a.ndim == 2 or (a.ndim == 3 and 1 <= a.shape[-1] <= 4)):
    raise ValueError(f"array: expected pixels of shape (H, W) or (H, W, C) with C = 1, 2, 3 "
                     f"or 4, got shape {a.shape}")
  if a.ndim == 3 and a.shape[-1] == 1:  # PIL takes a grey image as (H, W)
    a = a[..., 0]
  if a.dtype != np.uint8 and not (np.isfinite(a).all() and (a >= 0).all() and (a <= 255).all()):
    raise ValueError(f"array: expected uint8 pixel values (or finite values in [0, 255]), got "
                     f"{a.dtype} values outside [0, 255] or not finite (NaN or infinite)")
  buf = io.BytesIO()
  Image.fromarray(np.asarray(a, np.uint8)).save(buf, format="PNG")
  _io.atomic_write_bytes(path, buf.getvalue())
