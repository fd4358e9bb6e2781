"""Query tools: where and in which images a layer's keys match an edit's context.

A key k matches the context of directions D (rows orthonormal) by its match score ‖D k‖:
keys orthogonal to span(D) score 0 and are left unchanged by the edit. The reference
thresholds the scores at a high quantile (0.999) of their values over many pixels for its
heat maps, and ranks images by their best match.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from memedit.generators._checks import check_batch_size
from memedit.generators.forward import _batches, keys_fn
from memedit.generators.generator import Generator, layer_view
from memedit.layers.conv import upsample_nearest

__all__ = ["heatmaps", "layer_scores", "match_scores", "match_threshold", "rank_by_match"]


def match_scores(keys: Any, D: Any) -> np.ndarray:
  """How strongly each key falls in the edit subspace: ‖D k‖ (D's rows orthonormal).

  Args:
    keys: (..., C_in). D: (r, C_in).

  Returns:
    (...) float32 scores; keys orthogonal to span(D) score 0.

  Raises:
    ValueError: D not two-dimensional, or keys whose last axis is not D's C_in.

  Example:
    >>> match_scores(np.array([[3.0, 4.0], [0.0, 2.0]]), np.array([[1.0, 0.0]])).tolist()
    [3.0, 0.0]
  """
  keys = np.asarray(keys, np.float32)
  D = np.asarray(D, np.float32)
  if D.ndim != 2 or keys.ndim < 1 or keys.shape[-1] != D.shape[1]:
    raise ValueError(f"keys, D: expected keys (..., C_in) and directions D (r, C_in) with "
                     f"the same C_in, got shapes {keys.shape} and {D.shape}")
  proj = keys @ D.T
  return np.sqrt((proj ** 2).sum(-1))


def _check_directions(D: Any, key_dim: int, layer: str) -> np.ndarray:
  """D as float32 (r, C_in) after checking it against the layer's key dimension."""
  arr = np.asarray(D)
  if not (jnp.issubdtype(arr.dtype, jnp.floating) or jnp.issubdtype(arr.dtype, jnp.integer)):
    raise ValueError(f"D: expected a numeric array of directions, got dtype {arr.dtype}")
  if arr.ndim != 2 or arr.shape[0] < 1 or arr.shape[1] != key_dim:
    raise ValueError(f"D: expected directions of shape (r, {key_dim}) with r >= 1 ({key_dim} "
                     f"the key dimension C_in of layer {layer!r}), got shape {arr.shape}")
  arr = arr.astype(np.float32)
  if not np.isfinite(arr).all():
    raise ValueError(f"D: expected finite values, got {int((~np.isfinite(arr)).sum())} NaN "
                     f"or infinite of {arr.size}")
  return arr


def layer_scores(gen: Generator, layer: str, D: Any, imgnums: Sequence[int] | int, *,
                 batch_size: int = 64, params: Any = None) -> np.ndarray:
  """Match scores (N, h, h) of the images' keys at the layer.

  Args:
    gen, layer: the generator and layer name. D: (r, C_in) directions, r >= 1 and C_in the
      layer's key dimension.
    imgnums: image numbers (an int n: 0..n-1).
    batch_size: latents per compiled call, a positive int (the model runs only up to the
      layer).
    params: parameters to use instead of ``gen.params``.

  Returns:
    (N, h, h) float32 scores (N = 0 for no images: an empty array of that shape).

  Raises:
    ValueError: an unknown layer; D not a finite numeric (r, C_in) array; image numbers
      :meth:`Generator.latents` refuses; ``batch_size`` not a positive int. All are
      checked before the model runs.

  Example:
    >>> from flax import nnx
    >>> model = nnx.Sequential(nnx.Linear(4, 12, rngs=nnx.Rngs(0)),
    ...                        lambda x: x.reshape(-1, 2, 2, 3))
    >>> gen = Generator(model, z_dim=4, resolution=2, layers={"fc": ("layers", 0)})
    >>> scores = layer_scores(gen, "fc", np.eye(4)[:1], 3)
    >>> scores.shape, bool(np.allclose(scores, np.abs(gen.latents(3)[:, 0])))
    ((3,), True)
  """
  D = _check_directions(D, layer_view(gen, layer).key_dim, layer)
  batch_size = check_batch_size(batch_size)
  z = gen.latents(imgnums)
  fn = keys_fn(gen, layer)
  params = gen.params if params is None else params
  if not len(z):  # the keys' shape from a shape-only trace of one latent
    keys = jax.eval_shape(fn, params, jnp.zeros((1, gen.z_dim), jnp.float32))
    return np.zeros((0,) + tuple(keys.shape[1:-1]), np.float32)
  # Batches padded to powers of two: a few program shapes serve every number of images.
  out = [match_scores(np.asarray(fn(params, zb))[:n], D) for n, (zb,) in _batches(z, batch_size)]
  return np.concatenate(out)


def match_threshold(scores: Any, quantile: float = 0.999) -> float:
  """The match threshold: the ``quantile`` of match scores over a sample of pixels.

  Args:
    scores: match scores of any shape. quantile: in (0, 1).

  Returns:
    The threshold.

  Example:
    >>> match_threshold(np.arange(101.0), 0.9)
    90.0
  """
  if isinstance(quantile, bool) or not isinstance(quantile, (int, float, np.floating)) or (
      not 0 < quantile < 1):
    raise ValueError(f"quantile: expected a number in (0, 1), got {quantile!r}")
  return float(np.quantile(np.asarray(scores).reshape(-1), quantile))


def heatmaps(scores: Any, threshold: float, resolution: int) -> np.ndarray:
  """Heat maps of where the context matches: score / threshold clipped to [0, 1] and
  upsampled (nearest) to the canvas.

  Args:
    scores: (N, h, h) match scores. threshold: the match threshold.
    resolution: the canvas resolution R (a multiple of h).

  Returns:
    (N, R, R) float heat maps in [0, 1].

  Example:
    >>> heatmaps(np.array([[[0.5, 2.0]]]), 1.0, 4).shape
    (1, 2, 4)
  """
  s = np.clip(np.asarray(scores) / max(threshold, 1e-12), 0.0, 1.0)
  if resolution % s.shape[-1]:
    raise ValueError(f"resolution: expected a multiple of the scores' size {s.shape[-1]}, "
                     f"got {resolution}")
  return upsample_nearest(s, resolution // s.shape[-1])


def rank_by_match(scores: Any, imgnums: Sequence[int]) -> list[tuple[int, float]]:
  """Image numbers sorted by their best match score (descending).

  Args:
    scores: (N, ...) match scores. imgnums: the N image numbers.

  Returns:
    [(imgnum, best score)], the best first (ties in the given order).

  Example:
    >>> rank_by_match(np.array([[0.1, 0.2], [0.9, 0.0]]), [7, 8])
    [(8, 0.9), (7, 0.2)]
  """
  best = np.asarray(scores).reshape(len(imgnums), -1).max(-1)
  order = np.argsort(-best, kind="stable")
  return [(int(imgnums[i]), float(best[i])) for i in order]
