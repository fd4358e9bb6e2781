"""Sequential edits that hold: ten copy–paste–context edits on the DCGAN face generator,
one after another, with and without the null-space projection.

Model: the DCGAN face generator of gan-face-generate 1.1.1 as ``memedit demo`` converts it
(``.cache/demo/faces-dcgan``), layer convt2 (keys: 8×8×256), C from images 0–1999 (the
demo's statistics cache). Every edit uses the demo spec's settings: zca directions of
rank 1 from C shrunk by α = 0.2, Λ on the layer's own taps, Adam (lr 0.05, L1) for 2001
steps. The ten regions differ (both eyes, mouth, forehead, cheeks, nose, chin, each eye,
a corner of the background), and so do the images.

Edit 0 is the bundled demo spec (the glasses of image 29 pasted over the eyes of image
9, the eye band of six faces as the context); edits 1–9 each copy another face region of
one image and paste it over the same region of another, with that region on six images
(the pasted image among them) as the context.

The edits are applied in order, each solved on the generator with the earlier edits in
place, three times:

- ``plain``: each edit as the workflow makes it (``memedit.generators.insert``);
- ``projected``: its directions first projected onto the null space of C plus the
  earlier edits' keys (``memedit.sequential.sequential_directions``, relative threshold
  1e-2, M = C + Σ k kᵀ), the keys of an edit being the layer inputs of its paste crop
  (the key box; with Λ on its own taps a key writes only its own output cell);
- ``projected_kw100``: the same with the earlier keys weighted 100 (M = C + 100 Σ k kᵀ),
  which bounds their part in the null space 10× tighter.

Efficacy of edit i at kernel W: e_i(W) = 1 − L_i(W) / L_i(W_{i−1}), the share of the paste
crop's L1 loss (mean |f(W, k*) − v*| over the crop, f the layer itself) that the edit
removed, against the loss on the kernel it was made on. Reported: e_i right after edit i
(W_i), after all ten (W_10), and whether |e_i(W_10) − e_i(W_i)| ≤ 0.1·e_i(W_i) (the goal);
an edit whose directions keep nothing outside the preserved keys' span is refused by the
projection (``ValueError``), reported as refused and left out of the sequence; the
interference matrix predicted from the factors before each edit was applied
(``memedit.sequential.check_edit``, relative to the earlier edit's own change) beside the
change measured on each earlier crop; the growth of ‖W‖_F and of the memory matrix's
condition number.

Results: benchmarks/results/sequential_edits.json (+ the printed table), with the load
average of the machine. ``--quick``: three edits of 201 steps (a smoke run).

``--stylegan2``: the same ten edits on the shipped StyleGAN2 (64-px faces distilled from
the DCGAN, so each region holds the same part of the face) at ``conv_2``, each Λ solved
through the demodulation by Gauss–Newton (20 steps, L1); results in
sequential_edits_stylegan2.json. With ``--demo-settings`` as well: at the StyleGAN2 demo
spec's layer (``conv_3``, the up-sampling modulated convolution) with that spec's settings
(zca, α = 0.5, own tap, Gauss–Newton, 20 steps, L2); results in
sequential_edits_stylegan2_demo_spec.json.

``--preserve MU`` adds the arm ``projected_preserve``: projected as above, and each Λ solve
also keeps the earlier edits' paste crops at the outputs they had right after each was
made (``--anchor before``: at those they have before the new edit), each crop weighted MU
times the edit's own (``memedit.generators.insert(..., preserve=...)``): through the
layer's own f, so through StyleGAN2's demodulation, which the projection of D cannot
reach. ``--only-preserve`` runs that arm alone (results in
``…_preserveMU.json``).

Usage: python benchmarks/sequential_edits.py [--quick] [--model DIR] [--stats DIR]
       [--stylegan2 [--demo-settings]] [--preserve MU [--only-preserve]]
       [--anchor made|before] [--out-dir DIR]

The edit logs of every arm are saved beside, in .cache/sequential (``--out-dir DIR``:
DIR/sequential_logs), named after the results file: ``projected.npz`` for
sequential_edits.json, ``stylegan2_quick_projected.npz`` for
sequential_edits_stylegan2_quick.json, and so on; a smoke run or another variant never
writes over the logs of the full run.
"""

from __future__ import annotations

import argparse
import importlib.resources
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jax.numpy as jnp
import numpy as np

from benchmarks.common import add_out_dir, positive_float, results_path, table, write_to
from memedit import generators as gens
from memedit import second_moment
from memedit import sequential as sq
from memedit import specs

