"""Benchmark implementations: fastseq on a backend, PyTorch CPU, Keras 3 on TensorFlow.

Each implementation turns ``(config, mode)`` into a zero-argument callable that performs
one forward pass (``mode="forward"``) or one training step (``mode="train"``: forward plus
the backward pass with a fixed random cotangent on the outputs, gradients with respect to
the weights and the inputs). Building the model, the data and any tracing/compilation
happen in :meth:`Impl.prepare`, outside the timed call (and the timing's warm-up call
absorbs lazy compilation).

Variants on variable-length configurations (``config.lengths`` set):

- ``fastseq-<backend>``         ``sequence_length`` passed (the work per row shrinks)
- ``fastseq-<backend> padded``  no ``sequence_length``: every padded step computed
- ``torch padded``              ``nn.LSTM`` on the padded batch
- ``torch packed``              ``pack_padded_sequence`` -> ``nn.LSTM`` -> ``pad_packed_sequence``
- ``keras mask``                the layer called with a boolean mask

The peers (torch, keras) are optional: :func:`peer_unavailable` says why one cannot run.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Callable, List, Optional

import numpy as np

from .configs import Config
from .machine import core_count

__all__ = ["Impl", "Skip", "FastseqImpl", "TorchImpl", "KerasImpl", "implementations",
           "peer_unavailable", "PEERS"]

PEERS = ("torch", "keras")


class Skip(Exception):
    """This implementation cannot run this configuration (reason in the message)."""


class Impl:
    family = "base"

    def __init__(self, label: str, variant: Optional[str] = None):
        self.label = label
        self.variant = variant

    def prepare(self, cfg: Config, mode: str) -> Callable[[], object]:
        raise NotImplementedError

    def describe(self) -> dict:
        return {"label": self.label, "family": self.family, "variant": self.variant}


# --------------------------------------------------------------------------- fastseq
def _fastseq_cell(cfg: Config):
    from fastseq.nn import rnn_cell

    def one():
        if cfg.cell == "lstm":
            return rnn_cell.LSTMCell(cfg.units)
        if cfg.cell == "gru":
            return rnn_cell.GRUCell(cfg.units)
        return rnn_cell.BasicRNNCell(cfg.units)

    if cfg.layers == 1:
        return one()
    return rnn_cell.MultiRNNCell([one() for _ in range(cfg.layers)])


class FastseqImpl(Impl):
    """fastseq.nn.dynamic_rnn / bidirectional_dynamic_rnn on one backend; training through
    fastseq.vjp (the pullback called with the cotangent)."""

    family = "fastseq"

    def __init__(self, backend: str, padded: bool = False):
        label = f"fastseq-{backend}" + (" padded" if padded else "")
        super().__init__(label, "padded" if padded else None)
        self.backend = backend
        self.padded = padded

    def describe(self):
        d = super().describe()
        d["backend"] = self.backend
        return d

    def prepare(self, cfg: Config, mode: str):
        import fastseq
        from fastseq import nn

        dtype = np.float32
        x = cfg.inputs(dtype)
        cot = cfg.cotangent(dtype)
        lens = None if self.padded else cfg.sequence_lengths()
        kwargs = {"sequence_length": lens, "dtype": dtype}
        with fastseq.use_backend(self.backend):
            fastseq.set_seed(0)
            if cfg.bidirectional:
                cell_fw, cell_bw = _fastseq_cell(cfg), _fastseq_cell(cfg)
                args = (nn.bidirectional_dynamic_rnn, cell_fw, cell_bw, x)
                H = cfg.units
                d_out = (np.ascontiguousarray(cot[..., :H]), np.ascontiguousarray(cot[..., H:]))
            else:
                args = (nn.dynamic_rnn, _fastseq_cell(cfg), x)
                d_out = cot
            fn = args[0]
            fn(*args[1:], **kwargs)  # builds the weights under this backend
        backend = self.backend

        if mode == "forward":
            def run():
                with fastseq.use_backend(backend):
                    return fn(*args[1:], **kwargs)
        else:
            def run():
                with fastseq.use_backend(backend):
                    _, pullback = fastseq.vjp(*args, **kwargs)
                    return pullback(d_out, None)
        return run


# --------------------------------------------------------------------------- torch
def torch_threads() -> int:
    """PyTorch's intra-op threads: ``FASTSEQ_BENCH_TORCH_THREADS`` (``fastseq bench
    --torch-threads``) or the usable core count, as the benchmark specification asks."""
    env = os.environ.get("FASTSEQ_BENCH_TORCH_THREADS", "").strip()
    if env:
        n = int(env)
        if n < 1:
            raise ValueError(f"FASTSEQ_BENCH_TORCH_THREADS must be >= 1, got {env!r}")
        return n
    return core_count()



class TorchImpl(Impl):
    """PyTorch CPU nn.LSTM / nn.GRU / nn.RNN(tanh), batch_first, threads = usable cores."""

    family = "torch"

    def __init__(self, variant: Optional[str] = None):
        super().__init__("torch" + (f" {variant}" if variant else ""), variant)

    def prepare(self, cfg: Config, mode: str):
        import torch
        from torch import nn

        torch.set_num_threads(torch_threads())
        torch.manual_seed(0)
        cls = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}[cfg.cell]
        module = cls(input_size=cfg.input, hidden_size=cfg.units, num_layers=cfg.layers,
                     batch_first=True, bidirectional=cfg.bidirectional).float()
        x = torch.from_numpy(cfg.inputs(np.float32))
        cot = torch.from_numpy(cfg.cotangent(np.float32))
        packed = self.variant == "packed"
        lens_np = cfg.sequence_lengths()
        if packed and lens_np is None:
            raise Skip("packed needs variable lengths")
        if packed and lens_np.min() == 0:
            raise Skip("pack_padded_sequence rejects zero-length sequences")
        lengths = torch.from_numpy(lens_np) if packed else None
        T = cfg.steps
        pack = nn.utils.rnn.pack_padded_sequence
        unpack = nn.utils.rnn.pad_packed_sequence

        def forward(inp):
            if packed:
                p = pack(inp, lengths, batch_first=True, enforce_sorted=False)
                out, _ = module(p)
                out, _ = unpack(out, batch_first=True, total_length=T)
                return out
            return module(inp)[0]

        if mode == "forward":
            def run():
                with torch.no_grad():
                    return forward(x)
        else:
            xg = x.clone().requires_grad_(True)
            params = list(module.parameters()) + [xg]

            def run():
                out = forward(xg)
                loss = (out * cot).sum()
                return torch.autograd.grad(loss, params)
        return run


# --------------------------------------------------------------------------- keras
class KerasImpl(Impl):
    """Keras 3 LSTM/GRU/SimpleRNN layers on TensorFlow, called through a tf.function;
    training step via tf.GradientTape (gradients of the weights and the inputs)."""

    family = "keras"

    def __init__(self, variant: Optional[str] = None):
        super().__init__("keras" + (f" {variant}" if variant else ""), variant)

    def prepare(self, cfg: Config, mode: str):
        tf, keras = _import_keras()
        layer_cls = {"lstm": keras.layers.LSTM, "gru": keras.layers.GRU,
                     "rnn": keras.layers.SimpleRNN}[cfg.cell]
        keras.utils.set_random_seed(0)
        layers = []
        for _ in range(cfg.layers):
            layer = layer_cls(cfg.units, return_sequences=True)
            if cfg.bidirectional:
                layer = keras.layers.Bidirectional(layer, merge_mode="concat")
            layers.append(layer)
        x = tf.constant(cfg.inputs(np.float32))
        cot = tf.constant(cfg.cotangent(np.float32))
        lens = cfg.sequence_lengths()
        if self.variant == "mask":
            if lens is None:
                raise Skip("mask needs variable lengths")
            mask = tf.constant(np.arange(cfg.steps)[None, :] < lens[:, None])
        else:
            mask = None

        def apply(inp):
            h = inp
            for layer in layers:
                h = layer(h, mask=mask, training=(mode == "train"))
            return h

        apply(x)  # build
        weights = [w for layer in layers for w in layer.trainable_weights]

        @tf.function
        def fwd(inp):
            return apply(inp)

        @tf.function
        def step(inp):
            with tf.GradientTape() as tape:
                tape.watch(inp)
                out = apply(inp)
                loss = tf.reduce_sum(out * cot)
            return tape.gradient(loss, weights + [inp])

        f = fwd if mode == "forward" else step

        def run():
            return f(x)
        return run


def _import_keras():
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf
    import keras

    if keras.backend.backend() != "tensorflow":
        raise Skip(f"keras is configured for the {keras.backend.backend()!r} backend, not tensorflow")
    return tf, keras


# --------------------------------------------------------------------------- listing
def peer_unavailable(name: str) -> Optional[str]:
    """None when the peer can be imported here, else why not (no import happens)."""
    if name == "torch":
        if importlib.util.find_spec("torch") is None:
            return "torch is not installed (pip install torch)"
        return None
    if name == "keras":
        if importlib.util.find_spec("keras") is None:
            return "keras is not installed (pip install keras tensorflow-cpu)"
        if importlib.util.find_spec("tensorflow") is None:
            return "tensorflow is not installed (pip install tensorflow-cpu)"
        if int(_major(_version("keras")) or 0) < 3:
            return f"keras {_version('keras')} found; the benchmark uses Keras 3"
        return None
    return f"unknown peer {name!r}; known peers: {', '.join(PEERS)}"


def _version(dist):
    import importlib.metadata as md

    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def _major(v):
    return v.split(".")[0] if v else None


def implementations(cfg: Config, backends: List[str], peers: List[str]) -> List[Impl]:
    """The implementations that apply to ``cfg`` (variants for variable lengths)."""
    out: List[Impl] = []
    for b in backends:
        out.append(FastseqImpl(b))
        if cfg.variable_length:
            out.append(FastseqImpl(b, padded=True))
    for p in peers:
        if p == "torch":
            if cfg.variable_length:
                out += [TorchImpl("padded"), TorchImpl("packed")]
            else:
                out.append(TorchImpl())
        elif p == "keras":
            out.append(KerasImpl("mask" if cfg.variable_length else None))
    return out
