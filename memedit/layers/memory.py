"""Any Flax layer as a key -> value memory: layer kinds, memory views, substitution.

A layer with kernel ``W`` maps keys ``k`` (its input) to values ``v`` (its output). This
module finds a layer inside a Flax model that was not prepared for editing (NNX or
Linen), describes how its kernel is a memory (:class:`MemoryView`) and rewrites that
kernel functionally.

Layouts (see the core API):

* ``kind='dense'``: the Flax kernel is ``(*in_dims, *out_dims)`` with ``in_ndim`` leading
  input axes; keys are flattened to ``(..., prod(in_dims))``; math ``W`` is
  ``(prod(out_dims), prod(in_dims))``.
* ``kind='conv'``: HWIO kernel ``(kh, kw, C_in, C_out)``; per-pixel keys of dim ``C_in``
  and one ``Lambda`` per tap. With ``patch=True`` a (transposed) convolution is viewed as
  a dense memory over patch keys of dim ``kh*kw*C_in``: math ``W`` is
  ``kernel.reshape(kh*kw*C_in, C_out).T`` and its edits are dense edits with
  ``in_ndim=3`` on the HWIO kernel.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
import flax.linen as nn
from flax.traverse_util import flatten_dict

from memedit.edits import get_leaf, make_edit, replace_leaf
from memedit.solve import insert_closed_form, insert_ridge, kernel_delta

__all__ = [
    "LayerKind",
    "MemoryView",
    "register_layer_kind",
    "layer_kind",
    "memory_view",
    "substitute",
    "edited_kernel",
    "layer_forward",
    "edited_forward",
    "insert_through_view",
]

# ----------------------------------------------------------------------------------
# Layer kinds
# ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LayerKind:
  """How a layer class stores its memory.

  Attributes:
    cls: the layer class (NNX or Linen module class).
    weight: attribute / parameter name of the kernel.
    kind: ``'dense'`` (kernel ``(*in_dims, *out_dims)``) or ``'conv'`` (HWIO).
    in_ndim: number of leading input axes of a dense kernel, or a function
      ``module -> int`` that reads it from the layer's attributes.
    key_axes: a function ``module -> tuple[int, ...]`` giving the input axes that form
      the key (default: the last ``in_ndim`` axes), or ``None``.
    patches: for ``kind='conv'`` only: a function ``(module, x) -> patches`` returning
      keys ``(..., kh*kw*C_in)`` whose product with ``kernel.reshape(-1, C_out)`` is the
      layer's linear part; enables ``patch=True`` views.
    check: optional ``module -> None`` raising ``ValueError`` for configurations the
      kind does not describe.
  """
  cls: type
  weight: str = "kernel"
  kind: str = "dense"
  in_ndim: int | Callable[[Any], int] = 1
  key_axes: Callable[[Any], tuple] | None = None
  patches: Callable[[Any, Any], Any] | None = None
  check: Callable[[Any], None] | None = None

  def resolved_in_ndim(self, module) -> int:
    return int(self.in_ndim(module) if callable(self.in_ndim) else self.in_ndim)

  def resolved_key_axes(self, module) -> tuple:
    if self.kind == "conv":
      return (-1,)
    if self.key_axes is not None:
      return tuple(self.key_axes(module))
    n = self.resolved_in_ndim(module)
    return tuple(range(-n, 0))


_KINDS: dict[type, LayerKind] = {}


def register_layer_kind(cls: type, *, weight: str = "kernel", kind: str = "dense",
                        in_ndim: int | Callable[[Any], int] = 1,
                        key_axes: Callable[[Any], tuple] | None = None,
                        patches: Callable[[Any, Any], Any] | None = None,
                        check: Callable[[Any], None] | None = None) -> LayerKind:
  """Declares how a layer class is a memory, so views, captures and edits accept it.

  Example: a custom NNX layer ``y = x @ self.w + self.b`` whose kernel param is ``w``::

    register_layer_kind(MyLinear, weight="w", kind="dense", in_ndim=1)

  Args:
    cls: NNX or Linen module class (subclasses inherit the registration).
    weight: name of the kernel attribute (NNX) or parameter (Linen).
    kind: ``'dense'`` (kernel ``(*in_dims, *out_dims)``, keys are the last ``in_ndim``
      input axes) or ``'conv'`` (HWIO kernel ``(kh, kw, C_in, C_out)``, per-pixel keys).
    in_ndim: leading input axes of a dense kernel, or ``module -> int``.
    key_axes: optional ``module -> axes`` of the input forming the key (dense).
    patches: optional ``(module, x) -> (..., kh*kw*C_in)`` patch extractor (conv).
    check: optional ``module -> None`` that raises ``ValueError`` for unsupported setups.

  Returns:
    The registered :class:`LayerKind`.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> import memedit.layers as ml
    >>> class Scale(nnx.Module):  # y = x @ w, kernel named "w"
    ...   def __init__(self, rngs):
    ...     self.w = nnx.Param(jax.random.normal(rngs.params(), (3, 2)))
    ...   def __call__(self, x):
    ...     return x @ self.w[...]
    >>> kind = ml.register_layer_kind(Scale, weight="w", kind="dense", in_ndim=1)
    >>> ml.memory_view(Scale(nnx.Rngs(0)), ()).weight_path
    ('w',)
  """
  if kind not in ("dense", "conv"):
    raise ValueError(f"kind: expected 'dense' or 'conv', got {kind!r}")
  if not isinstance(cls, type):
    raise ValueError(f"cls: expected a module class, got {cls!r}")
  spec = LayerKind(cls, weight, kind, in_ndim, key_axes, patches, check)
  _KINDS[cls] = spec
  return spec


def layer_kind(module_or_cls) -> LayerKind:
  """The registered :class:`LayerKind` of a layer (or layer class), searched along the MRO.

  Args:
    module_or_cls: a layer instance or class.

  Returns:
    Its :class:`LayerKind`.

  Example:
    >>> from flax import nnx
    >>> import memedit.layers as ml
    >>> ml.layer_kind(nnx.ConvTranspose).kind
    'conv'

  Raises:
    ValueError: the class is not registered; the message says how to register it.
  """
  cls = module_or_cls if isinstance(module_or_cls, type) else type(module_or_cls)
  for base in cls.__mro__:
    base = getattr(base, "_memedit_original", base)
    if base in _KINDS:
      return _KINDS[base]
  known = ", ".join(sorted(_cls_name(c) for c in _KINDS))
  raise ValueError(
      f"layer kind: {cls.__module__}.{cls.__name__} is not a registered memory layer "
      f"(registered: {known}). Register it with memedit.layers.register_layer_kind("
      f"{cls.__name__}, weight='<kernel attribute>', kind='dense'|'conv', in_ndim=<n>).")


def _cls_name(c) -> str:
  mod = c.__module__
  prefix = "nnx." if mod.startswith("flax.nnx") else "nn." if mod.startswith("flax.linen") else (
      mod + ".")
  return prefix + c.__name__


def _tuple(x, n):
  if x is None:
    return (1,) * n
  if isinstance(x, int):
    return (x,) * n
  return tuple(x)


def _conv_check(module):
  ks = tuple(module.kernel_size) if not isinstance(module.kernel_size, int) else (module.kernel_size,)
  if len(ks) != 2:
    raise ValueError(f"conv layer: expected a 2-D kernel_size (kh, kw), got {ks}")
  if getattr(module, "feature_group_count", 1) != 1:
    raise ValueError("conv layer: expected feature_group_count 1, got "
                     f"{module.feature_group_count}")
  if getattr(module, "mask", None) is not None:
    raise ValueError("conv layer: masked kernels are not supported as memories")


def _explicit_padding(padding, k, s, d, transpose):
  """Explicit (lo, hi) pads per spatial dim for a conv with lhs dilation ``s`` if transposed."""
  from flax.linen.linear import canonicalize_padding
  pad = canonicalize_padding(padding, len(k))
  if isinstance(pad, str) and pad not in ("SAME", "VALID"):
    raise ValueError(f"patch view: padding {pad!r} is not supported (expected 'SAME', "
                     "'VALID' or explicit pairs)")
  if not transpose:
    return pad
  if not isinstance(pad, str):
    return tuple(tuple(p) for p in pad)
  out = []
  for ki, si, di in zip(k, s, d):
    kd = (ki - 1) * di + 1
    if pad == "SAME":  # as jax.lax.conv_transpose
      pad_len = kd + si - 2
      lo = kd - 1 if si > kd - 1 else int(math.ceil(pad_len / 2))
    else:
      pad_len = kd + si - 2 + max(kd - si, 0)
      lo = kd - 1
    out.append((lo, pad_len - lo))
  return tuple(out)


def _conv_patches(module, x):
  """Patch keys ``(..., kh*kw*C_in)`` (tap-major, channel-minor) of a Conv / ConvTranspose."""
  transpose = "Transpose" in type(module).__name__ or isinstance(
      module, (nnx.ConvTranspose, nn.ConvTranspose))
  if transpose and getattr(module, "transpose_kernel", False):
    raise ValueError("patch view: ConvTranspose(transpose_kernel=True) is not supported")
  k = tuple(module.kernel_size)
  s = _tuple(module.strides, 2)
  d = _tuple(getattr(module, "kernel_dilation", 1), 2)
  lhs = _tuple(getattr(module, "input_dilation", 1), 2)
  pad = _explicit_padding(module.padding, k, s, d, transpose)
  batch_shape = x.shape[:-3]
  xb = x.reshape((-1,) + x.shape[-3:])
  c = x.shape[-1]
  p = jax.lax.conv_general_dilated_patches(
      xb, k, (1, 1) if transpose else s, pad, lhs_dilation=s if transpose else lhs,
      rhs_dilation=d, dimension_numbers=("NHWC", "HWIO", "NHWC"))
  # conv_general_dilated_patches orders features as (C_in, kh, kw); reorder to (kh, kw, C_in).
  h, w = p.shape[1:3]
  p = p.reshape(p.shape[:3] + (c, k[0] * k[1]))
  p = jnp.swapaxes(p, -1, -2).reshape(p.shape[:3] + (k[0] * k[1] * c,))
  return p.reshape(batch_shape + (h, w, k[0] * k[1] * c))


def _general_in_ndim(module):
  if getattr(module, "batch_axis", None):
    raise ValueError("LinearGeneral with batch_axis is not supported as a memory")
  return len(_tuple(module.in_features, 1))


def _general_key_axes(module):
  return tuple(_tuple(module.axis, 1))


def _dense_general_in_ndim(module):
  if module.batch_dims:
    raise ValueError("DenseGeneral with batch_dims is not supported as a memory")
  return len(_tuple(module.axis, 1))


def _einsum_layout(einsum_str):
  """(in_ndim) for einsum strings shaped '...<in letters>,<in letters><out>->...<out>'."""
  if einsum_str is None:
    raise ValueError("Einsum memory: expected einsum_str set on the module, got None")
  s = einsum_str.replace(" ", "")
  lhs, out = s.split("->")
  x, k = lhs.split(",")
  contracted = [c for c in k if c in x and c not in out]
  kept = [c for c in k if c not in contracted]
  n = len(contracted)
  ok = (n > 0 and list(k) == contracted + kept and list(x[-n:]) == contracted
        and list(out[-len(kept):]) == kept and out[:-len(kept)] == x[:-n]
        and not any(c in x for c in kept))
  if not ok:
    raise ValueError(
        f"Einsum memory: expected an einsum string like '...i,io->...o' (kernel = "
        f"contracted input axes then output axes, both trailing), got {einsum_str!r}")
  return n


def _register_builtins():
  dense = dict(kind="dense")
  register_layer_kind(nnx.Linear, in_ndim=1, **dense)
  register_layer_kind(nnx.LinearGeneral, in_ndim=_general_in_ndim,
                      key_axes=_general_key_axes, **dense)
  register_layer_kind(nnx.Einsum, in_ndim=lambda m: _einsum_layout(m.einsum_str), **dense)
  register_layer_kind(nn.Dense, in_ndim=1, **dense)
  register_layer_kind(nn.DenseGeneral, in_ndim=_dense_general_in_ndim,
                      key_axes=lambda m: tuple(_tuple(m.axis, 1)), **dense)
  register_layer_kind(nn.Einsum, in_ndim=lambda m: _einsum_layout(m.einsum_str), **dense)
  for cls in (nnx.Conv, nnx.ConvTranspose, nn.Conv, nn.ConvTranspose):
    register_layer_kind(cls, kind="conv", patches=_conv_patches, check=_conv_check)


_register_builtins()


# ----------------------------------------------------------------------------------
# Models and addresses
# ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Model:
  framework: str  # 'nnx' | 'linen'
  definition: Any  # nnx GraphDef | linen Module
  params: Any  # nnx State | linen variables dict
  form: str  # 'module' | 'split' | 'linen'


def _as_model(model) -> _Model:
  if isinstance(model, _Model):
    return model
  if isinstance(model, nnx.Module):
    gd, st = nnx.split(model)
    return _Model("nnx", gd, st, "module")
  if isinstance(model, (tuple, list)) and len(model) == 2:
    a, b = model
    if isinstance(a, nn.Module):
      return _Model("linen", a, b, "linen")
    if isinstance(a, nnx.GraphDef):
      return _Model("nnx", a, b, "split")
  raise ValueError(
      "model: expected an nnx.Module, an NNX (graphdef, state) pair or a Linen "
      f"(module, variables) pair, got {type(model).__name__}")


def _merge(graphdef, state):
  """``nnx.merge`` on fresh Variable objects: merging reuses the state's Variables, so a
  merged model that ran (RNG counters, batch statistics, sown values) would otherwise
  write into the caller's model."""
  return nnx.merge(graphdef, jax.tree_util.tree_map(lambda x: x, state))


