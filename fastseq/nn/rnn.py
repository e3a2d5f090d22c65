"""The drivers: dynamic_rnn, bidirectional_dynamic_rnn, static_rnn,
static_bidirectional_rnn and raw_rnn, written once for every backend.

A driver validates its arguments (before any compiled code runs), converts to time-major,
walks the cell structure (MultiRNNCell layer by layer over the whole sequence, wrappers as
whole-sequence elementwise ops, the backward direction with ``reverse=True``), and calls
the backend for each plain layer. When gradients are requested every stage returns a
backward closure; ``fastseq.vjp`` chains them. Layer-by-layer evaluation gives exactly TF1's
results: past a sequence's length TF1 discards whatever a stacked cell computed.
"""

from __future__ import annotations

import numbers
import weakref
from types import SimpleNamespace

import numpy as np

from .. import backend as _registry
from .. import threads as _threads
from .rnn_cell import (
    DropoutWrapper,
    MultiRNNCell,
    ResidualWrapper,
    RNNCell,
    _dtype_of,
    _LeafCell,
    _shape_of,
    _state_dropout_paths,
    _Wrapper,
)

__all__ = ["dynamic_rnn", "bidirectional_dynamic_rnn", "static_rnn", "static_bidirectional_rnn", "raw_rnn", "EmitArray"]

_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))


# ============================================================================ validation
def _check_cell(cell, argname="cell"):
    if not isinstance(cell, RNNCell):
        raise TypeError(f"{argname} must be an RNNCell (e.g. fastseq.nn.rnn_cell.LSTMCell), got {type(cell).__name__}")


def _check_float_dtype(dt, argname):
    if dt not in _FLOATS:
        if np.issubdtype(dt, np.integer) or dt == np.bool_:
            raise TypeError(f"{argname} must be float32 or float64, got integer/bool dtype {dt}; cast it first")
        raise TypeError(f"{argname} must be float32 or float64, got {dt}")


def _resolve_dtype(dtype, argname="dtype"):
    if dtype is None:
        return None
    dt = getattr(dtype, "as_numpy_dtype", dtype)
    try:
        dt = np.dtype(dt)
    except TypeError as exc:
        raise TypeError(f"{argname} must be a dtype such as 'float32', got {dtype!r}") from exc
    _check_float_dtype(dt, argname)
    return dt


def _as_input(backend, inputs, argname="inputs"):
    if inputs is None:
        raise ValueError(f"{argname} must be an array, got None")
    if isinstance(inputs, (tuple, list)):
        raise TypeError(f"{argname}: nested input structures are not supported; pass one [batch, time, depth] array")
    native = backend.is_native(inputs)
    if not native:
        arr = np.asarray(inputs)
        if arr.dtype == object:
            raise TypeError(f"{argname} must be a numeric array, got ragged or object data")
        if arr.dtype.kind in "iub":
            raise TypeError(f"{argname} must be float32 or float64, got integer/bool dtype {arr.dtype}; cast it first")
        if arr.dtype == np.float16:
            arr = arr.astype(np.float32)
        inputs = backend.asarray(arr)
    dt = _dtype_of(inputs)
    _check_float_dtype(dt, argname)
    return inputs, dt, native


def _check_lengths(backend, sequence_length, batch, steps, argname="sequence_length"):
    if sequence_length is None:
        return None
    if backend.is_native(sequence_length) and backend.is_symbolic(sequence_length):
        return sequence_length  # traced inside tf.function: no host-side value checks possible
    raw = backend.to_numpy(sequence_length) if backend.is_native(sequence_length) else sequence_length
    arr = np.asarray(raw)
    if arr.dtype == object:
        raise TypeError(f"{argname} must be an integer vector of shape [{batch}], got ragged/object data")
    if arr.ndim != 1 or (isinstance(batch, int) and arr.shape[0] != batch):
        raise ValueError(f"{argname} must have shape [{batch}] (one length per batch row), got shape {list(arr.shape)}")
    if arr.dtype.kind == "f":
        if arr.size and not np.all(np.isfinite(arr) & (arr == np.round(arr))):
            raise TypeError(f"{argname} must hold integers, got non-integer values {arr[(arr != np.round(arr)) | ~np.isfinite(arr)][:3].tolist()}")
    elif arr.dtype.kind not in "iu":
        raise TypeError(f"{argname} must be an integer vector, got dtype {arr.dtype}")
    arr = arr.astype(np.int64)
    if arr.size and arr.min() < 0:
        raise ValueError(f"{argname} must be >= 0, got {int(arr.min())}")
    if arr.size and isinstance(steps, int) and arr.max() > steps:
        raise ValueError(f"{argname} must be <= the number of time steps ({steps}), got {int(arr.max())}")
    return arr


class _Ctx:
    """What one driver call shares between its stages."""

    def __init__(self, backend, dtype, lengths, steps, batch, record):
        self.backend = backend
        self.dtype = dtype
        self.lengths = lengths
        self.steps = steps
        self.batch = batch
        self.record = record
        self._seq_mask = None

    def seq_mask(self):
        if self._seq_mask is None:
            self._seq_mask = self.backend.sequence_mask(self.lengths, self.steps, self.dtype)
        return self._seq_mask

    def zeros_like_state(self, internal):
        if isinstance(internal, tuple):
            return tuple(self.zeros_like_state(s) for s in internal)
        return self.backend.zeros(_shape_of(internal), self.dtype)


class _Acc:
    """Accumulates weight gradients per plain cell (shared cells sum)."""

    def __init__(self, backend):
        self.backend = backend
        self.by_leaf = {}

    def add(self, leaf, grads):
        self._add(id(leaf), grads)

    def merge(self, other):
        for key, grads in other.by_leaf.items():
            self._add(key, grads)

    def _add(self, key, grads):
        cur = self.by_leaf.get(key)
        if cur is None:
            self.by_leaf[key] = dict(grads)
        else:
            for k, v in grads.items():
                cur[k] = self.backend.add(cur[k], v)

    def weights_of(self, cell, dtype):
        out = {}
        for p, leaf in cell._unique_leaves():
            g = self.by_leaf.get(id(leaf), {})
            for rel, stored in leaf._weights.items():
                # (not g.get(rel, zeros): the default would be made, and filled, for every weight)
                out[f"{p}{leaf.name}/{rel}"] = g[rel] if rel in g else self.backend.zeros(_shape_of(stored), dtype)
        return out


