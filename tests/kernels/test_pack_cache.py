"""Packed recurrent weights kept across calls (backends/fastseq_numba/_packcache.py): a
cell's read-only weights are packed once and reused; replacing them (set_weights, an
optimizer step) gives results of the new weights, never of the cached old ones; writeable
arrays are packed per call; entries go when their arrays go; a packed array of the wrong
size handed to a kernel is ignored."""

import gc

import numpy as np
import pytest

import fastseq
from fastseq import nn
from fastseq.contract import CellSpec

from _kernel_helpers import assert_close, make_params, make_state

@pytest.fixture
def registered(numba_backend):
    """The numba backend instance that fastseq.use_backend("numba") runs on."""
    from fastseq import backend as registry

    with fastseq.use_backend("numba"):
        b = registry.current()
    b.initialize()
    return b


CELLS = {
    "lstm": lambda: nn.rnn_cell.LSTMCell(12, use_peepholes=True, num_proj=7),
    "gru": lambda: nn.rnn_cell.GRUCell(10),
    "rnn": lambda: nn.rnn_cell.BasicRNNCell(9),
}


def _run(cell, x, lengths, backend):
    with fastseq.use_backend(backend):
        out, _ = nn.dynamic_rnn(cell, x, sequence_length=lengths, dtype=x.dtype)
    return out


def _grads(cell, x, lengths, backend, cot):
    with fastseq.use_backend(backend):
        _, pullback = fastseq.vjp(nn.dynamic_rnn, cell, x, sequence_length=lengths, dtype=x.dtype)
        return pullback(cot, None)


@pytest.mark.parametrize("kind", sorted(CELLS))
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_cell_weights_are_packed_once_and_replaced_weights_are_used(kind, dtype, registered):
    cache = registered.pack_cache
    rng = np.random.default_rng(3)
    x = rng.normal(size=(5, 9, 6)).astype(dtype)
    lengths = np.array([9, 0, 4, 9, 7])
    cell = CELLS[kind]()
    want = _run(cell, x, lengths, "numpy")  # builds the weights
    assert all(not w.flags.writeable for w in cell.trainable_variables)
    tol = 1e-5 if dtype == np.float32 else 1e-10
    hits, misses = cache.hits, cache.misses
    first = _run(cell, x, lengths, "numba")
    assert cache.misses > misses  # packed on the first call ...
    misses, hits = cache.misses, cache.hits
    second = _run(cell, x, lengths, "numba")
    assert cache.misses == misses and cache.hits > hits  # ... and reused on the second
    assert_close(first, want, tol, "first call")
    np.testing.assert_array_equal(second, first)

    # new weights through set_weights: the results follow them (a stale packed copy would not)
    new = {k: (v * 1.7 - 0.05).astype(v.dtype) for k, v in cell.get_weights().items()}
    old = cell.trainable_variables  # kept alive: their cache entries stay, and must not be used
    cell.set_weights(new)
    want2 = _run(cell, x, lengths, "numpy")
    got2 = _run(cell, x, lengths, "numba")
    assert np.abs(want2 - want).max() > 1e-2  # the change matters
    assert_close(got2, want2, tol, "after set_weights")
    assert all(a is not b for a, b in zip(old, cell.trainable_variables))

    # gradients (the transposed packing is cached too) agree with the reference on both calls
    cot = rng.normal(size=want2.shape).astype(dtype)
    ref = _grads(cell, x, lengths, "numpy", cot)
    for _ in range(2):
        got = _grads(cell, x, lengths, "numba", cot)
        assert_close(got.inputs, ref.inputs, tol, "d inputs")
        assert set(got.weights) == set(cell.get_weights())
        for name in ref.weights:
            assert_close(got.weights[name], ref.weights[name], tol, f"d {name}")


def test_optimizer_steps_replace_the_packed_weights(registered):
    """A training loop: each step's forward must use that step's weights."""
    from fastseq.train.optimizers import SGD

    rng = np.random.default_rng(5)
    x = rng.normal(size=(4, 8, 5))
    cell = nn.rnn_cell.LSTMCell(6)
    _run(cell, x, None, "numpy")
    opt = SGD(0.5)
    cot = rng.normal(size=(4, 8, 6))
    for step in range(3):
        want = _run(cell, x, None, "numpy")
        got = _run(cell, x, None, "numba")
        assert_close(got, want, 1e-10, f"step {step}")
        grads = _grads(cell, x, None, "numba", cot).weights
        cell.set_weights(opt.apply(cell.get_weights(), grads))


def test_writeable_arrays_are_packed_per_call(numba_backend, ref_backend):
    cache = numba_backend.pack_cache
    spec = CellSpec(kind="lstm", num_units=8)
    rng = np.random.default_rng(0)
    params = make_params(spec, 4, np.float64, rng)
    assert params["kernel"].flags.writeable
    x = rng.normal(size=(6, 3, 4))
    state = make_state(spec, 3, np.float64, rng)
    n = len(cache)
    hits, misses = cache.hits, cache.misses
    y1, _, _ = numba_backend.layer_forward(spec, params, x, state)
    params["kernel"][4:] *= 0.5  # in place: must be seen by the next call
    y2, _, _ = numba_backend.layer_forward(spec, params, x, state)
    ref = ref_backend.layer_forward(spec, params, x, state)[0]
    assert_close(y2, ref, 1e-10)
    assert np.abs(y2 - y1).max() > 1e-3
    assert (len(cache), cache.hits, cache.misses) == (n, hits, misses)
    # a read-only array whose writeable flag is switched back on is not served from the cache
    k = params["kernel"].copy()
    k.flags.writeable = False
    assert cache.get(k, 6, 4 * 32, 32, 8, 32, False) is not None
    k.flags.writeable = True
    assert cache.get(k, 6, 4 * 32, 32, 8, 32, False) is None
    assert cache.get(params["kernel"][1:], 6, 0, 32, 8, 32, False) is None  # a view: not owned


