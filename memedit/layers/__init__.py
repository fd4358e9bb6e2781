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

Modules: :mod:`~memedit.layers.kinds` (layer kinds), :mod:`~memedit.layers.conv`
(convolution geometry: patches, grouped kernels, resampling), :mod:`~memedit.layers.model`
(models, addresses, scanned stacks), :mod:`~memedit.layers.intercept` (running a model
with one layer intercepted), :mod:`~memedit.layers.view` (memory views, their
:class:`~memedit.layers.memory.MemoryView` value in :mod:`~memedit.layers.memory`),
:mod:`~memedit.layers.edit` (substitution, edited forward passes, inserts),
:mod:`~memedit.layers.hooks` (capture), :mod:`~memedit.layers.stats` (key statistics).
"""

from __future__ import annotations

from memedit.layers.edit import (edited_forward, edited_kernel, insert_through_view,
                                 layer_forward, substitute)
from memedit.layers.hooks import Captured, capture, forward_to_layer
from memedit.layers.kinds import LayerKind, layer_kind, register_layer_kind
from memedit.layers.stats import layer_cache_key, layer_covariance, layer_key_fn
from memedit.layers.view import MemoryView, memory_view

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
