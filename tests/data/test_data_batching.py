import numpy as np
import pytest

from fastseq.data import bucket_by_sequence_length, pad_sequences, padded_batches

from ._refs import bucket_reference


def _data(n=23, seed=0):
    rng = np.random.default_rng(seed)
    lens = rng.integers(1, 12, n)
    seqs = [rng.standard_normal((int(L), 2)).astype(np.float32) for L in lens]
    return seqs, lens


@pytest.mark.parametrize("drop", [False, True])
def test_bucket_matches_tf_data_grouping(drop):
    seqs, lens = _data()
    labels = np.arange(len(seqs))
    bounds, sizes = [3, 6, 9], [2, 3, 4, 5]
    batches = list(bucket_by_sequence_length(seqs, labels, bounds, sizes, shuffle=False, drop_remainder=drop))
    ref = bucket_reference(lens, bounds, sizes, drop)
    assert [list(b.labels) for b in batches] == ref
    for b, idx in zip(batches, ref):
        padded, l = pad_sequences([seqs[i] for i in idx])
        np.testing.assert_array_equal(b.inputs, padded)
        np.testing.assert_array_equal(b.lengths, l)


def test_bucket_shuffle_is_seeded_and_complete():
    seqs, lens = _data(40, seed=1)
    labels = np.arange(len(seqs))
    run = lambda seed: [tuple(b.labels) for b in bucket_by_sequence_length(seqs, labels, [5], [4, 4], seed=seed)]
    a, b, c = run(3), run(3), run(4)
    assert a == b and a != c
    assert sorted(i for batch in a for i in batch) == list(range(40))
    for batch in a:  # each batch is one bucket
        assert len({lens[i] >= 5 for i in batch}) == 1


def test_per_step_labels_are_padded():
    seqs = [np.ones((3, 2)), np.ones((1, 2)), np.ones((2, 2))]
    tags = [np.array([1, 2, 3]), np.array([4]), np.array([5, 6])]
    (batch,) = list(padded_batches(seqs, tags, batch_size=3, label_padding=-1))
    np.testing.assert_array_equal(batch.labels, [[1, 2, 3], [4, -1, -1], [5, 6, -1]])
    np.testing.assert_array_equal(batch.lengths, [3, 1, 2])
    (batch,) = list(bucket_by_sequence_length(seqs, tags, [10], [3, 3], shuffle=False))
    np.testing.assert_array_equal(batch.labels, [[1, 2, 3], [4, 0, 0], [5, 6, 0]])


def test_padded_batches_order_and_remainder():
    seqs, _ = _data(10)
    out = list(padded_batches(seqs, batch_size=4))
    assert [b.inputs.shape[0] for b in out] == [4, 4, 2]
    assert out[0].labels is None
    np.testing.assert_array_equal(out[1].inputs, pad_sequences(seqs[4:8])[0])
    assert [b.inputs.shape[0] for b in padded_batches(seqs, batch_size=4, drop_remainder=True)] == [4, 4]
    shuffled = list(padded_batches(seqs, np.arange(10), batch_size=3, shuffle=True, seed=0))
    assert sorted(np.concatenate([b.labels for b in shuffled]).tolist()) == list(range(10))


def test_batching_bad_input():
    seqs, _ = _data(4)
    with pytest.raises(ValueError, match="bucket_batch_sizes.*2"):
        bucket_by_sequence_length(seqs, None, [3], [1, 2, 3])
    with pytest.raises(ValueError, match="bucket_boundaries.*increasing"):
        bucket_by_sequence_length(seqs, None, [3, 2], [1, 2, 3])
    with pytest.raises(ValueError, match="labels.*4"):
        bucket_by_sequence_length(seqs, [1, 2], [3], [1, 2])
    with pytest.raises(ValueError, match="batch_size"):
        padded_batches(seqs, batch_size=0)
    with pytest.raises(TypeError, match="seed"):
        padded_batches(seqs, shuffle=True, seed="x")
