"""Compile (or load from the on-disk cache) every kernel specialisation the Numba backend
uses, with tiny arrays of exactly the types the backend passes."""

import time

import numpy as np


def _ro(a):
    """Weights as the numba backend passes them: read-only (a cell stores its weights
    read-only, and the backend hands the kernels read-only views of any others), which is
    a Numba type of its own; warming up with writable weights would compile kernels a
    user's first call never runs."""
    a.flags.writeable = False
    return a


def warmup(dtypes=("float32", "float64"), verbose=False):
    """Returns the seconds spent per (kernel, dtype)."""
    from . import _packed, gru, lstm, rnn

    timings = {}
    T, B, I, H = 2, 2, 3, 4
    lengths = np.array([2, 1], np.int64)
    for name in dtypes:
        dt = np.dtype(name)
        rng = np.random.default_rng(0)
        x = rng.standard_normal((T, B, I)).astype(dt)
        e1, e2, e3 = np.zeros(0, dt), np.zeros((0, 0), dt), np.zeros((0, 1, 1), dt)
        h = np.zeros((B, H), dt)
        dy = np.ones((T, B, H), dt)

        t0 = time.perf_counter()
        k = _ro(rng.standard_normal((I + H, 4 * H)).astype(dt))
        b = _ro(np.zeros(4 * H, dt))
        y, c, hh, ws = lstm.lstm_forward(x, k, b, e1, e1, e1, e2, h, h, lengths, False, e3, e3, 0, 1.0, -1.0, -1.0,
                                         True, 1, e1, False, False)
        lstm.lstm_backward(ws, k, b, e1, e1, e1, e2, dy, h, h, T, False, e3, e3, 0, 1.0, -1.0, -1.0, 1, e1, False)
        lstm.lstm_forward_stream(x, k, b, h, h, lengths, False, 1.0, True, e1)  # the projection on the helper
        lstm.lstm_forward_pair(x, k, b, h, h, lengths, False, 1.0, lstm.pack_halves(k, I, H))  # units in halves
        # and on kept buffers (every sequence all T steps, read and written in place)
        lstm.lstm_forward_pair(x, k, b, h, h, np.full(B, T, np.int64), False, 1.0, lstm.pack_halves(k, I, H))
        # the two-thread loop (lstm.split_applies), 32 units: a whole number of panels
        k32 = _ro(rng.standard_normal((I + 32, 128)).astype(dt))
        h32 = np.zeros((B, 32), dt)
        _, _, _, ws32 = lstm.lstm_forward_split(x, k32, _ro(np.zeros(128, dt)), h32, h32, lengths, False, 1.0, True, 2,
                                                e1)
        lstm.lstm_backward_split(ws32, k32, np.ones((T, B, 32), dt), h32, h32, T, False, 1, e1)
        # the same loops split by batch rows (lstm.split_by_rows, gru._split_by_rows: 8 rows)
        x8 = rng.standard_normal((T, 8, I)).astype(dt)
        l8 = np.array([2, 2, 1, 2, 0, 1, 2, 2], np.int64)
        h8 = np.zeros((8, 32), dt)
        _, _, _, ws8 = lstm.lstm_forward_split(x8, k32, _ro(np.zeros(128, dt)), h8, h8, l8, False, 1.0, True, 2, e1)
        lstm.lstm_backward_split(ws8, k32, np.ones((T, 8, 32), dt), h8, h8, T, False, 1, e1)
        # a stack of LSTM layers in one job (lstm.lstm_stack_forward), weights as the
        # backend stacks them (backends/fastseq_numba: _StackWeights)
        k2 = _ro(rng.standard_normal((64, 128)).astype(dt))
        b32 = _ro(np.zeros(128, dt))
        pk = _packed.pack_panels
        s8 = np.zeros((2, 8, 32), dt)
        lstm.lstm_stack_forward(x8, s8, s8, np.stack([b32, b32]), np.ones(2),
                                np.stack([pk(k32, I * 128, 128, 32, 128), pk(k2, 32 * 128, 128, 32, 128)]),
                                (pk(k32, 0, 128, I, 128), np.stack([pk(k2, 0, 128, 32, 128)])), l8, False, False)
        timings[("lstm", name)] = time.perf_counter() - t0

        t0 = time.perf_counter()
        gk = _ro(rng.standard_normal((I + H, 2 * H)).astype(dt))
        ck = _ro(rng.standard_normal((I + H, H)).astype(dt))
        gb, cb = _ro(np.ones(2 * H, dt)), _ro(np.zeros(H, dt))
        y, hh, ws = gru.gru_forward(x, gk, gb, ck, cb, h, lengths, False, e3, 0, True, 1,
                                    e1, e1, False)
        gru.gru_backward(ws, gk, gb, ck, cb, dy, h, T, False, e3, 0, 1, e1, e1, False)
        # the two-thread loop (gru.split_applies)
        gru.gru_forward_split(x, gk, gb, ck, cb, h, lengths, False, False, e1, e1)
        gru.gru_backward_split(ws, gk, ck, dy, h, T, False, 1, e1, e1)
        gru.gru_backward_split(ws, gk, ck, dy, h, T, False, 2, e1, e1)  # the tail on the pair
        h8 = np.zeros((8, H), dt)
        _, _, ws8 = gru.gru_forward_split(x8, gk, gb, ck, cb, h8, l8, False, True, e1, e1)  # by rows
        gru.gru_backward_split(ws8, gk, ck, np.ones((T, 8, H), dt), h8, T, False, 1, e1, e1)
        gru.gru_backward_split(ws8, gk, ck, np.ones((T, 8, H), dt), h8, T, False, 2, e1, e1)
        # a stack of GRU layers in one job (gru.gru_stack_forward), weights as the backend
        # stacks them (backends/fastseq_numba: _StackWeights)
        g2 = _ro(rng.standard_normal((2 * H, 2 * H)).astype(dt))
        c2 = _ro(rng.standard_normal((2 * H, H)).astype(dt))
        gru.gru_stack_forward(x8, np.zeros((2, 8, H), dt), np.stack([gb, gb]), np.stack([cb, cb]),
                              np.stack([pk(gk, I * 2 * H, 2 * H, H, 2 * H), pk(g2, H * 2 * H, 2 * H, H, 2 * H)]),
                              np.stack([pk(ck, I * H, H, H, H), pk(c2, H * H, H, H, H)]),
                              (pk(gk, 0, 2 * H, I, 2 * H), np.stack([pk(g2, 0, 2 * H, H, 2 * H)])),
                              (pk(ck, 0, H, I, H), np.stack([pk(c2, 0, H, H, H)])), l8, False, False)
        timings[("gru", name)] = time.perf_counter() - t0

        t0 = time.perf_counter()
        y, hh, ws = rnn.rnn_forward(x, ck, cb, h, lengths, False, e3, 0, True, 1, e1, False)
        rnn.rnn_backward(ws, ck, cb, dy, h, T, False, e3, 0, 1, e1, False)
        # the backend packs cached weights itself (backends/fastseq_numba/_packcache.py)
        _packed.pack_if_worth(4, ck, I * H, H, H, H, False)
        _packed.pack_if_worth(4, ck, I * H, H, H, H, True)
        timings[("rnn", name)] = time.perf_counter() - t0
        if verbose:
            for key in (("lstm", name), ("gru", name), ("rnn", name)):
                print(f"{key[0]:5s} {key[1]}: {timings[key]:.2f} s")
    return timings
