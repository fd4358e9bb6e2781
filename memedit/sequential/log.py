"""An edit log: the ordered edits of a model with the keys and values each one wrote.

An :class:`EditLog` is a value (a frozen pytree): every operation returns a new log. Each
:class:`LogEntry` holds an :class:`memedit.Edit` (its factors Λ, D and settings), the keys
K* (n, d) whose values it set, optional key weights (n,) (e.g. mask weights), the target
values V* it was solved for (any array, or None), and whether it is active. A log holds
factors and keys, never the model's weights; it is saved as one small ``.npz`` file
(:func:`memedit.sequential.save_log`).

Applying. ``log_apply(params, log)`` applies the active entries to the unedited ``params``
through :func:`memedit.apply_edits` (the bits of :func:`memedit.apply_edit` of each in
turn, each leaf's sum computed once: time linear in the log's length), so every edited
leaf is

    K = K0 + Σ_{active j on the leaf} ΔK_j,

accumulated in float32 (float64 for float64 leaves) in the canonical order of
:func:`memedit.apply_edit` (by edit name) and rounded once to the leaf's dtype.

What "bit-exact" means. Because that sum does not depend on the order or history of the
applications, for a log of n entries:

- revert: ``log_apply(params, log_revert(log, i))`` has the same bits as applying a log
  that never held entry i, and as ``memedit.revert_edit`` of edit i on the params with
  all n applied (leaves no edit touches are the caller's own arrays);
- replay: ``log_replay(log_revert(log, i), i)`` applies to the same bits as ``log``;
- reverting every entry on a leaf gives the original leaf bit for bit;
- the order of the entries does not change the bits.

These hold when edits commute additively, which ``K0 + Σ ΔK`` makes true by construction:
reverting edit i removes exactly its ΔK_i and keeps every other edit's factors as they
were solved. Edits solved after i were solved on a model that contained ΔK_i; reverting
i does not re-solve them, so "as if edit i had never been applied" means the additive
model without ΔK_i, not the model a sequence without edit i would have produced.
Eager and jitted applications each give these bits; the two modes may round differently.

Saving and loading: :mod:`memedit.sequential.logfile`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from memedit.checks import as_array, is_traced
from memedit.edits import Edit, EditHistory, apply_edits
from memedit.tree import check_path

__all__ = ["EditLog", "LogEntry", "log_append", "log_apply", "log_entry", "log_history",
           "log_init", "log_keys", "log_replay", "log_revert"]


@dataclasses.dataclass(frozen=True, eq=False)
class LogEntry:
  """One edit of an :class:`EditLog` with what it wrote.

  Attributes:
    edit: the :class:`memedit.Edit` (Λ, D, path, layout, settings).
    keys: (n, d) float32, the keys K* whose values the edit set (d = the edit's key
      dimension, ``edit.D.shape[1]``).
    values: the target values V* the edit was solved for (float32, any shape: (n, out)
      for a linear memory, a target value map for a convolution), or None.
    weights: (n,) non-negative float32 weights of the keys (e.g. a mask), or None for
      weight 1.
    active: whether :func:`log_apply` applies the edit.

  Example:
    >>> import jax.numpy as jnp, memedit
    >>> from memedit.sequential import log_append, log_init
    >>> e = memedit.make_edit(("k",), jnp.ones((2, 1)), jnp.ones((1, 3)), label="a")
    >>> entry = log_append(log_init(), e, jnp.ones((4, 3))).entries[0]
    >>> entry.keys.shape, entry.active
    ((4, 3), True)
  """

  edit: Edit
  keys: Any
  values: Any = None
  weights: Any = None
  active: bool = True

  @property
  def name(self) -> str:
    """The edit's name."""
    return self.edit.name


jax.tree_util.register_pytree_node(
    LogEntry,
    lambda e: ((e.edit, e.keys, e.values, e.weights), (e.active,)),
    lambda aux, ch: LogEntry(*ch, *aux))


