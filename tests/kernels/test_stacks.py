"""A stack of GRU or LSTM layers in one two-thread job (fastseq_kernels.gru.gru_stack_forward,
lstm.lstm_stack_forward; the numba backend's ``stack_forward``): the same outputs and
final states as the layers run one after another by the row-split loops, and as the
NumPy reference through the API (MultiRNNCell, batch-major and time-major, with and
without sequence_length including lengths 0 and T, forward and reversed, float32 and
float64); the same when the helper thread is busy and from several Python threads at
once; the kept packed weights follow the cells' weights; training and configurations the
stacks do not cover go layer by layer."""

import gc

import numpy as np
import pytest

import fastseq
from fastseq import nn

from _kernel_helpers import assert_close, run_in_threads

TOL = {np.float32: 1e-5, np.float64: 1e-10}
KINDS = ["gru", "lstm"]
UNITS = {"gru": 40, "lstm": 64}  # the LSTM loops need whole panels of units


#: Small shapes take the row split (and so the stacks) as P2's do (conftest.py).
pytestmark = pytest.mark.usefixtures("rows_everywhere")


def _layers(kind, dtype, I, H, Ls, rng):
    out = []
    for l in range(Ls):
        n = (I if l == 0 else H) + H
        if kind == "gru":
            out.append(((rng.normal(size=(n, 2 * H)) * 0.3).astype(dtype), (rng.normal(size=2 * H) * 0.3).astype(dtype),
                        (rng.normal(size=(n, H)) * 0.3).astype(dtype), (rng.normal(size=H) * 0.3).astype(dtype)))
        else:
            out.append(((rng.normal(size=(n, 4 * H)) * 0.3).astype(dtype), (rng.normal(size=4 * H) * 0.3).astype(dtype),
                        0.5 + l))  # kernel, bias, forget_bias
    return out


def _stack_call(kind, x, s0, layers, lengths, reverse, bm):
    """The stacked kernel with the weights laid out as the backend lays them out; returns
    ``(y, final states [Ls, B, H] per state component)``."""
    from fastseq_kernels import gru, lstm
    from fastseq_kernels._packed import pack_panels as pk

    I = x.shape[2]
    H = s0[0].shape[2]
    ins = [I] + [H] * (len(layers) - 1)
    if kind == "gru":
        H2 = 2 * H
        y, hT = gru.gru_stack_forward(
            x, s0[0], np.stack([L[1] for L in layers]), np.stack([L[3] for L in layers]),
            np.stack([pk(L[0], i * H2, H2, H, H2) for L, i in zip(layers, ins)]),
            np.stack([pk(L[2], i * H, H, H, H) for L, i in zip(layers, ins)]),
            (pk(layers[0][0], 0, H2, I, H2), np.stack([pk(L[0], 0, H2, H, H2) for L in layers[1:]])),
            (pk(layers[0][2], 0, H, I, H), np.stack([pk(L[2], 0, H, H, H) for L in layers[1:]])),
            lengths, reverse, bm)
        return y, (hT,)
    H4 = 4 * H
    y, cT, hT = lstm.lstm_stack_forward(
        x, s0[0], s0[1], np.stack([L[1] for L in layers]), np.array([L[2] for L in layers]),
        np.stack([pk(L[0], i * H4, H4, H, H4) for L, i in zip(layers, ins)]),
        (pk(layers[0][0], 0, H4, I, H4), np.stack([pk(L[0], 0, H4, H, H4) for L in layers[1:]])),
        lengths, reverse, bm)
    return y, (cT, hT)


def _layer_by_layer(kind, x, s0, layers, lengths, reverse, bm):
    from fastseq_kernels import gru, lstm

    e1 = np.zeros(0, x.dtype)
    finals = []
    for l, L in enumerate(layers):
        if kind == "gru":
            gk, gb, ck, cb = L
            x, hT, _ = gru.gru_forward_split(x, gk, gb, ck, cb, s0[0][l], lengths, reverse, False, e1, e1, bm)
            finals.append((hT,))
        else:
            k, b, fb = L
            x, cT, hT, _ = lstm.lstm_forward_split(x, k, b, s0[0][l], s0[1][l], lengths, reverse, fb, False, 2, e1, bm)
            finals.append((cT, hT))
    return x, tuple(np.stack([f[i] for f in finals]) for i in range(len(finals[0])))


