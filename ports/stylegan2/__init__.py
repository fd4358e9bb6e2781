"""StyleGAN2 in Flax with its modulated convolutions exposed as memories.

Quick use::

  from ports import stylegan2
  path = stylegan2.convert_rosinality("stylegan2-ffhq-config-f.pt", "ffhq-flax")
  module, variables, config = stylegan2.load_stylegan2(path)  # a StyleGAN2Generator
  z = stylegan2.sample_latents(8, config["z_dim"], seed=1)
  images = stylegan2.generate(module, variables, z, truncation=0.5)   # (8, R, R, 3) NHWC
  stylegan2.layer_paths(module)[6]   # ('params', 'synthesis', 'conv_6', 'memory', 'kernel')

See :mod:`ports.stylegan2.model` for the architecture and parameter layout (its layers in
:mod:`ports.stylegan2.layers`), :mod:`ports.stylegan2.editing` for its modulated
convolutions as memedit layers, :mod:`ports.stylegan2.convert` for the checkpoint formats
(:mod:`ports.stylegan2.rosinality` and :mod:`ports.stylegan2.nvidia` for each flavour) and
:mod:`ports.stylegan2.export` for writing rosinality checkpoints
(``stylegan2.save_rosinality(path, module, variables)``).
:mod:`ports.stylegan2.train` distils the DCGAN face generator into a small StyleGAN2 and
:mod:`ports.stylegan2.swd` measures image quality (sliced Wasserstein distance).
"""

from __future__ import annotations

from ports.stylegan2.convert import (
    convert_nvidia,
    convert_rosinality,
    infer_nvidia_config,
    infer_rosinality_config,
    load_stylegan2,
    state_dict_to_params_nvidia,
    state_dict_to_params_rosinality,
)
from ports.stylegan2.editing import memedit_generator, memory_gain, memory_patches
from ports.stylegan2.export import save_rosinality, state_dict_rosinality
from ports.stylegan2.model import (
    EqualLinear,
    MappingNetwork,
    ModulatedConv,
    ModulatedConvMemory,
    StyleGAN2Generator,
    SynthesisNetwork,
    ToRGB,
    demodulation,
    generate,
    generator_from_config,
    layer_paths,
    layer_resolution,
    mean_latent,
    num_conv_layers,
    num_ws,
    nvidia_channels,
    rosinality_channels,
    sample_latents,
    upfirdn2d,
)

__all__ = [
    "EqualLinear", "MappingNetwork", "ModulatedConv", "ModulatedConvMemory",
    "StyleGAN2Generator", "SynthesisNetwork", "ToRGB", "convert_nvidia", "convert_rosinality",
    "demodulation", "generate", "generator_from_config", "infer_nvidia_config",
    "infer_rosinality_config", "layer_paths", "layer_resolution", "load_stylegan2",
    "mean_latent", "memedit_generator", "memory_gain", "memory_patches", "num_conv_layers",
    "num_ws", "nvidia_channels", "rosinality_channels", "sample_latents", "save_rosinality",
    "state_dict_rosinality", "state_dict_to_params_nvidia", "state_dict_to_params_rosinality",
    "upfirdn2d",
]
