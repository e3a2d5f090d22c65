"""Compiled TensorFlow kernels: one layer over a sequence, and one step.

Imported only by :meth:`TensorFlowBackend.initialize` (this module imports tensorflow).

Shapes follow :mod:`fastseq.contract`: ``x [T, B, I]`` time-major, states ``[B, S]``,
``G`` the width of the hoisted input projection (rnn ``H``, gru ``3H`` = gates r, u then
candidate, lstm ``4H``).

Every compiled function is a ``tf.function`` with an ``input_signature`` whose dimensions
are all ``None``: one trace per cell configuration (kind, activation, options, dtype,
whether lengths / masks are given, reverse, XLA), whatever ``T``, ``B`` or ``I``.
"""

from __future__ import annotations

import threading

import tensorflow as tf

from fastseq.contract import CellSpec

_ACT = {
    "tanh": tf.tanh,
    "sigmoid": tf.sigmoid,
    "relu": tf.nn.relu,
    "relu6": tf.nn.relu6,
    "elu": tf.nn.elu,
    "softsign": tf.nn.softsign,
    "softplus": tf.nn.softplus,
    "linear": tf.identity,
}


def activation(name):
    try:
        return _ACT[name]
    except KeyError:
        raise ValueError(f"activation must be one of {sorted(_ACT)}, got {name!r}") from None


def param_names(spec: CellSpec):
    """The params' names in TF1's creation order (independent of the input depth)."""
    return tuple(spec.param_shapes(1))


# ----------------------------------------------------------------------------- math
def input_weights(spec: CellSpec, p, n_in):
    """``(W_x [n_in, G], b [G])``: the input rows of the kernels side by side and the
    biases, so that ``x @ W_x + b`` is the input half of every gate (the LSTM forget bias
    folded into the ``f`` columns)."""
    if spec.kind == "rnn":
        return p["kernel"][:n_in], p["bias"]
    if spec.kind == "gru":
        w = tf.concat([p["gates/kernel"][:n_in], p["candidate/kernel"][:n_in]], axis=1)
        return w, tf.concat([p["gates/bias"], p["candidate/bias"]], axis=0)
    if spec.kind == "lstm":
        b = p["bias"]
        if spec.forget_bias:
            H = spec.num_units
            fb = tf.concat(
                [tf.zeros([2 * H], b.dtype), tf.fill([H], tf.constant(spec.forget_bias, b.dtype)), tf.zeros([H], b.dtype)],
                axis=0,
            )
            b = b + fb
        return p["kernel"][:n_in], b
    raise ValueError(f"unknown cell kind {spec.kind!r}")


def project_inputs(spec: CellSpec, p, x2d):
    """The input half of every matmul, for all rows at once: ``x2d [N, I] -> [N, G]``.

    Biases are added here (and the LSTM forget bias folded into the ``f`` columns), so the
    loop only adds the recurrent matmul. The bias is one vector added by ``bias_add``, which
    TensorFlow's CPU remapper fuses into the matmul (one pass over the result).
    """
    w, b = input_weights(spec, p, tf.shape(x2d)[1])
    return tf.nn.bias_add(tf.matmul(x2d, w), b)


def recurrent_weights(spec: CellSpec, p, n_in):
    """The recurrent parts of the kernels (rows ``I:``) and the other per-step weights."""
    if spec.kind == "rnn":
        return {"h": p["kernel"][n_in:]}
    if spec.kind == "gru":
        return {"gh": p["gates/kernel"][n_in:], "ch": p["candidate/kernel"][n_in:]}
    w = {"h": p["kernel"][n_in:]}
    if spec.use_peepholes:
        w.update(wf=p["w_f_diag"], wi=p["w_i_diag"], wo=p["w_o_diag"])
    if spec.num_proj:
        w["proj"] = p["projection/kernel"]
    return w


def _dact(name, y, x=None):
    """d act(x)/dx from the output ``y = act(x)`` (``x`` only where precision needs it)."""
    if name == "tanh":
        return 1 - y * y
    if name == "sigmoid":
        return y * (1 - y)
    if name == "relu":
        return tf.cast(y > 0, y.dtype)
    if name == "relu6":
        return tf.cast(tf.logical_and(y > 0, y < 6), y.dtype)
    if name == "elu":
        return tf.where(y > 0, tf.ones_like(y), y + 1)
    if name == "softsign":
        return 1 / tf.square(1 + tf.abs(x))
    if name == "softplus":
        return tf.sigmoid(x)
    if name == "linear":
        return tf.ones_like(y)
    raise ValueError(f"unknown activation {name!r}")


def _needs_preact(name):
    return name in ("softsign", "softplus")


def step(spec: CellSpec, w, xw, state, keep=False):
    """One step given the projected input ``xw [B, G]``.

    Returns ``(output, new_state tuple, residuals)``; ``residuals`` (a dict, empty unless
    ``keep``) holds what :func:`step_backward` needs besides the carried state.
    """
    act = activation(spec.activation)
    H = spec.num_units
    pre = _needs_preact(spec.activation)
    res = {}
    if spec.kind == "rnn":
        (h,) = state
        z = xw + tf.matmul(h, w["h"])
        hn = act(z)
        if keep:
            res["y"] = hn
            if pre:
                res["z"] = z
        return hn, (hn,), res
    if spec.kind == "gru":
        (h,) = state
        # one Split op where two column slices would be two (each op is an executor
        # launch a step; P2's forward 1.02x)
        xg, xc = tf.split(xw, [2 * H, H], axis=1)
        g = tf.sigmoid(xg + tf.matmul(h, w["gh"]))
        r, u = tf.split(g, 2, axis=1)
        zc = xc + tf.matmul(r * h, w["ch"])
        c = act(zc)
        hn = c + u * (h - c)
        if keep:
            res.update(g=g, c=c)
            if pre:
                res["zc"] = zc
        return hn, (hn,), res
    c, h = state
    z = xw + tf.matmul(h, w["h"])
    i, j, f, o = tf.split(z, 4, axis=1)
    if spec.use_peepholes:
        f = f + w["wf"] * c
        i = i + w["wi"] * c
    sf, si, aj = tf.sigmoid(f), tf.sigmoid(i), act(j)
    cn = sf * c + si * aj
    cn_pre = cn
    if spec.cell_clip is not None:
        clip = tf.constant(spec.cell_clip, cn.dtype)
        cn = tf.clip_by_value(cn, -clip, clip)
    if spec.use_peepholes:
        o = o + w["wo"] * cn
    so, ac = tf.sigmoid(o), act(cn)
    m = so * ac
    m_pre = m
    if spec.num_proj:
        m = tf.matmul(m, w["proj"])
        mp = m
        if spec.proj_clip is not None:
            pc = tf.constant(spec.proj_clip, m.dtype)
            m = tf.clip_by_value(m, -pc, pc)
    if keep:
        res.update(si=si, aj=aj, sf=sf, so=so, ac=ac)
        if pre:
            res.update(j=j, cn=cn)
        elif spec.use_peepholes:
            res["cn"] = cn
        if spec.cell_clip is not None:
            res["cn_pre"] = cn_pre
        if spec.num_proj:
            res["m_pre"] = m_pre
            if spec.proj_clip is not None:
                res["mp"] = mp
    return m, (cn, m), res


def residual_names(spec: CellSpec):
    """The per-step residuals :func:`step` keeps, in a fixed order."""
    pre = _needs_preact(spec.activation)
    if spec.kind == "rnn":
        return ("y", "z") if pre else ("y",)
    if spec.kind == "gru":
        return ("g", "c", "zc") if pre else ("g", "c")
    names = ["si", "aj", "sf", "so", "ac"]
    if pre:
        names += ["j", "cn"]
    elif spec.use_peepholes:
        names.append("cn")
    if spec.cell_clip is not None:
        names.append("cn_pre")
    if spec.num_proj:
        names.append("m_pre")
        if spec.proj_clip is not None:
            names.append("mp")
    return tuple(names)


