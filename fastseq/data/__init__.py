"""Data routines for recurrent models: padding, masks, losses with gradients, batching.

All of them take and return NumPy arrays and run on the host whatever the backend
(convert a tensor with ``np.asarray``). TFRecord / SequenceExample I/O lives in
:mod:`fastseq.io`.
"""
from .batching import Batch, bucket_by_sequence_length, padded_batches
from .losses import (
    sequence_loss,
    sequence_loss_grad,
    sparse_softmax_cross_entropy_grad,
    sparse_softmax_cross_entropy_with_logits,
)
from .padding import last_relevant, pad_sequences, reverse_sequence, sequence_mask, unpad

__all__ = [
    "pad_sequences", "unpad", "sequence_mask", "reverse_sequence", "last_relevant",
    "sparse_softmax_cross_entropy_with_logits", "sparse_softmax_cross_entropy_grad",
    "sequence_loss", "sequence_loss_grad",
    "Batch", "padded_batches", "bucket_by_sequence_length",
]
