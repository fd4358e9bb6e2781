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
