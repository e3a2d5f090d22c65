"""The numba backend's allocator setting (fastseq_numba._malloc): with it, a large freed
buffer stays in the heap for the next call instead of going back to the system with
munmap; FASTSEQ_MALLOC_REUSE=0 leaves glibc's defaults. Each case runs in a fresh
interpreter, since the setting is process-wide."""

import json
import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="the setting applies to glibc's malloc only")

PROBE = r"""
import ctypes, json, sys
import numpy as np
from fastseq import backend as registry
from fastseq_numba import _malloc

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
registry.load("numba").initialize()
a = np.ones(64 * 2**20 // 8)  # 64 MiB, above every mmap threshold glibc uses by default
mapped = libc.mallinfo2().hblkhd
addr = a.ctypes.data
del a
b = np.ones(64 * 2**20 // 8)
print(json.dumps({"setting": _malloc.malloc_setting(), "mapped": mapped, "reused": b.ctypes.data == addr}))
"""


def _probe(env_value):
    env = dict(os.environ)
    env.pop("FASTSEQ_MALLOC_REUSE", None)
    if env_value is not None:
        env["FASTSEQ_MALLOC_REUSE"] = env_value
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_backend_keeps_large_blocks_in_the_heap():
    got = _probe(None)
    assert got["setting"].startswith("glibc: large blocks from the heap"), got
    assert got["mapped"] < 64 * 2**20, got  # the 64 MiB array did not come from mmap
    assert got["reused"], got  # and its memory served the next one


def test_opt_out_leaves_glibc_defaults():
    got = _probe("0")
    assert "FASTSEQ_MALLOC_REUSE=0" in got["setting"], got
    assert got["mapped"] >= 64 * 2**20, got  # glibc mapped the array



THREAD_PROBE = r"""
import ctypes, json, resource, sys, threading
import numpy as np
from fastseq import backend as registry

registry.load("numba").initialize()
if sys.argv[1] == "nopad":  # the setting as it was without the top pad (glibc's 128 KiB)
    ctypes.CDLL("libc.so.6").mallopt(-2, 128 * 1024)
got = {}

def work():  # a thread other than the main one: glibc gives it an arena of its own
    keep = np.ones(40 * 2**20 // 8)  # holds the arena's first heap (at most 64 MiB)
    a = np.ones(48 * 2**20 // 8)  # so this one needs a heap of its own
    del a
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    b = np.ones(48 * 2**20 // 8)
    got["faults"] = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    del b, keep

t = threading.Thread(target=work)
t.start()
t.join()
print(json.dumps(got))
"""


def _thread_faults(variant):
    env = dict(os.environ)
    env.pop("FASTSEQ_MALLOC_REUSE", None)
    out = subprocess.run([sys.executable, "-c", THREAD_PROBE, variant], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])["faults"]


def test_other_threads_reuse_large_blocks_too():
    # The second 48 MiB block in a thread's arena, in a heap of its own: with the top pad
    # it reuses the first one's pages (no page faults); without it the freed heap was
    # unmapped and the new one faults in again (12,288 faults of 4 KiB, or 24 where transparent huge pages
    # of 2 MiB back it), so this check can fail.
    assert _thread_faults("pad") < 4
    assert _thread_faults("nopad") >= 20
