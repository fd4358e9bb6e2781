"""memedit._io: output markers and replacement checks, atomic replacement that never loses
the destination, file modes, and checksums verified on load."""

from __future__ import annotations

import json
import os
import stat
import tempfile
import threading

import numpy as np
import pytest

import memedit
import peers
import ports
from memedit import _io
from memedit.cli import main


def _tree(value: float = 1.0):
  return {"w": np.full((4, 3), value, np.float32), "b": {"c": np.arange(5.0) + value}}


def _leftovers(parent):
  return sorted(p.name for p in parent.iterdir() if p.name.startswith((".tmp-", ".old-")))


def _value(path) -> float:
  tree, _ = _io.load_tree(path)
  return float(tree["w"][0, 0])


# ------------------------------------------------------------------ markers and checks

def test_marker_names_the_kind_and_checksums_every_file(tmp_path):
  out = _io.save_tree(tmp_path / "m", _tree(), {"architecture": "dcgan"}, kind="converted")
  marker = json.loads((tmp_path / "m" / _io.MARKER_FILE).read_text())
  assert marker["kind"] == "converted" and marker["format"] == 1
  files = sorted(str(p.relative_to(out)) for p in (tmp_path / "m").rglob("*")
                 if p.is_file() and p.name != _io.MARKER_FILE)
  assert sorted(marker["sha256"]) == files and "meta.json" in files
  assert _io.output_kind(out) == "converted"
  tree, meta = _io.load_tree(out)
  assert meta == {"architecture": "dcgan"}  # the marker stays out of the metadata
  np.testing.assert_array_equal(tree["b"]["c"], np.arange(5.0) + 1)


@pytest.mark.parametrize("content", ["file", "foreign-folder", "other-kind"])
def test_replacing_something_else_needs_force(tmp_path, content):
  out = tmp_path / "out"
  if content == "file":
    out.write_text("notes")
  elif content == "foreign-folder":
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
  else:
    _io.save_tree(out, _tree(), {}, kind="edit")
  expected = {"file": "a file", "foreign-folder": "a folder that is not a memedit output",
              "other-kind": "a memedit 'edit' output"}[content]
  with pytest.raises(ValueError, match=f"expected a memedit 'converted' output folder to "
                     f"replace, got {expected}; pass force=True to replace it") as info:
    _io.save_tree(out, _tree(2.0), {}, kind="converted")
  assert str(out) in str(info.value)
  assert out.exists() and _leftovers(tmp_path) == []
  if content == "foreign-folder":
    assert (out / "thesis.tex").read_text() == "years of work"
  _io.save_tree(out, _tree(2.0), {}, kind="converted", force=True)
  assert _value(out) == 2.0 and _io.output_kind(out) == "converted"
  assert _leftovers(tmp_path) == []


def test_same_kind_or_empty_folder_is_replaced(tmp_path):
  out = tmp_path / "out"
  out.mkdir()
  _io.save_tree(out, _tree(1.0), {}, kind="edit")
  _io.save_tree(out, _tree(2.0), {}, kind="edit")
  assert _value(out) == 2.0


def test_folders_written_before_markers_are_recognised(tmp_path):
  kinds = {"edit": {"format": "memedit-edit"}, "converted": {"architecture": "dcgan"},
           "edited-model": {"architecture": "dcgan", "edits": []},
           "tree": {"batches": 3, "complete": False}}
  for kind, meta in kinds.items():
    out = _io.save_tree(tmp_path / kind, _tree(), meta, kind=kind)
    os.remove(os.path.join(out, _io.MARKER_FILE))
    assert _io.output_kind(out) == kind
    assert _io.load_tree(out)[1] == meta  # loads, unchecked
    _io.save_tree(out, _tree(2.0), meta, kind=kind)  # and may be replaced by its kind
    assert _value(out) == 2.0