@dataclasses.dataclass(frozen=True, eq=False)
class EditLog:
  """The ordered entries of a model's edit log (a frozen pytree).

  Attributes:
    entries: tuple of :class:`LogEntry`, in the order the edits were made.

  Example:
    >>> from memedit.sequential import log_init
    >>> log = log_init()
    >>> len(log), log.names
    (0, ())
  """

  entries: tuple = ()

  def __len__(self) -> int:
    return len(self.entries)

  @property
  def names(self) -> tuple:
    """The entries' edit names, in order."""
    return tuple(e.name for e in self.entries)

  @property
  def active(self) -> tuple:
    """The names of the active entries, in order."""
    return tuple(e.name for e in self.entries if e.active)

  def __repr__(self):
    marks = [n if e.active else f"({n})" for n, e in zip(self.names, self.entries)]
    return f"EditLog({marks})"


jax.tree_util.register_pytree_node(
    EditLog, lambda log: (log.entries, None), lambda _, ch: EditLog(tuple(ch)))


def log_init() -> EditLog:
  """An empty :class:`EditLog`.

  Returns:
    The log with no entries.

  Example:
    >>> from memedit.sequential import log_init
    >>> len(log_init())
    0
  """
  return EditLog()


def _float_array(x, name):
  """``x`` as float32, checked: a traced value as a jnp array, any other on the host (a
  numpy array), so that checking the arrays of an edit with a new number of keys
  compiles no program."""
  try:  # as_array names the argument; numpy's own errors (ragged lists…) do not
    a = as_array(x, name)
    a = jnp.asarray(a) if is_traced(a) else np.asarray(a)
  except (TypeError, ValueError) as e:
    if str(e).startswith(f"{name}:"):
      raise
    raise ValueError(f"{name}: expected a numeric array, got {type(x).__name__} {x!r:.80}"
                     ) from None
  if not jnp.issubdtype(a.dtype, jnp.floating) and not jnp.issubdtype(a.dtype, jnp.integer):
    raise ValueError(f"{name}: expected a numeric array, got dtype {a.dtype}")
  if isinstance(a, jax.core.Tracer):
    return a.astype(jnp.float32)
  a = a.astype(np.float32)
  if not np.all(np.isfinite(a)):
    raise ValueError(f"{name}: expected finite values, got NaN or inf")
  return a


def _to_device(a):
  return a if a is None or isinstance(a, jax.core.Tracer) else jax.device_put(a)


def log_append(log: EditLog, edit: Edit, keys: Any, values: Any = None, *,
               weights: Any = None) -> EditLog:
  """A new log with ``edit`` appended (active), with the keys and values it wrote.

  Args:
    log: the :class:`EditLog`.
    edit: the :class:`memedit.Edit`; its name must be new to the log.
    keys: (n, d) keys K* (d = ``edit.D.shape[1]``); a key map (..., d) is flattened.
    values: the target values V* (any shape), or None.
    weights: (n,) (or the key map's leading shape) non-negative key weights, or None.

  Returns:
    The new :class:`EditLog`.

  Raises:
    ValueError: not an Edit, a name already in the log, an edit whose key dimension
      differs from that of the log's entries on the same leaf (and layer), keys of the
      wrong key dimension, weights of the wrong shape or negative, non-finite keys,
      values or weights.

  Example:
    >>> import jax.numpy as jnp, memedit
    >>> from memedit.sequential import log_append, log_init
    >>> e = memedit.make_edit(("k",), jnp.ones((2, 1)), jnp.ones((1, 3)), label="a")
    >>> log_append(log_init(), e, jnp.eye(3), jnp.zeros((3, 2))).names
    ('a',)
  """
  check_log(log)
  if not isinstance(edit, Edit):
    raise ValueError(f"edit: expected an Edit, got {type(edit).__name__}")
  if edit.name in log.names:
    raise ValueError(f"edit: expected a name new to the log, got {edit.name!r}, already "
                     f"entry {log.names.index(edit.name)}")
  d = int(np.shape(edit.D)[1])
  keys = _float_array(keys, "keys")
  if keys.ndim < 1 or keys.shape[-1] != d:
    raise ValueError(f"keys: expected shape (n, {d}) (the edit's key dimension), got "
                     f"{tuple(keys.shape)}")
  _check_leaf_dim(log, edit, d)
  lead = tuple(keys.shape[:-1])
  keys = keys.reshape(-1, d)
  if weights is not None:
    weights = _float_array(weights, "weights")
    if tuple(weights.shape) not in (lead, (keys.shape[0],)):
      raise ValueError(f"weights: expected shape {lead} (one per key), got "
                       f"{tuple(weights.shape)}")
    weights = weights.reshape(-1)
    if not isinstance(weights, jax.core.Tracer) and bool(np.any(weights < 0)):
      raise ValueError("weights: expected non-negative weights, got a negative one")
  if values is not None:
    values = _float_array(values, "values")
  keys, values, weights = (_to_device(a) for a in (keys, values, weights))
  return EditLog(log.entries + (LogEntry(edit, keys, values, weights, True),))


