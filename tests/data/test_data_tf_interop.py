"""fastseq's data routines against TensorFlow itself (skipped when TF is not installed).

TensorFlow is imported once, lazily, by the module-scoped fixture; every TF check lives in
this module so the import is paid once.
"""
import os

import numpy as np
import pytest

from fastseq import io
from fastseq.data import (
    bucket_by_sequence_length,
    pad_sequences,
    reverse_sequence,
    sequence_loss,
    sequence_mask,
    sparse_softmax_cross_entropy_with_logits,
)
import fastseq


@pytest.fixture(scope="module")
def tf():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    return pytest.importorskip("tensorflow", reason="tensorflow is not installed: TF interop checks skipped")


def _tf_sequence_loss(tf, logits, targets, weights, at, ab, st, sb):
    """tf.contrib.seq2seq.sequence_loss (TF 1.15 / tensorflow_addons), written with TF ops."""
    num_classes = tf.shape(logits)[2]
    crossent = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=tf.reshape(targets, [-1]),
                                                              logits=tf.reshape(logits, [-1, num_classes]))
    crossent *= tf.reshape(weights, [-1])
    if at and ab:
        return tf.math.divide_no_nan(tf.reduce_sum(crossent), tf.reduce_sum(weights))
    if st and sb:
        return tf.math.divide_no_nan(tf.reduce_sum(crossent), tf.cast(tf.math.count_nonzero(weights), crossent.dtype))
    crossent = tf.reshape(crossent, tf.shape(logits)[0:2])
    if at or ab:
        axis = [0] if ab else [1]
        return tf.math.divide_no_nan(tf.reduce_sum(crossent, axis=axis), tf.reduce_sum(weights, axis=axis))
    if st or sb:
        axis = [0] if sb else [1]
        return tf.math.divide_no_nan(tf.reduce_sum(crossent, axis=axis),
                                     tf.cast(tf.math.count_nonzero(weights, axis=axis), crossent.dtype))
    return crossent


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_losses_and_gradients_match_tf(tf, dtype):
    rng = np.random.default_rng(0)
    B, T, C = 4, 6, 50
    logits = (3 * rng.standard_normal((B, T, C))).astype(dtype)
    targets = rng.integers(0, C, (B, T))
    weights = sequence_mask([6, 2, 0, 4], T, dtype=dtype)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == np.float32 else dict(rtol=1e-10, atol=1e-12)
    ref = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=targets, logits=logits).numpy()
    np.testing.assert_allclose(sparse_softmax_cross_entropy_with_logits(labels=targets, logits=logits), ref, **tol)
    for mode in [(1, 1, 0, 0), (0, 0, 1, 1), (1, 0, 0, 0), (0, 1, 0, 0), (0, 0, 1, 0), (0, 0, 0, 1),
                 (0, 0, 0, 0), (1, 0, 0, 1)]:
        lg = tf.constant(logits)
        w = tf.constant(weights)
        with tf.GradientTape() as tape:
            tape.watch([lg, w])
            out = _tf_sequence_loss(tf, lg, tf.constant(targets), w, *mode)
        g = rng.standard_normal(out.shape).astype(dtype)
        d_lg, d_w = tape.gradient(out, [lg, w], output_gradients=tf.constant(g))
        loss, pullback = fastseq.vjp(fastseq.sequence_loss, logits, targets, weights, *map(bool, mode))
        grads = pullback(g)
        np.testing.assert_allclose(loss, out.numpy(), **tol)
        np.testing.assert_allclose(grads.logits, d_lg.numpy(), **tol)
        np.testing.assert_allclose(grads.weights, d_w.numpy(), **tol)


def test_mask_reverse_pad_match_tf(tf):
    rng = np.random.default_rng(1)
    lens = np.array([3, 0, 5, 2])
    np.testing.assert_array_equal(sequence_mask(lens, 6), tf.sequence_mask(lens, 6).numpy())
    np.testing.assert_array_equal(sequence_mask(lens), tf.sequence_mask(lens).numpy())
    x = rng.standard_normal((4, 5, 3))
    np.testing.assert_array_equal(reverse_sequence(x, lens, seq_axis=1, batch_axis=0),
                                  tf.reverse_sequence(x, lens, seq_axis=1, batch_axis=0).numpy())
    xt = np.swapaxes(x, 0, 1)
    np.testing.assert_array_equal(reverse_sequence(xt, lens, seq_axis=0, batch_axis=1),
                                  tf.reverse_sequence(xt, lens, seq_axis=0, batch_axis=1).numpy())
    keras_pad = pytest.importorskip("keras").utils.pad_sequences
    seqs = [rng.integers(1, 9, int(n)).tolist() for n in [3, 0, 7, 1, 5]]
    for padding in ("pre", "post"):
        for truncating in ("pre", "post"):
            for maxlen in (None, 4):
                ours, _ = pad_sequences(seqs, maxlen=maxlen, dtype="int32", padding=padding, truncating=truncating)
                theirs = keras_pad(seqs, maxlen=maxlen, dtype="int32", padding=padding, truncating=truncating)
                np.testing.assert_array_equal(ours, theirs)


