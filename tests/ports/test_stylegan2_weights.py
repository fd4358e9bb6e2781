"""The shipped StyleGAN2 (ports/stylegan2/weights/faces64.pt): its digest and size, and the
same images from rosinality's own PyTorch Generator and from memedit's converter + the
Flax port."""

from __future__ import annotations

import os

import numpy as np
import pytest

from memedit import _io
from ports.stylegan2 import convert
from ports.stylegan2 import model as sg2_model
from ports.stylegan2.export import rosinality_channel_table
from ports.stylegan2.weights import FACES64, FACES64_SHA256

TOL = 1e-4


def test_shipped_checkpoint_digest_and_size():
  assert os.path.getsize(FACES64) <= 10 * 2**20
  assert _io.sha256_file(FACES64) == FACES64_SHA256


@pytest.mark.parity
def test_shipped_checkpoint_matches_rosinality(tmp_path):
  import torch

  import peers

  out = convert.convert_rosinality(FACES64, tmp_path / "converted")
  module, variables, config = convert.load_stylegan2(out)
  assert (module.resolution, module.z_dim, module.n_mlp) == (64, 100, 4)
  assert config["latent_avg_source"] == "checkpoint"

  rosinality = peers.rosinality_model()
  table = rosinality_channel_table(module)

  class Generator(rosinality.Generator):
    def __setattr__(self, name, value):
      super().__setattr__(name, dict(table) if name == "channels" else value)

  ckpt = torch.load(FACES64, weights_only=True)
  g = Generator(module.resolution, module.w_dim, module.n_mlp).eval()
  g.load_state_dict(ckpt["g_ema"], strict=True)
  z = sg2_model.sample_latents(4, module.z_dim, seed=11)
  noise = [getattr(g.noises, f"noise_{i}") for i in range(g.num_layers)]
  with torch.no_grad():
    ref, _ = g([torch.from_numpy(z)], truncation=0.7, truncation_latent=ckpt["latent_avg"],
               noise=noise)
  got = sg2_model.generate(module, variables, z, truncation=0.7, layout="NCHW")
  assert np.max(np.abs(ref.numpy() - np.asarray(got))) <= TOL
  # Images, not a constant: the four faces differ and span most of [-1, 1].
  ref = ref.numpy()
  assert np.min(np.std(ref.reshape(4, -1), axis=1)) > 0.1
  assert np.min(np.abs(ref[0] - ref[1]).mean()) > 0.05
