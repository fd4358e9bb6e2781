"""Covariance fold throughput: memedit's streaming fold against numpy's XᵀX and the old fold.

All run over the same host (numpy) chunks in the same process, interleaved round by
round (A B C A B C …) so that a busy machine slows each alike; the medians of the rounds
and the median of the per-round ratios are reported with the load average:

- memedit: ``stream_covariance`` (shifted sums, weights, finiteness checks, exact
  counts): on the CPU the chunks are staged minus the shift by a reader thread and
  folded pre-shifted, their Gram matrices side by side with the kernel ``auto`` picks
  for that case (``memedit.gram.cpu_kernel(side_by_side=True)``);
- the fold program with each kernel on the raw chunks, driven the way
  ``stream_covariance`` drove raw keys before staging (one program per group of chunks,
  the shift subtracted inside): BLAS ``syrk`` called from the compiled fold, and XLA's
  full GEMM (the old fold, before the symmetric kernel);
- numpy: a Python loop of ``S += X.T @ X`` (BLAS ``syrk``, unshifted, unchecked).

With ``OPENBLAS_NUM_THREADS`` set, the results go to ``covariance_fold_blasN.json``.
The accuracy of memedit's C against a float64 reference is checked too.

Usage: python benchmarks/covariance_fold.py [--quick] [--keys N] [--dim D] [--chunk N]
       [--group G] [--rounds R] [--out-dir DIR]
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
from memedit import gram
from memedit.moments import fold_keys


def _program():
  """The fold of a group of raw key chunks (its Gram kernel is fixed when it is traced)."""

  @jax.jit
  def fold(state, batches):
    for b in batches:
      state = fold_keys(state, b, None)
    return state

  return fold


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--quick", action="store_true", help="small smoke run")
  ap.add_argument("--keys", type=positive_int, default=1_000_000,
                  help="keys folded (whole chunks of them)")
  ap.add_argument("--dim", type=positive_int, default=512)
  ap.add_argument("--chunk", type=positive_int, default=15_625, help="keys per chunk")
  ap.add_argument("--group", type=positive_int, default=16, help="chunks per program")
  ap.add_argument("--rounds", type=positive_int, default=5, help="interleaved rounds")
  add_out_dir(ap)
  args = ap.parse_args(argv)
  out = results_path(ap, args, "covariance_fold",
                     variants=("--keys", "--dim", "--chunk", "--group", "--rounds"),
                     suffix=_blas_suffix() + ("" if jax.default_backend() == "cpu"
                                              else f"_{jax.default_backend()}"))
  if args.quick:
    args.keys, args.group, args.rounds = 62_500, 4, 2
  if args.keys < args.chunk:
    ap.error(f"--keys: expected at least one chunk of --chunk {args.chunk} keys, "
             f"got {args.keys}")
  d, chunk = args.dim, args.chunk
  n_chunks = args.keys // chunk
  n = n_chunks * chunk
  rng = np.random.default_rng(0)
  mean = 10 * rng.standard_normal(d).astype(np.float32)
  chunks = [rng.standard_normal((chunk, d), dtype=np.float32) + mean for _ in range(n_chunks)]
  load_before = os.getloadavg()

  def ours():
    st = memedit.stream_covariance(chunks, group=args.group, progress=False)
    st.sum_sq.block_until_ready()
    return st

  programs = {}
  for kernel in ("syrk", "gemm"):
    fold = _program()
    setting, gram.CPU_GRAM = gram.CPU_GRAM, kernel
    try:  # traced (and compiled) with this kernel, kept for the timed runs
      fold(memedit.covariance_init(d), tuple(chunks[:args.group])).sum_sq.block_until_ready()
    finally:
      gram.CPU_GRAM = setting
    programs[kernel] = fold

  def by_program(kernel):
    def run():
      st = memedit.covariance_init(d)
      for i in range(0, n_chunks, args.group):
        st = programs[kernel](st, tuple(chunks[i:i + args.group]))
      st.sum_sq.block_until_ready()
      return st
    return run

  def numpy_loop():
    s = np.zeros((d, d), np.float32)
    for x in chunks:
      s += x.T @ x
    return s

  t0 = time.perf_counter()
  st = ours()
  first_s = time.perf_counter() - t0
  ours_name = f"memedit stream_covariance (staged, {gram.cpu_kernel(side_by_side=True)})"
  methods = {ours_name: ours, "fold program, BLAS syrk": by_program("syrk"),
             "old fold (XLA GEMM)": by_program("gemm"), "numpy X.T @ X loop": numpy_loop}
  times = {k: [] for k in methods}
  for _ in range(args.rounds):
    for name, fn in methods.items():
      t = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - t)
  load_after = os.getloadavg()

  # Accuracy: float64 reference of C (uncentered) and of the centered covariance.
  s1 = np.zeros(d)
  s2 = np.zeros((d, d))
  for x in chunks:
    x64 = x.astype(np.float64)
    s1 += x64.sum(0)
    s2 += x64.T @ x64
  mu = s1 / n
  rel = lambda a, b: float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))
  accuracy = {"second_moment": rel(memedit.second_moment(st), s2 / n),
              "centered": rel(memedit.centered_covariance(st), s2 / n - np.outer(mu, mu))}

  ours_t = np.array(times[ours_name])
  syrk_t = np.array(times["fold program, BLAS syrk"])
  old_t = np.array(times["old fold (XLA GEMM)"])
  summary = {
      "numpy_over_memedit_median_of_rounds":
          float(np.median(np.array(times["numpy X.T @ X loop"]) / ours_t)),
      "old_over_memedit_median_of_rounds": float(np.median(old_t / ours_t)),
      "old_over_syrk_program_median_of_rounds": float(np.median(old_t / syrk_t)),
  }
  summary["numpy_over_memedit_ratio_of_medians"] = (
      statistics.median(times["numpy X.T @ X loop"]) / float(np.median(ours_t)))
  summary["old_over_memedit_ratio_of_medians"] = (
      statistics.median(times["old fold (XLA GEMM)"]) / float(np.median(ours_t)))
  rows = []
  for name, ts in times.items():
    med = statistics.median(ts)
    rows.append({"method": name, "median s": f"{med:.3f}", "min s": f"{min(ts):.3f}",
                 "Mkeys/s": f"{n / med / 1e6:.3f}", "speed vs memedit": f"{np.median(ours_t) / med:.2f}x"})
  print(f"covariance fold: {n:,} keys, d = {d}, chunks of {chunk}, groups of {args.group}, "
        f"{args.rounds} interleaved rounds, backend {jax.default_backend()}, "
        f"load average {load_before[0]:.2f} -> {load_after[0]:.2f}")
  print(table(rows, ["method", "median s", "min s", "Mkeys/s", "speed vs memedit"]))
  for k, v in summary.items():
    print(f"{k}: {v:.3f}")
  print(f"accuracy vs float64 (relative Frobenius): {accuracy}")
  print(f"first call of stream_covariance (with compilation): {first_s:.2f} s")
  path = write_to(out, {
      "keys": n, "dim": d, "chunk": chunk, "group": args.group, "rounds": args.rounds,
      "seconds": times, "summary": summary, "accuracy": accuracy,
      "first_call_seconds": first_s, "load_average_before": load_before,
      "load_average_after": load_after,
      "cpu_gram": gram.CPU_GRAM, "cpu_kernel": gram.cpu_kernel(),
      "cpu_kernel_side_by_side": gram.cpu_kernel(side_by_side=True),
      "openblas_threads": os.environ.get("OPENBLAS_NUM_THREADS"),
  })
  print(f"wrote {path}")


def _blas_suffix() -> str:
  """Results with BLAS pinned to one thread go to a file of their own."""
  threads = os.environ.get("OPENBLAS_NUM_THREADS")
  return f"_blas{threads}" if threads else ""


if __name__ == "__main__":
  main()
