"""Sliced Wasserstein distance on Laplacian pyramids (Karras et al., ICLR 2018).

The image-quality measure of "Progressive Growing of GANs for Improved Quality, Stability,
and Variation" (appendix D), which needs no pretrained network. For two equally large
sets of images:

1. Each image (scaled to [0, 255]) is split into a Laplacian pyramid: with the binomial
   filter g = [1, 4, 6, 4, 1]/16 (separable, mirror borders, as ``cv2.pyrDown``/``pyrUp``),
   G₀ = x, G_{k+1} = down₂(g * G_k), L_k = G_k − 4·g * up₂(G_{k+1}) (zero insertion), and
   the last level keeps the low-pass G_K. Levels run from the full resolution down to
   ``min_resolution`` (16 px: three levels at 64 px).
2. From every level of every image, ``nhoods_per_image`` (128) neighbourhoods of
   ``nhood_size`` × ``nhood_size`` (7 × 7) pixels are cut at uniformly drawn centres,
   each a descriptor of 7·7·C values (ordered channel, row, column).
3. Each set's descriptors of one level are normalised per channel to zero mean and unit
   standard deviation (over all its neighbourhoods and their pixels).
4. The sliced Wasserstein distance between the two descriptor clouds: for
   ``dir_repeats`` × ``dirs_per_repeat`` (4 × 128 = 512) random unit directions, both
   clouds are projected, the projections sorted, and the mean absolute difference of the
   sorted values taken; the result is averaged over the directions.

Reported as in the paper: per level times 10³ (finest level first), and their mean.
Smaller is better; two sets drawn from the same distribution give a small value that
shrinks with the number of images.

Randomness comes from ``numpy.random.RandomState(seed)`` and is shared by both sets: the
neighbourhood centres depend on the image's index and the level, not on its content, and
the directions on the level alone. The same images therefore give exactly 0, and two
models compared against the same reference set with the same seed see the same draws
(common random numbers, a lower-variance comparison). Draw order, per level (finest
first): centres ``randint(h, S − h, size=(n, nhoods_per_image, 2))`` as (row, column),
then ``dir_repeats`` blocks of ``randn(dirs_per_repeat, descriptor_size)``, each row
normalised to unit length.

Pyramids and descriptors are computed in JAX (float32, a chunk of images at a time),
projections and sorting in numpy (float32, whose sort is far faster than XLA's on CPU);
descriptors of all images are kept (n · 128 · 147 float32 per level and set: 77 MB for
1024 RGB images). Two sets of 512 images at 64 px took 6–9 s on a shared 2-core CPU.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["laplacian_pyramid", "pyramid_resolutions", "sample_plan",
           "sliced_wasserstein", "swd", "to_pixels"]

BINOMIAL = (1.0, 4.0, 6.0, 4.0, 1.0)
NHOOD_SIZE = 7
NHOODS_PER_IMAGE = 128
DIR_REPEATS = 4
DIRS_PER_REPEAT = 128
MIN_RESOLUTION = 16


# ----------------------------------------------------------------------------------------
# Pyramids (NHWC, differentiable; also used by the distillation loss of the trainer).


def _binomial_blur(x: jax.Array, gain: float = 1.0) -> jax.Array:
  """Separable [1, 4, 6, 4, 1]/16 filter with mirror ('reflect') borders, NHWC, times gain."""
  taps = np.asarray(BINOMIAL, np.float64) / 16.0
  r = len(taps) // 2
  for axis, g in ((1, gain), (2, 1.0)):
    widths = [(0, 0)] * x.ndim
    widths[axis] = (r, r)
    xp = jnp.pad(x, widths, mode="reflect")
    n = x.shape[axis]
    x = sum(jax.lax.slice_in_dim(xp, t, t + n, axis=axis) * np.float32(tap * g)
            for t, tap in enumerate(taps))
  return x


def pyr_down(x: jax.Array) -> jax.Array:
  """Blur then keep every second row and column: (N, H, W, C) → (N, ⌈H/2⌉, ⌈W/2⌉, C)."""
  return _binomial_blur(x)[:, ::2, ::2]


def pyr_up(x: jax.Array) -> jax.Array:
  """Zero insertion then 4·blur: (N, H, W, C) → (N, 2H, 2W, C)."""
  n, h, w, c = x.shape
  up = jnp.zeros((n, h, 2, w, 2, c), x.dtype).at[:, :, 0, :, 0].set(x)
  return _binomial_blur(up.reshape(n, 2 * h, 2 * w, c), gain=4.0)


def laplacian_pyramid(images: jax.Array, num_levels: int) -> list[jax.Array]:
  """Laplacian pyramid, finest level first.

  Args:
    images: (N, H, W, C) float, H and W divisible by 2**(num_levels − 1).
    num_levels: number of levels (1 returns the images).

  Returns:
    ``num_levels`` arrays (N, H/2^k, W/2^k, C): band-pass levels L_0 … L_{K−1} and the
    low-pass residual last; summing the levels back up (``pyr_up`` from the coarsest)
    gives the images.
  """
  if images.ndim != 4:
    raise ValueError(f"images: expected (N, H, W, C), got shape {images.shape}")
  if num_levels < 1:
    raise ValueError(f"num_levels: expected an integer >= 1, got {num_levels}")
  div = 2 ** (num_levels - 1)
  if images.shape[1] % div or images.shape[2] % div:
    raise ValueError(f"images: expected H and W divisible by {div} for {num_levels} levels, "
                     f"got {images.shape[1]}×{images.shape[2]}")
  levels = [images]
  for _ in range(1, num_levels):
    down = pyr_down(levels[-1])
    levels[-1] = levels[-1] - pyr_up(down)
    levels.append(down)
  return levels


def pyramid_resolutions(resolution: int, min_resolution: int = MIN_RESOLUTION) -> list[int]:
  """Level sizes ``resolution, resolution/2, …`` down to ``min_resolution`` (inclusive)."""
  if resolution < min_resolution or min_resolution < NHOOD_SIZE:
    raise ValueError(f"resolution: expected >= min_resolution >= {NHOOD_SIZE}, got "
                     f"{resolution} and {min_resolution}")
  out = []
  res = resolution
  while res >= min_resolution:
    out.append(res)
    if res % 2:
      break
    res //= 2
  return out


# ----------------------------------------------------------------------------------------
# Descriptors and the distance.


def to_pixels(images: Any) -> np.ndarray:
  """Images as float32 pixel values in [0, 255], NHWC.

  uint8 images are taken as they are; float images are read as [-1, 1] (the generators'
  range) and mapped to [0, 255], rounded and clipped as when saved as 8-bit images.

  Raises:
    ValueError: not a 4-d array, or a dtype other than uint8 / float.
  """
  a = np.asarray(images)
  if a.ndim != 4:
    raise ValueError(f"images: expected (N, H, W, C), got shape {a.shape}")
  if a.dtype == np.uint8:
    return a.astype(np.float32)
  if a.dtype.kind != "f":
    raise ValueError(f"images: expected uint8 or float values, got {a.dtype}")
  return np.clip(np.rint((a.astype(np.float64) + 1.0) * 127.5), 0, 255).astype(np.float32)


def sample_plan(n_images: int, resolutions: Sequence[int], channels: int, seed: int = 0, *,
                nhood_size: int = NHOOD_SIZE, nhoods_per_image: int = NHOODS_PER_IMAGE,
                dir_repeats: int = DIR_REPEATS, dirs_per_repeat: int = DIRS_PER_REPEAT
                ) -> list[tuple[np.ndarray, np.ndarray]]:
  """The random draws of :func:`swd`, per level: (centres, directions).

  Returns:
    One ``(centres, directions)`` per resolution: centres (n_images, nhoods_per_image, 2)
    int (row, column), each in [h, S − h) with h = nhood_size // 2; directions
    (dir_repeats · dirs_per_repeat, channels · nhood_size²) float64 unit rows.
  """
  rs = np.random.RandomState(seed)
  h = nhood_size // 2
  dim = channels * nhood_size * nhood_size
  plan = []
  for res in resolutions:
    if res < nhood_size:
      raise ValueError(f"resolutions: expected levels of at least {nhood_size} px for "
                       f"{nhood_size}×{nhood_size} neighbourhoods, got {res}")
    centres = rs.randint(h, res - h, size=(n_images, nhoods_per_image, 2))
    dirs = []
    for _ in range(dir_repeats):
      d = rs.randn(dirs_per_repeat, dim)
      dirs.append(d / np.sqrt(np.sum(np.square(d), axis=1, keepdims=True)))
    plan.append((centres, np.concatenate(dirs, axis=0)))
  return plan


@functools.partial(jax.jit, static_argnames=("num_levels", "nhood_size"))
def _descriptors(pixels: jax.Array, centres: tuple[jax.Array, ...], num_levels: int,
                 nhood_size: int) -> list[jax.Array]:
  """Per level (n·P, C·k·k) descriptors (channel, row, column order) of a chunk."""
  h = nhood_size // 2
  offsets = jnp.arange(-h, h + 1)
  out = []
  for level, c in zip(laplacian_pyramid(pixels, num_levels), centres):
    n = level.shape[0]
    rows = c[:, :, 0, None, None] + offsets[:, None]            # (n, P, k, 1)
    cols = c[:, :, 1, None, None] + offsets[None, :]            # (n, P, 1, k)
    idx = jnp.arange(n)[:, None, None, None]
    patches = level[idx, rows, cols]                            # (n, P, k, k, C)
    patches = jnp.moveaxis(patches, -1, 2)                      # (n, P, C, k, k)
    out.append(patches.reshape(n * patches.shape[1], -1))
  return out


def _normalise(desc: np.ndarray, channels: int) -> np.ndarray:
  """Zero mean, unit standard deviation per channel over all descriptors and pixels."""
  d = desc.reshape(desc.shape[0], channels, -1).astype(np.float64)
  mean = d.mean(axis=(0, 2), keepdims=True)
  std = d.std(axis=(0, 2), keepdims=True)
  std = np.where(std > 0, std, 1.0)  # a constant channel stays 0 instead of NaN
  return ((d - mean) / std).reshape(desc.shape).astype(np.float32)


def sliced_wasserstein(a: Any, b: Any, directions: Any, block: int = 128) -> float:
  """Sliced Wasserstein distance between two equally large point clouds.

  Args:
    a, b: (M, D) descriptors.
    directions: (R, D) unit directions.
    block: directions projected and sorted at a time (bounds memory at 2·M·block floats).

  Returns:
    The mean over directions and sorted positions of |sort(a·d) − sort(b·d)|.
  """
  # numpy: its sort is many times faster than XLA's on CPU for these sizes.
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  directions = np.asarray(directions, np.float32)
  if a.ndim != 2 or a.shape != b.shape:
    raise ValueError(f"a, b: expected two (M, D) arrays of one shape, got {a.shape} and "
                     f"{b.shape}")
  if directions.ndim != 2 or directions.shape[1] != a.shape[1]:
    raise ValueError(f"directions: expected (R, {a.shape[1]}), got {directions.shape}")
  total = 0.0
  for start in range(0, len(directions), block):
    d = directions[start:start + block]
    pa = np.sort(d @ a.T, axis=1)   # (block, M): each direction's sorted projections
    pb = np.sort(d @ b.T, axis=1)
    total += float(np.sum(np.abs(pa - pb), dtype=np.float64))
  return total / (len(directions) * len(a))


def swd(images_a: Any, images_b: Any, *, seed: int = 0, nhood_size: int = NHOOD_SIZE,
        nhoods_per_image: int = NHOODS_PER_IMAGE, dir_repeats: int = DIR_REPEATS,
        dirs_per_repeat: int = DIRS_PER_REPEAT, min_resolution: int = MIN_RESOLUTION,
        chunk: int = 256) -> dict:
  """Per-level sliced Wasserstein distance between two image sets (paper defaults).

  Args:
    images_a, images_b: (N, R, R, C) NHWC, uint8 or float in [-1, 1] (see
      :func:`to_pixels`); the same N, R and C.
    seed: seed of the shared random draws (see :func:`sample_plan`).
    nhood_size, nhoods_per_image, dir_repeats, dirs_per_repeat, min_resolution: the
      descriptor and projection settings (7, 128, 4, 128, 16 in the paper).
    chunk: images per pyramid and descriptor pass.

  Returns:
    ``{"resolutions": [R, R/2, ...], "distances": [...], "mean": float}``, distances ×10³
    per level (finest first) and their mean.

  Raises:
    ValueError: sets of different shapes, non-square images, or sizes the pyramid
      cannot split.
  """
  a, b = to_pixels(images_a), to_pixels(images_b)
  if a.shape != b.shape:
    raise ValueError(f"images_a, images_b: expected the same (N, R, R, C), got {a.shape} "
                     f"and {b.shape}")
  n, res, res_w, channels = a.shape
  if res != res_w or n < 1:
    raise ValueError(f"images: expected at least one square image, got shape {a.shape}")
  if chunk < 1:
    raise ValueError(f"chunk: expected an integer >= 1, got {chunk}")
  resolutions = pyramid_resolutions(res, min_resolution)
  plan = sample_plan(n, resolutions, channels, seed, nhood_size=nhood_size,
                     nhoods_per_image=nhoods_per_image, dir_repeats=dir_repeats,
                     dirs_per_repeat=dirs_per_repeat)
  descs = []
  for images in (a, b):
    parts: list[list[np.ndarray]] = [[] for _ in resolutions]
    for start in range(0, n, chunk):
      stop = min(start + chunk, n)
      centres = tuple(jnp.asarray(c[start:stop], jnp.int32) for c, _ in plan)
      for k, d in enumerate(_descriptors(jnp.asarray(images[start:stop]), centres,
                                         len(resolutions), nhood_size)):
        parts[k].append(np.asarray(d))
    descs.append([_normalise(np.concatenate(p), channels) for p in parts])
  distances = [1e3 * sliced_wasserstein(da, db, dirs)
               for da, db, (_, dirs) in zip(descs[0], descs[1], plan)]
  return {"resolutions": resolutions, "distances": distances,
          "mean": float(np.mean(distances))}
