"""The end-to-end demo on real weights: dark glasses pasted into a DCGAN face generator.

The weights are the DCGAN face generator of the PyPI package :data:`DEMO_REQUIREMENT`
(MIT licence; ``weights.tar``, a torch checkpoint inside its wheel). :func:`run_demo`
converts them, collects C at the spec's layer, applies the edit spec (by default the
bundled ``memedit/data/demo_spec.json``: the dark glasses of one face pasted over the eyes
of another, context = eyes of several faces; Λ on the layer's own taps), runs the same
spec with the other tap setting and the overfit baseline on the same paste, measures the
three on held-out latents the spec never uses (at match quantiles :data:`REPORT_QUANTILES`
and a sweep), and writes ``demo.png`` (original | edited pairs for each), ``demo.edit`` and
``demo.json`` (metrics and timings). ``memedit demo`` is its command line.
"""

from __future__ import annotations

import glob
import importlib.resources
import json
import os
import time
import zipfile

import numpy as np

from memedit import _io, metrics, specs
from memedit.covariance import key_count, second_moment
from memedit.edits import save_edit
from memedit.generators import (collect_statistics, comparison_grid, edit_from_spec, edited,
                                generate_images, generator_from_converted, insert, layer_info,
                                match_scores, overfit, rank_by_match, run_layer, save_png)

__all__ = ["DEMO_REQUIREMENT", "DEMO_WEIGHTS_SHA256", "REPORT_QUANTILES", "SWEEP_QUANTILES",
           "demo_goals", "demo_summary", "demo_weights", "run_demo", "run_stylegan2_demo",
           "stylegan2_converted"]

DEMO_WEIGHTS_SHA256 = "0c3b90b138cfc4e8a73310b9fd5ce2a8f1f3a542a037de277412307fcd28771f"
DEMO_REQUIREMENT = "gan-face-generate==1.1.1"
# Match quantiles of the demo: the reference's heat-map quantile 0.999 and the broader 0.99
# (reported in full), and a sweep of specificity ratios.
REPORT_QUANTILES = (0.999, 0.99)
SWEEP_QUANTILES = (0.9, 0.95, 0.98, 0.99, 0.995, 0.998, 0.999)


def demo_weights(path: str | os.PathLike, work: str | os.PathLike) -> str:
  """``weights.tar`` from a path to it, to the package's wheel, or to a folder holding
  the wheel (extracted into ``work``), after checking its sha256.

  Args:
    path: weights.tar, the wheel, or a folder holding one of them.
    work: folder to extract weights.tar into.

  Returns:
    The path of weights.tar.

  Raises:
    FileNotFoundError: a folder without the wheel or weights.tar.
    ValueError: a file whose sha256 is not :data:`DEMO_WEIGHTS_SHA256`.

  Example:
    >>> import tempfile
    >>> demo_weights(tempfile.mkdtemp(), tempfile.mkdtemp())
    Traceback (most recent call last):
    ...
    FileNotFoundError: --weights: no gan_face_generate-1.1.1 wheel or weights.tar in ...
  """
  path = os.fspath(path)
  if os.path.isdir(path):
    wheels = sorted(glob.glob(os.path.join(path, "gan_face_generate-1.1.1-*.whl")))
    if not wheels:
      tar = os.path.join(path, "weights.tar")
      if os.path.isfile(tar):
        wheels = [tar]
      else:
        raise FileNotFoundError(f"--weights: no gan_face_generate-1.1.1 wheel or weights.tar "
                                f"in {path}")
    path = wheels[0]
  if path.endswith(".whl"):
    out = os.path.join(work, "weights.tar")
    with zipfile.ZipFile(path) as zf:
      _io.atomic_write_bytes(out, zf.read("gan_face_generate/weights.tar"))
    path = out
  digest = _io.sha256_file(path)
  if digest != DEMO_WEIGHTS_SHA256:
    raise ValueError(f"--weights: expected sha256 {DEMO_WEIGHTS_SHA256}, got {digest}")
  return path


def _gain(m: dict) -> str:
  eff = m.get("efficacy")
  return "n/a" if eff is None else f"{eff['cosine_gain']:.3f}"


def _at_least(ratio, bound) -> bool:
  """``ratio >= bound``; False for an undefined ratio (None: nothing matched, or nothing
  changed outside the matched regions)."""
  return ratio is not None and ratio >= bound


def _ratio(ratio) -> str:
  return "undefined" if ratio is None else f"{ratio:.1f}"


