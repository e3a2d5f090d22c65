"""Parity with TensorFlow's own TF1 recurrent code.

TF1 (``tf.compat.v1.nn.rnn_cell`` + ``tf.compat.v1.nn.*_rnn`` in graph mode) runs once per test
session in a subprocess (see conftest.py / tf1_oracle.py); it draws the inputs, initial states,
cotangents and weights, and reports outputs, final states, gradients (``tf.compat.v1.gradients``)
and its variable list.  Each test builds the same cell in fastseq, loads TF's weights by name
and compares, on every installed backend.

Criterion: ``max|fastseq - tf1| <= rtol * max(1, max|tf1|)`` per array, rtol 1e-10 (float64)
and 1e-5 (float32).
"""

import json

import numpy as np
import pytest

import fastseq
from fastseq import nn

from ._cases import PARITY_CASES, SELFCHECK_CASES
from ._helpers import RTOL, assert_close, build_cell, flatten, pack_like, tf1_missing_reason, to_numpy

_reason = tf1_missing_reason()
if _reason:
    pytest.skip(_reason, allow_module_level=True)

pytestmark = pytest.mark.tf1

REFERENCE = "numpy"
BIDI = ("bidirectional_dynamic_rnn", "static_bidirectional_rnn")
GRAD_CASES = [c for c in PARITY_CASES if c["driver"] != "raw_rnn"]
RAW_CASES = [c for c in PARITY_CASES if c["driver"] == "raw_rnn"]

# Every case runs on the reference backend.  On the other backends (already held to the
# reference by tests/conformance) the default run takes a core subset that still covers every
# cell family, wrapper, driver, both dtypes, time-major and lengths with 0 and T; the full
# matrix on every backend is marked slow (pytest -m slow).
CORE_IDS = {
    "dyn-basic_rnn-f64", "dyn-basic_rnn_relu-f32-tm", "dyn-gru-f64", "dyn-gru-f32-tm",
    "dyn-basic_lstm-f64", "dyn-basic_lstm_concat-f32-tm", "dyn-lstm_all_concat-f64",
    "dyn-lstm_proj-f32-lens", "dyn-multi-f64", "dyn-dropout-f32-tm", "dyn-residual-f64",
    "bidi-lstm-gru-f64", "bidi-shared-lstm_proj-f32-tm", "static-lstm_peep_clip-f64",
    "sbidi-shared-gru-f32", "raw-doc-lstm-f32", "raw-custom-multi_wrapped-f64",
}
assert CORE_IDS <= {c["id"] for c in PARITY_CASES}


def _ids(cases):
    return [c["id"] for c in cases]


# ----------------------------------------------------------------------------- setup helpers


def _tf_weights(res):
    names = [str(n) for n in res["var_names"]]
    shapes = [tuple(s) for s in json.loads(str(res["var_shapes"]))]
    return names, shapes


def _split_scope(names, prefix):
    return [n[len(prefix):] for n in names if n.startswith(prefix)]


def _make_cells(spec, res):
    """fastseq cell(s) for the case, built for the input depth and loaded with TF's weights."""
    dtype = np.dtype(spec["dtype"])
    cell = build_cell(spec["cell"])
    cell.build(spec["I"], dtype=dtype)
    names, _ = _tf_weights(res)
    if spec["driver"] not in BIDI:
        cell.set_weights({n: res[f"w/{n}"] for n in names})
        return cell, None
    cell_bw = cell if spec.get("cell_bw") == "same" else build_cell(spec["cell_bw"])
    if cell_bw is not cell:
        cell_bw.build(spec["I"], dtype=dtype)
    cell.set_weights({n: res[f"w/fw/{n}"] for n in _split_scope(names, "fw/")})
    if cell_bw is not cell:
        cell_bw.set_weights({n: res[f"w/bw/{n}"] for n in _split_scope(names, "bw/")})
    return cell, cell_bw


def _leaves(res, prefix):
    out, k = [], 0
    while f"{prefix}/{k}" in res:
        out.append(res[f"{prefix}/{k}"])
        k += 1
    return out


