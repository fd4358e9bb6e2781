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


# Where a run's results go. benchmarks/results holds the committed runs at each script's
# default settings (the README's tables quote them): a run at other settings gets a name
# of its own there, so it never replaces them.


def out_dir(text: str) -> Path:
  """argparse type: a folder for results files: an existing folder this process may
  write into, or a new one whose nearest existing parent is such a folder."""
  if not isinstance(text, str) or not text.strip():
    raise argparse.ArgumentTypeError(f"expected a folder, got {text!r}")
  path = Path(text).expanduser()
  probe = path
  while not os.path.lexists(probe) and probe.parent != probe:
    probe = probe.parent
  if not probe.is_dir():
    what = "is not a folder" if probe == path else f"lies under {str(probe)!r}, not a folder"
    raise argparse.ArgumentTypeError(f"expected a folder, got {text!r}, which {what}")
  if not _can_create_in(probe):
    raise argparse.ArgumentTypeError(
        f"expected a folder this process can write into, got {text!r}"
        + ("" if probe == path else f" (its parent {str(probe)!r} is not writable)"))
  return path


def _can_create_in(folder: Path) -> bool:
  """Whether a file can be created in ``folder`` (tried: permissions alone do not tell a
  read-only file system, or a folder such as /proc, from a writable one)."""
  if not os.access(folder, os.W_OK | os.X_OK):
    return False
  import tempfile

  try:
    fd, name = tempfile.mkstemp(prefix=".write-probe-", dir=folder)
  except OSError:
    return False
  os.close(fd)
  os.remove(name)
  return True


def add_out_dir(ap: argparse.ArgumentParser) -> None:
  """Adds ``--out-dir DIR`` (see :func:`results_path`) to a benchmark's parser."""
  ap.add_argument("--out-dir", type=out_dir, default=None, metavar="DIR",
                  help="folder of the results file (default: benchmarks/results, which "
                       "holds the committed runs at the default settings; a run at other "
                       "settings is named after the options it changed, e.g. "
                       "NAME_OPTION5.json, and one on another model needs --out-dir)")


def _value_text(value) -> str:
  if isinstance(value, (list, tuple)):
    return "-".join(_value_text(v) for v in value)
  if isinstance(value, float):
    return f"{value:g}".replace("+", "")
  return str(value)


def changed_options(ap: argparse.ArgumentParser, args, options) -> list[tuple[str, object]]:
  """(option, value) of each of ``options`` (such as ``"--keys"``) whose value in
  ``args`` differs from the parser's default."""
  out = []
  for option in options:
    dest = option.lstrip("-").replace("-", "_")
    value = getattr(args, dest)
    if value != ap.get_default(dest):
      out.append((option, value))
  return out


def results_path(ap: argparse.ArgumentParser, args, name: str, *, variants=(), inputs=(),
                 suffix: str = "", tag: str = "") -> Path:
  """The results file of a run, decided (and checked) before any work: in ``--out-dir``
  (default benchmarks/results), named

  - ``NAME_quick{suffix}.json`` with ``--quick`` (a smoke run);
  - ``NAME{tag}{suffix}.json`` when the script's ``--tag`` is given;
  - else ``NAME{changes}{suffix}.json``, where ``changes`` names each option of
    ``variants`` (sizes, repeats, …) given a value other than its default, e.g.
    ``_keys1000_dim64`` (none at the default settings: the committed file's name).

  The options of ``inputs`` (a model folder, …) cannot be part of a name: one of them
  changed without ``--quick``, ``--tag`` or an ``--out-dir`` other than benchmarks/results
  is refused (argparse error naming it), as it would replace the committed default run
  with another model's.
  Call it before ``--quick`` replaces the sizes in ``args``."""
  folder = getattr(args, "out_dir", None)
  quick = getattr(args, "quick", False)
  if quick:
    stem = f"{name}_quick"
  elif tag:
    stem = f"{name}{tag}"
  else:
    moved = changed_options(ap, args, inputs)
    if moved and (folder is None or Path(folder).resolve() == Path(RESULTS).resolve()):
      given = ", ".join(f"{o} {v}" for o, v in moved)
      ap.error(f"--out-dir: expected a folder of your own for a run with {given} (not "
               f"the default), got {'none' if folder is None else repr(str(folder))}: "
               f"benchmarks/results/{name}{suffix}.json holds the committed run")
    stem = name + "".join(f"_{o.lstrip('-')}{_value_text(v)}"
                          for o, v in changed_options(ap, args, variants))
  try:
    check_suffix(stem, "name")
    check_suffix(suffix, "suffix")
  except ValueError as e:
    ap.error(f"expected options that can name a results file, got {e}")
  return Path(RESULTS if folder is None else folder) / f"{stem}{suffix}.json"


def output_file(ap: argparse.ArgumentParser, args, name: str, variants=()) -> str:
  """The results file of a script that also takes ``--out FILE``: that file (its folder
  checked as :func:`out_dir` does; not together with ``--out-dir``), else
  :func:`results_path`'s; decided before any work."""
  if args.out is None:
    return str(results_path(ap, args, name, variants=variants))
  if args.out_dir is not None:
    ap.error(f"--out-dir: expected either --out FILE or --out-dir DIR, got both "
             f"({args.out!r}, {str(args.out_dir)!r})")
  if os.path.isdir(args.out) or not args.out.endswith(".json"):
    ap.error(f"--out: expected the path of a .json file, got {args.out!r}")
  try:
    out_dir(os.path.dirname(os.path.abspath(args.out)))
  except argparse.ArgumentTypeError as e:
    ap.error(f"--out: expected a file in a folder this process can write into, got "
             f"{args.out!r} ({e})")
  return args.out


def write_to(path, payload: dict) -> Path:
  """Writes ``payload`` (plus the machine description) to ``path`` (from
  :func:`results_path`), as standard JSON, atomically (:func:`write_json`)."""
  return write_json(path, dict(payload, machine=machine()))


def shown(path) -> str:
  """``path`` relative to the working folder where it lies under it, else as it is."""
  path = Path(path)
  try:
    return str(path.resolve().relative_to(Path.cwd().resolve()))
  except ValueError:
    return str(path)