def test_folder_holding_the_source_or_cwd_is_never_replaced(tmp_path, monkeypatch):
  victim = tmp_path / "victim"
  victim.mkdir()
  (victim / "ckpt.pt").write_bytes(b"weights")
  for force in (False, True):
    with pytest.raises(ValueError, match=r"holds .*ckpt.pt.*\(even with force=True\)"):
      _io.save_tree(victim, _tree(), {}, kind="converted", force=force,
                    protect=[victim / "ckpt.pt"])
  monkeypatch.chdir(victim)
  for target in (".", str(tmp_path)):
    with pytest.raises(ValueError, match="holds the current directory"):
      _io.save_tree(target, _tree(), {}, kind="converted", force=True)
  assert (victim / "ckpt.pt").read_bytes() == b"weights"
  assert sorted(p.name for p in victim.iterdir()) == ["ckpt.pt"]


@pytest.mark.parity  # downloads the DCGAN peer wheel
def test_cli_convert_refuses_to_replace_its_source_or_other_folders(tmp_path, monkeypatch,
                                                                    capsys):
  _, weights = peers.gan_face_generate()
  victim = tmp_path / "victim"
  victim.mkdir()
  src = victim / "ckpt.pt"
  src.write_bytes(weights.read_bytes())
  monkeypatch.chdir(victim)
  for argv in (["convert", str(src), str(victim)], ["convert", "ckpt.pt", "."],
               ["convert", "ckpt.pt", ".", "--force"]):
    assert main(argv) == 1
    assert "refusing to replace it (even with --force)" in capsys.readouterr().err
  assert src.read_bytes() == weights.read_bytes()
  other = tmp_path / "other"
  other.mkdir()
  (other / "data.csv").write_text("1,2\n")
  assert main(["convert", "ckpt.pt", str(other)]) == 1
  assert "not a memedit output; pass --force" in capsys.readouterr().err
  assert (other / "data.csv").exists()
  assert main(["convert", "ckpt.pt", str(other), "--force"]) == 0
  assert _io.output_kind(other) == "converted" and not (other / "data.csv").exists()
  assert main(["convert", "ckpt.pt", str(other)]) == 0  # an earlier conversion: replaced
  assert ports.read_config(other)["architecture"] == "dcgan"


def test_cli_rewrite_checks_its_outputs_before_any_work(tmp_path, capsys):
  model = tmp_path / "model"
  model.mkdir()
  spec = tmp_path / "spec.json"
  spec.write_text("{}")
  foreign = tmp_path / "photos"
  foreign.mkdir()
  (foreign / "a.png").write_bytes(b"png")
  base = ["rewrite", str(model), str(spec), "--no-progress", "--cache-dir",
          str(tmp_path / "cache")]
  cases = [
      (["--out", str(foreign)], "not a memedit output; pass --force"),
      (["--out", str(tmp_path / "e"), "--save-model", str(foreign)],
       "expected a memedit 'edited-model' output folder"),
      (["--out", str(tmp_path / "e"), "--save-model", str(model), "--force"],
       "even with --force"),
      (["--out", str(tmp_path), "--force"], "even with --force"),
      (["--out", str(tmp_path / "e"), "--save-model", str(tmp_path / "e")],
       "expected a folder other than --out"),
  ]
  for extra, message in cases:
    assert main(base + extra) == 1
    err = capsys.readouterr().err
    assert message in err and "force=True" not in err  # the flag, not the Python argument
  assert (foreign / "a.png").exists() and not (tmp_path / "e").exists()


def test_save_edit_keeps_other_outputs(tmp_path):
  e = memedit.make_edit(("k",), np.ones((2, 1), np.float32), np.ones((1, 3), np.float32))
  _io.save_tree(tmp_path / "model", _tree(), {"architecture": "dcgan"}, kind="converted")
  with pytest.raises(ValueError, match="got a memedit 'converted' output; pass force=True "
                     "to replace it") as info:
    memedit.save_edit(tmp_path / "model", e)
  assert "--force" not in str(info.value)  # the Python argument, not the command-line flag
  assert _io.output_kind(tmp_path / "model") == "converted"
  memedit.save_edit(tmp_path / "model", e, force=True)
  assert memedit.load_edit(tmp_path / "model").name == e.name


