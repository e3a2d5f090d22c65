"""The tutorials' TF1 code (shared/seeds 000, 002, 003), ported by changing only the imports.

``tf`` below is the import change: fastseq provides ``tf.nn`` / ``tf.contrib.rnn`` / ``tf.nn.rnn_cell``
and NumPy stands in for the few plain tensor ops the tutorials use (placeholders become NumPy
arrays, sessions go away, ``get_shape()`` becomes ``.shape``).  Each model runs on every
installed backend and its numbers are compared with the same model on the reference backend
('numpy'); sizes are smaller than the tutorials' to keep the suite fast.

Criterion: ``max|backend - reference| <= rtol * max(1, max|reference|)``, rtol 1e-10 (float64),
1e-5 (float32).
"""

from types import SimpleNamespace

import numpy as np

import fastseq
import fastseq.contrib.rnn

from ._helpers import RTOL, assert_close, to_numpy

# ---- the import change: what `import tensorflow as tf` used to provide
tf = SimpleNamespace(
    nn=fastseq.nn,
    contrib=SimpleNamespace(rnn=fastseq.contrib.rnn),
    float32=np.float32,
    float64=np.float64,
    transpose=np.transpose,
    gather=lambda params, indices: np.take(params, indices, axis=0),  # tf.gather: axis 0
)

REFERENCE = "numpy"


def _np(tree):
    """Nested results as NumPy (tf.Tensors on the tensorflow backend become arrays)."""
    if isinstance(tree, dict):
        return {k: _np(v) for k, v in tree.items()}
    if isinstance(tree, tuple):
        items = [_np(v) for v in tree]
        return type(tree)(*items) if hasattr(tree, "_fields") else tuple(items)
    if isinstance(tree, list):
        return [_np(v) for v in tree]
    return to_numpy(tree)


def _compare_trees(got, ref, rtol, what):
    if isinstance(ref, dict):
        assert sorted(got) == sorted(ref), what
        for k in ref:
            _compare_trees(got[k], ref[k], rtol, f"{what}[{k!r}]")
    elif isinstance(ref, (tuple, list)):
        assert isinstance(got, (tuple, list)) and len(got) == len(ref), what
        assert type(got).__name__ == type(ref).__name__, f"{what}: {type(got).__name__} != {type(ref).__name__}"
        for k, (g, r) in enumerate(zip(got, ref)):
            _compare_trees(g, r, rtol, f"{what}[{k}]")
    else:
        assert_close(got, ref, rtol, what)


def _on_reference(fn, *args, **kwargs):
    with fastseq.use_backend(REFERENCE):
        return fn(*args, **kwargs)


# ============================================================================ (a) 3-layer GRU


def gru_classifier(data, dropout, out_size, seed, num_units=16, num_layers=3):
    """Tutorial 000: multi-layer GRU with DropoutWrapper, last-frame selection, dense logits."""
    fastseq.set_seed(seed)

    cells = []
    for _ in range(num_layers):
        cell = tf.contrib.rnn.GRUCell(num_units)  # Or LSTMCell(num_units)
        cell = tf.contrib.rnn.DropoutWrapper(cell, output_keep_prob=1.0 - dropout)
        cells.append(cell)
    cell = tf.contrib.rnn.MultiRNNCell(cells)

    output, _ = tf.nn.dynamic_rnn(cell, data, dtype=tf.float32)
    output = tf.transpose(output, [1, 0, 2])
    last = tf.gather(output, int(output.shape[0]) - 1)

    # tf.contrib.layers.fully_connected(last, out_size, activation_fn=None), weights seeded here
    w_rng = np.random.default_rng(seed)
    weights = w_rng.uniform(-0.3, 0.3, size=(num_units, out_size)).astype(np.float32)
    logit = to_numpy(last) @ weights
    return {"output": to_numpy(output), "last": to_numpy(last), "logit": logit}, cell


