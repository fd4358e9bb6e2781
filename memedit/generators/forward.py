"""Compiled forward passes of a generator: images, and one layer observed (or pasted into).

Every program takes the model's parameters as an argument and is cached under
:func:`memedit.generators.structure_key` (no parameters), so every parameter set of a
model (an edited copy, a second checkpoint of the same architecture) reuses it; latents
are batched and each batch is padded to a power of two so that few shapes compile.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from memedit.generators._checks import check_batch_size
from memedit.generators.generator import (Generator, check_model_output, layer_view,
                                          structure_key)
from memedit.layers import hooks as layer_hooks
from memedit.layers.model import as_model, merge
from memedit.layers.view import MemoryView

__all__ = ["LayerRun", "cached_program", "generate_images", "keys_fn", "pass_program",
           "run_layer"]


class LayerRun(NamedTuple):
  """One forward pass with the layer observed.

  Attributes:
    images: (N, R, R, C) images (None where not asked for).
    keys: (N, h, h, C_in) the layer's input (its keys).
    values: (N, s·h, s·h, C_out) the layer's output before any replacement.
    extra: tuple of the layer's further call arguments (e.g. the style (N, C_in)).
  """

  images: Any
  keys: Any
  values: Any
  extra: tuple


_PROGRAMS: dict = {}


def _shape_only(view: MemoryView) -> MemoryView:
  """The view with its copy of the layer's parameters replaced by their shapes, so that a
  cached program built from it keeps no parameters alive."""
  definition, params = view.layer
  shapes = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), params)
  return dataclasses.replace(view, layer=(definition, shapes))


def cached_program(key: Any, build: Callable[[], Callable]) -> Callable:
  """The compiled program cached under ``key``, built by ``build()`` on first use.

  ``key`` describes the program's structure (model definition, layer, static settings)
  and holds no parameters: programs take them as arguments, so one cached program serves
  every parameter set. ``key=None`` (an unhashable structure) builds a fresh program.

  Args:
    key: a hashable description of the program, or None.
    build: returns the (jitted) program.

  Returns:
    The program.

  Example:
    >>> import jax
    >>> f = cached_program(("doc-square",), lambda: jax.jit(lambda x: x * x))
    >>> f is cached_program(("doc-square",), lambda: None), int(f(3))
    (True, 9)
  """
  if key is None:
    return build()
  if key not in _PROGRAMS:
    _PROGRAMS[key] = build()
  return _PROGRAMS[key]


def pass_program(gen: Generator, layer: str, want_images: bool = True) -> Callable:
  """The compiled forward pass :func:`run_layer` runs, shared by every parameter set of
  the model.

  Args:
    gen: the generator. layer: the layer's name.
    want_images: return the images too (else ``images`` is None and XLA drops the layers
      after the observed one).

  Returns:
    ``fn(params, z, paste_values, paste_alpha) -> LayerRun`` (jitted): the layer's output
    is replaced by ``out + α (paste_values − out)`` when ``paste_values`` is not None.

  Example:
    >>> from flax import nnx
    >>> model = nnx.Sequential(nnx.Linear(4, 12, rngs=nnx.Rngs(0)),
    ...                        lambda x: x.reshape(-1, 2, 2, 3))
    >>> gen = Generator(model, z_dim=4, resolution=2, layers={"fc": ("layers", 0)})
    >>> fn = pass_program(gen, "fc")
    >>> fn is pass_program(gen.with_params(gen.params), "fc")
    True
    >>> fn(gen.params, gen.latents(2), None, None).keys.shape
    (2, 4)
  """
  view = _shape_only(layer_view(gen, layer))
  structure = as_model((gen.definition, None))
  kwargs = dict(gen.call_kwargs)

  def build():
    def run(params, z, paste_values, paste_alpha):
      replace = None
      if paste_values is not None:
        replace = lambda out: out + paste_alpha[..., None] * (paste_values - out)
      fn = layer_hooks.forward_with_layer(structure, view, replace=replace)
      images, cap = fn(params, z, **kwargs)
      return LayerRun(images if want_images else None, cap.keys, cap.values,
                      tuple(cap.extra_args))
    return jax.jit(run)

  key = structure_key(gen, layer)
  return cached_program(None if key is None else ("pass", key, want_images), build)


def _images_fn(gen: Generator) -> Callable:
  """``fn(params, z) -> images`` (jitted, shared by every parameter set of the model)."""
  definition, kwargs = gen.definition, dict(gen.call_kwargs)
  nnx_model = gen.framework == "nnx"

  def build():
    def run(params, z):
      if nnx_model:
        return merge(definition, params)(z, **kwargs)
      return definition.apply(params, z, **kwargs)
    return jax.jit(run)

  key = (gen.framework, gen.definition, gen.call_kwargs)
  try:
    hash(key)
  except TypeError:
    key = None
  return cached_program(None if key is None else ("images", key), build)


def _batches(z: np.ndarray, batch_size: int, *extra):
  """(slices, padded arrays) over batches of at most ``batch_size`` latents, each padded
  to a power of two so that few shapes compile."""
  for i in range(0, len(z), batch_size):
    n = len(z[i:i + batch_size])
    size = min(batch_size, 1 << max(n - 1, 0).bit_length())
    pad = lambda a: None if a is None else jnp.asarray(np.concatenate(
        [a[i:i + batch_size], np.zeros((size - n,) + a.shape[1:], a.dtype)]))
    yield n, [pad(a) for a in (z,) + extra]


def _check_z(gen: Generator, z) -> np.ndarray:
  z = np.asarray(z, np.float32)
  if z.ndim != 2 or z.shape[1] != gen.z_dim:
    raise ValueError(f"z: expected shape (N, {gen.z_dim}), got {z.shape}")
  return z


def _no_rows(fn: Callable, *args) -> Any:
  """What ``fn`` gives for zero latents: numpy arrays with 0 rows and the shapes and dtypes
  of ``fn(*args)``'s other axes (``args`` hold one row each; a shape-only trace, nothing
  runs)."""
  shapes = jax.eval_shape(fn, *args)
  return jax.tree_util.tree_map(lambda a: np.zeros((0,) + tuple(a.shape[1:]), a.dtype), shapes)


def _one_row(a: Any) -> Any:
  """A row of zeros shaped as one row of ``a`` (None stays None)."""
  return None if a is None else jnp.zeros((1,) + a.shape[1:], a.dtype)


def run_layer(gen: Generator, layer: str, z: Any, *, params: Any = None,
              paste_values: Any = None, paste_alpha: Any = None,
              batch_size: int = 64) -> LayerRun:
  """Runs the generator on ``z``, observing layer ``layer`` (and optionally pasting).

  Args:
    gen: the generator.
    layer: layer name.
    z: latents (N, z_dim).
    params: parameters to use instead of ``gen.params`` (e.g. edited ones).
    paste_values: optional (N, s·h, s·h, C_out) values written into the layer's output,
      out ← out + α (paste_values − out), with α = ``paste_alpha`` (N, s·h, s·h); the
      model goes on from the pasted values.
    batch_size: latents per compiled call, a positive int.

  Returns:
    :class:`LayerRun` of numpy arrays; ``values`` are the layer's own outputs (before the
    paste), ``images`` the images after it. Zero latents (``z`` of shape ``(0, z_dim)``)
    give arrays with 0 rows (their other axes from a shape-only trace; nothing runs).

  Raises:
    ValueError: ``z`` not ``(N, z_dim)``; ``batch_size`` not a positive int; only one of
      ``paste_values`` and ``paste_alpha``.

  Example:
    >>> from flax import nnx
    >>> class Toy(nnx.Module):
    ...   def __init__(self):
    ...     self.up = nnx.ConvTranspose(3, 2, (4, 4), strides=(2, 2), rngs=nnx.Rngs(0))
    ...   def __call__(self, z):
    ...     return self.up(z.reshape(-1, 2, 2, 3))
    >>> gen = Generator(Toy(), 12, 4, {"up": ("up",)})
    >>> run = run_layer(gen, "up", gen.latents(3))
    >>> run.images.shape, run.keys.shape, run.values.shape
    ((3, 4, 4, 2), (3, 2, 2, 3), (3, 4, 4, 2))
  """
  z = _check_z(gen, z)
  batch_size = check_batch_size(batch_size)
  params = gen.params if params is None else params
  pv = None if paste_values is None else np.asarray(paste_values, np.float32)
  pa = None if paste_alpha is None else np.asarray(paste_alpha, np.float32)
  if (pv is None) != (pa is None):
    raise ValueError("paste_values, paste_alpha: expected both or neither, got one")
  fn = pass_program(gen, layer, True)
  if not len(z):
    return _no_rows(fn, params, *(_one_row(a) for a in (z, pv, pa)))
  outs = []
  for n, (zb, pvb, pab) in _batches(z, batch_size, pv, pa):
    out = fn(params, zb, pvb, pab)
    outs.append(jax.tree_util.tree_map(lambda a: np.asarray(a)[:n], out))
  return jax.tree_util.tree_map(lambda *a: np.concatenate(a), *outs)


def generate_images(gen: Generator, z: Any, *, params: Any = None, batch_size: int = 64
                    ) -> np.ndarray:
  """Images of latents ``z`` with ``params`` (default: the generator's).

  Args:
    gen: the generator. z: (N, z_dim) latents, N >= 0.
    params: parameters to use instead of ``gen.params``.
    batch_size: latents per compiled call, a positive int.

  Returns:
    (N, R, R, C) numpy images. No latents (``z`` of shape ``(0, z_dim)``, e.g.
    ``gen.latents([])``) give an empty ``(0, R, R, C)`` batch of the model's output dtype,
    as slicing a batch would (its shape from a shape-only trace; nothing runs).

  Raises:
    ValueError: ``z`` not of shape ``(N, z_dim)``; ``batch_size`` not a positive int
      (a bool, a float, zero or a negative number); a model whose output is not an
      image batch (N, R, R, C) (:func:`memedit.generators.generator.check_model_output`).

  Example:
    >>> from flax import nnx
    >>> model = nnx.Sequential(nnx.Linear(4, 12, rngs=nnx.Rngs(0)),
    ...                        lambda x: x.reshape(-1, 2, 2, 3))
    >>> gen = Generator(model, z_dim=4, resolution=2, layers={"fc": ("layers", 0)})
    >>> generate_images(gen, gen.latents(5)).shape, generate_images(gen, gen.latents(0)).shape
    ((5, 2, 2, 3), (0, 2, 2, 3))
  """
  z = _check_z(gen, z)
  batch_size = check_batch_size(batch_size)
  params = gen.params if params is None else params
  fn = _images_fn(gen)
  if not len(z):
    out = _no_rows(fn, params, _one_row(z))
    check_model_output(gen, out)
    return out
  outs = []
  for n, (zb,) in _batches(z, batch_size):
    out = fn(params, zb)
    check_model_output(gen, out)
    outs.append(np.asarray(out)[:n])
  return np.concatenate(outs)


def keys_fn(gen: Generator, layer: str) -> Callable:
  """The compiled function giving the layer's keys, shared by every parameter set of the
  model (the model runs only up to the layer).

  Args:
    gen: the generator. layer: the layer's name.

  Returns:
    ``fn(params, z) -> keys (N, h, h, C_in)`` (jitted).

  Example:
    >>> from flax import nnx
    >>> model = nnx.Sequential(nnx.Linear(4, 12, rngs=nnx.Rngs(0)),
    ...                        lambda x: x.reshape(-1, 2, 2, 3))
    >>> gen = Generator(model, z_dim=4, resolution=2, layers={"fc": ("layers", 0)})
    >>> keys_fn(gen, "fc")(gen.params, gen.latents(3)).shape
    (3, 4)
  """
  view = _shape_only(layer_view(gen, layer))
  structure = as_model((gen.definition, None))
  kwargs = dict(gen.call_kwargs)

  def build():
    fn = layer_hooks.forward_to_layer(structure, view)
    return jax.jit(lambda params, z: fn(params, z, **kwargs))

  key = structure_key(gen, layer)
  return cached_program(None if key is None else ("keys", key), build)