@pytest.mark.parametrize("drop", [False, True])
def test_bucketing_matches_tf_data(tf, drop):
    rng = np.random.default_rng(2)
    lens = rng.integers(1, 15, 41)
    seqs = [np.arange(1, n + 1, dtype=np.int64) + 100 * i for i, n in enumerate(lens)]
    ds = tf.data.Dataset.from_generator(lambda: iter(seqs), output_signature=tf.TensorSpec([None], tf.int64))
    ds = ds.bucket_by_sequence_length(lambda s: tf.shape(s)[0], [4, 8, 11], [3, 4, 2, 5], drop_remainder=drop)
    theirs = [b.numpy() for b in ds]
    ours = [b.inputs for b in bucket_by_sequence_length(seqs, None, [4, 8, 11], [3, 4, 2, 5], shuffle=False,
                                                          drop_remainder=drop)]
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        np.testing.assert_array_equal(a, b)


def _examples(rng, n):
    out = []
    for i in range(n):
        T = int(rng.integers(0, 6))
        out.append(({"length": T, "id": f"ex{i}".encode(), "w": rng.standard_normal(int(rng.integers(0, 4))).astype(np.float32)},
                    {"tokens": rng.integers(-(2**40), 2**40, T), "feat": rng.standard_normal((T, 2)).astype(np.float32),
                     "rag": [rng.standard_normal(int(rng.integers(0, 3))).astype(np.float32) for _ in range(T)],
                     "words": [[b"w" * int(k) for k in rng.integers(0, 4, int(rng.integers(0, 3)))] for _ in range(T)]}))
    return out


def _specs(tf, ours):
    m = io if ours else tf.io
    dt = (lambda s: s) if ours else (lambda s: getattr(tf, s))
    ctx = {"length": m.FixedLenFeature([], dt("int64")), "id": m.FixedLenFeature([], dt("string")),
           "w": m.VarLenFeature(dt("float32"))}
    seq = {"tokens": m.FixedLenSequenceFeature([], dt("int64")), "feat": m.FixedLenSequenceFeature([2], dt("float32")),
           "rag": m.VarLenFeature(dt("float32")), "words": m.VarLenFeature(dt("string"))}
    return ctx, seq


def _same(ours, theirs):
    oc, os_ = ours
    tc, ts = theirs
    for d_ours, d_tf in ((oc, tc), (os_, ts)):
        assert set(d_ours) == set(d_tf)
        for k, v in d_ours.items():
            t = d_tf[k]
            if isinstance(v, io.SparseValue):
                np.testing.assert_array_equal(v.indices, t.indices.numpy())
                np.testing.assert_array_equal(np.asarray(list(v.values)), t.values.numpy())
                np.testing.assert_array_equal(v.dense_shape, t.dense_shape.numpy())
            else:
                np.testing.assert_array_equal(v, t.numpy())


@pytest.mark.parametrize("compression", [None, "GZIP"])
def test_fastseq_files_parse_in_tf(tf, tmp_path, compression):
    rng = np.random.default_rng(3)
    exs = _examples(rng, 12)
    p = str(tmp_path / "fs.tfrecord")
    io.write_sequence_examples(p, exs, compression_type=compression,
                               dtypes={"words": "string", "rag": "float32", "w": "float32"})
    tctx, tseq = _specs(tf, ours=False)
    octx, oseq = _specs(tf, ours=True)
    theirs = [tf.io.parse_single_sequence_example(r, tctx, tseq)
              for r in tf.data.TFRecordDataset(p, compression_type=compression or "")]
    ours = list(io.read_sequence_examples(p, octx, oseq, compression_type=compression))
    assert len(theirs) == len(ours) == len(exs)
    for a, b in zip(ours, theirs):
        _same(a, b)


def test_tf_files_read_in_fastseq(tf, tmp_path):
    rng = np.random.default_rng(4)
    exs = _examples(rng, 10)
    p = str(tmp_path / "tf.tfrecord")
    serialized = []
    with tf.io.TFRecordWriter(p) as w:
        for ctx, fl in exs:
            ex = tf.train.SequenceExample()
            ex.context.feature["length"].int64_list.value.append(ctx["length"])
            ex.context.feature["id"].bytes_list.value.append(ctx["id"])
            ex.context.feature["w"].float_list.value.extend(ctx["w"].tolist())
            for name in ("tokens", "feat", "rag", "words"):
                fl_proto = ex.feature_lists.feature_list[name]
                for step in fl[name]:
                    f = fl_proto.feature.add()
                    if name == "words":
                        f.bytes_list.value.extend(list(step))
                    elif name == "tokens":
                        f.int64_list.value.append(int(step))
                    else:
                        f.float_list.value.extend(np.ravel(step).tolist())
            s = ex.SerializeToString()
            serialized.append(s)
            w.write(s)
    assert io.read_tfrecord(p) == serialized
    tctx, tseq = _specs(tf, ours=False)
    octx, oseq = _specs(tf, ours=True)
    ours = list(io.read_sequence_examples(p, octx, oseq))
    for s, mine in zip(serialized, ours):
        _same(mine, tf.io.parse_single_sequence_example(s, tctx, tseq))
    # our encoder's bytes decode to the same proto TF builds
    for (ctx, fl), s in zip(exs, serialized):
        again = tf.train.SequenceExample.FromString(
            io.encode_sequence_example(ctx, fl, dtypes={"words": "string", "w": "float32"}))
        assert again == tf.train.SequenceExample.FromString(s)
