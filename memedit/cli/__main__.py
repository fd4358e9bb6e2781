"""``python -m memedit.cli``: the ``memedit`` command line."""

import sys

from memedit.cli import main

if __name__ == "__main__":
  sys.exit(main())