LAYER = "convt2"
CANVAS = 64
# (name, (y0, y1, x0, x1) on the 64-px canvas): the ten edited regions.
REGIONS = [("eyes", (22, 42, 8, 56)), ("mouth", (40, 54, 18, 46)),
           ("forehead", (4, 18, 12, 52)), ("left cheek", (34, 48, 6, 22)),
           ("right cheek", (34, 48, 42, 58)), ("nose", (28, 42, 26, 38)),
           ("chin", (50, 62, 20, 44)), ("left eye", (24, 36, 10, 30)),
           ("right eye", (24, 36, 34, 54)), ("corner", (0, 14, 0, 14))]
SETTINGS = {"method": "zca", "rank": 1, "shrinkage": 0.2, "taps": "own", "optimizer": "adam",
            "learning_rate": 0.05, "loss": "l1", "steps": 2001, "context_images": 6,
            "threshold": 1e-2, "statistics_images": 2000}
# --stylegan2: the shipped StyleGAN2 (faces distilled from the DCGAN, so the same regions
# hold the same parts of the face) at conv_2 (its demo layer until 2026-12-01) with the
# DCGAN's settings and Gauss-Newton; --demo-settings: at its demo spec's layer with that
# spec's settings.
SG2_LAYER = "conv_2"
SG2_SETTINGS = {**SETTINGS, "optimizer": "gauss_newton", "steps": 20}


def demo_spec_settings() -> tuple[str, dict]:
  """(layer, settings) of the bundled StyleGAN2 demo spec (read and checked as a spec)."""
  spec = specs.spec_from_json(json.loads(importlib.resources.files("memedit").joinpath(
      "data/demo_spec_stylegan2.json").read_text()))
  return spec.layer, {**SETTINGS, "method": spec.method, "rank": spec.rank,
                      "shrinkage": spec.shrinkage, "taps": spec.taps, **spec.solver}
# mode -> (project, key_weight)
MODES = {"projected": (True, 1.0), "projected_kw100": (True, 100.0), "plain": (False, None)}
# --preserve MU adds: projected, each solve keeping the earlier edits' crops (weight MU).
PRESERVED = "projected_preserve"


def box(y0, y1, x0, x1):
  m = np.zeros((CANVAS, CANVAS), np.float32)
  m[y0:y1, x0:x1] = 1.0
  return m


def plan(n_edits: int, canvas: int, spec_file: str = "demo_spec.json") -> list[dict]:
  """The edits: region, context examples, copied and pasted (image, mask); edit 0 is the
  bundled demo spec, the others deterministic draws of images for the other regions."""
  text = importlib.resources.files("memedit").joinpath(f"data/{spec_file}").read_text()
  demo = specs.spec_from_json(json.loads(text), canvas=canvas)  # its masks only
  out = [{"region": "eyes (demo spec)", "context": demo.masks("key"),
          "object": demo.masks("object")[0], "paste": demo.masks("paste")[0]}]
  rs = np.random.RandomState(0)
  for name, b in REGIONS[1:n_edits]:
    imgs = [int(i) for i in rs.choice(100, SETTINGS["context_images"] + 1, replace=False)]
    out.append({"region": name, "box": b, "context": [(n, box(*b)) for n in imgs[1:]],
                "object": (imgs[0], box(*b)), "paste": (imgs[1], box(*b))})
  return out


def describe(spec: dict) -> dict:
  """An edit of :func:`plan` as JSON: images and mask boxes."""
  def where(pair):
    return {"image": pair[0], "box": list(gens.bbox(pair[1]))}
  return {"region": spec["region"], "context": [where(p) for p in spec["context"]],
          "object": where(spec["object"]), "paste": where(spec["paste"])}


def crop_loss(f, keys, target, kernel) -> float:
  return float(jnp.mean(jnp.abs(f(kernel, keys) - jnp.asarray(target.targets))))


def null_dim(log, C, path, before: int, key_weight: float) -> int:
  """The dimension of the null space an edit at position ``before`` was projected onto."""
  keys, w = sq.log_keys(log, path, before=before)
  if keys.shape[0] == 0:
    keys, w = None, None
  else:
    w = w * key_weight
  return int(sq.null_space(C, keys, w, threshold=SETTINGS["threshold"]).dim)


