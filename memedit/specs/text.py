"""Reading a spec file's bytes as JSON, with errors that say where the text went wrong."""

from __future__ import annotations

import json
import re
import sys
from typing import Any

__all__ = ["DuplicateField", "parse_spec_text", "unique_fields"]

_UNDECODED = re.compile("[\udc80-\udcff]")  # bytes that were not UTF-8 (surrogateescape)


def _undecoded_field(data: Any) -> str | None:
  """Where (in document order) the first text holding bytes that were not UTF-8 lies:
  ``"field 'layer'"``, ``"field 'key[0][1]'"``, or ``"a field name in 'solver'"``."""
  stack = [("", data)]
  while stack:
    where, value = stack.pop()
    if isinstance(value, str):
      if _UNDECODED.search(value):
        return f"field {where!r}" if where else "the top-level value"
    elif isinstance(value, dict):
      for k in reversed(list(value)):
        if isinstance(k, str) and _UNDECODED.search(k):
          return f"a field name in {where!r}" if where else "a field name"
        stack.append((f"{where}.{k}" if where else k, value[k]))
    elif isinstance(value, list):
      stack.extend((f"{where}[{i}]", v) for i, v in reversed(list(enumerate(value))))
  return None


def _deep_field(text: str, depth_limit: int) -> str | None:
  """The top-level field of a JSON object text in which arrays and objects nest deeper
  than ``depth_limit``, found by a scan that does not recurse (None: not found)."""
  depth, in_string, escaped, start, last, field = 0, False, False, 0, None, None
  for i, c in enumerate(text):
    if in_string:
      if escaped:
        escaped = False
      elif c == "\\":
        escaped = True
      elif c == '"':
        in_string = False
        last = text[start:i]
    elif c == '"':
      in_string, start = True, i + 1
    elif c == ":" and depth == 1:
      field = last
    elif c in "[{":
      depth += 1
      if depth > depth_limit:
        return field
    elif c in "]}":
      depth -= 1
  return None


class DuplicateField(Exception):
  """A JSON object naming a field twice (raised inside the parser, reported by the caller)."""


def unique_fields(pairs: list) -> dict:
  """``json.loads``' object hook: the object's fields, each named once."""
  out = {}
  for key, value in pairs:
    if key in out:
      raise DuplicateField(key)
    out[key] = value
  return out


def parse_spec_text(raw: bytes, source: str = "spec") -> Any:
  """The JSON value of a spec file's bytes, with errors that name ``source``.

  Args:
    raw: the file's bytes (UTF-8, an optional byte-order mark).
    source: the file's name, for error messages.

  Returns:
    The parsed JSON value.

  Raises:
    ValueError: the bytes are not UTF-8 (the message gives the offset of the first bad
      byte and the field it lies in), not JSON, or JSON nested deeper than Python's
      parser allows.

  Example:
    >>> parse_spec_text(b'{"layer": "convt2"}')
    {'layer': 'convt2'}
    >>> parse_spec_text(b'{"layer": "conv\\xe9"}', "s.json")
    Traceback (most recent call last):
    ...
    ValueError: s.json: expected UTF-8 text, got the byte 0xe9 at offset 15 (in field 'layer'), ...
  """
  try:
    raw.decode("utf-8")
    bad = None
  except UnicodeDecodeError as e:
    bad = e.start
  text = raw.decode("utf-8", errors="surrogateescape")
  if text.startswith("\ufeff"):
    text = text[1:]

  def not_utf8(field):
    where = f" (in {field})" if field else ""
    return ValueError(f"{source}: expected UTF-8 text, got the byte 0x{raw[bad]:02x} at "
                      f"offset {bad}{where}, which is not UTF-8")

  try:
    data = json.loads(text, object_pairs_hook=unique_fields)
  except DuplicateField as e:
    raise ValueError(f"{source}: expected each field of an object once, got {e.args[0]!r} "
                     f"more than once (JSON would keep only the last)") from None
  except RecursionError:
    limit = sys.getrecursionlimit()
    field = _deep_field(text, limit // 2)
    where = f" in field {field!r}" if field is not None else ""
    raise ValueError(f"{source}: expected a JSON edit spec, got lists or objects nested "
                     f"deeper than the parser allows (about {limit} levels){where}") from None
  except json.JSONDecodeError as e:
    if bad is not None:
      raise not_utf8(None) from None
    raise ValueError(f"{source}: expected a JSON edit spec, got invalid JSON ({e})") from None
  except ValueError as e:  # an integer literal longer than Python converts (4300 digits)
    raise ValueError(f"{source}: expected a JSON edit spec, got a number too long to read "
                     f"({str(e).split(';')[0]})") from None
  if bad is not None:
    raise not_utf8(_undecoded_field(data))
  return data
