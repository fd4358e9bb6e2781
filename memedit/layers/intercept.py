"""Running a model with one of its layers intercepted, inside a traced function.

A *hook* ``hook(layer, call, args, kwargs) -> output`` stands in for one layer's
``__call__``: ``call(*args, **kwargs)`` runs the layer; the hook may record what it sees
with :func:`sow_record` and may change the output. Everything a hook needs is passed to it
or closed over by it for one call: this module keeps no state between calls, so several
threads may intercept layers of one model at the same time.

NNX: the model is merged from ``(graphdef, state)`` inside the traced function (a private
copy; the caller's model is never touched) and every reference to the layer in that copy
is replaced by a :class:`LayerTap`, a module that calls the hook and forwards every other
attribute to the layer (tied weights such as ``self.fc.kernel`` still read the layer's).
The tap is part of the copy's graph, so it survives ``nnx.jit``, ``nnx.remat`` and
``nnx.scan`` (records sown under a scan come back stacked on axis 0).

Linen: :func:`linen_interceptor` builds an ``nn.intercept_methods`` interceptor (Flax
keeps interceptors on a thread-local stack) that runs the hook for ``__call__`` of the
module at the layer's path. Records go to the ``'intermediates'`` collection; under
``nn.scan`` it must be scanned (``variable_axes={..., 'intermediates': 0}``), otherwise
they are dropped and :func:`calls_error` says so. A layer run inside ``nn.map_variables``
with other parameters than the stored ones (a user's reparametrisation) is refused: its
memory is not its stored kernel.

Python values among inputs and records (flags such as ``train=False``) travel as
:class:`Static` pytree nodes: part of the tree structure, never traced.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx
import flax
import flax.linen as nn
from flax.core import DenyList
from flax.traverse_util import flatten_dict

from memedit.layers.kinds import layer_kind
from memedit.layers.model import Model, call_method, linen_layer_variables, locate, merge

__all__ = [
    "Capture",
    "LayerTap",
    "SOW_NAME",
    "Static",
    "calls_error",
    "flag_error",
    "hide_static",
    "layer_axis_error",
    "linen_interceptor",
    "linen_layer_definition",
    "linen_scope_path",
    "nnx_input_ndim",
    "pick_layer",
    "refuse_reparametrised",
    "run_hooked",
    "show_static",
    "sow_record",
    "stack_calls",
    "tap_layer",
]

SOW_NAME = "__memedit_capture__"

Hook = Callable[[Any, Callable, tuple, dict], Any]


class Capture(nnx.Intermediate):
  """Variable type of memedit's sown records (kept apart from user sows)."""


# ----------------------------------------------------------------------------------
# Python values as static pytree nodes
# ----------------------------------------------------------------------------------


class Static:
  """A Python value carried in a pytree's structure (no leaves): static under ``jax.jit``
  (part of the cache key when an input, given back as is when an output)."""

  __slots__ = ("value",)

  def __init__(self, value):
    self.value = value

  def __eq__(self, other):
    if not isinstance(other, Static):
      return False
    if self.value is other.value:
      return True
    try:
      return type(self.value) is type(other.value) and bool(self.value == other.value)
    except Exception:  # pylint: disable=broad-except
      return False

  def __hash__(self):
    try:
      return hash((type(self.value), self.value))
    except TypeError:  # unhashable: equal only to itself as far as caches go
      return id(self.value)

  def __repr__(self):
    return f"Static({self.value!r})"


jax.tree_util.register_pytree_node(Static, lambda s: ((), s.value), lambda v, _: Static(v))


def _is_array(x) -> bool:
  return isinstance(x, (jax.Array, jnp.ndarray)) or hasattr(x, "shape")


def hide_static(tree):
  """``tree`` with every non-array leaf wrapped in :class:`Static`.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from memedit.layers.intercept import hide_static, show_static
    >>> t = hide_static((jnp.ones(2), True))
    >>> len(jax.tree_util.tree_leaves(t)), show_static(t)[1]
    (1, True)
  """
  return jax.tree_util.tree_map(lambda x: x if _is_array(x) else Static(x), tree)


