"""TFRecord files and tf.train.SequenceExample, without TensorFlow or protobuf.

    from fastseq import io
    io.write_sequence_examples("data.tfrecord", [({"length": 3}, {"tokens": [1, 2, 3]})])
    for context, seqs in io.read_sequence_examples(
            "data.tfrecord",
            context_features={"length": io.FixedLenFeature([], "int64")},
            sequence_features={"tokens": io.FixedLenSequenceFeature([], "int64")}):
        ...

Files are byte-compatible with ``tf.io.TFRecordWriter`` / ``tf.data.TFRecordDataset`` and
``tf.io.parse_single_sequence_example``.
"""
from .example import (
    FixedLenFeature,
    FixedLenSequenceFeature,
    SequenceExampleParser,
    SparseValue,
    VarLenFeature,
    encode_sequence_example,
    parse_single_sequence_example,
    read_sequence_examples,
    write_sequence_examples,
)
from .tfrecord import (
    TFRecordError,
    TFRecordReader,
    TFRecordWriter,
    crc32c,
    masked_crc32c,
    read_tfrecord,
    tf_record_iterator,
    write_tfrecord,
)

__all__ = [
    "FixedLenFeature", "FixedLenSequenceFeature", "VarLenFeature", "SparseValue", "SequenceExampleParser",
    "encode_sequence_example", "parse_single_sequence_example", "read_sequence_examples",
    "write_sequence_examples", "TFRecordError", "TFRecordReader", "TFRecordWriter", "crc32c",
    "masked_crc32c", "read_tfrecord", "tf_record_iterator", "write_tfrecord",
]