def _initial_state(cell, res, prefix, B, dtype):
    leaves = _leaves(res, prefix)
    if not leaves:
        return None
    template = cell.zero_state(B, dtype)
    return pack_like(template, leaves)


# ----------------------------------------------------------------------------- names and shapes


@pytest.mark.parametrize("spec", PARITY_CASES, ids=_ids(PARITY_CASES))
def test_weight_names_shapes_and_order(spec, tf1_case):
    """cell.get_weights() lists exactly TF1's variables (scope and ':0' stripped), in creation order."""
    res = tf1_case(spec["id"])
    names, shapes = _tf_weights(res)
    dtype = np.dtype(spec["dtype"])
    cell = build_cell(spec["cell"])
    cell.build(spec["I"], dtype=dtype)
    got = [(n, tuple(w.shape)) for n, w in cell.get_weights().items()]
    if spec["driver"] in BIDI:
        got = [("fw/" + n, s) for n, s in got]
        if spec.get("cell_bw") != "same":
            cell_bw = build_cell(spec["cell_bw"])
            cell_bw.build(spec["I"], dtype=dtype)
            got += [("bw/" + n, tuple(w.shape)) for n, w in cell_bw.get_weights().items()]
    assert got == list(zip(names, shapes))


@pytest.mark.parametrize(
    "spec", [c for c in PARITY_CASES if c["id"].startswith("dyn-") and c["id"].endswith("-f64")],
    ids=lambda c: c["id"],
)
def test_default_initialisers(spec, tf1_case):
    """Fresh weights follow TF1's initialisers: constant biases equal TF's (zeros, GRU gates 1.0);
    other variables lie within TF's glorot-uniform bound and are not constant."""
    res = tf1_case(spec["id"])
    names, shapes = _tf_weights(res)
    cell = build_cell(spec["cell"])
    cell.build(spec["I"], dtype=np.dtype(spec["dtype"]))
    fresh = cell.get_weights()
    for name, shape in zip(names, shapes):
        tf0 = res[f"w0/{name}"]
        w = np.asarray(fresh[name])
        if name.endswith("bias"):
            np.testing.assert_array_equal(w, tf0, err_msg=name)
        else:
            fan_in, fan_out = (shape[0], shape[0]) if len(shape) == 1 else shape
            limit = np.sqrt(6.0 / (fan_in + fan_out))
            assert np.all(np.abs(w) <= limit), f"{name}: beyond glorot bound {limit}"
            assert np.all(np.abs(tf0) <= limit)  # same bound holds for TF's own draw
            assert np.ptp(w) > 0, f"{name}: constant initial values"


# ----------------------------------------------------------------------------- forward + gradients


