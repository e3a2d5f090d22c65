import itertools

import numpy as np
import pytest

import fastseq
from fastseq.data import (
    sequence_loss,
    sequence_loss_grad,
    sequence_mask,
    sparse_softmax_cross_entropy_grad,
    sparse_softmax_cross_entropy_with_logits,
)

from ._refs import log_softmax64, sequence_loss_reference, xent_reference

TOL = {np.dtype(np.float32): dict(rtol=2e-5, atol=2e-6), np.dtype(np.float64): dict(rtol=1e-12, atol=1e-13)}

# (average_across_timesteps, average_across_batch, sum_over_timesteps, sum_over_batches)
MODES = [m for m in itertools.product([False, True], repeat=4) if not (m[0] and m[2]) and not (m[1] and m[3])]


def _problem(rng, dtype, B=3, T=5, C=7, scale=3.0, zero_row=True):
    logits = (scale * rng.standard_normal((B, T, C))).astype(dtype)
    targets = rng.integers(0, C, (B, T))
    lens = rng.integers(1, T + 1, B)
    if zero_row:
        lens[0] = 0
    weights = sequence_mask(lens, T, dtype=dtype) * rng.uniform(0.5, 2.0, (B, T)).astype(dtype)
    return logits, targets, weights


@pytest.mark.parametrize("C", [1, 5, 37, 1000])
def test_xent_forward_and_grad(dtype, C):
    rng = np.random.default_rng(C)
    logits = (4 * rng.standard_normal((3, 4, C))).astype(dtype)
    labels = rng.integers(0, C, (3, 4))
    loss = sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)
    assert loss.dtype == dtype and loss.shape == (3, 4)
    np.testing.assert_allclose(loss, xent_reference(labels, logits), **TOL[dtype])
    d = rng.standard_normal((3, 4)).astype(dtype)
    loss2, g = sparse_softmax_cross_entropy_grad(labels=labels, logits=logits, d_loss=d)
    onehot = np.eye(C)[labels]
    ref = d[..., None] * (np.exp(log_softmax64(logits)) - onehot)
    np.testing.assert_allclose(g, ref, **TOL[dtype])
    res, pullback = fastseq.vjp(fastseq.sparse_softmax_cross_entropy_with_logits, labels=labels, logits=logits)
    np.testing.assert_array_equal(res, loss)
    np.testing.assert_allclose(pullback(d).logits, ref, **TOL[dtype])


def test_xent_stable_for_huge_logits(dtype):
    logits = np.array([[1e4, -1e4, 0.0], [-3e4, -3e4 + 1, -3e4 - 1]], dtype=dtype)
    labels = np.array([1, 0])
    got = sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, xent_reference(labels, logits), rtol=1e-6)
    nan = np.array([[0.0, np.nan, 1.0], [0.0, 1.0, 2.0]], dtype=dtype)
    out = sparse_softmax_cross_entropy_with_logits(labels=[0, 0], logits=nan)
    assert np.isnan(out[0]) and np.isfinite(out[1])


def test_xent_multithreaded_rows_match(dtype, monkeypatch):
    # big enough to take the threaded path; compared with the one-thread result
    rng = np.random.default_rng(5)
    logits = rng.standard_normal((600, 2000)).astype(dtype)
    labels = rng.integers(0, 2000, 600)
    loss, g = sparse_softmax_cross_entropy_grad(labels=labels, logits=logits)
    monkeypatch.setenv("FASTSEQ_NUM_THREADS", "1")
    loss1, g1 = sparse_softmax_cross_entropy_grad(labels=labels, logits=logits)
    np.testing.assert_array_equal(loss, loss1)
    np.testing.assert_array_equal(g, g1)
    np.testing.assert_allclose(loss, xent_reference(labels, logits), **TOL[dtype])


@pytest.mark.parametrize("mode", MODES, ids=lambda m: "".join("1" if f else "0" for f in m))
def test_sequence_loss_matches_reference(dtype, mode):
    at, ab, st, sb = mode
    rng = np.random.default_rng(7)
    logits, targets, weights = _problem(rng, dtype)
    got = sequence_loss(logits, targets, weights, at, ab, st, sb)
    ref = sequence_loss_reference(logits, targets, weights, at, ab, st, sb)
    assert np.shape(got) == np.shape(ref)
    assert np.asarray(got).dtype == dtype
    np.testing.assert_allclose(got, ref, **TOL[dtype])


