"""LSTM kernels (BasicLSTMCell and LSTMCell: peepholes, cell_clip, num_proj, proj_clip,
forget_bias), float32/float64, over a whole time-major sequence.

Shapes: x ``[T, B, I]``; kernel ``[I+P, 4H]`` (columns i, j, f, o; rows ``:I`` multiply the
input, rows ``I:`` the recurrent ``h``); bias ``[4H]``; w_i, w_f, w_o ``[H]`` (or empty);
proj ``[H, P]`` (or ``[0, 0]``); c0 ``[B, H]``; h0 ``[B, P]``; lengths int64 ``[B]``;
mask_c ``[Tm, B, H]`` and mask_h ``[Tm, B, P]`` with ``Tm`` 0 (no mask), 1 or ``T``.
``cell_clip`` / ``proj_clip`` < 0 mean "no clipping". Everything C-contiguous.

Method (see :mod:`._common` for the row plan): the input projection of all steps is one
GEMM ``X[R, I] @ kernel[:I]`` into the gate buffer ``G [R, 4H]``; each step adds
``h[nb] @ kernel[I:]`` into its block of ``G`` (:func:`._packed.step_product`: the recurrent
rows are packed once per call, or handed in already packed, for a register-blocked
micro-kernel, or BLAS for large multi-threaded products) and applies the gate
nonlinearities in place, so ``G`` ends up holding the activated gates the backward pass
needs. The backward pass turns ``G`` into the gate gradients in place, one GEMM per step
for ``d h``, and then gets every weight gradient from one GEMM over all rows. Where it
pays (:func:`fuse_applies`: batches of several rows, a kernel that fits in L2) the
one-thread loop instead *fuses* the input projection into each step's product over
``[x_t, h]`` and the whole kernel (``fuse``). The two-thread loops (:func:`lstm_forward_split`,
:func:`lstm_backward_split`) share the rows of the batch where :func:`split_by_rows` says so;
their backward then forms ``dx`` step by step instead of in one GEMM after the loop. Few-row
inference runs :func:`lstm_forward_pair` (the units in two halves, one per thread, each
streaming its half of the recurrent weights every step) or :func:`lstm_forward_stream` (the
input projection on the helper).

``nthreads`` (last argument of every kernel): BLAS threads the kernel's large products may
use, the caller's share of the cores (products below ``_blas.PARALLEL_MIN_MACS`` use one).
"""

import numpy as np

from ._blas import gemm
from ._common import TANH, act, dact, dims, direct_rows, ftanh, gather_range, make_plan, output_activation_stored, \
    part_step, plan_and_inputs, row3, rows_buffer, rows_out, scatter_rows, sigmoid, time_index
from ._jit import kernel
from ._atomic import HAND_JOINED, atomic_add, atomic_load, atomic_store, chunk_cols, take_chunk, team_begin, \
    team_end, wait_at_least
from ._packed import MAX_HEIGHT, PACK_MIN_STEPS, ROW_PROJ_ROWS, TN_MAX_ROW_BYTES, WIDE, acc_adds_nothing, \
    all_finite, gemm_acc_packed, gemm_nt, gemm_packed, gemm_tn, gemm_tn_panel_rows, gemm_tn_panels, gemv_block_proj, \
    rows_zero, gemv_blocks, given_or_pack, \
    pack_gemv_blocks, pack_panels, pack_panels_t, packed_or_empty, panel_cols, panel_width, scratch_for, step_product
from ._stack import initial_part, project_part, scatter_part, stack_buffers
from ._team import MAX_CHUNKS, PROJ_CHUNKS, run_pair


@kernel(inline="always")
def _gates_tanh_units(gr, bias, fb, cp, cout, mout, H, u0, u1):
    """The common case of one row's gate update (tanh, no peepholes, no cell clip, no
    cell mask) for units ``u0:u1``, as branch-free loops over contiguous blocks, so LLVM
    vectorises them: ``gr`` the row's ``4H`` gate pre-activations (overwritten with the
    activated gates), ``cp`` the previous cell, ``cout`` the new cell, ``mout`` the cell
    output (rows of ``H``). Same arithmetic per element as the general loop of
    :func:`lstm_forward`."""
    # One activation per pass over a contiguous block, then the cell update: each loop
    # touches one or two arrays (measured 1.3x faster for H=128 than one fused loop over
    # the four gate blocks and three outputs).
    # Every loop runs from index 0 over a view: the same loops written as
    # ``for j in range(H, 2 * H)`` over the whole row were left scalar by Numba/LLVM
    # (checked in the generated assembly; 4x slower).
    n = u1 - u0
    si = gr[u0:u1]
    aj = gr[H + u0:H + u1]
    sf = gr[2 * H + u0:2 * H + u1]
    so = gr[3 * H + u0:3 * H + u1]
    bi = bias[u0:u1]
    bj = bias[H + u0:H + u1]
    bf = bias[2 * H + u0:2 * H + u1]
    bo = bias[3 * H + u0:3 * H + u1]
    cpv = cp[u0:u1]
    co = cout[u0:u1]
    mo = mout[u0:u1]
    for j in range(n):
        si[j] = sigmoid(si[j] + bi[j])
    for j in range(n):
        aj[j] = ftanh(aj[j] + bj[j])
    for j in range(n):
        sf[j] = sigmoid(sf[j] + bf[j] + fb)
    for j in range(n):
        so[j] = sigmoid(so[j] + bo[j])
    for j in range(n):
        co[j] = sf[j] * cpv[j] + si[j] * aj[j]
    for j in range(n):
        mo[j] = so[j] * ftanh(co[j])


@kernel(inline="always")
def _gates_tanh_row(gr, bias, fb, cp, cout, mout, H):
    """:func:`_gates_tanh_units` over all ``H`` units."""
    _gates_tanh_units(gr, bias, fb, cp, cout, mout, H, 0, H)


@kernel(inline="always")
def _grad_tanh_units(gr, cp, dh, dyr, dcr, dgr, one, H, u0, u1):
    """Backward of :func:`_gates_tanh_units` for one row and units ``u0:u1`` (no
    projection, no state masks): ``gr`` the activated gates, ``cp`` the previous cell,
    ``dh``/``dyr`` the incoming gradients of the output (summed into ``dh``, which the
    caller overwrites next), ``dcr`` the cell gradient (updated in place to the previous
    cell's), ``dgr`` receives the gate gradients of those units (four blocks of the
    ``4H`` row). Same arithmetic per element as the general loop of :func:`lstm_backward`,
    as short loops from index 0 over views: one loop over all twelve streams was left
    scalar (too many possible overlaps for LLVM's run-time checks), these vectorise
    (measured 2x faster for H=256)."""
    n = u1 - u0
    si = gr[u0:u1]
    aj = gr[H + u0:H + u1]
    sf = gr[2 * H + u0:2 * H + u1]
    so = gr[3 * H + u0:3 * H + u1]
    dgi = dgr[u0:u1]
    dgj = dgr[H + u0:H + u1]
    dgf = dgr[2 * H + u0:2 * H + u1]
    dgo = dgr[3 * H + u0:3 * H + u1]
    cpv = cp[u0:u1]
    dhv = dh[u0:u1]
    dyv = dyr[u0:u1]
    dcv = dcr[u0:u1]
    for j in range(n):
        dhv[j] += dyv[j]  # dm
    for j in range(n):
        dgo[j] = ftanh(sf[j] * cpv[j] + si[j] * aj[j])  # tanh(c), kept in dgo for now
    for j in range(n):
        dcv[j] += dhv[j] * so[j] * (one - dgo[j] * dgo[j])  # dc
    for j in range(n):
        dgo[j] = dhv[j] * dgo[j] * so[j] * (one - so[j])
    for j in range(n):
        dgf[j] = dcv[j] * cpv[j] * sf[j] * (one - sf[j])
    for j in range(n):
        dgi[j] = dcv[j] * aj[j] * si[j] * (one - si[j])
    for j in range(n):
        dgj[j] = dcv[j] * si[j] * (one - aj[j] * aj[j])
    for j in range(n):
        dcv[j] *= sf[j]


@kernel(inline="always")
def _grad_tanh_row(gr, cp, dh, dyr, dcr, dgr, one, H):
    """:func:`_grad_tanh_units` over all ``H`` units."""
    _grad_tanh_units(gr, cp, dh, dyr, dcr, dgr, one, H, 0, H)


@kernel(inline="always")
def _copy_row(src, dst, n):
    for j in range(n):
        dst[j] = src[j]


@kernel(inline="always")
def _outputs_and_initial_state(x, c0, h0, order, nb, hbase, R, uniform, Hs, hoff, Ch, bm):
    """The output buffers (``y``, or ``Yp`` in plan order) and the final-state buffers of
    both forward setups; the initial state of the rows active at the first step goes into
    the state buffers (``Hs`` from column ``hoff``, ``Ch``), that of sequences of length 0
    straight into the final state."""
    T, B, _ = dims(x, bm)
    H = c0.shape[1]
    P = h0.shape[1]
    dt = x.dtype
    if direct_rows(uniform, bm, B):
        y = np.empty((B, T, P) if bm else (T, B, P), dt)
        Yp = y.reshape(T * B, P)
    else:
        y = np.empty((0, 0, 0), dt)
        Yp = np.empty((R, P), dt)
    cT = np.empty((B, H), dt)
    hT = np.empty((B, P), dt)
    n0 = nb[0] if nb.shape[0] > 1 else 0
    for r in range(B):
        b = order[r]
        if r < n0:
            _copy_row(h0[b], Hs[hbase[0] + r, hoff:], P)
            _copy_row(c0[b], Ch[hbase[0] + r], H)
        else:
            _copy_row(h0[b], hT[b], P)
            _copy_row(c0[b], cT[b], H)
    return y, Yp, cT, hT


@kernel(inline="always")
def _forward_setup(x, c0, h0, lengths, reverse, need_grad, bm, gather):
    """What both forward loops start from: the row plan, the input rows ``X`` in plan
    order, the carried-state buffers ``Hh``/``Ch`` with the initial state in place (rows of
    sequences of length 0 go straight to the final state ``hT``/``cT``), and the outputs.
    Without ``gather`` an ``X`` that is not ``x``'s own memory is left unwritten (the
    two-thread workers copy their chunks of it, :func:`_project_rows`)."""
    T, B, I = dims(x, bm)
    H = c0.shape[1]
    P = h0.shape[1]
    dt = x.dtype
    order, lens_s, nb, base, hbase, R, uniform, X = plan_and_inputs(x, lengths, reverse, need_grad, bm, gather)
    nh = R if need_grad else 2 * B
    Hh = np.empty((nh, P), dt)
    Ch = np.empty((nh, H), dt)
    y, Yp, cT, hT = _outputs_and_initial_state(x, c0, h0, order, nb, hbase, R, uniform, Hh, 0, Ch, bm)
    return order, lens_s, nb, base, hbase, R, uniform, X, Hh, Ch, y, Yp, cT, hT


@kernel(inline="always")
def _fused_setup(x, c0, h0, lengths, reverse, need_grad, bm):
    """:func:`_forward_setup` for the fused loop of :func:`lstm_forward`: one buffer
    ``XH [rows, I + P]`` holds each row's input (columns ``:I``) beside the state it
    multiplies (columns ``I:``), so that a step's whole product is ``XH[block] @ kernel``.
    With ``need_grad`` it has ``R`` rows (the inputs in plan order and the state history:
    the workspace's ``X`` and ``Hh`` at once); else ``2B`` ping-pong rows, the inputs
    copied in step by step."""
    T, B, I = dims(x, bm)
    H = c0.shape[1]
    P = h0.shape[1]
    dt = x.dtype
    order, lens_s, nb, base, hbase, R, uniform = make_plan(lengths, T, reverse, need_grad)
    L = nb.shape[0] - 1
    XH = np.empty((R if need_grad else 2 * B, I + P), dt)
    if need_grad:
        for k in range(L):
            for r in range(nb[k]):
                _copy_row(row3(x, time_index(k, r, lens_s, reverse), order[r], bm), XH[base[k] + r], I)
    Ch = np.empty((R if need_grad else 2 * B, H), dt)
    y, Yp, cT, hT = _outputs_and_initial_state(x, c0, h0, order, nb, hbase, R, uniform, XH, I, Ch, bm)
    return order, lens_s, nb, base, hbase, R, uniform, XH, Ch, y, Yp, cT, hT


#: Fused input projection (:func:`fuse_applies`): fewest batch rows, and most
#: bytes of the whole kernel ``[I + P, 4H]``.
FUSE_MIN_ROWS = 8
FUSE_MAX_BYTES = 1 << 21


