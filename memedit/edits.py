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

Paths address leaves of a parameter pytree (a Linen variables dict, an ``nnx.State``, any
nested dicts/lists) by their keys, e.g. ``('params', 'Dense_0', 'kernel')`` or
``('blocks', 1, 'fc1', 'kernel')``; NNX's trailing ``.value`` is implied (see
:mod:`memedit.tree`).

On disk (:func:`save_edit`) an edit is an orbax tree ``{"lam": Λ, "directions": D}`` and a
JSON ``meta.json`` (format ``"memedit-edit"``, version 1: name, path, kind, in_ndim,
method, settings, the shapes and, for a stacked leaf, index).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from memedit import _io
from memedit.layouts import LAYOUTS, kernel_delta
from memedit.tree import Path, check_path, get_leaf, replace_leaf

__all__ = ["Edit", "EditHistory", "apply_edit", "edit_delta", "load_edit", "make_edit",
           "revert_edit", "save_edit"]

_FORMAT = "memedit-edit"
_VERSION = 1


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class Edit:
  """An edit ΔK(Λ, D) of the kernel leaf at ``path``: a frozen pytree.

  Λ and D are the pytree's leaves; everything else is static metadata. Build edits with
  :func:`make_edit` (which validates them); ``dataclasses.replace`` gives a changed copy.

  Identity. ``fingerprint`` is a hash of the edit's content (path, layout, provenance,
  index, and Λ and D's shapes and bytes), computed when asked, so it always describes the
  current content. ``name`` is the ``label`` given to :func:`make_edit`, or else the
  fingerprint; an :class:`EditHistory` tells edits apart by name. Under ``jax.jit`` Λ and
  D are traced and cannot be hashed: an edit that entered the program as an argument
  keeps the fingerprint of the values it was called with (carried as static metadata,
  so a call with other values compiles anew).

  Equality and hashing are by identity (``eq=False``): comparing array fields with ``==``
  would be elementwise and have no truth value. Two edits with the same content are
  distinct objects with equal fingerprints; compare ``a.fingerprint == b.fingerprint``.

  Attributes:
    lam: Λ, shaped ``lambda_shape(kernel.shape, r, kind, in_ndim)``.
    D: (r, d), the edit subspace.
    path: tuple of str/int keys of the kernel leaf.
    kind: kernel layout, one of :data:`memedit.layouts.LAYOUTS`.
    in_ndim: leading input axes of a dense kernel.
    method: how the edit was made (free text, e.g. "insert/zca").
    settings_json: the settings that made it, as canonical JSON (see ``settings``).
    label: a name chosen by the caller, or None to be named by the fingerprint.
    index: for a leaf stacked over a leading layer axis (the layers of a scanned stack,
      ``(L, *kernel)``), the layer the edit changes: ΔK, laid out like one layer's
      kernel, is added to ``leaf[index]`` alone; ``None``: the whole leaf.

  Example:
    >>> import dataclasses, jax, jax.numpy as jnp, memedit
    >>> e = memedit.make_edit(("kernel",), jnp.ones((2, 1)), jnp.ones((1, 3)))
    >>> [x.shape for x in jax.tree_util.tree_leaves(e)]
    [(2, 1), (1, 3)]
    >>> dataclasses.replace(e, lam=2 * e.lam).name == e.name  # the name follows the content
    False
  """

  lam: Any
  D: Any
  path: Path
  kind: str = "dense"
  in_ndim: int = 1
  method: str = ""
  settings_json: str = "{}"
  label: str | None = None
  index: int | None = None

  def __post_init__(self):
    object.__setattr__(self, "path", tuple(self.path))
    object.__setattr__(self, "in_ndim", int(self.in_ndim))
    if self.index is not None:
      object.__setattr__(self, "index", int(self.index))

  @property
  def settings(self) -> dict:
    """The settings that made the edit, as a dict."""
    return json.loads(self.settings_json)

  @property
  def rank(self) -> int:
    """r, the number of rows of D."""
    return int(np.shape(self.D)[0])

  @property
  def fingerprint(self) -> str:
    """16 hex digits of the sha256 of the edit's content (see the class docstring).

    Raises:
      ValueError: Λ or D is traced and the edit did not enter the trace as an argument.
    """
    cached = self.__dict__.get("_fingerprint")
    if cached is not None:
      return cached
    if _concrete(self.lam) and _concrete(self.D):
      fp = _content_hash(self)
      if isinstance(self.lam, jax.Array) and isinstance(self.D, jax.Array):
        object.__setattr__(self, "_fingerprint", fp)  # immutable leaves: cache it
      return fp
    traced = self.__dict__.get("_traced_fingerprint")
    if traced is None:
      raise ValueError("edit: expected concrete Λ and D to fingerprint (or an edit passed "
                       "into jax.jit as an argument, or one with a label), got traced values")
    return traced

  @property
  def name(self) -> str:
    """``label`` when given, else ``fingerprint``."""
    return self.label if self.label is not None else self.fingerprint

  def __repr__(self):
    try:
      name = self.name
    except ValueError:
      name = "<traced>"
    index = "" if self.index is None else f", index={self.index}"
    return (f"Edit(name={name!r}, path={self.path!r}{index}, kind={self.kind!r}, "
            f"rank={self.rank}, lam={tuple(np.shape(self.lam))}, method={self.method!r})")


