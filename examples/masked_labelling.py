"""Sequence labelling with a masked loss on variable-length sequences.

Task: a stream of bits; the label of every step is the number of ones seen so far, modulo 3
(the network must count). Lengths are long-tailed (most sequences short, a few long), so a
padded batch is mostly padding. Padded steps carry the filler label 0.

Models start from the same weights and see the same batches:

* masked: ``sequence_loss`` weighted by the sequence mask, ``sequence_length`` passed to the RNN;
* unmasked: every padded step counts as a real step with label 0, lengths still passed;
* unmasked_no_length: no mask and no ``sequence_length`` (the RNN runs over the padding):
  a padded 0 looks exactly like a real 0 bit, and the loss on the padding teaches the
  network to answer "0" after zeros, which wrecks the count on real steps;
* masked_no_length: the mask alone; a forward RNN's outputs on real steps do not depend on
  the padding after them, so this trains exactly like "masked".

With ``sequence_length`` the outputs on padded steps are exactly zero and the dense layer's
bias can absorb the padding labels, so there the unmasked loss costs much less (the numbers
printed show how much); without it, the mask is what keeps the model right.

    python examples/masked_labelling.py [--backend numpy] [--epochs 15]
"""

import argparse
import contextlib

import numpy as np

import fastseq
from fastseq.train import Adam, RecurrentModel
from fastseq.train.batching import pad_batch


def make_data(n, rng, max_len=60, noise=0.0):
    lengths = np.minimum(2 + rng.geometric(1 / 10, size=n), max_len)  # long tail: mean ~12, up to 60
    xs, ys = [], []
    for length in lengths:
        bits = rng.integers(0, 2, size=length)
        xs.append(bits[:, None].astype(np.float32))
        labels = np.cumsum(bits) % 3
        flip = rng.random(length) < noise  # label noise: the best possible accuracy is below 1
        labels[flip] = rng.integers(0, 3, size=int(flip.sum()))
        ys.append(labels)
    return xs, ys


def batches(xs, ys, batch_size, rng):
    order = rng.permutation(len(xs))
    for i in range(0, len(xs), batch_size):
        idx = order[i:i + batch_size]
        lengths = np.array([len(xs[j]) for j in idx])
        x = pad_batch([xs[j] for j in idx], "float32")
        y = pad_batch([ys[j] for j in idx], "int64")
        yield x, lengths, y


def real_step_metrics(model, xs, ys, use_lengths=True):
    x = pad_batch(xs, "float32")
    y = pad_batch(ys, "int64")
    lengths = np.array([len(a) for a in xs])
    logits, _ = model.forward(x, lengths if use_lengths else None)
    mask = np.arange(x.shape[1])[None] < lengths[:, None]
    z = logits - logits.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, y[..., None], -1)[..., 0]
    acc = float(np.mean((logits.argmax(-1) == y)[mask]))
    return float(nll[mask].mean()), acc


#: (name, masked loss, sequence_length passed to the RNN)
CONFIGS = (
    ("masked", True, True),
    ("unmasked", False, True),
    ("unmasked_no_length", False, False),
    ("masked_no_length", True, False),
)


def run(backend=None, epochs=15, num_units=32, n_train=1000, n_test=500, batch_size=32, learning_rate=0.01,
        seed=0, verbose=1, configs=None):
    """Train one model per configuration in CONFIGS (or the names in ``configs``)."""
    rng = np.random.default_rng(seed)
    x_train, y_train = make_data(n_train, rng)
    x_test, y_test = make_data(n_test, rng)
    padded = sum(len(x) for x in x_train)
    results = {}
    with fastseq.use_backend(backend) if backend else contextlib.nullcontext():
        for name, masked, use_lengths in CONFIGS:
            if configs is not None and name not in configs:
                continue
            fastseq.set_seed(seed)
            model = RecurrentModel("gru", num_units=num_units, num_classes=3, head="per_step")
            model.build(1)
            opt = Adam(learning_rate, clip_norm=5.0)
            batch_rng = np.random.default_rng(seed + 1)  # same batch order for every model
            history = []
            pad_steps = real_steps = 0
            for epoch in range(epochs):
                for x, lengths, y in batches(x_train, y_train, batch_size, batch_rng):
                    mask = (np.arange(x.shape[1])[None] < lengths[:, None]).astype(np.float32)
                    weights = mask if masked else np.ones_like(mask)
                    model.train_step(opt, x, lengths if use_lengths else None, y, weights)
                    pad_steps += mask.size
                    real_steps += mask.sum()
                loss, acc = real_step_metrics(model, x_test, y_test, use_lengths)
                history.append({"epoch": epoch + 1, "test_loss": loss, "test_accuracy": acc})
                if verbose:
                    print(f"{name} epoch {epoch + 1}: real-step test loss {loss:.4f}, accuracy {acc:.4f}")
            results[name] = {"test_loss": history[-1]["test_loss"] if history else None,
                             "test_accuracy": history[-1]["test_accuracy"] if history else None,
                             "history": history}
            results["padding_fraction"] = float(1 - real_steps / max(pad_steps, 1))
    results["train_real_steps"] = padded
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default=None)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    res = run(args.backend, args.epochs, seed=args.seed)
    print(f"padding: {res['padding_fraction']:.0%} of the padded steps")
    for key, _, _ in CONFIGS:
        print(f"{key:18s}: real-step test loss {res[key]['test_loss']:.4f}, "
              f"accuracy {res[key]['test_accuracy']:.4f}")
    return res


if __name__ == "__main__":
    main()
