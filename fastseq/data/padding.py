"""Padding, masks, reversal and last-step selection for batches of variable-length sequences.

Notation: ``B`` batch, ``T`` steps, ``...`` the per-step shape. Batch-major arrays are
``[B, T, ...]``, time-major ``[T, B, ...]``. All routines take and return NumPy arrays
(pass ``np.asarray(t)`` for a tensor of another framework).
"""
from __future__ import annotations

import numpy as np

__all__ = ["pad_sequences", "unpad", "sequence_mask", "reverse_sequence", "last_relevant"]


def _lengths_array(lengths, name, allow_negative=False):
    """Integer lengths as int64; TypeError / ValueError naming ``name``."""
    arr = np.asarray(lengths)
    if arr.dtype == object or arr.dtype.kind not in "iub":
        if arr.dtype.kind == "f" and arr.size and np.all(np.isfinite(arr)) and np.all(arr == np.round(arr)):
            arr = arr.astype(np.int64)
        elif arr.dtype.kind == "f" and arr.size == 0:
            arr = arr.astype(np.int64)
        else:
            raise TypeError(f"{name}: expected integer lengths, got dtype {arr.dtype}")
    arr = arr.astype(np.int64, copy=False)
    if not allow_negative and arr.size and arr.min() < 0:
        raise ValueError(f"{name}: lengths must be >= 0, got {int(arr.min())}")
    return arr


def _check_choice(value, name):
    if value not in ("pre", "post"):
        raise ValueError(f'{name}: expected "pre" or "post", got {value!r}')


def pad_sequences(sequences, maxlen=None, dtype=None, padding="post", truncating="post", value=0.0):
    """Pad a list of sequences ``[T_i, ...]`` into one array ``[B, T, ...]``.

    The options follow ``keras.utils.pad_sequences``: ``maxlen`` (default: the longest
    sequence) cuts longer sequences, from the front (``truncating="pre"``) or the back
    (``"post"``); ``padding="post"`` puts the ``value`` padding after each sequence,
    ``"pre"`` before it. Every step of every non-empty sequence must have the same shape;
    empty sequences become rows of padding. Differences from Keras: ``padding`` and
    ``truncating`` default to ``"post"`` (what ``dynamic_rnn`` with ``sequence_length``
    expects), ``dtype=None`` keeps the inputs' common NumPy dtype instead of ``int32``, and
    non-numeric data is refused.

    Returns ``(padded, lengths)``: ``padded [B, T, ...]`` and ``lengths [B]`` (int64), the
    number of real steps of each row after truncation (what ``sequence_length`` wants).
    """
    if isinstance(sequences, np.ndarray):
        if sequences.dtype != object and sequences.ndim == 0:
            raise ValueError("sequences: expected a list of arrays [T_i, ...], got a scalar")
        seqs = list(sequences)
    elif isinstance(sequences, (str, bytes)):
        raise TypeError(f"sequences: expected a list of arrays [T_i, ...], got {type(sequences).__name__}")
    else:
        try:
            seqs = list(sequences)
        except TypeError:
            raise TypeError(
                f"sequences: expected a list of arrays [T_i, ...], got {type(sequences).__name__}") from None
    _check_choice(padding, "padding")
    _check_choice(truncating, "truncating")
    if maxlen is not None:
        if isinstance(maxlen, bool) or not isinstance(maxlen, (int, np.integer)):
            raise TypeError(f"maxlen: expected a non-negative int or None, got {maxlen!r}")
        if maxlen < 0:
            raise ValueError(f"maxlen: expected a non-negative int or None, got {maxlen}")
    if dtype is not None:
        try:
            dtype = np.dtype(dtype)
        except TypeError:
            raise TypeError(f"dtype: expected a NumPy dtype or None, got {dtype!r}") from None
    from fastseq_kernels import _padding

    arrays, lengths, dtype, sample_shape = _padding.collect(seqs, dtype)
    T = int(lengths.max()) if len(lengths) else 0
    if maxlen is not None:
        T = int(maxlen)
    try:
        fill = np.asarray(value)
        if fill.dtype.kind not in "biuf" or fill.ndim != 0:
            raise TypeError
        pad_row = np.full(sample_shape, fill, dtype=dtype).tobytes()
    except TypeError:
        raise TypeError(f"value: expected a number, got {value!r}") from None
    # All-zero padding: np.zeros gets pages the OS zeroes lazily, so padding costs nothing
    # to write and whole pages of padding are never touched.
    zeroed = pad_row.count(0) == len(pad_row)
    out = (np.zeros if zeroed else np.empty)((len(arrays), T) + sample_shape, dtype=dtype)
    if out.size:
        from ._threads import run_rows

        run_rows(_padding.pad_into, len(arrays), out[0].size, arrays, lengths, out, padding == "pre",
                 truncating == "pre", pad_row, out_is_zeroed=zeroed)
    return out, np.minimum(lengths, T)


