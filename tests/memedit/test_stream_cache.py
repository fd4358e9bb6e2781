"""memedit.stream_cache: statistics caches written by several threads, resumed, and refused
when they cannot be resumed (another dtype, another stream, a folder that cannot be written)."""

from __future__ import annotations

import errno
import json
import os
import threading

import jax
import numpy as np
import pytest

import memedit
from memedit import _io
from interrupted import interrupt_stream
from memedit.moments import covariance_update


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


def _cov64(batches) -> np.ndarray:
  keys = np.concatenate([np.asarray(b, np.float64) for b in batches])
  return np.cov(keys.T, bias=True)


def test_a_partial_cache_resumed_with_keys_of_another_dtype_is_refused(tmp_path):
  """A float32 partial cache resumed with float64 keys (x64 on) went on in float32, and a
  float64 one resumed with float32 keys gave float32 statistics: both are refused, naming
  both dtypes; the stream of the cache's dtype resumes it."""
  rng = np.random.default_rng(3)
  xs = [rng.standard_normal((6, 3)) * 2 + 5 for _ in range(3)]
  f32 = [x.astype(np.float32) for x in xs]
  kw = dict(cache_dir=tmp_path, progress=False, group=1)
  interrupt_stream(f32, 2, cache_key="a", cache_dir=tmp_path)
  with jax.enable_x64():
    interrupt_stream(xs, 2, cache_key="b", cache_dir=tmp_path)
    with pytest.raises(ValueError, match=r"statistics cache .*a: expected statistics in the "
                       r"keys' dtype float64, got statistics in float32 .*pass another "
                       r"cache_key or cache_dir"):
      memedit.stream_covariance(xs, cache_key="a", **kw)
    st = memedit.stream_covariance(xs, cache_key="b", **kw)
    assert st.sum_sq.dtype == np.float64
    np.testing.assert_allclose(np.asarray(memedit.centered_covariance(st)), _cov64(xs),
                               rtol=1e-12, atol=1e-12)
  with pytest.raises(ValueError, match=r"statistics cache .*b: expected statistics in the "
                     r"keys' dtype float32, got statistics in float64"):
    memedit.stream_covariance(f32, cache_key="b", **kw)
  st = memedit.stream_covariance(f32, cache_key="a", **kw)
  assert st.sum_sq.dtype == np.float32 and memedit.key_count(st) == 18
  np.testing.assert_allclose(np.asarray(memedit.centered_covariance(st), np.float64),
                             _cov64(f32), rtol=1e-5, atol=1e-5)


def test_another_stream_under_the_same_cache_key_is_refused(tmp_path):
  """A second stream of keys of the same dimension resumed the first one's partial cache
  (the result mixed both) or was given its finished statistics: the digest of the first
  batch, saved in the cache, tells them apart. A cache saved without it resumes."""
  rng = np.random.default_rng(4)
  xs = [rng.standard_normal((5, 3)).astype(np.float32) for _ in range(4)]
  ys = [x + 1 for x in xs]
  kw = dict(cache_dir=tmp_path, cache_key="k", progress=False, group=1)
  interrupt_stream(xs, 2, cache_dir=tmp_path, cache_key="k")
  for stream in (ys, iter(ys)):
    with pytest.raises(ValueError, match=r"statistics cache .*k: expected the stream that "
                       r"started it .*got a stream whose first batch differs .*pass that "
                       r"same stream to resume it, or another cache_key"):
      memedit.stream_covariance(stream, **kw)
  st = memedit.stream_covariance(iter(xs), **kw)  # the same stream resumes it
  np.testing.assert_allclose(np.asarray(memedit.centered_covariance(st), np.float64),
                             _cov64(xs), rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="expected the stream that started it"):
    memedit.stream_covariance(ys, **kw)  # finished: not returned for another stream
  again = memedit.stream_covariance(xs, **kw)
  np.testing.assert_array_equal(np.asarray(again.sum_sq), np.asarray(st.sum_sq))

  # A partial cache saved without the digest (as before it was recorded): resumed.
  part = memedit.covariance_init(3)
  for x in xs[:2]:
    part = covariance_update(part, x)
  memedit._io.save_tree(tmp_path / "old", {k: np.asarray(v) for k, v in part._asdict().items()},
                        {"batches": 2, "complete": False, "dim": 3})
  st = memedit.stream_covariance(xs, **{**kw, "cache_key": "old"})
  np.testing.assert_allclose(np.asarray(memedit.centered_covariance(st), np.float64),
                             _cov64(xs), rtol=1e-5, atol=1e-6)
  assert json.loads((tmp_path / "old" / "meta.json").read_text())["complete"]
  # A digest that is not one is damage, named.
  memedit._io.save_tree(tmp_path / "bad", {k: np.asarray(v) for k, v in part._asdict().items()},
                        {"batches": 2, "complete": False, "dim": 3, "first_batch_sha256": 7})
  with pytest.raises(ValueError, match=r"statistics cache .*bad: expected 'first_batch_sha256' "
                     r"in meta.json: 64 hex digits, got 7; the cache is damaged"):
    memedit.stream_covariance(xs, **{**kw, "cache_key": "bad"})


