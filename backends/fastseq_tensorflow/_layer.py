"""Glue from the backend contract to the compiled kernels of :mod:`._kernels`.

Converts arguments to tensors (NumPy in is fine; the drivers convert results back),
picks the compiled function for the configuration and the path (BlockLSTM, half-batch
chains, shrinking batch), and for ``need_grad=True`` keeps the forward pass's residuals
in a workspace that :func:`layer_backward` hands to the compiled backward pass. Under a
GradientTape the two are joined by ``tf.custom_gradient``.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from fastseq import threads as _threads

from . import _kernels as kernels_mod
from ._kernels import param_names


class _Workspace:
    """What :func:`layer_backward` needs: the compiled backward pass and its arguments."""

    __slots__ = ("backward", "extra", "residuals", "params", "n_state")

    def __init__(self, backward, extra, residuals, params, n_state):
        self.backward, self.extra, self.residuals = backward, extra, residuals
        self.params, self.n_state = params, n_state


try:  # which tensors an active GradientTape (or graph-mode gradient) would record
    from tensorflow.python.eager import record as _record

    def _recording(tensors):
        return _record.should_record_backprop(tensors)
except Exception:  # pragma: no cover - private module moved: always take the differentiable path
    def _recording(tensors):
        return True


def _float_dtype(backend, x, argname):
    if not x.dtype.is_floating:
        raise TypeError(f"{argname} must be float32 or float64, got {x.dtype.name}")
    return x.dtype


def _params_tuple(backend, spec, params, dtype):
    missing = [n for n in param_names(spec) if n not in params]
    if missing:
        raise ValueError(f"params for a {spec.kind} cell is missing {missing}; got {sorted(params)}")
    return tuple(tf.convert_to_tensor(backend.read_param(params[n], dtype)) for n in param_names(spec))


def _mask_config(state_mask, n_state, T, dtype, backend):
    """(mask_kinds tuple, list of mask tensors) from the contract's ``state_mask``."""
    if state_mask is None:
        return (None,) * n_state, []
    if len(state_mask) != n_state:
        raise ValueError(f"state_mask must have {n_state} entries (one per state component), got {len(state_mask)}")
    kinds, tensors = [], []
    for m in state_mask:
        if m is None:
            kinds.append(None)
            continue
        m = backend.asarray(m, dtype)
        if m.shape.rank != 3:
            raise ValueError(f"state_mask entries must be [T, B, S] or [1, B, S], got shape {m.shape}")
        tm = m.shape[0]
        if tm is None:
            tm = int(tf.shape(m)[0])
        kinds.append("const" if tm == 1 and T != 1 else "seq")
        tensors.append(m)
    return tuple(kinds), tensors


def layer_forward(backend, spec, params, inputs, initial_state, sequence_length, reverse, state_mask, need_grad):
    x = backend.asarray(inputs)
    dtype = _float_dtype(backend, x, "inputs")
    if x.shape.rank != 3:
        raise ValueError(f"inputs must be [T, B, I] (rank 3), got shape {x.shape}")
    state = tuple(backend.asarray(s, dtype) for s in initial_state)
    if len(state) != len(spec.state_sizes):
        raise ValueError(f"initial_state must have {len(spec.state_sizes)} components for a {spec.kind} cell, "
                         f"got {len(state)}")
    plist = _params_tuple(backend, spec, params, dtype)
    T = x.shape[0] if x.shape[0] is not None else int(tf.shape(x)[0])
    extra = []
    has_lengths = sequence_length is not None
    if has_lengths:
        lengths = sequence_length
        if isinstance(lengths, (tf.Tensor, tf.Variable)):
            lengths = tf.cast(lengths, tf.int32)
        else:
            lengths = tf.convert_to_tensor(np.asarray(lengths, dtype=np.int32))
        extra.append(lengths)
    kinds, masks = _mask_config(state_mask, len(state), T, dtype, backend)
    if masks:
        extra.append(tuple(masks))
    jit = bool(backend.jit_compile)
    config = (spec, dtype, has_lengths, bool(reverse), kinds, jit)
    kernels = backend._kernels
    B = x.shape[1]
    block = (B is not None and B <= backend.block_lstm_max_batch
             and kernels_mod.block_lstm_ok(spec, dtype, kinds, jit))
    # Two half-batch chains need two cores: not when this call already runs beside
    # another layer (the directions of a bidirectional RNN each get a share of one).
    chains = 2 if (not block and backend.split_rows_min and B is not None and B >= backend.split_rows_min
                   and _threads.get_num_threads() >= 2) else 1
    if need_grad:
        # fastseq.vjp: the forward pass keeps its residuals; the backward pass is a second
        # compiled function (hand-written BPTT), no GradientTape involved.
        y, final, res = kernels.layer_fn(*config, keep=True, block=block, chains=chains)(x, state, plist, *extra)
        ws = _Workspace(kernels.backward_fn(*config, chains=chains), tuple(extra), res, plist, len(state))
        return y, tuple(final), ws
    if _recording([x, *state, *plist]):
        # A GradientTape (or tf.gradients) is watching: the same two compiled functions,
        # joined by tf.custom_gradient.
        y, final = _differentiable_call(kernels.layer_fn(*config, keep=True, block=block, chains=chains), kernels.backward_fn(*config, chains=chains),
                                        x, state, plist, tuple(extra))
        return y, final, None
    if has_lengths and not masks and not jit and not block and backend.shrink_batch:
        # forward only: finished rows drop out of the computation
        y, final = kernels.layer_fn(*config, packed=True)(x, state, plist, *extra)
        return y, tuple(final), None
    y, final = kernels.layer_fn(*config, block=block, chains=chains)(x, state, plist, *extra)
    return y, tuple(final), None


def _differentiable_call(fwd, bwd, x, state, plist, extra):
    n_state = len(state)

    @tf.custom_gradient
    def call(x, *flat):
        st, pl = tuple(flat[:n_state]), tuple(flat[n_state:])
        y, final, res = fwd(x, st, pl, *extra)
        outs = (y, *final)

        def grad(*upstream):
            up = [tf.zeros_like(o) if u is None else u for u, o in zip(upstream, outs)]
            dx, d0, dp = bwd(pl, *extra, res, up[0], tuple(up[1:]))
            return [dx, *d0, *dp]

        return outs, grad

    y, *final = call(x, *state, *plist)
    return y, tuple(final)


def layer_backward(backend, spec, params, workspace, d_outputs, d_final_state):
    ws = workspace
    dtype = ws.residuals[0].dtype
    dy = backend.asarray(d_outputs, dtype)
    ds = tuple(backend.asarray(d, dtype) for d in d_final_state)
    d_inputs, d_state, d_params = ws.backward(ws.params, *ws.extra, ws.residuals, dy, ds)
    return d_inputs, tuple(d_state), dict(zip(param_names(spec), d_params))


def cell_step(backend, spec, params, inputs, state):
    x = backend.asarray(inputs)
    dtype = _float_dtype(backend, x, "inputs")
    if x.shape.rank != 2:
        raise ValueError(f"inputs must be [B, I] (rank 2), got shape {x.shape}")
    st = tuple(backend.asarray(s, dtype) for s in state)
    plist = _params_tuple(backend, spec, params, dtype)
    fn = backend._kernels.step_fn(spec, dtype, bool(backend.jit_compile))
    out, new_state = fn(x, st, plist)
    return out, tuple(new_state)
