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
from ._common import TANH, act, column_sums, dact, dims, direct_rows, ftanh, gather_range, \
    output_activation_stored, part_step, plan_and_inputs, row3, rows_buffer, rows_out, scatter_range, scatter_rows, \
    sigmoid, time_index
from ._atomic import atomic_add, chunk_cols, take_chunk, team_begin, team_end, wait_at_least
from ._jit import kernel
from ._packed import MAX_HEIGHT, PACK_MIN_STEPS, acc_adds_nothing, gemm_acc_packed, gemm_nt, gemm_packed, gemm_tn, \
    given_or_pack, packed_or_empty, panel_width, scratch_for, step_product
from ._stack import initial_part, project_part, stack_buffers
from ._team import PROJ_CHUNKS, run_pair


@kernel(inline="always")
def _gates_cols(xg, gbias, hp, rh, H, j0, j1):
    """Gate columns ``j0:j1`` (of the ``2H``: reset gate below ``H``, update gate above) of
    one row in place (``xg`` its pre-activations), and ``rh = r * h`` for the reset
    columns: branch-free loops over contiguous views from index 0, which LLVM vectorises."""
    a1 = min(j1, H)
    if a1 > j0:
        xs = xg[j0:a1]
        bs = gbias[j0:a1]
        hs = hp[j0:a1]
        rs = rh[j0:a1]
        for j in range(a1 - j0):
            rg = sigmoid(xs[j] + bs[j])
            xs[j] = rg
            rs[j] = rg * hs[j]
    b0 = max(j0, H)
    if j1 > b0:
        xs = xg[b0:j1]
        bs = gbias[b0:j1]
        for j in range(j1 - b0):
            xs[j] = sigmoid(xs[j] + bs[j])


@kernel(inline="always")
def _output_tanh_units(xc, cbias, xg, hp, y, hout, one, H, u0, u1):
    """The common case of one row's new state (tanh candidate, no state mask) for units
    ``u0:u1``, branch-free over contiguous views; same arithmetic, in the same order, as
    the general loop of :func:`gru_forward`."""
    xs = xc[u0:u1]
    bs = cbias[u0:u1]
    us = xg[H + u0:H + u1]
    hs = hp[u0:u1]
    ys = y[u0:u1]
    os_ = hout[u0:u1]
    for j in range(u1 - u0):
        cc = ftanh(xs[j] + bs[j])
        xs[j] = cc
        ug = us[j]
        hn = ug * hs[j] + (one - ug) * cc
        ys[j] = hn
        os_[j] = hn


@kernel(inline="always")
def _grad_out_tanh_units(dh, dyr, xg, xc, hp, dxc, dxg, one, H, u0, u1):
    """Backward of :func:`_output_tanh_units` for units ``u0:u1`` of one row (no state
    mask): ``dh`` the carried state gradient (replaced by its part through ``u * h``),
    ``dyr`` the output gradient, ``dxc``/``dxg`` receive the candidate and update-gate
    gradients. Same arithmetic, in the same order, as the general loop of
    :func:`gru_backward`."""
    dhs = dh[u0:u1]
    dys = dyr[u0:u1]
    us = xg[H + u0:H + u1]
    hs = hp[u0:u1]
    cs = xc[u0:u1]
    dcs = dxc[u0:u1]
    dus = dxg[H + u0:H + u1]
    for j in range(u1 - u0):
        dhn = dhs[j]
        dhn += dys[j]
        ug = us[j]
        h = hs[j]
        cc = cs[j]
        dcc = one - cc * cc
        dcs[j] = dhn * (one - ug) * dcc
        dus[j] = dhn * (h - cc) * ug * (one - ug)
        dhs[j] = dhn * ug


@kernel(inline="always")
def _grad_reset_units(drh, xg, hp, dxg, dh, one, u0, u1):
    """Reset-gate gradients of units ``u0:u1`` of one row and their share of ``d h``
    (branch-free, contiguous)."""
    ds = drh[u0:u1]
    rs = xg[u0:u1]
    hs = hp[u0:u1]
    dgs = dxg[u0:u1]
    dhs = dh[u0:u1]
    for j in range(u1 - u0):
        rg = rs[j]
        d = ds[j]
        dgs[j] = d * hs[j] * rg * (one - rg)
        dhs[j] += d * rg


@kernel(inline="always")
def _forward_setup(x, h0, lengths, reverse, need_grad, bm, gather, to_y):
    """What both forward loops start from: the row plan, the input rows ``X`` in plan
    order, the carried-state buffer ``Hh`` with the initial state in place (rows of
    sequences of length 0 go straight to the final state ``hT``), ``RH`` (``r * h``) and
    the outputs. Without ``gather`` an ``X`` that is not ``x``'s own memory is left
    unwritten (the two-thread workers copy their chunks of it, :func:`_project_chunks`);
    with ``to_y`` the outputs ``y`` are allocated in the caller's layout (zeros past each
    length) for the workers to write in place, else only where ``Yp`` is their memory."""
    T, B, I = dims(x, bm)
    H = h0.shape[1]
    dt = x.dtype
    order, lens_s, nb, base, hbase, R, uniform, X = plan_and_inputs(x, lengths, reverse, need_grad, bm, gather)
    Hh = np.empty((R if need_grad else 2 * B, H), dt)
    RH = np.empty((R if need_grad else B, H), dt)
    shape = (B, T, H) if bm else (T, B, H)
    if direct_rows(uniform, bm, B):
        y = np.empty(shape, dt)
        Yp = y.reshape(T * B, H)
    else:
        if to_y:
            y = rows_buffer(shape, uniform, dt)
        else:
            y = np.empty((0, 0, 0), dt)
        Yp = np.empty((R, H), dt)
    hT = np.empty((B, H), dt)
    n0 = nb[0] if nb.shape[0] > 1 else 0
    for r in range(B):
        b = order[r]
        for j in range(H):
            if r < n0:
                Hh[hbase[0] + r, j] = h0[b, j]
            else:
                hT[b, j] = h0[b, j]
    return order, lens_s, nb, base, hbase, R, uniform, X, Hh, RH, y, Yp, hT


