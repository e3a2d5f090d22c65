"""The numba backend's routes (backends/fastseq_numba/__init__.py, ``_Route``): a layer
call whose weights are read-only arrays keeps the kernel choice and packed weights for
the next call with the same shapes, flags and thread count. These tests check that a
route gives the same numbers as the first call and the reference, forward and backward;
that new weights, writeable weights, other shapes or thread counts never reuse a route;
that bad arguments still get the full path's errors; and that routes go with their
weights. And the API's direct path for a plain cell's inference (fastseq/nn/rnn.py,
``_direct_inference``) against the general path."""

import gc

import numpy as np
import pytest

import fastseq
from fastseq import nn
from fastseq.contract import CellSpec
from fastseq.nn import rnn as rnn_mod

from _kernel_helpers import assert_close, make_params, make_state

SPECS = {
    "lstm_pair": (CellSpec("lstm", 128), 1, 20, 6),  # few rows, 256 KB of weights: the two-half loop
    "lstm": (CellSpec("lstm", 12), 4, 9, 5),
    "lstm_peep_proj": (CellSpec("lstm", 12, use_peepholes=True, num_proj=7, cell_clip=2.0), 3, 7, 5),
    "gru": (CellSpec("gru", 10), 5, 8, 4),
    "rnn": (CellSpec("rnn", 9), 2, 6, 3),
}


def _frozen(params):
    for a in params.values():
        a.flags.writeable = False
    return params


def _case(name, dtype, seed=0):
    spec, B, T, I = SPECS[name]
    rng = np.random.default_rng(seed)
    params = _frozen(make_params(spec, I, dtype, rng, scale=0.6 if spec.num_units < 64 else 0.1))
    x = rng.normal(size=(B, T, I)).astype(dtype)
    return spec, params, x, make_state(spec, B, dtype, rng)


@pytest.fixture
def counted(numba_backend, monkeypatch):
    """The backend with its kernel choices counted (``_choose`` runs on every call that
    does not reuse a route)."""
    calls = []
    real = numba_backend._choose

    def spy(*args, **kw):
        calls.append(args[1])
        return real(*args, **kw)

    monkeypatch.setattr(numba_backend, "_choose", spy)
    numba_backend._routes.clear()
    return numba_backend, calls


@pytest.mark.parametrize("name", sorted(SPECS))
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("bm", [True, False], ids=["batch_major", "time_major"])
def test_a_route_gives_the_first_calls_numbers(name, dtype, bm, counted, ref_backend):
    b, calls = counted
    spec, params, x, s0 = _case(name, dtype)
    if not bm:
        x = np.ascontiguousarray(x.transpose(1, 0, 2))
    tol = 1e-5 if dtype == np.float32 else 1e-10
    with fastseq.threads.limit(2):
        first = b.layer_forward(spec, params, x, s0, batch_major=bm)
        second = b.layer_forward(spec, dict(params), x.copy(), tuple(s.copy() for s in s0), batch_major=bm)
    assert len(calls) == 1  # the second call took the route
    np.testing.assert_array_equal(second[0], first[0])
    for a, c in zip(second[1], first[1]):
        np.testing.assert_array_equal(a, c)
    xr = x if not bm else np.ascontiguousarray(x.transpose(1, 0, 2))
    want = ref_backend.layer_forward(spec, params, xr, s0)
    assert_close(second[0] if not bm else second[0].transpose(1, 0, 2), want[0], tol, "outputs")
    for a, c in zip(second[1], want[1]):
        assert_close(a, c, tol, "final state")


