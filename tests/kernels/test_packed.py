"""The packed-weight step products (fastseq_kernels._packed) against NumPy in float64:
every micro-kernel height (12, 8, 4, 2, 1 rows and their sums), right-edge panels of every
width, depth 0 and 1, offsets and leading dimensions into larger buffers, the transposed
packing, the one-row product over a matrix in column blocks (gemv_blocks), and step_product's choice
between the packed kernel and BLAS."""

import numpy as np
import pytest

TOL = {np.float32: 2e-6, np.float64: 1e-13}


def _rel_err(got, want):
    scale = max(np.abs(want).max(), 1e-30)
    return np.abs(got.astype(np.float64) - want).max() / scale


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_pack_panels_layout(dtype):
    from fastseq_kernels._packed import WIDE, pack_panels, pack_panels_t, panel_cols, panel_width

    nr = (32 if WIDE else 16) if dtype == np.float32 else (16 if WIDE else 8)  # two vectors of 64 or 32 bytes
    assert panel_width(np.zeros(1, dtype)) == nr == panel_cols(np.dtype(dtype).itemsize)
    rng = np.random.default_rng(0)
    k, n = 5, nr + 3
    buf = rng.normal(size=(k + 2, n + 4)).astype(dtype)  # B = buf[2:, 1:n+1]
    bp = pack_panels(buf, 2 * (n + 4) + 1, n + 4, k, n)
    b = buf[2:, 1:n + 1]
    assert bp.shape == (2 * k * nr,)
    panels = bp.reshape(2, k, nr)
    np.testing.assert_array_equal(panels[0], b[:, :nr])
    np.testing.assert_array_equal(panels[1][:, :3], b[:, nr:])
    assert not panels[1][:, 3:].any()  # zero padding past n
    # transposed source: Bt [n, k] with B = Bt.T
    bt_buf = np.ascontiguousarray(np.pad(b.T, ((1, 0), (0, 2))))  # Bt at row 1, ld k+2
    bpt = pack_panels_t(bt_buf, k + 2, k + 2, k, n)
    np.testing.assert_array_equal(bpt, bp)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("beta", [1, 0])
