# cython: embedsignature=True
"""Cython kernels for the protobuf wire format of tf.train.SequenceExample.

Messages (from tensorflow/core/example/{example,feature}.proto)::

    SequenceExample { Features context = 1; FeatureLists feature_lists = 2; }
    Features        { map<string, Feature> feature = 1; }          // entry: key = 1, value = 2
    FeatureLists    { map<string, FeatureList> feature_list = 1; }
    FeatureList     { repeated Feature feature = 1; }
    Feature         { oneof kind { BytesList bytes_list = 1; FloatList float_list = 2;
                                   Int64List int64_list = 3; } }
    BytesList { repeated bytes value = 1; }  FloatList { repeated float value = 1 [packed]; }
    Int64List { repeated int64 value = 1 [packed]; }

Kind codes used here are the Feature field numbers: 1 bytes, 2 float, 3 int64 (0: a Feature
with no kind set, which parses as an empty list of any type, as TensorFlow does).
Packed and unpacked encodings are both accepted; for map keys seen twice the last wins.
Malformed input raises :class:`WireError` (a ValueError) with the byte offset in the message.
"""
import numpy as np
cimport numpy as cnp
from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING
from libc.stdint cimport uint8_t, uint32_t, uint64_t, int64_t
from libc.string cimport memcpy
from libc.stdlib cimport malloc, realloc, free

cnp.import_array()

KIND_NONE = 0
KIND_BYTES = 1
KIND_FLOAT = 2
KIND_INT64 = 3


class WireError(ValueError):
    """Malformed protobuf bytes."""


cdef inline const uint8_t* rd_varint(const uint8_t* p, const uint8_t* end, uint64_t* out) noexcept nogil:
    cdef uint64_t v = 0
    cdef int shift = 0
    cdef uint8_t b
    while p < end and shift < 70:
        b = p[0]
        p += 1
        v |= (<uint64_t>(b & 0x7f)) << shift
        if b < 0x80:
            out[0] = v
            return p
        shift += 7
    return NULL


cdef inline const uint8_t* skip_field(const uint8_t* p, const uint8_t* end, int wt) noexcept nogil:
    cdef uint64_t v
    if wt == 0:
        return rd_varint(p, end, &v)
    if wt == 1:
        return p + 8 if end - p >= 8 else NULL
    if wt == 5:
        return p + 4 if end - p >= 4 else NULL
    if wt == 2:
        p = rd_varint(p, end, &v)
        if p == NULL or v > <uint64_t>(end - p):
            return NULL
        return p + v
    return NULL


cdef inline const uint8_t* rd_len(const uint8_t* p, const uint8_t* end, Py_ssize_t* n) noexcept nogil:
    cdef uint64_t v
    p = rd_varint(p, end, &v)
    if p == NULL or v > <uint64_t>(end - p):
        return NULL
    n[0] = <Py_ssize_t>v
    return p


cdef object _wire_err(const uint8_t* start, const uint8_t* p, str what):
    return WireError(f"malformed SequenceExample: {what} at byte {p - start} of the message")


cdef int feature_kind(const uint8_t* p, const uint8_t* end, const uint8_t** lp, Py_ssize_t* ln) noexcept nogil:
    """Kind of a Feature message and the slice of its list message; -1 on malformed input."""
    cdef int kind = 0
    cdef uint64_t tag
    cdef int field, wt
    cdef Py_ssize_t n
    lp[0] = NULL
    ln[0] = 0
    while p < end:
        p = rd_varint(p, end, &tag)
        if p == NULL:
            return -1
        field = <int>(tag >> 3)
        wt = <int>(tag & 7)
        if wt == 2 and 1 <= field <= 3:
            p = rd_len(p, end, &n)
            if p == NULL:
                return -1
            kind = field
            lp[0] = p
            ln[0] = n
            p += n
        else:
            p = skip_field(p, end, wt)
            if p == NULL:
                return -1
    return kind