def show_static(tree):
  """Inverse of :func:`hide_static`."""
  return jax.tree_util.tree_map(lambda x: x.value if isinstance(x, Static) else x, tree,
                                is_leaf=lambda x: isinstance(x, Static))


def flag_error(e: Exception, where: str) -> ValueError:
  """The error for a model that used a traced input as a Python value."""
  return ValueError(
      f"{where}: the model used a traced input as a Python value (e.g. a flag such as "
      "train=False or deterministic=True given as an array); pass such flags as Python "
      "values (bool, int, str): memedit keeps non-array inputs static in capture and "
      "memory_view, and layer_covariance / layer_key_fn take them as call_kwargs={...}. "
      f"JAX said: {str(e).splitlines()[0]}")


# ----------------------------------------------------------------------------------
# Hooks
# ----------------------------------------------------------------------------------


class LayerTap(nnx.Module):
  """Stands in for one layer in a private copy of an NNX model.

  Calling it runs ``hook(layer, layer, args, kwargs)``; any other attribute is the
  layer's (``tap.kernel`` is ``layer.kernel``), so models reading their layers' weights
  (tied embeddings, shared projections) run unchanged.
  """

  def __init__(self, layer, hook: Hook):
    self.layer = layer
    self.hook = hook

  def __call__(self, *args, **kwargs):
    return self.hook(self.layer, self.layer, args, kwargs)

  def __getattr__(self, name):
    if name.startswith("_") or name in ("layer", "hook"):
      raise AttributeError(name)
    return getattr(self.layer, name)


# Flax wrappers that rewrite the wrapped layer's weights at every call (the layer then runs
# with g(W), not with its stored kernel W, and g is not linear: W / sigma(W), g W / |W|).
_REPARAMETRISING = (nnx.SpectralNorm, nnx.WeightNorm, nn.SpectralNorm, nn.WeightNorm)


def _reparametrised_error(path, wrapper) -> ValueError:
  return ValueError(
      f"layer {tuple(path)!r}: expected a layer that runs with its stored kernel, got one "
      f"wrapped by {'nnx' if isinstance(wrapper, nnx.Module) else 'linen'}."
      f"{type(wrapper).__name__}, which "
      "rewrites the kernel at every call (a normalised g(W), not linear in W), so the layer "
      "is not the memory its kernel describes; edit a layer without the wrapper")


def refuse_reparametrised(model, layer, path) -> None:
  """Raises ``ValueError`` when an NNX ``layer`` of ``model`` is wrapped by a module that
  rewrites its weights before calling it (``nnx.SpectralNorm``, ``nnx.WeightNorm``)."""
  for _, node in nnx.iter_graph(model):
    if isinstance(node, _REPARAMETRISING) and any(
        child is layer for _, child in nnx.iter_children(node)):
      raise _reparametrised_error(path, node)


def tap_layer(model, path: tuple, hook: Hook):
  """Replaces every reference to the layer at ``path`` in ``model`` by a :class:`LayerTap`.

  Mutates ``model``: call it on a private copy merged inside the traced function.

  Args:
    model: an NNX model (a copy nobody else holds). path: the layer's module path.
    hook: ``hook(layer, call, args, kwargs) -> output``.

  Returns:
    The model to call (the tap itself when ``path`` is ``()``).

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from memedit.layers.intercept import tap_layer
    >>> model = nnx.Sequential(nnx.Linear(2, 2, rngs=nnx.Rngs(0)))
    >>> doubled = tap_layer(model, ("layers", 0), lambda m, call, a, k: 2 * call(*a, **k))
    >>> bool(jnp.allclose(doubled(jnp.ones((1, 2))), 2 * model.layers[0].layer(jnp.ones((1, 2)))))
    True
  """
  target = locate(model, path)
  refuse_reparametrised(model, target, path)
  tap = LayerTap(target, hook)
  if target is model:
    return tap
  # Modules and the plain lists and dicts a module holds as data (``nnx.data([...])``);
  # a tuple holding the layer is rebuilt around the tap in its own parent.
  graph = list(nnx.iter_graph(model))
  parents = [node for _, node in graph if isinstance(node, (nnx.Module, list, dict))]
  for parent in parents:
    for key, node in list(nnx.iter_children(parent)):
      if node is target:
        _set_child(parent, key, tap)
  for p, node in graph:
    if p and type(node) is tuple:  # pylint: disable=unidiomatic-typecheck
      parent = locate(model, p[:-1])
      new = _swap_in(node, target, tap)
      if new is not node and type(parent) is not tuple:  # pylint: disable=unidiomatic-typecheck
        _set_child(parent, p[-1], new)
  return model


