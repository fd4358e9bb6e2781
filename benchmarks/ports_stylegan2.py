"""Images per second of the Flax StyleGAN2 port against rosinality's torch generator.

Both run in the same process on CPU (torch with 2 threads, ``no_grad``) on a randomly
initialised rosinality generator (channel multiplier 2) and its conversion, with the same
latents and the same fixed noise; JAX is jitted and timed after compilation and a
warm-up. Each timing is the median of several repeats; the largest image difference
between the two is reported too.

  python benchmarks/ports_stylegan2.py            # 64 and 256 px, batch 4 and 16
  python benchmarks/ports_stylegan2.py --quick    # 64 px, batch 4, one repeat
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

from benchmarks.common import (add_out_dir, median_of, positive_int,  # noqa: E402
                               output_file, shown, write_json)


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="64 px, batch 4, one repeat")
  parser.add_argument("--sizes", type=positive_int, nargs="+", default=[64, 256],
                      help="resolutions, powers of two from 8 (default: 64 256)")
  parser.add_argument("--batches", type=positive_int, nargs="+", default=[4, 16])
  parser.add_argument("--repeats", type=positive_int, default=3)
  parser.add_argument("--out", default=None,
                      help="results file (default: benchmarks/results/ports_stylegan2.json, "
                           "ports_stylegan2_quick.json with --quick)")
  add_out_dir(parser)
  args = parser.parse_args(argv)
  args.out = output_file(parser, args, "ports_stylegan2",
                         ("--sizes", "--batches", "--repeats"))
  if args.quick:
    args.sizes, args.batches, args.repeats = [64], [4], 1
  bad = [s for s in args.sizes if s < 8 or s & (s - 1)]
  if bad:
    parser.error(f"--sizes: expected powers of two from 8, got {bad}")

  import jax
  import torch

  import peers
  from ports import stylegan2 as sg2

  torch.set_num_threads(2)
  ros = peers.rosinality_model()
  rows = []
  for size in args.sizes:
    torch.manual_seed(0)
    g = ros.Generator(size, 512, 8, channel_multiplier=2).eval()
    with torch.no_grad():
      for name, p in g.named_parameters():
        if name.endswith("noise.weight") or name.endswith("activate.bias"):
          p.copy_(0.1 * torch.randn_like(p))
    sd = {k: v.numpy() for k, v in g.state_dict().items()}
    config = sg2.infer_rosinality_config(sd)
    module = sg2.generator_from_config(config)
    variables = jax.device_put(sg2.state_dict_to_params_rosinality(sd, None, config))
    noise = [getattr(g.noises, f"noise_{i}") for i in range(g.num_layers)]
    for batch in args.batches:
      z = sg2.sample_latents(batch, 512, seed=batch)
      zt = torch.from_numpy(z)

      def run_torch():
        with torch.no_grad():
          return g([zt], noise=noise)[0]

      def run_jax():
        return sg2.generate(module, variables, z, layout="NCHW").block_until_ready()

      start = time.perf_counter()
      jax_img = np.asarray(run_jax())
      compile_s = time.perf_counter() - start
      torch_img = run_torch().numpy()
      if not args.quick:
        run_jax()
        run_torch()
      jax_s = median_of(run_jax, args.repeats)
      torch_s = median_of(run_torch, args.repeats)
      rows.append({
          "resolution": size, "batch": batch,
          "jax_images_per_s": batch / jax_s, "torch_images_per_s": batch / torch_s,
          "jax_seconds": jax_s, "torch_seconds": torch_s, "jax_compile_s": compile_s,
          "speedup": torch_s / jax_s,
          "max_abs_diff": float(np.abs(jax_img - torch_img).max()),
      })
      r = rows[-1]
      print(f"  {size:>4} px  batch {batch:>3}: jax {r['jax_images_per_s']:7.2f} img/s  "
            f"torch {r['torch_images_per_s']:7.2f} img/s", flush=True)

  print()
  print("| px | batch | flax img/s | torch img/s | flax/torch | compile s | max |diff| |")
  print("|---:|---:|---:|---:|---:|---:|---:|")
  for r in rows:
    print(f"| {r['resolution']} | {r['batch']} | {r['jax_images_per_s']:.2f} | "
          f"{r['torch_images_per_s']:.2f} | {r['speedup']:.2f}x | {r['jax_compile_s']:.1f} | "
          f"{r['max_abs_diff']:.1e} |")
  result = {
      "benchmark": "ports_stylegan2",
      "quick": args.quick, "repeats": args.repeats,
      "machine": {"platform": platform.platform(), "processor": platform.processor(),
                  "python": platform.python_version(), "cpu_count": os.cpu_count(),
                  "jax": jax.__version__, "jax_backend": jax.default_backend(),
                  "torch": torch.__version__, "torch_threads": torch.get_num_threads()},
      "rows": rows,
  }
  write_json(args.out, result)
  print(f"wrote {shown(args.out)}")
  return result


if __name__ == "__main__":
  main()
