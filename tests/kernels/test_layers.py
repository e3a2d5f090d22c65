"""The Numba kernels against the NumPy reference: forward, final state and every gradient,
for every cell option, both dtypes, both directions, lengths None/mixed (0 and T), and
state masks (per step, fixed)."""

import numpy as np
import pytest

from _kernel_helpers import SPECS, compare_layer, compare_masked_layer, lengths_for, make_params, make_state, RTOL, \
    assert_close


@pytest.mark.parametrize("cell", sorted(SPECS))
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("lengths", [None, "mixed"])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
def test_layer_matches_reference(numba_backend, ref_backend, cell, dtype, lengths, reverse):
    rng = np.random.default_rng(hash((cell, lengths, reverse)) % 2**32)
    T, B, I = 7, 5, 3
    lens = lengths_for(lengths, T, B, rng)
    compare_layer(numba_backend, ref_backend, SPECS[cell], T, B, I, dtype, rng, lens, reverse, None)


@pytest.mark.parametrize("cell", ["rnn", "gru", "lstm", "lstm_proj"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
def test_rows_cross_the_blas_threshold(numba_backend, ref_backend, cell, dtype, reverse):
    """Per-step products run the packed micro-kernel (blocks of 12, 8, 4, 2 and 1 rows)
    up to _packed.PACKED_MAX_M_PARALLEL(_F64) rows and BLAS above it when two threads are
    allowed (with one thread, or under _packed.PACK_MIN_STEPS steps, the in-house loops of
    _blas up to SMALL_M_F32 / SMALL_M rows): a batch whose active rows shrink from above
    the thresholds to one, through every remainder modulo four, goes through every
    block height and both sides of the thresholds."""
    from fastseq_kernels._blas import SMALL_M, SMALL_M_F32

    limit = SMALL_M_F32 if dtype == np.float32 else SMALL_M
    rng = np.random.default_rng(7)
    B = limit + 9
    T = 17
    lens = np.minimum(T, np.arange(B) * (T + 1) // B).astype(np.int64)  # 0 .. T, one of length T
    rng.shuffle(lens)
    active = [(lens > k).sum() for k in range(T)]
    assert active[0] > limit and 1 <= active[-1] <= 2
    assert {a % 4 for a in active if 4 < a <= limit} == {0, 1, 2, 3}
    compare_layer(numba_backend, ref_backend, SPECS[cell], T, B, 6, dtype, rng, lens, reverse, None)


@pytest.mark.parametrize("cell", ["rnn", "gru", "lstm"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_short_sequences_take_the_unpacked_products(numba_backend, ref_backend, cell, dtype):
    """Under _packed.PACK_MIN_STEPS steps the kernels do not pack the weights: the
    per-step products take _blas's in-house loops and BLAS, forward and backward."""
    from fastseq_kernels._blas import SMALL_M_F32
    from fastseq_kernels._packed import PACK_MIN_STEPS

    T = PACK_MIN_STEPS - 1
    B = SMALL_M_F32 + 5
    rng = np.random.default_rng(11)
    lens = rng.integers(0, T + 1, size=B).astype(np.int64)
    lens[0] = T
    compare_layer(numba_backend, ref_backend, SPECS[cell], T, B, 4, dtype, rng, lens, False, None)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_step_products_against_numpy(dtype):
    """The per-step product C += A @ B on every path (in-house loops, BLAS) for row counts
    around the thresholds, inner sizes that are not a multiple of four, and offsets and
    leading dimensions into larger buffers, against NumPy in float64."""
    from numba import njit

    from fastseq_kernels._blas import step_gemm_acc

    @njit
    def call(m, n, k, a, aoff, lda, b, boff, ldb, c, coff, ldc):
        step_gemm_acc(m, n, k, a, aoff, lda, b, boff, ldb, c, coff, ldc, 1)

    rng = np.random.default_rng(3)
    tol = 1e-5 if dtype == np.float32 else 1e-12
    for m in (1, 2, 3, 4, 5, 7, 12, 13, 31, 32, 33, 45):
        for n, k in ((9, 7), (40, 13), (33, 64)):
            a = rng.normal(size=(m + 1, k + 3)).astype(dtype)  # rows from 1, columns 2 .. k+2
            b = rng.normal(size=(k + 2, n + 5)).astype(dtype)  # rows from 2, columns 0 .. n-1
            c = rng.normal(size=(m + 2, n + 1)).astype(dtype)  # rows from 1
            want = c.astype(np.float64)
            want[1:m + 1, :n] += a[1:, 2:k + 2].astype(np.float64) @ b[2:, :n].astype(np.float64)
            call(m, n, k, a, (k + 3) + 2, k + 3, b, 2 * (n + 5), n + 5, c, n + 1, n + 1)
            scale = np.abs(want).max()
            assert np.abs(c - want).max() <= tol * scale, f"m={m} n={n} k={k}"


@pytest.mark.parametrize("cell", ["rnn", "gru", "lstm_peep_clip", "lstm_all"])
@pytest.mark.parametrize("mask_kind", ["step", "fixed"])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
def test_state_masks(numba_backend, ref_backend, cell, mask_kind, reverse):
    compare_masked_layer(numba_backend, ref_backend, SPECS[cell], mask_kind, reverse, seed=7)


@pytest.mark.parametrize("activation", ["tanh", "sigmoid", "relu", "relu6", "elu", "softsign", "softplus", "linear"])
@pytest.mark.parametrize("kind", ["rnn", "gru", "lstm"])
def test_activations(numba_backend, ref_backend, activation, kind):
    from fastseq.contract import CellSpec

    rng = np.random.default_rng(3)
    spec = CellSpec(kind, 4, activation=activation)
    compare_layer(numba_backend, ref_backend, spec, 5, 3, 2, np.float64, rng, np.array([5, 2, 4]), False, None)


@pytest.mark.parametrize("T,B,lengths", [(0, 3, None), (4, 0, None), (3, 2, np.array([0, 0])), (1, 1, None)])
def test_degenerate_shapes(numba_backend, ref_backend, T, B, lengths):
    rng = np.random.default_rng(0)
    for cell in ("rnn", "gru", "lstm_all"):
        compare_layer(numba_backend, ref_backend, SPECS[cell], T, B, 3, np.float64, rng, lengths, True, None)


@pytest.mark.parametrize("cell", sorted(SPECS))
def test_cell_step(numba_backend, ref_backend, cell):
    rng = np.random.default_rng(1)
    spec = SPECS[cell]
    for dtype in (np.float32, np.float64):
        dtype = np.dtype(dtype)
        params = make_params(spec, 3, dtype, rng)
        x = rng.standard_normal((4, 3)).astype(dtype)
        s = make_state(spec, 4, dtype, rng)
        y, ns = numba_backend.cell_step(spec, params, x, s)
        yr, nsr = ref_backend.cell_step(spec, params, x, s)
        assert_close(y, yr, RTOL[dtype], "output")
        for a, b in zip(ns, nsr):
            assert_close(a, b, RTOL[dtype], "state")


def test_backward_twice_same_workspace(numba_backend):
    """The pullback may be evaluated more than once; the workspace must survive."""
    rng = np.random.default_rng(2)
    spec = SPECS["lstm_all"]
    params = make_params(spec, 3, np.float64, rng)
    x = rng.standard_normal((5, 3, 3))
    s0 = make_state(spec, 3, np.float64, rng)
    y, s, ws = numba_backend.layer_forward(spec, params, x, s0, np.array([5, 1, 3]), True, None, True)
    dy = rng.standard_normal(y.shape)
    ds = tuple(np.ones_like(a) for a in s)
    first = numba_backend.layer_backward(spec, params, ws, dy, ds)
    second = numba_backend.layer_backward(spec, params, ws, dy, ds)
    np.testing.assert_array_equal(first[0], second[0])
    for k in first[2]:
        np.testing.assert_array_equal(first[2][k], second[2][k])


def test_rejects_bad_input(numba_backend):
    spec = SPECS["gru"]
    rng = np.random.default_rng(0)
    params = make_params(spec, 3, np.float64, rng)
    x = rng.standard_normal((4, 2, 3))
    s0 = make_state(spec, 2, np.float64, rng)
    with pytest.raises(ValueError, match="sequence_length"):
        numba_backend.layer_forward(spec, params, x, s0, np.array([1, 5]))
    with pytest.raises(ValueError, match="sequence_length"):
        numba_backend.layer_forward(spec, params, x, s0, np.array([1, 2, 3]))
    with pytest.raises(ValueError, match="initial_state"):
        numba_backend.layer_forward(spec, params, x, (np.zeros((3, 5)),))
    bad = dict(params)
    bad["gates/kernel"] = bad["gates/kernel"][:-1]
    with pytest.raises(ValueError, match="gates/kernel"):
        numba_backend.layer_forward(spec, bad, x, s0)
    with pytest.raises(TypeError, match="inputs"):
        numba_backend.layer_forward(spec, params, x.astype(np.int32), s0)
    with pytest.raises(ValueError, match="state_mask"):
        numba_backend.layer_forward(spec, params, x, s0, None, False, (np.ones((3, 2, 5)),))


def test_unknown_activation_not_implemented(numba_backend):
    from fastseq.contract import CellSpec

    spec = CellSpec("rnn", 3, activation="swish")
    with pytest.raises(NotImplementedError):
        numba_backend.layer_forward(spec, {"kernel": np.zeros((5, 3)), "bias": np.zeros(3)}, np.zeros((2, 1, 2)),
                                    (np.zeros((1, 3)),))


def test_noncontiguous_inputs(numba_backend, ref_backend):
    rng = np.random.default_rng(4)
    spec = SPECS["lstm_proj"]
    xb = rng.standard_normal((3, 6, 2))  # batch-major
    x = np.swapaxes(xb, 0, 1)  # time-major view, not contiguous
    params = {k: np.asfortranarray(v) for k, v in make_params(spec, 2, np.float64, rng).items()}
    s0 = make_state(spec, 3, np.float64, rng)
    y, s, _ = numba_backend.layer_forward(spec, params, x, s0)
    yr, sr, _ = ref_backend.layer_forward(spec, params, x, s0)
    assert_close(y, yr, 1e-10)
