"""The workflow on more generators the other tests do not use: a grouped convolution, a
model taking latents (N, 4, 4, C), a bfloat16 layer, a per-pixel Dense layer on an odd
5×5 map of a 15×15 canvas; and inputs given in the wrong form (a list of layer names,
call keywords that are not pairs, NaN latents, a spec that is a dict, a C of another
layer, context examples that are not pairs, fractional steps, NaN directions)."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx

import memedit
from memedit import generators as gens
from memedit import specs

Z = 6


def _box(y0, y1, x0, x1, canvas=16):
  m = np.zeros((canvas, canvas), np.float32)
  m[y0:y1, x0:x1] = 1.0
  return m


class _Grouped(nnx.Module):
  """Linear → 8×8×4, a 3×3 convolution of 2 feature groups, nearest ×2, 1×1 to RGB."""

  def __init__(self):
    rngs = nnx.Rngs(0)
    self.fc = nnx.Linear(Z, 8 * 8 * 4, rngs=rngs)
    self.g = nnx.Conv(4, 4, (3, 3), feature_group_count=2, rngs=rngs)
    self.rgb = nnx.Conv(4, 3, (1, 1), rngs=rngs)

  def __call__(self, z):
    x = nnx.relu(self.g(self.fc(z).reshape(-1, 8, 8, 4)))
    return jnp.tanh(self.rgb(jnp.repeat(jnp.repeat(x, 2, 1), 2, 2)))


def test_a_grouped_convolution_is_refused_by_name_for_directions_and_overfit_whole():
  """Directions over a grouped convolution's C_in keys do not fit its (3, 3, C_in/G, C_out)
  kernel: insert, projected_insert and unit_zeroing_edit raised raw shape errors from
  deep inside (an einsum's, lax.conv's), own_taps probed the layer with C_in/G channels,
  and overfit built D = I over the C_in keys. Now the solves over D name the layer's
  feature_group_count, own_taps probes with its C_in channels, and overfit fits the whole
  grouped kernel."""
  gen = gens.Generator(_Grouped(), Z, 16, {"g": ("g",)})
  obj, paste = _box(0, 4, 0, 4), _box(8, 12, 8, 12)
  target = gens.paste_target(gen, "g", gens.copy_values(gen, "g", 1, obj), 2, paste)
  D = np.eye(4, dtype=np.float32)[:2]
  want = re.escape("layer 'g': expected a convolution with feature_group_count 1 for ") + (
      r"\w+" + re.escape(" (directions over its 4 key channels), got feature_group_count 2 "
                         "(kernel (3, 3, 2, 4), 2 input channels per group)"))
  for call in (lambda: gens.insert(gen, "g", D, target, steps=2),
               lambda: gens.insert(gen, "g", D, target, steps=2, taps="own"),
               lambda: gens.projected_insert(gen, "g", D, target, steps=2),
               lambda: gens.unit_zeroing_edit(gen, "g", [1])):
    with pytest.raises(ValueError, match=want):
      call()
  # The own taps of a 'same' 3×3 convolution: the centre.
  np.testing.assert_array_equal(gens.own_taps(gen, "g"), np.eye(3, dtype=bool)[1][:, None]
                                & np.eye(3, dtype=bool)[1][None, :])
  # overfit: ΔK over the whole grouped kernel, applied as an edit, is what it solved.
  res = gens.overfit(gen, "g", target, steps=30, learning_rate=0.01)
  assert res.edit.rank == 2 and res.loss_after < res.loss_before
  new, _ = gens.edited(gen, res.edit)
  f, keys = gens.crop_problem(gen, "g", target)
  out = np.asarray(f(jnp.asarray(gens.layer_kernel(new, "g")), keys), np.float64)
  np.testing.assert_allclose(np.abs(out - target.targets).mean(), res.loss_after, rtol=1e-5)


class _Spatial(nnx.Module):
  """Takes latents (N, 4, 4, 3), as some generators do."""

  def __init__(self):
    self.up = nnx.ConvTranspose(3, 3, (4, 4), strides=(4, 4), rngs=nnx.Rngs(0))

  def __call__(self, z):
    return jnp.tanh(self.up(z))


class _SpatialLinen(nn.Module):
  @nn.compact
  def __call__(self, z):
    return nn.ConvTranspose(3, (4, 4), strides=(4, 4), name="up")(z)


class _WithNorm(nnx.Module):
  def __init__(self):
    rngs = nnx.Rngs(0)
    self.fc = nnx.Linear(Z, 4 * 4 * 3, rngs=rngs)
    self.norm = nnx.LayerNorm(3, rngs=rngs)
    self.up = nnx.ConvTranspose(3, 3, (4, 4), strides=(4, 4), rngs=rngs)

  def __call__(self, z):
    return jnp.tanh(self.up(self.norm(self.fc(z).reshape(-1, 4, 4, 3))))


def test_a_model_that_cannot_run_on_latents_n_by_z_dim_is_named_whatever_it_raises():
  """A model taking latents (N, 4, 4, C) failed inside JAX with a bare AssertionError (NNX
  ConvTranspose) or Flax's ScopeParamShapeError (Linen), not naming the workflow's call;
  both now say what the model was called with. memedit's own errors about the layer (a
  normalisation layer) are left as they are."""
  lead = re.escape("model: expected model(z, **call_kwargs) to run on latents z of shape "
                   "(1, 48) (z_dim=48, call_kwargs []), got ")
  tail = re.escape("; the workflow calls the model on latents (N, z_dim)")
  with pytest.raises(ValueError, match=lead + re.escape("AssertionError: (no message)") + tail):
    gens.layer_info(gens.Generator(_Spatial(), 48, 16, {"up": ("up",)}), "up")
  module = _SpatialLinen()
  variables = module.init(jax.random.key(0), jnp.zeros((1, 4, 4, 3)))
  with pytest.raises(ValueError, match=lead + "ScopeParamShapeError: .*" + tail):
    gens.copy_values(gens.Generator((module, variables), 48, 16, {"up": ("up",)}), "up", 0,
                     _box(0, 4, 0, 4))
  with pytest.raises(ValueError, match="LayerNorm is a normalisation layer"):
    gens.layer_info(gens.Generator(_WithNorm(), Z, 16, {"n": ("norm",)}), "n")


class _Bf16(nnx.Module):
  def __init__(self):
    rngs = nnx.Rngs(0)
    kw = dict(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, rngs=rngs)
    self.fc = nnx.Linear(Z, 4 * 4 * 4, **kw)
    self.up = nnx.ConvTranspose(4, 3, (4, 4), strides=(2, 2), padding="SAME", **kw)

  def __call__(self, z):
    x = self.up(self.fc(z.astype(jnp.bfloat16)).reshape(-1, 4, 4, 4))
    return jnp.tanh(jnp.repeat(jnp.repeat(x, 2, 1), 2, 2))


def test_projected_insert_runs_on_a_bfloat16_kernel():
  """The projected run started Adam on a bfloat16 ΔK whose projection came back in
  float32, and lax.scan refused the carry (bfloat16 moments in, float32 out)."""
  gen = gens.Generator(_Bf16(), Z, 16, {"up": ("up",)})
  obj, paste = _box(0, 4, 0, 4), _box(8, 12, 8, 12)
  target = gens.paste_target(gen, "up", gens.copy_values(gen, "up", 1, obj), 2, paste)
  D = np.eye(4, dtype=np.float32)[:2]
  res = gens.projected_insert(gen, "up", D, target, steps=21, learning_rate=0.05)
  assert np.isfinite(res.losses).all() and res.loss_after < res.loss_before
  new, hist = gens.edited(gen, res.edit)
  assert gens.layer_kernel(new, "up").dtype == jnp.bfloat16
  back, _ = gens.reverted(new, res.edit, hist)
  np.testing.assert_array_equal(np.asarray(gens.layer_kernel(back, "up"), np.float32),
                                np.asarray(gens.layer_kernel(gen, "up"), np.float32))


class _PerPixel(nnx.Module):
  """Linear → 5×5×4, a per-pixel Dense 4 → 6, nearest ×3 to 15×15, 1×1 to RGB."""

  def __init__(self):
    rngs = nnx.Rngs(0)
    self.fc = nnx.Linear(Z, 5 * 5 * 4, rngs=rngs)
    self.lin = nnx.Linear(4, 6, rngs=rngs)
    self.rgb = nnx.Conv(6, 3, (1, 1), rngs=rngs)

  def __call__(self, z):
    x = nnx.relu(self.lin(nnx.relu(self.fc(z)).reshape(-1, 5, 5, 4)))
    return jnp.tanh(self.rgb(jnp.repeat(jnp.repeat(x, 3, 1), 3, 2)))


@pytest.fixture(scope="module")
def per_pixel():
  return gens.Generator(_PerPixel(), Z, 15, {"lin": ("lin",)})


def test_a_per_pixel_dense_insert_on_an_odd_map_is_the_float64_least_squares(per_pixel):
  gen = per_pixel
  obj, paste = _box(0, 6, 0, 6, 15), _box(6, 12, 6, 12, 15)
  target = gens.paste_target(gen, "lin", gens.copy_values(gen, "lin", 1, obj), 2, paste)
  keys, w = gens.context_keys(gen, "lin", [(2, paste)])
  np.testing.assert_array_equal(w, gens.mask_at(paste, 5).reshape(-1))
  C = np.asarray(memedit.second_moment(gens.collect_statistics(gen, "lin", 6, batch_size=4,
                                                               progress=False)))
  D = gens.directions(C, keys, w, rank=3)
  res = gens.insert(gen, "lin", D, target, optimizer="gauss_newton", loss="l2", steps=30)
  # float64: ΔW = Dᵀ Λ with Λ the least squares of (K Dᵀ) Λ = V − K W0 − b on the crop.
  y0, y1, x0, x1 = target.key_box
  K = np.asarray(gens.run_layer(gen, "lin", gen.latents([2])).keys[0, y0:y1, x0:x1],
                 np.float64).reshape(-1, 4)
  W0 = np.asarray(gens.layer_kernel(gen, "lin"), np.float64)
  b = np.asarray(gen.params["lin"]["bias"][...], np.float64)
  V = np.asarray(target.targets[0], np.float64).reshape(-1, 6)
  D64 = np.asarray(D, np.float64)
  lam = np.linalg.lstsq(K @ D64.T, V - K @ W0 - b, rcond=None)[0]
  new, _ = gens.edited(gen, res.edit)
  dW = np.asarray(gens.layer_kernel(new, "lin"), np.float64) - W0
  np.testing.assert_allclose(dW, D64.T @ lam, atol=1e-5 * np.abs(D64.T @ lam).max())


def test_solver_inputs_given_in_the_wrong_form_are_named(per_pixel):
  """Fractional steps were truncated (2.5 → 2 steps), a target that is not a Target gave an
  AttributeError, NaN directions an error about f's output, a spec passed as its JSON dict
  an AttributeError, a C of another size an error about the keys, and context examples
  that are not pairs Python's unpacking errors."""
  gen = per_pixel
  paste = _box(6, 12, 6, 12, 15)
  target = gens.paste_target(gen, "lin", gens.copy_values(gen, "lin", 1, paste), 2, paste)
  D = np.eye(4, dtype=np.float32)[:1]
  with pytest.raises(ValueError, match=re.escape("steps: expected a positive int, got 2.5")):
    gens.insert(gen, "lin", D, target, steps=2.5)
  for bad in (None, tuple(target)):
    with pytest.raises(TypeError, match=re.escape(
        "target: expected a Target (from paste_target or erase_target), got "
        f"{type(bad).__name__}")):
      gens.insert(gen, "lin", D, bad, steps=2)
    with pytest.raises(TypeError, match="target: expected a Target"):
      gens.projected_insert(gen, "lin", D, bad, steps=2)
  nan_d = np.full((1, 4), np.nan, np.float32)
  for call in (lambda: gens.insert(gen, "lin", nan_d, target, steps=2),
               lambda: gens.projected_insert(gen, "lin", nan_d, target, steps=2)):
    with pytest.raises(ValueError, match=re.escape(
        "directions: expected finite values, got 4 NaN or infinite of 4")):
      call()
  spec = specs.make_spec(key=[(2, paste)], object=(1, paste), paste=(2, paste), layer="lin",
                         canvas=15, solver={"steps": 2})
  with pytest.raises(TypeError, match=re.escape("spec: expected an EditSpec (from "
                                                "memedit.specs.spec_from_json, load_spec or "
                                                "make_spec), got dict")):
    gens.edit_from_spec(gen, specs.spec_to_json(spec), np.eye(4))
  with pytest.raises(ValueError, match=re.escape(
      "C: expected the second moment of the keys of layer 'lin', of shape (4, 4) (C_in = 4), "
      "got (3, 3)")):
    gens.edit_from_spec(gen, spec, np.eye(3))
  with pytest.raises(ValueError, match=re.escape("steps: expected a positive int, got 1.5")):
    gens.edit_from_spec(gen, spec, np.eye(4), steps=1.5)
  with pytest.raises(ValueError, match=re.escape(
      "examples[0]: expected an (imgnum, mask) pair, got a value of type int (a single "
      "example goes in a list: [(imgnum, mask)])")):
    gens.context_keys(gen, "lin", (2, paste))
  with pytest.raises(ValueError, match=re.escape(
      "examples[1]: expected an (imgnum, mask) pair, got a tuple of length 3")):
    gens.context_keys(gen, "lin", [(2, paste), (3, paste, 1.0)])


