"""The ``fastseq`` command line (also ``python -m fastseq``).

    fastseq info                      what is installed and how this machine looks
    fastseq check [--backends ...]    every installed backend against the numpy reference
    fastseq bench [options]           cross-backend benchmark, with PyTorch and Keras
    fastseq train NAME [options]      run a training recipe (japanese_vowels, echo)

Exit status: 0 success, 1 a check mismatch or failed benchmark, 2 bad usage.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional

__all__ = ["main", "build_parser"]


def _err(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _split(values) -> List[str]:
    """``["a,b", "c"]`` -> ``["a", "b", "c"]`` (flags may be repeated or comma-separated)."""
    out = []
    for v in values or []:
        out += [s.strip() for s in v.split(",") if s.strip()]
    return out


class UsageError(Exception):
    pass


# --------------------------------------------------------------------------- info
def _info_dict() -> dict:
    import fastseq
    from fastseq import backend as registry
    from fastseq.bench import machine

    backends = fastseq.list_backends()
    default = next((n for n in registry.DEFAULT_ORDER if backends.get(n, "missing") is None), "numpy")
    env = os.environ.get("FASTSEQ_BACKEND")
    try:
        selected = fastseq.get_backend()
        selected_problem = backends.get(selected, "not installed") if selected in backends else "not installed"
    except Exception as exc:
        selected, selected_problem = env, f"{type(exc).__name__}: {exc}"
    return {
        "fastseq": fastseq.__version__,
        "location": os.path.dirname(os.path.abspath(fastseq.__file__)),
        "backends": backends,
        "default_backend": default,
        "FASTSEQ_BACKEND": env,
        "selected_backend": selected,
        "selected_backend_problem": selected_problem,
        "versions": machine.versions(),
        "blas": machine.blas_info(),
        "cpu": machine.cpu_info(),
        "threads": machine.thread_settings(),
        "kernel_cache": machine.kernel_cache(),
        "git": machine.git_revision(),
    }


def cmd_info(args) -> int:
    info = _info_dict()
    if args.json:
        print(json.dumps(info, indent=1, default=str))
        return 0
    p = print
    p(f"fastseq {info['fastseq']}  ({info['location']})")
    rev = info["git"].get("revision")
    if rev:
        p(f"  git revision {rev[:12]}{' (uncommitted changes)' if info['git'].get('dirty') else ''}")
    p("")
    p("backends:")
    for name, why in info["backends"].items():
        p(f"  {name:<12} {'available' if why is None else 'unavailable: ' + why}")
    p(f"  default: {info['default_backend']}; FASTSEQ_BACKEND="
      f"{info['FASTSEQ_BACKEND'] if info['FASTSEQ_BACKEND'] is not None else '(unset)'}; "
      f"selected: {info['selected_backend']}"
      + (f" (problem: {info['selected_backend_problem']})" if info["selected_backend_problem"] else ""))
    p("")
    p("versions:")
    for k, v in info["versions"].items():
        if k != "tensorflow-cpu" or v:
            p(f"  {k:<14} {v if v else '-'}")
    p("")
    blas = info["blas"].get("numpy_blas", {})
    p(f"BLAS (numpy): {blas.get('name', '?')} {blas.get('version', '')}".rstrip())
    if blas.get("openblas configuration"):
        p(f"  {blas['openblas configuration']}")
    for tp in info["blas"].get("threadpools", []) or []:
        if isinstance(tp, dict):
            p(f"  threadpool {tp.get('internal_api')} {tp.get('version')}: {tp.get('num_threads')} threads")
    cpu = info["cpu"]
    p(f"CPU: {cpu['model']} ({cpu['machine']}); {cpu['usable_cpus']} usable of {cpu['logical_cpus']} logical CPUs")
    p(f"  vector extensions: {' '.join(cpu['vector_extensions']) or 'none reported'}")
    env = info["threads"]["env"]
    p(f"threads: {info['threads']['usable_cpus']} usable cores; "
      + (", ".join(f"{k}={v}" for k, v in env.items()) if env else "no thread environment variables set"))
    kc = info["kernel_cache"]
    p("")
    p(f"kernel cache: {kc.get('location') or '-'}"
      + (f" ({kc['source']}{'' if kc.get('writable', True) else ', NOT writable'})" if kc.get("source") else ""))
    p(f"  {kc['state']}" + (f", {kc['bytes'] / 1e6:.1f} MB" if kc.get("bytes") else ""))
    for f in kc.get("index_files", [])[: args.max_files]:
        p(f"    {f}")
    extra = len(kc.get("index_files", [])) - args.max_files
    if extra > 0:
        p(f"    ... and {extra} more (fastseq info --max-files N)")
    return 0


# --------------------------------------------------------------------------- check
def _available_backends() -> dict:
    import fastseq

    return fastseq.list_backends()


def _resolve_backends(requested: List[str], exclude_reference: bool) -> List[str]:
    avail = _available_backends()
    if requested:
        bad = []
        for b in requested:
            if b not in avail:
                bad.append(f"{b!r} is not installed")
            elif avail[b] is not None:
                bad.append(f"{b!r} is unavailable: {avail[b]}")
        if bad:
            listing = ", ".join(f"{n} ({'available' if w is None else w})" for n, w in avail.items())
            raise UsageError("; ".join(bad) + f". Installed backends: {listing}")
        return requested
    names = [n for n, why in avail.items() if why is None]
    if exclude_reference and len(names) > 1:
        names = [n for n in names if n != "numpy"]
    for n, why in avail.items():
        if why is not None:
            _err(f"note: backend {n} skipped: {why}")
    return names


def cmd_check(args) -> int:
    from fastseq.bench.check import (CHECK_CELLS, CHECK_DRIVERS, CHECK_DTYPES, CHECK_LENGTHS,
                                     format_check, run_check)

    backends = _resolve_backends(_split(args.backends), exclude_reference=True)
    cells = _split(args.cells) or list(CHECK_CELLS)
    dtypes = _split(args.dtypes) or list(CHECK_DTYPES)
    from fastseq.testing import CELL_FACTORIES

    for c in cells:
        if c not in CELL_FACTORIES:
            raise UsageError(f"--cells: unknown cell {c!r}; choose from {', '.join(CELL_FACTORIES)}")
    for d in dtypes:
        if d not in CHECK_DTYPES:
            raise UsageError(f"--dtypes: expected float32 and/or float64, got {d!r}")
    _err(f"checking {', '.join(backends)} against the numpy reference: cells {', '.join(cells)}; "
         f"drivers {', '.join(CHECK_DRIVERS)}; {', '.join(dtypes)}; lengths {', '.join(CHECK_LENGTHS)}; "
         "forward and gradients")
    rows = run_check(backends, cells=cells, dtypes=dtypes, progress=_err)
    print(format_check(rows, verbose=args.verbose))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"rows": rows}, fh, indent=1, default=str)
    failed = sorted({r["backend"] for r in rows if not r["ok"]})
    if failed:
        _err(f"fastseq check FAILED for backend(s): {', '.join(failed)}")
        return 1
    return 0


# --------------------------------------------------------------------------- bench
_SHAPE_FLAGS = ("cell", "batch", "steps", "input", "units", "layers", "bidirectional", "lengths")


def _bench_configs(args):
    from fastseq.bench import configs as C

    custom = any(getattr(args, f) not in (None, False) for f in _SHAPE_FLAGS)
    out = []
    if args.configs or not custom:
        names = _split(args.configs) or list(C.CONFIGS)
        try:
            out += C.get_configs(names, quick=args.quick)
        except ValueError as exc:
            raise UsageError(f"--configs: {exc}") from None
    if custom:
        try:
            out.append(C.custom_config(
                cell=args.cell or "lstm", batch=args.batch or 32, steps=args.steps or 50,
                input=args.input or 64, units=args.units or 128, layers=args.layers or 1,
                bidirectional=args.bidirectional, lengths=args.lengths, train=args.train))
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    return out


def _run_data_benchmarks(quick: bool, out_dir: Optional[str]) -> List[dict]:
    """Run benchmarks/data_*.py (the data routines' benchmarks; source checkouts only), each
    in a subprocess with ``[--quick] --out DIR`` so the committed benchmarks/DATA_RESULTS.md
    is not overwritten; returns what each wrote to DIR/data_results.json."""
    import glob
    import subprocess
    import tempfile

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    scripts = sorted(glob.glob(os.path.join(root, "benchmarks", "data_*.py")))
    if not scripts:
        _err("note: no benchmarks/data_*.py found (they ship with the source checkout); "
             "data benchmarks skipped")
        return []
    out = []
    for s in scripts:
        target = out_dir or tempfile.mkdtemp(prefix="fastseq_data_bench_")
        os.makedirs(target, exist_ok=True)
        cmd = [sys.executable, s] + (["--quick"] if quick else []) + ["--out", target]
        _err(f"running {' '.join(cmd)}")
        proc = subprocess.run(cmd)
        rec = {"script": os.path.relpath(s, root), "quick": quick, "returncode": proc.returncode,
               "out_dir": target}
        path = os.path.join(target, "data_results.json")
        if proc.returncode == 0 and os.path.exists(path):
            with open(path) as fh:
                rec["results"] = json.load(fh)
        out.append(rec)
    return out


def cmd_bench(args) -> int:
    from fastseq.bench import runner
    from fastseq.bench.impls import PEERS

    if args.repeat is not None and args.repeat < 1:
        raise UsageError(f"--repeat must be >= 1, got {args.repeat}")
    configs = _bench_configs(args)
    if args.torch_threads is not None:
        if args.torch_threads < 1:
            raise UsageError(f"--torch-threads must be >= 1, got {args.torch_threads}")
        os.environ["FASTSEQ_BENCH_TORCH_THREADS"] = str(args.torch_threads)
    backends = _resolve_backends(_split(args.backends), exclude_reference=False)
    if args.quick and not _split(args.backends) and len(backends) > 1 and "numpy" in backends:
        backends = [b for b in backends if b != "numpy"]
        _err("--quick: the numpy reference backend is left out (it is the slow oracle; "
             "add --backends numpy,... to time it)")
    peers = _split(args.peers) if args.peers is not None else list(PEERS)
    if peers == ["none"]:
        peers = []
    for p in peers:
        if p not in PEERS:
            raise UsageError(f"--peers: unknown peer {p!r}; known: {', '.join(PEERS)} (or 'none')")
    repeat = args.repeat if args.repeat is not None else (3 if args.quick else 10)
    budget = args.budget if args.budget is not None else (1.0 if args.quick else 20.0)
    modes = ["forward"] if args.no_train else None
    if args.quick:
        _err("--quick: repeat up to 3 (unless --repeat), stop after 1 s of timed calls per "
             "measurement (so slow ones are timed once), GEMM rate from 2 calls, P4 at T=100 with "
             "lengths in [3, 100] instead of T=400, [10, 400]")
    _err(f"configs: {', '.join(c.name + ' (' + c.describe() + ')' for c in configs)}")
    _err(f"backends: {', '.join(backends) or 'none'}; peers: {', '.join(peers) or 'none'}")
    run = runner.run_benchmarks(
        configs, backends, peers, modes=modes, repeat=repeat, warmup=args.warmup, budget_s=budget,
        min_repeat=1 if args.quick else 3,
        measure_gemm=not args.no_gemm, gemm_repeat=2 if args.quick else 5,
        settings={"quick": bool(args.quick)},
    )
    if args.data:
        out_dir = (os.path.join(os.path.dirname(os.path.abspath(args.json)), "data_bench")
                   if args.json else None)
        run["data_benchmarks"] = _run_data_benchmarks(args.quick, out_dir)
    print()
    print(runner.format_table(run))
    if any(c.name in ("P1", "P2", "P3", "P4") for c in configs):
        from fastseq.bench.targets import TARGETS, TF_TARGETS, evaluate

        run["targets"] = evaluate(run, TARGETS)
        run["targets_tensorflow"] = evaluate(run, TF_TARGETS)
        for title, key in (("targets (issue 3)", "targets"), ("targets (issue 5)", "targets_tensorflow")):
            rows = [t for t in run[key] if t["measured"] is not None]
            if rows:
                print()
                print(title + ":" + (" [P4 at the quick shape]" if args.quick else ""))
                for t in rows:
                    val = (f"{100 * t['measured']:.0f}% of GEMM" if t["slow"] is None
                           else f"{t['measured']:.2f}x")
                    print(f"  {'met ' if t['met'] else 'MISS'}  {t['target']}: {val}")
    if args.json:
        runner.write_json(run, args.json)
        _err(f"wrote {args.json}")
    if args.plot:
        from fastseq.bench.plot import plot_speedups

        try:
            plot_speedups(run, args.plot)
            _err(f"wrote {args.plot}")
        except ImportError as exc:
            _err(f"cannot plot: {exc} (pip install matplotlib)")
        except ValueError as exc:
            _err(f"cannot plot: {exc}")
    failed = [r for r in run["results"] if r.get("error")]
    return 1 if failed else 0


# --------------------------------------------------------------------------- train
def _summarize_value(v):
    """A short JSON-able view of a recipe result value (long series shortened)."""
    import numpy as np

    if isinstance(v, (str, bool, int, float, type(None))):
        return v
    if isinstance(v, dict):
        return {str(k): _summarize_value(x) for k, x in v.items()}
    try:
        arr = np.asarray(v)
    except Exception:
        return f"<{type(v).__name__}>"
    if arr.dtype.kind not in "fiub":
        return f"<{type(v).__name__}>"
    if arr.size <= 20:
        return arr.tolist()
    flat = arr.ravel()
    return {"shape": list(arr.shape), "first": float(flat[0]), "last": float(flat[-1])}


def cmd_train(args) -> int:
    try:
        from fastseq.train.recipes import run_recipe
    except ImportError as exc:
        _err("fastseq train needs the training recipes (fastseq.train.recipes.run_recipe), "
             f"which cannot be imported here: {exc}")
        return 2
    try:
        from fastseq.train.recipes import RECIPES

        if args.name not in RECIPES:
            raise UsageError(f"unknown recipe {args.name!r}; available: {', '.join(sorted(RECIPES))}")
    except ImportError:
        pass
    kw = {}
    for item in args.set or []:
        key, sep, val = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--set expects KEY=VALUE, got {item!r}")
        try:
            kw[key] = json.loads(val)
        except ValueError:
            kw[key] = val
    if args.epochs is not None and args.epochs < 0:
        raise UsageError(f"--epochs must be >= 0, got {args.epochs}")
    result = run_recipe(args.name, backend=args.backend, epochs=args.epochs, plot=args.plot, **kw)
    summary = _summarize_value(dict(result or {}))
    print(json.dumps(summary, indent=1, default=str))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1, default=lambda o: _summarize_value(o))
    return 0


# --------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    from fastseq import __version__

    ap = argparse.ArgumentParser(
        prog="fastseq",
        description="fastseq: TensorFlow 1's recurrent API on fast CPU backends.",
    )
    ap.add_argument("--version", action="version", version=f"fastseq {__version__}")
    sub = ap.add_subparsers(dest="command", metavar="{info,check,bench,train}")

    p = sub.add_parser("info", help="versions, backends, CPU, BLAS, threads, kernel cache")
    p.add_argument("--json", action="store_true", help="print the information as JSON")
    p.add_argument("--max-files", type=int, default=12, help="cached kernel files to list")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("check", help="conformance self-test of the backends against the reference")
    p.add_argument("--backends", action="append",
                   help="comma-separated backends (default: every available one except the reference)")
    p.add_argument("--cells", action="append", help="cells to test (default: rnn,gru,lstm_full,multi)")
    p.add_argument("--dtypes", action="append", help="float32 and/or float64 (default: both)")
    p.add_argument("--verbose", "-v", action="store_true", help="one line per length pattern")
    p.add_argument("--json", help="write the rows as JSON")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser(
        "bench", help="time backends and peers on P1-P4 or a custom shape",
        description="Time fastseq's backends, PyTorch and Keras in one process. Without shape "
        "flags runs the configurations P1-P4 (see fastseq.bench.configs); any shape flag "
        "benchmarks a custom model instead (add --configs to run both).")
    p.add_argument("--backends", action="append", help="comma-separated (default: every available backend)")
    p.add_argument("--peers", action="append", help="comma-separated from torch,keras, or 'none' (default: all installed)")
    p.add_argument("--configs", action="append", help="comma-separated from P1,P2,P3,P4")
    g = p.add_argument_group("custom shape")
    g.add_argument("--cell", choices=["lstm", "gru", "rnn"])
    g.add_argument("--batch", type=int, help="B (default 32)")
    g.add_argument("--steps", type=int, help="T (default 50)")
    g.add_argument("--input", type=int, help="I (default 64)")
    g.add_argument("--units", type=int, help="H (default 128)")
    g.add_argument("--layers", type=int, help="stacked layers L (default 1)")
    g.add_argument("--bidirectional", action="store_true")
    g.add_argument("--lengths", help="uniform:LOW:HIGH variable lengths padded to --steps")
    g.add_argument("--train", action="store_true", help="also time a training step (custom shape)")
    p.add_argument("--no-train", action="store_true", help="forward passes only")
    p.add_argument("--quick", action="store_true",
                   help="repeat up to 3 within 1 s per measurement, P4 at T=100, numpy reference left out "
                   "unless named in --backends (aims at under 2 min on 2 idle cores)")
    p.add_argument("--repeat", type=int, help="timed repetitions (default 10; 3 with --quick)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls first (default 1)")
    p.add_argument("--budget", type=float,
                   help="stop repeating once timed calls exceed this many seconds (default 20; 1 with --quick)")
    p.add_argument("--torch-threads", type=int,
                   help="PyTorch intra-op threads (default: the usable core count; on a machine "
                   "shared with other work PyTorch's spinning OpenMP threads can be far slower)")
    p.add_argument("--no-gemm", action="store_true", help="skip measuring the GEMM rate")
    p.add_argument("--data", action="store_true",
                   help="also run the data benchmarks (benchmarks/data_*.py of a source checkout; their "
                   "files go to data_bench/ next to --json, or a temporary folder)")
    p.add_argument("--json", help="write the run (results, machine, versions, git revision) here")
    p.add_argument("--plot", help="write a bar chart of speed-ups (PNG) here")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("train", help="run a training recipe (fastseq.train.recipes)")
    p.add_argument("name", help="recipe name: japanese_vowels or echo")
    p.add_argument("--backend", help="backend name (default: the active one)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--plot", help="PNG path for the recipe's figure")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="extra recipe keyword (VALUE parsed as JSON when possible)")
    p.add_argument("--json", help="write the result summary here")
    p.set_defaults(func=cmd_train)
    return ap


def main(argv: Optional[List[str]] = None) -> int:
    # quiet TensorFlow's C++ start-up chatter (CUDA probing) unless the user chose a level
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except UsageError as exc:
        _err(f"fastseq {args.command}: error: {exc}")
        return 2
    except KeyboardInterrupt:
        _err("interrupted")
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
