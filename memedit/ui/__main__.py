"""``python -m memedit.ui MODEL --layer L ...``: the same as ``memedit ui``."""

import argparse
import sys

from memedit.ui.command import add_subcommand


def main(argv=None) -> int:
  """Parses ``argv`` as the arguments of ``memedit ui`` and runs it; returns the exit code."""
  parser = argparse.ArgumentParser(prog="memedit")
  add_subcommand(parser.add_subparsers(dest="command", required=True))
  args = parser.parse_args(["ui", *(sys.argv[1:] if argv is None else argv)])
  try:
    return args.run(args)
  except (ValueError, OSError) as e:
    print(f"memedit ui: error: {' '.join(str(e).split())}", file=sys.stderr)
    return 1


if __name__ == "__main__":
  sys.exit(main())
