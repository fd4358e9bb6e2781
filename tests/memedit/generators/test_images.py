"""Pictures: uint8 conversion, comparison grids and PNG files."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from memedit import generators as gens


def test_grid_places_each_pair_and_png_round_trips(tmp_path):
  rs = np.random.RandomState(0)
  a = rs.uniform(-1, 1, (5, 3, 3, 3)).astype(np.float32)
  b = rs.uniform(-1, 1, (5, 3, 3, 3)).astype(np.float32)
  grid = gens.comparison_grid(a, b, columns=2, pad=1, scale=2)
  R, pad = 6, 1
  assert grid.shape == (3 * (R + pad) + pad, 2 * (2 * R + 3 * pad) + pad, 3)
  ua, ub = gens.to_uint8(a), gens.to_uint8(b)
  for i in range(5):
    r, c = divmod(i, 2)
    y, x = pad + r * (R + pad), pad + c * (2 * R + 3 * pad)
    np.testing.assert_array_equal(grid[y:y + R:2, x:x + R:2], ua[i])
    np.testing.assert_array_equal(grid[y:y + R:2, x + R + pad:x + 2 * R + pad:2], ub[i])
  np.testing.assert_array_equal(grid[-pad:], 255)  # white border
  png = tmp_path / "g.png"
  gens.save_png(png, grid)
  np.testing.assert_array_equal(np.asarray(Image.open(png)), grid)
  np.testing.assert_array_equal(gens.to_uint8(np.array([-1.5, -1, -0.999, 0, 1, 7])),
                                [0, 0, 0, 128, 255, 255])


def test_bad_images_are_refused():
  with pytest.raises(ValueError, match="images: expected finite values, got 4 NaN or "
                     "infinite of 12"):
    gens.comparison_grid(np.zeros((1, 2, 2, 3)), np.array([[[[np.nan, 0, 0]] * 2] * 2]))
  with pytest.raises(ValueError, match=r"edited_images: expected shape \(1, 2, 2, 3\), got "
                                       r"\(2, 2, 2, 3\)"):
    gens.comparison_grid(np.zeros((1, 2, 2, 3)), np.zeros((2, 2, 2, 3)))
  with pytest.raises(ValueError, match="expected uint8 pixel values"):
    gens.save_png("never.png", np.full((2, 2, 3), 300.0))
