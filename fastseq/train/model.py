"""``RecurrentModel``: an RNN (``dynamic_rnn`` or ``bidirectional_dynamic_rnn``) plus a dense
output layer, with the loss and every weight's gradient in one call.

This is the glue the tutorials write by hand in TF1 and that the estimators, the examples and
the parity test share:

* ``head="last"`` (sequence classification): the features are the output at each sequence's
  last relevant step (``out[b, len_b - 1]``; for a bidirectional RNN that is concatenated
  with the backward direction's output at step 0, which has read the whole sequence), then
  ``logits = Dense(features)`` and the mean sparse softmax cross-entropy.
* ``head="per_step"`` (sequence labelling / tagging): ``logits = Dense(outputs)`` at every
  step (``[B, T, C]``; forward and backward outputs concatenated when bidirectional) and
  ``sequence_loss`` with the given weights (a sequence mask for a masked loss).

Gradients of the RNN come from ``fastseq.vjp(fastseq.nn.dynamic_rnn, cell, x, ...)``; the
dense layer and the losses are differentiated here / in :mod:`fastseq.data`. All weights live
in one flat, ordered dict with TF1 names (``rnn/gru_cell/gates/kernel``,
``bidirectional_rnn/fw/...``, ``dense/kernel``) that the optimizers and the checkpoint
functions use directly.
"""

from __future__ import annotations

import copy
from collections import OrderedDict

import numpy as np

from .layers import Dense
from .losses import classification_loss, sequence_loss_and_grad, softmax

__all__ = ["RecurrentModel", "make_cell", "to_numpy_tree"]

CELL_KINDS = ("gru", "lstm", "rnn")


def to_numpy_tree(x):
    """NumPy copy of a (nested tuple of) array(s); keeps namedtuple types (LSTMStateTuple)."""
    if x is None:
        return None
    if isinstance(x, tuple):
        items = [to_numpy_tree(v) for v in x]
        return type(x)(*items) if hasattr(x, "_fields") else tuple(items)
    if isinstance(x, list):
        return [to_numpy_tree(v) for v in x]
    if hasattr(x, "numpy") and not isinstance(x, np.ndarray):
        return np.asarray(x.numpy())
    return np.asarray(x)


def make_cell(kind, num_units, num_layers=1, dropout=0.0):
    """Build a fresh cell: ``kind`` in ``"gru" | "lstm" | "rnn"``, ``num_layers`` stacked in
    a ``MultiRNNCell``, each wrapped in a ``DropoutWrapper(output_keep_prob=1 - dropout)`` when
    ``dropout > 0`` (the first tutorial's network). Returns ``(cell, dropout_wrappers)``."""
    from fastseq.nn import rnn_cell

    if kind not in CELL_KINDS:
        raise ValueError(f"cell must be one of {CELL_KINDS} or a cell object, got {kind!r}")
    if not isinstance(num_units, (int, np.integer)) or isinstance(num_units, bool) or num_units < 1:
        raise ValueError(f"num_units must be a positive int, got {num_units!r}")
    if not isinstance(num_layers, (int, np.integer)) or isinstance(num_layers, bool) or num_layers < 1:
        raise ValueError(f"num_layers must be a positive int, got {num_layers!r}")
    if not 0.0 <= float(dropout) < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
    factory = {"gru": rnn_cell.GRUCell, "lstm": rnn_cell.LSTMCell, "rnn": rnn_cell.BasicRNNCell}[kind]
    layers, wrappers = [], []
    for _ in range(int(num_layers)):
        c = factory(int(num_units))
        if dropout > 0:
            c = rnn_cell.DropoutWrapper(c, output_keep_prob=1.0 - float(dropout))
            wrappers.append(c)
        layers.append(c)
    cell = layers[0] if len(layers) == 1 else rnn_cell.MultiRNNCell(layers)
    return cell, wrappers


