"""Any layer of any Flax model as a key -> value memory: views, capture, statistics."""

from __future__ import annotations

from memedit.layers.memory import (
    LayerKind,
    MemoryView,
    edited_forward,
    edited_kernel,
    insert_through_view,
    layer_forward,
    layer_kind,
    memory_view,
    register_layer_kind,
    substitute,
)
from memedit.layers.hooks import Captured, capture, layer_keys_fn
from memedit.layers.stats import layer_cache_key, layer_covariance, layer_key_fn
