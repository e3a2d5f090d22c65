"""Per-step products on packed weights: ``C[m, n] += A[m, k] @ B[k, n]``.

The recurrent product of every step multiplies the same ``B`` (the recurrent rows of the
kernel). BLAS packs ``B`` into its own panel layout on every call, i.e. on every step;
here it is packed once per kernel call (:func:`pack_panels`) into column panels of ``NR``
columns, each ``[k, NR]`` contiguous and zero-padded at the right edge, and every step
runs the register-blocked micro-kernel below over the panels. The kernels also accept the
packed copy from their caller (:func:`given_or_pack`): the numba backend keeps it across
calls for weights that cannot have changed (``backends/fastseq_numba/_packcache.py``).

The micro-kernel is LLVM IR emitted through ``@intrinsic``: ``MR`` rows of ``C`` by one
panel (two native vectors) are accumulated in registers over the whole depth ``k`` (one
fused multiply-add per vector and row per depth step), then added to ``C`` once. Numba's
own loops keep such accumulators in memory, which bounds them by loads and stores. The
shape follows the vector registers of the CPU Numba compiles for (:data:`WIDE`): with
AVX-512 (32 registers of 64 bytes) panels of 32 float32 / 16 float64 columns and up to 12
rows (24 accumulators); otherwise (AVX2: 16 registers of 32 bytes) panels of 16 / 8
columns and up to 6 rows (12 accumulators), the classic 6x16 block. The 512-bit shape
compiled for AVX2 spills its accumulators to the stack (measured on Zen 3, one core,
[60, 512] x [512, 2048] float32: 27.5 GFLOP/s for 12 rows of 32 columns, 68.3 for 6 rows
of 16). Numba's on-disk cache is keyed by the target CPU and its features, so a cache
never hands one CPU the other's shape.

Rounding: each element of ``C`` gets ``sum_p a[i, p] * b[p, j]`` accumulated in order of
``p`` with fused multiply-adds, then added to ``C`` (the in-house loops of :mod:`._blas`
round the same way up to the grouping of four depth steps); results agree with BLAS to
float rounding.
"""

import itertools
import os

import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, overload

from ._blas import PARALLEL_MIN_MACS, gemm, step_gemm_acc
from ._jit import kernel

_i64 = ir.IntType(64)
_i32 = ir.IntType(32)



def _wide_vectors():
    """Whether Numba compiles for a CPU with 512-bit vectors (AVX-512F): the host CPU, or
    the one named by ``NUMBA_CPU_NAME`` / ``NUMBA_CPU_FEATURES``."""
    name = os.environ.get("NUMBA_CPU_NAME", "host")
    if name != "host":
        return "+avx512f" in os.environ.get("NUMBA_CPU_FEATURES", "")
    from llvmlite import binding as ll

    try:
        return bool(ll.get_host_cpu_features().get("avx512f", False))
    except RuntimeError:  # pragma: no cover - features unknown on this platform
        return False


#: 512-bit vectors on the compile target: the micro-kernel's shape, see the module docstring.
WIDE = _wide_vectors()
#: Bytes per vector register the micro-kernel is shaped for.
VECTOR_BYTES = 64 if WIDE else 32
#: Columns per packed panel (two vectors), float32 and float64.
NR_F32 = VECTOR_BYTES // 2
NR_F64 = VECTOR_BYTES // 4
#: Micro-kernel heights generated (rows of ``C`` per call); a block of ``m`` rows is cut
#: into these, largest first. AVX-512: 12 rows x 2 vectors = 24 accumulators, which with
#: the two panel vectors and a broadcast fit in its 32 vector registers; AVX2: 6 x 2 = 12
#: of 16.
HEIGHTS = (12, 8, 4, 2, 1) if WIDE else (6, 4, 3, 2, 1)
_HA, _HB, _HC = HEIGHTS[:3]
#: Most rows of one micro-kernel call (the scratch buffer's height).
MAX_HEIGHT = HEIGHTS[0]


def panel_cols(itemsize):
    """Columns per packed panel for elements of ``itemsize`` bytes (Python side of
    :func:`panel_width`)."""
    return NR_F32 if itemsize == 4 else NR_F64


_loop_ids = itertools.count()


def _no_unroll_loop_id(module):
    """Loop metadata that keeps LLVM from unrolling the depth loop: unrolled, its
    scheduler hoists the broadcasts of the next depth steps and spills accumulators to
    the stack (measured on Zen 4: 46-55 GFLOP/s for 12 rows, 98-107 without). A loop ID is a
    self-referencing node; the unique name keeps two loops from sharing one."""
    opt = module.add_metadata([ir.MetaDataString(module, "llvm.loop.unroll.disable")])
    tag = module.add_metadata([ir.MetaDataString(module, f"fastseq.micro.{next(_loop_ids)}")])
    lid = module.add_metadata([None, opt, tag])
    lid.operands = (lid, opt, tag)
    return lid


def _vector_width(dtype):
    return VECTOR_BYTES // (4 if dtype == types.float32 else 8)


#: Whether each micro-kernel call first prefetches (for writing) the rows of ``C`` it ends
#: on. In the time loops these rows are cold (a step's block of the gate buffer, written by
#: the input projection long before); loaded only after the depth loop, as before, each
#: call ended on a memory stall. P3 kernel calls, old and new interleaved in one process:
#: forward 70.2 / 72.0 -> 68.2 / 70.3 ms, backward 144.7 / 136.2 -> 140.8 / 133.6 ms;
#: products into cold C rows of a 26 MB buffer 107.5 -> 108.6-111 GFLOP/s.
PREFETCH_C = True


