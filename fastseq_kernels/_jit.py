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

import glob
import os
import warnings

from numba import njit
from numba.core.errors import NumbaIRAssumptionWarning

# Numba's SSA pass reports "variable ... is not in scope" for the inlined ``ftanh``
# overload (a pedantic internal check, with a request to report it upstream); the
# generated code is unaffected (every kernel is tested against the NumPy reference), so a
# user's first compile does not print it.
warnings.filterwarnings("ignore", category=NumbaIRAssumptionWarning)

_HERE = os.path.dirname(os.path.abspath(__file__))


def _invalidate_stale_cache():
    """Numba keys a cached function on its own file only: editing a helper module
    (``_common.py``, ``_blas.py``) would leave callers' cached machine code stale. Keep a
    fingerprint of all kernel sources next to the cache and drop this package's cache
    files whenever any source changes."""
    cache_dir = os.path.join(_HERE, "__pycache__")
    try:
        parts = []
        for path in sorted(glob.glob(os.path.join(_HERE, "*.py"))):
            st = os.stat(path)
            parts.append(f"{os.path.basename(path)}:{st.st_size}:{st.st_mtime_ns}")
        stamp = "\n".join(parts)
        stamp_file = os.path.join(cache_dir, "fastseq_kernels.sources")
        old = None
        if os.path.exists(stamp_file):
            with open(stamp_file) as fh:
                old = fh.read()
        if old != stamp:
            for pattern in ("*.nbi", "*.nbc"):
                for f in glob.glob(os.path.join(cache_dir, pattern)):
                    os.remove(f)
            os.makedirs(cache_dir, exist_ok=True)
            with open(stamp_file, "w") as fh:
                fh.write(stamp)
    except OSError:  # read-only install: nothing to invalidate here
        pass

if os.environ.get("FASTSEQ_NUMBA_CACHE", "1") not in ("0", "", "false"):
    _invalidate_stale_cache()

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
