"""Sequential inserts: each edit solved with (or without) the null-space projection of
the keys to preserve, recorded in the edit log.

- :func:`sequential_insert`: a closed-form insert into a linear layer (``"matrix"`` or
  ``"dense"`` kernel). ``project=True``: AlphaEdit (:func:`memedit.sequential.
  insert_null_space`) with P from C plus the keys of the log's earlier active edits on
  that leaf; ``project=False``: the soft insert of MEMIT, ΔW = Rᵀ K (λC + KᵀK)⁻¹
  (:func:`memedit.insert_ridge`).
- :func:`sequential_directions`: for a layer whose Λ is solved by
  :func:`memedit.solve_lambda` (non-linear in its kernel, or any convolution), the
  directions D projected the same way before the solve (``project=False`` returns D).

Both check the new edit against the log (:func:`memedit.sequential.check_edit`) only
where they make it: :func:`sequential_insert` warns with
:class:`memedit.sequential.InterferenceWarning` before returning.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from memedit.checks import as_array, check_real, check_scalar, is_traced
from memedit.closed_form import insert_ridge
from memedit.edits import Edit, make_edit
from memedit.layouts import check_layout
from memedit.sequential.diagnostics import check_edit
from memedit.sequential.log import EditLog, check_log, log_append, log_keys
from memedit.sequential.nullspace import insert_null_space, null_space, project_directions
from memedit.tree import check_path, get_leaf

__all__ = ["sequential_directions", "sequential_insert"]


def _linear_weight(kernel, kind, in_ndim):
  """W (out, d) of a matrix or dense kernel, and its key dimension."""
  kernel = jnp.asarray(as_array(kernel, "params"))
  check_layout(kind, kernel.shape, in_ndim)
  if kind == "conv":
    raise ValueError("kind: expected 'matrix' or 'dense' for a closed-form insert (a linear "
                     "memory), got 'conv'; for a convolution project the directions with "
                     "sequential_directions and solve Λ with memedit.solve_lambda")
  if kind == "matrix":
    return kernel
  d = int(np.prod(kernel.shape[:in_ndim]))
  return kernel.reshape(d, -1).T


def sequential_insert(params: Any, log: EditLog, C: Any, keys: Any, values: Any, path: Any,
                      *, kind: str = "dense", in_ndim: int = 1, index: int | None = None,
                      project: bool = True, threshold: float | None = None,
                      key_weight: float | None = None, l2: float | None = None,
                      penalty: float | None = None, weights: Any = None,
                      label: str | None = None,
                      check: bool = True, base_params: Any = None) -> tuple[EditLog, Edit]:
  """Inserts (kᵢ → vᵢ) into the linear layer at ``path`` after the log's edits.

  ``project=True`` (AlphaEdit): P from ``null_space(C, K_p, key_weight·w_p, threshold)``
  with K_p the keys of the log's active edits on this leaf (w_p their weights), and
  ΔW = Rᵀ K P (A P + l2·I)⁻¹ (A = KᵀK + K_pᵀ diag(key_weight·w_p) K_p).
  ``project=False`` (MEMIT's soft insert): ΔW = Rᵀ K (λC + KᵀK)⁻¹, λ = ``penalty``.
  Either way the residuals R = V − K Wᵀ are taken at the current kernel W (``params``,
  the parameters with the log applied).

  Args:
    params: the current parameters (the log's active edits applied).
    log: the :class:`memedit.sequential.EditLog`.
    C: (d, d) second moment of the layer's keys.
    keys: (n, d) new keys. values: (n, out) their target values.
    path: the kernel leaf. kind, in_ndim: its layout ("matrix" or "dense").
    index: the layer of a stacked leaf (``leaf[index]`` is the kernel).
    project: project onto the null space of C and the earlier edits' keys.
    threshold: relative eigenvalue cutoff of :func:`memedit.sequential.null_space`
      (``project=True`` only; None: 1e-2).
    key_weight: ≥ 0, multiplies the earlier edits' key weights in the preserved set (see
      :func:`sequential_directions`; ``project=True`` only; None: 1).
    l2: AlphaEdit's weight of ‖ΔW‖² (``project=True`` only; None: 1).
    penalty: λ of the unprojected soft insert (``project=False`` only; None: 1).
      A setting of the other mode is refused rather than ignored.
    weights: (n,) weights of the new keys, recorded in the log (for later projections
      and diagnostics; the solve itself weighs every key 1).
    label: the edit's name (None: its fingerprint).
    check: run :func:`memedit.sequential.check_edit` (warns with
      :class:`memedit.sequential.InterferenceWarning`).
    base_params: the unedited parameters, for the norm and condition checks (None: the
      check reports the interference alone).

  Returns:
    ``(new_log, edit)``: the log with the edit appended (with its keys and values), and
    the :class:`memedit.Edit` (ΔW = Λ D, Λ (out, n), D (n, d)); apply it with
    :func:`memedit.apply_edit` or :func:`memedit.sequential.log_apply`.

  Raises:
    ValueError: ``project`` not a bool, a conv kernel, shapes that do not match, an
      ``index`` outside the stacked leaf or that disagrees with the log's edits of the
      leaf (see :func:`sequential_directions`), a setting the chosen mode does not use
      (``penalty`` with ``project=True``; ``threshold``, ``key_weight`` or ``l2`` with
      ``project=False``), or the errors of the solves.

  Example:
    >>> import jax.numpy as jnp
    >>> from memedit.sequential import log_apply, log_init, sequential_insert
    >>> params = {"k": jnp.zeros((3, 1))}           # a Dense kernel (in 3, out 1)
    >>> C = jnp.diag(jnp.array([1.0, 1e-4, 1e-4]))
    >>> log, e = sequential_insert(params, log_init(), C, jnp.array([[0.0, 10.0, 0.0]]),
    ...                            jnp.array([[1.0]]), ("k",), l2=1e-3)
    >>> W = log_apply(params, log)["k"][:, 0]
    >>> round(float(W @ jnp.array([0.0, 10.0, 0.0])), 3), float(W[0])
    (1.0, 0.0)
  """
  check_log(log)
  project = _flag(project, "project")
  unused = ({"penalty": penalty} if project else
            {"threshold": threshold, "key_weight": key_weight, "l2": l2})
  for name, value in unused.items():
    if value is not None:
      raise ValueError(f"{name}: applies to project={not project} only, got {name}={value!r} "
                       f"with project={bool(project)}")
  threshold = 1e-2 if threshold is None else threshold
  key_weight = 1.0 if key_weight is None else key_weight
  l2 = 1.0 if l2 is None else l2
  penalty = 1.0 if penalty is None else penalty
  path = check_path(path)
  _check_stacking(log, path, index)
  kernel = as_array(_layer(get_leaf(params, path), path, index), "params")
  check_real(kernel, f"params at {path!r}")
  if not jnp.issubdtype(jnp.result_type(kernel), jnp.inexact):
    raise ValueError(f"params: expected a floating-point kernel at {path!r}, got "
                     f"{jnp.result_type(kernel)} (an edit cannot be written into integers)")
  W = _linear_weight(kernel, kind, in_ndim)
  _check_C(C, W.shape[1])
  settings = {"project": bool(project)}
  if project:
    pk, pw = _preserved(log, path, index, key_weight, W.shape[1])
    ns = null_space(C, pk, pw, threshold=threshold)
    sol = insert_null_space(W, keys, values, ns.P, pk, pw, l2=l2)
    method = "alphaedit"
    # Under jax.jit the null space's dimension is traced: the settings (static) omit it.
    settings.update(threshold=float(threshold), key_weight=float(key_weight), l2=float(l2),
                    null_dim=None if is_traced(ns.dim) else int(ns.dim),
                    preserved_keys=0 if pk is None else int(pk.shape[0]))
  else:
    sol = insert_ridge(W, C, keys, values, penalty)
    method = "ridge"
    settings.update(penalty=float(penalty))
  _finite(sol)
  edit = make_edit(path, sol.lam, sol.D, kind=kind, in_ndim=in_ndim, method=method,
                   settings=settings, label=label, index=index)
  if check:
    check_edit(log, edit, params=base_params)
  return log_append(log, edit, keys, values, weights=weights), edit


def _flag(value, name) -> bool:
  """A bool setting: a string such as "no" or None would otherwise pick a mode by its
  truth value."""
  if not isinstance(value, (bool, np.bool_)):
    raise ValueError(f"{name}: expected True or False, got {value!r}")
  return bool(value)


def _layer(leaf, path, index):
  """The kernel: the leaf, or its layer ``index`` (checked: JAX clamps indices)."""
  if index is None:
    return leaf
  shape = tuple(np.shape(leaf))
  if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or not (
      shape and 0 <= index < shape[0]):
    raise ValueError(f"index: expected None or a layer 0 <= index < "
                     f"{shape[0] if shape else 0} of the stacked leaf {shape} at {path!r}, "
                     f"got {index!r}")
  return jnp.asarray(as_array(leaf, "params"))[int(index)]


def _check_C(C, d) -> None:
  """C's shape against the layer's key dimension d (before the solves name P or keys)."""
  if tuple(np.shape(C)) != (d, d):
    raise ValueError(f"C: expected shape ({d}, {d}) (the layer's key dimension), got "
                     f"{tuple(np.shape(C))}")


def _preserved(log, path, index, key_weight, d):
  """The log's keys on the leaf and their weights times ``key_weight`` (None: none),
  checked against the layer's key dimension ``d``."""
  check_scalar(key_weight, "key_weight")
  pk, pw = log_keys(log, path, index=index)
  if pk.shape[0] == 0:
    return None, None
  if pk.shape[1] != d:
    where = f"{path!r}" if index is None else f"{path!r}[{index}]"
    raise ValueError(f"log: expected the earlier edits on {where} to have keys of the "
                     f"layer's dimension {d}, got keys of dimension {pk.shape[1]}; is the "
                     f"log of another model?")
  if is_traced(pw, key_weight):
    return pk, pw * jnp.float32(key_weight)
  # on the host: no program per number of preserved keys
  return pk, jax.device_put(np.asarray(pw) * np.float32(np.asarray(key_weight)))


def _check_stacking(log, path, index) -> None:
  """Refuses an ``index`` that disagrees with the log's edits of the leaf at ``path``: a
  layer of a leaf they edit unstacked (index None), or no layer of one they edit stacked;
  the log's keys on the leaf would otherwise be left out of the preserved set."""
  if index is not None and (isinstance(index, bool)
                            or not isinstance(index, (int, np.integer)) or index < 0):
    raise ValueError(f"index: expected None or a layer >= 0 of the stacked leaf at "
                     f"{path!r}, got {index!r}")
  for i, entry in enumerate(log.entries):
    e = entry.edit
    if e.path != path or (e.index is None) == (index is None):
      continue
    if index is not None:
      raise ValueError(f"index: expected None for the leaf at {path!r}, which the log's "
                       f"edits hold unstacked (entry {i}, {e.name!r}, has no index), got "
                       f"{index!r}")
    raise ValueError(f"index: expected the layer of the stacked leaf at {path!r}, which the "
                     f"log's edits hold stacked (entry {i}, {e.name!r}, has index {e.index}), "
                     f"got None")


def _finite(sol) -> None:
  for name, a in (("lam", sol.lam), ("D", sol.D)):
    if not isinstance(a, jax.core.Tracer) and not np.isfinite(np.asarray(a)).all():
      raise ValueError(f"{name}: expected finite factors from the insert, got NaN or inf "
                       "(check that C, the keys and the values are finite)")


def sequential_directions(log: EditLog, C: Any, D: Any, path: Any, *,
                          index: int | None = None, project: bool = True,
                          threshold: float = 1e-2, key_weight: float = 1.0,
                          orthonormalize: bool = True) -> jax.Array:
  """The directions of the next edit of the leaf at ``path``, projected for the Λ solve.

  ``project=True``: D ← D P (re-orthonormalised) with P = ``null_space(C, K_p,
  key_weight·w_p, threshold).P``, K_p the keys of the log's active edits on this leaf
  (w_p their weights), so that the solved ΔK(Λ, D) reads only the part of a key outside
  the preserved keys' span. ``project=False``: D unchanged.

  ``key_weight`` sets how tightly the earlier edits' keys are protected relative to C:
  along every direction u of the null space, uᵀk ≤ √(threshold·λ_max(C) / (key_weight·w))
  for an earlier key k of weight w. C is a mean and the keys a sum, so with the default
  1 one key counts as a direction of C with eigenvalue ‖k‖²; a larger weight narrows the
  null space only by the directions in which the earlier keys are small.

  Args:
    log: the :class:`memedit.sequential.EditLog`.
    C: (d, d) second moment of the layer's keys.
    D: (r, d) directions (e.g. :func:`memedit.context_directions`).
    path: the kernel leaf. index: the layer of a stacked leaf.
    project: project onto the null space.
    threshold: relative eigenvalue cutoff (:func:`memedit.sequential.null_space`).
    key_weight: ≥ 0, multiplies the earlier edits' key weights in the preserved set.
    orthonormalize: see :func:`memedit.sequential.project_directions`.

  Returns:
    (r, d) directions for :func:`memedit.solve_lambda`.

  Raises:
    ValueError: the errors of :func:`memedit.sequential.project_directions` (directions
      inside the preserved span), shapes that do not match, or an ``index`` that
      disagrees with the log's edits of the leaf (a layer of a leaf they edit unstacked,
      or None for one they edit stacked).

  Example:
    >>> import jax.numpy as jnp, memedit
    >>> from memedit.sequential import log_append, log_init, sequential_directions
    >>> e = memedit.make_edit(("k",), jnp.ones((2, 1)), jnp.array([[0, 1.0, 0]]), label="a")
    >>> log = log_append(log_init(), e, jnp.array([[0.0, 1.0, 0.0]]))
    >>> C = jnp.diag(jnp.array([1.0, 1e-4, 1e-4]))
    >>> D = sequential_directions(log, C, jnp.array([[1.0, 1.0, 1.0]]), ("k",))
    >>> D.round(4).tolist() == [[0.0, 0.0, 1.0]]
    True
  """
  check_log(log)
  project = _flag(project, "project")
  path = check_path(path)
  _check_stacking(log, path, index)
  D = jnp.asarray(as_array(D, "D"))
  if not project:
    return D
  if D.ndim != 2 or D.shape[0] < 1 or D.shape[1] < 1:
    raise ValueError(f"D: expected shape (r, d) with r ≥ 1 directions of dimension d ≥ 1, "
                     f"got {tuple(D.shape)}")
  _check_C(C, D.shape[1])
  pk, pw = _preserved(log, path, index, key_weight, D.shape[1])
  ns = null_space(C, pk, pw, threshold=threshold)
  return project_directions(D, ns.P, orthonormalize=orthonormalize)
