"""Inserts that keep other crops' outputs (``preserve``): the documented weighted objective
against its float64 closed form on a layer affine in its kernel, and the checks of the
arguments."""

from __future__ import annotations

import re
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import memedit
from memedit import generators as gens
from memedit.layouts import lambda_shape

from toy import box, toy_generator

LAYER = "up2"


@pytest.fixture(scope="module")
def problem():
  gen = toy_generator()
  state = gens.collect_statistics(gen, LAYER, 32, batch_size=16, progress=False)
  C = np.asarray(memedit.second_moment(state))
  keys, weights = gens.context_keys(gen, LAYER, [(1, box(4, 10, 4, 12)),
                                                 (2, box(6, 12, 2, 10))])
  D = gens.directions(C, keys, weights, rank=2)
  copied = gens.copy_values(gen, LAYER, 3, box(4, 10, 4, 12))
  target = gens.paste_target(gen, LAYER, copied, 1, box(4, 10, 4, 12))
  # Another image's crop, overlapping none of the edit's keys: only its outputs count.
  kept = gens.paste_target(gen, LAYER, gens.copy_values(gen, LAYER, 5, box(8, 14, 6, 12)),
                           4, box(8, 14, 6, 12))
  return gen, D, target, kept


def _stacked64(gen, D, crops, lam):
  """The crops' outputs (flattened, concatenated) at K0 + ΔK(Λ, D), in float64."""
  k0 = jnp.asarray(gens.layer_kernel(gen, LAYER), jnp.float64)
  delta = memedit.kernel_delta(lam, jnp.asarray(D, jnp.float64), k0.shape, "conv")
  return jnp.concatenate([jnp.reshape(f(k0 + delta, k), (-1,)) for f, k in crops])


@pytest.fixture(scope="module")
def linearised(problem):
  """The crops' stacked outputs g0 at Λ = 0 and their Jacobian J over Λ's own-tap entries,
  in float64 (exact: up2 is affine in its kernel); computed once for the module, since the
  float64 convolutions are the slowest part of these tests."""
  gen, D, target, kept = problem
  with jax.enable_x64(True):
    crops = [gens.crop_problem(gen, LAYER, t) for t in (target, kept)]
    k0 = gens.layer_kernel(gen, LAYER)
    shape = lambda_shape(k0.shape, D.shape[0], "conv")
    own = np.broadcast_to(gens.own_taps(gen, LAYER)[:, :, None, None], shape)
    free = np.flatnonzero(own)

    def g(x):
      lam = jnp.zeros(shape, jnp.float64).reshape(-1).at[free].set(x).reshape(shape)
      return _stacked64(gen, D, crops, lam)

    # One program for both, compiled with the backend's optimisations (the test run skips
    # them, see tests/conftest.py): the Jacobian's 256 float64 convolutions then run in
    # seconds rather than half a minute.
    x0 = jnp.zeros(free.size, jnp.float64)
    both = jax.jit(lambda x: (g(x), jax.jacfwd(g)(x))).lower(x0).compile(
        compiler_options={"xla_backend_optimization_level": 2})
    g0, J = both(x0)
    return np.asarray(g0), np.asarray(J), free


@pytest.mark.parametrize("project_keys,given", [(True, False), (False, False),
                                                (True, True)])
