"""The compiled programs that fold groups of batches into a covariance state.

:mod:`memedit.stream` takes a stream's batches ``group`` at a time and folds each group
with one of two programs, cached by structure and shapes (``functools.lru_cache`` on the
key function, dimension and placement, then ``jax.jit`` on the shapes):

- :func:`make_group_fn`: host batches stacked to (G, B, …), a ``lax.scan`` over the group
  (``shard_map`` over several local devices, partial sums combined with ``psum``);
- :func:`make_resident_fn`: a tuple of batches folded where they are (arrays on a
  device, or global arrays that XLA partitions over their mesh).

Parameters are program arguments, never constants, so one program serves every parameter
set of a model. The helpers here describe batches (:class:`BatchTemplate`), pad ragged
ones (:func:`padded_rows`, :func:`pad_rows`) and say where inputs go
(:func:`group_input_sharding`).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from memedit.checks import expand_weights, weights_error, weights_fit
from memedit.moments import (CovarianceState, add_pair, check_key_dtype, covariance_init,
                             fold_keys, merge_states)

__all__ = ["BatchTemplate", "check_key_output", "group_input_sharding", "identity", "is_resident", "make_group_fn",
           "make_resident_fn", "on_several_devices", "pad_rows", "padded_rows",
           "replicated_sharding", "split_keys", "with_params"]


def split_keys(out: Any) -> tuple[Any, Any]:
  """A key function's output as ``(keys, weights)`` (weights None when it gave keys only).

  Example:
    >>> split_keys("k"), split_keys(("k", "w"))
    (('k', None), ('k', 'w'))
  """
  if isinstance(out, tuple):
    if len(out) != 2:
      raise ValueError(f"key_fn: expected keys or (keys, weights), got a tuple of {len(out)}")
    return out
  return out, None


def identity(batch: Any) -> Any:
  """The key function of a stream of raw keys.

  Example:
    >>> identity(3)
    3
  """
  return batch


def padded_rows(n: int, multiple: int) -> int:
  """Rows a ragged batch of ``n`` rows is padded to: the next power of two, rounded up to
  a multiple of ``multiple`` (the number of devices the batch is split over).

  Example:
    >>> padded_rows(5, 1), padded_rows(5, 3), padded_rows(8, 1)
    (8, 9, 8)
  """
  p = 1 << max(n - 1, 0).bit_length()
  return -(-p // multiple) * multiple


def pad_rows(x: Any, rows: int) -> Any:
  """``x`` with its leading axis extended to ``rows`` by repeating its last row (real,
  finite inputs for the model; the padded rows get weight 0). Device arrays are padded on
  their device, host arrays on the host.

  Example:
    >>> import numpy as np
    >>> pad_rows(np.array([1, 2]), 4).tolist()
    [1, 2, 2, 2]
  """
  xp = jnp if isinstance(x, jax.Array) else np
  n = x.shape[0]
  if n == rows:
    return x
  widths = [(0, rows - n)] + [(0, 0)] * (x.ndim - 1)
  return xp.pad(x, widths) if n == 0 else xp.pad(x, widths, mode="edge")


class BatchTemplate(NamedTuple):
  """What every batch of a stream shares with the first: tree structure and the shapes of
  its leaves after the leading (batch) axis.

  Example:
    >>> import numpy as np
    >>> t = BatchTemplate.of((np.ones((4, 3)), np.ones(4)))
    >>> t.rows((np.ones((2, 3)), np.ones(2)))
    2
  """

  treedef: Any
  tails: tuple

  @classmethod
  def of(cls, batch: Any) -> "BatchTemplate":
    leaves, treedef = jax.tree_util.tree_flatten(batch)
    return cls(treedef, tuple(tuple(np.shape(x))[1:] for x in leaves))

  def rows(self, batch: Any) -> int:
    """The batch's leading size, after checking it against the template."""
    leaves, treedef = jax.tree_util.tree_flatten(batch)
    shapes = [tuple(np.shape(x)) for x in leaves]
    leads = {s[0] for s in shapes if s}
    if (treedef != self.treedef or any(len(s) == 0 for s in shapes) or len(leads) != 1
        or tuple(s[1:] for s in shapes) != self.tails):
      want = jax.tree_util.tree_unflatten(self.treedef, [("B",) + t for t in self.tails])
      got = jax.tree_util.tree_unflatten(treedef, shapes)
      raise ValueError(
          f"batches: expected every batch to have shape {want} (any batch size B, one for "
          f"all leaves), got {got}")
    return leads.pop()


