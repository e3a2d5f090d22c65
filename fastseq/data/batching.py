"""Padded batch iterators: plain (:func:`padded_batches`) and bucketed by length
(:func:`bucket_by_sequence_length`, ``tf.data``'s semantics).

Each batch is a :class:`Batch` ``(inputs [b, T, ...], lengths [b], labels)`` where ``T`` is
the longest sequence in the batch and ``labels`` is ``None``, ``[b, ...]`` (one label per
example) or ``[b, T, ...]`` padded like the inputs (one label per step).

Labels count as per-step when ``labels`` is a list (or tuple) whose every entry is an
array-like with as many entries as its sequence has steps; anything else (a NumPy array
``[N, ...]``, a list of scalars) is one label per example.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .padding import pad_sequences

__all__ = ["Batch", "padded_batches", "bucket_by_sequence_length"]


class Batch(NamedTuple):
    inputs: np.ndarray
    lengths: np.ndarray
    labels: object = None


def _as_list(sequences):
    if isinstance(sequences, (str, bytes)) or not hasattr(sequences, "__len__"):
        raise TypeError(f"sequences: expected a list of arrays [T_i, ...], got {type(sequences).__name__}")
    return list(sequences)


def _seq_lengths(seqs):
    lens = np.empty(len(seqs), dtype=np.int64)
    for i, s in enumerate(seqs):
        try:
            lens[i] = len(s)
        except TypeError:
            raise TypeError(f"sequences[{i}]: expected an array-like [T, ...], got {type(s).__name__}") from None
    return lens


def _labels(labels, seqs, lens):
    """Returns (kind, labels) with kind None, 'example' or 'step'."""
    if labels is None:
        return None, None
    if not isinstance(labels, np.ndarray) and isinstance(labels, (list, tuple)):
        if len(labels) != len(seqs):
            raise ValueError(f"labels: expected {len(seqs)} entries (one per sequence), got {len(labels)}")
        per_step = len(labels) > 0
        for i, lab in enumerate(labels):
            if np.ndim(lab) == 0 or len(lab) != lens[i]:
                per_step = False
                break
        if per_step:
            return "step", list(labels)
    arr = np.asarray(labels)
    if arr.ndim == 0 or arr.shape[0] != len(seqs):
        raise ValueError(f"labels: expected {len(seqs)} entries (one per sequence), got shape {arr.shape}")
    if arr.dtype.kind not in "biufSU":
        raise TypeError(f"labels: expected numeric (or string) labels, got dtype {arr.dtype}")
    return "example", arr


def _check_seed(seed):
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer))):
        raise TypeError(f"seed: expected an int or None, got {seed!r}")


def _make_batch(seqs, kind, labels, idx, dtype, label_padding):
    chunk = [seqs[i] for i in idx]
    inputs, lengths = pad_sequences(chunk, dtype=dtype)
    if kind is None:
        lab = None
    elif kind == "example":
        lab = labels[np.asarray(idx)]
    else:
        lab, _ = pad_sequences([labels[i] for i in idx], maxlen=inputs.shape[1], value=label_padding)
    return Batch(inputs, lengths, lab)


def padded_batches(sequences, labels=None, batch_size=32, shuffle=False, seed=None, drop_remainder=False,
                   dtype=None, label_padding=0):
    """Yield :class:`Batch` es of ``batch_size`` examples in order (shuffled once up front when
    ``shuffle``, reproducibly with ``seed``), each padded to its own longest sequence (what
    ``tf.train.batch(dynamic_pad=True)`` / ``Dataset.padded_batch`` do). The last, smaller
    batch is dropped when ``drop_remainder``."""
    seqs = _as_list(sequences)
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
    _check_seed(seed)
    lens = _seq_lengths(seqs)
    kind, labs = _labels(labels, seqs, lens)
    order = np.arange(len(seqs))
    if shuffle:
        order = np.random.default_rng(seed).permutation(len(seqs))

    def gen():
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            if len(idx) < batch_size and drop_remainder:
                return
            yield _make_batch(seqs, kind, labs, idx, dtype, label_padding)

    return gen()


def bucket_by_sequence_length(sequences, labels, bucket_boundaries, bucket_batch_sizes, shuffle=True, seed=None,
                              drop_remainder=False, dtype=None, label_padding=0):
    """Yield :class:`Batch` es of examples of similar length (``tf.data.experimental.bucket_by_sequence_length``).

    ``bucket_boundaries`` ``[b_0 < b_1 < ...]`` (positive ints) define buckets ``[0, b_0)``,
    ``[b_0, b_1)``, ..., ``[b_last, inf)`` on the sequence length; ``bucket_batch_sizes`` has
    one batch size per bucket (``len(bucket_boundaries) + 1``). Examples are taken in order
    (after one up-front shuffle when ``shuffle``; ``seed`` makes it reproducible); an example
    goes to its bucket, and a bucket that reaches its batch size is emitted. At the end the
    partly filled buckets are emitted in bucket order (dropped when ``drop_remainder``). With
    ``shuffle=False`` the batches are exactly tf.data's (with its default
    ``pad_to_bucket_boundary=False``): each batch is padded to its longest sequence.
    """
    seqs = _as_list(sequences)
    bounds = list(bucket_boundaries)
    for b in bounds:
        if isinstance(b, bool) or not isinstance(b, (int, np.integer)) or b < 1:
            raise ValueError(f"bucket_boundaries: expected positive ints, got {bucket_boundaries!r}")
    if any(b2 <= b1 for b1, b2 in zip(bounds, bounds[1:])):
        raise ValueError(f"bucket_boundaries: expected strictly increasing values, got {bounds}")
    sizes = list(bucket_batch_sizes)
    if len(sizes) != len(bounds) + 1:
        raise ValueError(
            f"bucket_batch_sizes: expected len(bucket_boundaries) + 1 = {len(bounds) + 1} entries, got {len(sizes)}")
    for s in sizes:
        if isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 1:
            raise ValueError(f"bucket_batch_sizes: expected positive ints, got {sizes!r}")
    _check_seed(seed)
    lens = _seq_lengths(seqs)
    kind, labs = _labels(labels, seqs, lens)
    order = np.arange(len(seqs))
    if shuffle:
        order = np.random.default_rng(seed).permutation(len(seqs))
    bucket_of = np.searchsorted(np.asarray(bounds, dtype=np.int64), lens, side="right")

    def gen():
        pending = [[] for _ in sizes]
        for i in order:
            b = bucket_of[i]
            pending[b].append(i)
            if len(pending[b]) == sizes[b]:
                yield _make_batch(seqs, kind, labs, pending[b], dtype, label_padding)
                pending[b] = []
        if not drop_remainder:
            for b, idx in enumerate(pending):
                if idx:
                    yield _make_batch(seqs, kind, labs, idx, dtype, label_padding)

    return gen()
