"""Cross-entropy losses on logits, with their gradients (registered with :func:`fastseq.vjp`).

Shapes: ``logits [..., C]`` with ``labels [...]`` for the sparse cross-entropy;
``logits [B, T, C]``, ``targets [B, T]``, ``weights [B, T]`` for :func:`sequence_loss`.
The work is done row by row by Cython kernels (``fastseq_kernels._xent``), split over a few
threads for large inputs; float32 and float64 are computed in their own precision, with the
log-sum-exp shifted by each row's maximum (no overflow for large logits).
"""
from __future__ import annotations

import numpy as np

from fastseq.grad import Grads, defvjp

from ._threads import run_rows as _run_rows

__all__ = [
    "sparse_softmax_cross_entropy_with_logits",
    "sparse_softmax_cross_entropy_grad",
    "sequence_loss",
    "sequence_loss_grad",
]

def _float_array(x, name):
    arr = np.asarray(x)
    if arr.dtype not in (np.float32, np.float64):
        if arr.dtype.kind == "f":
            raise TypeError(f"{name}: expected float32 or float64, got {arr.dtype}")
        raise TypeError(f"{name}: expected a float32 or float64 array, got dtype {arr.dtype}")
    return arr


def _label_array(x, name, shape, n_classes):
    arr = np.asarray(x)
    if arr.dtype.kind not in "iu":
        raise TypeError(f"{name}: expected integer class ids, got dtype {arr.dtype}")
    if arr.shape != shape:
        raise ValueError(f"{name}: expected shape {shape} (the logits' shape without the class axis), got {arr.shape}")
    arr = np.ascontiguousarray(arr, dtype=np.int64).reshape(-1)
    if arr.size:
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi >= n_classes:
            bad = lo if lo < 0 else hi
            raise ValueError(f"{name}: class ids must be in [0, {n_classes}), got {bad}")
    return arr


def _xent_forward(logits2d, labels1d):
    """``(loss [N], stats)`` for ``logits2d [N, C]`` (C-contiguous) and ``labels1d [N]``;
    ``stats`` = (row max, log-sum-exp of the shifted row) for the backward pass."""
    from fastseq_kernels import _xent

    n, c = logits2d.shape
    loss = np.empty(n, dtype=logits2d.dtype)
    mx = np.empty(n, dtype=logits2d.dtype)
    ls = np.empty(n, dtype=logits2d.dtype)
    if n:
        _run_rows(_xent.xent_forward, n, c, logits2d, labels1d, loss, mx, ls)
    return loss, (mx, ls)


def _xent_backward(logits2d, labels1d, stats, coef):
    """``coef[:, None] * (softmax(logits2d) - onehot(labels1d))`` as ``[N, C]``."""
    from fastseq_kernels import _xent

    n, c = logits2d.shape
    grad = np.empty_like(logits2d)
    coef = np.ascontiguousarray(coef, dtype=logits2d.dtype).reshape(-1)
    if n:
        _run_rows(_xent.xent_backward, n, c, logits2d, labels1d, stats[0], stats[1], coef, grad)
    return grad


def _prepare_xent(labels, logits):
    if labels is None or logits is None:
        raise ValueError("sparse_softmax_cross_entropy_with_logits: pass both labels= and logits=")
    lg = _float_array(logits, "logits")
    if lg.ndim < 1:
        raise ValueError(f"logits: expected rank >= 1 ([..., num_classes]), got shape {lg.shape}")
    if lg.shape[-1] == 0:
        raise ValueError("logits: the class axis (last) must not be empty")
    lb = _label_array(labels, "labels", lg.shape[:-1], lg.shape[-1])
    lg2 = np.ascontiguousarray(lg).reshape(-1, lg.shape[-1])
    return lg, lb, lg2


def sparse_softmax_cross_entropy_with_logits(labels=None, logits=None):
    """``-log softmax(logits)[labels]`` per example (``tf.nn.sparse_softmax_cross_entropy_with_logits``).

    ``logits [..., C]`` float32/float64, ``labels [...]`` integer class ids in ``[0, C)``
    (out-of-range ids raise ValueError, as TensorFlow does on the CPU). Returns ``[...]`` in
    the logits' dtype. Gradient: ``fastseq.vjp`` or :func:`sparse_softmax_cross_entropy_grad`.
    """
    lg, lb, lg2 = _prepare_xent(labels, logits)
    loss, _ = _xent_forward(lg2, lb)
    return loss.reshape(lg.shape[:-1])


