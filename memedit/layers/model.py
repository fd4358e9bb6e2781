"""Models and addresses: NNX / Linen models as ``(definition, parameters)``, layer
addresses, and layers of scanned stacks.

A model enters as an ``nnx.Module``, an NNX ``(graphdef, state)`` pair or a Linen
``(module, variables)`` pair (:func:`as_model`); it is merged inside traced functions
(:func:`merge`) and never mutated.

Scanned stacks. ``nn.scan`` (Linen) and ``nnx.vmap``/``nnx.scan`` (NNX) give every
parameter of the scanned module a leading layer axis. One layer of such a stack is
addressed by its index right after the scanned module's name: ``('stack', 1, 'fc2')`` or
``'stack/1/fc2'`` is layer 1 of the layer ``('stack', 'fc2')``; an index anywhere else is
refused. The scanned module is read from the parameters (see :func:`stack_region`): the
innermost module on the layer's path above the layer that holds every parameter carrying
the layer axis there. Where the parameters cannot tell it from a parent holding nothing
but the stack, or from a single block inside it, the index is accepted after any of
those names (``('enc', 1, 'stack', 'fc')`` as well as ``('enc', 'stack', 1, 'fc')``).
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx
import flax.linen as nn
from flax.traverse_util import flatten_dict

__all__ = [
    "Model",
    "as_model",
    "call_method",
    "child",
    "linen_layer_variables",
    "locate",
    "merge",
    "path_str",
    "resolve_layer",
    "rewrap",
    "slice_tree",
    "stack_region",
]


@dataclasses.dataclass(frozen=True)
class Model:
  """A model as its definition and its parameters.

  Attributes:
    framework: ``'nnx'`` or ``'linen'``.
    definition: NNX ``GraphDef`` or Linen ``Module``.
    params: NNX ``State`` or Linen variables dict (may be traced).
    form: how the caller gave it: ``'module'`` (an ``nnx.Module``), ``'split'`` (NNX
      ``(graphdef, state)``) or ``'linen'`` (``(module, variables)``).
  """
  framework: str
  definition: Any
  params: Any
  form: str


def as_model(model) -> Model:
  """The :class:`Model` of an ``nnx.Module``, an NNX ``(graphdef, state)`` pair or a
  Linen ``(module, variables)`` pair (the caller's model is not touched).

  Example:
    >>> from flax import nnx
    >>> from memedit.layers.model import as_model
    >>> m = as_model(nnx.Linear(2, 3, rngs=nnx.Rngs(0)))
    >>> m.framework, m.form
    ('nnx', 'module')
  """
  if isinstance(model, Model):
    return model
  if isinstance(model, nnx.Module):
    gd, st = nnx.split(model)
    return Model("nnx", gd, st, "module")
  if isinstance(model, (tuple, list)) and len(model) == 2:
    a, b = model
    if isinstance(a, nn.Module):
      return Model("linen", a, b, "linen")
    if isinstance(a, nnx.GraphDef):
      return Model("nnx", a, b, "split")
  raise ValueError(
      "model: expected an nnx.Module, an NNX (graphdef, state) pair or a Linen "
      f"(module, variables) pair, got {type(model).__name__}")


def merge(graphdef, state):
  """``nnx.merge`` on fresh Variable objects: merging reuses the state's Variables, so a
  merged model that ran (RNG counters, batch statistics, sown values) would otherwise
  write into the caller's model."""
  return nnx.merge(graphdef, jax.tree_util.tree_map(lambda x: x, state))


def rewrap(m: Model, params):
  """The model with ``params``, in the form the caller gave it (see :class:`Model`)."""
  if m.form == "module":
    return merge(m.definition, params)
  return (m.definition, params)


def _escape_part(part) -> str:
  if not isinstance(part, str):
    return str(part)
  if part.isdigit():  # a name made of digits, not an index
    return "\\" + part
  return part.replace("\\", "\\\\").replace("/", "\\/").replace(".", "\\.")


def path_str(p) -> str:
  """The string address of path ``p``: parts joined by ``/``; a ``.``, ``/`` or ``\\``
  inside a name is escaped with a backslash, so the string parses back to ``p``.

  Example:
    >>> from memedit.layers.model import path_str
    >>> print(path_str(("blocks", 1, "fc.1")))
    blocks/1/fc\\.1
  """
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
  want = path_str(address)
  valid = [p for p in valid if p]
  strs = [path_str(p) for p in valid]
  close = difflib.get_close_matches(want, strs, n=6, cutoff=0.4)
  parent = address[:-1]
  siblings = [path_str(p) for p in valid if len(p) == len(address) and p[:-1] == parent]
  near = list(dict.fromkeys(close + siblings))[:12] or strs[:12]
  return ValueError(f"address: no {what} at {address!r}; valid paths near it: "
                    + ", ".join(repr(s) for s in near))


def _nnx_module_paths(model) -> list[tuple[tuple, Any]]:
  return [(tuple(p), mod) for p, mod in nnx.iter_modules(model)]


def child(obj, part):
  """``obj.part`` (attributes) or ``obj[part]`` (nnx.List / nnx.Dict items; an index
  also names a dict entry whose key is its digits, as ``nnx.Dict({'0': ...})``)."""
  if isinstance(part, int):
    try:
      return obj[part]
    except (KeyError, TypeError, AttributeError):
      if isinstance(obj, (nnx.List, list, tuple)):
        raise
      return obj[str(part)]
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
        obj = child(obj, part)
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


def _param_shapes(m: Model) -> list[tuple[tuple, tuple]]:
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
  return [(tuple(k), tuple(np.shape(nn.meta.unbox(v))))
          for k, v in flatten_dict(m.params.get("params", {})).items()]


def stack_region(m: Model, path: tuple) -> tuple[int, int] | None:
  """``(L, at)`` for a layer whose parameters share a leading layer axis of size ``L``:
  ``path[:at]`` is the scanned module and ``path[:at] + (index,) + path[at:]`` the
  address of one of its layers; ``None`` when the layer's parameters share no leading
  dimension.

  The scanned module is found from the parameters alone: of the modules on ``path`` that
  hold exactly the parameters of the outermost one whose parameters all carry the axis,
  the innermost above the layer (a parent holding nothing but the stack only wraps it:
  ``('enc', 'stack', 'fc')`` with ``enc`` holding only ``stack`` gives ``at = 2``). The
  root has no name to put an index after, so it is the scanned module only when no
  named module can be; the layer itself only when no named module above it can be (e.g.
  a stack of ``nnx.Linear`` layers made with ``nnx.vmap``: ``('stack', 1)``).
  """
  span = _stack_span(m, path)
  return None if span is None else span[:2]


def _stack_span(m: Model, path: tuple) -> tuple[int, int, frozenset] | None:
  """``(L, at, accepted)``: :func:`stack_region`'s ``(L, at)`` and the positions an
  index is accepted at. Parameters alone cannot tell the scanned module from the named
  modules on ``path`` that hold exactly the same parameters (a parent holding only the
  stack, or a stack holding only one block): an index is accepted right after any of
  them, and ``at`` (the address a view reports) is right after the innermost."""
  shapes = _param_shapes(m)
  path = tuple(path)

  def under(prefix):
    return [(p, s) for p, s in shapes if p[:len(prefix)] == prefix]

  own = {s[0] if s else None for _, s in under(path)}
  if len(own) != 1 or None in own:
    return None
  size = own.pop()
  first = next(j for j in range(len(path) + 1)
               if {s[0] if s else None for _, s in under(path[:j])} == {size})
  held = {p for p, _ in under(path[:first])}
  last = max(j for j in range(first, len(path) + 1)
             if {p for p, _ in under(path[:j])} == held)
  at = last if last < len(path) else min(len(path), max(len(path) - 1, first, 1))
  return size, at, frozenset({at} | set(range(max(first, 1), min(last, len(path) - 1) + 1)))


def _stack_name(prefix: tuple) -> str:
  """How error messages name the scanned module at ``prefix``."""
  if not prefix:
    return "the scanned model (its root module carries the layer axis)"
  return f"the scanned stack {path_str(prefix)!r}"


def _slice_index(m: Model, address: tuple, pos: int, rest: tuple, path: tuple,
                 unresolved: ValueError) -> tuple[int, int, int]:
  """(index, L, at) of the layer index at ``address[pos]``; ``rest`` is the address without
  it, ``path`` the layer it names and ``unresolved`` the error of reading ``address`` as a
  module path (raised when ``path`` is a list of layers, where the index names an entry)."""
  i = int(address[pos])
  region = _stack_span(m, path)
  if region is None:
    entries = sorted({k[len(path)] for k, _ in _param_shapes(m)
                      if k[:len(path)] == tuple(path) and len(k) > len(path) + 1},
                     key=str)
    if any(str(e).lstrip("-").isdigit() for e in entries):
      raise unresolved
    raise ValueError(
        f"address: {address!r} reads {i} as the index of one layer of a scanned stack, but "
        f"layer {path!r} is not stacked (its parameters share no leading layer axis)")
  size, at, accepted = region
  if tuple(rest) == tuple(path) and pos not in accepted:
    want = path[:at] + (i,) + path[at:]
    where = (f"right after the scanned module's name {path[at - 1]!r}" if at else
             "first (the model's root module is the scanned one)")
    unless = ("" if at else
              f"; or, if the model is not scanned (every parameter of it merely has "
              f"{size} rows), layer {path!r} is not stacked and takes no index")
    raise ValueError(
        f"address: the index of one layer of a scanned stack goes {where}: expected "
        f"{want!r} ({path_str(want)!r}), got {address!r}{unless}")
  if not -size <= i < size:
    raise ValueError(
        f"address: index {i} in {address!r} is out of range: {_stack_name(path[:at])} has "
        f"{size} layers (expected 0 <= index < {size})")
  return i % size, size, at


def resolve_layer(m: Model, address, obj=None):
  """The layer an address names: ``(module path, NNX module or None, index, L, at)``.

  ``index`` is ``None`` unless the address picks one layer of a scanned stack; then ``L``
  is the stack's size and ``at`` the position of the index in the canonical address
  ``path[:at] + (index,) + path[at:]``.
  """
  if m.framework == "nnx":
    obj = merge(m.definition, m.params) if obj is None else obj
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
      if isinstance(mod, (nnx.List, nnx.Dict)):  # the index names an entry, not a layer
        raise error
      kernel = _nnx_unstacked_kernel(mod)
      if kernel is not None:
        raise ValueError(
            f"address: {cand!r} reads {cand[pos]} as the index of one layer of a scanned "
            f"stack, but layer {path!r} is not stacked (its kernel {kernel} carries no "
            "layer axis)")
      index, size, at = _slice_index(m, cand, pos, rest, path, error)
      return path, mod, index, size, at
  raise error


def _nnx_unstacked_kernel(mod) -> tuple | None:
  """The kernel shape of an NNX layer whose kernel is one call's (no layer axis);
  ``None`` for a stacked layer, a Linen layer (``mod`` is ``None``) or a module that is
  not a memory layer."""
  from memedit.layers.kinds import layer_kind  # pylint: disable=import-outside-toplevel
  from memedit.layers.view import _nnx_call_kernel_ndim  # pylint: disable=import-outside-toplevel
  if not isinstance(mod, nnx.Module):
    return None
  try:
    leaf = getattr(mod, layer_kind(mod).weight)[...]
    ndim = _nnx_call_kernel_ndim(mod, leaf)
  except Exception:  # pylint: disable=broad-except  # not a memory layer: decided later
    return None
  return tuple(np.shape(leaf)) if np.ndim(leaf) <= ndim else None


def slice_tree(tree, index: int, size: int):
  """Layer ``index`` of a stacked layer's variables: every array leaf with leading
  dimension ``size`` (the layer axis) loses that axis."""
  def pick(x):
    return x[index] if np.ndim(x) >= 1 and np.shape(x)[0] == size else x
  return jax.tree_util.tree_map(pick, tree)


def locate(model, path):
  """The submodule of an NNX ``model`` at module path ``path``."""
  obj = model
  for part in path:
    obj = child(obj, part)
  return obj


def call_method(model, method):
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
