"""The editing experiments on the demo world: statistics, contexts, and the evaluation of
ROME, MEMIT and fine-tuning with the field's scores.

:func:`evaluate_methods` runs, on one trained model and its world:

- single ROME edits: ``single`` independent edits, each applied alone to the model and
  scored (efficacy, paraphrase, neighbourhood, unedited accuracy), then reverted;
- MEMIT with 1, 10, 100, 1,000 (``batches``) facts written in one batch;
- fine-tuning the ROME layer on the same targets (single edits, and each batch size).

Every edit goes through :func:`memedit.apply_edit` and is reverted with
:func:`memedit.revert_edit`; that the model comes back bit for bit is checked each time.
"""

from __future__ import annotations

import time
from typing import Any, Sequence

import jax
import numpy as np

import memedit
from memedit.lm.evaluate import evaluate_cases, summarize, top1_accuracy, world_cases, world_facts
from memedit.lm.finetune import finetune_edit
from memedit.lm.hooks import LMLayout
from memedit.lm.keys import sample_contexts
from memedit.lm.memit import memit_edits
from memedit.lm.rome import rome_edits
from memedit.lm.stats import lm_second_moment
from memedit.lm.world import World, text_batches

__all__ = ["METRICS", "apply_all", "demo_contexts", "evaluate_methods", "format_table",
           "revert_all", "world_covariance"]

#: Score names of a row of the evaluation table, in order.
METRICS = ("efficacy", "efficacy_prob", "paraphrase", "paraphrase_prob", "neighbourhood",
           "neighbourhood_prob", "unedited", "unedited_drop")


def demo_contexts(model, world: World, *, per_length: int = 5, lengths=(5, 10),
                  seed: int = 0) -> tuple[str, ...]:
  """ROME's context templates sampled from the demo model: ``"{}"`` and ``per_length``
  samples of each length, started from the words that begin the world's sentences."""
  starts = ("it", "people", "we") + tuple(world.subjects[i].split()[0] for i in range(2))
  return sample_contexts(model, world.tokenize, world.decode, starts, lengths=lengths,
                         per_length=per_length, seed=seed, joiner=" . ")


def world_covariance(model, world: World, address, *, tokens: int = 200_000,
                     batch: int = 64, length: int = 32, cache_dir=None) -> np.ndarray:
  """C = E[k kᵀ] of the memory at ``address`` over about ``tokens`` tokens of the
  world's text (cached under ``cache_dir``)."""
  batches = text_batches(world, tokens, batch, length, seed=world.seed + 7)
  spec = {"world_seed": world.seed, "subjects": len(world.subjects), "tokens": tokens,
          "batch": batch, "length": length, "vocab": world.vocab_size}
  return lm_second_moment(model, address, batches, spec=spec, cache_dir=cache_dir)


def apply_all(params, edits: Sequence, history=None):
  """``params`` with ``edits`` applied in order; returns ``(params, history)``."""
  for e in edits:
    params, history = memedit.apply_edit(params, e, history)
  return params, history


def revert_all(params, edits: Sequence, history):
  """``params`` with ``edits`` reverted (last first); returns ``(params, history)``."""
  for e in reversed(list(edits)):
    params, history = memedit.revert_edit(params, e, history)
  return params, history


def _same_bits(a, b) -> bool:
  la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
  return len(la) == len(lb) and all(
      np.asarray(x).dtype == np.asarray(y).dtype
      and np.array_equal(np.asarray(x).view(np.uint8), np.asarray(y).view(np.uint8))
      for x, y in zip(la, lb))


def _score(model, world, cases, facts, base_unedited):
  scores = summarize(evaluate_cases(model, world.tokenize, cases))
  acc = 100.0 * top1_accuracy(model, world.tokenize, facts)
  scores["unedited"] = acc
  scores["unedited_drop"] = base_unedited - acc
  return scores


def _mean_rows(rows: list[dict]) -> dict:
  return {k: float(np.nanmean([r[k] for r in rows])) for k in rows[0]}


