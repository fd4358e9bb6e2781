"""Own taps and context directions: the pieces of the workflow that are pure geometry or math."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from memedit import generators as gens
from memedit.layers.conv import conv_patches


@pytest.mark.parametrize("res", [4, 8, 16, 32, 128])
def test_masks_are_resampled_as_the_reference_resizes_them(res):
  # The reference reads a mask with PIL's bilinear resize (a triangle filter widened by the
  # downsampling factor) of the 8-bit image; mask_at matches it to one 8-bit step.
  rs = np.random.RandomState(res)
  m = np.zeros((64, 64), np.float32)
  for _ in range(3):
    y, x = rs.randint(0, 56, 2)
    m[y:y + rs.randint(3, 9), x:x + rs.randint(3, 9)] = 1.0
  m[5:9, 40:50] = 0.5
  rgb = np.repeat(np.round(m * 255).astype(np.uint8)[:, :, None], 3, 2)
  ref = np.asarray(Image.fromarray(rgb).resize((res, res), Image.BILINEAR))[:, :, 0] / 255.0
  got = gens.mask_at(m, res)
  assert got.shape == (res, res) and got.dtype == np.float32
  np.testing.assert_allclose(got, ref, atol=1 / 255)  # PIL: 8-bit output, fixed-point weights
  # A mask pixel counts where it is > 0 after resampling: PIL's rounding to 8 bits can drop
  # a faint edge pixel (< 0.5/255) that mask_at keeps.
  assert not ((ref > 0) & (got <= 0)).any()


@pytest.mark.parametrize("module,scale", [
    (nn.Conv(2, (3, 3), padding="SAME", use_bias=False), 1),
    (nn.Conv(2, (1, 1), use_bias=False), 1),
    (nn.Conv(2, (5, 5), padding="SAME", use_bias=False), 1),
    (nn.ConvTranspose(2, (4, 4), strides=(2, 2), padding="SAME", use_bias=False), 2),
    (nn.ConvTranspose(2, (4, 4), strides=(2, 2), padding=((2, 2), (2, 2)), use_bias=False), 2),
    (nn.ConvTranspose(2, (3, 3), strides=(3, 3), padding="SAME", use_bias=False), 3),
])
def test_own_taps_agree_with_the_layer_s_patch_geometry(module, scale):
  # tap_mask runs the layer itself; the patch extractor is an independent account of which
  # input pixel each tap reads for each output pixel. A tap is a key's own when every
  # output it reaches from the centre key lies in that key's s×s cell.
  kh, kw = module.kernel_size
  own = gens.tap_mask(lambda k, x: module.apply({"params": {"kernel": k}}, x), (kh, kw, 1, 2),
                      scale, name="probe")
  n = 2 * max(kh, kw) + 1
  c = n // 2
  x = np.zeros((1, n, n, 1), np.float32)
  x[0, c, c, 0] = 1.0
  hit = np.abs(np.asarray(conv_patches(module, jnp.asarray(x)))[0]).reshape(
      n * scale, n * scale, kh, kw) > 0
  inside = np.zeros((n * scale, n * scale), bool)
  inside[c * scale:(c + 1) * scale, c * scale:(c + 1) * scale] = True
  want = hit.any((0, 1)) & ~(hit & ~inside[:, :, None, None]).any((0, 1))
  np.testing.assert_array_equal(own, want)
  assert own.sum() == scale * scale


def test_own_taps_refuse_layers_without_a_tap_geometry():
  with pytest.raises(ValueError, match=r"taps 'own' for layer 'd': expected a convolution "
                                       r"kernel \(kh, kw, C_in, C_out\), got shape \(3, 2\)"):
    gens.tap_mask(lambda k, x: x, (3, 2), 1, name="d")
  conv = nn.Conv(2, (3, 3), strides=(2, 2), padding="SAME", use_bias=False)
  with pytest.raises(ValueError, match=r"taps 'own' for layer 's': expected a 14×14 output "
                                       r"for a 7×7 input \(scale 2\), got 4×4"):
    gens.tap_mask(lambda k, x: conv.apply({"params": {"kernel": k}}, x), (3, 3, 1, 2), 2,
                  name="s")
  blur = lambda k, x: nn.Conv(2, (3, 3), padding="SAME", use_bias=False).apply(
      {"params": {"kernel": k}}, x).cumsum(1)
  with pytest.raises(ValueError, match=r"taps 'own' for layer 'b': expected a kernel tap "
                                       r"writing more than half of its output into the key's "
                                       r"own 1×1 output cell, got at most 0.250 of it"):
    gens.tap_mask(blur, (3, 3, 1, 2), 1, name="b")


def _blur121(y, xp):
  # 'same' [1, 2, 1] ⊗ [1, 2, 1] / 16 over the two spatial axes, zero padded.
  w = (0.25, 0.5, 0.25)
  n = y.shape[1]
  yp = xp.pad(y, ((0, 0), (1, 1), (1, 1), (0, 0)))
  return sum(w[a] * w[b] * yp[:, a:a + n, b:b + n] for a in range(3) for b in range(3))


def test_own_taps_of_a_layer_that_blurs_after_up_sampling_are_the_most_centred():
  # StyleGAN2's up-sampling convolutions blur after a stride-2 transposed convolution, so no
  # tap writes only its key's cell. The own taps are then those putting the largest share of
  # their output into the cell. Independent account: the patch extractor says where each
  # tap of the transposed convolution lands; the blur is spread there in numpy.
  up = nn.ConvTranspose(2, (3, 3), strides=(2, 2), padding="SAME", use_bias=False)
  apply = lambda k, x: _blur121(up.apply({"params": {"kernel": k}}, x), jnp)
  own = gens.tap_mask(apply, (3, 3, 1, 2), 2, name="up")
  n, s = 7, 2
  c = n // 2
  x = np.zeros((1, n, n, 1), np.float32)
  x[0, c, c, 0] = 1.0
  hit = np.abs(np.asarray(conv_patches(up, jnp.asarray(x)))[0]).reshape(n * s, n * s, 9) > 0
  spread = _blur121(hit.transpose(2, 0, 1)[..., None].astype(np.float64), np)[..., 0]
  share = spread[:, c * s:(c + 1) * s, c * s:(c + 1) * s].sum((1, 2)) / spread.sum((1, 2))
  assert share.max() > 0.5 and share.min() < share.max() - 0.1  # a strict choice to make
  np.testing.assert_array_equal(own.ravel(), np.isclose(share, share.max()))
  # Here they are the taps that, without the blur, write only inside the cell.
  plain = gens.tap_mask(lambda k, x: up.apply({"params": {"kernel": k}}, x), (3, 3, 1, 2), 2)
  np.testing.assert_array_equal(own, plain)
  assert own.sum() == 4


@pytest.mark.parametrize("method", ["zca", "mean"])
def test_shrunk_directions_match_a_float64_closed_form(method):
  rs = np.random.RandomState(3)
  a = rs.standard_normal((400, 12)) * np.linspace(0.05, 2.0, 12)
  C = (a.T @ a / len(a)).astype(np.float32)
  keys = rs.standard_normal((5, 12)).astype(np.float32) + 1.0
  weights = np.array([1.0, 0.5, 1.0, 0.25, 1.0], np.float32)
  alpha = 0.3
  S = (1 - alpha) * C.astype(np.float64) + alpha * np.trace(C.astype(np.float64)) / 12 * np.eye(12)
  lam, U = np.linalg.eigh(S)
  k = keys.astype(np.float64)
  if method == "mean":
    ref = np.linalg.solve(S, (weights[:, None] * k).sum(0) / weights.sum())
  else:  # top right singular vector of the weighted whitened keys, mapped back by S^{-1/2}
    whiten = (U * lam ** -0.5) @ U.T
    ref = np.linalg.svd(weights[:, None] * (k @ whiten))[2][0] @ whiten
  ref = ref / np.linalg.norm(ref) * np.sign(ref @ k.mean(0))
  D = gens.directions(C, keys, weights, method=method, shrinkage=alpha)
  np.testing.assert_allclose(D[0], ref, atol=2e-5)
  # The directions do not depend on C's scale; without shrinkage they are C⁻¹'s.
  np.testing.assert_allclose(gens.directions(10 * C, keys, weights, method=method,
                                           shrinkage=alpha), D, atol=2e-5)
  plain = gens.directions(C, keys, weights, method=method)
  assert np.abs(plain - D).max() > 1e-2
  for bad in (-0.1, 1.0, True):
    with pytest.raises(ValueError, match="shrinkage: expected a number in"):
      gens.directions(C, keys, weights, method=method, shrinkage=bad)
