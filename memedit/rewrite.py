"""The copy–paste–context rewriting workflow on a generator (Bau et al. 2020, §4).

A generator is a Flax Linen ``(module, variables)`` pair mapping latents ``z (N, z_dim)``
to NHWC images at a square canvas resolution R, together with a deterministic latent
sample (image number i → the i-th row of ``RandomState(seed).standard_normal``). One
layer is edited: a convolution-like layer whose first call argument is its per-pixel key
map ``k (N, h, h, C_in)`` (further arguments, e.g. StyleGAN2's style, are kept) and whose
output is the value map ``v (N, s·h, s·h, C_out)`` (s = 1 or 2), with an HWIO kernel
``(kh, kw, C_in, C_out)`` edited per tap (``kind="conv"``).

The workflow:

1. **Context.** Masks on a few images select context keys; with C = E[k kᵀ] they give
   the edit subspace D (r × C_in) by :func:`memedit.context_directions` (zca, svd, mean;
   optionally with C shrunk to (1 − α) C + α (tr C / C_in) I) or unit selection (the r
   units of largest normalised activation in the masks).
2. **Copy.** The values inside the bounding box of an object mask on image A.
3. **Paste.** Those values, alpha-blended by the paste mask at the target location of
   image B, give v*. Only the tight crop around the paste is optimised; its keys k* are
   the layer inputs of image B there.
4. **Insert.** Λ = argmin ‖v* − f(k*; W0 + ΔK(Λ, D))‖₁ with the layer's own f, by
   :func:`memedit.solve_lambda`; the edit is a :class:`memedit.Edit`.
   :func:`projected_insert` runs the reference's default procedure instead: Adam on
   the whole kernel, its change projected onto span(D) every 10 steps.

``erase`` instead targets the layer's output with the r most active context units zeroed;
``unit_zeroing_edit`` and ``overfit`` are the paper's baselines; :func:`match_scores`,
:func:`heatmaps` and :func:`rank_by_match` are the query tools.

Masks are float arrays (R, R) in [0, 1] at canvas resolution; they are area-averaged to a
layer's key or value resolution.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from memedit import _io
from memedit.covariance import CovarianceState, covariance_cache_key, stream_covariance
from memedit.directions import context_directions
from memedit.edits import (Edit, EditHistory, apply_edit, edit_delta, get_leaf, make_edit,
                           revert_edit)
from memedit.layers.hooks import linen_layer_variables
from memedit.solve import LOSSES, solve_lambda
from memedit.specs import METHODS, TAPS, check_shrinkage
_MARGIN = 2  # input pixels of context around a crop: exact outputs for kernels up to 5x5


# ----------------------------------------------------------------------------------------
# Generators.


@dataclasses.dataclass(frozen=True, eq=False)
class Generator:
  """A Linen generator with the editable layers and latent sample the workflow needs.

  Attributes:
    module: the Linen module; ``module.apply(variables, z, **call_kwargs)`` gives images
      (N, R, R, C) in roughly [-1, 1].
    variables: its variables (a nested dict).
    z_dim: latent size.
    resolution: canvas resolution R.
    layers: dict name → Linen module path of each editable layer (e.g. ``{'convt2':
      ('convt2',)}``); the layer's kernel leaf is ``('params', *path, 'kernel')``.
    call_kwargs: keyword arguments of every ``apply`` (e.g. ``truncation``), as a tuple
      of (name, value) pairs.
    seed: seed of the latent sample.
    architecture: free-text name of the architecture.
  """

  module: nn.Module
  variables: Any
  z_dim: int
  resolution: int
  layers: dict
  call_kwargs: tuple = ()
  seed: int = 1
  architecture: str = ""

  def latents(self, imgnums: Sequence[int] | int) -> np.ndarray:
    """Latents of image numbers: row i of ``RandomState(seed).standard_normal((n, z_dim))``.

    Args:
      imgnums: an int n (images 0..n-1) or a sequence of image numbers.

    Returns:
      (len(imgnums), z_dim) float32.
    """
    nums = np.arange(imgnums) if isinstance(imgnums, (int, np.integer)) else np.asarray(
        imgnums, np.int64).reshape(-1)
    if nums.size and nums.min() < 0:
      raise ValueError(f"imgnums: expected non-negative image numbers, got {nums.min()}")
    n = int(nums.max()) + 1 if nums.size else 0
    rs = np.random.RandomState(self.seed)
    z = rs.standard_normal(n * self.z_dim).reshape(n, self.z_dim).astype(np.float32)
    return z[nums]

  def layer_path(self, name: str) -> tuple:
    """The Linen module path of layer ``name``; ValueError naming the known layers."""
    if name not in self.layers:
      raise ValueError(f"layer: expected one of {sorted(self.layers)}, got {name!r}")
    return tuple(self.layers[name])

  def weight_path(self, name: str) -> tuple:
    """Path of the layer's kernel leaf in ``variables``."""
    return ("params",) + self.layer_path(name) + ("kernel",)

  def with_variables(self, variables: Any) -> "Generator":
    """The same generator with other variables (e.g. an edited copy)."""
    return dataclasses.replace(self, variables=variables)


def generator_from_converted(path, *, truncation: float | None = None) -> Generator:
  """Opens a checkpoint converted by ``memedit convert`` (DCGAN or StyleGAN2).

  DCGAN layers are ``convt1`` .. ``convt4`` (ConvTranspose, keys at 4..32 px); StyleGAN2
  layers are ``conv_0`` .. (the modulated convolutions' memories in the reference's
  numbering; keys x·s). ``truncation`` applies to StyleGAN2 (default 1).
  """
  import ports

  module, variables, config = ports.load_converted(path)
  variables = jax.tree_util.tree_map(jnp.asarray, variables)
  return generator_from_config(module, variables, config, truncation=truncation)


def generator_from_config(module, variables, config: dict, *,
                          truncation: float | None = None) -> Generator:
  """A :class:`Generator` for a ported module and its conversion config."""
  arch = config.get("architecture")
  if arch == "dcgan":
    layers = {f"convt{i}": (f"convt{i}",) for i in range(1, int(config["num_layers"]))}
    return Generator(module, variables, int(config["z_dim"]), int(config["resolution"]),
                     layers, (), 1, "dcgan")
  if arch == "stylegan2":
    layers = {f"conv_{i}": ("synthesis", f"conv_{i}", "memory")
              for i in range(int(config["num_layers"]))}
    kw = (("truncation", float(1.0 if truncation is None else truncation)),)
    return Generator(module, variables, int(config["z_dim"]), int(config["resolution"]),
                     layers, kw, 1, "stylegan2")
  raise ValueError(f"architecture: expected 'dcgan' or 'stylegan2', got {arch!r}")


# ----------------------------------------------------------------------------------------
# Forward passes with the layer observed (and optionally its output replaced).


class LayerRun(NamedTuple):
  """One forward pass with the layer observed.

  Attributes:
    images: (N, R, R, C) images.
    keys: (N, h, h, C_in) the layer's input (its keys).
    values: (N, s·h, s·h, C_out) the layer's output before any replacement.
    extra: tuple of the layer's further call arguments (e.g. the style (N, C_in)).
  """

  images: jax.Array
  keys: jax.Array
  values: jax.Array
  extra: tuple


