"""Command line of the StyleGAN2 distillation trainer (``python -m ports.stylegan2.train``):
train, export, evaluate, preview."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import jax
import jax.numpy as jnp

from ports.stylegan2 import runs
from ports.stylegan2.distilled import check_out_path, evaluate, export, preview
from ports.stylegan2.teacher import Teacher, load_teacher
from ports.stylegan2.train import TrainConfig, check_pair, student_module, train

__all__ = ["main"]



def _channels(text: str) -> tuple[int, ...]:
  """``--channels``: comma-separated integers (a ValueError naming the option)."""
  try:
    return tuple(int(c) for c in text.split(","))
  except ValueError:
    raise ValueError(f"--channels: expected comma-separated integers (widths at 4, 8, ... "
                     f"px), got {text!r}") from None


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="python -m ports.stylegan2.train",
      description="Distil the DCGAN face generator into a small StyleGAN2 (resumable).")
  sub = p.add_subparsers(dest="command", required=True)
  defaults = TrainConfig()

  t = sub.add_parser("train", help="train or resume a run")
  t.add_argument("--teacher", required=True,
                 help="converted DCGAN directory, or its torch checkpoint (weights.tar)")
  t.add_argument("--run-dir", required=True, help="run directory (resumed if it exists)")
  t.add_argument("--steps", type=int, default=defaults.steps)
  t.add_argument("--batch-size", type=int, default=defaults.batch_size)
  t.add_argument("--channels", default=",".join(map(str, defaults.channels)),
                 help="widths at 4, 8, ..., resolution px, comma-separated")
  t.add_argument("--resolution", type=int, default=defaults.resolution)
  t.add_argument("--style-dim", type=int, default=defaults.style_dim)
  t.add_argument("--n-mlp", type=int, default=defaults.n_mlp)
  t.add_argument("--lr", type=float, default=defaults.learning_rate)
  t.add_argument("--seed", type=int, default=defaults.seed)
  t.add_argument("--stop-after", type=int, default=None,
                 help="stop after this many steps of this invocation (resume later)")
  t.add_argument("--checkpoint-every", type=int, default=500)
  t.add_argument("--log-every", type=int, default=50)

  for name, help_ in (("export", "write g_ema as a rosinality .pt checkpoint"),
                      ("evaluate", "SWD and paired L1 of g_ema against the teacher"),
                      ("preview", "PNG of teacher images over the student's")):
    s = sub.add_parser(name, help=help_)
    s.add_argument("--run-dir", required=True)
    s.add_argument("--step", type=int, default=None)
    if name != "export":
      s.add_argument("--teacher", required=True)
    if name == "evaluate":
      s.add_argument("--images", type=int, default=1024)
      s.add_argument("--out", default=None, help="also write the result as JSON")
    elif name == "preview":
      s.add_argument("--images", type=int, default=8, help="number of latents shown")
      s.add_argument("--columns", type=int, default=8)
      s.add_argument("--out", required=True)
    else:
      s.add_argument("--out", required=True)
  return p


def _run_teacher(args: argparse.Namespace) -> Teacher:
  """The teacher of an existing run (``--teacher`` converted into it only if it is the
  teacher the run was trained with: nothing is written for a missing run or another
  teacher; a torch file is converted into a temporary folder for a run this process may
  not write, such as one on read-only media)."""
  run_dir = os.path.abspath(args.run_dir)

  def accept(teacher):
    if not os.path.isfile(os.path.join(run_dir, runs.RUN_FILE)):
      raise FileNotFoundError(f"{run_dir}: not a training run (expected {runs.RUN_FILE} "
                              f"inside it)")
    record = runs.read_run(run_dir)
    if record["teacher"]["digest"] != teacher.digest:
      raise ValueError(f"--teacher: expected the teacher the run was trained with "
                       f"(digest {record['teacher']['digest'][:16]}...), got "
                       f"{args.teacher} (digest {teacher.digest[:16]}...)")

  if os.path.isfile(args.teacher) and not os.access(run_dir, os.W_OK):
    # A run on read-only media (or a missing one): converted for this command only.
    with tempfile.TemporaryDirectory(prefix="teacher-") as work:
      return load_teacher(args.teacher, work, check=accept)
  return load_teacher(args.teacher, args.run_dir, check=accept)


def main(argv: list[str] | None = None) -> int:
  """Runs the command line; returns the exit status (1 on a ValueError / OSError)."""
  args = _parser().parse_args(argv)
  try:
    if not args.run_dir:  # an unset shell variable: not the working directory
      raise ValueError("--run-dir: expected a directory path, got ''")
    if args.command == "train":
      cfg = TrainConfig(resolution=args.resolution, channels=_channels(args.channels),
                        style_dim=args.style_dim, n_mlp=args.n_mlp,
                        batch_size=args.batch_size, steps=args.steps,
                        learning_rate=args.lr, seed=args.seed)
      # Refused before the teacher is converted into the run directory.
      if args.stop_after is not None and args.stop_after < 0:
        raise ValueError(f"--stop-after: expected a non-negative integer, got "
                         f"{args.stop_after}")
      if min(args.checkpoint_every, args.log_every) < 1:
        raise ValueError(f"--checkpoint-every, --log-every: expected positive integers, "
                         f"got {args.checkpoint_every}, {args.log_every}")
      run_dir = os.path.abspath(args.run_dir)
      runs.check_path(run_dir)
      # Held while the run is checked and its teacher converted into it (train takes it
      # again): a run another process trains is refused before anything is written.
      with runs.lock(run_dir):
        if not runs.resumable(run_dir):
          runs.check_fresh(run_dir)

        def accept(teacher):  # train's own refusals, before the teacher is written
          check_pair(cfg, teacher)
          if runs.resumable(run_dir):
            runs.check_resume(run_dir, runs.run_record(cfg, teacher))

        teacher = load_teacher(args.teacher, args.run_dir, check=accept)
      module = student_module(cfg)
      n_params = sum(x.size for x in jax.tree_util.tree_leaves(jax.eval_shape(
          module.init, jax.random.PRNGKey(0), jnp.zeros((1, cfg.style_dim)))["params"]))
      print(f"student: {cfg.resolution} px, channels {list(cfg.channels)}, style_dim "
            f"{cfg.style_dim}, {cfg.n_mlp} mapping layers, {n_params} parameters "
            f"({n_params * 4 / 1e6:.2f} MB float32)")
      try:
        train(cfg, teacher, args.run_dir, stop_after=args.stop_after,
              checkpoint_every=args.checkpoint_every, log_every=args.log_every)
      except KeyboardInterrupt:
        return 130
    elif args.command == "export":
      print(json.dumps(export(args.run_dir, args.out, args.step), indent=2))
    elif args.command == "evaluate":
      if args.out:
        check_out_path(args.run_dir, args.out)
      result = evaluate(args.run_dir, _run_teacher(args), args.images, step=args.step)
      text = json.dumps(result, indent=2)
      print(text)
      if args.out:
        from memedit import _io
        _io.atomic_write_bytes(args.out, text.encode())
    else:
      print(preview(args.run_dir, _run_teacher(args), args.out,
                    n=args.images, step=args.step, columns=args.columns))
  except (ValueError, OSError) as e:
    print(f"{_parser().prog} {args.command}: error: {' '.join(str(e).split())}",
          file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
