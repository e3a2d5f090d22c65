"""The GRU time loops on two threads (fastseq_kernels.gru.gru_forward_split and
gru_backward_split): the same outputs, final state, workspace and gradients as the
one-thread kernels, under both ways of sharing a step (columns of each product or rows
of the batch), with and without
sequence_length (lengths 0 and T), forward and reversed, float32 and float64, for unit
counts on and off the packed panels; the same when the helper thread is busy; correct
from several Python threads at once; and the backend takes it for inference (against the
reference), for inference and for training."""

import numpy as np
import pytest

import fastseq
from fastseq import nn

from _kernel_helpers import assert_close, gru_kernel_args, LENGTHS, run_in_threads, training_against_reference

TOL = {np.float32: 1e-5, np.float64: 1e-10}


@pytest.fixture(params=["columns", "rows"])
def scheme(request, monkeypatch):
    """Both ways the two-thread loops share a step: the columns of every product (two
    barriers per step) or the rows of the batch (no barrier; from ``ROWS_MIN_B`` rows)."""
    from fastseq_kernels import gru

    monkeypatch.setattr(gru, "ROWS_MIN_B", 1 if request.param == "rows" else 1 << 62)
    monkeypatch.setattr(gru, "ROWS_MAX_WEIGHT_BYTES", 1 << 62)
    return request.param


_args = gru_kernel_args


def _one_thread(x, gk, gb, ck, cb, h0, L, reverse, need_grad):
    from fastseq_kernels import gru

    dt = x.dtype
    e1, e3 = np.zeros(0, dt), np.zeros((0, 1, 1), dt)
    return gru.gru_forward(x, gk, gb, ck, cb, h0, L, reverse, e3, 0, need_grad, 1, e1, e1, False)


def _split(x, gk, gb, ck, cb, h0, L, reverse, need_grad):
    from fastseq_kernels import gru

    e1 = np.zeros(0, x.dtype)
    return gru.gru_forward_split(x, gk, gb, ck, cb, h0, L, reverse, need_grad, e1, e1)


def _compare(got, want, dtype, what, workspace, tol=None):
    tol = TOL[dtype] if tol is None else tol
    assert_close(got[0], want[0], tol, f"{what}: y")
    assert_close(got[1], want[1], tol, f"{what}: h_T")
    if workspace:
        for i, name in enumerate(("X", "gates", "candidate", "H history", "r*h history")):
            assert_close(got[2][i], want[2][i], tol, f"{what}: workspace {name}")
        for i in range(5, 9):  # the row plan
            np.testing.assert_array_equal(got[2][i], want[2][i])


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("lengths", sorted(LENGTHS))
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("need_grad", [False, True], ids=["infer", "grad"])
def test_split_matches_one_thread(dtype, lengths, reverse, need_grad, scheme):
    T, B, I, H = 9, 8, 5, 64
    args = _args(dtype, T, B, I, H, LENGTHS[lengths](T, B))
    want = _one_thread(*args, reverse, need_grad)
    got = _split(*args, reverse, need_grad)
    _compare(got, want, dtype, "split", need_grad)


def _backward_pair(dtype, T, B, I, H, lengths, reverse, seed=0, nthreads=1):
    from fastseq_kernels import gru

    x, gk, gb, ck, cb, h0, L = _args(dtype, T, B, I, H, lengths, seed)
    y, hT, ws = _one_thread(x, gk, gb, ck, cb, h0, L, reverse, True)
    rng = np.random.default_rng(seed + 1)
    dy = rng.normal(size=y.shape).astype(dtype)
    dhT = rng.normal(size=hT.shape).astype(dtype)
    e1, e3 = np.zeros(0, dtype), np.zeros((0, 1, 1), dtype)
    want = gru.gru_backward(ws, gk, gb, ck, cb, dy, dhT, T, reverse, e3, 0, 1, e1, e1, False)
    got = gru.gru_backward_split(ws, gk, ck, dy, dhT, T, reverse, nthreads, e1, e1)
    return got, want


GRADS = ("dx", "dh0", "d gates kernel", "d gates bias", "d candidate kernel", "d candidate bias")

#: The backward tail's GEMMs: one after the other (``nthreads`` 1) or claimed by the two
#: threads of the pair, one BLAS thread each (``nthreads`` 2, ``gru.TAIL_ON_PAIR``).
TAIL = pytest.mark.parametrize("tail_threads", [1, 2], ids=["tail1", "tail-pair"])


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("lengths", sorted(LENGTHS))
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@TAIL
def test_backward_split_matches_one_thread(dtype, lengths, reverse, scheme, tail_threads):
    T, B = 9, 8
    got, want = _backward_pair(dtype, T, B, 5, 64, LENGTHS[lengths](T, B), reverse, nthreads=tail_threads)
    for g, w_, name in zip(got, want, GRADS):
        assert_close(g, w_, TOL[dtype], name)


