"""Statistics over two processes: jax.distributed on 127.0.0.1 against one process.

Two JAX processes (CPU, gloo collectives, one device each) each fold their own half of a
stream with a ragged end through ``stream_covariance``; all processes end with the C of
the whole stream. Baseline, same run: one process folding the whole stream. Reported:
wall time of the call in each process (first call, with compilation, and a second call),
keys/s, and the agreement of C with the single-process result and with float64.

On one machine the two processes share its cores, so this measures the cost of the
multi-process path (lockstep steps, the final exact merge), not a speed-up; on several
hosts each process brings its own devices.

Usage: python benchmarks/multihost_stats.py [--quick] [--keys N] [--dim D]
       [--batch B] [--out-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import add_out_dir, positive_int, results_path  # noqa: E402


def shard(p: int, n_keys: int, dim: int, batch: int):
  """Process p's half of the stream: batches of ``batch`` keys and a ragged last one."""
  import numpy as np

  rng = np.random.default_rng(10 + p)
  mean = np.linspace(-5.0, 5.0, dim).astype(np.float32)
  rows = n_keys // 2 + (37 if p == 0 else -37)  # unequal halves, both with a ragged end
  sizes = [batch] * (rows // batch) + ([rows % batch] if rows % batch else [])
  return [rng.standard_normal((s, dim), dtype=np.float32) + mean for s in sizes]


def _fold(batches):
  import memedit

  t = time.perf_counter()
  st = memedit.stream_covariance(batches, group=8, progress=False)
  st.sum_sq.block_until_ready()
  return st, time.perf_counter() - t


def worker(pid: int, port: str, n_keys: int, dim: int, batch: int) -> None:
  import jax

  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                             process_id=pid)
  import numpy as np
  import memedit

  batches = shard(pid, n_keys, dim, batch)
  _, first = _fold(batches)
  st, warm = _fold(batches)
  print(json.dumps(dict(pid=pid, first_s=first, warm_s=warm, keys=memedit.key_count(st),
                        local_keys=int(sum(len(b) for b in batches)),
                        C=np.asarray(memedit.second_moment(st)).tolist())))


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--quick", action="store_true", help="small smoke run")
  ap.add_argument("--keys", type=positive_int, default=1_000_000,
                  help="keys of the whole stream (at least 76)")
  ap.add_argument("--dim", type=positive_int, default=256)
  ap.add_argument("--batch", type=positive_int, default=8192, help="keys per batch")
  ap.add_argument("--worker", nargs=2, metavar=("PID", "PORT"), help=argparse.SUPPRESS)
  add_out_dir(ap)
  args = ap.parse_args(argv)
  out = results_path(ap, args, "multihost_stats", variants=("--keys", "--dim", "--batch"))
  if args.quick:
    args.keys, args.dim = 40_000, 32
  if args.keys < 76:  # the halves differ by 74 keys and both hold some
    ap.error(f"--keys: expected at least 76, got {args.keys}")
  if args.worker:
    return worker(int(args.worker[0]), args.worker[1], args.keys, args.dim, args.batch)

  import numpy as np

  from benchmarks.common import table, write_to

  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = str(s.getsockname()[1])
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=1")
  cmd = [sys.executable, __file__, "--keys", str(args.keys), "--dim", str(args.dim),
         "--batch", str(args.batch), "--worker"]
  # Workers write to files: a pipe read one worker after the other could fill up and
  # stall the second worker before the shutdown barrier both must reach.
  with tempfile.TemporaryDirectory() as tmp:
    files = [open(os.path.join(tmp, f"worker{p}.json"), "w+") for p in (0, 1)]
    procs = [subprocess.Popen(cmd + [str(p), port], stdout=files[p], env=env) for p in (0, 1)]
    outs = []
    for p, f in zip(procs, files):
      if p.wait(timeout=1800) != 0:
        raise SystemExit(f"worker exited with {p.returncode}")
      f.seek(0)
      outs.append(json.loads(f.read().strip().splitlines()[-1]))
      f.close()

  # Baseline in this process: the whole stream, one process.
  import memedit

  whole = shard(0, args.keys, args.dim, args.batch) + shard(1, args.keys, args.dim, args.batch)
  _, one_first = _fold(whole)
  one, one_warm = _fold(whole)
  c_one = np.asarray(memedit.second_moment(one), np.float64)
  x = np.concatenate(whole).astype(np.float64)
  ref = x.T @ x / len(x)
  rel = lambda a, b: float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))
  n = len(x)
  rows = [dict(run="2 processes (process 0)", keys=n, first_s=round(outs[0]["first_s"], 3),
               warm_s=round(outs[0]["warm_s"], 3), keys_per_s=round(n / outs[0]["warm_s"]),
               rel_vs_float64=f"{rel(outs[0]['C'], ref):.1e}",
               rel_vs_one_process=f"{rel(outs[0]['C'], c_one):.1e}"),
          dict(run="2 processes (process 1)", keys=n, first_s=round(outs[1]["first_s"], 3),
               warm_s=round(outs[1]["warm_s"], 3), keys_per_s=round(n / outs[1]["warm_s"]),
               rel_vs_float64=f"{rel(outs[1]['C'], ref):.1e}",
               rel_vs_one_process=f"{rel(outs[1]['C'], c_one):.1e}"),
          dict(run="1 process (baseline)", keys=n, first_s=round(one_first, 3),
               warm_s=round(one_warm, 3), keys_per_s=round(n / one_warm),
               rel_vs_float64=f"{rel(c_one, ref):.1e}", rel_vs_one_process="0")]
  print(table(rows, ["run", "keys", "first_s", "warm_s", "keys_per_s", "rel_vs_float64",
                     "rel_vs_one_process"]))
  same = outs[0]["C"] == outs[1]["C"]
  ratio = one_warm / max(outs[0]["warm_s"], outs[1]["warm_s"])
  print(f"C identical on both processes: {same}; counts {outs[0]['keys']} / {outs[1]['keys']} "
        f"(expected {n}); 2-process speed vs 1 process: {ratio:.2f}x")
  if not args.quick:
    path = write_to(out, dict(
        args={k: v for k, v in vars(args).items() if k != "out_dir"}, rows=rows,
        identical_on_processes=same, counts=[o["keys"] for o in outs],
        local_keys=[o["local_keys"] for o in outs], ratio_two_processes_vs_one=ratio))
    print(f"wrote {path}")


if __name__ == "__main__":
  main()
