"""A stack of GRU layers in one two-thread job (fastseq_kernels.gru.gru_stack_forward,
the numba backend's ``stack_forward``): the same outputs and final states as the layers
run one after another by the row-split loop, and as the NumPy reference through the API
(MultiRNNCell, batch-major and time-major, with and without sequence_length including
lengths 0 and T, forward and reversed, float32 and float64); the same when the helper
thread is busy and from several Python threads at once; the kept packed weights follow
the cells' weights; training and configurations the stack does not cover go layer by
layer."""

import gc

import numpy as np
import pytest

import fastseq
from fastseq import nn

from _kernel_helpers import assert_close, run_in_threads

TOL = {np.float32: 1e-5, np.float64: 1e-10}


@pytest.fixture(autouse=True)
def rows_everywhere(monkeypatch):
    """Small shapes take the row split (and so the stack) as P2's do."""
    from fastseq_kernels import gru

    monkeypatch.setattr(gru, "ROWS_MIN_B", 1)
    monkeypatch.setattr(gru, "ROWS_MAX_WEIGHT_BYTES", 1 << 62)
    monkeypatch.setattr(gru, "SPLIT_MIN_MACS", 0)


def _layers(dtype, I, H, Ls, rng):
    out = []
    for l in range(Ls):
        n = (I if l == 0 else H) + H
        out.append(((rng.normal(size=(n, 2 * H)) * 0.3).astype(dtype), (rng.normal(size=2 * H) * 0.3).astype(dtype),
                    (rng.normal(size=(n, H)) * 0.3).astype(dtype), (rng.normal(size=H) * 0.3).astype(dtype)))
    return out


def _stack_call(x, h0, layers, lengths, reverse, bm):
    """gru_stack_forward with the weights laid out as the backend lays them out."""
    from fastseq_kernels import gru
    from fastseq_kernels._packed import pack_panels as pk

    I = x.shape[2]
    H = h0.shape[2]
    H2 = 2 * H
    ins = [I] + [H] * (len(layers) - 1)
    return gru.gru_stack_forward(
        x, h0, layers[0][0], layers[0][2], np.stack([L[1] for L in layers]), np.stack([L[3] for L in layers]),
        np.stack([pk(L[0], i * H2, H2, H, H2) for L, i in zip(layers, ins)]),
        np.stack([pk(L[2], i * H, H, H, H) for L, i in zip(layers, ins)]),
        (pk(layers[0][0], 0, H2, I, H2), np.stack([pk(L[0], 0, H2, H, H2) for L in layers[1:]])),
        (pk(layers[0][2], 0, H, I, H), np.stack([pk(L[2], 0, H, H, H) for L in layers[1:]])),
        lengths, reverse, bm)


def _layer_by_layer(x, h0, layers, lengths, reverse, bm):
    from fastseq_kernels import gru

    e1 = np.zeros(0, x.dtype)
    finals = []
    for l, (gk, gb, ck, cb) in enumerate(layers):
        x, hT, _ = gru.gru_forward_split(x, gk, gb, ck, cb, h0[l], lengths, reverse, False, e1, e1, bm)
        finals.append(hT)
    return x, np.stack(finals)


def _case(dtype, T, B, I, H, Ls, lengths, bm, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(B, T, I) if bm else (T, B, I)).astype(dtype)
    h0 = rng.normal(size=(Ls, B, H)).astype(dtype)
    return x, h0, _layers(dtype, I, H, Ls, rng), np.asarray(lengths, np.int64)


LENGTHS = {
    "full": lambda T, B: [T] * B,
    "mixed": lambda T, B: [T, 0, 3, T, 1, T - 1, 2, 5, 0][:B],  # 0 and T among them
    "all_zero": lambda T, B: [0] * B,
}


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("pattern", sorted(LENGTHS))
@pytest.mark.parametrize("reverse", [False, True], ids=["fw", "rev"])
@pytest.mark.parametrize("bm", [False, True], ids=["time", "batch"])
@pytest.mark.parametrize("B", [8, 9])  # 9: the parts' rows are not one stride through all steps
def test_stack_matches_layer_by_layer(dtype, pattern, reverse, bm, B):
    T, I, H, Ls = 7, 5, 40, 3
    x, h0, layers, lengths = _case(dtype, T, B, I, H, Ls, LENGTHS[pattern](T, B), bm)
    y, hT = _stack_call(x, h0, layers, lengths, reverse, bm)
    want_y, want_h = _layer_by_layer(x, h0, layers, lengths, reverse, bm)
    assert y.shape == want_y.shape and hT.shape == (Ls, B, H)
    assert_close(y, want_y, TOL[dtype], "outputs")
    assert_close(hT, want_h, TOL[dtype], "final states")
    if pattern == "all_zero":  # nothing runs: zero outputs, the initial states come back
        assert not y.any()
        np.testing.assert_array_equal(hT, h0)


