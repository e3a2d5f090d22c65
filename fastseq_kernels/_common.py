"""Pieces shared by the cell kernels: activations by integer code, the batch plan
(sort by length, shrinking active batch, row blocks per step), gathers and scatters.

Row bookkeeping used by every kernel (``B`` rows, ``T`` steps; sequence arrays are
time-major ``[T, B, D]``, or batch-major ``[B, T, D]`` where a kernel's ``bm`` is set,
see :func:`dims`):

- ``order [B]``: rows sorted by length, longest first (stable); sorted row ``r`` is batch
  row ``order[r]``; ``lens_s[r]`` its length.
- ``nb [L+1]``: rows still running at processing step ``k`` (``nb[L] = 0``); the active
  rows at step ``k`` are the sorted rows ``0 .. nb[k]-1``, so every per-step GEMM runs on
  a contiguous block of ``nb[k]`` rows: finished sequences cost nothing.
- ``base [L+1]``: first row of step ``k``'s block in the per-step buffers ``[R, ...]``.
  *Uniform* batches (every length is ``T``; no sorting needed) have ``R = T*B`` and
  ``base[k] = t*B`` with ``t = k`` or ``T-1-k`` (reverse): time-major, that is the input
  itself, no copy even for the backward direction (:func:`direct_rows`). Otherwise the
  valid rows are packed step by step, ``R = sum(lengths)``, ``base[k] = nb[0] + ... +
  nb[k-1]``.
- Processing step ``k`` of sorted row ``r`` reads time ``t = k`` or, with ``reverse``,
  ``t = lens_s[r] - 1 - k``.
"""

import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic, overload

from ._jit import kernel

# Integer codes follow fastseq.contract.ACTIVATIONS.
TANH, SIGMOID, RELU, RELU6, ELU, SOFTSIGN, SOFTPLUS, LINEAR = range(8)


@intrinsic
def _int32_bits_as_float32(typingctx, i):
    if i != types.int32:
        return None

    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.int32), codegen


def _host_has_fma():
    try:
        import llvmlite.binding as llvm

        return bool(llvm.get_host_cpu_features().get("fma", False))
    except Exception:  # pragma: no cover - feature query unavailable: plain multiply-add
        return False


#: Whether :func:`_fma32` emits a fused multiply-add (one rounding) or a multiply then an
#: add: kernels are compiled for the host CPU, and on one without FMA units ``llvm.fma``
#: would become a scalar ``fmaf`` call that no loop vectorises.
HOST_FMA = _host_has_fma()


@intrinsic
def _fma32(typingctx, a, b, c):
    """``a * b + c`` in float32 as one fused multiply-add where the host has FMA units.
    Numba compiles with IEEE semantics (``fastmath=False``), so LLVM never contracts a
    multiply and an add by itself; the polynomials of :func:`_exp32` and :func:`_tanh32`
    ask for it explicitly (one rounding instead of two: as accurate or more, and half the
    instructions on their dependency chain)."""
    if not (a == types.float32 and b == types.float32 and c == types.float32):
        return None

    def codegen(context, builder, sig, args):
        if HOST_FMA:
            return builder.fma(args[0], args[1], args[2])
        return builder.fadd(builder.fmul(args[0], args[1]), args[2])

    return types.float32(types.float32, types.float32, types.float32), codegen


@kernel(inline="always")
def _exp32(x):
    """float32 exp without a libm call (Cody-Waite reduction, degree-7 polynomial in fused
    multiply-adds, exponent built from bits): relative error below 1e-7 over the whole
    range, branch-free so loops over it vectorise."""
    x = min(max(x, np.float32(-87.0)), np.float32(88.0))
    n = np.floor(_fma32(x, np.float32(1.44269504), np.float32(0.5)))
    r = _fma32(n, np.float32(-0.693359375), x)
    r = _fma32(n, np.float32(2.12194440e-4), r)
    p = np.float32(1.0 / 5040.0)
    p = _fma32(p, r, np.float32(1.0 / 720.0))
    p = _fma32(p, r, np.float32(1.0 / 120.0))
    p = _fma32(p, r, np.float32(1.0 / 24.0))
    p = _fma32(p, r, np.float32(1.0 / 6.0))
    p = _fma32(p, r, np.float32(0.5))
    p = _fma32(p, r, np.float32(1.0))
    p = _fma32(p, r, np.float32(1.0))
    return p * _int32_bits_as_float32(np.int32((np.int32(n) + np.int32(127)) << np.int32(23)))


