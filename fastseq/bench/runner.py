"""Run configurations x implementations x modes; ratios, a text table and JSON."""

from __future__ import annotations

import datetime as _dt
import json
import os
import sys
import time
import traceback
from typing import Callable, Dict, List, Optional, Sequence

from . import machine
from .configs import Config
from .impls import Skip, implementations, peer_unavailable
from .timing import measure_interleaved

__all__ = ["run_benchmarks", "add_ratios", "format_table", "write_json", "SCHEMA"]

SCHEMA = "fastseq-bench/1"


def _stderr_progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_benchmarks(
    configs: Sequence[Config],
    backends: Sequence[str],
    peers: Sequence[str] = (),
    modes: Optional[Sequence[str]] = None,
    repeat: int = 10,
    warmup: int = 1,
    budget_s: Optional[float] = None,
    min_repeat: int = 3,
    progress: Optional[Callable[[str], None]] = _stderr_progress,
    measure_gemm: bool = True,
    gemm_repeat: int = 5,
    settings: Optional[dict] = None,
) -> dict:
    """Time every (config, mode, implementation) and return the JSON-ready run record.

    The implementations of one (config, mode) are prepared together and timed in rounds
    (:func:`fastseq.bench.timing.measure_interleaved`), so that a drift of the machine's
    speed during the run affects each of them alike.

    ``modes`` filters each config's own modes (None keeps them all). Unavailable peers are
    skipped with a note; an implementation that fails is recorded with its error and the
    run continues.
    """
    progress = progress or (lambda msg: None)
    notes: List[str] = []
    usable_peers = []
    for p in peers:
        why = peer_unavailable(p)
        if why is None:
            usable_peers.append(p)
        else:
            notes.append(f"peer {p} skipped: {why}")
            progress(f"note: peer {p} skipped: {why}")

    plan = []
    for cfg in configs:
        cfg_modes = [m for m in cfg.modes if modes is None or m in modes]
        for impl in implementations(cfg, list(backends), usable_peers):
            for mode in cfg_modes:
                plan.append((cfg, mode, impl))

    info = machine.machine_info(measure_gemm=False)
    if measure_gemm:
        progress("measuring the float32 GEMM rate (numpy matmul 2048x2048) ...")
        info["gemm_float32"] = machine.gemm_gflops(repeat=gemm_repeat)
        progress(f"  {info['gemm_float32']['gflops']:.1f} GFLOP/s")

    # One group per (config, mode): its implementations are timed in rounds
    # (measure_interleaved), so drift of the machine's speed lands on all of them alike.
    groups: Dict[tuple, list] = {}
    for item in plan:
        groups.setdefault((item[0].name, item[1]), []).append(item)
    results = []
    t_start = time.perf_counter()
    k = 0
    for items in groups.values():
        recs, fns = {}, {}
        for cfg, mode, impl in items:
            k += 1
            rec = {"config": cfg.name, "mode": mode, "impl": impl.label, **impl.describe()}
            rec.pop("label", None)
            rec["_head"] = f"[{k}/{len(plan)}] {cfg.name} {mode:<7} {impl.label:<26}"
            recs[impl.label] = rec
            try:
                fns[impl.label] = impl.prepare(cfg, mode)
            except Exception as exc:  # record and go on
                _record_failure(rec, exc)
        cfg, mode = items[0][0], items[0][1]
        measured = measure_interleaved(fns, repeat=repeat, warmup=warmup, budget_s=budget_s,
                                       min_repeat=min_repeat) if fns else {}
        for label, rec in recs.items():
            head = rec.pop("_head")
            got = measured.get(label)
            if isinstance(got, dict):
                rec.update(got)
                flops = cfg.flops(mode)
                rec["gflops"] = flops / got["median_s"] / 1e9 if got["median_s"] > 0 else None
                rec["error"] = None
                progress(f"{head} {_fmt_time(got['median_s']):>10}  {_fmt_spread(got['spread']):>5}"
                         f"  (n={got['n']}, first call {_fmt_time(got['warmup_s'])})")
            elif isinstance(got, BaseException):
                _record_failure(rec, got)
            if rec.get("skipped"):
                progress(f"{head} skipped: {rec['skipped']}")
            elif rec.get("error"):
                progress(f"{head} FAILED: {rec['error']}")
            results.append(rec)
    add_ratios(results)
    info["threads"]["libraries"] = library_threads()
    if "fastseq_numba._malloc" in sys.modules:  # the numba backend ran and set the allocator
        info["malloc"] = sys.modules["fastseq_numba._malloc"].malloc_setting()
    try:
        info["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        info["load_average_end"] = None
    return {
        "schema": SCHEMA,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": list(sys.argv),
        "settings": dict(settings or {}, repeat=repeat, warmup=warmup, budget_s=budget_s,
                         min_repeat=min_repeat, backends=list(backends), peers=list(peers)),
        "machine": info,
        "versions": info.pop("versions"),
        "git": info.pop("git"),
        "configs": {cfg.name: cfg.to_dict() for cfg in configs},
        "notes": notes,
        "results": results,
        "elapsed_s": time.perf_counter() - t_start,
    }


def _record_failure(rec: dict, exc: BaseException) -> None:
    """A skipped implementation (:class:`Skip`) or a failed one, with its traceback."""
    if isinstance(exc, Skip):
        rec["error"] = None
        rec["skipped"] = str(exc)
    else:
        rec["error"] = f"{type(exc).__name__}: {exc}"
        rec["traceback"] = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__, limit=6))