def fuse_applies(B, I, P, H, itemsize):
    """Whether :func:`lstm_forward` should run with ``fuse``: the input projection of
    each step inside that step's product (``[x_t, h] @ kernel``, one pass of the packed
    micro-kernel over the whole kernel) instead of one GEMM over all steps before the
    loop. That keeps the gate rows of a step in cache from the product to the
    nonlinearities (the all-steps GEMM writes ``R x 4H`` gates that are read back long
    after, from memory when they outgrow the caches) and, without ``need_grad``, needs
    one block of gate rows instead of ``R``; it costs streaming the input rows of the
    kernel every step, which pays while the whole kernel stays in the core's L2 and the
    product has enough rows to be compute-bound. Measured on the 2-vCPU Zen 4 machine
    (1 MB L2 per core), one direction of P4 (B=64, I=64, H=256, 1.25 MB of kernel): 23.5
    vs 26.8 ms at T=100, 92.8 vs 106.3 ms at T=400; P3's shape (I=H=512, 8 MB of kernel)
    147.6 vs 136.5 ms, slower; P1 (B=1) slower (each step streams 384 instead of 256 KB)."""
    return B >= FUSE_MIN_ROWS and (I + P) * 4 * H * itemsize <= FUSE_MAX_BYTES


@kernel
def lstm_forward(x, kernel, bias, w_i, w_f, w_o, proj, c0, h0, lengths, reverse, mask_c, mask_h, code,
                 forget_bias, cell_clip, proj_clip, need_grad, nthreads, packed, fuse, bm):
    """Returns ``(y [T, B, P], c_T [B, H], h_T [B, P], workspace)``; with ``bm`` ``x`` is
    ``[B, T, I]`` and ``y`` ``[B, T, P]`` (the state masks stay ``[T or 1, B, n]``). ``fuse``: the input
    projection inside each step's product (see :func:`fuse_applies`). ``packed``: the
    weights the steps multiply, packed by ``pack_if_worth``: with ``fuse`` the whole
    kernel (``pack_if_worth(steps, kernel, 0, 4H, I+P, 4H, False)``), else its recurrent
    rows (``pack_if_worth(steps, kernel, I*4H, 4H, P, 4H, False)``); or an empty array
    (then they are packed here). The workspace's ``X`` and ``Hh`` are one ``[R, I+P]``
    buffer when fused (:func:`_fused_setup`)."""
    T, B, I = dims(x, bm)
    H = c0.shape[1]
    P = h0.shape[1]
    G4 = 4 * H
    dt = x.dtype
    use_peep = w_i.shape[0] > 0
    use_proj = proj.shape[0] > 0
    fb = dt.type(forget_bias)
    cclip = dt.type(cell_clip)
    pclip = dt.type(proj_clip)
    store_out = output_activation_stored(code)

    if fuse:
        order, lens_s, nb, base, hbase, R, uniform, X, Ch, y, Yp, cT, hT = _fused_setup(x, c0, h0, lengths, reverse,
                                                                                       need_grad, bm)
        Hh = X  # one buffer: inputs in columns :I, states in I:
        L = nb.shape[0] - 1
        G = np.empty((R if need_grad else B, G4), dt)  # without need_grad: one step's block, reused
        KP = given_or_pack(packed, L, kernel, 0, G4, I + P, G4, False)  # the whole kernel, packed once
    else:
        order, lens_s, nb, base, hbase, R, uniform, X, Hh, Ch, y, Yp, cT, hT = _forward_setup(x, c0, h0, lengths,
                                                                                             reverse, need_grad, bm,
                                                                                             True)
        L = nb.shape[0] - 1
        G = np.empty((R, G4), dt)
        gemm(0, 0, R, G4, I, 1.0, X, 0, I, kernel, 0, G4, 0.0, G, 0, G4, nthreads)
        KP = given_or_pack(packed, L, kernel, I * G4, G4, P, G4, False)  # recurrent rows, packed once
    # the step product: C[gates] (+)= A[rows, kd] @ kernel[k0:], A the state (or input and
    # state) rows, kd wide; the state of a row sits at column hoff
    kd = I + P if fuse else P
    k0 = 0 if fuse else I
    hoff = I if fuse else 0
    beta = 0 if fuse else 1
    scr = scratch_for(G)
    Mp = np.empty((R if need_grad else B, H) if use_proj else (0, H), dt)
    Yraw = np.empty((R, P) if (use_proj and pclip >= 0 and need_grad) else (0, P), dt)

    mc_on = mask_c.shape[0] > 0
    mh_on = mask_h.shape[0] > 0
    # Branches decided once, not per element: the common configuration takes loops that
    # vectorise (see _gates_tanh_row); everything else the general loops below.
    fast_gates = code == TANH and not use_peep and not (cclip >= 0) and not mc_on
    plain_h = not mh_on and not (use_proj and pclip >= 0)
    for k in range(L):
        n = nb[k]
        nn = nb[k + 1]
        gb = base[k]
        hb = hbase[k]
        nhb = hbase[k + 1]
        mb = gb if need_grad else 0
        gg = gb if (need_grad or not fuse) else 0  # first gate row of this step
        if fuse and not need_grad:
            for r in range(n):
                _copy_row(row3(x, time_index(k, r, lens_s, reverse), order[r], bm), X[hb + r], I)
        # G[gg:gg+n] += h @ kernel[I:] (fused: G[gg:gg+n] = [x, h] @ kernel)
        step_product(n, G4, kd, Hh, hb * kd, kd, KP, kernel, k0 * G4, G4, 0, G, gg * G4, G4, beta, nthreads, scr)
        if fast_gates:
            for r in range(n):
                cout = Ch[nhb + r] if r < nn else cT[order[r]]
                mout = Mp[mb + r] if use_proj else Yp[gb + r]
                _gates_tanh_row(G[gg + r], bias, fb, Ch[hb + r], cout, mout, H)
        for r in range(n if not fast_gates else 0):
            b = order[r]
            t = time_index(k, r, lens_s, reverse)
            g = gb + r
            q = gg + r
            tc = 0 if mask_c.shape[0] == 1 else t
            for j in range(H):
                cp = Ch[hb + r, j]
                gi = G[q, j] + bias[j]
                gj = G[q, H + j] + bias[H + j]
                gf = G[q, 2 * H + j] + bias[2 * H + j] + fb
                go = G[q, 3 * H + j] + bias[3 * H + j]
                if use_peep:
                    gi += w_i[j] * cp
                    gf += w_f[j] * cp
                si = sigmoid(gi)
                sf = sigmoid(gf)
                aj = act(gj, code)
                c = sf * cp + si * aj
                if cclip >= 0:
                    if c > cclip:
                        c = cclip
                    elif c < -cclip:
                        c = -cclip
                if use_peep:
                    go += w_o[j] * c
                so = sigmoid(go)
                m = so * act(c, code)
                G[q, j] = si
                G[q, H + j] = aj if store_out else gj
                G[q, 2 * H + j] = sf
                G[q, 3 * H + j] = so
                cm = c * mask_c[tc, b, j] if mc_on else c
                if r < nn:
                    Ch[nhb + r, j] = cm
                else:
                    cT[b, j] = cm
                if use_proj:
                    Mp[mb + r, j] = m
                else:
                    Yp[g, j] = m
        if use_proj:
            gemm(0, 0, n, P, H, 1.0, Mp, mb * H, H, proj, 0, P, 0.0, Yp, gb * P, P, nthreads)
        if plain_h:
            for r in range(n):
                _copy_row(Yp[gb + r], Hh[nhb + r, hoff:] if r < nn else hT[order[r]], P)
        for r in range(n if not plain_h else 0):
            b = order[r]
            t = time_index(k, r, lens_s, reverse)
            g = gb + r
            th = 0 if mask_h.shape[0] == 1 else t
            for j in range(P):
                m = Yp[g, j]
                if use_proj and pclip >= 0:
                    if Yraw.shape[0] > 0:
                        Yraw[g, j] = m
                    if m > pclip:
                        m = pclip
                    elif m < -pclip:
                        m = -pclip
                    Yp[g, j] = m
                hm = m * mask_h[th, b, j] if mh_on else m
                if r < nn:
                    Hh[nhb + r, hoff + j] = hm
                else:
                    hT[b, j] = hm
    if not direct_rows(uniform, bm, B):
        y = scatter_rows(Yp, T, B, order, lens_s, nb, base, reverse, bm)
    ws = (X, G, Hh, Ch, Mp, Yraw, order, lens_s, nb, base)
    return y, cT, hT, ws


# ------------------------------------------------- the input projection on the helper
#: Steps per chunk of the streamed input projection (:func:`lstm_forward_stream`), and the
#: fewest steps for which it runs.
STREAM_STEPS = 8
STREAM_MIN_STEPS = 16


def stream_applies(B, steps, plain, nthreads, fuse, split, need_grad):
    """Whether :func:`lstm_forward_stream` should run this layer: inference in the common
    configuration (``plain``, see :func:`split_applies`) where neither the fused loop nor
    the two-thread loop applies (``fuse``, ``split``: few rows), with two threads allowed
    and enough steps that the projection is worth handing over. Measured through the API
    on P1 (B=1, T=100, H=128), against :func:`lstm_forward`: forward 0.37-0.42 vs
    0.42-0.44 ms; a training step 1.00-1.11 vs 0.98-1.05 ms, since there the backward's
    two-thread BLAS products leave an OpenBLAS thread spinning on the helper's CPU when
    the next forward starts, the helper seldom joins, and the chunked projection costs
    more than one GEMM: hence not with ``need_grad``."""
    return (plain and not need_grad and nthreads >= 2 and not fuse and not split and steps >= STREAM_MIN_STEPS
            and B > 0)


@kernel(inline="always")
def _project_chunk(c, nb, base, X, KPI, G, scratch):
    """Rows of steps ``c*STREAM_STEPS ..`` of ``G = X @ kernel[:I]`` (``KPI`` those rows
    packed), on the packed micro-kernel.
    A chunk's rows are contiguous, ascending with the steps, or descending for a reversed
    uniform batch (whose rows stay in time order)."""
    L = nb.shape[0] - 1
    I = X.shape[1]
    G4 = G.shape[1]
    k0 = c * STREAM_STEPS
    k1 = min(L, k0 + STREAM_STEPS) - 1
    r0 = min(base[k0], base[k1])
    r1 = max(base[k0] + nb[k0], base[k1] + nb[k1])
    gemm_packed(r1 - r0, G4, I, X, r0 * I, I, KPI, G, r0 * G4, G4, scratch, 0)


@kernel
def lstm_forward_stream_worker(w, hand, claims, done, order, nb, base, hbase, X, kernel, KPI, G, bias, fb, KP, Hh, Ch,
                               Yp, cT, hT, scratch):
    """Worker ``w`` of :func:`lstm_forward_stream`. The helper (1) computes the input
    projection chunk by chunk, claimed in step order. The caller (0) runs the one-thread
    loop of :func:`lstm_forward` (its common configuration); before the first step of a
    chunk it makes sure the chunk is there, computing the next unclaimed chunks itself
    while it is not (so it never waits for a helper that has not started), and waiting
    only for a chunk the helper is computing."""
    jb = team_begin(w, hand)
    if jb < 0:  # the caller finished this job without the helper
        return team_end(w, hand, jb)
    L = nb.shape[0] - 1
    nch = done.shape[0] if L > 0 else 0
    H = Ch.shape[1]
    P = Hh.shape[1]
    I = X.shape[1]
    G4 = 4 * H
    if w == 1:
        while True:
            c = atomic_add(claims, 0, 1)
            if c >= nch:
                break
            _project_chunk(c, nb, base, X, KPI, G, scratch[1])
            atomic_store(done, c, 1)
        return team_end(w, hand, jb)
    for k in range(L):
        if k % STREAM_STEPS == 0:
            c = k // STREAM_STEPS
            while atomic_load(done, c) == 0:
                c2 = atomic_add(claims, 0, 1)
                if c2 >= nch:
                    wait_at_least(done, c, 1)  # the helper has it
                    break
                _project_chunk(c2, nb, base, X, KPI, G, scratch[0])
                atomic_store(done, c2, 1)
        n = nb[k]
        nn = nb[k + 1]
        gb = base[k]
        hb = hbase[k]
        nhb = hbase[k + 1]
        step_product(n, G4, P, Hh, hb * P, P, KP, kernel, I * G4, G4, 0, G, gb * G4, G4, 1, 1, scratch[0])
        for r in range(n):
            cout = Ch[nhb + r] if r < nn else cT[order[r]]
            _gates_tanh_row(G[gb + r], bias, fb, Ch[hb + r], cout, Yp[gb + r], H)
        for r in range(n):
            _copy_row(Yp[gb + r], Hh[nhb + r] if r < nn else hT[order[r]], P)
    return team_end(w, hand, jb)


@kernel
def lstm_forward_stream_end(x, Yp, order, lens_s, nb, base, reverse, uniform, bm, y):
    """After :func:`lstm_forward_stream_worker`: the outputs in the caller's layout."""
    T, B, _ = dims(x, bm)
    if not direct_rows(uniform, bm, B):
        y = scatter_rows(Yp, T, B, order, lens_s, nb, base, reverse, bm)
    return y


def _direct(uniform, bm, x):
    """:func:`._common.direct_rows` run as plain Python (its ``py_func``, no compiled call):
    whether the loop wrote the outputs into ``y`` in place, so that the wrappers below
    skip the compiled call that would scatter them (4-5 us of a P1 call, nearly all of it
    the call itself)."""
    return direct_rows.py_func(bool(uniform), bm, x.shape[0] if bm else x.shape[1])