def demo_goals(m: dict, o: dict) -> dict:
  """The demo's goals at one threshold: memedit's specificity ratio ≥ 5, and its efficacy
  above the overfit baseline's at no more change outside the matched regions.

  Args:
    m: memedit's metrics (:func:`memedit.metrics.evaluate_edit`). o: the baseline's.

  Returns:
    dict of goal → bool.

  Example:
    >>> sp = lambda r, out: {"ratio": r, "outside_mean_abs_change": out}
    >>> m = {"specificity": sp(6, 0.1), "specificity_footprint": sp(3, 0.1),
    ...      "efficacy": {"cosine_gain": 0.2}}
    >>> o = {"specificity": sp(2, 0.3), "efficacy": {"cosine_gain": 0.1}}
    >>> sorted(k for k, v in demo_goals(m, o).items() if v)
    ['efficacy_beats_overfit', 'outside_change_not_above_overfit', 'specificity_ratio_at_least_5']
  """
  eff, over_eff = m.get("efficacy"), o.get("efficacy")
  return {
      "specificity_ratio_at_least_5": _at_least(m["specificity"]["ratio"], 5),
      "footprint_specificity_ratio_at_least_5": _at_least(m["specificity_footprint"]["ratio"],
                                                          5),
      "efficacy_beats_overfit": (eff is not None and over_eff is not None
                                 and eff["cosine_gain"] > over_eff["cosine_gain"]),
      "outside_change_not_above_overfit": (m["specificity"]["outside_mean_abs_change"]
                                           <= o["specificity"]["outside_mean_abs_change"]),
  }


def _label(text: str, width: int) -> np.ndarray:
  """A white (18, width, 3) uint8 strip with ``text`` written in black."""
  from PIL import Image, ImageDraw

  img = Image.new("RGB", (width, 18), (255, 255, 255))
  ImageDraw.Draw(img).text((4, 3), text, fill=(0, 0, 0))
  return np.asarray(img)


def _load_spec(gen, spec_path: str | None, bundled: str):
  if spec_path:
    return specs.load_spec(spec_path, layers=sorted(gen.layers), canvas=gen.resolution)
  text = importlib.resources.files("memedit").joinpath(f"data/{bundled}").read_text()
  return specs.spec_from_json(json.loads(text), layers=sorted(gen.layers),
                              canvas=gen.resolution)


