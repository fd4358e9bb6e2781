"""Null-space projection: P against float64 numpy, AlphaEdit's closed form against lm.md's
formula, and projected edits (closed form and Λ solves) that leave preserved keys alone."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import enable_x64

import memedit
from memedit import sequential as sq


def subspace_data(rng, d, rank, n):
  """n keys (n, d) in a random rank-``rank`` subspace, and its basis (rank, d)."""
  basis = np.linalg.qr(rng.standard_normal((d, rank)))[0].T
  return rng.standard_normal((n, rank)) @ basis, basis


def test_null_space_matches_numpy():
  rng = np.random.default_rng(0)
  d = 12
  # C with a clear gap: 7 eigenvalues in [1, 3], 5 in [1e-5, 1e-4].
  U = np.linalg.qr(rng.standard_normal((d, d)))[0]
  lam = np.concatenate([rng.uniform(1e-5, 1e-4, 5), rng.uniform(1.0, 3.0, 7)])
  C = (U * lam) @ U.T
  keys = rng.standard_normal((2, d)) * 0.5
  w = np.array([1.0, 0.5])
  ns = sq.null_space(C.astype(np.float32), keys.astype(np.float32), w.astype(np.float32),
                     threshold=1e-2)
  M = C + keys.T @ (w[:, None] * keys)
  ev, V = np.linalg.eigh(M)
  kept = ev < 1e-2 * lam.max()
  P = V[:, kept] @ V[:, kept].T
  assert int(ns.dim) == kept.sum() == 3
  np.testing.assert_allclose(ns.P, P, atol=2e-5)
  np.testing.assert_allclose(ns.eigenvalues, ev, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(ns.P @ ns.P, ns.P, atol=2e-5)
  np.testing.assert_allclose(ns.P, ns.P.T, atol=1e-6)
  assert int(sq.null_space(C, threshold=0.0).dim) == 0
  assert int(sq.null_space(C).dim) == 5
  with pytest.raises(ValueError, match="threshold"):
    sq.null_space(C, threshold=-1.0)
  with pytest.raises(ValueError, match=r"expected shape \(m, 12\)"):
    sq.null_space(C, np.ones((2, 3)))
  with pytest.raises(ValueError, match="non-negative"):
    sq.null_space(C, keys, np.array([1.0, -1.0]))


def alphaedit_numpy(W, K1, V1, P, Kp, l2):
  """lm.md's formula with keys as columns: ΔW = R K₁ᵀ P (K_p K_pᵀ P + K₁ K₁ᵀ P + l2·I)⁻¹."""
  K1c, Kpc = K1.T, Kp.T
  R = V1.T - W @ K1c
  d = W.shape[1]
  return R @ K1c.T @ P @ np.linalg.inv(Kpc @ Kpc.T @ P + K1c @ K1c.T @ P + l2 * np.eye(d))


