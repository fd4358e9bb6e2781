"""Capturing one layer's keys (inputs) and values (outputs) in a whole-model forward pass.

NNX: the target instance's class is swapped, for the duration of one traced call, for a
subclass of the same name whose ``__call__`` runs the original and sows its first
argument, further arguments and output; the model is merged from ``(graphdef, state)``
inside the traced function, so the caller's model is never touched. This survives
``nnx.jit``, ``nnx.remat`` and ``nnx.scan`` (scanned calls come back stacked on axis 0).

Linen: ``nn.intercept_methods`` sows the same into the ``'intermediates'`` collection at
the layer's scope. Under ``nn.scan`` that collection must be scanned
(``variable_axes={..., 'intermediates': 0}``), otherwise the captures are dropped and
:func:`capture` says so.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
import flax.linen as nn
from flax.traverse_util import flatten_dict

from memedit.layers import memory as _mem

__all__ = ["Captured", "capture", "forward_to_layer"]

_SOW_NAME = "__memedit_capture__"


class _Capture(nnx.Intermediate):
  """Private variable type for memedit's sown captures (kept apart from user sows)."""


class Captured(NamedTuple):
  """Keys and values of one layer in a forward pass.

  Attributes:
    keys: the layer's first call argument, e.g. ``(B, ..., *in_dims)``; with several
      calls, one entry per call stacked on a new axis 0 (a call under ``scan`` already
      carries the scan axis first).
    values: the layer's output, laid out like ``keys``.
    extra_args: the further positional call arguments (arrays; same stacking).
    extra_kwargs: keyword call arguments (arrays; same stacking).
    calls: number of traced call sites (a call inside ``scan`` counts once).
  """
  keys: Any
  values: Any
  extra_args: tuple
  extra_kwargs: dict
  calls: int


# ----------------------------------------------------------------------------------
# NNX class swap
# ----------------------------------------------------------------------------------

_HOOKED: dict[type, type] = {}
_ACTIVE: list[Callable] = []


def _hooked_class(cls: type) -> type:
  if cls in _HOOKED:
    return _HOOKED[cls]
  original_call = cls.__call__

  def __call__(self, *args, **kwargs):
    if not _ACTIVE:
      return original_call(self, *args, **kwargs)
    return _ACTIVE[-1](self, original_call, args, kwargs)

  sub = type(cls.__name__, (cls,), {
      "__call__": __call__, "_memedit_original": cls, "__module__": cls.__module__,
      "__qualname__": cls.__qualname__})
  _HOOKED[cls] = sub
  return sub


def _split_static(tree):
  """(array leaves, rebuild) where non-array leaves are kept as Python constants."""
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  is_arr = [isinstance(x, (jax.Array, jnp.ndarray)) or hasattr(x, "shape") for x in leaves]
  arrays = [x for x, a in zip(leaves, is_arr) if a]
  statics = [None if a else x for x, a in zip(leaves, is_arr)]

  def rebuild(arrs):
    it = iter(arrs)
    return jax.tree_util.tree_unflatten(treedef, [next(it) if a else s
                                                  for a, s in zip(is_arr, statics)])
  return arrays, rebuild


def _flag_error(e: Exception, where: str) -> ValueError:
  return ValueError(
      f"{where}: the model used a traced input as a Python value (e.g. a flag such as "
      "train=False or deterministic=True given as an array); pass such flags as Python "
      "values (bool, int, str): memedit keeps non-array inputs static in capture and "
      "memory_view, and layer_covariance / layer_key_fn take them as call_kwargs={...}. "
      f"JAX said: {str(e).splitlines()[0]}")


def _static_inputs(args, kwargs):
  """(array leaves of the model inputs, rebuild(arrays) -> (args, kwargs)): Python values
  (flags such as ``train=False``) stay static so that tracing does not turn them into
  arrays."""
  return _split_static((tuple(args), dict(kwargs)))


def _has_tracer(module) -> bool:
  """Whether a Linen module definition holds traced arrays among its attributes."""
  import dataclasses
  for f in dataclasses.fields(module):
    if f.name in ("parent", "name"):
      continue
    leaves = jax.tree_util.tree_leaves(getattr(module, f.name, None))
    if any(isinstance(x, jax.core.Tracer) for x in leaves):
      return True
  return False