def lstm_forward_stream(x, kernel, bias, c0, h0, lengths, reverse, forget_bias, need_grad, packed, bm=False,
                        packed_in=None):
    """:func:`lstm_forward` for the configurations of :func:`stream_applies` (tanh, no
    peepholes, clipping, projection or state masks; not fused), with the input projection
    handed to :mod:`._team`'s helper in chunks of :data:`STREAM_STEPS` steps while the
    caller runs the loop: a one-row layer (P1) spends a sixth of its time on that
    projection. Same results and workspace as :func:`lstm_forward` (each chunk is its own
    product on the packed micro-kernel, so float32 sums may round differently from one
    GEMM over all rows). ``packed_in`` as in :func:`lstm_forward_split`."""
    bm = bool(bm)
    # the set-up of the two-thread loop (plan, buffers, packed recurrent rows), with the
    # chunk counters of this one
    (order, lens_s, nb, base, hbase, uniform, X, G, KP, KPI, Hh, Ch, y, Yp, cT, hT, _, _,
     scratch) = lstm_forward_split_begin(x, kernel, c0, h0, lengths, bool(reverse), bool(need_grad), packed,
                                         packed_or_empty(packed_in, x.dtype), bm, False, True)
    nch = (nb.shape[0] - 1 + STREAM_STEPS - 1) // STREAM_STEPS
    claims = np.zeros(1, np.int64)  # chunks claimed, in order
    done = np.zeros(max(nch, 1), np.int64)  # 1 once a chunk's rows of G are written
    fb = x.dtype.type(forget_bias)
    run_pair(lstm_forward_stream_worker, (claims, done, order, nb, base, hbase, X, kernel, KPI, G, bias, fb, KP, Hh,
                                          Ch, Yp, cT, hT, scratch))
    if not _direct(uniform, bm, x):
        y = lstm_forward_stream_end(x, Yp, order, lens_s, nb, base, bool(reverse), uniform, bm, y)
    P = h0.shape[1]
    ws = (X, G, Hh, Ch, np.empty((0, c0.shape[1]), x.dtype), np.empty((0, P), x.dtype), order, lens_s, nb, base)
    return y, cT, hT, ws


# ------------------------------------------- few rows: the units in two halves, one per thread
#: Steps per chunk of each half's input projection in :func:`lstm_forward_pair`.
PAIR_PROJ_STEPS = 8
#: Fewest bytes of recurrent weights (``H x 4H``) for which :func:`lstm_forward_pair` runs:
#: below that a step's product is too short to pay for the exchange of ``h`` every step.
#: Measured kernel-level against :func:`lstm_forward_stream` (T=100, I=64, medians, us):
#: B=1 H=64 float32 (64 KB) 129 vs 113, slower; H=64 float64 (128 KB) 328 vs 400; B=1
#: H=128 float32 229-244 vs 315-320; B=4 H=128 608-661 vs 652-773; B=1 H=256 754-782 vs
#: 1290; B=6 H=256 2387 vs 3392-3599; B=1 H=128 float64 1163-1199 vs 1253-1293.
PAIR_MIN_WEIGHT_BYTES = 1 << 17
#: Indices in the pair's control array (each on a cache line of its own): steps worker 0
#: has published, the step from which the helper runs half 1 (-1: not decided yet), steps
#: worker 1 has published.
_PAIR_DONE0, _PAIR_START, _PAIR_DONE1 = 0, 8, 16


def pair_applies(B, H, steps, plain, nthreads, fuse, split, need_grad, itemsize):
    """Whether :func:`lstm_forward_pair` should run this layer: where :func:`stream_applies`
    would (few-row inference in the common configuration, two threads allowed, enough
    steps) and the recurrent weights are at least ``PAIR_MIN_WEIGHT_BYTES``. It replaces
    the stream there."""
    return (stream_applies(B, steps, plain, nthreads, fuse, split, need_grad) and H >= 2
            and 4 * H * H * itemsize >= PAIR_MIN_WEIGHT_BYTES)


