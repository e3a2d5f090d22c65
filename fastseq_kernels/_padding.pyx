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


cdef inline bint _numeric(int tn) noexcept:
    return cnp.PyTypeNum_ISBOOL(tn) or cnp.PyTypeNum_ISINTEGER(tn) or cnp.PyTypeNum_ISFLOAT(tn)


def collect(list seqs, object dtype):
    """Validate and normalise ``seqs`` (list of ``[T_i, ...]`` array-likes).

    Returns ``(arrays, lengths[int64], dtype, sample_shape)`` where every non-empty array is
    a C-contiguous, native-order ndarray of ``dtype`` (``dtype=None`` takes NumPy's result
    type of the non-empty inputs). Raises TypeError / ValueError naming ``sequences[i]``.
    The common case (ndarrays of one dtype) is checked through NumPy's C API.
    """
    cdef Py_ssize_t n = len(seqs), i, k
    cdef list arrays = [None] * n
    cdef cnp.ndarray[int64_t, ndim=1] lengths = np.empty(n, dtype=np.int64)
    cdef int64_t* lp = <int64_t*> cnp.PyArray_DATA(lengths)
    cdef object a
    cdef cnp.ndarray arr
    cdef Py_ssize_t ref_index = -1
    cdef int ref_nd = 0, nd, tn, ref_type = -1
    cdef cnp.npy_intp* dims
    cdef cnp.npy_intp* ref_dims = NULL
    cdef bint mixed = False, bad
    for i in range(n):
        a = seqs[i]
        if type(a) is not np.ndarray:
            try:
                a = np.asarray(a)
            except (ValueError, TypeError) as exc:
                raise ValueError(
                    f"sequences[{i}]: expected an array-like of shape [T, ...] with one shape "
                    f"per step, got ragged or malformed data ({exc})") from None
        arr = <cnp.ndarray>a
        nd = cnp.PyArray_NDIM(arr)
        if nd == 0:
            raise ValueError(f"sequences[{i}]: expected an array of rank >= 1 ([T, ...]), got a scalar")
        dims = cnp.PyArray_DIMS(arr)
        lp[i] = dims[0]
        arrays[i] = a
        if dims[0] == 0:
            continue  # empty: contributes neither a dtype nor a step shape
        tn = cnp.PyArray_TYPE(arr)
        if not _numeric(tn):
            raise TypeError(
                f"sequences[{i}]: expected numeric values (bool, int or float), got dtype {arr.dtype}")
        if ref_index < 0:
            ref_index = i
            ref_nd = nd
            ref_dims = dims
            ref_type = tn
            continue
        if tn != ref_type:
            mixed = True
        bad = nd != ref_nd
        if not bad:
            for k in range(1, nd):
                if dims[k] != ref_dims[k]:
                    bad = True
                    break
        if bad:
            raise ValueError(
                f"sequences[{i}]: per-step shape {tuple((<object>arr).shape[1:])} differs from "
                f"{tuple(arrays[ref_index].shape[1:])} (the shape of sequences[{ref_index}]); all steps "
                f"of all sequences must share one shape")
    sample_shape = tuple(arrays[ref_index].shape[1:]) if ref_index >= 0 else ()
    if dtype is None:
        if ref_index < 0:
            dtype = np.dtype(np.float64)
        elif not mixed:
            dtype = arrays[ref_index].dtype.newbyteorder("=")
        else:
            dtype = np.result_type(*{arrays[i].dtype for i in range(n) if lp[i] > 0})
    dtype = np.dtype(dtype)
    if dtype.kind not in _NUMERIC_KINDS:
        raise TypeError(f"dtype: expected a numeric dtype (bool, int or float), got {dtype}")
    cdef int target = dtype.num
    if not dtype.isnative:
        dtype = dtype.newbyteorder("=")
    for i in range(n):
        if lp[i] == 0:
            continue
        arr = <cnp.ndarray>arrays[i]
        if (cnp.PyArray_TYPE(arr) != target or not cnp.PyArray_IS_C_CONTIGUOUS(arr)
                or not cnp.PyArray_ISNOTSWAPPED(arr)):
            arrays[i] = np.ascontiguousarray(arr, dtype=dtype)
    return arrays, lengths, dtype, sample_shape


def pad_into(list arrays, const int64_t[::1] lengths, cnp.ndarray out, bint pre_padding,
             bint pre_truncating, bytes pad_row, Py_ssize_t r0, Py_ssize_t r1, bint out_is_zeroed=False):
    """Copy ``arrays[r0:r1]`` into rows ``[r0, r1)`` of ``out`` ([B, T, ...], C-contiguous,
    same dtype); the GIL is released while copying, so row ranges may run in threads.
    ``out_is_zeroed``: ``out`` came from ``np.zeros`` and the padding is all-zero bytes, so
    padding is left untouched (the kernel's zero pages; untouched pages are never faulted in).

    ``pad_row`` holds one padding step (the bytes of ``value`` repeated over the per-step
    shape). The caller has checked shapes, dtypes and that ``len(arrays) == out.shape[0]``.
    """
    cdef Py_ssize_t n = r1 - r0, i, t
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
            ptrs[i] = <char*> cnp.PyArray_DATA(<cnp.ndarray>arrays[r0 + i])
        with nogil:
            for i in range(n):
                L = lengths[r0 + i]
                keep = L if L < maxlen else maxlen
                src_off = (L - keep) if pre_truncating else 0
                dst_off = (maxlen - keep) if pre_padding else 0
                dst = base + (r0 + i) * seq_bytes
                if keep > 0:  # (empty inputs are never read)
                    memcpy(dst + dst_off * row_bytes, ptrs[i] + src_off * row_bytes, keep * row_bytes)
                if keep < maxlen and not (zero_pad and out_is_zeroed):
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