# ============================================================================ the sequence walk
def _run_stack(cells, x, state, ctx, reverse, batch_major=False):
    """A MultiRNNCell of plain layers in one backend call (:meth:`Backend.stack_forward`);
    ``None`` when the backend runs layers one by one. ``batch_major``: ``x`` is ``[B, T,
    I]`` and the backend takes that layout (``batch_major_layers``)."""
    b = ctx.backend
    specs = [c.spec for c in cells]
    params = [c._params(b, ctx.dtype) for c in cells]
    try:
        if batch_major:
            got = b.stack_forward(specs, params, x, tuple(state), ctx.lengths, reverse, ctx.record, batch_major=True)
        else:
            got = b.stack_forward(specs, params, x, tuple(state), ctx.lengths, reverse, ctx.record)
    except NotImplementedError:
        got = None
    if got is None:
        return None
    y, finals, ws = got

    def backward(dy, dfinal, acc):
        dx, d0, dps = b.stack_backward(specs, params, ws, dy, tuple(tuple(d) for d in dfinal))
        for c, dp in zip(cells, dps):
            acc.add(c, dp)
        return dx, tuple(tuple(d) for d in d0)

    return y, tuple(tuple(f) for f in finals), backward if ctx.record else None


def _chain_backward(backs):
    """The backward of layers run one after the other (a MultiRNNCell), from theirs."""
    def backward(dy, dfinal, acc):
        d0 = [None] * len(backs)
        for k in range(len(backs) - 1, -1, -1):
            dy, d0[k] = backs[k](dy, dfinal[k], acc)
        return dy, tuple(d0)

    return backward


def _run(cell, x, state, ctx, reverse, state_keeps=()):
    """Run ``cell`` over the time-major sequence ``x [T, B, I]`` from the internal state.

    ``state_keeps``: the state-dropout settings of enclosing DropoutWrappers, as
    (wrapper, set of internal-state paths relative to this cell). Returns
    ``(outputs [T, B, O], final internal state, backward)`` where
    ``backward(d_outputs, d_final, acc) -> (d_x, d_initial)`` (None when not recording).
    """
    b = ctx.backend
    if isinstance(cell, _LeafCell):
        params = cell._params(b, ctx.dtype)
        state_mask = _leaf_state_masks(cell, state_keeps, ctx) if state_keeps else None
        try:
            y, final, ws = b.layer_forward(cell.spec, params, x, state, ctx.lengths, reverse, state_mask, ctx.record)
            runner = b
        except NotImplementedError:
            # A backend may refuse a case (its fast path does not cover it): the reference
            # computes that layer on the host and the result is handed back to the backend.
            runner = _registry.load("numpy")
            host = _to_host(b, (params, x, state, state_mask))
            y, final, ws = runner.layer_forward(cell.spec, host[0], host[1], host[2], ctx.lengths, reverse, host[3], ctx.record)
            y, final = _from_host(b, y), _from_host(b, tuple(final))
        final = tuple(final)

        def backward(dy, dfinal, acc):
            if runner is b:
                dx, ds0, dp = b.layer_backward(cell.spec, params, ws, dy, tuple(dfinal))
            else:
                h = _to_host(b, (params, dy, tuple(dfinal)))
                dx, ds0, dp = _from_host(b, runner.layer_backward(cell.spec, h[0], ws, h[1], h[2]))
            acc.add(cell, dp)
            return dx, tuple(ds0)

        return y, final, backward if ctx.record else None

    if isinstance(cell, MultiRNNCell):
        if not state_keeps and all(isinstance(sub, _LeafCell) for sub in cell._cells):
            stacked = _run_stack(cell._cells, x, state, ctx, reverse)
            if stacked is not None:
                return stacked
        finals, backs = [], []
        h = x
        for k, sub in enumerate(cell._cells):
            sub_keeps = tuple((w, {p[1:] for p in paths if p and p[0] == k}) for w, paths in state_keeps)
            h, f, bw = _run(sub, h, state[k], ctx, reverse, sub_keeps)
            finals.append(f)
            backs.append(bw)
        return h, tuple(finals), _chain_backward(backs) if ctx.record else None

    if isinstance(cell, DropoutWrapper):
        T, B, depth = _shape_of(x)
        if (T is None or B is None) and (cell.input_keep_prob < 1 or cell.output_keep_prob < 1) and not cell.variational_recurrent:
            raise ValueError("DropoutWrapper needs static batch and time sizes (masks are drawn on the host)")
        var = cell.variational_recurrent
        in_mask = cell.draw_mask((1, 1, depth) if var else (T, B, depth), cell.input_keep_prob, ctx.dtype)
        if in_mask is not None:
            in_mask = b.asarray(in_mask)
            x = b.multiply(x, in_mask)
        keeps = state_keeps
        if cell.state_keep_prob < 1.0:
            keeps = keeps + ((cell, set(_state_dropout_paths(cell._cell))),)
        y, final, bw = _run(cell._cell, x, state, ctx, reverse, keeps)
        out_mask = cell.draw_mask((1, 1, cell.output_size) if var else (T, B, cell.output_size), cell.output_keep_prob, ctx.dtype)
        if out_mask is not None:
            out_mask = b.asarray(out_mask)
            y = b.multiply(y, out_mask)

        def backward(dy, dfinal, acc):
            if out_mask is not None:
                dy = b.multiply(dy, out_mask)
            dx, d0 = bw(dy, dfinal, acc)
            if in_mask is not None:
                dx = b.multiply(dx, in_mask)
            return dx, d0

        return y, final, backward if ctx.record else None

    if isinstance(cell, ResidualWrapper):
        y_in, final, bw = _run(cell._cell, x, state, ctx, reverse, state_keeps)
        if cell._residual_fn is not None and ctx.record:
            raise NotImplementedError("gradients through a custom ResidualWrapper residual_fn are not supported; use the default")
        y = cell._residual(b, x, y_in)
        if ctx.lengths is not None:  # TF1 zeroes the wrapped output past each length
            y = b.multiply(y, ctx.seq_mask())

        def backward(dy, dfinal, acc):
            if ctx.lengths is not None:
                dy = b.multiply(dy, ctx.seq_mask())
            dx, d0 = bw(dy, dfinal, acc)
            return b.add(dx, dy), d0

        return y, final, backward if ctx.record else None

    if isinstance(cell, _Wrapper):  # any other wrapper: state and outputs pass through
        return _run(cell._cell, x, state, ctx, reverse, state_keeps)
    raise TypeError(f"cell type {type(cell).__name__} cannot be run over a sequence by fastseq")


