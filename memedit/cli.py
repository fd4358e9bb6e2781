"""The ``memedit`` command line.

Each subcommand is a pair of functions: ``_add_<name>(subparsers)`` declares its
arguments and ``_run_<name>(args) -> int`` carries it out; :func:`build_parser` lists the
``_add_*`` functions. Errors in the user's input (a bad file, a wrong format) print one
line on stderr and give exit status 1.
"""

from __future__ import annotations

import argparse
import sys

FORMATS = ("auto", "rosinality", "nvidia", "dcgan")

_CONVERT_HELP = """\
Convert a PyTorch generator checkpoint into a Flax checkpoint directory (an orbax
checkpoint plus a JSON config with the architecture and the source file's sha256).

The source is read without importing torch and without running any code stored in
it: pickles may only name tensor, storage, dtype and container constructors.

formats:
  rosinality  StyleGAN2 .pt from rosinality/stylegan2-pytorch: a torch.save dict
              {'g_ema': state_dict, 'latent_avg': ...}
  nvidia      stylegan2-ada / stylegan3 network pickle (.pkl) holding 'G_ema'
  dcgan       PyTorch-tutorial DCGAN generator: {'netG_state_dict': ...} or the
              state dict itself (main.0.weight ... main.12.weight)
  auto        decide from the file's content (default)

The write is atomic: an interrupted conversion leaves OUT as it was.

example:
  memedit convert weights.tar faces-dcgan
  memedit convert network-snapshot.pkl ffhq-64 --format nvidia
"""


def _add_convert(subparsers) -> None:
  p = subparsers.add_parser(
      "convert", help="convert a PyTorch generator checkpoint to a Flax checkpoint",
      description=_CONVERT_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("src", metavar="SRC", help="PyTorch checkpoint file (.pt, .pth, .tar, .pkl)")
  p.add_argument("out", metavar="OUT", help="output directory (created or replaced atomically)")
  p.add_argument("--format", choices=FORMATS, default="auto",
                 help="source checkpoint format (default: %(default)s, detected from content)")
  p.set_defaults(run=_run_convert)


def _run_convert(args: argparse.Namespace) -> int:
  import ports

  fmt = args.format
  if fmt == "auto":
    fmt = ports.detect_format(args.src)
  if fmt == "dcgan":
    from ports.dcgan import convert_dcgan
    out = convert_dcgan(args.src, args.out)
  elif fmt == "rosinality":
    from ports.stylegan2 import convert_rosinality
    out = convert_rosinality(args.src, args.out)
  elif fmt == "nvidia":
    from ports.stylegan2 import convert_nvidia
    out = convert_nvidia(args.src, args.out)
  else:
    raise ValueError(f"--format: expected one of {FORMATS}, got {fmt!r}")
  config = ports.read_config(out)
  print(f"converted {args.src} ({fmt}) -> {out}: architecture {config.get('architecture')}, "
        f"resolution {config.get('resolution')}")
  return 0


_SUBCOMMANDS = (_add_convert,)


def build_parser() -> argparse.ArgumentParser:
  """The ``memedit`` argument parser with every subcommand registered."""
  parser = argparse.ArgumentParser(
      prog="memedit",
      description="Rewrite rules inside trained generators: layers as associative memories.")
  subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
  for add in _SUBCOMMANDS:
    add(subparsers)
  return parser


def main(argv: list[str] | None = None) -> int:
  """Runs the command line with ``argv`` (``sys.argv[1:]`` when None); returns the exit code."""
  parser = build_parser()
  args = parser.parse_args(argv)
  try:
    return args.run(args)
  except (ValueError, FileNotFoundError, IsADirectoryError) as e:
    print(f"memedit {args.command}: error: {e}", file=sys.stderr)
    return 1


if __name__ == "__main__":
  sys.exit(main())