def test_tutorial_gru_classifier(backend_name):
    rng = np.random.default_rng(0)
    batch, steps, features, classes = 4, 6, 28, 5
    # Batch size x time steps x features (the placeholder becomes an array)
    data = rng.standard_normal((batch, steps, features)).astype(np.float32)

    # evaluation mode: dropout 0, i.e. keep probability 1.0
    res, cell = gru_classifier(data, 0.0, classes, seed=3)
    assert res["output"].shape == (steps, batch, 16)
    assert res["last"].shape == (batch, 16)
    assert res["logit"].shape == (batch, classes)
    assert res["logit"].dtype == np.float32
    np.testing.assert_array_equal(res["last"], res["output"][steps - 1])
    assert list(cell.get_weights())[0] == "multi_rnn_cell/cell_0/gru_cell/gates/kernel"

    ref, ref_cell = _on_reference(gru_classifier, data, 0.0, classes, seed=3)
    for name, w in ref_cell.get_weights().items():  # same seed -> same initial weights
        np.testing.assert_array_equal(cell.get_weights()[name], w, err_msg=name)
    _compare_trees(res, ref, RTOL[np.dtype(np.float32)], f"[{backend_name}] GRU classifier, keep 1.0")


def test_tutorial_gru_classifier_with_dropout(backend_name):
    rng = np.random.default_rng(1)
    batch, steps, features, classes = 4, 6, 28, 5
    data = rng.standard_normal((batch, steps, features)).astype(np.float32)

    train, cell = gru_classifier(data, 0.5, classes, seed=7)
    ev, _ = gru_classifier(data, 0.0, classes, seed=7)
    assert train["logit"].shape == ev["logit"].shape == (batch, classes)
    # the top layer's output dropout zeroes about half of the outputs; without dropout none are zero
    zero_frac = float(np.mean(train["output"] == 0.0))
    assert 0.3 < zero_frac < 0.7, zero_frac
    assert not np.any(ev["output"] == 0.0)
    assert not np.allclose(train["logit"], ev["logit"])

    # masks are drawn on the host from fastseq's seeded generator: every backend sees the same
    ref, _ = _on_reference(gru_classifier, data, 0.5, classes, seed=7)
    _compare_trees(train, ref, RTOL[np.dtype(np.float32)], f"[{backend_name}] GRU classifier, keep 0.5")

    # feeding a new keep probability (TF1: the placeholder) = setting the attribute: keep 1.0
    # on the trained-mode cell gives the evaluation numbers
    for wrapper in cell.cells:
        wrapper.output_keep_prob = 1.0
    out_eval, _ = tf.nn.dynamic_rnn(cell, data, dtype=tf.float32)
    out_eval = tf.transpose(to_numpy(out_eval), [1, 0, 2])
    assert_close(out_eval, ev["output"], RTOL[np.dtype(np.float32)], f"[{backend_name}] keep prob reset to 1.0")


# ============================================================================ (b) LSTM, sequence_length


def lstm_with_lengths(X, X_lengths, seed):
    """Tutorial 003: LSTMCell(64) over padded data with sequence_length=[10, 6], float64."""
    fastseq.set_seed(seed)
    cell = tf.nn.rnn_cell.LSTMCell(num_units=64, state_is_tuple=True)
    outputs, last_states = tf.nn.dynamic_rnn(
        cell=cell, dtype=tf.float64, sequence_length=X_lengths, inputs=X)
    result = [{"outputs": outputs, "last_states": last_states}]  # was tf.contrib.learn.run_n(...)
    return _np(result), cell


def _lstm_data():
    rng = np.random.default_rng(2)
    # Create input data
    X = rng.standard_normal((2, 10, 8))
    # The second example is of length 6
    X[1, 6:] = 0
    X_lengths = [10, 6]
    return X, X_lengths