#: Backward steps of float32 tanh GRU and LSTM layers (no clipping or projection) use
#: TensorFlow's fused cell-gradient ops (the kernels of TF1's GRUBlockCell and
#: LSTMBlockCell) for the element-wise part: one op where the plain graph has ~15-20, each
#: a separate executor launch per step. Read when a configuration is first traced: set it
#: False before the first call (or on a fresh backend) to compare.
FUSED_BACKWARD = True


def fused_backward_ok(spec: CellSpec, dtype) -> bool:
    """Whether :func:`step_backward` runs the step through ``GRUBlockCellGrad`` /
    ``LSTMBlockCellGrad`` (CPU kernels for float32 only; tanh; no clipping or projection)."""
    if not FUSED_BACKWARD or dtype != tf.float32 or spec.activation != "tanh":
        return False
    if spec.kind == "gru":
        return True
    return spec.kind == "lstm" and not spec.num_proj and spec.cell_clip is None


def backward_weights(spec: CellSpec, w, dtype, fused: bool):
    """The per-step weights of :func:`step_backward`: ``w`` plus the transposed matrices
    (``hT``, ``ghT``, ``chT``, ``projT``), made once before the loop: TensorFlow's CPU
    matmul with ``transpose_b=True`` is 1.4-4x slower than on a transposed copy on these
    shapes (measured: [32, 2048] x [2048, 512]^T 4.9 vs 1.2 ms). With ``fused`` also the
    zero biases (and peepholes) the fused ops take but do not use."""
    H = spec.num_units
    w = dict(w)
    for k in ("h", "gh", "ch", "proj"):
        if k in w:
            w[k + "T"] = tf.transpose(w[k])
    if fused and spec.kind == "gru":
        w.update(zb_ru=tf.zeros([2 * H], dtype), zb_c=tf.zeros([H], dtype))
    elif fused:
        w["zb"] = tf.zeros([4 * H], dtype)
        if not spec.use_peepholes:
            z = tf.zeros([H], dtype)
            w.update(wf=z, wi=z, wo=z)
    return w


def _fused_step_backward(spec: CellSpec, w, r, state, d_out, d_new):
    """:func:`step_backward` through TensorFlow's fused cell-gradient ops. The input
    given to them has zero columns and the weights are the recurrent rows only, so they
    compute the recurrent part of the step alone (the input gradient is one matmul over
    all steps after the loop)."""
    if spec.kind == "gru":
        (h,) = state
        g = r["g"]
        H = spec.num_units
        _, dh, dc_bar, d_ru = tf.raw_ops.GRUBlockCellGrad(
            x=h[:, :0], h_prev=h, w_ru=w["gh"], w_c=w["ch"], b_ru=w["zb_ru"], b_c=w["zb_c"],
            r=g[:, :H], u=g[:, H:], c=r["c"], d_h=d_out + d_new[0])
        return tf.concat([d_ru, dc_bar], axis=1), (dh,), {}
    c, h = state
    dc_in, dm_state = d_new
    # the op's cs input only feeds the o-peephole's weight gradient (formed after the loop)
    dc, dz, *_ = tf.raw_ops.LSTMBlockCellGrad(
        x=h[:, :0], cs_prev=c, h_prev=h, w=w["h"], wci=w["wi"], wcf=w["wf"], wco=w["wo"], b=w["zb"],
        i=r["si"], cs=r.get("cn", r["ac"]), f=r["sf"], o=r["so"], ci=r["aj"], co=r["ac"], cs_grad=dc_in,
        h_grad=d_out + dm_state, use_peephole=spec.use_peepholes)
    return dz, (dc, tf.matmul(dz, w["hT"])), {}


def step_backward(spec: CellSpec, w, r, state, d_out, d_new, fused=False):
    """Backward of one step from its residuals ``r`` and the state it started from.

    ``d_out``/``d_new`` are the (already masked) cotangents of the step's output and new
    state. Returns ``(dz, d_prev_state tuple, extra)``: ``dz [B, G]`` the cotangent of
    the gate pre-activations in the layout of :func:`project_inputs` (the weight
    gradients are formed from it after the loop), ``extra`` a dict of further per-step
    values the weight gradients need (``dmp`` for the projection). ``fused``: run it
    through :func:`_fused_step_backward` (see :func:`fused_backward_ok`). ``w`` from
    :func:`backward_weights`.
    """
    if fused:
        return _fused_step_backward(spec, w, r, state, d_out, d_new)
    name = spec.activation
    H = spec.num_units
    if spec.kind == "rnn":
        (h,) = state
        dz = (d_out + d_new[0]) * _dact(name, r["y"], r.get("z"))
        return dz, (tf.matmul(dz, w["hT"]),), {}
    if spec.kind == "gru":
        (h,) = state
        g, c = r["g"], r["c"]
        rr, u = g[:, :H], g[:, H:]
        dhn = d_out + d_new[0]
        du = dhn * (h - c)
        dzc = (dhn - dhn * u) * _dact(name, c, r.get("zc"))
        drh = tf.matmul(dzc, w["chT"])
        dg = tf.concat([drh * h, du], axis=1) * (g * (1 - g))
        dh = dhn * u + drh * rr + tf.matmul(dg, w["ghT"])
        return tf.concat([dg, dzc], axis=1), (dh,), {}
    c, _ = state
    dc_in, dm_state = d_new
    dm = d_out + dm_state
    extra = {}
    if spec.num_proj:
        dmp = dm
        if spec.proj_clip is not None:
            dmp = tf.where(tf.abs(r["mp"]) <= spec.proj_clip, dm, tf.zeros_like(dm))
        extra["dmp"] = dmp
        dm = tf.matmul(dmp, w["projT"])
    si, aj, sf, so, ac = r["si"], r["aj"], r["sf"], r["so"], r["ac"]
    doo = dm * ac * so * (1 - so)
    dcn = dc_in + dm * so * _dact(name, ac, r.get("cn"))
    if spec.use_peepholes:
        dcn = dcn + doo * w["wo"]
    if spec.cell_clip is not None:
        dcn = tf.where(tf.abs(r["cn_pre"]) <= spec.cell_clip, dcn, tf.zeros_like(dcn))
    dfi = dcn * c * sf * (1 - sf)
    dii = dcn * aj * si * (1 - si)
    dj = dcn * si * _dact(name, aj, r.get("j"))
    dc = dcn * sf
    if spec.use_peepholes:
        dc = dc + dfi * w["wf"] + dii * w["wi"]
    dz = tf.concat([dii, dj, dfi, doo], axis=1)
    return dz, (dc, tf.matmul(dz, w["hT"])), extra


def _stack(ta, n, B, width, dtype):
    # An empty TensorArray cannot be stacked without a fully known element shape.
    return tf.cond(
        n > 0,
        lambda: tf.reshape(ta.stack(), tf.stack([n, B, width])),
        lambda: tf.zeros(tf.stack([0, B, width]), dtype),
    )


def _reverser(lengths):
    if lengths is not None:
        return lambda a: tf.reverse_sequence(a, lengths, seq_axis=0, batch_axis=1)
    return lambda a: tf.reverse(a, [0])


def _step_masks(masks, mask_kinds, reverse, rev, T, dtype):
    """Per state component: None, ("const", [B,S]) or ("seq", TensorArray)."""
    mask_iter = iter(masks)
    out = []
    for kind in mask_kinds:
        if kind is None:
            out.append(None)
            continue
        m = tf.stop_gradient(next(mask_iter))
        if kind == "const":
            out.append(("const", m[0]))
        else:
            if reverse:
                m = rev(m)
            out.append(("seq", tf.TensorArray(dtype, size=T, clear_after_read=False).unstack(m)))
    return out


