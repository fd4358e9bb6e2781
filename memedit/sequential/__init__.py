"""Sequential edits that hold: an edit log, null-space projected inserts, interference.

Edits applied one after another interfere: a later edit moves the values earlier edits
stored, and after many edits the layer's norm and conditioning drift. This package keeps
the edits of a model in order and keeps them apart:

- :mod:`~memedit.sequential.log`: :class:`EditLog`, a value holding each edit with the
  keys K*, values V* and settings it was made with; apply, revert and replay bit for bit
  (``K0 + Σ ΔK``); :mod:`~memedit.sequential.logfile` saves and loads it as one small
  ``.npz``.
- :mod:`~memedit.sequential.nullspace`: AlphaEdit's projector P onto the null space of
  the preserved keys (C plus the earlier edits' keys), its closed-form insert, and the
  projection of the directions D of a Λ solve.
- :mod:`~memedit.sequential.insert`: one edit at a time with ``project=True/False``.
- :mod:`~memedit.sequential.diagnostics`: before an edit is applied, from the factors
  alone: its change at every earlier edit's keys (the interference matrix), the growth
  of the kernel's norm and condition number, :class:`InterferenceWarning` past
  thresholds (computed in :mod:`~memedit.sequential.interference`), and the tables
  ``memedit log`` prints (:mod:`~memedit.sequential.cli`).

Example:
  >>> import jax.numpy as jnp
  >>> from memedit.sequential import log_apply, log_init, log_revert, sequential_insert
  >>> params = {"k": jnp.zeros((3, 1))}
  >>> C = jnp.diag(jnp.array([1.0, 1e-4, 1e-4]))
  >>> log, _ = sequential_insert(params, log_init(), C, jnp.array([[0.0, 5.0, 0.0]]),
  ...                            jnp.array([[1.0]]), ("k",), l2=1e-3)
  >>> bool((log_apply(params, log_revert(log, 0))["k"] == params["k"]).all())
  True
"""

from memedit.sequential.diagnostics import (RELATIVE_TO, EditCheck, Interference,
                                            InterferenceWarning, check_edit, edit_matrix,
                                            format_check, format_log, growth,
                                            interference_matrix, key_change, memory_matrix)
from memedit.sequential.insert import sequential_directions, sequential_insert
from memedit.sequential.log import (EditLog, LogEntry, log_append, log_apply, log_entry,
                                    log_history, log_init, log_keys, log_replay, log_revert)
from memedit.sequential.logfile import load_log, save_log
from memedit.sequential.nullspace import (NullSpace, insert_null_space, key_moment, null_space,
                                          project_directions)

__all__ = [
    # the log
    "EditLog", "LogEntry", "load_log", "log_append", "log_apply", "log_entry", "log_history",
    "log_init", "log_keys", "log_replay", "log_revert", "save_log",
    # null-space projection
    "NullSpace", "insert_null_space", "key_moment", "null_space", "project_directions",
    "sequential_directions", "sequential_insert",
    # diagnostics
    "EditCheck", "Interference", "InterferenceWarning", "RELATIVE_TO", "check_edit",
    "edit_matrix", "format_check", "format_log", "growth", "interference_matrix",
    "key_change", "memory_matrix",
]
