"""The tensorflow backend's layer ops against the numpy reference backend: forward, final
state and every gradient (inputs, initial state, params), float64 to 1e-10 and float32 to
1e-5 relative, for every cell option, reverse, state masks and lengths including 0 and T.
Also: traces are not repeated for new batch sizes or lengths, and the XLA switch."""

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow", reason="tensorflow is not installed (pip install 'fastseq[tensorflow]')")

from fastseq.contract import ACTIVATIONS, CellSpec  # noqa: E402
from fastseq.reference import NumpyBackend  # noqa: E402
from fastseq.testing import assert_close  # noqa: E402

REF = NumpyBackend()

SPECS = {
    "rnn": CellSpec("rnn", 5),
    "gru": CellSpec("gru", 5),
    "lstm": CellSpec("lstm", 5, forget_bias=0.5),
    "lstm_full": CellSpec("lstm", 5, use_peepholes=True, cell_clip=0.4, num_proj=3, proj_clip=0.3, forget_bias=0.7),
}

# (reverse, lengths kind, state mask kind): a spread of combinations, one trace each.
COMBOS = [
    (False, None, None),
    (True, "mixed", "seq"),
    (False, "mixed", "const"),
    (True, None, "seq"),
]


@pytest.fixture(scope="module")
def tfb():
    from fastseq_tensorflow import TensorFlowBackend

    backend = TensorFlowBackend()
    backend.jit_compile = False
    backend.initialize()
    return backend


def _own_backend(**attrs):
    from fastseq_tensorflow import TensorFlowBackend

    b = TensorFlowBackend()  # its own kernel cache, so the paths it took can be read from it
    b.jit_compile = False
    for k, v in attrs.items():
        setattr(b, k, v)
    b.initialize()
    return b


def _problem(spec, dtype, T=6, B=4, I=3, lengths=None, mask=None, seed=0):
    rng = np.random.default_rng(seed)
    params = {k: rng.normal(0, 0.6, s).astype(dtype) for k, s in spec.param_shapes(I).items()}
    x = rng.normal(size=(T, B, I)).astype(dtype)
    s0 = tuple(rng.normal(size=(B, s)).astype(dtype) for s in spec.state_sizes)
    seq = None
    if lengths == "mixed":
        seq = np.array([0, T] + list(rng.integers(1, T + 1, size=B - 2)), dtype=np.int64)
    masks = None
    if mask is not None:
        tm = T if mask == "seq" else 1
        masks = tuple(
            ((rng.random((tm, B, s)) > 0.3) / 0.7).astype(dtype) if k == len(spec.state_sizes) - 1 else None
            for k, s in enumerate(spec.state_sizes)
        )
    return params, x, s0, seq, masks, rng


def _check_vjp(tfb, spec, dtype, params, x, s0, seq, reverse, masks, rng, tag):
    """``layer_forward(need_grad=True)`` and ``layer_backward`` against the reference:
    outputs, final states and every gradient for random cotangents."""
    y_ref, f_ref, ws_ref = REF.layer_forward(spec, params, x, s0, seq, reverse, masks, need_grad=True)
    y, f, ws = tfb.layer_forward(spec, params, x, s0, seq, reverse, masks, need_grad=True)
    assert isinstance(y, tf.Tensor) and y.dtype == tf.as_dtype(dtype)
    assert_close([tfb.to_numpy(y), [tfb.to_numpy(s) for s in f]], [y_ref, list(f_ref)], dtype, tag + " forward")
    dy = rng.normal(size=y_ref.shape).astype(dtype)
    ds = tuple(rng.normal(size=s.shape).astype(dtype) for s in f_ref)
    g_ref = REF.layer_backward(spec, params, ws_ref, dy, ds)
    g = tfb.layer_backward(spec, params, ws, dy, ds)
    assert list(g[2]) == list(g_ref[2])
    got = [tfb.to_numpy(g[0]), [tfb.to_numpy(d) for d in g[1]], {k: tfb.to_numpy(v) for k, v in g[2].items()}]
    assert_close(got, [g_ref[0], list(g_ref[1]), g_ref[2]], dtype, tag + " gradients")