def _mask_value(m, t):
    return m[1] if m[0] == "const" else m[1].read(t)


def _widths(spec: CellSpec):
    """Width of each residual (by name), of the state components and of ``dz``."""
    H, P = spec.num_units, spec.output_size
    return {"y": H, "z": H, "g": 2 * H, "c": H, "zc": H, "si": H, "aj": H, "sf": H, "so": H, "ac": H,
            "j": H, "cn": H, "cn_pre": H, "m_pre": H, "mp": P}


def _gate_width(spec: CellSpec):
    """Width ``G`` of the projected input: rnn ``H``, gru ``3H``, lstm ``4H``."""
    return {"rnn": 1, "gru": 3, "lstm": 4}[spec.kind] * spec.num_units


def _steps_run(lengths, T):
    """How many steps a loop with these lengths runs: ``max(lengths)`` (0 for none)."""
    return tf.minimum(tf.maximum(tf.reduce_max(tf.concat([lengths, [0]], 0)), 0), T)


def _reverse_masks(masks, mask_kinds, rev):
    """Reverse the per-step ("seq") masks over all rows (before any split of the rows)."""
    kinds = [k for k in mask_kinds if k is not None]
    return tuple(rev(m) if k == "seq" else m for m, k in zip(masks, kinds))


def _join_rows(tas, n, ranges, width, dtype):
    """Stack each chain's TensorArray (``n`` steps) and join the chains' rows."""
    stacked = [_stack(ta, n, hi - lo, width, dtype) for ta, (lo, hi) in zip(tas, ranges)]
    return stacked[0] if len(stacked) == 1 else tf.concat(stacked, axis=1)


def _row_chains(B, chains):
    """Row ranges ``[(lo, hi), ...]`` splitting ``B`` rows into ``chains`` parts."""
    if chains == 1:
        return [(0, B)]
    cut = B // 2
    return [(0, cut), (cut, B)]


def run_layer(spec: CellSpec, x, state, params, lengths, masks, mask_kinds, reverse, full_length, keep=False,
              chains=1):
    """The layer of :meth:`fastseq.contract.Backend.layer_forward`, in graph code.

    ``lengths`` int32 ``[B]`` or None; ``masks`` the given masks (``[T, B, S]`` for kind
    "seq", ``[1, B, S]`` for kind "const"), aligned with ``mask_kinds`` (None entries
    omitted). ``full_length`` runs all ``T`` steps even when every sequence is shorter
    (XLA needs static loop bounds). With ``keep`` also returns the residuals
    :func:`run_layer_backward` needs: a tuple (the input in step order, the state each
    step started from per component, then :func:`residual_names`), each ``[n, B, .]``
    for the ``n`` steps run.

    ``chains=2`` splits the rows into two halves computed as two independent recurrences
    in the same loop body: the executor runs their small matmuls side by side on two
    cores instead of one matmul split across threads per step (the rows' results do not
    depend on the split).
    """
    dtype = x.dtype
    T, B, n_in = tf.shape(x)[0], tf.shape(x)[1], tf.shape(x)[2]
    p = dict(zip(param_names(spec), params))
    rev = _reverser(lengths)
    if reverse:
        x = rev(x)
    G = _gate_width(spec)
    xw = tf.reshape(project_inputs(spec, p, tf.reshape(x, [-1, n_in])), [T, B, G])
    w = recurrent_weights(spec, p, n_in)
    P = spec.output_size
    if lengths is not None and not full_length:
        n_steps = _steps_run(lengths, T)
    else:
        n_steps = T
    names = residual_names(spec) if keep else ()
    widths = _widths(spec)
    n_state = len(state)

    ranges = _row_chains(B, chains)
    if reverse:
        masks = _reverse_masks(masks, mask_kinds, rev)
    parts = []  # per chain: xw, step masks, length column
    for lo, hi in ranges:
        cm = tuple(m[:, lo:hi] for m in masks) if chains > 1 else masks
        parts.append((
            xw if chains == 1 else xw[:, lo:hi],
            _step_masks(cm, mask_kinds, False, rev, T, dtype),
            None if lengths is None else lengths[lo:hi, None],
        ))
    state_c = [tuple(a if chains == 1 else a[lo:hi] for a in state) for lo, hi in ranges]

    def new_tas(n):
        return tuple(tf.TensorArray(dtype, size=n_steps) for _ in range(n))

    out_tas = tuple(tf.TensorArray(dtype, size=n_steps, element_shape=tf.TensorShape([None, P])) for _ in ranges)
    state_tas = tuple(new_tas(n_state) if keep else () for _ in ranges)
    res_tas = tuple(new_tas(len(names)) for _ in ranges)

    def body(t, out_tas, state_tas, res_tas, states):
        outs, sts, rts, new_states = [], [], [], []
        for c, (xw_c, step_masks, len_col) in enumerate(parts):
            s = states[c]
            out, s_new, res = step(spec, w, xw_c[t], s, keep)
            st, rt = state_tas[c], res_tas[c]
            if keep:
                st = tuple(ta.write(t, a) for ta, a in zip(st, s))
                rt = tuple(ta.write(t, res[k]) for ta, k in zip(rt, names))
            s_new = list(s_new)
            for k, m in enumerate(step_masks):
                if m is not None:
                    s_new[k] = s_new[k] * _mask_value(m, t)
            if len_col is not None:
                valid = t < len_col
                s_new = [tf.where(valid, a, b) for a, b in zip(s_new, s)]
                out = tf.where(valid, out, tf.zeros_like(out))
            outs.append(out_tas[c].write(t, out))
            sts.append(st)
            rts.append(rt)
            new_states.append(tuple(s_new))
        return (t + 1, tuple(outs), tuple(sts), tuple(rts), tuple(new_states))

    loop_vars = (tf.constant(0, tf.int32), out_tas, state_tas, res_tas, tuple(state_c))
    _, out_tas, state_tas, res_tas, finals = tf.while_loop(
        lambda t, *_: t < n_steps, body, loop_vars, maximum_iterations=n_steps, swap_memory=False
    )

    def gather(tas, width):
        return _join_rows(tas, n_steps, ranges, width, dtype)

    final = tuple(finals[0][k] if chains == 1 else tf.concat([f[k] for f in finals], axis=0) for k in range(n_state))
    y = gather(out_tas, P)
    if lengths is not None and not full_length:
        y = tf.concat([y, tf.zeros(tf.stack([T - n_steps, B, P]), dtype)], axis=0)
    if reverse:
        y = rev(y)
    if not keep:
        return y, final
    residuals = (x,) + tuple(gather([st[k] for st in state_tas], wd) for k, wd in enumerate(spec.state_sizes)) \
        + tuple(gather([rt[j] for rt in res_tas], widths[k]) for j, k in enumerate(names))
    return y, final, residuals


def _packed_plan(lengths, T, B, reverse):
    """The packed, step-major layout of the valid (step, row) pairs for :func:`run_layer_packed`
    and :func:`run_layer_backward_packed`: ``(order, undo, n_steps, counts, starts, pos)``:
    the rows sorted by length (longest first, stable) and its inverse, the steps run, the
    active rows of each step and where its block starts, and for each packed row its
    ``(step, row)`` in ``[T, B]`` (the reverse direction's step ``t`` of a row reads
    ``len - 1 - t``)."""
    order = tf.argsort(lengths, direction="DESCENDING", stable=True)
    undo = tf.math.invert_permutation(order)
    lens = tf.gather(lengths, order)
    n_steps = _steps_run(lengths, T)
    counts = tf.reduce_sum(tf.cast(lens[None, :] > tf.range(n_steps)[:, None], tf.int32), axis=1)
    starts = tf.cumsum(counts, exclusive=True)
    tj = tf.cast(tf.where(tf.range(B)[None, :] < counts[:, None]), tf.int32)  # [N, 2] (step, sorted row)
    t_idx, j_idx = tj[:, 0], tj[:, 1]
    src_t = tf.gather(lens, j_idx) - 1 - t_idx if reverse else t_idx
    pos = tf.stack([src_t, tf.gather(order, j_idx)], axis=1)  # where each packed row lives in [T, B]
    return order, undo, n_steps, counts, starts, pos