def _locate(model, path):
  obj = model
  for part in path:
    obj = _mem._child(obj, part)
  return obj


def _run_nnx(graphdef, state, path, hook, args, kwargs, method):
  """Merges the model, swaps the target's class, runs it; returns (out, captured State)."""
  model = _mem._merge(graphdef, state)
  target = _locate(model, path)
  cls = type(target)
  object.__setattr__(target, "__class__", _hooked_class(cls))
  _ACTIVE.append(hook)
  try:
    def call(m, *a, **k):
      return _mem._nnx_method(m, method)(*a, **k)
    out, inter = nnx.capture(call, _Capture)(model, *args, **kwargs)
  finally:
    _ACTIVE.pop()
    object.__setattr__(target, "__class__", cls)
  return out, inter


def _nnx_records(inter) -> tuple:
  records = []
  for k, v in nnx.to_flat_state(inter):
    if k and k[-1] == _SOW_NAME:
      val = v.get_value() if isinstance(v, nnx.Variable) else v
      records.extend(val)
  return tuple(records)


# ----------------------------------------------------------------------------------
# Generic capture
# ----------------------------------------------------------------------------------


class _Holder:
  def __init__(self):
    self.rebuild = None
    self.traced = 0
    self.definition = None
    self.call_kernel_shape = None
    self.input_ndim = None


def _capture_hook_nnx(holder: _Holder, keys_only: bool = False, transform=None):
  def hook(self, original_call, args, kwargs):
    out = original_call(self, *args, **kwargs)
    holder.traced += 1
    if transform is not None:
      record = transform(args, kwargs, out)
    elif keys_only:
      record = (args[0],)
    else:
      arrays, holder.rebuild = _split_static((args[1:], kwargs))
      record = (args[0], out, tuple(arrays))
    self.sow(_Capture, _SOW_NAME, record)
    return out
  return hook


def _linen_interceptor(holder: _Holder, path, keys_only=False, transform=None,
                       want_definition=False):
  def interceptor(next_fun, args, kwargs, ctx):
    out = next_fun(*args, **kwargs)
    mod = ctx.module
    if ctx.method_name == "__call__" and tuple(mod.path) == tuple(path):
      holder.traced += 1
      if want_definition and holder.definition is None:
        holder.definition = mod.clone(parent=None)
        spec = _mem.layer_kind(mod)
        holder.call_kernel_shape = tuple(mod.variables["params"][spec.weight].shape)
        holder.input_ndim = jnp.ndim(args[0])
      if transform is not None:
        record = transform(args, kwargs, out)
      elif keys_only:
        record = (args[0],)
      else:
        arrays, holder.rebuild = _split_static((args[1:], kwargs))
        record = (args[0], out, tuple(arrays))
      mod.sow("intermediates", _SOW_NAME, record)
    return out
  return interceptor


def _linen_records(state) -> tuple:
  records = []
  for k, v in flatten_dict(dict(state.get("intermediates", {}))).items():
    if k and k[-1] == _SOW_NAME:
      records.extend(v)
  return tuple(records)


def _run(m: "_mem._Model", path, holder, args, kwargs, method, keys_only=False,
         transform=None, want_definition=False):
  """Runs the model once with the layer hooked; returns (model output, records)."""
  if m.framework == "nnx":
    out, inter = _run_nnx(m.definition, m.params, path,
                          _capture_hook_nnx(holder, keys_only, transform), args, kwargs,
                          method)
    return out, _nnx_records(inter)
  icpt = _linen_interceptor(holder, path, keys_only, transform, want_definition)
  with nn.intercept_methods(icpt):
    out, state = m.definition.apply(m.params, *args, mutable=["intermediates"],
                                    method=method, **kwargs)
  return out, _linen_records(state)


