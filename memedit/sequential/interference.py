"""Interference of sequential edits, computed from their factors and keys alone.

A layer is read as a memory matrix M (v, d) from keys k (d) to the values it writes
(:func:`memory_matrix`): W itself for ``"matrix"``, the flattened kernel transposed for
``"dense"``, and for ``"conv"`` (HWIO) the per-tap contributions, v = taps · C_out, so
that M k holds what one key alone writes through every tap. An edit's change is
ΔM = Λ D (Λ flattened to (v, r), :func:`edit_matrix`), computed without the model.

The change an edit j makes at the keys K_i (n_i, d), weights w_i, of edit i is

    c(j, i) = ‖ΔM_j K_i‖_w = √(Σₙ w_{i,n} ‖ΔM_j k_{i,n}‖²),

the root of the weighted sum of squared value changes, each key taken alone (for a
convolution: the change of the layer's output when the key is its only non-zero input
pixel). The interference matrix (:func:`interference_matrix`) is

    I[i, j] = c(j, i) / c(i, i)                (relative_to="edit")
    I[i, j] = c(j, i) / ‖M_i K_i‖_w            (relative_to="output")

with M_i the memory after edit i (the unedited kernel plus the active edits up to and
including i). For j after i, I[i, j] is how far edit j moves the values edit i stored,
relative to edit i's own change there ("edit"; 1 undoes it in size) or to the values
stored there ("output"; the relative change of the stored values). Entries j < i are
edits that were in place when edit i was solved; entries on different leaves are NaN.
Where the denominator is 0 (edit i changed nothing at its keys, or they are all zero)
I[i, j] is 0 when edit j changes nothing there either, else inf.

:func:`check_edit` reports, before applying an edit, its row of changes at every earlier
active edit's keys and the growth of the edited kernel's Frobenius norm and of the
condition number σ_max/σ_min of its memory matrix, and warns
(:class:`InterferenceWarning`) past thresholds. Everything here is computed on the host
in float64; :mod:`memedit.sequential.diagnostics` prints it as tables and re-exports these
names.
"""

from __future__ import annotations

import warnings
from typing import Any, NamedTuple

import numpy as np

from memedit.checks import check_scalar, is_traced
from memedit.edits import Edit
from memedit.layouts import check_layout, key_dim, lambda_shape
from memedit.sequential.log import EditLog, check_log
from memedit.tree import get_leaf

__all__ = ["EditCheck", "Interference", "InterferenceWarning", "RELATIVE_TO", "check_edit",
           "edit_matrix", "growth", "interference_matrix", "key_change", "memory_matrix"]

#: The normalisations of :func:`interference_matrix`.
RELATIVE_TO = ("edit", "output")


class InterferenceWarning(UserWarning):
  """An edit would move earlier edits' stored values, or grow the layer's norm or
  condition number, past the thresholds of :func:`check_edit`.

  Example:
    >>> import warnings
    >>> from memedit.sequential import InterferenceWarning
    >>> issubclass(InterferenceWarning, UserWarning)
    True
  """


def memory_matrix(kernel: Any, kind: str = "dense", in_ndim: int = 1) -> np.ndarray:
  """The kernel as a memory matrix M (v, d): keys k (d) to the values M k it writes.

  Args:
    kernel: the kernel (one layer's, for a stacked leaf ``leaf[index]``).
    kind, in_ndim: its layout (:mod:`memedit.layouts`).

  Returns:
    float64 (v, d): matrix W (out, in); dense: the kernel as (in, out), transposed;
    conv (*taps, C_in, C_out): (taps · C_out, C_in), rows ordered tap-major.

  Example:
    >>> import numpy as np
    >>> from memedit.sequential import memory_matrix
    >>> memory_matrix(np.ones((3, 3, 4, 5)), "conv").shape
    (45, 4)
  """
  k = np.asarray(kernel, np.float64)
  check_layout(kind, k.shape, in_ndim)
  if kind == "matrix":
    return k
  if kind == "conv":
    return np.moveaxis(k, -2, -1).reshape(-1, k.shape[-2])
  d = int(np.prod(k.shape[:in_ndim]))
  return k.reshape(d, -1).T