def _packed_rows(ta, n_steps, width, dtype):
    """A packed TensorArray's blocks joined in step order: ``[N, width]``."""
    return tf.cond(n_steps > 0, lambda: ta.concat(), lambda: tf.zeros(tf.stack([0, width]), dtype))


def run_layer_packed(spec: CellSpec, x, state, params, lengths, reverse, keep=False):
    """:func:`run_layer` for a batch with lengths that does no work on finished rows: the
    rows are sorted by length once (longest first), step ``t`` runs the cell on the first
    ``count(lengths > t)`` rows only (the active batch shrinks as sequences finish, as in
    PyTorch's packed sequences, but from plain lengths), and the rows are put back in
    their order at the end. TF1 computes every padded step; this does about
    ``mean(lengths) / max(lengths)`` of that work.

    The valid (step, row) pairs are laid out packed, step-major (PyTorch's
    ``PackedSequence`` order, :func:`_packed_plan`): the input is gathered into that
    layout once (the reverse direction reads ``x[len - 1 - t]``, no reversed copy),
    projected in one matmul over the valid rows only, each step reads its contiguous
    block, and the outputs are scattered to their places in ``[T, B, P]`` at the end
    (zeros past each length). ``keep``: also returns the residuals of
    :func:`run_layer_backward_packed` in the same packed layout, ``[N, .]`` each: the
    input rows, the state each step started from, :func:`residual_names`."""
    dtype = x.dtype
    T, B = tf.shape(x)[0], tf.shape(x)[1]
    p = dict(zip(param_names(spec), params))
    order, undo, n_steps, counts, starts, pos = _packed_plan(lengths, T, B, reverse)
    xp = tf.gather_nd(x, pos)  # [N, I]
    xw = project_inputs(spec, p, xp)  # [N, G]
    w = recurrent_weights(spec, p, tf.shape(x)[2])
    P = spec.output_size
    out_ta = tf.TensorArray(dtype, size=n_steps, element_shape=tf.TensorShape([None, P]), infer_shape=False)
    names = residual_names(spec) if keep else ()
    widths = _widths(spec)
    kept_w = (tuple(spec.state_sizes) + tuple(widths[k] for k in names)) if keep else ()
    kept = tuple(tf.TensorArray(dtype, size=n_steps, element_shape=tf.TensorShape([None, wd]), infer_shape=False)
                 for wd in kept_w)

    def body(t, out_ta, kept, *s):
        n, at = counts[t], starts[t]
        s_act = tuple(a[:n] for a in s)
        out, s_new, res = step(spec, w, xw[at:at + n], s_act, keep)
        if keep:
            kept = tuple(ta.write(t, v) for ta, v in zip(kept, s_act + tuple(res[k] for k in names)))
        s_next = tuple(tf.concat([a, b[n:]], axis=0) for a, b in zip(s_new, s))
        return (t + 1, out_ta.write(t, out), kept, *s_next)

    state_sorted = tuple(tf.gather(a, order) for a in state)
    _, out_ta, kept, *final = tf.while_loop(lambda t, *_: t < n_steps, body,
                                            (tf.constant(0), out_ta, kept, *state_sorted), maximum_iterations=n_steps)
    y = tf.scatter_nd(pos, _packed_rows(out_ta, n_steps, P, dtype), tf.stack([T, B, P]))
    final = tuple(tf.gather(a, undo) for a in final)
    if not keep:
        return y, final
    return y, final, (xp,) + tuple(_packed_rows(ta, n_steps, wd, dtype) for ta, wd in zip(kept, kept_w))


def run_stack_wave(specs, x, states, params_list, reverse, keep=False):
    """A MultiRNNCell of plain layers (no lengths, masks or XLA) as one loop
    over the steps in which layer ``l`` runs its step ``t - l`` at iteration ``t`` (a
    wavefront): the layers' steps of one iteration depend only on the iteration before,
    so the executor runs them side by side on the cores, and the whole stack is one loop
    of ``T + L - 1`` iterations instead of ``L`` loops of ``T``, each with its own set-up,
    output stacking and hand-offs. The first layer's input projection is one matmul over
    all steps as in :func:`run_layer`; a later layer's is one matmul a step, of the row
    block the layer below produced one iteration before. Iterations where layer ``l`` has
    no step (the first ``l``, the last ``L - 1 - l``) compute it and keep the old state
    (``tf.where``); the last layer's outputs of the first ``L - 1`` iterations are
    dropped. The same arithmetic per step and row as :func:`run_layer` (the per-step
    products are row blocks of the same matmul). ``keep``: also returns, per layer, the
    residuals :func:`run_layer` keeps for :func:`run_layer_backward` (the input in step
    order, the state each step started from, :func:`residual_names`), for all ``T`` steps.

    Measured against the layers one after another (each with two row chains; P2's
    three GRUCell(200), B = 32, T = 28, one process, calls interleaved): forward
    1.2-1.35x, training step 1.06x (see ``TensorFlowBackend.wave_max_units`` for the
    shapes where it loses)."""
    dtype = x.dtype
    L = len(specs)
    if reverse:
        x = tf.reverse(x, [0])
    T, B, n_in = tf.shape(x)[0], tf.shape(x)[1], tf.shape(x)[2]
    ps = [dict(zip(param_names(spec), params)) for spec, params in zip(specs, params_list)]
    xw0 = tf.reshape(project_inputs(specs[0], ps[0], tf.reshape(x, [-1, n_in])), [T, B, _gate_width(specs[0])])
    ws, wx = [recurrent_weights(specs[0], ps[0], n_in)], [None]
    for lower, spec, p in zip(specs, specs[1:], ps[1:]):
        ws.append(recurrent_weights(spec, p, lower.output_size))
        wx.append(input_weights(spec, p, lower.output_size))
    n_iter = tf.where(T > 0, T + L - 1, 0)
    P = specs[-1].output_size
    out_ta = tf.TensorArray(dtype, size=n_iter, element_shape=tf.TensorShape([None, P]))
    # each layer's output (its state's last component: h, or the projected m), as the
    # state comes in (the same shapes in and out of the loop)
    below = tuple(tf.zeros_like(st[-1]) for st in states[:-1])
    # with keep, per layer what run_layer keeps (written at iteration t, layer l's step
    # t - l; sliced after the loop): the input rows (layers above the first), the state
    # each step started from, the residuals of step()
    names = [residual_names(spec) if keep else () for spec in specs]
    n_kept = [(1 if l else 0) + len(spec.state_sizes) + len(names[l]) if keep else 0 for l, spec in enumerate(specs)]
    kept = tuple(tuple(tf.TensorArray(dtype, size=n_iter) for _ in range(n)) for n in n_kept)

    def body(t, out_ta, states, below, kept):
        new_states, outs, new_kept = [], [], []
        for l, spec in enumerate(specs):
            if l == 0:
                xw = xw0[tf.minimum(t, T - 1)]
            else:
                xw = tf.nn.bias_add(tf.matmul(below[l - 1], wx[l][0]), wx[l][1])
            out, s_new, res = step(spec, ws[l], xw, states[l], keep)
            on = tf.logical_and(t >= l, t - l < T)
            new_states.append(tuple(tf.where(on, a, b) for a, b in zip(s_new, states[l])))
            outs.append(out)
            if keep:
                vals = ((below[l - 1],) if l else ()) + tuple(states[l]) + tuple(res[k] for k in names[l])
                new_kept.append(tuple(ta.write(t, v) for ta, v in zip(kept[l], vals)))
            else:
                new_kept.append(())
        return t + 1, out_ta.write(t, outs[-1]), tuple(new_states), tuple(outs[:-1]), tuple(new_kept)

    _, out_ta, finals, _, kept = tf.while_loop(
        lambda t, *_: t < n_iter, body,
        (tf.constant(0, tf.int32), out_ta, tuple(tuple(s) for s in states), below, kept),
        maximum_iterations=n_iter)
    y = _stack(out_ta, n_iter, B, P, dtype)[L - 1:]
    if reverse:
        y = tf.reverse(y, [0])
    if not keep:
        return y, finals
    residuals = []
    for l, spec in enumerate(specs):
        wd = ([specs[l - 1].output_size] if l else []) + list(spec.state_sizes) + [_widths(spec)[k] for k in names[l]]
        got = tuple(_stack(ta, n_iter, B, w, dtype)[l:l + T] for ta, w in zip(kept[l], wd))
        residuals.append(((x,) if l == 0 else ()) + got)
    return y, finals, tuple(residuals)