class _Holder:
  definition = None
  run = None


@functools.lru_cache(maxsize=64)
def _forward_fn(module, call_kwargs, path, want_images: bool):
  kwargs = dict(call_kwargs)

  def fwd(variables, z, paste_values, paste_alpha):
    rec = {}

    def interceptor(next_fun, args, kw, ctx):
      if ctx.method_name != "__call__" or tuple(ctx.module.path) != path:
        return next_fun(*args, **kw)
      out = next_fun(*args, **kw)
      rec["keys"], rec["extra"], rec["values"] = args[0], tuple(args[1:]), out
      if paste_values is not None:
        out = out + paste_alpha[..., None] * (paste_values - out)
      return out

    with nn.intercept_methods(interceptor):
      images = module.apply(variables, z, **kwargs)
    if "keys" not in rec:
      raise ValueError(f"layer {path!r}: expected the generator to call it, but it was not "
                       "called")
    return LayerRun(images if want_images else None, rec["keys"], rec["values"],
                    rec["extra"])

  return jax.jit(fwd)


def run_layer(gen: Generator, layer: str, z: Any, *, variables: Any = None,
              paste_values: Any = None, paste_alpha: Any = None,
              batch_size: int = 64) -> LayerRun:
  """Runs the generator on ``z`` (N, z_dim), observing layer ``layer``.

  Args:
    gen: the generator.
    layer: layer name.
    z: latents (N, z_dim).
    variables: variables to use instead of ``gen.variables`` (e.g. edited ones).
    paste_values: optional (N, s·h, s·h, C_out) values written into the layer's output,
      out ← out + α (paste_values − out), with α = ``paste_alpha`` (N, s·h, s·h).
    batch_size: latents per compiled call.

  Returns:
    :class:`LayerRun` with numpy arrays.
  """
  path = gen.layer_path(layer)
  variables = gen.variables if variables is None else variables
  z = np.asarray(z, np.float32)
  if z.ndim != 2 or z.shape[1] != gen.z_dim:
    raise ValueError(f"z: expected shape (N, {gen.z_dim}), got {z.shape}")
  fn = _forward_fn(gen.module, gen.call_kwargs, path, True)
  outs = []
  for i in range(0, len(z), batch_size):
    zb = z[i:i + batch_size]
    n = len(zb)
    # Pad batches to a power of two (at most batch_size) so that few shapes compile.
    size = min(batch_size, 1 << max(n - 1, 0).bit_length())
    pad = lambda a: None if a is None else jnp.asarray(
        np.concatenate([a, np.zeros((size - n,) + a.shape[1:], a.dtype)]))
    pv = None if paste_values is None else pad(np.asarray(paste_values[i:i + batch_size],
                                                          np.float32))
    pa = None if paste_alpha is None else pad(np.asarray(paste_alpha[i:i + batch_size],
                                                         np.float32))
    out = fn(variables, pad(zb), pv, pa)
    outs.append(jax.tree_util.tree_map(lambda a: np.asarray(a)[:n], out))
  return jax.tree_util.tree_map(lambda *a: np.concatenate(a), *outs)


def generate(gen: Generator, z: Any, *, variables: Any = None, batch_size: int = 64
             ) -> np.ndarray:
  """Images (N, R, R, C) of latents ``z`` with ``variables`` (default: the generator's)."""
  name = next(iter(gen.layers))
  return run_layer(gen, name, z, variables=variables, batch_size=batch_size).images


@functools.lru_cache(maxsize=64)
def _layer_definition(module, call_kwargs, path, z_dim):
  holder = _Holder()
  kwargs = dict(call_kwargs)

  def interceptor(next_fun, args, kw, ctx):
    if ctx.method_name == "__call__" and tuple(ctx.module.path) == path:
      if holder.definition is None:
        holder.definition = ctx.module.clone(parent=None)
    return next_fun(*args, **kw)

  def fwd(variables, z):
    with nn.intercept_methods(interceptor):
      return module.apply(variables, z, **kwargs)

  return holder, fwd


class LayerInfo(NamedTuple):
  """Geometry of an editable layer.

  Attributes:
    name: layer name. path: Linen module path. weight_path: path of the kernel leaf.
    definition: the layer's unbound Linen module (runs alone with its own variables).
    key_res: h, the key map's size. value_res: s·h. scale: s.
    key_dim: C_in. value_dim: C_out. kernel_shape: the HWIO kernel's shape.
  """

  name: str
  path: tuple
  weight_path: tuple
  definition: Any
  key_res: int
  value_res: int
  scale: int
  key_dim: int
  value_dim: int
  kernel_shape: tuple


def layer_info(gen: Generator, layer: str) -> LayerInfo:
  """The geometry of layer ``layer`` (traced abstractly, no compute)."""
  path = gen.layer_path(layer)
  holder, fwd = _layer_definition(gen.module, gen.call_kwargs, path, gen.z_dim)
  if holder.definition is None:
    z = jax.ShapeDtypeStruct((1, gen.z_dim), jnp.float32)
    jax.eval_shape(fwd, gen.variables, z)
    holder.run = jax.eval_shape(_forward_fn(gen.module, gen.call_kwargs, path, False),
                                gen.variables, z, None, None)
  run = holder.run
  kshape = tuple(np.shape(get_leaf(gen.variables, gen.weight_path(layer))))
  if len(kshape) != 4:
    raise ValueError(f"layer {layer!r}: expected an HWIO kernel (kh, kw, C_in, C_out), got "
                     f"shape {kshape}")
  h, vh = int(run.keys.shape[1]), int(run.values.shape[1])
  if vh % h or run.keys.shape[1] != run.keys.shape[2]:
    raise ValueError(f"layer {layer!r}: expected square key maps and an output resolution "
                     f"that is a multiple of the input's, got keys {run.keys.shape} and "
                     f"values {run.values.shape}")
  return LayerInfo(layer, path, gen.weight_path(layer), holder.definition, h, vh, vh // h,
                   int(run.keys.shape[-1]), int(run.values.shape[-1]), kshape)


@functools.lru_cache(maxsize=128)
def crop_fn(definition, scale: int, margin: int, out_h: int, out_w: int) -> Callable:
  """f(kernel, (keys_crop, layer_variables, extra)) → the layer's output on a crop.

  ``keys_crop`` (N, h + 2·margin, w + 2·margin, C_in) holds the crop's keys with
  ``margin`` pixels of context around it (zeros outside the image); the output is cut to
  the crop's own (N, out_h, out_w, C_out), which equals the whole layer's output there.
  Cached, so repeated solves with the same geometry reuse one compiled program.
  """
  lo = scale * margin

  def f(kernel, keys):
    x, layer_vars, extra = keys
    params = dict(layer_vars.get("params", {}))
    params["kernel"] = kernel
    v = dict(layer_vars)
    v["params"] = params
    out = definition.apply(v, x, *extra)
    return out[:, lo:lo + out_h, lo:lo + out_w]

  return f


