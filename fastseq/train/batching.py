"""Checking variable-length data and cutting it into padded mini-batches.

Padding goes through :func:`fastseq.data.pad_sequences` when the data routines are
installed (a plain NumPy loop otherwise); lengths are kept and passed to the RNN as
``sequence_length``.
"""

from __future__ import annotations

import numpy as np

__all__ = ["check_sequences", "pad_batch", "batch_indices"]


def check_sequences(sequences, name="sequences", feature_size=None):
    """A list of ``[T_i, I]`` float arrays (1-D ``[T_i]`` becomes ``[T_i, 1]``); every
    ``T_i >= 1`` and one feature size. Returns ``(list, lengths int64 [N], I)``."""
    if isinstance(sequences, np.ndarray) and sequences.dtype != object:
        if sequences.ndim == 2:
            sequences = sequences[..., None]
        if sequences.ndim != 3:
            raise ValueError(f"{name}: an array must be [N, T, I] (or [N, T]), got shape {sequences.shape}")
        sequences = list(sequences)
    elif not isinstance(sequences, (list, tuple)) and not (isinstance(sequences, np.ndarray)):
        raise TypeError(f"{name} must be a list of [T_i, I] arrays, got {type(sequences).__name__}")
    out = []
    for i, s in enumerate(sequences):
        a = np.asarray(s)
        if a.ndim == 1:
            a = a[:, None]
        if a.ndim != 2:
            raise ValueError(f"{name}[{i}] must be [T_i, I] (or [T_i]), got shape {a.shape}")
        if a.dtype.kind not in "biuf":
            raise TypeError(f"{name}[{i}] must be numeric, got dtype {a.dtype}")
        if a.shape[0] < 1:
            raise ValueError(f"{name}[{i}] is empty: every sequence needs at least one step")
        if feature_size is None:
            feature_size = a.shape[1]
        elif a.shape[1] != feature_size:
            raise ValueError(f"{name}[{i}] has {a.shape[1]} features, expected {feature_size}")
        out.append(a)
    if not out:
        raise ValueError(f"{name} is empty")
    lengths = np.array([a.shape[0] for a in out], dtype=np.int64)
    return out, lengths, int(feature_size)


def _pad_numpy(seqs, dtype, value=0):
    T = max(len(s) for s in seqs)
    out = np.full((len(seqs), T) + np.shape(seqs[0])[1:], value, dtype=dtype)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = s
    return out


def pad_batch(seqs, dtype, value=0):
    """Pad a list of ``[T_i, ...]`` arrays to ``[B, max T_i, ...]`` (post padding)."""
    try:
        from fastseq.data import pad_sequences
    except ImportError:
        return _pad_numpy(seqs, dtype, value)
    padded = pad_sequences(list(seqs), dtype=np.dtype(dtype), padding="post", value=value)
    if isinstance(padded, tuple):
        padded = padded[0]
    return np.asarray(padded)


def batch_indices(n, batch_size, shuffle, rng):
    """Index arrays of the mini-batches of one epoch (the last one may be smaller)."""
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    order = rng.permutation(n) if shuffle else np.arange(n)
    return [order[i: i + batch_size] for i in range(0, n, int(batch_size))]
