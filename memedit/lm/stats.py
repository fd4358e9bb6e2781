"""C = E[k kᵀ] of an MLP memory's keys over a text stream (ROME's and MEMIT's statistics).

The text comes as batches of ``(ids (B, T), mask (B, T))``: every real token's key (the
MLP activation entering the projection) is one sample, padding is weighted 0. The fold is
memedit's streaming one (:func:`memedit.layers.layer_covariance` with a masked key
function): compiled once per batch shape, the model run only as far as the layer, and,
with ``cache_dir``, saved under a key of the model's parameters, the layer and the
stream's description, so a second call (or a resumed one) reads it back.
"""

from __future__ import annotations

import collections.abc
from typing import Any, Iterable

import jax
import jax.numpy as jnp
import numpy as np

import memedit
import memedit.layers
from memedit.lm.hooks import as_path
from memedit.lm.keys import vocab_size

__all__ = ["lm_covariance", "lm_second_moment", "token_batches"]


def token_batches(ids: np.ndarray, batch: int, pad_id: int = 0
                  ) -> list[tuple[np.ndarray, np.ndarray]]:
  """Rows of token ids ``(N, T)`` as ``(ids, mask)`` batches of ``batch`` rows, mask 1
  where ``ids != pad_id`` (the last batch may be shorter).

  Example:
    >>> b = token_batches(np.array([[1, 2, 0], [3, 0, 0], [4, 5, 6]]), 2)
    >>> len(b), b[0][1].tolist()
    (2, [[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
  """
  ids = np.asarray(ids)
  if ids.ndim != 2:
    raise ValueError(f"ids: expected (N, T) token ids, got shape {ids.shape}")
  return [(ids[i:i + batch], (ids[i:i + batch] != pad_id).astype(np.float32))
          for i in range(0, ids.shape[0], batch)]


def lm_covariance(model, address, batches: Iterable[tuple[Any, Any]], *, spec: Any = None,
                  cache_dir=None, group: int = 8, progress: bool = False
                  ) -> "memedit.CovarianceState":
  """Folds the keys of the MLP projection at ``address`` over a masked text stream.

  Args:
    model: the LM, Linen ``(module, variables)`` or NNX ``(graphdef, state)``.
    address: the projection, e.g. ``('h_2', 'mlp', 'c_proj')`` or ``'h_2.mlp.c_proj'``.
    batches: iterable of ``(ids (B, T) int, mask (B, T))``.
    spec: JSON description of the stream (for the cache key; needed with an iterator).
    cache_dir: cache folder (None: no cache).
    group: batches per compiled fold.
    progress: progress bar on stderr.

  Returns:
    The :class:`memedit.CovarianceState`; :func:`memedit.second_moment` of it is C.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from ports.gpt2 import GPT2Config, GPT2LMHeadModel
    >>> net = GPT2LMHeadModel(GPT2Config(vocab_size=9, n_positions=8, n_embd=8, n_layer=1,
    ...                                   n_head=2))
    >>> v = net.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
    >>> ids = np.arange(48).reshape(6, 8) % 9       # six of the 48 tokens are padding (0)
    >>> st = lm_covariance((net, v), "h_0.mlp.c_proj", token_batches(ids, 4))
    >>> memedit.key_count(st), memedit.second_moment(st).shape
    (42, (32, 32))
  """
  size = vocab_size(model)
  if size is not None:
    if isinstance(batches, collections.abc.Iterator):
      batches = _checked(batches, size)  # each batch as the fold reads it
    elif isinstance(batches, collections.abc.Iterable) and not isinstance(
        batches, (str, bytes, np.ndarray, jax.Array)):
      for i, b in enumerate(batches):
        _check_ids(b, size, i)
  return memedit.layers.layer_covariance(model, as_path(address), batches, masked=True,
                                         spec=spec, cache_dir=cache_dir, group=group,
                                         progress=progress, dtype=jnp.float32)


def lm_second_moment(model, address, batches, **kwargs) -> np.ndarray:
  """C = E[k kᵀ] ``(key_dim, key_dim)`` float32 of :func:`lm_covariance`."""
  return np.asarray(memedit.second_moment(lm_covariance(model, address, batches, **kwargs)),
                    np.float32)


def _check_ids(batch: Any, size: int, index: int) -> None:
  """Refuses a batch whose token ids are not integers in [0, size): the embedding would
  read NaN (or another row) for them, anywhere in the row (attention spreads it)."""
  if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
    return  # layer_covariance names the malformed batch
  ids = batch[0]
  dtype = np.dtype(getattr(ids, "dtype", None) or np.asarray(ids).dtype)
  if dtype.kind not in "iu":
    raise ValueError(f"batches[{index}]: expected integer token ids, got dtype {dtype}")
  if not np.size(ids):
    return
  xp = jnp if isinstance(ids, jax.Array) else np
  lo, hi = int(xp.min(ids)), int(xp.max(ids))
  if lo < 0 or hi >= size:
    raise ValueError(f"batches[{index}]: expected token ids 0 <= id < {size} (the model's "
                     f"vocabulary), got ids from {lo} to {hi}")


def _checked(batches, size: int):
  for i, b in enumerate(batches):
    _check_ids(b, size, i)
    yield b
