"""SGD and Adam (TF1's update rules) and ``clip_by_global_norm``.

Optimizers work on plain dicts ``name -> np.ndarray``: ``new = opt.apply(params, grads)``
returns the updated arrays (the inputs are not modified) and keeps per-name slots (momentum,
Adam's moments). The caller writes the result back (``cell.set_weights``, ``Dense.set_weights``
or :class:`fastseq.train.model.RecurrentModel.set_weights`), so the same optimizer serves
cells on every backend (NumPy arrays, or ``tf.Variable`` assigned through ``set_weights``).
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

__all__ = ["clip_by_global_norm", "global_norm", "SGD", "Adam", "get_optimizer"]


def global_norm(grads):
    """``sqrt(sum(||g||^2))`` over a dict or a list of arrays (``None`` entries skipped)."""
    values = grads.values() if isinstance(grads, dict) else grads
    total = 0.0
    for g in values:
        if g is not None:
            g = np.asarray(g, dtype=np.float64)
            total += float(np.dot(g.ravel(), g.ravel()))
    return float(np.sqrt(total))


def clip_by_global_norm(grads, clip_norm, use_norm=None):
    """TF's ``tf.clip_by_global_norm``: scale every gradient by
    ``clip_norm / max(global_norm, clip_norm)``.

    grads: dict ``name -> array`` or a list of arrays (``None`` kept as ``None``).
    Returns ``(clipped, global_norm)`` in the same container type. A non-finite global norm
    makes every entry NaN, as TF does.
    """
    clip_norm = float(clip_norm)
    if not clip_norm > 0:
        raise ValueError(f"clip_by_global_norm: clip_norm must be > 0, got {clip_norm}")
    norm = global_norm(grads) if use_norm is None else float(use_norm)
    if np.isfinite(norm):
        scale = clip_norm / max(norm, clip_norm)
    else:
        scale = float("nan")

    def _scale(g):
        if g is None:
            return None
        g = np.asarray(g)
        return (g * np.asarray(scale, dtype=g.dtype)).astype(g.dtype, copy=False)

    if isinstance(grads, dict):
        return OrderedDict((k, _scale(g)) for k, g in grads.items()), norm
    return [_scale(g) for g in grads], norm


class _Optimizer:
    def __init__(self, learning_rate, clip_norm=None):
        learning_rate = float(learning_rate)
        if not learning_rate > 0:
            raise ValueError(f"{type(self).__name__}: learning_rate must be > 0, got {learning_rate}")
        if clip_norm is not None and not float(clip_norm) > 0:
            raise ValueError(f"{type(self).__name__}: clip_norm must be > 0 or None, got {clip_norm}")
        self.learning_rate = learning_rate
        self.clip_norm = None if clip_norm is None else float(clip_norm)
        self.iterations = 0
        self.last_global_norm = None
        self._slots = {}

    def apply(self, params, grads):
        """One update. ``params`` and ``grads`` are dicts ``name -> array`` with the same
        names (a name missing from ``grads`` or mapped to ``None`` is left unchanged).
        Returns an OrderedDict of the updated arrays, in ``params``' order and dtypes."""
        unknown = sorted(set(grads) - set(params))
        if unknown:
            raise ValueError(f"{type(self).__name__}.apply: gradients for unknown parameters {unknown}")
        for name, g in grads.items():
            if g is not None and np.shape(g) != np.shape(params[name]):
                raise ValueError(
                    f"{type(self).__name__}.apply: gradient {name!r} has shape {np.shape(g)}, "
                    f"parameter has {np.shape(params[name])}"
                )
        if self.clip_norm is not None:
            grads, self.last_global_norm = clip_by_global_norm(grads, self.clip_norm)
        else:
            self.last_global_norm = global_norm(grads)
        self.iterations += 1
        out = OrderedDict()
        for name, p in params.items():
            p = np.asarray(p)
            g = grads.get(name)
            if g is None:
                out[name] = p
                continue
            g = np.asarray(g, dtype=p.dtype)
            out[name] = self._update(name, p, g).astype(p.dtype, copy=False)
        return out

    def state_dict(self):
        """Slots and step count as a flat dict of arrays (saveable with save_weights)."""
        out = OrderedDict([("iterations", np.asarray(self.iterations, dtype=np.int64))])
        for (slot, name), value in self._slots.items():
            out[f"{slot}/{name}"] = value
        return out


