"""layer_scores checks its directions against the layer's keys, and its batch size, before
the generator runs; no images give an empty score array."""

from __future__ import annotations

import re

import numpy as np
import pytest

from memedit import generators as gens

from toy import toy_generator

WIDTH = 5


@pytest.fixture(scope="module")
def gen():
  return toy_generator(width=WIDTH)


def _shape(shape) -> str:
  """A shape as a regular expression."""
  return re.escape(str(tuple(shape)))


@pytest.mark.parametrize("D, shape", [
    (np.eye(4)[:2], (2, 4)),             # another key dimension
    (np.eye(WIDTH)[0], (WIDTH,)),        # one direction without its row axis
    (np.eye(WIDTH)[None], (1, WIDTH, WIDTH)),
    (np.zeros((0, WIDTH)), (0, WIDTH)),  # no direction
])
def test_directions_of_another_shape_than_r_by_the_key_dimension_are_refused(gen, D, shape):
  want = (rf"D: expected directions of shape \(r, {WIDTH}\) with r >= 1 \({WIDTH} the key "
          rf"dimension C_in of layer 'up2'\), got shape {_shape(shape)}")
  with pytest.raises(ValueError, match=want):
    gens.layer_scores(gen, "up2", D, 3)


def test_directions_must_be_finite_numbers(gen):
  D = np.eye(WIDTH)[:2]
  D[1, 3] = np.nan
  with pytest.raises(ValueError, match="D: expected finite values, got 1 NaN or infinite of 10"):
    gens.layer_scores(gen, "up2", D, 3)
  with pytest.raises(ValueError, match="D: expected a numeric array of directions, got dtype"):
    gens.layer_scores(gen, "up2", np.array([["a"] * WIDTH]), 3)


@pytest.mark.parametrize("batch_size", [0, -2, 1.5, True])
def test_batch_size_must_be_a_positive_int(gen, batch_size):
  with pytest.raises(ValueError, match=f"batch_size: expected a positive int, got {batch_size}"):
    gens.layer_scores(gen, "up2", np.eye(WIDTH)[:1], 3, batch_size=batch_size)


def test_valid_directions_score_and_no_images_give_no_scores(gen):
  D = np.eye(WIDTH)[:2]
  scores = gens.layer_scores(gen, "up2", D, 3, batch_size=2)  # two batches
  keys = gens.run_layer(gen, "up2", gen.latents(3)).keys
  assert scores.shape == (3, 8, 8)
  np.testing.assert_allclose(scores, np.linalg.norm(keys[..., :2], axis=-1), rtol=1e-5,
                             atol=1e-6)
  empty = gens.layer_scores(gen, "up2", D, [])
  assert empty.shape == (0, 8, 8) and empty.dtype == np.float32


def test_match_scores_refuses_keys_and_directions_of_other_widths():
  with pytest.raises(ValueError, match=r"keys, D: expected keys \(\.\.\., C_in\) and "
                                       r"directions D \(r, C_in\) with the same C_in, got "
                                       r"shapes \(3, 5\) and \(1, 4\)"):
    gens.match_scores(np.ones((3, 5)), np.ones((1, 4)))
  assert gens.match_scores(np.ones((3, 4)), np.eye(4)[:1]).tolist() == [1.0, 1.0, 1.0]


def test_layer_scores_pad_batches_so_that_few_shapes_compile(gen):
  """Each new number of images compiled the model anew; batches are padded to powers of
  two as the other passes do, and the scores are those of unpadded runs."""
  from compilations import Compilations

  layer = sorted(gen.layers)[-1]
  d = gens.layer_info(gen, layer).key_dim
  D = np.eye(d)[:1]
  want = gens.layer_scores(gen, layer, D, list(range(4)))
  with Compilations() as c:
    got = gens.layer_scores(gen, layer, D, [0, 1, 2])
  assert c.count == 0
  np.testing.assert_array_equal(got, want[:3])
