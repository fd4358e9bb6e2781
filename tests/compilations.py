"""Counting the XLA programs a block of code has to obtain.

A program counts when the in-memory caches of ``jax.jit`` do not hold it: XLA compiles
it, or it is read from the test run's persistent compilation cache (``conftest.py``).
Tests of "compiled once" and "no retracing" count both, so the shared cache never hides
a program that was requested again. Each program counts once: JAX times the cache lookup
and the compile together as one ``backend_compile_duration`` event, so a program read
from the cache gives that event and a ``cache_hits`` event before it (counting both would
count it twice whenever another test, or the other test process, had already put it in
the shared cache).
"""

from __future__ import annotations

import threading

import jax

COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"


class Compilations:
  """Counts programs compiled or read from the persistent cache while active.

  Compilation events are process-wide: a program compiled meanwhile by another thread
  (a job an earlier test left finishing) counts too, unless ``this_thread=True``, which
  counts only the programs the entering thread obtains (what eager calls on it compile).
  Each program is recorded in ``events`` with the name of the thread it came from, and
  marked as read from the persistent cache when it was.

  Example:
    >>> import jax, numpy as np
    >>> x = jax.device_put(np.ones(5, np.float32))
    >>> with Compilations() as c:
    ...   _ = jax.jit(lambda x: x * 3.0)(x)
    >>> c.count
    1
  """

  def __init__(self, this_thread: bool = False):
    self.this_thread = this_thread

  def __enter__(self) -> "Compilations":
    self.count = 0
    self.events: list[str] = []
    entered = threading.get_ident()
    hits: set[int] = set()  # threads whose program being obtained was a cache read

    def on_duration(event, duration, **kwargs):
      # Recorded once per program, after the cache lookup and any compile (a cache read
      # comes first as its own event, from the same thread).
      if event != COMPILE_EVENT:
        return
      thread = threading.get_ident()
      read = thread in hits
      hits.discard(thread)
      if self.this_thread and thread != entered:
        return
      self.count += 1
      source = " (read from the persistent cache)" if read else ""
      self.events.append(f"{event}{source} [{threading.current_thread().name}]")

    def on_event(event, **kwargs):
      if event == CACHE_HIT_EVENT:
        hits.add(threading.get_ident())

    self._listeners = (on_duration, on_event)
    jax.monitoring.register_event_duration_secs_listener(on_duration)
    jax.monitoring.register_event_listener(on_event)
    return self

  def __exit__(self, *exc) -> None:
    on_duration, on_event = self._listeners
    jax.monitoring.unregister_event_duration_listener(on_duration)
    jax.monitoring.unregister_event_listener(on_event)
