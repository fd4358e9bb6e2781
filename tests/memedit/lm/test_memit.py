"""MEMIT: one layer's ridge insert against its float64 closed form, the compact factors,
and the multi-layer algorithm on a tiny model (targets reached, edits revert bit for bit)."""

from __future__ import annotations

import re

import jax
import numpy as np
import pytest
from conftest import rel_err

from memedit.lm.evaluate import world_cases
from memedit.lm.experiment import apply_all, revert_all
from memedit.lm.keys import read_states
from memedit.lm.memit import check_requests, compact_factors, memit_edits, memit_insert
from memedit.lm.prompts import Request, encode, prompt_rows
from memedit.lm.values import ValueResult


def _numpy_memit(C, K, R, lam):
  """ΔW = R Kᵀ (λC + K Kᵀ)⁻¹ with keys and residuals as columns (MEMIT's equation)."""
  C, K, R = (np.asarray(a, np.float64) for a in (C, K, R))
  K, R = K.T, R.T  # (key_dim, F), (d, F)
  return R @ K.T @ np.linalg.inv(lam * C + K @ K.T)


@pytest.mark.parametrize("n", [3, 40])  # 40 facts > d = 16: compact factors (rank d)
def test_memit_insert_matches_closed_form(n):
  rng = np.random.default_rng(n)
  d, dk = 16, 24
  A = rng.normal(size=(dk, 200))
  C = A @ A.T / 200
  W = rng.normal(size=(d, dk))
  K = rng.normal(size=(n, dk)) + 0.5
  R = rng.normal(size=(n, d))
  want = _numpy_memit(C, K, R, 7.0)
  with jax.enable_x64():
    lam, D = memit_insert(W, C, K, R, penalty=7.0)
    got = np.asarray(lam, np.float64) @ np.asarray(D, np.float64)
  assert lam.shape[1] == min(n, d)
  assert rel_err(got, want) < 1e-9
  lam32, D32 = memit_insert(W.astype(np.float32), C.astype(np.float32),
                            K.astype(np.float32), R.astype(np.float32), penalty=7.0)
  assert rel_err(np.asarray(lam32) @ np.asarray(D32), want) < 1e-3


def test_compact_factors_keep_the_product():
  rng = np.random.default_rng(1)
  for out, r, din in ((3, 8, 5), (6, 8, 4), (3, 2, 5)):
    lam, D = rng.normal(size=(out, r)), rng.normal(size=(r, din))
    with jax.enable_x64():
      l2, d2 = compact_factors(lam, D)
      assert l2.shape[1] == min(r, out, din)
      assert rel_err(np.asarray(l2) @ np.asarray(d2), lam @ D) < 1e-12


def test_memit_reaches_its_targets_and_reverts(tiny, tiny_covariances):
  """With a small λ every layer's insert is nearly exact, so after the last layer the
  hidden states reach the targets z; the edits apply and revert as Edits."""
  cases = world_cases(tiny.world, 3, seed=4)
  reqs = [c.request for c in cases]
  res = memit_edits(tiny.model, tiny.layout, [0, 1], tiny.world.tokenize, reqs,
                    tiny_covariances, penalty=1e-4,
                    value_options={"steps": 10, "chunk": 2})  # test_lm_sequential's program
  assert len(res.edits) == 2 and res.targets.shape == (3, tiny.config.n_embd)
  assert [e.path[1] for e in res.edits] == ["h_0", "h_1"]
  assert rel_err(res.reached, res.targets) < 1e-3
  params, hist = apply_all(tiny.variables, res.edits)
  assert not np.array_equal(np.asarray(params["params"]["h_0"]["mlp"]["c_proj"]["kernel"]),
                            np.asarray(tiny.variables["params"]["h_0"]["mlp"]["c_proj"]["kernel"]))
  back, _ = revert_all(params, res.edits, hist)
  for a, b in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(tiny.variables)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  with pytest.raises(ValueError, match="expected C for every edited layer"):
    memit_edits(tiny.model, tiny.layout, [0, 1], tiny.world.tokenize, reqs,
                {1: tiny_covariances[1]})
  with pytest.raises(ValueError, match="expected increasing block indices"):
    memit_edits(tiny.model, tiny.layout, [1, 0], tiny.world.tokenize, reqs, tiny_covariances)
  # The value search is reused: the same targets, the same edits bit for bit, no search.
  again = memit_edits(tiny.model, tiny.layout, [0, 1], tiny.world.tokenize, reqs,
                      tiny_covariances, penalty=1e-4, values=res.values)
  np.testing.assert_array_equal(again.targets, res.targets)
  for a, b in zip(again.edits, res.edits):
    np.testing.assert_array_equal(np.asarray(a.lam), np.asarray(b.lam))
    np.testing.assert_array_equal(np.asarray(a.D), np.asarray(b.D))
  # A larger λ from the same search: the same z, reached less closely.
  stiff = memit_edits(tiny.model, tiny.layout, [1], tiny.world.tokenize, reqs,
                      tiny_covariances, penalty=1e3, values=res.values)
  np.testing.assert_array_equal(stiff.targets, res.targets)
  assert rel_err(stiff.reached, res.targets) > rel_err(res.reached, res.targets)
  with pytest.raises(ValueError, match="expected the value search of the 2 requests, got 3"):
    memit_edits(tiny.model, tiny.layout, [0, 1], tiny.world.tokenize, reqs[:2],
                tiny_covariances, values=res.values)


