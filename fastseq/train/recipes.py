"""End-to-end training recipes: ``run_recipe(name, backend=None, epochs=None, plot=None, **kw)``.

* ``"japanese_vowels"``: speaker identification on the UCI Japanese Vowels data (shipped in
  :mod:`fastseq.datasets`): features standardised with the training set's statistics, a GRU
  over the variable-length utterances, a dense softmax layer on the last relevant output,
  Adam. Returns test accuracy and training time.
* ``"echo"``: the echo-RNN tutorial. A random binary series must be echoed ``echo_step``
  steps later; the series is cut into ``batch_size`` rows and processed in windows of
  ``truncated_backprop_length`` steps with the final state of one window fed as the initial
  state of the next (truncated BPTT: gradients stop at the window's start). ``plot`` names a
  PNG for the tutorial's figure (loss curve plus input, target and prediction of a few rows).

Both return a plain dict (numbers and lists only) that ``fastseq train`` prints.
"""

from __future__ import annotations

import contextlib
import time

import numpy as np

__all__ = ["run_recipe", "RECIPES", "japanese_vowels", "echo", "echo_data", "plot_echo"]


def _backend_ctx(backend):
    if backend is None:
        return contextlib.nullcontext()
    import fastseq

    return fastseq.use_backend(backend)


# ----------------------------------------------------------------------------- Japanese Vowels
def japanese_vowels(backend=None, epochs=30, num_units=64, learning_rate=0.005, batch_size=32, seed=0,
                    cell="gru", train_size=None, test_size=None, verbose=1, plot=None, dtype="float32"):
    """Train a GRU speaker classifier on Japanese Vowels; return accuracies and times.

    train_size / test_size: use only the first N utterances (for quick checks).
    """
    import fastseq
    from fastseq.datasets import load_japanese_vowels
    from fastseq.estimators import SequenceClassifier

    x_train, y_train = load_japanese_vowels("train")
    x_test, y_test = load_japanese_vowels("test")
    if train_size is not None:
        keep = np.random.default_rng(seed).permutation(len(x_train))[: int(train_size)]
        x_train, y_train = [x_train[i] for i in keep], y_train[keep]
    if test_size is not None:
        x_test, y_test = x_test[: int(test_size)], y_test[: int(test_size)]
    frames = np.concatenate(x_train)
    mean, std = frames.mean(axis=0), frames.std(axis=0) + 1e-8
    x_train = [(x - mean) / std for x in x_train]
    x_test = [(x - mean) / std for x in x_test]

    clf = SequenceClassifier(cell, num_units=num_units, epochs=epochs, batch_size=batch_size,
                             learning_rate=learning_rate, seed=seed, backend=backend, verbose=verbose, dtype=dtype)
    with _backend_ctx(backend):
        used = fastseq.get_backend()
    t0 = time.perf_counter()
    clf.fit(x_train, y_train)
    train_time = time.perf_counter() - t0
    t0 = time.perf_counter()
    test_acc = clf.score(x_test, y_test)
    predict_time = time.perf_counter() - t0
    result = {
        "recipe": "japanese_vowels",
        "backend": used,
        "epochs": int(epochs),
        "num_units": int(num_units),
        "train_size": len(x_train),
        "test_size": len(x_test),
        "train_time_s": train_time,
        "predict_time_s": predict_time,
        "final_train_loss": clf.history_["loss"][-1] if clf.history_["loss"] else None,
        "train_accuracy": clf.history_["accuracy"][-1] if clf.history_["accuracy"] else None,
        "test_accuracy": test_acc,
        "loss_history": list(clf.history_["loss"]),
    }
    if plot:
        _plot_curve(plot, clf.history_["step_loss"], "Japanese Vowels: training loss per step")
        result["plot"] = str(plot)
    return result


def _plot_curve(path, values, title):
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(values)
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------- echo RNN
def echo_data(total_series_length, echo_step, batch_size, rng):
    """The tutorial's data: a random 0/1 series and its echo (shifted ``echo_step`` right),
    each reshaped to ``[batch_size, total_series_length // batch_size]``."""
    x = rng.choice(2, total_series_length, p=[0.5, 0.5])
    y = np.roll(x, echo_step)
    y[:echo_step] = 0
    return x.reshape(batch_size, -1), y.reshape(batch_size, -1)


