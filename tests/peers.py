"""Real PyTorch peer implementations, fetched from PyPI at test time (never committed).

Each peer is a published wheel downloaded with ``pip download --no-deps`` and unpacked
into a cache directory (``$MEMEDIT_PEER_CACHE`` or ``.cache/peers`` in the repository);
its modules are imported from the unpacked folder without running the package's own
``__init__`` (which would pull GUI and training dependencies).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tempfile
import types
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("MEMEDIT_PEER_CACHE", REPO / ".cache" / "peers"))


def unpacked_wheel(requirement: str) -> Path:
  """Downloads ``requirement`` (``name==version``) once and returns its unpacked folder.

  """
  target = CACHE / requirement.replace("==", "-")
  done = target / ".complete"
  if done.exists():
    return target
  CACHE.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", requirement, "-d", tmp],
        capture_output=True, text=True)
    if proc.returncode != 0:
      raise RuntimeError(f"pip download {requirement} failed:\n{proc.stderr[-2000:]}")
    wheels = list(Path(tmp).glob("*.whl"))
    if len(wheels) != 1:
      raise RuntimeError(f"expected one wheel for {requirement}, got {wheels}")
    unpack = Path(tmp) / "unpacked"
    with zipfile.ZipFile(wheels[0]) as zf:
      zf.extractall(unpack)
    (unpack / ".complete").write_text(requirement)
    if target.exists() and not done.exists():  # a stale, incomplete unpack
      import shutil
      shutil.rmtree(target, ignore_errors=True)
    try:
      os.replace(unpack, target)
    except OSError:
      # Another test process finished the same download first: keep its copy.
      if not done.exists():
        raise
  return target


def _import_file(name: str, path: Path) -> types.ModuleType:
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module
  spec.loader.exec_module(module)
  return module


def rosinality_model() -> types.ModuleType:
  """rosinality's StyleGAN2 ``model`` module as shipped in draggan==1.0.6."""
  name = "_peer_draggan106"
  if f"{name}.stylegan2.model" in sys.modules:
    return sys.modules[f"{name}.stylegan2.model"]
  root = unpacked_wheel("draggan==1.0.6") / "draggan"
  pkg = types.ModuleType(name)
  pkg.__path__ = [str(root)]
  sys.modules[name] = pkg
  sub = types.ModuleType(f"{name}.stylegan2")
  sub.__path__ = [str(root / "stylegan2")]
  sys.modules[f"{name}.stylegan2"] = sub
  import warnings
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    return importlib.import_module(f"{name}.stylegan2.model")


def nvidia_networks() -> types.ModuleType:
  """NVIDIA's ``training.networks`` (stylegan2-ada / stylegan3 layout) from draggan==1.1.6.

  Puts the vendored ``dnnlib``, ``torch_utils`` and ``training`` on ``sys.path`` as the
  NVIDIA code expects, so pickles written with it name ``torch_utils.persistence``.
  """
  root = unpacked_wheel("draggan==1.1.6") / "draggan" / "stylegan2"
  if str(root) not in sys.path:
    sys.path.insert(0, str(root))
  return importlib.import_module("training.networks")


def gan_face_generate() -> tuple[types.ModuleType, Path]:
  """The DCGAN face generator package gan-face-generate==1.1.1: (its models module, weights)."""
  root = unpacked_wheel("gan-face-generate==1.1.1") / "gan_face_generate"
  name = "_peer_gan_face_generate_models"
  module = sys.modules.get(name) or _import_file(name, root / "models.py")
  return module, root / "weights.tar"


def randomize_rosinality(g) -> None:
  """Gives a rosinality generator's noise strengths and biases non-zero values (it
  initialises them to 0), so that parity tests and benchmarks exercise them."""
  import torch

  with torch.no_grad():
    for name, p in g.named_parameters():
      if name.endswith("noise.weight"):
        p.copy_(0.3 * torch.randn_like(p))
      elif name.endswith("modulation.bias"):
        p.copy_(1.0 + 0.2 * torch.randn_like(p))
      elif name.startswith("style.") and name.endswith(".bias"):
        p.copy_(0.2 / 0.01 * torch.randn_like(p))  # applied times lr_mul 0.01
      elif name.endswith("bias"):
        p.copy_(0.2 * torch.randn_like(p))


def torch_one_thread():
  """A module fixture's body (``pytest.fixture(scope="module", autouse=True)(...)``): the
  torch peers run on one thread, their forward passes being small enough that a second
  thread (sharing the cores with XLA's) costs more CPU time than it saves."""
  import torch

  n = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(n)