@kernel(inline="always")
def _tanh32(x):
    """float32 tanh as a rational function of ``x``, ``x P(x^2) / Q(x^2)`` with the
    argument clamped to +-7.905 (where float32 tanh is 1): Eigen's minimax coefficients,
    the form TensorFlow's CPU kernels use. Within 3e-7 relative of tanh everywhere
    (``x`` itself below 4e-4, where that is tanh to float32 precision), ``|tanh| < 1``;
    one division and no exp, so about half the cost of ``(e - 1) / (e + 1)`` on
    :func:`_exp32` with a polynomial near 0 (0.27 against 0.48 ns per element,
    vectorised, on the Zen 4 machine). Branch-free."""
    c = np.float32(7.90531110763549805)
    xc = min(max(x, -c), c)
    x2 = xc * xc
    p = np.float32(-2.76076847742355e-16)
    p = _fma32(x2, p, np.float32(2.00018790482477e-13))
    p = _fma32(x2, p, np.float32(-8.60467152213735e-11))
    p = _fma32(x2, p, np.float32(5.12229709037114e-08))
    p = _fma32(x2, p, np.float32(1.48572235717979e-05))
    p = _fma32(x2, p, np.float32(6.37261928875436e-04))
    p = _fma32(x2, p, np.float32(4.89352455891786e-03))
    q = np.float32(1.19825839466702e-06)
    q = _fma32(x2, q, np.float32(1.18534705686654e-04))
    q = _fma32(x2, q, np.float32(2.26843463243900e-03))
    q = _fma32(x2, q, np.float32(4.89352518554385e-03))
    t = xc * p / q
    return x if abs(x) < np.float32(0.0004) else t


def fexp(x):
    """exp; float32 uses :func:`_exp32` (vectorisable), float64 libm."""


def ftanh(x):
    """tanh; float32 uses :func:`_tanh32` (vectorisable), float64 libm."""


@overload(fexp, inline="always")
def _fexp_ov(x):
    if x == types.float32:
        return lambda x: _exp32(x)
    return lambda x: np.exp(x)


@overload(ftanh, inline="always")
def _ftanh_ov(x):
    if x == types.float32:
        return lambda x: _tanh32(x)
    return lambda x: np.tanh(x)


def sigmoid(x):
    """Logistic function: float32 branch-free on :func:`_exp32` (its argument is clamped,
    so ``1 + exp(-x)`` never overflows); float64 the stable two-sided libm form."""


@overload(sigmoid, inline="always")
def _sigmoid_ov(x):
    if x == types.float32:
        return lambda x: np.float32(1.0) / (np.float32(1.0) + _exp32(-x))

    def impl(x):
        if x >= 0:
            return 1.0 / (1.0 + np.exp(-x))
        e = np.exp(x)
        return e / (1.0 + e)

    return impl


@kernel(inline="always")
def act(x, code):
    """Activation ``code`` applied to the scalar ``x`` (same dtype out)."""
    zero = type(x)(0.0)
    if code == TANH:
        return ftanh(x)
    if code == SIGMOID:
        return sigmoid(x)
    if code == RELU:
        return x if x > zero else zero
    if code == RELU6:
        six = type(x)(6.0)
        return zero if x < zero else (six if x > six else x)
    if code == ELU:
        return x if x > zero else np.expm1(x)
    if code == SOFTSIGN:
        return x / (type(x)(1.0) + abs(x))
    if code == SOFTPLUS:
        return (x if x > zero else zero) + np.log1p(np.exp(-abs(x)))
    return x


@kernel(inline="always")
def dact(z, y, code):
    """Derivative of activation ``code`` at ``z`` given ``y = act(z)`` (TF's conventions:
    relu'(0) = 0, relu6' = 1 on the open interval (0, 6))."""
    one = type(y)(1.0)
    zero = type(y)(0.0)
    if code == TANH:
        return one - y * y
    if code == SIGMOID:
        return y * (one - y)
    if code == RELU:
        return one if z > zero else zero
    if code == RELU6:
        return one if (z > zero and z < type(y)(6.0)) else zero
    if code == ELU:
        return one if z > zero else y + one
    if code == SOFTSIGN:
        d = one + abs(z)
        return one / (d * d)
    if code == SOFTPLUS:
        return sigmoid(z)
    return one


@kernel(inline="always")
def output_activation_stored(code):
    """True when kernels store an activation's *output* for the backward pass (its
    derivative is exact from the output: tanh, sigmoid); else they store the input."""
    return code == TANH or code == SIGMOID


