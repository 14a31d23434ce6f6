# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Native stream scanner: what the relay does per upstream read of an SSE body, in one C call.

The relay forwards every upstream read unchanged (or without the usage chunk that
``include_usage`` added) and watches it for token usage. In pure Python that is
``UsageTracker.feed`` (``zaiproxy.http.sse.SSEParser``: a list of lines and one
``SSEEvent`` per event, then a few string tests per event) plus
``UsageChunkStripper.feed``. :class:`Scanner` does both in C, in one pass each over the
bytes of the read, and creates no Python object for an ordinary delta event:

- SSE lines and events by the WHATWG rules, exactly as ``SSEParser`` finds them (CR, LF
  and CRLF, a CRLF split over two reads, a BOM at the very start, comments, fields
  without a colon, the same line and event limits, after which it stops for good);
- only the events that can carry usage (OpenAI: a non-null ``"usage"`` or an
  ``"error"`` key; Anthropic: ``message_start``, ``message_delta`` with ``"usage"``)
  go to Python, to the ``acct`` object's methods, which parse them with orjson;
- the data of delta events is held for token counting in one C buffer, events
  separated by a CR (which no SSE data can contain), until the final usage arrives
  (then it is dropped unparsed) or its size passes ``max_pending`` characters (then
  it goes to ``acct.flush_raw`` to be counted, as ``UsageTracker`` does);
- with ``strip``, the usage chunk is cut out of the bytes to forward, byte for byte
  as ``UsageChunkStripper`` does; the read comes back as the same ``bytes`` object
  when nothing in it changed or is held.

Held delta data is measured in characters as Python decodes it (``errors="replace"``:
one U+FFFD per maximal ill-formed subpart), so the native scanner flushes at the same
events as the pure-Python tracker. zaiproxy/request/scanner.py chooses between the two
(``ZAIPROXY_RELAY``); tests/test_relay_native.py checks that they agree byte for byte.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.stdlib cimport free, realloc
from libc.string cimport memchr, memcmp, memcpy

IMPLEMENTATION = "native"

OPENAI = 0
ANTHROPIC = 1
# What acct.openai_event() answers, or-ed together.
HOLD = 1  # hold the event's data for counting (if still collecting)
FINAL = 2  # the upstream's final usage: stop collecting, drop what is held
ERROR = 4  # the event reports an error

cdef const char* BOM = b"\xef\xbb\xbf"

cdef enum:
    K_NONE = 0
    K_OTHER
    K_ERROR
    K_MSG_START
    K_MSG_DELTA
    K_MSG_STOP
    K_CB_START
    K_CB_DELTA

cdef enum:
    S_START = 0  # between events
    S_HOLD  # in an event that may be the usage chunk: its bytes are held
    S_PASS  # in any other event: its bytes go out at once

cdef struct Buf:
    char* p
    Py_ssize_t n
    Py_ssize_t cap


cdef int buf_add(Buf* b, const char* s, Py_ssize_t n) except -1:
    cdef Py_ssize_t cap
    cdef char* p
    if n <= 0:
        return 0
    if b.n + n > b.cap:
        cap = b.cap * 2 if b.cap else 256
        while cap < b.n + n:
            cap *= 2
        p = <char*>realloc(b.p, cap)
        if p == NULL:
            raise MemoryError()
        b.p = p
        b.cap = cap
    memcpy(b.p + b.n, s, n)
    b.n += n
    return 0


cdef void buf_free(Buf* b) noexcept:
    free(b.p)
    b.p = NULL
    b.n = 0
    b.cap = 0


cdef void buf_clear(Buf* b) noexcept:
    """Empty it; a buffer that grew big gives its memory back."""
    if b.cap > 65536:
        buf_free(b)
    b.n = 0


cdef inline Py_ssize_t find(const char* h, Py_ssize_t n, const char* s, Py_ssize_t m) noexcept nogil:
    """The first position of s[:m] in h[:n], or -1."""
    cdef Py_ssize_t i = 0
    cdef const char* hit
    while i + m <= n:
        hit = <const char*>memchr(h + i, s[0], n - m + 1 - i)
        if hit == NULL:
            return -1
        i = hit - h
        if memcmp(hit, s, m) == 0:
            return i
        i += 1
    return -1


