"""Render ``benchmarks/RESULTS.md`` from a benchmark JSON run (never typed by hand).

The hand-written analysis ("what limits each gap") lives in ``benchmarks/NOTES.md`` and
is included verbatim.
"""

from __future__ import annotations

import os
from typing import Optional

from .runner import _fmt_spread, _fmt_time, _ok
from .targets import TARGETS, TF_TARGETS, evaluate

__all__ = ["render"]


def _machine_section(run: dict) -> list:
    m = run.get("machine", {})
    cpu = m.get("cpu", {})
    thr = m.get("threads", {})
    blas = (m.get("blas", {}) or {}).get("numpy_blas", {})
    gemm = m.get("gemm_float32") or {}
    v = run.get("versions", {})
    git = run.get("git", {}) or {}
    lines = ["## Machine", ""]
    lines.append(f"- CPU: {cpu.get('model', '?')} ({cpu.get('machine', '?')}), "
                 f"{cpu.get('usable_cpus', '?')} usable of {cpu.get('logical_cpus', '?')} logical CPUs; "
                 f"vector extensions: {', '.join(cpu.get('vector_extensions', [])) or 'none reported'}")
    env = thr.get("env") or {}
    libs = thr.get("libraries") or {}
    torch_note = (f"PyTorch {libs['torch']} intra-op threads" if "torch" in libs
                  else "PyTorch set to the usable core count when it runs")
    lines.append(f"- Threads: {thr.get('usable_cpus', '?')} usable cores; {torch_note}; "
                 f"environment: {', '.join(f'{k}={val}' for k, val in env.items()) or 'no thread variables set'}")
    if libs:
        lines.append("- Library threads in the run: " + ", ".join(f"{k} {val}" for k, val in libs.items()))
    if m.get("load_average") is not None:
        lines.append(f"- Load average (1, 5, 15 min) at the start of the run: "
                     f"{', '.join(str(x) for x in m['load_average'])}"
                     + (f"; at the end: {', '.join(str(x) for x in m['load_average_end'])}"
                        if m.get("load_average_end") else "")
                     + " (above the core count means other processes shared the CPU)")
    if m.get("malloc"):
        lines.append(f"- Memory allocator (process-wide, set by the numba backend, shared by every "
                     f"implementation in the run): {m['malloc']}")
    if blas:
        lines.append(f"- NumPy BLAS: {blas.get('name', '?')} {blas.get('version', '')}")
    if gemm:
        lines.append(f"- Measured float32 GEMM rate (numpy matmul {gemm.get('n')}x{gemm.get('n')}): "
                     f"{gemm.get('gflops', 0):.1f} GFLOP/s (median)")
    keys = ["python", "fastseq", "numpy", "numba", "tensorflow", "keras", "torch"]
    lines.append("- Versions: " + ", ".join(f"{k} {v[k]}" for k in keys if v.get(k)))
    rev = git.get("revision")
    lines.append(f"- Source: git {rev[:12] if rev else 'unknown'}"
                 + (" (uncommitted changes)" if git.get("dirty") else ""))
    lines.append(f"- Platform: {m.get('platform', '?')}")
    s = run.get("settings", {})
    lines.append(f"- Run: {run.get('created', '?')}; repeat {s.get('repeat')}, warm-up {s.get('warmup')} "
                 f"call(s) excluded, timing budget {s.get('budget_s')} s per measurement"
                 + ("; **--quick** (P4 at T=100, lengths in [3, 100])" if s.get("quick") else ""))
    lines.append("")
    return lines