class SGD(_Optimizer):
    """``p -= lr * g`` (with ``momentum``: TF1's MomentumOptimizer, ``a = m * a + g;
    p -= lr * a``, or Nesterov's variant)."""

    def __init__(self, learning_rate=0.1, momentum=0.0, nesterov=False, clip_norm=None):
        super().__init__(learning_rate, clip_norm)
        if not 0.0 <= float(momentum) < 1.0:
            raise ValueError(f"SGD: momentum must be in [0, 1), got {momentum}")
        self.momentum = float(momentum)
        self.nesterov = bool(nesterov)

    def _update(self, name, p, g):
        lr = np.asarray(self.learning_rate, dtype=p.dtype)
        if self.momentum == 0.0:
            return p - lr * g
        m = np.asarray(self.momentum, dtype=p.dtype)
        acc = self._slots.get(("momentum", name))
        acc = g.copy() if acc is None else m * acc + g
        self._slots[("momentum", name)] = acc
        if self.nesterov:
            return p - lr * (g + m * acc)
        return p - lr * acc


class Adam(_Optimizer):
    """TF1's ``AdamOptimizer``: ``lr_t = lr * sqrt(1 - b2^t) / (1 - b1^t)``,
    ``m = b1 m + (1 - b1) g``, ``v = b2 v + (1 - b2) g^2``, ``p -= lr_t m / (sqrt(v) + eps)``."""

    def __init__(self, learning_rate=0.001, beta1=0.9, beta2=0.999, epsilon=1e-8, clip_norm=None):
        super().__init__(learning_rate, clip_norm)
        for nm, b in (("beta1", beta1), ("beta2", beta2)):
            if not 0.0 <= float(b) < 1.0:
                raise ValueError(f"Adam: {nm} must be in [0, 1), got {b}")
        if not float(epsilon) > 0:
            raise ValueError(f"Adam: epsilon must be > 0, got {epsilon}")
        self.beta1, self.beta2, self.epsilon = float(beta1), float(beta2), float(epsilon)

    def _update(self, name, p, g):
        t = self.iterations
        dt = p.dtype
        b1, b2 = np.asarray(self.beta1, dtype=dt), np.asarray(self.beta2, dtype=dt)
        lr_t = np.asarray(self.learning_rate * np.sqrt(1.0 - self.beta2**t) / (1.0 - self.beta1**t), dtype=dt)
        m = self._slots.get(("m", name))
        v = self._slots.get(("v", name))
        m = (1 - b1) * g if m is None else b1 * m + (1 - b1) * g
        v = (1 - b2) * g * g if v is None else b2 * v + (1 - b2) * g * g
        self._slots[("m", name)] = m
        self._slots[("v", name)] = v
        return p - lr_t * m / (np.sqrt(v) + np.asarray(self.epsilon, dtype=dt))


def get_optimizer(optimizer, learning_rate=None, clip_norm=None):
    """An optimizer from a name (``"sgd"``, ``"adam"``) or an optimizer instance."""
    if isinstance(optimizer, _Optimizer):
        return optimizer
    if not isinstance(optimizer, str):
        raise TypeError(f"optimizer must be 'sgd', 'adam' or an optimizer object, got {type(optimizer).__name__}")
    name = optimizer.lower()
    kw = {"clip_norm": clip_norm}
    if learning_rate is not None:
        kw["learning_rate"] = learning_rate
    if name == "sgd":
        return SGD(**kw)
    if name == "adam":
        return Adam(**kw)
    raise ValueError(f"optimizer must be 'sgd' or 'adam', got {optimizer!r}")
