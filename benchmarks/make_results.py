#!/usr/bin/env python
"""Regenerate benchmarks/RESULTS.md from a benchmark JSON run.

    python benchmarks/make_results.py [RUN.json] [--notes benchmarks/NOTES.md]
                                      [--out benchmarks/RESULTS.md] [--plot speedups.png]

RUN.json is what `fastseq bench --json` or `benchmarks/run_all.py` wrote (default:
benchmarks/results.json). The analysis section comes from NOTES.md, written by hand.
"""
import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # run from a source checkout

from fastseq.bench.results_md import render  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("json", nargs="?", default=os.path.join(HERE, "results.json"))
    ap.add_argument("--notes", default=os.path.join(HERE, "NOTES.md"))
    ap.add_argument("--out", default=os.path.join(HERE, "RESULTS.md"))
    ap.add_argument("--plot", default=None,
                    help="also draw the speed-up chart to this PNG (linked from RESULTS.md)")
    args = ap.parse_args(argv)
    with open(args.json) as fh:
        run = json.load(fh)
    plot_name = None
    if args.plot:
        from fastseq.bench.plot import plot_speedups

        plot_speedups(run, args.plot)
        plot_name = os.path.relpath(args.plot, os.path.dirname(os.path.abspath(args.out)))
    text = render(run, notes_path=args.notes, json_name=os.path.basename(args.json),
                  plot_name=plot_name)
    with open(args.out, "w") as fh:
        fh.write(text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
