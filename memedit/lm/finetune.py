"""The fine-tuning baseline: Adam on one MLP projection's weight with the editors' targets.

The kernel K0 of the layer is replaced by K0 + ΔK and ΔK (initially 0) minimises the
mean negative log-likelihood of each request's new object after its prompt inside each
context template — the same targets ROME and MEMIT write — by
:func:`memedit.optim.adam_scan` (one compiled ``lax.scan``). Nothing constrains ΔK, so
this is the unconstrained "FT" baseline of the ROME paper. The result is a
:class:`memedit.Edit` whose factors are Λ = I (d, d) and D = ΔWᵀ… i.e. ΔW = ΔKᵀ of rank
at most d (apply, revert, save like any edit).
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

import memedit
from memedit.lm.hooks import as_path, get_leaf, replace_leaf, run_lm, split_model
from memedit.lm.keys import check_memory
from memedit.lm.prompts import Request, bucket, encode, prompt_rows
from memedit.optim import adam_scan

__all__ = ["FinetuneResult", "finetune_edit"]


class FinetuneResult(NamedTuple):
  """The fine-tuning edit and its loss curve.

  Attributes:
    edit: the :class:`memedit.Edit` (Λ = I, ΔW = D).
    losses: ``(steps,)`` the loss before each step.
  """

  edit: "memedit.Edit"
  losses: np.ndarray


@functools.partial(jax.jit, static_argnames=("definition", "weight_path", "steps"))
def _finetune(definition, params, ids, tpos, tgt, tmask, weight, learning_rate, *,
              weight_path, steps):
  kernel0 = get_leaf(params, weight_path)

  def loss_fn(delta):
    p = replace_leaf(params, weight_path, kernel0 + delta.astype(kernel0.dtype))
    logits, _ = run_lm(definition, p, ids)
    r = jnp.arange(ids.shape[0])[:, None]
    lp = jax.nn.log_softmax(logits[r, tpos].astype(jnp.float32), axis=-1)
    tok = jnp.take_along_axis(lp, tgt[..., None], axis=-1)[..., 0]
    row = -(tok * tmask).sum(-1) / jnp.maximum(tmask.sum(-1), 1.0)
    return jnp.sum(row * weight) / jnp.maximum(jnp.sum(weight), 1.0)

  delta, _, losses = adam_scan(loss_fn, jnp.zeros(kernel0.shape, jnp.float32), steps,
                               learning_rate)
  return delta, losses


def finetune_edit(model, address, tokenize: Callable[[str], Sequence[int]],
                  requests: Sequence[Request], *, contexts: Sequence[str] = ("{}",),
                  steps: int = 25, learning_rate: float = 5e-4) -> FinetuneResult:
  """Fine-tunes the projection at ``address`` on the requests (module docstring).

  Args:
    model: the LM, Linen ``(module, variables)`` or NNX ``(graphdef, state)``.
    address: the MLP projection whose kernel is trained.
    tokenize: text -> token ids.
    requests: the facts (prompt, subject, target_new).
    contexts: context templates around each prompt.
    steps: Adam steps (full batch). learning_rate: Adam's step size.

  Returns:
    :class:`FinetuneResult`.
  """
  if not requests:
    raise ValueError("requests: expected at least one request, got none")
  path = as_path(address)
  rows = [row for req in requests for row in prompt_rows(req, contexts, req.target_new)]
  batch = encode(tokenize, rows, row_multiple=bucket(len(rows), 1 << 30))
  view = check_memory(model, path, batch.ids[:1])
  definition, params = split_model(model)
  delta, losses = _finetune(definition, params, jnp.asarray(batch.ids),
                            jnp.asarray(batch.target_pos), jnp.asarray(batch.targets),
                            jnp.asarray(batch.target_mask), jnp.asarray(batch.weight),
                            jnp.float32(learning_rate), weight_path=tuple(view.weight_path),
                            steps=int(steps))
  dw = view.math_weight(delta).reshape(view.value_dim, view.key_dim)  # (d, key_dim)
  lam = jnp.eye(view.value_dim, dtype=jnp.float32)
  edit = memedit.make_edit(view.weight_path, lam, dw, kind=view.kind,
                           in_ndim=view.in_ndim, method="finetune",
                           settings={"layer": [str(p) for p in path], "steps": int(steps),
                                     "learning_rate": float(learning_rate),
                                     "requests": len(requests), "contexts": len(contexts)})
  return FinetuneResult(edit, np.asarray(losses))