@pytest.mark.parametrize("mode", MODES, ids=lambda m: "".join("1" if f else "0" for f in m))
def test_sequence_loss_gradients_finite_differences(mode):
    """float64 central differences of sum(g * loss) w.r.t. logits and weights."""
    at, ab, st, sb = mode
    rng = np.random.default_rng(11)
    logits, targets, weights = _problem(rng, np.float64, B=3, T=4, C=5)
    loss, pullback = fastseq.vjp(fastseq.sequence_loss, logits, targets, weights, average_across_timesteps=at,
                                 average_across_batch=ab, sum_over_timesteps=st, sum_over_batches=sb)
    g = rng.standard_normal(np.shape(loss))
    grads = pullback(g)
    assert grads.targets is None

    def f(lg, w):
        return float(np.sum(g * sequence_loss_reference(lg, targets, w, at, ab, st, sb)))

    eps = 1e-6
    num = np.zeros_like(logits)
    for idx in np.ndindex(logits.shape):
        e = np.zeros_like(logits)
        e[idx] = eps
        num[idx] = (f(logits + e, weights) - f(logits - e, weights)) / (2 * eps)
    np.testing.assert_allclose(grads.logits, num, rtol=1e-6, atol=1e-8)
    # weights: only where perturbing keeps count_nonzero fixed (it is piecewise constant)
    numw = np.zeros_like(weights)
    for idx in np.ndindex(weights.shape):
        if weights[idx] == 0 and (st or sb) and not (at or ab):
            numw[idx] = grads.weights[idx]  # count_nonzero jumps at 0: not differentiable there
            continue
        e = np.zeros_like(weights)
        e[idx] = eps
        numw[idx] = (f(logits, weights + e) - f(logits, weights - e)) / (2 * eps)
    zero_total = (at and ab and weights.sum() == 0)
    if not zero_total:
        np.testing.assert_allclose(grads.weights, numw, rtol=1e-6, atol=1e-8)


def test_sequence_loss_grad_float32_matches_float64():
    rng = np.random.default_rng(13)
    logits, targets, weights = _problem(rng, np.float64, B=4, T=6, C=300)
    l64, g64 = sequence_loss_grad(logits, targets, weights)
    l32, g32 = sequence_loss_grad(logits.astype(np.float32), targets, weights.astype(np.float32))
    assert g32.logits.dtype == np.float32
    np.testing.assert_allclose(l32, l64, rtol=1e-5)
    np.testing.assert_allclose(g32.logits, g64.logits, rtol=1e-4, atol=1e-7)


def test_sequence_loss_all_zero_weights_is_zero():
    logits = np.ones((2, 3, 4))
    loss, grads = sequence_loss_grad(logits, np.zeros((2, 3), int), np.zeros((2, 3)))
    assert loss == 0.0
    np.testing.assert_array_equal(grads.logits, 0.0)


def test_loss_bad_input():
    lg = np.zeros((2, 3, 4), np.float32)
    t = np.zeros((2, 3), int)
    w = np.ones((2, 3), np.float32)
    with pytest.raises(ValueError, match="logits.*batch_size"):
        sequence_loss(lg[0], t, w)
    with pytest.raises(ValueError, match="targets.*shape"):
        sequence_loss(lg, t[:, :2], w)
    with pytest.raises(ValueError, match="weights.*shape"):
        sequence_loss(lg, t, w[:1])
    with pytest.raises(ValueError, match=r"targets.*\[0, 4\).*4"):
        sequence_loss(lg, t + 4, w)
    with pytest.raises(TypeError, match="targets.*integer"):
        sequence_loss(lg, t.astype(float), w)
    with pytest.raises(TypeError, match="logits.*float32 or float64"):
        sequence_loss(lg.astype(int), t, w)
    with pytest.raises(ValueError, match="cannot both be True"):
        sequence_loss(lg, t, w, average_across_timesteps=True, sum_over_timesteps=True)
    with pytest.raises(ValueError, match=r"labels.*\[0, 4\).*-1"):
        sparse_softmax_cross_entropy_with_logits(labels=[-1, 0], logits=np.zeros((2, 4)))
    with pytest.raises(ValueError, match="labels.*shape"):
        sparse_softmax_cross_entropy_with_logits(labels=[0, 0, 0], logits=np.zeros((2, 4)))
    with pytest.raises(ValueError, match="pass both"):
        sparse_softmax_cross_entropy_with_logits(logits=np.zeros((2, 4)))
