"""Batch-major layers on the numba backend (``layer_forward(..., batch_major=True)``): the
kernels read ``[B, T, I]`` inputs and ``[B, T, P]`` cotangents and write outputs and
input gradients in that layout. Every cell configuration, with and without
sequence_length (lengths 0 and T), both directions, with state masks, float32 and
float64, against the NumPy reference run time-major on the transposed arrays; the
two-thread and fused loops against the same backend's time-major run; and the drivers
take this path for ``time_major=False``."""

import numpy as np
import pytest

import fastseq
from fastseq import backend as registry
from fastseq import nn

from _kernel_helpers import RTOL, SPECS, assert_close, lengths_for, make_masks, make_params, make_state
from fastseq.contract import CellSpec


def _bt(a):
    return np.ascontiguousarray(np.swapaxes(a, 0, 1))


def _run(be, spec, params, x, s0, lengths, reverse, masks, bm, rng_dy, ds):
    kw = {"batch_major": True} if bm else {}
    y, s, ws = be.layer_forward(spec, params, x, s0, lengths, reverse, masks, True, **kw)
    dy = rng_dy if not bm else _bt(rng_dy)
    dx, d0, dp = be.layer_backward(spec, params, ws, dy, ds)
    if bm:
        y, dx = _bt(y), _bt(dx)
    return y, s, dx, d0, dp


def _compare(got, want, rtol):
    y, s, dx, d0, dp = got
    yr, sr, dxr, d0r, dpr = want
    assert_close(y, yr, rtol, "outputs")
    for i, (a, b) in enumerate(zip(s, sr)):
        assert_close(a, b, rtol, f"final state {i}")
    assert_close(dx, dxr, rtol, "d_inputs")
    for i, (a, b) in enumerate(zip(d0, d0r)):
        assert_close(a, b, rtol, f"d_initial_state {i}")
    assert set(dp) == set(dpr)
    for name in dpr:
        assert_close(dp[name], dpr[name], rtol, f"d_params[{name!r}]")


def _case(spec, T, B, I, dtype, seed, lengths_pattern, masks_kind, scale=0.6):
    rng = np.random.default_rng(seed)
    dtype = np.dtype(dtype)
    x = rng.standard_normal((T, B, I)).astype(dtype)
    params = make_params(spec, I, dtype, rng, scale)
    s0 = make_state(spec, B, dtype, rng)
    lengths = lengths_for(lengths_pattern, T, B, rng)
    masks = make_masks(spec, T, B, dtype, rng, masks_kind)
    dy = rng.standard_normal((T, B, spec.output_size)).astype(dtype)
    ds = tuple(rng.standard_normal((B, n)).astype(dtype) for n in spec.state_sizes)
    return x, params, s0, lengths, masks, dy, ds


