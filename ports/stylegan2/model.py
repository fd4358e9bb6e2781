"""StyleGAN2 generator in Flax Linen, with each modulated convolution split into a memory.

The network follows the official StyleGAN2 generator (configs E–F, "skip" ToRGB
architecture) as implemented by rosinality's ``stylegan2-pytorch`` and NVIDIA's
``stylegan2-ada-pytorch``; both checkpoint layouts convert onto this one module (see
:mod:`ports.stylegan2.convert`).

Mapping network (z → w)::

  x = z · rsqrt(mean(z²) + 1e-8)                       # pixel norm
  x = √2 · leaky_relu(x (c·A_l) + lr_mul·b_l, 0.2)      # l = 0 .. n_mlp-1, c = lr_mul / √fan_in

with ``lr_mul = 0.01`` (equalized learning rate).

Synthesis network (w+ → image), resolutions 4, 8, ..., ``resolution``: a learned
constant (4, 4, C₄), then per layer a *modulated convolution*. With the layer's latent
w and the equalized kernel Ŵ = W / √(k·k·C_in)::

  s     = A w + b                                       # "modulation", b initialised to 1
  k     = x · s                                         # per-pixel key, dim C_in
  y     = conv(k, Ŵ)        (or transposed conv ×2, then blur [1,3,3,1] for up layers)
  d_o   = rsqrt(Σ_{kh,kw,i} (Ŵ[kh,kw,i,o] s_i)² + 1e-8) # demodulation
  out   = clamp(√2 · leaky_relu(y·d + g·noise + bias, 0.2), ±conv_clamp)

which equals the fused "modulate the weight, demodulate, grouped conv" of the
references because the convolution is linear in its input. The plain kernel W lives in
its own submodule, :class:`ModulatedConvMemory` (attribute name ``memory``), whose call
takes the key k = x·s and the style s and recomputes d from the kernel it holds, so an
edited kernel W + ΔW gets the demodulation that belongs to it. ToRGB layers are
modulated 1×1 convolutions without demodulation (also split, ``demodulate=False``); each
adds the up-sampled (upfirdn2d, [1,3,3,1]) image of the previous resolution.

Layer numbering (the reference's): layer 0 is the 4×4 conv, then two per resolution
(layers 1–2 at 8×8, 3–4 at 16×16, ...). Parameter tree of :class:`StyleGAN2Generator`::

  params/mapping/fc_{l}/{kernel (in, out), bias}
  params/synthesis/const                              (4, 4, C₄)
  params/synthesis/conv_{i}/modulation/{kernel (w_dim, C_in), bias (C_in,)}
  params/synthesis/conv_{i}/memory/kernel             (3, 3, C_in, C_out)  HWIO
  params/synthesis/conv_{i}/noise_strength            ()
  params/synthesis/conv_{i}/bias                      (C_out,)
  params/synthesis/torgb_{j}/modulation/{kernel, bias}
  params/synthesis/torgb_{j}/memory/kernel            (1, 1, C, img_channels)
  params/synthesis/torgb_{j}/bias                     (img_channels,)
  buffers/latent_avg                                  (w_dim,)   truncation centre
  buffers/synthesis/noise_{i}                         (H_i, W_i) fixed per-layer noise

Kernels are stored raw (as in the checkpoints); the equalized-learning-rate scales are
applied in the forward pass. Tensors are NHWC inside; images come out NHWC
(N, H, W, img_channels), values roughly in [-1, 1]; :func:`generate` can return NCHW.

Latent inputs: ``'z'`` (N, z_dim) goes through the mapping network; ``'w'`` (N, w_dim)
is broadcast to every layer; ``'w+'`` (N, num_ws, w_dim) gives every layer its own w
(``num_ws = 2·log2(resolution) − 2``). Truncation lerps w towards ``latent_avg``;
style mixing uses the first latent for ws[:crossover] and the second for the rest.

Noise: ``noise_mode='const'`` uses the stored per-layer buffers (deterministic, the
default), ``'random'`` draws standard normals from the ``'noise'`` PRNG stream,
``'none'`` adds nothing; an explicit ``noise`` sequence (one (H, W) or (N, H, W) array
per layer) overrides the mode.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["EqualLinear", "INPUT_SPACES", "MappingNetwork", "ModulatedConv",
           "ModulatedConvMemory", "NOISE_MODES", "SQRT2", "StyleGAN2Generator",
           "SynthesisNetwork", "ToRGB", "demodulation", "generate", "generator_from_config",
           "layer_paths", "layer_resolution", "leaky_relu_gain", "log2_resolution",
           "mean_latent", "num_conv_layers", "num_ws", "nvidia_channels", "pixel_norm",
           "rosinality_channels", "sample_latents", "upfirdn2d"]

SQRT2 = math.sqrt(2.0)
NOISE_MODES = ("const", "random", "none")
INPUT_SPACES = ("z", "w", "w+")


# ----------------------------------------------------------------------------------------
# Architecture helpers.


def log2_resolution(resolution: int) -> int:
  """log2 of a power-of-two resolution ≥ 4; ValueError otherwise."""
  if not isinstance(resolution, (int, np.integer)) or resolution < 4 or (
      resolution & (resolution - 1)):
    raise ValueError(f"resolution: expected a power of two >= 4, got {resolution!r}")
  return int(resolution).bit_length() - 1


def num_conv_layers(resolution: int) -> int:
  """Number of modulated 3×3 convolutions: 1 + 2·(log2(resolution) − 2)."""
  return 2 * (log2_resolution(resolution) - 2) + 1


def num_ws(resolution: int) -> int:
  """Number of per-layer latents w+ consumes: 2·log2(resolution) − 2."""
  return 2 * log2_resolution(resolution) - 2


def layer_resolution(layer: int) -> int:
  """Output resolution of conv layer ``layer`` (0 → 4, 1–2 → 8, 3–4 → 16, ...)."""
  return 2 ** ((layer + 5) // 2)


def rosinality_channels(resolution: int, channel_multiplier: int = 2) -> tuple[int, ...]:
  """Channel widths at 4, 8, ..., ``resolution`` in rosinality's ``Generator``."""
  table = {4: 512, 8: 512, 16: 512, 32: 512, 64: 256 * channel_multiplier,
           128: 128 * channel_multiplier, 256: 64 * channel_multiplier,
           512: 32 * channel_multiplier, 1024: 16 * channel_multiplier}
  log2 = log2_resolution(resolution)
  if resolution > 1024:
    raise ValueError(f"resolution: rosinality's channel table stops at 1024, got {resolution}")
  return tuple(table[2 ** r] for r in range(2, log2 + 1))


