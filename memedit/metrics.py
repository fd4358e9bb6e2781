"""Measuring an edit on held-out latents without external models.

For N latents the original and the edited generator are run with the layer observed:

- **Context match.** A key matches the context when its match score ‖D k‖ (D's rows
  orthonormal; a D with other independent rows is orthonormalised first) exceeds a
  threshold, the ``quantile`` of scores over the same latents' pixels. Reported: the
  share of latents with at least one matching key and the share of matching keys.
- **Efficacy.** In matched positions (key positions mapped to the layer's output), how
  far the layer's output moved towards the pasted value v̄ (the mask-weighted mean of the
  copied values): mean cosine(v, v̄) before and after, and the normalised distance
  ‖v − v̄‖ / ‖v̄‖ before and after; ``moved`` = 1 − after / before of that distance.
- **Specificity.** Mean absolute pixel change (images in [-1, 1], averaged over channels)
  inside matched regions and outside them, their ratio, and the mean change on latents
  with no matching key at all. ``specificity`` takes the canvas cells of the matched keys
  themselves as the inside; ``specificity_footprint`` widens each matched key by one key
  pixel on every side (a key's value spreads into its neighbours' cells through the
  layer's kernel and the layers after it).

Undefined cases get documented values, never NaN: a region with no pixels (nothing or
everything matched) has mean change 0.0 (``inside_share_of_pixels`` tells which); the
ratio is None (JSON null) when no pixel is inside or nothing changed outside (0/0 or x/0);
``unmatched_mean_abs_change`` is None when every latent matches; ``efficacy`` is left out
when no key matches (or no ``target_value`` is given), and its ``moved`` is None when the
values already were v̄; a zero value vector counts as cosine 0.

:func:`evaluate_edit` measures at one quantile (or a fixed threshold);
:func:`evaluate_at_quantiles` at several from one run of each generator. The 0.999 quantile
the reference uses for its heat maps rests on N·h·w/1000 keys: use a few thousand latents.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from memedit.generators._checks import image_numbers
from memedit.generators.forward import LayerRun, run_layer
from memedit.generators.generator import Generator, layer_info
from memedit.generators.query import _check_directions, match_scores, match_threshold
from memedit.layers.conv import upsample_nearest

__all__ = ["evaluate_at_quantiles", "evaluate_edit"]


def _upsample(mask: np.ndarray, res: int) -> np.ndarray:
  return upsample_nearest(mask, res // mask.shape[-1])


def _dilate(mask: np.ndarray) -> np.ndarray:
  """Binary dilation by one pixel (3×3) over the last two axes."""
  p = np.pad(mask, [(0, 0)] * (mask.ndim - 2) + [(1, 1), (1, 1)])
  h, w = mask.shape[-2:]
  out = np.zeros_like(mask)
  for dy in range(3):
    for dx in range(3):
      out |= p[..., dy:dy + h, dx:dx + w]
  return out


def _specificity(dimg, inside_mask, any_match):
  inside = float(dimg[inside_mask].mean()) if inside_mask.any() else 0.0
  outside = float(dimg[~inside_mask].mean()) if (~inside_mask).any() else 0.0
  return {
      "inside_mean_abs_change": inside,
      "outside_mean_abs_change": outside,
      "ratio": inside / outside if inside_mask.any() and outside > 0 else None,
      "inside_share_of_pixels": float(inside_mask.mean()),
      "unmatched_latents": int((~any_match).sum()),
      "unmatched_mean_abs_change": (float(dimg[~any_match].mean())
                                    if (~any_match).any() else None),
      "all_mean_abs_change": float(dimg.mean()),
  }


def _check_target(target_value: Any, value_dim: int, layer: str) -> np.ndarray:
  """The pasted value v̄ as float64 (C_out,) after checking it: finite and non-zero (the
  normalised distance divides by ‖v̄‖ and the cosine is undefined for v̄ = 0)."""
  arr = np.asarray(target_value)
  if not (jnp.issubdtype(arr.dtype, jnp.floating) or jnp.issubdtype(arr.dtype, jnp.integer)):
    raise ValueError(f"target_value: expected a numeric array, got dtype {arr.dtype}")
  if arr.shape != (value_dim,):
    raise ValueError(f"target_value: expected the pasted value of shape ({value_dim},) (the "
                     f"value dimension C_out of layer {layer!r}), got shape {arr.shape}")
  arr = arr.astype(np.float64)
  if not np.isfinite(arr).all():
    raise ValueError(f"target_value: expected finite values, got "
                     f"{int((~np.isfinite(arr)).sum())} NaN or infinite of {arr.size}")
  if not np.linalg.norm(arr) > 0:
    raise ValueError("target_value: expected a non-zero pasted value (distances are "
                     "relative to its norm), got all zeros")
  return arr


def _check_params(edited_params: Any, gen: Generator) -> None:
  """Refuses edited parameters that cannot be the generator's (checked before the models
  run, whose own errors name neither argument nor fix)."""
  if edited_params is None or isinstance(edited_params, Generator):
    raise ValueError(f"edited_params: expected the edited generator's parameters (e.g. "
                     f"edited(gen, edit)[0].params), got "
                     f"{'None' if edited_params is None else 'a Generator'}")
  want = jax.tree_util.tree_leaves(gen.params)
  got = jax.tree_util.tree_leaves(edited_params)
  if len(got) != len(want):
    raise ValueError(f"edited_params: expected a parameter tree like gen.params with "
                     f"{len(want)} leaves (e.g. edited(gen, edit)[0].params), got "
                     f"{len(got)} leaves")
  for i, (a, b) in enumerate(zip(want, got)):
    if np.shape(a) != np.shape(b):
      raise ValueError(f"edited_params: expected leaf {i} of shape {np.shape(a)}, as in "
                       f"gen.params, got shape {np.shape(b)}")


def _cos(v, t):
  return (v @ t) / np.maximum(np.linalg.norm(v, axis=-1) * np.linalg.norm(t), 1e-12)


def evaluate_edit(gen: Generator, layer: str, D: Any, edited_params: Any,
                  imgnums: Sequence[int], *, target_value: Any = None,
                  quantile: float = 0.99, threshold: float | None = None,
                  batch_size: int = 64, original: LayerRun | None = None,
                  edited: LayerRun | None = None) -> dict:
  """Context match, efficacy and specificity of an edit on held-out latents.

  Args:
    gen: the original generator.
    layer: the edited layer's name.
    D: (r, C_in) the edit's directions (its context subspace): orthonormal rows, or
      independent rows, which are orthonormalised first (the scores are then the lengths
      of the keys' projections onto span(D); see :mod:`memedit.generators.query`).
    edited_params: the edited generator's parameters (e.g. ``edited(gen, edit)[0].params``).
    imgnums: held-out image numbers, each at most once.
    target_value: (C_out,) the pasted value v̄ for the efficacy numbers (None: skipped).
    quantile: match threshold quantile over the held-out pixels' scores.
    threshold: a fixed threshold instead of the quantile.
    batch_size: latents per compiled call.
    original: the unedited generator's :class:`memedit.generators.LayerRun` on
      ``gen.latents(imgnums)``, to reuse across calls (None: run here).
    edited: the edited generator's (``edited_params``) :class:`LayerRun` on
      ``gen.latents(imgnums)``, e.g. run batch by batch by a caller that may stop between
      batches (None: run here).

  Returns:
    A JSON-serialisable dict (see the module docstring for the fields).

  Raises:
    ValueError: a quantile outside (0, 1), a threshold that is not a finite number, no
      image numbers, an image number given twice (the message names the repeated
      numbers), ``edited_params`` None, a Generator or a tree with other leaves than
      ``gen.params`` (their number or shapes), D not a finite numeric (r, C_in) array, or
      with rows neither orthonormal nor independent (more than C_in rows, or dependent
      ones), a ``target_value`` not a finite non-zero (C_out,) vector (the arguments are
      checked before the models run); images, or the layer's keys or values, with NaN or
      infinite values (a model or an edit with non-finite or overflowing weights).

  Example:
    >>> from flax import nnx
    >>> from memedit.generators import edited, unit_zeroing_edit
    >>> class Toy(nnx.Module):
    ...   def __init__(self):
    ...     self.up = nnx.ConvTranspose(3, 2, (4, 4), strides=(2, 2), rngs=nnx.Rngs(0))
    ...   def __call__(self, z):
    ...     return self.up(z.reshape(-1, 4, 4, 3))
    >>> gen = Generator(Toy(), 48, 8, {"up": ("up",)})
    >>> new, _ = edited(gen, unit_zeroing_edit(gen, "up", [0]))
    >>> m = evaluate_edit(gen, "up", np.eye(3)[:1], new.params, range(10, 14), quantile=0.9)
    >>> m["num_latents"], m["context_match"]["pixels"], m["specificity"]["ratio"] > 1
    (4, 0.109375, True)
  """
  return _evaluate(gen, layer, D, edited_params, imgnums, [quantile], threshold,
                   target_value, batch_size, original, edited)[0]


def evaluate_at_quantiles(gen: Generator, layer: str, D: Any, edited_params: Any,
                          imgnums: Sequence[int], quantiles: Sequence[float], *,
                          target_value: Any = None, batch_size: int = 64,
                          original: LayerRun | None = None,
                          edited: LayerRun | None = None) -> list[dict]:
  """:func:`evaluate_edit` at several match quantiles from one run of each generator.

  Args:
    gen, layer, D, edited_params, imgnums, target_value, batch_size, original, edited: as
      for :func:`evaluate_edit`.
    quantiles: match threshold quantiles, each in (0, 1).

  Returns:
    One dict per quantile, the i-th equal to ``evaluate_edit(..., quantile=quantiles[i])``.
    The edited generator runs once, and the original once (not at all when ``original``
    is given), whatever the number of quantiles.

  Example:
    >>> from flax import nnx
    >>> from memedit.generators import edited, unit_zeroing_edit
    >>> class Toy(nnx.Module):
    ...   def __init__(self):
    ...     self.up = nnx.ConvTranspose(3, 2, (4, 4), strides=(2, 2), rngs=nnx.Rngs(0))
    ...   def __call__(self, z):
    ...     return self.up(z.reshape(-1, 4, 4, 3))
    >>> gen = Generator(Toy(), 48, 8, {"up": ("up",)})
    >>> new, _ = edited(gen, unit_zeroing_edit(gen, "up", [0]))
    >>> ms = evaluate_at_quantiles(gen, "up", np.eye(3)[:1], new.params, range(10, 14),
    ...                            [0.5, 0.9])
    >>> [m["context_match"]["pixels"] for m in ms]
    [0.5, 0.109375]
  """
  if not quantiles:
    raise ValueError("quantiles: expected at least one quantile, got none")
  return _evaluate(gen, layer, D, edited_params, imgnums, list(quantiles), None,
                   target_value, batch_size, original, edited)


def _evaluate(gen, layer, D, edited_params, imgnums, quantiles, threshold, target_value,
              batch_size, original, edited=None) -> list[dict]:
  for q in quantiles:
    if isinstance(q, bool) or not isinstance(q, (int, float, np.floating)) or not 0 < q < 1:
      raise ValueError(f"quantile: expected a number in (0, 1), got {q!r}")
  nums = image_numbers(imgnums)
  values, counts = np.unique(nums, return_counts=True)
  repeated = values[counts > 1].tolist()
  if repeated:
    more = f" and {len(repeated) - 8} more" if len(repeated) > 8 else ""
    raise ValueError(f"imgnums: expected distinct image numbers (each latent measured once), "
                     f"got repeated {repeated[:8]}{more} in {len(nums)} numbers")
  if not nums.size:
    raise ValueError("imgnums: expected at least one held-out image number, got none")
  info = layer_info(gen, layer)
  D = _check_directions(D, info.key_dim, layer)
  if threshold is not None:
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float, np.integer,
                                                                 np.floating)) \
        or not np.isfinite(threshold):
      raise ValueError(f"threshold: expected a finite number (or None for the quantile), got "
                       f"{threshold!r}")
  if target_value is not None:
    target_value = _check_target(target_value, info.value_dim, layer)
  _check_params(edited_params, gen)
  z = gen.latents(nums.tolist())
  runs = []
  for given, name, params in ((original, "original", None), (edited, "edited", edited_params)):
    if given is None:
      runs.append(run_layer(gen, layer, z, params=params, batch_size=batch_size))
      continue
    if np.shape(given.keys)[0] != len(z) or np.shape(given.keys)[-1] != info.key_dim:
      raise ValueError(f"{name}: expected the layer run of {len(z)} latents with keys of "
                       f"dimension {info.key_dim}, got keys of shape {np.shape(given.keys)}")
    runs.append(given)
  r0, r1 = runs
  for run, which in ((r0, "original"), (r1, "edited")):
    bad = run.images.size - int(np.isfinite(run.images).sum())
    if bad:
      raise ValueError(f"images: expected finite images from the {which} generator, got {bad} "
                       f"NaN or infinite of {run.images.size} pixel values")
    for name in ("keys", "values"):  # a saturating output (tanh) can hide them
      arr = np.asarray(getattr(run, name))
      bad = arr.size - int(np.isfinite(arr).sum())
      if bad:
        raise ValueError(f"{name}: expected finite {name} at layer {layer!r} from the {which} "
                         f"generator, got {bad} NaN or infinite of {arr.size}")
  scores = match_scores(r0.keys, D)
  dimg = np.abs(r1.images.astype(np.float64) - r0.images).mean(-1)
  results = []
  for q in quantiles:
    thr = float(threshold) if threshold is not None else match_threshold(scores, q)
    results.append(_measure(info, gen.resolution, r0, r1, scores, dimg, thr,
                            None if threshold is not None else float(q), target_value))
  return results


def _measure(info, resolution, r0, r1, scores, dimg, thr, quantile, target_value) -> dict:
  matched = scores > thr
  matched_v = _upsample(matched, info.value_res)
  matched_c = _upsample(matched, resolution)
  footprint_c = _upsample(_dilate(matched), resolution)
  any_match = matched.reshape(len(matched), -1).any(-1)
  out = {
      "num_latents": int(len(matched)),
      "threshold": thr,
      "quantile": quantile,
      "context_match": {"latents": float(any_match.mean()), "pixels": float(matched.mean())},
      "specificity": _specificity(dimg, matched_c, any_match),
      "specificity_footprint": _specificity(dimg, footprint_c, any_match),
  }
  if target_value is not None and matched_v.any():
    t = target_value  # checked: finite, (C_out,), non-zero
    v0 = r0.values[matched_v].astype(np.float64)
    v1 = r1.values[matched_v].astype(np.float64)
    d0 = np.linalg.norm(v0 - t, axis=-1) / np.linalg.norm(t)
    d1 = np.linalg.norm(v1 - t, axis=-1) / np.linalg.norm(t)
    out["efficacy"] = {
        "cosine_before": float(_cos(v0, t).mean()),
        "cosine_after": float(_cos(v1, t).mean()),
        "distance_before": float(d0.mean()),
        "distance_after": float(d1.mean()),
        "cosine_gain": float(_cos(v1, t).mean() - _cos(v0, t).mean()),
        "moved": float(1.0 - d1.mean() / d0.mean()) if d0.mean() > 0 else None,
    }
  return out