def is_resident(batch: Any) -> bool:
  """Whether every leaf of ``batch`` is a ``jax.Array`` (already on a device).

  Example:
    >>> import numpy as np, jax.numpy as jnp
    >>> is_resident((jnp.ones(2),)), is_resident((np.ones(2),))
    (True, False)
  """
  leaves = jax.tree_util.tree_leaves(batch)
  return bool(leaves) and all(isinstance(x, jax.Array) for x in leaves)


def on_several_devices(batch: Any) -> bool:
  """Whether a leaf of ``batch`` is a ``jax.Array`` spread over several devices (a
  program folding it is partitioned by XLA).

  Example:
    >>> import jax.numpy as jnp
    >>> on_several_devices(jnp.ones(2))
    False
  """
  return any(isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer)
             and len(x.sharding.device_set) > 1 for x in jax.tree_util.tree_leaves(batch))


def replicated_sharding(batch: Any) -> Any:
  """The replicated sharding over the mesh of a batch's first leaf, when it is a
  ``NamedSharding`` over several devices; else None (the fold runs where the data is).

  Example:
    >>> import jax.numpy as jnp
    >>> replicated_sharding(jnp.ones(2)) is None
    True
  """
  from jax.sharding import NamedSharding, PartitionSpec as P

  s = jax.tree_util.tree_leaves(batch)[0].sharding
  if isinstance(s, NamedSharding) and len(s.device_set) > 1:
    return NamedSharding(s.mesh, P())
  return None


def with_params(key_fn: Callable, has_params: bool) -> Callable:
  """``key_fn`` as a function of (params, batch).

  Example:
    >>> with_params(lambda b: b + 1, False)(None, 1)
    2
  """
  if has_params:
    return key_fn
  return lambda params, batch: key_fn(batch)


@functools.lru_cache(maxsize=8)
def _data_mesh(n_dev: int):
  from jax.sharding import Mesh

  return Mesh(np.asarray(jax.local_devices()[:n_dev]), ("data",))


def group_input_sharding(n_dev: int) -> Any:
  """Where the stacked (G, B, …) inputs of :func:`make_group_fn` go: the default device,
  or split along B over ``n_dev`` local devices.

  Example:
    >>> group_input_sharding(1) is None
    True
  """
  if n_dev == 1:
    return None
  from jax.sharding import NamedSharding, PartitionSpec as P

  return NamedSharding(_data_mesh(n_dev), P(None, "data"))


