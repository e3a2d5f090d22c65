# cython: embedsignature=True
"""Cython kernels for padding variable-length sequences (fastseq.data.pad_sequences).

The public function lives in :mod:`fastseq.data.padding`; these routines only move bytes.

``collect`` walks the Python list once (type, dtype, rank and per-step shape checks, with
Python-level errors) and returns C-contiguous arrays of one dtype; ``pad_into`` then copies
them into a preallocated ``[B, T, ...]`` output without the GIL.
"""
import numpy as np
cimport numpy as cnp
from libc.string cimport memcpy, memset
from libc.stdlib cimport malloc, free
from libc.stdint cimport int64_t, uintptr_t

cnp.import_array()

_NUMERIC_KINDS = frozenset("biuf")


def collect(list seqs, object dtype):
    """Validate and normalise ``seqs`` (list of ``[T_i, ...]`` array-likes).

    Returns ``(arrays, lengths[int64], dtype, sample_shape)`` where every array is a
    C-contiguous ndarray of ``dtype`` (``dtype=None`` takes NumPy's result type).
    Raises TypeError / ValueError naming ``sequences[i]``.
    """
    cdef Py_ssize_t n = len(seqs), i
    cdef list arrays = [None] * n
    cdef cnp.ndarray[int64_t, ndim=1] lengths = np.empty(n, dtype=np.int64)
    cdef object a
    cdef object sample_shape = None
    cdef Py_ssize_t ref_index = -1
    dtypes = set()
    for i in range(n):
        a = seqs[i]
        if type(a) is not np.ndarray:
            try:
                a = np.asarray(a)
            except (ValueError, TypeError) as exc:
                raise ValueError(
                    f"sequences[{i}]: expected an array-like of shape [T, ...] with one shape "
                    f"per step, got ragged or malformed data ({exc})") from None
        if (<cnp.ndarray>a).ndim == 0:
            raise ValueError(f"sequences[{i}]: expected an array of rank >= 1 ([T, ...]), got a scalar")
        kind = a.dtype.kind
        if kind not in _NUMERIC_KINDS:
            if not (a.size == 0 and kind in "OUS"):
                raise TypeError(
                    f"sequences[{i}]: expected numeric values (bool, int or float), got dtype {a.dtype}")
            a = np.zeros(a.shape, dtype=np.float64 if dtype is None else dtype)
        elif a.shape[0] > 0:
            dtypes.add(a.dtype)
        lengths[i] = a.shape[0]
        if a.shape[0] > 0 or a.ndim > 1:
            if sample_shape is None:
                if a.shape[0] > 0:
                    sample_shape = a.shape[1:]
                    ref_index = i
            elif a.shape[0] > 0 and a.shape[1:] != sample_shape:
                raise ValueError(
                    f"sequences[{i}]: per-step shape {tuple(a.shape[1:])} differs from "
                    f"{tuple(sample_shape)} (the shape of sequences[{ref_index}]); all steps of all "
                    f"sequences must share one shape")
        arrays[i] = a
    if sample_shape is None:
        sample_shape = ()
    if dtype is None:
        dtype = np.result_type(*dtypes) if dtypes else np.dtype(np.float64)
    dtype = np.dtype(dtype)
    if dtype.kind not in _NUMERIC_KINDS:
        raise TypeError(f"dtype: expected a numeric dtype (bool, int or float), got {dtype}")
    for i in range(n):
        a = arrays[i]
        if (<cnp.ndarray>a).shape[0] == 0:
            a = np.empty((0,) + tuple(sample_shape), dtype=dtype)
        elif a.dtype != dtype or not (<cnp.ndarray>a).flags.c_contiguous:
            a = np.ascontiguousarray(a, dtype=dtype)
        arrays[i] = a
    return arrays, lengths, dtype, tuple(sample_shape)


def pad_into(list arrays, const int64_t[::1] lengths, cnp.ndarray out, bint pre_padding,
             bint pre_truncating, bytes pad_row):
    """Copy ``arrays`` into ``out`` ([B, T, ...], C-contiguous, same dtype).

    ``pad_row`` holds one padding step (the bytes of ``value`` repeated over the per-step
    shape). The caller has checked shapes, dtypes and that ``len(arrays) == out.shape[0]``.
    """
    cdef Py_ssize_t n = len(arrays), i, t
    cdef Py_ssize_t maxlen = out.shape[1]
    cdef Py_ssize_t row_bytes = len(pad_row)
    cdef Py_ssize_t seq_bytes = maxlen * row_bytes
    cdef char* base = <char*> cnp.PyArray_DATA(out)
    cdef const char* pad = pad_row
    cdef bint zero_pad = pad_row.count(b"\x00") == row_bytes
    cdef char** ptrs = <char**> malloc(max(n, 1) * sizeof(char*))
    cdef int64_t L, keep, src_off, dst_off
    cdef char* dst
    if ptrs == NULL:
        raise MemoryError()
    try:
        for i in range(n):
            ptrs[i] = <char*> cnp.PyArray_DATA(<cnp.ndarray>arrays[i])
        with nogil:
            for i in range(n):
                L = lengths[i]
                keep = L if L < maxlen else maxlen
                src_off = (L - keep) if pre_truncating else 0
                dst_off = (maxlen - keep) if pre_padding else 0
                dst = base + i * seq_bytes
                if keep > 0:
                    memcpy(dst + dst_off * row_bytes, ptrs[i] + src_off * row_bytes, keep * row_bytes)
                if keep < maxlen:
                    if pre_padding:
                        dst = dst  # padding occupies steps [0, maxlen - keep)
                    else:
                        dst = dst + keep * row_bytes
                    if zero_pad:
                        memset(dst, 0, (maxlen - keep) * row_bytes)
                    else:
                        for t in range(maxlen - keep):
                            memcpy(dst + t * row_bytes, pad, row_bytes)
    finally:
        free(ptrs)
