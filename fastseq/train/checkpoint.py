"""Saving and loading weights without pickle: ``.npz`` or safetensors.

``save_weights(path, weights, metadata=None)`` writes a flat mapping ``name -> array``
(TF1-style names such as ``rnn/gru_cell/gates/kernel`` are kept as they are).
The format follows the file name (``.safetensors`` or ``.npz``) unless ``format`` is given.

* ``.npz``: ``numpy.savez`` with one entry per weight; ``metadata`` (a dict of strings) is
  stored as the UTF-8 JSON bytes of an entry named ``__metadata__``. Read back with
  ``allow_pickle=False``: object arrays are refused.
* safetensors (written here, no dependency): an 8-byte little-endian header length ``N``,
  ``N`` bytes of JSON ``{name: {"dtype": "F32", "shape": [...], "data_offsets": [a, b]},
  "__metadata__": {str: str}}`` padded with spaces to a multiple of 8, then the raw
  little-endian, C-order tensor bytes. Files load in the ``safetensors`` library and vice versa.

Any damaged file (truncated, bad header, offsets out of range or overlapping, a size that does
not match dtype x shape) raises :class:`CheckpointError` (a ``ValueError``) naming the file and
the problem; :func:`check_weights` compares a loaded mapping with the expected names/shapes.
"""

from __future__ import annotations

import json
import os
import struct
import zipfile
from collections import OrderedDict

import numpy as np

__all__ = ["save_weights", "load_weights", "load_metadata", "check_weights", "CheckpointError"]

_ST_DTYPES = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "U16": np.dtype("<u2"),
    "U32": np.dtype("<u4"),
    "U64": np.dtype("<u8"),
    "BOOL": np.dtype("bool"),
}
_NP_TO_ST = {v.str.lstrip("<|=").lstrip(">"): k for k, v in _ST_DTYPES.items()}
_METADATA_KEY = "__metadata__"
_MAX_HEADER = 100 * 1024 * 1024


class CheckpointError(ValueError):
    """A weights file is unreadable, damaged, or does not match what was expected."""


def _format_of(path, format):
    if format is not None:
        fmt = str(format).lower()
        if fmt not in ("npz", "safetensors"):
            raise ValueError(f"format must be 'npz' or 'safetensors', got {format!r}")
        return fmt
    ext = os.path.splitext(str(path))[1].lower()
    if ext == ".npz":
        return "npz"
    if ext in (".safetensors", ".st"):
        return "safetensors"
    raise ValueError(
        f"cannot tell the weights format from the file name {str(path)!r}: "
        "use a .npz or .safetensors extension or pass format='npz'|'safetensors'"
    )


def _check_mapping(weights, metadata):
    if not hasattr(weights, "items"):
        raise TypeError(f"weights must be a mapping name -> array, got {type(weights).__name__}")
    out = OrderedDict()
    for name, value in weights.items():
        if not isinstance(name, str) or not name:
            raise TypeError(f"weight names must be non-empty strings, got {name!r}")
        if name == _METADATA_KEY:
            raise ValueError(f"{_METADATA_KEY!r} is reserved and cannot be a weight name")
        arr = np.asarray(value)
        if arr.dtype == object or arr.dtype.kind not in "biuf":
            raise TypeError(f"weight {name!r}: only numeric arrays can be saved, got dtype {arr.dtype}")
        out[name] = arr
    if metadata is not None:
        if not isinstance(metadata, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
        ):
            raise TypeError("metadata must be a dict of str -> str")
    return out


def save_weights(path, weights, metadata=None, format=None):
    """Write ``weights`` (mapping name -> array) to ``path`` (.npz or .safetensors).
    ``metadata``: optional dict of str -> str stored in the file. Returns ``path``."""
    fmt = _format_of(path, format)
    arrays = _check_mapping(weights, metadata)
    tmp = f"{path}.tmp"
    if fmt == "npz":
        payload = dict(arrays)
        if metadata is not None:
            payload[_METADATA_KEY] = np.frombuffer(json.dumps(metadata).encode("utf-8"), dtype=np.uint8)
        with open(tmp, "wb") as fh:
            np.savez(fh, **payload)
    else:
        _write_safetensors(tmp, arrays, metadata)
    os.replace(tmp, path)
    return path


def _write_safetensors(path, arrays, metadata):
    header = OrderedDict()
    if metadata:
        header[_METADATA_KEY] = dict(metadata)
    offset = 0
    blobs = []
    for name, arr in arrays.items():
        key = arr.dtype.str.lstrip("<|=>")
        st = _NP_TO_ST.get(key)
        if st is None:
            raise TypeError(f"weight {name!r}: dtype {arr.dtype} has no safetensors equivalent")
        data = np.ascontiguousarray(arr, dtype=_ST_DTYPES[st]).tobytes()
        header[name] = {"dtype": st, "shape": list(arr.shape), "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
        blobs.append(data)
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)))
        fh.write(raw)
        for blob in blobs:
            fh.write(blob)


