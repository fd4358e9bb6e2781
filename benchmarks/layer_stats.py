"""Layer statistics through a whole model: memedit.layers.layer_covariance against the bare work.

Model: a DCGAN-like NNX generator (latent -> 4x4 -> three ConvTranspose upsamplings with a
3x3 conv in the middle -> RGB); statistics of the middle conv's per-pixel keys.
All three run over the same latents in the same process:
- memedit: ``layer_covariance(model, ('mid',), batches)`` (class-swap capture inside the
  compiled program, shifted sums, weights, exact counts; one compiled fold per group);
- bare: one jitted ``lax.scan`` that runs a hand-written forward as far as the layer and
  does only S += XᵀX on its keys (what the work costs without memedit);
- hooked: memedit's hooked forward to the layer (``layer_key_fn``) with the bare XᵀX
  fold, separating the capture's cost from the cost of memedit's fold and driver;
- eager: the layer's keys captured without jit (``capture(..., jit=False)``) and folded
  with numpy, batch by batch.
End-to-end timings include compilation (JAX's caches are cleared before every timed
call, so each compiles afresh as a user's first call does, although memedit keeps its
fold programs between calls; with few batches that fixed cost dominates). The "compiled"
column times the per-group program alone once compiled (for memedit: the program
stream_covariance runs, built with its internal group-fold constructor): the cost of the
work itself.

Usage: python benchmarks/layer_stats.py [--quick] [--batches N] [--batch B]
       [--group G] [--eager-batches N] [--repeats N] [--out-dir DIR]
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
from benchmarks.common import add_out_dir, positive_int, results_path, table, write_to


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


def first_call_seconds(fn, repeats: int) -> float:
  """Best of ``repeats`` timed calls of ``fn``, each after clearing JAX's compilation
  caches: every call compiles what it runs, as a first call in a fresh process does (the
  programs memedit keeps between calls included)."""
  times = []
  for _ in range(repeats):
    jax.clear_caches()
    times.append(_timed(fn)[0])
  return min(times)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--quick", action="store_true", help="small smoke run")
  ap.add_argument("--batches", type=positive_int, default=96, help="batches of latents")
  ap.add_argument("--batch", type=positive_int, default=64, help="latents per batch")
  ap.add_argument("--group", type=positive_int, default=8,
                  help="batches per compiled program (at most --batches)")
  ap.add_argument("--eager-batches", type=positive_int, default=8,
                  help="batches the eager capture runs (at most --batches)")
  ap.add_argument("--repeats", type=positive_int, default=2, help="timed repeats (best of)")
  add_out_dir(ap)
  args = ap.parse_args(argv)
  out = results_path(ap, args, "layer_stats", variants=(
      "--batches", "--batch", "--group", "--eager-batches", "--repeats"))
  if args.quick:
    args.batches, args.batch, args.eager_batches = 16, 32, 4
  for option in ("group", "eager_batches"):
    if getattr(args, option) > args.batches:
      ap.error(f"--{option.replace('_', '-')}: expected at most --batches "
               f"({args.batches}), got {getattr(args, option)}")
  model = nnx.jit(lambda: Generator(rngs=nnx.Rngs(0)))()
  gd, state = nnx.split(model)
  zdim = 64
  rng = np.random.default_rng(0)
  latents = [rng.standard_normal((args.batch, zdim), dtype=np.float32)
             for _ in range(args.batches)]
  d = 64

  def memedit_run(n):
    return layer_covariance((gd, state), ("mid",), latents[:n], group=args.group).sum_sq

  def memedit_steady():
    # The compiled program layer_covariance runs per group (via stream_covariance):
    # forward to the layer with the class-swap hook + the shifted, weighted fold.
    from memedit.covariance import covariance_init
    from memedit.fold_programs import make_group_fn
    from memedit.layers import layer_key_fn, memory_view
    key_fn = layer_key_fn((gd, state), memory_view((gd, state), ("mid",)))
    fn = make_group_fn(key_fn, d, 1)
    st0 = covariance_init(d, shift=np.zeros(d, np.float32))
    zs = np.stack(latents[:args.group])
    valid = np.ones((args.group, args.batch), bool)
    return lambda: fn(st0, None, zs, valid).sum_sq

  def keys_of(st, z):  # hand-written forward as far as the layer
    g = nnx.merge(gd, st)
    x = nnx.relu(g.fc(z)).reshape(z.shape[0], 4, 4, g.c)
    x = nnx.relu(g.up2(nnx.relu(g.up1(x))))
    return x.reshape(-1, d)

  def bare_fold():
    @jax.jit
    def fold(st, zs):
      def body(s, z):
        x = keys_of(st, z)
        return s + jnp.einsum("nd,ne->de", x, x, precision=lax.Precision.HIGHEST), None
      return lax.scan(body, jnp.zeros((d, d), jnp.float32), zs)[0]
    return fold

  def bare_run(n):
    return bare_fold()(state, np.stack(latents[:n]))

  def hooked_fold():
    # memedit's hooked forward to the layer (class swap, sown keys) + the bare XᵀX: isolates
    # the cost of the capture from the cost of memedit's fold.
    from memedit.layers import layer_key_fn, memory_view
    key_fn = layer_key_fn((gd, state), memory_view((gd, state), ("mid",)))

    @jax.jit
    def fold(zs):
      def body(s, z):
        x = key_fn(z).reshape(-1, d)
        return s + jnp.einsum("nd,ne->de", x, x, precision=lax.Precision.HIGHEST), None
      return lax.scan(body, jnp.zeros((d, d), jnp.float32), zs)[0]
    return fold

  def hooked_run(n):
    return hooked_fold()(np.stack(latents[:n]))

  def hooked_steady():
    fold = hooked_fold()
    zs = np.stack(latents[:args.group])
    return lambda: fold(zs)

  def bare_steady():
    fold = bare_fold()
    zs = np.stack(latents[:args.group])
    return lambda: fold(state, zs)

  def eager_run(n):
    s = np.zeros((d, d), np.float32)
    for z in latents[:n]:
      x = np.asarray(capture((gd, state), ("mid",), z, jit=False).keys).reshape(-1, d)
      s += x.T @ x
    return s

  reps = 1 if args.quick else args.repeats
  keys_per_batch = args.batch * 16 * 16
  results = {}
  # End to end, compilation included (each call compiles afresh, as a first call does;
  # eager capture keeps its per-operation caches, warmed here).
  for name, fn, n in (("memedit", memedit_run, args.batches), ("bare", bare_run, args.batches),
                      ("hooked", hooked_run, args.batches),
                      ("eager", eager_run, args.eager_batches)):
    fn(1 if name == "eager" else args.group)  # warm imports and eager op caches
    if name == "eager":
      t = min(_timed(lambda: fn(n))[0] for _ in range(reps))
    else:
      t = first_call_seconds(lambda: fn(n), reps)
    results[name] = {"batches": n, "seconds": t, "seconds_per_batch": t / n}
  # Steady state: the compiled per-group program alone, called again after compiling.
  for name, make in (("memedit", memedit_steady), ("bare", bare_steady),
                     ("hooked", hooked_steady)):
    run = make()
    _timed(run)
    t = min(_timed(run)[0] for _ in range(max(reps, 3)))
    results[name]["steady_seconds_per_batch"] = t / args.group
  results["eager"]["steady_seconds_per_batch"] = results["eager"]["seconds_per_batch"]

  rows = []
  labels = {"memedit": "memedit layer_covariance", "bare": "bare jit forward + XᵀX",
            "hooked": "memedit hooked forward + bare XᵀX", "eager": "eager capture + numpy"}
  for name, r in results.items():
    rows.append({"method": labels[name], "batches": r["batches"],
                 "total s (incl. compile)": f"{r['seconds']:.3f}",
                 "ms/batch (incl. compile)": f"{r['seconds_per_batch'] * 1e3:.2f}",
                 "ms/batch (compiled)": f"{r['steady_seconds_per_batch'] * 1e3:.2f}",
                 "keys/s (compiled)": f"{keys_per_batch / r['steady_seconds_per_batch']:,.0f}"})
  ours, bare, eager = results["memedit"], results["bare"], results["eager"]
  hooked = results["hooked"]
  summary = {
      "hooked_over_bare_compiled": hooked["steady_seconds_per_batch"]
                                   / bare["steady_seconds_per_batch"],
      "hooked_over_bare_incl_compile": hooked["seconds_per_batch"] / bare["seconds_per_batch"],
      "memedit_over_bare_compiled": ours["steady_seconds_per_batch"]
                                    / bare["steady_seconds_per_batch"],
      "memedit_over_bare_incl_compile": ours["seconds_per_batch"] / bare["seconds_per_batch"],
      "eager_over_memedit_compiled": eager["seconds_per_batch"]
                                     / ours["steady_seconds_per_batch"],
      "eager_over_memedit_incl_compile": eager["seconds_per_batch"] / ours["seconds_per_batch"],
  }
  columns = ["method", "batches", "total s (incl. compile)", "ms/batch (incl. compile)",
             "ms/batch (compiled)", "keys/s (compiled)"]
  print(table(rows, columns))
  for k, v in summary.items():
    print(f"{k}: {v:.3f}")
  path = write_to(out, {"args": {k: v for k, v in vars(args).items() if k != "out_dir"},
                        "results": results, "summary": summary})
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