def test_two_layers_and_many_layers():
    for Ls in (2, 5):
        x, h0, layers, lengths = _case(np.float32, 6, 8, 3, 32, Ls, [6, 2, 6, 0, 5, 6, 1, 3], False, seed=Ls)
        y, hT = _stack_call(x, h0, layers, lengths, False, False)
        want_y, want_h = _layer_by_layer(x, h0, layers, lengths, False, False)
        assert_close(y, want_y, 1e-5, f"{Ls} layers: outputs")
        assert_close(hT, want_h, 1e-5, f"{Ls} layers: final states")


def test_stack_with_the_helper_busy_runs_alone():
    from fastseq_kernels import _team

    x, h0, layers, lengths = _case(np.float64, 6, 8, 3, 48, 3, [6, 1, 0, 4, 6, 6, 2, 5], True)
    want = _layer_by_layer(x, h0, layers, lengths, False, True)
    assert _team._HELPER.busy.acquire(timeout=10)
    try:
        got = _stack_call(x, h0, layers, lengths, False, True)
    finally:
        _team._HELPER.busy.release()
    assert_close(got[0], want[0], 1e-10, "outputs")
    assert_close(got[1], want[1], 1e-10, "final states")


def test_stack_from_several_threads_at_once():
    cases = [_case(np.float32, 9, 10, 4, 64, 3, [9, 3, 0, 9, 7, 1, 9, 2, 5, 8], bool(s % 2), seed=s)
             for s in range(4)]
    wants = [_layer_by_layer(x, h, ls, L, False, bool(s % 2)) for s, (x, h, ls, L) in enumerate(cases)]
    results = [None] * len(cases)

    def work(i):
        for _ in range(5):
            x, h, ls, L = cases[i]
            results[i] = _stack_call(x, h, ls, L, False, bool(i % 2))

    run_in_threads(work, len(cases))
    for got, want in zip(results, wants):
        assert_close(got[0], want[0], 1e-5, "threads: outputs")
        assert_close(got[1], want[1], 1e-5, "threads: final states")


def test_stack_applies_only_where_it_can(monkeypatch):
    from fastseq_kernels import gru

    monkeypatch.undo()  # the module's own thresholds
    assert gru.stack_applies(32, 200, 3, 28, 2, 4)  # P2
    assert not gru.stack_applies(32, 200, 1, 28, 2, 4)  # one layer: layer_forward
    assert not gru.stack_applies(32, 200, 3, 28, 1, 4)  # one thread allowed
    assert not gru.stack_applies(32, 200, 3, 28, 2, 8)  # float64: the column split per layer
    assert not gru.stack_applies(32, 200, 3, 3, 2, 4)  # too few steps
    assert not gru.stack_applies(4, 200, 3, 28, 2, 4)  # too few rows to halve


# ---------------------------------------------------------------------------- the backend
def _stack_cell(H, Ls, kind=None):
    make = kind or nn.rnn_cell.GRUCell
    return nn.rnn_cell.MultiRNNCell([make(H) for _ in range(Ls)])