def _set_child(parent, key, node) -> None:
  if isinstance(parent, (nnx.List, nnx.Dict, list, dict)) or isinstance(key, int):
    parent[key] = node
  else:
    setattr(parent, key, node)


def _swap_in(node, target, tap):
  """``node`` with ``target`` replaced by ``tap``: ``tap`` for the target itself, a new
  tuple for a (nested) tuple holding it, ``node`` itself otherwise."""
  if node is target:
    return tap
  if type(node) is tuple:  # pylint: disable=unidiomatic-typecheck
    items = tuple(_swap_in(x, target, tap) for x in node)
    if any(a is not b for a, b in zip(items, node)):
      return items
  return node


def _mapped_error(path, where) -> ValueError:
  return ValueError(
      f"layer {tuple(path)!r}: expected a layer that runs with its stored parameters, got "
      f"one run inside linen.map_variables ({where!r}), which hands it its variables "
      "through trans_in_fn: it runs with g(W), not with the stored kernel W that memedit "
      "reads, collects statistics for and edits, so an edit would miss its targets (or "
      "memedit cannot check that g leaves the parameters as they are, under a further "
      "lifted transform or with init=True); edit a layer outside linen.map_variables, or "
      "store the mapped parameters and run the model without the mapping")


def _runs_mapped(module, variables, path):
  """The ``map_variables(...)`` part of a bound Linen layer's scope path when the layer
  runs inside ``nn.map_variables`` with parameters that are not the stored ones
  (``None`` otherwise). A mapping that leaves the parameters alone (another collection,
  an identity) hands the layer the very arrays it was given."""
  debug = tuple(getattr(getattr(module, "scope", None), "debug_path", ()) or ())
  mapped = [p for p in debug if "map_variables(" in str(p)]  # also 'scan(map_variables(b))'
  if not mapped or variables is None:
    return None
  try:
    seen = flatten_dict(flax.core.unfreeze(module.variables.get("params", {})))
  except Exception:  # pylint: disable=broad-except  # no readable parameters at all
    seen = {}
  stored = flatten_dict(flax.core.unfreeze(
      linen_layer_variables(variables, path).get("params", {})))
  if set(seen) == set(stored) and all(seen[k] is stored[k] for k in seen):
    return None
  return "/".join(str(p) for p in debug)


def linen_interceptor(path: tuple, hook: Hook, variables=None):
  """An ``nn.intercept_methods`` interceptor running ``hook`` for the layer at ``path``.

  Args:
    path: the Linen module path of the layer (``module.path``).
    hook: ``hook(module, call, args, kwargs) -> output`` for the layer's ``__call__``;
      ``module`` is the bound layer (``module.clone(parent=None)`` is its definition).
    variables: the model's variables; given, a layer run inside ``nn.map_variables``
      with other parameters than these (a user's reparametrisation) is refused.

  Returns:
    ``interceptor(next_fun, args, kwargs, context)``.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> import flax.linen as nn
    >>> from memedit.layers.intercept import linen_interceptor
    >>> model = nn.Dense(2)
    >>> variables = model.init(jax.random.key(0), jnp.ones((1, 3)))
    >>> plus_one = linen_interceptor((), lambda m, call, a, k: call(*a, **k) + 1)
    >>> with nn.intercept_methods(plus_one):
    ...   y = model.apply(variables, jnp.ones((1, 3)))
    >>> bool(jnp.allclose(y, model.apply(variables, jnp.ones((1, 3))) + 1))
    True
  """
  path = tuple(path)
  wrappers = []  # weight-rewriting wrappers whose __call__ is running (this run only)

  def interceptor(next_fun, args, kwargs, ctx):
    if ctx.method_name == "__call__" and isinstance(ctx.module, _REPARAMETRISING):
      wrappers.append(ctx.module)
      try:
        return next_fun(*args, **kwargs)
      finally:
        wrappers.pop()
    if ctx.method_name != "__call__" or tuple(ctx.module.path) != path:
      return next_fun(*args, **kwargs)
    if wrappers:
      raise _reparametrised_error(path, wrappers[-1])
    where = _runs_mapped(ctx.module, variables, path)
    if where is not None:
      raise _mapped_error(path, where)
    return hook(ctx.module, next_fun, tuple(args), dict(kwargs))
  return interceptor


