"""How many cores fastseq's CPU kernels use, and running independent layers side by side.

PyTorch users know this as ``torch.set_num_threads``. fastseq has one setting:

- :func:`set_num_threads` / the ``FASTSEQ_NUM_THREADS`` environment variable (default: the
  cores this process may run on, ``os.sched_getaffinity``, read once per process);
- the numba backend hands its share to the BLAS calls of each kernel (large products use
  that many threads, small per-step products one; see ``fastseq_kernels/_blas.py``);
- :func:`run_concurrently` runs independent pieces of work (the two directions of a
  bidirectional RNN) on separate threads, splitting the share between them, so two
  directions on two cores each run single-threaded at the same time instead of one after
  the other. The kernels release the GIL, so this is real parallelism.

The share is per thread (:func:`limit` narrows it inside a ``with`` block), so nested
parallel work never asks for more threads than the setting.
"""

from __future__ import annotations

import contextlib
import operator
import os
import threading
from typing import Callable, List, Optional

__all__ = ["get_num_threads", "set_num_threads", "limit", "run_concurrently", "usable_cores"]

ENV = "FASTSEQ_NUM_THREADS"

_setting: Optional[int] = None
_local = threading.local()
_pool = None
_pool_lock = threading.Lock()


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


_default: Optional[int] = None


def _default_threads() -> int:
    """:func:`usable_cores`, read once per process (again in a forked child): every kernel
    call asks, and the system call took 1-8 us of a 0.4 ms call. A process that changes its
    own affinity later says so with :func:`set_num_threads`."""
    global _default
    if _default is None:
        _default = usable_cores()
    return _default


def _forget_default() -> None:
    global _default
    _default = None


def _forget_pool() -> None:
    # a forked child has none of the parent's pool threads, but the executor's idle-worker
    # count says it has, so it would start none and every submit would wait forever
    global _pool, _pool_lock
    _pool = None
    _pool_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_default)
    os.register_at_fork(after_in_child=_forget_pool)


def _check(n, argname: str) -> int:
    if isinstance(n, bool):
        raise TypeError(f"{argname} must be a positive integer, got bool {n!r}")
    try:
        n = operator.index(n)
    except TypeError:
        raise TypeError(f"{argname} must be a positive integer, got {type(n).__name__} {n!r}") from None
    if n < 1:
        raise ValueError(f"{argname} must be a positive integer, got {n}")
    return n


def _from_env() -> Optional[int]:
    raw = os.environ.get(ENV, "").strip()
    if not raw:
        return None
    try:
        n = int(raw)
    except ValueError:
        raise ValueError(f"{ENV} must be a positive integer, got {raw!r}") from None
    if n < 1:
        raise ValueError(f"{ENV} must be a positive integer, got {raw!r}")
    return n


def set_num_threads(n: int) -> None:
    """Use at most ``n`` threads for fastseq's CPU kernels (process-wide)."""
    global _setting
    _setting = _check(n, "n")


def get_num_threads() -> int:
    """Threads the calling thread may use now: the :func:`limit` in force, else the
    :func:`set_num_threads` setting, else ``FASTSEQ_NUM_THREADS``, else the usable cores."""
    share = getattr(_local, "share", None)
    if share is not None:
        return share
    if _setting is not None:
        return _setting
    env = _from_env()
    return env if env is not None else _default_threads()


@contextlib.contextmanager
def limit(n: int):
    """Inside the block, the calling thread uses at most ``n`` threads."""
    n = _check(n, "n")
    old = getattr(_local, "share", None)
    _local.share = n
    try:
        yield
    finally:
        _local.share = old


def _executor():
    global _pool
    if _pool is None:
        with _pool_lock:
            if _pool is None:
                from concurrent.futures import ThreadPoolExecutor

                # Threads are created on demand; nesting halves the share at every level,
                # so at most get_num_threads() - 1 helpers ever wait at once.
                _pool = ThreadPoolExecutor(max_workers=64, thread_name_prefix="fastseq")
    return _pool


def run_concurrently(*fns: Callable[[], object]) -> List[object]:
    """Call each function and return their results in order. With a share of two or
    more threads, the functions run at the same time on separate threads, each with
    an equal part of the share (the first in the calling thread); otherwise one after
    the other. Exceptions propagate (the first one, after every function finished)."""
    share = get_num_threads()
    k = len(fns)
    if k <= 1 or share < 2:
        return [f() for f in fns]
    parts = min(k, share)
    if parts < k:  # more functions than threads: run them in `parts` groups
        groups = [fns[i::parts] for i in range(parts)]
        res = run_concurrently(*[(lambda g=g: [f() for f in g]) for g in groups])
        out: List[object] = [None] * k
        for i, g in enumerate(res):
            for j, r in enumerate(g):
                out[i + j * parts] = r
        return out
    shares = [share // k + (1 if i < share % k else 0) for i in range(k)]

    def call(f, n):
        with limit(n):
            return f()

    futures = [_executor().submit(call, f, n) for f, n in zip(fns[1:], shares[1:])]
    first_exc = None
    try:
        first = call(fns[0], shares[0])
    except BaseException as e:  # wait for the others before raising
        first_exc = e
        first = None
    results = [first]
    for fut in futures:
        try:
            results.append(fut.result())
        except BaseException as e:
            first_exc = first_exc or e
            results.append(None)
    if first_exc is not None:
        raise first_exc
    return results
