"""ports.dcgan: the tutorial DCGAN in Flax against the real torch package and weights."""

from __future__ import annotations

import doctest
import json
import os
import pickle
import re
import shutil
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.test_util import check_grads

import peers
import ports
from memedit import _io
from memedit.cli import main
from ports.dcgan import DCGANGenerator, convert_dcgan, load_dcgan, variables_from_state_dict
from ports.dcgan import convert as dcgan_convert
from ports.dcgan import model as dcgan_model
from ports.torchfile import load_torch

WEIGHTS_SHA256 = "0c3b90b138cfc4e8a73310b9fd5ce2a8f1f3a542a037de277412307fcd28771f"

_forward = jax.jit(lambda variables, z: DCGANGenerator().apply(variables, z))


@pytest.fixture(scope="module")
def peer():
  models, weights = peers.gan_face_generate()
  return models, weights


@pytest.fixture(scope="module")
def latents():
  return np.random.RandomState(1).randn(16, 100).astype(np.float32)


@pytest.fixture(scope="module")
def converted(peer, tmp_path_factory):
  _, weights = peer
  return convert_dcgan(weights, tmp_path_factory.mktemp("dcgan") / "faces")


@pytest.fixture(scope="module")
def images(converted, latents):
  _, variables, _ = load_dcgan(converted)
  return np.asarray(_forward(variables, latents))


def test_matches_torch_generator(peer, images, latents):
  models, weights = peer
  G = models.Generator(ngpu=0, nc=3, nz=100, ngf=64)
  G.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True)["netG_state_dict"])
  G.eval()
  with torch.no_grad():
    ref = G(torch.from_numpy(latents)[:, :, None, None]).numpy().transpose(0, 2, 3, 1)
  assert images.shape == (16, 64, 64, 3)
  assert np.abs(images).max() <= 1.0
  assert np.abs(images - ref).max() <= 1e-4
  assert images.std() > 0.1  # real faces, not a constant image


def test_reload_is_bit_exact(peer, converted, images, latents):
  _, weights = peer
  module, variables, config = load_dcgan(converted)
  assert module == DCGANGenerator(z_dim=100, ngf=64, channels=3)
  direct, direct_config = variables_from_state_dict(load_torch(weights)["netG_state_dict"])
  jax.tree_util.tree_map(np.testing.assert_array_equal, direct, jax.device_get(variables))
  np.testing.assert_array_equal(np.asarray(_forward(direct, latents)), images)
  assert config["architecture"] == "dcgan" and config["resolution"] == 64
  assert config["z_dim"] == 100 and config["channels"] == [100, 512, 256, 128, 64, 3]
  assert config["source_sha256"] == WEIGHTS_SHA256 == _io.sha256_file(weights)
  assert {k: v for k, v in config.items() if not k.startswith("source")} == direct_config
  # The generic loader dispatches on the architecture.
  _, generic, generic_config = ports.load_converted(converted)
  jax.tree_util.tree_map(np.testing.assert_array_equal, generic, variables)
  assert generic_config == config


def test_load_converted_refuses_unknown_architecture(tmp_path):
  path = _io.save_tree(tmp_path / "vae", {"w": np.zeros(2, np.float32)}, {"architecture": "vae"})
  with pytest.raises(ValueError,
                     match="architecture: expected 'dcgan', 'stylegan2' or 'gpt2', got 'vae'"):
    ports.load_converted(path)
  with pytest.raises(ValueError, match="architecture: expected 'dcgan', got 'vae'"):
    load_dcgan(path)


def test_layers_are_standard_conv_transpose(converted):
  module, variables, _ = load_dcgan(converted)
  kernels = {name: v["kernel"].shape for name, v in variables["params"].items() if "kernel" in v}
  assert kernels == {"convt0": (4, 4, 100, 512), "convt1": (4, 4, 512, 256),
                     "convt2": (4, 4, 256, 128), "convt3": (4, 4, 128, 64),
                     "convt4": (4, 4, 64, 3)}
  found = []

  def spy(next_fun, args, kwargs, context):
    if context.method_name == "__call__" and isinstance(context.module, nn.ConvTranspose):
      found.append((context.module.name, args[0].shape[-1]))
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(spy):
    jax.eval_shape(module.apply, variables, jax.ShapeDtypeStruct((2, 100), np.float32))
  assert found == [("convt0", 100), ("convt1", 512), ("convt2", 256), ("convt3", 128),
                   ("convt4", 64)]


