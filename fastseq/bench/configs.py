"""Benchmark configurations, defined once for the CLI and the scripts in ``benchmarks/``.

Notation: ``B`` batch, ``T`` steps, ``I`` input depth, ``H`` units, ``L`` stacked layers.

- P1 latency: LSTMCell H=128, B=1, T=100, I=64, forward.
- P2 the tutorial's model: MultiRNNCell of 3 GRUCell(200), B=32, T=28, I=28, forward and
  one training step (forward + backward).
- P3 throughput: LSTMCell H=512, B=64, T=50, I=512, forward and training step; achieved
  GFLOP/s is compared with the machine's float32 GEMM rate.
- P4 variable length: bidirectional LSTMCell H=256, B=64, I=64, lengths uniform in
  [10, 400] padded to T=400, forward and training step; fastseq with and without
  ``sequence_length``, PyTorch padded and packed, Keras with a mask.

``--quick`` (:func:`quick_version`) keeps every shape except P4's length: P4 runs with
T=100 and lengths uniform in [3, 100] so that the padded/packed/masked comparison keeps its
character (about half of the padded work is useful) at a quarter of the cost.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

__all__ = [
    "Config",
    "CONFIGS",
    "CELLS",
    "MODES",
    "get_configs",
    "quick_version",
    "custom_config",
    "parse_lengths",
]

CELLS = ("lstm", "gru", "rnn")
MODES = ("forward", "train")


@dataclass(frozen=True)
class Config:
    """One benchmark shape. ``lengths`` is ``None`` (every sequence has ``steps`` steps)
    or ``(low, high)``: lengths drawn uniformly from ``[low, high]`` (inclusive) with a
    fixed seed and padded to ``steps``."""

    name: str
    cell: str  # "lstm" | "gru" | "rnn"
    units: int
    batch: int
    steps: int
    input: int
    layers: int = 1
    bidirectional: bool = False
    lengths: Optional[Tuple[int, int]] = None
    modes: Tuple[str, ...] = ("forward",)
    description: str = ""
    seed: int = 0
    #: what --quick changes, as field overrides (documented in quick_version)
    quick: Dict[str, object] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self):
        if self.cell not in CELLS:
            raise ValueError(f"Config.cell must be one of {CELLS}, got {self.cell!r}")
        for fname in ("units", "batch", "steps", "input", "layers"):
            v = getattr(self, fname)
            if not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"Config.{fname} must be a positive integer, got {v!r}")
        for m in self.modes:
            if m not in MODES:
                raise ValueError(f"Config.modes entries must be in {MODES}, got {m!r}")
        if self.lengths is not None:
            lo, hi = self.lengths
            if not (0 <= lo <= hi <= self.steps):
                raise ValueError(
                    f"Config.lengths must satisfy 0 <= low <= high <= steps={self.steps}, "
                    f"got {self.lengths!r}"
                )

    # ------------------------------------------------------------------ data
    @property
    def variable_length(self) -> bool:
        return self.lengths is not None

    def sequence_lengths(self) -> Optional[np.ndarray]:
        """``[B]`` int64 lengths (fixed seed), or None for full-length batches."""
        if self.lengths is None:
            return None
        lo, hi = self.lengths
        rng = np.random.default_rng(1000 + self.seed)
        return rng.integers(lo, hi + 1, size=self.batch).astype(np.int64)

    def inputs(self, dtype=np.float32) -> np.ndarray:
        """Batch-major inputs ``[B, T, I]``; zero past each sequence's length."""
        rng = np.random.default_rng(self.seed)
        x = rng.standard_normal((self.batch, self.steps, self.input)).astype(dtype)
        lens = self.sequence_lengths()
        if lens is not None:
            x[np.arange(self.steps)[None, :] >= lens[:, None]] = 0
        return x

    @property
    def output_depth(self) -> int:
        return self.units * (2 if self.bidirectional else 1)

    def cotangent(self, dtype=np.float32) -> np.ndarray:
        """Random cotangent for the outputs ``[B, T, D]`` (D = 2H when bidirectional);
        zero past each sequence's length (those outputs are zero in every implementation)."""
        rng = np.random.default_rng(self.seed + 1)
        c = rng.standard_normal((self.batch, self.steps, self.output_depth)).astype(dtype)
        lens = self.sequence_lengths()
        if lens is not None:
            c[np.arange(self.steps)[None, :] >= lens[:, None]] = 0
        return c

    # ------------------------------------------------------------------ work
    def flops_per_row_step(self) -> float:
        """Forward multiply-add FLOPs of one sequence step through all layers and
        directions (matmuls only; the element-wise gate math is a few percent)."""
        gates = {"lstm": 4, "gru": 3, "rnn": 1}[self.cell]
        total = 0.0
        depth = self.input
        for _ in range(self.layers):
            total += 2.0 * (depth + self.units) * gates * self.units
            depth = self.units
        return total * (2 if self.bidirectional else 1)

    def useful_steps(self) -> int:
        """Sequence steps that carry data: ``sum(lengths)`` or ``B * T``."""
        lens = self.sequence_lengths()
        return int(lens.sum()) if lens is not None else self.batch * self.steps

    def flops(self, mode: str) -> float:
        """Useful FLOPs of one call: forward, or forward + backward (about 3x forward:
        the backward pass needs a matmul for the input/state gradients and one for the
        weight gradients). Padded steps are not counted, so padded runs show lower
        GFLOP/s for the same useful work."""
        fwd = self.flops_per_row_step() * self.useful_steps()
        return fwd * (3.0 if mode == "train" else 1.0)

    def describe(self) -> str:
        cellname = {"lstm": "LSTMCell", "gru": "GRUCell", "rnn": "BasicRNNCell"}[self.cell]
        s = f"{cellname}(H={self.units})"
        if self.layers > 1:
            s = f"{self.layers}x{s}"
        if self.bidirectional:
            s = "bidirectional " + s
        s += f" B={self.batch} T={self.steps} I={self.input}"
        if self.lengths is not None:
            s += f" lengths~U[{self.lengths[0]},{self.lengths[1]}]"
        return s

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("quick", None)
        d["lengths"] = list(self.lengths) if self.lengths else None
        d["modes"] = list(self.modes)
        d["shape"] = self.describe()
        d["flops_forward"] = self.flops("forward")
        return d


