"""Structured JSON logs that never block the trio event loop.

One JSON object per line (orjson), to stderr by default::

    {"ts": "2026-11-27T18:40:38.123Z", "level": "info", "event": "request", "proc": "worker-1",
     "pid": 123, ...fields}

Design
------
* The caller formats, a thread writes. ``info(...)`` builds the line (orjson is fast and needs no
  I/O) and appends the bytes to a bounded deque (no lock, no wake-up of another thread per line).
  A daemon writer thread, waking every 50 ms (at once for warnings and errors), does the only
  blocking thing: one ``write`` to the stream per batch. A slow or stuck stderr (a full
  pipe to a log shipper) therefore costs the hot path nothing but dropped lines, which are counted
  in :attr:`Logger.dropped` instead of stalling every request on the worker (the same
  drop-and-count rule as the recorder channel).
* A level below the threshold costs one integer comparison; :meth:`Logger.enabled` lets hot
  paths skip building expensive fields at all.
* Keys never reach a log line: any field named like a credential (``authorization``,
  ``x-api-key``, ``api_key``, ``token``, ``*_key``, ``*_token``, ...) is replaced by
  ``"[redacted]"``, also inside dicts and header lists (h11 gives ``[(b"name", b"value")]``), as a
  second line of defence behind code that should not log them in the first place.
* One logger object per process. :func:`configure` changes it in place, so modules may keep
  ``log = get_logger()`` from import time and still get the configured level, ``proc`` and stream.
"""

from __future__ import annotations

import atexit
import functools
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from typing import BinaryIO, Final

import orjson

LEVELS: Final = {"debug": 10, "info": 20, "warning": 30, "error": 40}
_DEBUG: Final = 10
_INFO: Final = 20
_WARNING: Final = 30
_ERROR: Final = 40
REDACTED: Final = "[redacted]"
_RESERVED: Final = frozenset({"ts", "level", "event", "proc", "pid"})
_SECRET_NAMES: Final = frozenset(
    {
        "authorization",
        "proxy-authorization",
        "x-api-key",
        "api_key",
        "apikey",
        "token",
        "password",
        "secret",
        "cookie",
        "set-cookie",
    }
)
_PLAIN: Final = frozenset({str, int, float, bool, type(None)})  # nothing to scrub inside
_SCRUB_DEPTH: Final = 4  # nested containers deeper than this are logged as-is (no recursion bomb)


@functools.lru_cache(maxsize=1024)  # names are mostly code-defined; bounded for header dicts
def _is_secret_name(name: str) -> bool:
    n = name.lower()
    return n in _SECRET_NAMES or n.endswith(("_key", "_token", "-key", "-token"))


def _is_secret_key(key: object) -> bool:
    if isinstance(key, bytes):
        key = key.decode("latin-1")
    return isinstance(key, str) and _is_secret_name(key)


# Names seen to be neither a credential's nor the envelope's (``Logger.info_fields``):
# bounded like the ``_is_secret_name`` cache; names are code-defined.
_safe_names: set[str] = set()
_SAFE_NAMES_MAX: Final = 1024


def _unscrubbed(fields: Mapping[str, object]) -> bool:
    """Whether :func:`_scrub` and the renaming of reserved names would leave ``fields`` as
    they are: every name safe, every value plain or a dict of plain values under safe
    names. Safe names are remembered: the next check of one is a set lookup."""
    safe = _safe_names
    for name, value in fields.items():
        if name not in safe:
            if not isinstance(name, str) or name in _RESERVED or _is_secret_name(name):
                return False
            if len(safe) < _SAFE_NAMES_MAX:
                safe.add(name)
        if type(value) not in _PLAIN:
            if type(value) is not dict or not _unscrubbed(value):
                return False
            for inner in value.values():
                if type(inner) not in _PLAIN:
                    return False
    return True


def _scrub(value: object, depth: int = 0) -> object:
    """Redact credential-named entries inside mappings and (name, value) pair sequences.

    Sequences include h11's ``Headers``, whose str() would otherwise show raw header values.
    """
    if depth >= _SCRUB_DEPTH or type(value) in _PLAIN:
        return value
    if isinstance(value, Mapping):
        return {
            k: REDACTED if _is_secret_key(k) else _scrub(v, depth + 1) for k, v in value.items()
        }
    if isinstance(value, Sequence) and not isinstance(value, str | bytes | bytearray):
        out: list[object] = []
        for item in value:
            if isinstance(item, tuple) and len(item) == 2 and _is_secret_key(item[0]):
                out.append((item[0], REDACTED))
            else:
                out.append(_scrub(item, depth + 1))
        return out
    return value


def _default(value: object) -> object:
    """orjson fallback for values it cannot serialize."""
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).decode("utf-8", "backslashreplace")
    try:
        return str(value)
    except Exception:
        return f"<unprintable {type(value).__name__}>"


