"""GRU kernels (TF1's GRUCell: the reset gate multiplies ``h`` before the candidate
matmul), float32/float64, over a whole time-major sequence.

Shapes: x ``[T, B, I]``; gates_kernel ``[I+H, 2H]`` (columns r, u); gates_bias ``[2H]``;
cand_kernel ``[I+H, H]``; cand_bias ``[H]``; h0 ``[B, H]``; lengths int64 ``[B]``;
mask_h ``[Tm, B, H]`` with ``Tm`` 0 (no mask), 1 or ``T``. Everything C-contiguous.

The input projections of all steps are two GEMMs (gates and candidate) before the loop;
each step runs two GEMMs on the active rows (``h @ gates_kernel[I:]``, then
``(r*h) @ cand_kernel[I:]``) and fuses the nonlinearities in place. See :mod:`.lstm` and
:mod:`._common` for the buffer layout.

``nthreads`` (last argument of every kernel): BLAS threads the kernel's large products may
use, the caller's share of the cores (products below ``_blas.PARALLEL_MIN_MACS`` use one).
"""

import numpy as np

from ._blas import gemm
from ._common import TANH, act, dact, ftanh, gather_rows, make_plan, output_activation_stored, scatter_rows, \
    sigmoid, time_index
from ._jit import kernel
from ._packed import given_or_pack, scratch_for, step_product


@kernel(inline="always")
def _gates_row(xg, gbias, hp, rh, H):
    """One row's reset/update gates in place (``xg`` its ``2H`` pre-activations) and
    ``rh = r * h``: a branch-free loop over contiguous rows, which LLVM vectorises."""
    for j in range(H):
        rg = sigmoid(xg[j] + gbias[j])
        ug = sigmoid(xg[H + j] + gbias[H + j])
        xg[j] = rg
        xg[H + j] = ug
        rh[j] = rg * hp[j]


@kernel(inline="always")
def _output_tanh_row(xc, cbias, xg, hp, y, hout, one, H):
    """The common case of one row's new state (tanh candidate, no state mask), branch-free
    over contiguous rows; same arithmetic, in the same order, as the general loop."""
    for j in range(H):
        cc = ftanh(xc[j] + cbias[j])
        xc[j] = cc
        ug = xg[H + j]
        hn = ug * hp[j] + (one - ug) * cc
        y[j] = hn
        hout[j] = hn


@kernel(inline="always")
def _grad_out_tanh_row(dh, dyr, xg, xc, hp, dxc, dxg, one, H):
    """Backward of :func:`_output_tanh_row` for one row (no state mask): ``dh`` the carried
    state gradient (replaced by its part through ``u * h``), ``dyr`` the output gradient,
    ``dxc``/``dxg`` receive the candidate and update-gate gradients. Same arithmetic, in the
    same order, as the general loop of :func:`gru_backward`."""
    for j in range(H):
        dhn = dh[j]
        dhn += dyr[j]
        ug = xg[H + j]
        h = hp[j]
        cc = xc[j]
        dcc = one - cc * cc
        dxc[j] = dhn * (one - ug) * dcc
        dxg[H + j] = dhn * (h - cc) * ug * (one - ug)
        dh[j] = dhn * ug


@kernel(inline="always")
def _grad_reset_row(drh, xg, hp, dxg, dh, one, H):
    """Reset-gate gradients of one row and their share of ``d h`` (branch-free, contiguous)."""
    for j in range(H):
        rg = xg[j]
        d = drh[j]
        dxg[j] = d * hp[j] * rg * (one - rg)
        dh[j] += d * rg