def sow_record(module, record) -> None:
  """Sows ``record`` (a pytree) as one call's record of ``module`` (NNX or bound Linen)."""
  if isinstance(module, nnx.Module):
    module.sow(Capture, SOW_NAME, record)
  else:
    module.sow("intermediates", SOW_NAME, record)


def _nnx_records(inter) -> tuple:
  records = []
  for k, v in nnx.to_flat_state(inter):
    if k and k[-1] == SOW_NAME:
      records.extend(v.get_value() if isinstance(v, nnx.Variable) else v)
  return tuple(records)


def _linen_records(state) -> tuple:
  records = []
  for k, v in flatten_dict(dict(state.get("intermediates", {}))).items():
    if k and k[-1] == SOW_NAME:
      records.extend(v)
  return tuple(records)


def _own_copies(inputs):
  """``inputs`` with each NNX object among them (an ``nnx.Rngs`` given for dropout, a
  module) replaced by a copy made here: the model may update it as it runs (an RNG
  stream's count), which Flax refuses for an object made outside the current trace (a
  call keyword closed over by a compiled fold), and the caller's object stays as it was."""
  is_obj = lambda x: isinstance(x, nnx.Pytree)
  return jax.tree_util.tree_map(lambda x: nnx.clone(x) if is_obj(x) else x, inputs,
                                is_leaf=is_obj)


def run_hooked(m: Model, path: tuple, hook: Hook, args, kwargs, method=None):
  """Runs the model once with the layer at ``path`` hooked.

  Args:
    m: the model (:class:`~memedit.layers.model.Model`; its ``params`` may be traced).
    path: the layer's module path. hook: see :func:`linen_interceptor`.
    args, kwargs: model inputs. method: model method (see ``memory_view``).

  Returns:
    ``(model output, records)``: the records sown with :func:`sow_record`, one per call
    site (a call under a scan carries the scan axis first).
  """
  if m.framework == "nnx":
    model = tap_layer(merge(m.definition, m.params), path, hook)
    args, kwargs = _own_copies((tuple(args), dict(kwargs)))
    call = lambda mm, *a, **k: call_method(mm, method)(*a, **k)
    try:
      out, inter = nnx.capture(call, Capture)(model, *args, **kwargs)
    except ValueError as e:
      if SOW_NAME not in str(e) or "vmap" not in str(e):
        raise
      raise ValueError(
          f"layer {tuple(path)!r}: expected its calls' records to leave the model, got a "
          "layer called inside nnx.vmap with its module broadcast (in_axes=None), where "
          "records sown per example cannot come out; give the module's axes as "
          "nnx.StateAxes({nnx.Intermediate: 0, ...: None}). Flax said: "
          f"{str(e).splitlines()[0]}") from None
    return out, _nnx_records(inter)
  with nn.intercept_methods(linen_interceptor(path, hook, m.params)):
    try:
      out, state = m.definition.apply(m.params, *args, mutable=["intermediates"],
                                      method=method, **kwargs)
    except flax.errors.ModifyScopeVariableError:
      # The model updates another collection as it runs (BatchNorm's batch_stats in
      # training mode, a decoding cache): let every collection but the parameters change,
      # and drop the changes (the caller's variables stay untouched).
      out, state = m.definition.apply(m.params, *args, mutable=DenyList("params"),
                                      method=method, **kwargs)
    except flax.errors.ScopeCollectionNotFound as e:
      if "map_variables(" not in str(e):
        raise
      raise ValueError(
          f"layer {tuple(path)!r}: expected a model that runs with a mutable collection "
          "('intermediates', where memedit records the layer's calls), got one whose "
          "linen.map_variables(..., init=True) then finds its mapped variables empty (a "
          "Flax limitation); build the mapping with init=self.is_initializing(). Flax "
          f"said: {str(e).splitlines()[0]}") from None
  return out, _linen_records(state)


