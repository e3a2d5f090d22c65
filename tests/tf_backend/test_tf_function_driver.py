"""The drivers traced inside a user's tf.function with unknown batch and time sizes."""

import importlib.util

import numpy as np
import pytest

if importlib.util.find_spec("tensorflow") is None:
    pytest.skip("tensorflow is not installed", allow_module_level=True)

import fastseq
from fastseq.nn import bidirectional_dynamic_rnn, dynamic_rnn, rnn_cell


def test_dynamic_and_bidirectional_inside_tf_function_with_symbolic_shapes():
    import tensorflow as tf

    with fastseq.use_backend("tensorflow"):
        cell = rnn_cell.LSTMCell(4, num_proj=3)
        multi = rnn_cell.MultiRNNCell([rnn_cell.GRUCell(3), rnn_cell.BasicLSTMCell(2)])

        @tf.function(input_signature=[tf.TensorSpec([None, None, 5], tf.float64), tf.TensorSpec([None], tf.int32)])
        def run(x, lengths):
            out, st = dynamic_rnn(cell, x, sequence_length=lengths)
            (a, b), _ = bidirectional_dynamic_rnn(multi, multi, x, sequence_length=lengths)
            return out, st.h, a, b

        for shape, lengths in (((3, 6, 5), [6, 0, 2]), ((2, 4, 5), [1, 4])):
            x = np.random.default_rng(0).standard_normal(shape)
            lens = np.array(lengths, np.int32)
            out, h, a, b = run(x, lens)
            with fastseq.use_backend("numpy"):
                ref_out, ref_st = dynamic_rnn(cell, x, sequence_length=lens)
                (ra, rb), _ = bidirectional_dynamic_rnn(multi, multi, x, sequence_length=lens)
            np.testing.assert_allclose(out.numpy(), ref_out, rtol=1e-10, atol=1e-12)
            np.testing.assert_allclose(h.numpy(), ref_st.h, rtol=1e-10, atol=1e-12)
            np.testing.assert_allclose(a.numpy(), ra, rtol=1e-10, atol=1e-12)
            np.testing.assert_allclose(b.numpy(), rb, rtol=1e-10, atol=1e-12)
