"""StyleGAN2's modulated convolutions as memories, through memedit's memory view."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import memedit
from memedit.tree import get_leaf
from ports import stylegan2 as sg2


def rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / np.linalg.norm(b)


@pytest.fixture(scope="module")
def generator():
  # 8 px: every layer the tests edit (conv_0 at 4×4, conv_1 and conv_2 at 8×8, torgb_1)
  # and nothing after them (Flax draws each layer's initial values from its own name, so
  # these are the values the same layers had in the 16 px generator used before).
  module = sg2.StyleGAN2Generator(resolution=8, channels=sg2.rosinality_channels(8, 1),
                         z_dim=32, w_dim=32, n_mlp=2)
  z = jnp.asarray(sg2.sample_latents(3, 32, seed=1))
  variables = jax.jit(module.init)(jax.random.key(0), z)  # one program, not op by op
  return module, variables, z


@pytest.mark.parametrize("layer", [0, 1, 2])  # 4×4 conv, 8×8 up-sampling conv, 8×8 conv
def test_any_conv_layer_is_captured_and_edited_with_demodulation_recomputed(generator, layer):
  module, variables, z = generator
  path = sg2.layer_paths(module)[layer][1:-1]  # Linen module path of the memory
  view = memedit.memory_view((module, variables), path, z)
  assert view.kind == "conv" and view.weight_path == sg2.layer_paths(module)[layer]
  cap = memedit.capture((module, variables), path, z, single=True)
  x_mod, (style,) = cap.keys, cap.extra_args
  forward = jax.jit(memedit.layer_forward)  # the layer alone, one program (not op by op)
  r = 2
  lam0 = jnp.zeros(memedit.lambda_shape(view.kernel_shape, r, "conv"))
  np.testing.assert_allclose(forward(view, lam0, jnp.eye(r, view.key_dim), x_mod, style),
                             cap.values, rtol=1e-5, atol=1e-5)
  rng = np.random.default_rng(layer)
  # Directions on two units: the memory of what those channels mean here.
  units = rng.choice(view.key_dim, r, replace=False)
  D = jnp.zeros((r, view.key_dim)).at[jnp.arange(r), units].set(1.0)
  lam = jnp.asarray(rng.standard_normal(memedit.lambda_shape(view.kernel_shape, r, "conv")),
                    jnp.float32)
  # An input whose style vanishes on those units: its keys x·s are C⁻¹-orthogonal to D
  # and its demodulation, recomputed from the edited kernel, is unchanged: same output.
  keep = jnp.ones(view.key_dim).at[units].set(0.0)
  free_x, free_s = x_mod * keep, style * keep
  assert float(jnp.abs(jnp.einsum("nhwc,dc->nhwd", free_x, D)).max()) == 0.0
  before = forward(view, lam0, D, free_x, free_s)
  after = forward(view, lam, D, free_x, free_s)
  assert rel(after, before) <= 1e-5
  # A context input changes, and so does the demodulation itself.
  assert rel(forward(view, lam, D, x_mod, style), cap.values) > 1e-2
  # The whole generator runs with the edited kernel; the caller's variables are untouched.
  kernel = get_leaf(variables, view.weight_path)
  edit = memedit.make_edit(view.weight_path, lam, D, kind="conv")
  edited, _ = memedit.apply_edit(variables, edit)
  assert get_leaf(variables, view.weight_path) is kernel
  img0 = sg2.generate(module, variables, z, noise_mode="const")
  img1 = sg2.generate(module, edited, z, noise_mode="const")
  assert rel(img1, img0) > 1e-3


def test_insert_through_the_view_drives_the_paste_loss_down(generator):
  module, variables, z = generator
  path = sg2.layer_paths(module)[2][1:-1]
  view = memedit.memory_view((module, variables), path, z)
  cap = memedit.capture((module, variables), path, z, single=True)
  x_mod, (style,) = cap.keys, cap.extra_args
  with pytest.warns(UserWarning, match="has rank at most"):  # 192 keys of dimension 512
    C = memedit.second_moment(memedit.covariance_update(
        memedit.covariance_init(view.key_dim), x_mod))
  ctx = x_mod[0, 2:5, 2:5].reshape(-1, view.key_dim)
  D = memedit.context_directions(C, ctx, rank=3).D
  # Paste image 1's values into a 3×3 region of image 0; only that crop is optimised.
  target = cap.values[:1].at[:, 2:5, 2:5].set(cap.values[1:2, 2:5, 2:5])
  mask = jnp.zeros(target.shape[:3]).at[:, 2:5, 2:5].set(1.0)
  f = lambda kernel, keys: view.apply(kernel, *keys)
  # Gauss–Newton halves the loss within 3 steps here (to 0.44 of it; 0.42 after 4 steps,
  # 0.37 after 10), each of which costs seconds on the CPU at this width.
  res = memedit.solve_lambda(f, view.kernel(), D, (x_mod[:1], style[:1]), target, kind="conv",
                             weights=mask, optimizer="gauss_newton", steps=3)
  assert float(res.final_loss) < 0.5 * float(res.losses[0])


def test_the_registered_kind_declares_the_equalised_learning_rate_gain(generator):
  module, variables, z = generator
  # ToRGB's memory is linear in its kernel with gain 1/sqrt(C_in): the view's contract
  # check passes with the registered gain, and the closed-form insert writes its targets.
  path = ("synthesis", "torgb_1", "memory")
  view = memedit.memory_view((module, variables), path, z)
  cap = memedit.capture((module, variables), path, z, single=True)
  x, (style,) = cap.keys, cap.extra_args
  c_in = view.key_dim
  np.testing.assert_allclose(float(view.gain()), 1 / np.sqrt(c_in), rtol=1e-6)
  view.check_contract(x, style)
  # The modulated 3×3 convolution demodulates: not linear in its kernel, which the same
  # check reports (its inserts go through solve_lambda with the layer as f).
  conv = memedit.memory_view((module, variables), ("synthesis", "conv_2", "memory"), z)
  np.testing.assert_allclose(float(conv.gain()), 1 / np.sqrt(9 * conv.key_dim), rtol=1e-6)
  cap2 = memedit.capture((module, variables), ("synthesis", "conv_2", "memory"), z, single=True)
  with pytest.raises(ValueError, match="expected its output to be linear in its kernel"):
    conv.check_contract(cap2.keys, *cap2.extra_args)
  with pytest.raises(ValueError, match="expected in_features set"):
    sg2.memory_gain(sg2.ModulatedConvMemory(4))