def echo(backend=None, epochs=5, total_series_length=15000, truncated_backprop_length=15, state_size=4,
         echo_step=3, batch_size=5, learning_rate=0.01, seed=0, plot=None, verbose=1, dtype="float32",
         plot_rows=3, carry_state=True):
    """Train the echo RNN with truncated BPTT (state carried across windows).

    Returns the loss history, the accuracy on a fresh series (state carried across windows
    as in training; the first ``echo_step`` steps of each row, whose echo comes from before
    the row's start, are left out) and the training time. ``carry_state=False`` restarts
    every window from a zero state (in training and evaluation), to show what carrying buys:
    the echo of a window's first ``echo_step`` inputs is then out of reach.
    """
    import sys

    import fastseq
    from fastseq.nn import rnn_cell
    from fastseq.train.model import RecurrentModel
    from fastseq.train.optimizers import Adam

    if total_series_length % batch_size or total_series_length < batch_size * truncated_backprop_length:
        raise ValueError(
            "total_series_length must be a multiple of batch_size and hold at least one window of "
            f"batch_size x truncated_backprop_length, got {total_series_length} for "
            f"{batch_size} x {truncated_backprop_length}"
        )
    fastseq.set_seed(seed)
    rng = np.random.default_rng(seed)
    dt = np.dtype(dtype)
    losses = []
    with _backend_ctx(backend):
        used = fastseq.get_backend()
        model = RecurrentModel(rnn_cell.BasicRNNCell(state_size), num_classes=2, head="per_step", dtype=dt)
        model.build(1)
        opt = Adam(learning_rate)
        ones = np.ones((batch_size, truncated_backprop_length), dtype=dt)
        t0 = time.perf_counter()
        last = None
        for epoch in range(int(epochs)):
            x, y = echo_data(total_series_length, echo_step, batch_size, rng)
            state = np.zeros((batch_size, state_size), dtype=dt)
            num_batches = x.shape[1] // truncated_backprop_length
            for b in range(num_batches):
                s = slice(b * truncated_backprop_length, (b + 1) * truncated_backprop_length)
                xb = x[:, s, None].astype(dt)
                loss, extras = model.train_step(opt, xb, None, y[:, s], ones, initial_state=state)
                if carry_state:  # carried into the next window, no gradient through it
                    state = extras["final_state"]
                losses.append(loss)
                last = (x[:, s], y[:, s], np.argmax(extras["logits"], axis=-1))
            if verbose:
                print(f"echo epoch {epoch + 1}/{epochs}: last loss {losses[-1]:.4f}", file=sys.stderr)
        train_time = time.perf_counter() - t0

        # evaluation on a fresh series, carrying the state as in training
        x, y = echo_data(total_series_length, echo_step, batch_size, rng)
        state = np.zeros((batch_size, state_size), dtype=dt)
        preds = []
        for b in range(x.shape[1] // truncated_backprop_length):
            s = slice(b * truncated_backprop_length, (b + 1) * truncated_backprop_length)
            logits, final = model.forward(x[:, s, None].astype(dt), None, initial_state=state)
            if carry_state:
                state = final
            preds.append(np.argmax(logits, axis=-1))
        pred = np.concatenate(preds, axis=1)
        accuracy = float(np.mean(pred[:, echo_step:] == y[:, echo_step:]))

    result = {
        "recipe": "echo",
        "backend": used,
        "epochs": int(epochs),
        "steps": len(losses),
        "train_time_s": train_time,
        "final_loss": float(np.mean(losses[-20:])) if losses else None,
        "accuracy": accuracy,
        "carry_state": bool(carry_state),
        "loss_history": [float(v) for v in losses],
    }
    if plot:
        plot_echo(plot, losses, *last, rows=plot_rows)
        result["plot"] = str(plot)
    return result


def plot_echo(path, losses, inputs, targets, predictions, rows=3):
    """The tutorial's figure: the loss curve, then for ``rows`` batch rows the input (blue),
    the target echo (red) and the prediction (green) of the last window as bars."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    rows = min(rows, inputs.shape[0])
    fig, axes = plt.subplots(1, rows + 1, figsize=(4 * (rows + 1), 3.2))
    axes[0].plot(losses)
    axes[0].set_title("training loss")
    axes[0].set_xlabel("step")
    steps = np.arange(inputs.shape[1])
    for r in range(rows):
        ax = axes[r + 1]
        ax.bar(steps, inputs[r], width=1.0, color="blue", label="input")
        ax.bar(steps, targets[r] * 0.5, width=1.0, color="red", label="target")
        ax.bar(steps, predictions[r] * 0.3, width=1.0, color="green", label="prediction")
        ax.set_ylim(0, 1.1)
        ax.set_title(f"batch row {r}")
        ax.set_xlabel("step in window")
    axes[1].legend(loc="upper right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


RECIPES = {"japanese_vowels": japanese_vowels, "echo": echo}


def run_recipe(name, backend=None, epochs=None, plot=None, **kw):
    """Run a recipe by name (``"japanese_vowels"`` or ``"echo"``) and return its result dict.

    backend: a backend name (default: the active one, ``FASTSEQ_BACKEND``). epochs: override
    the recipe's default. plot: PNG path for the recipe's figure. Other keywords go to the
    recipe function (:func:`japanese_vowels`, :func:`echo`).
    """
    fn = RECIPES.get(name)
    if fn is None:
        raise ValueError(f"unknown recipe {name!r}; available: {sorted(RECIPES)}")
    if epochs is not None:
        if not isinstance(epochs, (int, np.integer)) or epochs < 0:
            raise ValueError(f"epochs must be a non-negative int, got {epochs!r}")
        kw["epochs"] = int(epochs)
    return fn(backend=backend, plot=plot, **kw)
