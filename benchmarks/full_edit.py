"""A full edit (context directions + the insert) on a generator layer: the reference's
default procedure, Λ-space Adam and Gauss–Newton on the same problem.

For each model a copy–paste problem is set up once (C from a latent sample, context keys
from masks on a few images, object values copied and pasted onto another image); every
procedure starts from the same zca directions D (rank 1) and solves on the same paste
crop (``memedit.generators.crop_problem``) with the L1 loss:

- reference default: whole-weight Adam projected onto span(D) every 10 steps
  (``memedit.generators.projected_insert``: Adam, lr 0.05, 2001 steps on the whole
  kernel, its change projected onto span(D) per tap after steps 0, 10, ..., 2000; one
  jitted program);
- Λ-space Adam (2001 steps, one scan): ``solve_lambda(optimizer="adam")``, Adam on Λ
  alone (ΔK = ΔK(Λ, D) at every step, lr 0.05) inside one lax.scan, with the layer's
  contractions of the kernel factored (K0's part once, ΔK's through the keys projected
  onto D; the default);
- the same scan unfactored (``solve_lambda(..., factored=False)``: f on the full kernel
  at every step), to separate the factoring's share of the speed-up from the scan's;
- Λ-space Adam, Python loop: the same 2001 Λ steps as a Python loop of jitted steps, each
  step f on the full kernel (what one writes without memedit);
- Gauss–Newton: ``solve_lambda(optimizer="gauss_newton")`` with the fewest steps (from a
  fixed ladder) whose final loss is at most the lowest of the Adam runs', and with the
  fewest reaching the reference default's loss (``gn_to_ref_default_loss_*``).

Each is timed warm (best of repeats, compiled) and once including compilation; speed-ups
are ratios of times measured in the same run. The row also records how far the reference
default's first (unprojected) Adam step moves the kernel: the share of weights it moves
by at least lr / 2, against the spread (standard deviation) of the original weights.

Models: the DCGAN face generator (real weights of gan-face-generate 1.1.1, fetched like
the tests' peers; layer convt2), a randomly initialised StyleGAN2 at 256 px (layer
conv_6, 32×32 keys of 512 channels) and the shipped trained StyleGAN2
(ports/stylegan2/weights/faces64.pt, 64 px; the demo's layer conv_3, the up-sampling
modulated convolution from 8×8 keys of 192 channels to 16×16). ``--quick`` runs a short
smoke version (201 Adam steps, StyleGAN2 at 64 px); ``--rows`` reruns some of the rows.

Usage: python benchmarks/full_edit.py [--quick] [--rows dcgan,stylegan2-random,stylegan2-trained]
       [--out-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
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
from benchmarks.common import add_out_dir, best_of, machine, results_path, table, write_to
from memedit import generators as gens

GN_LADDER = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)
ROWS = ("dcgan", "stylegan2-random", "stylegan2-trained")


def _box(y0, y1, x0, x1, canvas):
  m = np.zeros((canvas, canvas), np.float32)
  m[int(y0 * canvas):int(y1 * canvas), int(x0 * canvas):int(x1 * canvas)] = 1.0
  return m


def dcgan_generator():
  import peers
  from ports.dcgan import convert_dcgan

  _, weights = peers.gan_face_generate()
  out = ROOT / ".cache" / "bench" / "faces-dcgan"
  return gens.generator_from_converted(convert_dcgan(weights, out)), "convt2"


def stylegan2_generator(resolution):
  import ports.stylegan2 as sg2

  module = sg2.StyleGAN2Generator(resolution=resolution,
                                  channels=sg2.rosinality_channels(resolution, 2), z_dim=512,
                                  w_dim=512, n_mlp=8)
  variables = jax.jit(module.init)(jax.random.PRNGKey(0), jnp.zeros((1, 512)))
  config = {"architecture": "stylegan2", "z_dim": 512, "resolution": resolution,
            "num_layers": sg2.num_conv_layers(resolution)}
  return sg2.memedit_generator(module, variables, config), "conv_6"


def trained_stylegan2_generator():
  """The shipped StyleGAN2 (64×64 faces distilled from the DCGAN), at the demo's layer."""
  from memedit.demo import stylegan2_converted

  path = stylegan2_converted(work=ROOT / ".cache" / "demo")[0]
  return gens.generator_from_converted(path), "conv_3"


def problem(gen, layer, n_stats):
  """(C, context keys, weights, target) of a copy–paste edit."""
  R = gen.resolution
  state = gens.collect_statistics(gen, layer, n_stats, batch_size=min(n_stats, 16),
                                  progress=False)
  C = np.asarray(memedit.second_moment(state))
  ctx = [(n, _box(0.375, 0.5625, 0.125, 0.875, R)) for n in (9, 13, 15)]
  keys, weights = gens.context_keys(gen, layer, ctx)
  copied = gens.copy_values(gen, layer, 29, _box(0.3125, 0.625, 0.125, 0.875, R))
  target = gens.paste_target(gen, layer, copied, 9, _box(0.34375, 0.65625, 0.125, 0.875, R))
  return C, keys, weights, target


