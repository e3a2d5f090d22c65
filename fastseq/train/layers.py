"""A dense (fully connected) output layer with its gradient.

This is the ``tf.layers.dense`` / ``tf.contrib.layers.fully_connected(activation_fn=None)``
the tutorials put on top of an RNN: ``y = x @ kernel + bias`` over the last axis, so the
same weights serve every time step of a ``[B, T, H]`` output (the tutorials' "flatten the
first two dimensions" trick, done without reshaping by hand).

Weights are NumPy arrays named as TF1 names them (``dense/kernel`` ``[H, C]``,
``dense/bias`` ``[C]``); the kernel starts glorot-uniform (TF1's default), the bias at zero.
The arithmetic is plain NumPy on every backend: the recurrent part is where backends differ.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

from ._rng import generator

__all__ = ["Dense"]


class Dense:
    """``y = x @ kernel + bias`` on the last axis of ``x`` (``[..., H] -> [..., units]``).

    units: output depth. name: the variable scope (``"dense"`` gives ``dense/kernel``).
    The weights are created on the first call or by :meth:`build`, with the global fastseq
    RNG (:func:`fastseq.set_seed`) unless ``seed`` is given.
    """

    def __init__(self, units, use_bias=True, name="dense", seed=None, dtype=None):
        if not isinstance(units, (int, np.integer)) or isinstance(units, bool) or units < 1:
            raise ValueError(f"Dense: units must be a positive int, got {units!r}")
        self.units = int(units)
        self.use_bias = bool(use_bias)
        self.name = str(name)
        self.seed = seed
        self.dtype = None if dtype is None else np.dtype(dtype)
        self.kernel = None
        self.bias = None

    # ------------------------------------------------------------------ weights
    @property
    def built(self):
        return self.kernel is not None

    @property
    def input_depth(self):
        return None if self.kernel is None else self.kernel.shape[0]

    def build(self, input_depth, dtype=None):
        """Create the weights for inputs of depth ``input_depth`` (glorot-uniform kernel)."""
        if not isinstance(input_depth, (int, np.integer)) or input_depth < 1:
            raise ValueError(f"Dense.build: input_depth must be a positive int, got {input_depth!r}")
        dtype = np.dtype(dtype or self.dtype or "float32")
        if dtype.kind != "f":
            raise TypeError(f"Dense.build: dtype must be a float type, got {dtype}")
        rng = np.random.default_rng(self.seed) if self.seed is not None else generator()
        limit = np.sqrt(6.0 / (int(input_depth) + self.units))
        self.kernel = rng.uniform(-limit, limit, size=(int(input_depth), self.units)).astype(dtype)
        self.bias = np.zeros(self.units, dtype=dtype) if self.use_bias else None
        self.dtype = dtype
        return self

    def get_weights(self):
        """OrderedDict ``{name/kernel, name/bias}`` of NumPy arrays (copies)."""
        if not self.built:
            raise ValueError(f"Dense {self.name!r} has no weights yet: call build(input_depth) or run it once")
        out = OrderedDict([(f"{self.name}/kernel", self.kernel.copy())])
        if self.use_bias:
            out[f"{self.name}/bias"] = self.bias.copy()
        return out

    def set_weights(self, mapping):
        """Set weights from a mapping with the names of :meth:`get_weights`; checks names and
        shapes. Unbuilt layers take their shapes from the mapping."""
        kname, bname = f"{self.name}/kernel", f"{self.name}/bias"
        expected = {kname} | ({bname} if self.use_bias else set())
        got = set(mapping)
        if got != expected:
            missing, unknown = sorted(expected - got), sorted(got - expected)
            raise ValueError(f"Dense {self.name!r}.set_weights: missing {missing}, unknown {unknown}")
        kernel = np.asarray(mapping[kname])
        if kernel.ndim != 2 or kernel.shape[1] != self.units:
            raise ValueError(f"Dense {self.name!r}.set_weights: {kname} must have shape [in, {self.units}], got {kernel.shape}")
        if self.built and kernel.shape != self.kernel.shape:
            raise ValueError(f"Dense {self.name!r}.set_weights: {kname} has shape {kernel.shape}, expected {self.kernel.shape}")
        dtype = self.dtype if self.built else (kernel.dtype if kernel.dtype.kind == "f" else np.dtype("float32"))
        self.kernel = np.array(kernel, dtype=dtype)
        if self.use_bias:
            bias = np.asarray(mapping[bname])
            if bias.shape != (self.units,):
                raise ValueError(f"Dense {self.name!r}.set_weights: {bname} must have shape ({self.units},), got {bias.shape}")
            self.bias = np.array(bias, dtype=dtype)
        self.dtype = np.dtype(dtype)

    # ------------------------------------------------------------------ compute
    def _check(self, x):
        x = np.asarray(x)
        if x.ndim < 1:
            raise ValueError(f"Dense {self.name!r}: inputs must have rank >= 1, got a scalar")
        if not self.built:
            self.build(x.shape[-1], dtype=x.dtype if x.dtype.kind == "f" else None)
        if x.shape[-1] != self.kernel.shape[0]:
            raise ValueError(
                f"Dense {self.name!r}: inputs' last axis must be {self.kernel.shape[0]}, got shape {x.shape}"
            )
        return x

    def __call__(self, x):
        return self.forward(x)

    def forward(self, x):
        """``x [..., H] -> [..., units]``."""
        x = self._check(x)
        y = np.matmul(x, self.kernel.astype(x.dtype, copy=False) if x.dtype.kind == "f" else self.kernel)
        if self.use_bias:
            y = y + self.bias.astype(y.dtype, copy=False)
        return y

    def backward(self, x, d_y):
        """Gradients for ``y = forward(x)`` given ``d_y [..., units]``.

        Returns ``(d_x [..., H], grads)`` with ``grads`` keyed like :meth:`get_weights`.
        """
        x = self._check(x)
        d_y = np.asarray(d_y, dtype=x.dtype)
        if d_y.shape != x.shape[:-1] + (self.units,):
            raise ValueError(
                f"Dense {self.name!r}.backward: d_y must have shape {x.shape[:-1] + (self.units,)}, got {d_y.shape}"
            )
        x2 = x.reshape(-1, x.shape[-1])
        dy2 = d_y.reshape(-1, self.units)
        grads = OrderedDict([(f"{self.name}/kernel", x2.T @ dy2)])
        if self.use_bias:
            grads[f"{self.name}/bias"] = dy2.sum(axis=0)
        d_x = np.matmul(d_y, self.kernel.astype(x.dtype, copy=False).T)
        return d_x, grads
