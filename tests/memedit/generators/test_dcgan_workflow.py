"""The copy–paste–context workflow on the real DCGAN face weights (a Linen generator)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import memedit
import peers
from memedit import generators as gens, metrics, specs
from ports.dcgan import convert_dcgan


def _box(y0, y1, x0, x1, canvas):
  m = np.zeros((canvas, canvas), np.float32)
  m[y0:y1, x0:x1] = 1.0
  return m


# ----------------------------------------------------------------------------------------
# DCGAN with the real face weights.


@pytest.fixture(scope="module")
def dcgan(tmp_path_factory):
  _, weights = peers.gan_face_generate()
  gen = gens.generator_from_converted(convert_dcgan(weights, tmp_path_factory.mktemp("dc") / "m"))
  state = gens.collect_statistics(gen, "convt2", 200, batch_size=100, progress=False)
  return gen, np.asarray(memedit.second_moment(state))


def _spec(layer="convt2", **kw):
  eyes = _box(24, 36, 8, 56, 64)
  return specs.make_spec(key=[(n, eyes) for n in (9, 13, 15)], object=(29, _box(20, 40, 8, 56, 64)),
                         paste=(9, _box(22, 42, 8, 56, 64)), layer=layer, canvas=64,
                         solver={"steps": 60}, **kw)  # 0.756 of the loss; 0.755 at 300


def test_dcgan_latents_are_the_reference_sample(dcgan):
  gen, _ = dcgan
  ref = np.random.RandomState(1).randn(12, 100).astype(np.float32)
  np.testing.assert_array_equal(gen.latents(12), ref)
  np.testing.assert_array_equal(gen.latents([11, 3]), ref[[11, 3]])
  with pytest.raises(ValueError, match="layer: expected one of"):
    gen.layer_address("convt9")


def test_dcgan_spec_edit_apply_revert_query_and_metrics(dcgan):
  gen, C = dcgan
  out = gens.edit_from_spec(gen, _spec(), C)
  res = out.result
  assert res.loss_after < 0.85 * res.loss_before
  assert res.losses[-1] < res.losses[0]
  edited, hist = gens.edited(gen, res.edit)
  z = gen.latents([9, 100, 101])
  a, b = gens.generate_images(gen, z), gens.generate_images(edited, z)
  assert np.abs(b - a).mean() > 1e-3
  # The paste image's layer output moved towards the target at the paste.
  run1 = gens.run_layer(edited, "convt2", gen.latents([9]))
  y0, y1, x0, x1 = [2 * v for v in res.target.key_box]
  after = np.abs(run1.values[:, y0:y1, x0:x1] - res.target.targets).mean()
  np.testing.assert_allclose(after, res.loss_after, rtol=1e-4)
  # Revert is bit-exact.
  back, _ = gens.reverted(edited, res.edit, hist)
  assert np.array_equal(np.asarray(gens.layer_kernel(back, "convt2")),
                        np.asarray(gens.layer_kernel(gen, "convt2")))
  assert np.array_equal(gens.generate_images(back, z), a)
  # Query: heat maps and ranking by best match.
  nums = list(range(100, 116))
  scores = gens.layer_scores(gen, "convt2", res.D, nums)
  assert scores.shape == (16, 8, 8)
  thr = gens.match_threshold(scores, 0.9)
  hm = gens.heatmaps(scores, thr, 64)
  assert hm.shape == (16, 64, 64) and hm.max() == 1.0 and hm.min() >= 0
  ranking = gens.rank_by_match(scores, nums)
  best = [s for _, s in ranking]
  assert best == sorted(best, reverse=True) and ranking[0][1] == pytest.approx(scores.max())
  # Metrics on held-out latents; the overfit baseline on the same paste.
  m = metrics.evaluate_edit(gen, "convt2", res.D, edited.params, nums,
                            target_value=out.copied.mean_value, quantile=0.95)
  assert 0 < m["context_match"]["pixels"] <= 0.06
  sp = m["specificity"]
  assert sp["inside_mean_abs_change"] > sp["outside_mean_abs_change"] > 0
  ovf = gens.overfit(gen, "convt2", res.target, steps=50)  # as low after 50 steps as 200
  assert ovf.loss_after < ovf.loss_before
  over, _ = gens.edited(gen, ovf.edit)
  m_o = metrics.evaluate_edit(gen, "convt2", res.D, over.params, nums,
                              target_value=out.copied.mean_value, threshold=m["threshold"])
  assert m_o["threshold"] == m["threshold"]
  assert m["efficacy"]["cosine_gain"] > 0
  # Several quantiles from one run of each generator, reusing the original's run.
  original = gens.run_layer(gen, "convt2", gen.latents(nums))
  ms = metrics.evaluate_at_quantiles(gen, "convt2", res.D, edited.params, nums,
                                     [0.95, 0.99], target_value=out.copied.mean_value,
                                     original=original)
  assert ms[0] == m
  assert ms[1] == metrics.evaluate_edit(gen, "convt2", res.D, edited.params, nums,
                                        target_value=out.copied.mean_value, quantile=0.99)
  assert ms[1]["context_match"]["pixels"] < ms[0]["context_match"]["pixels"]
  with pytest.raises(ValueError, match=r"original: expected the layer run of 8 latents"):
    metrics.evaluate_edit(gen, "convt2", res.D, edited.params, nums[:8],
                          original=original)
  with pytest.raises(ValueError, match=r"quantile: expected a number in \(0, 1\), got 1.5"):
    metrics.evaluate_at_quantiles(gen, "convt2", res.D, edited.params, nums, [1.5])
  # The overfit baseline on all weights: image B reproduces the rendered paste better.
  params, losses = gens.overfit_all(gen, "convt2", res.target, steps=15, learning_rate=1e-3)
  assert losses[-1] < losses[0]
  assert set(params) == set(gen.params)
  assert np.array_equal(np.asarray(params["batch_stats"]["bn0"]["mean"]),
                        np.asarray(gen.params["batch_stats"]["bn0"]["mean"]))


def test_dcgan_statistics_with_a_ragged_last_batch_match_float64(dcgan):
  # 13 images in batches of 5: the last batch holds 3 and is folded exactly.
  gen, _ = dcgan
  state = gens.collect_statistics(gen, "convt2", 13, batch_size=5, progress=False)
  keys = gens.run_layer(gen, "convt2", gen.latents(13)).keys.astype(np.float64)
  keys = keys.reshape(-1, keys.shape[-1])
  assert memedit.key_count(state) == len(keys) == 13 * 8 * 8
  ref = keys.T @ keys / len(keys)
  C = np.asarray(memedit.second_moment(state), np.float64)
  assert np.linalg.norm(C - ref) <= 1e-6 * np.linalg.norm(ref)
  with pytest.raises(ValueError, match="batch_size: expected a positive int, got 0"):
    gens.collect_statistics(gen, "convt2", 13, batch_size=0, progress=False)


def test_dcgan_keys_orthogonal_to_d_keep_the_layer_output(dcgan):
  gen, C = dcgan
  res = gens.edit_from_spec(gen, _spec(), C).result
  view = gens.layer_view(gen, "convt2")
  run = gens.run_layer(gen, "convt2", gen.latents([200]))
  q = np.linalg.qr(np.asarray(res.D, np.float64).T)[0]
  k = run.keys.astype(np.float64)
  k_orth = (k - (k @ q) @ q.T).astype(np.float32)
  k0 = jnp.asarray(gens.layer_kernel(gen, "convt2"))
  k1 = k0 + memedit.edit_delta(res.edit, k0.shape)
  f = lambda kern, x: np.asarray(view.apply(kern, x))
  base = f(k0, k_orth)
  np.testing.assert_allclose(f(k1, k_orth), base, atol=2e-5 * np.abs(base).max())
  assert np.abs(f(k1, run.keys) - f(k0, run.keys)).max() > 1e-2


def test_dcgan_erase_unit_zeroing_and_methods(dcgan):
  gen, C = dcgan
  keys, weights = gens.context_keys(gen, "convt2", [(9, _box(24, 36, 8, 56, 64))])
  for method in ("svd", "mean"):
    D = gens.directions(C, keys, weights, method=method)
    assert D.shape == (1, 256) and np.isclose(np.linalg.norm(D), 1.0, atol=1e-5)
  units = gens.top_units(C, keys, weights, 30)
  scores = gens.unit_scores(C, keys, weights)
  assert len(set(units.tolist())) == 30 and scores[units].min() >= np.delete(scores, units).max()
  # Unit zeroing as an Edit equals running the layer on keys with those units zeroed.
  view = gens.layer_view(gen, "convt2")
  z_edit = gens.unit_zeroing_edit(gen, "convt2", units)
  run = gens.run_layer(gen, "convt2", gen.latents([7]))
  k0 = jnp.asarray(gens.layer_kernel(gen, "convt2"))
  f = lambda kern, x: np.asarray(view.apply(kern, x))
  zeroed = np.array(run.keys)
  zeroed[..., units] = 0
  np.testing.assert_allclose(f(k0 + memedit.edit_delta(z_edit, k0.shape), run.keys),
                             f(k0, zeroed), atol=1e-4)
  # Erase: the target inside the mask is the output with the units zeroed.
  spec = specs.make_spec(key=[(9, _box(24, 36, 8, 56, 64))], paste=(7, _box(24, 36, 8, 56, 64)),
                         layer="convt2", kind="erase", erase_units=30, canvas=64,
                         solver={"steps": 30})
  out = gens.edit_from_spec(gen, spec, C)
  assert out.copied is None and sorted(out.units) == sorted(units)
  assert out.result.loss_after < out.result.loss_before


def test_dcgan_own_taps_keep_a_key_s_change_in_its_own_cell(dcgan):
  gen, C = dcgan
  own = gens.own_taps(gen, "convt2")
  want = np.zeros((4, 4), bool)
  want[1:3, 1:3] = True
  np.testing.assert_array_equal(own, want)
  results = {taps: gens.edit_from_spec(gen, _spec(taps=taps), C).result for taps in ("all", "own")}
  lam = np.asarray(results["own"].edit.lam)  # (4, 4, C_out, r)
  assert np.all(lam[~own] == 0) and np.abs(lam[own]).max() > 0
  assert results["own"].loss_after < results["own"].loss_before
  assert results["own"].edit.settings["taps"] == "own"
  # One key alone on the key map (at (3, 4)): with the own taps the edit changes the
  # layer's output only inside that key's 2×2 cell; with all taps it spills outside it.
  view = gens.layer_view(gen, "convt2")
  k0 = jnp.asarray(gens.layer_kernel(gen, "convt2"))
  run = gens.run_layer(gen, "convt2", gen.latents([9]))
  x = np.zeros_like(run.keys)
  x[:, 3, 4] = run.keys[:, 3, 4]
  f = lambda kern: np.asarray(view.apply(kern, x))
  cell = np.zeros((16, 16), bool)
  cell[6:8, 8:10] = True
  for taps, spills in (("own", False), ("all", True)):
    change = np.abs(f(k0 + memedit.edit_delta(results[taps].edit, k0.shape)) - f(k0))
    assert change[0][cell].max() > 1e-3, taps
    assert (change[0][~cell].max() > 1e-3) == spills, taps


def test_dcgan_projected_insert_matches_a_loop_of_the_reference_s_procedure(dcgan):
  gen, C = dcgan
  eyes = _box(24, 36, 8, 56, 64)
  keys, weights = gens.context_keys(gen, "convt2", [(n, eyes) for n in (9, 13, 15)])
  D = gens.directions(C, keys, weights, rank=2, method="zca")
  np.testing.assert_allclose(D @ D.T, np.eye(2), atol=1e-5)
  copied = gens.copy_values(gen, "convt2", 29, _box(20, 40, 8, 56, 64))
  target = gens.paste_target(gen, "convt2", copied, 9, _box(22, 42, 8, 56, 64))
  # 23 steps with a projection every 5: after steps 0, 5, 10, 15, 20 and the last, 22.
  res = gens.projected_insert(gen, "convt2", D, target, steps=23, project_every=5)
  assert np.asarray(res.edit.lam).shape == (4, 4, 128, 2) and res.losses.shape == (23,)
  assert res.edit.settings["project_every"] == 5 and res.edit.settings["taps"] == "all"
  f, crop_keys = gens.crop_problem(gen, "convt2", target)
  k0 = jnp.asarray(gens.layer_kernel(gen, "convt2"))
  delta = np.asarray(memedit.edit_delta(res.edit, k0.shape))
  # The reference's loop, written as it is: Adam on the whole kernel, and after step t with
  # t % 5 == 0 or t the last, W ← (W0 − P W0) + P W with P = DᵀD per tap (D orthonormal).
  Dj = jnp.asarray(D)
  proj = lambda w: jnp.einsum("yxod,di->yxio", jnp.einsum("yxio,di->yxod", w, Dj), Dj)
  ortho = k0 - proj(k0)
  value_and_grad = jax.jit(jax.value_and_grad(
      lambda w: jnp.mean(jnp.abs(f(w, crop_keys) - jnp.asarray(target.targets)))))
  opt = optax.adam(0.05)
  w, state, losses = k0, opt.init(k0), []
  for it in range(23):
    val, g = value_and_grad(w)
    losses.append(float(val))
    upd, state = opt.update(g, state, w)
    w = optax.apply_updates(w, upd)
    if it % 5 == 0 or it == 22:
      w = ortho + proj(w)
  ref = np.asarray(w - k0)
  scale = np.abs(ref).max()
  assert scale > 0.1  # the run moved the kernel
  np.testing.assert_allclose(delta, ref, atol=2e-6 * scale)
  np.testing.assert_allclose(res.losses, losses, atol=2e-6)
  # The change lies in span(D) per tap (residual at float32 noise), and the loss fell.
  q = np.linalg.qr(np.asarray(D, np.float64).T)[0]
  resid = delta - np.einsum("yxjo,ij->yxio", np.einsum("yxio,ij->yxjo", delta, q), q)
  assert np.abs(resid).max() < 1e-6 * scale
  assert res.loss_after < 0.9 * res.loss_before
  np.testing.assert_allclose(res.loss_after, float(jnp.mean(jnp.abs(
      f(k0 + delta, crop_keys) - target.targets))), rtol=1e-6)
  # Non-orthonormal directions of the same span project the same way (P = Dᵀ(DDᵀ)⁻¹D).
  mixed = np.array([[2.0, 0.5], [1.0, -1.0]], np.float32) @ D
  res_m = gens.projected_insert(gen, "convt2", mixed, target, steps=23, project_every=5)
  np.testing.assert_allclose(np.asarray(memedit.edit_delta(res_m.edit, k0.shape)), delta,
                             atol=1e-5 * scale)
  with pytest.raises(ValueError, match=r"directions: expected 2 linearly independent rows, "
                                       r"got rank 1"):
    gens.projected_insert(gen, "convt2", np.concatenate([D[:1], 2 * D[:1]]), target)
  with pytest.raises(ValueError, match=r"directions: expected shape \(r, 256\), got \(1, 3\)"):
    gens.projected_insert(gen, "convt2", np.ones((1, 3)), target)
  with pytest.raises(ValueError, match=r"project_every: expected a positive int, got 0"):
    gens.projected_insert(gen, "convt2", D, target, project_every=0)
  with pytest.raises(ValueError, match=r"loss: expected one of \('l1', 'l2'\), got 'huber'"):
    gens.projected_insert(gen, "convt2", D, target, loss="huber")
  # A learning rate that could only give a non-finite Λ is refused before the run (a
  # non-finite Λ from a finite one still raises after it).
  with pytest.raises(ValueError, match=r"learning_rate: expected a finite positive number, "
                                       r"got inf"):
    gens.projected_insert(gen, "convt2", D, target, steps=2, learning_rate=float("inf"))
