"""Atomic, self-describing storage of array trees: an orbax checkpoint plus JSON metadata.

Every write goes to a temporary sibling directory first and is moved into place only once
it is complete (and synced to disk), so an interrupted write never leaves a half
checkpoint where a reader would find it. An existing destination is swapped out in one
atomic exchange where the system offers it (Linux ``renameat2``); elsewhere it is moved
aside and moved back when the second rename fails, and a later read or write restores it
if the process died in between. The destination is present at every instant or
recoverable. A writer holds an exclusive ``flock`` on its temporary (and on a destination
it moves aside) until it is done, so that a later read or write removes what a killed
writer left and never what a live one (in this process or another) is writing; where
``fcntl`` is missing (Windows), temporaries of killed writers are left.

Every directory written here carries a marker file, ``.memedit-output.json``, naming the
kind of output (``"converted"``, ``"edited-model"``, ``"edit"``, ``"tree"``) and the sha256
of every other file in it. A directory is replaced only when it is a memedit output of the
same kind (or empty, or ``force`` is given), never when it holds the current directory or
a protected path (the source being converted); reading verifies the checksums.

Files and directories are created with the process's umask (no forced private modes).

Threads of one process may write and read the same path at once: writes of one path (and
reads of it) take turns under a lock keyed by the resolved path, and every orbax save or
restore in the process takes turns under one lock (orbax's synchronous checkpointer is not
safe to run from several threads at once, even on different paths).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import os
import re
import secrets
import shutil
import tempfile
import threading
import weakref
from typing import Any, Iterable

import numpy as np

try:
  import fcntl
except ImportError:  # Windows: temporaries of killed writers are left in place
  fcntl = None

__all__ = ["MARKER_FILE", "OUTPUT_KINDS", "atomic_dir", "atomic_write_bytes", "check_output",
           "load_tree", "output_kind", "path_lock", "read_json", "recover", "save_tree",
           "sha256_file", "tree_hash", "verify"]

_TREE_DIR = "arrays"
_META_FILE = "meta.json"
MARKER_FILE = ".memedit-output.json"
_MARKER_FORMAT = 1
#: Kinds of output directory, recorded in each one's marker file.
OUTPUT_KINDS = ("converted", "edited-model", "edit", "tree")


#: One lock per resolved path being written or read, alive while some thread holds it.
_PATH_LOCKS: "weakref.WeakValueDictionary[str, Any]" = weakref.WeakValueDictionary()
_PATH_LOCKS_GUARD = threading.Lock()
#: Serialises orbax saves and restores within the process.
_ORBAX_LOCK = threading.RLock()
#: Temporaries this process is writing now: recover() never removes them, even on file
#: systems whose locks do not tell two opens in one process apart (NFS emulates flock
#: with per-process POSIX locks).
_LIVE_TEMPS: set[str] = set()
_LIVE_TEMPS_GUARD = threading.Lock()


@contextlib.contextmanager
def path_lock(path: str | os.PathLike):
  """Holds this process's lock for ``path`` (resolved: links and ``..`` name one lock).

  Reentrant: a thread holding it may take it again (a save inside a locked block).

  Example:
    >>> with path_lock("out/x"), path_lock("out/../out/x"):  # one lock, taken twice
    ...   pass
  """
  key = os.path.realpath(os.path.abspath(os.fspath(path)))
  with _PATH_LOCKS_GUARD:
    lock = _PATH_LOCKS.get(key)
    if lock is None:
      lock = _PATH_LOCKS[key] = threading.RLock()
  with lock:  # the local reference keeps the lock alive while held
    yield


def _fsync_dir(path: str) -> None:
  """Makes a directory's entries (a rename into or out of it) durable."""
  try:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
  except OSError:  # systems that cannot open directories
    return
  try:
    os.fsync(fd)
  except OSError:  # file systems that cannot sync directories
    pass
  finally:
    os.close(fd)


def _fsync_tree(root: str) -> None:
  """Syncs every file and directory under ``root`` to disk."""
  for dirpath, _, filenames in os.walk(root):
    for name in filenames:
      fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
      try:
        os.fsync(fd)
      finally:
        os.close(fd)
    _fsync_dir(dirpath)


