"""Run directories of :mod:`ports.stylegan2.train`: the run record, the loss log,
orbax checkpoints (process-local, synchronous) and the lock of the process training
there."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
from typing import Any

import jax
import numpy as np

from memedit._io import STORE_UNSAFE_CHARACTERS

__all__ = ["CHECKPOINTS", "LOCK_FILE", "LOG_FILE", "RUN_FILE", "RUN_FORMAT",
           "RunInUseError", "UNSAFE_PATH_CHARACTERS", "check_fresh", "check_path",
           "check_resume", "last_logged_step", "lock", "log_row", "manager", "read_run",
           "resumable", "run_record", "run_files", "save", "sigterm_as_interrupt", "to_host",
           "truncate_log"]

RUN_FORMAT = 1
RUN_FILE = "run.json"
LOG_FILE = "log.jsonl"
CHECKPOINTS = "checkpoints"
#: The file a training process holds an exclusive ``flock`` on (see :func:`lock`).
LOCK_FILE = ".training.lock"


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


#: Characters the checkpoint store does not take literally in a local path (memedit's own
#: saves reach such paths through a link; a run's checkpoint manager, which lives as long
#: as the run, refuses them).
UNSAFE_PATH_CHARACTERS = STORE_UNSAFE_CHARACTERS


def check_path(run_dir: str) -> None:
  """Raises a ValueError if the run directory's absolute path holds a character of
  :data:`UNSAFE_PATH_CHARACTERS` (before anything is written there)."""
  path = os.path.abspath(os.fspath(run_dir))
  bad = [c for c in UNSAFE_PATH_CHARACTERS if c in path]
  if bad:
    raise ValueError(f"{path}: expected a run directory path without {' '.join(bad)} (the "
                     f"checkpoint store reads a backslash as a separator and brackets as a "
                     f"pattern), got one with them; choose another path")


class RunInUseError(ValueError):
  """A run directory another process (or this one) is training in."""


#: Run directories whose lock this process holds (their real paths).
_HELD: set[str] = set()
_HELD_GUARD = threading.Lock()


def _holder(path: str) -> str:
  """Who holds the lock file ``path``, as its holder wrote it (informational)."""
  try:
    with open(path, "rb") as f:
      pid = f.read(32).strip()
  except OSError:
    pid = b""
  return f"another process (pid {pid.decode()})" if pid.isdigit() else "another process"


def _in_use(run_dir: str, who: str) -> RunInUseError:
  return RunInUseError(
      f"{run_dir}: expected a run directory no other process is training in, got one "
      f"in which {who} is training (it holds the run's lock, {LOCK_FILE}); wait for it "
      f"to end or stop it (restore, evaluate, preview and export of the run work "
      f"meanwhile)")


def _remove_created(created: list[str]) -> None:
  """Removes the folders :func:`lock` created (deepest first) while they are empty."""
  for folder in created:
    try:
      os.rmdir(folder)
    except OSError:
      return


@contextlib.contextmanager
def lock(run_dir: str | os.PathLike):
  """Holds the run directory's training lock: an exclusive ``flock`` on its
  :data:`LOCK_FILE` (which records this process's id), taken without waiting.

  A training process holds it from its set-up to its end, so that two processes never
  write one run's checkpoints, log and record at once; reading a run takes no lock. The
  kernel releases the lock of a process that dies (a kill, a crash), so a later start
  proceeds; the file it leaves is not a file of the run (:func:`check_fresh` ignores it)
  and is removed by the next holder as it lets go. The directory (and missing parents) is
  created to hold the lock and removed again if it is still empty when the lock is let
  go (a refused start leaves nothing). It is not reentrant: a holder taking it again
  (a second ``train`` of the run from a callback of the first) is refused too. Where the
  file system has no ``flock``, only this process's own holders are told apart.

  Raises:
    RunInUseError: another process, or this one, holds the lock.
    ValueError: ``run_dir`` is a file or a dangling link.
    OSError: the directory or its lock file cannot be created (read-only media).
  """
  from memedit import _io

  run_dir = os.path.abspath(os.fspath(run_dir))
  if os.path.lexists(run_dir) and not os.path.isdir(run_dir):
    check_fresh(run_dir)  # names what is there instead
  created, folder = [], run_dir
  while not os.path.lexists(folder) and os.path.dirname(folder) != folder:
    created.append(folder)
    folder = os.path.dirname(folder)
  try:
    os.makedirs(run_dir, exist_ok=True)
  except OSError as e:
    _remove_created(created)
    raise OSError(e.errno, f"{e.strerror}: cannot create the run directory {run_dir}",
                  run_dir) from e
  key = os.path.realpath(run_dir)
  with _HELD_GUARD:  # (file systems emulating flock per process would let it through)
    if key in _HELD:
      _remove_created(created)
      raise _in_use(run_dir, f"this process (pid {os.getpid()})")
    _HELD.add(key)
  path = os.path.join(run_dir, LOCK_FILE)
  fd = None
  try:
    while True:
      try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o666)
      except OSError as e:
        raise OSError(e.errno, f"{e.strerror}: cannot create {path}, the lock of a run "
                      f"being trained (a run trains in a folder it may write)", path) from e
      taken = _io._flock(fd, blocking=False)
      if taken is False:
        os.close(fd)
        fd = None
        raise _in_use(run_dir, _holder(path))
      if taken is None or _io._names(path, fd):
        break
      # Its previous holder removed the file as it let go: lock the one there now.
      os.close(fd)
      fd = None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
  except BaseException:
    if fd is not None:
      os.close(fd)
    with _HELD_GUARD:
      _HELD.discard(key)
    _remove_created(created)
    raise
  try:
    yield
  finally:
    with _HELD_GUARD:
      _HELD.discard(key)
    # Removed while still locked: a process that opened it meanwhile finds, once it has
    # the lock, that the name no longer refers to its file, and opens the new one.
    with contextlib.suppress(OSError):
      os.unlink(path)
    os.close(fd)
    _remove_created(created)


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


def _orbax_temporary(name: str) -> bool:
  """Whether a ``checkpoints/`` entry is orbax's unfinished save (``0.orbax-checkpoint-tmp``,
  removed by orbax when that step is saved again)."""
  return ".orbax-checkpoint-tmp" in name


def _setup_interrupted(run_dir: str) -> bool:
  """Whether ``run_dir`` holds a new run's set-up that stopped before checkpoint 0: a
  valid ``run.json``, no ``log.jsonl`` and no ``checkpoints/`` entry but orbax's unfinished
  save of step 0."""
  if not os.path.isfile(os.path.join(run_dir, RUN_FILE)):
    return False
  if os.path.lexists(os.path.join(run_dir, LOG_FILE)):
    return False
  ckpt = os.path.join(run_dir, CHECKPOINTS)
  if os.path.lexists(ckpt) and (not os.path.isdir(ckpt) or not all(
      _orbax_temporary(name) for name in os.listdir(ckpt))):
    return False
  try:
    read_run(run_dir)  # a run.json of the user's own is never taken for the run's
  except (ValueError, OSError):
    return False
  return True


def resumable(run_dir: str) -> bool:
  """Whether a start in ``run_dir`` resumes the run there (checked by :func:`check_resume`)
  rather than beginning a new one (checked by :func:`check_fresh`).

  A new run's set-up writes ``run.json``, then checkpoint 0 (its first log row comes
  after step 1). A Ctrl-C or kill in between (while the initial state is drawn or saved)
  leaves a ``run.json`` with no checkpoint and no log: no run to resume, whose settings a
  new start would have to repeat, but a set-up that never finished. A start there begins
  a new run with its own settings and replaces that ``run.json`` (and orbax's unfinished
  save of step 0, which orbax removes); nothing else is touched, and a ``run.json`` that
  is not a run record is never replaced. Making the set-up itself atomic would not do:
  a new run may start in a user's existing folder (no directory rename), and a
  checkpoint written before ``run.json`` would look like another run's files.
  """
  return (os.path.isfile(os.path.join(run_dir, RUN_FILE))
          and not _setup_interrupted(run_dir))


def check_fresh(run_dir: str) -> None:
  """Raises a ValueError if a new run cannot start in ``run_dir`` without touching what is
  there: a directory without ``run.json`` may hold anything of the user's except the
  run's own ``log.jsonl`` and a non-empty ``checkpoints/`` (orbax would read the entries
  there as checkpoints, and delete them as old ones); one whose set-up stopped before
  checkpoint 0 (see :func:`resumable`) may also hold its ``run.json`` and orbax's
  unfinished save of step 0. A :data:`LOCK_FILE` (a killed trainer's) is not a file of a
  run."""
  if os.path.lexists(run_dir) and not os.path.isdir(run_dir):
    what = ("a symbolic link to nothing" if os.path.islink(run_dir) and not
            os.path.exists(run_dir) else "a file")
    raise ValueError(f"{run_dir}: expected a run directory (new or existing), got {what}")
  record = os.path.join(run_dir, RUN_FILE)
  if os.path.lexists(record) and not os.path.isfile(record):
    what = ("a directory" if os.path.isdir(record) else "a symbolic link to nothing"
            if not os.path.exists(record) else "something other than a file")
    raise ValueError(f"{record}: expected the run's record (a file) or nothing, got {what}")
  interrupted = _setup_interrupted(run_dir)
  found = []
  if os.path.lexists(os.path.join(run_dir, LOG_FILE)):
    found.append(LOG_FILE)
  ckpt = os.path.join(run_dir, CHECKPOINTS)
  entries = sorted(os.listdir(ckpt)) if os.path.isdir(ckpt) else []
  if interrupted:
    entries = [name for name in entries if not _orbax_temporary(name)]
  if os.path.lexists(ckpt) and (not os.path.isdir(ckpt) or entries):
    found.append(CHECKPOINTS + ("/" + ", ".join(entries[:5])
                                if os.path.isdir(ckpt) else " (not a directory)"))
  if found:
    raise ValueError(f"{run_dir}: expected a training run (with {RUN_FILE}) or a directory "
                     f"free of a run's files, got no {RUN_FILE} but {'; '.join(found)} "
                     f"(choose another run directory)")


def run_files(run_dir: str) -> list[str]:
  """The absolute paths a run owns: its record, its log, its checkpoints, the teacher
  converted into it and its lock file (an output written over one of them would destroy
  the run, or let a second process train in it)."""
  run_dir = os.path.abspath(os.fspath(run_dir))
  return [os.path.join(run_dir, name)
          for name in (RUN_FILE, LOG_FILE, CHECKPOINTS, "teacher", LOCK_FILE)]


def log_row(run_dir: str, row: dict) -> None:
  """Appends one JSON row to the run's loss log."""
  with open(os.path.join(run_dir, LOG_FILE), "a") as f:
    f.write(json.dumps(row) + "\n")


def last_logged_step(run_dir: str) -> int | None:
  """The step of the loss log's last row (None: no log, or no row in it); lines that are
  not rows (a torn last line, the user's own) are passed over."""
  try:
    with open(os.path.join(run_dir, LOG_FILE), "rb") as f:
      lines = f.read().split(b"\n")
  except FileNotFoundError:
    return None
  for line in reversed(lines):
    try:
      row = json.loads(line)
    except ValueError:
      continue
    if isinstance(row, dict) and type(row.get("step")) is int:
      return row["step"]
  return None


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