@pytest.mark.parametrize("name", ["lstm", "lstm_peep_proj", "gru", "rnn"])
def test_a_route_with_gradients(name, counted, ref_backend):
    b, calls = counted
    spec, params, x, s0 = _case(name, np.float64, seed=1)
    rng = np.random.default_rng(2)
    y, final, ws = b.layer_forward(spec, params, x, s0, need_grad=True, batch_major=True)
    dy = rng.normal(size=y.shape)
    dfin = tuple(rng.normal(size=f.shape) for f in final)
    g1 = b.layer_backward(spec, params, ws, dy, dfin)
    y2, final2, ws2 = b.layer_forward(spec, params, x, s0, need_grad=True, batch_major=True)
    assert len(calls) == 1
    g2 = b.layer_backward(spec, params, ws2, dy, dfin)
    np.testing.assert_array_equal(y2, y)
    np.testing.assert_array_equal(g2[0], g1[0])
    for k in g1[2]:
        np.testing.assert_array_equal(g2[2][k], g1[2][k])
    xr = np.ascontiguousarray(x.transpose(1, 0, 2))
    _, _, wsr = ref_backend.layer_forward(spec, params, xr, s0, need_grad=True)
    gr = ref_backend.layer_backward(spec, params, wsr, dy.transpose(1, 0, 2), dfin)
    assert_close(g2[0].transpose(1, 0, 2), gr[0], 1e-10, "d_inputs")
    for k in gr[2]:
        assert_close(g2[2][k], gr[2][k], 1e-10, f"d_{k}")


def test_new_weights_never_take_an_old_route(counted, ref_backend):
    b, calls = counted
    spec, params, x, s0 = _case("lstm_pair", np.float32)
    with fastseq.threads.limit(2):
        first = b.layer_forward(spec, params, x, s0, batch_major=True)[0]
        new = _frozen({k: v * 1.5 for k, v in params.items()})
        got = b.layer_forward(spec, new, x, s0, batch_major=True)[0]
    assert len(calls) == 2
    want = ref_backend.layer_forward(spec, new, np.ascontiguousarray(x.transpose(1, 0, 2)), s0)[0]
    assert_close(got.transpose(1, 0, 2), want, 1e-5, "new weights")
    assert np.abs(got - first).max() > 1e-2


def test_writeable_weights_take_the_full_path(counted, ref_backend):
    b, calls = counted
    spec, params, x, s0 = _case("gru", np.float64)
    b.layer_forward(spec, params, x, s0, batch_major=True)
    k = params["candidate/kernel"]
    k.flags.writeable = True
    k *= -1.0  # written in place: no route may serve the old packed copy
    got = b.layer_forward(spec, params, x, s0, batch_major=True)[0]
    assert len(calls) == 2
    want = ref_backend.layer_forward(spec, params, np.ascontiguousarray(x.transpose(1, 0, 2)), s0)[0]
    assert_close(got.transpose(1, 0, 2), want, 1e-10, "weights written in place")


def test_other_shapes_flags_and_thread_counts_take_their_own_routes(counted):
    b, calls = counted
    spec, params, x, s0 = _case("lstm", np.float64)
    b.layer_forward(spec, params, x, s0, batch_major=True)
    b.layer_forward(spec, params, x, s0, batch_major=True, reverse=True)
    b.layer_forward(spec, params, x[:, :5].copy(), s0, batch_major=True)
    with fastseq.threads.limit(1):
        b.layer_forward(spec, params, x, s0, batch_major=True)
    assert len(calls) == 4
    b.layer_forward(spec, params, x, s0, batch_major=True, sequence_length=np.full(x.shape[0], x.shape[1]))
    assert len(calls) == 5  # lengths given: never a route
    with fastseq.threads.limit(1):
        b.layer_forward(spec, params, x, s0, batch_major=True)
    assert len(calls) == 5


def test_bad_arguments_on_a_route_get_the_full_paths_errors(counted):
    b, calls = counted
    spec, params, x, s0 = _case("lstm", np.float32)
    b.layer_forward(spec, params, x, s0, batch_major=True)
    with pytest.raises(ValueError, match=r"initial_state\[1\] must have shape"):
        b.layer_forward(spec, params, x, (s0[0], s0[1][:, :3]), batch_major=True)
    with pytest.raises(ValueError, match="initial_state must be a tuple of 2 arrays"):
        b.layer_forward(spec, params, x, s0[:1], batch_major=True)
    with pytest.raises(ValueError, match="params: missing 'bias'"):
        b.layer_forward(spec, {"kernel": params["kernel"]}, x, s0, batch_major=True)
    # converted by the full path, not refused: a float64 state, strided inputs
    want = b.layer_forward(spec, params, x, s0, batch_major=True)[0]
    got = b.layer_forward(spec, params, x, tuple(s.astype(np.float64) for s in s0), batch_major=True)[0]
    np.testing.assert_array_equal(got, want)
    wide = np.zeros(x.shape[:2] + (2 * x.shape[2],), x.dtype)
    wide[:, :, ::2] = x
    got = b.layer_forward(spec, params, wide[:, :, ::2], s0, batch_major=True)[0]
    np.testing.assert_array_equal(got, want)


