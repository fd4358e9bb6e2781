"""Converting GPT-2 checkpoints as users hold them: one weights file given to
`memedit convert`, files under the other format's name, hand-written configs, refusals
that name the file, and activations equal to GPT-2's under another name."""

from __future__ import annotations

import json
import os
import shutil

import jax
import numpy as np
import pytest
import torch
import transformers

from ports import gpt2
from ports.torchfile import CorruptFileError, UnsafeFileError, load_torch

N_EMBD, N_LAYER, N_HEAD, VOCAB, N_POSITIONS = 32, 2, 4, 101, 16
TOL = 1e-4


def _hf_model(**overrides) -> transformers.GPT2LMHeadModel:
  """A small random GPT-2 (vocabulary 101, a multiple of nothing useful)."""
  fields = dict(n_layer=N_LAYER, n_embd=N_EMBD, n_head=N_HEAD, vocab_size=VOCAB,
                n_positions=N_POSITIONS, initializer_range=0.2, bos_token_id=0, eos_token_id=0)
  fields.update(overrides)
  torch.manual_seed(0)
  model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**fields)).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("bias"):
        p.copy_(0.2 * torch.randn_like(p))
  return model


def _ids(n: int = 2, t: int = 8) -> np.ndarray:
  return np.random.RandomState(3).randint(0, VOCAB, (n, t)).astype(np.int32)


def _max_err(model: transformers.GPT2LMHeadModel, converted: str, ids: np.ndarray) -> float:
  with torch.no_grad():
    want = model(torch.from_numpy(ids.astype(np.int64))).logits.double().numpy()
  module, variables, _ = gpt2.load_gpt2(converted)
  got = np.asarray(module.apply(variables, ids), np.float64)
  assert got.shape == want.shape
  return float(np.max(np.abs(got - want)))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """A save_pretrained folder (model.safetensors + config.json) and its torch model."""
  folder = str(tmp_path_factory.mktemp("hf") / "gpt2")
  model = _hf_model()
  model.save_pretrained(folder)
  return model, folder


def test_cli_auto_converts_one_safetensors_file_or_index(saved, tmp_path, capsys):
  """`memedit convert model.safetensors OUT` (auto) converts it with the config.json
  beside it, as does a shard index; both used to be read as pickles ("malformed
  pickle")."""
  from memedit.cli import main

  model, folder = saved
  out = str(tmp_path / "one")
  assert main(["convert", os.path.join(folder, "model.safetensors"), out]) == 0
  assert "(gpt2)" in capsys.readouterr().out
  assert _max_err(model, out, _ids()) < TOL

  sharded = str(tmp_path / "sharded")
  model.save_pretrained(sharded, max_shard_size="20KB")
  index = os.path.join(sharded, "model.safetensors.index.json")
  assert os.path.isfile(index)
  out2 = str(tmp_path / "two")
  assert main(["convert", index, out2]) == 0
  capsys.readouterr()
  (_, one, _), (_, two, _) = gpt2.load_gpt2(out), gpt2.load_gpt2(out2)
  for a, b in zip(jax.tree_util.tree_leaves(one), jax.tree_util.tree_leaves(two)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

  lonely = tmp_path / "alone" / "weights.safetensors"  # no config.json beside it
  lonely.parent.mkdir()
  shutil.copy(os.path.join(folder, "model.safetensors"), lonely)
  assert main(["convert", str(lonely), str(tmp_path / "three")]) == 1
  err = capsys.readouterr().err
  assert "config.json" in err and "pickle" not in err


def test_torch_file_under_a_safetensors_name_is_named(saved, tmp_path):
  """A torch.save file named model.safetensors (and a safetensors file named
  pytorch_model.bin) is refused with what its content is and the name to give it."""
  model, folder = saved
  swapped = tmp_path / "swapped"
  swapped.mkdir()
  shutil.copy(os.path.join(folder, "config.json"), swapped)
  torch.save(model.state_dict(), swapped / "model.safetensors")
  with pytest.raises(CorruptFileError, match=r"model\.safetensors: .*the content is a "
                     r"torch\.save zip archive, not safetensors: name it pytorch_model\.bin"):
    gpt2.convert_gpt2(str(swapped), str(tmp_path / "out"))
  os.remove(swapped / "model.safetensors")
  torch.save(model.state_dict(), swapped / "model.safetensors",
             _use_new_zipfile_serialization=False)
  with pytest.raises(CorruptFileError, match=r"the content is a pickle"):
    gpt2.convert_gpt2(str(swapped), str(tmp_path / "out"))

  other = tmp_path / "other"
  other.mkdir()
  shutil.copy(os.path.join(folder, "config.json"), other)
  shutil.copy(os.path.join(folder, "model.safetensors"), other / "pytorch_model.bin")
  with pytest.raises(CorruptFileError, match=r"pytorch_model\.bin: .*the content is a "
                     r"safetensors file: name it model\.safetensors"):
    gpt2.convert_gpt2(str(other), str(tmp_path / "out"))


def test_weight_refusals_name_the_source(saved, tmp_path):
  """Missing, extra (a reward model's value head) and integer weights are refused with
  the checkpoint's path, the name, and what was expected; integer weights (a quantised
  or damaged file) used to be widened to float32 silently."""
  model, folder = saved
  sd = {k: v.clone() for k, v in model.state_dict().items()}
  cases = {
      "missing": ({k: v for k, v in sd.items() if k != "transformer.h.1.mlp.c_fc.bias"},
                  r"missing 1 names \(e\.g\. \['h\.1\.mlp\.c_fc\.bias'\]\)"),
      "value head": ({**sd, "v_head.summary.weight": torch.zeros(1, N_EMBD)},
                     r"unexpected 1 names \(e\.g\. \['v_head\.summary\.weight'\]\)"),
      "int8": ({**sd, "transformer.h.0.attn.c_proj.weight":
                torch.ones(N_EMBD, N_EMBD, dtype=torch.int8)},
               r"h\.0\.attn\.c_proj\.weight: expected floating-point weights, got int8"),
  }
  for name, (state, message) in cases.items():
    src = tmp_path / name.replace(" ", "_")
    src.mkdir()
    shutil.copy(os.path.join(folder, "config.json"), src)
    torch.save(state, src / "pytorch_model.bin")
    with pytest.raises(ValueError, match=message) as info:
      gpt2.convert_gpt2(str(src), str(tmp_path / "out"))
    assert str(src) in str(info.value), name
  with pytest.raises(ValueError, match=r"lm_head\.weight: expected floating-point weights, "
                     r"got torch\.int32"):
    gpt2.state_dict_to_params({**sd, "lm_head.weight": sd["lm_head.weight"].int()},
                              gpt2.read_hf_config(os.path.join(folder, "config.json")))


def test_gelu_pytorch_tanh_is_gpt2s_gelu(tmp_path):
  """activation_function 'gelu_pytorch_tanh' (torch's tanh GELU, the same function as
  'gelu_new') converts with logits equal to transformers' instead of being refused."""
  model = _hf_model(activation_function="gelu_pytorch_tanh")
  folder = str(tmp_path / "hf")
  model.save_pretrained(folder)
  out = gpt2.convert_gpt2(folder, str(tmp_path / "out"))
  assert _max_err(model, out, _ids()) < TOL
  x = np.linspace(-6.0, 6.0, 101)
  want = 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x ** 3)))
  got = torch.nn.functional.gelu(torch.from_numpy(x), approximate="tanh").numpy()
  np.testing.assert_allclose(got, want, atol=1e-12)  # the function transformers uses


