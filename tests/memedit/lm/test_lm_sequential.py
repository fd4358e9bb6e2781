"""Sequential MEMIT with AlphaEdit's projection: the insert against AlphaEdit's formula in
float64 numpy, preserved keys keep their outputs, the model-level batches (their updates
are the formula on the keys the log recorded), revert/replay of a middle batch bit for
bit, the plain arm is plain MEMIT applied batch after batch, and the experiment's rows."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rel_err

from memedit.lm.evaluate import world_cases
from memedit.lm.experiment import apply_all
from memedit.lm.memit import memit_edits, with_params
from memedit.lm.sequential import (SCORES, alphaedit_insert, fact_keys, layer_projectors,
                                   memit_batch, replay_batch, revert_batch, run_sequential,
                                   sequential_cases)
from memedit.sequential import EditLog, log_apply, log_init, log_keys, null_space

LAYERS = [0, 1]
VALUE = {"steps": 4}


def _numpy_alphaedit(W, K1, R, P, Kp, l2):
  """ΔW = R K₁ᵀ P (K_p K_pᵀ P + K₁ K₁ᵀ P + l2·I)⁻¹ with keys and residuals as columns
  (AlphaEdit's equation)."""
  K1, R, P = (np.asarray(a, np.float64) for a in (K1, R, P))
  K1, R = K1.T, R.T
  d = P.shape[0]
  KpKp = np.zeros((d, d)) if Kp is None else np.asarray(Kp, np.float64).T @ np.asarray(
      Kp, np.float64)
  return R @ K1.T @ P @ np.linalg.inv(KpKp @ P + K1 @ K1.T @ P + l2 * np.eye(d))


def _low_rank_problem(seed, d=24, rank=10, out=6, n=5, m=4):
  rng = np.random.default_rng(seed)
  A = rng.normal(size=(d, rank))
  C = A @ A.T / rank
  W = rng.normal(size=(out, d))
  K1 = rng.normal(size=(n, d))
  R = rng.normal(size=(n, out))
  Kp = rng.normal(size=(m, d))
  return C, W, K1, R, Kp, A


@pytest.mark.parametrize("with_preserved", [False, True])
def test_alphaedit_insert_matches_numpy(with_preserved):
  C, W, K1, R, Kp, _ = _low_rank_problem(1)
  Kp = Kp if with_preserved else None
  with jax.enable_x64():
    P = np.asarray(null_space(C, threshold=1e-2).P)
    want = _numpy_alphaedit(W, K1, R, P, Kp, l2=0.5)
    lam, D = alphaedit_insert(W, K1, R, P, Kp, l2=0.5)
    assert lam.dtype == jnp.float64
    assert rel_err(np.asarray(lam) @ np.asarray(D), want) < 1e-10
  f32 = [np.asarray(a, np.float32) for a in (W, K1, R, P)]
  lam, D = alphaedit_insert(*f32, None if Kp is None else Kp.astype(np.float32), l2=0.5)
  assert lam.dtype == jnp.float32
  assert rel_err(np.asarray(lam) @ np.asarray(D), want) < 1e-4


def test_projected_insert_keeps_preserved_outputs():
  """P from M = C + K_pᵀK_p (C of rank 10 < 24): the update is zero on C's range and on
  the earlier keys, so their outputs W k stay to float tolerance, while the new keys,
  which keep a part in the null space, move towards their values."""
  C, W, K1, R, Kp, A = _low_rank_problem(2)
  preserved = np.concatenate([A.T, Kp])  # C's range and the earlier keys

  def update(dtype):
    ns = null_space(C.astype(dtype), Kp.astype(dtype), threshold=1e-4)
    lam, D = alphaedit_insert(*(a.astype(dtype) for a in (W, K1, R)), ns.P,
                              Kp.astype(dtype), l2=1e-3)
    return int(ns.dim), np.asarray(lam, np.float64) @ np.asarray(D, np.float64)

  with jax.enable_x64():
    dim64, dW64 = update(np.float64)
  dim32, dW32 = update(np.float32)
  for dim, dW, tol in ((dim64, dW64, 1e-11), (dim32, dW32, 1e-5)):
    assert dim == 24 - 10 - 4
    change = np.abs(preserved @ dW.T).max() / (np.abs(dW).max() * np.abs(preserved).max())
    assert change < tol, (tol, change)
    reach = np.sum((K1 @ dW.T) * R) / np.sum(R * R)  # the share of R written along R
    assert reach > 0.9, reach


def test_layer_projectors_checks():
  with pytest.raises(ValueError, match="expected C for every layer"):
    layer_projectors({0: np.eye(3)}, [0, 1])


@pytest.fixture(scope="module")
def three_batches(tiny, tiny_covariances):
  """Three projected batches of 2 facts on the tiny model, and their requests."""
  cases = world_cases(tiny.world, 6, seed=5)
  reqs = [c.request for c in cases]
  projectors = layer_projectors(tiny_covariances, LAYERS, threshold=1e-2)
  log, names, params = log_init(), [], tiny.variables
  for b in range(3):
    res = memit_batch(with_params(tiny.model, params), tiny.layout, LAYERS,
                      tiny.world.tokenize, reqs[2 * b:2 * b + 2], tiny_covariances, log,
                      projectors=projectors, l2=1.0, value_options=VALUE)
    log = res.log
    names.append(res.names)
    params = log_apply(tiny.variables, log)
  return log, names, projectors, reqs


def test_projected_batches_follow_alphaedit(tiny, three_batches):
  """Each block's update of each batch is AlphaEdit's formula (float64 numpy) on the keys
  and target values the log recorded, with the earlier batches' keys on that block as
  K_p, and it leaves C's range alone."""
  log, names, projectors, _ = three_batches
  assert len(log) == 6 and [len(n) for n in names] == [2, 2, 2]
  for b in range(3):
    prefix = EditLog(log.entries[:2 * b])
    params = log_apply(tiny.variables, prefix)
    for j, layer in enumerate(LAYERS):
      entry = log.entries[2 * b + j]
      e = entry.edit
      assert e.settings["insert"] == "alphaedit"
      assert e.settings["preserved_keys"] == 2 * b
      kernel = np.asarray(params["params"][f"h_{layer}"]["mlp"]["c_proj"]["kernel"])
      W = kernel.T  # math layout (d, key_dim)
      K1 = np.asarray(entry.keys)
      R = np.asarray(entry.values) - K1 @ W.T
      Kp, _ = log_keys(prefix, e.path)
      P = np.asarray(projectors[layer].P)
      want = _numpy_alphaedit(W, K1, R, P, np.asarray(Kp) if b else None, l2=1.0)
      got = np.asarray(e.lam, np.float64) @ np.asarray(e.D, np.float64)
      assert rel_err(got, want) < 1e-3, (b, layer)
      kept = ~np.asarray(projectors[layer].kept)
      U = np.asarray(projectors[layer].basis)[:, kept]  # C's range (above the cutoff)
      assert np.abs(got @ U).max() < 1e-4 * np.abs(got).max()


def _bits(tree):
  return [np.asarray(x).view(np.uint8) for x in jax.tree_util.tree_leaves(tree)]


def _same_bits(a, b):
  return all(np.array_equal(x, y) for x, y in zip(_bits(a), _bits(b)))


def test_revert_and_replay_a_middle_batch_bit_exact(tiny, three_batches):
  log, names, _, _ = three_batches
  full = log_apply(tiny.variables, log)
  without = log_apply(tiny.variables, revert_batch(log, names[1]))
  never = log_apply(tiny.variables, EditLog(log.entries[:2] + log.entries[4:]))
  assert _same_bits(without, never)
  assert not _same_bits(without, full)
  assert _same_bits(log_apply(tiny.variables, replay_batch(revert_batch(log, names[1]),
                                                          names[1])), full)
  everything = log
  for n in names:
    everything = revert_batch(everything, n)
  assert _same_bits(log_apply(tiny.variables, everything), tiny.variables)


def test_plain_arm_is_memit_applied_in_sequence(tiny, tiny_covariances, three_batches):
  _, _, _, reqs = three_batches
  log, params = log_init(), tiny.variables
  ref, hist = tiny.variables, None
  for b in range(2):
    batch = reqs[2 * b:2 * b + 2]
    res = memit_batch(with_params(tiny.model, params), tiny.layout, LAYERS,
                      tiny.world.tokenize, batch, tiny_covariances, log, project=False,
                      penalty=50.0, value_options=VALUE)
    log = res.log
    params = log_apply(tiny.variables, log)
    edits = memit_edits(with_params(tiny.model, ref), tiny.layout, LAYERS,
                        tiny.world.tokenize, batch, tiny_covariances, penalty=50.0,
                        value_options=VALUE).edits
    ref, hist = apply_all(ref, edits, hist)
    assert res.names == tuple(e.name for e in edits)
    assert all("insert" not in e.settings for e in res.edits)
    assert _same_bits(params, ref)


def test_sequential_cases_keep_reserved_subjects_apart(tiny):
  cases, kept = sequential_cases(tiny.world, 20, reserve=6, seed=1)
  names = {tiny.world.subjects[s] for s in kept}
  assert len({(c.request.subject, c.request.prompt) for c in cases}) == 20
  assert not names & {c.request.subject for c in cases}
  for c in cases:
    assert c.request.target_new != c.request.target_true
    reserved = {c.request.prompt.format(n) for n in names}
    assert c.neighbours and all(p in reserved and o == c.request.target_true
                                for p, o in c.neighbours)
  with pytest.raises(ValueError, match="expected 1 to"):
    sequential_cases(tiny.world, 1000, reserve=6)


def test_run_sequential_rows(tiny, tiny_covariances):
  out = run_sequential(tiny.model, tiny.world, tiny.layout, LAYERS, tiny_covariances, ("{}",),
                       edits=4, batch=2, arms=("projected",), reserve=8, unedited_facts=16,
                       l2=1.0, value_options=VALUE, eval_at=[4])
  rows = out["rows"]
  assert [(r["arm"], r["edits"], r["batch"]) for r in rows] == [("projected", 4, 2)]
  for r in rows:
    assert all(np.isfinite(r[k]) for k in SCORES if not k.startswith("neighbourhood"))
    assert r["unedited_drop"] == pytest.approx(out["base"]["unedited"] - r["unedited"])
  assert set(out["null_dims"]) == set(LAYERS)
  assert [len(b) for b in out["batches"]["projected"]] == [2, 2]
  entries = out["logs"]["projected"].entries
  assert len(entries) == 4 and all(e.keys.shape == (2, 4 * tiny.config.n_embd)
                                   for e in entries)


def test_preserved_keys_enter_the_solve_with_their_weights(tiny, tiny_covariances,
                                                           three_batches):
  """memit_batch(preserved=...): further keys beside the earlier edits', weighted:
  AlphaEdit's formula with K_p = [earlier keys; √w · preserved keys] (float64 numpy)."""
  log, _, projectors, reqs = three_batches
  prefix = EditLog(log.entries[:2])  # one batch before
  params = log_apply(tiny.variables, prefix)
  facts, fkeys = fact_keys(tiny.model, tiny.world, tiny.layout, LAYERS)
  assert len(facts) == len(tiny.world.subjects) * len(tiny.world.relations)
  assert all(k.shape == (len(facts), 4 * tiny.config.n_embd) for k in fkeys.values())
  w = 3.0
  preserved = {l: (k[:5], np.full(5, w, np.float32)) for l, k in fkeys.items()}
  res = memit_batch(with_params(tiny.model, params), tiny.layout, LAYERS, tiny.world.tokenize,
                    reqs[2:4], tiny_covariances, prefix, projectors=projectors, l2=1.0,
                    value_options=VALUE, preserved=preserved)
  for j, layer in enumerate(LAYERS):
    entry = res.log.entries[2 + j]
    assert entry.edit.settings["preserved_keys"] == 2 + 5  # the earlier batch's 2 keys, 5 more
    W = np.asarray(params["params"][f"h_{layer}"]["mlp"]["c_proj"]["kernel"]).T
    K1 = np.asarray(entry.keys)
    R = np.asarray(entry.values) - K1 @ W.T
    Kp, _ = log_keys(prefix, entry.edit.path)
    Kp = np.concatenate([np.asarray(Kp), np.sqrt(w) * fkeys[layer][:5]])
    want = _numpy_alphaedit(W, K1, R, np.asarray(projectors[layer].P), Kp, l2=1.0)
    got = np.asarray(entry.edit.lam, np.float64) @ np.asarray(entry.edit.D, np.float64)
    assert rel_err(got, want) < 1e-3, layer
  with pytest.raises(ValueError, match=r"preserved: expected keys \(m, 128\) and weights"):
    memit_batch(with_params(tiny.model, params), tiny.layout, LAYERS, tiny.world.tokenize,
                reqs[2:4], tiny_covariances, prefix, projectors=projectors, l2=1.0,
                value_options=VALUE, preserved={0: (np.ones((2, 3)), np.ones(2))})


def test_run_sequential_preserves_the_world_facts_but_the_batch(tiny, tiny_covariances):
  out = run_sequential(tiny.model, tiny.world, tiny.layout, LAYERS, tiny_covariances, ("{}",),
                       edits=4, batch=2, arms=("projected",), reserve=8, unedited_facts=16,
                       l2=1.0, value_options=VALUE, eval_at=[4], preserve_facts=2.0)
  n_facts = len(tiny.world.subjects) * len(tiny.world.relations)
  entries = out["logs"]["projected"].entries
  # Each batch: every fact of the world but its own 2, plus the earlier batches' keys.
  assert [e.edit.settings["preserved_keys"] for e in entries] == [
      n_facts - 2, n_facts - 2, n_facts - 2 + 2, n_facts - 2 + 2]
  with pytest.raises(ValueError, match="preserve_facts: expected a finite weight >= 0"):
    run_sequential(tiny.model, tiny.world, tiny.layout, LAYERS, tiny_covariances, ("{}",),
                   edits=2, batch=2, arms=("projected",), preserve_facts=-1.0)
