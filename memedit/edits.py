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
``('blocks', 1, 'fc1', 'kernel')``; NNX's trailing ``.value`` is implied.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Iterable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from memedit import _io
from memedit.solve import KINDS, kernel_delta

Path = tuple

_FORMAT = "memedit-edit"
_VERSION = 1


def _norm_key(k) -> Any:
  if isinstance(k, jax.tree_util.DictKey):
    return k.key
  if isinstance(k, jax.tree_util.SequenceKey):
    return k.idx
  if isinstance(k, jax.tree_util.GetAttrKey):
    return k.name
  if isinstance(k, jax.tree_util.FlattenedIndexKey):
    return k.key
  return k


def _norm_path(keypath) -> tuple:
  path = tuple(_norm_key(k) for k in keypath)
  while path and path[-1] in ("value", "raw_value") and isinstance(
      keypath[len(path) - 1], jax.tree_util.GetAttrKey):
    path = path[:-1]
  return path


def leaf_paths(params: Any) -> list[tuple]:
  """The normalised paths of every array leaf of ``params``.

  Args:
    params: any parameter pytree (Linen variables, ``nnx.State``, nested dicts/lists).

  Returns:
    A list of tuples of str/int keys, in flattening order.

  Example:
    >>> import memedit
    >>> memedit.leaf_paths({"params": {"fc": {"kernel": 0.0, "bias": 0.0}}})
    [('params', 'fc', 'bias'), ('params', 'fc', 'kernel')]
  """
  return [_norm_path(kp) for kp, _ in jax.tree_util.tree_flatten_with_path(params)[0]]


def _check_path(path) -> tuple:
  if isinstance(path, (str, int)):
    path = (path,)
  if not isinstance(path, (tuple, list)) or not path or not all(
      isinstance(p, (str, int)) and not isinstance(p, bool) for p in path):
    raise ValueError(f"path: expected a non-empty tuple of str/int keys, got {path!r}")
  return tuple(path)


def _missing(params, path):
  import difflib

  paths = leaf_paths(params)
  text = ["/".join(map(str, p)) for p in paths]
  near = difflib.get_close_matches("/".join(map(str, path)), text, n=5, cutoff=0.3)
  return ValueError(f"path: expected the path of a leaf of the parameters, got {path!r}; "
                    f"closest: {near or text[:5]}")


def get_leaf(params: Any, path: Path) -> jax.Array:
  """Returns the leaf of ``params`` at ``path``.

  Args:
    params: a parameter pytree.
    path: tuple of str/int keys (see :func:`leaf_paths`).

  Returns:
    The leaf.

  Raises:
    ValueError: no leaf has that path; the message lists the closest paths.

  Example:
    >>> import memedit
    >>> memedit.get_leaf({"params": {"w": 1.0}}, ("params", "w"))
    1.0
  """
  path = _check_path(path)
  for kp, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    if _norm_path(kp) == path:
      return leaf
  raise _missing(params, path)


def replace_leaf(params: Any, path: Path, value: Any) -> Any:
  """A copy of ``params`` with the leaf at ``path`` replaced by ``value`` (others shared).

  The caller's tree is never mutated.

  Args:
    params: a parameter pytree.
    path: tuple of str/int keys.
    value: the new leaf.

  Returns:
    The new tree.

  Example:
    >>> import memedit
    >>> memedit.replace_leaf({"a": 1, "b": 2}, ("a",), 5)
    {'a': 5, 'b': 2}
  """
  path = _check_path(path)
  found = []

  def swap(kp, leaf):
    if _norm_path(kp) == path:
      found.append(True)
      return value
    return leaf

  out = jax.tree_util.tree_map_with_path(swap, params)
  if not found:
    raise _missing(params, path)
  return out


