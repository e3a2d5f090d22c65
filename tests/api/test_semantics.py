"""TF1 semantics of the drivers, checked on every backend against first principles."""

import numpy as np
import pytest

import fastseq
from fastseq.nn import bidirectional_dynamic_rnn, dynamic_rnn, raw_rnn, rnn_cell, static_bidirectional_rnn, static_rnn
from fastseq.testing import assert_close, clone_cell, problem


def _rng(seed=0):
    return np.random.default_rng(seed)


def test_past_length_outputs_zero_and_state_copied(backend_name, dtype):
    x = _rng().standard_normal((3, 7, 4)).astype(dtype)
    lengths = np.array([7, 0, 3])
    cell = rnn_cell.GRUCell(5)
    out, state = dynamic_rnn(cell, x, sequence_length=lengths, dtype=dtype)
    assert out.shape == (3, 7, 5) and out.dtype == dtype
    assert np.all(out[1] == 0) and np.all(out[2, 3:] == 0)
    assert np.any(out[2, :3] != 0)
    # GRU: output == state, so the final state is the output at len-1 (zeros state for len 0)
    np.testing.assert_array_equal(state[0], out[0, 6])
    np.testing.assert_array_equal(state[2], out[2, 2])
    np.testing.assert_array_equal(state[1], np.zeros(5, dtype))


def test_length_zero_returns_initial_state(backend_name, dtype):
    x = _rng().standard_normal((2, 4, 3)).astype(dtype)
    cell = rnn_cell.LSTMCell(4)
    init = rnn_cell.LSTMStateTuple(np.full((2, 4), 0.5, dtype), np.full((2, 4), -0.25, dtype))
    out, st = dynamic_rnn(cell, x, sequence_length=[0, 2], initial_state=init)
    np.testing.assert_array_equal(st.c[0], init.c[0])
    np.testing.assert_array_equal(st.h[0], init.h[0])
    assert isinstance(st, rnn_cell.LSTMStateTuple)


