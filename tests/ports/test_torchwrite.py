"""ports.torchwrite and ports.stylegan2.export: torch-free rosinality checkpoints that real
torch and rosinality's own Generator load, and that convert back to the same parameters."""

from __future__ import annotations

import collections
import os
import zipfile

import jax
import ml_dtypes
import numpy as np
import pytest
import torch

import peers
from ports import torchfile
from ports.stylegan2 import convert, export
from ports.stylegan2 import model as sg2_model
from ports.torchwrite import ALIGNMENT, save_torch, torch_bytes

TOL = 1e-4


def _mixed_object():
  sd = collections.OrderedDict([
      ("a.weight", np.arange(12, dtype=np.float32).reshape(3, 4) / 7),
      ("scalar", np.float32(3.5)),
      ("empty", np.zeros((0, 2), np.float32)),
      ("ints", np.arange(-2, 3, dtype=np.int64)),
      ("mask", np.array([True, False])),
      ("half", np.array([1.5, -2.0], np.float16)),
      ("double", np.array([[1e-300, 2.0]], np.float64)),
      ("bytes", np.array([0, 255], np.uint8)),
      ("strided", np.arange(20, dtype=np.float32).reshape(4, 5)[:, ::2]),
  ])
  return {"g_ema": sd, "latent_avg": np.linspace(-1, 1, 5).astype(np.float32),
          "meta": [1, 2.5, "x", None, (1, 2, 3, 4), 70000, -5, 2 ** 40, True, {3: "k"}]}


def test_save_torch_loads_in_torch_and_torchfile(tmp_path):
  obj = _mixed_object()
  path = save_torch(tmp_path / "obj.pt", obj)
  for weights_only in (True, False):
    got = torch.load(path, weights_only=weights_only)
    assert isinstance(got["g_ema"], collections.OrderedDict)
    assert list(got["g_ema"]) == list(obj["g_ema"])
    for name, want in obj["g_ema"].items():
      t = got["g_ema"][name]
      assert t.dtype == getattr(torch, str(np.asarray(want).dtype))
      np.testing.assert_array_equal(t.numpy(), np.asarray(want), err_msg=name)
    np.testing.assert_array_equal(got["latent_avg"].numpy(), obj["latent_avg"])
    assert got["meta"] == obj["meta"]
  assert got["g_ema"]["scalar"].shape == ()
  # memedit's own reader reads it back too.
  back = torchfile.load_torch(path)
  for name, want in obj["g_ema"].items():
    np.testing.assert_array_equal(back["g_ema"][name], np.asarray(want), err_msg=name)
  assert back["meta"] == obj["meta"]
  # mmap loading needs aligned records: every record's data starts on a 64-byte boundary.
  with zipfile.ZipFile(path) as zf:
    infos = zf.infolist()
    names = [i.filename for i in infos]
    for info in infos:
      assert info.compress_type == zipfile.ZIP_STORED
      start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
      assert start % ALIGNMENT == 0, info.filename
    assert zf.read("archive/byteorder") == b"little" and zf.read("archive/version") == b"3\n"
  assert names[0] == "archive/data.pkl" and "archive/data/0" in names
  mapped = torch.load(path, weights_only=True, mmap=True)
  np.testing.assert_array_equal(mapped["g_ema"]["a.weight"].numpy(), obj["g_ema"]["a.weight"])


def test_save_torch_bfloat16_and_determinism(tmp_path):
  a = np.array([1.0, -0.5, 3.0], dtype=ml_dtypes.bfloat16)
  path = save_torch(tmp_path / "bf16.pt", {"x": a})
  t = torch.load(path, weights_only=True)["x"]
  assert t.dtype == torch.bfloat16
  np.testing.assert_array_equal(t.float().numpy(), a.astype(np.float32))
  assert torch_bytes(_mixed_object()) == torch_bytes(_mixed_object())


def test_save_torch_refuses_unsupported_values_and_is_atomic(tmp_path):
  path = tmp_path / "ckpt.pt"
  save_torch(path, {"w": np.ones(3, np.float32)})
  before = path.read_bytes()
  bad = {"g_ema": collections.OrderedDict([("ok", np.zeros(2, np.float32)),
                                           ("bad", np.array(["s"]))])}
  with pytest.raises(ValueError, match=r"g_ema\.bad: expected an array of one of"):
    save_torch(path, bad)
  with pytest.raises(ValueError, match=r"meta\[1\]: expected None, bool, int"):
    save_torch(path, {"meta": [1, object()]})
  with pytest.raises(ValueError, match="expected str or int keys"):
    save_torch(path, {(1, 2): 3})
  assert path.read_bytes() == before
  assert sorted(os.listdir(tmp_path)) == ["ckpt.pt"]  # no temporary file left behind


# ----------------------------------------------------------------------------------------
# rosinality export.


def _random_variables(module, seed):
  """Variables of ``module``'s shapes drawn like rosinality's initialisation, with biases,
  modulation biases and noise strengths moved off their initial constants."""
  shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0),
                          np.zeros((1, module.z_dim), np.float32))
  rs = np.random.RandomState(seed)

  def draw(path, leaf):
    name = "/".join(str(getattr(k, "key", k)) for k in path)
    n = rs.standard_normal(leaf.shape)
    if name.endswith("modulation/bias"):
      n = 1.0 + 0.2 * n
    elif name.startswith("params/mapping") and name.endswith("kernel"):
      n = n / module.lr_mlp                       # N(0, 1/lr_mul²), applied times lr_mul
    elif name.endswith(("bias", "noise_strength")):
      n = 0.2 * n
    return n.astype(np.float32)

  return jax.tree_util.tree_map_with_path(draw, shapes)