def _compare(tfb, spec, dtype, reverse, lengths, mask, seed=0, **shape):
    params, x, s0, seq, masks, rng = _problem(spec, dtype, lengths=lengths, mask=mask, seed=seed, **shape)
    tag = f"{spec}/{np.dtype(dtype).name}/rev={reverse}/len={lengths}/mask={mask}"
    _check_vjp(tfb, spec, dtype, params, x, s0, seq, reverse, masks, rng, tag)
    # the step function gives the first step of an unmasked forward run
    out_ref, st_ref = REF.cell_step(spec, params, x[0], s0)
    out, st = tfb.cell_step(spec, params, x[0], s0)
    assert_close([tfb.to_numpy(out), [tfb.to_numpy(s) for s in st]], [out_ref, list(st_ref)], dtype, tag + " step")


@pytest.mark.parametrize("combo", COMBOS, ids=lambda c: f"rev{int(c[0])}-{c[1]}-{c[2]}")
@pytest.mark.parametrize("name", list(SPECS))
def test_layer_float64(tfb, name, combo):
    _compare(tfb, SPECS[name], np.float64, *combo)


@pytest.mark.parametrize("name", list(SPECS))
def test_layer_float32(tfb, name):
    _compare(tfb, SPECS[name], np.float32, True, "mixed", "seq", seed=1)


def test_activations(tfb):
    """Every activation of the contract, on a plain rnn and inside an LSTM."""
    for act in ACTIVATIONS:
        _compare(tfb, CellSpec("rnn", 4, activation=act), np.float64, False, "mixed", None, seed=2)
    _compare(tfb, CellSpec("lstm", 4, activation="relu", num_proj=2), np.float64, True, None, None, seed=3)
    _compare(tfb, CellSpec("gru", 4, activation="softsign"), np.float64, False, None, None, seed=3)


def test_edge_lengths_and_shapes(tfb):
    """All lengths 0, all lengths T, T = 0, B = 0 and T = 1 with a constant mask."""
    spec = SPECS["lstm_full"]
    for T, B, seq in [(5, 3, [0, 0, 0]), (5, 3, [5, 5, 5]), (0, 3, [0, 0, 0]), (4, 0, []), (1, 2, None)]:
        params, x, s0, _, _, rng = _problem(spec, np.float64, T=T, B=B)
        seq_arr = None if seq is None else np.asarray(seq, dtype=np.int64)
        masks = (np.full((1, B, 5), 2.0), None) if T == 1 else None
        y_ref, f_ref, ws_ref = REF.layer_forward(spec, params, x, s0, seq_arr, True, masks, need_grad=True)
        y, f, ws = tfb.layer_forward(spec, params, x, s0, seq_arr, True, masks, need_grad=True)
        assert tuple(y.shape) == y_ref.shape
        assert_close([tfb.to_numpy(y), [tfb.to_numpy(s) for s in f]], [y_ref, list(f_ref)], np.float64, f"T={T} B={B}")
        dy = rng.normal(size=y_ref.shape)
        ds = tuple(rng.normal(size=s.shape) for s in f_ref)
        g_ref = REF.layer_backward(spec, params, ws_ref, dy, ds)
        g = tfb.layer_backward(spec, params, ws, dy, ds)
        got = [tfb.to_numpy(g[0]), [tfb.to_numpy(d) for d in g[1]], {k: tfb.to_numpy(v) for k, v in g[2].items()}]
        assert_close(got, [g_ref[0], list(g_ref[1]), g_ref[2]], np.float64, f"T={T} B={B} gradients")


def test_no_retrace_for_new_shapes(tfb):
    """One trace per configuration: new T, B, input depth and lengths reuse it."""
    spec = CellSpec("gru", 6)
    before = tfb.trace_count
    results = []
    for T, B, I, with_len in [(5, 2, 3, True), (9, 7, 3, True), (3, 1, 4, True), (12, 5, 2, True)]:
        params, x, s0, seq, _, _ = _problem(spec, np.float32, T=T, B=B, I=I, lengths="mixed" if B > 2 else None)
        if seq is None:
            seq = np.full(B, T, dtype=np.int64)
        y, _, _ = tfb.layer_forward(spec, params, x, s0, seq)
        results.append(tuple(y.shape) == (T, B, 6))
        tfb.cell_step(spec, params, x[0], s0)
    assert all(results)
    assert tfb.trace_count - before == 2  # the layer function and the step function, once each