_OPTIONS: Final = orjson.OPT_APPEND_NEWLINE | orjson.OPT_NON_STR_KEYS


def _encodes(value: object) -> bool:
    try:
        orjson.dumps(value, default=_default, option=orjson.OPT_NON_STR_KEYS)
    except TypeError:
        return False
    return True

_ts_cache: tuple[int, str] = (-1, "")


def _timestamp(now: float) -> str:
    """ISO 8601 UTC with milliseconds; the seconds part is formatted once per second."""
    global _ts_cache
    sec = int(now)
    cached_sec, text = _ts_cache
    if sec != cached_sec:
        text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
        _ts_cache = (sec, text)  # one tuple assignment: safe to race between threads
    return f"{text}.{int((now - sec) * 1000):03d}Z"


class _Writer:
    """A bounded buffer of encoded lines and the daemon thread that writes them.

    The producer (a trio loop) only appends to a deque: no lock, no condition
    variable, and above all no wake-up of the writer thread per line. The
    writer wakes every ``interval`` (or at once for warnings, errors and
    flushes) and writes everything buffered in one write. Measured with one
    worker under load: waking the writer per line (queue.Queue) cost ~100 us
    per request in GIL hand-offs; this costs the append.
    """

    _STOP: Final = b""  # never a real line: every real line ends with a newline

    def __init__(self, stream: BinaryIO, queue_size: int, interval: float = 0.05) -> None:
        if queue_size < 1:
            raise ValueError("queue_size must be >= 1")
        self.stream = stream
        self.maxsize = queue_size
        self.interval = interval
        # Lines, plus flush markers (Events) and the stop sentinel, in order.
        self.items: deque[bytes | threading.Event] = deque()
        self.pending = 0  # lines in ``items``; only an approximate bound is needed
        self.wake = threading.Event()
        self.failed = 0  # lines lost to write errors (stream closed, EPIPE)
        self.thread = threading.Thread(target=self._run, name="zaiproxy-log-writer", daemon=True)
        self.thread.start()

    def put(self, line: bytes, urgent: bool = False) -> bool:
        """Buffer a line; False (dropped) when the buffer is full. Never blocks."""
        if self.pending >= self.maxsize:
            return False
        self.pending += 1
        self.items.append(line)
        if urgent:
            self.wake.set()
        return True

    def _run(self) -> None:
        while True:
            self.wake.wait(self.interval)
            self.wake.clear()
            batch: list[bytes] = []
            markers: list[threading.Event] = []
            stop = False
            while self.items:
                item = self.items.popleft()
                if isinstance(item, threading.Event):
                    # Everything before the marker must be written before it is set.
                    self._write(batch)
                    batch = []
                    markers.append(item)
                elif item == self._STOP:
                    stop = True
                    break
                else:
                    self.pending -= 1
                    batch.append(item)
            self._write(batch)
            for marker in markers:
                marker.set()
            if stop:
                return

    def _write(self, batch: list[bytes]) -> None:
        if not batch:
            return
        try:
            self.stream.write(b"".join(batch))
            self.stream.flush()
        except (OSError, ValueError):  # ValueError: write to a closed file
            # Nowhere left to report it; count it so the loss is visible in Logger.dropped.
            self.failed += len(batch)

    def flush(self, timeout: float) -> bool:
        """Wait until everything buffered before this call is written; False on timeout."""
        marker = threading.Event()
        self.items.append(marker)
        self.wake.set()
        return marker.wait(timeout)

    def close(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        if not self.flush(timeout):
            return  # a stuck stream: leave the daemon thread behind rather than hang
        self.items.append(self._STOP)
        self.wake.set()
        self.thread.join(max(0.0, deadline - time.monotonic()))


def _default_stream() -> BinaryIO:
    return sys.stderr.buffer


class Logger:
    """Process-wide structured logger; see the module docstring."""

    def __init__(
        self,
        level: str = "info",
        *,
        proc: str = "main",
        stream: BinaryIO | None = None,
        queue_size: int = 10000,
    ) -> None:
        self._threshold = _level_number(level)
        self._proc = proc
        self._pid = os.getpid()
        self._writer = _Writer(stream if stream is not None else _default_stream(), queue_size)
        self._dropped = 0

    @property
    def dropped(self) -> int:
        """Lines lost: the queue was full (or, rarely, the stream write failed)."""
        return self._dropped + self._writer.failed

    def enabled(self, level: str) -> bool:
        """Whether a line at ``level`` would be written (skip building fields when not)."""
        return LEVELS[level] >= self._threshold

    def debug(self, event: str, **fields: object) -> None:
        if self._threshold <= _DEBUG:
            self._emit("debug", event, fields)

    def info(self, event: str, **fields: object) -> None:
        if self._threshold <= _INFO:
            self._emit("info", event, fields)

    def warning(self, event: str, **fields: object) -> None:
        if self._threshold <= _WARNING:
            self._emit("warning", event, fields)

    def error(self, event: str, **fields: object) -> None:
        if self._threshold <= _ERROR:
            self._emit("error", event, fields)

    def info_fields(self, event: str, fields: dict[str, object]) -> None:
        """``info(event, **fields)`` for a dict of code-built fields: the same bytes, cheaper.

        For the access log (one line per request): the caller's dict is not unpacked into
        keyword arguments and rebuilt field by field; when scrubbing would change nothing
        (:func:`_unscrubbed`: safe names, plain values or a dict of them, as the request
        record's are) the line is the envelope and the fields in one ``orjson.dumps``.
        Anything else (a credential's name, a header list, a value orjson refuses) takes
        :meth:`_emit`'s path, so the bytes are those ``info`` would write.
        """
        if self._threshold > _INFO:
            return
        if not _unscrubbed(fields):
            self._emit("info", event, fields)
            return
        try:
            line = orjson.dumps({"ts": _timestamp(time.time()), "level": "info", "event": event,
                                 "proc": self._proc, "pid": self._pid, **fields},
                                default=_default, option=_OPTIONS)
        except TypeError:
            self._emit("info", event, fields)
            return
        if not self._writer.put(line):
            self._dropped += 1

    def _emit(self, level: str, event: str, fields: dict[str, object]) -> None:
        record: dict[str, object] = {
            "ts": _timestamp(time.time()),
            "level": level,
            "event": event,
            "proc": self._proc,
            "pid": self._pid,
        }
        for name, value in fields.items():
            if _is_secret_name(name):
                value = REDACTED
            elif type(value) not in _PLAIN:
                value = _scrub(value)
            # A field may not overwrite the envelope; keep it under a prefixed name instead.
            record["_" + name if name in _RESERVED else name] = value
        try:
            line = orjson.dumps(record, default=_default, option=_OPTIONS)
        except TypeError:  # orjson.JSONEncodeError is a TypeError
            # E.g. an int beyond 64 bits, which orjson rejects without calling `default`:
            # stringify just the fields that fail, keep the rest typed.
            line = orjson.dumps(
                {k: v if k in _RESERVED or _encodes(v) else _default(v) for k, v in record.items()},
                default=_default,
                option=_OPTIONS,
            )
        if not self._writer.put(line, urgent=level in ("warning", "error")):
            self._dropped += 1  # not atomic across threads; a near-exact count is enough

    def flush(self, timeout: float = 2.0) -> None:
        """Block until queued lines are written or ``timeout`` passes. Not for the event loop."""
        self._writer.flush(timeout)

    def close(self, timeout: float = 2.0) -> None:
        """Flush and stop the writer thread (tests; :func:`configure` does it on reconfigure)."""
        self._writer.close(timeout)

    def _reconfigure(self, level: str, proc: str, stream: BinaryIO, queue_size: int) -> None:
        threshold = _level_number(level)
        new_writer = _Writer(stream, queue_size)
        old_writer, self._writer = self._writer, new_writer
        self._threshold, self._proc, self._pid = threshold, proc, os.getpid()
        self._dropped += old_writer.failed
        old_writer.close(timeout=2.0)


def _level_number(level: str) -> int:
    try:
        return LEVELS[level.lower()]
    except KeyError:
        raise ValueError(f"unknown log level {level!r}: expected one of {', '.join(LEVELS)}") from None


_logger: Logger | None = None
_lock = threading.Lock()
_atexit_registered = False


def _flush_at_exit() -> None:
    if _logger is not None:
        _logger.flush()


def configure(
    level: str = "info",
    *,
    proc: str = "main",
    stream: BinaryIO | None = None,
    queue_size: int = 10000,
) -> None:
    """Set up the process-wide logger (call once per process, early, before the trio loop).

    Reconfiguring keeps the same :class:`Logger` object, so references taken with
    :func:`get_logger` before this call see the new settings.
    """
    global _logger, _atexit_registered
    out = stream if stream is not None else _default_stream()
    with _lock:
        if _logger is None:
            _logger = Logger(level, proc=proc, stream=out, queue_size=queue_size)
        else:
            _logger._reconfigure(level, proc, out, queue_size)
        if not _atexit_registered:
            atexit.register(_flush_at_exit)
            _atexit_registered = True


def get_logger() -> Logger:
    """The process-wide logger (info level to stderr until :func:`configure` is called)."""
    global _logger, _atexit_registered
    if _logger is None:
        with _lock:
            if _logger is None:
                _logger = Logger()
                if not _atexit_registered:
                    atexit.register(_flush_at_exit)
                    _atexit_registered = True
    return _logger