def _rewrap(m: _Model, params):
  if m.form == "module":
    return _merge(m.definition, params)
  return (m.definition, params)


def _path_str(p) -> str:
  return "/".join(str(x) for x in p)


def _normalise_address(address) -> tuple:
  if isinstance(address, str):
    parts = [a for a in address.replace(".", "/").split("/") if a]
    return tuple(int(a) if a.isdigit() else a for a in parts)
  if isinstance(address, (tuple, list)):
    return tuple(address)
  raise ValueError(f"address: expected a path tuple, a 'a/b/c' string or a selector "
                   f"function, got {type(address).__name__}")


def _near_paths_error(address, valid: Sequence[tuple], what="layer") -> ValueError:
  want = _path_str(address)
  valid = [p for p in valid if p]
  strs = [_path_str(p) for p in valid]
  close = difflib.get_close_matches(want, strs, n=6, cutoff=0.4)
  parent = address[:-1]
  siblings = [_path_str(p) for p in valid if len(p) == len(address) and p[:-1] == parent]
  near = list(dict.fromkeys(close + siblings))[:12] or strs[:12]
  return ValueError(f"address: no {what} at {address!r}; valid paths near it: "
                    + ", ".join(repr(s) for s in near))


def _nnx_module_paths(model) -> list[tuple[tuple, Any]]:
  return [(tuple(p), mod) for p, mod in nnx.iter_modules(model)]


