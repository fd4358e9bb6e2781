"""Fast convolutions for training: the port's modulated convolutions as im2col matrix
products (the same function as the model's own to float32 rounding, a different XLA
program whose gradients are about five times faster on XLA:CPU)."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from ports.stylegan2 import model as model_lib

__all__ = ["fast_convolutions"]



def _conv3_same(x: jax.Array, w: jax.Array) -> jax.Array:
  """'Same' 3×3 cross-correlation as one matrix product over 9 shifted copies (im2col).

  x (N, H, W, C), w (3, 3, C, O) → (N, H, W, O).
  """
  n, h, wd, c = x.shape
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  patches = jnp.concatenate([xp[:, a:a + h, b:b + wd] for a in range(3) for b in range(3)],
                            axis=-1)
  return (patches.reshape(-1, 9 * c) @ w.reshape(9 * c, -1)).reshape(n, h, wd, -1)


def _interleave_taps(t: jax.Array, axis: int) -> jax.Array:
  """u[2i + a] = Σ t[i, tap a] along ``axis`` (tap axis 3, 3 taps): length 2L + 1."""
  length = t.shape[axis]

  def pad(v, lo, hi):
    return jnp.pad(v, [(lo, hi) if d == axis else (0, 0) for d in range(v.ndim)])

  tap = [jnp.take(t, a, axis=3) for a in range(3)]
  even = pad(tap[0], 0, 1) + pad(tap[2], 1, 0)   # positions 2m: taps 0 (i = m), 2 (i = m − 1)
  odd = pad(tap[1], 0, 1)                         # positions 2m + 1: tap 1 (i = m)
  u = jnp.stack([even, odd], axis=axis + 1)
  shape = list(even.shape)
  shape[axis] = 2 * (length + 1)
  return jax.lax.slice_in_dim(u.reshape(shape), 0, 2 * length + 1, axis=axis)


def _conv3_transposed_up(x: jax.Array, w: jax.Array) -> jax.Array:
  """Stride-2 transposed 3×3 convolution, out[2i + a, 2j + b] += x[i, j] · w[a, b].

  x (N, H, W, C), w (3, 3, C, O) → (N, 2H + 1, 2W + 1, O): one matrix product, then the
  nine taps interleaved (rosinality's ``conv_transpose2d(stride=2, padding=0)``).
  """
  n, h, wd, c = x.shape
  o = w.shape[-1]
  y = x.reshape(-1, c) @ w.transpose(2, 0, 1, 3).reshape(c, 9 * o)
  y = y.reshape(n, h, wd, 3, 3, o)
  y = _interleave_taps(y, axis=1)     # (N, 2H + 1, W, 3, O)
  return _interleave_taps(y, axis=2)  # (N, 2H + 1, 2W + 1, O)


def _fast_memory(mod: model_lib.ModulatedConvMemory, x_mod: jax.Array,
                 style: jax.Array) -> jax.Array:
  """:meth:`ModulatedConvMemory.__call__` with matrix-product convolutions."""
  kernel = mod.get_variable("params", "kernel")
  ks, c_in = mod.kernel_size, x_mod.shape[-1]
  w = kernel * (1.0 / math.sqrt(c_in * ks * ks))
  n, h, wd, _ = x_mod.shape
  if ks == 1:
    out = (x_mod.reshape(-1, c_in) @ w[0, 0]).reshape(n, h, wd, -1)
  elif mod.up:
    out = _conv3_transposed_up(x_mod, w)
    p = (len(mod.blur_kernel) - 2) - (ks - 1)
    out = model_lib.upfirdn2d(out, mod.blur_kernel, pad=((p + 1) // 2 + 1, p // 2 + 1),
                              gain=4.0)
  else:
    out = _conv3_same(x_mod, w)
  if mod.demodulate:
    out = out * model_lib.demodulation(kernel, style)[:, None, None, :]
  return out


def _interceptor(next_fun, args, kwargs, context):
  mod = context.module
  if (isinstance(mod, model_lib.ModulatedConvMemory) and context.method_name == "__call__"
      and mod.kernel_size in (1, 3) and not kwargs and len(args) == 2
      and mod.has_variable("params", "kernel")):
    return _fast_memory(mod, *args)
  return next_fun(*args, **kwargs)


def fast_convolutions():
  """Context manager: the generator's modulated convolutions as im2col matrix products.

  Inside it, ``Generator.apply`` computes the same images (to float32 rounding) through
  a different XLA program whose gradients run several times faster on CPU. Needs
  initialised parameters (use it around ``apply``, not ``init``).
  """
  return nn.intercept_methods(_interceptor)
