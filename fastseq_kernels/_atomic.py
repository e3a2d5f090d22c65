"""Atomic operations on ``int64`` array elements for compiled code shared by two threads
(the two-thread loops of :mod:`.lstm` and :mod:`.gru`, see :mod:`._team`): compare-and-swap,
fetch-and-add, load, all sequentially consistent, and a spin-wait hint, as LLVM IR through
``@intrinsic`` (Numba has no atomics of its own); and :func:`take_chunk`, how a worker
claims a piece of a task."""

import os
import platform

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from ._jit import kernel

_i64 = ir.IntType(64)
_X86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")
_POSIX = os.name == "posix"


def _element_ptr(context, builder, arrty, arr, idx, idxty):
    a = context.make_array(arrty)(context, builder, arr)
    return builder.gep(a.data, [context.cast(builder, idx, idxty, types.int64)])


def _check(arr):
    return isinstance(arr, types.Array) and arr.dtype == types.int64


@intrinsic
def atomic_cas(typingctx, arr, idx, expected, new):
    """``arr[idx]`` becomes ``new`` if it was ``expected``; returns the old value."""
    if not _check(arr):
        return None

    def codegen(context, builder, sig, args):
        va, vi, ve, vn = args
        ptr = _element_ptr(context, builder, sig.args[0], va, vi, sig.args[1])
        e = context.cast(builder, ve, sig.args[2], types.int64)
        n = context.cast(builder, vn, sig.args[3], types.int64)
        res = builder.cmpxchg(ptr, e, n, "seq_cst", "seq_cst")
        return builder.extract_value(res, 0)

    return types.int64(arr, idx, expected, new), codegen


def _make_rmw(op):
    @intrinsic
    def rmw(typingctx, arr, idx, val):
        if not _check(arr):
            return None

        def codegen(context, builder, sig, args):
            va, vi, vv = args
            ptr = _element_ptr(context, builder, sig.args[0], va, vi, sig.args[1])
            return builder.atomic_rmw(op, ptr, context.cast(builder, vv, sig.args[2], types.int64), "seq_cst")

        return types.int64(arr, idx, val), codegen

    return rmw


#: ``atomic_add(arr, idx, val)``: ``arr[idx] += val`` atomically; returns the old value.
atomic_add = _make_rmw("add")
#: ``atomic_exchange(arr, idx, val)``: ``arr[idx] = val`` atomically; returns the old value.
atomic_exchange = _make_rmw("xchg")


@intrinsic
def atomic_load(typingctx, arr, idx):
    """``arr[idx]``, read atomically (never hoisted out of a loop)."""
    if not _check(arr):
        return None

    def codegen(context, builder, sig, args):
        va, vi = args
        ptr = _element_ptr(context, builder, sig.args[0], va, vi, sig.args[1])
        return builder.load_atomic(ptr, "seq_cst", 8)

    return types.int64(arr, idx), codegen


@kernel(inline="always")
def atomic_store(arr, idx, val):
    """``arr[idx] = val``, stored atomically (sequentially consistent: an exchange)."""
    atomic_exchange(arr, idx, val)


@intrinsic
def spin_pause(typingctx):
    """The CPU's spin-wait hint (``pause`` on x86; nothing elsewhere)."""

    def codegen(context, builder, sig, args):
        if _X86:
            fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), []),
                                                "llvm.x86.sse2.pause")
            builder.call(fn, [])
        return context.get_dummy_value()

    return types.void(), codegen


@intrinsic
def yield_cpu(typingctx):
    """``sched_yield()`` (POSIX; nothing elsewhere): lets another thread that is runnable
    on this CPU run now. The symbol is resolved when the machine code is loaded, so the
    on-disk cache stays valid across processes."""

    def codegen(context, builder, sig, args):
        if _POSIX:
            fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.IntType(32), []), "sched_yield")
            builder.call(fn, [])
        return context.get_dummy_value()

    return types.void(), codegen


#: Spins (``pause``) before :func:`wait_at_least` starts yielding the CPU.
SPINS_BEFORE_YIELD = 2000


@kernel(inline="always")
def wait_at_least(arr, idx, value):
    """Wait until ``arr[idx] >= value``: spin, and after ``SPINS_BEFORE_YIELD`` spins yield
    the CPU on every round. The other worker may be the one holding this CPU (the OS
    can put both threads of a pair on one core, or preempt one for another process);
    spinning on would then block it for a whole time slice, milliseconds."""
    spins = 0
    while atomic_load(arr, idx) < value:
        if spins < SPINS_BEFORE_YIELD:
            spins += 1
            spin_pause()
        else:
            yield_cpu()


_BACK = 1 << 32


