"""memedit.stream_cache: one statistics cache written by several threads of one process."""

from __future__ import annotations

import threading

import numpy as np

import memedit
from memedit import _io


def _run_threads(target, n: int, timeout: float) -> list:
  """Runs ``target(i)`` on ``n`` daemon threads; returns what each returned or raised."""
  out = [None] * n

  def run(i):
    try:
      out[i] = target(i)
    except BaseException as e:  # reported below, with the thread's number
      out[i] = e

  threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(n)]
  for t in threads:
    t.start()
  for t in threads:
    t.join(timeout)
  stuck = [i for i, t in enumerate(threads) if t.is_alive()]
  assert not stuck, f"threads {stuck} still running after {timeout} s (deadlock)"
  return out


def test_threads_streaming_into_one_cache_all_finish_and_leave_it_readable(tmp_path):
  rng = np.random.default_rng(0)
  batches = [rng.standard_normal((16, 4)).astype(np.float32) for _ in range(30)]
  keys = np.concatenate(batches).astype(np.float64)
  want = np.cov(keys.T, bias=True)

  def stream(_):
    return memedit.stream_covariance(list(batches), group=1, progress=False,
                                     cache_dir=tmp_path, cache_key="shared")

  states = _run_threads(stream, 4, timeout=240)
  for i, st in enumerate(states):
    assert not isinstance(st, BaseException), f"thread {i} failed: {st!r}"
    assert memedit.key_count(st) == len(keys)
  tree, meta = _io.load_tree(tmp_path / "shared")
  assert meta["complete"] and meta["batches"] == len(batches)
  st = memedit.CovarianceState(**tree)
  np.testing.assert_allclose(np.asarray(memedit.centered_covariance(st), np.float64), want,
                             rtol=1e-4, atol=1e-5)
  # The next call resumes from the cache: nothing is left to read.
  again = memedit.stream_covariance(iter(()), dim=4, progress=False, cache_dir=tmp_path,
                                    cache_key="shared")
  assert memedit.key_count(again) == len(keys)
  assert not [p.name for p in tmp_path.iterdir() if p.name.startswith((".tmp-", ".old-"))]


def test_a_cache_of_keys_of_another_dimension_is_refused(tmp_path):
  """A complete cache found under the key (copied or reused for another layer) was
  returned as it was, C of another size; with the key dimension given it is refused."""
  import pytest

  rng = np.random.default_rng(0)
  xs = [rng.standard_normal((16, 3)).astype(np.float32) for _ in range(2)]
  memedit.stream_covariance(xs, 3, progress=False, cache_dir=tmp_path, cache_key="k")
  ys = [np.concatenate([x, x[:, :1]], axis=1) for x in xs]
  with pytest.raises(ValueError, match=r"statistics cache .*k: expected the statistics of keys "
                                       r"of dimension 4, got those of dimension 3"):
    memedit.stream_covariance(ys, 4, progress=False, cache_dir=tmp_path, cache_key="k")
  again = memedit.stream_covariance(xs, 3, progress=False, cache_dir=tmp_path, cache_key="k")
  assert again.dim == 3
