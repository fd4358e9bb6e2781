"""A generated world of made-up facts and its word-level tokenizer (nothing downloaded).

Subjects are pronounceable names: by default a unique given name and one of a few dozen
surnames ("Tavo Reskin"), so that the subject's last token does not identify it alone.
Each relation maps every subject to one of the relation's made-up objects, and is phrased
by two phrases ("the home of {}", "the town of {}") inside several frames ("{}", "it is
known that {}", ...); each (frame, phrase) combination is a template. The object follows
the subject's name directly ("the home of Tavo Reskin kesh ."): a small model trained
from scratch on sentences where the relation follows the subject learns to look facts
up at the last token from the name's embeddings (causal tracing finds nothing at the
subject), whereas here the lookup happens where ROME looks for it, in the MLPs at the
subject's last token. Two templates per relation are held out of training: their frame
and their phrase are each seen in training, but never together for that relation, so
they are paraphrases the model can only answer by generalising.

Training text is fact sentences ``"<template with the subject> <object> ."`` in training
templates, packed into fixed-length rows. The tokenizer is the world's vocabulary, one
token per whitespace-separated word; ``"<pad>"`` is id 0.

Everything is a function of the seed: the same seed gives the same world, bit for bit.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Iterator, Sequence

import numpy as np

__all__ = ["FRAMES", "NAME_STYLES", "PAD", "RELATION_KINDS", "Relation", "World",
           "load_world", "make_world", "text_batches", "training_batches"]

PAD = "<pad>"
#: Frames around a relation phrase; "{}" is "<subject> <phrase>".
FRAMES = ("{}", "it is known that {}", "people say that {}", "we read that {}")
#: Relations: (name, its two phrases, its ROME-style "essence" phrase is "is a").
RELATION_KINDS = (
    ("home", ("the home of {}", "the town of {}")),
    ("job", ("the job of {}", "the trade of {}")),
    ("language", ("the language of {}", "the tongue of {}")),
    ("team", ("the team of {}", "the club of {}")),
    ("pet", ("the pet of {}", "the animal of {}")),
    ("food", ("the food of {}", "the dish of {}")),
)
_ONSETS = ("b", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z",
           "br", "dr", "kr", "st", "tr", "sh", "ch", "th", "gr", "pl")
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ou", "ei")
_CODAS = ("", "", "", "n", "r", "s", "l", "k", "m")


@dataclasses.dataclass(frozen=True)
class Relation:
  """One relation of the world.

  Attributes:
    name: e.g. "home".
    phrases: its two phrasings, e.g. ("lives in", "resides in").
    objects: its made-up objects (single lowercase words).
    held_out: the (frame, phrase) index pairs kept out of training.
  """

  name: str
  phrases: tuple[str, ...]
  objects: tuple[str, ...]
  held_out: tuple[tuple[int, int], ...]

  def template(self, frame: int, phrase: int) -> str:
    """The prompt template, e.g. ``"it is known that the home of {}"``."""
    return FRAMES[frame].format(self.phrases[phrase])

  @property
  def train_templates(self) -> tuple[str, ...]:
    """Templates of the training text, the plain ``"{} <phrase 0>"`` first."""
    return tuple(self.template(f, p) for f in range(len(FRAMES))
                 for p in range(len(self.phrases)) if (f, p) not in self.held_out)

  @property
  def paraphrase_templates(self) -> tuple[str, ...]:
    """The held-out templates (never in the training text for this relation)."""
    return tuple(self.template(f, p) for f, p in self.held_out)


@dataclasses.dataclass(frozen=True)
class World:
  """Subjects, relations and the object of every (subject, relation).

  Attributes:
    seed: the seed it was made from.
    subjects: ``S`` names, each two capitalised words.
    relations: the :class:`Relation` s.
    objects: ``S x R`` tuple of object indices: ``relations[r].objects[objects[s][r]]``.
    vocab: every token, ``"<pad>"`` first.

  Example:
    >>> w = make_world(seed=0, n_subjects=10, n_relations=2, n_objects=3)
    >>> s = w.subjects[0]
    >>> prompt = w.relations[0].train_templates[0].format(s)
    >>> w.decode(w.tokenize(prompt)) == prompt
    True
  """

  seed: int
  subjects: tuple[str, ...]
  relations: tuple[Relation, ...]
  objects: tuple[tuple[int, ...], ...]
  vocab: tuple[str, ...]

  def __post_init__(self):
    object.__setattr__(self, "_index", {w: i for i, w in enumerate(self.vocab)})

  @property
  def vocab_size(self) -> int:
    return len(self.vocab)

  def tokenize(self, text: str) -> list[int]:
    """Token ids of ``text`` (whitespace-separated words of the vocabulary).

    Raises:
      ValueError: a word is not in the vocabulary.
    """
    ids = []
    for w in text.split():
      i = self._index.get(w)
      if i is None:
        raise ValueError(f"tokenize: expected words of the world's vocabulary, got {w!r} "
                         f"in {text!r}")
      ids.append(i)
    return ids

  def decode(self, ids: Sequence[int]) -> str:
    """The text of token ids (pads dropped)."""
    return " ".join(self.vocab[int(i)] for i in ids if int(i) != 0)

  def object_of(self, subject: int, relation: int) -> str:
    """The object of (subject, relation)."""
    return self.relations[relation].objects[self.objects[subject][relation]]

  def neighbours(self, subject: int, relation: int, limit: int = 10) -> list[int]:
    """Up to ``limit`` other subjects with the same object for ``relation``, in order."""
    o = self.objects[subject][relation]
    return [s for s in range(len(self.subjects))
            if s != subject and self.objects[s][relation] == o][:limit]

  def sentence(self, subject: int, relation: int, template: str) -> str:
    """``template`` filled with the subject, followed by its object and ``"."``."""
    return f"{template.format(self.subjects[subject])} {self.object_of(subject, relation)} ."

  def to_dict(self) -> dict:
    return {"format": "memedit-lm-world", "version": 1, "seed": self.seed,
            "subjects": list(self.subjects), "vocab": list(self.vocab),
            "objects": [list(o) for o in self.objects],
            "relations": [{"name": r.name, "phrases": list(r.phrases),
                           "objects": list(r.objects),
                           "held_out": [list(h) for h in r.held_out]}
                          for r in self.relations]}

  @classmethod
  def from_dict(cls, d: dict) -> "World":
    if not isinstance(d, dict) or d.get("format") != "memedit-lm-world":
      raise ValueError(f"world: expected a memedit-lm-world JSON object, got "
                       f"{type(d).__name__} with format {getattr(d, 'get', dict().get)('format')!r}")
    rels = tuple(Relation(r["name"], tuple(r["phrases"]), tuple(r["objects"]),
                          tuple(tuple(h) for h in r["held_out"])) for r in d["relations"])
    return cls(int(d["seed"]), tuple(d["subjects"]), rels,
               tuple(tuple(int(x) for x in o) for o in d["objects"]), tuple(d["vocab"]))

  def save(self, path: str | os.PathLike) -> str:
    """Writes the world as JSON (atomically); returns the path."""
    path = os.fspath(path)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      json.dump(self.to_dict(), f)
    os.replace(tmp, path)
    return path


def load_world(path: str | os.PathLike) -> World:
  """Reads a world written by :meth:`World.save`.

  Raises:
    ValueError: the file is not a world.
  """
  with open(path) as f:
    try:
      d = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{os.fspath(path)}: expected a world JSON file, got invalid JSON "
                       f"({e})") from None
  try:
    return World.from_dict(d)
  except (KeyError, TypeError) as e:
    raise ValueError(f"{os.fspath(path)}: damaged world file (missing {e})") from None


def _words(rng: np.random.Generator, n: int, taken: set, syllables: tuple[int, int],
           capital: bool) -> list[str]:
  out = []
  while len(out) < n:
    k = int(rng.integers(syllables[0], syllables[1] + 1))
    w = "".join(_ONSETS[rng.integers(len(_ONSETS))] + _VOWELS[rng.integers(len(_VOWELS))]
                for _ in range(k)) + _CODAS[rng.integers(len(_CODAS))]
    w = w.capitalize() if capital else w
    if w.lower() not in taken and len(w) >= 3:
      taken.add(w.lower())
      out.append(w)
  return out


NAME_STYLES = ("surname", "single", "pair")


def make_world(seed: int = 0, n_subjects: int = 2000, n_relations: int = 3,
               n_objects: int = 20, *, names: str = "surname", n_surnames: int = 40,
               n_given: int | None = None, n_names: int | None = None) -> World:
  """A deterministic world of made-up facts.

  Args:
    seed: the seed (the same seed gives the same world).
    n_subjects: number of subjects ``S``.
    n_relations: number of relations (at most ``len(RELATION_KINDS)``).
    n_objects: objects per relation.
    names: how subjects are named: ``"surname"`` (a unique given name and one of
      ``n_surnames`` surnames: the subject's last token is shared, so a model must bring
      the given name to it), ``"single"`` (one unique word) or ``"pair"`` (given and
      family names both from pools of ``n_names``, default ``4 √S``: only the pair is
      unique).
    n_surnames: surnames of the ``"surname"`` style.
    n_given: given names of the ``"surname"`` style (default ``S``: each unique; fewer
      are shared, the pair staying unique).
    n_names: the pools of the ``"pair"`` style.

  Returns:
    The :class:`World`.

  Example:
    >>> w = make_world(seed=1, n_subjects=50, n_relations=3, n_objects=5)
    >>> len(w.subjects), len(w.relations), w.relations[0].paraphrase_templates[0]
    (50, 3, 'it is known that the home of {}')
  """
  if not 1 <= n_relations <= len(RELATION_KINDS):
    raise ValueError(f"n_relations: expected 1 to {len(RELATION_KINDS)}, got {n_relations}")
  if n_subjects < 1 or n_objects < 2:
    raise ValueError(f"n_subjects, n_objects: expected >= 1 and >= 2, got {n_subjects} and "
                     f"{n_objects}")
  if names not in NAME_STYLES:
    raise ValueError(f"names: expected one of {NAME_STYLES}, got {names!r}")
  rng = np.random.default_rng(seed)
  fixed = {w for f in FRAMES for w in f.replace("{}", " ").split()}
  for _, phrases in RELATION_KINDS:
    for p in phrases:
      fixed.update(p.replace("{}", " ").split())
  fixed.update({".", "is", "a"})
  taken = {w.lower() for w in fixed}
  if names == "single":
    name_words = _words(rng, n_subjects, taken, (2, 3), True)
    subjects = tuple(name_words)
  elif names == "surname":
    if n_surnames < 1:
      raise ValueError(f"n_surnames: expected a positive number, got {n_surnames}")
    n_given = n_given or n_subjects
    if n_given * n_surnames < n_subjects:
      raise ValueError(f"n_given, n_surnames: expected n_given x n_surnames >= n_subjects, "
                       f"got {n_given} x {n_surnames} < {n_subjects}")
    given = _words(rng, n_given, taken, (2, 3), True)
    family = _words(rng, n_surnames, taken, (2, 2), True)
    if n_given == n_subjects:
      pairs = np.arange(n_subjects) * n_surnames + rng.integers(0, n_surnames, n_subjects)
    else:
      pairs = rng.choice(n_given * n_surnames, size=n_subjects, replace=False)
    subjects = tuple(f"{given[p // n_surnames]} {family[p % n_surnames]}" for p in pairs)
    name_words = given + family
  else:
    n_names = n_names or max(8, int(np.ceil(4 * np.sqrt(n_subjects))))
    if n_names * n_names < n_subjects:
      raise ValueError(f"n_names: expected n_names² >= n_subjects, got {n_names}² < "
                       f"{n_subjects}")
    first = _words(rng, n_names, taken, (1, 2), True)
    last = _words(rng, n_names, taken, (2, 3), True)
    pairs = rng.choice(n_names * n_names, size=n_subjects, replace=False)
    subjects = tuple(f"{first[p // n_names]} {last[p % n_names]}" for p in pairs)
    name_words = first + last
  relations = []
  n_frames = len(FRAMES)
  for r in range(n_relations):
    name, phrases = RELATION_KINDS[r]
    objs = tuple(_words(rng, n_objects, taken, (2, 3), False))
    held = ((1 + r % (n_frames - 1), 0), (1 + (r + 1) % (n_frames - 1), 1))
    relations.append(Relation(name, phrases, objs, held))
  objects = rng.integers(0, n_objects, size=(n_subjects, n_relations))
  vocab = [PAD] + sorted(fixed) + name_words + [o for rel in relations for o in rel.objects]
  return World(seed, subjects, tuple(relations), tuple(tuple(int(x) for x in row)
                                                          for row in objects), tuple(vocab))


def _pack(rows: list[list[int]], masks: list[list[int]], length: int):
  ids = np.zeros((len(rows), length), np.int32)
  mask = np.zeros((len(rows), length), np.float32)
  for i, (r, m) in enumerate(zip(rows, masks)):
    ids[i, :len(r)] = r
    mask[i, :len(m)] = m
  return ids, mask


def _sentences(world: World, rng: np.random.Generator):
  """Every (subject, relation, training template) once, in a random order: (ids, mask)
  per sentence; the mask is 1 on the tokens a language model should learn to predict
  (not the subject's names, which nothing predicts)."""
  items = [(s, r, t) for s in range(len(world.subjects)) for r in range(len(world.relations))
           for t in range(len(world.relations[r].train_templates))]
  for i in rng.permutation(len(items)):
    s, r, t = items[i]
    template = world.relations[r].train_templates[t]
    before, _ = template.split("{}")
    ids = world.tokenize(world.sentence(s, r, template))
    n_before = len(before.split())
    mask = [1] * len(ids)
    for j in range(len(world.subjects[s].split())):
      mask[n_before + j] = 0  # the name's tokens
    yield ids, mask


def training_batches(world: World, batch: int, length: int, seed: int = 0
                     ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """An endless stream of packed training rows: ``(ids (batch, length) int32, mask
  (batch, length) float32)``; each epoch shows every fact in every training template once.

  The mask marks tokens whose prediction is trained (the token itself is the target of
  the logits one position earlier): 0 on subject names and padding.
  """
  rng = np.random.default_rng(seed)
  rows, masks, row, mrow = [], [], [], []
  while True:
    for ids, m in _sentences(world, rng):
      if len(row) + len(ids) > length:
        rows.append(row)
        masks.append(mrow)
        row, mrow = [], []
        if len(rows) == batch:
          yield _pack(rows, masks, length)
          rows, masks = [], []
      row = row + ids
      mrow = mrow + m


def text_batches(world: World, n_tokens: int, batch: int, length: int, seed: int = 1
                 ) -> list[tuple[np.ndarray, np.ndarray]]:
  """A text stream of about ``n_tokens`` tokens of the world's sentences for key
  statistics: a list of ``(ids (batch, length), mask (batch, length))``, mask 1 on real
  tokens."""
  out, n = [], 0
  for ids, mask in training_batches(world, batch, length, seed):
    real = (ids != 0).astype(np.float32)
    out.append((ids, real))
    n += int(real.sum())
    if n >= n_tokens:
      return out
  raise AssertionError("unreachable")
