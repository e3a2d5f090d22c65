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


def _inputs(backend, inputs):
    x = backend.asarray(inputs)
    dtype = _float_dtype(backend, x, "inputs")
    if x.shape.rank != 3:
        raise ValueError(f"inputs must be [T, B, I] (rank 3), got shape {x.shape}")
    return x, dtype


def _state(backend, spec, initial_state, dtype, argname="initial_state"):
    state = tuple(backend.asarray(s, dtype) for s in initial_state)
    if len(state) != len(spec.state_sizes):
        raise ValueError(f"{argname} must have {len(spec.state_sizes)} components for a {spec.kind} cell, "
                         f"got {len(state)}")
    return state


def _lengths_extra(sequence_length):
    """``[lengths int32 tensor]`` or ``[]``: the optional argument of the compiled functions."""
    if sequence_length is None:
        return []
    if isinstance(sequence_length, (tf.Tensor, tf.Variable)):
        return [tf.cast(sequence_length, tf.int32)]
    return [tf.convert_to_tensor(np.asarray(sequence_length, dtype=np.int32))]


def _plan(backend, spec, dtype, B, kinds, jit):
    """``(block, chains)``: whether the layer runs as the fused BlockLSTM op, and in how
    many independent row chains the generic loop runs."""
    block = (B is not None and B <= backend.block_lstm_max_batch
             and kernels_mod.block_lstm_ok(spec, dtype, kinds, jit))
    # Two half-batch chains need two cores: not when this call already runs beside
    # another layer (the directions of a bidirectional RNN each get a share of one).
    chains = 2 if (not block and backend.split_rows_min and B is not None and B >= backend.split_rows_min
                   and _threads.get_num_threads() >= 2) else 1
    return block, chains


def _pack_for_training(backend, sequence_length, T, B, chains):
    """Whether training with lengths takes the packed path (sorted rows, shrinking batch):
    always where the loop would run one row chain; beside two chains (whose products run
    side by side on two cores, the packed loop has one) only where the lengths cover at
    most ``backend.packed_training_max_fill`` of the ``[T, B]`` steps, or where they are
    not known here (symbolic)."""
    if chains == 1:
        return True
    lens = tf.get_static_value(sequence_length) if tf.is_tensor(sequence_length) else sequence_length
    if lens is None or T is None or B is None:
        return True
    if not T or not B:
        return True
    covered = float(np.clip(np.asarray(lens, dtype=np.int64), 0, T).sum())
    return covered <= backend.packed_training_max_fill * T * B


def layer_forward(backend, spec, params, inputs, initial_state, sequence_length, reverse, state_mask, need_grad):
    x, dtype = _inputs(backend, inputs)
    state = _state(backend, spec, initial_state, dtype)
    plist = _params_tuple(backend, spec, params, dtype)
    T = x.shape[0] if x.shape[0] is not None else int(tf.shape(x)[0])
    extra = _lengths_extra(sequence_length)
    has_lengths = bool(extra)
    kinds, masks = _mask_config(state_mask, len(state), T, dtype, backend)
    if masks:
        extra.append(tuple(masks))
    jit = bool(backend.jit_compile)
    config = (spec, dtype, has_lengths, bool(reverse), kinds, jit)
    kernels = backend._kernels
    block, chains = _plan(backend, spec, dtype, x.shape[1], kinds, jit)
    # finished rows drop out of the computation (forward; training where that pays)
    packed = has_lengths and not masks and not jit and not block and backend.shrink_batch
    recording = not need_grad and _recording([x, *state, *plist])
    if packed and (need_grad or recording):
        packed = _pack_for_training(backend, sequence_length, T, x.shape[1], chains)
    if need_grad:
        # fastseq.vjp: the forward pass keeps its residuals; the backward pass is a second
        # compiled function (hand-written BPTT), no GradientTape involved.
        y, final, res = kernels.layer_fn(*config, keep=True, block=block, chains=chains, packed=packed)(
            x, state, plist, *extra)
        ws = _Workspace(kernels.backward_fn(*config, chains=chains, packed=packed), tuple(extra), res, plist,
                        len(state))
        return y, tuple(final), ws
    if recording:
        # A GradientTape (or tf.gradients) is watching: the same two compiled functions,
        # joined by tf.custom_gradient.
        y, final = _differentiable_call(kernels.layer_fn(*config, keep=True, block=block, chains=chains, packed=packed),
                                        kernels.backward_fn(*config, chains=chains, packed=packed), x, state, plist,
                                        tuple(extra))
        return y, final, None
    if packed:
        y, final = kernels.layer_fn(*config, packed=True)(x, state, plist, *extra)
        return y, tuple(final), None
    y, final = kernels.layer_fn(*config, block=block, chains=chains)(x, state, plist, *extra)
    return y, tuple(final), None


