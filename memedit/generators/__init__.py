"""The copy–paste–context workflow (Bau et al. 2020, §4) on any Flax image generator.

A :class:`Generator` wraps an NNX ``(graphdef, state)`` or Linen ``(module, variables)``
model with its editable layers and its deterministic latent sample
(:mod:`~memedit.generators.generator`); :mod:`~memedit.generators.forward` runs it
(images, a layer observed or pasted into) in compiled programs that take the parameters as
arguments. One layer is edited:

1. **Context** (:mod:`~memedit.generators.context`): the layer's statistics C
   (:func:`collect_statistics`) and, from masks on a few images, the edit subspace D
   (:func:`context_keys`, :func:`directions`).
2. **Copy** and **paste** (:mod:`~memedit.generators.paste`): the values of an object
   region pasted over another image give the target v* on a tight crop
   (:func:`copy_values`, :func:`paste_target`; :func:`erase_target` for an erase).
3. **Insert** (:mod:`~memedit.generators.edit`): Λ through the layer itself on the crop
   (:mod:`~memedit.generators.crop`), as a :class:`memedit.Edit`; the reference's
   projected procedure and the overfit and unit-zeroing baselines beside it.
4. **Query** (:mod:`~memedit.generators.query`): match scores, heat maps, rankings;
   **pictures** (:mod:`~memedit.generators.images`).

:func:`edit_from_spec` runs a whole :class:`memedit.specs.EditSpec`. A port makes its own
layers editable by registering their kind (:func:`memedit.layers.register_layer_kind`);
the workflow has no per-architecture code.
"""

from __future__ import annotations

from memedit.generators.context import (collect_statistics, context_keys, directions,
                                        top_units, unit_scores)
from memedit.generators.crop import (Crops, LayerOnCrop, crop_problem, layer_on_crop,
                                     layer_params, own_taps, tap_mask)
from memedit.generators.edit import (EditResult, edited, insert, overfit, overfit_all,
                                     projected_insert, reverted, unit_zeroing_edit)
from memedit.generators.from_spec import SpecEdit, edit_from_spec
from memedit.generators.forward import (LayerRun, cached_program, generate_images, keys_fn,
                                        pass_program, run_layer)
from memedit.generators.generator import (Generator, LayerInfo, generator_from_converted,
                                          kernel_digest, layer_info, layer_kernel, layer_view,
                                          recorded_call_kwargs, reference_latents, structure_key)
from memedit.generators.images import comparison_grid, save_png, to_uint8
from memedit.generators.paste import (Copied, Target, bbox, copy_values, erase_target, mask_at,
                                      paste_target)
from memedit.generators.query import (heatmaps, layer_scores, match_scores, match_threshold,
                                      rank_by_match)

__all__ = [
    # generator
    "Generator", "LayerInfo", "generator_from_converted", "kernel_digest", "layer_info",
    "layer_kernel", "layer_view", "recorded_call_kwargs", "reference_latents", "structure_key",
    # compiled forward passes
    "LayerRun", "cached_program", "generate_images", "keys_fn", "pass_program", "run_layer",
    # context
    "collect_statistics", "context_keys", "directions", "top_units", "unit_scores",
    # copy and paste
    "Copied", "Target", "bbox", "copy_values", "erase_target", "mask_at", "paste_target",
    # the layer on a crop
    "Crops", "LayerOnCrop", "crop_problem", "layer_on_crop", "layer_params", "own_taps", "tap_mask",
    # edits
    "EditResult", "edited", "insert", "overfit", "overfit_all", "projected_insert",
    "reverted", "unit_zeroing_edit",
    # specs
    "SpecEdit", "edit_from_spec",
    # query
    "heatmaps", "layer_scores", "match_scores", "match_threshold", "rank_by_match",
    # pictures
    "comparison_grid", "save_png", "to_uint8",
]
