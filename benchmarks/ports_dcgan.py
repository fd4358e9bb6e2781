"""Images per second of the Flax DCGAN port against the torch generator it was converted from.

Both run in the same process on CPU (torch with 2 threads), on the real weights of
gan-face-generate==1.1.1, with identical latents; each timing is the median of several
repeats after a warm-up (and, for JAX, after compilation). The largest image difference
between the two is reported too.

  python benchmarks/ports_dcgan.py            # full run
  python benchmarks/ports_dcgan.py --quick    # short smoke run
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

from benchmarks.common import (add_out_dir, median_of, positive_int,  # noqa: E402
                               output_file, write_json)


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="few repeats, for a smoke test")
  parser.add_argument("--batches", type=positive_int, nargs="+", default=[4, 16])
  parser.add_argument("--out", default=None,
                      help="results file (default: benchmarks/results/ports_dcgan.json, "
                           "ports_dcgan_quick.json with --quick)")
  add_out_dir(parser)
  args = parser.parse_args(argv)
  args.out = output_file(parser, args, "ports_dcgan", ("--batches",))
  repeats = 3 if args.quick else 20
  warmup = 3 if args.quick else 10

  import jax
  import torch

  import peers
  from ports.dcgan import convert_dcgan, load_dcgan

  torch.set_num_threads(2)
  models, weights = peers.gan_face_generate()
  G = models.Generator(ngpu=0, nc=3, nz=100, ngf=64)
  G.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True)["netG_state_dict"])
  G.eval()
  with tempfile.TemporaryDirectory() as tmp:
    module, variables, _ = load_dcgan(convert_dcgan(weights, os.path.join(tmp, "dcgan")))
  forward = jax.jit(module.apply)

  rows = []
  for batch in args.batches:
    z = np.random.RandomState(batch).randn(batch, 100).astype(np.float32)
    zt = torch.from_numpy(z)[:, :, None, None]

    def run_torch():
      with torch.no_grad():
        return G(zt)

    def run_jax():
      return forward(variables, z).block_until_ready()

    start = time.perf_counter()
    jax_img = np.asarray(run_jax())
    compile_s = time.perf_counter() - start
    torch_img = run_torch().numpy().transpose(0, 2, 3, 1)
    for _ in range(warmup):  # warm-up: oneDNN primitive caches, allocator, thread pools
      run_torch()
      run_jax()
    t_jax = median_of(run_jax, repeats)
    t_torch = median_of(run_torch, repeats)
    rows.append({
        "batch": batch,
        "jax_images_per_s": batch / t_jax,
        "torch_images_per_s": batch / t_torch,
        "speedup": t_torch / t_jax,
        "jax_first_call_s": compile_s,
        "max_abs_diff": float(np.abs(jax_img - torch_img).max()),
    })

  print(f"{'batch':>5} {'flax img/s':>11} {'torch img/s':>12} {'flax/torch':>10} "
        f"{'first call s':>12} {'max |diff|':>10}")
  for r in rows:
    print(f"{r['batch']:>5} {r['jax_images_per_s']:>11.1f} {r['torch_images_per_s']:>12.1f} "
          f"{r['speedup']:>10.2f} {r['jax_first_call_s']:>12.2f} {r['max_abs_diff']:>10.2e}")
  result = {
      "benchmark": "ports_dcgan",
      "quick": args.quick,
      "repeats": repeats,
      "torch_threads": 2,
      "jax": jax.__version__,
      "torch": torch.__version__,
      "machine": platform.machine(),
      "cpu_count": os.cpu_count(),
      "rows": rows,
  }
  write_json(args.out, result)
  print(f"wrote {args.out}")
  return result


if __name__ == "__main__":
  main()
