"""Causal tracing: restoring the last block's state at the last token gives back the clean
probability, restoring a state the noise never reached changes nothing, and the PNGs."""

from __future__ import annotations

import re

import numpy as np
import pytest
from PIL import Image

from memedit.lm.tracing import CATEGORIES, causal_trace, trace_png, trace_summary


def test_trace_exact_cells_and_png(tiny, tmp_path):
  w = tiny.world
  prompt = w.relations[0].template(0, 0)  # "the home of {}"
  subject = w.subjects[2]
  first = len(prompt.split("{}")[0].split())  # tokens before the subject
  last = first + len(subject.split()) - 1
  # Two noise samples (more than one, so that the mean over samples is checked too) on a
  # prompt of at most 8 tokens: the trace program of test_lm_cli's `lm-trace --samples 2`
  # (a model of the same shapes).
  res = causal_trace(tiny.model, tiny.layout, w.tokenize, prompt, subject,
                     target=w.object_of(2, 0), decode=w.decode, samples=2)
  n_tok = len(w.tokenize(prompt.format(subject)))
  assert res.scores.shape == (n_tok, 2)
  assert res.subject == (first, last) and res.tokens[first:last + 1] == tuple(subject.split())
  assert res.target == w.object_of(2, 0)
  # The last block's output at the last token is what the head reads: restoring it
  # restores the clean run exactly.
  np.testing.assert_allclose(res.scores[-1, -1], res.clean, rtol=1e-5)
  # Tokens before the subject never see the noise: restoring them changes nothing.
  np.testing.assert_allclose(res.scores[:first], res.corrupted, rtol=1e-5)
  assert abs(res.clean - res.corrupted) > 1e-4  # the noise does matter here
  mlp = causal_trace(tiny.model, tiny.layout, w.tokenize, prompt, subject, decode=w.decode,
                     samples=2, kind="mlp")
  assert mlp.scores.shape == (n_tok, 2) and mlp.kind == "mlp"
  path = trace_png(res.scores, res.tokens, tmp_path / "t.png", title="trace",
                   marked=range(first, last + 1))
  img = Image.open(path)
  assert img.format == "PNG" and img.size[0] > 2 * 34 and img.size[1] > n_tok * 20
  summary = trace_summary([res, mlp])
  assert summary.shape == (len(CATEGORIES), 2)
  # The subject ends these prompts: its last token is the prompt's last token, counted as
  # "last subject token"; "last token" has no other token left.
  assert last == n_tok - 1
  np.testing.assert_allclose(summary[2], (res.scores[-1] + mlp.scores[-1]) / 2)
  np.testing.assert_allclose(summary[0], (res.scores[first] + mlp.scores[first]) / 2)
  assert np.isnan(summary[-1]).all()
  assert np.isnan(summary[1]).all()  # two-token names have no middle subject tokens
  trace_png(summary, CATEGORIES, tmp_path / "avg.png", kind="mlp")
  assert Image.open(tmp_path / "avg.png").size[1] > len(CATEGORIES) * 20


def test_trace_refuses_arguments_that_measure_nothing(tiny):
  w = tiny.world
  prompt, subject = w.relations[0].template(1, 0), w.subjects[2]
  cases = [({"samples": 0}, "samples: expected a positive integer, got 0"),
           ({"samples": 2.5}, "samples: expected a positive integer, got 2.5"),
           ({"noise": float("nan")}, "noise: expected a finite positive standard deviation"),
           ({"noise": -1.0}, "noise: expected a finite positive standard deviation, got -1.0"),
           ({"target": " "}, "target: expected an object with at least one token, got ' '")]
  for kwargs, message in cases:
    with pytest.raises(ValueError, match=re.escape(message)):
      causal_trace(tiny.model, tiny.layout, w.tokenize, prompt, subject, **kwargs)


def _gpt2_like(tiny):
  """The world's words, split as GPT-2's byte-level BPE splits text: a space joins the word
  after it (" Tavo"), and trailing spaces are a token of their own."""
  w = tiny.world
  index = {x: i for i, x in enumerate(w.vocab)}
  space = index["."]  # any id: the lone-space token
  return lambda s: [index[p.strip()] if p.strip() else space
                    for p in re.findall(r" ?[^\s]+|\s+(?!\S)|\s+", s)]


def test_trace_finds_the_subject_with_a_tokenizer_that_keeps_trailing_spaces(tiny):
  """With GPT-2's tokenizer "we read that " ends with a lone-space token that
  "we read that Tavo" does not have: counting the tokens of the text before the subject
  put the subject's first token one too far (a one-token subject was refused, the first
  token of a longer one never corrupted)."""
  w = tiny.world
  tok = _gpt2_like(tiny)
  subject = w.subjects[2]
  assert len(tok("we read that ")) == 4 and len(tok("we read that " + subject)) == 5
  res = causal_trace(tiny.model, tiny.layout, tok, "we read that {}", subject, samples=1,
                     noise=1.0)
  assert res.subject == (3, 4)
  single = subject.split()[0]
  res = causal_trace(tiny.model, tiny.layout, tok, "we read that {} the home of", single,
                     samples=1, noise=1.0)
  assert res.subject == (3, 3)


def test_trace_refuses_ids_the_model_does_not_know_and_targets_of_no_tokens(tiny):
  """A target id past the vocabulary was read from a clamped index (the probability of
  another token), a prompt id past it gave NaN, a target of no tokens an IndexError."""
  w = tiny.world
  V = tiny.config.vocab_size
  prompt, subject, obj = "we read that {}", w.subjects[2], w.relations[0].objects[1]
  tok = lambda s: [V + 1 if x == obj else i for x, i in zip(s.split(), w.tokenize(s))]
  with pytest.raises(ValueError, match=rf"token ids: expected integers 0 <= id < {V} .*got "
                                       rf"{V + 1} from tokenize\(' {obj}'\)"):
    causal_trace(tiny.model, tiny.layout, tok, prompt, subject, target=obj, samples=1)
  word = subject.split()[0]
  tok = lambda s: [-2 if x == word else i for x, i in zip(s.split(), w.tokenize(s))]
  with pytest.raises(ValueError, match=r"token ids: expected integers .* got -2 from "
                                       r"tokenize\('we read that "):
    causal_trace(tiny.model, tiny.layout, tok, prompt, subject, samples=1)
  index = {x: i for i, x in enumerate(w.vocab)}
  dropping = lambda s: [index[x] for x in s.split() if x in index]
  with pytest.raises(ValueError, match="expected a target of at least one token, got 'zzz'"):
    causal_trace(tiny.model, tiny.layout, dropping, prompt, subject, target="zzz", samples=1)
  with pytest.raises(ValueError, match=r"subject: expected a non-empty string, got None"):
    causal_trace(tiny.model, tiny.layout, w.tokenize, prompt, None, samples=1)
