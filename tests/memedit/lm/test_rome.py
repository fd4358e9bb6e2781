"""ROME: k* averaged over contexts, the rank-one insert against lm.md's formula in float64,
and the edit as a memedit Edit (apply, revert bit for bit, save / load)."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rel_err

import memedit
from memedit.lm.keys import check_memory, layer_weights, read_states, subject_keys
from memedit.lm.prompts import Request, encode, prompt_rows
from memedit.lm.rome import rome_edits, rome_insert
from memedit.lm.experiment import revert_all

LAYER = 1
CONTEXTS = ("{}", "it is known that {}", "we read that {}")


def _request(tiny, s=0, r=0, new=1):
  w = tiny.world
  rel = w.relations[r]
  return Request(rel.train_templates[0], w.subjects[s], rel.objects[new], w.object_of(s, r))


def _bits_equal(a, b) -> bool:
  return all(np.array_equal(np.asarray(x).view(np.uint8), np.asarray(y).view(np.uint8))
             for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


def test_subject_key_is_the_mean_over_contexts(tiny):
  """k* equals the MLP key at the subject's last token, read per context and averaged in
  float64 here."""
  req = _request(tiny)
  addr = tiny.layout.memories[LAYER]
  got = subject_keys(tiny.model, addr, tiny.world.tokenize, [req], CONTEXTS)
  rows = prompt_rows(req, CONTEXTS)
  ref = []
  for before, subj, after, _ in rows:
    ids = tiny.world.tokenize(before + subj + after)
    last = len(tiny.world.tokenize(before + subj)) - 1
    assert tiny.world.decode([ids[last]]) == req.subject.split()[-1]
    (keys,), _ = read_states(tiny.model, np.array([ids]), np.array([last]), inputs_of=[addr])
    ref.append(keys[0])
  assert got.shape == (1, 4 * tiny.config.n_embd)
  assert rel_err(got[0], np.mean(np.asarray(ref, np.float64), 0)) < 1e-6


def _numpy_rome(W, b, C, k, v):
  """lm.md: W1 = W0 + Λ (C⁻¹k*)ᵀ, Λ = (v* − W0 k*) / ((C⁻¹k*)ᵀ k*), with the layer's bias
  b taken out of the target output v*."""
  W, b, C, k, v = (np.asarray(a, np.float64) for a in (W, b, C, k, v))
  u = np.linalg.solve(C, k)
  lam = (v - b - W @ k) / (u @ k)
  return np.outer(lam, u)


@pytest.mark.parametrize("x64", [False, True])
def test_rome_insert_matches_the_float64_formula(tiny, tiny_covariances, x64):
  req = _request(tiny)
  addr = tiny.layout.memories[LAYER]
  C = tiny_covariances[LAYER]
  view = check_memory(tiny.model, addr, encode(tiny.world.tokenize, prompt_rows(req, ["{}"])).ids)
  k = subject_keys(tiny.model, addr, tiny.world.tokenize, [req], CONTEXTS)[0]
  W, b = layer_weights(view, tiny.model)
  delta = np.random.default_rng(0).normal(size=W.shape[0]).astype(np.float32)
  v = np.asarray(W) @ k + np.asarray(b) + delta
  want = _numpy_rome(W, b, C, k, v)  # (d, key_dim)
  if x64:
    with jax.enable_x64():
      edit = rome_insert(tiny.model, view, C.astype(np.float64), k.astype(np.float64),
                         v.astype(np.float64))
    tol = 1e-5  # factors stored in float32
  else:
    edit = rome_insert(tiny.model, view, C, k, v)
    tol = 2e-3  # float32 solve with C's condition number ~1e4
  assert edit.rank == 1 and edit.kind == "dense" and edit.method == "rome"
  kernel = np.asarray(view.kernel(tiny.model))
  dk = np.asarray(memedit.edit_delta(edit, kernel.shape))
  assert rel_err(dk.T, want) < tol
  # The edited layer writes v* at k*.
  new, _ = memedit.apply_edit(tiny.variables, edit)
  W1, b1 = layer_weights(view, (tiny.module, new))
  out = np.asarray(W1, np.float64) @ k + np.asarray(b1, np.float64)
  assert rel_err(out, v) < (1e-5 if x64 else 1e-3)


def test_rome_edit_end_to_end_revert_and_save(tiny, tiny_covariances, tmp_path):
  """rome_edits: k*, v* by the value search, the insert; the edit makes the new object
  the top-1 prediction, reverts bit for bit, and saves only its factors. (Block 0 and
  prompts ending with the subject: in the tiny random model the one attention layer
  above carries little from earlier tokens.)"""
  w = tiny.world
  reqs = [Request("we read that {}", w.subjects[s], w.relations[r].objects[new])
          for s, r, new in ((0, 0, 1), (5, 1, 2))]
  res = rome_edits(tiny.model, tiny.layout.memories[0], w.tokenize, reqs,
                   tiny_covariances[0], value_options={"steps": 60, "clamp": 100.0})
  assert len(res) == 2
  for req, r in zip(reqs, res):
    params, hist = memedit.apply_edit(tiny.variables, r.edit)
    logits = tiny.module.apply(params, jnp.asarray([tiny.world.tokenize(req.text)]))
    assert tiny.world.decode([int(jnp.argmax(logits[0, -1]))]) == req.target_new
    back, hist = memedit.revert_edit(params, r.edit, hist)
    assert _bits_equal(back, tiny.variables)
    path = memedit.save_edit(tmp_path / r.edit.name, r.edit)
    loaded = memedit.load_edit(path)
    assert loaded.name == r.edit.name and loaded.rank == 1
    np.testing.assert_array_equal(np.asarray(loaded.lam), np.asarray(r.edit.lam))
    np.testing.assert_array_equal(np.asarray(loaded.D), np.asarray(r.edit.D))
  # Both applied (one after the other), then reverted in either order.
  params, hist = memedit.apply_edit(tiny.variables, res[0].edit)
  params, hist = memedit.apply_edit(params, res[1].edit, hist)
  back, _ = revert_all(params, [res[1].edit, res[0].edit], hist)
  assert _bits_equal(back, tiny.variables)


def test_rome_refuses_an_empty_request_list(tiny, tiny_covariances):
  with pytest.raises(ValueError, match="requests: expected at least one request, got none"):
    rome_edits(tiny.model, tiny.layout.memories[0], tiny.world.tokenize, [],
               tiny_covariances[0])


def _replacing(tiny, word, token):
  """The world's tokenizer with ``word`` given the id ``token``."""
  w = tiny.world
  return lambda s: [token if x == word else i for x, i in zip(s.split(), w.tokenize(s))]


