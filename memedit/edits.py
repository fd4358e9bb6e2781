"""Edits as values: the factors (Λ, D) of W1 = W0 + ΔK(Λ, D) and where they apply.

An :class:`Edit` is a pytree (its leaves are Λ and D) with static metadata: the path of the
kernel leaf it applies to, the kernel layout, and how it was made. Applying edits goes
through an :class:`EditHistory`, which remembers the base value of every leaf it touched
(the leaf before its first edit), so that

- an edited leaf is always recomputed as ``base + Σ ΔK`` over the edits active on it,
  summed in a canonical order (by name): applying the same set of edits in any order gives
  the same bits;
- reverting an edit recomputes the leaf from the base without it; reverting all edits on a
  leaf restores the base bit for bit;
- a change made to an edited leaf between two edits (e.g. fine-tuning the layer after
  applying one edit) is kept. The history holds a fingerprint of every leaf as it last
  wrote it (two 32-bit hashes of its bits, computed alike eagerly and under ``jax.jit``);
  when the leaf no longer matches it, the entries that differ from ``base + Σ ΔK`` move
  the base by the difference (rounded once, in the accumulation dtype). The edits applied
  after the change, and the reverts, then follow the rules above from the moved base;
  reverting every edit gives the changed leaf without the edits. Without such changes the
  base is the original leaf and its bits come back exactly. A change of the leaf's shape
  or dtype is refused with an error naming the leaf.

The base is the original leaf itself, not a copy, when it is a ``jax.Array`` (immutable;
a numpy leaf, which the caller may write into later, is copied): an :class:`EditHistory`
refers to the params :func:`apply_edit` was given. Donating them
(``jax.jit(..., donate_argnums=...)`` on the original params, or on the history) deletes
the base, and reverting or editing that leaf again is refused with an error that says so;
keep a copy of the original params (``jax.tree.map(jnp.copy, params)``) or do not donate
them while a history refers to them.

Paths address leaves of a parameter pytree (a Linen variables dict, an ``nnx.State``, any
nested dicts/lists) by their keys, e.g. ``('params', 'Dense_0', 'kernel')`` or
``('blocks', 1, 'fc1', 'kernel')``; NNX's trailing ``.value`` is implied (see
:mod:`memedit.tree`).

On disk (:func:`save_edit`) an edit is an orbax tree ``{"lam": Λ, "directions": D}`` and a
JSON ``meta.json`` (format ``"memedit-edit"``, version 1: name, path, kind, in_ndim,
method, settings, the shapes and, for a stacked leaf, index).

The :class:`Edit` value itself (with :func:`make_edit` and :func:`edit_delta`) is defined
in :mod:`memedit.edit_value` and the file format (:func:`save_edit`, :func:`load_edit`) in
:mod:`memedit.edit_files`; both are re-exported here.
"""

from __future__ import annotations

from typing import Any, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from memedit.checks import as_array, check_finite, explicit_sharding
from memedit.edit_files import load_edit, save_edit
from memedit.edit_value import NAN_FACTORS, Edit, edit_delta, make_edit
from memedit.tree import get_leaf, replace_leaf

__all__ = ["Edit", "EditHistory", "apply_edit", "apply_edits", "edit_delta", "load_edit",
           "make_edit", "revert_edit", "save_edit"]


@jax.tree_util.register_pytree_node_class
class EditHistory:
  """The base leaves touched by edits and the edits currently applied.

  Attributes:
    originals: dict path → base leaf: the leaf before its first active edit (the caller's
      jax.Array itself, not a copy: do not donate it, see the module docstring; a copy of
      a numpy leaf), moved by any change made to the leaf between edits.
    edits: tuple of applied :class:`Edit`, in application order.
    fingerprints: dict path → (2,) uint32 fingerprint of the leaf as the history last
      wrote it; a path without one (a history built by hand) is taken as unchanged.

  Example:
    >>> import jax.numpy as jnp, memedit
    >>> e = memedit.make_edit(("k",), jnp.ones((2, 1)), jnp.ones((1, 3)), label="a")
    >>> _, history = memedit.apply_edit({"k": jnp.zeros((3, 2))}, e)
    >>> history.names, list(history.originals)
    (('a',), [('k',)])
  """

  def __init__(self, originals: dict | None = None, edits: Iterable[Edit] = (),
               fingerprints: dict | None = None):
    self.originals = dict(originals or {})
    self.edits = tuple(edits)
    self.fingerprints = {p: v for p, v in (fingerprints or {}).items()
                         if p in self.originals and v is not None}

  def tree_flatten(self):
    paths = tuple(self.originals)
    return (tuple(self.originals[p] for p in paths), self.edits,
            tuple(self.fingerprints.get(p) for p in paths)), paths

  @classmethod
  def tree_unflatten(cls, paths, children):
    leaves, edits, prints = children
    return cls(dict(zip(paths, leaves)), edits, dict(zip(paths, prints)))

  @property
  def names(self) -> tuple:
    return tuple(e.name for e in self.edits)

  def __repr__(self):
    return f"EditHistory(edits={list(self.names)}, leaves={list(self.originals)})"