@pytest.mark.parametrize("stride,padding", [(1, 0), (2, 1)])
def test_kernel_flip_matches_torch_layer(stride, padding):
  rng = np.random.default_rng(stride)
  weight = rng.standard_normal((5, 3, 4, 4)).astype(np.float32)
  x = rng.standard_normal((2, 5, 3, 3)).astype(np.float32)
  layer = torch.nn.ConvTranspose2d(5, 3, 4, stride, padding, bias=False)
  with torch.no_grad():
    layer.weight.copy_(torch.from_numpy(weight))
    ref = layer(torch.from_numpy(x)).numpy().transpose(0, 2, 3, 1)
  kernel = dcgan_convert.torch_convt_to_flax(weight)
  np.testing.assert_array_equal(dcgan_convert.flax_kernel_to_torch(kernel), weight)
  pad = 3 - padding
  flax_layer = nn.ConvTranspose(3, (4, 4), strides=(stride, stride),
                                padding=((pad, pad), (pad, pad)), use_bias=False)
  out = flax_layer.apply({"params": {"kernel": kernel}}, x.transpose(0, 2, 3, 1))
  np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5)


def test_interrupted_conversion_leaves_nothing_behind(peer, converted, tmp_path, monkeypatch):
  _, weights = peer
  existing = tmp_path / "existing"
  shutil.copytree(converted, existing)
  before = _io.load_tree(existing)
  fresh = tmp_path / "fresh"

  def fail(*args, **kwargs):
    raise RuntimeError("disk full")

  monkeypatch.setattr(_io, "json", types.SimpleNamespace(dump=fail, load=json.load))
  for dst in (existing, fresh):
    with pytest.raises(RuntimeError, match="disk full"):
      convert_dcgan(weights, dst)
  monkeypatch.undo()
  assert not fresh.exists()
  assert sorted(os.listdir(tmp_path)) == ["existing"]  # no temporary leftovers
  after = _io.load_tree(existing)
  assert after[1] == before[1]
  jax.tree_util.tree_map(np.testing.assert_array_equal, after[0], before[0])


def _small_state_dict(peer_models, **changes):
  torch.manual_seed(0)
  sd = {k: v.clone() for k, v in peer_models.Generator(0, 3, 4, 2).state_dict().items()}
  for k, v in changes.items():
    if v is None:
      del sd[k]
    else:
      sd[k] = v
  return sd


def test_wrong_architecture_is_refused(peer, tmp_path):
  models, _ = peer
  cases = {
      "missing": ({"netG_state_dict": _small_state_dict(models, **{"main.7.bias": None})},
                  r"missing keys \['main.7.bias'\], unexpected keys \[\]"),
      "extra": ({"netG_state_dict": _small_state_dict(models, **{"main.13.weight": torch.ones(3)})},
                r"missing keys \[\], unexpected keys \['main.13.weight'\]"),
      "shape": ({"netG_state_dict": _small_state_dict(models, **{"main.6.weight":
                                                                 torch.ones(8, 5, 4, 4)})},
                r"main.6.weight: expected shape \(8, 4, 4, 4\).*got \(8, 5, 4, 4\)"),
      "stylegan": ({"g_ema": {"style.1.weight": torch.ones(4, 4)}, "latent_avg": torch.ones(4)},
                   r"expected 4-d tensors 'main.0.weight'.*found keys \['g_ema', 'latent_avg'\]"),
  }
  for name, (obj, message) in cases.items():
    src = tmp_path / f"{name}.pt"
    torch.save(obj, src)
    with pytest.raises(ValueError, match=message):
      convert_dcgan(src, tmp_path / f"out-{name}")
    assert not (tmp_path / f"out-{name}").exists()
  # A well-formed generator of other sizes converts, with its sizes in the config.
  src = tmp_path / "small.pth"
  torch.save(_small_state_dict(models), src, _use_new_zipfile_serialization=False)
  _, _, config = load_dcgan(convert_dcgan(src, tmp_path / "small"))
  assert (config["z_dim"], config["ngf"], config["channels"]) == (4, 2, [4, 16, 8, 4, 2, 3])


