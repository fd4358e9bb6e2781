"""What the StyleGAN2 training tests share: a tiny student's settings (the command line
builds the same, so that every test shares one compiled step) and a tiny random DCGAN
teacher, written as the torch checkpoint the trainer reads (without torch)."""

from __future__ import annotations

import numpy as np

from ports.dcgan.convert import expected_shapes
from ports.stylegan2 import train as tr
from ports.torchwrite import save_torch

CFG = tr.TrainConfig(resolution=16, channels=(16, 12, 8), style_dim=10, n_mlp=2,
                     batch_size=8, steps=8, learning_rate=1e-2)
CLI_ARGS = ["--resolution", "16", "--channels", "16,12,8", "--style-dim", "10", "--n-mlp",
            "2", "--batch-size", "8", "--steps", "8", "--lr", "0.01"]


def write_teacher(folder, seed: int) -> str:
  """A random DCGAN generator (z_dim 8, ngf 2) saved as ``{'netG_state_dict': ...}`` in
  ``folder/weights.tar``; returns the file's path."""
  rs = np.random.RandomState(seed)
  sd = {}
  for name, shape in expected_shapes(8, 2, 3).items():
    if name.endswith("running_var"):
      sd[name] = (1.0 + rs.uniform(size=shape)).astype(np.float32)
    elif name.endswith(("running_mean", ".bias")):
      sd[name] = (0.1 * rs.standard_normal(shape)).astype(np.float32)
    elif len(shape) == 1:  # BN scale
      sd[name] = (1.0 + 0.1 * rs.standard_normal(shape)).astype(np.float32)
    else:
      sd[name] = (0.4 * rs.standard_normal(shape)).astype(np.float32)
  return save_torch(folder / "weights.tar", {"netG_state_dict": sd})
