"""The seconds each test file took in a measured run, for scheduling (``file_seconds.json``).

``make test`` runs the files in two processes, one file at a time each (pytest-xdist's
``loadfile``). Handed out longest first, the two processes end within about one short
file of each other; in pytest-xdist's own order (most tests first) a few long files of few
tests came last and one process waited for the other. ``conftest.py`` orders the files by
the seconds recorded here (a file not recorded counts as :data:`UNKNOWN` seconds).

Refresh after files were added or changed much::

    .venv/bin/python -m pytest -q -n 2 --dist loadfile tests --junitxml=report.xml
    .venv/bin/python tests/file_seconds.py report.xml
"""

import json
import os
import sys
import xml.etree.ElementTree as ET
from collections import Counter

#: The table, beside this file.
TABLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "file_seconds.json")
#: Seconds assumed for a file the table does not hold.
UNKNOWN = 10.0


def load() -> dict:
  """``{test file path relative to the repository: seconds}`` ({} without the table)."""
  try:
    with open(TABLE, encoding="utf-8") as f:
      return json.load(f)
  except FileNotFoundError:
    return {}


def from_junit(path: str) -> dict:
  """Seconds per test file in a pytest ``--junitxml`` report (setup, call and teardown)."""
  seconds = Counter()
  for case in ET.parse(path).iter("testcase"):
    module = case.get("classname", "").split(".")
    # classname is the module's dotted path, then any test class (capitalised)
    while module and module[-1][:1].isupper():
      module.pop()
    seconds["/".join(module) + ".py"] += float(case.get("time") or 0.0)
  return {k: round(v, 1) for k, v in sorted(seconds.items())}


if __name__ == "__main__":
  if len(sys.argv) != 2:
    sys.exit("usage: python tests/file_seconds.py JUNIT_XML")
  table = from_junit(sys.argv[1])
  tmp = TABLE + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(table, f, indent=0, sort_keys=True)
    f.write("\n")
  os.replace(tmp, TABLE)
  print(f"{TABLE}: {len(table)} files, {sum(table.values()):.0f} s")
