"""Kernel layouts: where the factors (Λ, D) of an edit ΔK(Λ, D) go in a kernel.

A layout (``kind``, one of :data:`LAYOUTS`) says how a kernel's axes map to the keys it
reads (length d, the rows of D) and the values it writes:

- ``"matrix"``: W of shape (out, in), the math layout; ΔW = Λ D with Λ (out, r), D (r, in).
- ``"dense"``: a Flax kernel of shape (*in_dims, *out_dims) with ``in_ndim`` leading input
  axes (Dense, DenseGeneral, Einsum); with the kernel flattened to (in, out),
  ΔK = Dᵀ Λᵀ, Λ (prod(out_dims), r), D (r, prod(in_dims)).
- ``"conv"``: a convolution kernel (*taps, C_in, C_out) with 1, 2 or 3 spatial axes
  (HWIO (kh, kw, C_in, C_out) in 2-D) and a Λ per tap:
  ΔK[y, x, i, o] = Σ_d Λ[y, x, o, d] D[d, i], Λ (kh, kw, C_out, r) (1-D: Λ (k, C_out, r),
  3-D: Λ (kd, kh, kw, C_out, r)).

Grouped convolutions (kernel (*taps, C_in/G, C_out)) use these layouts on their kernel;
:func:`grouped_factors` turns factors over the full C_in keys into such factors.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from memedit.checks import as_array, check_positive_int

__all__ = ["LAYOUTS", "check_layout", "grouped_factors", "kernel_delta", "key_dim",
           "lambda_shape"]

HIGHEST = lax.Precision.HIGHEST
#: Kernel layouts (the ``kind`` of an edit), see the module docstring.
LAYOUTS = ("matrix", "dense", "conv")


def _shape(kernel_shape) -> tuple[int, ...]:
  """``kernel_shape`` as a tuple of Python ints, else ValueError (a shape is static: a
  tuple of non-negative ints, never a traced value)."""
  try:
    dims = tuple(kernel_shape)
  except TypeError:
    dims = None
  if dims is None or not all(isinstance(s, (int, np.integer)) and not isinstance(s, bool)
                             and s >= 0 for s in dims):
    raise ValueError(f"kernel_shape: expected a tuple of non-negative ints (the kernel's "
                     f"static shape, e.g. kernel.shape), got {kernel_shape!r}")
  return tuple(int(s) for s in dims)


def check_layout(kind: str, kernel_shape: tuple[int, ...], in_ndim: int = 1) -> None:
  """Checks that ``kind`` is one of :data:`LAYOUTS` and fits a kernel of ``kernel_shape``.

  Args:
    kind: "matrix", "dense" or "conv".
    kernel_shape: the kernel's shape.
    in_ndim: leading input axes of a dense kernel.

  Raises:
    ValueError: an unknown layout, a kernel shape that is not a tuple of non-negative ints
      or that the layout cannot describe, or an ``in_ndim`` that is not an int (bad static
      settings are refused here, also when called under ``jax.jit``).

  Example:
    >>> check_layout("conv", (3, 3, 16, 32))
    >>> check_layout("matrix", (3, 3, 16, 32))
    Traceback (most recent call last):
    ...
    ValueError: kernel: expected shape (out, in) for kind 'matrix', got (3, 3, 16, 32)
  """
  if not isinstance(kind, str) or kind not in LAYOUTS:
    raise ValueError(f"kind: expected one of {LAYOUTS}, got {kind!r}")
  kernel_shape = _shape(kernel_shape)
  if isinstance(in_ndim, bool) or not isinstance(in_ndim, (int, np.integer)):
    raise ValueError(f"in_ndim: expected an int (the leading input axes of a dense kernel; "
                     f"a static setting, not a traced value), got {in_ndim!r}")
  nd = len(kernel_shape)
  if kind == "matrix" and nd != 2:
    raise ValueError(f"kernel: expected shape (out, in) for kind 'matrix', got {tuple(kernel_shape)}")
  if kind == "conv" and nd < 3:
    raise ValueError(f"kernel: expected an HWIO shape (kh, kw, C_in, C_out) (or with another "
                     f"number of spatial dims) for kind 'conv', got {tuple(kernel_shape)}")
  if kind == "dense" and not 1 <= in_ndim < nd:
    raise ValueError(f"in_ndim: expected 1..{nd - 1} for a dense kernel of shape "
                     f"{tuple(kernel_shape)}, got {in_ndim}")


def key_dim(kernel_shape, kind: str = "dense", in_ndim: int = 1) -> int:
  """The key dimension d of a kernel: the length of D's rows.

  Args:
    kernel_shape: the kernel's shape.
    kind: "matrix" (d = in of (out, in)), "dense" (d = prod(in_dims)) or "conv"
      (d = C_in of HWIO).
    in_ndim: leading input axes of a dense kernel.

  Returns:
    d as an int.

  Example:
    >>> import memedit
    >>> memedit.key_dim((3, 3, 16, 32), "conv"), memedit.key_dim((8, 4, 2), "dense", in_ndim=2)
    (16, 32)
  """
  check_layout(kind, kernel_shape, in_ndim)
  kernel_shape = _shape(kernel_shape)
  if kind == "matrix":
    return int(kernel_shape[1])
  if kind == "conv":
    return int(kernel_shape[-2])
  return int(np.prod(kernel_shape[:in_ndim]))


def lambda_shape(kernel_shape, rank: int, kind: str = "dense", in_ndim: int = 1) -> tuple:
  """Shape of Λ for a kernel of ``kernel_shape`` and a rank-r subspace.

  Args:
    kernel_shape: the kernel's shape.
    rank: r, the number of rows of D.
    kind: "matrix", "dense" or "conv".
    in_ndim: leading input axes of a dense kernel.

  Returns:
    matrix: (out, r); dense: (prod(out_dims), r); conv: (*spatial, C_out, r).

  Example:
    >>> import memedit
    >>> memedit.lambda_shape((3, 3, 16, 32), 2, kind="conv")
    (3, 3, 32, 2)
  """
  check_layout(kind, kernel_shape, in_ndim)
  kernel_shape = _shape(kernel_shape)
  if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank < 0:
    raise ValueError(f"rank: expected a non-negative int (the number of rows of D; a static "
                     f"setting, not a traced value), got {rank!r}")
  rank = int(rank)
  if kind == "matrix":
    return (int(kernel_shape[0]), rank)
  if kind == "conv":
    return tuple(int(s) for s in kernel_shape[:-2]) + (int(kernel_shape[-1]), rank)
  return (int(np.prod(kernel_shape[in_ndim:])), rank)


def kernel_delta(lam: Any, D: Any, kernel_shape, kind: str = "dense",
                 in_ndim: int = 1) -> jax.Array:
  """The kernel change ΔK(Λ, D) = Λ D laid out like the kernel.

  Shapes are checked (at trace time under ``jax.jit``); the values are not.

  Args:
    lam: Λ of shape ``lambda_shape(kernel_shape, r, kind, in_ndim)``.
    D: (r, d), the edit subspace.
    kernel_shape: the kernel's shape.
    kind: "matrix", "dense" or "conv" (see the module docstring).
    in_ndim: leading input axes of a dense kernel.

  Returns:
    ΔK with shape ``kernel_shape``.

  Example:
    >>> import jax.numpy as jnp, memedit
    >>> memedit.kernel_delta(jnp.ones((2, 1)), jnp.array([[1.0, 0.0, 0.0]]), (3, 2)).shape
    (3, 2)
  """
  kernel_shape = _shape(kernel_shape)
  lam = jnp.asarray(as_array(lam, "lam"))
  D = jnp.asarray(as_array(D, "D"))
  d = key_dim(kernel_shape, kind, in_ndim)
  if D.ndim != 2 or D.shape[1] != d:
    raise ValueError(f"D: expected shape (r, {d}) for a kernel of shape {kernel_shape}, "
                     f"got {tuple(D.shape)}")
  want = lambda_shape(kernel_shape, D.shape[0], kind, in_ndim)
  if tuple(lam.shape) != want:
    raise ValueError(f"lam: expected shape {want}, got {tuple(lam.shape)}")
  if kind == "matrix":
    return jnp.matmul(lam, D, precision=HIGHEST)
  if kind == "conv":
    return jnp.einsum("...od,di->...io", lam, D, precision=HIGHEST)
  flat = jnp.einsum("od,di->io", lam, D, precision=HIGHEST)
  return flat.reshape(kernel_shape)


def grouped_factors(lam: Any, D: Any, groups: int, taps: int = 1
                    ) -> tuple[jax.Array, jax.Array]:
  """Factors of a grouped convolution's kernel edit, from factors over its full keys.

  A convolution with ``G`` feature groups acts as a block-diagonal dense kernel: the
  output channels of group g read only the input channels of group g. For factors Λ
  (..., C_out, r) and D (r, taps·C_in) over the full keys (tap-major, channel-minor), its
  edit keeps the diagonal blocks of Λ D; on the grouped kernel (*spatial, C_in/G, C_out)
  that is ΔK(Λ_G, D_G) of rank G·r with

    D_G[g·r + d, (t, i)] = D[d, (t, g·C_in/G + i)],  Λ_G[..., o, g·r + d] = Λ[..., o, d]·[o ∈ g].

  With ``taps=1`` (per-pixel keys) use them with ``kind="conv"`` (Λ (*spatial, C_out, r));
  with ``taps = prod(kernel_size)`` (patch keys) with ``kind="dense"`` and ``in_ndim =
  len(kernel_size) + 1``. To solve for Λ_G directly (:func:`memedit.solve_lambda`), pass
  ``lam_mask = grouped_factors(jnp.ones(lam_shape), D, G)[0]``: Λ_G is then confined to
  its diagonal blocks.

  Args:
    lam: Λ (..., C_out, r).
    D: (r, taps·C_in).
    groups: G, the layer's ``feature_group_count``.
    taps: kernel taps per key (1 for per-pixel keys).

  Returns:
    ``(lam_G, D_G)``: (..., C_out, G·r) and (G·r, taps·C_in/G).

  Example:
    >>> import jax.numpy as jnp, memedit
    >>> lam_g, d_g = memedit.grouped_factors(jnp.ones((3, 4, 1)), jnp.ones((1, 4)), groups=4)
    >>> lam_g.shape, d_g.shape
    ((3, 4, 4), (4, 1))
  """
  lam = jnp.asarray(lam)
  D = jnp.asarray(D)
  if D.ndim != 2 or lam.ndim < 2 or lam.shape[-1] != D.shape[0]:
    raise ValueError(f"lam, D: expected shapes (..., C_out, r) and (r, d), got "
                     f"{tuple(lam.shape)} and {tuple(D.shape)}")
  r, d = D.shape
  cout = lam.shape[-2]
  groups = check_positive_int(groups, "groups")
  taps = check_positive_int(taps, "taps")
  if d % (taps * groups) or cout % groups:
    raise ValueError(f"groups: expected {groups} to divide C_out {cout} and the key's "
                     f"{d // max(taps, 1)} channels ({d} = taps {taps} x C_in), got "
                     f"C_out {cout} and key dimension {d}")
  cig = d // taps // groups
  dg = D.reshape(r, taps, groups, cig).transpose(2, 0, 1, 3).reshape(groups * r, taps * cig)
  l = lam.reshape(lam.shape[:-2] + (groups, cout // groups, r))
  lg = jnp.einsum("...gor,gh->...gohr", l, jnp.eye(groups, dtype=lam.dtype))
  return lg.reshape(lam.shape[:-2] + (cout, groups * r)), dg