@kernel(inline="always")
def _half_units(v, H):
    """Units ``[u0, u1)`` of half ``v`` (0 or 1)."""
    return (0, H // 2) if v == 0 else (H // 2, H)


@kernel(inline="always")
def _gather_half(src, dst, H, v):
    """``dst[:4 Hv]`` = the four gate blocks (i, j, f, o) of half ``v``'s units taken from a
    ``4H`` row ``src``, side by side: the column order of the two-half loop's weights,
    bias and gate rows."""
    u0, u1 = _half_units(v, H)
    Hv = u1 - u0
    for q in range(4):
        s = src[q * H + u0:q * H + u1]
        d = dst[q * Hv:(q + 1) * Hv]
        for j in range(Hv):
            d[j] = s[j]


@kernel(inline="always")
def _halves_layout(I, H, NR):
    """Offsets in :func:`pack_halves`' flat array: half 0's input rows and recurrent rows
    (packed), half 1's, then the recurrent rows of half 0 and of half 1 in column blocks
    (:func:`._packed.pack_gemv_blocks`, for the one-row steps), and the total size."""
    n0 = 4 * (H // 2)
    n1 = 4 * (H - H // 2)
    p0 = (n0 + NR - 1) // NR * NR
    p1 = (n1 + NR - 1) // NR * NR
    oa0 = p0 * I
    oi1 = oa0 + p0 * H
    oa1 = oi1 + p1 * I
    or0 = oa1 + p1 * H
    or1 = or0 + n0 * H
    return 0, oa0, oi1, oa1, or0, or1, or1 + n1 * H


@kernel
def pack_halves(kernel, I, H):
    """``kernel [I + H, 4H]`` as :func:`lstm_forward_pair` reads it: for each half of the
    units, its four gate blocks of columns gathered side by side (``[I + H, 4 Hv]``),
    packed by :func:`pack_panels` as two matrices, the input rows and the recurrent rows,
    and its recurrent rows also in column blocks (:func:`._packed.pack_gemv_blocks`); all in one flat array
    (:func:`_halves_layout`)."""
    NR = panel_width(kernel)
    _, oa0, oi1, oa1, or0, or1, total = _halves_layout(I, H, NR)
    out = np.empty(total, kernel.dtype)
    for v in range(2):
        u0, u1 = _half_units(v, H)
        Hv = u1 - u0
        n = 4 * Hv
        Wg = np.empty((I + H, n), kernel.dtype)
        for r in range(I + H):
            _gather_half(kernel[r], Wg[r], H, v)
        oi = 0 if v == 0 else oi1
        oa = oa0 if v == 0 else oa1
        orr = or0 if v == 0 else or1
        a = pack_panels(Wg, 0, n, I, n)
        b = pack_panels(Wg, I * n, n, H, n)
        out[oi:oi + a.shape[0]] = a
        out[oa:oa + b.shape[0]] = b
        pack_gemv_blocks(Wg[I:], out, orr)
    return out


@kernel(inline="always")
def _project_steps(k0, k1, nb, base, X, KI, Gv, scr):
    """Rows of steps ``k0 .. k1 - 1`` of one half's input projection ``Gv = X @ KI`` (the
    half's input rows, packed); the rows of consecutive steps are contiguous, ascending,
    or descending for a reversed uniform batch."""
    k1 -= 1
    r0 = min(base[k0], base[k1])
    r1 = max(base[k0] + nb[k0], base[k1] + nb[k1])
    I = X.shape[1]
    n = Gv.shape[1]
    gemm_packed(r1 - r0, n, I, X, r0 * I, I, KI, Gv, r0 * n, n, scr, 0)


@kernel(inline="always")
def _pair_fuses(nb, Gv):
    """Whether a half's one-row products carry its next chunk's input projection
    (:func:`._packed.gemv_block_proj`, the projection's multiply-adds beside the product's
    stream of weights from L2): 512-bit vectors (the accumulators fit), one row at every
    step, and the half's gate columns whole blocks of 16 vectors (8 panels each: one panel
    of each block at each step of a chunk of ``PAIR_PROJ_STEPS = 8``). P1's shape (H = 128
    float32, 64 float64) has one block per half, H = 256 float32 two."""
    NR = panel_width(Gv)
    return (WIDE and nb[0] == 1 and Gv.shape[1] % (8 * NR) == 0 and PAIR_PROJ_STEPS == 8
            and ROW_PROJ_ROWS == PAIR_PROJ_STEPS)


@kernel(inline="always")
def _chunk_carried(fz, c, L):
    """Whether chunk ``c`` of a half's input projection is made by the products of chunk
    ``c - 1`` (one panel a step, :func:`_pair_product`) rather than in one piece at its
    first step: where the half fuses and both chunks are whole."""
    return fz and c >= 1 and (c + 1) * PAIR_PROJ_STEPS <= L


@kernel(inline="always")
def _pair_project(k, L, fz, nb, base, X, KW, oi, Gv, scr):
    """At the first step of a chunk, the chunk's input projection for one half (the
    half's input rows packed at ``oi`` in ``KW``), unless the last chunk's products made
    it (:func:`_chunk_carried`)."""
    S = PAIR_PROJ_STEPS
    if k % S == 0 and not _chunk_carried(fz, k // S, L):
        _project_steps(k, min(L, k + S), nb, base, X, KW[oi:], Gv, scr)


@kernel(inline="always")
def _pair_product(k, L, fz, nb, base, hbase, Hh, KW, oa, orr, oi, X, Gv, scr):
    """Step ``k``'s recurrent product for one half, added to its projected gate rows
    ``Gv``: the whole ``h`` of step ``k - 1`` times the half's recurrent columns. A step of
    one row goes through :func:`._packed.gemv_blocks` over the column blocks (at ``orr`` in
    ``KW``), each block carrying one panel of the next chunk's input projection where
    :func:`_chunk_carried` says so (:func:`._packed.gemv_block_proj`, the same
    numbers); several rows go through the packed micro-kernel (at ``oa``). (Measured and
    not kept, P1 cycle counts per step: the one-row product in two parts, the rows of the
    half's own units before the wait for the other half's ``h`` and the rest after it,
    cost 1.37-1.43 us against 1.25-1.30 in one call, for 30-50 ns less waiting.)"""
    H = Hh.shape[1]
    n = nb[k]
    n4 = Gv.shape[1]
    gb = base[k]
    hb = hbase[k]
    S = PAIR_PROJ_STEPS
    if _chunk_carried(fz, k // S + 1, L):
        I = X.shape[1]
        NR = panel_width(Gv)
        w = 8 * NR
        nblk = n4 // w
        k1 = (k // S + 1) * S
        r0 = min(base[k1], base[k1 + S - 1])
        rev = k % 2 == 1
        for q in range(nblk):
            qq = nblk - 1 - q if rev else q  # the blocks in gemv_blocks' order (serpentine)
            pn = k % S * nblk + qq  # the panel of the next chunk this block carries
            gemv_block_proj(H, Hh, hb * H, rev, KW, orr + qq * H * w, Gv, gb * n4 + qq * w, I, X, r0 * I, KW,
                            oi + pn * I * NR, Gv, r0 * n4 + pn * NR, n4)
    elif n == 1:
        # odd steps read the weights backwards (serpentine: each step starts on what the last one read last, in L1)
        gemv_blocks(H, Hh.reshape(Hh.size), hb * H, KW, orr, n4, Gv.reshape(Gv.size), gb * n4, scr, k % 2 == 1)
    else:
        gemm_packed(n, n4, H, Hh, hb * H, H, KW[oa:], Gv, gb * n4, n4, scr, 1)


@kernel(inline="always")
def _pair_gates(v, k, nb, base, hbase, order, Hh, Ch, Yp, cT, hT, Gv, bv, fb):
    """The gates of half ``v``'s units at step ``k`` (after :func:`_pair_product`): their
    new ``c`` and ``h``, outputs, final state."""
    H = Ch.shape[1]
    u0, u1 = _half_units(v, H)
    Hv = u1 - u0
    n = nb[k]
    nn = nb[k + 1]
    gb = base[k]
    hb = hbase[k]
    nhb = hbase[k + 1]
    for r in range(n):
        g = gb + r
        if r < nn:
            cout = Ch[nhb + r, u0:u1]
            hout = Hh[nhb + r, u0:u1]
        else:
            cout = cT[order[r], u0:u1]
            hout = hT[order[r], u0:u1]
        yo = Yp[g, u0:u1]
        _gates_tanh_units(Gv[g], bv, fb, Ch[hb + r, u0:u1], cout, yo, Hv, 0, Hv)
        _copy_row(yo, hout, Hv)


@kernel
def lstm_forward_pair_worker(w, hand, ctl, nb, base, hbase, order, X, KW, G0, G1, b0, b1, fb, Hh, Ch, Yp, cT, hT,
                             scratch):
    """Worker ``w`` of :func:`lstm_forward_pair`. Worker 0 runs both halves of every step
    until it sees the helper joined (:func:`._atomic.team_begin` sets ``HAND_JOINED``; the
    helper comes 5-30 us after the call starts, a few steps of P1), then posts that step
    in ``ctl[_PAIR_START]`` and keeps half 0 while the helper runs half 1 from there; a
    helper that has not joined by the end is told there is nothing left (the start is
    ``L``). Paired, each worker publishes the steps it has finished and, before its step
    ``k`` product, waits until the other one has published step ``k - 1`` (its half of
    ``h``): one wait per step and worker, no claims (P1: 60-70 ns a step). The ping-pong
    state rows are safe as the waits order them: a half writes the ``h`` of step ``k`` into
    the rows that held step ``k - 2`` only after the other worker has finished step
    ``k - 1``, its last read of them. Half ``v``'s input projection, chunk by chunk of ``PAIR_PROJ_STEPS`` steps, is
    made by whoever runs half ``v`` at the chunk's first step, or panel by panel by
    whoever runs its steps of the chunk before (:func:`_chunk_carried`). Alone or paired, each half
    does the same arithmetic in the same order, so the results do not depend on when (or
    whether) the helper joins."""
    jb = team_begin(w, hand)
    if jb < 0:  # the caller finished this job without the helper
        return team_end(w, hand, jb)
    L = nb.shape[0] - 1
    H = Ch.shape[1]
    I = X.shape[1]
    NR = panel_width(G0)
    oi0, oa0, oi1, oa1, or0, or1, _ = _halves_layout(I, H, NR)
    scr = scratch[w]
    fz0 = _pair_fuses(nb, G0)
    fz1 = _pair_fuses(nb, G1)
    if w == 1:
        wait_at_least(ctl, _PAIR_START, 0)
        k0 = atomic_load(ctl, _PAIR_START)
        for k in range(k0, L):
            _pair_project(k, L, fz1, nb, base, X, KW, oi1, G1, scr)
            if k > k0:
                wait_at_least(ctl, _PAIR_DONE0, k)
            _pair_product(k, L, fz1, nb, base, hbase, Hh, KW, oa1, or1, oi1, X, G1, scr)
            _pair_gates(1, k, nb, base, hbase, order, Hh, Ch, Yp, cT, hT, G1, b1, fb)
            atomic_store(ctl, _PAIR_DONE1, k + 1)
        return team_end(w, hand, jb)
    paired = False
    k0 = L
    for k in range(L):
        if not paired and jb > 0 and atomic_load(hand, HAND_JOINED) == jb:
            paired = True
            k0 = k
            atomic_store(ctl, _PAIR_START, k)
        _pair_project(k, L, fz0, nb, base, X, KW, oi0, G0, scr)
        if not paired:
            _pair_project(k, L, fz1, nb, base, X, KW, oi1, G1, scr)
        if paired and k > k0:
            wait_at_least(ctl, _PAIR_DONE1, k)
        _pair_product(k, L, fz0, nb, base, hbase, Hh, KW, oa0, or0, oi0, X, G0, scr)
        if paired:
            _pair_gates(0, k, nb, base, hbase, order, Hh, Ch, Yp, cT, hT, G0, b0, fb)
            atomic_store(ctl, _PAIR_DONE0, k + 1)
        else:
            _pair_product(k, L, fz1, nb, base, hbase, Hh, KW, oa1, or1, oi1, X, G1, scr)
            _pair_gates(0, k, nb, base, hbase, order, Hh, Ch, Yp, cT, hT, G0, b0, fb)
            _pair_gates(1, k, nb, base, hbase, order, Hh, Ch, Yp, cT, hT, G1, b1, fb)
    if not paired:
        atomic_store(ctl, _PAIR_START, L)  # a helper that joins now finds nothing left
    return team_end(w, hand, jb)


@kernel
def lstm_forward_pair_begin(x, kernel, bias, c0, h0, lengths, reverse, packed, bm):
    """Everything before :func:`lstm_forward_pair`'s loop: the row plan, input rows, state
    and output buffers (:func:`_forward_setup`, inference), each half's gate buffer and
    bias, the weights in :func:`pack_halves`' layout (``packed`` when it has that size,
    else packed here) and the control array."""
    I = x.shape[2]
    H = c0.shape[1]
    dt = x.dtype
    order, lens_s, nb, base, hbase, R, uniform, X, Hh, Ch, y, Yp, cT, hT = _forward_setup(x, c0, h0, lengths,
                                                                                         reverse, False, bm, True)
    NR = panel_width(x)
    KW = packed if packed.shape[0] == _halves_layout(I, H, NR)[6] else pack_halves(kernel, I, H)
    G0 = np.empty((R, 4 * (H // 2)), dt)
    G1 = np.empty((R, 4 * (H - H // 2)), dt)
    b0 = np.empty(G0.shape[1], dt)
    b1 = np.empty(G1.shape[1], dt)
    _gather_half(bias, b0, H, 0)
    _gather_half(bias, b1, H, 1)
    ctl = np.zeros(24, np.int64)
    ctl[_PAIR_START] = -1
    scratch = np.empty((2, MAX_HEIGHT * NR), dt)
    return order, lens_s, nb, base, uniform, X, Hh, Ch, y, Yp, cT, hT, KW, G0, G1, b0, b1, ctl, hbase, scratch


@kernel(inline="always")
def _arena_sizes(T, B, H, NR):
    """Elements of the float and int64 arenas of :func:`lstm_forward_pair`'s kept
    buffers (:func:`_arena_views`)."""
    n0 = 4 * (H // 2)
    n1 = 4 * (H - H // 2)
    return 4 * B * H + T * B * (n0 + n1) + n0 + n1 + 2 * MAX_HEIGHT * NR, 2 * B + 3 * (T + 1) + 24


@kernel(inline="always")
def _arena_views(Fa, Ia, T, B, H, NR):
    """The buffers of :func:`lstm_forward_pair_begin` as views of two flat arrays: the
    state rows ``Hh``, ``Ch`` (ping-pong, ``2B``), each half's gate rows and bias, the
    workers' scratch; the row plan (``order``, ``lens_s``, ``nb``, ``base``, ``hbase``)
    and the control array."""
    n0 = 4 * (H // 2)
    n1 = 4 * (H - H // 2)
    R = T * B
    o = 0
    Hh = Fa[o:o + 2 * B * H].reshape((2 * B, H))
    o += 2 * B * H
    Ch = Fa[o:o + 2 * B * H].reshape((2 * B, H))
    o += 2 * B * H
    G0 = Fa[o:o + R * n0].reshape((R, n0))
    o += R * n0
    G1 = Fa[o:o + R * n1].reshape((R, n1))
    o += R * n1
    b0 = Fa[o:o + n0]
    o += n0
    b1 = Fa[o:o + n1]
    o += n1
    scratch = Fa[o:o + 2 * MAX_HEIGHT * NR].reshape((2, MAX_HEIGHT * NR))
    order = Ia[0:B]
    lens_s = Ia[B:2 * B]
    i = 2 * B
    nb = Ia[i:i + T + 1]
    base = Ia[i + T + 1:i + 2 * (T + 1)]
    hbase = Ia[i + 2 * (T + 1):i + 3 * (T + 1)]
    ctl = Ia[i + 3 * (T + 1):i + 3 * (T + 1) + 24]
    return Hh, Ch, G0, G1, b0, b1, scratch, order, lens_s, nb, base, hbase, ctl


@kernel
def lstm_forward_pair_arena_begin(x, bias, c0, h0, lengths, reverse, KW, Fa, Ia, y, cT, bm):
    """:func:`lstm_forward_pair_begin` for a batch whose every sequence has all ``T``
    steps, read and written in place (:func:`._common.direct_rows`), into buffers the
    caller keeps (``Fa``, ``Ia``: :func:`_arena_views`) and outputs it allocated (``y``,
    ``cT``): nothing is allocated or returned, so the call costs what it does, not the
    boxing of twenty arrays (~6 us). Returns False, having written nothing, where that
    does not apply (other lengths, a layout that is not direct, ``KW`` not in
    :func:`pack_halves`' layout): the caller then takes the general set-up."""
    T, B, I = dims(x, bm)
    H = c0.shape[1]
    NR = panel_width(x)
    if T == 0 or B == 0 or not direct_rows(True, bm, B) or KW.shape[0] != _halves_layout(I, H, NR)[6]:
        return False
    nf, ni = _arena_sizes(T, B, H, NR)
    if (Fa.shape[0] != nf or Ia.shape[0] != ni or y.size != T * B * H or cT.shape[0] != B or c0.shape[0] != B
            or h0.shape != c0.shape):
        return False
    plan = make_plan(lengths, T, reverse, False)
    if not plan[6]:  # uniform
        return False
    Hh, Ch, G0, G1, b0, b1, scratch, order, lens_s, nb, base, hbase, ctl = _arena_views(Fa, Ia, T, B, H, NR)
    order[:] = plan[0]  # the identity
    lens_s[:] = plan[1]
    nb[:] = plan[2]
    base[:] = plan[3]
    hbase[:] = plan[4]
    for r in range(B):
        _copy_row(h0[r], Hh[r], H)
        _copy_row(c0[r], Ch[r], H)
    _gather_half(bias, b0, H, 0)
    _gather_half(bias, b1, H, 1)
    for j in range(ctl.shape[0]):
        ctl[j] = 0
    ctl[_PAIR_START] = -1
    return True


@kernel
def lstm_forward_pair_arena_worker(w, hand, Fa, Ia, x, KW, y, cT, hT, fb, bm):
    """:func:`lstm_forward_pair_worker` on the buffers of :func:`lstm_forward_pair_arena_begin`."""
    T, B, I = dims(x, bm)
    H = cT.shape[1]
    Hh, Ch, G0, G1, b0, b1, scratch, order, lens_s, nb, base, hbase, ctl = _arena_views(Fa, Ia, T, B, H,
                                                                                       panel_width(x))
    return lstm_forward_pair_worker(w, hand, ctl, nb, base, hbase, order, x.reshape(T * B, I), KW, G0, G1, b0, b1, fb,
                                    Hh, Ch, y.reshape(T * B, H), cT, hT, scratch)


#: Kept arenas of :func:`lstm_forward_pair` (``(dtype, T, B, H) -> [(Fa, Ia), ...]``): at
#: most ``ARENA_KEYS`` shapes, ``ARENA_PER_KEY`` each (one per thread calling at once,
#: beyond that they are made per call), none over ``ARENA_MAX_BYTES``.
_ARENAS = {}
ARENA_KEYS = 16
ARENA_PER_KEY = 2
ARENA_MAX_BYTES = 4 << 20


def _pair_arena_run(x, bias, c0, h0, lengths, reverse, forget_bias, packed, bm):
    """:func:`lstm_forward_pair` through :func:`lstm_forward_pair_arena_begin`, or None
    where that does not apply."""
    if packed is None or c0.dtype != x.dtype:
        return None
    T, B = (x.shape[1], x.shape[0]) if bm else (x.shape[0], x.shape[1])
    H = c0.shape[1]
    NR = panel_cols(x.dtype.itemsize)
    key = (x.dtype, T, B, H)
    nf, ni = _arena_sizes.py_func(T, B, H, NR)
    keep = nf * x.dtype.itemsize <= ARENA_MAX_BYTES
    pool = _ARENAS.get(key) if keep else None
    arena = None
    if pool:
        try:
            arena = pool.pop()
        except IndexError:  # another thread took the last one since
            pass
    Fa, Ia = arena if arena is not None else (np.empty(nf, x.dtype), np.empty(ni, np.int64))
    y = np.empty((B, T, H) if bm else (T, B, H), x.dtype)
    cT = np.empty((B, H), x.dtype)
    hT = np.empty((B, H), x.dtype)
    used = lstm_forward_pair_arena_begin(x, bias, c0, h0, lengths, reverse, packed, Fa, Ia, y, cT, bm)
    if used:
        run_pair(lstm_forward_pair_arena_worker, (Fa, Ia, x, packed, y, cT, hT, x.dtype.type(forget_bias), bm))
    if keep and used:
        if pool is None:
            if len(_ARENAS) >= ARENA_KEYS:
                _ARENAS.clear()
            pool = _ARENAS.setdefault(key, [])
        if len(pool) < ARENA_PER_KEY:
            pool.append((Fa, Ia))
    return (y, cT, hT) if used else None


def lstm_forward_pair(x, kernel, bias, c0, h0, lengths, reverse, forget_bias, packed=None, bm=False):
    """:func:`lstm_forward` for the configurations of :func:`pair_applies` (inference, tanh,
    no peepholes, clipping, projection or state masks; few rows), with the units in two
    halves, one per thread (the caller and :mod:`._team`'s helper): each step, each thread
    multiplies the whole ``h`` by its half's columns of the recurrent weights (all four
    gates of its units, gathered and packed contiguously by :func:`pack_halves`: 128 KB a
    step for P1 instead of 256 KB on one core, whose L2 bandwidth bounds a one-row step)
    and applies its units' gates. ``packed``: the weights as :func:`pack_halves` lays
    them out (the numba backend keeps them, see ``_packcache``), or None to pack here.
    Returns ``(y, c_T, h_T)``. Each element's arithmetic is the one-thread loop's with the
    packed micro-kernel (the input projection in chunks of steps, so float32 sums may round
    differently from its one GEMM). With ``packed`` given, a batch whose every sequence has
    all ``T`` steps, read and written in place, runs on buffers kept between calls
    (:func:`_pair_arena_run`); the results are the same bit for bit."""
    bm = bool(bm)
    reverse = bool(reverse)
    H = c0.shape[1]
    if h0.shape[1] != H or kernel.shape[1] != 4 * H:
        raise ValueError(f"lstm_forward_pair: no projection, got c0 {c0.shape}, h0 {h0.shape}, kernel {kernel.shape}")
    out = _pair_arena_run(x, bias, c0, h0, lengths, reverse, forget_bias, packed, bm)
    if out is not None:
        return out
    (order, lens_s, nb, base, uniform, X, Hh, Ch, y, Yp, cT, hT, KW, G0, G1, b0, b1, ctl, hbase,
     scratch) = lstm_forward_pair_begin(x, kernel, bias, c0, h0, lengths, reverse,
                                        packed_or_empty(packed, x.dtype), bm)
    run_pair(lstm_forward_pair_worker, (ctl, nb, base, hbase, order, X, KW, G0, G1, b0, b1,
                                        x.dtype.type(forget_bias), Hh, Ch, Yp, cT, hT, scratch))
    if not _direct(uniform, bm, x):
        y = lstm_forward_stream_end(x, Yp, order, lens_s, nb, base, reverse, uniform, bm, y)
    return y, cT, hT


# ---------------------------------------------------------------- two threads, one loop
#: Smallest per-step product (multiply-adds, rows x 4H x H) for which the forward loop
#: runs on two threads (:func:`lstm_forward_split`); below it the one-thread loop above.
SPLIT_MIN_MACS = 1 << 22
#: The two-thread loops share the work by rows of the batch (:func:`split_by_rows`: each
#: worker takes ``ROW_PARTS / 2`` parts of the sorted rows through every step, no barrier
#: per step) from ``ROWS_MIN_B`` rows while the recurrent rows of the kernel take at most
#: ``ROWS_MAX_WEIGHT_BYTES`` (each worker reads all of them every step); else by the units
#: of each step. Measured on the Zen 4 machine, float32, column split / row split time,
#: forward and backward: B=64 H=512 1.05 / 1.10; B=8 H=512 1.09 / 1.08; B=6 H=256 1.32 /
#: 1.24; B=4 H=512 0.94 / 0.95; B=8 and B=16 H=1024 (16 MB) 1.05 / 0.96 and 1.03 / 0.99;
#: B=4 H=1024 0.73 / 0.76.
ROWS_MIN_B = 6
ROWS_MAX_WEIGHT_BYTES = 8 << 20
ROW_PARTS = 2
#: Elements added to each row of the row-split loops' per-part buffers (64 bytes in float32).
ROW_PAD = 16


def split_by_rows(B, H, itemsize):
    """Whether the two-thread LSTM loops share each step by rows (else by units)."""
    return B >= ROWS_MIN_B and 4 * H * H * itemsize <= ROWS_MAX_WEIGHT_BYTES


def split_applies(B, H, P, steps, plain, nthreads, itemsize):
    """Whether :func:`lstm_forward_split` can and should run this layer: the common
    configuration (``plain``: tanh, no peepholes, clipping, projection or state masks),
    two threads allowed, each half of the units a whole number of packed panels, and a
    per-step product large enough to pay for a barrier per step."""
    nr = panel_cols(itemsize)
    return (plain and nthreads >= 2 and P == H and H % nr == 0 and H >= 2 * nr and steps >= 4
            and B * 4 * H * H >= SPLIT_MIN_MACS)


@kernel
def lstm_forward_split_begin(x, kernel, c0, h0, lengths, reverse, need_grad, packed, packed_in, bm, to_y, gather):
    """Everything before the time loop of :func:`lstm_forward_split` but the input
    projection (the workers do that): the row plan, the packed recurrent rows and input
    rows (``packed``, ``packed_in``: given, or packed here), the buffers, the initial state
    in place. ``gather``: the input rows copied into plan order here (else the workers
    copy their chunks, :func:`_project_rows`); ``to_y``: the workers write the outputs
    into ``y`` in the caller's layout (zeros past each length), allocated here."""
    T, B, I = dims(x, bm)
    H = c0.shape[1]
    G4 = 4 * H
    dt = x.dtype
    order, lens_s, nb, base, hbase, R, uniform, X, Hh, Ch, y, Yp, cT, hT = _forward_setup(x, c0, h0, lengths,
                                                                                         reverse, need_grad, bm,
                                                                                         gather)
    if to_y and not direct_rows(uniform, bm, B):
        shape = (B, T, H) if bm else (T, B, H)
        y = rows_buffer(shape, uniform, dt)
    L = nb.shape[0] - 1
    G = np.empty((R, G4), dt)
    # packed even for loops under PACK_MIN_STEPS: the workers have no unpacked path
    KP = given_or_pack(packed, max(L, PACK_MIN_STEPS), kernel, I * G4, G4, H, G4, False)
    KPI = given_or_pack(packed_in, max(L, PACK_MIN_STEPS), kernel, 0, G4, I, G4, False)
    claims = np.zeros(L + 1, np.int64)  # chunks taken per step; [L]: the projection
    done = np.zeros(L + 1, np.int64)  # chunks done per step
    scratch = np.empty((2, MAX_HEIGHT * panel_width(G)), dt)
    return order, lens_s, nb, base, hbase, uniform, X, G, KP, KPI, Hh, Ch, y, Yp, cT, hT, claims, done, scratch


@kernel(inline="always")
def _project_rows(w, claims, done, L, X, KPI, G, scr, x, order, lens_s, nb, base, uniform, reverse, bm):
    """The input projection ``G = X @ kernel[:I]`` of the two-thread forward workers, in
    ``PROJ_CHUNKS`` row chunks claimed from task ``L``, each on the packed micro-kernel
    over the packed input rows ``KPI``; returns when every chunk is done. Where ``X`` is
    not ``x``'s own memory, each chunk's rows are first copied into it from ``x``
    (:func:`._common.gather_range`): the gather on both threads, each chunk's rows still
    in cache for its product, instead of one serial pass before the job."""
    R, G4 = G.shape
    I = X.shape[1]
    B = order.shape[0]
    gather = not direct_rows(uniform, bm, B)
    while True:
        c = take_chunk(claims, L, PROJ_CHUNKS, w)
        if c < 0:
            break
        r0 = R * c // PROJ_CHUNKS
        r1 = R * (c + 1) // PROJ_CHUNKS
        if gather:
            gather_range(x, X, r0, r1, order, lens_s, nb, base, uniform, reverse, bm)
        gemm_packed(r1 - r0, G4, I, X, r0 * I, I, KPI, G, r0 * G4, G4, scr, 0)
        atomic_add(done, L, 1)
    wait_at_least(done, L, PROJ_CHUNKS)


@kernel
def lstm_forward_split_worker(w, hand, claims, done, nb, base, hbase, order, X, KPI, G, bias, fb, KP, Hh, Ch, Yp,
                              cT, hT, scratch, nchunks, x, lens_s, uniform, reverse, bm):
    """Worker ``w`` (0 or 1) of the time loop. First the input projection in
    ``PROJ_CHUNKS`` row chunks, each on the packed micro-kernel over the packed input rows
    ``KPI`` (no BLAS: a two-thread OpenBLAS call leaves a thread spinning for tens of
    milliseconds, measured to slow the loop that follows 2.4x; one OpenBLAS thread ran
    P3's chunks [800, 512] x [512, 2048] at 100 GFLOP/s, the micro-kernel at 112). Then
    each step ``k`` in up to ``MAX_CHUNKS`` chunks of units (whole panels), all four gates
    of each: the recurrent product for those gate columns, the
    gate update, the new ``c`` and ``h`` of those units. Chunks are claimed per step
    (:func:`._atomic.take_chunk`: worker 0 from the front, worker 1 from the back), so a thread
    that gets less CPU (another process, a spinning BLAS thread) takes fewer chunks instead
    of holding the other one up; a chunk of step ``k`` waits until every chunk of step ``k - 1`` is done (``done``):
    ``h`` of all units. Index ``L`` of both counters is the projection."""
    jb = team_begin(w, hand)
    if jb < 0:  # the caller finished this job without the helper
        return team_end(w, hand, jb)
    L = nb.shape[0] - 1
    H = Ch.shape[1]
    G4 = 4 * H
    NR = panel_width(G)
    npan = H // NR
    nch = min(npan, nchunks)
    scr = scratch[w]
    fbt = G.dtype.type(fb)
    _project_rows(w, claims, done, L, X, KPI, G, scr, x, order, lens_s, nb, base, uniform, reverse, bm)
    for k in range(L):
        while True:
            c = take_chunk(claims, k, nch, w)
            if c < 0:
                break
            if k > 0:
                wait_at_least(done, k - 1, nch)
            u0, u1 = chunk_cols(c, nch, H, NR)
            n = nb[k]
            nn = nb[k + 1]
            gb = base[k]
            hb = hbase[k]
            nhb = hbase[k + 1]
            for q in range(4):
                c0 = q * H + u0
                KPq = KP[(c0 // NR) * H * NR:]
                if k > 0 or not acc_adds_nothing(n, u1 - u0, H, Hh, hb * H, H, KPq):
                    gemm_acc_packed(n, u1 - u0, H, Hh, hb * H, H, KPq, G, gb * G4 + c0, G4, scr)
            for r in range(n):
                g = gb + r
                cout, hout = _state_out(r, nn, nhb, order, Ch, Hh, cT, hT)
                _gates_tanh_units(G[g], bias, fbt, Ch[hb + r], cout, Yp[g], H, u0, u1)
                ys = Yp[g, u0:u1]
                hs = hout[u0:u1]
                for j in range(u1 - u0):
                    hs[j] = ys[j]
            atomic_add(done, k, 1)
    return team_end(w, hand, jb)


@kernel
def lstm_forward_rows_worker(w, hand, claims, done, nb, base, hbase, order, X, KPI, G, bias, fb, KP, Hh, Ch, Yp,
                             cT, hT, scratch, nparts, hpart, x, lens_s, uniform, reverse, bm, y, to_y):
    """Worker ``w`` (0 or 1) of the time loop split by batch rows: the input projection as
    in :func:`lstm_forward_split_worker`, then the whole time loop of every row part it
    claims (task 0: ``nparts`` parts, part ``p`` the sorted rows ``p``, ``p + nparts``,
    ...): each step the product of those rows over all four gate blocks, then their
    gates. Rows of a batch never meet in a layer and a sorted row keeps its index while
    it is active, so a part runs from the first step to the last with no wait on the
    other worker (the column split has a barrier per step), at the cost of each worker
    reading all of the packed recurrent rows every step. A worker that is late or absent
    leaves its part to the other one. Each part's current ``h`` rows are also kept
    contiguous in ``hpart[p]`` (rows ``ROW_PAD`` elements longer than ``H``), the
    product's left operand: the part's rows of ``Hh`` lie ``nparts * H`` elements apart,
    4 KB for ``H = 512``, where the micro-kernel's twelve row streams share one L1 set
    (measured: [32, 512] x [512, 2048] at 110 GFLOP/s with that stride, 114 with 2 KB +
    64 bytes; P3's forward 1-3 % faster). With ``to_y`` the outputs go straight into ``y``
    (the caller's layout) instead of ``Yp``."""
    jb = team_begin(w, hand)
    if jb < 0:  # the caller finished this job without the helper
        return team_end(w, hand, jb)
    L = nb.shape[0] - 1
    scr = scratch[w]
    fbt = G.dtype.type(fb)
    _project_rows(w, claims, done, L, X, KPI, G, scr, x, order, lens_s, nb, base, uniform, reverse, bm)
    S = nparts
    while True:
        p = take_chunk(claims, 0, S, w)
        if p < 0:
            break
        _rows_part_loop(p, S, nb, base, hbase, order, G, bias, fbt, KP, Hh, Ch, hpart[p], Yp, cT, hT, scr, y, lens_s,
                        reverse, bm, to_y)
    return team_end(w, hand, jb)


@kernel(inline="always")
def _state_out(r, nn, nhb, order, Ch, Hh, cT, hT):
    """Where sorted row ``r``'s new ``c`` and ``h`` go: the carried-state rows of the next
    step (block ``nhb``) while it runs on (``r < nn``), else its final state."""
    if r < nn:
        return Ch[nhb + r], Hh[nhb + r]
    return cT[order[r]], hT[order[r]]


@kernel(inline="always")
def _rows_part_loop(p, S, nb, base, hbase, order, G, bias, fbt, KP, Hh, Ch, hp, Yp, cT, hT, scr, y, lens_s, reverse,
                    bm, to_y):
    """The time loop of one layer for the rows of part ``p`` (sorted rows ``p``, ``p + S``,
    ...) of the row-split loops, from the initial state in ``Hh`` / ``Ch``: each step the
    product of the part's ``h`` rows (kept contiguous in ``hp``) over all four gate
    blocks, then their gates and new state. The outputs go to ``Yp`` (plan order), or with
    ``to_y`` to their rows of ``y`` (the caller's layout: no scatter after the loop)."""
    L = nb.shape[0] - 1
    H = Ch.shape[1]
    G4 = 4 * H
    ldp = hp.shape[1]
    n0 = nb[0] if L > 0 else 0
    for j in range((n0 - p + S - 1) // S):  # the initial state of the part's rows
        _copy_row(Hh[hbase[0] + p + S * j], hp[j], H)
    for k in range(L):
        n, m, nn, gb, hb, nhb = part_step(k, p, S, nb, base, hbase)
        if m <= 0:
            break
        if k > 0 or not acc_adds_nothing(m, G4, H, hp, 0, ldp, KP):
            gemm_acc_packed(m, G4, H, hp, 0, ldp, KP, G, (gb + p) * G4, S * G4, scr)
        j = 0  # the row's place in the part
        for r in range(p, n, S):
            g = gb + r
            cout, hout = _state_out(r, nn, nhb, order, Ch, Hh, cT, hT)
            yr = row3(y, time_index(k, r, lens_s, reverse), order[r], bm) if to_y else Yp[g]
            _gates_tanh_units(G[g], bias, fbt, Ch[hb + r], cout, yr, H, 0, H)
            _copy_row(yr, hout, H)
            if r < nn:
                _copy_row(yr, hp[j], H)
            j += 1


@kernel
def lstm_stack_rows_worker(w, hand, claims, nb, base, hbase, order, lens_s, whole, X, KPI0, KPI, KP, bias, fb, c0, h0,
                           G, Hh, Ch, hpart, Ymid, Yp, cT, hT, y, scatter, reverse, bm, scratch, pbuf, nparts):
    """Worker ``w`` (0 or 1) of :func:`lstm_stack_forward`: a stack of ``Ls`` LSTM layers
    (inference) split by batch rows, as :func:`.gru.gru_stack_rows_worker` does for GRU
    layers (see :mod:`._stack`): each part it claims goes through every layer, the input
    projection of its rows, then its time loop (:func:`_rows_part_loop`), with no wait on
    the other worker between layers; the top layer's outputs go to ``Yp``, and with
    ``scatter`` straight into ``y``, each part's rows (the caller's layout) instead."""
    jb = team_begin(w, hand)
    if jb < 0:  # the caller finished this job without the helper
        return team_end(w, hand, jb)
    Ls = KP.shape[0]
    n0 = nb[0] if nb.shape[0] > 1 else 0
    scr = scratch[w]
    buf = pbuf[w]
    S = nparts
    while True:
        p = take_chunk(claims, 0, S, w)
        if p < 0:
            break
        for l in range(Ls):
            initial_part(p, S, c0[l], order, n0, hbase[0], Ch, cT[l])
            initial_part(p, S, h0[l], order, n0, hbase[0], Hh, hT[l])
            if l == 0:
                project_part(p, S, whole, nb, base, X, KPI0, G, scr, buf)
            else:
                project_part(p, S, whole, nb, base, Ymid[(l - 1) % 2], KPI[l - 1], G, scr, buf)
            fbt = G.dtype.type(fb[l])
            if l == Ls - 1:
                _rows_part_loop(p, S, nb, base, hbase, order, G, bias[l], fbt, KP[l], Hh, Ch, hpart[p], Yp, cT[l],
                                hT[l], scr, y, lens_s, reverse, bm, scatter)
            else:
                _rows_part_loop(p, S, nb, base, hbase, order, G, bias[l], fbt, KP[l], Hh, Ch, hpart[p], Ymid[l % 2],
                                cT[l], hT[l], scr, y, lens_s, reverse, bm, False)
    return team_end(w, hand, jb)


@kernel
def lstm_stack_begin(x, h0, lengths, reverse, bm):
    """Everything :func:`lstm_stack_forward` needs before its workers
    (:func:`._stack.stack_buffers`, and the gate and state rows shared by the layers: each
    part only ever touches its own rows of them)."""
    Ls, B, H = h0.shape
    dt = x.dtype
    order, lens_s, nb, base, hbase, R, uniform, whole, X, Ymid, y, Yp, claims, scratch, pbuf = stack_buffers(
        x, Ls, H, lengths, reverse, bm, ROW_PARTS)
    G = np.empty((R, 4 * H), dt)
    Hh = np.empty((2 * B, H), dt)
    Ch = np.empty((2 * B, H), dt)
    hpart = np.empty((ROW_PARTS, (B + ROW_PARTS - 1) // ROW_PARTS, H + ROW_PAD), dt)
    cT = np.empty((Ls, B, H), dt)
    hT = np.empty((Ls, B, H), dt)
    return (order, lens_s, nb, base, hbase, uniform, whole, X, G, Hh, Ch, hpart, Ymid, y, Yp, cT, hT, claims, scratch,
            pbuf)


#: Most bytes of a layer's recurrent weights (``4 H^2`` elements) for which a time-major
#: stack runs as one job (:func:`stack_applies`; batch-major ones always do). Measured on
#: the Zen 4 machine, kernel calls, layer by layer / stack: time-major 2 x LSTM(512) B=64
#: T=50 0.97, 2 x LSTM(256) B=64 0.95-1.02, 3 x LSTM(128) B=64 T=40 1.04-1.08;
#: batch-major 1.02-1.03, 1.10-1.11 and 1.10-1.18 (the stack gathers and scatters once,
#: the layers each time). A time-major layer reads and writes its rows in place, so a
#: stack saves it only the barriers and returns to Python, which large layers hardly
#: notice, while its part-by-part input projections run a little slower than the
#: layer's chunks of contiguous rows.
STACK_TIME_MAJOR_MAX_WEIGHT_BYTES = 1 << 18


def stack_applies(B, H, Ls, steps, nthreads, itemsize, bm):
    """Whether :func:`lstm_stack_forward` runs a stack of ``Ls`` plain LSTM layers of ``H``
    units (tanh, no peepholes, clipping or projection) for inference: at least two layers,
    each layer one the row split of :func:`lstm_forward_split` would take
    (:func:`split_applies`, :func:`split_by_rows`), and batch-major inputs (``bm``) or
    small layers (:data:`STACK_TIME_MAJOR_MAX_WEIGHT_BYTES`)."""
    return (Ls >= 2 and split_applies(B, H, H, steps, True, nthreads, itemsize) and split_by_rows(B, H, itemsize)
            and (bm or 4 * H * H * itemsize <= STACK_TIME_MAJOR_MAX_WEIGHT_BYTES))


def lstm_stack_forward(x, c0, h0, bias, forget_bias, packed, packed_in, lengths, reverse, bm=False):
    """Inference through a stack of ``Ls`` plain LSTM layers of ``H`` units
    (:func:`stack_applies`) in one two-thread job (:func:`lstm_stack_rows_worker`): the
    arithmetic of :func:`lstm_forward_split` layer after layer (the same recurrent
    products and gates; the input projections on the part's rows instead of chunks of
    all rows, so float32 sums may round differently).

    ``x`` the bottom layer's inputs (``[T, B, I]``, ``[B, T, I]`` when ``bm``); ``c0``,
    ``h0`` ``[Ls, B, H]``; ``bias`` ``[Ls, 4H]``; ``forget_bias``
    ``[Ls]``; ``packed`` ``[Ls, n]`` every layer's packed recurrent rows
    (:func:`._packed.pack_panels` of ``kernel[I:]``); ``packed_in`` a tuple of the bottom
    layer's packed input rows and a ``[Ls - 1, n]`` array of the others'. Returns ``(y,
    cT, hT)``, the final states ``[Ls, B, H]``."""
    bm = bool(bm)
    B = dims(x, bm)[1]
    H = h0.shape[2]
    nr = panel_cols(x.dtype.itemsize)
    if H % nr:
        raise ValueError(f"lstm_stack_forward: units must be a multiple of {nr}, got {H}")
    (order, lens_s, nb, base, hbase, uniform, whole, X, G, Hh, Ch, hpart, Ymid, y, Yp, cT, hT, claims, scratch,
     pbuf) = lstm_stack_begin(x, h0, lengths, reverse, bm)
    run_pair(lstm_stack_rows_worker, (claims, nb, base, hbase, order, lens_s, whole, X, packed_in[0], packed_in[1],
                                      packed,
                                      bias, forget_bias, c0, h0, G, Hh, Ch, hpart, Ymid, Yp, cT, hT, y,
                                      not direct_rows(uniform, bm, B), bool(reverse), bm, scratch, pbuf, ROW_PARTS))
    return y, cT, hT


def lstm_forward_split(x, kernel, bias, c0, h0, lengths, reverse, forget_bias, need_grad, nthreads, packed, bm=False,
                       packed_in=None):
    """:func:`lstm_forward` for the configurations of :func:`split_applies`, with the time
    loop on two threads (the caller and :mod:`._team`'s helper) that share the rows of the
    batch (:func:`split_by_rows`, :func:`lstm_forward_rows_worker`) or else the units of
    every step (:func:`lstm_forward_split_worker`). Same arguments and results (the
    workspace is the one :func:`lstm_backward` reads); the arithmetic of each element is the one-thread loop's
    with the packed micro-kernel (the input projection too, so float32 sums may round
    differently from its one GEMM). ``nthreads`` is not used (two threads).
    ``packed_in``: the input rows of ``kernel`` packed by :func:`pack_panels` (as the
    numba backend keeps them), or None to pack them here."""
    bm = bool(bm)
    T, B, _ = dims(x, bm)
    H = c0.shape[1]
    nr = panel_cols(x.dtype.itemsize)
    if H % nr or h0.shape[1] != H or kernel.shape[1] != 4 * H:
        raise ValueError(f"lstm_forward_split: units must be a multiple of {nr} with no projection, "
                         f"got c0 {c0.shape}, h0 {h0.shape}, kernel {kernel.shape}")
    rows = split_by_rows(B, H, x.dtype.itemsize)
    reverse = bool(reverse)
    (order, lens_s, nb, base, hbase, uniform, X, G, KP, KPI, Hh, Ch, y, Yp, cT, hT, claims, done,
     scratch) = lstm_forward_split_begin(x, kernel, c0, h0, lengths, reverse, need_grad, packed,
                                         packed_or_empty(packed_in, x.dtype), bm, rows, False)
    direct = direct_rows(uniform, bm, B)
    if rows:
        hpart = np.empty((ROW_PARTS, (B + ROW_PARTS - 1) // ROW_PARTS, H + ROW_PAD), x.dtype)
        run_pair(lstm_forward_rows_worker, (claims, done, nb, base, hbase, order, X, KPI, G, bias,
                                            float(forget_bias), KP, Hh, Ch, Yp, cT, hT, scratch, ROW_PARTS, hpart,
                                            x, lens_s, uniform, reverse, bm, y, not direct))
    else:
        run_pair(lstm_forward_split_worker, (claims, done, nb, base, hbase, order, X, KPI, G, bias,
                                             float(forget_bias), KP, Hh, Ch, Yp, cT, hT, scratch, MAX_CHUNKS,
                                             x, lens_s, uniform, reverse, bm))
        if not direct:
            y = scatter_rows(Yp, T, B, order, lens_s, nb, base, reverse, bm)
    dt = x.dtype
    ws = (X, G, Hh, Ch, np.empty((0, H), dt), np.empty((0, H), dt), order, lens_s, nb, base)
    return y, cT, hT, ws


@kernel(inline="always")
def _reorder_rows(c, h, order, to_batch):
    """Copies of ``c [B, H]`` and ``h [B, P]`` with their rows moved from batch order to
    the plan's sorted order (row ``r`` of the result is batch row ``order[r]``) or, with
    ``to_batch``, back: the carried state gradients in and out of the backward loop."""
    B, H = c.shape
    P = h.shape[1]
    c2 = np.empty((B, H), c.dtype)
    h2 = np.empty((B, P), h.dtype)
    for r in range(B):
        b = order[r]
        src, dst = (r, b) if to_batch else (b, r)
        for j in range(H):
            c2[dst, j] = c[src, j]
        for j in range(P):
            h2[dst, j] = h[src, j]
    return c2, h2


@kernel(inline="always")
def _weight_grads(X, Hh, Mp, dG, dMraw, dH, dC, kernel, proj, order, lens_s, nb, base, T, reverse, uniform,
                  nthreads, bm):
    """What both backward kernels end with, after the time loop: the weight gradients as
    GEMMs over all rows (``[X; h]^T dG``, one GEMM when the forward was fused, and ``m^T
    dMraw`` with a projection), the bias
    gradient, ``dx`` in the caller's layout and ``dc0``/``dh0`` in batch order."""
    R = dG.shape[0]
    B, H = dC.shape
    P = dH.shape[1]
    I = kernel.shape[0] - P
    G4 = 4 * H
    dt = dG.dtype
    dkernel = np.empty((I + P, G4), dt)
    if X.shape[1] == I + P:  # a fused forward's [R, I+P] buffer (X and Hh are one): one GEMM
        gemm_tn(I + P, G4, R, X, 0, I + P, dG, 0, G4, dkernel, 0, G4, nthreads)
    else:
        gemm_tn(I, G4, R, X, 0, I, dG, 0, G4, dkernel, 0, G4, nthreads)
        gemm_tn(P, G4, R, Hh, 0, P, dG, 0, G4, dkernel, I * G4, G4, nthreads)
    dbias = np.zeros(G4, dt)
    for i in range(R):
        for j in range(G4):
            dbias[j] += dG[i, j]
    dproj = np.empty(proj.shape, dt)
    if proj.shape[0] > 0:
        gemm_tn(H, P, R, Mp, 0, H, dMraw, 0, P, dproj, 0, P, nthreads)
    if direct_rows(uniform, bm, B):
        dx = np.empty((B, T, I) if bm else (T, B, I), dt)
        gemm_nt(R, I, G4, dG, 0, G4, kernel, 0, G4, 0.0, dx, 0, I, nthreads)
    else:
        dXp = np.empty((R, I), dt)
        gemm_nt(R, I, G4, dG, 0, G4, kernel, 0, G4, 0.0, dXp, 0, I, nthreads)
        dx = scatter_rows(dXp, T, B, order, lens_s, nb, base, reverse, bm)
    dc0, dh0 = _reorder_rows(dC, dH, order, True)
    return dx, dc0, dh0, dkernel, dbias, dproj


@kernel(inline="always")
def _store_panels(row, dGp, g, R, NR, dbias):
    """Row ``g`` (of ``R``) of the gate gradients, ``row [4H]``, into the panel-major
    ``dGp`` that :func:`._packed.gemm_tn_panels` reads (panel ``q`` at ``q * R * NR``),
    and added into ``dbias``."""
    G4 = row.shape[0]
    for j in range(G4):
        dbias[j] += row[j]
    for q in range(G4 // NR):
        d0 = q * R * NR + g * NR
        _copy_row(row[q * NR:(q + 1) * NR], dGp[d0:d0 + NR], NR)


@kernel
def lstm_backward(ws, kernel, bias, w_i, w_f, w_o, proj, dy, dcT, dhT, T, reverse, mask_c, mask_h, code,
                  forget_bias, cell_clip, proj_clip, nthreads, packed_t, bm):
    """Gradients of :func:`lstm_forward` (run with ``need_grad``); ``ws`` its workspace,
    which is left intact (the pullback may run twice). dy ``[T, B, P]``, dcT ``[B, H]``, dhT ``[B, P]``.

    Returns ``(dx [T, B, I], dc0, dh0, dkernel, dbias, dw_i, dw_f, dw_o, dproj)``; with
    ``bm`` ``dy`` is ``[B, T, P]`` and ``dx`` ``[B, T, I]``."""
    X, G, Hh, Ch, Mp, Yraw, order, lens_s, nb, base = ws
    B = dcT.shape[0]
    H = dcT.shape[1]
    P = dhT.shape[1]
    I = kernel.shape[0] - P
    G4 = 4 * H
    R = G.shape[0]
    dt = G.dtype
    L = nb.shape[0] - 1
    use_peep = w_i.shape[0] > 0
    use_proj = proj.shape[0] > 0
    cclip = dt.type(cell_clip)
    pclip = dt.type(proj_clip)
    store_out = output_activation_stored(code)
    one = dt.type(1.0)
    zero = dt.type(0.0)
    uniform = R == T * B and (B == 0 or lens_s[B - 1] == T)

    dC, dH = _reorder_rows(dcT, dhT, order, False)
    dwi = np.zeros(w_i.shape[0], dt)
    dwf = np.zeros(w_i.shape[0], dt)
    dwo = np.zeros(w_i.shape[0], dt)
    dMraw = np.empty((R, P) if use_proj else (0, P), dt)
    dMpre = np.empty((B, H) if use_proj else (0, H), dt)
    KPt = given_or_pack(packed_t, L, kernel, I * G4, G4, G4, P, True)  # kernel[I:].T, packed once
    scr = scratch_for(G)
    mc_on = mask_c.shape[0] > 0
    mh_on = mask_h.shape[0] > 0
    # decided once: the common configuration takes the vectorising _grad_tanh_row
    fast_grad = code == TANH and not use_peep and not use_proj and not (cclip >= 0) and not mc_on and not mh_on
    # Panel-major gate gradients (a fused forward's one weight-gradient GEMM on this
    # thread, see gemm_tn): each step's gate gradients go to a small row buffer ``Tk``,
    # from which the step's ``d h`` product, its rows of ``dx`` and the bias gradient
    # are taken at once, and are then stored panel by panel for gemm_tn_panels; no
    # row-major [R, 4H] copy is written.
    NRp = panel_width(G)
    panel = (fast_grad and X.shape[1] == I + P and nthreads <= 1 and (I + P) * G.itemsize <= TN_MAX_ROW_BYTES
             and G4 % NRp == 0 and R > 0)
    dG = np.empty((0 if panel else R, G4), dt)
    dGp = np.empty(R * G4 if panel else 0, dt)
    # rows padded (a 4 KB stride would put the micro-kernel's row streams on one L1 set)
    ldt = G4 + ROW_PAD
    Tk = np.empty((B if panel else 0, ldt), dt)
    dXp = np.empty((R if panel else 0, I), dt)
    dbias_p = np.zeros(G4, dt)
    KPx = pack_panels_t(kernel, 0, G4, G4, I) if panel else np.empty(0, dt)  # kernel[:I].T

    for k in range(L - 1, -1, -1):
        n = nb[k]
        gb = base[k]
        if use_proj:
            for r in range(n):
                b = order[r]
                t = time_index(k, r, lens_s, reverse)
                th = 0 if mask_h.shape[0] == 1 else t
                g = gb + r
                dyr = row3(dy, t, b, bm)
                for j in range(P):
                    d = dH[r, j] * mask_h[th, b, j] if mh_on else dH[r, j]
                    d += dyr[j]
                    if pclip >= 0:
                        v = Yraw[g, j]
                        if not (abs(v) <= pclip):
                            d = zero
                    dMraw[g, j] = d
            gemm(0, 1, n, H, P, 1.0, dMraw, gb * P, P, proj, 0, P, 0.0, dMpre, 0, H, nthreads)
        if fast_grad:
            for r in range(n):
                g = gb + r
                _grad_tanh_row(G[g], Ch[g], dH[r], row3(dy, time_index(k, r, lens_s, reverse), order[r], bm), dC[r],
                               Tk[r] if panel else dG[g], one, H)
        if panel:
            step_product(n, P, G4, Tk, 0, ldt, KPt, kernel, I * G4, G4, 1, dH, 0, P, 0, nthreads, scr)
            gemm_packed(n, I, G4, Tk, 0, ldt, KPx, dXp, gb * I, I, scr, 0)
            for r in range(n):
                _store_panels(Tk[r, :G4], dGp, gb + r, R, NRp, dbias_p)
            continue
        for r in range(n if not fast_grad else 0):
            b = order[r]
            t = time_index(k, r, lens_s, reverse)
            th = 0 if mask_h.shape[0] == 1 else t
            tc = 0 if mask_c.shape[0] == 1 else t
            g = gb + r
            dyr = row3(dy, t, b, bm)
            for j in range(H):
                if use_proj:
                    dm = dMpre[r, j]
                else:
                    dm = dH[r, j] * mask_h[th, b, j] if mh_on else dH[r, j]
                    dm += dyr[j]
                cp = Ch[gb + r, j]
                si = G[g, j]
                sf = G[g, 2 * H + j]
                so = G[g, 3 * H + j]
                if store_out:
                    aj = G[g, H + j]
                    daj = dact(aj, aj, code)
                else:
                    zj = G[g, H + j]
                    aj = act(zj, code)
                    daj = dact(zj, aj, code)
                craw = sf * cp + si * aj
                c = craw
                if cclip >= 0:
                    if c > cclip:
                        c = cclip
                    elif c < -cclip:
                        c = -cclip
                ac = act(c, code)
                d_go = dm * ac * so * (one - so)
                dc = dC[r, j] * mask_c[tc, b, j] if mc_on else dC[r, j]
                dc += dm * so * dact(c, ac, code)
                if use_peep:
                    dc += d_go * w_o[j]
                    dwo[j] += d_go * c
                if cclip >= 0 and not (abs(craw) <= cclip):
                    dc = zero
                d_gf = dc * cp * sf * (one - sf)
                d_gi = dc * aj * si * (one - si)
                d_gj = dc * si * daj
                dcp = dc * sf
                if use_peep:
                    dcp += d_gi * w_i[j] + d_gf * w_f[j]
                    dwi[j] += d_gi * cp
                    dwf[j] += d_gf * cp
                dC[r, j] = dcp
                dG[g, j] = d_gi
                dG[g, H + j] = d_gj
                dG[g, 2 * H + j] = d_gf
                dG[g, 3 * H + j] = d_go
        # d h_prev = dG @ kernel[I:].T
        step_product(n, P, G4, dG, gb * G4, G4, KPt, kernel, I * G4, G4, 1, dH, 0, P, 0, nthreads, scr)

    if panel:
        dkernel = np.zeros((I + P, G4), dt)
        gemm_tn_panels(I + P, G4, R, X, 0, I + P, dGp, 0, dkernel, 0, G4)
        dx = rows_out(dXp, T, B, order, lens_s, nb, base, reverse, uniform, bm)
        dc0, dh0 = _reorder_rows(dC, dH, order, True)
        return dx, dc0, dh0, dkernel, dbias_p, dwi, dwf, dwo, np.empty(proj.shape, dt)
    dx, dc0, dh0, dkernel, dbias, dproj = _weight_grads(X, Hh, Mp, dG, dMraw, dH, dC, kernel, proj, order, lens_s,
                                                        nb, base, T, reverse, uniform, nthreads, bm)
    return dx, dc0, dh0, dkernel, dbias, dwi, dwf, dwo, dproj


@kernel
def lstm_backward_split_begin(ws, kernel, dcT, dhT, packed_t):
    """Everything before the time loop of :func:`lstm_backward_split`: the carried state
    gradients in sorted order, the gate-gradient buffer, the packed transposed recurrent
    rows, the task counters."""
    X, G, Hh, Ch, Mp, Yraw, order, lens_s, nb, base = ws
    G4 = G.shape[1]
    H = G4 // 4
    I = kernel.shape[0] - H
    L = nb.shape[0] - 1
    dC, dH = _reorder_rows(dcT, dhT, order, False)
    dG = np.empty(G.shape, G.dtype)
    KPt = given_or_pack(packed_t, max(L, PACK_MIN_STEPS), kernel, I * G4, G4, G4, H, True)  # kernel[I:].T
    claims = np.zeros(L + 1, np.int64)  # chunks taken per round, see lstm_backward_split_worker
    done = np.zeros(L + 1, np.int64)
    scratch = np.empty((2, MAX_HEIGHT * panel_width(G)), G.dtype)
    return dH, dC, dG, KPt, claims, done, scratch


@kernel
def lstm_backward_split_worker(w, hand, claims, done, G, Ch, order, lens_s, nb, base, reverse, KPt, dy, dH, dC, dG,
                               scratch, nchunks, bm):
    """Worker ``w`` (0 or 1) of the backward time loop, in chunks of units (whole panels)
    claimed per round (:func:`._atomic.take_chunk`); every round waits for all chunks of
    the one before. Round ``i`` handles step ``k = L - 1 - i``: for its units, ``d h``
    becomes step ``k + 1``'s ``dG @ kernel[I:]^T`` (all four gate blocks of that step are
    needed, hence the wait), and then the gate gradients of step ``k`` and the carried
    cell gradient of those units follow (:func:`_grad_tanh_units`). Round ``L`` only
    forms ``d h_0``. Rows that have not started yet at step ``k + 1`` (shorter sequences)
    keep the ``d h`` they came with."""
    jb = team_begin(w, hand)
    if jb < 0:  # the caller finished this job without the helper
        return team_end(w, hand, jb)
    L = nb.shape[0] - 1
    H = dH.shape[1]
    G4 = 4 * H
    NR = panel_width(G)
    nch = min((H + NR - 1) // NR, nchunks)
    scr = scratch[w]
    one = G.dtype.type(1.0)
    for i in range(L + 1):
        k = L - 1 - i
        while True:
            c = take_chunk(claims, i, nch, w)
            if c < 0:
                break
            if i > 0:
                wait_at_least(done, i - 1, nch)
            u0, u1 = chunk_cols(c, nch, H, NR)
            if k + 1 < L:
                gemm_packed(nb[k + 1], u1 - u0, G4, dG, base[k + 1] * G4, G4, KPt[(u0 // NR) * G4 * NR:], dH, u0, H,
                            scr, 0)
            if k >= 0:
                gb = base[k]
                for r in range(nb[k]):
                    g = gb + r
                    _grad_tanh_units(G[g], Ch[g], dH[r], row3(dy, time_index(k, r, lens_s, reverse), order[r], bm),
                                     dC[r], dG[g], one, H, u0, u1)
            atomic_add(done, i, 1)
    return team_end(w, hand, jb)


#: Where the row-split backward (:func:`lstm_backward_rows_worker`) writes ``dx``: rows in
#: plan order that are ``dx``'s own memory (a uniform time-major batch, or one row);
#: straight into a uniform batch-major ``dx`` (its rows ``p``, ``p + S``, ... of a step
#: lie a constant stride apart); rows in plan order that each part then copies into ``dx``
#: (the other plans: sorted rows, zeros past each length).
DX_ROWS, DX_STRIDED, DX_PARTS = 0, 1, 2


@kernel
def lstm_backward_rows_begin(ws, kernel, dcT, dhT, packed_t, packed_x, nparts, T, bm):
    """Everything before the loop of the row-split backward (:func:`lstm_backward_split`
    where :func:`split_by_rows`): the carried state gradients in sorted order, both packed
    transposed row blocks of the kernel (``kernel[I:]^T`` for ``d h``, ``kernel[:I]^T``
    for ``dx``), a buffer per part for one step's gate gradients of its rows (contiguous,
    rows padded by ``ROW_PAD``, as ``hpart`` in the forward), their panel-major store,
    where ``dx`` goes (``dx_mode``, :data:`DX_ROWS`; ``dXp`` the rows the products write,
    ``dx`` the result), a bias partial per part, the kernel gradient (written whole by the
    workers, not zeroed here) and the rows of ``h_0`` that the kernel gradient may skip
    (``s0:s1``, see :func:`_tn_except_rows`: empty unless ``h_0`` is all zeros)."""
    X, G, Hh, Ch, Mp, Yraw, order, lens_s, nb, base = ws
    G4 = G.shape[1]
    H = G4 // 4
    I = kernel.shape[0] - H
    L = nb.shape[0] - 1
    R = G.shape[0]
    dt = G.dtype
    dC, dH = _reorder_rows(dcT, dhT, order, False)
    KPt = given_or_pack(packed_t, max(L, PACK_MIN_STEPS), kernel, I * G4, G4, G4, H, True)  # kernel[I:].T
    KPx = given_or_pack(packed_x, max(L, PACK_MIN_STEPS), kernel, 0, G4, G4, I, True)  # kernel[:I].T
    B = dcT.shape[0]
    Tk = np.empty((nparts, (B + nparts - 1) // nparts, G4 + ROW_PAD), dt)
    dGp = np.empty(R * G4, dt)
    uniform = R == T * B and (B == 0 or lens_s[B - 1] == T)
    shape = (B, T, I) if bm else (T, B, I)
    if direct_rows(uniform, bm, B):
        dx_mode = DX_ROWS
        dXp = np.empty((R, I), dt)
        dx = dXp.reshape(shape)
    elif uniform:
        dx_mode = DX_STRIDED
        dx = np.empty(shape, dt)
        dXp = dx.reshape(R, I)
    else:
        dx_mode = DX_PARTS
        dXp = np.empty((R, I), dt)
        dx = np.zeros(shape, dt)
    dbp = np.zeros((nparts, G4), dt)
    dkernel = np.empty((I + H, G4), dt)
    n0 = nb[0] if L > 0 else 0
    s0 = base[0]
    s1 = s0 + n0 if rows_zero(n0, H, Hh, s0 * H, H) else s0
    claims = np.zeros(2, np.int64)  # task 0: the row parts; task 1: the weight gradient's two halves
    done = np.zeros(2, np.int64)
    scratch = np.empty((2, MAX_HEIGHT * panel_width(G)), dt)
    return dH, dC, KPt, KPx, Tk, dGp, dXp, dx, dx_mode, dbp, dkernel, s0, s1, claims, done, scratch


@kernel(inline="always")
def _tn_except_rows(m, n, R, s0, s1, a, lda, bp, q0, c, coff, ldc):
    """``C = A^T @ B`` (:func:`._packed.gemm_tn_panel_rows`, ``B`` panel-major ``R`` rows
    deep) over every depth row but ``s0:s1``, the rows of a zero initial state ``h_0``
    in the recurrent kernel's gradient ``h^T dG``: their products are all ``+-0`` where
    the gate gradients of those rows are finite (checked here for these panels; an inf or
    nan keeps them, so ``0 * inf`` still gives nan). The same sums otherwise, up to the
    sign of a zero and the depth blocks' rounding."""
    NR = panel_width(c)
    if s1 > s0:
        for q in range(q0, q0 + (n + NR - 1) // NR):
            if not all_finite(bp, q * R * NR + s0 * NR, (s1 - s0) * NR):
                s1 = s0
                break
    if s1 <= s0:
        gemm_tn_panel_rows(m, n, R, 0, R, a, lda, bp, q0, c, coff, ldc, 0)
    elif s0 > 0:
        gemm_tn_panel_rows(m, n, R, 0, s0, a, lda, bp, q0, c, coff, ldc, 0)
        gemm_tn_panel_rows(m, n, R, s1, R, a, lda, bp, q0, c, coff, ldc, 1)
    else:
        gemm_tn_panel_rows(m, n, R, s1, R, a, lda, bp, q0, c, coff, ldc, 0)


@kernel
def lstm_backward_rows_worker(w, hand, claims, done, X, G, Hh, Ch, order, lens_s, nb, base, reverse, KPt, KPx, dy,
                              dH, dC, Tk, dGp, dXp, dx, dx_mode, dbp, dkernel, s0, s1, scratch, nparts, bm):
    """Worker ``w`` (0 or 1) of the row-split backward. First the whole backward loop of
    every row part it claims (task 0; the parts of :func:`lstm_forward_rows_worker`): at
    step ``k`` the part's gate gradients of step ``k + 1`` (in ``Tk[p]``, the part's rows
    ``p``, ``p + nparts``, ... one after the other, see :func:`lstm_forward_rows_worker`
    for why) give both its ``d h`` (against ``kernel[I:]^T``) and its rows of ``dx``
    (against ``kernel[:I]^T``), then its gate gradients of step ``k`` replace them in
    ``Tk[p]`` and go, panel by panel, to ``dGp``, their sums to the part's bias partial. No
    barrier per step, and no input-gradient GEMM after the loop. Then, once every part is
    done, the kernel gradient ``[X, h]^T dG`` (:func:`._packed.gemm_tn_panel_rows`) in two
    halves of the gate columns (task 1), one per worker while both run, without the rows
    ``s0:s1`` of a zero ``h_0`` (:func:`_tn_except_rows`). ``dx``: see :data:`DX_ROWS`."""
    jb = team_begin(w, hand)
    if jb < 0:  # the caller finished this job without the helper
        return team_end(w, hand, jb)
    L = nb.shape[0] - 1
    H = dH.shape[1]
    G4 = 4 * H
    I = X.shape[1]
    R = G.shape[0]
    B = dH.shape[0]
    T = R // B if B > 0 else 0  # (a uniform plan's steps: DX_STRIDED only)
    NR = panel_width(G)
    scr = scratch[w]
    one = G.dtype.type(1.0)
    S = nparts
    while True:
        p = take_chunk(claims, 0, S, w)
        if p < 0:
            break
        Tp = Tk[p]
        ldt = Tp.shape[1]
        for k in range(L - 1, -2, -1):  # k = -1: only step 0's products
            if k + 1 < L:
                m1 = (nb[k + 1] - p + S - 1) // S  # the part's rows active at step k + 1
                if m1 > 0:
                    gemm_packed(m1, H, G4, Tp, 0, ldt, KPt, dH, p * H, S * H, scr, 0)
                    if dx_mode == DX_STRIDED:  # batch row p (the identity order), time t, rows S*T apart
                        t = time_index(k + 1, p, lens_s, reverse)
                        gemm_packed(m1, I, G4, Tp, 0, ldt, KPx, dXp, (p * T + t) * I, S * T * I, scr, 0)
                    else:
                        gemm_packed(m1, I, G4, Tp, 0, ldt, KPx, dXp, (base[k + 1] + p) * I, S * I, scr, 0)
            if k >= 0:
                gb = base[k]
                j = 0  # the row's place in the part
                for r in range(p, nb[k], S):
                    g = gb + r
                    row = Tp[j, :G4]
                    _grad_tanh_row(G[g], Ch[g], dH[r], row3(dy, time_index(k, r, lens_s, reverse), order[r], bm),
                                   dC[r], row, one, H)
                    _store_panels(row, dGp, g, R, NR, dbp[p])
                    j += 1
        if dx_mode == DX_PARTS:
            scatter_part(p, S, dXp, dx, order, lens_s, nb, base, reverse, bm)
        atomic_add(done, 0, 1)
    wait_at_least(done, 0, S)
    while True:
        c = take_chunk(claims, 1, 2, w)
        if c < 0:
            break
        j0, j1 = chunk_cols(c, 2, G4, NR)
        gemm_tn_panel_rows(I, j1 - j0, R, 0, R, X, I, dGp, j0 // NR, dkernel, j0, G4, 0)
        _tn_except_rows(H, j1 - j0, R, s0, s1, Hh, H, dGp, j0 // NR, dkernel, I * G4 + j0, G4)
    return team_end(w, hand, jb)


@kernel
def lstm_backward_rows_end(ws, dbp, dH, dC):
    """After the row-split backward: the bias gradient (the parts' partials, summed in
    part order, so the result does not depend on which worker ran which part) and
    ``dc0``/``dh0`` in batch order."""
    X, G, Hh, Ch, Mp, Yraw, order, lens_s, nb, base = ws
    G4 = G.shape[1]
    dbias = np.zeros(G4, G.dtype)
    for p in range(dbp.shape[0]):
        for j in range(G4):
            dbias[j] += dbp[p, j]
    dc0, dh0 = _reorder_rows(dC, dH, order, True)
    return dc0, dh0, dbias


@kernel
def lstm_backward_split_end(ws, kernel, dG, dH, dC, T, reverse, nthreads, bm):
    """After the loop of :func:`lstm_backward_split`: :func:`_weight_grads`."""
    X, G, Hh, Ch, Mp, Yraw, order, lens_s, nb, base = ws
    B = dH.shape[0]
    uniform = G.shape[0] == T * B and (B == 0 or lens_s[B - 1] == T)
    proj = np.empty((0, 0), dG.dtype)
    dMraw = np.empty((0, dH.shape[1]), dG.dtype)
    return _weight_grads(X, Hh, Mp, dG, dMraw, dH, dC, kernel, proj, order, lens_s, nb, base, T, reverse, uniform,
                         nthreads, bm)


def lstm_backward_split(ws, kernel, dy, dcT, dhT, T, reverse, nthreads, packed_t, bm=False, packed_x=None):
    """:func:`lstm_backward` for the configurations of :func:`split_applies` (the workspace
    of a forward run with ``need_grad``; tanh, no peepholes, clipping, projection or state
    masks), with the time loop on two threads (the caller and :mod:`._team`'s helper).
    Where :func:`split_by_rows` says so, each thread takes its parts of the batch rows
    through the whole loop, forming ``dx`` step by step, and the kernel gradient follows
    on both threads (:func:`lstm_backward_rows_worker`; ``packed_x``: ``kernel[:I]^T``
    packed by :func:`._packed.pack_panels_t`, as the numba backend keeps it, or None to
    pack it here); else the threads share the units of every step and the weight and
    input gradients follow as in :func:`lstm_backward`, on ``nthreads`` BLAS threads.
    Same results; the arithmetic of the loop is the one-thread kernel's with the packed
    micro-kernel (float32 sums may round differently).

    Returns ``(dx, dc0, dh0, dkernel, dbias, dproj)`` (no peephole gradients; ``dproj`` is
    ``[0, 0]``); ``bm`` as in :func:`lstm_backward`."""
    H = dcT.shape[1]
    nr = panel_cols(dcT.dtype.itemsize)
    if H % nr or dhT.shape[1] != H or kernel.shape[1] != 4 * H:
        raise ValueError(f"lstm_backward_split: units must be a multiple of {nr} with no projection, "
                         f"got dcT {dcT.shape}, dhT {dhT.shape}, kernel {kernel.shape}")
    X, G, Hh, Ch, Mp, Yraw, order, lens_s, nb, base = ws
    reverse = bool(reverse)
    bm = bool(bm)
    dt = dcT.dtype
    if split_by_rows(dcT.shape[0], H, dt.itemsize):
        (dH, dC, KPt, KPx, Tk, dGp, dXp, dx, dx_mode, dbp, dkernel, s0, s1, claims, done,
         scratch) = lstm_backward_rows_begin(ws, kernel, dcT, dhT, packed_t, packed_or_empty(packed_x, dt), ROW_PARTS,
                                             T, bm)
        run_pair(lstm_backward_rows_worker, (claims, done, X, G, Hh, Ch, order, lens_s, nb, base, reverse, KPt, KPx,
                                             dy, dH, dC, Tk, dGp, dXp, dx, dx_mode, dbp, dkernel, s0, s1, scratch,
                                             ROW_PARTS, bm))
        dc0, dh0, dbias = lstm_backward_rows_end(ws, dbp, dH, dC)
        return dx, dc0, dh0, dkernel, dbias, np.empty((0, 0), dt)
    dH, dC, dG, KPt, claims, done, scratch = lstm_backward_split_begin(ws, kernel, dcT, dhT, packed_t)
    run_pair(lstm_backward_split_worker, (claims, done, G, Ch, order, lens_s, nb, base, reverse, KPt, dy, dH, dC, dG,
                                          scratch, MAX_CHUNKS, bm))
    return lstm_backward_split_end(ws, kernel, dG, dH, dC, T, reverse, nthreads, bm)
