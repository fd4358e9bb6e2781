"""Masks of edit specs as PNG data URLs, and short texts of untrusted values for errors.

A mask is a uint8 (H, W) array. The reference's paint widget draws white on a transparent
canvas and its readers take the red channel; memedit writes the mask in the red, green,
blue and alpha channels (zero where the mask is off) and reads a pixel as the smaller of
its red and alpha channels (the red channel of an image without alpha). The image's size
is read from its PNG header and checked before anything is decoded.
"""

from __future__ import annotations

import base64
import binascii
import io
import reprlib
import struct
import zlib
from typing import Any

import numpy as np

__all__ = ["MAX_CANVAS", "PNG_DATA_URL", "data_url_to_mask", "got", "mask_to_data_url",
           "mask_uint8", "shown"]

#: The prefix of a PNG data URL.
PNG_DATA_URL = "data:image/png;base64,"
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
#: The largest mask side accepted, in pixels.
MAX_CANVAS = 4096

_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxtuple, _REPR.maxdict = 2, 3, 3, 3
_REPR.maxstring, _REPR.maxother, _REPR.maxlong = 40, 40, 40


def shown(value: Any) -> str:
  """A short repr of untrusted data, bounded in nesting depth and length.

  Args:
    value: any value.

  Returns:
    Its repr, at most 2 levels deep, 3 items per container and 40 characters per string.

  Example:
    >>> shown(list(range(10)))
    '[0, 1, 2, ...]'
  """
  return _REPR.repr(value)


def got(value: Any, want: type | tuple = ()) -> str:
  """A received value for an error message: its repr when it has a type of ``want``,
  else its repr after its type's name (``the str '64'``), so that 64 and "64" read
  differently; JSON null is ``null``.

  Args:
    value: the value received. want: the type(s) expected.

  Returns:
    The text.

  Example:
    >>> got(64, int), got("64", int), got(None)
    ('64', "the str '64'", 'null')
  """
  if value is None:
    return "null"
  want = want if isinstance(want, tuple) else (want,)
  if want and isinstance(value, want) and not (isinstance(value, bool) and bool not in want):
    return shown(value)
  return f"the {type(value).__name__} {shown(value)}"


def mask_to_data_url(mask: Any) -> str:
  """A (H, W) mask (uint8, or float in [0, 1]) as a PNG data URL, encoded as the
  reference's paint widget saves masks: RGBA with the mask in every channel, so zero
  where the mask is off (the reference reads the red channel, memedit before this
  encoding read the alpha channel; both read the mask).

  Args:
    mask: (H, W) uint8, or numbers in [0, 1] (rounded to 0..255).

  Returns:
    ``"data:image/png;base64,..."``.

  Raises:
    ValueError: the mask is not 2-D, or holds values that are not finite.

  Example:
    >>> m = np.zeros((4, 4)); m[1:3, 1:3] = 1
    >>> url = mask_to_data_url(m)
    >>> url.startswith("data:image/png;base64,"), data_url_to_mask(url).tolist()[1]
    (True, [0, 255, 255, 0])
  """
  from PIL import Image

  m = np.asarray(mask)
  if m.ndim != 2:
    raise ValueError(f"mask: expected a 2-D array, got shape {m.shape}")
  if m.dtype != np.uint8:
    m = mask_uint8(m, "mask")
  rgba = np.repeat(m[:, :, None], 4, axis=2)
  buf = io.BytesIO()
  Image.fromarray(rgba, "RGBA").save(buf, format="PNG")
  return PNG_DATA_URL + base64.b64encode(buf.getvalue()).decode("ascii")


def mask_uint8(m: np.ndarray, where: str) -> np.ndarray:
  """A float (or other numeric) mask in [0, 1] as uint8 0..255.

  Args:
    m: the mask. where: what it is, for error messages.

  Returns:
    round(255 · m) as uint8.

  Raises:
    ValueError: a non-numeric mask, or one with NaN, infinite or out-of-range values
      (e.g. a 0..255 mask that is not uint8: clipping would make every marked pixel
      full, losing a soft mask's levels).

  Example:
    >>> mask_uint8(np.array([0.0, 0.5, 1.0]), "mask").tolist()
    [0, 128, 255]
  """
  if m.dtype.kind not in "biuf":
    raise ValueError(f"{where}: expected numbers in [0, 1], got an array of {m.dtype}")
  m = np.asarray(m, np.float64)
  if not np.isfinite(m).all():
    raise ValueError(f"{where}: expected numbers in [0, 1], got "
                     f"{int((~np.isfinite(m)).sum())} NaN or infinite values")
  if m.size and (m.min() < 0 or m.max() > 1):
    raise ValueError(f"{where}: expected numbers in [0, 1] (or a uint8 mask of 0..255), got "
                     f"values in [{m.min() + 0.0:g}, {m.max() + 0.0:g}]")
  return np.clip(np.round(m * 255.0), 0, 255).astype(np.uint8)


def _png_size(raw: bytes, where: str) -> tuple[int, int]:
  """(width, height) from a PNG's header chunk, without decoding the image."""
  if raw[:8] != _PNG_SIGNATURE:
    raise ValueError(f"{where}: expected PNG image data, got bytes that are not a PNG "
                     f"(they start {raw[:8]!r})")
  if len(raw) < 24 or raw[12:16] != b"IHDR":
    raise ValueError(f"{where}: expected PNG image data with its header chunk (IHDR) first, "
                     f"got the PNG signature followed by {raw[8:24]!r}")
  return struct.unpack(">II", raw[16:24])


