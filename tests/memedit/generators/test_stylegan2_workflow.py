"""The copy–paste–context workflow on a converted StyleGAN2 checkpoint: its modulated
convolutions are edited through their own layer kind (no special case in the workflow)."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import memedit
import peers
from memedit import generators as gens
from ports.stylegan2 import convert_rosinality


def _box(y0, y1, x0, x1, canvas):
  m = np.zeros((canvas, canvas), np.float32)
  m[y0:y1, x0:x1] = 1.0
  return m


# ----------------------------------------------------------------------------------------
# StyleGAN2 (a randomly initialised rosinality checkpoint, 32 px, 64 channels).
#
# rosinality's Generator fixes 512 channels up to 32 px. Nothing checked here depends on
# the width (the crop geometry, the solves through the layer's own demodulation and the
# invariances do not), while every solve's cost grows with its square (the edit ΔK and
# the demodulation it changes are 3×3×C×C): the checkpoint keeps the first WIDTH channels
# of each layer, a rosinality state dict of a narrower generator of the same structure
# (the converter reads the widths from the shapes), randomly initialised as rosinality's.

WIDTH = 64


@pytest.fixture(scope="module")
def sg2_folder(tmp_path_factory):
  """The converted folder of the narrowed checkpoint."""
  tmp = tmp_path_factory.mktemp("sg2")
  model = peers.rosinality_model()
  torch.manual_seed(0)
  g = model.Generator(32, 64, 2, channel_multiplier=1).eval()
  with torch.no_grad():
    for name, p in g.named_parameters():
      if name.endswith("modulation.bias"):
        p.copy_(1.0 + 0.2 * torch.randn_like(p))
    latent_avg = g.mean_latent(64)[0]
  sd = {}
  for name, v in g.state_dict().items():
    for dim, n in enumerate(v.shape):
      if n == 512:  # every channel axis (style_dim is 64, the RGB and kernel axes smaller)
        v = v.narrow(dim, 0, WIDTH)
    sd[name] = v.clone()
  path = os.path.join(tmp, "g.pt")
  torch.save({"g_ema": sd, "latent_avg": latent_avg}, path)
  return convert_rosinality(path, tmp / "converted")


@pytest.fixture(scope="module")
def sg2(sg2_folder):
  gen = gens.generator_from_converted(sg2_folder)
  layer = "conv_2"
  state = gens.collect_statistics(gen, layer, 16, batch_size=8, progress=False)
  return gen, layer, np.asarray(memedit.second_moment(state))


def test_stylegan2_geometry_and_exact_crop(sg2):
  gen, layer, C = sg2
  assert gen.resolution == 32 and sorted(gen.layers)[:3] == ["conv_0", "conv_1", "conv_2"]
  info = gens.layer_info(gen, layer)
  assert (info.key_res, info.value_res, info.key_dim) == (8, 8, WIDTH)
  assert C.shape == (WIDTH, WIDTH)
  copied = gens.copy_values(gen, layer, 1, _box(8, 16, 8, 24, 32))
  target = gens.paste_target(gen, layer, copied, 2, _box(12, 20, 4, 20, 32))
  f, keys = gens.crop_problem(gen, layer, target)
  kernel0 = jnp.asarray(gens.layer_kernel(gen, layer))
  # The layer run on the crop (with its margin) reproduces the whole layer's values there.
  np.testing.assert_allclose(np.asarray(f(kernel0, keys)), target.original, atol=2e-5,
                             rtol=1e-5)
  assert target.targets.shape == target.original.shape


def test_stylegan2_insert_lowers_the_loss_and_keeps_unrelated_keys(sg2):
  gen, layer, C = sg2
  keys, weights = gens.context_keys(gen, layer, [(3, _box(8, 16, 8, 24, 32)),
                                               (4, _box(8, 16, 8, 24, 32))])
  D = gens.directions(C, keys, weights, rank=1, method="zca")
  copied = gens.copy_values(gen, layer, 1, _box(8, 16, 8, 16, 32))
  target = gens.paste_target(gen, layer, copied, 2, _box(12, 20, 4, 12, 32))
  # The 8×8 canvas box covers 2×2 cells at 8 px; the bilinear resize (the reference's)
  # reaches one cell further on each side.
  assert target.targets.shape == (1, 4, 4, WIDTH)
  res = gens.insert(gen, layer, D, target, optimizer="gauss_newton", steps=6)
  assert res.loss_after < 0.95 * res.loss_before
  assert np.all(np.diff(res.losses) <= 0)  # Gauss–Newton keeps only improving steps
  # Demodulation bounds what a rank-1 edit can write, so check the solve itself on a
  # target it can reach: the values of the same crop under a known rank-1 edit Λ*.
  info = gens.layer_info(gen, layer)
  f, crop_keys = gens.crop_problem(gen, layer, target)
  k0 = jnp.asarray(gens.layer_kernel(gen, layer))
  lam_star = 0.3 * jax.random.normal(jax.random.PRNGKey(0), (3, 3, WIDTH, 1))
  reachable = target._replace(targets=np.asarray(
      f(k0 + memedit.kernel_delta(lam_star, D, k0.shape, "conv"), crop_keys)))
  res2 = gens.insert(gen, layer, D, reachable, optimizer="gauss_newton", steps=6, loss="l2")
  assert res2.loss_after < 0.05 * res2.loss_before
  assert res.edit.path == ("params", "synthesis", "conv_2", "memory", "kernel")
  # The modulated 'same' 3×3 convolution's own tap is its centre.
  centre = np.eye(3, dtype=bool)[1][:, None] & np.eye(3, dtype=bool)[1][None, :]
  np.testing.assert_array_equal(gens.own_taps(gen, layer), centre)
  # The up-sampling modulated convolution blurs, so no tap stays inside its key's 2×2 cell;
  # its own tap is the centre, the one that writes most (9/16) of its output there.
  np.testing.assert_array_equal(gens.own_taps(gen, "conv_1"), centre)

  # Keys C⁻¹-orthogonal to D: the convolution term is unchanged exactly; the output moves
  # only by the demodulation recomputed from the edited kernel, d(W1, s) / d(W0, s).
  run = gens.run_layer(gen, layer, gen.latents([5]))
  x_mod, (style,) = run.keys.astype(np.float64), run.extra
  q = np.linalg.qr(np.asarray(D, np.float64).T)[0]
  x_orth = (x_mod - (x_mod @ q) @ q.T).astype(np.float32)
  k1 = k0 + memedit.edit_delta(res.edit, k0.shape)
  view = gens.layer_view(gen, layer)
  apply = lambda k, x, s: np.asarray(view.apply(k, x, s), np.float64)

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
  Du = gens.directions(C, keys, weights, rank=1, method="unit")
  unit = int(np.argmax(Du[0]))
  res_u = gens.insert(gen, layer, Du, target, optimizer="gauss_newton", steps=6)
  assert res_u.loss_after < res_u.loss_before
  ku = k0 + memedit.edit_delta(res_u.edit, k0.shape)
  s0 = np.array(style)
  s0[:, unit] = 0.0
  xs = np.array(run.keys)
  xs[..., unit] = 0.0
  np.testing.assert_allclose(apply(ku, xs, s0), apply(k0, xs, s0), rtol=0, atol=1e-6)
  # ... while the original style (non-zero on u) is changed by the same edit.
  assert np.abs(apply(ku, run.keys, style) - apply(k0, run.keys, style)).max() > 1e-3


def test_stylegan2_insert_keeps_a_crop_through_the_demodulation_with_preserve(sg2):
  # Projecting D off a crop's keys leaves its convolution term alone, not its
  # demodulation; keeping the crop in the solve (preserve) holds its outputs through
  # the layer's own f. (With the L2 loss: under L1 a kept crop, whose residuals start at
  # exactly zero, is an exact penalty that a small edit's gain rarely outweighs.)
  gen, layer, C = sg2
  keys, weights = gens.context_keys(gen, layer, [(3, _box(8, 16, 8, 24, 32)),
                                               (4, _box(8, 16, 8, 24, 32))])
  D = gens.directions(C, keys, weights, rank=1, method="zca")
  target = gens.paste_target(gen, layer, gens.copy_values(gen, layer, 1, _box(8, 16, 8, 16, 32)),
                             2, _box(12, 20, 4, 12, 32))
  kept = gens.paste_target(gen, layer, gens.copy_values(gen, layer, 6, _box(16, 24, 16, 24, 32)),
                           7, _box(16, 24, 16, 24, 32))
  f1, k1 = gens.crop_problem(gen, layer, kept)
  k0 = jnp.asarray(gens.layer_kernel(gen, layer))
  kw = dict(optimizer="gauss_newton", steps=6, taps="own", loss="l2")
  plain = gens.insert(gen, layer, D, target, **kw)
  keep = gens.insert(gen, layer, D, target, preserve=[kept], preserve_weight=1.0, **kw)

  def moved(edit):
    out = f1(k0 + memedit.edit_delta(edit, k0.shape), k1)
    return float(jnp.abs(out - f1(k0, k1)).mean())

  assert moved(keep.edit) < 0.5 * moved(plain.edit)
  assert keep.loss_after < keep.loss_before


def test_an_edit_records_the_truncation_it_was_made_at(sg2_folder, tmp_path, capsys):
  from memedit import specs
  from memedit.cli import main

  box = (_box(8, 20, 8, 24, 32) * 255).astype(np.uint8)
  spec = specs.save_spec(tmp_path / "spec.json", specs.make_spec(
      key=[(1, box)], object=(2, box), paste=(3, box), layer="conv_2", canvas=32,
      solver={"steps": 2}))
  stats = ["--samples", "8", "--batch-size", "8", "--cache-dir", str(tmp_path / "stats"),
           "--no-progress"]
  edit = str(tmp_path / "e.edit")
  assert main(["rewrite", str(sg2_folder), spec, "--truncation", "0.7", "--out", edit,
               *stats]) == 0
  assert memedit.load_edit(edit).settings["call_kwargs"] == {"truncation": 0.7}
  capsys.readouterr()
  png = str(tmp_path / "s.png")
  assert main(["sample", str(sg2_folder), "--edit", edit, "--images", "100", "--out", png]) == 0
  err = capsys.readouterr().err.strip().splitlines()
  assert err == [f"memedit sample: warning: --edit {edit}: the edit was made with "
                 "{'truncation': 0.7} and is applied with {'truncation': 1.0}; pass "
                 "--truncation 0.7 to match"]
  assert main(["sample", str(sg2_folder), "--edit", edit, "--images", "100", "--out", png,
               "--truncation", "0.7"]) == 0
  assert capsys.readouterr().err == ""


def test_an_edit_of_another_model_is_refused_by_name(sg2):
  gen, layer, _ = sg2
  path = gen.weight_path(layer)
  kernel = np.asarray(gens.layer_kernel(gen, layer))
  # Made for a layer of 16 input channels (3×3 taps): this one has 64.
  kind = gens.layer_view(gen, layer).kind
  other = memedit.make_edit(path, np.zeros(memedit.lambda_shape(kernel.shape, 1, kind),
                                           np.float32),
                            np.ones((1, 16), np.float32), kind=kind, label="elsewhere")
  with pytest.raises(ValueError, match="edit 'elsewhere' of .*conv_2.*: expected an edit that "
                     "fits this generator, got one that does not .*D: expected shape"):
    gens.edited(gen, other)
