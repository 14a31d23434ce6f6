"""Builds the Cython extension in _native/.

Everything else about the package lives in pyproject.toml; setup.py exists
only because the extension needs a build step (docs/architecture.md).
"""

from Cython.Build import cythonize
from setuptools import Extension, setup

extensions = [
    Extension(
        "_native._ledger",
        ["_native/_ledger.pyx"],
        # _atomic.h: the __atomic builtins the ledger uses (cdef extern from "_atomic.h").
        include_dirs=["_native"],
        depends=["_native/_atomic.h"],
        extra_compile_args=["-O2"],
    )
]

setup(
    ext_modules=cythonize(
        extensions,
        language_level="3",
        compiler_directives={"boundscheck": False, "wraparound": False},
    )
)
