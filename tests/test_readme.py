"""The README's Python examples run as written and print what the text says."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_python_examples():
  assert len(BLOCKS) >= 2


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index):
  out = io.StringIO()
  namespace = {"__name__": f"readme_example_{index}"}
  with contextlib.redirect_stdout(out):
    exec(compile(BLOCKS[index], f"README.md[python block {index}]", "exec"), namespace)
  printed = out.getvalue()
  # Every printed error or loss the examples report is small.
  pattern = r"(?:residual at k\*:|->|rewritten keys:) (\S+)"
  numbers = [float(x) for x in re.findall(pattern, printed)]
  assert numbers, printed
  assert all(abs(x) < 1e-4 for x in numbers), printed