def _sibling(dst: str, tag: str) -> str:
  """An unused hidden name beside ``dst``: ``.<tag>-<basename>-<8 hex digits>``."""
  return os.path.join(os.path.dirname(dst),
                      f".{tag}-{os.path.basename(dst)}-{secrets.token_hex(4)}")


def _is_sibling(dst: str, tag: str, name: str) -> bool:
  """Whether ``name`` is one of the names :func:`_sibling` gives ``dst`` for ``tag``."""
  prefix = f".{tag}-{os.path.basename(dst)}-"
  rest = name[len(prefix):]
  return (name.startswith(prefix) and len(rest) == 8
          and all(c in "0123456789abcdef" for c in rest))


def _flock(fd: int, blocking: bool) -> bool | None:
  """Takes an exclusive ``flock`` on ``fd``: True when taken, False when another open
  file holds it (and ``blocking`` is False), None where locks are not available."""
  if fcntl is None:
    return None
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
    return True
  except BlockingIOError:
    return False
  except OSError as e:
    if e.errno in (errno.EAGAIN, errno.EACCES):
      return False
    return None  # a file system without flock (ENOLCK, EOPNOTSUPP, ...)


def _names(path: str, fd: int) -> bool:
  """Whether ``path`` (a link not followed) is still the file or folder open as ``fd``."""
  try:
    st = os.stat(path, follow_symlinks=False)
  except OSError:
    return False
  fst = os.fstat(fd)
  return (st.st_dev, st.st_ino) == (fst.st_dev, fst.st_ino)


def _forget(path: str) -> None:
  with _LIVE_TEMPS_GUARD:
    _LIVE_TEMPS.discard(path)


@contextlib.contextmanager
def _temporary(dst: str, directory: bool):
  """Creates a new hidden ``.tmp-<name>-<8 hex>`` folder (or file) beside ``dst``, with
  the mode the umask gives, and yields ``(path, fd)``: ``fd`` is open on it (the file is
  open for writing) and holds an exclusive ``flock`` until the block exits, which the
  caller leaves only after renaming or removing ``path``.

  The lock tells a live writer's temporary from a killed one's, whose lock the kernel
  released: :func:`recover` removes a temporary only after taking its lock (without
  waiting). Creating and locking are two steps, so a concurrent :func:`recover` (in
  another process) may lock and remove a temporary in the instant between them; the
  writer therefore waits for the lock, then checks that the name still refers to what it
  created, and starts over under a new name when not. Threads of this process also know
  the temporary from ``_LIVE_TEMPS``, registered before it is created.
  """
  while True:
    path = _sibling(dst, "tmp")
    with _LIVE_TEMPS_GUARD:
      _LIVE_TEMPS.add(path)
    try:
      if directory:
        os.mkdir(path, 0o777)
        fd = None
        if fcntl is not None:  # (Windows cannot open folders; nothing to lock there)
          try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
          except FileNotFoundError:  # removed by a recover() before it was opened
            _forget(path)
            continue
          except BaseException:
            with contextlib.suppress(OSError):
              os.rmdir(path)
            raise
      else:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0),
                     0o666)
    except FileExistsError:
      _forget(path)
      continue
    except PermissionError as e:  # named by the destination, not the hidden temporary
      _forget(path)
      raise PermissionError(e.errno, f"{e.strerror}: cannot write {dst} (its folder "
                            f"{os.path.dirname(dst)} does not let this process create "
                            "files)", dst) from e
    except BaseException:
      _forget(path)
      raise
    if fd is None:
      break
    try:
      if _flock(fd, blocking=True) is False or not _names(path, fd):
        os.close(fd)  # removed by a recover() before it was locked: another name
        _forget(path)
        continue
    except BaseException:
      os.close(fd)
      _forget(path)
      raise
    break
  try:
    yield path, fd
  finally:
    if fd is not None:
      os.close(fd)  # releases the lock, after the caller renamed or removed the temporary
    _forget(path)