def edit_matrix(edit: Edit) -> np.ndarray:
  """ΔM = Λ D (v, d), the edit's change of the memory matrix, from its factors alone.

  Args:
    edit: the :class:`memedit.Edit`.

  Returns:
    float64 (v, d), laid out as :func:`memory_matrix` lays out the kernel.

  Example:
    >>> import jax.numpy as jnp, memedit
    >>> from memedit.sequential import edit_matrix
    >>> e = memedit.make_edit(("k",), jnp.ones((3, 3, 5, 1)), jnp.ones((1, 4)), kind="conv")
    >>> edit_matrix(e).shape
    (45, 4)
  """
  lam = np.asarray(edit.lam, np.float64)
  return lam.reshape(-1, lam.shape[-1]) @ np.asarray(edit.D, np.float64)


def _weights(keys, weights):
  return np.ones(len(keys)) if weights is None else np.asarray(weights, np.float64)


def key_change(delta: np.ndarray, keys: Any, weights: Any = None) -> float:
  """‖ΔM K‖_w = √(Σₙ wₙ ‖ΔM kₙ‖²): the weighted root-sum-square change at some keys.

  Args:
    delta: (v, d) a change of a memory matrix (:func:`edit_matrix`) or a memory matrix.
    keys: (n, d) keys. weights: (n,) or None for 1.

  Returns:
    The norm as a float.

  Example:
    >>> import numpy as np
    >>> from memedit.sequential import key_change
    >>> key_change(np.eye(2), np.array([[3.0, 4.0], [0.0, 1.0]]), np.array([1.0, 0.0]))
    5.0
  """
  k = np.asarray(keys, np.float64)
  delta = np.asarray(delta, np.float64)
  if delta.ndim != 2 or k.ndim != 2 or k.shape[1] != delta.shape[1]:
    raise ValueError(f"keys: expected shape (n, {delta.shape[-1] if delta.ndim else '?'}) to "
                     f"match the change {delta.shape}, got {k.shape}")
  w = _weights(k, weights)
  out = k @ delta.T  # (n, v)
  return float(np.sqrt(np.sum(w * np.sum(out * out, axis=1))))


class Interference(NamedTuple):
  """The interference matrix of a log's active edits.

  Attributes:
    matrix: (n, n) float64, ``matrix[i, j]`` = I[i, j] (see the module docstring); NaN
      for edits on different leaves.
    names: the n active edits' names, in log order.
    positions: their positions in the log.
    relative_to: ``"edit"`` or ``"output"``.

  Example:
    >>> import jax.numpy as jnp, memedit
    >>> from memedit.sequential import interference_matrix, log_append, log_init
    >>> a = memedit.make_edit(("k",), jnp.ones((2, 1)), jnp.array([[1.0, 0.0]]), label="a")
    >>> b = memedit.make_edit(("k",), jnp.ones((2, 1)), jnp.array([[1.0, 1.0]]), label="b")
    >>> log = log_append(log_append(log_init(), a, jnp.eye(2)[:1]), b, jnp.eye(2)[1:])
    >>> interference_matrix(log).matrix.round(3).tolist()
    [[1.0, 1.0], [0.0, 1.0]]
  """

  matrix: np.ndarray
  names: tuple
  positions: tuple
  relative_to: str


def _leaf(edit: Edit) -> tuple:
  return (edit.path, edit.index)


def _kernel(params, edit: Edit) -> np.ndarray:
  """The kernel the edit changes, checked against its factors (a log of another model's
  edits would otherwise broadcast into wrong numbers or fail inside numpy)."""
  leaf = np.asarray(get_leaf(params, edit.path), np.float64)
  where = f"{edit.path!r}" if edit.index is None else f"{edit.path!r}[{edit.index}]"
  if edit.index is not None:
    if leaf.ndim == 0 or not 0 <= edit.index < leaf.shape[0]:
      raise ValueError(f"params: expected a leaf stacked over at least {edit.index + 1} "
                       f"layers at {edit.path!r} for edit {edit.name!r}, got shape {leaf.shape}")
    leaf = leaf[edit.index]
  try:
    check_layout(edit.kind, leaf.shape, edit.in_ndim)
    fits = (int(np.shape(edit.D)[1]) == key_dim(leaf.shape, edit.kind, edit.in_ndim)
            and tuple(np.shape(edit.lam)) == lambda_shape(leaf.shape, edit.rank, edit.kind,
                                                          edit.in_ndim))
  except ValueError:
    fits = False
  if not fits:
    raise ValueError(f"params: expected the kernel at {where} to fit edit {edit.name!r} "
                     f"({edit.kind}, Λ {tuple(np.shape(edit.lam))}, D "
                     f"{tuple(np.shape(edit.D))}), got a kernel of shape {leaf.shape}; is the "
                     f"log of another model?")
  return leaf


