"""The DCGAN generator of the PyTorch tutorial, in Flax Linen.

Architecture (``ngf`` = 64 gives the tutorial's channel sizes 512, 256, 128, 64):

  z (N, z_dim) -> (N, 1, 1, z_dim)
  convt0: ConvTranspose(z_dim -> 8 ngf, 4x4, stride 1, torch padding 0)  -> 4x4,  bn0, ReLU
  convt1: ConvTranspose(8 ngf -> 4 ngf, 4x4, stride 2, torch padding 1)  -> 8x8,  bn1, ReLU
  convt2: ConvTranspose(4 ngf -> 2 ngf, ...)                             -> 16x16, bn2, ReLU
  convt3: ConvTranspose(2 ngf -> ngf, ...)                               -> 32x32, bn3, ReLU
  convt4: ConvTranspose(ngf -> channels, ...)                            -> 64x64, tanh

Every transposed convolution is a plain ``flax.linen.ConvTranspose`` (no bias) with an
HWIO kernel ``(4, 4, C_in, C_out)``: a layer's keys are per-pixel input vectors of dim
``C_in``. A torch ``ConvTranspose2d`` with padding ``p`` equals a Flax ``ConvTranspose``
with explicit padding ``k - 1 - p`` on each side and the torch kernel spatially flipped
(see ``ports.dcgan.convert``). BatchNorm runs in inference mode on its running
statistics (``batch_stats`` collection), ``y = (x - mean) / sqrt(var + 1e-5) * scale + bias``.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

KERNEL = 4
NUM_LAYERS = 5
RESOLUTION = 64
BN_EPSILON = 1e-5


def layer_channels(z_dim: int, ngf: int, channels: int) -> list[int]:
  """Channel sizes ``[z_dim, 8 ngf, 4 ngf, 2 ngf, ngf, channels]`` along the network."""
  return [z_dim, ngf * 8, ngf * 4, ngf * 2, ngf, channels]


def torch_padding(layer: int) -> int:
  """The torch ``ConvTranspose2d`` padding of layer ``layer`` (0 for the first, else 1)."""
  return 0 if layer == 0 else 1


def torch_stride(layer: int) -> int:
  """The torch ``ConvTranspose2d`` stride of layer ``layer`` (1 for the first, else 2)."""
  return 1 if layer == 0 else 2


class DCGANGenerator(nn.Module):
  """DCGAN generator: latents ``(N, z_dim)`` -> images ``(N, 64, 64, channels)`` in [-1, 1].

  Attributes:
    z_dim: latent size (100 in the tutorial).
    ngf: base feature count (64 in the tutorial).
    channels: image channels (3).
  """

  z_dim: int = 100
  ngf: int = 64
  channels: int = 3

  @nn.compact
  def __call__(self, z: jnp.ndarray) -> jnp.ndarray:
    if z.ndim != 2 or z.shape[-1] != self.z_dim:
      raise ValueError(f"z: expected shape (N, {self.z_dim}), got {tuple(z.shape)}")
    sizes = layer_channels(self.z_dim, self.ngf, self.channels)
    x = z.reshape(z.shape[0], 1, 1, self.z_dim)
    for i in range(NUM_LAYERS):
      pad = KERNEL - 1 - torch_padding(i)
      x = nn.ConvTranspose(
          sizes[i + 1], (KERNEL, KERNEL), strides=(torch_stride(i),) * 2,
          padding=((pad, pad), (pad, pad)), use_bias=False, name=f"convt{i}")(x)
      if i < NUM_LAYERS - 1:
        x = nn.BatchNorm(use_running_average=True, epsilon=BN_EPSILON, name=f"bn{i}")(x)
        x = nn.relu(x)
    return jnp.tanh(x)