@kernel
def make_plan(lengths, T, reverse, need_grad):
    """Sort rows by length and lay out per-step row blocks.

    lengths int64 [B] (0 <= len <= T). Returns ``(order, lens_s, nb, base, hbase, R,
    uniform)``; ``hbase[k]`` is the block of the carried state before step ``k``: equal to
    ``base`` when ``need_grad`` (the history is kept), else ping-pong rows ``(k % 2) * B``.
    """
    B = lengths.shape[0]
    uniform = True
    for b in range(B):
        if lengths[b] != T:
            uniform = False
    if uniform:
        order = np.arange(B)
    else:
        order = np.argsort(-lengths, kind="mergesort")
    lens_s = np.empty(B, np.int64)
    for r in range(B):
        lens_s[r] = lengths[order[r]]
    L = lens_s[0] if B > 0 else 0
    nb = np.zeros(L + 1, np.int64)
    r = B
    for k in range(L):
        while r > 0 and lens_s[r - 1] <= k:
            r -= 1
        nb[k] = r
    base = np.zeros(L + 1, np.int64)
    if uniform:
        for k in range(L + 1):
            t = (T - 1 - k) if reverse else k
            base[k] = t * B if k < L else 0
        R = T * B
    else:
        acc = 0
        for k in range(L + 1):
            base[k] = acc
            acc += nb[k]
        R = acc
    hbase = np.zeros(L + 1, np.int64)
    for k in range(L + 1):
        hbase[k] = base[k] if need_grad else (k % 2) * B
    return order, lens_s, nb, base, hbase, R, uniform


@kernel(inline="always")
def time_index(k, r, lens_s, reverse):
    return lens_s[r] - 1 - k if reverse else k


@kernel(inline="always")
def dims(a, bm):
    """``(T, B, D)`` of a sequence array: ``[T, B, D]``, or ``[B, T, D]`` when ``bm``
    (batch-major: the kernels read inputs and cotangents and write outputs and input
    gradients in the caller's layout, so no transposed copy is made around them)."""
    if bm:
        return a.shape[1], a.shape[0], a.shape[2]
    return a.shape[0], a.shape[1], a.shape[2]


@kernel(inline="always")
def row3(a, t, b, bm):
    """The ``[D]`` row of time ``t`` and batch row ``b`` of a sequence array (see :func:`dims`)."""
    return a[b, t] if bm else a[t, b]


@kernel(inline="always")
def direct_rows(uniform, bm, B):
    """Whether a layer reads its input rows from ``x`` and writes its outputs into ``y``
    in place (a uniform batch, time-major or of one row, where both layouts are the same
    memory: the plan's row blocks are ``x``'s own), instead of :func:`gather_rows` /
    :func:`scatter_rows`."""
    return uniform and (not bm or B == 1)


@kernel(inline="always")
def plan_and_inputs(x, lengths, reverse, need_grad, bm, gather):
    """:func:`make_plan` and the input rows ``X [R, I]`` in plan order: ``x`` itself for a
    uniform time-major batch (no copy, either direction), else :func:`gather_rows`, or
    without ``gather`` a buffer left unwritten (the two-thread workers copy their chunks
    of it, :func:`gather_range`)."""
    T, B, I = dims(x, bm)
    order, lens_s, nb, base, hbase, R, uniform = make_plan(lengths, T, reverse, need_grad)
    if direct_rows(uniform, bm, B):
        X = x.reshape(T * B, I)
    elif gather:
        X = gather_rows(x, order, lens_s, nb, base, R, reverse, bm)
    else:
        X = np.empty((R, I), x.dtype)
    return order, lens_s, nb, base, hbase, R, uniform, X


@kernel(inline="always")
def rows_buffer(shape, uniform, dt):
    """A sequence array in the caller's layout for workers to write row by row: where the
    plan is uniform every element is written, else it starts as zeros (past each
    length)."""
    return np.empty(shape, dt) if uniform else np.zeros(shape, dt)


@kernel(inline="always")
def part_step(k, p, S, nb, base, hbase):
    """Step ``k`` of the row part ``p`` of ``S`` (sorted rows ``p``, ``p + S``, ...) in the
    row-split loops: ``(n, m, nn, gb, hb, nhb)``, the rows active at step ``k``, how many of
    them are the part's (0: the part is done, active rows only shrink), the rows active at
    step ``k + 1``, the step's first row in the per-step buffers, and the carried-state
    blocks before and after the step."""
    n = nb[k]
    return n, (n - p + S - 1) // S, nb[k + 1], base[k], hbase[k], hbase[k + 1]


