"""Any layer of any Flax model (NNX or Linen) as a key -> value memory.

- :func:`memory_view`: where a layer's kernel lives and how its keys and values are laid
  out (dense, per-tap conv, or conv patch keys); :func:`register_layer_kind` for custom
  layer classes.
- :func:`capture`: the layer's keys, values and extra call arguments in a forward pass of
  the whole model (eager, jit, remat, scan).
- :func:`layer_covariance`: C = E[k kᵀ] of the layer's keys over a stream of model
  inputs, compiled, cached and optionally masked.
- :func:`substitute`, :func:`edited_forward`, :func:`layer_forward`,
  :func:`insert_through_view`: functional edits of the layer's kernel.
"""

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
from memedit.layers.hooks import Captured, capture, forward_to_layer
from memedit.layers.stats import layer_cache_key, layer_covariance, layer_key_fn

__all__ = [
    "Captured",
    "LayerKind",
    "MemoryView",
    "capture",
    "edited_forward",
    "edited_kernel",
    "forward_to_layer",
    "insert_through_view",
    "layer_cache_key",
    "layer_covariance",
    "layer_forward",
    "layer_key_fn",
    "layer_kind",
    "memory_view",
    "register_layer_kind",
    "substitute",
]
