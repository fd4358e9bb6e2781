"""Counting the XLA programs a block of code has to obtain.

A program counts when the in-memory caches of ``jax.jit`` do not hold it: XLA compiles
it, or it is read from the test run's persistent compilation cache (``conftest.py``).
Tests of "compiled once" and "no retracing" count both, so the shared cache never hides
a program that was requested again.
"""

from __future__ import annotations

import jax

COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"


class Compilations:
  """Counts programs compiled or read from the persistent cache while active.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> with Compilations() as c:
    ...   _ = jax.jit(lambda x: x * 3.0)(jnp.ones(5))
    >>> c.count
    1
  """

  def __enter__(self) -> "Compilations":
    self.count = 0
    self.events: list[str] = []

    def on_duration(event, duration, **kwargs):
      if event == COMPILE_EVENT:
        self.count += 1
        self.events.append(event)

    def on_event(event, **kwargs):
      if event == CACHE_HIT_EVENT:
        self.count += 1
        self.events.append(event)

    self._listeners = (on_duration, on_event)
    jax.monitoring.register_event_duration_secs_listener(on_duration)
    jax.monitoring.register_event_listener(on_event)
    return self

  def __exit__(self, *exc) -> None:
    on_duration, on_event = self._listeners
    jax.monitoring.unregister_event_duration_listener(on_duration)
    jax.monitoring.unregister_event_listener(on_event)