def _xent_vjp(labels=None, logits=None):
    lg, lb, lg2 = _prepare_xent(labels, logits)
    loss, lse = _xent_forward(lg2, lb)
    out_shape = lg.shape[:-1]

    def pullback(d_loss=None):
        if d_loss is None:
            coef = np.ones(lb.shape[0], dtype=lg.dtype)
        else:
            d = np.asarray(d_loss, dtype=lg.dtype)
            if d.shape != out_shape:
                d = np.broadcast_to(d, out_shape)
            coef = d.reshape(-1)
        grad = _xent_backward(lg2, lb, lse, coef).reshape(lg.shape)
        return Grads(logits=grad, labels=None)

    return loss.reshape(out_shape), pullback


def sparse_softmax_cross_entropy_grad(labels=None, logits=None, d_loss=None):
    """``(loss, d_logits)``: the loss and the gradient of ``sum(d_loss * loss)`` (``d_loss``
    defaults to ones) with respect to the logits."""
    loss, pullback = _xent_vjp(labels=labels, logits=logits)
    return loss, pullback(d_loss).logits


# ---------------------------------------------------------------- sequence_loss

def _div_no_nan(x, y):
    y_safe = np.where(y == 0, 1, y)
    return np.where(y == 0, 0, x / y_safe).astype(np.result_type(x, y), copy=False)


def _resolve_flags(average_across_timesteps, average_across_batch, sum_over_timesteps, sum_over_batches,
                   sum_over_batch):
    if sum_over_batch is not None:
        sum_over_batches = bool(sum_over_batch) or sum_over_batches
    if average_across_timesteps and sum_over_timesteps:
        raise ValueError("average_across_timesteps and sum_over_timesteps cannot both be True")
    if average_across_batch and sum_over_batches:
        raise ValueError("average_across_batch and sum_over_batches cannot both be True")
    return bool(average_across_timesteps), bool(average_across_batch), bool(sum_over_timesteps), bool(sum_over_batches)


def _prepare_sequence_loss(logits, targets, weights, softmax_loss_function):
    if softmax_loss_function is not None:
        raise TypeError("softmax_loss_function: only None (sparse softmax cross-entropy) is supported")
    lg = _float_array(logits, "logits")
    if lg.ndim != 3:
        raise ValueError(f"logits: expected a [batch_size, sequence_length, num_classes] array, got shape {lg.shape}")
    if lg.shape[2] == 0:
        raise ValueError("logits: num_classes (the last axis) must not be empty")
    tg = np.asarray(targets)
    if tg.ndim != 2:
        raise ValueError(f"targets: expected a [batch_size, sequence_length] array, got shape {tg.shape}")
    tg = _label_array(tg, "targets", lg.shape[:2], lg.shape[2])
    w = np.asarray(weights)
    if w.ndim != 2:
        raise ValueError(f"weights: expected a [batch_size, sequence_length] array, got shape {w.shape}")
    if w.shape != lg.shape[:2]:
        raise ValueError(f"weights: expected shape {lg.shape[:2]} (logits' [batch_size, sequence_length]), got {w.shape}")
    if w.dtype.kind not in "biuf":
        raise TypeError(f"weights: expected numeric weights, got dtype {w.dtype}")
    w = w.astype(lg.dtype, copy=False)
    lg2 = np.ascontiguousarray(lg).reshape(-1, lg.shape[2])
    return lg, tg, w, lg2


