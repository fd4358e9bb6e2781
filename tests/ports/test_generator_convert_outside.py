"""Generator converters (DCGAN, rosinality and NVIDIA StyleGAN2) on checkpoints saved the
ways users save them: training checkpoints holding the generator under another entry
(``{'model': sd, 'optimizer': ..., 'epoch': 3}``, ``{'generator': sd}``, ``{'g': sd, 'd':
...}``, a Lightning ``{'state_dict': {'generator.…': ...}}``), two generators (refused by
name), integer weights (refused), float16 / float64 weights, ``module.`` prefixes and
non-contiguous tensors; every refusal names the file. Images are checked against the
torch peers."""

from __future__ import annotations

import os
import pickle
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import peers
import ports
from memedit.cli import main
from ports import stylegan2 as sg2
from ports.dcgan import DCGANGenerator, convert_dcgan, load_dcgan
from ports.dcgan import convert as dcgan_convert
from ports.torchfile import load_torch

pytestmark = pytest.mark.parity

TOL = 1e-4


_torch_one_thread = pytest.fixture(scope="module", autouse=True)(peers.torch_one_thread)


# ----------------------------------------------------------------------------------------
# DCGAN.


@pytest.fixture(scope="module")
def dcgan_peer():
  """The torch DCGAN generator (z 4, ngf 2) with random batch-norm statistics, and a
  discriminator (ndf 2) of the same package."""
  models, _ = peers.gan_face_generate()
  torch.manual_seed(0)
  g = models.Generator(0, 3, 4, 2)
  with torch.no_grad():
    for m in g.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        m.running_mean.normal_(0.0, 0.3)
        m.running_var.uniform_(0.5, 1.5)
        m.weight.normal_(1.0, 0.2)
        m.bias.normal_(0.0, 0.2)
  return g.eval(), models.Discriminator(0, 3, 2)


def _dcgan_images(g, path, z):
  module, variables, _ = load_dcgan(path)
  assert isinstance(module, DCGANGenerator)
  got = np.asarray(jax.jit(module.apply)(variables, jnp.asarray(z)))
  with torch.no_grad():
    ref = g(torch.from_numpy(z)[:, :, None, None]).double().numpy().transpose(0, 2, 3, 1)
  return got, ref


def _kernels(path):
  _, variables, _ = load_dcgan(path)
  return {k: np.asarray(v["kernel"]) for k, v in variables["params"].items() if "kernel" in v}


def test_dcgan_training_checkpoints_convert_from_their_entry(tmp_path, dcgan_peer, capsys):
  g, d = dcgan_peer
  sd = g.state_dict()
  z = np.random.RandomState(0).randn(3, 4).astype(np.float32)
  adam = torch.optim.Adam(g.parameters())
  shapes = {
      "model": {"model": sd, "optimizer": adam.state_dict(), "epoch": 3},
      "generator": {"generator": sd, "discriminator": d.state_dict()},
      "nested": {"models": {"netG": {"module." + k: v for k, v in sd.items()}}},
      "lightning": {"state_dict": {**{f"generator.{k}": v for k, v in sd.items()},
                                   **{f"discriminator.{k}": v
                                      for k, v in d.state_dict().items()}},
                    "epoch": 1, "global_step": 10},
  }
  entries = {"model": "'model'", "generator": "'generator'",
             "nested": "'models'['netG']", "lightning": "names under 'generator.'"}
  want = None
  for name, obj in shapes.items():
    src = tmp_path / f"{name}.pt"
    torch.save(obj, src)
    assert ports.detect_format(src) == "dcgan"
    if want is None:  # the whole conversion, from the command line
      out = tmp_path / f"out-{name}"
      assert main(["convert", str(src), str(out)]) == 0
      assert entries[name] in capsys.readouterr().out
      assert entries[name] in ports.read_config(out)["source_entry"]
      images, ref = _dcgan_images(g, out, z)
      assert images.shape == (3, 64, 64, 3) and np.abs(images - ref).max() <= TOL
      want = _kernels(out)
      continue
    sd, entry = dcgan_convert.find_state_dict_entry(load_torch(src))
    assert entries[name] in entry
    variables, _ = dcgan_convert.variables_from_state_dict(sd)
    for k in want:
      np.testing.assert_array_equal(variables["params"][k]["kernel"], want[k],
                                    err_msg=f"{name}: {k}")


