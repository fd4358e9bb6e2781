"""Memory views: one layer of a model seen as a key -> value memory.

Layouts:

* ``kind='dense'``: the Flax kernel is ``(*in_dims, *out_dims)`` with ``in_ndim`` leading
  input axes; keys are flattened to ``(..., prod(in_dims))``; math ``W`` is
  ``(prod(out_dims), prod(in_dims))``.
* ``kind='conv'``: kernel ``(*taps, C_in / G, C_out)`` with 1, 2 or 3 spatial axes
  (e.g. HWIO ``(kh, kw, C_in, C_out)``); per-pixel keys of dim ``C_in`` and one ``Lambda``
  per tap. With ``patch=True`` a (transposed) convolution is viewed as a dense memory over
  patch keys of dim ``T*C_in`` (``T = prod(taps)``, tap-major, channel-minor): math ``W``
  is ``kernel.reshape(T*C_in, C_out).T`` and its edits are dense edits with
  ``in_ndim = len(taps) + 1`` on the kernel.
* Grouped convolutions (``feature_group_count = G > 1``, e.g. depthwise with ``G = C_in``):
  the view's keys are the full ``C_in`` (or ``T*C_in``) vectors and its math weight is the
  block-diagonal dense kernel (output channels of group ``g`` read only input channels of
  group ``g``; the blocks off the diagonal are structurally zero). An edit keeps that
  structure: with factors ``Lambda (C_out, r)`` and ``D (r, key_dim)`` over the full key,
  the kernel changes by the diagonal blocks of ``Lambda D`` (:func:`memedit.grouped_factors`
  gives the equivalent factors on the kernel, of rank ``G*r``).
* One layer of a scanned stack (``nn.scan``; ``nnx.vmap`` + ``nnx.scan``): every parameter
  of the scanned module carries a leading layer axis ``(L, ...)``. The address puts the
  layer's index right after the scanned module's name (``('stack', 1, 'fc2')``); the view
  is of ``kernel[1]`` (``MemoryView.index``) and its edits carry that index.

This module builds views (:func:`memory_view`, :func:`as_view`); the :class:`MemoryView`
value and its methods live in :mod:`memedit.layers.memory` and are re-exported here.
"""

from __future__ import annotations

import numpy as np
from flax import nnx
import flax.linen as nn
from flax.traverse_util import flatten_dict

from memedit.layers.conv import as_tuple, conv_groups, conv_patch_check, conv_patches
from memedit.layers.intercept import (linen_layer_definition, nnx_input_ndim,
                                      refuse_reparametrised)
from memedit.layers.kinds import general_key_axes, layer_kind
from memedit.layers.memory import MemoryView
from memedit.layers.model import as_model, merge, resolve_layer, slice_tree, stack_region
from memedit.tree import get_leaf

__all__ = ["MemoryView", "as_view", "memory_view"]


def _nnx_call_kernel_ndim(mod, kernel_leaf) -> int:
  """Kernel ndim of one call of an NNX layer (smaller than the leaf's if scanned/stacked)."""
  if isinstance(mod, nnx.Linear):
    return 2
  if isinstance(mod, nnx.LinearGeneral):
    return (len(getattr(mod, "batch_axis", {}) or {}) + len(as_tuple(mod.in_features, 1))
            + len(as_tuple(mod.out_features, 1)))
  shape = getattr(mod, "kernel_shape", None)
  return len(shape) if shape is not None else kernel_leaf.ndim


def _flax_key_axes(axes, input_ndim):
  """A Flax DenseGeneral / LinearGeneral's contracted axes as the layer uses them.

  Flax sorts the (normalised) ``axis`` of these layers, and its kernel's input dims follow
  that order, so ``axis=(-1, -2)`` contracts ``(..., a, b)`` with a kernel ``(a, b, ...)``.
  With the layer's input rank known the axes are given relative to the end (negative), so
  that keys carrying extra leading axes (several calls stacked, a scan axis) keep them.
  """
  axes = tuple(int(a) for a in axes)
  if input_ndim is not None:
    return tuple(sorted(a % input_ndim - input_ndim for a in axes))
  if all(a < 0 for a in axes) or all(a >= 0 for a in axes):
    return tuple(sorted(axes))
  return axes