def _sequence_loss_vjp(logits, targets, weights, average_across_timesteps=True, average_across_batch=True,
                       sum_over_timesteps=False, sum_over_batches=False, softmax_loss_function=None,
                       name=None, sum_over_batch=None):
    at, ab, st, sb = _resolve_flags(average_across_timesteps, average_across_batch, sum_over_timesteps,
                                    sum_over_batches, sum_over_batch)
    lg, tg, w, lg2 = _prepare_sequence_loss(logits, targets, weights, softmax_loss_function)
    dtype = lg.dtype
    B, T = w.shape
    ce_flat, lse = _xent_forward(lg2, tg)
    ce = ce_flat.reshape(B, T)
    wce = ce * w
    # d(result)/d(wce) is `scale` (broadcast against [B, T]); d(result)/d(w) = dwce*ce + extra
    if at and ab:
        total = w.sum(dtype=dtype)
        result = _div_no_nan(wce.sum(dtype=dtype), total)
        mode = ("all", total)
    elif st and sb:
        count = np.asarray(np.count_nonzero(w), dtype=dtype)
        result = _div_no_nan(wce.sum(dtype=dtype), count)
        mode = ("all_count", count)
    elif at or ab:
        axis = 0 if ab else 1
        total = w.sum(axis=axis, dtype=dtype)
        result = _div_no_nan(wce.sum(axis=axis, dtype=dtype), total)
        mode = ("axis", axis, total)
    elif st or sb:
        axis = 0 if sb else 1
        count = np.count_nonzero(w, axis=axis).astype(dtype)
        result = _div_no_nan(wce.sum(axis=axis, dtype=dtype), count)
        mode = ("axis_count", axis, count)
    else:
        result = wce
        mode = ("none",)
    result = np.asarray(result, dtype=dtype)
    if result.ndim == 0:
        result = result[()]

    def pullback(d_loss=None):
        g = np.ones(np.shape(result), dtype=dtype) if d_loss is None else np.asarray(d_loss, dtype=dtype)
        if g.shape != np.shape(result):
            raise ValueError(f"d_loss: expected shape {np.shape(result)} (the loss' shape), got {g.shape}")
        kind = mode[0]
        if kind in ("all", "all_count"):
            denom = mode[1]
            d_wce = np.full((B, T), _div_no_nan(g, denom), dtype=dtype)
            if kind == "all":
                d_w = _div_no_nan(g * (ce - result), denom) * np.ones((B, T), dtype)
            else:
                d_w = d_wce * ce
        elif kind in ("axis", "axis_count"):
            axis, denom = mode[1], mode[2]
            gx = np.expand_dims(g, axis)
            dx = np.expand_dims(denom, axis)
            d_wce = np.broadcast_to(_div_no_nan(gx, dx), (B, T))
            if kind == "axis":
                rx = np.expand_dims(result, axis)
                d_w = _div_no_nan(gx * (ce - rx), dx)
            else:
                d_w = d_wce * ce
        else:
            d_wce = g
            d_w = g * ce
        coef = d_wce * w
        d_logits = _xent_backward(lg2, tg, lse, coef).reshape(lg.shape)
        return Grads(logits=d_logits, targets=None, weights=np.ascontiguousarray(d_w, dtype=dtype))

    return result, pullback


def sequence_loss(logits, targets, weights, average_across_timesteps=True, average_across_batch=True,
                  sum_over_timesteps=False, sum_over_batches=False, softmax_loss_function=None, name=None,
                  sum_over_batch=None):
    """Weighted cross-entropy of a sequence of logits (``tf.contrib.seq2seq.sequence_loss``).

    ``logits [B, T, C]`` float32/float64, ``targets [B, T]`` class ids, ``weights [B, T]``
    (typically ``sequence_mask(lengths, T, logits.dtype)``). With ``ce = weights * xent``:

    - ``average_across_timesteps and average_across_batch`` (default): ``sum(ce) / sum(weights)``
    - ``sum_over_timesteps and sum_over_batches``: ``sum(ce) / count_nonzero(weights)``
    - one ``average_across_*``: sum over that axis divided by the summed weights, ``[T]`` when
      averaging over the batch, else ``[B]``
    - one ``sum_over_*``: sum over that axis divided by the non-zero weight count on it
    - none: ``ce`` itself, ``[B, T]``

    Divisions by zero give 0 (``div_no_nan``), as TensorFlow. ``sum_over_batch`` (TF >= 1.12's
    spelling) is accepted as an alias of ``sum_over_batches``. Gradients with respect to
    ``logits`` and ``weights``: ``fastseq.vjp(fastseq.sequence_loss, logits, targets, weights)``.
    """
    result, _ = _sequence_loss_vjp(logits, targets, weights, average_across_timesteps, average_across_batch,
                                   sum_over_timesteps, sum_over_batches, softmax_loss_function, name,
                                   sum_over_batch)
    return result


def sequence_loss_grad(logits, targets, weights, d_loss=None, **options):
    """``(loss, grads)`` with ``grads.logits`` and ``grads.weights``: the loss of
    :func:`sequence_loss` (same options) and the gradients of ``sum(d_loss * loss)``
    (``d_loss`` defaults to ones)."""
    loss, pullback = _sequence_loss_vjp(logits, targets, weights, **options)
    return loss, pullback(d_loss)


defvjp(sparse_softmax_cross_entropy_with_logits, _xent_vjp)
defvjp(sequence_loss, _sequence_loss_vjp)
