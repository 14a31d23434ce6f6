# cython: language_level=3
"""The relay's inner loop in C: a chunked upstream body to a chunked client response.

One ``Pump.step()`` call does, for as many upstream reads as are ready (at most ``burst``):
``recv`` into a reused buffer -> (HTTPS: the ``ssl.SSLObject``) -> the Dechunker -> the
stream scanner -> the chunk framing -> ``send``, one client write per upstream read (per TLS
record), and returns what to wait for next. A stream waiting for upstream waits in its
worker's ``Hub`` (below, driven by zaiproxy/http/pumphub.py), which steps every ready pump in
one call; zaiproxy/request/relay.py only waits and calls again (docs/architecture.md, "The
stream pump and its hub").

It holds no h11 state: h11 has parsed the upstream head and written the client head before,
and is handed the dechunker's ``tail`` and writes the client's last chunk after (``END``).
Its pure-Python twin is the relay's own loop (``ZAIPROXY_RELAY=python``); both give
byte-identical client output (tests/test_pump_native.py, and every relay test runs on both).
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.errno cimport EAGAIN, EBADF, EINTR, errno
from libc.stdint cimport uint32_t, uint64_t
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec
from posix.unistd cimport close

from _chunk cimport framed

cdef extern from "sys/epoll.h" nogil:
    ctypedef union epoll_data_t:
        void* ptr
        int fd
        uint32_t u32
        uint64_t u64
    struct epoll_event:
        uint32_t events
        epoll_data_t data
    int epoll_create1(int flags)
    int epoll_ctl(int epfd, int op, int fd, epoll_event* event)
    int epoll_wait(int epfd, epoll_event* events, int maxevents, int timeout)
    int EPOLL_CLOEXEC
    int EPOLL_CTL_ADD
    int EPOLL_CTL_DEL
    int EPOLLIN
    int EPOLLRDHUP

cdef extern from "sys/socket.h" nogil:
    ssize_t recv(int fd, void* buf, size_t n, int flags)
    ssize_t send(int fd, const void* buf, size_t n, int flags)
    int MSG_DONTWAIT
    int MSG_NOSIGNAL

IMPLEMENTATION = "native"

# What step() asks the caller to do next.
READ = 0   # wait until upstream is readable, then step() again
WRITE = 1  # wait until the client can take more, then step() again
YIELD = 2  # ``burst`` reads went through at once: let the scheduler run, then step() again
END = 3    # the last chunk's size line was read: the dechunker's ``tail`` goes to h11
EOF = 4    # upstream closed the connection inside the body
FAILED = 5  # (Hub only) step() raised: the exception is in ``error``
HANDOFF = 6  # TLS wants to send (a KeyUpdate's answer): the caller relays the rest itself

import ssl as _ssl

_SSLWantRead = _ssl.SSLWantReadError
_SSLEnded = (_ssl.SSLZeroReturnError, _ssl.SSLEOFError)

DEF READ_SIZE = 65536

# One receive buffer for the process: step() never yields, so no two pumps use it at once,
# and an open stream holds no receive buffer of its own.
cdef char _buf[READ_SIZE]


class UpstreamFailed(OSError):
    """``recv`` on the upstream socket failed (``errno`` says why)."""


class ClientFailed(OSError):
    """``send`` on the client socket failed (``errno`` says why)."""


cdef class Pump:
    """Relays one chunked body from the socket ``up`` to the socket ``down``.

    ``dechunk`` is a ``zaiproxy._native._framing.Dechunker`` (its ``feed`` and ``ended``);
    ``tls``, for a TLS upstream, has the session's ``ssl_object``, ``incoming`` and
    ``outgoing`` (zaiproxy.http.tlsstream.TLSStream): what is received is decrypted here,
    and the caller hands the pump over only when nothing decrypted is waiting;
    ``scan`` is called with each non-empty decoded piece and returns the bytes to send (the
    stream scanner's ``feed``). The pump owns neither socket: each ``step()`` takes their
    file descriptors afresh, so a socket closed by another task (the pool's idle watchdog)
    is an error (``EBADF``), never a read from whatever reused its number.
    """

    cdef object up_sock
    cdef object down_sock
    cdef int up
    cdef int down
    cdef object dechunk
    cdef object scan
    cdef bytes pending  # a framed chunk the client's socket has not taken yet
    cdef Py_ssize_t pending_off
    cdef int burst
    cdef object ssl_object  # TLS: the session's ssl.SSLObject and its two memory BIOs
    cdef object incoming
    cdef object outgoing
    cdef readonly long long body_bytes  # decoded body bytes handed to the client (unframed)
    cdef readonly long long received  # raw bytes read from upstream
    cdef readonly double last_read  # CLOCK_MONOTONIC (time.monotonic()) of the last read
    cdef readonly double first_sent  # ... of the first body byte handed to the client; 0: none
    # While in a Hub: its id there, and what the Hub sets when it gives the pump back.
    cdef uint64_t hub_id
    cdef public object waker  # the caller's; the Hub leaves it to the caller to wake
    cdef readonly int result
    cdef public object error

    def __init__(self, up, down, dechunk, scan, int burst=16, tls=None):
        if burst < 1:
            raise ValueError("burst must be >= 1")
        self.ssl_object = None if tls is None else tls.ssl_object
        self.incoming = None if tls is None else tls.incoming
        self.outgoing = None if tls is None else tls.outgoing
        self.up_sock = up
        self.down_sock = down
        self.up = -1
        self.down = -1
        self.dechunk = dechunk
        self.scan = scan
        self.pending = None
        self.pending_off = 0
        self.burst = burst
        self.body_bytes = 0
        self.received = 0
        self.last_read = _monotonic()
        self.first_sent = 0.0
        self.hub_id = 0
        self.waker = None
        self.result = READ
        self.error = None

    @property
    def pending_bytes(self):
        """Framed bytes queued for the client (waiting for ``WRITE``)."""
        if self.pending is None:
            return 0
        return PyBytes_GET_SIZE(self.pending) - self.pending_off

    cdef bint _flush(self) except -1:
        """True when everything is out, False when the client's socket is full."""
        cdef Py_ssize_t left = PyBytes_GET_SIZE(self.pending) - self.pending_off
        cdef const char* p = PyBytes_AS_STRING(self.pending) + self.pending_off
        cdef ssize_t sent
        while left > 0:
            sent = send(self.down, p, left, MSG_DONTWAIT | MSG_NOSIGNAL)
            if sent < 0:
                if errno == EINTR:
                    continue
                if errno == EAGAIN:
                    return False
                raise ClientFailed(errno, "client send failed")
            left -= sent
            p += sent
            self.pending_off += sent
        self.pending = None
        self.pending_off = 0
        return True

    def step(self):
        """Relay what is ready; returns READ, WRITE, YIELD, END, EOF or HANDOFF.

        Raises ``UpstreamFailed`` / ``ClientFailed`` for a socket error and whatever the
        dechunker (``FramingError``), the scanner or TLS (``ssl.SSLError``) raise; the pump
        is then unusable.
        """
        return self._step(False)

    cdef int _relay(self, bytes data) except -1:
        """Body bytes of ``data`` (raw chunked body) to the client: 0 when all is out and
        the body goes on, WRITE when the client's socket is full, END at the last chunk."""
        cdef Py_ssize_t n
        cdef bytes body = self.dechunk.feed(data)
        if PyBytes_GET_SIZE(body):
            body = self.scan(body)
        n = PyBytes_GET_SIZE(body)
        if n:
            if self.body_bytes == 0:
                self.first_sent = _monotonic()
            self.body_bytes += n
            self.pending = framed(PyBytes_AS_STRING(body), n)
            self.pending_off = 0
            if not self._flush():
                return WRITE
        if self.dechunk.ended:
            return END
        return 0

    cdef int _decrypted(self) except -2:
        """TLS: relay what the SSLObject can decrypt from what was received (-1 when it
        wants more bytes, else the result to return). Whatever it wants to send meanwhile
        (a KeyUpdate's answer) is the caller's: HANDOFF."""
        cdef int r
        cdef bytes plain
        while True:
            try:
                plain = self.ssl_object.read(READ_SIZE)
            except _SSLWantRead:
                break
            except _SSLEnded:
                return EOF
            if not plain:
                return EOF
            r = self._relay(plain)
            if r:
                return r
        if self.outgoing.pending:
            return HANDOFF
        return -1

    cdef int _step(self, bint level) except -1:
        """``level``: called by a Hub, whose level-triggered epoll reports a socket with data
        left again on its next run: a short read (less than the buffer) is taken as having
        drained the socket, which saves the ``recv`` that would only say ``EAGAIN``."""
        cdef ssize_t got
        cdef int reads = 0, r
        cdef bint tls = self.ssl_object is not None
        self.up = self.up_sock.fileno()
        if self.up < 0:
            raise UpstreamFailed(EBADF, "upstream socket closed")
        self.down = self.down_sock.fileno()
        if self.down < 0:
            raise ClientFailed(EBADF, "client socket closed")
        if self.pending is not None:
            if not self._flush():
                return WRITE
            if self.dechunk.ended:  # the last read's chunk is out
                return END
        while True:
            if tls:
                # Nothing decrypted is left behind before a wait: the socket's readiness
                # is then all there is to wait for.
                r = self._decrypted()
                if r >= 0:
                    return r
            if reads == self.burst:
                return YIELD
            got = recv(self.up, _buf, READ_SIZE, MSG_DONTWAIT)
            if got < 0:
                if errno == EINTR:
                    continue
                if errno == EAGAIN:
                    return READ
                raise UpstreamFailed(errno, "upstream recv failed")
            if got == 0:
                if tls:
                    self.incoming.write_eof()
                    r = self._decrypted()
                    return r if r >= 0 else EOF
                return EOF
            reads += 1
            self.received += got
            self.last_read = _monotonic()
            if tls:
                self.incoming.write(PyBytes_FromStringAndSize(_buf, got))
                r = self._decrypted()
                if r >= 0:
                    return r
            else:
                r = self._relay(PyBytes_FromStringAndSize(_buf, got))
                if r:
                    return r
            if level and got < READ_SIZE:
                return READ


cdef inline double _monotonic() noexcept:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return ts.tv_sec + ts.tv_nsec * 1e-9


DEF MAX_EVENTS = 256


cdef class Hub:
    """Many pumps waiting for their upstream with one wait (per worker, zaiproxy/http/pumphub.py).

    The Hub has an epoll set of its own, whose descriptor (``fileno()``) the caller waits on
    in trio. ``run()`` takes what is ready and steps each ready pump, in C, without a
    Python frame per event: a pump stays in the Hub while its step says ``READ`` (or
    ``YIELD``: level-triggered, it is ready again next run); any other result (``WRITE``,
    ``END``, ``EOF``, or ``FAILED`` with the exception in ``error``) takes it out, sets its
    ``result`` and returns it to the caller, who wakes the pump's task.
    """

    cdef int epfd
    cdef dict pumps  # hub id -> Pump
    cdef uint64_t next_id
    cdef epoll_event events[MAX_EVENTS]

    def __cinit__(self):
        self.epfd = epoll_create1(EPOLL_CLOEXEC)
        if self.epfd < 0:
            raise OSError(errno, "epoll_create1 failed")
        self.pumps = {}
        self.next_id = 1

    def __dealloc__(self):
        if self.epfd >= 0:
            close(self.epfd)

    def fileno(self):
        return self.epfd

    def __len__(self):
        return len(self.pumps)

    def add(self, Pump pump not None):
        """Watch ``pump``'s upstream socket; ready reads are relayed by ``run()``."""
        cdef epoll_event ev
        cdef int fd
        if self.epfd < 0:
            raise ValueError("the hub is closed")
        if pump.hub_id:
            raise ValueError("this pump is already in a hub")
        fd = pump.up_sock.fileno()
        if fd < 0:
            raise UpstreamFailed(EBADF, "upstream socket closed")
        ev.events = EPOLLIN | EPOLLRDHUP
        ev.data.u64 = self.next_id
        if epoll_ctl(self.epfd, EPOLL_CTL_ADD, fd, &ev) < 0:
            raise OSError(errno, "epoll_ctl(ADD) failed")
        pump.hub_id = self.next_id
        pump.result = READ
        pump.error = None
        self.pumps[self.next_id] = pump
        self.next_id += 1

    def discard(self, Pump pump not None):
        """Stop watching ``pump`` (nothing if it is not in this hub); before its socket closes."""
        cdef epoll_event ev
        cdef int fd
        if not pump.hub_id or self.pumps.get(pump.hub_id) is not pump:
            return
        del self.pumps[pump.hub_id]
        pump.hub_id = 0
        fd = pump.up_sock.fileno()
        if fd >= 0 and self.epfd >= 0:
            epoll_ctl(self.epfd, EPOLL_CTL_DEL, fd, &ev)  # ENOENT/EBADF: gone already

    def run(self):
        """Step every pump whose upstream is ready; returns the pumps given back (a list)."""
        cdef int n, i, r
        cdef Pump pump
        cdef list given_back = []
        if self.epfd < 0:
            return given_back
        n = epoll_wait(self.epfd, self.events, MAX_EVENTS, 0)
        if n < 0:
            if errno == EINTR:
                return given_back
            raise OSError(errno, "epoll_wait failed")
        for i in range(n):
            pump = self.pumps.get(self.events[i].data.u64)
            if pump is None:  # discarded after the event was queued
                continue
            try:
                r = pump._step(True)
            except Exception as exc:
                pump.error = exc
                r = FAILED
            if r == READ or r == YIELD:
                continue
            self.discard(pump)
            pump.result = r
            given_back.append(pump)
        return given_back

    def close(self):
        """Close the epoll set; pumps still in it are forgotten (their tasks are not woken)."""
        for pump in self.pumps.values():
            (<Pump>pump).hub_id = 0
        self.pumps.clear()
        if self.epfd >= 0:
            close(self.epfd)
            self.epfd = -1
