# cython: embedsignature=True
"""Cython kernels for sparse softmax cross-entropy, forward and backward, row by row.

Shapes: ``logits [N, C]`` (C-contiguous), ``labels [N]`` int64 in ``[0, C)`` (checked by the
caller), ``mx [N]`` each row's maximum, ``ls [N] = log(sum(exp(logits[n] - mx[n])))``,
``coef [N]`` the cotangent of each row's loss.

    loss[n]    = ls[n] - (logits[n, labels[n]] - mx[n])
    grad[n, :] = coef[n] * (softmax(logits[n]) - onehot(labels[n]))

Every row is processed while it sits in cache (max, sum of exp, then the scaled softmax), so
the forward pass reads the logits once and the backward pass reads them once and writes the
gradient once. float32 rows use a vectorisable polynomial exp (Cephes' expf, about 1 ulp)
compiled for AVX2+FMA when the CPU has it, libm's expf otherwise; float64 uses libm's exp.
Rows with ``coef == 0`` (masked steps) get zeros without any exp.
The ``r0, r1`` arguments select rows ``[r0, r1)`` so callers can split work across threads;
everything runs without the GIL.
"""
import numpy as np
cimport numpy as cnp
from libc.stdint cimport int64_t
from libc.math cimport exp, log, logf

cnp.import_array()

cdef extern from *:
    """
    #include <math.h>
    #include <string.h>
    #include <stdint.h>

    #define FS_EXPF_BODY                                              \\
        float xc = x < -87.0f ? -87.0f : x;                           \\
        float n = floorf(xc * 1.44269504088896341f + 0.5f);           \\
        float r = xc - n * 0.693359375f;                              \\
        r = r + n * 2.12194440e-4f;                                   \\
        float p = 1.9875691500E-4f;                                   \\
        p = p * r + 1.3981999507E-3f;                                 \\
        p = p * r + 8.3334519073E-3f;                                 \\
        p = p * r + 4.1665795894E-2f;                                 \\
        p = p * r + 1.6666665459E-1f;                                 \\
        p = p * r + 5.0000001201E-1f;                                 \\
        float y = p * r * r + r + 1.0f;                               \\
        int32_t bits = ((int32_t)n + 127) << 23;                      \\
        float scale; memcpy(&scale, &bits, 4);                        \\
        y = y * scale;                                                \\
        return x < -87.0f ? 0.0f : y;

    #if defined(__GNUC__) && !defined(__clang__) && (defined(__x86_64__) || defined(__i386__))
    #define FS_HAVE_AVX2_PATH 1
    #define FS_AVX2 __attribute__((target("avx2,fma"), optimize("O3", "fast-math")))

    static inline FS_AVX2 float fs_expf_avx2(float x) { FS_EXPF_BODY }

    static FS_AVX2 float fs_max_avx2(const float* x, Py_ssize_t n) {
        float m = x[0];
        for (Py_ssize_t j = 1; j < n; j++) m = x[j] > m ? x[j] : m;
        return m;
    }
    __attribute__((target("avx2,fma"))) static int fs_any_nonfinite_avx2(const float* x, Py_ssize_t n) {
        uint32_t acc = 0;
        for (Py_ssize_t j = 0; j < n; j++) {
            uint32_t b; memcpy(&b, x + j, 4);
            acc |= ((b & 0x7f800000u) == 0x7f800000u);
        }
        return acc != 0;
    }
    static FS_AVX2 float fs_sumexp_avx2(const float* x, Py_ssize_t n, float m) {
        float s = 0.0f;
        for (Py_ssize_t j = 0; j < n; j++) s += fs_expf_avx2(x[j] - m);
        return s;
    }
    static FS_AVX2 void fs_grad_avx2(const float* x, Py_ssize_t n, float m, float ls, float c, float* g) {
        for (Py_ssize_t j = 0; j < n; j++) g[j] = c * fs_expf_avx2((x[j] - m) - ls);
    }
    #endif

    static float fs_max_plain(const float* x, Py_ssize_t n) {
        float m = x[0];
        for (Py_ssize_t j = 1; j < n; j++) if (x[j] > m || x[j] != x[j]) m = x[j];
        return m;
    }
    static float fs_sumexp_plain(const float* x, Py_ssize_t n, float m) {
        float s = 0.0f;
        for (Py_ssize_t j = 0; j < n; j++) s += expf(x[j] - m);
        return s;
    }
    static void fs_grad_plain(const float* x, Py_ssize_t n, float m, float ls, float c, float* g) {
        for (Py_ssize_t j = 0; j < n; j++) g[j] = c * expf((x[j] - m) - ls);
    }

    static int fs_avx2_state = -1;
    static int fs_use_avx2(void) {
    #ifdef FS_HAVE_AVX2_PATH
        if (fs_avx2_state < 0) {
            __builtin_cpu_init();
            fs_avx2_state = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
        }
        return fs_avx2_state;
    #else
        return 0;
    #endif
    }
    static float fs_row_max_f32(const float* x, Py_ssize_t n) {
    #ifdef FS_HAVE_AVX2_PATH
        if (fs_use_avx2()) {
            /* fast-math max may drop NaNs: fall back to the exact scan when it sees any */
            if (fs_any_nonfinite_avx2(x, n)) return fs_max_plain(x, n);
            return fs_max_avx2(x, n);
        }
    #endif
        return fs_max_plain(x, n);
    }
    static float fs_row_sumexp_f32(const float* x, Py_ssize_t n, float m) {
    #ifdef FS_HAVE_AVX2_PATH
        if (fs_use_avx2()) return fs_sumexp_avx2(x, n, m);
    #endif
        return fs_sumexp_plain(x, n, m);
    }
    static void fs_row_grad_f32(const float* x, Py_ssize_t n, float m, float ls, float c, float* g) {
    #ifdef FS_HAVE_AVX2_PATH
        if (fs_use_avx2()) { fs_grad_avx2(x, n, m, ls, c, g); return; }
    #endif
        fs_grad_plain(x, n, m, ls, c, g);
    }
    static int fs_cpu_has_avx2(void) { return fs_use_avx2(); }
    """
    float fs_row_max_f32(const float* x, Py_ssize_t n) nogil
    float fs_row_sumexp_f32(const float* x, Py_ssize_t n, float m) nogil
    void fs_row_grad_f32(const float* x, Py_ssize_t n, float m, float ls, float c, float* g) nogil
    int fs_cpu_has_avx2() nogil


