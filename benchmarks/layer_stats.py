"""Layer statistics through a whole model: memedit.layers.layer_covariance against the bare work.

Model: a DCGAN-like NNX generator (latent -> 4x4 -> three ConvTranspose upsamplings with a
3x3 conv in the middle -> RGB); statistics of the middle conv's per-pixel keys.
All three run over the same latents in the same process:
- memedit: ``layer_covariance(model, ('mid',), batches)`` (class-swap capture inside the
  compiled program, shifted sums, weights, exact counts; one compiled fold per group);
- bare: one jitted ``lax.scan`` that runs a hand-written forward as far as the layer and
  does only S += XᵀX on its keys (what the work costs without memedit);
- eager: the layer's keys captured without jit (``capture(..., jit=False)``) and folded
  with numpy, batch by batch.
Every timing includes compilation (each run compiles afresh, as a user's first call does);
the marginal rows (time difference between two stream lengths per extra batch) leave the
fixed costs out.

Usage: python benchmarks/layer_stats.py [--quick] [--batches N] [--batch B]
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
from flax import nnx
from jax import lax

import memedit
from memedit.layers import capture, layer_covariance
from benchmarks.common import table, write


class Generator(nnx.Module):
  def __init__(self, *, rngs, z=64, c=256):
    self.c = c
    self.fc = nnx.Linear(z, 4 * 4 * c, rngs=rngs)
    self.up1 = nnx.ConvTranspose(c, c // 2, (4, 4), strides=(2, 2), padding="SAME", rngs=rngs)
    self.up2 = nnx.ConvTranspose(c // 2, c // 4, (4, 4), strides=(2, 2), padding="SAME",
                                 rngs=rngs)
    self.mid = nnx.Conv(c // 4, c // 4, (3, 3), padding="SAME", rngs=rngs)
    self.up3 = nnx.ConvTranspose(c // 4, 3, (4, 4), strides=(2, 2), padding="SAME", rngs=rngs)

  def __call__(self, z):
    x = nnx.relu(self.fc(z)).reshape(z.shape[0], 4, 4, self.c)
    x = nnx.relu(self.up1(x))
    x = nnx.relu(self.up2(x))
    x = nnx.relu(self.mid(x))
    return jnp.tanh(self.up3(x))


def _timed(fn):
  t = time.perf_counter()
  out = fn()
  jax.block_until_ready(out)
  return time.perf_counter() - t, out


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--quick", action="store_true", help="small smoke run")
  ap.add_argument("--batches", type=int, default=96)
  ap.add_argument("--batch", type=int, default=64)
  ap.add_argument("--group", type=int, default=8)
  ap.add_argument("--eager-batches", type=int, default=16)
  args = ap.parse_args(argv)
  if args.quick:
    args.batches, args.batch, args.eager_batches = 16, 16, 4
  model = nnx.jit(lambda: Generator(rngs=nnx.Rngs(0)))()
  gd, state = nnx.split(model)
  zdim = 64
  rng = np.random.default_rng(0)
  latents = [rng.standard_normal((args.batch, zdim), dtype=np.float32)
             for _ in range(args.batches)]
  d = 64

  def memedit_run(n):
    return layer_covariance((gd, state), ("mid",), latents[:n], group=args.group).sum_sq

  def bare_run(n):
    def keys_of(st, z):  # hand-written forward as far as the layer
      g = nnx.merge(gd, st)
      x = nnx.relu(g.fc(z)).reshape(z.shape[0], 4, 4, g.c)
      x = nnx.relu(g.up2(nnx.relu(g.up1(x))))
      return x.reshape(-1, d)

    @jax.jit
    def fold(st, zs):
      def body(s, z):
        x = keys_of(st, z)
        return s + jnp.einsum("nd,ne->de", x, x, precision=lax.Precision.HIGHEST), None
      return lax.scan(body, jnp.zeros((d, d), jnp.float32), zs)[0]
    return fold(state, np.stack(latents[:n]))

  def eager_run(n):
    s = np.zeros((d, d), np.float32)
    for z in latents[:n]:
      x = np.asarray(capture((gd, state), ("mid",), z, jit=False).keys).reshape(-1, d)
      s += x.T @ x
    return s

  half = max(args.group, args.batches // 2)
  rows = []
  results = {}
  for name, fn, ns in (("memedit layer_covariance", memedit_run, (half, args.batches)),
                       ("bare jit forward + XᵀX", bare_run, (half, args.batches)),
                       ("eager capture + numpy", eager_run, (args.eager_batches // 2,
                                                             args.eager_batches))):
    fn(ns[0])  # warm the process (imports, eager op caches); every run compiles afresh
    t1, _ = _timed(lambda: fn(ns[0]))
    t2, out = _timed(lambda: fn(ns[1]))
    per_batch = max(t2 - t1, 1e-9) / (ns[1] - ns[0])
    total_per_batch = t2 / ns[1]
    results[name] = {"batches": ns[1], "seconds": t2, "seconds_per_batch": total_per_batch,
                     "marginal_seconds_per_batch": per_batch}
    keys = ns[1] * args.batch * 16 * 16
    rows.append({"method": name, "batches": ns[1], "keys": keys, "total s": f"{t2:.3f}",
                 "s/batch (total)": f"{total_per_batch * 1e3:.2f} ms",
                 "s/batch (marginal)": f"{per_batch * 1e3:.2f} ms",
                 "keys/s (total)": f"{keys / t2:,.0f}"})
  ours = results["memedit layer_covariance"]
  bare = results["bare jit forward + XᵀX"]
  eager = results["eager capture + numpy"]
  summary = {
      "memedit_over_bare_total": ours["seconds_per_batch"] / bare["seconds_per_batch"],
      "memedit_over_bare_marginal": (ours["marginal_seconds_per_batch"]
                                     / bare["marginal_seconds_per_batch"]),
      "eager_over_memedit_total": eager["seconds_per_batch"] / ours["seconds_per_batch"],
  }
  print(table(rows, ["method", "batches", "keys", "total s", "s/batch (total)",
                     "s/batch (marginal)", "keys/s (total)"]))
  for k, v in summary.items():
    print(f"{k}: {v:.3f}")
  path = write("layer_stats", {"args": vars(args), "results": results, "summary": summary},
               suffix="_quick" if args.quick else "")
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