def test_a_cache_dir_inside_a_file_is_refused_by_name(tmp_path):
  a_file = tmp_path / "notes"
  a_file.write_text("mine")
  with pytest.raises(ValueError, match=r"cache_dir: expected a directory \(or a path to create "
                     r"one at\), got .*notes.sub, inside .*notes, which is a file"):
    memedit.stream_covariance([np.ones((2, 3), np.float32)], progress=False,
                              cache_dir=a_file / "sub", cache_key="k")
  assert a_file.read_text() == "mine"


def test_a_read_only_cache_folder_is_refused_before_folding_and_still_read(tmp_path,
                                                                          monkeypatch):
  # (Tests may run as root, for whom every folder is writable: os.access is stubbed.)
  xs = [np.arange(6, dtype=np.float32).reshape(2, 3) + i for i in range(3)]
  done = memedit.stream_covariance(xs, progress=False, cache_dir=tmp_path, cache_key="done")
  ro = str(tmp_path)
  real = os.access
  monkeypatch.setattr(memedit._io.os, "access", lambda p, mode: p != ro and real(p, mode))
  folded = []
  with pytest.raises(ValueError, match=r"statistics cache .*new: expected a folder this "
                     r"process may write in, got one in .*, which is read-only for it"):
    memedit.stream_covariance(xs, progress=False, cache_dir=tmp_path, cache_key="new",
                              key_fn=lambda x: folded.append(1) or x)
  assert not folded and not (tmp_path / "new").exists()
  again = memedit.stream_covariance(xs, progress=False, cache_dir=tmp_path, cache_key="done")
  np.testing.assert_array_equal(np.asarray(again.sum_sq), np.asarray(done.sum_sq))


def test_a_failed_save_names_the_cache_and_keeps_the_last_saved_state(tmp_path, monkeypatch):
  """A full disk while saving raised the bare OSError ("No space left on device", naming
  no cache); the message now names the cache and how to go on, and the state saved
  before it is what the next call resumes."""
  rng = np.random.default_rng(5)
  xs = [rng.standard_normal((4, 3)).astype(np.float32) for _ in range(4)]
  real, calls = _io.save_tree, []

  def full_disk(*args, **kwargs):
    calls.append(1)
    if len(calls) == 3:
      raise OSError(errno.ENOSPC, "No space left on device")
    return real(*args, **kwargs)

  monkeypatch.setattr(_io, "save_tree", full_disk)
  kw = dict(cache_dir=tmp_path, cache_key="k", progress=False, group=1)
  with pytest.raises(OSError, match=r"statistics cache .*k: could not save the state of 3 "
                     r"batch\(es\) \(OSError: \[Errno 28\] No space left on device\); the state "
                     r"saved before is kept: make room .* to resume") as e:
    memedit.stream_covariance(xs, **kw)
  assert e.value.errno == errno.ENOSPC
  monkeypatch.setattr(_io, "save_tree", real)
  _, meta = _io.load_tree(tmp_path / "k")
  assert meta["batches"] == 2 and not meta["complete"]
  assert sorted(os.listdir(tmp_path)) == ["k"]
  st = memedit.stream_covariance(xs, **kw)
  assert memedit.key_count(st) == 16
  np.testing.assert_allclose(np.asarray(memedit.centered_covariance(st), np.float64),
                             _cov64(xs), rtol=1e-5, atol=1e-6)


def test_another_memedit_output_under_the_cache_key_is_named_not_called_damaged(tmp_path):
  """A saved edit (or another saved tree) under the key was called a damaged cache, with
  the advice to remove it: it is named as what it is and left alone."""
  edit = memedit.make_edit(("k",), np.ones((2, 1), np.float32), np.ones((1, 3), np.float32))
  memedit.save_edit(tmp_path / "e", edit)
  _io.save_tree(tmp_path / "t", {"a": np.arange(3.0)}, {"note": "mine"})
  xs = [np.ones((2, 3), np.float32)]
  for key, what in (("e", r"a memedit 'edit' output"),
                    ("t", r"a saved memedit tree whose meta.json holds no 'batches'")):
    with pytest.raises(ValueError, match=rf"statistics cache .*{key}: expected a folder saved "
                       rf"by stream_covariance, got {what}.*pass another cache_key or "
                       r"cache_dir \(that folder is left as it is\)"):
      memedit.stream_covariance(xs, progress=False, cache_dir=tmp_path, cache_key=key)
  np.testing.assert_array_equal(np.asarray(memedit.load_edit(tmp_path / "e").D), edit.D)
  tree, meta = _io.load_tree(tmp_path / "t")
  assert meta == {"note": "mine"} and tree["a"].tolist() == [0.0, 1.0, 2.0]