def unpad(padded, lengths, time_major=False):
    """The inverse of :func:`pad_sequences` (post-padding): a list of ``padded[b, :lengths[b]]``.

    ``padded`` is ``[B, T, ...]`` (``[T, B, ...]`` when ``time_major``); each returned array
    is a copy. Raises ValueError when a length is negative or longer than ``T``.
    """
    x = np.asarray(padded)
    if x.ndim < 2:
        raise ValueError(f"padded: expected an array of rank >= 2 ([B, T, ...]), got shape {x.shape}")
    if time_major:
        x = np.swapaxes(x, 0, 1)
    lens = _lengths_array(lengths, "lengths")
    if lens.shape != (x.shape[0],):
        raise ValueError(f"lengths: expected shape ({x.shape[0]},) (one per batch row), got {lens.shape}")
    if lens.size and lens.max() > x.shape[1]:
        raise ValueError(f"lengths: every length must be <= T = {x.shape[1]}, got {int(lens.max())}")
    return [x[b, : lens[b]].copy() for b in range(x.shape[0])]


def sequence_mask(lengths, maxlen=None, dtype=bool):
    """``mask[..., t] = t < lengths[...]``, shape ``lengths.shape + [maxlen]`` (``tf.sequence_mask``).

    ``maxlen`` defaults to ``max(lengths)`` (0 for no lengths). As in TensorFlow, lengths
    above ``maxlen`` give all-true rows and negative lengths all-false rows.
    """
    lens = _lengths_array(lengths, "lengths", allow_negative=True)
    if maxlen is None:
        maxlen = int(lens.max()) if lens.size else 0
        maxlen = max(maxlen, 0)
    else:
        m = np.asarray(maxlen)
        if m.ndim != 0 or m.dtype.kind not in "iu":
            raise TypeError(f"maxlen: expected a scalar integer, got {maxlen!r}")
        maxlen = int(m)
        if maxlen < 0:
            raise ValueError(f"maxlen: expected a non-negative integer, got {maxlen}")
    mask = np.arange(maxlen, dtype=np.int64) < lens[..., None]
    return mask if np.dtype(dtype) == np.bool_ else mask.astype(dtype)


def reverse_sequence(x, seq_lengths, seq_axis=1, batch_axis=0):
    """Reverse the first ``seq_lengths[b]`` entries along ``seq_axis`` of each slice ``b`` of
    ``batch_axis``; the rest stays in place (``tf.reverse_sequence``). Returns a new array."""
    x = np.asarray(x)
    nd = x.ndim
    for name, ax in (("seq_axis", seq_axis), ("batch_axis", batch_axis)):
        if isinstance(ax, bool) or not isinstance(ax, (int, np.integer)) or not -nd <= ax < nd:
            raise ValueError(f"{name}: expected an axis in [{-nd}, {nd}) for an input of rank {nd}, got {ax!r}")
    seq_axis %= nd
    batch_axis %= nd
    if seq_axis == batch_axis:
        raise ValueError(f"seq_axis and batch_axis must differ, both are {seq_axis}")
    lens = _lengths_array(seq_lengths, "seq_lengths")
    B, T = x.shape[batch_axis], x.shape[seq_axis]
    if lens.shape != (B,):
        raise ValueError(f"seq_lengths: expected shape ({B},) (input.shape[batch_axis]), got {lens.shape}")
    if lens.size and lens.max() > T:
        raise ValueError(f"seq_lengths: every length must be <= input.shape[seq_axis] = {T}, got {int(lens.max())}")
    t = np.arange(T, dtype=np.int64)
    idx = np.where(t[None, :] < lens[:, None], lens[:, None] - 1 - t[None, :], t[None, :])  # [B, T]
    moved = np.moveaxis(x, (batch_axis, seq_axis), (0, 1))  # [B, T, rest]
    out = moved[np.arange(B)[:, None], idx]
    return np.ascontiguousarray(np.moveaxis(out, (0, 1), (batch_axis, seq_axis)))


def last_relevant(outputs, lengths, time_major=False):
    """The output at step ``lengths[b] - 1`` of each row: ``[B, ...]`` from ``[B, T, ...]``
    (``[T, B, ...]`` when ``time_major``).

    Rows of length 0 have no relevant step and get zeros (the tutorials' flat ``tf.gather``
    trick would read the previous row's last step there). Lengths above ``T`` raise ValueError.
    """
    x = np.asarray(outputs)
    if x.ndim < 2:
        raise ValueError(f"outputs: expected an array of rank >= 2 ([B, T, ...]), got shape {x.shape}")
    if time_major:
        x = np.swapaxes(x, 0, 1)
    B, T = x.shape[0], x.shape[1]
    lens = _lengths_array(lengths, "lengths")
    if lens.shape != (B,):
        raise ValueError(f"lengths: expected shape ({B},) (one per batch row), got {lens.shape}")
    if lens.size and lens.max() > T:
        raise ValueError(f"lengths: every length must be <= T = {T}, got {int(lens.max())}")
    idx = np.maximum(lens - 1, 0)
    out = x[np.arange(B), idx]
    if np.any(lens == 0):
        out = out.copy()
        out[lens == 0] = 0
    return out
