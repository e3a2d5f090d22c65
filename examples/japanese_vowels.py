"""Speaker identification on the UCI Japanese Vowels data with a GRU classifier.

Each utterance is a variable-length sequence (7 to 29 frames) of 12 LPC cepstrum
coefficients; the task is to tell which of 9 speakers said it. The sequences are padded per
mini-batch, their lengths go to ``dynamic_rnn`` as ``sequence_length``, and the classifier
reads the GRU output at each utterance's last real frame.

    python examples/japanese_vowels.py                       # numba (default backend)
    FASTSEQ_BACKEND=numpy python examples/japanese_vowels.py
    python examples/japanese_vowels.py --backend tensorflow --epochs 30
"""

import argparse
import contextlib
import time

import numpy as np

import fastseq
from fastseq import SequenceClassifier
from fastseq.datasets import load_japanese_vowels


def run(backend=None, epochs=30, num_units=64, learning_rate=0.005, seed=0, train_size=None, verbose=1):
    x_train, y_train = load_japanese_vowels("train")
    x_test, y_test = load_japanese_vowels("test")
    if train_size is not None:  # quick runs (tests)
        x_train, y_train = x_train[:train_size], y_train[:train_size]

    # standardise every coefficient with the training frames' statistics
    frames = np.concatenate(x_train)
    mean, std = frames.mean(axis=0), frames.std(axis=0) + 1e-8
    x_train = [(x - mean) / std for x in x_train]
    x_test = [(x - mean) / std for x in x_test]

    clf = SequenceClassifier("gru", num_units=num_units, epochs=epochs, batch_size=32,
                             learning_rate=learning_rate, seed=seed, backend=backend, verbose=verbose)
    start = time.perf_counter()
    clf.fit(x_train, y_train)
    train_time = time.perf_counter() - start
    with fastseq.use_backend(backend) if backend else contextlib.nullcontext():
        used = fastseq.get_backend()
    return {
        "backend": used,
        "train_time_s": train_time,
        "train_accuracy": clf.history_["accuracy"][-1] if epochs else None,
        "test_accuracy": clf.score(x_test, y_test),
        "loss_history": clf.history_["loss"],
        "classifier": clf,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default=None, help="numba, numpy or tensorflow (default: FASTSEQ_BACKEND)")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--units", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save", default=None, help="save the trained classifier (.npz or .safetensors)")
    args = parser.parse_args(argv)
    res = run(args.backend, args.epochs, args.units, seed=args.seed)
    print(f"backend {res['backend']}: test accuracy {res['test_accuracy']:.4f}, "
          f"training time {res['train_time_s']:.1f} s ({args.epochs} epochs)")
    if args.save:
        res["classifier"].save(args.save)
        print(f"saved to {args.save}")
    return res


if __name__ == "__main__":
    main()
