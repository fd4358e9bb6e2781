"""Peak memory of ``memedit stats`` against the number of samples: it should stay flat.

Runs ``python -m memedit.cli stats MODEL --layer LAYER --samples N`` for each N in its own
process (with a fresh statistics cache, so every run computes), and reads the peak
resident memory of that process (``ru_maxrss`` of a waited child, measured by a wrapper
process per run so that runs do not share one maximum), with its wall time.

Usage: python benchmarks/stats_memory.py [--model DIR] [--layer L] [--samples 1000 10000]
       [--batch-size B] [--out-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import add_out_dir, positive_int, results_path, table, write_to

ROOT = Path(__file__).resolve().parents[1]

# Runs the command given as argv[1:] and prints its peak RSS (bytes) and wall time.
WRAPPER = """
import json, resource, subprocess, sys, time
t = time.perf_counter()
proc = subprocess.run(sys.argv[1:], capture_output=True, text=True)
wall = time.perf_counter() - t
peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
print(json.dumps(dict(rc=proc.returncode, peak=peak, wall=wall, out=proc.stdout[-500:],
                      err=proc.stderr[-2000:])))
"""


def _without_paths(text: str, model: str) -> str:
  """``text`` with the model folder named by its name and the repository's path left out
  (no machine paths in the results)."""
  text = text.replace(str(ROOT) + os.sep, "")
  for form in {os.path.abspath(model), os.path.realpath(model)}:
    text = text.replace(form, Path(model).name)
  return text


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--model", default=str(ROOT / ".cache" / "demo" / "faces-dcgan"))
  ap.add_argument("--layer", default="convt2")
  ap.add_argument("--samples", type=positive_int, nargs="+", default=[1000, 10000])
  ap.add_argument("--batch-size", type=positive_int, default=50)
  add_out_dir(ap)
  args = ap.parse_args(argv)
  if not os.path.isdir(args.model):
    ap.error(f"--model: expected a converted model folder, got {args.model!r} (missing; "
             "`make demo` converts the default)")
  out = results_path(ap, args, "stats_memory", inputs=("--model",),
                     variants=("--layer", "--samples", "--batch-size"))
  load_before = os.getloadavg()
  runs = {}
  for n in args.samples:
    with tempfile.TemporaryDirectory() as cache:
      cmd = [sys.executable, "-m", "memedit.cli", "stats", args.model, "--layer", args.layer,
             "--samples", str(n), "--batch-size", str(args.batch_size), "--cache-dir", cache,
             "--no-progress"]
      proc = subprocess.run([sys.executable, "-c", WRAPPER, *cmd], capture_output=True,
                            text=True, cwd=ROOT)
      if proc.returncode != 0:
        raise SystemExit(proc.stderr)
      r = json.loads(proc.stdout.strip().splitlines()[-1])
      if r["rc"] != 0:
        raise SystemExit(f"memedit stats --samples {n} failed:\n{r['err']}")
      runs[n] = {"peak_rss_bytes": r["peak"], "wall_seconds": r["wall"],
                 "output": _without_paths(r["out"].strip(), args.model)}
  load_after = os.getloadavg()
  rows = [{"samples": n, "peak RSS (MiB)": f"{r['peak_rss_bytes'] / 2**20:.0f}",
           "wall s": f"{r['wall_seconds']:.1f}"} for n, r in runs.items()]
  first, last = runs[args.samples[0]], runs[args.samples[-1]]
  growth = last["peak_rss_bytes"] / first["peak_rss_bytes"] - 1.0
  print(f"memedit stats {Path(args.model).name} --layer {args.layer}, load average "
        f"{load_before[0]:.2f} -> {load_after[0]:.2f}")
  print(table(rows, ["samples", "peak RSS (MiB)", "wall s"]))
  print(f"peak RSS growth from {args.samples[0]} to {args.samples[-1]} samples: "
        f"{100 * growth:+.1f} %")
  path = write_to(out, {
      "model": Path(args.model).name, "layer": args.layer, "batch_size": args.batch_size,
      "runs": {str(n): r for n, r in runs.items()}, "peak_growth": growth,
      "load_average_before": load_before, "load_average_after": load_after})
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