@kernel
def gru_forward(x, gates_kernel, gates_bias, cand_kernel, cand_bias, h0, lengths, reverse, mask_h, code, need_grad, nthreads,
                packed_g, packed_c, bm):
    """Returns ``(y [T, B, H], h_T [B, H], workspace)``; with ``bm`` ``x`` is ``[B, T, I]``
    and ``y`` ``[B, T, H]`` (the state mask stays ``[T or 1, B, H]``). ``packed_g``,
    ``packed_c``: the recurrent rows of the two kernels packed by ``pack_if_worth`` (as
    below), or empty arrays (then they are packed here)."""
    T, B, I = dims(x, bm)
    H = h0.shape[1]
    H2 = 2 * H
    dt = x.dtype
    one = dt.type(1.0)
    store_out = output_activation_stored(code)
    order, lens_s, nb, base, hbase, R, uniform, X, Hh, RH, y, Yp, hT = _forward_setup(x, h0, lengths, reverse,
                                                                                     need_grad, bm, True, False)
    L = nb.shape[0] - 1
    XG = np.empty((R, H2), dt)
    XC = np.empty((R, H), dt)
    gemm(0, 0, R, H2, I, 1.0, X, 0, I, gates_kernel, 0, H2, 0.0, XG, 0, H2, nthreads)
    gemm(0, 0, R, H, I, 1.0, X, 0, I, cand_kernel, 0, H, 0.0, XC, 0, H, nthreads)
    KPg = given_or_pack(packed_g, L, gates_kernel, I * H2, H2, H, H2, False)  # recurrent rows, packed once
    KPc = given_or_pack(packed_c, L, cand_kernel, I * H, H, H, H, False)
    scr = scratch_for(XG)
    mh_on = mask_h.shape[0] > 0
    fast_out = code == TANH and not mh_on  # decided once: see _output_tanh_units
    for k in range(L):
        n = nb[k]
        nn = nb[k + 1]
        gb = base[k]
        hb = hbase[k]
        nhb = hbase[k + 1]
        rb = gb if need_grad else 0
        step_product(n, H2, H, Hh, hb * H, H, KPg, gates_kernel, I * H2, H2, 0, XG, gb * H2, H2, 1, nthreads, scr)
        for r in range(n):
            _gates_cols(XG[gb + r], gates_bias, Hh[hb + r], RH[rb + r], H, 0, H2)
        step_product(n, H, H, RH, rb * H, H, KPc, cand_kernel, I * H, H, 0, XC, gb * H, H, 1, nthreads, scr)
        if fast_out:
            for r in range(n):
                g = gb + r
                hout = Hh[nhb + r] if r < nn else hT[order[r]]
                _output_tanh_units(XC[g], cand_bias, XG[g], Hh[hb + r], Yp[g], hout, one, H, 0, H)
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
    if not direct_rows(uniform, bm, B):
        y = scatter_rows(Yp, T, B, order, lens_s, nb, base, reverse, bm)
    ws = (X, XG, XC, Hh, RH, order, lens_s, nb, base)
    return y, hT, ws


#: Smallest per-step product (multiply-adds, rows x 3H x H) for which the forward loop
#: runs on two threads (:func:`gru_forward_split`); below it the one-thread loop above.
SPLIT_MIN_MACS = 1 << 20


def split_applies(B, H, steps, plain, nthreads):
    """Whether :func:`gru_forward_split` can and should run this layer: the common
    configuration (``plain``: tanh candidate, no state mask), two threads allowed, and a
    per-step product large enough to pay for two barriers per step."""
    return plain and nthreads >= 2 and steps >= 4 and H >= 32 and B * 3 * H * H >= SPLIT_MIN_MACS


@kernel
def gru_forward_split_begin(x, gates_kernel, cand_kernel, h0, lengths, reverse, need_grad, packed_g, packed_c,
                            packed_gi, packed_ci, bm, to_y):
    """Everything before the time loop of :func:`gru_forward_split` but the input
    projections and the copy of the input rows into plan order (the workers do those):
    the row plan, the packed recurrent rows and input rows of both kernels (given, or
    packed here), the buffers, the initial state in place, the task counters. ``to_y``:
    the workers write the outputs into ``y`` in the caller's layout."""
    I = x.shape[2]
    H = h0.shape[1]
    H2 = 2 * H
    dt = x.dtype
    order, lens_s, nb, base, hbase, R, uniform, X, Hh, RH, y, Yp, hT = _forward_setup(x, h0, lengths, reverse,
                                                                                     need_grad, bm, False, to_y)
    L = nb.shape[0] - 1
    XG = np.empty((R, H2), dt)
    XC = np.empty((R, H), dt)
    # packed even for loops under PACK_MIN_STEPS: the workers have no unpacked path
    KPg = given_or_pack(packed_g, max(L, PACK_MIN_STEPS), gates_kernel, I * H2, H2, H, H2, False)
    KPc = given_or_pack(packed_c, max(L, PACK_MIN_STEPS), cand_kernel, I * H, H, H, H, False)
    KPgi = given_or_pack(packed_gi, max(L, PACK_MIN_STEPS), gates_kernel, 0, H2, I, H2, False)
    KPci = given_or_pack(packed_ci, max(L, PACK_MIN_STEPS), cand_kernel, 0, H, I, H, False)
    # chunks taken per task: 2k gates, 2k+1 candidate; [2L] projections; [2L+1] row parts
    claims = np.zeros(2 * L + 2, np.int64)
    done = np.zeros(2 * L + 2, np.int64)  # chunks done per task
    scratch = np.empty((2, MAX_HEIGHT * panel_width(XG)), dt)
    return (order, lens_s, nb, base, hbase, uniform, X, XG, XC, KPg, KPc, KPgi, KPci, Hh, RH, y, Yp, hT, claims, done,
            scratch)


@kernel(inline="always")
def _project_chunks(w, claims, done, P, X, KPgi, KPci, XG, XC, scr, x, order, lens_s, nb, base, uniform, reverse, bm):
    """The two input projections in ``PROJ_CHUNKS`` row chunks (task ``P``), both
    products of a chunk together, on the packed micro-kernel over the packed input rows
    (see :func:`.lstm.lstm_forward_split_worker`; one OpenBLAS thread ran P2's chunks
    [224, 200] x [200, 400] at 99 GFLOP/s, the micro-kernel at 113); returns when every
    chunk is done, by either worker. Where ``X`` is not ``x``'s own memory, each chunk's
    rows are first copied into it (:func:`._common.gather_range`), on both threads and
    just before the products read them."""
    R, I = X.shape
    H2 = XG.shape[1]
    H = XC.shape[1]
    gather = not direct_rows(uniform, bm, order.shape[0])
    while True:
        c = take_chunk(claims, P, PROJ_CHUNKS, w)
        if c < 0:
            break
        r0 = R * c // PROJ_CHUNKS
        r1 = R * (c + 1) // PROJ_CHUNKS
        if gather:
            gather_range(x, X, r0, r1, order, lens_s, nb, base, uniform, reverse, bm)
        gemm_packed(r1 - r0, H2, I, X, r0 * I, I, KPgi, XG, r0 * H2, H2, scr, 0)
        gemm_packed(r1 - r0, H, I, X, r0 * I, I, KPci, XC, r0 * H, H, scr, 0)
        atomic_add(done, P, 1)
    wait_at_least(done, P, PROJ_CHUNKS)


