"""Scoring edits as the field does (CounterFact-style), on any LM and on the demo world.

For an edit (s, r, o → o*):

- efficacy: on the edit prompt, o* is the top-1 prediction (``efficacy``) and
  P(o*) > P(o) (``efficacy_prob``);
- generalisation: the same on paraphrased prompts (``paraphrase``, ``paraphrase_prob``);
- specificity: prompts about other subjects that share (r, o) still predict o top-1
  (``neighbourhood``) and P(o) > P(o*) there (``neighbourhood_prob``, CounterFact's
  neighbourhood score);
- and, over facts never edited, the model's top-1 accuracy (``unedited``).

Multi-token objects count as top-1 when every token is the argmax given the ones before
(teacher forcing); their probability is the product of the tokens'.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from memedit.lm.hooks import run_lm, split_model
from memedit.lm.keys import check_finite, check_token_ids
from memedit.lm.prompts import Request, bucket, encode, fill
from memedit.lm.world import World

__all__ = ["EditCase", "evaluate_cases", "score_targets", "summarize", "top1_accuracy",
           "world_cases", "world_facts"]


@dataclasses.dataclass(frozen=True)
class EditCase:
  """An edit request with its evaluation prompts.

  Attributes:
    request: the :class:`~memedit.lm.prompts.Request` (``target_true`` required).
    paraphrases: templates with ``{}`` for the subject, held out from the edit.
    neighbours: ``(prompt text, object)`` pairs about other subjects whose object must
      stay.
  """

  request: Request
  paraphrases: tuple[str, ...] = ()
  neighbours: tuple[tuple[str, str], ...] = ()


@functools.partial(jax.jit, static_argnames=("definition",))
def _target_scores(definition, params, ids, tpos, tgt, tmask):
  logits, _ = run_lm(definition, params, ids)
  r = jnp.arange(ids.shape[0])[:, None]
  lp = jax.nn.log_softmax(logits[r, tpos].astype(jnp.float32), axis=-1)  # (N, M, V)
  tok = jnp.take_along_axis(lp, tgt[..., None], axis=-1)[..., 0]
  top = jnp.argmax(lp, axis=-1) == tgt
  return (tok * tmask).sum(-1), jnp.all(top | (tmask == 0), axis=-1)


def score_targets(model, tokenize: Callable[[str], Sequence[int]],
                  pairs: Sequence[tuple[str, str]], *, chunk: int = 256
                  ) -> tuple[np.ndarray, np.ndarray]:
  """Log-probability and top-1 correctness of ``target`` after ``prompt``, per pair.

  Args:
    model: the LM (Linen ``(module, variables)`` or NNX ``(graphdef, state)``).
    tokenize: text -> token ids.
    pairs: ``(prompt, target)`` texts.
    chunk: rows per compiled call.

  Returns:
    ``(logprob (N,) float64, top1 (N,) bool)``.

  Raises:
    ValueError: a pair that is not two texts, a prompt or target of no tokens, or token
      ids outside the model's vocabulary
      (:func:`memedit.lm.keys.check_token_ids`), before the model runs.
  """
  definition, params = split_model(model)
  if isinstance(pairs, (str, bytes)):
    raise ValueError(f"pairs: expected a sequence of (prompt, target) texts, got {pairs!r:.80}")
  if not pairs:
    return np.zeros((0,)), np.zeros((0,), bool)
  for i, pair in enumerate(pairs):
    if (not isinstance(pair, (tuple, list)) or len(pair) != 2
        or not all(isinstance(x, str) for x in pair)):
      raise ValueError(f"pairs[{i}]: expected a (prompt, target) pair of texts, got "
                       f"{pair!r:.80}")
  rows = [("", "", p, t) for p, t in pairs]
  batch = encode(tokenize, rows, row_multiple=1)
  check_token_ids(model, tokenize, rows, batch)
  n = len(pairs)
  size = bucket(n, chunk)
  lps, tops = [], []
  for start in range(0, n, size):
    part = batch.take(start, start + size)
    pad = size - part.rows
    arrays = [part.ids, part.target_pos, part.targets, part.target_mask]
    if pad:
      arrays = [np.concatenate([a, np.zeros((pad,) + a.shape[1:], a.dtype)]) for a in arrays]
    lp, top = _target_scores(definition, params, *(jnp.asarray(a) for a in arrays))
    lps.append(np.asarray(lp, np.float64)[:part.rows])
    tops.append(np.asarray(top)[:part.rows])
  lp = np.concatenate(lps)
  # -inf is a target the model rules out (a logit of -inf); NaN is a model that failed.
  check_finite(np.where(np.isneginf(lp), 0.0, lp), [p + " -> " + t for p, t in pairs],
               "score_targets")
  return lp, np.concatenate(tops)


def top1_accuracy(model, tokenize, facts: Sequence[tuple[str, str]]) -> float:
  """The fraction of ``(prompt, object)`` facts whose object is the top-1 prediction."""
  return float(np.mean(score_targets(model, tokenize, facts)[1])) if facts else float("nan")


def evaluate_cases(model, tokenize, cases: Sequence[EditCase]) -> dict[str, np.ndarray]:
  """Per-case scores of ``model`` (edited or not) on the edit cases.

  Returns:
    ``{name: (len(cases),) float64}`` for ``efficacy``, ``efficacy_prob``,
    ``paraphrase``, ``paraphrase_prob`` (means over each case's paraphrases),
    ``neighbourhood`` and ``neighbourhood_prob`` (means over its neighbours of "its
    object is top-1" and of "P(its object) > P(the case's new object)"; NaN when it has
    none).

  Raises:
    ValueError: a case that is not an :class:`EditCase`, a request without
      ``target_true``, a paraphrase that is not a template with one ``{}``, a neighbour
      that is not a ``(prompt, object)`` pair of texts, or the errors of
      :func:`score_targets`.
  """
  pairs, owner, kind = [], [], []

  def add(i, k, prompt, target):
    pairs.append((prompt, target))
    owner.append(i)
    kind.append(k)

  for i, case in enumerate(cases):
    if not isinstance(case, EditCase):
      raise ValueError(f"cases[{i}]: expected an EditCase, got {type(case).__name__}")
    req = case.request
    if req.target_true is None:
      raise ValueError(f"cases[{i}]: expected a request with target_true, got {req!r}")
    if isinstance(case.paraphrases, str):
      raise ValueError(f"cases[{i}].paraphrases: expected a sequence of templates, got the "
                       f"string {case.paraphrases!r}")
    for j, pair in enumerate(case.neighbours):
      if (not isinstance(pair, (tuple, list)) or len(pair) != 2
          or not all(isinstance(x, str) for x in pair)):
        raise ValueError(f"cases[{i}].neighbours[{j}]: expected a (prompt text, object) pair, "
                         f"got {pair!r:.80}")
    for k, prompt in [("edit", req.text)] + [
        ("para", fill(p, req.subject, f"cases[{i}].paraphrases[{j}]"))
        for j, p in enumerate(case.paraphrases)]:
      add(i, k + "_new", prompt, req.target_new)
      add(i, k + "_old", prompt, req.target_true)
    for prompt, obj in case.neighbours:
      add(i, "neigh", prompt, obj)
      add(i, "neigh_new", prompt, req.target_new)
  lp, top = score_targets(model, tokenize, pairs)
  owner, kind = np.asarray(owner, np.int64), np.asarray(kind, str)
  n = len(cases)

  def mean_of(values, k):
    sel = kind == k
    sums = np.bincount(owner[sel], weights=values[sel].astype(np.float64), minlength=n)
    counts = np.bincount(owner[sel], minlength=n)
    with np.errstate(invalid="ignore", divide="ignore"):
      return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)

  out = {"efficacy": mean_of(top, "edit_new"), "paraphrase": mean_of(top, "para_new"),
         "neighbourhood": mean_of(top, "neigh")}
  for k, name in (("edit", "efficacy_prob"), ("para", "paraphrase_prob")):
    new, old = kind == f"{k}_new", kind == f"{k}_old"
    better = (lp[new] > lp[old]).astype(np.float64)
    out[name] = np.bincount(owner[new], weights=better, minlength=n) / np.maximum(
        np.bincount(owner[new], minlength=n), 1)
    if k == "para":
      out[name] = np.where(np.bincount(owner[new], minlength=n) > 0, out[name], np.nan)
  # Each neighbour's "neigh" row is followed by its "neigh_new" row.
  kept = np.zeros(len(kind))
  kept[kind == "neigh"] = lp[kind == "neigh"] > lp[kind == "neigh_new"]
  out["neighbourhood_prob"] = mean_of(kept, "neigh")
  return out


def summarize(scores: dict[str, np.ndarray]) -> dict[str, float]:
  """Means over cases (NaNs, e.g. cases without neighbours, left out), as percentages."""
  return {k: float(100.0 * np.nanmean(v)) if np.any(~np.isnan(v)) else float("nan")
          for k, v in scores.items()}


def world_cases(world: World, n: int, *, seed: int = 0, neighbours: int = 10,
                subjects: Sequence[int] | None = None) -> list[EditCase]:
  """``n`` edit cases on distinct random subjects of the demo world: a random relation, a
  new object drawn among the relation's others, the plain template as the edit prompt,
  the held-out templates as paraphrases, and as neighbours up to ``neighbours`` subjects
  sharing the relation and old object that are not among the ``n`` edited subjects (so
  that any prefix of the cases, edited together, leaves its neighbours' facts alone).

  Example:
    >>> from memedit.lm.world import make_world
    >>> w = make_world(seed=0, n_subjects=40, n_relations=2, n_objects=3)
    >>> c = world_cases(w, 2)[0]
    >>> c.request.target_new != c.request.target_true, len(c.paraphrases)
    (True, 2)
  """
  rng = np.random.default_rng(seed)
  if subjects is None:
    if n > len(world.subjects):
      raise ValueError(f"n: expected at most {len(world.subjects)} cases (one per subject), "
                       f"got {n}")
    subjects = rng.choice(len(world.subjects), size=n, replace=False)
  cases = []
  edited = {int(s) for s in subjects[:n]}
  for s in subjects[:n]:
    s = int(s)
    r = int(rng.integers(len(world.relations)))
    rel = world.relations[r]
    old = world.objects[s][r]
    new = int(rng.choice([o for o in range(len(rel.objects)) if o != old]))
    plain = rel.train_templates[0]
    req = Request(plain, world.subjects[s], rel.objects[new], rel.objects[old])
    others = [t for t in world.neighbours(s, r, len(world.subjects)) if t not in edited]
    neigh = tuple((plain.format(world.subjects[t]), rel.objects[old])
                  for t in others[:neighbours])
    cases.append(EditCase(req, rel.paraphrase_templates, neigh))
  return cases


def world_facts(world: World, n: int, *, seed: int = 1, exclude: Sequence[str] = (),
                split: str = "train") -> list[tuple[str, str]]:
  """``n`` random ``(prompt, object)`` facts of the world about subjects not in
  ``exclude``, each in a random template of ``split`` ('train' or 'paraphrase')."""
  if split not in ("train", "paraphrase"):
    raise ValueError(f"split: expected 'train' or 'paraphrase', got {split!r}")
  rng = np.random.default_rng(seed)
  skip = set(exclude)
  keep = [s for s in range(len(world.subjects)) if world.subjects[s] not in skip]
  out = []
  for _ in range(n):
    s = keep[int(rng.integers(len(keep)))]
    r = int(rng.integers(len(world.relations)))
    rel = world.relations[r]
    tpls = rel.train_templates if split == "train" else rel.paraphrase_templates
    out.append((tpls[int(rng.integers(len(tpls)))].format(world.subjects[s]),
                world.object_of(s, r)))
  return out