cdef inline Py_ssize_t line_end(const char* p, Py_ssize_t i, Py_ssize_t n) noexcept nogil:
    """Where the line starting at ``p[i]`` ends: its first CR or LF (an SSE line ends at
    either, CRLF being a CR followed by the LF that belongs to it), or -1 when ``p[i:n]``
    holds neither (the line goes on in the next read)."""
    cdef const char* lf = <const char*>memchr(p + i, b'\n', n - i)
    cdef Py_ssize_t lim = lf - p if lf != NULL else n
    cdef const char* cr = <const char*>memchr(p + i, b'\r', lim - i)
    if cr != NULL:
        return cr - p
    return lim if lf != NULL else -1


cdef inline bint is_space(char c) noexcept nogil:
    # str.lstrip(" \t\r\n") in UsageTracker's usage test.
    return c == b' ' or c == b'\t' or c == b'\r' or c == b'\n'


cdef inline bint is_re_space(char c) noexcept nogil:
    # \s of a bytes regular expression: [ \t\n\r\f\v].
    return c == b' ' or (b'\t' <= c <= b'\r')


cdef bint has_non_null_usage(const char* d, Py_ssize_t n) noexcept nogil:
    """``_has_non_null(data, '"usage"')`` of zaiproxy/request/usage.py, on bytes.

    Its look-ahead is 24 characters; here 24 bytes. They differ only past a non-ASCII
    character, which already ends the pattern (blanks, ':', blanks, 'null') it looks for.
    """
    cdef Py_ssize_t start = find(d, n, b'"usage"', 7)
    cdef Py_ssize_t end, stop, k
    while start >= 0:
        end = start + 7
        stop = end + 24 if end + 24 < n else n
        k = end
        while k < stop and is_space(d[k]):
            k += 1
        if k < stop and d[k] == b':':
            k += 1
            while k < stop and is_space(d[k]):
                k += 1
            if not (stop - k >= 4 and memcmp(d + k, b"null", 4) == 0):
                return True
        elif k == stop:
            return True
        start = find(d + end, n - end, b'"usage"', 7)
        if start >= 0:
            start += end
    return False


cdef Py_ssize_t utf8_chars(const unsigned char* s, Py_ssize_t n) noexcept nogil:
    """len(s.decode("utf-8", "replace")): a valid character, or one maximal ill-formed
    subpart (which Python replaces by one U+FFFD), each counts 1."""
    cdef Py_ssize_t i = 0, count = 0
    cdef unsigned char b, lo, hi
    cdef int need
    while i < n:
        b = s[i]
        i += 1
        count += 1
        if b < 0x80:
            continue
        lo = 0x80
        hi = 0xBF
        if 0xC2 <= b <= 0xDF:
            need = 1
        elif b == 0xE0:
            need = 2
            lo = 0xA0
        elif 0xE1 <= b <= 0xEC or b == 0xEE or b == 0xEF:
            need = 2
        elif b == 0xED:
            need = 2
            hi = 0x9F
        elif b == 0xF0:
            need = 3
            lo = 0x90
        elif 0xF1 <= b <= 0xF3:
            need = 3
        elif b == 0xF4:
            need = 3
            hi = 0x8F
        else:
            continue  # a byte that never starts a character
        if i < n and lo <= s[i] <= hi:
            i += 1
            need -= 1
            while need and i < n and 0x80 <= s[i] <= 0xBF:
                i += 1
                need -= 1
    return count


cdef bint choices_not_empty(const char* d, Py_ssize_t n) noexcept nogil:
    """``_CHOICES_NOT_EMPTY.search`` of zaiproxy/request/usage_rewrite.py:
    ``"choices"\\s*:\\s*(?:[^\\s\\[]|\\[\\s*[^\\s\\]])``."""
    cdef Py_ssize_t pos = find(d, n, b'"choices"', 9)
    cdef Py_ssize_t k, at
    while pos >= 0:
        k = pos + 9
        while k < n and is_re_space(d[k]):
            k += 1
        if k < n and d[k] == b':':
            k += 1
            while k < n and is_re_space(d[k]):
                k += 1
            if k < n:
                if d[k] != b'[':
                    return True
                k += 1
                while k < n and is_re_space(d[k]):
                    k += 1
                if k < n and d[k] != b']':
                    return True
        at = pos + 1
        pos = find(d + at, n - at, b'"choices"', 9)
        if pos >= 0:
            pos += at
    return False


