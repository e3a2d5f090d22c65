"""Scikit-learn style estimators for variable-length sequences.

    from fastseq import SequenceClassifier
    clf = SequenceClassifier(cell="gru", num_units=64, epochs=30, seed=0)
    clf.fit(train_sequences, train_labels, validation_data=(test_sequences, test_labels))
    clf.score(test_sequences, test_labels)
    clf.save("speaker.safetensors");  SequenceClassifier.load("speaker.safetensors")

* :class:`SequenceClassifier`: one label per sequence, read from the RNN output at each
  sequence's last relevant step (both directions' when ``bidirectional``).
* :class:`SequenceTagger`: one label per step, trained with a masked ``sequence_loss``.

Sequences are a list of ``[T_i, I]`` arrays (``[T_i]`` for one feature); each mini-batch is
padded to its own longest sequence and the lengths go to the RNN as ``sequence_length``.
Labels may be any sortable values (``classes_`` holds them, as in scikit-learn).
The backend is ``backend=`` when given, else the active one (``FASTSEQ_BACKEND``).
Weights are saved with :func:`fastseq.train.save_weights` (.npz or .safetensors, no pickle)
together with the estimator's configuration as JSON metadata.
"""

from __future__ import annotations

import contextlib
import json
import time

import numpy as np

from .train.batching import batch_indices, check_sequences, pad_batch
from .train.checkpoint import CheckpointError, load_metadata, load_weights, save_weights
from .train.losses import softmax
from .train.optimizers import get_optimizer
from .train.progress import ProgressBar

__all__ = ["SequenceClassifier", "SequenceTagger"]

_PARAMS = (
    "cell", "num_units", "num_layers", "bidirectional", "dropout", "optimizer", "learning_rate",
    "clip_norm", "epochs", "batch_size", "shuffle", "seed", "backend", "dtype", "verbose", "warm_start",
)


