"""Layer kinds: how a layer class stores its memory (kernel name, key and value layout).

:func:`register_layer_kind` declares a layer class (NNX or Linen) a memory;
:func:`layer_kind` finds the registration of a layer along its class's MRO. Built in:
Linear / LinearGeneral / Einsum / Dense / DenseGeneral (dense), Conv / ConvTranspose
(per-tap conv, with patch keys) and Embed (one-hot keys).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
import flax.linen as nn

from memedit.layers.conv import as_tuple, conv_check, conv_patches

__all__ = ["LayerKind", "NativeKeyError", "layer_kind", "register_layer_kind",
           "token_id_limit"]


class NativeKeyError(ValueError):
  """A layer's native input refused for its values or dtype, not its shape (e.g. token ids
  outside an embedding's table); callers that reword shape errors let it through."""


@dataclasses.dataclass(frozen=True)
class LayerKind:
  """How a layer class stores its memory.

  Example:
    >>> import flax.nnx as nnx
    >>> from memedit.layers import layer_kind
    >>> k = layer_kind(nnx.Linear)
    >>> k.weight, k.kind
    ('kernel', 'dense')

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


def _general_in_ndim(module):
  if getattr(module, "batch_axis", None):
    raise ValueError(
        f"LinearGeneral memory: expected no batch_axis (a key is one example's contracted "
        f"input axes; a kernel with batch axes is one memory per batch entry), got "
        f"batch_axis={dict(module.batch_axis)!r}")
  return len(as_tuple(module.in_features, 1))


def general_key_axes(module):
  """The ``axis`` of a Flax DenseGeneral / LinearGeneral as a tuple (as given; a view sorts
  it as Flax does)."""
  return tuple(as_tuple(module.axis, 1))


def _dense_general_in_ndim(module):
  if module.batch_dims:
    raise ValueError(
        f"DenseGeneral memory: expected batch_dims=() (a key is one example's contracted "
        f"input axes; a kernel with batch axes is one memory per batch entry), got "
        f"batch_dims={tuple(as_tuple(module.batch_dims, 1))!r}")
  return len(as_tuple(module.axis, 1))


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
  """Token ids ``(...)`` as one-hot keys ``(..., num_embeddings)``.

  Concrete ids outside ``[0, num_embeddings)`` raise :class:`NativeKeyError` (the layer
  itself would read a NaN row, or wrap a negative id around the table); traced ones give
  NaN keys, which statistics refuse rather than fold.
  """
  tokens = jnp.asarray(tokens)
  if not jnp.issubdtype(tokens.dtype, jnp.integer):
    raise NativeKeyError(f"embedding keys: expected integer token ids, got dtype "
                         f"{tokens.dtype}")
  n = int(module.num_embeddings)
  keys = jax.nn.one_hot(tokens, n, dtype=jnp.float32)
  if not isinstance(tokens, jax.core.Tracer):
    t = np.asarray(tokens)
    bad = np.unique(t[(t < 0) | (t >= n)])
    if bad.size:
      got = ", ".join(str(int(b)) for b in bad[:6]) + (
          f", ... ({bad.size} distinct ids out of range)" if bad.size > 6 else "")
      raise NativeKeyError(f"token ids: expected integers 0 <= id < {n} (the embedding's "
                           f"num_embeddings), got {got}")
    return keys
  ok = (tokens >= 0) & (tokens < n)
  return jnp.where(ok[..., None], keys, jnp.nan)


def token_id_limit(module) -> int | None:
  """The number of token ids a layer reads as one-hot keys (an embedding's
  ``num_embeddings``).

  Args:
    module: a layer instance (NNX) or definition (Linen).

  Returns:
    ``num_embeddings`` when the layer's kind reads token ids (the built-in embeddings),
    else ``None``.

  Example:
    >>> from flax import nnx
    >>> from memedit.layers.kinds import token_id_limit
    >>> rngs = nnx.Rngs(0)
    >>> token_id_limit(nnx.Embed(10, 4, rngs=rngs)), token_id_limit(nnx.Linear(2, 3, rngs=rngs))
    (10, None)
  """
  if layer_kind(module).keys is not _embed_keys:
    return None
  return int(module.num_embeddings)


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
                      key_axes=general_key_axes, **dense)
  register_layer_kind(nnx.Einsum, in_ndim=lambda m: _einsum_layout(m.einsum_str), **dense)
  register_layer_kind(nn.Dense, in_ndim=1, **dense)
  register_layer_kind(nn.DenseGeneral, in_ndim=_dense_general_in_ndim,
                      key_axes=general_key_axes, **dense)
  register_layer_kind(nn.Einsum, in_ndim=lambda m: _einsum_layout(m.einsum_str), **dense)
  for cls in (nnx.Conv, nnx.ConvTranspose, nn.Conv, nn.ConvTranspose):
    register_layer_kind(cls, kind="conv", patches=conv_patches, check=conv_check)
  for cls in (nnx.Embed, nn.Embed):
    register_layer_kind(cls, weight="embedding", in_ndim=1, keys=_embed_keys,
                        native_keys=_embed_native_keys, **dense)


_register_builtins()
