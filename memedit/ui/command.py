"""The ``memedit ui`` subcommand: :func:`add_subcommand` registers it on the command line's
subparsers (``set_defaults(run=run)``, ``run(args) -> exit code``)."""

from __future__ import annotations

import argparse
import math

__all__ = ["add_subcommand", "run"]

_HELP = """\
Open a converted generator in the browser and rewrite it interactively: paint masks on
generated images, Copy an object, Paste it on another image (with a live preview), add
context examples, show where the context matches (heat maps) or Search for the images
that match it best, Execute (the edit is solved as `memedit rewrite` solves the spec the
page saves), toggle original/edited, revert, erase, compare with the overfit baseline,
and save each edit as a spec JSON or an edit file.

The server listens on 127.0.0.1 (this machine only) unless --host says otherwise (on a
loopback address it answers only loopback Host names, against DNS rebinding); it
reads and writes files only in the statistics cache (--stats) and its work folder
(--work). Statistics are those of `memedit stats` with the same --samples and
--batch-size (read from the cache when there); other layers' statistics are collected
when the page selects them.

Needs the optional extra: pip install 'memedit[ui]'

example:
  memedit ui faces-dcgan --layer convt2 --stats .cache/stats --port 8000
"""


def add_subcommand(subparsers) -> None:
  """Registers ``memedit ui`` on ``subparsers`` (an argparse subparsers action)."""
  p = subparsers.add_parser("ui", help="rewrite a generator interactively in the browser",
                            description=_HELP,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("model", metavar="MODEL",
                 help="converted checkpoint directory (see `memedit convert`)")
  p.add_argument("--layer", required=True,
                 help="layer to start on, e.g. convt2 (DCGAN) or conv_6 (StyleGAN2)")
  p.add_argument("--truncation", type=float, default=None,
                 help="StyleGAN2 truncation psi, a finite number (default 1)")
  p.add_argument("--stats", default=".cache/stats",
                 help="statistics cache, as `memedit stats --cache-dir` (default: %(default)s)")
  p.add_argument("--samples", type=int, default=1000,
                 help="latents (images 0..N-1) whose keys make C, 1 to 100000 "
                 "(default: %(default)s)")
  p.add_argument("--batch-size", type=int, default=50,
                 help="latents per batch for statistics, 1 to 4096 (default: %(default)s)")
  p.add_argument("--host", default="127.0.0.1",
                 help="address to listen on (default: %(default)s, this machine only)")
  p.add_argument("--port", type=int, default=8000,
                 help="port, 0 to 65535; 0 picks a free one (default: %(default)s)")
  p.add_argument("--work", default=".cache/ui",
                 help="work folder for files the page downloads (default: %(default)s)")
  p.add_argument("--max-request-mb", type=int, default=16,
                 help="largest request body in MiB, 1 to 1024 (default: %(default)s)")
  p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
  """Starts the server for ``args`` and serves until interrupted; returns 0."""
  for flag, value, lo, hi in (("--samples", args.samples, 1, 100_000),
                              ("--batch-size", args.batch_size, 1, 4096),
                              ("--port", args.port, 0, 65535),
                              ("--max-request-mb", args.max_request_mb, 1, 1024)):
    if not lo <= value <= hi:
      raise ValueError(f"{flag}: expected an integer in [{lo}, {hi}], got {value}")
  if args.truncation is not None and not math.isfinite(args.truncation):
    raise ValueError(f"--truncation: expected a finite number, got {args.truncation}")
  try:
    import flask  # noqa: F401
  except ImportError:
    raise ValueError("memedit ui: expected Flask, which is not installed; install the "
                     "optional extra: pip install 'memedit[ui]'") from None
  from memedit.ui.server import create_app, is_loopback, serve
  from memedit.ui.workspace import Workspace

  ws = Workspace.open(args.model, truncation=args.truncation, stats_dir=args.stats,
                      samples=args.samples, batch_size=args.batch_size, work_dir=args.work)
  layer = ws.check_layer(args.layer)
  loopback = is_loopback(args.host)
  app = create_app(ws, layer=layer, loopback_only=loopback,
                   max_request_bytes=args.max_request_mb << 20)
  if not loopback:
    print(f"memedit ui: warning: listening on {args.host}; anyone who can reach it can use "
          "the page", flush=True)
  serve(app, args.host, args.port, announce=lambda url: print(
      f"memedit ui: {ws.name} ({ws.architecture}, {ws.resolution} px), layer {layer}; open "
      f"{url} (Ctrl-C stops)", flush=True))
  return 0
