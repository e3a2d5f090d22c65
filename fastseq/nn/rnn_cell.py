"""Cells and wrappers with TF1's names, parameters, weight names and weight layouts.

Cells are parameter containers plus configuration; the arithmetic is done by the active
backend (see :mod:`fastseq.contract`). Internally every state is handled as nested
tuples of arrays (a plain cell's state is a tuple: ``(h,)`` or ``(c, h)``); the public
structures (``LSTMStateTuple``, a concatenated ``[c, h]`` when ``state_is_tuple=False``,
MultiRNNCell tuples) are converted at the edges by ``_to_internal`` / ``_to_public``.
Both conversions are linear, so they apply unchanged to gradients.
"""

from __future__ import annotations

import collections
import numbers

import numpy as np

from .. import activations
from .. import backend as _registry
from .. import random as _random
from ..contract import CellSpec

__all__ = [
    "RNNCell",
    "BasicRNNCell",
    "GRUCell",
    "BasicLSTMCell",
    "LSTMCell",
    "MultiRNNCell",
    "DropoutWrapper",
    "ResidualWrapper",
    "LSTMStateTuple",
]


class LSTMStateTuple(collections.namedtuple("LSTMStateTuple", ("c", "h"))):
    """``(c, h)``: the memory cell and the output state of an LSTM, as in TF1."""

    __slots__ = ()

    @property
    def dtype(self):
        c, h = self
        if getattr(c, "dtype", None) != getattr(h, "dtype", None):
            raise TypeError(f"LSTMStateTuple: inconsistent dtypes c={c.dtype} h={h.dtype}")
        return c.dtype


def _to_np(x):
    return x.numpy() if hasattr(x, "numpy") else np.asarray(x)


def _check_positive_int(value, argname):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise ValueError(f"{argname} must be a positive integer, got {value!r}")
    return int(value)


def _check_optional_positive(value, argname, integer=False):
    if value is None:
        return None
    if integer:
        return _check_positive_int(value, argname)
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value > 0:
        raise ValueError(f"{argname} must be a positive number or None, got {value!r}")
    return float(value)


def _dtype_of(x):
    if type(x) is np.ndarray:
        return x.dtype
    dt = getattr(x, "dtype", None)
    if dt is not None and hasattr(dt, "as_numpy_dtype"):
        return np.dtype(dt.as_numpy_dtype)
    return np.dtype(dt) if dt is not None else np.asarray(x).dtype


def _shape_of(x):
    if type(x) is np.ndarray:
        return x.shape
    shape = getattr(x, "shape", None)
    if shape is None:
        return np.shape(x)
    return tuple(None if d is None else int(d) for d in shape)


# ----------------------------------------------------------------------------- initialisers
def glorot_uniform(shape, dtype, rng):
    """TF's default variable initialiser (fan_in = fan_out = n for a vector)."""
    fan_in, fan_out = (shape[0], shape[0]) if len(shape) == 1 else (shape[0], shape[-1])
    limit = np.sqrt(6.0 / (fan_in + fan_out))
    return rng.uniform(-limit, limit, size=shape).astype(dtype)


def _initial_value(init, shape, dtype, rng, default):
    if init is None:
        return default(shape, dtype, rng)
    if isinstance(init, numbers.Real):
        return np.full(shape, init, dtype=dtype)
    value = _to_np(init(shape, dtype=dtype))
    if tuple(value.shape) != tuple(shape):
        raise ValueError(f"initializer returned shape {value.shape}, expected {tuple(shape)}")
    return value.astype(dtype)


def _zeros(shape, dtype, rng):
    return np.zeros(shape, dtype)


def _ones(shape, dtype, rng):
    return np.ones(shape, dtype)


