"""``fastseq.contrib.rnn`` for code that used ``tf.contrib.rnn``."""

from . import rnn  # noqa: F401