CONFIGS: Dict[str, Config] = {
    "P1": Config(
        "P1", "lstm", units=128, batch=1, steps=100, input=64, modes=("forward",),
        description="latency: LSTMCell H=128, B=1, T=100, I=64, forward",
    ),
    "P2": Config(
        "P2", "gru", units=200, batch=32, steps=28, input=28, layers=3,
        modes=("forward", "train"),
        description="tutorial model: MultiRNNCell of 3 GRUCell(200), B=32, T=28, I=28",
    ),
    "P3": Config(
        "P3", "lstm", units=512, batch=64, steps=50, input=512, modes=("forward", "train"),
        description="throughput: LSTMCell H=512, B=64, T=50, I=512",
    ),
    "P4": Config(
        "P4", "lstm", units=256, batch=64, steps=400, input=64, bidirectional=True,
        lengths=(10, 400), modes=("forward", "train"),
        description="variable length: bidirectional LSTMCell H=256, B=64, I=64, "
        "lengths uniform in [10, 400] padded to 400",
        quick={"steps": 100, "lengths": (3, 100)},
    ),
}


def quick_version(cfg: Config) -> Config:
    """The configuration as ``--quick`` runs it (only P4 changes: T=100, lengths [3, 100])."""
    if not cfg.quick:
        return cfg
    return dataclasses.replace(cfg, **cfg.quick)


def get_configs(names: Optional[Sequence[str]] = None, quick: bool = False) -> List[Config]:
    """Configurations by name (default: all, in order P1..P4)."""
    if names is None:
        names = list(CONFIGS)
    out = []
    for n in names:
        key = n.strip().upper()
        if key not in CONFIGS:
            raise ValueError(f"unknown configuration {n!r}; expected one of {', '.join(CONFIGS)}")
        cfg = CONFIGS[key]
        out.append(quick_version(cfg) if quick else cfg)
    return out


def parse_lengths(spec: Optional[str], steps: int) -> Optional[Tuple[int, int]]:
    """``"uniform:LOW:HIGH"`` -> ``(LOW, HIGH)``; ``None``/``"full"`` -> None."""
    if spec is None or spec in ("", "full", "none"):
        return None
    parts = spec.split(":")
    if len(parts) != 3 or parts[0] != "uniform":
        raise ValueError(f"--lengths must look like 'uniform:LOW:HIGH', got {spec!r}")
    try:
        lo, hi = int(parts[1]), int(parts[2])
    except ValueError:
        raise ValueError(f"--lengths bounds must be integers, got {spec!r}") from None
    if not (0 <= lo <= hi <= steps):
        raise ValueError(f"--lengths needs 0 <= LOW <= HIGH <= --steps ({steps}), got {spec!r}")
    return (lo, hi)


def custom_config(
    cell: str = "lstm",
    batch: int = 32,
    steps: int = 50,
    input: int = 64,
    units: int = 128,
    layers: int = 1,
    bidirectional: bool = False,
    lengths: Optional[str] = None,
    train: bool = False,
    name: str = "custom",
) -> Config:
    """A configuration from the CLI's shape flags."""
    modes = ("forward", "train") if train else ("forward",)
    return Config(
        name, cell, units=units, batch=batch, steps=steps, input=input, layers=layers,
        bidirectional=bidirectional, lengths=parse_lengths(lengths, steps), modes=modes,
        description="custom shape from the command line",
    )
