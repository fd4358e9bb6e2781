"""`memedit convert` on training checkpoints that hold one generator under two entries (the
same state dict saved twice, or two dicts of the same tensors), which is one generator, and
on two different generators, still refused; telling a safetensors file by its content."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

import ports
from memedit.cli import main
from ports.dcgan.convert import expected_shapes
from ports.gpt2 import hf_files


@pytest.fixture(scope="module")
def generator():
  """A random DCGAN generator state dict (z 4, ngf 2, 3 channels) as torch tensors."""
  torch.manual_seed(0)
  return {k: torch.rand(s) + 0.5 if k.endswith("running_var") else torch.randn(s)
          for k, s in expected_shapes(4, 2, 3).items()}


def _kernel(out) -> np.ndarray:
  _, variables, _ = ports.dcgan.load_dcgan(out)
  return np.asarray(next(v["kernel"] for v in variables["params"].values() if "kernel" in v))


@pytest.mark.parametrize("shape, entry", [
    (lambda sd: {"g": sd, "g2": sd, "epoch": 3}, "'g'"),
    (lambda sd: {"g": sd, "g2": dict(sd)}, "'g'"),
    (lambda sd: {"models": {"netG": sd}, "ema": {"module." + k: v for k, v in sd.items()}},
     "'models'['netG']"),
    (lambda sd: {"state_dict": {**{f"gen.{k}": v for k, v in sd.items()},
                                **{f"gen_ema.{k}": v for k, v in sd.items()}}},
     "'state_dict' (names under 'gen.')"),
])
def test_one_generator_saved_under_two_entries_converts(tmp_path, generator, capsys, shape,
                                                        entry):
  src = tmp_path / "ckpt.pt"
  torch.save(shape(generator), src)
  assert ports.detect_format(src) == "dcgan"
  out = tmp_path / "out"
  assert main(["convert", str(src), str(out)]) == 0
  assert f"generator weights from {entry}" in capsys.readouterr().out
  assert entry in ports.read_config(out)["source_entry"]
  alone = tmp_path / "alone.pt"
  torch.save(generator, alone)
  assert main(["convert", str(alone), str(tmp_path / "alone")]) == 0
  np.testing.assert_array_equal(_kernel(out), _kernel(tmp_path / "alone"))


def test_two_different_generators_are_still_refused(tmp_path, generator, capsys):
  other = {k: v + 1 for k, v in generator.items()}
  src = tmp_path / "two.pt"
  torch.save({"g": generator, "g_same": generator, "g2": other}, src)
  message = (re.escape(str(src)) + r": DCGAN checkpoint: expected one DCGAN generator state "
             r"dict, got 2: 'g', 'g2'; save the one to convert alone")
  with pytest.raises(ValueError, match=message):
    ports.detect_format(src)
  assert main(["convert", str(src), str(tmp_path / "out")]) == 1
  assert re.search(message, capsys.readouterr().err)
  assert not (tmp_path / "out").exists()


def test_safetensors_content_is_told_by_its_first_bytes(tmp_path):
  assert "looks_like_safetensors" in hf_files.__all__
  named_bin = tmp_path / "weights.bin"
  named_bin.write_bytes(len(b"{}").to_bytes(8, "little") + b"{}")
  torch.save({"a": torch.ones(2)}, tmp_path / "model.safetensors")
  short = tmp_path / "short"
  short.write_bytes((100).to_bytes(8, "little") + b"{}")  # a header longer than the file
  assert hf_files.looks_like_safetensors(named_bin)
  assert hf_files.looks_like_safetensors(str(named_bin))
  for path in (tmp_path / "model.safetensors", short, tmp_path, tmp_path / "missing"):
    assert not hf_files.looks_like_safetensors(path), path
