"""Pictures of a generator's images: uint8 conversion, side-by-side grids, PNG files.

Images are NHWC float arrays with values in about [-1, 1] (a generator's output, as
:class:`memedit.generators.Generator` documents it); pixels are ``round((x + 1) · 127.5)``
clipped to [0, 255]. A generator with another output range (e.g. [0, 1]) passes it as
``value_range=(lo, hi)``: pixels are then ``round((x − lo) · 255 / (hi − lo))`` with x first
clipped to [lo, hi].
"""

from __future__ import annotations

import io
import os
from typing import Any

import jax.numpy as jnp
import numpy as np

from memedit import _io

__all__ = ["comparison_grid", "save_png", "to_uint8"]


def _value_range(value_range: Any) -> tuple[float, float]:
  try:
    lo, hi = value_range
  except (TypeError, ValueError):
    raise ValueError(f"value_range: expected (lo, hi), the generator's output range, e.g. "
                     f"(-1.0, 1.0) or (0.0, 1.0), got {value_range!r}") from None
  ok = all(not isinstance(v, (bool, np.bool_)) and isinstance(v, (int, float, np.integer,
                                                                  np.floating))
           and np.isfinite(v) for v in (lo, hi))
  if not ok or not lo < hi:
    raise ValueError(f"value_range: expected two finite numbers lo < hi (the generator's "
                     f"output range, e.g. (-1.0, 1.0) or (0.0, 1.0)), got {value_range!r}")
  return float(lo), float(hi)


def to_uint8(images: Any, value_range: tuple[float, float] = (-1.0, 1.0)) -> np.ndarray:
  """Images in ``value_range`` ([-1, 1] by default) as uint8 pixels.

  Args:
    images: (N, R, R, C) (any shape) floating-point values, about in ``value_range``
      (any float dtype, bfloat16 included; computed in float64).
    value_range: (lo, hi), finite with lo < hi: the generator's output range, mapped to
      pixels 0 and 255; e.g. (0.0, 1.0) for a generator whose images are in [0, 1].

  Returns:
    uint8 array of the same shape: round((x − lo) · 255 / (hi − lo)) with x clipped to
    [lo, hi] (values outside the range, however large, give 0 or 255); for the default
    range round((x + 1) · 127.5). Halves round to even.

  Raises:
    ValueError: NaN or infinite values (a model or an edit with non-finite weights; the
      message counts each); integer, bool or other non-floating images (e.g. uint8
      pixels, which are already converted); a bad ``value_range``.

  Example:
    >>> to_uint8(np.array([-1.0, 0.0, 1.0, 2.0])).tolist()
    [0, 128, 255, 255]
    >>> to_uint8(np.array([0.0, 0.5, 1.0]), value_range=(0, 1)).tolist()
    [0, 128, 255]
  """
  lo, hi = _value_range(value_range)
  images = np.asarray(images)
  if not jnp.issubdtype(images.dtype, jnp.floating):
    raise ValueError(f"images: expected floating-point images with values in about "
                     f"[{lo:g}, {hi:g}], got dtype {images.dtype}"
                     + (" (uint8 images are already pixels)" if images.dtype == np.uint8
                        else ""))
  # In float64: float16 and bfloat16 arithmetic, and float32 products, would round pixels.
  images = images.astype(np.float64)
  bad = images.size - int(np.isfinite(images).sum())
  if bad:
    nan = int(np.isnan(images).sum())
    raise ValueError(f"images: expected finite values, got {bad} NaN or infinite of "
                     f"{images.size} ({nan} NaN, {bad - nan} infinite; a model or an edit "
                     f"with non-finite weights)")
  pixels = (np.clip(images, lo, hi) - lo) * (255.0 / (hi - lo))
  return np.clip(np.round(pixels), 0, 255).astype(np.uint8)


def _positive_int(value: Any, name: str, least: int) -> int:
  if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) \
      or value < least:
    raise ValueError(f"{name}: expected an int >= {least}, got {value!r}")
  return int(value)


def comparison_grid(original: Any, edited_images: Any, *, columns: int = 4, pad: int = 2,
                    scale: int = 2, value_range: tuple[float, float] = (-1.0, 1.0)
                    ) -> np.ndarray:
  """A uint8 grid of (original, edited) pairs side by side, ``columns`` pairs per row.

  Args:
    original: (N, H, W, C) images in ``value_range`` (square H = W = R for a generator).
    edited_images: (N, H, W, C) images in ``value_range``, the same latents after an edit.
    columns: pairs per row, an int >= 1.
    pad: white pixels between and around the cells (after scaling), an int >= 0.
    scale: nearest-neighbour magnification of every image, an int >= 1.
    value_range: the images' range, as for :func:`to_uint8` (default [-1, 1]).

  Returns:
    (rows · (H' + pad) + pad, columns · (2 W' + 3 pad) + pad, C) uint8 with H' = scale · H,
    W' = scale · W and rows = ceil(N / columns): pair i at row i // columns, column
    i % columns, the original left and the edited image right.

  Raises:
    ValueError: images that are not (N, H, W, C) with N >= 1, of different shapes, or
      with non-finite values (see :func:`to_uint8`); ``columns``, ``pad`` or ``scale``
      not an int in its range; a bad ``value_range``.

  Example:
    >>> a = np.zeros((3, 4, 4, 3)); b = np.ones((3, 4, 4, 3))
    >>> grid = comparison_grid(a, b, columns=2, pad=1, scale=1)
    >>> grid.shape, grid[1, 1].tolist(), grid[1, 6].tolist()
    ((11, 23, 3), [128, 128, 128], [255, 255, 255])
  """
  columns = _positive_int(columns, "columns", 1)
  pad = _positive_int(pad, "pad", 0)
  scale = _positive_int(scale, "scale", 1)
  a = to_uint8(original, value_range)
  b = to_uint8(edited_images, value_range)
  if a.ndim != 4 or not a.shape[0] or not all(a.shape[1:]):
    raise ValueError(f"original: expected images (N, H, W, C) with N >= 1, got shape "
                     f"{a.shape}")
  if a.shape != b.shape:
    raise ValueError(f"edited_images: expected shape {a.shape}, got {b.shape}")
  n, H, W, c = a.shape
  if scale > 1:
    a = a.repeat(scale, 1).repeat(scale, 2)
    b = b.repeat(scale, 1).repeat(scale, 2)
    H, W = H * scale, W * scale
  rows = -(-n // columns)
  cell_w = 2 * W + pad
  grid = np.full((rows * (H + pad) + pad, columns * (cell_w + 2 * pad) + pad, c), 255,
                 np.uint8)
  for i in range(n):
    r, col = divmod(i, columns)
    y = pad + r * (H + pad)
    x = pad + col * (cell_w + 2 * pad)
    grid[y:y + H, x:x + W] = a[i]
    grid[y:y + H, x + W + pad:x + 2 * W + pad] = b[i]
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
