"""OpenBLAS threads of the UI server's process.

The server's LAPACK calls are small (the eigendecomposition of a layer's C, C_in ≤ 512,
and the SVD of a few hundred context keys, both through the OpenBLAS that numpy and
SciPy bundle and JAX's CPU linear algebra calls). OpenBLAS runs them on as many threads
as there are cores, and its threads wait for each other by spinning: on a machine whose
cores are busy with other work (a training job, another session's solve) that makes
them one to two hundred times slower than on one thread (measured on 2 cores at load 9:
a 256 × 256 eigendecomposition 0.8 s instead of 5 ms, a 384 × 256 SVD 2.2 s instead of
11 ms, CPU time). :func:`limit_blas_threads` sets the thread count of every OpenBLAS
loaded in the process, as the ``OPENBLAS_NUM_THREADS`` environment variable would have
at start-up.
"""

from __future__ import annotations

import ctypes
import os

__all__ = ["limit_blas_threads", "openblas_libraries"]

_SETTERS = ("openblas_set_num_threads", "scipy_openblas_set_num_threads",
            "openblas_set_num_threads64_", "scipy_openblas_set_num_threads64_")


def openblas_libraries() -> list[str]:
  """Paths of the OpenBLAS libraries loaded in this process (Linux; elsewhere none).

  Example:
    >>> all("openblas" in os.path.basename(p).lower() for p in openblas_libraries())
    True
  """
  try:
    with open("/proc/self/maps") as f:
      paths = {line.split(None, 5)[-1].strip() for line in f if "openblas" in line.lower()}
  except OSError:
    return []
  return sorted(p for p in paths if "openblas" in os.path.basename(p).lower()
                and os.path.isfile(p))


def limit_blas_threads(threads: int = 1) -> list[str]:
  """Sets the threads of every loaded OpenBLAS (numpy's and SciPy's, which JAX's CPU
  LAPACK calls use; SciPy's is loaded first) to ``threads``.

  Args:
    threads: a positive number of threads.

  Returns:
    The file names of the libraries set.

  Raises:
    ValueError: ``threads`` not a positive int.

  Example:
    >>> names = limit_blas_threads(1)
    >>> all("openblas" in n.lower() for n in names)
    True
  """
  if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
    raise ValueError(f"threads: expected a positive int, got {threads!r}")
  try:
    import scipy.linalg.cython_lapack  # noqa: F401 - loads SciPy's OpenBLAS, JAX's LAPACK
  except ImportError:
    pass
  done = []
  for path in openblas_libraries():
    try:
      lib = ctypes.CDLL(path)
    except OSError:
      continue
    for name in _SETTERS:
      fn = getattr(lib, name, None)
      if fn is not None:
        fn.argtypes = [ctypes.c_int]
        fn.restype = None
        fn(threads)
        done.append(os.path.basename(path))
        break
  return done
