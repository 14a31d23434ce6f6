# cython: language_level=3
# One chunk of an HTTP/1.1 chunked body, framed as h11's ChunkedWriter frames it: the size in
# lowercase hex, CRLF, the data, CRLF. Inline, cimported by _framing.pyx (frame_chunk) and
# _pump.pyx (the stream pump), so both write the same bytes from one definition.
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from libc.string cimport memcpy


cdef inline bytes framed(const char* data, Py_ssize_t n):
    """``data[:n]`` as one chunk (n > 0)."""
    cdef Py_ssize_t k = 0, m = n, i
    cdef bytes out
    cdef char* o
    while m:
        k += 1
        m >>= 4
    out = PyBytes_FromStringAndSize(NULL, k + 4 + n)
    o = PyBytes_AS_STRING(out)
    m = n
    i = k
    while i:
        i -= 1
        o[i] = b"0123456789abcdef"[m & 15]
        m >>= 4
    o[k] = 13
    o[k + 1] = 10
    memcpy(o + k + 2, data, n)
    o[k + 2 + n] = 13
    o[k + 3 + n] = 10
    return out