# ----------------------------------------------------------------------------- base classes
class RNNCell:
    """Base class: ``state_size``, ``output_size``, ``zero_state``, one step by calling."""

    # ---- structure (overridden)
    @property
    def state_size(self):
        raise NotImplementedError

    @property
    def output_size(self):
        raise NotImplementedError

    def _leaves(self, prefix=""):
        """[(weight-name prefix, leaf cell)] in TF1's variable creation order."""
        raise NotImplementedError

    def _ensure_built(self, input_depth, dtype):
        raise NotImplementedError

    def _to_internal(self, state, batch, argname):
        raise NotImplementedError

    def _to_public(self, internal):
        raise NotImplementedError

    def _step(self, backend, x, internal):
        raise NotImplementedError

    # ---- public API
    @property
    def built(self):
        return all(leaf._weights is not None for _, leaf in self._leaves())

    def build(self, input_depth, dtype=None):
        """Create the weights for inputs of depth ``input_depth`` (as a Keras layer's build)."""
        if isinstance(input_depth, (tuple, list)):  # accept an input shape like Keras
            input_depth = input_depth[-1]
        input_depth = _check_positive_int(input_depth, "input_depth")
        self._ensure_built(input_depth, np.dtype(dtype or np.float32))
        return self

    def zero_state(self, batch_size, dtype):
        """Zeros shaped like ``state_size`` for ``batch_size`` rows (backend arrays)."""
        b = _registry.current()
        if isinstance(batch_size, (numbers.Integral, np.integer)) or not b.is_native(batch_size):
            batch_size = int(batch_size)
        dt = np.dtype(getattr(dtype, "as_numpy_dtype", dtype))
        return _map_sizes(self.state_size, lambda s: b.zeros((batch_size, s), dt))

    def _unique_leaves(self, prefix=""):
        seen, out = set(), []
        for p, leaf in self._leaves(prefix):
            if id(leaf) not in seen:
                seen.add(id(leaf))
                out.append((p, leaf))
        return out

    def get_weights(self):
        """OrderedDict of TF1 variable names (driver scope and ':0' removed) -> NumPy arrays."""
        out = collections.OrderedDict()
        for p, leaf in self._unique_leaves():
            if leaf._weights is None:
                raise ValueError(
                    f"{type(leaf).__name__} '{p}{leaf.name}' has no weights yet: call it, run it, or cell.build(input_depth)"
                )
            for rel, stored in leaf._weights.items():
                out[f"{p}{leaf.name}/{rel}"] = np.array(_to_np(stored), copy=True)
        return out

    def weight_names(self):
        """The names :meth:`get_weights` returns (the cell must be built)."""
        return list(self.get_weights())

    @property
    def trainable_variables(self):
        """The stored weights in :meth:`get_weights` order (``tf.Variable`` on the tensorflow
        backend, NumPy arrays elsewhere). The NumPy arrays are read-only: change weights with
        :meth:`set_weights` (writing into them after switching ``flags.writeable`` back on
        would leave the numba backend's packed copy of them stale)."""
        self.get_weights()  # raises a clear error when not built
        return [stored for _, leaf in self._unique_leaves() for stored in leaf._weights.values()]

    def set_weights(self, weights, scope=None):
        """Load weights by TF1 name. Keys may carry a driver scope and ':0' (``rnn/lstm_cell/
        kernel:0``); pass ``scope="bidirectional_rnn/fw"`` to take only that scope's keys.
        Every weight must be given, with its exact shape; unknown names are an error."""
        if not isinstance(weights, collections.abc.Mapping):
            raise TypeError(f"weights must be a mapping of names to arrays, got {type(weights).__name__}")
        slots = {}
        for p, leaf in self._unique_leaves():
            for rel in leaf._expected_names():
                slots[f"{p}{leaf.name}/{rel}"] = (leaf, rel)
        given = {}
        for key, value in weights.items():
            name = str(key)
            if name.endswith(":0"):
                name = name[:-2]
            if scope:
                prefix = scope.strip("/") + "/"
                if not name.startswith(prefix):
                    continue
                name = name[len(prefix):]
            elif name not in slots:
                for drv in ("rnn/", "bidirectional_rnn/fw/", "bidirectional_rnn/bw/"):
                    if name.startswith(drv):
                        name = name[len(drv):]
                        break
            given[name] = value
        unknown = sorted(set(given) - set(slots))
        missing = [n for n in slots if n not in given]
        if unknown or missing:
            raise ValueError(
                f"set_weights: names must match the cell's weights exactly; unknown: {unknown}, missing: {missing}; "
                f"expected names: {list(slots)}"
            )
        # build unbuilt leaves from the given kernel shapes, then check and assign
        for p, leaf in self._unique_leaves():
            values = {rel: _to_np(given[f"{p}{leaf.name}/{rel}"]) for rel in leaf._expected_names()}
            leaf._assign_all(values, prefix=p)
        return self

    def __call__(self, inputs, state, scope=None):
        """One step: ``inputs [B, I]``, ``state`` shaped like ``state_size``.
        Returns ``(output [B, output_size], new_state)``."""
        from .rnn import _prepare_step

        backend, x, internal = _prepare_step(self, inputs, state)
        out, new_internal = self._step(backend, x, internal)
        return out, self._to_public(new_internal)