def _check_leaf_dim(log: EditLog, edit: Edit, d: int) -> None:
  """Refuses an edit whose key dimension ``d`` differs from that of the log's entries
  (active or reverted) on the same leaf and layer: their keys could not be preserved
  together, nor their changes compared."""
  for i, entry in enumerate(log.entries):
    e = entry.edit
    if e.path != edit.path or e.index != edit.index:
      continue
    have = int(np.shape(entry.keys)[-1])
    if have != d:
      where = f"{edit.path!r}" if edit.index is None else f"{edit.path!r}[{edit.index}]"
      raise ValueError(f"edit: expected key dimension {have} on the leaf {where} (that of "
                       f"the log's entry {i}, {e.name!r}), got {edit.name!r} with key "
                       f"dimension {d}; is the edit of another model or layer?")


def check_log(log) -> None:
  """Raises a ValueError unless ``log`` is an :class:`EditLog` (shared by the package)."""
  if not isinstance(log, EditLog):
    raise ValueError(f"log: expected an EditLog, got {type(log).__name__}")


def _position(log: EditLog, which) -> int:
  check_log(log)
  if isinstance(which, Edit):
    i = _position(log, which.name)
    prints = (_fingerprint_or_none(log.entries[i].edit), _fingerprint_or_none(which))
    if None not in prints and prints[0] != prints[1]:
      raise ValueError(f"edit: expected the log's edit {which.name!r} (fingerprint "
                       f"{prints[0]}), got another edit of that name (fingerprint "
                       f"{prints[1]}); pass its name or position to address the log's entry")
    return i
  if isinstance(which, str):
    if which not in log.names:
      raise ValueError(f"edit: expected one of the log's edits {list(log.names)}, got "
                       f"{which!r}")
    return log.names.index(which)
  if isinstance(which, (int, np.integer)) and not isinstance(which, bool):
    if not -len(log) <= which < len(log):
      if not log.entries:
        raise ValueError(f"edit: expected an entry of the log, got entry number {which} of "
                         f"an empty log")
      raise ValueError(f"edit: expected an entry number in [{-len(log)}, {len(log)}) "
                       f"(negative numbers count from the end), got {which}")
    return int(which) % len(log)
  raise ValueError(f"edit: expected an entry number, a name or an Edit, got {which!r}")


def _fingerprint_or_none(edit: Edit) -> str | None:
  try:
    return edit.fingerprint
  except ValueError:  # traced factors: compared by name alone
    return None


