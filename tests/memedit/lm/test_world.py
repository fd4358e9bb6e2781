"""The generated world (deterministic, held-out templates never trained), the prompt
batches, and the scores against a float64 recomputation from the model's logits."""

from __future__ import annotations

import numpy as np
import pytest

from memedit.lm.evaluate import (EditCase, evaluate_cases, score_targets, summarize,
                                 world_cases, world_facts)
from memedit.lm.prompts import Request, continuation_ids, encode, subject_span
from memedit.lm.world import load_world, make_world, text_batches, training_batches


def test_world_is_deterministic_and_round_trips(tmp_path):
  a = make_world(seed=5, n_subjects=60, n_relations=3, n_objects=5)
  b = make_world(seed=5, n_subjects=60, n_relations=3, n_objects=5)
  assert a.to_dict() == b.to_dict()
  assert make_world(seed=6, n_subjects=60, n_relations=3, n_objects=5).subjects != a.subjects
  assert len(set(a.subjects)) == 60 and len(set(a.vocab)) == len(a.vocab)
  assert load_world(a.save(tmp_path / "w.json")).to_dict() == a.to_dict()
  one = make_world(seed=5, n_subjects=30, names="single")
  assert all(len(s.split()) == 1 for s in one.subjects)
  pair = make_world(seed=5, n_subjects=30, names="pair")
  assert all(len(s.split()) == 2 for s in pair.subjects) and len(set(pair.subjects)) == 30
  assert len({s.split()[1] for s in a.subjects}) <= 40  # shared surnames
  assert len({s.split()[0] for s in a.subjects}) == 60  # unique given names
  with pytest.raises(ValueError, match="names: expected one of"):
    make_world(names="nope")
  with pytest.raises(ValueError, match="expected words of the world's vocabulary"):
    a.tokenize("Nobody lives in atlantis")
  with pytest.raises(ValueError, match="n_relations: expected 1 to"):
    make_world(n_relations=99)
  (tmp_path / "bad.json").write_text("{}")
  with pytest.raises(ValueError, match="memedit-lm-world"):
    load_world(tmp_path / "bad.json")


def test_training_text_holds_no_paraphrase_and_masks_names():
  w = make_world(seed=1, n_subjects=40, n_relations=4, n_objects=5)
  batches = training_batches(w, 8, 24, seed=0)
  seen = set()  # (relation, template) of every training sentence
  names = {i for s in w.subjects for i in w.tokenize(s)}
  object_of = {o: r for r, rel in enumerate(w.relations) for o in rel.objects}
  for _ in range(40):  # more than one epoch
    ids, mask = next(batches)
    assert ids.shape == (8, 24) and mask.shape == (8, 24)
    assert not np.any(mask[np.isin(ids, list(names))])  # names are never targets
    assert not np.any(mask[ids == 0])
    for row in ids:
      for sent in w.decode(row).split(" ."):
        words = sent.split()
        if not words or words[-1] not in object_of:
          continue  # a sentence cut by the row's end
        text = " ".join(words[:-1])
        subject = next(s for s in w.subjects if s in text)
        seen.add((object_of[words[-1]], text.replace(subject, "{}")))
  for r, rel in enumerate(w.relations):
    assert {t for q, t in seen if q == r} == set(rel.train_templates)
    assert not set(rel.paraphrase_templates) & set(rel.train_templates)
  batches = text_batches(w, 500, 8, 24)
  assert sum(int(m.sum()) for _, m in batches) >= 500


def test_encode_finds_the_subject_and_targets():
  w = make_world(seed=2, n_subjects=10, n_relations=2, n_objects=3)
  s = w.subjects[3]
  assert len(s.split()) == 2
  b = encode(w.tokenize, [("we read that the home of ", s, "", w.relations[0].objects[1])])
  assert b.rows == 8 and b.ids.shape[1] == 8  # bucketed: 8 tokens
  assert int(b.last[0]) == 7 and w.decode([b.ids[0, 7]]) == s.split()[-1]
  assert int(b.end[0]) == 7 and int(b.target_pos[0, 0]) == 7
  assert b.weight.tolist() == [1.0] + [0.0] * 7
  with pytest.raises(ValueError, match="exactly one"):
    Request("{} and {}", s, "x")


