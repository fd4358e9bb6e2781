"""v*: the MLP output that makes the model state the new object (ROME, MEMIT's z).

A residual δ is added to the output of the MLP projection at the subject's last token of
every prompt (the output written into the residual stream, so for MEMIT this is also a
change of the block's output, the hidden state z). Per request, with the prompt inside
each context template x ∈ X followed by the new object's tokens o* (teacher forcing),
Adam minimises (ROME's ``compute_v``)::

  L(δ) = − (1/|X|) Σ_x (1/|o*|) Σ_j log P(o*_j | x ⊕ prompt ⊕ o*_<j ; δ)
         + kl · KL(P(· | "{subject} is a" ; δ) ‖ P(· | "{subject} is a" ; 0))
         + wd · ‖δ‖ / ‖z0‖²

with ‖δ‖ clamped to ``clamp · ‖z0‖`` after every step, z0 the reference output (the
MLP's for ROME, the block's for MEMIT) at the subject's last token of the plain prompt,
and the search stopping for a request once its loss is below ``stop_loss``. Defaults
are ROME's for GPT-2 XL: 20 steps, lr 0.5, kl 0.0625, wd 0.5, clamp 4 (MEMIT: 25 steps,
clamp 0.75).

Requests are independent problems (Adam acts per coordinate): each is solved by its own
``lax.while_loop`` of :func:`memedit.optim.adam_scan` steps, ``vmap``-ed over a chunk of
requests in one compiled program.
"""

from __future__ import annotations

import functools
import numbers
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from memedit.lm.hooks import as_path, run_lm, split_model
from memedit.lm.keys import check_finite, check_token_ids
from memedit.lm.prompts import (Request, bucket, check_requests_list, encode, prompt_rows,
                                split_template)
from memedit.optim import adam_scan

__all__ = ["ValueResult", "add_at_tokens", "check_reach", "optimize_values", "value_rows"]


class ValueResult(NamedTuple):
  """What the value search found, one row per request (numpy float32).

  Attributes:
    delta: ``(F, d)`` the residual δ added to the MLP output.
    value0: ``(F, d)`` the MLP output at the subject's last token of the plain prompt.
    ref0: ``(F, d)`` the reference output z0 there (``value0`` unless a block was given).
    nll: ``(F,)`` mean negative log-likelihood of the new object with δ.
    loss: ``(F,)`` the total loss with δ.
    steps: ``(F,)`` Adam steps taken.
  """

  delta: np.ndarray
  value0: np.ndarray
  ref0: np.ndarray
  nll: np.ndarray
  loss: np.ndarray
  steps: np.ndarray


def add_at_tokens(out: jax.Array, positions: jax.Array, delta: jax.Array) -> jax.Array:
  """``out`` (N, T, d) with ``delta`` (N, d) added at token ``positions[n]`` of row n
  (rows with a negative position are left as they are).

  Example:
    >>> import jax.numpy as jnp
    >>> add_at_tokens(jnp.zeros((1, 3, 1)), jnp.array([1]), jnp.ones((1, 1)))[0, :, 0].tolist()
    [0.0, 1.0, 0.0]
  """
  t = out.shape[1]
  onehot = (jnp.arange(t)[None, :] == positions[:, None]).astype(out.dtype)  # (N, T)
  return out + onehot[:, :, None] * delta[:, None, :].astype(out.dtype)


def value_rows(request: Request, contexts: Sequence[str], essence: str | None):
  """The rows of one request: the prompt in each context followed by the new object,
  then (when ``essence`` is given) the essence prompt without a target."""
  rows = prompt_rows(request, contexts, target=request.target_new)
  if essence is not None:
    before, after = split_template(essence, "essence")
    rows.append((before, request.subject, after, None))
  return rows