def pick_layer(record, index: int, size: int, path):
  """Layer ``index`` of one call site's record under a scan over ``size`` layers (the
  scan stacks its calls on axis 0)."""
  shape = tuple(jnp.shape(record[0]))
  if shape[:1] != (size,):
    raise ValueError(
        f"layer {path!r}: expected its calls stacked over the {size} layers of its scan on "
        f"axis 0, got keys of shape {shape} (is the stack run by a scan over its layers? "
        "A Linen nn.scan / nn.vmap must map 'intermediates' on the axis of its "
        "parameters: variable_axes={'params': 0, 'intermediates': 0})")
  return jax.tree_util.tree_map(lambda x: x[index], record)


def layer_axis_error(path, size: int) -> ValueError:
  """The error for records of a stacked layer whose axis 0 follows the batch."""
  return ValueError(
      f"layer {tuple(path)!r}: expected its calls stacked over the {size} layers of its "
      f"stack on axis 0, got records whose axis 0 follows the batch ({size} rows, as many "
      "as layers); a Linen nn.vmap / nn.scan must map 'intermediates' on the axis of its "
      "parameters: variable_axes={'params': 0, 'intermediates': 0}")


# Linen lifted transforms whose variable_axes can carry records out of them.
_MAPPING_LIFTS = ("scan", "vmap")


def _lifts(scope_path) -> list[str]:
  """Names of the Linen lifted transforms in a scope's debug path, outermost first:
  ``('while_loop(scan(blk))', 'fc')`` gives ``['while_loop', 'scan']``."""
  names = []
  for part in scope_path or ():
    part = str(part)
    while "(" in part and part.endswith(")"):
      name, part = part.split("(", 1)
      names.append(name)
      part = part[:-1]
  return names


def calls_error(path, n: int, traced: int, framework: str, single: bool,
                scope_path=None) -> ValueError:
  """The error for a layer called ``n`` times (``traced``: hook runs while tracing;
  ``scope_path``: a Linen layer's scope debug path, naming the lifts it ran in)."""
  if n == 0 and traced:
    hint = ("the layer ran inside a Linen lifted transform (nn.scan, nn.vmap, ...) whose "
            "variable_axes do not include 'intermediates'; add 'intermediates': 0 to "
            "capture it"
            if framework == "linen" else "its captures were dropped by a transform")
    others = [t for t in _lifts(scope_path) if t not in _MAPPING_LIFTS + (
        "remat", "checkpoint", "jit", "cond", "switch", "map_variables")]
    if framework == "linen" and others:
      hint = (f"the layer ran inside Linen's {others[0]} (at "
              f"{'/'.join(map(str, scope_path))!r}), which gives back none of the records "
              "made inside it; memedit cannot read the layer's keys there: call the layer "
              "outside it, or run the loop as nn.scan with 'intermediates': 0 in its "
              "variable_axes")
    return ValueError(f"layer {path!r}: called during tracing but no capture came back: "
                      + hint)
  if n == 0:
    return ValueError(f"layer {path!r}: expected it to be called once by the model, but it "
                      "was called 0 times (is it used on this code path / method? Its keys "
                      "are read where the model calls the layer itself, its __call__: a "
                      "model that uses it only through another of its methods, such as "
                      "Embed.attend for a tied output layer, or reads its kernel directly, "
                      "gives none)")
  return ValueError(f"layer {path!r}: expected exactly one call, but the model calls it "
                    f"{n} times (a shared module?); use capture(..., single=False) to get "
                    "all calls stacked")


