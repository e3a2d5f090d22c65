"""The routes of ``dynamic_rnn``'s inference (``fastseq.nn.rnn._Route``; the numba
backend's ``layer_route`` and ``stack_route``): a call with no ``sequence_length`` and no
``initial_state``, of a plain cell or of a MultiRNNCell the backend runs as one job,
keeps what its checks and set-up found, and later calls of the same input shape, dtype
and layout run the kernel straight away. Held here: the later calls take the route (the
backend's checks do not run again) and give the NumPy reference's numbers; anything the
route stands on that changes sends the call back through the checks, with the new
numbers or the same errors: new weights (``set_weights``), a weight array made writable
and changed in place, a layer swapped, another thread count, another ``dtype`` argument,
another shape or layout, strided inputs, ``sequence_length``; a layer whose
``zero_state`` differs gets no route; several Python threads at once."""

import numpy as np
import pytest

import fastseq
from fastseq import nn
from fastseq.nn import rnn as rnn_mod
from fastseq.testing import flatten

from _kernel_helpers import assert_close, run_in_threads

TOL = {np.float32: 1e-5, np.float64: 1e-10}
UNITS = {"gru": 40, "lstm": 64}
#: Stacks of three layers, and single layers (the LSTM one on the two-half loop: one row).
KINDS = ["gru", "lstm", "gru-leaf", "lstm-leaf"]


#: Small shapes take the row split (and so the stacks) as P2's do (conftest.py).
pytestmark = pytest.mark.usefixtures("rows_everywhere")


@pytest.fixture
def checks(monkeypatch):
    """How many times the numba backend checked a call's arguments (its ``_prepare``)."""
    import fastseq_numba

    calls = []
    real = fastseq_numba.NumbaBackend._prepare

    def counted(self, *a):
        calls.append(1)
        return real(self, *a)

    monkeypatch.setattr(fastseq_numba.NumbaBackend, "_prepare", counted)
    return calls


def _stack(kind, Ls=3, seed=0):
    base = kind.split("-")[0]
    make = nn.rnn_cell.GRUCell if base == "gru" else nn.rnn_cell.LSTMCell
    fastseq.set_seed(seed)
    if kind.endswith("-leaf"):
        return make(UNITS[base])
    return nn.rnn_cell.MultiRNNCell([make(UNITS[base]) for _ in range(Ls)])


def _batch(kind):
    """Rows of the batch: one for the single LSTM layer (the two-half loop), else eight."""
    return 1 if kind == "lstm-leaf" else 8


def _run(cell, x, backend, time_major=False, dtype=None):
    with fastseq.use_backend(backend):
        y, s = nn.dynamic_rnn(cell, x, dtype=dtype, time_major=time_major)
    return [y] + flatten(s)


def _same(got, want, dtype, what):
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        assert_close(g, w, TOL[dtype], f"{what}: output {i}")


def _x(dtype, shape, seed=1):
    return np.random.default_rng(seed).normal(size=shape).astype(dtype)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("time_major", [False, True], ids=["batch", "time"])
def test_later_calls_take_the_route(kind, dtype, time_major, checks):
    cell = _stack(kind)
    B = _batch(kind)
    x = _x(dtype, (7, B, 5) if time_major else (B, 7, 5))
    want = _run(cell, x, "numpy", time_major)
    first = _run(cell, x, "numba", time_major, dtype)
    assert len(checks) == 1
    _same(first, want, dtype, "first call")
    for i in range(3):
        x2 = _x(dtype, x.shape, seed=10 + i)  # other inputs of the same shape
        got = _run(cell, x2, "numba", time_major, dtype)
        _same(got, _run(cell, x2, "numpy", time_major), dtype, f"call {i + 2}")
    assert len(checks) == 1, "later calls went through the checks again"


@pytest.mark.parametrize("kind", KINDS)
def test_new_weights_are_used(kind, checks):
    cell = _stack(kind)
    x = _x(np.float32, (_batch(kind), 6, 5))
    _run(cell, x, "numba")
    ws = cell.get_weights()
    for name in ws:
        ws[name] = ws[name] * 0.5 + 0.1
    cell.set_weights(ws)
    _same(_run(cell, x, "numba"), _run(cell, x, "numpy"), np.float32, "after set_weights")
    assert len(checks) == 2
    _run(cell, x, "numba")
    assert len(checks) == 2, "the new weights' route was not kept"