#: How recover() and a writer open a path to lock it: never through a link, and without
#: waiting on a pipe that happens to bear such a name.
_LOCK_OPEN = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _exchange(a: str, b: str) -> bool:
  """Swaps two existing paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``).

  Returns:
    True when swapped; False where the system or file system does not offer it.
  """
  try:
    renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
  except (OSError, AttributeError):
    return False
  renameat2.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                        ctypes.c_uint)
  if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
    return True
  err = ctypes.get_errno()
  if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
    return False
  raise OSError(err, os.strerror(err), a, None, b)


def _remove(path: str) -> None:
  if os.path.isdir(path) and not os.path.islink(path):
    shutil.rmtree(path, ignore_errors=True)
  else:
    with contextlib.suppress(FileNotFoundError):
      os.remove(path)


def _held_by_a_writer(path: str) -> bool:
  """Whether a live writer (in this process or another) holds ``path``'s ``flock``."""
  if fcntl is None:
    return False
  try:
    fd = os.open(path, _LOCK_OPEN)
  except OSError:  # gone, a link, or not readable: no writer locked it
    return False
  try:
    return _flock(fd, blocking=False) is False
  finally:
    os.close(fd)


def _moved_aside(dst: str) -> list[str]:
  """Earlier versions of ``dst`` moved aside by a replacement that died, newest first.

  Those a live writer is replacing (it holds their lock until it has moved its new
  version in and removed them) are left out.
  """
  parent, prefix = os.path.dirname(dst), f".old-{os.path.basename(dst)}-"
  try:
    names = os.listdir(parent)
  except (FileNotFoundError, NotADirectoryError):  # nothing was ever written there
    return []
  found = []
  for n in names:
    if n.startswith(prefix) and len(n) == len(prefix) + 8:
      path = os.path.join(parent, n)
      try:
        mtime = os.lstat(path).st_mtime_ns
      except FileNotFoundError:  # removed meanwhile by another reader or writer
        continue
      if not _held_by_a_writer(path):
        found.append((mtime, path))
  return [path for _, path in sorted(found, reverse=True)]


def _remove_dead_temporaries(dst: str) -> None:
  """Removes the ``.tmp-`` siblings of ``dst`` whose writer died (killed mid-write).

  A live writer holds an exclusive ``flock`` on its temporary (see :func:`_temporary`)
  until it has renamed or removed it; the kernel releases the lock of a killed one. A
  temporary is removed only while this function holds its lock (taken without waiting),
  so never under a live writer, in this process or another. Where locks are not
  available, nothing is removed.
  """
  if fcntl is None:
    return
  parent = os.path.dirname(dst)
  try:
    names = os.listdir(parent)
  except OSError:
    return
  for name in names:
    if not _is_sibling(dst, "tmp", name):
      continue
    path = os.path.join(parent, name)
    with _LIVE_TEMPS_GUARD:
      if path in _LIVE_TEMPS:
        continue
    try:
      fd = os.open(path, _LOCK_OPEN)
    except OSError:  # gone meanwhile, a link, or not readable: left alone
      continue
    try:
      if _flock(fd, blocking=False) and _names(path, fd):
        _remove(path)
    finally:
      os.close(fd)


def recover(path: str | os.PathLike) -> None:
  """Finishes, or cleans up after, a write of ``path`` that a killed process left half done.

  Where ``path`` is missing and an earlier version was moved aside (``.old-<name>-*``),
  that version is moved back; where ``path`` exists, such moved-aside versions are stale
  and removed. Temporaries (``.tmp-<name>-*``) of writers that died are removed; those of
  live writers (their lock is held) are left.
  """
  dst = os.path.abspath(os.fspath(path))
  _remove_dead_temporaries(dst)
  old = _moved_aside(dst)
  if not old:
    return
  if not os.path.lexists(dst):
    try:
      os.rename(old.pop(0), dst)
      _fsync_dir(os.path.dirname(dst))
    except OSError as e:  # another process moved it back, or wrote dst, meanwhile
      if e.errno not in (errno.ENOENT, errno.ENOTEMPTY, errno.EEXIST):
        raise
  for stale in old:
    _remove(stale)


#: What :func:`_lock_existing` returns for a destination replaced while it waited.
_REPLACED = object()


