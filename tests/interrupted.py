"""A stream of batches stopped part-way, as a user's Ctrl-C stops it: the tests of
resumable statistics caches start from it."""

from __future__ import annotations

import pytest

import memedit


def interrupt_stream(batches, at: int, *, group: int = 1, **kw) -> None:
  """Streams ``batches`` (``group`` a program) into ``stream_covariance(..., **kw)`` and
  stops it with a KeyboardInterrupt when batch ``at`` is asked for."""
  def stream():
    for i, x in enumerate(batches):
      if i == at:
        raise KeyboardInterrupt
      yield x

  with pytest.raises(KeyboardInterrupt):
    memedit.stream_covariance(stream(), group=group, progress=False, **kw)
