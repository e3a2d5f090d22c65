"""Build script: the package list (the plugin packages live under backends/) and the
Cython extensions of fastseq_kernels. Metadata lives in pyproject.toml.

Set FASTSEQ_CYTHON_DEBUG=1 to build the extensions with bounds checks and wraparound on.
"""
import glob
import os

import numpy as np
from setuptools import Extension, find_packages, setup

DEBUG = os.environ.get("FASTSEQ_CYTHON_DEBUG", "") not in ("", "0")
# One directive set for every extension.
DIRECTIVES = {
    "language_level": 3,
    "boundscheck": DEBUG,
    "wraparound": DEBUG,
    "initializedcheck": DEBUG,
    "cdivision": True,
    "nonecheck": False,
}


def extensions():
    from Cython.Build import cythonize

    exts = []
    for pyx in sorted(glob.glob(os.path.join("fastseq_kernels", "*.pyx"))):
        mod = "fastseq_kernels." + os.path.splitext(os.path.basename(pyx))[0]
        exts.append(
            Extension(
                mod,
                [pyx],
                include_dirs=[np.get_include()],
                define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
                extra_compile_args=["-O3"],
            )
        )
    return cythonize(exts, compiler_directives=DIRECTIVES, quiet=True)


PLUGINS = {"fastseq_numba": "backends/fastseq_numba", "fastseq_tensorflow": "backends/fastseq_tensorflow"}

setup(
    packages=find_packages(include=["fastseq", "fastseq.*", "fastseq_kernels", "fastseq_kernels.*"])
    + sorted(PLUGINS),
    package_dir=PLUGINS,
    package_data={"fastseq_kernels": ["*.pyx", "*.pxd"], "fastseq": ["datasets/*/*"]},
    ext_modules=extensions(),
)
