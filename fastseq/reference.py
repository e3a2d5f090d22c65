"""The numpy backend: the reference every other backend is held to.

Written to be obviously right, not fast: one Python iteration per time step, every padded
step computed and then discarded with ``np.where`` (exactly TF1's ``_rnn_step``), reverse
runs done by copying with ``reverse_sequence``, and backpropagation through time written
out step by step from the forward math in :mod:`fastseq.contract`.
"""

from __future__ import annotations

import numpy as np

from . import activations as act_mod
from .contract import Backend, CellSpec

__all__ = ["NumpyBackend", "NumpyArrayOps", "reverse_sequence_tm"]

_sig = act_mod.sigmoid


def reverse_sequence_tm(x, lengths):
    """Reverse ``x [T, B, ...]`` along time within each row's length (a copy)."""
    out = np.array(x, copy=True)
    for b, n in enumerate(lengths):
        n = int(n)
        if n > 0:
            out[:n, b] = x[:n, b][::-1]
    return out


# --------------------------------------------------------------------------- one step
def _step(spec: CellSpec, p, x, state):
    """One step. Returns (output, new_state tuple, cache for _step_backward)."""
    act = spec.activation
    if spec.kind == "rnn":
        (h,) = state
        xh = np.concatenate([x, h], axis=1)
        z = xh @ p["kernel"] + p["bias"]
        hn = act_mod.forward(act, z)
        return hn, (hn,), (xh, z, hn)
    if spec.kind == "gru":
        (h,) = state
        H = spec.num_units
        xh = np.concatenate([x, h], axis=1)
        g = _sig(xh @ p["gates/kernel"] + p["gates/bias"])
        r, u = g[:, :H], g[:, H:]
        xrh = np.concatenate([x, r * h], axis=1)
        zc = xrh @ p["candidate/kernel"] + p["candidate/bias"]
        c = act_mod.forward(act, zc)
        hn = u * h + (1 - u) * c
        return hn, (hn,), (h, xh, g, xrh, zc, c)
    if spec.kind == "lstm":
        c, h = state
        H = spec.num_units
        xh = np.concatenate([x, h], axis=1)
        z = xh @ p["kernel"] + p["bias"]
        i, j, f, o = z[:, :H], z[:, H : 2 * H], z[:, 2 * H : 3 * H], z[:, 3 * H :]
        fi = f + spec.forget_bias
        ii = i
        if spec.use_peepholes:
            fi = fi + p["w_f_diag"] * c
            ii = ii + p["w_i_diag"] * c
        sf, si, aj = _sig(fi), _sig(ii), act_mod.forward(act, j)
        cn_pre = sf * c + si * aj
        cn = np.clip(cn_pre, -spec.cell_clip, spec.cell_clip) if spec.cell_clip is not None else cn_pre
        oo = o + p["w_o_diag"] * cn if spec.use_peepholes else o
        so, ac = _sig(oo), act_mod.forward(act, cn)
        m_pre = so * ac
        mp = m = m_pre
        if spec.num_proj:
            mp = m_pre @ p["projection/kernel"]
            m = np.clip(mp, -spec.proj_clip, spec.proj_clip) if spec.proj_clip is not None else mp
        return m, (cn, m), (c, xh, j, sf, si, aj, cn_pre, cn, so, ac, m_pre, mp)
    raise ValueError(f"unknown cell kind {spec.kind!r}")