def test_encode_with_a_tokenizer_that_adds_a_bos_token():
  """A tokenizer that starts every text with BOS (as Llama's does) put BOS first among
  the target's tokens (the model was trained to predict BOS there) and made it the
  subject's first token when no text came before it."""
  w = make_world(seed=2, n_subjects=10, n_relations=2, n_objects=3)
  BOS = 1
  bos = lambda text: [BOS] + list(w.tokenize(text))
  s, obj = w.subjects[3], w.relations[0].objects[1]
  plain = encode(w.tokenize, [("we read that the home of ", s, "", obj)])
  b = encode(bos, [("we read that the home of ", s, "", obj)])
  n = int(plain.end[0]) + 1
  assert b.ids[0, :n + 1].tolist() == [BOS] + plain.ids[0, :n].tolist()
  assert b.targets[0].tolist() == plain.targets[0].tolist() == list(w.tokenize(" " + obj))
  assert int(b.target_pos[0, 0]) == int(b.end[0]) == n
  assert int(b.last[0]) == int(plain.last[0]) + 1
  assert subject_span(bos, "", s) == (1, len(s.split()))
  assert subject_span(w.tokenize, "", s) == (0, len(s.split()) - 1)
  assert continuation_ids(bos, " " + obj) == list(w.tokenize(" " + obj))
  eos = lambda text: list(w.tokenize(text)) + [2]
  with pytest.raises(ValueError, match=r"tokenize: expected the special tokens it gives every "
                                       r"text \(tokenize\(''\) = \[2\]\) at the start"):
    encode(eos, [("we read that the home of ", s, "", obj)])


def test_scores_match_the_logits(tiny):
  w, model = tiny.world, tiny.model
  cases = world_cases(w, 3, seed=0)
  assert all(isinstance(c, EditCase) for c in cases)
  pairs = [(c.request.text, c.request.target_new) for c in cases]
  lp, top = score_targets(model, w.tokenize, pairs)
  for (prompt, target), got_lp, got_top in zip(pairs, lp, top):
    ids = np.asarray([w.tokenize(prompt)])
    logits = np.asarray(tiny.module.apply(tiny.variables, ids), np.float64)[0, -1]
    ref = logits - np.log(np.sum(np.exp(logits - logits.max()))) - logits.max()
    t = w.tokenize(target)[0]
    assert abs(got_lp - ref[t]) < 1e-4
    assert got_top == (int(np.argmax(logits)) == t)
  scores = evaluate_cases(model, w.tokenize, cases)
  assert set(scores) == {"efficacy", "efficacy_prob", "paraphrase", "paraphrase_prob",
                         "neighbourhood", "neighbourhood_prob"}
  assert all(v.shape == (3,) for v in scores.values())
  old = score_targets(model, w.tokenize, [(c.request.text, c.request.target_true)
                                          for c in cases])[0]
  np.testing.assert_array_equal(scores["efficacy_prob"], (lp > old).astype(float))
  # CounterFact's neighbourhood score: P(neighbour's object) > P(the case's new object).
  assert any(c.neighbours for c in cases)
  for c, got in zip(cases, scores["neighbourhood_prob"]):
    if not c.neighbours:
      assert np.isnan(got)
      continue
    keep = score_targets(model, w.tokenize, list(c.neighbours))[0]
    new = score_targets(model, w.tokenize,
                        [(p, c.request.target_new) for p, _ in c.neighbours])[0]
    assert got == np.mean(keep > new)
  s = summarize(scores)
  assert 0.0 <= s["efficacy"] <= 100.0
  facts = world_facts(w, 20, exclude=[c.request.subject for c in cases])
  assert len(facts) == 20 and not any(c.request.subject in p for c in cases for p, _ in facts)
