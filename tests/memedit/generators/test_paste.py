"""paste_target takes only values copied at the layer it pastes into: a Copied of another
layer, or values and boxes that do not fit the layer's value map, are refused before the
generator runs."""

from __future__ import annotations

import numpy as np
import pytest

from memedit import generators as gens

from toy import box, toy_generator

WIDTH = 5


@pytest.fixture(scope="module")
def gen():
  return toy_generator(width=WIDTH)


def test_values_copied_at_another_layer_are_refused_naming_both(gen):
  m = box(4, 12, 4, 12)
  copied = gens.copy_values(gen, "up1", 0, m)
  assert copied.layer == "up1" and copied.values.shape[-1] == WIDTH  # fits up2's channels
  with pytest.raises(ValueError, match="copied: expected values copied at layer 'up2' "
                                       r"\(the layer pasted into\), got values copied at "
                                       "layer 'up1'"):
    gens.paste_target(gen, "up2", copied, 1, m)
  target = gens.paste_target(gen, "up2", gens.copy_values(gen, "up2", 0, m), 1, m)
  assert target.targets.shape == (1, 8, 8, WIDTH)


def _copied(values_shape, box_, alpha_shape=None):
  alpha_shape = values_shape[:2] if alpha_shape is None else alpha_shape
  return gens.Copied(np.zeros(values_shape, np.float32), np.ones(alpha_shape, np.float32),
                     box_, np.zeros(values_shape[-1:], np.float32))


@pytest.mark.parametrize("copied, want", [
    (_copied((2, 2, 3), (0, 2, 0, 2)),
     r"expected values of shape \(H, W, 5\) \(C_out = 5 of layer 'up2'\), got \(2, 2, 3\)"),
    (_copied((2, 2), (0, 2, 0, 2)), r"expected values of shape \(H, W, 5\)"),
    (_copied((2, 2, WIDTH), (15, 17, 0, 2)),
     r"expected a box \(y0, y1, x0, x1\) inside the 16x16 value map of layer 'up2'.*got "
     r"box \(15, 17, 0, 2\)"),
    (_copied((2, 2, WIDTH), (0, 3, 0, 2)), r"the size of the values \(2, 2\).*got box"),
    (_copied((2, 2, WIDTH), (0, 2, 0, 2), (3, 3)),
     r"got box \(0, 2, 0, 2\) and alpha \(3, 3\)"),
    (_copied((2, 2, WIDTH), (0, 2.0, 0, 2)), "expected a box"),
    ("not copied", "copied: expected a Copied"),
])
def test_copied_values_that_do_not_fit_the_layer_are_refused(gen, copied, want):
  with pytest.raises(ValueError, match=want):
    gens.paste_target(gen, "up2", copied, 1, box(4, 12, 4, 12))


def test_a_copied_made_by_hand_that_fits_is_pasted(gen):
  target = gens.paste_target(gen, "up2", _copied((2, 2, WIDTH), (0, 2, 0, 2)), 1,
                             box(4, 12, 4, 12))
  assert target.full_alpha.sum() > 0