def test_memit_refuses_two_targets_for_one_prompt_and_subject(tiny):
  """Contradictory requests would ask one key to give two hidden states: refused by name
  before the value search (covariances are never read); identical ones are kept."""
  w = tiny.world
  rel = w.relations[0]
  a = Request("we read that {}", w.subjects[0], rel.objects[1])
  b = Request("we read that {}", w.subjects[0], rel.objects[2])
  other = Request("we read that {}", w.subjects[1], rel.objects[2])
  want = (rf"requests: expected one target per prompt and subject, got '{rel.objects[1]}' "
          rf"\(request 0\) and '{rel.objects[2]}' \(request 2\) for prompt 'we read that "
          rf"\{{\}}' with subject '{w.subjects[0]}'")
  with pytest.raises(ValueError, match=want):
    memit_edits(tiny.model, tiny.layout, [0, 1], w.tokenize, [a, other, b], {0: None, 1: None})
  # The same text with the subject split elsewhere is the same key: also refused.
  first, rest = w.subjects[0].split(" ", 1)
  moved = Request("we read that " + first + " {}", rest, rel.objects[2])
  with pytest.raises(ValueError, match=r"\(request 1\) for prompt .*the same text"):
    check_requests([a, moved])
  assert check_requests([a, other, a]) is None  # duplicates are consistent


def test_memit_refuses_token_ids_outside_the_vocabulary_and_an_unreachable_last_block(
    tiny, tiny_covariances):
  w = tiny.world
  V = tiny.config.vocab_size
  req = Request("we read that {}", w.subjects[0], w.relations[0].objects[1])
  word = req.subject.split()[-1]
  tok = lambda s: [-3 if x == word else i for x, i in zip(s.split(), w.tokenize(s))]
  with pytest.raises(ValueError, match=rf"token ids: expected integers 0 <= id < {V} .*got "
                                       r"-3 from tokenize"):
    memit_edits(tiny.model, tiny.layout, [0, 1], tok, [req], tiny_covariances)
  # z is found at block 1, the last: a subject before the prompt's end cannot move it.
  # (Two requests, the second refused: test_lm_sequential's compiled search.)
  inside = Request("{} is known that", w.subjects[0], w.relations[0].objects[1])
  with pytest.raises(ValueError, match=r"address \('h_1', 'mlp', 'c_proj'\): expected a "
                                       r"memory whose output .* reaches the prediction, got "
                                       r"one that cannot change it for request 1 "):
    memit_edits(tiny.model, tiny.layout, [0, 1], w.tokenize, [req, inside], tiny_covariances)


