"""fastseq's Numba backend: the contract of :mod:`fastseq.contract` on the fused CPU
kernels of :mod:`fastseq_kernels` (``rnn``, ``gru``, ``lstm``).

This module imports only NumPy; Numba, SciPy and the kernels are imported by
:meth:`NumbaBackend.initialize` (the registry calls it on first use). Arguments are
validated and normalised here (dtype, C order, int64 lengths, mask shapes) before any
compiled code runs; anything the kernels cannot do raises ``NotImplementedError``.
"""

from __future__ import annotations

import importlib.util
import weakref
from typing import Optional

import numpy as np

from fastseq.contract import ACTIVATIONS, Backend, CellSpec
from fastseq.reference import NumpyArrayOps
from fastseq.threads import get_num_threads

from ._packcache import PackCache

__all__ = ["NumbaBackend"]

_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))


def _lstm_plain(spec, masks):
    """Whether an LSTM layer is the common configuration the two-thread loops handle:
    tanh, no peepholes, cell clipping, projection or state masks."""
    return (spec.activation == "tanh" and not spec.use_peepholes and spec.cell_clip is None and not spec.num_proj
            and masks[0].shape[0] == 0 and masks[1].shape[0] == 0)


class _Workspace:
    """What :meth:`NumbaBackend.layer_backward` needs from a forward run."""

    __slots__ = ("ws", "T", "B", "I", "reverse", "masks", "dtype", "steps", "batch_major")

    def __init__(self, ws, T, B, I, reverse, masks, dtype, steps, batch_major):
        self.ws, self.T, self.B, self.I, self.reverse, self.masks, self.dtype = ws, T, B, I, reverse, masks, dtype
        self.steps = steps  # the longest sequence: steps of the time loop
        self.batch_major = batch_major  # d_outputs come, and d_inputs go, as [B, T, ...]


class _Route:
    """A layer's kernel call as :meth:`NumbaBackend._choose` bound it (kernel, packed
    weights, flags), kept for later calls with the same key (the spec, the inputs' shape
    and dtype, layout, direction, ``need_grad``, thread count) and the same read-only
    weight arrays. :meth:`run` checks what the key does not cover (the weights are these
    arrays and still read-only, the inputs and initial state C-ordered arrays of the right
    dtype and shapes) and returns None when anything differs, for the full path to
    validate and convert (and raise its errors). A route refers to its weights weakly and
    leaves the table when any of them is collected (with it go the packed copies it holds),
    so memory follows the live weights as in the pack cache."""

    __slots__ = ("call", "refs", "sizes", "T", "B", "I", "reverse", "masks", "dtype", "bm", "need_grad",
                 "__weakref__")

    def __init__(self, table, key, call, params, sizes, T, B, I, reverse, masks, dtype, bm, need_grad):
        me = weakref.ref(self)

        def gone(_ref):
            if table.get(key) is me():
                table.pop(key, None)

        self.call = call
        self.refs = tuple((name, weakref.ref(a, gone)) for name, a in params.items())
        self.sizes = sizes
        self.T, self.B, self.I, self.reverse, self.masks = T, B, I, reverse, masks
        self.dtype, self.bm, self.need_grad = dtype, bm, need_grad

    def run(self, params, x, initial_state):
        try:
            for name, ref in self.refs:
                a = params[name]
                if a is not ref() or a.flags.writeable:
                    return None
        except (KeyError, TypeError):
            return None
        if not x.flags.c_contiguous or len(initial_state) != len(self.sizes):
            return None
        dt, B = self.dtype, self.B
        for s, n in zip(initial_state, self.sizes):
            if type(s) is not np.ndarray or s.dtype != dt or s.shape != (B, n) or not s.flags.c_contiguous:
                return None
        T = self.T
        y, final, ws = self.call(x, initial_state, np.full(B, T, dtype=np.int64), params)
        if not self.need_grad:
            return y, final, None
        return y, final, _Workspace(ws, T, B, self.I, self.reverse, self.masks, dt, T if B else 0, self.bm)


#: The weights of a layer of each cell kind the stacked kernels take: its kernels (name,
#: columns per unit) and biases.
_STACK_LAYOUTS = {
    "gru": ((("gates/kernel", 2), ("candidate/kernel", 1)), ("gates/bias", "candidate/bias")),
    "lstm": ((("kernel", 4),), ("bias",)),
}