def _make_micro(MR, WAYS=1, strided=False, NV=2):
    """The micro-kernel intrinsic for ``MR`` rows (``WAYS`` accumulator sets). ``strided``:
    the variant of :func:`gemm_tn_acc`, which also takes the depth stride of ``A`` and the
    row stride of ``B`` (unpacked rows), see there; ``NV``: vectors per row of ``C`` (2,
    a whole panel, or 1 for a right edge at most half a panel wide)."""

    def _typed(k, a, aoff, lda, bp, bpoff, c, coff, ldc, full, scratch, sap=None, ldb=None):
        arrs = (a, bp, c, scratch)
        if not all(isinstance(x, types.Array) for x in arrs):
            return None
        dt = a.dtype
        if dt not in (types.float32, types.float64) or any(x.dtype != dt for x in arrs):
            return None
        if strided:
            sig = types.void(k, a, aoff, lda, sap, bp, bpoff, ldb, c, coff, ldc, full, scratch)
        else:
            sig = types.void(k, a, aoff, lda, bp, bpoff, c, coff, ldc, full, scratch)
        return sig, _codegen(dt)

    if strided:
        @intrinsic
        def micro(typingctx, k, a, aoff, lda, sap, bp, bpoff, ldb, c, coff, ldc, full, scratch):
            """``MR`` rows of ``C`` += ``A(i, p) B(p, j)`` over ``p < k``, ``A(i, p)`` at
            ``aoff + i*lda + p*sap``, ``B(p, j)`` at ``bpoff + p*ldb + j``; otherwise as
            the packed variant below."""
            return _typed(k, a, aoff, lda, bp, bpoff, c, coff, ldc, full, scratch, sap, ldb)
    else:
        @intrinsic
        def micro(typingctx, k, a, aoff, lda, bp, bpoff, c, coff, ldc, full, scratch):
            """``MR`` rows: accumulate ``A[aoff.., :k] @ panel`` in registers (``WAYS`` sets of
            accumulators for depth steps ``p + w``, summed at the end, so that short blocks
            still have enough independent multiply-adds in flight; ``k`` must then be a
            multiple of ``WAYS``); ``full`` 1: add the vectors of each row into ``C`` at
            ``coff + i*ldc``; 2: store them there (``C = A @ B``, nothing read); 0: store
            them into ``scratch`` (``[MR, NR]``) for the caller to add the valid columns."""
            return _typed(k, a, aoff, lda, bp, bpoff, c, coff, ldc, full, scratch)

    def _codegen(dt):
        VW = _vector_width(dt)
        ES = 4 if dt == types.float32 else 8  # element alignment: the vectors need not be aligned

        def codegen(context, builder, signature, args):
            if strided:
                (vk, va, vaoff, vlda, vsap, vbp, vbpoff, vldb, vc, vcoff, vldc, vfull, vscr) = args
                sa = signature.args[:4] + signature.args[5:7] + signature.args[8:]
                sap_ = context.cast(builder, vsap, signature.args[4], types.int64)
                ldb_ = context.cast(builder, vldb, signature.args[7], types.int64)
            else:
                (vk, va, vaoff, vlda, vbp, vbpoff, vc, vcoff, vldc, vfull, vscr) = args
                sa = signature.args
                sap_ = None
                ldb_ = ir.Constant(_i64, 2 * VW)
            fty = context.get_value_type(dt)
            vty = ir.VectorType(fty, VW)
            vptr = vty.as_pointer()

            def i64(val, ty):
                return context.cast(builder, val, ty, types.int64)

            def data(arrty, val):
                return context.make_array(arrty)(context, builder, val).data

            kk = i64(vk, sa[0])
            lda_ = i64(vlda, sa[3])
            ldc_ = i64(vldc, sa[8])
            pa = builder.gep(data(sa[1], va), [i64(vaoff, sa[2])])
            pb = builder.gep(data(sa[4], vbp), [i64(vbpoff, sa[5])])
            pc = builder.gep(data(sa[6], vc), [i64(vcoff, sa[7])])
            ps = data(sa[10], vscr)
            zero = ir.Constant(vty, [ir.Constant(fty, 0.0)] * VW)
            undef = ir.Constant(vty, ir.Undefined)
            splat_mask = ir.Constant(ir.VectorType(_i32, VW), [ir.Constant(_i32, 0)] * VW)
            fma_ty = ir.FunctionType(vty, [vty, vty, vty])
            fma = cgutils.get_or_insert_function(builder.module, fma_ty, f"llvm.fma.v{VW}f{8 * ES}")
            # row pointers of A (loop invariant)
            arow = [builder.gep(pa, [builder.mul(ir.Constant(_i64, i), lda_)]) for i in range(MR)]
            if PREFETCH_C:
                # the rows of C this call ends on, asked for now (for writing), so that they
                # arrive during the depth loop instead of stalling its end
                i8p = ir.IntType(8).as_pointer()
                pf = cgutils.get_or_insert_function(
                    builder.module, ir.FunctionType(ir.VoidType(), [i8p, _i32, _i32, _i32]), "llvm.prefetch.p0")
                for i in range(MR):
                    crow = builder.gep(pc, [builder.mul(ir.Constant(_i64, i), ldc_)])
                    for h in range(NV):
                        builder.call(pf, [builder.bitcast(builder.gep(crow, [ir.Constant(_i64, h * VW)]), i8p),
                                          ir.Constant(_i32, 1), ir.Constant(_i32, 3), ir.Constant(_i32, 1)])

            entry = builder.block
            loop = builder.append_basic_block("mk_loop")
            after = builder.append_basic_block("mk_after")
            builder.cbranch(builder.icmp_signed(">", kk, ir.Constant(_i64, 0)), loop, after)

            builder.position_at_end(loop)
            p = builder.phi(_i64)
            p.add_incoming(ir.Constant(_i64, 0), entry)
            # acc[w][i][h]: accumulator set w (depth steps p + w), row i, vector h
            acc = [[[builder.phi(vty) for _ in range(NV)] for _ in range(MR)] for _ in range(WAYS)]
            for ws_ in acc:
                for row in ws_:
                    for ph in row:
                        ph.add_incoming(zero, entry)
            new = []
            for w in range(WAYS):
                pw = builder.add(p, ir.Constant(_i64, w)) if w else p
                boff = builder.mul(pw, ldb_)
                bv = [builder.load(builder.bitcast(builder.gep(pb, [builder.add(boff, ir.Constant(_i64, h * VW))]),
                                                   vptr), align=ES) for h in range(NV)]
                aidx = builder.mul(pw, sap_) if strided else pw
                nw = []
                for i in range(MR):
                    av = builder.load(builder.gep(arow[i], [aidx]))
                    s = builder.shuffle_vector(builder.insert_element(undef, av, ir.Constant(_i32, 0)), undef,
                                               splat_mask)
                    nw.append([builder.call(fma, [s, bv[h], acc[w][i][h]]) for h in range(NV)])
                new.append(nw)
            pn = builder.add(p, ir.Constant(_i64, WAYS))
            p.add_incoming(pn, loop)
            for w in range(WAYS):
                for i in range(MR):
                    for h in range(NV):
                        acc[w][i][h].add_incoming(new[w][i][h], loop)
            back = builder.cbranch(builder.icmp_signed("<", pn, kk), loop, after)
            back.set_metadata("llvm.loop", _no_unroll_loop_id(builder.module))

            builder.position_at_end(after)
            sets = []
            for w in range(WAYS):
                rows = []
                for i in range(MR):
                    row = []
                    for h in range(NV):
                        ph = builder.phi(vty)
                        ph.add_incoming(zero, entry)
                        ph.add_incoming(new[w][i][h], loop)
                        row.append(ph)
                    rows.append(row)
                sets.append(rows)
            # the sets summed pairwise: (s0 + s1) + (s2 + s3)
            while len(sets) > 1:
                sets = [[[builder.fadd(x[i][h], y[i][h]) for h in range(NV)] for i in range(MR)]
                        for x, y in zip(sets[0::2], sets[1::2])]
            res = sets[0]
            mode = context.cast(builder, vfull, sa[9], types.int64)
            is_full = builder.icmp_signed("!=", mode, ir.Constant(_i64, 0))
            with builder.if_else(is_full) as (then, otherwise):
                with then:
                    # 1: add into C; 2: store into C (beta = 0: no zeroing pass; what C held
                    # is loaded but not used, so a NaN there does not reach the result)
                    is_add = builder.icmp_signed("==", mode, ir.Constant(_i64, 1))
                    for i in range(MR):
                        crow = builder.gep(pc, [builder.mul(ir.Constant(_i64, i), ldc_)])
                        for h in range(NV):
                            q = builder.bitcast(builder.gep(crow, [ir.Constant(_i64, h * VW)]), vptr)
                            old = builder.select(is_add, builder.load(q, align=ES), zero)
                            builder.store(builder.fadd(old, res[i][h]), q, align=ES)
                with otherwise:
                    for i in range(MR):
                        for h in range(NV):
                            q = builder.bitcast(builder.gep(ps, [ir.Constant(_i64, (2 * i + h) * VW)]), vptr)
                            builder.store(res[i][h], q, align=ES)
            return context.get_dummy_value()

        return codegen

    return micro