def _child(obj, part):
  """``obj.part`` (attributes) or ``obj[part]`` (nnx.List / nnx.Dict items)."""
  if isinstance(part, int):
    return obj[part]
  try:
    return getattr(obj, part)
  except AttributeError:
    return obj[part]


def _nnx_resolve(model, address) -> tuple[tuple, Any]:
  """(path, module) of an NNX address (path tuple, string or selector) in ``model``."""
  mods = _nnx_module_paths(model)
  if callable(address) and not isinstance(address, (tuple, list, str)):
    target = address(model)
    for p, mod in mods:
      if mod is target:
        return p, mod
    raise ValueError(f"address: the selector returned {type(target).__name__}, which is "
                     "not a submodule of the model")
  path = _normalise_address(address)
  obj = model
  try:
    for part in path:
      obj = _child(obj, part)
  except (AttributeError, IndexError, KeyError, TypeError):
    raise _near_paths_error(path, [p for p, _ in mods if p]) from None
  if not isinstance(obj, nnx.Module):
    raise _near_paths_error(path, [p for p, _ in mods if p])
  for p, mod in mods:  # canonical (first) path of a shared module
    if mod is obj:
      return p, mod
  return path, obj


def _linen_module_paths(variables) -> list[tuple]:
  flat = flatten_dict(variables.get("params", {}))
  paths = set()
  for k in flat:
    for i in range(0, len(k)):  # () is the root module (a model that is one layer)
      paths.add(tuple(k[:i]))
  return sorted(paths)