def test_preserving_insert_solves_the_weighted_objective_in_closed_form(problem, linearised,
                                                                        project_keys, given):
  # up2 is affine in its kernel, so with the L2 loss Λ minimises a weighted least-squares
  # problem: Σ_crop (f − v*)² + μ (n / n₁) Σ_kept (f₁ − u₁)², over Λ on the own taps,
  # with u₁ = f₁(W0) or (given) values passed with the kept crop.
  gen, D, target, kept = problem
  mu = 3.0
  f1, k1 = gens.crop_problem(gen, LAYER, kept)
  u1 = np.asarray(f1(jnp.asarray(gens.layer_kernel(gen, LAYER)), k1))
  if given:
    u1 = u1 + 0.1 * np.random.default_rng(3).standard_normal(u1.shape).astype(np.float32)
  res = gens.insert(gen, LAYER, D, target, optimizer="gauss_newton", loss="l2", steps=8,
                    taps="own", preserve=[(kept, u1) if given else kept],
                    preserve_weight=mu, project_keys=project_keys)
  g0, J, free = linearised
  n, n1 = target.targets.size, kept.targets.size
  t = np.concatenate([np.asarray(target.targets, np.float64).reshape(-1),
                      np.asarray(u1, np.float64).reshape(-1)])
  if not given:
    np.testing.assert_allclose(t[n:], g0[n:], atol=1e-5)
  w = np.concatenate([np.ones(n), np.full(n1, mu * n / n1)])
  x_star = np.linalg.solve(J.T @ (w[:, None] * J), J.T @ (w * (t - g0)))

  def objective(x):
    r = J @ x + g0 - t
    return float(np.sum(w * r * r) / np.sum(w))

  x_res = np.asarray(res.edit.lam, np.float64).reshape(-1)
  assert np.abs(np.delete(x_res, free)).max() == 0  # zero off the own taps
  x_res = x_res[free]
  assert objective(x_res) <= objective(x_star) * (1 + 1e-4)
  assert np.linalg.norm(x_res - x_star) <= 1e-2 * np.linalg.norm(x_star)
  assert res.edit.settings["preserved_crops"] == 1
  assert res.edit.settings["preserve_weight"] == mu


def test_preserving_insert_moves_the_kept_crop_less_and_its_own_loss_is_reported(problem):
  gen, D, target, kept = problem
  f1, k1 = gens.crop_problem(gen, LAYER, kept)
  k0 = jnp.asarray(gens.layer_kernel(gen, LAYER))
  kw = dict(optimizer="gauss_newton", loss="l2", steps=8, taps="own")
  plain = gens.insert(gen, LAYER, D, target, **kw)
  keep = gens.insert(gen, LAYER, D, target, preserve=(kept,), preserve_weight=10.0, **kw)

  def moved(edit):
    out = f1(k0 + memedit.edit_delta(edit, k0.shape), k1)
    return float(jnp.linalg.norm(out - f1(k0, k1)))

  assert moved(keep.edit) < 0.5 * moved(plain.edit)
  # loss_before / loss_after are the edit's own crop's L1, with or without kept crops.
  assert keep.loss_before == plain.loss_before
  assert plain.loss_after <= keep.loss_after < keep.loss_before
  assert "preserved_crops" not in plain.edit.settings


def test_preserve_arguments_are_checked(problem):
  gen, D, target, kept = problem
  call = lambda **kw: gens.insert(gen, LAYER, D, target, steps=1, **kw)
  with pytest.raises(TypeError, match="preserve: expected a sequence of Targets"):
    call(preserve=kept)
  with pytest.raises(TypeError, match=r"preserve\[1\]: expected a Target .*got dict"):
    call(preserve=[kept, {}])
  with pytest.raises(ValueError, match=r"preserve\[0\]: expected keys of shape \(1, h, w, "):
    call(preserve=[kept._replace(keys=np.zeros((1, 4, 4, 3), np.float32))])
  for bad in (0.0, -1.0, float("nan"), float("inf"), True, "1"):
    with pytest.raises(ValueError, match="preserve_weight: expected a finite number > 0"):
      call(preserve=[kept], preserve_weight=bad)
  # A Target records its layer: one made at another layer is refused even when that layer
  # has the same crop geometry, as the edit's own target and as a kept crop.
  assert target.layer == kept.layer == LAYER
  other = kept._replace(layer="up1")
  with pytest.raises(ValueError, match=r"preserve\[1\]: expected a crop of layer 'up2' \(the "
                                       r"layer edited\), got a Target made at layer 'up1'"):
    call(preserve=[kept, other])
  with pytest.raises(ValueError, match=r"^target: expected a crop of layer 'up2'"):
    gens.insert(gen, LAYER, D, target._replace(layer="up1"), steps=1)
  with pytest.raises(ValueError, match=r"^target: expected a crop of layer 'up2'"):
    gens.overfit(gen, LAYER, target._replace(layer="up1"), steps=1)
  # Targets made by hand, without a layer, are taken as they are.
  assert np.isfinite(call(preserve=[kept._replace(layer=None)]).edit.lam).all()