def _run_fastseq(spec, res):
    """Run the case in fastseq (active backend); return (flat outputs, flat final state,
    grads from the pullback of TF's cotangents, (cell, cell_bw))."""
    dtype = np.dtype(spec["dtype"])
    B = spec["B"]
    driver = spec["driver"]
    cell, cell_bw = _make_cells(spec, res)
    x = res["x"]
    sl = res.get("seq_len")
    tm = spec.get("time_major", False)
    if driver == "dynamic_rnn":
        init = _initial_state(cell, res, "init", B, dtype)
        result, pullback = fastseq.vjp(
            nn.dynamic_rnn, cell, x, sequence_length=sl, initial_state=init,
            dtype=None if init is not None else dtype, time_major=tm,
        )
        outputs, state = result
        out_leaves, state_leaves = flatten(outputs), flatten(state)
    elif driver == "bidirectional_dynamic_rnn":
        init_fw = _initial_state(cell, res, "init_fw", B, dtype)
        init_bw = _initial_state(cell_bw, res, "init_bw", B, dtype)
        result, pullback = fastseq.vjp(
            nn.bidirectional_dynamic_rnn, cell, cell_bw, x, sequence_length=sl,
            initial_state_fw=init_fw, initial_state_bw=init_bw,
            dtype=None if init_fw is not None else dtype, time_major=tm,
        )
        outputs, state = result
        out_leaves, state_leaves = flatten(outputs), flatten(state)
    elif driver == "static_rnn":
        init = _initial_state(cell, res, "init", B, dtype)
        result, pullback = fastseq.vjp(
            nn.static_rnn, cell, list(x), initial_state=init,
            dtype=None if init is not None else dtype, sequence_length=sl,
        )
        outputs, state = result
        assert isinstance(outputs, list) and len(outputs) == spec["T"]
        out_leaves = [np.stack([to_numpy(o) for o in outputs])]
        state_leaves = flatten(state)
    elif driver == "static_bidirectional_rnn":
        init_fw = _initial_state(cell, res, "init_fw", B, dtype)
        init_bw = _initial_state(cell_bw, res, "init_bw", B, dtype)
        result, pullback = fastseq.vjp(
            nn.static_bidirectional_rnn, cell, cell_bw, list(x),
            initial_state_fw=init_fw, initial_state_bw=init_bw,
            dtype=None if init_fw is not None else dtype, sequence_length=sl,
        )
        outputs, state_fw, state_bw = result
        assert isinstance(outputs, list) and len(outputs) == spec["T"]
        out_leaves = [np.stack([to_numpy(o) for o in outputs])]
        state_leaves = flatten((state_fw, state_bw))
    else:
        raise AssertionError(driver)

    # cotangents: TF's, packed into fastseq's result structure
    d_out = _leaves(res, "d_out")
    d_state = _leaves(res, "d_state")
    if driver == "dynamic_rnn" or driver == "bidirectional_dynamic_rnn":
        grads = pullback(pack_like(result[0], d_out), pack_like(result[1], d_state))
    elif driver == "static_rnn":
        grads = pullback(list(d_out[0]), pack_like(result[1], d_state))
    else:
        d_sfw_sbw = pack_like((result[1], result[2]), d_state)
        grads = pullback(list(d_out[0]), d_sfw_sbw[0], d_sfw_sbw[1])
    return out_leaves, state_leaves, grads, (cell, cell_bw)


@pytest.mark.parametrize("spec", GRAD_CASES, ids=_ids(GRAD_CASES))
def test_reference_matches_tf1(spec, tf1_case):
    with fastseq.use_backend(REFERENCE):
        _check_against_tf1(spec, tf1_case(spec["id"]), REFERENCE)


_CORE_GRAD = [c for c in GRAD_CASES if c["id"] in CORE_IDS]
_REST_GRAD = [c for c in GRAD_CASES if c["id"] not in CORE_IDS]


@pytest.mark.parametrize("spec", _CORE_GRAD, ids=_ids(_CORE_GRAD))
def test_backend_matches_tf1(spec, tf1_case, backend_name):
    if backend_name == REFERENCE:
        pytest.skip("the reference backend runs every case in test_reference_matches_tf1")
    _check_against_tf1(spec, tf1_case(spec["id"]), backend_name)


@pytest.mark.slow
@pytest.mark.parametrize("spec", _REST_GRAD, ids=_ids(_REST_GRAD))
def test_backend_matches_tf1_full(spec, tf1_case, backend_name):
    if backend_name == REFERENCE:
        pytest.skip("the reference backend runs every case in test_reference_matches_tf1")
    _check_against_tf1(spec, tf1_case(spec["id"]), backend_name)