cdef Py_ssize_t count_values(const uint8_t* p, const uint8_t* end, int kind) noexcept nogil:
    """Number of values in a FloatList / Int64List / BytesList message; -1 if malformed."""
    cdef Py_ssize_t count = 0, n, run
    cdef uint64_t tag, v
    cdef int field, wt
    cdef const uint8_t* q
    while p < end:
        p = rd_varint(p, end, &tag)
        if p == NULL:
            return -1
        field = <int>(tag >> 3)
        wt = <int>(tag & 7)
        if field != 1:
            p = skip_field(p, end, wt)
            if p == NULL:
                return -1
            continue
        if kind == 2:
            if wt == 2:
                p = rd_len(p, end, &n)
                if p == NULL or n % 4 != 0:
                    return -1
                count += n // 4
                p += n
            elif wt == 5:
                if end - p < 4:
                    return -1
                count += 1
                p += 4
            else:
                return -1
        elif kind == 3:
            if wt == 2:
                p = rd_len(p, end, &n)
                if p == NULL:
                    return -1
                q = p + n
                run = 0  # bytes of the varint being read: at most 10 (as rd_varint reads)
                while p < q:
                    run += 1
                    if p[0] < 0x80:
                        count += 1
                        run = 0
                    elif run >= 10:
                        return -1
                    p += 1
                if n > 0 and (q - 1)[0] >= 0x80:
                    return -1
            elif wt == 0:
                p = rd_varint(p, end, &v)
                if p == NULL:
                    return -1
                count += 1
            else:
                return -1
        else:
            if wt != 2:
                return -1
            p = rd_len(p, end, &n)
            if p == NULL:
                return -1
            count += 1
            p += n
    return count


cdef int fill_numeric(const uint8_t* p, const uint8_t* end, int kind, char* out) noexcept nogil:
    """Write the values of a FloatList (float32) or Int64List (int64) to ``out``.
    Only called on slices that ``count_values`` has validated with the same kind."""
    cdef Py_ssize_t n = 0
    cdef uint64_t tag = 0, v = 0
    cdef int wt
    cdef const uint8_t* q
    cdef float* fo = <float*> out
    cdef int64_t* io = <int64_t*> out
    while p < end:
        p = rd_varint(p, end, &tag)
        wt = <int>(tag & 7)
        if (tag >> 3) != 1:
            p = skip_field(p, end, wt)
            continue
        if kind == 2:
            if wt == 2:
                p = rd_len(p, end, &n)
                memcpy(fo, p, n)
                fo += n // 4
                p += n
            else:
                memcpy(fo, p, 4)
                fo += 1
                p += 4
        else:
            if wt == 2:
                p = rd_len(p, end, &n)
                q = p + n
                while p < q:
                    p = rd_varint(p, q, &v)
                    if p == NULL:
                        return -1
                    io[0] = <int64_t>v
                    io += 1
            else:
                p = rd_varint(p, end, &v)
                io[0] = <int64_t>v
                io += 1
    return 0


cdef list bytes_values(const uint8_t* p, const uint8_t* end):
    """Values of a BytesList slice already validated by ``count_values``."""
    cdef list out = []
    cdef Py_ssize_t n = 0
    cdef uint64_t tag = 0
    while p < end:
        p = rd_varint(p, end, &tag)
        if (tag >> 3) != 1:
            p = skip_field(p, end, <int>(tag & 7))
            continue
        p = rd_len(p, end, &n)
        out.append(PyBytes_FromStringAndSize(<const char*>p, n))
        p += n
    return out


cdef object list_values(const uint8_t* p, const uint8_t* end, int kind, Py_ssize_t count, object start_obj):
    cdef cnp.ndarray arr
    if kind == 1:
        return bytes_values(p, end)
    arr = np.empty(count, dtype=np.float32 if kind == 2 else np.int64)
    if count:
        fill_numeric(p, end, kind, <char*> cnp.PyArray_DATA(arr))
    return arr


cdef object decode_feature(const uint8_t* start, const uint8_t* p, const uint8_t* end, int want):
    """(kind, values) of one Feature; values None when the kind differs from ``want``."""
    cdef const uint8_t* lp
    cdef Py_ssize_t ln, count
    cdef int kind = feature_kind(p, end, &lp, &ln)
    if kind < 0:
        raise _wire_err(start, p, "bad Feature")
    if kind == 0:
        kind = want
        lp = p
        ln = 0
    if kind != want:
        return kind, None
    count = count_values(lp, lp + ln, kind)
    if count < 0:
        raise _wire_err(start, lp, "bad value list")
    return kind, list_values(lp, lp + ln, kind, count, None)


