"""TF1 oracle: run TensorFlow's own TF1 recurrent code in graph mode and save the numbers.

Run as a script, in its own process, with ``TF_USE_LEGACY_KERAS=1`` in the environment
(the TF1 cells under ``tf.compat.v1.nn.rnn_cell`` live in tf_keras and only load that way):

    TF_USE_LEGACY_KERAS=1 python tf1_oracle.py cases.json results.npz

``cases.json`` holds a list of case specs (plain JSON, see ``run_case``).  For every case the
oracle builds a fresh ``tf.Graph``: the cell (nested specs for wrappers and MultiRNNCell),
the driver, random inputs / initial state / cotangents drawn from ``numpy`` with the case's
seed, and sets every trainable variable to random values (in creation order).  It then
evaluates outputs, final states, and ``tf.compat.v1.gradients`` of

    L = sum(outputs * d_out) + sum(final_state * d_state)

with respect to the inputs, the initial state and every variable.  Everything goes into one
``.npz`` (no pickle): keys are ``"<case id>/<quantity>"``:

    x, seq_len                      the inputs as fed to the driver (static drivers and raw_rnn: [T, B, I])
    init/<k>  (init_fw/<k>, init_bw/<k>)   flattened initial-state leaves (if the case has one)
    var_names, var_shapes           TF1 variable names (driver scope and ':0' stripped) in creation order
    w/<name>                        the values loaded into each variable
    w0/<name>                       the values TF1's own initialisers produced (before loading)
    out/<k>, state/<k>              flattened outputs / final-state leaves
    d_out/<k>, d_state/<k>          the cotangents used in L
    g_x, g_init/<k>, g_w/<name>     gradients of L
    loop_state/<k>                  raw_rnn only: flattened final loop state

Bidirectional drivers prefix weight names with ``fw/`` or ``bw/`` (``bidirectional_rnn/fw/``
stripped to ``fw/``).  Static drivers' list outputs are stacked into ``[T, B, H]``.
A case that fails writes ``"<case id>/error"`` (the traceback text) instead of aborting the batch.
"""

import json
import os
import sys
import traceback

import numpy as np

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import tensorflow as tf  # noqa: E402  (environment must be set first)

tf.get_logger().setLevel("ERROR")
tf.compat.v1.disable_v2_behavior()  # TF1 graph mode: v1 control flow, sessions
v1 = tf.compat.v1
rnn_cell = v1.nn.rnn_cell


# --------------------------------------------------------------------------- cells


def build_cell(spec):
    """Build a TF1 cell from a JSON spec ({"type": ..., kwargs..., "cell"/"cells": nested})."""
    kind = spec["type"]
    kw = {k: v for k, v in spec.items() if k not in ("type", "cell", "cells")}
    if kind == "BasicRNNCell":
        return rnn_cell.BasicRNNCell(**kw)
    if kind == "GRUCell":
        return rnn_cell.GRUCell(**kw)
    if kind == "BasicLSTMCell":
        return rnn_cell.BasicLSTMCell(**kw)
    if kind == "LSTMCell":
        return rnn_cell.LSTMCell(**kw)
    if kind == "MultiRNNCell":
        return rnn_cell.MultiRNNCell([build_cell(c) for c in spec["cells"]], **kw)
    if kind == "DropoutWrapper":
        return rnn_cell.DropoutWrapper(build_cell(spec["cell"]), **kw)
    if kind == "ResidualWrapper":
        return rnn_cell.ResidualWrapper(build_cell(spec["cell"]), **kw)
    raise ValueError(f"unknown cell type {kind!r}")


def _random_state(rng, cell, batch, dtype):
    """A random initial state with the structure of cell.state_size (leaves drawn in flatten order)."""
    return tf.nest.map_structure(
        lambda s: rng.uniform(-1.0, 1.0, size=(batch, int(s))).astype(dtype), cell.state_size
    )


def _const_structure(struct, dtype):
    return tf.nest.map_structure(lambda a: tf.constant(a, dtype=dtype), struct)


