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
def project_inputs(spec: CellSpec, p, x2d):
    """The input half of every matmul, for all rows at once: ``x2d [N, I] -> [N, G]``.

    Biases are added here (and the LSTM forget bias folded into the ``f`` columns), so the
    loop only adds the recurrent matmul.
    """
    n_in = tf.shape(x2d)[1]
    if spec.kind == "rnn":
        return tf.matmul(x2d, p["kernel"][:n_in]) + p["bias"]
    if spec.kind == "gru":
        w = tf.concat([p["gates/kernel"][:n_in], p["candidate/kernel"][:n_in]], axis=1)
        b = tf.concat([p["gates/bias"], p["candidate/bias"]], axis=0)
        return tf.matmul(x2d, w) + b
    if spec.kind == "lstm":
        y = tf.matmul(x2d, p["kernel"][:n_in]) + p["bias"]
        if spec.forget_bias:
            H = spec.num_units
            fb = tf.concat(
                [tf.zeros([2 * H], y.dtype), tf.fill([H], tf.constant(spec.forget_bias, y.dtype)), tf.zeros([H], y.dtype)],
                axis=0,
            )
            y = y + fb
        return y
    raise ValueError(f"unknown cell kind {spec.kind!r}")


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


def step(spec: CellSpec, w, xw, state):
    """One step given the projected input ``xw [B, G]``. Returns (output, new_state tuple)."""
    act = activation(spec.activation)
    H = spec.num_units
    if spec.kind == "rnn":
        (h,) = state
        hn = act(xw + tf.matmul(h, w["h"]))
        return hn, (hn,)
    if spec.kind == "gru":
        (h,) = state
        g = tf.sigmoid(xw[:, : 2 * H] + tf.matmul(h, w["gh"]))
        r, u = g[:, :H], g[:, H:]
        c = act(xw[:, 2 * H :] + tf.matmul(r * h, w["ch"]))
        hn = u * h + (1 - u) * c
        return hn, (hn,)
    c, h = state
    z = xw + tf.matmul(h, w["h"])
    i, j, f, o = tf.split(z, 4, axis=1)
    if spec.use_peepholes:
        f = f + w["wf"] * c
        i = i + w["wi"] * c
    cn = tf.sigmoid(f) * c + tf.sigmoid(i) * act(j)
    if spec.cell_clip is not None:
        clip = tf.constant(spec.cell_clip, cn.dtype)
        cn = tf.clip_by_value(cn, -clip, clip)
    if spec.use_peepholes:
        o = o + w["wo"] * cn
    m = tf.sigmoid(o) * act(cn)
    if spec.num_proj:
        m = tf.matmul(m, w["proj"])
        if spec.proj_clip is not None:
            pc = tf.constant(spec.proj_clip, m.dtype)
            m = tf.clip_by_value(m, -pc, pc)
    return m, (cn, m)


def run_layer(spec: CellSpec, x, state, params, lengths, masks, mask_kinds, reverse, full_length):
    """The layer of :meth:`fastseq.contract.Backend.layer_forward`, in graph code.

    ``lengths`` int32 ``[B]`` or None; ``masks`` the given masks (``[T, B, S]`` for kind
    "seq", ``[1, B, S]`` for kind "const"), aligned with ``mask_kinds`` (None entries
    omitted). ``full_length`` runs all ``T`` steps even when every sequence is shorter
    (XLA needs static loop bounds).
    """
    dtype = x.dtype
    T, B, n_in = tf.shape(x)[0], tf.shape(x)[1], tf.shape(x)[2]
    p = dict(zip(param_names(spec), params))
    if reverse:
        if lengths is not None:
            rev = lambda a: tf.reverse_sequence(a, lengths, seq_axis=0, batch_axis=1)  # noqa: E731
        else:
            rev = lambda a: tf.reverse(a, [0])  # noqa: E731
        x = rev(x)
    mask_iter = iter(masks)
    step_masks = []  # per state component: None, ("const", [B,S]) or ("seq", TensorArray)
    for kind in mask_kinds:
        if kind is None:
            step_masks.append(None)
            continue
        m = tf.stop_gradient(next(mask_iter))
        if kind == "const":
            step_masks.append(("const", m[0]))
        else:
            if reverse:
                m = rev(m)
            step_masks.append(("seq", tf.TensorArray(dtype, size=T, clear_after_read=False).unstack(m)))

    G = {"rnn": 1, "gru": 3, "lstm": 4}[spec.kind] * spec.num_units
    xw = tf.reshape(project_inputs(spec, p, tf.reshape(x, [-1, n_in])), [T, B, G])
    xw_ta = tf.TensorArray(dtype, size=T, clear_after_read=True).unstack(xw)
    w = recurrent_weights(spec, p, n_in)
    P = spec.output_size

    if lengths is not None and not full_length:
        n_steps = tf.minimum(tf.maximum(tf.reduce_max(tf.concat([lengths, [0]], 0)), 0), T)
    else:
        n_steps = T
    if lengths is not None:
        len_col = lengths[:, None]
    out_ta = tf.TensorArray(dtype, size=n_steps, element_shape=tf.TensorShape([None, P]))

    def body(t, out_ta, *s):
        out, s_new = step(spec, w, xw_ta.read(t), s)
        s_new = list(s_new)
        for k, m in enumerate(step_masks):
            if m is not None:
                s_new[k] = s_new[k] * (m[1] if m[0] == "const" else m[1].read(t))
        if lengths is not None:
            valid = t < len_col
            s_new = [tf.where(valid, a, b) for a, b in zip(s_new, s)]
            out = tf.where(valid, out, tf.zeros_like(out))
        return (t + 1, out_ta.write(t, out), *s_new)

    loop_vars = (tf.constant(0, tf.int32), out_ta, *state)
    _, out_ta, *final = tf.while_loop(
        lambda t, *_: t < n_steps, body, loop_vars, maximum_iterations=n_steps, swap_memory=False
    )
    # An empty TensorArray cannot be stacked without a fully known element shape.
    y = tf.cond(
        n_steps > 0,
        lambda: tf.reshape(out_ta.stack(), [n_steps, B, P]),
        lambda: tf.zeros(tf.stack([0, B, P]), dtype),
    )
    if lengths is not None and not full_length:
        y = tf.concat([y, tf.zeros(tf.stack([T - n_steps, B, P]), dtype)], axis=0)
    if reverse:
        y = rev(y)
    return y, tuple(final)


