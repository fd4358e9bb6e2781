"""generate_images and run_layer: a batch size that is not a positive int is refused
before the generator runs; no latents give empty batches of the right shape."""

from __future__ import annotations

import numpy as np
import pytest

from memedit import generators as gens

from toy import RESOLUTION, Z_DIM, toy_generator

WIDTH = 5


@pytest.fixture(scope="module")
def gen():
  return toy_generator(width=WIDTH)


@pytest.mark.parametrize("batch_size", [0, -1, 2.0, True, "4"])
def test_batch_size_must_be_a_positive_int(gen, batch_size):
  want = f"batch_size: expected a positive int, got {batch_size!r}"
  for call in (lambda: gens.generate_images(gen, gen.latents(3), batch_size=batch_size),
               lambda: gens.run_layer(gen, "up2", gen.latents(3), batch_size=batch_size)):
    with pytest.raises(ValueError, match=want.replace(".", r"\.")):
      call()


def test_no_latents_give_an_empty_batch_of_images(gen):
  images = gens.generate_images(gen, gen.latents([]))
  assert images.shape == (0, RESOLUTION, RESOLUTION, 3) and images.dtype == np.float32
  run = gens.run_layer(gen, "up2", np.zeros((0, Z_DIM), np.float32))
  assert (run.images.shape, run.keys.shape, run.values.shape) == (
      (0, RESOLUTION, RESOLUTION, 3), (0, 8, 8, WIDTH), (0, 16, 16, WIDTH))


def test_latents_of_another_shape_are_refused_and_batches_cover_every_latent(gen):
  with pytest.raises(ValueError, match=rf"z: expected shape \(N, {Z_DIM}\), got \(0,\)"):
    gens.generate_images(gen, [])
  z = gen.latents(5)
  np.testing.assert_allclose(gens.generate_images(gen, z, batch_size=2),
                             gens.generate_images(gen, z), rtol=1e-5, atol=1e-6)
