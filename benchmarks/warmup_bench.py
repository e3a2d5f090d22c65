#!/usr/bin/env python
"""Warm-up times (issue 3, item 3), each in a new Python process:

- ``import fastseq``;
- the first ``dynamic_rnn`` call of a new process with the kernel cache warm: P1's
  LSTMCell(128) and P2's MultiRNNCell of three GRUCell(200), float32, numba backend.

    python benchmarks/warmup_bench.py [--runs 3] [--json warmup_results.json]

The cache is warmed first (``fastseq_kernels.warmup()`` plus one call of each model in a
process of its own), then every measurement is a fresh interpreter, so nothing but the
on-disk cache carries over. Prints the times; ``--json`` writes them with the machine.
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

_IMPORT = "import time; t = time.perf_counter(); import fastseq; print(time.perf_counter() - t)"

_FIRST_CALL = """
import time
t0 = time.perf_counter()
import numpy as np
import fastseq
from fastseq.nn import dynamic_rnn, rnn_cell
t1 = time.perf_counter()
model = {model!r}
if model == "P1":
    cell, x = rnn_cell.LSTMCell(128), np.zeros((1, 100, 64), np.float32)
else:
    cell = rnn_cell.MultiRNNCell([rnn_cell.GRUCell(200) for _ in range(3)])
    x = np.zeros((32, 28, 28), np.float32)
dynamic_rnn(cell, x, dtype=np.float32)
t2 = time.perf_counter()
dynamic_rnn(cell, x, dtype=np.float32)
t3 = time.perf_counter()
print(t1 - t0, t2 - t1, t3 - t2)
"""


def _run(code):
    env = dict(os.environ, FASTSEQ_BACKEND="numba")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         check=True)
    return [float(v) for v in out.stdout.split()]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    t = time.perf_counter()
    _run("import fastseq_kernels; fastseq_kernels.warmup()")
    for model in ("P1", "P2"):
        _run(_FIRST_CALL.format(model=model))
    print(f"cache warmed in {time.perf_counter() - t:.1f} s")
    res = {"import_s": [_run(_IMPORT)[0] for _ in range(args.runs)]}
    for model in ("P1", "P2"):
        rows = [_run(_FIRST_CALL.format(model=model)) for _ in range(args.runs)]
        res[model] = {"import_s": [r[0] for r in rows], "first_call_s": [r[1] for r in rows],
                      "second_call_s": [r[2] for r in rows]}
    print("import fastseq:           " + ", ".join(f"{v:.3f} s" for v in res["import_s"]) + "   (target < 0.5 s)")
    for model in ("P1", "P2"):
        r = res[model]
        print(f"{model} first dynamic_rnn:   " + ", ".join(f"{v:.3f} s" for v in r["first_call_s"])
              + "   (target < 1 s; second call " + ", ".join(f"{v * 1e3:.1f} ms" for v in r["second_call_s"]) + ")")
    if args.json:
        from fastseq.bench.machine import machine_info

        res["machine"] = machine_info(measure_gemm=False)
        res["python"] = platform.python_version()
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