def _has_dropout(cell):
    if isinstance(cell, DropoutWrapper):
        return True
    if isinstance(cell, MultiRNNCell):
        return any(_has_dropout(c) for c in cell._cells)
    if isinstance(cell, _Wrapper):
        return _has_dropout(cell._cell)
    return False


def _concurrent(backend, cell_fw, cell_bw):
    return (getattr(backend, "concurrent_layers", False) and _threads.get_num_threads() >= 2
            and not _has_dropout(cell_fw) and not _has_dropout(cell_bw))


def _to_host(backend, tree):
    if isinstance(tree, dict):
        return {k: _to_host(backend, v) for k, v in tree.items()}
    if isinstance(tree, (tuple, list)):
        return type(tree)(_to_host(backend, v) for v in tree)
    return None if tree is None else np.asarray(backend.to_numpy(tree))


def _from_host(backend, tree):
    if isinstance(tree, dict):
        return {k: _from_host(backend, v) for k, v in tree.items()}
    if isinstance(tree, (tuple, list)):
        return type(tree)(_from_host(backend, v) for v in tree)
    return None if tree is None else backend.asarray(tree)


def _leaf_state_masks(leaf, state_keeps, ctx):
    """Per-component state masks for a plain cell from enclosing state-dropout wrappers."""
    T, B = ctx.steps, ctx.batch
    if not (isinstance(T, int) and isinstance(B, int)):
        raise ValueError("DropoutWrapper state dropout needs static batch and time sizes (masks are drawn on the host)")
    sizes = leaf.spec.state_sizes
    masks = [None] * len(sizes)
    for wrapper, paths in state_keeps:
        for comp in range(len(sizes)):
            if (comp,) not in paths:
                continue
            shape = (1, 1, sizes[comp]) if wrapper.variational_recurrent else (T, B, sizes[comp])
            m = wrapper.draw_mask(shape, wrapper.state_keep_prob, ctx.dtype)
            if m is None:
                continue
            masks[comp] = m if masks[comp] is None else masks[comp] * m
    if all(m is None for m in masks):
        return None
    return tuple(
        None if m is None else ctx.backend.asarray(np.ascontiguousarray(np.broadcast_to(m, (m.shape[0], B, m.shape[2]))))
        for m in masks
    )


# ============================================================================ shared set-up
def _setup(cell, x, dt, sequence_length, initial_state, dtype, time_major, backend, record, argprefix=""):
    """Validate and prepare one direction's run (``x`` in the caller's layout)."""
    B = backend.dim(x, 1 if time_major else 0)
    ddt = _resolve_dtype(dtype)
    if ddt is not None and ddt != dt:
        raise ValueError(f"dtype={ddt} does not match the inputs' dtype {dt}: mixed dtypes are not allowed")
    depth = _shape_of(x)[2]
    cell._ensure_built(depth, dt)
    if initial_state is None:
        state = _zero_internal(cell, B, dt, backend)
    else:
        state = cell._to_internal(initial_state, B, f"{argprefix}initial_state")
        _check_state_dtypes(backend, state, dt, f"{argprefix}initial_state")
    return state


def _library_zero_state(cell):
    """Whether ``cell`` starts from the library's zero state (does not override
    ``zero_state``)."""
    return type(cell).zero_state is RNNCell.zero_state


def _zero_internal(cell, batch, dt, backend):
    # A leaf's internal state is one array per entry of its spec's state sizes: for leaves
    # with the library's zero_state, alone or stacked, made directly (the public structure
    # of zero_state, then its checks, cost ~5 us a leaf; P2's stack after milliseconds of
    # kernel, when the interpreter runs cold: ~85 against ~57 us)
    def plain(c):
        return isinstance(c, _LeafCell) and _library_zero_state(c)

    def zeros(c):
        return tuple(backend.zeros((batch, n), dt) for n in c.spec.state_sizes)

    if isinstance(batch, int):
        if plain(cell):
            return zeros(cell)
        if type(cell) is MultiRNNCell and all(plain(c) for c in cell._cells):
            return tuple(zeros(c) for c in cell._cells)
    zero = cell.zero_state(batch, dt)
    return cell._to_internal(zero, batch, "zero_state")


def _check_state_dtypes(backend, state, dt, argname):
    if isinstance(state, tuple):
        for s in state:
            _check_state_dtypes(backend, s, dt, argname)
        return
    sdt = _dtype_of(state)
    if sdt != dt:
        raise ValueError(f"{argname} has dtype {sdt} but the inputs are {dt}: mixed dtypes are not allowed")


def _native_state(backend, state):
    if isinstance(state, tuple):
        return tuple(_native_state(backend, s) for s in state)
    return backend.asarray(state) if not backend.is_native(state) else state


def _prepare_inputs(backend, inputs, time_major, argname="inputs"):
    x, dt, native = _as_input(backend, inputs, argname)
    shape = _shape_of(x)
    if len(shape) != 3:
        layout = "[time, batch, depth]" if time_major else "[batch, time, depth]"
        raise ValueError(f"{argname} must have rank 3 {layout}, got shape {list(shape)}")
    if shape[2] == 0:
        raise ValueError(f"{argname} must have a non-zero feature depth, got shape {list(shape)}")
    return x, dt, native


def _steps_batch(backend, x, time_major):
    """``(T, B)`` of a sequence in the caller's layout."""
    if time_major:
        return backend.dim(x, 0), backend.dim(x, 1)
    return backend.dim(x, 1), backend.dim(x, 0)


#: Training a batch-major MultiRNNCell of plain layers on a backend with
#: ``batch_major_layers`` runs its layers one after the other in the caller's layout
#: (:func:`_run_batch_major`) rather than time-major between four transposed copies of
#: the whole sequence (inputs, outputs, their cotangents).
BATCH_MAJOR_TRAINING_STACKS = True


