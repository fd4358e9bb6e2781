"""Running a causal language model with its modules' outputs read and rewritten.

The editors need more than a layer's keys: ROME's value search adds a vector to an MLP's
output at one token, causal tracing corrupts the token embeddings and restores one
hidden state at a time, MEMIT reads the residual stream at a block's output. All of this
is :func:`run_lm`: one forward pass of the model on token ids in which the modules at
given addresses have their output passed through a function and/or recorded.

Models enter as Linen ``(module, variables)`` or NNX ``(graphdef, state)`` (or an
``nnx.Module``); :func:`split_model` separates the static definition from the parameters,
which the traced functions of :mod:`memedit.lm` take as arguments. Linen modules are
hooked with ``flax.linen.intercept_methods``; NNX modules by giving the target instances,
for one traced call on a freshly merged copy, a subclass whose ``__call__`` runs the
hook (the caller's model is never touched).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
from flax import nnx

__all__ = ["LMLayout", "Static", "as_path", "get_leaf", "replace_leaf", "run_lm",
           "split_model", "static"]

Hook = Callable[[jax.Array, jax.Array], jax.Array]


def as_path(address: Any) -> tuple:
  """A module address as a tuple: ``"h_5.mlp.c_proj"`` or ``"blocks/2/mlp"`` (digits
  become ints) or a tuple/list of names and indices.

  Example:
    >>> as_path("h_5.mlp.c_proj"), as_path("blocks/2/fc")
    (('h_5', 'mlp', 'c_proj'), ('blocks', 2, 'fc'))
  """
  if isinstance(address, str):
    parts = [p for p in address.replace("/", ".").split(".") if p]
    return tuple(int(p) if p.isdigit() else p for p in parts)
  if isinstance(address, (tuple, list)) and all(
      isinstance(p, (str, int)) and not isinstance(p, bool) for p in address):
    return tuple(address)
  raise ValueError(f"address: expected a module path such as ('h_5', 'mlp', 'c_proj') or "
                   f"'h_5.mlp.c_proj', got {address!r}")


@dataclasses.dataclass(frozen=True)
class LMLayout:
  """Where a causal LM keeps the modules the editors use (module paths).

  Attributes:
    memories: per block, the MLP's output projection (a dense memory from the MLP keys to
      the residual stream), e.g. GPT-2's ``('h_5', 'mlp', 'c_proj')``.
    blocks: per block, the residual block whose output is the hidden state after it
      (``()`` when unknown: MEMIT and causal tracing need it).
    embed: the token embedding module whose ``__call__`` gives ``(N, T, d)`` (``None``
      when unknown: causal tracing needs it).

  Example:
    >>> lay = LMLayout(memories=("h_0.mlp.c_proj", "h_1.mlp.c_proj"), blocks=("h_0", "h_1"),
    ...                embed="wte")
    >>> lay.memories[1], lay.n_layers
    (('h_1', 'mlp', 'c_proj'), 2)
  """

  memories: tuple
  blocks: tuple = ()
  embed: Any = None

  def __post_init__(self):
    for name in ("memories", "blocks"):
      value = getattr(self, name)
      if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise ValueError(f"{name}: expected a sequence of module addresses, one per block "
                         f"(e.g. ['h_0.mlp.c_proj', 'h_1.mlp.c_proj']), got {value!r}")
    object.__setattr__(self, "memories", tuple(as_path(a) for a in self.memories))
    object.__setattr__(self, "blocks", tuple(as_path(a) for a in self.blocks))
    if self.embed is not None:
      object.__setattr__(self, "embed", as_path(self.embed))
    if not self.memories:
      raise ValueError("memories: expected the address of at least one MLP projection")
    if self.blocks and len(self.blocks) != len(self.memories):
      raise ValueError(f"blocks: expected one per memory ({len(self.memories)}), got "
                       f"{len(self.blocks)}")

  @property
  def n_layers(self) -> int:
    return len(self.memories)

  def require(self, what: str, user: str) -> None:
    """Raises a ValueError naming ``user`` when the layout lacks ``what``."""
    if what == "blocks" and not self.blocks or what == "embed" and self.embed is None:
      raise ValueError(f"{user}: expected an LMLayout with {what} given, got {self!r}")


def split_model(model: Any) -> tuple[Any, Any]:
  """``(definition, params)`` of a model: Linen ``(module, variables)``, NNX
  ``(graphdef, state)`` or an ``nnx.Module`` (split, not mutated). A definition that
  cannot be hashed comes back wrapped in :class:`Static`.

  Example:
    >>> import flax.linen as nn
    >>> d, p = split_model((nn.Dense(2), {"params": {}}))
    >>> type(d).__name__
    'Dense'
  """
  if isinstance(model, nnx.Module):
    definition, params = nnx.split(model)
    return static(definition), params
  if isinstance(model, tuple) and len(model) == 2:
    definition, params = model
    if isinstance(definition, (nn.Module, nnx.GraphDef)):
      return static(definition), params
  raise ValueError(f"model: expected Linen (module, variables), NNX (graphdef, state) or an "
                   f"nnx.Module, got {type(model).__name__}")


def get_leaf(params: Any, path: tuple) -> Any:
  """The leaf of a parameter tree at a key path (:func:`memedit.get_leaf`)."""
  import memedit
  fn = getattr(memedit, "get_leaf", None)
  if fn is None:
    from memedit.tree import get_leaf as fn
  return fn(params, path)


def replace_leaf(params: Any, path: tuple, value: Any) -> Any:
  """A copy of ``params`` with the leaf at ``path`` replaced (:func:`memedit.replace_leaf`)."""
  import memedit
  fn = getattr(memedit, "replace_leaf", None)
  if fn is None:
    from memedit.tree import replace_leaf as fn
  return fn(params, path, value)


class Static:
  """A model definition that cannot be hashed (e.g. a Linen module holding a list), made
  a static argument of compiled programs by identity: programs are cached per object."""

  __slots__ = ("value",)

  def __init__(self, value):
    self.value = value

  def __hash__(self):
    return id(self.value)

  def __eq__(self, other):
    return isinstance(other, Static) and other.value is self.value


def static(definition: Any) -> Any:
  """``definition`` itself when it can be hashed, else a :class:`Static` holding it
  (:func:`run_lm` accepts both)."""
  try:
    hash(definition)
    return definition
  except TypeError:
    return Static(definition)


# NNX: per original class, a subclass whose __call__ consults the active hooks.
_HOOKED: dict[type, type] = {}
_ACTIVE: list[dict] = []


def _hooked_class(cls: type) -> type:
  if cls not in _HOOKED:
    original = cls.__call__

    def __call__(self, *args, **kwargs):
      out = original(self, *args, **kwargs)
      entry = _ACTIVE[-1].get(id(self)) if _ACTIVE else None
      return out if entry is None else entry(args[0] if args else None, out)

    _HOOKED[cls] = type(cls.__name__, (cls,), {"__call__": __call__,
                                               "__module__": cls.__module__,
                                               "__qualname__": cls.__qualname__})
  return _HOOKED[cls]


def _locate(model, path):
  obj = model
  for part in path:
    try:
      obj = obj[part] if isinstance(part, int) else getattr(obj, part)
    except (AttributeError, IndexError, KeyError, TypeError):
      raise ValueError(f"address {path!r}: expected a submodule path of the model, "
                       f"{part!r} not found") from None
  return obj


def _refuse_lifted(module: nn.Module, variables: Any, path: tuple) -> None:
  """Refuses a Linen module that runs inside a lifted transform that slices its
  parameters (``nn.scan``, ``nn.vmap``): it sees them with other shapes than the model
  stores, and what it returns is the transform's tracer, which cannot be recorded."""
  try:
    stored = variables["params"]
    for part in path:
      stored = stored[part]
  except (KeyError, TypeError, IndexError):
    return
  seen = module.variables.get("params", {})
  shapes = lambda t: [tuple(getattr(a, "shape", ())) for a in jax.tree_util.tree_leaves(t)]
  got, want = shapes(seen), shapes(stored)
  if got != want and len(got) == len(want):
    i = next(j for j, (a, b) in enumerate(zip(got, want)) if a != b)
    raise ValueError(f"address {path!r}: expected a module called once per forward pass "
                     f"with its parameters as stored ({want[i]}), got one that runs inside a "
                     f"lifted transform (nn.scan, nn.vmap) seeing them as {got[i]}: "
                     f"memedit.lm needs blocks called one by one, not a scanned stack")