#: One and two rows have 2 and 4 accumulators, too few to cover the latency of a fused
#: multiply-add (4 cycles, 2 per cycle: 8 in flight): these variants keep 4 and 2 sets.
WAYS_1, WAYS_2 = 4, 2
_micro2w = _make_micro(2, WAYS_2)
_micro1w = _make_micro(1, WAYS_1)
_micro2, _micro1 = _make_micro(2), _make_micro(1)  # the depth steps those leave over
#: Every height from 1 to 12 for :func:`gemm_packed` (1 and 2 are the ones above), which cuts a block of ``m`` rows
#: into ``ceil(m / MAX_HEIGHT)`` passes of (nearly) equal height instead of the largest
#: heights first: 13 rows as 7 + 6 rather than 12 + 1, 11 as one pass rather than 8 + 2 +
#: 1. Each pass reads the whole panel again, and a pass of one or two rows is bound by
#: those reads (a 40 KB panel from L2), not by its multiply-adds. Measured on the Zen 4
#: machine, one thread, [m, 320] x [320, 1024] float32 (GFLOP/s, balanced against largest
#: first): m = 3 107 vs 70, 5 114 vs 94, 11 114 vs 91, 13 116 vs 105, 25 115 vs 109; the
#: products of one direction of P4's forward (400 shrinking steps) 75.3 vs 77.3 ms. Only
#: heights up to MAX_HEIGHT are called (on AVX2 the taller ones are compiled, never run).
_mh3 = _make_micro(3, 2)
_mh4, _mh5, _mh6, _mh7, _mh8, _mh9, _mh10, _mh11, _mh12 = (_make_micro(h) for h in range(4, 13))
_mh3r = _make_micro(3)  # the depth steps left over by the two sets of _mh3
#: One vector per row, for a right-edge panel at most half full (e.g. H = 200: 8 of 32
#: columns): half the multiply-adds of the whole panel, all of them on valid columns.
_nmicro_a, _nmicro_b, _nmicro_c = (_make_micro(h, 1, False, 1) for h in HEIGHTS[:3])


#: The strided variants (:func:`gemm_tn_acc`): whole panels, and one vector for a narrow
#: right edge.
_tn_a, _tn_b, _tn_c, _tn_2, _tn_1 = (_make_micro(h, 1, True) for h in HEIGHTS)
_tn1_a, _tn1_b, _tn1_c, _tn1_2, _tn1_1 = (_make_micro(h, 1, True, 1) for h in HEIGHTS)


@kernel(inline="always")
def panel_width(dtype_probe):
    """Columns per panel: two vectors (:data:`VECTOR_BYTES`) of the array's dtype."""
    return NR_F32 if dtype_probe.itemsize == 4 else NR_F64


@kernel
def pack_panels(b, boff, ldb, k, n):
    """Pack ``B[k, n]`` (row-major at ``boff`` with leading dimension ``ldb``) into panels
    of ``NR`` columns: ``out[(j // NR) * k * NR + p * NR + j % NR] = B[p, j]``, zeros past
    ``n``. Returns the flat packed array."""
    NR = panel_width(b)
    npan = (n + NR - 1) // NR
    out = np.empty(npan * k * NR, b.dtype)
    bf = b.reshape(b.size)
    wl = n - (npan - 1) * NR  # width of the last panel
    if npan > 0 and wl < NR:
        for p in range(k):
            d = ((npan - 1) * k + p) * NR
            o = out[d + wl:d + NR]
            for j in range(NR - wl):
                o[j] = 0
    # row by row of B (contiguous reads), each row's pieces to their panels: 4x faster
    # than panel by panel (strided reads) for the P1-P4 shapes
    for p in range(k):
        row = bf[boff + p * ldb: boff + p * ldb + n]
        for q in range(npan):
            j0 = q * NR
            w = min(NR, n - j0)
            d = (q * k + p) * NR
            o = out[d:d + w]
            src = row[j0:j0 + w]
            for j in range(w):
                o[j] = src[j]
    return out


@kernel(inline="always")
def _add_scratch(cf, co, ldc, scratch, NR, h, w):
    for r in range(h):
        for j in range(w):
            cf[co + r * ldc + j] += scratch[r * NR + j]


def _bits(a):
    """``a`` (float32 / float64) seen as integers of its width, the mask of the exponent's
    bits (all ones: inf or nan) and the mask of every bit but the sign."""


@overload(_bits, inline="always")
def _bits_ov(a):
    if a.dtype == types.float32:
        return lambda a: (a.view(np.int32), np.int32(0x7F800000), np.int32(0x7FFFFFFF))
    return lambda a: (a.view(np.int64), np.int64(0x7FF0000000000000), np.int64(0x7FFFFFFFFFFFFFFF))