def test_generator_settings_given_in_the_wrong_form_are_named():
  """A list of layer names became {'u': 'p'} (dict(['up'])), call keywords that are not
  pairs gave Python's unpacking error, and a sampler's NaN latents went into the model."""
  model = _PerPixel()
  with pytest.raises(ValueError, match=re.escape(
      "layers: expected a mapping name -> address of each editable layer (e.g. "
      "{'up': ('up',)}), got the list ['lin']")):
    gens.Generator(model, Z, 15, ["lin"])
  with pytest.raises(ValueError, match=re.escape(
      "call_kwargs: expected a dict name -> value or (name, value) pairs, got the list "
      "['train']")):
    gens.Generator(model, Z, 15, {"lin": ("lin",)}, call_kwargs=["train"])
  gen = gens.Generator(model, Z, 15, {"lin": ("lin",)}, call_kwargs=[("train", False)])
  assert gen.call_kwargs == (("train", False),)
  gen = gens.Generator(model, Z, 15, {"lin": ("lin",)},
                       sampler=lambda n: np.where(n[:, None] == 1, np.nan, 0.0) + np.zeros(Z))
  np.testing.assert_array_equal(gen.latents([0]), np.zeros((1, Z), np.float32))
  with pytest.raises(ValueError, match=re.escape(
      "sampler: expected finite latents, got 6 NaN or infinite of 12 (in float32)")):
    gen.latents([0, 1])