def _lock_existing(dst: str) -> Any:
  """Locks the existing ``dst`` before a writer moves it aside.

  Returns:
    The open fd that holds the lock; ``_REPLACED`` when ``dst`` was replaced or removed
    while waiting for the lock (a concurrent writer held it); None where it cannot be locked
    (no ``flock``, a link, a file this process may not read): moved aside unlocked.
  """
  if fcntl is None:
    return None
  try:
    fd = os.open(dst, _LOCK_OPEN)
  except FileNotFoundError:
    return _REPLACED
  except OSError:
    return None
  try:
    taken = _flock(fd, blocking=True)
    if taken is None:
      os.close(fd)
      return None
    if not _names(dst, fd):
      os.close(fd)
      return _REPLACED
  except BaseException:
    os.close(fd)
    raise
  return fd


def _atomic_replace_dir(tmp: str, dst: str) -> None:
  """Moves the finished directory ``tmp`` to ``dst``, replacing any earlier ``dst``.

  Another process may create or remove ``dst`` meanwhile (two runs writing one cache):
  a ``dst`` that appeared since it was found missing is replaced, and one that vanished
  since it was found is created, rather than failing with "Directory not empty".
  """
  parent = os.path.dirname(dst)
  for attempt in range(8):
    last = attempt == 7
    if not os.path.lexists(dst):
      try:
        os.rename(tmp, dst)
      except OSError as e:
        if last or e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
          raise
        continue  # another writer's dst appeared meanwhile: replace it
      _fsync_dir(parent)
      return
    try:
      exchanged = _exchange(tmp, dst)
    except FileNotFoundError:
      if last:
        raise
      continue  # dst removed meanwhile
    if exchanged:  # dst now holds the new tree, tmp the old one
      _fsync_dir(parent)
      _remove(tmp)
      return
    # Two renames: between them dst is missing, and recover() moves the old one back
    # should this process die. The old one stays locked until it is removed, so that no
    # recover() (in another process) moves it back under a live writer.
    held = _lock_existing(dst)
    try:
      if held is _REPLACED:
        continue  # another writer replaced dst while this one waited for its lock
      old = _sibling(dst, "old")
      try:
        os.rename(dst, old)
      except FileNotFoundError:
        if last:
          raise
        continue  # dst removed meanwhile
      try:
        os.rename(tmp, dst)
      except OSError as e:
        if not last and e.errno in (errno.ENOTEMPTY, errno.EEXIST):
          _remove(old)  # another writer's dst appeared meanwhile: replace that one
          continue
        os.rename(old, dst)
        raise
      except BaseException:
        os.rename(old, dst)
        raise
      _fsync_dir(parent)
      _remove(old)
      return
    finally:
      if isinstance(held, int):
        os.close(held)


def _within(inner: str, outer: str) -> bool:
  """Whether ``inner`` is ``outer`` or lies inside it (after resolving links)."""
  inner, outer = os.path.realpath(inner), os.path.realpath(outer)
  return inner == outer or inner.startswith(outer.rstrip(os.sep) + os.sep)


def output_kind(path: str | os.PathLike) -> str | None:
  """The kind of memedit output in directory ``path``, or None when it is not one.

  Directories written before outputs carried a marker are recognised by their
  ``meta.json``: an edit, a checkpoint with edits applied, a converted checkpoint, or
  another saved tree.
  """
  src = os.fspath(path)
  marker = os.path.join(src, MARKER_FILE)
  if os.path.isfile(marker):
    try:
      kind = read_json(marker).get("kind")
    except (ValueError, AttributeError):
      return None
    return kind if kind in OUTPUT_KINDS else None
  meta_file = os.path.join(src, _META_FILE)
  if not (os.path.isfile(meta_file) and os.path.isdir(os.path.join(src, _TREE_DIR))):
    return None
  try:
    meta = read_json(meta_file)
  except ValueError:
    return None
  if not isinstance(meta, dict):
    return None
  if meta.get("format") == "memedit-edit":
    return "edit"
  if "architecture" in meta:
    return "edited-model" if "edits" in meta else "converted"
  return "tree"


