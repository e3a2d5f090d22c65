"""The LSTM forward with its input projection on the helper thread
(fastseq_kernels.lstm.lstm_forward_stream): the same outputs, final states and workspace
as the one-thread kernel (and a backward from that workspace the same gradients), with
and without sequence_length (lengths 0 and T), forward and reversed, batch- and
time-major, float32 and float64, chunk edges; worker 0 alone when the helper is busy;
from several Python threads at once; and the backend takes it for few-row inference and
agrees with the reference."""

import numpy as np
import pytest

from _kernel_helpers import assert_close, check_backend_takes_for_inference, LENGTHS, lstm_case, \
    lstm_one_thread, run_in_threads

TOL = {np.float32: 1e-5, np.float64: 1e-10}


def _compare(got, want, dtype, what, need_grad):
    for i, name in enumerate(("y", "c_T", "h_T")):
        assert_close(got[i], want[i], TOL[dtype], f"{what}: {name}")
    if need_grad:
        for i, name in enumerate(("X", "G", "H history", "C history")):
            assert_close(got[3][i], want[3][i], TOL[dtype], f"{what}: workspace {name}")
        for i in (4, 5):  # no projection: empty
            assert got[3][i].size == 0
        for i in range(6, 10):  # the row plan
            np.testing.assert_array_equal(got[3][i], want[3][i])


_case = lstm_case


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("lengths", sorted(LENGTHS))
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("need_grad", [False, True], ids=["infer", "grad"])
@pytest.mark.parametrize("bm", [False, True], ids=["time", "batch"])
def test_stream_matches_one_thread(dtype, lengths, reverse, need_grad, bm):
    from fastseq_kernels import lstm

    T, B = 21, 3  # three chunks of STREAM_STEPS, the last one short
    x, k, b, c0, h0, L = _case(dtype, T, B, LENGTHS[lengths](T, B), bm)
    want = lstm_one_thread(x, k, b, c0, h0, L, reverse, need_grad, bm)
    got = lstm.lstm_forward_stream(x, k, b, c0, h0, L, reverse, 1.0, need_grad, np.zeros(0, dtype), bm)
    _compare(got, want, dtype, "stream", need_grad)
    if need_grad:  # the workspace serves the one-thread backward as the one-thread forward's does
        e1, e2, e3 = np.zeros(0, dtype), np.zeros((0, 0), dtype), np.zeros((0, 1, 1), dtype)
        dy = np.random.default_rng(5).normal(size=want[0].shape).astype(dtype)
        z = np.zeros_like(c0)
        args = (k, b, e1, e1, e1, e2, dy, z, z, T, reverse, e3, e3, 0, 1.0, -1.0, -1.0, 1, e1, bm)
        for g, w, name in zip(lstm.lstm_backward(got[3], *args), lstm.lstm_backward(want[3], *args),
                              ("dx", "dc0", "dh0", "dkernel", "dbias")):
            assert_close(g, w, TOL[dtype], f"backward {name}")


@pytest.mark.parametrize("T", [1, 7, 8, 9, 16, 17, 40])
def test_stream_chunk_edges(T):
    """Steps fewer than, equal to and one past a chunk (and its multiples), with lengths
    that end inside chunks."""
    from fastseq_kernels import lstm

    lengths = [T, max(T - 8, 0), T // 2, 1]
    x, k, b, c0, h0, L = _case(np.float64, T, 4, lengths, False, seed=T)
    want = lstm_one_thread(x, k, b, c0, h0, L, False, True, False)
    got = lstm.lstm_forward_stream(x, k, b, c0, h0, L, False, 1.0, True, np.zeros(0, np.float64), False)
    _compare(got, want, np.float64, f"T={T}", True)


def test_stream_with_the_helper_busy_runs_alone():
    from fastseq_kernels import _team, lstm

    x, k, b, c0, h0, L = _case(np.float64, 30, 2, [30, 11], False)
    want = lstm_one_thread(x, k, b, c0, h0, L, True, True, False)
    assert _team._HELPER.busy.acquire(timeout=10)
    try:
        got = lstm.lstm_forward_stream(x, k, b, c0, h0, L, True, 1.0, True, np.zeros(0, np.float64), False)
    finally:
        _team._HELPER.busy.release()
    _compare(got, want, np.float64, "helper busy", True)


def test_stream_from_several_threads_at_once():
    from fastseq_kernels import lstm

    cases = [_case(np.float32, 33, 2, [33, 9], False, seed=s) for s in range(4)]
    wants = [lstm_one_thread(*c, False, False, False) for c in cases]
    results = [None] * len(cases)

    def work(i):
        for _ in range(20):
            results[i] = lstm.lstm_forward_stream(*cases[i], False, 1.0, False, np.zeros(0, np.float32), False)

    run_in_threads(work, len(cases))
    for got, want in zip(results, wants):
        _compare(got, want, np.float32, "threads", False)


def test_stream_applies_only_where_it_should():
    from fastseq_kernels.lstm import STREAM_MIN_STEPS, stream_applies

    n = STREAM_MIN_STEPS
    assert stream_applies(1, n, True, 2, False, False, False)
    assert not stream_applies(1, n, True, 1, False, False, False)  # one thread allowed
    assert not stream_applies(1, n, False, 2, False, False, False)  # peepholes, clipping, masks ...
    assert not stream_applies(1, n - 1, True, 2, False, False, False)  # too few steps
    assert not stream_applies(1, n, True, 2, True, False, False)  # fused loop instead
    assert not stream_applies(1, n, True, 2, False, True, False)  # two-thread loop instead
    assert not stream_applies(1, n, True, 2, False, False, True)  # training (measured slower)
    assert not stream_applies(0, n, True, 2, False, False, False)  # no rows


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("time_major", [False, True], ids=["batch", "time"])
@pytest.mark.parametrize("with_lengths", [False, True], ids=["padded", "lengths"])
def test_backend_takes_the_stream_for_inference(dtype, time_major, with_lengths, monkeypatch):
    # 32 units: recurrent weights under PAIR_MIN_WEIGHT_BYTES, so not the two-half loop
    check_backend_takes_for_inference(monkeypatch, "lstm_forward_stream", 32, dtype, time_major, with_lengths)
