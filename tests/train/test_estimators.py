"""SequenceClassifier / SequenceTagger: fit, predict, score, save/load, errors, gradients."""

import io

import numpy as np
import pytest

import fastseq
from fastseq import SequenceClassifier, SequenceTagger
from fastseq.train import CheckpointError, RecurrentModel
from fastseq.train.progress import ProgressBar


def _toy_classification(rng, n=120):
    """Label = whether the sum of the (variable-length) sequence's first feature is positive."""
    xs, ys = [], []
    for t in rng.integers(2, 10, size=n):
        x = rng.normal(size=(t, 2)).astype(np.float32)
        xs.append(x)
        ys.append("pos" if x[:, 0].sum() > 0 else "neg")
    return xs, np.array(ys)


def _toy_tagging(rng, n=100):
    """Per-step label = sign of the running sum of the input (needs memory)."""
    xs, ys = [], []
    for t in rng.integers(2, 12, size=n):
        x = rng.normal(size=(t, 1)).astype(np.float32)
        xs.append(x)
        ys.append((np.cumsum(x[:, 0]) > 0).astype(np.int64) + 10)
    return xs, ys


@pytest.fixture(autouse=True)
def numpy_backend():
    with fastseq.use_backend("numpy"):
        yield


def test_classifier_learns_and_predicts(tmp_path):
    rng = np.random.default_rng(0)
    xs, ys = _toy_classification(rng)
    xt, yt = _toy_classification(rng, 60)
    clf = SequenceClassifier("gru", num_units=8, epochs=15, batch_size=16, learning_rate=0.03, seed=0, verbose=0)
    clf.fit(xs, ys, validation_data=(xt, yt))
    assert list(clf.classes_) == ["neg", "pos"]
    assert len(clf.history_["loss"]) == 15 and len(clf.history_["val_accuracy"]) == 15
    assert clf.history_["loss"][-1] < clf.history_["loss"][0]
    proba = clf.predict_proba(xt)
    assert proba.shape == (60, 2)
    np.testing.assert_allclose(proba.sum(1), 1, rtol=1e-5)
    pred = clf.predict(xt)
    assert set(pred) <= {"neg", "pos"}
    acc = clf.score(xt, yt)
    assert acc == np.mean(pred == yt)
    assert acc > 0.8
    np.testing.assert_allclose(clf.history_["val_accuracy"][-1], acc)


@pytest.mark.parametrize("ext", ["npz", "safetensors"])
def test_classifier_save_load_roundtrip(tmp_path, ext):
    rng = np.random.default_rng(1)
    xs, ys = _toy_classification(rng, 40)
    clf = SequenceClassifier("lstm", num_units=5, num_layers=2, bidirectional=True, epochs=2, seed=1, verbose=0)
    clf.fit(xs, ys)
    path = tmp_path / f"clf.{ext}"
    clf.save(path)
    back = SequenceClassifier.load(path)
    assert back.get_params() == clf.get_params()
    np.testing.assert_array_equal(back.classes_, clf.classes_)
    np.testing.assert_allclose(back.predict_proba(xs), clf.predict_proba(xs), rtol=1e-6)
    with pytest.raises(CheckpointError, match="holds a SequenceClassifier, not a SequenceTagger"):
        SequenceTagger.load(path)


def test_load_rejects_mismatched_weights(tmp_path):
    rng = np.random.default_rng(2)
    xs, ys = _toy_classification(rng, 30)
    clf = SequenceClassifier("gru", num_units=4, epochs=1, seed=0, verbose=0).fit(xs, ys)
    path = tmp_path / "clf.npz"
    clf.save(path)
    # same metadata, weights of another shape
    from fastseq.train import load_metadata, load_weights, save_weights

    meta, weights = load_metadata(path), load_weights(path)
    weights["dense/kernel"] = np.zeros((5, 2), np.float32)
    save_weights(path, weights, metadata=meta)
    with pytest.raises(CheckpointError, match="dense/kernel"):
        SequenceClassifier.load(path)
    from fastseq.train import save_weights as sw

    sw(tmp_path / "plain.npz", {"a": np.zeros(2)})
    with pytest.raises(CheckpointError, match="not a fastseq estimator"):
        SequenceClassifier.load(tmp_path / "plain.npz")