def library_threads() -> Dict[str, object]:
    """Thread counts of the libraries this run imported (nothing is imported here)."""
    out: Dict[str, object] = {}
    if "numba" in sys.modules:
        try:
            import numba

            out["numba"] = numba.get_num_threads()
            try:
                out["numba_threading_layer"] = numba.threading_layer()
            except ValueError:  # no parallel region has run yet
                out["numba_threading_layer"] = None
        except Exception as exc:
            out["numba"] = f"{type(exc).__name__}: {exc}"
    if "torch" in sys.modules:
        import torch

        out["torch"] = torch.get_num_threads()
        out["torch_interop"] = torch.get_num_interop_threads()
    if "tensorflow" in sys.modules:
        import tensorflow as tf

        out["tensorflow_intra_op"] = tf.config.threading.get_intra_op_parallelism_threads() or "default (all cores)"
        out["tensorflow_inter_op"] = tf.config.threading.get_inter_op_parallelism_threads() or "default"
    return out


def _ok(r):
    return r.get("median_s") is not None and not r.get("error") and not r.get("skipped")


def add_ratios(results: List[dict]) -> None:
    """Per (config, mode): ``ratio_to_fastest`` = t / t_fastest (>= 1) and
    ``numba_speedup`` = t / t(fastseq-numba) (how many times faster fastseq-numba is)."""
    groups: Dict[tuple, List[dict]] = {}
    for r in results:
        groups.setdefault((r["config"], r["mode"]), []).append(r)
    for rows in groups.values():
        ok = [r for r in rows if _ok(r)]
        if not ok:
            continue
        fastest = min(r["median_s"] for r in ok)
        numba = next((r for r in ok if r["impl"] == "fastseq-numba"), None)
        for r in ok:
            r["ratio_to_fastest"] = r["median_s"] / fastest
            r["numba_speedup"] = r["median_s"] / numba["median_s"] if numba and numba["median_s"] else None
            r["paired_numba_speedup"] = paired_ratio(r, numba) if numba is not None else None


def paired_ratio(rec: dict, ref: dict) -> Optional[float]:
    """Median over the rounds both were timed in of ``t(rec) / t(ref)`` (calls timed in the
    same round of :func:`measure_interleaved` ran back to back); None without rounds."""
    ra, rb = rec.get("rounds"), ref.get("rounds")
    if not ra or not rb:
        return None
    tb = dict(zip(rb, ref["times_s"]))
    q = [t / tb[k] for k, t in zip(ra, rec["times_s"]) if k in tb and tb[k] > 0]
    if not q:
        return None
    q.sort()
    n = len(q)
    return q[n // 2] if n % 2 else 0.5 * (q[n // 2 - 1] + q[n // 2])


def _fmt_time(t: Optional[float]) -> str:
    if t is None:
        return "-"
    if t >= 1.0:
        return f"{t:.2f} s"
    if t >= 1e-3:
        return f"{t * 1e3:.2f} ms"
    return f"{t * 1e6:.0f} us"


def _fmt_spread(spread: Optional[float]) -> str:
    """``+-x%`` (half the spread), or ``n=1`` when there was a single timed call."""
    return "n=1" if spread is None else f"+-{100 * spread / 2:.0f}%"


def format_table(run: dict) -> str:
    """The run as a plain-text table, one block per (config, mode), fastest first."""
    lines = []
    cfgs = run.get("configs", {})
    order = []
    for r in run["results"]:
        key = (r["config"], r["mode"])
        if key not in order:
            order.append(key)
    gemm = (run.get("machine", {}).get("gemm_float32") or {}).get("gflops")
    for cname, mode in order:
        rows = [r for r in run["results"] if r["config"] == cname and r["mode"] == mode]
        shape = cfgs.get(cname, {}).get("shape", "")
        lines.append(f"{cname} {mode}: {shape}")
        lines.append(f"  {'implementation':<26}{'median':>11}{'spread':>8}{'x fastest':>11}"
                     f"{'numba is':>10}{'paired':>8}{'GFLOP/s':>9}")
        rows.sort(key=lambda r: (not _ok(r), r.get("median_s") or 0))
        for r in rows:
            if not _ok(r):
                why = r.get("skipped") or r.get("error") or "no result"
                lines.append(f"  {r['impl']:<26}  {why}")
                continue
            sp = r.get("numba_speedup")
            pp = r.get("paired_numba_speedup")
            gf = r.get("gflops")
            lines.append(
                f"  {r['impl']:<26}{_fmt_time(r['median_s']):>11}{_fmt_spread(r['spread']):>7} "
                f"{r['ratio_to_fastest']:>10.2f}x"
                f"{(f'{sp:.2f}x' if sp else '-'):>10}"
                f"{(f'{pp:.2f}x' if pp else '-'):>8}"
                f"{(f'{gf:.1f}' if gf else '-'):>9}"
            )
        lines.append("")
    if gemm:
        lines.append(f"float32 GEMM rate (numpy matmul 2048x2048): {gemm:.1f} GFLOP/s")
    lines.append("spread: +- half the interquartile range (range below 4 samples) over the median; "
                 "'numba is': t / t(fastseq-numba), how many times faster fastseq-numba is; "
                 "'paired': the same call by call (median over rounds; each round times every "
                 "implementation once, back to back); "
                 "GFLOP/s counts useful work only (padding excluded).")
    for n in run.get("notes", []):
        lines.append(f"note: {n}")
    return "\n".join(lines)


def write_json(run: dict, path: str) -> None:
    with open(path, "w") as fh:
        json.dump(run, fh, indent=1, sort_keys=False, default=str)
        fh.write("\n")
