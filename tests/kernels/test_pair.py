"""The LSTM inference loop with the units in two halves, one per thread
(fastseq_kernels.lstm.lstm_forward_pair): the same outputs and final states as the
one-thread kernel, with and without sequence_length (lengths 0 and T), forward and
reversed, batch- and time-major, float32 and float64, odd unit counts, projection chunk
edges; the helper joining at whatever step it comes (many calls), worker 0 alone when the
helper is busy; from several Python threads at once; the packed layout; and the backend
takes it for few-row inference with large enough weights and agrees with the reference."""

import numpy as np
import pytest

import fastseq
from fastseq import nn

from _kernel_helpers import assert_close, check_backend_takes_for_inference, count_calls, gemv_blocks_layout, \
    LENGTHS, lstm_case, lstm_one_thread, run_in_threads

TOL = {np.float32: 1e-5, np.float64: 1e-10}


def _compare(got, want, dtype, what):
    for i, name in enumerate(("y", "c_T", "h_T")):
        assert_close(got[i], want[i], TOL[dtype], f"{what}: {name}")


_case = lstm_case


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("lengths", sorted(LENGTHS))
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("bm", [False, True], ids=["time", "batch"])
@pytest.mark.parametrize("H", [16, 7, 40], ids=["H16", "H7", "H40"])
def test_pair_matches_one_thread(dtype, lengths, reverse, bm, H):
    from fastseq_kernels import lstm

    T, B = 21, 3  # three chunks of PAIR_PROJ_STEPS, the last one short
    x, k, b, c0, h0, L = _case(dtype, T, B, LENGTHS[lengths](T, B), bm, H=H)
    want = lstm_one_thread(x, k, b, c0, h0, L, reverse, bm=bm)
    for packed in (None, lstm.pack_halves(k, 5, H)):
        got = lstm.lstm_forward_pair(x, k, b, c0, h0, L, reverse, 1.0, packed, bm)
        _compare(got, want, dtype, "pair")