def _case(kind, dtype, T, B, I, Ls, lengths, bm, seed=0):
    rng = np.random.default_rng(seed)
    H = UNITS[kind]
    x = rng.normal(size=(B, T, I) if bm else (T, B, I)).astype(dtype)
    s0 = tuple(rng.normal(size=(Ls, B, H)).astype(dtype) for _ in range(1 if kind == "gru" else 2))
    return x, s0, _layers(kind, dtype, I, H, Ls, rng), np.asarray(lengths, np.int64)


def _check(got, want, tol, what):
    assert got[0].shape == want[0].shape
    assert_close(got[0], want[0], tol, f"{what}: outputs")
    for a, b in zip(got[1], want[1]):
        assert_close(a, b, tol, f"{what}: final states")


LENGTHS = {
    "full": lambda T, B: [T] * B,
    "mixed": lambda T, B: [T, 0, 3, T, 1, T - 1, 2, 5, 0][:B],  # 0 and T among them
    "all_zero": lambda T, B: [0] * B,
}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("pattern", sorted(LENGTHS))
@pytest.mark.parametrize("reverse", [False, True], ids=["fw", "rev"])
@pytest.mark.parametrize("bm", [False, True], ids=["time", "batch"])
@pytest.mark.parametrize("B", [8, 9])  # 9: the parts' rows are not one stride through all steps
def test_stack_matches_layer_by_layer(kind, dtype, pattern, reverse, bm, B):
    T, I, Ls = 7, 5, 3
    x, s0, layers, lengths = _case(kind, dtype, T, B, I, Ls, LENGTHS[pattern](T, B), bm)
    got = _stack_call(kind, x, s0, layers, lengths, reverse, bm)
    _check(got, _layer_by_layer(kind, x, s0, layers, lengths, reverse, bm), TOL[dtype], pattern)
    if pattern == "all_zero":  # nothing runs: zero outputs, the initial states come back
        assert not got[0].any()
        for a, b in zip(got[1], s0):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("kind", KINDS)
def test_two_layers_and_many_layers(kind):
    for Ls in (2, 5):
        x, s0, layers, lengths = _case(kind, np.float32, 6, 8, 3, Ls, [6, 2, 6, 0, 5, 6, 1, 3], False, seed=Ls)
        _check(_stack_call(kind, x, s0, layers, lengths, False, False),
               _layer_by_layer(kind, x, s0, layers, lengths, False, False), 1e-5, f"{Ls} layers")


@pytest.mark.parametrize("kind", KINDS)
def test_stack_with_the_helper_busy_runs_alone(kind):
    from fastseq_kernels import _team

    x, s0, layers, lengths = _case(kind, np.float64, 6, 8, 3, 3, [6, 1, 0, 4, 6, 6, 2, 5], True)
    want = _layer_by_layer(kind, x, s0, layers, lengths, False, True)
    assert _team._HELPER.busy.acquire(timeout=10)
    try:
        got = _stack_call(kind, x, s0, layers, lengths, False, True)
    finally:
        _team._HELPER.busy.release()
    _check(got, want, 1e-10, "helper busy")


@pytest.mark.parametrize("kind", KINDS)
def test_stack_from_several_threads_at_once(kind):
    cases = [_case(kind, np.float32, 9, 10, 4, 3, [9, 3, 0, 9, 7, 1, 9, 2, 5, 8], bool(s % 2), seed=s)
             for s in range(4)]
    wants = [_layer_by_layer(kind, x, s0, ls, L, False, bool(i % 2)) for i, (x, s0, ls, L) in enumerate(cases)]
    results = [None] * len(cases)

    def work(i):
        for _ in range(5):
            x, s0, ls, L = cases[i]
            results[i] = _stack_call(kind, x, s0, ls, L, False, bool(i % 2))

    run_in_threads(work, len(cases))
    for got, want in zip(results, wants):
        _check(got, want, 1e-5, "threads")


