"""The :class:`MemoryView` value: one layer of a model seen as a key -> value memory.

A view records where the layer's kernel lives, how its keys and values are laid out
(the layouts are described in :mod:`memedit.layers.view`, which builds views with
:func:`memedit.layers.memory_view` and re-exports this class) and the layer alone; its
methods read and write the kernel, run the layer with a replaced kernel, give keys, the
math-layout weight and its inverse, and check the layer's memory contract. A view is a
pytree (the layer's variables are its leaves), so it can be an argument of a jitted
function.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from memedit.layers.conv import as_tuple, block_diagonal, diagonal_blocks
from memedit.layers.intercept import Static
from memedit.layers.kinds import LayerKind
from memedit.layers.model import as_model, merge, path_str
from memedit.layouts import grouped_factors
from memedit.tree import get_leaf, replace_leaf

__all__ = ["MemoryView"]


@dataclasses.dataclass(frozen=True, eq=False)
class MemoryView:
  """One layer of a model seen as a key -> value memory.

  Example:
    >>> import jax.numpy as jnp, flax.nnx as nnx
    >>> from memedit.layers import memory_view
    >>> model = nnx.Sequential(nnx.Linear(4, 8, rngs=nnx.Rngs(0)),
    ...                        nnx.Linear(8, 2, rngs=nnx.Rngs(1)))
    >>> view = memory_view(nnx.split(model), "layers.1", jnp.ones((1, 4)))
    >>> view.kind, view.weight_path
    ('dense', ('layers', 1, 'kernel'))

  Attributes:
    framework: ``'nnx'`` or ``'linen'``.
    address: module path of the layer (e.g. ``('blocks', 1, 'fc1')`` or
      ``('Block_0', 'fc1')``); for one layer of a scanned stack, with that layer's index
      right after the scanned module's name (e.g. ``('stack', 1, 'fc2')``).
    weight_path: path of the kernel leaf in the model's state / variables (usable with
      ``memedit.get_leaf``, ``replace_leaf`` and as an ``Edit`` path); for one layer of a
      scanned stack the stacked leaf ``(L, *kernel)``, whose ``[index]`` is the layer's.
    layer_type: the layer's class.
    kind: memory layout of the kernel, ``'dense'`` or ``'conv'`` (per-tap HWIO).
    in_ndim: leading input axes of a dense kernel (3 for a patch view of a conv).
    patch: whether a conv layer is viewed with patch keys (then ``kind='dense'``).
    kernel_shape: shape of the kernel (the leaf's, without the layer axis for one layer of
      a scanned stack).
    key_dim: dimension of one key.
    value_dim: dimension of one value (``prod(out_dims)`` or ``C_out``).
    key_axes: input axes forming a key (dense) or ``(-1,)`` (conv).
    stacked: number of leading stacked (scanned) axes left on ``kernel_shape``; views of
      a whole stack capture and collect statistics (pooled over its layers) but do not
      run, solve or edit the layer alone: address one layer of it instead.
    input_ndim: ndim of the layer's first call argument when the view was made with
      example inputs (``None`` otherwise); used to give flat keys the leading axes a
      fixed-rank layer (e.g. an einsum ``'btd,...'``) expects.
    groups: feature groups of a grouped convolution (1 otherwise). With ``G > 1`` keys
      carry all ``C_in`` channels and :meth:`math_weight` is block-diagonal.
    index: the layer of a scanned stack the view is of (``None``: the layer as a whole);
      its keys, values, statistics and edits are that layer's alone.
    stack_size: number of layers on the scanned axis (a view of one layer of a stack or
      of a whole stack), ``None`` otherwise.
    module_path: module path of the layer without the index (where its calls run).
    spec: the layer's :class:`~memedit.layers.LayerKind`.
    layer: the layer alone: NNX ``(graphdef, state)`` or Linen ``(definition,
      variables)`` (one layer's slice for one layer of a scanned stack).
    slice_at: where a layer index goes in the address of a stacked layer (``None`` if
      not stacked).

  A view is a pytree whose leaves are the arrays of ``layer``'s variables (everything else
  is static), so it can be an argument of a jitted function.
  """
  framework: str
  address: tuple
  weight_path: tuple
  layer_type: type
  kind: str
  in_ndim: int
  patch: bool
  kernel_shape: tuple
  key_dim: int
  value_dim: int
  key_axes: tuple
  stacked: int
  input_ndim: int | None
  spec: LayerKind
  layer: Any  # nnx: (graphdef, state) of the layer; linen: (module def, variables)
  groups: int = 1
  index: int | None = None
  stack_size: int | None = None
  module_path: tuple | None = None
  slice_at: int | None = None  # where an index goes in the address of a stacked layer

  def __post_init__(self):
    if self.module_path is None:
      object.__setattr__(self, "module_path", tuple(self.address))

  @property
  def layer_module(self):
    """A fresh instance of the layer alone (NNX) or its unbound definition (Linen)."""
    if self.framework == "nnx":
      return merge(*self.layer)
    return self.layer[0]

  def kernel(self, model=None):
    """The kernel leaf of ``model`` (default: the kernel the view was made from)."""
    if model is None:
      if self.framework == "nnx":
        return getattr(merge(*self.layer), self.spec.weight)[...]
      return self.layer[1]["params"][self.spec.weight]
    return self.read_kernel(as_model(model).params)

  def read_kernel(self, params):
    """The view's kernel in ``params`` (layer ``index`` of a stacked leaf)."""
    leaf = get_leaf(params, self.weight_path)
    return leaf if self.index is None else leaf[self.index]

  def write_kernel(self, params, kernel):
    """``params`` with the view's kernel replaced (other layers of a stack untouched)."""
    if self.index is None:
      return replace_leaf(params, self.weight_path, kernel)
    leaf = get_leaf(params, self.weight_path)
    return replace_leaf(params, self.weight_path,
                        leaf.at[self.index].set(jnp.asarray(kernel, leaf.dtype)))

  def require_unstacked(self):
    """Raises ``ValueError`` for a view of a whole scanned stack (it cannot run alone)."""
    if not self.stacked:
      return
    hint = ""
    if self.index is None and self.slice_at is not None:
      at, p = self.slice_at, self.module_path
      example = p[:at] + (0,) + p[at:]
      hint = (f"; address one layer of the stack with its index right after the scanned "
              f"module's name, e.g. {example!r} or {path_str(example)!r} (index 0 to "
              f"{self.stack_size - 1})")
    elif self.index is not None:
      hint = "; an address picks a layer on the outermost layer axis only"
    raise ValueError(
        f"layer {self.address!r}: its kernel {self.kernel_shape} is stacked over "
        f"{self.stacked} scanned axis (one layer per entry), so it cannot be run, solved "
        f"for or edited as one memory{hint}")

  def apply(self, kernel, x, *extra, **kwargs):
    """Runs the layer alone on its native input ``x`` with its kernel replaced.

    Args:
      kernel: kernel with the layer's own shape.
      x: the layer's first call argument (e.g. ``(..., *in_dims)`` or ``(N, H, W, C_in)``).
      *extra: further call arguments (e.g. a style vector), as captured.

    Returns:
      The layer's output ``f(kernel, x, *extra)``.
    """
    self.require_unstacked()
    if self.framework == "nnx":
      gd, st = self.layer
      st = replace_leaf(st, (self.spec.weight,), kernel)
      return merge(gd, st)(x, *extra, **kwargs)
    mod, variables = self.layer
    variables = replace_leaf(variables, ("params", self.spec.weight), kernel)
    return mod.apply(variables, x, *extra, **kwargs)

  def keys(self, x):
    """Keys ``(..., key_dim)`` of the layer's native input ``x``.

    Dense: the key axes moved last and flattened. Conv: per-pixel channel vectors
    ``(N, H, W, C_in)``; patch view: patches ``(N, H_out, W_out, kh*kw*C_in)`` aligned with
    the output pixels.
    """
    if self.patch:
      return self.spec.patches(self.layer_module, x)
    if self.kind == "conv":
      if self.spec.patches is not None and self.taps == 1:
        # A 1x1 kernel reads the pixels its patches pick (every s-th one under a stride
        # s), so its keys line up with its output pixels.
        return self.spec.patches(self.layer_module, x)
      return x
    if self.spec.keys is not None:
      return self.spec.keys(self.layer_module, x)
    n = len(self.key_axes)
    if self._counted_from_start():
      self._check_start_axes(x)
    axes = [a % x.ndim for a in self.key_axes]
    x = jnp.moveaxis(x, axes, list(range(x.ndim - n, x.ndim)))
    return x.reshape(x.shape[:x.ndim - n] + (-1,))

  def _counted_from_start(self) -> bool:
    """Whether the key axes count from the start of one call's input (a layer given
    non-negative axes, viewed without example inputs, so that its input rank is unknown)."""
    return self.input_ndim is None and all(a >= 0 for a in self.key_axes)

  def _check_start_axes(self, x) -> None:
    """Refuses an input whose key axes (counted from its start) do not hold the kernel's
    input dims, e.g. several calls stacked in front of one call's input."""
    in_dims = tuple(self.kernel_shape[self.stacked:self.stacked + self.in_ndim])
    shape = tuple(np.shape(x))
    got = tuple(shape[a] for a in self.key_axes if a < len(shape))
    if got != in_dims:
      raise ValueError(
          f"x: expected one call's input of layer {self.address!r}, with the dims {in_dims} "
          f"on its axes {self.key_axes} (the layer's axis, counted from the start), got "
          f"shape {shape}; for inputs with leading axes (several calls stacked, a scan) "
          "make the view with example inputs, memory_view(model, address, *inputs), which "
          "counts the axes from the end")

  def native_keys(self, keys):
    """Inverse of :meth:`keys` for flat dense keys ``(n, key_dim)`` with trailing key axes.

    When the view knows the layer's input rank (made with example inputs), singleton
    leading axes are added up to it. A layer given non-negative axes and viewed without
    example inputs gets inputs of the smallest rank those axes allow: the key dims on the
    axes, the leading axes of ``keys`` on the first other axes (after the last key axis
    where there are too few), singletons elsewhere.
    """
    if self.kind == "conv" or self.patch:
      raise ValueError("native_keys: only for dense views")
    if keys.shape[-1] != self.key_dim:
      raise ValueError(f"keys: expected last dimension {self.key_dim}, got {keys.shape[-1]}")
    if self.spec.native_keys is not None:
      return self.spec.native_keys(self.layer_module, keys)
    in_dims = tuple(self.kernel_shape[self.stacked:self.stacked + self.in_ndim])
    n = len(self.key_axes)
    if keys.shape[-1] != self.key_dim:
      raise ValueError(f"keys: expected last dimension {self.key_dim}, got {keys.shape[-1]}")
    x = keys.reshape(keys.shape[:-1] + in_dims)
    if self._counted_from_start():
      return _at_start_axes(x, len(keys.shape) - 1, self.key_axes)
    if self.input_ndim is not None and x.ndim < self.input_ndim:
      x = x.reshape((1,) * (self.input_ndim - x.ndim) + x.shape)
    axes = [a % x.ndim for a in self.key_axes]
    return jnp.moveaxis(x, list(range(x.ndim - n, x.ndim)), axes)

  @property
  def taps(self) -> int:
    """Kernel taps ``prod(kernel_size)`` of a conv layer (1 for dense layers)."""
    if self.kind != "conv" and not self.patch:
      return 1
    return int(np.prod(self.kernel_shape[self.stacked:-2]))

  def gain(self):
    """The layer's run-time weight gain (``None``: the weight is used as is)."""
    return self.spec.resolved_gain(self.layer_module)

  def math_weight(self, kernel=None):
    """Math layout of the kernel: ``(out, in)`` (dense / patch) or ``(*taps, out, in)``
    (per-pixel conv); block-diagonal over the groups of a grouped conv."""
    kernel = self.kernel() if kernel is None else kernel
    if self.kind == "conv":
      return jnp.swapaxes(block_diagonal(kernel, self.groups), -1, -2)
    if self.groups > 1:
      kernel = block_diagonal(kernel, self.groups)
    k = kernel.reshape((self.key_dim, self.value_dim))
    return k.T

  def kernel_from_math(self, w):
    """Inverse of :meth:`math_weight` (the diagonal blocks of a grouped conv's)."""
    if self.kind == "conv":
      return diagonal_blocks(jnp.swapaxes(w, -1, -2), self.groups)
    shape = self.kernel_shape[self.stacked:]
    if self.groups > 1:
      full = w.T.reshape(shape[:-2] + (self.key_dim // self.taps, shape[-1]))
      return diagonal_blocks(full, self.groups)
    return w.T.reshape(shape)

  def kernel_factors(self, lam, directions):
    """Factors over this view's keys as factors of an edit of the kernel leaf.

    Equal to ``(lam, directions)`` except for grouped convs, whose edits are the
    diagonal blocks of ``lam @ directions`` (see :func:`memedit.grouped_factors`).

    Args:
      lam: Λ, ``(value_dim, r)`` (dense / patch) or ``(*taps, C_out, r)`` (per-pixel conv).
      directions: D ``(r, key_dim)``.

    Returns:
      ``(lam, directions)`` for ``memedit.kernel_delta(..., kind=view.kind,
      in_ndim=view.in_ndim)`` and ``memedit.make_edit``.
    """
    if self.groups == 1:
      return lam, directions
    return grouped_factors(lam, directions, self.groups, self.taps if self.patch else 1)

  def check_contract(self, x=None, *extra, seed: int = 0, rtol: float | None = None,
                     **kwargs):
    """Checks on random probes that the layer is the memory its kind declares.

    With random kernels ``W1``, ``W2`` the layer must satisfy
    ``f(W1 + 2 W2, x) - f(0, x) = (f(W1, x) - f(0, x)) + 2 (f(W2, x) - f(0, x))`` (linear in
    its kernel), and, where keys line up with outputs (dense, patch and 1x1 conv views),
    ``f(W1, x) - f(0, x) = gain * k(x) W1_mathᵀ``.

    Args:
      x: the layer's native input (default: random probes: keys for dense views, a small
        image for conv views). *extra, **kwargs: further call arguments.
      seed: seed of the random probes. rtol: tolerance relative to the outputs' scale
        (default: 1e-4, or 4 ulps of the lowest precision among the kernel, the probe input
        and the output, e.g. 0.031 for bfloat16).

    Raises:
      ValueError: the layer is not linear in its kernel, or its output does not equal
        ``gain * W k`` (e.g. a run-time weight scale not declared as ``gain``).
    """
    self.require_unstacked()
    rng = np.random.default_rng(seed)
    with jax.ensure_compile_time_eval():
      if x is None:
        x = self._probe_input(rng)
      shape = self.kernel_shape[self.stacked:]
      dtype = self.kernel().dtype
      w1, w2 = (jnp.asarray(rng.standard_normal(shape), dtype) for _ in range(2))
      out1 = self.apply(w1, x, *extra, **kwargs)
      if rtol is None:
        dtypes = [dtype] + [a.dtype for a in jax.tree.leaves((x, out1)) if hasattr(a, "dtype")]
        rtol = max([1e-4] + [4.0 * float(jnp.finfo(d).eps) for d in dtypes
                             if jnp.issubdtype(d, jnp.floating)])
      f = lambda w: np.asarray(self.apply(w, x, *extra, **kwargs), np.float64)
      y0 = f(jnp.zeros(shape, dtype))
      y1 = np.asarray(out1, np.float64) - y0
      y2, y12 = f(w2) - y0, f(w1 + 2 * w2) - y0
      if not all(np.isfinite(y).all() for y in (y0, y1, y2, y12)):
        raise ValueError(
            f"layer {self.address!r} ({self.layer_type.__name__}): expected finite outputs "
            f"of a memory of kind {self.spec.kind!r} for a zero and random kernels, got "
            "non-finite ones (e.g. a layer that divides its kernel by its norm), so it is "
            "not affine in its kernel; such a layer needs solve_lambda")
      scale = max(float(np.abs(y1).max()), float(np.abs(y2).max()), 1e-30)
      err = float(np.abs(y12 - y1 - 2 * y2).max()) / scale
      if not err <= rtol:
        raise ValueError(
            f"layer {self.address!r} ({self.layer_type.__name__}): expected its output to be "
            f"linear in its kernel (a memory of kind {self.spec.kind!r}), but "
            f"f(W1 + 2 W2) - f(0) differs from the sum of the parts by {err:.2g} of the "
            "output scale; a layer that is not affine in its kernel needs solve_lambda")
      if self.kind == "conv" and (self.taps != 1 or self.spec.patches is None):
        return
      k = np.asarray(self.keys(x), np.float64).reshape(-1, self.key_dim)
      pred = k @ np.asarray(self.math_weight(w1), np.float64).reshape(
          self.value_dim, self.key_dim).T
      g = self.gain()
      if g is not None:
        pred = pred * np.asarray(g, np.float64)
      y1 = y1.reshape(pred.shape)
      err = float(np.abs(pred - y1).max()) / scale
      if not err <= rtol:
        ratio = float(np.sum(y1 * pred) / max(np.sum(pred * pred), 1e-30))
        raise ValueError(
            f"layer {self.address!r} ({self.layer_type.__name__}): expected f(W, x) - f(0, x) "
            f"= gain * W k(x) with gain {None if g is None else np.asarray(g).tolist()!r}, "
            f"but they differ by {err:.2g} of the output scale (a least-squares gain would "
            f"be {ratio:.4g}); declare the run-time weight scale with "
            f"register_layer_kind({self.layer_type.__name__}, ..., gain=...)")

  def _probe_input(self, rng):
    if self.kind == "dense" and not self.patch:
      k = rng.standard_normal((3, self.key_dim))
      return self.native_keys(jnp.asarray(k, jnp.float32))
    shape = self.kernel_shape[self.stacked:]
    n = len(shape) - 2
    mod = self.layer_module
    d = as_tuple(getattr(mod, "kernel_dilation", 1), n)
    s = as_tuple(getattr(mod, "strides", 1), n)
    sp = tuple((k - 1) * di + 1 + si for k, di, si in zip(shape[:n], d, s))
    cin = self.key_dim // self.taps if self.patch else self.key_dim
    return jnp.asarray(rng.standard_normal((1,) + sp + (cin,)), jnp.float32)


def _flatten_view(view: MemoryView):
  definition, variables = view.layer
  meta = tuple((f.name, getattr(view, f.name)) for f in dataclasses.fields(view)
               if f.name != "layer")
  return (variables,), Static((meta, definition))


def _unflatten_view(aux: Static, children) -> MemoryView:
  meta, definition = aux.value
  return MemoryView(**dict(meta), layer=(definition, children[0]))


# A view is a pytree: the layer's variables are its children (their arrays its leaves);
# everything else is static aux data. It passes through jax.jit as an argument.
jax.tree_util.register_pytree_node(MemoryView, _flatten_view, _unflatten_view)


def _at_start_axes(x, lead: int, axes) -> jax.Array:
  """``x`` of shape ``(*lead dims, *key dims)`` as a layer input whose key dims lie on the
  non-negative ``axes`` (sorted, counted from the start): the lead dims go to the first
  free axes (axes past the last key axis are added where too few are free), singleton
  dims fill the rest."""
  axes = [int(a) for a in axes]
  k = len(axes)
  rank = max(max(axes) + 1, k + lead)
  free = [p for p in range(rank) if p not in axes]
  perm = [0] * rank
  for i, p in enumerate(free[:lead]):
    perm[p] = i
  for j, p in enumerate(axes):
    perm[p] = lead + j
  for t, p in enumerate(free[lead:]):
    perm[p] = lead + k + t
  x = x.reshape(x.shape + (1,) * (rank - lead - k))
  return jnp.transpose(x, perm)
