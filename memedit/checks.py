"""Argument checks and dtype rules shared by memedit's modules.

Every function here either returns a normalised value or raises a ``ValueError`` that
names the argument, what was expected and what was received. Checks of array *values*
run only on concrete inputs: a value traced under ``jax.jit`` cannot be inspected, and
the functions that accept traced inputs check them inside the program instead.

Weights. Sample weights are aligned with the keys' *leading* axes, numpy-style from the
left: weights of shape (a₀, …, a_{m−1}) on keys of leading shape (n₀, …, n_{p−1}) fit
when m ≤ p and aᵢ ∈ {1, nᵢ}, and are repeated over the remaining axes.

Dtypes. Computation happens in float64 for float64 inputs (with ``jax_enable_x64``;
without it JAX holds float64 data as float32) and in float32 for everything else.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["TINY", "as_array", "explicit_sharding", "check_covariance", "check_finite", "check_positive_int",
           "check_real", "check_scalar", "compute_dtype", "covariance_arg", "expand_weights",
           "float_dtype", "is_traced", "weights_error", "weights_fit"]

#: The smallest positive value divisions and eigenvalue floors use (1e-30).
TINY = 1e-30


def as_array(x: Any, name: str) -> Any:
  """User data ``x`` ready for ``jnp.asarray``: numbers in native byte order, else raises.

  A numpy array of numbers (bool, int, uint, float including float16 and ml_dtypes'
  bfloat16 or float8, complex) in non-native byte order (e.g. ``'>f4'``, as read from
  FITS or other big-endian files) comes back as a copy in native order with the same
  values and the same dtype otherwise; one of any other dtype (object, str, bytes,
  structured, datetime or timedelta) is refused. A ``jax.Array`` or a traced value is
  returned as it is (never copied or inspected), as is a valid array in native order.
  Lists and scalars are inspected through ``np.asarray`` and returned unchanged when
  they hold numbers (so ``jnp.asarray`` gives them the dtype it always has); lists that
  hold JAX arrays are returned unchanged. The caller converts: ``jnp.asarray(as_array(x,
  "x"))``, or keeps host data on the host.

  Args:
    x: an array, a list of numbers or a scalar, as passed by a user.
    name: the argument's name in the error message.

  Returns:
    ``x`` itself, or a native-order numpy copy of it when its byte order is not native.

  Raises:
    ValueError: ``x`` holds something other than numbers.

  Example:
    >>> import numpy as np
    >>> x = np.array([1.5, 2.0], ">f4")
    >>> y = as_array(x, "keys")
    >>> y.dtype.isnative, y.dtype == np.float32, y.tolist()
    (True, True, [1.5, 2.0])
    >>> as_array(np.array(["a", "b"]), "keys")
    Traceback (most recent call last):
    ...
    ValueError: keys: expected an array of numbers (float, int or bool), got dtype <U1
  """
  if isinstance(x, (jax.Array, jax.core.Tracer)):
    return x
  if isinstance(x, (np.ndarray, np.generic)):
    a = x
  elif any(isinstance(leaf, (jax.Array, jax.core.Tracer))
           for leaf in jax.tree_util.tree_leaves(x)):
    return x  # a list of JAX arrays (perhaps traced): jnp.asarray stacks them
  else:
    a = np.asarray(x)
  dt = a.dtype
  # ml_dtypes' floats (bfloat16, float8…) have numpy kind 'V' and are numbers to JAX;
  # timedelta64 counts as a number to issubdtype, and is refused by its kind.
  if dt.kind in "mM" or not (jnp.issubdtype(dt, jnp.number) or jnp.issubdtype(dt, jnp.bool_)):
    raise ValueError(f"{name}: expected an array of numbers (float, int or bool), got dtype "
                     f"{dt}")
  if not dt.isnative:
    return a.astype(dt.newbyteorder("="))
  return x


def check_positive_int(value: Any, name: str) -> int:
  """Returns ``value`` as a Python int if it is an integer ≥ 1, else raises.

  Python ints and numpy integers are accepted; bools, floats (even 3.0) and anything
  else are refused.

  Args:
    value: the setting to check.
    name: the argument's name in the error message.

  Returns:
    ``int(value)``.

  Raises:
    ValueError: ``value`` is not an integer or is below 1.

  Example:
    >>> import numpy as np
    >>> check_positive_int(np.int64(3), "steps")
    3
    >>> check_positive_int(0, "steps")
    Traceback (most recent call last):
    ...
    ValueError: steps: expected a positive int, got 0
  """
  if isinstance(value, jax.core.Tracer):
    raise ValueError(f"{name}: expected a positive int, got a traced value {value!r}: it is "
                     f"a static setting (under jax.jit, pass it by static_argnames or close "
                     f"over it)")
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise ValueError(f"{name}: expected a positive int, got {value!r}")
  return int(value)


def check_scalar(value: Any, name: str, *, lo: float = 0.0, hi: float | None = None) -> None:
  """Checks a real scalar setting against lo ≤ value (< hi) when it is concrete.

  A number or a concrete () JAX/numpy array is checked; a traced value only has its
  shape checked (its range is checked inside the program by the caller).

  Args:
    value: the setting (int, float, or a () array).
    name: the argument's name in error messages.
    lo: the smallest allowed value (inclusive).
    hi: the bound the value must stay below (exclusive), or None for no bound.

  Raises:
    ValueError: not a real scalar, not finite, or out of range.

  Example:
    >>> check_scalar(1e-6, "rcond", hi=1.0)
    >>> check_scalar(-1.0, "ridge")
    Traceback (most recent call last):
    ...
    ValueError: ridge: expected a number ≥ 0.0, got -1.0
  """
  if isinstance(value, jax.core.Tracer):
    if np.ndim(value) != 0:
      raise ValueError(f"{name}: expected a scalar, got shape {tuple(np.shape(value))}")
    return
  want = f"a number in [{lo}, {hi})" if hi is not None else f"a number ≥ {lo}"
  if isinstance(value, bool) or np.ndim(value) != 0 or np.asarray(value).dtype.kind not in "iuf":
    raise ValueError(f"{name}: expected {want}, got {value!r}")
  v = float(np.asarray(value))
  if not np.isfinite(v) or v < lo or (hi is not None and v >= hi):
    raise ValueError(f"{name}: expected {want}, got {value!r}")


def check_covariance(C: Any, dim: int | None = None, name: str = "C") -> np.ndarray | None:
  """Validates a (d, d) second-moment matrix eagerly when it is concrete.

  Args:
    C: the (d, d) matrix.
    dim: the expected d, or None for any.
    name: the argument's name in error messages.

  Returns:
    C as a float64 numpy array, or None when C is traced (nothing but its shape is
    checked then).

  Raises:
    ValueError: wrong shape, non-finite entries, asymmetric, not positive semi-definite
      (an eigenvalue below −1e-5·λ_max), or no positive eigenvalue (e.g. all zero).

  Example:
    >>> import numpy as np
    >>> check_covariance(np.eye(2), 2)
    array([[1., 0.],
           [0., 1.]])
    >>> check_covariance(-np.eye(2))
    Traceback (most recent call last):
    ...
    ValueError: C: expected a positive semi-definite matrix, got smallest eigenvalue -1 (largest -1)
  """
  shape = tuple(np.shape(C))
  if len(shape) != 2 or shape[0] != shape[1] or (dim is not None and shape[0] != dim):
    want = f"({dim}, {dim})" if dim is not None else "(d, d)"
    raise ValueError(f"{name}: expected a square matrix of shape {want}, got {shape}")
  if isinstance(C, jax.core.Tracer):
    return None
  c = np.asarray(C, np.float64)
  if not np.all(np.isfinite(c)):
    raise ValueError(f"{name}: expected finite entries, got NaN or inf")
  scale = np.abs(c).max() or 1.0  # relative at any scale (a C of 1e-40 included)
  asym = np.abs(c - c.T).max() / scale
  if asym > 1e-4:
    raise ValueError(f"{name}: expected a symmetric matrix, got max |C - Cᵀ| / max |C| = {asym:.3g}")
  ev = np.linalg.eigvalsh(0.5 * (c + c.T))
  if ev[0] < -1e-5 * max(ev[-1], 0.0):
    raise ValueError(
        f"{name}: expected a positive semi-definite matrix, got smallest eigenvalue "
        f"{ev[0]:.3g} (largest {ev[-1]:.3g})")
  if ev[-1] <= 0:
    raise ValueError(
        f"{name}: expected a matrix with a positive eigenvalue, got largest eigenvalue "
        f"{ev[-1]:.3g} (an all-zero second moment: no keys, or only zero keys)")
  return c


def is_traced(*xs: Any) -> bool:
  """Whether any leaf of ``xs`` is a JAX tracer (eager checks skip traced values).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> seen = []
    >>> _ = jax.jit(lambda x: seen.append(is_traced({"a": x})) or x)(1.0)
    >>> is_traced(jnp.ones(2)), seen
    (False, [True])
  """
  return any(isinstance(x, jax.core.Tracer) for x in jax.tree_util.tree_leaves(xs))


def check_finite(x: Any, name: str, hint: str = "") -> None:
  """Raises when a concrete ``x`` holds NaN or ±inf; a traced ``x`` passes.

  ``hint`` is appended to the message (e.g. where such values come from).

  Example:
    >>> import numpy as np
    >>> check_finite(np.array([1.0, np.nan]), "keys")
    Traceback (most recent call last):
    ...
    ValueError: keys: expected finite values, got NaN or inf
  """
  if not isinstance(x, jax.core.Tracer) and not np.all(np.isfinite(np.asarray(x))):
    raise ValueError(f"{name}: expected finite values, got NaN or inf{hint}")


def covariance_arg(C: Any, name: str = "C") -> tuple[Any, int | None]:
  """``(C, d)``: a second-moment argument as an array (a list holding traced numbers
  becomes a traced array), checked to be real (:func:`check_real`), and its side d, or
  None when it is not a matrix (:func:`check_covariance` then names the shape).

  Example:
    >>> import numpy as np
    >>> covariance_arg([[2.0, 0.0], [0.0, 1.0]])[1]
    2
  """
  C = as_array(C, name)
  if is_traced(C):
    C = jnp.asarray(C)
  check_real(C, name)
  return C, (np.shape(C)[0] if np.ndim(C) == 2 else None)


def check_real(x: Any, name: str) -> None:
  """Raises when ``x`` (an array, traced or not, a list or a number) holds complex numbers.

  memedit computes in real floating point (see :func:`compute_dtype`): a complex input
  would lose its imaginary part there, so it is refused instead. Only the dtype is read,
  so traced values are checked too.

  Example:
    >>> import numpy as np
    >>> check_real(np.ones(2, np.float32), "keys")
    >>> check_real(np.ones(2, np.complex64), "keys")
    Traceback (most recent call last):
    ...
    ValueError: keys: expected real numbers (float, int or bool), got dtype complex64
  """
  if hasattr(x, "dtype"):
    dt = x.dtype
  else:  # a number, or a list of numbers or of (perhaps traced) JAX arrays
    leaves = jax.tree_util.tree_leaves(x)
    dt = jnp.result_type(*leaves) if leaves else np.asarray(x).dtype
  if jnp.issubdtype(dt, jnp.complexfloating):
    raise ValueError(f"{name}: expected real numbers (float, int or bool), got dtype {dt}")


def float_dtype(dtype: Any) -> np.dtype:
  """The dtype sums and solves are kept in for inputs of ``dtype``.

  float64 for float64 (when JAX has x64 enabled; otherwise JAX holds float64 data as
  float32), float32 for anything else (float16, bfloat16, integers, bool).

  Example:
    >>> import numpy as np
    >>> float_dtype(np.int32), float_dtype(np.float16)
    (dtype('float32'), dtype('float32'))
  """
  dt = jax.dtypes.canonicalize_dtype(dtype)
  return np.dtype(np.float64) if dt == np.float64 else np.dtype(np.float32)


def compute_dtype(*xs: Any) -> np.dtype:
  """The compute dtype for the arrays ``xs``: float64 when any is float64 (with x64),
  else float32 (see :func:`float_dtype`).

  Example:
    >>> import numpy as np
    >>> compute_dtype(np.ones(2, np.float16), [1, 2])
    dtype('float32')
  """
  dts = [float_dtype(x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype) for x in xs]
  return np.dtype(np.float64) if any(d == np.float64 for d in dts) else np.dtype(np.float32)


def weights_fit(weights_shape: tuple[int, ...], lead: tuple[int, ...]) -> bool:
  """Whether weights of ``weights_shape`` fit keys of leading shape ``lead``.

  They fit when aligned with the leading axes from the left, each axis of size 1 or of
  the keys' size: len(weights_shape) ≤ len(lead) and aᵢ ∈ {1, nᵢ}.

  Example:
    >>> weights_fit((4,), (4, 8, 8)), weights_fit((4, 1), (4, 8, 8)), weights_fit((8,), (4, 8))
    (True, True, False)
  """
  ws, lead = tuple(weights_shape), tuple(lead)
  return len(ws) <= len(lead) and all(a == 1 or a == b for a, b in zip(ws, lead))


def weights_error(name: str, weights_shape: tuple[int, ...], lead: tuple[int, ...]
                  ) -> ValueError:
  """The ValueError for weights of ``weights_shape`` that do not fit keys of leading
  shape ``lead`` (returned, for the caller to raise).

  Example:
    >>> raise weights_error("weights", (3,), (4, 8))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: weights: expected a shape that broadcasts to ... (4, 8) ..., got (3,)
  """
  return ValueError(
      f"{name}: expected a shape that broadcasts to a leading part of the keys' leading "
      f"shape {tuple(lead)} (weights align with the keys' leading axes, from the left: "
      f"(B,) weights each of B images of keys (B, h, w, d)), got {tuple(weights_shape)}")


def expand_weights(weights: Any, lead: tuple[int, ...]) -> jax.Array:
  """Weights that fit ``lead`` (see :func:`weights_fit`), broadcast to shape ``lead``:
  trailing axes of size 1 are appended, then the result is broadcast.

  Example:
    >>> import jax.numpy as jnp
    >>> expand_weights(jnp.array([1.0, 2.0]), (2, 3)).tolist()
    [[1.0, 1.0, 1.0], [2.0, 2.0, 2.0]]
  """
  w = jnp.asarray(weights)
  w = jnp.reshape(w, tuple(w.shape) + (1,) * (len(lead) - w.ndim))
  return jnp.broadcast_to(w, tuple(lead))


def explicit_sharding(x: Any):
  """The sharding in ``x``'s type when it is over a mesh with an explicit axis (what
  ``jax.make_mesh`` makes by default), else None; for arrays and tracers alike.

  Example:
    >>> import jax.numpy as jnp
    >>> explicit_sharding(jnp.ones(3)) is None   # one device: no mesh axes
    True
  """
  if not isinstance(x, (jax.Array, jax.core.Tracer)):
    return None
  sharding = getattr(jax.typeof(x), "sharding", None)
  mesh = getattr(sharding, "mesh", None)
  if mesh is None or not any(t == jax.sharding.AxisType.Explicit
                             for t in getattr(mesh, "axis_types", ())):
    return None
  return sharding