def _step_backward(spec: CellSpec, p, cache, d_out, d_state, grads):
    """Backward of one step. ``d_out`` and ``d_state`` are cotangents of the step's output
    and new state. Accumulates parameter gradients into ``grads``; returns (dx, d_state_prev)."""
    act = spec.activation
    if spec.kind == "rnn":
        xh, z, hn = cache
        dz = (d_out + d_state[0]) * act_mod.derivative(act, z, hn)
        grads["kernel"] += xh.T @ dz
        grads["bias"] += dz.sum(axis=0)
        dxh = dz @ p["kernel"].T
        n_in = xh.shape[1] - spec.num_units
        return dxh[:, :n_in], (dxh[:, n_in:],)
    if spec.kind == "gru":
        h, xh, g, xrh, zc, c = cache
        H = spec.num_units
        n_in = xh.shape[1] - H
        r, u = g[:, :H], g[:, H:]
        dhn = d_out + d_state[0]
        du = dhn * (h - c)
        dh = dhn * u
        dzc = dhn * (1 - u) * act_mod.derivative(act, zc, c)
        grads["candidate/kernel"] += xrh.T @ dzc
        grads["candidate/bias"] += dzc.sum(axis=0)
        dxrh = dzc @ p["candidate/kernel"].T
        dx = dxrh[:, :n_in]
        drh = dxrh[:, n_in:]
        dr = drh * h
        dh = dh + drh * r
        dg = np.concatenate([dr, du], axis=1) * g * (1 - g)
        grads["gates/kernel"] += xh.T @ dg
        grads["gates/bias"] += dg.sum(axis=0)
        dxh = dg @ p["gates/kernel"].T
        return dx + dxh[:, :n_in], (dh + dxh[:, n_in:],)
    if spec.kind == "lstm":
        c, xh, j, sf, si, aj, cn_pre, cn, so, ac, m_pre, mp = cache
        H = spec.num_units
        n_in = xh.shape[1] - spec.output_size
        dc_in, dm_state = d_state
        dm = d_out + dm_state
        if spec.num_proj:
            dmp = dm * (np.abs(mp) <= spec.proj_clip) if spec.proj_clip is not None else dm
            grads["projection/kernel"] += m_pre.T @ dmp
            dm_pre = dmp @ p["projection/kernel"].T
        else:
            dm_pre = dm
        dso = dm_pre * ac
        dcn = dc_in + dm_pre * so * act_mod.derivative(act, cn, ac)
        doo = dso * so * (1 - so)
        if spec.use_peepholes:
            dcn = dcn + doo * p["w_o_diag"]
            grads["w_o_diag"] += (doo * cn).sum(axis=0)
        dcn_pre = dcn * (np.abs(cn_pre) <= spec.cell_clip) if spec.cell_clip is not None else dcn
        dc = dcn_pre * sf
        dfi = dcn_pre * c * sf * (1 - sf)
        dii = dcn_pre * aj * si * (1 - si)
        dj = dcn_pre * si * act_mod.derivative(act, j, aj)
        if spec.use_peepholes:
            dc = dc + dfi * p["w_f_diag"] + dii * p["w_i_diag"]
            grads["w_f_diag"] += (dfi * c).sum(axis=0)
            grads["w_i_diag"] += (dii * c).sum(axis=0)
        dz = np.concatenate([dii, dj, dfi, doo], axis=1)
        grads["kernel"] += xh.T @ dz
        grads["bias"] += dz.sum(axis=0)
        dxh = dz @ p["kernel"].T
        return dxh[:, :n_in], (dc, dxh[:, n_in:])
    raise ValueError(f"unknown cell kind {spec.kind!r}")


def _mask_at(mask, t):
    return mask[t] if mask.shape[0] > 1 else mask[0]


