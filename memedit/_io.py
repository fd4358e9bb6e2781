"""Atomic, self-describing storage of array trees: an orbax checkpoint plus JSON metadata.

Every write goes to a temporary sibling directory first and is moved into place with
``os.replace`` only once it is complete, so an interrupted write never leaves a half
checkpoint where a reader would find it, and an existing checkpoint at the destination
survives until the new one is whole.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from typing import Any

import numpy as np

_TREE_DIR = "arrays"
_META_FILE = "meta.json"


def _atomic_replace_dir(tmp: str, dst: str) -> None:
  """Moves the finished directory ``tmp`` to ``dst``, replacing any earlier ``dst``."""
  if os.path.isdir(dst):
    old = tempfile.mkdtemp(prefix=".old-", dir=os.path.dirname(dst))
    os.rmdir(old)
    os.replace(dst, old)
    try:
      os.replace(tmp, dst)
    except BaseException:
      os.replace(old, dst)
      raise
    shutil.rmtree(old, ignore_errors=True)
  else:
    os.replace(tmp, dst)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike):
  """Yields a temporary directory that becomes ``path`` when the block exits cleanly.

  On an exception (or a kill) the temporary directory is removed (or left under a
  hidden ``.tmp-`` name) and ``path`` is untouched.
  """
  dst = os.path.abspath(os.fspath(path))
  parent = os.path.dirname(dst)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".tmp-{os.path.basename(dst)}-", dir=parent)
  try:
    yield tmp
    _atomic_replace_dir(tmp, dst)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
  """Writes ``data`` to ``path`` through a temporary file and ``os.replace``."""
  dst = os.path.abspath(os.fspath(path))
  os.makedirs(os.path.dirname(dst), exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f".tmp-{os.path.basename(dst)}-", dir=os.path.dirname(dst))
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, dst)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.remove(tmp)
    raise


def save_tree(path: str | os.PathLike, tree: Any, metadata: dict | None = None) -> str:
  """Saves an array tree and JSON metadata atomically as a directory.

  Args:
    path: destination directory (created or replaced as a whole).
    tree: a pytree of arrays (nested dicts, lists, NamedTuples of jax or numpy arrays).
    metadata: JSON-serialisable dict stored beside the arrays.

  Returns:
    The absolute path written.
  """
  import orbax.checkpoint as ocp  # local import: orbax is slow to import

  dst = os.path.abspath(os.fspath(path))
  tree = _to_numpy(tree)
  with atomic_dir(dst) as tmp:
    with ocp.StandardCheckpointer() as ckptr:
      ckptr.save(os.path.join(tmp, _TREE_DIR), tree)
    with open(os.path.join(tmp, _META_FILE), "w") as f:
      json.dump(metadata or {}, f, indent=2, sort_keys=True)
  return dst


def load_tree(path: str | os.PathLike) -> tuple[Any, dict]:
  """Loads what :func:`save_tree` wrote.

  Returns:
    ``(tree, metadata)``; arrays come back as numpy arrays.

  Raises:
    FileNotFoundError: ``path`` is not a complete saved tree.
  """
  import orbax.checkpoint as ocp

  src = os.path.abspath(os.fspath(path))
  meta_file = os.path.join(src, _META_FILE)
  tree_dir = os.path.join(src, _TREE_DIR)
  if not (os.path.isfile(meta_file) and os.path.isdir(tree_dir)):
    raise FileNotFoundError(
        f"{src} is not a saved memedit tree: expected {_TREE_DIR}/ and {_META_FILE} inside it")
  with open(meta_file) as f:
    metadata = json.load(f)
  with ocp.StandardCheckpointer() as ckptr:
    tree = ckptr.restore(tree_dir)
  return _to_numpy(tree), metadata


def _to_numpy(tree: Any) -> Any:
  import jax

  return jax.tree_util.tree_map(np.asarray, tree)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
  """Hex sha256 of a file's bytes."""
  h = hashlib.sha256()
  with open(path, "rb") as f:
    while block := f.read(chunk):
      h.update(block)
  return h.hexdigest()


def tree_hash(tree: Any) -> str:
  """Hex sha256 of a pytree's structure, shapes, dtypes and array bytes (content hash)."""
  import jax

  leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
  h = hashlib.sha256(str(jax.tree_util.tree_structure(tree)).encode())
  for keypath, leaf in leaves:
    a = np.ascontiguousarray(np.asarray(leaf))
    h.update(jax.tree_util.keystr(keypath).encode())
    h.update(f"{a.dtype.str}{a.shape}".encode())
    h.update(a.tobytes())
  del treedef
  return h.hexdigest()