def stack_calls(xs):
  """One record per call stacked on a new axis 0 (a single record as is)."""
  if len(xs) == 1:
    return xs[0]
  return jax.tree_util.tree_map(lambda *a: jnp.stack(a), *xs)


# ----------------------------------------------------------------------------------
# What a view needs from one (shape-only) run
# ----------------------------------------------------------------------------------


def _has_tracer(module) -> bool:
  """Whether a Linen module definition holds traced arrays among its attributes."""
  for f in dataclasses.fields(module):
    if f.name in ("parent", "name"):
      continue
    leaves = jax.tree_util.tree_leaves(getattr(module, f.name, None))
    if any(isinstance(x, jax.core.Tracer) for x in leaves):
      return True
  return False


def _first_call(m: Model, path, args, kwargs, method, concrete=False) -> dict:
  """What the layer's first call shows: its definition (Linen), one call's kernel shape
  and its input's ndim; ``{}`` when it is not called."""
  seen = {"traced": 0}

  def hook(module, call, a, k):
    seen["traced"] += 1
    if "input_ndim" not in seen:
      seen["input_ndim"] = jnp.ndim(a[0])
      if m.framework == "linen":
        seen["scope_path"] = tuple(getattr(module.scope, "debug_path", ()) or ())
        seen["definition"] = module.clone(parent=None)
        weight = layer_kind(module).weight
        # A parameter boxed with its metadata (nn.with_partitioning, ...) is read unboxed.
        seen["call_kernel_shape"] = tuple(
            nn.meta.unbox(module.variables["params"][weight]).shape)
    return call(*a, **k)

  def fwd(params, inputs):
    a, k = show_static(inputs)
    return run_hooked(Model(m.framework, m.definition, params, m.form), path, hook, a, k,
                      method)[1]

  inputs = hide_static((tuple(args), dict(kwargs)))
  try:
    if concrete:
      fwd(m.params, inputs)
    else:
      jax.eval_shape(fwd, m.params, inputs)
  except jax.errors.ConcretizationTypeError as e:
    raise flag_error(e, "memory_view") from None
  return seen


def linen_layer_definition(m: Model, path, args, kwargs, method):
  """``(unbound layer definition, its variables, one call's kernel shape, input ndim)`` of
  a Linen layer, from a shape-only run of the model on example inputs."""
  seen = _first_call(m, path, args, kwargs, method)
  if "definition" not in seen:
    raise calls_error(path, 0, seen["traced"], "linen", False, seen.get("scope_path"))
  if _has_tracer(seen["definition"]):
    # An attribute computed by the parent while it runs (e.g. an array split from an RNG
    # key and passed to the layer): the shape-only trace left a tracer in the definition,
    # so take it from one concrete run of the model on the example inputs.
    seen = _first_call(m, path, args, kwargs, method, concrete=True)
  return (seen["definition"], linen_layer_variables(m.params, path),
          seen["call_kernel_shape"], seen["input_ndim"])


def nnx_input_ndim(m: Model, path, args, kwargs, method) -> int | None:
  """ndim of one call's first argument of an NNX layer (shape-only run)."""
  return _first_call(m, path, args, kwargs, method).get("input_ndim")


def linen_scope_path(m: Model, path, args, kwargs, method) -> tuple | None:
  """The scope debug path of a Linen layer's first call (names the lifted transforms it
  runs in, e.g. ``('while_loop(fc)',)``), from a shape-only run; ``None`` for NNX models
  or a layer that is not called."""
  if m.framework != "linen":
    return None
  try:
    return _first_call(m, path, args, kwargs, method).get("scope_path")
  except Exception:  # pylint: disable=broad-except  # only used to word an error
    return None