# --------------------------------------------------------------------------- helpers


def _session_config():
    """Single-threaded, with grappler's graph rewrites off: the graph runs as TF1 built it
    (and small graphs start faster)."""
    from tensorflow.core.protobuf import rewriter_config_pb2

    config = v1.ConfigProto(intra_op_parallelism_threads=1, inter_op_parallelism_threads=1)
    config.graph_options.rewrite_options.disable_meta_optimizer = True
    config.graph_options.rewrite_options.constant_folding = rewriter_config_pb2.RewriterConfig.OFF
    config.graph_options.optimizer_options.opt_level = v1.OptimizerOptions.L0
    return config


def _strip(name, scope):
    name = name[:-2] if name.endswith(":0") else name
    if not name.startswith(scope + "/"):
        raise ValueError(f"variable {name!r} is not under scope {scope!r}")
    return name[len(scope) + 1 :]


def _var_key(name, driver):
    if driver in ("bidirectional_dynamic_rnn", "static_bidirectional_rnn"):
        rest = _strip(name, "bidirectional_rnn")
        return rest  # "fw/..." or "bw/..."
    return _strip(name, "rnn")


def _put_leaves(res, prefix, struct):
    for k, leaf in enumerate(tf.nest.flatten(struct)):
        res[f"{prefix}/{k}"] = np.asarray(leaf)


# --------------------------------------------------------------------------- raw_rnn loop_fns


def _raw_rnn_graph(spec, cell, x_tm, seq_len, init_np, dtype):
    """Build raw_rnn with one of two loop_fns; return (emit structure, final_state, loop_state)."""
    T, B, I = x_tm.shape
    inputs = tf.constant(x_tm, dtype=dtype)
    lengths = tf.constant(np.asarray(seq_len, dtype=np.int32))
    inputs_ta = tf.TensorArray(dtype=dtype, size=T).unstack(inputs)
    mode = spec.get("raw_mode", "doc")

    if mode == "doc":
        # TF's documented dynamic_rnn-via-raw_rnn example (zero initial state, emit = output).
        def loop_fn(time, cell_output, cell_state, loop_state):
            emit_output = cell_output
            if cell_output is None:
                next_cell_state = cell.zero_state(B, dtype)
            else:
                next_cell_state = cell_state
            elements_finished = time >= lengths
            finished = tf.reduce_all(elements_finished)
            next_input = tf.cond(
                finished, lambda: tf.zeros([B, I], dtype=dtype), lambda: inputs_ta.read(time)
            )
            return elements_finished, next_input, next_cell_state, emit_output, None

    elif mode == "custom":
        # A custom emit structure (output, row-sum of output), a given initial state, and a
        # loop_state that accumulates the raw cell output seen by loop_fn.
        init = _const_structure(init_np, dtype)
        out_size = int(cell.output_size)

        def loop_fn(time, cell_output, cell_state, loop_state):
            if cell_output is None:
                next_cell_state = init
                emit_output = (tf.zeros([out_size], dtype=dtype), tf.zeros([1], dtype=dtype))
                next_loop_state = tf.zeros([B, out_size], dtype=dtype)
            else:
                next_cell_state = cell_state
                emit_output = (cell_output, tf.reduce_sum(cell_output, axis=1, keepdims=True))
                next_loop_state = loop_state + cell_output
            elements_finished = time >= lengths
            finished = tf.reduce_all(elements_finished)
            next_input = tf.cond(
                finished,
                lambda: tf.zeros([B, I], dtype=dtype),
                lambda: 0.5 * inputs_ta.read(time),
            )
            return elements_finished, next_input, next_cell_state, emit_output, next_loop_state

    else:
        raise ValueError(f"unknown raw_mode {mode!r}")

    emit_ta, final_state, final_loop_state = v1.nn.raw_rnn(cell, loop_fn)
    emit = tf.nest.map_structure(lambda ta: ta.stack(), emit_ta)
    return emit, final_state, final_loop_state