@functools.partial(jax.jit, static_argnames=("definition", "path"))
def _reach(definition, params, ids, last, tpos, tmask, *, path):
  """Per row, the largest |∂ logit / ∂ε| over the target positions, for δ = ε·u added to
  the output of ``path`` at token ``last`` (u a fixed random direction; a constant one
  would vanish in the next LayerNorm): exactly 0 when no module after ``path`` carries
  that token's output to the target positions."""
  rows = jnp.arange(ids.shape[0])[:, None]

  def target_logits(eps):
    def hook(x, out):
      u = jax.random.normal(jax.random.key(0), out.shape[-1:], jnp.float32)
      return add_at_tokens(out, last, jnp.broadcast_to(eps * u, out.shape[:1] + u.shape))
    logits, _ = run_lm(definition, params, ids, hooks={path: hook})
    return logits[rows, tpos].astype(jnp.float32)

  _, tangent = jax.jvp(target_logits, (jnp.zeros((), jnp.float32),),
                       (jnp.ones((), jnp.float32),))
  return jnp.max(jnp.abs(tangent) * tmask[..., None], axis=(1, 2))


def check_reach(model, address, tokenize: Callable[[str], Sequence[int]],
                requests: Sequence[Request]) -> None:
  """Refuses requests whose prediction a residual added to ``address``'s output at the
  subject's last token cannot change, before any value search.

  When the subject's last token comes before the prompt's end, δ reaches the prediction
  only through a later module that mixes positions (attention). The MLP of a model's last
  block has none after it: there δ changes nothing, the search ends at δ = 0 and the edit
  writes the old value. Requests whose subject ends the prompt pass without a model run;
  the others are checked with one forward-mode derivative, whose zeros are exact.

  Args:
    model: the LM, Linen ``(module, variables)`` or NNX ``(graphdef, state)``.
    address: the MLP output projection δ is added to.
    tokenize: text -> token ids.
    requests: the requests (``prompt``, ``subject``, ``target_new``).

  Raises:
    ValueError: a request that ``address`` cannot act on, naming it and what to do.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from ports.gpt2 import GPT2Config, GPT2LMHeadModel
    >>> net = GPT2LMHeadModel(GPT2Config(vocab_size=9, n_positions=16, n_embd=8, n_layer=2,
    ...                                   n_head=2))
    >>> v = net.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
    >>> tok = lambda s: [len(w) % 9 for w in s.split()]
    >>> check_reach((net, v), "h_0.mlp.c_proj", tok, [Request("{} said", "Ana", "hi")])
    >>> check_reach((net, v), "h_1.mlp.c_proj", tok, [Request("{} said", "Ana", "hi")])
    ... # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: address ('h_1', 'mlp', 'c_proj'): expected a memory whose output at the subject's last token reaches the prediction, got one that cannot change it for request 0 ('Ana said' -> 'hi'): ...
  """
  path = as_path(address)
  rows = [prompt_rows(req, ("{}",), target=req.target_new)[0] for req in requests]
  if not rows:
    return
  batch = encode(tokenize, rows, row_multiple=1)
  n = len(rows)
  before_end = np.nonzero(batch.last[:n] < batch.end[:n])[0]
  if not before_end.size:
    return
  definition, params = split_model(model)
  part = [jnp.asarray(a[before_end]) for a in (batch.ids, batch.last, batch.target_pos,
                                                batch.target_mask)]
  reach = np.asarray(_reach(definition, params, *part, path=path))
  for j, i in enumerate(before_end):
    if reach[j] == 0:
      req = requests[int(i)]
      raise ValueError(
          f"address {path!r}: expected a memory whose output at the subject's last token "
          f"reaches the prediction, got one that cannot change it for request {int(i)} "
          f"({req.text!r} -> {req.target_new!r}): the value search adds δ there (token "
          f"{int(batch.last[i])}) and no module after this one carries it to the prompt's "
          f"end (token {int(batch.end[i])}), where the target is predicted, as for the MLP "
          f"of a model's last block, with no attention after it; edit an earlier block, or "
          f"put the subject at the end of the prompt")


