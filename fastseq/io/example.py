"""tf.train.SequenceExample encoding and parsing without TensorFlow or protobuf.

Encode with :func:`encode_sequence_example`; parse with
:func:`parse_single_sequence_example` and feature specs named as TensorFlow's
(:class:`FixedLenFeature`, :class:`VarLenFeature`, :class:`FixedLenSequenceFeature`).
The three Feature types map to NumPy as: int64 -> ``int64``, float -> ``float32``,
bytes -> ``object`` arrays of ``bytes`` (a list for sparse values).
Variable-length features come back as :class:`SparseValue` ``(indices, values,
dense_shape)``, the fields of ``tf.SparseTensor``.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

__all__ = ["FixedLenFeature", "VarLenFeature", "FixedLenSequenceFeature", "SparseValue",
           "encode_sequence_example", "parse_single_sequence_example", "SequenceExampleParser",
           "read_sequence_examples", "write_sequence_examples"]

_KIND_NAMES = {1: "bytes (string)", 2: "float", 3: "int64"}


class FixedLenFeature(NamedTuple):
    """A context feature with exactly ``prod(shape)`` values, returned as ``shape``."""
    shape: Any
    dtype: Any
    default_value: Any = None


class VarLenFeature(NamedTuple):
    """Any number of values, returned as a :class:`SparseValue`."""
    dtype: Any


class FixedLenSequenceFeature(NamedTuple):
    """A feature list whose every step has ``prod(shape)`` values, returned as ``[T, *shape]``.
    ``allow_missing=True`` turns a missing list into ``[0, *shape]`` instead of an error."""
    shape: Any
    dtype: Any
    allow_missing: bool = False
    default_value: Any = None


class SparseValue(NamedTuple):
    """``indices [N, rank]`` int64, ``values [N]``, ``dense_shape [rank]`` int64."""
    indices: np.ndarray
    values: Any
    dense_shape: np.ndarray


def _kind_of_dtype(dtype, where):
    name = getattr(dtype, "name", None)  # tf.DType, np.dtype
    if isinstance(dtype, str):
        name = dtype
    elif dtype in (bytes, str):
        name = "string"
    elif name is None:
        try:
            name = np.dtype(dtype).name
        except TypeError:
            name = repr(dtype)
    name = {"float": "float32", "int": "int64", "bytes": "string", "str": "string"}.get(name, name)
    kinds = {"int64": 3, "float32": 2, "string": 1}
    if name not in kinds:
        raise TypeError(f"{where}: dtype must be int64, float32 or string (the Feature types), got {dtype!r}")
    return kinds[name]


def _shape_tuple(shape, where):
    if isinstance(shape, (int, np.integer)):
        shape = (int(shape),)
    try:
        shape = tuple(int(s) for s in shape)
    except TypeError:
        raise TypeError(f"{where}: shape must be a list of non-negative ints, got {shape!r}") from None
    if any(s < 0 for s in shape):
        raise ValueError(f"{where}: shape must be a list of non-negative ints, got {shape!r}")
    return shape


def _name_bytes(name, where):
    if isinstance(name, bytes):
        return name
    if isinstance(name, str):
        return name.encode("utf-8")
    raise TypeError(f"{where}: feature names must be str, got {type(name).__name__}")


def _sparse(values, counts):
    counts = np.asarray(counts, dtype=np.int64)
    n = int(counts.sum())
    rows = np.repeat(np.arange(len(counts), dtype=np.int64), counts)
    starts = np.cumsum(counts) - counts
    cols = np.arange(n, dtype=np.int64) - np.repeat(starts, counts)
    indices = np.stack([rows, cols], axis=1) if n else np.zeros((0, 2), dtype=np.int64)
    width = int(counts.max()) if len(counts) else 0
    return SparseValue(indices, values, np.array([len(counts), width], dtype=np.int64))


def _dense_values(kind, values):
    if kind == 1:
        out = np.empty(len(values), dtype=object)
        out[:] = values
        return out
    return values


class SequenceExampleParser:
    """Compiled feature specs; :meth:`parse` turns one serialized SequenceExample into
    ``(context, sequences)`` dicts keyed by the spec names."""

    def __init__(self, context_features=None, sequence_features=None):
        self.context = self._compile(context_features, "context_features", True)
        self.sequence = self._compile(sequence_features, "sequence_features", False)
        self.context_want = {nb: kind for _, nb, _, kind, _ in self.context}
        self.sequence_want = {nb: kind for _, nb, _, kind, _ in self.sequence}

    @staticmethod
    def _compile(specs, arg, is_context):
        out = []
        if specs is None:
            return out
        if not isinstance(specs, dict):
            raise TypeError(f"{arg}: expected a dict of feature name -> spec, got {type(specs).__name__}")
        for name, spec in specs.items():
            where = f"{arg}[{name!r}]"
            nb = _name_bytes(name, arg)
            if is_context and isinstance(spec, FixedLenFeature):
                shape = _shape_tuple(spec.shape, where)
                kind = _kind_of_dtype(spec.dtype, where)
                default = None
                if spec.default_value is not None:
                    dt = object if kind == 1 else (np.float32 if kind == 2 else np.int64)
                    try:
                        default = np.broadcast_to(np.asarray(spec.default_value, dtype=dt), shape).copy()
                    except ValueError:
                        raise ValueError(f"{where}: default_value does not fit shape {shape}") from None
                out.append((name, nb, "fixed", kind, (shape, default, int(np.prod(shape, dtype=np.int64)))))
            elif isinstance(spec, VarLenFeature):
                out.append((name, nb, "var", _kind_of_dtype(spec.dtype, where), None))
            elif not is_context and isinstance(spec, (FixedLenSequenceFeature, FixedLenFeature)):
                shape = _shape_tuple(spec.shape, where)
                allow = bool(getattr(spec, "allow_missing", False))
                size = int(np.prod(shape, dtype=np.int64))
                out.append((name, nb, "fixedseq", _kind_of_dtype(spec.dtype, where), (shape, allow, size)))
            else:
                allowed = "FixedLenFeature or VarLenFeature" if is_context else "FixedLenSequenceFeature or VarLenFeature"
                raise TypeError(f"{where}: expected a {allowed}, got {type(spec).__name__}")
        return out

    def _missing(self, buf, offset, length, section, name, where):
        from fastseq_kernels import _protowire

        try:
            ctx, seq = _protowire.feature_names(buf, offset, length)
        except ValueError:
            ctx, seq = [], []
        have = sorted(n.decode("utf-8", "replace") for n in (ctx if section == "context" else seq))
        return ValueError(f"{where}{section} feature {name!r} is required but missing; the example has {have}")

    def parse(self, buf, offset=0, length=None, where=""):
        """Parse ``buf[offset:offset+length]``; ``where`` (a string, or a callable returning
        one, called only on errors) prefixes error messages."""
        from fastseq_kernels import _protowire

        if length is None:
            length = len(buf) - offset
        try:
            craw, sraw = _protowire.parse_sequence_example(buf, offset, length, self.context_want,
                                                           self.sequence_want)
        except _protowire.WireError as exc:
            raise ValueError(f"{where if isinstance(where, str) else where()}{exc}") from None
        try:
            return self._finish(buf, offset, length, craw, sraw, _protowire.first_mismatch)
        except (ValueError, TypeError) as exc:
            if where and type(exc) in (ValueError, TypeError):
                raise type(exc)(f"{where if isinstance(where, str) else where()}{exc}") from None
            raise

    def _finish(self, buf, offset, length, craw, sraw, first_mismatch):
        where = ""
        context = {}
        for name, nb, mode, kind, extra in self.context:
            got = craw.get(nb)
            if got is not None and got[1] is None:
                raise TypeError(f"{where}context feature {name!r}: the spec asks for {_KIND_NAMES[kind]}, "
                                f"the example holds {_KIND_NAMES[got[0]]}")
            if mode == "var":
                vals = got[1] if got is not None else ([] if kind == 1 else np.zeros(0, np.float32 if kind == 2 else np.int64))
                vals = _dense_values(kind, vals)
                n = len(vals)
                context[name] = SparseValue(np.arange(n, dtype=np.int64).reshape(n, 1), vals,
                                            np.array([n], dtype=np.int64))
                continue
            shape, default, size = extra
            if got is None:
                if default is None:
                    raise self._missing(buf, offset, length, "context", name, where)
                context[name] = default.copy()
                continue
            vals = got[1]
            if len(vals) != size:
                raise ValueError(f"{where}context feature {name!r}: expected {size} values (shape {list(shape)}), "
                                 f"got {len(vals)}")
            context[name] = _dense_values(kind, vals).reshape(shape)
        sequences = {}
        for name, nb, mode, kind, extra in self.sequence:
            got = sraw.get(nb)
            if got is not None and got[1] is None:
                raise TypeError(f"{where}sequence feature {name!r}: the spec asks for {_KIND_NAMES[kind]}, "
                                f"the example holds {_KIND_NAMES[got[0]]}")
            if mode == "var":
                if got is None:
                    vals = _dense_values(kind, []) if kind == 1 else np.zeros(0, np.float32 if kind == 2 else np.int64)
                    sequences[name] = _sparse(vals, np.zeros(0, np.int64))
                else:
                    sequences[name] = _sparse(_dense_values(kind, got[1]), got[2])
                continue
            shape, allow_missing, size = extra
            if got is None:
                if not allow_missing:
                    raise self._missing(buf, offset, length, "sequence", name, where)
                dt = object if kind == 1 else (np.float32 if kind == 2 else np.int64)
                sequences[name] = np.zeros((0,) + shape, dtype=dt)
                continue
            _, vals, counts = got
            t = first_mismatch(counts, size)
            if t >= 0:
                raise ValueError(f"{where}sequence feature {name!r}: step {t} has {int(counts[t])} values, "
                                 f"expected {size} (shape {list(shape)})")
            sequences[name] = (vals.reshape((len(counts),) + shape) if kind != 1
                               else _dense_values(kind, vals).reshape((len(counts),) + shape))
        return context, sequences


def parse_single_sequence_example(serialized, context_features=None, sequence_features=None, example_name=None,
                                  name=None):
    """Parse one serialized ``tf.train.SequenceExample`` (``tf.io.parse_single_sequence_example``).

    Returns ``(context, sequences)``: dicts keyed like the specs. Context
    :class:`FixedLenFeature` -> array of ``shape`` (``default_value`` when missing, else
    ValueError); :class:`VarLenFeature` -> :class:`SparseValue` (rank 1 in the context,
    ``[T, max values per step]`` for a feature list); :class:`FixedLenSequenceFeature` ->
    ``[T, *shape]``. A Feature type other than the spec's raises TypeError.
    """
    if isinstance(serialized, np.ndarray) and serialized.ndim == 0:
        serialized = serialized.item()
    if isinstance(serialized, (bytes, bytearray, memoryview, np.bytes_)):
        buf = bytes(serialized) if not isinstance(serialized, bytes) else serialized
    else:
        raise TypeError(f"serialized: expected bytes, got {type(serialized).__name__}")
    parser = SequenceExampleParser(context_features, sequence_features)
    where = f"{example_name}: " if example_name else ""
    return parser.parse(buf, 0, len(buf), where)


# ---------------------------------------------------------------- encoding

def _feature_body(value, where, kind=None):
    """Feature message body for one value (scalar or 1-D data) -> (kind, bytes).
    ``kind`` (1 bytes, 2 float, 3 int64) forces the Feature type; None infers it."""
    from fastseq_kernels import _protowire

    if isinstance(value, (bytes, str, np.bytes_, np.str_)):
        value = [value]
    arr = np.asarray(value) if not isinstance(value, np.ndarray) else value
    k = arr.dtype.kind
    if kind is None:
        kind = 1 if k in "SUO" else 3 if k in "biu" else 2 if k == "f" else None
    if arr.size == 0:
        return kind or 2, bytes([((kind or 2) << 3) | 2, 0])
    if kind == 1:
        if k not in "SUO":
            raise TypeError(f"{where}: the dtype asks for bytes, got {arr.dtype} data")
        items = []
        for v in arr.reshape(-1):
            if isinstance(v, (str, np.str_)):
                v = v.encode("utf-8")
            if not isinstance(v, (bytes, np.bytes_)):
                raise TypeError(f"{where}: expected numbers or bytes/str, got {type(v).__name__}")
            items.append(_protowire.field(1, bytes(v)))
        return 1, _protowire.field(1, b"".join(items))
    if k not in "biuf":
        raise TypeError(f"{where}: expected int, float or bytes values, got dtype {arr.dtype}")
    if kind == 3:
        if k == "f" and not np.all(arr == np.round(arr)):
            raise TypeError(f"{where}: the dtype asks for int64, got non-integer floats")
        return 3, _protowire.feature_numeric(np.ascontiguousarray(arr, dtype=np.int64).reshape(-1))
    return 2, _protowire.feature_numeric(np.ascontiguousarray(arr, dtype=np.float32).reshape(-1))


def _empty_kind(step):
    """The Feature type an empty step implies (from an ndarray's dtype), else None."""
    if isinstance(step, np.ndarray):
        k = step.dtype.kind
        return 1 if k in "SUO" else 3 if k in "biu" else 2 if k == "f" else None
    return None


def _feature_list_body(steps, where, kind=None):
    from fastseq_kernels import _protowire

    arr = None
    if isinstance(steps, np.ndarray):
        arr = steps
    elif isinstance(steps, (list, tuple)):
        try:
            arr = np.asarray(steps)
        except ValueError:  # ragged
            arr = None
        if arr is not None and (arr.dtype == object or arr.size == 0):
            arr = None
    else:
        raise TypeError(f"{where}: expected a list of per-step values or an array [T, ...], got {type(steps).__name__}")
    if arr is not None and arr.dtype.kind in "biuf" and kind != 1:
        if arr.ndim == 0:
            raise ValueError(f"{where}: expected one entry per step ([T, ...]), got a scalar")
        T = arr.shape[0]
        per = int(np.prod(arr.shape[1:], dtype=np.int64))
        k = kind or (2 if arr.dtype.kind == "f" else 3)
        if k == 3 and arr.dtype.kind == "f" and not np.all(arr == np.round(arr)):
            raise TypeError(f"{where}: the dtype asks for int64, got non-integer floats")
        dt = np.float32 if k == 2 else np.int64
        return _protowire.feature_list_numeric(np.ascontiguousarray(arr, dtype=dt).reshape(-1), T, per)
    if arr is not None and arr.dtype.kind not in "SUbiuf":
        raise TypeError(f"{where}: expected int, float or bytes values, got dtype {arr.dtype}")
    bodies = []
    kinds = set()
    for t, step in enumerate(steps):
        if not isinstance(step, (bytes, str, np.bytes_, np.str_)) and np.size(step) == 0:
            bodies.append(None)  # an empty step takes the list's type
            ek = _empty_kind(step)
            if ek is not None and kind is None:
                kinds.add(ek)
            continue
        k, body = _feature_body(step, f"{where} step {t}", kind)
        kinds.add(k)
        bodies.append(body)
    if len(kinds) > 1:
        raise TypeError(f"{where}: steps mix Feature types ({sorted(_KIND_NAMES[k] for k in kinds)})")
    k = kind or (kinds.pop() if kinds else 2)
    empty = bytes([(k << 3) | 2, 0])
    parts = [_protowire.field(1, empty if b is None else b) for b in bodies]
    return b"".join(parts)


def _map_body(items, where, entry_fn, dtypes):
    from fastseq_kernels import _protowire

    if items is None:
        return b""
    if not isinstance(items, dict):
        raise TypeError(f"{where}: expected a dict of feature name -> values, got {type(items).__name__}")
    parts = []
    for name, value in items.items():
        nb = _name_bytes(name, where)
        kind = None
        if name in dtypes:
            kind = _kind_of_dtype(dtypes[name], f"dtypes[{name!r}]")
        body = entry_fn(value, f"{where}[{name!r}]", kind)
        parts.append(_protowire.field(1, _protowire.field(1, nb) + _protowire.field(2, body)))
    return b"".join(parts)


def encode_sequence_example(context=None, feature_lists=None, dtypes=None):
    """Serialize a ``tf.train.SequenceExample``.

    ``context``: ``{name: value}``, a value being a number, bytes/str, or a list/array of
    them (flattened). ``feature_lists``: ``{name: steps}``, ``steps`` an array ``[T, ...]``
    (each step's values flattened) or a list of per-step values (which may differ in length).
    Integers and bools become int64 lists, floats float lists, bytes/str bytes lists.
    ``dtypes`` (``{name: "int64" | "float32" | "string"}``) forces a feature's type; it is
    needed where the data cannot tell, e.g. a feature list whose steps are all empty Python
    lists (which otherwise become empty float lists; TensorFlow rejects a type mismatch even
    for empty lists).
    """
    from fastseq_kernels import _protowire

    dtypes = {} if dtypes is None else dict(dtypes)
    ctx = _map_body(context, "context", lambda v, w, k: _feature_body(v, w, k)[1], dtypes)
    fl = _map_body(feature_lists, "feature_lists", _feature_list_body, dtypes)
    out = b""
    if context is not None:
        out += _protowire.field(1, ctx)
    if feature_lists is not None:
        out += _protowire.field(2, fl)
    return out


def write_sequence_examples(path, examples, compression_type=None, dtypes=None):
    """Write ``(context, feature_lists)`` pairs as SequenceExamples to a TFRecord file
    (``dtypes`` as in :func:`encode_sequence_example`); returns the number written."""
    from .tfrecord import TFRecordWriter

    n = 0
    with TFRecordWriter(path, compression_type=compression_type) as w:
        for context, feature_lists in examples:
            w.write(encode_sequence_example(context, feature_lists, dtypes))
            n += 1
    return n


def read_sequence_examples(path, context_features=None, sequence_features=None, compression_type=None,
                           skip_corrupted=False):
    """Yield ``(context, sequences)`` for each SequenceExample of a TFRecord file (records are
    parsed in place, without copying them out of the file). With ``skip_corrupted``, records
    with bad checksums are skipped (counted in the returned iterator's ``reader.num_corrupted``)."""
    from .tfrecord import TFRecordReader

    reader = TFRecordReader(path, compression_type=compression_type, skip_corrupted=skip_corrupted)
    parser = SequenceExampleParser(context_features, sequence_features)
    return _ExampleIterator(reader, parser)


class _ExampleIterator:
    def __init__(self, reader, parser):
        self.reader = reader
        self.parser = parser
        self._gen = self._run()

    def _run(self):
        buf, close = self.reader._open_buffer()
        try:
            view = memoryview(buf)
            index = 0
            parse = self.parser.parse
            path = self.reader.path
            for offs, lens in self.reader.spans(buf):
                for o, n in zip(offs.tolist(), lens.tolist()):
                    yield parse(view, o, n, lambda: f"{path}: record {index} (byte offset {o - 12}): ")
                    index += 1
            del view
        finally:
            close()

    def __iter__(self):
        return self

    def __next__(self):
        return next(self._gen)

    @property
    def num_corrupted(self):
        return self.reader.num_corrupted