def _edit_and_measure(gen, spec, *, stats_dir: str, samples: int, held_out: int,
                      held_out_start: int, pictured: int, steps: int | None,
                      overfit_steps: int, progress: bool, times: dict
                      ) -> tuple[dict, np.ndarray, object]:
  """The demo's work on one generator: C at the spec's layer, the spec's edit, the same
  edit with the other tap setting, the overfit baseline, their metrics on held-out
  latents and the picture. Returns ``(report fields, picture, the edit)``."""
  t0 = time.perf_counter()
  state = collect_statistics(gen, spec.layer, samples, batch_size=100, cache_dir=stats_dir,
                             progress=progress)
  C = second_moment(state)
  times["statistics_s"] = time.perf_counter() - t0
  t0 = time.perf_counter()
  res_spec = edit_from_spec(gen, spec, C, steps=steps)
  res = res_spec.result
  times["rewrite_s"] = time.perf_counter() - t0
  # The same edit with the other tap setting, for comparison: same D, same target, same
  # solver settings.
  t0 = time.perf_counter()
  other_taps = "all" if spec.taps == "own" else "own"
  other_name = f"memedit_taps_{other_taps}"
  st = res.edit.settings
  other_skipped = None
  try:
    other = insert(gen, spec.layer, res.D, res.target, optimizer=st["optimizer"],
                   steps=st["steps"], learning_rate=st["learning_rate"], loss=st["loss"],
                   taps=other_taps, method=res.edit.method, settings=st)
  except ValueError as e:  # a layer without a tap geometry for 'own'
    other, other_skipped = None, str(e)
  times[f"rewrite_taps_{other_taps}_s"] = time.perf_counter() - t0
  t0 = time.perf_counter()
  ovf = overfit(gen, spec.layer, res.target, steps=overfit_steps)
  times["overfit_s"] = time.perf_counter() - t0
  edits = {"memedit": edited(gen, res.edit)[0]}
  if other is not None:
    edits[other_name] = edited(gen, other.edit)[0]
  edits["overfit"] = edited(gen, ovf.edit)[0]
  held = [n for n in range(held_out_start, held_out_start + held_out)
          if n not in spec.imgnums()]
  t0 = time.perf_counter()
  target_value = None if res_spec.copied is None else res_spec.copied.mean_value
  original = run_layer(gen, spec.layer, gen.latents(held))
  by_edit = {name: metrics.evaluate_at_quantiles(gen, spec.layer, res.D, g.params, held,
                                                 SWEEP_QUANTILES, original=original,
                                                 target_value=target_value)
             for name, g in edits.items()}
  # Pictured: the held-out images whose keys match the context best (the reference UI's
  # ranking), where the rule applies.
  n_pic = min(pictured, len(held))
  shown = [n for n, _ in rank_by_match(match_scores(original.keys, res.D), held)[:n_pic]]
  del original
  at = {q: {name: ms[SWEEP_QUANTILES.index(q)] for name, ms in by_edit.items()}
        for q in REPORT_QUANTILES}
  sweep = [{"quantile": q, "ratio": by_edit["memedit"][i]["specificity"]["ratio"],
            "footprint_ratio": by_edit["memedit"][i]["specificity_footprint"]["ratio"],
            **{f"{name}_ratio": ms[i]["specificity"]["ratio"]
               for name, ms in by_edit.items() if name != "memedit"}}
           for i, q in enumerate(SWEEP_QUANTILES)]
  times["evaluate_s"] = time.perf_counter() - t0
  z = gen.latents(shown)
  orig = generate_images(gen, z)
  titles = {
      "memedit": f"memedit: {spec.kind}/{spec.method} rank {spec.rank} at {spec.layer}, "
                 f"taps {spec.taps} (the {n_pic} held-out images matching the context best; "
                 "original | edited)",
      other_name: f"memedit, same spec with taps {other_taps} (original | edited)",
      "overfit": f"overfit baseline: all weights of {spec.layer}, {overfit_steps} Adam "
                 "steps (original | edited)"}
  parts = []
  for name, g in edits.items():
    grid = comparison_grid(orig, generate_images(g, z), columns=4)
    parts += [_label(titles[name], grid.shape[1]), grid]
  fields = {
      "spec": {"layer": spec.layer, "kind": spec.kind, "method": spec.method,
               "rank": spec.rank, "shrinkage": spec.shrinkage, "taps": spec.taps,
               "solver": {**spec.solver, **({"steps": steps} if steps else {})},
               "imgnums_used": sorted(spec.imgnums())},
      "statistics": {"samples": int(key_count(state) // (layer_info(
          gen, spec.layer).key_res ** 2)), "keys": key_count(state)},
      "held_out_imgnums": [held[0], held[-1]],
      "num_held_out": len(held),
      "pictured": n_pic,
      "pictured_imgnums": shown,
      "paste_l1": {"memedit": [res.loss_before, res.loss_after],
                   **({other_name: [other.loss_before, other.loss_after]}
                      if other is not None else {}),
                   "overfit": [ovf.loss_before, ovf.loss_after]},
      "taps_comparison": ({"edit": other_name, "taps": other_taps} if other is not None
                          else {"skipped": other_skipped}),
      "overfit_baseline": {"scope": "all weights of the layer", "optimizer": "adam",
                           "steps": overfit_steps, "learning_rate": 0.01,
                           "note": "the paper used 20001 steps"},
      "by_quantile": {str(q): at[q] for q in REPORT_QUANTILES},
      "specificity_by_quantile": sweep,
      "goals": {str(q): demo_goals(at[q]["memedit"], at[q]["overfit"])
                for q in REPORT_QUANTILES},
  }
  return fields, np.concatenate(parts), res.edit


def _write_outputs(out, name: str, picture, edit, report: dict) -> None:
  os.makedirs(out, exist_ok=True)
  save_png(os.path.join(out, f"{name}.png"), picture)
  save_edit(os.path.join(out, f"{name}.edit"), edit)
  _io.atomic_write_bytes(os.path.join(out, f"{name}.json"),
                         json.dumps(report, indent=2, allow_nan=False).encode())