def test_damaged_checkpoints_give_clear_errors(peer, tmp_path, capsys):
  models, _ = peer
  cases = {
      "nan": ({"netG_state_dict": _small_state_dict(models)}, "main.3.weight", float("nan"),
              r"DCGAN checkpoint: main.3.weight: expected finite weights, got 1 NaN and 0 "
              r"infinite of 2048 values"),
      "inf": ({"netG_state_dict": _small_state_dict(models)}, "main.4.running_var",
              float("inf"), r"main.4.running_var: expected finite weights, got 0 NaN and 1 "
              r"infinite of 8 values"),
      "int key": ({"netG_state_dict": {**_small_state_dict(models), 5: torch.ones(1)}}, None,
                  None, r"DCGAN checkpoint: expected a state dict with str names, got the "
                  r"int key 5"),
  }
  for name, (obj, param, value, message) in cases.items():
    if param is not None:
      obj["netG_state_dict"][param].view(-1)[0] = value
    src = tmp_path / f"{name}.pt"
    torch.save(obj, src)
    with pytest.raises(ValueError, match=message):
      convert_dcgan(src, tmp_path / f"out-{name}")
    assert main(["convert", str(src), str(tmp_path / f"cli-{name}")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("memedit convert: error:") and err.count("\n") == 1
    assert not (tmp_path / f"out-{name}").exists() and not (tmp_path / f"cli-{name}").exists()
  # Keys of mixed types, or a g_ema that is no state dict, with every --format.
  mixed, bad = tmp_path / "mixed.pt", tmp_path / "g_ema.pt"
  torch.save({1: torch.ones(2), "a": torch.ones(2)}, mixed)
  torch.save({"g_ema": 5}, bad)
  expected = {
      (mixed, "dcgan"): r"expected 4-d tensors 'main.0.weight' and 'main.12.weight', found "
                        r"keys \['a', 1\]",
      (mixed, "rosinality"): r"rosinality checkpoint: expected a dict with 'g_ema', got "
                             r"\['a', 1\]",
      (mixed, "nvidia"): r"NVIDIA pickle: expected a dict with 'G_ema', got \['a', 1\]",
      (mixed, "auto"): r"cannot tell the checkpoint format: .* found keys \['1', 'a'\]",
      (bad, "rosinality"): r"rosinality checkpoint: 'g_ema': expected a state dict \(names to "
                           r"tensors\), got int 5",
      (bad, "auto"): r"'g_ema': expected a state dict",
  }
  for (src, fmt), message in expected.items():
    assert main(["convert", str(src), str(tmp_path / "x"), "--format", fmt]) == 1
    err = capsys.readouterr().err
    assert err.startswith("memedit convert: error:") and err.count("\n") == 1, err
    assert re.search(message, err), err
    assert not (tmp_path / "x").exists()


def test_cli_convert(peer, converted, tmp_path, capsys):
  _, weights = peer
  out = tmp_path / "cli-faces"
  assert main(["convert", str(weights), str(out)]) == 0
  assert "architecture dcgan" in capsys.readouterr().out
  got, meta = _io.load_tree(out)
  want, want_meta = _io.load_tree(converted)
  assert meta == want_meta
  jax.tree_util.tree_map(np.testing.assert_array_equal, got, want)
  assert ports.detect_format(weights) == "dcgan"

  other = tmp_path / "other.pt"
  torch.save({"g_ema": {"style.1.weight": torch.ones(2, 2)}}, other)
  assert main(["convert", str(other), str(tmp_path / "x"), "--format", "dcgan"]) == 1
  err = capsys.readouterr().err
  assert err.startswith("memedit convert: error:") and "main.0.weight" in err
  assert not (tmp_path / "x").exists()

  assert ports.detect_format(other) == "rosinality"
  net = peers.nvidia_networks()
  snapshot = tmp_path / "snapshot.pkl"
  with open(snapshot, "wb") as f:
    pickle.dump({"G_ema": net.MappingNetwork(z_dim=4, c_dim=0, w_dim=4, num_ws=2, num_layers=1)}, f)
  assert ports.detect_format(snapshot) == "nvidia"
  unknown = tmp_path / "unknown.pt"
  torch.save({"weights": torch.ones(2)}, unknown)
  with pytest.raises(ValueError, match=r"found keys \['weights'\]; pass --format"):
    ports.detect_format(unknown)

  with pytest.raises(SystemExit) as info:
    main(["convert", "--help"])
  assert info.value.code == 0
  text = capsys.readouterr().out
  for word in ("--format", "rosinality", "nvidia", "dcgan", "auto", "SRC", "OUT"):
    assert word in text


_OVERLAP_ADD_CASES = [  # kernel, strides, explicit padding, input H x W, bias
    ((4, 4), (2, 2), ((2, 2), (2, 2)), (5, 5), False),  # the DCGAN up-sampling layers
    ((4, 4), (1, 1), ((3, 3), (3, 3)), (1, 1), False),  # the DCGAN first layer
    ((4, 4), (2, 2), ((0, 0), (1, 3)), (3, 4), True),  # crop on one side, zero-extend
    ((6, 3), (3, 1), ((1, 5), (0, 0)), (2, 3), True),  # unequal axes
    ((4, 4), (2, 2), ((5, 5), (0, 1)), (2, 2), False),  # padding past the kernel
]


@pytest.mark.parametrize("kernel,strides,padding,size,bias", _OVERLAP_ADD_CASES)
def test_overlap_add_conv_transpose_matches_flax(kernel, strides, padding, size, bias):
  rng = np.random.default_rng(sum(size))
  x = rng.standard_normal((2,) + size + (3,)).astype(np.float32)
  kw = dict(features=5, kernel_size=kernel, strides=strides, padding=padding, use_bias=bias)
  variables = nn.ConvTranspose(**kw).init(jax.random.key(0), x)
  variables = jax.tree_util.tree_map(lambda v: v + 0.25, variables)  # a non-zero bias too
  ref = nn.ConvTranspose(**kw).apply(variables, x.astype(np.float64))
  layer = dcgan_model.OverlapAddConvTranspose(**kw)
  assert jax.tree_util.tree_map(np.shape, layer.init(jax.random.key(0), x)) == \
      jax.tree_util.tree_map(np.shape, variables)
  for out in (layer.apply(variables, x), jax.jit(layer.apply)(variables, x)):
    assert out.shape == ref.shape
    np.testing.assert_allclose(out, ref, atol=2e-6, rtol=0)
  np.testing.assert_allclose(layer.apply(variables, x[0]), ref[0], atol=2e-6, rtol=0)


def test_overlap_add_conv_transpose_gradients():
  layer = dcgan_model.OverlapAddConvTranspose(
      2, (4, 4), strides=(2, 2), padding=((2, 2), (1, 2)), use_bias=True)
  with jax.enable_x64(True):
    x = jnp.asarray(np.random.default_rng(0).standard_normal((1, 3, 2, 3)))
    variables = layer.init(jax.random.key(0), x)
    variables = jax.tree_util.tree_map(lambda v: v.astype(jnp.float64), variables)
    layer64 = layer.clone(param_dtype=jnp.float64)
    check_grads(lambda v, x: layer64.apply(v, x), (variables, x), order=1,
                modes=("fwd", "rev"))


@pytest.mark.parametrize("kwargs,message", [
    (dict(kernel_size=(3, 3), strides=(2, 2), padding=((1, 1), (1, 1))),
     r"kernel_size a multiple of strides, got \(3, 3\) and \(2, 2\)"),
    (dict(kernel_size=(4, 4), strides=(2, 2), padding="SAME"),
     r"explicit padding \(\(lo, hi\), \(lo, hi\)\), got 'SAME'"),
    (dict(kernel_size=(4, 4), padding=0, kernel_dilation=2), r"kernel_dilation 1, got \(2, 2\)"),
    (dict(kernel_size=(4, 4), padding=0, transpose_kernel=True),
     "transpose_kernel=False, got True"),
    (dict(kernel_size=(4, 4, 4), padding=0), r"2 values for kernel_size, got \(4, 4, 4\)"),
])
def test_overlap_add_conv_transpose_refuses_what_it_does_not_compute(kwargs, message):
  layer = dcgan_model.OverlapAddConvTranspose(2, **kwargs)
  with pytest.raises(ValueError, match="OverlapAddConvTranspose: expected .*" + message):
    layer.init(jax.random.key(0), jnp.ones((1, 4, 4, 3)))


def test_model_docstring_example_runs():
  result = doctest.testmod(dcgan_model, optionflags=doctest.NORMALIZE_WHITESPACE)
  assert result.attempted > 0 and result.failed == 0


def _tiny_torch_state_dict(dtype=torch.float32):
  """A random torch DCGAN state dict (z 4, ngf 1, 3 channels) with positive variances."""
  gen = torch.Generator().manual_seed(0)
  sd = {k: torch.rand(s, generator=gen).to(dtype) + 0.5
        for k, s in dcgan_convert.expected_shapes(4, 1, 3).items()}
  return {"netG_state_dict": sd}


def test_bfloat16_checkpoint_converts(tmp_path):
  # bfloat16 (numpy kind 'V' through ml_dtypes) used to be refused as "not numeric".
  torch.save(_tiny_torch_state_dict(torch.bfloat16), tmp_path / "bf16.pt")
  _, variables, config = load_dcgan(convert_dcgan(tmp_path / "bf16.pt", tmp_path / "out"))
  assert config["z_dim"] == 4
  assert np.asarray(variables["params"]["convt0"]["kernel"]).dtype == np.float32


def test_negative_running_variance_is_refused(tmp_path):
  ckpt = _tiny_torch_state_dict()
  ckpt["netG_state_dict"]["main.4.running_var"][1] = -2.0
  torch.save(ckpt, tmp_path / "negvar.pt")
  with pytest.raises(ValueError, match=r"DCGAN checkpoint: main.4.running_var: expected "
                     r"non-negative variances, got 1 negative of 4 values"):
    convert_dcgan(tmp_path / "negvar.pt", tmp_path / "out")
  assert not (tmp_path / "out").exists()


def test_complex_weights_are_refused_as_not_numeric(tmp_path):
  ckpt = _tiny_torch_state_dict()
  ckpt["netG_state_dict"]["main.1.bias"] = torch.ones(8, dtype=torch.complex64)
  torch.save(ckpt, tmp_path / "c.pt")
  with pytest.raises(ValueError, match=r"main.1.bias: expected a numeric tensor, got an "
                     r"array of complex64"):
    convert_dcgan(tmp_path / "c.pt", tmp_path / "out")