class _SequenceEstimator:
    _head = None

    def __init__(self, cell="gru", num_units=64, num_layers=1, bidirectional=False, dropout=0.0,
                 optimizer="adam", learning_rate=0.01, clip_norm=5.0, epochs=10, batch_size=32,
                 shuffle=True, seed=None, backend=None, dtype="float32", verbose=1, warm_start=False):
        self.cell = cell
        self.num_units = num_units
        self.num_layers = num_layers
        self.bidirectional = bidirectional
        self.dropout = dropout
        self.optimizer = optimizer
        self.learning_rate = learning_rate
        self.clip_norm = clip_norm
        self.epochs = epochs
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.backend = backend
        self.dtype = dtype
        self.verbose = verbose
        self.warm_start = warm_start

    # ------------------------------------------------------------------ sklearn plumbing
    def get_params(self, deep=True):
        return {k: getattr(self, k) for k in _PARAMS}

    def set_params(self, **params):
        for k, v in params.items():
            if k not in _PARAMS:
                raise ValueError(f"{type(self).__name__}: unknown parameter {k!r}; valid: {list(_PARAMS)}")
            setattr(self, k, v)
        return self

    def __repr__(self):
        args = ", ".join(f"{k}={getattr(self, k)!r}" for k in _PARAMS)
        return f"{type(self).__name__}({args})"

    def _backend_ctx(self):
        if self.backend is None:
            return contextlib.nullcontext()
        import fastseq

        return fastseq.use_backend(self.backend)

    def _check_fitted(self):
        if getattr(self, "model_", None) is None:
            raise ValueError(f"this {type(self).__name__} is not fitted yet: call fit(sequences, labels) first")

    # ------------------------------------------------------------------ labels (per subclass)
    def _encode_fit(self, labels, lengths):
        raise NotImplementedError

    def _encode(self, labels, lengths, name):
        raise NotImplementedError

    def _batch_targets(self, y, idx, T):
        raise NotImplementedError

    # ------------------------------------------------------------------ training
    def _new_model(self, input_depth):
        from .train.model import RecurrentModel

        model = RecurrentModel(
            self.cell, num_units=self.num_units, num_classes=len(self.classes_), num_layers=self.num_layers,
            bidirectional=self.bidirectional, dropout=self.dropout, head=self._head, dtype=self.dtype,
        )
        model.build(input_depth)
        return model

    def _batches(self, seqs, lengths, idx_list):
        for idx in idx_list:
            yield idx, pad_batch([seqs[i] for i in idx], self.dtype), lengths[idx]

    def fit(self, sequences, labels, epochs=None, batch_size=None, validation_data=None):
        """Train on ``sequences`` (list of ``[T_i, I]`` arrays) and ``labels``.

        epochs, batch_size: override the constructor's values for this call.
        validation_data: optional ``(sequences, labels)`` scored after every epoch.
        Each call starts from new weights unless ``warm_start=True`` (then a fitted model
        continues training, with its classes and optimizer state, as scikit-learn's warm start).
        Returns ``self``; ``history_`` holds per-epoch ``loss``, ``accuracy`` (and
        ``val_loss``, ``val_accuracy``) and ``step_loss`` (one value per mini-batch).
        """
        import fastseq

        epochs = self.epochs if epochs is None else epochs
        batch_size = self.batch_size if batch_size is None else batch_size
        if not isinstance(epochs, (int, np.integer)) or epochs < 0:
            raise ValueError(f"epochs must be a non-negative int, got {epochs!r}")
        if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        seqs, lengths, depth = check_sequences(sequences)
        warm = bool(self.warm_start) and getattr(self, "model_", None) is not None
        if warm and depth != self.input_depth_:
            raise ValueError(f"warm_start: sequences have {depth} features, the fitted model takes {self.input_depth_}")
        if warm:
            y = self._encode(labels, lengths, "labels")
        else:
            y = self._encode_fit(labels, lengths)
        val = None
        if validation_data is not None:
            if not isinstance(validation_data, (tuple, list)) or len(validation_data) != 2:
                raise ValueError("validation_data must be a pair (sequences, labels)")
            vseqs, vlengths, _ = check_sequences(validation_data[0], "validation_data[0]", depth)
            val = (vseqs, vlengths, self._encode(validation_data[1], vlengths, "validation_data[1]"))
        if self.seed is not None and not warm:
            fastseq.set_seed(int(self.seed))
        rng = np.random.default_rng(self.seed) if self.seed is not None else fastseq.random.generator()
        with self._backend_ctx():
            if not warm:
                self.model_ = self._new_model(depth)
                self.input_depth_ = depth
                self.optimizer_ = get_optimizer(self.optimizer, self.learning_rate, self.clip_norm)
                self.history_ = {"loss": [], "accuracy": [], "val_loss": [], "val_accuracy": [], "step_loss": [],
                                 "epoch_time": []}
            for epoch in range(int(epochs)):
                batches = batch_indices(len(seqs), batch_size, self.shuffle, rng)
                bar = ProgressBar(len(batches), len(self.history_["loss"]) + 1,
                                  len(self.history_["loss"]) + int(epochs) - epoch, enabled=bool(self.verbose))
                t0 = time.perf_counter()
                tot_loss = tot_correct = tot_count = 0.0
                for done, (idx, x, lens) in enumerate(self._batches(seqs, lengths, batches), 1):
                    targets, weights = self._batch_targets(y, idx, x.shape[1])
                    loss, extras = self.model_.train_step(self.optimizer_, x, lens, targets, weights)
                    correct, count = self._correct(extras["logits"], targets, weights)
                    self.history_["step_loss"].append(loss)
                    n = float(len(idx)) if self._head == "last" else float(np.sum(weights))
                    tot_loss += loss * n
                    tot_count += count
                    tot_correct += correct
                    bar.update(done, loss=tot_loss / tot_count, acc=tot_correct / tot_count)
                self.history_["epoch_time"].append(time.perf_counter() - t0)
                self.history_["loss"].append(tot_loss / tot_count)
                self.history_["accuracy"].append(tot_correct / tot_count)
                metrics = {"loss": self.history_["loss"][-1], "acc": self.history_["accuracy"][-1]}
                if val is not None:
                    vloss, vacc = self._evaluate(*val, batch_size)
                    self.history_["val_loss"].append(vloss)
                    self.history_["val_accuracy"].append(vacc)
                    metrics.update(val_loss=vloss, val_acc=vacc)
                bar.close(**metrics)
        return self

    def reset(self):
        """Forget the fitted model (a later ``warm_start`` fit starts from new weights)."""
        self.model_ = None
        return self

    def _correct(self, logits, targets, weights):
        pred = np.argmax(logits, axis=-1)
        if self._head == "last":
            return float(np.sum(pred == targets)), float(len(targets))
        return float(np.sum((pred == targets) * weights)), float(np.sum(weights))

    def _logits_batches(self, seqs, lengths, batch_size):
        order = np.argsort(lengths, kind="stable")  # similar lengths together: less padding
        idx_list = [order[i: i + batch_size] for i in range(0, len(seqs), batch_size)]
        with self._backend_ctx():
            for idx, x, lens in self._batches(seqs, lengths, idx_list):
                logits, _ = self.model_.forward(x, lens)
                yield idx, lens, logits

    def _evaluate(self, seqs, lengths, y, batch_size):
        from .train.losses import classification_loss, sequence_loss_and_grad

        tot_loss = tot_correct = tot_count = 0.0
        for idx, lens, logits in self._logits_batches(seqs, lengths, batch_size):
            targets, weights = self._batch_targets(y, idx, logits.shape[1] if logits.ndim == 3 else 0)
            if self._head == "last":
                loss, _ = classification_loss(logits, targets)
                n = len(idx)
            else:
                loss, _ = sequence_loss_and_grad(logits, targets, weights)
                n = float(np.sum(weights))
            correct, count = self._correct(logits, targets, weights)
            tot_loss += loss * n
            tot_correct += correct
            tot_count += count
        return tot_loss / tot_count, tot_correct / tot_count

    # ------------------------------------------------------------------ saving
    def _config(self):
        if not isinstance(self.cell, str):
            cfg_cell = None
        else:
            cfg_cell = self.cell
        cfg = {k: getattr(self, k) for k in _PARAMS if k not in ("cell", "optimizer")}
        cfg["cell"] = cfg_cell
        cfg["optimizer"] = self.optimizer if isinstance(self.optimizer, str) else "adam"
        return cfg

    def save(self, path, format=None):
        """Write the weights and configuration to ``path`` (.npz or .safetensors)."""
        self._check_fitted()
        classes = self.classes_.tolist()
        meta = {
            "fastseq_estimator": type(self).__name__,
            "config": json.dumps(self._config()),
            "classes": json.dumps(classes),
            "classes_dtype": str(self.classes_.dtype),
            "input_depth": str(self.input_depth_),
        }
        save_weights(path, self.model_.get_weights(), metadata=meta, format=format)
        return path

    @classmethod
    def load(cls, path, format=None, cell=None, backend=None):
        """Rebuild an estimator saved by :meth:`save`. ``cell``: the cell object, needed when
        the estimator was made with one (only string cells are stored by name).
        ``backend``: run the loaded model on this backend (default: the saved setting)."""
        meta = load_metadata(path, format=format)
        kind = meta.get("fastseq_estimator")
        if kind is None:
            raise CheckpointError(f"{path}: not a fastseq estimator file (no 'fastseq_estimator' metadata)")
        if kind != cls.__name__:
            raise CheckpointError(f"{path}: holds a {kind}, not a {cls.__name__}")
        try:
            cfg = json.loads(meta["config"])
            classes = np.array(json.loads(meta["classes"]), dtype=meta["classes_dtype"])
            depth = int(meta["input_depth"])
        except (KeyError, ValueError, TypeError) as exc:
            raise CheckpointError(f"{path}: damaged estimator metadata ({exc})") from None
        if cfg.get("cell") is None:
            if cell is None:
                raise ValueError(f"{path}: the estimator was built with a cell object: pass it as load(path, cell=...)")
            cfg["cell"] = cell
        if backend is not None:
            cfg["backend"] = backend
        est = cls(**{k: v for k, v in cfg.items() if k in _PARAMS})
        est.classes_ = classes
        with est._backend_ctx():
            est.model_ = est._new_model(depth)
            expected = est.model_.get_weights()
            weights = load_weights(path, format=format, expected=expected)
            est.model_.set_weights(weights)
        est.input_depth_ = depth
        est.optimizer_ = get_optimizer(est.optimizer, est.learning_rate, est.clip_norm)
        est.history_ = None
        return est


