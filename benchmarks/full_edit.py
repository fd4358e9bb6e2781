"""A full edit (context directions + Λ solve) on a generator layer, memedit vs the
reference's procedure.

For each model a copy–paste problem is set up once (C from a latent sample, context keys
from masks on a few images, object values copied and pasted onto another image), then:

- reference: zca directions, then 2001 Adam steps (lr 0.05, L1) as a Python loop of
  jitted steps through the layer applied to the paste crop (the reference's procedure);
- memedit: ``rewrite.directions`` + ``solve_lambda(optimizer="gauss_newton")`` with the
  fewest Gauss–Newton steps (from a fixed ladder) whose final loss is at most the
  reference's, timed warm (compiled) and including compilation;
- also ``solve_lambda(optimizer="adam")``: the same 2001 steps inside one lax.scan.

Models: the DCGAN face generator (real weights of gan-face-generate 1.1.1, fetched like
the tests' peers; layer convt2) and a randomly initialised StyleGAN2 at 256 px (layer
conv_6, 32×32 keys of 512 channels). ``--quick`` runs a short smoke version (201
reference steps, StyleGAN2 at 64 px).

Usage: python benchmarks/full_edit.py [--quick]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import jax
import jax.numpy as jnp
import numpy as np
import optax

import memedit
from benchmarks.common import best_of, table, write
from memedit import rewrite as rw

GN_LADDER = (2, 3, 4, 6, 8, 12, 16, 24, 32)


def _box(y0, y1, x0, x1, canvas):
  m = np.zeros((canvas, canvas), np.float32)
  m[int(y0 * canvas):int(y1 * canvas), int(x0 * canvas):int(x1 * canvas)] = 1.0
  return m


def dcgan_generator():
  import peers
  from ports.dcgan import convert_dcgan

  _, weights = peers.gan_face_generate()
  out = ROOT / ".cache" / "bench" / "faces-dcgan"
  return rw.generator_from_converted(convert_dcgan(weights, out)), "convt2"


def stylegan2_generator(resolution):
  from ports.stylegan2 import model as sg2

  module = sg2.Generator(resolution=resolution,
                         channels=sg2.rosinality_channels(resolution, 2), z_dim=512,
                         w_dim=512, n_mlp=8)
  variables = jax.jit(module.init)(jax.random.PRNGKey(0), jnp.zeros((1, 512)))
  config = {"architecture": "stylegan2", "z_dim": 512, "resolution": resolution,
            "num_layers": sg2.num_conv_layers(resolution)}
  return rw.generator_from_config(module, variables, config), "conv_6"


def problem(gen, layer, n_stats):
  """(C, context keys, weights, target) of a copy–paste edit."""
  R = gen.resolution
  state = rw.collect_statistics(gen, layer, n_stats, batch_size=min(n_stats, 16),
                                progress=False)
  C = np.asarray(memedit.second_moment(state))
  ctx = [(n, _box(0.375, 0.5625, 0.125, 0.875, R)) for n in (9, 13, 15)]
  keys, weights = rw.context_keys(gen, layer, ctx)
  copied = rw.copy_values(gen, layer, 29, _box(0.3125, 0.625, 0.125, 0.875, R))
  target = rw.paste_target(gen, layer, copied, 9, _box(0.34375, 0.65625, 0.125, 0.875, R))
  return C, keys, weights, target


def reference_loop(f, kernel0, C, keys, weights, crop_keys, targets, steps):
  """zca directions + a Python loop of jitted Adam steps (lr 0.05, L1)."""
  D = memedit.context_directions(C, keys, weights, rank=1, method="zca").directions
  lam = jnp.zeros(kernel0.shape[:2] + (kernel0.shape[3], 1), jnp.float32)
  opt = optax.adam(0.05)
  st = opt.init(lam)

  @jax.jit
  def step(lam, st):
    def loss(lam):
      k = kernel0 + jnp.einsum("yxod,di->yxio", lam, D)
      return jnp.mean(jnp.abs(f(k, crop_keys) - targets))
    val, g = jax.value_and_grad(loss)(lam)
    upd, st = opt.update(g, st, lam)
    return optax.apply_updates(lam, upd), st, val

  for _ in range(steps):
    lam, st, _ = step(lam, st)
  k = kernel0 + jnp.einsum("yxod,di->yxio", lam, D)
  return float(jnp.mean(jnp.abs(f(k, crop_keys) - targets)))


def memedit_edit(f, kernel0, C, keys, weights, crop_keys, targets, optimizer, steps):
  D = rw.directions(C, keys, weights, rank=1, method="zca")
  res = memedit.solve_lambda(f, kernel0, D, crop_keys, targets, kind="conv", loss="l1",
                             optimizer=optimizer, steps=steps)
  return float(res.final_loss)


def bench(name, gen, layer, n_stats, ref_steps, repeats):
  C, keys, weights, target = problem(gen, layer, n_stats)
  info = rw.layer_info(gen, layer)
  f, crop_keys = rw.crop_problem(gen, info, target)
  kernel0 = jnp.asarray(memedit.get_leaf(gen.variables, info.weight_path))
  targets = jnp.asarray(target.targets)
  args = (f, kernel0, C, keys, weights, crop_keys, targets)

  t = time.perf_counter()
  ref_loss = reference_loop(*args, ref_steps)
  ref_first = time.perf_counter() - t
  ref_time = best_of(lambda: reference_loop(*args, ref_steps), repeats)

  t = time.perf_counter()
  scan_loss = memedit_edit(*args, "adam", ref_steps)
  scan_first = time.perf_counter() - t
  scan_time = best_of(lambda: memedit_edit(*args, "adam", ref_steps), repeats)

  gn_steps, gn_loss, gn_first = None, None, None
  for s in GN_LADDER:
    t = time.perf_counter()
    loss = memedit_edit(*args, "gauss_newton", s)
    first = time.perf_counter() - t
    if loss <= ref_loss * (1 + 1e-4):
      gn_steps, gn_loss, gn_first = s, loss, first
      break
  row = {"model": name, "layer": layer, "crop": "x".join(map(str, target.targets.shape[1:3])),
         "ref_steps": ref_steps, "ref_loss": round(ref_loss, 5), "ref_s": round(ref_time, 3),
         "scan_adam_loss": round(scan_loss, 5), "scan_adam_s": round(scan_time, 3),
         "ref_first_s": round(ref_first, 2), "scan_adam_first_s": round(scan_first, 2)}
  if gn_steps is None:
    row.update(gn_steps=f">{GN_LADDER[-1]}", gn_loss=None, gn_s=None, speedup=None,
               note="Gauss-Newton did not reach the reference loss on the ladder")
  else:
    gn_time = best_of(lambda: memedit_edit(*args, "gauss_newton", gn_steps), repeats)
    row.update(gn_steps=gn_steps, gn_loss=round(gn_loss, 5), gn_s=round(gn_time, 3),
               gn_first_s=round(gn_first, 2), speedup=round(ref_time / gn_time, 1),
               speedup_with_compile=round(ref_first / gn_first, 1))
  return row


def main():
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--quick", action="store_true", help="short smoke run")
  args = ap.parse_args()
  ref_steps = 201 if args.quick else 2001
  repeats = 1 if args.quick else 3
  rows = []
  gen, layer = dcgan_generator()
  rows.append(bench("dcgan-faces-64", gen, layer, 100 if args.quick else 1000, ref_steps,
                    repeats))
  res = 64 if args.quick else 256
  gen, layer = stylegan2_generator(res)
  rows.append(bench(f"stylegan2-{res}-random", gen, layer, 8 if args.quick else 64,
                    ref_steps, repeats))
  cols = ["model", "layer", "crop", "ref_steps", "ref_loss", "ref_s", "scan_adam_s",
          "gn_steps", "gn_loss", "gn_s", "speedup"]
  print(table(rows, cols))
  path = write("full_edit", {"rows": rows, "quick": args.quick,
                             "note": "ref = zca + Python loop of jitted Adam steps; gn = "
                                     "memedit directions + solve_lambda(gauss_newton) with "
                                     "the fewest ladder steps reaching ref_loss; times are "
                                     "warm (best of repeats); *_first_s include compilation"},
               "_quick" if args.quick else "")
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
