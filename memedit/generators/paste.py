"""Copy and paste at a layer: the values of an object region, pasted over another image.

Masks are float arrays (R, R) in [0, 1] at canvas resolution (R the generator's
resolution; another shape, or a value outside [0, 1] or NaN, raises). They are resampled to a
layer's key or value resolution bilinearly (with the triangle filter widened by the
downsampling factor, :func:`memedit.layers.conv.resample_mask`), as the reference resizes
its masks (PIL's bilinear resize); a mask pixel counts where its resampled value is > 0.

- **Copy** (:func:`copy_values`): the layer's output values of image A inside the
  bounding box of the object mask, with the mask as alpha.
- **Paste** (:func:`paste_target`): those values placed at the paste mask's box (centres
  aligned), blended by the paste mask over image B's own values, give v*. Only the tight
  crop around the paste is optimised; its keys k* are image B's layer inputs there, with
  a margin of context.
- **Erase** (:func:`erase_target`): the layer's output with some key units zeroed is the
  target inside the mask.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import jax.numpy as jnp
import numpy as np

from memedit.generators._checks import _is_int, check_imgnum, check_mask, check_units
from memedit.generators.crop import layer_on_crop, layer_params
from memedit.generators.forward import LayerRun, run_layer
from memedit.generators.generator import Generator, LayerInfo, layer_info, layer_kernel
from memedit.layers.conv import resample_mask

__all__ = ["Copied", "Target", "bbox", "copy_values", "erase_target", "mask_at",
           "paste_target"]


def mask_at(mask: Any, res: int) -> np.ndarray:
  """A canvas mask (R, R) (or (N, R, R)) resampled to (res, res) bilinearly.

  Args:
    mask: (..., R, R) floats in [0, 1].
    res: the layer's resolution.

  Returns:
    (..., res, res) float32 numpy array in [0, 1].

  Example:
    >>> m = np.zeros((8, 8)); m[:4, :4] = 1
    >>> np.round(mask_at(m, 2).astype(float), 2).tolist()  # a triangle filter 8 px wide
    [[0.73, 0.12], [0.12, 0.02]]
  """
  m = np.asarray(mask, np.float32)
  if m.ndim < 2 or m.shape[-1] != m.shape[-2]:
    raise ValueError(f"mask: expected a square mask (R, R), got shape {m.shape}")
  return np.asarray(resample_mask(m, (int(res), int(res)), "linear"), np.float32)


def bbox(mask: Any) -> tuple[int, int, int, int]:
  """(y0, y1, x0, x1), the tight half-open bounding box of ``mask > 0``.

  Args:
    mask: (H, W) array.

  Returns:
    The box as four ints.

  Example:
    >>> m = np.zeros((5, 5)); m[1:3, 2] = 1
    >>> bbox(m)
    (1, 3, 2, 3)
  """
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
    layer: the name of the layer the values were copied at (:func:`copy_values` records
      it; None when unknown, e.g. a Copied made by hand: only its shapes are checked).
  """

  values: np.ndarray
  alpha: np.ndarray
  box: tuple
  mean_value: np.ndarray
  layer: str | None = None


def _check_copied(copied: Any, info: LayerInfo, layer: str) -> None:
  """Refuses a Copied that does not belong to ``layer``: copied at another layer, or
  values, alpha and box that do not fit the layer's value map."""
  if not isinstance(copied, Copied):
    raise ValueError(f"copied: expected a Copied (from copy_values), got "
                     f"{type(copied).__name__}")
  if copied.layer is not None and copied.layer != layer:
    raise ValueError(f"copied: expected values copied at layer {layer!r} (the layer pasted "
                     f"into), got values copied at layer {copied.layer!r}; copy them at "
                     f"{layer!r} with copy_values(gen, {layer!r}, ...)")
  shape = np.shape(copied.values)
  if len(shape) != 3 or shape[-1] != info.value_dim:
    raise ValueError(f"copied: expected values of shape (H, W, {info.value_dim}) (C_out = "
                     f"{info.value_dim} of layer {layer!r}), got {shape}")
  H, box = info.value_res, copied.box
  ok = isinstance(box, (tuple, list)) and len(box) == 4 and all(_is_int(b) for b in box)
  if ok:
    y0, y1, x0, x1 = (int(b) for b in box)
    ok = (0 <= y0 < y1 <= H and 0 <= x0 < x1 <= H and (y1 - y0, x1 - x0) == shape[:2]
          and np.shape(copied.alpha) == shape[:2])
  if not ok:
    raise ValueError(f"copied: expected a box (y0, y1, x0, x1) inside the {H}x{H} value map "
                     f"of layer {layer!r}, the size of the values {shape[:2]}, and alpha of "
                     f"that size, got box {copied.box!r} and alpha {np.shape(copied.alpha)}")


