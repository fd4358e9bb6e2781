"""Covariance fold throughput: memedit's streaming fold against the bare XᵀX roofline.

All three run over the same chunks in the same process:
- memedit: ``stream_covariance`` (shifted sums, weights, finiteness checks, exact counts),
  one compiled ``lax.scan`` per group of chunks;
- the same with the chunks already on the device (on a GPU the first row is bound by the
  host-to-device copy; on the CPU the two coincide);
- XLA XᵀX: a jitted ``lax.scan`` doing only S += XᵀX on the same chunks, stacked on the
  device beforehand (the compute roofline of this machine for this reduction);
- numpy: a Python loop of ``S += X.T @ X``.

Usage: python benchmarks/covariance_fold.py [--quick] [--keys N] [--dim D]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import memedit
from benchmarks.common import best_of, table, write


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--quick", action="store_true", help="small smoke run")
  ap.add_argument("--keys", type=int, default=1_000_000)
  ap.add_argument("--dim", type=int, default=512)
  ap.add_argument("--chunk", type=int, default=15_625)
  ap.add_argument("--group", type=int, default=16)
  ap.add_argument("--repeats", type=int, default=3)
  args = ap.parse_args(argv)
  if args.quick:
    args.keys, args.repeats = 64_000, 1
  d, chunk = args.dim, args.chunk
  n_chunks = args.keys // chunk
  n = n_chunks * chunk
  rng = np.random.default_rng(0)
  mean = 10 * rng.standard_normal(d).astype(np.float32)
  chunks = [rng.standard_normal((chunk, d), dtype=np.float32) + mean for _ in range(n_chunks)]
  stacked = jax.device_put(np.stack(chunks))
  flops = 2.0 * n * d * d

  def ours():
    st = memedit.stream_covariance(chunks, group=args.group, progress=False)
    st.sum_sq.block_until_ready()
    return st

  @jax.jit
  def xla_xtx(xs):
    def body(s, x):
      return s + jnp.einsum("nd,ne->de", x, x, precision=lax.Precision.HIGHEST,
                            preferred_element_type=jnp.float32), None
    return lax.scan(body, jnp.zeros((d, d), jnp.float32), xs)[0]

  device_chunks = [jax.device_put(x) for x in chunks]

  def ours_resident():
    st = memedit.stream_covariance(device_chunks, group=args.group, progress=False)
    st.sum_sq.block_until_ready()

  def roofline():
    xla_xtx(stacked).block_until_ready()

  def numpy_loop():
    s = np.zeros((d, d), np.float32)
    for x in chunks:
      s += x.T @ x
    return s

  t0 = time.perf_counter()
  ours()
  compile_s = time.perf_counter() - t0
  roofline()
  rows = []
  timings = {}
  ours_resident()
  for name, fn in (("memedit stream_covariance", ours),
                   ("memedit, chunks already on the device", ours_resident),
                   ("XLA XᵀX scan (roofline)", roofline),
                   ("numpy X.T @ X loop", numpy_loop)):
    t = best_of(fn, args.repeats)
    timings[name] = t
  base = timings["XLA XᵀX scan (roofline)"]
  for name, t in timings.items():
    rows.append({"method": name, "seconds": f"{t:.3f}", "Mkeys/s": f"{n / t / 1e6:.3f}",
                 "GFLOP/s": f"{flops / t / 1e9:.1f}", "vs roofline": f"{base / t:.2f}x"})
  print(f"covariance fold: {n:,} keys, d = {d}, chunks of {chunk}, backend {jax.default_backend()}")
  print(table(rows, ["method", "seconds", "Mkeys/s", "GFLOP/s", "vs roofline"]))
  print(f"first call of stream_covariance (with compilation): {compile_s:.2f} s")
  path = write("covariance_fold", {
      "keys": n, "dim": d, "chunk": chunk, "group": args.group, "repeats": args.repeats,
      "seconds": timings, "first_call_seconds": compile_s,
      "ratio_vs_roofline": base / timings["memedit stream_covariance"],
      "ratio_resident_vs_roofline": base / timings["memedit, chunks already on the device"],
      "ratio_vs_numpy": timings["numpy X.T @ X loop"] / timings["memedit stream_covariance"],
  }, suffix=("_quick" if args.quick else "") + ("" if jax.default_backend() == "cpu" else f"_{jax.default_backend()}"))
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