def log_entry(log: EditLog, which: int | str | Edit) -> LogEntry:
  """The entry at position ``which`` (negative counts from the end), or of that name.

  Args:
    log: the :class:`EditLog`.
    which: an entry number (negative counts from the end), an edit name or an
      :class:`memedit.Edit`.

  Returns:
    The :class:`LogEntry`.

  Example:
    >>> import jax.numpy as jnp, memedit
    >>> from memedit.sequential import log_append, log_entry, log_init
    >>> e = memedit.make_edit(("k",), jnp.ones((2, 1)), jnp.ones((1, 3)), label="a")
    >>> log_entry(log_append(log_init(), e, jnp.eye(3)), "a").keys.shape
    (3, 3)
  """
  i = _position(log, which)
  return log.entries[i]


def _set_active(log, which, active):
  i = _position(log, which)
  entry = log.entries[i]
  if entry.active == active:
    raise ValueError(f"edit: expected {'a reverted' if active else 'an active'} entry, got "
                     f"{entry.name!r}, which is {'active' if active else 'reverted'}")
  entries = list(log.entries)
  entries[i] = dataclasses.replace(entry, active=active)
  return EditLog(tuple(entries))


def log_revert(log: EditLog, which: int | str | Edit) -> EditLog:
  """A new log with entry ``which`` reverted (kept, inactive, so it can be replayed).

  Args:
    log: the :class:`EditLog`.
    which: an entry number (negative numbers count from the end, as Python's indices
      do: -1 is the last entry), an edit name or an :class:`memedit.Edit` (the log's
      own: an edit of the same name with other content is refused).

  Returns:
    The new :class:`EditLog`; :func:`log_apply` leaves the edit out (see the module
    docstring for what that restores bit for bit).

  Raises:
    ValueError: an unknown entry (a name not in the log, a number outside [-n, n) for n
      entries), an Edit whose content differs from the log's edit of that name, or one
      already reverted.

  Example:
    >>> import jax.numpy as jnp, memedit
    >>> from memedit.sequential import log_append, log_apply, log_init, log_revert
    >>> e = memedit.make_edit(("k",), jnp.ones((2, 1)), jnp.ones((1, 3)), label="a")
    >>> log = log_append(log_init(), e, jnp.eye(3))
    >>> params = {"k": jnp.zeros((3, 2))}
    >>> bool((log_apply(params, log_revert(log, 0))["k"] == 0).all())
    True
  """
  return _set_active(log, which, False)


def log_replay(log: EditLog, which: int | str | Edit) -> EditLog:
  """A new log with the reverted entry ``which`` active again.

  Args:
    log: the :class:`EditLog`.
    which: an entry number (negative counts from the end), an edit name or an
      :class:`memedit.Edit`.

  Returns:
    The new :class:`EditLog`; it applies to the same bits as before the revert.

  Raises:
    ValueError: an unknown entry (a name not in the log, a number outside [-n, n) for n
      entries), or one that is active.

  Example:
    >>> import jax.numpy as jnp, memedit
    >>> from memedit.sequential import log_append, log_init, log_replay, log_revert
    >>> e = memedit.make_edit(("k",), jnp.ones((2, 1)), jnp.ones((1, 3)), label="a")
    >>> log = log_append(log_init(), e, jnp.eye(3))
    >>> log_replay(log_revert(log, "a"), "a").active
    ('a',)
  """
  return _set_active(log, which, True)


def log_history(params: Any, log: EditLog) -> tuple[Any, EditHistory]:
  """The active entries applied to the unedited ``params``, with the edit history.

  Args:
    params: the unedited parameter pytree (not mutated).
    log: the :class:`EditLog`.

  Returns:
    ``(edited_params, history)``: the :class:`memedit.EditHistory` lets
    :func:`memedit.revert_edit` and :func:`memedit.apply_edit` continue from there.

  Example:
    >>> import jax.numpy as jnp, memedit
    >>> from memedit.sequential import log_append, log_history, log_init
    >>> e = memedit.make_edit(("k",), jnp.ones((2, 1)), jnp.ones((1, 3)), label="a")
    >>> _, hist = log_history({"k": jnp.zeros((3, 2))}, log_append(log_init(), e, jnp.eye(3)))
    >>> hist.names
    ('a',)
  """
  check_log(log)
  try:  # each leaf's sum computed once: time linear in the log's length
    return apply_edits(params, [e.edit for e in log.entries if e.active])
  except ValueError as e:
    raise ValueError(f"params: expected parameters the log's edits fit, got {e}; is the "
                     f"log of another model?") from None


