"""The ``memedit log`` subcommand: an edit log's edits, their interference and growth.

:func:`add_subcommand` registers it on the ``memedit`` parser (``set_defaults(run=fn)``,
``fn(args) -> exit code``); errors in the input raise ``ValueError`` / ``OSError``, which
the ``memedit`` command prints on one line with exit status 1.
"""

from __future__ import annotations

import argparse
import json
import math
import os

from memedit.sequential.diagnostics import (RELATIVE_TO, format_log, growth,
                                            interference_matrix)
from memedit.sequential.logfile import load_log

__all__ = ["add_subcommand", "run_log"]

# The keys that make an existing file an earlier --json report, which --json may replace.
_REPORT_KEYS = ("log", "relative_to", "names", "positions", "interference")

_HELP = """\
Show an edit log (a .npz written by memedit.sequential.save_log): every edit with its
state (active or reverted), leaf, method, rank, number of keys and |dK|_F; the
interference matrix I[i, j], the change edit j makes at the keys of edit i, relative to
edit i's own change there (--relative-to edit) or to the values stored there
(--relative-to output, needs --model); with --model, the Frobenius norm and condition
number of each edited kernel after every edit, over the unedited kernel. Entries of I
above --threshold are marked with '!'.

--json FILE is written atomically and checked before any work: an existing FILE is
replaced only when it is an earlier `memedit log --json` report (a JSON object with
the keys log, relative_to, names, positions and interference) or empty; any other file
is refused, and so is LOG, --model or a path inside them. The report is standard JSON:
an entry of I that does not apply (edits of different leaves) is null, an infinite one
(an edit that wrote nothing at its own keys while another did) the string "inf"; the
same for the growth table's numbers.

example:
  memedit log edits.npz
  memedit log edits.npz --model faces-dcgan --relative-to output --json report.json
"""


def add_subcommand(subparsers) -> None:
  """Registers ``memedit log`` on an argparse subparsers object.

  Args:
    subparsers: the object ``ArgumentParser.add_subparsers()`` returned.

  Returns:
    None; the subcommand's ``run`` default is :func:`run_log`.

  Example:
    >>> import argparse
    >>> parser = argparse.ArgumentParser(prog="memedit")
    >>> add_subcommand(parser.add_subparsers(dest="command"))
    >>> args = parser.parse_args(["log", "edits.npz", "--threshold", "0.2"])
    >>> args.command, args.threshold, args.run.__name__
    ('log', 0.2, 'run_log')
  """
  p = subparsers.add_parser(
      "log", help="show an edit log: its edits, their interference and the layers' growth",
      description=_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("log", metavar="LOG", help="edit log file (.npz)")
  p.add_argument("--model", default=None,
                 help="converted checkpoint folder of the unedited model (for the growth "
                      "table and --relative-to output)")
  p.add_argument("--relative-to", choices=RELATIVE_TO, default="edit",
                 help="normalise I[i, j] by edit i's own change ('edit', default) or by the "
                      "values stored at its keys ('output')")
  p.add_argument("--threshold", type=float, default=0.1,
                 help="mark entries of I above this, a number >= 0 (default %(default)s)")
  p.add_argument("--json", default=None, metavar="FILE",
                 help="also write the interference matrix (and growth) as JSON to FILE "
                      "(atomically); an existing FILE is replaced only when it is an earlier "
                      "`memedit log --json` report (or empty), never LOG or --model")
  p.set_defaults(run=run_log)


def _json_number(x: float):
  """A float as standard JSON allows: finite as is, NaN as null, ±inf as "inf"/"-inf"."""
  if math.isnan(x):
    return None
  if math.isinf(x):
    return "inf" if x > 0 else "-inf"
  return float(x)


def run_log(args: argparse.Namespace) -> int:
  """Carries out ``memedit log`` (see :func:`add_subcommand`); prints the tables.

  Args:
    args: the parsed arguments (log, model, relative_to, threshold, json).

  Returns:
    0.

  Raises:
    ValueError: a threshold that is not a number >= 0, a file that is not an edit log,
      ``--relative-to output`` without ``--model``, a JSON output path that cannot be
      written, is LOG or --model (or lies inside it), or is an existing file other than
      an earlier report (all checked before any work).
    OSError: missing or unreadable files.

  Example:
    >>> import argparse, os, tempfile, jax.numpy as jnp, memedit
    >>> from memedit.sequential import log_append, log_init, save_log
    >>> e = memedit.make_edit(("k",), jnp.ones((2, 1)), jnp.array([[1.0, 0.0]]), label="a")
    >>> f = save_log(os.path.join(tempfile.mkdtemp(), "l.npz"),
    ...              log_append(log_init(), e, jnp.eye(2)[:1]))
    >>> run_log(argparse.Namespace(log=f, model=None, relative_to="edit", threshold=0.1,
    ...                            json=None))  # doctest: +ELLIPSIS
    edit log ...l.npz: 1 edits (1 active)
    ...
    0
  """
  if not math.isfinite(args.threshold) or args.threshold < 0:
    raise ValueError(f"--threshold: expected a number >= 0, got {args.threshold}")
  if args.relative_to == "output" and args.model is None:
    raise ValueError("--relative-to output: expected --model (the unedited model), got none")
  if args.json is not None:
    from memedit.cli.checks import check_output_file, is_json_report

    check_output_file(args.json, "--json", protect=(args.log, args.model),
                      what="an earlier `memedit log --json` report",
                      accept=lambda f: is_json_report(f, _REPORT_KEYS))
  if not os.path.exists(args.log):
    raise ValueError(f"LOG: expected an edit log file, got {args.log!r}, which does not exist")
  log = load_log(args.log)
  params = None
  if args.model is not None:
    if not os.path.isdir(args.model):
      raise ValueError(f"--model: expected a converted checkpoint folder, got {args.model!r}")
    import ports

    params = ports.load_converted(args.model)[1]
  # The tables first: an error (a log of another model's kernels) prints nothing.
  table = format_log(log, params=params, relative_to=args.relative_to,
                     max_interference=args.threshold)
  print(f"edit log {args.log}: {len(log)} edits ({len(log.active)} active)")
  print(table)
  if args.json is not None:
    from memedit import _io

    inter = interference_matrix(log, params=params, relative_to=args.relative_to)
    report = {"log": os.path.abspath(args.log), "relative_to": args.relative_to,
              "names": list(inter.names), "positions": list(inter.positions),
              "interference": [[_json_number(x) for x in row]
                               for row in inter.matrix.tolist()],
              "growth": ([{k: (list(v) if k == "path" else _json_number(v)
                               if isinstance(v, float) else v) for k, v in g.items()}
                          for g in growth(log, params)] if params is not None else None)}
    from memedit.cli.checks import writing

    with writing(args.json, "--json"):
      _io.atomic_write_bytes(args.json,
                            json.dumps(report, indent=2, allow_nan=False).encode())
    print(f"wrote {os.path.abspath(args.json)}")
  return 0
