# cython: embedsignature=True
"""Cython kernels for TFRecord framing: CRC32C (Castagnoli) and the record scanner.

A TFRecord is ``uint64 length | uint32 masked_crc32c(length bytes) | data[length] |
uint32 masked_crc32c(data)``, little-endian, with ``masked(c) = ((c >> 15) | (c << 17)) +
0xa282ead8``. CRC32C uses the SSE4.2 ``crc32`` instruction when the CPU has it (checked at
run time) and a slicing-by-8 table otherwise.
"""
import numpy as np
cimport numpy as cnp
from libc.stdint cimport uint8_t, uint32_t, uint64_t, int64_t

cnp.import_array()

cdef extern from *:
    """
    #include <stdint.h>
    #include <string.h>
    static uint32_t fs_crc_table[8][256];
    static int fs_crc_ready = 0;
    static void fs_crc_init(void) {
        for (uint32_t i = 0; i < 256; i++) {
            uint32_t c = i;
            for (int k = 0; k < 8; k++) c = (c >> 1) ^ (0x82F63B78u & (0u - (c & 1u)));
            fs_crc_table[0][i] = c;
        }
        for (uint32_t i = 0; i < 256; i++)
            for (int t = 1; t < 8; t++)
                fs_crc_table[t][i] = (fs_crc_table[t - 1][i] >> 8) ^ fs_crc_table[0][fs_crc_table[t - 1][i] & 0xff];
        fs_crc_ready = 1;
    }
    static uint32_t fs_crc_soft(uint32_t crc, const uint8_t* p, size_t n) {
        if (!fs_crc_ready) fs_crc_init();
        crc = ~crc;
        while (n >= 8) {
            uint64_t w; memcpy(&w, p, 8);
            w ^= crc;
            crc = fs_crc_table[7][w & 0xff] ^ fs_crc_table[6][(w >> 8) & 0xff] ^
                  fs_crc_table[5][(w >> 16) & 0xff] ^ fs_crc_table[4][(w >> 24) & 0xff] ^
                  fs_crc_table[3][(w >> 32) & 0xff] ^ fs_crc_table[2][(w >> 40) & 0xff] ^
                  fs_crc_table[1][(w >> 48) & 0xff] ^ fs_crc_table[0][w >> 56];
            p += 8; n -= 8;
        }
        while (n--) crc = (crc >> 8) ^ fs_crc_table[0][(crc ^ *p++) & 0xff];
        return ~crc;
    }
    #if defined(__GNUC__) && defined(__x86_64__)
    #define FS_HAVE_HWCRC 1
    __attribute__((target("sse4.2")))
    static uint32_t fs_crc_hw(uint32_t crc, const uint8_t* p, size_t n) {
        uint64_t c = ~crc;
        while (n >= 8) { uint64_t w; memcpy(&w, p, 8); c = __builtin_ia32_crc32di(c, w); p += 8; n -= 8; }
        uint32_t c32 = (uint32_t)c;
        while (n--) c32 = __builtin_ia32_crc32qi(c32, *p++);
        return ~c32;
    }
    #endif
    static int fs_hw_state = -1;
    static int fs_crc_uses_hw(void) {
    #ifdef FS_HAVE_HWCRC
        if (fs_hw_state < 0) { __builtin_cpu_init(); fs_hw_state = __builtin_cpu_supports("sse4.2"); }
        return fs_hw_state;
    #else
        return 0;
    #endif
    }
    static uint32_t fs_crc32c(const uint8_t* p, size_t n) {
    #ifdef FS_HAVE_HWCRC
        if (fs_crc_uses_hw()) return fs_crc_hw(0, p, n);
    #endif
        return fs_crc_soft(0, p, n);
    }
    static uint32_t fs_crc32c_soft(const uint8_t* p, size_t n) { return fs_crc_soft(0, p, n); }
    static inline uint32_t fs_mask(uint32_t c) { return ((c >> 15) | (c << 17)) + 0xa282ead8u; }
    static inline uint64_t fs_load64(const uint8_t* p) { uint64_t v = 0; for (int i = 7; i >= 0; i--) v = (v << 8) | p[i]; return v; }
    static inline uint32_t fs_load32(const uint8_t* p) { return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24); }
    """
    uint32_t fs_crc32c(const uint8_t* p, size_t n) nogil
    uint32_t fs_crc32c_soft(const uint8_t* p, size_t n) nogil
    int fs_crc_uses_hw() nogil
    uint32_t fs_mask(uint32_t c) nogil
    uint64_t fs_load64(const uint8_t* p) nogil
    uint32_t fs_load32(const uint8_t* p) nogil


