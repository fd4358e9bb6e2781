"""Context: the statistics C of a layer's keys and the edit subspace D of a few examples.

- :func:`collect_statistics` streams the latent sample through the generator and folds
  the layer's keys into C = E[k kᵀ] (:func:`memedit.layers.layer_covariance`: compiled,
  cached by content hash, resumable, multi-process).
- :func:`context_keys` gives the keys of context examples with their mask weights (masks
  resampled as :mod:`memedit.generators.paste` does).
- :func:`directions` gives D (rank r, C_in) by :func:`memedit.context_directions` (zca,
  svd, mean; optionally with C shrunk towards a multiple of the identity) or unit
  selection (the r units of largest normalised activation in the masks).
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np

from memedit import _io
from memedit.checks import (check_covariance, check_finite, check_positive_int,
                            expand_weights, weights_error, weights_fit)
from memedit.covariance import CovarianceState
from memedit.directions import context_directions
from memedit.generators._checks import check_imgnum, check_mask
from memedit.generators.forward import run_layer
from memedit.generators.generator import Generator, layer_info, layer_view
from memedit.generators.paste import mask_at
from memedit.layers.stats import layer_covariance
from memedit.specs import METHODS, check_shrinkage

__all__ = ["collect_statistics", "context_keys", "directions", "top_units", "unit_scores"]


def collect_statistics(gen: Generator, layer: str, num_samples: int = 1000, *,
                       batch_size: int = 50, cache_dir=None, progress: bool = True,
                       group: int = 4) -> CovarianceState:
  """Streams images 0..num_samples-1 through the generator and folds the layer's keys.

  The last batch holds the remainder when ``batch_size`` does not divide
  ``num_samples`` (it is folded exactly). Under ``jax.distributed`` each process runs
  every ``jax.process_count()``-th batch and all processes end with the statistics of all
  ``num_samples`` images.

  With ``cache_dir`` the state is cached under :func:`memedit.layers.layer_cache_key`
  (content hash of the parameters, the layer, the latents and the batching) and saved
  after every group of batches: an interrupted run resumes from its last save without
  recomputing those batches, and a finished one is read back.

  Args:
    gen: the generator. layer: the layer's name.
    num_samples: images 0..num_samples-1 make C.
    batch_size: latents per batch.
    cache_dir: statistics cache folder (None: no cache).
    progress: progress bar on stderr.
    group: batches folded by one compiled program.

  Returns:
    The :class:`memedit.CovarianceState`; C = ``memedit.second_moment(state)``.

  Example:
    >>> import memedit
    >>> from flax import nnx
    >>> model = nnx.Sequential(nnx.Linear(4, 12, rngs=nnx.Rngs(0)),
    ...                        lambda x: x.reshape(-1, 2, 2, 3))
    >>> gen = Generator(model, z_dim=4, resolution=2, layers={"fc": ("layers", 0)})
    >>> st = collect_statistics(gen, "fc", 10, batch_size=4, progress=False)
    >>> memedit.key_count(st), memedit.second_moment(st).shape
    (10, (4, 4))
  """
  for name, value in (("num_samples", num_samples), ("batch_size", batch_size)):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
      raise ValueError(f"{name}: expected a positive int, got {value!r}")
  view = layer_view(gen, layer)
  z = gen.latents(int(num_samples))
  batches = [z[i:i + batch_size] for i in range(0, int(num_samples), batch_size)]
  spec = None
  if cache_dir is not None:
    spec = {"latents": _io.tree_hash(z), "num_samples": int(num_samples),
            "batch_size": int(batch_size)}
  batches = batches[jax.process_index()::jax.process_count()]
  return layer_covariance(gen.model, view, batches, spec=spec, cache_dir=cache_dir,
                          group=group, devices=1, progress=progress,
                          call_kwargs=dict(gen.call_kwargs) or None)


def context_keys(gen: Generator, layer: str, examples: Sequence[tuple[int, Any]]
                 ) -> tuple[np.ndarray, np.ndarray]:
  """Keys and mask weights of context examples [(imgnum, canvas mask), ...].

  Args:
    gen: the generator. layer: the layer's name.
    examples: (imgnum, (R, R) mask) pairs: integer image numbers, masks in [0, 1] of
      the canvas's size R.

  Returns:
    (keys (n·h·h, C_in), weights (n·h·h,)) with the weights the masks resampled to the
    key resolution (:func:`memedit.generators.mask_at`).

  Raises:
    ValueError: no examples, or an example that is not an (imgnum, mask) pair; an image
      number that is not an integer in range; a mask
      that is not (R, R) or holds a value outside [0, 1] (or NaN).

  Example:
    >>> from flax import nnx
    >>> class Toy(nnx.Module):
    ...   def __init__(self):
    ...     self.up = nnx.ConvTranspose(3, 2, (4, 4), strides=(2, 2), rngs=nnx.Rngs(0))
    ...   def __call__(self, z):
    ...     return self.up(z.reshape(-1, 2, 2, 3))
    >>> gen = Generator(Toy(), 12, 4, {"up": ("up",)})
    >>> keys, w = context_keys(gen, "up", [(3, np.ones((4, 4))), (5, np.eye(4))])
    >>> keys.shape, np.round(w.astype(float), 3).tolist()
    ((8, 3), [1.0, 1.0, 1.0, 1.0, 0.388, 0.122, 0.122, 0.388])
  """
  if not examples:
    raise ValueError("key: expected at least one context example, got none")
  if isinstance(examples, (str, bytes)) or not isinstance(examples, Sequence):
    raise ValueError(f"examples: expected a list of (imgnum, mask) pairs, got "
                     f"{type(examples).__name__}")
  for j, item in enumerate(examples):
    if isinstance(item, (str, bytes)) or not isinstance(item, Sequence) or len(item) != 2:
      what = (f"a {type(item).__name__} of length {len(item)}"
              if isinstance(item, Sequence) else f"a value of type {type(item).__name__}")
      raise ValueError(f"examples[{j}]: expected an (imgnum, mask) pair, got {what} (a "
                       f"single example goes in a list: [(imgnum, mask)])")
  info = layer_info(gen, layer)
  nums = [check_imgnum(i, f"examples[{j}] imgnum") for j, (i, _) in enumerate(examples)]
  masks = [check_mask(m, gen.resolution, f"examples[{j}] mask")
           for j, (_, m) in enumerate(examples)]
  w = np.stack([mask_at(m, info.key_res) for m in masks])
  run = run_layer(gen, layer, gen.latents(nums))
  return run.keys.reshape(-1, info.key_dim), w.reshape(-1)


def unit_scores(C: Any, keys: Any, weights: Any) -> np.ndarray:
  """Normalised unit activation in the context: Σ w k_u / Σ w / √C_uu, per unit u.

  Args:
    C: (C_in, C_in) second moment. keys: (n, C_in). weights: (n,).

  Returns:
    (C_in,) float64 scores.

  Example:
    >>> unit_scores(np.diag([4.0, 1.0]), np.array([[2.0, 1.0]]), np.ones(1)).tolist()
    [1.0, 1.0]
  """
  k = np.asarray(keys, np.float64)
  w = np.asarray(weights, np.float64)
  mean = (w[:, None] * k).sum(0) / max(w.sum(), 1e-12)
  return mean / np.sqrt(np.maximum(np.diag(np.asarray(C, np.float64)), 1e-12))


def top_units(C: Any, keys: Any, weights: Any, r: int) -> np.ndarray:
  """The ``r`` units with the largest normalised activation in the context.

  Args:
    C, keys, weights: as :func:`unit_scores`. r: how many units.

  Returns:
    (r,) int64 unit indices, the best first.

  Example:
    >>> top_units(np.eye(3), np.array([[0.5, 2.0, 1.0]]), np.ones(1), 2).tolist()
    [1, 2]
  """
  s = unit_scores(C, keys, weights)
  if not 1 <= r <= s.size:
    raise ValueError(f"units: expected 1..{s.size}, got {r}")
  return np.argsort(-s, kind="stable")[:r]


def _check_unit_inputs(C: Any, keys: Any, weights: Any, rank: Any) -> None:
  """The eager checks :func:`memedit.context_directions` makes, for unit selection: C
  (d, d) finite, symmetric and PSD; keys (..., d) finite; weights fitting the keys, finite
  and non-negative; 1 <= rank <= min(d, keys, keys of positive weight)."""
  d = np.shape(C)[0] if np.ndim(C) == 2 else None
  check_covariance(C, d)
  k = np.asarray(keys)
  if k.ndim < 1 or k.shape[-1] != d:
    raise ValueError(f"keys: expected shape (..., {d}) to match C of shape {np.shape(C)}, "
                     f"got {tuple(k.shape)}")
  check_finite(k, "keys")
  n = int(np.prod(k.shape[:-1]))
  rank = check_positive_int(rank, "rank")
  if rank > n:
    raise ValueError(f"rank: expected at most the number of context keys ({n}), got {rank}")
  if rank > d:
    raise ValueError(f"rank: expected at most the key dimension ({d}), got {rank}")
  if weights is None:
    return
  w = np.asarray(weights)
  if not weights_fit(w.shape, k.shape[:-1]):
    raise weights_error("weights", w.shape, k.shape[:-1])
  w = np.asarray(expand_weights(w.astype(np.float32), k.shape[:-1])).reshape(-1)
  check_finite(w, "weights")
  if (w < 0).any():
    raise ValueError("weights: expected non-negative weights, got a negative one")
  if int((w > 0).sum()) < rank:
    raise ValueError(f"rank: expected at most the number of context keys with positive "
                     f"weight ({int((w > 0).sum())}), got {rank}")


def directions(C: Any, keys: Any, weights: Any, *, rank: int = 1, method: str = "zca",
               shrinkage: float = 0.0) -> np.ndarray:
  """The edit subspace D (rank, C_in) of context keys.

  "zca", "svd" and "mean" are :func:`memedit.context_directions`; "unit" gives one-hot
  rows of the :func:`top_units`. ``shrinkage`` α ∈ [0, 1) computes the zca, svd and mean
  directions with the shrunk second moment (1 − α) C + α μ I, μ = tr C / C_in, i.e.
  ``context_directions`` with ``ridge = α / (1 − α) · μ`` (the directions do not depend on
  C's overall scale). It damps the directions of C's smallest eigenvalues, where a few
  context keys say least about the keys of new images.

  Args:
    C: (C_in, C_in) second moment. keys: (n, C_in). weights: (n,) mask weights.
    rank: r. method: "zca", "svd", "mean" or "unit". shrinkage: α.

  Returns:
    (rank, C_in) float32 with orthonormal rows.

  Raises:
    ValueError: an unknown method or shrinkage; and for every method (as
      :func:`memedit.context_directions`): C not (C_in, C_in), finite, symmetric and PSD;
      keys of another width or not finite; weights that do not fit the keys, are not
      finite or are negative; a rank above the number of keys of positive weight.

  Example:
    >>> D = directions(np.eye(3), np.array([[1.0, 2.0, 0.0]]), np.ones(1), method="mean")
    >>> D.shape, [round(float(x), 4) for x in D[0]]
    ((1, 3), [0.4472, 0.8944, 0.0])
  """
  if method not in METHODS:
    raise ValueError(f"method: expected one of {METHODS}, got {method!r}")
  shrinkage = check_shrinkage(shrinkage, method)
  if method == "unit":
    _check_unit_inputs(C, keys, weights, rank)
    units = top_units(C, keys, weights, rank)
    D = np.zeros((rank, np.shape(C)[0]), np.float32)
    D[np.arange(rank), units] = 1.0
    return D
  ridge = 0.0
  if shrinkage > 0.0:
    mu = float(np.trace(np.asarray(C, np.float64))) / np.shape(C)[0]
    ridge = shrinkage / (1.0 - shrinkage) * mu
  return np.asarray(context_directions(C, keys, weights, rank=rank, method=method,
                                       ridge=ridge).D)