def test_tagger_learns_and_predicts_per_step():
    rng = np.random.default_rng(3)
    xs, ys = _toy_tagging(rng)
    xt, yt = _toy_tagging(rng, 40)
    tag = SequenceTagger("gru", num_units=8, epochs=12, batch_size=16, learning_rate=0.03, seed=0, verbose=0)
    tag.fit(xs, ys)
    pred = tag.predict(xt)
    assert [len(p) for p in pred] == [len(x) for x in xt]
    assert set(np.concatenate(pred)) <= {10, 11}
    acc = tag.score(xt, yt)
    manual = np.mean(np.concatenate(pred) == np.concatenate(yt))
    np.testing.assert_allclose(acc, manual)
    assert acc > 0.8
    proba = tag.predict_proba(xt)
    assert proba[0].shape == (len(xt[0]), 2)


def test_tagger_loss_ignores_padding():
    """Changing inputs on padded steps (or the filler label) must not change the loss: the
    tagger's loss is masked and the lengths go to the RNN."""
    rng = np.random.default_rng(4)
    fastseq.set_seed(0)
    model = RecurrentModel("gru", num_units=4, num_classes=3, head="per_step", dtype="float64")
    x = rng.normal(size=(3, 6, 2))
    lengths = np.array([6, 2, 4])
    y = rng.integers(0, 3, size=(3, 6))
    loss1, g1, _ = model.loss_and_grads(x, lengths, y)
    x2, y2 = x.copy(), y.copy()
    pad = np.arange(6)[None] >= lengths[:, None]
    x2[pad] = 100.0
    y2[pad] = 2
    loss2, g2, _ = model.loss_and_grads(x2, lengths, y2)
    np.testing.assert_allclose(loss1, loss2, rtol=1e-12)
    for k in g1:
        np.testing.assert_allclose(g1[k], g2[k], rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("head,bidirectional", [("last", False), ("last", True), ("per_step", True)])
def test_model_gradients_match_finite_differences(head, bidirectional):
    rng = np.random.default_rng(5)
    fastseq.set_seed(1)
    model = RecurrentModel("lstm", num_units=3, num_classes=3, num_layers=2, bidirectional=bidirectional,
                           head=head, dtype="float64")
    x = rng.normal(size=(3, 5, 2))
    lengths = np.array([5, 1, 3])
    y = rng.integers(0, 3, size=3) if head == "last" else rng.integers(0, 3, size=(3, 5))
    _, grads, _ = model.loss_and_grads(x, lengths, y)
    w = model.get_weights()
    eps = 1e-6
    for name in w:
        idx = tuple(rng.integers(0, s) for s in w[name].shape)
        plus = {k: v.copy() for k, v in w.items()}
        plus[name][idx] += eps
        model.set_weights(plus)
        lp = model.loss_and_grads(x, lengths, y)[0]
        plus[name][idx] -= 2 * eps
        model.set_weights(plus)
        lm = model.loss_and_grads(x, lengths, y)[0]
        model.set_weights(w)
        np.testing.assert_allclose(grads[name][idx], (lp - lm) / (2 * eps), rtol=1e-5, atol=1e-8, err_msg=name)


def test_dropout_is_only_active_while_training():
    rng = np.random.default_rng(6)
    xs, ys = _toy_classification(rng, 30)
    clf = SequenceClassifier("gru", num_units=6, num_layers=2, dropout=0.5, epochs=1, seed=0, verbose=0).fit(xs, ys)
    a = clf.predict_proba(xs)
    b = clf.predict_proba(xs)
    np.testing.assert_array_equal(a, b)  # no dropout noise at prediction time
    assert all(w.output_keep_prob == 1.0 for w in clf.model_.dropout_wrappers)


def test_seed_makes_fit_reproducible():
    rng = np.random.default_rng(7)
    xs, ys = _toy_classification(rng, 40)
    a = SequenceClassifier("gru", num_units=4, epochs=2, seed=3, verbose=0).fit(xs, ys)
    b = SequenceClassifier("gru", num_units=4, epochs=2, seed=3, verbose=0).fit(xs, ys)
    np.testing.assert_array_equal(a.history_["step_loss"], b.history_["step_loss"])
    c = SequenceClassifier("gru", num_units=4, epochs=2, seed=4, verbose=0).fit(xs, ys)
    assert a.history_["step_loss"] != c.history_["step_loss"]


def test_backend_argument_is_used():
    rng = np.random.default_rng(8)
    xs, ys = _toy_classification(rng, 20)
    with fastseq.use_backend("numpy"):
        clf = SequenceClassifier("gru", num_units=3, epochs=1, seed=0, verbose=0, backend="no-such-backend")
        with pytest.raises(Exception, match="no-such-backend"):
            clf.fit(xs, ys)


def test_progress_bar_writes_loss_and_accuracy():
    stream = io.StringIO()
    bar = ProgressBar(4, 2, 10, stream=stream)
    bar.update(2, loss=0.5, acc=0.25)
    bar.close(loss=0.5, acc=0.75)
    text = stream.getvalue()
    assert "Epoch 2/10" in text and "loss 0.5000" in text and "acc 0.7500" in text and text.endswith("\n")


def test_estimator_bad_input():
    clf = SequenceClassifier(num_units=3, epochs=1, verbose=0)
    with pytest.raises(ValueError, match="not fitted"):
        clf.predict([np.zeros((2, 2))])
    with pytest.raises(ValueError, match=r"sequences\[1\] has 3 features, expected 2"):
        clf.fit([np.zeros((2, 2)), np.zeros((2, 3))], [0, 1])
    with pytest.raises(ValueError, match=r"sequences\[0\] is empty"):
        clf.fit([np.zeros((0, 2)), np.zeros((2, 2))], [0, 1])
    with pytest.raises(ValueError, match="one label per sequence"):
        clf.fit([np.zeros((2, 2)), np.zeros((2, 2))], [0, 1, 1])
    with pytest.raises(ValueError, match="at least 2 classes"):
        clf.fit([np.zeros((2, 2)), np.zeros((2, 2))], [1, 1])
    with pytest.raises(ValueError, match="batch_size"):
        clf.fit([np.zeros((2, 2)), np.zeros((2, 2))], [0, 1], batch_size=0)
    with pytest.raises(ValueError, match="cell must be one of"):
        SequenceClassifier(cell="transformer", verbose=0).fit([np.zeros((2, 2)), np.ones((2, 2))], [0, 1])
    tag = SequenceTagger(num_units=3, epochs=1, verbose=0)
    with pytest.raises(ValueError, match=r"labels\[0\] must have shape \(2,\)"):
        tag.fit([np.zeros((2, 2))], [np.array([0, 1, 1])])
    with pytest.raises(ValueError, match="unknown parameter"):
        clf.set_params(units=3)


@pytest.mark.parametrize("backend", ["numba", pytest.param("tensorflow", marks=pytest.mark.slow)])
def test_checkpoint_moves_between_backends(tmp_path, backend):
    """Fit on one backend, save, load on the numpy reference: same probabilities."""
    reason = fastseq.list_backends().get(backend, "not registered")
    if reason is not None:
        pytest.skip(f"backend {backend} unavailable: {reason}")
    rng = np.random.default_rng(9)
    xs, ys = _toy_classification(rng, 24)
    clf = SequenceClassifier("gru", num_units=4, epochs=1, batch_size=12, seed=0, verbose=0, backend=backend,
                             dtype="float64")
    clf.fit(xs, ys)
    path = tmp_path / "clf.safetensors"
    clf.save(path)
    back = SequenceClassifier.load(path, backend="numpy")
    assert back.backend == "numpy"
    np.testing.assert_allclose(back.predict_proba(xs), clf.predict_proba(xs), rtol=1e-9)


def test_classifier_with_a_cell_object(tmp_path):
    from fastseq.nn import rnn_cell

    rng = np.random.default_rng(10)
    xs, ys = _toy_classification(rng, 30)
    cell = rnn_cell.LSTMCell(4, use_peepholes=True, num_proj=3)
    clf = SequenceClassifier(cell, epochs=1, seed=0, verbose=0, bidirectional=True).fit(xs, ys)
    names = list(clf.model_.get_weights())
    assert "bidirectional_rnn/fw/lstm_cell/w_f_diag" in names and "bidirectional_rnn/bw/lstm_cell/projection/kernel" in names
    assert clf.model_.dense.kernel.shape == (6, 2)  # two directions of num_proj=3
    path = tmp_path / "c.npz"
    clf.save(path)
    with pytest.raises(ValueError, match="pass it as load"):
        SequenceClassifier.load(path)
    back = SequenceClassifier.load(path, cell=rnn_cell.LSTMCell(4, use_peepholes=True, num_proj=3))
    np.testing.assert_allclose(back.predict_proba(xs), clf.predict_proba(xs), rtol=1e-6)


def test_fit_restarts_unless_warm_start():
    rng = np.random.default_rng(11)
    xs, ys = _toy_classification(rng, 30)
    clf = SequenceClassifier("gru", num_units=4, epochs=1, seed=0, verbose=0).fit(xs, ys)
    first = clf.history_["step_loss"][:]
    clf.fit(xs, ys)
    assert clf.history_["step_loss"] == first  # same seed, new weights: same run again
    clf.set_params(warm_start=True).fit(xs, ys)
    assert len(clf.history_["loss"]) == 2 and clf.history_["step_loss"][: len(first)] == first
    with pytest.raises(ValueError, match="warm_start"):
        clf.fit([np.zeros((3, 5))] * 2, ["neg", "pos"])