def _map_sizes(size, fn):
    if isinstance(size, LSTMStateTuple):
        return LSTMStateTuple(*(fn(s) for s in size))
    if isinstance(size, tuple):
        return tuple(_map_sizes(s, fn) for s in size)
    return fn(size)


class _LeafCell(RNNCell):
    """A plain cell whose step the backend computes."""

    _kind = None
    _default_name = None

    def __init__(self, num_units, activation=None, reuse=None, name=None, dtype=None, **kwargs):
        unknown = set(kwargs) - {"_scope"}
        if unknown:
            raise TypeError(f"{type(self).__name__}() got unexpected keyword arguments {sorted(unknown)}")
        self.num_units = _check_positive_int(num_units, "num_units")
        self._activation_name = activations.resolve(activation)
        self.name = name or self._default_name
        self._weights = None  # OrderedDict rel-name -> stored (after build)
        self._input_depth = None
        self._build_dtype = np.dtype(getattr(dtype, "as_numpy_dtype", dtype)) if dtype is not None else None
        self._version = 0

    # ---- config
    def _spec_kwargs(self):
        return {}

    @property
    def spec(self) -> CellSpec:
        spec = self.__dict__.get("_spec")
        if spec is None:  # configuration is fixed at construction
            spec = self.__dict__["_spec"] = CellSpec(
                kind=self._kind, num_units=self.num_units, activation=self._activation_name, **self._spec_kwargs()
            )
        return spec

    @property
    def activation(self):
        return self._activation_name

    @property
    def output_size(self):
        return self.spec.output_size

    @property
    def state_size(self):
        return self.num_units

    def _leaves(self, prefix=""):
        return [(prefix, self)]

    # ---- weights
    def _expected_names(self):
        return list(self.spec.param_shapes(1))

    def _initializers(self):
        """rel-name -> (initializer or None, default)."""
        raise NotImplementedError

    def _ensure_built(self, input_depth, dtype):
        if self._weights is not None:
            if input_depth != self._input_depth:
                raise ValueError(
                    f"inputs: {type(self).__name__} '{self.name}' was built for input depth {self._input_depth}, "
                    f"got inputs of depth {input_depth}"
                )
            return
        dtype = self._build_dtype or np.dtype(dtype)
        rng = _random.generator()
        inits = self._initializers()
        values = collections.OrderedDict()
        for rel, shape in self.spec.param_shapes(input_depth).items():
            init, default = inits[rel]
            values[rel] = _initial_value(init, shape, dtype, rng, default)
        self._store(values, input_depth)

    def _store(self, values, input_depth):
        b = _registry.current()
        self._weights = collections.OrderedDict(
            (rel, _frozen(b.variable(v, f"{self.name}/{rel}"))) for rel, v in values.items()
        )
        self._input_depth = input_depth
        self._version += 1

    def _assign_all(self, values, prefix=""):
        kernel_name = "kernel" if "kernel" in values else "gates/kernel"
        k = values[kernel_name]
        if k.ndim != 2:
            raise ValueError(f"set_weights: '{prefix}{self.name}/{kernel_name}' must be 2-D, got shape {k.shape}")
        input_depth = self._input_depth or (k.shape[0] - self.output_size)
        if input_depth <= 0:
            raise ValueError(
                f"set_weights: '{prefix}{self.name}/{kernel_name}' has shape {k.shape}, too few rows for output size {self.output_size}"
            )
        expected = self.spec.param_shapes(input_depth)
        for rel, shape in expected.items():
            if tuple(values[rel].shape) != tuple(shape):
                raise ValueError(
                    f"set_weights: '{prefix}{self.name}/{rel}' must have shape {tuple(shape)}, got {tuple(values[rel].shape)}"
                )
            if not np.issubdtype(values[rel].dtype, np.floating):
                raise TypeError(f"set_weights: '{prefix}{self.name}/{rel}' must be floating point, got {values[rel].dtype}")
        if self._weights is None:
            dtype = self._build_dtype or values[kernel_name].dtype
            self._store(collections.OrderedDict((r, np.array(values[r], dtype=dtype)) for r in expected), input_depth)
            return
        for rel in expected:
            stored = self._weights[rel]
            if hasattr(stored, "assign"):
                stored.assign(np.asarray(values[rel], dtype=_dtype_of(stored)))
            else:
                self._weights[rel] = _frozen(np.array(values[rel], dtype=stored.dtype))
        self._version += 1

    def _params(self, backend, dtype):
        return {rel: backend.read_param(stored, dtype) for rel, stored in self._weights.items()}

    # ---- state
    def _to_internal(self, state, batch, argname):
        return (_check_state_array(state, self.num_units, batch, argname),)

    def _to_public(self, internal):
        return internal[0]

    def _step(self, backend, x, internal):
        return backend.cell_step(self.spec, self._params(backend, _dtype_of(x)), x, internal)

    def __repr__(self):
        return f"{type(self).__name__}(num_units={self.num_units}, name={self.name!r})"