def test_tutorial_lstm_sequence_length(backend_name):
    X, X_lengths = _lstm_data()
    result, cell = lstm_with_lengths(X, X_lengths, seed=5)

    # the tutorial's asserts
    assert result[0]["outputs"].shape == (2, 10, 64)
    # Outputs for the second example past past length 6 should be 0
    assert (result[0]["outputs"][1, 7, :] == np.zeros(cell.output_size)).all()
    # ... and every step from 6 on
    assert (result[0]["outputs"][1, 6:, :] == 0).all()
    assert (result[0]["outputs"][0] != 0).any(axis=1).all()

    # the final state is the state after step len - 1
    c, h = result[0]["last_states"]
    assert type(result[0]["last_states"]).__name__ == "LSTMStateTuple"
    for i, n in enumerate(X_lengths):
        np.testing.assert_array_equal(h[i], result[0]["outputs"][i, n - 1])
    assert c.shape == h.shape == (2, 64)
    assert c.dtype == h.dtype == np.float64

    ref, _ = _on_reference(lstm_with_lengths, X, X_lengths, seed=5)
    _compare_trees(result, ref, RTOL[np.dtype(np.float64)], f"[{backend_name}] LSTM lengths [10, 6]")


# ============================================================================ (c) bidirectional LSTM


def bidirectional_lstm(X, X_lengths, seed):
    """Tutorial 003: bidirectional_dynamic_rnn with the same LSTMCell as cell_fw and cell_bw."""
    fastseq.set_seed(seed)
    cell = tf.nn.rnn_cell.LSTMCell(num_units=64, state_is_tuple=True)
    outputs, states = tf.nn.bidirectional_dynamic_rnn(
        cell_fw=cell, cell_bw=cell, dtype=tf.float64, sequence_length=X_lengths, inputs=X)
    output_fw, output_bw = outputs
    states_fw, states_bw = states
    return _np({"output_fw": output_fw, "output_bw": output_bw,
                "states_fw": states_fw, "states_bw": states_bw}), cell


def test_tutorial_bidirectional_lstm(backend_name):
    rng = np.random.default_rng(4)
    X = rng.standard_normal((2, 10, 8))
    X[1, 6, :] = 0
    X_lengths = [10, 6]
    res, cell = bidirectional_lstm(X, X_lengths, seed=9)
    rtol = RTOL[np.dtype(np.float64)]

    # one cell object for both directions: one set of weights
    assert list(cell.get_weights()) == ["lstm_cell/kernel", "lstm_cell/bias"]
    for k in ("output_fw", "output_bw"):
        assert res[k].shape == (2, 10, 64)
        assert (res[k][1, 6:] == 0).all(), f"{k} past length 6 must be zero"
    for i, n in enumerate(X_lengths):
        # forward final state: step n - 1; backward final state: original step 0
        np.testing.assert_array_equal(res["states_fw"].h[i], res["output_fw"][i, n - 1])
        np.testing.assert_array_equal(res["states_bw"].h[i], res["output_bw"][i, 0])

    # the backward direction is the forward RNN (same cell) over each sequence reversed within
    # its own length, given back in the original order
    X_rev = X.copy()
    for i, n in enumerate(X_lengths):
        X_rev[i, :n] = X[i, :n][::-1]
    out_rev, state_rev = tf.nn.dynamic_rnn(cell, X_rev, sequence_length=X_lengths, dtype=tf.float64)
    out_rev = to_numpy(out_rev)
    for i, n in enumerate(X_lengths):
        assert_close(res["output_bw"][i, :n], out_rev[i, :n][::-1], rtol, f"[{backend_name}] bw row {i}")
    assert_close(res["states_bw"].c, to_numpy(state_rev.c), rtol, f"[{backend_name}] bw final c")

    ref, _ = _on_reference(bidirectional_lstm, X, X_lengths, seed=9)
    _compare_trees(res, ref, rtol, f"[{backend_name}] bidirectional LSTM")