@kernel
def gru_forward(x, gates_kernel, gates_bias, cand_kernel, cand_bias, h0, lengths, reverse, mask_h, code, need_grad, nthreads,
                packed_g, packed_c):
    """Returns ``(y [T, B, H], h_T [B, H], workspace)``. ``packed_g``, ``packed_c``: the
    recurrent rows of the two kernels packed by ``pack_if_worth`` (as below), or empty
    arrays (then they are packed here)."""
    T, B, I = x.shape
    H = h0.shape[1]
    H2 = 2 * H
    dt = x.dtype
    one = dt.type(1.0)
    store_out = output_activation_stored(code)
    order, lens_s, nb, base, hbase, R, uniform = make_plan(lengths, T, reverse, need_grad)
    L = nb.shape[0] - 1
    if uniform:
        X = x.reshape(T * B, I)
    else:
        X = gather_rows(x, order, lens_s, nb, base, R, reverse)
    XG = np.empty((R, H2), dt)
    XC = np.empty((R, H), dt)
    gemm(0, 0, R, H2, I, 1.0, X, 0, I, gates_kernel, 0, H2, 0.0, XG, 0, H2, nthreads)
    gemm(0, 0, R, H, I, 1.0, X, 0, I, cand_kernel, 0, H, 0.0, XC, 0, H, nthreads)
    KPg = given_or_pack(packed_g, L, gates_kernel, I * H2, H2, H, H2, False)  # recurrent rows, packed once
    KPc = given_or_pack(packed_c, L, cand_kernel, I * H, H, H, H, False)
    scr = scratch_for(XG)
    Hh = np.empty((R if need_grad else 2 * B, H), dt)
    RH = np.empty((R if need_grad else B, H), dt)
    if uniform:
        y = np.empty((T, B, H), dt)
        Yp = y.reshape(T * B, H)
    else:
        y = np.empty((0, 0, 0), dt)
        Yp = np.empty((R, H), dt)
    hT = np.empty((B, H), dt)
    n0 = nb[0] if L > 0 else 0
    for r in range(B):
        b = order[r]
        for j in range(H):
            if r < n0:
                Hh[hbase[0] + r, j] = h0[b, j]
            else:
                hT[b, j] = h0[b, j]
    mh_on = mask_h.shape[0] > 0
    fast_out = code == TANH and not mh_on  # decided once: see _output_tanh_row
    for k in range(L):
        n = nb[k]
        nn = nb[k + 1]
        gb = base[k]
        hb = hbase[k]
        nhb = hbase[k + 1]
        rb = gb if need_grad else 0
        step_product(n, H2, H, Hh, hb * H, H, KPg, gates_kernel, I * H2, H2, 0, XG, gb * H2, H2, 1, nthreads, scr)
        for r in range(n):
            _gates_row(XG[gb + r], gates_bias, Hh[hb + r], RH[rb + r], H)
        step_product(n, H, H, RH, rb * H, H, KPc, cand_kernel, I * H, H, 0, XC, gb * H, H, 1, nthreads, scr)
        if fast_out:
            for r in range(n):
                g = gb + r
                hout = Hh[nhb + r] if r < nn else hT[order[r]]
                _output_tanh_row(XC[g], cand_bias, XG[g], Hh[hb + r], Yp[g], hout, one, H)
        for r in range(n if not fast_out else 0):
            b = order[r]
            t = time_index(k, r, lens_s, reverse)
            th = 0 if mask_h.shape[0] == 1 else t
            g = gb + r
            for j in range(H):
                z = XC[g, j] + cand_bias[j]
                cc = act(z, code)
                XC[g, j] = cc if store_out else z
                ug = XG[g, H + j]
                hn = ug * Hh[hb + r, j] + (one - ug) * cc
                Yp[g, j] = hn
                hm = hn * mask_h[th, b, j] if mh_on else hn
                if r < nn:
                    Hh[nhb + r, j] = hm
                else:
                    hT[b, j] = hm
    if not uniform:
        y = scatter_rows(Yp, T, B, order, lens_s, nb, base, reverse)
    ws = (X, XG, XC, Hh, RH, order, lens_s, nb, base)
    return y, hT, ws