def run_lm(definition: Any, params: Any, ids: jax.Array, *,
           hooks: Mapping[tuple, Hook] | None = None,
           record: Sequence[tuple] = ()) -> tuple[jax.Array, dict]:
  """One forward pass with module outputs rewritten and recorded (traceable, pure).

  Args:
    definition: Linen module or NNX graphdef (see :func:`split_model`).
    params: Linen variables or NNX state.
    ids: ``(N, T)`` token ids.
    hooks: ``{path: fn(input, output) -> new_output}``: the module at ``path`` returns
      ``fn`` of its first call argument and its output instead of its output.
    record: paths whose ``(input, output)`` (after any hook) are returned.

  Returns:
    ``(logits, records)``: the model's output and ``{path: (input, output)}``.

  Raises:
    ValueError: a hooked or recorded path is never called by the model.

  Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn
    >>> net = nn.Sequential([nn.Dense(3), nn.Dense(2)])
    >>> v = net.init(jax.random.key(0), jnp.ones((1, 4)))
    >>> zero = lambda x, y: jnp.zeros_like(y)
    >>> out, rec = run_lm(net, v, jnp.ones((1, 4)), hooks={("layers_0",): zero},
    ...                   record=[("layers_1",)])
    >>> rec[("layers_1",)][0].tolist(), bool((out == v["params"]["layers_1"]["bias"]).all())
    ([[0.0, 0.0, 0.0]], True)
  """
  if isinstance(definition, Static):
    definition = definition.value
  hooks = {as_path(k): f for k, f in (hooks or {}).items()}
  record = [as_path(p) for p in record]
  targets = set(hooks) | set(record)
  records: dict = {}
  called: set = set()

  def apply(path, x, out):
    called.add(path)
    if not hasattr(out, "shape") or not hasattr(out, "dtype"):
      raise ValueError(f"address {path!r}: expected a module whose output is an array, got "
                       f"{type(out).__name__} (e.g. a scanned stack of blocks, which "
                       f"memedit.lm cannot read one block at a time)")
    if path in hooks:
      out = hooks[path](x, out)
    if path in record:
      records[path] = (x, out)
    return out

  if isinstance(definition, nn.Module):
    def interceptor(next_fun, args, kwargs, ctx):
      out = next_fun(*args, **kwargs)
      if ctx.method_name != "__call__":
        return out
      path = tuple(ctx.module.path)
      if path not in targets:
        return out
      _refuse_lifted(ctx.module, params, path)
      return apply(path, args[0] if args else None, out)

    with nn.intercept_methods(interceptor):
      logits = definition.apply(params, ids)
  else:
    model = nnx.merge(definition, params)
    swapped = []
    table = {}
    try:
      for path in targets:
        obj = _locate(model, path)
        table[id(obj)] = (lambda p: lambda x, out: apply(p, x, out))(path)
        swapped.append((obj, type(obj)))
        object.__setattr__(obj, "__class__", _hooked_class(type(obj)))
      _ACTIVE.append(table)
      try:
        logits = model(ids)
      finally:
        _ACTIVE.pop()
    finally:
      for obj, cls in swapped:
        object.__setattr__(obj, "__class__", cls)
  missing = sorted((p for p in targets if p not in called), key=str)
  if missing:
    raise ValueError(f"hooks, record: expected modules the model calls, but {missing} "
                     f"were not called (check the addresses; a module inside a scanned "
                     f"stack of blocks, nn.scan or nnx.scan, cannot be hooked: memedit.lm "
                     f"needs blocks called one by one)")
  return logits, records
