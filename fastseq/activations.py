"""Activations by TF1 name, with the derivatives the reference backend needs.

Cells accept a name ("tanh", "relu", ...) or a callable. A callable is mapped to its
name when it is a known function from NumPy, TensorFlow, Keras or ``math`` (``np.tanh``,
``tf.nn.relu``, ``tf.sigmoid`` ...); anything else is rejected, because every backend must
compute the same function and its exact derivative.
"""

from __future__ import annotations

import numpy as np

from .contract import ACTIVATIONS

__all__ = ["resolve", "forward", "derivative", "sigmoid", "ACTIVATIONS"]

_ALIASES = {"identity": "linear", "none": "linear", "logistic": "sigmoid", "hard_tanh": None}


def resolve(activation, argname: str = "activation") -> str:
    """Canonical activation name for a name, a known callable or None (tanh)."""
    if activation is None:
        return "tanh"
    if isinstance(activation, str):
        name = activation.strip().lower()
        name = _ALIASES.get(name, name)
        if name in ACTIVATIONS:
            return name
        raise ValueError(f"{argname} must be one of {list(ACTIVATIONS)} (or a matching callable), got {activation!r}")
    if callable(activation):
        module = getattr(activation, "__module__", "") or ""
        fname = (getattr(activation, "__name__", "") or "").lower()
        known_module = module.split(".")[0] in ("numpy", "tensorflow", "keras", "tf_keras", "math", "fastseq", "torch")
        fname = _ALIASES.get(fname, fname)
        if known_module and fname in ACTIVATIONS:
            return fname
        raise ValueError(
            f"{argname}: cannot use the callable {activation!r}; fastseq supports {list(ACTIVATIONS)} "
            "(pass the name, or the NumPy/TensorFlow function of that name)"
        )
    raise TypeError(f"{argname} must be a string, a callable or None, got {type(activation).__name__}")


def forward(name: str, x):
    """Apply the activation (NumPy)."""
    if name == "tanh":
        return np.tanh(x)
    if name == "sigmoid":
        return sigmoid(x)
    if name == "relu":
        return np.maximum(x, 0)
    if name == "relu6":
        return np.minimum(np.maximum(x, 0), 6)
    if name == "elu":
        return np.where(x > 0, x, np.expm1(np.minimum(x, 0)))
    if name == "softsign":
        return x / (1 + np.abs(x))
    if name == "softplus":
        return np.logaddexp(0, x)
    if name == "linear":
        return x.copy()
    raise ValueError(f"unknown activation {name!r}")


def derivative(name: str, x, y):
    """d act(x) / dx given the input ``x`` and the output ``y = act(x)``."""
    if name == "tanh":
        return 1 - y * y
    if name == "sigmoid":
        return y * (1 - y)
    if name == "relu":
        return (x > 0).astype(x.dtype)
    if name == "relu6":
        return ((x > 0) & (x < 6)).astype(x.dtype)
    if name == "elu":
        return np.where(x > 0, 1, y + 1).astype(x.dtype)
    if name == "softsign":
        return 1 / (1 + np.abs(x)) ** 2
    if name == "softplus":
        return sigmoid(x)
    if name == "linear":
        return np.ones_like(x)
    raise ValueError(f"unknown activation {name!r}")


def sigmoid(x):
    """Numerically stable logistic function."""
    out = np.empty_like(x)
    pos = x >= 0
    out[pos] = 1 / (1 + np.exp(-x[pos]))
    ex = np.exp(x[~pos])
    out[~pos] = ex / (1 + ex)
    return out