def _resolve_path(m, address, args, kwargs, method) -> tuple:
  """(module path, index, L) of an address; ``index`` (``None`` unless the address picks
  one layer of a scanned stack of ``L`` layers) is checked against the layer's kernel."""
  path, _, index, _, _ = _mem._resolve_layer(m, address)
  if index is None:
    return path, None, None
  linen = m.framework == "linen"  # Linen layer definitions exist only while the model runs
  view = _mem.memory_view(m, address, *(args if linen else ()), method=method,
                          **(kwargs if linen else {}))
  return path, view.index, view.stack_size


def _pick_layer(record, index, size, path):
  """Layer ``index`` of one call site's record under a scan over ``size`` layers (the
  scan stacks its calls on axis 0)."""
  shape = tuple(jnp.shape(record[0]))
  if shape[:1] != (size,):
    raise ValueError(
        f"layer {path!r}: expected its calls stacked over the {size} layers of its scan on "
        f"axis 0, got keys of shape {shape} (is the stack run by a scan over its layers?)")
  return jax.tree_util.tree_map(lambda x: x[index], record)


def _calls_error(path, n, traced, framework, single):
  if n == 0 and traced:
    hint = ("the layer ran inside nn.scan whose variable_axes do not include "
            "'intermediates'; add 'intermediates': 0 to capture it"
            if framework == "linen" else "its captures were dropped by a transform")
    return ValueError(f"layer {path!r}: called during tracing but no capture came back: "
                      + hint)
  if n == 0:
    return ValueError(f"layer {path!r}: expected it to be called once by the model, but it "
                      "was called 0 times (is it used on this code path / method?)")
  return ValueError(f"layer {path!r}: expected exactly one call, but the model calls it "
                    f"{n} times (a shared module?); use capture(..., single=False) to get "
                    "all calls stacked")


def _stack(xs):
  if len(xs) == 1:
    return xs[0]
  return jax.tree_util.tree_map(lambda *a: jnp.stack(a), *xs)


def capture(model, address, *args, single: bool = False, jit: bool = True,
            method: str | None = None, **kwargs) -> Captured:
  """Keys, values and extra call arguments of one layer in a forward pass of the model.

  Args:
    model: ``nnx.Module`` (untouched), NNX ``(graphdef, state)`` or Linen
      ``(module, variables)``.
    address: layer address (see :func:`memory_view`); one layer of a scanned stack
      (e.g. ``('stack', 1, 'fc2')``) gives that layer's keys and values alone.
    *args: model inputs.
    single: require exactly one call of the layer (else ``ValueError``).
    jit: run the forward pass under ``jax.jit`` (``False``: eagerly).
    method: model method to run (default ``__call__``): a name, or a function
      ``(module, *args, **kwargs) -> output`` (NNX and Linen).
    **kwargs: keyword model inputs. Python values among the inputs (flags such as
      ``train=False``) stay static; arrays are traced.

  Returns:
    :class:`Captured`. With several calls every field is stacked on a new axis 0.

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> import memedit.layers as ml
    >>> model = nnx.Sequential(nnx.Linear(3, 4, rngs=nnx.Rngs(0)), nnx.relu,
    ...                        nnx.Linear(4, 2, rngs=nnx.Rngs(1)))
    >>> c = ml.capture(model, ("layers", 2), jnp.ones((5, 3)), single=True)
    >>> c.keys.shape, c.values.shape, c.calls
    ((5, 4), (5, 2), 1)

  Raises:
    ValueError: wrong address (lists valid paths near it), the layer is never called, or
      called several times with ``single=True``.
  """
  m = _mem._as_model(model)
  path, index, size = _resolve_path(m, address, args, kwargs, method)
  holder = _Holder()
  arrays, rebuild = _static_inputs(args, kwargs)

  def fwd(params, arrs):
    a, k = rebuild(arrs)
    mm = _mem._Model(m.framework, m.definition, params, m.form)
    _, records = _run(mm, path, holder, a, k, method)
    if index is not None:  # only that layer's keys and values leave the program
      records = tuple(_pick_layer(r, index, size, path) for r in records)
    return records

  fn = jax.jit(fwd) if jit else fwd
  try:
    records = fn(m.params, arrays)
  except jax.errors.ConcretizationTypeError as e:
    raise _flag_error(e, "capture") from None
  except TypeError as e:
    if m.framework != "nnx" or "carry" not in str(e):
      raise
    # The layer is part of a scan *carry* (e.g. the cell of nnx.RNN), where a sown
    # variable cannot grow: stream the calls to the host instead, in execution order.
    holder = _Holder()
    records = _capture_by_callback(m, path, holder, args, kwargs, method, jit)
    if index is not None:
      records = tuple(_pick_layer(r, index, size, path) for r in records)
  n = len(records)
  if n == 0 or (single and n != 1):
    raise _calls_error(path, n, holder.traced, m.framework, single)
  keys = _stack([r[0] for r in records])
  values = _stack([r[1] for r in records])
  extras = [holder.rebuild(list(r[2])) for r in records]
  if n == 1:
    extra_args, extra_kwargs = extras[0]
  else:
    extra_args = tuple(_stack([e[0][i] for e in extras]) for i in range(len(extras[0][0])))
    extra_kwargs = {k: _stack([e[1][k] for e in extras]) for k in extras[0][1]}
  return Captured(keys, values, tuple(extra_args), dict(extra_kwargs), n)