def test_stacks_apply_only_where_they_can(monkeypatch):
    from fastseq_kernels import gru, lstm

    monkeypatch.undo()  # the modules' own thresholds
    for bm in (False, True):
        assert gru.stack_applies(32, 200, 3, 28, 2, 4, bm)  # P2
        assert not gru.stack_applies(32, 200, 1, 28, 2, 4, bm)  # one layer: layer_forward
        assert not gru.stack_applies(32, 200, 3, 28, 1, 4, bm)  # one thread allowed
        assert not gru.stack_applies(32, 200, 3, 28, 2, 8, bm)  # float64: the column split per layer
        assert not gru.stack_applies(32, 200, 3, 3, 2, 4, bm)  # too few steps
        assert not gru.stack_applies(4, 200, 3, 28, 2, 4, bm)  # too few rows to halve
        assert lstm.stack_applies(64, 128, 2, 50, 2, 4, bm)
        assert not lstm.stack_applies(64, 200, 2, 50, 2, 4, bm)  # units not whole panels
        assert not lstm.stack_applies(64, 512, 1, 50, 2, 4, bm)
        assert not lstm.stack_applies(64, 512, 2, 50, 1, 4, bm)
        assert not lstm.stack_applies(4, 512, 2, 50, 2, 4, bm)  # too few rows: the unit split
    assert lstm.stack_applies(64, 512, 2, 50, 2, 4, True)  # P3's layer, twice, batch-major
    assert not lstm.stack_applies(64, 512, 2, 50, 2, 4, False)  # time-major: large layers one by one


# ---------------------------------------------------------------------------- the backend
CELLS = {"gru": nn.rnn_cell.GRUCell, "lstm": nn.rnn_cell.LSTMCell}


def _stack_cell(H, Ls, kind="gru", **kw):
    return nn.rnn_cell.MultiRNNCell([CELLS[kind](H, **kw) for _ in range(Ls)])


def _count(monkeypatch):
    from fastseq_kernels import gru, lstm

    calls = []
    for mod, name in ((gru, "gru_stack_forward"), (lstm, "lstm_stack_forward")):
        real = getattr(mod, name)
        monkeypatch.setattr(mod, name, lambda *a, _real=real: calls.append(1) or _real(*a))
    return calls


def _random_state(kind, B, H, dtype, rng):
    if kind == "gru":
        return rng.normal(size=(B, H)).astype(dtype)
    return nn.rnn_cell.LSTMStateTuple(rng.normal(size=(B, H)).astype(dtype), rng.normal(size=(B, H)).astype(dtype))


def _close_states(got, want, tol, what):
    for a, b in zip(got, want):
        if isinstance(a, tuple):
            _close_states(a, b, tol, what)
        else:
            assert_close(a, b, tol, what)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("time_major", [False, True], ids=["batch", "time"])
@pytest.mark.parametrize("with_lengths", [False, True], ids=["padded", "lengths"])
def test_backend_takes_the_stack_and_agrees_with_the_reference(kind, dtype, time_major, with_lengths, monkeypatch):
    calls = _count(monkeypatch)
    T, B, I, H = 6, 10, 7, UNITS[kind]
    rng = np.random.default_rng(3)
    x = rng.normal(size=(T, B, I) if time_major else (B, T, I)).astype(dtype)
    lengths = rng.integers(0, T + 1, B) if with_lengths else None
    if with_lengths:
        lengths[:2] = (0, T)
    fastseq.set_seed(0)
    cell = _stack_cell(H, 3, kind)
    s0 = tuple(_random_state(kind, B, H, dtype, rng) for _ in range(3))
    out = {}
    for backend in ("numpy", "numba"):
        with fastseq.use_backend(backend), fastseq.threads.limit(2):
            out[backend] = nn.dynamic_rnn(cell, x, sequence_length=lengths, initial_state=s0, dtype=dtype,
                                          time_major=time_major)
    assert calls, "the numba backend did not run the stack in one job"
    (y0, f0), (y1, f1) = out["numpy"], out["numba"]
    assert isinstance(f1, tuple) and len(f1) == 3 and type(f1[0]) is type(f0[0])
    assert_close(y1, y0, TOL[dtype], "outputs")
    _close_states(f1, f0, TOL[dtype], "final states")


@pytest.mark.parametrize("kind", KINDS)
def test_bidirectional_stacks_take_it_in_both_directions(kind, monkeypatch):
    calls = _count(monkeypatch)
    T, B, I, H = 8, 12, 5, UNITS[kind]
    rng = np.random.default_rng(4)
    x = rng.normal(size=(B, T, I)).astype(np.float32)
    lengths = rng.integers(0, T + 1, B)
    lengths[:2] = (0, T)
    fastseq.set_seed(1)
    fw, bw = _stack_cell(H, 2, kind), _stack_cell(H, 3, kind)
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
    _close_states(fs1, fs0, 1e-5, "final states")


