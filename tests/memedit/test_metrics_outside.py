"""The edit metrics checked against float64 numpy re-implementations of their documented
definitions, and their undefined cases and bad inputs."""

from __future__ import annotations

import json
import os
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from memedit import generators as gens
from memedit import metrics
from memedit.tree import get_leaf, replace_leaf

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "generators"))
from toy import ToyGenerator, toy_generator  # noqa: E402

WIDTH, SEED = 4, 3
NUMS = list(range(50, 56))


def _forward(model, z):
  """Keys and values of up2 and the images, by calling the toy's layers directly."""
  x = nnx.relu(model.fc(z)).reshape(z.shape[0], 4, 4, WIDTH)
  keys = nnx.relu(model.up1(x))
  values = model.up2(keys)
  images = jnp.tanh(model.rgb(nnx.relu(values)))
  return [np.asarray(a, np.float64) for a in (keys, values, images)]


@pytest.fixture(scope="module")
def setup():
  gen = toy_generator(width=WIDTH, seed=SEED)
  rs = np.random.RandomState(0)
  D = np.linalg.qr(rs.standard_normal((WIDTH, 2)))[0].T  # rank 2, orthonormal rows
  path = gen.weight_path("up2")
  kernel = np.asarray(get_leaf(gen.params, path), np.float64)
  new_kernel = kernel + np.einsum("yxod,di->yxio", 0.5 * rs.standard_normal((4, 4, WIDTH, 2)), D)
  params = replace_leaf(gen.params, path, jnp.asarray(new_kernel, jnp.float32))
  original, changed = ToyGenerator(WIDTH, seed=SEED), ToyGenerator(WIDTH, seed=SEED)
  changed.up2.kernel[...] = jnp.asarray(new_kernel, jnp.float32)
  z = jnp.asarray(gen.latents(NUMS))
  return gen, D, params, _forward(original, z), _forward(changed, z), rs.standard_normal(WIDTH)


