"""The Gram-matrix kernel of the covariance fold on this CPU: which formulation is fastest.

Every variant is memedit's whole fold (``memedit.moments.fold_keys``: shift, weights,
finiteness check, exact counts) with a different kernel for the Gram matrix XᵀX of each
(n, d) chunk, run over the same chunks already on the device, interleaved round by round:

- gemm: XLA's full GEMM (``memedit.gram.gram_xla``; the fold before the symmetric kernel);
- syrk: BLAS ``?syrk`` (numpy's ``X.T @ X``) from the compiled fold by a
  ``jax.experimental.buffer_callback`` that reads the chunk in place (``gram_blas``);
- syrk by pure_callback: the same through ``jax.pure_callback`` (copies its operand);
- XLA block rows b: each block of b columns against the trailing columns, in XLA
  (``gram_blocked``, 56 to 75 % of the GEMM's multiply-adds);
- syrk, k chunks per program: the dispatch of one program amortised over k chunks;
- and numpy's bare ``X.T @ X`` per chunk (no shift, no checks) as the reference.

Usage: python benchmarks/gram_kernels.py [--quick] [--chunks N] [--dim D] [--rounds R]
       [--out-dir DIR]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import numpy as np

import memedit
from benchmarks.common import add_out_dir, positive_int, results_path, table, write_to
from memedit import gram, moments


def _pure_callback_syrk(x):
  out = jax.ShapeDtypeStruct((x.shape[-1],) * 2, x.dtype)
  return jax.pure_callback(lambda a: np.asarray(a).T @ np.asarray(a), out, x)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--quick", action="store_true", help="small smoke run")
  ap.add_argument("--chunks", type=positive_int, default=16, help="chunks folded")
  ap.add_argument("--chunk", type=positive_int, default=15_625, help="keys per chunk")
  ap.add_argument("--dim", type=positive_int, default=512)
  ap.add_argument("--rounds", type=positive_int, default=5, help="interleaved rounds")
  add_out_dir(ap)
  args = ap.parse_args(argv)
  out = results_path(ap, args, "gram_kernels",
                     variants=("--chunks", "--chunk", "--dim", "--rounds"),
                     suffix=_blas_suffix())
  if args.quick:
    args.chunks, args.chunk, args.rounds = 4, 4096, 2
  d, n_chunks = args.dim, args.chunks
  rng = np.random.default_rng(0)
  host = [rng.standard_normal((args.chunk, d), dtype=np.float32) + 3.0 for _ in range(n_chunks)]
  chunks = [jax.device_put(x) for x in host]
  st0 = memedit.covariance_init(d, shift=np.full(d, 3.0, np.float32))

  variants = {
      "gemm (XLA full GEMM)": (gram.gram_xla, 4),
      "syrk (buffer_callback)": (gram.gram_blas, 4),
      "syrk (pure_callback)": (_pure_callback_syrk, 4),
      "XLA block rows b=64": (lambda x: gram.gram_blocked(x, 64), 4),
      "XLA block rows b=128": (lambda x: gram.gram_blocked(x, 128), 4),
      "XLA block rows b=256": (lambda x: gram.gram_blocked(x, 256), 4),
      "syrk, 1 chunk per program": (gram.gram_blas, 1),
  }
  many = min(16, n_chunks)  # the row names the number of chunks its programs really fold
  if many > 1:
    variants[f"syrk, {many} chunks per program"] = (gram.gram_blas, many)
  runs = {}
  real_gram = moments.gram
  for name, (kernel, k) in variants.items():
    k = min(k, n_chunks)
    fn = jax.jit(lambda state, xs: _fold_all(state, xs))
    # The fold's keyword options (partitioned, side_by_side) are ignored: the variant's
    # kernel is the one measured.
    moments.gram = lambda x, kernel=kernel, **_: kernel(x)
    try:
      fn(st0, tuple(chunks[:k])).sum_sq.block_until_ready()  # traced with this kernel
    finally:
      moments.gram = real_gram

    def run(fn=fn, k=k):
      st = st0
      for i in range(0, n_chunks, k):
        st = fn(st, tuple(chunks[i:i + k]))
      return st.sum_sq.block_until_ready()

    runs[name] = run

  def numpy_syrk():
    for x in host:
      x.T @ x

  runs["numpy X.T @ X (bare, host)"] = numpy_syrk
  ref = np.asarray(runs["gemm (XLA full GEMM)"](), np.float64)
  agreement = {name: float(np.abs(np.asarray(r(), np.float64) - ref).max() / np.abs(ref).max())
               for name, r in runs.items() if not name.startswith("numpy")}
  load_before = os.getloadavg()
  times = {k: [] for k in runs}
  for _ in range(args.rounds):
    for name, run in runs.items():
      t = time.perf_counter()
      run()
      times[name].append(time.perf_counter() - t)
  load_after = os.getloadavg()
  base = statistics.median(times["gemm (XLA full GEMM)"])
  rows = []
  for name, ts in times.items():
    med = statistics.median(ts)
    rows.append({"kernel": name, "ms/chunk (median)": f"{med / n_chunks * 1e3:.1f}",
                 "ms/chunk (min)": f"{min(ts) / n_chunks * 1e3:.1f}",
                 "speed vs gemm": f"{base / med:.2f}x"})
  print(f"Gram kernels of the fold: {n_chunks} chunks of {args.chunk} x {d}, {args.rounds} "
        f"interleaved rounds, load average {load_before[0]:.2f} -> {load_after[0]:.2f}")
  print(table(rows, ["kernel", "ms/chunk (median)", "ms/chunk (min)", "speed vs gemm"]))
  print("largest difference to the gemm fold, relative to max |S|:", agreement)
  path = write_to(out, {
      "chunks": n_chunks, "chunk": args.chunk, "dim": d, "rounds": args.rounds,
      "seconds": times, "agreement": agreement, "load_average_before": load_before,
      "load_average_after": load_after,
      "openblas_threads": os.environ.get("OPENBLAS_NUM_THREADS"),
  })
  print(f"wrote {path}")


def _fold_all(state, chunks):
  for x in chunks:
    state = moments.fold_keys(state, x)
  return state


def _blas_suffix() -> str:
  """Results with BLAS pinned to one thread go to a file of their own."""
  threads = os.environ.get("OPENBLAS_NUM_THREADS")
  return f"_blas{threads}" if threads else ""


if __name__ == "__main__":
  main()