def test_kept_crops_are_crops_of_the_layer_with_finite_outputs_and_weights_float32_holds(
    problem):
  # Only a kept crop's keys and extra arguments are used, but its output is cut to its
  # targets' size: keys and targets of another crop geometry (an edited Target, or keys
  # of two images) were folded as a smaller crop without a word; NaN keys failed in the
  # solve naming neither the crop nor the keys; and a finite μ whose weights (or their
  # total, the loss's divisor) overflow float32 failed on "weights" the caller never
  # passed, or (total only) left a zero loss and Λ = 0.
  gen, D, target, kept = problem
  call = lambda **kw: gens.insert(gen, LAYER, D, target, steps=1, **kw)
  geometry = r"preserve\[1\]: expected a crop of layer 'up2': keys \(1, h \+ 6, w \+ 6, 32\)"
  for bad in (kept._replace(targets=kept.targets[:, :4, :4]),
              kept._replace(keys=kept.keys[:, :5, :5]),
              kept._replace(keys=np.concatenate([kept.keys, kept.keys]))):
    with pytest.raises(ValueError, match=geometry):
      call(preserve=[kept, bad])
  with pytest.raises(ValueError, match=r"preserve\[0\]: expected finite layer outputs"):
    call(preserve=[kept._replace(keys=np.full_like(kept.keys, np.nan))])
  # Values given with a kept crop: its targets' shape, float, finite.
  small = kept.targets[:, :2, :2]
  with pytest.raises(ValueError, match=re.escape(
      f"preserve[0]: expected values of shape {tuple(kept.targets.shape)} (float) to keep "
      f"on the crop, got float32 {tuple(small.shape)}")):
    call(preserve=[(kept, small)])
  with pytest.raises(ValueError, match=r"preserve\[0\]: expected values of shape .* got int64"):
    call(preserve=[(kept, np.zeros(kept.targets.shape, np.int64))])
  with pytest.raises(ValueError, match=r"preserve\[0\]: expected finite values, got NaN"):
    call(preserve=[(kept, np.full_like(kept.targets, np.nan))])
  with pytest.raises(TypeError, match=r"preserve\[0\]: expected a Target .* or a pair "
                                      r"\(Target, values\), got tuple"):
    call(preserve=[(kept.targets, kept)])
  n, n1 = target.targets.size, kept.targets.size
  big = float(np.finfo(np.float32).max)
  for mu in (1e37, 1.5 * big / n):  # the weights overflow; their total only
    with pytest.raises(ValueError, match="preserve_weight: expected a μ whose weights "
                                         "float32 holds"):
      call(preserve=[kept], preserve_weight=mu)
  # The largest μ whose total weight float32 holds still solves, and holds the crop.
  mu = 0.25 * big / n
  res = call(preserve=[kept], preserve_weight=mu, optimizer="gauss_newton", loss="l2",
             taps="own")
  assert np.isfinite(res.edit.lam).all() and np.isfinite(res.losses).all()
  assert res.edit.settings["preserve_weight"] == mu
  f1, k1 = gens.crop_problem(gen, LAYER, kept)
  k0 = jnp.asarray(gens.layer_kernel(gen, LAYER))
  out = f1(k0 + memedit.edit_delta(res.edit, k0.shape), k1)
  assert float(jnp.abs(out - f1(k0, k1)).max()) <= 1e-4
  assert res.loss_after <= res.loss_before * (1 + 1e-6)
