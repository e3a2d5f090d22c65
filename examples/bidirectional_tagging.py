"""Bidirectional tagging: the label of a step depends on a *later* input.

Task: a sequence of random symbols (4 kinds, one-hot); the label of step t is the symbol at
step t + 2, or an extra class "end" for the last two steps. A forward-only RNN has not seen
step t + 2 when it must answer at step t, so it can only guess (about 1/4 right on most
steps); a bidirectional RNN reads the sequence from both ends and solves the task.

    python examples/bidirectional_tagging.py [--backend numpy] [--epochs 8]
"""

import argparse

import numpy as np

from fastseq import SequenceTagger

SYMBOLS = 4
LOOKAHEAD = 2


def make_data(n, rng, min_len=5, max_len=20):
    xs, ys = [], []
    for length in rng.integers(min_len, max_len + 1, size=n):
        sym = rng.integers(0, SYMBOLS, size=length)
        xs.append(np.eye(SYMBOLS, dtype=np.float32)[sym])
        labels = np.full(length, SYMBOLS)  # "end"
        labels[:-LOOKAHEAD] = sym[LOOKAHEAD:]
        ys.append(labels)
    return xs, ys


def run(backend=None, epochs=8, num_units=32, n_train=1000, n_test=300, seed=0, verbose=1):
    rng = np.random.default_rng(seed)
    x_train, y_train = make_data(n_train, rng)
    x_test, y_test = make_data(n_test, rng)
    out = {}
    for bidirectional in (False, True):
        tagger = SequenceTagger("gru", num_units=num_units, bidirectional=bidirectional, epochs=epochs,
                                learning_rate=0.01, seed=seed, backend=backend, verbose=verbose)
        tagger.fit(x_train, y_train)
        key = "bidirectional" if bidirectional else "unidirectional"
        pred = np.concatenate(tagger.predict(x_test))
        true = np.concatenate(y_test)
        symbol_steps = true < SYMBOLS
        out[key] = {"test_accuracy": float(np.mean(pred == true)),
                    "symbol_step_accuracy": float(np.mean(pred[symbol_steps] == true[symbol_steps])),
                    "train_loss": tagger.history_["loss"][-1] if epochs else None}
    out["chance_level"] = 1.0 / SYMBOLS  # on steps labelled with a (future) symbol
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default=None)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    res = run(args.backend, args.epochs, seed=args.seed)
    print(f"guessing a future symbol is right {res['chance_level']:.2f} of the time")
    for key in ("unidirectional", "bidirectional"):
        print(f"{key:15s}: per-step test accuracy {res[key]['test_accuracy']:.4f}, "
              f"on steps labelled with a future symbol {res[key]['symbol_step_accuracy']:.4f}")
    return res


if __name__ == "__main__":
    main()