def test_cache_keys_no_folder_can_be_named_by_are_refused_before_folding(tmp_path):
  """A key holding a NUL character raised a bare "embedded null byte", and one too long
  for the file system's names an OSError, both after the first group was folded."""
  folded = []
  for key, size in (("k\x00x", 3), ("a" * 300, 300)):
    with pytest.raises(ValueError, match=rf"cache_key: expected a folder name this file system "
                       rf"can hold \(at most \d+ bytes, no NUL character\), got .*\({size} "
                       r"bytes\)"):
      memedit.stream_covariance([np.ones((2, 3), np.float32)], progress=False,
                                key_fn=lambda x: folded.append(1) or x,
                                cache_dir=tmp_path, cache_key=key)
  assert not folded and os.listdir(tmp_path) == []


def test_a_cache_folder_reached_through_a_link_resumes_and_keeps_the_link(tmp_path):
  """A key folder that is a link (to a folder on another disk, say) was read, but its
  first save refused it ("got a link; pass force=True", an argument stream_covariance does
  not have) after folding a group: the folder it names is resumed and saved."""
  rng = np.random.default_rng(6)
  xs = [rng.standard_normal((4, 3)).astype(np.float32) for _ in range(3)]
  (tmp_path / "disk").mkdir()
  interrupt_stream(xs, 2, cache_dir=tmp_path / "disk", cache_key="k")
  (tmp_path / "cache").mkdir()
  os.symlink(tmp_path / "disk" / "k", tmp_path / "cache" / "k")
  st = memedit.stream_covariance(xs, group=1, progress=False, cache_dir=tmp_path / "cache",
                                 cache_key="k")
  np.testing.assert_allclose(np.asarray(memedit.centered_covariance(st), np.float64),
                             _cov64(xs), rtol=1e-5, atol=1e-6)
  assert os.path.islink(tmp_path / "cache" / "k")
  _, meta = _io.load_tree(tmp_path / "disk" / "k")
  assert meta["complete"] and meta["batches"] == 3


def test_a_partial_save_never_replaces_statistics_another_writer_finished(tmp_path,
                                                                          monkeypatch):
  """Two runs of one stream on one key (threads or processes): one that had found no cache
  when it started saved its partial state over the other's finished statistics, and if
  it was then stopped, the finished statistics were gone."""
  rng = np.random.default_rng(8)
  xs = [rng.standard_normal((4, 3)).astype(np.float32) for _ in range(4)]
  kw = dict(cache_dir=tmp_path, cache_key="k")
  done = memedit.stream_covariance(xs, group=1, progress=False, **kw)
  # The second run started before the first finished: it found nothing to resume.
  monkeypatch.setattr(memedit.stream_cache.StreamCache, "load", lambda self: None)
  interrupt_stream(xs, 2, **kw)
  tree, meta = _io.load_tree(tmp_path / "k")
  assert meta["complete"] and meta["batches"] == 4
  np.testing.assert_array_equal(tree["sum_sq"], np.asarray(done.sum_sq))


def test_a_killed_saves_temporary_folder_is_removed_and_a_live_ones_kept(tmp_path):
  # A run killed while saving leaves its temporary folder beside the cache (the kernel
  # released the writer's lock): the next run removes it. A live writer's (its lock is
  # held, here through an open file of this test) is kept.
  import fcntl

  rng = np.random.default_rng(1)
  batches = [rng.standard_normal((8, 3)).astype(np.float32) for _ in range(3)]
  dead, live = tmp_path / ".tmp-stats-0badc0de", tmp_path / ".tmp-stats-1badc0de"
  for d in (dead, live):
    d.mkdir()
    (d / "meta.json").write_text('{"complete": fa')  # cut short by the kill
  fd = os.open(live, os.O_RDONLY)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX)
    st = memedit.stream_covariance(list(batches), group=1, progress=False,
                                   cache_dir=tmp_path, cache_key="stats")
    assert sorted(p.name for p in tmp_path.iterdir()) == [live.name, "stats"]
  finally:
    os.close(fd)
  keys = np.concatenate(batches).astype(np.float64)
  np.testing.assert_allclose(np.asarray(memedit.centered_covariance(st), np.float64),
                             np.cov(keys.T, bias=True), rtol=1e-5, atol=1e-6)
  again = memedit.stream_covariance([], group=1, progress=False, cache_dir=tmp_path,
                                    cache_key="stats")  # resumed: complete, nothing to read
  assert memedit.key_count(again) == len(keys)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["stats"]