_STATIC = ("path", "kind", "in_ndim", "method", "settings_json", "label", "index")


def _concrete(x) -> bool:
  return isinstance(x, (np.ndarray, np.generic)) or (
      isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer))


def _content_hash(edit: Edit) -> str:
  h = hashlib.sha256(json.dumps(
      [list(edit.path), edit.kind, edit.in_ndim, edit.method, edit.settings_json]
      + ([] if edit.index is None else [edit.index])).encode())
  for a in (edit.lam, edit.D):
    a = np.ascontiguousarray(np.asarray(a))
    h.update(str(a.shape).encode())
    h.update(a.tobytes())
  return h.hexdigest()[:16]


def _edit_flatten_with_keys(edit: Edit):
  try:
    fp = edit.fingerprint
  except ValueError:
    fp = None
  aux = tuple(getattr(edit, f) for f in _STATIC) + (fp,)
  keys = (jax.tree_util.GetAttrKey("lam"), jax.tree_util.GetAttrKey("D"))
  return tuple(zip(keys, (edit.lam, edit.D))), aux


def _edit_flatten(edit: Edit):
  children, aux = _edit_flatten_with_keys(edit)
  return tuple(c for _, c in children), aux


def _edit_unflatten(aux, children) -> Edit:
  edit = Edit(*children, *aux[:-1])
  if aux[-1] is not None:
    object.__setattr__(edit, "_traced_fingerprint", aux[-1])
  return edit


jax.tree_util.register_pytree_with_keys(Edit, _edit_flatten_with_keys, _edit_unflatten,
                                        _edit_flatten)


def make_edit(path: Path, lam: Any, D: Any, *, kind: str = "dense", in_ndim: int = 1,
              method: str = "", settings: dict | None = None, label: str | None = None,
              index: int | None = None) -> Edit:
  """Builds a validated :class:`Edit` of float32 factors.

  Args:
    path: key path of the kernel leaf.
    lam: Λ. D: (r, d), the edit subspace.
    kind, in_ndim: kernel layout (see :mod:`memedit.layouts`).
    method, settings: provenance recorded with the edit (settings: a JSON-serialisable
      dict).
    label: the edit's name; None (default) names it by its content fingerprint.
    index: the layer of a leaf stacked over a leading layer axis ``(L, *kernel)`` that the
      edit changes (Λ and D then describe one layer's kernel); ``None``: the whole leaf.

  Returns:
    The :class:`Edit`.

  Example:
    >>> import jax.numpy as jnp, memedit
    >>> e = memedit.make_edit(("params", "kernel"), jnp.ones((2, 1)), jnp.ones((1, 3)))
    >>> e.rank, e.name == e.fingerprint, len(e.name)
    (1, True, 16)
  """
  path = check_path(path)
  if kind not in LAYOUTS:
    raise ValueError(f"kind: expected one of {LAYOUTS}, got {kind!r}")
  lam = jnp.asarray(lam, jnp.float32)
  D = jnp.asarray(D, jnp.float32)
  if D.ndim != 2:
    raise ValueError(f"D: expected shape (r, d), got {tuple(D.shape)}")
  if lam.ndim < 2 or lam.shape[-1] != D.shape[0]:
    raise ValueError(f"lam: expected shape (..., {D.shape[0]}) for rank "
                     f"{D.shape[0]}, got {tuple(lam.shape)}")
  try:
    settings_json = json.dumps(settings or {}, sort_keys=True)
  except TypeError as e:
    raise ValueError(f"settings: expected a JSON-serialisable dict, got {settings!r}") from e
  if index is not None and (isinstance(index, bool) or not isinstance(index, (int, np.integer))
                            or index < 0):
    raise ValueError(f"index: expected None or a non-negative int (a layer of a stacked "
                     f"leaf), got {index!r}")
  if label is not None and not isinstance(label, str):
    raise ValueError(f"label: expected None or a str, got {label!r}")
  if isinstance(in_ndim, bool) or not isinstance(in_ndim, (int, np.integer)):
    raise ValueError(f"in_ndim: expected an int, got {in_ndim!r}")
  return Edit(lam, D, path, kind, int(in_ndim), str(method), settings_json, label, index)


