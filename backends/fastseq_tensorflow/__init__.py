"""The TensorFlow backend of fastseq: the backend contract on TensorFlow core ops.

Select it with ``FASTSEQ_BACKEND=tensorflow`` or ``fastseq.set_backend("tensorflow")``.
Importing this module is cheap: TensorFlow is imported by :meth:`TensorFlowBackend.initialize`
(the registry calls it the first time the backend is used), never at import time.

What runs where (see README.md in this folder):

- ``layer_forward``: one ``tf.function`` per cell configuration with shape-polymorphic
  input signatures (``None`` for ``T``, ``B`` and the depths), so new batch sizes or lengths
  do not retrace. Inside: the input projection of all steps as one matmul, then a
  ``tf.while_loop`` over time in which ``sequence_length`` is handled with ``tf.where``
  (no Python per step). ``jit_compile=True`` (attribute, or env ``FASTSEQ_TF_JIT=1``)
  compiles the same function with XLA.
- ``layer_backward``: hand-written backpropagation through time, compiled like the forward
  pass: the forward pass keeps per-step residuals, the backward loop does only the
  recurrent part and the weight gradients are large matmuls over all steps afterwards.
  ``fastseq.vjp`` calls it directly; under a ``tf.GradientTape`` the forward and backward
  functions are joined by ``tf.custom_gradient``.
- Paths per call: small float32 LSTM batches as the fused ``BlockLSTM`` op; batches of 16+
  rows as two half-batch recurrences; forward calls with lengths on a shrinking batch;
  the two directions of a bidirectional RNN on two threads (see README.md).
- ``stack_forward``/``stack_backward``: a MultiRNNCell of plain cells as one compiled
  call (the layers' compiled functions called inside one ``tf.function``).
- ``cell_step``: one compiled step per cell configuration.
- Devices: every op is placed by TensorFlow's placer, so ``with tf.device(...)`` scopes are
  honoured and CPU is used when no GPU is present. No cuDNN path is used (see README.md).
"""

from __future__ import annotations

import importlib.util
import os
import re

import numpy as np

from fastseq.contract import Backend

__all__ = ["TensorFlowBackend"]

_VAR_NAME_BAD = re.compile(r"[^A-Za-z0-9_.\-/]")

#: :meth:`TensorFlowBackend.zeros` keeps at most this many eager zero tensors, none over
#: ``_ZEROS_MAX_BYTES``.
_ZEROS_KEYS = 64
_ZEROS_MAX_BYTES = 1 << 20


def _could_record() -> bool:
    try:
        from tensorflow.python.eager import record
    except Exception:  # pragma: no cover - private module moved: assume a tape may be active
        return True
    return bool(record.could_possibly_record())


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no", "off")


