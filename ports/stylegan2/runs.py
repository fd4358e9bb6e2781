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

__all__ = ["CHECKPOINTS", "LOG_FILE", "RUN_FILE", "RUN_FORMAT", "check_resume", "log_row",
           "manager", "read_run", "run_record", "save", "sigterm_as_interrupt", "to_host"]

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
  if not isinstance(record, dict) or record.get("format") != RUN_FORMAT:
    raise ValueError(f"{os.path.join(run_dir, RUN_FILE)}: expected a training run record "
                     f"of format {RUN_FORMAT}, got {str(record)[:80]}")
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


def log_row(run_dir: str, row: dict) -> None:
  """Appends one JSON row to the run's loss log."""
  with open(os.path.join(run_dir, LOG_FILE), "a") as f:
    f.write(json.dumps(row) + "\n")


def to_host(tree):
  """The pytree with numpy leaves."""
  return jax.tree_util.tree_map(np.asarray, tree)


def save(manager, state: dict) -> None:
  """Saves ``state`` at its step (nothing if that step is already saved)."""
  import orbax.checkpoint as ocp

  step = int(state["step"])
  if manager.latest_step() == step:
    return
  manager.save(step, args=ocp.args.StandardSave(to_host(state)), force=True)
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