class SequenceClassifier(_SequenceEstimator):
    """One label per sequence: RNN (GRU/LSTM/basic, stacked, bidirectional, dropout) +
    dense softmax layer on the output at the last relevant step.

    fit(sequences, labels, epochs=None, batch_size=None, validation_data=None)
    predict(sequences) -> labels [N]; predict_proba(sequences) -> [N, n_classes];
    score(sequences, labels) -> accuracy.
    """

    _head = "last"

    def _encode_fit(self, labels, lengths):
        labels = np.asarray(labels)
        if labels.ndim != 1 or len(labels) != len(lengths):
            raise ValueError(f"labels must be 1-D with one label per sequence ({len(lengths)}), got shape {labels.shape}")
        self.classes_ = np.unique(labels)
        if len(self.classes_) < 2:
            raise ValueError(f"labels must hold at least 2 classes, got {self.classes_.tolist()}")
        return np.searchsorted(self.classes_, labels).astype(np.int64)

    def _encode(self, labels, lengths, name):
        labels = np.asarray(labels)
        if labels.ndim != 1 or len(labels) != len(lengths):
            raise ValueError(f"{name} must be 1-D with one label per sequence ({len(lengths)}), got shape {labels.shape}")
        idx = np.searchsorted(self.classes_, labels)
        idx = np.clip(idx, 0, len(self.classes_) - 1)
        bad = self.classes_[idx] != labels
        if np.any(bad):
            raise ValueError(f"{name} holds labels not seen in fit: {np.unique(labels[bad]).tolist()[:10]}")
        return idx.astype(np.int64)

    def _batch_targets(self, y, idx, T):
        return y[idx], None

    def predict_proba(self, sequences):
        """Class probabilities ``[N, n_classes]`` (columns in ``classes_`` order)."""
        self._check_fitted()
        seqs, lengths, _ = check_sequences(sequences, feature_size=self.input_depth_)
        out = np.zeros((len(seqs), len(self.classes_)), dtype=self.dtype)
        for idx, _, logits in self._logits_batches(seqs, lengths, int(self.batch_size)):
            out[idx] = softmax(logits)
        return out

    def predict(self, sequences):
        """The most probable label of each sequence."""
        self._check_fitted()
        return self.classes_[np.argmax(self.predict_proba(sequences), axis=1)]

    def score(self, sequences, labels):
        """Accuracy of :meth:`predict` against ``labels``."""
        labels = np.asarray(labels)
        pred = self.predict(sequences)
        if labels.shape != pred.shape:
            raise ValueError(f"labels must have shape {pred.shape}, got {labels.shape}")
        return float(np.mean(pred == labels))


