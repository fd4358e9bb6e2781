"""Converters on checkpoints saved the ways users save them, checked against the torch
peers: rosinality training checkpoints (optimizer state and the script's ``argparse``
arguments beside the weights, read as data only), state dicts of wrapped models
(``DataParallel``, ``torch.compile``), state dicts of torch tensors of any float dtype,
numpy arrays in pickle protocol 5, TensorFlow pickles and GPT-2 weights named for what
they are, and the rosinality export of a generator whose mapping runs at another
learning-rate multiplier."""

from __future__ import annotations

import argparse
import pickle
import pickletools

import numpy as np
import pytest
import torch
import transformers

import peers
from ports import gpt2, torchfile
from ports import stylegan2 as sg2
from ports.torchfile import CorruptFileError, UnsafeFileError

pytestmark = pytest.mark.parity

TOL = 1e-4


_torch_one_thread = pytest.fixture(scope="module", autouse=True)(peers.torch_one_thread)


@pytest.fixture(scope="module")
def ros8():
  """A tiny rosinality generator (8 px, style_dim 16, one mapping layer) after one Adam
  step, with its optimizer."""
  model = peers.rosinality_model()
  torch.manual_seed(3)
  g = model.Generator(8, 16, 1, channel_multiplier=1)
  peers.randomize_rosinality(g)
  opt = torch.optim.Adam(g.parameters(), lr=1e-3)
  img, _ = g([torch.randn(2, 16)])
  img.square().mean().backward()
  opt.step()
  g.zero_grad()
  return g.eval(), opt


def _ros_reference(g, z):
  noise = [getattr(g.noises, f"noise_{i}") for i in range(g.num_layers)]
  with torch.no_grad():
    ref, _ = g([torch.from_numpy(z)], noise=noise)
  return ref.numpy()


def _max_diff(ref, got) -> float:
  got = np.asarray(got, np.float64)
  assert got.shape == ref.shape and np.all(np.isfinite(got))
  return float(np.max(np.abs(np.asarray(ref, np.float64) - got)))


def test_rosinality_training_checkpoint_converts(tmp_path, ros8):
  """rosinality's train.py saves g, d, g_ema, both optimizers and its argparse args."""
  g, opt = ros8
  args = argparse.Namespace(size=8, latent=16, n_mlp=1, channel_multiplier=1, lr=0.002,
                            path="lmdb", augment=False)
  src = tmp_path / "010000.pt"
  torch.save({"g": g.state_dict(), "d": {}, "g_ema": g.state_dict(),
              "g_optim": opt.state_dict(), "d_optim": opt.state_dict(), "args": args,
              "ada_aug_p": 0.0}, src)
  # The arguments come back as a plain dict of their values.
  assert torchfile.load_torch(src)["args"] == vars(args)
  out = sg2.convert_rosinality(src, tmp_path / "converted")
  module, variables, config = sg2.load_stylegan2(out)
  assert (config["resolution"], config["style_dim"], config["n_mlp"]) == (8, 16, 1)
  assert config["latent_avg_source"].startswith("mean of 4096")
  z = sg2.sample_latents(2, 16, seed=4)
  got = sg2.generate(module, variables, z, layout="NCHW")
  assert _max_diff(_ros_reference(g, z), got) <= TOL


def _namespace_pickle(body: bytes) -> bytes:
  return b"\x80\x02cargparse\nNamespace\n" + body + b"."


@pytest.mark.parametrize("body,error,phrase", [
    # NEWOBJ, then BUILD with (None, slot state): attributes set on the reader's object.
    (b")\x81" + pickletools.optimize(pickle.dumps((None, {"x": 1}), protocol=2))[2:-1]
     + b"b", CorruptFileError, "expected the attributes of an argparse.Namespace"),
    # NEWOBJ, then BUILD with a dict of non-str names.
    (b")\x81}K\x01K\x02sb", CorruptFileError, "dict of str names"),
    # Built from arguments (REDUCE), which would hash them unchecked.
    (b"}K\x01K\x02s\x85R", UnsafeFileError, "built from arguments"),
    # BUILD on the class itself: patching the reader's class.
    (pickletools.optimize(pickle.dumps((None, {"__init__": 1}), protocol=2))[2:-1] + b"b",
     CorruptFileError, "cannot read"),
], ids=["slot-state", "non-str-names", "from-arguments", "build-on-class"])
def test_namespace_is_read_as_data_only(tmp_path, body, error, phrase):
  path = tmp_path / "args.pkl"
  path.write_bytes(_namespace_pickle(body))
  with pytest.raises(error, match=phrase) as info:
    torchfile.load_any(path)
  assert str(path) in str(info.value)
  # The reader's own class is unchanged: a good Namespace still reads as its values.
  good = tmp_path / "good.pt"
  torch.save({"args": argparse.Namespace(a=1, b="x")}, good)
  assert torchfile.load_torch(good) == {"args": {"a": 1, "b": "x"}}