def _check_against_tf1(spec, res, backend_name):
    rtol = RTOL[np.dtype(spec["dtype"])]
    driver = spec["driver"]
    out_leaves, state_leaves, grads, (cell, cell_bw) = _run_fastseq(spec, res)
    tag = f"[{backend_name}] {spec['id']}"

    tf_out, tf_state = _leaves(res, "out"), _leaves(res, "state")
    assert len(out_leaves) == len(tf_out), f"{tag}: output structure"
    assert len(state_leaves) == len(tf_state), f"{tag}: state structure"
    for k, (a, b) in enumerate(zip(out_leaves, tf_out)):
        assert_close(to_numpy(a), b, rtol, f"{tag} outputs[{k}]")
    for k, (a, b) in enumerate(zip(state_leaves, tf_state)):
        assert_close(to_numpy(a), b, rtol, f"{tag} final state leaf {k}")

    # gradient w.r.t. the inputs
    g_x = grads.inputs
    if driver in ("static_rnn", "static_bidirectional_rnn"):
        assert isinstance(g_x, list) and len(g_x) == spec["T"], f"{tag}: grads.inputs must be a list"
        g_x = np.stack([to_numpy(g) for g in g_x])
    assert_close(to_numpy(g_x), res["g_x"], rtol, f"{tag} d/d inputs")

    # gradient w.r.t. the initial state (only when one was passed: TF differentiates that tensor)
    if driver in BIDI:
        tf_g0 = _leaves(res, "g_init_fw") + _leaves(res, "g_init_bw")
    else:
        tf_g0 = _leaves(res, "g_init")
    if tf_g0:
        g0 = flatten(grads.initial_state)
        assert len(g0) == len(tf_g0), f"{tag}: initial_state gradient structure"
        for k, (a, b) in enumerate(zip(g0, tf_g0)):
            assert_close(to_numpy(a), b, rtol, f"{tag} d/d initial_state leaf {k}")

    # gradients w.r.t. every weight, by TF1 name
    names, _ = _tf_weights(res)
    if driver in BIDI:
        g_fw, g_bw = grads.weights
        expect_fw = {n: res[f"g_w/fw/{n}"] for n in _split_scope(names, "fw/")}
        if cell_bw is cell:
            # one shared variable in TF: its gradient is the sum over both directions;
            # fastseq documents both dicts as that sum
            expect_bw = expect_fw
        else:
            expect_bw = {n: res[f"g_w/bw/{n}"] for n in _split_scope(names, "bw/")}
        pairs = [("fw", g_fw, expect_fw), ("bw", g_bw, expect_bw)]
    else:
        pairs = [("", grads.weights, {n: res[f"g_w/{n}"] for n in names})]
    for side, got, expect in pairs:
        assert list(got) == list(expect), f"{tag}: {side} weight-gradient names {list(got)} != TF1 {list(expect)}"
        for n in expect:
            assert_close(to_numpy(got[n]), expect[n], rtol, f"{tag} d/d {side + '/' if side else ''}{n}")


# ----------------------------------------------------------------------------- raw_rnn


def _raw_rnn_fastseq(spec, res):
    """The same loop_fns as tf1_oracle._raw_rnn_graph, with TF ops swapped for NumPy."""
    dtype = np.dtype(spec["dtype"])
    cell = build_cell(spec["cell"])
    names, _ = _tf_weights(res)
    cell.build(spec["I"], dtype=dtype)
    cell.set_weights({n: res[f"w/{n}"] for n in names})
    inputs = res["x"]  # [T, B, I]
    max_time, batch_size, input_depth = inputs.shape
    sequence_length = res["seq_len"]

    if spec["raw_mode"] == "doc":

        def loop_fn(time, cell_output, cell_state, loop_state):
            emit_output = cell_output  # == None for time == 0
            if cell_output is None:  # time == 0
                next_cell_state = cell.zero_state(batch_size, dtype)
            else:
                next_cell_state = cell_state
            elements_finished = time >= sequence_length
            finished = np.all(elements_finished)
            next_input = (
                np.zeros([batch_size, input_depth], dtype=dtype) if finished else inputs[time]
            )
            next_loop_state = None
            return (elements_finished, next_input, next_cell_state, emit_output, next_loop_state)

    else:
        init = _initial_state(cell, res, "init", batch_size, dtype)
        out_size = int(cell.output_size)

        def loop_fn(time, cell_output, cell_state, loop_state):
            if cell_output is None:
                next_cell_state = init
                emit_output = (np.zeros([out_size], dtype=dtype), np.zeros([1], dtype=dtype))
                next_loop_state = np.zeros([batch_size, out_size], dtype=dtype)
            else:
                next_cell_state = cell_state
                emit_output = (cell_output, np.sum(cell_output, axis=1, keepdims=True))
                next_loop_state = loop_state + cell_output
            elements_finished = time >= sequence_length
            finished = np.all(elements_finished)
            next_input = (
                np.zeros([batch_size, input_depth], dtype=dtype) if finished else 0.5 * inputs[time]
            )
            return elements_finished, next_input, next_cell_state, emit_output, next_loop_state

    emit_ta, final_state, final_loop_state = nn.raw_rnn(cell, loop_fn)
    emit = [ta.stack() for ta in flatten(emit_ta)]
    return emit, flatten(final_state), flatten(final_loop_state) if final_loop_state is not None else []


