"""ports.stylegan2.swd: sliced Wasserstein distance on Laplacian pyramids against a float64
numpy reference of Karras et al.'s metric, and its behaviour on identical, blurred and
noisier image sets."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage

from ports.stylegan2 import swd as swd_lib

_GAUSS = np.outer([1, 4, 6, 4, 1], [1, 4, 6, 4, 1]).astype(np.float64) / 256.0


# The reference: the metric of the Progressive GAN code, NCHW, float64, scipy filters,
# fed the same random draws.

def _ref_pyr_down(x):
  return scipy.ndimage.convolve(x, _GAUSS[None, None], mode="mirror")[:, :, ::2, ::2]


def _ref_pyr_up(x):
  s = x.shape
  res = np.zeros((s[0], s[1], s[2] * 2, s[3] * 2), x.dtype)
  res[:, :, ::2, ::2] = x
  return scipy.ndimage.convolve(res, _GAUSS[None, None] * 4.0, mode="mirror")


def _ref_pyramid(x, num_levels):
  pyramid = [np.array(x, np.float64)]  # a copy: the levels are updated in place
  for _ in range(1, num_levels):
    pyramid.append(_ref_pyr_down(pyramid[-1]))
    pyramid[-2] -= _ref_pyr_up(pyramid[-1])
  return pyramid


def _ref_descriptors(level, centres, nhood_size):
  h = nhood_size // 2
  n, c = level.shape[:2]
  p = centres.shape[1]
  out = np.zeros((n, p, c, nhood_size, nhood_size))
  for i in range(n):
    for j in range(p):
      y, x = centres[i, j]
      out[i, j] = level[i, :, y - h:y + h + 1, x - h:x + h + 1]
  desc = out.reshape(n * p, c, nhood_size, nhood_size)
  desc = desc - desc.mean(axis=(0, 2, 3), keepdims=True)
  desc = desc / desc.std(axis=(0, 2, 3), keepdims=True)
  return desc.reshape(n * p, -1)


def _ref_swd(a_nhwc, b_nhwc, plan, nhood_size):
  a = np.float64(a_nhwc).transpose(0, 3, 1, 2)
  b = np.float64(b_nhwc).transpose(0, 3, 1, 2)
  dists = []
  pa, pb = _ref_pyramid(a, len(plan)), _ref_pyramid(b, len(plan))
  for la, lb, (centres, dirs) in zip(pa, pb, plan):
    da = _ref_descriptors(la, centres, nhood_size)
    db = _ref_descriptors(lb, centres, nhood_size)
    proj_a = np.sort(da @ dirs.T, axis=0)
    proj_b = np.sort(db @ dirs.T, axis=0)
    dists.append(1e3 * np.mean(np.abs(proj_a - proj_b)))
  return dists


def _textures(n, res, seed):
  """Random colour textures (uint8): blurred, normalised noise plus a random gradient."""
  rs = np.random.RandomState(seed)
  noise = scipy.ndimage.gaussian_filter(rs.standard_normal((n, res, res, 3)), (0, 0.8, 0.8, 0))
  ramp = np.linspace(-1, 1, res)
  grad = rs.standard_normal((n, 1, 1, 3)) * ramp[None, :, None, None]
  x = 128 + 40 * noise / noise.std() + 30 * grad
  return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def test_pyramid_matches_scipy_and_reconstructs():
  x = _textures(2, 16, 0).astype(np.float64)
  got = swd_lib.laplacian_pyramid(jnp.asarray(x, jnp.float32), 3)
  ref = _ref_pyramid(x.transpose(0, 3, 1, 2), 3)
  for g, r in zip(got, ref):
    np.testing.assert_allclose(np.asarray(g).transpose(0, 3, 1, 2), r, atol=2e-3)
  recon = got[-1]
  for level in reversed(got[:-1]):
    recon = level + swd_lib.pyr_up(recon)
  np.testing.assert_allclose(np.asarray(recon), x, atol=2e-3)
  with pytest.raises(ValueError, match="divisible by 8"):
    swd_lib.laplacian_pyramid(jnp.zeros((1, 12, 12, 3)), 4)


def test_matches_float64_reference():
  a, b = _textures(5, 16, 1), _textures(5, 16, 2)
  kw = dict(nhood_size=7, nhoods_per_image=16, dir_repeats=2, dirs_per_repeat=8)
  got = swd_lib.swd(a, b, seed=3, min_resolution=8, chunk=2, **kw)
  assert got["resolutions"] == [16, 8]
  plan = swd_lib.sample_plan(5, [16, 8], 3, 3, **kw)
  want = _ref_swd(a, b, plan, 7)
  np.testing.assert_allclose(got["distances"], want, rtol=2e-4)
  assert got["mean"] == pytest.approx(np.mean(want), rel=2e-4)
  assert all(d > 0 for d in got["distances"])


def test_paper_defaults_and_draws():
  plan = swd_lib.sample_plan(4, swd_lib.pyramid_resolutions(64), 3, seed=0)
  assert swd_lib.pyramid_resolutions(64) == [64, 32, 16]
  for (centres, dirs), res in zip(plan, [64, 32, 16]):
    assert centres.shape == (4, 128, 2) and centres.min() >= 3 and centres.max() < res - 3
    assert dirs.shape == (512, 147)
    np.testing.assert_allclose(np.linalg.norm(dirs, axis=1), 1.0)
  # Floats in [-1, 1] are read as images and quantised like uint8 images.
  x = _textures(2, 16, 4)
  as_float = x.astype(np.float32) / 127.5 - 1.0
  np.testing.assert_array_equal(swd_lib.to_pixels(as_float), x.astype(np.float32))


def test_identical_blurred_and_noisier_sets():
  a, a2 = _textures(32, 32, 5), _textures(32, 32, 6)
  same = swd_lib.swd(a, a)
  assert same["resolutions"] == [32, 16]
  assert same["distances"] == [0.0, 0.0] and same["mean"] == 0.0
  baseline = swd_lib.swd(a, a2)  # another sample of the same distribution

  def blurred(sigma):
    b = scipy.ndimage.gaussian_filter(a2.astype(np.float64), (0, sigma, sigma, 0))
    return np.clip(np.rint(b), 0, 255).astype(np.uint8)

  blur1, blur2 = swd_lib.swd(a, blurred(0.7)), swd_lib.swd(a, blurred(1.5))
  rs = np.random.RandomState(7)
  noisy = np.clip(np.rint(a2 + 40 * rs.standard_normal(a2.shape)), 0, 255).astype(np.uint8)
  noise = swd_lib.swd(a, noisy)
  assert baseline["mean"] > 0
  # The finest band tells most: blur removes detail (more with more blur), noise adds it.
  assert baseline["distances"][0] < blur1["distances"][0] < blur2["distances"][0]
  assert blur2["distances"][0] > 2 * baseline["distances"][0]
  assert noise["distances"][0] > 1.3 * baseline["distances"][0]
  assert blur2["mean"] > 1.3 * baseline["mean"] and noise["mean"] > baseline["mean"]


def test_refuses_mismatched_sets():
  with pytest.raises(ValueError, match="expected the same"):
    swd_lib.swd(_textures(2, 16, 0), _textures(3, 16, 0))
  with pytest.raises(ValueError, match="expected uint8 or float"):
    swd_lib.swd(np.zeros((1, 16, 16, 3), np.int32), np.zeros((1, 16, 16, 3), np.int32))
  with pytest.raises(ValueError, match="min_resolution"):
    swd_lib.swd(_textures(1, 8, 0), _textures(1, 8, 0))
