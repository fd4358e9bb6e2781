"""The ``memedit`` subcommands: ``add_<name>(subparsers)`` declares one's arguments and
``run_<name>(args) -> int`` carries it out; :data:`SUBCOMMANDS` lists the ``add_*``
functions in the order ``memedit --help`` shows them.
"""

from __future__ import annotations

import argparse
import math
import os

from memedit.cli.checks import (FORMATS, MAX_BATCH, MAX_COLUMNS, MAX_EVALUATED, MAX_PAIRS,
                                MAX_SAMPLES, check_finite_edit, check_finite_images,
                                check_input_file, check_output_file,
                                check_output_location, image_limit, imgnums, in_range,
                                is_json_report, is_png, warn_other_call, writing)
from memedit.demo import DEMO_REQUIREMENT
from memedit.specs import MAX_IMAGES, MAX_STEPS
from memedit.lm.cli import add_subcommands as _add_lm
from memedit.sequential.cli import add_subcommand as _add_log
from memedit.ui import add_subcommand as _add_ui

__all__ = ["SUBCOMMANDS"]


_CONVERT_HELP = """\
Convert a PyTorch generator (or GPT-2) checkpoint into a Flax checkpoint directory (an orbax
checkpoint plus a JSON config with the architecture and the source file's sha256).

The source is read without importing torch and without running any code stored in
it: pickles may only name tensor, storage, dtype and container constructors.

formats:
  rosinality  StyleGAN2 .pt from rosinality/stylegan2-pytorch: a torch.save dict
              {'g_ema': state_dict, 'latent_avg': ...}
  nvidia      stylegan2-ada / stylegan3 network pickle (.pkl) holding 'G_ema'
  dcgan       PyTorch-tutorial DCGAN generator: {'netG_state_dict': ...} or the
              state dict itself (main.0.weight ... main.12.weight)
  gpt2        a Hugging Face GPT-2 save_pretrained folder (config.json with
              model.safetensors, pytorch_model.bin or shards): SRC is the folder
  auto        decide from the content: a folder, a .safetensors file or a shard
              index (*.index.json) is GPT-2, another file is read (default)

The write is atomic: an interrupted conversion leaves OUT as it was. An existing OUT
is replaced only when it is an earlier conversion (or empty); --force replaces any
other folder, except one that holds SRC or the current directory.

example:
  memedit convert weights.tar faces-dcgan
  memedit convert network-snapshot.pkl ffhq-64 --format nvidia
"""


