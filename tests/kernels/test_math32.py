"""The float32 exp, tanh and sigmoid of the kernels (``fastseq_kernels._common``: branch-free
polynomials so that the gate loops vectorise) against float64 NumPy over their whole range,
dense near 0 where tanh's relative error is hardest to keep."""
import numpy as np
import pytest
from numba import njit

from fastseq_kernels._common import HOST_FMA, _exp32, _fma32, fexp, ftanh, sigmoid


@njit(cache=False)
def _apply(kind, x, out):
    for i in range(x.shape[0]):
        if kind == 0:
            out[i] = fexp(x[i])
        elif kind == 1:
            out[i] = ftanh(x[i])
        elif kind == 2:
            out[i] = sigmoid(x[i])
        else:
            out[i] = _exp32(x[i])


@njit(cache=False)
def _fma_each(a, b, c, out):
    for i in range(a.shape[0]):
        out[i] = _fma32(a[i], b[i], c[i])


def _grid():
    wide = np.linspace(-90.0, 90.0, 400001)
    near0 = np.concatenate([np.geomspace(1e-30, 1.0, 20001), -np.geomspace(1e-30, 1.0, 20001)])
    return np.concatenate([wide, near0, [0.0, -0.0, 0.3999, 0.4, 0.4001, -0.4]]).astype(np.float32)


def _rel(got, want):
    return np.abs(got.astype(np.float64) - want) / np.maximum(np.abs(want), np.finfo(np.float64).tiny)


@pytest.mark.parametrize("kind,fn", [(0, np.exp), (1, np.tanh), (2, lambda v: 1.0 / (1.0 + np.exp(-v)))],
                         ids=["exp", "tanh", "sigmoid"])
def test_float32_functions_within_three_ulp(kind, fn):
    x = _grid()
    out = np.empty_like(x)
    _apply(kind, x, out)
    want = fn(x.astype(np.float64))
    if kind == 0:  # exp clamps its argument to [-87, 88] (no inf, no denormals)
        want = np.exp(np.clip(x.astype(np.float64), -87.0, 88.0))
    if kind == 2:  # below about -87 sigmoid underflows past float32's normal range: absolute
        keep = want > 1e-37
        assert np.abs(out[~keep]).max() <= 1e-37
        x, out, want = x[keep], out[keep], want[keep]
    err = _rel(out, want)
    assert np.isfinite(out).all()
    if kind == 1:
        assert np.abs(out).max() <= 1.0
    assert err.max() <= 3e-7, f"worst at x={x[err.argmax()]!r}: {err.max():.3g}"


def test_fma32_rounds_once_where_the_host_has_fma():
    # a*b = 1 - 2^-46 exactly; rounded to float32 first it is 1.0, so a*b - 1 gives 0 with two
    # roundings and -2^-46 with one
    a = np.array([1.0 + 2.0 ** -23], np.float32)
    b = np.array([1.0 - 2.0 ** -23], np.float32)
    c = np.array([-1.0], np.float32)
    out = np.empty(1, np.float32)
    _fma_each(a, b, c, out)
    assert out[0] == (np.float32(-(2.0 ** -46)) if HOST_FMA else np.float32(0.0))
