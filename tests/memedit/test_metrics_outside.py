"""The edit metrics checked against float64 numpy re-implementations of their documented
definitions, and their undefined cases and bad inputs."""

from __future__ import annotations

import json
import os
import re
import sys

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
