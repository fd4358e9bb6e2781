"""GPT-2 port: parity with Hugging Face's torch GPT2LMHeadModel through both checkpoint
formats, the safetensors reader's refusals, unsafe pickles, and the MLP as a memory."""

from __future__ import annotations

import doctest
import json
import os
import shutil
import struct
import subprocess

import jax
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers

import memedit
import ports
from ports import gpt2
from ports.gpt2 import convert as gpt2_convert
from ports.gpt2 import hf_files as gpt2_files
from ports.gpt2 import model as gpt2_model
from ports.torchfile import CorruptFileError, UnsafeFileError

TOL = 1e-4
N_EMBD, N_LAYER, N_HEAD, VOCAB, N_POSITIONS = 32, 2, 4, 97, 16


def _hf_model(seed: int = 0, **overrides) -> transformers.GPT2LMHeadModel:
  """A small random GPT-2 with non-trivial LayerNorm parameters and biases."""
  cfg = transformers.GPT2Config(
      n_layer=N_LAYER, n_embd=N_EMBD, n_head=N_HEAD, vocab_size=VOCAB,
      n_positions=N_POSITIONS, initializer_range=0.2, bos_token_id=0, eos_token_id=0,
      **overrides)
  torch.manual_seed(seed)
  model = transformers.GPT2LMHeadModel(cfg).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
        p.copy_(1.0 + 0.3 * torch.randn_like(p))
      elif name.endswith("bias"):
        p.copy_(0.2 * torch.randn_like(p))
  return model


def _ids(seed: int, n: int = 4, t: int = N_POSITIONS) -> np.ndarray:
  return np.random.RandomState(seed).randint(0, VOCAB, (n, t)).astype(np.int32)


def _torch_logits(model, ids, **kwargs) -> np.ndarray:
  with torch.no_grad():
    out = model(torch.from_numpy(ids.astype(np.int64)),
                **{k: torch.from_numpy(np.asarray(v, np.int64)) for k, v in kwargs.items()})
  return out.logits.numpy()


def _max_diff(ref: np.ndarray, got) -> float:
  got = np.asarray(got)
  assert got.shape == ref.shape
  assert np.all(np.isfinite(got))
  return float(np.max(np.abs(ref - got)))


def _bin_folder(folder, state_dict, *, legacy: bool = False) -> str:
  """Writes ``folder/pytorch_model.bin`` with ``torch.save`` (what
  ``save_pretrained(safe_serialization=False)`` wrote before transformers 5, which saves
  safetensors only); returns its path."""
  os.makedirs(folder, exist_ok=True)
  path = os.path.join(folder, "pytorch_model.bin")
  kwargs = {"_use_new_zipfile_serialization": False} if legacy else {}
  torch.save(state_dict, path, **kwargs)
  return path


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
  """The torch model, its safetensors and .bin folders, and their conversions."""
  tmp = tmp_path_factory.mktemp("gpt2")
  model = _hf_model()
  st_dir, bin_dir = str(tmp / "hf-safetensors"), str(tmp / "hf-bin")
  model.save_pretrained(st_dir)
  _bin_folder(bin_dir, model.state_dict())
  shutil.copy(os.path.join(st_dir, "config.json"), bin_dir)
  return {
      "model": model, "tmp": tmp, "st_dir": st_dir, "bin_dir": bin_dir,
      "st_out": gpt2.convert_gpt2(st_dir, str(tmp / "flax-st")),
      "bin_out": gpt2.convert_gpt2(bin_dir, str(tmp / "flax-bin")),
  }


