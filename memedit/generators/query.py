"""Query tools: where and in which images a layer's keys match an edit's context.

A key k matches the context of directions D (rows orthonormal) by its match score ‖D k‖:
keys orthogonal to span(D) score 0 and are left unchanged by the edit. The reference
thresholds the scores at a high quantile (0.999) of their values over many pixels for its
heat maps, and ranks images by their best match.

Directions. The score is the length of k's projection onto span(D), which is ‖D k‖ when
D's rows are orthonormal (as :func:`memedit.context_directions` returns them). A D whose
rows are not orthonormal (max |D Dᵀ − I| above 1e-4, e.g. raw C⁻¹k* rows, rows of other
lengths or correlated rows) is orthonormalised first (an orthonormal basis of its rows'
span, in float64), so that every function here, and :mod:`memedit.metrics`, measures the
same subspace whatever basis of it is given. Its rows must then be independent: at most
C_in rows, and the smallest singular value above √ε (ε of float32) times the largest;
other D are refused.
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
  """How strongly each key falls in the edit subspace: ‖D k‖ for D's rows orthonormal, the
  length of k's projection onto span(D) for any D with independent rows (orthonormalised
  first, see the module docstring).

  Args:
    keys: (..., C_in) finite real keys. D: (r, C_in) finite real directions, orthonormal
      rows or r <= C_in independent ones.

  Returns:
    (...) float32 scores; keys orthogonal to span(D) score 0.

  Raises:
    ValueError: D not two-dimensional with at least one row, or not finite, or its rows
      not orthonormal and not independent (more than C_in rows, or linearly dependent
      ones: the message names max |D Dᵀ − I|); keys whose last axis is not D's C_in, or
      that are not finite; keys or D not of a real numeric dtype.

  Example:
    >>> match_scores(np.array([[3.0, 4.0], [0.0, 2.0]]), np.array([[1.0, 0.0]])).tolist()
    [3.0, 0.0]
  """
  keys = _numeric(keys, "keys")
  D = _numeric(D, "D")
  if D.ndim != 2 or keys.ndim < 1 or keys.shape[-1] != D.shape[1]:
    raise ValueError(f"keys, D: expected keys (..., C_in) and directions D (r, C_in) with "
                     f"the same C_in, got shapes {keys.shape} and {D.shape}")
  if D.shape[0] < 1:
    raise ValueError(f"D: expected at least one direction (r >= 1), got shape {D.shape}")
  bad = keys.size - int(np.isfinite(keys).sum())
  if bad:
    raise ValueError(f"keys: expected finite keys, got {bad} NaN or infinite of {keys.size}")
  proj = keys.astype(np.float32) @ _orthonormal_rows(D).T
  return np.sqrt((proj ** 2).sum(-1))


#: The largest max |D Dᵀ − I| taken as orthonormal rows as given (float32 rounding of an
#: orthonormal D stays far below it; a D rounded to float16 or bfloat16 does not).
_ORTHONORMAL_TOL = 1e-4


def _numeric(a: Any, name: str) -> np.ndarray:
  """``a`` as a real numeric array (bool, complex and other dtypes refused by name)."""
  arr = np.asarray(a)
  if arr.dtype == bool or not (jnp.issubdtype(arr.dtype, jnp.floating)
                               or jnp.issubdtype(arr.dtype, jnp.integer)):
    what = "directions" if name == "D" else name
    raise ValueError(f"{name}: expected a numeric array of {what}, got dtype {arr.dtype}")
  return arr


def _orthonormal_rows(D: np.ndarray) -> np.ndarray:
  """Finite (r, C_in) directions as float32 rows spanning the same subspace, orthonormal:
  D itself when max |D Dᵀ − I| <= _ORTHONORMAL_TOL, else an orthonormal basis of its rows'
  span (float64 SVD); rows that are not independent are refused."""
  bad = D.size - int(np.isfinite(D).sum())
  if bad:
    raise ValueError(f"D: expected finite values, got {bad} NaN or infinite of {D.size}")
  d = D.astype(np.float64)
  r, c = d.shape
  dev = float(np.abs(d @ d.T - np.eye(r)).max())
  if dev <= _ORTHONORMAL_TOL:
    return D.astype(np.float32)
  if r > c:
    raise ValueError(f"D: expected orthonormal rows (max |D Dᵀ − I| <= {_ORTHONORMAL_TOL:g}) "
                     f"or at most C_in = {c} independent ones, got {r} rows (shape {D.shape}) "
                     f"with max |D Dᵀ − I| = {dev:.3g}; pass a basis of the edit subspace, "
                     f"e.g. memedit.context_directions(...).D")
  _, sv, vt = np.linalg.svd(d, full_matrices=False)
  tol = float(np.sqrt(np.finfo(np.float32).eps))
  if not sv[-1] > tol * sv[0]:
    raise ValueError(
        f"D: expected {r} independent directions (rows orthonormal, max |D Dᵀ − I| <= "
        f"{_ORTHONORMAL_TOL:g}, or independent rows, which are orthonormalised), got rows "
        f"with max |D Dᵀ − I| = {dev:.3g} and singular values {sv[-1]:.3g} <= {tol:.3g} · "
        f"{sv[0]:.3g} (linearly dependent); drop the dependent rows, or use "
        f"memedit.context_directions(...).D")
  return vt.astype(np.float32)


def _check_directions(D: Any, key_dim: int, layer: str) -> np.ndarray:
  """D as float32 (r, C_in) orthonormal rows (see the module docstring) after checking it
  against the layer's key dimension."""
  arr = _numeric(D, "D")
  if arr.ndim != 2 or arr.shape[0] < 1 or arr.shape[1] != key_dim:
    raise ValueError(f"D: expected directions of shape (r, {key_dim}) with r >= 1 ({key_dim} "
                     f"the key dimension C_in of layer {layer!r}), got shape {arr.shape}")
  return _orthonormal_rows(arr)


