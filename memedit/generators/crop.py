"""The layer alone on a crop of its key map, and the kernel taps a key writes its own cell by.

:class:`LayerOnCrop` is the function ``f(kernel, keys)`` every solve of the workflow
optimises: the editable layer itself (its own class, so a port's layer brings its own
computation, e.g. StyleGAN2's demodulation recomputed from the kernel) run on a crop of
its input with a margin of context around it. It is a frozen dataclass holding only the
layer's structure and the crop's geometry: equal crops of equal layers are equal, so a
solve compiled for one parameter set of a model is reused by every other; the layer's
parameters (other than the kernel) and extra call arguments enter as ``keys``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from memedit.generators.forward import cached_program, run_layer
from memedit.generators.generator import Generator, layer_info, layer_view
from memedit.layers.model import linen_layer_variables, merge
from memedit.tree import replace_leaf

__all__ = ["Crops", "LayerOnCrop", "crop_problem", "layer_on_crop", "layer_params", "own_taps",
           "tap_mask"]


@dataclasses.dataclass(frozen=True)
class LayerOnCrop:
  """``f(kernel, (x, layer_params, extra))``: the layer's output on a crop of its keys.

  ``x`` (N, h + 2m, w + 2m, C_in) holds the crop's keys with m = ``margin`` key pixels of
  context around them (zeros outside the image); the output is cut to the crop's own
  (N, height, width, C_out) cells starting at ``start = s·m``, which equal the whole
  layer's output there when m covers the kernel's reach.

  Attributes:
    framework: ``'nnx'`` or ``'linen'``.
    definition: the layer's NNX GraphDef or unbound Linen module.
    weight: name of its kernel parameter.
    start: first output row / column of the crop (s·m).
    height, width: the crop's output size (None: to the end).

  Example:
    >>> import jax.numpy as jnp, flax.linen as nn
    >>> f = LayerOnCrop("linen", nn.Conv(2, (3, 3), use_bias=False), "kernel", 1, 2, 2)
    >>> out = f(jnp.ones((3, 3, 1, 2)), (jnp.ones((1, 4, 4, 1)), {"params": {}}, ()))
    >>> out.shape, out[0, 0, 0].tolist()
    ((1, 2, 2, 2), [9.0, 9.0])
  """

  framework: str
  definition: Any
  weight: str
  start: int = 0
  height: int | None = None
  width: int | None = None

  def __call__(self, kernel, keys):
    x, params, extra = keys
    if self.framework == "nnx":
      out = merge(self.definition, replace_leaf(params, (self.weight,), kernel))(x, *extra)
    else:
      variables = {**params, "params": {**params.get("params", {}), self.weight: kernel}}
      out = self.definition.apply(variables, x, *extra)
    h = out.shape[1] if self.height is None else self.height
    w = out.shape[2] if self.width is None else self.width
    return out[:, self.start:self.start + h, self.start:self.start + w]


@dataclasses.dataclass(frozen=True)
class Crops:
  """``f(kernel, (keys₀, keys₁, …))``: several crop functions of one kernel, their outputs
  flattened and concatenated (one solve over several crops, e.g. an edit's own crop and
  the crops whose outputs it keeps).

  Attributes:
    fs: the crop functions (:class:`LayerOnCrop` or their projected forms), one per crop.

  Example:
    >>> import jax.numpy as jnp, flax.linen as nn
    >>> f = LayerOnCrop("linen", nn.Conv(2, (1, 1), use_bias=False), "kernel")
    >>> keys = (jnp.ones((1, 1, 1, 1)), {"params": {}}, ())
    >>> Crops((f, f))(jnp.ones((1, 1, 1, 2)), (keys, keys)).tolist()
    [1.0, 1.0, 1.0, 1.0]
  """

  fs: tuple

  def __call__(self, kernel, keys):
    return jnp.concatenate([jnp.reshape(f(kernel, k), (-1,)) for f, k in zip(self.fs, keys)])


def layer_params(gen: Generator, layer: str, params: Any = None) -> Any:
  """The layer's own parameters in ``params`` (default: the generator's): its NNX State
  or its Linen ``{collection: variables}``, as :class:`LayerOnCrop` takes them.

  Args:
    gen: the generator. layer: the layer's name. params: the model's parameters.

  Returns:
    The layer's parameter sub-tree (its kernel included).

  Example:
    >>> from flax import nnx
    >>> from memedit.generators.generator import Generator
    >>> model = nnx.Sequential(nnx.Linear(4, 12, rngs=nnx.Rngs(0)),
    ...                        lambda x: x.reshape(-1, 2, 2, 3))
    >>> gen = Generator(model, z_dim=4, resolution=2, layers={"fc": ("layers", 0)})
    >>> sorted(layer_params(gen, "fc"))
    ['bias', 'kernel']
  """
  params = gen.params if params is None else params
  path = layer_view(gen, layer).module_path
  if gen.framework == "linen":
    return linen_layer_variables(params, path)
  node = params
  for part in path:
    node = node[part]
  return node


def layer_on_crop(gen: Generator, layer: str, start: int = 0, height: int | None = None,
                  width: int | None = None) -> LayerOnCrop:
  """The :class:`LayerOnCrop` of layer ``layer`` (defaults: the whole output).

  Args:
    gen: the generator. layer: the layer's name.
    start, height, width: the output cells kept (see :class:`LayerOnCrop`).

  Returns:
    The function; equal for equal layers of models of equal structure.

  Example:
    >>> from flax import nnx
    >>> from memedit.generators.generator import Generator
    >>> model = nnx.Sequential(nnx.Linear(4, 12, rngs=nnx.Rngs(0)),
    ...                        lambda x: x.reshape(-1, 2, 2, 3))
    >>> gen = Generator(model, z_dim=4, resolution=2, layers={"fc": ("layers", 0)})
    >>> layer_on_crop(gen, "fc") == layer_on_crop(gen.with_params(gen.params), "fc")
    True
  """
  view = layer_view(gen, layer)
  return LayerOnCrop(view.framework, view.layer[0], view.spec.weight, start, height, width)


def check_target_layer(target, layer: str, name: str = "target") -> None:
  """Refuses a Target recorded at a layer other than ``layer`` (its ``layer`` field; a
  Target without one, made by hand, is taken as it is).

  Example:
    >>> from types import SimpleNamespace
    >>> check_target_layer(SimpleNamespace(layer="convt2"), "convt3")
    Traceback (most recent call last):
    ...
    ValueError: target: expected a crop of layer 'convt3' (the layer edited), got a Target made at layer 'convt2'; make it at 'convt3' (paste_target(gen, 'convt3', ...))
  """
  made = getattr(target, "layer", None)
  if made is not None and made != layer:
    raise ValueError(f"{name}: expected a crop of layer {layer!r} (the layer edited), got a "
                     f"Target made at layer {made!r}; make it at {layer!r} "
                     f"(paste_target(gen, {layer!r}, ...))")


def crop_problem(gen: Generator, layer: str, target) -> tuple[Callable, Any]:
  """``(f, keys)`` with ``f(kernel, keys)`` the layer's output on the target's crop.

  Args:
    gen: the generator. layer: the layer's name.
    target: a :class:`memedit.generators.Target` (its keys carry the margin).

  Returns:
    ``(f, keys)``: a :class:`LayerOnCrop` and ``(x, layer_params, extra)``; the output of
    ``f`` has the shape of ``target.targets``.

  Example:
    >>> import numpy as np
    >>> from flax import nnx
    >>> from memedit.generators import Generator, bbox, paste_target, copy_values
    >>> class Toy(nnx.Module):
    ...   def __init__(self):
    ...     self.up = nnx.ConvTranspose(3, 2, (4, 4), strides=(2, 2), rngs=nnx.Rngs(0))
    ...   def __call__(self, z):
    ...     return self.up(z.reshape(-1, 4, 4, 3))
    >>> gen = Generator(Toy(), 48, 8, {"up": ("up",)})
    >>> box = np.zeros((8, 8)); box[2:4, 2:4] = 1
    >>> target = paste_target(gen, "up", copy_values(gen, "up", 0, box), 1, box)
    >>> f, keys = crop_problem(gen, "up", target)
    >>> kernel = gen.params["up"]["kernel"][...]
    >>> bool(np.allclose(f(kernel, keys), target.original, atol=1e-5))
    True
  """
  info = layer_info(gen, layer)
  check_target_layer(target, layer)
  oh, ow = target.targets.shape[1:3]
  f = layer_on_crop(gen, layer, info.scale * info.margin, int(oh), int(ow))
  keys = (jnp.asarray(target.keys), layer_params(gen, layer),
          tuple(jnp.asarray(e) for e in target.extra))
  return f, keys


def tap_mask(apply: Callable, kernel_shape: Sequence[int], scale: int, args: tuple = (),
             name: str = "layer", key_dim: int | None = None) -> np.ndarray:
  """The kernel taps through which a key writes most of its output into its own cell.

  With scale s the key at (i, j) owns the s×s output cell [s·i, s·i + s) × [s·j, s·j + s).
  Found through the layer itself: a single key at the centre of an n×n map
  (n = 2·max(kh, kw) + 1) runs through a kernel that is 1 on one tap and 0 elsewhere, and
  the tap's share is the part of its output change (Σ|Δout|, against the all-zero kernel)
  that falls inside the key's cell. The own taps are those of the largest share, which
  must be above 1/2. Where some taps stay inside the cell (share 1: plain and transposed
  convolutions) these are exactly the taps that write nothing outside it; where the layer
  blurs after up-sampling (StyleGAN2's up-sampling convolutions), no tap stays inside and
  the own taps are those whose blurred footprint is most centred on the cell.

  Args:
    apply: ``apply(kernel, x, *args) -> output`` runs the layer on x (1, n, n, C_in).
    kernel_shape: the HWIO kernel's shape (kh, kw, C_in, C_out).
    scale: s, output pixels per key pixel.
    args: further arguments of ``apply`` (arrays: the layer's parameters, its extra call
      arguments for one image), passed to the compiled probe as arguments.
    name: the layer's name for error messages.
    key_dim: the channels of the layer's input (default: the kernel's C_in; a grouped
      convolution's input has G times as many).

  Returns:
    (kh, kw) bool mask over the kernel's taps.

  Raises:
    ValueError: a kernel that is not (kh, kw, C_in, C_out), an output that is not the
      input scaled by s, or no tap writing more than half of its output into the key's
      cell.

  Example:
    >>> import jax.numpy as jnp, flax.linen as nn
    >>> conv = nn.ConvTranspose(1, (4, 4), strides=(2, 2), padding="SAME", use_bias=False)
    >>> apply = lambda k, x: conv.apply({"params": {"kernel": k}}, x)
    >>> tap_mask(apply, (4, 4, 1, 1), 2).astype(int).tolist()
    [[0, 0, 0, 0], [0, 1, 1, 0], [0, 1, 1, 0], [0, 0, 0, 0]]
  """
  if len(kernel_shape) != 4:
    raise ValueError(f"taps 'own' for layer {name!r}: expected a convolution kernel "
                     f"(kh, kw, C_in, C_out), got shape {tuple(kernel_shape)}")
  kh, kw, c_in, c_out = (int(k) for k in kernel_shape)
  n = 2 * max(kh, kw) + 1
  c, s = n // 2, int(scale)
  x = np.zeros((1, n, n, c_in if key_dim is None else int(key_dim)), np.float32)
  x[0, c, c] = 1.0
  inside = np.zeros((n * s, n * s), bool)
  inside[c * s:(c + 1) * s, c * s:(c + 1) * s] = True
  # Additive terms that do not depend on the kernel (bias, noise) are taken out.
  base = np.asarray(apply(jnp.zeros((kh, kw, c_in, c_out), jnp.float32), jnp.asarray(x),
                          *args), np.float64)[0]
  share = np.zeros((kh, kw))
  for ty in range(kh):
    for tx in range(kw):
      kernel = np.zeros((kh, kw, c_in, c_out), np.float32)
      kernel[ty, tx] = 1.0
      out = np.asarray(apply(jnp.asarray(kernel), jnp.asarray(x), *args), np.float64)[0]
      if out.shape[:2] != (n * s, n * s):
        raise ValueError(f"taps 'own' for layer {name!r}: expected a {n * s}×{n * s} output "
                         f"for a {n}×{n} input (scale {s}), got {out.shape[0]}×{out.shape[1]}")
      change = np.abs(out - base).sum(-1)
      total = float(change.sum())
      share[ty, tx] = float(change[inside].sum()) / total if total > 0 else 0.0
  best = float(share.max())
  if best <= 0.5:
    raise ValueError(f"taps 'own' for layer {name!r}: expected a kernel tap writing more "
                     f"than half of its output into the key's own {s}×{s} output cell, got "
                     f"at most {best:.3f} of it")
  # Float noise aside, shares of 1 are exact; taps of the same blurred footprint tie.
  return share >= best - 1e-6


def own_taps(gen: Generator, layer: str) -> np.ndarray:
  """The kernel taps through which a key writes its own output cell (see :func:`tap_mask`).

  For a stride-2 4×4 transposed convolution (padding 1) these are the central 2×2 taps;
  for a stride-1 'same' convolution of odd size (e.g. StyleGAN2's modulated 3×3), the
  centre tap. An insert with ``taps="own"`` edits only these, so a key that matches the
  context changes only its own cell. For a layer that blurs after up-sampling
  (StyleGAN2's up-sampling modulated 3×3: 56 % of the centre tap's output lands in the
  key's 2×2 cell, 25–38 % of the others') they are the taps most centred on the cell, and
  the change spreads to the neighbouring cells only through the blur.

  Args:
    gen: the generator.
    layer: the layer's name.

  Returns:
    (kh, kw) bool mask over the kernel's taps.

  Raises:
    ValueError: a layer without a (kh, kw, C_in, C_out) kernel, or none of whose taps
      writes more than half of its output into the key's own cell.

  Example:
    >>> from flax import nnx
    >>> from memedit.generators.generator import Generator
    >>> class Toy(nnx.Module):
    ...   def __init__(self):
    ...     self.up = nnx.ConvTranspose(3, 2, (4, 4), strides=(2, 2), rngs=nnx.Rngs(0))
    ...   def __call__(self, z):
    ...     return self.up(z.reshape(-1, 2, 2, 3))
    >>> int(own_taps(Generator(Toy(), 12, 4, {"up": ("up",)}), "up").sum())
    4
  """
  info = layer_info(gen, layer)
  if info.kind != "conv" or len(info.kernel_shape) != 4:
    raise ValueError(f"taps 'own' for layer {layer!r}: expected a convolution kernel "
                     f"(kh, kw, C_in, C_out), got a {info.kind} kernel of shape "
                     f"{info.kernel_shape}")
  extra = tuple(jnp.asarray(e) for e in run_layer(gen, layer, gen.latents([0])).extra)
  f = layer_on_crop(gen, layer)
  probe = cached_program(("taps", f), lambda: jax.jit(lambda k, x, p, *e: f(k, (x, p, e))))
  return tap_mask(probe, info.kernel_shape, info.scale, (layer_params(gen, layer),) + extra,
                  layer, info.key_dim)
