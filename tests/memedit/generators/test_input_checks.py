"""The workflow's entry points refuse bad inputs eagerly, before running the generator:
masks not of the canvas's size or outside [0, 1], image numbers that are not integers in
range, key units out of range, unit-selection weights the other methods refuse, and
learning rates that are not finite positive numbers."""

from __future__ import annotations

import numpy as np
import pytest

from memedit import generators as gens
from memedit.specs import MAX_IMAGES

from toy import RESOLUTION, box, toy_generator

R = RESOLUTION
WIDTH = 5


@pytest.fixture(scope="module")
def gen():
  return toy_generator(width=WIDTH)


def _mask_calls(gen, mask):
  """Every entry point that takes a canvas mask, with ``mask``."""
  good = box(4, 12, 4, 12)
  copied = gens.Copied(np.zeros((2, 2, WIDTH), np.float32), np.ones((2, 2), np.float32),
                       (0, 2, 0, 2), np.zeros(WIDTH, np.float32))
  return [lambda: gens.context_keys(gen, "up2", [(1, good), (2, mask)]),
          lambda: gens.copy_values(gen, "up2", 0, mask),
          lambda: gens.paste_target(gen, "up2", copied, 1, mask),
          lambda: gens.erase_target(gen, "up2", 1, mask, [0])]


@pytest.mark.parametrize("size", [4, 6, 32])
def test_masks_of_another_size_than_the_canvas_are_refused(gen, size):
  want = f"mask: expected shape ({R}, {R}) (the canvas), got ({size}, {size})"
  for call in _mask_calls(gen, np.ones((size, size))):
    with pytest.raises(ValueError, match=want.replace("(", r"\(").replace(")", r"\)")):
      call()


@pytest.mark.parametrize("value, shown", [(np.nan, "nan"), (-0.5, "-0.5"), (2.0, "2.0")])
def test_masks_with_values_outside_0_1_are_refused_naming_the_value(gen, value, shown):
  mask = box(4, 12, 4, 12)
  mask[5, 6] = value
  for call in _mask_calls(gen, mask):
    with pytest.raises(ValueError, match=rf"mask: expected values in \[0, 1\], got {shown} "
                                         r"\(at \(5, 6\)\)"):
      call()


@pytest.mark.parametrize("imgnum, want", [
    (1.5, "expected an integer image number, got 1.5"),
    (True, "expected an integer image number, got True"),
    (np.float64(2.0), "expected an integer image number, got 2.0"),
    (-1, f"expected an image number 0 <= i < {MAX_IMAGES}"),
    (10**9, f"expected an image number 0 <= i < {MAX_IMAGES}.*got 1000000000"),
])
def test_image_numbers_must_be_integers_in_range(gen, imgnum, want):
  m = box(4, 12, 4, 12)
  for call in (lambda: gens.context_keys(gen, "up2", [(imgnum, m)]),
               lambda: gens.copy_values(gen, "up2", imgnum, m),
               lambda: gens.erase_target(gen, "up2", imgnum, m, [0])):
    with pytest.raises(ValueError, match=want):
      call()


def test_latents_refuse_non_integers_and_bound_image_numbers(gen):
  with pytest.raises(ValueError, match="imgnums: expected an integer image number, got 1.7"):
    gen.latents([1.7])
  with pytest.raises(ValueError, match="expected an int n or a sequence of integer image "
                                       "numbers, got True"):
    gen.latents(True)
  with pytest.raises(ValueError, match="expected a number of images n >= 0, got -3"):
    gen.latents(-3)
  # A count is not bounded by the image numbers a spec may name (statistics may want more).
  assert gen.latents(MAX_IMAGES + 1).shape[0] == MAX_IMAGES + 1
  with pytest.raises(ValueError, match="expected image numbers i >= 0, got -1"):
    gens.reference_latents([0, -1], 4)
  with pytest.raises(ValueError, match="expected an integer image number, got 2.0"):
    gens.reference_latents([1, 2.0], 4)
  np.testing.assert_array_equal(gen.latents(np.array([2, 0])), gen.latents([2, 0]))
  np.testing.assert_array_equal(gen.latents(np.int64(3)), gen.latents([0, 1, 2]))
  assert gen.latents([]).shape == (0, 8)


