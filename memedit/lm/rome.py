"""ROME (Meng et al., 2022): one fact as a rank-one insert into one MLP memory.

With W0 the MLP output projection (math layout ``(d, key_dim)``, a Flax Dense kernel is
W0ᵀ), C = E[k kᵀ] its key statistics, k* the subject's key (:mod:`memedit.lm.keys`) and
δ the residual the value search found (:mod:`memedit.lm.values`), the new fact is the
pair (k*, v*) with v* = W0 k* + δ (in the layer's output, W0 k* + b + δ), and::

  W1 = W0 + Λ (C⁻¹k*)ᵀ,   Λ = (v* − W0 k*) / ((C⁻¹k*)ᵀ k*)

— memedit's exact closed-form insert (:func:`memedit.insert_closed_form`) with one key:
the edited layer maps k* to v*, and keys k with kᵀC⁻¹k* = 0 keep their outputs. The
result is an ordinary :class:`memedit.Edit` of rank one (Λ ``(d, 1)``, D ``(1,
key_dim)``): apply it with :func:`memedit.apply_edit`, revert it bit for bit with
:func:`memedit.revert_edit`, save only its factors with :func:`memedit.save_edit`.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import jax.numpy as jnp
import numpy as np

import memedit
from memedit.lm.hooks import as_path
from memedit.lm.keys import check_memory, layer_weights, subject_keys
from memedit.lm.prompts import Request, check_requests_list, encode, prompt_rows
from memedit.lm.values import ValueResult, optimize_values

__all__ = ["RomeResult", "rome_edits", "rome_insert"]


class RomeResult(NamedTuple):
  """One ROME edit and what made it.

  Attributes:
    edit: the :class:`memedit.Edit` (rank one).
    key: k* ``(key_dim,)``.
    value: v* ``(d,)``, the layer's output target at k* (bias included).
    delta: δ ``(d,)``.
    nll: the value search's final NLL of the new object.
  """

  edit: "memedit.Edit"
  key: np.ndarray
  value: np.ndarray
  delta: np.ndarray
  nll: float


def rome_insert(model, view: "memedit.MemoryView", C, key, value, *,
                settings: dict | None = None) -> "memedit.Edit":
  """The rank-one insert of (k*, v*) into the dense memory ``view`` as an Edit.

  Args:
    model: the model (Linen ``(module, variables)`` or NNX ``(graphdef, state)``) whose
      layer W0 is.
    view: the memory view of the MLP projection (:func:`memedit.memory_view`).
    C: ``(key_dim, key_dim)`` second moment of its keys.
    key: k* ``(key_dim,)``.
    value: v* ``(d,)``, the target output of the layer at k* (its bias included).
    settings: provenance recorded with the edit.

  Returns:
    The Edit: W1 = W0 + Λ (C⁻¹k*)ᵀ, Λ = (v* − b − W0 k*) / ((C⁻¹k*)ᵀ k*).

  Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, memedit
    >>> layer = nn.Dense(2)
    >>> v = layer.init(jax.random.key(0), jnp.ones((1, 3)))
    >>> view = memedit.memory_view((layer, v), (), jnp.ones((1, 3)))
    >>> e = rome_insert((layer, v), view, jnp.eye(3), jnp.array([1.0, 2.0, 0.0]), jnp.array([0.5, -1.0]))
    >>> new, _ = memedit.apply_edit(v, e)
    >>> layer.apply(new, jnp.array([1.0, 2.0, 0.0])).round(4).tolist()
    [0.5, -1.0]
  """
  # float64 inputs (with jax_enable_x64) are solved in float64, others in float32.
  dt = jnp.result_type(jnp.float32, jnp.asarray(key).dtype, jnp.asarray(value).dtype,
                       jnp.asarray(C).dtype)
  key = jnp.asarray(key, dt).reshape(1, -1)
  value = jnp.asarray(value, dt).reshape(1, -1)
  if key.shape[1] != view.key_dim or value.shape[1] != view.value_dim:
    raise ValueError(f"key, value: expected ({view.key_dim},) and ({view.value_dim},), got "
                     f"{key.shape[1:]} and {value.shape[1:]}")
  W, bias = layer_weights(view, model)
  sol = memedit.insert_closed_form(W.astype(dt), jnp.asarray(C, dt), key,
                                   value - bias.astype(dt))
  lam, directions = sol[0], sol[1]  # Λ (d, 1), D = (C⁻¹k*)ᵀ (1, key_dim)
  return memedit.make_edit(view.weight_path, lam, directions, kind=view.kind,
                           in_ndim=view.in_ndim, method="rome", settings=settings or {})


def rome_edits(model, address, tokenize: Callable[[str], Sequence[int]],
               requests: Sequence[Request], C, *, contexts: Sequence[str] = ("{}",),
               value_options: dict | None = None, view=None) -> list[RomeResult]:
  """One independent ROME edit per request, each made against ``model`` as it is.

  Keys and values of all requests are computed together (batched programs); the edits
  are separate: apply one of them, or several one after another (each was computed
  without the others).

  Args:
    model: the LM, Linen ``(module, variables)`` or NNX ``(graphdef, state)``.
    address: the MLP output projection to edit (e.g. GPT-2's ``('h_2', 'mlp', 'c_proj')``).
    tokenize: text -> token ids.
    requests: the facts to write.
    C: ``(key_dim, key_dim)`` second moment of the layer's keys
      (:func:`memedit.lm.stats.lm_covariance`).
    contexts: context templates for k* and v* (:func:`memedit.lm.keys.sample_contexts`).
    value_options: keyword arguments of :func:`memedit.lm.values.optimize_values`
      (steps, learning_rate, kl_factor, weight_decay, clamp, essence, chunk).
    view: the layer's memory view (made from the model when omitted).

  Returns:
    One :class:`RomeResult` per request.

  Raises:
    ValueError: no requests; token ids outside the model's vocabulary (negative, or at
      least its logits' size; :func:`memedit.lm.keys.check_token_ids`); a request whose
      prediction the memory cannot change, e.g. the last block's MLP with the subject
      before the prompt's end (:func:`memedit.lm.values.check_reach`, once the search has
      left δ at exactly 0). The others are raised before the value search.
    TypeError: ``requests`` is not a sequence of :class:`Request`.
  """
  path = as_path(address)
  requests = check_requests_list(requests)
  if view is None:
    example = encode(tokenize, prompt_rows(requests[0], ("{}",))).ids
    view = check_memory(model, path, example)
  keys = subject_keys(model, path, tokenize, requests, contexts)
  opts = dict(value_options or {})
  res: ValueResult = optimize_values(model, path, tokenize, requests, contexts, **opts)
  W, bias = (np.asarray(a, np.float32) for a in layer_weights(view, model))
  out = []
  for i, req in enumerate(requests):
    value = keys[i] @ W.T + bias + res.delta[i]
    settings = {"layer": [str(p) for p in path], "prompt": req.prompt, "subject": req.subject,
                "target_new": req.target_new, "contexts": len(contexts),
                **{k: v for k, v in opts.items() if isinstance(v, (int, float, str))}}
    edit = rome_insert(model, view, C, keys[i], value, settings=settings)
    out.append(RomeResult(edit, keys[i], value.astype(np.float32), res.delta[i],
                          float(res.nll[i])))
  return out
