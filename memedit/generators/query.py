"""Query tools: where and in which images a layer's keys match an edit's context.

A key k matches the context of directions D (rows orthonormal) by its match score ‖D k‖:
keys orthogonal to span(D) score 0 and are left unchanged by the edit. The reference
thresholds the scores at a high quantile (0.999) of their values over many pixels for its
heat maps, and ranks images by their best match.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax.numpy as jnp
import numpy as np

from memedit.generators.forward import keys_fn
from memedit.generators.generator import Generator
from memedit.layers.conv import upsample_nearest

__all__ = ["heatmaps", "layer_scores", "match_scores", "match_threshold", "rank_by_match"]


def match_scores(keys: Any, D: Any) -> np.ndarray:
  """How strongly each key falls in the edit subspace: ‖D k‖ (D's rows orthonormal).

  Args:
    keys: (..., C_in). D: (r, C_in).

  Returns:
    (...) float32 scores; keys orthogonal to span(D) score 0.

  Example:
    >>> match_scores(np.array([[3.0, 4.0], [0.0, 2.0]]), np.array([[1.0, 0.0]])).tolist()
    [3.0, 0.0]
  """
  proj = np.asarray(keys, np.float32) @ np.asarray(D, np.float32).T
  return np.sqrt((proj ** 2).sum(-1))


def layer_scores(gen: Generator, layer: str, D: Any, imgnums: Sequence[int] | int, *,
                 batch_size: int = 64, params: Any = None) -> np.ndarray:
  """Match scores (N, h, h) of the images' keys at the layer.

  Args:
    gen, layer: the generator and layer name. D: (r, C_in) directions.
    imgnums: image numbers (an int n: 0..n-1).
    batch_size: latents per compiled call (the model runs only up to the layer).
    params: parameters to use instead of ``gen.params``.

  Returns:
    (N, h, h) float32 scores.

  Example:
    >>> from flax import nnx
    >>> model = nnx.Sequential(nnx.Linear(4, 12, rngs=nnx.Rngs(0)),
    ...                        lambda x: x.reshape(-1, 2, 2, 3))
    >>> gen = Generator(model, z_dim=4, resolution=2, layers={"fc": ("layers", 0)})
    >>> scores = layer_scores(gen, "fc", np.eye(4)[:1], 3)
    >>> scores.shape, bool(np.allclose(scores, np.abs(gen.latents(3)[:, 0])))
    ((3,), True)
  """
  z = gen.latents(imgnums)
  fn = keys_fn(gen, layer)
  params = gen.params if params is None else params
  out = [match_scores(np.asarray(fn(params, jnp.asarray(z[i:i + batch_size]))), D)
         for i in range(0, len(z), batch_size)]
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
