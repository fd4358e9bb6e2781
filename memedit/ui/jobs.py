"""Long computations of the rewriting UI in background threads, with progress to poll.

A :class:`Job` runs one function in a daemon thread; the function reports its phase, a
fraction done and any numbers (e.g. the solver's losses) through :meth:`Job.report`, and
the page polls :meth:`Job.snapshot`. :meth:`Job.cancel` asks a running job to stop: the
function sees the request at its next :meth:`Job.check` (between batches, or when a
chunk of solver steps ends, :func:`solve_progress`) and the job ends "cancelled"; once it
has started publishing its result (:meth:`Job.seal`) it can no longer be cancelled, so a
cancelled job has changed nothing. A :class:`JobSlot` lets one job run at a time per
session and keeps the last few finished ones. Requests that only read (the grid, a job's
progress) are served while a job runs, so the page keeps showing progress.

:func:`stderr_progress` turns the text progress bar that :mod:`memedit.covariance` writes
on stderr into calls of a function, for the thread that asked only (other threads' output
goes to stderr as before).
"""

from __future__ import annotations

import contextlib
import re
import secrets
import sys
import threading
import time
import traceback
from typing import Any, Callable

import numpy as np

__all__ = ["Busy", "Cancelled", "Finished", "Job", "JobSlot", "error_text", "solve_progress",
           "stderr_progress", "thin_losses"]

_KEEP = 16


class Busy(RuntimeError):
  """Another job of the same session is still running."""


class Cancelled(Exception):
  """Raised inside a job's function when the job was asked to stop (:meth:`Job.check`)."""


class Finished(RuntimeError):
  """A job cannot be cancelled: it has ended, or is publishing its result."""


def error_text(e: BaseException) -> str:
  """An unexpected exception as the page is told it: its type and message, one line;
  an OSError without the file names it carries (this machine's paths are not sent to
  the page; the server's log has them).

  Example:
    >>> error_text(PermissionError(13, "Permission denied", "/home/me/.cache/ui/x"))
    'PermissionError: [Errno 13] Permission denied'
  """
  if isinstance(e, OSError) and e.strerror:
    text = e.strerror if e.errno is None else f"[Errno {e.errno}] {e.strerror}"
  else:
    text = str(e)
  return f"{type(e).__name__}: {' '.join(text.split())}"


class Job:
  """One background computation.

  Attributes:
    id: random hex identifier.
    kind: what it computes ("execute", "search", ...).
    status: "running", "done", "error" or "cancelled".
  """

  def __init__(self, kind: str):
    self.id = secrets.token_hex(6)
    self.kind = kind
    self.status = "running"
    self._lock = threading.Lock()
    self._fields: dict = {"phase": "starting", "fraction": None, "message": ""}
    self.result: Any = None
    self.error: str | None = None
    self.started = time.time()
    self.finished: float | None = None
    self._cancel = False
    self._sealed = False

  def report(self, **fields) -> None:
    """Updates the progress fields (phase, fraction in [0, 1] or None, message, ...)."""
    with self._lock:
      self._fields.update(fields)

  def cancel(self) -> None:
    """Asks the job to stop at its next :meth:`check` (asking again changes nothing).

    Raises:
      Finished: the job has ended, or is publishing its result (:meth:`seal`).
    """
    with self._lock:
      if self.status != "running":
        raise Finished(f"job: {self.kind} job {self.id} has already ended ({self.status}); "
                       "there is nothing to cancel")
      if self._sealed:
        raise Finished(f"job: {self.kind} job {self.id} has finished its work and is saving "
                       "its result; too late to cancel")
      self._cancel = True

  def check(self) -> None:
    """Raises :class:`Cancelled` if the job was asked to stop."""
    if self._cancel:
      raise Cancelled(f"{self.kind} cancelled")

  def seal(self) -> None:
    """Marks the point of no return before the job publishes its result: raises
    :class:`Cancelled` if it was asked to stop, else refuses later requests."""
    with self._lock:
      if self._cancel:
        raise Cancelled(f"{self.kind} cancelled")
      self._sealed = True

  def snapshot(self) -> dict:
    """A JSON-able view: id, kind, status, elapsed seconds, whether it was asked to
    stop (``cancelling``), the progress fields, and the result (when done) or the error
    message (when failed)."""
    with self._lock:
      out = {"id": self.id, "kind": self.kind, "status": self.status,
             "elapsed": round((self.finished or time.time()) - self.started, 3),
             "cancelling": self._cancel and self.status == "running", **self._fields}
      if self.status == "done":
        out["result"] = self.result
      if self.status == "error":
        out["error"] = self.error
    return out

  def run(self, fn: Callable[["Job"], Any]) -> None:
    """Runs ``fn(self)``; its return value becomes the result, a ValueError's message
    (or any other exception's type and message) the error; :class:`Cancelled` (from
    :meth:`check` or :meth:`seal`) ends it "cancelled"."""
    try:
      result = fn(self)
      with self._lock:
        if self._cancel and not self._sealed:  # asked to stop after its last check
          raise Cancelled(f"{self.kind} cancelled")
        self.result, self.status = result, "done"
    except Cancelled:
      with self._lock:
        self._fields.update(phase="cancelled", message="")
        self.status = "cancelled"
    except ValueError as e:
      with self._lock:
        self.error, self.status = " ".join(str(e).split()), "error"
    except Exception as e:  # noqa: BLE001 - reported on the page; the server stays up
      traceback.print_exc()
      with self._lock:
        self.error, self.status = error_text(e), "error"
    finally:
      self.finished = time.time()

  def wait(self, timeout: float | None = None) -> bool:
    """Blocks until the job ends (True) or ``timeout`` seconds pass (False)."""
    t_end = None if timeout is None else time.time() + timeout
    while self.status == "running":
      if t_end is not None and time.time() > t_end:
        return False
      time.sleep(0.01)
    return True