def _run_batch_major(cell, x, state, ctx, reverse):
    """:func:`_run` on a batch-major sequence ``x [B, T, I]``: outputs ``[B, T, O]``, and the
    backward takes and gives batch-major arrays. A plain cell on a backend with
    ``batch_major_layers`` (numba) runs in that layout, reading and writing the caller's
    arrays directly (the kernels gather and scatter rows anyway), and so does a
    MultiRNNCell of plain cells, as one stack job for inference where the backend runs it
    (:func:`_run_stack`) and layer after layer for training; anything else runs time-major
    between transposed copies."""
    b = ctx.backend
    if (isinstance(cell, MultiRNNCell) and getattr(b, "batch_major_layers", False)
            and all(isinstance(sub, _LeafCell) for sub in cell._cells)):
        if not ctx.record:
            stacked = _run_stack(cell._cells, x, state, ctx, reverse, batch_major=True)
            if stacked is not None:
                return stacked
        elif BATCH_MAJOR_TRAINING_STACKS:
            # training: layer after layer in the caller's layout, no transposed copies
            finals, backs = [], []
            h = x
            for k, sub in enumerate(cell._cells):
                h, f, bw = _run_batch_major(sub, h, state[k], ctx, reverse)
                finals.append(f)
                backs.append(bw)
            return h, tuple(finals), _chain_backward(backs)
    if isinstance(cell, _LeafCell) and getattr(b, "batch_major_layers", False):
        params = cell._params(b, ctx.dtype)
        try:
            y, final, ws = b.layer_forward(cell.spec, params, x, state, ctx.lengths, reverse, None, ctx.record,
                                           batch_major=True)
        except NotImplementedError:
            pass  # the time-major path below has the reference fallback
        else:
            def backward(dy, dfinal, acc):
                dx, ds0, dp = b.layer_backward(cell.spec, params, ws, dy, tuple(dfinal))
                acc.add(cell, dp)
                return dx, tuple(ds0)

            return y, tuple(final), backward if ctx.record else None
    y, final, bw = _run(cell, b.swap_batch_time(x), state, ctx, reverse)
    if bw is None:
        return b.swap_batch_time(y), final, None

    def backward_tm(dy, dfinal, acc):
        dx, d0 = bw(b.swap_batch_time(dy), dfinal, acc)
        return b.swap_batch_time(dx), d0

    return b.swap_batch_time(y), final, backward_tm


def _run_layout(cell, x, state, ctx, reverse, time_major):
    """:func:`_run` (time-major) or :func:`_run_batch_major`: outputs and gradients in the
    layout of ``x``."""
    if time_major:
        return _run(cell, x, state, ctx, reverse=reverse)
    return _run_batch_major(cell, x, state, ctx, reverse)


def _out(backend, value, native):
    """Return backend arrays when the caller passed backend arrays, else NumPy."""
    if value is None:
        return None
    if isinstance(value, tuple):
        return type(value)(*(_out(backend, v, native) for v in value)) if hasattr(value, "_fields") else tuple(_out(backend, v, native) for v in value)
    if isinstance(value, list):
        return [_out(backend, v, native) for v in value]
    if native:
        return value
    return np.asarray(backend.to_numpy(value))


def _cotangent(backend, d, shape, dt, argname):
    if d is None:
        return backend.zeros(shape, dt)
    arr = d if backend.is_native(d) else backend.asarray(np.asarray(d, dtype=dt))
    if tuple(_shape_of(arr)) != tuple(shape):
        raise ValueError(f"{argname} must have shape {list(shape)}, got {list(_shape_of(arr))}")
    return arr


def _state_cotangent(cell, backend, d_state, final_internal, batch, dt, argname):
    if d_state is None:
        return _zeros_like(backend, final_internal, dt)
    internal = cell._to_internal(_fill_none(d_state, cell.state_size, batch, dt, backend), batch, argname)
    return _native_state(backend, internal)


def _fill_none(d, size, batch, dt, backend):
    if d is None:
        if isinstance(size, tuple):
            return type(size)(*(_fill_none(None, s, batch, dt, backend) for s in size)) if hasattr(size, "_fields") else tuple(_fill_none(None, s, batch, dt, backend) for s in size)
        return backend.zeros((batch, size), dt)
    if isinstance(size, tuple) and isinstance(d, (tuple, list)) and len(d) == len(size):
        items = [_fill_none(di, si, batch, dt, backend) for di, si in zip(d, size)]
        return type(size)(*items) if hasattr(size, "_fields") else tuple(items)
    return d if backend.is_native(d) else backend.asarray(np.asarray(d, dtype=dt))


def _zeros_like(backend, internal, dt):
    if isinstance(internal, tuple):
        return tuple(_zeros_like(backend, s, dt) for s in internal)
    return backend.zeros(_shape_of(internal), dt)


# ============================================================================ dynamic_rnn
class _Route:
    """An inference call with no ``sequence_length`` and no ``initial_state``, of a plain
    cell or of a MultiRNNCell of plain cells the backend runs as one stack, as the
    backend's ``layer_route`` / ``stack_route`` runs it for one input shape, dtype and
    layout (``run``), and what it was made from: the layers, each layer's stored weights,
    the thread count, the ``dtype`` argument. A later call takes it while all of them are
    the same (:meth:`holds`): the same layer objects with the library's ``zero_state``, the
    same weight arrays, still read-only (``set_weights`` stores new ones), the same thread
    count and ``dtype`` argument. Everything else the first call's checks found holds for
    any input of that shape, dtype and layout. What it saves is the checks' and set-up's
    Python: P2's call after milliseconds of kernel (the interpreter's code and data out of
    the caches, as between a benchmark's calls) spent ~0.37 ms of it before the kernel,
    ~0.14 ms with the route."""

    __slots__ = ("cells", "arrays", "threads", "dtype_arg", "run")

    def __init__(self, cells, dtype_arg, run):
        # the layers weakly: the table is keyed weakly by the cell, and a value that held
        # its key would keep the cell (and its weights) alive for good
        self.cells = tuple(weakref.ref(c) for c in cells)
        self.arrays = tuple(a for c in cells for a in c._weights.values())
        self.threads = _threads.get_num_threads()
        self.dtype_arg = dtype_arg
        self.run = run

    @staticmethod
    def possible(cells):
        """Whether a route can stand for these layers: each starts from the library's zero
        state (an overriding ``zero_state`` may give other states each call) and every
        stored weight is a read-only NumPy array (not a variable that can change in
        place)."""
        return all(_library_zero_state(c)
                   and all(type(a) is np.ndarray and not a.flags.writeable for a in c._weights.values())
                   for c in cells)

    def holds(self, cells, dtype):
        if len(cells) != len(self.cells) or (dtype is not None and dtype is not self.dtype_arg):
            return False
        arrays = self.arrays
        i = 0
        for c, was in zip(cells, self.cells):
            if c is not was() or not _library_zero_state(c):
                return False
            for a in c._weights.values():
                if i == len(arrays) or a is not arrays[i] or a.flags.writeable:
                    return False
                i += 1
        return i == len(arrays) and _threads.get_num_threads() == self.threads