class _StackWeights:
    """A stack's weights as ``fastseq_kernels.gru.gru_stack_forward`` and
    ``lstm.lstm_stack_forward`` take them, per kernel name: every layer's recurrent rows
    packed and stacked (``rec``), the bottom layer's input rows packed (``in0``), the upper
    layers' packed and stacked (``ins``); the biases stacked (``bias``). Kept in the
    backend's table like a :class:`_Route`: it refers to the weights weakly and leaves the
    table when any of them is collected."""

    __slots__ = ("refs", "rec", "in0", "ins", "bias", "__weakref__")

    def __init__(self, table, key, kind, ps, I, H, kept):
        from fastseq_kernels._packed import pack_panels

        mats, biases = _STACK_LAYOUTS[kind]
        self.rec, self.in0, self.ins = {}, {}, {}
        for name, per in mats:
            n = per * H
            self.rec[name] = np.stack([pack_panels(p[name], (I if l == 0 else H) * n, n, H, n)
                                       for l, p in enumerate(ps)])
            self.in0[name] = pack_panels(ps[0][name], 0, n, I, n)
            self.ins[name] = np.stack([pack_panels(p[name], 0, n, H, n) for p in ps[1:]])
        self.bias = {name: np.stack([p[name] for p in ps]) for name in biases}
        if not kept:
            self.refs = ()
            return
        me = weakref.ref(self)

        def gone(_ref):
            if table.get(key) is me():
                table.pop(key, None)

        self.refs = tuple(weakref.ref(a, gone) for a in _stack_arrays(kind, ps))

    def holds(self, arrays):
        """Whether these are still the arrays it was made from, each still read-only."""
        return (len(arrays) == len(self.refs)
                and all(r() is a and not a.flags.writeable for r, a in zip(self.refs, arrays)))


def _stack_arrays(kind, ps):
    mats, biases = _STACK_LAYOUTS[kind]
    return [p[name] for p in ps for name in [m for m, _ in mats] + list(biases)]


def _contig(a, dtype, name):
    a = np.asarray(a)
    if a.dtype != dtype:
        if a.dtype.kind not in "fiu":
            raise TypeError(f"{name} must be a float array, got dtype {a.dtype}")
        a = a.astype(dtype)
    if not a.flags.c_contiguous:
        a = np.ascontiguousarray(a)
    return a


def _weights(a, dtype, name):
    """:func:`_contig` for a weight array, always read-only: a cell's stored weights are
    (``fastseq.nn.rnn_cell``), and giving the kernels the same array type for weights the
    caller passes in means one compiled specialisation per dtype, the one
    :func:`fastseq_kernels.warmup` compiles ahead of time (a writable weight array would
    compile a second set on first use). A writable array becomes a read-only view; the
    caller's array is not touched."""
    a = _contig(a, dtype, name)
    if a.flags.writeable:
        a = a.view()
        a.flags.writeable = False
    return a