def _view_from_module(framework, address, weight_path, mod, kernel_leaf, layer, patch,
                      call_ndim, input_ndim=None, index=None, stack=None):
  """The view of a layer; ``index`` picks one layer of a scanned stack and ``stack()``
  gives :func:`stack_region`'s ``(L, at)`` for the layer's path (or ``None``)."""
  spec = layer_kind(mod)
  if spec.check is not None:
    spec.check(mod)
  kshape = tuple(kernel_leaf.shape)
  if spec.kind == "conv":
    if patch and spec.patches is None:
      raise ValueError(f"patch view: no patch extractor registered for "
                       f"{type(mod).__name__}; pass patches= to register_layer_kind")
    stacked = len(kshape) - call_ndim
    if not 3 <= call_ndim <= 5:
      raise ValueError(f"conv layer: expected a kernel (*taps, C_in, C_out) with 1 to 3 "
                       f"spatial axes (e.g. HWIO (kh, kw, C_in, C_out)), got {kshape}")
    body = kshape[stacked:]
    groups = conv_groups(mod)
    taps, cin, cout = int(np.prod(body[:-2])), body[-2] * groups, body[-1]
    if groups < 1 or cout % groups:
      raise ValueError(f"conv layer: expected C_out {cout} divisible by feature_group_count, "
                       f"got {groups}")
    if patch:
      if spec.patches is conv_patches:
        conv_patch_check(mod)
      kind, in_ndim, key_dim = "dense", call_ndim - 1, taps * cin
    else:
      kind, in_ndim, key_dim = "conv", 1, cin
    value_dim, key_axes = cout, (-1,)
  else:
    groups = 1
    if patch:
      raise ValueError(f"patch view: expected a conv layer, got {type(mod).__name__}")
    in_ndim = spec.resolved_in_ndim(mod)
    key_axes = spec.resolved_key_axes(mod)
    if spec.key_axes is general_key_axes:
      key_axes = _flax_key_axes(key_axes, input_ndim)
    kind = "dense"
    stacked = len(kshape) - call_ndim
    body = kshape[stacked:]
    key_dim = int(np.prod(body[:in_ndim]))
    value_dim = int(np.prod(body[in_ndim:]))
  path = tuple(address)
  size = at = None
  region = stack() if stacked and stack is not None else None
  if region is not None and region[0] == kshape[0]:
    size, at = region
  if index is not None:
    if not stacked or size is None:
      raise ValueError(
          f"address: index {index} picks one layer of a scanned stack, but the kernel "
          f"{kshape} of layer {path!r} is not stacked (one call of the layer uses all of it)")
    kshape, stacked = kshape[1:], stacked - 1
    layer = (layer[0], slice_tree(layer[1], index, size))
    address = path[:at] + (index,) + path[at:]
  return MemoryView(framework, tuple(address), tuple(weight_path), type(mod), kind, in_ndim,
                    bool(patch), kshape, key_dim, value_dim, tuple(key_axes), stacked,
                    input_ndim, spec, layer, groups, index, size, path, at)


