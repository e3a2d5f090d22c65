"""The names ``tf.contrib.rnn`` exposed: the cells, wrappers and static drivers."""

from ..nn.rnn import static_bidirectional_rnn, static_rnn  # noqa: F401
from ..nn.rnn_cell import (  # noqa: F401
    BasicLSTMCell,
    BasicRNNCell,
    DropoutWrapper,
    GRUCell,
    LSTMCell,
    LSTMStateTuple,
    MultiRNNCell,
    ResidualWrapper,
    RNNCell,
)