#: Each cell's routes (:class:`_Route`) by backend, input shape, dtype and layout; at most
#: ``_MAX_ROUTES`` a cell (past it the cell's table starts again empty).
_ROUTES = weakref.WeakKeyDictionary()
_MAX_ROUTES = 8


def _no_route(*args, **kwargs):
    """A backend without routes (an older third-party one): none."""
    return None


def _direct_inference(cell, inputs, sequence_length, initial_state, dtype, time_major):
    """``dynamic_rnn``'s most common calls in fewer steps: inference on a NumPy array, on a
    backend that runs layers in the caller's layout (``batch_major_layers``: numba), of a
    plain cell (no wrapper or stack: ``layer_forward``) or of a MultiRNNCell of plain cells
    the backend runs as one stack (``stack_forward``). The checks are the general path's
    (the same functions, in the same order); what it skips is the general path's machinery
    (its context, the layout dispatch, the closures, the conversion of the results): ~30 us
    of a small layer's call on the 2-vCPU machines (P1: 438 against 355 us through the API
    and alone, before this path), and for P2's stack ~190 against ~165 us right after a few
    milliseconds elsewhere (the interpreter's code and data out of the caches, as between a
    benchmark's calls; ~57 against ~51 us back to back). Returns None where the general
    path must run: any other call, a layer the backend refuses (``NotImplementedError``:
    the general path then falls back to the reference), a stack it runs layer by layer."""
    if type(inputs) is not np.ndarray or type(time_major) is not bool:
        return None
    leaf = isinstance(cell, _LeafCell)
    if not leaf and not (type(cell) is MultiRNNCell and all(isinstance(sub, _LeafCell) for sub in cell._cells)):
        return None
    backend = _registry.current()
    if (not getattr(backend, "batch_major_layers", False) or not backend.is_native(inputs) or inputs.ndim != 3
            or inputs.dtype not in _FLOATS or inputs.shape[2] == 0):
        return None
    dt = inputs.dtype
    routable = sequence_length is None and initial_state is None and inputs.flags.c_contiguous
    if routable:
        layers = (cell,) if leaf else cell._cells
        key = (backend, inputs.shape, dt, time_major)
        route = _ROUTES.get(cell, {}).get(key)
        if route is not None and route.holds(layers, dtype):
            y, final = route.run(inputs)
            return y, cell._to_public(final)
    T, B = (inputs.shape[0], inputs.shape[1]) if time_major else (inputs.shape[1], inputs.shape[0])
    lengths = _check_lengths(backend, sequence_length, B, T)
    state = _setup(cell, inputs, dt, lengths, initial_state, dtype, time_major, backend, False)
    if initial_state is not None:
        state = _native_state(backend, state)
    try:
        if leaf:
            params = cell._params(backend, dt)
        else:
            specs = [c.spec for c in cell._cells]
            params = [c._params(backend, dt) for c in cell._cells]
        if routable and _Route.possible(layers):
            if leaf:
                run = getattr(backend, "layer_route", _no_route)(cell.spec, params, inputs, state,
                                                                 batch_major=not time_major)
            else:
                run = getattr(backend, "stack_route", _no_route)(specs, params, inputs, tuple(state),
                                                                 batch_major=not time_major)
            if run is not None:
                routes = _ROUTES.setdefault(cell, {})
                if len(routes) >= _MAX_ROUTES:
                    routes.clear()
                routes[key] = _Route(layers, dtype, run)
                y, final = run(inputs)
                return y, cell._to_public(final)
        if leaf:
            y, final, _ = backend.layer_forward(cell.spec, params, inputs, state, lengths, False, None, False,
                                                batch_major=not time_major)
            return y, cell._to_public(tuple(final))
        got = backend.stack_forward(specs, params, inputs, tuple(state), lengths, False, False,
                                    batch_major=not time_major)
    except NotImplementedError:
        return None
    if got is None:
        return None
    y, finals, _ = got
    return y, cell._to_public(tuple(tuple(f) for f in finals))


def _dynamic_rnn(cell, inputs, sequence_length, initial_state, dtype, time_major, record):
    if not record:
        result = _direct_inference(cell, inputs, sequence_length, initial_state, dtype, time_major)
        if result is not None:
            return result, None
    _check_cell(cell)
    _check_bool(time_major, "time_major")
    backend = _registry.current()
    x, dt, native = _prepare_inputs(backend, inputs, time_major)
    T, B = _steps_batch(backend, x, time_major)
    lengths = _check_lengths(backend, sequence_length, B, T)
    state0 = _native_state(backend, _setup(cell, x, dt, lengths, initial_state, dtype, time_major, backend, record))
    ctx = _Ctx(backend, dt, lengths, T, B, record)
    outputs, final, bw = _run_layout(cell, x, state0, ctx, False, time_major)
    result = (_out(backend, outputs, native), _out(backend, cell._to_public(final), native))
    if not record:
        return result, None

    def pullback(d_outputs=None, d_state=None):
        out_shape = (T, B, cell.output_size) if time_major else (B, T, cell.output_size)
        dy = _cotangent(backend, d_outputs, out_shape, dt, "d_outputs")
        dfinal = _state_cotangent(cell, backend, d_state, final, B, dt, "d_state")
        acc = _Acc(backend)
        dx, d0 = bw(dy, dfinal, acc)  # both in the caller's layout
        return SimpleNamespace(
            inputs=_out(backend, dx, native),
            initial_state=_out(backend, cell._to_public(d0), native),
            weights=_out_dict(backend, acc.weights_of(cell, dt), native),
        )

    return result, pullback


def _out_dict(backend, d, native):
    return {k: _out(backend, v, native) for k, v in d.items()}


def _check_bool(value, argname):
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{argname} must be a bool, got {value!r}")