def _check_dims(entries) -> None:
  """The edits on one leaf must read keys of one dimension (their changes are compared)."""
  dims = {}
  for e in entries:
    dims.setdefault(_leaf(e.edit), {})[e.name] = int(np.shape(e.edit.D)[1])
  for (path, index), named in dims.items():
    if len(set(named.values())) > 1:
      where = f"{path!r}" if index is None else f"{path!r}[{index}]"
      raise ValueError(f"log: expected the edits on {where} to share a key dimension, got "
                       f"{named}")


def _ratio(num: float, den: float) -> float:
  """num / den, with 0 / 0 = 0 and x / 0 = inf (an edit that wrote nothing there)."""
  if den > 0:
    return num / den
  return 0.0 if num == 0 else float("inf")


def _check_relative(relative_to, params):
  if relative_to not in RELATIVE_TO:
    raise ValueError(f"relative_to: expected one of {RELATIVE_TO}, got {relative_to!r}")
  if relative_to == "output" and params is None:
    raise ValueError("params: expected the unedited parameters for relative_to='output' "
                     "(the values stored at the keys need the kernel), got None")


def interference_matrix(log: EditLog, *, params: Any = None,
                        relative_to: str = "edit") -> Interference:
  """I[i, j], the change edit j makes at edit i's keys, for the log's active edits.

  Args:
    log: the :class:`memedit.sequential.EditLog`.
    params: the unedited parameters (needed for ``relative_to="output"``).
    relative_to: ``"edit"`` (edit i's own change there) or ``"output"`` (the values
      stored there after edit i).

  Returns:
    :class:`Interference`.

  Example:
    >>> import jax.numpy as jnp, memedit
    >>> from memedit.sequential import interference_matrix, log_append, log_init
    >>> a = memedit.make_edit(("k",), jnp.ones((2, 1)), jnp.array([[1.0, 0.0]]), label="a")
    >>> log = log_append(log_init(), a, jnp.eye(2)[:1])
    >>> interference_matrix(log, params={"k": jnp.ones((2, 2))}, relative_to="output").matrix
    array([[0.5]])
  """
  check_log(log)
  _check_relative(relative_to, params)
  pos = [i for i, e in enumerate(log.entries) if e.active]
  entries = [log.entries[i] for i in pos]
  _check_dims(entries)
  deltas = [edit_matrix(e.edit) for e in entries]
  n = len(entries)
  memories = {}  # the unedited memory matrix of each leaf, checked against every edit
  if relative_to == "output":
    for e in entries:
      m = memory_matrix(_kernel(params, e.edit), e.edit.kind, e.edit.in_ndim)
      memories.setdefault(_leaf(e.edit), m)
  mat = np.full((n, n), np.nan)
  for i, ei in enumerate(entries):
    same = [j for j in range(n) if _leaf(entries[j].edit) == _leaf(ei.edit)]
    if relative_to == "edit":
      denom = key_change(deltas[i], ei.keys, ei.weights)
    else:
      m = memories[_leaf(ei.edit)]
      m = m + sum((deltas[j] for j in same if j <= i), np.zeros_like(m))
      denom = key_change(m, ei.keys, ei.weights)
    for j in same:
      mat[i, j] = _ratio(key_change(deltas[j], ei.keys, ei.weights), denom)
  return Interference(mat, tuple(e.name for e in entries), tuple(pos), relative_to)


def _condition(m: np.ndarray) -> float:
  s = np.linalg.svd(m, compute_uv=False)
  return float(s[0] / s[-1]) if s[-1] > 0 else float("inf")


