"""TFRecord files without TensorFlow.

Each record is ``uint64 length | uint32 masked_crc32c(length) | data | uint32
masked_crc32c(data)`` (little-endian), the format of ``tf.io.TFRecordWriter``; files may be
GZIP- or ZLIB-compressed as a whole (``compression_type``, TensorFlow's option names).
Checksums are verified on read; a bad or truncated record raises :class:`TFRecordError`
naming the file and the byte offset (in the uncompressed stream), unless the reader was
made with ``skip_corrupted=True``, which skips it and counts it in ``num_corrupted``.
"""
from __future__ import annotations

import gzip
import mmap
import os
import zlib

import numpy as np

__all__ = ["TFRecordError", "TFRecordWriter", "TFRecordReader", "tf_record_iterator", "write_tfrecord",
           "read_tfrecord", "masked_crc32c", "crc32c"]

_COMPRESSIONS = {None: None, "": None, "NONE": None, "GZIP": "GZIP", "ZLIB": "ZLIB"}


class TFRecordError(ValueError):
    """A corrupted or truncated TFRecord file."""


def _compression(compression_type):
    key = compression_type.upper() if isinstance(compression_type, str) else compression_type
    if key not in _COMPRESSIONS:
        raise ValueError(f'compression_type: expected None, "", "GZIP" or "ZLIB", got {compression_type!r}')
    return _COMPRESSIONS[key]


def _as_bytes_buffer(data, name="record"):
    if isinstance(data, (bytes, bytearray, memoryview)):
        return bytes(data)
    if isinstance(data, np.bytes_):
        return bytes(data)
    if isinstance(data, str):
        raise TypeError(f"{name}: expected bytes, got str (encode it first)")
    raise TypeError(f"{name}: expected bytes, got {type(data).__name__}")


def crc32c(data):
    """CRC32C (Castagnoli) of ``data`` (bytes-like)."""
    from fastseq_kernels import _tfrecord

    return _tfrecord.crc32c(memoryview(_as_bytes_buffer(data, "data")).cast("B"))


def masked_crc32c(data):
    """TFRecord's masked CRC32C of ``data``."""
    from fastseq_kernels import _tfrecord

    return _tfrecord.masked_crc32c(memoryview(_as_bytes_buffer(data, "data")).cast("B"))


class TFRecordWriter:
    """Write records (bytes) to a TFRecord file: ``with TFRecordWriter(path) as w: w.write(b)``.

    ``compression_type``: None / "" (plain), "GZIP" or "ZLIB". ``options`` is accepted for
    TensorFlow compatibility (a compression string or an object with ``compression_type``).
    """

    def __init__(self, path, options=None, compression_type=None):
        from fastseq_kernels import _tfrecord

        if options is not None:
            compression_type = getattr(options, "compression_type", options)
        self._frame = _tfrecord.frame
        self.path = os.fspath(path)
        self.compression_type = _compression(compression_type)
        raw = open(self.path, "wb")
        if self.compression_type == "GZIP":
            self._f = gzip.GzipFile(fileobj=raw, mode="wb", mtime=0)
            self._raw = raw
        elif self.compression_type == "ZLIB":
            self._f = raw
            self._raw = raw
            self._z = zlib.compressobj()
        else:
            self._f = raw
            self._raw = raw
        self._closed = False

    def write(self, record):
        if self._closed:
            raise ValueError(f"{self.path}: write to a closed TFRecordWriter")
        framed = self._frame(_as_bytes_buffer(record))
        if self.compression_type == "ZLIB":
            self._f.write(self._z.compress(framed))
        else:
            self._f.write(framed)

    def flush(self):
        self._f.flush()

    def close(self):
        if self._closed:
            return
        self._closed = True
        if self.compression_type == "ZLIB":
            self._f.write(self._z.flush())
        self._f.close()
        if self._raw is not self._f:
            self._raw.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def write_tfrecord(path, records, compression_type=None):
    """Write an iterable of bytes records to ``path``; returns the number written."""
    n = 0
    with TFRecordWriter(path, compression_type=compression_type) as w:
        for r in records:
            w.write(r)
            n += 1
    return n


