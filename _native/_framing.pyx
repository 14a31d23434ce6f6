# cython: language_level=3
"""HTTP/1.1 chunked framing in C, for the upstream body and the client's response.

``Dechunker`` decodes a chunked response body the way h11 accepts it (its pure-Python twin,
zaiproxy._native._framing_py, says exactly which framing that is and how the last chunk is
handed back to h11); ``frame_chunk`` frames one chunk of a response the way h11's
``ChunkedWriter`` does. zaiproxy.http.netstream chooses the implementation (ZAIPROXY_RELAY).
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE

from _chunk cimport framed

IMPLEMENTATION = "native"

DEF S_LINE = 0
DEF S_WS = 1
DEF S_EXT = 2
DEF S_LF = 3
DEF S_DATA = 4
DEF S_FOOT_CR = 5
DEF S_FOOT_LF = 6
DEF S_END = 7

cdef unsigned long long SATURATED = 0xFFFFFFFFFFFFFFFFULL


class FramingError(ValueError):
    """The chunked framing is one that h11 refuses; ``str()`` says how."""


cdef inline int _hex(unsigned char c) noexcept:
    if 48 <= c <= 57:
        return c - 48
    if 97 <= c <= 102:
        return c - 87
    if 65 <= c <= 70:
        return c - 55
    return -1


cdef class Dechunker:
    """Decodes one chunked body, read by read, until its last chunk (see the twin)."""

    cdef int _state
    cdef int _digits
    cdef bint _cr  # in an extension: the byte before was CR
    cdef unsigned long long _value
    cdef unsigned long long _remaining
    cdef Py_ssize_t _max_line
    cdef bytes _line
    cdef public bytes tail

    def __init__(self, Py_ssize_t max_line=65536):
        self._max_line = max_line
        self._state = S_LINE
        self._digits = 0
        self._cr = False
        self._value = 0
        self._remaining = 0
        self._line = b""
        self.tail = b""

    @property
    def ended(self):
        """The last chunk's size line was read: ``tail`` goes to h11."""
        return self._state == S_END

    def feed(self, bytes data not None):
        """The body bytes in ``data`` (``data`` itself when it is all chunk data)."""
        cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(data)
        cdef Py_ssize_t n = PyBytes_GET_SIZE(data)
        cdef Py_ssize_t i = 0, line_start = 0, take, first_s = -1, first_e = 0
        cdef int state = self._state, d
        cdef unsigned char c
        cdef bytearray out = None
        if state == S_END:
            raise FramingError("the last chunk was already read")
        while i < n:
            if state == S_DATA:
                take = n - i
                if <unsigned long long>take > self._remaining:
                    take = <Py_ssize_t>self._remaining
                if take == n:
                    self._remaining -= take
                    self._state = S_FOOT_CR if self._remaining == 0 else S_DATA
                    return data
                if first_s < 0:
                    first_s, first_e = i, i + take
                else:
                    if out is None:
                        out = bytearray(p[first_s:first_e])
                    out += p[i:i + take]
                i += take
                self._remaining -= take
                if self._remaining == 0:
                    state = S_FOOT_CR
                continue
            c = p[i]
            i += 1
            if state == S_FOOT_CR:
                if c != 13:
                    raise FramingError(f"malformed chunk footer: {bytes([c])!r} (expected b'\\r\\n')")
                state = S_FOOT_LF
            elif state == S_FOOT_LF:
                if c != 10:
                    raise FramingError(f"malformed chunk footer: {bytes([c])!r} (expected b'\\n')")
                state = S_LINE
                line_start = i
                self._line = b""
            elif state == S_LINE:
                d = _hex(c)
                if d >= 0:
                    self._digits += 1
                    if self._digits > 20:
                        raise FramingError("illegal chunk header: more than 20 hex digits")
                    if self._value > (SATURATED >> 4):
                        self._value = SATURATED
                    else:
                        self._value = self._value * 16 + d
                    continue
                if self._digits == 0:
                    raise FramingError(f"illegal chunk header: {bytes([c])!r} is not a hex digit")
                if c == 59:
                    state = S_EXT
                    self._cr = False
                elif c == 32 or c == 9:
                    state = S_WS
                elif c == 13:
                    state = S_LF
                else:
                    raise FramingError(f"illegal chunk header: unexpected {bytes([c])!r}")
            elif state == S_WS:
                if c == 13:
                    state = S_LF
                elif c != 32 and c != 9:
                    raise FramingError(f"illegal chunk header: unexpected {bytes([c])!r}")
            elif state == S_EXT:
                if c == 10:
                    if not self._cr:
                        raise FramingError("illegal chunk header: a bare LF in its extension")
                    state = self._line_done(data, line_start)
                    if state == S_END:
                        break
                else:
                    self._cr = c == 13
            else:  # S_LF
                if c != 10:
                    raise FramingError("illegal chunk header: a CR not followed by LF")
                state = self._line_done(data, line_start)
                if state == S_END:
                    break
        if state != S_END:
            self._state = state
            if state <= S_LF:
                self._line += data[line_start:]
                if PyBytes_GET_SIZE(self._line) > self._max_line:
                    raise FramingError("chunk size line too long (Receive buffer too long)")
        if out is not None:
            return bytes(out)
        if first_s < 0:
            return b""
        return PyBytes_FromStringAndSize(<const char*>p + first_s, first_e - first_s)

    cdef int _line_done(self, bytes data, Py_ssize_t line_start) except -1:
        cdef unsigned long long value = self._value
        self._digits = 0
        self._value = 0
        if value == 0:
            self.tail = self._line + data[line_start:]
            self._line = b""
            self._state = S_END
            return S_END
        self._line = b""
        self._remaining = value
        return S_DATA


def frame_chunk(data):
    """``data`` (any bytes-like) as one chunk: hex size, CRLF, data, CRLF (h11's
    ChunkedWriter); b"" for b""."""
    if type(data) is not bytes:
        data = bytes(data)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(data)
    if n == 0:
        return b""
    return framed(PyBytes_AS_STRING(data), n)