def _count(monkeypatch):
    from fastseq_kernels import gru

    calls = []
    real = gru.gru_stack_forward
    monkeypatch.setattr(gru, "gru_stack_forward", lambda *a: calls.append(1) or real(*a))
    return calls


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("time_major", [False, True], ids=["batch", "time"])
@pytest.mark.parametrize("with_lengths", [False, True], ids=["padded", "lengths"])
def test_backend_takes_the_stack_and_agrees_with_the_reference(dtype, time_major, with_lengths, monkeypatch):
    calls = _count(monkeypatch)
    T, B, I, H = 6, 10, 7, 48
    rng = np.random.default_rng(3)
    x = rng.normal(size=(T, B, I) if time_major else (B, T, I)).astype(dtype)
    lengths = rng.integers(0, T + 1, B) if with_lengths else None
    if with_lengths:
        lengths[:2] = (0, T)
    fastseq.set_seed(0)
    cell = _stack_cell(H, 3)
    s0 = tuple(rng.normal(size=(B, H)).astype(dtype) for _ in range(3))
    out = {}
    for backend in ("numpy", "numba"):
        with fastseq.use_backend(backend), fastseq.threads.limit(2):
            out[backend] = nn.dynamic_rnn(cell, x, sequence_length=lengths, initial_state=s0, dtype=dtype,
                                          time_major=time_major)
    assert calls, "the numba backend did not run the stack in one job"
    (y0, f0), (y1, f1) = out["numpy"], out["numba"]
    assert isinstance(f1, tuple) and len(f1) == 3
    assert_close(y1, y0, TOL[dtype], "outputs")
    for l in range(3):
        assert_close(f1[l], f0[l], TOL[dtype], f"final state of layer {l}")


def test_bidirectional_stacks_take_it_in_both_directions(monkeypatch):
    calls = _count(monkeypatch)
    T, B, I, H = 8, 12, 5, 32
    rng = np.random.default_rng(4)
    x = rng.normal(size=(B, T, I)).astype(np.float32)
    lengths = rng.integers(0, T + 1, B)
    lengths[:2] = (0, T)
    fastseq.set_seed(1)
    fw, bw = _stack_cell(H, 2), _stack_cell(H, 3)
    out = {}
    for backend in ("numpy", "numba"):
        # four threads: each direction runs on its own two (fastseq.threads), so each may
        # take the two-thread stack (one of them alone when the other holds the helper)
        with fastseq.use_backend(backend), fastseq.threads.limit(4):
            out[backend] = nn.bidirectional_dynamic_rnn(fw, bw, x, sequence_length=lengths, dtype=np.float32)
    assert len(calls) == 2
    (ys0, fs0), (ys1, fs1) = out["numpy"], out["numba"]
    for a, b in zip(ys1, ys0):
        assert_close(a, b, 1e-5, "outputs")
    for d in range(2):
        for a, b in zip(fs1[d], fs0[d]):
            assert_close(a, b, 1e-5, "final states")


def test_training_and_other_stacks_go_layer_by_layer(monkeypatch):
    calls = _count(monkeypatch)
    rng = np.random.default_rng(5)
    x = rng.normal(size=(10, 6, 4)).astype(np.float32)
    cot = rng.normal(size=(10, 6, 32)).astype(np.float32)
    fastseq.set_seed(2)
    with fastseq.use_backend("numba"), fastseq.threads.limit(2):
        cell = _stack_cell(32, 2)
        (y, _), pullback = fastseq.vjp(nn.dynamic_rnn, cell, x, dtype=np.float32)
        pullback(cot, None)
        assert not calls, "training must keep each layer's workspace: layer by layer"
        nn.dynamic_rnn(cell, x, dtype=np.float32)
        assert len(calls) == 1
        with fastseq.threads.limit(1):  # one thread: nothing to split
            nn.dynamic_rnn(cell, x, dtype=np.float32)
        mixed = nn.rnn_cell.MultiRNNCell([nn.rnn_cell.GRUCell(32), nn.rnn_cell.GRUCell(48)])
        nn.dynamic_rnn(mixed, x, dtype=np.float32)  # layers of other sizes
        nn.dynamic_rnn(_stack_cell(32, 2, nn.rnn_cell.LSTMCell), x, dtype=np.float32)
        nn.dynamic_rnn(nn.rnn_cell.MultiRNNCell([nn.rnn_cell.GRUCell(32, activation="relu"),
                                                 nn.rnn_cell.GRUCell(32)]), x, dtype=np.float32)
    assert len(calls) == 1