# DataParallel / DistributedDataParallel, torch.compile, and both nested either way.
WRAPPERS = ["module.", "_orig_mod.", "module._orig_mod.", "_orig_mod.module."]


def test_wrapper_prefixes_rosinality(tmp_path, ros8):
  g, _ = ros8
  sd = g.state_dict()
  latent_avg = torch.linspace(-1.0, 1.0, 16)
  plain = tmp_path / "plain.pt"
  torch.save({"g_ema": sd, "latent_avg": latent_avg}, plain)
  _, want, _ = sg2.load_stylegan2(sg2.convert_rosinality(plain, tmp_path / "plain-out"))
  for i, prefix in enumerate(WRAPPERS):
    wrapped = tmp_path / f"wrapped{i}.pt"
    torch.save({"g_ema": {prefix + k: v for k, v in sd.items()}, "latent_avg": latent_avg},
               wrapped)
    _, got, config = sg2.load_stylegan2(sg2.convert_rosinality(wrapped, tmp_path / f"out{i}"))
    assert config["style_dim"] == 16
    _assert_trees_equal(got, want)
  # The state-dict API takes the prefixed names as well.
  numpy_sd = {f"module.{k}": v.numpy() for k, v in sd.items()}
  assert sg2.infer_rosinality_config(numpy_sd)["channels"] == config["channels"]


def test_wrapper_prefixes_dcgan(tmp_path):
  import ports
  from ports.dcgan import convert as dcgan_convert

  torch.manual_seed(4)
  sd = _dcgan_state_dict()
  want, want_config = dcgan_convert.variables_from_state_dict(
      {k: v.numpy() for k, v in sd.items()})
  for i, prefix in enumerate(WRAPPERS):
    path = tmp_path / f"netG{i}.pth"
    torch.save({"netG_state_dict": {prefix + k: v for k, v in sd.items()}, "epoch": 3}, path)
    assert ports.detect_format(path) == "dcgan"
    _, got, config = ports.load_converted(dcgan_convert.convert_dcgan(path, tmp_path / f"o{i}"))
    assert config["channels"] == want_config["channels"]
    _assert_trees_equal(got, want)


def _flatten(tree, prefix=""):
  for k, v in tree.items():
    if isinstance(v, dict):
      yield from _flatten(v, f"{prefix}{k}/")
    else:
      yield f"{prefix}{k}", np.asarray(v)


def test_wrapper_prefixes_gpt2(tmp_path):
  cfg = transformers.GPT2Config(n_layer=1, n_embd=12, n_head=3, vocab_size=29, n_positions=8,
                                bos_token_id=0, eos_token_id=0)
  torch.manual_seed(0)
  model = transformers.GPT2LMHeadModel(cfg).eval()
  folder = tmp_path / "hf"
  folder.mkdir()
  cfg.to_json_file(str(folder / "config.json"))
  ids = np.random.RandomState(1).randint(0, 29, (2, 8))
  with torch.no_grad():
    ref = model(torch.from_numpy(ids)).logits.numpy()
  for i, prefix in enumerate(WRAPPERS):
    torch.save({prefix + k: v for k, v in model.state_dict().items()},
               folder / "pytorch_model.bin")
    out = gpt2.convert_gpt2(folder, tmp_path / f"flax{i}")
    module, variables, _ = gpt2.load_gpt2(out)
    if i == 0:
      assert _max_diff(ref, module.apply(variables, ids)) <= TOL
      want = variables
    else:
      _assert_trees_equal(variables, want)


def test_tensorflow_stylegan_pickle_is_named(tmp_path, monkeypatch):
  """NVIDIA's original TensorFlow pickles ((G, D, Gs) of dnnlib.tflib Networks) are
  refused with what they are and how to get a PyTorch file from them."""
  import sys
  import types

  for name in ("dnnlib", "dnnlib.tflib", "dnnlib.tflib.network"):
    monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
  network = type("Network", (), {"__module__": "dnnlib.tflib.network",
                                  "__getstate__": lambda self: {"version": 4, "name": "G"}})
  sys.modules["dnnlib.tflib.network"].Network = network
  path = tmp_path / "stylegan2-ffhq-config-f.pkl"
  with open(path, "wb") as f:
    pickle.dump((network(), network(), network()), f, protocol=3)
  for load in (torchfile.load_any, lambda p: sg2.convert_nvidia(p, tmp_path / "out")):
    with pytest.raises(UnsafeFileError, match="TensorFlow StyleGAN network pickle") as info:
      load(path)
    assert str(path) in str(info.value) and "dnnlib.tflib.network.Network" in str(info.value)
  assert not (tmp_path / "out").exists()


