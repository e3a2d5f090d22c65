"""Property-based and safety tests of the Numba kernels: random shapes/lengths/cells/
directions against the reference; several Python threads at once; BLAS thread counts;
no memory growth over many calls."""

import os
import threading

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings, strategies as st  # noqa: E402

from _kernel_helpers import SPECS, compare_layer, make_masks, make_params, make_state  # noqa: E402


@st.composite
def layer_cases(draw):
    T = draw(st.integers(0, 6))
    B = draw(st.integers(0, 4))
    I = draw(st.integers(1, 4))
    lengths = draw(st.one_of(st.none(), st.lists(st.integers(0, T), min_size=B, max_size=B)))
    cell = draw(st.sampled_from(sorted(SPECS)))
    reverse = draw(st.booleans())
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    mask = draw(st.sampled_from([None, "step", "fixed"]))
    seed = draw(st.integers(0, 2**31 - 1))
    return T, B, I, lengths, cell, reverse, np.dtype(dtype), mask, seed


@settings(max_examples=40, deadline=None)
@given(layer_cases())
def test_random_layers_match_reference(numba_backend, ref_backend, case):
    T, B, I, lengths, cell, reverse, dtype, mask, seed = case
    rng = np.random.default_rng(seed)
    spec = SPECS[cell]
    lens = None if lengths is None else np.asarray(lengths, np.int64)
    masks = make_masks(spec, T, B, dtype, rng, mask)
    compare_layer(numba_backend, ref_backend, spec, T, B, I, dtype, rng, lens, reverse, masks)


def _run_layer(backend, spec, params, x, s0, lens, reverse):
    y, s, ws = backend.layer_forward(spec, params, x, s0, lens, reverse, None, True)
    dx, d0, dp = backend.layer_backward(spec, params, ws, np.ones_like(y), tuple(np.ones_like(a) for a in s))
    return [y, *s, dx, *d0, *[dp[k] for k in sorted(dp)]]


def test_concurrent_python_threads(numba_backend):
    """Kernels release the GIL and share nothing: concurrent calls give the serial answers."""
    rng = np.random.default_rng(0)
    cases = []
    for i, cell in enumerate(["lstm_all", "gru", "rnn", "lstm_proj"]):
        spec = SPECS[cell]
        params = make_params(spec, 6, np.float64, rng)
        x = rng.standard_normal((12, 9, 6))
        s0 = make_state(spec, 9, np.float64, rng)
        lens = rng.integers(0, 13, size=9).astype(np.int64)
        cases.append((spec, params, x, s0, lens, bool(i % 2)))
    expected = [_run_layer(numba_backend, *c) for c in cases]
    errors = []

    def worker(idx):
        try:
            for _ in range(25):
                got = _run_layer(numba_backend, *cases[idx % len(cases)])
                for a, b in zip(got, expected[idx % len(cases)]):
                    np.testing.assert_array_equal(a, b)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]


@pytest.mark.parametrize("threads", [2, 3])
def test_results_independent_of_thread_count(numba_backend, threads):
    """Large products run multi-threaded in BLAS (fastseq.threads decides how many);
    one thread and several agree to rounding."""
    from fastseq import threads as fthreads

    rng = np.random.default_rng(1)
    spec = SPECS["lstm"].__class__("lstm", 96)
    params = make_params(spec, 128, np.float64, rng, scale=0.1)
    x = rng.standard_normal((32, 64, 128))  # input GEMM: 2048 x 128 x 384 multiply-adds > threshold
    s0 = make_state(spec, 64, np.float64, rng)
    lens = rng.integers(1, 33, size=64).astype(np.int64)
    with fthreads.limit(1):
        one = _run_layer(numba_backend, spec, params, x, s0, lens, False)
    with fthreads.limit(threads):
        many = _run_layer(numba_backend, spec, params, x, s0, lens, False)
    for a, b in zip(one, many):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12 * max(1.0, np.abs(b).max()))


def _rss_bytes():
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc (Linux)")
def test_no_memory_growth_over_many_calls(numba_backend):
    rng = np.random.default_rng(2)
    spec = SPECS["lstm_all"]
    params = make_params(spec, 3, np.float32, rng)
    x = rng.standard_normal((4, 3, 3)).astype(np.float32)
    s0 = make_state(spec, 3, np.float32, rng)
    lens = np.array([4, 0, 2], np.int64)
    for _ in range(200):
        _run_layer(numba_backend, spec, params, x, s0, lens, True)
    before = _rss_bytes()
    for i in range(10_000):
        _run_layer(numba_backend, spec, params, x, s0, lens, bool(i % 2))
    grown = _rss_bytes() - before
    assert grown < 8 * 2**20, f"RSS grew by {grown / 2**20:.1f} MiB over 10,000 forward+backward calls"
