"""Dense layer, losses, optimizers, clipping, checkpoints: the non-RNN parts of fastseq.train."""

import json
import struct

import numpy as np
import pytest

from fastseq.train import (
    SGD, Adam, CheckpointError, Dense, check_weights, classification_loss, clip_by_global_norm,
    get_optimizer, load_metadata, load_weights, save_weights, sequence_loss_and_grad,
)
from fastseq.train import losses as losses_mod


def _fd(f, x, eps=1e-6):
    """Central finite differences of a scalar function f at x (float64)."""
    g = np.zeros_like(x)
    it = np.nditer(x, flags=["multi_index"])
    for _ in it:
        i = it.multi_index
        old = x[i]
        x[i] = old + eps
        fp = f()
        x[i] = old - eps
        fm = f()
        x[i] = old
        g[i] = (fp - fm) / (2 * eps)
    return g


# ---------------------------------------------------------------- Dense
def test_dense_forward_matches_matmul_and_shares_weights_over_time():
    rng = np.random.default_rng(0)
    d = Dense(3, seed=1)
    x = rng.normal(size=(2, 4, 5)).astype(np.float32)
    y = d(x)
    w = d.get_weights()
    assert list(w) == ["dense/kernel", "dense/bias"]
    assert w["dense/kernel"].shape == (5, 3)
    flat = x.reshape(-1, 5) @ w["dense/kernel"] + w["dense/bias"]
    np.testing.assert_allclose(y.reshape(-1, 3), flat, rtol=1e-6)
    limit = np.sqrt(6 / 8)
    assert np.all(np.abs(w["dense/kernel"]) <= limit)