@pytest.mark.parametrize("H", [32, 40, 200])
@TAIL
def test_backward_split_unit_counts(H, scheme, tail_threads):
    got, want = _backward_pair(np.float32, 7, 5, 4, H, [7, 2, 0, 7, 6], False, seed=H, nthreads=tail_threads)
    for g, w_, name in zip(got, want, GRADS):
        assert_close(g, w_, TOL[np.float32], f"H={H}: {name}")


@TAIL
def test_backward_split_with_the_helper_busy_runs_alone(scheme, tail_threads):
    from fastseq_kernels import _team

    assert _team._HELPER.busy.acquire(timeout=10)
    try:
        got, want = _backward_pair(np.float64, 6, 4, 3, 48, [6, 1, 0, 4], True, nthreads=tail_threads)
    finally:
        _team._HELPER.busy.release()
    for g, w_, name in zip(got, want, GRADS):
        assert_close(g, w_, TOL[np.float64], name)


@pytest.mark.parametrize("H", [32, 40, 200, 544])
def test_split_unit_counts(H, scheme):
    """One panel; a panel and a part (the reset and update columns of one chunk share a
    panel); P2's 200 units (12.5 gate panels); many panels."""
    args = _args(np.float32, 7, 5, 4, H, [7, 2, 0, 7, 6], seed=H)
    want = _one_thread(*args, False, True)
    got = _split(*args, False, True)
    # The row scheme cuts the 5 rows into other micro-kernel blocks than the one-thread
    # loop (1- and 2-row blocks sum several accumulator sets), so float32 sums of H terms
    # round differently: the tolerance grows with the depth (H=544: measured 2.4e-5).
    tol = TOL[np.float32] * max(1.0, H / 128) if scheme == "rows" else None
    _compare(got, want, np.float32, f"H={H}", True, tol)


