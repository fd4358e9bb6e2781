"""Key statistics of one layer of a model, collected over a stream of model inputs."""

from __future__ import annotations

import collections.abc
import dataclasses
import functools
import hashlib
import itertools
import json
import re
import types
from typing import Any, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from memedit import _io
from memedit.covariance import CovarianceState, covariance_cache_key, stream_covariance
from memedit.layers.conv import resample_mask
from memedit.layers.hooks import forward_to_layer
from memedit.layers.kinds import token_id_limit
from memedit.layers.model import Model, as_model
from memedit.layers.view import MemoryView, as_view
from memedit.stream import _auto_axes, refuse_traced, refuse_under_jit

__all__ = ["layer_covariance", "layer_cache_key", "layer_key_fn"]


def _as_args(batch) -> tuple:
  return tuple(batch) if isinstance(batch, tuple) else (batch,)


def layer_key_fn(model, view: MemoryView, *, masked: bool = False,
                 method: str | None = None, dtype=jnp.float32, call_kwargs=None):
  """``key_fn(batch) -> keys`` or ``(keys, weights)`` for ``stream_covariance``.

  The model runs only as far as it must: the function returns the layer's keys alone, so
  XLA removes the later layers from the compiled program.

  Args:
    model: the model (see :func:`memedit.layers.memory_view`).
    view: the layer's :class:`~memedit.layers.MemoryView`.
    masked: batches are ``(inputs, mask)``; ``mask`` ``(B, *positions)`` weights the keys;
      for a conv layer ``(B, L)``, ``(B, h, w)`` or ``(B, D, H, W)`` (1, 2 or 3 spatial
      axes), resized (bi/tri)linearly when its spatial size differs from the layer's.
    method: model method to run.
    dtype: dtype of the keys.
    call_kwargs: keyword arguments of every model call kept out of the batches, e.g.
      static flags ``{"train": False}``.

  Returns:
    A pure function of one batch; keys come out ``(B, *stack, *positions, key_dim)``
    (``stack``: several calls of the layer and/or a scan axis).

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> import memedit, memedit.layers as ml
    >>> model = nnx.Sequential(nnx.Linear(3, 4, rngs=nnx.Rngs(0)))
    >>> key_fn = ml.layer_key_fn(model, ml.memory_view(model, "layers/0"))
    >>> st = memedit.stream_covariance([jnp.ones((4, 3))], key_fn=key_fn, progress=False)
    >>> memedit.second_moment(st).tolist()
    [[1.0, 1.0, 1.0], [1.0, 1.0, 1.0], [1.0, 1.0, 1.0]]
  """
  dtype = _key_dtype(dtype)
  m = as_model(model)
  keys_of = _LayerKeys(m, view, masked=masked, method=method, dtype=dtype,
                       call_kwargs=call_kwargs)
  params = m.params
  return lambda batch: keys_of(params, batch)


def _key_dtype(dtype) -> Any:
  """``dtype`` itself when it names a floating dtype (the layer's keys are cast to it: an
  integer or bool dtype would truncate them), else raises."""
  try:
    dt = jnp.dtype(dtype)
  except TypeError:
    dt = None
  if dt is None or not jnp.issubdtype(dt, jnp.floating):
    got = repr(dtype) if dt is None else str(dt)
    raise ValueError(f"dtype: expected a floating dtype for the keys (e.g. float32, "
                     f"bfloat16), got {got}")
  return dtype


def _abstract(tree):
  return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), tree)


class _LayerKeys:
  """``keys_of(params, batch)``: one layer's keys (and mask weights) from model inputs.

  Equal, with equal hashes, for equal model structures, views and settings: the compiled
  statistics programs of ``stream_covariance(key_fn=keys_of, params=...)`` are shared by
  every parameter set of a model, whose parameters are their argument, never constants.
  It holds no arrays (the view's own copy of the layer is kept as shapes only), so a
  cached program keeps no parameters alive. A layer kind's ``keys``/``patches`` functions
  read the layer's configuration, not its parameters.
  """

  def __init__(self, m, view, *, masked, method, dtype, call_kwargs):
    layer_def, layer_state = view.layer
    self.view = dataclasses.replace(view, layer=(layer_def, _abstract(layer_state)))
    self.model = Model(m.framework, m.definition, None, m.form)
    self.masked = masked
    self.kwargs = dict(call_kwargs or {})
    self.fn = forward_to_layer(self.model, self.view, method=method, dtype=dtype,
                                    batch_first=True)
    v = self.view
    key = (m.framework, m.definition, m.form, v.address, v.weight_path, v.layer_type, v.kind,
           v.in_ndim, v.patch, v.kernel_shape, v.key_dim, v.value_dim, v.key_axes, v.stacked,
           v.input_ndim, v.groups, v.spec, v.index, v.stack_size, v.module_path, masked,
           method, str(jnp.dtype(dtype)), tuple(sorted(self.kwargs.items())))
    try:
      self.hash = hash(key)
      self.key = key
    except TypeError:  # e.g. an array-valued module attribute: compare by identity
      self.hash, self.key = id(self), (id(self),)

  def __hash__(self):
    return self.hash

  def __eq__(self, other):
    return isinstance(other, _LayerKeys) and self.key == other.key

  def __call__(self, params, batch):
    inputs, mask = batch if self.masked else (batch, None)
    keys = self.fn(params, *_as_args(inputs), **self.kwargs)
    if mask is None:
      return keys
    return keys, _mask_weights(mask, keys, self.view)