def _acc_dtype(leaf):
  return jnp.promote_types(jnp.result_type(leaf), jnp.float32)


def _recompute(original, edits):
  if not edits:
    return original
  acc = jnp.asarray(original, _acc_dtype(original))
  for e in sorted(edits, key=lambda e: e.name):
    acc = acc + edit_delta(e, np.shape(original))
  return acc.astype(jnp.result_type(original))


def _bits(x):
  x = jnp.asarray(x)
  if jnp.issubdtype(x.dtype, jnp.floating):
    return jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{8 * x.dtype.itemsize}"))
  return x


@jax.jit
def _fingerprint(x) -> jax.Array:
  """Two 32-bit hashes of ``x``'s bits and positions (exact integer arithmetic, so the
  same eagerly and under jit)."""
  b = _bits(x)
  if b.dtype.itemsize == 8:
    b = b ^ (b >> 32)
  b = b.astype(jnp.uint32)
  # Row-major positions (mod 2^32) built per axis rather than by flattening: a leaf sharded
  # over a mesh with explicit axes cannot be flattened without gathering it.
  sharding = explicit_sharding(b)
  i = jnp.zeros((), jnp.uint32)
  stride = 1
  for axis in reversed(range(b.ndim)):
    i = i + jax.lax.broadcasted_iota(jnp.uint32, b.shape, axis, out_sharding=sharding
                                     ) * jnp.uint32(stride % 2**32)
    stride *= b.shape[axis]
  i = jnp.broadcast_to(i, b.shape)
  h = (b + i * jnp.uint32(0x9E3779B9)) * jnp.uint32(0x85EBCA6B)
  h = (h ^ (h >> 13)) * jnp.uint32(0xC2B2AE35)
  h = h ^ (h >> 16)
  g = (h ^ (i * jnp.uint32(0x27D4EB2F))) * jnp.uint32(0x165667B1)
  g = g ^ (g >> 15)
  return jnp.stack([jnp.sum(h, dtype=jnp.uint32), jnp.sum(g, dtype=jnp.uint32)])


_DONATED = ("deleted or donated (a jax.Array passed to a function jitted with "
            "donate_argnums, or .delete())")


def _is_deleted(x) -> bool:
  """Whether ``x`` is a concrete jax.Array whose buffer was deleted or donated."""
  return (isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer)
          and x.is_deleted())


def _check_leaf_alive(params, path):
  """Refuses a params leaf at ``path`` whose buffer was deleted or donated."""
  if _is_deleted(get_leaf(params, path)):
    raise ValueError(f"params: the leaf at {path!r} has been {_DONATED}; pass the params the "
                     f"donating function returned, or a copy kept before donating")


def _check_edit_alive(edit):
  """Refuses an edit whose factors Λ or D were deleted or donated."""
  if any(_is_deleted(x) for x in (edit.lam, edit.D)):
    raise ValueError(f"edit: the factors (lam, D) of the edit at {edit.path!r} were "
                     f"{_DONATED}; keep a copy of the edit (e.g. jax.tree.map(jnp.copy, "
                     f"edit)) or do not donate it")


def _check_history_alive(params, history, path):
  """Refuses a history (or params, or an edit on ``path``) whose buffers were deleted or
  donated, before anything is recomputed from them."""
  if _is_deleted(history.originals[path]) or _is_deleted(history.fingerprints.get(path)):
    raise ValueError(
        f"history: the base leaf kept for {path!r} (the leaf before its first edit, from "
        f"which reverts and later edits recompute it) has been {_DONATED}. An EditHistory "
        f"refers to the params apply_edit was given, without copying them: keep a copy of "
        f"those params (e.g. jax.tree.map(jnp.copy, params) before apply_edit) or do not "
        f"donate them, nor the history itself")
  _check_leaf_alive(params, path)
  for e in history.edits:
    if e.path == path:
      _check_edit_alive(e)


