"""The workflow on generators unlike the ports: nearest and bilinear up-sampling followed by
3×3 convolutions, GroupNorm, a residual block, keyword call arguments, a 1×1 layer writing
one grey channel in [0, 1], layers addressed through lists and dicts; dilated, circular and
reflecting convolutions; and models or layers that do not fit the canvas."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import memedit
from memedit import generators as gens
from memedit import specs

Z_DIM = 6
R = 16


class _Res(nnx.Module):
  def __init__(self, c, rngs):
    self.conv_a = nnx.Conv(c, c, (3, 3), rngs=rngs)
    self.norm = nnx.GroupNorm(c, num_groups=2, rngs=rngs)
    self.conv_b = nnx.Conv(c, c, (3, 3), rngs=rngs)

  def __call__(self, x):
    return x + self.conv_b(nnx.relu(self.norm(self.conv_a(x))))


class _Grey(nnx.Module):
  """Linear → 4×4, nearest ×2, 3×3 conv, GroupNorm, residual block, bilinear ×2, 3×3 conv,
  1×1 conv to one channel, sigmoid; called with keyword arguments."""

  def __init__(self, c=6):
    rngs = nnx.Rngs(0)
    self.c = c
    self.fc = nnx.Linear(Z_DIM, 16 * c, rngs=rngs)
    self.convs = nnx.List([nnx.Conv(c, c, (3, 3), rngs=rngs), nnx.Conv(c, c, (3, 3), rngs=rngs)])
    self.norm = nnx.GroupNorm(c, num_groups=2, rngs=rngs)
    self.blocks = nnx.Dict({"res": _Res(c, rngs)})
    self.to_grey = nnx.Conv(c, 1, (1, 1), rngs=rngs)

  def features(self, z, truncation):
    """(the 1×1 layer's input, its output, the image), computed here without memedit."""
    n = z.shape[0]
    x = nnx.relu(self.fc(z * truncation)).reshape(n, 4, 4, self.c)
    x = self.convs[0](jnp.repeat(jnp.repeat(x, 2, 1), 2, 2))
    x = self.blocks["res"](nnx.relu(self.norm(x)))
    x = nnx.relu(self.convs[1](jax.image.resize(x, (n, R, R, self.c), "bilinear")))
    y = self.to_grey(x)
    return x, y, nnx.sigmoid(y)

  def __call__(self, z, *, truncation=1.0, train=False):
    assert not train
    return self.features(z, truncation)[2]


def _box(y0, y1, x0, x1, canvas=R):
  m = np.zeros((canvas, canvas), np.float32)
  m[y0:y1, x0:x1] = 1.0
  return m


def _f64(a):
  return np.asarray(a, np.float64)


def test_a_one_by_one_grey_layer_of_an_upsampling_groupnorm_generator_is_edited_exactly():
  model = _Grey()
  before = [np.array(a) for a in jax.tree_util.tree_leaves(nnx.state(model))]
  gen = gens.Generator(model, Z_DIM, R, {"grey": ("to_grey",), "conv0": ("convs", 0),
                                         "res": ("blocks", "res", "conv_a")},
                       call_kwargs={"truncation": 0.7, "train": False})
  info = gens.layer_info(gen, "grey")
  assert (info.key_res, info.value_res, info.key_dim, info.value_dim, info.margin) == (
      16, 16, 6, 1, 1)
  assert gens.layer_info(gen, "res").weight_path == ("blocks", "res", "conv_a", "kernel")
  # One compiled program per batch size (op by op, each of the model's operations would
  # be compiled on its own, for each batch size).
  features = nnx.jit(lambda m, z: m.features(z, 0.7))
  feats = lambda nums: [_f64(a) for a in features(model, jnp.asarray(gen.latents(nums)))]
  # Statistics: Σ k kᵀ / n of the keys computed here.
  k, _, images = feats(range(12))
  np.testing.assert_allclose(gens.generate_images(gen, gen.latents(12)), images, atol=1e-6)
  state = gens.collect_statistics(gen, "grey", 12, batch_size=8, progress=False)
  k = k.reshape(-1, 6)
  ref = k.T @ k / len(k)
  C = _f64(memedit.second_moment(state))
  assert memedit.key_count(state) == len(k)
  assert np.linalg.norm(C - ref) <= 1e-6 * np.linalg.norm(ref)
  # Copy and paste: the crops the masks say.
  obj, paste = _box(3, 5, 3, 5), _box(8, 10, 6, 7)
  copied = gens.copy_values(gen, "grey", 3, obj)
  (ka, va, _), (kb, vb, _) = (feats([n]) for n in (3, 5))
  assert copied.box == (3, 5, 3, 5)
  np.testing.assert_allclose(copied.values, va[0, 3:5, 3:5], atol=1e-6)
  target = gens.paste_target(gen, "grey", copied, 5, paste)
  assert target.key_box == (8, 10, 6, 7)
  # Centres aligned: the copied columns 3, 4 move by round(6.5 - 4) = 2, so column 4 lands
  # on the paste's column 6.
  np.testing.assert_allclose(target.targets[0], va[0, 3:5, 4:5], atol=1e-6)
  np.testing.assert_allclose(target.original[0], vb[0, 8:10, 6:7], atol=1e-6)
  np.testing.assert_allclose(target.keys[0, 1:-1, 1:-1], kb[0, 8:10, 6:7], atol=1e-6)
  # Context on the paste's two keys, rank 2: Gauss–Newton (L2) writes v* there exactly.
  keys, weights = gens.context_keys(gen, "grey", [(5, paste)])
  D = gens.directions(C, keys, weights, rank=2)
  res = gens.insert(gen, "grey", D, target, optimizer="gauss_newton", loss="l2", steps=30)
  assert res.loss_after < 1e-5 < 0.5 < res.loss_before
  new, hist = gens.edited(gen, res.edit)
  after = gens.run_layer(new, "grey", gen.latents([5]))
  np.testing.assert_allclose(after.values[0, 8:10, 6:7], target.targets[0], atol=1e-5)
  # The closed form in float64: Λ = R (D K*)⁺ with R = v* − W0 k* − b.
  K0 = _f64(gens.layer_kernel(gen, "grey"))[0, 0]
  b = _f64(nnx.state(model)["to_grey"]["bias"][...])
  ks, D64 = kb[0, 8:10, 6:7].reshape(-1, 6), _f64(D)
  lam = (target.targets[0].reshape(-1, 1) - ks @ K0 - b).T @ np.linalg.pinv(D64 @ ks.T)
  K1 = _f64(gens.layer_kernel(new, "grey"))[0, 0]
  np.testing.assert_allclose(K1, K0 + (lam @ D64).T, atol=1e-5)
  # Keys outside the context (orthogonal to D) keep their outputs.
  others = _f64(gens.run_layer(gen, "grey", gen.latents([7, 8])).keys).reshape(-1, 6)
  perp = others - others @ np.linalg.pinv(D64) @ D64
  assert np.abs(perp @ (K1 - K0)).max() <= 1e-5 * np.abs(perp @ K0).max()
  # Revert is bit-exact; the caller's model is untouched.
  back, _ = gens.reverted(new, res.edit, hist)
  for a, c in zip(jax.tree_util.tree_leaves(back.params), jax.tree_util.tree_leaves(gen.params)):
    assert a.dtype == c.dtype and np.array_equal(np.asarray(a), np.asarray(c))
  for a, c in zip(before, jax.tree_util.tree_leaves(nnx.state(model))):
    assert np.array_equal(a, np.asarray(c))
  # The same edit from a JSON spec.
  spec = specs.spec_from_json(specs.spec_to_json(specs.make_spec(
      key=[(5, paste)], object=(3, obj), paste=(5, paste), layer="grey", canvas=R, rank=2,
      solver={"optimizer": "gauss_newton", "loss": "l2", "steps": 30})), layers=list(gen.layers),
      canvas=R)
  out = gens.edit_from_spec(gen, spec, np.asarray(memedit.second_moment(state)))
  np.testing.assert_array_equal(out.result.D, res.D)
  np.testing.assert_array_equal(np.asarray(out.result.edit.lam), np.asarray(res.edit.lam))


class _Conv8(nnx.Module):
  """Linear → (side × side) map, one conv, nearest resize to ``up``, 1×1 conv to RGB;
  ``out`` picks what the model returns."""

  def __init__(self, side=8, up=(8, 8), out="image", **conv):
    rngs = nnx.Rngs(0)
    self.side, self.up, self.out = side, up, out
    self.fc = nnx.Linear(Z_DIM, side * side * 4, rngs=rngs)
    self.conv = nnx.Conv(4, 4, (3, 3), rngs=rngs, **conv)
    self.rgb = nnx.Conv(4, 3, (1, 1), rngs=rngs)

  def __call__(self, z):
    x = self.conv(self.fc(z).reshape(z.shape[0], self.side, self.side, 4))
    x = jax.image.resize(nnx.relu(x), (z.shape[0],) + self.up + (4,), "nearest")
    y = jnp.tanh(self.rgb(x))
    return {"image": y, "tuple": (y, z), "nchw": y.transpose(0, 3, 1, 2)}[self.out]


@pytest.mark.parametrize("up, out, got", [
    ((12, 12), "image", "an array of shape (1, 12, 12, 3) (float32)"),
    ((16, 12), "image", "an array of shape (1, 16, 12, 3) (float32)"),
    ((16, 16), "nchw", "an array of shape (1, 3, 16, 16) (float32)"),
    ((16, 16), "tuple", "a tuple holding arrays of shapes [(1, 16, 16, 3), (1, 6)]"),
])
def test_a_model_whose_output_is_not_an_image_batch_of_the_canvas_is_refused(up, out, got):
  gen = gens.Generator(_Conv8(up=up, out=out), Z_DIM, 16, {"conv": ("conv",)})
  want = ("model: expected model(z) to give images (N, 16, 16, C) (NHWC floats at the "
          f"generator's resolution 16), got {got}")
  for call in (lambda: gens.copy_values(gen, "conv", 0, _box(2, 8, 2, 8)),
               lambda: gens.context_keys(gen, "conv", [(0, _box(2, 8, 2, 8))])):
    with pytest.raises(ValueError, match=re.escape(want)):
      call()
  if out == "tuple":
    with pytest.raises(ValueError, match=re.escape(want.replace("(1, ", "(2, "))):
      gens.generate_images(gen, gen.latents(2))


def test_a_layer_whose_size_does_not_divide_the_canvas_is_refused():
  gen = gens.Generator(_Conv8(side=6, up=(16, 16)), Z_DIM, 16, {"conv": ("conv",)})
  want = ("layer 'conv': expected key and value maps whose sizes divide the canvas "
          "resolution 16, got keys 6x6 and values 6x6")
  for call in (lambda: gens.copy_values(gen, "conv", 0, _box(2, 8, 2, 8)),
               lambda: gens.context_keys(gen, "conv", [(0, _box(2, 8, 2, 8))]),
               lambda: gens.erase_target(gen, "conv", 0, _box(2, 8, 2, 8), [0])):
    with pytest.raises(ValueError, match=re.escape(want)):
      call()


@pytest.mark.parametrize("conv, margin, padding", [
    ({"kernel_dilation": 3}, 4, "constant"),
    ({"padding": "CIRCULAR"}, 2, "wrap"),
    ({"padding": "REFLECT"}, 2, "reflect"),
])
def test_crops_of_dilated_circular_and_reflecting_convolutions_are_the_layers_outputs(
    conv, margin, padding):
  gen = gens.Generator(_Conv8(**conv), Z_DIM, 8, {"conv": ("conv",)})
  kernel = jnp.asarray(gens.layer_kernel(gen, "conv"))
  for mask in (_box(0, 3, 0, 3, 8), _box(5, 8, 4, 8, 8)):
    target = gens.paste_target(gen, "conv", gens.copy_values(gen, "conv", 1, mask), 2, mask)
    f, keys = gens.crop_problem(gen, "conv", target)
    np.testing.assert_allclose(_f64(f(kernel, keys)), _f64(target.original), atol=1e-6)
  info = gens.layer_info(gen, "conv")
  assert (info.margin, info.key_padding) == (margin, padding)
  # The loss the solve reports is the edited model's own loss on the crop.
  res = gens.insert(gen, "conv", np.eye(4)[:2], target, optimizer="gauss_newton", loss="l2",
                    steps=5)
  new, _ = gens.edited(gen, res.edit)
  values = gens.run_layer(new, "conv", gen.latents([2])).values
  y0, y1, x0, x1 = target.key_box
  np.testing.assert_allclose(np.abs(_f64(values[0, y0:y1, x0:x1]) - target.targets[0]).mean(),
                             res.loss_after, rtol=1e-4)


def test_a_grey_comparison_grid_is_saved_as_a_png(tmp_path):
  from PIL import Image
  grid = gens.comparison_grid(np.zeros((2, 4, 4, 1)), np.ones((2, 4, 4, 1)), columns=2)
  assert grid.shape[-1] == 1
  gens.save_png(tmp_path / "grey.png", grid)
  with Image.open(tmp_path / "grey.png") as img:
    assert img.mode == "L"
    np.testing.assert_array_equal(np.asarray(img), grid[..., 0])
  with pytest.raises(ValueError, match=re.escape(
      "array: expected pixels of shape (H, W) or (H, W, C) with C = 1, 2, 3 or 4, got shape "
      "(4, 4, 5)")):
    gens.save_png(tmp_path / "five.png", np.zeros((4, 4, 5), np.uint8))


def test_a_z_dim_or_keyword_the_model_does_not_take_is_named():
  """A wrong z_dim gave a raw TypeError from dot_general, a misspelt call keyword
  Python's own TypeError; both now say what the model was called with."""
  from flax import nnx

  from memedit.generators import Generator, layer_info

  model = nnx.Sequential(nnx.Linear(4, 12, rngs=nnx.Rngs(0)), lambda x: x.reshape(-1, 2, 2, 3))
  with pytest.raises(ValueError, match=r"model: expected model\(z, \*\*call_kwargs\) to run on "
                                       r"latents z of shape \(1, 5\) \(z_dim=5, call_kwargs "
                                       r"\[\]\), got TypeError: "):
    layer_info(Generator(model, z_dim=5, resolution=2, layers={"fc": ("layers", 0)}), "fc")
  gen = Generator(model, z_dim=4, resolution=2, layers={"fc": ("layers", 0)},
                  call_kwargs={"trian": False})
  with pytest.raises(ValueError, match=r"call_kwargs \['trian'\]\), got TypeError: "):
    layer_info(gen, "fc")