def lambda_loop(f, kernel0, C, keys, weights, crop_keys, targets, steps):
  """Λ-space Adam, Python loop: zca directions + a Python loop of jitted Adam steps on Λ
  (lr 0.05, L1)."""
  D = memedit.context_directions(C, keys, weights, rank=1, method="zca").D
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


def memedit_edit(f, kernel0, C, keys, weights, crop_keys, targets, optimizer, steps,
                 factored=True):
  """zca directions + ``solve_lambda`` (Λ-space Adam in one scan, or Gauss–Newton)."""
  D = gens.directions(C, keys, weights, rank=1, method="zca")
  res = memedit.solve_lambda(f, kernel0, D, crop_keys, targets, kind="conv", loss="l1",
                             optimizer=optimizer, steps=steps, factored=factored)
  return float(res.final_loss)


def reference_default(gen, layer, target, C, keys, weights, steps):
  """The reference default: zca directions + whole-weight Adam projected onto span(D)
  every 10 steps (``memedit.generators.projected_insert``, lr 0.05, L1)."""
  D = gens.directions(C, keys, weights, rank=1, method="zca")
  return float(gens.projected_insert(gen, layer, D, target, steps=steps).loss_after)


def first_step(f, kernel0, crop_keys, targets, lr=0.05):
  """(share of weights the first whole-weight Adam step moves by ≥ lr / 2, std of W0)."""
  g = jax.grad(lambda k: jnp.mean(jnp.abs(f(k, crop_keys) - targets)))(kernel0)
  opt = optax.adam(lr)
  upd, _ = opt.update(g, opt.init(kernel0), kernel0)
  return float(jnp.mean(jnp.abs(upd) >= lr / 2)), float(jnp.std(kernel0))