@pytest.mark.parametrize("units, want", [
    ([7], f"units: expected integers 0 <= unit < {WIDTH}, got 7"),
    ([-1], f"units: expected integers 0 <= unit < {WIDTH}, got -1"),
    ([1.0], f"units: expected integers 0 <= unit < {WIDTH}, got 1.0"),
    ([1, 1], "units: expected distinct units, got 1 2 times"),
    ([], "units: expected at least one unit, got none"),
])
def test_erase_units_must_be_distinct_units_of_the_layer(gen, units, want):
  with pytest.raises(ValueError, match=want):
    gens.erase_target(gen, "up2", 1, box(4, 12, 4, 12), units)
  with pytest.raises(ValueError, match=want):
    gens.unit_zeroing_edit(gen, "up2", units)


def test_unit_directions_check_their_inputs_as_the_other_methods():
  rs = np.random.RandomState(0)
  keys = rs.randn(6, 4)
  C = keys.T @ keys / 6
  w = np.ones(6)
  msgs = {
      "zeros": r"rank: expected at most the number of context keys with positive weight \(0\)",
      "nan": "weights: expected finite values",
      "negative": "weights: expected non-negative weights",
  }
  bad = {"zeros": np.zeros(6), "nan": np.where(np.arange(6) == 2, np.nan, 1.0),
         "negative": np.where(np.arange(6) == 2, -1.0, 1.0)}
  for name, weights in bad.items():
    for method in ("unit", "zca"):
      with pytest.raises(ValueError, match=msgs[name]):
        gens.directions(C, keys, weights, method=method)
  with pytest.raises(ValueError, match=r"keys: expected shape \(\.\.\., 3\)"):
    gens.directions(np.eye(3), keys, w, method="unit")
  with pytest.raises(ValueError, match="weights: expected"):
    gens.directions(C, keys, np.ones(5), method="unit")
  D = gens.directions(C, keys, w, rank=2, method="unit")
  assert D.shape == (2, 4) and np.allclose(D.sum(1), 1.0)


@pytest.mark.parametrize("lr", [-1.0, 0.0, np.nan, np.inf, True, "0.1"])
def test_learning_rates_must_be_finite_positive_numbers(gen, lr):
  D = np.eye(WIDTH, dtype=np.float32)[:1]
  want = "learning_rate: expected a finite positive number, got "
  for call in (lambda: gens.insert(gen, "up2", D, None, steps=3, learning_rate=lr),
               lambda: gens.insert(gen, "up2", D, None, steps=3, optimizer="gauss_newton",
                                   learning_rate=lr),
               lambda: gens.projected_insert(gen, "up2", D, None, steps=3, learning_rate=lr),
               lambda: gens.overfit(gen, "up2", None, steps=3, learning_rate=lr),
               lambda: gens.overfit_all(gen, "up2", None, steps=3, learning_rate=lr)):
    with pytest.raises(ValueError, match=want):
      call()


def test_an_erase_of_more_units_than_the_layer_has_warns_that_all_are_erased(gen):
  """erase_units past the layer's units silently erased every unit."""
  import memedit
  from memedit import specs

  state = gens.collect_statistics(gen, "up2", 4, batch_size=4, progress=False)
  C = np.asarray(memedit.second_moment(state))
  m = box(4, 12, 4, 12)
  spec = specs.make_spec(key=[(1, m)], paste=(2, m), layer="up2", kind="erase",
                         erase_units=10**6, canvas=R, solver={"steps": 1})
  with pytest.warns(UserWarning, match=f"erase_units: 1000000 is at least the {C.shape[0]} "
                    "units of layer 'up2': every unit is erased"):
    out = gens.edit_from_spec(gen, spec, C)
  assert sorted(out.units) == list(range(C.shape[0]))