def block_lstm_ok(spec: CellSpec, dtype, mask_kinds, jit: bool) -> bool:
    """Whether :func:`run_layer_block` can compute this layer: TensorFlow's fused
    ``BlockLSTM`` op (the kernel of TF1's ``LSTMBlockFusedCell``) implements LSTMCell's
    math with tanh, the forget bias and peepholes, float32 only; not clipping, projection
    or state masks."""
    return (spec.kind == "lstm" and spec.activation == "tanh" and dtype == tf.float32 and not spec.num_proj
            and spec.cell_clip is None and all(k is None for k in mask_kinds) and not jit)


def run_layer_block(spec: CellSpec, x, state, params, lengths, reverse, keep=False):
    """:func:`run_layer` for an LSTM layer as one ``BlockLSTM`` op: the whole time loop in
    one C++ kernel, no graph executor work per step (what small batches are bound by).

    The op has no per-row lengths: it runs ``max(lengths)`` steps for every row, and rows
    past their length are then ignored (outputs zeroed, final state gathered at the last
    valid step, and the backward pass masks those steps), which gives TF1's results since
    the steps before a row's length never depend on later ones.
    """
    dtype = x.dtype
    T, B = tf.shape(x)[0], tf.shape(x)[1]
    H = spec.num_units
    p = dict(zip(param_names(spec), params))
    rev = _reverser(lengths)
    if reverse:
        x = rev(x)
    c0, h0 = state
    if lengths is not None:
        n_steps = _steps_run(lengths, T)
    else:
        n_steps = T
    if spec.use_peepholes:
        wci, wcf, wco = p["w_i_diag"], p["w_f_diag"], p["w_o_diag"]
    else:
        wci = wcf = wco = tf.zeros([H], dtype)
    i, cs, f, o, ci, co, h = tf.raw_ops.BlockLSTM(
        seq_len_max=tf.cast(n_steps, tf.int64), x=x, cs_prev=c0, h_prev=h0, w=p["kernel"], wci=wci, wcf=wcf,
        wco=wco, b=p["bias"], forget_bias=float(spec.forget_bias), cell_clip=-1.0, use_peephole=spec.use_peepholes)
    last = lengths if lengths is not None else tf.fill([B], T)
    rows = tf.range(B)
    idx = tf.stack([tf.maximum(last - 1, 0), rows], axis=1)
    started = (last > 0)[:, None]
    final = (tf.where(started, tf.gather_nd(cs, idx), c0), tf.where(started, tf.gather_nd(h, idx), h0))
    y = h
    if lengths is not None:
        valid = (tf.range(T)[:, None] < lengths[None, :])[:, :, None]
        y = tf.where(valid, h, tf.zeros_like(h))
    if reverse:
        y = rev(y)
    if not keep:
        return y, final
    n = n_steps
    c_prev = tf.concat([c0[None], cs[: n - 1]], axis=0)[:n]
    h_prev = tf.concat([h0[None], h[: n - 1]], axis=0)[:n]
    res = {"si": i, "aj": ci, "sf": f, "so": o, "ac": co, "cn": cs}
    residuals = (x, c_prev, h_prev) + tuple(res[k][:n] for k in residual_names(spec))
    return y, final, residuals


def run_layer_backward(spec: CellSpec, params, lengths, masks, mask_kinds, reverse, residuals, dy, d_final,
                       chains=1, jit=False):
    """Backpropagation through time for :func:`run_layer` from its residuals.

    The loop runs backwards over the ``n`` steps the forward pass ran, computing only
    the recurrent part of each step's cotangent; the input gradient and every weight
    gradient are then formed as a few large matmuls over all steps at once.
    Returns ``(d_inputs [T, B, I], d_initial_state tuple, d_params tuple)``.
    """
    n_state = len(spec.state_sizes)
    xr = residuals[0]
    s_prev = residuals[1:1 + n_state]
    names = residual_names(spec)
    res = dict(zip(names, residuals[1 + n_state:]))
    dtype = xr.dtype
    T, B, n_in = tf.shape(xr)[0], tf.shape(xr)[1], tf.shape(xr)[2]
    n = tf.shape(s_prev[0])[0]
    p = dict(zip(param_names(spec), params))
    w = recurrent_weights(spec, p, n_in)
    fused = not jit and fused_backward_ok(spec, dtype)  # XLA has no kernels for the fused ops
    w = backward_weights(spec, w, dtype, fused)
    P = spec.output_size
    G = _gate_width(spec)
    rev = _reverser(lengths)
    if reverse:
        dy = rev(dy)
    has_proj = spec.kind == "lstm" and bool(spec.num_proj)
    ranges = _row_chains(B, chains)
    if reverse:
        masks = _reverse_masks(masks, mask_kinds, rev)

    def rows(a, lo, hi, axis=1):
        if chains == 1:
            return a
        return a[:, lo:hi] if axis == 1 else a[lo:hi]

    parts = []  # per chain: dy, step masks, length column, previous states, residuals
    for lo, hi in ranges:
        parts.append((
            rows(dy, lo, hi),
            _step_masks(tuple(rows(m, lo, hi) for m in masks), mask_kinds, False, rev, T, dtype),
            None if lengths is None else rows(lengths, lo, hi, axis=0)[:, None],
            tuple(rows(a, lo, hi) for a in s_prev),
            {k: rows(v, lo, hi) for k, v in res.items()},
        ))
    dz_tas = tuple(tf.TensorArray(dtype, size=n, element_shape=tf.TensorShape([None, G])) for _ in ranges)
    dmp_tas = tuple(tf.TensorArray(dtype, size=n, element_shape=tf.TensorShape([None, P])) if has_proj else ()
                    for _ in ranges)
    d_final_c = tuple(tuple(rows(d, lo, hi, axis=0) for d in d_final) for lo, hi in ranges)

    def body(t, dz_tas, dmp_tas, dss):
        new_dz, new_dmp, new_ds = [], [], []
        for c, (dy_c, step_masks, len_col, sp_c, res_c) in enumerate(parts):
            ds = dss[c]
            d_out = dy_c[t]
            d_new = list(ds)
            if len_col is not None:
                valid = t < len_col
                d_out = tf.where(valid, d_out, tf.zeros_like(d_out))
                d_new = [tf.where(valid, d, tf.zeros_like(d)) for d in d_new]
            for k, m in enumerate(step_masks):
                if m is not None:
                    d_new[k] = d_new[k] * _mask_value(m, t)
            state = tuple(a[t] for a in sp_c)
            r = {k: v[t] for k, v in res_c.items()}
            dz, d_prev, extra = step_backward(spec, w, r, state, d_out, tuple(d_new), fused)
            if len_col is not None:
                d_prev = [tf.where(valid, a, b) for a, b in zip(d_prev, ds)]
            new_dz.append(dz_tas[c].write(t, dz))
            new_dmp.append(dmp_tas[c].write(t, extra["dmp"]) if has_proj else ())
            new_ds.append(tuple(d_prev))
        return (t - 1, tuple(new_dz), tuple(new_dmp), tuple(new_ds))

    loop_vars = (n - 1, dz_tas, dmp_tas, d_final_c)
    _, dz_tas, dmp_tas, d_init_c = tf.while_loop(
        lambda t, *_: t >= 0, body, loop_vars, maximum_iterations=n, swap_memory=False
    )

    def gather(tas, width):
        return _join_rows(tas, n, ranges, width, dtype)

    d_init = [d_init_c[0][k] if chains == 1 else tf.concat([d[k] for d in d_init_c], axis=0)
              for k in range(n_state)]
    dZ = tf.reshape(gather(dz_tas, G), [-1, G])  # [n*B, G]
    X = tf.reshape(xr[:n], [-1, n_in])

    # input gradient: one matmul over all steps, zeros for the steps not run
    wx = input_weights(spec, p, n_in)[0]
    dx = tf.reshape(tf.matmul(dZ, tf.transpose(wx)), tf.stack([n, B, n_in]))
    dx = tf.concat([dx, tf.zeros(tf.stack([T - n, B, n_in]), dtype)], axis=0)
    if reverse:
        dx = rev(dx)

    widths = _widths(spec)
    Sp = [tf.reshape(a, [-1, wd]) for a, wd in zip(s_prev, spec.state_sizes)]
    res2 = {k: tf.reshape(v, [-1, widths[k]]) for k, v in res.items()}
    dMP = tf.reshape(gather(dmp_tas, P), [-1, P]) if has_proj else None
    return dx, tuple(d_init), _param_grads(spec, p, X, dZ, Sp, res2, dMP)