@pytest.mark.parametrize("kind", KINDS)
def test_weights_changed_in_place_are_used(kind):
    """A stored weight made writable and changed: the route no longer holds, and the
    backend's kept packed weights are not used either."""
    cell = _stack(kind)
    x = _x(np.float32, (_batch(kind), 6, 5))
    before = _run(cell, x, "numba")
    leaf = cell if kind.endswith("-leaf") else cell._cells[2]
    arr = next(iter(leaf._weights.values()))
    arr.flags.writeable = True
    arr *= -1.0
    got = _run(cell, x, "numba")
    _same(got, _run(cell, x, "numpy"), np.float32, "after an in-place change")
    assert not np.allclose(got[0], before[0])


def test_a_swapped_layer_is_used(checks):
    cell = _stack("gru")
    x = _x(np.float32, (8, 6, 5))
    _run(cell, x, "numba")
    other = _stack("gru", seed=7)
    _run(other, x, "numba")  # builds its weights
    cell._cells[1] = other._cells[1]
    _same(_run(cell, x, "numba"), _run(cell, x, "numpy"), np.float32, "after the swap")
    assert len(checks) == 3


@pytest.mark.parametrize("kind", ["lstm", "lstm-leaf"])
def test_other_thread_counts_and_shapes(kind, checks):
    cell = _stack(kind)
    x = _x(np.float64, (_batch(kind), 6, 5))
    _run(cell, x, "numba")
    with fastseq.threads.limit(1):  # one thread: no two-thread stack, layer by layer
        _same(_run(cell, x, "numba"), _run(cell, x, "numpy"), np.float64, "one thread")
    B = _batch(kind)
    for shape in ((B, 9, 5), (B + 1, 6, 5), (B, 6, 5)):
        x2 = _x(np.float64, shape, seed=shape[1])
        _same(_run(cell, x2, "numba"), _run(cell, x2, "numpy"), np.float64, f"shape {shape}")
    x3 = _x(np.float32, (B, 6, 5))
    _same(_run(cell, x3, "numba"), _run(cell, x3, "numpy"), np.float32, "float32 inputs")
    n = len(checks)
    _run(cell, x, "numba")
    _run(cell, x2, "numba")
    assert len(checks) == n, "a kept route was not taken"


@pytest.mark.parametrize("kind", KINDS)
def test_the_dtype_argument_is_still_checked(kind):
    cell = _stack(kind)
    x = _x(np.float32, (_batch(kind), 6, 5))
    _run(cell, x, "numba", dtype=np.float32)
    _run(cell, x, "numba", dtype=np.float32)
    with pytest.raises(ValueError, match="dtype"):
        _run(cell, x, "numba", dtype=np.float64)
    _same(_run(cell, x, "numba", dtype="float32"), _run(cell, x, "numpy"), np.float32, "dtype given as a string")


@pytest.mark.parametrize("kind", KINDS)
def test_non_contiguous_inputs_and_lengths_take_the_checks(kind, checks):
    cell = _stack(kind)
    B = _batch(kind)
    x = _x(np.float32, (B, 6, 5))
    _run(cell, x, "numba")
    n = len(checks)
    xs = _x(np.float32, (B, 6, 10))[:, :, ::2]
    _same(_run(cell, xs, "numba"), _run(cell, np.ascontiguousarray(xs), "numpy"), np.float32, "strided inputs")
    assert len(checks) > n
    n = len(checks)
    lengths = np.array([6, 0, 3, 6, 1, 5, 2, 6])[:B]
    with fastseq.use_backend("numba"):
        y, _ = nn.dynamic_rnn(cell, x, sequence_length=lengths, dtype=np.float32)
    with fastseq.use_backend("numpy"):
        y0, _ = nn.dynamic_rnn(cell, x, sequence_length=lengths, dtype=np.float32)
    assert_close(y, y0, 1e-5, "with sequence_length")
    assert len(checks) > n


