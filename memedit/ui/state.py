"""The state of one rewriting session as a value, and the pure operations on it.

A :class:`State` holds what a person has marked and made in the browser: the layer being
edited, the copied region, the paste target, the context tray, and the edits made so far
with the parameters they give. Every operation returns a new :class:`State` and leaves
its argument as it was, so the server can compute a new state outside its lock and
publish it in one assignment, and an operation that fails changes nothing.

Edits are kept in the order they were made; each is *active* (applied to the parameters)
or not. The parameters are always the original ones plus the active edits, applied
through a :class:`memedit.EditHistory`: an edited leaf is recomputed as base + Σ ΔK in a
canonical order, so switching edits on and off in any order gives the same bits for the
same active set, and with none active the original bits come back.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from memedit.edits import Edit, EditHistory, apply_edit, revert_edit
from memedit.specs import MAX_IMAGES, shown

__all__ = ["EditRecord", "Region", "State", "active_key", "add_context", "add_edit",
           "drop_edit", "find_edit", "make_region", "new_state", "remove_context",
           "revert_all", "set_active", "with_copy", "with_layer", "with_paste"]


@dataclasses.dataclass(frozen=True, eq=False)
class Region:
  """A painted region of one image.

  Attributes:
    imgnum: the image number (row of the deterministic latent sample).
    mask: uint8 (R, R) mask at canvas resolution, 0 where not painted.
  """

  imgnum: int
  mask: np.ndarray


@dataclasses.dataclass(frozen=True, eq=False)
class EditRecord:
  """One edit made in the session.

  Attributes:
    id: the session's name for it ("e1", "e2", ...).
    kind: "insert", "erase" or "overfit".
    layer: the layer it changes.
    edit: the :class:`memedit.Edit` (factors Λ, D and provenance).
    spec: the :class:`memedit.specs.EditSpec` it was made from (None for the overfit
      baseline, which has no spec in the reference's format).
    directions: (r, C_in) the context subspace its matches are measured with (the
      tray's directions for the overfit baseline; None when the tray was empty).
    target_value: (C_out,) the mean copied value (None for an erase).
    losses: (steps,) the solver's loss before each step.
    loss_before, loss_after: L1 loss at the paste crop before and after.
    seconds: wall time of the solve.
    active: whether it is applied to the session's parameters.
  """

  id: str
  kind: str
  layer: str
  edit: Edit
  spec: Any
  directions: Any
  target_value: Any
  losses: np.ndarray
  loss_before: float
  loss_after: float
  seconds: float
  active: bool = True


@dataclasses.dataclass(frozen=True, eq=False)
class State:
  """One session's state.

  Attributes:
    layer: the layer being edited.
    resolution: the canvas resolution R of masks.
    original: the generator's original parameters.
    params: the original parameters with the active edits applied.
    history: the :class:`memedit.EditHistory` of ``params``.
    copy: the copied object region, or None.
    paste: the paste target region, or None.
    context: tuple of (id, :class:`Region`) context examples, in the order added.
    edits: tuple of :class:`EditRecord`, in the order made.
    counter: the last number used in a context id.
    made: the number of edits made (the last number used in an edit id).
  """

  layer: str
  resolution: int
  original: Any
  params: Any
  history: EditHistory
  copy: Region | None = None
  paste: Region | None = None
  context: tuple = ()
  edits: tuple = ()
  counter: int = 0
  made: int = 0


def new_state(layer: str, resolution: int, params: Any) -> State:
  """A fresh session on ``params`` with nothing marked and no edit."""
  return State(layer, int(resolution), params, params, EditHistory())


def make_region(imgnum: Any, mask: Any, resolution: int) -> Region:
  """A validated :class:`Region`.

  Args:
    imgnum: an int in [0, :data:`memedit.specs.MAX_IMAGES`).
    mask: uint8 (R, R) with at least one non-zero pixel.
    resolution: R.

  Raises:
    ValueError: a non-integer or out-of-range image number, a mask of another shape or
      dtype, or an empty mask.

  Example:
    >>> import numpy as np
    >>> m = np.zeros((8, 8), np.uint8); m[2:4, 2:4] = 255
    >>> make_region(3, m, 8).imgnum
    3
  """
  if isinstance(imgnum, bool) or not isinstance(imgnum, (int, np.integer)):
    raise ValueError(f"imgnum: expected an integer image number, got {shown(imgnum)}")
  if not 0 <= int(imgnum) < MAX_IMAGES:
    raise ValueError(f"imgnum: expected an image number in [0, {MAX_IMAGES}), got {imgnum}")
  m = np.asarray(mask)
  if m.dtype != np.uint8 or m.shape != (resolution, resolution):
    raise ValueError(f"mask: expected a uint8 ({resolution}, {resolution}) mask, got "
                     f"{m.dtype} {m.shape}")
  if not (m > 0).any():
    raise ValueError("mask: expected a painted region, got an empty mask (paint on the "
                     "image first)")
  return Region(int(imgnum), m)


def with_layer(state: State, layer: str) -> State:
  """The state editing ``layer`` (marked regions and edits are kept)."""
  return dataclasses.replace(state, layer=layer)


def with_copy(state: State, region: Region) -> State:
  """The state with ``region`` as the copied object."""
  return dataclasses.replace(state, copy=region)


def with_paste(state: State, region: Region) -> State:
  """The state with ``region`` as the paste target."""
  return dataclasses.replace(state, paste=region)


def add_context(state: State, region: Region) -> tuple[State, str]:
  """The state with ``region`` appended to the context tray, and the new entry's id."""
  n = state.counter + 1
  cid = f"c{n}"
  return dataclasses.replace(state, context=state.context + ((cid, region),), counter=n), cid


def remove_context(state: State, cid: str) -> State:
  """The state without context entry ``cid``; ValueError naming the entries if absent."""
  ids = [c for c, _ in state.context]
  if cid not in ids:
    raise ValueError(f"context: expected one of the tray's entries {ids}, got {shown(cid)}")
  return dataclasses.replace(state, context=tuple(e for e in state.context if e[0] != cid))


def find_edit(state: State, eid: str) -> EditRecord:
  """The record of edit ``eid``; ValueError naming the session's edits if absent."""
  for rec in state.edits:
    if rec.id == eid:
      return rec
  raise ValueError(f"edit: expected one of this session's edits "
                   f"{[r.id for r in state.edits]}, got {shown(eid)}")


def add_edit(state: State, record: EditRecord) -> State:
  """The state with ``record`` (its id replaced by the next "eN") added and applied.

  Raises:
    ValueError: the same edit (same name: same factors and provenance) is in the list.
  """
  for r in state.edits:
    if r.edit.name == record.edit.name:
      raise ValueError(f"edit: the same edit is already in this session as {r.id}; remove "
                       "it (×) to make it again")
  n = state.made + 1
  record = dataclasses.replace(record, id=f"e{n}", active=False)
  state = dataclasses.replace(state, edits=state.edits + (record,), made=n)
  return set_active(state, record.id, True)


def set_active(state: State, eid: str, active: bool) -> State:
  """The state with edit ``eid`` applied (``active``) or reverted; unchanged if it already
  is. Reverting goes through :func:`memedit.revert_edit`, so it is exact in any order."""
  rec = find_edit(state, eid)
  if rec.active == bool(active):
    return state
  if active:
    params, history = apply_edit(state.params, rec.edit, state.history)
  else:
    params, history = revert_edit(state.params, rec.edit, state.history)
    if not history.edits:  # nothing applied: the original parameters themselves
      params = state.original
  edits = tuple(dataclasses.replace(r, active=bool(active)) if r.id == eid else r
                for r in state.edits)
  return dataclasses.replace(state, params=params, history=history, edits=edits)


def drop_edit(state: State, eid: str) -> State:
  """The state with edit ``eid`` reverted and removed from the list."""
  state = set_active(state, eid, False)
  return dataclasses.replace(state, edits=tuple(r for r in state.edits if r.id != eid))


def revert_all(state: State) -> State:
  """The state with every edit reverted (the list is kept; each can be switched on again)."""
  for rec in state.edits:
    state = set_active(state, rec.id, False)
  return state


def active_key(state: State) -> tuple:
  """A key identifying the parameters: the sorted names of the active edits."""
  return tuple(sorted(state.history.names))
