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

The layers (upfirdn2d, EqualLinear, the modulated convolution and its memory, ToRGB, the
mapping network) live in :mod:`ports.stylegan2.layers` and are re-exported here; this
module assembles them into :class:`StyleGAN2Generator` and holds the conveniences
(:func:`generate`, :func:`layer_paths`, ...).
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ports.stylegan2.layers import (SQRT2, EqualLinear, MappingNetwork, ModulatedConv,
                                    ModulatedConvMemory, ToRGB, demodulation,
                                    leaky_relu_gain, normal_init, pixel_norm, upfirdn2d)

__all__ = ["EqualLinear", "INPUT_SPACES", "MappingNetwork", "ModulatedConv",
           "ModulatedConvMemory", "NOISE_MODES", "SQRT2", "StyleGAN2Generator",
           "SynthesisNetwork", "ToRGB", "demodulation", "generate", "generator_from_config",
           "layer_paths", "layer_resolution", "leaky_relu_gain", "log2_resolution",
           "mean_latent", "num_conv_layers", "num_ws", "nvidia_channels", "pixel_norm",
           "rosinality_channels", "sample_latents", "upfirdn2d"]

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
    const = self.param("const", normal_init(1.0), (4, 4, self.channels[0]))
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
