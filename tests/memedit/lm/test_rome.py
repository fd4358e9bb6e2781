"""ROME: k* averaged over contexts, the rank-one insert against lm.md's formula in float64,
and the edit as a memedit Edit (apply, revert bit for bit, save / load)."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from compilations import Compilations
from conftest import rel_err

import memedit
from memedit.lm.evaluate import EditCase, evaluate_cases, score_targets
from memedit.lm.keys import (check_memory, layer_weights, read_states, sample_contexts,
                             subject_keys)
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
  texts, lasts = [], []
  for before, subj, after, _ in rows:
    ids = tiny.world.tokenize(before + subj + after)
    last = len(tiny.world.tokenize(before + subj)) - 1
    assert tiny.world.decode([ids[last]]) == req.subject.split()[-1]
    texts.append(ids)
    lasts.append(last)
  # One batch, zero-padded on the right (the model is causal: the key at `last` is that
  # of the row alone).
  batch = np.zeros((len(texts), max(map(len, texts))), np.int32)
  for i, ids in enumerate(texts):
    batch[i, :len(ids)] = ids
  (ref,), _ = read_states(tiny.model, batch, np.array(lasts), inputs_of=[addr])
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
  # The contexts and chunk of test_values' searches: their compiled program.
  res = rome_edits(tiny.model, tiny.layout.memories[0], w.tokenize, reqs,
                   tiny_covariances[0], contexts=("{}", "people say that {}"),
                   value_options={"steps": 60, "clamp": 100.0, "chunk": 2})
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


def _dropping(tiny):
  """The world's tokenizer, dropping words outside its vocabulary (as byte-level
  tokenizers never do, but normalising ones may)."""
  index = {w: i for i, w in enumerate(tiny.world.vocab)}
  return lambda s: [index[w] for w in s.split() if w in index]


def test_a_subject_of_no_tokens_is_refused_not_read_at_another_token(tiny):
  """A subject the tokenizer drops adds no token: its "last token" would be the one before
  it (or, at the prompt's start, position -1 read as token 0), and the key, the value
  search and the edit would silently be about another token."""
  w = tiny.world
  tok = _dropping(tiny)
  obj = w.relations[0].objects[1]
  addr = tiny.layout.memories[0]
  C = np.eye(4 * tiny.config.n_embd, dtype=np.float32)  # never reached
  for prompt in ("we read that {}", "{} the home of"):
    req = Request(prompt, "Nobody Known", obj)
    want = r"encode: expected a subject of at least one token, got 'Nobody Known'"
    with pytest.raises(ValueError, match=want):
      subject_keys(tiny.model, addr, tok, [req])
    with pytest.raises(ValueError, match=want):
      rome_edits(tiny.model, addr, tok, [req], C, value_options={"steps": 1})
  # A subject of known words still reads its own last token.
  req = Request("we read that {}", w.subjects[0], obj)
  np.testing.assert_array_equal(subject_keys(tiny.model, addr, tok, [req]),
                                subject_keys(tiny.model, addr, w.tokenize, [req]))


def test_tokenizer_output_must_be_integer_ids(tiny):
  """Float ids were truncated by int() (1.5 read as 1), a 2-D array or a string failed
  deep inside; they are refused naming the text. Lists, tuples, numpy and JAX arrays of
  any integer dtype, and generators, are token ids."""
  w = tiny.world
  req = Request("we read that {}", w.subjects[0], w.relations[0].objects[1])
  addr = tiny.layout.memories[0]
  text = re.escape(repr(req.text))
  bad = [(lambda s: [i + 0.5 for i in w.tokenize(s)], "dtype float64"),
         (lambda s: np.asarray([w.tokenize(s)]), r"shape \(1, 5\)"),
         (lambda s: s, "str")]
  for tok, got in bad:
    with pytest.raises(ValueError, match=rf"tokenize: expected a 1-D sequence of integer "
                                         rf"token ids, got .*{got}.* from tokenize\({text}\)"):
      subject_keys(tiny.model, addr, tok, [req])
  want = subject_keys(tiny.model, addr, w.tokenize, [req])
  for tok in (lambda s: np.asarray(w.tokenize(s), np.int64), lambda s: tuple(w.tokenize(s)),
              lambda s: jnp.asarray(w.tokenize(s), jnp.int32),
              lambda s: (i for i in w.tokenize(s))):
    np.testing.assert_array_equal(subject_keys(tiny.model, addr, tok, [req]), want)


def test_requests_are_checked_and_their_text_is_what_is_tokenized(tiny):
  """Request.text was str.format of the prompt while the editors tokenize the text around
  its '{}': other braces made .text raise (KeyError) or differ from the edited text."""
  r = Request("{} lives in {x} {{", "Ana", "oslo")
  before, subject, after, _ = prompt_rows(r, ["{}"])[0]
  assert r.text == before + subject + after == "Ana lives in {x} {{"
  for bad in ("", "  ", 3):
    with pytest.raises(ValueError, match=rf"target_true: expected None or a non-empty "
                                         rf"string, got {re.escape(repr(bad))}"):
      Request("{} lives in", "Ana", "oslo", bad)
  w = tiny.world
  addr = tiny.layout.memories[0]
  with pytest.raises(TypeError, match=r"requests\[0\]: expected a Request\(prompt, subject, "
                                      r"target_new\), got tuple"):
    subject_keys(tiny.model, addr, w.tokenize, [("we read that {}", w.subjects[0], "x")])
  with pytest.raises(TypeError, match="requests: expected a sequence of Request, got Request"):
    rome_edits(tiny.model, addr, w.tokenize, Request("{} x", w.subjects[0], "x"), None)
  with pytest.raises(ValueError, match=r"contexts: expected a non-empty sequence of "
                                       r"templates with one '\{\}'"):
    subject_keys(tiny.model, addr, w.tokenize, [Request("{} x", w.subjects[0], "x")], ())


def test_read_states_refuses_positions_outside_the_rows(tiny):
  """A position past the row's end was clamped by JAX's indexing: the last token's state
  came back for it, silently."""
  w = tiny.world
  ids = np.asarray([w.tokenize("we read that " + w.subjects[0])])
  addr = tiny.layout.memories[0]
  (k,), _ = read_states(tiny.model, ids, [4], inputs_of=[addr])
  assert k.shape == (1, 4 * tiny.config.n_embd)
  for pos, msg in (([5], r"positions: expected token positions in \[0, 5\) \(the ids' "
                         r"length\), got 5 in row 0"),
                   ([-1], r"got -1 in row 0"),
                   ([1, 2], r"positions: expected \(1,\) integer token positions, one per "
                            r"row of ids, got shape \(2,\)")):
    with pytest.raises(ValueError, match=msg):
      read_states(tiny.model, ids, pos, inputs_of=[addr])


def test_sample_contexts_settings(tiny):
  """per_length=0 (the CLI's --contexts 0) crashed on max() of nothing; it is the plain
  prompt alone. No starts, a start of no tokens and top_k=0 are refused by name."""
  w = tiny.world
  assert sample_contexts(tiny.model, w.tokenize, w.decode, ["we"], per_length=0) == ("{}",)
  for kwargs, msg in (({"starts": []}, "starts: expected a non-empty sequence of texts"),
                      ({"starts": [""]}, "starts: expected texts of at least one token, got ''"),
                      ({"starts": ["we"], "top_k": 0}, "top_k: expected a positive integer"),
                      ({"starts": ["we"], "per_length": -1},
                       "per_length: expected non-negative integers, got -1")):
    with pytest.raises(ValueError, match=re.escape(msg)):
      sample_contexts(tiny.model, w.tokenize, w.decode, **kwargs)


def test_sampled_contexts_of_every_length_share_one_program(tiny):
  """The sample lengths are arguments of one compiled sampler (of the demo's shapes), not
  a program each: other lengths up to the longest compile nothing more."""
  w = tiny.world
  first = sample_contexts(tiny.model, w.tokenize, w.decode, ["it"], lengths=(5, 10),
                          per_length=1)
  with Compilations() as c:
    again = sample_contexts(tiny.model, w.tokenize, w.decode, ["it"], lengths=(3, 7, 10),
                            per_length=1)
  assert c.count == 0, c.events
  assert len(first) == 3 and len(again) == 4 and first[0] == again[0] == "{}"
  for text, length in zip(again[1:], (3, 7, 10)):
    assert text.endswith(" . {}") and len(text[:-len(" . {}")].split()) == 1 + length, text


def test_evaluation_refuses_malformed_cases_and_unknown_ids(tiny):
  """A paraphrase without '{}' was scored without the subject (str.format leaves it as it
  is), an object id past the vocabulary was scored against a clamped logit (NaN), an
  empty list of cases raised numpy's casting error."""
  w = tiny.world
  s, obj, old = w.subjects[0], w.relations[0].objects[1], w.object_of(0, 0)
  req = Request("we read that {}", s, obj, old)
  with pytest.raises(ValueError, match=r"cases\[0\].paraphrases\[1\]: expected a template "
                                       r"with exactly one '\{\}' for the subject, got 'the "
                                       r"home of'"):
    evaluate_cases(tiny.model, w.tokenize, [EditCase(req, ("the home of {}", "the home of"))])
  with pytest.raises(ValueError, match=r"cases\[0\].neighbours\[0\]: expected a \(prompt "
                                       r"text, object\) pair"):
    evaluate_cases(tiny.model, w.tokenize, [EditCase(req, (), ("the home of x",))])
  V = tiny.config.vocab_size
  tok = lambda t: [V + 2 if x == obj else i for x, i in zip(t.split(), w.tokenize(t))]
  with pytest.raises(ValueError, match=rf"token ids: expected integers 0 <= id < {V} .*got "
                                       rf"{V + 2} from tokenize\(' {obj}'\)"):
    score_targets(tiny.model, tok, [(req.text, obj)])
  out = evaluate_cases(tiny.model, w.tokenize, [])
  assert set(out) >= {"efficacy", "neighbourhood_prob"}
  assert all(v.shape == (0,) for v in out.values())