def test_padding_does_not_change_results(backend_name):
    """A row's results depend only on its first len steps (what sequence_length is for)."""
    rng = _rng(2)
    x = rng.standard_normal((2, 6, 3))
    lengths = np.array([4, 6])
    cell = rnn_cell.LSTMCell(5, use_peepholes=True)
    out1, st1 = dynamic_rnn(cell, x, sequence_length=lengths, dtype=np.float64)
    x2 = x.copy()
    x2[0, 4:] = 1e3  # garbage in the padding
    out2, st2 = dynamic_rnn(cell, x2, sequence_length=lengths, dtype=np.float64)
    np.testing.assert_array_equal(out1, out2)
    np.testing.assert_array_equal(st1.h, st2.h)
    # and equals running the row alone, unpadded
    out3, st3 = dynamic_rnn(cell, x[:1, :4], dtype=np.float64)
    np.testing.assert_allclose(out1[0, :4], out3[0], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(st1.c[0], st3.c[0], rtol=1e-12, atol=1e-12)


def test_time_major_equals_batch_major(backend_name, dtype):
    weights, x, seq = problem("multi", dtype, seed=4)
    a = dynamic_rnn(clone_cell("multi", weights), x, sequence_length=seq)
    b = dynamic_rnn(clone_cell("multi", weights), np.swapaxes(x, 0, 1).copy(), sequence_length=seq, time_major=True)
    assert_close(np.swapaxes(b[0], 0, 1), a[0], dtype, "outputs")
    assert_close(b[1], a[1], dtype, "state")


def test_bidirectional_backward_reads_reversed_within_length(backend_name):
    rng = _rng(5)
    x = rng.standard_normal((3, 6, 2))
    lengths = np.array([6, 4, 0])
    cell_bw = rnn_cell.GRUCell(3)
    (_, out_bw), (_, st_bw) = bidirectional_dynamic_rnn(rnn_cell.GRUCell(3), cell_bw, x, sequence_length=lengths, dtype=np.float64)
    for b, n in enumerate(lengths):
        if n == 0:
            assert np.all(out_bw[b] == 0)
            continue
        rev = x[b : b + 1, :n][:, ::-1]
        o, s = dynamic_rnn(cell_bw, np.ascontiguousarray(rev), dtype=np.float64)
        np.testing.assert_allclose(out_bw[b, :n], o[0, ::-1], rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(st_bw[b], s[0], rtol=1e-12, atol=1e-12)
        assert np.all(out_bw[b, n:] == 0)


def test_same_cell_for_both_directions_shares_weights(backend_name):
    x = _rng(6).standard_normal((2, 5, 3))
    cell = rnn_cell.LSTMCell(4)
    res, pb = fastseq.vjp(bidirectional_dynamic_rnn, cell, cell, x, sequence_length=[5, 2], dtype=np.float64)
    assert len(cell.get_weights()) == 2
    g = pb(res[0], None)
    gw_fw, gw_bw = g.weights
    assert gw_fw is gw_bw  # one set of weights: its gradient is the sum over directions
    # check the sum against separate cells with the same weights
    c1, c2 = rnn_cell.LSTMCell(4), rnn_cell.LSTMCell(4)
    c1.set_weights(cell.get_weights())
    c2.set_weights(cell.get_weights())
    res2, pb2 = fastseq.vjp(bidirectional_dynamic_rnn, c1, c2, x, sequence_length=[5, 2], dtype=np.float64)
    g2 = pb2(res2[0], None)
    for k in gw_fw:
        np.testing.assert_allclose(gw_fw[k], g2.weights[0][k] + g2.weights[1][k], rtol=1e-9, atol=1e-12)


def test_static_rnn_equals_dynamic_rnn(backend_name, dtype):
    weights, x, seq = problem("lstm_full", dtype, seed=8)
    frames = [x[:, t] for t in range(x.shape[1])]
    outs, st = static_rnn(clone_cell("lstm_full", weights), frames, sequence_length=seq, dtype=dtype)
    out_d, st_d = dynamic_rnn(clone_cell("lstm_full", weights), x, sequence_length=seq, dtype=dtype)
    assert isinstance(outs, list) and len(outs) == x.shape[1]
    assert_close(np.stack(outs, 1), out_d, dtype, "outputs")
    assert_close(st, st_d, dtype, "state")


def test_static_bidirectional_concatenates(backend_name, dtype):
    weights, x, seq = problem("gru", dtype, seed=9)
    frames = [x[:, t] for t in range(x.shape[1])]
    outs, s_fw, s_bw = static_bidirectional_rnn(clone_cell("gru", weights), clone_cell("gru", weights), frames, sequence_length=seq, dtype=dtype)
    (o_fw, o_bw), (d_fw, d_bw) = bidirectional_dynamic_rnn(clone_cell("gru", weights), clone_cell("gru", weights), x, sequence_length=seq, dtype=dtype)
    assert_close(np.stack(outs, 1), np.concatenate([o_fw, o_bw], -1), dtype, "outputs")
    assert_close((s_fw, s_bw), (d_fw, d_bw), dtype, "states")


def test_static_rnn_vjp_gives_list_of_input_grads(backend_name):
    weights, x, seq = problem("gru", np.float64, seed=10)
    frames = [x[:, t] for t in range(x.shape[1])]
    (outs, st), pb = fastseq.vjp(static_rnn, clone_cell("gru", weights), frames, sequence_length=seq, dtype=np.float64)
    g = pb([np.ones_like(o) for o in outs], None)
    _, pbd = fastseq.vjp(dynamic_rnn, clone_cell("gru", weights), x, sequence_length=seq, dtype=np.float64)
    gd = pbd(np.ones((x.shape[0], x.shape[1], 5)), None)
    assert isinstance(g.inputs, list)
    np.testing.assert_allclose(np.stack(g.inputs, 1), gd.inputs, rtol=1e-10, atol=1e-12)


def test_raw_rnn_matches_dynamic_rnn(backend_name, dtype):
    """The TF1 documentation's dynamic_rnn-via-raw_rnn example, ported."""
    rng = _rng(11)
    B, T, I = 3, 5, 2
    x_tm = rng.standard_normal((T, B, I)).astype(dtype)
    lengths = np.array([5, 2, 0])
    cell = rnn_cell.LSTMCell(4)

    def loop_fn(time, cell_output, cell_state, loop_state):
        emit_output = cell_output
        next_cell_state = cell.zero_state(B, dtype) if cell_output is None else cell_state
        elements_finished = time >= lengths
        next_input = np.zeros((B, I), dtype) if np.all(elements_finished) else x_tm[min(time, T - 1)]
        return elements_finished, next_input, next_cell_state, emit_output, None

    emit_ta, final_state, loop_state = raw_rnn(cell, loop_fn)
    outputs = emit_ta.stack()
    ref_out, ref_state = dynamic_rnn(cell, x_tm, sequence_length=lengths, time_major=True, dtype=dtype)
    assert loop_state is None
    assert_close(outputs, ref_out, dtype, "emit")
    assert_close(final_state, ref_state, dtype, "state")


def test_raw_rnn_custom_emit_structure_and_loop_state(backend_name):
    B = 2
    cell = rnn_cell.GRUCell(3)

    def loop_fn(time, out, state, loop_state):
        if out is None:
            return np.zeros(B, bool), np.ones((B, 2)), cell.zero_state(B, np.float64), (np.zeros(B), np.zeros((B, 3))), 0
        finished = np.array([time >= 2, time >= 4])
        return finished, np.ones((B, 2)) * time, state, (np.full(B, float(time)), out * 2), loop_state + 1

    emit, state, loop_state = raw_rnn(cell, loop_fn)
    steps, doubled = emit[0].stack(), emit[1].stack()
    assert steps.shape == (4, B) and doubled.shape == (4, B, 3)
    assert loop_state == 4
    np.testing.assert_array_equal(steps[:, 1], [1, 2, 3, 4])
    np.testing.assert_array_equal(steps[2:, 0], [0, 0])  # finished rows emit zeros
    assert np.all(doubled[2:, 0] == 0)


def test_raw_rnn_rejects_bad_loop_fn(backend_name):
    cell = rnn_cell.GRUCell(3)
    with pytest.raises(ValueError, match="5-tuple"):
        raw_rnn(cell, lambda t, o, s, l: (np.zeros(1, bool), np.ones((1, 2))))
    with pytest.raises(TypeError, match="loop_fn"):
        raw_rnn(cell, 3)


def test_dropout_masks_and_keep_prob_changes(backend_name):
    x = np.ones((64, 10, 8))
    cell = rnn_cell.DropoutWrapper(rnn_cell.GRUCell(8), output_keep_prob=0.5, seed=1)
    out, _ = dynamic_rnn(cell, x, dtype=np.float64)
    zero_frac = np.mean(out == 0)
    assert 0.4 < zero_frac < 0.6
    cell.output_keep_prob = 1.0  # what feeding the placeholder did
    out2, _ = dynamic_rnn(cell, x, dtype=np.float64)
    assert np.mean(out2 == 0) < 0.01
    with pytest.raises(ValueError, match="output_keep_prob"):
        cell.output_keep_prob = 1.5


def test_variational_dropout_mask_constant_over_time_and_batch(backend_name):
    x = np.ones((4, 6, 16))
    cell = rnn_cell.DropoutWrapper(rnn_cell.BasicRNNCell(16, activation="linear"), input_keep_prob=0.5, variational_recurrent=True, seed=3)
    cell.build(16, dtype=np.float64)
    w = cell.get_weights()
    w["basic_rnn_cell/kernel"][:] = np.vstack([np.eye(16), np.zeros((16, 16))])
    w["basic_rnn_cell/bias"][:] = 0
    cell.set_weights(w)
    out, _ = dynamic_rnn(cell, x, dtype=np.float64)
    dropped = out == 0  # linear identity cell: output = dropped input
    assert dropped.any() and not dropped.all()
    assert np.all(dropped == dropped[:1, :1])  # same mask at every step and row


def test_float16_and_nan_inputs(backend_name):
    x = np.full((1, 3, 2), np.nan)
    out, st = dynamic_rnn(rnn_cell.GRUCell(2), x, dtype=np.float64)
    assert np.isnan(out).all()


def test_empty_batch_and_zero_steps(backend_name):
    cell = rnn_cell.LSTMCell(3)
    out, st = dynamic_rnn(cell, np.zeros((0, 4, 2)), dtype=np.float64)
    assert out.shape == (0, 4, 3) and st.c.shape == (0, 3)
    out, st = dynamic_rnn(cell, np.zeros((2, 0, 2)), dtype=np.float64)
    assert out.shape == (2, 0, 3)
    np.testing.assert_array_equal(st.h, np.zeros((2, 3)))


def test_residual_wrapper_output(backend_name):
    x = _rng(12).standard_normal((2, 4, 3))
    inner = rnn_cell.GRUCell(3)
    cell = rnn_cell.ResidualWrapper(inner)
    out, _ = dynamic_rnn(cell, x, sequence_length=[4, 2], dtype=np.float64)
    plain, _ = dynamic_rnn(inner, x, sequence_length=[4, 2], dtype=np.float64)
    np.testing.assert_allclose(out[0], x[0] + plain[0], rtol=1e-12)
    np.testing.assert_allclose(out[1, :2], x[1, :2] + plain[1, :2], rtol=1e-12)
    assert np.all(out[1, 2:] == 0)  # TF1 zeroes the whole cell's output past the length


def test_single_step_call_matches_sequence(backend_name):
    x = _rng(13).standard_normal((2, 3, 4))
    cell = rnn_cell.MultiRNNCell([rnn_cell.LSTMCell(5), rnn_cell.GRUCell(3)])
    out_seq, st_seq = dynamic_rnn(cell, x, dtype=np.float64)
    state = cell.zero_state(2, np.float64)
    for t in range(3):
        o, state = cell(x[:, t], state)
        np.testing.assert_allclose(np.asarray(o), out_seq[:, t], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(np.asarray(state[1]), st_seq[1], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_stack_without_initial_state_starts_from_each_layers_zero_state(backend_name, dtype):
    """A MultiRNNCell run without initial_state starts every layer from its zero_state, as
    TF1's MultiRNNCell.zero_state asks each layer (and wrappers their cell): zeros for the
    library's cells (made directly for stacks of plain layers), a layer's own zero_state
    where a subclass overrides it, also under a wrapper; equal to passing that state."""

    class OnesGRU(rnn_cell.GRUCell):
        def zero_state(self, batch_size, dtype):
            return np.full((batch_size, self.num_units), 0.5, dtype)

    rng = np.random.default_rng(3)
    x = rng.normal(size=(4, 6, 5)).astype(dtype)
    for cls in (rnn_cell.GRUCell, OnesGRU, "wrapped"):
        fastseq.set_seed(1)
        first = rnn_cell.DropoutWrapper(OnesGRU(8)) if cls == "wrapped" else cls(8)
        cell = rnn_cell.MultiRNNCell([first, rnn_cell.GRUCell(8)])
        cls = OnesGRU if cls == "wrapped" else cls
        y, st = dynamic_rnn(cell, x, dtype=dtype)
        start = 0.5 if cls is OnesGRU else 0.0
        s0 = (np.full((4, 8), start, dtype), np.zeros((4, 8), dtype))
        y2, st2 = dynamic_rnn(cell, x, initial_state=s0, dtype=dtype)
        np.testing.assert_array_equal(y, y2)
        for a, b in zip(st, st2):
            np.testing.assert_array_equal(a, b)
        if cls is OnesGRU:  # the override matters: not the zero-state results
            y0, _ = dynamic_rnn(cell, x, initial_state=(np.zeros((4, 8), dtype),) * 2, dtype=dtype)
            assert not np.allclose(y, y0)
