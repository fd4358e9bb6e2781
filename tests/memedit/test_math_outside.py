"""The update math checked from outside against float64 numpy: scale, rank deficiency,
dtypes and argument errors of the closed forms, directions and PSD solves."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import enable_x64

import memedit


def random_C(rng, d, n=40):
  x = rng.standard_normal((n, d)) * np.exp(rng.uniform(-1, 1, d))
  return x.T @ x / n


def f32(*xs):
  return tuple(np.asarray(x, np.float32) for x in xs)


def test_floor_is_relative_to_the_scale_of_c():
  # Keys of scale 1e-16 give C of scale 1e-32 (normal in float32): the eigenvalue floor
  # must scale with C, so directions, soft inserts and solves are those of the unscaled
  # problem (an absolute 1e-30 floor made C⁻¹ ∝ I here).
  rng = np.random.default_rng(0)
  C = random_C(rng, 4)
  K = rng.standard_normal((2, 4))
  W = rng.standard_normal((3, 4))
  V = rng.standard_normal((2, 3))
  s = 1e-16
  ref = np.linalg.solve(C, K[0])
  ref /= np.linalg.norm(ref)
  for method in ("zca", "svd", "mean"):
    D = memedit.context_directions(*f32(C * s * s, K[:1] * s), method=method).D
    np.testing.assert_allclose(np.asarray(D[0], np.float64), ref, atol=2e-5)
  dw = np.asarray(memedit.insert_ridge(*f32(W, C, K, V), 0.5).lam
                  @ memedit.insert_ridge(*f32(W, C, K, V), 0.5).D, np.float64)
  sol = memedit.insert_ridge(*f32(W / s, C * s * s, K * s, V), 0.5)
  np.testing.assert_allclose(np.asarray(sol.lam, np.float64) @ np.asarray(sol.D, np.float64)
                             * s, dw, rtol=1e-4, atol=1e-5)
  with enable_x64():
    # Float64, scale 1e-20 (C ~ 1e-40): the direction is scale-invariant to rounding.
    D = memedit.context_directions(C * 1e-40, K[:1] * 1e-20, rank=1).D
    np.testing.assert_allclose(np.asarray(D[0]), ref, atol=1e-12)
    lam = np.array([1e-40, 3e-45, 0.0])
    np.testing.assert_allclose(np.asarray(memedit.linalg.floor_eigenvalues(
        jnp.asarray(lam), 1e-3, 0.0)), [1e-40, 1e-43, 1e-43], rtol=1e-12)


def test_exact_insert_accepts_a_singular_c_with_the_default_floor():
  # C = U diag(3, 2, 1, −1e-5, −1e-5) Uᵀ passes the PSD check (λ_min ≥ −1e-5 λ_max); the
  # insert floors its eigenvalues at 1e-6·λ_max. The eager independence check must use
  # that floored C⁻¹, not a pseudo-inverse that inverts the −1e-5 (a negative Gram).
  rng = np.random.default_rng(1)
  U = np.linalg.qr(rng.standard_normal((5, 5)))[0]
  ev = np.array([3.0, 2.0, 1.0, -1e-5, -1e-5])
  C = (U * ev) @ U.T
  C = 0.5 * (C + C.T)
  k = rng.standard_normal((1, 5))
  W = rng.standard_normal((2, 5))
  v = rng.standard_normal((1, 2))
  sol = memedit.insert_closed_form(*f32(W, C, k, v))
  D = np.asarray(sol.D, np.float64)
  W1 = W + np.asarray(sol.lam, np.float64) @ D
  np.testing.assert_allclose(W1 @ k[0], v[0], atol=1e-4)
  lf = np.maximum(ev, 1e-6 * 3.0)
  ref = (U / lf) @ U.T @ k[0]
  np.testing.assert_allclose(D[0] / np.linalg.norm(D[0]), ref / np.linalg.norm(ref),
                             atol=1e-4)
  # Dependent keys are still refused.
  with pytest.raises(ValueError, match="keys: expected linearly independent keys"):
    memedit.insert_closed_form(*f32(W, C, np.concatenate([k, 2 * k]), np.concatenate([v, v])))


def test_least_squares_lambda_keeps_float64_and_checks_shapes():
  rng = np.random.default_rng(2)
  W = rng.standard_normal((3, 5))
  D = rng.standard_normal((2, 5))
  D[1] = D[0] + 1e-6 * rng.standard_normal(5)  # K Dᵀ with condition number ~1e6
  K = rng.standard_normal((6, 5))
  V = rng.standard_normal((6, 3))
  ref = np.linalg.lstsq(K @ D.T, V - K @ W.T, rcond=None)[0].T
  with enable_x64():
    lam = memedit.least_squares_lambda(W, D, K, V)
    assert lam.dtype == jnp.float64
    np.testing.assert_allclose(np.asarray(lam), ref, rtol=1e-8)
  assert memedit.least_squares_lambda(*f32(W, D, K, V)).dtype == jnp.float32
  for args, name in (((W, D[:, :4], K, V), "D"), ((W, D, K[:, :4], V), "keys"),
                     ((W, D, K, V[:, :2]), "values"), ((W[0], D, K, V), "W")):
    with pytest.raises(ValueError, match=f"^{name}: expected"):
      memedit.least_squares_lambda(*f32(*args))


def test_eager_calls_refuse_a_c_that_underflows_in_the_compute_dtype():
  # A float64 numpy C of scale 1e-90 passes the checks but is 0 in float32 (no x64):
  # eagerly that is a ValueError, not a silent NaN result.
  rng = np.random.default_rng(3)
  C = random_C(rng, 3) * 1e-90
  k = rng.standard_normal((1, 3))
  with pytest.raises(ValueError, match="^D: expected finite values.*compute dtype float32"):
    memedit.context_directions(C, k)
  with pytest.raises(ValueError, match="^x: expected finite values.*compute dtype float32"):
    memedit.solve_psd(C, k[0])
  with pytest.raises(ValueError, match="^b: expected finite values"):
    memedit.solve_psd(random_C(rng, 3), np.array([1.0, np.nan, 0.0]))


def test_lambda_loss_fn_refuses_a_lambda_of_the_wrong_shape():
  fn = memedit.lambda_loss_fn(lambda K, k: k @ K, np.zeros((4, 3), np.float32),
                              np.ones((1, 4), np.float32), np.ones((2, 4), np.float32),
                              np.ones((2, 3), np.float32), loss="l2")
  assert float(fn(jnp.zeros((3, 1)))) == 1.0
  with pytest.raises(ValueError, match=r"^lam: expected shape \(3, 1\).*got \(1, 3\)"):
    fn(jnp.zeros((1, 3)))


def test_covariance_checks_are_relative_at_any_scale():
  """The symmetry and PSD tests divided by max(|C|, 1e-30) and max(λ_max, 1e-30): below
  that scale an asymmetric or indefinite C passed."""
  from memedit.checks import check_covariance

  C = np.array([[1.0, 0.5], [0.0, 1.0]]) * 1e-40
  with pytest.raises(ValueError, match="C: expected a symmetric matrix, got max"):
    check_covariance(C)
  with pytest.raises(ValueError, match="C: expected a positive semi-definite matrix"):
    check_covariance(np.diag([1.0, -0.1]) * 1e-40)
  np.testing.assert_array_equal(check_covariance(np.eye(2) * 1e-40), np.eye(2) * 1e-40)
  with pytest.raises(ValueError, match="expected a matrix with a positive eigenvalue"):
    check_covariance(np.zeros((2, 2)))


def test_exact_insert_of_tiny_independent_keys():
  """Keys of scale 1e-20 against C of scale 1 give K C⁻¹ Kᵀ of scale 1e-40: independent
  keys were refused as dependent by an absolute 1e-30 floor (eagerly and in the graph)."""
  rng = np.random.default_rng(0)
  W = rng.standard_normal((2, 3))
  keys = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.5]]) * 1e-20
  values = keys @ W.T + np.array([[1.0, -1.0], [0.5, 2.0]]) * 1e-20
  with enable_x64():
    sol = memedit.insert_closed_form(W, np.eye(3), keys, values)
    W1 = W + np.asarray(sol.lam) @ np.asarray(sol.D)
    np.testing.assert_allclose(keys @ W1.T, values, rtol=1e-10, atol=0)
    # The in-graph check agrees with the eager one.
    jitted = jax.jit(memedit.insert_closed_form)(W, np.eye(3), keys, values)
    np.testing.assert_allclose(np.asarray(jitted.lam), np.asarray(sol.lam), rtol=1e-12)


def ill_conditioned_C(rng, d, cond):
  U = np.linalg.qr(rng.standard_normal((d, d)))[0]
  C = (U * np.logspace(0, -np.log10(cond), d)) @ U.T
  return np.asarray(0.5 * (C + C.T), np.float32).astype(np.float64)


def exact_insert_ref(W, C, K, V, penalty=0.0):
  """ΔW = Rᵀ (penalty·I + K C⁻¹ Kᵀ)⁻¹ K C⁻¹ and D = (C⁻¹ Kᵀ)ᵀ in float64."""
  X = np.linalg.solve(C, K.T)
  lam = np.linalg.solve(K @ X + penalty * np.eye(len(K)), V - K @ W.T).T
  return lam @ X.T, X.T


def test_exact_insert_does_not_square_the_keys_conditioning():
  """Nearly dependent keys (accepted: K C⁻¹ Kᵀ's eigenvalue ratio above 1e-6) made the
  float32 ΔW lose cond(K C⁻¹ Kᵀ)·ε ≈ 1e-2 relative: the Gram matrix was formed. Now ΔW is
  within a small multiple of (cond(K C^{-1/2}) + cond(C))·ε of float64."""
  rng = np.random.default_rng(5)
  d, n = 16, 8
  C = ill_conditioned_C(rng, d, 1e2)
  K = rng.standard_normal((n, d))
  K[1:] = K[0] + 2e-2 * K[1:]
  W, K, V = f32(rng.standard_normal((4, d)), K, rng.standard_normal((n, 4)))
  W, K, V = (x.astype(np.float64) for x in (W, K, V))
  L = np.linalg.cholesky(C)
  cond_z = np.linalg.cond(np.linalg.solve(L, K.T))
  assert 300 < cond_z < 1e3  # independent enough to be accepted, ill-conditioned
  bound = np.finfo(np.float32).eps * (cond_z + 1e2)
  for penalty in (None, 1e-6):
    ref, D_ref = exact_insert_ref(W, C, K, V, penalty or 0.0)
    sol = (memedit.insert_closed_form(*f32(W, C, K, V)) if penalty is None
           else memedit.insert_ridge(*f32(W, C, K, V), penalty))
    dW = np.asarray(sol.lam, np.float64) @ np.asarray(sol.D, np.float64)
    err = np.linalg.norm(dW - ref) / np.linalg.norm(ref)
    assert err < 10 * bound, (penalty, err, bound)
    np.testing.assert_allclose(np.asarray(sol.D, np.float64), D_ref, rtol=0,
                               atol=10 * bound * np.abs(D_ref).max())


def test_inserts_and_directions_are_accurate_to_cond_eps_at_cond_1e4():
  """C with condition number 1e4, d = 256 in float32: the eigenvector route lost several
  times κ·ε ≈ 6e-4 (2e-3 for ΔW and D); the Cholesky route stays well below it."""
  rng = np.random.default_rng(6)
  d = 256
  C = ill_conditioned_C(rng, d, 1e4)
  bound = 1e4 * np.finfo(np.float32).eps
  for n in (2,):
    W, K, V = (np.asarray(x, np.float32).astype(np.float64) for x in
               (rng.standard_normal((4, d)) / 16, rng.standard_normal((n, d)),
                rng.standard_normal((n, 4))))
    ref, D_ref = exact_insert_ref(W, C, K, V)
    sol = memedit.insert_closed_form(*f32(W, C, K, V))
    dW = np.asarray(sol.lam, np.float64) @ np.asarray(sol.D, np.float64)
    assert np.linalg.norm(dW - ref) / np.linalg.norm(ref) < bound / 2
    np.testing.assert_allclose(K @ (W + dW).T, V, atol=1e-4)
    Q = np.linalg.qr(D_ref.T)[0]
    for method in ("zca", "svd"):
      D = np.asarray(memedit.context_directions(*f32(C, K), rank=n, method=method).D,
                     np.float64)
      # Distance of D's rows from the span of C⁻¹K*ᵀ, and the sign convention.
      assert np.linalg.norm(D.T - Q @ (Q.T @ D.T), 2) < bound / 2, method
      assert (D @ K.mean(0) >= 0).all()


def test_float64_inserts_and_directions_match_numpy_on_both_routes():
  """Float64 results are the closed forms to rounding, with C well conditioned (Cholesky
  route) and singular (eigenvalues floored at rcond·λ_max)."""
  rng = np.random.default_rng(7)
  d, n = 12, 3
  U = np.linalg.qr(rng.standard_normal((d, d)))[0]
  W, K, V = rng.standard_normal((5, d)), rng.standard_normal((n, d)), rng.standard_normal((n, 5))
  for ev, rcond in ((np.logspace(0, -3, d), 1e-6), (np.r_[np.ones(d - 4), np.zeros(4)], 1e-3)):
    C = (U * ev) @ U.T
    C = 0.5 * (C + C.T)
    Cf = (U * np.maximum(ev, rcond * ev.max())) @ U.T
    for penalty in (0.0, 0.3):
      ref, D_ref = exact_insert_ref(W, Cf, K, V, penalty)
      with enable_x64():
        s = (memedit.insert_ridge(W, C, K, V, penalty, rcond=rcond) if penalty
             else memedit.insert_closed_form(W, C, K, V, rcond=rcond))
      assert s.lam.dtype == jnp.float64
      np.testing.assert_allclose(np.asarray(s.D), D_ref, rtol=1e-9, atol=1e-9 * abs(D_ref).max())
      np.testing.assert_allclose(np.asarray(s.lam) @ np.asarray(s.D), ref, rtol=1e-9,
                                 atol=1e-9 * abs(ref).max())
    Q = np.linalg.qr(D_ref.T)[0]
    with enable_x64():
      D = np.asarray(memedit.context_directions(C, K, rank=n, rcond=rcond).D)
    np.testing.assert_allclose(D @ D.T, np.eye(n), atol=1e-12)
    assert np.linalg.norm(D.T - Q @ (Q.T @ D.T)) < 1e-9


def test_soft_insert_with_more_keys_than_dimensions_and_duplicates():
  """insert_ridge accepts dependent keys (duplicates, n > d): its ΔW matches float64."""
  rng = np.random.default_rng(8)
  d, n = 5, 8
  C = random_C(rng, d)
  K = rng.standard_normal((n, d))
  K[1] = K[0]
  W, V = rng.standard_normal((3, d)), rng.standard_normal((n, 3))
  W, C, K, V = (np.asarray(x, np.float32).astype(np.float64) for x in (W, C, K, V))
  ref, _ = exact_insert_ref(W, C, K, V, 0.1)
  sol = memedit.insert_ridge(*f32(W, C, K, V), 0.1)
  dW = np.asarray(sol.lam, np.float64) @ np.asarray(sol.D, np.float64)
  # κ(K C⁻¹ Kᵀ + 0.1·I) ≈ 900: a soft insert with residuals is sensitive to κ·ε ≈ 5e-5.
  assert np.linalg.norm(dW - ref) / np.linalg.norm(ref) < 5e-5
  with pytest.raises(ValueError, match="keys: expected linearly independent keys"):
    memedit.insert_closed_form(*f32(W, C, K, V))