_MASK_SHAPES = {1: "(B, L)", 2: "(B, h, w)", 3: "(B, D, H, W)"}


def _mask_weights(mask, keys, view):
  mask = jnp.asarray(mask, jnp.float32)
  lead = keys.shape[:-1]
  b = lead[0]
  if mask.shape[0] != b:
    raise ValueError(f"mask: expected a leading batch dimension {b}, got {mask.shape}")
  if view.kind == "conv" or view.patch:
    n = len(view.kernel_shape) - view.stacked - 2  # spatial axes of the kernel
    spatial = tuple(lead[len(lead) - n:])
    if mask.ndim != n + 1:
      raise ValueError(f"mask: expected shape {_MASK_SHAPES[n]} for a conv layer with {n} "
                       f"spatial axes, got {mask.shape}")
    mask = resample_mask(mask, spatial)
  n_mid = len(lead) - mask.ndim
  if n_mid < 0:
    raise ValueError(f"mask: expected at most {len(lead)} dimensions matching the keys' "
                     f"leading shape {lead}, got {mask.shape}")
  mask = mask.reshape(mask.shape[:1] + (1,) * n_mid + mask.shape[1:])
  try:
    np.broadcast_shapes(mask.shape, lead)
  except ValueError:
    raise ValueError(f"mask: expected a shape broadcasting to the keys' positions {lead}, "
                     f"got {mask.shape}") from None
  return mask


def _key_data(tree):
  """Typed PRNG key leaves (e.g. NNX RNG state) as their raw key data, for hashing."""
  def conv(x):
    if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
      return jax.random.key_data(x)
    return x
  return jax.tree_util.tree_map(conv, tree)


_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def _structure_text(obj: Any, depth: int = 0) -> str:
  """A text of a model's definition (NNX graph definition or Linen module) that is the
  same in every run: classes, configuration and the functions it calls by their qualified
  names (a ``repr`` names functions such as activations by their memory address, which
  changes every run, or not at all). Arrays are described by shape and dtype."""
  if depth > 64:
    return "..."
  def rec(x):
    return _structure_text(x, depth + 1)
  if obj is None or isinstance(obj, (bool, int, float, complex, str, bytes)):
    return repr(obj)
  if isinstance(obj, type):
    return f"{obj.__module__}.{obj.__qualname__}"
  if isinstance(obj, (np.dtype, np.generic)):
    return f"{type(obj).__name__}({obj})"
  if hasattr(obj, "shape") and hasattr(obj, "dtype"):
    return f"array({tuple(np.shape(obj))}, {obj.dtype})"
  if isinstance(obj, functools.partial):
    return (f"partial({rec(obj.func)}, {[rec(a) for a in obj.args]}, "
            f"{rec(dict(obj.keywords))})")
  if isinstance(obj, dict):
    items = sorted((rec(k), rec(v)) for k, v in obj.items())
    return f"{type(obj).__name__}{{{', '.join(f'{k}: {v}' for k, v in items)}}}"
  if isinstance(obj, (list, tuple)):
    return f"{type(obj).__name__}[{', '.join(rec(x) for x in obj)}]"
  if isinstance(obj, (set, frozenset)):  # sorted: a set's order varies with the hash seed
    return f"{type(obj).__name__}{{{', '.join(sorted(rec(x) for x in obj))}}}"
  if dataclasses.is_dataclass(obj):
    fields = [f"{f.name}={rec(getattr(obj, f.name, None))}"
              for f in dataclasses.fields(obj) if f.name != "parent"]
    return f"{rec(type(obj))}({', '.join(fields)})"
  fun = getattr(obj, "fun", None)  # jax.custom_jvp / custom_vjp (e.g. nnx.relu)
  if fun is not None and callable(obj) and callable(fun):
    return f"{type(obj).__name__}({rec(fun)})"
  wrapped = getattr(obj, "__wrapped__", None)  # jitted or decorated functions
  if callable(obj) and wrapped is not None and wrapped is not obj:
    return f"{type(obj).__name__}({rec(wrapped)})"
  name = getattr(obj, "__qualname__", None)
  if callable(obj) and isinstance(name, str):
    text = f"{getattr(obj, '__module__', None)}.{name}"
    code = getattr(obj, "__code__", None)
    if isinstance(code, types.CodeType):
      # Its code and the values it closes over: two lambdas of one module differ there.
      cells = [rec(c.cell_contents) if _cell_full(c) else "<empty>"
               for c in (getattr(obj, "__closure__", None) or ())]
      text += f"[{_code_text(code)}; {', '.join(cells)}]"
    return text
  try:
    return _ADDRESS.sub("", repr(obj))
  except Exception:  # an object whose repr fails: named by its class
    return rec(type(obj))