@kernel(inline="always")
def acc_adds_nothing(m, n, k, a, aoff, lda, bp):
    """Whether :func:`gemm_acc_packed` with these operands would add exactly nothing to
    ``C``: every element of the ``m`` rows of ``A`` (``k`` each, ``lda`` apart from
    ``aoff``) is zero and every element of ``B``'s ``ceil(n / NR)`` panels is finite
    (``0 * inf`` is nan, so an inf or nan weight still reaches ``C``). Then the product is
    ``+-0`` element by element and ``C + 0 == C``: skipping it leaves ``C`` the same
    except for the sign of a zero. The time loops ask this at their first step, whose
    product multiplies the initial state: the zero state of every layer not given one.
    Both scans are integer reductions over the bits (vectorised, no branch per
    element): ~7 us for 480 KB of float32 weights in L2, where the product they replace
    takes ~40 (P2's step); a non-zero ``A`` stops after its first row."""
    if not rows_zero(m, k, a, aoff, lda):
        return False
    NR = panel_width(bp)
    return all_finite(bp, 0, ((n + NR - 1) // NR) * k * NR)


@kernel(inline="always")
def rows_zero(m, k, a, aoff, lda):
    """Whether the ``m`` rows of ``k`` elements of ``a`` (``lda`` apart from ``aoff``) are
    all ``+-0`` (an integer reduction over the bits per row; a non-zero row ends it)."""
    af, _e, mag = _bits(a.reshape(a.size))
    z = mag & 0
    for i in range(m):
        row = af[aoff + i * lda:aoff + i * lda + k]
        acc = z
        for j in range(row.shape[0]):
            acc |= row[j]
        if acc & mag != 0:  # the sign bit alone is -0.0
            return False
    return True


@kernel(inline="always")
def all_finite(a, off, n):
    """Whether the ``n`` elements of the flat array ``a`` from ``off`` are all finite (the
    largest exponent field over them, an integer reduction, is not all ones)."""
    bi, e, _m = _bits(a)
    seg = bi[off:off + n]
    mx = e & 0
    for j in range(seg.shape[0]):
        mx = max(mx, seg[j] & e)
    return mx != e


@kernel(inline="always")
def gemm_acc_packed(m, n, k, a, aoff, lda, bp, c, coff, ldc, scratch):
    """``C[m, n] += A[m, k] @ B``: :func:`gemm_packed` with ``beta = 1``."""
    gemm_packed(m, n, k, a, aoff, lda, bp, c, coff, ldc, scratch, 1)


@kernel
def gemm_packed(m, n, k, a, aoff, lda, bp, c, coff, ldc, scratch, beta):
    """``C[m, n] = A[m, k] @ B + beta * C`` (``beta`` 0 or 1) with ``B`` packed by
    :func:`pack_panels`; row-major ``A`` and ``C`` at element offsets with leading
    dimensions. ``scratch``: a flat array of at least ``MAX_HEIGHT * NR`` elements of the
    same dtype (the right-edge panel goes through it). With ``beta = 0`` the micro-kernel
    stores whole panels (no zeroing pass over ``C`` first, and what ``C`` held is not
    used); only a right-edge panel is zeroed and accumulated."""
    if m <= 0 or n <= 0:
        return
    NR = panel_width(c)
    cf = c.reshape(c.size)
    af = a.reshape(a.size)
    npan = (n + NR - 1) // NR
    passes = (m + MAX_HEIGHT - 1) // MAX_HEIGHT
    hlow = m // passes
    taller = m % passes  # the first ``taller`` passes have ``hlow + 1`` rows
    for q in range(npan):
        j0 = q * NR
        w = min(NR, n - j0)
        pbo = q * k * NR
        narrow = False
        if w == NR:
            mode = 1 if beta != 0 else 2
        else:
            # the right edge: through the scratch rows, the valid columns added into C;
            # at most half a panel wide, one vector per row (heights 12, 8, 4, then the rest)
            mode = 0
            narrow = 2 * w <= NR
            if beta == 0:
                _zero_block(c, coff + j0, ldc, m, w)
        i = 0
        s = 0
        while i < m:
            left = m - i
            ao = aoff + i * lda
            co = coff + i * ldc + j0
            if narrow and left >= _HC:
                if left >= _HA:
                    h = _HA
                    _nmicro_a(k, af, ao, lda, bp, pbo, cf, co, ldc, 0, scratch)
                elif left >= _HB:
                    h = _HB
                    _nmicro_b(k, af, ao, lda, bp, pbo, cf, co, ldc, 0, scratch)
                else:
                    h = _HC
                    _nmicro_c(k, af, ao, lda, bp, pbo, cf, co, ldc, 0, scratch)
            else:
                if narrow:
                    h = left
                else:
                    h = hlow + 1 if s < taller else hlow
                    s += 1
                # One pass of h rows over the panel. (Written out here: the same chain as an
                # inlined Numba function ran every height 2-6 % slower, [1-64, 128] x [128, 512].)
                if h == 12:
                    _mh12(k, af, ao, lda, bp, pbo, cf, co, ldc, mode, scratch)
                elif h == 11:
                    _mh11(k, af, ao, lda, bp, pbo, cf, co, ldc, mode, scratch)
                elif h == 10:
                    _mh10(k, af, ao, lda, bp, pbo, cf, co, ldc, mode, scratch)
                elif h == 9:
                    _mh9(k, af, ao, lda, bp, pbo, cf, co, ldc, mode, scratch)
                elif h == 8:
                    _mh8(k, af, ao, lda, bp, pbo, cf, co, ldc, mode, scratch)
                elif h == 7:
                    _mh7(k, af, ao, lda, bp, pbo, cf, co, ldc, mode, scratch)
                elif h == 6:
                    _mh6(k, af, ao, lda, bp, pbo, cf, co, ldc, mode, scratch)
                elif h == 5:
                    _mh5(k, af, ao, lda, bp, pbo, cf, co, ldc, mode, scratch)
                elif h == 4:
                    _mh4(k, af, ao, lda, bp, pbo, cf, co, ldc, mode, scratch)
                else:
                    # several accumulator sets: the depth steps k % ways left over run as a
                    # second product added on top (in mode 0 the first is added into C here)
                    ways = WAYS_1 if h == 1 else 2
                    k1 = k - k % ways
                    if h == 3:
                        _mh3(k1, af, ao, lda, bp, pbo, cf, co, ldc, mode, scratch)
                    elif h == 2:
                        _micro2w(k1, af, ao, lda, bp, pbo, cf, co, ldc, mode, scratch)
                    else:
                        _micro1w(k1, af, ao, lda, bp, pbo, cf, co, ldc, mode, scratch)
                    if mode == 0:
                        _add_scratch(cf, co, ldc, scratch, NR, h, w)
                    rest = 0 if mode == 0 else 1
                    if h == 3:
                        _mh3r(k - k1, af, ao + k1, lda, bp, pbo + k1 * NR, cf, co, ldc, rest, scratch)
                    elif h == 2:
                        _micro2(k - k1, af, ao + k1, lda, bp, pbo + k1 * NR, cf, co, ldc, rest, scratch)
                    else:
                        _micro1(k - k1, af, ao + k1, lda, bp, pbo + k1 * NR, cf, co, ldc, rest, scratch)
            if mode == 0:
                _add_scratch(cf, co, ldc, scratch, NR, h, w)
            i += h


#: One row of ``A`` times ``B``'s column blocks (:func:`gemv_blocks`): 16, 8, 4, 2 and 1
#: vectors of ``C`` held in registers over the whole depth.
_row16, _row8, _row4, _row2, _row1 = (_make_micro(1, 1, True, nv) for nv in (16, 8, 4, 2, 1))


@kernel(inline="always")
def gemv_block_width(rest, VW):
    """Columns of the next block of :func:`pack_gemv_blocks`' layout when ``rest`` columns
    are left: 16, 8, 4, 2 or 1 vectors of ``VW`` elements (the widest that fits), else the
    ``rest < VW`` last columns."""
    for nv in (16, 8, 4, 2, 1):
        if rest >= nv * VW:
            return nv * VW
    return rest


@kernel(inline="always")
def pack_gemv_blocks(src, dst, doff):
    """``src [k, n]`` (2-D, any strides) into ``dst[doff:doff + k * n]`` as :func:`gemv_blocks`
    reads it: the columns cut into blocks by :func:`gemv_block_width` (left to right), each
    block's ``k`` rows stored one after another, ``width`` elements each."""
    k, n = src.shape
    VW = panel_width(dst) // 2
    j = 0
    o = doff
    while j < n:
        w = gemv_block_width(n - j, VW)
        for p in range(k):
            for jj in range(w):
                dst[o + p * w + jj] = src[p, j + jj]
        o += k * w
        j += w


@kernel(inline="always")
def gemv_blocks(k, a, aoff, b, boff, n, c, coff, scratch, rev=False):
    """``c[coff:coff + n] += a[aoff:aoff + k] @ B`` for ``B [k, n]`` laid out from ``boff`` by
    :func:`pack_gemv_blocks` (flat arrays of one dtype): one row streamed through a block of
    accumulators as wide as the block (16 vectors: 128 float32 columns on AVX2, 256 on
    AVX-512), each block's weights one contiguous run, read once. Each element is ``sum_p
    a[p] b[p, j]`` accumulated in order of ``p`` (fused multiply-adds; the last columns of
    fewer than a vector in a plain loop). Measured on the Zen 3 machine (AVX2), float32
    [1, 128] x [128, 256] with the weights in L2: 1.33-1.35 us against 1.87-1.88 us for the
    same blocks read out of a row-major ``B`` (each 1 KB row in two 512-byte runs, the
    layout before); [1, 128] x [128, 512] 2.64-2.69 against 3.12-3.68. On AVX-512 a block
    of 256 columns is P1's whole half, i.e. the row-major layout (Zen 4: 1.13-1.16 us).

    ``rev``: the same product with the weights read backwards, last block first and each
    block from its last row to its first (each element summed in descending order of
    ``p``). A loop that multiplies by the same ``B`` every step and alternates the
    direction (serpentine) starts each step on the lines the previous one read last, which
    are still in L1: on the Zen 4 machine [1, 128] x [128, 256] (128 KB, from L2)
    alternated 1.00-1.05 us a call against 1.13-1.16 us always forwards."""
    VW = panel_width(c) // 2
    if not rev:
        j = 0
        o = boff
        while j < n:
            w = gemv_block_width(n - j, VW)
            _gemv_block(k, a, aoff, 1, b, o, w, w, c, coff + j, scratch, VW)
            o += k * w
            j += w
        return
    nblk = 0
    j = 0
    while j < n:
        j += gemv_block_width(n - j, VW)
        nblk += 1
    for q in range(nblk - 1, -1, -1):
        j = 0
        o = boff
        w = gemv_block_width(n, VW)
        for _ in range(q):  # block q's columns j, width w and offset o
            o += k * w
            j += w
            w = gemv_block_width(n - j, VW)
        # its row p at o + p * w, read from p = k - 1 down to 0
        _gemv_block(k, a, aoff + k - 1, -1, b, o + (k - 1) * w, -w, w, c, coff + j, scratch, VW)


@kernel(inline="always")
def _gemv_block(k, a, aoff, sa, b, boff, sb, w, c, coff, scratch, VW):
    """One block of :func:`gemv_blocks`: ``c[coff:coff + w] += sum_i a[aoff + i*sa] *
    b[boff + i*sb : + w]`` over ``i < k``, in order of ``i``."""
    if w == 16 * VW:
        _row16(k, a, aoff, 0, sa, b, boff, sb, c, coff, 0, 1, scratch)
    elif w == 8 * VW:
        _row8(k, a, aoff, 0, sa, b, boff, sb, c, coff, 0, 1, scratch)
    elif w == 4 * VW:
        _row4(k, a, aoff, 0, sa, b, boff, sb, c, coff, 0, 1, scratch)
    elif w == 2 * VW:
        _row2(k, a, aoff, 0, sa, b, boff, sb, c, coff, 0, 1, scratch)
    elif w == VW:
        _row1(k, a, aoff, 0, sa, b, boff, sb, c, coff, 0, 1, scratch)
    else:
        for jj in range(w):
            acc = c[coff + jj] * 0
            for i in range(k):
                acc += a[aoff + i * sa] * b[boff + i * sb + jj]
            c[coff + jj] += acc



def _make_row_proj(NV=16, R=8, NP=2):
    """The intrinsic of :func:`gemv_block_proj`: one row times a block of ``NV`` vectors of
    columns (as :func:`_gemv_block`), with ``NP`` blocks of ``R`` rows by one vector of an
    input projection (as the ``R``-row micro-kernel of :func:`gemm_packed` on one vector of
    a panel) interleaved in its depth loop. AVX-512: 16 + 8 accumulators of the 32
    registers."""

    @intrinsic
    def row_proj(typingctx, k, a, aoff, sa, b, boff, sb, c, coff, kp, x, xoff, ldx, wp, wpoff, ldwp, g, goff, ldg):
        """``c[coff:coff + NV*VW] += sum_p a[aoff + p*sa] * b[boff + p*sb:][:NV*VW]`` over
        ``p < k`` (in order of ``p``, from zero, then added), and for ``s < NP``:
        ``g[goff + r*ldg + s*VW:][:VW] = sum_q x[xoff + r*ldx + q] * wp[wpoff + q*ldwp +
        s*VW:][:VW]`` over ``q < kp`` for ``r < R`` (stored). Block ``s`` of the projection
        runs beside depth rows ``[k*s/NP, k*(s+1)/NP)`` of the product."""
        arrs = (a, b, c, x, wp, g)
        if not all(isinstance(t, types.Array) for t in arrs):
            return None
        dt = a.dtype
        if dt not in (types.float32, types.float64) or any(t.dtype != dt for t in arrs):
            return None
        sig = types.void(k, a, aoff, sa, b, boff, sb, c, coff, kp, x, xoff, ldx, wp, wpoff, ldwp, g, goff, ldg)
        VW = _vector_width(dt)
        ES = 4 if dt == types.float32 else 8

        def codegen(context, builder, signature, args):
            st = signature.args
            fty = context.get_value_type(dt)
            vty = ir.VectorType(fty, VW)
            vptr = vty.as_pointer()

            def i64(j):
                return context.cast(builder, args[j], st[j], types.int64)

            def ptr(j, off):
                return builder.gep(context.make_array(st[j])(context, builder, args[j]).data, [i64(off)])

            kk, sA, sB, kpp, ldx_, ldw_, ldg_ = (i64(j) for j in (0, 3, 6, 9, 12, 15, 18))
            pa, pb, pc, px, pw, pg = ptr(1, 2), ptr(4, 5), ptr(7, 8), ptr(10, 11), ptr(13, 14), ptr(16, 17)
            zero = ir.Constant(vty, [ir.Constant(fty, 0.0)] * VW)
            undef = ir.Constant(vty, ir.Undefined)
            splat_mask = ir.Constant(ir.VectorType(_i32, VW), [ir.Constant(_i32, 0)] * VW)
            fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vty, [vty, vty, vty]),
                                                 f"llvm.fma.v{VW}f{8 * ES}")
            xrow = [builder.gep(px, [builder.mul(ir.Constant(_i64, r), ldx_)]) for r in range(R)]

            def const(v):
                return ir.Constant(_i64, v)

            def splat(p):
                s = builder.load(p)
                return builder.shuffle_vector(builder.insert_element(undef, s, ir.Constant(_i32, 0)), undef,
                                              splat_mask)

            def vload(p):
                return builder.load(builder.bitcast(p, vptr), align=ES)

            def product_row(p, acc):
                av = splat(builder.gep(pa, [builder.mul(p, sA)]))
                brow = builder.gep(pb, [builder.mul(p, sB)])
                return [builder.call(fma, [av, vload(builder.gep(brow, [const(h * VW)])), acc[h]]) for h in range(NV)]

            def proj_row(q, s, acc):
                wv = vload(builder.gep(pw, [builder.add(builder.mul(q, ldw_), const(s * VW))]))
                return [builder.call(fma, [splat(builder.gep(xrow[r], [q])), wv, acc[r]]) for r in range(R)]

            def loop(lo, hi, gacc, pacc, s, pofs):
                """Depth rows ``p`` in ``[lo, hi)``: product row ``p`` (if ``gacc``), projection
                row ``p - pofs`` of block ``s`` (if ``pacc``); the accumulators after it."""
                entry = builder.block
                body = builder.append_basic_block("rp_loop")
                after = builder.append_basic_block("rp_after")
                builder.cbranch(builder.icmp_signed("<", lo, hi), body, after)
                builder.position_at_end(body)
                p = builder.phi(_i64)
                p.add_incoming(lo, entry)
                phis = [builder.phi(vty) for _ in gacc + pacc]
                for ph, v in zip(phis, gacc + pacc):
                    ph.add_incoming(v, entry)
                ng = product_row(p, phis[:len(gacc)]) if gacc else []
                npj = proj_row(builder.sub(p, pofs), s, phis[len(gacc):]) if pacc else []
                pn = builder.add(p, const(1))
                p.add_incoming(pn, body)
                for ph, v in zip(phis, ng + npj):
                    ph.add_incoming(v, body)
                back = builder.cbranch(builder.icmp_signed("<", pn, hi), body, after)
                back.set_metadata("llvm.loop", _no_unroll_loop_id(builder.module))
                builder.position_at_end(after)
                out = []
                for v, n in zip(gacc + pacc, ng + npj):
                    ph = builder.phi(vty)
                    ph.add_incoming(v, entry)
                    ph.add_incoming(n, body)
                    out.append(ph)
                return out[:len(gacc)], out[len(gacc):]

            gacc = [zero] * NV
            for s in range(NP):
                lo = builder.sdiv(builder.mul(kk, const(s)), const(NP))
                hi = builder.sdiv(builder.mul(kk, const(s + 1)), const(NP))
                ln = builder.sub(hi, lo)
                m = builder.select(builder.icmp_signed("<", ln, kpp), ln, kpp)
                pacc = [zero] * R
                gacc, pacc = loop(lo, builder.add(lo, m), gacc, pacc, s, lo)   # both
                gacc, _ = loop(builder.add(lo, m), hi, gacc, [], s, lo)         # the product's rest
                _, pacc = loop(m, kpp, [], pacc, s, const(0))                   # the projection's rest
                for r in range(R):
                    q = builder.gep(pg, [builder.add(builder.mul(const(r), ldg_), const(s * VW))])
                    # stored as gemm_packed's beta = 0 does (0 + sum), bit for bit
                    builder.store(builder.fadd(zero, pacc[r]), builder.bitcast(q, vptr), align=ES)
            for h in range(NV):
                q = builder.bitcast(builder.gep(pc, [const(h * VW)]), vptr)
                builder.store(builder.fadd(builder.load(q, align=ES), gacc[h]), q, align=ES)
            return context.get_dummy_value()

        return sig, codegen

    return row_proj


