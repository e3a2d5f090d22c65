"""fastseq.threads: the thread setting, run_concurrently, and bidirectional RNNs whose two
directions run side by side on the numba backend (same numbers as the reference)."""

import os
import signal
import threading
import time

import numpy as np
import pytest

import fastseq
from fastseq import threads
from fastseq.nn import rnn, rnn_cell
from fastseq.testing import assert_close, problem, run_driver


@pytest.fixture(autouse=True)
def _restore_setting():
    old = threads._setting
    yield
    threads._setting = old


def test_default_is_usable_cores(monkeypatch):
    monkeypatch.delenv(threads.ENV, raising=False)
    threads._setting = None
    assert threads.get_num_threads() == threads.usable_cores() >= 1


def test_default_is_read_once_per_process(monkeypatch):
    monkeypatch.delenv(threads.ENV, raising=False)
    threads._setting = None
    threads._forget_default()
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    assert threads.get_num_threads() == 3
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: {0}, raising=False)
    assert threads.get_num_threads() == 3  # cached: no system call per kernel call
    threads._forget_default()  # what a forked child does
    assert threads.get_num_threads() == 1
    monkeypatch.undo()
    threads._forget_default()
    assert threads.get_num_threads() == threads.usable_cores()


def test_env_and_setter(monkeypatch):
    threads._setting = None
    monkeypatch.setenv(threads.ENV, "3")
    assert threads.get_num_threads() == 3
    fastseq.set_num_threads(5)
    assert fastseq.get_num_threads() == 5
    with threads.limit(1):
        assert threads.get_num_threads() == 1
    assert threads.get_num_threads() == 5


@pytest.mark.parametrize("value, exc", [(0, ValueError), (-2, ValueError), (1.5, TypeError), ("2", TypeError),
                                        (True, TypeError), (None, TypeError)])
def test_set_num_threads_rejects(value, exc):
    with pytest.raises(exc, match="n must be a positive integer"):
        fastseq.set_num_threads(value)


@pytest.mark.parametrize("raw", ["zero", "0", "-1", "2.5"])
def test_bad_env_names_the_variable(monkeypatch, raw):
    threads._setting = None
    monkeypatch.setenv(threads.ENV, raw)
    with pytest.raises(ValueError, match="FASTSEQ_NUM_THREADS must be a positive integer"):
        threads.get_num_threads()


@pytest.mark.parametrize("share, k, expected", [(2, 2, [1, 1]), (4, 2, [2, 2]), (3, 2, [2, 1]), (5, 3, [2, 2, 1]),
                                                (1, 3, [1, 1, 1])])
def test_run_concurrently_splits_the_share(share, k, expected):
    fastseq.set_num_threads(share)
    seen = threads.run_concurrently(*[(lambda: (threads.get_num_threads(), threading.get_ident()))] * k)
    assert [s for s, _ in seen] == expected
    me = threading.get_ident()
    assert seen[0][1] == me  # the first runs in the calling thread, the others on helpers
    assert all((i != me) == (share >= 2) for _, i in seen[1:])


def test_run_concurrently_more_functions_than_threads_keeps_order():
    fastseq.set_num_threads(2)
    out = threads.run_concurrently(*[(lambda i=i: i * i) for i in range(7)])
    assert out == [i * i for i in range(7)]


def test_run_concurrently_raises_after_all_finished():
    fastseq.set_num_threads(2)
    done = []

    def slow():
        import time

        time.sleep(0.05)
        done.append(True)
        return 1

    def bad():
        raise KeyError("boom")

    with pytest.raises(KeyError, match="boom"):
        threads.run_concurrently(bad, slow)
    assert done == [True]


# --------------------------------------------------------------- bidirectional, side by side
@pytest.fixture
def spy(monkeypatch):
    calls = []
    real = threads.run_concurrently

    def wrapped(*fns):
        calls.append(len(fns))
        return real(*fns)

    monkeypatch.setattr(threads, "run_concurrently", wrapped)
    return calls


@pytest.mark.parametrize("cell_name", ["lstm_full", "gru", "multi"])
@pytest.mark.parametrize("lengths", ["mixed", "none"])
@pytest.mark.parametrize("time_major", [False, True], ids=["batch", "time"])
def test_bidirectional_concurrent_matches_reference(cell_name, lengths, time_major, dtype, spy):
    pytest.importorskip("numba")
    w, x, seq = problem(cell_name, dtype, batch=5, steps=7, lengths=lengths, time_major=time_major)
    with fastseq.use_backend("numpy"):
        ref = run_driver("bidirectional", cell_name, w, x, seq, dtype, time_major=time_major)
    fastseq.set_num_threads(2)
    with fastseq.use_backend("numba"):
        got = run_driver("bidirectional", cell_name, w, x, seq, dtype, time_major=time_major)
    assert spy == [2, 2]  # forward and backward each ran the directions side by side
    assert_close(got[0], ref[0], dtype, "outputs")
    g, r = got[1], ref[1]
    assert_close((g.inputs, g.initial_state, g.weights), (r.inputs, r.initial_state, r.weights), dtype, "grads")


