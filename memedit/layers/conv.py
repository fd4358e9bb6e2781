"""Convolution geometry: patch keys, padding, grouped kernels and spatial resampling.

A (transposed) convolution with kernel ``(*taps, C_in, C_out)`` is a dense memory over
patch keys of dim ``T*C_in`` (``T = prod(taps)``) laid out tap-major, channel-minor, so
that ``patches @ kernel.reshape(T*C_in, C_out)`` is the layer's linear part.
:func:`extract_patches` is the one place such patches are taken.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
import flax.linen as nn
from flax.linen.linear import canonicalize_padding

__all__ = [
    "as_tuple",
    "block_diagonal",
    "conv_check",
    "conv_groups",
    "conv_patch_check",
    "conv_patches",
    "diagonal_blocks",
    "extract_patches",
    "is_transpose",
    "kernel_size",
    "resample_mask",
    "upsample_nearest",
]

_PAD_MODES = {"CIRCULAR": "wrap", "REFLECT": "reflect", "CAUSAL": "constant"}
_SPATIAL = {1: "W", 2: "HW", 3: "DHW"}


def as_tuple(x, n: int) -> tuple:
  """``x`` as an ``n``-tuple: ``None`` -> ones, an int repeated, a sequence as is."""
  if x is None:
    return (1,) * n
  if isinstance(x, int):
    return (x,) * n
  return tuple(x)


def kernel_size(module) -> tuple:
  """The ``kernel_size`` of a conv layer as a tuple of ints."""
  ks = module.kernel_size
  return (int(ks),) if isinstance(ks, int) else tuple(int(k) for k in ks)


def conv_groups(module) -> int:
  """``feature_group_count`` of a conv layer (1 when it has none)."""
  return int(getattr(module, "feature_group_count", 1) or 1)


def is_transpose(module) -> bool:
  """Whether a conv layer is a transposed convolution."""
  return "Transpose" in type(module).__name__ or isinstance(
      module, (nnx.ConvTranspose, nn.ConvTranspose))


def conv_check(module):
  """Raises ``ValueError`` for conv layers that are not memories (masked, > 3-D)."""
  ks = kernel_size(module)
  if not 1 <= len(ks) <= 3:
    raise ValueError(f"conv layer: expected a 1-, 2- or 3-D kernel_size, got {ks}")
  if getattr(module, "mask", None) is not None:
    raise ValueError(
        f"conv layer: expected an unmasked kernel (mask=None), got a mask of shape "
        f"{tuple(np.shape(module.mask))}; a masked kernel is not supported as a memory")
  if is_transpose(module) and getattr(module, "transpose_kernel", False):
    raise ValueError(
        "conv layer: expected a kernel laid out (..., in, out), got "
        "ConvTranspose(transpose_kernel=True), whose kernel is (..., out, in); it is not "
        "supported as a memory")


def conv_patch_check(module):
  """Raises ``ValueError`` when the patch view cannot reproduce the layer."""
  transpose = is_transpose(module)
  k = kernel_size(module)
  pad = canonicalize_padding(module.padding, len(k))
  if isinstance(pad, str) and pad not in ("SAME", "VALID"):
    if transpose or pad not in _PAD_MODES:
      raise ValueError(
          f"patch view: padding {pad!r} of {type(module).__name__} is not supported "
          "(expected 'SAME', 'VALID' or explicit pairs"
          + ("" if transpose else ", 'CIRCULAR', 'REFLECT' or 'CAUSAL'") + ")")
    if pad == "CAUSAL" and len(k) != 1:
      raise ValueError(f"patch view: 'CAUSAL' padding needs a 1-D convolution, got "
                       f"kernel_size {k}")


def _explicit_padding(padding, k, s, d, transpose):
  """Explicit (lo, hi) pads per spatial dim for a conv with lhs dilation ``s`` if transposed."""
  pad = canonicalize_padding(padding, len(k))
  if isinstance(pad, str) and pad not in ("SAME", "VALID"):
    raise ValueError(f"patch view: padding {pad!r} is not supported (expected 'SAME', "
                     "'VALID' or explicit pairs)")
  if not transpose:
    return pad
  if not isinstance(pad, str):
    return tuple(tuple(p) for p in pad)
  out = []
  for ki, si, di in zip(k, s, d):
    kd = (ki - 1) * di + 1
    if pad == "SAME":  # as jax.lax.conv_transpose
      pad_len = kd + si - 2
      lo = kd - 1 if si > kd - 1 else int(math.ceil(pad_len / 2))
    else:
      pad_len = kd + si - 2 + max(kd - si, 0)
      lo = kd - 1
    out.append((lo, pad_len - lo))
  return tuple(out)


def extract_patches(x, window, *, strides=None, padding="VALID", lhs_dilation=None,
                    rhs_dilation=None):
  """Patches of a channels-last input, tap-major and channel-minor.

  ``out[..., p, t*C + c] = x_padded[..., p*s + t*d, c]`` for each output position ``p``
  and tap ``t`` (row-major over ``window``): the keys whose product with a kernel
  ``(*window, C, C_out)`` reshaped to ``(T*C, C_out)`` is that convolution.

  Args:
    x: ``(..., *spatial, C)`` with 1, 2 or 3 spatial axes (``len(window)`` of them).
    window: taps per spatial axis, e.g. ``(kh, kw)``.
    strides: window strides (default 1). padding: ``'SAME'``, ``'VALID'`` or explicit
      ``(lo, hi)`` pairs per spatial axis.
    lhs_dilation: input dilation (a transposed convolution's stride).
    rhs_dilation: kernel dilation.

  Returns:
    ``(..., *out_spatial, T*C)`` with ``T = prod(window)``.

  Example:
    >>> import jax.numpy as jnp
    >>> from memedit.layers.conv import extract_patches
    >>> x = jnp.arange(8.0).reshape(1, 4, 2)  # (N, W, C)
    >>> extract_patches(x, (2,), strides=(2,))[0].tolist()
    [[0.0, 1.0, 2.0, 3.0], [4.0, 5.0, 6.0, 7.0]]
  """
  window = tuple(int(w) for w in window)
  n = len(window)
  if n not in _SPATIAL:
    raise ValueError(f"window: expected 1 to 3 spatial axes, got {window}")
  if x.ndim < n + 2:
    raise ValueError(f"x: expected (N, *{n} spatial axes, C), got shape {x.shape}")
  if not isinstance(padding, str):  # explicit pairs, hashable for the compiled program
    padding = tuple(tuple(int(v) for v in pair) for pair in padding)
  # One compiled program per input shape and geometry (eagerly the body's few ops would
  # each compile their own); inlined into an enclosing jit as before.
  return _patches(x, window, tuple(int(v) for v in as_tuple(strides, n)), padding,
                  tuple(int(v) for v in as_tuple(lhs_dilation, n)),
                  tuple(int(v) for v in as_tuple(rhs_dilation, n)))


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4, 5))
def _patches(x, window, strides, padding, lhs_dilation, rhs_dilation):
  n = len(window)
  batch_shape = x.shape[:-(n + 1)]
  xb = x.reshape((-1,) + x.shape[-(n + 1):])
  c = x.shape[-1]
  spec = "N" + _SPATIAL[n] + "C"
  p = jax.lax.conv_general_dilated_patches(
      xb, window, strides, padding, lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
      dimension_numbers=(spec, _SPATIAL[n] + "IO", spec), precision=jax.lax.Precision.HIGHEST)
  # conv_general_dilated_patches orders features as (C_in, *taps); reorder to (*taps, C_in).
  taps = int(np.prod(window))
  out_sp = p.shape[1:1 + n]
  p = jnp.swapaxes(p.reshape(p.shape[:1 + n] + (c, taps)), -1, -2)
  return p.reshape(batch_shape + out_sp + (taps * c,))


def conv_patches(module, x):
  """Patch keys ``(..., *out_spatial, T*C_in)`` (tap-major, channel-minor) of a Conv /
  ConvTranspose with 1, 2 or 3 spatial axes; grouped convs give all ``C_in`` channels.

  Args:
    module: the conv layer (NNX instance or Linen definition).
    x: its input ``(..., *spatial, C_in)`` (batched or not, as the layer takes it).

  Returns:
    Keys aligned with the layer's output pixels.

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from memedit.layers.conv import conv_patches
    >>> conv = nnx.Conv(2, 3, (3, 3), rngs=nnx.Rngs(0))
    >>> conv_patches(conv, jnp.ones((1, 5, 5, 2))).shape
    (1, 5, 5, 18)
  """
  conv_patch_check(module)
  transpose = is_transpose(module)
  k = kernel_size(module)
  n = len(k)
  if jnp.ndim(x) == n + 1:  # an unbatched input (*spatial, C_in), which Flax also takes
    return conv_patches(module, jnp.asarray(x)[None])[0]
  s = as_tuple(module.strides, n)
  d = as_tuple(getattr(module, "kernel_dilation", 1), n)
  lhs = as_tuple(getattr(module, "input_dilation", 1), n)
  mode = canonicalize_padding(module.padding, n)
  if isinstance(mode, str) and mode in _PAD_MODES:  # as flax: pad the input, then VALID
    if mode == "CAUSAL":
      pads = [(d[0] * (k[0] - 1), 0)]
    else:
      pads = [(((ki - 1) * di) // 2, ((ki - 1) * di + 1) // 2) for ki, di in zip(k, d)]
    lead = [(0, 0)] * (x.ndim - n - 1)
    x = jnp.pad(x, lead + pads + [(0, 0)], mode=_PAD_MODES[mode])
    pad = "VALID"
  else:
    pad = _explicit_padding(module.padding, k, s, d, transpose)
  return extract_patches(x, k, strides=(1,) * n if transpose else s, padding=pad,
                         lhs_dilation=s if transpose else lhs, rhs_dilation=d)


def block_diagonal(kernel, groups: int):
  """Grouped kernel ``(..., C_in/G, C_out)`` as the dense ``(..., C_in, C_out)`` it acts as.

  Example:
    >>> import jax.numpy as jnp
    >>> from memedit.layers.conv import block_diagonal
    >>> block_diagonal(jnp.ones((1, 2)), 2).tolist()
    [[1.0, 0.0], [0.0, 1.0]]
  """
  if groups == 1:
    return kernel
  return _block_diagonal(kernel, int(groups))


@functools.partial(jax.jit, static_argnums=1)  # one program, not one per op, eagerly
def _block_diagonal(kernel, groups):
  cig, cout = kernel.shape[-2:]
  k = kernel.reshape(kernel.shape[:-1] + (groups, cout // groups))  # (..., i, g, o)
  eye = jnp.eye(groups, dtype=kernel.dtype)
  full = jnp.einsum("...igo,hg->...higo", k, eye)
  return full.reshape(kernel.shape[:-2] + (groups * cig, cout))


def diagonal_blocks(full, groups: int):
  """Inverse of :func:`block_diagonal`: the diagonal blocks of ``(..., C_in, C_out)``.

  Example:
    >>> import jax.numpy as jnp
    >>> from memedit.layers.conv import diagonal_blocks
    >>> diagonal_blocks(jnp.array([[1.0, 2.0], [3.0, 4.0]]), 2).tolist()
    [[1.0, 4.0]]
  """
  if groups == 1:
    return full
  return _diagonal_blocks(full, int(groups))


@functools.partial(jax.jit, static_argnums=1)  # one program, not one per op, eagerly
def _diagonal_blocks(full, groups):
  cin, cout = full.shape[-2:]
  f = full.reshape(full.shape[:-2] + (groups, cin // groups, groups, cout // groups))
  blocks = jnp.diagonal(f, axis1=-4, axis2=-2)  # (..., i, o, g)
  blocks = jnp.moveaxis(blocks, -1, -2)  # (..., i, g, o)
  return blocks.reshape(full.shape[:-2] + (cin // groups, cout))


def upsample_nearest(x, factor: int, axes=(-2, -1)):
  """Nearest-neighbour upsampling: every entry repeated ``factor`` times along ``axes``.

  Args:
    x: a numpy or JAX array. factor: integer factor >= 1. axes: the spatial axes.

  Returns:
    ``x`` with ``shape[a] * factor`` along each of ``axes`` (numpy in, numpy out).

  Example:
    >>> import numpy as np
    >>> from memedit.layers.conv import upsample_nearest
    >>> upsample_nearest(np.array([[1, 2]]), 2).tolist()
    [[1, 1, 2, 2], [1, 1, 2, 2]]
  """
  if isinstance(factor, bool) or int(factor) != factor or factor < 1:
    raise ValueError(f"factor: expected an integer >= 1, got {factor!r}")
  xp = np if isinstance(x, np.ndarray) else jnp
  for a in axes:
    x = xp.repeat(x, int(factor), axis=a)
  return x


def resample_mask(mask, size, method: str = "linear"):
  """A mask's trailing spatial axes resampled to ``size`` (leading axes kept).

  Args:
    mask: ``(..., *spatial)``, e.g. ``(B, h, w)``.
    size: the target spatial shape (as many axes as ``size`` has).
    method: ``'linear'`` ((bi/tri)linear, ``jax.image.resize``) or ``'area'`` (mean over
      blocks when ``size`` divides the mask's shape, nearest-neighbour repetition when the
      mask's shape divides ``size``).

  Returns:
    ``(..., *size)`` float32 (numpy in, numpy out for ``'area'``).

  Example:
    >>> import numpy as np
    >>> from memedit.layers.conv import resample_mask
    >>> resample_mask(np.array([[1.0, 0.0], [0.0, 0.0]]), (1, 1), "area").tolist()
    [[0.25]]
  """
  size = tuple(int(s) for s in size)
  n = len(size)
  if method not in ("linear", "area"):
    raise ValueError(f"method: expected 'linear' or 'area', got {method!r}")
  if np.ndim(mask) < n:
    raise ValueError(f"mask: expected at least {n} spatial axes to resample to {size}, got "
                     f"shape {np.shape(mask)}")
  sp = tuple(np.shape(mask)[np.ndim(mask) - n:])
  if sp == size:
    return mask.astype(np.float32) if isinstance(mask, np.ndarray) else jnp.asarray(
        mask, jnp.float32)
  if method == "linear":
    mask = jnp.asarray(mask, jnp.float32)
    return jax.image.resize(mask, mask.shape[:mask.ndim - n] + size, "linear")
  xp = np if isinstance(mask, np.ndarray) else jnp
  mask = xp.asarray(mask, xp.float32)
  lead = mask.shape[:mask.ndim - n]
  if all(a % b == 0 for a, b in zip(sp, size)):
    blocks = sum(((s, a // s) for a, s in zip(sp, size)), ())
    axes = tuple(len(lead) + 2 * i + 1 for i in range(n))
    return mask.reshape(lead + blocks).mean(axis=axes)
  if all(b % a == 0 for a, b in zip(sp, size)):
    for i, (a, b) in enumerate(zip(sp, size)):
      mask = xp.repeat(mask, b // a, axis=len(lead) + i)
    return mask
  raise ValueError(f"mask: expected a spatial shape dividing or divisible by {size} for "
                   f"'area' resampling, got {sp}")
