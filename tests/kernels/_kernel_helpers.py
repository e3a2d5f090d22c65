"""Shared helpers for the kernel tests: random cells, params, masks, and comparisons
against the NumPy reference backend (fastseq.reference.NumpyBackend)."""

import numpy as np

from fastseq.contract import CellSpec

RTOL = {np.dtype(np.float32): 1e-5, np.dtype(np.float64): 1e-10}

SPECS = {
    "rnn": CellSpec("rnn", 5),
    "rnn_relu": CellSpec("rnn", 5, activation="relu"),
    "gru": CellSpec("gru", 5),
    "gru_softsign": CellSpec("gru", 4, activation="softsign"),
    "lstm": CellSpec("lstm", 5, forget_bias=1.0),
    "lstm_peep_clip": CellSpec("lstm", 5, use_peepholes=True, cell_clip=0.8, forget_bias=0.5),
    "lstm_proj": CellSpec("lstm", 6, num_proj=3),
    "lstm_all": CellSpec("lstm", 6, activation="elu", use_peepholes=True, cell_clip=1.0, num_proj=4,
                         proj_clip=0.3, forget_bias=0.0),
}


def make_params(spec, I, dtype, rng, scale=0.6):
    return {name: (rng.standard_normal(shape) * scale).astype(dtype) for name, shape in spec.param_shapes(I).items()}


def make_state(spec, B, dtype, rng):
    return tuple((rng.standard_normal((B, n)) * 0.5).astype(dtype) for n in spec.state_sizes)


def make_masks(spec, T, B, dtype, rng, kind):
    """kind: None, "step" ([T, B, S] per component) or "fixed" ([1, B, S], first component only)."""
    if kind is None:
        return None
    out = []
    for i, n in enumerate(spec.state_sizes):
        if kind == "fixed" and i > 0:
            out.append(None)
            continue
        tm = T if kind == "step" else 1
        keep = 0.7
        m = (rng.random((tm, B, n)) < keep).astype(dtype) / dtype.type(keep)
        out.append(m)
    return tuple(out)


def lengths_for(pattern, T, B, rng):
    if pattern is None:
        return None
    if pattern == "mixed":  # includes 0 and T
        lens = rng.integers(0, T + 1, size=B)
        lens[0] = T
        if B > 1:
            lens[1] = 0
        return lens.astype(np.int64)
    if pattern == "full":
        return np.full(B, T, np.int64)
    raise ValueError(pattern)


#: Fixed length patterns of the kernel-pair tests (two-thread, fused vs one-thread): the
#: whole batch at T; a mix with lengths 0, 1 and T (up to 9 rows); every row empty.
LENGTHS = {
    "full": lambda T, B: [T] * B,
    "mixed": lambda T, B: [T, 0, 3, T - 1, 1, 0, T, 5, 2][:B],
    "all-zero": lambda T, B: [0] * B,
}


def gru_kernel_args(dtype, T, B, I, H, lengths, seed=0):
    """Time-major inputs, GRU weights of scale 0.2 (gates kernel and bias, candidate kernel
    and bias), an initial state and int64 lengths: a case of the GRU loop tests."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(T, B, I)).astype(dtype)
    gk = (rng.normal(size=(I + H, 2 * H)) * 0.2).astype(dtype)
    gb = (rng.normal(size=2 * H) * 0.2).astype(dtype)
    ck = (rng.normal(size=(I + H, H)) * 0.2).astype(dtype)
    cb = (rng.normal(size=H) * 0.2).astype(dtype)
    h0 = rng.normal(size=(B, H)).astype(dtype)
    return x, gk, gb, ck, cb, h0, np.asarray(lengths, np.int64)


def lstm_kernel_args(dtype, T, B, I, H, lengths, seed=0, scale=0.1):
    """Arguments of the LSTM kernels: ``x [T, B, I]``, kernel ``[I+H, 4H]`` and bias
    (``scale`` times normal), ``c0``, ``h0``, int64 lengths."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(T, B, I)).astype(dtype)
    k = (rng.normal(size=(I + H, 4 * H)) * scale).astype(dtype)
    b = (rng.normal(size=4 * H) * scale).astype(dtype)
    c0 = rng.normal(size=(B, H)).astype(dtype)
    h0 = rng.normal(size=(B, H)).astype(dtype)
    return x, k, b, c0, h0, np.asarray(lengths, np.int64)