def parent_problem(dst: str) -> tuple[str, str | None]:
  """The nearest existing ancestor of the absolute path ``dst`` and what keeps an output
  from being written under it: ``"file"`` (it is not a folder), ``"read-only"`` (this
  process may not write in it) or None.

  Example:
    >>> import tempfile, os
    >>> d = tempfile.mkdtemp()
    >>> parent_problem(os.path.join(d, "a", "b")) == (d, None)
    True
  """
  ancestor = os.path.dirname(dst)
  while not os.path.lexists(ancestor):
    ancestor = os.path.dirname(ancestor)
  if not os.path.isdir(ancestor):
    return ancestor, "file"
  if not os.access(ancestor, os.W_OK | os.X_OK):
    return ancestor, "read-only"
  return ancestor, None


def _check_parent(dst: str) -> None:
  """Refuses an output whose nearest existing ancestor is a file, or a folder this process
  may not write in (checked before any work, so that nothing is computed in vain)."""
  ancestor, problem = parent_problem(dst)
  if problem == "file":
    raise ValueError(f"{dst}: expected an output path inside a folder, got one inside "
                     f"{ancestor!r}, which is a file")
  if problem == "read-only":
    raise ValueError(f"{dst}: expected an output path in a folder this process may write "
                     f"in, got one in {ancestor!r}, which is read-only for it")


def check_output(path: str | os.PathLike, kind: str, *, force: bool = False,
                 protect: Iterable[str | os.PathLike] = (), flag: str = "force=True") -> str:
  """Checks that writing output ``kind`` to ``path`` may replace what is there.

  Args:
    path: the output directory.
    kind: what will be written, one of :data:`OUTPUT_KINDS`.
    force: replace an existing ``path`` of another kind (or not a memedit output).
    protect: paths that must survive: ``path`` may not be one of them nor hold one,
      even with ``force`` (e.g. the checkpoint being converted). The current directory
      is always protected.
    flag: how the caller spells ``force`` in messages: ``'force=True'`` (Python API) or
      ``'--force'`` (command line).

  Returns:
    ``path`` as an absolute path.

  Raises:
    ValueError: ``path`` would replace a protected path, holds something other than
      a memedit output of this kind (without ``force``), or lies inside a file or a
      folder this process may not write in.
  """
  if kind not in OUTPUT_KINDS:
    raise ValueError(f"kind: expected one of {OUTPUT_KINDS}, got {kind!r}")
  dst = os.path.abspath(os.fspath(path))
  cwd = os.getcwd()
  for keep in (*map(os.fspath, protect), cwd):
    if _within(keep, dst):
      what = "the current directory" if keep == cwd else repr(keep)
      raise ValueError(f"{dst}: expected an output folder apart from the inputs, got one that "
                       f"holds {what}; refusing to replace it (even with {flag})")
  _check_parent(dst)
  recover(dst)
  if not os.path.lexists(dst) or force:
    return dst
  if os.path.islink(dst) or not os.path.isdir(dst):
    got = "a link" if os.path.islink(dst) else "a file"
    raise ValueError(f"{dst}: expected a memedit {kind!r} output folder to replace, got "
                     f"{got}; pass {flag} to replace it")
  if not os.listdir(dst):
    return dst
  found = output_kind(dst)
  if found != kind:
    got = f"a memedit {found!r} output" if found else "a folder that is not a memedit output"
    raise ValueError(f"{dst}: expected a memedit {kind!r} output folder to replace, got "
                     f"{got}; pass {flag} to replace it")
  return dst