def test_dcgan_two_generators_are_refused_by_name(tmp_path, dcgan_peer, capsys):
  g, _ = dcgan_peer
  sd = g.state_dict()
  other = {k: v + 1 if v.is_floating_point() else v for k, v in sd.items()}
  for name, obj, found in [
      ("two", {"netG": sd, "netG_ema": other, "epoch": 2}, r"'netG', 'netG_ema'"),
      ("light", {"state_dict": {**{f"gen_a.{k}": v for k, v in sd.items()},
                                **{f"gen_b.{k}": v for k, v in other.items()}}},
       r"names under 'gen_a\.'.*names under 'gen_b\.'")]:
    src = tmp_path / f"{name}.pt"
    torch.save(obj, src)
    message = (re.escape(str(src)) + r": DCGAN checkpoint: expected one DCGAN generator state "
               r"dict, got 2: .*" + found + r".*save the one to convert alone")
    with pytest.raises(ValueError, match=message):
      convert_dcgan(src, tmp_path / "out")
    with pytest.raises(ValueError, match=message):
      ports.detect_format(src)
    assert main(["convert", str(src), str(tmp_path / "cli")]) == 1
    err = capsys.readouterr().err
    assert re.search(message, err) and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists() and not (tmp_path / "cli").exists()


def test_dcgan_integer_weights_are_refused_naming_file_key_and_dtype(tmp_path, dcgan_peer):
  g, _ = dcgan_peer
  sd = dict(g.state_dict())
  for dtype in (torch.int8, torch.int32, torch.bool):
    bad = dict(sd, **{"main.3.weight": sd["main.3.weight"].to(dtype)})
    src = tmp_path / f"q-{str(dtype)[6:]}.pt"
    torch.save({"netG_state_dict": bad}, src)
    with pytest.raises(ValueError, match=re.escape(str(src)) + r": DCGAN checkpoint: "
                       r"main\.3\.weight: expected floating-point weights, got "
                       + str(dtype)[6:].replace("bool", "bool")):
      convert_dcgan(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()
  with pytest.raises(ValueError, match=r"main\.1\.running_mean: expected floating-point "
                     r"weights, got int64"):
    dcgan_convert.check_state_dict(dict(sd, **{"main.1.running_mean":
                                               torch.zeros(16, dtype=torch.int64)}))
  # Every other refusal names the file too.
  for name, obj, message in [
      ("list", [sd], r"DCGAN checkpoint: expected a dict, got list"),
      ("missing", {"netG_state_dict": {k: v for k, v in sd.items() if k != "main.4.bias"}},
       r"DCGAN checkpoint: missing keys \['main\.4\.bias'\]"),
      ("shape", {"netG_state_dict": dict(sd, **{"main.4.bias": torch.zeros(3)})},
       r"DCGAN checkpoint: main\.4\.bias: expected shape \(8,\)")]:
    src = tmp_path / f"{name}.pt"
    torch.save(obj, src)
    with pytest.raises(ValueError, match=re.escape(str(src)) + ": " + message):
      convert_dcgan(src, tmp_path / "out")


def test_dcgan_other_float_dtypes_and_non_contiguous_tensors(tmp_path, dcgan_peer):
  g, _ = dcgan_peer
  sd = g.state_dict()
  z = np.random.RandomState(1).randn(2, 4).astype(np.float32)
  # Non-contiguous tensors (transposed views, as a hand-made state dict may hold) keep
  # their values: images match the torch generator.
  strided = {k: (v.permute(3, 2, 1, 0).contiguous().permute(3, 2, 1, 0) if v.ndim == 4
                 else v.flip(0).contiguous().flip(0) if v.ndim == 1 else v)
             for k, v in sd.items()}
  assert not strided["main.3.weight"].is_contiguous()
  torch.save({"netG_state_dict": {"_orig_mod." + k: v for k, v in strided.items()}},
             tmp_path / "strided.pt")
  out = convert_dcgan(tmp_path / "strided.pt", tmp_path / "o-strided")
  images, ref = _dcgan_images(g, out, z)
  assert np.abs(images - ref).max() <= TOL
  for dtype in (torch.float16, torch.bfloat16, torch.float64):
    cast = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    torch.save({"netG_state_dict": cast}, tmp_path / "cast.pt")
    variables, _ = dcgan_convert.variables_from_state_dict(
        dcgan_convert.find_state_dict(load_torch(tmp_path / "cast.pt")))
    w = cast["main.3.weight"].double().numpy()  # (C_in, C_out, 4, 4), float64 reference
    want = np.transpose(w[:, :, ::-1, ::-1], (2, 3, 0, 1)).astype(np.float32)
    np.testing.assert_array_equal(variables["params"]["convt1"]["kernel"], want)


# ----------------------------------------------------------------------------------------
# rosinality StyleGAN2.


@pytest.fixture(scope="module")
def ros():
  """A tiny rosinality generator (8 px, style_dim 16, two mapping layers) and a
  discriminator of the same size."""
  model = peers.rosinality_model()
  torch.manual_seed(5)
  g = model.Generator(8, 16, 2, channel_multiplier=1)
  peers.randomize_rosinality(g)
  return g.eval(), model.Discriminator(8, channel_multiplier=1)


def _flatten(tree, prefix=""):
  for k, v in tree.items():
    if isinstance(v, dict):
      yield from _flatten(v, f"{prefix}{k}/")
    else:
      yield f"{prefix}{k}", np.asarray(v)


def test_rosinality_training_checkpoints_convert_from_their_entry(tmp_path, ros, capsys):
  from ports.stylegan2.convert import find_rosinality_entry

  g, d = ros
  sd = g.state_dict()
  avg = torch.linspace(-1.0, 1.0, 16)
  z = np.random.RandomState(2).randn(2, 16).astype(np.float32)
  noise = [getattr(g.noises, f"noise_{i}") for i in range(g.num_layers)]
  with torch.no_grad():
    ref, _ = g([torch.from_numpy(z)], noise=noise)
  ref = ref.double().numpy().transpose(0, 2, 3, 1)
  shapes = {
      "state_dict": ({"state_dict": sd, "latent_avg": avg}, "'state_dict'"),
      "g_d": ({"g": sd, "d": d.state_dict(), "latent_avg": avg, "iter": 7}, "'g'"),
      "generator": ({"generator": {"module." + k: v for k, v in sd.items()},
                     "latent_avg": avg}, "'generator'"),
      "lightning": ({"state_dict": {**{f"generator.{k}": v for k, v in sd.items()},
                                    **{f"discriminator.{k}": v
                                       for k, v in d.state_dict().items()}},
                     "latent_avg": avg}, "names under 'generator.'"),
      "bare": (dict(sd), None),
  }
  want = None
  for name, (obj, entry) in shapes.items():
    if name == "bare":
      continue
    src = tmp_path / f"{name}.pt"
    torch.save(obj, src)
    assert ports.detect_format(src) == "rosinality"
    if want is None:  # the whole conversion, from the command line
      out = tmp_path / f"out-{name}"
      assert main(["convert", str(src), str(out)]) == 0
      assert entry in capsys.readouterr().out
      module, variables, config = sg2.load_stylegan2(out)
      assert entry in config["source"]["entry"] and config["latent_avg_source"] == "checkpoint"
      images = np.asarray(jax.jit(module.apply)(variables, jnp.asarray(z)))
      assert np.abs(images - ref).max() <= TOL
      want = dict(_flatten(variables))
      continue
    sd, found = find_rosinality_entry(load_torch(src))
    assert entry in found
    got = dict(_flatten(sg2.state_dict_to_params_rosinality(sd, avg)))
    assert got.keys() == want.keys()
    for k in want:
      np.testing.assert_array_equal(got[k], want[k], err_msg=f"{name}: {k}")
  # A bare state dict (no entries at all) is a rosinality generator as well.
  torch.save(shapes["bare"][0], tmp_path / "bare.pt")
  assert ports.detect_format(tmp_path / "bare.pt") == "rosinality"
  assert find_rosinality_entry(shapes["bare"][0])[1] is None


def test_rosinality_two_generators_are_refused_by_name(tmp_path, ros, capsys):
  g, _ = ros
  sd = g.state_dict()
  src = tmp_path / "two.pt"
  torch.save({"g": sd, "g_copy": {k: v.clone() for k, v in sd.items()}}, src)
  message = (re.escape(str(src)) + r": rosinality checkpoint: expected one rosinality "
             r"generator state dict, got 2: 'g', 'g_copy'; save the one to convert alone")
  with pytest.raises(ValueError, match=message):
    sg2.convert_rosinality(src, tmp_path / "out")
  assert main(["convert", str(src), str(tmp_path / "cli")]) == 1
  assert re.search(message, capsys.readouterr().err)
  assert not (tmp_path / "out").exists() and not (tmp_path / "cli").exists()
  # With 'g_ema' beside them, 'g_ema' is the generator, as in rosinality's own files.
  torch.save({"g": sd, "g_copy": sd, "g_ema": sd, "latent_avg": torch.zeros(16)}, src)
  assert sg2.convert_rosinality(src, tmp_path / "out")
  # Nothing that is a generator: the file and its keys are named.
  torch.save({"weights": {"a": torch.ones(2)}, "step": 3}, src)
  with pytest.raises(ValueError, match=re.escape(str(src)) + r": rosinality checkpoint: "
                     r"expected a dict with 'g_ema', got \['step', 'weights'\]"):
    sg2.convert_rosinality(src, tmp_path / "none")


def test_rosinality_integer_weights_refused_other_floats_convert(tmp_path, ros):
  g, _ = ros
  sd = g.state_dict()
  avg = torch.linspace(-1.0, 1.0, 16)
  src = tmp_path / "q.pt"
  torch.save({"g_ema": dict(sd, **{"convs.0.conv.weight":
                                   sd["convs.0.conv.weight"].to(torch.int8)}),
              "latent_avg": avg}, src)
  with pytest.raises(ValueError, match=re.escape(str(src)) + r": rosinality StyleGAN2 state "
                     r"dict: convs\.0\.conv\.weight: expected floating-point weights, got int8"):
    sg2.convert_rosinality(src, tmp_path / "out")
  torch.save({"g_ema": sd, "latent_avg": avg.to(torch.int32)}, src)
  with pytest.raises(ValueError, match=re.escape(str(src)) + r": latent_avg: expected a "
                     r"tensor of 16 values, got an array of int32"):
    sg2.convert_rosinality(src, tmp_path / "out")
  with pytest.raises(ValueError, match=r"^rosinality StyleGAN2 state dict: style\.1\.bias: "
                     r"expected floating-point weights, got torch\.int64"):
    sg2.state_dict_to_params_rosinality(dict(sd, **{"style.1.bias":
                                                     torch.zeros(16, dtype=torch.int64)}), avg)
  # A damaged shape names the file as well.
  torch.save({"g_ema": dict(sd, **{"style.1.weight": torch.ones(16)}), "latent_avg": avg}, src)
  with pytest.raises(ValueError, match=re.escape(str(src)) + r": rosinality StyleGAN2 state "
                     r"dict: style\.1\.weight: expected a 2-d tensor"):
    sg2.convert_rosinality(src, tmp_path / "out")
  assert not (tmp_path / "out").exists()
  # float16 and float64 convert to the float32 of their values.
  for dtype in (torch.float16, torch.float64):
    cast = {k: v.to(dtype) for k, v in sd.items()}
    torch.save({"g_ema": cast, "latent_avg": avg.to(dtype)}, src)
    _, variables, _ = sg2.load_stylegan2(sg2.convert_rosinality(src, tmp_path / f"o{dtype}"))
    want = cast["convs.1.conv.weight"].double().numpy()[0].transpose(2, 3, 1, 0)
    np.testing.assert_array_equal(
        variables["params"]["synthesis"]["conv_2"]["memory"]["kernel"],
        want.astype(np.float32))


# ----------------------------------------------------------------------------------------
# NVIDIA StyleGAN2.


def test_nvidia_refusals_name_the_file_and_integer_weights(tmp_path):
  nets = peers.nvidia_networks()
  torch.manual_seed(0)
  G = nets.Generator(z_dim=8, c_dim=0, w_dim=8, img_resolution=8, img_channels=3,
                     mapping_kwargs={"num_layers": 1},
                     synthesis_kwargs={"channel_base": 32, "channel_max": 8})
  src = tmp_path / "net.pkl"
  with open(src, "wb") as f:
    pickle.dump({"G": G}, f)
  with pytest.raises(ValueError, match=re.escape(str(src)) + r": NVIDIA pickle: expected a "
                     r"dict with 'G_ema', got \['G'\]"):
    sg2.convert_nvidia(src, tmp_path / "out")
  G_bad = nets.Generator(z_dim=8, c_dim=0, w_dim=8, img_resolution=8, img_channels=3,
                         mapping_kwargs={"num_layers": 1},
                         synthesis_kwargs={"channel_base": 32, "channel_max": 8,
                                           "architecture": "resnet"})
  with open(src, "wb") as f:
    pickle.dump({"G_ema": G_bad}, f)
  with pytest.raises(ValueError, match=re.escape(str(src)) + r": 'G_ema': NVIDIA StyleGAN2: "
                     r"expected architecture 'skip'"):
    sg2.convert_nvidia(src, tmp_path / "out")
  assert not (tmp_path / "out").exists()
  sd = {k: v.numpy() for k, v in G.state_dict().items()}
  config = sg2.infer_nvidia_config(sd)
  bad = dict(sd, **{"synthesis.b8.conv1.weight": sd["synthesis.b8.conv1.weight"]
                    .astype(np.int8)})
  with pytest.raises(ValueError, match=r"net\.pkl: NVIDIA StyleGAN2 state dict: "
                     r"synthesis\.b8\.conv1\.weight: expected floating-point weights, got int8"):
    sg2.state_dict_to_params_nvidia(bad, config, where="net.pkl")
  half = {k: v.astype(np.float16) for k, v in sd.items()}
  got = sg2.state_dict_to_params_nvidia(half, config)
  np.testing.assert_array_equal(got["params"]["mapping"]["fc_0"]["kernel"],
                                half["mapping.fc0.weight"].astype(np.float64).T
                                .astype(np.float32))
