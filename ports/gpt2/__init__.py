"""GPT-2 in Flax, converted from Hugging Face checkpoints, with its MLPs as memories.

Quick use::

  from ports import gpt2
  path = gpt2.convert_gpt2("gpt2-hf-folder", "gpt2-flax")   # config.json + weights
  module, variables, config = gpt2.load_gpt2(path)
  logits = module.apply(variables, ids)                      # (N, T) -> (N, T, V)
  gpt2.layer_path(17)                                        # ('h_17', 'mlp', 'c_proj')

``mlp.c_proj`` of every block is an ``nn.Dense`` with kernel ``(d_ff, d)``, so
``memedit.memory_view((module, variables), gpt2.layer_path(i), ids)`` views it as a
linear memory from the MLP keys (``d_ff`` = 4 d) to the values it writes.

See :mod:`ports.gpt2.model` for the architecture and parameter layout,
:mod:`ports.gpt2.convert` for the conversion and :mod:`ports.gpt2.hf_files` for the
checkpoint formats (``model.safetensors``, ``pytorch_model.bin``, sharded), read without
torch and without running code.
"""

from __future__ import annotations

from ports.gpt2.convert import (
    checkpoint_files,
    convert_gpt2,
    load_gpt2,
    load_safetensors,
    locate_checkpoint,
    read_hf_config,
    read_state_dict,
    save_gpt2,
    state_dict_to_params,
)
from ports.gpt2.model import (
    MLP,
    Attention,
    Block,
    GPT2Config,
    GPT2LMHeadModel,
    gelu_new,
    layer_path,
    lm_layout,
)

__all__ = [
    "MLP", "Attention", "Block", "GPT2Config", "GPT2LMHeadModel", "checkpoint_files",
    "convert_gpt2", "gelu_new", "layer_path", "lm_layout", "load_gpt2", "load_safetensors",
    "locate_checkpoint", "read_hf_config", "read_state_dict", "save_gpt2", "state_dict_to_params",
]
