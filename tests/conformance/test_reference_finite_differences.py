"""The reference backend's gradients against central finite differences (float64)."""

import numpy as np
import pytest

import fastseq
from fastseq.testing import CELL_FACTORIES, clone_cell, flatten, problem

EPS = 1e-6


def _loss_and_grads(driver, cell_name, weights, x, seq, time_major):
    """A scalar loss <cotangent, result> and its analytic gradients via vjp."""
    rng = np.random.default_rng(7)
    cot_cache = {}

    def run(w, xx, with_grad):
        cell = clone_cell(cell_name, w, seed=0)
        if driver == "dynamic":
            fn, args = fastseq.nn.dynamic_rnn, (cell, xx)
        else:
            fn, args = fastseq.nn.bidirectional_dynamic_rnn, (cell, cell, xx)
        kw = dict(sequence_length=seq, dtype=np.float64, time_major=time_major)
        if with_grad:
            res, pb = fastseq.vjp(fn, *args, **kw)
        else:
            res, pb = fn(*args, **kw), None
        leaves = flatten(res)
        if not cot_cache:
            cot_cache["c"] = [rng.standard_normal(l.shape) for l in leaves]
        loss = sum(float((l * c).sum()) for l, c in zip(leaves, cot_cache["c"]))
        return loss, res, pb

    _, res, pb = run(weights, x, True)
    it = iter(cot_cache["c"])

    def rebuild(s):
        if isinstance(s, tuple):
            items = [rebuild(v) for v in s]
            return type(s)(*items) if hasattr(s, "_fields") else tuple(items)
        return next(it)

    grads = pb(*rebuild(res))
    return (lambda w, xx: run(w, xx, False)[0]), grads


@pytest.mark.parametrize(
    "driver,cell_name,lengths,time_major",
    [
        ("dynamic", "rnn", "none", False),
        ("dynamic", "rnn_relu", "mixed", False),
        ("dynamic", "gru", "mixed", False),
        ("dynamic", "basic_lstm", "mixed", True),
        ("dynamic", "lstm_full", "mixed", False),
        ("dynamic", "lstm_concat_state", "none", True),
        ("dynamic", "multi", "mixed", False),
        ("dynamic", "dropout_residual", "mixed", False),
        ("bidirectional", "gru", "mixed", False),
        ("bidirectional", "lstm_full", "none", True),
    ],
)
def test_reference_gradients_match_finite_differences(driver, cell_name, lengths, time_major):
    weights, x, seq = problem(cell_name, np.float64, batch=3, steps=4, depth=3, lengths=lengths, seed=11, time_major=time_major)
    if cell_name == "dropout_residual":
        x = x[..., :1].repeat(4, axis=-1)  # residual needs input depth == units
        with fastseq.use_backend("numpy"):
            c = CELL_FACTORIES[cell_name](0)
            c.build(4, dtype=np.float64)
            weights = c.get_weights()
    with fastseq.use_backend("numpy"):
        loss, grads = _loss_and_grads(driver, cell_name, weights, x, seq, time_major)
        num = np.zeros_like(x)
        for idx in np.ndindex(x.shape):
            xp, xm = x.copy(), x.copy()
            xp[idx] += EPS
            xm[idx] -= EPS
            num[idx] = (loss(weights, xp) - loss(weights, xm)) / (2 * EPS)
        assert np.max(np.abs(num - grads.inputs)) < 1e-7
        gw = grads.weights if isinstance(grads.weights, dict) else grads.weights[0]
        rng = np.random.default_rng(0)
        for name, w in weights.items():
            for _ in range(4):  # a few random coordinates of every weight
                idx = tuple(int(rng.integers(0, n)) for n in w.shape)
                wp, wm = dict(weights), dict(weights)
                wp[name] = w.copy()
                wp[name][idx] += EPS
                wm[name] = w.copy()
                wm[name][idx] -= EPS
                numeric = (loss(wp, x) - loss(wm, x)) / (2 * EPS)
                assert abs(numeric - gw[name][idx]) < 1e-7, (name, idx, numeric, gw[name][idx])


def test_initial_state_gradient_finite_differences():
    weights, x, seq = problem("lstm_full", np.float64, batch=3, steps=4, lengths="mixed", seed=5)
    with fastseq.use_backend("numpy"):
        rng = np.random.default_rng(1)
        c0 = rng.standard_normal((3, 5))
        h0 = rng.standard_normal((3, 3))
        d_out = rng.standard_normal((3, 4, 3))
        d_c, d_h = rng.standard_normal((3, 5)), rng.standard_normal((3, 3))

        def loss(c, h):
            cell = clone_cell("lstm_full", weights)
            out, st = fastseq.nn.dynamic_rnn(cell, x, sequence_length=seq, initial_state=fastseq.nn.rnn_cell.LSTMStateTuple(c, h))
            return float((out * d_out).sum() + (st.c * d_c).sum() + (st.h * d_h).sum())

        cell = clone_cell("lstm_full", weights)
        _, pb = fastseq.vjp(fastseq.nn.dynamic_rnn, cell, x, sequence_length=seq, initial_state=fastseq.nn.rnn_cell.LSTMStateTuple(c0, h0))
        g = pb(d_out, fastseq.nn.rnn_cell.LSTMStateTuple(d_c, d_h))
        for which, base in (("c", c0), ("h", h0)):
            num = np.zeros_like(base)
            for idx in np.ndindex(base.shape):
                p, m = base.copy(), base.copy()
                p[idx] += EPS
                m[idx] -= EPS
                args_p = (p, h0) if which == "c" else (c0, p)
                args_m = (m, h0) if which == "c" else (c0, m)
                num[idx] = (loss(*args_p) - loss(*args_m)) / (2 * EPS)
            assert np.max(np.abs(num - getattr(g.initial_state, which))) < 1e-7
