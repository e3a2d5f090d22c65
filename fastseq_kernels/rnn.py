"""BasicRNNCell kernels, float32/float64, over a whole time-major sequence.

Shapes: x ``[T, B, I]``; kernel ``[I+H, H]``; bias ``[H]``; h0 ``[B, H]``; lengths int64
``[B]``; mask_h ``[Tm, B, H]`` with ``Tm`` 0 (no mask), 1 or ``T``. C-contiguous.
Same scheme as :mod:`.lstm`: one input-projection GEMM, one GEMM per step on the active
rows, nonlinearity fused in place, weight gradients as GEMMs over all rows.

``nthreads`` (last argument of every kernel): BLAS threads the kernel's large products may
use, the caller's share of the cores (products below ``_blas.PARALLEL_MIN_MACS`` use one).
"""

import numpy as np

from ._blas import gemm
from ._common import act, dact, dims, direct_rows, output_activation_stored, plan_and_inputs, row3, \
    rows_out, scatter_rows, time_index
from ._jit import kernel
from ._packed import gemm_nt, gemm_tn, given_or_pack, scratch_for, step_product


@kernel
def rnn_forward(x, kernel, bias, h0, lengths, reverse, mask_h, code, need_grad, nthreads, packed, bm):
    """Returns ``(y [T, B, H], h_T [B, H], workspace)``; with ``bm`` ``x`` is ``[B, T, I]``
    and ``y`` ``[B, T, H]`` (the state mask stays ``[T or 1, B, H]``). ``packed``:
    ``kernel[I:]`` packed by ``pack_if_worth`` (as below), or an empty array (then it is
    packed here)."""
    T, B, I = dims(x, bm)
    H = h0.shape[1]
    dt = x.dtype
    store_out = output_activation_stored(code)
    order, lens_s, nb, base, hbase, R, uniform, X = plan_and_inputs(x, lengths, reverse, need_grad, bm, True)
    L = nb.shape[0] - 1
    G = np.empty((R, H), dt)
    gemm(0, 0, R, H, I, 1.0, X, 0, I, kernel, 0, H, 0.0, G, 0, H, nthreads)
    KP = given_or_pack(packed, L, kernel, I * H, H, H, H, False)  # recurrent rows, packed once
    scr = scratch_for(G)
    Hh = np.empty((R if need_grad else 2 * B, H), dt)
    if direct_rows(uniform, bm, B):
        y = np.empty((B, T, H) if bm else (T, B, H), dt)
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
    for k in range(L):
        n = nb[k]
        nn = nb[k + 1]
        gb = base[k]
        hb = hbase[k]
        nhb = hbase[k + 1]
        step_product(n, H, H, Hh, hb * H, H, KP, kernel, I * H, H, 0, G, gb * H, H, 1, nthreads, scr)
        for r in range(n):
            b = order[r]
            t = time_index(k, r, lens_s, reverse)
            th = 0 if mask_h.shape[0] == 1 else t
            g = gb + r
            for j in range(H):
                z = G[g, j] + bias[j]
                hn = act(z, code)
                G[g, j] = hn if store_out else z
                Yp[g, j] = hn
                hm = hn * mask_h[th, b, j] if mh_on else hn
                if r < nn:
                    Hh[nhb + r, j] = hm
                else:
                    hT[b, j] = hm
    if not direct_rows(uniform, bm, B):
        y = scatter_rows(Yp, T, B, order, lens_s, nb, base, reverse, bm)
    ws = (X, G, Hh, order, lens_s, nb, base)
    return y, hT, ws


@kernel
def rnn_backward(ws, kernel, bias, dy, dhT, T, reverse, mask_h, code, nthreads, packed_t, bm):
    """Gradients of :func:`rnn_forward` (run with ``need_grad``).

    Returns ``(dx, dh0, dkernel, dbias)``; ``ws`` is left intact. With ``bm`` ``dy`` is
    ``[B, T, H]`` and ``dx`` ``[B, T, I]``."""
    X, G, Hh, order, lens_s, nb, base = ws
    B, H = dhT.shape
    I = X.shape[1]
    R = G.shape[0]
    dt = G.dtype
    store_out = output_activation_stored(code)
    L = nb.shape[0] - 1
    uniform = R == T * B and (B == 0 or lens_s[B - 1] == T)
    dH = np.empty((B, H), dt)
    for r in range(B):
        b = order[r]
        for j in range(H):
            dH[r, j] = dhT[b, j]
    dG = np.empty((R, H), dt)
    KPt = given_or_pack(packed_t, L, kernel, I * H, H, H, H, True)  # transposed recurrent rows
    scr = scratch_for(dG)
    mh_on = mask_h.shape[0] > 0
    for k in range(L - 1, -1, -1):
        n = nb[k]
        gb = base[k]
        for r in range(n):
            b = order[r]
            t = time_index(k, r, lens_s, reverse)
            th = 0 if mask_h.shape[0] == 1 else t
            g = gb + r
            dyr = row3(dy, t, b, bm)
            for j in range(H):
                d = dH[r, j] * mask_h[th, b, j] if mh_on else dH[r, j]
                d += dyr[j]
                if store_out:
                    yv = G[g, j]
                    dG[g, j] = d * dact(yv, yv, code)
                else:
                    z = G[g, j]
                    dG[g, j] = d * dact(z, act(z, code), code)
        step_product(n, H, H, dG, gb * H, H, KPt, kernel, I * H, H, 1, dH, 0, H, 0, nthreads, scr)
    dk = np.empty((I + H, H), dt)
    gemm_tn(I, H, R, X, 0, I, dG, 0, H, dk, 0, H, nthreads)
    gemm_tn(H, H, R, Hh, 0, H, dG, 0, H, dk, I * H, H, nthreads)
    db = np.zeros(H, dt)
    for i in range(R):
        for j in range(H):
            db[j] += dG[i, j]
    dXp = np.empty((R, I), dt)
    gemm_nt(R, I, H, dG, 0, H, kernel, 0, H, 0.0, dXp, 0, I, nthreads)
    dx = rows_out(dXp, T, B, order, lens_s, nb, base, reverse, uniform, bm)
    dh0 = np.empty((B, H), dt)
    for r in range(B):
        b = order[r]
        for j in range(H):
            dh0[b, j] = dH[r, j]
    return dx, dh0, dk, db
