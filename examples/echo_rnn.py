"""The echo RNN with truncated backpropagation through time.

A random binary series must be echoed ``echo_step`` steps later. The series is cut into
``batch_size`` rows and fed in windows of ``truncated_backprop_length`` steps; the RNN's final
state for one window is the initial state of the next, so the network keeps its memory
across windows while gradients stop at each window's start. The figure shows the loss curve
and, for a few batch rows of the last window, the input (blue), the target echo (red) and the
prediction (green); the spikes in the loss are the starts of new epochs (fresh data, zero state).

    python examples/echo_rnn.py --plot echo.png
    python examples/echo_rnn.py --backend numpy --epochs 3
"""

import argparse

from fastseq.train.recipes import echo


def run(backend=None, epochs=5, plot=None, verbose=1, **kw):
    return echo(backend=backend, epochs=epochs, plot=plot, verbose=verbose, **kw)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default=None)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--plot", default="echo_rnn.png", help="PNG file for the figure ('' for none)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    res = run(args.backend, args.epochs, args.plot or None, seed=args.seed)
    print(f"backend {res['backend']}: accuracy {res['accuracy']:.4f} after {res['steps']} steps "
          f"({res['train_time_s']:.1f} s); figure: {res.get('plot')}")
    return res


if __name__ == "__main__":
    main()
