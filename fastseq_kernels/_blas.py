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

#: ``OPENBLAS_THREAD_TIMEOUT`` for SciPy's OpenBLAS when the kernels load it first: its
#: idle threads spin for ``2**n`` CPU cycles after a parallel call before they sleep.
#: OpenBLAS's default (28: about 0.1 s) keeps a core busy long after a layer's last
#: two-thread product, and the two-thread time loops that follow (``_team``) then share
#: that core with a spinning thread: measured on the 2-core machine, P2 training with the
#: two-thread GRU loop 37-41 ms at the default, 28-33 ms at 22 (about 1.6 ms at 2.6 GHz,
#: still longer than the gap between the per-step products of one loop).
OPENBLAS_THREAD_TIMEOUT = "22"


def _load_blas(path):
    """``ctypes.CDLL(path)`` with ``OPENBLAS_THREAD_TIMEOUT`` set for the load (OpenBLAS
    reads it once, when the library initialises) unless the user set it; the process
    environment is left as it was. No effect when the library is already loaded."""
    key = "OPENBLAS_THREAD_TIMEOUT"
    if key in os.environ:
        return ctypes.CDLL(path)
    os.environ[key] = OPENBLAS_THREAD_TIMEOUT
    try:
        return ctypes.CDLL(path)
    finally:
        del os.environ[key]


def _bind_thread_control():
    addr = None
    try:
        import scipy

        pattern = os.path.join(os.path.dirname(scipy.__file__) + ".libs", "*openblas*")
        for path in sorted(glob.glob(pattern)):
            lib = _load_blas(path)
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


#: Products with fewer multiply-adds than this run on the calling thread alone: below
#: about 2^20 (a [32, 200] x [200, 200] step product, ~50 us) OpenBLAS's thread hand-off
#: costs more than the second core saves (measured on the reference 2-core machine).
PARALLEL_MIN_MACS = 1 << 20


