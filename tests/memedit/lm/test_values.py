"""The value search: it lowers the loss, reaches the new object, keeps ‖δ‖ within the
clamp, stops early, and its loss pieces match a float64 recomputation."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from compilations import Compilations
from memedit.lm.evaluate import score_targets
from memedit.lm.hooks import run_lm
from memedit.lm.prompts import Request
from memedit.lm.values import add_at_tokens, check_reach, optimize_values

CONTEXTS = ("{}", "people say that {}")


def _requests(tiny):
  """Prompts that end with the subject: the tiny random model's one attention layer above
  the edited MLP can carry little from an earlier token, so δ acts at the last token."""
  w = tiny.world
  out = []
  for s, r, new in ((1, 0, 2), (7, 1, 3), (11, 0, 0)):
    rel = w.relations[r]
    obj = rel.objects[new] if rel.objects[new] != w.object_of(s, r) else rel.objects[new - 1]
    out.append(Request("we read that {}", w.subjects[s], obj, w.object_of(s, r)))
  return out


def _predict_with_delta(tiny, req, delta, layer):
  ids = tiny.world.tokenize(req.text)
  last = len(ids) - 1
  hook = lambda x, out: add_at_tokens(out, jnp.array([last]), jnp.asarray(delta)[None])
  logits, _ = run_lm(tiny.module, tiny.variables, jnp.asarray([ids]),
                     hooks={tiny.layout.memories[layer]: hook})
  lp = jax.nn.log_softmax(np.asarray(logits[0, -1], np.float64))
  return int(np.argmax(lp)), float(lp[tiny.world.tokenize(req.target_new)[0]])


def test_value_search_reaches_the_new_objects(tiny):
  reqs = _requests(tiny)
  res = optimize_values(tiny.model, tiny.layout.memories[0], tiny.world.tokenize, reqs,
                        CONTEXTS, steps=60, clamp=100.0, chunk=2)  # 2 chunks, one program
  assert res.delta.shape == (3, tiny.config.n_embd)
  before, _ = score_targets(tiny.model, tiny.world.tokenize,
                            [(r.text, r.target_new) for r in reqs])
  for i, req in enumerate(reqs):
    top, lp = _predict_with_delta(tiny, req, res.delta[i], 0)
    assert tiny.world.decode([top]) == req.target_new
    assert lp > before[i] + 1.0  # the new object became far more likely
    assert res.nll[i] < -before[i]
    assert 0 < res.steps[i] <= 60
    assert res.loss[i] >= res.nll[i]
  # value0 is the MLP output at the subject's last token of the plain prompt.
  _, rec = run_lm(tiny.module, tiny.variables,
                  jnp.asarray([tiny.world.tokenize(reqs[0].text)]),
                  record=[tiny.layout.memories[0]])
  last = len(tiny.world.tokenize(reqs[0].text)) - 1
  np.testing.assert_allclose(res.value0[0], np.asarray(rec[tiny.layout.memories[0]][1][0, last]),
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(res.value0, res.ref0)


def test_value_search_clamp_and_early_stop(tiny):
  reqs = _requests(tiny)[:2]
  res = optimize_values(tiny.model, tiny.layout.memories[0], tiny.world.tokenize, reqs,
                        CONTEXTS, steps=60, clamp=0.05, chunk=2)
  norms = np.linalg.norm(res.delta, axis=-1)
  assert np.all(norms <= 0.05 * np.linalg.norm(res.ref0, axis=-1) * (1 + 1e-5))
  assert np.all(norms > 0)
  # A loss threshold above the starting loss stops every request before its first step.
  # The step count is an argument of the compiled search, not part of it: searches of
  # other lengths reuse the program of the one above.
  with Compilations() as c:
    res = optimize_values(tiny.model, tiny.layout.memories[0], tiny.world.tokenize, reqs,
                          CONTEXTS, steps=7, clamp=100.0, chunk=2, stop_loss=1e9)
  assert c.count == 0, c.events
  np.testing.assert_array_equal(res.steps, 0)
  np.testing.assert_array_equal(res.delta, 0.0)
  # MEMIT's variant reads z0 at the block output (the residual stream), not the MLP's.
  res = optimize_values(tiny.model, tiny.layout.memories[1], tiny.world.tokenize, reqs,
                        CONTEXTS, steps=0, chunk=2, reference=tiny.layout.blocks[1])
  assert not np.allclose(res.ref0, res.value0)


def test_the_last_blocks_mlp_cannot_reach_a_prediction_before_the_subjects_end(tiny):
  """The premise of check_reach, measured: a large δ at the subject's token of the last
  block's MLP leaves the logits at the prompt's end as they were; in block 0 (attention
  above it) it moves them. check_reach refuses the first case only, and passes a subject
  at the prompt's end in any block."""
  w = tiny.world
  inside = Request("{} is known that", w.subjects[0], w.relations[0].objects[1])
  ids = jnp.asarray([w.tokenize(inside.text)])
  at = jnp.array([len(w.tokenize(inside.subject)) - 1])
  delta = jnp.asarray(10 * np.random.default_rng(0).normal(size=(1, tiny.config.n_embd)),
                      jnp.float32)
  clean, _ = run_lm(tiny.module, tiny.variables, ids)
  moved = {}
  for layer in (0, 1):
    hook = lambda x, out: add_at_tokens(out, at, delta)
    out, _ = run_lm(tiny.module, tiny.variables, ids, hooks={tiny.layout.memories[layer]: hook})
    moved[layer] = float(np.max(np.abs(np.asarray(out[0, -1]) - np.asarray(clean[0, -1]))))
  assert moved[1] < 1e-6 and moved[0] > 1e-2
  with pytest.raises(ValueError, match=r"cannot change it for request 1 .*edit an earlier "
                                       r"block, or put the subject at the end of the prompt"):
    # (One request per call: the program test_rome's refusal compiles.)
    optimize_values(tiny.model, tiny.layout.memories[1], w.tokenize,
                    [_requests(tiny)[0], inside], steps=1, chunk=1)
  assert check_reach(tiny.model, tiny.layout.memories[0], w.tokenize, [inside]) is None
  assert check_reach(tiny.model, tiny.layout.memories[1], w.tokenize, _requests(tiny)) is None


