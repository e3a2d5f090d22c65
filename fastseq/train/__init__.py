"""fastseq's small training layer: what sequence models need and no more.

* :class:`Dense` - the output layer (``y = x @ kernel + bias``) with its gradient.
* :func:`classification_loss`, :func:`sequence_loss_and_grad` - the losses of
  :mod:`fastseq.data` with ``d loss / d logits``.
* :class:`SGD`, :class:`Adam`, :func:`clip_by_global_norm` - TF1's update rules.
* :func:`save_weights`, :func:`load_weights` - ``.npz`` or safetensors, never pickle.
* :class:`RecurrentModel` - RNN + dense head, loss and every gradient in one call.
* :func:`run_recipe` - the Japanese Vowels and echo-RNN recipes behind ``fastseq train``.

Seeding: :func:`fastseq.set_seed` seeds weight init, dropout masks and batch shuffling.
"""

from importlib import import_module as _import_module

from .checkpoint import CheckpointError, check_weights, load_metadata, load_weights, save_weights
from .layers import Dense
from .losses import classification_loss, sequence_loss_and_grad, softmax
from .optimizers import SGD, Adam, clip_by_global_norm, get_optimizer, global_norm

__all__ = [
    "Dense", "SGD", "Adam", "clip_by_global_norm", "global_norm", "get_optimizer",
    "save_weights", "load_weights", "load_metadata", "check_weights", "CheckpointError",
    "classification_loss", "sequence_loss_and_grad", "softmax",
    "RecurrentModel", "make_cell", "run_recipe", "RECIPES", "set_seed",
]

_LAZY = {
    "RecurrentModel": "fastseq.train.model",
    "make_cell": "fastseq.train.model",
    "run_recipe": "fastseq.train.recipes",
    "RECIPES": "fastseq.train.recipes",
    "set_seed": "fastseq.random",
}


def __getattr__(name):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'fastseq.train' has no attribute {name!r}")
    value = getattr(_import_module(module), name)
    globals()[name] = value
    return value