def _frozen(stored):
    """NumPy weights are stored read-only: ``set_weights`` and the optimizers replace them,
    nothing writes into them, and the numba backend may then keep their packed copy across
    calls (``backends/fastseq_numba/_packcache.py``). Other storage (``tf.Variable``) as is."""
    if isinstance(stored, np.ndarray):
        if not stored.flags.owndata:
            stored = stored.copy()
        stored.flags.writeable = False
    return stored


def _check_state_array(state, size, batch, argname):
    if isinstance(state, (tuple, list)):
        raise ValueError(f"{argname}: expected one array of shape [batch, {size}], got a {type(state).__name__} of {len(state)}")
    shape = _shape_of(state)
    if len(shape) != 2 or shape[1] != size or (isinstance(batch, int) and shape[0] is not None and shape[0] != batch):
        raise ValueError(f"{argname}: expected shape [{batch if batch is not None else 'batch'}, {size}], got {list(shape)}")
    return state


class BasicRNNCell(_LeafCell):
    """``h' = activation([x, h] @ kernel + bias)``. Weights ``basic_rnn_cell/kernel``, ``/bias``."""

    _kind = "rnn"
    _default_name = "basic_rnn_cell"

    def _initializers(self):
        return {"kernel": (None, glorot_uniform), "bias": (None, _zeros)}


class GRUCell(_LeafCell):
    """TF1's GRU: the reset gate multiplies the state *before* the candidate matmul.
    Weights ``gru_cell/gates/kernel [I+H, 2H]`` (r, u), ``gates/bias`` (initialised to 1),
    ``candidate/kernel [I+H, H]``, ``candidate/bias``."""

    _kind = "gru"
    _default_name = "gru_cell"

    def __init__(self, num_units, activation=None, reuse=None, kernel_initializer=None, bias_initializer=None, name=None, dtype=None, **kwargs):
        super().__init__(num_units, activation=activation, reuse=reuse, name=name, dtype=dtype, **kwargs)
        self._kernel_initializer = kernel_initializer
        self._bias_initializer = bias_initializer

    def _initializers(self):
        k, b = self._kernel_initializer, self._bias_initializer
        return {
            "gates/kernel": (k, glorot_uniform),
            "gates/bias": (b, _ones),
            "candidate/kernel": (k, glorot_uniform),
            "candidate/bias": (b, _zeros),
        }


class _LSTMBase(_LeafCell):
    _kind = "lstm"

    def _init_state_style(self, state_is_tuple):
        if not isinstance(state_is_tuple, bool):
            raise TypeError(f"state_is_tuple must be a bool, got {state_is_tuple!r}")
        self._state_is_tuple = state_is_tuple

    @property
    def state_size(self):
        h, p = self.num_units, self.output_size
        return LSTMStateTuple(h, p) if self._state_is_tuple else h + p

    def _to_internal(self, state, batch, argname):
        h, p = self.num_units, self.output_size
        if self._state_is_tuple:
            if not isinstance(state, (tuple, list)) or len(state) != 2:
                raise ValueError(f"{argname}: expected an LSTMStateTuple(c [batch, {h}], h [batch, {p}]), got {type(state).__name__}")
            return (
                _check_state_array(state[0], h, batch, f"{argname}.c"),
                _check_state_array(state[1], p, batch, f"{argname}.h"),
            )
        arr = _check_state_array(state, h + p, batch, argname)
        b = _registry.current()
        c, m = b.split(arr, [h, p], axis=1)
        return (c, m)

    def _to_public(self, internal):
        if self._state_is_tuple:
            return LSTMStateTuple(internal[0], internal[1])
        return _registry.current().concat(list(internal), axis=1)