# ------------------------------------------------------------------ atomic replacement

def test_exchange_keeps_the_destination_present(tmp_path, monkeypatch):
  out = _io.save_tree(tmp_path / "out", _tree(1.0), {})
  real = _io._exchange
  seen = []

  def watched(a, b):
    seen.append(os.path.isdir(b))
    swapped = real(a, b)
    seen.append(os.path.isdir(b))
    return swapped

  monkeypatch.setattr(_io, "_exchange", watched)
  _io.save_tree(out, _tree(2.0), {})
  assert seen == [True, True]
  assert _value(out) == 2.0 and _leftovers(tmp_path) == []


@pytest.mark.parametrize("exchange", ["unsupported", "failing"])
def test_failure_between_the_renames_keeps_the_old_destination(tmp_path, monkeypatch,
                                                               exchange):
  out = _io.save_tree(tmp_path / "out", _tree(1.0), {})
  if exchange == "unsupported":
    monkeypatch.setattr(_io, "_exchange", lambda a, b: False)
  else:
    def failing(a, b):
      raise OSError(18, "Invalid cross-device link")
    monkeypatch.setattr(_io, "_exchange", failing)
  real_rename, calls = os.rename, []

  def rename(a, b):  # the second rename of the destination fails (orbax renames too)
    if out in (os.fspath(a), os.fspath(b)):
      calls.append((a, b))
      if len(calls) == 2:
        raise OSError(5, "Input/output error")
    return real_rename(a, b)

  monkeypatch.setattr(os, "rename", rename)
  with pytest.raises(OSError):
    _io.save_tree(out, _tree(2.0), {})
  monkeypatch.setattr(os, "rename", real_rename)
  # Moved aside, failed to move in, moved back; a failing exchange touched nothing.
  assert len(calls) == (3 if exchange == "unsupported" else 0)
  assert _value(out) == 1.0
  assert _leftovers(tmp_path) == []


def test_kill_between_the_renames_is_recovered(tmp_path, monkeypatch):
  out = _io.save_tree(tmp_path / "out", _tree(1.0), {})
  monkeypatch.setattr(_io, "_exchange", lambda a, b: False)
  real_rename, calls = os.rename, []

  def rename(a, b):  # the process "dies" after moving the old tree aside
    if out in (os.fspath(a), os.fspath(b)):
      calls.append((a, b))
      if len(calls) >= 2:
        raise KeyboardInterrupt
    return real_rename(a, b)

  monkeypatch.setattr(os, "rename", rename)
  with pytest.raises(KeyboardInterrupt):
    _io.save_tree(out, _tree(2.0), {})
  monkeypatch.setattr(os, "rename", real_rename)
  assert not os.path.exists(out)  # what a kill at that instant leaves
  assert [n.split("-")[0] for n in _leftovers(tmp_path)] == [".old"]  # no .tmp- left
  assert _value(out) == 1.0  # the next read moves the old tree back
  assert _leftovers(tmp_path) == []
  _io.save_tree(out, _tree(3.0), {})
  assert _value(out) == 3.0 and _leftovers(tmp_path) == []


def test_failing_orbax_save_leaves_no_temporary_folder(tmp_path, monkeypatch):
  import orbax.checkpoint as ocp

  out = _io.save_tree(tmp_path / "out", _tree(1.0), {})

  def failing(self, *args, **kwargs):
    raise RuntimeError("disk full")

  monkeypatch.setattr(ocp.StandardCheckpointer, "save", failing)
  with pytest.raises(RuntimeError, match="disk full"):
    _io.save_tree(out, _tree(2.0), {})
  with pytest.raises(RuntimeError, match="disk full"):
    _io.save_tree(tmp_path / "new", _tree(2.0), {})
  assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
  monkeypatch.undo()
  assert _value(out) == 1.0