def _cell_full(cell) -> bool:
  try:
    cell.cell_contents
  except ValueError:
    return False
  return True


def _code_text(code: types.CodeType) -> str:
  """A function's bytecode, names and constants (nested code objects too), as text."""
  consts = [_code_text(c) if isinstance(c, types.CodeType) else _ADDRESS.sub("", repr(c))
            for c in code.co_consts]
  return f"{code.co_code.hex()} {code.co_names} {consts}"


def layer_cache_key(model, view: MemoryView, spec: Any, dtype=jnp.float32,
                    method: str | None = None) -> str:
  """Cache key of a layer's statistics: the model's parameters (content hash) and
  structure (its classes, configuration and the functions it calls, such as activations,
  by name), the layer address and view (with the layer of a scanned stack it picks), the
  input stream's spec and the key dtype.

  Args:
    model: the model. view: the layer's view. spec: JSON-serialisable stream description.
    dtype: key dtype. method: model method.

  Returns:
    A 64-character hex string.

  Example:
    >>> from flax import nnx
    >>> import memedit.layers as ml
    >>> model = nnx.Sequential(nnx.Linear(3, 4, rngs=nnx.Rngs(0)))
    >>> view = ml.memory_view(model, "layers/0")
    >>> len(ml.layer_cache_key(model, view, {"seed": 1, "n": 1000}))
    64
  """
  m = as_model(model)
  h = hashlib.sha256(_io.tree_hash(_key_data(m.params)).encode())
  h.update(json.dumps([m.framework, [str(a) for a in view.weight_path], view.patch,
                       method] + ([] if view.index is None else [view.index])).encode())
  # The model's structure too: two models with the same parameters (e.g. another
  # activation between the same layers) give the layer other keys.
  h.update(hashlib.sha256(_structure_text(m.definition).encode()).digest())
  return covariance_cache_key(h.hexdigest(), spec, dtype)


