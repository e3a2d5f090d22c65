"""The backend contract: the one short set of operations every backend implements.

Everything above this line (argument checking, batch-major <-> time-major, nested
states, MultiRNNCell layer by layer, DropoutWrapper and ResidualWrapper, bidirectional
runs, raw_rnn's loop, gradients of that glue) lives in :mod:`fastseq.nn` and is written
once. A backend only knows how to run *one recurrent layer* of a plain cell.

Notation: ``T`` steps, ``B`` batch, ``I`` input depth, ``H`` ``num_units``, ``P`` the
recurrent output depth (``num_proj`` for a projected LSTMCell, else ``H``). Arrays are
time-major ``[T, B, ...]`` at this level, always.

Cells (:class:`CellSpec`)
-------------------------
``kind`` is one of ``"rnn"`` (BasicRNNCell), ``"gru"`` (GRUCell, TF1 variant), ``"lstm"``
(BasicLSTMCell and LSTMCell). ``params`` is a dict of arrays keyed by the TF1 variable name
*relative to the cell scope*, in TF1's layout:

- rnn:  ``kernel [I+H, H]``, ``bias [H]``
- gru:  ``gates/kernel [I+H, 2H]`` (columns r then u), ``gates/bias [2H]``,
        ``candidate/kernel [I+H, H]``, ``candidate/bias [H]``
- lstm: ``kernel [I+P, 4H]`` (columns i, j, f, o), ``bias [4H]``, and when
        ``use_peepholes``: ``w_f_diag [H]``, ``w_i_diag [H]``, ``w_o_diag [H]``; when
        ``num_proj``: ``projection/kernel [H, P]``.

The first ``I`` rows of every kernel multiply the input, the remaining rows the
recurrent state, so ``kernel[:I]`` and ``kernel[I:]`` are contiguous views: no repacking.

States are *always tuples* at this level: rnn/gru ``(h,)`` with ``h [B, H]``; lstm
``(c, h)`` with ``c [B, H]`` and ``h [B, P]``.

Math of one step (x: [B, I]; act = ``activation``; sigma = logistic sigmoid)::

    rnn:  h' = act([x, h] @ kernel + bias);                  output = h'
    gru:  r, u = split(sigma([x, h] @ gates/kernel + gates/bias))
          c~ = act([x, r * h] @ candidate/kernel + candidate/bias)
          h' = u * h + (1 - u) * c~;                          output = h'
    lstm: i, j, f, o = split([x, h] @ kernel + bias)
          c' = sigma(f + forget_bias [+ w_f_diag * c]) * c + sigma(i [+ w_i_diag * c]) * act(j)
          c' = clip(c', -cell_clip, cell_clip)                 if cell_clip is not None
          m  = sigma(o [+ w_o_diag * c']) * act(c')
          m  = m @ projection/kernel                           if num_proj is not None
          m  = clip(m, -proj_clip, proj_clip)                  if num_proj and proj_clip
          state' = (c', m);                                    output = m

Sequence semantics of :meth:`Backend.layer_forward` (TF1's ``dynamic_rnn``)::

    for t in 0..T-1 (or each sequence's steps in reverse when reverse=True):
        out, s_new = step(x[t], s)
        s_new = s_new * state_mask[t]           (per state component, where given)
        if sequence_length is None or t < len[b]:  s = s_new; y[t] = out
        else:                                      s unchanged;  y[t] = 0
    final state = s

``reverse=True`` runs every sequence backwards *within its own length* (as
``tf.reverse_sequence`` then ``dynamic_rnn`` then ``tf.reverse_sequence`` back): step k
reads ``x[len-1-k]`` and writes ``y[len-1-k]``; rows past the length stay zero.
With ``sequence_length=None`` every length is ``T``.

``state_mask`` is ``None`` or a tuple aligned with the state tuple whose entries are
``None`` or arrays ``[T, B, S]`` or ``[1, B, S]`` (the same mask at every step). It is the
DropoutWrapper's state dropout, already scaled (values 0 or 1/keep_prob). Masks index by
*processing step*: with ``reverse=True`` the mask for the step that reads ``x[t]`` is
``state_mask[t]`` as well (the original time index), so masks follow the data.

Gradients: :meth:`Backend.layer_backward` returns the exact gradients of the function
above (masks are constants). ``relu``'s derivative at 0 is 0 and ``clip``'s derivative
is 1 on the closed interval, as in TensorFlow.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

__all__ = ["CellSpec", "Backend", "ACTIVATIONS"]

#: Activation names every backend supports, in a fixed order (kernels may use the
#: index as an integer code).
ACTIVATIONS = ("tanh", "sigmoid", "relu", "relu6", "elu", "softsign", "softplus", "linear")


@dataclass(frozen=True)
class CellSpec:
    """Configuration of one plain recurrent cell (no wrappers). Hashable."""

    kind: str  # "rnn" | "gru" | "lstm"
    num_units: int
    activation: str = "tanh"
    forget_bias: float = 1.0  # lstm only
    use_peepholes: bool = False  # lstm only
    cell_clip: Optional[float] = None  # lstm only
    num_proj: Optional[int] = None  # lstm only
    proj_clip: Optional[float] = None  # lstm only

    @property
    def output_size(self) -> int:
        """Depth of the output and of the recurrent ``h`` (``P``)."""
        return self.num_proj if (self.kind == "lstm" and self.num_proj) else self.num_units

    @property
    def state_sizes(self) -> Tuple[int, ...]:
        """Sizes of the state tuple's components: ``(H,)`` or ``(H, P)`` for lstm."""
        if self.kind == "lstm":
            return (self.num_units, self.output_size)
        return (self.num_units,)

    def param_shapes(self, input_depth: int) -> Dict[str, Tuple[int, ...]]:
        """The params dict's names and shapes, in TF1's variable creation order."""
        i, h, p = input_depth, self.num_units, self.output_size
        if self.kind == "rnn":
            return {"kernel": (i + h, h), "bias": (h,)}
        if self.kind == "gru":
            return {
                "gates/kernel": (i + h, 2 * h),
                "gates/bias": (2 * h,),
                "candidate/kernel": (i + h, h),
                "candidate/bias": (h,),
            }
        if self.kind == "lstm":
            shapes = {"kernel": (i + p, 4 * h), "bias": (4 * h,)}
            if self.use_peepholes:
                shapes.update({"w_f_diag": (h,), "w_i_diag": (h,), "w_o_diag": (h,)})
            if self.num_proj:
                shapes["projection/kernel"] = (h, p)
            return shapes
        raise ValueError(f"CellSpec.kind must be 'rnn', 'gru' or 'lstm', got {self.kind!r}")