def test_parent_is_synced_after_the_rename(tmp_path, monkeypatch):
  events = []
  real_exchange, real_sync = _io._exchange, _io._fsync_dir
  monkeypatch.setattr(_io, "_exchange",
                      lambda a, b: events.append("exchange") or real_exchange(a, b))
  monkeypatch.setattr(_io, "_fsync_dir", lambda p: events.append(p) or real_sync(p))
  out = _io.save_tree(tmp_path / "out", _tree(1.0), {})
  assert events[-1] == str(tmp_path)  # new destination: renamed, then parent synced
  events.clear()
  _io.save_tree(out, _tree(2.0), {})
  assert events[events.index("exchange") + 1] == str(tmp_path)
  events.clear()
  _io.atomic_write_bytes(tmp_path / "f.json", b"{}")
  assert events == [str(tmp_path)]


def test_created_files_follow_the_umask(tmp_path):
  old = os.umask(0o022)
  try:
    out = _io.save_tree(tmp_path / "out", _tree(), {})
    _io.save_tree(out, _tree(2.0), {})  # replaced, through the temporary folder
    _io.atomic_write_bytes(tmp_path / "report.json", b"{}")
  finally:
    os.umask(old)
  paths = [tmp_path / "out", *(tmp_path / "out").rglob("*"), tmp_path / "report.json"]
  modes = {str(p): stat.S_IMODE(p.stat().st_mode) for p in paths}
  for p in paths:
    assert modes[str(p)] == (0o755 if p.is_dir() else 0o644), (p, oct(modes[str(p)]))


def test_threads_saving_and_loading_at_once_take_turns(tmp_path):
  # Four threads save (two of them the same path) and load at once: orbax alone
  # deadlocks or trips over its own temporary folders.
  errors, paths = [], [tmp_path / "a", tmp_path / "a", tmp_path / "b", tmp_path / "c"]

  def work(path):
    try:
      for j in range(10):
        _io.save_tree(path, _tree(float(j)), {"j": j})
        assert 0 <= _value(path) <= 9
    except BaseException as e:  # reported below
      errors.append(e)

  threads = [threading.Thread(target=work, args=(p,), daemon=True) for p in paths]
  for t in threads:
    t.start()
  for t in threads:
    t.join(180)
  assert not any(t.is_alive() for t in threads), "save_tree deadlocked across threads"
  assert not errors, errors
  for p in set(paths):
    assert _value(p) == 9.0
  assert _leftovers(tmp_path) == []


def test_path_lock_is_one_lock_per_resolved_path(tmp_path):
  (tmp_path / "d").mkdir()
  os.symlink(tmp_path / "d", tmp_path / "link")
  entered = threading.Event()

  def other():
    with _io.path_lock(tmp_path / "link"):
      entered.set()

  with _io.path_lock(tmp_path / "x" / ".." / "d"):
    t = threading.Thread(target=other, daemon=True)
    t.start()
    assert not entered.wait(0.3)  # the same folder by another name waits
    with _io.path_lock(tmp_path / "e"):  # another path does not
      pass
  t.join(10)
  assert entered.is_set()


# ------------------------------------------------------------------ stored data

def _array_file(out):
  files = [p for p in (out / "arrays").rglob("*") if p.is_file()]
  return max(files, key=lambda p: p.stat().st_size)