def copy_values(gen: Generator, layer: str, imgnum: int, mask: Any) -> Copied:
  """Copy: the layer's output values of image ``imgnum`` inside the object mask's box.

  Args:
    gen: the generator. layer: the layer's name.
    imgnum: image A's number. mask: (R, R) object mask on the canvas.

  Returns:
    :class:`Copied`.

  Raises:
    ValueError: an image number that is not an integer in range; a mask that is not
      (R, R) (R the canvas), holds a value outside [0, 1] (or NaN), or is empty.

  Example:
    >>> from flax import nnx
    >>> from memedit.generators.generator import Generator
    >>> class Toy(nnx.Module):
    ...   def __init__(self):
    ...     self.up = nnx.ConvTranspose(3, 2, (4, 4), strides=(2, 2), rngs=nnx.Rngs(0))
    ...   def __call__(self, z):
    ...     return self.up(z.reshape(-1, 4, 4, 3))
    >>> gen = Generator(Toy(), 48, 8, {"up": ("up",)})
    >>> box = np.zeros((8, 8)); box[2:4, 2:6] = 1
    >>> c = copy_values(gen, "up", 0, box)
    >>> c.values.shape, c.box
    ((2, 4, 2), (2, 4, 2, 6))
    >>> c.layer
    'up'
  """
  info = layer_info(gen, layer)
  imgnum = check_imgnum(imgnum)
  m = mask_at(check_mask(mask, gen.resolution), info.value_res)
  y0, y1, x0, x1 = bbox(m)
  run = run_layer(gen, layer, gen.latents([imgnum]))
  vals = run.values[0, y0:y1, x0:x1]
  a = m[y0:y1, x0:x1]
  mean = (vals * a[..., None]).sum((0, 1)) / max(float(a.sum()), 1e-12)
  return Copied(vals, a, (y0, y1, x0, x1), mean, layer)


