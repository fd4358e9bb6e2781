"""The ``memedit`` command line.

Each subcommand is a pair of functions in :mod:`memedit.cli.commands`: one declares its
arguments, the other carries it out; :func:`build_parser` registers them all. Errors in the user's input (a bad file, a wrong format, a number out
of range, an output that cannot be written) print one line on stderr and give exit
status 1 (2 for arguments the parser itself refuses); warnings print one line too
(``memedit stats: warning: ...``, no source line); inputs and outputs are checked
before any long work starts.

Limits keep a mistyped number from running without bound; each option's help states
its range: latents for statistics (--samples) at most :data:`MAX_SAMPLES`, solver steps
at most :data:`memedit.specs.MAX_STEPS`, image numbers below
:data:`memedit.specs.MAX_IMAGES`, at most :data:`MAX_PAIRS` pairs in one PNG and
:data:`MAX_EVALUATED` held-out images (fewer above 256 px: the limit shrinks with the
square of the resolution).
"""

from __future__ import annotations

import argparse
import sys
import warnings

from memedit.cli.checks import (FORMATS, MAX_BATCH, MAX_COLUMNS, MAX_EVALUATED, MAX_PAIRS,
                                MAX_SAMPLES)
from memedit.cli.commands import SUBCOMMANDS

__all__ = ["FORMATS", "MAX_BATCH", "MAX_COLUMNS", "MAX_EVALUATED", "MAX_PAIRS", "MAX_SAMPLES",
           "build_parser", "main"]


class _Parser(argparse.ArgumentParser):
  """An argument parser whose errors are one line: ``memedit stats: error: ...``."""

  def error(self, message):
    self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
  """The ``memedit`` argument parser with every subcommand registered."""
  parser = _Parser(
      prog="memedit",
      description="Rewrite rules inside trained networks: layers as associative memories.")
  subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
  for add in SUBCOMMANDS:
    add(subparsers)
  return parser


def main(argv: list[str] | None = None) -> int:
  """Runs the command line with ``argv`` (``sys.argv[1:]`` when None); returns the exit code."""
  parser = build_parser()
  args = parser.parse_args(argv)

  def show(message, category, filename, lineno, file=None, line=None):
    print(f"memedit {args.command}: warning: {_one_line(message)}", file=sys.stderr)

  try:
    with warnings.catch_warnings():
      warnings.showwarning = show
      return args.run(args)
  except (ValueError, OSError) as e:
    print(f"memedit {args.command}: error: {_one_line(e)}", file=sys.stderr)
    return 1


def _one_line(error: Exception) -> str:
  """An error's message on one line; an OS error as ``file: reason``."""
  if isinstance(error, OSError) and error.strerror and error.filename is not None:
    text = f"{error.filename}: {error.strerror}"
    if error.filename2 is not None:
      text += f" (and {error.filename2})"
  else:
    text = str(error) or type(error).__name__
  return " ".join(text.split())