def test_training_and_other_stacks_go_layer_by_layer(monkeypatch):
    calls = _count(monkeypatch)
    rng = np.random.default_rng(5)
    x = rng.normal(size=(10, 6, 4)).astype(np.float32)
    cot = rng.normal(size=(10, 6, 64)).astype(np.float32)
    fastseq.set_seed(2)
    with fastseq.use_backend("numba"), fastseq.threads.limit(2):
        for kind in KINDS:
            cell = _stack_cell(64, 2, kind)
            (y, _), pullback = fastseq.vjp(nn.dynamic_rnn, cell, x, dtype=np.float32)
            pullback(cot, None)
            assert not calls, "training must keep each layer's workspace: layer by layer"
        nn.dynamic_rnn(cell, x, dtype=np.float32)
        assert len(calls) == 1
        with fastseq.threads.limit(1):  # one thread: nothing to split
            nn.dynamic_rnn(cell, x, dtype=np.float32)
        mixed = nn.rnn_cell.MultiRNNCell([nn.rnn_cell.GRUCell(32), nn.rnn_cell.GRUCell(48)])
        nn.dynamic_rnn(mixed, x, dtype=np.float32)  # layers of other sizes
        kinds = nn.rnn_cell.MultiRNNCell([nn.rnn_cell.GRUCell(64), nn.rnn_cell.LSTMCell(64)])
        nn.dynamic_rnn(kinds, x, dtype=np.float32)  # layers of other kinds
        nn.dynamic_rnn(_stack_cell(64, 2, "lstm", use_peepholes=True), x, dtype=np.float32)
        nn.dynamic_rnn(_stack_cell(64, 2, "lstm", num_proj=32), x, dtype=np.float32)
        nn.dynamic_rnn(nn.rnn_cell.MultiRNNCell([nn.rnn_cell.GRUCell(32, activation="relu"),
                                                 nn.rnn_cell.GRUCell(32)]), x, dtype=np.float32)
    assert len(calls) == 1


@pytest.mark.parametrize("kind", KINDS)
def test_kept_stack_weights_follow_the_cells_weights(kind, monkeypatch):
    calls = _count(monkeypatch)
    rng = np.random.default_rng(6)
    x = rng.normal(size=(8, 10, 6)).astype(np.float32)
    fastseq.set_seed(3)
    cell = _stack_cell(UNITS[kind], 3, kind)
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
        monkeypatch.setattr(rnn_mod, "_direct_inference", lambda *a: None)
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


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/statm"), reason="needs /proc (Linux)")
def test_no_memory_growth_over_many_stack_calls(monkeypatch):
    """10,000 stack calls (both kinds, with and without sequence_length) hold no memory."""
    import os

    calls = _count(monkeypatch)

    def rss():
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    rng = np.random.default_rng(9)
    x = rng.normal(size=(8, 5, 3)).astype(np.float32)
    lengths = np.array([5, 0, 3, 5, 1, 2, 4, 5])
    cells = [_stack_cell(UNITS[kind], 2, kind) for kind in KINDS]
    with fastseq.use_backend("numba"), fastseq.threads.limit(2):
        for i in range(200):
            for c in cells:
                nn.dynamic_rnn(c, x, sequence_length=lengths if i % 2 else None, dtype=np.float32)
        before = rss()
        for i in range(5_000):
            for c in cells:
                nn.dynamic_rnn(c, x, sequence_length=lengths if i % 2 else None, dtype=np.float32)
        grown = rss() - before
    assert len(calls) == 2 * 5_200
    assert grown < 8 * 2**20, f"RSS grew by {grown / 2**20:.1f} MiB over 10,000 stack calls"


@pytest.mark.parametrize("bad, exc, match", [
    (np.zeros(0, np.int64), ValueError, "sequence_length must have shape"),
    (np.array([3.5] * 8), TypeError, "sequence_length must be integers"),
    (np.array([9] * 8), ValueError, r"sequence_length must lie in \[0, 6\]"),
])
def test_backend_stack_forward_checks_its_lengths(bad, exc, match):
    """``stack_forward`` called directly (a backend user, not the drivers) gets the layer
    checks' errors for bad lengths, never a NumPy error from the early refusal."""
    from fastseq import backend as registry

    rng = np.random.default_rng(10)
    x = rng.normal(size=(8, 6, 3)).astype(np.float32)
    cell = _stack_cell(32, 2)
    with fastseq.use_backend("numba"), fastseq.threads.limit(2):
        nn.dynamic_rnn(cell, x, dtype=np.float32)  # builds the weights
        b = registry.current()
        specs = [c.spec for c in cell._cells]
        params = [c._params(b, np.float32) for c in cell._cells]
        states = tuple((np.zeros((8, 32), np.float32),) for _ in range(2))
        with pytest.raises(exc, match=match):
            b.stack_forward(specs, params, x, states, bad, False, False, batch_major=True)