def test_dense_gradient_finite_differences():
    rng = np.random.default_rng(1)
    d = Dense(4, seed=3, dtype="float64")
    x = rng.normal(size=(3, 2, 5))
    d.build(5, dtype="float64")
    d.bias[:] = rng.normal(size=4)
    c = rng.normal(size=(3, 2, 4))

    def f():
        return float(np.sum(d.forward(x) * c))

    dx, grads = d.backward(x, c)
    np.testing.assert_allclose(dx, _fd(f, x), rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(grads["dense/kernel"], _fd(f, d.kernel), rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(grads["dense/bias"], _fd(f, d.bias), rtol=1e-6, atol=1e-8)


def test_dense_bad_input():
    d = Dense(2, seed=0)
    d.build(3)
    with pytest.raises(ValueError, match="last axis must be 3"):
        d(np.zeros((2, 4)))
    with pytest.raises(ValueError, match="units"):
        Dense(0)
    with pytest.raises(ValueError, match="missing"):
        d.set_weights({"dense/kernel": np.zeros((3, 2))})
    with pytest.raises(ValueError, match="shape"):
        d.set_weights({"dense/kernel": np.zeros((4, 2)), "dense/bias": np.zeros(2)})


def test_dense_seeded_by_fastseq_set_seed():
    import fastseq

    fastseq.set_seed(123)
    a = Dense(3).build(4).kernel
    fastseq.set_seed(123)
    b = Dense(3).build(4).kernel
    fastseq.set_seed(124)
    c = Dense(3).build(4).kernel
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


# ---------------------------------------------------------------- losses
def _ref_ce(logits, labels):
    # log-sum-exp via scipy, an implementation independent of the code under test
    from scipy.special import logsumexp

    return logsumexp(logits, axis=-1) - np.take_along_axis(logits, labels[..., None], -1)[..., 0]


@pytest.mark.parametrize("use_data", [True, False])
def test_classification_loss_and_gradient(use_data, monkeypatch):
    if not use_data:
        monkeypatch.setattr(losses_mod, "_data", lambda: None)
    elif losses_mod._data() is None:
        pytest.skip("fastseq.data losses are not available")
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(5, 4)) * 3
    labels = np.array([0, 3, 1, 1, 2])
    loss, d = classification_loss(logits, labels)
    np.testing.assert_allclose(loss, _ref_ce(logits, labels).mean(), rtol=1e-12)
    fd = _fd(lambda: _ref_ce(logits, labels).mean(), logits)
    np.testing.assert_allclose(d, fd, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("use_data", [True, False])
def test_sequence_loss_masked_and_gradient(use_data, monkeypatch):
    if not use_data:
        monkeypatch.setattr(losses_mod, "_data", lambda: None)
    elif losses_mod._data() is None:
        pytest.skip("fastseq.data losses are not available")
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(3, 4, 5))
    targets = rng.integers(0, 5, size=(3, 4))
    weights = (np.arange(4)[None] < np.array([4, 2, 1])[:, None]).astype(np.float64)

    def ref():
        return float(np.sum(_ref_ce(logits, targets) * weights) / (weights.sum() + 1e-12))

    loss, d = sequence_loss_and_grad(logits, targets, weights)
    np.testing.assert_allclose(loss, ref(), rtol=1e-10)
    np.testing.assert_allclose(d, _fd(ref, logits), rtol=1e-6, atol=1e-9)
    assert np.all(d[weights == 0] == 0)


def test_loss_bad_labels():
    with pytest.raises(ValueError, match=r"labels must be in \[0, 3\)"):
        classification_loss(np.zeros((2, 3)), np.array([0, 3]))
    with pytest.raises(TypeError, match="integers"):
        classification_loss(np.zeros((2, 3)), np.array([0.0, 1.0]))
    with pytest.raises(ValueError, match="weights must have shape"):
        sequence_loss_and_grad(np.zeros((2, 3, 4)), np.zeros((2, 3), int), np.ones((2, 2)))


# ---------------------------------------------------------------- clipping
def test_clip_by_global_norm():
    rng = np.random.default_rng(4)
    grads = {"a": rng.normal(size=(3, 4)), "b": rng.normal(size=5), "c": None}
    norm = np.sqrt(sum(np.sum(g**2) for g in grads.values() if g is not None))
    clipped, got = clip_by_global_norm(grads, norm / 2)
    np.testing.assert_allclose(got, norm, rtol=1e-12)
    new = np.sqrt(sum(np.sum(g**2) for g in clipped.values() if g is not None))
    np.testing.assert_allclose(new, norm / 2, rtol=1e-12)
    np.testing.assert_allclose(clipped["a"] / grads["a"], 0.5, rtol=1e-12)
    assert clipped["c"] is None
    same, _ = clip_by_global_norm(grads, norm * 2)
    np.testing.assert_array_equal(same["b"], grads["b"])
    lst, _ = clip_by_global_norm([grads["a"], grads["b"]], norm / 4)
    np.testing.assert_allclose(lst[1], grads["b"] / 4, rtol=1e-12)
    nan, _ = clip_by_global_norm({"x": np.array([np.inf, 1.0])}, 1.0)
    assert np.all(np.isnan(nan["x"]))
    with pytest.raises(ValueError, match="clip_norm"):
        clip_by_global_norm(grads, 0.0)


# ---------------------------------------------------------------- optimizers vs torch
def _torch_run(opt_factory, params, grad_seq):
    torch = pytest.importorskip("torch")
    tparams = {k: torch.tensor(v.copy(), requires_grad=True) for k, v in params.items()}
    opt = opt_factory(torch, list(tparams.values()))
    for grads in grad_seq:
        for k, p in tparams.items():
            p.grad = torch.tensor(grads[k])
        opt.step()
    return {k: p.detach().numpy() for k, p in tparams.items()}


def _ours_run(opt, params, grad_seq):
    p = dict(params)
    for grads in grad_seq:
        p = opt.apply(p, grads)
    return p


def _problem(seed=5, steps=7):
    rng = np.random.default_rng(seed)
    params = {"w": rng.normal(size=(3, 2)), "b": rng.normal(size=2)}
    grad_seq = [{k: rng.normal(size=v.shape) for k, v in params.items()} for _ in range(steps)]
    return params, grad_seq


def test_adam_matches_torch():
    params, grads = _problem()
    # TF1 puts epsilon outside the bias correction, torch inside; a tiny epsilon makes them equal
    ours = _ours_run(Adam(0.01, epsilon=1e-14), params, grads)
    ref = _torch_run(lambda t, ps: t.optim.Adam(ps, lr=0.01, eps=1e-14), params, grads)
    for k in params:
        np.testing.assert_allclose(ours[k], ref[k], rtol=1e-10)


@pytest.mark.parametrize("momentum,nesterov", [(0.0, False), (0.9, False), (0.9, True)])
def test_sgd_matches_torch(momentum, nesterov):
    params, grads = _problem(6)
    ours = _ours_run(SGD(0.1, momentum=momentum, nesterov=nesterov), params, grads)
    ref = _torch_run(lambda t, ps: t.optim.SGD(ps, lr=0.1, momentum=momentum, nesterov=nesterov), params, grads)
    for k in params:
        np.testing.assert_allclose(ours[k], ref[k], rtol=1e-12)


def test_optimizer_clips_and_keeps_dtype():
    params = {"w": np.ones(4, dtype=np.float32)}
    grads = {"w": np.full(4, 10.0, dtype=np.float32)}
    new = SGD(1.0, clip_norm=1.0).apply(params, grads)
    assert new["w"].dtype == np.float32
    np.testing.assert_allclose(new["w"], 1.0 - 0.5, rtol=1e-6)  # g scaled to norm 1: each entry 0.5
    assert params["w"][0] == 1.0  # inputs untouched


def test_optimizer_bad_input():
    with pytest.raises(ValueError, match="learning_rate"):
        Adam(-1.0)
    with pytest.raises(ValueError, match="unknown parameters"):
        SGD(0.1).apply({"a": np.zeros(2)}, {"b": np.zeros(2)})
    with pytest.raises(ValueError, match="shape"):
        SGD(0.1).apply({"a": np.zeros(2)}, {"a": np.zeros(3)})
    with pytest.raises(ValueError, match="'sgd' or 'adam'"):
        get_optimizer("rmsprop")
    assert isinstance(get_optimizer("adam", 0.5), Adam)


# ---------------------------------------------------------------- checkpoints
WEIGHTS = {
    "rnn/gru_cell/gates/kernel": np.arange(12, dtype=np.float32).reshape(3, 4) / 7,
    "rnn/gru_cell/gates/bias": np.ones(4, dtype=np.float64),
    "dense/kernel": np.zeros((0, 2), dtype=np.float32),
    "step": np.asarray(3, dtype=np.int64),
}


@pytest.mark.parametrize("ext", ["npz", "safetensors"])
def test_checkpoint_roundtrip(tmp_path, ext):
    path = tmp_path / f"w.{ext}"
    save_weights(path, WEIGHTS, metadata={"model": "gru", "n": "3"})
    got = load_weights(path)
    assert list(got) == list(WEIGHTS)
    for k, v in WEIGHTS.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape
        np.testing.assert_array_equal(got[k], v)
    assert load_metadata(path) == {"model": "gru", "n": "3"}


def test_safetensors_layout_is_the_published_format(tmp_path):
    path = tmp_path / "w.safetensors"
    save_weights(path, {"a": np.array([1.5, -2.0], dtype=np.float32)})
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    assert n % 8 == 0
    assert header["a"] == {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
    assert np.frombuffer(raw[8 + n:], dtype="<f4").tolist() == [1.5, -2.0]


def test_safetensors_interop_with_the_library(tmp_path):
    st = pytest.importorskip("safetensors.numpy")
    path = tmp_path / "w.safetensors"
    save_weights(path, WEIGHTS)
    theirs = st.load_file(str(path))
    for k, v in WEIGHTS.items():
        np.testing.assert_array_equal(theirs[k], v)
    st.save_file({k: np.ascontiguousarray(v) for k, v in WEIGHTS.items()}, str(tmp_path / "t.safetensors"))
    ours = load_weights(tmp_path / "t.safetensors")
    for k, v in WEIGHTS.items():
        np.testing.assert_array_equal(ours[k], v)


def _corrupt(path, how):
    raw = bytearray(path.read_bytes())
    if how == "truncate":
        path.write_bytes(bytes(raw[: len(raw) - 5]))
    elif how == "short":
        path.write_bytes(bytes(raw[:5]))
    elif how == "header_len":
        path.write_bytes(struct.pack("<Q", 10**12) + bytes(raw[8:]))
    elif how == "json":
        raw[8] = ord("#")
        path.write_bytes(bytes(raw))
    elif how == "garbage":
        path.write_bytes(b"\x00garbage" * 20)
    elif how == "extra":
        path.write_bytes(bytes(raw) + b"abcdefgh")


@pytest.mark.parametrize("how", ["truncate", "short", "header_len", "json", "garbage", "extra"])
def test_corrupted_safetensors_is_a_clear_error(tmp_path, how):
    path = tmp_path / "w.safetensors"
    save_weights(path, WEIGHTS)
    _corrupt(path, how)
    with pytest.raises(CheckpointError, match=r"w\.safetensors"):
        load_weights(path)


@pytest.mark.parametrize("how", ["truncate", "short", "garbage"])
def test_corrupted_npz_is_a_clear_error(tmp_path, how):
    path = tmp_path / "w.npz"
    save_weights(path, WEIGHTS)
    _corrupt(path, how)
    with pytest.raises(CheckpointError, match=r"w\.npz"):
        load_weights(path)


def test_npz_with_pickled_objects_is_refused(tmp_path):
    path = tmp_path / "evil.npz"
    np.savez(path, x=np.array([{"a": 1}], dtype=object))
    with pytest.raises(CheckpointError, match="pickle"):
        load_weights(path)


def test_mismatched_weights_are_reported(tmp_path):
    path = tmp_path / "w.npz"
    save_weights(path, {"a": np.zeros((2, 3)), "b": np.zeros(3)})
    with pytest.raises(CheckpointError, match=r"missing \['c'\], unexpected \['b'\]"):
        load_weights(path, expected={"a": (2, 3), "c": (3,)})
    with pytest.raises(CheckpointError, match=r"'a' has shape \(2, 3\), the model expects \(3, 2\)"):
        load_weights(path, expected={"a": (3, 2), "b": (3,)})
    check_weights(load_weights(path), {"a": np.zeros((2, 3)), "b": (3,)})


def test_checkpoint_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="cannot tell the weights format"):
        save_weights(tmp_path / "w.bin", WEIGHTS)
    with pytest.raises(TypeError, match="numeric"):
        save_weights(tmp_path / "w.npz", {"a": np.array(["x"])})
    with pytest.raises(ValueError, match="reserved"):
        save_weights(tmp_path / "w.npz", {"__metadata__": np.zeros(1)})
    with pytest.raises(FileNotFoundError):
        load_weights(tmp_path / "missing.npz")
    with pytest.raises(TypeError, match="metadata"):
        save_weights(tmp_path / "w.npz", WEIGHTS, metadata={"a": 1})