def _read_safetensors(path):
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: not a safetensors file: {size} bytes, shorter than the 8-byte header length")
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, _MAX_HEADER):
                raise CheckpointError(
                    f"{path}: corrupted safetensors file: header length {n} does not fit in a file of {size} bytes"
                )
            raw = fh.read(n)
            data = fh.read()
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read the file ({exc})") from exc
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: corrupted safetensors file: the header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupted safetensors file: the header is not a JSON object")
    metadata = header.pop(_METADATA_KEY, None) or {}
    if not isinstance(metadata, dict):
        raise CheckpointError(f"{path}: corrupted safetensors file: __metadata__ is not an object")
    spans = []
    out = OrderedDict()
    for name, info in header.items():
        try:
            dtype = _ST_DTYPES[info["dtype"]]
            shape = tuple(int(s) for s in info["shape"])
            begin, end = (int(v) for v in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: corrupted safetensors file: bad header entry for {name!r}: {info!r}") from None
        if any(s < 0 for s in shape) or not 0 <= begin <= end <= len(data):
            raise CheckpointError(
                f"{path}: corrupted or truncated safetensors file: {name!r} has data_offsets [{begin}, {end}] "
                f"outside the {len(data)} data bytes"
            )
        expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if end - begin != expected:
            raise CheckpointError(
                f"{path}: corrupted safetensors file: {name!r} holds {end - begin} bytes, "
                f"{info['dtype']} {list(shape)} needs {expected}"
            )
        spans.append((begin, end, name))
        out[name] = np.frombuffer(data, dtype=dtype, count=expected // dtype.itemsize, offset=begin).reshape(shape).copy()
    spans.sort()
    pos = 0
    for begin, end, name in spans:
        if begin != pos:
            raise CheckpointError(f"{path}: corrupted safetensors file: tensor data of {name!r} overlaps or leaves a gap")
        pos = end
    if pos != len(data):
        raise CheckpointError(f"{path}: corrupted safetensors file: {len(data) - pos} trailing bytes after the tensors")
    # keep the order in which the tensors lie in the file (the order they were saved in)
    ordered = OrderedDict((name, out[name]) for _, _, name in spans)
    return ordered, {str(k): str(v) for k, v in metadata.items()}


def _read_npz(path):
    try:
        with np.load(path, allow_pickle=False) as npz:
            out = OrderedDict()
            metadata = {}
            for name in npz.files:
                arr = npz[name]
                if name == _METADATA_KEY:
                    try:
                        metadata = json.loads(arr.tobytes().decode("utf-8"))
                    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                        raise CheckpointError(f"{path}: corrupted metadata entry ({exc})") from None
                else:
                    out[name] = arr
    except CheckpointError:
        raise
    except FileNotFoundError:
        raise
    except ValueError as exc:
        if "pickle" in str(exc).lower():
            raise CheckpointError(f"{path}: holds pickled objects; refusing to load them (allow_pickle=False)") from None
        raise CheckpointError(f"{path}: corrupted .npz file ({exc})") from None
    except (zipfile.BadZipFile, OSError, EOFError, KeyError) as exc:
        raise CheckpointError(f"{path}: corrupted or truncated .npz file ({type(exc).__name__}: {exc})") from None
    return out, metadata


def _read(path, format):
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"weights file not found: {path}")
    fmt = _format_of(path, format)
    return _read_npz(path) if fmt == "npz" else _read_safetensors(path)


def load_weights(path, format=None, expected=None):
    """Read the weights saved by :func:`save_weights` (or any .npz / safetensors file).

    Returns an OrderedDict name -> array. With ``expected`` (a mapping name -> array or
    shape), names, shapes and dtype kinds are checked (:func:`check_weights`).
    """
    weights, _ = _read(path, format)
    if expected is not None:
        check_weights(weights, expected, source=path)
    return weights


def load_metadata(path, format=None):
    """The ``metadata`` dict stored by :func:`save_weights` (``{}`` when none)."""
    return _read(path, format)[1]


def check_weights(weights, expected, source="weights"):
    """Raise :class:`CheckpointError` unless ``weights`` has exactly the names of
    ``expected`` with the same shapes (``expected`` values: arrays or shape tuples)."""
    missing = [k for k in expected if k not in weights]
    unknown = [k for k in weights if k not in expected]
    if missing or unknown:
        raise CheckpointError(
            f"{source}: the weights do not match the model: missing {missing}, unexpected {unknown}"
        )
    for name, ref in expected.items():
        shape = tuple(ref) if isinstance(ref, (tuple, list)) else np.shape(ref)
        got = np.shape(weights[name])
        if got != shape:
            raise CheckpointError(f"{source}: weight {name!r} has shape {got}, the model expects {shape}")
        if np.asarray(weights[name]).dtype.kind != "f":
            raise CheckpointError(f"{source}: weight {name!r} has dtype {np.asarray(weights[name]).dtype}, expected floats")
