"""The two-thread time loops skip their first step's recurrent products where those would
add nothing: every row of the initial state they multiply is zero and every weight they
read is finite (``fastseq_kernels._packed.acc_adds_nothing``; the zero state is what every
layer not given an initial state starts from). Held here to the one-thread kernels, which
always multiply: the same outputs and final states with a zero state, with a zero state
but one row not zero, with ``-0.0`` entries, with zero and full lengths; and with an inf
or a nan among the recurrent weights the skip must not happen (``0 * inf`` is nan in the
one-thread kernel and in TF1), so the nans land where the one-thread kernel's do. GRU and
LSTM, both ways of sharing a step (columns / units, rows), the stacks, float32 and
float64, time- and batch-major."""

import numpy as np
import pytest

from _kernel_helpers import assert_close, gru_kernel_args, lstm_one_thread

#: The spoilt weights' nans in the reference's matmul are the point of those cases.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")

TOL = {np.float32: 1e-5, np.float64: 1e-10}
DTYPES = pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])


@pytest.fixture(params=["columns", "rows"])
def scheme(request, monkeypatch):
    """Both ways the two-thread loops share a step, for both cells."""
    from fastseq_kernels import gru, lstm

    for mod in (gru, lstm):
        monkeypatch.setattr(mod, "ROWS_MIN_B", 1 if request.param == "rows" else 1 << 62)
        monkeypatch.setattr(mod, "ROWS_MAX_WEIGHT_BYTES", 1 << 62)
        monkeypatch.setattr(mod, "SPLIT_MIN_MACS", 0)
    return request.param


# --------------------------------------------------------------------------- the test itself
def _adds_nothing():
    from numba import njit

    from fastseq_kernels._packed import acc_adds_nothing

    @njit
    def call(m, n, k, a, aoff, lda, bp):
        return acc_adds_nothing(m, n, k, a, aoff, lda, bp)

    return call