def _reference(D, before, after, target, quantile, resolution):
  """The module docstring's definitions in float64."""
  (k0, v0, i0), (_, v1, i1) = before, after
  s = np.sqrt(((k0 @ D.T) ** 2).sum(-1))
  thr = np.quantile(s.reshape(-1), quantile)
  m = s > thr
  up = lambda a, res: a.repeat(res // a.shape[-1], 1).repeat(res // a.shape[-1], 2)
  canvas, at_values = up(m, resolution), up(m, v0.shape[1])
  change = np.abs(i1 - i0).mean(-1)
  pad = np.pad(m, ((0, 0), (1, 1), (1, 1)))
  h = m.shape[1]
  wide = np.zeros_like(m)
  for dy in range(3):
    for dx in range(3):
      wide |= pad[:, dy:dy + h, dx:dx + h]
  footprint = up(wide, resolution)
  unmatched = ~m.reshape(len(m), -1).any(-1)
  cos = lambda v: (v @ target) / (np.linalg.norm(v, axis=-1) * np.linalg.norm(target))
  dist = lambda v: np.linalg.norm(v - target, axis=-1).mean() / np.linalg.norm(target)
  a, b = v0[at_values], v1[at_values]
  return {
      "threshold": thr, "latents": 1 - unmatched.mean(), "pixels": m.mean(),
      "inside": change[canvas].mean(), "outside": change[~canvas].mean(),
      "ratio": change[canvas].mean() / change[~canvas].mean(), "share": canvas.mean(),
      "unmatched": unmatched.sum(), "all": change.mean(),
      "fp_ratio": change[footprint].mean() / change[~footprint].mean(),
      "fp_share": footprint.mean(),
      "cosine_before": cos(a).mean(), "cosine_after": cos(b).mean(),
      "distance_before": dist(a), "distance_after": dist(b),
      "cosine_gain": cos(b).mean() - cos(a).mean(), "moved": 1 - dist(b) / dist(a),
  }


def test_metrics_match_a_float64_reference_with_rank_2_directions(setup):
  gen, D, params, before, after, target = setup
  ms = metrics.evaluate_at_quantiles(gen, "up2", D, params, NUMS, [0.5, 0.95],
                                     target_value=target)
  for q, m in zip((0.5, 0.95), ms):
    want = _reference(D, before, after, target, q, gen.resolution)
    sp, fp = m["specificity"], m["specificity_footprint"]
    got = {"threshold": m["threshold"], "latents": m["context_match"]["latents"],
           "pixels": m["context_match"]["pixels"], "inside": sp["inside_mean_abs_change"],
           "outside": sp["outside_mean_abs_change"], "ratio": sp["ratio"],
           "share": sp["inside_share_of_pixels"], "unmatched": sp["unmatched_latents"],
           "all": sp["all_mean_abs_change"], "fp_ratio": fp["ratio"],
           "fp_share": fp["inside_share_of_pixels"], **m["efficacy"]}
    assert got.keys() == want.keys()
    for k in want:
      np.testing.assert_allclose(got[k], want[k], rtol=2e-5, atol=1e-6, err_msg=k)
  # The query tools on the same keys.
  scores = gens.layer_scores(gen, "up2", D, NUMS)
  s = np.sqrt(((before[0] @ D.T) ** 2).sum(-1))
  np.testing.assert_allclose(scores, s, rtol=1e-5, atol=1e-6)
  thr = gens.match_threshold(scores, 0.9)
  np.testing.assert_allclose(thr, np.quantile(s, 0.9), rtol=1e-5)
  heat = gens.heatmaps(scores, thr, 16)
  np.testing.assert_allclose(heat, np.clip(s / thr, 0, 1).repeat(2, 1).repeat(2, 2),
                             atol=1e-5)
  best = s.reshape(len(NUMS), -1).max(-1)
  ranked = gens.rank_by_match(scores, NUMS)
  assert [n for n, _ in ranked] == [NUMS[i] for i in np.argsort(-best, kind="stable")]
  np.testing.assert_allclose([b for _, b in ranked], np.sort(best)[::-1], rtol=1e-5)


def _no_nan_json(m):
  return json.loads(json.dumps(m, allow_nan=False))


def test_undefined_ratios_are_null_not_huge_or_zero(setup):
  gen, D, params, *_ = setup
  # A zero edit: nothing changes anywhere, 0 / 0.
  m = _no_nan_json(metrics.evaluate_edit(gen, "up2", D, gen.params, NUMS, quantile=0.9))
  assert m["specificity"]["outside_mean_abs_change"] == 0.0
  assert m["specificity"]["ratio"] is None and m["specificity_footprint"]["ratio"] is None
  # Every key matched: no pixel outside (was inside / 1e-12, about 1e11).
  m = _no_nan_json(metrics.evaluate_edit(gen, "up2", D, params, NUMS, threshold=-1.0))
  assert m["context_match"] == {"latents": 1.0, "pixels": 1.0}
  assert m["specificity"]["ratio"] is None
  assert m["specificity"]["inside_mean_abs_change"] > 0
  # No key matched: no pixel inside (was a ratio of 0), and no efficacy.
  m = _no_nan_json(metrics.evaluate_edit(gen, "up2", D, params, NUMS, threshold=1e9,
                                         target_value=np.ones(WIDTH)))
  assert m["context_match"] == {"latents": 0.0, "pixels": 0.0}
  assert m["specificity"]["ratio"] is None and "efficacy" not in m
  assert m["specificity"]["inside_mean_abs_change"] == 0.0
  assert m["specificity"]["unmatched_latents"] == len(NUMS)


@pytest.mark.parametrize("target, message", [
    (np.zeros(WIDTH), r"target_value: expected a non-zero pasted value .* got all zeros"),
    (np.ones(WIDTH + 1), rf"target_value: expected the pasted value of shape \({WIDTH},\) "
                         rf"\(the value dimension C_out of layer 'up2'\), got shape \(5,\)"),
    (np.ones((1, WIDTH)), r"got shape \(1, 4\)"),
    (np.full(WIDTH, np.nan), r"target_value: expected finite values, got 4 NaN or infinite "
                             r"of 4"),
    (np.array(["a"] * WIDTH), r"target_value: expected a numeric array, got dtype <U1"),
])
def test_bad_target_values_are_refused(setup, target, message):
  gen, D, params, *_ = setup
  with pytest.raises(ValueError, match=message):
    metrics.evaluate_edit(gen, "up2", D, params, NUMS, target_value=target, quantile=0.9)


def test_bad_directions_thresholds_and_no_images_are_refused(setup):
  gen, D, params, *_ = setup
  bad = D.copy()
  bad[1, 2] = np.nan
  with pytest.raises(ValueError, match="D: expected finite values, got 1 NaN or infinite of 8"):
    metrics.evaluate_edit(gen, "up2", bad, params, NUMS, quantile=0.9)
  with pytest.raises(ValueError, match=r"D: expected directions of shape \(r, 4\) with r >= 1"):
    metrics.evaluate_at_quantiles(gen, "up2", D[0], params, NUMS, [0.9])
  for thr in (float("nan"), float("inf"), "1", True):
    with pytest.raises(ValueError, match=r"threshold: expected a finite number \(or None for "
                       rf"the quantile\), got {thr!r}"):
      metrics.evaluate_edit(gen, "up2", D, params, NUMS, threshold=thr)
  with pytest.raises(ValueError, match="imgnums: expected at least one held-out image "
                     "number, got none"):
    metrics.evaluate_edit(gen, "up2", D, params, [], quantile=0.9)


def test_query_tools_refuse_what_they_cannot_measure():
  s = np.abs(np.random.RandomState(1).standard_normal((2, 4, 4)))
  with pytest.raises(ValueError, match=r"scores: expected at least one match score, got "
                     r"shape \(0, 4, 4\)"):
    gens.match_threshold(np.zeros((0, 4, 4)), 0.9)
  nan = s.copy()
  nan[0, 1, 1] = np.nan
  for fn in (lambda: gens.match_threshold(nan, 0.9), lambda: gens.heatmaps(nan, 1.0, 8),
             lambda: gens.rank_by_match(nan, [3, 4])):
    with pytest.raises(ValueError, match="scores: expected finite match scores, got 1 NaN "
                       "or infinite of 32"):
      fn()
  for thr in (-1.0, float("nan")):
    with pytest.raises(ValueError, match=rf"threshold: expected a finite number >= 0, got "
                       rf"{thr!r}"):
      gens.heatmaps(s, thr, 8)
  for res in (0, -8, 8.0, 6):
    with pytest.raises(ValueError, match=rf"resolution: expected a positive int multiple of "
                       rf"the scores' size 4, got {res!r}"):
      gens.heatmaps(s, 1.0, res)
  for shape in ((), (4,), (1, 4, 0)):
    with pytest.raises(ValueError, match=r"scores: expected match score maps \(N, h, h\), got "
                       rf"shape {re.escape(str(shape))}"):
      gens.heatmaps(np.ones(shape), 1.0, 8)
  # A threshold of 0 marks every positive score.
  np.testing.assert_array_equal(gens.heatmaps(np.array([[[0.0, 2.0]] * 2]), 0.0, 2),
                                [[[0.0, 1.0], [0.0, 1.0]]])
  with pytest.raises(ValueError, match=r"scores, imgnums: expected scores \(N, \.\.\.\) of the "
                     r"N = 3 image numbers, got scores of shape \(2, 4, 4\)"):
    gens.rank_by_match(s, [1, 2, 3])
  assert gens.rank_by_match(np.zeros((0, 4, 4)), []) == []
  with pytest.raises(ValueError, match=r"D: expected at least one direction \(r >= 1\), got "
                     r"shape \(0, 3\)"):
    gens.match_scores(np.ones((2, 3)), np.zeros((0, 3)))
  with pytest.raises(ValueError, match="D: expected finite values, got 1 NaN"):
    gens.match_scores(np.ones((2, 3)), np.array([[np.nan, 0.0, 1.0]]))


class _Saturating(nnx.Module):
  """A transposed convolution under tanh: infinite values still give finite images."""

  def __init__(self):
    self.up = nnx.ConvTranspose(2, 3, (2, 2), strides=(2, 2), rngs=nnx.Rngs(0))

  def __call__(self, z):
    return jnp.tanh(self.up(z.reshape(-1, 2, 2, 2)))


def test_overflowing_values_behind_a_saturating_output_are_refused():
  gen = gens.Generator(_Saturating(), 8, 4, {"up": ("up",)})
  path = gen.weight_path("up")
  kernel = np.asarray(get_leaf(gen.params, path))
  huge = replace_leaf(gen.params, path, jnp.asarray(np.where(kernel > 0, 3e38, -3e38),
                                                    jnp.float32))
  images = gens.generate_images(gen.with_params(huge), gen.latents([5, 6]))
  assert np.isfinite(images).all()  # tanh(±inf) = ±1
  with pytest.raises(ValueError, match=r"values: expected finite values at layer 'up' from "
                     r"the edited generator, got \d+ NaN or infinite of 96"):
    metrics.evaluate_edit(gen, "up", np.eye(2)[:1], huge, [5, 6], quantile=0.5,
                          target_value=np.ones(3))


def test_an_undefined_ratio_meets_no_goal_and_prints_as_undefined():
  """The demo compared the ratio with 5 and formatted it with :.1f: None broke both."""
  from memedit.demo import _ratio, demo_goals

  sp = {"ratio": None, "outside_mean_abs_change": 0.0}
  goals = demo_goals({"specificity": sp, "specificity_footprint": sp, "efficacy": None},
                     {"specificity": {"ratio": 2.0, "outside_mean_abs_change": 0.1},
                      "efficacy": None})
  assert not goals["specificity_ratio_at_least_5"]
  assert not goals["footprint_specificity_ratio_at_least_5"]
  assert _ratio(None) == "undefined" and _ratio(8.94) == "8.9"


def test_directions_that_are_not_orthonormal_are_measured_by_their_span(setup):
  """A D with correlated rows of other lengths (the same span as the fixture's orthonormal
  D) was used as ‖D k‖ as given: other thresholds and other matched keys."""
  gen, D, params, before, after, target = setup
  raw = np.array([[1.0, 0.2], [0.9, 3.0]]) @ D  # max |D Dᵀ − I| about 9
  ms = metrics.evaluate_at_quantiles(gen, "up2", raw, params, NUMS, [0.5, 0.95],
                                     target_value=target)
  for q, m in zip((0.5, 0.95), ms):
    want = _reference(D, before, after, target, q, gen.resolution)
    np.testing.assert_allclose(m["threshold"], want["threshold"], rtol=2e-5)
    assert m["context_match"]["pixels"] == want["pixels"]
    np.testing.assert_allclose(m["specificity"]["ratio"], want["ratio"], rtol=2e-5)
    np.testing.assert_allclose(m["efficacy"]["cosine_after"], want["cosine_after"],
                               rtol=2e-5)
  s = np.sqrt(((before[0] @ D.T) ** 2).sum(-1))  # the keys' projections onto span(D)
  for Dx in (raw, raw.astype(np.float16), 7.0 * D[:1]):
    span = D if len(Dx) == 2 else D[:1]
    want = np.sqrt(((before[0] @ span.T) ** 2).sum(-1))
    np.testing.assert_allclose(gens.match_scores(before[0], Dx), want, rtol=2e-3 if
                               Dx.dtype == np.float16 else 1e-5, atol=1e-6)
  np.testing.assert_allclose(gens.layer_scores(gen, "up2", raw, NUMS), s, rtol=1e-5,
                             atol=1e-6)
  # An orthonormal D is used as given: the same bits as before.
  assert np.array_equal(gens.match_scores(before[0], D),
                        np.sqrt(((before[0].astype(np.float32) @ D.astype(np.float32).T)
                                 ** 2).sum(-1)))


def test_dependent_or_too_many_directions_are_refused_naming_the_deviation(setup):
  gen, D, params, before, *_ = setup
  dependent = np.vstack([D, 2.0 * D[:1] - D[1:]])  # 3 rows spanning 2 dimensions
  msg = (r"D: expected 3 independent directions \(rows orthonormal, max \|D Dᵀ − I\| <= "
         r"0\.0001, or independent rows, which are orthonormalised\), got rows with max "
         r"\|D Dᵀ − I\| = [\d.]+ .*linearly dependent.*memedit\.context_directions")
  with pytest.raises(ValueError, match=msg):
    metrics.evaluate_edit(gen, "up2", dependent, params, NUMS, quantile=0.9)
  with pytest.raises(ValueError, match=msg):
    gens.match_scores(before[0], dependent)
  five = np.vstack([np.eye(WIDTH), np.ones((1, WIDTH))])
  with pytest.raises(ValueError, match=r"D: expected orthonormal rows \(max \|D Dᵀ − I\| <= "
                     r"0\.0001\) or at most C_in = 4 independent ones, got 5 rows \(shape "
                     r"\(5, 4\)\) with max \|D Dᵀ − I\| = 3;"):
    gens.layer_scores(gen, "up2", five, NUMS)
  with pytest.raises(ValueError, match=r"D: expected a numeric array of directions, got "
                     r"dtype complex128"):
    gens.match_scores(before[0], D * 1j)
  with pytest.raises(ValueError, match=r"D: expected a numeric array of directions, got "
                     r"dtype bool"):
    metrics.evaluate_edit(gen, "up2", np.eye(WIDTH, dtype=bool)[:1], params, NUMS)
  with pytest.raises(ValueError, match=r"keys: expected a numeric array of keys, got dtype "
                     r"<U1"):
    gens.match_scores(np.array([["a"] * WIDTH]), D)
  nan = before[0][:1].copy()
  nan[0, 0, 0, 0] = np.nan
  with pytest.raises(ValueError, match="keys: expected finite keys, got 1 NaN or infinite "
                     "of 256"):
    gens.match_scores(nan, D)


def test_to_uint8_takes_the_generator_range_and_matches_a_float64_reference():
  rs = np.random.RandomState(4)
  x = rs.uniform(-1.3, 1.3, (3, 5, 7, 3))  # an odd, non-square size
  ref = lambda a, lo, hi: np.round((np.clip(np.asarray(a, np.float64), lo, hi) - lo)
                                   * 255.0 / (hi - lo))
  np.testing.assert_array_equal(gens.to_uint8(x), ref(x, -1, 1))
  # A [0, 1] generator: the default range gave 128 for black and 255 from 0.5 up.
  y = rs.uniform(-0.1, 1.1, (2, 3, 3, 3))
  np.testing.assert_array_equal(gens.to_uint8(y, value_range=(0.0, 1.0)), ref(y, 0, 1))
  np.testing.assert_array_equal(gens.to_uint8(y, (0, 1)), ref(y, 0, 1))
  # float16 and bfloat16 images were converted in their own precision (off by one).
  for dt in (np.float16, jnp.bfloat16):
    z = np.asarray(jnp.asarray(rs.uniform(-1, 1, 4000), dt))
    np.testing.assert_array_equal(gens.to_uint8(z), ref(z, -1, 1))
  # Far outside the range: clipped, without overflowing (float32 max · 127.5 was inf).
  import warnings
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    big = np.array([3e38, -3e38, 1.5, -7.0], np.float32)
    assert gens.to_uint8(big).tolist() == [255, 0, 255, 0]
    assert gens.to_uint8(big, value_range=(0, 1)).tolist() == [255, 0, 255, 0]


def test_to_uint8_refuses_pixels_nan_and_bad_ranges_by_name():
  with pytest.raises(ValueError, match=r"images: expected floating-point images with values in "
                     r"about \[-1, 1\], got dtype uint8 \(uint8 images are already pixels\)"):
    gens.to_uint8(np.array([0, 128, 255], np.uint8))
  with pytest.raises(ValueError, match=r"in about \[0, 1\], got dtype int64"):
    gens.to_uint8(np.array([0, 1], np.int64), value_range=(0, 1))
  with pytest.raises(ValueError, match=r"got dtype bool"):
    gens.to_uint8(np.array([True]))
  with pytest.raises(ValueError, match=r"images: expected finite values, got 3 NaN or infinite "
                     r"of 4 \(2 NaN, 1 infinite;"):
    gens.to_uint8(np.array([np.nan, np.inf, 0.0, np.nan]))
  for vr in ((1.0, 0.0), (0.0, 0.0), (0.0, float("inf")), (True, 2.0), ("0", "1")):
    with pytest.raises(ValueError, match=r"value_range: expected two finite numbers lo < hi "
                       rf"\(the generator's output range, .*got {re.escape(repr(vr))}"):
      gens.to_uint8(np.zeros(2), value_range=vr)
  for vr in (None, (0.0,), 1.0):
    with pytest.raises(ValueError, match=rf"value_range: expected \(lo, hi\).*got "
                       rf"{re.escape(repr(vr))}"):
      gens.to_uint8(np.zeros(2), value_range=vr)


def test_comparison_grid_of_non_square_images_and_bad_layouts():
  rs = np.random.RandomState(5)
  a = rs.uniform(0, 1, (3, 3, 5, 1))
  b = rs.uniform(0, 1, (3, 3, 5, 1))
  grid = gens.comparison_grid(a, b, columns=2, pad=1, scale=2, value_range=(0, 1))
  H, W, pad = 6, 10, 1
  assert grid.shape == (2 * (H + pad) + pad, 2 * (2 * W + 3 * pad) + pad, 1)
  ua, ub = gens.to_uint8(a, (0, 1)), gens.to_uint8(b, (0, 1))
  for i in range(3):
    r, c = divmod(i, 2)
    y, x = pad + r * (H + pad), pad + c * (2 * W + 3 * pad)
    np.testing.assert_array_equal(grid[y:y + H:2, x:x + W:2], ua[i])
    np.testing.assert_array_equal(grid[y:y + H:2, x + W + pad:x + 2 * W + pad:2], ub[i])
  np.testing.assert_array_equal(grid[-pad:], 255)
  np.testing.assert_array_equal(grid[pad + H + pad:, pad + 2 * W + 3 * pad:], 255)  # no pair 3
  ok = np.zeros((2, 3, 3, 3))
  for kw, msg in ((dict(columns=0), r"columns: expected an int >= 1, got 0"),
                  (dict(columns=1.5), r"columns: expected an int >= 1, got 1\.5"),
                  (dict(scale=0), r"scale: expected an int >= 1, got 0"),
                  (dict(pad=-1), r"pad: expected an int >= 0, got -1")):
    with pytest.raises(ValueError, match=msg):
      gens.comparison_grid(ok, ok, **kw)
  for bad in (np.zeros((3, 3, 3)), np.zeros((0, 3, 3, 3))):
    with pytest.raises(ValueError, match=r"original: expected images \(N, H, W, C\) with "
                       rf"N >= 1, got shape {re.escape(str(bad.shape))}"):
      gens.comparison_grid(bad, bad)


def test_half_precision_scores_give_float64_reference_thresholds_and_heat_maps():
  """bfloat16 scores were interpolated and divided in bfloat16 (errors of about 2e-3)."""
  s = np.asarray(jnp.asarray(np.abs(np.random.RandomState(6).standard_normal((2, 4, 4))),
                             jnp.bfloat16))
  s64 = s.astype(np.float64)
  for q in (0.37, 0.9):
    np.testing.assert_allclose(gens.match_threshold(s, q), np.quantile(s64, q), rtol=1e-6)
  heat = gens.heatmaps(s, 0.7, 8)
  np.testing.assert_allclose(heat, np.clip(s64 / 0.7, 0, 1).repeat(2, 1).repeat(2, 2),
                             rtol=1e-6, atol=1e-7)
  ranked = gens.rank_by_match(np.asarray(jnp.asarray(s, jnp.float16)), [4, 5])
  best = s64.reshape(2, -1).max(-1)
  assert [n for n, _ in ranked] == [[4, 5][i] for i in np.argsort(-best, kind="stable")]


def test_edited_params_that_cannot_be_the_generators_are_refused_before_running(setup):
  """A Generator gave JAX's 'Error interpreting argument ... as an abstract array', a
  sub-tree 'Incorrect number of leaves', and None measured the original against itself."""
  gen, D, params, *_ = setup
  n = len(jax.tree_util.tree_leaves(gen.params))
  for bad, got in ((gen, "a Generator"), (None, "None")):
    with pytest.raises(ValueError, match=r"edited_params: expected the edited generator's "
                       rf"parameters \(e\.g\. edited\(gen, edit\)\[0\]\.params\), got {got}"):
      metrics.evaluate_edit(gen, "up2", D, bad, NUMS, quantile=0.9)
  with pytest.raises(ValueError, match=rf"edited_params: expected a parameter tree like "
                     rf"gen.params with {n} leaves .*got 1 leaves"):
    metrics.evaluate_at_quantiles(gen, "up2", D, {"kernel": np.zeros(3)}, NUMS, [0.9])
  path = gen.weight_path("up2")
  kernel = np.asarray(get_leaf(params, path))
  wrong = replace_leaf(params, path, jnp.asarray(kernel[..., :-1]))
  with pytest.raises(ValueError, match=rf"edited_params: expected leaf \d+ of shape "
                     rf"{re.escape(str(kernel.shape))}, as in gen.params, got shape "
                     rf"{re.escape(str(kernel[..., :-1].shape))}"):
    metrics.evaluate_edit(gen, "up2", D, wrong, NUMS, quantile=0.9)
  # A bfloat16 copy of the edited kernel has the same shapes and is measured.
  half = replace_leaf(params, path, jnp.asarray(kernel, jnp.bfloat16))
  m = metrics.evaluate_edit(gen, "up2", D, half, NUMS, quantile=0.9)
  assert m["specificity"]["all_mean_abs_change"] > 0
