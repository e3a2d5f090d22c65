"""The fused LSTM loop (fastseq_kernels.lstm.lstm_forward with ``fuse``: each step's input
projection inside the step's product over ``[x_t, h]``): against the NumPy reference for
every LSTM option (peepholes, cell_clip, num_proj, proj_clip, state masks), both dtypes,
both directions, lengths None and mixed (0 and T), forward and every gradient; against
the unfused kernel (outputs, final states, the workspace's input and state rows, and the
backward pass from either workspace); and the backend's choice (fuse_applies)."""

import numpy as np
import pytest

from _kernel_helpers import assert_close, compare_layer, compare_masked_layer, LENGTHS, lengths_for, lstm_kernel_args, \
    SPECS

LSTM_SPECS = sorted(name for name in SPECS if SPECS[name].kind == "lstm")
TOL = {np.float32: 1e-5, np.float64: 1e-10}


@pytest.fixture(params=[False, True], ids=["unfused", "fused"])
def fuse(request, monkeypatch):
    """The backend's choice forced both ways (it fuses only large enough batches)."""
    from fastseq_kernels import lstm

    monkeypatch.setattr(lstm, "fuse_applies", lambda *a: request.param)
    return request.param


@pytest.mark.parametrize("cell", LSTM_SPECS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("lengths", [None, "mixed"])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
def test_layer_matches_reference(numba_backend, ref_backend, fuse, cell, dtype, lengths, reverse):
    rng = np.random.default_rng(hash((cell, lengths, reverse, "fused")) % 2**32)
    T, B, I = 7, 9, 3
    lens = lengths_for(lengths, T, B, rng)
    compare_layer(numba_backend, ref_backend, SPECS[cell], T, B, I, dtype, rng, lens, reverse, None)


@pytest.mark.parametrize("cell", ["lstm_peep_clip", "lstm_all"])
@pytest.mark.parametrize("mask_kind", ["step", "fixed"])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
def test_state_masks(numba_backend, ref_backend, fuse, cell, mask_kind, reverse):
    compare_masked_layer(numba_backend, ref_backend, SPECS[cell], mask_kind, reverse, seed=17)


@pytest.mark.parametrize("T", [1, 3, 9])  # under and over _packed.PACK_MIN_STEPS
def test_short_and_long_loops(numba_backend, ref_backend, fuse, T):
    rng = np.random.default_rng(T)
    lens = rng.integers(0, T + 1, size=11).astype(np.int64)
    lens[0] = T
    compare_layer(numba_backend, ref_backend, SPECS["lstm"], T, 11, 6, np.float32, rng, lens, True, None)


def _forward(args, reverse, need_grad, fuse):
    from fastseq_kernels import lstm

    x, k, b, c0, h0, L = args
    dt = x.dtype
    e1, e2, e3 = np.zeros(0, dt), np.zeros((0, 0), dt), np.zeros((0, 1, 1), dt)
    return lstm.lstm_forward(x, k, b, e1, e1, e1, e2, c0, h0, L, reverse, e3, e3, 0, 1.0, -1.0, -1.0, need_grad, 1,
                             e1, fuse, False)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("lengths", sorted(LENGTHS))
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("need_grad", [False, True], ids=["infer", "grad"])
def test_fused_matches_unfused_kernel(dtype, lengths, reverse, need_grad):
    """Same outputs and states; with need_grad the fused workspace holds the same input
    rows (columns :I) and state rows (columns I:) as the unfused X and Hh, the same gates
    and cells, and the backward pass gives the same gradients from either workspace."""
    from fastseq_kernels import lstm

    T, B, I, H = 9, 9, 5, 40
    args = lstm_kernel_args(dtype, T, B, I, H, LENGTHS[lengths](T, B), scale=0.2)
    want = _forward(args, reverse, need_grad, False)
    got = _forward(args, reverse, need_grad, True)
    tol = TOL[dtype]
    for i, name in enumerate(("y", "c_T", "h_T")):
        assert_close(got[i], want[i], tol, name)
    if not need_grad:
        return
    wsf, wsu = got[3], want[3]
    # one [R, I+P] buffer serves as the workspace's X and Hh
    assert wsf[0].shape == wsf[2].shape == (wsu[0].shape[0], I + H)
    assert wsf[0].size == 0 or np.shares_memory(wsf[0], wsf[2])
    assert_close(wsf[0][:, :I], wsu[0], tol, "workspace input rows")
    assert_close(wsf[0][:, I:], wsu[2], tol, "workspace state rows")
    assert_close(wsf[1], wsu[1], tol, "workspace gates")
    assert_close(wsf[3], wsu[3], tol, "workspace cells")
    for i in range(6, 10):  # the row plan
        np.testing.assert_array_equal(wsf[i], wsu[i])
    x, k, b, c0, h0, L = args
    rng = np.random.default_rng(5)
    dy = rng.normal(size=want[0].shape).astype(dtype)
    dcT = rng.normal(size=c0.shape).astype(dtype)
    dhT = rng.normal(size=h0.shape).astype(dtype)
    e1, e2, e3 = np.zeros(0, dtype), np.zeros((0, 0), dtype), np.zeros((0, 1, 1), dtype)
    gf = lstm.lstm_backward(wsf, k, b, e1, e1, e1, e2, dy, dcT, dhT, T, reverse, e3, e3, 0, 1.0, -1.0, -1.0, 1, e1,
                            False)
    gu = lstm.lstm_backward(wsu, k, b, e1, e1, e1, e2, dy, dcT, dhT, T, reverse, e3, e3, 0, 1.0, -1.0, -1.0, 1, e1,
                            False)
    for name, a, w in zip(("dx", "dc0", "dh0", "dkernel", "dbias"), gf, gu):
        assert_close(a, w, tol, name)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("lengths", sorted(LENGTHS))
@pytest.mark.parametrize("B", [1, 9])
def test_fused_backward_batch_major(dtype, lengths, B):
    """The backward from a fused workspace (panel-major gate gradients, ``dx`` rows per
    step: lstm_backward's ``panel`` path) in the batch-major layout, where ``dx`` is
    scattered (or, for one row, written in place), against the unfused workspace's
    backward (row-major gate gradients, one ``dx`` product after the loop)."""
    from fastseq_kernels import lstm

    T, I, H = 7, 3, 16
    x, k, b, c0, h0, L = lstm_kernel_args(dtype, T, B, I, H, LENGTHS[lengths](T, B), seed=B, scale=0.3)
    xb = np.ascontiguousarray(x.transpose(1, 0, 2))
    e1, e2, e3 = np.zeros(0, dtype), np.zeros((0, 0), dtype), np.zeros((0, 1, 1), dtype)
    rng = np.random.default_rng(9)
    dy = rng.normal(size=(B, T, H)).astype(dtype)
    dcT, dhT = rng.normal(size=c0.shape).astype(dtype), rng.normal(size=h0.shape).astype(dtype)
    grads = []
    for fuse in (False, True):
        y, cT, hT, ws = lstm.lstm_forward(xb, k, b, e1, e1, e1, e2, c0, h0, L, False, e3, e3, 0, 1.0, -1.0, -1.0,
                                          True, 1, e1, fuse, True)
        grads.append(lstm.lstm_backward(ws, k, b, e1, e1, e1, e2, dy, dcT, dhT, T, False, e3, e3, 0, 1.0, -1.0,
                                        -1.0, 1, e1, True))
    for name, a, w in zip(("dx", "dc0", "dh0", "dkernel", "dbias"), grads[1], grads[0]):
        assert_close(a, w, TOL[dtype], name)
    assert grads[1][0].shape == xb.shape


def test_fused_takes_a_packed_kernel_and_ignores_a_wrong_one():
    """The packed whole kernel the backend hands in gives the same result as packing in
    the kernel; a packed array of the wrong size (e.g. the recurrent rows only) is
    ignored, not read out of bounds."""
    from fastseq_kernels import _packed

    T, B, I, H = 8, 9, 6, 32
    args = lstm_kernel_args(np.float32, T, B, I, H, [T] * B, seed=3, scale=0.2)
    x, k = args[0], args[1]
    full = _packed.pack_if_worth(T, k, 0, 4 * H, I + H, 4 * H, False)
    rec = _packed.pack_if_worth(T, k, I * 4 * H, 4 * H, H, 4 * H, False)
    want = _forward(args, False, False, False)
    for packed in (full, rec):
        from fastseq_kernels import lstm

        e1, e2, e3 = np.zeros(0, np.float32), np.zeros((0, 0), np.float32), np.zeros((0, 1, 1), np.float32)
        got = lstm.lstm_forward(x, k, args[2], e1, e1, e1, e2, args[3], args[4], args[5], False, e3, e3, 0, 1.0,
                                -1.0, -1.0, False, 1, packed, True, False)
        assert_close(got[0], want[0], TOL[np.float32], "y")


def test_fuse_applies_by_rows_and_kernel_size():
    from fastseq_kernels.lstm import FUSE_MAX_BYTES, FUSE_MIN_ROWS, fuse_applies

    assert fuse_applies(64, 64, 256, 256, 4)  # P4: 1.25 MB of float32 kernel
    assert not fuse_applies(1, 64, 128, 128, 4)  # P1: one row, bound by streaming the kernel
    assert not fuse_applies(FUSE_MIN_ROWS - 1, 64, 256, 256, 4)
    assert not fuse_applies(64, 512, 512, 512, 4)  # P3: 8 MB
    H = 256
    I = FUSE_MAX_BYTES // (4 * H * 4) - H
    assert fuse_applies(64, I, H, H, 4) and not fuse_applies(64, I + 1, H, H, 4)
    assert not fuse_applies(64, 64, 256, 256, 8)  # float64 doubles the bytes