def test_gemm_packed_against_numpy(dtype, beta):
    """Every row count up to three passes of the tallest micro-kernel (the rows are cut
    into passes of nearly equal height), whole panels, a right edge wider and narrower
    than half a panel, depths that leave remainders for the multi-set heights. ``beta =
    0`` must not read ``C`` (its block starts as NaN) nor write outside the block."""
    from fastseq_kernels._packed import MAX_HEIGHT, gemm_acc_packed, gemm_packed, pack_panels, panel_cols, \
        scratch_for

    rng = np.random.default_rng(1)
    nr = panel_cols(np.dtype(dtype).itemsize)
    ms = tuple(range(3 * MAX_HEIGHT + 2)) + (64,)
    ns = (1, nr // 2, nr - 1, nr, nr + 1, 2 * nr + 5)
    for m in ms:
        for n in ns:
            for k in (0, 1, 6, 33):
                a = rng.normal(size=(m + 1, k + 3)).astype(dtype)  # A at row 1, column 2
                b = rng.normal(size=(max(k, 1), n)).astype(dtype)
                c = rng.normal(size=(m + 2, n + 3)).astype(dtype)  # C at row 1, column 1
                want = c.astype(np.float64)
                prod = a[1:, 2:k + 2].astype(np.float64) @ b[:k].astype(np.float64)
                if beta:
                    want[1:m + 1, 1:n + 1] += prod
                else:
                    want[1:m + 1, 1:n + 1] = prod
                    c[1:m + 1, 1:n + 1] = np.nan
                bp = pack_panels(b, 0, n, k, n)
                args = (m, n, k, a, (k + 3) + 2, k + 3, bp, c, (n + 3) + 1, n + 3, scratch_for(c))
                if beta:
                    gemm_acc_packed(*args)
                else:
                    gemm_packed(*args, 0)
                assert _rel_err(c, want) <= TOL[dtype], f"m={m} n={n} k={k}"


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_gemv_blocks_against_numpy(dtype):
    """One row times ``B`` in column blocks (the one-row steps of ``lstm_forward_pair``):
    the layout ``pack_gemv_blocks`` writes, then the product over every block width the
    accumulators come in (16, 8, 4, 2, 1 vectors) and the columns past the last whole
    vector, depths 0, 1 and longer, at offsets into larger buffers, read forwards and
    backwards (``rev``, the odd steps of the serpentine loop); nothing outside
    ``c[coff:coff + n]`` written."""
    from numba import njit

    from fastseq_kernels._packed import gemv_blocks, pack_gemv_blocks, panel_cols, scratch_for

    from _kernel_helpers import gemv_blocks_layout

    pack = njit(lambda src, dst, doff: pack_gemv_blocks(src, dst, doff))
    prod = njit(lambda k, a, aoff, b, boff, n, c, coff, scr, rev: gemv_blocks(k, a, aoff, b, boff, n, c, coff, scr,
                                                                               rev))
    rng = np.random.default_rng(7)
    vw = panel_cols(np.dtype(dtype).itemsize) // 2
    ns = (1, vw - 1, vw, vw + 1, 2 * vw + 3, 16 * vw, 31 * vw + 3, 40 * vw + 5)
    for n in ns:
        for k in (0, 1, 6, 33, 128):
            bm = rng.normal(size=(k, n + 4)).astype(dtype)[:, 2:2 + n]  # strided source
            b = rng.normal(size=k * n + 9).astype(dtype)
            pack(bm, b, 5)
            np.testing.assert_array_equal(b[5:5 + k * n], gemv_blocks_layout(bm, vw))
            a = rng.normal(size=k + 5).astype(dtype)
            c0 = rng.normal(size=n + 9).astype(dtype)
            want = c0.astype(np.float64)
            want[4:4 + n] += a[3:3 + k].astype(np.float64) @ bm.astype(np.float64)
            for rev in (False, True):
                c = c0.copy()
                prod(k, a, 3, b, 5, n, c, 4, scratch_for(c), rev)
                assert _rel_err(c, want) <= TOL[dtype], f"n={n} k={k} rev={rev}"
                np.testing.assert_array_equal(c[:4], c0[:4])
                np.testing.assert_array_equal(c[4 + n:], c0[4 + n:])


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("transb", [0, 1])
@pytest.mark.parametrize("beta", [0, 1])
def test_step_product_paths(dtype, transb, beta):
    """Packed (any rows on one thread; up to PACKED_MAX_M_PARALLEL rows with two), BLAS on
    two threads above that, and the unpacked fallback (empty packed array): same result."""
    from fastseq_kernels._packed import PACKED_MAX_M_PARALLEL, PACKED_MAX_M_PARALLEL_F64, pack_if_worth, \
        scratch_for, step_product

    rng = np.random.default_rng(2)
    n, k = 150, 120  # m * n * k above _blas.PARALLEL_MIN_MACS from m = 59
    limit = PACKED_MAX_M_PARALLEL if dtype == np.float32 else PACKED_MAX_M_PARALLEL_F64
    for m in (1, 5, limit, limit + 1, 70):
        a = rng.normal(size=(m, k)).astype(dtype)
        if transb:
            b = rng.normal(size=(n, k)).astype(dtype)  # op(B) = b.T
            opb = b.T.astype(np.float64)
        else:
            b = rng.normal(size=(k, n)).astype(dtype)
            opb = b.astype(np.float64)
        for nthreads in (1, 2):
            for packed in (True, False):
                bp = pack_if_worth(100 if packed else 0, b, 0, b.shape[1], k, n, bool(transb))
                assert (bp.shape[0] > 0) == packed
                c = rng.normal(size=(m, n)).astype(dtype)
                want = beta * c.astype(np.float64) + a.astype(np.float64) @ opb
                step_product(m, n, k, a, 0, k, bp, b, 0, b.shape[1], transb, c, 0, n, beta, nthreads,
                             scratch_for(c))
                assert _rel_err(c, want) <= 10 * TOL[dtype], (m, nthreads, packed)


def test_scipy_blas_is_loaded_with_a_short_thread_timeout_and_the_environment_left_alone(monkeypatch):
    """fastseq_kernels._blas loads SciPy's OpenBLAS with OPENBLAS_THREAD_TIMEOUT set for
    the load only, and leaves a value the user set alone."""
    import os

    from fastseq_kernels import _blas

    seen = []
    monkeypatch.setattr(_blas.ctypes, "CDLL", lambda path: seen.append(os.environ.get("OPENBLAS_THREAD_TIMEOUT")))
    monkeypatch.delenv("OPENBLAS_THREAD_TIMEOUT", raising=False)
    _blas._load_blas("libopenblas.so")
    assert seen == [_blas.OPENBLAS_THREAD_TIMEOUT]
    assert "OPENBLAS_THREAD_TIMEOUT" not in os.environ
    monkeypatch.setenv("OPENBLAS_THREAD_TIMEOUT", "26")
    _blas._load_blas("libopenblas.so")
    assert seen[-1] == "26" and os.environ["OPENBLAS_THREAD_TIMEOUT"] == "26"


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_gemm_tn_acc_against_numpy(dtype):
    """``C += A^T B`` read in place: every micro-kernel height, whole panels, wide and
    narrow right edges (two vectors and one), depth 0, 1 and across depth blocks
    (``TN_KC``), offsets and leading dimensions into larger buffers."""
    from fastseq_kernels._packed import TN_KC, gemm_tn_acc, panel_cols

    rng = np.random.default_rng(2)
    nr = panel_cols(np.dtype(dtype).itemsize)
    for m in (0, 1, 2, 3, 5, 8, 12, 13, 27, 40):
        for n in (1, nr // 2 - 1, nr // 2, nr // 2 + 1, nr - 1, nr, nr + 3, 2 * nr + nr // 2):
            for k in (0, 1, 9, TN_KC + 7):
                a = rng.normal(size=(k + 1, m + 3)).astype(dtype)  # A at row 1, column 2
                b = rng.normal(size=(k + 2, n + 1)).astype(dtype)  # B at row 2, column 1
                c = rng.normal(size=(m + 2, n + 3)).astype(dtype)  # C at row 1, column 1
                want = c.astype(np.float64)
                want[1:m + 1, 1:n + 1] += a[1:, 2:m + 2].T.astype(np.float64) @ b[2:, 1:].astype(np.float64)
                gemm_tn_acc(m, n, k, a, (m + 3) + 2, m + 3, b, 2 * (n + 1) + 1, n + 1, c, (n + 3) + 1, n + 3)
                assert _rel_err(c, want) <= TOL[dtype], f"m={m} n={n} k={k}"


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_gemm_tn_panels_against_numpy(dtype):
    """``C += A^T B`` with ``B`` stored panel-major (as the LSTM backward kernels write
    their gate gradients): every micro-kernel height, one and several panels, depth 1, 9
    and across depth blocks (``TN_KC``), offsets and leading dimensions of ``A`` and
    ``C`` into larger buffers, all panels and those from the second on (a thread's share);
    ``B`` is built from a row-major array by a NumPy transpose, so a mixed-up panel or row
    shows."""
    from fastseq_kernels._packed import TN_KC, gemm_tn_panels, panel_cols

    rng = np.random.default_rng(12)
    nr = panel_cols(np.dtype(dtype).itemsize)
    for m in (1, 2, 3, 5, 8, 12, 13, 27, 40):
        for n in (nr, 3 * nr):
            for k in (1, 9, TN_KC + 7):
                a = rng.normal(size=(k + 1, m + 3)).astype(dtype)  # A at row 1, column 2
                b = rng.normal(size=(k, n)).astype(dtype)
                bp = np.ascontiguousarray(b.reshape(k, n // nr, nr).transpose(1, 0, 2)).reshape(-1)
                c = rng.normal(size=(m + 2, n + 3)).astype(dtype)  # C at row 1, column 1
                want = c.astype(np.float64)
                want[1:m + 1, 1:n + 1] += a[1:, 2:m + 2].T.astype(np.float64) @ b.astype(np.float64)
                gemm_tn_panels(m, n, k, a, (m + 3) + 2, m + 3, bp, 0, c, (n + 3) + 1, n + 3)
                assert _rel_err(c, want) <= TOL[dtype], f"m={m} n={n} k={k}"
                if n > nr:  # the panels from the second on only (a thread's share of them)
                    c2 = c.copy()
                    want = c2.astype(np.float64)
                    want[1:m + 1, 1:n - nr + 1] += a[1:, 2:m + 2].T.astype(np.float64) @ b[:, nr:].astype(np.float64)
                    gemm_tn_panels(m, n - nr, k, a, (m + 3) + 2, m + 3, bp, 1, c2, (n + 3) + 1, n + 3)
                    assert _rel_err(c2, want) <= TOL[dtype], f"from panel 1: m={m} n={n} k={k}"


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("beta", [0, 1])
def test_gemm_tn_panel_rows_against_numpy(dtype, beta):
    """``C = A^T B + beta C`` over the depth rows ``d0:d1`` of a panel-major ``B`` (the LSTM
    backward's kernel gradient without the rows of a zero ``h_0``): ranges from the
    start, to the end, inside, across depth blocks (``TN_KC``), one row and none; with
    ``beta = 0`` what ``C`` held (nan) does not reach the result and an empty range
    leaves zeros; only the ``m x n`` block is written."""
    from numba import njit

    from fastseq_kernels._packed import TN_KC, gemm_tn_panel_rows, panel_cols

    @njit
    def call(m, n, K, d0, d1, a, lda, bp, q0, c, coff, ldc, beta):
        gemm_tn_panel_rows(m, n, K, d0, d1, a, lda, bp, q0, c, coff, ldc, beta)

    rng = np.random.default_rng(13)
    nr = panel_cols(np.dtype(dtype).itemsize)
    K = TN_KC + 40
    for m in (1, 5, 12, 29):
        a = rng.normal(size=(K, m + 2)).astype(dtype)  # A's rows m + 2 apart
        for n, q0 in ((nr, 0), (2 * nr, 1)):
            b = rng.normal(size=(K, 3 * nr)).astype(dtype)
            bp = np.ascontiguousarray(b.reshape(K, 3, nr).transpose(1, 0, 2)).reshape(-1)
            for d0, d1 in ((0, K), (0, 7), (K - 9, K), (3, TN_KC + 5), (10, 11), (6, 6)):
                c0 = rng.normal(size=(m + 1, n + 3)).astype(dtype)
                if beta == 0:
                    c0[1:, 2:n + 2] = np.nan
                c = c0.copy()
                call(m, n, K, d0, d1, a, m + 2, bp, q0, c, (n + 3) + 2, n + 3, beta)
                want = a[d0:d1, :m].T.astype(np.float64) @ b[d0:d1, q0 * nr:q0 * nr + n].astype(np.float64)
                if beta:
                    want += c0[1:, 2:n + 2]
                assert _rel_err(c[1:, 2:n + 2], want) <= TOL[dtype], f"m={m} n={n} rows {d0}:{d1}"
                np.testing.assert_array_equal(c[0], c0[0])
                np.testing.assert_array_equal(c[1:, :2], c0[1:, :2])
                np.testing.assert_array_equal(c[1:, n + 2:], c0[1:, n + 2:])


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_gemm_tn_restrided_a_against_numpy(dtype):
    """Rows of ``A`` a multiple of ``TN_BAD_STRIDE`` bytes apart: both ``A^T B`` kernels
    copy each depth block of ``A`` with a padded stride first. Row blocks of every height
    and a partial last vector, ``A`` from an offset column and row, depth within one
    block and across three (the last one short), whole and narrow right edges."""
    from fastseq_kernels._packed import TN_BAD_STRIDE, TN_KC, gemm_tn_acc, gemm_tn_panels, panel_cols

    itemsize = np.dtype(dtype).itemsize
    lda = 2 * TN_BAD_STRIDE // itemsize
    rng = np.random.default_rng(21)
    nr = panel_cols(itemsize)
    for m in (1, 5, 13, 40, lda - 3):
        for k in (7, 2 * TN_KC + 9):
            a = rng.normal(size=(k + 1, lda)).astype(dtype)  # A at row 1, column 3
            for n in (nr, 2 * nr + 3):
                b = rng.normal(size=(k, n)).astype(dtype)
                c = rng.normal(size=(m + 1, n + 2)).astype(dtype)  # C at row 1, column 2
                want = c.astype(np.float64)
                want[1:, 2:] += a[1:, 3:m + 3].T.astype(np.float64) @ b.astype(np.float64)
                gemm_tn_acc(m, n, k, a, lda + 3, lda, b, 0, n, c, (n + 2) + 2, n + 2)
                assert _rel_err(c, want) <= TOL[dtype], f"row-major B: m={m} n={n} k={k}"
                if n % nr == 0:
                    bp = np.ascontiguousarray(b.reshape(k, n // nr, nr).transpose(1, 0, 2)).reshape(-1)
                    c = want.astype(dtype)
                    want[1:, 2:] += a[1:, 3:m + 3].T.astype(np.float64) @ b.astype(np.float64)
                    gemm_tn_panels(m, n, k, a, lda + 3, lda, bp, 0, c, (n + 2) + 2, n + 2)
                    assert _rel_err(c, want) <= TOL[dtype], f"panel-major B: m={m} n={n} k={k}"


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("m", [7, 200, 400])
@pytest.mark.parametrize("nthreads", [1, 2])
def test_gemm_tn_paths(dtype, m, nthreads):
    """gemm_tn overwrites ``C`` (stale values, NaN included, do not leak in) by the strided
    kernel (one thread, rows of C up to TN_MAX_ROW_BYTES) or BLAS (otherwise): same
    product. The parameters cover both paths in both dtypes."""
    from fastseq_kernels._packed import TN_KC, TN_MAX_ROW_BYTES, gemm_tn

    itemsize = np.dtype(dtype).itemsize
    assert 7 * itemsize <= TN_MAX_ROW_BYTES < 400 * itemsize
    rng = np.random.default_rng(3)
    # the strided kernel stores its first depth block (no zeroing pass): whole panels, a
    # narrow and a wide right edge, depth within one block and across two
    for k, n in ((45, 70), (TN_KC + 9, 90), (3, 64)):
        a = rng.normal(size=(k, m)).astype(dtype)
        b = rng.normal(size=(k, n)).astype(dtype)
        c = np.full((m + 1, n), np.nan, dtype)
        gemm_tn(m, n, k, a, 0, m, b, 0, n, c, n, n, nthreads)
        assert np.isnan(c[0]).all()
        assert _rel_err(c[1:], a.T.astype(np.float64) @ b) <= TOL[dtype], f"k={k} n={n}"
    c2 = np.full((m, n), np.nan, dtype)
    gemm_tn(m, n, 0, a, 0, m, b, 0, n, c2, 0, n, nthreads)  # no rows to sum: zeros
    assert not c2.any()


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("nthreads", [1, 2])
@pytest.mark.parametrize("beta", [0, 1])
def test_gemm_nt_paths(dtype, nthreads, beta):
    """gemm_nt: ``C = A @ B^T + beta * C`` with ``B`` given as rows (a kernel's input rows,
    leading dimension wider than ``k``), narrow (packed micro-kernel on one thread) and
    wide (BLAS) ``C``, every micro-kernel height and edge width; ``beta`` 0 ignores stale
    values (NaN)."""
    from fastseq_kernels._packed import NT_MAX_PANELS, gemm_nt, panel_cols

    nr = panel_cols(np.dtype(dtype).itemsize)
    rng = np.random.default_rng(4)
    k = 37
    for m in (1, 2, 5, 12, 13, 29):
        for n in (1, nr - 3, nr, nr + 5, NT_MAX_PANELS * nr, NT_MAX_PANELS * nr + 1, 5 * nr):
            a = rng.normal(size=(m, k + 2)).astype(dtype)  # A at column 2
            b = rng.normal(size=(n + 1, k + 4)).astype(dtype)  # B at row 1, column 1
            c0 = rng.normal(size=(m, n + 3)).astype(dtype)
            if beta == 0:
                c0[:, 1:n + 1] = np.nan
            c = c0.copy()
            gemm_nt(m, n, k, a, 2, k + 2, b, (k + 4) + 1, k + 4, float(beta), c, 1, n + 3, nthreads)
            want = a[:, 2:].astype(np.float64) @ b[1:, 1:k + 1].T.astype(np.float64)
            if beta:
                want += c0[:, 1:n + 1]
            assert _rel_err(c[:, 1:n + 1], want) <= TOL[dtype], f"m={m} n={n}"
            np.testing.assert_array_equal(c[:, 0], c0[:, 0])
            np.testing.assert_array_equal(c[:, n + 1:], c0[:, n + 1:])


_GUARD_SCRIPT = r"""
import ctypes, mmap, sys
import numpy as np
from fastseq_kernels._packed import gemm_tn_acc, panel_cols

dtype = np.dtype(sys.argv[1])
page = mmap.PAGESIZE
buf = mmap.mmap(-1, 64 * page)
libc = ctypes.CDLL(None)
addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
assert libc.mprotect(ctypes.c_void_p(addr + 63 * page), page, 0) == 0  # PROT_NONE
mem = np.frombuffer(buf, dtype=dtype, count=63 * page // dtype.itemsize)
nr = panel_cols(dtype.itemsize)
checked = 0
for n in (1, nr // 2, nr - 1, nr + 1, 2 * nr - 3):
    for k in (1, 5, 33):
        # B [k, n] and A [k, m] end exactly at the protected page
        m = 13
        b = mem[mem.size - k * n:].reshape(k, n)
        a = mem[mem.size - k * n - k * m: mem.size - k * n].reshape(k, m)
        rng = np.random.default_rng(k * 100 + n)
        a[:] = rng.normal(size=a.shape)
        b[:] = rng.normal(size=b.shape)
        c = np.zeros((m, n), dtype)
        gemm_tn_acc(m, n, k, mem, mem.size - k * n - k * m, m, mem, mem.size - k * n, n, c, 0, n)
        want = a.T.astype(np.float64) @ b.astype(np.float64)
        assert np.abs(c - want).max() <= 1e-4 * max(np.abs(want).max(), 1), (n, k)
        checked += 1
print("ok", checked)
"""


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_gemm_tn_acc_reads_nothing_past_b(dtype):
    """Operands that end right before a page with no access: a read past ``B`` (a narrow
    right edge loaded as whole vectors) would kill the process. Run in a subprocess so that
    such a crash fails this test only."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", _GUARD_SCRIPT, dtype], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["ok", "15"]