class KernelCache:
    """``tf.function`` objects keyed by configuration; counts traces."""

    def __init__(self, tf_module=None):
        self._fns = {}
        self._lock = threading.Lock()
        self.trace_count = 0

    def clear(self):
        with self._lock:
            self._fns.clear()

    def _param_specs(self, spec, dtype):
        return tuple(
            tf.TensorSpec([None, None] if name.endswith("kernel") else [None], dtype) for name in param_names(spec)
        )

    def layer_fn(self, spec: CellSpec, dtype, has_lengths: bool, reverse: bool, mask_kinds, jit: bool):
        key = ("layer", spec, dtype, has_lengths, reverse, mask_kinds, jit)
        fn = self._fns.get(key)
        if fn is not None:
            return fn
        nstate = len(spec.state_sizes)
        signature = [
            tf.TensorSpec([None, None, None], dtype),
            tuple(tf.TensorSpec([None, None], dtype) for _ in range(nstate)),
            self._param_specs(spec, dtype),
        ]
        if has_lengths:
            signature.append(tf.TensorSpec([None], tf.int32))
        n_masks = sum(k is not None for k in mask_kinds)
        if n_masks:
            signature.append(tuple(tf.TensorSpec([None, None, None], dtype) for _ in range(n_masks)))

        def layer(x, state, params, *rest):
            self.trace_count += 1
            rest = list(rest)
            lengths = rest.pop(0) if has_lengths else None
            masks = rest.pop(0) if n_masks else ()
            return run_layer(spec, x, state, params, lengths, masks, mask_kinds, reverse, full_length=jit)

        fn = tf.function(layer, input_signature=signature, jit_compile=jit or None, autograph=False)
        if jit:
            fn = self._xla_differentiable(fn, signature, nstate)
        with self._lock:
            self._fns[key] = fn
        return fn

    def _xla_differentiable(self, fwd, signature, nstate):
        """Wrap an XLA-compiled layer so that GradientTape can differentiate it.

        The loop's intermediate TensorLists cannot leave an XLA cluster, so the gradient is
        computed by a second XLA function that re-runs the forward pass and differentiates
        it internally (one extra forward pass per backward pass).
        """
        n_float = 3  # x, state, params are differentiable; lengths and masks are not

        def fwd_bwd(args, dy, ds):
            args = list(args)
            with tf.GradientTape() as tape:
                sources = [args[0], *args[1], *args[2]]
                tape.watch(sources)
                y, final = fwd(*args)
            return tape.gradient([y, *final], sources, output_gradients=[dy, *ds],
                                 unconnected_gradients=tf.UnconnectedGradients.ZERO)

        bwd = tf.function(fwd_bwd, jit_compile=True, autograph=False, reduce_retracing=True)

        def call(*args):
            flat = tf.nest.flatten(args)

            @tf.custom_gradient
            def inner(*flat_in):
                packed = tf.nest.pack_sequence_as(args, list(flat_in))
                # Unwatched inputs: the outer tape must not record the XLA call itself.
                y, final = fwd(*tf.nest.map_structure(tf.stop_gradient, packed))

                def grad(dy, *ds):
                    g = bwd(tuple(packed), dy, tuple(ds))
                    n_diff = len(tf.nest.flatten(packed[:n_float]))
                    return list(g) + [None] * (len(flat_in) - n_diff)

                return (y, *final), grad

            y, *final = inner(*flat)
            return y, tuple(final)

        return call

    def step_fn(self, spec: CellSpec, dtype, jit: bool):
        key = ("step", spec, dtype, jit)
        fn = self._fns.get(key)
        if fn is not None:
            return fn
        nstate = len(spec.state_sizes)
        signature = [
            tf.TensorSpec([None, None], dtype),
            tuple(tf.TensorSpec([None, None], dtype) for _ in range(nstate)),
            self._param_specs(spec, dtype),
        ]

        def one_step(x, state, params):
            self.trace_count += 1
            p = dict(zip(param_names(spec), params))
            xw = project_inputs(spec, p, x)
            return step(spec, recurrent_weights(spec, p, tf.shape(x)[1]), xw, tuple(state))

        fn = tf.function(one_step, input_signature=signature, jit_compile=jit or None, autograph=False)
        with self._lock:
            self._fns[key] = fn
        return fn
