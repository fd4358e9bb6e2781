"""Sequential edits tried from outside: projection thresholds at the rounding level,
programs compiled per edit of a growing log, settings of the wrong type, an l2 too small
for the solve, logs of another model, against float64 references."""

from __future__ import annotations

import warnings

import jax.numpy as jnp
import numpy as np
import pytest
from compilations import Compilations

import memedit
from memedit import sequential as sq


def low_rank_C(d=6, rank=2, seed=1):
  """A float32 second moment of exact rank ``rank`` and the float64 data it came from."""
  rng = np.random.default_rng(seed)
  X = rng.normal(size=(300, rank)) @ rng.normal(size=(rank, d))
  X32 = X.astype(np.float32)
  return X32.T @ X32 / 300, X32.astype(np.float64)


def f64_null_projector(X, rank):
  """I − V Vᵀ, V the top right singular vectors of X (float64)."""
  _, _, vt = np.linalg.svd(X, full_matrices=True)
  V = vt[:rank].T
  return np.eye(X.shape[1]) - V @ V.T


def test_threshold_zero_gives_the_null_space_not_the_signs_of_rounding():
  C, X = low_rank_C()
  want = f64_null_projector(X, 2)
  for threshold in (0.0, 1e-9):
    ns = sq.null_space(C, threshold=threshold)
    assert int(ns.dim) == 4, (threshold, np.asarray(ns.eigenvalues))
    assert np.abs(np.asarray(ns.P, np.float64) - want).max() < 1e-4
  # a threshold above the rounding level is used as given
  assert float(sq.null_space(C, threshold=1e-2).cutoff) == pytest.approx(
      1e-2 * np.linalg.eigvalsh(C.astype(np.float64)).max(), rel=1e-5)


def _insert_many(params, C, n, rng, log=None):
  log = sq.log_init() if log is None else log
  for _ in range(n):
    k = rng.normal(size=(1, C.shape[0])).astype(np.float32)
    v = rng.normal(size=(1, 3)).astype(np.float32)
    log, _ = sq.sequential_insert(sq.log_apply(params, log), log, C, k, v, ("w",),
                                  label=f"e{len(log)}", check=False)
  return log


def test_projected_inserts_into_a_growing_log_compile_no_program_per_edit():
  C, _ = low_rank_C(d=12, rank=2)
  rng = np.random.default_rng(0)
  params = {"w": jnp.asarray(rng.normal(size=(12, 3)), jnp.float32)}
  log = _insert_many(params, C, 6, rng)  # 0..5 keys preserved: every program seen
  with Compilations() as c:
    log = _insert_many(params, C, 2, rng, log)  # 6 and 7 keys preserved
  assert c.count == 0, c.events
  assert len(sq.log_keys(log, ("w",))[0]) == 8


def test_project_must_be_a_bool():
  C, _ = low_rank_C()
  params = {"w": jnp.ones((6, 3))}
  k, v = np.ones((1, 6), np.float32), np.ones((1, 3), np.float32)
  for bad in ("no", None, 0):
    with pytest.raises(ValueError, match=r"project: expected True or False, got"):
      sq.sequential_insert(params, sq.log_init(), C, k, v, ("w",), project=bad)
    with pytest.raises(ValueError, match=r"project: expected True or False, got"):
      sq.sequential_directions(sq.log_init(), C, k, ("w",), project=bad)
  _, e = sq.sequential_insert(params, sq.log_init(), C, k, v, ("w",),
                              project=np.bool_(False))
  assert e.method == "ridge"


def test_an_l2_too_small_for_the_solve_is_named_not_returned_as_nan():
  C, _ = low_rank_C()
  rng = np.random.default_rng(0)
  W = rng.normal(size=(3, 6)).astype(np.float32)
  k = rng.normal(size=(2, 6)).astype(np.float32)
  v = rng.normal(size=(2, 3)).astype(np.float32)
  P = sq.null_space(C).P
  with pytest.raises(ValueError, match=r"l2: expected a weight large enough .* got l2=1e-12"):
    sq.insert_null_space(W, k, v, P, l2=1e-12)
  with pytest.raises(ValueError, match=r"l2: expected a weight large enough"):
    sq.sequential_insert({"w": jnp.asarray(W.T)}, sq.log_init(), C, k, v, ("w",), l2=1e-12)
  s = sq.insert_null_space(W, k, v, P, l2=1e-3)  # a usable l2 still solves
  assert np.isfinite(np.asarray(s.D)).all()


def test_a_log_of_another_model_is_named_in_projected_inserts_and_directions():
  rng = np.random.default_rng(2)
  C6, _ = low_rank_C(d=6)
  C8, _ = low_rank_C(d=8)
  log, _ = sq.sequential_insert({"w": jnp.ones((6, 3))}, sq.log_init(), C6,
                                rng.normal(size=(1, 6)), rng.normal(size=(1, 3)), ("w",),
                                label="a", check=False)
  want = r"log: expected the earlier edits on \('w',\) to have keys of the layer's dimension 8"
  with pytest.raises(ValueError, match=want):
    sq.sequential_insert({"w": jnp.ones((8, 3))}, log, C8, rng.normal(size=(1, 8)),
                         rng.normal(size=(1, 3)), ("w",))
  with pytest.raises(ValueError, match=want):
    sq.sequential_directions(log, C8, rng.normal(size=(1, 8)), ("w",))


