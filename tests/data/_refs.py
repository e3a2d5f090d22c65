"""Plain-Python / NumPy references the data routines are checked against."""
import numpy as np


def pad_reference(seqs, maxlen, dtype, padding, truncating, value):
    """Keras pad_sequences semantics, written as a plain loop."""
    lengths = [len(s) for s in seqs]
    T = max(lengths, default=0) if maxlen is None else maxlen
    sample = ()
    for s in seqs:
        if len(s):
            sample = np.asarray(s).shape[1:]
            break
    out = np.full((len(seqs), T) + sample, value, dtype=dtype)
    for i, s in enumerate(seqs):
        if not len(s):
            continue
        s = np.asarray(s)
        trunc = s[-T:] if truncating == "pre" else s[:T]
        if T == 0:
            trunc = s[:0]
        if len(trunc) == 0:
            continue
        if padding == "post":
            out[i, : len(trunc)] = trunc
        else:
            out[i, -len(trunc):] = trunc
    return out, np.minimum(lengths, T)


def log_softmax64(logits):
    x = np.asarray(logits, dtype=np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def xent_reference(labels, logits):
    ls = log_softmax64(logits)
    return -np.take_along_axis(ls, np.asarray(labels)[..., None], axis=-1)[..., 0]


def div_no_nan(x, y):
    y = np.asarray(y, dtype=np.float64)
    return np.where(y == 0, 0.0, np.asarray(x, dtype=np.float64) / np.where(y == 0, 1.0, y))


def sequence_loss_reference(logits, targets, weights, at=True, ab=True, st=False, sb=False):
    """tf.contrib.seq2seq.sequence_loss (TF >= 1.12, div_no_nan) in float64."""
    w = np.asarray(weights, dtype=np.float64)
    ce = xent_reference(targets, logits) * w
    if at and ab:
        return div_no_nan(ce.sum(), w.sum())
    if st and sb:
        return div_no_nan(ce.sum(), np.count_nonzero(w))
    if at or ab:
        axis = 0 if ab else 1
        return div_no_nan(ce.sum(axis=axis), w.sum(axis=axis))
    if st or sb:
        axis = 0 if sb else 1
        return div_no_nan(ce.sum(axis=axis), np.count_nonzero(w, axis=axis))
    return ce


def bucket_reference(lengths, boundaries, batch_sizes, drop_remainder):
    """Index lists of tf.data's bucket_by_sequence_length (group_by_window, flush in key order)."""
    pending = {}
    out = []
    for i, n in enumerate(lengths):
        b = 0
        while b < len(boundaries) and n >= boundaries[b]:
            b += 1
        pending.setdefault(b, []).append(i)
        if len(pending[b]) == batch_sizes[b]:
            out.append(pending.pop(b))
    if not drop_remainder:
        for b in sorted(pending):
            out.append(pending[b])
    return out