#: Chunks per product and step in :func:`gru_forward_split_worker`: one per worker.
#: Measured on the 2-core machine (P2's layers, B=32, H=200): two chunks 1.46x faster than
#: the one-thread loop, four 1.37x, eight (two panels each) 1.25x; with small chunks the
#: per-row gate loops are short and their fixed cost dominates.
CHUNKS = 2


@kernel
def gru_forward_split_worker(w, hand, claims, done, nb, base, hbase, order, X, KPgi, KPci, XG, XC,
                             gates_bias, cand_bias, KPg, KPc, Hh, RH, Yp, hT, need_grad, scratch, nchunks, x, lens_s,
                             uniform, reverse, bm, y, to_y):
    """Worker ``w`` (0 or 1) of the time loop. First the two input projections in
    ``PROJ_CHUNKS`` row chunks each (:func:`_project_chunks`). Then two tasks per step ``k``, each in chunks
    of whole panels claimed by :func:`._atomic.take_chunk`: task ``2k``, columns of the gate
    product ``h @ gates_kernel[I:]`` with their gates (and ``r * h`` for reset columns),
    once every chunk of the previous step is done (``h`` of all units); task ``2k + 1``,
    columns of the candidate product ``(r * h) @ cand_kernel[I:]`` with the new state of
    those units, once every gate chunk of the step is done (``r * h`` of all units)."""
    jb = team_begin(w, hand)
    if jb < 0:  # the caller finished this job without the helper
        return team_end(w, hand, jb)
    L = nb.shape[0] - 1
    H = Hh.shape[1]
    H2 = 2 * H
    NR = panel_width(XG)
    ncg = min((H2 + NR - 1) // NR, nchunks)
    ncc = min((H + NR - 1) // NR, nchunks)
    scr = scratch[w]
    one = XG.dtype.type(1.0)
    _project_chunks(w, claims, done, 2 * L, X, KPgi, KPci, XG, XC, scr, x, order, lens_s, nb, base, uniform, reverse,
                    bm)
    for k in range(L):
        n = nb[k]
        nn = nb[k + 1]
        gb = base[k]
        hb = hbase[k]
        nhb = hbase[k + 1]
        rb = gb if need_grad else 0
        while True:
            c = take_chunk(claims, 2 * k, ncg, w)
            if c < 0:
                break
            if k > 0:
                wait_at_least(done, 2 * k - 1, ncc)
            j0, j1 = chunk_cols(c, ncg, H2, NR)
            KPj = KPg[(j0 // NR) * H * NR:]
            if k > 0 or not acc_adds_nothing(n, j1 - j0, H, Hh, hb * H, H, KPj):
                gemm_acc_packed(n, j1 - j0, H, Hh, hb * H, H, KPj, XG, gb * H2 + j0, H2, scr)
            for r in range(n):
                _gates_cols(XG[gb + r], gates_bias, Hh[hb + r], RH[rb + r], H, j0, j1)
            atomic_add(done, 2 * k, 1)
        while True:
            c = take_chunk(claims, 2 * k + 1, ncc, w)
            if c < 0:
                break
            wait_at_least(done, 2 * k, ncg)
            u0, u1 = chunk_cols(c, ncc, H, NR)
            KPu = KPc[(u0 // NR) * H * NR:]
            if k > 0 or not acc_adds_nothing(n, u1 - u0, H, RH, rb * H, H, KPu):
                gemm_acc_packed(n, u1 - u0, H, RH, rb * H, H, KPu, XC, gb * H + u0, H, scr)
            for r in range(n):
                g = gb + r
                hout = Hh[nhb + r] if r < nn else hT[order[r]]
                yr = row3(y, time_index(k, r, lens_s, reverse), order[r], bm) if to_y else Yp[g]
                _output_tanh_units(XC[g], cand_bias, XG[g], Hh[hb + r], yr, hout, one, H, u0, u1)
            atomic_add(done, 2 * k + 1, 1)
    return team_end(w, hand, jb)


#: Fewest batch rows for which the two-thread loops split the rows of the batch instead of
#: the columns of every product (:func:`gru_forward_rows_worker`).
ROWS_MIN_B = 8
#: Most bytes of recurrent weights (``3 H^2`` elements) for the row split: each worker
#: then reads all of them every step, which pays while they stay in its L2. Measured on
#: the 2-vCPU Zen 4 machine (1 MB L2 per core; ratios column split / row split, forward
#: and training): H=128 B=128 1.10 / 1.09, H=200 B=16..64 1.04-1.09, H=256 B=12 (768 KB)
#: 0.98 / 1.05, H=512 B=32 (3 MB) 0.91 / 0.99.
ROWS_MAX_WEIGHT_BYTES = 1 << 19
#: Row parts in that case: one per worker.
ROW_PARTS = 2


def _split_by_rows(B, H, itemsize):
    """Whether the two-thread loops share each step by rows (else by columns)."""
    return B >= ROWS_MIN_B and 3 * H * H * itemsize <= ROWS_MAX_WEIGHT_BYTES


@kernel
def gru_forward_rows_worker(w, hand, claims, done, nb, base, hbase, order, X, KPgi, KPci, XG, XC,
                            gates_bias, cand_bias, KPg, KPc, Hh, RH, Yp, hT, need_grad, scratch, nparts, x, lens_s,
                            uniform, reverse, bm, y, to_y):
    """Worker ``w`` (0 or 1) of the time loop split by batch rows: the input projections as
    in :func:`gru_forward_split_worker`, then the whole time loop of every row part it
    claims (task ``2L + 1``: ``nparts`` parts, part ``p`` the sorted rows ``p``,
    ``p + nparts``, ...). Rows of a batch never meet in a recurrent layer, and a sorted row
    keeps its index while it is active, so each part runs from the first step to the last
    with no wait on the other worker: no barrier per step (the column split has two), at
    the cost of each worker reading all of the packed weights every step. A worker that is
    late or absent leaves its part to the other one, which claims it when done with its own.
    With ``to_y`` the outputs go straight into ``y`` (the caller's layout) instead of
    ``Yp``."""
    jb = team_begin(w, hand)
    if jb < 0:  # the caller finished this job without the helper
        return team_end(w, hand, jb)
    L = nb.shape[0] - 1
    scr = scratch[w]
    one = XG.dtype.type(1.0)
    _project_chunks(w, claims, done, 2 * L, X, KPgi, KPci, XG, XC, scr, x, order, lens_s, nb, base, uniform, reverse,
                    bm)
    S = nparts
    while True:
        p = take_chunk(claims, 2 * L + 1, S, w)
        if p < 0:
            break
        _rows_part_loop(p, S, nb, base, hbase, order, XG, XC, gates_bias, cand_bias, KPg, KPc, Hh, RH, Yp, hT, scr, one,
                        need_grad, y, lens_s, reverse, bm, to_y)
    return team_end(w, hand, jb)


@kernel(inline="always")
def _rows_part_loop(p, S, nb, base, hbase, order, XG, XC, gates_bias, cand_bias, KPg, KPc, Hh, RH, Yp, hT, scr, one,
                    need_grad, y, lens_s, reverse, bm, to_y):
    """The time loop of one layer for the rows of part ``p`` (sorted rows ``p``, ``p + S``,
    ...) of the row-split loops: each step the gate product of those rows, their gates
    and ``r * h``, the candidate product, the new state. ``need_grad``: ``RH`` keeps every
    step's rows (the history), else only the current step's. The outputs go to ``Yp``
    (plan order), or with ``to_y`` to their rows of ``y`` (the caller's layout)."""
    H = Hh.shape[1]
    H2 = 2 * H
    for k in range(nb.shape[0] - 1):
        n, m, nn, gb, hb, nhb = part_step(k, p, S, nb, base, hbase)
        if m <= 0:
            break
        rb = gb if need_grad else 0
        if k > 0 or not acc_adds_nothing(m, H2, H, Hh, (hb + p) * H, S * H, KPg):
            gemm_acc_packed(m, H2, H, Hh, (hb + p) * H, S * H, KPg, XG, (gb + p) * H2, S * H2, scr)
        for r in range(p, n, S):
            _gates_cols(XG[gb + r], gates_bias, Hh[hb + r], RH[rb + r], H, 0, H2)
        if k > 0 or not acc_adds_nothing(m, H, H, RH, (rb + p) * H, S * H, KPc):
            gemm_acc_packed(m, H, H, RH, (rb + p) * H, S * H, KPc, XC, (gb + p) * H, S * H, scr)
        for r in range(p, n, S):
            g = gb + r
            hout = Hh[nhb + r] if r < nn else hT[order[r]]
            yr = row3(y, time_index(k, r, lens_s, reverse), order[r], bm) if to_y else Yp[g]
            _output_tanh_units(XC[g], cand_bias, XG[g], Hh[hb + r], yr, hout, one, H, 0, H)


@kernel
def gru_stack_rows_worker(w, hand, claims, nb, base, hbase, order, lens_s, whole, X, KPgi0, KPci0, KPgi, KPci, KPg,
                          KPc, gates_bias, cand_bias, h0, XG, XC, Hh, RH, Ymid, Yp, hT, y, scatter, reverse, bm,
                          scratch, pbuf, nparts):
    """Worker ``w`` (0 or 1) of :func:`gru_stack_forward`: a stack of ``Ls`` GRU layers
    (inference) split by batch rows. A part's rows (sorted rows ``p``, ``p + nparts``, ...)
    never meet another part's in any layer, and the plan (the sorted order and each step's
    row block) is the same in every layer, so each part goes through the whole stack, layer
    after layer (the input projections of its rows, then its time loop), with no wait on
    the other worker: no barrier between layers (the layer-by-layer route has one after
    each layer's projections and one at each layer's end, and a return to Python between
    layers). Layer ``l``'s outputs, in plan order, are layer ``l + 1``'s input rows
    (``Ymid[l % 2]``); the top layer writes ``Yp``, or with ``scatter`` its rows of ``y``
    (the caller's layout) directly. A late or absent worker
    leaves its part to the other one, which claims it when done with its own."""
    jb = team_begin(w, hand)
    if jb < 0:  # the caller finished this job without the helper
        return team_end(w, hand, jb)
    Ls = KPg.shape[0]
    n0 = nb[0] if nb.shape[0] > 1 else 0
    scr = scratch[w]
    buf = pbuf[w]
    one = XG.dtype.type(1.0)
    S = nparts
    while True:
        p = take_chunk(claims, 0, S, w)
        if p < 0:
            break
        for l in range(Ls):
            initial_part(p, S, h0[l], order, n0, hbase[0], Hh, hT[l])
            if l == 0:
                project_part(p, S, whole, nb, base, X, KPgi0, XG, scr, buf)
                project_part(p, S, whole, nb, base, X, KPci0, XC, scr, buf)
            else:
                project_part(p, S, whole, nb, base, Ymid[(l - 1) % 2], KPgi[l - 1], XG, scr, buf)
                project_part(p, S, whole, nb, base, Ymid[(l - 1) % 2], KPci[l - 1], XC, scr, buf)
            if l == Ls - 1:
                _rows_part_loop(p, S, nb, base, hbase, order, XG, XC, gates_bias[l], cand_bias[l], KPg[l], KPc[l], Hh,
                                RH, Yp, hT[l], scr, one, False, y, lens_s, reverse, bm, scatter)
            else:
                _rows_part_loop(p, S, nb, base, hbase, order, XG, XC, gates_bias[l], cand_bias[l], KPg[l], KPc[l], Hh,
                                RH, Ymid[l % 2], hT[l], scr, one, False, y, lens_s, reverse, bm, False)
    return team_end(w, hand, jb)


@kernel
def gru_stack_begin(x, h0, lengths, reverse, bm):
    """Everything :func:`gru_stack_forward` needs before its workers
    (:func:`._stack.stack_buffers`, and the gate, candidate and state rows shared by the
    layers: each part only ever touches its own rows of them)."""
    Ls, B, H = h0.shape
    dt = x.dtype
    order, lens_s, nb, base, hbase, R, uniform, whole, X, Ymid, y, Yp, claims, scratch, pbuf = stack_buffers(
        x, Ls, H, lengths, reverse, bm, ROW_PARTS)
    XG = np.empty((R, 2 * H), dt)
    XC = np.empty((R, H), dt)
    Hh = np.empty((2 * B, H), dt)
    RH = np.empty((B, H), dt)
    hT = np.empty((Ls, B, H), dt)
    return order, lens_s, nb, base, hbase, uniform, whole, X, XG, XC, Hh, RH, Ymid, y, Yp, hT, claims, scratch, pbuf


def stack_applies(B, H, Ls, steps, nthreads, itemsize, bm):
    """Whether :func:`gru_stack_forward` runs a stack of ``Ls`` plain GRU layers of ``H``
    units for inference: at least two layers, and each layer one the row split of
    :func:`gru_forward_split` would take (:func:`split_applies`, :func:`_split_by_rows`),
    in either layout ``bm`` (measured on the Zen 4 machine, kernel calls of 3 x GRU(200)
    B=32 T=28, layer by layer / stack: time-major 1.01-1.06, batch-major 1.05-1.10)."""
    return Ls >= 2 and split_applies(B, H, steps, True, nthreads) and _split_by_rows(B, H, itemsize)


def gru_stack_forward(x, h0, gates_bias, cand_bias, packed_g, packed_c, packed_gi, packed_ci, lengths, reverse,
                      bm=False):
    """Inference through a stack of ``Ls`` plain GRU layers of ``H`` units (tanh, no state
    mask: :func:`stack_applies`) in one two-thread job (:func:`gru_stack_rows_worker`), as
    :func:`gru_forward_split` layer after layer computes it: the same per-element
    arithmetic on the recurrent products and the gates; the input projections run on
    other row blocks of the micro-kernel (a part's rows, not chunks of all rows), so
    float32 results may round differently (bit for bit the same on the full-length
    batches measured).

    ``x`` the bottom layer's inputs (``[T, B, I]``, ``[B, T, I]`` when ``bm``); ``h0``
    ``[Ls, B, H]`` the initial states; ``gates_bias`` ``[Ls, 2H]``, ``cand_bias`` ``[Ls, H]``;
    ``packed_g`` / ``packed_c`` ``[Ls, n]`` every layer's packed recurrent rows
    (:func:`._packed.pack_panels` of ``kernel[I:]``); ``packed_gi`` / ``packed_ci`` the
    packed input rows: a tuple of the bottom layer's and a ``[Ls - 1, n]`` array of the
    others'. Returns ``(y, hT [Ls, B, H])``."""
    bm = bool(bm)
    B = dims(x, bm)[1]
    (order, lens_s, nb, base, hbase, uniform, whole, X, XG, XC, Hh, RH, Ymid, y, Yp, hT, claims, scratch,
     pbuf) = gru_stack_begin(x, h0, lengths, reverse, bm)
    run_pair(gru_stack_rows_worker, (claims, nb, base, hbase, order, lens_s, whole, X, packed_gi[0], packed_ci[0],
                                     packed_gi[1],
                                     packed_ci[1], packed_g, packed_c, gates_bias, cand_bias, h0, XG, XC, Hh, RH,
                                     Ymid, Yp, hT, y, not direct_rows(uniform, bm, B), bool(reverse), bm, scratch,
                                     pbuf, ROW_PARTS))
    return y, hT


def gru_forward_split(x, gates_kernel, gates_bias, cand_kernel, cand_bias, h0, lengths, reverse, need_grad,
                      packed_g, packed_c, bm=False, packed_gi=None, packed_ci=None):
    """:func:`gru_forward` for the configurations of :func:`split_applies` (tanh, no state
    mask), with the time loop on two threads (the caller and :mod:`._team`'s helper) that
    share every step: by rows of the batch where :func:`_split_by_rows` says so (no
    barrier per step), else by the columns of both products. Same results, and the same
    workspace for :func:`gru_backward`; the arithmetic of each element is the one-thread
    loop's with the packed micro-kernel (the row split cuts the batch into other
    micro-kernel blocks, so float32 sums may round differently). ``bm`` as in
    :func:`gru_forward`."""
    bm = bool(bm)
    reverse = bool(reverse)
    T, B, _ = dims(x, bm)
    dt = x.dtype
    (order, lens_s, nb, base, hbase, uniform, X, XG, XC, KPg, KPc, KPgi, KPci, Hh, RH, y, Yp, hT, claims, done,
     scratch) = gru_forward_split_begin(x, gates_kernel, cand_kernel, h0, lengths, reverse, need_grad, packed_g,
                                        packed_c, packed_or_empty(packed_gi, dt), packed_or_empty(packed_ci, dt), bm,
                                        True)
    if _split_by_rows(B, h0.shape[1], x.dtype.itemsize):
        worker, parts = gru_forward_rows_worker, ROW_PARTS
    else:
        worker, parts = gru_forward_split_worker, CHUNKS
    run_pair(worker, (claims, done, nb, base, hbase, order, X, KPgi, KPci, XG, XC, gates_bias, cand_bias,
                      KPg, KPc, Hh, RH, Yp, hT, bool(need_grad), scratch, parts, x, lens_s, uniform, reverse, bm, y,
                      not direct_rows(uniform, bm, B)))
    return y, hT, (X, XG, XC, Hh, RH, order, lens_s, nb, base)


@kernel(inline="always")
def _weight_grads(X, Hh, RH, dXG, dXC, dH, gates_kernel, cand_kernel, order, lens_s, nb, base, T, reverse, uniform,
                  nthreads, bm):
    """What both backward kernels end with, after the time loop: the weight gradients as
    GEMMs over all rows (``[X; h]^T dXG``, ``[X; r*h]^T dXC``), the bias gradients, ``dx``
    in the caller's layout and ``dh0`` in batch order."""
    R, I = X.shape
    H = dH.shape[1]
    dt = dXG.dtype
    dgk, dck, dgb, dcb, dXp = _tail_buffers(R, I, H, dt)
    for task in TAIL_SERIAL:
        _tail_task(task, X, Hh, RH, dXG, dXC, gates_kernel, cand_kernel, dgk, dck, dgb, dcb, dXp, nthreads)
    return _tail_rest(dXp, dH, dgk, dck, dgb, dcb, order, lens_s, nb, base, T, reverse, uniform, bm)


@kernel(inline="always")
def _tail_buffers(R, I, H, dt):
    """The outputs of the backward tail: the kernel and bias gradients and ``dx`` rows."""
    return (np.empty((I + H, 2 * H), dt), np.empty((I + H, H), dt), np.empty(2 * H, dt), np.empty(H, dt),
            np.empty((R, I), dt))


#: The tasks of the backward tail (:func:`_tail_task`) as one thread runs them, in this
#: order (task 5 adds onto task 2's rows); the pair runs 6 and 7, the input gradients of
#: one half of the rows each, instead of 2 and 5 (:data:`TAIL_ORDER`).
TAIL_SERIAL = (0, 1, 2, 3, 4, 5, 8, 9)


@kernel(inline="always")
def _tail_task(task, X, Hh, RH, dXG, dXC, gates_kernel, cand_kernel, dgk, dck, dgb, dcb, dXp, nthreads):
    """Task ``task`` of the backward tail: the weight gradients ``[X; h]^T dXG`` (tasks 0,
    1) and ``[X; r*h]^T dXC`` (3, 4); the input gradient ``dXG @ gates_kernel[:I]^T`` into
    ``dXp`` (2) with ``dXC @ cand_kernel[:I]^T`` added to it (5, after 2); both products
    for the first or the second half of the rows (6, 7); the bias gradients, column sums
    of ``dXG`` (8) and ``dXC`` (9)."""
    R, I = X.shape
    H = Hh.shape[1]
    H2 = 2 * H
    if task == 6 or task == 7:
        half = R // 2
        lo = 0 if task == 6 else half
        m = half if task == 6 else R - half
        gemm_nt(m, I, H2, dXG, lo * H2, H2, gates_kernel, 0, H2, 0.0, dXp, lo * I, I, nthreads)
        gemm_nt(m, I, H, dXC, lo * H, H, cand_kernel, 0, H, 1.0, dXp, lo * I, I, nthreads)
    elif task == 8:
        column_sums(dXG, R, dgb, 0)
    elif task == 9:
        column_sums(dXC, R, dcb, 0)
    elif task == 0:
        gemm_tn(I, H2, R, X, 0, I, dXG, 0, H2, dgk, 0, H2, nthreads)
    elif task == 1:
        gemm_tn(H, H2, R, Hh, 0, H, dXG, 0, H2, dgk, I * H2, H2, nthreads)
    elif task == 2:
        gemm_nt(R, I, H2, dXG, 0, H2, gates_kernel, 0, H2, 0.0, dXp, 0, I, nthreads)
    elif task == 3:
        gemm_tn(I, H, R, X, 0, I, dXC, 0, H, dck, 0, H, nthreads)
    elif task == 4:
        gemm_tn(H, H, R, RH, 0, H, dXC, 0, H, dck, I * H, H, nthreads)
    else:
        gemm_nt(R, I, H, dXC, 0, H, cand_kernel, 0, H, 1.0, dXp, 0, I, nthreads)


#: :func:`gru_backward_split` runs the tail's GEMMs on the two threads of the pair
#: (:func:`gru_backward_tail_worker`) rather than each on two BLAS threads.
TAIL_ON_PAIR = True

#: The order in which the two threads claim the tail's tasks: larger ones first where H >=
#: I, the common case, the input gradients by halves and the bias sums last, so that the
#: two threads end together. With whole products, P2's 200-input layers (sizes
#: 2:2:2:1:1:1) left one thread idle while the other ran the last one; by halves the two
#: get 4.5 each. P2 training, paired, alternating processes: 19.7-20.9 against 20.5-21.9
#: ms. Each half runs both of its products into the same rows (no second buffer to add
#: afterwards), and the bias sums are tasks of the pair, not a pass after it.
TAIL_ORDER = (1, 0, 6, 7, 4, 3, 8, 9)


@kernel
def gru_backward_tail_worker(w, hand, counter, X, Hh, RH, dXG, dXC, gates_kernel, cand_kernel, dgk, dck, dgb, dcb,
                             dXp, dx, scatter, order, lens_s, nb, base, uniform, reverse, bm):
    """Worker ``w`` of the two-thread backward tail: claims the tasks of :func:`_tail_task`
    one by one (``counter``) and runs each on one BLAS thread. No OpenBLAS worker thread
    is woken, so none is left spinning on the second core when the next layer's
    two-thread loop starts (see :func:`gru_backward_split`). With ``scatter`` each half of
    the input gradient's rows (tasks 6 and 7) is then copied into ``dx`` (the caller's
    layout, :func:`._common.scatter_range`) by the worker that made it."""
    jb = team_begin(w, hand)
    if jb < 0:  # the caller finished this job without the helper
        return team_end(w, hand, jb)
    tasks = TAIL_ORDER
    R = X.shape[0]
    while True:
        i = atomic_add(counter, 0, 1)
        if i >= len(tasks):
            return team_end(w, hand, jb)
        task = tasks[i]
        _tail_task(task, X, Hh, RH, dXG, dXC, gates_kernel, cand_kernel, dgk, dck, dgb, dcb, dXp, 1)
        if scatter and (task == 6 or task == 7):
            lo = 0 if task == 6 else R // 2
            hi = R // 2 if task == 6 else R
            scatter_range(dXp, dx, lo, hi, order, lens_s, nb, base, uniform, reverse, bm)


@kernel
def gru_backward_tail_end(ws, dH, dgk, dck, dgb, dcb, dXp, dx, scattered, T, reverse, uniform, bm):
    """After :func:`gru_backward_tail_worker`: :func:`_tail_rest`, or where the workers
    have written ``dx`` already, only ``dh0``."""
    X, XG, XC, Hh, RH, order, lens_s, nb, base = ws
    if scattered:
        return dx, _dh0_batch(dH, order), dgk, dgb, dck, dcb
    return _tail_rest(dXp, dH, dgk, dck, dgb, dcb, order, lens_s, nb, base, T, reverse, uniform, bm)


@kernel(inline="always")
def _dh0_batch(dH, order):
    """The carried state gradient after the backward loop (sorted rows) in batch order."""
    B, H = dH.shape
    dh0 = np.empty((B, H), dH.dtype)
    for r in range(B):
        b = order[r]
        for j in range(H):
            dh0[b, j] = dH[r, j]
    return dh0


@kernel(inline="always")
def _tail_rest(dXp, dH, dgk, dck, dgb, dcb, order, lens_s, nb, base, T, reverse, uniform, bm):
    """The backward tail after its tasks: ``dx`` in the caller's layout, ``dh0`` in batch
    order."""
    B = dH.shape[0]
    dx = rows_out(dXp, T, B, order, lens_s, nb, base, reverse, uniform, bm)
    return dx, _dh0_batch(dH, order), dgk, dgb, dck, dcb


@kernel(inline="always")
def _backward_setup(ws, dhT, T):
    """What both backward kernels start from: whether the row plan is uniform, the carried
    state gradient ``dH`` (sorted rows, from ``dhT``) and the gradient buffers."""
    X, XG, XC, Hh, RH, order, lens_s, nb, base = ws
    B, H = dhT.shape
    R = XG.shape[0]
    dt = XG.dtype
    uniform = R == T * B and (B == 0 or lens_s[B - 1] == T)
    dH = np.empty((B, H), dt)
    for r in range(B):
        b = order[r]
        for j in range(H):
            dH[r, j] = dhT[b, j]
    return uniform, dH, np.empty((B, H), dt), np.empty((R, 2 * H), dt), np.empty((R, H), dt)


@kernel
def gru_backward(ws, gates_kernel, gates_bias, cand_kernel, cand_bias, dy, dhT, T, reverse, mask_h, code, nthreads,
                 packed_ct, packed_gt, bm):
    """Gradients of :func:`gru_forward` (run with ``need_grad``); ``ws`` is left intact.

    Returns ``(dx, dh0, d_gates_kernel, d_gates_bias, d_cand_kernel, d_cand_bias)``; with
    ``bm`` ``dy`` is ``[B, T, H]`` and ``dx`` ``[B, T, I]``."""
    X, XG, XC, Hh, RH, order, lens_s, nb, base = ws
    B, H = dhT.shape
    H2 = 2 * H
    I = X.shape[1]
    dt = XG.dtype
    one = dt.type(1.0)
    store_out = output_activation_stored(code)
    L = nb.shape[0] - 1
    uniform, dH, dRH, dXG, dXC = _backward_setup(ws, dhT, T)
    KPct = given_or_pack(packed_ct, L, cand_kernel, I * H, H, H, H, True)  # transposed recurrent rows
    KPgt = given_or_pack(packed_gt, L, gates_kernel, I * H2, H2, H2, H, True)
    scr = scratch_for(dXG)
    mh_on = mask_h.shape[0] > 0
    fast_out = code == TANH and not mh_on  # decided once: see _grad_out_tanh_units
    for k in range(L - 1, -1, -1):
        n = nb[k]
        gb = base[k]
        if fast_out:
            for r in range(n):
                g = gb + r
                _grad_out_tanh_units(dH[r], row3(dy, time_index(k, r, lens_s, reverse), order[r], bm), XG[g], XC[g],
                                     Hh[g], dXC[g], dXG[g], one, H, 0, H)
        for r in range(n if not fast_out else 0):
            b = order[r]
            t = time_index(k, r, lens_s, reverse)
            th = 0 if mask_h.shape[0] == 1 else t
            g = gb + r
            dyr = row3(dy, t, b, bm)
            for j in range(H):
                dhn = dH[r, j] * mask_h[th, b, j] if mh_on else dH[r, j]
                dhn += dyr[j]
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
            _grad_reset_units(dRH[r], XG[g], Hh[g], dXG[g], dH[r], one, 0, H)
        step_product(n, H, H2, dXG, gb * H2, H2, KPgt, gates_kernel, I * H2, H2, 1, dH, 0, H, 1, nthreads, scr)

    return _weight_grads(X, Hh, RH, dXG, dXC, dH, gates_kernel, cand_kernel, order, lens_s, nb, base, T, reverse,
                         uniform, nthreads, bm)


@kernel
def gru_backward_split_begin(ws, gates_kernel, cand_kernel, dhT, T, packed_ct, packed_gt):
    """Everything before the time loop of :func:`gru_backward_split`: the gradient buffers,
    the packed transposed recurrent rows, the task counters."""
    X, XG, XC, Hh, RH, order, lens_s, nb, base = ws
    H = dhT.shape[1]
    H2 = 2 * H
    I = X.shape[1]
    L = nb.shape[0] - 1
    uniform, dH, dRH, dXG, dXC = _backward_setup(ws, dhT, T)
    KPct = given_or_pack(packed_ct, max(L, PACK_MIN_STEPS), cand_kernel, I * H, H, H, H, True)
    KPgt = given_or_pack(packed_gt, max(L, PACK_MIN_STEPS), gates_kernel, I * H2, H2, H2, H, True)
    claims = np.zeros(2 * L + 2, np.int64)  # chunks taken per task, see gru_backward_split_worker; [2L+1] row parts
    done = np.zeros(2 * L + 2, np.int64)
    scratch = np.empty((2, MAX_HEIGHT * panel_width(XG)), XG.dtype)
    return uniform, dH, dRH, dXG, dXC, KPct, KPgt, claims, done, scratch


@kernel
def gru_backward_split_worker(w, hand, claims, done, XG, XC, Hh, order, lens_s, nb, base, reverse, KPct, KPgt, dy, dH,
                              dRH, dXG, dXC, scratch, nchunks, bm):
    """Worker ``w`` (0 or 1) of the backward time loop, in chunks of units (whole panels)
    claimed per task; every task waits for all chunks of the one before. Round ``i``
    handles step ``k = L - 1 - i``: task ``2i`` adds step ``k + 1``'s
    ``dXG @ gates_kernel[I:]^T`` into ``d h`` for its units (which finishes ``d h`` of
    those units) and takes them through the output of step ``k`` (candidate and
    update-gate gradients); task ``2i + 1`` multiplies the candidate gradients by
    ``cand_kernel[I:]^T`` for its units and forms their reset-gate gradients. Task ``2L``
    finishes ``d h_0``."""
    jb = team_begin(w, hand)
    if jb < 0:  # the caller finished this job without the helper
        return team_end(w, hand, jb)
    L = nb.shape[0] - 1
    H = dH.shape[1]
    H2 = 2 * H
    NR = panel_width(XG)
    nch = min((H + NR - 1) // NR, nchunks)
    scr = scratch[w]
    one = XG.dtype.type(1.0)
    for i in range(L + 1):
        k = L - 1 - i
        while True:
            c = take_chunk(claims, 2 * i, nch, w)
            if c < 0:
                break
            if i > 0:
                wait_at_least(done, 2 * i - 1, nch)
            u0, u1 = chunk_cols(c, nch, H, NR)
            if k + 1 < L:
                gemm_acc_packed(nb[k + 1], u1 - u0, H2, dXG, base[k + 1] * H2, H2, KPgt[(u0 // NR) * H2 * NR:], dH,
                                u0, H, scr)
            if k >= 0:
                gb = base[k]
                for r in range(nb[k]):
                    g = gb + r
                    _grad_out_tanh_units(dH[r], row3(dy, time_index(k, r, lens_s, reverse), order[r], bm), XG[g],
                                         XC[g], Hh[g], dXC[g], dXG[g], one, H, u0, u1)
            atomic_add(done, 2 * i, 1)
        if k < 0:
            break
        n = nb[k]
        gb = base[k]
        while True:
            c = take_chunk(claims, 2 * i + 1, nch, w)
            if c < 0:
                break
            wait_at_least(done, 2 * i, nch)
            u0, u1 = chunk_cols(c, nch, H, NR)
            gemm_packed(n, u1 - u0, H, dXC, gb * H, H, KPct[(u0 // NR) * H * NR:], dRH, u0, H, scr, 0)
            for r in range(n):
                g = gb + r
                _grad_reset_units(dRH[r], XG[g], Hh[g], dXG[g], dH[r], one, u0, u1)
            atomic_add(done, 2 * i + 1, 1)
    return team_end(w, hand, jb)


@kernel
def gru_backward_rows_worker(w, hand, claims, done, XG, XC, Hh, order, lens_s, nb, base, reverse, KPct, KPgt, dy, dH,
                             dRH, dXG, dXC, scratch, nparts, bm):
    """Worker ``w`` of the backward time loop split by batch rows (see
    :func:`gru_forward_rows_worker`): every row part it claims (task ``2L + 1``) goes
    through all steps, last to first, as in :func:`gru_backward`, with no wait on the
    other worker."""
    jb = team_begin(w, hand)
    if jb < 0:  # the caller finished this job without the helper
        return team_end(w, hand, jb)
    L = nb.shape[0] - 1
    H = dH.shape[1]
    H2 = 2 * H
    scr = scratch[w]
    one = XG.dtype.type(1.0)
    S = nparts
    while True:
        p = take_chunk(claims, 2 * L + 1, S, w)
        if p < 0:
            break
        for k in range(L - 1, -1, -1):
            n = nb[k]
            m = (n - p + S - 1) // S
            if m <= 0:
                continue  # active rows only grow going back
            gb = base[k]
            for r in range(p, n, S):
                g = gb + r
                _grad_out_tanh_units(dH[r], row3(dy, time_index(k, r, lens_s, reverse), order[r], bm), XG[g], XC[g],
                                     Hh[g], dXC[g], dXG[g], one, H, 0, H)
            gemm_packed(m, H, H, dXC, (gb + p) * H, S * H, KPct, dRH, p * H, S * H, scr, 0)
            for r in range(p, n, S):
                g = gb + r
                _grad_reset_units(dRH[r], XG[g], Hh[g], dXG[g], dH[r], one, 0, H)
            gemm_acc_packed(m, H, H2, dXG, (gb + p) * H2, S * H2, KPgt, dH, p * H, S * H, scr)
    return team_end(w, hand, jb)


@kernel
def gru_backward_split_end(ws, dXG, dXC, dH, gates_kernel, cand_kernel, T, reverse, uniform, nthreads, bm):
    """After the loop of :func:`gru_backward_split`: :func:`_weight_grads`."""
    X, XG, XC, Hh, RH, order, lens_s, nb, base = ws
    return _weight_grads(X, Hh, RH, dXG, dXC, dH, gates_kernel, cand_kernel, order, lens_s, nb, base, T, reverse,
                         uniform, nthreads, bm)


def gru_backward_split(ws, gates_kernel, cand_kernel, dy, dhT, T, reverse, nthreads, packed_ct, packed_gt, bm=False):
    """:func:`gru_backward` for the configurations of :func:`split_applies` (the workspace
    of a forward run with ``need_grad``; tanh, no state mask), with the time loop on two
    threads (the caller and :mod:`._team`'s helper) that share every step (by rows or by
    units, as :func:`gru_forward_split`); the weight gradients afterwards as in
    :func:`gru_backward`, on ``nthreads`` BLAS threads. Same results; the arithmetic of the
    loop is the one-thread kernel's with the packed micro-kernel. ``bm`` as in
    :func:`gru_backward`."""
    X, XG, XC, Hh, RH, order, lens_s, nb, base = ws
    reverse = bool(reverse)
    bm = bool(bm)
    (uniform, dH, dRH, dXG, dXC, KPct, KPgt, claims, done,
     scratch) = gru_backward_split_begin(ws, gates_kernel, cand_kernel, dhT, T, packed_ct, packed_gt)
    if _split_by_rows(dhT.shape[0], dhT.shape[1], dhT.dtype.itemsize):
        worker, parts = gru_backward_rows_worker, ROW_PARTS
    else:
        worker, parts = gru_backward_split_worker, CHUNKS
    run_pair(worker, (claims, done, XG, XC, Hh, order, lens_s, nb, base, reverse, KPct, KPgt, dy, dH, dRH, dXG, dXC,
                      scratch, parts, bm))
    if nthreads >= 2 and TAIL_ON_PAIR:
        # The tail's GEMMs shared whole between the two threads, one BLAS thread each: as
        # fast as each GEMM on two BLAS threads, and it leaves no OpenBLAS thread spinning
        # into the next layer's loop (see TAIL_ON_PAIR).
        R, I = X.shape
        B = dhT.shape[0]
        dgk, dck, dgb, dcb, dXp = _tail_buffers(R, I, dhT.shape[1], XG.dtype)
        # dx: the workers copy their halves of the rows into it, unless the rows are its memory
        scatter = not direct_rows(uniform, bm, B)
        shape = ((B, T, I) if bm else (T, B, I)) if scatter else (0, 0, 0)
        dx = rows_buffer(shape, uniform, XG.dtype)
        run_pair(gru_backward_tail_worker, (np.zeros(1, np.int64), X, Hh, RH, dXG, dXC, gates_kernel, cand_kernel,
                                            dgk, dck, dgb, dcb, dXp, dx, scatter, order, lens_s, nb, base, uniform,
                                            reverse, bm))
        return gru_backward_tail_end(ws, dH, dgk, dck, dgb, dcb, dXp, dx, scatter, T, reverse, uniform, bm)
    return gru_backward_split_end(ws, dXG, dXC, dH, gates_kernel, cand_kernel, T, reverse, uniform, nthreads, bm)
