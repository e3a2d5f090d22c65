"""BLAS GEMM callable from Numba kernels, on row-major (C-order) buffers with offsets.

Numba's ``np.dot`` allocates its result and needs whole contiguous arrays. The kernels
need more: write into a block of rows of a larger buffer, accumulate (``beta=1``),
transpose either operand, and address column blocks through a leading dimension. This
module calls the same BLAS that ``np.dot`` uses inside Numba (SciPy's, through Numba's
``numba_xxgemm`` helper, which looks the routine up once and is thread-safe) with the full
GEMM interface. The call is resolved by symbol name, so cached kernels stay valid in a new
process.
"""

import ctypes
import glob
import os

from llvmlite import binding as llvm
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from ._jit import kernel

#: Symbol the kernels call to set the calling thread's BLAS thread count (returns the
#: previous value). Bound at import time to OpenBLAS's ``openblas_set_num_threads_local``
#: in SciPy's BLAS when present, else to a no-op; resolved by name, so cached code works.
_THREADS_SYMBOL = "fastseq_blas_set_threads_local"
_keepalive = []


def _bind_thread_control():
    addr = None
    try:
        import scipy

        pattern = os.path.join(os.path.dirname(scipy.__file__) + ".libs", "*openblas*")
        for path in sorted(glob.glob(pattern)):
            lib = ctypes.CDLL(path)
            fn = getattr(lib, "openblas_set_num_threads_local", None)
            if fn is not None:
                addr = ctypes.cast(fn, ctypes.c_void_p).value
                _keepalive.append(lib)
                break
    except Exception:  # pragma: no cover - unusual SciPy builds
        addr = None
    if addr is None:
        noop = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int)(lambda n: 0)
        _keepalive.append(noop)
        addr = ctypes.cast(noop, ctypes.c_void_p).value
    llvm.add_symbol(_THREADS_SYMBOL, addr)
    return addr


BLAS_THREAD_CONTROL = _bind_thread_control()
blas_set_threads_local = types.ExternalFunction(_THREADS_SYMBOL, types.int32(types.int32))

_ll_char = ir.IntType(8)
_ll_voidp = ir.IntType(8).as_pointer()
_ll_intp = ir.IntType(64)


@intrinsic
def _gemm_colmajor(typingctx, transa, transb, m, n, k, alpha, a, aoff, lda, b, boff, ldb, beta, c, coff, ldc):
    """Fortran-order ``C = alpha op(A) op(B) + beta C`` on array data pointers + offsets."""
    if not (isinstance(a, types.Array) and isinstance(b, types.Array) and isinstance(c, types.Array)):
        return None
    if not (a.dtype == b.dtype == c.dtype) or a.dtype not in (types.float32, types.float64):
        return None
    dtype = a.dtype
    kind = "s" if dtype == types.float32 else "d"
    sig = types.int32(transa, transb, m, n, k, alpha, a, aoff, lda, b, boff, ldb, beta, c, coff, ldc)

    def codegen(context, builder, signature, args):
        (ta, tb, vm, vn, vk, valpha, va, vaoff, vlda, vb, vboff, vldb, vbeta, vc, vcoff, vldc) = args
        sa = signature.args
        fnty = ir.FunctionType(
            ir.IntType(32),
            [_ll_char, _ll_char, _ll_char, _ll_intp, _ll_intp, _ll_intp, _ll_voidp, _ll_voidp, _ll_intp,
             _ll_voidp, _ll_intp, _ll_voidp, _ll_voidp, _ll_intp],
        )
        fn = cgutils.get_or_insert_function(builder.module, fnty, "numba_xxgemm")

        def as_intp(val, ty):
            return context.cast(builder, val, ty, types.intp)

        def ptr(arrty, arrval, off, offty):
            ary = context.make_array(arrty)(context, builder, arrval)
            p = builder.gep(ary.data, [as_intp(off, offty)])
            return builder.bitcast(p, _ll_voidp)

        def trans_char(val, ty):
            flag = builder.icmp_signed("!=", as_intp(val, ty), ir.Constant(_ll_intp, 0))
            return builder.select(flag, ir.Constant(_ll_char, ord("t")), ir.Constant(_ll_char, ord("n")))

        llty = context.get_value_type(dtype)
        alpha_slot = cgutils.alloca_once_value(builder, context.cast(builder, valpha, sa[5], dtype))
        beta_slot = cgutils.alloca_once_value(builder, context.cast(builder, vbeta, sa[12], dtype))
        assert alpha_slot.type.pointee == llty
        res = builder.call(
            fn,
            (
                ir.Constant(_ll_char, ord(kind)),
                trans_char(ta, sa[0]),
                trans_char(tb, sa[1]),
                as_intp(vm, sa[2]),
                as_intp(vn, sa[3]),
                as_intp(vk, sa[4]),
                builder.bitcast(alpha_slot, _ll_voidp),
                ptr(sa[6], va, vaoff, sa[7]),
                as_intp(vlda, sa[8]),
                ptr(sa[9], vb, vboff, sa[10]),
                as_intp(vldb, sa[11]),
                builder.bitcast(beta_slot, _ll_voidp),
                ptr(sa[13], vc, vcoff, sa[14]),
                as_intp(vldc, sa[15]),
            ),
        )
        return res

    return sig, codegen