def _narrow_generator_class(rosinality, table):
  """rosinality's Generator building the widths of ``table`` instead of its fixed ones."""

  class Generator(rosinality.Generator):
    def __setattr__(self, name, value):
      if name == "channels":
        value = dict(table)
      super().__setattr__(name, value)

  return Generator


def _check_against_peer(tmp_path, module, variables, peer_class):
  path = export.save_rosinality(tmp_path / "g.pt", module, variables)
  ckpt = torch.load(path, weights_only=True)
  assert set(ckpt) == {"g_ema", "latent_avg"}
  g = peer_class(module.resolution, module.w_dim, module.n_mlp).eval()
  assert list(ckpt["g_ema"]) == list(g.state_dict())
  g.load_state_dict(ckpt["g_ema"], strict=True)
  latent_avg = ckpt["latent_avg"]
  np.testing.assert_array_equal(latent_avg.numpy(), variables["buffers"]["latent_avg"])

  z = sg2_model.sample_latents(3, module.z_dim, seed=4)
  noise = [getattr(g.noises, f"noise_{i}") for i in range(g.num_layers)]
  with torch.no_grad():
    ref, _ = g([torch.from_numpy(z)], truncation=0.7, truncation_latent=latent_avg,
               noise=noise)
  got = sg2_model.generate(module, variables, z, truncation=0.7, layout="NCHW")
  assert np.max(np.abs(ref.numpy() - np.asarray(got))) <= TOL
  # Fresh per-image noise, no truncation.
  torch.manual_seed(2)
  fresh = [torch.randn(3, 1, n.shape[-2], n.shape[-1]) for n in noise]
  with torch.no_grad():
    ref, _ = g([torch.from_numpy(z)], noise=fresh)
  got = sg2_model.generate(module, variables, z, noise=[n[:, 0].numpy() for n in fresh],
                           layout="NCHW")
  assert np.max(np.abs(ref.numpy() - np.asarray(got))) <= TOL

  # memedit's converter reads it back to exactly the parameters written.
  out = convert.convert_rosinality(path, tmp_path / "converted")
  module2, variables2, config = convert.load_stylegan2(out)
  assert module2 == module
  assert config["latent_avg_source"] == "checkpoint"
  flat, tree = jax.tree_util.tree_flatten(variables)
  flat2, tree2 = jax.tree_util.tree_flatten(variables2)
  assert tree == tree2
  for a, b in zip(flat, flat2):
    np.testing.assert_array_equal(np.asarray(a, np.float32), b)
  return path


def test_export_loads_in_rosinality_generator(tmp_path):
  rosinality = peers.rosinality_model()
  module = sg2_model.StyleGAN2Generator(8, sg2_model.rosinality_channels(8), z_dim=32, w_dim=32,
                               n_mlp=2)
  variables = _random_variables(module, 0)
  _check_against_peer(tmp_path, module, variables, rosinality.Generator)


def test_export_narrow_widths(tmp_path):
  rosinality = peers.rosinality_model()
  module = sg2_model.StyleGAN2Generator(16, (32, 24, 8), z_dim=20, w_dim=20, n_mlp=3)
  variables = _random_variables(module, 1)
  table = export.rosinality_channel_table(module)
  assert table == {4: 32, 8: 24, 16: 8}
  path = _check_against_peer(tmp_path, module, variables,
                             _narrow_generator_class(rosinality, table))
  # The stored names are rosinality's: its stock table refuses these widths by shape.
  stock = rosinality.Generator(16, 20, 3)
  with pytest.raises(RuntimeError, match="size mismatch"):
    stock.load_state_dict(torch.load(path, weights_only=True)["g_ema"])


def test_export_refuses_what_rosinality_cannot_express(tmp_path):
  base = sg2_model.StyleGAN2Generator(8, (16, 8), z_dim=12, w_dim=12, n_mlp=1)
  variables = _random_variables(base, 2)
  for module, match in [(base.clone(conv_clamp=256.0), "conv_clamp None"),
                        (base.clone(z_dim=10), "z_dim == w_dim"),
                        (base.clone(use_noise=False), "use_noise True")]:
    with pytest.raises(ValueError, match=match):
      export.save_rosinality(tmp_path / "x.pt", module, variables)
  broken = jax.tree_util.tree_map(np.copy, variables)
  broken["params"]["synthesis"]["conv_1"]["bias"][0] = np.nan
  with pytest.raises(ValueError, match="conv_1/bias: expected finite weights"):
    export.save_rosinality(tmp_path / "x.pt", base, broken)
  broken["params"]["synthesis"]["conv_1"]["bias"][0] = 0.0
  del broken["params"]["synthesis"]["torgb_1"]
  with pytest.raises(ValueError, match="missing at params/synthesis/torgb_1"):
    export.save_rosinality(tmp_path / "x.pt", base, broken)
  with pytest.raises(ValueError, match=r"latent_avg: expected 12 values"):
    export.save_rosinality(tmp_path / "x.pt", base, variables, latent_avg=np.zeros(3))
  assert not os.path.exists(tmp_path / "x.pt")
