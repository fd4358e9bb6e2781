"""Sequential edits that hold, language-model half: 2,000 facts written into the demo
GPT-2 in batches of 100 with MEMIT over its MEMIT blocks, with AlphaEdit's null-space
projection and without (plain sequential MEMIT), in one run.

Model: the demo of ``memedit lm-train`` with the default settings (trained into
``--cache-dir`` when missing), its MEMIT blocks (``memedit lm-eval``'s defaults,
``DEMO_MEMIT_LAYERS``), C of each block over 200,000 tokens of the world's text, the demo's sampled
context templates, MEMIT's value search (25 steps, clamp 0.75). The facts are distinct
(subject, relation) pairs of subjects outside a reserve of 500 subjects that no edit
touches; the neighbourhood prompts and the unedited facts are about reserved subjects
(:func:`memedit.lm.sequential.sequential_cases`).

Arms, each from the unedited model, the same facts in the same order:

- ``projected``: AlphaEdit (:func:`memedit.lm.sequential.memit_batch`, P from each
  block's C at the relative ``--threshold``, the earlier batches' keys in the solve,
  ``--l2``);
- ``plain, penalty …``: MEMIT's ridge insert with penalty ``--penalty`` (MEMIT's 15,000
  for GPT-J) and ``--penalty2`` (the demo's λ, ``DEMO_PENALTY``: on the demo model's
  small keys λ = 15,000 writes few facts; on the earlier 512-wide demo it wrote none of a
  batch of 100).

The projected arm's defaults here (relative threshold 1e-4, l2 = 1) differ from the
library's (1e-2, AlphaEdit's l2 = 10): C's largest eigenvalue (the keys' mean) is ~40 %
of its trace, so on 512-dimensional keys 1e-2 kept 487–493 dimensions, while 1e-4 kept
175–214 (AlphaEdit's absolute 2e-2 kept 212–302); with l2 = 10 the first batch reached
9 % efficacy, with l2 = 1, 98 %.

``--preserve-facts W`` adds to the projected arm's solve the key of every fact of the
world that the batch does not edit, with weight W (:func:`memedit.lm.sequential.fact_keys`
of the unedited model at the edit template; the unedited facts are scored in all the
relation's templates): the facts a user wants kept preserved beside the earlier edits.

After every batch: efficacy (top-1 new object, and P(new) > P(old)) and paraphrase on
all edits so far, neighbourhood specificity, top-1 accuracy on 2,000 unedited facts.

Writes benchmarks/results/lm_sequential.json and docs/lm_sequential.png (the three scores
against the number of edits, every arm), and prints the table. ``--quick``: 200 facts in
batches of 50 (a smoke run; the results go to ``*_quick`` files). At other settings
without ``--tag``, both files are named after the options changed (e.g.
``lm_sequential_edits500.json``); with ``--out-dir DIR`` both go to DIR.

Usage: python benchmarks/lm_sequential.py [--quick] [--model DIR] [--cache-dir DIR]
  [--edits N] [--batch B] [--threshold T] [--l2 X]
  [--key-weight W] [--edit-keys solve|null_space|none] [--penalty L] [--penalty2 L]
  [--preserve-facts W] [--blocks 0,1,2]
  [--tag SUFFIX] [--out-dir DIR]
(A penalty of 0 leaves that plain arm out.)
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np

from benchmarks.common import (add_out_dir, nonnegative_float, positive_float, positive_int,
                               results_path, shown, suffix_tag, table, write_to)
from memedit.lm.experiment import demo_contexts, world_covariance
from memedit.lm.sequential import EDIT_KEYS, run_sequential
from memedit.lm.train import (DEMO_MEMIT_LAYERS as LAYERS, DEMO_PENALTY, DemoConfig, load_demo,
                              train_demo)
from ports.gpt2 import lm_layout

SHOWN = (100, 500, 1000, 1500, 2000)


def block_list(text: str) -> list[int]:
  """An argparse type: block numbers, comma-separated, increasing."""
  try:
    blocks = [int(t) for t in text.split(",")]
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected block numbers like 0,1,2, got {text!r}") from None
  if not blocks or min(blocks) < 0 or any(b <= a for a, b in zip(blocks, blocks[1:])):
    raise argparse.ArgumentTypeError(f"expected increasing block numbers >= 0, got {text!r}")
  return blocks
PANELS = (("efficacy", "efficacy (top-1, all edits so far)"),
          ("neighbourhood", "neighbourhood specificity"),
          ("unedited", "unedited-fact accuracy"))
COLORS = ((31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189))


def line_png(rows: list[dict], path, *, title: str = "", base: dict | None = None) -> str:
  """Draws one panel per score of :data:`PANELS` (0–100 %) against the number of edits,
  a line per arm, with axes, ticks, gridlines and a legend (pillow)."""
  from PIL import Image, ImageDraw, ImageFont

  try:
    font = ImageFont.load_default(size=13)
  except TypeError:  # pillow < 10.1: the fixed bitmap font
    font = ImageFont.load_default()
  arms = list(dict.fromkeys(r["arm"] for r in rows))
  xmax = max(r["edits"] for r in rows)
  pw, ph, left, top, gap = 340, 250, 50, 52, 60
  width = left + len(PANELS) * (pw + gap) + 10
  height = top + ph + 46 + 18 * len(arms) + 10
  img = Image.new("RGB", (width, height), "white")
  draw = ImageDraw.Draw(img)
  text = lambda xy, s: draw.text(xy, s, fill="black", font=font)
  if title:
    text((left, 6), title)
  step = max(1, xmax // 4)
  xticks = list(range(0, xmax + 1, step))
  for p, (key, label) in enumerate(PANELS):
    x0 = left + p * (pw + gap)
    y0, y1 = top, top + ph
    lo = 0.0
    if key != "efficacy":  # zoom on the top of the scale when every value is high
      vals = [r[key] for r in rows] + ([base[key]] if base else [])
      lo = 0.0 if min(vals) < 55 else 50.0

    def px(x, y):
      return x0 + pw * x / xmax, y1 - ph * (y - lo) / (100.0 - lo)

    text((x0, top - 18), label)
    for yt in np.linspace(lo, 100.0, 6):
      _, yy = px(0, yt)
      draw.line([x0, yy, x0 + pw, yy], fill=(225, 225, 225))
      text((x0 - 30, yy - 7), f"{yt:.0f}")
    for xt in xticks:
      xx, _ = px(xt, lo)
      draw.line([xx, y1, xx, y1 + 4], fill="black")
      text((xx - 4 * len(str(xt)), y1 + 6), str(xt))
    draw.rectangle([x0, y0, x0 + pw, y1], outline="black")
    text((x0 + pw // 2 - 36, y1 + 22), "edits so far")
    if base is not None:
      _, yb = px(0, base[key])
      for xs in range(int(x0), int(x0 + pw), 8):
        draw.line([xs, yb, min(xs + 4, x0 + pw), yb], fill=(120, 120, 120))
    for a, arm in enumerate(arms):
      color = COLORS[a % len(COLORS)]
      pts = [px(r["edits"], r[key]) for r in rows if r["arm"] == arm]
      if len(pts) > 1:
        draw.line(pts, fill=color, width=2)
      for x, y in pts:
        draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=color)
  ly = top + ph + 46
  for a, arm in enumerate(arms):
    color = COLORS[a % len(COLORS)]
    draw.line([left, ly + 6, left + 24, ly + 6], fill=color, width=3)
    text((left + 30, ly - 1), arm)
    ly += 18
  if base is not None:
    for xs in range(left + 300, left + 324, 8):
      draw.line([xs, top + ph + 52, xs + 4, top + ph + 52], fill=(120, 120, 120))
    text((left + 330, top + ph + 45), "unedited model")
  import io

  from memedit import _io

  buf = io.BytesIO()  # written whole or not at all (no truncated image on an interruption)
  img.save(buf, format="PNG")
  _io.atomic_write_bytes(path, buf.getvalue())
  return str(path)


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--model", default=None, help="demo folder (default: the default demo, "
                  "trained into --cache-dir when missing)")
  ap.add_argument("--cache-dir", default=".cache")
  ap.add_argument("--edits", type=positive_int, default=2000)
  ap.add_argument("--batch", type=positive_int, default=100)
  ap.add_argument("--threshold", type=positive_float, default=1e-4,
                  help="relative null-space threshold of the projected arm (1e-4)")
  ap.add_argument("--l2", type=nonnegative_float, default=1.0, help="AlphaEdit's l2 (1)")
  ap.add_argument("--key-weight", type=positive_float, default=1.0)
  ap.add_argument("--edit-keys", choices=EDIT_KEYS, default="solve")
  ap.add_argument("--penalty", type=nonnegative_float, default=15000.0,
                  help="plain MEMIT's λ (15000; 0: no plain arm)")
  ap.add_argument("--penalty2", type=nonnegative_float, default=DEMO_PENALTY,
                  help=f"λ of a second plain arm ({DEMO_PENALTY:g}, the demo's: at 15000 one "
                       "batch of 100 is not written on the demo; 0: no second arm)")
  ap.add_argument("--preserve-facts", type=nonnegative_float, default=0.0,
                  help="weight of the key of every world fact not in the batch in the "
                       "projected arm's solve (0: none; run_sequential's preserve_facts)")
  ap.add_argument("--blocks", type=block_list, default=list(LAYERS),
                  help=f"MEMIT blocks, comma-separated (default "
                       f"{','.join(map(str, LAYERS))})")
  ap.add_argument("--quick", action="store_true", help="200 facts in batches of 50")
  ap.add_argument("--tag", type=suffix_tag, default="",
                  help="suffix of the output files (e.g. _inner4096; letters, digits, _ . -)")
  add_out_dir(ap)
  args = ap.parse_args(argv)
  out = results_path(ap, args, "lm_sequential", tag=args.tag, inputs=("--model",), variants=(
      "--edits", "--batch", "--threshold", "--l2", "--key-weight", "--edit-keys", "--penalty",
      "--penalty2", "--preserve-facts", "--blocks"))
  png = (ROOT / "docs" if args.out_dir is None else args.out_dir) / f"{out.stem}.png"
  if args.quick:
    args.edits, args.batch = min(args.edits, 200), min(args.batch, 50)
  load0 = os.getloadavg()
  t_all = time.perf_counter()
  module, variables, world, info = (load_demo(args.model) if args.model else
                                    train_demo(DemoConfig(), args.cache_dir))
  model = (module, variables)
  layout = lm_layout(module.config.n_layer)
  stats_dir = os.path.join(args.cache_dir, "lm-stats")
  covs = {l: world_covariance(model, world, layout.memories[l], tokens=200_000,
                              cache_dir=stats_dir) for l in args.blocks}
  contexts = demo_contexts(model, world)
  say = lambda s: print(f"lm_sequential: {s}", file=sys.stderr, flush=True)
  arms = [("projected", {"arms": ("projected",)})]
  penalties = [p for p in (args.penalty, args.penalty2) if p]
  arms += [(f"plain, penalty {p:g}", {"arms": ("plain",), "penalty": p}) for p in penalties]
  rows, base, null_dims = [], None, None
  for label, kw in arms:
    say(f"arm {label}")
    run = run_sequential(model, world, layout, args.blocks, covs, contexts,
                         edits=args.edits, batch=args.batch, threshold=args.threshold,
                         l2=args.l2, key_weight=args.key_weight, edit_keys=args.edit_keys,
                         preserve_facts=args.preserve_facts, log=say, **kw)
    base, null_dims = run["base"], run["null_dims"]
    rows += [dict(r, arm=label) for r in run["rows"]]
  printed = [{"arm": r["arm"], "edits": r["edits"],
            **{k: round(r[k], 1) for k in ("efficacy", "efficacy_prob", "paraphrase",
                                           "neighbourhood", "neighbourhood_prob",
                                           "unedited")},
            "drop": round(r["unedited_drop"], 2), "seconds": round(r["seconds"], 1)}
           for r in rows if r["edits"] in SHOWN or r["edits"] == args.edits]
  columns = ["arm", "edits", "efficacy", "efficacy_prob", "paraphrase", "neighbourhood",
             "neighbourhood_prob", "unedited", "drop", "seconds"]
  print(f"unedited model: efficacy {base['efficacy']:.1f}, neighbourhood "
        f"{base['neighbourhood']:.1f}, unedited accuracy {base['unedited']:.1f}; "
        f"null-space dimensions {null_dims}")
  print(table(printed, columns))
  png.parent.mkdir(parents=True, exist_ok=True)
  line_png(rows, png, base=base,
           title=f"{args.edits} facts in batches of {args.batch}, MEMIT blocks "
                 f"{','.join(map(str, args.blocks))} (MLP width {module.config.inner_dim}): AlphaEdit "
                 f"projection (threshold {args.threshold:g}, l2 {args.l2:g}"
                 + (f", the world's facts preserved at weight {args.preserve_facts:g})"
                    if args.preserve_facts else ")")
                 + (" vs plain sequential MEMIT" if penalties else ""))
  load1 = os.getloadavg()
  settings = {"edits": args.edits, "batch": args.batch, "layers": list(args.blocks),
              "preserve_facts": args.preserve_facts,
              "threshold": args.threshold, "l2": args.l2, "key_weight": args.key_weight,
              "edit_keys": args.edit_keys, "penalties": penalties, "reserve": 500,
              "unedited_facts": 2000, "contexts": len(contexts), "tokens_for_C": 200_000,
              "value_search": {"steps": 25, "clamp": 0.75}}
  path = write_to(out, {"settings": settings, "base": base, "null_dims": null_dims,
                        "rows": rows, "model": info,
                        "seconds": round(time.perf_counter() - t_all, 1),
                        "load_average_before": load0, "load_average_after": load1})
  print(f"load average {load0[0]:.2f} before, {load1[0]:.2f} after; wrote "
        f"{shown(path)} and {shown(png)}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