def growth(log: EditLog, params: Any) -> list[dict]:
  """The edited kernels' norm and condition number after each active edit.

  Args:
    log: the :class:`memedit.sequential.EditLog`.
    params: the unedited parameters.

  Returns:
    One dict per active entry, in order: ``position``, ``name``, ``path``, ``index``,
    ``norm`` (‖K‖_F after the edit), ``norm_growth`` (norm / the unedited norm − 1),
    ``condition`` (σ_max/σ_min of the memory matrix) and ``condition_growth``.

  Example:
    >>> import jax.numpy as jnp, memedit
    >>> from memedit.sequential import growth, log_append, log_init
    >>> e = memedit.make_edit(("k",), jnp.ones((2, 1)), jnp.array([[1.0, 0.0]]), label="a")
    >>> row, = growth(log_append(log_init(), e, jnp.eye(2)[:1]), {"k": jnp.eye(2)})
    >>> round(row["norm_growth"], 4), round(row["condition"], 4)
    (0.7321, 2.618)
  """
  check_log(log)
  rows, current, base = [], {}, {}
  for i, entry in enumerate(log.entries):
    if not entry.active:
      continue
    e = entry.edit
    leaf = _leaf(e)
    kernel = _kernel(params, e)
    if leaf not in current:
      m0 = memory_matrix(kernel, e.kind, e.in_ndim)
      base[leaf] = (np.linalg.norm(m0), _condition(m0))
      current[leaf] = m0
    current[leaf] = current[leaf] + edit_matrix(e)
    norm, cond = np.linalg.norm(current[leaf]), _condition(current[leaf])
    rows.append({"position": i, "name": e.name, "path": e.path, "index": e.index,
                 "norm": float(norm), "norm_growth": float(norm / base[leaf][0] - 1),
                 "condition": cond, "condition_growth": cond / base[leaf][1] - 1})
  return rows


class EditCheck(NamedTuple):
  """What :func:`check_edit` found before applying an edit.

  Attributes:
    name: the edit's name.
    earlier: names of the earlier active edits on the same leaf.
    interference: (m,) float64, the new edit's I[i, new] at each of them.
    relative_to: ``"edit"`` or ``"output"``.
    norm: (before, after) ‖K‖_F of the edited kernel (NaN without params).
    norm_growth: (before, after) norm / the unedited norm − 1.
    condition: (before, after) σ_max/σ_min of its memory matrix.
    condition_growth: (before, after) condition / the unedited one − 1.
    warnings: the messages warned (empty when all is within the thresholds).

  Example:
    >>> import jax.numpy as jnp, memedit
    >>> from memedit.sequential import check_edit, log_init
    >>> e = memedit.make_edit(("k",), jnp.ones((2, 1)), jnp.array([[1.0, 0.0]]))
    >>> check_edit(log_init(), e).interference.shape
    (0,)
  """

  name: str
  earlier: tuple
  interference: np.ndarray
  relative_to: str
  norm: tuple
  norm_growth: tuple
  condition: tuple
  condition_growth: tuple
  warnings: tuple