class BasicLSTMCell(_LSTMBase):
    """LSTM without peepholes, clipping or projection. Weights ``basic_lstm_cell/kernel
    [I+H, 4H]`` (gates i, j, f, o) and ``/bias``."""

    _default_name = "basic_lstm_cell"

    def __init__(self, num_units, forget_bias=1.0, state_is_tuple=True, activation=None, reuse=None, name=None, dtype=None, **kwargs):
        super().__init__(num_units, activation=activation, reuse=reuse, name=name, dtype=dtype, **kwargs)
        if isinstance(forget_bias, bool) or not isinstance(forget_bias, numbers.Real):
            raise TypeError(f"forget_bias must be a number, got {forget_bias!r}")
        self._forget_bias = float(forget_bias)
        self._init_state_style(state_is_tuple)

    def _spec_kwargs(self):
        return {"forget_bias": self._forget_bias}

    def _initializers(self):
        return {"kernel": (None, glorot_uniform), "bias": (None, _zeros)}


class LSTMCell(_LSTMBase):
    """LSTM with optional peepholes (``w_f_diag``, ``w_i_diag``, ``w_o_diag``), cell clipping,
    a projection (``projection/kernel [H, num_proj]``) and projection clipping."""

    _default_name = "lstm_cell"

    def __init__(
        self,
        num_units,
        use_peepholes=False,
        cell_clip=None,
        initializer=None,
        num_proj=None,
        proj_clip=None,
        num_unit_shards=None,
        num_proj_shards=None,
        forget_bias=1.0,
        state_is_tuple=True,
        activation=None,
        reuse=None,
        name=None,
        dtype=None,
        **kwargs,
    ):
        super().__init__(num_units, activation=activation, reuse=reuse, name=name, dtype=dtype, **kwargs)
        if not isinstance(use_peepholes, bool):
            raise TypeError(f"use_peepholes must be a bool, got {use_peepholes!r}")
        if isinstance(forget_bias, bool) or not isinstance(forget_bias, numbers.Real):
            raise TypeError(f"forget_bias must be a number, got {forget_bias!r}")
        self._use_peepholes = use_peepholes
        self._cell_clip = _check_optional_positive(cell_clip, "cell_clip")
        self._num_proj = _check_optional_positive(num_proj, "num_proj", integer=True)
        self._proj_clip = _check_optional_positive(proj_clip, "proj_clip")
        self._forget_bias = float(forget_bias)
        self._initializer = initializer
        self._init_state_style(state_is_tuple)

    def _spec_kwargs(self):
        return {
            "forget_bias": self._forget_bias,
            "use_peepholes": self._use_peepholes,
            "cell_clip": self._cell_clip,
            "num_proj": self._num_proj,
            "proj_clip": self._proj_clip if self._num_proj else None,
        }

    def _initializers(self):
        k = self._initializer
        return {
            "kernel": (k, glorot_uniform),
            "bias": (None, _zeros),
            "w_f_diag": (k, glorot_uniform),
            "w_i_diag": (k, glorot_uniform),
            "w_o_diag": (k, glorot_uniform),
            "projection/kernel": (k, glorot_uniform),
        }