def dynamic_rnn(cell, inputs, sequence_length=None, initial_state=None, dtype=None, parallel_iterations=None, swap_memory=False, time_major=False, scope=None):
    """Run ``cell`` over ``inputs`` (``[B, T, I]``, or ``[T, B, I]`` when ``time_major``).

    Returns ``(outputs, state)``: ``outputs [B, T, output_size]`` (time-major when asked),
    zero past each row's ``sequence_length``; ``state`` the final state, i.e. the state after
    step ``len - 1`` (the initial state for length 0), shaped like ``cell.state_size``.
    ``dtype`` makes the zero state when ``initial_state`` is None (it must match the inputs'
    dtype). ``parallel_iterations``, ``swap_memory`` and ``scope`` are accepted for
    compatibility and ignored. Outputs are NumPy arrays unless the inputs are the active
    backend's own tensors (e.g. ``tf.Tensor`` on the tensorflow backend).
    """
    return _dynamic_rnn(cell, inputs, sequence_length, initial_state, dtype, time_major, record=False)[0]


def _dynamic_rnn_vjp(cell, inputs, sequence_length=None, initial_state=None, dtype=None, parallel_iterations=None, swap_memory=False, time_major=False, scope=None):
    return _dynamic_rnn(cell, inputs, sequence_length, initial_state, dtype, time_major, record=True)


# ============================================================================ bidirectional
def _bidirectional(cell_fw, cell_bw, inputs, sequence_length, initial_state_fw, initial_state_bw, dtype, time_major, record):
    _check_cell(cell_fw, "cell_fw")
    _check_cell(cell_bw, "cell_bw")
    _check_bool(time_major, "time_major")
    backend = _registry.current()
    x, dt, native = _prepare_inputs(backend, inputs, time_major)
    T, B = _steps_batch(backend, x, time_major)
    lengths = _check_lengths(backend, sequence_length, B, T)
    s_fw = _native_state(backend, _setup(cell_fw, x, dt, lengths, initial_state_fw, dtype, time_major, backend, record, "fw "))
    s_bw = _native_state(backend, _setup(cell_bw, x, dt, lengths, initial_state_bw, dtype, time_major, backend, record, "bw "))
    ctx = _Ctx(backend, dt, lengths, T, B, record)
    # The two directions are independent: on a backend whose layers may run side by side
    # (numba: the kernels release the GIL) they run on two threads, each with half of the
    # cores (fastseq.threads). Cells that draw dropout masks run one after the other, so
    # the masks drawn for a seed do not depend on thread timing.
    together = _concurrent(backend, cell_fw, cell_bw)

    # Each direction works in the caller's layout (_run_layout): where it needs transposed
    # copies, they are made in its own thread, side by side with the other direction's.
    if together:
        if lengths is not None:
            ctx.seq_mask()  # shared, computed once before the threads start
        (y_fw, f_fw, bw_fw), (y_bw, f_bw, bw_bw) = _threads.run_concurrently(
            lambda: _run_layout(cell_fw, x, s_fw, ctx, False, time_major),
            lambda: _run_layout(cell_bw, x, s_bw, ctx, True, time_major))
    else:
        y_fw, f_fw, bw_fw = _run_layout(cell_fw, x, s_fw, ctx, False, time_major)
        y_bw, f_bw, bw_bw = _run_layout(cell_bw, x, s_bw, ctx, True, time_major)
    outs = (y_fw, y_bw)
    result = (
        (_out(backend, outs[0], native), _out(backend, outs[1], native)),
        (_out(backend, cell_fw._to_public(f_fw), native), _out(backend, cell_bw._to_public(f_bw), native)),
    )
    if not record:
        return result, None

    def pullback(d_outputs=None, d_state=None):
        d_out_fw, d_out_bw = (None, None) if d_outputs is None else d_outputs
        d_st_fw, d_st_bw = (None, None) if d_state is None else d_state
        acc = _Acc(backend)
        jobs = []
        for c, d_out, d_st, final, bw in ((cell_fw, d_out_fw, d_st_fw, f_fw, bw_fw), (cell_bw, d_out_bw, d_st_bw, f_bw, bw_bw)):
            shape = (T, B, c.output_size) if time_major else (B, T, c.output_size)
            dy = _cotangent(backend, d_out, shape, dt, "d_outputs")
            jobs.append((c, bw, dy, _state_cotangent(c, backend, d_st, final, B, dt, "d_state"), _Acc(backend)))
        if together:
            res = _threads.run_concurrently(*[(lambda j=j: j[1](j[2], j[3], j[4])) for j in jobs])
        else:
            res = [j[1](j[2], j[3], j[4]) for j in jobs]
        dxs, d0s = [], []
        for (c, _, _, _, part), (dx, d0) in zip(jobs, res):
            acc.merge(part)  # each direction accumulated on its own (a shared cell sums here)
            dxs.append(dx)
            d0s.append(c._to_public(d0))
        dx = backend.add(dxs[0], dxs[1])  # the caller's layout
        w_fw = _out_dict(backend, acc.weights_of(cell_fw, dt), native)
        w_bw = w_fw if cell_bw is cell_fw else _out_dict(backend, acc.weights_of(cell_bw, dt), native)
        return SimpleNamespace(
            inputs=_out(backend, dx, native),
            initial_state=(_out(backend, d0s[0], native), _out(backend, d0s[1], native)),
            weights=(w_fw, w_bw),
        )

    return result, pullback


def bidirectional_dynamic_rnn(cell_fw, cell_bw, inputs, sequence_length=None, initial_state_fw=None, initial_state_bw=None, dtype=None, parallel_iterations=None, swap_memory=False, time_major=False, scope=None):
    """Forward and backward RNNs over ``inputs``; the backward one reads each sequence in
    reverse within its own length (as ``tf.reverse_sequence``) and its outputs are given
    back in the original time order. Returns ``((out_fw, out_bw), (state_fw, state_bw))``.
    Passing the same cell object twice shares its weights (as TF >= 1.2); its gradient in
    ``fastseq.vjp`` is then the sum over both directions (both dicts are that sum)."""
    return _bidirectional(cell_fw, cell_bw, inputs, sequence_length, initial_state_fw, initial_state_bw, dtype, time_major, False)[0]


