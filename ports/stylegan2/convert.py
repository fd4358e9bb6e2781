"""Converters from rosinality ``.pt`` and NVIDIA ``.pkl`` StyleGAN2 checkpoints.

Both write one directory (atomically, through :func:`memedit._io.save_tree`): the Flax
variables of :class:`ports.stylegan2.model.StyleGAN2Generator` as an orbax checkpoint, plus a JSON
config describing the architecture and the source file (name, sha256). Neither needs
torch: files are read by :mod:`ports.torchfile`.

Weight layouts. Torch conv weights (C_out, C_in, kh, kw) (rosinality adds a leading 1)
become HWIO (kh, kw, C_in, C_out); torch linear weights (out, in) become Flax (in, out);
the constant input (C, 4, 4) becomes (4, 4, C); noise buffers become (H, W). Neither
flavour flips kernels: NVIDIA's up-sampling ``conv2d_resample`` (``flip_weight=False``
with a transposed convolution) computes the same transposed convolution as rosinality's.

Differences handled by config switches of the one module:
  * NVIDIA's ``conv_clamp`` (clamp conv and ToRGB outputs to ±conv_clamp);
  * NVIDIA's separate z_dim / w_dim / mapping width;
  * channel widths are stored explicitly (rosinality's table or NVIDIA's
    min(channel_base / res, channel_max)).
NVIDIA's FP16 execution of the highest-resolution blocks is a CUDA-only speed option;
the port (like NVIDIA's code on CPU) runs float32 throughout. Unsupported NVIDIA
variants (conditional generators, 'orig' or 'resnet' architectures, other filters or
activations) raise ValueError.

The rosinality flavour lives in :mod:`ports.stylegan2.rosinality`, the NVIDIA flavour in
:mod:`ports.stylegan2.nvidia` and the pieces they share in :mod:`ports.stylegan2.state_dict`;
their public names are re-exported here, beside :func:`load_stylegan2`.
"""

from __future__ import annotations

import os

from memedit import _io
from ports import check_variables
from ports.stylegan2 import model as model_lib
from ports.stylegan2.nvidia import (convert_nvidia, infer_nvidia_config,
                                    state_dict_to_params_nvidia)
from ports.stylegan2.rosinality import (convert_rosinality, find_rosinality_entry,
                                        infer_rosinality_config,
                                        state_dict_to_params_rosinality)
from ports.stylegan2.state_dict import FORMAT_VERSION

__all__ = ["FORMAT_VERSION", "convert_nvidia", "convert_rosinality", "find_rosinality_entry",
           "infer_nvidia_config",
           "infer_rosinality_config", "load_stylegan2", "state_dict_to_params_nvidia",
           "state_dict_to_params_rosinality"]


def load_stylegan2(path: str | os.PathLike):
  """Loads a converted checkpoint.

  Returns:
    ``(module, variables, config)``: the :class:`ports.stylegan2.model.StyleGAN2Generator`, its
    Flax variables (numpy arrays) and the JSON config.

  Raises:
    FileNotFoundError: ``path`` is not a complete checkpoint.
    ValueError: the checkpoint is not a StyleGAN2 conversion, or its arrays do not fit
      its config (see :func:`ports.check_variables`).
  """
  import jax

  variables, config = _io.load_tree(path)
  if config.get("architecture") != "stylegan2":
    raise ValueError(f"{os.fspath(path)}: expected architecture 'stylegan2', "
                     f"got {config.get('architecture')!r}")
  module = model_lib.generator_from_config(config)
  check_variables(module, variables,
                  (jax.ShapeDtypeStruct((1, module.z_dim), jax.numpy.float32),),
                  os.fspath(path))
  return module, variables, config