def run_demo(weights: str | os.PathLike, *, out: str | os.PathLike = "out",
             work: str | os.PathLike = ".cache/demo", spec_path: str | None = None,
             samples: int = 2000, held_out: int = 2048, held_out_start: int = 6000,
             pictured: int = 16, steps: int | None = None, overfit_steps: int = 2000,
             progress: bool = True) -> dict:
  """Runs the demo (see the module docstring) and returns its report (``demo.json``).

  Args:
    weights: weights.tar, the package's wheel, or a folder holding one of them.
    out: folder for demo.png, demo.edit and demo.json.
    work: folder for the converted model and the statistics cache.
    spec_path: an edit spec (default: the bundled demo spec).
    samples: latents for C. held_out, held_out_start: the held-out images measured.
    pictured: held-out pairs drawn (the images matching the context best).
    steps: override the spec's solver steps.
    overfit_steps: Adam steps of the overfit baseline.
    progress: progress bar while collecting statistics.

  Returns:
    The report dict (model, spec, statistics, paste losses, metrics by quantile, goals,
    timings).

  Raises:
    FileNotFoundError, ValueError: missing weights or ones with another sha256 (before
      any work), and the errors of the steps.

  Example:
    >>> import tempfile
    >>> work = tempfile.mkdtemp()
    >>> run_demo(work, out=work + "/out", work=work)
    Traceback (most recent call last):
    ...
    FileNotFoundError: --weights: no gan_face_generate-1.1.1 wheel or weights.tar in ...
  """
  from ports.dcgan import convert_dcgan

  times = {}
  t_all = time.perf_counter()
  os.makedirs(work, exist_ok=True)
  t0 = time.perf_counter()
  weights = demo_weights(weights, work)
  model_dir = os.path.join(work, "faces-dcgan")
  convert_dcgan(weights, model_dir)
  gen = generator_from_converted(model_dir)
  times["convert_s"] = time.perf_counter() - t0
  spec = _load_spec(gen, spec_path, "demo_spec.json")
  fields, picture, edit = _edit_and_measure(
      gen, spec, stats_dir=os.path.join(work, "stats"), samples=samples, held_out=held_out,
      held_out_start=held_out_start, pictured=pictured, steps=steps,
      overfit_steps=overfit_steps, progress=progress, times=times)
  times["total_s"] = time.perf_counter() - t_all
  report = {"model": {"package": DEMO_REQUIREMENT, "licence": "MIT",
                      "weights_sha256": _io.sha256_file(weights), "architecture": "dcgan",
                      "resolution": gen.resolution},
            **fields, "timings": times}
  _write_outputs(out, "demo", picture, edit, report)
  return report


def stylegan2_converted(checkpoint: str | os.PathLike | None = None,
                        work: str | os.PathLike = ".cache/demo") -> tuple[str, str, str]:
  """The demo StyleGAN2 converted for memedit: ``WORK/stylegan2-<sha256[:12]>``, made by
  :func:`ports.stylegan2.convert_rosinality` when missing.

  Args:
    checkpoint: a rosinality ``.pt`` (default: the shipped
      ``ports/stylegan2/weights/faces64.pt``, checked against ``FACES64_SHA256``).
    work: the folder the converted generator goes in.

  Returns:
    ``(converted folder, checkpoint path, checkpoint sha256)``.

  Raises:
    FileNotFoundError: no checkpoint there. ValueError: the default checkpoint with
      another sha256; the converter's errors.

  Example:
    >>> import tempfile
    >>> stylegan2_converted(tempfile.mkdtemp() + "/none.pt")
    Traceback (most recent call last):
    ...
    FileNotFoundError: ...none.pt...
  """
  from ports.stylegan2 import convert_rosinality
  from ports.stylegan2.weights import FACES64, FACES64_SHA256

  path = os.fspath(checkpoint) if checkpoint is not None else FACES64
  if not os.path.isfile(path):
    raise FileNotFoundError(f"--stylegan2: no checkpoint at {path}")
  digest = _io.sha256_file(path)
  if checkpoint is None and digest != FACES64_SHA256:
    raise ValueError(f"{path}: expected sha256 {FACES64_SHA256}, got {digest}")
  os.makedirs(work, exist_ok=True)
  model_dir = os.path.join(os.fspath(work), f"stylegan2-{digest[:12]}")
  if not os.path.isdir(model_dir):
    convert_rosinality(path, model_dir)
  return model_dir, path, digest