@kernel
def gru_backward(ws, gates_kernel, gates_bias, cand_kernel, cand_bias, dy, dhT, T, reverse, mask_h, code, nthreads,
                 packed_ct, packed_gt):
    """Gradients of :func:`gru_forward` (run with ``need_grad``); ``ws`` is left intact.

    Returns ``(dx, dh0, d_gates_kernel, d_gates_bias, d_cand_kernel, d_cand_bias)``."""
    X, XG, XC, Hh, RH, order, lens_s, nb, base = ws
    B, H = dhT.shape
    H2 = 2 * H
    I = X.shape[1]
    R = XG.shape[0]
    dt = XG.dtype
    one = dt.type(1.0)
    store_out = output_activation_stored(code)
    L = nb.shape[0] - 1
    uniform = R == T * B and (B == 0 or lens_s[B - 1] == T)
    dH = np.empty((B, H), dt)
    for r in range(B):
        b = order[r]
        for j in range(H):
            dH[r, j] = dhT[b, j]
    dRH = np.empty((B, H), dt)
    dXG = np.empty((R, H2), dt)
    dXC = np.empty((R, H), dt)
    KPct = given_or_pack(packed_ct, L, cand_kernel, I * H, H, H, H, True)  # transposed recurrent rows
    KPgt = given_or_pack(packed_gt, L, gates_kernel, I * H2, H2, H2, H, True)
    scr = scratch_for(dXG)
    mh_on = mask_h.shape[0] > 0
    fast_out = code == TANH and not mh_on  # decided once: see _grad_out_tanh_row
    for k in range(L - 1, -1, -1):
        n = nb[k]
        gb = base[k]
        if fast_out:
            for r in range(n):
                g = gb + r
                _grad_out_tanh_row(dH[r], dy[time_index(k, r, lens_s, reverse), order[r]], XG[g], XC[g], Hh[g],
                                   dXC[g], dXG[g], one, H)
        for r in range(n if not fast_out else 0):
            b = order[r]
            t = time_index(k, r, lens_s, reverse)
            th = 0 if mask_h.shape[0] == 1 else t
            g = gb + r
            for j in range(H):
                dhn = dH[r, j] * mask_h[th, b, j] if mh_on else dH[r, j]
                dhn += dy[t, b, j]
                ug = XG[g, H + j]
                h = Hh[g, j]
                if store_out:
                    cc = XC[g, j]
                    dcc = dact(cc, cc, code)
                else:
                    z = XC[g, j]
                    cc = act(z, code)
                    dcc = dact(z, cc, code)
                dXC[g, j] = dhn * (one - ug) * dcc
                dXG[g, H + j] = dhn * (h - cc) * ug * (one - ug)
                dH[r, j] = dhn * ug
        step_product(n, H, H, dXC, gb * H, H, KPct, cand_kernel, I * H, H, 1, dRH, 0, H, 0, nthreads, scr)
        for r in range(n):
            g = gb + r
            _grad_reset_row(dRH[r], XG[g], Hh[g], dXG[g], dH[r], one, H)
        step_product(n, H, H2, dXG, gb * H2, H2, KPgt, gates_kernel, I * H2, H2, 1, dH, 0, H, 1, nthreads, scr)

    dgk = np.empty((I + H, H2), dt)
    gemm(1, 0, I, H2, R, 1.0, X, 0, I, dXG, 0, H2, 0.0, dgk, 0, H2, nthreads)
    gemm(1, 0, H, H2, R, 1.0, Hh, 0, H, dXG, 0, H2, 0.0, dgk, I * H2, H2, nthreads)
    dck = np.empty((I + H, H), dt)
    gemm(1, 0, I, H, R, 1.0, X, 0, I, dXC, 0, H, 0.0, dck, 0, H, nthreads)
    gemm(1, 0, H, H, R, 1.0, RH, 0, H, dXC, 0, H, 0.0, dck, I * H, H, nthreads)
    dgb = np.zeros(H2, dt)
    dcb = np.zeros(H, dt)
    for i in range(R):
        for j in range(H2):
            dgb[j] += dXG[i, j]
        for j in range(H):
            dcb[j] += dXC[i, j]
    dXp = np.empty((R, I), dt)
    gemm(0, 1, R, I, H2, 1.0, dXG, 0, H2, gates_kernel, 0, H2, 0.0, dXp, 0, I, nthreads)
    gemm(0, 1, R, I, H, 1.0, dXC, 0, H, cand_kernel, 0, H, 1.0, dXp, 0, I, nthreads)
    if uniform:
        dx = dXp.reshape(T, B, I)
    else:
        dx = scatter_rows(dXp, T, B, order, lens_s, nb, base, reverse)
    dh0 = np.empty((B, H), dt)
    for r in range(B):
        b = order[r]
        for j in range(H):
            dh0[b, j] = dH[r, j]
    return dx, dh0, dgk, dgb, dck, dcb
