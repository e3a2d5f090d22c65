"""The TF1 parity cases: plain JSON-able specs shared by the oracle (tf1_oracle.py) and the tests.

A cell spec is {"type": <TF1 class name>, <constructor kwargs>...}, with "cell" (wrappers) or
"cells" (MultiRNNCell) nesting further specs.  A case spec adds the driver, dtype, sizes
(B batch, T time, I input depth), time_major, seq_len (list or None), initial_state (bool), a
seed, and for bidirectional drivers "cell_bw" (a spec, or "same" for one shared cell object).
Shapes are kept tiny so the whole TF batch runs in seconds.
"""

B, T, I = 3, 5, 3
LENGTHS = [5, 0, 3]  # includes 0 and T

CELLS = {
    "basic_rnn": {"type": "BasicRNNCell", "num_units": 4},
    "basic_rnn_relu": {"type": "BasicRNNCell", "num_units": 4, "activation": "relu"},
    "gru": {"type": "GRUCell", "num_units": 4},
    "basic_lstm": {"type": "BasicLSTMCell", "num_units": 4, "forget_bias": 0.7},
    "basic_lstm_concat": {"type": "BasicLSTMCell", "num_units": 4, "state_is_tuple": False},
    "lstm": {"type": "LSTMCell", "num_units": 4},
    "lstm_peep_clip": {
        "type": "LSTMCell", "num_units": 4, "use_peepholes": True, "cell_clip": 0.4,
        "forget_bias": 0.5,
    },
    "lstm_proj": {"type": "LSTMCell", "num_units": 4, "num_proj": 3, "proj_clip": 0.3},
    "lstm_all_concat": {
        "type": "LSTMCell", "num_units": 4, "use_peepholes": True, "cell_clip": 0.5,
        "num_proj": 2, "proj_clip": 0.35, "forget_bias": 0.2, "state_is_tuple": False,
    },
    "multi": {
        "type": "MultiRNNCell",
        "cells": [
            {"type": "LSTMCell", "num_units": 4, "use_peepholes": True},
            {"type": "GRUCell", "num_units": 3},
            {"type": "BasicRNNCell", "num_units": 4},
        ],
    },
    "multi_concat": {
        "type": "MultiRNNCell", "state_is_tuple": False,
        "cells": [{"type": "GRUCell", "num_units": 4}, {"type": "BasicRNNCell", "num_units": 2}],
    },
    "dropout": {
        "type": "DropoutWrapper", "input_keep_prob": 1.0, "output_keep_prob": 1.0,
        "state_keep_prob": 1.0, "cell": {"type": "GRUCell", "num_units": 4},
    },
    "residual": {"type": "ResidualWrapper", "cell": {"type": "LSTMCell", "num_units": I}},
    "multi_wrapped": {
        "type": "MultiRNNCell",
        "cells": [
            {"type": "DropoutWrapper", "output_keep_prob": 1.0,
             "cell": {"type": "GRUCell", "num_units": I}},
            {"type": "ResidualWrapper", "cell": {"type": "BasicLSTMCell", "num_units": I}},
        ],
    },
}


def _case(cid, driver, cell, dtype, **kw):
    spec = {"id": cid, "driver": driver, "cell": CELLS[cell], "dtype": dtype,
            "B": B, "T": T, "I": I, "time_major": False, "seq_len": None,
            "initial_state": False, "seed": 0}
    spec.update(kw)
    if isinstance(spec.get("cell_bw"), str) and spec["cell_bw"] != "same":
        spec["cell_bw"] = CELLS[spec["cell_bw"]]
    return spec