def _tables(run: dict) -> list:
    lines = ["## Results", "",
             "Medians of the repetitions. *x fastest*: time over the fastest time of the same "
             "configuration and mode. *numba is*: time over fastseq-numba's time (how many times "
             "faster fastseq-numba is; above 1 means fastseq-numba wins). *paired*: the same ratio "
             "taken call by call (the implementations of a configuration are timed in rounds, "
             "one call of each per round, order rotated; median over the rounds of t / "
             "t(fastseq-numba) in the same round). *spread*: half the "
             "interquartile range over the median. GFLOP/s counts the useful matmul work "
             "(padding excluded; training = 3x forward).", ""]
    cfgs = run.get("configs", {})
    order = []
    for r in run["results"]:
        if (r["config"], r["mode"]) not in order:
            order.append((r["config"], r["mode"]))
    for cname, mode in order:
        rows = [r for r in run["results"] if (r["config"], r["mode"]) == (cname, mode)]
        rows.sort(key=lambda r: (not _ok(r), r.get("median_s") or 0))
        c = cfgs.get(cname, {})
        lines.append(f"### {cname} {mode}: {c.get('shape', '')}")
        lines.append("")
        lines.append("| implementation | median | spread | x fastest | numba is | paired | GFLOP/s |")
        lines.append("|---|---:|---:|---:|---:|---:|---:|")
        for r in rows:
            if not _ok(r):
                why = r.get("skipped") or r.get("error") or "no result"
                lines.append(f"| {r['impl']} | {why} | | | | | |")
                continue
            sp = r.get("numba_speedup")
            pp = r.get("paired_numba_speedup")
            gf = r.get("gflops")
            lines.append(
                f"| {r['impl']} | {_fmt_time(r['median_s'])} | {_fmt_spread(r['spread'])} | "
                f"{r['ratio_to_fastest']:.2f} | {f'{sp:.2f}' if sp else '-'} | {f'{pp:.2f}' if pp else '-'} | "
                f"{f'{gf:.1f}' if gf else '-'} |")
        lines.append("")
    return lines


def _targets(run: dict, title: str = "## Targets (issue 3, item 5)", targets=TARGETS) -> list:
    lines = [title, "",
             "| target | measured | met |", "|---|---:|:---:|"]
    for t in evaluate(run, targets):
        if t["measured"] is None:
            meas, met = "not measured in this run", "-"
        else:
            unit = "of GEMM" if t["slow"] is None else "x"
            meas = (f"{100 * t['measured']:.0f}% {unit}" if t["slow"] is None
                    else f"{t['measured']:.2f}{unit}")
            if t["detail"]:
                meas += f" ({t['detail']})"
            met = "yes" if t["met"] else "**no**"
        if t.get("reduced_shape"):
            meas += " [quick shape]"
        lines.append(f"| {t['target']} | {meas} | {met} |")
    lines.append("")
    return lines


def render(run: dict, notes_path: Optional[str] = None, json_name: Optional[str] = None,
           plot_name: Optional[str] = None) -> str:
    """The whole RESULTS.md text."""
    lines = ["# fastseq benchmark results", "",
             "<!-- Generated by benchmarks/make_results.py from "
             f"{json_name or 'a benchmark JSON run'}; do not edit by hand. "
             "Edit benchmarks/NOTES.md for the analysis section. -->", "",
             "Regenerate: `python benchmarks/run_all.py` (runs P1-P4 on every installed backend "
             "and peer, writes the JSON, then this file), or `python benchmarks/make_results.py "
             "RUN.json` for an existing run.", ""]
    load = (run.get("machine", {}) or {}).get("load_average")
    cores = ((run.get("machine", {}) or {}).get("cpu", {}) or {}).get("usable_cpus") or 1
    if load and max(load[0], (run["machine"].get("load_average_end") or [0])[0]) > cores + 0.5:
        lines += [f"> **Warning:** this run was taken on a loaded machine (1-minute load average "
                  f"{load[0]} at the start, {cores} usable cores): other processes shared the CPU, "
                  "and libraries whose threads spin-wait on each other (PyTorch, OpenMP-threaded "
                  "kernels) suffer far more than single-threaded code. Treat the ratios below as "
                  "provisional and re-run on an idle machine.", ""]
    lines += _machine_section(run)
    if run.get("notes"):
        lines += ["Notes from the run:", ""] + [f"- {n}" for n in run["notes"]] + [""]
    lines += _targets(run)
    lines += _targets(run, "## Targets (issue 5, item 3): the tensorflow backend against Keras", TF_TARGETS)
    if plot_name:
        lines += [f"![speed-ups]({plot_name})", ""]
    lines += _tables(run)
    lines += ["## What limits each gap", ""]
    if notes_path and os.path.exists(notes_path):
        with open(notes_path) as fh:
            text = fh.read().strip()
        # drop a leading title of the notes file: this section has its own
        body = text.split("\n", 1)[1].strip() if text.startswith("# ") and "\n" in text else text
        lines += [body, ""]
    else:
        lines += ["(no benchmarks/NOTES.md yet)", ""]
    return "\n".join(lines)