class Target(NamedTuple):
  """The optimisation problem of one paste (or erase).

  Attributes:
    imgnum: image B.
    keys: (1, h + 2m, w + 2m, C_in) keys of the crop with a margin m of context.
    extra: the layer's further call arguments for image B.
    targets: (1, s·h, s·w, C_out) target values v* on the crop.
    original: (1, s·h, s·w, C_out) the unedited values on the crop.
    alpha: (1, s·h, s·w) the paste weight on the crop.
    key_box: (y0, y1, x0, x1) of the crop at key resolution.
    full_values: (1, H, H, C_out) B's target value map (pasted), for rendering.
    full_alpha: (1, H, H) the paste alpha over the whole value map.
    layer: the name of the layer whose crop this is (None: not recorded, as in Targets
      made by hand); the edits refuse a Target recorded at another layer.
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
  layer: str | None = None


def _key_box(box, scale, key_res):
  y0, y1, x0, x1 = box
  return (y0 // scale, min(-(-y1 // scale), key_res), x0 // scale,
          min(-(-x1 // scale), key_res))


def _target_from(info: LayerInfo, run: LayerRun, imgnum: int, full, alpha) -> Target:
  s, m = info.scale, info.margin
  kbox = _key_box(bbox(alpha), s, info.key_res)
  y0, y1, x0, x1 = kbox
  oy, ox = slice(s * y0, s * y1), slice(s * x0, s * x1)
  padded = np.pad(run.keys, ((0, 0), (m, m), (m, m), (0, 0)), mode=info.key_padding)
  keys = padded[:, y0:y1 + 2 * m, x0:x1 + 2 * m]
  return Target(imgnum, keys, tuple(run.extra), full[None, oy, ox], run.values[:, oy, ox],
                alpha[None, oy, ox], kbox, full[None], alpha[None], info.name)


def paste_target(gen: Generator, layer: str, copied: Copied, imgnum: int, mask: Any
                 ) -> Target:
  """Paste: the copied values placed at the paste mask's box (centres aligned), blended by
  the paste mask (α), over image ``imgnum``'s own values; cropped tightly.

  Args:
    gen: the generator. layer: the layer's name.
    copied: from :func:`copy_values` at the same layer.
    imgnum: image B's number. mask: (R, R) paste mask on the canvas.

  Returns:
    :class:`Target`.

  Raises:
    ValueError: ``copied`` copied at another layer (its ``layer``), or values, alpha and
      box that do not fit this layer's value map (C_out channels, a box inside the map the
      size of the values); an image number that is not an integer in range; a mask that
      is not (R, R) (R the canvas), holds a value outside [0, 1] (or NaN), is empty, or
      does not overlap the copied box once shifted. All are checked before the model runs.

  Example:
    >>> from flax import nnx
    >>> from memedit.generators.generator import Generator
    >>> class Toy(nnx.Module):
    ...   def __init__(self):
    ...     self.up = nnx.ConvTranspose(3, 2, (4, 4), strides=(2, 2), rngs=nnx.Rngs(0))
    ...   def __call__(self, z):
    ...     return self.up(z.reshape(-1, 4, 4, 3))
    >>> gen = Generator(Toy(), 48, 8, {"up": ("up",)})
    >>> box = np.zeros((8, 8)); box[2:4, 2:6] = 1
    >>> t = paste_target(gen, "up", copy_values(gen, "up", 0, box), 1, box)
    >>> t.key_box, t.keys.shape, t.targets.shape
    ((1, 2, 1, 3), (1, 7, 8, 3), (1, 2, 4, 2))
  """
  info = layer_info(gen, layer)
  _check_copied(copied, info, layer)
  imgnum = check_imgnum(imgnum)
  H = info.value_res
  pm = mask_at(check_mask(mask, gen.resolution), H)
  py0, py1, px0, px1 = bbox(pm)
  run = run_layer(gen, layer, gen.latents([imgnum]))
  oy0, oy1, ox0, ox1 = copied.box
  dy = int(round((py0 + py1) / 2 - (oy0 + oy1) / 2))
  dx = int(round((px0 + px1) / 2 - (ox0 + ox1) / 2))
  shifted = np.zeros((H, H, info.value_dim), np.float32)
  inside = np.zeros((H, H), np.float32)
  ys = np.arange(oy0, oy1) + dy
  xs = np.arange(ox0, ox1) + dx
  iy = (ys >= 0) & (ys < H)
  ix = (xs >= 0) & (xs < H)
  shifted[np.ix_(ys[iy], xs[ix])] = copied.values[np.ix_(iy, ix)]
  inside[np.ix_(ys[iy], xs[ix])] = 1.0
  alpha = pm * inside
  if not (alpha > 0).any():
    raise ValueError("paste: the paste mask does not overlap the copied object's box")
  values = run.values[0]
  full = values + alpha[..., None] * (shifted - values)
  return _target_from(info, run, imgnum, full, alpha)


def erase_target(gen: Generator, layer: str, imgnum: int, mask: Any, units: Sequence[int]
                 ) -> Target:
  """Erase: the layer's output with ``units`` of its keys zeroed, as the target inside the
  mask (blended by it) on image ``imgnum``.

  Args:
    gen: the generator. layer: the layer's name.
    imgnum: the image. mask: (R, R) region to erase on the canvas.
    units: distinct key units (channels) to zero, integers 0 <= u < C_in.

  Returns:
    :class:`Target`.

  Raises:
    ValueError: an image number that is not an integer in range; a mask that is not
      (R, R) (R the canvas), holds a value outside [0, 1] (or NaN), or is empty; no
      units, or a unit that is not an integer 0 <= u < C_in or is repeated.

  Example:
    >>> from flax import nnx
    >>> from memedit.generators.generator import Generator
    >>> class Toy(nnx.Module):
    ...   def __init__(self):
    ...     self.up = nnx.ConvTranspose(3, 2, (4, 4), strides=(2, 2), rngs=nnx.Rngs(0))
    ...   def __call__(self, z):
    ...     return self.up(z.reshape(-1, 4, 4, 3))
    >>> gen = Generator(Toy(), 48, 8, {"up": ("up",)})
    >>> box = np.zeros((8, 8)); box[2:4, 2:6] = 1
    >>> erase_target(gen, "up", 0, box, [0, 2]).targets.shape
    (1, 2, 4, 2)
  """
  info = layer_info(gen, layer)
  imgnum = check_imgnum(imgnum)
  units = check_units(units, info.key_dim)
  alpha = mask_at(check_mask(mask, gen.resolution), info.value_res)
  bbox(alpha)
  run = run_layer(gen, layer, gen.latents([imgnum]))
  zeroed = np.array(run.keys)
  zeroed[..., units] = 0.0
  f = layer_on_crop(gen, layer)
  out = np.asarray(f(layer_kernel(gen, layer), (jnp.asarray(zeroed), layer_params(gen, layer),
                                                tuple(jnp.asarray(e) for e in run.extra))))[0]
  full = run.values[0] + alpha[..., None] * (out - run.values[0])
  return _target_from(info, run, imgnum, full, alpha)