def test_xla_switch(tfb):
    """jit_compile=True runs the same math through XLA (all T steps, lengths by masking)."""
    from fastseq_tensorflow import TensorFlowBackend

    xla = TensorFlowBackend()
    xla.jit_compile = True
    xla.initialize()
    _compare(xla, SPECS["lstm"], np.float64, True, "mixed", "seq", seed=4)
    _compare(xla, SPECS["gru"], np.float32, False, "mixed", None, seed=5)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("lengths", [None, "mixed"])
@pytest.mark.parametrize("spec", [CellSpec("lstm", 5, forget_bias=0.5),
                                  CellSpec("lstm", 5, use_peepholes=True, forget_bias=0.7)], ids=["plain", "peep"])
def test_block_lstm_path(spec, reverse, lengths):
    """Small float32 LSTM batches run as the fused BlockLSTM op: same forward and
    gradients as the reference and as the generic loop (lengths include 0 and T)."""
    from fastseq_tensorflow import TensorFlowBackend

    fused, generic = TensorFlowBackend(), TensorFlowBackend()
    fused.jit_compile = generic.jit_compile = False
    fused.block_lstm_max_batch, generic.block_lstm_max_batch = 64, 0
    for b in (fused, generic):
        b.initialize()
    _compare(fused, spec, np.float32, reverse, lengths, None, seed=6)
    _compare(generic, spec, np.float32, reverse, lengths, None, seed=6)
    used = {k[8] for k in fused._kernels._fns if k[0] == "layer" and not k[-1]}
    assert used == {True}, "the fused backend did not take the BlockLSTM path"
    assert {k[8] for k in generic._kernels._fns if k[0] == "layer"} == {False}


@pytest.mark.parametrize("combo", COMBOS, ids=lambda c: f"rev{int(c[0])}-{c[1]}-{c[2]}")
@pytest.mark.parametrize("spec", [CellSpec("gru", 5), CellSpec("lstm", 5, forget_bias=0.5),
                                  CellSpec("lstm", 5, use_peepholes=True, forget_bias=0.7)],
                         ids=["gru", "lstm", "lstm_peep"])
def test_fused_backward_step(spec, combo, monkeypatch):
    """float32 tanh GRU/LSTM backward steps run through TensorFlow's fused cell-gradient
    ops; gradients equal the reference's, and the plain graph's (the switch off), with
    lengths 0 and T, state masks, reverse and the two row chains."""
    from fastseq_tensorflow import TensorFlowBackend, _kernels

    assert _kernels.fused_backward_ok(spec, tf.float32)
    assert not _kernels.fused_backward_ok(spec, tf.float64)
    for other in (CellSpec(spec.kind, 5, activation="relu"), CellSpec("lstm", 5, cell_clip=1.0),
                  CellSpec("lstm", 5, num_proj=3), CellSpec("rnn", 5)):
        assert not _kernels.fused_backward_ok(other, tf.float32), other
    grads = []
    for fused in (True, False):
        monkeypatch.setattr(_kernels, "FUSED_BACKWARD", fused)
        b = TensorFlowBackend()
        b.jit_compile, b.block_lstm_max_batch, b.split_rows_min = False, 0, 4
        b.initialize()
        _compare(b, spec, np.float32, *combo, seed=8, B=5)
        params, x, s0, seq, masks, rng = _problem(spec, np.float32, lengths=combo[1], mask=combo[2], seed=9, B=5)
        y, f, ws = b.layer_forward(spec, params, x, s0, seq, combo[0], masks, need_grad=True)
        dy = rng.normal(size=tuple(y.shape)).astype(np.float32)
        g = b.layer_backward(spec, params, ws, dy, tuple(np.ones(tuple(s.shape), np.float32) for s in f))
        grads.append([b.to_numpy(g[0]), [b.to_numpy(d) for d in g[1]], {k: b.to_numpy(v) for k, v in g[2].items()}])
    assert_close(grads[0], grads[1], np.float32, f"{spec} fused vs plain backward")


@pytest.mark.parametrize("name", ["gru", "lstm_full"])
@pytest.mark.parametrize("combo", COMBOS, ids=lambda c: f"rev{int(c[0])}-{c[1]}-{c[2]}")
def test_row_split_path(name, combo):
    """Batches at or above split_rows_min run as two independent half-batch recurrences:
    same results as the reference (odd B, so the halves differ in size)."""
    from fastseq_tensorflow import TensorFlowBackend

    split = TensorFlowBackend()
    split.jit_compile = False
    split.split_rows_min = 2
    split.initialize()
    _compare(split, SPECS[name], np.float64, *combo, seed=7, B=5)
    assert {k[9] for k in split._kernels._fns if k[0] == "layer" and not k[-1]} == {2}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("name", list(SPECS))
