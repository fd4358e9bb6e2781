"""The crop problem on keys projected onto D: the same function of Λ where the layer is
affine in its kernel, refused where it is not; inserts solved either way agree."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import memedit
from memedit import generators as gens
from memedit.generators.crop import LayerOnCrop
from memedit.generators.subspace import subspace_problem

from toy import box, toy_generator


def _orthonormal(rs, r, d):
  return np.linalg.qr(rs.standard_normal((d, r)))[0].T.astype(np.float32)


class DemodConv(nn.Module):
  """A 3×3 convolution whose kernel is normalised per output (not affine in it)."""

  @nn.compact
  def __call__(self, x):
    k = self.param("kernel", nn.initializers.normal(1.0), (3, 3, x.shape[-1], 2))
    k = k * jax.lax.rsqrt(jnp.sum(k * k, axis=(0, 1, 2)) + 1e-8)
    return jax.lax.conv_general_dilated(x, k, (1, 1), "SAME",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


@pytest.mark.parametrize("layer,kind", [
    (nn.ConvTranspose(4, (4, 4), strides=(2, 2)), "conv"),
    (nn.Conv(4, (3, 3), padding="SAME"), "conv"),
    (nn.Dense(4), "dense")])
def test_projected_problem_is_the_same_function_of_lambda(layer, kind):
  rs = np.random.default_rng(0)
  cin, r = 12, 2
  x = jnp.asarray(rs.standard_normal((2, 5, 5, cin)), jnp.float32)
  kshape = ((4, 4) if isinstance(layer, nn.ConvTranspose) else (3, 3))[:2 if kind == "conv"
                                                                       else 0] + (cin, 4)
  K0 = jnp.asarray(rs.standard_normal(kshape) * 0.3, jnp.float32)
  params = {"params": {"bias": jnp.asarray(rs.standard_normal(4), jnp.float32)}}
  f = LayerOnCrop("linen", layer, "kernel")
  keys = (x, params, ())
  D = jnp.asarray(_orthonormal(rs, r, cin))
  p = subspace_problem(f, K0, D, keys, kind=kind)
  assert p is not None and p.error < 1e-5
  assert p.kernel0.shape == kshape[:-2] + (r, 4) and p.keys[0].shape == x.shape[:-1] + (r,)
  np.testing.assert_array_equal(np.asarray(p.D), np.eye(r))
  # Any Λ: the layer's output with ΔK(Λ, D) equals the projected problem's (float64 check).
  for scale in (0.01, 1.0, 30.0):
    lam = jnp.asarray(scale * rs.standard_normal(memedit.lambda_shape(kshape, r, kind)),
                      jnp.float32)
    full = np.asarray(f(K0 + memedit.kernel_delta(lam, D, kshape, kind), keys), np.float64)
    red = np.asarray(p.f(memedit.kernel_delta(lam, p.D, p.kernel0.shape, kind), p.keys),
                     np.float64)
    np.testing.assert_allclose(red, full, rtol=0, atol=2e-6 * np.abs(full).max())
  # No gain (r = C_in), another f, or keys of another layout: no projected problem.
  assert subspace_problem(f, K0, jnp.eye(cin), keys, kind=kind) is None
  assert subspace_problem(lambda k, x: x[0] @ k, K0, D, keys, kind=kind) is None
  assert subspace_problem(f, K0, D, (x, params), kind=kind) is None


class FixedInputConv(nn.Module):
  """A 3×3 convolution whose kernel shape is fixed (8 input channels)."""

  @nn.compact
  def __call__(self, x):
    k = self.param("kernel", nn.initializers.normal(1.0), (3, 3, 8, 2))
    return jax.lax.conv_general_dilated(x, k, (1, 1), "SAME",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


@pytest.mark.parametrize("module", [DemodConv(), FixedInputConv()])
def test_a_layer_not_affine_in_its_kernel_or_fixed_to_c_in_keeps_the_full_problem(module):
  rs = np.random.default_rng(1)
  f = LayerOnCrop("linen", module, "kernel")
  K0 = jnp.asarray(rs.standard_normal((3, 3, 8, 2)), jnp.float32)
  keys = (jnp.asarray(rs.standard_normal((1, 6, 6, 8)), jnp.float32), {"params": {}}, ())
  assert f(K0, keys).shape == (1, 6, 6, 2)
  assert subspace_problem(f, K0, _orthonormal(rs, 1, 8), keys) is None


@pytest.fixture(scope="module")
def toy_problem():
  """One generator, its statistics, directions and paste target for every solver (the
  compiled programs of one generator are shared by the cases)."""
  gen = toy_generator()
  state = gens.collect_statistics(gen, "up2", 32, batch_size=16, progress=False)
  C = np.asarray(memedit.second_moment(state))
  keys, weights = gens.context_keys(gen, "up2", [(1, box(4, 10, 4, 12)),
                                                 (2, box(6, 12, 2, 10))])
  D = gens.directions(C, keys, weights, rank=2)
  target = gens.paste_target(gen, "up2", gens.copy_values(gen, "up2", 3, box(4, 10, 4, 12)),
                             1, box(4, 10, 4, 12))
  return gen, D, target


@pytest.mark.parametrize("optimizer,loss,steps", [("gauss_newton", "l2", 8),
                                                  ("gauss_newton", "l1", 10),
                                                  ("adam", "l1", 200)])
def test_insert_on_projected_keys_agrees_with_the_full_solve(toy_problem, optimizer, loss,
                                                             steps):
  gen, D, target = toy_problem
  kw = dict(optimizer=optimizer, loss=loss, steps=steps, taps="own", learning_rate=0.05)
  fast = gens.insert(gen, "up2", D, target, **kw)
  full = gens.insert(gen, "up2", D, target, project_keys=False, **kw)
  assert fast.loss_before == full.loss_before
  assert fast.loss_after < 0.9 * fast.loss_before
  # The same loss of Λ, summed in another order: the solves agree to float rounding.
  np.testing.assert_allclose(fast.losses, full.losses, rtol=2e-4)
  np.testing.assert_allclose(fast.loss_after, full.loss_after, rtol=2e-4)
  lam_f, lam_s = np.asarray(full.edit.lam), np.asarray(fast.edit.lam)
  tol = 1e-3 if loss == "l2" else 2e-2  # L1's Λ is ill-conditioned near its kinks
  assert np.linalg.norm(lam_s - lam_f) <= tol * np.linalg.norm(lam_f)
  # The tap mask holds: Λ is zero off the own taps.
  own = gens.own_taps(gen, "up2")
  assert np.abs(lam_s[~own]).max() == 0