def test_memit_refuses_non_integer_layers_and_bad_penalties_before_the_search(tiny):
  """Block indices went through int(): 0.7 became block 0 and True block 1, silently; a
  penalty λ <= 0 or NaN was refused only by the insert, after the whole value search."""
  w = tiny.world
  req = Request("we read that {}", w.subjects[0], w.relations[0].objects[1])
  for layers, got in (([0.7, 1], "0.7"), ([True], "True"),
                      (np.array([0.0, 1.0]), r"np.float64\(0.0\)")):
    with pytest.raises(ValueError, match=rf"layers: expected integer block indices, got {got}"):
      memit_edits(tiny.model, tiny.layout, layers, w.tokenize, [req], {0: None, 1: None})
  with pytest.raises(ValueError, match=r"layers: expected a sequence of block indices such "
                                       r"as \[1, 2\], got 1"):
    memit_edits(tiny.model, tiny.layout, 1, w.tokenize, [req], {1: None})
  # λ is checked before the value search, not once it is done.
  for penalty in (0.0, -5.0, float("nan"), "1e3"):
    with pytest.raises(ValueError, match=rf"penalty: expected a positive finite number "
                                         rf"\(λ\), got {re.escape(repr(penalty))}"):
      memit_edits(tiny.model, tiny.layout, [0, 1], w.tokenize, [req], {0: None, 1: None},
                  penalty=penalty)


def _plain_states(tiny, reqs, block):
  batch = encode(tiny.world.tokenize, [prompt_rows(r, ("{}",))[0] for r in reqs])
  _, (h,) = read_states(tiny.model, batch.ids[:len(reqs)], batch.last[:len(reqs)],
                        outputs_of=[tiny.layout.blocks[block]])
  return h


def test_memit_refuses_a_reused_value_search_of_other_requests(tiny, tiny_covariances):
  """``values=`` of the same number of requests in another order, or found at another
  last block, gave other targets z, and edits towards them, silently. Their z0 are the
  hidden states where they were searched: they must be this model's, here."""
  w = tiny.world
  reqs = [c.request for c in world_cases(w, 2, seed=4)]
  h1 = _plain_states(tiny, reqs, 1)
  n, d = h1.shape
  delta = np.full((n, d), 0.1, np.float32)
  zeros = np.zeros((n,), np.float32)

  def search(ref0):
    return ValueResult(delta, ref0, ref0, zeros, zeros, np.zeros((n,), np.int32))

  res = memit_edits(tiny.model, tiny.layout, [1], w.tokenize, reqs, tiny_covariances,
                    penalty=1e-4, values=search(h1))
  np.testing.assert_allclose(res.targets, h1 + delta, rtol=1e-6)
  for ref0 in (h1[::-1], _plain_states(tiny, reqs, 0)):  # another order, another block
    with pytest.raises(ValueError, match=r"values: expected the value search of these "
                                         r"requests, in this order, at the last block"):
      memit_edits(tiny.model, tiny.layout, [1], w.tokenize, reqs, tiny_covariances,
                  values=search(ref0))
  with pytest.raises(TypeError, match="values: expected the ValueResult of an earlier call"):
    memit_edits(tiny.model, tiny.layout, [1], w.tokenize, reqs, tiny_covariances,
                values=tuple(search(h1))[:3])
  # z0 is read at the first context: it must be the plain prompt the states are read at.
  with pytest.raises(ValueError, match=r"contexts: expected templates starting with '\{\}'"):
    memit_edits(tiny.model, tiny.layout, [1], w.tokenize, reqs, tiny_covariances,
                contexts=("we read that {}", "{}"))


def test_memit_checks_every_covariance_before_the_value_search(tiny, tiny_covariances,
                                                               monkeypatch):
  import memedit.lm.memit as memit_module

  def no_search(*a, **k):
    raise AssertionError("the value search ran before C was checked")

  monkeypatch.setattr(memit_module, "optimize_values", no_search)
  reqs = [c.request for c in world_cases(tiny.world, 2, seed=4)]
  C1 = np.asarray(tiny_covariances[1])
  d = C1.shape[0]
  nan = C1.copy()
  nan[0, 0] = np.nan
  for bad, msg in ((np.eye(d + 1), rf"covariances\[1\]: expected a square matrix of shape "
                                   rf"\({d}, {d}\)"),
                   (nan, r"covariances\[1\]: expected finite entries"),
                   (-np.eye(d), r"covariances\[1\]: expected a positive semi-definite")):
    with pytest.raises(ValueError, match=msg):
      memit_edits(tiny.model, tiny.layout, [0, 1], tiny.world.tokenize, reqs,
                  {0: tiny_covariances[0], 1: bad})