def test_shrinking_batch_forward(name, reverse, dtype):
    """Forward calls with lengths sort the rows and shrink the active batch: outputs and
    final states equal the reference, for lengths with 0, T, ties, all 0 and all T."""
    from fastseq_tensorflow import TensorFlowBackend

    tfb = TensorFlowBackend()  # its own cache, and the BlockLSTM path off so that it is not chosen instead
    tfb.jit_compile = False
    tfb.block_lstm_max_batch = 0
    tfb.initialize()
    spec = SPECS[name]
    T, B = 7, 6
    for seq in ([0, 7, 3, 3, 1, 5], [0] * B, [T] * B, [2, 6, 6, 0, 7, 1]):
        params, x, s0, _, _, _ = _problem(spec, dtype, T=T, B=B, seed=8)
        seq = np.asarray(seq, dtype=np.int64)
        y_ref, f_ref, _ = REF.layer_forward(spec, params, x, s0, seq, reverse, None)
        y, f, ws = tfb.layer_forward(spec, params, x, s0, seq, reverse, None)
        assert ws is None
        assert_close([tfb.to_numpy(y), [tfb.to_numpy(s) for s in f]], [y_ref, list(f_ref)], dtype,
                     f"{name} rev={reverse} lengths={list(seq)}")
    assert any(k[0] == "layer" and k[-1] for k in tfb._kernels._fns), "the shrinking-batch path was not used"


@pytest.mark.parametrize("reverse", [False, True])
def test_shrinking_batch_forward_empty_shapes(reverse):
    """The packed shrinking-batch path with no steps, no rows and a single step."""
    from fastseq_tensorflow import TensorFlowBackend

    tfb = TensorFlowBackend()
    tfb.jit_compile, tfb.block_lstm_max_batch = False, 0
    tfb.initialize()
    spec = SPECS["lstm"]
    for T, B, seq in [(0, 3, [0, 0, 0]), (5, 0, []), (1, 2, [1, 0])]:
        params, x, s0, _, _, _ = _problem(spec, np.float32, T=T, B=B, seed=10)
        seq = np.asarray(seq, dtype=np.int64)
        y_ref, f_ref, _ = REF.layer_forward(spec, params, x, s0, seq, reverse, None)
        y, f, _ = tfb.layer_forward(spec, params, x, s0, seq, reverse, None)
        assert tuple(y.shape) == y_ref.shape
        assert_close([tfb.to_numpy(y), [tfb.to_numpy(a) for a in f]], [y_ref, list(f_ref)], np.float32,
                     f"T={T} B={B} rev={reverse}")
    assert any(k[0] == "layer" and k[-1] for k in tfb._kernels._fns), "the shrinking-batch path was not used"


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("name", list(SPECS))
def test_shrinking_batch_training(name, reverse, dtype):
    """Training with lengths (no state masks) keeps its residuals in the packed layout and
    runs the backward pass on each step's active rows only: outputs, final states and the
    gradients (vjp-style and under a GradientTape) equal the reference, with lengths 0 and
    T in the batch (float32: the fused cell-gradient ops where they apply)."""
    tfb = _own_backend(block_lstm_max_batch=0)
    spec = SPECS[name]
    _compare(tfb, spec, dtype, reverse, "mixed", None, seed=13, B=5)
    params, x, s0, seq, _, rng = _problem(spec, dtype, lengths="mixed", seed=14, B=5)
    y_ref, f_ref, ws_ref = REF.layer_forward(spec, params, x, s0, seq, reverse, None, need_grad=True)
    dy = rng.normal(size=y_ref.shape).astype(dtype)
    ds = tuple(rng.normal(size=a.shape).astype(dtype) for a in f_ref)
    g_ref = REF.layer_backward(spec, params, ws_ref, dy, ds)
    xt, st = tf.constant(x), [tf.constant(a) for a in s0]
    pt = {k: tf.constant(v) for k, v in params.items()}
    with tf.GradientTape() as tape:
        tape.watch([xt, st, pt])
        y, f, _ = tfb.layer_forward(spec, pt, xt, st, seq, reverse, None)
        loss = tf.reduce_sum(y * dy) + tf.add_n([tf.reduce_sum(a * b) for a, b in zip(f, ds)])
    g = tape.gradient(loss, [xt, st, pt])
    got = [g[0].numpy(), [a.numpy() for a in g[1]], {k: v.numpy() for k, v in g[2].items()}]
    assert_close(got, [g_ref[0], list(g_ref[1]), g_ref[2]], dtype, f"{name} tape gradients")
    fns = tfb._kernels._fns
    assert any(k[0] == "layer" and k[7] and k[-1] for k in fns), "the packed forward did not keep residuals"
    assert any(k[0] == "backward" and k[-1] for k in fns), "the packed backward was not used"