#: Products with fewer multiply-adds than this run single-threaded (see :func:`gemm`).
MULTITHREAD_MIN_MACS = 1 << 25


@kernel
def gemm(transa, transb, m, n, k, alpha, a, aoff, lda, b, boff, ldb, beta, c, coff, ldc):
    """Row-major ``C[m, n] = alpha * op(A) @ op(B) + beta * C``.

    ``A``, ``B``, ``C`` are C-contiguous arrays (any rank) addressed from element offsets
    ``aoff``, ``boff``, ``coff`` with leading dimensions (row strides, in elements) ``lda``,
    ``ldb``, ``ldc``; ``op(X)`` is ``X.T`` when the flag is non-zero. ``op(A)`` is
    ``[m, k]``, ``op(B)`` is ``[k, n]``. Empty products are handled without calling BLAS.
    """
    if m <= 0 or n <= 0:
        return
    if k <= 0:
        for i in range(m):
            base = coff + i * ldc
            for j in range(n):
                if beta == 0:
                    c.flat[base + j] = 0
                else:
                    c.flat[base + j] *= beta
        return
    # Row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T.
    if m * n * k < MULTITHREAD_MIN_MACS:
        # Small products: BLAS threads cost more than they save (and far more when other
        # processes share the cores), so run them on the calling thread.
        prev = blas_set_threads_local(1)
        _gemm_colmajor(transb, transa, n, m, k, alpha, b, boff, max(ldb, 1), a, aoff, max(lda, 1), beta, c, coff,
                       max(ldc, 1))
        blas_set_threads_local(prev)
    else:
        _gemm_colmajor(transb, transa, n, m, k, alpha, b, boff, max(ldb, 1), a, aoff, max(lda, 1), beta, c, coff,
                       max(ldc, 1))


#: Row count up to which per-step products use the in-house loop instead of BLAS (BLAS's
#: call overhead and packing dominate for a handful of rows, e.g. batch size 1).
SMALL_M = 4


@kernel
def gemm_acc_small(m, n, k, a, aoff, lda, b, boff, ldb, c, coff, ldc):
    """Row-major ``C[m, n] += A[m, k] @ B[k, n]`` as plain loops, vectorised over ``n``
    (row views keep the inner loop free of index arithmetic)."""
    af = a.reshape(a.size)
    bf = b.reshape(b.size)
    cf = c.reshape(c.size)
    i = 0
    while i + 1 < m:  # two rows at a time: each row of B is read once per pair
        c0 = cf[coff + i * ldc: coff + i * ldc + n]
        c1 = cf[coff + (i + 1) * ldc: coff + (i + 1) * ldc + n]
        a0 = aoff + i * lda
        for p in range(k):
            x0 = af[a0 + p]
            x1 = af[a0 + lda + p]
            br = bf[boff + p * ldb: boff + p * ldb + n]
            for j in range(n):
                w = br[j]
                c0[j] += x0 * w
                c1[j] += x1 * w
        i += 2
    if i < m:
        c0 = cf[coff + i * ldc: coff + i * ldc + n]
        a0 = aoff + i * lda
        for p in range(k):
            x0 = af[a0 + p]
            br = bf[boff + p * ldb: boff + p * ldb + n]
            for j in range(n):
                c0[j] += x0 * br[j]


@kernel
def step_gemm_acc(m, n, k, a, aoff, lda, b, boff, ldb, c, coff, ldc):
    """Per-step ``C += A @ B`` (row-major, offsets as :func:`gemm`): in-house loops for
    ``m <= SMALL_M``, else BLAS."""
    if m <= SMALL_M:
        gemm_acc_small(m, n, k, a, aoff, lda, b, boff, ldb, c, coff, ldc)
    else:
        gemm(0, 0, m, n, k, 1.0, a, aoff, lda, b, boff, ldb, 1.0, c, coff, ldc)