def test_split_chunk_columns_cover_each_column_once():
    from fastseq_kernels._atomic import chunk_cols

    for ncols in (8, 32, 40, 200, 400, 544):
        for nch in (1, 2, 3, 8):
            npan = (ncols + 31) // 32
            if nch > npan:
                continue
            spans = [chunk_cols(c, nch, ncols, 32) for c in range(nch)]
            assert spans[0][0] == 0 and spans[-1][1] == ncols
            for (a0, a1), (b0, b1) in zip(spans, spans[1:]):
                assert a1 == b0 and a0 < a1 and a0 % 32 == 0
            panels = [(j1 - j0 + 31) // 32 for j0, j1 in spans]
            assert max(panels) - min(panels) <= 1  # whole panels, spread evenly


def test_split_with_the_helper_busy_runs_alone(scheme):
    from fastseq_kernels import _team

    args = _args(np.float64, 6, 4, 3, 48, [6, 1, 0, 4])
    want = _one_thread(*args, False, True)
    assert _team._HELPER.busy.acquire(timeout=10)
    try:
        got = _split(*args, False, True)
    finally:
        _team._HELPER.busy.release()
    _compare(got, want, np.float64, "helper busy", True)


def test_split_from_several_threads_at_once(scheme):
    cases = [_args(np.float32, 12, 6, 4, 64, [12, 3, 0, 12, 7, 1], seed=s) for s in range(4)]
    wants = [_one_thread(*c, False, False) for c in cases]
    results = [None] * len(cases)

    def work(i):
        for _ in range(5):
            results[i] = _split(*cases[i], False, False)

    run_in_threads(work, len(cases))
    for got, want in zip(results, wants):
        _compare(got, want, np.float32, "threads", False)


def test_split_applies_only_where_it_can():
    from fastseq_kernels.gru import SPLIT_MIN_MACS, split_applies

    big_b = SPLIT_MIN_MACS // (3 * 200 * 200) + 1
    assert split_applies(big_b, 200, 28, True, 2)
    assert not split_applies(big_b, 200, 28, True, 1)  # one thread allowed
    assert not split_applies(big_b, 200, 28, False, 2)  # another activation, a state mask, training
    assert not split_applies(big_b, 200, 3, True, 2)  # too few steps
    assert not split_applies(SPLIT_MIN_MACS // (3 * 16 * 16) + 1, 16, 28, True, 2)  # less than a panel of units
    assert not split_applies(1, 200, 28, True, 2)  # too small a product per step


def test_split_scheme_follows_batch_and_weight_size():
    from fastseq_kernels.gru import ROWS_MIN_B, _split_by_rows

    assert _split_by_rows(32, 200, 4)  # P2: 480 KB of recurrent weights, 32 rows
    assert not _split_by_rows(ROWS_MIN_B - 1, 200, 4)  # too few rows to halve
    assert not _split_by_rows(32, 512, 4)  # 3 MB: each worker would stream all of it per step
    assert not _split_by_rows(32, 200, 8)  # float64 doubles the bytes


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("time_major", [False, True], ids=["batch", "time"])
@pytest.mark.parametrize("with_lengths", [False, True], ids=["padded", "lengths"])
def test_backend_takes_the_split_loop_and_agrees_with_the_reference(dtype, time_major, with_lengths, scheme,
                                                                                  monkeypatch):
    from fastseq_kernels import gru

    calls = []
    real = gru.gru_forward_split
    monkeypatch.setattr(gru, "gru_forward_split", lambda *a: calls.append(1) or real(*a))
    back_calls = []
    real_back = gru.gru_backward_split
    monkeypatch.setattr(gru, "gru_backward_split", lambda *a: back_calls.append(1) or real_back(*a))
    T, B, I, H = 6, 16, 7, 160  # 16 x 3 x 160 x 160 multiply-adds per step: above SPLIT_MIN_MACS
    rng = np.random.default_rng(1)
    x = rng.normal(size=(T, B, I) if time_major else (B, T, I)).astype(dtype)
    lengths = rng.integers(0, T + 1, B) if with_lengths else None
    if with_lengths:
        lengths[:2] = (0, T)
    cot = rng.normal(size=(T, B, H) if time_major else (B, T, H)).astype(dtype)
    cell = nn.rnn_cell.GRUCell(H)
    out = {}
    for backend in ("numpy", "numba"):
        with fastseq.use_backend(backend), fastseq.threads.limit(2):
            out[backend] = nn.dynamic_rnn(cell, x, sequence_length=lengths, dtype=dtype, time_major=time_major)
    assert calls, "the numba backend did not take the two-thread loop"
    (y0, s0), (y1, s1) = out["numpy"], out["numba"]
    tol = TOL[dtype]
    assert_close(y1, y0, tol, "outputs")
    assert_close(s1, s0, tol, "state")
    # training takes it too; its gradients against the reference
    n = len(calls)
    y2 = training_against_reference(cell, x, lengths, cot, dtype, time_major, tol)
    assert len(calls) > n, "training did not take the two-thread loop"
    assert back_calls, "the backward pass did not take the two-thread loop"
    assert_close(y2, y0, tol, "outputs (training)")


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("lengths", sorted(LENGTHS))
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@TAIL
def test_batch_major_split_matches_one_thread(dtype, lengths, reverse, scheme, tail_threads):
    """Batch-major ``x`` / ``y`` / ``dy`` / ``dx`` in the kernels themselves: the workers
    copy their chunks of ``x`` into plan order, write ``y`` in place, and (tail on the
    pair) copy their halves of the ``dx`` rows into it. Held to the one-thread kernels in
    the same layout."""
    from fastseq_kernels import gru

    T, B, I, H = 9, 8, 5, 64
    x, gk, gb, ck, cb, h0, L = _args(dtype, T, B, I, H, LENGTHS[lengths](T, B), seed=6)
    xb = np.ascontiguousarray(x.transpose(1, 0, 2))
    e1, e3 = np.zeros(0, dtype), np.zeros((0, 1, 1), dtype)
    want = gru.gru_forward(xb, gk, gb, ck, cb, h0, L, reverse, e3, 0, True, 1, e1, e1, True)
    got = gru.gru_forward_split(xb, gk, gb, ck, cb, h0, L, reverse, True, e1, e1, True)
    _compare(got, want, dtype, "batch-major forward", True)
    rng = np.random.default_rng(7)
    dy = rng.normal(size=want[0].shape).astype(dtype)
    dhT = rng.normal(size=h0.shape).astype(dtype)
    w_ = gru.gru_backward(want[2], gk, gb, ck, cb, dy, dhT, T, reverse, e3, 0, 1, e1, e1, True)
    g_ = gru.gru_backward_split(got[2], gk, ck, dy, dhT, T, reverse, tail_threads, e1, e1, True)
    for g, w, name in zip(g_, w_, GRADS):
        assert_close(g, w, TOL[dtype], f"batch-major {name}")
    assert g_[0].shape == xb.shape
