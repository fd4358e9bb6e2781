"""The Λ solve on a demodulated 3×3 convolution (StyleGAN2's memory), in one run:

- reference procedure: 2001 Adam steps (lr 0.05, L1) as a Python loop of jitted steps,
  f on the full kernel K0 + ΔK(Λ, D) at every step;
- memedit ``solve_lambda(optimizer="adam")``: the same 2001 steps in one jitted lax.scan,
  with the convolution's contraction of the kernel factored (K0's part once, ΔK's through
  the keys projected onto D; the default);
- the same scan with ``factored=False`` (the full kernel at every step), which separates
  the scan's share of the speed-up from the factoring's;
- memedit ``solve_lambda(optimizer="gauss_newton")``: as few steps as reach the loss the
  2001 Adam steps end at (found from a longer run's loss trace, then timed alone).

Usage: python benchmarks/lambda_solve.py [--quick] [--channels C] [--size S] [--rank R]
       [--steps N] [--repeats N] [--out-dir DIR]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

import memedit
from benchmarks.common import (add_out_dir, best_of, positive_int, results_path, table,
                               write_to)


def demod_conv(kernel, keys):
  """conv(x·s, W) · rsqrt(Σ (W s)² + 1e-8): demodulation recomputed from the kernel."""
  x_mod, style = keys
  y = lax.conv_general_dilated(x_mod, kernel, (1, 1), "SAME",
                               dimension_numbers=("NHWC", "HWIO", "NHWC"))
  w = kernel[None] * style[:, None, None, :, None]
  demod = lax.rsqrt(jnp.sum(w * w, axis=(1, 2, 3)) + 1e-8)
  return y * demod[:, None, None, :]


def dense_layer(kernel, keys):
  """A Dense memory followed by a non-linearity: f(W, k) = tanh(k W)."""
  return jnp.tanh(keys @ kernel)


def make_dense_problem(channels, n_keys, rank, seed=0):
  rng = np.random.default_rng(seed)
  K0 = (rng.standard_normal((channels, channels)) / np.sqrt(channels)).astype(np.float32)
  sample = rng.standard_normal((4096, channels)) + 0.5
  C = (sample.T @ sample / len(sample)).astype(np.float32)
  keys = jnp.asarray(rng.standard_normal((n_keys, channels)).astype(np.float32) + 0.5)
  D = memedit.context_directions(C, keys, rank=rank).D
  targets = dense_layer(jnp.asarray(K0), keys) + 0.3 * jnp.asarray(
      rng.standard_normal((n_keys, channels)).astype(np.float32))
  return jnp.asarray(K0), D, keys, jnp.clip(targets, -0.99, 0.99)


def make_problem(channels, size, rank, seed=0):
  rng = np.random.default_rng(seed)
  cin = cout = channels
  K0 = (rng.standard_normal((3, 3, cin, cout)) / np.sqrt(9 * cin)).astype(np.float32)
  style = rng.uniform(0.5, 1.5, (1, cin)).astype(np.float32)
  x = np.maximum(rng.standard_normal((1, size, size, cin)), 0).astype(np.float32)
  keys = (jnp.asarray(x * style[:, None, None, :]), jnp.asarray(style))
  # Context: the keys of the crop's centre; target: outputs with a pasted pattern there.
  ctx = x[0, size // 4: 3 * size // 4, size // 4: 3 * size // 4].reshape(-1, cin) * style
  sample = np.maximum(rng.standard_normal((4096, cin)), 0) * rng.uniform(0.5, 1.5, (4096, cin))
  C = sample.T @ sample / len(sample)
  D = memedit.context_directions(C.astype(np.float32), ctx.astype(np.float32),
                                 rank=rank).D
  base = demod_conv(jnp.asarray(K0), keys)
  paste = rng.standard_normal((1, size // 2, size // 2, cout)).astype(np.float32)
  targets = base.at[:, size // 4: 3 * size // 4, size // 4: 3 * size // 4].add(paste)
  return jnp.asarray(K0), D, keys, targets


def run_problem(f, K0, D, keys, targets, kind, args):
  """Times the three procedures on one problem; returns seconds, losses and table rows."""
  kw = dict(kind=kind, loss="l1")

  # Reference procedure: a Python loop of jitted Adam steps.
  loss_fn = memedit.lambda_loss_fn(f, K0, D, keys, targets, factored=False, **kw)
  opt = optax.adam(0.05)

  @jax.jit
  def step(lam, st):
    val, g = jax.value_and_grad(loss_fn)(lam)
    upd, st = opt.update(g, st, lam)
    return optax.apply_updates(lam, upd), st, val

  lam0 = jnp.zeros(memedit.lambda_shape(K0.shape, args.rank, kind), jnp.float32)

  def loop():
    lam, st = lam0, opt.init(lam0)
    for _ in range(args.steps):
      lam, st, _ = step(lam, st)
    return loss_fn(lam).block_until_ready()

  def scan(factored=True):
    return memedit.solve_lambda(f, K0, D, keys, targets, steps=args.steps, factored=factored,
                                **kw).final_loss.block_until_ready()

  def scan_full():
    return scan(False)

  loop_loss = float(loop())
  scan_loss = float(scan())
  full_loss = float(scan_full())
  t_loop = best_of(loop, args.repeats)
  t_scan = best_of(scan, args.repeats)
  t_full = best_of(scan_full, args.repeats)

  probe = memedit.solve_lambda(f, K0, D, keys, targets, optimizer="gauss_newton",
                               steps=60, **kw)
  trace = np.concatenate([np.asarray(probe.losses), [float(probe.final_loss)]])
  reached = np.nonzero(trace <= loop_loss)[0]
  if len(reached) == 0:
    raise SystemExit(f"Gauss–Newton did not reach the Adam loss {loop_loss:.4g} in 60 steps "
                     f"(best {trace.min():.4g})")
  k = max(int(reached[0]), 1)

  def gn():
    return memedit.solve_lambda(f, K0, D, keys, targets, optimizer="gauss_newton",
                                steps=k, **kw).final_loss.block_until_ready()

  gn_loss = float(gn())
  t_gn = best_of(gn, args.repeats)
  rows = [
      {"method": f"reference: {args.steps} Adam steps, Python loop of jitted steps",
       "seconds": f"{t_loop:.3f}", "final L1 loss": f"{loop_loss:.5g}", "speed-up": "1.00x"},
      {"method": f"memedit adam: {args.steps} steps in one jitted scan",
       "seconds": f"{t_scan:.3f}", "final L1 loss": f"{scan_loss:.5g}",
       "speed-up": f"{t_loop / t_scan:.2f}x"},
      {"method": f"memedit adam, factored=False: {args.steps} steps in one jitted scan",
       "seconds": f"{t_full:.3f}", "final L1 loss": f"{full_loss:.5g}",
       "speed-up": f"{t_loop / t_full:.2f}x"},
      {"method": f"memedit gauss_newton: {k} steps (32 CG each)",
       "seconds": f"{t_gn:.3f}", "final L1 loss": f"{gn_loss:.5g}",
       "speed-up": f"{t_loop / t_gn:.2f}x"},
  ]
  return {"rows": rows, "seconds": {"loop": t_loop, "scan": t_scan,
                                    "scan_unfactored": t_full, "gauss_newton": t_gn},
          "loss": {"loop": loop_loss, "scan": scan_loss, "scan_unfactored": full_loss,
                   "gauss_newton": gn_loss},
          "gauss_newton_steps": k, "speedup_scan_vs_loop": t_loop / t_scan,
          "speedup_scan_unfactored_vs_loop": t_loop / t_full,
          "speedup_gn_vs_loop": t_loop / t_gn}


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--quick", action="store_true", help="small smoke run")
  ap.add_argument("--channels", type=positive_int, default=256,
                  help="input and output channels")
  ap.add_argument("--size", type=positive_int, default=8,
                  help="side of the conv's keys (at least 2)")
  ap.add_argument("--rank", type=positive_int, default=1, help="rank of the edit")
  ap.add_argument("--steps", type=positive_int, default=2001, help="Adam steps")
  ap.add_argument("--repeats", type=positive_int, default=2, help="timed repeats (best of)")
  add_out_dir(ap)
  args = ap.parse_args(argv)
  out = results_path(ap, args, "lambda_solve",
                     variants=("--channels", "--size", "--rank", "--steps", "--repeats"),
                     suffix="" if jax.default_backend() == "cpu" else f"_{jax.default_backend()}")
  if args.quick:
    args.channels, args.steps, args.repeats = 32, 201, 1
  if args.size < 2:
    ap.error(f"--size: expected at least 2 (the context is the centre half), got {args.size}")
  context = (args.size // 2) ** 2
  if args.rank > min(args.channels, context):
    ap.error(f"--rank: expected at most {min(args.channels, context)} (the channels and the "
             f"{context} context keys of --size {args.size}), got {args.rank}")
  results = {}
  rows = []
  problems = [("conv", demod_conv, make_problem(args.channels, args.size, args.rank), "conv",
               f"demodulated 3×3 conv {args.channels}→{args.channels}, {args.size}×{args.size} keys"),
              ("dense", dense_layer, make_dense_problem(args.channels, 64, args.rank), "dense",
               f"tanh(Dense) {args.channels}→{args.channels}, 64 keys")]
  for name, f, (K0, D, keys, targets), kind, label in problems:
    res = run_problem(f, K0, D, keys, targets, kind, args)
    results[name] = dict(res, label=label)
    for r in res["rows"]:
      rows.append(dict(r, layer=label))
  print(f"Λ solve, rank {args.rank}, L1 loss, backend {jax.default_backend()}")
  print(table(rows, ["layer", "method", "seconds", "final L1 loss", "speed-up"]))
  for v in results.values():
    v.pop("rows")
  path = write_to(out, {"steps": args.steps, "rank": args.rank, "problems": results})
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