class NumbaBackend(NumpyArrayOps, Backend):
    """Fused Numba kernels: one compiled call per layer, forward and backward."""

    name = "numba"
    #: Independent layers (the two directions of a bidirectional RNN) may run on separate
    #: threads at once: the kernels release the GIL and share nothing.
    concurrent_layers = True
    #: ``layer_forward(..., batch_major=True)``: the kernels read ``[B, T, I]`` inputs and
    #: write ``[B, T, P]`` outputs (and the backward the same layouts) in place of the
    #: transposed copies around a time-major call.
    batch_major_layers = True

    #: Most routes kept (:class:`_Route`); past it the table starts again empty.
    MAX_ROUTES = 64

    def __init__(self):
        self._k = None  # kernel modules, set by initialize()
        self._empty = {}
        self.pack_cache = None  # packed recurrent weights of read-only arrays (_packcache)
        self._routes = {}  # (spec, shape, dtype, layout, reverse, need_grad, threads) -> _Route
        self._stacks = {}  # ids of a stack's weights -> _StackWeights

    # ------------------------------------------------------------ lifecycle
    def availability(self) -> Optional[str]:
        for mod, hint in (("numba", "pip install numba"), ("scipy", "pip install scipy")):
            if importlib.util.find_spec(mod) is None:
                return f"{mod} is not installed: {hint}"
        return None

    def initialize(self) -> None:
        if self._k is not None:
            return
        from fastseq_kernels import _packed, gru, lstm, rnn

        from . import _malloc

        _malloc.apply_default()  # freed large buffers are reused, not re-faulted (see _malloc)
        self._k = {"rnn": rnn, "gru": gru, "lstm": lstm}
        self.pack_cache = PackCache(_packed.pack_if_worth, _packed.PACK_MIN_STEPS)
        for dt in _FLOATS:
            self._empty[dt] = (np.zeros(0, dt), np.zeros((0, 0), dt), np.zeros((0, 1, 1), dt))

    def _kernels(self):
        if self._k is None:
            self.initialize()
        return self._k

    # ------------------------------------------------------------ validation
    def _prepare(self, spec: CellSpec, params, inputs, initial_state, sequence_length, state_mask, batch_major):
        if spec.activation not in ACTIVATIONS:
            raise NotImplementedError(f"numba backend: unsupported activation {spec.activation!r}")
        if spec.kind not in ("rnn", "gru", "lstm"):
            raise NotImplementedError(f"numba backend: unsupported cell kind {spec.kind!r}")
        x = np.asarray(inputs)
        if x.ndim != 3:
            layout = "batch-major [B, T, I]" if batch_major else "time-major [T, B, I]"
            raise ValueError(f"inputs must be {layout}, got shape {x.shape}")
        dtype = x.dtype
        if dtype not in _FLOATS:
            raise TypeError(f"inputs must be float32 or float64, got dtype {dtype}")
        if not x.flags.c_contiguous:
            x = np.ascontiguousarray(x)
        T, B, I = (x.shape[1], x.shape[0], x.shape[2]) if batch_major else x.shape
        p, states = self._params_states(spec, params, initial_state, I, B, dtype)
        sizes = spec.state_sizes
        if sequence_length is None:
            lengths = np.full(B, T, dtype=np.int64)
        else:
            lengths = np.asarray(sequence_length)
            if lengths.shape != (B,):
                raise ValueError(f"sequence_length must have shape ({B},), got {lengths.shape}")
            if lengths.dtype.kind not in "iu":
                raise TypeError(f"sequence_length must be integers, got dtype {lengths.dtype}")
            lengths = np.ascontiguousarray(lengths, dtype=np.int64)
            if B and (lengths.min() < 0 or lengths.max() > T):
                raise ValueError(f"sequence_length must lie in [0, {T}], got min {lengths.min()} max {lengths.max()}")
        empty3 = self._empty[dtype][2]
        masks = []
        given = tuple(state_mask) if state_mask is not None else (None,) * len(sizes)
        if len(given) != len(sizes):
            raise ValueError(f"state_mask must have {len(sizes)} entries, got {len(given)}")
        for i, (m, n) in enumerate(zip(given, sizes)):
            if m is None:
                masks.append(empty3)
                continue
            m = _contig(m, dtype, f"state_mask[{i}]")
            if m.ndim != 3 or m.shape[0] not in (1, T) or m.shape[2] != n or m.shape[1] not in (1, B):
                raise ValueError(f"state_mask[{i}] must have shape [T or 1, B, {n}], got {m.shape}")
            if m.shape[1] != B:
                m = np.ascontiguousarray(np.broadcast_to(m, (m.shape[0], B, n)))
            masks.append(m)
        return x, (T, B, I), p, states, lengths, masks

    @staticmethod
    def _params_states(spec, params, initial_state, I, B, dtype, where=""):
        """A layer's weights (read-only, C-ordered, of ``dtype``) and initial state, checked
        against the shapes of ``spec`` on ``I`` inputs and ``B`` rows; ``where`` prefixes
        the argument names in the errors (a layer of a stack)."""
        p = {}
        for name, shape in spec.param_shapes(I).items():
            if name not in params:
                raise ValueError(f"{where}params: missing {name!r} for a {spec.kind} cell")
            a = _weights(params[name], dtype, f"{where}params[{name!r}]")
            if a.shape != shape:
                raise ValueError(f"{where}params[{name!r}] must have shape {shape}, got {a.shape}")
            p[name] = a
        sizes = spec.state_sizes
        if len(initial_state) != len(sizes):
            raise ValueError(f"{where}initial_state must be a tuple of {len(sizes)} arrays, got {len(initial_state)}")
        states = []
        for i, (s, n) in enumerate(zip(initial_state, sizes)):
            s = _contig(s, dtype, f"{where}initial_state[{i}]")
            if s.shape != (B, n):
                raise ValueError(f"{where}initial_state[{i}] must have shape {(B, n)}, got {s.shape}")
            states.append(s)
        return p, states

    def _packed(self, a, steps, boff, ldb, k, n, transposed):
        """``a``'s recurrent rows packed for the kernels, from the cache when ``a`` is read-only
        (see ``_packcache``); an empty array lets the kernel pack them itself."""
        got = self.pack_cache.get(a, steps, boff, ldb, k, n, transposed)
        return self._empty[a.dtype][0] if got is None else got

    @staticmethod
    def _clip(v):
        return -1.0 if v is None else float(v)

    # ------------------------------------------------------------ recurrent ops
    def layer_forward(self, spec, params, inputs, initial_state, sequence_length=None, reverse=False,
                      state_mask=None, need_grad=False, batch_major=False):
        """The contract's ``layer_forward``; with ``batch_major`` the inputs are ``[B, T, I]``
        and the outputs ``[B, T, P]`` (``state_mask`` stays ``[T or 1, B, n]``), and the
        backward of this run takes and gives ``[B, T, ...]`` too.

        A call without ``sequence_length`` or ``state_mask`` whose weights are read-only
        arrays (a cell's) reuses the route an earlier call of the same shapes, flags and
        weights chose (:class:`_Route`): the checks of the weights, the choice of kernel and
        the packed weights' lookup are made once, not every call."""
        k = self._kernels()
        bm = bool(batch_major)
        reverse = bool(reverse)
        need_grad = bool(need_grad)
        nt = get_num_threads()
        key = None
        if sequence_length is None and state_mask is None and type(inputs) is np.ndarray:
            key = (spec, inputs.shape, inputs.dtype, bm, reverse, need_grad, nt)
            route = self._routes.get(key)
            if route is not None:
                out = route.run(params, inputs, initial_state)
                if out is not None:
                    return out
        x, (T, B, I), p, states, lengths, masks = self._prepare(spec, params, inputs, initial_state,
                                                                sequence_length, state_mask, bm)
        steps = int(lengths.max()) if B else 0
        call = self._choose(k, spec, p, x.dtype, T, B, I, steps, masks, reverse, need_grad, nt, bm)
        y, final, ws = call(x, states, lengths, p)
        if key is not None and all(PackCache.cacheable(a) and a is params[n] for n, a in p.items()):
            if len(self._routes) >= self.MAX_ROUTES:
                self._routes.clear()
            self._routes[key] = _Route(self._routes, key, call, p, spec.state_sizes, T, B, I, reverse, masks, x.dtype,
                                       bm, need_grad)
        workspace = _Workspace(ws, T, B, I, reverse, masks, x.dtype, steps, bm) if need_grad else None
        return y, final, workspace

    def layer_route(self, spec, params, inputs, initial_state, batch_major=False):
        """The contract's ``layer_route``: for an inference call of one layer with no
        ``sequence_length``, ``state_mask`` or ``reverse`` whose weights are read-only
        arrays (a cell's), ``run(x) -> (outputs, final state)`` for later inputs ``x`` of
        the same shape and dtype, C-ordered: the kernel :meth:`_choose` picks with these
        weights (packed once, from the cache) and this initial state bound, the checks
        made now. ``None`` for weights that are not kept."""
        dt = getattr(inputs, "dtype", None)
        if not all(type(a) is np.ndarray and a.dtype == dt and PackCache.cacheable(a) for a in params.values()):
            return None  # before the checks: the drivers' layer_forward makes them next
        k = self._kernels()
        bm = bool(batch_major)
        x, (T, B, I), p, states, lengths, masks = self._prepare(spec, params, inputs, initial_state, None, None, bm)
        call = self._choose(k, spec, p, x.dtype, T, B, I, T if B else 0, masks, False, False, get_num_threads(), bm)
        states = tuple(states)

        def run(x):
            y, final, _ = call(x, states, np.full(B, T, dtype=np.int64), p)
            return y, tuple(final)
        return run

    #: Most stacks' packed weights kept (:class:`_StackWeights`); past it the table starts again empty.
    MAX_STACKS = 16

    def stack_forward(self, specs, params_list, inputs, initial_states, sequence_length=None, reverse=False,
                      need_grad=False, batch_major=False):
        """The contract's ``stack_forward`` for inference through a MultiRNNCell of plain
        layers of one kind and size, GRU or LSTM (tanh; no peepholes, clipping or
        projection), whose every layer the row-split two-thread loop would run
        (``fastseq_kernels.gru.stack_applies``, ``lstm.stack_applies``): one compiled
        two-thread job for the whole stack (``gru.gru_stack_forward``,
        ``lstm.lstm_stack_forward``), the numbers of the layers run one after another.
        ``None`` (layer by layer) for anything else, training included. ``batch_major`` as
        in :meth:`layer_forward`."""
        got = self._stack_runner(specs, params_list, inputs, initial_states, sequence_length, reverse, need_grad,
                                 batch_major)
        if got is None:
            return None
        run, x = got
        y, finals = run(x)
        return y, finals, None

    def stack_route(self, specs, params_list, inputs, initial_states, batch_major=False):
        """The contract's ``stack_route``: for a call :meth:`stack_forward` runs as one job
        with no ``sequence_length`` (inference), ``run(x) -> (outputs, final states)`` for
        later inputs ``x`` of the same shape and dtype, C-ordered, with these weights and
        initial states bound (checked now, packed once); ``None`` where it would not run.
        The drivers keep it while the cell's weights are the same read-only arrays
        (``fastseq.nn.rnn``): P2's call after milliseconds of kernel spends ~0.5 ms of
        cold Python in the checks and the set-up that the route does once."""
        got = self._stack_runner(specs, params_list, inputs, initial_states, None, False, False, batch_major)
        return None if got is None else got[0]

    def _stack_runner(self, specs, params_list, inputs, initial_states, sequence_length, reverse, need_grad,
                      batch_major):
        """``(run, x)`` for :meth:`stack_forward`: every check made, the weights packed (kept,
        :meth:`_stack_weights`) and the initial states stacked; ``run(x)`` the kernel call
        on the checked inputs ``x`` or others of their shape and dtype. ``None`` where the
        stack runs layer by layer."""
        if need_grad or len(specs) < 2:
            return None
        kind, H = specs[0].kind, specs[0].num_units
        if kind not in _STACK_LAYOUTS or any(sp.kind != kind or sp.activation != "tanh" or sp.num_units != H
                                             for sp in specs):
            return None
        if kind == "lstm" and any(sp.use_peepholes or sp.cell_clip is not None or sp.num_proj for sp in specs):
            return None
        k = self._kernels()
        nt = get_num_threads()
        bm = bool(batch_major)
        Ls = len(specs)
        if type(inputs) is np.ndarray and inputs.ndim == 3 and inputs.dtype in _FLOATS:
            # refused before the checks where the shapes already say no (the drivers then
            # run the layers one by one, checking each); lengths of any other kind or
            # shape go to the checks first, for their errors
            T, B = (inputs.shape[1], inputs.shape[0]) if bm else inputs.shape[:2]
            L = sequence_length
            if L is None or not B:
                most = T
            elif type(L) is np.ndarray and L.shape == (B,) and L.dtype.kind in "iu":
                most = int(L.max())
            else:
                most = None
            if most is not None and not k[kind].stack_applies(B, H, Ls, most, nt, inputs.dtype.itemsize, bm):
                return None
        x, (T, B, I), p0, s0, lengths, _ = self._prepare(specs[0], params_list[0], inputs, initial_states[0],
                                                         sequence_length, None, bm)
        steps = int(lengths.max()) if B else 0
        if not k[kind].stack_applies(B, H, Ls, steps, nt, x.dtype.itemsize, bm):
            return None
        ps, states = [p0], [s0]
        for l in range(1, Ls):
            p, st = self._params_states(specs[l], params_list[l], initial_states[l], H, B, x.dtype, f"layer {l}: ")
            ps.append(p)
            states.append(st)
        sw = self._stack_weights(kind, ps, I, H, x.dtype)
        s0 = np.stack([s[0] for s in states])  # GRU: h; LSTM: c
        reverse = bool(reverse)
        if kind == "gru":
            fwd = k["gru"].gru_stack_forward
            rest = (sw.bias["gates/bias"], sw.bias["candidate/bias"], sw.rec["gates/kernel"], sw.rec["candidate/kernel"],
                    (sw.in0["gates/kernel"], sw.ins["gates/kernel"]),
                    (sw.in0["candidate/kernel"], sw.ins["candidate/kernel"]), lengths, reverse, bm)

            def run(x):
                y, hT = fwd(x, s0, *rest)
                return y, tuple((hT[l],) for l in range(Ls))
            return run, x
        fwd = k["lstm"].lstm_stack_forward
        h0 = np.stack([s[1] for s in states])
        rest = (sw.bias["bias"], np.array([float(sp.forget_bias) for sp in specs]), sw.rec["kernel"],
                (sw.in0["kernel"], sw.ins["kernel"]), lengths, reverse, bm)

        def run(x):
            y, cT, hT = fwd(x, s0, h0, *rest)
            return y, tuple((cT[l], hT[l]) for l in range(Ls))
        return run, x

    def _stack_weights(self, kind, ps, I, H, dtype):
        """The packed weights and stacked biases of a stack (:class:`_StackWeights`), kept
        while every weight array is a live, read-only array that owns its data (the rule of
        ``_packcache``), else made for this call."""
        arrays = _stack_arrays(kind, ps)
        keep = all(PackCache.cacheable(a) for a in arrays)
        key = (kind, dtype.char, I, H) + tuple(id(a) for a in arrays)
        if keep:
            got = self._stacks.get(key)
            if got is not None and got.holds(arrays):
                return got
        sw = _StackWeights(self._stacks, key, kind, ps, I, H, keep)
        if keep:
            if len(self._stacks) >= self.MAX_STACKS:
                self._stacks.clear()
            self._stacks[key] = sw
        return sw

    def _choose(self, k, spec, p, dtype, T, B, I, steps, masks, reverse, need_grad, nt, bm):
        """The kernel that runs this layer, with every argument bound but the inputs, the
        initial state, the lengths and the weights (``w``, the dict ``p`` was checked from;
        a route must not hold them, see :class:`_Route`): ``call(x, states, lengths, w) ->
        (y, final, ws)``."""
        code = ACTIVATIONS.index(spec.activation)
        E1, E2, _ = self._empty[dtype]
        itemsize = dtype.itemsize
        if spec.kind == "lstm":
            lstm = k["lstm"]
            peep = spec.use_peepholes
            H4 = 4 * spec.num_units
            P = spec.output_size
            fb = float(spec.forget_bias)
            kernel = p["kernel"]
            plain = _lstm_plain(spec, masks)
            split = lstm.split_applies(B, spec.num_units, P, steps, plain, nt, itemsize)
            fuse = False
            if split:
                # the time loop on two threads sharing the rows or the units (fastseq_kernels/lstm.py)
                kp = self._packed(kernel, steps, I * H4, H4, P, H4, False)
                kpi = self._packed(kernel, steps, 0, H4, I, H4, False)  # input rows, for the projection

                def call(x, s, L, w):
                    y, cT, hT, ws = lstm.lstm_forward_split(x, w["kernel"], w["bias"], s[0], s[1], L, reverse, fb,
                                                            need_grad, nt, kp, bm, kpi)
                    return y, (cT, hT), ws

                return call
            # the input projection inside each step's product where that pays (lstm.fuse_applies)
            fuse = lstm.fuse_applies(B, I, P, spec.num_units, itemsize)
            if lstm.pair_applies(B, spec.num_units, steps, plain, nt, fuse, split, need_grad, itemsize):
                # few rows, large enough weights: each thread one half of the units every step
                kw = self.pack_cache.get_layout(kernel, "lstm_halves", lstm.pack_halves, I, spec.num_units)

                def call(x, s, L, w):
                    y, cT, hT = lstm.lstm_forward_pair(x, w["kernel"], w["bias"], s[0], s[1], L, reverse, fb, kw, bm)
                    return y, (cT, hT), None

                return call
            kp = (self._packed(kernel, steps, 0, H4, I + P, H4, False) if fuse
                  else self._packed(kernel, steps, I * H4, H4, P, H4, False))
            if lstm.stream_applies(B, steps, plain, nt, fuse, split, need_grad):
                # few rows: the input projection on the helper thread while this one runs the loop
                kpi = self._packed(kernel, steps, 0, H4, I, H4, False)

                def call(x, s, L, w):
                    y, cT, hT, ws = lstm.lstm_forward_stream(x, w["kernel"], w["bias"], s[0], s[1], L, reverse, fb,
                                                             need_grad, kp, bm, kpi)
                    return y, (cT, hT), ws

                return call
            proj = spec.num_proj
            cc, pc = self._clip(spec.cell_clip), self._clip(spec.proj_clip if proj else None)

            def call(x, s, L, w):
                wi, wf, wo = (w["w_i_diag"], w["w_f_diag"], w["w_o_diag"]) if peep else (E1, E1, E1)
                y, cT, hT, ws = lstm.lstm_forward(x, w["kernel"], w["bias"], wi, wf, wo,
                                                  w["projection/kernel"] if proj else E2, s[0], s[1], L, reverse,
                                                  masks[0], masks[1], code, fb, cc, pc, need_grad, nt, kp, fuse, bm)
                return y, (cT, hT), ws

            return call
        if spec.kind == "gru":
            gru = k["gru"]
            H = spec.num_units
            kg_, kc_ = p["gates/kernel"], p["candidate/kernel"]
            kg = self._packed(kg_, steps, I * 2 * H, 2 * H, H, 2 * H, False)
            kc = self._packed(kc_, steps, I * H, H, H, H, False)
            if gru.split_applies(B, H, steps, spec.activation == "tanh" and masks[0].shape[0] == 0, nt):
                # the time loop on two threads sharing the columns of each step (fastseq_kernels/gru.py)
                # the input rows packed too, for the projections
                kgi = self._packed(kg_, steps, 0, 2 * H, I, 2 * H, False)
                kci = self._packed(kc_, steps, 0, H, I, H, False)

                def call(x, s, L, w):
                    y, hT, ws = gru.gru_forward_split(x, w["gates/kernel"], w["gates/bias"], w["candidate/kernel"],
                                                      w["candidate/bias"], s[0], L, reverse, need_grad, kg, kc, bm,
                                                      kgi, kci)
                    return y, (hT,), ws

                return call

            def call(x, s, L, w):
                y, hT, ws = gru.gru_forward(x, w["gates/kernel"], w["gates/bias"], w["candidate/kernel"],
                                            w["candidate/bias"], s[0], L, reverse, masks[0], code, need_grad, nt, kg,
                                            kc, bm)
                return y, (hT,), ws

            return call
        rnn = k["rnn"]
        H = spec.num_units
        kp = self._packed(p["kernel"], steps, I * H, H, H, H, False)

        def call(x, s, L, w):
            y, hT, ws = rnn.rnn_forward(x, w["kernel"], w["bias"], s[0], L, reverse, masks[0], code, need_grad, nt, kp,
                                        bm)
            return y, (hT,), ws

        return call

    def layer_backward(self, spec, params, workspace, d_outputs, d_final_state):
        if not isinstance(workspace, _Workspace):
            raise ValueError("workspace must come from NumbaBackend.layer_forward(..., need_grad=True)")
        k = self._kernels()
        w = workspace
        dtype = w.dtype
        T, B, I = w.T, w.B, w.I
        code = ACTIVATIONS.index(spec.activation)
        P = spec.output_size
        bm = w.batch_major
        dy = _contig(d_outputs, dtype, "d_outputs")
        want = (B, T, P) if bm else (T, B, P)
        if dy.shape != want:
            raise ValueError(f"d_outputs must have shape {want}, got {dy.shape}")
        sizes = spec.state_sizes
        if len(d_final_state) != len(sizes):
            raise ValueError(f"d_final_state must have {len(sizes)} entries, got {len(d_final_state)}")
        ds = []
        for i, (d, n) in enumerate(zip(d_final_state, sizes)):
            d = np.zeros((B, n), dtype) if d is None else _contig(d, dtype, f"d_final_state[{i}]")
            if d.shape != (B, n):
                raise ValueError(f"d_final_state[{i}] must have shape {(B, n)}, got {d.shape}")
            ds.append(d)
        shapes = spec.param_shapes(I)
        p = {name: _weights(params[name], dtype, f"params[{name!r}]") for name in shapes}
        E1, E2, _ = self._empty[dtype]
        nt = get_num_threads()
        steps = w.steps
        if spec.kind == "lstm":
            peep = spec.use_peepholes
            H4 = 4 * spec.num_units
            kpt = self._packed(p["kernel"], steps, I * H4, H4, H4, spec.output_size, True)
            plain = _lstm_plain(spec, w.masks)
            if k["lstm"].split_applies(B, spec.num_units, P, steps, plain, nt, dtype.itemsize):
                # the time loop on two threads sharing the rows or the units of each step
                # (fastseq_kernels/lstm.py); the row split forms dx in the loop from kernel[:I]^T
                kpx = (self._packed(p["kernel"], steps, 0, H4, H4, I, True)
                       if k["lstm"].split_by_rows(B, spec.num_units, dtype.itemsize) else None)
                dx, dc0, dh0, dk, db, _ = k["lstm"].lstm_backward_split(w.ws, p["kernel"], dy, ds[0], ds[1], T,
                                                                        w.reverse, nt, kpt, bm, kpx)
                return dx, (dc0, dh0), {"kernel": dk, "bias": db}
            dx, dc0, dh0, dk, db, dwi, dwf, dwo, dproj = k["lstm"].lstm_backward(
                w.ws, p["kernel"], p["bias"],
                p["w_i_diag"] if peep else E1, p["w_f_diag"] if peep else E1, p["w_o_diag"] if peep else E1,
                p["projection/kernel"] if spec.num_proj else E2,
                dy, ds[0], ds[1], T, w.reverse, w.masks[0], w.masks[1], code,
                float(spec.forget_bias), self._clip(spec.cell_clip),
                self._clip(spec.proj_clip if spec.num_proj else None), nt, kpt, bm)
            grads = {"kernel": dk, "bias": db}
            if peep:
                grads.update({"w_f_diag": dwf, "w_i_diag": dwi, "w_o_diag": dwo})
            if spec.num_proj:
                grads["projection/kernel"] = dproj
            return dx, (dc0, dh0), grads
        H = spec.num_units
        if spec.kind == "gru":
            kct = self._packed(p["candidate/kernel"], steps, I * H, H, H, H, True)
            kgt = self._packed(p["gates/kernel"], steps, I * 2 * H, 2 * H, 2 * H, H, True)
            if k["gru"].split_applies(B, H, steps, spec.activation == "tanh" and w.masks[0].shape[0] == 0, nt):
                # the time loop on two threads sharing the units of each step (fastseq_kernels/gru.py)
                dx, dh0, dgk, dgb, dck, dcb = k["gru"].gru_backward_split(
                    w.ws, p["gates/kernel"], p["candidate/kernel"], dy, ds[0], T, w.reverse, nt, kct, kgt, bm)
            else:
                dx, dh0, dgk, dgb, dck, dcb = k["gru"].gru_backward(
                    w.ws, p["gates/kernel"], p["gates/bias"], p["candidate/kernel"], p["candidate/bias"], dy,
                    ds[0], T, w.reverse, w.masks[0], code, nt, kct, kgt, bm)
            return dx, (dh0,), {"gates/kernel": dgk, "gates/bias": dgb, "candidate/kernel": dck,
                                "candidate/bias": dcb}
        kpt = self._packed(p["kernel"], steps, I * H, H, H, H, True)
        dx, dh0, dk, db = k["rnn"].rnn_backward(w.ws, p["kernel"], p["bias"], dy, ds[0], T, w.reverse,
                                                w.masks[0], code, nt, kpt, bm)
        return dx, (dh0,), {"kernel": dk, "bias": db}

    def cell_step(self, spec, params, inputs, state):
        x = np.asarray(inputs)
        if x.ndim != 2:
            raise ValueError(f"inputs must be [B, I], got shape {x.shape}")
        y, new_state, _ = self.layer_forward(spec, params, x[None], tuple(state), None, False, None, False)
        return y[0], tuple(new_state)
