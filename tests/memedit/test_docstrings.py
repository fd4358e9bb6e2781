"""Every public example in memedit's docstrings runs and prints what it says."""

import doctest
import importlib

import pytest

MODULES = ["memedit.covariance", "memedit.directions", "memedit.solve", "memedit.edits",
           "memedit.layers.memory", "memedit.layers.hooks", "memedit.layers.stats"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
  module = importlib.import_module(name)
  result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
  assert result.attempted > 0
  assert result.failed == 0


def test_every_public_function_has_an_example():
  import inspect

  import memedit

  missing = []
  for name in dir(memedit):
    obj = getattr(memedit, name)
    if name.startswith("_") or not inspect.isfunction(obj):
      continue
    doc = inspect.getdoc(obj) or ""
    if not all(part in doc for part in ("Args:", "Returns:", ">>> ")):
      missing.append(name)
  assert not missing, f"public functions without Args, Returns and an example: {missing}"