def assert_close(actual, expected, rtol, what=""):
    """Relative to the largest magnitude of ``expected`` (element-wise relative error is
    meaningless for entries that cancel to ~0)."""
    actual = np.asarray(actual)
    expected = np.asarray(expected)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    scale = max(float(np.max(np.abs(expected))) if expected.size else 0.0, 1.0)
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * scale, err_msg=what)


def training_against_reference(cell, x, lengths, cot, dtype, time_major, tol):
    """One training step (``fastseq.vjp`` of ``dynamic_rnn``, pulled back with ``cot``) on
    the numpy reference and on the numba backend with two threads allowed; compares the
    input and weight gradients and returns the numba backend's outputs."""
    import fastseq
    from fastseq import nn

    grads = {}
    for backend in ("numpy", "numba"):
        with fastseq.use_backend(backend), fastseq.threads.limit(2):
            (y, _), pull = fastseq.vjp(nn.dynamic_rnn, cell, x, sequence_length=lengths, dtype=dtype,
                                       time_major=time_major)
            grads[backend] = pull(cot, None)
    g0, g1 = grads["numpy"], grads["numba"]
    assert_close(g1.inputs, g0.inputs, tol, "d inputs")
    assert set(g1.weights) == set(g0.weights)
    for name in g0.weights:
        assert_close(g1.weights[name], g0.weights[name], tol, f"d {name}")
    return y


def compare_layer(fast, ref, spec, T, B, I, dtype, rng, lengths, reverse, masks, grads=True):
    """Run one layer forward (and backward) on both backends and compare everything."""
    dtype = np.dtype(dtype)
    rtol = RTOL[dtype]
    x = rng.standard_normal((T, B, I)).astype(dtype)
    params = make_params(spec, I, dtype, rng)
    s0 = make_state(spec, B, dtype, rng)
    y, s, ws = fast.layer_forward(spec, params, x, s0, lengths, reverse, masks, grads)
    yr, sr, wsr = ref.layer_forward(spec, params, x, s0, lengths, reverse, masks, grads)
    assert y.dtype == dtype
    assert_close(y, yr, rtol, "outputs")
    for i, (a, b) in enumerate(zip(s, sr)):
        assert a.dtype == dtype
        assert_close(a, b, rtol, f"final state {i}")
    if not grads:
        return
    dy = rng.standard_normal(y.shape).astype(dtype)
    ds = tuple(rng.standard_normal(a.shape).astype(dtype) for a in s)
    dx, d0, dp = fast.layer_backward(spec, params, ws, dy, ds)
    dxr, d0r, dpr = ref.layer_backward(spec, params, wsr, dy, ds)
    assert_close(dx, dxr, rtol, "d_inputs")
    for i, (a, b) in enumerate(zip(d0, d0r)):
        assert_close(a, b, rtol, f"d_initial_state {i}")
    assert set(dp) == set(dpr)
    for name in dpr:
        assert dp[name].dtype == dtype
        assert_close(dp[name], dpr[name], rtol, f"d_params[{name!r}]")


def compare_masked_layer(fast, ref, spec, mask_kind, reverse, seed):
    """:func:`compare_layer` in float64 with state masks of ``mask_kind`` and lengths 6, 0,
    3, 5 (T=6, B=4)."""
    rng = np.random.default_rng(seed)
    T, B, I = 6, 4, 3
    lens = np.array([6, 0, 3, 5], np.int64)
    masks = make_masks(spec, T, B, np.dtype(np.float64), rng, mask_kind)
    compare_layer(fast, ref, spec, T, B, I, np.float64, rng, lens, reverse, masks)


def run_in_threads(work, n, timeout=120):
    """``work(i)`` for ``i < n``, each in a thread of its own, all at once; fails if one
    of them is still running after ``timeout`` seconds."""
    import threading

    threads = [threading.Thread(target=work, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=timeout)
    assert not any(t.is_alive() for t in threads)


def count_calls(monkeypatch, module, name):
    """Replace ``module.name`` by a wrapper that records each call; returns the record."""
    calls = []
    real = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a: calls.append(1) or real(*a))
    return calls


