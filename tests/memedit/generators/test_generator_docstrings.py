"""Every example in the workflow's docstrings runs and prints what it says, and every public
function of the workflow documents its arguments, its result and an example."""

from __future__ import annotations

import doctest
import importlib
import inspect

import pytest

MODULES = ["memedit.generators.generator", "memedit.generators.forward",
           "memedit.generators.context",
           "memedit.generators.paste", "memedit.generators.crop", "memedit.generators.edit",
           "memedit.generators.subspace", "memedit.generators.finetune",
           "memedit.generators.from_spec", "memedit.generators.query",
           "memedit.generators.images", "memedit.generators._checks", "memedit.specs",
           "memedit.metrics", "memedit.demo",
           "memedit.specs.masks", "memedit.specs.text", "ports.dcgan.editing",
           "ports.stylegan2.editing"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
  module = importlib.import_module(name)
  result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS)
  assert result.attempted > 0
  assert result.failed == 0


@pytest.mark.parametrize("name", ["memedit.generators", "memedit.specs", "memedit.metrics",
                                  "memedit.demo"])
def test_every_public_function_has_args_returns_and_an_example(name):
  module = importlib.import_module(name)
  missing = []
  for attr in module.__all__:
    obj = getattr(module, attr)
    if not inspect.isfunction(obj):
      continue
    doc = inspect.getdoc(obj) or ""
    if not all(part in doc for part in ("Args:", "Returns:", ">>> ")):
      missing.append(attr)
  assert not missing, f"public functions without Args, Returns and an example: {missing}"
