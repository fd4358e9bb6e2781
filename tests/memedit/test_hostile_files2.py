"""Files as a user's file system hands them to memedit: writes cut off by a file size limit,
metadata nested too deeply to parse, compressed logs that would inflate far beyond their
size, and output paths inside a file or onto a folder."""

from __future__ import annotations

import errno
import io
import json
import os
import subprocess
import sys
import tracemalloc
import zipfile

import jax.numpy as jnp
import numpy as np
import pytest

import memedit
from memedit import _io
from memedit.sequential import load_log, log_append, log_init, save_log
from memedit.specs import load_spec, make_spec, save_spec


def _edit(label="a"):
  return memedit.make_edit(("k",), jnp.ones((2, 1)), jnp.ones((1, 3)), label=label)


def _log():
  return log_append(log_init(), _edit(), jnp.eye(3))


def _spec():
  m = np.zeros((8, 8))
  m[2:4, 2:6] = 1
  return make_spec(key=[(0, m)], paste=(2, m), layer="convt2", kind="erase")


# Writes larger files than the limit the parent sets: SIGXFSZ is ignored, so that write()
# fails with EFBIG (as on a full disk, a failed write) instead of killing the process.
_LIMITED_WRITER = r"""
import json, os, resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
import numpy as np, jax.numpy as jnp, memedit
from memedit.sequential import log_append, log_init, save_log
from memedit.specs import make_spec, save_spec
d = sys.argv[1]
rng = np.random.default_rng(0)
masks = [(i, rng.random((128, 128)) > 0.5) for i in range(4)]
big_edit = memedit.make_edit(("k",), jnp.asarray(rng.random((2, 50)), jnp.float32),
                             jnp.asarray(rng.random((50, 2000)), jnp.float32))
writes = {
    "log.npz": lambda p: save_log(p, log_append(log_init(), memedit.make_edit(
        ("k",), jnp.ones((2, 1)), jnp.ones((1, 300)), label="b"), jnp.ones((200, 300)))),
    "spec.json": lambda p: save_spec(p, make_spec(key=masks, paste=masks[0], layer="convt2",
                                                  kind="erase")),
    "edit": lambda p: memedit.save_edit(p, big_edit),
}
resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000))
out = {}
for name, write in writes.items():
  try:
    write(os.path.join(d, name))
    out[name] = None
  except Exception as e:
    out[name] = [type(e).__name__, getattr(e, "errno", None), getattr(e, "filename", None),
                 str(e)]
print("RESULT " + json.dumps(out))
"""


def test_writes_cut_off_by_a_file_size_limit_keep_the_old_file_and_name_it(tmp_path):
  """Before, a log or spec write that failed with EFBIG raised the bare "[Errno 27] File
  too large" (naming no file), and an edit's raised the checkpoint store's ValueError
  naming only the hidden temporary folder; now each is an OSError with that errno, named
  by the destination, saying the earlier file is kept, which it is."""
  log_file = save_log(tmp_path / "log.npz", _log())
  spec_file = save_spec(tmp_path / "spec.json", _spec())
  edit_dir = memedit.save_edit(tmp_path / "edit", _edit())
  env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(memedit.__file__)),
             JAX_PLATFORMS="cpu")
  run = subprocess.run([sys.executable, "-c", _LIMITED_WRITER, str(tmp_path)], env=env,
                       capture_output=True, text=True, timeout=120)
  lines = [ln for ln in run.stdout.splitlines() if ln.startswith("RESULT ")]
  assert lines, run.stderr[-2000:]
  got = json.loads(lines[0][len("RESULT "):])
  for name, dst in (("log.npz", log_file), ("spec.json", spec_file), ("edit", edit_dir)):
    assert got[name] is not None, f"{name} was written past the limit"
    kind, code, filename, message = got[name]
    assert (kind, code, filename) == ("OSError", errno.EFBIG, dst), got[name]
    assert f"cannot write {dst}" in message and "the earlier one is kept" in message
  assert load_log(log_file).names == ("a",)
  assert load_spec(spec_file, layers=["convt2"]) == _spec()
  assert memedit.load_edit(edit_dir).fingerprint == _edit().fingerprint
  assert sorted(os.listdir(tmp_path)) == ["edit", "log.npz", "spec.json"]  # no temporaries


@pytest.mark.parametrize("name", ["meta.json", _io.MARKER_FILE])
def test_metadata_nested_too_deeply_is_refused_naming_the_file(tmp_path, name):
  """Before, JSON nested deeper than Python's stack raised a bare RecursionError from
  load_edit (and from save_edit over such a folder, for a damaged marker)."""
  edit_dir = memedit.save_edit(tmp_path / "edit", _edit())
  with open(os.path.join(edit_dir, name), "w") as f:
    f.write("[" * 100_000)
  with pytest.raises(ValueError, match=rf"{name}: expected JSON metadata, got 100000 bytes "
                                       r"nested too deeply to parse"):
    memedit.load_edit(edit_dir)
  if name == _io.MARKER_FILE:
    assert _io.output_kind(edit_dir) is None
    with pytest.raises(ValueError, match="not a memedit output; pass force=True"):
      memedit.save_edit(edit_dir, _edit("b"))
  assert memedit.load_edit(memedit.save_edit(edit_dir, _edit("b"), force=True)).name == "b"