def _current_base(params, history, path):
  """The base of the edited leaf at ``path``, moved by any change made to the leaf since
  the history last wrote it (the entries whose bits differ from base + Σ ΔK)."""
  _check_history_alive(params, history, path)
  base = history.originals[path]
  leaf = as_array(get_leaf(params, path), f"params at {path!r}")
  if (tuple(np.shape(leaf)) != tuple(np.shape(base))
      or jnp.result_type(leaf) != jnp.result_type(base)):
    raise ValueError(
        f"params: expected the edited leaf at {path!r} to keep its shape "
        f"{tuple(np.shape(base))} and dtype {jnp.result_type(base)}, got shape "
        f"{tuple(np.shape(leaf))} and dtype {jnp.result_type(leaf)}; revert the edits "
        f"before changing the leaf's shape or dtype")
  written = history.fingerprints.get(path)
  if written is None:
    return base
  # The fingerprint, not base + Σ ΔK recomputed here, decides whether the leaf changed:
  # a recomputation may round differently eagerly and under jit.
  changed = jnp.any(_fingerprint(leaf) != written)
  if not isinstance(changed, jax.core.Tracer) and not bool(changed):
    return base
  expected = _recompute(base, [e for e in history.edits if e.path == path])
  dt = _acc_dtype(base)
  moved = (jnp.asarray(base, dt) + (jnp.asarray(leaf, dt) - jnp.asarray(expected, dt))
           ).astype(jnp.result_type(base))
  keep = jnp.logical_or(jnp.logical_not(changed), _bits(leaf) == _bits(expected))
  return jnp.where(keep, base, moved)


def apply_edit(params: Any, edit: Edit, history: EditHistory | None = None
               ) -> tuple[Any, EditHistory]:
  """Applies ``edit`` to ``params``: the leaf at ``edit.path`` becomes K0 + Σ ΔK.

  K0 is the leaf before its first edit; a change made to the leaf since the history last
  wrote it (e.g. fine-tuning between two edits) is kept in K0 (see the module docstring).

  Args:
    params: parameter pytree (not mutated).
    edit: the :class:`Edit`.
    history: the :class:`EditHistory` of earlier applications to these params (None for
      fresh params).

  Returns:
    ``(new_params, new_history)``. The history keeps the leaf of ``params`` at
    ``edit.path`` as its base: a ``jax.Array`` itself (do not donate ``params`` while the
    history is in use), a numpy array as a copy.

  Raises:
    ValueError: an edit already applied; a leaf that is not floating-point or whose
      shape does not fit the edit; non-finite factors; a params leaf, a base leaf of the
      history or an edit's factors that were deleted or donated.

  Example:
    >>> import jax.numpy as jnp, memedit
    >>> params = {"kernel": jnp.zeros((3, 2))}
    >>> e = memedit.make_edit(("kernel",), jnp.ones((2, 1)), jnp.array([[1.0, 0, 0]]))
    >>> new, hist = memedit.apply_edit(params, e)
    >>> old, _ = memedit.revert_edit(new, e, hist)
    >>> bool((old["kernel"] == params["kernel"]).all())
    True
  """
  if not isinstance(edit, Edit):
    raise ValueError(f"edit: expected an Edit, got {type(edit).__name__}")
  return _apply(params, (edit,), history, named=False)


def apply_edits(params: Any, edits: Iterable[Edit], history: EditHistory | None = None
                ) -> tuple[Any, EditHistory]:
  """Applies several edits: the parameters and history that :func:`apply_edit` of each in
  turn gives, bit for bit, with each edited leaf's sum K0 + Σ ΔK computed once (time
  linear in the number of edits, where edits applied one by one recompute a leaf at
  every edit on it).

  Args:
    params: parameter pytree (not mutated).
    edits: the :class:`Edit` values, in application order.
    history: the :class:`EditHistory` of earlier applications (None for fresh params).

  Returns:
    ``(new_params, new_history)``.

  Raises:
    ValueError: as :func:`apply_edit`, the message naming the edit (its position and
      name); nothing is applied.

  Example:
    >>> import jax.numpy as jnp, memedit
    >>> es = [memedit.make_edit(("k",), jnp.ones((2, 1)), jnp.eye(3)[i:i + 1], label=f"e{i}")
    ...       for i in range(3)]
    >>> new, hist = memedit.apply_edits({"k": jnp.zeros((3, 2))}, es)
    >>> new["k"].sum(), hist.names
    (Array(6., dtype=float32), ('e0', 'e1', 'e2'))
  """
  edits = tuple(edits)
  for i, edit in enumerate(edits):
    if not isinstance(edit, Edit):
      raise ValueError(f"edits[{i}]: expected an Edit, got {type(edit).__name__}")
  return _apply(params, edits, history, named=True)