def test_a_layer_with_its_own_zero_state_gets_no_route():
    class Ones(nn.rnn_cell.GRUCell):
        def zero_state(self, batch_size, dtype):
            return np.ones((batch_size, self.state_size), dtype)

    fastseq.set_seed(3)
    cell = nn.rnn_cell.MultiRNNCell([nn.rnn_cell.GRUCell(40), Ones(40), nn.rnn_cell.GRUCell(40)])
    x = _x(np.float32, (8, 6, 5))
    for _ in range(2):
        got = _run(cell, x, "numba")
        _same(got, _run(cell, x, "numpy"), np.float32, "own zero_state")
    assert cell not in rnn_mod._ROUTES


def test_a_single_layer_with_its_own_zero_state_gets_no_route():
    class Halves(nn.rnn_cell.LSTMCell):
        def zero_state(self, batch_size, dtype):
            half = np.full((batch_size, self.num_units), 0.5, dtype)
            return nn.rnn_cell.LSTMStateTuple(half, half)

    fastseq.set_seed(3)
    cell = Halves(64)
    x = _x(np.float32, (1, 6, 5))
    for _ in range(2):
        _same(_run(cell, x, "numba"), _run(cell, x, "numpy"), np.float32, "own zero_state")
    assert cell not in rnn_mod._ROUTES


@pytest.mark.parametrize("kind", KINDS)
def test_routes_from_several_threads(kind):
    cell = _stack(kind)
    xs = [_x(np.float32, (_batch(kind), 6, 5), seed=20 + i) for i in range(4)]
    want = [_run(cell, x, "numpy") for x in xs]
    errors = []

    def work(i):
        try:
            for _ in range(20):
                _same(_run(cell, xs[i], "numba"), want[i], np.float32, f"thread {i}")
        except AssertionError as exc:  # pragma: no cover - reported below
            errors.append(exc)

    run_in_threads(work, 4)
    assert not errors, errors[0]


@pytest.mark.parametrize("kind", KINDS)
def test_a_cell_and_its_weights_go_with_their_routes(kind):
    """The routes are kept by cell, weakly: a cell no one holds any more is collected,
    with its weights and its routes."""
    import gc
    import weakref

    cell = _stack(kind)
    x = _x(np.float32, (_batch(kind), 6, 5))
    _run(cell, x, "numba")
    _run(cell, x, "numba")
    assert cell in rnn_mod._ROUTES
    leaf = cell if kind.endswith("-leaf") else cell._cells[0]
    refs = [weakref.ref(cell)] + [weakref.ref(a) for a in leaf._weights.values()]
    del cell, leaf
    gc.collect()
    assert all(r() is None for r in refs), "a route kept its cell or the cell's weights alive"


#: Single layers of every kind and option the backend runs, with unit counts that reach the
#: two-thread loops (64 units, several rows) and the one-thread ones.
LEAVES = {
    "rnn": lambda: nn.rnn_cell.BasicRNNCell(32),
    "rnn_relu": lambda: nn.rnn_cell.BasicRNNCell(32, activation="relu"),
    "gru": lambda: nn.rnn_cell.GRUCell(64),
    "basic_lstm": lambda: nn.rnn_cell.BasicLSTMCell(64, forget_bias=0.5),
    "lstm": lambda: nn.rnn_cell.LSTMCell(64),
    "lstm_full": lambda: nn.rnn_cell.LSTMCell(16, use_peepholes=True, cell_clip=0.8, num_proj=8, proj_clip=0.5),
    "lstm_concat": lambda: nn.rnn_cell.LSTMCell(16, num_proj=8, state_is_tuple=False),
}


@pytest.mark.parametrize("name", sorted(LEAVES))
@pytest.mark.parametrize("B", [1, 3, 8])
@pytest.mark.parametrize("threads", [1, 2])
def test_routes_of_every_layer_kind_keep_their_initial_state(name, B, threads):
    """A route binds the zero initial state it checked: no kernel may write into it, or the
    next call would start from another state. Three calls with other inputs each, every
    one against the reference."""
    fastseq.set_seed(11)
    cell = LEAVES[name]()
    with fastseq.threads.limit(threads):
        for i in range(3):
            x = _x(np.float32, (B, 12, 5), seed=30 + i)
            _same(_run(cell, x, "numba"), _run(cell, x, "numpy"), np.float32, f"{name} call {i + 1}")
    assert cell in rnn_mod._ROUTES
