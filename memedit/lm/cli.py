"""Command-line subcommands for language-model edits on the demo world.

:func:`add_subcommands` registers them on the ``memedit`` parser (each with
``set_defaults(run=fn)``, ``fn(args) -> exit code``):

- ``lm-train``: train (or read from the cache) the demo GPT-2 on a generated world;
- ``lm-stats``: C = E[k kᵀ] of one block's MLP keys over the world's text (cached);
- ``lm-edit``: ROME, MEMIT or fine-tuning edits of world facts, saved as memedit edits;
- ``lm-eval``: the evaluation table (single ROME, MEMIT batches, fine-tuning);
- ``lm-trace``: causal tracing heat maps (PNG);
- ``lm-demo``: train, trace and evaluate in one run (with ``--model``: no training).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

__all__ = ["add_subcommands"]

_MODEL_HELP = ("demo model folder written by `memedit lm-train` (default: the model of "
               "the default settings in --cache-dir, trained when missing)")


def _integer_from(low: int, what: str):
  """An argparse type: an integer in [low, 10,000,000], refused naming ``what``."""
  def parse(text: str) -> int:
    try:
      value = int(text)
    except ValueError:
      raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if not low <= value <= 10_000_000:
      raise argparse.ArgumentTypeError(f"expected an integer in [{low}, 10000000], got "
                                       f"{value}")
    return value
  return parse


_positive = _integer_from(1, "a positive integer")
_nonnegative = _integer_from(0, "a non-negative integer")


def _positive_number(text: str) -> float:
  """An argparse type: a positive finite number (a learning rate, MEMIT's λ)."""
  try:
    value = float(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
  if not (math.isfinite(value) and value > 0):
    raise argparse.ArgumentTypeError(f"expected a positive finite number, got {text!r}")
  return value


_NOT_A_FILE = "not a file: lm-edit's --facts is a facts file"


def _fact_count(text: str) -> int:
  """A number of world facts (the --facts of lm-eval and lm-trace, which share the name of
  lm-edit's facts file)."""
  try:
    value = int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(
        f"expected a count of world facts (a positive integer), got {text!r}: this --facts "
        f"is a number, {_NOT_A_FILE} (`memedit lm-edit --facts FILE`)") from None
  if not 1 <= value <= 10_000_000:
    raise argparse.ArgumentTypeError(
        f"expected a count of world facts in [1, 10000000], got {value}")
  return value


def _int_list(text: str) -> list[int]:
  parts = [x.strip() for x in text.split(",")]
  if "" in parts:
    raise argparse.ArgumentTypeError(
        f"expected comma-separated integers, got an empty entry in {text!r}")
  try:
    values = [int(x) for x in parts]
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
  if not values or any(v < 0 for v in values):
    raise argparse.ArgumentTypeError(f"expected non-negative integers, got {text!r}")
  return values


def _block_list(text: str) -> list[int]:
  """An argparse type: block numbers in increasing order, each once (MEMIT's --layers)."""
  blocks = _int_list(text)
  if any(b <= a for a, b in zip(blocks, blocks[1:])):
    raise argparse.ArgumentTypeError(
        f"expected block numbers in increasing order, each once (e.g. 0,1,2), got {text!r}")
  return blocks


def _common(p, model: bool = True, model_help: str = _MODEL_HELP) -> None:
  p.add_argument("--cache-dir", default=".cache", metavar="FOLDER",
                 help="cache folder of the demo models (lm-demo-<hash>) and of C (lm-stats) "
                 "(default %(default)s)")
  if model:
    p.add_argument("--model", default=None, metavar="FOLDER", help=model_help)


def _train_args(p) -> None:
  from memedit.lm.world import NAME_STYLES, RELATION_KINDS

  g = p.add_argument_group("demo settings (the cache key)")
  base = _defaults()
  g.add_argument("--seed", type=int, default=base.seed,
                 help="seed of the world, the initialisation and the data order (default "
                 "%(default)s)")
  g.add_argument("--subjects", type=_positive, default=base.n_subjects,
                 help="subjects of the world (default %(default)s)")
  g.add_argument("--relations", type=_positive, default=base.n_relations,
                 help=f"relations per subject, 1 to {len(RELATION_KINDS)} (home, job, "
                 "language, ...; default %(default)s)")
  g.add_argument("--objects", type=_positive, default=base.n_objects,
                 help="objects per relation, at least 2 (default %(default)s)")
  g.add_argument("--names", choices=NAME_STYLES, default=base.names,
                 help="subject names: surname (a unique given name and one of 40 shared "
                 "surnames), single (one unique word) or pair (given and family names from "
                 "shared pools, only the pair unique) (default %(default)s)")
  g.add_argument("--embd", type=_positive, default=base.n_embd,
                 help="width of the residual stream, n_embd (default %(default)s)")
  g.add_argument("--blocks", type=_positive, default=base.n_layer,
                 help="transformer blocks (default %(default)s)")
  g.add_argument("--heads", type=_positive, default=base.n_head,
                 help="attention heads per block, dividing --embd (default %(default)s)")
  g.add_argument("--inner", type=_nonnegative, default=base.n_inner,
                 help="MLP width, the memories' key dimension (default %(default)s; "
                 "0: 4 × --embd)")
  g.add_argument("--steps", type=_positive, default=base.steps,
                 help="optimiser steps (default %(default)s)")
  g.add_argument("--batch", type=_positive, default=base.batch,
                 help=f"training rows of {base.length} tokens per step (default %(default)s)")
  g.add_argument("--warmup", type=_nonnegative, default=base.warmup,
                 help="learning-rate warm-up steps, fewer than --steps (default %(default)s)")
  g.add_argument("--warm-subjects", type=_nonnegative, default=base.warm_subjects,
                 help="the first --warm-steps steps train on this many first subjects only "
                 "(default %(default)s; 0: no such phase)")
  g.add_argument("--warm-steps", type=_nonnegative, default=base.warm_steps,
                 help="steps of that first phase, at most --steps (default %(default)s)")
  g.add_argument("--eval-facts", type=_positive, default=base.eval_facts,
                 help="facts whose top-1 accuracy is measured after training, on training "
                 "and on held-out templates (default %(default)s)")


_TOKENS_HELP = ("tokens of the world's text that C = E[k kᵀ] is collected over (part of its "
                "cache key; default %(default)s)")


def _kind_arg(p) -> None:
  p.add_argument("--kind", choices=("hidden", "mlp"), default="hidden",
                 help="the state restored in the traces: hidden, a block's output (the "
                 "residual stream); mlp, a block's MLP output (default %(default)s)")


def _eval_args(p) -> None:
  p.add_argument("--single", type=_nonnegative, default=20,
                 help="number of single ROME (and fine-tuning) edits, each applied alone, "
                 "scored and reverted (default %(default)s; 0: none)")
  p.add_argument("--batches", type=_int_list, default=[1, 10, 100, 1000],
                 help="MEMIT (and fine-tuning) batch sizes, facts per batch, comma-separated "
                 "(default 1,10,100,1000)")
  p.add_argument("--facts", type=_fact_count, default=2000, metavar="N",
                 help="number of world facts about unedited subjects whose top-1 accuracy "
                 "is scored before and after each edit (default %(default)s; "
                 + _NOT_A_FILE + ")")
  p.add_argument("--no-ft", action="store_true", help="skip the fine-tuning baseline rows")


def _defaults():
  from memedit.lm.train import DemoConfig

  return DemoConfig()


def _config(args):
  from memedit.lm.train import DemoConfig

  return DemoConfig(seed=args.seed, n_subjects=args.subjects, n_relations=args.relations,
                    n_objects=args.objects, names=args.names, n_embd=args.embd,
                    n_layer=args.blocks, n_head=args.heads, n_inner=args.inner,
                    steps=args.steps,
                    batch=args.batch, warmup=args.warmup, warm_subjects=args.warm_subjects,
                    warm_steps=args.warm_steps, eval_facts=args.eval_facts)


def _open(args):
  """(module, variables, world, info) of --model, else of the demo settings given (the
  defaults when the command has none), trained when not in the cache."""
  from memedit.lm.train import DemoConfig, load_demo, train_demo

  if args.model:
    return load_demo(args.model)
  config = _config(args) if hasattr(args, "subjects") else DemoConfig()
  return train_demo(config, args.cache_dir)


def _run_train(args) -> int:
  from memedit.lm.train import train_demo

  config = _config(args)
  _, _, world, info = train_demo(config, args.cache_dir, progress=args.verbose)
  folder = os.path.join(args.cache_dir, f"lm-demo-{config.key()}")
  print(f"lm-train: {folder}: {len(world.subjects)} subjects x {len(world.relations)} "
        f"relations; top-1 {100 * info['accuracy_train_templates']:.1f}% on training "
        f"templates, {100 * info['accuracy_paraphrases']:.1f}% on held-out ones; trained in "
        f"{info['train_seconds']} s (load {info['load_average']})")
  return 0


def _layer(view_layers: int, layer: int, flag: str) -> int:
  if not 0 <= layer < view_layers:
    raise ValueError(f"{flag}: expected a block in [0, {view_layers}), got {layer}")
  return layer


def _covariances(model, world, layers, args):
  from memedit.lm.experiment import world_covariance
  from ports.gpt2 import lm_layout

  layout = lm_layout(model[0].config.n_layer)
  return {l: world_covariance(model, world, layout.memories[l], tokens=args.tokens,
                              cache_dir=os.path.join(args.cache_dir, "lm-stats"))
          for l in layers}


def _run_stats(args) -> int:
  import numpy as np

  module, variables, world, _ = _open(args)
  layer = _layer(module.config.n_layer, args.layer, "--layer")
  C = _covariances((module, variables), world, [layer], args)[layer]
  ev = np.linalg.eigvalsh(C.astype(np.float64))
  print(f"lm-stats: block {layer} MLP keys: C {C.shape}, eigenvalues {ev[0]:.3g} .. "
        f"{ev[-1]:.3g}; cached in {os.path.join(args.cache_dir, 'lm-stats')}")
  return 0


def _rome_options(args) -> dict:
  return {"steps": args.value_steps, "learning_rate": args.value_lr}


def _edit_requests(args, world, facts):
  """The cases to edit: the facts file's (``facts``, its ``(where, request)`` pairs), else
  ``--cases`` random world facts."""
  from memedit.lm.evaluate import EditCase, world_cases

  if facts is not None:
    return [EditCase(r) for _, r in facts]
  cases = world_cases(world, args.cases, seed=args.seed)
  return cases[:1] if args.method == "rome" else cases


def _check_facts_fit(facts, tokenize, contexts, max_length: int) -> None:
  """Before any edit: every fact of --facts (its ``(where, request)`` pairs; None: no
  file) tokenizes inside every context and fits the model, else a ValueError naming the
  file and the fact's line."""
  from memedit.lm.prompts import check_fact_tokens

  for where, r in facts or ():
    try:
      check_fact_tokens(tokenize, r, contexts, max_length)
    except ValueError as e:
      raise ValueError(f"--facts: {where}: {e}") from None


def _scores(model, tokenize, cases) -> str:
  """The edited model's scores on the cases, as text."""
  import numpy as np

  from memedit.lm.evaluate import evaluate_cases, score_targets, summarize

  if all(c.request.target_true for c in cases):
    s = summarize(evaluate_cases(model, tokenize, cases))
    text = f"efficacy {s['efficacy']:.1f}%, P(new) > P(old) {s['efficacy_prob']:.1f}%"
    if any(c.paraphrases for c in cases):
      text += f", paraphrase {s['paraphrase']:.1f}%"
    if any(c.neighbours for c in cases):
      text += f", neighbourhood {s['neighbourhood']:.1f}%"
    return text
  _, top = score_targets(model, tokenize, [(c.request.text, c.request.target_new)
                                           for c in cases])
  return f"efficacy {100 * float(np.mean(top)):.1f}%"


def _facts_file(path: str) -> list:
  """``(where, request)`` of each fact of the facts file ``path`` (``where``: the file and
  the line, or the fact's number in a JSON list), read and checked once, before any
  work."""
  from memedit.lm.prompts import _read_facts

  return _read_facts(path)


def _edit_outputs(args, facts) -> list[str]:
  """Checks, before any work, the folders lm-edit writes: ``--out/edit-0``, ... (one per
  edit: ROME one per fact of ``facts``, the facts file's, else one; MEMIT one per block;
  fine-tuning one). Each may replace only an earlier saved edit (or an empty folder)
  unless --force is given, and never the model, the facts file or the cache. Returns
  them (absolute)."""
  from memedit import _io
  from memedit.cli.checks import check_output_location

  check_output_location(args.out, "--out", folder=True)
  if os.path.lexists(args.out) and not os.path.isdir(args.out):
    raise ValueError(f"--out: expected a folder for the saved edits, got {args.out!r}, which "
                     f"is not a folder")
  if args.method == "memit":
    count = len(args.layers)
  elif args.method == "rome" and facts:
    count = len(facts)
  else:
    count = 1
  protect = [p for p in (args.model, args.facts, args.cache_dir) if p]
  outputs = [_io.check_output(os.path.join(args.out, f"edit-{i}"), "edit", force=args.force,
                              protect=protect, flag="--force") for i in range(count)]
  stale = _stale_edits(args.out, count)
  if stale and not args.force:
    raise ValueError(f"--out: expected a folder this run's {count} edit(s) (edit-0 .. "
                     f"edit-{count - 1}) fill, got {args.out!r}, which also holds "
                     f"{', '.join(stale)} from an earlier run: they would be left beside "
                     "the new edits as if made with them; remove them, choose another "
                     "folder, or pass --force to remove them")
  for name in stale:  # --force: removed once the new edits are saved; never an input
    _io.check_output(os.path.join(args.out, name), "edit", force=True, protect=protect,
                     flag="--force")
  return outputs


def _stale_edits(out: str, count: int) -> list[str]:
  """The ``edit-N`` entries of the folder ``out`` with N >= ``count``, by N."""
  import re

  if not os.path.isdir(out):
    return []
  found = [(int(m.group(1)), name) for name in os.listdir(out)
           if (m := re.fullmatch(r"edit-(\d+)", name)) and int(m.group(1)) >= count]
  return [name for _, name in sorted(found)]


def _save_edits(out: str, edits) -> None:
  """Saves ``edits`` as ``out/edit-0``, ``edit-1``, ... (:func:`memedit.save_edit`) and
  removes the ``edit-N`` beyond them (there only with --force, checked before any work),
  all or nothing.

  A new ``out`` is written as a temporary sibling folder renamed into place once every
  edit is in it. In an existing ``out``, the edits are first saved in a hidden temporary
  folder inside it; only then are the edit-N entries renamed into place (the replaced
  and removed ones moved into that folder, which is removed last). Should a save or a
  rename fail, the renames made are undone: ``out`` is left as it was.
  """
  import memedit
  from memedit import _io

  stale = _stale_edits(out, len(edits))
  if not os.path.lexists(out):
    with _io.atomic_dir(out) as tmp:
      for i, e in enumerate(edits):
        memedit.save_edit(os.path.join(tmp, f"edit-{i}"), e)
    return
  # Named as a temporary of edit-0, which a later write of edit-0 removes should this
  # process be killed before it does.
  with _io._temporary(os.path.join(out, "edit-0"), directory=True) as (stage, _):
    try:
      for i, e in enumerate(edits):
        memedit.save_edit(os.path.join(stage, f"edit-{i}"), e)
      moves = []  # (from, to) renames made, undone in reverse order on a failure
      try:
        for i in range(len(edits)):
          dst = os.path.join(out, f"edit-{i}")
          if os.path.lexists(dst):
            moves.append((dst, os.path.join(stage, f"replaced-{i}")))
            os.rename(*moves[-1])
          moves.append((os.path.join(stage, f"edit-{i}"), dst))
          os.rename(*moves[-1])
        for name in stale:
          moves.append((os.path.join(out, name), os.path.join(stage, f"removed-{name}")))
          os.rename(*moves[-1])
      except BaseException:
        for src, dst in reversed(moves):
          if os.path.lexists(dst) and not os.path.lexists(src):
            os.rename(dst, src)
        raise
      _io._fsync_dir(out)
    finally:
      _io._remove(stage)


def _run_edit(args) -> int:
  from memedit.cli.checks import check_input_file, writing
  from memedit.lm.experiment import apply_all, demo_contexts
  from memedit.lm.finetune import finetune_edit
  from memedit.lm.memit import memit_edits
  from memedit.lm.rome import rome_edits
  from ports.gpt2 import lm_layout

  facts = None
  if args.facts:
    check_input_file(args.facts, "--facts")
    facts = _facts_file(args.facts)  # read and checked once, before any work
  outputs = _edit_outputs(args, facts)
  module, variables, world, _ = _open(args)
  model = (module, variables)
  layout = lm_layout(module.config.n_layer)
  cases = _edit_requests(args, world, facts)
  reqs = [c.request for c in cases]
  contexts = demo_contexts(model, world, per_length=args.contexts)
  _check_facts_fit(facts, world.tokenize, contexts, module.config.n_positions)
  params = variables
  if args.method == "rome":
    # One rank-one edit per fact, each made on the model with the earlier ones applied.
    layer = _layer(layout.n_layers, args.layer, "--layer")
    C = _covariances(model, world, [layer], args)[layer]
    edits = []
    for req in reqs:
      (result,) = rome_edits((module, params), layout.memories[layer], world.tokenize, [req],
                             C, contexts=contexts, value_options=_rome_options(args))
      params, _ = apply_all(params, [result.edit])
      edits.append(result.edit)
  elif args.method == "memit":
    layers = [_layer(layout.n_layers, l, "--layers") for l in args.layers]
    covs = _covariances(model, world, layers, args)
    edits = memit_edits(model, layout, layers, world.tokenize, reqs, covs,
                        penalty=args.penalty, contexts=contexts).edits
    params, _ = apply_all(variables, edits)
  else:
    layer = _layer(layout.n_layers, args.layer, "--layer")
    edits = [finetune_edit(model, layout.memories[layer], world.tokenize, reqs,
                           contexts=contexts).edit]
    params, _ = apply_all(variables, edits)
  scores = _scores((module, params), world.tokenize, cases)
  if len(edits) != len(outputs):  # the folders checked before any work are those written
    raise AssertionError(f"lm-edit: {len(edits)} edit(s) made for {len(outputs)} folders")
  with writing(args.out, "--out"):
    _save_edits(os.path.abspath(args.out), edits)
  req = reqs[0]
  old = f"{req.target_true} -> " if req.target_true else "-> "
  print(f"lm-edit {args.method}: {len(reqs)} fact(s), e.g. '{req.text}' {old}"
        f"{req.target_new}; {scores}; {len(edits)} edit(s) saved in {args.out}")
  return 0


def _check_report_out(path: str, model: str | None, flag: str = "--out") -> None:
  """Before any work: ``path`` may be written and is no file but an earlier report."""
  from memedit.cli.checks import check_output_file, is_json_report

  check_output_file(path, flag, protect=(model,), what="an earlier `memedit lm-eval` report",
                    accept=lambda f: is_json_report(f, ("rows", "model", "settings")))


def _trace_pngs(out: str, kind: str) -> tuple[str, str]:
  """The heat maps lm-trace writes in ``out``: one fact's, and the average's."""
  return (os.path.join(out, f"trace_{kind}.png"),
          os.path.join(out, f"trace_{kind}_average.png"))


def _check_trace_out(path: str, kind: str, model: str | None = None,
                     flag: str = "--out") -> None:
  """Before any work: ``path`` is a folder, or nothing yet, that may be written, and the
  heat maps it will hold are new or earlier PNG images (never another file)."""
  from memedit.cli.checks import check_output_file, check_output_location, is_png

  check_output_location(path, flag, folder=True)
  if os.path.lexists(path) and not os.path.isdir(path):
    raise ValueError(f"{flag}: expected a folder for the heat maps, got {path!r}, which is "
                     f"a file")
  for png in _trace_pngs(path, kind):
    check_output_file(png, flag, protect=(model,), what="a PNG image", accept=is_png)


def _run_eval(args) -> int:
  from memedit.lm.experiment import demo_contexts, evaluate_methods, format_table
  from ports.gpt2 import lm_layout

  from memedit import _io
  from memedit.cli.checks import writing

  if args.out:
    _check_report_out(args.out, args.model)
  module, variables, world, info = _open(args)
  model = (module, variables)
  layout = lm_layout(module.config.n_layer)
  rome_layer = _layer(layout.n_layers, args.layer, "--layer")
  memit_layers = [_layer(layout.n_layers, l, "--layers") for l in args.layers]
  covs = _covariances(model, world, sorted({rome_layer, *memit_layers}), args)
  contexts = demo_contexts(model, world, per_length=args.contexts)
  say = (lambda s: print(f"lm-eval: {s}", file=sys.stderr, flush=True)) if args.verbose \
      else None
  result = evaluate_methods(model, world, layout, rome_layer=rome_layer,
                            memit_layers=memit_layers, covariances=covs, contexts=contexts,
                            single=args.single, batches=args.batches, penalty=args.penalty,
                            rome_options=_rome_options(args), finetune=not args.no_ft,
                            unedited_facts=args.facts, log=say)
  result["model"] = info
  result["settings"] = {"rome_layer": rome_layer, "memit_layers": memit_layers,
                        "penalty": args.penalty, "contexts": len(contexts),
                        "load_average": [round(x, 2) for x in os.getloadavg()]}
  print(format_table(result["rows"]))
  if args.out:
    with writing(args.out, "--out"):
      os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
      _io.atomic_write_bytes(args.out, json.dumps(result, indent=2).encode())
    print(f"lm-eval: wrote {args.out}")
  return 0


def _run_trace(args) -> int:
  import numpy as np

  from memedit.lm.tracing import CATEGORIES, causal_trace, trace_png, trace_summary
  from ports.gpt2 import lm_layout

  from memedit.cli.checks import writing

  _check_trace_out(args.out, args.kind, args.model)
  module, variables, world, _ = _open(args)
  model = (module, variables)
  layout = lm_layout(module.config.n_layer)
  rng = np.random.default_rng(args.seed)
  results = []
  for _ in range(args.facts):
    s = int(rng.integers(len(world.subjects)))
    r = int(rng.integers(len(world.relations)))
    results.append(causal_trace(model, layout, world.tokenize,
                                world.relations[r].train_templates[0], world.subjects[s],
                                target=world.object_of(s, r), decode=world.decode,
                                kind=args.kind, samples=args.samples, seed=args.seed))
  first = results[0]
  one_png, avg_png = _trace_pngs(args.out, args.kind)
  with writing(args.out, "--out"):
    os.makedirs(args.out, exist_ok=True)
    one = trace_png(first.scores, first.tokens, one_png,
                    title=f"P({first.target}) restoring one {args.kind} state; clean "
                          f"{first.clean:.2f}, corrupted {first.corrupted:.2f}",
                    kind=args.kind, marked=range(first.subject[0], first.subject[1] + 1))
    avg = trace_png(trace_summary(results), CATEGORIES, avg_png,
                    title=f"mean P(object) over {len(results)} facts, one {args.kind} state "
                          f"restored", kind=args.kind)
  print(f"lm-trace: wrote {one} and {avg}; mean clean "
        f"{np.mean([r.clean for r in results]):.3f}, corrupted "
        f"{np.mean([r.corrupted for r in results]):.3f}")
  return 0


def _run_demo(args) -> int:
  _check_trace_out(args.out, args.kind, args.model)
  _check_report_out(os.path.join(args.out, "lm_eval.json"), args.model)
  for step in ("trace", "eval") if args.model else ("train", "trace", "eval"):
    ns = argparse.Namespace(**vars(args))
    if step == "train":
      code = _run_train(ns)
    elif step == "trace":
      ns.out, ns.facts, ns.samples = args.out, args.trace_facts, 10
      code = _run_trace(ns)
    else:
      ns.out = os.path.join(args.out, "lm_eval.json")
      code = _run_eval(ns)
    if code:
      return code
  return 0


def _edit_args(p) -> None:
  from memedit.lm.train import DEMO_MEMIT_LAYERS, DEMO_PENALTY, DEMO_ROME_LAYER

  p.add_argument("--layer", type=_nonnegative, default=DEMO_ROME_LAYER, metavar="BLOCK",
                 help="the block (0 .. blocks-1) whose MLP ROME and fine-tuning edit "
                 "(default %(default)s)")
  p.add_argument("--layers", type=_block_list, default=list(DEMO_MEMIT_LAYERS),
                 metavar="BLOCKS", help=f"the blocks MEMIT spreads its edits over, "
                 f"comma-separated in increasing order, e.g. 0,1,2 (default "
                 f"{','.join(map(str, DEMO_MEMIT_LAYERS))})")
  p.add_argument("--penalty", type=_positive_number, default=DEMO_PENALTY,
                 help="MEMIT's λ, the weight of C against the new facts' keys (default "
                 "%(default)g for the demo model, whose keys are small: MEMIT's 15000 for "
                 "GPT-J writes few of the facts)")
  p.add_argument("--tokens", type=_positive, default=200_000, help=_TOKENS_HELP)
  p.add_argument("--contexts", type=int, default=5, choices=range(0, 21), metavar="N",
                 help="context prefixes sampled from the model per length (5 and 10 tokens), "
                 "0 to 20, besides the bare prompt; keys, values and fine-tuning average "
                 "over them (default %(default)s)")
  p.add_argument("--value-steps", type=int, default=20, choices=range(1, 201), metavar="N",
                 help="Adam steps of ROME's value search, 1 to 200 (default %(default)s; "
                      "MEMIT's search runs 25 steps with a norm clamp of 0.75, as MEMIT's "
                      "defaults)")
  p.add_argument("--value-lr", type=_positive_number, default=0.5,
                 help="the learning rate of ROME's value search (default %(default)s)")


_TRAIN_HELP = """\
Train the demo GPT-2 (a small ports.gpt2 model) on a world of made-up facts generated
from --seed: --subjects subjects, --relations relations (home, job, ...), --objects
objects per relation; AdamW with warm-up then cosine decay. Nothing is downloaded.

Writes the model folder --cache-dir/lm-demo-<hash of the settings below> (the
checkpoint, world.json, and train.json with the settings, the time and the top-1
accuracies), and prints its top-1 accuracy on training and held-out templates. A
second run with the same settings reads the folder back at once. lm-stats, lm-edit,
lm-eval and lm-trace use it through --model (without --model: the default settings'
model in --cache-dir, trained when missing).

example:
  memedit lm-train --verbose
"""

_STATS_HELP = """\
Collect C = E[k kᵀ] of one block's MLP keys (the inputs of h_<block>.mlp.c_proj, the
memory ROME and MEMIT write) over about --tokens tokens of the world's text, and print
its shape and eigenvalue range.

Reads --model (default: the default demo model in --cache-dir, trained when missing).
Writes only the cache: C is saved under --cache-dir/lm-stats by a key of the model's
weights, the block and the text settings; lm-edit, lm-eval and lm-demo read the same
cache, and a second run reads it back at once.

example:
  memedit lm-stats --layer 1
"""

_EDIT_HELP = """\
Edit facts in the demo model and save the edits with memedit.save_edit: ROME (one
rank-one edit per fact, each made on the model with the earlier ones applied), MEMIT
(all facts at once, spread over --layers) or fine-tuning of one block's MLP (ft).
Prints the edited model's efficacy (and paraphrase / neighbourhood scores for world
facts).

The facts are those of the --facts file (JSON or CSV: subject, prompt with {} for the
subject, target_new, optional target_true), else --cases random facts of the world
(ROME: the first only). Writes --out/edit-0, edit-1, ... (ROME: one per fact; MEMIT:
one per block of --layers; ft: one). Reads --model (default: the default demo model in
--cache-dir, trained when missing) and C from --cache-dir/lm-stats (computed when
missing).

example:
  memedit lm-edit --method memit --facts facts.csv --out edits
"""

_EVAL_HELP = """\
The evaluation table of the demo model: --single independent ROME (and fine-tuning)
edits, each applied alone, scored and reverted; MEMIT (and fine-tuning) batches of
each size of --batches; each row's efficacy, paraphrase and neighbourhood scores, and
the top-1 accuracy on --facts facts about subjects never edited (and its drop). Every
edit is reverted and the model checked to come back bit for bit.

Prints the table as Markdown; with --out also writes it as JSON (rows, model, settings;
atomically). Reads --model (default: the default demo model in --cache-dir, trained
when missing) and C from --cache-dir/lm-stats (computed when missing).

example:
  memedit lm-eval --single 5 --batches 1,10 --facts 500 --out eval.json
"""

_TRACE_HELP = """\
Causal tracing (ROME) of --facts random world facts: the subject's token embeddings
are corrupted with Gaussian noise (--samples draws), then one state (a block's output
with --kind hidden, an MLP's output with --kind mlp) at one token and block is
restored to its clean value; the probability of the true object, for every (token,
block), shows where the fact is recalled.

Writes two PNG heat maps in the folder --out: trace_<kind>.png (the first fact) and
trace_<kind>_average.png (the mean over the facts by ROME's token categories), and
prints the mean clean and corrupted probabilities. Reads --model (default: the default
demo model in --cache-dir, trained when missing).

example:
  memedit lm-trace --kind mlp --facts 20 --out maps
"""

_DEMO_HELP = """\
Run lm-train, lm-trace and lm-eval in one go on the demo world of the settings below
(or on --model, which skips the training).

Writes in the folder --out: trace_<kind>.png, trace_<kind>_average.png (10 noise
samples per state) and lm_eval.json; the model is cached in --cache-dir/lm-demo-<hash>
and C in --cache-dir/lm-stats (both read back on a second run). --seed is the world's
and the training's seed and also draws the traced facts.

example:
  memedit lm-demo --out out/lm
"""


def _formatted(**kwargs) -> dict:
  return {"formatter_class": argparse.RawDescriptionHelpFormatter, **kwargs}


def add_subcommands(subparsers) -> None:
  """Registers ``lm-train``, ``lm-stats``, ``lm-edit``, ``lm-eval``, ``lm-trace`` and
  ``lm-demo`` on an argparse ``subparsers`` object."""
  p = subparsers.add_parser("lm-train", help="train the demo GPT-2 on a generated world "
                            "(cached)", **_formatted(description=_TRAIN_HELP))
  _common(p, model=False)
  _train_args(p)
  p.add_argument("--verbose", action="store_true",
                 help="print the loss every 100 steps (to stderr)")
  p.set_defaults(run=_run_train)

  p = subparsers.add_parser("lm-stats", help="C of one block's MLP keys over the world's "
                            "text (cached)", **_formatted(description=_STATS_HELP))
  _common(p)
  p.add_argument("--layer", type=_nonnegative, default=1, metavar="BLOCK",
                 help="the block (0 .. blocks-1) whose MLP keys are collected (default "
                 "%(default)s)")
  p.add_argument("--tokens", type=_positive, default=200_000, help=_TOKENS_HELP)
  p.set_defaults(run=_run_stats)

  p = subparsers.add_parser("lm-edit", help="ROME / MEMIT / fine-tuning edits of facts, saved "
                            "as edits", **_formatted(description=_EDIT_HELP))
  _common(p)
  p.add_argument("--method", choices=("rome", "memit", "ft"), default="rome",
                 help="rome: one rank-one edit per fact at --layer; memit: all facts at "
                 "once over --layers; ft: fine-tuning of --layer's MLP (default "
                 "%(default)s)")
  p.add_argument("--facts", default=None, metavar="FILE",
                 help="facts FILE to write, JSON or CSV (subject, prompt with {} for the "
                 "subject, target_new, optional target_true); default: --cases random facts "
                 "of the demo world. (lm-eval's and lm-trace's --facts are counts, not files.)")
  p.add_argument("--cases", type=_positive, default=1,
                 help="number of random world facts to edit without --facts (ROME edits "
                 "the first only; default %(default)s)")
  p.add_argument("--seed", type=int, default=0,
                 help="seed that draws the random world facts without --facts (default "
                 "%(default)s)")
  p.add_argument("--out", required=True, help="folder for the saved edits (edit-0, "
                 "edit-1, ...); an existing edit-N is replaced only when it is a saved edit "
                 "(or empty), and one beyond this run's edits is refused")
  p.add_argument("--force", action="store_true",
                 help="replace an edit-N in --out even when it holds something else, and "
                 "remove those beyond this run's edits (never the model, --facts or "
                 "--cache-dir)")
  _edit_args(p)
  p.set_defaults(run=_run_edit)

  p = subparsers.add_parser("lm-eval", help="efficacy / paraphrase / neighbourhood table "
                            "(ROME, MEMIT, FT)", **_formatted(description=_EVAL_HELP))
  _common(p)
  _edit_args(p)
  _eval_args(p)
  p.add_argument("--out", default=None, metavar="FILE",
                 help="JSON file for the table, the model's info and the settings (default: "
                 "print the table only); replaces only an earlier lm-eval report")
  p.add_argument("--verbose", action="store_true",
                 help="print each row as it is measured (to stderr)")
  p.set_defaults(run=_run_eval)

  p = subparsers.add_parser("lm-trace", help="causal tracing heat maps (PNG)",
                            **_formatted(description=_TRACE_HELP))
  _common(p)
  p.add_argument("--facts", type=_fact_count, default=50, metavar="N",
                 help="number of world facts traced, random (subject, relation) pairs drawn "
                 "by --seed (default %(default)s; " + _NOT_A_FILE + ")")
  _kind_arg(p)
  p.add_argument("--samples", type=_positive, default=10,
                 help="corrupted runs per fact (noise draws) that each (token, "
                 "block) score averages over (default %(default)s)")
  p.add_argument("--seed", type=int, default=0,
                 help="seed that draws the facts and the embedding noise (default "
                 "%(default)s)")
  p.add_argument("--out", default="out/lm", metavar="FOLDER",
                 help="folder for trace_<kind>.png and trace_<kind>_average.png (default "
                 "%(default)s); existing files there are replaced only when they are PNG "
                 "images")
  p.set_defaults(run=_run_trace)

  p = subparsers.add_parser("lm-demo", help="train, trace and evaluate on the demo world",
                            **_formatted(description=_DEMO_HELP))
  _common(p, model_help="demo model folder written by `memedit lm-train` to trace and "
          "evaluate instead of training one (default: the model of the settings below in "
          "--cache-dir, trained when missing)")
  _train_args(p)
  _edit_args(p)
  _kind_arg(p)
  p.add_argument("--trace-facts", type=_fact_count, default=50, metavar="N",
                 help="number of world facts traced (lm-trace's --facts; default "
                 "%(default)s)")
  _eval_args(p)
  p.add_argument("--verbose", action="store_true",
                 help="print the training loss and each evaluation row (to stderr)")
  p.add_argument("--out", default="out/lm", metavar="FOLDER",
                 help="folder for the heat maps and lm_eval.json (default %(default)s)")
  p.set_defaults(run=_run_demo)
