"""Edits one after another on a generator, tried from outside: kept crops (``preserve``) on
a per-pixel Dense and a transposed convolution against the float64 closed form of the
documented objective, the arguments of ``preserve``, a log of generator edits reverted,
replayed, saved and loaded bit for bit, its interference matrix against float64, and the
programs a second edit of the same shapes compiles."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from compilations import Compilations
from flax import nnx

import memedit
from memedit import generators as gens
from memedit import sequential as sq
from memedit.layouts import lambda_shape

RES = 8


class PixelGenerator(nnx.Module):
  """z (N, 4) → 4×4 map → stride-2 transposed convolution (``up``, 8×8) → a Dense applied
  at every pixel (``pix``) → 1×1 conv to RGB."""

  def __init__(self, width: int = 6):
    rngs = nnx.Rngs(0)
    self.width = width
    self.fc = nnx.Linear(4, 16 * width, rngs=rngs)
    self.up = nnx.ConvTranspose(width, width, (3, 3), strides=(2, 2), rngs=rngs)
    self.pix = nnx.Linear(width, width, rngs=rngs)
    self.rgb = nnx.Conv(width, 3, (1, 1), rngs=rngs)

  def __call__(self, z):
    x = nnx.relu(self.fc(z)).reshape(z.shape[0], 4, 4, self.width)
    x = nnx.relu(self.up(x))
    return jnp.tanh(self.rgb(jnp.tanh(self.pix(x))))


def _box(y0, y1, x0, x1):
  m = np.zeros((RES, RES), np.float32)
  m[y0:y1, x0:x1] = 1.0
  return m


@pytest.fixture(scope="module")
def gen():
  return gens.Generator(PixelGenerator(), 4, RES, {"up": ("up",), "pix": ("pix",)},
                        architecture="pixel")


def _target(gen, layer, image, box, source=None):
  b = _box(*box)
  return gens.paste_target(gen, layer, gens.copy_values(gen, layer, source or image + 3, b),
                           image, b)


def _directions(gen, layer, rank, seed):
  d = gens.layer_info(gen, layer).key_dim
  q = np.linalg.qr(np.random.default_rng(seed).standard_normal((d, rank)))[0]
  return q.T.astype(np.float32)


# ----------------------------------------------------------------------------------------
# preserve: the documented objective on layers affine in their kernel


@pytest.mark.parametrize("layer,taps", [("pix", "all"), ("up", "own")])
def test_preserve_solves_the_weighted_objective_on_a_pixel_dense_and_a_transposed_conv(
    gen, layer, taps):
  # L2, Gauss–Newton: Λ minimises Σ (f − v*)² + Σ_j μ (n / n_j) Σ (f_j − u_j)², with u_1
  # the kept crop's outputs before the edit and u_2 values given with the second one.
  D = _directions(gen, layer, 2, 0)
  target = _target(gen, layer, 1, (1, 4, 1, 4))
  kept = [_target(gen, layer, 4, (4, 7, 4, 7)), _target(gen, layer, 2, (0, 2, 5, 8))]
  f2, k2 = gens.crop_problem(gen, layer, kept[1])
  k0 = jnp.asarray(gens.layer_kernel(gen, layer))
  u2 = np.asarray(f2(k0, k2)) + 0.1 * np.random.default_rng(1).standard_normal(
      kept[1].targets.shape).astype(np.float32)
  mu = 2.5
  res = gens.insert(gen, layer, D, target, optimizer="gauss_newton", loss="l2", steps=6,
                    taps=taps, preserve=[kept[0], (kept[1], u2)], preserve_weight=mu)
  info = gens.layer_info(gen, layer)
  with jax.enable_x64(True):
    crops = [gens.crop_problem(gen, layer, t) for t in [target] + kept]
    K0 = jnp.asarray(k0, jnp.float64)
    shape = lambda_shape(K0.shape, 2, info.kind)
    if taps == "own":
      free = np.flatnonzero(np.broadcast_to(gens.own_taps(gen, layer)[:, :, None, None],
                                            shape))
    else:
      free = np.arange(int(np.prod(shape)))

    def outputs(x):
      lam = jnp.zeros(shape, jnp.float64).reshape(-1).at[free].set(x).reshape(shape)
      delta = memedit.kernel_delta(lam, jnp.asarray(D, jnp.float64), K0.shape, info.kind)
      return jnp.concatenate([jnp.reshape(f(K0 + delta, k), (-1,)) for f, k in crops])

    x0 = jnp.zeros(free.size, jnp.float64)
    g0, J = (np.asarray(a) for a in jax.jit(lambda x: (outputs(x), jax.jacfwd(outputs)(x)))(x0))
  n, n1, n2 = (t.targets.size for t in [target] + kept)
  t = np.concatenate([np.asarray(target.targets, np.float64).reshape(-1), g0[n:n + n1],
                      np.asarray(u2, np.float64).reshape(-1)])
  w = np.concatenate([np.ones(n), np.full(n1, mu * n / n1), np.full(n2, mu * n / n2)])
  x_star = np.linalg.solve(J.T @ (w[:, None] * J), J.T @ (w * (t - g0)))
  lam = np.asarray(res.edit.lam, np.float64).reshape(-1)
  assert np.abs(np.delete(lam, free)).max(initial=0.0) == 0.0
  assert np.linalg.norm(lam[free] - x_star) <= 1e-4 * np.linalg.norm(x_star)
  # The loss before the first step is the documented objective at Λ = 0.
  np.testing.assert_allclose(res.losses[0], np.sum(w * (g0 - t) ** 2) / np.sum(w), rtol=1e-5)


def test_preserve_refuses_the_edits_own_crop(gen):
  # Keeping the edit's own crop at its outputs before the edit works against the edit's
  # targets on the same values: the solve settled halfway without a word (e.g. a list
  # of earlier targets that already held the new one).
  D = _directions(gen, "up", 1, 0)
  target = _target(gen, "up", 1, (1, 4, 1, 4))
  other = _target(gen, "up", 4, (4, 7, 4, 7))
  same = _target(gen, "up", 1, (1, 4, 1, 4), source=6)  # same crop, other copied values
  for kept in ([other, target], [other, same], [other, (same, np.asarray(same.targets))]):
    with pytest.raises(ValueError, match=r"preserve\[1\]: expected a crop other than the "
                                         r"edit's own, got the crop of target"):
      gens.insert(gen, "up", D, target, steps=1, preserve=kept)
  # The same box of another image is another crop.
  res = gens.insert(gen, "up", D, target, steps=1,
                    preserve=[_target(gen, "up", 2, (1, 4, 1, 4))])
  assert res.edit.settings["preserved_crops"] == 1


def test_preserve_weight_may_be_a_zero_d_array(gen):
  # A μ held as a 0-d numpy or JAX array was refused as "expected a finite number > 0".
  D = _directions(gen, "pix", 1, 0)
  target = _target(gen, "pix", 1, (1, 4, 1, 4))
  kept = [_target(gen, "pix", 4, (4, 7, 4, 7))]
  call = lambda mu: gens.insert(gen, "pix", D, target, optimizer="gauss_newton", loss="l2",
                                steps=2, preserve=kept, preserve_weight=mu)
  want = np.asarray(call(2.0).edit.lam)
  for mu in (np.array(2.0), jnp.float32(2.0), np.float16(2.0), np.int64(2)):
    res = call(mu)
    assert np.array_equal(np.asarray(res.edit.lam), want)
    assert res.edit.settings["preserve_weight"] == 2.0
    assert type(res.edit.settings["preserve_weight"]) is float
  for bad in (np.array([2.0]), np.array(True), np.array(2.0 + 0j), np.array(np.nan),
              jnp.float32(-1.0), "2"):
    with pytest.raises(ValueError, match="preserve_weight: expected a finite number > 0"):
      call(bad)


def test_sequential_directions_refuse_no_directions():
  # D with no rows failed inside numpy ("zero-size array to reduction operation").
  e = memedit.make_edit(("k",), jnp.ones((2, 1)), jnp.array([[0.0, 1.0, 0.0]]), label="a")
  log = sq.log_append(sq.log_init(), e, jnp.array([[0.0, 1.0, 0.0]]))
  C = jnp.diag(jnp.array([1.0, 1e-4, 1e-4]))
  for D in (np.zeros((0, 3), np.float32), np.zeros((2, 0), np.float32)):
    with pytest.raises(ValueError, match=r"D: expected shape \(r, d\) with r ≥ 1 directions "
                                         r"of dimension d ≥ 1, got \((0, 3|2, 0)\)"):
      sq.sequential_directions(log, C, D, ("k",))
    with pytest.raises(ValueError, match=r"D: expected shape \(r, d\) with r ≥ 1"):
      sq.project_directions(D, jnp.eye(D.shape[1]))


# ----------------------------------------------------------------------------------------
# a log of generator edits


def test_generator_log_reverts_replays_and_loads_bit_exactly_with_float64_interference(
    gen, tmp_path):
  layer = "up"
  info = gens.layer_info(gen, layer)
  m = info.margin
  base = gen.params
  z = gens.reference_latents([0, 1, 2], 4)
  log, cur, kept, counts = sq.log_init(), gen, [], []
  for e, box in enumerate([(1, 4, 1, 4), (4, 7, 4, 7), (0, 3, 4, 7), (4, 7, 0, 3)]):
    with Compilations() as c:
      target = _target(cur, layer, e % 3, box)
      res = gens.insert(cur, layer, _directions(gen, layer, 1, e), target,
                        optimizer="gauss_newton", loss="l2", steps=2, taps="own",
                        preserve=kept[-1:], preserve_weight=1.0)
    counts.append(c.count)
    keys = target.keys[0, m:-m, m:-m].reshape(-1, info.key_dim)
    log = sq.log_append(log, res.edit, keys, target.targets,
                        weights=np.linspace(0.5, 2.0, len(keys)))
    cur = gen.with_params(sq.log_apply(base, log))
    kept.append(target)
  # The third and fourth edits have the shapes of the second: nothing new to compile.
  assert counts[2] == counts[3] == 0, counts
  images = lambda params: np.asarray(gens.generate_images(gen.with_params(params), z))
  every = images(sq.log_apply(base, log))
  reverted = sq.log_revert(log, 1)
  without = sq.log_init()
  for i in (0, 2, 3):
    en = log.entries[i]
    without = sq.log_append(without, en.edit, en.keys, en.values, weights=en.weights)
  assert np.array_equal(images(sq.log_apply(base, reverted)),
                        images(sq.log_apply(base, without)))
  path = sq.save_log(tmp_path / "log.npz", reverted)
  loaded = sq.load_log(path)
  assert [en.active for en in loaded.entries] == [True, False, True, True]
  assert np.array_equal(images(sq.log_apply(base, sq.log_replay(loaded, 1))), every)
  for i in range(len(log)):
    loaded = sq.log_revert(loaded, i) if loaded.entries[i].active else loaded
  assert np.array_equal(images(sq.log_apply(base, loaded)), images(base))
  # I[i, j] = ‖ΔM_j K_i‖_w / ‖ΔM_i K_i‖_w, each ΔK_j from its factors in float64, the
  # change at a key summed over every tap of the transposed convolution.
  deltas = [np.asarray(memedit.edit_delta(en.edit, info.kernel_shape), np.float64)
            for en in log.entries]

  def change(i, j):
    en = log.entries[i]
    out = np.einsum("nc,hwco->nhwo", np.asarray(en.keys, np.float64), deltas[j])
    return np.sqrt(np.sum(np.asarray(en.weights, np.float64) * np.sum(
        out.reshape(len(out), -1) ** 2, axis=1)))

  want = np.array([[change(i, j) / change(i, i) for j in range(4)] for i in range(4)])
  got = sq.interference_matrix(log).matrix
  np.testing.assert_allclose(got, want, rtol=1e-6)
  table = sq.format_log(log, params=base)
  assert f"{want[0, 1]:.3f}" in table and f"{want[3, 2]:.3f}" in table


def test_check_edit_refuses_an_edit_already_active_in_the_log(gen):
  # Checked after log_append (an easy slip), an edit was counted twice without a word: an
  # interference of 1 with itself and the norms of applying it a second time.
  layer = "pix"
  info = gens.layer_info(gen, layer)
  base = gen.params
  log = sq.log_init()
  checks = []
  for e, box in enumerate([(1, 4, 1, 4), (4, 7, 4, 7)]):
    target = _target(gen, layer, e, box)
    res = gens.insert(gen, layer, _directions(gen, layer, 1, e), target,
                      optimizer="gauss_newton", loss="l2", steps=2)
    checks.append(sq.check_edit(log, res.edit, params=base, warn=False))
    log = sq.log_append(log, res.edit, target.keys[0, 1:-1, 1:-1].reshape(-1, info.key_dim))
  edit = log.entries[1].edit
  with pytest.raises(ValueError, match=r"edit: expected an edit not yet active in the log .*"
                                       rf"got '{edit.name}', active entry 1; .*"
                                       r"log_revert\(log, 1\)"):
    sq.check_edit(log, edit, params=base)
  # Reverted, it is checked as before it was appended (e.g. before a replay).
  again = sq.check_edit(sq.log_revert(log, 1), edit, params=base, warn=False)
  assert np.array_equal(again.interference, checks[1].interference)
  assert again.norm == checks[1].norm and again.condition == checks[1].condition
