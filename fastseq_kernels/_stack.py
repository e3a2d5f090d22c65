"""Pieces shared by the stacked-layer inference kernels (``gru.gru_stack_forward``,
``lstm.lstm_stack_forward``): a MultiRNNCell of plain layers in one two-thread job, each
worker taking a part of the sorted batch rows (``p``, ``p + S``, ...) through every
layer. Rows of a batch never meet in a recurrent layer and the row plan (see
:mod:`._common`) is the same in every layer, so a part's outputs of one layer, in plan
order, are its input rows in the next; no worker ever waits for the other between
layers."""

import numpy as np

from ._common import direct_rows, dims, plan_and_inputs, row3, rows_buffer, time_index
from ._jit import kernel
from ._packed import MAX_HEIGHT, gemm_packed, panel_width


#: Rows of ``A`` copied together by :func:`project_part` (each block multiplied by all of
#: ``B`` from a contiguous copy in L2), and the elements added to each copied row.
PROJ_BLOCK = 96
PROJ_PAD = 16


@kernel(inline="always")
def _project_strided(m, A, a0, S, KP, C, c0, scr, buf):
    """``C`` rows ``c0, c0 + S, ...`` (``m`` of them) ``= A`` rows ``a0, a0 + S, ...`` ``@ B``,
    through contiguous copies of ``PROJ_BLOCK`` rows of ``A`` (rows ``PROJ_PAD`` elements
    longer than ``A``'s). Read in place, rows ``S`` apart put the micro-kernel's row streams
    in the same L1 sets whenever ``S`` rows make a multiple of 4 KB (P3's 2 KB input rows:
    measured 2-13 % slower stacks of LSTM(256-512) layers than their chunks of contiguous
    rows); the copy also keeps each block in L2 while all of ``B`` passes over it."""
    I = A.shape[1]
    N = C.shape[1]
    ld = I + PROJ_PAD
    for i0 in range(0, m, PROJ_BLOCK):
        h = min(PROJ_BLOCK, m - i0)
        for i in range(h):
            src = A[a0 + S * (i0 + i)]
            o = i * ld
            for j in range(I):
                buf[o + j] = src[j]
        gemm_packed(h, N, I, buf, 0, ld, KP, C, (c0 + S * i0) * N, S * N, scr, 0)


@kernel(inline="always")
def project_part(p, S, whole, nb, base, A, KP, C, scr, buf):
    """``C = A @ B`` (``B`` packed in ``KP``) for the rows of part ``p`` of every step
    (:func:`_project_strided`, ``buf`` its copy rows): over all steps at once when
    ``whole`` (every step's block holds the whole batch and ``S`` divides it, so the part's
    rows lie ``S`` rows apart through ``A``), else step by step."""
    if whole:
        _project_strided((A.shape[0] - p + S - 1) // S, A, p, S, KP, C, p, scr, buf)
        return
    for k in range(nb.shape[0] - 1):
        m = (nb[k] - p + S - 1) // S
        if m <= 0:
            break  # active rows only shrink
        _project_strided(m, A, base[k] + p, S, KP, C, base[k] + p, scr, buf)


@kernel(inline="always")
def initial_part(p, S, state0, order, n0, hbase0, rows, finals):
    """The initial state ``state0 [B, H]`` of part ``p``'s rows in place: a row still
    running at step 0 into the carried-state rows ``rows[hbase0 + r]``, a row of length 0
    straight into its final state ``finals[order[r]]``."""
    for r in range(p, order.shape[0], S):
        src = state0[order[r]]
        dst = rows[hbase0 + r] if r < n0 else finals[order[r]]
        for j in range(src.shape[0]):
            dst[j] = src[j]


@kernel(inline="always")
def scatter_part(p, S, Yp, y, order, lens_s, nb, base, reverse, bm):
    """Part ``p``'s rows of ``Yp`` (plan order) to their places in ``y`` (the caller's
    layout): the row-split LSTM backward's ``dx`` rows of a batch of mixed lengths, copied
    by the worker that made them."""
    for k in range(nb.shape[0] - 1):
        for r in range(p, nb[k], S):
            src = Yp[base[k] + r]
            dst = row3(y, time_index(k, r, lens_s, reverse), order[r], bm)
            for j in range(src.shape[0]):
                dst[j] = src[j]


@kernel(inline="always")
def stack_buffers(x, Ls, H, lengths, reverse, bm, parts):
    """What a stack's workers share: the row plan, the bottom layer's input rows in plan
    order, the two buffers of the middle layers' outputs (``Ymid``), the top layer's
    outputs (``Yp``: the rows of ``y`` itself where :func:`._common.direct_rows`, else
    unused: the workers write the rows of ``y``), ``y`` (zeros past each length when not
    every row runs ``T`` steps), the task counter, the
    workers' scratch rows and their copy rows for :func:`project_part`."""
    T, B, _ = dims(x, bm)
    dt = x.dtype
    order, lens_s, nb, base, hbase, R, uniform, X = plan_and_inputs(x, lengths, reverse, False, bm, True)
    Ymid = np.empty((min(Ls - 1, 2), R, H), dt)
    shape = (B, T, H) if bm else (T, B, H)
    y = rows_buffer(shape, uniform, dt)
    Yp = y.reshape(T * B, H) if direct_rows(uniform, bm, B) else np.empty((0, H), dt)
    whole = uniform and B % parts == 0
    claims = np.zeros(1, np.int64)
    scratch = np.empty((2, MAX_HEIGHT * panel_width(x)), dt)
    pbuf = np.empty((2, PROJ_BLOCK * (max(x.shape[2], H) + PROJ_PAD)), dt)  # each worker's copy rows
    return order, lens_s, nb, base, hbase, R, uniform, whole, X, Ymid, y, Yp, claims, scratch, pbuf