def edit_delta(edit: Edit, kernel_shape) -> jax.Array:
  """ΔK of ``edit`` for a kernel of ``kernel_shape``: :func:`memedit.kernel_delta` of its
  factors and layout.

  An edit with an ``index`` changes one layer of a stacked leaf ``(L, *kernel)``: its ΔK
  (one layer's) lies at ``[index]`` and every other entry is ``-0.0``, which added to any
  float leaves it bit for bit as it was (``x + (-0.0) == x``, also for ``x = -0.0``), so
  the other layers keep their bits.

  Args:
    edit: an :class:`Edit`.
    kernel_shape: the kernel's shape (the whole stacked leaf's for an edit with an index).

  Returns:
    float32 array of ``kernel_shape``.

  Raises:
    ValueError: the edit's index is outside the leaf's layer axis.

  Example:
    >>> import jax.numpy as jnp, memedit
    >>> e = memedit.make_edit(("k",), jnp.ones((2, 1)), jnp.array([[1.0, 0.0, 0.0]]))
    >>> memedit.edit_delta(e, (3, 2))[0]
    Array([1., 1.], dtype=float32)
  """
  index = edit.index
  if index is None:
    return kernel_delta(edit.lam, edit.D, kernel_shape, edit.kind, edit.in_ndim)
  shape = tuple(int(s) for s in kernel_shape)
  if not shape or not 0 <= index < shape[0]:
    size = shape[0] if shape else 0
    raise ValueError(f"index: expected a layer 0 <= index < {size} of the stacked leaf "
                     f"{shape} at {edit.path!r}, got {index}")
  delta = kernel_delta(edit.lam, edit.D, shape[1:], edit.kind, edit.in_ndim)
  return jnp.full(shape, -0.0, delta.dtype).at[index].set(delta)