def _bidirectional_vjp(cell_fw, cell_bw, inputs, sequence_length=None, initial_state_fw=None, initial_state_bw=None, dtype=None, parallel_iterations=None, swap_memory=False, time_major=False, scope=None):
    return _bidirectional(cell_fw, cell_bw, inputs, sequence_length, initial_state_fw, initial_state_bw, dtype, time_major, True)


# ============================================================================ static
def _stack_frames(backend, inputs, argname="inputs"):
    if not isinstance(inputs, (list, tuple)) or len(inputs) == 0:
        raise ValueError(f"{argname} must be a non-empty list of [batch, depth] arrays, got {type(inputs).__name__}")
    frames = []
    for t, f in enumerate(inputs):
        arr, _, _ = _as_input(backend, f, f"{argname}[{t}]")
        shape = _shape_of(arr)
        if len(shape) != 2:
            raise ValueError(f"{argname}[{t}] must have rank 2 [batch, depth], got shape {list(shape)}")
        if t and (shape != _shape_of(frames[0]) or _dtype_of(arr) != _dtype_of(frames[0])):
            raise ValueError(f"{argname}[{t}] has shape {list(shape)} / {_dtype_of(arr)}, but {argname}[0] has {list(_shape_of(frames[0]))} / {_dtype_of(frames[0])}")
        frames.append(arr)
    native = backend.is_native(inputs[0])
    return backend.stack(frames, axis=0), native


def _static_rnn(cell, inputs, initial_state, dtype, sequence_length, record):
    _check_cell(cell)
    backend = _registry.current()
    x, native = _stack_frames(backend, inputs)
    x = x if native else np.asarray(backend.to_numpy(x))
    (y, state), pb = _dynamic_rnn(cell, x, sequence_length, initial_state, dtype, True, record)
    outputs = list(backend.unstack(y, 0)) if native else [np.asarray(a) for a in y]
    result = (outputs, state)
    if not record:
        return result, None

    def pullback(d_outputs=None, d_state=None):
        dy = None if d_outputs is None else _stack_cotangents(backend, d_outputs, native)
        g = pb(dy, d_state)
        g.inputs = list(backend.unstack(g.inputs, 0)) if native else [np.asarray(a) for a in g.inputs]
        return g

    return result, pullback


def _stack_cotangents(backend, ds, native):
    if not isinstance(ds, (list, tuple)):
        raise TypeError(f"d_outputs must be a list of [batch, depth] arrays like the outputs, got {type(ds).__name__}")
    return backend.stack([d if backend.is_native(d) else backend.asarray(np.asarray(d)) for d in ds], axis=0) if native else np.stack([np.asarray(d) for d in ds])


def static_rnn(cell, inputs, initial_state=None, dtype=None, sequence_length=None, scope=None):
    """TF1's static_rnn on a list of ``[B, I]`` frames. Returns ``(outputs list, state)``.
    Same numbers as :func:`dynamic_rnn` on the stacked frames."""
    return _static_rnn(cell, inputs, initial_state, dtype, sequence_length, False)[0]


def _static_rnn_vjp(cell, inputs, initial_state=None, dtype=None, sequence_length=None, scope=None):
    return _static_rnn(cell, inputs, initial_state, dtype, sequence_length, True)


def _static_bidirectional(cell_fw, cell_bw, inputs, initial_state_fw, initial_state_bw, dtype, sequence_length, record):
    _check_cell(cell_fw, "cell_fw")
    _check_cell(cell_bw, "cell_bw")
    backend = _registry.current()
    x, native = _stack_frames(backend, inputs)
    x = x if native else np.asarray(backend.to_numpy(x))
    ((y_fw, y_bw), (s_fw, s_bw)), pb = _bidirectional(cell_fw, cell_bw, x, sequence_length, initial_state_fw, initial_state_bw, dtype, True, record)
    y = backend.concat([backend.asarray(y_fw), backend.asarray(y_bw)], axis=2)
    outputs = list(backend.unstack(y, 0)) if native else [np.asarray(backend.to_numpy(a)) for a in backend.unstack(y, 0)]
    result = (outputs, s_fw, s_bw)
    if not record:
        return result, None
    n_fw = cell_fw.output_size

    def pullback(d_outputs=None, d_state_fw=None, d_state_bw=None):
        d_pair = None
        if d_outputs is not None:
            dy = backend.asarray(_stack_cotangents(backend, d_outputs, native))
            d_fw, d_bw = backend.split(dy, [n_fw, cell_bw.output_size], axis=2)
            d_pair = (d_fw, d_bw) if native else (np.asarray(backend.to_numpy(d_fw)), np.asarray(backend.to_numpy(d_bw)))
        g = pb(d_pair, (d_state_fw, d_state_bw))
        g.inputs = list(backend.unstack(g.inputs, 0)) if native else [np.asarray(a) for a in g.inputs]
        return g

    return result, pullback


def static_bidirectional_rnn(cell_fw, cell_bw, inputs, initial_state_fw=None, initial_state_bw=None, dtype=None, sequence_length=None, scope=None):
    """TF1's static_bidirectional_rnn: returns ``(outputs, state_fw, state_bw)`` where each
    output frame is the forward and backward outputs concatenated ``[B, fw + bw]``."""
    return _static_bidirectional(cell_fw, cell_bw, inputs, initial_state_fw, initial_state_bw, dtype, sequence_length, False)[0]


def _static_bidirectional_vjp(cell_fw, cell_bw, inputs, initial_state_fw=None, initial_state_bw=None, dtype=None, sequence_length=None, scope=None):
    return _static_bidirectional(cell_fw, cell_bw, inputs, initial_state_fw, initial_state_bw, dtype, sequence_length, True)


# ============================================================================ single step + raw_rnn
def _prepare_step(cell, inputs, state):
    """Validation shared by ``cell(inputs, state)`` and raw_rnn."""
    backend = _registry.current()
    x, dt, _ = _as_input(backend, inputs)
    shape = _shape_of(x)
    if len(shape) != 2:
        raise ValueError(f"inputs must have rank 2 [batch, depth] for one step, got shape {list(shape)}")
    cell._ensure_built(shape[1], dt)
    internal = _native_state(backend, cell._to_internal(state, shape[0], "state"))
    _check_state_dtypes(backend, internal, dt, "state")
    return backend, x, internal