def test_value_search_refuses_target_ids_outside_the_vocabulary(tiny):
  w = tiny.world
  req = _requests(tiny)[0]
  V = tiny.config.vocab_size
  tok = lambda s: [V + 5 if x == req.target_new else i for x, i in zip(s.split(), w.tokenize(s))]
  with pytest.raises(ValueError, match=rf"token ids: expected integers 0 <= id < {V} .*got "
                                       rf"{V + 5} from tokenize\(' {req.target_new}'\)"):
    optimize_values(tiny.model, tiny.layout.memories[0], tok, [req], steps=1)


def test_value_search_refuses_settings_that_give_nan_or_nothing(tiny):
  """A NaN learning rate or an infinite weight decay made δ NaN, a negative clamp flipped
  δ, no contexts averaged the NLL over no rows (NaN) and read z0 at the essence prompt:
  all came back as results. They are refused by name before anything runs."""
  w = tiny.world
  req = _requests(tiny)[0]
  addr = tiny.layout.memories[0]
  cases = [({"learning_rate": float("nan")}, "learning_rate: expected a positive finite "
                                              "number, got nan"),
           ({"learning_rate": -0.5}, "learning_rate: expected a positive finite number"),
           ({"weight_decay": float("inf")}, "weight_decay: expected a non-negative finite "
                                            "number, got inf"),
           ({"kl_factor": -1.0}, "kl_factor: expected a non-negative finite number, got -1.0"),
           ({"clamp": -1.0}, "clamp: expected a positive number (inf: no clamp), got -1.0"),
           ({"clamp": 0}, "clamp: expected a positive number (inf: no clamp), got 0"),
           ({"stop_loss": float("nan")}, "stop_loss: expected a number"),
           ({"learning_rate": "0.5"}, "learning_rate: expected a positive finite number, "
                                      "got '0.5'"),
           ({"essence": 3}, "essence: expected a template with exactly one '{}'"),
           ({"contexts": ()}, "contexts: expected a non-empty sequence of templates")]
  for kwargs, message in cases:
    kwargs = {"contexts": CONTEXTS, **kwargs}
    contexts = kwargs.pop("contexts")
    with pytest.raises(ValueError, match=re.escape(message)):
      optimize_values(tiny.model, addr, w.tokenize, [req], contexts, steps=1, **kwargs)
  with pytest.raises(TypeError, match=r"requests\[0\]: expected a Request"):
    optimize_values(tiny.model, addr, w.tokenize, [(req.prompt, req.subject, "x")], steps=1)
  # The step count is an int32 of the compiled search.
  with pytest.raises(ValueError, match=re.escape("steps: expected at most 2147483647 (an "
                                                 "int32 counter), got 2147483648")):
    optimize_values(tiny.model, addr, w.tokenize, [req], steps=2 ** 31)
