"""memedit: rewrite rules inside trained networks by treating layers as associative memories.

Following "Rewriting a Deep Generative Model" (Bau et al., ECCV 2020): a layer's weight W
maps keys k to values v = f(k; W); with C = E[k kᵀ] a new rule (k*, v*) is written as
W1 = W0 + Λ Dᵀ with D spanning C⁻¹k*, and Λ = argmin ‖v* − f(k*; W0 + Λ Dᵀ)‖.

The top level re-exports the public API of the modules below (listed in ``__all__``):

- :mod:`memedit.covariance`: streaming second moments C of a layer's keys.
- :mod:`memedit.directions`: the edit subspace D of a few context keys.
- :mod:`memedit.linalg`: PSD solves without inverses.
- :mod:`memedit.closed_form`: exact and soft inserts into a linear memory.
- :mod:`memedit.solve`: Λ for any pure f(W, k), by Adam or Gauss–Newton.
- :mod:`memedit.layouts`: how Λ and D lay out in a kernel.
- :mod:`memedit.edits`: edits as frozen pytrees; apply, revert, save, load.
- :mod:`memedit.layers`: Flax layers viewed as memories.

Helpers for addressing leaves (:mod:`memedit.tree`) and argument checks
(:mod:`memedit.checks`) stay in their modules.
"""

from memedit.closed_form import (LinearSolution, insert_closed_form, insert_ridge,
                                 least_squares_lambda)
from memedit.covariance import (CovarianceState, centered_covariance, covariance_cache_key,
                                covariance_init, covariance_merge, covariance_update, key_count,
                                key_mean, second_moment, stream_covariance, total_weight)
from memedit.directions import Subspace, context_directions
from memedit.edits import (Edit, EditHistory, apply_edit, apply_edits, edit_delta, load_edit,
                           make_edit, revert_edit, save_edit)
from memedit.layers import (Captured, LayerKind, MemoryView, capture, edited_forward,
                            edited_kernel, forward_to_layer, insert_through_view,
                            layer_cache_key, layer_covariance, layer_forward, layer_key_fn,
                            layer_kind, memory_view, register_layer_kind, substitute)
from memedit.layouts import grouped_factors, kernel_delta, key_dim, lambda_shape
from memedit.linalg import solve_psd
from memedit.solve import SolveResult, lambda_loss_fn, solve_lambda

__all__ = [
    # covariance
    "CovarianceState", "centered_covariance", "covariance_cache_key", "covariance_init",
    "covariance_merge", "covariance_update", "key_count", "key_mean", "second_moment",
    "stream_covariance", "total_weight",
    # directions, linalg
    "Subspace", "context_directions", "solve_psd",
    # closed forms, solve, layouts
    "LinearSolution", "insert_closed_form", "insert_ridge", "least_squares_lambda",
    "SolveResult", "lambda_loss_fn", "solve_lambda",
    "grouped_factors", "kernel_delta", "key_dim", "lambda_shape",
    # edits
    "Edit", "EditHistory", "apply_edit", "apply_edits", "edit_delta", "load_edit",
    "make_edit", "revert_edit", "save_edit",
    # layers
    "Captured", "LayerKind", "MemoryView", "capture", "edited_forward", "edited_kernel",
    "forward_to_layer", "insert_through_view", "layer_cache_key", "layer_covariance",
    "layer_forward", "layer_key_fn", "layer_kind", "memory_view", "register_layer_kind",
    "substitute",
]

__version__ = "0.1.0"
