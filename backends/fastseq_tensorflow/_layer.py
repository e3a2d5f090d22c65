"""Glue from the backend contract to the compiled kernels of :mod:`._kernels`.

Converts arguments to tensors (NumPy in is fine; the drivers convert results back),
picks the compiled function for the configuration, and for ``need_grad=True`` records
the call on a persistent ``tf.GradientTape`` that :func:`layer_backward` differentiates.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from ._kernels import param_names


class _Workspace:
    """What :func:`layer_backward` needs: the tape and the watched tensors."""

    __slots__ = ("tape", "inputs", "state", "params", "outputs", "final")

    def __init__(self, tape, inputs, state, params, outputs, final):
        self.tape, self.inputs, self.state, self.params = tape, inputs, state, params
        self.outputs, self.final = outputs, final


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
    args = [x, state, plist]
    if sequence_length is not None:
        lengths = sequence_length
        if isinstance(lengths, (tf.Tensor, tf.Variable)):
            lengths = tf.cast(lengths, tf.int32)
        else:
            lengths = tf.convert_to_tensor(np.asarray(lengths, dtype=np.int32))
        args.append(lengths)
    kinds, masks = _mask_config(state_mask, len(state), T, dtype, backend)
    if masks:
        args.append(tuple(masks))
    fn = backend._kernels.layer_fn(spec, dtype, sequence_length is not None, bool(reverse), kinds,
                                   bool(backend.jit_compile))
    if not need_grad:
        y, final = fn(*args)
        return y, tuple(final), None
    tape = tf.GradientTape(persistent=True)
    with tape:
        tape.watch([x, *state, *plist])
        y, final = fn(*args)
    final = tuple(final)
    return y, final, _Workspace(tape, x, state, plist, y, final)


def layer_backward(backend, spec, params, workspace, d_outputs, d_final_state):
    ws = workspace
    dtype = ws.inputs.dtype
    dy = backend.asarray(d_outputs, dtype)
    ds = [backend.asarray(d, dtype) for d in d_final_state]
    sources = [ws.inputs, *ws.state, *ws.params]
    grads = ws.tape.gradient(
        [ws.outputs, *ws.final], sources, output_gradients=[dy, *ds],
        unconnected_gradients=tf.UnconnectedGradients.ZERO,
    )
    n_state = len(ws.state)
    d_inputs = grads[0]
    d_state = tuple(grads[1:1 + n_state])
    d_params = dict(zip(param_names(spec), grads[1 + n_state:]))
    return d_inputs, d_state, d_params


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