@kernel(inline="always")
def take_chunk(claims, k, nch, w):
    """Claim one of the ``nch`` chunks of task ``k`` from ``claims[k]`` (chunks taken from
    the front in the low 32 bits, from the back in the high ones): worker 0 takes from the
    front, worker 1 from the back, so with both at full speed each keeps to its own half
    of the units (and of the packed weights, which then stay in its core's cache) step
    after step, and a slower one takes fewer. Returns the chunk index, or -1 when all are
    taken."""
    while True:
        v = atomic_load(claims, k)
        lo = v & (_BACK - 1)
        hi = v >> 32
        if lo + hi >= nch:
            return -1
        if w == 0:
            if atomic_cas(claims, k, v, v + 1) == v:
                return lo
        else:
            if atomic_cas(claims, k, v, v + _BACK) == v:
                return nch - 1 - hi


@kernel(inline="always")
def chunk_cols(c, nch, ncols, NR):
    """Columns ``[j0, j1)`` of chunk ``c`` of ``nch`` over ``ncols`` columns: whole panels of
    ``NR`` columns, spread evenly over the chunks."""
    npan = (ncols + NR - 1) // NR
    return (npan * c) // nch * NR, min((npan * (c + 1)) // nch * NR, ncols)


@kernel(inline="always")
def _spin(arr, idx, value, spins):
    """At most ``spins`` rounds of :func:`spin_until`; past ``SPINS_BEFORE_YIELD`` rounds
    every 64th yields the CPU (as :func:`wait_at_least`), so that a thread waiting for this
    CPU (an OpenBLAS worker, another process) gets it at once."""
    for i in range(spins):
        if atomic_load(arr, idx) >= value:
            return True
        if i >= SPINS_BEFORE_YIELD and (i & 63) == 63:
            yield_cpu()
        else:
            spin_pause()
    return atomic_load(arr, idx) >= value


@kernel
def spin_until(arr, idx, value, spins):
    """Spin (``pause``) until ``arr[idx] >= value``, at most ``spins`` rounds; returns
    whether the value was reached. Releases the GIL (``nogil``) while it spins."""
    return _spin(arr, idx, value, spins)


#: The hand-off array of :mod:`._team` (``int64``, see ``_team._Helper``): the job number
#: worker 0 has posted, the one the helper has finished and the one it joined (negative:
#: closed by the caller without it), each on a cache line of its own; the current job's
#: number (0: worker 0 runs alone) and the spin budgets, in rounds; the job number for a
#: blocked helper; the job the helper took (with its arguments: it joins that one only).
HAND_POSTED, HAND_FINISHED, HAND_JOINED, HAND_JOB, HAND_CALLER_SPINS, HAND_HELPER_SPINS, HAND_READY, \
    HAND_TAKEN = 0, 8, 16, 24, 25, 26, 32, 33
HAND_SIZE = 40


@kernel(inline="always")
def team_begin(w, hand):
    """First thing in a two-thread worker ``fn(w, hand, ...)``; returns the ``jb`` to pass
    to :func:`team_end`. Worker 0 posts the job (its GIL is released by now, so a spinning
    helper that sees the post takes the GIL without a wait) and gets the job number (0:
    alone). The helper joins the job whose arguments it took (``HAND_TAKEN``, set with
    them by ``_team``: never a newer one, whose buffers it does not hold) and gets its
    number, unless that job is over (the caller closed it, finished without the helper,
    or a later job was joined or closed since): then it gets the number negated and must
    skip the work. Joining and closing are one compare-and-swap each on ``HAND_JOINED``,
    so exactly one of them happens."""
    if w == 0:
        job = hand[HAND_JOB]
        if job > 0:
            atomic_store(hand, HAND_POSTED, job)
        return job
    job = hand[HAND_TAKEN]
    while True:
        v = atomic_load(hand, HAND_JOINED)
        if v >= job or -v >= job:
            return -job
        if atomic_cas(hand, HAND_JOINED, v, job) == v:
            return job


@kernel(inline="always")
def team_end(w, hand, jb):
    """Last thing in a two-thread worker, with :func:`team_begin`'s ``jb``. Worker 0 closes
    the job if the helper has not joined it (the helper, blocked or not scheduled, may
    take milliseconds to come, e.g. behind an OpenBLAS thread spinning on its CPU, and
    worker 0 has done all the work by now); else it spins until the helper has finished
    (at most its budget). Returns whether the job is over for the caller. The helper marks
    a job it joined finished, then spins until a newer job is posted (at most its budget;
    returns whether one was), so a layer's next call finds it awake."""
    if w == 0:
        if jb <= 0:
            return True
        while True:
            v = atomic_load(hand, HAND_JOINED)
            if v == jb:
                return _spin(hand, HAND_FINISHED, jb, hand[HAND_CALLER_SPINS])
            if atomic_cas(hand, HAND_JOINED, v, -jb) == v:
                return True
    job = jb if jb > 0 else -jb
    if jb > 0:
        atomic_store(hand, HAND_FINISHED, job)
    return _spin(hand, HAND_POSTED, job + 1, hand[HAND_HELPER_SPINS])
