"""Small datasets shipped with fastseq, loaded as lists of NumPy arrays.

``load_japanese_vowels`` reads the UCI / UEA *Japanese Vowels* speaker-identification data
(variable-length sequences of 12 LPC cepstrum coefficients, 9 speakers). The files and their
attribution live in ``fastseq/datasets/japanese_vowels/``.

``load_ts`` parses any file in the sktime/UEA ``.ts`` text format with a class label.
"""

from __future__ import annotations

import os

import numpy as np

__all__ = ["load_japanese_vowels", "load_ts", "DATA_DIR"]

DATA_DIR = os.path.dirname(os.path.abspath(__file__))


def _parse_ts_line(line, path, lineno, dtype):
    parts = line.split(":")
    if len(parts) < 2:
        raise ValueError(f"{path}:{lineno}: expected channels separated by ':' and a label, got {line[:60]!r}")
    *channels, label = parts
    try:
        values = [np.array([float(v) for v in ch.split(",")], dtype=dtype) for ch in channels]
    except ValueError as exc:
        raise ValueError(f"{path}:{lineno}: non-numeric value in a channel ({exc})") from None
    lengths = {len(v) for v in values}
    if len(lengths) != 1:
        raise ValueError(f"{path}:{lineno}: channels have different lengths {sorted(lengths)}")
    return np.stack(values, axis=1), label.strip()  # [T, C]


def load_ts(path, dtype="float32"):
    """Read a ``.ts`` file with class labels.

    Returns ``(sequences, labels)``: a list of ``[T_i, C]`` arrays and a NumPy array of the
    labels as written in the file (strings).
    """
    sequences, labels = [], []
    in_data = False
    dims = None
    with open(path, "r", encoding="utf-8") as fh:
        for lineno, raw in enumerate(fh, 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            if not in_data:
                low = line.lower()
                if low.startswith("@dimensions"):
                    dims = int(line.split()[1])
                if low.startswith("@data"):
                    in_data = True
                continue
            seq, label = _parse_ts_line(line, path, lineno, dtype)
            if dims is not None and seq.shape[1] != dims:
                raise ValueError(f"{path}:{lineno}: expected {dims} channels (@dimensions), got {seq.shape[1]}")
            sequences.append(seq)
            labels.append(label)
    if not in_data:
        raise ValueError(f"{path}: no '@data' line: not a .ts file")
    return sequences, np.array(labels)


def load_japanese_vowels(split="train", dtype="float32"):
    """The Japanese Vowels data set (UCI, CC BY 4.0; see the README beside the files).

    split: ``"train"`` (270 utterances) or ``"test"`` (370 utterances).
    Returns ``(sequences, labels)``: a list of ``[T_i, 12]`` arrays (7 <= T_i <= 29) and an
    int64 array of speaker indices ``0..8`` (the file's labels 1..9 minus one).
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    path = os.path.join(DATA_DIR, "japanese_vowels", f"JapaneseVowels_{split.upper()}.ts")
    sequences, labels = load_ts(path, dtype=dtype)
    return sequences, labels.astype(np.int64) - 1
