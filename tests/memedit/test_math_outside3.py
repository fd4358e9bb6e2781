"""Numbers a user brings to the math API, checked against float64 numpy: wide integer
keys, keys far from zero, complex keys, float64 under jax_enable_x64, and the core
functions inside the user's own vmap, grad, jit (with donated buffers) and lax.scan."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import enable_x64
from jax.test_util import check_grads

import memedit


def rel(a, ref) -> float:
  a, ref = np.asarray(a, np.float64), np.asarray(ref, np.float64)
  return float(np.abs(a - ref).max() / np.abs(ref).max())


def closed_form_ref(W, C, K, V):
  """ΔW of the exact insert in float64: Rᵀ (K C⁻¹ Kᵀ)⁻¹ K C⁻¹."""
  W, C, K, V = (np.asarray(a, np.float64) for a in (W, C, K, V))
  ck = np.linalg.solve(C, K.T)
  return (V - K @ W.T).T @ np.linalg.solve(K @ ck, ck.T)


def problem(seed=0, d=5, out=3, n=2):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((60, d))
  return x.T @ x / 60, rng.standard_normal((out, d)), rng.standard_normal((n, d)), \
      rng.standard_normal((n, out))


def test_wide_integer_keys_are_folded_without_wrapping_when_x64_is_off():
  # Without x64 JAX holds int64 as int32: 2³¹ + 5 became −2³¹ + 5 and 2³³ became 0, and
  # C was that of the wrapped numbers (C[1, 1] 5e-1 against 3.7e19), with no warning.
  keys = np.array([[2**31 + 5, 1], [3, 2**33], [-7, 2**32 + 9]], np.int64)
  k = keys.astype(np.float64)
  ref = k.T @ k / 3
  with enable_x64(False):
    st = memedit.covariance_update(memedit.covariance_init(2), keys)
    assert rel(memedit.second_moment(st), ref) < 1e-6
    # The stream folds its raw host batches the same way; weights too may be int64.
    st = memedit.stream_covariance([keys, keys[:2]], progress=False)
    assert rel(memedit.second_moment(st), (k.T @ k + k[:2].T @ k[:2]) / 5) < 1e-6
    u = np.array([[2**32 + 1], [2**40]], np.uint64)
    w = np.array([1, 2**33], np.int64)
    st = memedit.covariance_update(memedit.covariance_init(1), u, w)
    uf, wf = u.astype(np.float64), w.astype(np.float64)
    assert rel(memedit.second_moment(st), (wf * uf[:, 0]) @ uf / wf.sum()) < 1e-6
    assert memedit.second_moment(st).dtype == jnp.float32
    # Small integer keys, as before: exact.
    small = np.arange(12, dtype=np.int64).reshape(4, 3)
    st = memedit.covariance_update(memedit.covariance_init(3), small)
    np.testing.assert_array_equal(memedit.second_moment(st), small.T @ small / 4)


def test_solve_lambda_refuses_complex_keys_and_complex_outputs_by_name():
  # Complex keys reached jax.grad and failed there with a TypeError about holomorphic
  # differentiation.
  K0, D = np.eye(3, 2, dtype=np.float32), np.eye(3, dtype=np.float32)[:1]
  keys, targets = np.ones((2, 3), np.float32), np.ones((2, 2), np.float32)
  f = lambda K, k: k @ K
  with pytest.raises(ValueError, match=r"^keys: expected real numbers .* complex64"):
    memedit.solve_lambda(f, K0, D, keys.astype(np.complex64), targets, steps=2)
  with pytest.raises(ValueError, match=r"^keys: expected real numbers .* complex64"):
    memedit.solve_lambda(lambda K, k: k[0] @ K, K0, D, (keys, np.ones(2, np.complex64)),
                         targets, steps=2)
  with pytest.raises(ValueError, match=r"^f: expected real outputs .* complex64"):
    memedit.solve_lambda(lambda K, k: (k @ K).astype(jnp.complex64), K0, D, keys, targets,
                         steps=2)
  # A pytree of real keys still solves: k K0 = 1, k Dᵀ = 1, so Λ = 1 reaches 2.
  res = memedit.solve_lambda(lambda K, k: k[0] @ K + k[1], K0, D, (keys, np.zeros(2)),
                             2 * targets, loss="l2", optimizer="gauss_newton", steps=5)
  np.testing.assert_allclose(res.lam, [[1.0], [1.0]], atol=1e-5)


def test_float64_under_x64_statistics_directions_and_inserts_match_numpy():
  C, W, K, V = problem(1)
  rng = np.random.default_rng(2)
  keys = rng.standard_normal((50, 5)) * 0.1 + 3.0
  with enable_x64():
    st = memedit.covariance_update(memedit.covariance_init(5), keys)
    C1 = memedit.second_moment(st)
    assert C1.dtype == jnp.float64 and rel(C1, keys.T @ keys / 50) < 1e-14
    D = memedit.context_directions(C, K, rank=2).D
    assert D.dtype == jnp.float64
    # D spans C⁻¹ Kᵀ with orthonormal rows (projector check, float64 reference).
    q = np.linalg.qr(np.linalg.solve(C, K.T))[0]
    assert np.abs(np.asarray(D).T @ np.asarray(D) - q @ q.T).max() < 1e-12
    sol = memedit.insert_closed_form(W, C, K, V)
    assert sol.lam.dtype == sol.D.dtype == jnp.float64
    assert rel(sol.lam @ sol.D, closed_form_ref(W, C, K, V)) < 1e-12
    # Float32 inputs keep float32 results under x64.
    sol32 = memedit.insert_closed_form(*(np.float32(a) for a in (W, C, K, V)))
    assert sol32.lam.dtype == jnp.float32
    assert rel(sol32.lam @ sol32.D, closed_form_ref(W, C, K, V)) < 1e-4


def test_keys_far_from_zero_keep_float32_accuracy_of_the_centered_statistics():
  # Mean 1e4, spread 1: E[kkᵀ] − μμᵀ in float32 cancels all of Σ; the shifted fold keeps
  # Σ to float32 accuracy (compared with the float64 statistics of the same float32 keys).
  rng = np.random.default_rng(3)
  keys = (1e4 + rng.standard_normal((3000, 4))).astype(np.float32)
  k = keys.astype(np.float64)
  st = memedit.covariance_init(4)
  for i in range(0, 3000, 1000):  # the first batch fixes the shift; later ones drift
    st = memedit.covariance_update(st, keys[i:i + 1000] + np.float32(i / 1000))
  k = np.concatenate([k[i:i + 1000] + i / 1000 for i in range(0, 3000, 1000)])
  assert rel(memedit.centered_covariance(st), np.cov(k.T, bias=True)) < 1e-5
  assert rel(memedit.second_moment(st), k.T @ k / 3000) < 1e-6


def test_inserts_composed_with_vmap_grad_jit_donation_and_scan():
  C, W, K, V = (np.float32(a) for a in problem(4))
  rng = np.random.default_rng(5)
  Kb = rng.standard_normal((3, 2, 5)).astype(np.float32)
  Vb = rng.standard_normal((3, 2, 3)).astype(np.float32)
  # vmap over a batch of inserts, each against its float64 reference.
  sol = jax.vmap(lambda k, v: memedit.insert_closed_form(W, C, k, v))(Kb, Vb)
  dW = jnp.einsum("bon,bnd->bod", sol.lam, sol.D)
  for i in range(3):
    assert rel(dW[i], closed_form_ref(W, C, Kb[i], Vb[i])) < 1e-5
  # A solve inside the user's jit, with every input buffer donated.
  go = jax.jit(lambda w, c, k, v: memedit.insert_closed_form(w, c, k, v),
               donate_argnums=(0, 1, 2, 3))
  with pytest.warns(UserWarning, match="donated"):  # shapes unlike the outputs': unused
    s = go(*(jnp.asarray(a) for a in (W, C, K, V)))
  assert rel(s.lam @ s.D, closed_form_ref(W, C, K, V)) < 1e-5
  # Statistics updated by the user's lax.scan under jit, read inside.
  batches = rng.standard_normal((4, 16, 5)).astype(np.float32) + 2.0
  def fold(batches):
    st, _ = jax.lax.scan(lambda s, b: (memedit.covariance_update(s, b), None),
                         memedit.covariance_init(5), batches)
    return memedit.second_moment(st)
  flat = batches.reshape(-1, 5).astype(np.float64)
  assert rel(jax.jit(fold)(batches), flat.T @ flat / 64) < 1e-6
  # jax.grad of the closed-form insert with respect to v*, in float64.
  with enable_x64():
    C64, W64, K64, V64 = (jnp.asarray(a) for a in problem(6))
    edit = lambda v: (lambda s: s.lam @ s.D)(memedit.insert_closed_form(W64, C64, K64, v))
    check_grads(edit, (V64,), order=2, modes=("fwd", "rev"))
    # The map v* ↦ ΔW is affine: its gradient is the reference's, exactly.
    g = jax.grad(lambda v: jnp.sum(edit(v) * W64))(V64)
    ck = np.linalg.solve(np.asarray(C64), np.asarray(K64).T)
    ref = np.linalg.solve(np.asarray(K64) @ ck, ck.T) @ np.asarray(W64).T
    assert rel(g, ref) < 1e-12