def test_config_aliases_are_read_like_transformers(saved, tmp_path):
  """A hand-written config.json with transformers' aliases (num_attention_heads, ...) is
  read as transformers reads it: n_embd 48 with 2 heads used to convert silently with the
  default 12 heads (48 is a multiple of 12), giving other logits; aliases that contradict
  their field are refused."""
  model = _hf_model(n_embd=48, n_head=2)
  folder = tmp_path / "hf"
  model.save_pretrained(str(folder))
  config = json.loads((folder / "config.json").read_text())
  ids = _ids()
  renames = (("n_head", "num_attention_heads"), ("n_embd", "hidden_size"),
             ("n_layer", "num_hidden_layers"), ("n_positions", "max_position_embeddings"))
  for step in (1, len(renames)):  # the heads alone (the silent case), then all four
    for name, alias in renames[:step]:
      config[alias] = config.pop(name, config.get(alias))
    (folder / "config.json").write_text(json.dumps(config))
    reread = transformers.GPT2LMHeadModel.from_pretrained(str(folder)).eval()
    assert reread.config.n_head == 2
    out = gpt2.convert_gpt2(str(folder), str(tmp_path / "out"))
    assert gpt2.load_gpt2(out)[2]["n_head"] == 2
    assert _max_err(reread, out, ids) < TOL

  config["n_head"] = 4
  (folder / "config.json").write_text(json.dumps(config))
  with pytest.raises(ValueError, match=r"config\.json: expected n_head and its alias "
                     r"num_attention_heads to agree, got n_head 4 and num_attention_heads 2"):
    gpt2.convert_gpt2(str(folder), str(tmp_path / "out2"))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_bin_with_views_matches_transformers(tmp_path, dtype):
  """A torch.save .bin in half precision whose tensors are strided views into larger
  storages, lm_head sharing wte's storage: logits equal transformers' on the same
  (rounded) weights."""
  model = _hf_model().to(dtype).float()  # weights rounded to the half type
  sd = {}
  for k, v in model.state_dict().items():
    big = torch.zeros((2 * v.shape[0],) + tuple(v.shape[1:]), dtype=dtype)
    big[1::2] = v.to(dtype)
    sd[k] = big[1::2]  # a view with stride 2 and offset 1 into a larger storage
  sd["lm_head.weight"] = sd["transformer.wte.weight"]
  folder = tmp_path / "hf"
  folder.mkdir()
  model.config.to_json_file(str(folder / "config.json"))
  torch.save(sd, folder / "pytorch_model.bin")
  out = gpt2.convert_gpt2(str(folder), str(tmp_path / "out"))
  assert _max_err(model, out, _ids()) < TOL


def test_whole_pickled_model_is_refused_with_the_way_out(saved, tmp_path):
  """torch.save(model) (the module object, not its state dict) is refused before anything
  runs, and the message says to save the state dict instead."""
  model, folder = saved
  src = tmp_path / "whole"
  src.mkdir()
  shutil.copy(os.path.join(folder, "config.json"), src)
  torch.save(model, src / "pytorch_model.bin")
  with pytest.raises(UnsafeFileError, match=r"pytorch_model\.bin: refused to load global "
                     r"'transformers\..*GPT2LMHeadModel'.*torch\.save\(model\.state_dict\(\), "
                     r"path\)"):
    gpt2.convert_gpt2(str(src), str(tmp_path / "out"))
  torch.save(torch.nn.Sequential(torch.nn.Linear(2, 2)), tmp_path / "seq.pt")
  with pytest.raises(UnsafeFileError, match=r"'torch\.nn\.modules\.container\.Sequential'.*"
                     r"saved with torch\.save\(model\)"):
    load_torch(str(tmp_path / "seq.pt"))
