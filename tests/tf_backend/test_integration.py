"""The tensorflow backend as a TensorFlow citizen: tensors in -> tensors out, weights as
tf.Variables, tf.GradientTape through the drivers equal to fastseq.vjp and the numpy
reference, training with a plain TF update, tf.device scopes, tf.function, cheap import."""

import subprocess
import sys

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow", reason="tensorflow is not installed (pip install 'fastseq[tensorflow]')")

import fastseq  # noqa: E402
from fastseq.nn import bidirectional_dynamic_rnn, dynamic_rnn, rnn_cell, static_rnn  # noqa: E402
from fastseq.testing import assert_close  # noqa: E402


@pytest.fixture
def tf_backend():
    with fastseq.use_backend("tensorflow"):
        yield fastseq.backend.current()


def _weights(make_cell, depth, dtype, seed=0):
    with fastseq.use_backend("numpy"):
        fastseq.set_seed(seed)
        cell = make_cell()
        cell.build(depth, dtype=dtype)
        return cell.get_weights()


def _cell(make_cell, weights):
    cell = make_cell()
    cell.set_weights(weights)
    return cell


def test_import_is_light_and_availability():
    code = (
        "import sys, fastseq_tensorflow as m; b = m.TensorFlowBackend(); "
        "assert b.availability() is None; assert 'tensorflow' not in sys.modules, 'tensorflow imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_availability_reason_without_tensorflow(monkeypatch):
    import importlib.util

    from fastseq_tensorflow import TensorFlowBackend

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorflow" else real(name, *a))
    reason = TensorFlowBackend().availability()
    assert reason is not None and "tensorflow" in reason


def test_tensors_in_tensors_out(tf_backend):
    make = lambda: rnn_cell.LSTMCell(4, num_proj=3)  # noqa: E731
    w = _weights(make, 2, np.float32)
    cell = _cell(make, w)
    x = np.random.default_rng(0).normal(size=(3, 5, 2)).astype(np.float32)
    y_t, s_t = dynamic_rnn(cell, tf.constant(x), sequence_length=[5, 0, 3], dtype=tf.float32)
    y_n, s_n = dynamic_rnn(cell, x, sequence_length=[5, 0, 3], dtype=np.float32)
    assert isinstance(y_t, tf.Tensor) and isinstance(s_t.c, tf.Tensor) and isinstance(s_t.h, tf.Tensor)
    assert isinstance(y_n, np.ndarray) and isinstance(s_n.h, np.ndarray)
    assert_close([y_t.numpy(), s_t.c.numpy(), s_t.h.numpy()], [y_n, s_n.c, s_n.h], np.float32, "tensor vs numpy")
    assert all(isinstance(v, tf.Variable) for v in cell.trainable_variables)
    got = cell.get_weights()
    assert list(got) == list(w) and all(isinstance(a, np.ndarray) for a in got.values())
    assert_close(got, w, np.float32, "get_weights round trip")
    # one step and static_rnn on tensors
    out, st = cell(tf.constant(x[:, 0]), cell.zero_state(3, tf.float32))
    assert isinstance(out, tf.Tensor)
    outs, st2 = static_rnn(cell, [tf.constant(x[:, t]) for t in range(5)], dtype=tf.float32)
    assert isinstance(outs[0], tf.Tensor)
    assert_close(np.stack([o.numpy() for o in outs], 1), dynamic_rnn(cell, x, dtype=np.float32)[0], np.float32, "static")


def _tape_grads(cell, x, seq, cot_y, cot_c, cot_h):
    x = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y, st = dynamic_rnn(cell, x, sequence_length=seq, dtype=x.dtype)
        loss = tf.reduce_sum(y * cot_y) + tf.reduce_sum(st.c * cot_c) + tf.reduce_sum(st.h * cot_h)
    names = list(cell.get_weights())
    grads = tape.gradient(loss, [x] + list(cell.trainable_variables))
    return grads[0].numpy(), dict(zip(names, [g.numpy() for g in grads[1:]]))


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
def test_gradient_tape_equals_vjp_and_reference(dtype):
    make = lambda: rnn_cell.LSTMCell(4, use_peepholes=True, num_proj=3, cell_clip=1.0)  # noqa: E731
    w = _weights(make, 2, dtype, seed=1)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(3, 6, 2)).astype(dtype)
    seq = np.array([6, 0, 4])
    cot_y = rng.normal(size=(3, 6, 3)).astype(dtype)
    cot_c = rng.normal(size=(3, 4)).astype(dtype)
    cot_h = rng.normal(size=(3, 3)).astype(dtype)
    results = {}
    for name in ("numpy", "tensorflow"):
        with fastseq.use_backend(name):
            _, pullback = fastseq.vjp(dynamic_rnn, _cell(make, w), x, sequence_length=seq, dtype=dtype)
            g = pullback(cot_y, rnn_cell.LSTMStateTuple(cot_c, cot_h))
            results[name] = [np.asarray(fastseq.backend.current().to_numpy(g.inputs)),
                             {k: np.asarray(fastseq.backend.current().to_numpy(v)) for k, v in g.weights.items()}]
    with fastseq.use_backend("tensorflow"):
        results["tape"] = list(_tape_grads(_cell(make, w), x, seq, cot_y, cot_c, cot_h))
    assert_close(results["tensorflow"], results["numpy"], dtype, "vjp on tensorflow vs reference")
    assert_close(results["tape"], results["numpy"], dtype, "GradientTape vs reference")


