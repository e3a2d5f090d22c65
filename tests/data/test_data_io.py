import gzip
import os
import struct

import numpy as np
import pytest

from fastseq import io


def test_crc32c_known_vectors():
    # RFC 3720 (iSCSI) appendix B.4 test vectors and the classic check value
    assert io.crc32c(b"123456789") == 0xE3069283
    assert io.crc32c(bytes(32)) == 0x8A9136AA
    assert io.crc32c(b"\xff" * 32) == 0x62A8AB43
    assert io.crc32c(bytes(range(32))) == 0x46DD794E
    assert io.crc32c(b"") == 0


def test_crc32c_hardware_and_table_agree():
    from fastseq_kernels import _tfrecord

    rng = np.random.default_rng(0)
    for n in [0, 1, 7, 8, 9, 63, 1000, 4099]:
        data = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        assert _tfrecord.crc32c(data) == _tfrecord.crc32c(data, True)


def _bitwise_crc32c(data):
    crc = 0xFFFFFFFF
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def test_record_layout_by_hand(tmp_path):
    p = tmp_path / "a.tfrecord"
    io.write_tfrecord(p, [b"hello", b""])
    raw = p.read_bytes()
    mask = lambda c: (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF
    hdr = struct.pack("<Q", 5)
    expected = hdr + struct.pack("<I", mask(_bitwise_crc32c(hdr))) + b"hello" + struct.pack("<I", mask(_bitwise_crc32c(b"hello")))
    hdr0 = struct.pack("<Q", 0)
    expected += hdr0 + struct.pack("<I", mask(_bitwise_crc32c(hdr0))) + struct.pack("<I", mask(_bitwise_crc32c(b"")))
    assert raw == expected
    assert io.read_tfrecord(p) == [b"hello", b""]


@pytest.mark.parametrize("compression", [None, "GZIP", "ZLIB"])
def test_roundtrip_records(tmp_path, compression):
    rng = np.random.default_rng(1)
    recs = [rng.integers(0, 256, int(n), dtype=np.uint8).tobytes() for n in rng.integers(0, 300, 50)]
    p = tmp_path / "r.tfrecord"
    io.write_tfrecord(p, recs, compression_type=compression)
    assert io.read_tfrecord(p, compression_type=compression) == recs
    if compression == "GZIP":
        assert gzip.decompress(p.read_bytes())[:8] == struct.pack("<Q", len(recs[0]))


def test_empty_file(tmp_path):
    p = tmp_path / "e.tfrecord"
    p.write_bytes(b"")
    assert io.read_tfrecord(p) == []


def _write(tmp_path, recs):
    p = tmp_path / "c.tfrecord"
    io.write_tfrecord(p, recs)
    return p, bytearray(p.read_bytes())


def test_corrupted_data_named_with_offset_and_skipped(tmp_path):
    recs = [b"a" * 10, b"b" * 20, b"c" * 5]
    p, raw = _write(tmp_path, recs)
    second = 16 + 10
    raw[second + 12 + 3] ^= 0x01  # flip a bit in record 1's data
    p.write_bytes(bytes(raw))
    with pytest.raises(io.TFRecordError, match=rf"{p.name}.*byte offset {second}.*data checksum"):
        io.read_tfrecord(p)
    reader = io.TFRecordReader(p, skip_corrupted=True)
    assert list(reader) == [recs[0], recs[2]]
    assert reader.num_corrupted == 1


def test_corrupted_length_resyncs(tmp_path):
    recs = [b"x" * 7, b"y" * 9, b"z" * 11]
    p, raw = _write(tmp_path, recs)
    raw[16 + 7 + 2] ^= 0xFF  # record 1's length field
    p.write_bytes(bytes(raw))
    with pytest.raises(io.TFRecordError, match="byte offset 23.*length checksum"):
        io.read_tfrecord(p)
    reader = io.TFRecordReader(p, skip_corrupted=True)
    assert list(reader) == [recs[0], recs[2]]
    assert reader.num_corrupted == 1


@pytest.mark.parametrize("cut", [3, 14, 20])
def test_truncated_file(tmp_path, cut):
    recs = [b"q" * 10, b"r" * 10]
    p, raw = _write(tmp_path, recs)
    p.write_bytes(bytes(raw[: 26 + cut]))
    with pytest.raises(io.TFRecordError, match="byte offset 26.*truncated"):
        io.read_tfrecord(p)
    reader = io.TFRecordReader(p, skip_corrupted=True)
    assert list(reader) == [recs[0]] and reader.num_corrupted == 1


def test_truncated_gzip(tmp_path):
    p = tmp_path / "g.tfrecord"
    io.write_tfrecord(p, [b"abc" * 100] * 5, compression_type="GZIP")
    p.write_bytes(p.read_bytes()[:-20])
    with pytest.raises(io.TFRecordError, match=f"{p.name}.*GZIP"):
        io.read_tfrecord(p, compression_type="GZIP")


def test_reader_arguments(tmp_path):
    with pytest.raises(FileNotFoundError, match="path"):
        io.TFRecordReader(tmp_path / "missing")
    with pytest.raises(ValueError, match="compression_type"):
        io.TFRecordWriter(tmp_path / "x", compression_type="LZ4")
    with io.TFRecordWriter(tmp_path / "x") as w:
        with pytest.raises(TypeError, match="bytes"):
            w.write("text")


CTX = {"length": io.FixedLenFeature([], "int64"), "id": io.FixedLenFeature([], "string"),
       "vec": io.FixedLenFeature([2, 2], "float32"), "tags": io.VarLenFeature("string"),
       "opt": io.FixedLenFeature([2], "int64", default_value=[7, 8])}
SEQ = {"tokens": io.FixedLenSequenceFeature([], "int64"), "frames": io.FixedLenSequenceFeature([3], "float32"),
       "rag": io.VarLenFeature("int64"), "missing": io.FixedLenSequenceFeature([], "float32", allow_missing=True)}


def _example(rng, T):
    ctx = {"length": T, "id": "ex-é", "vec": rng.standard_normal((2, 2)).astype(np.float32),
           "tags": [b"a", b"bc"][: int(rng.integers(0, 3))]}
    fl = {"tokens": rng.integers(-(2**62), 2**62, T), "frames": rng.standard_normal((T, 3)).astype(np.float32),
          "rag": [rng.integers(-3, 300, int(rng.integers(0, 4))) for _ in range(T)]}
    return ctx, fl


def _check(parsed, ctx, fl):
    c, s = parsed
    assert c["length"] == ctx["length"] and c["length"].dtype == np.int64
    assert c["id"] == "ex-é".encode()
    np.testing.assert_array_equal(c["vec"], ctx["vec"])
    assert list(c["tags"].values) == list(ctx["tags"])
    np.testing.assert_array_equal(c["opt"], [7, 8])
    np.testing.assert_array_equal(s["tokens"], fl["tokens"])
    np.testing.assert_array_equal(s["frames"], fl["frames"])
    assert s["frames"].dtype == np.float32
    counts = [len(r) for r in fl["rag"]]
    np.testing.assert_array_equal(s["rag"].dense_shape, [len(counts), max(counts, default=0)])
    np.testing.assert_array_equal(s["rag"].values, np.concatenate(fl["rag"]) if counts else [])
    ref_idx = [(t, j) for t, n in enumerate(counts) for j in range(n)]
    np.testing.assert_array_equal(s["rag"].indices.reshape(-1, 2), np.array(ref_idx, dtype=np.int64).reshape(-1, 2))
    assert s["missing"].shape == (0,)


def test_sequence_example_roundtrip(tmp_path):
    rng = np.random.default_rng(2)
    exs = [_example(rng, T) for T in [0, 1, 5, 3]]
    for ctx, fl in exs:
        _check(io.parse_single_sequence_example(io.encode_sequence_example(ctx, fl), CTX, SEQ), ctx, fl)
    p = tmp_path / "s.tfrecord"
    io.write_sequence_examples(p, exs, compression_type="GZIP")
    parsed = list(io.read_sequence_examples(p, CTX, SEQ, compression_type="GZIP"))
    assert len(parsed) == len(exs)
    for got, (ctx, fl) in zip(parsed, exs):
        _check(got, ctx, fl)


def _varint(v):
    out = b""
    v &= (1 << 64) - 1
    while v >= 0x80:
        out += bytes([(v & 0x7F) | 0x80])
        v >>= 7
    return out + bytes([v])


def _ld(field, payload):
    return _varint((field << 3) | 2) + _varint(len(payload)) + payload


def test_unpacked_encoding_is_accepted():
    """Hand-built message with unpacked int64/float values and a duplicated key (last wins)."""
    ints = _ld(3, _varint(8) + _varint(5) + _varint(8) + _varint(-2))  # Int64List, unpacked
    floats = _ld(2, b"\x0d" + struct.pack("<f", 1.5) + b"\x0d" + struct.pack("<f", -2.0))
    entry = lambda k, v: _ld(1, _ld(1, k) + _ld(2, v))
    ctx = _ld(1, entry(b"n", _ld(3, _ld(1, _varint(1)))) + entry(b"n", ints))
    fl = _ld(2, entry(b"f", _ld(1, floats) + _ld(1, floats)))
    c, s = io.parse_single_sequence_example(ctx + fl, {"n": io.VarLenFeature("int64")},
                                            {"f": io.FixedLenSequenceFeature([2], "float32")})
    np.testing.assert_array_equal(c["n"].values, [5, -2])
    np.testing.assert_array_equal(s["f"], [[1.5, -2.0], [1.5, -2.0]])


def test_parse_errors():
    ex = io.encode_sequence_example({"length": 3}, {"tokens": [1, 2, 3], "x": [[1.0], [2.0, 3.0]]})
    with pytest.raises(ValueError, match=r"context feature 'nope' is required but missing.*\['length'\]"):
        io.parse_single_sequence_example(ex, {"nope": io.FixedLenFeature([], "int64")})
    with pytest.raises(ValueError, match=r"sequence feature 'nope'.*missing.*\['tokens', 'x'\]"):
        io.parse_single_sequence_example(ex, None, {"nope": io.FixedLenSequenceFeature([], "int64")})
    with pytest.raises(TypeError, match="'length'.*float.*int64"):
        io.parse_single_sequence_example(ex, {"length": io.FixedLenFeature([], "float32")})
    with pytest.raises(TypeError, match="'tokens'.*bytes.*int64"):
        io.parse_single_sequence_example(ex, None, {"tokens": io.VarLenFeature("string")})
    with pytest.raises(ValueError, match="'length'.*expected 2 values"):
        io.parse_single_sequence_example(ex, {"length": io.FixedLenFeature([2], "int64")})
    with pytest.raises(ValueError, match="'x': step 1 has 2 values, expected 1"):
        io.parse_single_sequence_example(ex, None, {"x": io.FixedLenSequenceFeature([], "float32")})
    with pytest.raises(TypeError, match="dtype must be int64, float32 or string"):
        io.parse_single_sequence_example(ex, {"length": io.FixedLenFeature([], "int32")})
    with pytest.raises(TypeError, match="FixedLenSequenceFeature or VarLenFeature"):
        io.parse_single_sequence_example(ex, None, {"tokens": "int64"})
    with pytest.raises(ValueError, match="malformed SequenceExample"):
        io.parse_single_sequence_example(ex[:-3], None, {"x": io.VarLenFeature("float32")})
    with pytest.raises(TypeError, match="serialized"):
        io.parse_single_sequence_example("text")


def test_encode_errors():
    with pytest.raises(TypeError, match=r"context\['a'\].*dtype"):
        io.encode_sequence_example({"a": [1 + 2j]})
    with pytest.raises(TypeError, match=r"feature_lists\['a'\].*mix"):
        io.encode_sequence_example(None, {"a": [[1], [b"x"]]})
    with pytest.raises(TypeError, match=r"feature_lists\['a'\]"):
        io.encode_sequence_example(None, {"a": 5})


def test_file_errors_name_record(tmp_path):
    p = tmp_path / "bad.tfrecord"
    io.write_tfrecord(p, [io.encode_sequence_example({"n": 1}), io.encode_sequence_example({"n": 1.5})])
    with pytest.raises(TypeError, match=r"bad.tfrecord: record 1 \(byte offset \d+\): context feature 'n'"):
        list(io.read_sequence_examples(p, {"n": io.FixedLenFeature([], "int64")}))


def test_mutated_messages_never_crash():
    """Random byte flips, truncations and insertions: parse or raise ValueError/TypeError."""
    rng = np.random.default_rng(5)
    ctx, fl = _example(rng, 4)
    base = bytearray(io.encode_sequence_example(ctx, fl))
    outcomes = {"ok": 0, "error": 0}
    for trial in range(1500):
        m = bytearray(base)
        op = trial % 3
        pos = int(rng.integers(0, len(m)))
        if op == 0:
            m[pos] ^= 1 << int(rng.integers(0, 8))
        elif op == 1:
            m = m[:pos]
        else:
            m[pos:pos] = rng.integers(0, 256, int(rng.integers(1, 4)), dtype=np.uint8).tobytes()
        try:
            io.parse_single_sequence_example(bytes(m), {"id": io.VarLenFeature("string"), "vec": io.VarLenFeature("float32")},
                                             {"tokens": io.VarLenFeature("int64"), "frames": io.VarLenFeature("float32"),
                                              "rag": io.VarLenFeature("int64")})
            outcomes["ok"] += 1
        except (ValueError, TypeError):
            outcomes["error"] += 1
    assert outcomes["ok"] > 0 and outcomes["error"] > 0


def test_packed_varint_longer_than_ten_bytes_is_malformed():
    """A packed Int64List whose varint runs past 10 bytes is rejected (it was counted as
    one value but never written: uninitialised memory came back); 10 bytes still parse."""
    from fastseq.io import FixedLenSequenceFeature, parse_single_sequence_example

    spec = {"x": FixedLenSequenceFeature([], np.int64)}
    bad = b"\x12\x18\n\x16\n\x01x\x12\x11\n\x0f\x1a\r\n\x0b" + b"\xff" * 10 + b"\x01"
    with pytest.raises(ValueError, match="malformed SequenceExample"):
        parse_single_sequence_example(bad, sequence_features=spec)
    good = b"\x12\x17\n\x15\n\x01x\x12\x10\n\x0e\x1a\x0c\n\x0a" + b"\xff" * 9 + b"\x01"
    np.testing.assert_array_equal(parse_single_sequence_example(good, sequence_features=spec)[1]["x"], [-1])