def _write_failure(dst: str, error: BaseException, existed: bool) -> BaseException:
  """The error to raise for a write of ``dst`` that failed with ``error``.

  A failure of the file system (an ``OSError``, or an error of the checkpoint store that
  carries an OS error code: a full disk, a file size limit) is reported as an
  ``OSError`` with that code, named by ``dst`` and saying that an earlier ``dst`` is kept;
  ``error`` itself otherwise (or when it already names ``dst``).
  """
  code = error.errno if isinstance(error, OSError) else None
  if code is None and isinstance(error, Exception):
    found = re.search(r"os_error_code='?([0-9]+)", str(error))
    code = int(found.group(1)) if found else None
  if code is None or (isinstance(error, OSError) and error.filename == dst):
    return error
  what = " ".join(str(error).split())
  if len(what) > 400:  # the cause is often at the end
    what = what[:200] + " ... " + what[-200:]
  kept = "the earlier one is kept as it was" if existed else "nothing was written"
  return OSError(code, f"{os.strerror(code)}: cannot write {dst} ({type(error).__name__}: "
                 f"{what}); {kept}", dst)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike):
  """Yields a temporary directory that becomes ``path`` when the block exits cleanly.

  On an exception the temporary directory is removed and ``path`` is untouched; after a
  kill the temporary directory is left under a hidden ``.tmp-`` name and ``path`` is
  present, or restored by the next :func:`recover` (every read and write runs it), which
  also removes the killed writer's temporary directory. Other threads of this process
  writing ``path`` wait until the block has exited.
  """
  dst = os.path.abspath(os.fspath(path))
  parent = os.path.dirname(dst)
  os.makedirs(parent, exist_ok=True)
  with path_lock(dst):
    recover(dst)
    with _temporary(dst, directory=True) as (tmp, _):
      try:
        yield tmp
        _fsync_tree(tmp)
        _atomic_replace_dir(tmp, dst)
      except BaseException:
        _remove(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
  """Writes ``data`` to ``path`` through a temporary file and ``os.replace``.

  A killed write leaves ``path`` as it was and a hidden ``.tmp-`` file beside it, which
  the next write of ``path`` (or :func:`recover`) removes.

  Raises:
    ValueError: ``path`` is a folder, or lies inside a file.
    OSError: the write failed (a full disk, a file size limit); the message names
      ``path``, which is left as it was.
  """
  dst = os.path.abspath(os.fspath(path))
  parent = os.path.dirname(dst)
  ancestor, problem = parent_problem(dst)
  if problem == "file":
    raise ValueError(f"{dst}: expected a file path inside a folder, got one inside "
                     f"{ancestor!r}, which is a file")
  if os.path.isdir(dst) and not os.path.islink(dst):
    raise ValueError(f"{dst}: expected a file to write (or a new name), got a folder")
  os.makedirs(parent, exist_ok=True)
  recover(dst)
  existed = os.path.lexists(dst)
  with _temporary(dst, directory=False) as (tmp, fd):
    try:
      with os.fdopen(fd, "wb", closefd=False) as f:  # the lock's fd stays open
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
      os.replace(tmp, dst)
      _fsync_dir(parent)
    except BaseException as e:
      with contextlib.suppress(FileNotFoundError):
        os.remove(tmp)
      failure = _write_failure(dst, e, existed)
      if failure is e:
        raise
      raise failure from e


def read_json(path: str | os.PathLike) -> Any:
  """A JSON file's value.

  Raises:
    FileNotFoundError: the file is missing.
    ValueError: the file is not valid UTF-8 JSON (truncated or overwritten); the message
      names it.
  """
  path = os.fspath(path)
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except RecursionError:  # arrays or objects nested deeper than Python's stack
    raise ValueError(f"{path}: expected JSON metadata, got {os.path.getsize(path)} bytes "
                     "nested too deeply to parse; the directory is damaged: regenerate it"
                     ) from None
  except ValueError as e:  # UnicodeDecodeError, json.JSONDecodeError
    raise ValueError(f"{path}: expected JSON metadata, got {os.path.getsize(path)} bytes "
                     f"that do not parse ({e}); the directory is damaged: regenerate it"
                     ) from None


def _file_digests(root: str) -> dict[str, str]:
  """sha256 of every file under ``root`` but the marker, by '/'-separated relative path."""
  out = {}
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames.sort()
    for name in sorted(filenames):
      full = os.path.join(dirpath, name)
      rel = os.path.relpath(full, root).replace(os.sep, "/")
      if rel != MARKER_FILE:
        out[rel] = sha256_file(full)
  return out


def verify(path: str | os.PathLike) -> dict | None:
  """Checks a saved directory's files against the checksums in its marker.

  Returns:
    The marker's content, or None for a directory saved before markers existed (read
    without checks: regenerate it to have them).

  Raises:
    ValueError: a file is missing or its sha256 differs from the one stored at save
      time (the message names the file), or the marker is damaged.
  """
  src = os.path.abspath(os.fspath(path))
  marker_file = os.path.join(src, MARKER_FILE)
  if not os.path.isfile(marker_file):
    return None
  marker = read_json(marker_file)
  digests = marker.get("sha256") if isinstance(marker, dict) else None
  if (not isinstance(digests, dict) or marker.get("format") != _MARKER_FORMAT
      or not all(isinstance(k, str) and isinstance(v, str) for k, v in digests.items())):
    raise ValueError(f"{marker_file}: expected a memedit output marker of format "
                     f"{_MARKER_FORMAT} with sha256 checksums, got {str(marker)[:200]}; "
                     "regenerate the directory")
  for rel, want in digests.items():
    full = os.path.normpath(os.path.join(src, rel))
    if os.path.isabs(rel) or not _within(full, src):
      raise ValueError(f"{marker_file}: expected paths inside {src}, got {rel!r}")
    if not os.path.isfile(full):
      raise ValueError(f"{full}: missing; expected a file with sha256 {want} (the directory "
                       "is incomplete: regenerate it)")
    got = sha256_file(full)
    if got != want:
      raise ValueError(f"{full}: sha256 {got} does not match {want}, stored when it was "
                       "saved; the file is damaged: regenerate the directory")
  return marker


def _checkpointer():
  """An orbax checkpointer that reads and writes from this process alone.

  Under ``jax.distributed`` orbax would otherwise wait at barriers for every process;
  memedit's trees (statistics caches, edits, converted models) are host-local numpy
  trees written by one process and read by any.
  """
  import jax
  import orbax.checkpoint as ocp

  me = jax.process_index()
  opts = ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me})
  return ocp.StandardCheckpointer(multiprocessing_options=opts)


