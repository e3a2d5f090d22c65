"""The LSTM time loops on two threads (fastseq_kernels.lstm.lstm_forward_split and
lstm_backward_split, _team, _atomic): the same outputs, final states, workspace and
gradients as the one-thread kernels, under both ways of sharing a step (the units of each
step or the rows of the batch), with and without sequence_length (lengths 0 and T),
forward and reversed, float32 and float64; the same when the helper thread is busy
(worker 0 alone does every task); correct from several Python threads at once; and the
backend takes them (with gradients against the reference)."""

import numpy as np
import pytest

from fastseq import nn

from _kernel_helpers import assert_close, count_calls, forward_on_backends, LENGTHS, run_in_threads, lstm_kernel_args, \
    lstm_one_thread, training_against_reference

TOL = {np.float32: 1e-5, np.float64: 1e-10}


@pytest.fixture(params=["units", "rows"])
def scheme(request, monkeypatch):
    """Both ways the two-thread loops share a step: the units of every step (a barrier per
    step) or the rows of the batch (no barrier; ``lstm.split_by_rows``)."""
    from fastseq_kernels import lstm

    monkeypatch.setattr(lstm, "ROWS_MIN_B", 1 if request.param == "rows" else 1 << 62)
    monkeypatch.setattr(lstm, "ROWS_MAX_WEIGHT_BYTES", 1 << 62)
    return request.param


_args = lstm_kernel_args


def _compare(got, want, dtype, what):
    for i, name in enumerate(("y", "c_T", "h_T")):
        assert_close(got[i], want[i], TOL[dtype], f"{what}: {name}")
    if want[3] is not None:
        for i, name in enumerate(("X", "G", "H history", "C history")):
            assert_close(got[3][i], want[3][i], TOL[dtype], f"{what}: workspace {name}")
        for i in range(6, 10):  # the row plan
            np.testing.assert_array_equal(got[3][i], want[3][i])


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("lengths", sorted(LENGTHS))
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("need_grad", [False, True], ids=["infer", "grad"])
def test_split_matches_one_thread(dtype, lengths, reverse, need_grad, scheme):
    from fastseq_kernels import lstm

    T, B, I, H = 9, 8, 5, 64  # 64 units: two float32 panels, four float64 panels
    x, k, b, c0, h0, L = _args(dtype, T, B, I, H, LENGTHS[lengths](T, B))
    want = lstm_one_thread(x, k, b, c0, h0, L, reverse, need_grad)
    e1 = np.zeros(0, dtype)
    got = lstm.lstm_forward_split(x, k, b, c0, h0, L, reverse, 1.0, need_grad, 2, e1)
    _compare(got, want if need_grad else want[:3] + (None,), dtype, "split")


@pytest.mark.parametrize("H", [32, 96, 160])
def test_split_unit_counts(H, scheme):
    """One panel (one chunk), three panels (three chunks), five (five chunks)."""
    from fastseq_kernels import lstm

    x, k, b, c0, h0, L = _args(np.float32, 7, 5, 4, H, [7, 2, 0, 7, 6], seed=H)
    want = lstm_one_thread(x, k, b, c0, h0, L, False, True)
    got = lstm.lstm_forward_split(x, k, b, c0, h0, L, False, 1.0, True, 2, np.zeros(0, np.float32))
    _compare(got, want, np.float32, f"H={H}")


def test_split_rejects_units_off_the_panels():
    from fastseq_kernels import lstm
    from fastseq_kernels._packed import panel_cols

    x, k, b, c0, h0, L = _args(np.float32, 4, 2, 3, 40, [4, 4])
    with pytest.raises(ValueError, match=f"multiple of {panel_cols(4)}"):
        lstm.lstm_forward_split(x, k, b, c0, h0, L, False, 1.0, False, 2, np.zeros(0, np.float32))


@pytest.mark.parametrize("H", [512, 544])
def test_split_chunks_of_several_panels(H, scheme):
    """More than MAX_CHUNKS panels: chunks of several panels, all alike (512 units) and not (544)."""
    from fastseq_kernels import lstm

    x, k, b, c0, h0, L = _args(np.float32, 5, 3, 4, H, [5, 0, 3], seed=H)
    want = lstm_one_thread(x, k, b, c0, h0, L, False, True)
    got = lstm.lstm_forward_split(x, k, b, c0, h0, L, False, 1.0, True, 2, np.zeros(0, np.float32))
    _compare(got, want, np.float32, f"H={H}")


