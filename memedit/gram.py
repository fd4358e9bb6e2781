"""Gram matrices XᵀX of key chunks: the O(n d²) step of the covariance fold, per platform.

C = Σ kkᵀ is symmetric, so only its upper triangle needs the d(d+1)/2 · n multiply-adds
(half a GEMM). :func:`gram` computes XᵀX of one (n, d) chunk with the kernel chosen for
the platform the program is lowered for (``lax.platform_dependent``):

- CPU, ``syrk``: the BLAS symmetric rank-k update (``?syrk``, which numpy's ``X.T @ X``
  calls for a matrix times its own transpose) run from inside the compiled program by a
  ``jax.experimental.buffer_callback`` (:func:`gram_blas`), which reads the chunk in place
  and writes the (d, d) result into XLA's buffer: half a GEMM at BLAS speed.
- CPU, ``gemm``: XLA's full GEMM (:func:`gram_xla`); XLA:CPU has no symmetric product.
- GPU and TPU: XLA's GEMM.

Which CPU kernel is faster depends on whether BLAS's threads get the cores. Measured on a
2-core AVX-512 CPU shared with other busy processes (load average 10 to 15), folding
chunks of 15,625 × 512 float32 keys, the variants interleaved in one run
(``benchmarks/gram_kernels.py`` and ``benchmarks/covariance_fold.py``; numbers in
``benchmarks/results``):

- with BLAS set to one thread (``OPENBLAS_NUM_THREADS=1``), the ``syrk`` fold ran 1.5 to
  1.7 times as fast as the ``gemm`` fold (which uses both cores), 1.3 to 1.5 times over
  10⁶ keys streamed from numpy;
- with numpy's default BLAS threads, OpenBLAS's threads wait on each other whenever
  another process takes a core: the ``syrk`` fold ran at 0.24 to 0.4 times the ``gemm``
  fold's speed (numpy's bare ``X.T @ X`` too), even at a raised priority;
- XLA formulations of the upper triangle by block rows (:func:`gram_blocked`, each block
  of b = 64 to 256 columns against the trailing columns: 56 to 75 % of the GEMM's
  multiply-adds) run the smaller products at a lower rate: 0.5 to 1.15 times the GEMM's
  speed; ``jax.pure_callback`` copies its operand out of XLA on every call (10 % slower
  than the buffer callback); folding 1 to 16 chunks per program changed nothing beyond
  the noise (a callback makes the CPU program synchronous anyway).

So on CPU ``auto`` (the default) takes ``syrk`` when BLAS runs one thread (e.g.
``OPENBLAS_NUM_THREADS=1``) or the CPU has one core, and ``gemm`` otherwise: a rule on
the configuration only, never on the machine's momentary load, so one environment always
folds with the same kernel and gets the same bits. On a 2-core CPU with nothing else
running, ``syrk`` was the faster kernel with either thread setting (10⁶ keys from numpy:
2.76 s against the ``gemm`` fold's 3.49 s with two BLAS threads, 2.84 s against 3.16 s
with one); the rule gives that up with several BLAS threads to avoid the 2.5 to 4 times
slowdown under load. ``MEMEDIT_CPU_GRAM=syrk`` or ``gemm`` fixes the choice. Both
accumulate blocked float32 (or float64) dot products, so the fold's accuracy is the same
whichever runs (their results differ in the last bits).

Programs that XLA partitions over a mesh (SPMD, global arrays) use :func:`gram_xla`: a host
callback there would gather the operand onto one device.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from memedit.optim import check_choice

__all__ = ["CPU_GRAM", "CPU_KERNELS", "auto_kernel", "cpu_kernel", "gram", "gram_blas", "gram_blocked",
           "gram_xla", "single_blas_thread"]

HIGHEST = lax.Precision.HIGHEST

#: The settings of ``MEMEDIT_CPU_GRAM``: a choice per process, BLAS ``syrk`` through a
#: callback, or XLA's GEMM.
CPU_KERNELS = ("auto", "syrk", "gemm")
#: The CPU kernel setting :func:`gram` follows: the environment variable
#: ``MEMEDIT_CPU_GRAM`` (``auto`` by default). It is read when a program is traced;
#: compiled programs keep their kernel.
CPU_GRAM = os.environ.get("MEMEDIT_CPU_GRAM", "auto")

_BLAS_THREADS = ("OPENBLAS_NUM_THREADS", "GOTO_NUM_THREADS", "OMP_NUM_THREADS",
                 "MKL_NUM_THREADS")


def auto_kernel(cores: int, one_blas_thread: bool, side_by_side: bool = False) -> str:
  """The ``auto`` rule: ``"syrk"`` when BLAS runs one thread or the CPU has one core
  (BLAS's threads then never wait on each other), else ``"gemm"``; for Gram matrices that
  XLA may run side by side (``side_by_side``: independent batches, each call on one BLAS
  thread, see :func:`single_blas_thread`), ``"syrk"`` as well.

  Args:
    cores: CPU cores.
    one_blas_thread: BLAS is set to one thread (e.g. ``OPENBLAS_NUM_THREADS=1``).
    side_by_side: the Gram matrices are independent and every call can be set to one
      BLAS thread (numpy's BLAS is an OpenBLAS memedit can reach).

  Returns:
    ``"syrk"`` or ``"gemm"``.

  Example:
    >>> auto_kernel(8, False), auto_kernel(2, True), auto_kernel(1, False)
    ('gemm', 'syrk', 'syrk')
    >>> auto_kernel(8, False, side_by_side=True)
    'syrk'
  """
  return "syrk" if one_blas_thread or cores == 1 or side_by_side else "gemm"


@functools.cache
def _auto_now(side_by_side: bool = False) -> str:
  return auto_kernel(os.cpu_count() or 1,
                     any(os.environ.get(v) == "1" for v in _BLAS_THREADS),
                     side_by_side and _blas_thread_functions() is not None)


# OpenBLAS's thread-count functions, as numpy's wheels (scipy-openblas, 64-bit ints with a
# symbol suffix) and system builds name them.
_SET_GET_NAMES = (("scipy_openblas_set_num_threads64_", "scipy_openblas_get_num_threads64_"),
                  ("scipy_openblas_set_num_threads", "scipy_openblas_get_num_threads"),
                  ("openblas_set_num_threads64_", "openblas_get_num_threads64_"),
                  ("openblas_set_num_threads", "openblas_get_num_threads"))


def _numpy_blas_libraries() -> list[str]:
  """Paths of the OpenBLAS libraries that may be numpy's: those bundled in its wheel, then
  any loaded into this process (Linux)."""
  import glob

  root = os.path.dirname(os.path.dirname(np.__file__))
  paths = sorted(glob.glob(os.path.join(root, "numpy.libs", "*openblas*")))
  try:
    with open("/proc/self/maps") as f:
      loaded = {line.split()[-1] for line in f if "openblas" in line.lower()}
    paths += sorted(p for p in loaded if os.path.isfile(p) and p not in paths)
  except OSError:
    pass
  return paths


@functools.cache
def _blas_thread_functions():
  """``(set, get)`` of numpy's OpenBLAS thread count (ctypes functions), or None when
  numpy's BLAS is not an OpenBLAS this process can reach."""
  import ctypes

  for path in _numpy_blas_libraries():
    try:
      lib = ctypes.CDLL(path)
    except OSError:
      continue
    for set_name, get_name in _SET_GET_NAMES:
      set_fn, get_fn = getattr(lib, set_name, None), getattr(lib, get_name, None)
      if set_fn is not None and get_fn is not None:
        set_fn.argtypes, set_fn.restype = [ctypes.c_int], None
        get_fn.argtypes, get_fn.restype = [], ctypes.c_int
        return set_fn, get_fn
  return None


_threads_lock = threading.Lock()
_threads_users = 0
_threads_saved = 0


@contextlib.contextmanager
def single_blas_thread():
  """Runs the block with numpy's BLAS on one thread (OpenBLAS), then restores the count.

  The count is process-wide: while any block is inside (several may be, from several
  threads, e.g. XLA running two callbacks at once) BLAS calls anywhere in the process run
  on one thread; the count saved by the first is restored when the last leaves. Without
  an OpenBLAS to set (another BLAS), the block runs as it is.

  Example:
    >>> import numpy as np
    >>> with single_blas_thread():
    ...     x = np.ones((4, 3), np.float32); g = x.T @ x
    >>> g.tolist()[0]
    [4.0, 4.0, 4.0]
  """
  global _threads_users, _threads_saved
  fns = _blas_thread_functions()
  if fns is None:
    yield
    return
  set_fn, get_fn = fns
  with _threads_lock:
    if _threads_users == 0:
      _threads_saved = get_fn()
      if _threads_saved != 1:
        set_fn(1)
    _threads_users += 1
  try:
    yield
  finally:
    with _threads_lock:
      _threads_users -= 1
      if _threads_users == 0 and _threads_saved != 1:
        set_fn(_threads_saved)


def cpu_kernel(side_by_side: bool = False) -> str:
  """The kernel :func:`gram` uses on CPU now: ``"syrk"`` or ``"gemm"``.

  ``MEMEDIT_CPU_GRAM`` (:data:`CPU_GRAM`) when it names one; for ``auto``, ``syrk`` when
  BLAS runs one thread (``OPENBLAS_NUM_THREADS=1`` or the like) or the CPU has one core,
  and for Gram matrices that run side by side when memedit can set BLAS to one thread per
  call (:func:`auto_kernel`); else ``gemm``.

  Args:
    side_by_side: for independent Gram matrices (:func:`gram`).

  Returns:
    ``"syrk"`` or ``"gemm"``.

  Example:
    >>> cpu_kernel() in ("syrk", "gemm")
    True
  """
  setting = check_choice(CPU_GRAM, CPU_KERNELS, "MEMEDIT_CPU_GRAM")
  return _auto_now(side_by_side) if setting == "auto" else setting


def gram_xla(x: jax.Array) -> jax.Array:
  """XᵀX by XLA's GEMM (``Precision.HIGHEST``, accumulated in ``x``'s dtype).

  Args:
    x: (..., n, d) float array.

  Returns:
    (..., d, d) XᵀX.

  Example:
    >>> import numpy as np
    >>> x = np.arange(6.0, dtype=np.float32).reshape(3, 2)
    >>> gram_xla(x).tolist()
    [[20.0, 26.0], [26.0, 35.0]]
  """
  x = jnp.asarray(x)
  return jnp.einsum("...nd,...ne->...de", x, x, precision=HIGHEST,
                    preferred_element_type=x.dtype)


def gram_blocked(x: jax.Array, block: int = 128) -> jax.Array:
  """XᵀX from its upper triangle in XLA: each block of ``block`` columns against the
  trailing columns, the lower triangle mirrored.

  For d = m·b this does (m + 1) / (2m) of the GEMM's multiply-adds (b = d/4: 62.5 %).

  Args:
    x: (n, d) float array.
    block: columns per block row.

  Returns:
    (d, d) XᵀX, symmetric.

  Example:
    >>> import numpy as np
    >>> x = np.random.default_rng(0).normal(size=(50, 5)).astype("float32")
    >>> bool(np.allclose(gram_blocked(x, block=2), x.T @ x, rtol=1e-5))
    True
  """
  x = jnp.asarray(x)
  d = x.shape[-1]
  rows = []
  for i in range(0, d, block):
    r = jnp.einsum("nd,ne->de", x[:, i:i + block], x[:, i:], precision=HIGHEST,
                   preferred_element_type=x.dtype)
    rows.append(jnp.pad(r, ((0, 0), (i, 0))))
  upper = jnp.concatenate(rows, axis=0)
  return jnp.triu(upper) + jnp.triu(upper, 1).T


def _syrk_callback(ctx, out, x) -> None:
  """Writes XᵀX into ``out`` in place; numpy's matmul of a matrix with its own transpose
  runs BLAS ?syrk (and mirrors the triangle)."""
  del ctx
  a = np.asarray(x)
  o = np.asarray(out)
  with np.errstate(all="ignore"):  # overflow gives ±inf, as XLA's product does
    np.matmul(np.swapaxes(a, -1, -2), a, out=o)


def _syrk_one_thread_callback(ctx, out, x) -> None:
  """:func:`_syrk_callback` with BLAS on one thread: XLA runs the calls of independent
  chunks side by side, one per core, without their threads waiting on each other's."""
  with single_blas_thread():
    _syrk_callback(ctx, out, x)


def _blas(x: jax.Array, one_thread: bool = False) -> jax.Array:
  from jax.experimental.buffer_callback import buffer_callback

  d = x.shape[-1]
  out = jax.ShapeDtypeStruct(x.shape[:-2] + (d, d), x.dtype)
  callback = _syrk_one_thread_callback if one_thread else _syrk_callback
  g = buffer_callback(callback, out, vmap_method="broadcast_all")(x)
  # Inside shard_map the result varies over the same mesh axes as the chunk.
  vma = _varying_axes(x)
  return lax.pcast(g, vma, to="varying") if vma else g


def _varying_axes(x) -> tuple:
  """The manual mesh axes ``x`` varies over inside ``shard_map`` (none outside)."""
  aval = jax.typeof(x)
  mat = getattr(aval, "mat", None)
  axes = getattr(mat, "varying", None) if mat is not None else getattr(aval, "vma", None)
  return tuple(sorted(axes or ()))


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _gram_blas(x: jax.Array, one_thread: bool) -> jax.Array:
  x = jnp.asarray(x)
  if x.dtype not in (jnp.float32, jnp.float64):
    return gram_xla(x)
  return _blas(x, one_thread=one_thread)


@_gram_blas.defjvp
def _gram_blas_jvp(one_thread, primals, tangents):
  (x,), (t,) = primals, tangents
  tx = jnp.einsum("...nd,...ne->...de", t, x, precision=HIGHEST)
  return _gram_blas(x, one_thread), tx + jnp.swapaxes(tx, -1, -2)


def gram_blas(x: jax.Array, *, one_thread: bool = False) -> jax.Array:
  """XᵀX by the host BLAS's ``?syrk`` (float32 or float64), called from the compiled
  program with the chunk read in place. CPU only; differentiable (the derivative
  tXᵀ... is computed by XLA).

  Args:
    x: (..., n, d) float32 or float64 array on a CPU device.
    one_thread: run each call on one BLAS thread (:func:`single_blas_thread`), for
      products that XLA runs side by side.

  Returns:
    (..., d, d) XᵀX.

  Example:
    >>> import numpy as np
    >>> x = np.arange(6.0, dtype=np.float32).reshape(3, 2)
    >>> gram_blas(x).tolist()
    [[20.0, 26.0], [26.0, 35.0]]
  """
  return _gram_blas(x, bool(one_thread))


def gram(x: jax.Array, *, partitioned: bool = False, side_by_side: bool = False) -> jax.Array:
  """XᵀX with the fastest kernel of the platform the program runs on.

  CPU: :func:`gram_blas` (BLAS ``?syrk``, half the work of a GEMM) or :func:`gram_xla`, as
  :func:`cpu_kernel` says; GPU/TPU: :func:`gram_xla`. ``partitioned=True`` (programs XLA
  partitions over a mesh) always uses :func:`gram_xla`. ``side_by_side=True`` says that
  this product depends on no other in the program (e.g. the chunks of a fold whose shift
  is fixed): XLA then runs such syrk calls at the same time, each on one BLAS thread,
  which ``auto`` takes whenever memedit can set numpy's OpenBLAS to one thread per call.
  Measured on a 2-core CPU folding 10⁶ keys of dimension 512 from numpy (pre-shifted
  chunks of 15,625 in groups of 16, column sums taken while staging): 1.87 s, against
  3.98 s for XLA's GEMM fold and 2.16 s for numpy's own ``X.T @ X`` loop on two BLAS
  threads (medians of one run; 1.87–1.98 s, 3.87–4.40 s and 1.92–2.42 s over three).

  Args:
    x: (..., n, d) float array.
    partitioned: the program is SPMD-partitioned over several devices.
    side_by_side: this product is independent of the program's other Gram matrices.

  Returns:
    (..., d, d) XᵀX in ``x``'s dtype.

  Example:
    >>> import jax, numpy as np
    >>> x = np.random.default_rng(0).normal(size=(40, 3)).astype("float32")
    >>> bool(np.allclose(jax.jit(gram)(x), x.T @ x, rtol=1e-5))
    True
  """
  x = jnp.asarray(x)
  if partitioned:
    return gram_xla(x)
  if cpu_kernel(side_by_side) == "syrk":
    cpu = functools.partial(gram_blas, one_thread=side_by_side)
  else:
    cpu = gram_xla
  return lax.platform_dependent(x, cpu=cpu, default=gram_xla)