class NumpyArrayOps:
    """The contract's array ops on NumPy arrays, for every backend whose arrays live on the
    host (numpy, numba, a third party's CPU backend): inherit it next to ``Backend``."""

    def asarray(self, x, dtype=None):
        return np.asarray(x, dtype=dtype)

    def to_numpy(self, x):
        return np.asarray(x)

    def is_native(self, x):
        return isinstance(x, np.ndarray)

    def zeros(self, shape, dtype):
        return np.zeros(shape, dtype=dtype)

    def swap_batch_time(self, x):
        return np.ascontiguousarray(np.swapaxes(x, 0, 1))

    def stack(self, xs, axis=0):
        return np.stack(xs, axis=axis)

    def unstack(self, x, axis=0):
        return [np.ascontiguousarray(a) for a in np.moveaxis(x, axis, 0)]

    def concat(self, xs, axis):
        return np.concatenate(xs, axis=axis)

    def split(self, x, sizes, axis):
        return np.split(x, np.cumsum(sizes)[:-1], axis=axis)

    def where_rows(self, cond, a, b):
        cond = np.asarray(cond, dtype=bool).reshape((-1,) + (1,) * (np.ndim(a) - 1))
        return np.where(cond, a, b)

    def sequence_mask(self, lengths, maxlen, dtype):
        t = np.arange(maxlen)[:, None, None]
        return (t < np.asarray(lengths)[None, :, None]).astype(dtype)

    def read_param(self, stored, dtype):
        arr = np.asarray(stored)
        return arr if arr.dtype == dtype else arr.astype(dtype)


class NumpyBackend(NumpyArrayOps, Backend):
    """Plain NumPy, forward and backward. Always installed; the test oracle."""

    name = "numpy"

    # ------------------------------------------------------------ recurrent ops
    def cell_step(self, spec, params, inputs, state):
        out, new_state, _ = _step(spec, params, inputs, tuple(state))
        return out, new_state

    def layer_forward(self, spec, params, inputs, initial_state, sequence_length=None, reverse=False, state_mask=None, need_grad=False):
        x = np.asarray(inputs)
        T, B = x.shape[0], x.shape[1]
        lengths = np.full(B, T, dtype=np.int64) if sequence_length is None else np.asarray(sequence_length, dtype=np.int64)
        masks = tuple(state_mask) if state_mask is not None else (None,) * len(initial_state)
        if reverse:
            x = reverse_sequence_tm(x, lengths)
            masks = tuple(m if (m is None or m.shape[0] == 1) else reverse_sequence_tm(m, lengths) for m in masks)
        state = tuple(np.asarray(s) for s in initial_state)
        P = spec.output_size
        y = np.zeros((T, B, P), dtype=x.dtype)
        caches, actives = [], []
        for t in range(T):
            out, new_state, cache = _step(spec, params, x[t], state)
            new_state = tuple(s if m is None else s * _mask_at(m, t) for s, m in zip(new_state, masks))
            active = (t < lengths)[:, None]
            state = tuple(np.where(active, sn, so) for sn, so in zip(new_state, state))
            y[t] = np.where(active, out, 0)
            if need_grad:
                caches.append(cache)
                actives.append(active)
        if reverse:
            y = reverse_sequence_tm(y, lengths)
        ws = (caches, actives, masks, lengths, reverse, x.shape) if need_grad else None
        return y, state, ws

    def layer_backward(self, spec, params, workspace, d_outputs, d_final_state):
        caches, actives, masks, lengths, reverse, xshape = workspace
        dy = np.asarray(d_outputs)
        if reverse:
            dy = reverse_sequence_tm(dy, lengths)
        grads = {k: np.zeros_like(v) for k, v in params.items()}
        dx = np.zeros(xshape, dtype=dy.dtype)
        ds = tuple(np.array(d, dtype=dy.dtype) for d in d_final_state)
        for t in range(xshape[0] - 1, -1, -1):
            active = actives[t]
            d_out = np.where(active, dy[t], 0)
            d_new = tuple(np.where(active, d, 0) for d in ds)
            d_new = tuple(d if m is None else d * _mask_at(m, t) for d, m in zip(d_new, masks))
            dxt, d_prev = _step_backward(spec, params, caches[t], d_out, d_new, grads)
            dx[t] = dxt
            ds = tuple(dp + np.where(active, 0, d) for dp, d in zip(d_prev, ds))
        if reverse:
            dx = reverse_sequence_tm(dx, lengths)
        return dx, ds, grads