# Adam7 interlacing: (x0, y0, dx, dy) of each of the seven passes.
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2),
          (0, 1, 1, 2))
_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # PNG colour type -> samples per pixel


def _png_complete(raw: bytes, where: str) -> None:
  """Refuses a PNG whose image data holds fewer bytes than its header promises (a decoder
  would fill the missing rows with zeros without a word)."""
  width, height = struct.unpack(">II", raw[16:24])
  depth, colour, interlace = raw[24], raw[25], raw[28]
  if colour not in _CHANNELS:
    return  # the decoder reports it
  bits = _CHANNELS[colour] * depth
  passes = _ADAM7 if interlace == 1 else ((0, 0, 1, 1),)
  want = 0
  for x0, y0, dx, dy in passes:
    w, h = -(-(width - x0) // dx), -(-(height - y0) // dy)
    if w > 0 and h > 0:
      want += h * (1 + -(-w * bits // 8))
  data, pos = [], 8
  while pos + 8 <= len(raw):
    n, kind = struct.unpack(">I4s", raw[pos:pos + 8])
    if kind == b"IDAT":
      data.append(raw[pos + 8:pos + 8 + n])
    pos += 12 + n
  try:
    got = len(zlib.decompressobj().decompress(b"".join(data), want + 1))
  except zlib.error:
    return  # the decoder reports it
  if got < want:
    raise ValueError(f"{where}: expected PNG image data of {width}x{height} pixels ({want} "
                     f"bytes once inflated), got {got} bytes: a truncated image")


def data_url_to_mask(url: Any, where: str = "mask", size: int | None = None) -> np.ndarray:
  """Decodes a PNG data URL to a uint8 (H, W) mask.

  A pixel's mask value is the smaller of its red and alpha channels, or its red channel
  (the grey level of a grey image, scaled to 0..255 for a 16-bit one) when the image has
  no alpha: the reference reads the
  red channel, and masks with the region in alpha over white (as memedit wrote them
  before) or in every channel (as it writes them now) decode to the same array.

  The image's size is read from its PNG header and checked before anything is decoded:
  it must be ``size`` × ``size`` when ``size`` is given, and at most
  :data:`MAX_CANVAS` pixels a side.

  Args:
    url: the data URL.
    where: what the mask is, for error messages (e.g. ``"key[0] mask"``).
    size: the canvas resolution the mask must have, or None.

  Returns:
    uint8 (H, W) array.

  Raises:
    ValueError: not a PNG data URL, bad base64, bytes that are not a PNG image, or an
      image of another size than ``size`` or larger than :data:`MAX_CANVAS`.

  Example:
    >>> url = mask_to_data_url(np.eye(3))
    >>> data_url_to_mask(url, size=3).tolist()
    [[255, 0, 0], [0, 255, 0], [0, 0, 255]]
    >>> data_url_to_mask(url, "paste mask", size=4)
    Traceback (most recent call last):
    ...
    ValueError: paste mask: expected size 4x4 (the canvas), got 3x3
  """
  from PIL import Image, UnidentifiedImageError

  if not isinstance(url, str) or not url.startswith(PNG_DATA_URL):
    text = shown(url[:40]) if isinstance(url, str) else got(url)
    raise ValueError(f"{where}: expected a PNG data URL starting with {PNG_DATA_URL!r}, got "
                     f"{text}")
  try:
    raw = base64.b64decode(url[len(PNG_DATA_URL):], validate=True)
  except (binascii.Error, ValueError) as e:
    raise ValueError(f"{where}: expected base64 data after {PNG_DATA_URL!r}, got invalid base64 "
                     f"({e})") from None
  width, height = _png_size(raw, where)
  if size is not None and (width, height) != (size, size):
    raise ValueError(f"{where}: expected size {size}x{size} (the canvas), got "
                     f"{width}x{height}")
  if max(width, height) > MAX_CANVAS:
    raise ValueError(f"{where}: expected a mask of at most {MAX_CANVAS}x{MAX_CANVAS} pixels, "
                     f"got {width}x{height}; it was not decoded")
  _png_complete(raw, where)
  try:
    img = Image.open(io.BytesIO(raw))
    img.load()
    if img.mode.startswith("I"):  # a 16-bit grey PNG: scale 0..65535 to 0..255
      # (PIL's conversion to 8 bits clips instead, so that 128 of 65535 would read 128)
      level = np.asarray(img).astype(np.int64)
      grey = np.clip(np.round(level / 257.0), 0, 255).astype(np.uint8)
      clear = img.info.get("transparency")
      return np.where(level == clear, 0, grey).astype(np.uint8) if isinstance(
          clear, int) else grey
    if img.mode == "P" or "transparency" in img.info:
      img = img.convert("RGBA")
    if "A" in img.getbands():
      rgba = np.asarray(img.convert("RGBA"), np.uint8)
      return np.minimum(rgba[:, :, 0], rgba[:, :, 3])
    return np.ascontiguousarray(np.asarray(img.convert("RGB"), np.uint8)[:, :, 0])
  except (UnidentifiedImageError, OSError, SyntaxError, ValueError,
          Image.DecompressionBombError) as e:
    raise ValueError(f"{where}: expected PNG image data, got bytes that do not decode as a "
                     f"PNG ({e})") from None
