"""Builds the Cython extensions in _native/.

Everything else about the package lives in pyproject.toml; setup.py exists
only because the extensions need a build step (docs/architecture.md).

The folder _native/ is installed as the package zaiproxy._native (pyproject.toml's
package-dir), so the extensions' module names are zaiproxy._native._ledger,
zaiproxy._native._relay and zaiproxy._native._framing; the built .so files land in _native/
for the editable install and in zaiproxy/_native/ in a wheel.
"""

from Cython.Build import cythonize
from setuptools import Extension, setup

extensions = [
    Extension(
        "zaiproxy._native._ledger",
        ["_native/_ledger.pyx"],
        # _atomic.h: the __atomic builtins the ledger uses (cdef extern from "_atomic.h").
        include_dirs=["_native"],
        depends=["_native/_atomic.h"],
        extra_compile_args=["-O2"],
    ),
    # The stream scanner of the relay (zaiproxy/request/scanner.py chooses it).
    Extension(
        "zaiproxy._native._relay",
        ["_native/_relay.pyx"],
        extra_compile_args=["-O2"],
    ),
    # Chunked framing of the relayed body, both sides (zaiproxy/http/netstream.py chooses it).
    Extension(
        "zaiproxy._native._framing",
        ["_native/_framing.pyx"],
        extra_compile_args=["-O2"],
    ),
    # The relay's inner loop for chunked SSE bodies between plain sockets (request/relay.py).
    Extension(
        "zaiproxy._native._pump",
        ["_native/_pump.pyx"],
        extra_compile_args=["-O2"],
    ),
]

setup(
    ext_modules=cythonize(
        extensions,
        language_level="3",
        compiler_directives={"boundscheck": False, "wraparound": False},
        # _native/_chunk.pxd (the chunk framing both _framing and _pump inline) is cimported
        # by its bare name.
        include_path=["_native"],
        # The generated C goes under build/, not beside the .pyx: it stays out of the wheel
        # (2 MB) and a _ledger.c left by an older build (another module name) is never reused.
        build_dir="build/cython",
    )
)