cdef bint may_be_usage(const char* h, Py_ssize_t n, Py_ssize_t limit) noexcept nogil:
    """``UsageChunkStripper._may_be_usage`` on the held bytes h[:n]."""
    cdef Py_ssize_t start, k
    if n > limit:
        return False
    if n < 5 or memcmp(h, b"data:", 5) != 0:
        return memcmp(h, b"data:", n) == 0 if n < 5 else False
    start = 6 if n > 5 and h[5] == b' ' else 5
    if n > start and h[start] != b'{':
        return False
    # More than one line (a non-empty line after the first line end): not OpenAI's chunk.
    k = 0
    while k < n and h[k] != b'\r' and h[k] != b'\n':
        k += 1
    while k < n:
        if h[k] != b'\r' and h[k] != b'\n':
            return False
        k += 1
    return not choices_not_empty(h, n)


cdef int classify(const char* v, Py_ssize_t n) noexcept nogil:
    if n == 0:
        return K_NONE
    if n == 5 and memcmp(v, b"error", 5) == 0:
        return K_ERROR
    if n == 13 and memcmp(v, b"message_start", 13) == 0:
        return K_MSG_START
    if n == 13 and memcmp(v, b"message_delta", 13) == 0:
        return K_MSG_DELTA
    if n == 12 and memcmp(v, b"message_stop", 12) == 0:
        return K_MSG_STOP
    if n == 19 and memcmp(v, b"content_block_start", 19) == 0:
        return K_CB_START
    if n == 19 and memcmp(v, b"content_block_delta", 19) == 0:
        return K_CB_DELTA
    return K_OTHER