def run_stylegan2_demo(checkpoint: str | os.PathLike | None = None, *,
                       out: str | os.PathLike = "out",
                       work: str | os.PathLike = ".cache/demo", spec_path: str | None = None,
                       samples: int = 2000, held_out: int = 1024, held_out_start: int = 6000,
                       pictured: int = 16, steps: int | None = None,
                       overfit_steps: int = 2000, progress: bool = True) -> dict:
  """The demo on the project's StyleGAN2 (64×64 faces distilled from the DCGAN; MIT).

  The checkpoint is a rosinality ``.pt`` (by default the one shipped in
  :mod:`ports.stylegan2.weights`, checked against its ``FACES64_SHA256``); it is
  converted with :func:`ports.stylegan2.convert_rosinality` and edited like the DCGAN
  (bundled spec ``memedit/data/demo_spec_stylegan2.json``: the same paste and context
  images, at a modulated convolution, so Λ is solved through the demodulation). Writes
  ``demo-stylegan2.png``, ``demo-stylegan2.edit`` and ``demo-stylegan2.json``.

  Args:
    checkpoint: the ``.pt`` (default: the shipped one). The other arguments are
      :func:`run_demo`'s.

  Returns:
    The report dict (as :func:`run_demo`'s).

  Raises:
    ValueError: the default checkpoint with another sha256; the errors of the steps.

  Example:
    >>> import tempfile
    >>> run_stylegan2_demo(tempfile.mkdtemp() + "/none.pt")
    Traceback (most recent call last):
    ...
    FileNotFoundError: ...none.pt...
  """
  times = {}
  t_all = time.perf_counter()
  t0 = time.perf_counter()
  model_dir, path, digest = stylegan2_converted(checkpoint, work)
  gen = generator_from_converted(model_dir)
  times["convert_s"] = time.perf_counter() - t0
  spec = _load_spec(gen, spec_path, "demo_spec_stylegan2.json")
  fields, picture, edit = _edit_and_measure(
      gen, spec, stats_dir=os.path.join(work, "stats"), samples=samples, held_out=held_out,
      held_out_start=held_out_start, pictured=pictured, steps=steps,
      overfit_steps=overfit_steps, progress=progress, times=times)
  times["total_s"] = time.perf_counter() - t_all
  report = {"model": {"checkpoint": os.path.basename(path), "licence": "MIT",
                      "weights_sha256": digest, "architecture": "stylegan2",
                      "resolution": gen.resolution},
            **fields, "timings": times}
  _write_outputs(out, "demo-stylegan2", picture, edit, report)
  return report


def demo_summary(report: dict) -> str:
  """The one-line summary ``memedit demo`` prints for a :func:`run_demo` report.

  Args:
    report: the report.

  Returns:
    The line: the paste loss, and per reported quantile the specificity ratio and the
    cosine gains of memedit, the overfit baseline and the other tap setting.

  Example:
    >>> sp = {"ratio": 9.0, "inside_mean_abs_change": 0.3, "outside_mean_abs_change": 0.03}
    >>> at = {"memedit": {"specificity": sp, "efficacy": {"cosine_gain": 0.08}},
    ...       "overfit": {"specificity": sp}}
    >>> report = {"taps_comparison": {"skipped": "no taps"}, "spec": {"layer": "convt2"},
    ...           "by_quantile": {"0.999": at, "0.99": at}, "num_held_out": 8,
    ...           "paste_l1": {"memedit": [0.4, 0.3]}, "timings": {"total_s": 12.0}}
    >>> demo_summary(report)[:60]
    'demo: layer convt2; paste L1 0.400 -> 0.300; 8 held-out late'
  """
  taps = report["taps_comparison"]
  other = taps.get("edit")
  summary = []
  for q in REPORT_QUANTILES:
    at = report["by_quantile"][str(q)]
    m, o = at["memedit"], at["overfit"]
    sp = m["specificity"]
    summary.append(
        f"quantile {q}: specificity ratio {_ratio(sp['ratio'])} (inside "
        f"{sp['inside_mean_abs_change']:.3f}, outside {sp['outside_mean_abs_change']:.3f}), "
        f"efficacy (cosine gain) {_gain(m)} vs overfit {_gain(o)} at outside change "
        f"{o['specificity']['outside_mean_abs_change']:.3f}"
        + (f" (taps {taps['taps']}: ratio {_ratio(at[other]['specificity']['ratio'])}, "
           f"gain {_gain(at[other])})" if other is not None else ""))
  before, after = report["paste_l1"]["memedit"]
  return (f"demo: layer {report['spec']['layer']}; paste L1 {before:.3f} -> {after:.3f}; "
          f"{report['num_held_out']} held-out latents; " + "; ".join(summary)
          + f"; total {report['timings']['total_s']:.0f}s")