def test_kept_stack_weights_follow_the_cells_weights(monkeypatch):
    calls = _count(monkeypatch)
    rng = np.random.default_rng(6)
    x = rng.normal(size=(8, 10, 6)).astype(np.float32)
    fastseq.set_seed(3)
    cell = _stack_cell(32, 3)
    with fastseq.use_backend("numba"), fastseq.threads.limit(2):
        y1, _ = nn.dynamic_rnn(cell, x, dtype=np.float32)
        again, _ = nn.dynamic_rnn(cell, x, dtype=np.float32)
        np.testing.assert_array_equal(again, y1)
        # new weights (set_weights replaces the arrays): the kept packs must not be used
        weights = cell.get_weights()
        cell.set_weights({k: w * 0.5 for k, w in weights.items()})
        y2, _ = nn.dynamic_rnn(cell, x, dtype=np.float32)
    with fastseq.use_backend("numpy"):
        want, _ = nn.dynamic_rnn(cell, x, dtype=np.float32)
    assert len(calls) == 3
    assert_close(y2, want, 1e-5, "outputs after set_weights")
    assert np.abs(y2 - y1).max() > 1e-3


def test_kept_stack_weights_are_bounded_and_go_with_their_weights():
    from fastseq import backend as registry

    rng = np.random.default_rng(7)
    x = rng.normal(size=(8, 10, 6)).astype(np.float32)
    with fastseq.use_backend("numba"), fastseq.threads.limit(2):
        numba_backend = registry.current()
        table = numba_backend._stacks
        table.clear()
        cells = [_stack_cell(32, 2) for _ in range(numba_backend.MAX_STACKS + 3)]
        for c in cells:
            nn.dynamic_rnn(c, x, dtype=np.float32)
        assert 0 < len(table) <= numba_backend.MAX_STACKS
        del cells, c
        gc.collect()
        assert len(table) == 0


# ------------------------------------------------------------------ the API's direct path
@pytest.mark.parametrize("time_major", [False, True], ids=["batch_major", "time_major"])
@pytest.mark.parametrize("given", ["plain", "lengths", "state"])
def test_direct_stack_inference_equals_the_general_path(time_major, given, monkeypatch):
    from fastseq.nn import rnn as rnn_mod

    calls = _count(monkeypatch)
    rng = np.random.default_rng(8)
    B, T, I = 8, 9, 4
    x = rng.normal(size=(T, B, I) if time_major else (B, T, I)).astype(np.float32)
    cell = _stack_cell(32, 3)
    kw = dict(dtype=np.float32, time_major=time_major)
    if given == "lengths":
        kw["sequence_length"] = np.array([9, 0, 6, 9, 1, 2, 8, 3])
    with fastseq.use_backend("numba"), fastseq.threads.limit(2):
        if given == "state":
            kw["initial_state"] = tuple(rng.normal(size=(B, 32)).astype(np.float32) for _ in range(3))
            kw.pop("dtype")
        direct = nn.dynamic_rnn(cell, x, **kw)
        monkeypatch.setattr(rnn_mod, "_stack_inference", lambda *a: None)
        general = nn.dynamic_rnn(cell, x, **kw)
    assert len(calls) == 2  # both took the stack
    assert type(direct[1]) is type(general[1]) and len(direct[1]) == 3
    np.testing.assert_array_equal(direct[0], general[0])
    for a, c in zip(direct[1], general[1]):
        np.testing.assert_array_equal(a, c)


@pytest.mark.parametrize("bad, exc, match", [
    (dict(dtype=np.float64), ValueError, "does not match the inputs' dtype"),
    (dict(sequence_length=[3] * 7 + [99]), ValueError, "sequence_length must be <= the number of time steps"),
    (dict(sequence_length=[3]), ValueError, "sequence_length must have shape"),
    (dict(initial_state=(np.zeros((8, 32), np.float32),) * 2), ValueError, "initial_state"),
    (dict(initial_state=(np.zeros((8, 32), np.float32),) * 2 + (np.zeros((8, 31), np.float32),)), ValueError,
     "initial_state"),
    (dict(time_major=1), TypeError, "time_major must be a bool"),
])
def test_direct_stack_inference_raises_the_general_paths_errors(bad, exc, match):
    cell = _stack_cell(32, 3)
    x = np.ones((8, 6, 3), np.float32)
    with fastseq.use_backend("numba"), fastseq.threads.limit(2):
        with pytest.raises(exc, match=match):
            nn.dynamic_rnn(cell, x, **bad)
