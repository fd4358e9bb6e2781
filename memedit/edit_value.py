"""The :class:`Edit` value: the factors (Λ, D) of ΔK(Λ, D), where they apply, and how.

An :class:`Edit` is a frozen pytree whose leaves are Λ and D; the path of the kernel leaf,
its layout, the provenance (method, settings, label) and, for a leaf stacked over a layer
axis, the layer index are static metadata. :func:`make_edit` builds a validated one and
:func:`edit_delta` gives the ΔK it adds to a kernel. Applying and reverting edits is
:mod:`memedit.edits`' business (which re-exports these names), saving and loading
:mod:`memedit.edit_files`'.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from memedit.checks import as_array, check_finite, check_real
from memedit.layouts import LAYOUTS, kernel_delta
from memedit.tree import Path, check_path

__all__ = ["Edit", "NAN_FACTORS", "edit_delta", "make_edit"]

#: Appended to the error for non-finite factors: where they usually come from.
NAN_FACTORS = " (a solve whose checks failed under jax.jit returns NaN factors)"


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class Edit:
  """An edit ΔK(Λ, D) of the kernel leaf at ``path``: a frozen pytree.

  Λ and D are the pytree's leaves; everything else is static metadata. Build edits with
  :func:`make_edit` (which validates them); ``dataclasses.replace`` gives a changed copy.

  Identity. ``fingerprint`` is a hash of the edit's content (path, layout, provenance,
  index, and Λ and D's shapes and bytes), computed when asked, so it always describes the
  current content. ``name`` is the ``label`` given to :func:`make_edit`, or else the
  fingerprint; an :class:`EditHistory` tells edits apart by name. Under ``jax.jit`` Λ and
  D are traced and cannot be hashed: an unlabelled edit that entered the program as an
  argument keeps the fingerprint of the values it was called with (carried as static
  metadata, so a call with other values compiles anew); a labelled one is named by its
  label alone, so a program taking it compiles once for all values of its shapes.

  Equality and hashing are by identity (``eq=False``): comparing array fields with ``==``
  would be elementwise and have no truth value. Two edits with the same content are
  distinct objects with equal fingerprints; compare ``a.fingerprint == b.fingerprint``.

  Attributes:
    lam: Λ, shaped ``lambda_shape(kernel.shape, r, kind, in_ndim)``.
    D: (r, d), the edit subspace.
    path: tuple of str/int keys of the kernel leaf.
    kind: kernel layout, one of :data:`memedit.layouts.LAYOUTS`.
    in_ndim: leading input axes of a dense kernel.
    method: how the edit was made (free text, e.g. "insert/zca").
    settings_json: the settings that made it, as canonical JSON (see ``settings``).
    label: a name chosen by the caller, or None to be named by the fingerprint.
    index: for a leaf stacked over a leading layer axis (the layers of a scanned stack,
      ``(L, *kernel)``), the layer the edit changes: ΔK, laid out like one layer's
      kernel, is added to ``leaf[index]`` alone; ``None``: the whole leaf.

  Example:
    >>> import dataclasses, jax, jax.numpy as jnp, memedit
    >>> e = memedit.make_edit(("kernel",), jnp.ones((2, 1)), jnp.ones((1, 3)))
    >>> [x.shape for x in jax.tree_util.tree_leaves(e)]
    [(2, 1), (1, 3)]
    >>> dataclasses.replace(e, lam=2 * e.lam).name == e.name  # the name follows the content
    False
  """

  lam: Any
  D: Any
  path: Path
  kind: str = "dense"
  in_ndim: int = 1
  method: str = ""
  settings_json: str = "{}"
  label: str | None = None
  index: int | None = None

  def __post_init__(self):
    object.__setattr__(self, "path", tuple(self.path))
    object.__setattr__(self, "in_ndim", int(self.in_ndim))
    if self.index is not None:
      object.__setattr__(self, "index", int(self.index))

  @property
  def settings(self) -> dict:
    """The settings that made the edit, as a dict."""
    return json.loads(self.settings_json)

  @property
  def rank(self) -> int:
    """r, the number of rows of D."""
    return int(np.shape(self.D)[0])

  @property
  def fingerprint(self) -> str:
    """16 hex digits of the sha256 of the edit's content (see the class docstring).

    Raises:
      ValueError: Λ or D is traced and the edit did not enter the trace as an argument.
    """
    cached = self.__dict__.get("_fingerprint")
    if cached is not None:
      return cached
    if _concrete(self.lam) and _concrete(self.D):
      fp = _content_hash(self)
      if isinstance(self.lam, jax.Array) and isinstance(self.D, jax.Array):
        object.__setattr__(self, "_fingerprint", fp)  # immutable leaves: cache it
      return fp
    traced = self.__dict__.get("_traced_fingerprint")
    if traced is None:
      raise ValueError("edit: expected concrete Λ and D to fingerprint (or an edit passed "
                       "into jax.jit as an argument, or one with a label), got traced values")
    return traced

  @property
  def name(self) -> str:
    """``label`` when given, else ``fingerprint``."""
    return self.label if self.label is not None else self.fingerprint

  def __repr__(self):
    try:
      name = self.name
    except ValueError:
      name = "<traced>"
    index = "" if self.index is None else f", index={self.index}"
    return (f"Edit(name={name!r}, path={self.path!r}{index}, kind={self.kind!r}, "
            f"rank={self.rank}, lam={tuple(np.shape(self.lam))}, method={self.method!r})")


_STATIC = ("path", "kind", "in_ndim", "method", "settings_json", "label", "index")


def _concrete(x) -> bool:
  return isinstance(x, (np.ndarray, np.generic)) or (
      isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer))


def _content_hash(edit: Edit) -> str:
  h = hashlib.sha256(json.dumps(
      [list(edit.path), edit.kind, edit.in_ndim, edit.method, edit.settings_json]
      + ([] if edit.index is None else [edit.index])).encode())
  for a in (edit.lam, edit.D):
    a = np.ascontiguousarray(np.asarray(a))
    h.update(str(a.shape).encode())
    h.update(a.tobytes())
  return h.hexdigest()[:16]


def _edit_flatten_with_keys(edit: Edit):
  # A labelled edit is named by its label: it carries no fingerprint through a trace, so
  # a compiled program taking it is reused for new Λ and D (and flattening does not copy
  # them to the host to hash them).
  fp = None
  if edit.label is None:
    try:
      fp = edit.fingerprint
    except ValueError:
      pass
  aux = tuple(getattr(edit, f) for f in _STATIC) + (fp,)
  keys = (jax.tree_util.GetAttrKey("lam"), jax.tree_util.GetAttrKey("D"))
  return tuple(zip(keys, (edit.lam, edit.D))), aux


def _edit_flatten(edit: Edit):
  children, aux = _edit_flatten_with_keys(edit)
  return tuple(c for _, c in children), aux


def _edit_unflatten(aux, children) -> Edit:
  edit = Edit(*children, *aux[:-1])
  if aux[-1] is not None:
    object.__setattr__(edit, "_traced_fingerprint", aux[-1])
  return edit


jax.tree_util.register_pytree_with_keys(Edit, _edit_flatten_with_keys, _edit_unflatten,
                                        _edit_flatten)


def make_edit(path: Path, lam: Any, D: Any, *, kind: str = "dense", in_ndim: int = 1,
              method: str = "", settings: dict | None = None, label: str | None = None,
              index: int | None = None) -> Edit:
  """Builds a validated :class:`Edit` of float32 factors.

  Args:
    path: key path of the kernel leaf.
    lam: Λ. D: (r, d), the edit subspace.
    kind, in_ndim: kernel layout (see :mod:`memedit.layouts`).
    method, settings: provenance recorded with the edit (settings: a JSON-serialisable
      dict).
    label: the edit's name; None (default) names it by its content fingerprint.
    index: the layer of a leaf stacked over a leading layer axis ``(L, *kernel)`` that the
      edit changes (Λ and D then describe one layer's kernel); ``None``: the whole leaf.

  Returns:
    The :class:`Edit`.

  Example:
    >>> import jax.numpy as jnp, memedit
    >>> e = memedit.make_edit(("params", "kernel"), jnp.ones((2, 1)), jnp.ones((1, 3)))
    >>> e.rank, e.name == e.fingerprint, len(e.name)
    (1, True, 16)
  """
  path = check_path(path)
  if kind not in LAYOUTS:
    raise ValueError(f"kind: expected one of {LAYOUTS}, got {kind!r}")
  lam = jnp.asarray(as_array(lam, "lam"))
  D = jnp.asarray(as_array(D, "D"))
  check_real(lam, "lam")
  check_real(D, "D")
  lam, D = lam.astype(jnp.float32), D.astype(jnp.float32)
  if D.ndim != 2:
    raise ValueError(f"D: expected shape (r, d), got {tuple(D.shape)}")
  if lam.ndim < 2 or lam.shape[-1] != D.shape[0]:
    raise ValueError(f"lam: expected shape (..., {D.shape[0]}) for rank "
                     f"{D.shape[0]}, got {tuple(lam.shape)}")
  check_finite(lam, "lam", NAN_FACTORS)
  check_finite(D, "D", NAN_FACTORS)
  try:
    settings_json = json.dumps(settings or {}, sort_keys=True)
  except TypeError as e:
    raise ValueError(f"settings: expected a JSON-serialisable dict, got {settings!r}") from e
  if index is not None and (isinstance(index, bool) or not isinstance(index, (int, np.integer))
                            or index < 0):
    raise ValueError(f"index: expected None or a non-negative int (a layer of a stacked "
                     f"leaf), got {index!r}")
  if label is not None and not isinstance(label, str):
    raise ValueError(f"label: expected None or a str, got {label!r}")
  if isinstance(in_ndim, bool) or not isinstance(in_ndim, (int, np.integer)) or in_ndim < 1:
    raise ValueError(f"in_ndim: expected a positive int (the leading input axes of a dense "
                     f"kernel), got {in_ndim!r}")
  return Edit(lam, D, path, kind, int(in_ndim), str(method), settings_json, label, index)


def edit_delta(edit: Edit, kernel_shape) -> jax.Array:
  """ΔK of ``edit`` for a kernel of ``kernel_shape``: :func:`memedit.kernel_delta` of its
  factors and layout.

  An edit with an ``index`` changes one layer of a stacked leaf ``(L, *kernel)``: its ΔK
  (one layer's) lies at ``[index]`` and every other entry is ``-0.0``, which added to any
  float leaves it bit for bit as it was (``x + (-0.0) == x``, also for ``x = -0.0``), so
  the other layers keep their bits.

  Args:
    edit: an :class:`Edit`.
    kernel_shape: the kernel's shape (the whole stacked leaf's for an edit with an index).

  Returns:
    float32 array of ``kernel_shape``.

  Raises:
    ValueError: the edit's index is outside the leaf's layer axis.

  Example:
    >>> import jax.numpy as jnp, memedit
    >>> e = memedit.make_edit(("k",), jnp.ones((2, 1)), jnp.array([[1.0, 0.0, 0.0]]))
    >>> memedit.edit_delta(e, (3, 2))[0]
    Array([1., 1.], dtype=float32)
  """
  index = edit.index
  if index is None:
    return kernel_delta(edit.lam, edit.D, kernel_shape, edit.kind, edit.in_ndim)
  shape = tuple(int(s) for s in kernel_shape)
  if not shape or not 0 <= index < shape[0]:
    size = shape[0] if shape else 0
    raise ValueError(f"index: expected a layer 0 <= index < {size} of the stacked leaf "
                     f"{shape} at {edit.path!r}, got {index}")
  try:
    delta = kernel_delta(edit.lam, edit.D, shape[1:], edit.kind, edit.in_ndim)
  except ValueError as e:
    raise ValueError(
        f"index: expected a leaf stacked over a leading layer axis whose layers are "
        f"{edit.kind} kernels matching the edit (index {index}), got the leaf {shape} at "
        f"{edit.path!r}, whose layer {shape[1:]} does not fit: {e}") from None
  return jnp.full(shape, -0.0, delta.dtype).at[index].set(delta)