def test_shrinking_batch_training_beside_two_chains():
    """Beside two row chains, training takes the shrinking batch only where the lengths
    leave enough out (``packed_training_max_fill``); both paths agree with the reference."""
    spec = SPECS["gru"]
    for seq, want in [([6, 6, 6, 6], False), ([6, 1, 0, 2], True)]:
        tfb = _own_backend(split_rows_min=2)
        params, x, s0, _, _, rng = _problem(spec, np.float64, T=6, B=4, seed=16)
        seq = np.asarray(seq, dtype=np.int64)
        _check_vjp(tfb, spec, np.float64, params, x, s0, seq, False, None, rng, f"lengths={list(seq)}")
        keys = [k for k in tfb._kernels._fns if k[0] == "backward"]
        assert [k[-1] for k in keys] == [want]  # the packed backward, or the two chains' (key index -2: 2)
        assert all(k[-2] == 2 for k in keys)


@pytest.mark.parametrize("reverse", [False, True])
def test_shrinking_batch_training_edge_shapes(reverse):
    """The packed training path with no steps, no rows, one step, every row at full length."""
    tfb = _own_backend(block_lstm_max_batch=0)
    spec = SPECS["lstm_full"]
    for T, B, seq in [(0, 3, [0, 0, 0]), (5, 0, []), (1, 2, [1, 0]), (4, 3, [4, 4, 4]), (4, 3, [0, 0, 0])]:
        params, x, s0, _, _, rng = _problem(spec, np.float64, T=T, B=B, seed=15)
        seq = np.asarray(seq, dtype=np.int64)
        _check_vjp(tfb, spec, np.float64, params, x, s0, seq, reverse, None, rng,
                   f"T={T} B={B} lengths={list(seq)} rev={reverse}")
    assert any(k[0] == "backward" and k[-1] for k in tfb._kernels._fns)


# ------------------------------------------------------------------ a stack in one call
STACK = [CellSpec("gru", 5), SPECS["lstm_full"], CellSpec("rnn", 4)]  # depths 3 -> 5 -> 3 -> 4
BLOCK_STACK = [CellSpec("lstm", 5, forget_bias=0.5), CellSpec("lstm", 4, use_peepholes=True)]


def _stack_problem(specs, dtype, T=6, B=5, I=3, lengths=None, seed=0):
    rng = np.random.default_rng(seed)
    params, s0s, depth = [], [], I
    for spec in specs:
        params.append({k: rng.normal(0, 0.6, s).astype(dtype) for k, s in spec.param_shapes(depth).items()})
        s0s.append(tuple(rng.normal(size=(B, s)).astype(dtype) for s in spec.state_sizes))
        depth = spec.output_size
    x = rng.normal(size=(T, B, I)).astype(dtype)
    seq = None
    if lengths == "mixed":
        seq = np.array([0, T] + list(rng.integers(1, T + 1, size=B - 2)), dtype=np.int64)
    return params, x, tuple(s0s), seq, rng


def _ref_stack(specs, params, x, s0s, seq, reverse, dy, d_finals):
    """The reference layer by layer: forward, then the gradients chained top down."""
    finals, wss = [], []
    for spec, p, s0 in zip(specs, params, s0s):
        x, f, ws = REF.layer_forward(spec, p, x, s0, seq, reverse, None, need_grad=True)
        finals.append(list(f))
        wss.append(ws)
    y, d0s, dps = x, [None] * len(specs), [None] * len(specs)
    for k in range(len(specs) - 1, -1, -1):
        dy, d0, dps[k] = REF.layer_backward(specs[k], params[k], wss[k], dy, d_finals[k])
        d0s[k] = list(d0)
    return y, finals, dy, d0s, dps