@pytest.mark.parametrize("spec", RAW_CASES, ids=_ids(RAW_CASES))
def test_raw_rnn_reference_matches_tf1(spec, tf1_case):
    with fastseq.use_backend(REFERENCE):
        _check_raw_rnn(spec, tf1_case(spec["id"]), REFERENCE)


_CORE_RAW = [c for c in RAW_CASES if c["id"] in CORE_IDS]
_REST_RAW = [c for c in RAW_CASES if c["id"] not in CORE_IDS]


@pytest.mark.parametrize("spec", _CORE_RAW, ids=_ids(_CORE_RAW))
def test_raw_rnn_backend_matches_tf1(spec, tf1_case, backend_name):
    if backend_name == REFERENCE:
        pytest.skip("the reference backend runs every case in test_raw_rnn_reference_matches_tf1")
    _check_raw_rnn(spec, tf1_case(spec["id"]), backend_name)


@pytest.mark.slow
@pytest.mark.parametrize("spec", _REST_RAW, ids=_ids(_REST_RAW))
def test_raw_rnn_backend_matches_tf1_full(spec, tf1_case, backend_name):
    if backend_name == REFERENCE:
        pytest.skip("the reference backend runs every case in test_raw_rnn_reference_matches_tf1")
    _check_raw_rnn(spec, tf1_case(spec["id"]), backend_name)


def _check_raw_rnn(spec, res, backend_name):
    rtol = RTOL[np.dtype(spec["dtype"])]
    tag = f"[{backend_name}] {spec['id']}"
    emit, state, loop_state = _raw_rnn_fastseq(spec, res)
    tf_out, tf_state, tf_loop = _leaves(res, "out"), _leaves(res, "state"), _leaves(res, "loop_state")
    assert len(emit) == len(tf_out), f"{tag}: emit structure"
    assert len(state) == len(tf_state), f"{tag}: state structure"
    assert len(loop_state) == len(tf_loop), f"{tag}: loop_state structure"
    for k, (a, b) in enumerate(zip(emit, tf_out)):
        assert_close(to_numpy(a), b, rtol, f"{tag} emit[{k}].stack()")
    for k, (a, b) in enumerate(zip(state, tf_state)):
        assert_close(to_numpy(a), b, rtol, f"{tag} final state leaf {k}")
    for k, (a, b) in enumerate(zip(loop_state, tf_loop)):
        assert_close(to_numpy(a), b, rtol, f"{tag} final loop_state leaf {k}")


# ----------------------------------------------------------------------------- oracle self-check


