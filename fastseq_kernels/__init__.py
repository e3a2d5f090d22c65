"""fastseq_kernels: pure compute for fastseq (NumPy arrays and scalars in, arrays out).

- Numba kernels, one cell family per module: :mod:`.rnn`, :mod:`.gru`, :mod:`.lstm`
  (shared pieces in :mod:`._common`, BLAS access in :mod:`._blas`, compile options in
  :mod:`._jit`).
- Cython routines (``*.pyx``) for data handling, owned by fastseq.data.

Importing this package is cheap: Numba is imported only when a kernel module is.
"""

__all__ = ["warmup"]


def warmup(dtypes=("float32", "float64"), verbose=False):
    """Compile (or load from the on-disk cache) every Numba kernel for ``dtypes``."""
    from ._warmup import warmup as _warmup

    return _warmup(dtypes=dtypes, verbose=verbose)
