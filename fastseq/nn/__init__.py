"""TF1's ``tf.nn`` recurrent functions and ``tf.nn.rnn_cell``."""

from . import rnn_cell  # noqa: F401
from .rnn import (  # noqa: F401
    EmitArray,
    bidirectional_dynamic_rnn,
    dynamic_rnn,
    raw_rnn,
    static_bidirectional_rnn,
    static_rnn,
)

__all__ = ["dynamic_rnn", "bidirectional_dynamic_rnn", "static_rnn", "static_bidirectional_rnn", "raw_rnn", "rnn_cell", "EmitArray"]