def run_stack_backward_wave(specs, params_list, reverse, residuals, dy, d_finals):
    """Backpropagation through time for :func:`run_stack_wave` (``keep=True``) as one
    wavefront loop backwards over the steps: at iteration ``k`` layer ``l`` runs the
    backward of its step ``T - 1 - k + (L - 1 - l)``, the top layer first, so an
    iteration's layer steps depend only on the iteration before and run side by side on
    the cores. A layer above the first hands the layer below the cotangent of its input at
    that step (one matmul a step, of its gate cotangents with its input weights); the first
    layer's input gradient and every weight gradient are then matmuls over all steps
    (:func:`_param_grads`), as in :func:`run_layer_backward`. Iterations where a layer has
    no step compute one on a clamped step and keep the old state cotangent
    (``tf.where``); their gate cotangents are dropped. ``residuals``, ``d_finals``: one
    entry per layer, as :func:`run_stack_wave` and :func:`run_layer_backward` take them.
    Returns ``(d_inputs [T, B, I], d_initial_states, d_params)``, the last two per layer."""
    L = len(specs)
    dtype = dy.dtype
    if reverse:
        dy = tf.reverse(dy, [0])
    T, B = tf.shape(dy)[0], tf.shape(dy)[1]
    layers = []  # per layer: p, n_in, fused, step weights, input weights, states, residuals
    for l, (spec, params, rs) in enumerate(zip(specs, params_list, residuals)):
        n_state = len(spec.state_sizes)
        n_in = tf.shape(rs[0])[2]
        p = dict(zip(param_names(spec), params))
        fused = fused_backward_ok(spec, dtype)
        w = backward_weights(spec, recurrent_weights(spec, p, n_in), dtype, fused)
        # the input weights transposed once (see backward_weights on transpose_b)
        layers.append((p, n_in, fused, w, tf.transpose(input_weights(spec, p, n_in)[0]), rs[1:1 + n_state],
                       dict(zip(residual_names(spec), rs[1 + n_state:]))))
    n_iter = tf.where(T > 0, T + L - 1, 0)
    has_proj = [spec.kind == "lstm" and bool(spec.num_proj) for spec in specs]
    dz_tas = tuple(tf.TensorArray(dtype, size=n_iter, element_shape=tf.TensorShape([None, _gate_width(spec)]))
                   for spec in specs)
    dmp_tas = tuple(tf.TensorArray(dtype, size=n_iter, element_shape=tf.TensorShape([None, spec.output_size]))
                    if proj else () for spec, proj in zip(specs, has_proj))
    # the cotangent of each lower layer's output at the step it runs next, from the layer above
    below = tuple(tf.zeros_like(d[-1]) for d in d_finals[:-1])

    def body(k, dz_tas, dmp_tas, dss, below):
        new_dz, new_dmp, new_ds, new_below = list(dz_tas), list(dmp_tas), list(dss), list(below)
        for l, spec in enumerate(specs):
            _, _, fused, w, wxT, s_prev, res = layers[l]
            t = T - 1 - k + (L - 1 - l)
            on = tf.logical_and(t >= 0, t < T)
            t = tf.clip_by_value(t, 0, T - 1)
            d_out = dy[t] if l == L - 1 else below[l]
            state = tuple(a[t] for a in s_prev)
            dz, d_prev, extra = step_backward(spec, w, {n: v[t] for n, v in res.items()}, state, d_out,
                                              tuple(dss[l]), fused)
            new_ds[l] = tuple(tf.where(on, a, b) for a, b in zip(d_prev, dss[l]))
            new_dz[l] = dz_tas[l].write(k, dz)
            if has_proj[l]:
                new_dmp[l] = dmp_tas[l].write(k, extra["dmp"])
            if l:
                new_below[l - 1] = tf.matmul(dz, wxT)
        return k + 1, tuple(new_dz), tuple(new_dmp), tuple(new_ds), tuple(new_below)

    _, dz_tas, dmp_tas, d_inits, _ = tf.while_loop(
        lambda k, *_: k < n_iter, body,
        (tf.constant(0, tf.int32), dz_tas, dmp_tas, tuple(tuple(d) for d in d_finals), below),
        maximum_iterations=n_iter)

    def in_steps(ta, l, width):
        # layer l's entries of iterations L - 1 - l ... L - 2 - l + T: its steps T - 1 ... 0
        return tf.reverse(_stack(ta, n_iter, B, width, dtype)[L - 1 - l:L - 1 - l + T], [0])

    dx, d_params = None, []
    for l, spec in enumerate(specs):
        p, n_in, _, _, wxT, s_prev, res = layers[l]
        G = _gate_width(spec)
        dZ = tf.reshape(in_steps(dz_tas[l], l, G), [-1, G])
        if l == 0:
            dx = tf.reshape(tf.matmul(dZ, wxT), tf.stack([T, B, n_in]))
        widths = _widths(spec)
        dMP = tf.reshape(in_steps(dmp_tas[l], l, spec.output_size), [-1, spec.output_size]) if has_proj[l] else None
        d_params.append(_param_grads(
            spec, p, tf.reshape(residuals[l][0], [-1, n_in]), dZ,
            [tf.reshape(a, [-1, wd]) for a, wd in zip(s_prev, spec.state_sizes)],
            {n: tf.reshape(v, [-1, widths[n]]) for n, v in res.items()}, dMP))
    if reverse:
        dx = tf.reverse(dx, [0])
    return dx, tuple(tuple(d) for d in d_inits), tuple(d_params)


