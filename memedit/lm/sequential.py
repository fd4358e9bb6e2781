"""Sequential MEMIT batches that hold: AlphaEdit's null-space projection, an edit log.

Batches of facts are written one after another, each with MEMIT (:mod:`memedit.lm.memit`)
on the model with the earlier batches applied. Plain sequential MEMIT solves each block's
update with the ridge insert ΔW = R Kᵀ (λC + K Kᵀ)⁻¹; after some hundreds of edits the
later updates move what the earlier ones stored and the model's other facts drift.
AlphaEdit (Fang et al., ICLR 2025) solves instead, per block, with P the projector onto
the null space of the block's key statistics C (:func:`memedit.sequential.null_space`:
the eigenvectors of C whose eigenvalues are below ``threshold · λ_max(C)``)::

  ΔW = R K₁ᵀ P (K_p K_pᵀ P + K₁ K₁ᵀ P + l2·I)⁻¹        (keys as columns)

(:func:`memedit.sequential.insert_null_space`), K₁ the batch's keys, R their residuals and
K_p the keys the earlier batches wrote into that block (from the log, weighted by
``key_weight``). ΔW = ΔW P: the keys of C's range keep their outputs. With
``edit_keys="null_space"`` the earlier keys are also taken out of P (M = C + key_weight
Σ k kᵀ), which keeps their outputs exactly but shrinks the null space by about one
dimension per key; ``"solve"`` (AlphaEdit) keeps them in the solve only; ``"none"``
drops them.

Every batch yields ordinary :class:`memedit.Edit` values (one per block), appended to a
:class:`memedit.sequential.EditLog` with the keys and target values they were solved
for, so that any batch can be reverted and replayed bit for bit
(:func:`revert_batch`, :func:`memedit.sequential.log_apply`).

:func:`run_sequential` runs the experiment on the demo world: ``edits`` facts in batches
of ``batch``, with (``projected``) and without (``plain``) the projection, scored after
each batch on all edits so far (efficacy, paraphrase), on neighbourhood prompts and on
facts never edited.

Example:
  >>> import jax.numpy as jnp
  >>> from memedit.lm.sequential import alphaedit_insert
  >>> P = jnp.diag(jnp.array([0.0, 1.0, 1.0]))
  >>> lam, D = alphaedit_insert(jnp.zeros((1, 3)), jnp.array([[1.0, 10.0, 0.0]]),
  ...                           jnp.array([[2.0]]), P, l2=1e-4)
  >>> dW = lam @ D
  >>> float(dW[0, 0]), round(float(dW[0] @ jnp.array([1.0, 10.0, 0.0])), 3)
  (0.0, 2.0)
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from memedit.lm.evaluate import EditCase, evaluate_cases, score_targets, summarize
from memedit.lm.hooks import LMLayout, split_model
from memedit.lm.keys import check_memory
from memedit.lm.memit import compact_factors, memit_edits, memit_insert, with_params
from memedit.lm.prompts import Request
from memedit.lm.world import World
from memedit.optim import check_choice
from memedit.sequential import (EditLog, insert_null_space, log_append, log_apply, log_init,
                                log_keys, log_replay, log_revert, null_space)

__all__ = ["ARMS", "EDIT_KEYS", "SCORES", "BatchResult", "alphaedit_insert", "fact_keys",
           "layer_projectors",
           "memit_batch", "replay_batch", "revert_batch", "run_sequential", "sequential_cases",
           "sequential_scores"]

HIGHEST = jax.lax.Precision.HIGHEST

#: How the earlier edits' keys enter a projected insert (see the module docstring).
EDIT_KEYS = ("solve", "null_space", "none")
#: The two arms of :func:`run_sequential`.
ARMS = ("projected", "plain")
#: Score names of a row of :func:`run_sequential`, in order.
SCORES = ("efficacy", "efficacy_prob", "paraphrase", "paraphrase_prob", "neighbourhood",
          "neighbourhood_prob", "unedited", "unedited_drop")


class BatchResult(NamedTuple):
  """One batch written by :func:`memit_batch`.

  Attributes:
    log: the edit log with the batch's edits appended (one entry per block).
    edits: the batch's :class:`memedit.Edit` values, one per block, in block order.
    names: their names (what :func:`revert_batch` takes).
  """

  log: EditLog
  edits: list
  names: tuple


def alphaedit_insert(W, keys, residuals, P, preserved_keys=None, preserved_weights=None, *,
                     l2: float = 10.0) -> tuple[Any, Any]:
  """One block's AlphaEdit update as factors: ΔW = Rᵀ K P (A P + l2·I)⁻¹ = Λ D.

  A = Kᵀ K + K_pᵀ diag(w) K_p, i.e. the paper's ΔW = R K₁ᵀ P (K_p K_pᵀ P + K₁ K₁ᵀ P +
  l2·I)⁻¹ with keys as columns (:func:`memedit.sequential.insert_null_space` with the
  target values K Wᵀ + R). Factors of rank above the layer's output width are compacted
  (:func:`memedit.lm.memit.compact_factors`).

  Args:
    W: ``(d, key_dim)`` the layer's weight (math layout).
    keys: ``(F, key_dim)`` K as rows. residuals: ``(F, d)`` R as rows.
    P: ``(key_dim, key_dim)`` the null-space projector (:func:`layer_projectors`).
    preserved_keys: ``(m, key_dim)`` K_p, the earlier edits' keys (None: none).
    preserved_weights: ``(m,)`` their weights w (None: 1).
    l2: > 0, the weight of ‖ΔW‖² (AlphaEdit's ``L2``; 10 in its GPT-2 XL and GPT-J
      settings).

  Returns:
    ``(lam, directions)`` with ``lam @ directions`` = ΔW (``(d, key_dim)``).

  Example:
    >>> import jax.numpy as jnp
    >>> lam, D = alphaedit_insert(jnp.zeros((1, 2)), jnp.array([[3.0, 4.0]]),
    ...                           jnp.array([[1.0]]), jnp.diag(jnp.array([1.0, 0.0])),
    ...                           l2=1.0)
    >>> [round(float(x), 3) for x in (lam @ D)[0]]   # 3 / (9 + 1), first axis only
    [0.3, 0.0]
  """
  dt = jnp.result_type(jnp.float32, *(jnp.asarray(a).dtype for a in (W, keys, residuals, P)))
  W = jnp.asarray(W, dt)
  keys = jnp.asarray(keys, dt)
  values = jnp.matmul(keys, W.T, precision=HIGHEST) + jnp.asarray(residuals, dt)
  sol = insert_null_space(W, keys, values, jnp.asarray(P, dt), preserved_keys,
                          preserved_weights, l2=l2)
  return compact_factors(sol.lam, sol.D)


def layer_projectors(covariances: dict, layers: Sequence[int], *,
                     threshold: float = 1e-2) -> dict:
  """AlphaEdit's projector of each block: ``{layer: NullSpace}`` of its C alone.

  Args:
    covariances: ``{layer: C}`` (``(key_dim, key_dim)`` E[k kᵀ]).
    layers: the blocks.
    threshold: relative eigenvalue cutoff (:func:`memedit.sequential.null_space`).

  Returns:
    ``{layer: memedit.sequential.NullSpace}`` (``.P``, ``.dim``).

  Example:
    >>> import numpy as np
    >>> ns = layer_projectors({0: np.diag([1.0, 1e-3, 1.0])}, [0])[0]
    >>> int(ns.dim)
    1
  """
  missing = [l for l in layers if l not in covariances]
  if missing:
    raise ValueError(f"covariances: expected C for every layer {list(layers)}, missing "
                     f"{missing}")
  return {int(l): null_space(np.asarray(covariances[l], np.float32), threshold=threshold)
          for l in layers}


def _kernel_paths(model, layout, layers, tokenize, request):
  ids = np.asarray([tokenize(request.text)], np.int32)
  return {l: check_memory(model, layout.memories[l], ids).weight_path for l in layers}


def memit_batch(model, layout: LMLayout, layers: Sequence[int],
                tokenize: Callable[[str], Sequence[int]], requests: Sequence[Request],
                covariances: dict, log: EditLog, *, project: bool = True,
                projectors: dict | None = None, threshold: float = 1e-2, l2: float = 10.0,
                key_weight: float = 1.0, edit_keys: str = "solve", penalty: float = 15000.0,
                contexts: Sequence[str] = ("{}",), value_options: dict | None = None,
                preserved: dict | None = None) -> BatchResult:
  """One batch of MEMIT written into ``model`` (the log's edits already applied to it),
  recorded in ``log``.

  Args:
    model: the current LM, Linen ``(module, variables)`` or NNX ``(graphdef, state)``:
      the unedited parameters with ``log`` applied (:func:`memedit.sequential.log_apply`).
    layout, layers, tokenize, requests, covariances, penalty, contexts, value_options: as
      :func:`memedit.lm.memit.memit_edits` (``penalty``: the plain arm's λ).
    log: the :class:`memedit.sequential.EditLog` of the earlier batches.
    project: AlphaEdit's projected insert (else MEMIT's ridge insert, exactly
      :func:`memedit.lm.memit.memit_edits`).
    projectors: ``{layer: NullSpace}`` of :func:`layer_projectors` (None: computed here
      at ``threshold``); unused when ``edit_keys="null_space"`` (P then depends on the
      log).
    threshold: relative eigenvalue cutoff of the null space.
    l2: AlphaEdit's weight of ‖ΔW‖².
    key_weight: ≥ 0, the weight of each earlier edit's key (times its log weight).
    edit_keys: ``"solve"`` (AlphaEdit: K_p in the solve), ``"null_space"`` (also out of
      P) or ``"none"``.
    preserved: ``{layer: (keys (m, key_dim), weights (m,))}``, further keys whose outputs
      the projected insert keeps, beside the earlier edits' (e.g. the keys of facts to
      keep, :func:`fact_keys`; the batch's own facts left out by the caller): in the solve
      with their weights, and out of P too with ``edit_keys="null_space"``.

  Returns:
    :class:`BatchResult`; apply the new log to the unedited parameters for the next model.

  Raises:
    ValueError: an unknown ``edit_keys``, or the errors of ``memit_edits``.
  """
  check_choice(edit_keys, EDIT_KEYS, "edit_keys")
  layers = [int(l) for l in layers]
  if not requests:
    raise ValueError("requests: expected at least one request, got none")
  paths = _kernel_paths(model, layout, layers, tokenize, requests[0])
  written: dict = {}
  if project and projectors is None and edit_keys != "null_space":
    projectors = layer_projectors(covariances, layers, threshold=threshold)

  def insert(layer, W, keys, residuals):
    written[layer] = (np.asarray(keys, np.float32),
                      np.asarray(keys, np.float32) @ np.asarray(W, np.float32).T
                      + np.asarray(residuals, np.float32))
    if not project:
      lam, directions = memit_insert(W, covariances[layer], keys, residuals, penalty)
      return lam, directions, {}
    pk, pw = log_keys(log, paths[layer])
    if pk.shape[0] == 0 or edit_keys == "none":
      pk = pw = None
    else:
      pw = pw * jnp.float32(key_weight)
    if preserved and layer in preserved:
      pk, pw = _with_preserved(pk, pw, *preserved[layer], W.shape[1])
    if edit_keys == "null_space":
      ns = null_space(np.asarray(covariances[layer], np.float32), pk, pw,
                      threshold=threshold)
    else:
      ns = projectors[layer]
    lam, directions = alphaedit_insert(W, keys, residuals, ns.P, pk, pw, l2=l2)
    return lam, directions, {
        "insert": "alphaedit", "threshold": float(threshold), "l2": float(l2),
        "key_weight": float(key_weight), "edit_keys": edit_keys, "null_dim": int(ns.dim),
        "preserved_keys": 0 if pk is None else int(pk.shape[0])}

  res = memit_edits(model, layout, layers, tokenize, requests, covariances, penalty=penalty,
                    contexts=contexts, value_options=value_options, insert=insert)
  for layer, edit in zip(layers, res.edits):
    keys, values = written[layer]
    log = log_append(log, edit, keys, values)
  return BatchResult(log, list(res.edits), tuple(e.name for e in res.edits))


def _with_preserved(pk, pw, keys, weights, key_dim):
  """The earlier edits' keys and weights (or None) with ``keys``/``weights`` appended."""
  keys = np.asarray(keys, np.float32)
  weights = np.asarray(weights, np.float32)
  if keys.ndim != 2 or keys.shape[1] != key_dim or weights.shape != keys.shape[:1]:
    raise ValueError(f"preserved: expected keys (m, {key_dim}) and weights (m,), got "
                     f"{keys.shape} and {weights.shape}")
  if pk is not None:
    keys = np.concatenate([np.asarray(pk, np.float32), keys])
    weights = np.concatenate([np.asarray(pw, np.float32), weights])
  return jnp.asarray(keys), jnp.asarray(weights)


def fact_keys(model, world: World, layout: LMLayout, layers: Sequence[int],
              contexts: Sequence[str] = ("{}",)) -> tuple[list[tuple[int, int]], dict]:
  """The key of every fact (subject s, relation r) of the demo world at each block: at the
  subject's last token of the relation's first training template (the prompt an edit of
  the fact is written with), averaged over ``contexts``
  (:func:`memedit.lm.keys.subject_keys`).

  Args:
    model: the LM, Linen ``(module, variables)`` (its keys before any edit).
    world: its :class:`memedit.lm.world.World`.
    layout: its :class:`LMLayout`.
    layers: the blocks.
    contexts: context templates.

  Returns:
    ``(facts, {layer: (len(facts), key_dim) float32 keys})``, ``facts`` the ``(s, r)``
    pairs in order (subjects outer).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from memedit.lm.world import make_world
    >>> from ports.gpt2 import GPT2Config, GPT2LMHeadModel, lm_layout
    >>> w = make_world(seed=0, n_subjects=4, n_relations=2, n_objects=3)
    >>> net = GPT2LMHeadModel(GPT2Config(vocab_size=w.vocab_size, n_positions=16, n_embd=8,
    ...                                   n_layer=2, n_head=2))
    >>> v = net.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
    >>> facts, keys = fact_keys((net, v), w, lm_layout(2), [0, 1])
    >>> len(facts), keys[1].shape
    (8, (8, 32))
  """
  from memedit.lm.keys import subject_keys_at

  facts = [(s, r) for s in range(len(world.subjects)) for r in range(len(world.relations))]
  requests = [Request(world.relations[r].train_templates[0], world.subjects[s],
                      world.object_of(s, r)) for s, r in facts]
  layers = [int(l) for l in layers]
  keys = subject_keys_at(model, [layout.memories[l] for l in layers], world.tokenize,
                         requests, contexts)
  return facts, dict(zip(layers, keys))


def revert_batch(log: EditLog, names: Sequence[str]) -> EditLog:
  """``log`` with a batch's entries (``BatchResult.names``) reverted (kept, inactive).

  ``log_apply(params, revert_batch(log, names))`` has the bits of the additive model
  without that batch (see :mod:`memedit.sequential.log`).

  Example:
    >>> import jax.numpy as jnp, memedit
    >>> from memedit.sequential import log_append, log_init
    >>> e = memedit.make_edit(("k",), jnp.ones((2, 1)), jnp.ones((1, 3)), label="a")
    >>> revert_batch(log_append(log_init(), e, jnp.eye(3)), ["a"]).active
    ()
  """
  for name in names:
    log = log_revert(log, name)
  return log


def replay_batch(log: EditLog, names: Sequence[str]) -> EditLog:
  """``log`` with a reverted batch's entries active again (same bits as before).

  Example:
    >>> import jax.numpy as jnp, memedit
    >>> from memedit.sequential import log_append, log_init
    >>> e = memedit.make_edit(("k",), jnp.ones((2, 1)), jnp.ones((1, 3)), label="a")
    >>> log = revert_batch(log_append(log_init(), e, jnp.eye(3)), ["a"])
    >>> replay_batch(log, ["a"]).active
    ('a',)
  """
  for name in names:
    log = log_replay(log, name)
  return log


def sequential_cases(world: World, n: int, *, reserve: int = 500, neighbours: int = 10,
                     seed: int = 0) -> tuple[list[EditCase], list[int]]:
  """``n`` edit cases on distinct (subject, relation) facts of the demo world, and the
  ``reserve`` subjects no case edits (their facts are the neighbourhood and unedited
  facts).

  Each case: a new object drawn among the relation's others, the plain template as the
  edit prompt, the held-out templates as paraphrases, and as neighbours up to
  ``neighbours`` reserved subjects sharing the relation and the old object.

  Args:
    world: the :class:`memedit.lm.world.World`.
    n: number of cases (at most ``(subjects − reserve) · relations``).
    reserve: subjects kept unedited.
    neighbours: neighbour prompts per case.
    seed: the seed.

  Returns:
    ``(cases, reserved subject indices)``.

  Example:
    >>> from memedit.lm.world import make_world
    >>> w = make_world(seed=0, n_subjects=40, n_relations=2, n_objects=3)
    >>> cases, kept = sequential_cases(w, 50, reserve=10)
    >>> len(cases), len(kept), len({(c.request.subject, c.request.prompt) for c in cases})
    (50, 10, 50)
  """
  n_s, n_r = len(world.subjects), len(world.relations)
  if not 0 <= reserve < n_s:
    raise ValueError(f"reserve: expected 0 <= reserve < {n_s} subjects, got {reserve}")
  if not 1 <= n <= (n_s - reserve) * n_r:
    raise ValueError(f"n: expected 1 to {(n_s - reserve) * n_r} cases ((subjects − reserve) "
                     f"× relations), got {n}")
  rng = np.random.default_rng(seed)
  order = rng.permutation(n_s)
  kept, editable = sorted(int(s) for s in order[:reserve]), order[reserve:]
  kept_set = set(kept)
  pairs = rng.choice(len(editable) * n_r, size=n, replace=False)
  cases = []
  for p in pairs:
    s, r = int(editable[p // n_r]), int(p % n_r)
    rel = world.relations[r]
    old = world.objects[s][r]
    new = int(rng.choice([o for o in range(len(rel.objects)) if o != old]))
    plain = rel.train_templates[0]
    req = Request(plain, world.subjects[s], rel.objects[new], rel.objects[old])
    others = [t for t in world.neighbours(s, r, n_s) if t in kept_set][:neighbours]
    neigh = tuple((plain.format(world.subjects[t]), rel.objects[old]) for t in others)
    cases.append(EditCase(req, rel.paraphrase_templates, neigh))
  return cases, kept


def sequential_scores(model, tokenize, cases: Sequence[EditCase],
                      facts: Sequence[tuple[str, str]]) -> dict[str, float]:
  """Efficacy, paraphrase and neighbourhood (top-1 and P(old) > P(new)) over ``cases``
  (percentages, :func:`memedit.lm.evaluate.evaluate_cases`; each distinct neighbour
  prompt and target scored once) and top-1 accuracy on ``facts`` (``unedited``)."""
  plain = [EditCase(c.request, c.paraphrases, ()) for c in cases]
  scores = summarize(evaluate_cases(model, tokenize, plain))
  pairs = sorted({p for c in cases for p in c.neighbours}
                 | {(p, c.request.target_new) for c in cases for p, _ in c.neighbours})
  index = {p: i for i, p in enumerate(pairs)}
  lp, top = score_targets(model, tokenize, pairs)
  with_neighbours = [c for c in cases if c.neighbours]
  per = [np.mean([top[index[p]] for p in c.neighbours]) for c in with_neighbours]
  per_prob = [np.mean([lp[index[(p, o)]] > lp[index[(p, c.request.target_new)]]
                       for p, o in c.neighbours]) for c in with_neighbours]
  for name, values in (("neighbourhood", per), ("neighbourhood_prob", per_prob)):
    scores[name] = 100.0 * float(np.mean(values)) if values else float("nan")
  _, top = score_targets(model, tokenize, list(facts))
  scores["unedited"] = 100.0 * float(np.mean(top)) if len(facts) else float("nan")
  return scores


def run_sequential(model, world: World, layout: LMLayout, layers: Sequence[int],
                   covariances: dict, contexts: Sequence[str], *, edits: int = 2000,
                   batch: int = 100, arms: Sequence[str] = ARMS, threshold: float = 1e-2,
                   l2: float = 10.0, key_weight: float = 1.0, edit_keys: str = "solve",
                   penalty: float = 15000.0, value_options: dict | None = None,
                   reserve: int = 500, unedited_facts: int = 2000,
                   preserve_facts: float = 0.0,
                   eval_at: Sequence[int] | None = None, seed: int = 0,
                   log: Callable[[str], None] | None = None) -> dict[str, Any]:
  """Sequential MEMIT on the demo world, with and without AlphaEdit's projection.

  ``edits`` facts (:func:`sequential_cases`) are written in batches of ``batch`` by
  :func:`memit_batch`; after a batch (at the edit counts ``eval_at``, default every
  batch) the model is scored on all edits so far (:func:`sequential_scores`) and on
  ``unedited_facts`` facts of the reserved subjects. Both arms edit the same facts in the
  same order, each from the unedited model.

  Args:
    model: the demo LM ``(module, variables)``.
    world: its world.
    layout: its :class:`LMLayout`.
    layers: the MEMIT blocks.
    covariances: ``{layer: C}``.
    contexts: context templates (:func:`memedit.lm.experiment.demo_contexts`).
    edits, batch: number of facts and facts per batch.
    arms: a subset of :data:`ARMS`.
    threshold, l2, key_weight, edit_keys: the projected arm's settings
      (:func:`memit_batch`).
    penalty: MEMIT's λ (the plain arm).
    value_options: the value search's options (MEMIT's defaults).
    reserve: subjects kept unedited (neighbours and unedited facts).
    unedited_facts: facts of the reserved subjects scored for the unedited accuracy.
    preserve_facts: ≥ 0, the weight in the projected arm's solve of the key of every fact
      of the world that the batch does not edit (:func:`fact_keys` of the unedited model,
      at the edit template; 0: none), beside the earlier edits' keys: the facts a user
      wants kept, as AlphaEdit keeps the keys of its preserved text.
    eval_at: edit counts after which to score (None: every batch).
    seed: seed of the cases and facts.
    log: callable(str) for progress lines.

  Returns:
    ``{"base": scores of the unedited model, "rows": [{"arm", "batch", "edits",
    scores..., "seconds", "eval_seconds"}], "null_dims": {layer: dim},
    "logs": {arm: EditLog}, "batches": {arm: [names per batch]}}`` (``seconds``: the
    batch's editing time; ``eval_seconds``: its scoring time).
  """
  from memedit.lm.evaluate import world_facts

  say = log or (lambda s: None)
  for arm in arms:
    check_choice(arm, ARMS, "arms")
  if batch < 1 or edits < 1:
    raise ValueError(f"edits, batch: expected positive integers, got {edits} and {batch}")
  if (isinstance(preserve_facts, bool) or not np.isscalar(preserve_facts)
      or not np.isfinite(preserve_facts) or preserve_facts < 0):
    raise ValueError(f"preserve_facts: expected a finite weight >= 0, got {preserve_facts!r}")
  _, params0 = split_model(model)
  cases, kept = sequential_cases(world, edits, reserve=reserve, seed=seed)
  kept_set = set(kept)
  facts = world_facts(world, unedited_facts, seed=seed + 11,
                      exclude=[s for i, s in enumerate(world.subjects) if i not in kept_set])
  t0 = time.perf_counter()
  base = sequential_scores(model, world.tokenize, cases, facts)
  base["unedited_drop"] = 0.0
  say(f"unedited model: {_fmt(base)} ({time.perf_counter() - t0:.1f} s)")
  kept_facts = None
  if preserve_facts and "projected" in arms:
    t0 = time.perf_counter()
    all_facts, fkeys = fact_keys(model, world, layout, layers, contexts)
    where = {(world.subjects[s], world.relations[r].train_templates[0]): i
             for i, (s, r) in enumerate(all_facts)}
    case_fact = np.asarray([where[(c.request.subject, c.request.prompt)] for c in cases])

    def kept_facts(start, stop):  # every fact's key but the batch's own
      keep = np.ones(len(all_facts), bool)
      keep[case_fact[start:stop]] = False
      w = np.full(int(keep.sum()), preserve_facts, np.float32)
      return {l: (k[keep], w) for l, k in fkeys.items()}

    say(f"keys of the world's {len(all_facts)} facts at blocks {list(fkeys)} "
        f"({time.perf_counter() - t0:.1f} s)")
  projectors = layer_projectors(covariances, layers, threshold=threshold)
  null_dims = {int(l): int(ns.dim) for l, ns in projectors.items()}
  say(f"null-space dimensions at threshold {threshold:g}: {null_dims}")
  starts = list(range(0, edits, batch))
  stops = [min(s + batch, edits) for s in starts]
  wanted = set(stops if eval_at is None else [int(e) for e in eval_at]) | {stops[-1]}
  rows, logs, names = [], {}, {}
  for arm in arms:
    elog, params, batches = log_init(), params0, []
    for b, (start, stop) in enumerate(zip(starts, stops)):
      t = time.perf_counter()
      res = memit_batch(with_params(model, params), layout, layers, world.tokenize,
                        [c.request for c in cases[start:stop]], covariances, elog,
                        project=arm == "projected", projectors=projectors,
                        threshold=threshold, l2=l2, key_weight=key_weight,
                        edit_keys=edit_keys, penalty=penalty, contexts=contexts,
                        value_options=value_options,
                        preserved=(kept_facts(start, stop) if kept_facts is not None
                                   and arm == "projected" else None))
      elog = res.log
      batches.append(res.names)
      params = log_apply(params0, elog)
      seconds = time.perf_counter() - t
      if stop not in wanted:
        say(f"{arm} {stop} edits: {seconds:.1f} s")
        continue
      t = time.perf_counter()
      scores = sequential_scores(with_params(model, params), world.tokenize, cases[:stop],
                                 facts)
      scores["unedited_drop"] = base["unedited"] - scores["unedited"]
      row = {"arm": arm, "batch": b + 1, "edits": stop, **scores, "seconds": seconds,
             "eval_seconds": time.perf_counter() - t, "load_average": os.getloadavg()[0]}
      rows.append(row)
      say(f"{arm} {stop} edits: {_fmt(scores)} ({seconds:.1f} s + "
          f"{row['eval_seconds']:.1f} s scoring)")
    logs[arm], names[arm] = elog, batches
  return {"base": base, "rows": rows, "null_dims": null_dims, "logs": logs,
          "batches": names}


def _fmt(scores: dict) -> str:
  return ", ".join(f"{k} {scores[k]:.1f}" for k in SCORES if k in scores)