def _backward_pair(dtype, T, B, I, H, lengths, reverse, seed=0, packed_x=None):
    """Gradients of one forward run by the one-thread and the two-thread backward kernels."""
    from fastseq_kernels import lstm

    x, k, b, c0, h0, L = _args(dtype, T, B, I, H, lengths, seed)
    y, cT, hT, ws = lstm_one_thread(x, k, b, c0, h0, L, reverse, True)
    rng = np.random.default_rng(seed + 1)
    dy = rng.normal(size=y.shape).astype(dtype)
    dcT = rng.normal(size=cT.shape).astype(dtype)
    dhT = rng.normal(size=hT.shape).astype(dtype)
    e1, e2, e3 = np.zeros(0, dtype), np.zeros((0, 0), dtype), np.zeros((0, 1, 1), dtype)
    want = lstm.lstm_backward(ws, k, b, e1, e1, e1, e2, dy, dcT, dhT, T, reverse, e3, e3, 0, 1.0, -1.0, -1.0, 1, e1, False)
    if isinstance(packed_x, str):  # kernel[:I]^T packed by the caller, as the backend keeps it
        from fastseq_kernels._packed import pack_panels_t

        packed_x = pack_panels_t(k, 0, 4 * H, 4 * H, I)
    got = lstm.lstm_backward_split(ws, k, dy, dcT, dhT, T, reverse, 1, e1, False, packed_x)
    return got, want[:5]


GRADS = ("dx", "dc0", "dh0", "dkernel", "dbias")


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("lengths", sorted(LENGTHS))
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
def test_backward_split_matches_one_thread(dtype, lengths, reverse, scheme):
    T, B = 9, 8
    got, want = _backward_pair(dtype, T, B, 5, 64, LENGTHS[lengths](T, B), reverse)
    for g, w_, name in zip(got, want, GRADS):
        assert_close(g, w_, TOL[dtype], name)
    assert got[5].shape == (0, 0)  # no projection gradient


@pytest.mark.parametrize("H", [32, 96, 512, 544])
def test_backward_split_unit_counts(H, scheme):
    """One or two panels per chunk, more panels than chunks, chunks of unequal panels."""
    got, want = _backward_pair(np.float32, 6, 5, 4, H, [6, 2, 0, 6, 5], False, seed=H)
    for g, w_, name in zip(got, want, GRADS):
        assert_close(g, w_, TOL[np.float32], f"H={H}: {name}")


@pytest.mark.parametrize("B", [1, 2, 3])
@pytest.mark.parametrize("packed_x", [None, "packed", "wrong size"])
def test_row_split_small_batches_and_packed_input_rows(B, packed_x, monkeypatch):
    """The row split with a part of one row or none at all (B = 1), forward and backward;
    the transposed input rows of the kernel packed by the caller, packed by the kernel, or
    given with a wrong size (ignored, packed again)."""
    from fastseq_kernels import lstm

    monkeypatch.setattr(lstm, "ROWS_MIN_B", 1)
    x, k, b, c0, h0, L = _args(np.float64, 7, B, 3, 64, [7, 0, 4][:B], seed=B)
    want = lstm_one_thread(x, k, b, c0, h0, L, True, True)
    got = lstm.lstm_forward_split(x, k, b, c0, h0, L, True, 1.0, True, 2, np.zeros(0, np.float64))
    _compare(got, want, np.float64, f"B={B}")
    px = np.zeros(5, np.float64) if packed_x == "wrong size" else packed_x
    got, want = _backward_pair(np.float64, 7, B, 3, 64, [7, 0, 4][:B], True, seed=B, packed_x=px)
    for g, w_, name in zip(got, want, GRADS):
        assert_close(g, w_, TOL[np.float64], f"B={B}: {name}")


