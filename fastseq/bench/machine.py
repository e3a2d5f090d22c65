"""Machine details for ``fastseq info`` and benchmark JSON: CPU, threads, BLAS, versions,
git revision, the measured float32 GEMM rate and the numba kernel cache.

Nothing heavy is imported: versions come from ``importlib.metadata``; NumPy (a
dependency anyway) is imported for the BLAS description and the GEMM measurement.
"""

from __future__ import annotations

import glob
import importlib.metadata as md
import importlib.util
import os
import platform
import subprocess
import sys
import time
from typing import Dict, List, Optional

__all__ = [
    "cpu_info",
    "thread_settings",
    "versions",
    "blas_info",
    "git_revision",
    "gemm_gflops",
    "kernel_cache",
    "machine_info",
    "core_count",
]

#: Vector extensions worth reporting, in the order they are printed.
VECTOR_FLAGS = (
    "sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq",
    "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8",
    "neon", "asimd", "sve",
)

THREAD_ENV = (
    "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS",
    "NUMBA_THREADING_LAYER", "TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS",
)

PACKAGES = ("fastseq", "numpy", "numba", "llvmlite", "scipy", "tensorflow", "tensorflow-cpu",
            "tf_keras", "keras", "torch", "matplotlib", "threadpoolctl")


def core_count() -> int:
    """CPUs this process may run on (affinity), falling back to ``os.cpu_count()``."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def cpu_info(cpuinfo_path: str = "/proc/cpuinfo") -> Dict[str, object]:
    """CPU model, logical CPUs and the vector extensions the CPU advertises."""
    model = None
    flags: List[str] = []
    try:
        with open(cpuinfo_path) as fh:
            for line in fh:
                key, _, value = line.partition(":")
                key = key.strip().lower()
                if model is None and key in ("model name", "hardware", "cpu model"):
                    model = value.strip()
                elif not flags and key in ("flags", "features"):
                    flags = value.split()
    except OSError:
        pass
    flagset = set(flags)
    return {
        "model": model or platform.processor() or platform.machine(),
        "machine": platform.machine(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": core_count(),
        "vector_extensions": [f for f in VECTOR_FLAGS if f in flagset],
    }


def thread_settings() -> Dict[str, object]:
    """Thread-related environment variables (unset ones omitted) and the core count."""
    env = {k: os.environ[k] for k in THREAD_ENV if k in os.environ}
    return {"usable_cpus": core_count(), "env": env}


def versions(packages=PACKAGES) -> Dict[str, Optional[str]]:
    """Installed versions by distribution name (None when not installed), plus Python."""
    out: Dict[str, Optional[str]] = {"python": platform.python_version()}
    for p in packages:
        try:
            out[p] = md.version(p)
        except md.PackageNotFoundError:
            out[p] = None
    return out


def blas_info() -> Dict[str, object]:
    """NumPy's BLAS (from ``numpy.show_config``) and, when threadpoolctl is installed,
    the loaded BLAS libraries with their thread counts."""
    info: Dict[str, object] = {}
    try:
        import numpy as np

        cfg = np.show_config(mode="dicts")
        blas = cfg.get("Build Dependencies", {}).get("blas", {})
        info["numpy_blas"] = {
            k: blas.get(k) for k in ("name", "version", "openblas configuration") if blas.get(k)
        }
    except Exception as exc:  # numpy < 1.25 has no mode="dicts"
        info["numpy_blas"] = {"error": f"{type(exc).__name__}: {exc}"}
    if importlib.util.find_spec("threadpoolctl") is not None:
        try:
            from threadpoolctl import threadpool_info

            info["threadpools"] = [
                {k: d.get(k) for k in ("user_api", "internal_api", "version", "num_threads")}
                for d in threadpool_info()
            ]
        except Exception as exc:
            info["threadpools"] = f"{type(exc).__name__}: {exc}"
    return info


def git_revision(path: Optional[str] = None) -> Dict[str, object]:
    """The git commit of the source tree fastseq runs from (None outside a checkout)."""
    if path is None:
        path = os.path.dirname(os.path.dirname(os.path.dirname(os.path.realpath(__file__))))
    try:
        rev = subprocess.run(
            ["git", "-C", path, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
        if rev.returncode != 0:
            return {"revision": None, "dirty": None}
        status = subprocess.run(
            ["git", "-C", path, "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=10,
        )
        return {"revision": rev.stdout.strip(), "dirty": bool(status.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return {"revision": None, "dirty": None}


def gemm_gflops(n: int = 2048, repeat: int = 5, dtype: str = "float32") -> Dict[str, float]:
    """Measured ``numpy.matmul`` rate on ``[n, n] @ [n, n]``: median GFLOP/s (2 n^3 FLOPs)."""
    import numpy as np

    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n)).astype(dtype)
    b = rng.standard_normal((n, n)).astype(dtype)
    out = np.empty((n, n), dtype=dtype)
    np.matmul(a, b, out=out)  # warm-up
    times = []
    for _ in range(max(1, repeat)):
        t0 = time.perf_counter()
        np.matmul(a, b, out=out)
        times.append(time.perf_counter() - t0)
    med = float(np.median(times))
    return {"n": n, "dtype": dtype, "median_s": med, "gflops": 2.0 * n**3 / med / 1e9,
            "best_gflops": 2.0 * n**3 / min(times) / 1e9}


def kernel_cache() -> Dict[str, object]:
    """Where numba caches fastseq's compiled kernels and what is there.

    Numba writes ``<module dir>/__pycache__/<module>.<func>-<line>.py311.nbi`` (index) and
    ``.nbc`` (code) files next to ``fastseq_kernels``; with ``NUMBA_CACHE_DIR`` set it
    writes under that directory instead (in a sub-folder named after the source path).
    """
    spec = importlib.util.find_spec("fastseq_kernels")  # finds, does not import
    pkg_dir = None
    if spec is not None and spec.submodule_search_locations:
        pkg_dir = list(spec.submodule_search_locations)[0]
    env_dir = os.environ.get("NUMBA_CACHE_DIR")
    if env_dir:
        location = env_dir
        index = [p for p in glob.glob(os.path.join(env_dir, "**", "*.nbi"), recursive=True)
                 if "fastseq_kernels" in p]
        data = [p for p in glob.glob(os.path.join(env_dir, "**", "*.nbc"), recursive=True)
                if "fastseq_kernels" in p]
    elif pkg_dir is not None:
        location = os.path.join(pkg_dir, "__pycache__")
        index = glob.glob(os.path.join(location, "*.nbi"))
        data = glob.glob(os.path.join(location, "*.nbc"))
    else:
        return {"location": None, "source": None, "state": "fastseq_kernels is not installed",
                "index_files": [], "data_files": 0, "bytes": 0}
    size = 0
    for p in index + data:
        try:
            size += os.path.getsize(p)
        except OSError:
            pass
    writable = os.access(location if os.path.isdir(location) else os.path.dirname(location),
                         os.W_OK)
    if index:
        state = f"warm: {len(index)} cached kernel indexes, {len(data)} compiled objects"
    else:
        state = "cold: nothing cached yet (the first call of each kernel compiles it)"
    return {
        "location": location,
        "source": "NUMBA_CACHE_DIR" if env_dir else "package __pycache__",
        "writable": writable,
        "state": state,
        "index_files": sorted(os.path.basename(p) for p in index),
        "data_files": len(data),
        "bytes": size,
    }


def machine_info(measure_gemm: bool = True, gemm_repeat: int = 5) -> Dict[str, object]:
    """Everything above in one dict (for benchmark JSON)."""
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        load = None
    info = {
        "platform": platform.platform(),
        "load_average": load,
        "python": sys.version.split()[0],
        "cpu": cpu_info(),
        "threads": thread_settings(),
        "blas": blas_info(),
        "versions": versions(),
        "git": git_revision(),
    }
    if measure_gemm:
        info["gemm_float32"] = gemm_gflops(repeat=gemm_repeat)
    return info
