"""Every backend against the numpy reference: outputs, final states and all gradients
(inputs, initial state, weights), float64 to 1e-10 and float32 to 1e-5 relative."""

import numpy as np
import pytest

import fastseq
from fastseq.testing import CELL_FACTORIES, assert_close, problem, run_driver

CELLS = list(CELL_FACTORIES)


def _compare(backend_name, driver, cell_name, dtype, lengths, time_major, seed=0):
    weights, x, seq = problem(cell_name, dtype, lengths=lengths, seed=seed, time_major=time_major)
    with fastseq.use_backend("numpy"):
        ref, ref_g = run_driver(driver, cell_name, weights, x, seq, dtype, time_major=time_major, seed=seed)
    got, got_g = run_driver(driver, cell_name, weights, x, seq, dtype, time_major=time_major, seed=seed)
    tag = f"{backend_name}/{driver}/{cell_name}/{np.dtype(dtype).name}/{lengths}/tm={time_major}"
    assert_close(got, ref, dtype, f"{tag} forward")
    assert_close(got_g.inputs, ref_g.inputs, dtype, f"{tag} d_inputs")
    assert_close(got_g.initial_state, ref_g.initial_state, dtype, f"{tag} d_initial_state")
    assert_close(got_g.weights, ref_g.weights, dtype, f"{tag} d_weights")
    if isinstance(got_g.weights, dict):
        assert list(got_g.weights) == list(ref_g.weights)


@pytest.mark.parametrize("lengths", ["none", "mixed", "full"])
@pytest.mark.parametrize("cell_name", CELLS)
def test_dynamic_rnn(fast_backend_name, cell_name, dtype, lengths):
    _compare(fast_backend_name, "dynamic", cell_name, dtype, lengths, time_major=False)


@pytest.mark.parametrize("cell_name", ["gru", "lstm_full", "multi", "dropout_residual"])
def test_dynamic_rnn_time_major(fast_backend_name, cell_name, dtype):
    _compare(fast_backend_name, "dynamic", cell_name, dtype, "mixed", time_major=True)


@pytest.mark.parametrize("lengths", ["none", "mixed"])
@pytest.mark.parametrize("cell_name", ["rnn", "gru", "lstm_full", "multi", "dropout_residual"])
def test_bidirectional(fast_backend_name, cell_name, dtype, lengths):
    _compare(fast_backend_name, "bidirectional", cell_name, dtype, lengths, time_major=False)


@pytest.mark.parametrize("time_major", [False, True])
def test_bidirectional_time_major(fast_backend_name, dtype, time_major):
    _compare(fast_backend_name, "bidirectional", "basic_lstm", dtype, "mixed", time_major=time_major)


@pytest.mark.parametrize("cell_name", ["gru", "lstm_full", "multi"])
def test_static_rnn(fast_backend_name, cell_name, dtype):
    _compare(fast_backend_name, "static", cell_name, dtype, "mixed", time_major=False)


@pytest.mark.parametrize("cell_name", CELLS)
def test_single_step(fast_backend_name, cell_name, dtype):
    """cell(inputs, state) on the backend equals the reference step."""
    weights, x, _ = problem(cell_name, dtype, seed=3)
    frame = x[:, 0]
    outs = []
    for name in ("numpy", fast_backend_name):
        with fastseq.use_backend(name):
            from fastseq.testing import clone_cell

            cell = clone_cell(cell_name, weights, seed=3)
            state = cell.zero_state(frame.shape[0], dtype)
            out, state = cell(frame, state)
            out2, state2 = cell(frame * 0.5, state)
            outs.append([np.asarray(o) for o in fastseq.testing.flatten((out, state, out2, state2))])
    assert_close(outs[1], outs[0], dtype, f"{fast_backend_name} step {cell_name}")