#: Rows of the input projection that :func:`gemv_block_proj` carries (its accumulators: 16
#: for the product's block, this many for the projection's).
ROW_PROJ_ROWS = 8
_row16_proj = _make_row_proj(16, ROW_PROJ_ROWS, 2)


@kernel(inline="always")
def gemv_block_proj(k, a, aoff, rev, b, boff, c, coff, kp, x, xoff, wp, wpoff, g, goff, ldg):
    """A one-row step product with part of a later input projection riding along: ``c[coff:
    coff + 16 VW] += a[aoff:aoff + k] @ B`` for ``B`` one block of 16 vectors laid out from
    ``boff`` by :func:`pack_gemv_blocks` (read backwards when ``rev``, as in
    :func:`gemv_blocks`), and ``g[goff + r*ldg:][:NR] = x[xoff + r*kp:][:kp] @ P`` for the
    ``ROW_PROJ_ROWS`` rows ``r`` and ``P`` one packed panel of :func:`pack_panels` at
    ``wpoff`` (``kp`` rows of ``NR`` columns), stored. The product of one row streams its
    weights from L2 and leaves the multiply-add units half idle; the projection's
    multiply-adds fill them (each panel vector beside half of the product's depth rows).
    Both results are the same bit for bit as :func:`gemv_blocks` and :func:`gemm_packed`'s
    (same sums, same order). Measured on the Zen 4 machine, P1's half ([1, 128] x [128,
    256] with one panel of [8, 64] x [64, 32] every step, against the product every step and
    the [8, 64] x [64, 256] projection every eighth, serpentine both): 1.17-1.29 against
    1.40-1.55 us a step (the product alone 1.07-1.09)."""
    w = panel_width(c) * 8
    NR = panel_width(c)
    if not rev:
        _row16_proj(k, a, aoff, 1, b, boff, w, c, coff, kp, x, xoff, kp, wp, wpoff, NR, g, goff, ldg)
    else:
        _row16_proj(k, a, aoff + k - 1, -1, b, boff + (k - 1) * w, -w, c, coff, kp, x, xoff, kp, wp, wpoff, NR,
                    g, goff, ldg)