class _TwoConvs(nnx.Module):
  def __init__(self):
    rngs = nnx.Rngs(0)
    self.fc = nnx.Linear(Z, 8 * 8 * 3, rngs=rngs)
    self.a = nnx.Conv(3, 3, (3, 3), rngs=rngs)
    self.b = nnx.Conv(3, 3, (3, 3), rngs=rngs)

  def __call__(self, z):
    return jnp.tanh(self.b(nnx.relu(self.a(self.fc(z).reshape(-1, 8, 8, 3)))))


def test_overfit_all_refuses_a_target_of_another_layer():
  """overfit_all pasted a Target made at layer 'a' into layer 'b' (both 8×8×3 maps) and
  fine-tuned the generator towards that, without a word; a None target gave an
  AttributeError."""
  gen = gens.Generator(_TwoConvs(), Z, 8, {"a": ("a",), "b": ("b",)})
  m = _box(2, 4, 2, 4, 8)
  target = gens.paste_target(gen, "a", gens.copy_values(gen, "a", 0, m), 1, m)
  with pytest.raises(ValueError, match=re.escape(
      "target: expected a crop of layer 'b' (the layer edited), got a Target made at layer "
      "'a'")):
    gens.overfit_all(gen, "b", target, steps=2)
  with pytest.raises(TypeError, match=re.escape(
      "target: expected a Target (from paste_target or erase_target), got NoneType")):
    gens.overfit_all(gen, "b", None, steps=2)
  by_hand = target._replace(layer=None, full_values=target.full_values[:, :4],
                            full_alpha=target.full_alpha[:, :4])
  with pytest.raises(ValueError, match=re.escape(
      "target: expected full_values (1, 8, 8, 3) and full_alpha (1, 8, 8) (the value map of "
      "layer 'b'), got (1, 4, 8, 3) and (1, 4, 8)")):
    gens.overfit_all(gen, "b", by_hand, steps=2)