def bench(name, gen, layer, n_stats, steps, repeats):
  C, keys, weights, target = problem(gen, layer, n_stats)
  f, crop_keys = gens.crop_problem(gen, layer, target)
  kernel0 = jnp.asarray(gens.layer_kernel(gen, layer))
  targets = jnp.asarray(target.targets)
  args = (f, kernel0, C, keys, weights, crop_keys, targets)

  def timed(fn):
    t = time.perf_counter()
    loss = fn()
    first = time.perf_counter() - t
    return loss, first, best_of(fn, repeats)

  ref_args = (gen, layer, target, C, keys, weights, steps)
  ref_loss, ref_first, ref_time = timed(lambda: reference_default(*ref_args))
  scan_loss, scan_first, scan_time = timed(lambda: memedit_edit(*args, "adam", steps))
  full_loss, full_first, full_time = timed(
      lambda: memedit_edit(*args, "adam", steps, factored=False))
  loop_loss, loop_first, loop_time = timed(lambda: lambda_loop(*args, steps))
  moved, spread = first_step(f, kernel0, crop_keys, targets)

  def ladder(goal):
    """(steps, loss, seconds with compilation) of the fewest ladder steps of Gauss–Newton
    whose loss is at most ``goal``, or Nones."""
    for s in GN_LADDER:
      t = time.perf_counter()
      loss = memedit_edit(*args, "gauss_newton", s)
      first = time.perf_counter() - t
      if loss <= goal * (1 + 1e-4):
        return s, loss, first
    return None, None, None

  gn_steps, gn_loss, gn_first = ladder(min(ref_loss, scan_loss, full_loss, loop_loss))
  ref_steps, ref_gn_loss, _ = ladder(ref_loss)
  row = {"model": name, "layer": layer, "crop": "x".join(map(str, target.targets.shape[1:3])),
         "steps": steps, "ref_default_loss": round(ref_loss, 5),
         "ref_default_s": round(ref_time, 3), "ref_default_first_s": round(ref_first, 2),
         "lam_scan_loss": round(scan_loss, 5), "lam_scan_s": round(scan_time, 3),
         "lam_scan_first_s": round(scan_first, 2),
         "lam_scan_unfactored_loss": round(full_loss, 5),
         "lam_scan_unfactored_s": round(full_time, 3),
         "lam_scan_unfactored_first_s": round(full_first, 2),
         "lam_loop_loss": round(loop_loss, 5),
         "lam_loop_s": round(loop_time, 3), "lam_loop_first_s": round(loop_first, 2),
         "lam_scan_vs_ref_default": round(ref_time / scan_time, 2),
         "lam_scan_vs_lam_loop": round(loop_time / scan_time, 2),
         "lam_scan_unfactored_vs_lam_loop": round(loop_time / full_time, 2),
         "first_step_moved_share": round(moved, 4), "weight_std": round(spread, 5)}
  if ref_steps is not None:
    t_ref_gn = best_of(lambda: memedit_edit(*args, "gauss_newton", ref_steps), repeats)
    row.update(gn_to_ref_default_loss_steps=ref_steps,
               gn_to_ref_default_loss_loss=round(ref_gn_loss, 5),
               gn_to_ref_default_loss_s=round(t_ref_gn, 3),
               gn_to_ref_default_loss_vs_ref_default=round(ref_time / t_ref_gn, 1))
  if gn_steps is None:
    row.update(gn_steps=f">{GN_LADDER[-1]}", gn_loss=None, gn_s=None,
               gn_vs_ref_default=None, gn_vs_lam_loop=None,
               note="Gauss-Newton did not reach the lowest Adam loss on the ladder")
  else:
    gn_time = best_of(lambda: memedit_edit(*args, "gauss_newton", gn_steps), repeats)
    row.update(gn_steps=gn_steps, gn_loss=round(gn_loss, 5), gn_s=round(gn_time, 3),
               gn_first_s=round(gn_first, 2),
               gn_vs_ref_default=round(ref_time / gn_time, 1),
               gn_vs_ref_default_with_compile=round(ref_first / gn_first, 1),
               gn_vs_lam_loop=round(loop_time / gn_time, 1),
               gn_vs_lam_loop_with_compile=round(loop_first / gn_first, 1))
  return row


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--quick", action="store_true", help="short smoke run")
  ap.add_argument("--rows", default=",".join(ROWS),
                  help="comma-separated rows to run (default: all of " + ", ".join(ROWS)
                  + "); a subset replaces those rows in the existing results, each rerun "
                  "row keeping its own date and machine")
  add_out_dir(ap)
  args = ap.parse_args(argv)
  result = results_path(ap, args, "full_edit")
  chosen = [r for r in args.rows.split(",") if r]
  unknown = [r for r in chosen if r not in ROWS]
  if unknown or not chosen:
    ap.error(f"--rows: expected names among {', '.join(ROWS)}, got {args.rows!r}")
  steps = 201 if args.quick else 2001
  repeats = 1 if args.quick else 3
  previous = None  # read before the run: a damaged file is named now, not after hours
  if len(chosen) < len(ROWS) and not args.quick and result.exists():
    try:
      previous = json.loads(result.read_text())
      if not isinstance(previous.get("rows"), list):
        raise ValueError("no list of rows")
    except (ValueError, AttributeError) as e:
      ap.error(f"--rows: expected readable results to merge the rerun rows into, "
               f"got {result.name} unreadable ({e}); move it aside or run every row")
  rows = []
  if "dcgan" in chosen:
    gen, layer = dcgan_generator()
    rows.append(bench("dcgan-faces-64", gen, layer, 100 if args.quick else 1000, steps,
                      repeats))
  if "stylegan2-random" in chosen:
    res = 64 if args.quick else 256
    gen, layer = stylegan2_generator(res)
    rows.append(bench(f"stylegan2-{res}-random", gen, layer, 8 if args.quick else 64,
                      steps, repeats))
  if "stylegan2-trained" in chosen:
    gen, layer = trained_stylegan2_generator()
    rows.append(bench("stylegan2-64-faces-trained", gen, layer,
                      100 if args.quick else 1000, steps, repeats))
  rerun = None
  if len(chosen) < len(ROWS):
    rerun = {row["model"]: {"date": time.strftime("%Y-%m-%d"), "machine": machine(),
                            "load_average": list(os.getloadavg())} for row in rows}
    if previous is not None:
      fresh = {row["model"]: row for row in rows}
      rows = [fresh.pop(row["model"], row) for row in previous["rows"]] + list(fresh.values())
      rerun = {**previous.get("rows_rerun", {}), **rerun}
  cols = ["model", "layer", "crop", "steps", "ref_default_loss", "ref_default_s",
          "lam_scan_loss", "lam_scan_s", "lam_scan_unfactored_s", "lam_loop_loss",
          "lam_loop_s", "lam_scan_vs_lam_loop", "gn_steps",
          "gn_loss", "gn_s", "gn_vs_ref_default", "gn_vs_lam_loop",
          "gn_to_ref_default_loss_steps", "gn_to_ref_default_loss_vs_ref_default"]
  print(table(rows, cols))
  note = ("ref_default = reference default: whole-weight Adam projected onto span(D) every "
          "10 steps (memedit.generators.projected_insert, one jitted program); lam_scan = "
          f"Λ-space Adam ({steps} steps, one scan; solve_lambda adam, factored contractions); "
          "lam_scan_unfactored = the same scan with factored=False (f on the full kernel "
          "every step); lam_loop = Λ-space Adam, Python loop of jitted steps on the full "
          "kernel; gn = Gauss–Newton (solve_lambda gauss_newton) with the fewest "
          "ladder steps reaching the lowest of the Adam losses; gn_to_ref_default_loss = "
          "the fewest ladder steps reaching the reference default's loss; all from the same zca "
          "D on the same crop, L1 loss; times are warm (best of repeats); *_first_s include "
          "compilation; first_step_moved_share = share of kernel weights the reference "
          "default's first Adam step moves by >= lr/2, weight_std = std of the original "
          "kernel")
  payload = {"rows": rows, "quick": args.quick, "note": note}
  if rerun:
    payload["rows_rerun"] = rerun
  path = write_to(result, payload)
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