#: Depth (rows of ``A`` and ``B``) per block of :func:`gemm_tn_acc`: a panel's block of
#: ``B`` (``TN_KC * NR`` elements, 64 KB in float32) stays in L2 while every row block of
#: ``C`` runs over it.
TN_KC = 512
#: Row strides of ``A`` (bytes) at multiples of which :func:`gemm_tn_acc` and
#: :func:`gemm_tn_panels` copy each depth block of ``A`` with a padded stride first.
#: Measured on the Zen 4 machine, one thread, float32 [k=3200] x [3200, 1024] (P3's weight
#: gradient halves), GFLOP/s without / with the copy: 512 columns (2 KB rows) 101-106 /
#: 108-109, 1024 columns 102 / 107.5; at 1 KB rows (256 columns) 111 / 109, so not there.
TN_BAD_STRIDE = 2048


@kernel(inline="always")
def gemm_tn_acc(m, n, k, a, aoff, lda, b, boff, ldb, c, coff, ldc):
    """``C[m, n] += A^T @ B`` for row-major ``A [k, m]`` and ``B [k, n]`` (element offsets,
    leading dimensions): the weight-gradient products (``X^T dG``) of the backward
    kernels, on the calling thread. The micro-kernel reads both operands where they lie,
    no packing: a row block of ``C`` broadcasts ``A[p, i:i+MR]`` (contiguous) and loads a
    panel's ``NR`` columns of ``B``'s row ``p``, so ``B`` serves as its own panels; only a
    right edge narrower than a panel is copied (zero-padded) first, so that no load reads
    past ``B``. Measured on the Zen 4 machine, one thread, float32 [200, 896] x [896, 400]
    (P2's gate weight gradient): 104 GFLOP/s against OpenBLAS's 78."""
    _gemm_tn(m, n, k, a, aoff, lda, b, boff, ldb, panel_width(c), c, coff, ldc, 1)


@kernel(inline="always")
def gemm_tn_panels(m, n, k, a, aoff, lda, bp, q0, c, coff, ldc):
    """``C[m, n] += A^T @ B`` as :func:`gemm_tn_acc`, for ``B`` the ``n`` columns from panel
    ``q0`` on of a ``[k, *]`` matrix stored panel-major (``n`` a multiple of ``NR``; panel
    ``q``, columns ``q*NR:(q+1)*NR``, at ``q * k * NR``, its row ``p`` at ``+ p * NR``), as
    the LSTM backward kernels write their gate gradients for this product (see
    :func:`.lstm.lstm_backward`; the row-split two-thread one gives each thread half the
    panels). A depth block of a panel is then one contiguous run of memory instead of
    ``TN_KC`` rows ``ldb`` apart (4 KB for P4's ``4H = 1024``), which the hardware
    prefetches as a stream. Measured on the Zen 4
    machine, one thread, float32 [320, 13046] x [13046, 1024] (P4's weight gradient):
    110 GFLOP/s against 98-102 for the row-major ``B`` of :func:`gemm_tn_acc`."""
    NR = panel_width(c)
    _gemm_tn(m, n, k, a, aoff, lda, bp, q0 * k * NR, NR, k * NR, c, coff, ldc, 1)