class TensorFlowBackend(Backend):
    """fastseq on TensorFlow ops. Arrays are ``tf.Tensor``; weights are ``tf.Variable``.

    Attributes
    ----------
    jit_compile : bool
        Compile the recurrent loops with XLA (default: env ``FASTSEQ_TF_JIT``). Changing it
        after first use takes effect for configurations not yet compiled; call
        :meth:`clear_cache` to recompile everything.
    """

    name = "tensorflow"

    #: LSTM layers (tanh, float32, no clipping, projection or state masks) with at most
    #: this many rows run as TensorFlow's fused ``BlockLSTM`` op; larger batches use the
    #: generic loop, whose input projection as one matmul is faster there (measured: B=1
    #: 2.5x faster with the op, B=32 to 64 15-30% slower). 0 turns the op off.
    block_lstm_max_batch = 8
    #: Batches of at least this many rows run the time loop as two independent
    #: recurrences over the two halves of the rows (their per-step matmuls run side by
    #: side on two cores). 0 turns the split off.
    split_rows_min = 16
    #: Calls with ``sequence_length`` (no state masks; forward, and training's forward and
    #: backward passes) sort the rows by length and shrink the active batch as sequences
    #: finish.
    shrink_batch = True
    #: Training with ``sequence_length`` beside two row chains (``split_rows_min``) takes
    #: the shrinking batch only where the lengths cover at most this fraction of the
    #: ``[T, B]`` steps (one LSTM(256) layer, B=64, training step, shrinking batch against
    #: two chains of masked steps: lengths covering 55 % 1.37x, 80 % 1.10x, all 0.93x).
    packed_training_max_fill = 0.85
    #: The forward pass of a MultiRNNCell without ``sequence_length`` whose layers have at
    #: most this many units runs the layers as one wavefront loop (layer ``l`` at step
    #: ``t - l``, the layers' steps side by side on the cores; ``_kernels.run_stack_wave``)
    #: instead of one loop per layer; for training too (P2's step 1.06x), keeping what
    #: each layer's backward pass needs. Measured (forward, calls interleaved in one process,
    #: wavefront against layers in turn): 3 x GRU(200) B=32 1.35x, 2 x GRU(128) B=128
    #: 1.24x, 2 x LSTM(128) B=16 1.20x, 2 x LSTM(256) B=64 1.03x; 2 x LSTM(512) B=64 0.97x
    #: and 3 x GRU(512) B=32 0.87x (there one product a step is large enough to split across
    #: the cores and the hoisted projection pays). 0 turns it off.
    wave_max_units = 256
    #: Training on the wavefront forward also runs the backward pass as one wavefront
    #: loop (``_kernels.run_stack_backward_wave``) instead of the layers' in turn.
    wave_backward = True

    def __init__(self):
        self.jit_compile = _env_flag("FASTSEQ_TF_JIT")
        self._tf = None
        self._kernels = None
        self._zeros = {}

    # ------------------------------------------------------------------ lifecycle
    def availability(self):
        if importlib.util.find_spec("tensorflow") is None:
            return "tensorflow is not installed: pip install 'fastseq[tensorflow]' (tensorflow-cpu>=2.16)"
        return None

    def initialize(self):
        if self._tf is not None:
            return
        import tensorflow as tf

        from . import _kernels

        self._tf = tf
        self._kernels = _kernels.KernelCache(tf)

    def _ensure(self):
        if self._tf is None:
            self.initialize()
        return self._tf

    @property
    def concurrent_layers(self) -> bool:
        """Whether the drivers may run independent layers (the two directions of a
        bidirectional RNN) on two Python threads at once. TensorFlow releases the GIL while
        a compiled function runs, so eager calls overlap; but a GradientTape, a graph being
        traced and a ``tf.device`` scope all belong to the calling thread, so this is True
        only for eager calls with no tape active and no device scope set."""
        if self._tf is None:
            return False
        from tensorflow.python.eager import context

        if not self._tf.executing_eagerly() or context.context().device_name:
            return False
        return not _could_record()

    @property
    def trace_count(self) -> int:
        """How many times a compiled function of this backend has been traced (tests use it
        to check that new batch sizes and lengths do not retrace)."""
        self._ensure()
        return self._kernels.trace_count

    def clear_cache(self):
        """Drop every compiled function (they are rebuilt on next use)."""
        self._ensure()
        self._kernels.clear()

    # ------------------------------------------------------------------ arrays
    def _dtype(self, dtype):
        tf = self._ensure()
        if dtype is None:
            return None
        if isinstance(dtype, tf.DType):
            return dtype
        return tf.as_dtype(np.dtype(dtype))

    def asarray(self, x, dtype=None):
        tf = self._ensure()
        dt = self._dtype(dtype)
        if isinstance(x, (tf.Tensor, tf.Variable)):
            if dt is not None and x.dtype != dt:
                return tf.cast(x, dt)
            return tf.convert_to_tensor(x) if isinstance(x, tf.Variable) else x
        if dt is None:
            arr = np.asarray(x)
            return tf.convert_to_tensor(arr)
        return tf.convert_to_tensor(np.asarray(x, dtype=dt.as_numpy_dtype))

    def to_numpy(self, x):
        tf = self._ensure()
        if isinstance(x, (tf.Tensor, tf.Variable)):
            return x.numpy()
        return np.asarray(x)

    def is_native(self, x):
        tf = self._ensure()
        return isinstance(x, (tf.Tensor, tf.Variable))

    def zeros(self, shape, dtype):
        """``tf.zeros``; eagerly, the same tensor again for the same shape, dtype and device
        (tensors are immutable): the zero states of every call would otherwise cost an
        eager op each, ~40-110 us on the 2-vCPU machines (a three-layer stack's three)."""
        tf = self._ensure()
        dt = self._dtype(dtype)
        if not tf.executing_eagerly() or not all(isinstance(d, (int, np.integer)) for d in shape):
            return tf.zeros(shape, dtype=dt)
        from tensorflow.python.eager import context

        key = (tuple(int(d) for d in shape), dt, context.context().device_name)
        z = self._zeros.get(key)
        if z is None:
            z = tf.zeros(shape, dtype=dt)
            if z.shape.num_elements() * dt.size <= _ZEROS_MAX_BYTES:
                if len(self._zeros) >= _ZEROS_KEYS:
                    self._zeros.clear()
                self._zeros[key] = z
        return z

    def is_symbolic(self, x):
        tf = self._ensure()
        return isinstance(x, (tf.Tensor, tf.Variable)) and not tf.executing_eagerly()

    def dim(self, x, axis):
        tf = self._ensure()
        static = x.shape[axis]
        return int(static) if static is not None else tf.shape(x)[axis]

    def swap_batch_time(self, x):
        tf = self._ensure()
        x = self.asarray(x)
        rank = x.shape.rank
        return tf.transpose(x, [1, 0] + list(range(2, rank)))

    def stack(self, xs, axis=0):
        tf = self._ensure()
        return tf.stack([self.asarray(a) for a in xs], axis=axis)

    def unstack(self, x, axis=0):
        tf = self._ensure()
        x = self.asarray(x)
        n = x.shape[axis]
        if n is None:
            n = int(tf.shape(x)[axis])
        return tf.unstack(x, num=n, axis=axis)

    def concat(self, xs, axis):
        tf = self._ensure()
        return tf.concat([self.asarray(a) for a in xs], axis=axis)

    def split(self, x, sizes, axis):
        tf = self._ensure()
        return tf.split(self.asarray(x), [int(s) for s in sizes], axis=axis)

    def add(self, a, b):
        tf = self._ensure()
        return tf.add(self.asarray(a), self.asarray(b))

    def multiply(self, a, b):
        tf = self._ensure()
        return tf.multiply(self.asarray(a), self.asarray(b))

    def where_rows(self, cond, a, b):
        tf = self._ensure()
        a, b = self.asarray(a), self.asarray(b)
        cond = tf.cast(self.asarray(cond), tf.bool)
        rank = max(a.shape.rank, b.shape.rank)
        cond = tf.reshape(cond, [-1] + [1] * (rank - 1))
        return tf.where(cond, a, b)

    def sequence_mask(self, lengths, maxlen, dtype):
        tf = self._ensure()
        lengths = self.asarray(lengths)
        mask = tf.sequence_mask(lengths, maxlen, dtype=self._dtype(dtype))  # [B, T]
        return tf.transpose(mask)[:, :, None]

    def variable(self, value, name):
        tf = self._ensure()
        clean = _VAR_NAME_BAD.sub("_", str(name).replace(":0", "")).strip("/") or "weight"
        if not re.match(r"[A-Za-z0-9.]", clean[0]):
            clean = "w" + clean
        return tf.Variable(np.asarray(value), name=clean, trainable=True)

    def read_param(self, stored, dtype):
        tf = self._ensure()
        dt = self._dtype(dtype)
        if isinstance(stored, (tf.Tensor, tf.Variable)):
            if dt is not None and stored.dtype != dt:
                return tf.cast(stored, dt)
            return stored
        return self.asarray(stored, dt)

    # ------------------------------------------------------------------ recurrent ops
    def layer_forward(self, spec, params, inputs, initial_state, sequence_length=None, reverse=False,
                      state_mask=None, need_grad=False):
        self._ensure()
        from ._layer import layer_forward

        return layer_forward(self, spec, params, inputs, initial_state, sequence_length, reverse, state_mask,
                             need_grad)

    def layer_backward(self, spec, params, workspace, d_outputs, d_final_state):
        self._ensure()
        from ._layer import layer_backward

        return layer_backward(self, spec, params, workspace, d_outputs, d_final_state)

    def stack_forward(self, specs, params_list, inputs, initial_states, sequence_length=None, reverse=False,
                      need_grad=False):
        self._ensure()
        from ._layer import stack_forward

        return stack_forward(self, specs, params_list, inputs, initial_states, sequence_length, reverse, need_grad)

    def stack_backward(self, specs, params_list, workspace, d_outputs, d_final_states):
        self._ensure()
        from ._layer import stack_backward

        return stack_backward(self, specs, params_list, workspace, d_outputs, d_final_states)

    def cell_step(self, spec, params, inputs, state):
        self._ensure()
        from ._layer import cell_step

        return cell_step(self, spec, params, inputs, state)
