"""Helpers shared by the parity and tutorial tests: nested structures, comparisons, cell specs."""

import importlib.util

import numpy as np

from fastseq.nn import rnn_cell

# Comparison criterion (stated once, used everywhere):
#     max|actual - expected| <= rtol * max(1, max|expected|)
# i.e. relative to the largest magnitude of the expected array, absolute below magnitude 1.
RTOL = {np.dtype(np.float64): 1e-10, np.dtype(np.float32): 1e-5}


def assert_close(actual, expected, rtol, what):
    a = np.asarray(actual, dtype=np.float64)
    b = np.asarray(expected, dtype=np.float64)
    assert a.shape == b.shape, f"{what}: shape {a.shape} != expected {b.shape}"
    if b.size == 0:
        return
    assert np.all(np.isfinite(a)), f"{what}: non-finite values"
    err = float(np.max(np.abs(a - b)))
    scale = max(1.0, float(np.max(np.abs(b))))
    assert err <= rtol * scale, (
        f"{what}: max|diff| = {err:.3e} > {rtol:g} * max(1, max|expected|) = {rtol * scale:.3e}"
    )


def flatten(x):
    """Leaves of a nested tuple/list (namedtuples included) in depth-first order, as TF's nest."""
    if isinstance(x, (tuple, list)):
        return [leaf for v in x for leaf in flatten(v)]
    return [x]


def pack_like(structure, leaves):
    """Inverse of flatten: rebuild ``structure``'s nesting (namedtuple types kept) from leaves."""
    it = iter(leaves)

    def build(s):
        if isinstance(s, tuple):
            items = [build(v) for v in s]
            return type(s)(*items) if hasattr(s, "_fields") else tuple(items)
        if isinstance(s, list):
            return [build(v) for v in s]
        return next(it)

    out = build(structure)
    rest = list(it)
    assert not rest, f"{len(rest)} leaves left over when packing"
    return out


def to_numpy(x):
    """A backend array (NumPy, or a tf.Tensor on the tensorflow backend) as NumPy."""
    if hasattr(x, "numpy") and not isinstance(x, np.ndarray):
        return np.asarray(x.numpy())
    return np.asarray(x)


def build_cell(spec):
    """The fastseq cell for a JSON cell spec (same format as tf1_oracle.build_cell)."""
    kind = spec["type"]
    kw = {k: v for k, v in spec.items() if k not in ("type", "cell", "cells")}
    if kind == "MultiRNNCell":
        return rnn_cell.MultiRNNCell([build_cell(c) for c in spec["cells"]], **kw)
    if kind in ("DropoutWrapper", "ResidualWrapper"):
        return getattr(rnn_cell, kind)(build_cell(spec["cell"]), **kw)
    return getattr(rnn_cell, kind)(**kw)


def tf1_missing_reason():
    """None when tensorflow and tf_keras are installed (checked without importing them)."""
    missing = [m for m in ("tensorflow", "tf_keras") if importlib.util.find_spec(m) is None]
    if missing:
        return (
            f"TF1 parity needs {' and '.join(missing)} (pip install tensorflow-cpu tf_keras): "
            "TF1's tf.compat.v1.nn.rnn_cell lives in tf_keras under TF_USE_LEGACY_KERAS=1"
        )
    return None
