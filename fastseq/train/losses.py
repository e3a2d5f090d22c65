"""Losses and their gradients for training, taken from :mod:`fastseq.data`.

The losses themselves (``sparse_softmax_cross_entropy_with_logits`` and ``sequence_loss``
with ``tf.contrib.seq2seq.sequence_loss`` semantics) live in :mod:`fastseq.data`, with vjp
rules so that ``fastseq.vjp(loss_fn, ...)`` gives their gradient. The two helpers below are
what a training step needs: the scalar loss and ``d loss / d logits`` in one call.

When :mod:`fastseq.data` cannot be imported (a partial checkout), a plain NumPy version of
the same formulas is used so that training still works; the tests compare the two.
"""

from __future__ import annotations

import numpy as np

__all__ = ["classification_loss", "sequence_loss_and_grad", "softmax"]


def softmax(logits, axis=-1):
    """Numerically stable softmax."""
    z = logits - np.max(logits, axis=axis, keepdims=True)
    e = np.exp(z)
    return e / np.sum(e, axis=axis, keepdims=True)


def _data():
    try:
        import fastseq.data as data  # noqa: WPS433
    except ImportError:
        return None
    if not hasattr(data, "sequence_loss") or not hasattr(data, "sparse_softmax_cross_entropy_with_logits"):
        return None
    return data


def _check_labels(labels, shape, num_classes, what):
    labels = np.asarray(labels)
    if labels.dtype.kind not in "iu":
        raise TypeError(f"{what}: labels must be integers, got dtype {labels.dtype}")
    if labels.shape != shape:
        raise ValueError(f"{what}: labels must have shape {shape}, got {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"{what}: labels must be in [0, {num_classes}), got values in [{labels.min()}, {labels.max()}]")
    return labels.astype(np.int64, copy=False)


# ---------------------------------------------------------------- NumPy fallback
def _np_ce(logits, labels):
    z = logits - np.max(logits, axis=-1, keepdims=True)
    logsum = np.log(np.sum(np.exp(z), axis=-1))
    picked = np.take_along_axis(z, labels[..., None], axis=-1)[..., 0]
    return logsum - picked


def _np_ce_grad(logits, labels):
    p = softmax(logits)
    np.put_along_axis(p, labels[..., None], np.take_along_axis(p, labels[..., None], axis=-1) - 1, axis=-1)
    return p


# ---------------------------------------------------------------- public helpers
def classification_loss(logits, labels):
    """Mean sparse softmax cross-entropy over a batch and its gradient.

    logits ``[B, C]`` float; labels ``[B]`` int in ``[0, C)``.
    Returns ``(loss, d_logits [B, C])`` with ``loss`` a Python float.
    """
    logits = np.asarray(logits)
    if logits.ndim != 2:
        raise ValueError(f"classification_loss: logits must be [B, C], got shape {logits.shape}")
    labels = _check_labels(labels, logits.shape[:1], logits.shape[1], "classification_loss")
    n = max(logits.shape[0], 1)
    data = _data()
    if data is not None:
        from fastseq.grad import vjp

        losses, pullback = vjp(data.sparse_softmax_cross_entropy_with_logits, labels=labels, logits=logits)
        losses = np.asarray(losses)
        d = np.full(losses.shape, 1.0 / n, dtype=losses.dtype)
        d_logits = np.asarray(pullback(d).logits)
        return float(np.sum(losses, dtype=np.float64) / n), d_logits.astype(logits.dtype, copy=False)
    losses = _np_ce(logits, labels)
    d_logits = _np_ce_grad(logits, labels) / np.asarray(n, dtype=logits.dtype)
    return float(np.sum(losses, dtype=np.float64) / n), d_logits.astype(logits.dtype, copy=False)


def sequence_loss_and_grad(logits, targets, weights):
    """``tf.contrib.seq2seq.sequence_loss`` (averaged over steps and batch: the weighted sum
    of per-step cross-entropies divided by the sum of the weights) and its gradient.

    logits ``[B, T, C]``; targets ``[B, T]`` int; weights ``[B, T]`` float (a
    :func:`fastseq.sequence_mask` for a masked loss, ones for an unmasked one).
    Returns ``(loss, d_logits [B, T, C])``.
    """
    logits = np.asarray(logits)
    if logits.ndim != 3:
        raise ValueError(f"sequence_loss_and_grad: logits must be [B, T, C], got shape {logits.shape}")
    targets = _check_labels(targets, logits.shape[:2], logits.shape[2], "sequence_loss_and_grad")
    weights = np.asarray(weights, dtype=logits.dtype)
    if weights.shape != logits.shape[:2]:
        raise ValueError(f"sequence_loss_and_grad: weights must have shape {logits.shape[:2]}, got {weights.shape}")
    data = _data()
    if data is not None:
        from fastseq.grad import vjp

        loss, pullback = vjp(data.sequence_loss, logits, targets, weights)
        d_logits = np.asarray(pullback(np.ones((), dtype=logits.dtype)).logits)
        return float(np.asarray(loss)), d_logits.astype(logits.dtype, copy=False)
    total = np.sum(weights, dtype=logits.dtype) + np.asarray(1e-12, dtype=logits.dtype)
    losses = _np_ce(logits, targets)
    loss = np.sum(losses * weights) / total
    d_logits = _np_ce_grad(logits, targets) * (weights / total)[..., None]
    return float(loss), d_logits.astype(logits.dtype, copy=False)
