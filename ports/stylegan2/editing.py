"""StyleGAN2 as memedit edits it: the modulated convolutions' memories as a layer kind, and
the workflow's generator for a converted checkpoint.

:class:`~ports.stylegan2.model.ModulatedConvMemory` is registered with
:func:`memedit.layers.register_layer_kind` as a per-tap ``"conv"`` memory: its keys are
the per-pixel x·s, its run-time weight gain is 1/√(k·k·C_in) (:func:`memory_gain`), and
without up-sampling its patch keys are the 'same' k×k patches (:func:`memory_patches`).
The layer's own call, with its demodulation recomputed from the kernel it is given
(:func:`ports.stylegan2.model.demodulation`), is the f of every solve of the workflow, so
memedit needs nothing else about StyleGAN2.
"""

from __future__ import annotations

import math
from typing import Any

import jax

from ports.stylegan2.model import ModulatedConvMemory, StyleGAN2Generator

__all__ = ["memedit_generator", "memory_gain", "memory_patches"]


def memory_gain(module: ModulatedConvMemory) -> float:
  """The run-time weight gain 1/√(k·k·C_in) of a modulated convolution's memory.

  Args:
    module: the :class:`ModulatedConvMemory` (with ``in_features`` set).

  Returns:
    The gain, a float.

  Raises:
    ValueError: ``in_features`` is not set.

  Example:
    >>> from ports.stylegan2.model import ModulatedConvMemory
    >>> memory_gain(ModulatedConvMemory(8, 3, in_features=4))
    0.16666666666666666
  """
  if module.in_features is None:
    raise ValueError("ModulatedConvMemory: expected in_features set (C_in) to know its weight "
                     "gain 1/sqrt(k*k*C_in), got None")
  return 1.0 / math.sqrt(module.kernel_size ** 2 * module.in_features)


def memedit_generator(module: StyleGAN2Generator, variables: Any, config: dict, *,
                      truncation: float | None = None):
  """The generator of memedit's copy–paste–context workflow for a converted StyleGAN2.

  Its layers are ``conv_0`` .. ``conv_{n-1}`` (the reference's numbering), each the
  modulated convolution's memory (keys x·s, the style kept as the layer's extra call
  argument); latents are the reference's sample (``RandomState(1)``).

  Args:
    module, variables: the generator (e.g. from :func:`ports.stylegan2.load_stylegan2`).
    config: its conversion config (resolution, z_dim, num_layers).
    truncation: ψ of every call (default 1).

  Returns:
    A :class:`memedit.generators.Generator`.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from ports.stylegan2.model import StyleGAN2Generator
    >>> module = StyleGAN2Generator(8, (16, 8), z_dim=8, w_dim=8, n_mlp=1)
    >>> # Untrained variables: zeros of the shapes init gives (from a shape-only trace).
    >>> shapes = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 8)))
    >>> variables = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    >>> config = {"resolution": 8, "z_dim": 8, "num_layers": 3}
    >>> gen = memedit_generator(module, variables, config, truncation=0.7)
    >>> sorted(gen.layers), gen.call_kwargs
    (['conv_0', 'conv_1', 'conv_2'], (('truncation', 0.7),))
  """
  from memedit.generators import Generator as Workflow

  layers = {f"conv_{i}": ("synthesis", f"conv_{i}", "memory")
            for i in range(int(config["num_layers"]))}
  kw = (("truncation", float(1.0 if truncation is None else truncation)),)
  return Workflow((module, variables), int(config["z_dim"]), int(config["resolution"]),
                  layers, kw, 1, architecture="stylegan2")


def memory_patches(module: ModulatedConvMemory, x_mod: jax.Array) -> jax.Array:
  """Patch keys of a memory without up-sampling: the 'same' k×k patches of x·s.

  Args:
    module: the :class:`ModulatedConvMemory` (``up=False``).
    x_mod: keys (N, H, W, C_in).

  Returns:
    (N, H, W, k·k·C_in), tap-major and channel-minor, so that their product with
    ``kernel.reshape(-1, C_out)`` times the gain is the convolution before demodulation.

  Raises:
    ValueError: an up-sampling memory (transposed convolution then blur: no patch keys).

  Example:
    >>> import jax.numpy as jnp
    >>> from ports.stylegan2.model import ModulatedConvMemory
    >>> patches = memory_patches(ModulatedConvMemory(2, 3), jnp.ones((1, 4, 4, 5)))
    >>> patches.shape, float(patches[0, 0, 0].sum()), float(patches[0, 1, 1].sum())
    ((1, 4, 4, 45), 20.0, 45.0)
  """
  from memedit.layers.conv import extract_patches

  if module.up:
    raise ValueError("patch view: expected a modulated convolution without up-sampling, got "
                     "up=True (a transposed convolution followed by a blur has no patch keys)")
  p = module.kernel_size // 2
  return extract_patches(x_mod, (module.kernel_size,) * 2, padding=((p, p), (p, p)))


def _register_memory_kind() -> None:
  """Makes every modulated convolution's memory a memedit layer kind: a per-tap "conv"
  memory with the run-time gain 1/√(k·k·C_in) (:func:`memory_gain`) and, without
  up-sampling, patch keys (:func:`memory_patches`)."""
  from memedit.layers import register_layer_kind

  register_layer_kind(ModulatedConvMemory, weight="kernel", kind="conv", gain=memory_gain,
                      patches=memory_patches)


_register_memory_kind()
