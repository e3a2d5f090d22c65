"""Atomic operations on ``int64`` array elements for compiled code shared by two threads
(:mod:`._split`): compare-and-swap, fetch-and-add, load, all sequentially consistent, and
a spin-wait hint. LLVM IR through ``@intrinsic``; Numba has no atomics of its own."""

import platform

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from ._jit import kernel

_i64 = ir.IntType(64)
_X86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")


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


@intrinsic
def atomic_add(typingctx, arr, idx, val):
    """``arr[idx] += val`` atomically; returns the old value."""
    if not _check(arr):
        return None

    def codegen(context, builder, sig, args):
        va, vi, vv = args
        ptr = _element_ptr(context, builder, sig.args[0], va, vi, sig.args[1])
        return builder.atomic_rmw("add", ptr, context.cast(builder, vv, sig.args[2], types.int64), "seq_cst")

    return types.int64(arr, idx, val), codegen


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


@kernel(inline="always")
def wait_at_least(arr, idx, value):
    """Spin until ``arr[idx] >= value``."""
    while atomic_load(arr, idx) < value:
        spin_pause()