def check_edit(log: EditLog, edit: Edit, *, params: Any = None, relative_to: str = "edit",
               max_interference: float = 0.1, max_norm_growth: float = 0.1,
               max_condition_growth: float = 0.5, warn: bool = True) -> EditCheck:
  """Diagnostics of ``edit`` before it is applied after the log's active edits.

  For every earlier active edit i on the same leaf, I[i, new] (the new edit's change at
  edit i's keys, see the module docstring). With ``params``, the edited kernel's
  Frobenius norm and memory-matrix condition number before and after the edit, and
  their growth over the unedited kernel.

  Warns with :class:`InterferenceWarning` when I[i, new] exceeds ``max_interference``
  for some i, or when the norm or condition growth after the edit exceeds
  ``max_norm_growth`` or ``max_condition_growth``.

  Args:
    log: the :class:`memedit.sequential.EditLog` the edit would follow.
    edit: the new :class:`memedit.Edit`.
    params: the unedited parameters (None: no norms and condition numbers).
    relative_to: ``"edit"`` or ``"output"`` (needs ``params``).
    max_interference, max_norm_growth, max_condition_growth: thresholds (≥ 0).
    warn: issue the warnings (else only report them in ``warnings``).

  Returns:
    :class:`EditCheck`.

  Raises:
    ValueError: not an EditLog or an Edit, an edit already active in the log (its name
      is an active entry's), traced factors (under ``jax.jit``), a
      threshold that is not a number ≥ 0, an edit whose key dimension differs from the
      earlier edits' on its leaf, or ``params`` whose kernel does not fit the edits.

  Example:
    >>> import warnings, jax.numpy as jnp, memedit
    >>> from memedit.sequential import check_edit, log_append, log_init
    >>> a = memedit.make_edit(("k",), jnp.ones((2, 1)), jnp.array([[1.0, 0.0]]), label="a")
    >>> b = memedit.make_edit(("k",), jnp.ones((2, 1)), jnp.array([[1.0, 1.0]]), label="b")
    >>> log = log_append(log_init(), a, jnp.eye(2)[:1])
    >>> with warnings.catch_warnings(record=True) as caught:
    ...   warnings.simplefilter("always")
    ...   c = check_edit(log, b)
    >>> c.interference.tolist(), caught[0].category.__name__
    ([1.0], 'InterferenceWarning')
  """
  check_log(log)
  if not isinstance(edit, Edit):
    raise ValueError(f"edit: expected an Edit, got {type(edit).__name__}")
  if is_traced(edit.lam, edit.D):
    raise ValueError("edit: expected concrete factors (the check runs on the host in "
                     "float64), got traced ones; check outside jax.jit (sequential_insert: "
                     "pass check=False under jax.jit)")
  for i, e in enumerate(log.entries):
    if e.active and e.edit.name == edit.name:
      # Checked again after log_append, the edit would count twice: its change at its
      # own keys and the norms as if applied a second time.
      raise ValueError(f"edit: expected an edit not yet active in the log (check_edit "
                       f"predicts an edit before it is appended), got {edit.name!r}, active "
                       f"entry {i}; check it against the log without it, e.g. "
                       f"log_revert(log, {i})")
  _check_relative(relative_to, params)
  for name, v in (("max_interference", max_interference), ("max_norm_growth", max_norm_growth),
                  ("max_condition_growth", max_condition_growth)):
    check_scalar(v, name)
  leaf = _leaf(edit)
  delta = edit_matrix(edit)
  earlier = [e for e in log.entries if e.active and _leaf(e.edit) == leaf]
  for e in earlier:
    if int(np.shape(e.edit.D)[1]) != delta.shape[1]:
      raise ValueError(f"edit: expected factors of key dimension {int(np.shape(e.edit.D)[1])}"
                       f" like the earlier edit {e.name!r} on {edit.path!r}, got D "
                       f"{tuple(np.shape(edit.D))}")
  m0 = None
  if params is not None:
    m0 = memory_matrix(_kernel(params, edit), edit.kind, edit.in_ndim)
    for e in earlier:
      _kernel(params, e.edit)  # each earlier edit fits the kernel too
  inter, m_cur = [], m0
  deltas = [edit_matrix(e.edit) for e in earlier]
  for k, e in enumerate(earlier):
    if relative_to == "edit":
      denom = key_change(deltas[k], e.keys, e.weights)
    else:
      m_i = m0 + sum(deltas[:k + 1], np.zeros_like(m0))
      denom = key_change(m_i, e.keys, e.weights)
    inter.append(_ratio(key_change(delta, e.keys, e.weights), denom))
  inter = np.asarray(inter, np.float64)
  nan2 = (float("nan"), float("nan"))
  norm, norm_g, cond, cond_g = nan2, nan2, nan2, nan2
  if m0 is not None:
    m_cur = m0 + sum(deltas, np.zeros_like(m0))
    m_new = m_cur + delta
    n0, c0 = np.linalg.norm(m0), _condition(m0)
    norm = (float(np.linalg.norm(m_cur)), float(np.linalg.norm(m_new)))
    cond = (_condition(m_cur), _condition(m_new))
    norm_g = tuple(x / n0 - 1 for x in norm)
    cond_g = tuple(x / c0 - 1 for x in cond)
  msgs = []
  what = ("that edit's own change there" if relative_to == "edit"
          else "the values stored there")
  for e, x in zip(earlier, inter):
    if x > max_interference:
      msgs.append(f"edit {edit.name!r} changes the values at the keys of earlier edit "
                  f"{e.name!r} by {x:.3g} of {what} (threshold {max_interference:g})")
  if norm_g[1] > max_norm_growth:
    msgs.append(f"edit {edit.name!r} grows the Frobenius norm of {edit.path!r} to "
                f"{1 + norm_g[1]:.4g}x the unedited norm (threshold {1 + max_norm_growth:g}x)")
  if cond_g[1] > max_condition_growth:
    msgs.append(f"edit {edit.name!r} grows the condition number of {edit.path!r} to "
                f"{1 + cond_g[1]:.4g}x the unedited one (threshold "
                f"{1 + max_condition_growth:g}x)")
  if warn:
    for m in msgs:
      warnings.warn(m, InterferenceWarning, stacklevel=2)
  return EditCheck(edit.name, tuple(e.name for e in earlier), inter, relative_to, norm,
                   norm_g, cond, cond_g, tuple(msgs))
