"""The whole copy–paste–context workflow on a small NNX generator written here."""

from __future__ import annotations

import jax
import numpy as np
import pytest

import memedit
from memedit import generators as gens
from memedit.tree import get_leaf, leaf_paths

from toy import box, toy_generator

LAYER = "up2"


@pytest.fixture(scope="module")
def toy():
  gen = toy_generator()
  state = gens.collect_statistics(gen, LAYER, 48, batch_size=16, progress=False)
  return gen, state


def test_statistics_are_the_float64_second_moment_of_the_keys(toy):
  gen, state = toy
  keys = gens.run_layer(gen, LAYER, gen.latents(48)).keys.astype(np.float64)
  assert keys.shape == (48, 8, 8, 32)
  keys = keys.reshape(-1, 32)
  ref = keys.T @ keys / len(keys)
  assert memedit.key_count(state) == len(keys)
  C = np.asarray(memedit.second_moment(state), np.float64)
  assert np.linalg.norm(C - ref) <= 1e-6 * np.linalg.norm(ref)
  info = gens.layer_info(gen, LAYER)
  assert (info.key_res, info.value_res, info.scale, info.key_dim, info.value_dim) == (
      8, 16, 2, 32, 32)
  assert info.weight_path == ("up2", "kernel") and info.kind == "conv"
  np.testing.assert_array_equal(gens.own_taps(gen, LAYER)[1:3, 1:3], np.ones((2, 2), bool))
  assert gens.own_taps(gen, LAYER).sum() == 4


def _edit(gen, C, taps="own", steps=400):
  context = [(n, box(4, 10, 4, 12)) for n in (1, 2)]
  keys, weights = gens.context_keys(gen, LAYER, context)
  assert keys.shape == (2 * 64, 32) and weights.shape == (2 * 64,)
  np.testing.assert_array_equal(weights.reshape(2, 8, 8)[0], gens.mask_at(box(4, 10, 4, 12), 8))
  assert weights.max() == 1.0
  D = gens.directions(C, keys, weights, rank=1, method="zca")
  copied = gens.copy_values(gen, LAYER, 3, box(4, 10, 4, 12))
  target = gens.paste_target(gen, LAYER, copied, 1, box(4, 10, 4, 12))
  return gens.insert(gen, LAYER, D, target, steps=steps, taps=taps, learning_rate=0.05)


def test_insert_moves_the_paste_toward_the_target_and_reverts_bit_exactly(toy):
  gen, state = toy
  C = np.asarray(memedit.second_moment(state))
  res = _edit(gen, C)
  # A rank-1 edit of the own taps reaches what it can (a few per cent of a random toy's
  # paste loss; the real DCGAN's tests ask for more).
  assert res.loss_after < 0.96 * res.loss_before
  lam = np.asarray(res.edit.lam)
  assert lam.shape == (4, 4, 32, 1) and np.all(lam[0] == 0) and np.abs(lam[1:3, 1:3]).max() > 0
  new, hist = gens.edited(gen, res.edit)
  # The layer's output of image B: closer to the target inside the crop, and the change
  # outside the crop is small beside the change inside it.
  before = gens.run_layer(gen, LAYER, gen.latents([1])).values
  after = gens.run_layer(new, LAYER, gen.latents([1])).values
  y0, y1, x0, x1 = [2 * v for v in res.target.key_box]
  inside = np.zeros(before.shape[1:3], bool)
  inside[y0:y1, x0:x1] = True
  np.testing.assert_allclose(np.abs(after[0, y0:y1, x0:x1] - res.target.targets[0]).mean(),
                             res.loss_after, rtol=1e-4)
  change = np.abs(after - before)[0].mean(-1)
  assert change[inside].mean() > 3 * change[~inside].mean()
  # In pixels: the paste region changes more than the rest of the image.
  img0 = gens.generate_images(gen, gen.latents([1]))
  img1 = gens.generate_images(new, gen.latents([1]))
  dimg = np.abs(img1 - img0)[0].mean(-1)
  assert dimg[inside].mean() > 2.5 * dimg[~inside].mean() and dimg[inside].mean() > 1e-3
  # The caller's generator is untouched; revert restores bit-identical parameters and images.
  back, hist = gens.reverted(new, res.edit, hist)
  assert not hist.edits
  for path in leaf_paths(gen.params):
    assert np.array_equal(np.asarray(get_leaf(back.params, path)),
                          np.asarray(get_leaf(gen.params, path))), path
  nums = gen.latents([1, 7, 8])
  assert np.array_equal(gens.generate_images(back, nums), gens.generate_images(gen, nums))


def test_query_scores_heatmaps_and_ranking(toy):
  gen, state = toy
  res = _edit(gen, np.asarray(memedit.second_moment(state)), steps=20)
  nums = list(range(20, 36))
  scores = gens.layer_scores(gen, LAYER, res.D, nums)
  assert scores.shape == (16, 8, 8)
  keys = gens.run_layer(gen, LAYER, gen.latents(nums)).keys.astype(np.float64)
  np.testing.assert_allclose(scores, np.abs(keys @ np.asarray(res.D, np.float64)[0]), rtol=1e-5,
                             atol=1e-6)
  thr = gens.match_threshold(scores, 0.9)
  assert (scores > thr).mean() == pytest.approx(0.1, abs=0.01)
  hm = gens.heatmaps(scores, thr, 16)
  assert hm.shape == (16, 16, 16) and hm.max() == 1.0 and hm.min() >= 0
  np.testing.assert_array_equal(hm[:, ::2, ::2], np.clip(scores / thr, 0, 1))
  ranking = gens.rank_by_match(scores, nums)
  best = [s for _, s in ranking]
  assert best == sorted(best, reverse=True) and ranking[0][1] == pytest.approx(scores.max())
  assert sorted(n for n, _ in ranking) == nums


def test_erase_overfit_and_projected_insert_on_nnx(toy):
  gen, state = toy
  C = np.asarray(memedit.second_moment(state))
  keys, weights = gens.context_keys(gen, LAYER, [(1, box(4, 10, 4, 12))])
  units = gens.top_units(C, keys, weights, 4)
  target = gens.erase_target(gen, LAYER, 1, box(4, 10, 4, 12), units)
  # Unit zeroing as an edit equals running the layer on keys with those units zeroed.
  z_edit = gens.unit_zeroing_edit(gen, LAYER, units)
  zeroed, _ = gens.edited(gen, z_edit)
  f, crop_keys = gens.crop_problem(gen, LAYER, target)
  np.testing.assert_allclose(np.asarray(f(gens.layer_kernel(zeroed, LAYER), crop_keys)),
                             target.targets, atol=1e-5)
  D = gens.directions(C, keys, weights, rank=2)
  res = gens.projected_insert(gen, LAYER, D, target, steps=21, project_every=5)
  assert res.loss_after < res.loss_before and res.edit.rank == 2
  ovf = gens.overfit(gen, LAYER, target, steps=50)
  assert ovf.loss_after < ovf.loss_before and ovf.edit.rank == 32
  paste = gens.paste_target(gen, LAYER, gens.copy_values(gen, LAYER, 3, box(4, 10, 4, 12)), 1,
                            box(4, 10, 4, 12))
  params, losses = gens.overfit_all(gen, LAYER, paste, steps=20, learning_rate=3e-4)
  assert losses[-1] < 0.7 * losses[0]
  assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(gen.params)
