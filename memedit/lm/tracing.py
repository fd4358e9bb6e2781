"""Causal tracing (ROME): where in the network a fact is recalled.

Three runs on a prompt that ends where the object should follow:

- clean: the model as it is; the hidden states h_l[t] (block l's output at token t)
  are recorded;
- corrupted: Gaussian noise (std ``noise``) added to the token embeddings of the
  subject, ``samples`` times;
- restored: the corrupted run with one state h_l[t] set back to its clean value, for
  every block l and token t.

The score of (l, t) is the probability of the object in the restored run (averaged over
the noise samples): high where the state carries the fact. ``kind='mlp'`` restores the
MLP output instead of the block output. Every run of a prompt is one batch in one
compiled program. :func:`trace_png` draws the (token x layer) map; :func:`trace_summary`
averages several prompts over ROME's token categories (first / middle / last subject
token, first subsequent token, further tokens, last token).
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from memedit.lm.hooks import LMLayout, run_lm, split_model
from memedit.lm.keys import check_finite, check_token_ids
from memedit.lm.prompts import (continuation_ids, encode, round_up, split_template, subject_span,
                                token_ids)

__all__ = ["CATEGORIES", "TraceResult", "causal_trace", "trace_png", "trace_summary"]

#: ROME's token categories of the averaged trace.
CATEGORIES = ("first subject token", "middle subject tokens", "last subject token",
              "first subsequent token", "further tokens", "last token")


class TraceResult(NamedTuple):
  """The causal trace of one prompt.

  Attributes:
    scores: ``(T, L)`` probability of the target with state (token t, layer l) restored.
    clean: probability of the target in the clean run.
    corrupted: its probability with the subject corrupted and nothing restored.
    tokens: the prompt's tokens as text (``T``).
    subject: ``(first, last)`` token positions of the subject.
    target: the target token's text.
    kind: 'hidden' or 'mlp'.
  """

  scores: np.ndarray
  clean: float
  corrupted: float
  tokens: tuple
  subject: tuple
  target: str
  kind: str


@functools.partial(jax.jit, static_argnames=("definition", "embed", "sites", "samples"))
def _trace(definition, params, ids, first, last, end, target, noise, key, *, embed, sites,
           samples):
  n_layers = len(sites)
  t = ids.shape[1]
  _, rec = run_lm(definition, params, ids, record=sites + (embed,))
  clean_h = [rec[s][1][0] for s in sites]  # L x (T, d_l)
  logits, _ = run_lm(definition, params, ids)
  clean_p = jax.nn.softmax(logits[0, end].astype(jnp.float32))[target]
  # Rows: (layer, token) pairs (layer -1: nothing restored), each `samples` times.
  pairs_l = jnp.concatenate([jnp.full((1,), -1), jnp.repeat(jnp.arange(n_layers), t)])
  pairs_t = jnp.concatenate([jnp.full((1,), -1), jnp.tile(jnp.arange(t), n_layers)])
  row_l = jnp.repeat(pairs_l, samples)
  row_t = jnp.repeat(pairs_t, samples)
  rows = row_l.shape[0]
  d = rec[embed][1].shape[-1]  # the embedding's width (that of the blocks may differ)
  eps = jax.random.normal(key, (samples, t, d)) * noise
  pos = jnp.arange(t)
  in_subject = ((pos >= first) & (pos <= last)).astype(jnp.float32)[None, :, None]
  eps = jnp.tile(eps * in_subject, (rows // samples, 1, 1))
  batch = jnp.broadcast_to(ids, (rows, t))

  def corrupt(x, out):
    return out + eps.astype(out.dtype)

  def restorer(l):
    def hook(x, out):
      here = (row_l == l)[:, None] & (pos[None, :] == row_t[:, None])
      return jnp.where(here[..., None], clean_h[l][None].astype(out.dtype), out)
    return hook

  hooks = {embed: corrupt, **{s: restorer(l) for l, s in enumerate(sites)}}
  logits, _ = run_lm(definition, params, batch, hooks=hooks)
  p = jax.nn.softmax(logits[:, end].astype(jnp.float32), axis=-1)[:, target]
  p = p.reshape(-1, samples).mean(-1)
  return clean_p, p[0], p[1:].reshape(n_layers, t)


def causal_trace(model, layout: LMLayout, tokenize: Callable[[str], Sequence[int]],
                 prompt: str, subject: str, *, target: str | None = None,
                 decode: Callable[[Sequence[int]], str] | None = None, noise: float | None = None,
                 samples: int = 10, kind: str = "hidden", seed: int = 0) -> TraceResult:
  """The causal trace of ``prompt`` (a template with ``{}``) about ``subject``.

  Args:
    model: the LM, Linen ``(module, variables)`` or NNX ``(graphdef, state)``.
    layout: the model's :class:`LMLayout` with ``embed`` and (``kind='hidden'``) ``blocks``.
    tokenize: text -> token ids. decode: token ids -> text (labels; default: ids).
    prompt: template with one ``{}`` for the subject.
    subject: the subject's text.
    target: the object (its first token is traced); default: the clean run's top-1.
    noise: std of the embedding noise; default 3 x the std of the subject tokens'
      clean embeddings (ROME uses 3 x the std over many subjects).
    samples: noise samples per state (a positive integer).
    kind: 'hidden' (block outputs) or 'mlp' (MLP outputs).
    seed: the noise seed.

  Returns:
    :class:`TraceResult`.

  Raises:
    ValueError: a bad setting; a prompt that is not a template with one ``{}``; a subject
      or target of no tokens; token ids outside the model's vocabulary
      (:func:`memedit.lm.keys.check_token_ids`).
  """
  if kind not in ("hidden", "mlp"):
    raise ValueError(f"kind: expected 'hidden' or 'mlp', got {kind!r}")
  layout.require("embed", "causal_trace")
  if kind == "hidden":
    layout.require("blocks", "causal_trace")
  before, after = split_template(prompt)
  if not isinstance(subject, str) or not subject.strip():
    raise ValueError(f"subject: expected a non-empty string, got {subject!r}")
  if isinstance(samples, bool) or not isinstance(samples, (int, np.integer)) or samples < 1:
    raise ValueError(f"samples: expected a positive integer, got {samples!r}")
  if noise is not None and not (np.isfinite(noise) and noise > 0):
    raise ValueError(f"noise: expected a finite positive standard deviation, got {noise!r}")
  if target is not None and (not isinstance(target, str) or not target.strip()):
    raise ValueError(f"target: expected an object with at least one token, got {target!r}")
  definition, params = split_model(model)
  text = before + subject + after
  ids = token_ids(tokenize, text)
  first, last = subject_span(tokenize, before, subject, "subject")
  rows = [(before, subject, after, target)]
  check_token_ids(model, tokenize, rows, encode(tokenize, rows))
  t = round_up(len(ids), 8)
  arr = np.zeros((1, t), np.int32)
  arr[0, :len(ids)] = ids
  end = len(ids) - 1
  sites = layout.blocks if kind == "hidden" else layout.memories
  _check_states(definition, params, arr, sites, layout.embed, kind)
  if target is None:
    logits, _ = run_lm(definition, params, jnp.asarray(arr))
    tid = int(jnp.argmax(logits[0, end]))
  else:
    t = continuation_ids(tokenize, " " + target)
    if not t:
      raise ValueError(f"target: expected text of at least one token, got {target!r}")
    tid = t[0]
  if noise is None:
    _, rec = run_lm(definition, params, jnp.asarray(arr), record=[layout.embed])
    emb = np.asarray(rec[layout.embed][1][0, first:last + 1], np.float64)
    noise = 3.0 * float(emb.std())
  clean, corrupted, scores = _trace(
      definition, params, jnp.asarray(arr), first, last, end, tid, jnp.float32(noise),
      jax.random.key(seed), embed=layout.embed, sites=tuple(sites), samples=int(samples))
  check_finite(np.asarray([clean, corrupted]), [text], "causal_trace")
  label = decode or (lambda xs: " ".join(str(x) for x in xs))
  tokens = tuple(label([i]) for i in ids)
  return TraceResult(np.asarray(scores, np.float64)[:, :len(ids)].T.copy(), float(clean),
                     float(corrupted), tokens, (first, last), label([tid]), kind)


def _check_states(definition, params, ids, sites, embed, kind) -> None:
  """Refuses sites or an embedding whose outputs are not ``(1, T, width)`` arrays (a
  shape-only trace: nothing runs)."""
  spec = jax.ShapeDtypeStruct(ids.shape, jnp.int32)
  rec = jax.eval_shape(lambda p, i: run_lm(definition, p, i, record=tuple(sites) + (embed,))[1],
                       params, spec)
  for name, paths in (("embed", [embed]), ("blocks" if kind == "hidden" else "memories", sites)):
    for path in paths:
      shape = getattr(rec[path][1], "shape", None)
      if shape is None or len(shape) != 3 or tuple(shape[:2]) != ids.shape:
        got = (f"shape {tuple(shape)}" if shape is not None
               else type(rec[path][1]).__name__)
        raise ValueError(f"layout.{name}: expected modules whose output is (N, T, width) "
                         f"{ids.shape + ('width',)} for ids {ids.shape}, got {got} from "
                         f"{path!r}")


def trace_summary(results: Sequence[TraceResult]) -> np.ndarray:
  """``(6, L)`` mean scores over ROME's :data:`CATEGORIES` of tokens (NaN where no
  prompt has such a token)."""
  if not results:
    raise ValueError("results: expected at least one trace")
  n_layers = results[0].scores.shape[1]
  sums = np.zeros((len(CATEGORIES), n_layers))
  counts = np.zeros((len(CATEGORIES), 1))
  for r in results:
    first, last = r.subject
    t = r.scores.shape[0]
    for i in range(t):
      if i == first:
        c = 0
      elif first < i < last:
        c = 1
      elif i == last:
        c = 2
      elif i == t - 1:
        c = 5
      elif i == last + 1:
        c = 3
      elif i > last + 1:
        c = 4
      else:
        continue  # tokens before the subject
      if i == last and i == first:
        c = 2
      sums[c] += r.scores[i]
      counts[c] += 1
  with np.errstate(invalid="ignore"):
    return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def trace_png(scores: np.ndarray, labels: Sequence[str], path, *, title: str = "",
              kind: str = "hidden", marked: Sequence[int] = ()) -> str:
  """Draws a (rows x layers) score map as a PNG heat map (pillow).

  Args:
    scores: ``(rows, L)`` values in [0, 1] (NaN cells are grey).
    labels: one label per row (e.g. the tokens, or :data:`CATEGORIES`).
    path: the PNG file to write.
    title: a line above the map.
    kind: 'hidden' (purple) or 'mlp' (green).
    marked: rows whose label gets a ``*`` (e.g. the subject's tokens).

  Returns:
    ``path``.
  """
  from PIL import Image, ImageDraw

  scores = np.asarray(scores, np.float64)
  rows, cols = scores.shape
  cw, ch = 34, 20
  labels = [("*" if i in set(marked) else "") + str(s) for i, s in enumerate(labels)]
  lw = 8 + 6 * max(len(s) for s in labels)
  top = 22 if title else 6
  width, height = lw + cols * cw + 60, top + rows * ch + 26
  img = Image.new("RGB", (width, height), "white")
  draw = ImageDraw.Draw(img)
  hi = np.array((84, 39, 143) if kind == "hidden" else (0, 109, 44), np.float64)
  lo = np.array((252, 251, 253) if kind == "hidden" else (247, 252, 245), np.float64)
  vmax = np.nanmax(scores) if np.any(np.isfinite(scores)) else 1.0
  vmin = np.nanmin(scores) if np.any(np.isfinite(scores)) else 0.0
  span = max(vmax - vmin, 1e-9)
  if title:
    draw.text((4, 4), title, fill="black")
  for i in range(rows):
    draw.text((4, top + i * ch + 4), labels[i], fill="black")
    for j in range(cols):
      v = scores[i, j]
      color = (200, 200, 200) if not np.isfinite(v) else tuple(
          int(c) for c in lo + (hi - lo) * (v - vmin) / span)
      x0, y0 = lw + j * cw, top + i * ch
      draw.rectangle([x0, y0, x0 + cw - 1, y0 + ch - 1], fill=color)
  for j in range(cols):
    draw.text((lw + j * cw + cw // 2 - 3, top + rows * ch + 4), str(j), fill="black")
  x = lw + cols * cw + 8
  draw.text((x, top), f"{vmax:.2f}", fill="black")
  draw.text((x, top + rows * ch - 12), f"{vmin:.2f}", fill="black")
  import io

  from memedit import _io

  buf = io.BytesIO()
  img.save(buf, format="PNG")
  _io.atomic_write_bytes(path, buf.getvalue())  # an old image stays whole until replaced
  return str(path)