#: Characters the checkpoint store (tensorstore, under orbax) does not take literally in a
#: local path: it reads a backslash as a separator and brackets as a pattern, so the arrays
#: of a checkpoint under such a path land elsewhere or do not restore.
STORE_UNSAFE_CHARACTERS = "\\[]"


@contextlib.contextmanager
def _store_path(path: str):
  """Yields a path by which orbax reaches ``path`` (a file or folder in an existing folder).

  ``path`` itself when the checkpoint store takes it literally; otherwise a link, in a new
  folder under the system's temporary folder, to ``path``'s folder (removed afterwards),
  so that outputs whose path holds ``[``, ``]`` or ``\\`` are written and read back whole.
  """
  if not any(c in path for c in STORE_UNSAFE_CHARACTERS):
    yield path
    return
  parent, name = os.path.split(path)
  alias_dir = tempfile.mkdtemp(prefix="memedit-store-")
  try:
    link = os.path.join(alias_dir, "d")
    try:
      if any(c in link for c in STORE_UNSAFE_CHARACTERS):
        raise OSError("the temporary folder's own path holds such a character")
      os.symlink(parent, link, target_is_directory=True)
    except OSError as e:
      bad = " or ".join(STORE_UNSAFE_CHARACTERS)
      raise ValueError(f"{path}: expected a path without {bad} (the "
                       f"checkpoint store misreads them) or a system where a link to it "
                       f"can be made, got neither ({e}); choose another path") from None
    yield os.path.join(link, name)
  finally:
    shutil.rmtree(alias_dir, ignore_errors=True)