def memory_view(model, address, *args, patch: bool = False, method: str | None = None,
                **kwargs) -> MemoryView:
  """The memory view of one layer of a model nobody prepared.

  Args:
    model: an ``nnx.Module`` (never mutated), an NNX ``(graphdef, state)`` pair or a Linen
      ``(module, variables)`` pair.
    address: NNX: a path tuple like ``('blocks', 1, 'fc1')``, a string ``'blocks/1/fc1'``
      (``.`` also separates parts; a backslash escapes a ``.`` or ``/`` inside a name, as
      in ``'blocks\\.2/fc'``; a name containing dots is also found unescaped) or a
      selector ``lambda m: m.blocks[1].fc1``. Linen: a tuple of module names like
      ``('Block_0', 'fc1')`` or such a string. One layer of a scanned stack (``nn.scan``,
      or ``nnx.vmap`` + ``nnx.scan``, whose parameters carry a leading layer axis): its
      index right after the scanned module's name, e.g. ``('stack', 1, 'fc2')`` or
      ``'stack/1/fc2'`` for layer 1 of ``('stack', 'fc2')``; the view is then that
      layer's (its kernel ``leaf[1]``), and captures, statistics and edits made with it
      are that layer's alone. Without an index the view is of the whole stack.
    *args: example inputs of the model. Needed for Linen (submodule definitions exist
      only while the model runs); traced abstractly (no compute), except that a Linen
      layer whose attributes the parent computes from arrays while it runs is taken from
      one concrete run. Python values (flags such as ``train=False``) stay static.
    patch: view a conv layer with patch keys ``T*C_in`` (exact linear memory).
    method: model method to run (default ``__call__``): a name or a function
      ``(module, *args, **kwargs) -> output``.
    **kwargs: keyword inputs of the model.

  Returns:
    A :class:`MemoryView`.

  Example:
    >>> from flax import nnx
    >>> import memedit.layers as ml
    >>> model = nnx.Sequential(nnx.Linear(3, 4, rngs=nnx.Rngs(0)), nnx.relu,
    ...                        nnx.Linear(4, 2, rngs=nnx.Rngs(1)))
    >>> view = ml.memory_view(model, lambda m: m.layers[2])
    >>> view.weight_path, view.kind, view.key_dim, view.value_dim
    (('layers', 2, 'kernel'), 'dense', 4, 2)

  Raises:
    ValueError: unknown address (lists valid paths near it), an index out of the range of
      a scanned stack's layers (names the range) or misplaced, unsupported layer kind
      (says how to register one), Linen without example inputs.
  """
  m = as_model(model)
  obj = merge(m.definition, m.params) if m.framework == "nnx" else None
  path, mod, index, _, _ = resolve_layer(m, address, obj)
  stack = lambda: stack_region(m, path)  # only asked for a stacked kernel
  if m.framework == "nnx":
    spec = layer_kind(mod)
    refuse_reparametrised(obj, mod, path)
    if not hasattr(mod, spec.weight):
      raise ValueError(f"layer {path!r}: expected a kernel attribute {spec.weight!r} on "
                       f"{type(mod).__name__}")
    weight_path = path + (spec.weight,)
    kernel_leaf = get_leaf(m.params, weight_path)
    layer = nnx.split(mod)
    input_ndim = None
    if args or kwargs:
      input_ndim = nnx_input_ndim(m, path, args, kwargs, method)
    return _view_from_module("nnx", path, weight_path, mod, kernel_leaf, layer, patch,
                             _nnx_call_kernel_ndim(mod, kernel_leaf), input_ndim, index,
                             stack)
  # Linen
  if not args and not kwargs:
    raise ValueError("memory_view: a Linen model needs example inputs (*args) to find the "
                     f"definition of layer {path!r}")
  mod_def, layer_vars, call_shape, input_ndim = linen_layer_definition(
      m, path, args, kwargs, method)
  # The layer alone runs on plain arrays: parameters boxed with their metadata
  # (nn.with_partitioning, nn.with_logical_partitioning) are unboxed in the view's copy;
  # edits still address the boxed leaf of the model, whose box they keep.
  layer_vars = nn.meta.unbox(layer_vars)
  spec = layer_kind(mod_def)
  weight_path = ("params",) + path + (spec.weight,)
  if tuple(weight_path[1:]) not in flatten_dict(m.params["params"]):
    raise ValueError(f"layer {path!r}: expected a parameter {spec.weight!r}, found "
                     f"{sorted(layer_vars.get('params', {}))}")
  kernel_leaf = get_leaf(m.params, weight_path)
  return _view_from_module("linen", path, weight_path, mod_def, kernel_leaf,
                           (mod_def, layer_vars), patch, len(call_shape), input_ndim, index,
                           stack)


def as_view(model, address_or_view, *args, **kwargs) -> MemoryView:
  """``address_or_view`` itself if it is a :class:`MemoryView`, else
  ``memory_view(model, address_or_view, *args, **kwargs)``."""
  if isinstance(address_or_view, MemoryView):
    return address_or_view
  return memory_view(model, address_or_view, *args, **kwargs)
