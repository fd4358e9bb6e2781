"""Any Flax layer as a key -> value memory: layer kinds, memory views, substitution.

A layer with kernel ``W`` maps keys ``k`` (its input) to values ``v`` (its output). This
module finds a layer inside a Flax model that was not prepared for editing (NNX or
Linen), describes how its kernel is a memory (:class:`MemoryView`) and rewrites that
kernel functionally.

Layouts (see the core API):

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
    gain: the factor the layer multiplies its weight by at run time (``y = x (g W) + b``,
      e.g. an equalised learning rate ``g = 1/sqrt(fan_in)``): a number, an array
      broadcasting to ``(value_dim,)`` (one per output), or ``module -> either``; ``None``
      is 1.
    keys: optional ``(module, x) -> (..., key_dim)`` turning the layer's native input into
      flat keys (dense kinds; e.g. token ids into one-hot rows for an embedding).
    native_keys: optional ``(module, keys (n, key_dim)) -> x``, the inverse of ``keys``.
  """
  cls: type
  weight: str = "kernel"
  kind: str = "dense"
  in_ndim: int | Callable[[Any], int] = 1
  key_axes: Callable[[Any], tuple] | None = None
  patches: Callable[[Any, Any], Any] | None = None
  check: Callable[[Any], None] | None = None
  gain: Any = None
  keys: Callable[[Any, Any], Any] | None = None
  native_keys: Callable[[Any, Any], Any] | None = None

  def resolved_gain(self, module):
    """The run-time weight gain of ``module`` (``None`` when the layer uses its weight as is)."""
    g = self.gain(module) if callable(self.gain) else self.gain
    return None if g is None else jnp.asarray(g, jnp.float32)

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
                        check: Callable[[Any], None] | None = None,
                        gain: Any = None,
                        keys: Callable[[Any, Any], Any] | None = None,
                        native_keys: Callable[[Any, Any], Any] | None = None) -> LayerKind:
  """Declares how a layer class is a memory, so views, captures and edits accept it.

  Example: a custom NNX layer ``y = x @ self.w + self.b`` whose kernel param is ``w``::

    register_layer_kind(MyLinear, weight="w", kind="dense", in_ndim=1)

  The contract: called with its kernel replaced by ``W`` and nothing else changed, the
  layer computes ``f(W, x) = gain * (W_math k(x)) + b(x)``, affine in ``W`` with ``b`` not
  depending on ``W`` (``W_math`` is the ``(value_dim, key_dim)`` math layout, ``k(x)`` the
  keys). A layer that scales its weight at run time (``y = x (g W) + b``) declares ``gain``
  so that inserts write exactly their targets. :meth:`MemoryView.check_contract` tests
  the contract on random probes, and :func:`insert_through_view` runs it before solving.

  Args:
    cls: NNX or Linen module class (subclasses inherit the registration).
    weight: name of the kernel attribute (NNX) or parameter (Linen).
    kind: ``'dense'`` (kernel ``(*in_dims, *out_dims)``, keys are the last ``in_ndim``
      input axes) or ``'conv'`` (HWIO kernel ``(kh, kw, C_in, C_out)``, per-pixel keys).
    in_ndim: leading input axes of a dense kernel, or ``module -> int``.
    key_axes: optional ``module -> axes`` of the input forming the key (dense).
    patches: optional ``(module, x) -> (..., kh*kw*C_in)`` patch extractor (conv).
    check: optional ``module -> None`` that raises ``ValueError`` for unsupported setups.
    gain: run-time weight gain ``g`` (number, per-output array, or ``module -> either``).
    keys: optional ``(module, x) -> flat keys`` (dense; default: the key axes flattened).
    native_keys: optional ``(module, flat keys) -> x``, the inverse of ``keys``.

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
  if gain is not None and not callable(gain):
    g = np.asarray(gain)
    if g.ndim > 1 or not np.issubdtype(g.dtype, np.number) or not np.all(np.isfinite(g)) or (
        np.any(g == 0)):
      raise ValueError(f"gain: expected a finite non-zero number, a 1-D array of them or a "
                       f"function of the module, got {gain!r}")
  spec = LayerKind(cls, weight, kind, in_ndim, key_axes, patches, check, gain, keys,
                   native_keys)
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
  if "Norm" in cls.__name__:
    raise ValueError(
        f"layer kind: {cls.__module__}.{cls.__name__} is a normalisation layer, not a "
        "registered memory layer: its scale and bias act per feature on normalised inputs, "
        f"not as a key -> value map (memory layers: {known}).")
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


def _kernel_size(module) -> tuple:
  ks = module.kernel_size
  return (int(ks),) if isinstance(ks, int) else tuple(int(k) for k in ks)


def _conv_groups(module) -> int:
  return int(getattr(module, "feature_group_count", 1) or 1)


def _is_transpose(module) -> bool:
  return "Transpose" in type(module).__name__ or isinstance(
      module, (nnx.ConvTranspose, nn.ConvTranspose))


def _conv_check(module):
  ks = _kernel_size(module)
  if not 1 <= len(ks) <= 3:
    raise ValueError(f"conv layer: expected a 1-, 2- or 3-D kernel_size, got {ks}")
  if getattr(module, "mask", None) is not None:
    raise ValueError("conv layer: masked kernels are not supported as memories")


_PAD_MODES = {"CIRCULAR": "wrap", "REFLECT": "reflect", "CAUSAL": "constant"}


def _conv_patch_check(module):
  """Raises ``ValueError`` when the patch view cannot reproduce the layer."""
  transpose = _is_transpose(module)
  if transpose and getattr(module, "transpose_kernel", False):
    raise ValueError("patch view: ConvTranspose(transpose_kernel=True) is not supported")
  from flax.linen.linear import canonicalize_padding
  k = _kernel_size(module)
  pad = canonicalize_padding(module.padding, len(k))
  if isinstance(pad, str) and pad not in ("SAME", "VALID"):
    if transpose or pad not in _PAD_MODES:
      raise ValueError(
          f"patch view: padding {pad!r} of {type(module).__name__} is not supported "
          "(expected 'SAME', 'VALID' or explicit pairs"
          + ("" if transpose else ", 'CIRCULAR', 'REFLECT' or 'CAUSAL'") + ")")
    if pad == "CAUSAL" and len(k) != 1:
      raise ValueError(f"patch view: 'CAUSAL' padding needs a 1-D convolution, got "
                       f"kernel_size {k}")


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


_SPATIAL = {1: "W", 2: "HW", 3: "DHW"}


def _conv_patches(module, x):
  """Patch keys ``(..., *out_spatial, T*C_in)`` (tap-major, channel-minor) of a Conv /
  ConvTranspose with 1, 2 or 3 spatial axes; grouped convs give all ``C_in`` channels."""
  from flax.linen.linear import canonicalize_padding
  _conv_patch_check(module)
  transpose = _is_transpose(module)
  k = _kernel_size(module)
  n = len(k)
  s = _tuple(module.strides, n)
  d = _tuple(getattr(module, "kernel_dilation", 1), n)
  lhs = _tuple(getattr(module, "input_dilation", 1), n)
  batch_shape = x.shape[:-(n + 1)]
  xb = x.reshape((-1,) + x.shape[-(n + 1):])
  mode = canonicalize_padding(module.padding, n)
  if isinstance(mode, str) and mode in _PAD_MODES:  # as flax: pad the input, then VALID
    if mode == "CAUSAL":
      pads = [(d[0] * (k[0] - 1), 0)]
    else:
      pads = [(((ki - 1) * di) // 2, ((ki - 1) * di + 1) // 2) for ki, di in zip(k, d)]
    xb = jnp.pad(xb, [(0, 0)] + pads + [(0, 0)], mode=_PAD_MODES[mode])
    pad = "VALID"
  else:
    pad = _explicit_padding(module.padding, k, s, d, transpose)
  c = x.shape[-1]
  spec = "N" + _SPATIAL[n] + "C"
  p = jax.lax.conv_general_dilated_patches(
      xb, k, (1,) * n if transpose else s, pad, lhs_dilation=s if transpose else lhs,
      rhs_dilation=d, dimension_numbers=(spec, _SPATIAL[n] + "IO", spec),
      precision=jax.lax.Precision.HIGHEST)
  # conv_general_dilated_patches orders features as (C_in, *taps); reorder to (*taps, C_in).
  taps = int(np.prod(k))
  out_sp = p.shape[1:1 + n]
  p = p.reshape(p.shape[:1 + n] + (c, taps))
  p = jnp.swapaxes(p, -1, -2).reshape(p.shape[:1 + n] + (taps * c,))
  return p.reshape(batch_shape + out_sp + (taps * c,))


def _block_diagonal(kernel, groups: int):
  """Grouped kernel ``(..., C_in/G, C_out)`` as the dense ``(..., C_in, C_out)`` it acts as."""
  if groups == 1:
    return kernel
  cig, cout = kernel.shape[-2:]
  k = kernel.reshape(kernel.shape[:-1] + (groups, cout // groups))  # (..., i, g, o)
  eye = jnp.eye(groups, dtype=kernel.dtype)
  full = jnp.einsum("...igo,hg->...higo", k, eye)
  return full.reshape(kernel.shape[:-2] + (groups * cig, cout))


def _diagonal_blocks(full, groups: int):
  """Inverse of :func:`_block_diagonal`: the diagonal blocks of ``(..., C_in, C_out)``."""
  if groups == 1:
    return full
  cin, cout = full.shape[-2:]
  f = full.reshape(full.shape[:-2] + (groups, cin // groups, groups, cout // groups))
  blocks = jnp.diagonal(f, axis1=-4, axis2=-2)  # (..., i, o, g)
  blocks = jnp.moveaxis(blocks, -1, -2)  # (..., i, g, o)
  return blocks.reshape(full.shape[:-2] + (cin // groups, cout))


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


def _embed_keys(module, tokens):
  """Token ids ``(...)`` as one-hot keys ``(..., num_embeddings)``."""
  tokens = jnp.asarray(tokens)
  if not jnp.issubdtype(tokens.dtype, jnp.integer):
    raise ValueError(f"embedding keys: expected integer token ids, got dtype {tokens.dtype}")
  return jax.nn.one_hot(tokens, module.num_embeddings, dtype=jnp.float32)


def _embed_native_keys(module, keys):
  """One-hot keys ``(n, num_embeddings)`` back to token ids ``(n,)``."""
  keys = jnp.asarray(keys)
  if not isinstance(keys, jax.core.Tracer):
    k = np.asarray(keys)
    hot = np.argmax(k, -1)
    if not np.array_equal(k, np.eye(k.shape[-1], dtype=k.dtype)[hot]):
      raise ValueError("embedding keys: expected one-hot rows (an embedding reads one row "
                       "per token), got other vectors")
  return jnp.argmax(keys, -1)


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
  for cls in (nnx.Embed, nn.Embed):
    register_layer_kind(cls, weight="embedding", in_ndim=1, keys=_embed_keys,
                        native_keys=_embed_native_keys, **dense)


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


def _escape_part(part) -> str:
  if not isinstance(part, str):
    return str(part)
  if part.isdigit():  # a name made of digits, not an index
    return "\\" + part
  return part.replace("\\", "\\\\").replace("/", "\\/").replace(".", "\\.")


def _path_str(p) -> str:
  """The string address of path ``p``: parts joined by ``/``; a ``.``, ``/`` or ``\\``
  inside a name is escaped with a backslash, so the string parses back to ``p``."""
  return "/".join(_escape_part(x) for x in p)


def _split_address(address: str, dots: bool = True) -> tuple:
  """Parts of a string address split on ``/`` (and ``.`` when ``dots``); a backslash
  makes the next character literal; all-digit parts are indices."""
  parts, cur, escaped, literal = [], [], False, False
  for ch in address:
    if escaped:
      cur.append(ch)
      escaped = False
    elif ch == "\\":
      escaped = literal = True
    elif ch == "/" or (dots and ch == "."):
      parts.append(("".join(cur), literal))
      cur, literal = [], False
    else:
      cur.append(ch)
  parts.append(("".join(cur), literal))
  return tuple(int(a) if a.isdigit() and not lit else a for a, lit in parts if a)


def _address_candidates(address) -> list[tuple]:
  """Paths a string address may name: split on ``/`` and ``.``, then (a name that itself
  contains dots, e.g. ``'blocks.2'``) on ``/`` only."""
  if isinstance(address, str):
    return list(dict.fromkeys([_split_address(address), _split_address(address, False)]))
  return [_normalise_address(address)]


def _normalise_address(address) -> tuple:
  if isinstance(address, str):
    return _split_address(address)
  if isinstance(address, (tuple, list)):
    return tuple(address)
  raise ValueError(f"address: expected a path tuple, a 'a/b/c' string or a selector "
                   f"function, got {type(address).__name__}")


def _linen_path(address, valid) -> tuple:
  """The Linen module path of an address (tuple or string) among ``valid`` paths."""
  if callable(address) and not isinstance(address, (tuple, list, str)):
    raise ValueError("address: Linen layers are addressed by a tuple of module names, "
                     "e.g. ('Block_0', 'fc1'), not a selector function")
  cands = _address_candidates(address)
  for path in cands:
    if path in valid:
      return path
  raise _near_paths_error(cands[0], valid)


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
  cands = _address_candidates(address)
  for path in cands:
    obj = model
    try:
      for part in path:
        obj = _child(obj, part)
    except (AttributeError, IndexError, KeyError, TypeError):
      continue
    if not isinstance(obj, nnx.Module):
      continue
    for p, mod in mods:  # canonical (first) path of a shared module
      if mod is obj:
        return p, mod
    return path, obj
  raise _near_paths_error(cands[0], [p for p, _ in mods if p])


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


# Scanned stacks. ``nn.scan`` (Linen) and ``nnx.vmap``/``nnx.scan`` (NNX) give every
# parameter of the scanned module a leading layer axis. One layer of such a stack is
# addressed by its index right after the scanned module's name: ``('stack', 1, 'fc2')`` or
# ``'stack/1/fc2'`` is layer 1 of the layer ``('stack', 'fc2')``. The scanned module is the
# outermost one on the layer's path whose parameters all carry the layer axis (the
# index is also accepted after the name of a module inside it).


def _param_shapes(m: _Model) -> list[tuple[tuple, tuple]]:
  """``(module path + name, shape)`` of every parameter of the model."""
  if m.framework == "nnx":
    out = []
    for k, v in nnx.to_flat_state(m.params):
      if isinstance(v, nnx.Variable):
        if not isinstance(v, nnx.Param):
          continue
        v = v.get_value()
      out.append((tuple(k), tuple(np.shape(v))))
    return out
  return [(tuple(k), tuple(np.shape(v)))
          for k, v in flatten_dict(m.params.get("params", {})).items()]


def _stack_region(m: _Model, path: tuple) -> tuple[int, int] | None:
  """``(L, at)`` for a layer whose parameters share a leading layer axis of size ``L``:
  ``path[:at]`` is the scanned module (every parameter under it carries the axis);
  ``None`` when the layer's parameters share no leading dimension."""
  shapes = _param_shapes(m)
  path = tuple(path)

  def leads(prefix):
    return {s[0] if s else None for p, s in shapes if p[:len(prefix)] == prefix}

  own = leads(path)
  if len(own) != 1 or None in own:
    return None
  size = own.pop()
  at = next(j for j in range(len(path) + 1) if leads(path[:j]) == {size})
  return size, at


