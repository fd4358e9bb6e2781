"""The copy–paste–context workflow on a converted StyleGAN2 checkpoint and on the real
DCGAN face weights."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import linen as nn

import memedit
import peers
from memedit import metrics, rewrite as rw, specs
from ports.dcgan import convert_dcgan
from ports.stylegan2 import convert_rosinality


def _box(y0, y1, x0, x1, canvas):
  m = np.zeros((canvas, canvas), np.float32)
  m[y0:y1, x0:x1] = 1.0
  return m


# ----------------------------------------------------------------------------------------
# StyleGAN2 (a randomly initialised rosinality checkpoint, 32 px).


@pytest.fixture(scope="module")
def sg2(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("sg2")
  model = peers.rosinality_model()
  torch.manual_seed(0)
  g = model.Generator(32, 64, 2, channel_multiplier=1).eval()
  with torch.no_grad():
    for name, p in g.named_parameters():
      if name.endswith("modulation.bias"):
        p.copy_(1.0 + 0.2 * torch.randn_like(p))
    latent_avg = g.mean_latent(64)[0]
  path = os.path.join(tmp, "g.pt")
  torch.save({"g_ema": g.state_dict(), "latent_avg": latent_avg}, path)
  gen = rw.generator_from_converted(convert_rosinality(path, tmp / "converted"))
  layer = "conv_2"
  state = rw.collect_statistics(gen, layer, 16, batch_size=8, progress=False)
  return gen, layer, np.asarray(memedit.second_moment(state))


def test_stylegan2_geometry_and_exact_crop(sg2):
  gen, layer, C = sg2
  assert gen.resolution == 32 and sorted(gen.layers)[:3] == ["conv_0", "conv_1", "conv_2"]
  info = rw.layer_info(gen, layer)
  assert (info.key_res, info.value_res, info.key_dim) == (8, 8, 512)
  assert C.shape == (512, 512)
  copied = rw.copy_values(gen, layer, 1, _box(8, 16, 8, 24, 32))
  target = rw.paste_target(gen, layer, copied, 2, _box(12, 20, 4, 20, 32))
  f, keys = rw.crop_problem(gen, info, target)
  kernel0 = jnp.asarray(memedit.get_leaf(gen.variables, info.weight_path))
  # The layer run on the crop (with its margin) reproduces the whole layer's values there.
  np.testing.assert_allclose(np.asarray(f(kernel0, keys)), target.original, atol=2e-5,
                             rtol=1e-5)
  assert target.targets.shape == target.original.shape


def test_stylegan2_insert_lowers_the_loss_and_keeps_unrelated_keys(sg2):
  gen, layer, C = sg2
  keys, weights = rw.context_keys(gen, layer, [(3, _box(8, 16, 8, 24, 32)),
                                               (4, _box(8, 16, 8, 24, 32))])
  D = rw.directions(C, keys, weights, rank=1, method="zca")
  copied = rw.copy_values(gen, layer, 1, _box(8, 16, 8, 16, 32))
  target = rw.paste_target(gen, layer, copied, 2, _box(12, 20, 4, 12, 32))
  assert target.targets.shape == (1, 2, 2, 512)
  res = rw.insert(gen, layer, D, target, optimizer="gauss_newton", steps=6)
  assert res.loss_after < 0.95 * res.loss_before
  assert np.all(np.diff(res.losses) <= 0)  # Gauss–Newton keeps only improving steps
  # Demodulation bounds what a rank-1 edit can write, so check the solve itself on a
  # target it can reach: the values of the same crop under a known rank-1 edit Λ*.
  info = rw.layer_info(gen, layer)
  f, crop_keys = rw.crop_problem(gen, info, target)
  k0 = jnp.asarray(memedit.get_leaf(gen.variables, info.weight_path))
  lam_star = 0.3 * jax.random.normal(jax.random.PRNGKey(0), (3, 3, 512, 1))
  reachable = target._replace(targets=np.asarray(
      f(k0 + memedit.kernel_delta(lam_star, D, k0.shape, "conv"), crop_keys)))
  res2 = rw.insert(gen, layer, D, reachable, optimizer="gauss_newton", steps=6, loss="l2")
  assert res2.loss_after < 0.05 * res2.loss_before
  assert res.edit.path == ("params", "synthesis", "conv_2", "memory", "kernel")
  # The modulated 'same' 3×3 convolution's own tap is its centre.
  np.testing.assert_array_equal(rw.own_taps(gen, layer), np.eye(3, dtype=bool)[1][:, None]
                                & np.eye(3, dtype=bool)[1][None, :])

  # Keys C⁻¹-orthogonal to D: the convolution term is unchanged exactly; the output moves
  # only by the demodulation recomputed from the edited kernel, d(W1, s) / d(W0, s).
  run = rw.run_layer(gen, layer, gen.latents([5]))
  x_mod, (style,) = run.keys.astype(np.float64), run.extra
  q = np.linalg.qr(np.asarray(D, np.float64).T)[0]
  x_orth = (x_mod - (x_mod @ q) @ q.T).astype(np.float32)
  k1 = k0 + memedit.edit_delta(res.edit, k0.shape)
  apply = lambda k, x, s: np.asarray(info.definition.apply({"params": {"kernel": k}}, x, s),
                                     np.float64)

  def demod(k, s):
    w2 = (np.asarray(k, np.float64) ** 2).sum((0, 1)) / (9 * info.key_dim)
    return 1.0 / np.sqrt((np.asarray(s, np.float64) ** 2) @ w2 + 1e-8)[:, None, None, :]

  y0, y1 = apply(k0, x_orth, style), apply(k1, x_orth, style)
  assert np.abs(demod(k1, style) / demod(k0, style) - 1).max() > 1e-4
  np.testing.assert_allclose(y1 / demod(k1, style), y0 / demod(k0, style),
                             atol=1e-5 * np.abs(y0 / demod(k0, style)).max())
  # Exact invariance: a unit-selection edit (D = e_u) on an input whose style vanishes on
  # unit u (so its keys x·s are zero there as well) leaves the output bit-for-bit equal up
  # to float rounding, demodulation included.
  Du = rw.directions(C, keys, weights, rank=1, method="unit")
  unit = int(np.argmax(Du[0]))
  res_u = rw.insert(gen, layer, Du, target, optimizer="gauss_newton", steps=6)
  assert res_u.loss_after < res_u.loss_before
  ku = k0 + memedit.edit_delta(res_u.edit, k0.shape)
  s0 = np.array(style)
  s0[:, unit] = 0.0
  xs = np.array(run.keys)
  xs[..., unit] = 0.0
  np.testing.assert_allclose(apply(ku, xs, s0), apply(k0, xs, s0), rtol=0, atol=1e-6)
  # ... while the original style (non-zero on u) is changed by the same edit.
  assert np.abs(apply(ku, run.keys, style) - apply(k0, run.keys, style)).max() > 1e-3


# ----------------------------------------------------------------------------------------
# DCGAN with the real face weights.


@pytest.fixture(scope="module")
def dcgan(tmp_path_factory):
  _, weights = peers.gan_face_generate()
  gen = rw.generator_from_converted(convert_dcgan(weights, tmp_path_factory.mktemp("dc") / "m"))
  state = rw.collect_statistics(gen, "convt2", 200, batch_size=100, progress=False)
  return gen, np.asarray(memedit.second_moment(state))


def _spec(layer="convt2", **kw):
  eyes = _box(24, 36, 8, 56, 64)
  return specs.make_spec(key=[(n, eyes) for n in (9, 13, 15)], object=(29, _box(20, 40, 8, 56, 64)),
                         paste=(9, _box(22, 42, 8, 56, 64)), layer=layer, canvas=64,
                         solver={"steps": 300}, **kw)


def test_dcgan_latents_are_the_reference_sample(dcgan):
  gen, _ = dcgan
  ref = np.random.RandomState(1).randn(12, 100).astype(np.float32)
  np.testing.assert_array_equal(gen.latents(12), ref)
  np.testing.assert_array_equal(gen.latents([11, 3]), ref[[11, 3]])
  with pytest.raises(ValueError, match="layer: expected one of"):
    gen.layer_path("convt9")


def test_dcgan_spec_edit_apply_revert_query_and_metrics(dcgan):
  gen, C = dcgan
  out = rw.edit_from_spec(gen, _spec(), C)
  res = out.result
  assert res.loss_after < 0.85 * res.loss_before
  assert res.losses[-1] < res.losses[0]
  edited, hist = rw.edited(gen, res.edit)
  z = gen.latents([9, 100, 101])
  a, b = rw.generate(gen, z), rw.generate(edited, z)
  assert np.abs(b - a).mean() > 1e-3
  # The paste image's layer output moved towards the target at the paste.
  run1 = rw.run_layer(edited, "convt2", gen.latents([9]))
  y0, y1, x0, x1 = [2 * v for v in res.target.key_box]
  after = np.abs(run1.values[:, y0:y1, x0:x1] - res.target.targets).mean()
  np.testing.assert_allclose(after, res.loss_after, rtol=1e-4)
  # Revert is bit-exact.
  back, _ = rw.reverted(edited, res.edit, hist)
  k_orig = memedit.get_leaf(gen.variables, gen.weight_path("convt2"))
  assert np.array_equal(np.asarray(memedit.get_leaf(back.variables, gen.weight_path("convt2"))),
                        np.asarray(k_orig))
  # Query: heat maps and ranking by best match.
  nums = list(range(100, 116))
  scores = rw.layer_scores(gen, "convt2", res.directions, nums)
  assert scores.shape == (16, 8, 8)
  thr = rw.match_threshold(scores, 0.9)
  hm = rw.heatmaps(scores, thr, 64)
  assert hm.shape == (16, 64, 64) and hm.max() == 1.0 and hm.min() >= 0
  ranking = rw.rank_by_match(scores, nums)
  best = [s for _, s in ranking]
  assert best == sorted(best, reverse=True) and ranking[0][1] == pytest.approx(scores.max())
  # Metrics on held-out latents; the overfit baseline on the same paste.
  m = metrics.evaluate_edit(gen, "convt2", res.directions, edited.variables, nums,
                            target_value=out.copied.mean_value, quantile=0.95)
  assert 0 < m["context_match"]["pixels"] <= 0.06
  sp = m["specificity"]
  assert sp["inside_mean_abs_change"] > sp["outside_mean_abs_change"] > 0
  ovf = rw.overfit(gen, "convt2", res.target, steps=200)
  assert ovf.loss_after < ovf.loss_before
  over, _ = rw.edited(gen, ovf.edit)
  m_o = metrics.evaluate_edit(gen, "convt2", res.directions, over.variables, nums,
                              target_value=out.copied.mean_value, threshold=m["threshold"])
  assert m_o["threshold"] == m["threshold"]
  assert m["efficacy"]["cosine_gain"] > 0
  # Several quantiles from one run of each generator, reusing the original's run.
  original = rw.run_layer(gen, "convt2", gen.latents(nums))
  ms = metrics.evaluate_at_quantiles(gen, "convt2", res.directions, edited.variables, nums,
                                     [0.95, 0.99], target_value=out.copied.mean_value,
                                     original=original)
  assert ms[0] == m
  assert ms[1] == metrics.evaluate_edit(gen, "convt2", res.directions, edited.variables, nums,
                                        target_value=out.copied.mean_value, quantile=0.99)
  assert ms[1]["context_match"]["pixels"] < ms[0]["context_match"]["pixels"]
  with pytest.raises(ValueError, match=r"original: expected the layer run of 8 latents"):
    metrics.evaluate_edit(gen, "convt2", res.directions, edited.variables, nums[:8],
                          original=original)
  with pytest.raises(ValueError, match=r"quantile: expected a number in \(0, 1\), got 1.5"):
    metrics.evaluate_at_quantiles(gen, "convt2", res.directions, edited.variables, nums, [1.5])
  # The overfit baseline on all weights: image B reproduces the rendered paste better.
  variables, losses = rw.overfit_all(gen, "convt2", res.target, steps=15, learning_rate=1e-3)
  assert losses[-1] < losses[0]
  assert set(variables) == set(gen.variables)
  assert np.array_equal(np.asarray(variables["batch_stats"]["bn0"]["mean"]),
                        np.asarray(gen.variables["batch_stats"]["bn0"]["mean"]))


def test_dcgan_statistics_with_a_ragged_last_batch_match_float64(dcgan):
  # 13 images in batches of 5: the last batch holds 3 and is folded exactly.
  gen, _ = dcgan
  state = rw.collect_statistics(gen, "convt2", 13, batch_size=5, progress=False)
  keys = rw.run_layer(gen, "convt2", gen.latents(13)).keys.astype(np.float64)
  keys = keys.reshape(-1, keys.shape[-1])
  assert memedit.key_count(state) == len(keys) == 13 * 8 * 8
  ref = keys.T @ keys / len(keys)
  C = np.asarray(memedit.second_moment(state), np.float64)
  assert np.linalg.norm(C - ref) <= 1e-6 * np.linalg.norm(ref)
  with pytest.raises(ValueError, match="batch_size: expected a positive int, got 0"):
    rw.collect_statistics(gen, "convt2", 13, batch_size=0, progress=False)


def test_dcgan_keys_orthogonal_to_d_keep_the_layer_output(dcgan):
  gen, C = dcgan
  res = rw.edit_from_spec(gen, _spec(), C).result
  info = rw.layer_info(gen, "convt2")
  run = rw.run_layer(gen, "convt2", gen.latents([200]))
  q = np.linalg.qr(np.asarray(res.directions, np.float64).T)[0]
  k = run.keys.astype(np.float64)
  k_orth = (k - (k @ q) @ q.T).astype(np.float32)
  k0 = jnp.asarray(memedit.get_leaf(gen.variables, info.weight_path))
  k1 = k0 + memedit.edit_delta(res.edit, k0.shape)
  f = lambda kern, x: np.asarray(info.definition.apply({"params": {"kernel": kern}}, x))
  base = f(k0, k_orth)
  np.testing.assert_allclose(f(k1, k_orth), base, atol=2e-5 * np.abs(base).max())
  assert np.abs(f(k1, run.keys) - f(k0, run.keys)).max() > 1e-2


def test_dcgan_erase_unit_zeroing_and_methods(dcgan):
  gen, C = dcgan
  keys, weights = rw.context_keys(gen, "convt2", [(9, _box(24, 36, 8, 56, 64))])
  for method in ("svd", "mean"):
    D = rw.directions(C, keys, weights, method=method)
    assert D.shape == (1, 256) and np.isclose(np.linalg.norm(D), 1.0, atol=1e-5)
  units = rw.top_units(C, keys, weights, 30)
  scores = rw.unit_scores(C, keys, weights)
  assert len(set(units.tolist())) == 30 and scores[units].min() >= np.delete(scores, units).max()
  # Unit zeroing as an Edit equals running the layer on keys with those units zeroed.
  info = rw.layer_info(gen, "convt2")
  z_edit = rw.unit_zeroing_edit(gen, "convt2", units)
  run = rw.run_layer(gen, "convt2", gen.latents([7]))
  k0 = jnp.asarray(memedit.get_leaf(gen.variables, info.weight_path))
  f = lambda kern, x: np.asarray(info.definition.apply({"params": {"kernel": kern}}, x))
  zeroed = np.array(run.keys)
  zeroed[..., units] = 0
  np.testing.assert_allclose(f(k0 + memedit.edit_delta(z_edit, k0.shape), run.keys),
                             f(k0, zeroed), atol=1e-4)
  # Erase: the target inside the mask is the output with the units zeroed.
  spec = specs.make_spec(key=[(9, _box(24, 36, 8, 56, 64))], paste=(7, _box(24, 36, 8, 56, 64)),
                         layer="convt2", kind="erase", erase_units=30, canvas=64,
                         solver={"steps": 100})
  out = rw.edit_from_spec(gen, spec, C)
  assert out.copied is None and sorted(out.units) == sorted(units)
  assert out.result.loss_after < out.result.loss_before


def test_dcgan_own_taps_keep_a_key_s_change_in_its_own_cell(dcgan):
  gen, C = dcgan
  own = rw.own_taps(gen, "convt2")
  want = np.zeros((4, 4), bool)
  want[1:3, 1:3] = True
  np.testing.assert_array_equal(own, want)
  results = {taps: rw.edit_from_spec(gen, _spec(taps=taps), C).result for taps in ("all", "own")}
  lam = np.asarray(results["own"].edit.lam)  # (4, 4, C_out, r)
  assert np.all(lam[~own] == 0) and np.abs(lam[own]).max() > 0
  assert results["own"].loss_after < results["own"].loss_before
  assert results["own"].edit.settings["taps"] == "own"
  # One key alone on the key map (at (3, 4)): with the own taps the edit changes the
  # layer's output only inside that key's 2×2 cell; with all taps it spills outside it.
  info = rw.layer_info(gen, "convt2")
  k0 = jnp.asarray(memedit.get_leaf(gen.variables, info.weight_path))
  run = rw.run_layer(gen, "convt2", gen.latents([9]))
  x = np.zeros_like(run.keys)
  x[:, 3, 4] = run.keys[:, 3, 4]
  f = lambda kern: np.asarray(info.definition.apply({"params": {"kernel": kern}}, x))
  cell = np.zeros((16, 16), bool)
  cell[6:8, 8:10] = True
  for taps, spills in (("own", False), ("all", True)):
    change = np.abs(f(k0 + memedit.edit_delta(results[taps].edit, k0.shape)) - f(k0))
    assert change[0][cell].max() > 1e-3, taps
    assert (change[0][~cell].max() > 1e-3) == spills, taps


def test_dcgan_projected_insert_matches_a_loop_of_the_reference_s_procedure(dcgan):
  gen, C = dcgan
  eyes = _box(24, 36, 8, 56, 64)
  keys, weights = rw.context_keys(gen, "convt2", [(n, eyes) for n in (9, 13, 15)])
  D = rw.directions(C, keys, weights, rank=2, method="zca")
  np.testing.assert_allclose(D @ D.T, np.eye(2), atol=1e-5)
  copied = rw.copy_values(gen, "convt2", 29, _box(20, 40, 8, 56, 64))
  target = rw.paste_target(gen, "convt2", copied, 9, _box(22, 42, 8, 56, 64))
  # 23 steps with a projection every 5: after steps 0, 5, 10, 15, 20 and the last, 22.
  res = rw.projected_insert(gen, "convt2", D, target, steps=23, project_every=5)
  assert np.asarray(res.edit.lam).shape == (4, 4, 128, 2) and res.losses.shape == (23,)
  assert res.edit.settings["project_every"] == 5 and res.edit.settings["taps"] == "all"
  info = rw.layer_info(gen, "convt2")
  f, crop_keys = rw.crop_problem(gen, info, target)
  k0 = jnp.asarray(memedit.get_leaf(gen.variables, info.weight_path))
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
  res_m = rw.projected_insert(gen, "convt2", mixed, target, steps=23, project_every=5)
  np.testing.assert_allclose(np.asarray(memedit.edit_delta(res_m.edit, k0.shape)), delta,
                             atol=1e-5 * scale)
  with pytest.raises(ValueError, match=r"directions: expected 2 linearly independent rows, "
                                       r"got rank 1"):
    rw.projected_insert(gen, "convt2", np.concatenate([D[:1], 2 * D[:1]]), target)
  with pytest.raises(ValueError, match=r"directions: expected shape \(r, 256\), got \(1, 3\)"):
    rw.projected_insert(gen, "convt2", np.ones((1, 3)), target)
  with pytest.raises(ValueError, match=r"project_every: expected a positive int, got 0"):
    rw.projected_insert(gen, "convt2", D, target, project_every=0)
  with pytest.raises(ValueError, match=r"loss: expected one of \('l1', 'l2'\), got 'huber'"):
    rw.projected_insert(gen, "convt2", D, target, loss="huber")
  with pytest.raises(ValueError, match=r"Λ: expected finite values from the projected Adam "
                                       r"run \(learning_rate inf, 2 steps\)"):
    rw.projected_insert(gen, "convt2", D, target, steps=2, learning_rate=float("inf"))


@pytest.mark.parametrize("module,scale", [
    (nn.Conv(2, (3, 3), padding="SAME", use_bias=False), 1),
    (nn.Conv(2, (1, 1), use_bias=False), 1),
    (nn.Conv(2, (5, 5), padding="SAME", use_bias=False), 1),
    (nn.ConvTranspose(2, (4, 4), strides=(2, 2), padding="SAME", use_bias=False), 2),
    (nn.ConvTranspose(2, (3, 3), strides=(3, 3), padding="SAME", use_bias=False), 3),
])
def test_own_taps_are_the_taps_that_write_inside_the_key_s_cell(module, scale):
  # Checked through the layer itself: an impulse key with a kernel holding one tap lands
  # inside the key's own cell exactly for the taps own_taps returns.
  kh, kw = module.kernel_size
  own = rw._own_taps(module, (kh, kw), scale, False, "probe")
  n = 2 * max(kh, kw) + 1
  c = n // 2
  x = np.zeros((1, n, n, 1), np.float32)
  x[0, c, c, 0] = 1.0
  for ty in range(kh):
    for tx in range(kw):
      kernel = np.zeros((kh, kw, 1, 2), np.float32)
      kernel[ty, tx] = 1.0
      y = np.abs(np.asarray(module.apply({"params": {"kernel": kernel}}, x))[0, ..., 0]) > 0
      ys, xs = np.nonzero(y)
      inside = bool(len(ys)) and all(c * scale <= v < (c + 1) * scale for v in (*ys, *xs))
      assert inside == own[ty, tx], (ty, tx)
  assert own.sum() == scale * scale


def test_own_taps_refuse_layers_without_a_tap_geometry():
  with pytest.raises(ValueError, match=r"taps 'own' for layer 'd': expected a Conv, "
                                       r"ConvTranspose or modulated 'same' convolution, got Dense"):
    rw._own_taps(nn.Dense(3), (1, 1), 1, False, "d")
  with pytest.raises(ValueError, match=r"taps 'own' for layer 's': expected a 14×14 output "
                                       r"for a 7×7 input \(scale 2\), got 4×4"):
    rw._own_taps(nn.Conv(2, (3, 3), strides=(2, 2), padding="SAME"), (3, 3), 2, False, "s")


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
  D = rw.directions(C, keys, weights, method=method, shrinkage=alpha)
  np.testing.assert_allclose(D[0], ref, atol=2e-5)
  # The directions do not depend on C's scale; without shrinkage they are C⁻¹'s.
  np.testing.assert_allclose(rw.directions(10 * C, keys, weights, method=method,
                                           shrinkage=alpha), D, atol=2e-5)
  plain = rw.directions(C, keys, weights, method=method)
  assert np.abs(plain - D).max() > 1e-2
  for bad in (-0.1, 1.0, True):
    with pytest.raises(ValueError, match="shrinkage: expected a number in"):
      rw.directions(C, keys, weights, method=method, shrinkage=bad)
