"""Shared test set-up: makes tests/ importable (peers.py, helpers), sets matmul precision,
and offers ``--no-torch``.

``--no-torch`` runs the tests as in an environment without PyTorch: ``import torch`` fails
(``sys.modules["torch"] = None``) for the whole session, and the tests marked ``parity``
(they need torch, the network or peer wheels) are deselected. ``make test-core`` runs the
core tests this way. Nothing here imports torch; parity tests import it themselves.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax

# Exactness checks compare float32 results at 1e-5: full-precision matmuls everywhere
# (a no-op on the CPU; on GPUs the default would be TF32).
jax.config.update("jax_default_matmul_precision", "highest")

#: Modules made unimportable by --no-torch.
BLOCKED = ("torch",)


def pytest_addoption(parser):
  parser.addoption("--no-torch", action="store_true", default=False,
                   help="make `import torch` fail and deselect the tests marked parity")


def pytest_configure(config):
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