cdef class Scanner:
    """Scans one SSE response body of one API flavour; see the module docstring.

    ``acct`` receives the rare events: ``openai_event(data, has_usage, has_error) -> int``
    (HOLD | FINAL | ERROR), ``anthropic_start(data)``, ``anthropic_delta(data) -> bool``
    (final), ``flush_raw(held)``; ``is_usage_chunk(event) -> bool`` decides, with a JSON
    parse, whether a held event is the usage chunk to strip.
    """

    cdef int api
    cdef object acct
    cdef object is_usage_chunk
    cdef bint collect
    cdef bint closed
    cdef bint overflow
    cdef bint at_start
    cdef bint after_cr
    cdef bint pending
    cdef bint strip
    cdef Py_ssize_t max_line
    cdef Py_ssize_t max_event
    cdef Py_ssize_t max_pending
    cdef Py_ssize_t max_strip
    cdef unsigned char bom[3]
    cdef Py_ssize_t bom_len
    cdef Buf line  # the partial line, after any BOM
    cdef Buf evdata  # the pending event's data lines, joined by LF
    cdef Buf held  # data of held delta events, separated by CR
    cdef Buf sheld  # the stripper's held event (between reads; within one, a range of it)
    cdef Buf out  # the stripped output, once it differs from the input
    cdef int ev_kind
    cdef Py_ssize_t data_lines
    cdef Py_ssize_t data_len
    cdef readonly Py_ssize_t events
    cdef readonly bint done
    cdef readonly bint error
    cdef readonly Py_ssize_t held_chars
    cdef readonly Py_ssize_t held_events
    cdef readonly Py_ssize_t stripped
    # The stripper (UsageChunkStripper's state, same names without the underscore).
    cdef int mode
    cdef bint s_line_start
    cdef bint s_after_cr
    cdef bint s_drop_lf
    cdef bint in_buf  # the held event is in sheld, else it is src[hs:he]
    cdef Py_ssize_t hs
    cdef Py_ssize_t he
    # The output of one feed: src[:ident_end] while ident, else out.
    cdef const char* src
    cdef bint ident
    cdef Py_ssize_t ident_end

    def __cinit__(self):
        self.at_start = True
        self.s_line_start = True

    def __init__(self, int api, acct, *, bint collect=True, Py_ssize_t max_pending=256 * 1024,
                 bint strip=False, is_usage_chunk=None, Py_ssize_t max_line=1 << 20,
                 max_event=None, Py_ssize_t max_strip_event=8192):
        if api != OPENAI and api != ANTHROPIC:
            raise ValueError(f"api must be OPENAI or ANTHROPIC, not {api!r}")
        if strip and is_usage_chunk is None:
            raise ValueError("strip needs is_usage_chunk")
        self.api = api
        self.acct = acct
        self.is_usage_chunk = is_usage_chunk
        self.collect = collect
        self.max_pending = max_pending
        self.strip = strip
        self.max_line = max_line
        self.max_event = 4 * max_line if max_event is None else max_event
        self.max_strip = max_strip_event

    def __dealloc__(self):
        buf_free(&self.line)
        buf_free(&self.evdata)
        buf_free(&self.held)
        buf_free(&self.sheld)
        buf_free(&self.out)

    @property
    def at_event_boundary(self):
        """No partial line and no field since the last blank line (``SSEParser``'s)."""
        return not (self.line.n or self.bom_len or self.pending or self.overflow)

    @property
    def overflowed(self):
        return self.overflow

    @property
    def collecting(self):
        return self.collect

    def feed(self, data):
        """Scan one upstream read; return the bytes to forward (``data`` itself, as bytes,
        unless the usage chunk is stripped or held)."""
        cdef bytes b = data if type(data) is bytes else bytes(data)
        cdef Py_ssize_t n = PyBytes_GET_SIZE(b)
        if n == 0:
            return b
        if not (self.overflow or self.closed):
            self._scan(PyBytes_AS_STRING(b), n)
        if not self.strip:
            return b
        return self._strip(b, PyBytes_AS_STRING(b), n)

    def close(self):
        """End of stream: the scanner stops; returns what the stripper still held (an
        unterminated event is not an event: its bytes go out as they are)."""
        cdef bytes tail = PyBytes_FromStringAndSize(self.sheld.p, self.sheld.n)
        self.closed = True
        buf_clear(&self.sheld)
        self.mode = S_START
        self.in_buf = False
        return tail

    def take_held(self):
        """The held delta data (events separated by CR), which the scanner forgets."""
        cdef bytes raw = PyBytes_FromStringAndSize(self.held.p, self.held.n)
        buf_clear(&self.held)
        self.held_chars = 0
        self.held_events = 0
        return raw

    # ---- SSE ---------------------------------------------------------------------------

    cdef int _scan(self, const char* p, Py_ssize_t n) except -1:
        cdef Py_ssize_t i = 0, j, k, t
        if self.at_start:
            t = self.bom_len
            k = 0
            while t < 3 and k < n and p[k] == BOM[t]:
                t += 1
                k += 1
            if t == 3:
                self.at_start = False
                self.bom_len = 0
                i = k
            elif k == n:
                memcpy(self.bom + self.bom_len, p, n)  # all of p is more of the BOM
                self.bom_len = t
                return 0
            else:
                # Not a BOM: what was held as its start is the start of the first line.
                self.at_start = False
                buf_add(&self.line, <const char*>self.bom, self.bom_len)
                self.bom_len = 0
        if self.after_cr and i < n:
            self.after_cr = False
            if p[i] == b'\n':
                i += 1
        while i < n:
            j = line_end(p, i, n)
            if j < 0:
                if self.line.n + (n - i) > self.max_line:
                    self._overflow()
                    return 0
                buf_add(&self.line, p + i, n - i)
                return 0
            if self.line.n:
                if self.line.n + (j - i) > self.max_line:
                    self._overflow()
                    return 0
                buf_add(&self.line, p + i, j - i)
                self._line(self.line.p, self.line.n)
                self.line.n = 0
            else:
                if j - i > self.max_line:
                    self._overflow()
                    return 0
                self._line(p + i, j - i)
            if self.overflow:
                return 0
            if p[j] == b'\r':
                if j + 1 < n:
                    i = j + 2 if p[j + 1] == b'\n' else j + 1
                else:
                    self.after_cr = True
                    i = j + 1
            else:
                i = j + 1
        return 0

    cdef void _overflow(self) noexcept:
        self.overflow = True
        buf_free(&self.line)
        buf_free(&self.evdata)
        self.data_lines = 0
        self.data_len = 0

    cdef int _line(self, const char* s, Py_ssize_t n) except -1:
        cdef const char* c
        cdef const char* v
        cdef Py_ssize_t name_len, vlen
        if n == 0:
            return self._dispatch()
        c = <const char*>memchr(s, b':', n)
        if c == s:
            return 0  # a comment
        self.pending = True
        if c != NULL:
            name_len = c - s
            v = c + 1
            if v < s + n and v[0] == b' ':
                v += 1
        else:
            name_len = n
            v = s + n
        vlen = s + n - v
        if name_len == 4 and memcmp(s, b"data", 4) == 0:
            self.data_len += vlen + 1
            if self.data_len > self.max_event:
                self._overflow()
                return 0
            if self.data_lines:
                buf_add(&self.evdata, b"\n", 1)
            buf_add(&self.evdata, v, vlen)
            self.data_lines += 1
        elif name_len == 5 and memcmp(s, b"event", 5) == 0:
            self.ev_kind = classify(v, vlen)
        # id and retry change nothing the tracker reports; other fields are ignored.
        return 0

    cdef int _dispatch(self) except -1:
        if self.data_lines:
            self.events += 1
            if self.api == OPENAI:
                self._openai()
            else:
                self._anthropic()
            buf_clear(&self.evdata)
            self.data_lines = 0
            self.data_len = 0
        self.ev_kind = K_NONE
        self.pending = False
        return 0

    cdef bytes _data(self):
        return PyBytes_FromStringAndSize(self.evdata.p, self.evdata.n)

    cdef int _openai(self) except -1:
        cdef const char* d = self.evdata.p
        cdef Py_ssize_t n = self.evdata.n
        cdef bint has_usage, has_error
        cdef int flags
        if n == 6 and memcmp(d, b"[DONE]", 6) == 0:
            self.done = True
            return 0
        if self.ev_kind == K_ERROR:
            self.error = True
        has_usage = has_non_null_usage(d, n)
        has_error = find(d, n, b'"error"', 7) >= 0
        if not (has_usage or has_error):
            if self.collect:
                self._hold()
            return 0
        flags = self.acct.openai_event(self._data(), has_usage, has_error)
        if flags & ERROR:
            self.error = True
        if flags & FINAL:
            self._final()
        if flags & HOLD and self.collect:
            self._hold()
        return 0

    cdef int _anthropic(self) except -1:
        cdef int kind = self.ev_kind
        if kind == K_CB_DELTA or kind == K_CB_START:
            if self.collect:
                self._hold()
        elif kind == K_MSG_START:
            self.acct.anthropic_start(self._data())
        elif kind == K_MSG_DELTA:
            if find(self.evdata.p, self.evdata.n, b'"usage"', 7) >= 0:
                if self.acct.anthropic_delta(self._data()):
                    self._final()
        elif kind == K_MSG_STOP:
            self.done = True
        elif kind == K_ERROR:
            self.error = True
        return 0

    cdef void _final(self) noexcept:
        self.collect = False
        buf_clear(&self.held)
        self.held_chars = 0
        self.held_events = 0

    cdef int _hold(self) except -1:
        if self.held_events:
            buf_add(&self.held, b"\r", 1)
        buf_add(&self.held, self.evdata.p, self.evdata.n)
        self.held_events += 1
        self.held_chars += utf8_chars(<const unsigned char*>self.evdata.p, self.evdata.n)
        if self.held_chars > self.max_pending:
            self.acct.flush_raw(self.take_held())
        return 0

    # ---- the usage chunk stripper ------------------------------------------------------

    cdef int _emit(self, Py_ssize_t a, Py_ssize_t b) except -1:
        """Send src[a:b] on."""
        if a >= b:
            return 0
        if self.ident and a == self.ident_end:
            self.ident_end = b
            return 0
        self._materialize()
        return buf_add(&self.out, self.src + a, b - a)

    cdef int _emit_bytes(self, const char* s, Py_ssize_t n) except -1:
        if n <= 0:
            return 0
        self._materialize()
        return buf_add(&self.out, s, n)

    cdef int _materialize(self) except -1:
        if self.ident:
            self.ident = False
            self.out.n = 0
            buf_add(&self.out, self.src, self.ident_end)
        return 0

    cdef int _release(self) except -1:
        """The held event is not the usage chunk: send it on, hold nothing."""
        if self.in_buf:
            self._emit_bytes(self.sheld.p, self.sheld.n)
            buf_clear(&self.sheld)
            self.in_buf = False
        else:
            self._emit(self.hs, self.he)
        self.hs = self.he = 0
        return 0

    cdef bint _held_may_be_usage(self) noexcept:
        if self.in_buf:
            return may_be_usage(self.sheld.p, self.sheld.n, self.max_strip)
        return may_be_usage(self.src + self.hs, self.he - self.hs, self.max_strip)

    cdef int _take(self, Py_ssize_t a, Py_ssize_t b) except -1:
        if self.mode == S_START:
            self.mode = S_HOLD
        if self.mode == S_PASS:
            return self._emit(a, b)
        if self.in_buf:
            if self.sheld.n + (b - a) > self.max_strip:
                self._release()
                self.mode = S_PASS
                return self._emit(a, b)
            buf_add(&self.sheld, self.src + a, b - a)
        elif self.he > self.hs:
            self.he = b  # pieces of one feed are contiguous
        else:
            self.hs = a
            self.he = b
        if not self._held_may_be_usage():
            self._release()
            self.mode = S_PASS
        return 0

    cdef int _end_event(self, Py_ssize_t a, Py_ssize_t b) except -1:
        cdef bint usage = False
        cdef bytes event
        if self.in_buf:
            buf_add(&self.sheld, self.src + a, b - a)
        elif self.he > self.hs:
            self.he = b
        else:
            self.hs = a
            self.he = b
        if self.mode == S_HOLD and self._held_may_be_usage():
            if self.in_buf:
                event = PyBytes_FromStringAndSize(self.sheld.p, self.sheld.n)
            else:
                event = PyBytes_FromStringAndSize(self.src + self.hs, self.he - self.hs)
            usage = self.is_usage_chunk(event)
        if usage:
            self.stripped += 1
            self.s_drop_lf = self.s_after_cr
            buf_clear(&self.sheld)
            self.in_buf = False
            self.hs = self.he = 0
        else:
            self._release()
        self.mode = S_START
        return 0

    cdef object _strip(self, bytes b, const char* p, Py_ssize_t n):
        cdef Py_ssize_t i = 0, j, end
        cdef bint blank
        self.src = p
        self.ident = True
        self.ident_end = 0
        self.hs = self.he = 0
        if self.s_after_cr:
            self.s_after_cr = False
            if p[0] == b'\n':
                i = 1
                if self.mode == S_HOLD:
                    buf_add(&self.sheld, b"\n", 1)
                elif not self.s_drop_lf:
                    self._emit(0, 1)
        self.s_drop_lf = False
        while i < n:
            j = line_end(p, i, n)
            if j < 0:
                self._take(i, n)
                self.s_line_start = False
                break
            end = j + 1
            if p[j] == b'\r':
                if end == n:
                    self.s_after_cr = True
                elif p[end] == b'\n':
                    end += 1
            blank = self.s_line_start and j == i
            self.s_line_start = True
            if not blank:
                self._take(i, end)
            elif self.mode == S_START:
                self._emit(i, end)
            else:
                self._end_event(i, end)
            i = end
        if self.mode == S_HOLD and not self.in_buf and self.he > self.hs:
            # Still held at the end of the read: keep a copy for the next one.
            self.sheld.n = 0
            buf_add(&self.sheld, p + self.hs, self.he - self.hs)
            self.in_buf = True
        self.hs = self.he = 0
        self.src = NULL
        if self.ident:
            return b if self.ident_end == n else PyBytes_FromStringAndSize(p, self.ident_end)
        result = PyBytes_FromStringAndSize(self.out.p, self.out.n)
        buf_clear(&self.out)
        return result