def test_alphaedit_closed_form_matches_the_formula():
  rng = np.random.default_rng(1)
  d, out = 10, 4
  W = rng.standard_normal((out, d))
  K1 = rng.standard_normal((3, d))
  V1 = rng.standard_normal((3, out))
  Kp = rng.standard_normal((5, d))
  Q = np.linalg.qr(rng.standard_normal((d, 6)))[0]
  P = Q @ Q.T
  for l2 in (1.0, 0.1):
    want = alphaedit_numpy(W, K1, V1, P, Kp, l2)
    f32 = lambda x: x.astype(np.float32)
    sol = sq.insert_null_space(f32(W), f32(K1), f32(V1), f32(P), f32(Kp), l2=l2)
    np.testing.assert_allclose(sol.lam @ sol.D, want, rtol=2e-4, atol=2e-5)
    assert sol.lam.shape == (out, 3) and sol.D.shape == (3, d)
    with enable_x64():
      s64 = sq.insert_null_space(W, K1, V1, P, Kp, l2=l2)
      assert s64.D.dtype == jnp.float64
      dW = np.asarray(s64.lam @ s64.D)
    np.testing.assert_allclose(dW, want, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(dW @ (np.eye(d) - P), 0.0, atol=1e-12)  # ΔW = ΔW P
  # Weighted preserved keys are K_p diag(√w).
  w = rng.uniform(0.2, 2.0, 5)
  with enable_x64():
    s = sq.insert_null_space(W, K1, V1, P, Kp, w, l2=1.0)
    np.testing.assert_allclose(s.lam @ s.D, alphaedit_numpy(W, K1, V1, P, np.sqrt(w)[:, None] * Kp,
                                                            1.0), rtol=1e-10)
  with pytest.raises(ValueError, match="l2"):
    sq.insert_null_space(W, K1, V1, P, l2=0.0)
  with pytest.raises(ValueError, match="values"):
    sq.insert_null_space(W, K1, V1[:, :2], P)


def test_sequential_projected_inserts_keep_earlier_values():
  rng = np.random.default_rng(2)
  d, out = 16, 5
  data, _ = subspace_data(rng, d, 8, 400)
  C = (data.T @ data / len(data)).astype(np.float32)   # rank 8: an 8-dim null space
  kernel0 = rng.standard_normal((d, out)).astype(np.float32)  # Dense kernel (in, out)
  params = {"k": jnp.asarray(kernel0)}
  results = {}
  for project in (True, False):
    log, p, after = sq.log_init(), params, []
    for b in range(3):
      keys = rng.standard_normal((2, d)).astype(np.float32)
      values = rng.standard_normal((2, out)).astype(np.float32)
      with warnings.catch_warnings():
        warnings.simplefilter("ignore", sq.InterferenceWarning)
        log, edit = sq.sequential_insert(p, log, C, keys, values, ("k",), project=project,
                                         **({"l2": 1e-4} if project else {"penalty": 1e-4}),
                                         label=f"b{b}")
      p = sq.log_apply(params, log)
      after.append(np.asarray(keys @ p["k"]))   # outputs right after the edit
    final = np.asarray(p["k"])
    results[project] = max(
        np.abs(e.keys @ final - a).max() / np.abs(a).max() for e, a in zip(log.entries, after))
    # Preserved keys: C's data and the earlier batches' keys.
    if project:
      change = data[:50] @ (final - kernel0)
      assert np.abs(change).max() < 1e-4 * np.abs(data[:50] @ kernel0).max()
      assert log.entries[2].edit.settings["null_dim"] == 8 - 4
      # The new keys reach their values closely (‖P k‖² ≫ l2).
      np.testing.assert_allclose(after[-1], log.entries[-1].values, atol=1e-2)
  assert results[True] < 1e-4, results
  assert results[False] > 1e-2, results


def test_projected_lambda_solves_keep_preserved_keys():
  rng = np.random.default_rng(3)
  # Dense, non-linear: f = tanh(k K).
  d, out = 10, 4
  data, _ = subspace_data(rng, d, 5, 300)
  C = (data.T @ data / len(data)).astype(np.float32)
  prev = (data[:3] + 0.0).astype(np.float32)
  K0 = rng.standard_normal((d, out)).astype(np.float32) * 0.3
  old = memedit.make_edit(("k",), np.ones((out, 1)), np.ones((1, d)), label="old")
  log = sq.log_append(sq.log_init(), old, prev)
  new_keys = rng.standard_normal((1, d)).astype(np.float32)
  D0 = new_keys / np.linalg.norm(new_keys)  # the key's own direction: it reads prev too
  D = sq.sequential_directions(log, C, D0, ("k",), threshold=1e-3)
  np.testing.assert_allclose(D @ D.T, np.eye(1), atol=1e-5)
  f = lambda K, k: jnp.tanh(k @ K)
  target = jnp.tanh(new_keys @ K0) + 0.3
  res = memedit.solve_lambda(f, K0, D, new_keys, target, loss="l2",
                             optimizer="gauss_newton", steps=8)
  K1 = K0 + memedit.kernel_delta(res.lam, D, K0.shape)
  assert float(res.final_loss) < 1e-3 * float(res.losses[0])
  np.testing.assert_allclose(f(K1, prev), f(K0, prev), atol=2e-6)
  np.testing.assert_allclose(f(K1, data[:40]), f(K0, data[:40]), atol=2e-6)
  assert float(np.abs(prev @ D0.T).max()) > 0.1  # what the projection removed

  # Convolution: every pixel key of a preserved key map is in the log; the edited layer's
  # output over that whole map stays as it was.
  cin, cout = 6, 3
  basis = np.linalg.qr(rng.standard_normal((cin, 3)))[0].T
  xprev = (rng.standard_normal((1, 5, 5, 3)) @ basis).astype(np.float32)
  Cc = np.eye(cin, dtype=np.float32) * 1e-6 + (basis.T @ basis).astype(np.float32)
  conv_old = memedit.make_edit(("w",), np.ones((3, 3, cout, 1)), np.ones((1, cin)),
                               kind="conv", label="old")
  clog = sq.log_append(sq.log_init(), conv_old, xprev.reshape(-1, cin))
  xnew = rng.standard_normal((1, 5, 5, cin)).astype(np.float32)
  Dc = sq.sequential_directions(clog, Cc, memedit.context_directions(
      np.eye(cin, dtype=np.float32), xnew.reshape(-1, cin)).D, ("w",))
  Kc0 = (rng.standard_normal((3, 3, cin, cout)) * 0.3).astype(np.float32)

  def conv(K, x):
    return jnp.tanh(jax.lax.conv_general_dilated(x, K, (1, 1), "SAME",
                                                 dimension_numbers=("NHWC", "HWIO", "NHWC")))

  tc = conv(Kc0, xnew) + 0.2
  rc = memedit.solve_lambda(conv, Kc0, Dc, xnew, tc, kind="conv", loss="l2",
                            optimizer="gauss_newton", steps=6)
  Kc1 = Kc0 + memedit.kernel_delta(rc.lam, Dc, Kc0.shape, "conv")
  assert float(rc.final_loss) < 0.9 * float(rc.losses[0])
  np.testing.assert_allclose(conv(Kc1, xprev), conv(Kc0, xprev), atol=2e-6)


def test_project_directions_refuses_directions_in_the_preserved_span():
  P = np.diag([0.0, 0.0, 1.0]).astype(np.float32)
  with pytest.raises(ValueError, match="preserved keys' span"):
    sq.project_directions(np.array([[1.0, 2.0, 0.0]], np.float32), P)
  with pytest.raises(ValueError, match="preserved keys' span"):
    sq.project_directions(np.array([[0.0, 0.0, 1.0], [0.0, 1.0, 2.0]], np.float32), P)
  out = jax.jit(sq.project_directions)(jnp.array([[1.0, 2.0, 0.0]]), P)
  assert bool(jnp.all(jnp.isnan(out)))
  kept = sq.project_directions(np.array([[3.0, 0.0, 4.0]], np.float32), P,
                               orthonormalize=False)
  np.testing.assert_allclose(kept, [[0.0, 0.0, 4.0]])


def test_projecting_directions_eagerly_is_one_program_not_one_per_op():
  from compilations import Compilations

  rng = np.random.default_rng(6)
  d = 13  # a shape no other test uses: nothing is compiled already
  U = np.linalg.qr(rng.standard_normal((d, d)))[0]
  P = (U[:, 4:] @ U[:, 4:].T).astype(np.float32)  # a projector of rank 9
  D = rng.standard_normal((2, d)).astype(np.float32)
  with Compilations() as c:
    out = np.asarray(sq.project_directions(D, P), np.float64)
  assert c.count <= 4, c.count  # 22 when the projection's ops ran (and compiled) one by one
  # Against float64 numpy: an orthonormal basis of span(D P), rows signed as D P's.
  X = D.astype(np.float64) @ P.astype(np.float64)
  np.testing.assert_allclose(out @ out.T, np.eye(2), atol=1e-5)
  np.testing.assert_allclose(out @ P, out, atol=1e-5)  # in range(P)
  q = np.linalg.qr(X.T)[0]
  np.testing.assert_allclose(out.T - q @ (q.T @ out.T), 0, atol=1e-5)  # in span(D P)
  assert np.all(np.sum(out * X, axis=1) > 0)


def test_projected_inserts_refuse_keys_without_a_part_in_the_null_space():
  # Nothing below the threshold (P = 0): the insert would write nothing, so it is refused
  # rather than logged as an edit that leaves the residual as it was.
  params = {"k": jnp.ones((4, 2))}
  K = jnp.array([[1.0, 2.0, 0.0, 0.0]])
  V = jnp.array([[5.0, -5.0]])
  with pytest.raises(ValueError, match=r"keys: expected keys with a part outside the "
                                       r"preserved keys' span.*got 1 of 1 without \(key 0: 0\)"):
    sq.sequential_insert(params, sq.log_init(), jnp.eye(4), K, V, ("k",), threshold=0.5)
  P = jnp.diag(jnp.array([0.0, 0.0, 1.0, 1.0]))
  with pytest.raises(ValueError, match="got 1 of 2 without"):
    sq.insert_null_space(jnp.zeros((2, 4)), jnp.array([[1.0, 2.0, 0.0, 0.0],
                                                       [0.0, 1.0, 1.0, 0.0]]),
                         jnp.ones((2, 2)), P)
  with pytest.raises(ValueError, match=r"keys: expected at least one key, got shape \(0, 4\)"):
    sq.insert_null_space(jnp.zeros((2, 4)), jnp.zeros((0, 4)), jnp.zeros((0, 2)), P)
  # Under jit the keys are traced and not inspected.
  sol = jax.jit(sq.insert_null_space)(jnp.zeros((2, 4)), jnp.array([[0.0, 1.0, 1.0, 0.0]]),
                                      jnp.ones((1, 2)), P)
  assert bool(jnp.all(jnp.isfinite(sol.lam @ sol.D)))


def test_compiled_once_and_jittable():
  from memedit.sequential import nullspace

  rng = np.random.default_rng(4)
  d = 8
  C = np.eye(d, dtype=np.float32)
  sq.null_space(C, rng.standard_normal((2, d)).astype(np.float32))
  before = nullspace._null_space._cache_size()
  # More preserved keys, other values: the (d, d) program is reused.
  for m in (3, 5):
    sq.null_space(C + 0.1, rng.standard_normal((m, d)).astype(np.float32), threshold=0.5)
  assert nullspace._null_space._cache_size() == before
  W = rng.standard_normal((3, d)).astype(np.float32)
  K = rng.standard_normal((2, d)).astype(np.float32)
  V = rng.standard_normal((2, 3)).astype(np.float32)
  P = np.asarray(sq.null_space(C + np.diag(np.arange(d, dtype=np.float32)), threshold=0.5).P)
  eager = sq.insert_null_space(W, K, V, P, l2=0.5)
  jitted = jax.jit(lambda *a: sq.insert_null_space(*a[:4], l2=a[4]))(W, K, V, P, 0.5)
  np.testing.assert_allclose(jitted.lam @ jitted.D, eager.lam @ eager.D, rtol=1e-5, atol=1e-6)
  bad = jax.jit(lambda *a: sq.insert_null_space(*a[:4], l2=a[4]))(W, K, V, P, -1.0)
  assert bool(jnp.all(jnp.isnan(bad.D)))


def test_key_weight_bounds_the_earlier_keys_in_the_null_space():
  rng = np.random.default_rng(5)
  d = 10
  U = np.linalg.qr(rng.standard_normal((d, d)))[0]
  lam = np.geomspace(1e-4, 1.0, d)
  C = ((U * lam) @ U.T).astype(np.float32)
  prev = (0.3 * rng.standard_normal((3, d))).astype(np.float32)
  edit = memedit.make_edit(("k",), np.ones((2, 1)), np.ones((1, d)), label="prev")
  log = sq.log_append(sq.log_init(), edit, prev)
  D0 = rng.standard_normal((1, d)).astype(np.float32)
  for kw in (1.0, 100.0):
    ns = sq.null_space(C, prev, np.full(3, kw, np.float32), threshold=0.05)
    basis = np.asarray(ns.basis)[:, np.asarray(ns.kept)]
    # uᵀk ≤ √(threshold·λ_max(C) / key_weight) along every kept direction u.
    assert np.abs(basis.T @ prev.T).max() <= np.sqrt(0.05 * lam.max() / kw) * (1 + 1e-4)
    D = np.asarray(sq.sequential_directions(log, C, D0, ("k",), threshold=0.05,
                                            key_weight=kw))
    np.testing.assert_allclose(D @ np.asarray(ns.P), D, atol=1e-5)
  with pytest.raises(ValueError, match="key_weight"):
    sq.sequential_directions(log, C, D0, ("k",), key_weight=-1.0)