# ----------------------------------------------------------------------------- composites
class MultiRNNCell(RNNCell):
    """Cells stacked in layers; weights under ``multi_rnn_cell/cell_<k>/``."""

    def __init__(self, cells, state_is_tuple=True):
        if isinstance(cells, RNNCell) or not isinstance(cells, (list, tuple)) or not cells:
            raise ValueError(f"cells must be a non-empty list of RNNCells, got {cells!r}")
        for k, c in enumerate(cells):
            if not isinstance(c, RNNCell):
                raise TypeError(f"cells[{k}] must be an RNNCell, got {type(c).__name__}")
        self._cells = list(cells)
        self._state_is_tuple = bool(state_is_tuple)
        if not self._state_is_tuple:
            for k, c in enumerate(self._cells):
                if isinstance(c.state_size, tuple):
                    raise ValueError(
                        f"MultiRNNCell(state_is_tuple=False) needs cells with non-tuple states; cells[{k}] has state_size {c.state_size}"
                    )

    @property
    def cells(self):
        return list(self._cells)

    @property
    def state_size(self):
        sizes = tuple(c.state_size for c in self._cells)
        return sizes if self._state_is_tuple else sum(sizes)

    @property
    def output_size(self):
        return self._cells[-1].output_size

    def _leaves(self, prefix=""):
        out = []
        for k, c in enumerate(self._cells):
            out.extend(c._leaves(f"{prefix}multi_rnn_cell/cell_{k}/"))
        return out

    def _ensure_built(self, input_depth, dtype):
        depth = input_depth
        for c in self._cells:
            c._ensure_built(depth, dtype)
            depth = c.output_size

    def zero_state(self, batch_size, dtype):
        """Each layer's own ``zero_state`` (as TF1's MultiRNNCell: a layer that overrides it
        starts from its own state), or one concatenated array of zeros when
        ``state_is_tuple=False``."""
        if self._state_is_tuple:
            return tuple(c.zero_state(batch_size, dtype) for c in self._cells)
        return super().zero_state(batch_size, dtype)

    def _to_internal(self, state, batch, argname):
        n = len(self._cells)
        if self._state_is_tuple:
            if not isinstance(state, (tuple, list)) or isinstance(state, LSTMStateTuple) or len(state) != n:
                raise ValueError(f"{argname}: expected a tuple of {n} layer states for MultiRNNCell, got {type(state).__name__}")
            return tuple(c._to_internal(s, batch, f"{argname}[{k}]") for k, (c, s) in enumerate(zip(self._cells, state)))
        arr = _check_state_array(state, self.state_size, batch, argname)
        parts = _registry.current().split(arr, [c.state_size for c in self._cells], axis=1)
        return tuple(c._to_internal(s, batch, f"{argname}[{k}]") for k, (c, s) in enumerate(zip(self._cells, parts)))

    def _to_public(self, internal):
        states = tuple(c._to_public(s) for c, s in zip(self._cells, internal))
        return states if self._state_is_tuple else _registry.current().concat(list(states), axis=1)

    def _step(self, backend, x, internal):
        new = []
        for c, s in zip(self._cells, internal):
            x, ns = c._step(backend, x, s)
            new.append(ns)
        return x, tuple(new)


class _Wrapper(RNNCell):
    def __init__(self, cell):
        if not isinstance(cell, RNNCell):
            raise TypeError(f"cell must be an RNNCell, got {type(cell).__name__}")
        self._cell = cell

    @property
    def wrapped_cell(self):
        return self._cell

    @property
    def state_size(self):
        return self._cell.state_size

    @property
    def output_size(self):
        return self._cell.output_size

    def _leaves(self, prefix=""):
        return self._cell._leaves(prefix)

    def _ensure_built(self, input_depth, dtype):
        self._cell._ensure_built(input_depth, dtype)

    def zero_state(self, batch_size, dtype):
        """The wrapped cell's (as TF1's wrappers)."""
        return self._cell.zero_state(batch_size, dtype)

    def _to_internal(self, state, batch, argname):
        return self._cell._to_internal(state, batch, argname)

    def _to_public(self, internal):
        return self._cell._to_public(internal)


def _check_keep_prob(value, argname):
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (0.0 < float(value) <= 1.0):
        raise ValueError(f"{argname} must be a number in (0, 1], got {value!r}")
    return float(value)


