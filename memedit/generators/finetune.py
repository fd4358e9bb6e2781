"""The paper's "overfit" baseline on all weights: the whole generator fine-tuned with Adam.

:func:`overfit_all` is one compiled program (:func:`memedit.optim.adam_scan`) taking the
trainable weights as an argument, cached by the model's structure.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from memedit.checks import check_positive_int
from memedit.generators._checks import check_learning_rate
from memedit.generators.crop import check_target_layer
from memedit.generators.forward import cached_program, run_layer
from memedit.generators.generator import Generator, layer_info
from memedit.generators.paste import Target
from memedit.layers.model import merge
from memedit.optim import adam_scan

__all__ = ["overfit_all"]


def _trainable(gen: Generator, params):
  """(trainable, rest, join): the generator's weights (Linen "params"; NNX ``nnx.Param``)
  and everything else (e.g. BatchNorm statistics), and the function putting them together."""
  if gen.framework == "linen":
    rest = {k: v for k, v in params.items() if k != "params"}
    return params["params"], rest, lambda p, r: {"params": p, **r}
  from flax import nnx
  trainable, rest = nnx.split_state(params, nnx.Param, ...)
  return trainable, rest, lambda p, r: nnx.merge_state(p, r)


def overfit_all(gen: Generator, layer: str, target: Target, *, steps: int = 20001,
                learning_rate: float = 0.01) -> tuple[Any, np.ndarray]:
  """The "overfit" baseline on all weights: every weight of the generator is fine-tuned
  with Adam so that image B reproduces the rendered paste (L1 in pixels).

  Args:
    gen, layer: the generator and layer name. target: the paste.
    steps: Adam steps. learning_rate: Adam's.

  Returns:
    (params, losses): the fine-tuned parameters (non-trainable state, e.g. BatchNorm
    statistics, unchanged) and the (steps,) pixel L1 loss before each step.

  Raises:
    TypeError: ``target`` not a :class:`Target`.
    ValueError: a Target made at another layer, or whose full value map is not this
      layer's; steps or learning_rate out of range.

  Example:
    >>> import numpy as np
    >>> from flax import nnx
    >>> from memedit.generators import Generator, copy_values, paste_target
    >>> class Toy(nnx.Module):
    ...   def __init__(self):
    ...     self.up = nnx.ConvTranspose(3, 2, (4, 4), strides=(2, 2), rngs=nnx.Rngs(0))
    ...   def __call__(self, z):
    ...     return self.up(z.reshape(-1, 4, 4, 3))
    >>> gen = Generator(Toy(), 48, 8, {"up": ("up",)})
    >>> box = np.zeros((8, 8)); box[2:4, 2:6] = 1
    >>> target = paste_target(gen, "up", copy_values(gen, "up", 0, box), 1, box)
    >>> params, losses = overfit_all(gen, "up", target, steps=20)
    >>> bool(losses[-1] < losses[0])
    True
  """
  steps = check_positive_int(steps, "steps")
  learning_rate = check_learning_rate(learning_rate)
  if not isinstance(target, Target):
    raise TypeError(f"target: expected a Target (from paste_target or erase_target), got "
                    f"{type(target).__name__}")
  # The model gives images (N, R, R, C); the layer fits the canvas.
  info = layer_info(gen, layer)
  # The paste goes into this layer's output: a Target of another layer is refused, even
  # one whose value map has the same shape.
  check_target_layer(target, layer)
  want = (1, info.value_res, info.value_res, info.value_dim)
  if np.shape(target.full_values) != want or np.shape(target.full_alpha) != want[:3]:
    raise ValueError(f"target: expected full_values {want} and full_alpha {want[:3]} (the "
                     f"value map of layer {layer!r}), got {np.shape(target.full_values)} and "
                     f"{np.shape(target.full_alpha)}")
  z = gen.latents([target.imgnum])
  goal = run_layer(gen, layer, z, paste_values=target.full_values,
                   paste_alpha=target.full_alpha).images
  trainable, rest, join = _trainable(gen, gen.params)
  definition, kwargs, nnx_model = gen.definition, dict(gen.call_kwargs), gen.framework == "nnx"

  def build():
    def run(trainable, rest, z, goal, lr):
      def loss_fn(p):
        params = join(p, rest)
        img = (merge(definition, params)(z, **kwargs) if nnx_model
               else definition.apply(params, z, **kwargs))
        return jnp.mean(jnp.abs(img - goal))
      p, _, losses = adam_scan(loss_fn, trainable, steps, lr)
      return p, losses
    return jax.jit(run)

  key = ("overfit_all", gen.framework, definition, gen.call_kwargs, steps)
  try:
    hash(key)
  except TypeError:
    key = None
  p, losses = cached_program(key, build)(trainable, rest, jnp.asarray(z), jnp.asarray(goal),
                                         jnp.float32(learning_rate))
  return join(p, rest), np.asarray(losses)