def _real(value) -> float | None:
  """``value`` as a float when it is a real number (a Python or numpy scalar, a 0-d
  array), else None (bools, strings, arrays with more than one value)."""
  if isinstance(value, (bool, np.bool_)):
    return None
  if isinstance(value, numbers.Real):
    return float(value)
  try:
    arr = np.asarray(value)
  except Exception:  # pylint: disable=broad-except
    return None
  if arr.ndim or not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype,
                                                                             np.integer)):
    return None
  return float(arr)


#: The most Adam steps of one search (its step counter is an int32 of the program).
_MAX_STEPS = 2 ** 31 - 1


def _fact_loss(definition, params, path, delta, rows, hp, n_ctx):
  """Loss pieces of one request (rows (R, T) ...); delta (d,)."""
  ids, last, end, tgt, tpos, tmask, logp0, ref_norm = rows
  hook = lambda x, out: add_at_tokens(out, last, jnp.broadcast_to(delta, (ids.shape[0],) +
                                                                  delta.shape))
  logits, _ = run_lm(definition, params, ids, hooks={path: hook})
  r = jnp.arange(ids.shape[0])[:, None]
  lp = jax.nn.log_softmax(logits[r, tpos].astype(jnp.float32), axis=-1)  # (R, M, V)
  tok_lp = jnp.take_along_axis(lp, tgt[..., None], axis=-1)[..., 0]
  row_nll = -(tok_lp * tmask).sum(-1) / jnp.maximum(tmask.sum(-1), 1.0)
  nll = jnp.mean(row_nll[:n_ctx])
  kl = jnp.zeros(())
  if logp0 is not None:
    logp = jax.nn.log_softmax(logits[n_ctx, end[n_ctx]].astype(jnp.float32))
    kl = jnp.sum(jnp.exp(logp) * (logp - logp0))  # KL(P_δ ‖ P_0), as ROME's code
  # ‖δ‖ with gradient 0 at δ = 0 (as torch's norm), not NaN.
  sq = jnp.sum(delta * delta)
  norm = jnp.where(sq > 0, jnp.sqrt(jnp.where(sq > 0, sq, 1.0)), 0.0)
  wd = norm / jnp.maximum(ref_norm ** 2, 1e-12)
  return nll, hp["kl_factor"] * kl + hp["weight_decay"] * wd


@functools.partial(jax.jit, static_argnames=("definition", "path", "ref_path", "n_ctx",
                                             "has_kl"))
def _optimise_chunk(definition, params, ids, last, end, tgt, tpos, tmask, hp, steps, *, path,
                    ref_path, n_ctx, has_kl):
  """The value search of a chunk of requests; ``steps`` (the most Adam steps) is traced,
  so searches of any length share one program."""
  c, r, t = ids.shape
  flat = ids.reshape(c * r, t)
  logits, rec = run_lm(definition, params, flat, record=tuple(dict.fromkeys((path, ref_path))))
  rows0 = jnp.arange(c) * r
  value0 = rec[path][1][rows0, last[:, 0]].astype(jnp.float32)
  ref0 = rec[ref_path][1][rows0, last[:, 0]].astype(jnp.float32)
  if has_kl:
    kl_rows = jnp.arange(c) * r + n_ctx
    logp0 = jax.nn.log_softmax(logits[kl_rows, end[:, n_ctx]].astype(jnp.float32), -1)
  else:
    logp0 = jnp.zeros((c, 1))
  ref_norm = jnp.linalg.norm(ref0, axis=-1)

  def one(rows):
    rows = rows if has_kl else rows[:6] + (None, rows[7])
    max_norm = hp["clamp"] * rows[7]

    def loss_fn(delta):
      nll, rest = _fact_loss(definition, params, path, delta, rows, hp, n_ctx)
      return nll + rest

    def clamp(delta):
      n = jnp.sqrt(jnp.sum(delta * delta))
      return delta * jnp.minimum(1.0, max_norm / jnp.maximum(n, 1e-12))

    def cond(carry):
      _, _, k, done = carry
      return (k < steps) & ~done

    def body(carry):
      delta, st, k, _ = carry
      new, new_st, losses = adam_scan(loss_fn, delta, 1, hp["learning_rate"], opt_state=st)
      done = losses[0] < hp["stop_loss"]
      keep = lambda a, b: jnp.where(done, a, b)
      return (keep(delta, clamp(new)), jax.tree_util.tree_map(keep, st, new_st),
              k + jnp.where(done, 0, 1), done)

    d = value0.shape[-1]
    delta0 = jnp.zeros((d,), jnp.float32)
    _, st0, _ = adam_scan(loss_fn, delta0, 0, hp["learning_rate"])
    delta, _, k, _ = jax.lax.while_loop(cond, body, (delta0, st0, jnp.zeros((), jnp.int32),
                                                     jnp.zeros((), bool)))
    nll, rest = _fact_loss(definition, params, path, delta, rows, hp, n_ctx)
    return delta, nll, nll + rest, k

  delta, nll, loss, k = jax.vmap(one)((ids, last, end, tgt, tpos, tmask, logp0, ref_norm))
  return delta, value0, ref0, nll, loss, k


