"""The UI's one doorway into memedit's rewriting workflow.

Every call the UI makes into the generator workflow (:mod:`memedit.generators`) and the
metrics (:mod:`memedit.metrics`) is a function here, taking and returning plain values
(numpy arrays, uint8 images, :class:`Outcome`), so that the rest of the UI does not
depend on how the workflow is organised.

Regions are (imgnum, uint8 (R, R) mask) pairs at canvas resolution R; boxes are
(y0, y1, x0, x1) on the canvas, half-open.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import jax
import numpy as np

import memedit
from memedit import generators as gens
from memedit import metrics

__all__ = ["Outcome", "collect_statistics", "context_directions", "copy_box", "describe",
           "evaluate", "heatmaps", "match_scores", "match_threshold", "open_generator",
           "paste_preview", "rank_by_match", "render", "run_overfit", "run_spec"]


class Outcome(NamedTuple):
  """An edit and what produced it.

  Attributes:
    edit: the :class:`memedit.Edit`.
    directions: (r, C_in) the context directions (None: none, e.g. the overfit baseline).
    target_value: (C_out,) the mean copied value (None for an erase).
    losses: (steps,) the solver's loss before each step.
    loss_before, loss_after: L1 loss at the paste crop before and after the edit.
  """

  edit: Any
  directions: Any
  target_value: Any
  losses: np.ndarray
  loss_before: float
  loss_after: float


def _f(mask) -> np.ndarray:
  return np.asarray(mask, np.float32) / 255.0


def open_generator(model: str, truncation: float | None = None):
  """The generator of a converted checkpoint directory (as ``memedit rewrite`` opens it)."""
  return gens.generator_from_converted(model, truncation=truncation)


def describe(gen) -> dict:
  """{"layers": sorted names, "resolution": R, "architecture", "params": the original
  parameters}."""
  return {"layers": sorted(gen.layers), "resolution": int(gen.resolution),
          "architecture": gen.architecture, "params": gen.params}


def _value_res(gen, layer: str) -> int:
  return gens.layer_info(gen, layer).value_res


def _canvas_box(gen, box, res) -> list[int]:
  f = gen.resolution / res
  return [int(round(v * f)) for v in box]


def collect_statistics(gen, layer: str, samples: int, batch_size: int, cache_dir) -> np.ndarray:
  """C = E[k kᵀ] (C_in, C_in) float32 of ``layer`` over images 0..samples-1, from (and
  into) the statistics cache ``cache_dir``, as ``memedit stats``; the progress bar is
  written on stderr."""
  state = gens.collect_statistics(gen, layer, samples, batch_size=batch_size,
                                     cache_dir=cache_dir, progress=True)
  return np.asarray(memedit.second_moment(state), np.float32)


def render(gen, imgnums: Sequence[int], params: Any) -> np.ndarray:
  """uint8 (N, R, R, C) images of ``imgnums`` with ``params``."""
  return gens.to_uint8(gens.generate_images(gen, gen.latents(list(imgnums)), params=params))


def copy_box(gen, layer: str, region) -> list[int]:
  """The canvas box of the values Copy takes from ``region``."""
  copied = gens.copy_values(gen, layer, region[0], _f(region[1]))
  return _canvas_box(gen, copied.box, _value_res(gen, layer))


def _target(gen, layer, copy, paste):
  copied = gens.copy_values(gen, layer, copy[0], _f(copy[1]))
  return copied, gens.paste_target(gen, layer, copied, paste[0], _f(paste[1]))


def paste_preview(gen, layer: str, copy, paste) -> tuple[np.ndarray, list[int]]:
  """(uint8 (R, R, C) image, canvas box): image ``paste[0]`` with the copied values
  written at the layer where ``paste`` puts them (the target v* rendered), and their box."""
  _, target = _target(gen, layer, copy, paste)
  run = gens.run_layer(gen, layer, gen.latents([paste[0]]),
                          paste_values=target.full_values, paste_alpha=target.full_alpha)
  box = gens.bbox(target.full_alpha[0])
  return gens.to_uint8(run.images)[0], _canvas_box(gen, box, _value_res(gen, layer))


def context_directions(gen, layer: str, C, regions, *, method: str, rank: int,
                       shrinkage: float) -> np.ndarray:
  """D (rank, C_in) of the context regions [(imgnum, mask), ...]."""
  keys, weights = gens.context_keys(gen, layer, [(i, _f(m)) for i, m in regions])
  return np.asarray(gens.directions(C, keys, weights, rank=rank, method=method,
                                       shrinkage=shrinkage))


def match_scores(gen, layer: str, D, imgnums: Sequence[int]) -> np.ndarray:
  """‖D k‖ (N, h, h) for the keys of ``imgnums`` at ``layer``."""
  return gens.layer_scores(gen, layer, D, list(imgnums))


def match_threshold(scores, quantile: float) -> float:
  """The ``quantile`` of ``scores``."""
  return gens.match_threshold(scores, quantile)


def heatmaps(scores, threshold: float, resolution: int) -> np.ndarray:
  """(N, R, R) in [0, 1]: score / threshold, clipped, on the canvas."""
  return gens.heatmaps(scores, threshold, resolution)


def rank_by_match(scores, imgnums: Sequence[int]) -> list[tuple[int, float]]:
  """[(imgnum, best score)] from the best match down."""
  return gens.rank_by_match(scores, list(imgnums))


def run_spec(gen, spec, C, *, directions=None, progress=None) -> Outcome:
  """The edit of a validated :class:`memedit.specs.EditSpec`, as ``memedit rewrite``
  makes it; ``directions``: its D when already computed (:func:`context_directions` of
  the spec's context, method, rank and shrinkage with this C); ``progress(step, loss)``:
  the solve's progress hook (:func:`memedit.solve_lambda`)."""
  out = gens.edit_from_spec(gen, spec, C, directions=directions, progress=progress)
  res = out.result
  return Outcome(res.edit, np.asarray(res.D),
                 None if out.copied is None else np.asarray(out.copied.mean_value),
                 np.asarray(res.losses), float(res.loss_before), float(res.loss_after))


def run_overfit(gen, layer: str, copy, paste, *, steps: int, learning_rate: float,
                progress=None) -> Outcome:
  """The paper's overfit baseline (every weight of the layer) on a copy and paste;
  ``progress(step, loss)``: called between chunks of its steps (an exception it raises
  stops the run)."""
  copied, target = _target(gen, layer, copy, paste)
  res = gens.overfit(gen, layer, target, steps=steps, learning_rate=learning_rate,
                     progress=progress)
  return Outcome(res.edit, None, np.asarray(copied.mean_value), np.asarray(res.losses),
                 float(res.loss_before), float(res.loss_after))


def evaluate(gen, layer: str, D, edit, imgnums: Sequence[int], *, target_value,
             quantile: float, pictured: int, progress=None,
             batch_size: int = 64) -> tuple[dict, np.ndarray]:
  """(metrics of ``memedit evaluate`` for ``edit`` alone on ``imgnums``, uint8 strip of
  original | edited pairs for the first ``pictured`` of them). The original and the
  edited generator run ``batch_size`` latents at a time; ``progress(done, total)`` is
  called before each batch and at the end (``total``: twice the number of latents; an
  exception it raises stops the evaluation there)."""
  params, _ = memedit.apply_edit(gen.params, edit)
  nums = list(imgnums)
  z = gen.latents(nums)
  total, runs = 2 * len(nums), []
  for which in (None, params):
    parts = []
    for i in range(0, len(nums), batch_size):
      if progress is not None:
        progress(len(runs) * len(nums) + i, total)
      parts.append(gens.run_layer(gen, layer, z[i:i + batch_size], params=which,
                                  batch_size=batch_size))
    runs.append(jax.tree_util.tree_map(lambda *a: np.concatenate(a), *parts))
  if progress is not None:
    progress(total, total)
  m = metrics.evaluate_edit(gen, layer, D, params, nums, target_value=target_value,
                            quantile=quantile, batch_size=batch_size, original=runs[0],
                            edited=runs[1])
  # The strip shows images the runs above already made (not the generators run again).
  strip = gens.comparison_grid(runs[0].images[:pictured], runs[1].images[:pictured],
                               columns=4, scale=2)
  return m, strip