@pytest.mark.parametrize("T", [1, 7, 8, 9, 16, 17, 40])
def test_pair_chunk_edges(T):
    """Steps fewer than, equal to and one past a projection chunk (and its multiples),
    with lengths that end inside chunks."""
    from fastseq_kernels import lstm

    lengths = [T, max(T - 8, 0), T // 2, 1]
    x, k, b, c0, h0, L = _case(np.float64, T, 4, lengths, False, seed=T)
    want = lstm_one_thread(x, k, b, c0, h0, L, False, False)
    got = lstm.lstm_forward_pair(x, k, b, c0, h0, L, False, 1.0, None, False)
    _compare(got, want, np.float64, f"T={T}")



def _fusing_case(dtype, H, T, lengths, bm, I, seed=0):
    """One or two rows with only one ever active at a step (``nb[0] == 1``), and units
    whose halves are whole blocks of 16 vectors (float32 128 and 256, float64 64): the
    shapes where a half's products carry the next chunk's input projection (P1's)."""
    from _kernel_helpers import lstm_kernel_args

    # weights of scale 0.3 * sqrt(16 / H), as the H = 16 cases' 0.3: at 0.3 itself a
    # 128-unit float32 state is chaotic over 100 steps (rounding grows to 1e-4 between any
    # two summation orders, the one-thread kernel against float64 included)
    x, k, b, c0, h0, L = lstm_kernel_args(dtype, T, len(lengths), I, H, lengths, seed=seed,
                                          scale=0.3 * np.sqrt(16 / H))
    if bm:
        x = np.ascontiguousarray(x.transpose(1, 0, 2))
    return x, k, b, c0, h0, L


def test_pair_fusing_shape_is_p1s():
    """The fused product runs on 512-bit vector machines for one-row steps of halves of
    whole 16-vector blocks (P1's: one block)."""
    from fastseq_kernels import lstm
    from fastseq_kernels._packed import WIDE

    one, two = np.array([1, 1, 0], np.int64), np.array([2, 1, 0], np.int64)
    assert lstm._pair_fuses(one, np.empty((1, 256), np.float32)) == WIDE
    assert lstm._pair_fuses(one, np.empty((1, 128), np.float64)) == WIDE
    assert lstm._pair_fuses(one, np.empty((1, 512), np.float32)) == WIDE  # H = 256: two blocks
    assert not lstm._pair_fuses(one, np.empty((1, 384), np.float32))
    assert not lstm._pair_fuses(two, np.empty((1, 256), np.float32))
    assert not lstm._pair_fuses(one, np.empty((1, 128), np.float32))


@pytest.mark.parametrize("dtype,H", [(np.float32, 128), (np.float32, 256), (np.float64, 64)],
                         ids=["f32-128", "f32-256", "f64-64"])
@pytest.mark.parametrize("T", [7, 8, 16, 17, 24, 41, 100])
@pytest.mark.parametrize("lengths", ["full", "inside", "zero", "two-rows"])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("bm", [False, True], ids=["time", "batch"])
def test_pair_with_projection_carried_by_the_products(dtype, H, T, lengths, reverse, bm):
    """P1's shape: chunks of the input projection made panel by panel during the previous
    chunk's products. Same results as the one-thread kernel, with whole and partial last
    chunks, lengths ending inside a chunk, length 0, and a second row that never runs;
    every call the same bit for bit wherever the helper joins."""
    from fastseq_kernels import lstm

    lens = {"full": [T], "inside": [T // 2 + 3], "zero": [0], "two-rows": [0, T]}[lengths]
    for I in (5, 64, 150):  # the projection's depth shorter than, equal to, longer than half the product's
        x, k, b, c0, h0, L = _fusing_case(dtype, H, T, lens, bm, I, seed=T + I)
        want = lstm_one_thread(x, k, b, c0, h0, L, reverse, bm=bm)
        first = lstm.lstm_forward_pair(x, k, b, c0, h0, L, reverse, 1.0, None, bm)
        _compare(first, want, dtype, f"I={I}")
        kw = lstm.pack_halves(k, I, k.shape[1] // 4)
        for i in range(6):
            got = lstm.lstm_forward_pair(x, k, b, c0, h0, L, reverse, 1.0, kw, bm)
            for a, e, name in zip(got, first, ("y", "c_T", "h_T")):
                np.testing.assert_array_equal(a, e, err_msg=f"I={I} call {i}: {name}")


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_gemv_block_proj_is_gemv_blocks_and_gemm_packed(dtype):
    """``_packed.gemv_block_proj`` gives what its two parts give alone, bit for bit: the
    one-row product of ``gemv_blocks`` (forwards and backwards) and the 8-row projection
    of ``gemm_packed`` on one panel; both against numpy to rounding."""
    from fastseq_kernels._packed import ROW_PROJ_ROWS, gemm_packed, gemv_block_proj, gemv_blocks, pack_gemv_blocks, \
        pack_panels, panel_cols

    NR = panel_cols(np.dtype(dtype).itemsize)
    n = 8 * NR
    R = ROW_PROJ_ROWS
    rng = np.random.default_rng(7)
    for k in (0, 1, 7, 64, 127, 128):
        for kp in (0, 1, 5, 64, 200):
            a = rng.normal(size=k + 3).astype(dtype)
            bm = rng.normal(size=(k, n)).astype(dtype)
            b = np.zeros(k * n + 11, dtype)
            pack_gemv_blocks(bm, b, 11)
            x = rng.normal(size=(R + 2) * max(kp, 1)).astype(dtype)
            wm = rng.normal(size=(kp, 3 * NR)).astype(dtype)
            wp = pack_panels(wm, 0, 3 * NR, kp, 3 * NR)
            for rev in (False, True):
                c0 = rng.normal(size=n + 5).astype(dtype)
                c, c_ref = c0.copy(), c0.copy()
                g = np.full((R + 1, 3 * NR), np.nan, dtype)
                g_ref = g.copy()
                gemv_block_proj(k, a, 3, rev, b, 11, c, 5, kp, x, kp, wp, kp * NR, g.reshape(-1), 3 * NR + NR, 3 * NR)
                gemv_blocks(k, a, 3, b, 11, n, c_ref, 5, np.empty(12 * NR, dtype), rev)
                gemm_packed(R, NR, kp, x, kp, kp, wp[kp * NR:], g_ref.reshape(-1), 3 * NR + NR, 3 * NR,
                            np.empty(12 * NR, dtype), 0)
                what = f"k={k} kp={kp} rev={rev}"
                np.testing.assert_array_equal(c, c_ref, err_msg=what)
                np.testing.assert_array_equal(g, g_ref, err_msg=what)
                tol = TOL[dtype] * 10
                np.testing.assert_allclose(c[5:], c0[5:] + a[3:3 + k] @ bm, rtol=tol, atol=tol * 10, err_msg=what)
                xr = x[kp:kp + R * kp].reshape(R, kp) if kp else np.zeros((R, 0), dtype)
                np.testing.assert_allclose(g[1:, NR:2 * NR], xr @ wm[:, NR:2 * NR], rtol=tol, atol=tol * 10,
                                           err_msg=what)
                assert np.isnan(g[0]).all() and np.isnan(g[1:, :NR]).all() and np.isnan(g[1:, 2 * NR:]).all(), what

def test_pair_wherever_the_helper_joins():
    """The helper joins a call a few steps in, at a step that changes from call to call (or
    not at all): every call gives the one-thread results."""
    from fastseq_kernels import lstm

    for dtype in (np.float64, np.float32):
        x, k, b, c0, h0, L = _case(dtype, 60, 2, [60, 37], False, H=64, seed=3)
        kw = lstm.pack_halves(k, 5, 64)
        want = lstm_one_thread(x, k, b, c0, h0, L, False, False)
        for i in range(40):
            _compare(lstm.lstm_forward_pair(x, k, b, c0, h0, L, False, 1.0, kw, False), want, dtype, f"call {i}")


def test_pair_with_the_helper_busy_runs_alone():
    from fastseq_kernels import _team, lstm

    x, k, b, c0, h0, L = _case(np.float64, 30, 2, [30, 11], False)
    want = lstm_one_thread(x, k, b, c0, h0, L, True, False)
    assert _team._HELPER.busy.acquire(timeout=10)
    try:
        got = lstm.lstm_forward_pair(x, k, b, c0, h0, L, True, 1.0, None, False)
    finally:
        _team._HELPER.busy.release()
    _compare(got, want, np.float64, "helper busy")


def test_pair_from_several_threads_at_once():
    from fastseq_kernels import lstm

    cases = [_case(np.float32, 33, 2, [33, 9], False, seed=s) for s in range(4)]
    wants = [lstm_one_thread(*c, False, False) for c in cases]
    results = [None] * len(cases)

    def work(i):
        for _ in range(20):
            results[i] = lstm.lstm_forward_pair(*cases[i], False, 1.0, None, False)

    run_in_threads(work, len(cases))
    for got, want in zip(results, wants):
        _compare(got, want, np.float32, "threads")


def test_pack_halves_layout():
    """Each half's block of the flat array is its four gate blocks of columns, gathered and
    packed; a packed array of the wrong size is ignored (packed again), not read."""
    from fastseq_kernels import lstm
    from fastseq_kernels._packed import pack_panels, panel_cols

    I, H = 3, 9
    k = np.arange((I + H) * 4 * H, dtype=np.float32).reshape(I + H, 4 * H)
    kw = lstm.pack_halves(k, I, H)
    NR = panel_cols(4)
    offs = lstm._halves_layout(I, H, NR)
    assert offs[6] == kw.shape[0]
    for v, (u0, u1) in enumerate(((0, H // 2), (H // 2, H))):
        cols = np.concatenate([np.arange(q * H + u0, q * H + u1) for q in range(4)])
        wg = np.ascontiguousarray(k[:, cols])
        n = wg.shape[1]
        a = pack_panels(wg, 0, n, I, n)
        r = pack_panels(wg, I * n, n, H, n)
        oi, oa, orr = offs[2 * v], offs[2 * v + 1], offs[4 + v]
        np.testing.assert_array_equal(kw[oi:oi + a.size], a)
        np.testing.assert_array_equal(kw[oa:oa + r.size], r)
        # in column blocks, for the one-row steps
        np.testing.assert_array_equal(kw[orr:orr + H * n], gemv_blocks_layout(wg[I:], NR // 2))
    x, _, b, c0, h0, L = _case(np.float32, 12, 2, [12, 5], False, H=H)
    x = np.ascontiguousarray(x[:, :, :I])
    want = lstm_one_thread(x, k * np.float32(1e-3), b, c0, h0, L, False, False)
    got = lstm.lstm_forward_pair(x, k * np.float32(1e-3), b, c0, h0, L, False, 1.0, np.zeros(5, np.float32), False)
    _compare(got, want, np.float32, "wrong-size packed")


def test_pair_applies_only_where_it_should():
    from fastseq_kernels.lstm import PAIR_MIN_WEIGHT_BYTES, STREAM_MIN_STEPS, pair_applies

    n = STREAM_MIN_STEPS
    H = 128  # float32: 256 KB of recurrent weights
    assert 4 * H * H * 4 >= PAIR_MIN_WEIGHT_BYTES > 4 * 64 * 64 * 4
    assert pair_applies(1, H, n, True, 2, False, False, False, 4)
    assert pair_applies(1, 64, n, True, 2, False, False, False, 8)  # float64: 128 KB
    assert not pair_applies(1, 64, n, True, 2, False, False, False, 4)  # 64 KB: measured slower
    assert not pair_applies(1, H, n, True, 1, False, False, False, 4)  # one thread allowed
    assert not pair_applies(1, H, n, False, 2, False, False, False, 4)  # peepholes, clipping, masks ...
    assert not pair_applies(1, H, n - 1, True, 2, False, False, False, 4)  # too few steps
    assert not pair_applies(1, H, n, True, 2, True, False, False, 4)  # fused loop instead
    assert not pair_applies(1, H, n, True, 2, False, True, False, 4)  # two-thread loop instead
    assert not pair_applies(1, H, n, True, 2, False, False, True, 4)  # training
    assert not pair_applies(0, H, n, True, 2, False, False, False, 4)  # no rows


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("time_major", [False, True], ids=["batch", "time"])
@pytest.mark.parametrize("with_lengths", [False, True], ids=["padded", "lengths"])
def test_backend_takes_the_pair_for_inference(dtype, time_major, with_lengths, monkeypatch):
    check_backend_takes_for_inference(monkeypatch, "lstm_forward_pair", 128, dtype, time_major, with_lengths)


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/statm"), reason="needs /proc (Linux)")
def test_pair_no_memory_growth_over_many_calls(monkeypatch):
    """10,000 calls through the backend (the halves layout from the pack cache, the helper
    joining or not): the process does not grow."""
    import os

    from fastseq_kernels import lstm

    calls = count_calls(monkeypatch, lstm, "lstm_forward_pair")
    rng = np.random.default_rng(6)
    x = rng.normal(size=(1, 16, 5))
    cell = nn.rnn_cell.LSTMCell(64)  # float64: 128 KB of recurrent weights

    def rss():
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    with fastseq.use_backend("numba"), fastseq.threads.limit(2):
        for _ in range(200):
            nn.dynamic_rnn(cell, x, dtype=np.float64)
        before = rss()
        for _ in range(10_000):
            nn.dynamic_rnn(cell, x, dtype=np.float64)
        grown = rss() - before
    assert len(calls) == 10_200
    assert grown < 8 * 2**20, f"RSS grew by {grown / 2**20:.1f} MiB over 10,000 calls"


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("bm", [False, True], ids=["time", "batch"])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
def test_pair_kept_buffers_match_the_general_setup(dtype, bm, reverse, monkeypatch):
    """Full-length batches read and written in place (time-major, or one row) run on
    buffers kept between calls (``lstm_forward_pair_arena_begin``): bit-identical to the
    general set-up (taken when no packed layout is given), call after call with other
    inputs, initial states and biases of the same shapes (nothing of a call carries into
    the next); other lengths and the batch-major layout of several rows take the general
    set-up; at most ``ARENA_PER_KEY`` buffers a shape, none over ``ARENA_MAX_BYTES``."""
    from fastseq_kernels import lstm

    taken = []
    begin = lstm.lstm_forward_pair_arena_begin
    monkeypatch.setattr(lstm, "lstm_forward_pair_arena_begin", lambda *a: taken.append(begin(*a)) or taken[-1])
    monkeypatch.setattr(lstm, "_ARENAS", {})
    H = 16
    for i, (T, B, lengths) in enumerate([(21, 1, "full"), (21, 3, "full"), (9, 2, "mixed"), (21, 1, "full"),
                                         (1, 2, "full")]):
        x, k, b, c0, h0, L = _case(dtype, T, B, LENGTHS[lengths](T, B), bm, H=H, seed=10 + i)
        want = lstm.lstm_forward_pair(x, k, b, c0, h0, L, reverse, 0.5, None, bm)
        taken.clear()
        got = lstm.lstm_forward_pair(x, k, b, c0, h0, L, reverse, 0.5, lstm.pack_halves(k, 5, H), bm)
        direct = lengths == "full" and (not bm or B == 1)
        assert taken == [direct], (T, B, lengths)
        for g, w, name in zip(got, want, ("y", "c_T", "h_T")):
            np.testing.assert_array_equal(g, w, err_msg=f"{name}, case {i}")
        assert_close(got[0], lstm_one_thread(x, k, b, c0, h0, L, reverse, bm=bm, forget_bias=0.5)[0], TOL[dtype], "y")
    assert all(len(v) <= lstm.ARENA_PER_KEY for v in lstm._ARENAS.values())
    # kept for the shapes that used them: (T, B) = (21, 1) (twice, one set); time-major also (21, 3) and (1, 2)
    assert len(lstm._ARENAS) == (1 if bm else 3)
    monkeypatch.setattr(lstm, "ARENA_MAX_BYTES", 0)
    monkeypatch.setattr(lstm, "_ARENAS", {})
    x, k, b, c0, h0, L = _case(dtype, 21, 1, [21], bm, H=H, seed=30)
    got = lstm.lstm_forward_pair(x, k, b, c0, h0, L, reverse, 0.5, lstm.pack_halves(k, 5, H), bm)
    want = lstm.lstm_forward_pair(x, k, b, c0, h0, L, reverse, 0.5, None, bm)
    np.testing.assert_array_equal(got[0], want[0])
    assert lstm._ARENAS == {}


def test_pair_kept_buffers_from_several_threads_at_once():
    """Threads calling with one shape at once: each call takes kept buffers no other call
    is using (or makes its own), so every result is its own input's."""
    from fastseq_kernels import lstm

    cases = [_case(np.float32, 33, 1, [33], False, H=32, seed=s) for s in range(4)]
    kws = [lstm.pack_halves(c[1], 5, 32) for c in cases]
    wants = [lstm.lstm_forward_pair(*c, False, 1.0, None, False) for c in cases]
    results = [[] for _ in cases]

    def work(i):
        for _ in range(30):
            results[i].append(lstm.lstm_forward_pair(*cases[i], False, 1.0, kws[i], False))

    run_in_threads(work, len(cases))
    for got_all, want in zip(results, wants):
        for got in got_all:
            for g, w in zip(got, want):
                np.testing.assert_array_equal(g, w)
