"""Shared helpers for the benchmark scripts: timing, machine description, table and JSON."""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
  """A description of the machine the numbers come from."""
  import jax
  import numpy as np

  info = {
      "platform": platform.platform(),
      "processor": platform.processor() or platform.machine(),
      "cpu_count": os.cpu_count(),
      "python": platform.python_version(),
      "jax": jax.__version__,
      "numpy": np.__version__,
      "jax_backend": jax.default_backend(),
      "devices": [str(d.device_kind) for d in jax.devices()],
  }
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          info["cpu_model"] = line.split(":", 1)[1].strip()
          break
  except OSError:
    pass
  return info


def _wall_times(fn, repeats: int) -> list[float]:
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return times


def best_of(fn, repeats: int = 3) -> float:
  """Smallest wall time of ``repeats`` calls of ``fn`` (which must block until done)."""
  return min(_wall_times(fn, repeats))


def median_of(fn, repeats: int = 3) -> float:
  """Median wall time of ``repeats`` calls of ``fn`` (which must block until done)."""
  import statistics

  return statistics.median(_wall_times(fn, repeats))


def table(rows: list[dict], columns: list[str]) -> str:
  """A plain-text table of ``rows`` restricted to ``columns``."""
  cells = [[str(r.get(c, "")) for c in columns] for r in rows]
  widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
  line = lambda vals: "| " + " | ".join(v.ljust(w) for v, w in zip(vals, widths)) + " |"
  out = [line(columns), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
  out += [line(r) for r in cells]
  return "\n".join(out)


def standard_json(value):
  """``value`` with the floats standard JSON cannot hold replaced: NaN by None (null),
  ±inf by the strings "inf" / "-inf" (numpy scalars and arrays become lists of floats)."""
  if isinstance(value, dict):
    return {k: standard_json(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [standard_json(v) for v in value]
  if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
    return standard_json(value.tolist())
  if isinstance(value, float):
    if math.isnan(value):
      return None
    if math.isinf(value):
      return "inf" if value > 0 else "-inf"
  return value


def write_json(path, payload) -> Path:
  """Writes ``payload`` to ``path`` as standard JSON (:func:`standard_json`), atomically:
  the text goes to a new temporary file beside ``path`` (a name of its own, so runs at
  the same time do not share it), synced and then moved into place, so an interrupted
  or failing write leaves the previous file whole and no temporary file behind."""
  from memedit import _io

  text = json.dumps(standard_json(payload), indent=2, default=float, allow_nan=False)
  path = Path(path)
  _io.atomic_write_bytes(path, (text + "\n").encode())
  return path


def write(name: str, payload: dict, suffix: str = "") -> Path:
  """Writes ``payload`` (plus the machine description) to benchmarks/results/NAME.json,
  as standard JSON (:func:`standard_json`), atomically (:func:`write_json`)."""
  check_suffix(name, "name")
  check_suffix(suffix, "suffix")
  return write_json(RESULTS / f"{name}{suffix}.json", dict(payload, machine=machine()))


# Types for argparse options: a bad value is refused before any work, with a message
# naming the option (argparse adds "argument --OPTION:").


def _number(text: str, kind, what: str, ok) -> int | float:
  try:
    value = kind(text)
  except (TypeError, ValueError):
    value = None
  if value is None or not math.isfinite(value) or not ok(value):
    raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
  return value


def positive_int(text: str) -> int:
  """argparse type: an integer ≥ 1."""
  return _number(text, int, "a positive integer", lambda v: v >= 1)


def nonnegative_int(text: str) -> int:
  """argparse type: an integer ≥ 0."""
  return _number(text, int, "a non-negative integer", lambda v: v >= 0)


def positive_float(text: str) -> float:
  """argparse type: a finite number > 0."""
  return _number(text, float, "a finite positive number", lambda v: v > 0)


def nonnegative_float(text: str) -> float:
  """argparse type: a finite number ≥ 0."""
  return _number(text, float, "a finite non-negative number", lambda v: v >= 0)


def number_list(kind=nonnegative_int):
  """argparse type: a comma-separated, non-empty list of values of the type ``kind``."""

  def parse(text: str) -> list:
    parts = [p.strip() for p in text.split(",")]
    if not text.strip() or any(not p for p in parts):
      raise argparse.ArgumentTypeError(
          f"expected a comma-separated list such as 2,3, got {text!r}")
    return [kind(p) for p in parts]

  return parse


_SUFFIX = re.compile(r"[A-Za-z0-9_.\-]*")


def check_suffix(text: str, name: str = "tag") -> str:
  """``text`` if it can be part of a results file's name (letters, digits, ``_ . -``,
  no path separators); else ValueError."""
  if not isinstance(text, str) or not _SUFFIX.fullmatch(text) or ".." in text:
    raise ValueError(f"{name}: expected letters, digits, '_', '.' or '-' (a part of a file "
                     f"name, without '..'), got {text!r}")
  return text


def suffix_tag(text: str) -> str:
  """argparse type: a suffix of a results file's name (see :func:`check_suffix`)."""
  try:
    return check_suffix(text)
  except ValueError as e:
    raise argparse.ArgumentTypeError(str(e).split(": ", 1)[1]) from None