def _check_stack(tfb, specs, dtype, reverse, lengths, seed=0, **shape):
    params, x, s0s, seq, rng = _stack_problem(specs, dtype, lengths=lengths, seed=seed, **shape)
    y_probe = REF.layer_forward(specs[-1], params[-1], np.zeros(x.shape[:2] + (specs[-2].output_size,), dtype),
                                s0s[-1], None, False, None)[0]
    dy = rng.normal(size=y_probe.shape).astype(dtype)
    d_finals = tuple(tuple(rng.normal(size=s.shape).astype(dtype) for s in s0) for s0 in s0s)
    y_ref, f_ref, dx_ref, d0_ref, dp_ref = _ref_stack(specs, params, x, s0s, seq, reverse, dy, d_finals)
    tag = f"stack/{np.dtype(dtype).name}/rev={reverse}/len={lengths}"
    # forward only (the shrinking-batch path where there are lengths)
    y, f, ws = tfb.stack_forward(specs, params, x, s0s, seq, reverse)
    assert ws is None
    assert_close([tfb.to_numpy(y), [[tfb.to_numpy(s) for s in fl] for fl in f]], [y_ref, f_ref], dtype,
                 tag + " forward")
    # fastseq.vjp's way: residuals kept, one compiled backward call
    y, f, ws = tfb.stack_forward(specs, params, x, s0s, seq, reverse, need_grad=True)
    assert_close(tfb.to_numpy(y), y_ref, dtype, tag + " forward (need_grad)")
    dx, d0, dp = tfb.stack_backward(specs, params, ws, dy, d_finals)
    got = [tfb.to_numpy(dx), [[tfb.to_numpy(a) for a in d] for d in d0],
           [{k: tfb.to_numpy(v) for k, v in g.items()} for g in dp]]
    assert_close(got, [dx_ref, d0_ref, dp_ref], dtype, tag + " gradients")
    # under a GradientTape: the same two functions joined by tf.custom_gradient
    xt = tf.constant(x)
    st = [[tf.constant(a) for a in s0] for s0 in s0s]
    pt = [{k: tf.constant(v) for k, v in p.items()} for p in params]
    with tf.GradientTape() as tape:
        tape.watch([xt, st, pt])
        y, f, _ = tfb.stack_forward(specs, pt, xt, st, seq, reverse)
        loss = tf.reduce_sum(y * dy) + tf.add_n([tf.reduce_sum(a * b) for fl, dl in zip(f, d_finals)
                                                  for a, b in zip(fl, dl)])
    g = tape.gradient(loss, [xt, st, pt])
    got = [g[0].numpy(), [[a.numpy() for a in d] for d in g[1]], [{k: v.numpy() for k, v in d.items()} for d in g[2]]]
    assert_close(got, [dx_ref, d0_ref, dp_ref], dtype, tag + " tape gradients")


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("lengths", [None, "mixed"])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("wave", ["off", "forward", "both"])
def test_stack_in_one_call(dtype, reverse, lengths, wave):
    """A stack of layers (rnn, gru, lstm with every option) as one compiled call: forward,
    vjp-style and tape gradients equal the reference run layer by layer (lengths with 0
    and T; odd B so the two row chains differ in size). ``wave``: the calls without
    lengths run their forward (``wave_max_units``) and, with ``both``, their backward
    (``wave_backward``) as one wavefront loop, else layer by layer."""
    tfb = _own_backend(split_rows_min=2, wave_max_units=0 if wave == "off" else 256,
                       wave_backward=wave == "both")
    _check_stack(tfb, STACK, dtype, reverse, lengths, seed=9)
    keys = [k for k in tfb._kernels._fns if k[0] == "stack"]
    waved = [k for k in keys if k[-1]]
    # the wavefront for the forward calls without lengths: forward only and keeping the
    # residuals (key index 6: keep)
    assert sorted(k[6] for k in waved) == ([False, True] if wave != "off" and lengths is None else [])
    assert all(all(chains == 2 for _, _, chains in k[1]) for k in keys if not k[-1])
    backward = [k[-1] for k in tfb._kernels._fns if k[0] == "stack_backward"]
    assert backward == [wave == "both" and lengths is None]


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("T", [0, 1, 2, 3, 7])
@pytest.mark.parametrize("B", [0, 1, 4])
def test_wave_stack_shapes(T, B, reverse):
    """The wavefront loops, forward and backward, over sequences shorter than the stack is
    deep (T = 0, 1, 2 with three layers: iterations where no layer or only some have a
    step), one row or none, from non-zero initial states and final-state cotangents:
    outputs, final states and gradients equal the reference run layer by layer, in both
    directions; two layers (the shortest wavefront) as well."""
    tfb = _own_backend(wave_max_units=256)
    for specs in (STACK, STACK[:2]):
        _check_stack(tfb, specs, np.float64, reverse, None, seed=11 + T, T=T, B=B)
    assert sorted((len(k[1]), k[6], k[-1]) for k in tfb._kernels._fns if k[0] == "stack") == [
        (2, False, True), (2, True, True), (3, False, True), (3, True, True)]
    assert sorted((len(k[1]), k[-1]) for k in tfb._kernels._fns if k[0] == "stack_backward") == [
        (2, True), (3, True)]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("reverse", [False, True])
