"""Splitting row ranges of a GIL-free Cython kernel over a few threads."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np

_POOL = None
_PARALLEL_MIN = 1 << 20  # elements below which one thread does all rows


def num_threads():
    """The calling thread's share of the cores (:func:`fastseq.threads.get_num_threads`:
    ``set_num_threads``, ``FASTSEQ_NUM_THREADS`` or the usable cores), at most 8."""
    from fastseq.threads import get_num_threads

    return min(get_num_threads(), 8)


def run_rows(fn, n_rows, row_size, *args, **kwargs):
    """Call ``fn(*args, r0, r1, **kwargs)`` over row chunks covering ``[0, n_rows)``, in parallel
    when ``n_rows * row_size`` is large; ``fn`` must release the GIL."""
    global _POOL
    k = num_threads()
    if k == 1 or n_rows * row_size < _PARALLEL_MIN or n_rows < 2 * k:
        fn(*args, 0, n_rows, **kwargs)
        return
    if _POOL is None or _POOL._max_workers != k:
        _POOL = ThreadPoolExecutor(max_workers=k, thread_name_prefix="fastseq-data")
    bounds = np.linspace(0, n_rows, k + 1).astype(int)
    futures = [_POOL.submit(fn, *args, int(bounds[i]), int(bounds[i + 1]), **kwargs) for i in range(k)]
    for f in futures:
        f.result()
