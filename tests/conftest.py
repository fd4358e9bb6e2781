"""Shared test set-up: makes tests/ importable (peers.py, helpers), sets matmul precision,
shares one compilation cache between a run's test processes, and offers ``--no-torch``.

Compilation cache. A test run (the controller and every pytest-xdist worker) shares one
persistent XLA compilation cache in a temporary folder made for the run and removed at
its end, so a program that several tests or both workers build is compiled once per run.
Nothing persists between runs. ``MEMEDIT_TEST_COMPILATION_CACHE=<folder>`` keeps the
cache in that folder instead (kept, e.g. between local runs); ``=off`` disables it.
Tests that count compilations count cache reads too (``compilations.py``).

Compilation speed. Most of a test run's time is XLA compiling small programs, and most of
that is LLVM optimising the generated machine code. Unless ``XLA_FLAGS`` already sets
``--xla_backend_optimization_level``, the run (and every worker and subprocess started
from it) compiles at level 0: XLA's own graph passes (fusion, layout, algebraic
simplification) run as always, only the backend's code optimisation is skipped, so the
programs compute the same operations, compile faster and run somewhat slower.
``MEMEDIT_TEST_XLA_OPT=default`` keeps XLA's default level.

``--no-torch`` runs the tests as in an environment without PyTorch: ``import torch`` fails
(``sys.modules["torch"] = None``) for the whole session, and the tests marked ``parity``
(they need torch, the network or peer wheels) are deselected. ``make test-core`` runs the
core tests this way. Nothing here imports torch; parity tests import it themselves.
"""

import os
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

#: Environment variable: "default" keeps XLA's backend optimisation level in test runs.
OPT_ENV = "MEMEDIT_TEST_XLA_OPT"
_flags = os.environ.get("XLA_FLAGS", "")
if (os.environ.get(OPT_ENV) != "default"
    and "--xla_backend_optimization_level" not in _flags):
  # Before JAX creates its backend, which reads XLA_FLAGS once (see the docstring).
  os.environ["XLA_FLAGS"] = (_flags + " --xla_backend_optimization_level=0").strip()

import jax

# Exactness checks compare float32 results at 1e-5: full-precision matmuls everywhere
# (a no-op on the CPU; on GPUs the default would be TF32).
jax.config.update("jax_default_matmul_precision", "highest")

#: The environment variable naming the run's compilation cache folder (or "off").
CACHE_ENV = "MEMEDIT_TEST_COMPILATION_CACHE"

#: Modules made unimportable by --no-torch.
BLOCKED = ("torch",)


def pytest_addoption(parser):
  parser.addoption("--no-torch", action="store_true", default=False,
                   help="make `import torch` fail and deselect the tests marked parity")


def _compilation_cache(config):
  """Points JAX at the run's cache folder; the controller (or a run without workers)
  makes it, and the workers, started later, inherit its path through the environment."""
  if os.environ.get(CACHE_ENV) == "off":
    return
  if CACHE_ENV not in os.environ and not hasattr(config, "workerinput"):
    os.environ[CACHE_ENV] = config._memedit_cache = tempfile.mkdtemp(prefix="memedit-xla-")
  if CACHE_ENV in os.environ:
    jax.config.update("jax_compilation_cache_dir", os.environ[CACHE_ENV])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    # No size limit: with one, JAX locks the folder for every read and write and, on each
    # write, sums the sizes of all entries (thousands in a full run), which serialises the
    # workers. Without it, a worker that reads an entry the other is still writing gets a
    # warning and compiles the program itself.


def pytest_unconfigure(config):
  made = getattr(config, "_memedit_cache", None)
  if made:
    shutil.rmtree(made, ignore_errors=True)


def pytest_configure(config):
  _compilation_cache(config)
  if config.getoption("--no-torch"):
    for name in BLOCKED:
      if name in sys.modules and sys.modules[name] is not None:
        raise RuntimeError(f"--no-torch: {name} was imported before the tests started")
      sys.modules[name] = None  # `import torch` now raises ImportError


def pytest_collection_modifyitems(config, items):
  if not config.getoption("--no-torch"):
    return
  keep, drop = [], []
  for item in items:
    (drop if item.get_closest_marker("parity") else keep).append(item)
  if drop:
    config.hook.pytest_deselected(items=drop)
    items[:] = keep