@DTYPES
def test_acc_adds_nothing(dtype):
    from fastseq_kernels._packed import pack_panels, panel_width

    call = _adds_nothing()
    k, n = 24, 3 * panel_width(np.zeros(0, dtype)) - 5  # three panels, the last one partial
    bp = pack_panels(np.random.default_rng(0).normal(size=(k, n)).astype(dtype), 0, n, k, n)
    A = np.zeros((12, k), dtype)
    # rows 3, 5, 7, 9 (offset 3 rows, two rows apart)
    args = (4, n, k, A, 3 * k, 2 * k)
    assert call(*args, bp)
    A[4, 0] = A[11, 3] = 1.0  # rows outside the four
    assert call(*args, bp)
    A[9, k - 1] = -0.0
    assert call(*args, bp), "-0.0 is zero"
    A[9, k - 1] = np.finfo(dtype).smallest_subnormal
    assert not call(*args, bp), "a subnormal is not zero"
    assert call(3, n, k, A, 3 * k, 2 * k, bp), "row 9 is past three rows"
    A[9, k - 1] = 0
    assert call(0, n, k, A, 0, k, bp), "no rows"
    for bad in (np.inf, -np.inf, np.nan):
        for where in (0, bp.size // 2, 3 * k * panel_width(bp) - 1):
            b2 = bp.copy()
            b2[where] = bad
            assert not call(*args, b2), f"{bad} at {where} of the panels"
        b2 = bp.copy()
        b2[-1] = bad
        assert call(4, 1, k, A, 3 * k, 2 * k, b2), "past the panels the product reads"


# --------------------------------------------------------------------------- the loops
def _gru_pair(x, gk, gb, ck, cb, h0, L, reverse, need_grad):
    from fastseq_kernels import gru

    dt = x.dtype
    e1, e3 = np.zeros(0, dt), np.zeros((0, 1, 1), dt)
    want = gru.gru_forward(x, gk, gb, ck, cb, h0, L, reverse, e3, 0, need_grad, 1, e1, e1, False)
    got = gru.gru_forward_split(x, gk, gb, ck, cb, h0, L, reverse, need_grad, e1, e1)
    return got[:2], want[:2]


def _lstm_pair(x, k, b, c0, h0, L, reverse, need_grad):
    from fastseq_kernels import lstm

    want = lstm_one_thread(x, k, b, c0, h0, L, reverse, need_grad)
    got = lstm.lstm_forward_split(x, k, b, c0, h0, L, reverse, 1.0, need_grad, 2, np.zeros(0, x.dtype))
    return got[:3], want[:3]


def _same(got, want, dtype, what):
    """Equal to the tolerance where finite, nan exactly where the one-thread kernel's is."""
    for i, (g, w) in enumerate(zip(got, want)):
        np.testing.assert_array_equal(np.isnan(g), np.isnan(w), err_msg=f"{what}: nans of output {i}")
        ok = ~np.isnan(w)
        assert_close(np.where(ok, g, 0), np.where(ok, w, 0), TOL[dtype], f"{what}: output {i}")


#: Initial states: all zero (the skip), zero with -0.0 entries (the skip), one row not
#: zero (no skip in its part; the column split multiplies every row).
STATES = ["zero", "signed_zero", "one_row"]
#: Recurrent weights: finite, or one inf / nan among them (no skip).
WEIGHTS = ["finite", "inf", "nan"]


def _state(kind, B, H, dtype, seed):
    s = np.zeros((B, H), dtype)
    if kind == "signed_zero":
        s[::2, ::3] = -0.0
    elif kind == "one_row":
        s[B - 1] = np.random.default_rng(seed).normal(size=H)
    return s


def FIRST_STEP_CASES(test):
    """Both dtypes, every initial state and weight case, full and mixed lengths, with and
    without the training workspace."""
    for mark in (DTYPES, pytest.mark.parametrize("state", STATES), pytest.mark.parametrize("weights", WEIGHTS),
                 pytest.mark.parametrize("lengths", ["full", "mixed"]),
                 pytest.mark.parametrize("need_grad", [False, True], ids=["infer", "grad"])):
        test = mark(test)
    return test


def _spoil(kernel, I, weights, col):
    """One recurrent weight (row ``I + 1`` of the kernel, column ``col``) made inf or nan."""
    if weights != "finite":
        kernel[I + 1, col] = np.inf if weights == "inf" else np.nan


@FIRST_STEP_CASES
def test_gru_first_step(dtype, state, weights, lengths, need_grad, scheme):
    T, B, I, H = 6, 8, 5, 64
    x, gk, gb, ck, cb = gru_kernel_args(dtype, T, B, I, H, [T] * B)[:5]
    # a gate column, then a candidate column: each product's skip is refused on its own
    for which in ("gates", "candidate"):
        g2, c2 = gk.copy(), ck.copy()
        _spoil(g2 if which == "gates" else c2, I, weights, 2 * H - 1 if which == "gates" else 7)
        L = np.array([T] * B if lengths == "full" else [T, 0, 3, T, 1, T - 1, 2, 5], np.int64)
        for reverse in (False, True):
            got, want = _gru_pair(x, g2, gb, c2, cb, _state(state, B, H, dtype, 1), L, reverse, need_grad)
            _same(got, want, dtype, f"{scheme} {which} reverse={reverse}")
            if weights != "finite" and state != "one_row":
                assert np.isnan(got[0][0, L > 0]).any(axis=-1).all(), "a nan in every row at t=0, as 0 * inf gives"


@FIRST_STEP_CASES
def test_lstm_first_step(dtype, state, weights, lengths, need_grad, scheme):
    T, B, I, H = 6, 8, 5, 64
    rng = np.random.default_rng(3)
    x = rng.normal(size=(T, B, I)).astype(dtype)
    k = (rng.normal(size=(I + H, 4 * H)) * 0.2).astype(dtype)
    b = (rng.normal(size=4 * H) * 0.2).astype(dtype)
    c0 = rng.normal(size=(B, H)).astype(dtype)  # c0 is not multiplied: any values
    L = np.array([T] * B if lengths == "full" else [T, 0, 3, T, 1, T - 1, 2, 5], np.int64)
    for col in (0, 4 * H - 1):  # the first gate block's first column, the last block's last
        k2 = k.copy()
        _spoil(k2, I, weights, col)
        for reverse in (False, True):
            got, want = _lstm_pair(x, k2, b, c0, _state(state, B, H, dtype, 2), L, reverse, need_grad)
            _same(got, want, dtype, f"{scheme} col={col} reverse={reverse}")


@DTYPES
@pytest.mark.parametrize("kind", ["gru", "lstm"])
@pytest.mark.parametrize("weights", WEIGHTS)
@pytest.mark.parametrize("bm", [False, True], ids=["time", "batch"])
def test_stack_first_step(dtype, kind, weights, bm, rows_everywhere):
    """A stack of three layers from zero states through the API (the backend's
    ``stack_forward``), the middle layer's recurrent weights spoilt or not, against the
    NumPy reference: the same numbers, the nans in the same places."""
    import fastseq
    from fastseq import nn
    from fastseq.testing import flatten

    T, B, I, H = 6, 8, 5, 64
    rng = np.random.default_rng(4)
    x = rng.normal(size=(B, T, I) if bm else (T, B, I)).astype(dtype)
    L = np.array([T, 0, 3, T, 1, T - 1, 2, 5], np.int64)
    make = nn.rnn_cell.GRUCell if kind == "gru" else nn.rnn_cell.LSTMCell
    cell = nn.rnn_cell.MultiRNNCell([make(H) for _ in range(3)])
    with fastseq.use_backend("numpy"):
        fastseq.set_seed(5)
        nn.dynamic_rnn(cell, x, sequence_length=L, dtype=dtype, time_major=not bm)  # builds the weights
    if weights != "finite":
        ws = cell.get_weights()
        end = "/gates/kernel" if kind == "gru" else "/kernel"
        (name,) = [n for n in ws if "cell_1/" in n and n.endswith(end)]
        _spoil(ws[name], H, weights, 3)
        cell.set_weights(ws)
    out = {}
    for backend in ("numpy", "numba"):
        with fastseq.use_backend(backend):
            y, s = nn.dynamic_rnn(cell, x, sequence_length=L, dtype=dtype, time_major=not bm)
        out[backend] = [y] + [np.asarray(a) for a in flatten(s)]
    _same(out["numba"], out["numpy"], dtype, f"{kind} {weights}")
    if weights != "finite":
        assert np.isnan(out["numba"][0]).any()


# --------------------------------------------------------------------------- the backward
#: Gate gradients of the first step: finite, or an inf / nan among them (from ``dy`` at
#: the first step of one row), where ``0 * inf`` must still reach the kernel gradient.
GRAD_CASES = ["finite", "inf", "nan"]


@DTYPES
@pytest.mark.parametrize("state", STATES)
@pytest.mark.parametrize("grads", GRAD_CASES)
@pytest.mark.parametrize("lengths", ["full", "mixed"])
@pytest.mark.parametrize("bm", [False, True], ids=["time", "batch"])
def test_lstm_backward_first_step(dtype, state, grads, lengths, bm, monkeypatch):
    """The row-split LSTM backward leaves the rows of a zero ``h_0`` out of the recurrent
    kernel's gradient ``h^T dG`` (``lstm._tn_except_rows``) where the first step's gate
    gradients are finite: the same gradients as the one-thread backward, which always
    multiplies, and with an inf or nan among those gate gradients the nans where its are
    (every recurrent row of the kernel gradient, ``0 * inf``)."""
    from fastseq_kernels import lstm

    monkeypatch.setattr(lstm, "ROWS_MIN_B", 1)
    monkeypatch.setattr(lstm, "ROWS_MAX_WEIGHT_BYTES", 1 << 62)
    T, B, I, H = 6, 8, 5, 64
    rng = np.random.default_rng(8)
    x = rng.normal(size=(B, T, I) if bm else (T, B, I)).astype(dtype)
    k = (rng.normal(size=(I + H, 4 * H)) * 0.2).astype(dtype)
    b = (rng.normal(size=4 * H) * 0.2).astype(dtype)
    c0 = rng.normal(size=(B, H)).astype(dtype)
    h0 = _state(state, B, H, dtype, 9)
    L = np.array([T] * B if lengths == "full" else [T, 0, 3, T, 1, T - 1, 2, 5], np.int64)
    e1, e2, e3 = np.zeros(0, dtype), np.zeros((0, 0), dtype), np.zeros((0, 1, 1), dtype)
    for reverse in (False, True):
        y, cT, hT, ws = lstm_one_thread(x, k, b, c0, h0, L, reverse, True, bm=bm)
        got_ws = lstm.lstm_forward_split(x, k, b, c0, h0, L, reverse, 1.0, True, 2, e1, bm)[3]
        dy = rng.normal(size=y.shape).astype(dtype)
        if grads != "finite":  # row 3 (length T) at its first step
            t0 = T - 1 if reverse else 0
            dy[(3, t0, 5) if bm else (t0, 3, 5)] = np.inf if grads == "inf" else np.nan
        dcT, dhT = rng.normal(size=cT.shape).astype(dtype), rng.normal(size=hT.shape).astype(dtype)
        want = lstm.lstm_backward(ws, k, b, e1, e1, e1, e2, dy, dcT, dhT, T, reverse, e3, e3, 0, 1.0, -1.0, -1.0, 1,
                                  e1, bm)[:5]
        got = lstm.lstm_backward_split(got_ws, k, dy, dcT, dhT, T, reverse, 1, e1, bm)[:5]
        _same(got, want, dtype, f"{state} {grads} reverse={reverse}")
        if grads != "finite" and state != "one_row":
            assert np.isnan(got[3][I:]).any(axis=1).all(), "a nan in every recurrent row, as 0 * inf gives"