cdef object decode_feature_list(const uint8_t* start, const uint8_t* p, const uint8_t* end, int want):
    """(kind, values, counts[T]) of one FeatureList; values None on a kind mismatch."""
    cdef Py_ssize_t cap = 64, steps = 0, total = 0, n, ln, c, i
    cdef const uint8_t** sp = <const uint8_t**> malloc(cap * sizeof(void*))
    cdef Py_ssize_t* sn = <Py_ssize_t*> malloc(cap * sizeof(Py_ssize_t))
    cdef Py_ssize_t* sc = <Py_ssize_t*> malloc(cap * sizeof(Py_ssize_t))
    cdef uint64_t tag
    cdef int kind, wt
    cdef const uint8_t* lp
    cdef cnp.ndarray counts
    cdef cnp.ndarray values
    cdef int64_t* cptr
    cdef char* out
    cdef list blist
    if sp == NULL or sn == NULL or sc == NULL:
        free(sp); free(sn); free(sc)
        raise MemoryError()
    try:
        while p < end:
            p = rd_varint(p, end, &tag)
            if p == NULL:
                raise _wire_err(start, end, "bad tag in FeatureList")
            wt = <int>(tag & 7)
            if (tag >> 3) != 1 or wt != 2:
                p = skip_field(p, end, wt)
                if p == NULL:
                    raise _wire_err(start, end, "bad field in FeatureList")
                continue
            p = rd_len(p, end, &n)
            if p == NULL:
                raise _wire_err(start, end, "bad Feature length in FeatureList")
            kind = feature_kind(p, p + n, &lp, &ln)
            if kind < 0:
                raise _wire_err(start, p, "bad Feature in FeatureList")
            if kind != 0 and kind != want:
                return kind, None, None
            if kind == 0:
                c = 0
                lp = p
                ln = 0
            else:
                c = count_values(lp, lp + ln, want)
                if c < 0:
                    raise _wire_err(start, lp, "bad value list in FeatureList")
            if steps == cap:
                cap *= 2
                sp = <const uint8_t**> realloc(sp, cap * sizeof(void*))
                sn = <Py_ssize_t*> realloc(sn, cap * sizeof(Py_ssize_t))
                sc = <Py_ssize_t*> realloc(sc, cap * sizeof(Py_ssize_t))
                if sp == NULL or sn == NULL or sc == NULL:
                    raise MemoryError()
            sp[steps] = lp
            sn[steps] = ln
            sc[steps] = c
            steps += 1
            total += c
            p += n
        counts = np.empty(steps, dtype=np.int64)
        cptr = <int64_t*> cnp.PyArray_DATA(counts)
        for i in range(steps):
            cptr[i] = sc[i]
        if want == 1:
            blist = []
            for i in range(steps):
                blist.extend(bytes_values(sp[i], sp[i] + sn[i]))
            return want, blist, counts
        values = np.empty(total, dtype=np.float32 if want == 2 else np.int64)
        out = <char*> cnp.PyArray_DATA(values)
        for i in range(steps):
            if sc[i]:
                fill_numeric(sp[i], sp[i] + sn[i], want, out)
                out += sc[i] * (4 if want == 2 else 8)
        return want, values, counts
    finally:
        free(sp); free(sn); free(sc)


cdef int scan_map(const uint8_t* start, const uint8_t* p, const uint8_t* end, dict want,
                  dict found) except -1:
    """Walk a Features / FeatureLists message; record the value slice of each wanted key."""
    cdef uint64_t tag
    cdef int wt
    cdef Py_ssize_t n, kn, vn
    cdef const uint8_t* q
    cdef const uint8_t* kp
    cdef const uint8_t* vp
    while p < end:
        p = rd_varint(p, end, &tag)
        if p == NULL:
            raise _wire_err(start, end, "bad tag in feature map")
        wt = <int>(tag & 7)
        if (tag >> 3) != 1 or wt != 2:
            p = skip_field(p, end, wt)
            if p == NULL:
                raise _wire_err(start, end, "bad field in feature map")
            continue
        p = rd_len(p, end, &n)
        if p == NULL:
            raise _wire_err(start, end, "bad map entry length")
        q = p + n
        kp = NULL
        kn = 0
        vp = NULL
        vn = 0
        while p < q:
            p = rd_varint(p, q, &tag)
            if p == NULL:
                raise _wire_err(start, q, "bad tag in map entry")
            wt = <int>(tag & 7)
            if wt == 2 and (tag >> 3) == 1:
                p = rd_len(p, q, &kn)
                if p == NULL:
                    raise _wire_err(start, q, "bad key in map entry")
                kp = p
                p += kn
            elif wt == 2 and (tag >> 3) == 2:
                p = rd_len(p, q, &vn)
                if p == NULL:
                    raise _wire_err(start, q, "bad value in map entry")
                vp = p
                p += vn
            else:
                p = skip_field(p, q, wt)
                if p == NULL:
                    raise _wire_err(start, q, "bad field in map entry")
        key = PyBytes_FromStringAndSize(<const char*>kp, kn) if kp != NULL else b""
        if want is None or key in want:
            found[key] = (vp - start if vp != NULL else q - start, vn)
    return 0