def _get(tree, path):
  return get_leaf(tree, path)


def _replace(tree, path, value):
  """A copy of ``tree`` (nnx.State or nested dict) with the leaf at ``path`` replaced."""
  return replace_leaf(tree, path, value)


# ----------------------------------------------------------------------------------
# Memory views
# ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class MemoryView:
  """One layer of a model seen as a key -> value memory.

  Attributes:
    framework: ``'nnx'`` or ``'linen'``.
    address: module path of the layer (e.g. ``('blocks', 1, 'fc1')`` or
      ``('Block_0', 'fc1')``).
    weight_path: path of the kernel leaf in the model's state / variables (usable with
      ``memedit.get_leaf``, ``replace_leaf`` and as an ``Edit`` path).
    layer_type: the layer's class.
    kind: memory layout of the kernel, ``'dense'`` or ``'conv'`` (per-tap HWIO).
    in_ndim: leading input axes of a dense kernel (3 for a patch view of a conv).
    patch: whether a conv layer is viewed with patch keys (then ``kind='dense'``).
    kernel_shape: shape of the kernel leaf.
    key_dim: dimension of one key.
    value_dim: dimension of one value (``prod(out_dims)`` or ``C_out``).
    key_axes: input axes forming a key (dense) or ``(-1,)`` (conv).
    stacked: number of leading stacked (scanned) axes on the kernel leaf; views of
      stacked layers capture and collect statistics but do not run the layer alone.
    input_ndim: ndim of the layer's first call argument when the view was made with
      example inputs (``None`` otherwise); used to give flat keys the leading axes a
      fixed-rank layer (e.g. an einsum ``'btd,...'``) expects.
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
  _spec: LayerKind
  _layer: Any  # nnx: (graphdef, state) of the layer; linen: (module def, variables)

  @property
  def edit_kind(self) -> str:
    """``kind`` of edits made through this view (``'dense'`` for patch views)."""
    return self.kind

  @property
  def layer_module(self):
    """A fresh instance of the layer alone (NNX) or its unbound definition (Linen)."""
    if self.framework == "nnx":
      return _merge(*self._layer)
    return self._layer[0]

  def kernel(self, model=None):
    """The kernel leaf of ``model`` (default: the kernel the view was made from)."""
    if model is None:
      return self._layer_kernel()
    return _get(_as_model(model).params, self.weight_path)

  def _layer_kernel(self):
    if self.framework == "nnx":
      return getattr(_merge(*self._layer), self._spec.weight)[...]
    return self._layer[1]["params"][self._spec.weight]

  def _require_unstacked(self):
    if self.stacked:
      raise ValueError(
          f"layer {self.address!r}: its kernel {self.kernel_shape} is stacked over "
          f"{self.stacked} scanned axis; running it alone needs one slice")

  def apply(self, kernel, x, *extra, **kwargs):
    """Runs the layer alone on its native input ``x`` with its kernel replaced.

    Args:
      kernel: kernel with the layer's own shape.
      x: the layer's first call argument (e.g. ``(..., *in_dims)`` or ``(N, H, W, C_in)``).
      *extra: further call arguments (e.g. a style vector), as captured.

    Returns:
      The layer's output ``f(kernel, x, *extra)``.
    """
    self._require_unstacked()
    if self.framework == "nnx":
      gd, st = self._layer
      st = _replace(st, (self._spec.weight,), kernel)
      return _merge(gd, st)(x, *extra, **kwargs)
    mod, variables = self._layer
    variables = _replace(variables, ("params", self._spec.weight), kernel)
    return mod.apply(variables, x, *extra, **kwargs)

  def keys(self, x):
    """Keys ``(..., key_dim)`` of the layer's native input ``x``.

    Dense: the key axes moved last and flattened. Conv: per-pixel channel vectors
    ``(N, H, W, C_in)``; patch view: patches ``(N, H_out, W_out, kh*kw*C_in)`` aligned with
    the output pixels.
    """
    if self.patch:
      return self._spec.patches(self.layer_module, x)
    if self.kind == "conv":
      return x
    n = len(self.key_axes)
    axes = [a % x.ndim for a in self.key_axes]
    x = jnp.moveaxis(x, axes, list(range(x.ndim - n, x.ndim)))
    return x.reshape(x.shape[:x.ndim - n] + (-1,))

  def native_keys(self, keys):
    """Inverse of :meth:`keys` for flat dense keys ``(n, key_dim)`` with trailing key axes.

    When the view knows the layer's input rank (made with example inputs), singleton
    leading axes are added up to it.
    """
    if self.kind == "conv" or self.patch:
      raise ValueError("native_keys: only for dense views")
    in_dims = tuple(self.kernel_shape[self.stacked:self.stacked + self.in_ndim])
    n = len(self.key_axes)
    if keys.shape[-1] != self.key_dim:
      raise ValueError(f"keys: expected last dimension {self.key_dim}, got {keys.shape[-1]}")
    x = keys.reshape(keys.shape[:-1] + in_dims)
    if self.input_ndim is not None and x.ndim < self.input_ndim:
      x = x.reshape((1,) * (self.input_ndim - x.ndim) + x.shape)
    axes = [a % x.ndim for a in self.key_axes]
    return jnp.moveaxis(x, list(range(x.ndim - n, x.ndim)), axes)

  def math_weight(self, kernel=None):
    """Math layout of the kernel: ``(out, in)`` (dense / patch) or ``(kh, kw, out, in)``."""
    kernel = self._layer_kernel() if kernel is None else kernel
    if self.kind == "conv":
      return jnp.swapaxes(kernel, -1, -2)
    k = kernel.reshape((self.key_dim, self.value_dim))
    return k.T

  def kernel_from_math(self, w):
    """Inverse of :meth:`math_weight`."""
    if self.kind == "conv":
      return jnp.swapaxes(w, -1, -2)
    return w.T.reshape(self.kernel_shape[self.stacked:])


def _nnx_call_kernel_ndim(mod, kernel_leaf) -> int:
  """Kernel ndim of one call of an NNX layer (smaller than the leaf's if scanned/stacked)."""
  if isinstance(mod, nnx.Linear):
    return 2
  if isinstance(mod, nnx.LinearGeneral):
    return (len(getattr(mod, "batch_axis", {}) or {}) + len(_tuple(mod.in_features, 1))
            + len(_tuple(mod.out_features, 1)))
  shape = getattr(mod, "kernel_shape", None)
  return len(shape) if shape is not None else kernel_leaf.ndim


def _view_from_module(framework, address, weight_path, mod, kernel_leaf, layer, patch,
                      call_ndim, input_ndim=None):
  spec = layer_kind(mod)
  if spec.check is not None:
    spec.check(mod)
  kshape = tuple(kernel_leaf.shape)
  if spec.kind == "conv":
    if patch and spec.patches is None:
      raise ValueError(f"patch view: no patch extractor registered for "
                       f"{type(mod).__name__}; pass patches= to register_layer_kind")
    stacked = len(kshape) - call_ndim
    if call_ndim != 4:
      raise ValueError(f"conv layer: expected an HWIO kernel (kh, kw, C_in, C_out), got "
                       f"{kshape}")
    kh, kw, cin, cout = kshape[stacked:]
    if patch:
      kind, in_ndim, key_dim = "dense", 3, kh * kw * cin
    else:
      kind, in_ndim, key_dim = "conv", 1, cin
    value_dim, key_axes = cout, (-1,)
  else:
    if patch:
      raise ValueError(f"patch view: expected a conv layer, got {type(mod).__name__}")
    in_ndim = spec.resolved_in_ndim(mod)
    key_axes = spec.resolved_key_axes(mod)
    kind = "dense"
    stacked = len(kshape) - call_ndim
    body = kshape[stacked:]
    key_dim = int(np.prod(body[:in_ndim]))
    value_dim = int(np.prod(body[in_ndim:]))
  return MemoryView(framework, tuple(address), tuple(weight_path), type(mod), kind, in_ndim,
                    bool(patch), kshape, key_dim, value_dim, tuple(key_axes), stacked,
                    input_ndim, spec, layer)


def memory_view(model, address, *args, patch: bool = False, method: str | None = None,
                **kwargs) -> MemoryView:
  """The memory view of one layer of a model nobody prepared.

  Args:
    model: an ``nnx.Module`` (never mutated), an NNX ``(graphdef, state)`` pair or a Linen
      ``(module, variables)`` pair.
    address: NNX: a path tuple like ``('blocks', 1, 'fc1')``, a string ``'blocks/1/fc1'``
      or a selector ``lambda m: m.blocks[1].fc1``. Linen: a tuple of module names like
      ``('Block_0', 'fc1')``.
    *args: example inputs of the model. Needed for Linen (submodule definitions exist
      only while the model runs); traced abstractly (no compute).
    patch: view a conv layer with patch keys ``kh*kw*C_in`` (exact linear memory).
    method: Linen method to run (default ``__call__``).
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
    ValueError: unknown address (lists valid paths near it), unsupported layer kind (says
      how to register one), Linen without example inputs.
  """
  from memedit.layers import hooks as _cap  # hooks imports this module
  m = _as_model(model)
  if m.framework == "nnx":
    obj = _merge(m.definition, m.params)
    path, mod = _nnx_resolve(obj, address)
    spec = layer_kind(mod)
    if not hasattr(mod, spec.weight):
      raise ValueError(f"layer {path!r}: expected a kernel attribute {spec.weight!r} on "
                       f"{type(mod).__name__}")
    weight_path = path + (spec.weight,)
    kernel_leaf = _get(m.params, weight_path)
    layer = nnx.split(mod)
    input_ndim = None
    if args or kwargs:
      input_ndim = _cap._nnx_input_ndim(m, path, args, kwargs, method)
    return _view_from_module("nnx", path, weight_path, mod, kernel_leaf, layer, patch,
                             _nnx_call_kernel_ndim(mod, kernel_leaf), input_ndim)
  # Linen
  path = _normalise_address(address) if not callable(address) or isinstance(
      address, (tuple, list, str)) else None
  if path is None:
    raise ValueError("address: Linen layers are addressed by a tuple of module names, "
                     "e.g. ('Block_0', 'fc1'), not a selector function")
  valid = _linen_module_paths(m.params)
  if path not in valid:
    raise _near_paths_error(path, valid)
  if not args and not kwargs:
    raise ValueError("memory_view: a Linen model needs example inputs (*args) to find the "
                     f"definition of layer {path!r}")
  mod_def, layer_vars, call_shape, input_ndim = _cap._linen_layer_definition(
      m, path, args, kwargs, method)
  spec = layer_kind(mod_def)
  weight_path = ("params",) + path + (spec.weight,)
  if tuple(weight_path[1:]) not in flatten_dict(m.params["params"]):
    raise ValueError(f"layer {path!r}: expected a parameter {spec.weight!r}, found "
                     f"{sorted(layer_vars.get('params', {}))}")
  kernel_leaf = _get(m.params, weight_path)
  return _view_from_module("linen", path, weight_path, mod_def, kernel_leaf,
                           (mod_def, layer_vars), patch, len(call_shape), input_ndim)


def _view(model, address_or_view, *args, **kwargs) -> MemoryView:
  if isinstance(address_or_view, MemoryView):
    return address_or_view
  return memory_view(model, address_or_view, *args, **kwargs)


# ----------------------------------------------------------------------------------
# Substitution and edited forward passes
# ----------------------------------------------------------------------------------


def substitute(model, address_or_view, new_kernel, *example_args, **example_kwargs):
  """The model with one layer's kernel replaced; the caller's model is not touched.

  Args:
    model: NNX module, NNX ``(graphdef, state)`` or Linen ``(module, variables)``.
    address_or_view: a :class:`MemoryView` or an address (see :func:`memory_view`).
    new_kernel: array with the kernel leaf's shape.
    *example_args: example inputs (Linen addresses only).

  Returns:
    The model in the form it was given: a new ``nnx.Module``, ``(graphdef, new_state)`` or
    ``(module, new_variables)``.

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> import memedit.layers as ml
    >>> model = nnx.Sequential(nnx.Linear(3, 2, rngs=nnx.Rngs(0)))
    >>> new = ml.substitute(model, ("layers", 0), jnp.zeros((3, 2)))
    >>> float(abs(new.layers[0].kernel[...]).sum()), float(abs(model.layers[0].kernel[...]).sum()) > 0
    (0.0, True)
  """
  m = _as_model(model)
  view = _view(m, address_or_view, *example_args, **example_kwargs)
  old = _get(m.params, view.weight_path)
  if tuple(new_kernel.shape) != tuple(old.shape):
    raise ValueError(f"new_kernel: expected shape {tuple(old.shape)}, got "
                     f"{tuple(new_kernel.shape)}")
  return _rewrap(m, _replace(m.params, view.weight_path, jnp.asarray(new_kernel, old.dtype)))


def _kernel_delta(view: MemoryView, lam, directions, kernel_shape):
  return kernel_delta(lam, directions, kernel_shape, kind=view.edit_kind, in_ndim=view.in_ndim)


def edited_kernel(view: MemoryView, kernel0, lam, directions):
  """``W0 + kernel_delta(lam, directions)`` in the kernel's own layout (differentiable).

  Args:
    view: the layer's :class:`MemoryView` (gives the layout).
    kernel0: the original kernel W0.
    lam: Λ of shape ``memedit.lambda_shape(kernel0.shape, r, view.edit_kind, view.in_ndim)``.
    directions: D ``(r, key_dim)``.

  Returns:
    The edited kernel, shaped like ``kernel0``.

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> import memedit.layers as ml
    >>> view = ml.memory_view(nnx.Sequential(nnx.Linear(3, 2, rngs=nnx.Rngs(0))), "layers/0")
    >>> k = ml.edited_kernel(view, jnp.zeros((3, 2)), jnp.ones((2, 1)), jnp.array([[1.0, 0, 0]]))
    >>> k.tolist()
    [[1.0, 1.0], [0.0, 0.0], [0.0, 0.0]]
  """
  return kernel0 + _kernel_delta(view, lam, directions, kernel0.shape).astype(kernel0.dtype)


def layer_forward(view: MemoryView, lam, directions, x, *extra, kernel0=None, **kwargs):
  """The layer alone on native input ``x`` with kernel ``W0 + kernel_delta(lam, D)``.

  Args:
    view: the layer's :class:`MemoryView`.
    lam: Λ. directions: D ``(r, key_dim)``.
    x: the layer's native input (e.g. captured keys). *extra: further call arguments.
    kernel0: W0 (default: the kernel the view was made from).

  Returns:
    The layer's output; differentiable in ``lam``.

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> import memedit.layers as ml
    >>> lin = nnx.Linear(3, 2, use_bias=False, rngs=nnx.Rngs(0))
    >>> view = ml.memory_view(nnx.Sequential(lin), "layers/0")
    >>> y = ml.layer_forward(view, jnp.ones((2, 1)), jnp.array([[1.0, 0, 0]]),
    ...                      jnp.array([[1.0, 0, 0]]), kernel0=jnp.zeros((3, 2)))
    >>> y.tolist()
    [[1.0, 1.0]]
  """
  k0 = view._layer_kernel() if kernel0 is None else kernel0
  return view.apply(edited_kernel(view, k0, lam, directions), x, *extra, **kwargs)


def edited_forward(model, view: MemoryView, lam, directions, *args, method=None, **kwargs):
  """The whole model's output with the layer's kernel ``W0 + kernel_delta(lam, D)``.

  Pure and differentiable in ``lam`` (use under ``jax.jit`` / ``jax.grad``); the model's
  other parameters are constants.

  Args:
    model: NNX module, NNX ``(graphdef, state)`` or Linen ``(module, variables)``.
    view: the layer's :class:`MemoryView`.
    lam: Λ. directions: D ``(r, key_dim)``.
    *args, **kwargs: model inputs. method: model method to run.

  Returns:
    The model's output.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> import memedit.layers as ml
    >>> model = nnx.Sequential(nnx.Linear(3, 2, rngs=nnx.Rngs(0)))
    >>> view = ml.memory_view(model, "layers/0")
    >>> D = jnp.array([[1.0, 0.0, 0.0]])
    >>> g = jax.jit(jax.grad(lambda lam: ml.edited_forward(model, view, lam, D,
    ...                                                    jnp.ones((1, 3))).sum()))
    >>> g(jnp.zeros((2, 1))).tolist()
    [[1.0], [1.0]]
  """
  m = _as_model(model)
  k0 = _get(m.params, view.weight_path)
  params = _replace(m.params, view.weight_path, edited_kernel(view, k0, lam, directions))
  if m.framework == "nnx":
    mod = _merge(m.definition, params)
    fn = mod if method is None else getattr(mod, method)
    return fn(*args, **kwargs)
  return m.definition.apply(params, *args, method=method, **kwargs)


# ----------------------------------------------------------------------------------
# Closed-form inserts
# ----------------------------------------------------------------------------------


def _conv_taps_independent(view: MemoryView) -> bool:
  kh, kw = view.kernel_shape[view.stacked:view.stacked + 2]
  if (kh, kw) == (1, 1):
    return True
  return False


def insert_through_view(view: MemoryView, C, keys, values, *, ridge: float | None = None,
                        name: str | None = None, method: str = "insert_closed_form"):
  """Closed-form insert of ``keys -> values`` into the viewed layer, as a core ``Edit``.

  The layer may be affine (bias, LinearGeneral head axes, ...): targets are turned into
  kernel targets through the layer itself, ``W0 k* + (v* - f(W0, k*))``, so the edited
  layer outputs exactly ``v*`` at ``k*`` while keys ``k`` with ``k^T C^{-1} K* = 0`` keep
  their outputs.

  Exactness: dense layers and patch views of (transposed) convolutions are exact linear
  memories. Per-pixel conv views are exact here only for 1x1 kernels; for ``k x k``
  kernels a pixel's output mixes several taps, so use ``patch=True`` or the per-tap
  ``solve_lambda(..., kind='conv')``. Layers that are not affine in their first argument
  (extra call arguments such as a style, demodulation) need ``solve_lambda`` with
  ``f = lambda K, x: view.apply(K, x, *extra)``.

  Args:
    view: the layer's :class:`MemoryView`.
    C: ``(key_dim, key_dim)`` second moment of the layer's keys.
    keys: ``(n, key_dim)`` flat keys (dense with trailing key axes, patch views, 1x1
      conv) or native layer inputs ``(n, *in_dims)`` (dense).
    values: ``(n, value_dim)`` or ``(n, *out_dims)`` target layer outputs.
    ridge: use the soft insert ``insert_ridge`` with this ridge instead of the exact one.
    name: the edit's name.

  Returns:
    ``memedit.Edit`` with path ``view.weight_path``.

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> import memedit, memedit.layers as ml
    >>> model = nnx.Sequential(nnx.Linear(3, 2, rngs=nnx.Rngs(0)))
    >>> view = ml.memory_view(model, "layers/0")
    >>> k, v = jnp.array([[1.0, 2.0, 0.0]]), jnp.array([[0.5, -0.5]])
    >>> edit = ml.insert_through_view(view, jnp.eye(3), k, v)
    >>> state, _ = memedit.apply_edit(nnx.state(model), edit)
    >>> new = nnx.merge(nnx.graphdef(model), state)
    >>> bool(jnp.allclose(new(k), v, atol=1e-5))
    True
  """
  view._require_unstacked()
  kernel0 = view._layer_kernel()
  if view.kind == "conv" and not _conv_taps_independent(view):
    raise ValueError(
        f"insert_through_view: layer {view.address!r} has a {view.kernel_shape[:2]} kernel "
        "viewed per pixel; a pixel's output mixes taps, so the per-tap closed form is not "
        "exact. Use memory_view(..., patch=True) or solve_lambda(kind='conv').")
  keys = jnp.asarray(keys)
  values = jnp.asarray(values)
  n = keys.shape[0]
  C = jnp.asarray(C)
  if C.shape != (view.key_dim, view.key_dim):
    raise ValueError(f"C: expected shape {(view.key_dim, view.key_dim)}, got {C.shape}")
  bias = _layer_bias(view)
  if view.kind == "conv":  # 1x1, per-pixel keys: the pixel's output is W k + b
    if keys.shape[-1] != view.key_dim:
      raise ValueError(f"keys: expected last dimension {view.key_dim}, got {keys.shape[-1]}")
    flat = keys.reshape(n, view.key_dim)
    w = view.math_weight(kernel0)[0, 0]
    out0 = flat @ w.T + (0.0 if bias is None else bias)
  elif view.patch:
    if keys.shape[-1] != view.key_dim:
      raise ValueError(f"keys: expected last dimension {view.key_dim}, got {keys.shape[-1]}")
    flat = keys.reshape(n, view.key_dim)
    w = view.math_weight(kernel0)
    out0 = flat @ w.T + (0.0 if bias is None else bias)
  else:
    if keys.ndim == 2 and keys.shape[-1] == view.key_dim:
      flat = keys
      native = view.native_keys(keys)
    else:
      native = keys
      flat = view.keys(keys).reshape(n, view.key_dim)
    out0 = view.apply(kernel0, native).reshape(n, -1)
    w = view.math_weight(kernel0)
  if out0.shape[-1] != view.value_dim:
    raise ValueError(f"layer output: expected {view.value_dim} values per key, got "
                     f"{out0.shape[-1]} (keys with several positions per example?)")
  values = values.reshape(n, -1)
  if values.shape[-1] != view.value_dim:
    raise ValueError(f"values: expected {view.value_dim} per key, got {values.shape[-1]}")
  targets = flat @ w.T + (values - out0)
  if ridge is None:
    sol = insert_closed_form(w, C, flat, targets)
  else:
    sol = insert_ridge(w, C, flat, targets, ridge)
  lam, directions = sol.lam, sol.directions
  if view.kind == "conv":
    lam = lam[None, None]  # (1, 1, out, r)
  return make_edit(view.weight_path, lam, directions, kind=view.edit_kind,
                   in_ndim=view.in_ndim, method=method, name=name,
                   settings={"address": [str(a) for a in view.address],
                             "patch": view.patch, "ridge": ridge})


def _layer_bias(view: MemoryView):
  if view.framework == "nnx":
    b = getattr(view.layer_module, "bias", None)
    return None if b is None else b[...]
  return view._layer[1]["params"].get("bias")
