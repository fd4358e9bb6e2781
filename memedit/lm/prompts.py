"""Edit requests and the padded token batches the editors run on.

A :class:`Request` is ROME's: a prompt template with ``{}`` for the subject, the
subject, the new object and optionally the old one. :func:`encode` turns texts into a
:class:`PromptBatch`: right-padded ids (a causal model's outputs at real positions do not
depend on what follows, so no attention mask is needed), the position of the subject's
last token in each row, and the target tokens with the positions whose logits predict
them (teacher forcing: the prompt is followed by all target tokens but the last).

Shapes are padded to buckets (rows to a multiple of 8, length to a multiple of 8), so
the compiled programs that take batches are reused across requests.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
from typing import Callable, NamedTuple, Sequence

import numpy as np

__all__ = ["PromptBatch", "Request", "bucket", "check_fact_tokens", "check_requests_list",
           "continuation_ids", "encode", "fill", "prompt_rows", "read_facts", "round_up",
           "split_template", "subject_span", "token_ids"]

#: Largest facts file :func:`read_facts` reads, in bytes.
MAX_FACTS_BYTES = 16 * 2**20
_FACT_FIELDS = ("subject", "prompt", "target_new", "target_true")

Tokenizer = Callable[[str], Sequence[int]]


def split_template(template, name: str = "prompt") -> tuple[str, str]:
  """``(before, after)``: the text of ``template`` around its one ``{}``.

  The template is not a format string: other braces are text like any other (the same
  split every editor tokenizes).

  Raises:
    ValueError: ``template`` is not a string with exactly one ``{}`` (``name`` is the
      argument named in the message).

  Example:
    >>> split_template("{} lives in {x}")
    ('', ' lives in {x}')
  """
  if not isinstance(template, str) or template.count("{}") != 1:
    raise ValueError(f"{name}: expected a template with exactly one '{{}}' for the subject, "
                     f"got {template!r}")
  before, after = template.split("{}")
  return before, after


def fill(template, subject: str, name: str = "prompt") -> str:
  """``template`` with its one ``{}`` replaced by ``subject`` (:func:`split_template`).

  Example:
    >>> fill("the home of {}", "Tavo Reskin")
    'the home of Tavo Reskin'
  """
  before, after = split_template(template, name)
  return before + subject + after


def token_ids(tokenize: Tokenizer, text: str) -> list[int]:
  """``tokenize(text)`` as a list of ints, refusing what is not a 1-D sequence of integer
  token ids (floats would be truncated, a 2-D array or a dict read as ids).

  Raises:
    ValueError: the tokenizer's output is not 1-D integers, naming the text.

  Example:
    >>> token_ids(lambda s: [len(w) for w in s.split()], "Tavo Reskin")
    [4, 6]
    >>> token_ids(lambda s: [[1, 2]], "Tavo")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: tokenize: expected a 1-D sequence of integer token ids, got an array of shape (1, 2)...
  """
  out = tokenize(text)
  plain = isinstance(out, (str, bytes, dict))
  if not plain and not hasattr(out, "__len__") and hasattr(out, "__iter__"):
    out = list(out)  # e.g. a generator
  try:
    arr = None if plain else np.asarray(out)
  except (TypeError, ValueError):  # e.g. ragged lists
    arr = None
  if arr is not None and arr.ndim == 1 and arr.size == 0:
    return []
  if arr is None or arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
    got = (f"{type(out).__name__} {out!r:.60}" if arr is None or arr.dtype == object
           else f"an array of shape {arr.shape} and dtype {arr.dtype}")
    raise ValueError(f"tokenize: expected a 1-D sequence of integer token ids, got {got} "
                     f"from tokenize({text!r})")
  return [int(i) for i in arr]


def continuation_ids(tokenize: Tokenizer, text: str) -> list[int]:
  """The token ids of ``text`` as a continuation of a prompt: ``tokenize(text)`` less the
  special tokens the tokenizer starts every text with (those of ``tokenize("")``, e.g. a
  BOS token; none for GPT-2's tokenizer).

  Raises:
    ValueError: ``tokenize(text)`` does not start with the tokens of ``tokenize("")`` (a
      tokenizer that adds tokens at the end of every text would put them between a
      prompt and its target), or the tokenizer's output is not 1-D integer ids.

  Example:
    >>> vocab = {"<s>": 1, "paris": 2, "new": 3, "york": 4}
    >>> tok = lambda s: [1] + [vocab[w] for w in s.split()]   # a BOS-adding tokenizer
    >>> continuation_ids(tok, " new york")
    [3, 4]
  """
  ids = token_ids(tokenize, text)
  specials = token_ids(tokenize, "")
  if ids[:len(specials)] != specials:
    raise ValueError(f"tokenize: expected the special tokens it gives every text "
                     f"(tokenize('') = {specials}) at the start of {text!r}, got "
                     f"{ids}; tokenizers that add tokens at the end of a text are not "
                     f"supported")
  return ids[len(specials):]


def subject_span(tokenize: Tokenizer, before: str, subject: str,
                 where: str = "encode") -> tuple[int, int]:
  """``(first, last)``: the positions of the subject's first and last tokens in
  ``tokenize(before + subject)``.

  The subject's tokens are those past the ones ``tokenize(before + subject)`` shares with
  ``tokenize(before)``: a tokenizer that keeps a trailing space as a token of its own
  (GPT-2's ``"of "`` -> ``of``, ``" "``) joins it to the subject's first token instead
  (``" Tavo"``), so counting the tokens of ``before`` would be one too many. With no text
  before the subject, ``tokenize("")`` is what is shared (a BOS token, or nothing).

  Raises:
    ValueError: the subject adds no token (its key would be read at another token);
      ``where`` begins the message.

  Example:
    >>> tok = lambda s: [len(w) for w in s.split(" ")]   # "of " -> [2, 0]: a lone space
    >>> subject_span(tok, "the home of ", "Tavo Reskin")
    (3, 4)
  """
  upto = token_ids(tokenize, before + subject)
  pre = token_ids(tokenize, before)
  first = 0
  while first < min(len(pre), len(upto)) and pre[first] == upto[first]:
    first += 1
  if len(upto) <= first:
    raise ValueError(f"{where}: expected a subject of at least one token, got {subject!r}, "
                     f"which adds none: tokenize({before + subject!r}) = {upto} after "
                     f"tokenize({before!r}) = {pre}")
  return first, len(upto) - 1


@dataclasses.dataclass(frozen=True)
class Request:
  """One fact to write: the prompt with the subject in its ``{}`` should be followed by
  ``target_new``.

  Attributes:
    prompt: template with one ``{}`` where the subject goes, e.g. ``"{} lives in"`` (not a
      format string: other braces are kept as they are).
    subject: the subject's text.
    target_new: the new object's text.
    target_true: the old object's text (for P(new) > P(old) scores), or None.

  Example:
    >>> Request("{} lives in", "Tavo Reskin", "paris").text
    'Tavo Reskin lives in'
  """

  prompt: str
  subject: str
  target_new: str
  target_true: str | None = None

  def __post_init__(self):
    split_template(self.prompt)
    for name in ("subject", "target_new"):
      if not isinstance(getattr(self, name), str) or not getattr(self, name).strip():
        raise ValueError(f"{name}: expected a non-empty string, got {getattr(self, name)!r}")
    if self.target_true is not None and (not isinstance(self.target_true, str)
                                         or not self.target_true.strip()):
      raise ValueError(f"target_true: expected None or a non-empty string, got "
                       f"{self.target_true!r}")

  @property
  def text(self) -> str:
    """The prompt with the subject in place of ``{}`` (the text the editors tokenize)."""
    return fill(self.prompt, self.subject)


def check_requests_list(requests, name: str = "requests") -> list[Request]:
  """``requests`` as a list, refusing anything but a non-empty sequence of
  :class:`Request` s (a single Request, a tuple of strings, ...).

  Raises:
    ValueError: no requests. TypeError: not a sequence of Requests (naming the first
      element that is not one).
  """
  if isinstance(requests, (Request, str, bytes, dict)) or not hasattr(requests, "__iter__"):
    raise TypeError(f"{name}: expected a sequence of Request, got "
                    f"{type(requests).__name__}")
  requests = list(requests)
  if not requests:
    raise ValueError(f"{name}: expected at least one request, got none")
  for i, r in enumerate(requests):
    if not isinstance(r, Request):
      raise TypeError(f"{name}[{i}]: expected a Request(prompt, subject, target_new), got "
                      f"{type(r).__name__} {r!r:.80}")
  return requests


def _fact(where: str, row) -> Request:
  """The Request of one fact (a JSON object or a CSV row as a dict); ``where`` (the file
  and the line or fact number) begins every message."""
  if not isinstance(row, dict):
    raise ValueError(f"{where}: expected an object with subject, prompt, target_new (and "
                     f"optionally target_true), got {type(row).__name__}")
  unknown = sorted(set(row) - set(_FACT_FIELDS), key=str)
  missing = [k for k in _FACT_FIELDS[:3] if row.get(k) in (None, "")]
  if unknown or missing:
    raise ValueError(f"{where}: expected the fields subject, prompt, target_new (and "
                     f"optionally target_true), got missing {missing}, unknown {unknown}")
  # The editors put one space between the prompt and a target themselves: spaces around
  # a name (a CSV written with ", ") would become tokens of their own for tokenizers
  # that keep spaces (GPT-2's).
  strip = lambda v: v.strip() if isinstance(v, str) and v.strip() else v
  true = strip(row.get("target_true"))
  try:
    req = Request(row["prompt"], strip(row["subject"]), strip(row["target_new"]),
                  None if true is None or (isinstance(true, str) and not true.strip())
                  else true)
  except ValueError as e:
    hint = ""
    if (isinstance(row["prompt"], str) and "{}" not in row["prompt"]
        and isinstance(row["subject"], str) and row["subject"].strip()
        and row["subject"].strip() in row["prompt"]):
      hint = " (write {} where the subject goes instead of the subject itself)"
    raise ValueError(f"{where}: {e}{hint}") from None
  for name in _FACT_FIELDS:  # a binary or UTF-16 file, a damaged export
    value = getattr(req, name)
    if isinstance(value, str) and "\x00" in value:
      raise ValueError(f"{where}: {name}: expected text without NUL characters, got "
                       f"{value!r}")
  if req.target_true is not None and req.target_true == req.target_new:
    raise ValueError(f"{where}: expected a target_new other than target_true, got "
                     f"{req.target_new!r} for both (the edit would change nothing)")
  return req


def _csv_rows(text: str, source: str) -> list[tuple[str, dict]]:
  """``(where, row)`` of each data line of CSV ``text`` (the first line is the header)."""
  reader = csv.reader(io.StringIO(text, newline=""), strict=True)
  expected = ("expected a header line naming the columns subject, prompt, target_new (and "
              "optionally target_true), e.g. 'subject,prompt,target_new,target_true'")
  out, header = [], None
  try:
    while True:
      first = reader.line_num + 1
      try:
        row = next(reader)
      except StopIteration:
        break
      if not any(f.strip() for f in row):  # a blank line (or only commas)
        continue
      where = (f"{source}: line {first}" if reader.line_num == first
               else f"{source}: lines {first}-{reader.line_num}")
      if header is None:
        header = [f.strip().lower() for f in row]
        if not {"subject", "prompt", "target_new"} <= set(header):
          raise ValueError(f"{where}: {expected}, got {row}")
        unknown = [f for f in header if f not in _FACT_FIELDS]
        twice = sorted({f for f in header if header.count(f) > 1})
        if unknown or twice:
          raise ValueError(f"{where}: {expected}, each once, got {row} (unknown "
                           f"{unknown}, repeated {twice})")
        continue
      if len(row) > len(header) and any(f.strip() for f in row[len(header):]):
        raise ValueError(f"{where}: expected at most {len(header)} fields (the header's "
                         f"{header}), got {len(row)}: {row}")
      out.append((where, {k: v for k, v in zip(header, row) if v != ""}))
  except csv.Error as e:
    raise ValueError(f"{source}: line {reader.line_num}: expected CSV (quotes around a "
                     f"field with commas or line breaks, a quote inside one doubled), got "
                     f"a parse error: {e}") from None
  if header is None:
    raise ValueError(f"{source}: {expected}, got "
                     f"{'an empty file' if not text else 'blank lines only'}")
  return out


def _read_facts(path) -> list[tuple[str, Request]]:
  """``(where, request)`` of each fact of the facts file ``path`` (:func:`read_facts`);
  ``where`` is ``'<path>: line N'`` (CSV) or ``'<path>: fact i'`` (JSON)."""
  source = os.fspath(path)
  if os.path.isdir(source):
    raise ValueError(f"{source}: expected a facts file, got a folder")
  size = os.path.getsize(source)
  if size > MAX_FACTS_BYTES:
    raise ValueError(f"{source}: expected a facts file of at most {MAX_FACTS_BYTES} bytes, "
                     f"got {size}")
  with open(source, "rb") as f:
    data = f.read()
  try:
    text = data.decode("utf-8-sig")  # a byte-order mark (spreadsheets write one) is dropped
  except UnicodeDecodeError as e:
    line = data[:e.start].count(b"\n") + 1
    raise ValueError(f"{source}: line {line}: expected UTF-8 text, got the byte "
                     f"{data[e.start:e.start + 1]!r} (save the file as UTF-8)") from None
  body = text.lstrip()
  if body[:1] in ("[", "{"):
    try:
      value = json.loads(body)
    except json.JSONDecodeError as e:
      raise ValueError(f"{source}: expected JSON facts, got a parse error: {e}") from None
    if isinstance(value, dict) and set(value) == {"facts"}:
      value = value["facts"]
    if not isinstance(value, list):
      raise ValueError(f"{source}: expected a JSON list of facts (or {{\"facts\": [...]}}), "
                       f"got {type(value).__name__}")
    rows = [(f"{source}: fact {i}", row) for i, row in enumerate(value)]
  else:
    rows = _csv_rows(text, source)
  if not rows:
    raise ValueError(f"{source}: expected at least one fact, got none")
  facts = [(where, _fact(where, row)) for where, row in rows]
  seen = {}
  for where, r in facts:
    key = (r.prompt, r.subject)
    if key in seen:
      before, other = seen[key]
      same = other.target_new == r.target_new
      raise ValueError(
          f"{where}: expected each (subject, prompt) once, got {r.text!r} again (first at "
          f"{before.removeprefix(source + ': ')}) " +
          ("with the same target_new: remove the repeat" if same else
           f"with another target_new: {other.target_new!r} there, {r.target_new!r} here; "
           "one prompt cannot be followed by both"))
    seen[key] = (where, r)
  return facts


def read_facts(path: str | os.PathLike) -> list[Request]:
  """Reads facts to write from a JSON or CSV file.

  JSON: a list of objects (or ``{"facts": [...]}``); CSV: a header line naming the
  columns (any order), then one fact a line (blank lines are skipped; a field with
  commas or line breaks in double quotes). Each fact has ``subject``, ``prompt`` (a
  template with one ``{}`` where the subject goes), ``target_new`` and optionally
  ``target_true`` (the object it replaces, for the P(new) > P(old) scores). Spaces around
  the subject and the targets are dropped (the editors put one space before a target).
  The file is UTF-8 (a byte-order mark is skipped); the format is chosen by its first
  character (``[`` or ``{``: JSON).

  Args:
    path: the file (at most 16 MiB).

  Returns:
    One :class:`Request` per fact, in the file's order.

  Raises:
    ValueError: the file is not such a list, is not UTF-8, or has a fact twice (the same
      subject and prompt, with the same or another target_new) or one whose targets are
      equal; the message names the file, the line (CSV) or fact number (JSON, from 0),
      and the field.

  Example:
    >>> import json, tempfile
    >>> f = tempfile.NamedTemporaryFile("w", suffix=".json", delete=False)
    >>> json.dump([{"subject": "Tavo Reskin", "prompt": "{} lives in",
    ...             "target_new": "paris"}], f); f.close()
    >>> read_facts(f.name)[0].text
    'Tavo Reskin lives in'
  """
  return [r for _, r in _read_facts(path)]


def check_fact_tokens(tokenize: Tokenizer, request: Request, contexts: Sequence[str] = ("{}",),
                      max_length: int | None = None) -> None:
  """Checks, before any work, that the editors can tokenize ``request`` inside each of
  ``contexts`` with each of its targets: the prompt and the targets tokenize to at least
  one token, the subject adds one (:func:`encode`), and the rows fit ``max_length``
  tokens (a model's positions).

  Raises:
    ValueError: naming the field (or the tokenizer's own message).
  """
  for field in ("target_new", "target_true"):
    target = getattr(request, field)
    if target is None:
      continue
    try:
      batch = encode(tokenize, prompt_rows(request, contexts, target), length_multiple=1)
    except ValueError as e:
      raise ValueError(f"{field} {target!r} after {request.text!r}: {e}") from None
    if max_length is not None and batch.ids.shape[1] > max_length:
      raise ValueError(f"expected the prompt in its longest context followed by {field} to "
                       f"fit the model's {max_length} positions, got "
                       f"{batch.ids.shape[1]} tokens for {request.text!r} then {target!r}")


class PromptBatch(NamedTuple):
  """Padded rows of prompts (numpy; every field has N rows).

  Attributes:
    ids: ``(N, T)`` int32 token ids, right-padded with 0.
    last: ``(N,)`` int32 position of the subject's last token (``-1``: no subject).
    end: ``(N,)`` int32 position of the prompt's last token.
    targets: ``(N, M)`` int32 target tokens (0 where ``target_mask`` is 0).
    target_pos: ``(N, M)`` int32 positions whose logits predict ``targets``.
    target_mask: ``(N, M)`` float32, 1 for real target tokens.
    group: ``(N,)`` int32 the request (or fact) each row belongs to.
    weight: ``(N,)`` float32, 1 for real rows, 0 for padding rows.
  """

  ids: np.ndarray
  last: np.ndarray
  end: np.ndarray
  targets: np.ndarray
  target_pos: np.ndarray
  target_mask: np.ndarray
  group: np.ndarray
  weight: np.ndarray

  @property
  def rows(self) -> int:
    return int(self.ids.shape[0])

  def take(self, start: int, stop: int) -> "PromptBatch":
    """Rows ``start:stop``."""
    return PromptBatch(*(a[start:stop] for a in self))


def round_up(n: int, multiple: int) -> int:
  """``n`` rounded up to a positive multiple of ``multiple``."""
  return max(multiple, -(-int(n) // multiple) * multiple)


def bucket(n: int, cap: int, smallest: int = 8) -> int:
  """Rows per compiled call for ``n`` rows: the next power of two from ``smallest``, at
  most ``cap`` (so a few program shapes serve every ``n``).

  Example:
    >>> [bucket(n, 256) for n in (1, 9, 100, 1000)]
    [8, 16, 128, 256]
  """
  size = smallest
  while size < n and size < cap:
    size *= 2
  return min(size, max(cap, 1))


def prompt_rows(request: Request, contexts: Sequence[str], target: str | None = None
                ) -> list[tuple[str, str, str, str | None]]:
  """``(text before the subject, subject, text after, target)`` of the request's prompt
  inside each context template (``"{}"`` where the prompt goes).

  Raises:
    ValueError: ``contexts`` is not a non-empty sequence of templates with one ``{}``.
  """
  before, after = split_template(request.prompt)
  if isinstance(contexts, str) or not contexts:
    raise ValueError(f"contexts: expected a non-empty sequence of templates with one "
                     f"'{{}}' (e.g. (\"{{}}\",)), got {contexts!r}")
  out = []
  for c in contexts:
    if not isinstance(c, str) or c.count("{}") != 1:
      raise ValueError(f"contexts: expected templates with one '{{}}', got {c!r}")
    cb, ca = c.split("{}")
    out.append((cb + before, request.subject, after + ca, target))
  return out


def encode(tokenize: Tokenizer, rows: Sequence[tuple[str, str, str, str | None]],
           groups: Sequence[int] | None = None, *, length: int | None = None,
           row_multiple: int = 8, length_multiple: int = 8) -> PromptBatch:
  """Tokenizes ``(before, subject, after, target)`` rows into a :class:`PromptBatch`.

  The prompt is ``before + subject + after``; the subject's last token is the last
  token of ``tokenize(before + subject)`` (as ROME finds it; the subject must add a token
  to ``tokenize(before)``, :func:`subject_span`); the target is tokenized as
  ``tokenize(" " + target)`` less the tokens a tokenizer starts every text with (a BOS,
  :func:`continuation_ids`) and appended, all but its last token, to the prompt.

  Args:
    tokenize: text -> token ids.
    rows: the rows (``subject`` may be ``""``: ``last`` is then -1; ``target`` None:
      no target tokens).
    groups: the group of each row (default ``0 .. N-1``).
    length: pad to this length (default: the longest row, rounded up).
    row_multiple, length_multiple: bucket sizes.

  Returns:
    The :class:`PromptBatch` (padding rows have weight 0 and group 0).

  Raises:
    ValueError: a prompt or target of no tokens, a subject that adds no token to the text
      before it (its key would be read at another token), a tokenizer output that is not
      1-D integer ids (:func:`token_ids`), rows longer than ``length``.

  Example:
    >>> vocab = {w: i + 1 for i, w in enumerate("Tavo Reskin lives in paris".split())}
    >>> tok = lambda s: [vocab[w] for w in s.split()]
    >>> b = encode(tok, [("", "Tavo Reskin", " lives in", "paris")])
    >>> b.ids[0, :4].tolist(), int(b.last[0]), int(b.end[0]), b.targets[0, :1].tolist()
    ([1, 2, 3, 4], 1, 3, [5])
  """
  prompts, lasts, tgts = [], [], []
  for before, subject, after, target in rows:
    ids = token_ids(tokenize, before + subject + after)
    if not ids:
      raise ValueError(f"encode: expected a prompt of at least one token, got "
                       f"{before + subject + after!r}")
    last = subject_span(tokenize, before, subject)[1] if subject else -1
    t = continuation_ids(tokenize, " " + target) if target is not None else []
    if target is not None and not t:
      raise ValueError(f"encode: expected a target of at least one token, got {target!r}")
    prompts.append(ids)
    lasts.append(last)
    tgts.append(t)
  n = len(prompts)
  full = [len(p) + max(len(t) - 1, 0) for p, t in zip(prompts, tgts)]
  need = max(full)
  length = round_up(need, length_multiple) if length is None else length
  if need > length:
    raise ValueError(f"encode: expected rows of at most {length} tokens, got {need}")
  m = max(1, max(len(t) for t in tgts))
  rows_p = round_up(n, row_multiple)
  ids = np.zeros((rows_p, length), np.int32)
  last = np.full((rows_p,), -1, np.int32)
  end = np.zeros((rows_p,), np.int32)
  targets = np.zeros((rows_p, m), np.int32)
  target_pos = np.zeros((rows_p, m), np.int32)
  target_mask = np.zeros((rows_p, m), np.float32)
  for i, (p, t) in enumerate(zip(prompts, tgts)):
    seq = p + t[:-1]
    ids[i, :len(seq)] = seq
    last[i], end[i] = lasts[i], len(p) - 1
    targets[i, :len(t)] = t
    target_pos[i, :len(t)] = np.arange(len(p) - 1, len(p) - 1 + len(t))
    target_mask[i, :len(t)] = 1.0
  group = np.zeros((rows_p,), np.int32)
  group[:n] = np.arange(n) if groups is None else np.asarray(groups, np.int32)
  weight = np.zeros((rows_p,), np.float32)
  weight[:n] = 1.0
  return PromptBatch(ids, last, end, targets, target_pos, target_mask, group, weight)
