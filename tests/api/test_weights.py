"""Weights: TF1 names, order, layouts, initialisers, set_weights checks."""

import numpy as np
import pytest

from fastseq.nn import dynamic_rnn, rnn_cell


def _names_shapes(cell):
    return [(k, v.shape) for k, v in cell.get_weights().items()]


def test_lstm_cell_full_names_and_order():
    cell = rnn_cell.LSTMCell(4, use_peepholes=True, num_proj=3).build(5)
    assert _names_shapes(cell) == [
        ("lstm_cell/kernel", (8, 16)),
        ("lstm_cell/bias", (16,)),
        ("lstm_cell/w_f_diag", (4,)),
        ("lstm_cell/w_i_diag", (4,)),
        ("lstm_cell/w_o_diag", (4,)),
        ("lstm_cell/projection/kernel", (4, 3)),
    ]


def test_gru_names_and_initial_biases():
    cell = rnn_cell.GRUCell(3).build(2)
    w = cell.get_weights()
    assert list(w) == ["gru_cell/gates/kernel", "gru_cell/gates/bias", "gru_cell/candidate/kernel", "gru_cell/candidate/bias"]
    assert w["gru_cell/gates/kernel"].shape == (5, 6) and w["gru_cell/candidate/kernel"].shape == (5, 3)
    np.testing.assert_array_equal(w["gru_cell/gates/bias"], np.ones(6))
    np.testing.assert_array_equal(w["gru_cell/candidate/bias"], np.zeros(3))
    limit = np.sqrt(6 / (5 + 6))
    assert np.abs(w["gru_cell/gates/kernel"]).max() <= limit


def test_basic_cells_names():
    assert [k for k, _ in _names_shapes(rnn_cell.BasicRNNCell(2).build(3))] == ["basic_rnn_cell/kernel", "basic_rnn_cell/bias"]
    assert _names_shapes(rnn_cell.BasicLSTMCell(2).build(3)) == [("basic_lstm_cell/kernel", (5, 8)), ("basic_lstm_cell/bias", (8,))]


def test_multi_and_wrappers_names():
    cell = rnn_cell.MultiRNNCell(
        [rnn_cell.DropoutWrapper(rnn_cell.GRUCell(4)), rnn_cell.ResidualWrapper(rnn_cell.LSTMCell(4))]
    ).build(3)
    assert list(cell.get_weights()) == [
        "multi_rnn_cell/cell_0/gru_cell/gates/kernel",
        "multi_rnn_cell/cell_0/gru_cell/gates/bias",
        "multi_rnn_cell/cell_0/gru_cell/candidate/kernel",
        "multi_rnn_cell/cell_0/gru_cell/candidate/bias",
        "multi_rnn_cell/cell_1/lstm_cell/kernel",
        "multi_rnn_cell/cell_1/lstm_cell/bias",
    ]
    assert cell.get_weights()["multi_rnn_cell/cell_1/lstm_cell/kernel"].shape == (8, 16)  # chained depth 4


def test_unbuilt_cell_get_weights_error():
    with pytest.raises(ValueError, match="has no weights yet"):
        rnn_cell.GRUCell(2).get_weights()


def test_build_dtype_and_lazy_build_dtype():
    assert rnn_cell.GRUCell(2).build(3).get_weights()["gru_cell/gates/kernel"].dtype == np.float32
    cell = rnn_cell.GRUCell(2)
    dynamic_rnn(cell, np.zeros((1, 2, 3)))
    assert cell.get_weights()["gru_cell/gates/kernel"].dtype == np.float64


def test_set_weights_round_trip_and_checkpoint_names():
    a = rnn_cell.LSTMCell(3, use_peepholes=True).build(2, dtype=np.float64)
    b = rnn_cell.LSTMCell(3, use_peepholes=True)
    ckpt = {f"rnn/{k}:0": v for k, v in a.get_weights().items()}  # TF1 checkpoint-style names
    b.set_weights(ckpt)
    for (ka, va), (kb, vb) in zip(a.get_weights().items(), b.get_weights().items()):
        assert ka == kb
        np.testing.assert_array_equal(va, vb)
    x = np.random.default_rng(0).standard_normal((2, 4, 2))
    np.testing.assert_array_equal(dynamic_rnn(a, x)[0], dynamic_rnn(b, x)[0])


def test_set_weights_scope_selects_direction():
    fw = rnn_cell.GRUCell(2).build(3, dtype=np.float64)
    bw = rnn_cell.GRUCell(2).build(3, dtype=np.float64)
    ckpt = {f"bidirectional_rnn/fw/{k}": v for k, v in fw.get_weights().items()}
    ckpt.update({f"bidirectional_rnn/bw/{k}": v + 1 for k, v in bw.get_weights().items()})
    target = rnn_cell.GRUCell(2)
    target.set_weights(ckpt, scope="bidirectional_rnn/bw")
    np.testing.assert_array_equal(target.get_weights()["gru_cell/gates/bias"], bw.get_weights()["gru_cell/gates/bias"] + 1)


def test_set_weights_errors():
    cell = rnn_cell.LSTMCell(3).build(2)
    w = cell.get_weights()
    with pytest.raises(ValueError, match=r"missing: \['lstm_cell/bias'\]"):
        cell.set_weights({"lstm_cell/kernel": w["lstm_cell/kernel"]})
    with pytest.raises(ValueError, match=r"unknown: \['lstm_cell/nope'\]"):
        cell.set_weights(dict(w, **{"lstm_cell/nope": np.zeros(1)}))
    with pytest.raises(ValueError, match=r"'lstm_cell/bias' must have shape \(12,\), got \(11,\)"):
        cell.set_weights(dict(w, **{"lstm_cell/bias": np.zeros(11)}))
    with pytest.raises(TypeError, match="mapping"):
        cell.set_weights([1, 2])


def test_trainable_variables_order():
    cell = rnn_cell.MultiRNNCell([rnn_cell.GRUCell(2), rnn_cell.GRUCell(2)]).build(3)
    tv = cell.trainable_variables
    assert len(tv) == 8
    np.testing.assert_array_equal(np.asarray(tv[4]), cell.get_weights()["multi_rnn_cell/cell_1/gru_cell/gates/kernel"])


def test_custom_initializers():
    cell = rnn_cell.GRUCell(2, kernel_initializer=lambda shape, dtype: np.full(shape, 0.5, dtype), bias_initializer=0.25).build(1)
    w = cell.get_weights()
    assert np.all(w["gru_cell/gates/kernel"] == 0.5) and np.all(w["gru_cell/gates/bias"] == 0.25)


def test_state_and_output_sizes():
    assert rnn_cell.LSTMCell(4, num_proj=2).state_size == rnn_cell.LSTMStateTuple(4, 2)
    assert rnn_cell.LSTMCell(4, num_proj=2, state_is_tuple=False).state_size == 6
    assert rnn_cell.LSTMCell(4, num_proj=2).output_size == 2
    multi = rnn_cell.MultiRNNCell([rnn_cell.GRUCell(3), rnn_cell.BasicLSTMCell(5)])
    assert multi.state_size == (3, rnn_cell.LSTMStateTuple(5, 5)) and multi.output_size == 5
    z = multi.zero_state(2, np.float32)
    assert z[0].shape == (2, 3) and z[1].c.dtype == np.float32