def _np_lstm_dynamic(cfg, w, x, lengths, init_leaves):
    """A plain NumPy TF1 LSTMCell + dynamic_rnn (batch-major), written from TF1's equations.

    Returns (outputs [B, T, P], state leaves).  Independent of fastseq and of TF."""
    H = cfg["num_units"]
    P = cfg.get("num_proj") or H
    tup = cfg.get("state_is_tuple", True)
    peep = cfg.get("use_peepholes", False)
    fb = cfg.get("forget_bias", 1.0)
    cclip, pclip = cfg.get("cell_clip"), cfg.get("proj_clip")
    sig = lambda z: 1.0 / (1.0 + np.exp(-z))  # noqa: E731
    kernel, bias = w["lstm_cell/kernel"], w["lstm_cell/bias"]
    if tup:
        c, m = init_leaves[0].copy(), init_leaves[1].copy()
    else:
        c, m = init_leaves[0][:, :H].copy(), init_leaves[0][:, H:].copy()
    Bn, Tn, _ = x.shape
    out = np.zeros((Bn, Tn, P))
    for t in range(Tn):
        z = np.concatenate([x[:, t], m], axis=1) @ kernel + bias
        i, j, f, o = np.split(z, 4, axis=1)
        if peep:
            c_new = sig(f + fb + w["lstm_cell/w_f_diag"] * c) * c + sig(i + w["lstm_cell/w_i_diag"] * c) * np.tanh(j)
        else:
            c_new = sig(f + fb) * c + sig(i) * np.tanh(j)
        if cclip is not None:
            c_new = np.clip(c_new, -cclip, cclip)
        if peep:
            m_new = sig(o + w["lstm_cell/w_o_diag"] * c_new) * np.tanh(c_new)
        else:
            m_new = sig(o) * np.tanh(c_new)
        if cfg.get("num_proj"):
            m_new = m_new @ w["lstm_cell/projection/kernel"]
            if pclip is not None:
                m_new = np.clip(m_new, -pclip, pclip)
        live = (t < lengths)[:, None]
        c = np.where(live, c_new, c)
        m = np.where(live, m_new, m)
        out[:, t] = np.where(live, m_new, 0.0)
    return out, ([c, m] if tup else [np.concatenate([c, m], axis=1)])


@pytest.mark.parametrize("spec", SELFCHECK_CASES, ids=_ids(SELFCHECK_CASES))
def test_oracle_against_numpy_lstm(spec, tf1_case):
    """The oracle itself: TF1 forward numbers equal an independent NumPy LSTM to 1e-12, and
    TF1's gradients match central finite differences of that NumPy LSTM along a random direction."""
    res = tf1_case(spec["id"])
    cfg = spec["cell"]
    names, _ = _tf_weights(res)
    w = {n: res[f"w/{n}"] for n in names}
    x, lengths, init = res["x"], res["seq_len"], _leaves(res, "init")
    out, state = _np_lstm_dynamic(cfg, w, x, lengths, init)
    assert_close(out, res["out/0"], 1e-12, "TF1 outputs vs NumPy LSTM")
    for k, s in enumerate(state):
        assert_close(s, res[f"state/{k}"], 1e-12, f"TF1 state leaf {k} vs NumPy LSTM")

    d_out, d_state = res["d_out/0"], _leaves(res, "d_state")

    def loss(x_, init_, w_):
        o, s = _np_lstm_dynamic(cfg, w_, x_, lengths, init_)
        return np.sum(o * d_out) + sum(np.sum(a * d) for a, d in zip(s, d_state))

    rng = np.random.default_rng(0)
    vx = rng.standard_normal(x.shape)
    vi = [rng.standard_normal(a.shape) for a in init]
    vw = {n: rng.standard_normal(a.shape) for n, a in w.items()}
    eps = 1e-6
    plus = loss(x + eps * vx, [a + eps * v for a, v in zip(init, vi)], {n: w[n] + eps * vw[n] for n in w})
    minus = loss(x - eps * vx, [a - eps * v for a, v in zip(init, vi)], {n: w[n] - eps * vw[n] for n in w})
    fd = (plus - minus) / (2 * eps)
    analytic = np.sum(res["g_x"] * vx)
    analytic += sum(np.sum(res[f"g_init/{k}"] * v) for k, v in enumerate(vi))
    analytic += sum(np.sum(res[f"g_w/{n}"] * vw[n]) for n in w)
    assert abs(fd - analytic) <= 1e-6 * max(1.0, abs(analytic)), (fd, analytic)
    # every TF gradient array is actually exercised (non-zero) in this case
    for n in names:
        assert np.any(res[f"g_w/{n}"] != 0), n
