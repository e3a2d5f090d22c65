#!/usr/bin/env python
"""Run the full benchmark configurations P1-P4 on every installed fastseq backend and on
PyTorch and Keras, write benchmarks/results.json and benchmarks/speedups.png, then
regenerate benchmarks/RESULTS.md.

    python benchmarks/run_all.py [--configs P1,P3] [--backends numba,numpy] [--repeat 10]
                                 [--quick] [--no-results]

This is `fastseq bench` with the defaults for the record: all configurations, repeat 10,
a 20 s timing budget per measurement, every peer.
"""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # run from a source checkout

from fastseq.cli import main as cli_main  # noqa: E402


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    make_results = "--no-results" not in argv
    argv = [a for a in argv if a != "--no-results"]
    json_path = os.path.join(HERE, "results.json")
    plot_path = os.path.join(HERE, "speedups.png")
    args = ["bench", "--peers", "torch,keras", "--repeat", "10", "--budget", "20",
            "--json", json_path, "--plot", plot_path] + argv
    if not any(a.startswith("--configs") for a in argv):
        args += ["--configs", "P1,P2,P3,P4"]
    code = cli_main(args)
    if code == 0 and make_results:
        from make_results import main as make

        make([json_path, "--plot", plot_path])
    return code


if __name__ == "__main__":
    sys.exit(main())
