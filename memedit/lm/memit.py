"""MEMIT (Meng et al., 2023): many facts at once, spread over a range of MLP memories.

For requests i = 1..F and edited blocks l_1 < … < l_m (the last one L = l_m):

1. z_i, the hidden state after block L at the subject's last token that makes the model
   state the new object: the value search of :mod:`memedit.lm.values` with δ added
   at block L's MLP output (the same change of the residual stream), clamp 0.75·‖z0‖,
   25 steps.
2. For each edited block l_j in order, on the model with the earlier blocks already
   edited: K (F, key_dim) the subjects' keys at l_j (averaged over the contexts), h_i
   the current hidden state after block L, the residuals
   r_i = (z_i − h_i) / (m − j + 1) spread over the blocks left, and the ridge insert::

     ΔW = R Kᵀ (λ C + K Kᵀ)⁻¹       (R = [r_i] columns, K = [k_i] columns)

   — :func:`memedit.insert_ridge` with penalty λ (``mom2_update_weight``; C the mean
   of k kᵀ); the edit is applied before the next block is solved.

The result is one ordinary :class:`memedit.Edit` per block: apply them in order with
:func:`memedit.apply_edit`, revert them bit for bit, save their factors. When F exceeds
the layer's output width, the factors are kept as Λ = I, D = ΔWᵀ… (rank d) instead of
rank F (:func:`compact_factors`).
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

import memedit
from memedit.checks import check_covariance
from memedit.lm.hooks import LMLayout, Static, run_lm, split_model
from memedit.lm.keys import check_memory, layer_weights, read_states, subject_keys
from memedit.lm.prompts import Request, check_requests_list, encode, prompt_rows
from memedit.lm.values import ValueResult, _real, optimize_values

__all__ = ["MemitResult", "check_requests", "compact_factors", "memit_edits", "memit_insert",
           "with_params"]

HIGHEST = jax.lax.Precision.HIGHEST


class MemitResult(NamedTuple):
  """MEMIT's edits and what made them.

  Attributes:
    edits: one :class:`memedit.Edit` per edited block, in order.
    targets: ``(F, d)`` z_i, the hidden states after the last edited block.
    reached: ``(F, d)`` the hidden states there after all edits.
    values: the value search's :class:`memedit.lm.values.ValueResult` (its ``nll``: the
      final NLL of the new objects; pass it back as ``memit_edits(..., values=)`` to
      reuse it).
  """

  edits: list
  targets: np.ndarray
  reached: np.ndarray
  values: ValueResult


def compact_factors(lam, directions) -> tuple[jax.Array, jax.Array]:
  """Factors of ΔW = Λ D with rank at most ``min(out, in)``: when Λ D has more factor
  columns than the smaller side of ΔW, the product itself is kept on that side
  (Λ' = I, D' = Λ D, or Λ' = Λ D, D' = I).

  Example:
    >>> import jax.numpy as jnp
    >>> l, d = compact_factors(jnp.ones((2, 5)), jnp.ones((5, 3)))
    >>> l.shape, d.shape, (l @ d).tolist()
    ((2, 2), (2, 3), [[5.0, 5.0, 5.0], [5.0, 5.0, 5.0]])
  """
  lam, directions = jnp.asarray(lam), jnp.asarray(directions)
  out, r = lam.shape
  din = directions.shape[1]
  if r <= min(out, din):
    return lam, directions
  prod = jnp.matmul(lam, directions, precision=HIGHEST)
  if out <= din:
    return jnp.eye(out, dtype=prod.dtype), prod
  return prod, jnp.eye(din, dtype=prod.dtype)


def memit_insert(W, C, keys, residuals, penalty: float):
  """One layer's MEMIT update as factors: ΔW = R Kᵀ (λC + K Kᵀ)⁻¹ = Λ D.

  Args:
    W: ``(d, key_dim)`` the layer's weight (math layout).
    C: ``(key_dim, key_dim)`` E[k kᵀ].
    keys: ``(F, key_dim)`` K as rows. residuals: ``(F, d)`` R as rows.
    penalty: λ.

  Returns:
    ``(lam, directions)`` with ``lam @ directions`` = ΔW (``(d, key_dim)``).

  Example:
    >>> import jax.numpy as jnp
    >>> lam, D = memit_insert(jnp.zeros((1, 2)), jnp.eye(2), jnp.array([[1.0, 0.0]]),
    ...                       jnp.array([[2.0]]), penalty=1.0)
    >>> (lam @ D).round(3).tolist()
    [[1.0, 0.0]]
  """
  # float64 inputs (with jax_enable_x64) are solved in float64, others in float32.
  dt = jnp.result_type(jnp.float32, *(jnp.asarray(a).dtype for a in (W, C, keys, residuals)))
  W = jnp.asarray(W, dt)
  keys = jnp.asarray(keys, dt)
  values = jnp.matmul(keys, W.T, precision=HIGHEST) + jnp.asarray(residuals, dt)
  sol = memedit.insert_ridge(W, jnp.asarray(C, dt), keys, values, penalty)
  return compact_factors(sol[0], sol[1])  # (Λ, D) of the LinearSolution


def check_requests(requests: Sequence[Request]) -> None:
  """Refuses contradictory requests: two targets for the same prompt and subject (the
  same text with the subject ending at the same place, so the same key k and the same
  hidden state z would have to give both). Identical requests are kept: each is one
  more row of K and R, weighing that fact once more against the preserved keys (λC).

  Args:
    requests: the facts of one MEMIT batch.

  Raises:
    ValueError: naming the prompt, the subject and both targets (with the requests'
      indices).

  Example:
    >>> check_requests([Request("{} lives in", "Ana", "oslo"), Request("{} lives in", "Ana",
    ...                                                                  "oslo")])
    >>> check_requests([Request("{} lives in", "Ana", "oslo"), Request("{} lives in", "Ana",
    ...                                                                  "lima")])
    Traceback (most recent call last):
    ...
    ValueError: requests: expected one target per prompt and subject, got 'oslo' (request 0) and 'lima' (request 1) for prompt '{} lives in' with subject 'Ana'
  """
  seen: dict = {}
  for i, req in enumerate(requests):
    where = (req.text, len(req.prompt.split("{}")[0]) + len(req.subject))
    j = seen.setdefault(where, i)
    first = requests[j]
    if first.target_new != req.target_new:
      also = ("" if (first.prompt, first.subject) == (req.prompt, req.subject) else
              f" (request {j}: prompt {first.prompt!r} with subject {first.subject!r}, the "
              f"same text)")
      raise ValueError(f"requests: expected one target per prompt and subject, got "
                       f"{first.target_new!r} (request {j}) and {req.target_new!r} (request "
                       f"{i}) for prompt {req.prompt!r} with subject {req.subject!r}{also}")


def with_params(model, params):
  """``model`` (Linen ``(module, variables)`` / NNX ``(graphdef, state)``) with new
  parameters."""
  definition = split_model(model)[0]
  return (definition.value if isinstance(definition, Static) else definition, params)


def memit_edits(model, layout: LMLayout, layers: Sequence[int],
                tokenize: Callable[[str], Sequence[int]], requests: Sequence[Request],
                covariances: dict, *, penalty: float = 15000.0,
                contexts: Sequence[str] = ("{}",), value_options: dict | None = None,
                insert: Callable | None = None, values: ValueResult | None = None
                ) -> MemitResult:
  """MEMIT: writes all ``requests`` into the MLP memories of ``layers`` (module docstring).

  Args:
    model: the LM, Linen ``(module, variables)`` or NNX ``(graphdef, state)``.
    layout: where the model's MLP projections and blocks are (:class:`LMLayout` with
      ``blocks``).
    layers: block indices to edit, e.g. ``[1, 2]``; the last one is where z is found.
    tokenize: text -> token ids.
    requests: the facts; two targets for one prompt and subject are refused, identical
      requests are kept (:func:`check_requests`).
    covariances: ``{layer: C}``, the second moment of each edited layer's keys.
    penalty: λ, the weight of the preserved keys' statistics (MEMIT's
      ``mom2_update_weight``).
    contexts: context templates for the keys and the value search; the first must be
      ``"{}"`` (the plain prompt, where z0 is read and the hidden states are compared).
    value_options: keyword arguments of :func:`memedit.lm.values.optimize_values`
      (MEMIT's defaults: 25 steps, clamp 0.75; the reference is the last block).
    insert: None for MEMIT's ridge insert (:func:`memit_insert`); else a callable
      ``insert(layer, W, keys, residuals) -> (lam, directions, settings)`` that solves
      block ``layer``'s update ΔW = lam @ directions (W ``(d, key_dim)``, keys
      ``(F, key_dim)``, residuals ``(F, d)``) and returns a dict merged into the edit's
      settings (e.g. AlphaEdit's null-space insert, :mod:`memedit.lm.sequential`).
    values: a :class:`memedit.lm.values.ValueResult` of an earlier call with the same
      model, the same requests in the same order and the same last block
      (``MemitResult.values``): its targets z are reused and the value search is skipped,
      e.g. to compare penalties or earlier blocks. Its z0 must be the model's hidden
      states after the last block (else refused).

  Returns:
    :class:`MemitResult`; ``result.edits[j]`` edits block ``layers[j]``, each made on the
    model with the earlier ones applied.

  Raises:
    ValueError: bad layers (not increasing integer block indices of the layout), missing
      covariances or (with the default insert) one that is not a finite, symmetric,
      positive semi-definite ``(key_dim, key_dim)`` matrix, a penalty that is not a
      positive number, no requests, contradictory requests (:func:`check_requests`),
      token ids outside the model's vocabulary, memories whose outputs are not as wide as
      the hidden state the blocks output, contexts that do not start with
      ``"{}"``, before the value search; ``values`` of other requests, another order or another last
      block (its z0 are not the model's hidden states), before any edit; requests the last
      block's value search cannot act on (:func:`memedit.lm.values.check_reach`), once
      that search has left δ at exactly 0.
    TypeError: ``requests`` is not a sequence of :class:`Request`, or ``values`` not a
      ValueResult.
  """
  layout.require("blocks", "memit_edits")
  if isinstance(layers, (str, bytes)) or not hasattr(layers, "__iter__"):
    raise ValueError(f"layers: expected a sequence of block indices such as [1, 2], got "
                     f"{layers!r}")
  layers = list(layers)
  for l in layers:
    if isinstance(l, (bool, np.bool_)) or not isinstance(l, (int, np.integer)):
      raise ValueError(f"layers: expected integer block indices, got {l!r} in {layers}")
  layers = [int(l) for l in layers]
  if not layers or sorted(set(layers)) != layers or not all(
      0 <= l < layout.n_layers for l in layers):
    raise ValueError(f"layers: expected increasing block indices in [0, {layout.n_layers}), "
                     f"got {layers}")
  missing = [l for l in layers if l not in covariances]
  if missing:
    raise ValueError(f"covariances: expected C for every edited layer {layers}, missing "
                     f"{missing}")
  lam = _real(penalty)
  if lam is None or not np.isfinite(lam) or (insert is None and lam <= 0):
    raise ValueError(f"penalty: expected a positive finite number (λ), got {penalty!r}")
  requests = check_requests_list(requests)
  check_requests(requests)
  if values is not None and not isinstance(values, ValueResult):
    raise TypeError(f"values: expected the ValueResult of an earlier call "
                    f"(MemitResult.values), got {type(values).__name__}")
  if values is None and (isinstance(contexts, str) or not contexts or contexts[0] != "{}"):
    raise ValueError(f"contexts: expected templates starting with '{{}}' (the plain prompt: "
                     f"z0 is read there and the hidden states it is compared with), got "
                     f"{contexts!r}")
  plain = encode(tokenize, [prompt_rows(r, ("{}",))[0] for r in requests])
  last = layers[-1]
  z_block = layout.blocks[last]
  # Checked before the value search, which is the long part.
  width = _state_width(model, z_block, plain.ids[:1])
  views = {}  # each layer's view; an edit changes weights, not where the layer is
  for l in layers:
    view = views[l] = check_memory(model, layout.memories[l], plain.ids[:1])
    if view.value_dim != width:
      raise ValueError(f"layout: expected memories that write into the hidden state of "
                       f"block {z_block!r} (width {width}), got {layout.memories[l]!r} with "
                       f"outputs of width {view.value_dim} (an MLP's output projection is "
                       f"the memory, e.g. down_proj / c_proj, not its input projections)")
    if insert is None:
      check_covariance(covariances[l], view.key_dim, f"covariances[{l}]")
  if values is None:
    opts = {"steps": 25, "clamp": 0.75, **(value_options or {})}
    res = optimize_values(model, layout.memories[last], tokenize, requests, contexts,
                          reference=z_block, **opts)
  elif np.shape(values.delta)[0] != len(requests):
    raise ValueError(f"values: expected the value search of the {len(requests)} requests, "
                     f"got {np.shape(values.delta)[0]} rows")
  else:
    res = values
  targets = res.ref0 + res.delta
  n = len(requests)
  definition, params = split_model(model)
  cur = model
  history = None
  edits = []
  for j, layer in enumerate(layers):
    view = views[layer]
    keys = subject_keys(cur, layout.memories[layer], tokenize, requests, contexts)
    _, (h,) = read_states(cur, plain.ids[:n], plain.last[:n], outputs_of=[z_block])
    if j == 0 and values is not None:
      _check_reused(values, h)
    resid = (targets - h) / (len(layers) - j)
    W, _ = layer_weights(view, cur)
    extra = {}
    if insert is None:
      lam, directions = memit_insert(W, covariances[layer], keys, resid, penalty)
    else:
      lam, directions, extra = insert(layer, W, keys, resid)
    edit = memedit.make_edit(view.weight_path, lam, directions, kind=view.kind,
                             in_ndim=view.in_ndim, method="memit",
                             settings={"layer": layer, "layers": layers, "requests": n,
                                       "penalty": float(penalty), **extra})
    params, history = memedit.apply_edit(params, edit, history)
    cur = with_params(model, params)
    edits.append(edit)
  _, (reached,) = read_states(cur, plain.ids[:n], plain.last[:n], outputs_of=[z_block])
  return MemitResult(edits, targets.astype(np.float32), reached.astype(np.float32), res)


def _state_width(model, block, ids) -> int:
  """The width d of the hidden state ``block`` outputs ``(N, T, d)`` (a shape-only
  trace: nothing runs).

  Raises:
    ValueError: the block's output is not an ``(N, T, d)`` array.
  """
  definition, params = split_model(model)
  ids = jax.ShapeDtypeStruct(np.shape(ids), jnp.int32)
  rec = jax.eval_shape(lambda p, i: run_lm(definition, p, i, record=[block])[1], params, ids)
  out = rec[block][1]
  shape = getattr(out, "shape", None)
  if shape is None or len(shape) != 3 or tuple(shape[:2]) != tuple(ids.shape):
    got = f"shape {tuple(shape)}" if shape is not None else type(out).__name__
    raise ValueError(f"layout: expected blocks whose output is the hidden state "
                     f"{tuple(ids.shape) + ('d',)}, got {got} from block {block!r}")
  return int(shape[-1])


def _check_reused(values: ValueResult, h: np.ndarray) -> None:
  """Refuses a reused value search whose z0 are not ``h`` (the unedited model's hidden
  states after the last block at the requests' subjects): its targets z = z0 + δ were
  found for other requests, another order, another last block or another model."""
  ref0 = np.asarray(values.ref0, np.float64)
  h = np.asarray(h, np.float64)
  scale = np.maximum(np.linalg.norm(h, axis=-1), 1e-30)
  rel = np.linalg.norm(ref0 - h, axis=-1) / scale
  if np.all(rel <= 1e-2):
    return
  i = int(np.argmax(rel > 1e-2))
  raise ValueError(f"values: expected the value search of these requests, in this order, "
                   f"at the last block and on this model (its z0 = the hidden states there), "
                   f"got z0 that differ from them by {rel[i]:.3g} (relative) for request {i}")