def _capture_by_callback(m, path, holder, args, kwargs, method, jit):
  executed: dict[int, list] = {}

  def transform(a, k, out):
    site = holder.traced
    arrays, holder.rebuild = _split_static((a[1:], k))

    def record(x, y, arrs):
      executed.setdefault(site, []).append((x, y, arrs))
    jax.debug.callback(record, a[0], out, tuple(arrays), ordered=True)
    return None

  def hook(self, original_call, a, k):
    out = original_call(self, *a, **k)
    transform(a, k, out)
    holder.traced += 1
    return out

  arrays, rebuild = _static_inputs(args, kwargs)

  def fwd(params, arrs):
    a, k = rebuild(arrs)
    model = _mem._merge(m.definition, params)
    target = _locate(model, path)
    cls = type(target)
    object.__setattr__(target, "__class__", _hooked_class(cls))
    _ACTIVE.append(hook)
    try:
      return _mem._nnx_method(model, method)(*a, **k)
    finally:
      _ACTIVE.pop()
      object.__setattr__(target, "__class__", cls)

  out = (jax.jit(fwd) if jit else fwd)(m.params, arrays)
  jax.block_until_ready(out)
  jax.effects_barrier()
  records = []
  for site in sorted(executed):
    calls = executed[site]
    x = [jnp.asarray(c[0]) for c in calls]
    y = [jnp.asarray(c[1]) for c in calls]
    arrs = [tuple(jnp.asarray(t) for t in c[2]) for c in calls]
    records.append((_stack(x) if len(x) > 1 else x[0], _stack(y) if len(y) > 1 else y[0],
                    _stack(arrs) if len(arrs) > 1 else arrs[0]))
  return tuple(records)


