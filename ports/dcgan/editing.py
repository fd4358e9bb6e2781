"""The DCGAN as memedit edits it: the workflow's generator for a converted checkpoint.

Its transposed convolutions are Flax ``ConvTranspose`` layers (a built-in memedit layer
kind), so nothing else is needed.
"""

from __future__ import annotations

from typing import Any

from ports.dcgan.model import DCGANGenerator

__all__ = ["memedit_generator"]


def memedit_generator(module: DCGANGenerator, variables: Any, config: dict):
  """The generator of memedit's copy–paste–context workflow for a converted DCGAN.

  Its layers are ``convt1`` .. ``convt{n-1}`` (transposed convolutions, keys at 4, 8, ...
  px); latents are the reference's sample (``RandomState(1)``).

  Args:
    module, variables: the generator (e.g. from :func:`ports.dcgan.load_dcgan`).
    config: its conversion config (z_dim, resolution, num_layers).

  Returns:
    A :class:`memedit.generators.Generator`.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from ports.dcgan.model import DCGANGenerator
    >>> module = DCGANGenerator(z_dim=8, ngf=2)
    >>> # Untrained variables: zeros of the shapes init gives (from a shape-only trace).
    >>> shapes = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 8)))
    >>> variables = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    >>> gen = memedit_generator(module, variables, {"z_dim": 8, "resolution": 64,
    ...                                             "num_layers": 5})
    >>> sorted(gen.layers), gen.framework
    (['convt1', 'convt2', 'convt3', 'convt4'], 'linen')
  """
  from memedit.generators import Generator

  layers = {f"convt{i}": (f"convt{i}",) for i in range(1, int(config["num_layers"]))}
  return Generator((module, variables), int(config["z_dim"]), int(config["resolution"]),
                   layers, (), 1, architecture="dcgan")