def uses_avx2():
    """True when the float32 rows run the AVX2+FMA code path."""
    return bool(fs_cpu_has_avx2())


cdef inline int _xent_forward_f32(const float[:, ::1] logits, const int64_t[::1] labels,
                                  float[::1] loss, float[::1] mx, float[::1] ls,
                                  Py_ssize_t r0, Py_ssize_t r1) noexcept nogil:
    cdef Py_ssize_t i, j, C = logits.shape[1]
    cdef const float* row
    cdef float m, s, l
    for i in range(r0, r1):
        row = &logits[i, 0]
        m = fs_row_max_f32(row, C)
        if m != m or m == <float>(1.0 / 0.0) or m == -<float>(1.0 / 0.0):
            # non-finite row: the exact (libm) formula, which propagates NaN/inf as TF does
            s = 0.0
            for j in range(C):
                s = s + <float>exp(<double>(row[j] - m))
        else:
            s = fs_row_sumexp_f32(row, C, m)
        l = logf(s)
        mx[i] = m
        ls[i] = l
        loss[i] = l - (row[labels[i]] - m)
    return 0


cdef inline int _xent_forward_f64(const double[:, ::1] logits, const int64_t[::1] labels,
                                  double[::1] loss, double[::1] mx, double[::1] ls,
                                  Py_ssize_t r0, Py_ssize_t r1) noexcept nogil:
    cdef Py_ssize_t i, j, C = logits.shape[1]
    cdef const double* row
    cdef double m, s, l
    for i in range(r0, r1):
        row = &logits[i, 0]
        m = row[0]
        for j in range(1, C):
            if row[j] > m or row[j] != row[j]:
                m = row[j]
        s = 0.0
        for j in range(C):
            s += exp(row[j] - m)
        l = log(s)
        mx[i] = m
        ls[i] = l
        loss[i] = l - (row[labels[i]] - m)
    return 0


def xent_forward(logits, labels, loss, mx, ls, Py_ssize_t r0, Py_ssize_t r1):
    """Rows [r0, r1): ``loss[i]``, the row maximum ``mx[i]`` and ``ls[i] = log(sum(exp(logits[i] - mx[i])))``."""
    if logits.dtype == np.float32:
        _forward32(logits, labels, loss, mx, ls, r0, r1)
    else:
        _forward64(logits, labels, loss, mx, ls, r0, r1)


def _forward32(const float[:, ::1] logits, const int64_t[::1] labels, float[::1] loss,
               float[::1] mx, float[::1] ls, Py_ssize_t r0, Py_ssize_t r1):
    with nogil:
        _xent_forward_f32(logits, labels, loss, mx, ls, r0, r1)


def _forward64(const double[:, ::1] logits, const int64_t[::1] labels, double[::1] loss,
               double[::1] mx, double[::1] ls, Py_ssize_t r0, Py_ssize_t r1):
    with nogil:
        _xent_forward_f64(logits, labels, loss, mx, ls, r0, r1)


def xent_backward(logits, labels, mx, ls, coef, grad, Py_ssize_t r0, Py_ssize_t r1):
    """Rows [r0, r1): ``grad[i] = coef[i] * (exp((logits[i] - mx[i]) - ls[i]) - onehot(labels[i]))``."""
    if logits.dtype == np.float32:
        _backward32(logits, labels, mx, ls, coef, grad, r0, r1)
    else:
        _backward64(logits, labels, mx, ls, coef, grad, r0, r1)


def _backward32(const float[:, ::1] logits, const int64_t[::1] labels, const float[::1] mx,
                const float[::1] ls, const float[::1] coef, float[:, ::1] grad, Py_ssize_t r0, Py_ssize_t r1):
    cdef Py_ssize_t i, j, C = logits.shape[1]
    cdef float c
    with nogil:
        for i in range(r0, r1):
            c = coef[i]
            if c == 0.0:
                for j in range(C):
                    grad[i, j] = 0.0
                continue
            fs_row_grad_f32(&logits[i, 0], C, mx[i], ls[i], c, &grad[i, 0])
            grad[i, labels[i]] -= c


def _backward64(const double[:, ::1] logits, const int64_t[::1] labels, const double[::1] mx,
                const double[::1] ls, const double[::1] coef, double[:, ::1] grad, Py_ssize_t r0, Py_ssize_t r1):
    cdef Py_ssize_t i, j, C = logits.shape[1]
    cdef double c, m, l
    with nogil:
        for i in range(r0, r1):
            c = coef[i]
            if c == 0.0:
                for j in range(C):
                    grad[i, j] = 0.0
                continue
            m = mx[i]
            l = ls[i]
            for j in range(C):
                grad[i, j] = c * exp((logits[i, j] - m) - l)
            grad[i, labels[i]] -= c
