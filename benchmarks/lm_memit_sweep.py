"""MEMIT at many facts on the demo GPT-2: the trade-off between efficacy and specificity
over the penalty λ and the edited blocks.

One value search per last block (the targets z of ``--facts`` facts, MEMIT's 25 steps),
reused through ``memit_edits(..., values=)`` for every first block and every λ; each
setting is applied, scored like ``memedit lm-eval`` (efficacy, paraphrase, neighbourhood
on the edited cases; top-1 accuracy on 2,000 facts about unedited subjects) and reverted.

Scores: top-1 efficacy / neighbourhood and CounterFact's P(new) > P(old) /
P(old) > P(new) (``efficacy_prob``, ``neighbourhood_prob``).

Usage: python benchmarks/lm_memit_sweep.py [--facts N] [--last 2,3] [--first 0] [--penalties ...]
       [--inner N] [--names surname|single|pair] [--embd N] [--blocks N] [--subjects N]
       [--steps N] [--seed N] [--quick] [--out-dir DIR]
Writes benchmarks/results/lm_memit_sweep[_innerN][_names][_embdN][_blocksN][_subjectsN]
[_stepsN][_seedN].json (the model: the demo's settings with those changed), with the
sweep's own options given other values than their defaults named before those (e.g.
lm_memit_sweep_facts100_inner512.json); ``--out-dir DIR``: in DIR.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (add_out_dir, nonnegative_int, number_list, positive_float,
                               positive_int, results_path, shown, table, write_to)
from memedit.lm.evaluate import evaluate_cases, summarize, top1_accuracy, world_cases, world_facts
from memedit.lm.experiment import apply_all, demo_contexts, world_covariance
from memedit.lm.memit import memit_edits
from memedit.lm.train import DemoConfig, train_demo
from ports.gpt2 import lm_layout


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--facts", type=positive_int, default=1000, help="facts in the batch (1000)")
  ap.add_argument("--last", type=number_list(nonnegative_int), default=[2, 3],
                  help="last blocks, e.g. 2,3")
  ap.add_argument("--first", type=number_list(nonnegative_int), default=None,
                  help="first blocks, e.g. 0 (default: every block up to the last)")
  ap.add_argument("--penalties", type=number_list(positive_float),
                  default=[100, 300, 1000, 3000, 10000], help="λ values, e.g. 100,1000")
  ap.add_argument("--inner", type=nonnegative_int, default=None,
                  help="MLP width (default: the demo's; 0: 4 n_embd)")
  ap.add_argument("--names", default="surname", choices=("surname", "single", "pair"))
  ap.add_argument("--embd", type=nonnegative_int, default=0,
                  help="residual width (0: the demo's)")
  ap.add_argument("--blocks", type=nonnegative_int, default=0, help="blocks (0: the demo's)")
  ap.add_argument("--subjects", type=nonnegative_int, default=0,
                  help="subjects (0: the demo's)")
  ap.add_argument("--steps", type=nonnegative_int, default=0,
                  help="training steps (0: the demo's)")
  ap.add_argument("--unedited", type=positive_int, default=2000, help="unedited facts scored")
  ap.add_argument("--seed", type=nonnegative_int, default=0,
                  help="seed of the edited cases (0: the cases lm-eval scores)")
  ap.add_argument("--cache-dir", default=".cache")
  ap.add_argument("--quick", action="store_true", help="10 facts, block 1, two penalties")
  add_out_dir(ap)
  args = ap.parse_args(argv)
  base_config = DemoConfig()
  inner = base_config.n_inner if args.inner is None else args.inner
  model_suffix = (f"_inner{inner}" if inner != base_config.n_inner else "") \
      + (f"_{args.names}" if args.names != "surname" else "") \
      + "".join(f"_{k}{v}" for k, v in (("embd", args.embd), ("blocks", args.blocks),
                                         ("subjects", args.subjects), ("steps", args.steps))
                if v) + (f"_seed{args.seed}" if args.seed else "")
  out = results_path(ap, args, "lm_memit_sweep", suffix=model_suffix, variants=(
      "--facts", "--last", "--first", "--penalties", "--unedited"))
  if args.quick:
    args.facts, args.last, args.penalties, args.unedited = 10, [1], [100, 1000], 200
  config = dataclasses.replace(
      base_config, n_inner=inner,
      names=args.names,
      n_embd=args.embd or base_config.n_embd, n_layer=args.blocks or base_config.n_layer,
      n_subjects=args.subjects or base_config.n_subjects,
      steps=args.steps or base_config.steps)
  if max(args.last) >= config.n_layer:
    ap.error(f"--last: expected blocks below the model's {config.n_layer}, got {args.last}")
  if args.first is not None and not [f for f in args.first if f <= max(args.last)]:
    ap.error(f"--first: expected a block at most the last ({max(args.last)}), "
             f"got {args.first}")
  module, variables, world, info = train_demo(config, args.cache_dir, progress=True)
  model = (module, variables)
  layout = lm_layout(module.config.n_layer)
  blocks = range(max(args.last) + 1)
  covs = {l: world_covariance(model, world, layout.memories[l],
                              cache_dir=os.path.join(args.cache_dir, "lm-stats"))
          for l in blocks}
  contexts = demo_contexts(model, world)
  cases = world_cases(world, args.facts, seed=args.seed)
  facts = world_facts(world, args.unedited, seed=args.seed + 11,
                      exclude=[c.request.subject for c in cases])
  base = 100.0 * top1_accuracy(model, world.tokenize, facts)
  reqs = [c.request for c in cases]
  load0 = [round(x, 2) for x in os.getloadavg()]
  rows = []
  for last in args.last:
    values, search_s = None, None
    for first in (range(last + 1) if args.first is None else
                  [f for f in args.first if f <= last]):
      for penalty in args.penalties:
        t0 = time.perf_counter()
        res = memit_edits(model, layout, list(range(first, last + 1)), world.tokenize, reqs,
                          covs, penalty=penalty, contexts=contexts, values=values)
        if values is None:
          values, search_s = res.values, time.perf_counter() - t0
        params, _ = apply_all(variables, res.edits)
        s = summarize(evaluate_cases((module, params), world.tokenize, cases))
        acc = 100.0 * top1_accuracy((module, params), world.tokenize, facts)
        row = {"blocks": f"{first}-{last}" if first < last else str(last), "penalty": penalty,
               "efficacy": round(s["efficacy"], 1),
               "efficacy_prob": round(s["efficacy_prob"], 1),
               "paraphrase": round(s["paraphrase"], 1),
               "neighbourhood": round(s["neighbourhood"], 1),
               "neighbourhood_prob": round(s["neighbourhood_prob"], 1), "unedited": round(acc, 1),
               "unedited_drop": round(base - acc, 1),
               "goals_met": bool(s["efficacy"] >= 95 and s["neighbourhood"] >= 90),
               "goals_met_prob": bool(s["efficacy_prob"] >= 95
                                      and s["neighbourhood_prob"] >= 90)}
        print(row, flush=True)
        rows.append(row)
    if search_s is not None:  # no first block of --first at most this last one: no run
      print(f"value search for blocks ..{last}: {search_s:.1f} s", flush=True)
  cols = ["blocks", "penalty", "efficacy", "efficacy_prob", "paraphrase", "neighbourhood",
          "neighbourhood_prob", "unedited", "unedited_drop", "goals_met", "goals_met_prob"]
  print(table(rows, cols))
  path = write_to(out, {
      "facts": args.facts, "model": {"config": info["config"],
                                     "accuracy_train_templates":
                                         info["accuracy_train_templates"]},
      "unedited_base": base, "rows": rows, "load_average_before": load0,
      "load_average_after": [round(x, 2) for x in os.getloadavg()]})
  print(f"wrote {shown(path)}")


if __name__ == "__main__":
  main()