_MESSAGES = {
    1: "truncated record header (fewer than 12 bytes left)",
    2: "length checksum mismatch",
    3: "truncated record data (file ends inside the record)",
    4: "data checksum mismatch",
}


class TFRecordReader:
    """Iterate the records (bytes) of a TFRecord file.

    ``skip_corrupted=True`` skips records with a bad checksum or a truncated tail instead of
    raising, and counts them in :attr:`num_corrupted` (after a bad length checksum the reader
    looks for the next valid record header). ``check_crc=False`` trusts the file.
    """

    def __init__(self, path, compression_type=None, skip_corrupted=False, check_crc=True):
        self.path = os.fspath(path)
        self.compression_type = _compression(compression_type)
        self.skip_corrupted = bool(skip_corrupted)
        self.check_crc = bool(check_crc)
        self.num_corrupted = 0
        if not os.path.exists(self.path):
            raise FileNotFoundError(f"path: no such TFRecord file: {self.path!r}")

    def _open_buffer(self):
        """(buffer, closer): the whole uncompressed stream as a read-only buffer."""
        if self.compression_type is None:
            f = open(self.path, "rb")
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                f.close()
                return b"", lambda: None
            m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)

            def close():
                try:
                    m.close()
                except BufferError:  # a view is still alive (early exit); the GC closes it
                    pass
                f.close()

            return m, close
        with open(self.path, "rb") as f:
            raw = f.read()
        try:
            if self.compression_type == "GZIP":
                data = gzip.decompress(raw)
            else:
                data = zlib.decompress(raw)
        except (EOFError, OSError, zlib.error) as exc:
            raise TFRecordError(f"{self.path}: cannot decompress the {self.compression_type} stream ({exc})") from None
        return data, lambda: None

    def spans(self, buf):
        """Yield ``(offset, length)`` of each good record's data in ``buf``, in chunks of arrays
        ``(offsets, lengths)``; handles errors per the reader's options."""
        from fastseq_kernels import _tfrecord

        view = memoryview(buf)
        size = len(view)
        pos = 0
        while pos < size:
            offs, lens, end, code, err_pos, stored, computed = _tfrecord.scan(view, pos, self.check_crc, 65536)
            if len(offs):
                yield offs, lens
            pos = end
            if code == 0:
                continue
            what = _MESSAGES[code]
            if code in (2, 4):
                what += f" (stored 0x{stored:08x}, computed 0x{computed:08x})"
            if not self.skip_corrupted:
                where = " of the uncompressed stream" if self.compression_type else ""
                raise TFRecordError(f"{self.path}: corrupted TFRecord at byte offset {err_pos}{where}: {what}")
            self.num_corrupted += 1
            if code == 4:
                length = int(np.frombuffer(view[err_pos:err_pos + 8], dtype="<u8")[0])
                pos = err_pos + 16 + length
            elif code == 2:
                pos = _tfrecord.resync(view, err_pos + 1)
            else:
                break

    def __iter__(self):
        buf, close = self._open_buffer()
        try:
            view = memoryview(buf)
            for offs, lens in self.spans(buf):
                for o, n in zip(offs.tolist(), lens.tolist()):
                    yield bytes(view[o:o + n])
            del view
        finally:
            close()


def tf_record_iterator(path, compression_type=None, skip_corrupted=False):
    """An iterator of the records of ``path`` (``tf.compat.v1.io.tf_record_iterator``)."""
    return iter(TFRecordReader(path, compression_type=compression_type, skip_corrupted=skip_corrupted))


def read_tfrecord(path, compression_type=None, skip_corrupted=False):
    """All records of ``path`` as a list of bytes."""
    return list(TFRecordReader(path, compression_type=compression_type, skip_corrupted=skip_corrupted))
