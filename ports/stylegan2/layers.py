"""The layers of the StyleGAN2 generator (:mod:`ports.stylegan2.model`), NHWC.

* :func:`upfirdn2d`: up-sampling by zero insertion, padding and a separable FIR filter
  (the [1,3,3,1] blur of the up-sampling layers and of the ToRGB skips);
* :class:`EqualLinear`: a dense layer with equalized learning rate;
* :class:`ModulatedConvMemory`: the memory of a modulated convolution (plain kernel,
  demodulation recomputed from it, :func:`demodulation`);
* :class:`ModulatedConv` (a synthesis layer) and :class:`ToRGB` around it;
* :class:`MappingNetwork`: z → w;
* :func:`leaky_relu_gain`, :func:`pixel_norm` and :func:`normal_init`, the activation,
  normalisation and initialiser they share.

The math of each layer is in :mod:`ports.stylegan2.model`'s docstring.
"""

from __future__ import annotations

import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["EqualLinear", "MappingNetwork", "ModulatedConv", "ModulatedConvMemory", "SQRT2",
           "ToRGB", "demodulation", "leaky_relu_gain", "normal_init", "pixel_norm",
           "upfirdn2d"]

SQRT2 = math.sqrt(2.0)


# ----------------------------------------------------------------------------------------
# Resampling (upfirdn2d with a separable FIR filter), NHWC.


def _fir_axis(x: jax.Array, taps: np.ndarray, axis: int, up: int, pad0: int,
              pad1: int) -> jax.Array:
  """1-D upfirdn along ``axis``: insert up−1 zeros after each sample, pad, convolve.

  Output length L·up + pad0 + pad1 − len(taps) + 1, as upfirdn2d. ``taps`` is flipped
  (true convolution), matching upfirdn2d's reference implementation.
  """
  if pad0 < 0 or pad1 < 0:
    raise ValueError(f"pad: expected non-negative padding, got ({pad0}, {pad1})")
  if up > 1:
    zeros = jnp.zeros_like(x)
    x = jnp.stack([x] + [zeros] * (up - 1), axis=axis + 1)
    shape = list(x.shape)
    shape[axis:axis + 2] = [shape[axis] * up]
    x = x.reshape(shape)
  widths = [(0, 0)] * x.ndim
  widths[axis] = (pad0, pad1)
  x = jnp.pad(x, widths)
  taps = np.asarray(taps, np.float64)[::-1]
  n_out = x.shape[axis] - len(taps) + 1
  out = None
  for t, tap in enumerate(taps):
    term = jax.lax.slice_in_dim(x, t, t + n_out, axis=axis) * np.float32(tap)
    out = term if out is None else out + term
  return out


def upfirdn2d(x: jax.Array, kernel: Sequence[float], *, up: int = 1,
              pad: tuple[int, int] = (0, 0), gain: float = 1.0) -> jax.Array:
  """Up-sample by zero insertion, pad and filter with a separable FIR kernel (NHWC).

  Args:
    x: (N, H, W, C).
    kernel: 1-D taps k; the 2-D filter is outer(k, k) / sum(k)² · gain.
    up: integer up-sampling factor.
    pad: (before, after) padding of the up-sampled signal, both axes.
    gain: overall gain (``up**2`` keeps the signal magnitude when up-sampling).

  Returns:
    (N, H·up + p0 + p1 − K + 1, W·up + p0 + p1 − K + 1, C).
  """
  k = np.asarray(kernel, np.float64)
  if k.ndim != 1:
    raise ValueError(f"kernel: expected 1-D taps, got shape {k.shape}")
  k = k / k.sum() * math.sqrt(gain)
  x = _fir_axis(x, k, 1, up, *pad)
  return _fir_axis(x, k, 2, up, *pad)


# ----------------------------------------------------------------------------------------
# Layers.


def normal_init(stddev: float = 1.0):
  """A Flax initialiser drawing ``stddev`` · N(0, 1) (the raw, unscaled weights of
  equalized learning rate; the layers scale them in the forward pass)."""
  def init(key, shape, dtype=jnp.float32):
    return stddev * jax.random.normal(key, shape, dtype)
  return init


def leaky_relu_gain(x: jax.Array, bias: jax.Array | None = None) -> jax.Array:
  """√2 · leaky_relu(x + bias, 0.2) (fused_leaky_relu / bias_act 'lrelu')."""
  if bias is not None:
    x = x + bias
  return SQRT2 * jnp.where(x >= 0, x, 0.2 * x)


