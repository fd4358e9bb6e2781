"""Context directions and PSD solves against float64 numpy."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import enable_x64

import memedit


def random_C(rng, d, n=400, mean=1.0):
  x = rng.standard_normal((n, d)) * np.exp(rng.uniform(-1, 1, d)) + mean
  return x.T @ x / n


def span_distance(A, B):
  """Largest principal-angle sine between the row spaces of A and B."""
  qa = np.linalg.qr(np.asarray(A, np.float64).T)[0]
  qb = np.linalg.qr(np.asarray(B, np.float64).T)[0]
  return np.linalg.norm(qa - qb @ (qb.T @ qa), 2)


@pytest.mark.parametrize("method", ["zca", "svd", "mean"])
def test_single_key_gives_the_c_inverse_direction(method):
  rng = np.random.default_rng(0)
  C = random_C(rng, 12)
  k = rng.standard_normal(12) + 0.5
  ref = np.linalg.solve(C, k)
  ref /= np.linalg.norm(ref)
  ref *= np.sign(ref @ k)
  D = memedit.context_directions(C.astype(np.float32), k[None].astype(np.float32),
                                 method=method).D
  assert D.shape == (1, 12)
  np.testing.assert_allclose(np.asarray(D[0], np.float64), ref, atol=2e-5)


def test_zca_rank_r_matches_float64_reference_and_is_orthonormal():
  rng = np.random.default_rng(1)
  d, n, r = 16, 9, 3
  C = random_C(rng, d)
  K = rng.standard_normal((n, d)) + 1.0
  w = rng.uniform(0.2, 1.0, n)
  lam, U = np.linalg.eigh(C)
  whiten = U @ np.diag(lam ** -0.5) @ U.T
  _, _, vt = np.linalg.svd(w[:, None] * (K @ whiten))
  ref = vt[:r] @ whiten
  res = memedit.context_directions(C.astype(np.float32), K.astype(np.float32), w, rank=r)
  D = np.asarray(res.D, np.float64)
  np.testing.assert_allclose(D @ D.T, np.eye(r), atol=1e-5)
  assert span_distance(D, ref) < 1e-4
  mean_key = w @ K / w.sum()
  assert np.all(D @ mean_key >= 0)
  np.testing.assert_allclose(float(res.condition_number), lam[-1] / lam[0], rtol=1e-3)


def test_full_rank_subspace_is_span_of_c_inverse_keys_for_every_method():
  rng = np.random.default_rng(2)
  d, n = 10, 4
  C = random_C(rng, d)
  K = rng.standard_normal((n, d))
  ref = np.linalg.solve(C, K.T).T
  for method in ("zca", "svd"):
    D = memedit.context_directions(C.astype(np.float32), K.astype(np.float32), rank=n,
                                   method=method).D
    assert span_distance(D, ref) < 1e-4, method


def test_svd_method_matches_float64_reference():
  rng = np.random.default_rng(3)
  d, n, r = 8, 6, 2
  C = random_C(rng, d)
  K = rng.standard_normal((n, d)) + 0.3
  _, _, vt = np.linalg.svd(np.linalg.solve(C, K.T).T)
  D = memedit.context_directions(C.astype(np.float32), K.astype(np.float32), rank=r,
                                 method="svd").D
  assert span_distance(D, vt[:r]) < 1e-4


def test_solve_psd_floor_and_ridge():
  rng = np.random.default_rng(4)
  C = random_C(rng, 7)
  b = rng.standard_normal((7, 3))
  x = memedit.solve_psd(C.astype(np.float32), b.astype(np.float32))
  np.testing.assert_allclose(np.asarray(x), np.linalg.solve(C, b), rtol=1e-4, atol=1e-5)
  xr = memedit.solve_psd(C.astype(np.float32), b.astype(np.float32), ridge=0.5)
  np.testing.assert_allclose(np.asarray(xr), np.linalg.solve(C + 0.5 * np.eye(7), b),
                             rtol=1e-4, atol=1e-5)
  # A singular C is solved on its floored spectrum: finite, and exact on its range.
  S = np.diag([4.0, 1.0, 0.0]).astype(np.float32)
  y = np.asarray(memedit.solve_psd(S, np.array([4.0, 1.0, 0.0], np.float32)))
  np.testing.assert_allclose(y, [1.0, 1.0, 0.0], atol=1e-6)
  assert np.isinf(float(memedit.context_directions(S, np.ones((1, 3), np.float32)).condition_number))


def test_eager_and_jit_agree_and_no_retrace():
  rng = np.random.default_rng(5)
  C = random_C(rng, 6).astype(np.float32)
  K = rng.standard_normal((3, 6)).astype(np.float32)
  eager = memedit.context_directions(C, K, rank=2).D
  jitted = jax.jit(lambda c, k: memedit.context_directions(c, k, rank=2).D)(C, K)
  np.testing.assert_allclose(eager, jitted, atol=1e-6)
  from memedit import directions as dmod
  before = dmod._directions._cache_size()
  for _ in range(3):
    memedit.context_directions(C, K + rng.standard_normal(K.shape).astype(np.float32), rank=2)
  assert dmod._directions._cache_size() == before


def test_bad_input():
  C = np.eye(4, dtype=np.float32)
  K = np.ones((2, 4), np.float32)
  with pytest.raises(ValueError, match=r"keys: expected shape \(\.\.\., 4\).*got \(2, 3\)"):
    memedit.context_directions(C, np.ones((2, 3), np.float32))
  with pytest.raises(ValueError, match=r"rank: expected at most the number of context keys \(2\), got 3"):
    memedit.context_directions(C, K, rank=3)
  with pytest.raises(ValueError, match=r"rank: expected at most the key dimension \(4\), got 5"):
    memedit.context_directions(C, np.ones((6, 4), np.float32), rank=5)
  bad = K.copy()
  bad[0, 0] = np.inf
  with pytest.raises(ValueError, match="keys: expected finite values"):
    memedit.context_directions(C, bad)
  with pytest.raises(ValueError, match="positive semi-definite.*smallest eigenvalue -1"):
    memedit.context_directions(np.diag([1.0, -1.0, 1.0, 1.0]).astype(np.float32), K)
  with pytest.raises(ValueError, match=r"C: expected a square matrix of shape \(4, 4\), got \(4, 3\)"):
    memedit.context_directions(np.ones((4, 3), np.float32), K)
  with pytest.raises(ValueError, match="method: expected one of"):
    memedit.context_directions(C, K, method="pca")
  with pytest.raises(ValueError, match="rank: method 'mean' gives rank 1"):
    memedit.context_directions(C, K, rank=2, method="mean")
  with pytest.raises(ValueError, match=r"positive weight \(1\), got 2"):
    memedit.context_directions(C, K, np.array([1.0, 0.0]), rank=2)


def _rotated(rng, d, kappa):
  """A float32 SPD matrix with eigenvalues log-spaced from 1 down to 1/kappa."""
  U = np.linalg.qr(rng.standard_normal((d, d)))[0]
  lam = np.logspace(0, -np.log10(kappa), d)
  return ((U * lam) @ U.T).astype(np.float32)


@pytest.mark.parametrize("method", ["zca", "svd"])
def test_rank_beyond_the_span_of_the_keys_is_refused(method):
  rng = np.random.default_rng(20)
  C = random_C(rng, 8).astype(np.float32)
  K = rng.standard_normal((4, 8)).astype(np.float32)
  K[2] = K[0] + K[1]
  K[3] = 2.0 * K[0]  # four keys, two independent directions
  D = memedit.context_directions(C, K, rank=2, method=method).D
  ref = np.linalg.solve(C.astype(np.float64), K[:2].T.astype(np.float64)).T
  assert span_distance(D, ref) < 1e-4
  with pytest.raises(ValueError, match=r"rank: expected at most the number of independent "
                                       r"directions among the weighted context keys \(2\), got 3"):
    memedit.context_directions(C, K, rank=3, method=method)
  # Zero weights take keys out of the count.
  with pytest.raises(ValueError, match=r"independent directions .* \(1\), got 2"):
    memedit.context_directions(C, K, np.array([1.0, 0.0, 0.0, 1.0]), rank=2, method=method)
  # Under jit nothing can be raised: the directions are NaN.
  fn = jax.jit(lambda c, k: memedit.context_directions(c, k, rank=3, method=method).D)
  assert np.isnan(np.asarray(fn(C, K))).all()
  ok = jax.jit(lambda c, k: memedit.context_directions(c, k, rank=2, method=method).D)
  np.testing.assert_allclose(ok(C, K), D, atol=1e-5)


def test_mean_of_cancelling_keys_is_refused():
  C = np.eye(3, dtype=np.float32)
  K = np.array([[1.0, 2.0, 0.0], [-1.0, -2.0, 0.0]], np.float32)
  with pytest.raises(ValueError, match="keys: expected weighted context keys whose C⁻¹ "
                                       "directions do not cancel"):
    memedit.context_directions(C, K, method="mean")
  fn = jax.jit(lambda c, k: memedit.context_directions(c, k, method="mean").D)
  assert np.isnan(np.asarray(fn(C, K))).all()


@pytest.mark.parametrize("kappa", [1e2, 1e4, 1e6])
def test_solve_psd_is_accurate_to_the_condition_number(kappa):
  # Float32 solves against float64 numpy on the same (float32) matrix: the error stays
  # well inside κ·ε (the eigendecomposition route reached 0.3–1.8 κ·ε here). The floor
  # (rcond 1e-8) sits above these condition numbers, so it must not act.
  rng = np.random.default_rng(int(np.log10(kappa)))
  eps = np.finfo(np.float32).eps
  for _ in range(3):
    C = _rotated(rng, 64, kappa)
    b = rng.standard_normal((64, 3)).astype(np.float32)
    ref = np.linalg.solve(C.astype(np.float64), b.astype(np.float64))
    x = memedit.solve_psd(C, b, rcond=1e-8)
    assert x.dtype == jnp.float32
    err = np.linalg.norm(np.asarray(x, np.float64) - ref) / np.linalg.norm(ref)
    assert err <= 0.25 * kappa * eps, (err, kappa * eps)
    xj = jax.jit(lambda c, v: memedit.solve_psd(c, v, rcond=1e-8))(C, b)
    np.testing.assert_allclose(xj, x, rtol=1e-6, atol=1e-6 * np.abs(np.asarray(x)).max())


def test_solve_psd_floors_an_ill_conditioned_c():
  # Past 1 / rcond the eigenvalue floor acts: the solve equals the float64 solve with
  # C's eigenvalues raised to rcond · λ_max.
  rng = np.random.default_rng(21)
  U = np.linalg.qr(rng.standard_normal((16, 16)))[0]
  lam = np.logspace(0, -9, 16)
  C = (U * lam) @ U.T
  b = rng.standard_normal(16)
  x = memedit.solve_psd(C.astype(np.float32), b.astype(np.float32), rcond=1e-3)
  ref = U @ ((U.T @ b) / np.maximum(lam, 1e-3))
  assert rel_err(x, ref) <= 1e-4


def rel_err(a, b):
  a = np.asarray(a, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_float64_inputs_stay_float64_under_x64():
  rng = np.random.default_rng(22)
  C = random_C(rng, 10)
  K = rng.standard_normal((3, 10))
  b = rng.standard_normal((10, 2))
  with enable_x64():
    x = memedit.solve_psd(C, b)
    assert x.dtype == jnp.float64
    assert rel_err(x, np.linalg.solve(C, b)) <= 1e-12
    res = memedit.context_directions(C, K, rank=2, method="svd")
    assert res.D.dtype == jnp.float64
    ref = np.linalg.svd(np.linalg.solve(C, K.T).T)[2][:2]
    assert span_distance(res.D, ref) <= 1e-10
    # Float32 inputs keep float32.
    assert memedit.solve_psd(C.astype(np.float32), b.astype(np.float32)).dtype == jnp.float32


def test_zero_or_nonfinite_c_is_refused():
  K = np.ones((2, 3), np.float32)
  Z = np.zeros((3, 3), np.float32)
  with pytest.raises(ValueError, match="C: expected a matrix with a positive eigenvalue"):
    memedit.context_directions(Z, K)
  with pytest.raises(ValueError, match="C: expected a matrix with a positive eigenvalue"):
    memedit.solve_psd(Z, np.ones(3, np.float32))
  bad = np.eye(3, dtype=np.float32)
  bad[1, 1] = np.nan
  directions = jax.jit(lambda c, k: memedit.context_directions(c, k).D)
  solve = jax.jit(memedit.solve_psd)
  for c in (Z, bad):
    assert np.isnan(np.asarray(directions(c, K))).all()
    assert np.isnan(np.asarray(solve(c, np.ones(3, np.float32)))).all()
  # A ridge does not make an all-zero C acceptable.
  ridged = jax.jit(lambda c, v: memedit.solve_psd(c, v, ridge=1.0))
  assert np.isnan(np.asarray(ridged(Z, np.ones(3, np.float32)))).all()


def test_weights_align_with_leading_axes_and_scale_the_keys():
  rng = np.random.default_rng(23)
  C = random_C(rng, 6).astype(np.float32)
  keys = rng.standard_normal((5, 5, 5, 6)).astype(np.float32) + 0.5
  per_image = np.array([0.0, 1.0, 0.0, 0.25, 0.0], np.float32)
  lam, U = np.linalg.eigh(C.astype(np.float64))
  whiten = (U * lam ** -0.5) @ U.T
  k = keys.reshape(-1, 6).astype(np.float64)
  w = np.repeat(per_image, 25).astype(np.float64)
  # The reference implementation scales each whitened key by its weight.
  ref = np.linalg.svd(w[:, None] * (k @ whiten))[2][:2] @ whiten
  for weights in (per_image, per_image[:, None, None]):
    D = memedit.context_directions(C, keys, weights, rank=2).D
    assert span_distance(D, ref) < 1e-4
    svd = memedit.context_directions(C, keys, weights, rank=2, method="svd").D
    assert span_distance(svd, np.linalg.svd(w[:, None] * np.linalg.solve(C, k.T).T)[2][:2]) < 1e-4
  with pytest.raises(ValueError, match=r"weights: expected a shape that broadcasts to a "
                                       r"leading part of the keys' leading shape \(2, 5\)"):
    memedit.context_directions(C, keys[:2, 0], np.ones(5, np.float32))


def test_negative_weights_under_jit_give_nan_directions():
  C = np.eye(3, dtype=np.float32)
  K = np.eye(3, dtype=np.float32)[:2] + 0.1
  w = np.array([1.0, -1.0], np.float32)
  with pytest.raises(ValueError, match="weights: expected non-negative weights"):
    memedit.context_directions(C, K, w)
  fn = jax.jit(lambda c, k, w: memedit.context_directions(c, k, w).D)
  assert np.isnan(np.asarray(fn(C, K, w))).all()
  assert np.isfinite(np.asarray(fn(C, K, np.abs(w)))).all()


def test_ridge_is_added_to_c_and_may_be_a_jax_scalar():
  rng = np.random.default_rng(24)
  C = random_C(rng, 5)
  K = rng.standard_normal((2, 5))
  b = rng.standard_normal(5)
  ridge = jnp.float32(0.3)
  x = memedit.solve_psd(C.astype(np.float32), b.astype(np.float32), ridge=ridge)
  assert rel_err(x, np.linalg.solve(C + 0.3 * np.eye(5), b)) <= 1e-5
  a = memedit.context_directions(C.astype(np.float32), K.astype(np.float32), rank=2,
                                 ridge=ridge).D
  b2 = memedit.context_directions((C + 0.3 * np.eye(5)).astype(np.float32),
                                  K.astype(np.float32), rank=2).D
  np.testing.assert_allclose(a, b2, atol=1e-5)
  with pytest.raises(ValueError, match="ridge: expected a number ≥ 0"):
    memedit.solve_psd(C.astype(np.float32), b.astype(np.float32), ridge=-1.0)