class RecurrentModel:
    """An RNN and a dense output layer.

    cell: ``"gru" | "lstm" | "rnn"`` or a cell object (for a bidirectional model: a pair
    ``(cell_fw, cell_bw)``, or one cell that is deep-copied before it is built).
    num_classes: output depth. head: ``"last"`` or ``"per_step"``. dtype: float32/float64.
    """

    def __init__(self, cell="gru", num_units=64, num_classes=2, num_layers=1, bidirectional=False,
                 dropout=0.0, head="last", dtype="float32"):
        if head not in ("last", "per_step"):
            raise ValueError(f"head must be 'last' or 'per_step', got {head!r}")
        self.dtype = np.dtype(dtype)
        if self.dtype.kind != "f":
            raise TypeError(f"dtype must be float32 or float64, got {self.dtype}")
        if not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        self.head = head
        self.bidirectional = bool(bidirectional)
        self.dropout_wrappers = []
        if isinstance(cell, str):
            self.cells = [make_cell(cell, num_units, num_layers, dropout)]
            if self.bidirectional:
                self.cells.append(make_cell(cell, num_units, num_layers, dropout))
            self.dropout_wrappers = [w for _, ws in self.cells for w in ws]
            self.cells = [c for c, _ in self.cells]
        elif isinstance(cell, (tuple, list)):
            if not self.bidirectional or len(cell) != 2:
                raise ValueError("a pair of cells is only accepted with bidirectional=True")
            self.cells = list(cell)
        else:
            if not hasattr(cell, "get_weights") or not hasattr(cell, "zero_state"):
                raise TypeError(f"cell must be 'gru', 'lstm', 'rnn' or a fastseq cell, got {type(cell).__name__}")
            self.cells = [cell, copy.deepcopy(cell)] if self.bidirectional else [cell]
        self.prefixes = ["bidirectional_rnn/fw/", "bidirectional_rnn/bw/"] if self.bidirectional else ["rnn/"]
        self.dense = Dense(int(num_classes), name="dense", dtype=self.dtype)
        self.num_classes = int(num_classes)
        self.input_depth = None

    # ------------------------------------------------------------------ weights
    @property
    def built(self):
        return self.input_depth is not None

    def build(self, input_depth):
        """Create every weight for inputs of depth ``input_depth`` (global fastseq RNG)."""
        input_depth = int(input_depth)
        for c in self.cells:
            c.build(input_depth, dtype=self.dtype)
        out_depth = sum(int(c.output_size) for c in self.cells)
        self.dense.build(out_depth, dtype=self.dtype)
        self.input_depth = input_depth
        return self

    def _check_built(self):
        if not self.built:
            raise ValueError("the model has no weights yet: call build(input_depth) or train it first")

    def get_weights(self):
        """OrderedDict of every weight (NumPy copies) with TF1-style names."""
        self._check_built()
        out = OrderedDict()
        for prefix, c in zip(self.prefixes, self.cells):
            for k, v in c.get_weights().items():
                out[prefix + k] = np.array(to_numpy_tree(v), copy=True)
        out.update(self.dense.get_weights())
        return out

    def set_weights(self, mapping):
        """Set every weight from a mapping with the names of :meth:`get_weights` (all of them)."""
        self._check_built()
        expected = self.get_weights()
        missing = [k for k in expected if k not in mapping]
        unknown = [k for k in mapping if k not in expected]
        if missing or unknown:
            raise ValueError(f"set_weights: missing {missing}, unknown {unknown}")
        for name, ref in expected.items():
            if np.shape(mapping[name]) != ref.shape:
                raise ValueError(f"set_weights: {name!r} has shape {np.shape(mapping[name])}, expected {ref.shape}")
        for prefix, c in zip(self.prefixes, self.cells):
            c.set_weights(OrderedDict(
                (k[len(prefix):], np.asarray(v, dtype=self.dtype)) for k, v in mapping.items() if k.startswith(prefix)
            ))
        self.dense.set_weights(OrderedDict((k, v) for k, v in mapping.items() if k.startswith("dense/")))

    # ------------------------------------------------------------------ dropout switch
    def _set_training(self, training):
        for w in self.dropout_wrappers:
            if not hasattr(w, "_fastseq_train_keep"):
                w._fastseq_train_keep = float(w.output_keep_prob)
            w.output_keep_prob = w._fastseq_train_keep if training else 1.0

    # ------------------------------------------------------------------ compute
    def _prepare(self, x, lengths):
        x = np.asarray(x)
        if x.ndim != 3:
            raise ValueError(f"inputs must be [B, T, I], got shape {x.shape}")
        if x.dtype.kind != "f":
            raise TypeError(f"inputs must be floats, got dtype {x.dtype}")
        x = x.astype(self.dtype, copy=False)
        if not self.built:
            self.build(x.shape[2])
        elif x.shape[2] != self.input_depth:
            raise ValueError(f"inputs' feature size must be {self.input_depth}, got {x.shape[2]}")
        B, T = x.shape[:2]
        if lengths is None:
            lengths = np.full(B, T, dtype=np.int64)
        lengths = np.asarray(lengths)
        if lengths.shape != (B,) or lengths.dtype.kind not in "iu":
            raise ValueError(f"lengths must be an int array of shape ({B},), got {lengths.dtype} {lengths.shape}")
        if B and (lengths.min() < 1 or lengths.max() > T):
            raise ValueError(f"lengths must be in [1, {T}], got values in [{lengths.min()}, {lengths.max()}]")
        return x, lengths.astype(np.int64, copy=False)

    def _rnn(self, x, lengths, initial_state, need_grad):
        import fastseq
        from fastseq import nn

        if self.bidirectional:
            if initial_state is not None:
                raise ValueError("initial_state is not supported for a bidirectional model")
            fn, args, kw = nn.bidirectional_dynamic_rnn, (self.cells[0], self.cells[1], x), {}
        else:
            fn, args, kw = nn.dynamic_rnn, (self.cells[0], x), {}
            if initial_state is not None:
                kw["initial_state"] = initial_state
        kw.update(sequence_length=lengths, dtype=self.dtype)
        if need_grad:
            (outputs, state), pullback = fastseq.vjp(fn, *args, **kw)
        else:
            (outputs, state), pullback = fn(*args, **kw), None
        outputs = to_numpy_tree(outputs)
        return outputs, to_numpy_tree(state), pullback

    def _features(self, outputs, lengths):
        B = lengths.shape[0]
        rows = np.arange(B)
        if self.head == "last":
            if self.bidirectional:
                fw, bw = outputs
                return np.concatenate([fw[rows, lengths - 1], bw[:, 0]], axis=-1)
            return outputs[rows, lengths - 1]
        if self.bidirectional:
            return np.concatenate(list(outputs), axis=-1)
        return outputs

    def _d_outputs(self, outputs, lengths, d_feats):
        rows = np.arange(lengths.shape[0])
        if self.head == "last":
            if self.bidirectional:
                fw, bw = outputs
                h = fw.shape[-1]
                d_fw, d_bw = np.zeros_like(fw), np.zeros_like(bw)
                d_fw[rows, lengths - 1] = d_feats[:, :h]
                d_bw[:, 0] = d_feats[:, h:]
                return (d_fw, d_bw)
            d = np.zeros_like(outputs)
            d[rows, lengths - 1] = d_feats
            return d
        if self.bidirectional:
            h = outputs[0].shape[-1]
            return (np.ascontiguousarray(d_feats[..., :h]), np.ascontiguousarray(d_feats[..., h:]))
        return d_feats

    def forward(self, x, lengths=None, initial_state=None, training=False):
        """Logits (``[B, C]`` or ``[B, T, C]``) and the RNN's final state."""
        x, lengths = self._prepare(x, lengths)
        self._set_training(training)
        outputs, state, _ = self._rnn(x, lengths, initial_state, need_grad=False)
        return self.dense.forward(self._features(outputs, lengths)), state

    def predict_proba(self, x, lengths=None, initial_state=None):
        logits, _ = self.forward(x, lengths, initial_state)
        return softmax(logits)

    def loss_and_grads(self, x, lengths, targets, weights=None, initial_state=None, training=True):
        """Loss, gradients of every weight (dict like :meth:`get_weights`) and extras.

        x ``[B, T, I]``; lengths ``[B]`` int (``None``: all ``T``); targets ``[B]`` (head
        "last") or ``[B, T]`` (head "per_step"); weights ``[B, T]`` for "per_step"
        (``None``: the sequence mask of ``lengths``, i.e. a masked loss).
        Returns ``(loss, grads, extras)``; extras: ``logits``, ``final_state``.
        """
        x, lengths = self._prepare(x, lengths)
        self._set_training(training)
        outputs, state, pullback = self._rnn(x, lengths, initial_state, need_grad=True)
        feats = self._features(outputs, lengths)
        logits = self.dense.forward(feats)
        if self.head == "last":
            loss, d_logits = classification_loss(logits, targets)
        else:
            if weights is None:
                weights = (np.arange(x.shape[1])[None, :] < lengths[:, None]).astype(self.dtype)
            loss, d_logits = sequence_loss_and_grad(logits, targets, weights)
        d_feats, grads = self.dense.backward(feats, d_logits)
        g = pullback(self._d_outputs(outputs, lengths, d_feats), None)
        cell_grads = g.weights if self.bidirectional else (g.weights,)
        all_grads = OrderedDict()
        for prefix, gw in zip(self.prefixes, cell_grads):
            for k, v in gw.items():
                all_grads[prefix + k] = np.asarray(to_numpy_tree(v))
        all_grads.update(grads)
        self._set_training(False)
        return loss, all_grads, {"logits": logits, "final_state": state}

    def train_step(self, optimizer, x, lengths, targets, weights=None, initial_state=None):
        """One optimizer step. Returns ``(loss, extras)`` (loss before the update)."""
        loss, grads, extras = self.loss_and_grads(x, lengths, targets, weights, initial_state)
        self.set_weights(optimizer.apply(self.get_weights(), grads))
        return loss, extras