def layer_covariance(model, address, inputs: Iterable[Any], *, patch: bool = False,
                     masked: bool = False, method: str | None = None, dtype=jnp.float32,
                     spec: Any = None, cache_dir=None, group: int = 8, devices: int | None = None,
                     progress: bool = False, call_kwargs=None) -> CovarianceState:
  """Streams model inputs through the model and folds the layer's keys into C = E[k kᵀ].

  One compiled program folds ``group`` batches (``lax.scan`` inside
  :func:`memedit.stream_covariance`), over several local devices when asked. As there,
batches may differ in batch size (a ragged last batch is folded exactly), ``jax.Array``
inputs sharded over a mesh are folded where they live, and under ``jax.distributed``
each process passes its own part of the data and every process ends with the same C.

  Args:
    model: ``nnx.Module`` (untouched), NNX ``(graphdef, state)`` or Linen
      ``(module, variables)``.
    address: the layer (path tuple, string, NNX selector or a ``MemoryView``). One layer
      of a scanned stack (e.g. ``('stack', 1, 'fc2')``) gives that layer's own C; the
      stack as a whole (``('stack', 'fc2')``) pools the keys of all its layers.
    inputs: iterable of batches of model inputs (an array, or a tuple of positional
      inputs, with a leading batch axis); with ``masked=True`` each item is
      ``(inputs, mask)``.
    patch: collect patch keys (``kh*kw*C_in``) of a conv layer.
    masked: batches carry per-key weights (see :func:`layer_key_fn`).
    method: model method to run.
    dtype: dtype of the keys.
    spec: JSON-serialisable description of the input stream, for the cache key; when
      omitted and ``inputs`` is a sequence, the inputs' content hash is used.
    cache_dir: directory of cached statistics (keyed by :func:`layer_cache_key`).
    group: batches per compiled fold.
    devices: local devices to split each batch over.
    progress: progress bar on stderr.
    call_kwargs: keyword arguments of every model call, e.g. static flags
      ``{"deterministic": True}`` (part of the cache key).

  Returns:
    The :class:`memedit.CovarianceState`; ``memedit.second_moment(state)`` is C.

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> import memedit, memedit.layers as ml
    >>> model = nnx.Sequential(nnx.Linear(3, 4, rngs=nnx.Rngs(0)), nnx.relu,
    ...                        nnx.Linear(4, 2, rngs=nnx.Rngs(1)))
    >>> st = ml.layer_covariance(model, ("layers", 0), [jnp.ones((8, 3)), jnp.zeros((8, 3))])
    >>> memedit.key_count(st), memedit.second_moment(st).shape
    (16, (3, 3))

  Raises:
    ValueError: an embedding layer read token ids outside ``[0, num_embeddings)`` (their
      keys are never folded into C), or other invalid inputs (named in the message).
  """
  dtype = _key_dtype(dtype)
  m = as_model(model)
  if isinstance(inputs, collections.abc.Iterator):
    first = next(inputs, None)
    if first is None:
      raise ValueError("inputs: expected at least one batch, got an empty stream")
    stream = itertools.chain([first], inputs)
  else:
    if isinstance(inputs, (jax.Array, np.ndarray)):
      raise ValueError("inputs: expected an iterable of batches (e.g. a list of arrays), got "
                       "a single array")
    if isinstance(inputs, (collections.abc.Mapping, str, bytes)):
      # Iterating a dict gives its keys, a str its characters: never batches.
      raise ValueError(f"inputs: expected an iterable of batches (e.g. a list of dicts of "
                       f"arrays), got a single {type(inputs).__name__}; pass [batch]")
    stream = inputs
    first = next(iter(inputs), None)
    if first is None:
      raise ValueError("inputs: expected at least one batch, got an empty stream")
  refuse_traced(m.params, "model", "layer_covariance")
  refuse_traced(first, "inputs", "layer_covariance")
  refuse_under_jit("layer_covariance")
  if masked and not (isinstance(first, (tuple, list)) and len(first) == 2):
    raise ValueError(f"inputs: expected (inputs, mask) pairs with masked=True, got a first "
                     f"batch of type {type(first).__name__}"
                     + (f" with {len(first)} items" if isinstance(first, (tuple, list))
                        else ""))
  example = first[0] if masked else first
  view = as_view(m, address, *_as_args(example), patch=patch, method=method,
                 **(call_kwargs or {}))
  keys_of = _LayerKeys(m, view, masked=masked, method=method, dtype=dtype,
                       call_kwargs=call_kwargs)
  cache_key = None
  if cache_dir is not None:
    if spec is None:
      if isinstance(stream, collections.abc.Sequence):
        spec = {"inputs_hash": _io.tree_hash(list(stream))}
      else:
        raise ValueError("spec: expected a description of the input stream (needed to cache "
                         "statistics of an iterator), got None")
    cache_key = layer_cache_key(m, view, {"spec": spec, "masked": masked, **(
        {"call_kwargs": repr(sorted(call_kwargs.items()))} if call_kwargs else {})}, dtype,
                                method)
  total = len(stream) if hasattr(stream, "__len__") else None
  params = m.params
  if any(_auto_axes(x) is not x for x in jax.tree_util.tree_leaves(first)):
    # The stream views batches on a mesh with explicit axes on the same mesh with
    # automatic axes (the fold's sums over a sharded batch axis leave C's sharding to
    # XLA); parameters on such a mesh are viewed alike, for one program over both.
    params = jax.tree_util.tree_map(_auto_axes, params)
  state = stream_covariance(stream, view.key_dim, key_fn=keys_of, params=params,
                            group=group, total=total, progress=progress, cache_dir=cache_dir,
                            cache_key=cache_key, devices=devices)
  _check_token_ids(state, view, masked)
  return state


def _check_token_ids(state: CovarianceState, view: MemoryView, masked: bool):
  """Refuses statistics of an embedding that read token ids outside its table.

  Such ids come out of the compiled key function as NaN keys, which the fold leaves out
  and counts in ``state.nonfinite`` (so do NaN, inf or negative mask weights): say so here
  rather than return C of the other keys.
  """
  limit = token_id_limit(view.layer_module)
  bad = 0 if limit is None else int(np.asarray(state.nonfinite))
  if not bad:
    return
  raise ValueError(
      f"token ids: expected integers 0 <= id < {limit} (the embedding's num_embeddings) "
      f"at layer {view.address!r}, got {bad} id(s) out of that range"
      + (" (or keys with a NaN, inf or negative mask weight)" if masked else "")
      + " among the inputs; their keys were not folded")
