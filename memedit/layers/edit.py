"""Functional edits of one layer's kernel: substitution, edited forward passes and
closed-form inserts through a :class:`~memedit.layers.MemoryView`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from memedit.closed_form import insert_closed_form, insert_ridge
from memedit.edits import make_edit
from memedit.layers.hooks import replicated_type
from memedit.layers.kinds import NativeKeyError
from memedit.layers.model import as_model, call_method, merge, rewrap
from memedit.layers.view import MemoryView, as_view
from memedit.layouts import kernel_delta

__all__ = [
    "edited_forward",
    "edited_kernel",
    "insert_through_view",
    "layer_bias",
    "layer_forward",
    "substitute",
]


def substitute(model, address_or_view, new_kernel, *example_args, **example_kwargs):
  """The model with one layer's kernel replaced; the caller's model is not touched.

  Args:
    model: NNX module, NNX ``(graphdef, state)`` or Linen ``(module, variables)``.
    address_or_view: a :class:`MemoryView` or an address (see :func:`memory_view`).
    new_kernel: array with the view's kernel shape (one layer's for one layer of a
      scanned stack: the other layers keep their bits).
    *example_args: example inputs (Linen addresses only).

  Returns:
    The model in the form it was given: a new ``nnx.Module``, ``(graphdef, new_state)`` or
    ``(module, new_variables)``.

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> import memedit.layers as ml
    >>> model = nnx.Sequential(nnx.Linear(3, 2, rngs=nnx.Rngs(0)))
    >>> new = ml.substitute(model, ("layers", 0), jnp.zeros((3, 2)))
    >>> float(abs(new.layers[0].kernel[...]).sum()), float(abs(model.layers[0].kernel[...]).sum()) > 0
    (0.0, True)
  """
  m = as_model(model)
  view = as_view(m, address_or_view, *example_args, **example_kwargs)
  old = view.read_kernel(m.params)
  if tuple(new_kernel.shape) != tuple(old.shape):
    raise ValueError(f"new_kernel: expected shape {tuple(old.shape)}, got "
                     f"{tuple(new_kernel.shape)}")
  return rewrap(m, view.write_kernel(m.params, jnp.asarray(new_kernel, old.dtype)))


def edited_kernel(view: MemoryView, kernel0, lam, directions):
  """``W0 + kernel_delta(lam, directions)`` in the kernel's own layout (differentiable).

  Args:
    view: the layer's :class:`MemoryView` (gives the layout).
    kernel0: the original kernel W0.
    lam: Λ of shape ``memedit.lambda_shape(kernel0.shape, r, view.kind, view.in_ndim)``.
    directions: D ``(r, key_dim)`` over the view's keys (for a grouped conv the full
      ``C_in`` keys; the kernel takes the diagonal blocks of ``Λ D``).

  Returns:
    The edited kernel, shaped like ``kernel0``.

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> import memedit.layers as ml
    >>> view = ml.memory_view(nnx.Sequential(nnx.Linear(3, 2, rngs=nnx.Rngs(0))), "layers/0")
    >>> k = ml.edited_kernel(view, jnp.zeros((3, 2)), jnp.ones((2, 1)), jnp.array([[1.0, 0, 0]]))
    >>> k.tolist()
    [[1.0, 1.0], [0.0, 0.0], [0.0, 0.0]]
  """
  lam, directions = view.kernel_factors(lam, directions)
  delta = kernel_delta(lam, directions, kernel0.shape, kind=view.kind, in_ndim=view.in_ndim)
  return kernel0 + delta.astype(kernel0.dtype)


def layer_forward(view: MemoryView, lam, directions, x, *extra, kernel0=None, **kwargs):
  """The layer alone on native input ``x`` with kernel ``W0 + kernel_delta(lam, D)``.

  Args:
    view: the layer's :class:`MemoryView`.
    lam: Λ. directions: D ``(r, key_dim)``.
    x: the layer's native input (e.g. captured keys). *extra: further call arguments.
    kernel0: W0 (default: the kernel the view was made from).

  Returns:
    The layer's output; differentiable in ``lam``.

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> import memedit.layers as ml
    >>> lin = nnx.Linear(3, 2, use_bias=False, rngs=nnx.Rngs(0))
    >>> view = ml.memory_view(nnx.Sequential(lin), "layers/0")
    >>> y = ml.layer_forward(view, jnp.ones((2, 1)), jnp.array([[1.0, 0, 0]]),
    ...                      jnp.array([[1.0, 0, 0]]), kernel0=jnp.zeros((3, 2)))
    >>> y.tolist()
    [[1.0, 1.0]]
  """
  k0 = view.kernel() if kernel0 is None else kernel0
  return view.apply(edited_kernel(view, k0, lam, directions), x, *extra, **kwargs)


def edited_forward(model, view: MemoryView, lam, directions, *args, method=None, **kwargs):
  """The whole model's output with the layer's kernel ``W0 + kernel_delta(lam, D)``.

  Pure and differentiable in ``lam`` (use under ``jax.jit`` / ``jax.grad``); the model's
  other parameters are constants.

  Args:
    model: NNX module, NNX ``(graphdef, state)`` or Linen ``(module, variables)``.
    view: the layer's :class:`MemoryView`.
    lam: Λ. directions: D ``(r, key_dim)``.
    *args, **kwargs: model inputs. method: model method to run (a name, or a function
      ``(module, *args, **kwargs) -> output``).

  Returns:
    The model's output.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> import memedit.layers as ml
    >>> model = nnx.Sequential(nnx.Linear(3, 2, rngs=nnx.Rngs(0)))
    >>> view = ml.memory_view(model, "layers/0")
    >>> D = jnp.array([[1.0, 0.0, 0.0]])
    >>> g = jax.jit(jax.grad(lambda lam: ml.edited_forward(model, view, lam, D,
    ...                                                    jnp.ones((1, 3))).sum()))
    >>> g(jnp.zeros((2, 1))).tolist()
    [[1.0], [1.0]]
  """
  m = as_model(model)
  k0 = view.read_kernel(m.params)
  params = view.write_kernel(m.params, edited_kernel(view, k0, lam, directions))
  if m.framework == "nnx":
    return call_method(merge(m.definition, params), method)(*args, **kwargs)
  return m.definition.apply(params, *args, method=method, **kwargs)


def insert_through_view(view: MemoryView, C, keys, values, *, ridge: float | None = None,
                        floor: float = 1e-6, check: bool = True, name: str | None = None,
                        method: str = "insert_closed_form"):
  """Closed-form insert of ``keys -> values`` into the viewed layer, as a core ``Edit``.

  The layer may be affine (bias, LinearGeneral head axes, ...): targets are turned into
  kernel targets through the layer itself, ``W0 k* + (v* - f(W0, k*))``, so the edited
  layer outputs exactly ``v*`` at ``k*`` while keys ``k`` with ``k^T C^{-1} K* = 0`` keep
  their outputs. A layer kind with a run-time weight gain ``g`` (see
  :func:`register_layer_kind`) gets ``Lambda / g``, so the insert still writes ``v*``.

  Exactness: dense layers, embeddings (one-hot keys) and patch views of (transposed)
  convolutions with 1 to 3 spatial axes are exact linear memories. Per-pixel conv views are
  exact here only for 1x1 kernels (keys taken at the pixels the layer reads, every s-th
  one under a stride s); for larger kernels a pixel's output mixes several taps, so use
  ``patch=True`` or the per-tap ``solve_lambda(..., kind='conv')``. Grouped convolutions
  are solved group by group (group ``g``'s outputs read only group ``g``'s channels, with
  ``C``'s diagonal block of that group): the edit has rank ``G*n`` and keys whose part in
  every group is ``C_g``-orthogonal to the inserted keys' keep their outputs. Layers that
  are not affine in their first argument (extra call arguments such as a style,
  demodulation) need ``solve_lambda`` with ``f = lambda K, x: view.apply(K, x, *extra)``.

  Args:
    view: the layer's :class:`MemoryView`.
    C: ``(key_dim, key_dim)`` second moment of the layer's keys.
    keys: ``(n, key_dim)`` flat keys (dense with trailing key axes, patch views, 1x1
      conv, one-hot rows of an embedding) or native layer inputs ``(n, *in_dims)`` (dense;
      token ids ``(n,)`` of an embedding). Keys with positions, ``(B, L, *in_dims)`` of a
      sequence as :func:`capture` gives them or a conv view's ``(N, H, W, key_dim)``, are
      ``B·L`` (``N·H·W``) keys, one per position.
    values: ``(n, value_dim)`` or ``(n, *out_dims)`` target layer outputs; for keys with
      positions, one per position (``(B, L, *out_dims)``).
    ridge: use the soft insert ``insert_ridge`` with this ridge instead of the exact one.
    floor: relative eigenvalue floor of ``C``: eigenvalues below ``floor * max`` are raised
      to it before inverting (``0``: invert ``C`` as it is; keys ``C``-orthogonal to the
      edit then keep their outputs even for an ill-conditioned ``C``, which must then be
      positive definite).
    check: first test the layer kind's contract on random probes
      (:meth:`MemoryView.check_contract`).
    name: the edit's name.
    method: provenance recorded with the edit.

  Returns:
    ``memedit.Edit`` with path ``view.weight_path`` (for grouped convs its factors are the
    kernel's, see :meth:`MemoryView.kernel_factors`); for one layer of a scanned stack
    with ``index = view.index``, so that it changes that layer alone.

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> import memedit, memedit.layers as ml
    >>> model = nnx.Sequential(nnx.Linear(3, 2, rngs=nnx.Rngs(0)))
    >>> view = ml.memory_view(model, "layers/0")
    >>> k, v = jnp.array([[1.0, 2.0, 0.0]]), jnp.array([[0.5, -0.5]])
    >>> edit = ml.insert_through_view(view, jnp.eye(3), k, v)
    >>> state, _ = memedit.apply_edit(nnx.state(model), edit)
    >>> new = nnx.merge(nnx.graphdef(model), state)
    >>> bool(jnp.allclose(new(k), v, atol=1e-5))
    True
  """
  view.require_unstacked()
  kernel0 = view.kernel()
  if view.kind == "conv" and view.taps != 1:
    raise ValueError(
        f"insert_through_view: layer {view.address!r} has a "
        f"{view.kernel_shape[view.stacked:-2]} kernel viewed per pixel; a pixel's output "
        "mixes taps, so the per-tap closed form is not exact. Use memory_view(..., "
        "patch=True) or solve_lambda(kind='conv').")
  if isinstance(floor, bool) or not np.isscalar(floor) or not 0 <= floor < 1:
    raise ValueError(f"floor: expected a number in [0, 1), got {floor!r}")
  # Arrays sharded over a mesh with explicit axes are solved replicated (one layer's
  # (key_dim, key_dim) problem): the QR and solves refuse keys sharded along their dims.
  kernel0 = replicated_type(kernel0)
  keys = replicated_type(jnp.asarray(keys))
  values = replicated_type(jnp.asarray(values))
  if keys.ndim == 0 or values.ndim == 0 or values.shape[0] != keys.shape[0]:
    raise ValueError(f"values: expected one row per key, got keys of shape "
                     f"{tuple(keys.shape)} and values of shape {tuple(values.shape)}")
  n = keys.shape[0]
  C = replicated_type(jnp.asarray(C))
  if C.shape != (view.key_dim, view.key_dim):
    raise ValueError(f"C: expected shape {(view.key_dim, view.key_dim)}, got {C.shape}")
  bias = layer_bias(view)
  gain = view.gain()
  w = view.math_weight(kernel0).reshape(view.value_dim, view.key_dim)
  native = None
  if view.kind == "conv" or view.patch:  # 1x1 per-pixel or patch keys: W k + b per pixel
    if keys.shape[-1] != view.key_dim:
      what = "patch keys" if view.patch else "per-pixel keys"
      raise ValueError(f"keys: expected {what} with last dimension {view.key_dim} "
                       f"(view.keys(x) turns the layer's inputs x, as capture gives them, "
                       f"into its keys), got shape {tuple(keys.shape)}")
    flat = keys.reshape(-1, view.key_dim)
    if flat.shape[0] != n:  # keys (N, H, W, key_dim): every pixel's key, with its value
      if tuple(values.shape[:keys.ndim - 1]) != tuple(keys.shape[:-1]):
        raise ValueError(f"values: expected one value per key, leading shape "
                         f"{tuple(keys.shape[:-1])}, got shape {tuple(values.shape)}")
      n = flat.shape[0]
    out0 = jnp.matmul(flat, w.T, precision=jax.lax.Precision.HIGHEST)
    out0 = (out0 if gain is None else out0 * gain) + (0.0 if bias is None else bias)
  else:
    if keys.ndim == 2 and keys.shape[-1] == view.key_dim:
      flat = keys
      native = view.native_keys(keys)
    else:
      native = keys
      try:
        flat = view.keys(keys)
      except NativeKeyError:  # e.g. token ids out of an embedding's range: said as is
        raise
      except (TypeError, ValueError):
        flat = None
      if flat is None or flat.shape[-1] != view.key_dim:
        raise ValueError(f"keys: expected flat keys ({n}, {view.key_dim}) or the layer's "
                         f"native inputs, got shape {tuple(keys.shape)}") from None
      # Native inputs with positions (a sequence's (B, L, d), as `capture` gives them):
      # each position is a key of its own, with the value at that position.
      positions = tuple(flat.shape[:-1])
      flat = flat.reshape(-1, view.key_dim)
      if flat.shape[0] != n:
        if tuple(values.shape[:len(positions)]) != positions:
          raise ValueError(
              f"values: expected one value per key position, leading shape {positions} "
              f"(the keys' {tuple(keys.shape)} read as {flat.shape[0]} keys), got shape "
              f"{tuple(values.shape)}")
        n = flat.shape[0]
    out0 = view.apply(kernel0, native).reshape(n, -1)
  if check:
    concrete = native is not None and not isinstance(native, jax.core.Tracer)
    try:
      view.check_contract(native if concrete else None)
    except TypeError as e:
      raise ValueError(
          f"insert_through_view: layer {view.address!r} could not be run on one input alone "
          f"to check its contract ({e}); a layer with further call arguments (a style, a "
          "modulation) needs solve_lambda with f = lambda K, x: view.apply(K, x, *extra), "
          "or pass check=False if it is affine in its kernel") from None
  if out0.shape[-1] != view.value_dim:
    raise ValueError(f"layer output: expected {view.value_dim} values per key, got "
                     f"{out0.shape[-1]} (keys with several positions per example?)")
  values = values.reshape(n, -1)
  if values.shape[-1] != view.value_dim:
    raise ValueError(f"values: expected {view.value_dim} per key, got {values.shape[-1]}")
  flat = flat.astype(jnp.float32)
  if (native is not None and jnp.issubdtype(out0.dtype, jnp.floating)
      and jnp.finfo(out0.dtype).bits < 32):
    # A layer computing in bfloat16 / float16 rounds its output: the residual would carry
    # that rounding into the edit. Its output is f(0, k) + gain * W k (the contract
    # check_contract tests), so take the offset from the layer and W k in float32.
    lin = jnp.matmul(flat, w.astype(jnp.float32).T, precision=jax.lax.Precision.HIGHEST)
    off = view.apply(jnp.zeros_like(kernel0), native).reshape(n, -1).astype(jnp.float32)
    out0 = off + (lin if gain is None else lin * gain)
  resid = values - out0

  def solve(w, C, k, r):
    if ridge is None:
      return insert_closed_form(w, C, k, jnp.matmul(k, w.T, precision=jax.lax.Precision.HIGHEST)
                                + r, rcond=floor)
    return insert_ridge(w, C, k, jnp.matmul(k, w.T, precision=jax.lax.Precision.HIGHEST) + r,
                        ridge, rcond=floor)

  if view.groups == 1:
    lam, directions = solve(w, C, flat, resid)  # a (lam, D) pair
  else:  # one exact insert per group, in the group's own keys
    lam, directions = _grouped_insert(view, solve, C, flat, resid)
  if gain is not None:
    lam = lam / jnp.reshape(gain, (-1, 1))
  if view.kind == "conv":
    lam = lam.reshape((1,) * (len(view.kernel_shape) - 2) + lam.shape)  # (1.., out, r)
  return make_edit(view.weight_path, lam, directions, kind=view.kind,
                   in_ndim=view.in_ndim, method=method, label=name, index=view.index,
                   settings={"address": [str(a) for a in view.address],
                             "patch": view.patch, "ridge": ridge, "floor": floor})


def _grouped_insert(view: MemoryView, solve, C, flat, resid):
  """Exact inserts per group of a grouped conv: ``(lam (C_out, G*n), D (G*n, T*C_in/G))``."""
  g, t = view.groups, view.taps if view.patch else 1
  cin = view.key_dim // t
  cig, cog = cin // g, view.value_dim // g
  n = flat.shape[0]
  idx = (np.arange(t)[:, None, None] * cin + np.arange(g)[None, :, None] * cig
         + np.arange(cig)[None, None, :])  # (T, G, C_in/G)
  idx = idx.transpose(1, 0, 2).reshape(g, t * cig)
  lams, dirs = [], []
  for j in range(g):
    ix = idx[j]
    lam, d = solve(jnp.zeros((cog, t * cig), jnp.float32), C[np.ix_(ix, ix)], flat[:, ix],
                   resid[:, j * cog:(j + 1) * cog])
    lams.append(lam)
    dirs.append(d)
  del n
  lam = jax.scipy.linalg.block_diag(*lams)  # (C_out, G*n)
  return lam, jnp.concatenate(dirs, 0)


def layer_bias(view: MemoryView):
  """The layer's ``bias`` parameter (``None`` when it has none).

  Example:
    >>> from flax import nnx
    >>> import memedit.layers as ml
    >>> from memedit.layers.edit import layer_bias
    >>> view = ml.memory_view(nnx.Sequential(nnx.Linear(3, 2, rngs=nnx.Rngs(0))), "layers/0")
    >>> layer_bias(view).tolist()
    [0.0, 0.0]
  """
  if view.framework == "nnx":
    b = getattr(view.layer_module, "bias", None)
    return None if b is None else b[...]
  return view.layer[1]["params"].get("bias")