class Backend:
    """Base class of a fastseq backend. Subclass it and register an instance (or the class)
    under the entry-point group ``fastseq.backends``.

    A backend's module must import cheaply: heavy imports happen in :meth:`initialize`,
    which the registry calls once, the first time the backend is selected or used.

    Array ops (``asarray`` ... ``sequence_mask``) are what the shared drivers use to glue
    layers together; they must accept and return the backend's own array type (NumPy
    arrays for numpy/numba, ``tf.Tensor`` for tensorflow).
    """

    #: registry name, e.g. "numpy"
    name: str = "base"

    #: True when independent ``layer_forward``/``layer_backward`` calls may run on several
    #: Python threads at once and gain from it (compiled code that releases the GIL). The
    #: drivers then run the two directions of a bidirectional RNN side by side, each
    #: with its share of :func:`fastseq.threads.get_num_threads`.
    concurrent_layers: bool = False

    #: True when :meth:`layer_forward` also accepts ``batch_major=True``: inputs
    #: ``[B, T, I]`` and outputs ``[B, T, P]`` (``state_mask`` unchanged), and the
    #: :meth:`layer_backward` of that run takes ``d_outputs [B, T, P]`` and gives
    #: ``d_inputs [B, T, I]``. The drivers then run a plain cell on batch-major inputs
    #: (``time_major=False``, TF1's default) without transposed copies around the call.
    #: Such a backend's :meth:`stack_forward` takes ``batch_major=True`` too (inference:
    #: the drivers ask it for a MultiRNNCell of plain cells on batch-major inputs when not
    #: recording gradients).
    batch_major_layers: bool = False

    # ---------------------------------------------------------------- lifecycle
    def availability(self) -> Optional[str]:
        """``None`` when usable here, else a one-line reason (e.g. "numba is not
        installed: pip install numba"). Must not import heavy modules."""
        return None

    def initialize(self) -> None:
        """Heavy imports and one-time set-up. Called once before first use."""

    # ---------------------------------------------------------------- arrays
    def asarray(self, x: Any, dtype: Any = None) -> Any:
        """Convert to the backend's array type (no copy when already one)."""
        raise NotImplementedError

    def to_numpy(self, x: Any):
        """A NumPy view or copy of a backend array."""
        raise NotImplementedError

    def is_native(self, x: Any) -> bool:
        """True when ``x`` is already this backend's array type (used to decide whether a
        result is returned as a NumPy array or a backend array)."""
        raise NotImplementedError

    def zeros(self, shape, dtype) -> Any:
        """Zeros of ``shape``; entries of ``shape`` may be values returned by :meth:`dim`."""
        raise NotImplementedError

    def is_symbolic(self, x) -> bool:
        """True when ``x`` has no concrete value yet (a tensor being traced inside a
        ``tf.function``): the drivers then skip value checks done on the host."""
        return False

    def dim(self, x, axis: int):
        """Size of ``x`` along ``axis``: an int, or a backend scalar when unknown statically."""
        return x.shape[axis]

    def swap_batch_time(self, x) -> Any:
        """``[T, B, ...] <-> [B, T, ...]`` (contiguous result)."""
        raise NotImplementedError

    def stack(self, xs, axis: int = 0) -> Any:
        raise NotImplementedError

    def unstack(self, x, axis: int = 0):
        raise NotImplementedError

    def concat(self, xs, axis: int) -> Any:
        raise NotImplementedError

    def split(self, x, sizes, axis: int):
        raise NotImplementedError

    def add(self, a, b) -> Any:
        return a + b

    def multiply(self, a, b) -> Any:
        return a * b

    def where_rows(self, cond, a, b) -> Any:
        """``cond [B]`` bool; rows of ``a`` where cond else rows of ``b`` (``[B, ...]``)."""
        raise NotImplementedError

    def sequence_mask(self, lengths, maxlen: int, dtype) -> Any:
        """``[T, B, 1]`` time-major mask: 1 where ``t < lengths[b]`` else 0, in ``dtype``."""
        raise NotImplementedError

    def variable(self, value, name: str) -> Any:
        """Storage for a weight created from the NumPy array ``value`` (numpy/numba: the
        array itself; tensorflow: a ``tf.Variable``)."""
        return value

    def read_param(self, stored, dtype) -> Any:
        """A weight as used in compute, in ``dtype`` (cast if the stored dtype differs)."""
        raise NotImplementedError

    # ---------------------------------------------------------------- recurrent ops
    def layer_forward(
        self,
        spec: CellSpec,
        params: Dict[str, Any],
        inputs,
        initial_state: Tuple[Any, ...],
        sequence_length=None,
        reverse: bool = False,
        state_mask=None,
        need_grad: bool = False,
    ):
        """Run one layer over a whole sequence.

        inputs ``[T, B, I]``; initial_state tuple of ``[B, S]``; sequence_length ``None`` or
        int ``[B]`` (validated: ``0 <= len <= T``, NumPy int64).
        Returns ``(outputs [T, B, P], final_state tuple, workspace)``. ``workspace`` is
        whatever :meth:`layer_backward` needs (``None`` when ``need_grad`` is false).
        """
        raise NotImplementedError

    def layer_backward(self, spec: CellSpec, params, workspace, d_outputs, d_final_state):
        """Gradients of :meth:`layer_forward`.

        d_outputs ``[T, B, P]``; d_final_state tuple like the state (entries never None).
        Returns ``(d_inputs [T, B, I], d_initial_state tuple, d_params dict like params)``.
        """
        raise NotImplementedError

    def stack_forward(self, specs, params_list, inputs, initial_states, sequence_length=None, reverse=False,
                      need_grad=False):
        """Optional: run a stack of layers (a MultiRNNCell of plain cells, each layer's
        outputs the next one's inputs) in one call, as :meth:`layer_forward` per layer would.

        ``specs``/``params_list``/``initial_states``: one entry per layer, bottom first.
        Returns ``(outputs of the top layer, final states per layer, workspace)``, or
        ``None`` (the default) to have the drivers call :meth:`layer_forward` per layer.
        A backend gains from it where a call has a fixed cost (the tensorflow backend: one
        compiled dispatch instead of one per layer).
        """
        return None

    def layer_route(self, spec, params, inputs, initial_state, batch_major=False):
        """Optional: :meth:`stack_route` for one layer (an inference call of
        :meth:`layer_forward` with no ``sequence_length``, ``state_mask`` or ``reverse``):
        ``run(x) -> (outputs, final state)``, or ``None`` (the default)."""
        return None

    def stack_route(self, specs, params_list, inputs, initial_states, batch_major=False):
        """Optional: for an inference call :meth:`stack_forward` would run in one call, with
        no ``sequence_length`` and no ``reverse``, a callable ``run(x) -> (outputs, final
        states per layer)`` that runs it again for inputs ``x`` of the same shape and dtype
        (C-ordered), with these weights and initial states bound: the checks and the
        set-up made once. ``None`` (the default) where :meth:`stack_forward` would not
        run the stack. The drivers keep a route per cell, input shape, dtype and layout
        while the cell's layers and weight arrays stay the same (``fastseq.nn.rnn``)."""
        return None

    def stack_backward(self, specs, params_list, workspace, d_outputs, d_final_states):
        """Gradients of :meth:`stack_forward`: ``(d_inputs, d_initial_states per layer,
        [d_params dict per layer])``; ``d_final_states`` per layer, entries never None."""
        raise NotImplementedError

    def cell_step(self, spec: CellSpec, params, inputs, state):
        """One step: inputs ``[B, I]``, state tuple. Returns ``(output [B, P], new_state)``."""
        raise NotImplementedError