def stack_forward(backend, specs, params_list, inputs, initial_states, sequence_length, reverse, need_grad):
    """A MultiRNNCell of plain layers as one compiled call (see :meth:`TensorFlowBackend.stack_forward`).

    Each layer takes the path :func:`layer_forward` would give it; the layers' compiled
    functions are called inside one ``tf.function``, so the call costs one dispatch
    instead of one per layer, and the backward pass is one compiled call as well."""
    x, dtype = _inputs(backend, inputs)
    if len(initial_states) != len(specs):
        raise ValueError(f"initial_states must have one entry per layer ({len(specs)}), got {len(initial_states)}")
    states = tuple(_state(backend, spec, st, dtype, f"initial_states[{k}]")
                   for k, (spec, st) in enumerate(zip(specs, initial_states)))
    plists = tuple(_params_tuple(backend, spec, p, dtype) for spec, p in zip(specs, params_list))
    extra = tuple(_lengths_extra(sequence_length))
    jit = bool(backend.jit_compile)
    kernels = backend._kernels
    layers = tuple((spec,) + _plan(backend, spec, dtype, x.shape[1], (None,) * len(spec.state_sizes), jit)
                   for spec in specs)
    config = (layers, dtype, bool(extra), bool(reverse), jit)
    # one wavefront loop for the whole stack (the layers' steps side by side instead of
    # each layer's row chains), forward and (``backend.wave_backward``) backward
    wave = (not extra and not jit and len(specs) >= 2 and not any(block for _, block, _ in layers)
            and max(spec.num_units for spec in specs) <= backend.wave_max_units)
    bwave = wave and backend.wave_backward
    # the layers not on BlockLSTM sort and shrink the batch where there are lengths
    packed = bool(extra) and not jit and backend.shrink_batch
    flat_states = tuple(a for st in states for a in st)
    recording = not need_grad and _recording([x, *flat_states, *(p for pl in plists for p in pl)])
    if packed and (need_grad or recording):
        packed = _pack_for_training(backend, sequence_length, x.shape[0], x.shape[1],
                                    max(chains for _, _, chains in layers))
    if need_grad:
        y, finals, res = kernels.stack_fn(*config, keep=True, packed=packed, wave=wave)(x, states, plists, *extra)
        ws = _Workspace(kernels.stack_backward_fn(*config, packed=packed, wave=bwave), extra, res, plists, None)
        return y, _tuples(finals), ws
    if recording:
        y, finals = _differentiable_call(kernels.stack_fn(*config, keep=True, packed=packed, wave=wave),
                                         kernels.stack_backward_fn(*config, packed=packed, wave=bwave), x, states, plists, extra)
        return y, _tuples(finals), None
    y, finals = kernels.stack_fn(*config, packed=packed, wave=wave)(x, states, plists, *extra)
    return y, _tuples(finals), None


def _tuples(finals):
    return tuple(tuple(f) for f in finals)


def stack_backward(backend, specs, params_list, workspace, d_outputs, d_final_states):
    ws = workspace
    dtype = ws.residuals[0][0].dtype
    dy = backend.asarray(d_outputs, dtype)
    ds = tuple(tuple(backend.asarray(d, dtype) for d in df) for df in d_final_states)
    d_inputs, d_states, d_params = ws.backward(ws.params, *ws.extra, ws.residuals, dy, ds)
    return (d_inputs, _tuples(d_states),
            [dict(zip(param_names(spec), dp)) for spec, dp in zip(specs, d_params)])


def _differentiable_call(fwd, bwd, x, state, plist, extra):
    """``fwd``/``bwd`` joined by ``tf.custom_gradient``; ``state`` and ``plist`` may be
    nested (per layer for a stack); the final state comes back in ``state``'s structure."""
    flat_state, flat_params = tf.nest.flatten(state), tf.nest.flatten(plist)
    n_state = len(flat_state)

    @tf.custom_gradient
    def call(x, *flat):
        st = tf.nest.pack_sequence_as(state, list(flat[:n_state]))
        pl = tf.nest.pack_sequence_as(plist, list(flat[n_state:]))
        y, final, res = fwd(x, st, pl, *extra)
        outs = (y, *tf.nest.flatten(final))

        def grad(*upstream):
            up = [tf.zeros_like(o) if u is None else u for u, o in zip(upstream, outs)]
            dx, d0, dp = bwd(pl, *extra, res, up[0], tf.nest.pack_sequence_as(state, up[1:]))
            return [dx, *tf.nest.flatten(d0), *tf.nest.flatten(dp)]

        return outs, grad

    y, *final = call(x, *flat_state, *flat_params)
    return y, tf.nest.pack_sequence_as(state, final)


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