def pixel_norm(x: jax.Array, eps: float = 1e-8) -> jax.Array:
  """x · rsqrt(mean(x², -1) + eps) over the last axis."""
  return x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + eps)


class EqualLinear(nn.Module):
  """Dense layer with equalized learning rate.

  y = x (A · lr_mul / √in) + b · lr_mul, then √2·leaky_relu if ``activation``.
  Params: ``kernel`` (in, out) initialised N(0, 1/lr_mul²), ``bias`` (out,) = bias_init.
  """
  features: int
  lr_mul: float = 1.0
  bias_init: float = 0.0
  activation: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    fan_in = x.shape[-1]
    kernel = self.param("kernel", normal_init(1.0 / self.lr_mul), (fan_in, self.features))
    bias = self.param("bias", nn.initializers.constant(self.bias_init), (self.features,))
    y = x @ (kernel * (self.lr_mul / math.sqrt(fan_in)))
    b = bias * self.lr_mul
    if self.activation:
      return leaky_relu_gain(y, b)
    return y + b


class ModulatedConvMemory(nn.Module):
  """The memory of a modulated convolution: plain kernel, recomputed demodulation.

  ``__call__(x_mod, style)`` with the per-pixel key x_mod = x·s (N, H, W, C_in) and the
  style s (N, C_in) returns

    conv(x_mod, Ŵ) · d,   Ŵ = kernel / √(k·k·C_in),
    d[n, o] = rsqrt(Σ_{y,x,i} (Ŵ[y, x, i, o] · s[n, i])² + 1e-8)   (if ``demodulate``)

  where for ``up=True`` the convolution is a stride-2 transposed convolution followed by
  the [1,3,3,1] blur (rosinality's up path; output 2H × 2W), else a 'same' convolution.
  The only parameter is ``kernel`` (k, k, C_in, C_out), HWIO, stored unscaled.
  ``in_features`` (C_in, set by :class:`ModulatedConv` and :class:`ToRGB`) gives the layer's
  run-time weight gain 1/√(k·k·C_in) without an input
  (:func:`ports.stylegan2.editing.memory_gain`).

  As a memory (registered with :func:`memedit.layers.register_layer_kind`, kind "conv"):
  keys are the per-pixel x·s, the kernel is edited per tap, and the layer's own call is
  the f of every solve, so an edited kernel gets the demodulation that belongs to it.
  Without demodulation (ToRGB) the layer is linear in its kernel with gain
  1/√(k·k·C_in), which ``MemoryView.check_contract(x, style)`` confirms.
  """
  features: int
  kernel_size: int = 3
  up: bool = False
  demodulate: bool = True
  blur_kernel: tuple[float, ...] = (1, 3, 3, 1)
  in_features: int | None = None

  @nn.compact
  def __call__(self, x_mod: jax.Array, style: jax.Array) -> jax.Array:
    if x_mod.ndim != 4:
      raise ValueError(f"x_mod: expected (N, H, W, C_in), got shape {x_mod.shape}")
    c_in = x_mod.shape[-1]
    if self.in_features is not None and c_in != self.in_features:
      raise ValueError(f"x_mod: expected {self.in_features} channels (in_features), got "
                       f"{c_in}")
    if style.shape != (x_mod.shape[0], c_in):
      raise ValueError(
          f"style: expected shape {(x_mod.shape[0], c_in)}, got {style.shape}")
    ks = self.kernel_size
    kernel = self.param("kernel", normal_init(1.0), (ks, ks, c_in, self.features))
    w = kernel * (1.0 / math.sqrt(c_in * ks * ks))
    dn = ("NHWC", "HWIO", "NHWC")
    if self.up:
      # conv_transpose2d(stride 2, padding 0) == dilated input, flipped kernel, full pad.
      out = jax.lax.conv_general_dilated(
          x_mod, w[::-1, ::-1], window_strides=(1, 1),
          padding=((ks - 1, ks - 1), (ks - 1, ks - 1)), lhs_dilation=(2, 2),
          dimension_numbers=dn)
      p = (len(self.blur_kernel) - 2) - (ks - 1)
      out = upfirdn2d(out, self.blur_kernel, pad=((p + 1) // 2 + 1, p // 2 + 1), gain=4.0)
    else:
      out = jax.lax.conv_general_dilated(
          x_mod, w, window_strides=(1, 1), padding=((ks // 2, ks // 2),) * 2,
          dimension_numbers=dn)
    if self.demodulate:
      out = out * demodulation(kernel, style)[:, None, None, :]
    return out


def demodulation(kernel: jax.Array, style: jax.Array, eps: float = 1e-8) -> jax.Array:
  """d[n, o] = rsqrt(Σ_{y,x,i} (kernel[y,x,i,o]/√fan_in · style[n,i])² + eps).

  Args:
    kernel: (k, k, C_in, C_out) raw HWIO kernel.
    style: (N, C_in).

  Returns:
    (N, C_out).
  """
  ks0, ks1, c_in, _ = kernel.shape
  w2 = jnp.sum(jnp.square(kernel), axis=(0, 1)) * (1.0 / (c_in * ks0 * ks1))  # (C_in, C_out)
  return jax.lax.rsqrt(jnp.square(style) @ w2 + eps)


class ModulatedConv(nn.Module):
  """A synthesis layer: modulation, memory (conv + demodulation), noise, bias, activation.

  ``__call__(x, w, noise)``: x (N, H, W, C_in), w (N, w_dim), noise None or broadcastable
  to (N, H', W') (the output size) → (N, H', W', features).
  Submodules ``modulation`` (:class:`EqualLinear`, bias 1) and ``memory``
  (:class:`ModulatedConvMemory`); params ``noise_strength`` () and ``bias`` (features,).
  """
  features: int
  kernel_size: int = 3
  up: bool = False
  use_noise: bool = True
  conv_clamp: float | None = None
  blur_kernel: tuple[float, ...] = (1, 3, 3, 1)

  @nn.compact
  def __call__(self, x: jax.Array, w: jax.Array, noise: jax.Array | None = None) -> jax.Array:
    s = EqualLinear(x.shape[-1], bias_init=1.0, name="modulation")(w)
    x_mod = x * s[:, None, None, :]
    out = ModulatedConvMemory(self.features, self.kernel_size, up=self.up, demodulate=True,
                              blur_kernel=self.blur_kernel, in_features=x.shape[-1],
                              name="memory")(x_mod, s)
    if self.use_noise:
      strength = self.param("noise_strength", nn.initializers.zeros, ())
      if noise is not None:
        out = out + strength * noise[..., None]
    bias = self.param("bias", nn.initializers.zeros, (self.features,))
    out = leaky_relu_gain(out, bias)
    if self.conv_clamp is not None:
      out = jnp.clip(out, -self.conv_clamp, self.conv_clamp)
    return out


class ToRGB(nn.Module):
  """Modulated 1×1 conv (no demodulation) + bias (+ clamp) + up-sampled skip image."""
  img_channels: int = 3
  conv_clamp: float | None = None
  blur_kernel: tuple[float, ...] = (1, 3, 3, 1)

  @nn.compact
  def __call__(self, x: jax.Array, w: jax.Array, skip: jax.Array | None = None) -> jax.Array:
    s = EqualLinear(x.shape[-1], bias_init=1.0, name="modulation")(w)
    out = ModulatedConvMemory(self.img_channels, 1, demodulate=False, in_features=x.shape[-1],
                              name="memory")(x * s[:, None, None, :], s)
    out = out + self.param("bias", nn.initializers.zeros, (self.img_channels,))
    if self.conv_clamp is not None:
      out = jnp.clip(out, -self.conv_clamp, self.conv_clamp)
    if skip is not None:
      p = len(self.blur_kernel) - 2
      out = out + upfirdn2d(skip, self.blur_kernel, up=2, pad=((p + 1) // 2 + 1, p // 2),
                            gain=4.0)
    return out


class MappingNetwork(nn.Module):
  """Pixel norm then ``n_mlp`` equalized dense layers (lr_mul) with √2·leaky ReLU.

  (N, z_dim) → (N, w_dim); hidden width ``hidden`` (None = w_dim). Layers ``fc_{l}``.
  """
  w_dim: int
  n_mlp: int = 8
  hidden: int | None = None
  lr_mul: float = 0.01

  @nn.compact
  def __call__(self, z: jax.Array) -> jax.Array:
    x = pixel_norm(z)
    hidden = self.hidden or self.w_dim
    for l in range(self.n_mlp):
      feats = self.w_dim if l == self.n_mlp - 1 else hidden
      x = EqualLinear(feats, lr_mul=self.lr_mul, activation=True, name=f"fc_{l}")(x)
    return x
