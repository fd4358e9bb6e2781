"""A small NNX image generator for the workflow tests: z (N, 8) → images (N, 16, 16, 3)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

from memedit.generators import Generator

Z_DIM = 8
RESOLUTION = 16


class ToyGenerator(nnx.Module):
  """Linear → 4×4 map, two stride-2 transposed convolutions (4 → 8 → 16 px), 3×3 conv."""

  def __init__(self, width: int = 32, *, seed: int = 0):
    rngs = nnx.Rngs(seed)
    self.width = width
    self.fc = nnx.Linear(Z_DIM, 4 * 4 * width, rngs=rngs)
    self.up1 = nnx.ConvTranspose(width, width, (4, 4), strides=(2, 2), rngs=rngs)
    self.up2 = nnx.ConvTranspose(width, width, (4, 4), strides=(2, 2), rngs=rngs)
    self.rgb = nnx.Conv(width, 3, (3, 3), rngs=rngs)

  def __call__(self, z):
    x = nnx.relu(self.fc(z)).reshape(z.shape[0], 4, 4, self.width)
    x = nnx.relu(self.up1(x))
    x = nnx.relu(self.up2(x))
    return jnp.tanh(self.rgb(x))


def toy_generator(width: int = 32, seed: int = 0) -> Generator:
  """The workflow generator of :class:`ToyGenerator`; its layers are up1 and up2."""
  return Generator(ToyGenerator(width, seed=seed), Z_DIM, RESOLUTION,
                   {"up1": ("up1",), "up2": ("up2",)}, architecture="toy")


def box(y0, y1, x0, x1, canvas=RESOLUTION):
  m = np.zeros((canvas, canvas), np.float32)
  m[y0:y1, x0:x1] = 1.0
  return m