def test_stack_training_shrinking_batch(reverse, dtype):
    """A stack trained with lengths (one row chain a layer) keeps its layers' residuals in
    the packed layout and runs their backward passes on the active rows: forward, vjp and
    tape gradients equal the reference."""
    tfb = _own_backend()
    _check_stack(tfb, STACK, dtype, reverse, "mixed", seed=17)
    keys = [k for k in tfb._kernels._fns if k[0] in ("stack", "stack_backward")]
    assert (True, True) in {(k[6], k[7]) for k in keys if k[0] == "stack"}  # keep, packed
    assert any(k[0] == "stack_backward" and k[6] for k in keys)  # packed


@pytest.mark.parametrize("lengths", [None, "mixed"])
def test_stack_of_block_lstm_layers(lengths):
    """Small float32 LSTM batches inside a stack take the BlockLSTM path per layer."""
    tfb = _own_backend(block_lstm_max_batch=64)
    _check_stack(tfb, BLOCK_STACK, np.float32, True, lengths, seed=10, B=4)
    keys = [k for k in tfb._kernels._fns if k[0] == "stack"]
    assert keys and all(all(block for _, block, _ in k[1]) for k in keys)


def test_stack_no_retrace_for_new_shapes():
    tfb = _own_backend()
    specs = [CellSpec("gru", 4), CellSpec("gru", 4)]
    counts = []
    for T, B, I in [(5, 3, 2), (8, 20, 2), (2, 1, 6)]:
        params, x, s0s, _, _ = _stack_problem(specs, np.float32, T=T, B=B, I=I)
        y, _, _ = tfb.stack_forward(specs, params, x, s0s)
        assert tuple(y.shape) == (T, B, 4)
        counts.append(tfb.trace_count)
    # B=20 takes the two-chain path (a second configuration); B=1 reuses the first
    assert counts[2] == counts[1]


def test_zeros_reused_eagerly():
    """Eager zeros (the zero states of every call) are made once per shape, dtype and
    device and handed out again (tensors are immutable); large ones and symbolic ones are
    made each time."""
    b = _own_backend()
    a = b.zeros((3, 4), np.float32)
    assert tuple(a.shape) == (3, 4) and a.dtype == tf.float32 and not np.any(a.numpy())
    assert b.zeros((3, 4), np.float32) is a
    assert b.zeros((np.int64(3), 4), "float32") is a  # NumPy integers name the same shape
    d = b.zeros((3, 4), np.float64)
    assert d is not a and d.dtype == tf.float64 and not np.any(d.numpy())
    assert b.zeros((4, 3), np.float32) is not a
    with tf.device("/CPU:0"):
        on_cpu = b.zeros((3, 4), np.float32)
    assert on_cpu is not a and not np.any(on_cpu.numpy())
    big = b.zeros((1024, 512), np.float32)  # 2 MB: not kept
    assert b.zeros((1024, 512), np.float32) is not big and not np.any(big.numpy())

    @tf.function
    def inside():
        z = b.zeros((3, 4), np.float32)
        assert not isinstance(z, type(a))  # symbolic, not the kept eager tensor
        return z

    assert not np.any(inside().numpy())