def _param_grads(spec: CellSpec, p, X, dZ, Sp, res, dMP=None):
    """The weight gradients (in :func:`param_names` order) as a few matmuls over all the
    rows of all steps at once, from 2-D rows: the inputs ``X [N, I]``, the gate
    cotangents ``dZ [N, G]``, the state each step started from ``Sp`` (per component
    ``[N, S]``), the residuals ``res`` by name (``[N, w]``) and, with a projection, its
    cotangent ``dMP [N, P]``."""
    H = spec.num_units
    dXw = tf.matmul(X, dZ, transpose_a=True)  # [I, G]
    db = tf.reduce_sum(dZ, axis=0)
    grads = {}
    if spec.kind == "rnn":
        grads["kernel"] = tf.concat([dXw, tf.matmul(Sp[0], dZ, transpose_a=True)], axis=0)
        grads["bias"] = db
    elif spec.kind == "gru":
        dG, dC = dZ[:, : 2 * H], dZ[:, 2 * H :]
        Hp = Sp[0]
        RH = res["g"][:, :H] * Hp
        grads["gates/kernel"] = tf.concat([dXw[:, : 2 * H], tf.matmul(Hp, dG, transpose_a=True)], axis=0)
        grads["gates/bias"] = db[: 2 * H]
        grads["candidate/kernel"] = tf.concat([dXw[:, 2 * H :], tf.matmul(RH, dC, transpose_a=True)], axis=0)
        grads["candidate/bias"] = db[2 * H :]
    else:
        grads["kernel"] = tf.concat([dXw, tf.matmul(Sp[1], dZ, transpose_a=True)], axis=0)
        grads["bias"] = db
        if spec.use_peepholes:
            Cp = Sp[0]
            CN = res["cn"]
            grads["w_f_diag"] = tf.reduce_sum(dZ[:, 2 * H : 3 * H] * Cp, axis=0)
            grads["w_i_diag"] = tf.reduce_sum(dZ[:, :H] * Cp, axis=0)
            grads["w_o_diag"] = tf.reduce_sum(dZ[:, 3 * H :] * CN, axis=0)
        if spec.num_proj:
            grads["projection/kernel"] = tf.matmul(res["m_pre"], dMP, transpose_a=True)
    return tuple(grads[k] for k in param_names(spec))


def run_layer_backward_packed(spec: CellSpec, params, lengths, reverse, residuals, dy, d_final):
    """Backpropagation through time for :func:`run_layer_packed` (``keep=True``) on its
    packed layout: the loop runs backwards over the steps, each on its active rows only
    (a row's state cotangent waits, untouched, until the loop reaches its last step, where
    it receives the final state's cotangent), and the input gradient and the weight
    gradients are matmuls over the ``N`` valid rows (:func:`_param_grads`); the input
    gradient is scattered to ``[T, B, I]`` (zeros past each length). The same per-step
    arithmetic as :func:`run_layer_backward` on the valid rows (the fused cell-gradient
    ops where :func:`fused_backward_ok`). Returns ``(d_inputs, d_initial_state tuple,
    d_params tuple)``."""
    n_state = len(spec.state_sizes)
    names = residual_names(spec)
    xp = residuals[0]
    s_prev = residuals[1:1 + n_state]
    res = dict(zip(names, residuals[1 + n_state:]))
    dtype = xp.dtype
    T, B, n_in = tf.shape(dy)[0], tf.shape(dy)[1], tf.shape(xp)[1]
    order, undo, n_steps, counts, starts, pos = _packed_plan(lengths, T, B, reverse)
    p = dict(zip(param_names(spec), params))
    fused = fused_backward_ok(spec, dtype)
    w = backward_weights(spec, recurrent_weights(spec, p, n_in), dtype, fused)
    G, P = _gate_width(spec), spec.output_size
    has_proj = spec.kind == "lstm" and bool(spec.num_proj)
    dyp = tf.gather_nd(dy, pos)  # [N, P]
    dz_ta = tf.TensorArray(dtype, size=n_steps, element_shape=tf.TensorShape([None, G]), infer_shape=False)
    dmp_ta = tuple(tf.TensorArray(dtype, size=n_steps, element_shape=tf.TensorShape([None, P]), infer_shape=False)
                   for _ in range(int(has_proj)))

    def body(t, dz_ta, dmp_ta, ds):
        n, at = counts[t], starts[t]
        state = tuple(a[at:at + n] for a in s_prev)
        r = {k: v[at:at + n] for k, v in res.items()}
        dz, d_prev, extra = step_backward(spec, w, r, state, dyp[at:at + n], tuple(d[:n] for d in ds), fused)
        ds = tuple(tf.concat([a, b[n:]], axis=0) for a, b in zip(d_prev, ds))
        dmp_ta = tuple(ta.write(t, extra["dmp"]) for ta in dmp_ta)
        return t - 1, dz_ta.write(t, dz), dmp_ta, ds

    ds0 = tuple(tf.gather(d, order) for d in d_final)
    _, dz_ta, dmp_ta, d_init = tf.while_loop(lambda t, *_: t >= 0, body, (n_steps - 1, dz_ta, dmp_ta, ds0),
                                             maximum_iterations=n_steps)
    dZ = _packed_rows(dz_ta, n_steps, G, dtype)  # [N, G]
    wx = input_weights(spec, p, n_in)[0]
    dx = tf.scatter_nd(pos, tf.matmul(dZ, tf.transpose(wx)), tf.stack([T, B, n_in]))
    dMP = _packed_rows(dmp_ta[0], n_steps, P, dtype) if has_proj else None
    d_params = _param_grads(spec, p, xp, dZ, list(s_prev), res, dMP)
    return dx, tuple(tf.gather(d, undo) for d in d_init), d_params