# --------------------------------------------------------------------------- one case


def run_case(spec):
    """Build and evaluate one case; return a dict of numpy arrays (keys without the case prefix).

    spec keys: id, driver, cell (cell spec), cell_bw (bidirectional: a spec or "same"),
    dtype ("float32"/"float64"), B, T, I, time_major (dynamic drivers), seq_len (list or null),
    initial_state (bool), seed (int), raw_mode ("doc"/"custom", raw_rnn only).
    """
    driver = spec["driver"]
    dtype = np.dtype(spec["dtype"])
    tdtype = tf.as_dtype(dtype)
    B, T, I = int(spec["B"]), int(spec["T"]), int(spec["I"])
    time_major = bool(spec.get("time_major", False))
    rng = np.random.default_rng(int(spec.get("seed", 0)))
    res = {}

    static = driver in ("static_rnn", "static_bidirectional_rnn", "raw_rnn")
    x_tm = rng.uniform(-1.0, 1.0, size=(T, B, I)).astype(dtype)
    x_np = x_tm if (static or time_major) else np.ascontiguousarray(x_tm.transpose(1, 0, 2))
    res["x"] = x_np
    seq_len = spec.get("seq_len")
    if seq_len is not None:
        res["seq_len"] = np.asarray(seq_len, dtype=np.int64)

    graph = tf.Graph()
    with graph.as_default():
        v1.set_random_seed(int(spec.get("seed", 0)))
        x = tf.constant(x_np, dtype=tdtype)
        sl = None if seq_len is None else tf.constant(np.asarray(seq_len, dtype=np.int32))
        cell = build_cell(spec["cell"])
        bidi = driver in ("bidirectional_dynamic_rnn", "static_bidirectional_rnn")
        init_tensors = []  # (prefix, structure of tensors)
        loop_state = None

        if bidi:
            cell_bw_spec = spec.get("cell_bw", "same")
            cell_bw = cell if cell_bw_spec == "same" else build_cell(cell_bw_spec)
            init_fw = init_bw = None
            if spec.get("initial_state"):
                init_fw = _const_structure(_random_state(rng, cell, B, dtype), tdtype)
                init_bw = _const_structure(_random_state(rng, cell_bw, B, dtype), tdtype)
                init_tensors = [("init_fw", init_fw), ("init_bw", init_bw)]
            if driver == "bidirectional_dynamic_rnn":
                outputs, state = v1.nn.bidirectional_dynamic_rnn(
                    cell, cell_bw, x, sequence_length=sl,
                    initial_state_fw=init_fw, initial_state_bw=init_bw,
                    dtype=None if init_fw is not None else tdtype, time_major=time_major,
                )
            else:
                outs, sfw, sbw = v1.nn.static_bidirectional_rnn(
                    cell, cell_bw, tf.unstack(x), sequence_length=sl,
                    initial_state_fw=init_fw, initial_state_bw=init_bw,
                    dtype=None if init_fw is not None else tdtype,
                )
                outputs, state = tf.stack(outs), (sfw, sbw)
        elif driver == "raw_rnn":
            if seq_len is None:
                raise ValueError("raw_rnn cases need seq_len")
            init_np = _random_state(rng, cell, B, dtype)
            if spec.get("raw_mode", "doc") == "custom":
                _put_leaves(res, "init", init_np)
            outputs, state, loop_state = _raw_rnn_graph(spec, cell, x_tm, seq_len, init_np, tdtype)
        else:
            init = None
            if spec.get("initial_state"):
                init = _const_structure(_random_state(rng, cell, B, dtype), tdtype)
                init_tensors = [("init", init)]
            if driver == "dynamic_rnn":
                outputs, state = v1.nn.dynamic_rnn(
                    cell, x, sequence_length=sl, initial_state=init,
                    dtype=None if init is not None else tdtype, time_major=time_major,
                )
            elif driver == "static_rnn":
                outs, state = v1.nn.static_rnn(
                    cell, tf.unstack(x), initial_state=init, sequence_length=sl,
                    dtype=None if init is not None else tdtype,
                )
                outputs = tf.stack(outs)
            else:
                raise ValueError(f"unknown driver {driver!r}")

        out_leaves = tf.nest.flatten(outputs)
        state_leaves = tf.nest.flatten(state)
        variables = v1.trainable_variables()
        fetch = {"out": out_leaves, "state": state_leaves}
        if loop_state is not None:
            fetch["loop_state"] = tf.nest.flatten(loop_state)

        # Gradient ops are added before the graph is first run (TF cannot extend a run graph
        # with gradients of its loops).  Cotangents use the results' static shapes.
        if driver != "raw_rnn":
            d_out = [rng.uniform(-1, 1, size=t.shape.as_list()).astype(dtype) for t in out_leaves]
            d_state = [
                rng.uniform(-1, 1, size=t.shape.as_list()).astype(dtype) for t in state_leaves
            ]
            loss = tf.add_n(
                [tf.reduce_sum(t * d) for t, d in zip(out_leaves, d_out)]
                + [tf.reduce_sum(t * d) for t, d in zip(state_leaves, d_state)]
            )
            init_leaves = []
            for prefix, struct in init_tensors:
                init_leaves += [(f"{prefix}/{k}", t) for k, t in enumerate(tf.nest.flatten(struct))]
            wrt = [x] + [t for _, t in init_leaves] + list(variables)
            grads = v1.gradients(loss, wrt)
            grads = [
                tf.zeros_like(w) if g is None else tf.convert_to_tensor(g)
                for g, w in zip(grads, wrt)
            ]
            fetch["grads"] = grads
            fetch["init"] = [t for _, t in init_leaves]

        with v1.Session(graph=graph, config=_session_config()) as sess:
            sess.run(v1.global_variables_initializer())
            names, shapes = [], []
            for var in variables:
                key = _var_key(var.name, driver)
                names.append(key)
                shapes.append(list(var.shape.as_list()))
                res[f"w0/{key}"] = sess.run(var)
                value = rng.uniform(-0.6, 0.6, size=var.shape.as_list()).astype(dtype)
                var.load(value, sess)
                res[f"w/{key}"] = value
            res["var_names"] = np.array(names, dtype=str)
            res["var_shapes"] = np.array(json.dumps(shapes))
            vals = sess.run(fetch)

    for k, a in enumerate(vals["out"]):
        res[f"out/{k}"] = a
    for k, a in enumerate(vals["state"]):
        res[f"state/{k}"] = a
    for k, a in enumerate(vals.get("loop_state", [])):
        res[f"loop_state/{k}"] = a
    if driver == "raw_rnn":
        return res
    for k, d in enumerate(d_out):
        res[f"d_out/{k}"] = d
    for k, d in enumerate(d_state):
        res[f"d_state/{k}"] = d
    g_vals = vals["grads"]
    res["g_x"] = g_vals[0]
    for j, ((key, _), val) in enumerate(zip(init_leaves, vals["init"])):
        res[key] = val
        res[f"g_{key}"] = g_vals[1 + j]
    for name, g in zip(names, g_vals[1 + len(init_leaves) :]):
        res[f"g_w/{name}"] = g
    return res


def main(argv):
    if len(argv) != 3:
        print(__doc__)
        print("usage: tf1_oracle.py cases.json results.npz", file=sys.stderr)
        return 2
    with open(argv[1]) as f:
        cases = json.load(f)
    out = {"tf_version": np.array(tf.__version__)}
    for spec in cases:
        cid = spec["id"]
        if "/" in cid:
            raise ValueError(f"case id {cid!r} must not contain '/'")
        try:
            for key, val in run_case(spec).items():
                out[f"{cid}/{key}"] = val
        except Exception:  # noqa: BLE001 - report per case, keep the batch going
            out[f"{cid}/error"] = np.array(traceback.format_exc())
    np.savez(argv[2], **out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