def test_gradient_tape_bidirectional_multi(tf_backend):
    """GradientTape through bidirectional_dynamic_rnn of MultiRNNCells equals the reference vjp."""
    make = lambda: rnn_cell.MultiRNNCell([rnn_cell.GRUCell(3), rnn_cell.BasicRNNCell(2)])  # noqa: E731
    w_fw, w_bw = _weights(make, 2, np.float64, 2), _weights(make, 2, np.float64, 3)
    rng = np.random.default_rng(2)
    x = rng.normal(size=(2, 5, 2))
    seq = np.array([3, 5])
    cot = (rng.normal(size=(2, 5, 2)), rng.normal(size=(2, 5, 2)))
    with fastseq.use_backend("numpy"):
        _, pullback = fastseq.vjp(bidirectional_dynamic_rnn, _cell(make, w_fw), _cell(make, w_bw), x,
                                  sequence_length=seq, dtype=np.float64)
        g = pullback(cot, None)
    fw, bw = _cell(make, w_fw), _cell(make, w_bw)
    xt = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        (y_fw, y_bw), _ = bidirectional_dynamic_rnn(fw, bw, xt, sequence_length=seq, dtype=tf.float64)
        loss = tf.reduce_sum(y_fw * cot[0]) + tf.reduce_sum(y_bw * cot[1])
    got = tape.gradient(loss, [xt] + list(fw.trainable_variables) + list(bw.trainable_variables))
    n = len(w_fw)
    assert_close(got[0].numpy(), g.inputs, np.float64, "d_inputs")
    assert_close([a.numpy() for a in got[1:1 + n]], list(g.weights[0].values()), np.float64, "d_weights fw")
    assert_close([a.numpy() for a in got[1 + n:]], list(g.weights[1].values()), np.float64, "d_weights bw")


def test_training_with_tape_and_plain_update(tf_backend):
    """A GRU regressor (predict the running mean) trained with GradientTape + assign_sub."""
    fastseq.set_seed(0)
    cell = rnn_cell.GRUCell(8)
    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(size=(16, 7, 1)).astype(np.float32))
    target = tf.reduce_mean(x, axis=[1, 2])[:, None]
    dense = tf.Variable(rng.normal(0, 0.3, size=(8, 1)).astype(np.float32))

    def loss_fn():
        _, h = dynamic_rnn(cell, x, dtype=tf.float32)
        return tf.reduce_mean((tf.matmul(h, dense) - target) ** 2)

    cell.build(1, dtype=np.float32)
    variables = list(cell.trainable_variables) + [dense]
    first = float(loss_fn())
    for _ in range(60):
        with tf.GradientTape() as tape:
            loss = loss_fn()
        for v, g in zip(variables, tape.gradient(loss, variables)):
            v.assign_sub(0.3 * g)
    last = float(loss_fn())
    assert last < 0.3 * first, (first, last)
    assert_close(cell.get_weights()["gru_cell/gates/kernel"], cell.trainable_variables[0].numpy(), np.float32,
                 "get_weights sees the trained variables")


def test_device_scope_and_tf_function(tf_backend):
    make = lambda: rnn_cell.BasicLSTMCell(3)  # noqa: E731
    w = _weights(make, 2, np.float32, 4)
    cell = _cell(make, w)
    x = tf.constant(np.random.default_rng(4).normal(size=(2, 4, 2)).astype(np.float32))
    with tf.device("/CPU:0"):
        with tf.GradientTape() as tape:
            y, st = dynamic_rnn(cell, x, sequence_length=[4, 2], dtype=tf.float32)
            loss = tf.reduce_sum(y)
        grads = tape.gradient(loss, cell.trainable_variables)
    assert y.device.endswith("CPU:0") and st.h.device.endswith("CPU:0")
    assert all(g.device.endswith("CPU:0") for g in grads)

    @tf.function
    def run(inputs):
        return dynamic_rnn(cell, inputs, sequence_length=[4, 2], dtype=tf.float32)[0]

    assert_close(run(x).numpy(), y.numpy(), np.float32, "inside tf.function")
