"""The one place that decides how fastseq's Numba kernels are compiled.

Every kernel module decorates with :func:`kernel`. Options:

- ``cache=True``: compiled machine code is stored next to the sources (or in
  ``NUMBA_CACHE_DIR``) so a new process loads it instead of recompiling;
- ``nogil=True``: the kernels release the GIL, so several Python threads can run layers
  at once (every kernel allocates its own buffers; nothing global is written);
- ``boundscheck=False``, ``error_model="numpy"``: inputs are validated before they reach
  compiled code (see ``backends/fastseq_numba``); no Python exceptions in inner loops;
- ``fastmath=False``: results follow IEEE arithmetic so that they agree with the NumPy
  reference to rounding (float64 to 1e-10).

Kernels are compiled lazily for the argument types they meet. Callers (the backend)
normalise arguments (C-contiguous arrays, int64 lengths, Python ints/floats for flags), so
each kernel has exactly one specialisation per dtype; :func:`fastseq_kernels.warmup`
compiles (or loads) all of them up front.

Set ``FASTSEQ_NUMBA_CACHE=0`` to turn the on-disk cache off (e.g. read-only installs
without ``NUMBA_CACHE_DIR``).
"""

import os

from numba import njit

OPTIONS = dict(
    cache=os.environ.get("FASTSEQ_NUMBA_CACHE", "1") not in ("0", "", "false"),
    nogil=True,
    boundscheck=False,
    error_model="numpy",
    fastmath=False,
)


def kernel(func=None, **overrides):
    """``@kernel`` / ``@kernel(inline="always")``: njit with fastseq's options."""
    opts = dict(OPTIONS, **overrides)
    if func is None:
        return lambda f: njit(**opts)(f)
    return njit(**opts)(func)
