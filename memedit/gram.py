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

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from memedit.optim import check_choice

__all__ = ["CPU_GRAM", "CPU_KERNELS", "auto_kernel", "cpu_kernel", "gram", "gram_blas", "gram_blocked",
           "gram_xla"]

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


def auto_kernel(cores: int, one_blas_thread: bool) -> str:
  """The ``auto`` rule: ``"syrk"`` when BLAS runs one thread or the CPU has one core
  (BLAS's threads then never wait on each other), else ``"gemm"``.

  Args:
    cores: CPU cores.
    one_blas_thread: BLAS is set to one thread (e.g. ``OPENBLAS_NUM_THREADS=1``).

  Returns:
    ``"syrk"`` or ``"gemm"``.

  Example:
    >>> auto_kernel(8, False), auto_kernel(2, True), auto_kernel(1, False)
    ('gemm', 'syrk', 'syrk')
  """
  return "syrk" if one_blas_thread or cores == 1 else "gemm"


@functools.cache
def _auto_now() -> str:
  return auto_kernel(os.cpu_count() or 1,
                     any(os.environ.get(v) == "1" for v in _BLAS_THREADS))


def cpu_kernel() -> str:
  """The kernel :func:`gram` uses on CPU now: ``"syrk"`` or ``"gemm"``.

  ``MEMEDIT_CPU_GRAM`` (:data:`CPU_GRAM`) when it names one; for ``auto``, ``syrk`` when
  BLAS runs one thread (``OPENBLAS_NUM_THREADS=1`` or the like) or the CPU has one core,
  else ``gemm``.

  Returns:
    ``"syrk"`` or ``"gemm"``.

  Example:
    >>> cpu_kernel() in ("syrk", "gemm")
    True
  """
  setting = check_choice(CPU_GRAM, CPU_KERNELS, "MEMEDIT_CPU_GRAM")
  return _auto_now() if setting == "auto" else setting


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


def _blas(x: jax.Array) -> jax.Array:
  from jax.experimental.buffer_callback import buffer_callback

  d = x.shape[-1]
  out = jax.ShapeDtypeStruct(x.shape[:-2] + (d, d), x.dtype)
  g = buffer_callback(_syrk_callback, out, vmap_method="broadcast_all")(x)
  # Inside shard_map the result varies over the same mesh axes as the chunk.
  vma = _varying_axes(x)
  return lax.pcast(g, vma, to="varying") if vma else g


def _varying_axes(x) -> tuple:
  """The manual mesh axes ``x`` varies over inside ``shard_map`` (none outside)."""
  aval = jax.typeof(x)
  mat = getattr(aval, "mat", None)
  axes = getattr(mat, "varying", None) if mat is not None else getattr(aval, "vma", None)
  return tuple(sorted(axes or ()))


@jax.custom_jvp
def gram_blas(x: jax.Array) -> jax.Array:
  """XᵀX by the host BLAS's ``?syrk`` (float32 or float64), called from the compiled
  program with the chunk read in place. CPU only; differentiable (the derivative
  tXᵀ... is computed by XLA).

  Args:
    x: (..., n, d) float32 or float64 array on a CPU device.

  Returns:
    (..., d, d) XᵀX.

  Example:
    >>> import numpy as np
    >>> x = np.arange(6.0, dtype=np.float32).reshape(3, 2)
    >>> gram_blas(x).tolist()
    [[20.0, 26.0], [26.0, 35.0]]
  """
  x = jnp.asarray(x)
  if x.dtype not in (jnp.float32, jnp.float64):
    return gram_xla(x)
  return _blas(x)


@gram_blas.defjvp
def _gram_blas_jvp(primals, tangents):
  (x,), (t,) = primals, tangents
  tx = jnp.einsum("...nd,...ne->...de", t, x, precision=HIGHEST)
  return gram_blas(x), tx + jnp.swapaxes(tx, -1, -2)


def gram(x: jax.Array, *, partitioned: bool = False) -> jax.Array:
  """XᵀX with the fastest kernel of the platform the program runs on.

  CPU: :func:`gram_blas` (BLAS ``?syrk``, half the work of a GEMM) or :func:`gram_xla`, as
  :func:`cpu_kernel` says; GPU/TPU: :func:`gram_xla`. ``partitioned=True`` (programs XLA
  partitions over a mesh) always uses :func:`gram_xla`.

  Args:
    x: (..., n, d) float array.
    partitioned: the program is SPMD-partitioned over several devices.

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
  cpu = gram_blas if cpu_kernel() == "syrk" else gram_xla
  return lax.platform_dependent(x, cpu=cpu, default=gram_xla)
