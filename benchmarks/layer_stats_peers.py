"""Layer statistics on real layers: memedit against the reference's procedure in PyTorch.

For each model, memedit and the torch peer run the same generator (the torch weights and
their conversion) on the same latents (``gen.latents(range(N))``, the reference's
``RandomState(1)`` sample) in batches of B, in the same process, and each computes the
layer's uncentered second moment C = E[k kᵀ] over per-pixel keys:

- memedit: ``memedit.generators.collect_statistics(gen, layer, N, batch_size=B)`` (no
  cache) then ``memedit.second_moment`` (compiled forward to the layer and fold, float32
  keys, HIGHEST-precision matmuls);
- torch (the reference's procedure, as in the ``SecondMoment`` running statistic of Bau et
  al.'s code): under ``torch.no_grad()`` the peer generator runs until the layer (a
  forward pre-hook captures the layer's input and stops the forward, as the reference's
  ``nethook`` trace with ``stop=True`` does), the keys are flattened to (B·H·W, C_in) and
  folded as ``S += XᵀX`` in float32, C = S / count. torch runs with
  ``torch.set_num_threads(2)``; jax uses its default (all cores).

Each is timed end to end twice: the first call (memedit: including compilation) and a
warm second call with the same shapes (memedit's compiled programs reused). ratio = torch
time / memedit time. The forward alone is timed too (memedit: the jitted
``keys_fn`` called batch by batch; torch: the truncated forward per batch) for the split
of the time; memedit's statistics run several batches in one compiled program, so its
whole warm run can take less than its per-batch forward alone. Agreement: max |C_memedit - C_torch| / max |C_torch|,
and each against a float64 fold of the torch keys. The load average is recorded before
and after each model.

Models and layers:
- the DCGAN face generator with real weights (gan-face-generate 1.1.1, fetched like the
  tests' peers), layer ``convt2`` (torch ``main[6]``): keys 8×8, 256 channels;
- a randomly initialised rosinality StyleGAN2 (draggan 1.0.6's model, channel multiplier
  2, noise strengths and biases randomised; fixed stored noise in both) converted from the
  same state dict, layer ``conv_6`` (torch ``convs[5].conv``, a non-up-sampling modulated
  convolution): keys x·s, 32×32, 512 channels (x the layer input, s = modulation(w)).

Usage: python benchmarks/layer_stats_peers.py [--quick] [--dcgan-n N] [--dcgan-batch B]
       [--sg2-n N] [--sg2-batch B] [--sg2-resolution R] [--out-dir DIR]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import jax
import numpy as np

import memedit
from benchmarks.common import add_out_dir, positive_int, results_path, table, write_to
from memedit import generators as gens


class _Stop(Exception):
  """Raised by the capture hook to end the torch forward at the layer."""


def _load():
  return [round(v, 2) for v in os.getloadavg()]


# ----------------------------------------------------------------------------------------
# Models: (memedit generator, layer name, torch forward(z) -> None, torch layer module,
# key transform (captured pre-hook args) -> NCHW keys).

def dcgan_models():
  import torch

  import peers
  from benchmarks.full_edit import dcgan_generator

  gen, layer = dcgan_generator()
  models, weights = peers.gan_face_generate()
  G = models.Generator(ngpu=0, nc=3, nz=100, ngf=64)
  G.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True)["netG_state_dict"])
  G.eval()
  module = G.main[6]
  kh, kw, c_in, c_out = np.shape(gens.layer_kernel(gen, layer))
  if not (isinstance(module, torch.nn.ConvTranspose2d)
          and (module.in_channels, module.out_channels) == (c_in, c_out)):
    raise RuntimeError(f"torch main[6] is {module}, expected ConvTranspose2d({c_in}, {c_out})")

  def forward(z):
    G(z[:, :, None, None])

  return gen, layer, forward, module, lambda args: args[0]


def stylegan2_models(resolution):
  import torch

  import peers
  from ports import stylegan2 as sg2

  ros = peers.rosinality_model()
  torch.manual_seed(0)
  g = ros.Generator(resolution, 512, 8, channel_multiplier=2).eval()
  peers.randomize_rosinality(g)
  sd = {k: v.detach().numpy() for k, v in g.state_dict().items()}
  config = sg2.infer_rosinality_config(sd)
  module = sg2.generator_from_config(config)
  variables = jax.device_put(sg2.state_dict_to_params_rosinality(sd, None, config))
  gen = sg2.memedit_generator(module, variables, config)
  layer = "conv_6"
  conv = g.convs[5].conv                 # memedit conv_i is rosinality conv1 (i=0), convs[i-1]
  c_in = np.shape(gens.layer_kernel(gen, layer))[2]
  if conv.upsample or conv.in_channel != c_in:
    raise RuntimeError(f"torch convs[5].conv is {conv}, expected a {c_in}-channel 'same' conv")
  noise = [getattr(g.noises, f"noise_{i}") for i in range(g.num_layers)]

  def forward(z):
    g([z], noise=noise)                  # truncation 1, stored noise: memedit's defaults

  def keys(args):                        # keys x·s with s = modulation(w), as memedit's
    x, w = args
    return x * conv.modulation(w)[:, :, None, None]

  return gen, layer, forward, conv, keys


# ----------------------------------------------------------------------------------------
# The two procedures.

def torch_second_moment(z, batch, forward, module, keys_of, fold=True):
  """The reference's procedure: (C, seconds of the forward alone, summed per batch).

  With ``fold`` it folds S += XᵀX in float32 (C float32, as the reference); without, it
  folds the same keys in float64 (a reference C, its fold not part of the forward
  time).
  """
  import torch

  captured = []

  def hook(mod, args):
    captured.append(keys_of(args))
    raise _Stop

  handle = module.register_forward_pre_hook(hook)
  S, count, fwd, S64 = None, 0, 0.0, None
  try:
    with torch.no_grad():
      for i in range(0, len(z), batch):
        zb = torch.from_numpy(z[i:i + batch])
        t = time.perf_counter()
        try:
          forward(zb)
        except _Stop:
          pass
        acts = captured.pop()
        x = acts.permute(0, 2, 3, 1).reshape(-1, acts.shape[1])
        fwd += time.perf_counter() - t
        if fold:
          if S is None:
            S = x.new_zeros((x.shape[1], x.shape[1]))
          S += x.t().mm(x)
        else:
          x64 = x.double()                 # torch's own threads: no BLAS pool contention
          S64 = x64.t().mm(x64) if S64 is None else S64 + x64.t().mm(x64)
        count += x.shape[0]
  finally:
    handle.remove()
  return ((S / count).numpy() if fold else (S64 / count).numpy()), fwd


def memedit_second_moment(gen, layer, n, batch):
  state = gens.collect_statistics(gen, layer, n, batch_size=batch, progress=False)
  return np.asarray(jax.block_until_ready(memedit.second_moment(state)))


def memedit_forward_s(gen, layer, z, batch):
  """Seconds of memedit's compiled forward to the layer alone (warm, summed over batches)."""
  fn = gens.keys_fn(gen, layer)
  for i in range(0, len(z), batch):      # compile every batch shape once
    jax.block_until_ready(fn(gen.params, z[i:i + batch]))
  total = 0.0
  for i in range(0, len(z), batch):
    t = time.perf_counter()
    jax.block_until_ready(fn(gen.params, z[i:i + batch]))
    total += time.perf_counter() - t
  return total