# error codes returned by scan()
OK = 0
TRUNCATED_HEADER = 1
BAD_LENGTH_CRC = 2
TRUNCATED_DATA = 3
BAD_DATA_CRC = 4


def crc32c(const uint8_t[::1] data, bint software=False):
    """Plain (unmasked) CRC32C of ``data``."""
    cdef size_t n = data.shape[0]
    cdef const uint8_t* p = &data[0] if n else NULL
    cdef uint32_t c
    with nogil:
        c = fs_crc32c_soft(p, n) if software else fs_crc32c(p, n)
    return c


def masked_crc32c(const uint8_t[::1] data):
    """TFRecord's masked CRC32C of ``data``."""
    cdef size_t n = data.shape[0]
    cdef const uint8_t* p = &data[0] if n else NULL
    cdef uint32_t c
    with nogil:
        c = fs_mask(fs_crc32c(p, n))
    return c


def hardware_crc():
    """True when CRC32C uses the SSE4.2 instruction."""
    return bool(fs_crc_uses_hw())


def frame(bytes data):
    """One TFRecord (header, data, footer) as bytes."""
    cdef Py_ssize_t n = len(data)
    cdef bytearray out = bytearray(n + 16)
    cdef uint8_t* o = <uint8_t*> (<char*> out)
    cdef const uint8_t* d = <const uint8_t*> (<const char*> data)
    cdef uint64_t L = n
    cdef int i
    cdef uint32_t c
    for i in range(8):
        o[i] = (L >> (8 * i)) & 0xff
    c = fs_mask(fs_crc32c(o, 8))
    for i in range(4):
        o[8 + i] = (c >> (8 * i)) & 0xff
    for i in range(n):
        o[12 + i] = d[i]
    c = fs_mask(fs_crc32c(d, n))
    for i in range(4):
        o[12 + n + i] = (c >> (8 * i)) & 0xff
    return bytes(out)


def scan(const uint8_t[::1] buf, Py_ssize_t pos, bint check_crc, Py_ssize_t max_records=-1):
    """Walk records from byte ``pos``.

    Returns ``(offsets, lengths, end, code, err_pos, expected, got)``: the data offsets and
    lengths of the good records (int64 arrays), the position after the last good record, an
    error code (``OK`` when the end of ``buf`` was reached cleanly or ``max_records`` were
    read), the record start where the error was found, and for checksum errors the stored and
    computed masked CRCs.
    """
    cdef Py_ssize_t size = buf.shape[0]
    cdef Py_ssize_t cap = 1024, count = 0
    cdef cnp.ndarray[int64_t, ndim=1] offsets = np.empty(cap, dtype=np.int64)
    cdef cnp.ndarray[int64_t, ndim=1] lengths = np.empty(cap, dtype=np.int64)
    cdef const uint8_t* b = &buf[0] if size else NULL
    cdef uint64_t L
    cdef uint32_t stored = 0, computed = 0
    cdef int code = 0
    cdef Py_ssize_t start = pos
    while pos < size and (max_records < 0 or count < max_records):
        start = pos
        if size - pos < 12:
            code = TRUNCATED_HEADER
            break
        L = fs_load64(b + pos)
        if check_crc:
            stored = fs_load32(b + pos + 8)
            computed = fs_mask(fs_crc32c(b + pos, 8))
            if stored != computed:
                code = BAD_LENGTH_CRC
                break
        if L > <uint64_t>(size - pos - 12) or <uint64_t>(size - pos - 12) - L < 4:
            code = TRUNCATED_DATA
            break
        if check_crc:
            stored = fs_load32(b + pos + 12 + L)
            with nogil:
                computed = fs_mask(fs_crc32c(b + pos + 12, L))
            if stored != computed:
                code = BAD_DATA_CRC
                break
        if count == cap:
            cap *= 2
            offsets = np.resize(offsets, cap)
            lengths = np.resize(lengths, cap)
        offsets[count] = pos + 12
        lengths[count] = <int64_t>L
        count += 1
        pos += 16 + <Py_ssize_t>L
    if code == 0:
        start = pos
    return offsets[:count], lengths[:count], pos, code, start, stored, computed


def resync(const uint8_t[::1] buf, Py_ssize_t pos):
    """First position >= ``pos`` where a header with a valid length CRC starts whose record
    fits in ``buf``; ``len(buf)`` when there is none."""
    cdef Py_ssize_t size = buf.shape[0]
    cdef const uint8_t* b = &buf[0] if size else NULL
    cdef uint64_t L
    while pos + 16 <= size:
        if fs_load32(b + pos + 8) == fs_mask(fs_crc32c(b + pos, 8)):
            L = fs_load64(b + pos)
            if L <= <uint64_t>(size - pos - 16):
                return pos
        pos += 1
    return size