class JobSlot:
  """At most one running job; the last finished ones are kept for polling."""

  def __init__(self):
    self._lock = threading.Lock()
    self._jobs: dict[str, Job] = {}
    self.current: Job | None = None

  def start(self, kind: str, fn: Callable[[Job], Any]) -> Job:
    """Starts ``fn`` in a daemon thread as a job of ``kind``.

    Raises:
      Busy: a job is still running.

    Example:
      >>> slot = JobSlot()
      >>> job = slot.start("double", lambda job: 2 * 21)
      >>> job.wait(10), job.snapshot()["result"]
      (True, 42)
    """
    with self._lock:
      cur = self.current
      if cur is not None and cur.status == "running":
        if cur._cancel:
          raise Busy(f"busy: {cur.kind} is being cancelled; it stops at the end of its "
                     "current chunk of work, try again then")
        raise Busy(f"busy: {cur.kind} is still running; wait for it to finish")
      job = Job(kind)
      self._jobs[job.id] = job
      while len(self._jobs) > _KEEP:
        self._jobs.pop(next(iter(self._jobs)))
      self.current = job
    threading.Thread(target=job.run, args=(fn,), name=f"memedit-ui-{kind}",
                     daemon=True).start()
    return job

  def get(self, job_id: str | None = None) -> Job | None:
    """Job ``job_id``, or the latest one when None (None when there is none)."""
    with self._lock:
      return self.current if job_id is None else self._jobs.get(job_id)


def thin_losses(losses, most: int = 200) -> list[float]:
  """At most ``most`` of ``losses`` as floats, evenly spaced (the first and last kept).

  Example:
    >>> thin_losses(range(10), 4)
    [0.0, 3.0, 6.0, 9.0]
  """
  losses = np.asarray(losses, np.float64).reshape(-1)
  if losses.size > most:
    losses = losses[np.linspace(0, losses.size - 1, most).round().astype(int)]
  return [float(x) for x in losses]


def solve_progress(job: Job, steps: int) -> Callable[[int, float], None]:
  """The progress hook of a Λ solve of ``steps`` steps (:func:`memedit.solve_lambda`'s
  ``progress``): reports the fraction done, ``step``, ``steps``, ``loss`` and ``losses``
  (those seen so far, thinned) on ``job``; called from the runtime's callback thread.
  Once the job is asked to stop it raises :class:`Cancelled`, which stops the solve at
  the end of its current chunk of steps.

  Example:
    >>> job = Job("execute")
    >>> hook = solve_progress(job, 4)
    >>> for t, loss in enumerate([0.5, 0.4, 0.35]):
    ...   hook(t, loss)
    >>> snap = job.snapshot()
    >>> snap["fraction"], snap["step"], snap["losses"]
    (0.5, 2, [0.5, 0.4, 0.35])
  """
  steps, seen = int(steps), []

  def hook(step: int, loss: float) -> None:
    if step < steps:
      seen.append(float(loss))
    job.report(fraction=min(step, steps) / steps, step=int(step), steps=steps,
               loss=float(loss), losses=thin_losses(seen))
    job.check()

  return hook


class _StderrTap:
  """A stand-in for sys.stderr that hands the writes of listening threads to them."""

  def __init__(self, target):
    self.target = target
    self.listeners: dict[int, Callable[[str], None]] = {}

  def write(self, text):
    fn = self.listeners.get(threading.get_ident())
    if fn is None:
      return self.target.write(text)
    fn(text)
    return len(text)

  def flush(self):
    if threading.get_ident() not in self.listeners:
      self.target.flush()

  def __getattr__(self, name):
    return getattr(self.target, name)


_TAP_LOCK = threading.Lock()
_BATCHES = re.compile(r"(\d+)/(\d+) batches")


@contextlib.contextmanager
def stderr_progress(callback: Callable[[int, int], None]):
  """Within the block, "done/total batches" progress text this thread writes on stderr
  calls ``callback(done, total)`` instead of being printed.

  Example:
    >>> seen = []
    >>> with stderr_progress(lambda done, total: seen.append((done, total))):
    ...   _ = sys.stderr.write("\\rcovariance [###...] 3/10 batches")
    >>> seen
    [(3, 10)]
  """
  with _TAP_LOCK:
    if not isinstance(sys.stderr, _StderrTap):
      sys.stderr = _StderrTap(sys.stderr)
    tap = sys.stderr
  me = threading.get_ident()

  def listen(text):
    found = _BATCHES.findall(text)
    if found:
      done, total = found[-1]
      callback(int(done), int(total))

  tap.listeners[me] = listen
  try:
    yield
  finally:
    tap.listeners.pop(me, None)