def _timed(fn):
  t = time.perf_counter()
  out = fn()
  return time.perf_counter() - t, out


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / np.abs(b).max())


def bench(name, models, n, batch):
  load_before = _load()
  t = time.perf_counter()
  gen, layer, forward, module, keys_of = models()
  setup_s = time.perf_counter() - t
  z = gen.latents(n)
  info = gens.layer_info(gen, layer)

  me_first, C_me = _timed(lambda: memedit_second_moment(gen, layer, n, batch))
  me_warm, C_me2 = _timed(lambda: memedit_second_moment(gen, layer, n, batch))
  me_fwd = memedit_forward_s(gen, layer, z, batch)
  th_first, (C_th, _) = _timed(lambda: torch_second_moment(z, batch, forward, module, keys_of))
  th_warm, (C_th2, _) = _timed(lambda: torch_second_moment(z, batch, forward, module, keys_of))
  C64, th_fwd = torch_second_moment(z, batch, forward, module, keys_of, fold=False)
  load_after = _load()
  if C_me.shape != C_th.shape:
    raise RuntimeError(f"{name}: C shapes differ: memedit {C_me.shape}, torch {C_th.shape}")
  return {
      "model": name, "layer": layer, "keys": f"{info.key_res}x{info.key_res}x{info.key_dim}",
      "N": n, "B": batch,
      "memedit_first_s": round(me_first, 2), "memedit_warm_s": round(me_warm, 3),
      "torch_first_s": round(th_first, 2), "torch_warm_s": round(th_warm, 3),
      "ratio_warm": round(th_warm / me_warm, 2), "ratio_first": round(th_first / me_first, 2),
      "memedit_fwd_s": round(me_fwd, 3), "torch_fwd_s": round(th_fwd, 3),
      "rel_diff": float(f"{_rel(C_me, C_th):.2e}"),
      "memedit_vs_f64": float(f"{_rel(C_me, C64):.2e}"),
      "torch_vs_f64": float(f"{_rel(C_th, C64):.2e}"),
      "repeat_identical": bool(np.array_equal(C_me, C_me2) and np.array_equal(C_th, C_th2)),
      "setup_s": round(setup_s, 1), "load_before": load_before, "load_after": load_after,
  }


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--quick", action="store_true",
                  help="smoke run: DCGAN N=100 B=50, StyleGAN2 64 px N=16 B=8")
  ap.add_argument("--dcgan-n", type=positive_int, default=2000, help="DCGAN latents")
  ap.add_argument("--dcgan-batch", type=positive_int, default=100)
  ap.add_argument("--sg2-n", type=positive_int, default=200, help="StyleGAN2 latents")
  ap.add_argument("--sg2-batch", type=positive_int, default=8)
  ap.add_argument("--sg2-resolution", type=positive_int, default=256,
                  help="a power of two from 32 (the layer conv_6 is at 32 px)")
  add_out_dir(ap)
  args = ap.parse_args(argv)
  out = results_path(ap, args, "layer_stats_peers", variants=(
      "--dcgan-n", "--dcgan-batch", "--sg2-n", "--sg2-batch", "--sg2-resolution"))
  if args.quick:
    args.dcgan_n, args.dcgan_batch = 100, 50
    args.sg2_n, args.sg2_batch, args.sg2_resolution = 16, 8, 64
  r = args.sg2_resolution
  if r < 32 or r & (r - 1):
    ap.error(f"--sg2-resolution: expected a power of two from 32, got {r}")

  import torch

  torch.set_num_threads(2)
  rows = [bench("dcgan-faces-64", dcgan_models, args.dcgan_n, args.dcgan_batch),
          bench(f"stylegan2-{args.sg2_resolution}-random",
                lambda: stylegan2_models(args.sg2_resolution), args.sg2_n, args.sg2_batch)]
  cols = ["model", "layer", "keys", "N", "B", "memedit_first_s", "memedit_warm_s",
          "torch_first_s", "torch_warm_s", "ratio_first", "ratio_warm", "memedit_fwd_s",
          "torch_fwd_s", "rel_diff", "load_before",
          "load_after"]
  print(table(rows, cols))
  print(table(rows, ["model", "rel_diff", "memedit_vs_f64", "torch_vs_f64",
                     "repeat_identical", "setup_s"]))
  note = ("C = E[k kᵀ] over per-pixel keys of the same N latents in batches of B; memedit = "
          "collect_statistics + second_moment (no cache); torch = the reference's procedure "
          "(no_grad forward stopped at the layer by a pre-hook, keys (B·H·W, C_in), "
          "S += XᵀX in float32, C = S / count), torch.set_num_threads(2), jax default "
          "threads; *_first_s = first call (memedit including compilation), *_warm_s = "
          "second call with the same shapes; ratio = torch / memedit; *_fwd_s = forward to "
          "the layer alone (warm, called batch by batch, summed); rel_diff = max|C_memedit - C_torch| / max|C_torch|; *_vs_f64 = the same "
          "against a float64 fold of the torch keys; load = os.getloadavg() before/after "
          "each model")
  path = write_to(out, {"rows": rows, "quick": args.quick,
                        "torch_threads": torch.get_num_threads(),
                        "torch": torch.__version__, "note": note})
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