def test_routes_go_with_their_weights(counted):
    b, calls = counted
    spec, params, x, s0 = _case("lstm_pair", np.float32)
    with fastseq.threads.limit(2):
        b.layer_forward(spec, params, x, s0, batch_major=True)
    assert len(b._routes) == 1
    del params
    gc.collect()
    assert len(b._routes) == 0


def test_routes_are_bounded(counted):
    b, calls = counted
    keep = []
    for T in range(2, b.MAX_ROUTES + 12):
        spec, params, x, s0 = _case("rnn", np.float64)
        b.layer_forward(spec, params, x[:, :1].repeat(T, axis=1), s0, batch_major=True)
        keep.append(params)
    assert 0 < len(b._routes) <= b.MAX_ROUTES


# ------------------------------------------------------------------ the API's direct path
CELLS = {
    "lstm": lambda: nn.rnn_cell.LSTMCell(128),
    "lstm_proj": lambda: nn.rnn_cell.LSTMCell(12, use_peepholes=True, num_proj=5),
    "lstm_concat": lambda: nn.rnn_cell.LSTMCell(8, state_is_tuple=False),
    "gru": lambda: nn.rnn_cell.GRUCell(10),
    "rnn": lambda: nn.rnn_cell.BasicRNNCell(9),
}


@pytest.mark.parametrize("name", sorted(CELLS))
@pytest.mark.parametrize("time_major", [False, True], ids=["batch_major", "time_major"])
@pytest.mark.parametrize("given", ["plain", "lengths", "state"])
def test_direct_inference_equals_the_general_path(name, time_major, given, numba_backend, monkeypatch):
    rng = np.random.default_rng(5)
    B, T, I = 3, 11, 4
    x = rng.normal(size=(T, B, I) if time_major else (B, T, I)).astype(np.float32)
    cell = CELLS[name]()
    kw = dict(dtype=np.float32, time_major=time_major)
    if given == "lengths":
        kw["sequence_length"] = np.array([11, 0, 6])
    with fastseq.use_backend("numba"):
        if given == "state":
            kw["initial_state"] = cell.zero_state(B, np.float32)
            kw.pop("dtype")
        direct = nn.dynamic_rnn(cell, x, **kw)
        monkeypatch.setattr(rnn_mod, "_direct_inference", lambda *a: None)
        general = nn.dynamic_rnn(cell, x, **kw)
    assert type(direct[1]) is type(general[1])
    np.testing.assert_array_equal(direct[0], general[0])
    for a, c in zip(np.atleast_1d(direct[1]) if not isinstance(direct[1], tuple) else direct[1],
                    np.atleast_1d(general[1]) if not isinstance(general[1], tuple) else general[1]):
        np.testing.assert_array_equal(a, c)


@pytest.mark.parametrize("bad, exc, match", [
    (dict(dtype=np.float64), ValueError, "does not match the inputs' dtype"),
    (dict(sequence_length=[3, 99]), ValueError, "sequence_length must be <= the number of time steps"),
    (dict(sequence_length=[3]), ValueError, "sequence_length must have shape"),
    (dict(initial_state=np.zeros((2, 4), np.float32)), ValueError, "initial_state: expected shape"),
    (dict(time_major=1), TypeError, "time_major must be a bool"),
])
def test_direct_inference_raises_the_general_paths_errors(bad, exc, match, numba_backend):
    cell = nn.rnn_cell.GRUCell(5)
    x = np.ones((2, 6, 3), np.float32)
    with fastseq.use_backend("numba"):
        with pytest.raises(exc, match=match):
            nn.dynamic_rnn(cell, x, **bad)
