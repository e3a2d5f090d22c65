"""Helpers to check a backend against the reference: cell factories, seeded problems,
tolerances. Used by the test suite and by ``fastseq check``.

Tolerance rule (one place): ``max|a - b| <= rtol * max(1, max|b|)`` where ``b`` is the
reference, ``rtol`` 1e-10 for float64 and 1e-5 for float32.
"""

from __future__ import annotations

import numpy as np

from . import backend as _registry
from .nn import rnn_cell as rc

__all__ = ["RTOL", "CELL_FACTORIES", "LENGTH_PATTERNS", "make_cell", "clone_cell", "rel_error", "assert_close", "flatten", "problem", "run_driver"]

RTOL = {np.dtype(np.float64): 1e-10, np.dtype(np.float32): 1e-5}

#: name -> factory(seed) building an unbuilt cell; each factory builds the same
#: configuration every time (dropout wrappers get the given seed).
CELL_FACTORIES = {
    "rnn": lambda seed: rc.BasicRNNCell(5),
    "rnn_relu": lambda seed: rc.BasicRNNCell(5, activation="relu"),
    "gru": lambda seed: rc.GRUCell(5),
    "basic_lstm": lambda seed: rc.BasicLSTMCell(5, forget_bias=0.5),
    "lstm_full": lambda seed: rc.LSTMCell(5, use_peepholes=True, cell_clip=0.8, num_proj=3, proj_clip=0.5, forget_bias=0.7),
    "lstm_concat_state": lambda seed: rc.LSTMCell(4, num_proj=3, state_is_tuple=False),
    "multi": lambda seed: rc.MultiRNNCell([rc.GRUCell(4), rc.LSTMCell(4, use_peepholes=True)]),
    "dropout_residual": lambda seed: rc.MultiRNNCell(
        [
            rc.DropoutWrapper(rc.GRUCell(4), input_keep_prob=0.8, output_keep_prob=0.7, state_keep_prob=0.9, seed=seed),
            rc.ResidualWrapper(rc.DropoutWrapper(rc.LSTMCell(4), state_keep_prob=0.6, variational_recurrent=True, seed=seed + 1)),
        ]
    ),
}

#: name -> function(batch, steps, rng) giving sequence_length (None = no lengths)
LENGTH_PATTERNS = {
    "none": lambda B, T, rng: None,
    "mixed": lambda B, T, rng: np.array(([0, T] + list(rng.integers(1, T + 1, size=max(B - 2, 0))))[:B], dtype=np.int64),
    "full": lambda B, T, rng: np.full(B, T, dtype=np.int64),
}


def make_cell(name, seed=0):
    return CELL_FACTORIES[name](seed)


def clone_cell(name, weights, seed=0):
    """A fresh cell of configuration ``name`` holding ``weights``."""
    cell = make_cell(name, seed)
    cell.set_weights(weights)
    return cell


def flatten(x):
    """Leaves of a nested tuple/list/dict structure, in order (dicts by key order)."""
    if isinstance(x, dict):
        return [leaf for k in x for leaf in flatten(x[k])]
    if isinstance(x, (tuple, list)):
        return [leaf for v in x for leaf in flatten(v)]
    return [np.asarray(x)]


def rel_error(a, b):
    """``max|a - b| / max(1, max|b|)`` (0 for empty arrays); inf on a shape mismatch."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        return float("inf")
    if a.size == 0:
        return 0.0
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        same = np.array_equal(np.isnan(a), np.isnan(b)) and np.allclose(a[np.isfinite(b)], b[np.isfinite(b)])
        return 0.0 if same else float("inf")
    return float(np.max(np.abs(a - b)) / max(1.0, float(np.max(np.abs(b)))))


def assert_close(actual, expected, dtype, what=""):
    """Assert every leaf of ``actual`` matches ``expected`` within the dtype's tolerance."""
    rtol = RTOL[np.dtype(dtype)]
    la, le = flatten(actual), flatten(expected)
    assert len(la) == len(le), f"{what}: structure differs ({len(la)} vs {len(le)} leaves)"
    for k, (a, e) in enumerate(zip(la, le)):
        err = rel_error(a, e)
        assert err <= rtol, f"{what} leaf {k}: relative error {err:.3g} > {rtol:g} (shapes {a.shape} vs {e.shape})"


def problem(cell_name, dtype, batch=4, steps=6, depth=3, lengths="mixed", seed=0, time_major=False):
    """A seeded problem: (weights, inputs, sequence_length, cotangent rng seed)."""
    rng = np.random.default_rng(seed)
    B, T = batch, steps
    x = rng.standard_normal((T, B, depth) if time_major else (B, T, depth)).astype(dtype)
    seq = LENGTH_PATTERNS[lengths](B, T, rng)
    with _registry.use_backend("numpy"):
        cell = make_cell(cell_name, seed)
        cell.build(depth, dtype=dtype)
        weights = cell.get_weights()
    return weights, x, seq


def run_driver(driver, cell_name, weights, x, seq, dtype, time_major=False, seed=0, with_grad=True, cot_seed=123):
    """Run ``driver`` ('dynamic', 'bidirectional', 'static') on the active backend with a
    fresh cell holding ``weights``. Returns (result, grads or None) as NumPy structures."""
    from . import grad
    from .nn import rnn

    def fresh():
        return clone_cell(cell_name, weights, seed)

    if driver == "dynamic":
        fn, args, kw = rnn.dynamic_rnn, (fresh(), x), dict(sequence_length=seq, dtype=dtype, time_major=time_major)
    elif driver == "bidirectional":
        fn, args, kw = rnn.bidirectional_dynamic_rnn, (fresh(), fresh(), x), dict(sequence_length=seq, dtype=dtype, time_major=time_major)
    elif driver == "static":
        frames = list(np.asarray(x) if time_major else np.swapaxes(np.asarray(x), 0, 1))
        fn, args, kw = rnn.static_rnn, (fresh(), frames), dict(sequence_length=seq, dtype=dtype)
    else:
        raise ValueError(f"unknown driver {driver!r}")
    if not with_grad:
        return fn(*args, **kw), None
    result, pullback = grad.vjp(fn, *args, **kw)
    rng = np.random.default_rng(cot_seed)

    def cot(struct):
        if isinstance(struct, tuple):
            items = [cot(s) for s in struct]
            return type(struct)(*items) if hasattr(struct, "_fields") else tuple(items)
        if isinstance(struct, list):
            return [cot(s) for s in struct]
        return rng.standard_normal(np.shape(struct)).astype(dtype)

    cots = cot(result)
    grads = pullback(*cots)
    return result, grads
