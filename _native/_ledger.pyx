# cython: language_level=3
"""Native half of the shared-memory ledger.

Issue 2 ships only the pieces that the rest of the ledger builds on and that
have to agree bit-for-bit between processes and between the two
implementations: the stable key hash. (Python's ``hash()`` is salted per
process, so two workers would disagree on which cell a key lives in.)
The pure-Python twin is ``_native/_ledger_py.py``; ``zaiproxy.ledger`` picks one.
"""

from libc.stdint cimport uint64_t

IMPLEMENTATION = "native"

cdef uint64_t FNV_OFFSET = 0xcbf29ce484222325ULL
cdef uint64_t FNV_PRIME = 0x100000001b3ULL


cpdef unsigned long long stable_hash(const unsigned char[:] data):
    """64-bit FNV-1a of ``data``; identical in every process and in the twin."""
    cdef uint64_t h = FNV_OFFSET
    cdef Py_ssize_t i
    with nogil:
        for i in range(data.shape[0]):
            h ^= data[i]
            h *= FNV_PRIME
    return h
