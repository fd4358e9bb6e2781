"""Shared helpers for the benchmark scripts: timing, machine description, table and JSON."""

from __future__ import annotations

import json
import math
import os
import platform
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


def write(name: str, payload: dict, suffix: str = "") -> Path:
  """Writes ``payload`` (plus the machine description) to benchmarks/results/NAME.json,
  as standard JSON (:func:`standard_json`)."""
  RESULTS.mkdir(parents=True, exist_ok=True)
  payload = standard_json(dict(payload, machine=machine()))
  path = RESULTS / f"{name}{suffix}.json"
  tmp = path.with_suffix(".json.tmp")
  tmp.write_text(json.dumps(payload, indent=2, default=float, allow_nan=False))
  os.replace(tmp, path)
  return path