class EmitArray:
    """What raw_rnn emits: a growing list of ``[B, ...]`` frames with TensorArray's reading
    methods, so ``emit_ta.stack()`` ports unchanged from TF1."""

    def __init__(self, element_shape, dtype, backend):
        self._frames = []
        self._element_shape = tuple(element_shape)
        self._dtype = dtype
        self._backend = backend
        self._native = False

    def write(self, index, value):
        if index != len(self._frames):
            raise ValueError(f"EmitArray.write: expected index {len(self._frames)}, got {index}")
        self._frames.append(value)
        return self

    def read(self, index):
        return self._frames[index]

    def size(self):
        return len(self._frames)

    def __len__(self):
        return len(self._frames)

    def stack(self):
        """``[time, batch, ...]``."""
        if not self._frames:
            return self._finish(self._backend.zeros((0,) + self._element_shape, self._dtype))
        return self._finish(self._backend.stack(self._frames, axis=0))

    def unstack(self):
        return list(self._frames)

    def _finish(self, value):
        return value if self._native else np.asarray(self._backend.to_numpy(value))


def _map2(fn, a, b):
    if isinstance(a, tuple):
        items = [_map2(fn, x, y) for x, y in zip(a, b)]
        return type(a)(*items) if hasattr(a, "_fields") else tuple(items)
    return fn(a, b)


def _structure_like(x, fn):
    if isinstance(x, tuple):
        items = [_structure_like(v, fn) for v in x]
        return type(x)(*items) if hasattr(x, "_fields") else tuple(items)
    if isinstance(x, list):
        return [_structure_like(v, fn) for v in x]
    return fn(x)


def _same_structure(a, b):
    if isinstance(a, (tuple, list)):
        return isinstance(b, (tuple, list)) and len(a) == len(b) and all(_same_structure(x, y) for x, y in zip(a, b))
    return not isinstance(b, (tuple, list))


def raw_rnn(cell, loop_fn, parallel_iterations=None, swap_memory=False, scope=None, maximum_iterations=None):
    """TF1's raw_rnn: ``loop_fn(time, cell_output, cell_state, loop_state) -> (finished,
    next_input, next_cell_state, emit_output, next_loop_state)``. Finished rows emit zeros
    and keep their state. Returns ``(emit_ta, final_state, final_loop_state)``; ``emit_ta``
    (an :class:`EmitArray`, or a structure of them) has ``.stack()``. ``maximum_iterations``
    (not in TF1) optionally bounds the loop."""
    _check_cell(cell)
    if not callable(loop_fn):
        raise TypeError(f"loop_fn must be callable, got {type(loop_fn).__name__}")
    if maximum_iterations is not None and (not isinstance(maximum_iterations, numbers.Integral) or maximum_iterations < 0):
        raise ValueError(f"maximum_iterations must be a non-negative int or None, got {maximum_iterations!r}")
    backend = _registry.current()

    def call_loop(time, out, state, loop_state):
        res = loop_fn(time, out, state, loop_state)
        if not isinstance(res, (tuple, list)) or len(res) != 5:
            raise ValueError(
                "loop_fn must return a 5-tuple (finished, next_input, next_cell_state, emit_output, next_loop_state), "
                f"got {type(res).__name__}{'' if not isinstance(res, (tuple, list)) else ' of length %d' % len(res)}"
            )
        return res

    finished, next_input, state, emit_structure, loop_state = call_loop(0, None, None, None)
    if state is None:
        raise ValueError("loop_fn must return the initial cell state as next_cell_state when time == 0")
    fin = _finished_vector(backend, finished)
    native = backend.is_native(next_input)
    B = fin.shape[0]
    if isinstance(cell, DropoutWrapper):
        cell.reset_noise()
    x0, dt, _ = _as_input(backend, next_input, "next_input")
    cell._ensure_built(_shape_of(x0)[1], dt)
    if emit_structure is None:
        emit_template = _structure_like(cell.output_size, lambda s: (int(s),)) if isinstance(cell.output_size, tuple) else (int(cell.output_size),)
        emit_ta = _structure_like(cell.output_size, lambda s: EmitArray((B, int(s)), dt, backend)) if isinstance(cell.output_size, tuple) else EmitArray((B, int(cell.output_size)), dt, backend)
    else:
        emit_template = emit_structure
        emit_ta = _structure_like(emit_structure, lambda e: EmitArray(_shape_of(e), _dtype_of(e), backend))
    for ta in _leaves_of(emit_ta):
        ta._native = native
    time = 0
    while not bool(np.all(fin)):
        if maximum_iterations is not None and time >= maximum_iterations:
            break
        output, cell_state = cell(next_input, state)
        next_finished, next_input, next_state, emit, loop_state = call_loop(time + 1, output, cell_state, loop_state)
        if emit is None:
            emit = output
        if not _same_structure(next_state, state):
            raise ValueError("loop_fn: next_cell_state must have the same structure as the cell state")
        if emit_structure is not None and not _same_structure(emit, emit_template):
            raise ValueError("loop_fn: emit_output must keep the structure it had at time 0")
        next_fin = _finished_vector(backend, next_finished)
        if next_fin.shape != fin.shape:
            raise ValueError(f"loop_fn: finished must have shape [{B}], got {list(next_fin.shape)}")
        state = _map2(lambda old, new: backend.where_rows(fin, _native(backend, old), _native(backend, new)), state, next_state)
        emit = _structure_like(emit, lambda e: backend.where_rows(fin, backend.zeros(_shape_of(e), _dtype_of(e)), _native(backend, e)))
        for ta, e in zip(_leaves_of(emit_ta), _leaves_of(emit)):
            ta.write(time, e)
        fin = fin | next_fin
        time += 1
    state = _structure_like(state, lambda s: s if native else np.asarray(backend.to_numpy(s)))
    return emit_ta, state, loop_state


def _native(backend, x):
    return x if backend.is_native(x) else backend.asarray(x)


def _leaves_of(x):
    if isinstance(x, (tuple, list)):
        return [leaf for v in x for leaf in _leaves_of(v)]
    return [x]


def _finished_vector(backend, finished):
    raw = backend.to_numpy(finished) if backend.is_native(finished) else finished
    arr = np.asarray(raw)
    if arr.ndim != 1 or arr.dtype != np.bool_:
        raise ValueError(f"loop_fn: finished must be a bool vector [batch], got dtype {arr.dtype} shape {list(arr.shape)}")
    return arr.copy()