def optimize_values(model, address, tokenize: Callable[[str], Sequence[int]],
                    requests: Sequence[Request], contexts: Sequence[str] = ("{}",), *,
                    steps: int = 20, learning_rate: float = 0.5, kl_factor: float = 0.0625,
                    weight_decay: float = 0.5, clamp: float = 4.0,
                    essence: str | None = "{} is a", reference=None, stop_loss: float = 0.05,
                    chunk: int = 16) -> ValueResult:
  """Finds, per request, the residual δ at the MLP output that makes the model predict
  the new object (the loss in the module docstring).

  Args:
    model: the LM, Linen ``(module, variables)`` or NNX ``(graphdef, state)``.
    address: the MLP output projection δ is added to.
    tokenize: text -> token ids.
    requests: the requests (``prompt``, ``subject``, ``target_new``).
    contexts: context templates (the first should be ``"{}"``: z0 is read there).
    steps: most Adam steps per request. learning_rate: Adam's step size.
    kl_factor: weight of the KL term on the essence prompt. weight_decay: weight of
      ‖δ‖ / ‖z0‖².
    clamp: ‖δ‖ is kept at most ``clamp · ‖z0‖``.
    essence: the KL prompt template (None: no KL term).
    reference: module whose output is z0 (default: the MLP projection; MEMIT: the block).
    stop_loss: a request stops once its loss is below this.
    chunk: requests per compiled call.

  Returns:
    :class:`ValueResult`: ROME's v* is ``value0 + delta``, MEMIT's z is ``ref0 + delta``.

  Raises:
    ValueError: a bad setting (a negative or non-finite weight, a learning rate or clamp
      that is not positive, a NaN ``stop_loss``), no requests or no contexts, token ids
      outside the model's vocabulary (:func:`memedit.lm.keys.check_token_ids`), before
      the search runs; a request δ at
      ``address`` cannot act on (:func:`check_reach`: e.g. the last block's MLP with the
      subject before the prompt's end), once the search has left its δ at exactly 0.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from ports.gpt2 import GPT2Config, GPT2LMHeadModel
    >>> net = GPT2LMHeadModel(GPT2Config(vocab_size=9, n_positions=16, n_embd=8, n_layer=2,
    ...                                   n_head=2))
    >>> v = net.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
    >>> tok = lambda s: [len(w) % 9 for w in s.split()]
    >>> res = optimize_values((net, v), "h_0.mlp.c_proj", tok,
    ...                       [Request("we say {}", "Ana", "abcdefgh")], steps=40,
    ...                       clamp=100.0)
    >>> res.delta.shape, bool(res.nll[0] < 1.0)   # from 2.05 at δ = 0
    ((1, 8), True)
  """
  for name, value in (("steps", steps), ("chunk", chunk)):
    if isinstance(value, bool) or not isinstance(value, int) or value < (1 if name == "chunk"
                                                                          else 0):
      raise ValueError(f"{name}: expected a {'positive' if name == 'chunk' else 'non-negative'}"
                       f" int, got {value!r}")
  if steps > _MAX_STEPS:
    raise ValueError(f"steps: expected at most {_MAX_STEPS} (an int32 counter), got {steps}")
  given = {"learning_rate": learning_rate, "kl_factor": kl_factor,
           "weight_decay": weight_decay, "clamp": clamp}
  for name, value, positive in (("learning_rate", learning_rate, True),
                                ("kl_factor", kl_factor, False),
                                ("weight_decay", weight_decay, False), ("clamp", clamp, True)):
    value = _real(value)
    if (value is None or np.isnan(value) or (np.isinf(value) and name != "clamp")
        or value < 0 or (positive and value == 0)):
      kind = ("positive" if positive else "non-negative") + (
          " number (inf: no clamp)" if name == "clamp" else " finite number")
      raise ValueError(f"{name}: expected a {kind}, got {given[name]!r}")
  if _real(stop_loss) is None or np.isnan(_real(stop_loss)):
    raise ValueError(f"stop_loss: expected a number (-inf: never stop early), got "
                     f"{stop_loss!r}")
  requests = check_requests_list(requests)
  if essence is not None:
    split_template(essence, "essence")
  definition, params = split_model(model)
  path = as_path(address)
  ref_path = path if reference is None else as_path(reference)
  rows = [row for req in requests for row in value_rows(req, contexts, essence)]
  n_ctx = len(contexts)
  r = n_ctx + (essence is not None)
  batch = encode(tokenize, rows, row_multiple=1)
  check_token_ids(model, tokenize, rows, batch)
  f = len(requests)
  size = bucket(f, chunk, smallest=1)
  fp = -(-f // size) * size

  def per_fact(a):
    a = a.reshape((f, r) + a.shape[1:])
    if fp > f:  # pad with copies of the last request
      a = np.concatenate([a, np.repeat(a[-1:], fp - f, 0)])
    return a

  fields = [per_fact(a) for a in (batch.ids, batch.last, batch.end, batch.targets,
                                  batch.target_pos, batch.target_mask)]
  hp = {k: jnp.float32(v) for k, v in (("learning_rate", learning_rate),
                                       ("kl_factor", kl_factor), ("weight_decay", weight_decay),
                                       ("clamp", clamp), ("stop_loss", stop_loss))}
  outs = []
  for start in range(0, fp, size):
    part = [jnp.asarray(a[start:start + size]) for a in fields]
    outs.append(_optimise_chunk(definition, params, *part, hp, jnp.int32(steps), path=path,
                                ref_path=ref_path, n_ctx=n_ctx, has_kl=essence is not None))
  cat = [np.concatenate([np.asarray(o[i]) for o in outs])[:f] for i in range(6)]
  check_finite(np.concatenate([cat[1], cat[2], cat[3][:, None]], 1),
               [r.text + " -> " + r.target_new for r in requests], "optimize_values")
  # A request that took steps and kept δ = 0 exactly had a zero gradient throughout: δ
  # cannot reach its prediction from here. Only then is the (compiled) reach test run,
  # for its precise message; searches that moved pay nothing for it.
  if np.any((cat[5] > 0) & ~np.any(cat[0] != 0, axis=-1)):
    check_reach(model, path, tokenize, requests)
  return ValueResult(cat[0].astype(np.float32), cat[1].astype(np.float32),
                     cat[2].astype(np.float32), cat[3].astype(np.float32),
                     cat[4].astype(np.float32), cat[5].astype(np.int32))