def parse_sequence_example(const uint8_t[::1] buf, Py_ssize_t offset, Py_ssize_t length,
                           dict context_want, dict sequence_want):
    """Parse one serialized SequenceExample held in ``buf[offset:offset+length]``.

    ``context_want`` / ``sequence_want`` map feature names (bytes) to the wanted kind code.
    Returns ``(context, sequences)``: ``context[name] = (kind, values)`` and
    ``sequences[name] = (kind, values, counts)`` for the wanted names present in the message;
    ``values`` is a float32 / int64 array or a list of bytes, or None when the kind found
    differs from the wanted one (the caller reports the mismatch).
    """
    if offset < 0 or length < 0 or offset + length > buf.shape[0]:
        raise ValueError("parse_sequence_example: slice out of range")
    cdef const uint8_t* start = &buf[0] + offset if buf.shape[0] else <const uint8_t*>b""
    cdef const uint8_t* end = start + length
    cdef const uint8_t* p = start
    cdef uint64_t tag
    cdef int wt
    cdef Py_ssize_t n
    cdef dict ctx_found = {}
    cdef dict seq_found = {}
    cdef dict ctx = {}
    cdef dict seq = {}
    while p < end:
        p = rd_varint(p, end, &tag)
        if p == NULL:
            raise _wire_err(start, end, "bad tag")
        wt = <int>(tag & 7)
        if wt == 2 and ((tag >> 3) == 1 or (tag >> 3) == 2):
            p = rd_len(p, end, &n)
            if p == NULL:
                raise _wire_err(start, end, "bad length of context/feature_lists")
            if (tag >> 3) == 1:
                if context_want:
                    scan_map(start, p, p + n, context_want, ctx_found)
            elif sequence_want:
                scan_map(start, p, p + n, sequence_want, seq_found)
            p += n
        else:
            p = skip_field(p, end, wt)
            if p == NULL:
                raise _wire_err(start, end, "bad field")
    for key, (off, n) in ctx_found.items():
        ctx[key] = decode_feature(start, start + <Py_ssize_t>off, start + <Py_ssize_t>off + <Py_ssize_t>n,
                                  context_want[key])
    for key, (off, n) in seq_found.items():
        seq[key] = decode_feature_list(start, start + <Py_ssize_t>off, start + <Py_ssize_t>off + <Py_ssize_t>n,
                                       sequence_want[key])
    return ctx, seq


# ---------------------------------------------------------------- encoding

cdef inline Py_ssize_t put_varint(uint8_t* o, uint64_t v) noexcept nogil:
    cdef Py_ssize_t k = 0
    while v >= 0x80:
        o[k] = <uint8_t>((v & 0x7f) | 0x80)
        v >>= 7
        k += 1
    o[k] = <uint8_t>v
    return k + 1


cdef inline Py_ssize_t varint_size(uint64_t v) noexcept nogil:
    cdef Py_ssize_t k = 1
    while v >= 0x80:
        v >>= 7
        k += 1
    return k


def varint(uint64_t v):
    """The varint encoding of ``v`` (an unsigned 64-bit value)."""
    cdef uint8_t tmp[10]
    cdef Py_ssize_t k = put_varint(tmp, v)
    return PyBytes_FromStringAndSize(<char*>tmp, k)


def field(int number, bytes payload):
    """A length-delimited field: tag, length, payload."""
    cdef uint8_t tmp[20]
    cdef Py_ssize_t k = put_varint(tmp, (<uint64_t>number << 3) | 2)
    k += put_varint(tmp + k, len(payload))
    return PyBytes_FromStringAndSize(<char*>tmp, k) + payload


