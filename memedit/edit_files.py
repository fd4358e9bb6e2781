"""Edit files: :func:`save_edit` and :func:`load_edit` (re-exported by :mod:`memedit.edits`).

On disk an edit is a directory written atomically by :func:`memedit._io.save_tree`: an
orbax tree ``{"lam": Λ, "directions": D}`` and a JSON ``meta.json`` (format
``"memedit-edit"``, version 1: name, path, kind, in_ndim, method, settings, the shapes
and, for a stacked leaf, index). Never the model.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax.numpy as jnp
import numpy as np

from memedit import _io
from memedit.edit_value import Edit
from memedit.layouts import LAYOUTS

__all__ = ["load_edit", "save_edit"]


_FORMAT = "memedit-edit"
_VERSION = 1


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


def _is_int(x) -> bool:
  return isinstance(x, int) and not isinstance(x, bool)


def _check_saved(path, tree, meta: dict) -> tuple[np.ndarray, np.ndarray]:
  """Checks a saved edit's metadata fields and arrays before an :class:`Edit` is built
  from them (a directory of another version, or edited by hand, fails here, naming the
  field); returns ``(Λ, D)``."""
  where = f"{os.fspath(path)}: meta.json"
  fields = ("name", "path", "kind", "in_ndim", "method", "settings", "lam_shape",
            "directions_shape")
  missing = [f for f in fields if f not in meta]
  if missing:
    raise ValueError(f"{where}: expected the fields {list(fields)}, missing {missing}")
  p = meta["path"]
  if not (isinstance(p, list) and p and all(isinstance(k, str) or _is_int(k) for k in p)):
    raise ValueError(f"{where}: path: expected a non-empty list of str/int keys, got {p!r}")
  if meta["kind"] not in LAYOUTS:
    raise ValueError(f"{where}: kind: expected one of {LAYOUTS}, got {meta['kind']!r}")
  if not _is_int(meta["in_ndim"]) or meta["in_ndim"] < 1:
    raise ValueError(f"{where}: in_ndim: expected a positive int, got {meta['in_ndim']!r}")
  if not isinstance(meta["method"], str):
    raise ValueError(f"{where}: method: expected a str, got {meta['method']!r}")
  if not isinstance(meta["settings"], dict):
    raise ValueError(f"{where}: settings: expected an object, got {meta['settings']!r}")
  if meta["name"] is not None and not isinstance(meta["name"], str):
    raise ValueError(f"{where}: name: expected a str, got {meta['name']!r}")
  index = meta.get("index")
  if index is not None and (not _is_int(index) or index < 0):
    raise ValueError(f"{where}: index: expected a non-negative int, got {index!r}")
  if not (isinstance(tree, dict) and set(tree) == {"lam", "directions"}):
    got = sorted(map(str, tree)) if isinstance(tree, dict) else type(tree).__name__
    raise ValueError(f"{os.fspath(path)}: expected the arrays ['directions', 'lam'], got {got}")
  lam, D = np.asarray(tree["lam"]), np.asarray(tree["directions"])
  for name, a, key in (("lam", lam, "lam_shape"), ("directions", D, "directions_shape")):
    if not jnp.issubdtype(a.dtype, jnp.floating):
      raise ValueError(f"{os.fspath(path)}: {name}: expected floating-point factors, got "
                       f"{a.dtype}")
    if list(a.shape) != meta[key]:
      raise ValueError(f"{os.fspath(path)}: {name}: expected the shape {meta[key]!r} recorded "
                       f"in meta.json ({key}), got {list(a.shape)}")
  if D.ndim != 2 or lam.ndim < 2 or lam.shape[-1] != D.shape[0]:
    raise ValueError(f"{os.fspath(path)}: expected factors lam (..., r) and directions (r, d), "
                     f"got shapes {list(lam.shape)} and {list(D.shape)}")
  return lam, D


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
    FileNotFoundError: ``path`` is not a saved tree.
    ValueError: the directory holds something other than a memedit edit, a file was
      damaged since it was saved, or a metadata field or array is not what
      :func:`save_edit` writes (the message names it).
  """
  tree, meta = _io.load_tree(path)
  if meta.get("format") != _FORMAT:
    raise ValueError(f"{path}: expected a saved memedit edit (format {_FORMAT!r}), "
                     f"got format {meta.get('format')!r}")
  if meta.get("version") != _VERSION:
    raise ValueError(f"{path}: expected edit format version {_VERSION}, got {meta.get('version')!r}")
  lam, D = _check_saved(path, tree, meta)
  edit = Edit(jnp.asarray(lam), jnp.asarray(D), tuple(meta["path"]),
              meta["kind"], meta["in_ndim"], meta["method"],
              json.dumps(meta["settings"], sort_keys=True), None, meta.get("index"))
  # A stored name other than the content's fingerprint is a label the caller chose.
  name = meta.get("name")
  return edit if name in (None, edit.fingerprint) else dataclasses.replace(edit, label=name)