def _add_convert(subparsers) -> None:
  p = subparsers.add_parser(
      "convert", help="convert a PyTorch generator or GPT-2 checkpoint to a Flax checkpoint",
      description=_CONVERT_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("src", metavar="SRC", help="PyTorch checkpoint file (.pt, .pth, .tar, .pkl), "
                 "or a Hugging Face GPT-2 folder")
  p.add_argument("out", metavar="OUT", help="output directory (created or replaced atomically)")
  p.add_argument("--format", choices=FORMATS, default="auto",
                 help="source checkpoint format (default: %(default)s, detected from content)")
  p.add_argument("--force", action="store_true",
                 help="replace OUT even when it is not an earlier conversion")
  p.set_defaults(run=_run_convert)


def _hf_weights_file(path: str) -> bool:
  """Whether a file is Hugging Face weights that no torch reader takes: a safetensors file
  or a shard index (``*.index.json``)."""
  from ports.gpt2.hf_files import looks_like_safetensors

  return path.endswith((".safetensors", ".index.json")) or looks_like_safetensors(path)


def _run_convert(args: argparse.Namespace) -> int:
  import ports
  from memedit import _io

  fmt = args.format
  if fmt == "auto" and os.path.isfile(args.src) and _hf_weights_file(args.src):
    fmt = "gpt2"  # one Hugging Face weights file (or shard index) beside its config.json
  if fmt == "gpt2" or (fmt == "auto" and os.path.isdir(args.src)):
    if not os.path.isdir(args.src):
      check_input_file(args.src, "SRC")  # a weights file beside its config.json
    elif not os.path.isfile(os.path.join(args.src, "config.json")):
      raise ValueError(f"SRC: expected a checkpoint file, or a Hugging Face GPT-2 folder "
                       f"(config.json and its weights), got the folder {args.src!r}, which "
                       f"holds no config.json")
    fmt = "gpt2"
  else:
    check_input_file(args.src, "SRC")
  check_output_location(args.out, "OUT", folder=True)
  _io.check_output(args.out, "converted", force=args.force, protect=(args.src,),
                   flag="--force")
  if fmt == "auto":
    fmt = ports.detect_format(args.src)
  if fmt not in ("dcgan", "rosinality", "nvidia", "gpt2"):
    raise ValueError(f"--format: expected one of {FORMATS}, got {fmt!r}")
  with writing(args.out, "OUT"):
    if fmt == "gpt2":
      from ports.gpt2 import convert_gpt2
      out = convert_gpt2(args.src, args.out, force=args.force)
    elif fmt == "dcgan":
      from ports.dcgan import convert_dcgan
      out = convert_dcgan(args.src, args.out, force=args.force)
    elif fmt == "rosinality":
      from ports.stylegan2 import convert_rosinality
      out = convert_rosinality(args.src, args.out, force=args.force)
    else:
      from ports.stylegan2 import convert_nvidia
      out = convert_nvidia(args.src, args.out, force=args.force)
  config = ports.read_config(out)
  shape = (f"{config.get('n_layer')} blocks of width {config.get('n_embd')}" if fmt == "gpt2"
           else f"resolution {config.get('resolution')}")
  source = config.get("source")
  entry = config.get("source_entry") or (source.get("entry") if isinstance(source, dict)
                                         else None)
  print(f"converted {args.src} ({fmt}) -> {out}: architecture {config.get('architecture')}, "
        f"{shape}" + (f"; generator weights from {entry}" if entry else ""))
  return 0


# ----------------------------------------------------------------------------------------
# The rewriting workflow: stats, rewrite, sample, evaluate, demo.



def _add_model_args(p, *, layer: bool = True) -> None:
  p.add_argument("model", metavar="MODEL",
                 help="converted checkpoint directory (see `memedit convert`)")
  if layer:
    p.add_argument("--layer", help="layer name, e.g. convt2 (DCGAN) or conv_6 (StyleGAN2)")
  p.add_argument("--truncation", type=float, default=None,
                 help="StyleGAN2 truncation psi, a finite number (default 1)")


def _add_stats_args(p) -> None:
  p.add_argument("--samples", type=int, default=1000,
                 help=f"latents (images 0..N-1) whose keys make C, 1 to {MAX_SAMPLES} "
                 "(default: %(default)s)")
  p.add_argument("--batch-size", type=int, default=50, help=f"latents per batch, 1 to "
                 f"{MAX_BATCH} (default: %(default)s)")
  p.add_argument("--cache-dir", default=".cache/stats",
                 help="statistics cache (default: %(default)s); keyed by content hash")
  p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _check_stats_args(args) -> None:
  in_range("--samples", args.samples, 1, MAX_SAMPLES)
  in_range("--batch-size", args.batch_size, 1, MAX_BATCH)
  _check_cache_dir(args.cache_dir)


def _check_cache_dir(path: str) -> None:
  """Checks --cache-dir before any work: an existing folder (read, and written when it
  lacks these statistics), or a path where one can be made."""
  if os.path.isdir(path):
    return
  if os.path.lexists(path):
    raise ValueError(f"--cache-dir: expected a folder, got {path!r}, which is a file")
  check_output_location(path, "--cache-dir", folder=True)


def _open(args):
  from memedit.generators import generator_from_converted

  if args.truncation is not None and not math.isfinite(args.truncation):
    raise ValueError(f"--truncation: expected a finite number, got {args.truncation}")
  return generator_from_converted(args.model, truncation=args.truncation)


def _statistics(gen, layer, args):
  from memedit.generators import collect_statistics
  with writing(args.cache_dir, "--cache-dir"):
    return collect_statistics(gen, layer, args.samples, batch_size=args.batch_size,
                              cache_dir=args.cache_dir, progress=not args.no_progress)


_STATS_HELP = """\
Collect C = E[k kᵀ] of one layer's keys over the deterministic latent sample (images
0..N-1, numpy RandomState(1) standard normals), with a progress bar.

The statistics are cached under --cache-dir by a content hash of the model's weights,
the layer, the sample and the dtype, and saved atomically after every group of batches:
an interrupted run resumes where it stopped without recomputing what it had, and a
finished one is read back instantly.

example:
  memedit stats faces-dcgan --layer convt2 --samples 2000
"""


def _add_stats(subparsers) -> None:
  p = subparsers.add_parser("stats", help="collect a layer's key statistics C (cached, "
                            "resumable)", description=_STATS_HELP,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
  _add_model_args(p)
  _add_stats_args(p)
  p.set_defaults(run=_run_stats)


def _run_stats(args) -> int:
  import numpy as np

  import memedit

  _check_stats_args(args)
  gen = _open(args)
  if not args.layer:
    raise ValueError(f"--layer: expected one of {sorted(gen.layers)}, got none")
  gen.layer_address(args.layer)
  state = _statistics(gen, args.layer, args)
  C = np.asarray(memedit.second_moment(state), np.float64)
  ev = np.linalg.eigvalsh(C)
  print(f"stats {args.model} layer {args.layer}: {memedit.key_count(state)} keys of dim "
        f"{C.shape[0]}; eigenvalues {ev[0]:.3g} .. {ev[-1]:.3g}; cached in {args.cache_dir}")
  return 0


_REWRITE_HELP = """\
Apply an edit spec to a model: context keys -> directions D, copy the object's values,
paste them at the target, solve Λ through the layer; writes the edit (Λ, D and how it was
made) with memedit.save_edit, and optionally the edited checkpoint.

The spec is the reference's JSON ("key": [[imgnum, mask], ...], "object": [imgnum, mask],
"paste": [imgnum, mask], optional "query"; masks are PNG data URLs at the canvas
resolution) with "layer", "method" (zca, svd, mean, unit), "rank", "kind" (insert or
erase) and "solver" ({"optimizer": "adam" | "gauss_newton", "steps", "learning_rate",
"loss"}). C comes from the same cache as `memedit stats`.

--out and --save-model replace an existing folder only when it is an earlier edit /
edited checkpoint (or empty); --force replaces any other folder, except one that holds
MODEL, SPEC, the statistics cache or the current directory.

example:
  memedit rewrite faces-dcgan spec.json --out glasses.edit --save-model faces-glasses
"""


def _add_rewrite(subparsers) -> None:
  p = subparsers.add_parser("rewrite", help="apply an edit spec: write the edit (and the "
                            "edited checkpoint)", description=_REWRITE_HELP,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
  _add_model_args(p, layer=False)
  p.add_argument("spec", metavar="SPEC", help="JSON edit spec")
  p.add_argument("--out", required=True, help="edit directory to write (atomic)")
  p.add_argument("--save-model", metavar="DIR", help="also write the edited checkpoint")
  p.add_argument("--force", action="store_true",
                 help="replace --out / --save-model even when they hold something else")
  p.add_argument("--steps", type=int, help=f"override the spec's solver steps, 1 to "
                 f"{MAX_STEPS}")
  p.add_argument("--optimizer", choices=("adam", "gauss_newton"),
                 help="override the spec's solver optimizer")
  _add_stats_args(p)
  p.set_defaults(run=_run_rewrite)


def _load_spec(path, gen):
  from memedit import specs
  return specs.load_spec(path, layers=sorted(gen.layers), canvas=gen.resolution)


def _run_rewrite(args) -> int:
  import time

  import memedit
  from memedit.generators import edit_from_spec

  _check_stats_args(args)
  in_range("--steps", args.steps, 1, MAX_STEPS)
  check_input_file(args.spec, "SPEC")
  outputs = _check_rewrite_outputs(args)
  gen = _open(args)
  spec = _load_spec(args.spec, gen)
  state = _statistics(gen, spec.layer, args)
  t0 = time.perf_counter()
  out = edit_from_spec(gen, spec, memedit.second_moment(state), steps=args.steps,
                       optimizer=args.optimizer)
  res = out.result
  check_finite_edit(res.edit, f"rewrite {args.spec}")
  with writing(args.out, "--out"):
    memedit.save_edit(outputs["edit"], res.edit, force=args.force)
  print(f"rewrite {args.spec}: layer {spec.layer}, {spec.kind}/{spec.method} rank {spec.rank}; "
        f"L1 at the paste {res.loss_before:.4f} -> {res.loss_after:.4f} in "
        f"{time.perf_counter() - t0:.1f}s; edit written to {args.out}")
  if args.save_model:
    with writing(args.save_model, "--save-model"):
      _save_edited_model(args.model, gen, res.edit, outputs["edited-model"],
                         force=args.force)
    print(f"edited checkpoint written to {args.save_model}")
  return 0


def _check_rewrite_outputs(args) -> dict:
  """Checks --out and --save-model before any work; returns them by kind (absolute)."""
  from memedit import _io

  protect = [args.model, args.spec, args.cache_dir]
  check_output_location(args.out, "--out", folder=True)
  outputs = {"edit": _io.check_output(args.out, "edit", force=args.force, protect=protect,
                                      flag="--force")}
  if args.save_model:
    check_output_location(args.save_model, "--save-model", folder=True)
    outputs["edited-model"] = _io.check_output(args.save_model, "edited-model",
                                               force=args.force, protect=protect,
                                               flag="--force")
    if outputs["edited-model"] == outputs["edit"]:
      raise ValueError(f"--save-model: expected a folder other than --out, got "
                       f"{args.save_model!r} for both")
  return outputs


def _save_edited_model(src, gen, edit, dst, *, force: bool = False) -> None:
  import ports
  from memedit import _io
  from memedit.generators import edited

  config = dict(ports.read_config(src))
  new, _ = edited(gen, edit)
  config["edits"] = list(config.get("edits", [])) + [
      {"name": edit.name, "path": list(edit.path), "method": edit.method}]
  _io.save_tree(dst, new.params, config, kind="edited-model", force=force, protect=(src,),
                flag="--force")


_SAMPLE_HELP = """\
Render images of the deterministic latent sample with the original and the edited model
side by side (pairs: original left, edited right) into one PNG.

The write is atomic. An existing --out is replaced only when it is a PNG image (or
empty); any other file is refused, and so is a path that is MODEL, --edit or lies
inside them.

example:
  memedit sample faces-dcgan --edit glasses.edit --images 100-131 --out pairs.png
"""


def _add_sample(subparsers) -> None:
  p = subparsers.add_parser("sample", help="PNG grid of original vs edited images",
                            description=_SAMPLE_HELP,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
  _add_model_args(p, layer=False)
  p.add_argument("--edit", required=True, help="edit directory written by `memedit rewrite`")
  p.add_argument("--images", default="100-115",
                 help=f"image numbers below {MAX_IMAGES}, e.g. '100-115' or '3,7,9'; at most "
                 f"{MAX_PAIRS} (fewer above 256 px: {MAX_PAIRS}·(256/resolution)²) "
                 "(default: %(default)s)")
  p.add_argument("--columns", type=int, default=4,
                 help=f"pairs per row, 1 to {MAX_COLUMNS}; fewer images fill one row "
                 "(default: %(default)s)")
  p.add_argument("--out", required=True,
                 help="PNG file to write; an existing file is replaced only when it is a PNG")
  p.set_defaults(run=_run_sample)


def _run_sample(args) -> int:
  import memedit
  from memedit.generators import comparison_grid, edited, generate_images, save_png

  in_range("--columns", args.columns, 1, MAX_COLUMNS)
  check_output_file(args.out, "--out", protect=(args.model, args.edit), what="a PNG image",
                    accept=is_png)
  gen = _open(args)
  nums = imgnums(args.images, image_limit(MAX_PAIRS, gen.resolution))
  edit = memedit.load_edit(args.edit)
  check_finite_edit(edit, f"--edit {args.edit}")
  warn_other_call(edit, gen, f"--edit {args.edit}")
  new, _ = edited(gen, edit)
  z = gen.latents(nums)
  original = generate_images(gen, z)
  check_finite_images(original, f"MODEL {args.model}")
  changed = generate_images(new, z)
  check_finite_images(changed, f"--edit {args.edit} (the edited model)")
  with writing(args.out, "--out"):
    save_png(args.out, comparison_grid(original, changed,
                                       columns=min(args.columns, len(nums))))
  print(f"sample: {len(nums)} pairs written to {args.out}")
  return 0


_EVALUATE_HELP = """\
Measure an edit on held-out latents (no external models): context match (share of
latents and pixels whose keys match the edit's context above a quantile threshold),
efficacy (in matched regions, how far the layer output moved towards the pasted value)
and specificity (mean absolute pixel change inside vs outside matched regions, and on
latents with no match). Writes JSON.

example:
  memedit evaluate faces-dcgan spec.json --edit glasses.edit --images 100-163 --out m.json
"""


def _add_evaluate(subparsers) -> None:
  p = subparsers.add_parser("evaluate", help="metrics of an edit on held-out latents",
                            description=_EVALUATE_HELP,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
  _add_model_args(p, layer=False)
  p.add_argument("spec", metavar="SPEC", help="the JSON edit spec the edit was made from")
  p.add_argument("--edit", required=True, help="edit directory")
  p.add_argument("--images", default="100-163",
                 help=f"held-out image numbers below {MAX_IMAGES}; at most {MAX_EVALUATED} "
                 f"(fewer above 256 px: {MAX_EVALUATED}·(256/resolution)²) "
                 "(default: %(default)s)")
  p.add_argument("--quantile", type=float, default=0.99,
                 help="match threshold quantile, in (0, 1) (default: %(default)s)")
  p.add_argument("--out", help="JSON file to write (default: print only); an existing file "
                 "is replaced only when it is an earlier `memedit evaluate` report")
  p.set_defaults(run=_run_evaluate)


def _run_evaluate(args) -> int:
  import json

  import memedit
  from memedit import _io, metrics
  from memedit.generators import copy_values, edited

  if not 0 < args.quantile < 1:
    raise ValueError(f"--quantile: expected a number in (0, 1), got {args.quantile}")
  check_input_file(args.spec, "SPEC")
  if args.out:
    check_output_file(args.out, "--out", protect=(args.model, args.spec, args.edit),
                      what="an earlier `memedit evaluate` JSON report",
                      accept=lambda f: is_json_report(f, ("num_latents", "context_match")))
  gen = _open(args)
  spec = _load_spec(args.spec, gen)
  edit = memedit.load_edit(args.edit)
  check_finite_edit(edit, f"--edit {args.edit}")
  warn_other_call(edit, gen, f"--edit {args.edit}")
  if tuple(edit.path) != gen.weight_path(spec.layer):
    raise ValueError(f"--edit: expected an edit of layer {spec.layer!r} "
                     f"{gen.weight_path(spec.layer)}, got one of {tuple(edit.path)}")
  nums = imgnums(args.images, image_limit(MAX_EVALUATED, gen.resolution))
  used = sorted(spec.imgnums() & set(nums))
  if used:
    raise ValueError(f"--images: expected held-out images the spec does not use, got {used}")
  target_value = None
  if spec.kind == "insert":
    (onum, omask), = spec.masks("object")
    target_value = copy_values(gen, spec.layer, onum, omask).mean_value
  new, _ = edited(gen, edit)
  result = metrics.evaluate_edit(gen, spec.layer, edit.D, new.params, nums,
                                 target_value=target_value, quantile=args.quantile)
  text = json.dumps(result, indent=2, allow_nan=False)
  if args.out:
    with writing(args.out, "--out"):
      _io.atomic_write_bytes(args.out, text.encode())
  print(text)
  return 0


_DEMO_HELP = f"""\
The end-to-end demo on real weights: the DCGAN face generator of the PyPI package
{DEMO_REQUIREMENT} (MIT licence; weights.tar, a torch checkpoint inside its wheel).
Converts it, collects C at the bundled spec's layer, applies the bundled edit spec
(memedit/data/demo_spec.json: the dark glasses of one face pasted over the eyes of
another, context = eyes of several faces; Λ on the layer's own taps), runs the same spec
with the other tap setting (all taps, the reference's layout) and the overfit baseline on
the same paste, measures the three on held-out latents the spec never uses (at match
quantiles 0.999 and 0.99), and writes OUT/demo.png (original | edited pairs for each) and
OUT/demo.json (metrics and timings).

Then the same on the project's StyleGAN2 (64×64 faces distilled from that DCGAN, shipped
as ports/stylegan2/weights/faces64.pt, MIT): the same paste and context images at a
modulated convolution (memedit/data/demo_spec_stylegan2.json), --stylegan2-held-out
held-out latents, OUT/demo-stylegan2.png and OUT/demo-stylegan2.json (--no-stylegan2
skips it; --spec applies to the DCGAN only).

The overfit baseline uses --overfit-steps Adam steps (default 2000; the paper used
20001 at lr 0.01).

example:
  pip download --no-deps {DEMO_REQUIREMENT} -d .cache/demo
  memedit demo --weights .cache/demo --out out
"""


def _add_demo(subparsers) -> None:
  p = subparsers.add_parser("demo", help="end-to-end demo on the real DCGAN face weights "
                            "and the project's StyleGAN2",
                            description=_DEMO_HELP,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--weights", required=True,
                 help="weights.tar, the package's wheel, or a folder holding the wheel")
  p.add_argument("--out", default="out", help="output folder (default: %(default)s)")
  p.add_argument("--spec", help="edit spec (default: the bundled demo spec)")
  p.add_argument("--work", default=".cache/demo",
                 help="folder for the converted model and statistics (default: %(default)s)")
  p.add_argument("--samples", type=int, default=2000,
                 help=f"latents for C, 1 to {MAX_SAMPLES} (default: %(default)s)")
  p.add_argument("--held-out", type=int, default=2048,
                 help=f"held-out latents measured, 1 to {MAX_EVALUATED} (default: %(default)s)")
  p.add_argument("--held-out-start", type=int, default=6000,
                 help="image number of the first held-out latent; the last must be below "
                 f"{MAX_IMAGES} (default: %(default)s)")
  p.add_argument("--pictured", type=int, default=16,
                 help=f"held-out pairs drawn in demo.png, 1 to {MAX_PAIRS} "
                 "(default: %(default)s)")
  p.add_argument("--steps", type=int, help=f"override the spec's solver steps, 1 to {MAX_STEPS}")
  p.add_argument("--overfit-steps", type=int, default=2000,
                 help=f"Adam steps of the overfit baseline, 1 to {MAX_STEPS} "
                 "(default: %(default)s)")
  p.add_argument("--stylegan2", default=None,
                 help="rosinality .pt of the StyleGAN2 part (default: the shipped faces64.pt)")
  p.add_argument("--stylegan2-held-out", type=int, default=1024,
                 help=f"held-out latents of the StyleGAN2 part, 1 to {MAX_EVALUATED} "
                 "(default: %(default)s)")
  p.add_argument("--no-stylegan2", action="store_true", help="the DCGAN part only")
  p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
  p.set_defaults(run=_run_demo)


def _run_demo(args) -> int:
  from memedit import demo

  if args.held_out < 1 or args.held_out_start < 0:
    raise ValueError("--held-out, --held-out-start: expected a positive count and a "
                     f"non-negative start, got {args.held_out} and {args.held_out_start}")
  in_range("--held-out", args.held_out, 1, MAX_EVALUATED)
  in_range("--held-out-start", args.held_out_start, 0, MAX_IMAGES - args.held_out)
  in_range("--samples", args.samples, 1, MAX_SAMPLES)
  in_range("--pictured", args.pictured, 1, MAX_PAIRS)
  in_range("--steps", args.steps, 1, MAX_STEPS)
  in_range("--overfit-steps", args.overfit_steps, 1, MAX_STEPS)
  in_range("--stylegan2-held-out", args.stylegan2_held_out, 1,
           min(MAX_EVALUATED, MAX_IMAGES - args.held_out_start))
  if args.spec:
    check_input_file(args.spec, "--spec")
  if args.stylegan2 and not args.no_stylegan2:
    check_input_file(args.stylegan2, "--stylegan2")
  check_output_location(args.out, "--out", folder=True)
  check_output_location(args.work, "--work", folder=True)
  _check_demo_outputs(args)
  report = demo.run_demo(args.weights, out=args.out, work=args.work, spec_path=args.spec,
                         samples=args.samples, held_out=args.held_out,
                         held_out_start=args.held_out_start, pictured=args.pictured,
                         steps=args.steps, overfit_steps=args.overfit_steps,
                         progress=not args.no_progress)
  print(demo.demo_summary(report))
  print(f"wrote {os.path.join(args.out, 'demo.png')} and {os.path.join(args.out, 'demo.json')}")
  if args.no_stylegan2:
    return 0
  report = demo.run_stylegan2_demo(args.stylegan2, out=args.out, work=args.work,
                                   samples=args.samples, held_out=args.stylegan2_held_out,
                                   held_out_start=args.held_out_start,
                                   pictured=args.pictured, steps=args.steps,
                                   overfit_steps=args.overfit_steps,
                                   progress=not args.no_progress)
  print("stylegan2 " + demo.demo_summary(report))
  print(f"wrote {os.path.join(args.out, 'demo-stylegan2.png')} and "
        f"{os.path.join(args.out, 'demo-stylegan2.json')}")
  return 0


def _check_demo_outputs(args) -> None:
  """Before any work: the demo's files in --out (demo.png, demo.json, demo.edit and the
  StyleGAN2 ones) are new or earlier demo outputs, never a file of the user's."""
  from memedit import _io

  if os.path.lexists(args.out) and not os.path.isdir(args.out):
    raise ValueError(f"--out: expected a folder for the demo's outputs, got {args.out!r}, "
                     "which is a file")
  inputs = tuple(x for x in (args.spec, args.stylegan2) if x)  # files (folders may hold --out)
  for name in ("demo",) + (() if args.no_stylegan2 else ("demo-stylegan2",)):
    base = os.path.join(args.out, name)
    check_output_file(base + ".png", "--out", protect=inputs, what="a PNG image",
                      accept=is_png)
    check_output_file(base + ".json", "--out", protect=inputs,
                      what="an earlier `memedit demo` JSON report",
                      accept=lambda f: is_json_report(f, ("model", "spec", "paste_l1",
                                                          "by_quantile")))
    _io.check_output(base + ".edit", "edit", protect=inputs, flag="--force")


SUBCOMMANDS = (_add_convert, _add_stats, _add_rewrite, _add_sample, _add_evaluate, _add_demo,
               _add_log, _add_ui, _add_lm)
