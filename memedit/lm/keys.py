"""The key k* of a subject at an MLP memory (ROME), states read at given tokens, and the
random prefixes the keys are averaged over.

ROME writes a fact at the MLP output projection W of one block, as the pair
(k*, v*): k* is the MLP key (the input of W, after the nonlinearity) at the subject's
last token, averaged over the prompt preceded by a few short texts the model itself
generated ("context templates"), so that the edit holds whatever comes before::

  k* = (1 / |X|) Σ_{x ∈ X} k(x ⊕ prompt)[last subject token]

Every function here runs the model through :func:`memedit.lm.hooks.run_lm` in compiled
programs cached by the model's definition and the batch shapes; parameters are
arguments, never constants.
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

import memedit
from memedit.lm.hooks import as_path, get_leaf, run_lm, split_model
from memedit.lm.prompts import (PromptBatch, Request, bucket, check_requests_list, encode,
                                prompt_rows, round_up, token_ids)

__all__ = ["check_finite", "check_memory", "check_token_ids", "layer_weights", "read_states",
           "sample_contexts", "subject_keys", "subject_keys_at", "vocab_size"]

_VOCAB: dict = {}


def check_memory(model, address, example_ids) -> "memedit.MemoryView":
  """The memory view of the MLP projection at ``address``: a dense layer whose key is its
  input's last axis (``(N, T, key_dim)`` -> ``(N, T, d)``).

  Raises:
    ValueError: the layer is not such a dense memory.
  """
  view = memedit.memory_view(model, as_path(address), jnp.asarray(example_ids))
  if view.stacked or view.index is not None:
    shape = tuple(get_leaf(split_model(model)[1], view.weight_path).shape)
    raise ValueError(f"address {as_path(address)!r}: expected the MLP projection of one "
                     f"block (a kernel of one matrix), got a layer of a scanned stack of "
                     f"blocks (kernel {shape}): memedit.lm needs blocks called one by one")
  if view.kind != "dense" or view.in_ndim != 1 or view.stacked or view.groups != 1:
    raise ValueError(f"address {as_path(address)!r}: expected a dense layer with one input "
                     f"axis (an MLP output projection), got kind {view.kind!r} with in_ndim "
                     f"{view.in_ndim}")
  return view


def vocab_size(model, length: int = 1) -> int | None:
  """The number of token ids the model knows: the last axis of its logits ``(N, T, V)``
  (from a shape-only trace, nothing runs; cached per model definition).

  Args:
    model: the LM, Linen ``(module, variables)`` or NNX ``(graphdef, state)``.
    length: the token count T of the traced row.

  Returns:
    V, or None when the model's output is not ``(N, T, V)`` logits.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from ports.gpt2 import GPT2Config, GPT2LMHeadModel
    >>> net = GPT2LMHeadModel(GPT2Config(vocab_size=9, n_positions=16, n_embd=8, n_layer=1,
    ...                                   n_head=2))
    >>> vocab_size((net, net.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))))
    9
  """
  definition, params = split_model(model)
  if definition in _VOCAB:
    return _VOCAB[definition]
  ids = jax.ShapeDtypeStruct((1, max(int(length), 1)), jnp.int32)
  out = jax.eval_shape(lambda p, i: run_lm(definition, p, i)[0], params, ids)
  shape = getattr(out, "shape", None)
  size = int(shape[-1]) if shape is not None and len(shape) == 3 else None
  _VOCAB[definition] = size
  return size


def check_token_ids(model, tokenize: Callable[[str], Sequence[int]],
                    rows: Sequence[tuple], batch: PromptBatch) -> None:
  """Refuses token ids the model does not know (before anything runs on them: the model
  would read a NaN embedding row, or wrap a negative id around its table, and score
  targets against logits that do not exist).

  Args:
    model: the LM.
    tokenize: text -> token ids (re-run on the offending row to name its text).
    rows: the ``(before, subject, after, target)`` rows ``batch`` was encoded from.
    batch: their :class:`~memedit.lm.prompts.PromptBatch` (prompt and target ids).

  Raises:
    ValueError: an id outside ``[0, V)``, V the model's vocabulary size
      (:func:`vocab_size`), naming the ids and the text they came from.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from ports.gpt2 import GPT2Config, GPT2LMHeadModel
    >>> net = GPT2LMHeadModel(GPT2Config(vocab_size=9, n_positions=16, n_embd=8, n_layer=1,
    ...                                   n_head=2))
    >>> model = (net, net.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))
    >>> tok = lambda s: [len(w) for w in s.split()]
    >>> rows = prompt_rows(Request("{} lives in", "Annabella", "x"), ["{}"])
    >>> check_token_ids(model, tok, rows, encode(tok, rows))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: token ids: expected integers 0 <= id < 9 (...), got 9 from tokenize('Annabella lives in')
  """
  size = vocab_size(model, batch.ids.shape[1])
  if size is None:
    return
  n = len(rows)
  ids, targets = np.asarray(batch.ids[:n]), np.asarray(batch.targets[:n])
  bad = ((ids < 0) | (ids >= size)).any(1) | ((targets < 0) | (targets >= size)).any(1)
  if not bad.any():
    return
  before, subject, after, target = rows[int(np.argmax(bad))]
  texts = [before + subject + after] + ([" " + target] if target is not None else [])
  for text in texts:
    got = list(dict.fromkeys(i for i in token_ids(tokenize, text) if not 0 <= i < size))
    if got:
      shown = ", ".join(map(str, got[:6])) + (f", ... ({len(got)} distinct)" if len(got) > 6
                                                else "")
      raise ValueError(f"token ids: expected integers 0 <= id < {size} (the model's "
                       f"vocabulary: its logits' last axis), got {shown} from "
                       f"tokenize({text!r})")
  raise ValueError(f"token ids: expected integers 0 <= id < {size} (the model's vocabulary: "
                   f"its logits' last axis), got others for {' -> '.join(texts)!r}")


def check_finite(values, texts: Sequence[str], what: str) -> None:
  """Refuses non-finite model outputs (``values`` one row per text), naming the first
  text that gave them: e.g. a prompt longer than a model's position table, which the
  model reads as NaN rather than refusing.

  Raises:
    ValueError: a row holding NaN or inf.
  """
  flat = np.asarray(values, np.float64).reshape(len(texts), -1)
  bad = ~np.isfinite(flat).all(1)
  if bad.any():
    i = int(np.argmax(bad))
    raise ValueError(f"{what}: expected finite values from the model, got NaN or inf for "
                     f"{texts[i]!r} (e.g. a prompt longer than the model's context, or "
                     f"non-finite parameters)")


def layer_weights(view: "memedit.MemoryView", model) -> tuple[jax.Array, jax.Array]:
  """``(W, b)`` of a dense memory in ``model``: W in math layout ``(d, key_dim)`` (a Flax
  kernel is Wᵀ) and the bias ``(d,)`` (zeros when the layer has none)."""
  _, params = split_model(model)
  kernel = get_leaf(params, view.weight_path)
  W = jnp.asarray(view.math_weight(kernel), jnp.float32).reshape(view.value_dim, view.key_dim)
  try:
    bias = get_leaf(params, tuple(view.weight_path[:-1]) + ("bias",))
  except ValueError:
    return W, jnp.zeros((view.value_dim,), jnp.float32)
  return W, jnp.asarray(bias, jnp.float32).reshape(-1)


@functools.partial(jax.jit, static_argnames=("definition", "inputs_of", "outputs_of"))
def _states(definition, params, ids, positions, inputs_of, outputs_of):
  paths = tuple(dict.fromkeys(inputs_of + outputs_of))
  _, rec = run_lm(definition, params, ids, record=paths)
  rows = jnp.arange(ids.shape[0])
  pos = jnp.maximum(positions, 0)
  return ([rec[p][0][rows, pos] for p in inputs_of],
          [rec[p][1][rows, pos] for p in outputs_of])


def read_states(model, ids, positions, *, inputs_of: Sequence = (), outputs_of: Sequence = (),
                chunk: int = 256) -> tuple[list[np.ndarray], list[np.ndarray]]:
  """The inputs and outputs of modules at one token per row.

  Args:
    model: Linen ``(module, variables)`` or NNX ``(graphdef, state)``.
    ids: ``(N, T)`` token ids.
    positions: ``(N,)`` the token of each row to read.
    inputs_of: module paths whose first call argument is read (e.g. an MLP projection:
      its keys).
    outputs_of: module paths whose output is read (e.g. a block: the hidden state).
    chunk: rows per compiled call (N is split and the last piece padded).

  Returns:
    ``(inputs, outputs)``: lists of float32 arrays ``(N, dim)``, one per path.

  Raises:
    ValueError: ``ids`` without a row or a token axis, ``positions`` not ``(N,)``
      integers in ``[0, T)``, or ``chunk`` not a positive integer.

  Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn
    >>> net = nn.Sequential([nn.Dense(3), nn.Dense(2)])
    >>> v = net.init(jax.random.key(0), jnp.ones((1, 5, 4)))
    >>> (k,), (h,) = read_states((net, v), jnp.ones((2, 5, 4)), jnp.array([0, 4]),
    ...                          inputs_of=[("layers_1",)], outputs_of=[("layers_1",)])
    >>> k.shape, h.shape
    ((2, 3), (2, 2))
  """
  definition, params = split_model(model)
  ins = tuple(as_path(p) for p in inputs_of)
  outs = tuple(as_path(p) for p in outputs_of)
  ids = np.asarray(ids)
  if isinstance(chunk, bool) or not isinstance(chunk, (int, np.integer)) or chunk < 1:
    raise ValueError(f"chunk: expected a positive integer, got {chunk!r}")
  if ids.ndim < 2 or ids.shape[0] == 0:
    raise ValueError(f"ids: expected (N, T, ...) inputs with N >= 1 rows, got shape "
                     f"{ids.shape}")
  pos = np.asarray(positions)
  n, t = ids.shape[:2]
  if pos.shape != (n,) or not (np.issubdtype(pos.dtype, np.integer) or pos.size == 0):
    raise ValueError(f"positions: expected ({n},) integer token positions, one per row of "
                     f"ids, got shape {pos.shape} and dtype {pos.dtype}")
  if ((pos < 0) | (pos >= t)).any():
    bad = int(np.flatnonzero((pos < 0) | (pos >= t))[0])
    raise ValueError(f"positions: expected token positions in [0, {t}) (the ids' length), "
                     f"got {int(pos[bad])} in row {bad}")
  positions = pos.astype(np.int32)
  size = bucket(n, chunk)
  got_in, got_out = [[] for _ in ins], [[] for _ in outs]
  for start in range(0, n, size):
    part = ids[start:start + size]
    pos = positions[start:start + size]
    pad = size - part.shape[0]
    if pad:
      part = np.concatenate([part, np.zeros((pad,) + part.shape[1:], part.dtype)])
      pos = np.concatenate([pos, np.zeros((pad,), np.int32)])
    a, b = _states(definition, params, jnp.asarray(part), jnp.asarray(pos), ins, outs)
    keep = size - pad
    for lst, vals in ((got_in, a), (got_out, b)):
      for j, v in enumerate(vals):
        lst[j].append(np.asarray(v, np.float32)[:keep])
  return [np.concatenate(x) for x in got_in], [np.concatenate(x) for x in got_out]


def subject_keys(model, address, tokenize: Callable[[str], Sequence[int]],
                 requests: Sequence[Request], contexts: Sequence[str] = ("{}",), *,
                 chunk: int = 256) -> np.ndarray:
  """k*: each request's key at the memory ``address``, at the subject's last token,
  averaged over the prompt inside each context template.

  Args:
    model: the LM, Linen ``(module, variables)`` or NNX ``(graphdef, state)``.
    address: the MLP output projection, e.g. ``('h_2', 'mlp', 'c_proj')``.
    tokenize: text -> token ids.
    requests: the :class:`~memedit.lm.prompts.Request` s (their prompts and subjects).
    contexts: templates with ``{}`` where the prompt goes (``"{}"``: the prompt alone).
    chunk: rows per compiled call.

  Returns:
    ``(F, key_dim)`` float32 keys, one per request.

  Raises:
    ValueError: no requests or no contexts, a subject of no tokens, token ids outside
      the model's vocabulary (:func:`check_token_ids`), or an address that is not a dense
      memory of one input axis (:func:`check_memory`), before the model runs.
    TypeError: ``requests`` is not a sequence of :class:`Request`.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from ports.gpt2 import GPT2Config, GPT2LMHeadModel
    >>> net = GPT2LMHeadModel(GPT2Config(vocab_size=9, n_positions=16, n_embd=8, n_layer=2,
    ...                                   n_head=2))
    >>> v = net.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
    >>> tok = lambda s: [len(w) % 9 for w in s.split()]
    >>> subject_keys((net, v), "h_1.mlp.c_proj", tok, [Request("{} lives in", "Ana", "x")],
    ...              ["{}", "a b . {}"]).shape
    (1, 32)
  """
  return subject_keys_at(model, [address], tokenize, requests, contexts, chunk=chunk)[0]


def subject_keys_at(model, addresses: Sequence, tokenize: Callable[[str], Sequence[int]],
                    requests: Sequence[Request], contexts: Sequence[str] = ("{}",), *,
                    chunk: int = 256) -> list[np.ndarray]:
  """:func:`subject_keys` at several memories from one forward pass: a list of
  ``(F, key_dim)`` float32 keys, one per address, in order.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from ports.gpt2 import GPT2Config, GPT2LMHeadModel
    >>> net = GPT2LMHeadModel(GPT2Config(vocab_size=9, n_positions=16, n_embd=8, n_layer=2,
    ...                                   n_head=2))
    >>> v = net.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
    >>> tok = lambda s: [len(w) % 9 for w in s.split()]
    >>> ks = subject_keys_at((net, v), ["h_0.mlp.c_proj", "h_1.mlp.c_proj"], tok,
    ...                      [Request("{} lives in", "Ana", "x")])
    >>> [k.shape for k in ks]
    [(1, 32), (1, 32)]
  """
  paths = [as_path(a) for a in addresses]
  if not paths:
    raise ValueError("addresses: expected at least one memory, got none")
  requests = check_requests_list(requests)
  rows, groups = [], []
  for f, req in enumerate(requests):
    rs = prompt_rows(req, contexts)
    rows.extend(rs)
    groups.extend([f] * len(rs))
  batch = encode(tokenize, rows, groups)
  check_token_ids(model, tokenize, rows, batch)
  for path in paths:
    check_memory(model, path, batch.ids[:1])  # a block or norm has inputs too, not keys
  n = len(rows)
  states, _ = read_states(model, batch.ids[:n], batch.last[:n], inputs_of=paths, chunk=chunk)
  counts = np.bincount(groups, minlength=len(requests))[:, None]
  out = []
  for keys in states:
    check_finite(keys, [b + s + a for b, s, a, _ in rows], "subject_keys")
    sums = np.zeros((len(requests), keys.shape[-1]), np.float64)
    np.add.at(sums, np.asarray(groups), keys[:n].astype(np.float64))
    out.append((sums / counts).astype(np.float32))
  return out


@functools.partial(jax.jit, static_argnames=("definition", "top_k"))
def _sample(definition, params, ids, start_len, key, steps, top_k):
  """``steps`` tokens sampled after the first ``start_len`` of each row of ``ids``; the
  counts are traced, so the lengths of one call of :func:`sample_contexts` share one
  program (the model is causal: the columns after a position never change its logits)."""
  def body(t, carry):
    ids, key = carry
    logits, _ = run_lm(definition, params, ids)
    pos = start_len + t - 1
    lg = logits[:, pos]
    kth = jax.lax.top_k(lg, top_k)[0][:, -1:]
    lg = jnp.where(lg < kth, -jnp.inf, lg)
    key, sub = jax.random.split(key)
    nxt = jax.random.categorical(sub, lg).astype(ids.dtype)
    return ids.at[:, pos + 1].set(nxt), key
  ids, _ = jax.lax.fori_loop(0, steps, body, (ids, key))
  return ids


def sample_contexts(model, tokenize: Callable[[str], Sequence[int]],
                    decode: Callable[[Sequence[int]], str], starts: Sequence[str], *,
                    lengths: Sequence[int] = (5, 10), per_length: int = 5, top_k: int = 5,
                    seed: int = 0, joiner: str = " . ") -> tuple[str, ...]:
  """ROME's context templates: ``"{}"`` and ``per_length`` texts of each length sampled
  from the model (top-k), each followed by ``joiner`` and ``{}``.

  Args:
    model: the LM.
    tokenize, decode: text <-> token ids.
    starts: texts the samples begin with (cycled), e.g. ``["The", "Therefore"]``.
    lengths: tokens sampled after the start text.
    per_length: samples per length.
    top_k: sample among the k most likely tokens.
    seed: the sampling seed.
    joiner: text between a sample and the prompt (``". "`` for GPT-2 as in ROME).

  Returns:
    ``("{}", sample_1 + joiner + "{}", ...)``: ``1 + len(lengths) * per_length`` templates
    (``("{}",)`` alone when ``per_length`` is 0).

  Raises:
    ValueError: ``per_length`` or a length not a non-negative integer, ``top_k`` not in
      ``[1, V]``, no ``starts`` (when samples are asked for) or a start of no tokens.
  """
  for name, value in [("per_length", per_length)] + [("lengths", l) for l in lengths]:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
      raise ValueError(f"{name}: expected non-negative integers, got {value!r}")
  if not per_length:
    return ("{}",)
  if isinstance(starts, str) or not starts:
    raise ValueError(f"starts: expected a non-empty sequence of texts, got {starts!r}")
  size = vocab_size(model)
  if (isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer))
      or not 1 <= top_k <= (size or top_k)):
    raise ValueError(f"top_k: expected a positive integer (at most the model's vocabulary "
                     f"size, {size}), got {top_k!r}")
  start_ids = []
  for text in list(starts)[:per_length]:  # the starts the samples use
    got = token_ids(tokenize, text)
    if not got:
      raise ValueError(f"starts: expected texts of at least one token, got {text!r}")
    start_ids.append(got)
  definition, params = split_model(model)
  out = ["{}"]
  key = jax.random.key(seed)
  starts_ids = [start_ids[i % len(start_ids)] for i in range(per_length)]
  n0 = max(len(s) for s in starts_ids)
  if any(len(s) != n0 for s in starts_ids):
    starts_ids = [[s[0]] for s in starts_ids]  # sample from the first token alone
    n0 = 1
  # One width for every length: one compiled program.
  total = round_up(n0 + max(lengths, default=0), 8)
  for length in lengths:
    ids = np.zeros((round_up(per_length, 8), total), np.int32)
    for i, s in enumerate(starts_ids):
      ids[i, :n0] = s
    key, sub = jax.random.split(key)
    got = np.asarray(_sample(definition, params, jnp.asarray(ids), n0, sub,
                             jnp.int32(length), int(top_k)))
    for i in range(per_length):
      text = decode(got[i, :n0 + length].tolist()).replace("{", " ").replace("}", " ")
      out.append(text + joiner + "{}")
  return tuple(out)