def _slice_index(m: _Model, address: tuple, pos: int, rest: tuple, path: tuple
                 ) -> tuple[int, int, int]:
  """(index, L, at) of the layer index at ``address[pos]``; ``rest`` is the address without
  it and ``path`` the layer it names."""
  i = int(address[pos])
  region = _stack_region(m, path)
  if region is None:
    raise ValueError(
        f"address: {address!r} reads {i} as the index of one layer of a scanned stack, but "
        f"layer {path!r} is not stacked (its parameters share no leading layer axis)")
  size, at = region
  if tuple(rest) == tuple(path) and pos < at:
    want = path[:at] + (i,) + path[at:]
    raise ValueError(
        f"address: the index of one layer of a scanned stack goes right after the scanned "
        f"module's name {path[at - 1]!r}: expected {want!r} ({_path_str(want)!r}), got "
        f"{address!r}")
  if not -size <= i < size:
    raise ValueError(
        f"address: index {i} in {address!r} is out of range: the scanned stack "
        f"{path[:at]!r} has {size} layers (expected 0 <= index < {size})")
  return i % size, size, at


def _resolve_layer(m: _Model, address, obj=None):
  """The layer an address names: ``(module path, NNX module or None, index, L, at)``.

  ``index`` is ``None`` unless the address picks one layer of a scanned stack; then ``L``
  is the stack's size and ``at`` the position of the index in the canonical address
  ``path[:at] + (index,) + path[at:]``.
  """
  if m.framework == "nnx":
    obj = _merge(m.definition, m.params) if obj is None else obj
    resolve = lambda a: _nnx_resolve(obj, a)
  else:
    valid = _linen_module_paths(m.params)
    resolve = lambda a: (_linen_path(a, valid), None)
  try:
    path, mod = resolve(address)
    return path, mod, None, None, None
  except ValueError as e:
    if callable(address) and not isinstance(address, (tuple, list, str)):
      raise
    error = e
  for cand in _address_candidates(address):
    ints = [i for i, a in enumerate(cand)
            if isinstance(a, (int, np.integer)) and not isinstance(a, bool)]
    for pos in reversed(ints):
      rest = cand[:pos] + cand[pos + 1:]
      try:
        path, mod = resolve(rest)
      except ValueError:
        continue
      index, size, at = _slice_index(m, cand, pos, rest, path)
      return path, mod, index, size, at
  raise error