class KernelCache:
    """The compiled functions keyed by configuration (each ``tf.function``'s one concrete
    function, :attr:`concrete`); counts traces."""

    #: Keep each compiled function as its one concrete function (traced when first made):
    #: calling a ``tf.function`` binds the nested arguments against its signature in Python
    #: first, ~0.35-0.7 ms a call on the 2-vCPU machines for a stack's states and weights,
    #: against ~0.3 ms for the concrete function's whole call of a trivial graph.
    concrete = True

    def __init__(self, tf_module=None):
        self._fns = {}
        self._lock = threading.Lock()
        self.trace_count = 0

    def _keep(self, key, fn):
        """Store (and return) the compiled function of ``key``: its concrete function, whose
        ``input_signature`` fixes the only one it has."""
        if self.concrete:
            fn = fn.get_concrete_function()
        with self._lock:
            self._fns[key] = fn
        return fn

    def clear(self):
        with self._lock:
            self._fns.clear()

    def _param_specs(self, spec, dtype):
        return tuple(
            tf.TensorSpec([None, None] if name.endswith("kernel") else [None], dtype) for name in param_names(spec)
        )

    @staticmethod
    def _state_specs(spec, dtype):
        return tuple(tf.TensorSpec([None, None], dtype) for _ in spec.state_sizes)

    def _extra_specs(self, dtype, has_lengths, mask_kinds):
        out = []
        if has_lengths:
            out.append(tf.TensorSpec([None], tf.int32))
        n_masks = sum(k is not None for k in mask_kinds)
        if n_masks:
            out.append(tuple(tf.TensorSpec([None, None, None], dtype) for _ in range(n_masks)))
        return out

    @staticmethod
    def _split_extra(rest, has_lengths, mask_kinds):
        rest = list(rest)
        lengths = rest.pop(0) if has_lengths else None
        masks = rest.pop(0) if any(k is not None for k in mask_kinds) else ()
        return lengths, masks

    def layer_fn(self, spec: CellSpec, dtype, has_lengths: bool, reverse: bool, mask_kinds, jit: bool,
                 keep: bool = False, block: bool = False, chains: int = 1, packed: bool = False):
        """The compiled layer: ``(x, state, params[, lengths][, masks]) -> (y, final)``,
        with ``keep`` ``-> (y, final, residuals)`` for :meth:`backward_fn`."""
        key = ("layer", spec, dtype, has_lengths, reverse, mask_kinds, jit, keep, block, chains, packed)
        fn = self._fns.get(key)
        if fn is not None:
            return fn
        signature = [
            tf.TensorSpec([None, None, None], dtype),
            self._state_specs(spec, dtype),
            self._param_specs(spec, dtype),
        ] + self._extra_specs(dtype, has_lengths, mask_kinds)

        def layer(x, state, params, *rest):
            self.trace_count += 1
            lengths, masks = self._split_extra(rest, has_lengths, mask_kinds)
            if packed:
                return run_layer_packed(spec, x, state, params, lengths, reverse, keep=keep)
            if block:
                return run_layer_block(spec, x, state, params, lengths, reverse, keep=keep)
            return run_layer(spec, x, state, params, lengths, masks, mask_kinds, reverse, full_length=jit, keep=keep,
                             chains=chains)

        fn = tf.function(layer, input_signature=signature, jit_compile=jit or None, autograph=False)
        return self._keep(key, fn)

    @staticmethod
    def _residual_specs(spec, dtype, packed):
        """The residuals of ``layer_fn(keep=True)``: ``[T, B, .]`` each, or ``[N, .]`` on the
        packed path."""
        n_res = 1 + len(spec.state_sizes) + len(residual_names(spec))
        return tuple(tf.TensorSpec([None, None] if packed else [None, None, None], dtype) for _ in range(n_res))

    def backward_fn(self, spec: CellSpec, dtype, has_lengths: bool, reverse: bool, mask_kinds, jit: bool,
                    chains: int = 1, packed: bool = False):
        """The compiled backward pass:
        ``(params[, lengths][, masks], residuals, dy, d_final) -> (dx, d_state0, d_params)``;
        ``packed``: of ``layer_fn(keep=True, packed=True)`` (:func:`run_layer_backward_packed`)."""
        key = ("backward", spec, dtype, has_lengths, reverse, mask_kinds, jit, chains, packed)
        fn = self._fns.get(key)
        if fn is not None:
            return fn
        signature = [self._param_specs(spec, dtype)] + self._extra_specs(dtype, has_lengths, mask_kinds) + [
            self._residual_specs(spec, dtype, packed),
            tf.TensorSpec([None, None, None], dtype),
            self._state_specs(spec, dtype),
        ]

        def backward(params, *rest):
            self.trace_count += 1
            residuals, dy, d_final = rest[-3:]
            lengths, masks = self._split_extra(rest[:-3], has_lengths, mask_kinds)
            if packed:
                return run_layer_backward_packed(spec, params, lengths, reverse, residuals, dy, d_final)
            return run_layer_backward(spec, params, lengths, masks, mask_kinds, reverse, residuals, dy, d_final,
                                      chains=chains, jit=jit)

        fn = tf.function(backward, input_signature=signature, jit_compile=jit or None, autograph=False)
        return self._keep(key, fn)

    @staticmethod
    def _check_wave(name, wave, layers, has_lengths, jit):
        if wave and (has_lengths or jit or len(layers) < 2 or any(block for _, block, _ in layers)):
            raise ValueError(f"{name}: wave is for stacks of two or more generic layers without lengths or XLA")

    def stack_fn(self, layers, dtype, has_lengths: bool, reverse: bool, jit: bool, keep: bool = False,
                 packed: bool = False, wave: bool = False):
        """A MultiRNNCell of plain layers as one compiled call:
        ``(x, states, params[, lengths]) -> (y, finals)`` (``keep``: ``-> (y, finals,
        residuals)``), states, params, finals and residuals one entry per layer.

        ``layers``: per layer ``(spec, block, chains)``, the path :meth:`layer_fn` runs it
        on (``packed`` applies to the layers that are not ``block``). The layers' own
        compiled functions are called inside this one, so a call is one dispatch. With
        ``wave`` (no lengths, no XLA, two or more layers none of them ``block``) the stack
        is instead one wavefront loop (:func:`run_stack_wave`; its ``chains`` are unused)."""
        self._check_wave("stack_fn", wave, layers, has_lengths, jit)
        key = ("stack", layers, dtype, has_lengths, reverse, jit, keep, packed, wave)
        fn = self._fns.get(key)
        if fn is not None:
            return fn
        fns = [] if wave else [
            self.layer_fn(spec, dtype, has_lengths, reverse, (None,) * len(spec.state_sizes), jit, keep=keep,
                          block=block, chains=chains, packed=packed and not block)
            for spec, block, chains in layers]
        signature = [
            tf.TensorSpec([None, None, None], dtype),
            tuple(self._state_specs(spec, dtype) for spec, _, _ in layers),
            tuple(self._param_specs(spec, dtype) for spec, _, _ in layers),
        ] + self._extra_specs(dtype, has_lengths, ())

        def stack(x, states, params, *lengths):
            self.trace_count += 1
            if wave:
                return run_stack_wave([spec for spec, _, _ in layers], x, states, params, reverse, keep=keep)
            finals, residuals = [], []
            for layer, st, pl in zip(fns, states, params):
                out = layer(x, st, pl, *lengths)
                x = out[0]
                finals.append(tuple(out[1]))
                if keep:
                    residuals.append(tuple(out[2]))
            return (x, tuple(finals), tuple(residuals)) if keep else (x, tuple(finals))

        fn = tf.function(stack, input_signature=signature, autograph=False)
        return self._keep(key, fn)

    def stack_backward_fn(self, layers, dtype, has_lengths: bool, reverse: bool, jit: bool, packed: bool = False,
                          wave: bool = False):
        """The backward pass of :meth:`stack_fn` (``keep=True``, the same ``packed``), one
        compiled call: ``(params[, lengths], residuals, dy, d_finals) -> (dx, d_states,
        d_params)``, the last three per layer but ``dx``. ``wave`` (the same conditions as
        :meth:`stack_fn`'s): one wavefront loop (:func:`run_stack_backward_wave`) instead
        of the layers' backward passes in turn; it takes the residuals of either forward."""
        self._check_wave("stack_backward_fn", wave, layers, has_lengths, jit)
        key = ("stack_backward", layers, dtype, has_lengths, reverse, jit, packed, wave)
        fn = self._fns.get(key)
        if fn is not None:
            return fn
        fns = [] if wave else [
            self.backward_fn(spec, dtype, has_lengths, reverse, (None,) * len(spec.state_sizes), jit,
                             chains=chains, packed=packed and not block)
            for spec, block, chains in layers]
        signature = [tuple(self._param_specs(spec, dtype) for spec, _, _ in layers)] \
            + self._extra_specs(dtype, has_lengths, ()) + [
            tuple(self._residual_specs(spec, dtype, packed and not block) for spec, block, _ in layers),
            tf.TensorSpec([None, None, None], dtype),
            tuple(self._state_specs(spec, dtype) for spec, _, _ in layers),
        ]

        def backward(params, *rest):
            self.trace_count += 1
            residuals, dy, d_finals = rest[-3:]
            lengths = rest[:-3]
            if wave:
                return run_stack_backward_wave([spec for spec, _, _ in layers], params, reverse, residuals, dy,
                                               d_finals)
            d_states, d_params = [None] * len(fns), [None] * len(fns)
            for k in range(len(fns) - 1, -1, -1):
                dy, d_states[k], d_params[k] = fns[k](params[k], *lengths, residuals[k], dy, d_finals[k])
            return dy, tuple(tuple(d) for d in d_states), tuple(tuple(d) for d in d_params)

        fn = tf.function(backward, input_signature=signature, autograph=False)
        return self._keep(key, fn)

    def step_fn(self, spec: CellSpec, dtype, jit: bool):
        key = ("step", spec, dtype, jit)
        fn = self._fns.get(key)
        if fn is not None:
            return fn
        signature = [
            tf.TensorSpec([None, None], dtype),
            self._state_specs(spec, dtype),
            self._param_specs(spec, dtype),
        ]

        def one_step(x, state, params):
            self.trace_count += 1
            p = dict(zip(param_names(spec), params))
            xw = project_inputs(spec, p, x)
            out, new_state, _ = step(spec, recurrent_weights(spec, p, tf.shape(x)[1]), xw, tuple(state))
            return out, new_state

        fn = tf.function(one_step, input_signature=signature, jit_compile=jit or None, autograph=False)
        return self._keep(key, fn)