def run_sequence(gen, C, edits, *, project: bool, key_weight, steps: int,
                 layer: str = LAYER, settings: dict = SETTINGS,
                 preserve_weight: float | None = None, anchor: str = "made") -> dict:
  """Applies the edits in order (projected or not; with ``preserve_weight``, each solve
  keeping the earlier edits' crops at their outputs right after each was made, or with
  ``anchor="before"`` at their outputs before this edit); returns efficacies and
  diagnostics."""
  info = gens.layer_info(gen, layer)
  m = info.margin
  base = gen.params
  log, cur = sq.log_init(), gen
  problems, kernels, rows, checks, times = [], [gens.layer_kernel(gen, layer)], [], [], []
  made_targets = []
  for e, spec in enumerate(edits):
    t0 = time.perf_counter()
    keys, w = gens.context_keys(gen, layer, spec["context"])
    D = gens.directions(C, keys, w, rank=settings["rank"], method=settings["method"],
                        shrinkage=settings["shrinkage"])
    if project:
      try:
        D = np.asarray(sq.sequential_directions(log, C, D, info.weight_path,
                                                threshold=settings["threshold"],
                                                key_weight=key_weight))
      except ValueError as err:  # no room left outside the preserved keys: not made
        rows.append({"region": spec["region"], "refused": str(err)})
        print(f"  projected edit {e} ({spec['region']}): refused: {err}", flush=True)
        continue
    copied = gens.copy_values(cur, layer, *spec["object"])
    target = gens.paste_target(cur, layer, copied, *spec["paste"])
    keep = {} if preserve_weight is None else {"preserve": made_targets,
                                               "preserve_weight": preserve_weight}
    res = gens.insert(cur, layer, D, target, optimizer=settings["optimizer"], steps=steps,
                      learning_rate=settings["learning_rate"], loss=settings["loss"],
                      taps=settings["taps"], method=f"insert/{'projected' if project else 'plain'}",
                      settings={"region": spec["region"]}, **keep)
    edit = res.edit
    crop_keys = target.keys[0, m:target.keys.shape[1] - m, m:target.keys.shape[2] - m]
    check = sq.check_edit(log, edit, params=base, warn=False)
    checks.append(check)
    log = sq.log_append(log, edit, crop_keys.reshape(-1, info.key_dim), target.targets)
    cur = gen.with_params(sq.log_apply(base, log))
    kernels.append(gens.layer_kernel(cur, layer))
    f, fkeys = gens.crop_problem(gen, layer, target)
    problems.append((f, fkeys, target))
    made_targets = made_targets + [target if anchor == "before" else
                                   (target, np.asarray(f(kernels[-1], fkeys)))]
    times.append(time.perf_counter() - t0)
    rows.append({"region": spec["region"], "loss_before": res.loss_before,
                 "loss_after": res.loss_after,
                 "null_dim": null_dim(log, C, info.weight_path, len(log) - 1, key_weight)
                             if project else None,
                 "seconds": times[-1]})
    print(f"  {'projected' if project else 'plain'} edit {e} ({spec['region']}): crop L1 "
          f"{res.loss_before:.4f} -> {res.loss_after:.4f} ({times[-1]:.1f} s)", flush=True)
  made = [r for r in rows if "refused" not in r]  # the edits applied, in order
  n = len(made)
  # losses[i, t]: edit i's crop loss at kernel W_t (t = 0: unedited).
  losses = np.array([[crop_loss(f, k, tg, kernels[t]) for t in range(n + 1)]
                     for f, k, tg in problems])
  eff = np.full((n, n + 1), np.nan)  # efficacy of edit i at W_t, t ≥ i + 1
  for i in range(n):
    for t in range(i + 1, n + 1):
      eff[i, t] = 1.0 - losses[i, t] / losses[i, i]
  # Measured change at edit i's crop by edit j: ‖f_i(W_j) − f_i(W_{j−1})‖ relative to edit
  # i's own change ‖f_i(W_i) − f_i(W_{i−1})‖.
  measured = np.full((n, n), np.nan)
  for i, (f, k, _) in enumerate(problems):
    outs = [np.asarray(f(kernels[t], k), np.float64) for t in range(n + 1)]
    own = np.linalg.norm(outs[i + 1] - outs[i])
    for j in range(n):
      measured[i, j] = np.linalg.norm(outs[j + 1] - outs[j]) / own
  predicted = np.full((n, n), np.nan)
  for j, c in enumerate(checks):
    predicted[:j, j] = c.interference
  final = sq.interference_matrix(log).matrix
  grow = sq.growth(log, base)
  for i, r in enumerate(made):
    r.update(efficacy_after_edit=float(eff[i, i + 1]), efficacy_after_all=float(eff[i, n]),
             # None for an edit that changed nothing (e = 0 when made).
             relative_change=(float((eff[i, n] - eff[i, i + 1]) / eff[i, i + 1])
                              if eff[i, i + 1] != 0 else None),
             held=bool(abs(eff[i, n] - eff[i, i + 1]) <= 0.1 * abs(eff[i, i + 1])),
             max_interference_received=float(np.nanmax(final[i, i + 1:])) if i < n - 1 else None,
             norm_growth=grow[i]["norm_growth"], condition_growth=grow[i]["condition_growth"])
  return {"rows": rows, "efficacy": eff.tolist(), "losses": losses.tolist(),
          "interference_predicted_before_applying": predicted.tolist(),
          "interference_measured_at_crops": measured.tolist(),
          "interference_final": final.tolist(), "log": log}