def test_split_by_rows_where_it_measured_faster():
    from fastseq_kernels.lstm import ROWS_MAX_WEIGHT_BYTES, ROWS_MIN_B, split_by_rows

    assert split_by_rows(64, 512, 4)  # P3's shape
    assert split_by_rows(ROWS_MIN_B, 256, 4)
    assert not split_by_rows(ROWS_MIN_B - 1, 256, 4)  # a part of two rows streams all weights for them
    assert not split_by_rows(64, 1024, 4)  # 16 MB of recurrent rows read by each thread every step
    assert 4 * 512 * 512 * 8 <= ROWS_MAX_WEIGHT_BYTES and split_by_rows(64, 512, 8)


def test_backward_split_with_the_helper_busy_runs_alone(scheme):
    from fastseq_kernels import _team

    assert _team._HELPER.busy.acquire(timeout=10)
    try:
        got, want = _backward_pair(np.float64, 6, 4, 3, 32, [6, 1, 0, 4], True)
    finally:
        _team._HELPER.busy.release()
    for g, w_, name in zip(got, want, GRADS):
        assert_close(g, w_, TOL[np.float64], name)


def test_backward_split_rejects_units_off_the_panels():
    from fastseq_kernels import lstm
    from fastseq_kernels._packed import panel_cols

    H = panel_cols(4) + 8
    e1 = np.zeros(0, np.float32)
    ws = lstm_one_thread(*_args(np.float32, 4, 2, 3, H, [4, 4]), False, True)[3]
    with pytest.raises(ValueError, match=f"multiple of {panel_cols(4)}"):
        lstm.lstm_backward_split(ws, np.zeros((3 + H, 4 * H), np.float32), np.zeros((4, 2, H), np.float32),
                                 np.zeros((2, H), np.float32), np.zeros((2, H), np.float32), 4, False, 1, e1)


def test_split_with_the_helper_busy_runs_alone(scheme):
    from fastseq_kernels import _team, lstm

    x, k, b, c0, h0, L = _args(np.float64, 6, 4, 3, 32, [6, 1, 0, 4])
    want = lstm_one_thread(x, k, b, c0, h0, L, False, True)
    assert _team._HELPER.busy.acquire(timeout=10)
    try:
        got = lstm.lstm_forward_split(x, k, b, c0, h0, L, False, 1.0, True, 2, np.zeros(0, np.float64))
    finally:
        _team._HELPER.busy.release()
    _compare(got, want, np.float64, "helper busy")


def test_split_from_several_threads_at_once(scheme):
    from fastseq_kernels import lstm

    cases = [_args(np.float32, 12, 6, 4, 64, [12, 3, 0, 12, 7, 1], seed=s) for s in range(4)]
    wants = [lstm_one_thread(*c, False, False) for c in cases]
    results = [None] * len(cases)

    def work(i):
        for _ in range(5):
            results[i] = lstm.lstm_forward_split(*cases[i][:6], False, 1.0, False, 2, np.zeros(0, np.float32))

    run_in_threads(work, len(cases))
    for got, want in zip(results, wants):
        _compare(got, want[:3] + (None,), np.float32, "threads")


def test_backward_split_from_several_threads_at_once(scheme):
    """Four Python threads each running the two-thread backward (one of them gets the
    helper, the others run worker 0 alone) give the one-thread kernel's gradients."""
    cases = [dict(T=8, B=6, I=4, H=64, lengths=[8, 3, 0, 8, 5, 1], reverse=bool(s % 2), seed=s) for s in range(4)]
    results = [None] * len(cases)

    def work(i):
        for _ in range(3):
            results[i] = _backward_pair(np.float32, **cases[i])

    run_in_threads(work, len(cases))
    for i, (got, want) in enumerate(results):
        for g, w_, name in zip(got, want, GRADS):
            assert_close(g, w_, TOL[np.float32], f"thread {i}: {name}")


