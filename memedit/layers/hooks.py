"""Capturing one layer's keys (inputs) and values (outputs) in a whole-model forward pass.

:func:`capture` runs the model once with the layer intercepted
(:mod:`memedit.layers.intercept`) and returns its keys, values and extra call arguments;
:func:`forward_to_layer` gives a pure function of the parameters returning the layer's
keys alone, so that XLA drops the rest of the model.

Nothing here is kept between calls except compiled programs: :func:`capture`'s program
takes the model's parameters and array inputs as arguments, and everything else that
defines it (the model's structure, the layer, the method, Python-valued inputs) as a
static argument, so ``jax.jit`` compiles it once per structure and shapes and every
parameter set of a model shares it. Threads may capture concurrently.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from memedit.checks import explicit_sharding
from memedit.layers.intercept import (Static, calls_error, flag_error, hide_static,
                                      layer_axis_error, linen_scope_path, pick_layer,
                                      run_hooked, show_static, sow_record, stack_calls,
                                      tap_layer)
from memedit.layers.model import Model, as_model, call_method, merge, resolve_layer
from memedit.layers.view import MemoryView, memory_view

__all__ = ["CaptureProgram", "Captured", "capture", "capture_program", "forward_to_layer",
           "forward_with_layer"]


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

  Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn
    >>> from memedit.layers import capture
    >>> class Net(nn.Module):
    ...   @nn.compact
    ...   def __call__(self, x):
    ...     return nn.Dense(3, name="out")(jnp.tanh(nn.Dense(5, name="hid")(x)))
    >>> x = jnp.ones((2, 4))
    >>> net = Net(); variables = net.init(jax.random.PRNGKey(0), x)
    >>> got = capture((net, variables), "out", x)
    >>> got.keys.shape, got.values.shape, got.calls
    ((2, 5), (2, 3), 1)
  """
  keys: Any
  values: Any
  extra_args: tuple
  extra_kwargs: dict
  calls: int


def _resolve_path(m, address, args, kwargs, method) -> tuple:
  """(module path, index, L) of an address or a :class:`MemoryView`; ``index`` (``None``
  unless it picks one layer of a scanned stack of ``L`` layers) is checked against the
  layer's kernel."""
  if isinstance(address, MemoryView):
    return address.module_path, address.index, address.stack_size
  path, _, index, _, _ = resolve_layer(m, address)
  if index is None:
    return path, None, None
  linen = m.framework == "linen"  # Linen layer definitions exist only while the model runs
  view = memory_view(m, address, *(args if linen else ()), method=method,
                     **(kwargs if linen else {}))
  return path, view.index, view.stack_size


class CaptureProgram(NamedTuple):
  """What :func:`capture_program` is compiled for besides the arrays (hashable: static).

  Attributes:
    framework: ``'nnx'`` or ``'linen'``. definition: NNX graphdef or Linen module.
    form: how the model was given (see :class:`~memedit.layers.model.Model`).
    path: the layer's module path. index, size: layer ``index`` of a scanned stack of
      ``size`` layers (``None``: the layer as a whole). method: model method.
  """
  framework: str
  definition: Any
  form: str
  path: tuple
  index: int | None
  size: int | None
  method: Any


def _capture_records(program: CaptureProgram, params, inputs):
  """``(records, Static(hook runs))``: one ``(keys, values, extras)`` per call site."""
  args, kwargs = show_static(inputs)
  traced = [0]  # hook runs in this trace; local to the call

  def hook(module, call, a, k):
    out = call(*a, **k)
    traced[0] += 1
    sow_record(module, (a[0], out, hide_static((tuple(a[1:]), dict(k)))))
    return out

  m = Model(program.framework, program.definition, params, program.form)
  _, records = run_hooked(m, program.path, hook, args, kwargs, program.method)
  if program.index is not None:  # only that layer's keys and values leave the program
    records = tuple(pick_layer(r, program.index, program.size, program.path)
                    for r in records)
  return records, Static(traced[0])


# A jitted function: jax.jit keys its compiled programs by the static program description
# and the arguments' structure, shapes and dtypes (Python-valued inputs are Static nodes
# of that structure). It holds no parameters or results of earlier calls.
capture_program = jax.jit(_capture_records, static_argnums=0)
capture_program.__doc__ = """``capture_program(program, params, inputs) -> (records, Static(calls))``.

The compiled program behind :func:`capture`: ``program`` a :class:`CaptureProgram`
(static), ``params`` the model's parameters, ``inputs`` ``hide_static((args, kwargs))``.
One record ``(keys, values, extras)`` per call site of the layer."""


