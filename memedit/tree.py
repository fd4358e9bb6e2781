"""Addressing leaves of a parameter pytree by path.

A path is a tuple of str/int keys, e.g. ``('params', 'Dense_0', 'kernel')`` for a Linen
variables dict or ``('blocks', 1, 'fc1', 'kernel')`` for an ``nnx.State``; NNX's trailing
``.value`` is implied. Nothing here mutates the caller's tree.
"""

from __future__ import annotations

import difflib
from typing import Any

import jax

__all__ = ["Path", "check_path", "get_leaf", "leaf_paths", "replace_leaf"]

#: A leaf's address: a tuple of str/int keys.
Path = tuple


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


def leaf_paths(params: Any) -> list[Path]:
  """The normalised paths of every array leaf of ``params``.

  Args:
    params: any parameter pytree (Linen variables, ``nnx.State``, nested dicts/lists).

  Returns:
    A list of tuples of str/int keys, in flattening order.

  Example:
    >>> leaf_paths({"params": {"fc": {"kernel": 0.0, "bias": 0.0}}})
    [('params', 'fc', 'bias'), ('params', 'fc', 'kernel')]
  """
  return [_norm_path(kp) for kp, _ in jax.tree_util.tree_flatten_with_path(params)[0]]


def check_path(path: Any) -> Path:
  """``path`` as a tuple of str/int keys: a single key becomes a 1-tuple.

  Raises:
    ValueError: an empty path, or a key that is not a str or an int.

  Example:
    >>> check_path("kernel"), check_path(["blocks", 1, "kernel"])
    (('kernel',), ('blocks', 1, 'kernel'))
  """
  if isinstance(path, (str, int)):
    path = (path,)
  if not isinstance(path, (tuple, list)) or not path or not all(
      isinstance(p, (str, int)) and not isinstance(p, bool) for p in path):
    raise ValueError(f"path: expected a non-empty tuple of str/int keys, got {path!r}")
  return tuple(path)


def _missing(params, path):
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
    >>> get_leaf({"params": {"w": 1.0}}, ("params", "w"))
    1.0
  """
  path = check_path(path)
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
    >>> replace_leaf({"a": 1, "b": 2}, ("a",), 5)
    {'a': 5, 'b': 2}
  """
  path = check_path(path)
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
