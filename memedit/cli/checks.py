"""Checks of the command line's inputs and outputs, made before any long work starts.

Limits keep a mistyped number from running without bound; each option's help states its
range.
"""

from __future__ import annotations

import collections
import contextlib
import os
import secrets
from typing import Callable, Iterable

from memedit._io import _within, parent_problem
from memedit.specs import MAX_IMAGES

__all__ = ["FORMATS", "MAX_BATCH", "MAX_COLUMNS", "MAX_EVALUATED", "MAX_PAIRS", "MAX_SAMPLES",
           "check_finite_edit", "check_finite_images", "check_input_file",
           "check_output_file", "check_output_location", "image_limit", "imgnums",
           "in_range", "is_json_report", "is_png", "writing"]

FORMATS = ("auto", "rosinality", "nvidia", "dcgan", "gpt2")
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
  existing folder nor a path ending with a separator, and the nearest existing folder
  above it is a folder one may write in. Returns the absolute path."""
  dst = os.path.abspath(path)
  if not folder and os.path.isdir(dst):
    raise ValueError(f"{flag}: expected a file to write, got the folder {path!r}")
  if not folder and str(path).endswith(tuple(s for s in (os.sep, os.altsep) if s)):
    # abspath drops the separator: 'new/' would otherwise be written as the file 'new'.
    raise ValueError(f"{flag}: expected a file to write, got {path!r}, a folder's path (it "
                     "ends with a separator)")
  parent, problem = parent_problem(dst)
  if problem == "file":
    raise ValueError(f"{flag}: expected a path inside folders, got {path!r}, whose parent "
                     f"{parent!r} is a file")
  if problem == "read-only":
    raise ValueError(f"{flag}: expected a place you may write to, got {path!r}: the folder "
                     f"{parent!r} is not writable")
  _probe(parent, path, flag)
  return dst


def _probe(parent: str, path: str, flag: str) -> None:
  """Creates and removes an empty file in ``parent``: some folders refuse new entries
  even where ``os.access`` allows them (``/proc``, read-only mounts)."""
  probe = os.path.join(parent, f".memedit-probe-{secrets.token_hex(4)}")
  try:
    os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
  except OSError as e:
    raise ValueError(f"{flag}: expected a place you may write to, got {path!r}: cannot "
                     f"write in the folder {parent!r} ({e.strerror or e})") from None
  with contextlib.suppress(OSError):
    os.remove(probe)


def is_png(path: str) -> bool:
  """Whether the file ``path`` starts with the PNG signature."""
  with open(path, "rb") as f:
    return f.read(8) == b"\x89PNG\r\n\x1a\n"


def is_json_report(path: str, keys: Iterable[str]) -> bool:
  """Whether the file ``path`` holds a JSON object with (at least) ``keys``."""
  import json

  try:
    with open(path, encoding="utf-8") as f:
      value = json.load(f)
  except ValueError:  # not UTF-8, not JSON
    return False
  return isinstance(value, dict) and set(keys) <= set(value)


def check_output_file(path: str, flag: str, *, protect: Iterable[str | None] = (),
                      what: str, accept: Callable[[str], bool]) -> str:
  """Checks, before any work, that the output file ``path`` may be written.

  Args:
    path: the file to write (replaced atomically).
    flag: how the command line names it in messages (``'--out'``).
    protect: the command's inputs, files or folders (None entries are skipped): ``path``
      may be none of them nor lie inside one.
    what: in words, what an existing ``path`` must be to be replaced (``'a PNG image'``).
    accept: ``accept(path) -> bool``: whether the existing, non-empty file ``path`` is
      such a file. Empty files are replaced; anything else is refused.

  Returns:
    ``path`` as an absolute path.

  Raises:
    ValueError: ``path`` cannot be written (see :func:`check_output_location`), is or
      lies inside an input, or holds something other than ``what``.
  """
  dst = check_output_location(path, flag, folder=False)
  for keep in protect:
    if keep is not None and _within(dst, os.fspath(keep)):
      where = "is" if _within(os.fspath(keep), dst) else "lies inside"
      raise ValueError(f"{flag}: expected an output file apart from the inputs, got "
                       f"{path!r}, which {where} the input {os.fspath(keep)!r}; refusing to "
                       "replace it")
  if not os.path.lexists(dst):
    return dst
  if not os.path.isfile(dst):
    got = "a broken link" if os.path.islink(dst) else "something that is not a file"
    raise ValueError(f"{flag}: expected a new file or {what} to replace, got {path!r}, "
                     f"{got}; refusing to replace it")
  try:
    ok = os.path.getsize(dst) == 0 or accept(dst)
  except OSError as e:
    raise ValueError(f"{flag}: expected a new file or {what} to replace, got {path!r}, "
                     f"which cannot be read ({e.strerror or e}); refusing to replace it"
                     ) from None
  if not ok:
    raise ValueError(f"{flag}: expected a new file or {what} to replace, got {path!r}, an "
                     f"existing file of {os.path.getsize(dst)} bytes that is not one; "
                     "refusing to replace it (remove it or choose another name)")
  return dst


@contextlib.contextmanager
def writing(path: str, flag: str):
  """Reports an OS error about output ``path`` (or the temporary sibling an atomic write
  puts beside it, or a file inside that one: names the user never gave) under the user's
  name for it; other errors (reading an input) pass unchanged."""
  dst = os.path.abspath(path)
  parent, base = os.path.dirname(dst), os.path.basename(dst)

  def ours(name) -> bool:
    if name is None:
      return False
    name = os.path.abspath(os.fsdecode(name))
    if _within(name, dst):
      return True
    try:
      first = os.path.relpath(name, parent).split(os.sep)[0]  # the entry of parent it is in
    except ValueError:  # another drive
      return False
    return first not in (os.curdir, os.pardir) and first.startswith(".") and base in first

  try:
    yield
  except OSError as e:
    if not (ours(e.filename) or ours(e.filename2)):
      raise
    raise ValueError(f"{flag}: expected a place you may write to, got {path!r}: cannot "
                     f"write there ({e.strerror or e})") from None


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


def warn_other_call(edit, gen, where: str) -> None:
  """Warns when the edit records a model other than ``gen``: another kernel at its layer
  (it was made on another model, or on this one with other edits applied) or other call
  keywords (e.g. a truncation). The edit is applied anyway, but its effect was measured
  on the recorded model."""
  import warnings

  from memedit.generators import kernel_digest, recorded_call_kwargs

  settings = edit.settings
  base = settings.get("base_kernel")
  try:
    here = kernel_digest(gen.params, edit.path)
  except ValueError:  # no such leaf: applying the edit names the mismatch
    here = None
  if isinstance(base, str) and here is not None and base != here:
    warnings.warn(f"{where}: the edit was made on a model whose kernel at "
                  f"{'/'.join(map(str, edit.path))} differs from this model's (digest "
                  f"{base}, here {here}): another model, or this one with other edits "
                  f"applied", UserWarning, stacklevel=2)
  made = settings.get("call_kwargs")
  now = recorded_call_kwargs(gen)
  if isinstance(made, dict) and made != now:
    flags = " ".join(f"--{k} {v}" for k, v in sorted(made.items()) if k == "truncation")
    warnings.warn(f"{where}: the edit was made with {made} and is applied with {now}"
                  + (f"; pass {flags} to match" if flags else ""), UserWarning, stacklevel=2)


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
  :data:`MAX_IMAGES`, each once and at most ``limit`` of them (the count checked before
  any list is built)."""
  ranges: list[tuple[int, int]] = []
  if not str(text).strip():
    raise ValueError(f"{flag}: expected image numbers, got {text!r}")
  # int() would read other scripts' digits ('٣' is 3), '1_0' as 10 and '+3' as 3.
  odd = sorted(set(str(text)) - set("0123456789,- \t"))
  if odd:
    raise ValueError(f"{flag}: expected numbers or ranges like '100-115,200' (ASCII digits, "
                     f"'-' and ','), got {odd[:8]} in {str(text)[:40]!r}")
  for part in str(text).split(","):
    part = part.strip()
    if not part:
      raise ValueError(f"{flag}: expected numbers or ranges like '100-115,200' separated by "
                       f"single commas, got an empty entry in {text!r}")
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
  nums = [n for lo, hi in ranges for n in range(lo, hi + 1)]
  if len(set(nums)) != len(nums):
    repeated = sorted(n for n, c in collections.Counter(nums).items() if c > 1)
    raise ValueError(f"{flag}: expected distinct image numbers, got {repeated[:8]} more than "
                     f"once in {text!r}")
  return nums