@jax.tree_util.register_pytree_node_class
class EditHistory:
  """The base leaves touched by edits and the edits currently applied.

  Attributes:
    originals: dict path → base leaf: the leaf before its first active edit, moved by
      any change made to the leaf between edits (see the module docstring).
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


def _fingerprint(x) -> jax.Array:
  """Two 32-bit hashes of ``x``'s bits and positions (exact integer arithmetic, so the
  same eagerly and under jit)."""
  b = _bits(x)
  if b.dtype.itemsize == 8:
    b = b ^ (b >> 32)
  b = b.astype(jnp.uint32).ravel()
  i = jnp.arange(b.size, dtype=jnp.uint32)
  h = (b + i * jnp.uint32(0x9E3779B9)) * jnp.uint32(0x85EBCA6B)
  h = (h ^ (h >> 13)) * jnp.uint32(0xC2B2AE35)
  h = h ^ (h >> 16)
  g = (h ^ (i * jnp.uint32(0x27D4EB2F))) * jnp.uint32(0x165667B1)
  g = g ^ (g >> 15)
  return jnp.stack([jnp.sum(h, dtype=jnp.uint32), jnp.sum(g, dtype=jnp.uint32)])


def _current_base(params, history, path):
  """The base of the edited leaf at ``path``, moved by any change made to the leaf since
  the history last wrote it (the entries whose bits differ from base + Σ ΔK)."""
  base = history.originals[path]
  leaf = get_leaf(params, path)
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
    ``(new_params, new_history)``.

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
  history = history or EditHistory()
  if edit.name in history.names:
    raise ValueError(f"edit: {edit.name!r} is already applied")
  leaf = get_leaf(params, edit.path)
  originals = dict(history.originals)
  if edit.path in originals:
    originals[edit.path] = _current_base(params, history, edit.path)
  original = originals.setdefault(edit.path, leaf)
  edit_delta(edit, np.shape(original))  # validates shapes before anything changes
  edits = history.edits + (edit,)
  new_leaf = _recompute(original, [e for e in edits if e.path == edit.path])
  prints = {**history.fingerprints, edit.path: _fingerprint(new_leaf)}
  return replace_leaf(params, edit.path, new_leaf), EditHistory(originals, edits, prints)


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


def save_edit(path: str | os.PathLike, edit: Edit, *, force: bool = False) -> str:
  """Saves an edit's factors and metadata atomically (orbax arrays + JSON); never the model.

  Args:
    path: destination directory (replaced as a whole, atomically). An existing one is
      replaced only when it is a saved edit (or empty).
    edit: the :class:`Edit`.
    force: replace an existing ``path`` that is not a saved edit.

  Returns:
    The absolute path written.

  Example:
    >>> import tempfile, os, jax.numpy as jnp, memedit
    >>> e = memedit.make_edit(("k",), jnp.ones((2, 1)), jnp.ones((1, 3)))
    >>> d = memedit.save_edit(os.path.join(tempfile.mkdtemp(), "edit"), e)
    >>> memedit.load_edit(d).name == e.name
    True
  """
  if not isinstance(edit, Edit):
    raise ValueError(f"edit: expected an Edit, got {type(edit).__name__}")
  meta = {
      "format": _FORMAT, "version": _VERSION, "name": edit.name, "path": list(edit.path),
      "kind": edit.kind, "in_ndim": edit.in_ndim, "method": edit.method,
      "settings": edit.settings, "lam_shape": list(np.shape(edit.lam)),
      "directions_shape": list(np.shape(edit.D)),
      **({} if edit.index is None else {"index": edit.index}),
  }
  return _io.save_tree(path, {"lam": edit.lam, "directions": edit.D}, meta, kind="edit",
                       force=force)


def load_edit(path: str | os.PathLike) -> Edit:
  """Loads an edit written by :func:`save_edit`.

  Args:
    path: the directory :func:`save_edit` wrote.

  Returns:
    The :class:`Edit`.

  Example:
    >>> import tempfile, os, jax.numpy as jnp, memedit
    >>> e = memedit.make_edit(("k",), jnp.ones((2, 1)), jnp.ones((1, 3)), method="demo")
    >>> memedit.load_edit(memedit.save_edit(os.path.join(tempfile.mkdtemp(), "e"), e)).method
    'demo'

  Raises:
    ValueError: the directory holds something other than a memedit edit.
  """
  tree, meta = _io.load_tree(path)
  if meta.get("format") != _FORMAT:
    raise ValueError(f"{path}: expected a saved memedit edit (format {_FORMAT!r}), "
                     f"got format {meta.get('format')!r}")
  if meta.get("version") != _VERSION:
    raise ValueError(f"{path}: expected edit format version {_VERSION}, got {meta.get('version')!r}")
  edit = Edit(jnp.asarray(tree["lam"]), jnp.asarray(tree["directions"]), tuple(meta["path"]),
              meta["kind"], meta["in_ndim"], meta["method"],
              json.dumps(meta["settings"], sort_keys=True), None, meta.get("index"))
  # A stored name other than the content's fingerprint is a label the caller chose.
  name = meta.get("name")
  return edit if name in (None, edit.fingerprint) else dataclasses.replace(edit, label=name)