class DropoutWrapper(_Wrapper):
    """Dropout on a cell's inputs, outputs and carried state, as TF1's DropoutWrapper.

    Keep probabilities are plain attributes and may be changed between calls (what feeding
    a placeholder did in TF1; e.g. ``cell.output_keep_prob = 1.0`` for evaluation).
    Masks are ``floor(keep + U[0, 1)) / keep``. Without ``variational_recurrent`` a new mask is
    drawn for every step and element; with it, one mask of shape ``[1, depth]`` is used for
    every step and every batch row of a call (TF1 draws its noise with a batch dimension of 1).
    State dropout applies to ``h`` only for an ``LSTMStateTuple`` and to the whole state
    otherwise, as TF1's default state filter.
    """

    def __init__(
        self,
        cell,
        input_keep_prob=1.0,
        output_keep_prob=1.0,
        state_keep_prob=1.0,
        variational_recurrent=False,
        input_size=None,
        dtype=None,
        seed=None,
        dropout_state_filter_visitor=None,
        **kwargs,
    ):
        super().__init__(cell)
        if kwargs:
            raise TypeError(f"DropoutWrapper() got unexpected keyword arguments {sorted(kwargs)}")
        if dropout_state_filter_visitor is not None:
            raise ValueError("dropout_state_filter_visitor is not supported: fastseq uses TF1's default filter")
        self.input_keep_prob = input_keep_prob
        self.output_keep_prob = output_keep_prob
        self.state_keep_prob = state_keep_prob
        self._variational = bool(variational_recurrent)
        self._seed = seed
        self._rng = _random.new_generator(seed) if seed is not None else None
        self._step_noise = None  # variational masks reused across single-step calls

    for _name in ("input_keep_prob", "output_keep_prob", "state_keep_prob"):

        def _get(self, _n=_name):
            return self.__dict__["_" + _n]

        def _set(self, value, _n=_name):
            self.__dict__["_" + _n] = _check_keep_prob(_to_np(value).item() if hasattr(value, "shape") else value, _n)

        locals()[_name] = property(_get, _set)
    del _name, _get, _set

    @property
    def variational_recurrent(self):
        return self._variational

    def rng(self):
        return self._rng if self._rng is not None else _random.generator()

    def draw_mask(self, shape, keep, dtype):
        """A dropout mask (values 0 or 1/keep) of ``shape``, or None when keep == 1."""
        if keep >= 1.0:
            return None
        u = self.rng().random(shape)
        return (np.floor(keep + u) / keep).astype(dtype)

    def reset_noise(self):
        """Forget the variational masks kept between single-step calls."""
        self._step_noise = None

    def _step(self, backend, x, internal):
        dt = _dtype_of(x)
        batch = _shape_of(x)[0]
        if self._variational:
            if self._step_noise is None:
                self._step_noise = {}
            noise = self._step_noise
        else:
            noise = {}

        def mask(key, shape, keep):
            if keep >= 1.0:
                return None
            if key not in noise:
                noise[key] = self.draw_mask((1,) + tuple(shape[1:]) if self._variational else shape, keep, dt)
            return backend.asarray(noise[key])

        m = mask("input", _shape_of(x), self.input_keep_prob)
        if m is not None:
            x = backend.multiply(x, m)
        out, new = self._cell._step(backend, x, internal)
        if self.state_keep_prob < 1.0:
            new = _drop_state(self._cell, new, lambda path, s: mask(("state",) + path, _shape_of(s), self.state_keep_prob), backend)
        m = mask("output", (batch, self.output_size), self.output_keep_prob)
        if m is not None:
            out = backend.multiply(out, m)
        return out, new


def _state_dropout_paths(cell, path=()):
    """Paths (tuples of indices into the internal state) of the state components that state
    dropout applies to, following TF1's default filter (LSTMStateTuple: h only)."""
    if isinstance(cell, MultiRNNCell):
        out = []
        for k, c in enumerate(cell._cells):
            out.extend(_state_dropout_paths(c, path + (k,)))
        return out
    if isinstance(cell, _Wrapper):
        return _state_dropout_paths(cell._cell, path)
    if isinstance(cell, _LSTMBase):
        return [path + (1,)] if cell._state_is_tuple else [path + (0,), path + (1,)]
    return [path + (0,)]


def _drop_state(cell, internal, mask_fn, backend):
    """Apply ``mask_fn(path, component)`` masks to the dropped components of a state."""
    paths = set(_state_dropout_paths(cell))

    def walk(s, path):
        if isinstance(s, tuple):
            return tuple(walk(sub, path + (k,)) for k, sub in enumerate(s))
        if path in paths:
            m = mask_fn(path, s)
            return s if m is None else backend.multiply(s, m)
        return s

    return walk(internal, ())


class ResidualWrapper(_Wrapper):
    """``output = inputs + cell_output`` (or ``residual_fn(inputs, cell_output)``)."""

    def __init__(self, cell, residual_fn=None):
        super().__init__(cell)
        if residual_fn is not None and not callable(residual_fn):
            raise TypeError(f"residual_fn must be callable or None, got {type(residual_fn).__name__}")
        self._residual_fn = residual_fn

    def _ensure_built(self, input_depth, dtype):
        self._cell._ensure_built(input_depth, dtype)
        if self._residual_fn is None and self._cell.output_size != input_depth:
            raise ValueError(
                f"ResidualWrapper: inputs depth {input_depth} must equal the wrapped cell's output_size {self._cell.output_size}"
            )

    def _residual(self, backend, x, y):
        return backend.add(x, y) if self._residual_fn is None else self._residual_fn(x, y)

    def _step(self, backend, x, internal):
        out, new = self._cell._step(backend, x, internal)
        return self._residual(backend, x, out), new
