"""fastseq: TensorFlow 1's recurrent API on fast, maintained kernels.

    import fastseq
    from fastseq.nn import dynamic_rnn, rnn_cell

    cell = rnn_cell.LSTMCell(64)
    outputs, state = dynamic_rnn(cell, x, sequence_length=lengths, dtype="float32")

The backend (numba by default, numpy as the reference, tensorflow) is chosen by the
``FASTSEQ_BACKEND`` environment variable or :func:`set_backend` / :func:`use_backend`.
Importing fastseq imports neither numba nor tensorflow. CPU threads: :func:`set_num_threads`
(or ``FASTSEQ_NUM_THREADS``), see :mod:`fastseq.threads`.
"""

from importlib import import_module as _import_module

from . import nn  # noqa: F401  (cheap: numpy only)
from .backend import get_backend, list_backends, set_backend, use_backend  # noqa: F401
from .grad import vjp  # noqa: F401
from .random import set_seed  # noqa: F401
from .threads import get_num_threads, set_num_threads  # noqa: F401

__version__ = "0.1.0"

# Names served lazily from submodules that other parts of the library own, so that
# `import fastseq` stays light and each submodule is imported only when first used.
_LAZY = {
    # data routines (fastseq.data)
    "pad_sequences": "fastseq.data",
    "unpad": "fastseq.data",
    "sequence_mask": "fastseq.data",
    "reverse_sequence": "fastseq.data",
    "last_relevant": "fastseq.data",
    "sparse_softmax_cross_entropy_with_logits": "fastseq.data",
    "sequence_loss": "fastseq.data",
    "bucket_by_sequence_length": "fastseq.data",
    "padded_batches": "fastseq.data",
    "data": "fastseq.data",
    "io": "fastseq.io",
    # training (fastseq.train, fastseq.estimators)
    "train": "fastseq.train",
    "SequenceClassifier": "fastseq.estimators",
    "SequenceTagger": "fastseq.estimators",
    "contrib": "fastseq.contrib",
}


def __getattr__(name):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'fastseq' has no attribute {name!r}")
    mod = _import_module(module)
    value = mod if module.endswith("." + name) else getattr(mod, name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