def test_export_keeps_the_mapping_of_another_lr_mlp(tmp_path):
  """A generator whose mapping runs at lr_mlp 0.1 (NVIDIA's lr_multiplier option) exports
  to a rosinality checkpoint that rosinality's Generator (lr_mlp 0.01) and the converter
  read as the same generator."""
  import jax

  from ports.stylegan2 import model as sg2_model

  module = sg2_model.StyleGAN2Generator(8, (16, 8), z_dim=12, w_dim=12, n_mlp=2, lr_mlp=0.1)
  shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), np.zeros((1, 12), np.float32))
  rs = np.random.RandomState(5)
  variables = jax.tree_util.tree_map(
      lambda leaf: (0.5 * rs.standard_normal(leaf.shape)).astype(np.float32), shapes)
  variables["params"]["mapping"]["fc_0"]["kernel"] *= 10.0  # N(0, 1/lr_mul²)-like
  z = sg2.sample_latents(2, 12, seed=6)
  want = np.asarray(sg2.generate(module, variables, z, layout="NCHW"))

  path = sg2.save_rosinality(tmp_path / "g.pt", module, variables)
  rosinality = peers.rosinality_model()

  class Narrow(rosinality.Generator):  # rosinality's class with this generator's widths
    def __setattr__(self, name, value):
      super().__setattr__(name, {4: 16, 8: 8} if name == "channels" else value)

  g = Narrow(8, 12, 2).eval()  # lr_mlp 0.01, rosinality's default
  g.load_state_dict(torch.load(path, weights_only=True)["g_ema"], strict=True)
  noise = [getattr(g.noises, f"noise_{i}") for i in range(g.num_layers)]
  with torch.no_grad():
    ref, _ = g([torch.from_numpy(z)], noise=noise)
  assert _max_diff(ref.numpy(), want) <= TOL
  back, back_vars, _ = sg2.load_stylegan2(sg2.convert_rosinality(path, tmp_path / "back"))
  assert back.lr_mlp == 0.01
  assert _max_diff(want, sg2.generate(back, back_vars, z, layout="NCHW")) <= TOL


def _dcgan_state_dict() -> dict:
  """A DCGAN generator's state dict (z_dim 6, ngf 2, 3 channels) of random tensors."""
  sd = {"main.0.weight": torch.randn(6, 16, 4, 4), "main.12.weight": torch.randn(2, 3, 4, 4)}
  for idx, c_in, c_out in zip((3, 6, 9), (16, 8, 4), (8, 4, 2)):
    sd[f"main.{idx}.weight"] = torch.randn(c_in, c_out, 4, 4)
  for idx, c in zip((1, 4, 7, 10), (16, 8, 4, 2)):
    sd |= {f"main.{idx}.weight": torch.randn(c), f"main.{idx}.bias": torch.randn(c),
           f"main.{idx}.running_mean": torch.randn(c), f"main.{idx}.running_var": torch.rand(c),
           f"main.{idx}.num_batches_tracked": torch.tensor(7)}
  return sd


def _assert_trees_equal(got, want):
  flat_got, flat_want = dict(_flatten(got)), dict(_flatten(want))
  assert flat_got.keys() == flat_want.keys()
  for k, v in flat_want.items():
    np.testing.assert_array_equal(flat_got[k], v, err_msg=k)


def test_state_dicts_of_torch_tensors_any_float_dtype(ros8):
  """The state-dict functions take a model's state_dict() as it is: torch tensors, also
  bfloat16 ones (which numpy has no dtype for), give what their numpy arrays give."""
  from ports.dcgan import convert as dcgan_convert

  import ml_dtypes

  def as_numpy_bf16(t):  # the same values as ml_dtypes arrays (how files are read)
    return t.float().numpy().astype(ml_dtypes.bfloat16) if t.is_floating_point() else t.numpy()

  g, _ = ros8
  sd = {k: v.bfloat16() for k, v in g.state_dict().items()}
  avg = torch.linspace(-1.0, 1.0, 16).bfloat16()
  _assert_trees_equal(sg2.state_dict_to_params_rosinality(sd, avg),
                      sg2.state_dict_to_params_rosinality(
                          {k: as_numpy_bf16(v) for k, v in sd.items()}, as_numpy_bf16(avg)))

  cfg = transformers.GPT2Config(n_layer=1, n_embd=12, n_head=3, vocab_size=29, n_positions=8,
                                bos_token_id=0, eos_token_id=0)
  torch.manual_seed(1)
  lm = transformers.GPT2LMHeadModel(cfg).bfloat16()
  ours = gpt2.GPT2Config(vocab_size=29, n_positions=8, n_embd=12, n_layer=1, n_head=3)
  _assert_trees_equal(gpt2.state_dict_to_params(lm.state_dict(), ours),
                      gpt2.state_dict_to_params(
                          {k: as_numpy_bf16(v) for k, v in lm.state_dict().items()}, ours))

  torch.manual_seed(2)
  dc = _dcgan_state_dict()
  for cast in (lambda t: t, lambda t: t.bfloat16() if t.is_floating_point() else t):
    tensors = {k: cast(v) for k, v in dc.items()}
    got, config = dcgan_convert.variables_from_state_dict(tensors)
    want, _ = dcgan_convert.variables_from_state_dict(
        {k: as_numpy_bf16(v) if v.dtype == torch.bfloat16 else v.numpy()
         for k, v in tensors.items()})
    assert (config["z_dim"], config["ngf"], config["image_channels"]) == (6, 2, 3)
    _assert_trees_equal(got, want)
  with pytest.raises(ValueError, match=r"main\.0\.weight of shape \(6, 16\), main\.12\.weight "
                                       "missing"):
    dcgan_convert.check_state_dict({"main.0.weight": torch.zeros(6, 16)})
  with pytest.raises(ValueError, match="expected a state dict .* got list"):
    dcgan_convert.check_state_dict([dc])