@kernel(inline="always")
def gemm_tn_panel_rows(m, n, K, d0, d1, a, lda, bp, q0, c, coff, ldc, beta):
    """``C[m, n] = A^T @ B + beta * C`` (``beta`` 0 or 1) over the depth rows ``d0:d1``
    only: :func:`gemm_tn_panels` for ``B`` stored panel-major ``K`` rows deep, ``A`` from
    its row ``d0`` (element 0 of row 0 at offset 0, rows ``lda`` apart). With ``beta = 0``
    the first depth block stores instead of adding (no zeroing pass over ``C``)."""
    NR = panel_width(c)
    _gemm_tn(m, n, d1 - d0, a, d0 * lda, lda, bp, q0 * K * NR + d0 * NR, NR, K * NR, c, coff, ldc, beta)


@kernel
def _gemm_tn(m, n, k, a, aoff, lda, b, boff, ldb, qstride, c, coff, ldc, beta):
    """The kernel of :func:`gemm_tn_acc` and :func:`gemm_tn_panels`: panel ``q`` of ``B``
    (columns ``q*NR:(q+1)*NR``) starts ``q * qstride`` elements after ``boff`` and its rows
    are ``ldb`` apart (row-major ``B``: ``qstride = NR``; panel-major: ``k * NR`` and
    ``NR``). ``beta`` 1 adds into ``C``; 0 overwrites it: whole panels are stored by the
    first depth block's micro-kernel calls (what ``C`` held is not read), a right-edge
    panel is zeroed first."""
    if m <= 0 or n <= 0:
        return
    if k <= 0:
        if beta == 0:
            _zero_block(c, coff, ldc, m, n)
        return
    NR = panel_width(c)
    VW = NR // 2
    cf = c.reshape(c.size)
    af = a.reshape(a.size)
    bf = b.reshape(b.size)
    scratch = scratch_for(c)
    npan = (n + NR - 1) // NR
    wl = n - (npan - 1) * NR  # width of the last panel
    narrow = wl <= VW
    kc = min(k, TN_KC)
    edge = np.zeros(kc * NR if wl < NR else 0, c.dtype)
    # A row stride of a multiple of TN_BAD_STRIDE bytes puts the depth rows that a row
    # block of C reads onto a few L1 sets, so the next row block, which reads most of the
    # same cache lines, finds them evicted: then each depth block of A is first copied
    # (once, for all panels) with a padded stride.
    restride = (lda * c.itemsize) % TN_BAD_STRIDE == 0
    ldp = ((m + VW - 1) // VW + 1) * VW if restride else lda
    apk = np.empty(kc * ldp if restride else 0, c.dtype)
    if beta == 0 and wl < NR:
        _zero_block(c, coff + (npan - 1) * NR, ldc, m, wl)
    for p0 in range(0, k, kc):
        kb = min(kc, k - p0)
        if restride:
            for p in range(kb):
                src = aoff + (p0 + p) * lda
                apk[p * ldp:p * ldp + m] = af[src:src + m]  # slices: copied as a memcpy
            aa, abase, la = apk, -p0 * ldp, ldp
        else:
            aa, abase, la = af, aoff, lda
        if wl < NR:
            ew = VW if narrow else NR
            q0 = (npan - 1) * qstride
            for p in range(kb):
                src = boff + (p0 + p) * ldb + q0
                for j in range(wl):
                    edge[p * ew + j] = bf[src + j]
        for q in range(npan):
            j0 = q * NR
            w = min(NR, n - j0)
            full = (2 if beta == 0 and p0 == 0 else 1) if w == NR else 0
            if full:
                bb, bo, lb = bf, boff + q * qstride + p0 * ldb, ldb
            else:
                bb, bo, lb = edge, 0, (VW if narrow else NR)
            i = 0
            while i < m:
                left = m - i
                ao = abase + p0 * la + i
                co = coff + i * ldc + j0
                if full or not narrow:
                    if left >= _HA:
                        h = _HA
                        _tn_a(kb, aa, ao, 1, la, bb, bo, lb, cf, co, ldc, full, scratch)
                    elif left >= _HB:
                        h = _HB
                        _tn_b(kb, aa, ao, 1, la, bb, bo, lb, cf, co, ldc, full, scratch)
                    elif left >= _HC:
                        h = _HC
                        _tn_c(kb, aa, ao, 1, la, bb, bo, lb, cf, co, ldc, full, scratch)
                    elif left >= 2:
                        h = 2
                        _tn_2(kb, aa, ao, 1, la, bb, bo, lb, cf, co, ldc, full, scratch)
                    else:
                        h = 1
                        _tn_1(kb, aa, ao, 1, la, bb, bo, lb, cf, co, ldc, full, scratch)
                elif left >= _HA:
                    h = _HA
                    _tn1_a(kb, aa, ao, 1, la, bb, bo, lb, cf, co, ldc, 0, scratch)
                elif left >= _HB:
                    h = _HB
                    _tn1_b(kb, aa, ao, 1, la, bb, bo, lb, cf, co, ldc, 0, scratch)
                elif left >= _HC:
                    h = _HC
                    _tn1_c(kb, aa, ao, 1, la, bb, bo, lb, cf, co, ldc, 0, scratch)
                elif left >= 2:
                    h = 2
                    _tn1_2(kb, aa, ao, 1, la, bb, bo, lb, cf, co, ldc, 0, scratch)
                else:
                    h = 1
                    _tn1_1(kb, aa, ao, 1, la, bb, bo, lb, cf, co, ldc, 0, scratch)
                if full == 0:
                    _add_scratch(cf, co, ldc, scratch, NR, h, w)
                i += h


#: Widest rows of ``C`` (``m`` elements, in bytes) for which :func:`gemm_tn` runs
#: :func:`gemm_tn_acc` rather than BLAS. Measured on the Zen 4 machine, one thread
#: (GFLOP/s, gemm_tn_acc against OpenBLAS): float32 [28-200, 896] x [896, 200-400] (P2's
#: weight gradients) 93-112 against 56-92, [320, 13120] x [13120, 1024] (P4's) 93-98
#: against 84-88; wider, the strided reads of ``A`` stop paying: [512, k] 88-99 against
#: 86-95, [1024, 3200] x [3200, 2048] 90 against 96-100; float64 [200, 896] 51-55
#: against 38-50, [200-320, 3000-4000] 45-50 against 49-50.
TN_MAX_ROW_BYTES = 1280


@kernel
def gemm_tn(m, n, k, a, aoff, lda, b, boff, ldb, c, coff, ldc, nthreads):
    """Row-major ``C[m, n] = A^T @ B`` for ``A [k, m]``, ``B [k, n]`` (element offsets and
    leading dimensions as :func:`fastseq_kernels._blas.gemm`): on one thread and for rows
    of ``C`` up to :data:`TN_MAX_ROW_BYTES`, :func:`gemm_tn_acc`; else BLAS on
    ``nthreads`` threads."""
    if nthreads <= 1 and m * c.itemsize <= TN_MAX_ROW_BYTES and k > 0:
        _gemm_tn(m, n, k, a, aoff, lda, b, boff, ldb, panel_width(c), c, coff, ldc, 0)
    else:
        gemm(1, 0, m, n, k, 1.0, a, aoff, lda, b, boff, ldb, 0.0, c, coff, ldc, nthreads)


@kernel(inline="always")
def _zero_block(c, coff, ldc, m, n):
    cf = c.reshape(c.size)
    for i in range(m):
        base = coff + i * ldc
        for j in range(n):
            cf[base + j] = 0


#: Most columns of ``C`` for which :func:`gemm_nt` packs ``B^T`` and runs the packed
#: micro-kernel rather than BLAS: two panels. Measured on the Zen 4 machine, one thread,
#: float32 (GFLOP/s, packed against OpenBLAS): [13120, 1024] x [1024, 64] (P4's input
#: gradient) 97 against 80, [3277, 1024] x [1024, 64] 102 against 90, [896, 400] x [400,
#: 28] 80 against 69; with more columns BLAS is level or ahead ([896, 400] x [400, 200]:
#: 97 against 102).
NT_MAX_PANELS = 2


@kernel
def gemm_nt(m, n, k, a, aoff, lda, b, boff, ldb, beta, c, coff, ldc, nthreads):
    """Row-major ``C[m, n] = A @ B^T + beta * C`` (``beta`` 0 or 1) for ``A [m, k]`` and
    ``B [n, k]`` (the input gradients ``dG @ W^T``): on one thread and with at most
    :data:`NT_MAX_PANELS` panels of columns, ``B^T`` packed once (:func:`pack_panels_t`,
    ``n * k`` elements) and :func:`gemm_packed`; else BLAS on ``nthreads`` threads."""
    if nthreads <= 1 and 0 < n <= NT_MAX_PANELS * panel_width(c) and k > 0 and m > 0:
        bp = pack_panels_t(b, boff, ldb, k, n)
        gemm_packed(m, n, k, a, aoff, lda, bp, c, coff, ldc, scratch_for(c), beta)
    else:
        gemm(0, 1, m, n, k, 1.0, a, aoff, lda, b, boff, ldb, beta, c, coff, ldc, nthreads)


@kernel
def pack_panels_t(b, boff, ldb, k, n):
    """As :func:`pack_panels` for ``B = Bt.T`` where ``Bt [n, k]`` is row-major at
    ``boff`` with leading dimension ``ldb`` (the backward pass multiplies by the
    transposed recurrent kernel)."""
    NR = panel_width(b)
    npan = (n + NR - 1) // NR
    out = np.zeros(npan * k * NR, b.dtype)
    bf = b.reshape(b.size)
    for q in range(npan):
        j0 = q * NR
        w = min(NR, n - j0)
        for j in range(w):
            src = boff + (j0 + j) * ldb
            for p in range(k):
                out[(q * k + p) * NR + j] = bf[src + p]
    return out


#: Rows above which a step product with two threads allowed goes to BLAS on two threads
#: instead of the packed micro-kernel on one. Measured on the 2-core reference machine
#: (float32, shapes of P1-P4, GFLOP/s): the packed kernel ran at 90-150 single-threaded
#: from 4 to 64 rows, OpenBLAS at 50-125 on one thread and 68-101 on two for up to 32
#: rows, but 98-147 on two threads from 48 rows (the packed kernel 82-160 there).
#: float64 (``PACKED_MAX_M_PARALLEL_F64``): the packed kernel 42-80 from 8 rows, OpenBLAS on
#: two threads 47-77 from 16 rows and ahead on [16-64, 256] x [256, 1024] (61-92 vs 42-54).
PACKED_MAX_M_PARALLEL = 32
PACKED_MAX_M_PARALLEL_F64 = 12

#: Steps below which the forward and backward kernels do not pack (packing reads and
#: writes the recurrent kernel once, about what one step's product reads).
PACK_MIN_STEPS = 4


@kernel
def scratch_for(c):
    """The scratch buffer :func:`gemm_acc_packed` needs for arrays of ``c``'s dtype."""
    return np.empty(MAX_HEIGHT * panel_width(c), c.dtype)


@kernel
def step_product(m, n, k, a, aoff, lda, bp, b, boff, ldb, transb, c, coff, ldc, beta, nthreads, scratch):
    """One step's ``C[m, n] = A @ op(B) + beta * C`` (``beta`` 0 or 1; row-major, element
    offsets and leading dimensions as :func:`fastseq_kernels._blas.gemm`). ``bp``: ``op(B)``
    packed by :func:`pack_panels` / :func:`pack_panels_t`, or an empty array when the
    caller did not pack (then BLAS or the in-house loops of ``_blas`` run, as before).
    With packed weights the micro-kernel runs unless the product is large enough for two
    BLAS threads, ``nthreads`` allows them and ``m > PACKED_MAX_M_PARALLEL`` (float64:
    ``PACKED_MAX_M_PARALLEL_F64``)."""
    if m <= 0 or n <= 0:
        return
    max_m = PACKED_MAX_M_PARALLEL if c.itemsize == 4 else PACKED_MAX_M_PARALLEL_F64
    use_packed = bp.shape[0] > 0 and not (nthreads >= 2 and m > max_m and m * n * k >= PARALLEL_MIN_MACS)
    if use_packed:
        gemm_packed(m, n, k, a, aoff, lda, bp, c, coff, ldc, scratch, beta)
    elif transb == 0 and beta != 0:
        step_gemm_acc(m, n, k, a, aoff, lda, b, boff, ldb, c, coff, ldc, nthreads)
    else:
        gemm(0, transb, m, n, k, 1.0, a, aoff, lda, b, boff, ldb, beta, c, coff, ldc, nthreads)


@kernel
def pack_if_worth(steps, b, boff, ldb, k, n, transposed):
    """Packed ``op(B)`` for :func:`step_product` when a loop of ``steps`` steps will use it,
    else an empty array (``transposed``: ``B`` is given as ``Bt [n, k]``)."""
    if steps < PACK_MIN_STEPS or k <= 0 or n <= 0:
        return np.empty(0, b.dtype)
    if transposed:
        return pack_panels_t(b, boff, ldb, k, n)
    return pack_panels(b, boff, ldb, k, n)


@kernel(inline="always")
def packed_size(b, k, n):
    """Elements of ``B [k, n]`` packed by :func:`pack_panels` / :func:`pack_panels_t`."""
    NR = panel_width(b)
    return ((n + NR - 1) // NR) * k * NR


def packed_or_empty(packed, dtype):
    """``packed``, or for None an empty array of ``dtype`` (which :func:`given_or_pack`
    ignores): the Python drivers' optional packed-weights arguments."""
    return np.empty(0, dtype) if packed is None else packed


@kernel(inline="always")
def given_or_pack(given, steps, b, boff, ldb, k, n, transposed):
    """``given`` when it has the size of ``op(B)`` packed (the caller packed these weights
    earlier with :func:`pack_if_worth` and knows they have not changed since, see
    ``backends/fastseq_numba/_packcache.py``), else :func:`pack_if_worth`. A ``given`` of any
    other size (e.g. empty) is ignored, so a wrong one cannot make the micro-kernel read
    out of bounds."""
    if steps >= PACK_MIN_STEPS and k > 0 and n > 0 and given.shape[0] == packed_size(b, k, n):
        return given
    return pack_if_worth(steps, b, boff, ldb, k, n, transposed)
