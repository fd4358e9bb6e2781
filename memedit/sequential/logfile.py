"""Saving and loading an :class:`memedit.sequential.EditLog` as one small file.

The file is a numpy ``.npz`` (read without pickles) written atomically (to a temporary
sibling file, synced to disk, then renamed into place). It
holds a JSON record ``meta`` (format ``"memedit-edit-log"``, version 1: per entry the
edit's name, label, content fingerprint, path, layout, method, settings, index, active
flag, whether values and weights are stored, and the sha256 of its stored keys, values
and weights) and, per entry i, the arrays ``e{i}_lam``, ``e{i}_D``, ``e{i}_keys`` and,
when present, ``e{i}_values`` and ``e{i}_weights``: the factors and keys, never the
model's weights. Loading checks every entry's record, its factors against its stored
fingerprint, its keys, values and weights against their stored sha256 (dtype, shape and
bytes: an altered or truncated array is refused) and as
:func:`memedit.sequential.log_append` does, and that the file holds no array its records
do not name. A file written before the sha256 were recorded (its records have no
``sha256`` field) still loads, with the other checks.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import zipfile

import jax
import jax.numpy as jnp
import numpy as np

from memedit import _io
from memedit.checks import as_array
from memedit.edits import Edit
from memedit.sequential.log import EditLog, LogEntry, log_append, log_revert

__all__ = ["load_log", "save_log"]

_FORMAT = "memedit-edit-log"
_VERSION = 1
#: The arrays of an entry whose sha256 its record holds (Λ and D: its fingerprint).
_HASHED = ("keys", "values", "weights")


def _entry_meta(entry: LogEntry, arrays: dict) -> dict:
  e = entry.edit
  return {"name": e.name, "label": e.label, "fingerprint": e.fingerprint,
          "path": list(e.path), "kind": e.kind, "in_ndim": e.in_ndim,
          "method": e.method, "settings": e.settings, "index": e.index,
          "active": bool(entry.active), "values": entry.values is not None,
          "weights": entry.weights is not None,
          "sha256": {n: _io.tree_hash(np.asarray(a, np.float32)) for n, a in arrays.items()
                     if n in _HASHED}}


def _is_log_file(path: str) -> bool:
  try:
    with np.load(path, allow_pickle=False) as z:
      meta = json.loads(bytes(z["meta"]).decode("utf-8"))
    return isinstance(meta, dict) and meta.get("format") == _FORMAT
  except (OSError, ValueError, KeyError, EOFError):
    return False
  except Exception:  # a zip that numpy cannot read (BadZipFile and the like)
    return False


def save_log(path: str | os.PathLike, log: EditLog, *, force: bool = False) -> str:
  """Saves a log as one ``.npz`` file, atomically: factors, keys, values, no weights of
  the model.

  Args:
    path: destination file (replaced atomically).
    log: the :class:`EditLog`.
    force: replace an existing file that is not a saved log.

  Returns:
    The absolute path written.

  Raises:
    ValueError: ``path`` is a folder (or ends with a separator), or a file that is not a
      saved log (without ``force``), or the log holds traced arrays or factors that are
      not float32 (which :func:`load_log` could not give back bit for bit); nothing is
      written then.

  Example:
    >>> import os, tempfile, jax.numpy as jnp, memedit
    >>> from memedit.sequential import load_log, log_append, log_init, save_log
    >>> e = memedit.make_edit(("k",), jnp.ones((2, 1)), jnp.ones((1, 3)), label="a")
    >>> f = save_log(os.path.join(tempfile.mkdtemp(), "log.npz"), log_append(log_init(), e,
    ...                                                                        jnp.eye(3)))
    >>> load_log(f).names
    ('a',)
  """
  if not isinstance(log, EditLog):
    raise ValueError(f"log: expected an EditLog, got {type(log).__name__}")
  given = os.fsdecode(path)
  dst = os.path.abspath(given)
  if os.path.isdir(dst) or given.endswith(tuple(s for s in (os.sep, os.altsep) if s)):
    raise ValueError(f"{given}: expected a file to write the log to, got a folder")
  if os.path.lexists(dst) and not force and not _is_log_file(dst):
    raise ValueError(f"{dst}: expected a saved edit log to replace, got another file; "
                     "pass force=True to replace it")
  arrays, records = {}, []
  for i, entry in enumerate(log.entries):
    parts = {"lam": entry.edit.lam, "D": entry.edit.D, "keys": entry.keys,
             "values": entry.values, "weights": entry.weights}
    stored = {}
    for name, a in parts.items():
      if a is None:
        continue
      if isinstance(a, jax.core.Tracer):
        raise ValueError(f"log: expected concrete arrays to save, got a traced {name} in "
                         f"entry {i}")
      a = np.asarray(a)
      if name in ("lam", "D") and (a.dtype.kind != "f"
                                   or jax.dtypes.canonicalize_dtype(a.dtype) != a.dtype):
        # load_log could not give back these bits, so the fingerprint would not match
        raise ValueError(f"log: expected float32 factors (as memedit.make_edit builds them) "
                         f"to save, got {name} of dtype {a.dtype} in entry {i} "
                         f"({entry.name!r})")
      arrays[f"e{i}_{name}"] = stored[name] = a
    records.append(_entry_meta(entry, stored))
  meta = {"format": _FORMAT, "version": _VERSION, "entries": records}
  arrays["meta"] = np.frombuffer(json.dumps(meta, sort_keys=True).encode("utf-8"), np.uint8)
  buf = io.BytesIO()
  np.savez(buf, **arrays)
  _io.atomic_write_bytes(dst, buf.getvalue())
  return dst


def load_log(path: str | os.PathLike) -> EditLog:
  """Loads a log written by :func:`save_log`.

  Args:
    path: the ``.npz`` file.

  Returns:
    The :class:`EditLog`, with the same edit names, factors, keys, values, weights and
    active flags (arrays as float32 ``jax.Array``).

  Raises:
    FileNotFoundError: no such file.
    ValueError: the file is not a saved memedit edit log (or of another version, or holds
      compressed arrays, which save_log never writes and which are not inflated), or an
      entry is damaged: its record is malformed or names another edit than its factors
      give, an array is missing, not numbers, or named by no record, Λ and D do not
      match the stored fingerprint or the keys, values or weights their stored sha256
      (an array altered or truncated), or the entry fails the checks of
      :func:`memedit.sequential.log_append` (keys that do not fit its factors,
      non-finite arrays, negative weights, a repeated name).

  Example:
    >>> import os, tempfile, jax.numpy as jnp, memedit
    >>> from memedit.sequential import load_log, log_append, log_init, save_log
    >>> e = memedit.make_edit(("k",), jnp.ones((2, 1)), jnp.ones((1, 3)))
    >>> log = log_append(log_init(), e, jnp.eye(3), jnp.ones((3, 2)))
    >>> load_log(save_log(os.path.join(tempfile.mkdtemp(), "l.npz"), log)).names == log.names
    True
  """
  src = os.fspath(path)
  if not os.path.isfile(src):
    hint = ""
    if os.path.isdir(src):
      if _io.output_kind(src) == "edit":  # e.g. what `memedit rewrite --out` writes
        hint = (" holding one saved edit (memedit.load_edit); a log is built from edits "
                "with memedit.sequential.log_append and written with save_log")
    raise FileNotFoundError(f"{src}: expected a saved edit log file, got "
                            f"{'a folder' + hint if os.path.isdir(src) else 'nothing'}")
  with open(src, "rb") as f:
    head = f.read(4)
  if head != b"PK\x03\x04":  # an .npz is a zip archive
    raise ValueError(f"{src}: expected a saved memedit edit log (.npz, a zip archive), got a "
                     f"file that starts with {head!r}")
  packed = _compressed_members(src)
  if packed:  # a few kilobytes may inflate to gigabytes: refused before anything inflates
    m = packed[0]
    raise ValueError(f"{src}: expected the uncompressed arrays save_log writes, got "
                     f"{len(packed)} compressed array(s) ({m.filename}: {m.compress_size} "
                     f"bytes that would inflate to {m.file_size}); it was not read: write it "
                     "with save_log (or numpy.savez, not savez_compressed)")
  try:
    z = np.load(src, allow_pickle=False)
    arrays = {k: z[k] for k in z.files}
    z.close()
    meta = json.loads(bytes(arrays.pop("meta")).decode("utf-8"))
  except Exception as e:  # not an npz, no meta, not JSON
    raise ValueError(f"{src}: expected a saved memedit edit log (.npz), got a file that does "
                     f"not read as one ({type(e).__name__}: {e})") from None
  if not isinstance(meta, dict) or meta.get("format") != _FORMAT:
    got = meta.get("format") if isinstance(meta, dict) else None
    raise ValueError(f"{src}: expected a saved memedit edit log (format {_FORMAT!r}), got "
                     f"format {got!r}")
  version = meta.get("version")
  if type(version) is not int or version != _VERSION:
    raise ValueError(f"{src}: expected edit log version {_VERSION}, got {version!r}")
  if not isinstance(meta.get("entries"), list):
    raise ValueError(f"{src}: expected a list of entries in the log's record, got "
                     f"{meta.get('entries')!r:.80}; the file is damaged")
  for i, m in enumerate(meta["entries"]):
    bad = _bad_entry_meta(m)
    if bad:
      raise ValueError(f"{src}: entry {i}: expected {bad}; the file is damaged")
  # Exactly the arrays the records name: an array no record names (a record removed, or a
  # stored values / weights flag turned off) would otherwise be dropped without a word.
  stored = [("lam", "D", "keys") + tuple(n for n in ("values", "weights") if m[n])
            for m in meta["entries"]]
  want = {f"e{i}_{n}" for i, names in enumerate(stored) for n in names}
  extra = sorted(set(arrays) - want)
  if extra:
    raise ValueError(f"{src}: expected only the arrays its {len(meta['entries'])} entries' "
                     f"records name, got {len(extra)} more ({', '.join(extra[:5])}"
                     f"{', …' if len(extra) > 5 else ''}); the file is damaged")
  log = EditLog()
  for i, m in enumerate(meta["entries"]):
    missing = [f"e{i}_{n}" for n in stored[i] if f"e{i}_{n}" not in arrays]
    if missing:
      raise ValueError(f"{src}: entry {i}: expected array {missing[0]}, got none; the file "
                       "is damaged")
    try:  # as_array: native byte order, numbers only (a '>f4' or text array is named)
      lam, D, keys = (jnp.asarray(as_array(arrays[f"e{i}_{n}"], f"e{i}_{n}"))
                      for n in ("lam", "D", "keys"))
      values, weights = (jnp.asarray(as_array(arrays[f"e{i}_{n}"], f"e{i}_{n}")) if m[n]
                         else None for n in ("values", "weights"))
    except ValueError as e:
      raise ValueError(f"{src}: entry {i} ({m['name']!r}): {e}; the file is damaged"
                       ) from None
    edit = Edit(lam, D, tuple(m["path"]), m["kind"], m["in_ndim"], m["method"],
                json.dumps(m["settings"], sort_keys=True), None, m.get("index"))
    try:
      fingerprint = edit.fingerprint
    except Exception as e:  # arrays numpy wrote with a dtype JAX cannot hold
      fingerprint = f"none ({type(e).__name__})"
    if fingerprint != m["fingerprint"]:
      raise ValueError(f"{src}: entry {i} ({m['name']!r}): expected factors with fingerprint "
                       f"{m['fingerprint']}, got {fingerprint}; the file is damaged")
    if m["label"] is not None:
      edit = dataclasses.replace(edit, label=m["label"])
    if edit.name != m["name"]:
      raise ValueError(f"{src}: entry {i}: expected the name {edit.name!r} its label and "
                       f"factors give, got {m['name']!r} in its record; the file is damaged")
    try:  # the checks of an appended entry: keys fit D, finite, weights >= 0, a new name
      log = log_append(log, edit, keys, values, weights=weights)
    except ValueError as e:
      raise ValueError(f"{src}: entry {i} ({m['name']!r}): {e}; the file is damaged"
                       ) from None
    if "sha256" in m:  # absent in files saved before the arrays' sha256 were recorded
      bad = _bad_arrays(log.entries[-1], m["sha256"], i)
      if bad:
        raise ValueError(f"{src}: entry {i} ({m['name']!r}): expected {bad}; the file is "
                         "damaged")
    if not m["active"]:
      log = log_revert(log, i)
  return log


def _compressed_members(path: str) -> list:
  """The members of the zip archive ``path`` stored compressed (``zipfile.ZipInfo``s, the
  largest first); empty when it is not a zip archive (numpy's loader then reports it)."""
  try:
    with zipfile.ZipFile(path) as z:
      packed = [m for m in z.infolist() if m.compress_type != zipfile.ZIP_STORED]
    return sorted(packed, key=lambda m: -m.file_size)  # the largest first
  except (OSError, ValueError, zipfile.BadZipFile, EOFError):
    return []


#: The fields of an entry's record (besides ``index``) and the types they must have.
_ENTRY_FIELDS = {"name": str, "label": (str, type(None)), "fingerprint": str, "path": list,
                 "kind": str, "in_ndim": int, "method": str, "settings": dict,
                 "active": bool, "values": bool, "weights": bool}


def _bad_entry_meta(m) -> str | None:
  """What is wrong with an entry's record ("expected …, got …"), or None."""
  if not isinstance(m, dict):
    return f"a JSON object as its record, got {m!r:.80}"
  for key, types in _ENTRY_FIELDS.items():
    if key not in m or not isinstance(m[key], types) or (
        types is int and isinstance(m[key], bool)):
      got = f"{m[key]!r:.80}" if key in m else "none"
      return (f"a field {key!r} of type {getattr(types, '__name__', 'str or null')} in its "
              f"record, got {got}")
  index = m.get("index")
  if index is not None and (type(index) is not int or index < 0):
    return f"a field 'index' that is null or an int >= 0 in its record, got {index!r:.80}"
  if not m["path"] or not all(type(p) in (str, int) for p in m["path"]):
    return f"a field 'path' of str and int keys in its record, got {m['path']!r:.80}"
  digests = m.get("sha256", {})  # absent in files saved before it was recorded
  if not isinstance(digests, dict) or not set(digests) <= set(_HASHED) or not all(
      isinstance(v, str) and len(v) == 64 and set(v) <= set("0123456789abcdef")
      for v in digests.values()):
    return (f"a field 'sha256' mapping some of {list(_HASHED)} to 64 hex digits in its "
            f"record, got {digests!r:.120}")
  return None


def _bad_arrays(entry: LogEntry, digests: dict, i: int) -> str | None:
  """What differs between an entry's loaded keys, values and weights and the sha256
  its record holds of them ("… , got …"), or None."""
  arrays = {n: np.asarray(a) for n, a in
            (("keys", entry.keys), ("values", entry.values), ("weights", entry.weights))
            if a is not None}
  if set(digests) != set(arrays):
    return (f"the sha256 of each of its stored arrays {sorted(arrays)} in its record, got "
            f"those of {sorted(digests)}")
  for n, a in arrays.items():
    digest = _io.tree_hash(a)
    if digest != digests[n]:
      return (f"array e{i}_{n} with the sha256 {digests[n]} recorded when it was saved, got "
              f"sha256 {digest} (shape {a.shape}): altered or truncated")
  return None