def evaluate_methods(model, world: World, layout: LMLayout, *, rome_layer: int,
                     memit_layers: Sequence[int], covariances: dict, contexts: Sequence[str],
                     single: int = 20, batches: Sequence[int] = (1, 10, 100, 1000),
                     unedited_facts: int = 2000, penalty: float = 15000.0,
                     rome_options: dict | None = None, memit_options: dict | None = None,
                     ft_options: dict | None = None, finetune: bool = True, seed: int = 0,
                     log=None) -> dict[str, Any]:
  """The evaluation table (see the module docstring).

  Args:
    model: the demo LM ``(module, variables)``.
    world: its world.
    layout: the model's :class:`LMLayout`.
    rome_layer: the block whose MLP ROME (and fine-tuning) edits.
    memit_layers: the blocks MEMIT spreads over.
    covariances: ``{layer: C}`` for ``rome_layer`` and every MEMIT layer.
    contexts: context templates for keys, values and fine-tuning.
    single: number of independent single ROME (and fine-tuning) edits.
    batches: MEMIT batch sizes.
    unedited_facts: facts about unedited subjects for the accuracy.
    penalty: MEMIT's λ.
    rome_options, memit_options: value-search options.
    ft_options: ``finetune_edit`` options (steps, learning_rate).
    finetune: include the fine-tuning baseline.
    seed: seed of the edit cases.
    log: callable(str) for progress lines.

  Returns:
    ``{"rows": [{"method", "edits", scores..., "seconds"}], "base": {...}}``.
  """
  say = log or (lambda s: None)
  module, params = model
  rows = []
  n_max = max([single] + list(batches))
  all_cases = world_cases(world, n_max, seed=seed)
  edited_subjects = [c.request.subject for c in all_cases]
  facts = world_facts(world, unedited_facts, seed=seed + 11, exclude=edited_subjects)
  base = _score(model, world, all_cases[:max(single, 1)], facts, 0.0)
  base_acc = base["unedited"]
  base["unedited_drop"] = 0.0
  rows.append({"method": "none", "edits": 0, **base, "seconds": 0.0})
  say(f"unedited model: {base}")
  rome_addr = layout.memories[rome_layer]

  def run_single(name, make):
    t0 = time.perf_counter()
    edits = make(all_cases[:single])
    seconds = time.perf_counter() - t0
    per = []
    for case, edit in zip(all_cases[:single], edits):
      p, h = memedit.apply_edit(params, edit)
      per.append(_score((module, p), world, [case], facts, base_acc))
      back, _ = memedit.revert_edit(p, edit, h)
      if not _same_bits(back, params):
        raise AssertionError(f"{name}: reverting an edit did not restore the model's bits")
    row = {"method": name, "edits": 1, **_mean_rows(per), "seconds": seconds / single,
           "samples": single}
    say(f"{name}: {row}")
    rows.append(row)

  if single:
    run_single("ROME", lambda cases: [r.edit for r in rome_edits(
        model, rome_addr, world.tokenize, [c.request for c in cases], covariances[rome_layer],
        contexts=contexts, value_options=rome_options)])
    if finetune:
      run_single("FT", lambda cases: [finetune_edit(
          model, rome_addr, world.tokenize, [c.request], contexts=contexts,
          **(ft_options or {})).edit for c in cases])
  for n in batches:
    cases = all_cases[:n]
    reqs = [c.request for c in cases]
    methods = [("MEMIT", lambda: memit_edits(
        model, layout, memit_layers, world.tokenize, reqs, covariances, penalty=penalty,
        contexts=contexts, value_options=memit_options).edits)]
    if finetune:
      methods.append(("FT", lambda: [finetune_edit(
          model, rome_addr, world.tokenize, reqs, contexts=("{}",),
          **(ft_options or {})).edit]))
    for name, make in methods:
      t0 = time.perf_counter()
      edits = make()
      seconds = time.perf_counter() - t0
      p, h = apply_all(params, edits)
      scores = _score((module, p), world, cases, facts, base_acc)
      back, _ = revert_all(p, edits, h)
      if not _same_bits(back, params):
        raise AssertionError(f"{name}: reverting the edits did not restore the model's bits")
      row = {"method": name, "edits": n, **scores, "seconds": seconds}
      say(f"{name} x{n}: {row}")
      rows.append(row)
  return {"rows": rows, "base": base}


def format_table(rows: Sequence[dict]) -> str:
  """The evaluation rows as a Markdown table (percentages; time in seconds)."""
  head = ("| method | edits | efficacy | P(new)>P(old) | paraphrase | neighbourhood | "
          "P(old)>P(new) | unedited acc. | drop | time (s) |")
  lines = [head, "|" + "---|" * 10]
  for r in rows:
    lines.append(f"| {r['method']} | {r['edits']} | {r['efficacy']:.1f} | "
                 f"{r['efficacy_prob']:.1f} | {r['paraphrase']:.1f} | "
                 f"{r['neighbourhood']:.1f} | {r.get('neighbourhood_prob', float('nan')):.1f} | "
                 f"{r['unedited']:.1f} | {r['unedited_drop']:+.2f} | {r['seconds']:.2f} |")
  return "\n".join(lines)