@pytest.mark.parametrize("where", ["subject", "target"])
@pytest.mark.parametrize("token", [-1, "vocab_size"])
def test_rome_refuses_token_ids_outside_the_vocabulary_before_the_search(tiny, where, token):
  """Ids outside [0, V) would read a NaN (or wrapped) embedding row and fail only after the
  value search ("expected finite values"); they are refused by name before anything runs."""
  w = tiny.world
  V = tiny.config.vocab_size
  token = V if token == "vocab_size" else token
  req = Request("we read that {}", w.subjects[0], w.relations[0].objects[1])
  word = req.subject.split()[-1] if where == "subject" else req.target_new
  text = req.text if where == "subject" else " " + req.target_new
  want = (rf"token ids: expected integers 0 <= id < {V} \(the model's vocabulary: its "
          rf"logits' last axis\), got {token} from tokenize\({re.escape(repr(text))}\)")
  C = np.eye(4 * tiny.config.n_embd, dtype=np.float32)  # never reached
  with pytest.raises(ValueError, match=want):
    rome_edits(tiny.model, tiny.layout.memories[0], _replacing(tiny, word, token), [req], C,
               value_options={"steps": 1})
  if where == "subject":
    with pytest.raises(ValueError, match=want):
      subject_keys(tiny.model, tiny.layout.memories[0], _replacing(tiny, word, token), [req])
  # In range, the same request is read.
  assert subject_keys(tiny.model, tiny.layout.memories[0], w.tokenize, [req]).shape == (
      1, 4 * tiny.config.n_embd)


def test_rome_refuses_the_last_block_when_the_subject_is_not_at_the_prompts_end(tiny):
  """In the last block nothing mixes positions after the MLP, so δ at the subject's token
  cannot change the prediction at the prompt's end (the value search would end at δ = 0
  and write the old value): refused before the search, saying what to do."""
  w = tiny.world
  req = Request("{} is known that", w.subjects[0], w.relations[0].objects[1])
  C = np.eye(4 * tiny.config.n_embd, dtype=np.float32)  # never reached
  want = (r"address \('h_1', 'mlp', 'c_proj'\): expected a memory whose output at the "
          r"subject's last token reaches the prediction, got one that cannot change it for "
          rf"request 0 \({re.escape(repr(req.text))} -> {re.escape(repr(req.target_new))}\)"
          r".*edit an earlier block, or put the subject at the end of the prompt")
  with pytest.raises(ValueError, match=want):
    rome_edits(tiny.model, tiny.layout.memories[1], w.tokenize, [req], C,
               value_options={"steps": 1})