def _slice_tree(tree, index: int, size: int):
  """Layer ``index`` of a stacked layer's variables: every array leaf with leading
  dimension ``size`` (the layer axis) loses that axis."""
  def pick(x):
    return x[index] if np.ndim(x) >= 1 and np.shape(x)[0] == size else x
  return jax.tree_util.tree_map(pick, tree)


# ----------------------------------------------------------------------------------
# Memory views
# ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class MemoryView:
  """One layer of a model seen as a key -> value memory.

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
  groups: int = 1
  index: int | None = None
  stack_size: int | None = None
  module_path: tuple | None = None
  _slice_at: int | None = None  # where an index goes in the address of a stacked layer

  def __post_init__(self):
    if self.module_path is None:
      object.__setattr__(self, "module_path", tuple(self.address))

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
    return self._read(_as_model(model).params)

  def _read(self, params):
    """The view's kernel in ``params`` (layer ``index`` of a stacked leaf)."""
    leaf = _get(params, self.weight_path)
    return leaf if self.index is None else leaf[self.index]

  def _write(self, params, kernel):
    """``params`` with the view's kernel replaced (other layers of a stack untouched)."""
    if self.index is None:
      return _replace(params, self.weight_path, kernel)
    leaf = _get(params, self.weight_path)
    return _replace(params, self.weight_path,
                    leaf.at[self.index].set(jnp.asarray(kernel, leaf.dtype)))

  def _layer_kernel(self):
    if self.framework == "nnx":
      return getattr(_merge(*self._layer), self._spec.weight)[...]
    return self._layer[1]["params"][self._spec.weight]

  def _require_unstacked(self):
    if not self.stacked:
      return
    hint = ""
    if self.index is None and self._slice_at is not None:
      at, p = self._slice_at, self.module_path
      example = p[:at] + (0,) + p[at:]
      hint = (f"; address one layer of the stack with its index right after the scanned "
              f"module's name, e.g. {example!r} or {_path_str(example)!r} (index 0 to "
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
      if self._spec.patches is not None and self.taps == 1:
        # A 1x1 kernel reads the pixels its patches pick (every s-th one under a stride
        # s), so its keys line up with its output pixels.
        return self._spec.patches(self.layer_module, x)
      return x
    if self._spec.keys is not None:
      return self._spec.keys(self.layer_module, x)
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
    if keys.shape[-1] != self.key_dim:
      raise ValueError(f"keys: expected last dimension {self.key_dim}, got {keys.shape[-1]}")
    if self._spec.native_keys is not None:
      return self._spec.native_keys(self.layer_module, keys)
    in_dims = tuple(self.kernel_shape[self.stacked:self.stacked + self.in_ndim])
    n = len(self.key_axes)
    if keys.shape[-1] != self.key_dim:
      raise ValueError(f"keys: expected last dimension {self.key_dim}, got {keys.shape[-1]}")
    x = keys.reshape(keys.shape[:-1] + in_dims)
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
    return self._spec.resolved_gain(self.layer_module)

  def math_weight(self, kernel=None):
    """Math layout of the kernel: ``(out, in)`` (dense / patch) or ``(*taps, out, in)``
    (per-pixel conv); block-diagonal over the groups of a grouped conv."""
    kernel = self._layer_kernel() if kernel is None else kernel
    if self.kind == "conv":
      return jnp.swapaxes(_block_diagonal(kernel, self.groups), -1, -2)
    if self.groups > 1:
      kernel = _block_diagonal(kernel, self.groups)
    k = kernel.reshape((self.key_dim, self.value_dim))
    return k.T

  def kernel_from_math(self, w):
    """Inverse of :meth:`math_weight` (the diagonal blocks of a grouped conv's)."""
    if self.kind == "conv":
      return _diagonal_blocks(jnp.swapaxes(w, -1, -2), self.groups)
    shape = self.kernel_shape[self.stacked:]
    if self.groups > 1:
      full = w.T.reshape(shape[:-2] + (self.key_dim // self.taps, shape[-1]))
      return _diagonal_blocks(full, self.groups)
    return w.T.reshape(shape)

  def kernel_factors(self, lam, directions):
    """Factors over this view's keys as factors of an edit of the kernel leaf.

    Equal to ``(lam, directions)`` except for grouped convs, whose edits are the
    diagonal blocks of ``lam @ directions`` (see :func:`memedit.grouped_factors`).

    Args:
      lam: Λ, ``(value_dim, r)`` (dense / patch) or ``(*taps, C_out, r)`` (per-pixel conv).
      directions: D ``(r, key_dim)``.

    Returns:
      ``(lam, directions)`` for ``memedit.kernel_delta(..., kind=view.edit_kind,
      in_ndim=view.in_ndim)`` and ``memedit.make_edit``.
    """
    if self.groups == 1:
      return lam, directions
    from memedit.solve import grouped_factors
    return grouped_factors(lam, directions, self.groups, self.taps if self.patch else 1)

  def check_contract(self, x=None, *extra, seed: int = 0, rtol: float = 1e-4, **kwargs):
    """Checks on random probes that the layer is the memory its kind declares.

    With random kernels ``W1``, ``W2`` the layer must satisfy
    ``f(W1 + 2 W2, x) - f(0, x) = (f(W1, x) - f(0, x)) + 2 (f(W2, x) - f(0, x))`` (linear in
    its kernel), and, where keys line up with outputs (dense, patch and 1x1 conv views),
    ``f(W1, x) - f(0, x) = gain * k(x) W1_mathᵀ``.

    Args:
      x: the layer's native input (default: random probes: keys for dense views, a small
        image for conv views). *extra, **kwargs: further call arguments.
      seed: seed of the random probes. rtol: tolerance relative to the outputs' scale.

    Raises:
      ValueError: the layer is not linear in its kernel, or its output does not equal
        ``gain * W k`` (e.g. a run-time weight scale not declared as ``gain``).
    """
    self._require_unstacked()
    rng = np.random.default_rng(seed)
    with jax.ensure_compile_time_eval():
      if x is None:
        x = self._probe_input(rng)
      shape = self.kernel_shape[self.stacked:]
      dtype = self._layer_kernel().dtype
      w1, w2 = (jnp.asarray(rng.standard_normal(shape), dtype) for _ in range(2))
      f = lambda w: np.asarray(self.apply(w, x, *extra, **kwargs), np.float64)
      y0 = f(jnp.zeros(shape, dtype))
      y1, y2, y12 = f(w1) - y0, f(w2) - y0, f(w1 + 2 * w2) - y0
      scale = max(float(np.abs(y1).max()), float(np.abs(y2).max()), 1e-30)
      err = float(np.abs(y12 - y1 - 2 * y2).max()) / scale
      if err > rtol:
        raise ValueError(
            f"layer {self.address!r} ({self.layer_type.__name__}): expected its output to be "
            f"linear in its kernel (a memory of kind {self._spec.kind!r}), but "
            f"f(W1 + 2 W2) - f(0) differs from the sum of the parts by {err:.2g} of the "
            "output scale; a layer that is not affine in its kernel needs solve_lambda")
      if self.kind == "conv" and (self.taps != 1 or self._spec.patches is None):
        return
      k = np.asarray(self.keys(x), np.float64).reshape(-1, self.key_dim)
      pred = k @ np.asarray(self.math_weight(w1), np.float64).reshape(
          self.value_dim, self.key_dim).T
      g = self.gain()
      if g is not None:
        pred = pred * np.asarray(g, np.float64)
      y1 = y1.reshape(pred.shape)
      err = float(np.abs(pred - y1).max()) / scale
      if err > rtol:
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
    d = _tuple(getattr(mod, "kernel_dilation", 1), n)
    s = _tuple(getattr(mod, "strides", 1), n)
    sp = tuple((k - 1) * di + 1 + si for k, di, si in zip(shape[:n], d, s))
    cin = self.key_dim // self.taps if self.patch else self.key_dim
    return jnp.asarray(rng.standard_normal((1,) + sp + (cin,)), jnp.float32)


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
                      call_ndim, input_ndim=None, index=None, stack=None):
  """The view of a layer; ``index`` picks one layer of a scanned stack and ``stack()``
  gives :func:`_stack_region`'s ``(L, at)`` for the layer's path (or ``None``)."""
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
    groups = _conv_groups(mod)
    taps, cin, cout = int(np.prod(body[:-2])), body[-2] * groups, body[-1]
    if groups < 1 or cout % groups:
      raise ValueError(f"conv layer: expected C_out {cout} divisible by feature_group_count, "
                       f"got {groups}")
    if patch:
      if spec.patches is _conv_patches:
        _conv_patch_check(mod)
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
    layer = (layer[0], _slice_tree(layer[1], index, size))
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
  from memedit.layers import hooks as _cap  # hooks imports this module
  m = _as_model(model)
  obj = _merge(m.definition, m.params) if m.framework == "nnx" else None
  path, mod, index, _, _ = _resolve_layer(m, address, obj)
  stack = lambda: _stack_region(m, path)  # only asked for a stacked kernel
  if m.framework == "nnx":
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
                             _nnx_call_kernel_ndim(mod, kernel_leaf), input_ndim, index,
                             stack)
  # Linen
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
                           (mod_def, layer_vars), patch, len(call_shape), input_ndim, index,
                           stack)


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
    new_kernel: array with the view's kernel shape (one layer's for one layer of a
      scanned stack: the other layers keep their bits).
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
  old = view._read(m.params)
  if tuple(new_kernel.shape) != tuple(old.shape):
    raise ValueError(f"new_kernel: expected shape {tuple(old.shape)}, got "
                     f"{tuple(new_kernel.shape)}")
  return _rewrap(m, view._write(m.params, jnp.asarray(new_kernel, old.dtype)))