class SequenceTagger(_SequenceEstimator):
    """One label per step (sequence labelling / tagging), trained with a masked
    ``sequence_loss`` (padded steps never count). ``bidirectional=True`` lets a step's label
    depend on later inputs.

    labels: a list of ``[T_i]`` label arrays matching the sequences' lengths.
    predict(sequences) -> list of ``[T_i]`` label arrays; predict_proba -> list of
    ``[T_i, n_classes]``; score -> per-step accuracy over all real steps.
    """

    _head = "per_step"

    def _check_tags(self, labels, lengths, name):
        if not isinstance(labels, (list, tuple)) and not (isinstance(labels, np.ndarray) and labels.ndim >= 1):
            raise TypeError(f"{name} must be a list of per-step label arrays, got {type(labels).__name__}")
        if len(labels) != len(lengths):
            raise ValueError(f"{name} must hold one label sequence per input sequence ({len(lengths)}), got {len(labels)}")
        out = []
        for i, (lab, n) in enumerate(zip(labels, lengths)):
            lab = np.asarray(lab)
            if lab.shape != (n,):
                raise ValueError(f"{name}[{i}] must have shape ({n},) like its sequence, got {lab.shape}")
            out.append(lab)
        return out

    def _encode_fit(self, labels, lengths):
        labels = self._check_tags(labels, lengths, "labels")
        self.classes_ = np.unique(np.concatenate(labels))
        if len(self.classes_) < 2:
            raise ValueError(f"labels must hold at least 2 classes, got {self.classes_.tolist()}")
        return [np.searchsorted(self.classes_, lab).astype(np.int64) for lab in labels]

    def _encode(self, labels, lengths, name):
        labels = self._check_tags(labels, lengths, name)
        out = []
        for lab in labels:
            idx = np.clip(np.searchsorted(self.classes_, lab), 0, len(self.classes_) - 1)
            bad = self.classes_[idx] != lab
            if np.any(bad):
                raise ValueError(f"{name} holds labels not seen in fit: {np.unique(lab[bad]).tolist()[:10]}")
            out.append(idx.astype(np.int64))
        return out

    def _batch_targets(self, y, idx, T):
        targets = np.zeros((len(idx), T), dtype=np.int64)
        weights = np.zeros((len(idx), T), dtype=self.dtype)
        for r, i in enumerate(idx):
            targets[r, : len(y[i])] = y[i]
            weights[r, : len(y[i])] = 1
        return targets, weights

    def predict_proba(self, sequences):
        """Per-step class probabilities: a list of ``[T_i, n_classes]`` arrays."""
        self._check_fitted()
        seqs, lengths, _ = check_sequences(sequences, feature_size=self.input_depth_)
        out = [None] * len(seqs)
        for idx, lens, logits in self._logits_batches(seqs, lengths, int(self.batch_size)):
            probs = softmax(logits)
            for r, i in enumerate(idx):
                out[i] = probs[r, : lens[r]]
        return out

    def predict(self, sequences):
        """The most probable label at every step: a list of ``[T_i]`` arrays."""
        self._check_fitted()
        return [self.classes_[np.argmax(p, axis=1)] for p in self.predict_proba(sequences)]

    def score(self, sequences, labels):
        """Per-step accuracy over all real (unpadded) steps."""
        pred = self.predict(sequences)
        labels = self._check_tags(labels, np.array([len(p) for p in pred]), "labels")
        correct = sum(int(np.sum(p == lab)) for p, lab in zip(pred, labels))
        return correct / float(sum(len(p) for p in pred))