# ----------------------------------------------------------------------------------------
# Masks and geometry.


def downsample_mask(mask: Any, res: int) -> np.ndarray:
  """Area-average a (R, R) (or (N, R, R)) canvas mask to (res, res); R must divide evenly
  (or be a divisor, then the mask is repeated)."""
  m = np.asarray(mask, np.float32)
  R = m.shape[-1]
  if m.shape[-2] != R:
    raise ValueError(f"mask: expected a square mask, got shape {m.shape}")
  if R % res == 0:
    f = R // res
    return m.reshape(m.shape[:-2] + (res, f, res, f)).mean(axis=(-3, -1))
  if res % R == 0:
    f = res // R
    return np.repeat(np.repeat(m, f, axis=-2), f, axis=-1)
  raise ValueError(f"mask: expected a resolution dividing or divisible by {res}, got {R}")


def bbox(mask: Any) -> tuple[int, int, int, int]:
  """(y0, y1, x0, x1), the tight half-open bounding box of ``mask > 0``."""
  m = np.asarray(mask) > 0
  if not m.any():
    raise ValueError("mask: expected a non-empty mask, got one with no positive pixel")
  ys, xs = np.nonzero(m)
  return int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1


class Copied(NamedTuple):
  """Values copied from an object region.

  Attributes:
    values: (H, W, C_out) layer output inside the object's bounding box (value res).
    alpha: (H, W) the object mask there.
    box: (y0, y1, x0, x1) at value resolution.
    mean_value: (C_out,) the mask-weighted mean of the copied values.
  """

  values: np.ndarray
  alpha: np.ndarray
  box: tuple
  mean_value: np.ndarray


def copy_values(gen: Generator, layer: str, imgnum: int, mask: Any) -> Copied:
  """Copy: the layer's output values of image ``imgnum`` inside the object mask's box."""
  info = layer_info(gen, layer)
  run = run_layer(gen, layer, gen.latents([imgnum]))
  m = downsample_mask(mask, info.value_res)
  y0, y1, x0, x1 = bbox(m)
  vals = run.values[0, y0:y1, x0:x1]
  a = m[y0:y1, x0:x1]
  mean = (vals * a[..., None]).sum((0, 1)) / max(float(a.sum()), 1e-12)
  return Copied(vals, a, (y0, y1, x0, x1), mean)


class Target(NamedTuple):
  """The optimisation problem of one paste.

  Attributes:
    imgnum: image B.
    keys: (1, h + 2m, w + 2m, C_in) keys of the crop with a margin of context.
    extra: the layer's further arguments for image B.
    targets: (1, s·h, s·w, C_out) target values v* on the crop.
    original: (1, s·h, s·w, C_out) the unedited values on the crop.
    alpha: (1, s·h, s·w) the paste weight on the crop.
    key_box: (y0, y1, x0, x1) of the crop at key resolution.
    full_values: (1, H, H, C_out) B's target value map (pasted), for rendering.
    full_alpha: (1, H, H) the paste alpha over the whole value map.
  """

  imgnum: int
  keys: np.ndarray
  extra: tuple
  targets: np.ndarray
  original: np.ndarray
  alpha: np.ndarray
  key_box: tuple
  full_values: np.ndarray
  full_alpha: np.ndarray