def _kernel_delta(view: MemoryView, lam, directions, kernel_shape):
  lam, directions = view.kernel_factors(lam, directions)
  return kernel_delta(lam, directions, kernel_shape, kind=view.edit_kind, in_ndim=view.in_ndim)


def edited_kernel(view: MemoryView, kernel0, lam, directions):
  """``W0 + kernel_delta(lam, directions)`` in the kernel's own layout (differentiable).

  Args:
    view: the layer's :class:`MemoryView` (gives the layout).
    kernel0: the original kernel W0.
    lam: Λ of shape ``memedit.lambda_shape(kernel0.shape, r, view.edit_kind, view.in_ndim)``.
    directions: D ``(r, key_dim)`` over the view's keys (for a grouped conv the full
      ``C_in`` keys; the kernel takes the diagonal blocks of ``Λ D``).

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
    *args, **kwargs: model inputs. method: model method to run (a name, or a function
      ``(module, *args, **kwargs) -> output``).

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
  k0 = view._read(m.params)
  params = view._write(m.params, edited_kernel(view, k0, lam, directions))
  if m.framework == "nnx":
    return _nnx_method(_merge(m.definition, params), method)(*args, **kwargs)
  return m.definition.apply(params, *args, method=method, **kwargs)


def _nnx_method(model, method):
  """The callable running ``model``: itself, its method named ``method``, or
  ``method(model, ...)`` for a function (as Linen's ``apply(..., method=fn)``)."""
  if method is None:
    return model
  if isinstance(method, str):
    fn = getattr(model, method, None)
    if fn is None or not callable(fn):
      raise ValueError(f"method: expected the name of a method of "
                       f"{type(model).__name__}, got {method!r}")
    return fn
  if callable(method):
    return lambda *a, **k: method(model, *a, **k)
  raise ValueError(f"method: expected None, a method name or a function (module, *args) "
                   f"-> output, got {type(method).__name__}")


# ----------------------------------------------------------------------------------
# Closed-form inserts
# ----------------------------------------------------------------------------------


def insert_through_view(view: MemoryView, C, keys, values, *, ridge: float | None = None,
                        floor: float = 1e-6, check: bool = True, name: str | None = None,
                        method: str = "insert_closed_form"):
  """Closed-form insert of ``keys -> values`` into the viewed layer, as a core ``Edit``.

  The layer may be affine (bias, LinearGeneral head axes, ...): targets are turned into
  kernel targets through the layer itself, ``W0 k* + (v* - f(W0, k*))``, so the edited
  layer outputs exactly ``v*`` at ``k*`` while keys ``k`` with ``k^T C^{-1} K* = 0`` keep
  their outputs. A layer kind with a run-time weight gain ``g`` (see
  :func:`register_layer_kind`) gets ``Lambda / g``, so the insert still writes ``v*``.

  Exactness: dense layers, embeddings (one-hot keys) and patch views of (transposed)
  convolutions with 1 to 3 spatial axes are exact linear memories. Per-pixel conv views are
  exact here only for 1x1 kernels (keys taken at the pixels the layer reads, every s-th
  one under a stride s); for larger kernels a pixel's output mixes several taps, so use
  ``patch=True`` or the per-tap ``solve_lambda(..., kind='conv')``. Grouped convolutions
  are solved group by group (group ``g``'s outputs read only group ``g``'s channels, with
  ``C``'s diagonal block of that group): the edit has rank ``G*n`` and keys whose part in
  every group is ``C_g``-orthogonal to the inserted keys' keep their outputs. Layers that
  are not affine in their first argument (extra call arguments such as a style,
  demodulation) need ``solve_lambda`` with ``f = lambda K, x: view.apply(K, x, *extra)``.

  Args:
    view: the layer's :class:`MemoryView`.
    C: ``(key_dim, key_dim)`` second moment of the layer's keys.
    keys: ``(n, key_dim)`` flat keys (dense with trailing key axes, patch views, 1x1
      conv, one-hot rows of an embedding) or native layer inputs ``(n, *in_dims)`` (dense;
      token ids ``(n,)`` of an embedding).
    values: ``(n, value_dim)`` or ``(n, *out_dims)`` target layer outputs.
    ridge: use the soft insert ``insert_ridge`` with this ridge instead of the exact one.
    floor: relative eigenvalue floor of ``C``: eigenvalues below ``floor * max`` are raised
      to it before inverting (``0``: invert ``C`` as it is; keys ``C``-orthogonal to the
      edit then keep their outputs even for an ill-conditioned ``C``, which must then be
      positive definite).
    check: first test the layer kind's contract on random probes
      (:meth:`MemoryView.check_contract`).
    name: the edit's name.
    method: provenance recorded with the edit.

  Returns:
    ``memedit.Edit`` with path ``view.weight_path`` (for grouped convs its factors are the
    kernel's, see :meth:`MemoryView.kernel_factors`); for one layer of a scanned stack
    with ``index = view.index``, so that it changes that layer alone.

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
  if view.kind == "conv" and view.taps != 1:
    raise ValueError(
        f"insert_through_view: layer {view.address!r} has a "
        f"{view.kernel_shape[view.stacked:-2]} kernel viewed per pixel; a pixel's output "
        "mixes taps, so the per-tap closed form is not exact. Use memory_view(..., "
        "patch=True) or solve_lambda(kind='conv').")
  if isinstance(floor, bool) or not np.isscalar(floor) or not 0 <= floor < 1:
    raise ValueError(f"floor: expected a number in [0, 1), got {floor!r}")
  keys = jnp.asarray(keys)
  values = jnp.asarray(values)
  n = keys.shape[0]
  C = jnp.asarray(C)
  if C.shape != (view.key_dim, view.key_dim):
    raise ValueError(f"C: expected shape {(view.key_dim, view.key_dim)}, got {C.shape}")
  bias = _layer_bias(view)
  gain = view.gain()
  w = view.math_weight(kernel0).reshape(view.value_dim, view.key_dim)
  native = None
  if view.kind == "conv" or view.patch:  # 1x1 per-pixel or patch keys: W k + b per pixel
    if keys.shape[-1] != view.key_dim:
      raise ValueError(f"keys: expected last dimension {view.key_dim}, got {keys.shape[-1]}")
    flat = keys.reshape(n, view.key_dim)
    out0 = jnp.matmul(flat, w.T, precision=jax.lax.Precision.HIGHEST)
    out0 = (out0 if gain is None else out0 * gain) + (0.0 if bias is None else bias)
  else:
    if keys.ndim == 2 and keys.shape[-1] == view.key_dim:
      flat = keys
      native = view.native_keys(keys)
    else:
      native = keys
      flat = view.keys(keys).reshape(n, view.key_dim)
    out0 = view.apply(kernel0, native).reshape(n, -1)
  if check:
    concrete = native is not None and not isinstance(native, jax.core.Tracer)
    try:
      view.check_contract(native if concrete else None)
    except TypeError as e:
      raise ValueError(
          f"insert_through_view: layer {view.address!r} could not be run on one input alone "
          f"to check its contract ({e}); a layer with further call arguments (a style, a "
          "modulation) needs solve_lambda with f = lambda K, x: view.apply(K, x, *extra), "
          "or pass check=False if it is affine in its kernel") from None
  if out0.shape[-1] != view.value_dim:
    raise ValueError(f"layer output: expected {view.value_dim} values per key, got "
                     f"{out0.shape[-1]} (keys with several positions per example?)")
  values = values.reshape(n, -1)
  if values.shape[-1] != view.value_dim:
    raise ValueError(f"values: expected {view.value_dim} per key, got {values.shape[-1]}")
  flat = flat.astype(jnp.float32)
  resid = values - out0

  def solve(w, C, k, r):
    if ridge is None:
      return insert_closed_form(w, C, k, jnp.matmul(k, w.T, precision=jax.lax.Precision.HIGHEST)
                                + r, rcond=floor)
    return insert_ridge(w, C, k, jnp.matmul(k, w.T, precision=jax.lax.Precision.HIGHEST) + r,
                        ridge, rcond=floor)

  if view.groups == 1:
    sol = solve(w, C, flat, resid)
    lam, directions = sol.lam, sol.directions
  else:  # one exact insert per group, in the group's own keys
    lam, directions = _grouped_insert(view, solve, C, flat, resid)
  if gain is not None:
    lam = lam / jnp.reshape(gain, (-1, 1))
  if view.kind == "conv":
    lam = lam.reshape((1,) * (len(view.kernel_shape) - 2) + lam.shape)  # (1.., out, r)
  return make_edit(view.weight_path, lam, directions, kind=view.edit_kind,
                   in_ndim=view.in_ndim, method=method, name=name, index=view.index,
                   settings={"address": [str(a) for a in view.address],
                             "patch": view.patch, "ridge": ridge, "floor": floor})


def _grouped_insert(view: MemoryView, solve, C, flat, resid):
  """Exact inserts per group of a grouped conv: ``(lam (C_out, G*n), D (G*n, T*C_in/G))``."""
  g, t = view.groups, view.taps if view.patch else 1
  cin = view.key_dim // t
  cig, cog = cin // g, view.value_dim // g
  n = flat.shape[0]
  idx = (np.arange(t)[:, None, None] * cin + np.arange(g)[None, :, None] * cig
         + np.arange(cig)[None, None, :])  # (T, G, C_in/G)
  idx = idx.transpose(1, 0, 2).reshape(g, t * cig)
  lams, dirs = [], []
  for j in range(g):
    ix = idx[j]
    sol = solve(jnp.zeros((cog, t * cig), jnp.float32), C[np.ix_(ix, ix)], flat[:, ix],
                resid[:, j * cog:(j + 1) * cog])
    lams.append(sol.lam)
    dirs.append(sol.directions)
  del n
  lam = jax.scipy.linalg.block_diag(*lams)  # (C_out, G*n)
  return lam, jnp.concatenate(dirs, 0)


def _layer_bias(view: MemoryView):
  if view.framework == "nnx":
    b = getattr(view.layer_module, "bias", None)
    return None if b is None else b[...]
  return view._layer[1]["params"].get("bias")