def log_apply(params: Any, log: EditLog) -> Any:
  """The active entries applied to the unedited ``params``: each edited leaf becomes
  K0 + Σ ΔK over its active edits (see the module docstring for the bits).

  Args:
    params: the unedited parameter pytree (not mutated).
    log: the :class:`EditLog`.

  Returns:
    The edited parameters.

  Example:
    >>> import jax.numpy as jnp, memedit
    >>> from memedit.sequential import log_append, log_apply, log_init
    >>> e = memedit.make_edit(("k",), jnp.ones((2, 1)), jnp.array([[1.0, 0, 0]]), label="a")
    >>> log_apply({"k": jnp.zeros((3, 2))}, log_append(log_init(), e, jnp.eye(3)))["k"][0]
    Array([1., 1.], dtype=float32)
  """
  return log_history(params, log)[0]


def log_keys(log: EditLog, path: Any, *, index: int | None = None, before: int | None = None,
             active_only: bool = True) -> tuple[jax.Array, jax.Array]:
  """The keys (with weights) of the log's entries that edit the leaf at ``path``.

  These are the keys an edit of that leaf should preserve (:func:`null_space`).

  Args:
    log: the :class:`EditLog`.
    path: the leaf's path. index: the layer of a stacked leaf (as ``Edit.index``).
    before: only entries at positions below this (None: all).
    active_only: skip reverted entries.

  Returns:
    ``(keys (m, d), weights (m,))``, float32, stacked in log order; with no entry on
    the leaf, shapes (0, 0) and (0,).

  Example:
    >>> import jax.numpy as jnp, memedit
    >>> from memedit.sequential import log_append, log_init, log_keys
    >>> e = memedit.make_edit(("k",), jnp.ones((2, 1)), jnp.ones((1, 3)), label="a")
    >>> k, w = log_keys(log_append(log_init(), e, jnp.eye(3)), ("k",))
    >>> k.shape, w.tolist()
    ((3, 3), [1.0, 1.0, 1.0])
  """
  check_log(log)
  path = check_path(path)
  if before is not None and (isinstance(before, bool)
                             or not isinstance(before, (int, np.integer))):
    raise ValueError(f"before: expected None or an int (an entry number), got {before!r}")
  stop = len(log) if before is None else max(0, min(int(before), len(log)))
  keys, weights = [], []
  for entry in log.entries[:stop]:
    e = entry.edit
    if e.path != path or e.index != index or (active_only and not entry.active):
      continue
    keys.append(entry.keys)
    weights.append(np.ones(entry.keys.shape[:1], np.float32) if entry.weights is None
                   else entry.weights)
  if not keys:
    return jnp.zeros((0, 0), jnp.float32), jnp.zeros((0,), jnp.float32)
  dims = {int(k.shape[1]) for k in keys}
  if len(dims) > 1:
    raise ValueError(f"log: expected the entries on {path!r} to share a key dimension, got "
                     f"{sorted(dims)}")
  if any(isinstance(x, jax.core.Tracer) for x in keys + weights):
    return jnp.concatenate(keys), jnp.concatenate(weights)
  # Stacked on the host: a log that grows by an edit at a time would otherwise compile a
  # concatenation for every new number of entries.
  return (jax.device_put(np.concatenate([np.asarray(k) for k in keys])),
          jax.device_put(np.concatenate([np.asarray(w) for w in weights])))
