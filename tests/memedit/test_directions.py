"""Context directions and PSD solves against float64 numpy."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

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
                                 method=method).directions
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
  _, _, vt = np.linalg.svd(np.sqrt(w)[:, None] * (K @ whiten))
  ref = vt[:r] @ whiten
  res = memedit.context_directions(C.astype(np.float32), K.astype(np.float32), w, rank=r)
  D = np.asarray(res.directions, np.float64)
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
                                   method=method).directions
    assert span_distance(D, ref) < 1e-4, method


def test_svd_method_matches_float64_reference():
  rng = np.random.default_rng(3)
  d, n, r = 8, 6, 2
  C = random_C(rng, d)
  K = rng.standard_normal((n, d)) + 0.3
  _, _, vt = np.linalg.svd(np.linalg.solve(C, K.T).T)
  D = memedit.context_directions(C.astype(np.float32), K.astype(np.float32), rank=r,
                                 method="svd").directions
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
  eager = memedit.context_directions(C, K, rank=2).directions
  jitted = jax.jit(lambda c, k: memedit.context_directions(c, k, rank=2).directions)(C, K)
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
