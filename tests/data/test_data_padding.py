import numpy as np
import pytest

import fastseq
from fastseq.data import last_relevant, pad_sequences, reverse_sequence, sequence_mask, unpad

from ._refs import pad_reference


def _random_seqs(rng, n, feat, dtype, max_len=7, with_empty=True):
    lens = rng.integers(0 if with_empty else 1, max_len + 1, n)
    return [rng.standard_normal((int(L),) + feat).astype(dtype) for L in lens]


@pytest.mark.parametrize("padding", ["pre", "post"])
@pytest.mark.parametrize("truncating", ["pre", "post"])
@pytest.mark.parametrize("maxlen", [None, 0, 3, 9])
@pytest.mark.parametrize("feat", [(), (4,), (2, 3)])
def test_pad_matches_reference(dtype, padding, truncating, maxlen, feat):
    rng = np.random.default_rng(hash((padding, truncating, maxlen, feat)) % 2**32)
    seqs = _random_seqs(rng, 9, feat, dtype)
    got, lens = pad_sequences(seqs, maxlen=maxlen, padding=padding, truncating=truncating, value=-2.5)
    ref, ref_lens = pad_reference(seqs, maxlen, dtype, padding, truncating, -2.5)
    assert got.dtype == dtype
    np.testing.assert_array_equal(got, ref)
    np.testing.assert_array_equal(lens, ref_lens)


def test_pad_lists_of_ints_and_dtype():
    got, lens = pad_sequences([[1, 2, 3], [4], []], dtype="int32", value=7)
    ref, _ = pad_reference([[1, 2, 3], [4], []], None, np.int32, "post", "post", 7)
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, ref)
    np.testing.assert_array_equal(lens, [3, 1, 0])
    # inferred dtype: the common type of the inputs
    mixed, _ = pad_sequences([np.arange(3, dtype=np.int16), np.ones(2, np.float32)])
    assert mixed.dtype == np.float32
    # non-contiguous input and a generator
    x = np.arange(20.0).reshape(10, 2)[::2]
    got, _ = pad_sequences(s for s in [x, x[:1]])
    np.testing.assert_array_equal(got[0], x)


def test_unpad_roundtrip(dtype):
    rng = np.random.default_rng(1)
    seqs = _random_seqs(rng, 6, (3,), dtype)
    padded, lens = pad_sequences(seqs)
    back = unpad(padded, lens)
    for a, b in zip(seqs, back):
        np.testing.assert_array_equal(a, b)
    back_tm = unpad(np.swapaxes(padded, 0, 1), lens, time_major=True)
    for a, b in zip(seqs, back_tm):
        np.testing.assert_array_equal(a, b)


def test_pad_bad_input():
    with pytest.raises(ValueError, match=r"sequences\[1\].*per-step shape \(3,\).*\(2,\)"):
        pad_sequences([np.zeros((2, 2)), np.zeros((1, 3))])
    with pytest.raises(ValueError, match=r"sequences\[0\].*ragged"):
        pad_sequences([[[1, 2], [3]]])
    with pytest.raises(TypeError, match=r"sequences\[1\].*numeric"):
        pad_sequences([[1, 2], ["a", "b"]])
    with pytest.raises(ValueError, match="padding"):
        pad_sequences([[1]], padding="middle")
    with pytest.raises(ValueError, match="truncating"):
        pad_sequences([[1]], truncating="x")
    with pytest.raises(ValueError, match="maxlen"):
        pad_sequences([[1]], maxlen=-1)
    with pytest.raises(TypeError, match="maxlen"):
        pad_sequences([[1]], maxlen=2.5)
    with pytest.raises(ValueError, match=r"sequences\[0\].*scalar"):
        pad_sequences([3, 4])
    with pytest.raises(TypeError, match="value"):
        pad_sequences([[1]], value="x")
    with pytest.raises(TypeError, match="sequences"):
        pad_sequences("abc")
    with pytest.raises(ValueError, match=r"lengths.*<= T = 2"):
        unpad(np.zeros((2, 2)), [1, 3])


def test_sequence_mask_matches_loop():
    lengths = np.array([[0, 3], [5, 1]])
    for maxlen in (None, 4, 0):
        m = sequence_mask(lengths, maxlen)
        T = 5 if maxlen is None else maxlen
        ref = np.zeros(lengths.shape + (T,), bool)
        for idx in np.ndindex(lengths.shape):
            ref[idx][: lengths[idx]] = True
        np.testing.assert_array_equal(m, ref)
    f = sequence_mask([2, 0], 3, dtype=np.float32)
    assert f.dtype == np.float32
    np.testing.assert_array_equal(f, [[1, 1, 0], [0, 0, 0]])
    assert sequence_mask([], None).shape == (0, 0)
    with pytest.raises(TypeError, match="lengths"):
        sequence_mask([1.5, 2])
    with pytest.raises(ValueError, match="maxlen"):
        sequence_mask([1], -1)


@pytest.mark.parametrize("axes", [(1, 0), (0, 1), (2, 0), (1, 2)])
def test_reverse_sequence_matches_loop(dtype, axes):
    seq_axis, batch_axis = axes
    rng = np.random.default_rng(2)
    x = rng.standard_normal((4, 5, 3)).astype(dtype)
    B, T = x.shape[batch_axis], x.shape[seq_axis]
    lens = rng.integers(0, T + 1, B)
    got = reverse_sequence(x, lens, seq_axis=seq_axis, batch_axis=batch_axis)
    ref = x.copy()
    for b in range(B):
        src = np.take(x, b, axis=batch_axis)  # batch axis removed
        sa = seq_axis - (1 if seq_axis > batch_axis else 0)
        part = np.take(src, np.arange(lens[b]), axis=sa)
        rev = np.flip(part, axis=sa)
        sl = [slice(None)] * 3
        sl[batch_axis] = b
        sl2 = [slice(None)] * 2
        sl2[sa] = slice(0, lens[b])
        target = ref[tuple(sl)]
        target[tuple(sl2)] = rev
    np.testing.assert_array_equal(got, ref)
    with pytest.raises(ValueError, match=r"seq_lengths.*<= input.shape\[seq_axis\]"):
        reverse_sequence(x, np.full(B, T + 1), seq_axis=seq_axis, batch_axis=batch_axis)
    with pytest.raises(ValueError, match="seq_lengths.*shape"):
        reverse_sequence(x, np.ones(B + 1, int), seq_axis=seq_axis, batch_axis=batch_axis)


def test_last_relevant(dtype):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((5, 6, 2)).astype(dtype)
    lens = np.array([6, 1, 0, 3, 2])
    got = last_relevant(x, lens)
    ref = np.stack([x[b, L - 1] if L else np.zeros(2, dtype) for b, L in enumerate(lens)])
    np.testing.assert_array_equal(got, ref)
    np.testing.assert_array_equal(last_relevant(np.swapaxes(x, 0, 1), lens, time_major=True), ref)
    with pytest.raises(ValueError, match="lengths.*<= T = 6"):
        last_relevant(x, [7, 1, 1, 1, 1])
    with pytest.raises(ValueError, match=">= 0"):
        last_relevant(x, [-1, 1, 1, 1, 1])
    with pytest.raises(TypeError, match="integer"):
        last_relevant(x, ["a"] * 5)


def test_top_level_names():
    assert fastseq.pad_sequences is pad_sequences
    assert fastseq.last_relevant is last_relevant
