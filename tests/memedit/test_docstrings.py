"""Every public module's docstring examples run and print what they say; every name the
top level exports documents itself with an example; memedit and the core tests import
without PyTorch."""

from __future__ import annotations

import doctest
import importlib
import inspect
import os
import pkgutil
import subprocess
import sys
import textwrap

import pytest

import memedit

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The core tests: the library without PyTorch, the network or peer wheels.
CORE_TESTS = ["memedit/test_covariance.py", "memedit/test_directions.py",
              "memedit/test_solve.py", "memedit/test_edits.py", "memedit/test_io.py",
              "memedit/test_specs.py", "memedit/test_docstrings.py", "memedit/layers"]


def public_modules() -> list[str]:
  """memedit and every module below it whose dotted name has no part starting with '_'
  (found by walking the package, so new modules are included)."""
  names = ["memedit"]
  for info in pkgutil.walk_packages(memedit.__path__, "memedit."):
    if not any(part.startswith("_") for part in info.name.split(".")):
      names.append(info.name)
  return sorted(names)


def test_public_modules_are_found():
  names = public_modules()
  for expected in ("memedit.checks", "memedit.edits", "memedit.layouts", "memedit.linalg",
                   "memedit.solve", "memedit.specs", "memedit.tree", "memedit.layers"):
    assert expected in names
  assert not any(n.rsplit(".", 1)[-1].startswith("_") for n in names)


@pytest.mark.parametrize("name", public_modules())
def test_docstring_examples(name):
  module = importlib.import_module(name)
  result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS)
  assert result.failed == 0, f"{name}: {result.failed} of {result.attempted} examples failed"


def test_every_exported_name_has_a_docstring_with_an_example():
  missing = []
  for name in memedit.__all__:
    obj = getattr(memedit, name)
    doc = inspect.getdoc(obj) or ""
    if not (inspect.isfunction(obj) or inspect.isclass(obj)) or ">>> " not in doc:
      missing.append(name)
    elif inspect.isfunction(obj) and not all(part in doc for part in ("Args:", "Returns:")):
      missing.append(name)
  assert not missing, f"exported names without a docstring example (and, for functions, " \
                      f"Args and Returns): {missing}"


def test_all_lists_every_public_name_once():
  assert len(memedit.__all__) == len(set(memedit.__all__))
  assert all(hasattr(memedit, n) for n in memedit.__all__)
  for name in public_modules():
    module = importlib.import_module(name)
    assert hasattr(module, "__all__"), f"{name} has no __all__"
    assert all(hasattr(module, n) for n in module.__all__), name


def test_memedit_and_the_core_tests_import_without_torch():
  # `import torch` raises ImportError once sys.modules["torch"] is None.
  code = textwrap.dedent(f"""
      import importlib, importlib.util, os, pkgutil, sys
      sys.modules["torch"] = None
      tests = {TESTS!r}
      sys.path[:0] = [tests, os.path.join(tests, "memedit", "layers")]
      import memedit
      for info in pkgutil.walk_packages(memedit.__path__, "memedit."):
        importlib.import_module(info.name)
      files = []
      for entry in {CORE_TESTS!r}:
        path = os.path.join(tests, entry)
        if os.path.isdir(path):
          files += [os.path.join(path, f) for f in sorted(os.listdir(path))
                    if f.startswith("test_") and f.endswith(".py")]
        else:
          files.append(path)
      for i, path in enumerate(files):
        spec = importlib.util.spec_from_file_location(f"core_test_{{i}}", path)
        module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
      assert sys.modules["torch"] is None
      print("imported", len(files))
  """)
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  layers = os.path.join(TESTS, "memedit", "layers")
  n_files = len(CORE_TESTS) - 1 + sum(f.startswith("test_") and f.endswith(".py")
                                      for f in os.listdir(layers))
  assert proc.stdout.split() == ["imported", str(n_files)]