def test_damaged_array_file_is_refused(tmp_path):
  out = tmp_path / "out"
  _io.save_tree(out, {"w": np.arange(4096, dtype=np.float32)}, {})
  target = _array_file(out)
  data = bytearray(target.read_bytes())
  data[len(data) // 2] ^= 0x01
  target.write_bytes(bytes(data))
  with pytest.raises(ValueError, match="sha256 .* does not match .*regenerate") as info:
    _io.load_tree(out)
  assert str(target) in str(info.value)


def test_damaged_edit_is_refused(tmp_path):
  e = memedit.make_edit(("k",), np.ones((2, 1), np.float32), np.ones((1, 3), np.float32))
  out = memedit.save_edit(tmp_path / "e", e)
  target = _array_file(tmp_path / "e")
  data = bytearray(target.read_bytes())
  data[-1] ^= 0x80
  target.write_bytes(bytes(data))
  with pytest.raises(ValueError, match="does not match") as info:
    memedit.load_edit(out)
  assert str(target) in str(info.value)


@pytest.mark.parametrize("damage", ["truncated", "not-json", "missing-file", "marker"])
def test_damaged_metadata_is_refused_naming_the_file(tmp_path, damage):
  out = tmp_path / "out"
  _io.save_tree(out, _tree(), {"architecture": "dcgan", "resolution": 64})
  meta = out / "meta.json"
  if damage == "truncated":
    meta.write_bytes(meta.read_bytes()[:10])
    named, message = meta, "expected JSON metadata"
  elif damage == "not-json":
    meta.write_bytes(b"\xff\xfe garbage")
    named, message = meta, "expected JSON metadata"
  elif damage == "missing-file":
    target = _array_file(out)
    target.unlink()
    named, message = target, "missing"
  else:
    (out / _io.MARKER_FILE).write_text('{"format": 1, "kind": "tree"')
    named, message = out / _io.MARKER_FILE, "expected JSON metadata"
  with pytest.raises(ValueError, match=message) as info:
    _io.load_tree(out)
  assert str(named) in str(info.value)
  if damage in ("truncated", "not-json"):
    with pytest.raises(ValueError, match="expected JSON metadata") as info:
      ports.read_config(out)
    assert str(meta) in str(info.value)


def test_output_inside_a_file_is_refused_before_any_work(tmp_path):
  (tmp_path / "notes.txt").write_text("mine")
  with pytest.raises(ValueError, match=r"expected an output path inside a folder, got one "
                     r"inside '.*notes.txt', which is a file"):
    _io.check_output(tmp_path / "notes.txt" / "deeper" / "out", "tree")
  e = memedit.make_edit(("k",), np.ones((2, 1), np.float32), np.ones((1, 3), np.float32))
  with pytest.raises(ValueError, match="which is a file"):
    memedit.save_edit(tmp_path / "notes.txt" / "e", e)
  assert (tmp_path / "notes.txt").read_text() == "mine"


def test_output_in_a_read_only_folder_is_refused_before_any_work(tmp_path, monkeypatch):
  # (Tests may run as root, for whom every folder is writable: os.access is stubbed.)
  ro = str(tmp_path / "ro")
  os.mkdir(ro)
  real = os.access
  monkeypatch.setattr(_io.os, "access", lambda p, mode: p != ro and real(p, mode))
  with pytest.raises(ValueError, match=r"expected an output path in a folder this process "
                     r"may write in, got one in '.*ro', which is read-only for it"):
    _io.save_tree(os.path.join(ro, "new", "out"), _tree())
  assert os.listdir(ro) == []


def test_arrays_that_do_not_restore_are_refused_naming_the_folder(tmp_path):
  # A folder saved before markers existed is read without checksums: orbax's own error
  # (here a JSONDecodeError) comes back as a ValueError naming the arrays folder.
  out = tmp_path / "out"
  _io.save_tree(out, _tree(), {})
  (out / _io.MARKER_FILE).unlink()
  (out / "arrays" / "_METADATA").write_text('{"trunc')
  with pytest.raises(ValueError, match=r"arrays: expected an orbax checkpoint of arrays, got "
                     r"one that does not restore \(.*\); the directory is damaged"):
    _io.load_tree(out)


# ------------------------------------------------------------------ killed and live writers

# A writer in another process, which loads memedit/_io.py alone (no jax: it starts in a
# fraction of a second), stops inside its write and prints "ready"; it finishes the write
# when a line comes on stdin, or is killed.
_WRITER = """
import importlib.util, os, sys, time
spec = importlib.util.spec_from_file_location("memedit_io", sys.argv[1])
io = importlib.util.module_from_spec(spec)
spec.loader.exec_module(io)
dst, how = sys.argv[2], sys.argv[3]
stops = []
def stop():
  if not stops:  # once: the writer's file, not its folder
    stops.append(1)
    print("ready", flush=True)
    sys.stdin.readline()
if how == "dir":
  with io.atomic_dir(dst) as tmp:
    with open(os.path.join(tmp, "data"), "wb") as f:
      f.write(b"x" * 4096)
    stop()
else:
  real = os.fsync
  os.fsync = lambda fd: (stop(), real(fd))
  io.atomic_write_bytes(dst, b"from the writer")
"""


def _start_writer(dst, how):
  import subprocess
  import sys

  proc = subprocess.Popen([sys.executable, "-c", _WRITER, _io.__file__, str(dst), how],
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
  assert proc.stdout.readline().strip() == "ready"
  return proc


def _temporaries(parent):
  return [n for n in _leftovers(parent) if n.startswith(".tmp-")]


@pytest.mark.parametrize("how", ["dir", "bytes"])
def test_killed_writers_temporary_is_removed_by_the_next_write(tmp_path, how):
  import signal

  out = tmp_path / "out"
  if how == "dir":
    _io.save_tree(out, _tree(1.0), {})
  else:
    out.write_bytes(b"before")
  # Names that only look like temporaries of "out" are left alone.
  others = [".tmp-out-1234567", ".tmp-out-ABCDEF12", ".tmp-outer-12345678", ".tmp-ou-12345678"]
  for name in others:
    (tmp_path / name).mkdir()
  proc = _start_writer(out, how)
  proc.send_signal(signal.SIGKILL)
  proc.wait(10)
  proc.stdout.close()
  proc.stdin.close()
  dead = sorted(set(_temporaries(tmp_path)) - set(others))
  assert len(dead) == 1  # what a kill leaves
  if how == "dir":
    assert _value(out) == 1.0  # the destination is untouched, and a read cleans up
    assert sorted(_temporaries(tmp_path)) == sorted(others)
    (tmp_path / dead[0]).mkdir()  # as if killed again: the next save cleans up too
    _io.save_tree(out, _tree(2.0), {})
    assert _value(out) == 2.0
  else:
    assert out.read_bytes() == b"before"
    _io.atomic_write_bytes(out, b"after")
    assert out.read_bytes() == b"after"
  assert sorted(_temporaries(tmp_path)) == sorted(others)


@pytest.mark.parametrize("how", ["dir", "bytes"])
def test_live_writers_temporary_in_another_process_is_left_alone(tmp_path, how):
  out = tmp_path / "out"
  proc = _start_writer(out, how)
  try:
    live = _temporaries(tmp_path)
    assert len(live) == 1
    _io.recover(out)
    if how == "dir":
      with pytest.raises(FileNotFoundError):
        _io.load_tree(out)  # nothing saved yet; the read runs recover() too
    else:
      _io.atomic_write_bytes(tmp_path / "out", b"meanwhile")
    assert live[0] in _temporaries(tmp_path)
    proc.stdin.write("go\n")
    proc.stdin.flush()
    assert proc.wait(10) == 0
  finally:
    proc.kill()
    proc.stdout.close()
    proc.stdin.close()
  assert _temporaries(tmp_path) == []
  if how == "dir":
    assert (out / "data").read_bytes() == b"x" * 4096
  else:
    assert out.read_bytes() == b"from the writer"


@pytest.mark.parametrize("registry", ["kept", "bypassed"])
def test_live_writers_temporary_in_another_thread_is_left_alone(tmp_path, monkeypatch,
                                                                registry):
  # "bypassed": file systems whose locks do not tell two opens in one process apart get
  # the registry; the flock alone (per open file) must also keep the temporary.
  if registry == "bypassed":
    monkeypatch.setattr(_io, "_LIVE_TEMPS", type("Forgetful", (set,), {
        "add": lambda self, x: None})())
  out = tmp_path / "out"
  inside, release, errors = threading.Event(), threading.Event(), []

  def writer():
    try:
      with _io.atomic_dir(out) as tmp:
        (tmp_path / "seen").write_text(os.path.basename(tmp))
        inside.set()
        release.wait(10)
        with open(os.path.join(tmp, "data"), "w") as f:
          f.write("written after the recover")
    except BaseException as e:  # reported below
      errors.append(e)

  t = threading.Thread(target=writer, daemon=True)
  t.start()
  assert inside.wait(10)
  live = (tmp_path / "seen").read_text()
  _io.recover(out)
  _io.recover(tmp_path / "out" / ".." / "out")
  assert _temporaries(tmp_path) == [live]
  release.set()
  t.join(10)
  assert not errors, errors
  assert (out / "data").read_text() == "written after the recover"
  assert _temporaries(tmp_path) == []


@pytest.mark.parametrize("when", ["before-open", "before-lock", "file-before-lock"])
def test_temporary_removed_before_it_was_locked_is_made_again(tmp_path, monkeypatch, when):
  # Another process's recover() may lock and remove a temporary in the instant between
  # its creation and its locking: the writer notices and starts over under a new name.
  monkeypatch.setattr(_io, "_LIVE_TEMPS", type("Forgetful", (set,), {
      "add": lambda self, x: None})())  # as if that recover() ran in another process
  out = tmp_path / "out"
  real_mkdir, real_flock, removed = os.mkdir, _io._flock, []

  def intrude():
    if not removed:
      removed.append(_temporaries(tmp_path))
      _io.recover(out)  # finds it unlocked: removes it

  def mkdir(path, *args, **kwargs):
    real_mkdir(path, *args, **kwargs)
    if os.path.basename(path).startswith(".tmp-out-"):
      intrude()

  def flock(fd, blocking):
    if blocking:
      intrude()
    return real_flock(fd, blocking)

  if when == "before-open":
    monkeypatch.setattr(_io.os, "mkdir", mkdir)
  else:
    monkeypatch.setattr(_io, "_flock", flock)
  if when == "file-before-lock":
    _io.atomic_write_bytes(out, b"x")
    assert out.read_bytes() == b"x"
  else:
    with _io.atomic_dir(out) as tmp:
      with open(os.path.join(tmp, "data"), "w") as f:
        f.write("x")
      assert os.path.basename(tmp) not in removed[0]
    assert (out / "data").read_text() == "x"
  assert len(removed) == 1 and len(removed[0]) == 1  # one temporary was removed
  assert _temporaries(tmp_path) == []


def test_without_locks_temporaries_are_left(tmp_path, monkeypatch):
  # Where flock is not available (Windows), a temporary is never known to be dead.
  monkeypatch.setattr(_io, "fcntl", None)
  (tmp_path / ".tmp-out-0123abcd").mkdir()
  _io.save_tree(tmp_path / "out", _tree(2.0), {})
  _io.atomic_write_bytes(tmp_path / "f", b"1")
  assert _value(tmp_path / "out") == 2.0 and (tmp_path / "f").read_bytes() == b"1"
  assert _temporaries(tmp_path) == [".tmp-out-0123abcd"]
  monkeypatch.undo()
  _io.recover(tmp_path / "out")
  assert _temporaries(tmp_path) == []


# ------------------------------------------------------------------ writers in other processes

@pytest.mark.parametrize("exchange", ["supported", "unsupported"])
def test_destination_made_by_another_writer_meanwhile_is_replaced(tmp_path, monkeypatch,
                                                                  exchange):
  # Two runs writing one path: the other one's tree appears just before this one moves
  # its own in (the path was missing when checked, or was just moved aside). The save
  # replaces it instead of failing with "Directory not empty".
  import shutil

  theirs = _io.save_tree(tmp_path / "theirs", _tree(5.0), {})
  out = tmp_path / "out"
  if exchange == "unsupported":
    _io.save_tree(out, _tree(1.0), {})
    monkeypatch.setattr(_io, "_exchange", lambda a, b: False)
  real_rename, appeared = os.rename, []

  def rename(a, b):
    if os.fspath(b) == str(out) and os.path.basename(a).startswith(".tmp-out-") \
        and not appeared:
      appeared.append(shutil.copytree(theirs, out))
    return real_rename(a, b)

  monkeypatch.setattr(os, "rename", rename)
  _io.save_tree(out, _tree(2.0), {})
  monkeypatch.undo()
  assert appeared and _value(out) == 2.0
  assert _leftovers(tmp_path) == []


def test_recover_leaves_a_destination_a_live_writer_moved_aside(tmp_path, monkeypatch):
  # Without an atomic exchange the destination is missing between two renames; a reader
  # (in another process: the lock is taken through another open file) must not move the
  # old version back under the writer, which then fails to move its own in.
  out = _io.save_tree(tmp_path / "out", _tree(1.0), {})
  monkeypatch.setattr(_io, "_exchange", lambda a, b: False)
  real_rename, seen = os.rename, []

  def rename(a, b):
    real_rename(a, b)
    if os.fspath(a) == out:  # moved aside: a reader comes by
      seen.append(_leftovers(tmp_path))
      _io.recover(out)
      seen.append(os.path.exists(out))

  monkeypatch.setattr(os, "rename", rename)
  _io.save_tree(out, _tree(2.0), {})
  monkeypatch.undo()
  assert [n.split("-")[0] for n in seen[0]] == [".old", ".tmp"] and seen[1] is False
  assert _value(out) == 2.0 and _leftovers(tmp_path) == []


@pytest.mark.parametrize("name", ["run[1]/edit", "a\\b/edit", "plain/e[0]"])
def test_paths_the_checkpoint_store_misreads_are_saved_and_read_back_whole(tmp_path, name):
  # tensorstore reads a backslash as a separator and brackets as a pattern: such a path
  # once gave an output whose arrays did not restore (or landed in another folder).
  out = tmp_path / name
  tree = _tree(3.0)
  _io.save_tree(out, tree, {"m": 1})
  got, meta = _io.load_tree(out)
  assert meta == {"m": 1}
  np.testing.assert_array_equal(got["w"], tree["w"])
  np.testing.assert_array_equal(got["b"]["c"], tree["b"]["c"])
  assert sorted(os.listdir(out)) == sorted([".memedit-output.json", "arrays", "meta.json"])
  assert sorted(p.name for p in tmp_path.iterdir()) == [name.split("/")[0]]  # nothing beside
  assert not [n for n in os.listdir(tempfile.gettempdir()) if n.startswith("memedit-store-")
              and os.path.islink(os.path.join(tempfile.gettempdir(), n, "d"))
              and os.readlink(os.path.join(tempfile.gettempdir(), n, "d")).startswith(
                  str(tmp_path))]



@pytest.mark.parametrize("how", ["dir", "bytes"])
def test_a_folder_that_refuses_new_files_is_named_by_the_destination(tmp_path, monkeypatch,
                                                                      how):
  # As a user without write permission would see it (the tests may run as root, whom
  # permissions do not stop): creating the hidden temporary is refused.
  real_open, real_mkdir = os.open, os.mkdir

  def refuse(real):
    def call(path, *args, **kwargs):
      if os.path.basename(os.fspath(path)).startswith(".tmp-"):
        raise PermissionError(13, "Permission denied", os.fspath(path))
      return real(path, *args, **kwargs)
    return call

  monkeypatch.setattr(os, "open", refuse(real_open))
  monkeypatch.setattr(os, "mkdir", refuse(real_mkdir))
  out = tmp_path / "out"
  with pytest.raises(PermissionError, match=r"cannot write .*out \(its folder .* does not "
                                            r"let this process create files\)") as info:
    if how == "dir":
      _io.save_tree(out, _tree(1.0), {})
    else:
      _io.atomic_write_bytes(out, b"x")
  assert info.value.filename == str(out)
  assert sorted(os.listdir(tmp_path)) == []