def test_bidirectional_one_thread_runs_in_turn(spy):
    pytest.importorskip("numba")
    w, x, seq = problem("gru", np.float64)
    fastseq.set_num_threads(1)
    with fastseq.use_backend("numba"):
        run_driver("bidirectional", "gru", w, x, seq, np.float64)
    assert spy == []


def test_shared_cell_sums_both_directions(dtype, spy):
    """The same cell object for both directions: its weight gradient is the sum of the
    two directions' (accumulated separately on two threads, then merged)."""
    pytest.importorskip("numba")
    rng = np.random.default_rng(3)
    x = rng.standard_normal((4, 6, 3)).astype(dtype)
    seq = np.array([6, 0, 3, 5])
    cot = [rng.standard_normal((4, 6, 5)).astype(dtype) for _ in range(2)]
    results = {}
    for name in ("numpy", "numba"):
        fastseq.set_num_threads(2)
        with fastseq.use_backend(name):
            fastseq.set_seed(0)
            cell = rnn_cell.LSTMCell(5)
            cell.build(3, dtype=dtype)
            if name == "numba":
                cell.set_weights(results["numpy"][0])
            out, pb = fastseq.vjp(rnn.bidirectional_dynamic_rnn, cell, cell, x, sequence_length=seq, dtype=dtype)
            g = pb(tuple(cot), None)
            results[name] = (cell.get_weights(), out, g)
    assert spy == [2, 2]
    _, out_r, g_r = results["numpy"]
    _, out_n, g_n = results["numba"]
    assert_close(out_n, out_r, dtype, "outputs")
    assert_close((g_n.inputs, g_n.weights), (g_r.inputs, g_r.weights), dtype, "grads")
    assert g_n.weights[0] is g_n.weights[1] or all(
        np.array_equal(g_n.weights[0][k], g_n.weights[1][k]) for k in g_n.weights[0])


def test_dropout_cells_run_in_turn_and_stay_reproducible(spy):
    """Dropout masks are drawn in a fixed order: with a seed, two runs agree exactly."""
    pytest.importorskip("numba")
    w, x, seq = problem("dropout_residual", np.float64)
    fastseq.set_num_threads(2)
    with fastseq.use_backend("numba"):
        a = run_driver("bidirectional", "dropout_residual", w, x, seq, np.float64, with_grad=False)
        b = run_driver("bidirectional", "dropout_residual", w, x, seq, np.float64, with_grad=False)
    assert spy == []
    for u, v in zip(fastseq.testing.flatten(a[0]), fastseq.testing.flatten(b[0])):
        np.testing.assert_array_equal(u, v)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_bidirectional_in_forked_child():
    """The directions' thread pool is made anew in a forked child (the parent's pool
    threads do not exist there: a kept pool would start none and wait forever)."""
    import fastseq
    from fastseq.nn import bidirectional_dynamic_rnn, rnn_cell

    x = np.random.default_rng(0).standard_normal((2, 5, 3))
    fw, bw = rnn_cell.GRUCell(4), rnn_cell.GRUCell(4)
    with fastseq.use_backend("numba"):
        prev = fastseq.get_num_threads()
        fastseq.set_num_threads(2)
        try:
            (yf, yb), _ = bidirectional_dynamic_rnn(fw, bw, x, dtype=np.float64)
            pid = os.fork()
            if pid == 0:  # pragma: no cover - the child
                code = 1
                try:
                    signal.alarm(60)
                    (cf, cb), _ = bidirectional_dynamic_rnn(fw, bw, x, dtype=np.float64)
                    code = 0 if np.array_equal(cf, yf) and np.array_equal(cb, yb) else 2
                finally:
                    os._exit(code)
            deadline = time.time() + 90
            while time.time() < deadline:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    break
                time.sleep(0.05)
            else:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                pytest.fail("bidirectional_dynamic_rnn hung in a forked child")
            assert os.waitstatus_to_exitcode(status) == 0
        finally:
            fastseq.set_num_threads(prev)