def _all_cases():
    cases = []
    seed = 100
    for name in CELLS:
        # float64, batch-major, mixed lengths (0 and T included), given initial state
        seed += 1
        cases.append(_case(f"dyn-{name}-f64", "dynamic_rnn", name, "float64",
                           seq_len=LENGTHS, initial_state=True, seed=seed))
        # float32, time-major, no lengths, zero state from dtype
        seed += 1
        cases.append(_case(f"dyn-{name}-f32-tm", "dynamic_rnn", name, "float32",
                           time_major=True, seed=seed))
    cases += [
        _case("dyn-lstm_proj-f32-lens", "dynamic_rnn", "lstm_proj", "float32",
              seq_len=[2, 5, 0], initial_state=True, seed=7),
        _case("dyn-gru-f64-tm-lens", "dynamic_rnn", "gru", "float64", time_major=True,
              seq_len=[1, 4, 5], initial_state=True, seed=8),
        # bidirectional_dynamic_rnn
        _case("bidi-lstm-gru-f64", "bidirectional_dynamic_rnn", "lstm_peep_clip", "float64",
              cell_bw="gru", seq_len=LENGTHS, initial_state=True, seed=11),
        _case("bidi-shared-lstm_proj-f32-tm", "bidirectional_dynamic_rnn", "lstm_proj",
              "float32", cell_bw="same", time_major=True, seq_len=LENGTHS, seed=12),
        _case("bidi-multi-f64-tm", "bidirectional_dynamic_rnn", "multi", "float64",
              cell_bw="multi_wrapped", time_major=True, initial_state=True, seed=13),
        _case("bidi-shared-gru-f64", "bidirectional_dynamic_rnn", "gru", "float64",
              cell_bw="same", seq_len=LENGTHS, initial_state=True, seed=14),
        # static_rnn (inputs are a list of [B, I] frames).  TF1 unrolls these with a cond per
        # step, so graph building is slow: T is 3 here.
        _case("static-lstm_peep_clip-f64", "static_rnn", "lstm_peep_clip", "float64", T=3,
              seq_len=[3, 0, 2], initial_state=True, seed=21),
        _case("static-gru-f32", "static_rnn", "gru", "float32", seed=22),
        _case("static-multi-f64", "static_rnn", "multi", "float64", T=3, seq_len=[2, 0, 3],
              initial_state=True, seed=23),
        _case("static-lstm_all_concat-f64", "static_rnn", "lstm_all_concat", "float64", T=3,
              seq_len=[3, 1, 0], seed=24),
        # static_bidirectional_rnn
        _case("sbidi-lstm-basic_rnn-f64", "static_bidirectional_rnn", "lstm", "float64", T=3,
              cell_bw="basic_rnn", seq_len=[3, 0, 2], initial_state=True, seed=31),
        _case("sbidi-shared-gru-f32", "static_bidirectional_rnn", "gru", "float32", T=3,
              cell_bw="same", seq_len=[1, 3, 0], seed=32),
        # raw_rnn: TF's documented dynamic_rnn-via-raw_rnn loop_fn, and a custom emit structure
        _case("raw-doc-lstm-f32", "raw_rnn", "lstm", "float32", seq_len=[4, 1, 3],
              raw_mode="doc", seed=41),
        _case("raw-doc-multi-f64", "raw_rnn", "multi", "float64", seq_len=[5, 2, 0],
              raw_mode="doc", seed=42),
        _case("raw-custom-lstm_all_concat-f64", "raw_rnn", "lstm_all_concat", "float64",
              seq_len=[3, 5, 1], raw_mode="custom", seed=43),
        _case("raw-custom-multi_wrapped-f64", "raw_rnn", "multi_wrapped", "float64",
              seq_len=[2, 4, 3], raw_mode="custom", seed=44),
    ]
    # oracle self-check: TF1 LSTMCell with every option against a NumPy re-implementation
    cases.append(_case("selfcheck-lstm-f64", "dynamic_rnn", "lstm_all_concat", "float64",
                       seq_len=LENGTHS, initial_state=True, seed=99))
    cases.append(_case("selfcheck-lstm-tuple-f64", "dynamic_rnn", "lstm_peep_clip", "float64",
                       seq_len=[2, 5, 4], initial_state=True, seed=98))
    ids = [c["id"] for c in cases]
    assert len(ids) == len(set(ids)), "duplicate case ids"
    return cases


CASES = _all_cases()
PARITY_CASES = [c for c in CASES if not c["id"].startswith("selfcheck")]
SELFCHECK_CASES = [c for c in CASES if c["id"].startswith("selfcheck")]