def save_tree(path: str | os.PathLike, tree: Any, metadata: dict | None = None, *,
              kind: str = "tree", force: bool = False,
              protect: Iterable[str | os.PathLike] = (), flag: str = "force=True") -> str:
  """Saves an array tree and JSON metadata atomically as a directory.

  Threads of this process saving or loading the same ``path`` take turns.

  Args:
    path: destination directory (created or replaced as a whole).
    tree: a pytree of arrays (nested dicts, lists, NamedTuples of jax or numpy arrays).
    metadata: JSON-serialisable dict stored beside the arrays.
    kind: what the directory is, one of :data:`OUTPUT_KINDS`; recorded in its marker file
      with the sha256 of every file, which :func:`load_tree` verifies.
    force, protect, flag: as for :func:`check_output`, which runs before anything is
      written.

  Returns:
    The absolute path written.

  Raises:
    ValueError: ``path`` may not be replaced (see :func:`check_output`).
    OSError: the write failed (a full disk, a file size limit); the message names
      ``path``, whose earlier content is kept.
  """
  with path_lock(os.path.abspath(os.fspath(path))):
    dst = check_output(path, kind, force=force, protect=protect, flag=flag)
    tree = _to_numpy(tree)
    existed = os.path.lexists(dst)
    try:
      with atomic_dir(dst) as tmp:
        with _ORBAX_LOCK, _store_path(os.path.join(tmp, _TREE_DIR)) as where, \
            _checkpointer() as ckptr:
          ckptr.save(where, tree)
        with open(os.path.join(tmp, _META_FILE), "w") as f:
          json.dump(metadata or {}, f, indent=2, sort_keys=True)
        marker = {"format": _MARKER_FORMAT, "kind": kind, "sha256": _file_digests(tmp)}
        with open(os.path.join(tmp, MARKER_FILE), "w") as f:
          json.dump(marker, f, indent=2, sort_keys=True)
    except Exception as e:  # a full disk, a file size limit: named by dst
      failure = _write_failure(dst, e, existed)
      if failure is e:
        raise
      raise failure from e
  return dst


def load_tree(path: str | os.PathLike) -> tuple[Any, dict]:
  """Loads what :func:`save_tree` wrote.

  Returns:
    ``(tree, metadata)``; arrays come back as numpy arrays.

  Raises:
    FileNotFoundError: ``path`` is not a complete saved tree.
    ValueError: the metadata is not valid JSON, a file's sha256 differs from the one
      stored when it was saved (the message names the file), or the arrays do not
      restore. Trees saved before checksums were stored load unchecked.
  """
  src = os.path.abspath(os.fspath(path))
  with path_lock(src):
    recover(src)
    meta_file = os.path.join(src, _META_FILE)
    tree_dir = os.path.join(src, _TREE_DIR)
    if not (os.path.isfile(meta_file) and os.path.isdir(tree_dir)):
      raise FileNotFoundError(
          f"{src} is not a saved memedit tree: expected {_TREE_DIR}/ and {_META_FILE} inside "
          "it")
    metadata = read_json(meta_file)
    if not isinstance(metadata, dict):
      raise ValueError(f"{meta_file}: expected a JSON object, got {type(metadata).__name__}")
    verify(src)
    with _ORBAX_LOCK, _store_path(tree_dir) as where:
      try:
        with _checkpointer() as ckptr:
          tree = ckptr.restore(where)
      except Exception as e:  # orbax / tensorstore errors on damaged or foreign files
        raise ValueError(f"{tree_dir}: expected an orbax checkpoint of arrays, got one that "
                         f"does not restore ({type(e).__name__}: "
                         f"{' '.join(str(e).split())[:300]}); the directory is damaged: "
                         "regenerate it") from e
  return _to_numpy(tree), metadata


def _to_numpy(tree: Any) -> Any:
  import jax

  return jax.tree_util.tree_map(np.asarray, tree)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
  """Hex sha256 of a file's bytes."""
  h = hashlib.sha256()
  with open(path, "rb") as f:
    while block := f.read(chunk):
      h.update(block)
  return h.hexdigest()


def tree_hash(tree: Any) -> str:
  """Hex sha256 of a pytree's structure, shapes, dtypes and array bytes (content hash)."""
  import jax

  leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
  h = hashlib.sha256(str(jax.tree_util.tree_structure(tree)).encode())
  for keypath, leaf in leaves:
    a = np.ascontiguousarray(np.asarray(leaf))
    h.update(jax.tree_util.keystr(keypath).encode())
    h.update(f"{a.dtype.str}{a.shape}".encode())
    h.update(a.tobytes())
  del treedef
  return h.hexdigest()