def _apply(params, edits: tuple, history, *, named: bool):
  history = history or EditHistory()
  names = set(history.names)
  originals = dict(history.originals)
  based = set()
  for i, edit in enumerate(edits):
    try:
      if edit.name in names:
        raise ValueError(f"edit: {edit.name!r} is already applied")
      names.add(edit.name)
      _check_edit_alive(edit)
      if edit.path not in based:
        _check_leaf_alive(params, edit.path)
        # A numpy leaf in non-native byte order is taken as a native copy (the base kept).
        leaf = as_array(get_leaf(params, edit.path), f"params at {edit.path!r}")
        if not jnp.issubdtype(jnp.result_type(leaf), jnp.inexact):
          raise ValueError(f"params: expected a floating-point kernel at {edit.path!r}, got "
                           f"{jnp.result_type(leaf)} (an edit cannot be written into "
                           f"integers)")
        # A numpy leaf is kept as a copy: the caller may write into their array later,
        # and reverts must restore it as it was.
        originals[edit.path] = (_current_base(params, history, edit.path)
                                if edit.path in history.originals
                                else np.array(leaf) if isinstance(leaf, np.ndarray) else leaf)
        based.add(edit.path)
      check_finite(edit.lam, "lam", NAN_FACTORS)
      check_finite(edit.D, "D", NAN_FACTORS)
      edit_delta(edit, np.shape(originals[edit.path]))  # validates shapes before changes
    except ValueError as e:
      if not named:
        raise
      try:
        which = repr(edit.name)
      except ValueError:  # an unlabelled edit with traced factors
        which = "an edit with traced factors"
      raise ValueError(f"edits[{i}] ({which}, at {edit.path!r}): {e}") from None
  applied = history.edits + edits
  prints = dict(history.fingerprints)
  for path in dict.fromkeys(e.path for e in edits):
    new_leaf = _recompute(originals[path], [e for e in applied if e.path == path])
    params = replace_leaf(params, path, new_leaf)
    prints[path] = _fingerprint(new_leaf)
  return params, EditHistory(originals, applied, prints)


def revert_edit(params: Any, edit: Edit | str, history: EditHistory
                ) -> tuple[Any, EditHistory]:
  """Removes one applied edit (by value or name), in any order, exactly.

  The leaf is recomputed from its base without the reverted edit; when no edit on it
  remains it is the base, bit for bit: the original leaf, or, when the leaf was changed
  between edits, the changed leaf without the edits (see the module docstring).

  Args:
    params: parameters returned by :func:`apply_edit`.
    edit: the applied :class:`Edit` or its name.
    history: the :class:`EditHistory` returned with ``params``.

  Returns:
    ``(new_params, new_history)``.

  Raises:
    ValueError: an edit that is not applied; the edited leaf's shape or dtype changed;
      the history's base leaf (the original params' leaf, when those were donated to a
      jitted function), the current leaf or an edit's factors deleted or donated: keep a
      copy of the params the history refers to, or do not donate them.

  Example:
    >>> import jax.numpy as jnp, memedit
    >>> p = {"k": jnp.arange(3.0)}
    >>> e = memedit.make_edit(("k",), jnp.ones((1, 1)), jnp.ones((1, 3)), kind="matrix")
    >>> q, h = memedit.apply_edit({"k": p["k"][None]}, e)
    >>> r, h = memedit.revert_edit(q, e.name, h)
    >>> r["k"]
    Array([[0., 1., 2.]], dtype=float32)
  """
  name = edit.name if isinstance(edit, Edit) else edit
  if history is None or name not in history.names:
    applied = list(history.names) if history is not None else []
    raise ValueError(f"edit: expected one of the applied edits {applied}, got {name!r}")
  target = next(e for e in history.edits if e.name == name)
  edits = tuple(e for e in history.edits if e.name != name)
  originals = dict(history.originals)
  remaining = [e for e in edits if e.path == target.path]
  originals[target.path] = _current_base(params, history, target.path)
  new_leaf = _recompute(originals[target.path], remaining)
  prints = {**history.fingerprints, target.path: _fingerprint(new_leaf)}
  if not remaining:
    del originals[target.path]
  return replace_leaf(params, target.path, new_leaf), EditHistory(originals, edits, prints)