def results_name(args) -> str:
  """The name of the results file of a run (without ``_quick``), from its options."""
  return ("sequential_edits" + ("_stylegan2" if args.stylegan2 else "")
          + ("_demo_spec" if args.demo_settings else "")
          + (f"_preserve{args.preserve:g}".replace("+", "") if args.preserve is not None
             and args.only_preserve else "")
          + (f"_with_preserve{args.preserve:g}".replace("+", "") if args.preserve is not None
             and not args.only_preserve else "")
          + ("_before" if args.preserve is not None and args.anchor == "before" else ""))


def log_folder(out_dir) -> Path:
  """Where the edit logs go: .cache/sequential, or a folder of ``--out-dir``."""
  return ROOT / ".cache" / "sequential" if out_dir is None else out_dir / "sequential_logs"


def log_name(results, mode: str) -> str:
  """The file of arm ``mode``'s edit log, named after the ``results`` file: each run's
  logs (a smoke run's, each variant's) are files of their own."""
  tag = Path(results).stem.removeprefix("sequential_edits").lstrip("_")
  return f"{tag}_{mode}.npz" if tag else f"{mode}.npz"


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--quick", action="store_true", help="3 edits of 201 steps")
  ap.add_argument("--model", default=str(ROOT / ".cache/demo/faces-dcgan"))
  ap.add_argument("--stats", default=str(ROOT / ".cache/demo/stats"))
  ap.add_argument("--stylegan2", action="store_true",
                  help="the shipped StyleGAN2 (ports/stylegan2/weights/faces64.pt) at "
                       f"{SG2_LAYER}, Gauss-Newton {SG2_SETTINGS['steps']} steps")
  ap.add_argument("--demo-settings", action="store_true",
                  help="with --stylegan2: the StyleGAN2 demo spec's layer and settings")
  ap.add_argument("--preserve", type=positive_float, default=None, metavar="MU",
                  help=f"add the arm {PRESERVED}: projected, each Λ solve keeping the "
                       "earlier edits' crops with weight MU (generators.insert's preserve)")
  ap.add_argument("--only-preserve", action="store_true",
                  help="with --preserve: run that arm alone")
  ap.add_argument("--anchor", choices=("made", "before"), default="made",
                  help="with --preserve: keep each earlier crop at its outputs right after "
                       "its edit was made (default) or at those before the new edit")
  add_out_dir(ap)
  args = ap.parse_args(argv)
  if args.only_preserve and args.preserve is None:
    ap.error("--only-preserve: expected together with --preserve MU, got it alone")
  if args.anchor != ap.get_default("anchor") and args.preserve is None:
    ap.error(f"--anchor: expected together with --preserve MU, got --anchor {args.anchor} "
             "alone")
  if args.demo_settings and not args.stylegan2:
    ap.error("--demo-settings: expected together with --stylegan2, got it alone")
  if args.stylegan2 and args.model != ap.get_default("model"):
    ap.error(f"--model: expected none with --stylegan2 (it edits the shipped StyleGAN2), "
             f"got {args.model!r}")
  result_file = results_path(ap, args, results_name(args), inputs=("--model", "--stats"))
  layer, settings, spec_file = LAYER, SETTINGS, "demo_spec.json"
  model_name = "gan-face-generate==1.1.1 (DCGAN faces, MIT)"
  if args.stylegan2:
    from memedit.demo import stylegan2_converted

    layer, settings, spec_file = SG2_LAYER, SG2_SETTINGS, "demo_spec_stylegan2.json"
    if args.demo_settings:
      layer, settings = demo_spec_settings()
    args.model = stylegan2_converted(work=ROOT / ".cache" / "demo")[0]
    model_name = "ports/stylegan2/weights/faces64.pt (StyleGAN2 64x64 faces, MIT)"
  n_edits = 3 if args.quick else 10
  steps = min(settings["steps"], 201) if args.quick else settings["steps"]
  load_start = os.getloadavg()
  t_all = time.perf_counter()
  gen = gens.generator_from_converted(args.model)
  state = gens.collect_statistics(gen, layer, settings["statistics_images"], batch_size=100,
                                  cache_dir=args.stats, progress=False)
  C = np.asarray(second_moment(state), np.float32)
  edits = plan(n_edits, gen.resolution, spec_file)
  modes = {} if args.only_preserve else {m: (p, k, None) for m, (p, k) in MODES.items()}
  if args.preserve is not None:
    modes[PRESERVED] = (True, 1.0, args.preserve)
  out = {}
  for mode, (project, key_weight, preserve_weight) in modes.items():
    out[mode] = run_sequence(gen, C, edits, project=project, key_weight=key_weight,
                             steps=steps, layer=layer, settings=settings,
                             preserve_weight=preserve_weight, anchor=args.anchor)
  load_end = os.getloadavg()
  logs = {}
  cache = log_folder(args.out_dir)
  for mode in out:
    log = out[mode].pop("log")
    f = sq.save_log(cache / log_name(result_file, mode), log)
    logs[mode] = {"file": os.path.basename(f), "file_bytes": os.path.getsize(f),
                  "entries": len(log)}
  agree = {}
  for mode in out:
    p = np.asarray(out[mode]["interference_predicted_before_applying"])
    m_ = np.asarray(out[mode]["interference_measured_at_crops"])
    upper = np.triu(np.ones_like(p, bool), 1)
    big = upper & (m_ > 1e-2)
    agree[mode] = {"max_abs_difference": float(np.max(np.abs(p[upper] - m_[upper]))),
                   "max_relative_difference_where_above_0.01": (
                       float(np.max(np.abs(p[big] - m_[big]) / m_[big])) if big.any() else None)}
  made = {mode: [r for r in out[mode]["rows"] if "refused" not in r] for mode in out}
  summary = {mode: {"edits_held": int(sum(r["held"] for r in made[mode])),
                    "edits_refused": len(out[mode]["rows"]) - len(made[mode]),
                    "worst_relative_change": float(max(
                        (abs(r["relative_change"]) for r in made[mode][:-1]
                         if r["relative_change"] is not None), default=0.0)),
                    "edits_without_effect": int(sum(r["efficacy_after_edit"] == 0
                                                    for r in made[mode])),
                    "max_interference": float(np.nanmax([r["max_interference_received"] or 0
                                                         for r in made[mode]])),
                    "final_norm_growth": made[mode][-1]["norm_growth"],
                    "final_condition_growth": made[mode][-1]["condition_growth"],
                    "prediction_vs_measurement": agree[mode]}
             for mode in out}
  payload = {"settings": {**settings, "steps": steps, "edits": [describe(e) for e in edits],
                          "modes": {m: {"project": p, "key_weight": k,
                                        "preserve_weight": mu,
                                        "anchor": args.anchor if mu is not None else None}
                                    for m, (p, k, mu) in modes.items()}, "layer": layer,
                          "model": model_name},
             "summary": summary, "results": out, "logs": logs,
             "load_average": {"start": load_start, "end": load_end},
             "total_seconds": time.perf_counter() - t_all}
  path = write_to(result_file, payload)
  short = {m: t for m, t in {"projected": "P", "projected_kw100": "P100", "plain": "plain",
                             PRESERVED: "Pkeep"}.items() if m in out}
  rows = []
  for i, spec in enumerate(edits):
    row = {"#": i, "region": spec["region"]}
    for mode, tag in short.items():
      r = out[mode]["rows"][i]
      if "refused" in r:
        row.update({f"{tag} e(edit)": "refused", f"{tag} e(all)": "-", f"{tag} held": "-",
                    f"{tag} max I": "-"})
        continue
      inter = r["max_interference_received"]
      row[f"{tag} e(edit)"] = f"{r['efficacy_after_edit']:.4f}"
      row[f"{tag} e(all)"] = f"{r['efficacy_after_all']:.4f}"
      row[f"{tag} held"] = "yes" if r["held"] else "NO"
      row[f"{tag} max I"] = "-" if inter is None else f"{inter:.3g}"
    rows.append(row)
  print(table(rows, list(rows[0])))
  for mode, s in summary.items():
    print(f"{mode}: {s['edits_held']}/{n_edits} edits within 10 % of their efficacy "
          f"({s['edits_refused']} refused); "
          f"worst relative change {s['worst_relative_change']:+.3f}; max interference "
          f"{s['max_interference']:.3f}; ‖W‖ {100 * s['final_norm_growth']:+.2f} %, "
          f"condition {100 * s['final_condition_growth']:+.2f} %; predicted vs measured "
          f"interference: max |difference| "
          f"{s['prediction_vs_measurement']['max_abs_difference']:.2g}")
  print(f"load average {load_start} -> {load_end}; {payload['total_seconds']:.0f} s; wrote {path}")


if __name__ == "__main__":
  main()