def forward_to_layer(model, view: "_mem.MemoryView", *, method: str | None = None,
                  dtype=jnp.float32, batch_first: bool = False) -> Callable:
  """``fn(params, *args, **kwargs) -> keys (..., key_dim)`` of the viewed layer.

  Only the layer's keys leave the function, so XLA drops the model's later layers when it
  is jitted. Every call of the layer contributes: several calls are stacked on axis 0 (a
  call under ``scan`` carries the scan axis first); a view of one layer of a scanned stack
  (``view.index``) keeps that layer's entry of the scan axis alone. With ``batch_first``
  those stack axes are moved behind the first axis of one call's keys (the batch axis),
  giving ``(B, *stack, ..., key_dim)``. Raises ``ValueError`` at trace time if the layer is never
  called.

  Args:
    model: the model (its definition is used; parameters come as ``fn``'s argument).
    view: the layer's :class:`~memedit.layers.MemoryView`.
    method: model method to run. dtype: dtype of the keys.
    batch_first: move stacking axes behind the batch axis.

  Returns:
    ``fn(params, *args, **kwargs) -> keys``.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> import memedit.layers as ml
    >>> model = nnx.Sequential(nnx.Linear(3, 4, rngs=nnx.Rngs(0)), nnx.relu,
    ...                        nnx.Linear(4, 2, rngs=nnx.Rngs(1)))
    >>> fn = ml.forward_to_layer(model, ml.memory_view(model, "layers/2"))
    >>> jax.jit(fn)(nnx.state(model), jnp.ones((5, 3))).shape
    (5, 4)
  """
  m = _mem._as_model(model)
  path = view.module_path

  def fn(params, *args, **kwargs):
    holder = _Holder()

    def transform(a, k, out):
      keys = view.keys(a[0]).astype(dtype)
      holder.call_kernel_shape = keys.shape  # one call's key shape (inside any scan)
      return (keys,)

    mm = _mem._Model(m.framework, m.definition, params, m.form)
    try:
      _, records = _run(mm, path, holder, args, kwargs, method, transform=transform)
    except jax.errors.ConcretizationTypeError as e:
      raise _flag_error(e, f"layer {path!r}") from None
    except TypeError as e:
      if m.framework != "nnx" or "carry" not in str(e):
        raise
      raise ValueError(
          f"layer {path!r}: it is part of a scan carry (e.g. the cell of nnx.RNN), where "
          "keys cannot leave a compiled program; use capture() (which streams such calls "
          "to the host) and memedit.covariance_update on its keys") from None
    if not records:
      raise _calls_error(path, 0, holder.traced, m.framework, False)
    if view.index is not None:
      records = [_pick_layer(r, view.index, view.stack_size, path) for r in records]
    keys = _stack([r[0] for r in records])
    if batch_first:
      ns = keys.ndim - len(holder.call_kernel_shape)
      if ns:
        keys = jnp.moveaxis(keys, list(range(ns)), list(range(1, ns + 1)))
    return keys
  return fn


def _linen_layer_definition(m, path, args, kwargs, method):
  """(unbound layer definition, its variables, one call's kernel shape) for a Linen layer."""
  holder = _Holder()
  arrays, rebuild = _static_inputs(args, kwargs)

  def fwd(params, arrs):
    a, k = rebuild(arrs)
    _, records = _run(m.__class__("linen", m.definition, params, m.form), path, holder, a, k,
                      method, keys_only=True, want_definition=True)
    return records

  try:
    records = jax.eval_shape(fwd, m.params, arrays)
  except jax.errors.ConcretizationTypeError as e:
    raise _flag_error(e, "memory_view") from None
  if holder.definition is None:
    raise _calls_error(path, 0, holder.traced, "linen", False)
  del records
  if _has_tracer(holder.definition):
    # An attribute computed by the parent while it runs (e.g. an array split from an RNG
    # key and passed to the layer): the shape-only trace left a tracer in the definition,
    # so take it from one concrete run of the model on the example inputs.
    holder = _Holder()
    _run(m, path, holder, args, kwargs, method, keys_only=True, want_definition=True)
  return (holder.definition, linen_layer_variables(m.params, path), holder.call_kernel_shape,
          holder.input_ndim)


def linen_layer_variables(variables: dict, path: tuple) -> dict:
  """{collection: the sub-tree at ``path``} for each Linen collection that has one."""
  out = {}
  for col, tree in variables.items():
    node = tree
    try:
      for p in path:
        node = node[p]
    except (KeyError, TypeError):
      continue
    out[col] = node
  return out


def _nnx_input_ndim(m, path, args, kwargs, method) -> int | None:
  """ndim of one call's first argument of an NNX layer (shape-only trace)."""
  holder = _Holder()

  def transform(a, k, out):
    holder.input_ndim = jnp.ndim(a[0])
    return (a[0],)

  arrays, rebuild = _static_inputs(args, kwargs)

  def fwd(params, arrs):
    a, k = rebuild(arrs)
    mm = _mem._Model("nnx", m.definition, params, m.form)
    return _run(mm, path, holder, a, k, method, transform=transform)[1]

  try:
    jax.eval_shape(fwd, m.params, arrays)
  except jax.errors.ConcretizationTypeError as e:
    raise _flag_error(e, "memory_view") from None
  return holder.input_ndim