@kernel
def gather_rows(x, order, lens_s, nb, base, R, reverse, bm):
    """Pack the valid rows of ``x`` (``[T, B, D]``, or ``[B, T, D]`` when ``bm``) step by
    step: ``[R, D]``."""
    D = x.shape[2]
    out = np.empty((R, D), x.dtype)
    for k in range(nb.shape[0] - 1):
        for r in range(nb[k]):
            src = row3(x, time_index(k, r, lens_s, reverse), order[r], bm)
            dst = out[base[k] + r]
            for j in range(D):
                dst[j] = src[j]
    return out


@kernel(inline="always")
def _range_start(g0, nb, base, uniform):
    """The step ``k`` and sorted row ``r`` of plan row ``g0`` (:func:`_range_row` walks on
    from there)."""
    k = 0
    r = 0
    if not uniform:
        while base[k] + nb[k] <= g0:
            k += 1
        r = g0 - base[k]
    return k, r


@kernel(inline="always")
def _range_row(g, k, r, order, lens_s, nb, uniform, reverse):
    """Plan row ``g``'s time and batch row, and the cursor ``(k, r)`` moved past it. In a
    uniform plan row ``g`` is time ``g // B`` and sorted row ``g % B``; otherwise the
    steps' blocks follow one another in ``base``."""
    if uniform:
        B = order.shape[0]
        return g // B, order[g % B], k, r
    while r >= nb[k]:
        k += 1
        r = 0
    return time_index(k, r, lens_s, reverse), order[r], k, r + 1


@kernel(inline="always")
def gather_range(x, X, g0, g1, order, lens_s, nb, base, uniform, reverse, bm):
    """Rows ``g0:g1`` of :func:`gather_rows`'s result, written into ``X``: the slice of
    the gather that a two-thread worker copies just before projecting it, each its own
    chunks (:func:`.lstm._project_rows`, :func:`.gru._project_chunks`), instead of one
    serial pass before the job."""
    D = X.shape[1]
    k, r = _range_start(g0, nb, base, uniform)
    for g in range(g0, g1):
        t, b, k, r = _range_row(g, k, r, order, lens_s, nb, uniform, reverse)
        src = row3(x, t, b, bm)
        dst = X[g]
        for j in range(D):
            dst[j] = src[j]


@kernel(inline="always")
def scatter_range(X, y, g0, g1, order, lens_s, nb, base, uniform, reverse, bm):
    """Rows ``g0:g1`` of :func:`scatter_rows`: ``X``'s plan-order rows into ``y`` (the
    caller's layout, already zero past each length), the slice a worker copies right
    after the product that wrote it (:func:`.gru.gru_backward_tail_worker`)."""
    D = X.shape[1]
    k, r = _range_start(g0, nb, base, uniform)
    for g in range(g0, g1):
        t, b, k, r = _range_row(g, k, r, order, lens_s, nb, uniform, reverse)
        src = X[g]
        dst = row3(y, t, b, bm)
        for j in range(D):
            dst[j] = src[j]


@kernel(inline="always")
def rows_out(rows, T, B, order, lens_s, nb, base, reverse, uniform, bm):
    """Rows ``[R, D]`` in plan order (a backward kernel's ``dx``) in the caller's layout:
    the same memory reshaped where :func:`direct_rows`, else :func:`scatter_rows`."""
    if direct_rows(uniform, bm, B):
        return rows.reshape((B, T, rows.shape[1]) if bm else (T, B, rows.shape[1]))
    return scatter_rows(rows, T, B, order, lens_s, nb, base, reverse, bm)


@kernel
def scatter_rows(packed, T, B, order, lens_s, nb, base, reverse, bm):
    """Inverse of :func:`gather_rows`: ``[R, D]`` -> ``[T, B, D]`` (``[B, T, D]`` when
    ``bm``), zeros past each row's length."""
    D = packed.shape[1]
    shape = (B, T, D) if bm else (T, B, D)
    # every row written when the rows cover all (t, b) (a uniform batch): no zero fill
    out = np.empty(shape, packed.dtype) if packed.shape[0] == T * B else np.zeros(shape, packed.dtype)
    for k in range(nb.shape[0] - 1):
        for r in range(nb[k]):
            dst = row3(out, time_index(k, r, lens_s, reverse), order[r], bm)
            src = packed[base[k] + r]
            for j in range(D):
                dst[j] = src[j]
    return out


@kernel
def column_sums(a, R, out, off):
    """``out[off:off+D] = a[:R].sum(0)`` for ``a [R, D]``."""
    D = a.shape[1]
    for j in range(D):
        out[off + j] = 0
    for i in range(R):
        for j in range(D):
            out[off + j] += a[i, j]