@pytest.mark.parametrize("B", [5, 1])  # one row: both layouts are the same memory, no copies
@pytest.mark.parametrize("masks_kind", [None, "step"])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("lengths_pattern", [None, "mixed"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", sorted(SPECS))
def test_batch_major_layer_against_reference(name, dtype, lengths_pattern, reverse, masks_kind, B):
    spec = SPECS[name]
    T, I = 6, 3
    x, params, s0, lengths, masks, dy, ds = _case(spec, T, B, I, dtype, 7, lengths_pattern, masks_kind)
    fast, ref = registry.load("numba"), registry.load("numpy")
    got = _run(fast, spec, params, _bt(x), s0, lengths, reverse, masks, True, dy, ds)
    want = _run(ref, spec, params, x, s0, lengths, reverse, masks, False, dy, ds)
    _compare(got, want, RTOL[np.dtype(dtype)])


#: shapes that take the other loops: the fused LSTM input projection (>= 8 rows), the
#: two-thread LSTM loop (units a whole number of panels, a large step product), the
#: two-thread GRU loop split by rows (<= 512 KB of weights) and by columns
BIG = {
    "lstm fused": (CellSpec("lstm", 8), 5, 9, 4),
    "lstm two threads": (CellSpec("lstm", 128), 4, 64, 8),
    "gru rows": (CellSpec("gru", 128), 4, 32, 8),
    "gru columns": (CellSpec("gru", 256), 4, 32, 8),
}


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("lengths_pattern", [None, "mixed"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", sorted(BIG))
def test_batch_major_other_loops(case, dtype, lengths_pattern, reverse):
    spec, T, B, I = BIG[case]
    x, params, s0, lengths, masks, dy, ds = _case(spec, T, B, I, dtype, 11, lengths_pattern, None, 0.1)
    params = {k: v for k, v in params.items()}
    for v in params.values():
        v.flags.writeable = False  # as a cell stores them (the packed-weight cache applies)
    fast, ref = registry.load("numba"), registry.load("numpy")
    rtol = RTOL[np.dtype(dtype)]
    with fastseq.threads.limit(2):
        got = _run(fast, spec, params, _bt(x), s0, lengths, reverse, None, True, dy, ds)
        same = _run(fast, spec, params, x, s0, lengths, reverse, None, False, dy, ds)
    _compare(got, same, rtol)  # the same loops in the other layout
    _compare(got, _run(ref, spec, params, x, s0, lengths, reverse, None, False, dy, ds), rtol)


def test_batch_major_shape_errors_name_the_layout():
    spec = SPECS["lstm"]
    x, params, s0, lengths, masks, dy, ds = _case(spec, 4, 3, 2, np.float64, 1, None, None)
    be = registry.load("numba")
    with pytest.raises(ValueError, match=r"batch-major \[B, T, I\]"):
        be.layer_forward(spec, params, x[0], s0, None, False, None, True, batch_major=True)
    # x [B=3, T=4, I] batch-major: a [3, 4, P] time-major cotangent is refused by shape
    _, _, ws = be.layer_forward(spec, params, _bt(x), s0, None, False, None, True, batch_major=True)
    with pytest.raises(ValueError, match=r"d_outputs must have shape \(3, 4, 5\)"):
        be.layer_backward(spec, params, ws, dy, ds)
    # and a state of the time-major batch size is refused: B is the first axis here
    with pytest.raises(ValueError, match=r"initial_state\[0\] must have shape \(4, 5\)"):
        be.layer_forward(spec, params, x, s0, None, False, None, True, batch_major=True)


def _layout_calls(monkeypatch):
    """A list that records, for each call of the numba backend's ``layer_forward`` from
    now on, whether it was batch-major."""
    be = registry.load("numba")
    calls = []
    real = type(be).layer_forward

    def spy(self, *a, **k):
        calls.append(k.get("batch_major", False))
        return real(self, *a, **k)

    monkeypatch.setattr(type(be), "layer_forward", spy)
    return calls


@pytest.mark.parametrize("bidirectional", [False, True])
def test_drivers_use_batch_major_layers(monkeypatch, bidirectional):
    """``time_major=False`` on the numba backend: the plain cell runs batch-major (no
    transposed copies), ``time_major=True`` time-major; same numbers as the reference."""
    calls = _layout_calls(monkeypatch)
    rng = np.random.default_rng(3)
    x = rng.standard_normal((4, 7, 3))  # [B, T, I]
    lens = np.array([7, 0, 3, 5])
    cot = rng.standard_normal((4, 7, 10 if bidirectional else 5))
    out = {}
    for backend in ("numpy", "numba"):
        with fastseq.use_backend(backend):
            fastseq.set_seed(0)
            if bidirectional:
                cf, cb = nn.rnn_cell.GRUCell(5), nn.rnn_cell.GRUCell(5)
                (ys, _), pull = fastseq.vjp(nn.bidirectional_dynamic_rnn, cf, cb, x, sequence_length=lens,
                                            dtype=np.float64)
                y = np.concatenate(ys, axis=2)
                g = pull((cot[..., :5], cot[..., 5:]), None)
            else:
                cell = nn.rnn_cell.LSTMCell(5)
                (y, _), pull = fastseq.vjp(nn.dynamic_rnn, cell, x, sequence_length=lens, dtype=np.float64)
                g = pull(cot, None)
            out[backend] = (y, g.inputs)
    assert calls and all(calls), calls
    for a, b in zip(out["numba"], out["numpy"]):
        assert_close(a, b, 1e-10)
    calls.clear()
    with fastseq.use_backend("numba"):
        nn.dynamic_rnn(nn.rnn_cell.GRUCell(5), _bt(x), sequence_length=lens, dtype=np.float64, time_major=True)
    assert calls == [False]


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("with_lengths", [False, True], ids=["padded", "lengths"])
def test_training_stack_runs_batch_major_layers(monkeypatch, dtype, with_lengths):
    """Training a batch-major MultiRNNCell of plain layers on the numba backend runs each
    layer in the caller's layout (``fastseq.nn.rnn.BATCH_MAJOR_TRAINING_STACKS``: no
    transposed copies of the inputs, outputs and their cotangents): every layer call is
    batch-major, and the outputs, final states and the gradients of the inputs, the
    initial state and every weight are the reference's; with the switch off, the same
    numbers through the time-major layers."""
    import fastseq.nn.rnn as rnn_mod
    from fastseq.testing import flatten

    calls = _layout_calls(monkeypatch)
    rng = np.random.default_rng(11)
    B, T, I = 5, 6, 3
    x = rng.standard_normal((B, T, I)).astype(dtype)
    lens = np.array([6, 0, 3, 5, 6]) if with_lengths else None
    cot = rng.standard_normal((B, T, 4)).astype(dtype)
    d_final = tuple(rng.standard_normal((B, n)).astype(dtype) for n in (5, 7, 7, 4))
    s0 = [rng.standard_normal((B, n)).astype(dtype) for n in (5, 7, 7, 4)]
    h0 = (s0[0], nn.rnn_cell.LSTMStateTuple(s0[1], s0[2]), s0[3])
    out = {}
    for backend, stacks in (("numpy", True), ("numba", True), ("numba-tm", False)):
        monkeypatch.setattr(rnn_mod, "BATCH_MAJOR_TRAINING_STACKS", stacks)
        calls.clear()
        with fastseq.use_backend(backend.split("-")[0]):
            fastseq.set_seed(2)
            cell = nn.rnn_cell.MultiRNNCell([nn.rnn_cell.GRUCell(5), nn.rnn_cell.LSTMCell(7),
                                             nn.rnn_cell.GRUCell(4)])
            (y, s), pull = fastseq.vjp(nn.dynamic_rnn, cell, x, sequence_length=lens, initial_state=h0, dtype=dtype)
            g = pull(cot, (d_final[0], nn.rnn_cell.LSTMStateTuple(d_final[2], d_final[1]), d_final[3]))
        out[backend] = [y] + [np.asarray(a) for a in flatten(s)] + [g.inputs] + \
            [np.asarray(a) for a in flatten(g.initial_state)] + [g.weights[k] for k in sorted(g.weights)]
        if backend == "numba":
            assert calls == [True, True, True], calls
        elif backend == "numba-tm":
            assert calls == [False, False, False], calls
    tol = 1e-10 if dtype == np.float64 else 1e-5
    for name in ("numba", "numba-tm"):
        assert len(out[name]) == len(out["numpy"])
        for i, (a, b) in enumerate(zip(out[name], out["numpy"])):
            assert_close(a, b, tol, f"{name}: result {i}")