def test_split_applies_only_where_it_can():
    from fastseq_kernels.lstm import SPLIT_MIN_MACS, split_applies

    big_b = SPLIT_MIN_MACS // (4 * 512 * 512) + 1
    assert split_applies(big_b, 512, 512, 50, True, 2, 4)
    assert not split_applies(big_b, 512, 512, 50, True, 1, 4)  # one thread allowed
    assert not split_applies(big_b, 512, 512, 50, False, 2, 4)  # peepholes, clipping, masks ...
    assert not split_applies(big_b, 500, 500, 50, True, 2, 4)  # units off the panels
    assert not split_applies(big_b, 512, 256, 50, True, 2, 4)  # projection
    assert not split_applies(big_b, 512, 512, 3, True, 2, 4)  # too few steps
    assert not split_applies(1, 512, 512, 50, True, 2, 4)  # too small a product per step


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("time_major", [False, True], ids=["batch", "time"])
@pytest.mark.parametrize("with_lengths", [False, True], ids=["padded", "lengths"])
def test_backend_takes_the_split_loop_and_agrees_with_the_reference(dtype, time_major, with_lengths, scheme,
                                                                    monkeypatch):
    from fastseq_kernels import lstm

    calls = count_calls(monkeypatch, lstm, "lstm_forward_split")
    back_calls = count_calls(monkeypatch, lstm, "lstm_backward_split")
    T, B, I, H = 6, 16, 7, 256  # 16 x 1024 x 256 multiply-adds per step: above SPLIT_MIN_MACS
    rng = np.random.default_rng(1)
    x = rng.normal(size=(T, B, I) if time_major else (B, T, I)).astype(dtype)
    lengths = rng.integers(0, T + 1, B) if with_lengths else None
    if with_lengths:
        lengths[:2] = (0, T)
    cot = rng.normal(size=(T, B, H) if time_major else (B, T, H)).astype(dtype)
    cell = nn.rnn_cell.LSTMCell(H)
    out = forward_on_backends(cell, x, lengths, dtype, time_major)
    assert calls, "the numba backend did not take the two-thread loop"
    (y0, s0), (y1, s1) = out["numpy"], out["numba"]
    tol = TOL[dtype]
    assert_close(y1, y0, tol, "outputs")
    assert_close(s1.c, s0.c, tol, "c")
    assert_close(s1.h, s0.h, tol, "h")
    # training takes it too; its gradients against the reference
    n = len(calls)
    y2 = training_against_reference(cell, x, lengths, cot, dtype, time_major, tol)
    assert len(calls) > n, "training did not take the two-thread loop"
    assert back_calls, "training did not take the two-thread backward loop"
    assert_close(y2, y0, tol, "outputs (training)")


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("lengths", sorted(LENGTHS))
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
def test_batch_major_split_matches_one_thread(dtype, lengths, reverse, scheme):
    """Batch-major ``x`` / ``y`` / ``dy`` / ``dx`` in the kernels themselves: the row split
    copies its chunks of ``x`` into plan order on both threads, writes ``y`` in place, and
    its backward writes ``dx`` straight into a uniform batch's rows (a constant stride) or
    copies each part's rows into it (sorted rows, zeros past each length); the unit split
    gathers and scatters as before. Held to the one-thread kernels in the same layout."""
    from fastseq_kernels import lstm

    T, B, I, H = 9, 8, 5, 64
    x, k, b, c0, h0, L = _args(dtype, T, B, I, H, LENGTHS[lengths](T, B), seed=4)
    xb = np.ascontiguousarray(x.transpose(1, 0, 2))
    want = lstm_one_thread(xb, k, b, c0, h0, L, reverse, True, bm=True)
    got = lstm.lstm_forward_split(xb, k, b, c0, h0, L, reverse, 1.0, True, 2, np.zeros(0, dtype), True)
    _compare(got, want, dtype, "batch-major forward")
    rng = np.random.default_rng(5)
    dy = rng.normal(size=want[0].shape).astype(dtype)
    dcT, dhT = rng.normal(size=c0.shape).astype(dtype), rng.normal(size=h0.shape).astype(dtype)
    e1, e2, e3 = np.zeros(0, dtype), np.zeros((0, 0), dtype), np.zeros((0, 1, 1), dtype)
    w_ = lstm.lstm_backward(want[3], k, b, e1, e1, e1, e2, dy, dcT, dhT, T, reverse, e3, e3, 0, 1.0, -1.0, -1.0, 1, e1,
                            True)
    g_ = lstm.lstm_backward_split(got[3], k, dy, dcT, dhT, T, reverse, 1, e1, True)
    for g, w, name in zip(g_, w_[:5], GRADS):
        assert_close(g, w, TOL[dtype], f"batch-major {name}")
    assert g_[0].shape == xb.shape
