"""Keep freed large blocks in the process heap for reuse (glibc only).

A layer call allocates its per-step buffers afresh (P4: a 53-105 MB gate buffer per
direction, the same again for the backward pass). glibc's ``malloc`` serves blocks of
more than 128 KB-32 MB with ``mmap`` and gives them back with ``munmap`` when they are
freed, so every call pays the kernel for fresh zeroed pages again: one page fault per
4 KB on first touch. Measured on the reference machine, in alternating calls in one
process: P4 training 632 vs 927 ms, P2 training 49 vs 63 ms, P3 training 342 vs 366 ms;
forward calls of P1-P3 unchanged.

:func:`reuse_freed_memory` turns that off for the whole process (``mallopt``:
``M_MMAP_MAX = 0`` so large blocks come from the heap, ``M_TRIM_THRESHOLD`` 1 GiB so
the heap keeps up to that much free memory instead of returning it to the system,
``M_TOP_PAD`` 64 MiB, below).
Threads other than the main one allocate from glibc's per-thread arenas, whose heaps
are mappings of at most 64 MiB; a heap left wholly free is unmapped at once whatever
``M_TRIM_THRESHOLD`` says, unless the top pad (``M_TOP_PAD``) is at least that large. A
bidirectional layer runs one direction in a pool thread (``fastseq.threads``), so
without the pad that direction faulted its buffers in afresh every call: measured on
the 2-vCPU Zen 4 machine, P4 training 326-341 vs 360-401 ms, padded 714-723 vs 977-1070
ms, the reverse direction's forward 25 ms behind the other before; PyTorch and Keras in
the same processes unchanged (``M_ARENA_MAX=1`` gave the same gain but slowed them by
8-10 %, their threads then sharing one arena). Hence ``M_TOP_PAD`` 64 MiB as well.

The cost: the process keeps its peak heap size (resident memory does not shrink after
a large call until the process ends). The numba backend applies it when it is first
used unless ``FASTSEQ_MALLOC_REUSE=0``; other allocators (jemalloc, tcmalloc, musl)
are left alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

__all__ = ["reuse_freed_memory", "malloc_setting"]

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_TOP_PAD = -2
_DEFAULT_MMAP_MAX = 65536
_DEFAULT_TRIM = 128 * 1024
_TRIM = 1 << 30
_TOP_PAD = 1 << 26
_DEFAULT_TOP_PAD = 128 * 1024
_state = {"setting": "system default"}


def _libc():
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        fn = libc.mallopt
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


def reuse_freed_memory(enable: bool = True) -> bool:
    """Keep (``enable``) or stop keeping freed large blocks for reuse; see the module
    docstring. Returns whether the setting was applied (False off glibc)."""
    mallopt = _libc()
    if mallopt is None:
        _state["setting"] = "system default (not glibc)"
        return False
    if enable:
        ok = (mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, _TRIM) == 1
              and mallopt(_M_TOP_PAD, _TOP_PAD) == 1)
        _state["setting"] = ("glibc: large blocks from the heap, kept for reuse (M_MMAP_MAX=0, M_TRIM_THRESHOLD=1 GiB, "
                             "M_TOP_PAD=64 MiB)")
    else:
        ok = (mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX) == 1 and mallopt(_M_TRIM_THRESHOLD, _DEFAULT_TRIM) == 1
              and mallopt(_M_TOP_PAD, _DEFAULT_TOP_PAD) == 1)
        _state["setting"] = "glibc defaults"
    return ok


def apply_default() -> None:
    """What the numba backend does on first use: :func:`reuse_freed_memory` unless the
    environment variable ``FASTSEQ_MALLOC_REUSE`` is ``0``/``false``/``no``/``off``."""
    if os.environ.get("FASTSEQ_MALLOC_REUSE", "1").strip().lower() in ("0", "false", "no", "off"):
        _state["setting"] = "system default (FASTSEQ_MALLOC_REUSE=0)"
        return
    reuse_freed_memory(True)


def malloc_setting() -> str:
    """The allocator setting in effect, in words (recorded with benchmark runs)."""
    return _state["setting"]
