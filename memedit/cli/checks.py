"""Checks of the command line's inputs and outputs, made before any long work starts.

Limits keep a mistyped number from running without bound; each option's help states its
range.
"""

from __future__ import annotations

import os

from memedit.specs import MAX_IMAGES

__all__ = ["FORMATS", "MAX_BATCH", "MAX_COLUMNS", "MAX_EVALUATED", "MAX_PAIRS", "MAX_SAMPLES",
           "check_finite_edit", "check_finite_images", "check_input_file",
           "check_output_location", "image_limit", "imgnums", "in_range"]

FORMATS = ("auto", "rosinality", "nvidia", "dcgan")
MAX_SAMPLES = 100_000
MAX_BATCH = 4096
MAX_PAIRS = 64
MAX_COLUMNS = 64
MAX_EVALUATED = 4096


def in_range(flag: str, value, lo: int, hi: int):
  """Checks an integer option against its range (inclusive); returns it."""
  if value is not None and not lo <= value <= hi:
    raise ValueError(f"{flag}: expected an integer in [{lo}, {hi}], got {value}")
  return value


def image_limit(limit: int, resolution: int) -> int:
  """``limit`` images at up to 256 px, shrinking with the square of the resolution above."""
  return max(1, limit * 256 ** 2 // max(int(resolution), 256) ** 2)


def check_output_location(path: str, flag: str, *, folder: bool) -> str:
  """Checks, before any work, that ``path`` can be written: a file output is not an
  existing folder, and the nearest existing folder above it is a folder one may write
  in. Returns the absolute path."""
  dst = os.path.abspath(path)
  if not folder and os.path.isdir(dst):
    raise ValueError(f"{flag}: expected a file to write, got the folder {path!r}")
  parent = os.path.dirname(dst)
  while not os.path.lexists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent):
    raise ValueError(f"{flag}: expected a path inside folders, got {path!r}, whose parent "
                     f"{parent!r} is a file")
  if not os.access(parent, os.W_OK | os.X_OK):
    raise ValueError(f"{flag}: expected a place you may write to, got {path!r}: the folder "
                     f"{parent!r} is not writable")
  return dst


def check_input_file(path: str, flag: str) -> None:
  """Checks, before any work, that ``path`` is a file one may read."""
  if not os.path.exists(path):
    raise ValueError(f"{flag}: expected a file, got {path!r}, which does not exist")
  if os.path.isdir(path):
    raise ValueError(f"{flag}: expected a file, got the folder {path!r}")
  if not os.access(path, os.R_OK):
    raise ValueError(f"{flag}: expected a file you may read, got {path!r}: permission denied")


def check_finite_edit(edit, where: str) -> None:
  """Refuses an edit whose Λ or D holds NaN or infinite values."""
  import numpy as np

  for name, a in (("Λ", edit.lam), ("D", edit.D)):
    a = np.asarray(a)
    bad = a.size - int(np.isfinite(a).sum())
    if bad:
      raise ValueError(f"{where}: expected an edit with finite values, got {bad} NaN or "
                       f"infinite of the {a.size} values of {name}")


def check_finite_images(images, where: str) -> None:
  """Refuses images with NaN or infinite pixel values (they would draw as black)."""
  import numpy as np

  a = np.asarray(images)
  bad = a.size - int(np.isfinite(a).sum())
  if bad:
    raise ValueError(f"{where}: expected finite images, got {bad} NaN or infinite of "
                     f"{a.size} pixel values; nothing was written")


def imgnums(text: str, limit: int, flag: str = "--images") -> list[int]:
  """'100-115' or '3,7,9' or '100-103,200' -> image numbers, each below
  :data:`MAX_IMAGES` and at most ``limit`` of them (checked before any list is built)."""
  ranges: list[tuple[int, int]] = []
  for part in str(text).split(","):
    part = part.strip()
    if not part:
      continue
    try:
      a, b = part.split("-", 1) if "-" in part[1:] else (part, part)
      lo, hi = int(a), int(b)
    except ValueError:
      raise ValueError(f"{flag}: expected numbers or ranges like '100-115,200', got "
                       f"{text!r}") from None
    if not 0 <= lo <= hi < MAX_IMAGES:
      raise ValueError(f"{flag}: expected image numbers in [0, {MAX_IMAGES}) and ranges "
                       f"from low to high, got {part!r}")
    ranges.append((lo, hi))
  count = sum(hi - lo + 1 for lo, hi in ranges)
  if not count:
    raise ValueError(f"{flag}: expected image numbers, got {text!r}")
  if count > limit:
    raise ValueError(f"{flag}: expected at most {limit} images, got {count} in {text!r}")
  return [n for lo, hi in ranges for n in range(lo, hi + 1)]