def feature_list_numeric(values, Py_ssize_t steps, Py_ssize_t per_step):
    """FeatureList message body for ``steps`` steps of ``per_step`` values each, taken in
    order from ``values`` (a C-contiguous float32 or int64 array)."""
    cdef bint is_float = values.dtype == np.float32
    cdef cnp.ndarray arr = values
    cdef const char* src = <const char*> cnp.PyArray_DATA(arr)
    cdef const int64_t* iv = <const int64_t*> src
    cdef Py_ssize_t t, j, inner, total = 0, k
    cdef uint8_t* o
    cdef bytes out
    # size pass
    cdef Py_ssize_t* inner_sizes = <Py_ssize_t*> malloc(max(steps, 1) * sizeof(Py_ssize_t))
    if inner_sizes == NULL:
        raise MemoryError()
    try:
        for t in range(steps):
            if is_float:
                inner = 4 * per_step
            else:
                inner = 0
                for j in range(per_step):
                    inner += varint_size(<uint64_t>iv[t * per_step + j])
            inner_sizes[t] = inner
            # list message: tag(1) + len + data (omitted when empty); feature: tag + len + list
            k = (1 + varint_size(inner) + inner) if per_step else 0
            total += 1 + varint_size(1 + varint_size(k) + k) + 1 + varint_size(k) + k
        out = PyBytes_FromStringAndSize(NULL, total)
        o = <uint8_t*> PyBytes_AS_STRING(out)
        for t in range(steps):
            inner = inner_sizes[t]
            k = (1 + varint_size(inner) + inner) if per_step else 0
            o[0] = 0x0A  # FeatureList.feature (1, LEN)
            o += 1
            o += put_varint(o, 1 + varint_size(k) + k)
            o[0] = 0x12 if is_float else 0x1A  # Feature.float_list (2) / int64_list (3)
            o += 1
            o += put_varint(o, k)
            if per_step:
                o[0] = 0x0A  # value (1, LEN, packed)
                o += 1
                o += put_varint(o, inner)
                if is_float:
                    memcpy(o, src + 4 * t * per_step, inner)
                    o += inner
                else:
                    for j in range(per_step):
                        o += put_varint(o, <uint64_t>iv[t * per_step + j])
        return out
    finally:
        free(inner_sizes)


def feature_numeric(values):
    """Feature message body holding a float32 or int64 array (C-contiguous, 1-D)."""
    return _single(values)


cdef bytes _single(values):
    body = feature_list_numeric(values, 1, values.shape[0])
    # strip the FeatureList framing: 0x0A, varint(len)
    cdef Py_ssize_t n
    cdef const uint8_t* p = <const uint8_t*> PyBytes_AS_STRING(body)
    cdef const uint8_t* q = rd_len(p + 1, p + len(body), &n)
    return body[q - p:]


def feature_names(const uint8_t[::1] buf, Py_ssize_t offset, Py_ssize_t length):
    """``(context_names, feature_list_names)`` (lists of bytes) present in one SequenceExample."""
    if offset < 0 or length < 0 or offset + length > buf.shape[0]:
        raise ValueError("feature_names: slice out of range")
    cdef const uint8_t* start = &buf[0] + offset if buf.shape[0] else <const uint8_t*>b""
    cdef const uint8_t* end = start + length
    cdef const uint8_t* p = start
    cdef uint64_t tag
    cdef Py_ssize_t n
    cdef dict ctx = {}
    cdef dict seq = {}
    while p < end:
        p = rd_varint(p, end, &tag)
        if p == NULL:
            raise _wire_err(start, end, "bad tag")
        if (tag & 7) == 2 and ((tag >> 3) == 1 or (tag >> 3) == 2):
            p = rd_len(p, end, &n)
            if p == NULL:
                raise _wire_err(start, end, "bad length of context/feature_lists")
            scan_map(start, p, p + n, None, ctx if (tag >> 3) == 1 else seq)
            p += n
        else:
            p = skip_field(p, end, <int>(tag & 7))
            if p == NULL:
                raise _wire_err(start, end, "bad field")
    return list(ctx), list(seq)


def first_mismatch(const int64_t[::1] counts, int64_t size):
    """Index of the first entry of ``counts`` that differs from ``size``, or -1."""
    cdef Py_ssize_t i
    for i in range(counts.shape[0]):
        if counts[i] != size:
            return i
    return -1