def layer_scores(gen: Generator, layer: str, D: Any, imgnums: Sequence[int] | int, *,
                 batch_size: int = 64, params: Any = None) -> np.ndarray:
  """Match scores (N, h, h) of the images' keys at the layer.

  Args:
    gen, layer: the generator and layer name. D: (r, C_in) directions, r >= 1 and C_in the
      layer's key dimension: orthonormal rows, or independent rows (orthonormalised, see
      the module docstring).
    imgnums: image numbers (an int n: 0..n-1).
    batch_size: latents per compiled call, a positive int (the model runs only up to the
      layer).
    params: parameters to use instead of ``gen.params``.

  Returns:
    (N, h, h) float32 scores (N = 0 for no images: an empty array of that shape).

  Raises:
    ValueError: an unknown layer; D not a finite numeric (r, C_in) array, or with rows
      neither orthonormal nor independent (see :func:`match_scores`); image numbers
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
    The threshold (linear interpolation between the sorted scores).

  Raises:
    ValueError: a quantile outside (0, 1); no scores, or NaN or infinite ones.

  Example:
    >>> match_threshold(np.arange(101.0), 0.9)
    90.0
  """
  if isinstance(quantile, bool) or not isinstance(quantile, (int, float, np.floating)) or (
      not 0 < quantile < 1):
    raise ValueError(f"quantile: expected a number in (0, 1), got {quantile!r}")
  s = _finite_scores(scores).reshape(-1)
  if not s.size:
    raise ValueError(f"scores: expected at least one match score, got shape "
                     f"{np.shape(scores)}")
  return float(np.quantile(s, quantile))


def _finite_scores(scores: Any) -> np.ndarray:
  """Scores as a numeric array (float16 and bfloat16 as float32), refused when any is NaN
  or infinite."""
  s = np.asarray(scores)
  if not (jnp.issubdtype(s.dtype, jnp.floating) or jnp.issubdtype(s.dtype, jnp.integer)):
    raise ValueError(f"scores: expected numeric match scores, got dtype {s.dtype}")
  bad = s.size - int(np.isfinite(s).sum())
  if bad:
    raise ValueError(f"scores: expected finite match scores, got {bad} NaN or infinite of "
                     f"{s.size}")
  if jnp.issubdtype(s.dtype, jnp.floating) and s.dtype.itemsize < 4:
    s = s.astype(np.float32)  # quantiles and ratios in float16 or bfloat16 would round
  return s


def heatmaps(scores: Any, threshold: float, resolution: int) -> np.ndarray:
  """Heat maps of where the context matches: score / threshold clipped to [0, 1] and
  upsampled (nearest) to the canvas.

  Args:
    scores: (N, h, h) match scores. threshold: the match threshold.
    resolution: the canvas resolution R (a multiple of h).

  Returns:
    (N, R, R) float heat maps in [0, 1] (a threshold of 0: 1 wherever the score is
    positive).

  Raises:
    ValueError: scores that are not maps (N, h, h) (or one map (h, h)), or NaN or
      infinite ones; a threshold that is not a finite number >= 0; a resolution that is
      not a positive int multiple of the scores' last axis.

  Example:
    >>> heatmaps(np.array([[[0.5, 2.0]]]), 1.0, 4).shape
    (1, 2, 4)
  """
  scores = _finite_scores(scores)
  if scores.ndim < 2 or not scores.shape[-1]:
    raise ValueError(f"scores: expected match score maps (N, h, h), got shape {scores.shape}")
  if isinstance(threshold, bool) or not isinstance(threshold, (int, float, np.integer,
                                                               np.floating)) \
      or not np.isfinite(threshold) or threshold < 0:
    raise ValueError(f"threshold: expected a finite number >= 0, got {threshold!r}")
  if isinstance(resolution, bool) or not isinstance(resolution, (int, np.integer)) \
      or resolution < 1 or resolution % scores.shape[-1]:
    raise ValueError(f"resolution: expected a positive int multiple of the scores' size "
                     f"{scores.shape[-1]}, got {resolution!r}")
  s = np.clip(scores / max(float(threshold), 1e-12), 0.0, 1.0)
  return upsample_nearest(s, int(resolution) // s.shape[-1])


def rank_by_match(scores: Any, imgnums: Sequence[int]) -> list[tuple[int, float]]:
  """Image numbers sorted by their best match score (descending).

  Args:
    scores: (N, ...) match scores. imgnums: the N image numbers.

  Returns:
    [(imgnum, best score)], the best first (ties in the given order).

  Raises:
    ValueError: scores whose first axis is not the number of image numbers, images
      without scores, or NaN or infinite scores.

  Example:
    >>> rank_by_match(np.array([[0.1, 0.2], [0.9, 0.0]]), [7, 8])
    [(8, 0.9), (7, 0.2)]
  """
  scores = _finite_scores(scores)
  if scores.ndim < 1 or scores.shape[0] != len(imgnums) or (
      len(imgnums) and scores.size == 0):
    raise ValueError(f"scores, imgnums: expected scores (N, ...) of the N = {len(imgnums)} "
                     f"image numbers, got scores of shape {scores.shape}")
  if not len(imgnums):
    return []
  best = scores.reshape(len(imgnums), -1).max(-1)
  order = np.argsort(-best, kind="stable")
  return [(int(imgnums[i]), float(best[i])) for i in order]