@pytest.mark.parametrize("which", ["st_out", "bin_out"])
def test_parity_with_transformers(checkpoints, which):
  model = checkpoints["model"]
  module, variables, config = gpt2.load_gpt2(checkpoints[which])
  assert (config["n_layer"], config["n_embd"], config["n_head"]) == (N_LAYER, N_EMBD, N_HEAD)
  assert config["source"]["format"] == ("safetensors" if which == "st_out" else "torch")
  ids = _ids(1)
  ref = _torch_logits(model, ids)
  assert ref.std() > 0.5  # logits far from constant: the comparison means something
  assert _max_diff(ref, module.apply(variables, ids)) <= TOL
  assert _max_diff(ref, jax.jit(module.apply)(variables, ids)) <= TOL
  # A shorter sequence (positions 0..6).
  short = _ids(2, n=2, t=7)
  assert _max_diff(_torch_logits(model, short), module.apply(variables, short)) <= TOL


def test_parity_with_padding_and_positions(checkpoints):
  """Left padding: masked keys and explicit positions give Hugging Face's logits at every
  real token."""
  model = checkpoints["model"]
  module, variables, _ = gpt2.load_gpt2(checkpoints["st_out"])
  ids = _ids(3, n=3, t=10)
  pad = np.array([0, 3, 6])
  mask = (np.arange(10)[None] >= pad[:, None]).astype(np.int32)
  positions = np.maximum(np.arange(10)[None] - pad[:, None], 0).astype(np.int32)
  ref = _torch_logits(model, ids, attention_mask=mask, position_ids=positions)
  fn = jax.jit(module.apply)
  got = np.asarray(fn(variables, ids, attention_mask=mask, position_ids=positions))
  real = mask.astype(bool)
  assert np.max(np.abs(ref[real] - got[real])) <= TOL
  # Row 1 without its padding is the same sequence at positions 0..6.
  alone = _torch_logits(model, ids[1:2, 3:])
  assert np.max(np.abs(alone[0] - got[1, 3:])) <= TOL


def test_bin_written_by_torch_save_is_a_transformers_checkpoint(checkpoints):
  """The .bin folder is what transformers itself loads (so the port reads real files)."""
  reloaded = transformers.GPT2LMHeadModel.from_pretrained(checkpoints["bin_dir"]).eval()
  ids = _ids(4)
  np.testing.assert_array_equal(_torch_logits(reloaded, ids),
                                _torch_logits(checkpoints["model"], ids))