def check_key_output(out: Any, dim: int | None = None, rows: int | None = None,
                     name: str = "key_fn") -> tuple[Any, Any]:
  """Checks what a key function returned (arrays or their shapes) and splits it.

  Keys must be a real array of shape (B, ..., d) (d = ``dim`` when given; B = ``rows``,
  the batch's leading size, when given); weights, when returned, a real (or bool) array
  aligned with the keys' leading axes (see :func:`memedit.checks.weights_fit`).

  Args:
    out: keys, or a pair (keys, weights) (arrays or ``jax.ShapeDtypeStruct``).
    dim: the key dimension d, or None for any.
    rows: the batch's leading size B, or None for any.
    name: what produced ``out``, for messages (``"key_fn"``, or ``"batches"`` for a
      stream of raw keys).

  Returns:
    ``(keys, weights)`` as :func:`split_keys`.

  Example:
    >>> import numpy as np
    >>> check_key_output((np.ones((4, 3)), np.ones(5)))
    Traceback (most recent call last):
    ...
    ValueError: key_fn weights: expected a shape that broadcasts to a leading part of the keys' leading shape (4,) (weights align with the keys' leading axes, from the left: (B,) weights each of B images of keys (B, h, w, d)), got (5,)
  """
  keys, w = split_keys(out)
  if not (hasattr(keys, "shape") and hasattr(keys, "dtype")):
    raise ValueError(f"{name}: expected keys (an array of shape (B, ..., d)) or a tuple "
                     f"(keys, weights), got {type(keys).__name__}")
  shape = tuple(keys.shape)
  want_d = "d" if dim is None else dim
  want_b = "B" if rows is None else rows
  if (len(shape) < 2 or (dim is not None and shape[-1] != dim)
      or (rows is not None and shape[0] != rows)):
    raise ValueError(f"{name}: expected keys of shape ({want_b}, ..., {want_d}) (the batch's "
                     f"leading axis first, the key dimension last), got {shape}")
  check_key_dtype(keys.dtype)
  if w is not None:
    if not (hasattr(w, "shape") and hasattr(w, "dtype")):
      w = np.asarray(w)
    if not (jnp.issubdtype(w.dtype, jnp.floating) or jnp.issubdtype(w.dtype, jnp.integer)
            or jnp.issubdtype(w.dtype, jnp.bool_)):
      raise ValueError(f"{name} weights: expected a real dtype, got {w.dtype}")
    if not weights_fit(tuple(w.shape), shape[:-1]):
      raise weights_error(f"{name} weights", tuple(w.shape), shape[:-1])
  return keys, w


def _checked_keys(keys_of, params, batch, dim):
  keys, w = check_key_output(keys_of(params, batch), dim)
  if w is not None:
    w = jnp.asarray(w)
  return keys, w


@functools.lru_cache(maxsize=64)
def make_group_fn(key_fn: Callable, dim: int, n_dev: int, has_params: bool = False):
  """Compiles the fold of a group of stacked host batches (G, B, ...) into a state.

  The program takes ``(state, params, batches, valid)`` with ``valid`` (G, B) bool (rows
  of padding are False and get weight 0): parameters are an argument, not constants, so
  one program serves every parameter set of the same shapes. Over ``n_dev`` > 1 local
  devices every device folds its share of each batch about the common shift and the
  partial sums are combined with ``psum``.

  Args:
    key_fn: batch → keys or (keys, weights); with ``has_params``, (params, batch) → ….
    dim: key dimension d.
    n_dev: local devices to split each batch over.
    has_params: whether ``key_fn`` takes parameters.

  Returns:
    ``fold(state, params, batches, valid) -> state``.

  Example:
    >>> import numpy as np, memedit
    >>> fold = make_group_fn(identity, 2, 1)
    >>> st = fold(memedit.covariance_init(2), None, np.ones((3, 4, 2), np.float32),
    ...           np.ones((3, 4), bool))
    >>> memedit.key_count(st)
    12
  """
  keys_of = with_params(key_fn, has_params)

  def fold_group(state, params, batches, valid):
    def body(st, inp):
      batch, ok = inp
      keys, w = _checked_keys(keys_of, params, batch, dim)
      lead = keys.shape[:-1]
      # ``ok`` (B,) marks the real rows along the keys' leading (batch) axis; the key
      # function's weights are aligned with the keys' leading axes from the left, so
      # both are brought to the keys' leading shape before they are combined.
      okb = jnp.reshape(ok, ok.shape + (1,) * (len(lead) - ok.ndim))
      if w is None:
        w = jnp.broadcast_to(okb, lead).astype(jnp.float32)
      else:
        w = expand_weights(w, lead)
        w = jnp.where(okb, w, jnp.zeros((), w.dtype))
      return fold_keys(st, keys, w), None

    return lax.scan(body, state, (batches, valid))[0]

  if n_dev == 1:
    return jax.jit(fold_group)

  from jax.sharding import PartitionSpec as P

  mesh = _data_mesh(n_dev)

  def sharded(state, params, batches, valid):
    # Every device folds its share of each batch into an empty state with the common
    # shift, then the partial sums are reduced across devices with psum.
    def per_device(st0, prm, b, v):
      local = covariance_init(dim, dtype=st0.sum.dtype)._replace(shift=st0.shift,
                                                                has_shift=st0.has_shift)
      local = jax.tree_util.tree_map(lambda x: lax.pcast(x, ("data",), to="varying"), local)
      part = fold_group(local, prm, b, v)
      lo16 = lax.psum(part.count[0] & 0xFFFF, "data")
      hi16 = lax.psum(part.count[0] >> 16, "data")
      hi = lax.psum(part.count[1], "data")
      count = add_pair(jnp.stack([lo16, hi]), jnp.stack([hi16 << 16, hi16 >> 16]))
      return CovarianceState(
          count=count,
          weight=jnp.stack([lax.psum(part.weight[0], "data"), lax.psum(part.weight[1], "data")]),
          shift=st0.shift, has_shift=st0.has_shift,
          sum=lax.psum(part.sum, "data"), sum_sq=lax.psum(part.sum_sq, "data"),
          nonfinite=lax.psum(part.nonfinite, "data"))

    rep = jax.tree_util.tree_map(lambda _: P(), state)
    fn = jax.shard_map(per_device, mesh=mesh,
                       in_specs=(rep, P(), P(None, "data"), P(None, "data")),
                       out_specs=rep)
    total = fn(state, params, batches, valid)
    return merge_states(state._replace(has_shift=jnp.asarray(True)), total)

  in_sharding = group_input_sharding(n_dev)
  replicated = jax.sharding.NamedSharding(mesh, P())
  jitted = jax.jit(sharded)

  def run(state, params, batches, valid):
    batches = jax.device_put(batches, in_sharding)
    valid = jax.device_put(valid, in_sharding)
    # The state and parameters ((d, d) sums; a model) committed elsewhere (e.g. onto
    # device 2, or the mesh of an earlier jax.Array batch) are replicated over the
    # devices that fold, as uncommitted ones are by the program.
    state, params = jax.device_put((state, params), replicated)
    return jitted(state, params, batches, valid)

  return run


