"""The DCGAN generator of the PyTorch tutorial, in Flax Linen.

Architecture (``ngf`` = 64 gives the tutorial's channel sizes 512, 256, 128, 64):

  z (N, z_dim) -> (N, 1, 1, z_dim)
  convt0: ConvTranspose(z_dim -> 8 ngf, 4x4, stride 1, torch padding 0)  -> 4x4,  bn0, ReLU
  convt1: ConvTranspose(8 ngf -> 4 ngf, 4x4, stride 2, torch padding 1)  -> 8x8,  bn1, ReLU
  convt2: ConvTranspose(4 ngf -> 2 ngf, ...)                             -> 16x16, bn2, ReLU
  convt3: ConvTranspose(2 ngf -> ngf, ...)                               -> 32x32, bn3, ReLU
  convt4: ConvTranspose(ngf -> channels, ...)                            -> 64x64, tanh

Every transposed convolution is a ``flax.linen.ConvTranspose`` (no bias) with an HWIO
kernel ``(4, 4, C_in, C_out)``: a layer's keys are per-pixel input vectors of dim ``C_in``.
The layers are :class:`OverlapAddConvTranspose`, a subclass with the same parameters and
outputs that computes the transposed convolution as one matrix product followed by an
overlap-add, which XLA runs faster on CPU than its input-dilated convolution. A torch
``ConvTranspose2d`` with padding ``p`` equals a Flax ``ConvTranspose`` with explicit padding
``k - 1 - p`` on each side and the torch kernel spatially flipped (see
``ports.dcgan.convert``). BatchNorm runs in inference mode on its running statistics
(``batch_stats`` collection), ``y = (x - mean) / sqrt(var + 1e-5) * scale + bias``.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
from flax.linen.linear import canonicalize_padding
from jax import lax

__all__ = ["BN_EPSILON", "DCGANGenerator", "KERNEL", "NUM_LAYERS",
           "OverlapAddConvTranspose", "RESOLUTION", "layer_channels", "torch_padding",
           "torch_stride"]

KERNEL = 4
NUM_LAYERS = 5
RESOLUTION = 64
BN_EPSILON = 1e-5


def layer_channels(z_dim: int, ngf: int, channels: int) -> list[int]:
  """Channel sizes ``[z_dim, 8 ngf, 4 ngf, 2 ngf, ngf, channels]`` along the network."""
  return [z_dim, ngf * 8, ngf * 4, ngf * 2, ngf, channels]


def torch_padding(layer: int) -> int:
  """The torch ``ConvTranspose2d`` padding of layer ``layer`` (0 for the first, else 1)."""
  return 0 if layer == 0 else 1


def torch_stride(layer: int) -> int:
  """The torch ``ConvTranspose2d`` stride of layer ``layer`` (1 for the first, else 2)."""
  return 1 if layer == 0 else 2


class OverlapAddConvTranspose(nn.ConvTranspose):
  """``nn.ConvTranspose`` computed as one GEMM and an overlap-add; same parameters, same outputs.

  Flax's transposed convolution (``transpose_kernel=False``) with stride ``s``, kernel ``k``
  and explicit padding ``(lo, hi)`` per spatial axis sends input pixel ``i`` through tap
  ``t`` to output position ``o = s i + lo - t``. With the kernel flipped, ``r = k - 1 - t``,
  and ``r = s q + rho`` for ``k = m s``, that is ``o + k - 1 - lo = s (i + q) + rho``: every
  input pixel writes an ``m x m`` block of ``s x s`` output cells. So

    Y = x @ flip(K)                     # (N h w, C_in) x (C_in, k k C_out)
    full[b, rho] = sum_q Y[b - q, q, rho]   # m^2 shifted adds, b < h + m - 1 (per axis)
    out = full[k - 1 - lo : k - 1 - lo + L]  # crop or zero-extend to the output size L

  where ``L = (h - 1) s + 1 + lo + hi - k + 1``. The product has exactly the flops of the
  convolution; the adds touch the output ``m^2`` times. Supported: 2-D inputs
  ``(N, H, W, C_in)`` (or without batch axis), kernel sizes that are multiples of the
  strides, explicit integer padding, no mask, no kernel dilation, ``transpose_kernel=False``;
  anything else raises ``ValueError``.

  Example:
    >>> import jax, jax.numpy as jnp, numpy as np, flax.linen as nn
    >>> kw = dict(features=3, kernel_size=(4, 4), strides=(2, 2), padding=((2, 2), (2, 2)))
    >>> x = jnp.ones((1, 5, 5, 2))
    >>> v = nn.ConvTranspose(**kw).init(jax.random.key(0), x)
    >>> y = OverlapAddConvTranspose(**kw).apply(v, x)
    >>> bool(np.allclose(y, nn.ConvTranspose(**kw).apply(v, x), atol=1e-5)), y.shape
    (True, (1, 10, 10, 3))
  """

  @nn.compact
  def __call__(self, inputs: jnp.ndarray) -> jnp.ndarray:
    k = _pair(self.kernel_size, "kernel_size")
    s = _pair(self.strides if self.strides is not None else 1, "strides")
    d = _pair(self.kernel_dilation if self.kernel_dilation is not None else 1,
              "kernel_dilation")
    pad = canonicalize_padding(self.padding, 2)
    explicit = not isinstance(pad, str)
    problems = []
    if inputs.ndim not in (3, 4):
      problems.append(f"inputs of shape (N, H, W, C) or (H, W, C), got {inputs.shape}")
    if not explicit:
      problems.append(f"explicit padding ((lo, hi), (lo, hi)), got {self.padding!r}")
    if any(ki % si for ki, si in zip(k, s)):
      problems.append(f"kernel_size a multiple of strides, got {k} and {s}")
    if d != (1, 1):
      problems.append(f"kernel_dilation 1, got {d}")
    if self.transpose_kernel:
      problems.append("transpose_kernel=False, got True")
    if self.mask is not None:
      problems.append("mask=None, got a mask")
    if problems:
      raise ValueError("OverlapAddConvTranspose: expected " + "; ".join(problems))
    unbatched = inputs.ndim == 3
    x = inputs[None] if unbatched else inputs
    n, h, w, c_in = x.shape
    kernel = self.param("kernel", self.kernel_init, k + (c_in, self.features),
                        self.param_dtype)
    bias = (self.param("bias", self.bias_init, (self.features,), self.param_dtype)
            if self.use_bias else None)
    x, kernel, bias = self.promote_dtype(x, kernel, bias, dtype=self.dtype)
    (mh, mw), c_out = (k[0] // s[0], k[1] // s[1]), self.features
    # flip(K) as (C_in, qh, rho_h, qw, rho_w, C_out), flattened to a matrix.
    weight = kernel[::-1, ::-1].reshape(mh, s[0], mw, s[1], c_in, c_out)
    weight = weight.transpose(4, 0, 1, 2, 3, 5).reshape(c_in, -1)
    y = lax.dot_general(x.reshape(-1, c_in), weight, (((1,), (0,)), ((), ())),
                        precision=self.precision,
                        preferred_element_type=self.preferred_element_type)
    y = y.reshape(n, h, w, mh, s[0], mw, s[1], c_out).transpose(0, 3, 5, 1, 4, 2, 6, 7)
    full = 0
    for qh in range(mh):
      for qw in range(mw):
        full = full + jnp.pad(y[:, qh, qw], ((0, 0), (qh, mh - 1 - qh), (0, 0),
                                             (qw, mw - 1 - qw), (0, 0), (0, 0)))
    full = full.reshape(n, (h + mh - 1) * s[0], (w + mw - 1) * s[1], c_out)
    crop = [(0, 0, 0)]
    for ki, si, (lo, hi), size, full_size in zip(k, s, pad, (h, w), full.shape[1:3]):
      start, length = ki - 1 - lo, (size - 1) * si + 1 + lo + hi - ki + 1
      crop.append((-start, start + length - full_size, 0))
    out = lax.pad(full, jnp.zeros((), full.dtype), crop + [(0, 0, 0)])
    if bias is not None:
      out = out + bias
    return out[0] if unbatched else out


def _pair(value, name: str) -> tuple[int, int]:
  value = (value, value) if isinstance(value, int) else tuple(value)
  if len(value) != 2:
    raise ValueError(f"OverlapAddConvTranspose: expected 2 values for {name}, got {value}")
  return value


class DCGANGenerator(nn.Module):
  """DCGAN generator: latents ``(N, z_dim)`` -> images ``(N, 64, 64, channels)`` in [-1, 1].

  Attributes:
    z_dim: latent size (100 in the tutorial).
    ngf: base feature count (64 in the tutorial).
    channels: image channels (3).
  """

  z_dim: int = 100
  ngf: int = 64
  channels: int = 3

  @nn.compact
  def __call__(self, z: jnp.ndarray) -> jnp.ndarray:
    if z.ndim != 2 or z.shape[-1] != self.z_dim:
      raise ValueError(f"z: expected shape (N, {self.z_dim}), got {tuple(z.shape)}")
    sizes = layer_channels(self.z_dim, self.ngf, self.channels)
    x = z.reshape(z.shape[0], 1, 1, self.z_dim)
    for i in range(NUM_LAYERS):
      pad = KERNEL - 1 - torch_padding(i)
      x = OverlapAddConvTranspose(
          sizes[i + 1], (KERNEL, KERNEL), strides=(torch_stride(i),) * 2,
          padding=((pad, pad), (pad, pad)), use_bias=False, name=f"convt{i}")(x)
      if i < NUM_LAYERS - 1:
        x = nn.BatchNorm(use_running_average=True, epsilon=BN_EPSILON, name=f"bn{i}")(x)
        x = nn.relu(x)
    return jnp.tanh(x)