def test_converted_weights_match_torch_layout(checkpoints):
  """Conv1D weights (in, out) are the Dense kernels unchanged; both formats agree bit for bit."""
  sd = checkpoints["model"].state_dict()
  _, st_vars, _ = gpt2.load_gpt2(checkpoints["st_out"])
  _, bin_vars, _ = gpt2.load_gpt2(checkpoints["bin_out"])
  p = st_vars["params"]
  np.testing.assert_array_equal(np.asarray(p["h_1"]["mlp"]["c_proj"]["kernel"]),
                                sd["transformer.h.1.mlp.c_proj.weight"].numpy())
  np.testing.assert_array_equal(np.asarray(p["h_0"]["attn"]["c_attn"]["kernel"]),
                                sd["transformer.h.0.attn.c_attn.weight"].numpy())
  np.testing.assert_array_equal(np.asarray(p["ln_f"]["scale"]),
                                sd["transformer.ln_f.weight"].numpy())
  for a, b in zip(jax.tree_util.tree_leaves(st_vars), jax.tree_util.tree_leaves(bin_vars)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_memedit_convert_takes_a_gpt2_folder(checkpoints, tmp_path, capsys):
  """`memedit convert FOLDER OUT` (auto: a folder is GPT-2) gives the Python converter's
  checkpoint; a GPT-2 weights file given alone is named as such."""
  from memedit.cli import main

  out = str(tmp_path / "flax")
  assert main(["convert", checkpoints["st_dir"], out]) == 0
  assert "(gpt2)" in capsys.readouterr().out
  _, got, config = gpt2.load_gpt2(out)
  _, want, _ = gpt2.load_gpt2(checkpoints["st_out"])
  assert config["n_layer"] == N_LAYER
  for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert main(["convert", "--format", "gpt2", checkpoints["bin_dir"], out]) == 0
  weights = os.path.join(checkpoints["bin_dir"], "pytorch_model.bin")
  assert main(["convert", weights, str(tmp_path / "other")]) == 1
  err = capsys.readouterr().err
  assert "got GPT-2 weights" in err and "memedit convert FOLDER OUT" in err


def test_legacy_openai_layout(checkpoints, tmp_path):
  """OpenAI's original uploads: legacy torch.save format, no 'transformer.' prefix, and
  the causal-mask buffers attn.bias / attn.masked_bias."""
  model = checkpoints["model"]
  sd = {k[len("transformer."):]: v for k, v in model.state_dict().items()
        if k.startswith("transformer.")}
  for i in range(N_LAYER):
    sd[f"h.{i}.attn.bias"] = torch.tril(torch.ones(N_POSITIONS, N_POSITIONS, dtype=torch.uint8)
                                        ).view(1, 1, N_POSITIONS, N_POSITIONS)
    sd[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
  folder = str(tmp_path / "openai")
  weights = _bin_folder(folder, sd, legacy=True)
  shutil.copy(os.path.join(checkpoints["st_dir"], "config.json"), folder)
  out = gpt2.convert_gpt2(weights, str(tmp_path / "flax"))  # the weights file itself
  module, variables, _ = gpt2.load_gpt2(out)
  ids = _ids(5)
  assert _max_diff(_torch_logits(model, ids), module.apply(variables, ids)) <= TOL


def test_sharded_checkpoint(checkpoints, tmp_path):
  model = checkpoints["model"]
  folder = str(tmp_path / "sharded")
  model.save_pretrained(folder, max_shard_size="20KB")
  assert os.path.isfile(os.path.join(folder, "model.safetensors.index.json"))
  assert not os.path.exists(os.path.join(folder, "model.safetensors"))
  out = gpt2.convert_gpt2(folder, str(tmp_path / "flax"))
  module, variables, config = gpt2.load_gpt2(out)
  assert len(config["source"]["weights"]) > 1
  ids = _ids(6)
  assert _max_diff(_torch_logits(model, ids), module.apply(variables, ids)) <= TOL


@pytest.mark.parametrize("dtype,name", [(torch.float16, "float16"), (torch.bfloat16, "bfloat16")])
def test_half_precision_safetensors(tmp_path, dtype, name):
  """F16 and BF16 files: the port (float32 compute) matches torch run in float32 on the
  same rounded weights."""
  model = _hf_model(seed=1)
  folder = str(tmp_path / name)
  model.to(dtype).save_pretrained(folder)
  tensors = gpt2.load_safetensors(os.path.join(folder, "model.safetensors"))
  assert {str(a.dtype) for a in tensors.values()} == {name}
  out = gpt2.convert_gpt2(folder, str(tmp_path / "flax"))
  module, variables, config = gpt2.load_gpt2(out)
  assert config["source"]["dtypes"] == [name]
  ids = _ids(7)
  ref = _torch_logits(model.float(), ids)
  assert _max_diff(ref, jax.jit(module.apply)(variables, ids)) <= TOL



def test_float64_safetensors_with_integer_buffers_convert(tmp_path):
  """An F64 checkpoint holding an I64 buffer beside the weights (as some real checkpoints
  do) converts; the weights are cast to float32 and the buffer is left out."""
  model = _hf_model(seed=2).double()
  folder = str(tmp_path / "f64")
  model.save_pretrained(folder)
  path = os.path.join(folder, "model.safetensors")
  tensors = gpt2.load_safetensors(path)
  assert {str(a.dtype) for a in tensors.values()} == {"float64"}
  header, data = {}, b""
  tensors["h.0.attn.masked_bias"] = np.array([-10000], np.int64)
  for name, a in tensors.items():
    raw = np.ascontiguousarray(a).tobytes()
    header[name] = {"dtype": "I64" if a.dtype == np.int64 else "F64",
                    "shape": list(a.shape), "data_offsets": [len(data), len(data) + len(raw)]}
    data += raw
  with open(path, "wb") as f:
    f.write(_safetensors_bytes(header, data))
  out = gpt2.convert_gpt2(folder, str(tmp_path / "flax"))
  module, variables, config = gpt2.load_gpt2(out)
  assert config["source"]["dtypes"] == ["float64", "int64"]
  ids = _ids(8)
  ref = _torch_logits(model.float(), ids)
  assert _max_diff(ref, jax.jit(module.apply)(variables, ids)) <= TOL

def test_mlp_c_proj_is_a_dense_memory(checkpoints):
  """memedit views block 1's mlp.c_proj as a linear memory; its captured keys and values
  are the input and output of Hugging Face's Conv1D there."""
  model = checkpoints["model"]
  module, variables, _ = gpt2.load_gpt2(checkpoints["st_out"])
  ids = _ids(8, n=2)
  address = gpt2.layer_path(1)
  assert address == ("h_1", "mlp", "c_proj")
  view = memedit.memory_view((module, variables), address, ids)
  assert view.kind == "dense"
  assert (view.key_dim, view.value_dim) == (4 * N_EMBD, N_EMBD)
  assert view.weight_path == ("params", "h_1", "mlp", "c_proj", "kernel")

  seen = {}
  layer = model.transformer.h[1].mlp.c_proj
  handle = layer.register_forward_hook(
      lambda mod, args, out: seen.update(keys=args[0].detach().numpy(),
                                         values=out.detach().numpy()))
  try:
    _torch_logits(model, ids)
  finally:
    handle.remove()
  captured = memedit.capture((module, variables), address, ids, single=True)
  assert captured.keys.shape == (2, N_POSITIONS, 4 * N_EMBD)
  assert _max_diff(seen["keys"], captured.keys) <= TOL
  assert _max_diff(seen["values"], captured.values) <= TOL


def test_load_converted_dispatches_to_gpt2(checkpoints):
  module, variables, config = ports.load_converted(checkpoints["st_out"])
  assert isinstance(module, gpt2.GPT2LMHeadModel) and config["architecture"] == "gpt2"
  assert module.config == gpt2.GPT2Config(vocab_size=VOCAB, n_positions=N_POSITIONS,
                                          n_embd=N_EMBD, n_layer=N_LAYER, n_head=N_HEAD)


# ----------------------------------------------------------------------------------------
# Unsafe and malformed files.


class _Reduce:
  """Pickles as ``fn(*args)``: what a malicious checkpoint would contain."""

  def __init__(self, fn, *args):
    self.fn, self.args = fn, args

  def __reduce__(self):
    return self.fn, self.args


@pytest.mark.parametrize("payload", ["os.system", "subprocess.Popen", "builtins.exec"])
def test_malicious_pickle_is_refused_before_it_runs(checkpoints, tmp_path, payload):
  marker = tmp_path / "pwned"
  reduce = {
      "os.system": _Reduce(os.system, f"touch {marker}"),
      "subprocess.Popen": _Reduce(subprocess.Popen, ["touch", str(marker)]),
      "builtins.exec": _Reduce(exec, f"open({str(marker)!r}, 'w').write('pwned')"),
  }[payload]
  sd = dict(checkpoints["model"].state_dict())
  sd["transformer.h.1.mlp.c_proj.weight"] = reduce
  folder = str(tmp_path / "evil")
  _bin_folder(folder, sd)
  shutil.copy(os.path.join(checkpoints["st_dir"], "config.json"), folder)
  out = str(tmp_path / "out")
  with pytest.raises(UnsafeFileError, match="pytorch_model.bin"):
    gpt2.convert_gpt2(folder, out)
  assert not marker.exists()
  assert not os.path.exists(out)


def _safetensors_bytes(header: dict, data: bytes, *, length: int | None = None) -> bytes:
  raw = json.dumps(header).encode()
  return struct.pack("<Q", len(raw) if length is None else length) + raw + data


def _header_bytes(text: str) -> bytes:
  """The length field and a header given as JSON text."""
  return struct.pack("<Q", len(text.encode())) + text.encode()


_DATA = np.arange(6, dtype="<f4").tobytes()  # 24 bytes
_GOOD = {"a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
         "b": {"dtype": "F32", "shape": [2], "data_offsets": [16, 24]}}


def _with(name: str, **fields) -> dict:
  header = json.loads(json.dumps(_GOOD))
  header[name].update(fields)
  return header


MALFORMED = {
    "header length past the file": (_safetensors_bytes(_GOOD, _DATA, length=10_000),
                                    "header length.*past the end of the file"),
    "header length too large": (_safetensors_bytes(_GOOD, _DATA, length=1 << 40),
                                "header length: expected at most"),
    "shorter than the length field": (b"\x01\x02\x03", "an 8-byte header length"),
    "overlapping offsets": (_safetensors_bytes(_with("b", data_offsets=[8, 16]), _DATA),
                            "'a' \\[0, 16\\] and 'b' \\[8, 16\\].*overlapping"),
    "unknown dtype": (_safetensors_bytes(_with("b", dtype="Q7"), _DATA),
                      "tensor 'b': dtype: expected one of \\['BF16', 'BOOL', .*'U8'\\], "
                      "got 'Q7'"),
    "bool byte other than 0 or 1": (
        _safetensors_bytes({"m": {"dtype": "BOOL", "shape": [3], "data_offsets": [0, 3]}},
                           b"\x01\x00\x02"), "tensor 'm': expected BOOL bytes 0 or 1, got 2"),
    "shape and size disagree": (_safetensors_bytes(_with("a", shape=[3, 2]), _DATA),
                                "tensor 'a': expected 24 bytes for shape \\[3, 2\\] of F32, "
                                "got data_offsets \\[0, 16\\]"),
    "offsets past the data": (_safetensors_bytes(_with("b", data_offsets=[16, 32], shape=[4]),
                                                 _DATA), "expected end <= 24"),
    "reversed offsets": (_safetensors_bytes(_with("b", data_offsets=[24, 16]), _DATA),
                         "data_offsets: expected \\[begin, end\\] with 0 <= begin <= end"),
    "negative shape": (_safetensors_bytes(_with("b", shape=[-2]), _DATA),
                       "shape: expected a list of at most 8 non-negative integers"),
    "missing field": (_safetensors_bytes({"a": {"dtype": "F32", "shape": [4]}}, _DATA),
                      "expected the fields \\['data_offsets', 'dtype', 'shape'\\]"),
    "header not json": (struct.pack("<Q", 5) + b"{nope" + _DATA,
                        "header: expected a UTF-8 JSON object"),
    "header not an object": (_header_bytes("[1, 2]") + _DATA,
                             "header: expected a JSON object, got list"),
    "repeated name": (_header_bytes('{"a": %s, "a": %s}' % ((json.dumps(_GOOD["a"]),) * 2))
                      + _DATA, "the key 'a' appears more than once"),
}


def test_good_safetensors_file_reads(tmp_path):
  path = tmp_path / "good.safetensors"
  path.write_bytes(_safetensors_bytes({"__metadata__": {"format": "pt"}, **_GOOD}, _DATA))
  got = gpt2.load_safetensors(path)
  np.testing.assert_array_equal(got["a"], np.arange(4, dtype=np.float32).reshape(2, 2))
  np.testing.assert_array_equal(got["b"], np.array([4, 5], np.float32))


# Every dtype a checkpoint may hold beside F32: (safetensors name, array as stored).
_WIDE_DTYPES = {
    "F64": np.array([[1.5, -2.25], [1e300, -0.0]], "<f8"),
    "F16": np.array([0.5, -65504.0], "<f2"),
    "BF16": np.array([1.0, -3.5], ml_dtypes.bfloat16),
    "F8_E4M3": np.array([0.5, -448.0], ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.array([0.25, -57344.0], ml_dtypes.float8_e5m2),
    "I64": np.array([[-(2 ** 62), 3], [0, 2 ** 62 + 1]], "<i8"),
    "I32": np.array([-7, 2 ** 31 - 1], "<i4"),
    "I16": np.array([-3, 32767], "<i2"),
    "I8": np.array([-128, 127], "i1"),
    "U64": np.array([2 ** 64 - 1], "<u8"),
    "U32": np.array([2 ** 32 - 1, 1], "<u4"),
    "U16": np.array([65535, 2], "<u2"),
    "U8": np.array([0, 255, 7], "u1"),
    "BOOL": np.array([[True, False], [False, True]]),
}


def test_safetensors_of_every_dtype_read_exactly(tmp_path):
  header, data = {}, b""
  for dtype_name, a in _WIDE_DTYPES.items():
    raw = a.tobytes()  # little-endian on every machine these tests run on
    header[dtype_name.lower()] = {"dtype": dtype_name, "shape": list(a.shape),
                                  "data_offsets": [len(data), len(data) + len(raw)]}
    data += raw
  path = tmp_path / "wide.safetensors"
  path.write_bytes(_safetensors_bytes(header, data))
  got = gpt2.load_safetensors(path)
  assert sorted(got) == sorted(n.lower() for n in _WIDE_DTYPES)
  for dtype_name, a in _WIDE_DTYPES.items():
    t = got[dtype_name.lower()]
    assert t.dtype == a.dtype == gpt2_files.SAFETENSORS_DTYPES[dtype_name], dtype_name
    assert t.shape == a.shape and t.tobytes() == a.tobytes(), dtype_name
    assert t.flags.writeable, dtype_name  # a copy, not a view of the read buffer
  assert got["bf16"].tolist() == [1.0, -3.5]
  assert got["bool"].tolist() == [[True, False], [False, True]]
  assert got["f64"][1, 0] == 1e300  # beyond float32
  assert got["i64"][1, 1] == 2 ** 62 + 1  # beyond float64's integers


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_safetensors_is_refused(tmp_path, case):
  data, message = MALFORMED[case]
  path = tmp_path / "model.safetensors"
  path.write_bytes(data)
  with pytest.raises(CorruptFileError, match=message) as info:
    gpt2.load_safetensors(path)
  assert str(path) in str(info.value)


def test_safetensors_refuses_a_directory(tmp_path):
  with pytest.raises(CorruptFileError, match="expected a safetensors file.*a directory"):
    gpt2.load_safetensors(tmp_path)


def test_convert_refuses_a_corrupted_real_file(checkpoints, tmp_path):
  """A real model.safetensors whose header claims more bytes than the file holds."""
  folder = str(tmp_path / "cut")
  shutil.copytree(checkpoints["st_dir"], folder)
  path = os.path.join(folder, "model.safetensors")
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) - 100)
  out = str(tmp_path / "out")
  with pytest.raises(CorruptFileError, match="model.safetensors: tensor .*past the end"):
    gpt2.convert_gpt2(folder, out)
  assert not os.path.exists(out)


# ----------------------------------------------------------------------------------------
# Configs and state dicts the port does not cover.


def _edit_config(folder, **changes):
  path = os.path.join(folder, "config.json")
  with open(path) as f:
    cfg = json.load(f)
  cfg.update(changes)
  with open(path, "w") as f:
    json.dump(cfg, f)


@pytest.mark.parametrize("changes,message", [
    # Settings the port does not compute: the message names config.json.
    ({"activation_function": "relu"},
     "config.json: activation_function: expected 'gelu_new'.*got 'relu'"),
    ({"model_type": "bert"}, "config.json: model_type: expected 'gpt2', got 'bert'"),
    ({"scale_attn_by_inverse_layer_idx": True},
     "config.json: scale_attn_by_inverse_layer_idx: expected False"),
    ({"n_head": 5},
     "config.json: .*expected n_embd a multiple of n_head, got n_embd 32 and n_head 5"),
    # A config the weights do not match: the message lists the differences.
    ({"n_embd": 64, "n_head": 4}, "shape mismatches.*wte.weight: expected \\(97, 64\\), "
                                  "got \\(97, 32\\)"),
    ({"n_layer": 3}, "missing 12 names.*h.2.ln_1.weight"),
])
def test_config_mismatches_are_refused(checkpoints, tmp_path, changes, message):
  folder = str(tmp_path / "hf")
  shutil.copytree(checkpoints["st_dir"], folder)
  _edit_config(folder, **changes)
  out = str(tmp_path / "out")
  with pytest.raises(ValueError, match=message):
    gpt2.convert_gpt2(folder, out)
  assert not os.path.exists(out)


def test_untied_head_and_missing_files_are_refused(checkpoints, tmp_path):
  model = checkpoints["model"]
  sd = {k: v.clone() for k, v in model.state_dict().items()}
  sd["lm_head.weight"] += 1.0
  cfg = gpt2.read_hf_config(os.path.join(checkpoints["st_dir"], "config.json"))
  with pytest.raises(ValueError, match="lm_head.weight: expected the tied token embedding"):
    gpt2.state_dict_to_params({k: v.numpy() for k, v in sd.items()}, cfg)
  sd = {k: v.numpy().copy() for k, v in model.state_dict().items()}
  sd["transformer.ln_f.bias"][0] = np.nan
  with pytest.raises(ValueError, match="ln_f.bias: expected finite weights, got 1 NaN"):
    gpt2.state_dict_to_params(sd, cfg)
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(FileNotFoundError, match="expected GPT-2 weights in the folder"):
    gpt2.convert_gpt2(str(empty), str(tmp_path / "out"))
  lonely = tmp_path / "lonely"
  lonely.mkdir()
  shutil.copy(os.path.join(checkpoints["st_dir"], "model.safetensors"), lonely)
  with pytest.raises(FileNotFoundError, match="config.json next to its weights"):
    gpt2.convert_gpt2(str(lonely), str(tmp_path / "out"))


def test_shard_index_naming_outside_files_is_refused(checkpoints, tmp_path):
  folder = tmp_path / "index"
  folder.mkdir()
  shutil.copy(os.path.join(checkpoints["st_dir"], "config.json"), folder)
  (folder / "model.safetensors.index.json").write_text(
      json.dumps({"weight_map": {"transformer.wte.weight": "../model.safetensors"}}))
  with pytest.raises(CorruptFileError, match="expected shard names inside the index's folder"):
    gpt2.convert_gpt2(str(folder), str(tmp_path / "out"))


def test_model_input_errors(checkpoints):
  module, variables, _ = gpt2.load_gpt2(checkpoints["st_out"])
  with pytest.raises(ValueError, match="expected at most n_positions = 16 tokens, got 17"):
    module.apply(variables, _ids(0, n=1, t=17))
  with pytest.raises(ValueError, match="expected an \\(N, T\\) array of integer token ids"):
    module.apply(variables, _ids(0, n=1)[0])
  with pytest.raises(ValueError, match="attention_mask: expected shape \\(1, 16\\)"):
    module.apply(variables, _ids(0, n=1), attention_mask=np.ones((1, 15), np.int32))


@pytest.mark.parametrize("module", [gpt2_model, gpt2_convert, gpt2_files])
def test_docstring_examples(module):
  result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
  assert result.attempted > 0
  assert result.failed == 0


def _tiny_folder(folder, files):
  """A checkpoint folder with a tiny GPT-2 config.json and ``files`` (name -> bytes, or
  None for a directory)."""
  os.makedirs(folder)
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump({"model_type": "gpt2", "vocab_size": 5, "n_positions": 4, "n_embd": 4,
               "n_layer": 1, "n_head": 2}, f)
  for name, data in files.items():
    if data is None:
      os.makedirs(os.path.join(folder, name))
    else:
      with open(os.path.join(folder, name), "wb") as f:
        f.write(data)
  return str(folder)


def test_weights_name_that_is_a_directory_is_named(tmp_path):
  folder = _tiny_folder(tmp_path / "m", {"model.safetensors": None})
  with pytest.raises(CorruptFileError, match=r"model.safetensors: expected GPT-2 weights "
                     r"\(a regular file\), got a directory"):
    gpt2.convert_gpt2(folder, str(tmp_path / "out"))


def test_index_naming_a_missing_shard_is_refused_before_reading(tmp_path, monkeypatch):
  shard = _safetensors_bytes(_GOOD, _DATA)
  index = json.dumps({"weight_map": {"a": "model-1.safetensors",
                                     "b": "model-2.safetensors"}}).encode()
  folder = _tiny_folder(tmp_path / "m", {"model-1.safetensors": shard,
                                         "model.safetensors.index.json": index})
  read = []
  monkeypatch.setattr(gpt2_files, "load_safetensors", lambda p: read.append(p) or {})
  with pytest.raises(FileNotFoundError, match=r"weight_map: expected the shard files it names "
                     r"beside it, missing \['model-2.safetensors'\] \(1 of 2\)"):
    gpt2.convert_gpt2(folder, str(tmp_path / "out"))
  assert read == []


def _tensor_file(names) -> bytes:
  """A safetensors file holding one F32 tensor of shape (2,) per name."""
  header = {n: {"dtype": "F32", "shape": [2], "data_offsets": [8 * i, 8 * i + 8]}
            for i, n in enumerate(names)}
  return _safetensors_bytes(header, np.arange(2 * len(names), dtype="<f4").tobytes())


SHARD_INDEX_MISMATCHES = {
    # weight_map, then the message naming the tensor and the shard
    "tensor in another shard than the index says": (
        {"a": "model-2.safetensors", "b": "model-1.safetensors", "c": "model-1.safetensors"},
        r"tensor 'c': expected in shard 'model-1.safetensors' \(where the index puts it\), "
        r"got it in shard 'model-2.safetensors'"),
    "tensor the index does not list": (
        {"a": "model-1.safetensors", "c": "model-2.safetensors"},
        r"tensor 'b': expected only the tensors the index lists, got one it does not list "
        r"in shard 'model-1.safetensors'"),
    "index names a tensor its shard lacks": (
        {"a": "model-1.safetensors", "b": "model-1.safetensors", "c": "model-2.safetensors",
         "d": "model-2.safetensors"},
        r"tensor 'd': expected in shard 'model-2.safetensors' \(where the index puts it\), "
        r"got a shard without it"),
}


@pytest.mark.parametrize("case", sorted(SHARD_INDEX_MISMATCHES))
def test_shards_that_disagree_with_their_index_are_refused(tmp_path, case):
  weight_map, message = SHARD_INDEX_MISMATCHES[case]
  index = json.dumps({"metadata": {}, "weight_map": weight_map}).encode()
  folder = _tiny_folder(tmp_path / "m", {"model-1.safetensors": _tensor_file(["a", "b"]),
                                         "model-2.safetensors": _tensor_file(["c"]),
                                         "model.safetensors.index.json": index})
  with pytest.raises(CorruptFileError, match=r"model.safetensors.index.json: weight_map: "
                     + message):
    gpt2.convert_gpt2(folder, str(tmp_path / "out"))
  files, _, index_file = gpt2.locate_checkpoint(folder)
  with pytest.raises(CorruptFileError, match=message):
    gpt2.read_state_dict(files, index=index_file)
  assert not os.path.exists(tmp_path / "out")


def test_shards_that_match_their_index_are_read(tmp_path):
  index = json.dumps({"weight_map": {"c": "model-2.safetensors", "a": "model-1.safetensors",
                                     "b": "model-1.safetensors"}}).encode()
  folder = _tiny_folder(tmp_path / "m", {"model-1.safetensors": _tensor_file(["a", "b"]),
                                         "model-2.safetensors": _tensor_file(["c"]),
                                         "model.safetensors.index.json": index})
  files, _, index_file = gpt2.locate_checkpoint(folder)
  assert index_file == os.path.join(folder, "model.safetensors.index.json")
  sd = gpt2.read_state_dict(files, index=index_file)
  assert sorted(sd) == ["a", "b", "c"]
  np.testing.assert_array_equal(sd["b"], np.array([2, 3], np.float32))
