"""Run directories of :mod:`ports.stylegan2.train`: the run record, the loss log and
orbax checkpoints (process-local, synchronous)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
from typing import Any

import jax
import numpy as np

__all__ = ["CHECKPOINTS", "LOG_FILE", "RUN_FILE", "RUN_FORMAT", "check_fresh", "check_resume",
           "log_row", "manager", "read_run", "run_record", "run_files", "save",
           "sigterm_as_interrupt", "to_host", "truncate_log"]

RUN_FORMAT = 1
RUN_FILE = "run.json"
LOG_FILE = "log.jsonl"
CHECKPOINTS = "checkpoints"



def manager(run_dir: str, keep: int | None = 2):
  """The run's orbax CheckpointManager (this process only, synchronous)."""
  import orbax.checkpoint as ocp

  me = jax.process_index()
  os.makedirs(os.path.join(run_dir, CHECKPOINTS), exist_ok=True)
  options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, create=False, enable_async_checkpointing=False,
      multiprocessing_options=ocp.options.MultiprocessingOptions(
          primary_host=me, active_processes={me}))
  return ocp.CheckpointManager(os.path.join(run_dir, CHECKPOINTS), options=options)


def run_record(cfg: Any, teacher: Any) -> dict:
  """The run's record: format, configuration (``cfg.to_json()``) and the teacher's identity."""
  return {"format": RUN_FORMAT, "config": cfg.to_json(),
          "teacher": {"digest": teacher.digest, "z_dim": teacher.z_dim,
                      "resolution": teacher.resolution}}


def read_run(run_dir: str) -> dict:
  """The run record of ``run_dir`` (a ValueError if it is not one)."""
  from memedit import _io

  record = _io.read_json(os.path.join(run_dir, RUN_FILE))
  if (not isinstance(record, dict) or record.get("format") != RUN_FORMAT
      or not isinstance(record.get("config"), dict)
      or not isinstance(record.get("teacher"), dict)
      or not {"digest", "z_dim", "resolution"} <= set(record["teacher"])):
    raise ValueError(f"{os.path.join(run_dir, RUN_FILE)}: expected a training run record "
                     f"of format {RUN_FORMAT} (a 'config' object and a 'teacher' object with "
                     f"digest, z_dim and resolution), got {str(record)[:80]}")
  return record


def check_resume(run_dir: str, record: dict) -> None:
  """Raises a ValueError if ``record`` differs from the run's stored record."""
  old = read_run(run_dir)
  problems = []
  for k, v in record["config"].items():
    if old["config"].get(k) != v:
      problems.append(f"{k}: run has {old['config'].get(k)!r}, asked {v!r}")
  if old["teacher"] != record["teacher"]:
    problems.append(f"teacher: run has {old['teacher']}, given {record['teacher']}")
  if problems:
    raise ValueError(f"{run_dir}: expected the configuration and teacher the run was "
                     f"started with (start a new run directory to change them), got "
                     + "; ".join(problems))


def check_fresh(run_dir: str) -> None:
  """Raises a ValueError if a new run cannot start in ``run_dir`` without touching what is
  there: a directory without ``run.json`` may hold anything of the user's except the
  run's own ``log.jsonl`` and a non-empty ``checkpoints/`` (orbax would read the entries
  there as checkpoints, and delete them as old ones)."""
  if os.path.lexists(run_dir) and not os.path.isdir(run_dir):
    raise ValueError(f"{run_dir}: expected a run directory (new or existing), got a file")
  found = []
  if os.path.lexists(os.path.join(run_dir, LOG_FILE)):
    found.append(LOG_FILE)
  ckpt = os.path.join(run_dir, CHECKPOINTS)
  if os.path.lexists(ckpt) and (not os.path.isdir(ckpt) or os.listdir(ckpt)):
    found.append(CHECKPOINTS + ("/" + ", ".join(sorted(os.listdir(ckpt))[:5])
                                if os.path.isdir(ckpt) else " (not a directory)"))
  if found:
    raise ValueError(f"{run_dir}: expected a training run (with {RUN_FILE}) or a directory "
                     f"free of a run's files, got no {RUN_FILE} but {'; '.join(found)} "
                     f"(choose another run directory)")


def run_files(run_dir: str) -> list[str]:
  """The absolute paths a run owns: its record, its log, its checkpoints and the teacher
  converted into it (an output written over one of them would destroy the run)."""
  run_dir = os.path.abspath(os.fspath(run_dir))
  return [os.path.join(run_dir, name) for name in (RUN_FILE, LOG_FILE, CHECKPOINTS, "teacher")]


def log_row(run_dir: str, row: dict) -> None:
  """Appends one JSON row to the run's loss log."""
  with open(os.path.join(run_dir, LOG_FILE), "a") as f:
    f.write(json.dumps(row) + "\n")


def truncate_log(run_dir: str, step: int) -> None:
  """Drops the loss log's rows of steps after ``step`` (the checkpoint a run resumes
  from, whose later steps it runs and logs again) and a torn last line (a crash in the
  middle of a write). The kept rows are written to a temporary file that replaces the
  log, so a crash meanwhile leaves the old log whole; other lines are kept as they are."""
  from memedit import _io

  path = os.path.join(run_dir, LOG_FILE)
  try:
    with open(path, "rb") as f:
      data = f.read()
  except FileNotFoundError:
    return
  lines = data.split(b"\n")
  last = lines.pop()  # b"" after a final newline, else a line the crash cut short
  kept = []
  for i, line in enumerate(lines + [last] if last else lines):
    try:
      row = json.loads(line)
    except ValueError:
      if i == len(lines):  # the torn last line
        continue
      kept.append(line)
      continue
    if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] > step:
      continue
    kept.append(line)
  new = b"".join(line + b"\n" for line in kept)
  if new != data:
    _io.atomic_write_bytes(path, new)


def to_host(tree):
  """The pytree with numpy leaves."""
  return jax.tree_util.tree_map(np.asarray, tree)


def save(manager, state: dict) -> None:
  """Saves ``state`` at its step (nothing if that step is already saved).

  Raises:
    ValueError: the state holds NaN or infinite values (a diverged run): nothing is
      saved, so the finite checkpoints are kept rather than rotated out.
  """
  import orbax.checkpoint as ocp

  step = int(state["step"])
  if manager.latest_step() == step:
    return
  host = to_host(state)
  bad = [jax.tree_util.keystr(path) for path, x in jax.tree_util.tree_leaves_with_path(host)
         if np.issubdtype(x.dtype, np.inexact) and not np.all(np.isfinite(x))]
  if bad:
    raise ValueError(f"training state at step {step}: expected finite values, got NaN or "
                     f"infinite ones in {', '.join(bad[:4])}{' ...' if len(bad) > 4 else ''}"
                     f" (the run diverged: not saved; the last checkpoint is step "
                     f"{manager.latest_step()}; lower the learning rate in a new run)")
  manager.save(step, args=ocp.args.StandardSave(host), force=True)
  manager.wait_until_finished()


@contextlib.contextmanager
def sigterm_as_interrupt():
  """Turns SIGTERM into KeyboardInterrupt (main thread only), so a killed run saves."""
  try:
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
  except ValueError:  # not the main thread
    yield
    return
  try:
    yield
  finally:
    signal.signal(signal.SIGTERM, previous)