@functools.lru_cache(maxsize=64)
def make_resident_fn(key_fn: Callable, dim: int, out_sharding: Any, has_params: bool = False,
                     partitioned: bool = False, preshifted: bool = False):
  """Compiles the fold of a tuple of batches that stay where they are.

  Arrays already on devices (one device, or a global ``jax.Array`` sharded over a mesh)
  are folded in place: XLA partitions the program over the arrays' shardings, so each
  device folds the rows it holds and only the (d, d) partial sums are reduced.

  Args:
    key_fn: batch → keys or (keys, weights); with ``has_params``, (params, batch) → ….
    dim: key dimension d.
    out_sharding: sharding of the state the program returns (None: where XLA puts it).
    has_params: whether ``key_fn`` takes parameters.
    partitioned: the batches span several devices (Gram matrices by XLA's GEMM).
    preshifted: the batches are pairs (keys kᵢ − c for the state's shift c, their column
      sums), staged that way on the host (:func:`memedit.moments.fold_keys`); ``key_fn``
      is then the identity.

  Returns:
    ``fold(state, params, batches) -> state`` for a tuple of batches.

  Example:
    >>> import jax.numpy as jnp, memedit
    >>> fold = make_resident_fn(identity, 2, None)
    >>> memedit.key_count(fold(memedit.covariance_init(2), None, (jnp.ones((5, 2)),)))
    5
  """
  keys_of = with_params(key_fn, has_params)

  def fold(state, params, batches):
    for batch in batches:
      if preshifted:
        keys, sums = batch
        state = fold_keys(state, keys, None, preshifted=True, sums=sums)
        continue
      keys, w = _checked_keys(keys_of, params, batch, dim)
      state = fold_keys(state, keys, w, partitioned=partitioned)
    return state

  if out_sharding is None:
    return jax.jit(fold)
  return jax.jit(fold, out_shardings=jax.tree_util.tree_map(
      lambda _: out_sharding, covariance_init(dim)))