@kernel
def gemm(transa, transb, m, n, k, alpha, a, aoff, lda, b, boff, ldb, beta, c, coff, ldc, nthreads):
    """Row-major ``C[m, n] = alpha * op(A) @ op(B) + beta * C``.

    ``A``, ``B``, ``C`` are C-contiguous arrays (any rank) addressed from element offsets
    ``aoff``, ``boff``, ``coff`` with leading dimensions (row strides, in elements) ``lda``,
    ``ldb``, ``ldc``; ``op(X)`` is ``X.T`` when the flag is non-zero. ``op(A)`` is
    ``[m, k]``, ``op(B)`` is ``[k, n]``. Empty products are handled without calling BLAS.
    ``nthreads``: BLAS threads allowed for this product (the caller's share of the cores,
    see :mod:`fastseq.threads`); products below :data:`PARALLEL_MIN_MACS` use one.
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
    nt = nthreads if m * n * k >= PARALLEL_MIN_MACS else 1
    if nt < 1:
        nt = 1
    # The thread count is set for every product (the setting is process-wide in OpenBLAS,
    # so another thread may have changed it since) and put back afterwards.
    prev = blas_set_threads_local(nt)
    # Row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T.
    _gemm_colmajor(transb, transa, n, m, k, alpha, b, boff, max(ldb, 1), a, aoff, max(lda, 1), beta, c, coff,
                   max(ldc, 1))
    blas_set_threads_local(prev)


#: Row count up to which per-step products use the in-house loop instead of BLAS. OpenBLAS
#: is slow on a few rows (call overhead and packing): on the reference machine, float32
#: [4, 256] x [256, 1024] took 281 us in single-threaded OpenBLAS and 69 us in these
#: loops; they stay ahead up to about 12 rows (float32 and float64, measured).
SMALL_M = 12


@kernel
def gemm_acc_small(m, n, k, a, aoff, lda, b, boff, ldb, c, coff, ldc):
    """Row-major ``C[m, n] += A[m, k] @ B[k, n]`` as plain loops, vectorised over ``n``.
    Rows of ``C`` go in pairs (each row of ``B`` is loaded once for two rows) and four
    rows of ``B`` are combined per pass (``C`` is loaded and stored a quarter as often):
    the loop is bound by loads and stores, not arithmetic. Row views keep the inner loop
    free of index arithmetic."""
    af = a.reshape(a.size)
    bf = b.reshape(b.size)
    cf = c.reshape(c.size)
    i = 0
    while i + 1 < m:
        c0 = cf[coff + i * ldc: coff + i * ldc + n]
        c1 = cf[coff + (i + 1) * ldc: coff + (i + 1) * ldc + n]
        a0 = aoff + i * lda
        a1 = a0 + lda
        p = 0
        while p + 4 <= k:
            x0 = af[a0 + p]
            x1 = af[a0 + p + 1]
            x2 = af[a0 + p + 2]
            x3 = af[a0 + p + 3]
            y0 = af[a1 + p]
            y1 = af[a1 + p + 1]
            y2 = af[a1 + p + 2]
            y3 = af[a1 + p + 3]
            r = boff + p * ldb
            b0 = bf[r: r + n]
            b1 = bf[r + ldb: r + ldb + n]
            b2 = bf[r + 2 * ldb: r + 2 * ldb + n]
            b3 = bf[r + 3 * ldb: r + 3 * ldb + n]
            for j in range(n):
                w0 = b0[j]
                w1 = b1[j]
                w2 = b2[j]
                w3 = b3[j]
                c0[j] += (x0 * w0 + x1 * w1) + (x2 * w2 + x3 * w3)
                c1[j] += (y0 * w0 + y1 * w1) + (y2 * w2 + y3 * w3)
            p += 4
        while p < k:
            x0 = af[a0 + p]
            y0 = af[a1 + p]
            b0 = bf[boff + p * ldb: boff + p * ldb + n]
            for j in range(n):
                c0[j] += x0 * b0[j]
                c1[j] += y0 * b0[j]
            p += 1
        i += 2
    if i < m:
        c0 = cf[coff + i * ldc: coff + i * ldc + n]
        a0 = aoff + i * lda
        p = 0
        while p + 4 <= k:
            x0 = af[a0 + p]
            x1 = af[a0 + p + 1]
            x2 = af[a0 + p + 2]
            x3 = af[a0 + p + 3]
            r = boff + p * ldb
            b0 = bf[r: r + n]
            b1 = bf[r + ldb: r + ldb + n]
            b2 = bf[r + 2 * ldb: r + 2 * ldb + n]
            b3 = bf[r + 3 * ldb: r + 3 * ldb + n]
            for j in range(n):
                c0[j] += (x0 * b0[j] + x1 * b1[j]) + (x2 * b2[j] + x3 * b3[j])
            p += 4
        while p < k:
            x0 = af[a0 + p]
            b0 = bf[boff + p * ldb: boff + p * ldb + n]
            for j in range(n):
                c0[j] += x0 * b0[j]
            p += 1


#: float32 only: row count up to which per-step products use :func:`gemm_acc_rows4`
#: (four rows at a time, fused multiply-adds). Single-threaded on the reference machine,
#: float32 [m, 256] x [256, 1024], [m, 200] x [200, 600] and [m, 512] x [512, 2048] ran at
#: 36-48 GFLOP/s in these loops against 22-36 in OpenBLAS for m from 12 to 32 (medians of
#: 7 interleaved runs); from 40 rows OpenBLAS was ahead. For float64 OpenBLAS was ahead
#: from about 12 rows with or without fused multiply-adds, so float64 keeps ``SMALL_M``.
SMALL_M_F32 = 32


@kernel(fastmath={"contract"})
def gemm_acc_rows4(m, n, k, a, aoff, lda, b, boff, ldb, c, coff, ldc):
    """Row-major ``C[m, n] += A[m, k] @ B[k, n]`` four rows of ``C`` at a time (each row
    of ``B`` is loaded once for four rows, four rows of ``B`` combined per pass), with
    fused multiply-adds (``fastmath={"contract"}``: one rounding per multiply-add
    instead of two; nothing else is reassociated). Returns the rows done, ``m`` rounded
    down to a multiple of four; the caller does the rest."""
    af = a.reshape(a.size)
    bf = b.reshape(b.size)
    cf = c.reshape(c.size)
    i = 0
    while i + 3 < m:
        r0 = coff + i * ldc
        c0 = cf[r0: r0 + n]
        c1 = cf[r0 + ldc: r0 + ldc + n]
        c2 = cf[r0 + 2 * ldc: r0 + 2 * ldc + n]
        c3 = cf[r0 + 3 * ldc: r0 + 3 * ldc + n]
        a0 = aoff + i * lda
        a1 = a0 + lda
        a2 = a1 + lda
        a3 = a2 + lda
        p = 0
        while p + 4 <= k:
            x0, x1, x2, x3 = af[a0 + p], af[a0 + p + 1], af[a0 + p + 2], af[a0 + p + 3]
            y0, y1, y2, y3 = af[a1 + p], af[a1 + p + 1], af[a1 + p + 2], af[a1 + p + 3]
            z0, z1, z2, z3 = af[a2 + p], af[a2 + p + 1], af[a2 + p + 2], af[a2 + p + 3]
            u0, u1, u2, u3 = af[a3 + p], af[a3 + p + 1], af[a3 + p + 2], af[a3 + p + 3]
            r = boff + p * ldb
            b0 = bf[r: r + n]
            b1 = bf[r + ldb: r + ldb + n]
            b2 = bf[r + 2 * ldb: r + 2 * ldb + n]
            b3 = bf[r + 3 * ldb: r + 3 * ldb + n]
            for j in range(n):
                w0 = b0[j]
                w1 = b1[j]
                w2 = b2[j]
                w3 = b3[j]
                c0[j] += (x0 * w0 + x1 * w1) + (x2 * w2 + x3 * w3)
                c1[j] += (y0 * w0 + y1 * w1) + (y2 * w2 + y3 * w3)
                c2[j] += (z0 * w0 + z1 * w1) + (z2 * w2 + z3 * w3)
                c3[j] += (u0 * w0 + u1 * w1) + (u2 * w2 + u3 * w3)
            p += 4
        while p < k:
            x0, y0, z0, u0 = af[a0 + p], af[a1 + p], af[a2 + p], af[a3 + p]
            b0 = bf[boff + p * ldb: boff + p * ldb + n]
            for j in range(n):
                w0 = b0[j]
                c0[j] += x0 * w0
                c1[j] += y0 * w0
                c2[j] += z0 * w0
                c3[j] += u0 * w0
            p += 1
        i += 4
    return i


@kernel
def step_gemm_acc(m, n, k, a, aoff, lda, b, boff, ldb, c, coff, ldc, nthreads):
    """Per-step ``C += A @ B`` (row-major, offsets as :func:`gemm`) on unpacked weights
    (the kernels use :func:`fastseq_kernels._packed.step_product`, which comes here for
    loops of fewer than ``PACK_MIN_STEPS`` steps): in-house loops for
    ``m <= SMALL_M`` (float32: ``m <= SMALL_M_F32`` unless the product is large enough
    for two BLAS threads and ``nthreads`` allows them), else BLAS."""
    if c.itemsize == 4 and m <= SMALL_M_F32 and (nthreads < 2 or m * n * k < PARALLEL_MIN_MACS):
        done = gemm_acc_rows4(m, n, k, a, aoff, lda, b, boff, ldb, c, coff, ldc)
        if done < m:
            gemm_acc_small(m - done, n, k, a, aoff + done * lda, lda, b, boff, ldb, c, coff + done * ldc, ldc)
    elif m <= SMALL_M:
        gemm_acc_small(m, n, k, a, aoff, lda, b, boff, ldb, c, coff, ldc)
    else:
        gemm(0, 0, m, n, k, 1.0, a, aoff, lda, b, boff, ldb, 1.0, c, coff, ldc, nthreads)