def forward_on_backends(cell, x, lengths, dtype, time_major, threads=2):
    """``dynamic_rnn`` on the numpy and numba backends with ``threads`` allowed:
    ``{backend: (outputs, state)}``."""
    import fastseq
    from fastseq import nn

    out = {}
    for backend in ("numpy", "numba"):
        with fastseq.use_backend(backend), fastseq.threads.limit(threads):
            out[backend] = nn.dynamic_rnn(cell, x, sequence_length=lengths, dtype=dtype, time_major=time_major)
    return out


def lstm_one_thread(x, k, b, c0, h0, L, reverse, need_grad=False, bm=False, forget_bias=1.0):
    """The one-thread LSTM kernel (``fastseq_kernels.lstm.lstm_forward``) in the common
    configuration (tanh, no peepholes, clipping, projection or state masks, no packed
    weights): what the two-thread loops are held to."""
    from fastseq_kernels import lstm

    dt = x.dtype
    e1, e2, e3 = np.zeros(0, dt), np.zeros((0, 0), dt), np.zeros((0, 1, 1), dt)
    return lstm.lstm_forward(x, k, b, e1, e1, e1, e2, c0, h0, L, reverse, e3, e3, 0, forget_bias, -1.0, -1.0, need_grad,
                             1, e1, False, bm)


def check_backend_takes_for_inference(monkeypatch, name, units, dtype, time_major, with_lengths):
    """An LSTMCell(``units``) inference through ``dynamic_rnn`` on the numba backend with
    two threads runs ``fastseq_kernels.lstm.<name>`` and agrees with the reference (with
    and without ``sequence_length``, lengths T and 0); with one thread it does not run."""
    import fastseq
    from fastseq import nn
    from fastseq_kernels import lstm

    calls = count_calls(monkeypatch, lstm, name)
    T, B, I = 24, 2, 7
    rng = np.random.default_rng(2)
    x = rng.normal(size=(T, B, I) if time_major else (B, T, I)).astype(dtype)
    lengths = np.array([T, 0]) if with_lengths else None
    cell = nn.rnn_cell.LSTMCell(units)
    out = forward_on_backends(cell, x, lengths, dtype, time_major)
    assert calls, f"the numba backend did not run {name}"
    (y0, s0), (y1, s1) = out["numpy"], out["numba"]
    tol = RTOL[np.dtype(dtype)]
    assert_close(y1, y0, tol, "outputs")
    assert_close(s1.c, s0.c, tol, "c")
    assert_close(s1.h, s0.h, tol, "h")
    n = len(calls)
    with fastseq.use_backend("numba"), fastseq.threads.limit(1):
        nn.dynamic_rnn(cell, x, sequence_length=lengths, dtype=dtype, time_major=time_major)
    assert len(calls) == n, f"one thread allowed, yet {name} ran"


def lstm_case(dtype, T, B, lengths, bm, H=16, seed=0):
    """:func:`lstm_kernel_args` with 5 inputs and weights of scale 0.3, ``x`` batch-major
    ``[B, T, I]`` with ``bm``: a case of the two-thread loop tests."""
    x, k, b, c0, h0, L = lstm_kernel_args(dtype, T, B, 5, H, lengths, seed=seed, scale=0.3)
    if bm:
        x = np.ascontiguousarray(x.transpose(1, 0, 2))
    return x, k, b, c0, h0, L


def gemv_blocks_layout(b, vw):
    """``b [k, n]`` as ``_packed.pack_gemv_blocks`` lays it out, written here from its
    description: column blocks of 16, 8, 4, 2, 1 vectors (widest that fits) then the last
    columns, each block's rows one after another."""
    parts, j, n = [], 0, b.shape[1]
    while j < n:
        w = next((nv * vw for nv in (16, 8, 4, 2, 1) if n - j >= nv * vw), n - j)
        parts.append(b[:, j:j + w].ravel())
        j += w
    return np.concatenate(parts) if parts else np.zeros(0, b.dtype)
