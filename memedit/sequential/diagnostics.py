"""Interference diagnostics of sequential edits: the numbers and their tables.

The numbers (the memory matrices, the interference matrix I[i, j], the kernels' growth,
:func:`check_edit` and :class:`InterferenceWarning`) are computed in
:mod:`memedit.sequential.interference`, whose docstring gives the math, and re-exported
here; this module prints them as tables: :func:`format_check` (one edit before it is
applied) and :func:`format_log` (a whole log, as ``memedit log`` shows it).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from memedit.checks import check_scalar
from memedit.sequential.interference import (RELATIVE_TO, EditCheck, Interference,
                                             InterferenceWarning, check_edit, edit_matrix,
                                             growth, interference_matrix, key_change,
                                             memory_matrix)
from memedit.sequential.log import EditLog

__all__ = ["EditCheck", "Interference", "InterferenceWarning", "RELATIVE_TO", "check_edit",
           "edit_matrix", "format_check", "format_log", "growth", "interference_matrix",
           "key_change", "memory_matrix"]


def _path(edit_path, index) -> str:
  text = "/".join(map(str, edit_path))
  return text if index is None else f"{text}[{index}]"


def format_check(check: EditCheck, *, max_interference: float = 0.1) -> str:
  """The table of an :class:`EditCheck`: one row per earlier edit, then norm and condition.

  Args:
    check: from :func:`check_edit`.
    max_interference: rows above it are marked ``!``.

  Returns:
    The table as text (no trailing newline).

  Example:
    >>> import jax.numpy as jnp, memedit
    >>> from memedit.sequential import check_edit, format_check, log_init
    >>> e = memedit.make_edit(("k",), jnp.ones((2, 1)), jnp.array([[1.0, 0.0]]), label="a")
    >>> print(format_check(check_edit(log_init(), e, params={"k": jnp.eye(2)}, warn=False)))
    edit 'a': change at earlier edits' keys (relative to edit)
      (no earlier edit on this leaf)
      norm       1.414 -> 2.449  (+73.2 % over unedited)
      condition  1 -> 2.618  (+161.8 % over unedited)
  """
  if not isinstance(check, EditCheck):
    raise ValueError(f"check: expected an EditCheck (from check_edit), got "
                     f"{type(check).__name__}")
  check_scalar(max_interference, "max_interference")
  lines = [f"edit {check.name!r}: change at earlier edits' keys (relative to "
           f"{check.relative_to})"]
  if not check.earlier:
    lines.append("  (no earlier edit on this leaf)")
  width = max([len(n) for n in check.earlier] + [10])
  for n, x in zip(check.earlier, check.interference):
    lines.append(f"  {n:<{width}}  {x:9.4f}{'  !' if x > max_interference else ''}")
  if np.isfinite(check.norm[0]):
    lines.append(f"  norm       {check.norm[0]:.4g} -> {check.norm[1]:.4g}  "
                 f"({100 * check.norm_growth[1]:+.1f} % over unedited)")
    lines.append(f"  condition  {check.condition[0]:.4g} -> {check.condition[1]:.4g}  "
                 f"({100 * check.condition_growth[1]:+.1f} % over unedited)")
  return "\n".join(lines)


def format_log(log: EditLog, *, params: Any = None, relative_to: str = "edit",
               max_interference: float = 0.1, max_columns: int = 12) -> str:
  """The tables of a log: its entries, the interference matrix and (with params) growth.

  Args:
    log: the :class:`memedit.sequential.EditLog`.
    params: the unedited parameters (for ``relative_to="output"`` and the growth table).
    relative_to: ``"edit"`` or ``"output"``.
    max_interference: entries above it are marked ``!``.
    max_columns: print the whole matrix up to this many active edits, else the largest
      entries above the diagonal.

  Returns:
    The tables as text (no trailing newline).

  Example:
    >>> import jax.numpy as jnp, memedit
    >>> from memedit.sequential import format_log, log_append, log_init
    >>> a = memedit.make_edit(("k",), jnp.ones((2, 1)), jnp.array([[1.0, 0.0]]), label="a")
    >>> print(format_log(log_append(log_init(), a, jnp.eye(2)[:1])))
      #  edit  state   leaf  method  rank  keys  |dK|_F  max I[i, later]
      0  a     active  k             1     1     1.414   -
    interference I[i, j] (row i: edit i's keys; column j: edit j; relative to edit):
             0
      0  1.000
  """
  check_scalar(max_interference, "max_interference")
  if isinstance(max_columns, bool) or not isinstance(max_columns, (int, np.integer)) or (
      max_columns < 0):
    raise ValueError(f"max_columns: expected an int >= 0, got {max_columns!r}")
  inter = interference_matrix(log, params=params, relative_to=relative_to)
  col = {p: c for c, p in enumerate(inter.positions)}
  rows = [("#", "edit", "state", "leaf", "method", "rank", "keys", "|dK|_F",
           "max I[i, later]")]
  for i, entry in enumerate(log.entries):
    e = entry.edit
    later = "-"
    if entry.active:
      c = col[i]
      tail = inter.matrix[c, c + 1:]
      tail = tail[~np.isnan(tail)]  # NaN: another leaf; inf: edit i changed nothing
      if tail.size:
        later = f"{tail.max():.4f}" + ("  !" if tail.max() > max_interference else "")
    rows.append((str(i), e.name, "active" if entry.active else "reverted",
                 _path(e.path, e.index), e.method, str(e.rank), str(entry.keys.shape[0]),
                 f"{np.linalg.norm(edit_matrix(e)):.4g}", later))
  lines = _aligned(rows)
  n = len(inter.names)
  lines.append(f"interference I[i, j] (row i: edit i's keys; column j: edit j; relative to "
               f"{relative_to}):")
  if n == 0:
    lines.append("  (no active edit)")
  elif n <= max_columns:
    lines.append("     " + "".join(f"{p:>7}" for p in inter.positions))
    for r, p in enumerate(inter.positions):
      cells = "".join("      -" if np.isnan(x) else f"{x:7.3f}" for x in inter.matrix[r])
      lines.append(f"  {p:>3}{cells}")
  else:
    iu = [(r, c) for r in range(n) for c in range(r + 1, n) if not np.isnan(inter.matrix[r, c])]
    iu.sort(key=lambda rc: -inter.matrix[rc])
    lines.append("  largest entries above the diagonal (i, j, I[i, j]):")
    for r, c in iu[:10]:
      lines.append(f"  {inter.positions[r]:>4} {inter.positions[c]:>4}  {inter.matrix[r, c]:.4f}")
  if params is not None:
    lines.append("growth of the edited kernels (after each edit, over the unedited kernel):")
    rows = [("#", "leaf", "|K|_F", "growth", "condition", "growth")]
    rows += [(str(g["position"]), _path(g["path"], g["index"]), f"{g['norm']:.4g}",
              f"{100 * g['norm_growth']:+.2f} %", f"{g['condition']:.4g}",
              f"{100 * g['condition_growth']:+.2f} %") for g in growth(log, params)]
    lines += _aligned(rows)
  return "\n".join(lines)


def _aligned(rows: list) -> list[str]:
  """Rows of cells as left-aligned columns, indented by two spaces."""
  widths = [max(len(r[k]) for r in rows) for k in range(len(rows[0]))]
  return ["  " + "  ".join(x.ljust(w) for x, w in zip(r, widths)).rstrip() for r in rows]