@pytest.mark.parametrize("container", ["zip", "legacy", "pickle"])
def test_numpy_arrays_of_pickle_protocol_5_read(tmp_path, container):
  """Protocol 5 (Python 3.14's default for pickle.dump) pickles numpy arrays through
  numpy's _frombuffer; they read as the arrays saved, tensors beside them too."""
  arrays = {"f64": np.linspace(-1.0, 1.0, 5), "i32": np.arange(6, dtype=np.int32).reshape(2, 3),
            "fortran": np.asfortranarray(np.arange(12, dtype=np.float32).reshape(3, 4)),
            "big": np.arange(4, dtype=">f4"), "bool": np.array([True, False]),
            "scalar": np.array(2.5)}
  obj = dict(arrays, t=torch.arange(3.0))
  path = tmp_path / "p5.bin"
  if container == "pickle":
    with open(path, "wb") as f:
      pickle.dump(obj, f, protocol=5)
  else:
    torch.save(obj, path, pickle_protocol=5,
               _use_new_zipfile_serialization=container == "zip")
  got = torchfile.load_any(path)
  for k, v in arrays.items():
    assert got[k].dtype == v.dtype.newbyteorder("=") and got[k].shape == v.shape, k
    np.testing.assert_array_equal(got[k], v, err_msg=k)
  np.testing.assert_array_equal(got["t"], [0.0, 1.0, 2.0])


@pytest.mark.parametrize("args,error,phrase", [
    ("(C\x08\x00\x00\x00\x00\x00\x00\x80?cnumpy\ndtype\nX\x02\x00\x00\x00f4\x85RK\x03\x85X\x01\x00"
     "\x00\x00Ct", CorruptFileError, "needs 12 bytes, got 8"),
    ("(C\x04\x00\x00\x80?cnumpy\ndtype\nX\x02\x00\x00\x00f4\x85RK\x01\x85X\x01\x00\x00\x00Zt",
     CorruptFileError, "order: expected 'C' or 'F'"),
    ("(K\x01cnumpy\ndtype\nX\x02\x00\x00\x00f4\x85RK\x01\x85X\x01\x00\x00\x00Ct",
     UnsafeFileError, "not in-band bytes"),
], ids=["short-data", "bad-order", "not-bytes"])
def test_numpy_frombuffer_is_checked(tmp_path, args, error, phrase):
  path = tmp_path / "bad.pkl"
  path.write_bytes(b"\x80\x02cnumpy._core.numeric\n_frombuffer\n" + args.encode("latin-1")
                   + b"R.")
  with pytest.raises(error, match=phrase) as info:
    torchfile.load_any(path)
  assert str(path) in str(info.value)


def test_detect_format_names_gpt2_weights(tmp_path):
  import ports

  cfg = transformers.GPT2Config(n_layer=1, n_embd=12, n_head=3, vocab_size=29, n_positions=8,
                                bos_token_id=0, eos_token_id=0)
  torch.manual_seed(0)
  sd = transformers.GPT2LMHeadModel(cfg).state_dict()
  for i, weights in enumerate([sd, {k[len("transformer."):]: v for k, v in sd.items()
                                    if k.startswith("transformer.")}]):
    path = tmp_path / f"pytorch_model{i}.bin"
    torch.save(weights, path)
    with pytest.raises(ValueError, match=r"got GPT-2 weights .*ports\.gpt2\.convert_gpt2") as info:
      ports.detect_format(path)
    assert str(path) in str(info.value)