def _stack_extras(extras):
  try:
    return show_static(stack_calls(extras))
  except ValueError:  # Python values differing between calls: stacked as arrays
    return stack_calls([show_static(e) for e in extras])


def capture(model, address, *args, single: bool = False, jit: bool = True,
            method: str | None = None, **kwargs) -> Captured:
  """Keys, values and extra call arguments of one layer in a forward pass of the model.

  Args:
    model: ``nnx.Module`` (untouched), NNX ``(graphdef, state)`` or Linen
      ``(module, variables)``.
    address: layer address (see :func:`memory_view`) or a :class:`MemoryView`; one layer
      of a scanned stack (e.g. ``('stack', 1, 'fc2')``) gives that layer's keys and
      values alone.
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
  m = as_model(model)
  path, index, size = _resolve_path(m, address, args, kwargs, method)
  _check_layer_axis(m, path, index, size, m.params, args, kwargs, method)
  program = CaptureProgram(m.framework, m.definition, m.form, tuple(path), index, size, method)
  inputs = hide_static((tuple(args), dict(kwargs)))
  if not jit:
    fn = _capture_records
  else:
    try:
      hash(program)
      fn = capture_program
    except TypeError:  # e.g. a Linen module with array or dict attributes: compiled for
      # this call, the program closed over (jax.jit cannot hash it as a static argument)
      fn = lambda program, params, inputs: jax.jit(
          functools.partial(_capture_records, program))(params, inputs)
  try:
    records, traced = fn(program, m.params, inputs)
    traced = traced.value
  except jax.errors.ConcretizationTypeError as e:
    raise flag_error(e, "capture") from None
  except TypeError as e:
    if m.framework != "nnx" or "carry" not in str(e):
      raise
    # The layer is part of a scan *carry* (e.g. the cell of nnx.RNN), where a sown
    # variable cannot grow: stream the calls to the host instead, in execution order.
    records, traced = _capture_by_callback(m, path, args, kwargs, method, jit)
    if index is not None:
      records = tuple(pick_layer(r, index, size, path) for r in records)
  n = len(records)
  if n == 0 or (single and n != 1):
    scope = linen_scope_path(m, path, args, kwargs, method) if n == 0 and traced else None
    raise calls_error(path, n, traced, m.framework, single, scope)
  keys = stack_calls([r[0] for r in records])
  values = stack_calls([r[1] for r in records])
  extra_args, extra_kwargs = _stack_extras([r[2] for r in records])
  return Captured(keys, values, tuple(extra_args), dict(extra_kwargs), n)


def _capture_by_callback(m, path, args, kwargs, method, jit):
  """Records streamed to the host by ``jax.debug.callback`` (compiled for this call: the
  callback writes into this call's own table)."""
  executed: dict[int, list] = {}
  structure: dict[int, Any] = {}

  def hook(module, call, a, k):
    out = call(*a, **k)
    site = len(structure)
    leaves, structure[site] = jax.tree_util.tree_flatten(
        hide_static((tuple(a[1:]), dict(k))))

    def record(x, y, ls):
      executed.setdefault(site, []).append((x, y, ls))
    jax.debug.callback(record, a[0], out, leaves, ordered=True)
    return out

  def fwd(params, inputs):
    a, k = show_static(inputs)
    model = tap_layer(merge(m.definition, params), path, hook)
    return call_method(model, method)(*a, **k)

  out = (jax.jit(fwd) if jit else fwd)(m.params, hide_static((tuple(args), dict(kwargs))))
  jax.block_until_ready(out)
  jax.effects_barrier()
  records = []
  for site in sorted(executed):
    calls = [jax.tree_util.tree_map(jnp.asarray, (c[0], c[1], c[2])) for c in executed[site]]
    x, y, ls = stack_calls(calls) if len(calls) > 1 else calls[0]
    records.append((x, y, jax.tree_util.tree_unflatten(structure[site], ls)))
  return tuple(records), len(structure)


def forward_to_layer(model, view: MemoryView, *, method: str | None = None,
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
  m = as_model(model)
  path = view.module_path

  def keys_of(params, args, kwargs):
    """``(keys with every call's stacking axes first, one call's key shape)``."""
    seen = {"traced": 0}

    def hook(module, call, a, k):
      out = call(*a, **k)
      keys = replicated_type(view.keys(a[0]).astype(dtype))
      seen["traced"] += 1
      seen["call_shape"] = keys.shape  # one call's key shape (inside any scan)
      sow_record(module, (keys,))
      return out

    mm = Model(m.framework, m.definition, params, m.form)
    try:
      _, records = run_hooked(mm, path, hook, args, kwargs, method)
    except jax.errors.ConcretizationTypeError as e:
      raise flag_error(e, f"layer {path!r}") from None
    except TypeError as e:
      if m.framework != "nnx" or "carry" not in str(e):
        raise
      raise ValueError(
          f"layer {path!r}: it is part of a scan carry (e.g. the cell of nnx.RNN), where "
          "keys cannot leave a compiled program; use capture() (which streams such calls "
          "to the host) and memedit.covariance_update on its keys") from None
    if not records:
      raise calls_error(path, 0, seen["traced"], m.framework, False,
                        linen_scope_path(mm, path, args, kwargs, method))
    if view.index is not None:
      records = [pick_layer(r, view.index, view.stack_size, path) for r in records]
    return stack_calls([r[0] for r in records]), seen["call_shape"]

  def fn(params, *args, **kwargs):
    _check_layer_axis(m, path, view.index, view.stack_size, params, args, kwargs, method)
    keys, call_shape = keys_of(params, args, kwargs)
    ns = keys.ndim - len(call_shape)
    if batch_first and ns:
      rows = _rows(args)
      if tuple(call_shape[:1]) == (rows,) and rows not in keys.shape[:ns]:
        axis = ns  # one call sees the batch first, and no stacking axis may be it
      else:
        axis = _batch_axis(keys_of, params, args, kwargs, keys.shape)
      keys = jnp.moveaxis(keys, ns if axis is None else axis, 0)
    return keys
  return fn


def replicated_type(x):
  """``x`` replicated when its type carries a sharding over a mesh with explicit axes
  (parameters put on a ``jax.make_mesh`` mesh give a layer's inputs such types), eagerly
  or traced; ``x`` itself otherwise.

  The fold's sums over keys so typed, or an insert's QR of them, would leave the
  sharding of their result to be guessed, which explicit axes refuse. Under automatic
  axes (and on one device) nothing changes and XLA partitions the work; the keys of one
  batch are what is replicated, never C's stream.
  """
  sharding = explicit_sharding(x)
  if sharding is None or not any(p is not None for p in getattr(sharding, "spec", ())):
    return x
  return jax.sharding.reshard(
      x, jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec()))


def _rows(args) -> int | None:
  """The batch's leading size: that of the first array among ``args``."""
  leaves = [x for x in jax.tree_util.tree_leaves(args) if np.ndim(x) >= 1]
  return int(np.shape(leaves[0])[0]) if leaves else None


def _grown_inputs(args, kwargs, rows):
  """``hide_static((args, kwargs))`` as shapes, every array of ``args`` with ``rows``
  leading rows given one row more."""
  def grow(x):
    if isinstance(x, Static) or np.ndim(x) < 1 or np.shape(x)[0] != rows:
      return x
    return jax.ShapeDtypeStruct((rows + 1,) + tuple(np.shape(x)[1:]), x.dtype)
  return jax.tree_util.tree_map(grow, hide_static((tuple(args), dict(kwargs))),
                                is_leaf=lambda x: isinstance(x, Static))


def _check_layer_axis(m: Model, path, index, size, params, args, kwargs, method) -> None:
  """Raises ``ValueError`` when axis 0 of the layer's records, where the layer axis of
  its stack must be, follows the batch instead (a Linen ``nn.vmap`` / ``nn.scan`` that
  maps 'intermediates' on another axis than its parameters), for a batch of as many rows
  as the stack has layers, where the shapes cannot tell the two apart."""
  if index is None or _rows(args) != size:
    return
  program = CaptureProgram(m.framework, m.definition, m.form, tuple(path), None, None,
                           method)
  try:
    records, _ = jax.eval_shape(functools.partial(_capture_records, program), params,
                                _grown_inputs(args, kwargs, size))
  except Exception:  # pylint: disable=broad-except  # a model fixed to its batch size
    return
  if any(np.shape(r[0])[:1] == (size + 1,) for r in records):
    raise layer_axis_error(path, size)


def _batch_axis(keys_of, params, args, kwargs, shape) -> int | None:
  """The axis of keys ``shape`` that follows the inputs' batch axis: the one whose size
  changes, and only it, when the batch has one row more (a shape-only trace). It is one
  call's first axis for a layer that sees the batch (a scan over layers stacks its calls
  in front of it), but a stacking axis itself for a layer mapped over the examples
  (``nnx.vmap`` / ``nn.vmap`` over the batch, where one call sees a single example).
  ``None`` when no single axis follows the batch."""
  rows = _rows(args)
  if rows is None:
    return None
  grown_args, statics = _grown_inputs(args, kwargs, rows)

  def keys_shape(p, a):
    return keys_of(p, tuple(show_static(a)), show_static(statics))[0]
  try:
    grown = jax.eval_shape(keys_shape, params, grown_args).shape
  except Exception:  # pylint: disable=broad-except  # a model fixed to its batch size
    return None
  if len(grown) != len(shape):
    return None
  moved = [i for i, (a, b) in enumerate(zip(shape, grown)) if a != b]
  if len(moved) != 1 or (shape[moved[0]], grown[moved[0]]) != (rows, rows + 1):
    return None
  return moved[0]


def forward_with_layer(model, view: MemoryView, *, method=None,
                       replace: Callable | None = None) -> Callable:
  """``fn(params, *args, **kwargs) -> (model output, Captured)`` of the viewed layer.

  A pure function of the parameters (jit it; programs are shared by every parameter set):
  the model runs once, the layer's keys, values and extra call arguments come back with
  its output, and ``replace(values) -> new values`` (if given) is what the rest of the
  model sees from every call of the layer (e.g. values pasted into a region).

  Args:
    model: the model (its definition is used; parameters come as ``fn``'s argument).
    view: the layer's :class:`~memedit.layers.MemoryView`.
    method: model method to run. replace: optional function of the layer's output.

  Returns:
    ``fn(params, *args, **kwargs) -> (output, Captured)``; the captured values are the
    layer's own outputs (before ``replace``).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> from memedit.layers import memory_view
    >>> from memedit.layers.hooks import forward_with_layer
    >>> model = nnx.Sequential(nnx.Linear(3, 4, rngs=nnx.Rngs(0)), nnx.relu,
    ...                        nnx.Linear(4, 2, rngs=nnx.Rngs(1)))
    >>> fn = forward_with_layer(model, memory_view(model, "layers/0"),
    ...                         replace=lambda v: jnp.zeros_like(v))
    >>> y, cap = jax.jit(fn)(nnx.state(model), jnp.ones((5, 3)))
    >>> cap.keys.shape, bool(jnp.allclose(y, model.layers[2](jnp.zeros((5, 4)))))
    ((5, 3), True)
  """
  m = as_model(model)
  path = view.module_path

  def fn(params, *args, **kwargs):
    _check_layer_axis(m, path, view.index, view.stack_size, params, args, kwargs, method)
    traced = [0]

    def hook(module, call, a, k):
      out = call(*a, **k)
      traced[0] += 1
      sow_record(module, (a[0], out, hide_static((tuple(a[1:]), dict(k)))))
      return out if replace is None else replace(out)

    mm = Model(m.framework, m.definition, params, m.form)
    try:
      y, records = run_hooked(mm, path, hook, args, kwargs, method)
    except jax.errors.ConcretizationTypeError as e:
      raise flag_error(e, f"layer {path!r}") from None
    if not records:
      raise calls_error(path, 0, traced[0], m.framework, False,
                        linen_scope_path(mm, path, args, kwargs, method))
    if view.index is not None:
      records = tuple(pick_layer(r, view.index, view.stack_size, path) for r in records)
    extra_args, extra_kwargs = _stack_extras([r[2] for r in records])
    return y, Captured(stack_calls([r[0] for r in records]), stack_calls([r[1] for r in records]),
                       tuple(extra_args), dict(extra_kwargs), len(records))
  return fn