def test_a_compressed_log_is_refused_before_it_inflates(tmp_path):
  """Before, a 50 kB log whose keys inflate to 48 MiB was inflated whole before it was
  refused (a few MB of zeros inflate to gigabytes the same way); now compressed arrays,
  which save_log never writes, are refused before anything inflates."""
  good = save_log(tmp_path / "log.npz", _log())
  with zipfile.ZipFile(good) as z:
    members = {n: z.read(n) for n in z.namelist()}
  rows = 2**22  # float32 keys (rows, 3): 48 MiB of zeros
  header = io.BytesIO()
  np.lib.format.write_array_header_1_0(
      header, {"descr": "<f4", "fortran_order": False, "shape": (rows, 3)})
  bomb = tmp_path / "bomb.npz"
  with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as z:
    for n, b in members.items():
      if n != "e0_keys.npy":
        z.writestr(n, b)
    with z.open("e0_keys.npy", "w", force_zip64=True) as w:
      w.write(header.getvalue())
      for _ in range(16):
        w.write(bytes(rows * 12 // 16))
  assert os.path.getsize(bomb) < 200_000
  tracemalloc.start()
  try:
    with pytest.raises(ValueError, match=r"bomb.npz: expected the uncompressed arrays "
                                         r"save_log writes, got 4 compressed array\(s\) "
                                         r"\(e0_keys.npy: \d+ bytes that would inflate to "
                                         rf"{rows * 12 + len(header.getvalue())}\)"):
      load_log(bomb)
    peak = tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()
  assert peak < 8 * 2**20, peak
  # The same arrays compressed by numpy are refused alike, and the stored log still loads.
  with np.load(good) as z:
    np.savez_compressed(tmp_path / "packed.npz", **{k: z[k] for k in z.files})
  with pytest.raises(ValueError, match="packed.npz: expected the uncompressed arrays"):
    load_log(tmp_path / "packed.npz")
  assert load_log(good).names == ("a",)


def test_file_outputs_inside_a_file_or_onto_a_folder_are_refused_by_name(tmp_path):
  """Before, a log or spec path inside a file raised "FileExistsError: [Errno 17] File
  exists" naming the file, and a spec written onto a folder raised IsADirectoryError
  naming the hidden temporary; loading an edit from inside a file raised a bare
  NotADirectoryError."""
  (tmp_path / "afile").write_text("x")
  (tmp_path / "adir").mkdir()
  (tmp_path / "adir" / "mine").write_text("kept")
  inside = tmp_path / "afile" / "x"
  with pytest.raises(ValueError, match=r"afile/x: expected a file path inside a folder, got "
                                       r"one inside '.*afile', which is a file"):
    save_log(inside, _log())
  with pytest.raises(ValueError, match=r"afile/x: expected a file path inside a folder"):
    save_spec(inside, _spec())
  with pytest.raises(ValueError, match=r"adir: expected a file to write \(or a new name\), "
                                       r"got a folder"):
    save_spec(tmp_path / "adir", _spec())
  with pytest.raises(FileNotFoundError, match=r"afile/x is not a saved memedit tree"):
    memedit.load_edit(inside)
  assert (tmp_path / "afile").read_text() == "x"
  assert os.listdir(tmp_path / "adir") == ["mine"]
  assert sorted(os.listdir(tmp_path)) == ["adir", "afile"]


def test_odd_names_and_links_round_trip_or_are_refused(tmp_path):
  """Spaces and non-ASCII names round-trip; an edit is never written over a dangling link
  or a link loop (it is refused, naming the link)."""
  odd = tmp_path / "with space é 漢字"
  e = memedit.load_edit(memedit.save_edit(odd / "edit dir", _edit()))
  assert e.fingerprint == _edit().fingerprint
  assert load_log(save_log(odd / "log ü.npz", _log())).names == ("a",)
  assert load_spec(save_spec(odd / "spec ü.json", _spec()), layers=["convt2"]) == _spec()
  os.symlink(tmp_path / "nowhere", tmp_path / "dangling")
  os.symlink(tmp_path / "loop2", tmp_path / "loop1")
  os.symlink(tmp_path / "loop1", tmp_path / "loop2")
  for link in ("dangling", "loop1"):
    with pytest.raises(ValueError, match=rf"{link}: expected a memedit 'edit' output folder "
                                         r"to replace, got a link"):
      memedit.save_edit(tmp_path / link, _edit())
    with pytest.raises(FileNotFoundError, match=rf"{link} is not a saved memedit tree"):
      memedit.load_edit(tmp_path / link)
    assert os.path.islink(tmp_path / link)