def nvidia_channels(resolution: int, channel_base: int = 32768,
                    channel_max: int = 512) -> tuple[int, ...]:
  """Channel widths at 4, ..., ``resolution`` in NVIDIA's ``SynthesisNetwork``."""
  log2 = log2_resolution(resolution)
  return tuple(min(channel_base // 2 ** r, channel_max) for r in range(2, log2 + 1))


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


def _normal_init(stddev: float = 1.0):
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
    kernel = self.param("kernel", _normal_init(1.0 / self.lr_mul), (fan_in, self.features))
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
    kernel = self.param("kernel", _normal_init(1.0), (ks, ks, c_in, self.features))
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


class SynthesisNetwork(nn.Module):
  """Constant input, modulated convs ``conv_{i}`` and ToRGB skips ``torgb_{j}`` (NHWC out).

  ``__call__(ws, noise_mode, noise)`` with ws (N, num_ws, w_dim) → (N, R, R, img_channels).
  Buffers ``noise_{i}`` (H_i, W_i) hold the fixed per-layer noise.
  """
  resolution: int
  channels: tuple[int, ...]
  img_channels: int = 3
  use_noise: bool = True
  conv_clamp: float | None = None
  blur_kernel: tuple[float, ...] = (1, 3, 3, 1)

  def _layer_noise(self, i: int, batch: int, noise_mode: str,
                   noise: Sequence[jax.Array] | None) -> jax.Array | None:
    if not self.use_noise:
      return None
    res = layer_resolution(i)
    buf = self.variable("buffers", f"noise_{i}",
                        lambda: jax.random.normal(self.make_rng("params"), (res, res)))
    if noise is not None:
      n = jnp.asarray(noise[i], jnp.float32)
      if n.shape[-2:] != (res, res) or n.ndim not in (2, 3):
        raise ValueError(
            f"noise[{i}]: expected shape ({res}, {res}) or (N, {res}, {res}), got {n.shape}")
      return n
    if noise_mode == "const":
      return buf.value
    if noise_mode == "random":
      return jax.random.normal(self.make_rng("noise"), (batch, res, res))
    return None

  @nn.compact
  def __call__(self, ws: jax.Array, noise_mode: str = "const",
               noise: Sequence[jax.Array] | None = None) -> jax.Array:
    log2 = log2_resolution(self.resolution)
    if len(self.channels) != log2 - 1:
      raise ValueError(f"channels: expected {log2 - 1} widths (4..{self.resolution}), "
                       f"got {len(self.channels)}")
    n_layers = num_conv_layers(self.resolution)
    if ws.ndim != 3 or ws.shape[1] != num_ws(self.resolution):
      raise ValueError(f"ws: expected (N, {num_ws(self.resolution)}, w_dim), got {ws.shape}")
    if noise_mode not in NOISE_MODES:
      raise ValueError(f"noise_mode: expected one of {NOISE_MODES}, got {noise_mode!r}")
    if noise is not None and len(noise) != n_layers:
      raise ValueError(f"noise: expected {n_layers} per-layer arrays, got {len(noise)}")
    batch = ws.shape[0]
    kw = dict(use_noise=self.use_noise, conv_clamp=self.conv_clamp,
              blur_kernel=self.blur_kernel)
    const = self.param("const", _normal_init(1.0), (4, 4, self.channels[0]))
    x = jnp.broadcast_to(const[None], (batch,) + const.shape)
    x = ModulatedConv(self.channels[0], name="conv_0", **kw)(
        x, ws[:, 0], self._layer_noise(0, batch, noise_mode, noise))
    rgb_kw = dict(img_channels=self.img_channels, conv_clamp=self.conv_clamp,
                  blur_kernel=self.blur_kernel)
    img = ToRGB(name="torgb_0", **rgb_kw)(x, ws[:, 1])
    for j in range(1, log2 - 1):
      i = 2 * j - 1
      x = ModulatedConv(self.channels[j], up=True, name=f"conv_{i}", **kw)(
          x, ws[:, i], self._layer_noise(i, batch, noise_mode, noise))
      x = ModulatedConv(self.channels[j], name=f"conv_{i + 1}", **kw)(
          x, ws[:, i + 1], self._layer_noise(i + 1, batch, noise_mode, noise))
      img = ToRGB(name=f"torgb_{j}", **rgb_kw)(x, ws[:, i + 2], img)
    return img


class StyleGAN2Generator(nn.Module):
  """StyleGAN2 generator: ``mapping`` (z → w) and ``synthesis`` (w+ → NHWC image).

  Attributes:
    resolution: output size R (power of two ≥ 4).
    channels: widths at 4, 8, ..., R (see :func:`rosinality_channels`,
      :func:`nvidia_channels`).
    z_dim: input latent size.
    w_dim: intermediate latent (style) size.
    n_mlp: mapping layers.
    mapping_hidden: mapping hidden width (None = w_dim).
    lr_mlp: mapping learning-rate multiplier (0.01).
    img_channels: output channels (3).
    use_noise: whether layers have noise inputs.
    conv_clamp: clamp conv/ToRGB outputs to ±conv_clamp (NVIDIA), None = off.
    blur_kernel: FIR taps for up-sampling.

  Methods (use with ``module.apply(variables, ..., method=...)``):
    ``map(z)`` → w (N, w_dim); ``latents(...)`` → ws (N, num_ws, w_dim);
    ``synthesize(ws, noise_mode, noise)`` → image; ``__call__`` = both.
  """
  resolution: int
  channels: tuple[int, ...]
  z_dim: int = 512
  w_dim: int = 512
  n_mlp: int = 8
  mapping_hidden: int | None = None
  lr_mlp: float = 0.01
  img_channels: int = 3
  use_noise: bool = True
  conv_clamp: float | None = None
  blur_kernel: tuple[float, ...] = (1, 3, 3, 1)

  def setup(self):
    self.mapping = MappingNetwork(self.w_dim, self.n_mlp, self.mapping_hidden, self.lr_mlp)
    self.synthesis = SynthesisNetwork(self.resolution, tuple(self.channels),
                                      self.img_channels, self.use_noise, self.conv_clamp,
                                      tuple(self.blur_kernel))
    self.latent_avg = self.variable("buffers", "latent_avg", jnp.zeros, (self.w_dim,))

  @property
  def num_ws(self) -> int:
    return num_ws(self.resolution)

  @property
  def num_layers(self) -> int:
    return num_conv_layers(self.resolution)

  def map(self, z: jax.Array) -> jax.Array:
    """Mapping network: z (N, z_dim) → w (N, w_dim)."""
    if z.ndim != 2 or z.shape[-1] != self.z_dim:
      raise ValueError(f"z: expected shape (N, {self.z_dim}), got {z.shape}")
    return self.mapping(z)

  def truncate(self, ws: jax.Array, truncation: float = 1.0,
               truncation_cutoff: int | None = None) -> jax.Array:
    """latent_avg + ψ (w − latent_avg) on ws (N, num_ws, w_dim), layers < cutoff only."""
    if isinstance(truncation, (int, float)) and truncation == 1:
      return ws
    avg = self.latent_avg.value
    t = avg + truncation * (ws - avg)
    if truncation_cutoff is None:
      return t
    return jnp.concatenate([t[:, :truncation_cutoff], ws[:, truncation_cutoff:]], axis=1)

  def latents(self, latents: jax.Array, *, input_space: str = "z", truncation: float = 1.0,
              truncation_cutoff: int | None = None, mix_latents: jax.Array | None = None,
              crossover: int | None = None) -> jax.Array:
    """Per-layer latents ws (N, num_ws, w_dim) from z, w or w+ inputs.

    Args:
      latents: (N, z_dim) for 'z', (N, w_dim) for 'w', (N, num_ws, w_dim) for 'w+'.
      input_space: 'z', 'w' or 'w+'.
      truncation: ψ; 1 = none.
      truncation_cutoff: truncate only ws[:, :cutoff] (NVIDIA), None = all.
      mix_latents: second latent in the same space ('z' or 'w'), for style mixing.
      crossover: ws[:, :crossover] come from ``latents``, the rest from ``mix_latents``.
    """
    if input_space not in INPUT_SPACES:
      raise ValueError(f"input_space: expected one of {INPUT_SPACES}, got {input_space!r}")
    n = self.num_ws
    if input_space == "w+":
      if latents.ndim != 3 or latents.shape[1:] != (n, self.w_dim):
        raise ValueError(
            f"latents: expected (N, {n}, {self.w_dim}) for 'w+', got {latents.shape}")
      if mix_latents is not None:
        raise ValueError("mix_latents: style mixing needs 'z' or 'w' inputs, got 'w+'")
      return self.truncate(latents, truncation, truncation_cutoff)

    def to_w(v):
      if input_space == "z":
        return self.map(v)
      if v.ndim != 2 or v.shape[-1] != self.w_dim:
        raise ValueError(f"latents: expected (N, {self.w_dim}) for 'w', got {v.shape}")
      return v

    w = to_w(latents)
    ws = jnp.broadcast_to(w[:, None], (w.shape[0], n, w.shape[1]))
    if mix_latents is not None:
      if crossover is None or not 0 <= int(crossover) <= n:
        raise ValueError(f"crossover: expected an int in [0, {n}] with mix_latents, "
                         f"got {crossover!r}")
      w2 = to_w(mix_latents)
      ws2 = jnp.broadcast_to(w2[:, None], (w2.shape[0], n, w2.shape[1]))
      ws = jnp.concatenate([ws[:, :crossover], ws2[:, crossover:]], axis=1)
    return self.truncate(ws, truncation, truncation_cutoff)

  def synthesize(self, ws: jax.Array, noise_mode: str = "const",
                 noise: Sequence[jax.Array] | None = None) -> jax.Array:
    """Synthesis network: ws (N, num_ws, w_dim) → image (N, R, R, img_channels)."""
    return self.synthesis(ws, noise_mode, noise)

  def __call__(self, latents: jax.Array, *, input_space: str = "z", truncation: float = 1.0,
               truncation_cutoff: int | None = None, mix_latents: jax.Array | None = None,
               crossover: int | None = None, noise_mode: str = "const",
               noise: Sequence[jax.Array] | None = None) -> jax.Array:
    """Image (N, R, R, img_channels) NHWC; arguments as :meth:`latents`, :meth:`synthesize`."""
    ws = self.latents(latents, input_space=input_space, truncation=truncation,
                      truncation_cutoff=truncation_cutoff, mix_latents=mix_latents,
                      crossover=crossover)
    return self.synthesize(ws, noise_mode, noise)


# ----------------------------------------------------------------------------------------
# Conveniences.


def layer_paths(module: StyleGAN2Generator,
                include_torgb: bool = False) -> list[tuple[str, ...]]:
  """Leaf paths of the memory kernels, indexed by the reference's layer numbering.

  ``layer_paths(g)[i] == ('params', 'synthesis', f'conv_{i}', 'memory', 'kernel')``;
  the Linen module path of that memory (for ``nn.intercept_methods``) is ``path[1:-1]``.
  Each kernel is HWIO (3, 3, C_in, C_out); its keys are x·s, one C_in vector per pixel
  of the layer's input.

  Args:
    module: the generator.
    include_torgb: also list the ToRGB memories ``('params', 'synthesis',
      f'torgb_{j}', 'memory', 'kernel')`` (1×1 kernels, no demodulation) after the
      conv layers.

  Returns:
    A list of path tuples; 1 + 2·(log2(R) − 2) conv layers (+ log2(R) − 1 ToRGBs).
  """
  paths = [("params", "synthesis", f"conv_{i}", "memory", "kernel")
           for i in range(num_conv_layers(module.resolution))]
  if include_torgb:
    paths += [("params", "synthesis", f"torgb_{j}", "memory", "kernel")
              for j in range(log2_resolution(module.resolution) - 1)]
  return paths


def sample_latents(n: int, z_dim: int = 512, seed: int = 1) -> np.ndarray:
  """Deterministic latents as the reference draws them.

  ``np.random.RandomState(seed).standard_normal(n * z_dim)`` reshaped to (n, z_dim), so
  latent i is the same whatever n ≥ i + 1 is.

  Args:
    n: number of latents.
    z_dim: latent size.
    seed: RandomState seed (the reference uses 1).

  Returns:
    (n, z_dim) float32.
  """
  if n < 0 or z_dim <= 0:
    raise ValueError(f"n, z_dim: expected n >= 0 and z_dim > 0, got {n}, {z_dim}")
  rs = np.random.RandomState(seed)
  return rs.standard_normal(n * z_dim).reshape(n, z_dim).astype(np.float32)


@functools.lru_cache(maxsize=32)
def _jitted_generate(module: StyleGAN2Generator, input_space: str, truncation: float,
                     truncation_cutoff: int | None, crossover: int | None, noise_mode: str,
                     layout: str, has_mix: bool, has_noise: bool, has_rng: bool):
  def run(variables, latents, mix, noise, rng):
    img = module.apply(
        variables, latents, input_space=input_space, truncation=truncation,
        truncation_cutoff=truncation_cutoff, mix_latents=mix if has_mix else None,
        crossover=crossover, noise_mode=noise_mode, noise=noise if has_noise else None,
        rngs={"noise": rng} if has_rng else None)
    return jnp.transpose(img, (0, 3, 1, 2)) if layout == "NCHW" else img
  return jax.jit(run)


def generate(module: StyleGAN2Generator, variables: Any, latents: Any, *,
             input_space: str = "z",
             truncation: float = 1.0, truncation_cutoff: int | None = None,
             mix_latents: Any = None, crossover: int | None = None,
             noise_mode: str = "const", noise: Sequence[Any] | None = None,
             rng: jax.Array | None = None, layout: str = "NHWC") -> jax.Array:
  """Jitted image generation (one compilation per module and option set).

  Args:
    module, variables: the generator as ``(module, variables)``.
    latents: (N, z_dim) / (N, w_dim) / (N, num_ws, w_dim) for 'z' / 'w' / 'w+'.
    input_space, truncation, truncation_cutoff, mix_latents, crossover: see
      :meth:`StyleGAN2Generator.latents`.
    noise_mode: 'const' (stored buffers), 'random' (needs ``rng``) or 'none'.
    noise: explicit per-layer noise, one (H, W) or (N, H, W) array per conv layer.
    rng: PRNG key for ``noise_mode='random'``.
    layout: 'NHWC' (default) or 'NCHW' for the returned images.

  Returns:
    Images (N, R, R, C) or (N, C, R, R), float32, roughly in [-1, 1].
  """
  if layout not in ("NHWC", "NCHW"):
    raise ValueError(f"layout: expected 'NHWC' or 'NCHW', got {layout!r}")
  if noise_mode == "random" and rng is None and noise is None:
    raise ValueError("rng: expected a PRNG key with noise_mode='random', got None")
  fn = _jitted_generate(module, input_space, float(truncation), truncation_cutoff,
                        None if crossover is None else int(crossover), noise_mode, layout,
                        mix_latents is not None, noise is not None, rng is not None)
  noise_arg = None if noise is None else [jnp.asarray(n, jnp.float32) for n in noise]
  return fn(variables, jnp.asarray(latents, jnp.float32),
            None if mix_latents is None else jnp.asarray(mix_latents, jnp.float32),
            noise_arg, rng)


def mean_latent(module: StyleGAN2Generator, variables: Any, n: int = 4096,
                seed: int = 0) -> np.ndarray:
  """Mean of the mapping network's output over deterministic latents.

  Args:
    module, variables: the generator.
    n: number of latents z (from :func:`sample_latents` with ``seed``).
    seed: RandomState seed.

  Returns:
    (w_dim,) float32, the mean w (a truncation centre).
  """
  z = sample_latents(n, module.z_dim, seed)
  w = jax.jit(lambda v, z: module.apply(v, z, method=StyleGAN2Generator.map))(variables, z)
  return np.asarray(jnp.mean(w, axis=0))


def generator_from_config(config: dict) -> StyleGAN2Generator:
  """Builds the :class:`StyleGAN2Generator` a conversion config describes.

  Args:
    config: dict with resolution, channels, z_dim, w_dim, n_mlp and optionally
      mapping_hidden, lr_mlp, img_channels, use_noise, conv_clamp, blur_kernel.

  Returns:
    The (unbound) module.

  Raises:
    ValueError: a required key is missing.
  """
  try:
    return StyleGAN2Generator(
        resolution=int(config["resolution"]), channels=tuple(int(c) for c in config["channels"]),
        z_dim=int(config["z_dim"]), w_dim=int(config["w_dim"]), n_mlp=int(config["n_mlp"]),
        mapping_hidden=(None if config.get("mapping_hidden") is None
                        else int(config["mapping_hidden"])),
        lr_mlp=float(config.get("lr_mlp", 0.01)),
        img_channels=int(config.get("img_channels", 3)),
        use_noise=bool(config.get("use_noise", True)),
        conv_clamp=(None if config.get("conv_clamp") is None else float(config["conv_clamp"])),
        blur_kernel=tuple(float(k) for k in config.get("blur_kernel", (1, 3, 3, 1))))
  except KeyError as e:
    raise ValueError(f"config: expected key {e.args[0]!r}, got keys {sorted(config)}") from None