def test_entries_go_with_their_arrays(registered):
    cache = registered.pack_cache
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 7, 3)).astype(np.float32)
    before = len(cache)
    cells = [nn.rnn_cell.GRUCell(5) for _ in range(4)]
    for c in cells:
        _run(c, x, None, "numba")
    assert len(cache) == before + 2 * len(cells)  # two kernels per GRU
    del c, cells
    gc.collect()
    assert len(cache) == before


def test_cache_is_bounded():
    from fastseq_kernels._packed import PACK_MIN_STEPS, pack_if_worth

    from fastseq_numba._packcache import PackCache

    cache = PackCache(pack_if_worth, PACK_MIN_STEPS, max_entries=3)
    arrays = []
    for i in range(5):
        a = np.full((4, 8), float(i))
        a.flags.writeable = False
        arrays.append(a)
        cache.get(a, 5, 0, 8, 4, 8, False)
    assert len(cache) == 3
    assert cache.get(arrays[0], 2, 0, 8, 4, 8, False) is None  # a loop too short to pack


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_kernel_ignores_a_packed_array_of_the_wrong_size(dtype, numba_backend, ref_backend):
    from fastseq_kernels import rnn
    from fastseq_kernels._packed import pack_if_worth

    rng = np.random.default_rng(2)
    T, B, I, H = 6, 3, 4, 5
    x = rng.normal(size=(T, B, I)).astype(dtype)
    k = rng.normal(size=(I + H, H)).astype(dtype)
    b = rng.normal(size=H).astype(dtype)
    h0 = np.zeros((B, H), dtype)
    L = np.full(B, T, np.int64)
    e3 = np.zeros((0, 1, 1), dtype)
    right = pack_if_worth(T, k, I * H, H, H, H, False)
    base = rnn.rnn_forward(x, k, b, h0, L, False, e3, 0, False, 1, np.zeros(0, dtype), False)[0]
    np.testing.assert_array_equal(rnn.rnn_forward(x, k, b, h0, L, False, e3, 0, False, 1, right, False)[0], base)
    short = np.full(right.size - 1, 1e6, dtype)  # wrong size: ignored, the kernel packs itself
    np.testing.assert_array_equal(rnn.rnn_forward(x, k, b, h0, L, False, e3, 0, False, 1, short, False)[0], base)
    # the given array is what the kernel multiplies by when its size is right
    doubled = (right * 2).astype(dtype)
    k2 = k.copy()
    k2[I:] *= 2
    want = rnn.rnn_forward(x, k2, b, h0, L, False, e3, 0, False, 1, np.zeros(0, dtype), False)[0]
    assert_close(rnn.rnn_forward(x, k, b, h0, L, False, e3, 0, False, 1, doubled, False)[0], want, 1e-6)


def test_backend_hands_the_kernels_read_only_weights_without_touching_the_callers():
    """Weights reach the kernels read-only whether or not the caller's are (one compiled
    specialisation per dtype, the one fastseq_kernels.warmup compiles); a writable array
    of the caller's stays writable and unchanged; a read-only one is passed as is."""
    from fastseq_numba import _weights

    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    w = _weights(a, np.dtype(np.float32), "params['kernel']")
    assert not w.flags.writeable and a.flags.writeable
    assert np.shares_memory(w, a)
    np.testing.assert_array_equal(w, a)
    b = a.copy()
    b.flags.writeable = False
    assert _weights(b, np.dtype(np.float32), "params['kernel']") is b
    with pytest.raises(TypeError, match="params\\['kernel'\\]"):
        _weights(np.array(["x"]), np.dtype(np.float32), "params['kernel']")


def test_lstm_halves_layout_is_cached_and_follows_new_weights(registered, monkeypatch):
    """Few-row inference on two threads (fastseq_kernels.lstm.lstm_forward_pair) reads the
    weights in a layout of its own (pack_halves): packed on the first call, reused on the
    next, and never served for weights that replaced them. (Watched at the cache: patching
    ``lstm.pack_halves`` itself would reach the compiled kernels, which call it.)"""
    cache = registered.pack_cache
    seen = []
    real = cache.get_layout

    def spy(a, layout, pack, *args):
        misses = cache.misses
        out = real(a, layout, pack, *args)
        seen.append((layout, cache.misses > misses))
        return out

    monkeypatch.setattr(cache, "get_layout", spy)
    rng = np.random.default_rng(4)
    x = rng.normal(size=(1, 20, 6)).astype(np.float32)
    cell = nn.rnn_cell.LSTMCell(128)
    want = _run(cell, x, None, "numpy")
    with fastseq.threads.limit(2):
        first = _run(cell, x, None, "numba")
        assert seen == [("lstm_halves", True)]  # packed on the first call
        misses = cache.misses
        second = _run(cell, x, None, "numba")
        # not packed again: the backend's route for this call keeps the packed layout (or,
        # without one, the cache serves it)
        assert all(not missed for _, missed in seen[1:]) and cache.misses == misses
        del seen[1:]
        assert_close(first, want, 1e-5, "first call")
        np.testing.assert_array_equal(second, first)
        cell.set_weights({k: (v * 1.5).astype(v.dtype) for k, v in cell.get_weights().items()})
        want2 = _run(cell, x, None, "numpy")
        got2 = _run(cell, x, None, "numba")
        assert seen[1:] == [("lstm_halves", True)]  # the new weights packed anew
    assert np.abs(want2 - want).max() > 1e-2
    assert_close(got2, want2, 1e-5, "after set_weights")
