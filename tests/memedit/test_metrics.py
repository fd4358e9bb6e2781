"""memedit.metrics: the evaluation of an edit on held-out latents."""

from __future__ import annotations

import numpy as np
import pytest
from flax import nnx

from memedit import metrics
from memedit.generators import Generator, edited, unit_zeroing_edit


class _Toy(nnx.Module):
  def __init__(self):
    self.up = nnx.ConvTranspose(3, 2, (4, 4), strides=(2, 2), rngs=nnx.Rngs(0))

  def __call__(self, z):
    return self.up(z.reshape(-1, 4, 4, 3))


@pytest.fixture(scope="module")
def toy():
  gen = Generator(_Toy(), 48, 8, {"up": ("up",)})
  new, _ = edited(gen, unit_zeroing_edit(gen, "up", [0]))
  return gen, new.params


def test_each_image_is_measured_once(toy):
  gen, params = toy
  D = np.eye(3)[:1]
  m = metrics.evaluate_edit(gen, "up", D, params, [10, 11, 12, 13], quantile=0.9)
  assert m["num_latents"] == 4
  for nums, repeated in (([10, 11, 12, 13, 10], r"\[10\] in 5 numbers"),
                         ([12, 10, 12, 11, 10, 13], r"\[10, 12\] in 6 numbers")):
    with pytest.raises(ValueError, match=r"imgnums: expected distinct image numbers \(each "
                       r"latent measured once\), got repeated " + repeated):
      metrics.evaluate_edit(gen, "up", D, params, nums, quantile=0.9)
    with pytest.raises(ValueError, match="got repeated " + repeated):
      metrics.evaluate_at_quantiles(gen, "up", D, params, nums, [0.5, 0.9])
  # The same numbers in another order measure the same latents.
  again = metrics.evaluate_edit(gen, "up", D, params, np.array([13, 11, 12, 10]),
                                quantile=0.9)
  assert again["num_latents"] == 4 and again["context_match"] == m["context_match"]