def test_projected_inserts_and_predicted_interference_match_float64():
  """AlphaEdit's ΔW = R K₁ᵀ P (K_p K_pᵀ P + K₁ K₁ᵀ P + l2·I)⁻¹ in float64 numpy, with
  weighted earlier keys, and each edit's predicted change at the earlier keys against
  the change measured on the applied kernels."""
  rng = np.random.default_rng(3)
  d, out, kw, l2 = 10, 4, 3.0, 0.5
  C, _ = low_rank_C(d=d, rank=3, seed=4)
  params = {"w": jnp.asarray(rng.normal(size=(d, out)), jnp.float32)}
  log, cur = sq.log_init(), params
  for t in range(3):
    k = rng.normal(size=(2, d)).astype(np.float32)
    v = rng.normal(size=(2, out)).astype(np.float32)
    w = np.array([0.5, 2.0], np.float32) if t % 2 else None
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", sq.InterferenceWarning)
      new, e = sq.sequential_insert(cur, log, C, k, v, ("w",), label=f"e{t}", weights=w,
                                    key_weight=kw, l2=l2)
    W = np.asarray(cur["w"], np.float64).T
    pk, pw = (np.asarray(a, np.float64) for a in sq.log_keys(log, ("w",)))
    Kp = (pk * np.sqrt(kw * pw)[:, None]).T if pk.size else np.zeros((d, 0))
    ev, U = np.linalg.eigh(C.astype(np.float64) + Kp @ Kp.T)
    Uh = U[:, ev < 1e-2 * np.linalg.eigvalsh(C.astype(np.float64)).max()]
    P = Uh @ Uh.T
    K1 = k.astype(np.float64).T
    R = v.astype(np.float64).T - W @ K1
    dW = R @ K1.T @ P @ np.linalg.inv(Kp @ Kp.T @ P + K1 @ K1.T @ P + l2 * np.eye(d))
    got = sq.edit_matrix(e)
    assert np.abs(got - dW).max() < 1e-4 * np.abs(dW).max()
    nxt = sq.log_apply(params, new)
    change = np.asarray(nxt["w"], np.float64) - np.asarray(cur["w"], np.float64)
    scale = sq.key_change(got, k)
    for entry in log.entries:
      measured = sq.key_change(change.T, entry.keys, entry.weights)
      predicted = sq.key_change(got, entry.keys, entry.weights)
      assert abs(measured - predicted) < 1e-5 * scale
    log, cur = new, nxt


def test_key_moment_of_no_keys_of_no_dimension_is_empty_not_a_crash():
  assert sq.key_moment(np.zeros((0, 0), np.float32)).shape == (0, 0)
  assert sq.key_moment(np.zeros((0, 3), np.float32)).tolist() == np.zeros((3, 3)).tolist()
  with pytest.raises(ValueError, match=r"weights: expected shape \(0,\) \(one per key\), got "
                                       r"\(2,\)"):
    sq.key_moment(np.zeros((0, 0), np.float32), np.ones(2))


def test_appending_edits_with_new_numbers_of_keys_compiles_no_program():
  log = sq.log_init()
  for n in (2, 3, 4):  # key maps (n, 2, d) with weights: a new shape each time
    e = memedit.make_edit(("k",), np.ones((2, 1), np.float32), np.ones((1, 3), np.float32),
                          label=f"e{n}")
    keys = np.random.default_rng(n).normal(size=(n, 2, 3))
    with Compilations() as c:
      log = sq.log_append(log, e, keys, np.ones((n, 2)), weights=np.ones((n, 2)))
    if n > 2:
      assert c.count == 0, c.events
    entry = log.entries[-1]
    assert entry.keys.dtype == jnp.float32 and entry.keys.shape == (2 * n, 3)
    assert np.array_equal(np.asarray(entry.keys), keys.reshape(-1, 3).astype(np.float32))
    assert entry.weights.shape == (2 * n,) and entry.values.shape == (n, 2)


def test_an_insert_with_a_new_number_of_keys_compiles_only_its_solve():
  C, _ = low_rank_C(d=32, rank=4)
  rng = np.random.default_rng(5)
  params = {"w": jnp.asarray(rng.normal(size=(32, 3)), jnp.float32)}
  log = sq.log_init()
  for n in (2, 2, 2, 2, 3):  # the last with 8 keys preserved, as the one before it
    k = rng.normal(size=(n, 32)).astype(np.float32)
    v = rng.normal(size=(n, 3)).astype(np.float32)
    cur = sq.log_apply(params, log)
    with Compilations() as c:
      log, _ = sq.sequential_insert(cur, log, C, k, v, ("w",), label=f"e{len(log)}",
                                    check=False)
  assert c.count <= 1, c.events  # the closed form for 3 keys; no staging or checks
