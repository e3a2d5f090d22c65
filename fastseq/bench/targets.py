"""The performance targets, checked on a benchmark run: the numba backend's (issue 3,
item 5: :data:`TARGETS`) and the tensorflow backend's (issue 5, item 3: at least as fast
as Keras on every configuration, :data:`TF_TARGETS`).

Each target compares two medians of the same run (``slower / faster >= minimum``), or,
for P3, fastseq-numba's achieved GFLOP/s with the measured float32 GEMM rate.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

__all__ = ["Target", "TARGETS", "TF_TARGETS", "evaluate"]


@dataclass(frozen=True)
class Target:
    config: str
    mode: str
    text: str
    minimum: float
    fast: str = "fastseq-numba"  # implementation expected to be faster
    slow: Optional[str] = None   # implementation compared with (None: GEMM fraction)
    strict: bool = False         # ratio must exceed (not reach) the minimum


TARGETS = (
    Target("P1", "forward", "P1 forward >= 2x faster than PyTorch", 2.0, slow="torch"),
    Target("P1", "forward", "P1 forward >= 10x faster than Keras", 10.0, slow="keras"),
    Target("P2", "forward", "P2 forward >= 2x faster than PyTorch", 2.0, slow="torch"),
    Target("P2", "forward", "P2 forward >= 3x faster than Keras", 3.0, slow="keras"),
    Target("P2", "train", "P2 training >= 2x faster than PyTorch", 2.0, slow="torch"),
    Target("P2", "train", "P2 training >= 3x faster than Keras", 3.0, slow="keras"),
    Target("P3", "forward", "P3 forward no slower than PyTorch", 1.0, slow="torch"),
    Target("P3", "train", "P3 training faster than PyTorch", 1.0, slow="torch", strict=True),
    Target("P3", "forward", "P3 forward at >= 70% of the float32 GEMM rate", 0.70, slow=None),
    Target("P4", "forward", "P4 forward with sequence_length >= 1.6x faster than padded", 1.6,
           slow="fastseq-numba padded"),
    Target("P4", "train", "P4 training with sequence_length >= 1.6x faster than padded", 1.6,
           slow="fastseq-numba padded"),
    Target("P4", "forward", "P4 forward >= 2x faster than PyTorch packed", 2.0, slow="torch packed"),
    Target("P4", "train", "P4 training >= 2x faster than PyTorch padded", 2.0, slow="torch padded"),
)

#: The tensorflow backend against Keras 3 on TensorFlow (Keras with a mask on P4, where
#: fastseq-tensorflow gets ``sequence_length``): at least as fast on each.
TF_TARGETS = tuple(
    Target(cfg, mode, f"{cfg} {'training' if mode == 'train' else mode}: fastseq-tensorflow at least as fast "
                      f"as Keras", 1.0, fast="fastseq-tensorflow", slow="keras mask" if cfg == "P4" else "keras")
    for cfg in ("P1", "P2", "P3", "P4") for mode in ("forward", "train") if (cfg, mode) != ("P1", "train")
)


def _median(run, config, mode, impl):
    for r in run["results"]:
        if (r["config"], r["mode"], r["impl"]) == (config, mode, impl):
            if r.get("error") or r.get("skipped") or r.get("median_s") is None:
                return None
            return r
    return None


def evaluate(run: dict, targets=TARGETS) -> List[dict]:
    """One dict per target: ``measured`` (ratio or GEMM fraction, None when a side is
    missing from the run), ``met`` (True/False/None) and the text."""
    out = []
    quick = bool(run.get("settings", {}).get("quick"))
    for t in targets:
        fast = _median(run, t.config, t.mode, t.fast)
        measured = None
        detail = ""
        if t.slow is None:
            gemm = (run.get("machine", {}).get("gemm_float32") or {}).get("gflops")
            if fast is not None and gemm and fast.get("gflops"):
                measured = fast["gflops"] / gemm
                detail = f"{fast['gflops']:.1f} of {gemm:.1f} GFLOP/s"
        else:
            slow = _median(run, t.config, t.mode, t.slow)
            if fast is not None and slow is not None:
                measured = slow["median_s"] / fast["median_s"]
                detail = f"{slow['median_s'] * 1e3:.2f} ms / {fast['median_s'] * 1e3:.2f} ms"
        if measured is None:
            met = None
        else:
            met = measured > t.minimum if t.strict else measured >= t.minimum
        out.append({
            "config": t.config, "mode": t.mode, "target": t.text, "minimum": t.minimum,
            "fast": t.fast, "slow": t.slow, "measured": measured, "met": met, "detail": detail,
            "reduced_shape": quick and t.config == "P4",
        })
    return out
