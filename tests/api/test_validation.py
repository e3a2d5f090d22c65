"""Bad input gets a clear ValueError/TypeError naming the argument, before any kernel runs."""

import numpy as np
import pytest

import fastseq
from fastseq.nn import bidirectional_dynamic_rnn, dynamic_rnn, rnn_cell, static_rnn


@pytest.fixture
def x():
    return np.random.default_rng(0).standard_normal((2, 5, 3))


def test_not_a_cell(backend_name, x):
    with pytest.raises(TypeError, match="cell must be an RNNCell"):
        dynamic_rnn("lstm", x)
    with pytest.raises(TypeError, match="cell_bw"):
        bidirectional_dynamic_rnn(rnn_cell.GRUCell(2), object(), x, dtype=np.float64)


@pytest.mark.parametrize("shape", [(5, 3), (2, 5, 3, 1)])
def test_wrong_rank(backend_name, shape):
    with pytest.raises(ValueError, match=r"inputs must have rank 3"):
        dynamic_rnn(rnn_cell.GRUCell(2), np.zeros(shape))


def test_wrong_feature_size_for_built_cell(backend_name, x):
    cell = rnn_cell.GRUCell(2)
    dynamic_rnn(cell, x)
    with pytest.raises(ValueError, match=r"inputs: .*built for input depth 3, got inputs of depth 4"):
        dynamic_rnn(cell, np.zeros((2, 5, 4)))


def test_integer_and_object_inputs(backend_name):
    with pytest.raises(TypeError, match="inputs must be float32 or float64, got integer"):
        dynamic_rnn(rnn_cell.GRUCell(2), np.zeros((2, 5, 3), dtype=np.int32))
    with pytest.raises(TypeError, match="inputs"):
        dynamic_rnn(rnn_cell.GRUCell(2), np.array([[[1.0]], [[1.0], [2.0]]], dtype=object))


def test_none_inputs(backend_name):
    with pytest.raises(ValueError, match="inputs must be an array, got None"):
        dynamic_rnn(rnn_cell.GRUCell(2), None)


@pytest.mark.parametrize(
    "lengths,exc,msg",
    [
        ([5, 5, 5], ValueError, r"sequence_length must have shape \[2\]"),
        ([[5, 5]], ValueError, r"sequence_length must have shape \[2\]"),
        ([-1, 3], ValueError, r"sequence_length must be >= 0, got -1"),
        ([6, 3], ValueError, r"sequence_length must be <= the number of time steps \(5\), got 6"),
        ([2.5, 3], TypeError, r"sequence_length must hold integers"),
        (["a", "b"], TypeError, r"sequence_length must be an integer vector"),
    ],
)
def test_bad_sequence_length(backend_name, x, lengths, exc, msg):
    with pytest.raises(exc, match=msg):
        dynamic_rnn(rnn_cell.GRUCell(2), x, sequence_length=lengths)


def test_float_lengths_with_integer_values_are_accepted(backend_name, x):
    out, _ = dynamic_rnn(rnn_cell.GRUCell(2), x, sequence_length=np.array([2.0, 5.0]))
    assert np.all(out[0, 2:] == 0)


def test_mixed_dtypes(backend_name, x):
    with pytest.raises(ValueError, match="mixed dtypes"):
        dynamic_rnn(rnn_cell.GRUCell(2), x.astype(np.float32), dtype=np.float64)
    with pytest.raises(ValueError, match=r"initial_state has dtype float32 but the inputs are float64"):
        dynamic_rnn(rnn_cell.GRUCell(2), x, initial_state=np.zeros((2, 2), np.float32))


def test_bad_initial_state_structure_and_shape(backend_name, x):
    with pytest.raises(ValueError, match=r"initial_state: expected shape \[2, 4\], got \[2, 3\]"):
        dynamic_rnn(rnn_cell.GRUCell(4), x, initial_state=np.zeros((2, 3)))
    with pytest.raises(ValueError, match=r"initial_state: expected an LSTMStateTuple"):
        dynamic_rnn(rnn_cell.LSTMCell(4), x, initial_state=np.zeros((2, 8)))
    with pytest.raises(ValueError, match=r"initial_state.h: expected shape \[2, 2\]"):
        dynamic_rnn(rnn_cell.LSTMCell(4, num_proj=2), x, initial_state=(np.zeros((2, 4)), np.zeros((2, 4))))
    with pytest.raises(ValueError, match=r"expected a tuple of 2 layer states"):
        dynamic_rnn(rnn_cell.MultiRNNCell([rnn_cell.GRUCell(2), rnn_cell.GRUCell(2)]), x, initial_state=(np.zeros((2, 2)),))


@pytest.mark.parametrize("kw", ["input_keep_prob", "output_keep_prob", "state_keep_prob"])
@pytest.mark.parametrize("value", [0.0, -0.1, 1.01, "a"])
def test_keep_prob_out_of_range(kw, value):
    with pytest.raises(ValueError, match=kw):
        rnn_cell.DropoutWrapper(rnn_cell.GRUCell(2), **{kw: value})


@pytest.mark.parametrize(
    "factory,match",
    [
        (lambda: rnn_cell.GRUCell(0), "num_units must be a positive integer"),
        (lambda: rnn_cell.LSTMCell(3, num_proj=-1), "num_proj"),
        (lambda: rnn_cell.LSTMCell(3, cell_clip=0), "cell_clip"),
        (lambda: rnn_cell.BasicRNNCell(3, activation="swishy"), "activation must be one of"),
        (lambda: rnn_cell.BasicRNNCell(3, activation=lambda z: z), "cannot use the callable"),
        (lambda: rnn_cell.MultiRNNCell([]), "non-empty list"),
        (lambda: rnn_cell.MultiRNNCell([rnn_cell.GRUCell(2), 3]), r"cells\[1\] must be an RNNCell"),
    ],
)
def test_bad_cell_arguments(factory, match):
    with pytest.raises((ValueError, TypeError), match=match):
        factory()


def test_known_activation_callables_are_accepted():
    import math

    assert rnn_cell.BasicRNNCell(2, activation=np.tanh).activation == "tanh"
    assert rnn_cell.BasicRNNCell(2, activation="relu").activation == "relu"
    assert rnn_cell.BasicRNNCell(2, activation=math.tanh).activation == "tanh"


def test_static_rnn_bad_frames(backend_name):
    with pytest.raises(ValueError, match="non-empty list"):
        static_rnn(rnn_cell.GRUCell(2), [])
    with pytest.raises(ValueError, match=r"inputs\[1\] has shape"):
        static_rnn(rnn_cell.GRUCell(2), [np.zeros((2, 3)), np.zeros((2, 4))])


def test_residual_depth_mismatch(backend_name, x):
    with pytest.raises(ValueError, match="ResidualWrapper: inputs depth 3 must equal"):
        dynamic_rnn(rnn_cell.ResidualWrapper(rnn_cell.GRUCell(4)), x)


def test_bad_cotangent_shape(backend_name, x):
    (out, st), pb = fastseq.vjp(dynamic_rnn, rnn_cell.GRUCell(2), x)
    with pytest.raises(ValueError, match=r"d_outputs must have shape \[2, 5, 2\]"):
        pb(np.zeros((2, 5, 3)), None)


def test_vjp_unknown_function():
    with pytest.raises(TypeError, match="no gradient rule"):
        fastseq.vjp(np.sum, np.zeros(3))