def _key_box(box, scale, key_res):
  y0, y1, x0, x1 = box
  return (y0 // scale, min(-(-y1 // scale), key_res), x0 // scale, min(-(-x1 // scale), key_res))


def _crop_keys(keys, key_box, margin):
  y0, y1, x0, x1 = key_box
  padded = np.pad(keys, ((0, 0), (margin, margin), (margin, margin), (0, 0)))
  return padded[:, y0:y1 + 2 * margin, x0:x1 + 2 * margin]


def paste_target(gen: Generator, layer: str, copied: Copied, imgnum: int, mask: Any
                 ) -> Target:
  """Paste: the copied values placed at the paste mask's box (centres aligned), blended by
  the paste mask (α), over image ``imgnum``'s own values; cropped tightly."""
  info = layer_info(gen, layer)
  run = run_layer(gen, layer, gen.latents([imgnum]))
  H = info.value_res
  pm = downsample_mask(mask, H)
  py0, py1, px0, px1 = bbox(pm)
  oy0, oy1, ox0, ox1 = copied.box
  dy = int(round((py0 + py1) / 2 - (oy0 + oy1) / 2))
  dx = int(round((px0 + px1) / 2 - (ox0 + ox1) / 2))
  shifted = np.zeros((H, H, info.value_dim), np.float32)
  inside = np.zeros((H, H), np.float32)
  for yy in range(oy1 - oy0):
    y = oy0 + yy + dy
    if not 0 <= y < H:
      continue
    for xx in range(ox1 - ox0):
      x = ox0 + xx + dx
      if 0 <= x < H:
        shifted[y, x] = copied.values[yy, xx]
        inside[y, x] = 1.0
  alpha = pm * inside
  if not (alpha > 0).any():
    raise ValueError("paste: the paste mask does not overlap the copied object's box")
  values = run.values[0]
  full = values + alpha[..., None] * (shifted - values)
  return _target_from(gen, info, run, imgnum, full, alpha)


def _target_from(gen, info, run, imgnum, full, alpha) -> Target:
  s = info.scale
  kbox = _key_box(bbox(alpha), s, info.key_res)
  y0, y1, x0, x1 = kbox
  oy, ox = slice(s * y0, s * y1), slice(s * x0, s * x1)
  keys = _crop_keys(run.keys, kbox, _MARGIN)
  return Target(imgnum, keys, run.extra, full[None, oy, ox], run.values[:, oy, ox],
                alpha[None, oy, ox], kbox, full[None], alpha[None])


def erase_target(gen: Generator, layer: str, imgnum: int, mask: Any, units: Sequence[int]
                 ) -> Target:
  """Erase: the layer's output with ``units`` of its keys zeroed, as the target inside the
  mask (blended by it) on image ``imgnum``."""
  info = layer_info(gen, layer)
  run = run_layer(gen, layer, gen.latents([imgnum]))
  units = np.asarray(units, np.int64)
  zeroed = np.array(run.keys)
  zeroed[..., units] = 0.0
  f = crop_fn(info.definition, info.scale, 0, info.value_res, info.value_res)
  layer_vars = linen_layer_variables(gen.variables, info.path)
  out = np.asarray(f(get_leaf(gen.variables, info.weight_path),
                     (jnp.asarray(zeroed), layer_vars, run.extra)))[0]
  alpha = downsample_mask(mask, info.value_res)
  bbox(alpha)
  full = run.values[0] + alpha[..., None] * (out - run.values[0])
  return _target_from(gen, info, run, imgnum, full, alpha)


# ----------------------------------------------------------------------------------------
# Statistics and context.


@functools.lru_cache(maxsize=16)
def _layer_keys(module, call_kwargs, path):
  """``keys_of(variables, z)``: the layer's keys; one function per generator structure and
  layer, so compiled programs taking the variables as an argument are shared by every
  parameter set of the generator."""
  fn = _forward_fn(module, call_kwargs, path, False)
  return lambda variables, z: fn(variables, z, None, None).keys


def _keys_of(gen: Generator, layer: str):
  key = (gen.module, gen.call_kwargs, gen.layer_path(layer))
  try:
    hash(key)
  except TypeError:  # a module with array attributes: not shared
    return _layer_keys.__wrapped__(*key)
  return _layer_keys(*key)


def _keys_fn(gen: Generator, layer: str):
  keys_of = _keys_of(gen, layer)
  return lambda z: keys_of(gen.variables, z)


def statistics_cache_key(gen: Generator, layer: str, num_samples: int, batch_size: int
                         ) -> str:
  """Cache key of a layer's statistics: content hash of the variables, the layer, the
  latent sample and the key dtype."""
  content = _io.tree_hash(gen.variables) + "/" + "/".join(gen.weight_path(layer))
  spec = {"num_samples": int(num_samples), "batch_size": int(batch_size), "seed": gen.seed,
          "call_kwargs": [list(kv) for kv in gen.call_kwargs], "z_dim": gen.z_dim}
  return covariance_cache_key(content, spec, jnp.float32)


def collect_statistics(gen: Generator, layer: str, num_samples: int = 1000, *,
                       batch_size: int = 50, cache_dir=None, progress: bool = True,
                       group: int = 4) -> CovarianceState:
  """Streams images 0..num_samples-1 through the generator and folds the layer's keys.

  The last batch holds the remainder when ``batch_size`` does not divide
  ``num_samples`` (it is folded exactly, padded with zero-weight rows). Under
  ``jax.distributed`` each process runs every ``jax.process_count()``-th batch and all
  processes end with the statistics of all ``num_samples`` images.

  With ``cache_dir`` the state is cached under a content-hash key and saved after every
  group of batches: an interrupted run resumes from its last save without recomputing
  those batches, and a finished one is read back.

  Returns:
    The :class:`memedit.CovarianceState`; C = ``memedit.second_moment(state)``.
  """
  for name, value in (("num_samples", num_samples), ("batch_size", batch_size)):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
      raise ValueError(f"{name}: expected a positive int, got {value!r}")
  z = gen.latents(int(num_samples))
  batches = [z[i:i + batch_size] for i in range(0, int(num_samples), batch_size)]
  batches = batches[jax.process_index()::jax.process_count()]
  key = None
  if cache_dir is not None:
    key = statistics_cache_key(gen, layer, num_samples, batch_size)
  return stream_covariance(batches, key_fn=_keys_of(gen, layer), params=gen.variables,
                           group=group, progress=progress, cache_dir=cache_dir,
                           cache_key=key, devices=1)


def context_keys(gen: Generator, layer: str, examples: Sequence[tuple[int, Any]]
                 ) -> tuple[np.ndarray, np.ndarray]:
  """Keys and mask weights of context examples [(imgnum, canvas mask), ...].

  Returns:
    (keys (n·h·h, C_in), weights (n·h·h,)) with weights the masks area-averaged to the key
    resolution.
  """
  if not examples:
    raise ValueError("key: expected at least one context example, got none")
  info = layer_info(gen, layer)
  nums = [int(i) for i, _ in examples]
  run = run_layer(gen, layer, gen.latents(nums))
  w = np.stack([downsample_mask(m, info.key_res) for _, m in examples])
  return run.keys.reshape(-1, info.key_dim), w.reshape(-1)


def unit_scores(C: Any, keys: Any, weights: Any) -> np.ndarray:
  """Normalised unit activation in the context: Σ w k_u / Σ w / √C_uu, per unit u."""
  k = np.asarray(keys, np.float64)
  w = np.asarray(weights, np.float64)
  mean = (w[:, None] * k).sum(0) / max(w.sum(), 1e-12)
  return mean / np.sqrt(np.maximum(np.diag(np.asarray(C, np.float64)), 1e-12))


def top_units(C: Any, keys: Any, weights: Any, r: int) -> np.ndarray:
  """The ``r`` units with the largest normalised activation in the context."""
  s = unit_scores(C, keys, weights)
  if not 1 <= r <= s.size:
    raise ValueError(f"units: expected 1..{s.size}, got {r}")
  return np.argsort(-s, kind="stable")[:r]


def directions(C: Any, keys: Any, weights: Any, *, rank: int = 1, method: str = "zca",
               shrinkage: float = 0.0) -> np.ndarray:
  """The edit subspace D (rank, C_in): :func:`memedit.context_directions` for "zca",
  "svd", "mean"; one-hot rows of the top units for "unit".

  ``shrinkage`` α ∈ [0, 1) computes the zca, svd and mean directions with the shrunk
  second moment (1 − α) C + α μ I, μ = tr C / C_in, i.e. ``context_directions`` with
  ``ridge = α / (1 − α) · μ`` (the directions do not depend on C's overall scale). It
  damps the directions of C's smallest eigenvalues, where a few context keys say least
  about the keys of new images.
  """
  if method not in METHODS:
    raise ValueError(f"method: expected one of {METHODS}, got {method!r}")
  shrinkage = check_shrinkage(shrinkage, method)
  if method == "unit":
    units = top_units(C, keys, weights, rank)
    D = np.zeros((rank, np.shape(C)[0]), np.float32)
    D[np.arange(rank), units] = 1.0
    return D
  ridge = 0.0
  if shrinkage > 0.0:
    mu = float(np.trace(np.asarray(C, np.float64))) / np.shape(C)[0]
    ridge = shrinkage / (1.0 - shrinkage) * mu
  return np.asarray(context_directions(C, keys, weights, rank=rank, method=method,
                                       ridge=ridge).directions)


# ----------------------------------------------------------------------------------------
# Edits.


class EditResult(NamedTuple):
  """An edit with what produced it.

  Attributes:
    edit: the :class:`memedit.Edit`.
    directions: D (r, C_in).
    target: the :class:`Target` it was solved for.
    losses: (steps,) loss before each solver step.
    loss_before: L1 loss at the crop before the edit. loss_after: after it.
  """

  edit: Edit
  directions: np.ndarray
  target: Target
  losses: np.ndarray
  loss_before: float
  loss_after: float


def _crop_loss(f, kernel, keys, target: Target) -> float:
  out = f(kernel, keys)
  return float(jnp.mean(jnp.abs(out - jnp.asarray(target.targets))))


@functools.lru_cache(maxsize=16)
def _patch_f(c_out: int) -> Callable:
  def f(kernel, keys):
    patches, bias = keys
    return jnp.einsum("nhwk,ko->nhwo", patches, kernel.reshape(-1, c_out),
                      precision=lax.Precision.HIGHEST) + bias
  return f


def crop_problem(gen: Generator, info: LayerInfo, target: Target) -> tuple[Callable, Any]:
  """(f, keys) with f(kernel, keys) the layer's output on the target's crop.

  A plain (transposed) convolution without further call arguments is linear in its
  kernel: its crop output is patches @ kernel.reshape(−1, C_out) (+ bias), so the
  patches are extracted once and every solver step is one matrix product. Any other
  layer (e.g. StyleGAN2's modulated convolution with its demodulation) runs as itself
  on the crop's keys (:func:`crop_fn`).
  """
  from memedit.layers import layer_kind

  oh, ow = target.targets.shape[1:3]
  layer_vars = linen_layer_variables(gen.variables, info.path)
  try:
    spec = layer_kind(info.definition)
  except ValueError:
    spec = None
  if spec is not None and spec.kind == "conv" and spec.patches is not None and not target.extra:
    lo = info.scale * _MARGIN
    p = spec.patches(info.definition, jnp.asarray(target.keys))[:, lo:lo + oh, lo:lo + ow]
    bias = layer_vars.get("params", {}).get("bias")
    bias = jnp.zeros((info.value_dim,), jnp.float32) if bias is None else jnp.asarray(bias)
    return _patch_f(info.value_dim), (p, bias)
  defn = info.definition
  if _is_modulated_same_conv(info) and len(target.extra) == 1:
    # A modulated convolution's memory (StyleGAN2): 'same' k×k conv of the keys x·s with
    # Ŵ = W / √(k·k·C_in), times the demodulation d(W, s) recomputed from the kernel.
    ks = int(defn.kernel_size)
    x = jnp.asarray(target.keys)
    p = lax.conv_general_dilated_patches(x, (ks, ks), (1, 1), ((ks // 2,) * 2,) * 2,
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
    c = x.shape[-1]
    p = p.reshape(p.shape[:3] + (c, ks * ks)).swapaxes(-1, -2).reshape(p.shape[:3] + (-1,))
    p = p[:, _MARGIN:_MARGIN + oh, _MARGIN:_MARGIN + ow]
    return _modconv_f(info.value_dim, bool(defn.demodulate)), (p, jnp.asarray(target.extra[0]))
  f = crop_fn(info.definition, info.scale, _MARGIN, oh, ow)
  return f, (jnp.asarray(target.keys), layer_vars, tuple(jnp.asarray(e) for e in target.extra))


def _is_modulated_same_conv(info: LayerInfo) -> bool:
  """A modulated convolution without up-sampling (StyleGAN2's memory): a 'same' k×k conv."""
  defn = info.definition
  return (getattr(defn, "up", None) is False
          and isinstance(getattr(defn, "demodulate", None), bool) and info.scale == 1)


def own_taps(gen: Generator, layer: str) -> np.ndarray:
  """The kernel taps through which a key writes its own output cell, as a (kh, kw) bool mask.

  With scale s, the key at position (i, j) owns the s×s output cell [s·i, s·i + s) ×
  [s·j, s·j + s); its other taps write into the neighbours' cells. For a stride-2 4×4
  transposed convolution (padding 1) these are the central 2×2 taps; for a stride-1 'same'
  convolution of odd size, the centre tap. An insert with ``taps="own"`` edits only these,
  so a key that matches the context changes only its own cell.

  Found by running the layer kind's patch extractor on an impulse (plain Conv and
  ConvTranspose layers); a modulated convolution without up-sampling (StyleGAN2) is a
  'same' k×k convolution, whose own tap is the centre.

  Args:
    gen: the generator.
    layer: the layer's name.

  Returns:
    (kh, kw) bool mask over the kernel's taps.

  Raises:
    ValueError: a layer without a known tap geometry, or none of whose taps stays inside
      the key's own cell.
  """
  info = layer_info(gen, layer)
  return _own_taps(info.definition, info.kernel_shape[:2], info.scale,
                   _is_modulated_same_conv(info), layer)


def _own_taps(defn, kernel_hw, scale: int, modulated_same: bool, layer: str) -> np.ndarray:
  from memedit.layers import layer_kind

  kh, kw = (int(k) for k in kernel_hw)
  try:
    spec = layer_kind(defn)
  except ValueError:
    spec = None
  if spec is not None and spec.kind == "conv" and spec.patches is not None:
    n = 2 * max(kh, kw) + 1
    c, s = n // 2, int(scale)
    x = np.zeros((1, n, n, 1), np.float32)
    x[0, c, c, 0] = 1.0
    p = np.asarray(spec.patches(defn, jnp.asarray(x)))[0]
    if p.shape[:2] != (n * s, n * s):
      raise ValueError(f"taps 'own' for layer {layer!r}: expected a {n * s}×{n * s} output "
                       f"for a {n}×{n} input (scale {s}), got {p.shape[0]}×{p.shape[1]}")
    hit = np.abs(p.reshape(n * s, n * s, kh, kw)) > 0
    inside = np.zeros((n * s, n * s), bool)
    inside[c * s:(c + 1) * s, c * s:(c + 1) * s] = True
    mask = hit.any((0, 1)) & ~(hit & ~inside[:, :, None, None]).any((0, 1))
  elif modulated_same and kh == kw and kh % 2:
    mask = np.zeros((kh, kw), bool)
    mask[kh // 2, kw // 2] = True
  else:
    raise ValueError(f"taps 'own' for layer {layer!r}: expected a Conv, ConvTranspose or "
                     f"modulated 'same' convolution, got {type(defn).__name__}")
  if not mask.any():
    raise ValueError(f"taps 'own' for layer {layer!r}: no kernel tap writes only the key's "
                     f"own {scale}×{scale} output cell")
  return mask


@functools.lru_cache(maxsize=16)
def _modconv_f(c_out: int, demodulate: bool) -> Callable:
  def f(kernel, keys):
    patches, style = keys
    kh, kw, c_in, _ = kernel.shape
    w = kernel * (1.0 / math.sqrt(kh * kw * c_in))
    out = jnp.einsum("nhwk,ko->nhwo", patches, w.reshape(-1, c_out),
                     precision=lax.Precision.HIGHEST)
    if demodulate:
      w2 = jnp.sum(jnp.square(w), axis=(0, 1))  # (C_in, C_out)
      d = lax.rsqrt(jnp.square(style) @ w2 + 1e-8)
      out = out * d[:, None, None, :]
    return out
  return f


def insert(gen: Generator, layer: str, D: Any, target: Target, *,
           optimizer: str = "adam", steps: int = 2001, learning_rate: float = 0.05,
           loss: str = "l1", taps: str = "all", method: str = "insert",
           settings: dict | None = None) -> EditResult:
  """Insert: Λ = argmin loss(f(k*; W0 + ΔK(Λ, D)), v*) over the paste crop.

  f is the layer itself applied to the crop's keys (with a margin of context), so for a
  ConvTranspose or a modulated convolution the solve goes through the layer's own
  non-linearity in W (e.g. StyleGAN2's demodulation).

  Args:
    gen, layer: the generator and layer name.
    D: (r, C_in) directions (from :func:`directions`, which is where C enters).
    target: from :func:`paste_target` or :func:`erase_target`.
    optimizer, steps, learning_rate, loss: see :func:`memedit.solve_lambda`.
    taps: "all" (the reference: every kernel tap has its own Λ) or "own" (only the taps of
      :func:`own_taps`, so that a key changes only its own output cell; Λ is zero on the
      other taps).
    method, settings: provenance stored in the edit.

  Returns:
    :class:`EditResult`.
  """
  if taps not in TAPS:
    raise ValueError(f"taps: expected one of {TAPS}, got {taps!r}")
  info = layer_info(gen, layer)
  D = jnp.asarray(D, jnp.float32)
  if D.ndim != 2 or D.shape[1] != info.key_dim:
    raise ValueError(f"directions: expected shape (r, {info.key_dim}), got {tuple(D.shape)}")
  lam_mask = None if taps == "all" else own_taps(gen, layer)[:, :, None, None]
  f, keys = crop_problem(gen, info, target)
  kernel0 = jnp.asarray(get_leaf(gen.variables, info.weight_path))
  res = solve_lambda(f, kernel0, D, keys, jnp.asarray(target.targets), kind="conv",
                     loss=loss, optimizer=optimizer, steps=int(steps),
                     learning_rate=float(learning_rate), lam_mask=lam_mask)
  bad = int(res.lam.size - jnp.isfinite(res.lam).sum())
  if bad:
    raise ValueError(f"Λ: expected finite values from the {optimizer} solve (learning_rate "
                     f"{learning_rate}, {steps} steps), got {bad} NaN or infinite of "
                     f"{res.lam.size}; no edit was made: lower the learning rate, or check "
                     "that the model, C and the target are finite")
  st = dict(settings or {})
  st.update(layer=layer, optimizer=optimizer, steps=int(steps),
            learning_rate=float(learning_rate), loss=loss, rank=int(D.shape[0]), taps=taps)
  edit = make_edit(info.weight_path, res.lam, D, kind="conv", method=method, settings=st)
  kernel1 = kernel0 + edit_delta(edit, kernel0.shape)
  return EditResult(edit, np.asarray(D), target, np.asarray(res.losses),
                    _crop_loss(f, kernel0, keys, target), _crop_loss(f, kernel1, keys, target))


@functools.lru_cache(maxsize=16)
def _projected_program(f, steps: int, project_every: int, loss: str):
  """The jitted whole-kernel Adam run of :func:`projected_insert` for one crop function
  and static schedule: (kernel0, keys, targets, X, D, lr) → (Λ, losses)."""
  n_blocks, rest = divmod(steps - 1, project_every)

  def run(kernel0, keys, targets, X, D, lr):
    opt = optax.adam(lr)

    def loss_fn(delta):
      r = f(kernel0 + delta, keys) - targets
      return jnp.mean(jnp.abs(r)) if loss == "l1" else jnp.mean(jnp.square(r))

    def step(carry, _):
      delta, st = carry
      val, g = jax.value_and_grad(loss_fn)(delta)
      upd, st = opt.update(g, st, delta)
      return (optax.apply_updates(delta, upd), st), val

    def coeffs(delta):  # Λ[y, x, o, d] = Σ_i ΔW[y, x, i, o] X[d, i]
      return jnp.einsum("yxio,di->yxod", delta, X, precision=lax.Precision.HIGHEST)

    def block(carry, n):  # n Adam steps, then ΔW ← P ΔW (the Adam moments are kept)
      (delta, st), losses = lax.scan(step, carry, None, length=n)
      lam = coeffs(delta)
      return (jnp.einsum("yxod,di->yxio", lam, D, precision=lax.Precision.HIGHEST), st), (
          losses, lam)

    d0 = jnp.zeros_like(kernel0)
    carry, (losses, lam) = block((d0, opt.init(d0)), 1)
    parts = [losses]
    if n_blocks:
      carry, (lb, lams) = lax.scan(lambda c, _: block(c, project_every), carry, None,
                                   length=n_blocks)
      parts.append(lb.reshape(-1))
      lam = lams[-1]
    if rest:
      carry, (lr_, lam) = block(carry, rest)
      parts.append(lr_)
    return lam, jnp.concatenate(parts)

  return jax.jit(run)


def projected_insert(gen: Generator, layer: str, D: Any, target: Target, *,
                     steps: int = 2001, learning_rate: float = 0.05, project_every: int = 10,
                     loss: str = "l1", method: str = "insert/projected",
                     settings: dict | None = None) -> EditResult:
  """The reference's default insert: Adam on the whole kernel, its change projected onto
  span(D) every ``project_every`` steps.

  Where :func:`insert` optimises Λ alone (ΔK = ΔK(Λ, D) at every step), this runs the
  reference's default procedure (Bau et al. 2020, their ``insert`` with
  ``low_rank_insert``): Adam (``learning_rate``, optax defaults β = (0.9, 0.999),
  ε = 1e-8, as torch's) moves every weight of the kernel W = W0 + ΔW on the loss at the
  paste crop, and after step t (t = 0, 1, ..., steps − 1) with t % project_every = 0 or
  t = steps − 1 the change is projected onto the context subspace, per kernel tap along
  the key axis:

    ΔW[y, x, :, o] ← P ΔW[y, x, :, o],  P = Dᵀ (D Dᵀ)⁻¹ D  (C_in × C_in),

  i.e. W ← W0 + P (W − W0), which is the reference's W ← (W0 − P W0) + P W. The
  reference writes P = Dᵀ D for orthonormal rows of D (memedit's zca, svd, unit and
  mean directions have them, where both agree); the general projector keeps a D with
  independent but non-orthonormal rows exact. Adam's moments are not projected (they
  follow the whole kernel's gradients, as in the reference). With the defaults the
  projections follow steps 0, 10, ..., 2000. The problem is the one :func:`insert`
  solves, :func:`crop_problem` (the layer on the crop's keys with a margin, every tap
  edited), and the run is one jitted program: a ``lax.scan`` over blocks of
  ``project_every`` steps, each an inner ``lax.scan`` followed by the projection.

  After the last projection ΔW = Λ Dᵀ per tap exactly, with
  Λ[y, x, o, :] = (D Dᵀ)⁻¹ D ΔW[y, x, :, o], so the result is an ordinary
  :class:`memedit.Edit` (kind "conv", Λ (kh, kw, C_out, r), D (r, C_in)).

  Args:
    gen, layer: the generator and layer name.
    D: (r, C_in) directions with linearly independent rows (from :func:`directions`).
    target: from :func:`paste_target` or :func:`erase_target`.
    steps: Adam steps (≥ 1; the reference's default 2001).
    learning_rate: Adam's learning rate (the reference's default 0.05).
    project_every: steps between projections (≥ 1; the reference's default 10).
    loss: "l1" (mean |r|, the reference's) or "l2" (mean r²) over the crop's values.
    method, settings: provenance stored in the edit.

  Returns:
    :class:`EditResult`; ``losses`` (steps,) is the loss before each Adam step (at
    kernels that are not all projected), ``loss_after`` the L1 loss of the edit.

  Raises:
    ValueError: D of the wrong shape or with dependent rows; steps, project_every or loss
      out of range; a run that ends with non-finite Λ.
  """
  if loss not in LOSSES:
    raise ValueError(f"loss: expected one of {LOSSES}, got {loss!r}")
  for name, value in (("steps", steps), ("project_every", project_every)):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
      raise ValueError(f"{name}: expected a positive int, got {value!r}")
  info = layer_info(gen, layer)
  D64 = np.asarray(D, np.float64)
  if D64.ndim != 2 or D64.shape[1] != info.key_dim:
    raise ValueError(f"directions: expected shape (r, {info.key_dim}), got {D64.shape}")
  r = D64.shape[0]
  if np.linalg.matrix_rank(D64) < r:
    raise ValueError(f"directions: expected {r} linearly independent rows, got rank "
                     f"{np.linalg.matrix_rank(D64)}")
  X = np.linalg.solve(D64 @ D64.T, D64)  # (r, C_in): Λ = ΔW-coefficients, P = Dᵀ X
  f, keys = crop_problem(gen, info, target)
  kernel0 = jnp.asarray(get_leaf(gen.variables, info.weight_path))
  D32 = jnp.asarray(D64, jnp.float32)
  lam, losses = _projected_program(f, int(steps), int(project_every), loss)(
      kernel0, keys, jnp.asarray(target.targets), jnp.asarray(X, jnp.float32), D32,
      jnp.float32(learning_rate))
  bad = int(lam.size - jnp.isfinite(lam).sum())
  if bad:
    raise ValueError(f"Λ: expected finite values from the projected Adam run (learning_rate "
                     f"{learning_rate}, {steps} steps), got {bad} NaN or infinite of "
                     f"{lam.size}; no edit was made")
  st = dict(settings or {})
  st.update(layer=layer, optimizer="adam/projected", steps=int(steps),
            learning_rate=float(learning_rate), project_every=int(project_every), loss=loss,
            rank=int(r), taps="all")
  edit = make_edit(info.weight_path, lam, D32, kind="conv", method=method, settings=st)
  kernel1 = kernel0 + edit_delta(edit, kernel0.shape)
  return EditResult(edit, np.asarray(D32), target, np.asarray(losses),
                    _crop_loss(f, kernel0, keys, target), _crop_loss(f, kernel1, keys, target))


def unit_zeroing_edit(gen: Generator, layer: str, units: Sequence[int]) -> Edit:
  """The baseline that zeroes ``units`` of the layer's keys everywhere, as an Edit:
  D = one-hot rows, Λ[y, x, o, d] = −W[y, x, u_d, o]."""
  info = layer_info(gen, layer)
  units = np.asarray(units, np.int64)
  K = np.asarray(get_leaf(gen.variables, info.weight_path), np.float32)
  D = np.zeros((len(units), info.key_dim), np.float32)
  D[np.arange(len(units)), units] = 1.0
  lam = -np.transpose(K[:, :, units, :], (0, 1, 3, 2))
  return make_edit(info.weight_path, lam, D, kind="conv", method="unit_zeroing",
                   settings={"layer": layer, "units": [int(u) for u in units]})


@functools.lru_cache(maxsize=16)
def _overfit_layer_program(f, steps):
  def run(kernel0, keys, targets, lr):
    opt = optax.adam(lr)

    def loss_fn(delta):
      return jnp.mean(jnp.abs(f(kernel0 + delta, keys) - targets))

    def step(carry, _):
      delta, st = carry
      val, g = jax.value_and_grad(loss_fn)(delta)
      upd, st = opt.update(g, st, delta)
      return (optax.apply_updates(delta, upd), st), val

    d0 = jnp.zeros_like(kernel0)
    (delta, _), losses = lax.scan(step, (d0, opt.init(d0)), None, length=steps)
    return delta, losses

  return jax.jit(run)


def overfit(gen: Generator, layer: str, target: Target, *, steps: int = 20001,
            learning_rate: float = 0.01) -> EditResult:
  """The paper's "overfit" baseline on the layer: every weight of the layer's kernel is
  fine-tuned with Adam on the same L1 loss at the paste crop (no subspace constraint).

  The result is returned as an exact :class:`memedit.Edit` with D = I (rank C_in),
  Λ[y, x, o, i] = ΔK[y, x, i, o], so it applies and reverts like any edit.
  """
  info = layer_info(gen, layer)
  f, keys = crop_problem(gen, info, target)
  kernel0 = jnp.asarray(get_leaf(gen.variables, info.weight_path))
  delta, losses = _overfit_layer_program(f, int(steps))(kernel0, keys,
                                                        jnp.asarray(target.targets),
                                                        jnp.float32(learning_rate))
  D = np.eye(info.key_dim, dtype=np.float32)
  lam = jnp.transpose(delta, (0, 1, 3, 2))
  edit = make_edit(info.weight_path, lam, D, kind="conv", method="overfit/layer",
                   settings={"layer": layer, "steps": int(steps),
                             "learning_rate": float(learning_rate)})
  return EditResult(edit, D, target, np.asarray(losses), _crop_loss(f, kernel0, keys, target),
                    _crop_loss(f, kernel0 + delta, keys, target))


def overfit_all(gen: Generator, layer: str, target: Target, *, steps: int = 20001,
                learning_rate: float = 0.01) -> Any:
  """The "overfit" baseline on all weights: every parameter of the generator is
  fine-tuned with Adam so that image B reproduces the rendered paste (L1 in pixels).

  Returns:
    (variables, losses): the fine-tuned variables (other collections, e.g. BatchNorm
    statistics, unchanged) and the (steps,) pixel L1 loss before each step.
  """
  z = gen.latents([target.imgnum])
  goal = run_layer(gen, layer, z, paste_values=target.full_values,
                   paste_alpha=target.full_alpha).images
  kwargs = dict(gen.call_kwargs)
  module = gen.module
  rest = {k: v for k, v in gen.variables.items() if k != "params"}

  def loss_fn(params):
    img = module.apply({"params": params, **rest}, jnp.asarray(z), **kwargs)
    return jnp.mean(jnp.abs(img - goal))

  opt = optax.adam(learning_rate)

  @jax.jit
  def run(params):
    def step(carry, _):
      p, st = carry
      val, g = jax.value_and_grad(loss_fn)(p)
      upd, st = opt.update(g, st, p)
      return (optax.apply_updates(p, upd), st), val
    (p, _), losses = lax.scan(step, (params, opt.init(params)), None, length=int(steps))
    return p, losses

  params, losses = run(gen.variables["params"])
  return {"params": params, **rest}, np.asarray(losses)


def edited(gen: Generator, edit: Edit, history: EditHistory | None = None
           ) -> tuple[Generator, EditHistory]:
  """The generator with ``edit`` applied (the caller's generator is not changed)."""
  variables, hist = apply_edit(gen.variables, edit, history)
  return gen.with_variables(variables), hist


def reverted(gen: Generator, edit: Edit | str, history: EditHistory
             ) -> tuple[Generator, EditHistory]:
  """The generator with ``edit`` removed again (bit-exact when it was the last one)."""
  variables, hist = revert_edit(gen.variables, edit, history)
  return gen.with_variables(variables), hist


# ----------------------------------------------------------------------------------------
# Query.


def match_scores(keys: Any, D: Any) -> np.ndarray:
  """How strongly each key falls in the edit subspace: ‖D k‖ (D's rows orthonormal).

  Args:
    keys: (..., C_in). D: (r, C_in).

  Returns:
    (...) scores; keys orthogonal to span(D) score 0 (the edit leaves them unchanged).
  """
  proj = np.asarray(keys, np.float32) @ np.asarray(D, np.float32).T
  return np.sqrt((proj ** 2).sum(-1))


def layer_scores(gen: Generator, layer: str, D: Any, imgnums: Sequence[int] | int, *,
                 batch_size: int = 64) -> np.ndarray:
  """Match scores (N, h, h) of the images' keys at the layer."""
  z = gen.latents(imgnums)
  keys_fn = _keys_fn(gen, layer)
  out = [match_scores(np.asarray(keys_fn(jnp.asarray(z[i:i + batch_size]))), D)
         for i in range(0, len(z), batch_size)]
  return np.concatenate(out)


def match_threshold(scores: Any, quantile: float = 0.999) -> float:
  """The match threshold: the ``quantile`` of match scores over a sample of pixels."""
  if not 0 < quantile < 1:
    raise ValueError(f"quantile: expected a number in (0, 1), got {quantile}")
  return float(np.quantile(np.asarray(scores).reshape(-1), quantile))


def heatmaps(scores: Any, threshold: float, resolution: int) -> np.ndarray:
  """Heat maps (N, R, R) in [0, 1] of where the context matches: score / threshold
  clipped to [0, 1] and upsampled (nearest) to the canvas."""
  s = np.clip(np.asarray(scores) / max(threshold, 1e-12), 0.0, 1.0)
  f = resolution // s.shape[-1]
  return np.repeat(np.repeat(s, f, axis=-2), f, axis=-1)


def rank_by_match(scores: Any, imgnums: Sequence[int]) -> list[tuple[int, float]]:
  """Image numbers sorted by their best match score (descending): [(imgnum, score)]."""
  best = np.asarray(scores).reshape(len(imgnums), -1).max(-1)
  order = np.argsort(-best, kind="stable")
  return [(int(imgnums[i]), float(best[i])) for i in order]


# ----------------------------------------------------------------------------------------
# Pictures.


def to_uint8(images: Any) -> np.ndarray:
  """Images in [-1, 1] → uint8 (N, R, R, C); NaN or infinite values raise ValueError."""
  images = np.asarray(images)
  bad = images.size - int(np.isfinite(images).sum())
  if bad:
    raise ValueError(f"images: expected finite values, got {bad} NaN or infinite of "
                     f"{images.size} (a model or an edit with non-finite weights)")
  return np.clip(np.round((images + 1.0) * 127.5), 0, 255).astype(np.uint8)


def comparison_grid(original: Any, edited_images: Any, *, columns: int = 4, pad: int = 2,
                    scale: int = 2) -> np.ndarray:
  """A uint8 grid of (original, edited) pairs side by side, ``columns`` pairs per row."""
  a, b = to_uint8(original), to_uint8(edited_images)
  if a.shape != b.shape:
    raise ValueError(f"edited_images: expected shape {a.shape}, got {b.shape}")
  n, R, _, c = a.shape
  if scale > 1:
    a = a.repeat(scale, 1).repeat(scale, 2)
    b = b.repeat(scale, 1).repeat(scale, 2)
    R *= scale
  rows = -(-n // columns)
  cell_w = 2 * R + pad
  grid = np.full((rows * (R + pad) + pad, columns * (cell_w + 2 * pad) + pad, c), 255, np.uint8)
  for i in range(n):
    r, col = divmod(i, columns)
    y = pad + r * (R + pad)
    x = pad + col * (cell_w + 2 * pad)
    grid[y:y + R, x:x + R] = a[i]
    grid[y:y + R, x + R + pad:x + 2 * R + pad] = b[i]
  return grid


def save_png(path, array: np.ndarray) -> None:
  """Writes a uint8 (H, W, C) array as a PNG, atomically; an array of another type must
  hold finite values in [0, 255] (ValueError otherwise)."""
  import io

  from PIL import Image

  a = np.asarray(array)
  if a.dtype != np.uint8 and not (np.isfinite(a).all() and (a >= 0).all() and (a <= 255).all()):
    raise ValueError(f"array: expected uint8 pixel values (or finite values in [0, 255]), got "
                     f"{a.dtype} values outside [0, 255] or not finite (NaN or infinite)")
  buf = io.BytesIO()
  Image.fromarray(np.asarray(array, np.uint8)).save(buf, format="PNG")
  _io.atomic_write_bytes(path, buf.getvalue())


# ----------------------------------------------------------------------------------------
# From a spec to an edit.


class SpecEdit(NamedTuple):
  """The result of :func:`edit_from_spec`.

  Attributes:
    result: the :class:`EditResult`.
    copied: the :class:`Copied` object values (None for an erase).
    units: the zeroed units of an erase (None for an insert).
  """

  result: EditResult
  copied: Copied | None
  units: np.ndarray | None


def edit_from_spec(gen: Generator, spec, C: Any, *, steps: int | None = None,
                   optimizer: str | None = None) -> SpecEdit:
  """Runs a validated :class:`memedit.specs.EditSpec` on ``gen`` with second moment C.

  Context keys (spec.key) give D (spec.method, spec.rank, spec.shrinkage); an insert
  copies spec.object and pastes it at spec.paste; an erase zeroes the spec.erase_units
  most active context units inside spec.paste. ``steps`` / ``optimizer`` override the
  spec's solver settings.
  """
  gen.layer_path(spec.layer)
  if spec.canvas != gen.resolution:
    raise ValueError(f"canvas: expected {gen.resolution} (the model's resolution), got "
                     f"{spec.canvas}")
  C = np.asarray(C, np.float32)
  keys, weights = context_keys(gen, spec.layer, spec.masks("key"))
  D = directions(C, keys, weights, rank=spec.rank, method=spec.method,
                 shrinkage=spec.shrinkage)
  solver = dict(spec.solver)
  if steps is not None:
    solver["steps"] = int(steps)
  if optimizer is not None:
    solver["optimizer"] = optimizer
  (pnum, pmask), = spec.masks("paste")
  settings = {"spec_kind": spec.kind, "context_method": spec.method,
              "shrinkage": spec.shrinkage,
              "key_imgnums": [int(i) for i, _ in spec.key], "paste_imgnum": pnum}
  copied, units = None, None
  if spec.kind == "insert":
    (onum, omask), = spec.masks("object")
    copied = copy_values(gen, spec.layer, onum, omask)
    target = paste_target(gen, spec.layer, copied, pnum, pmask)
    settings["object_imgnum"] = onum
  else:
    units = top_units(C, keys, weights, min(spec.erase_units, C.shape[0]))
    target = erase_target(gen, spec.layer, pnum, pmask, units)
    settings["erased_units"] = [int(u) for u in units]
  result = insert(gen, spec.layer, D, target, optimizer=solver["optimizer"],
                  steps=solver["steps"], learning_rate=solver["learning_rate"],
                  loss=solver["loss"], taps=spec.taps, method=f"{spec.kind}/{spec.method}",
                  settings=settings)
  return SpecEdit(result, copied, units)