@jax.tree_util.register_pytree_node_class
class Edit:
  """An edit ΔK(Λ, D) of the kernel leaf at ``path``.

  Attributes:
    lam: Λ, shaped ``lambda_shape(kernel.shape, r, kind, in_ndim)``.
    directions: D (r, d).
    path: tuple of str/int keys of the kernel leaf.
    kind: kernel layout, "matrix", "dense" or "conv".
    in_ndim: leading input axes of a dense kernel.
    method: how the edit was made (free text, e.g. "insert/zca").
    settings: JSON-serialisable dict of the settings that made it.
    name: identifier, by default a hash of everything above.
    index: for a leaf stacked over a leading layer axis (the layers of a scanned stack,
      ``(L, *kernel)``), the layer the edit changes: ΔK, laid out like one layer's
      kernel, is added to ``leaf[index]`` alone; ``None``: the whole leaf.
  """

  def __init__(self, lam, directions, path, kind, in_ndim=1, method="", settings=None,
               name=None, index=None):
    self.lam = lam
    self.directions = directions
    self.path = tuple(path)
    self.kind = kind
    self.in_ndim = int(in_ndim)
    self.method = method
    self._settings = json.dumps(settings or {}, sort_keys=True, default=str)
    self.name = name
    self.index = None if index is None else int(index)

  @property
  def settings(self) -> dict:
    return json.loads(self._settings)

  @property
  def rank(self) -> int:
    return int(np.shape(self.directions)[0])

  def tree_flatten(self):
    return (self.lam, self.directions), (self.path, self.kind, self.in_ndim, self.method,
                                         self._settings, self.name, self.index)

  @classmethod
  def tree_unflatten(cls, aux, children):
    obj = cls.__new__(cls)
    obj.lam, obj.directions = children
    (obj.path, obj.kind, obj.in_ndim, obj.method, obj._settings, obj.name,
     obj.index) = aux
    return obj

  def __repr__(self):
    index = "" if self.index is None else f", index={self.index}"
    return (f"Edit(name={self.name!r}, path={self.path!r}{index}, kind={self.kind!r}, "
            f"rank={self.rank}, lam={tuple(np.shape(self.lam))}, method={self.method!r})")


def make_edit(path: Path, lam: Any, directions: Any, *, kind: str = "dense", in_ndim: int = 1,
              method: str = "", settings: dict | None = None, name: str | None = None,
              index: int | None = None) -> Edit:
  """Builds a validated :class:`Edit`; the default name is a content hash.

  Args:
    path: key path of the kernel leaf.
    lam: Λ. directions: D (r, d).
    kind, in_ndim: kernel layout (see :mod:`memedit.solve`).
    method, settings: provenance recorded with the edit.
    name: identifier (default: sha256 of path, layout, factors, settings and index, 16 hex
      chars).
    index: the layer of a leaf stacked over a leading layer axis ``(L, *kernel)`` that the
      edit changes (Λ and D then describe one layer's kernel); ``None``: the whole leaf.

  Returns:
    The :class:`Edit`.

  Example:
    >>> import jax.numpy as jnp, memedit
    >>> e = memedit.make_edit(("params", "kernel"), jnp.ones((2, 1)), jnp.ones((1, 3)))
    >>> e.rank
    1
  """
  path = _check_path(path)
  if kind not in KINDS:
    raise ValueError(f"kind: expected one of {KINDS}, got {kind!r}")
  lam = jnp.asarray(lam, jnp.float32)
  directions = jnp.asarray(directions, jnp.float32)
  if directions.ndim != 2:
    raise ValueError(f"directions: expected shape (r, d), got {tuple(directions.shape)}")
  if lam.ndim < 2 or lam.shape[-1] != directions.shape[0]:
    raise ValueError(f"lam: expected shape (..., {directions.shape[0]}) for rank "
                     f"{directions.shape[0]}, got {tuple(lam.shape)}")
  try:
    settings_text = json.dumps(settings or {}, sort_keys=True)
  except TypeError as e:
    raise ValueError(f"settings: expected a JSON-serialisable dict, got {settings!r}") from e
  if index is not None and (isinstance(index, bool) or not isinstance(index, (int, np.integer))
                            or index < 0):
    raise ValueError(f"index: expected None or a non-negative int (a layer of a stacked "
                     f"leaf), got {index!r}")
  if name is None:
    h = hashlib.sha256(json.dumps([list(path), kind, in_ndim, method, settings_text] + (
        [] if index is None else [int(index)])).encode())
    for a in (lam, directions):
      a = np.ascontiguousarray(np.asarray(a))
      h.update(str(a.shape).encode())
      h.update(a.tobytes())
    name = h.hexdigest()[:16]
  return Edit(lam, directions, path, kind, in_ndim, method, settings, name, index)


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
  index = getattr(edit, "index", None)
  if index is None:
    return kernel_delta(edit.lam, edit.directions, kernel_shape, edit.kind, edit.in_ndim)
  shape = tuple(int(s) for s in kernel_shape)
  if not shape or not 0 <= index < shape[0]:
    size = shape[0] if shape else 0
    raise ValueError(f"index: expected a layer 0 <= index < {size} of the stacked leaf "
                     f"{shape} at {edit.path!r}, got {index}")
  delta = kernel_delta(edit.lam, edit.directions, shape[1:], edit.kind, edit.in_ndim)
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
      "directions_shape": list(np.shape(edit.directions)),
      **({} if edit.index is None else {"index": edit.index}),
  }
  return _io.save_tree(path, {"lam": edit.lam, "directions": edit.directions}, meta,
                       kind="edit", force=force)


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
  return Edit(jnp.asarray(tree["lam"]), jnp.asarray(tree["directions"]), tuple(meta["path"]),
              meta["kind"], meta["in_ndim"], meta["method"], meta["settings"], meta["name"],
              meta.get("index"))
