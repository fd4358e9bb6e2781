"""memedit: rewrite rules inside trained networks by treating layers as associative memories.

Following "Rewriting a Deep Generative Model" (Bau et al., ECCV 2020): a layer's weight W
maps keys k to values v = f(k; W); with C = E[k kᵀ] a new rule (k*, v*) is written as
W1 = W0 + Λ Dᵀ with D spanning C⁻¹k*, and Λ = argmin ‖v* − f(k*; W0 + Λ Dᵀ)‖.
"""

from memedit.covariance import (
    CovarianceState,
    centered_covariance,
    covariance_cache_key,
    covariance_init,
    covariance_merge,
    covariance_update,
    key_count,
    key_mean,
    second_moment,
    stream_covariance,
    total_weight,
)
from memedit.directions import Directions, context_directions, solve_psd
from memedit.edits import (
    Edit,
    EditHistory,
    apply_edit,
    edit_delta,
    get_leaf,
    leaf_paths,
    load_edit,
    make_edit,
    replace_leaf,
    revert_edit,
    save_edit,
)
from memedit.layers import (
    Captured,
    LayerKind,
    MemoryView,
    capture,
    edited_forward,
    edited_kernel,
    forward_to_layer,
    insert_through_view,
    layer_cache_key,
    layer_covariance,
    layer_forward,
    layer_key_fn,
    layer_kind,
    memory_view,
    register_layer_kind,
    substitute,
)
from memedit.solve import (
    LinearSolution,
    SolveResult,
    grouped_factors,
    insert_closed_form,
    insert_ridge,
    kernel_delta,
    key_dim,
    lambda_loss_fn,
    lambda_shape,
    least_squares_lambda,
    solve_lambda,
)

__version__ = "0.1.0"
