"""Incremental Server-Sent Events parsing and token-usage tracking for streamed responses.

The relay forwards every upstream body chunk to the client unchanged and also hands
it to a ``zaiproxy.request.usage.UsageTracker``, which only *observes* the stream through
this parser. That tracker is the pure-Python twin: by default the relay uses the native
scanner (``zaiproxy._native._relay``, chosen in ``zaiproxy.request.scanner``), which finds
lines and events by exactly these rules in C; tests/test_relay_native.py holds the two
equal. This parser sets the rules, and its design:

* Sans-I/O, like h11: :class:`SSEParser` turns bytes into :class:`SSEEvent` values and
  never touches a socket, so it is tested with plain byte strings.
* Chunk boundaries carry no meaning. An event, a line, a CRLF pair or a multi-byte
  UTF-8 character may be split anywhere; the result does not depend on where.
* It never raises on input. A malformed stream must not break the relay, so bad
  input is ignored the way the spec says, and an over-long line or event stops
  the parser (``overflowed``) instead of growing a buffer without bound.
* It is cheap per chunk. Lines are found with ``bytes.splitlines`` on the whole
  chunk (C speed, not a Python loop per byte), values are decoded once per event,
  and the tracker parses JSON only for the few events that can carry usage.

Parsing follows the WHATWG HTML Living Standard, section 9.2.6 "Interpreting an
event stream" (https://html.spec.whatwg.org/multipage/server-sent-events.html#event-stream-interpretation).
Two choices map the spec's browser-facing state onto :class:`SSEEvent`:

* ``event`` and ``id`` are ``None`` where the spec's buffer is the empty string.
  The spec treats the two as the same thing (an empty event type becomes
  "message"; ``id:`` with no value resets the last event ID).
* ``id`` is the *last event ID* when the event is dispatched. It persists across
  events until another ``id`` field replaces it, as ``MessageEvent.lastEventId``
  does. ``retry`` belongs to a single event: it is the value of the last valid
  ``retry`` field in that event's block (the spec just sets the connection's
  reconnection time).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeAlias

__all__ = ["Bytes", "SSEEvent", "SSEParser"]

# h11 hands out ``Data.data`` as a bytearray despite its ``bytes`` annotation.
Bytes: TypeAlias = bytes | bytearray | memoryview

_BOM = b"\xef\xbb\xbf"
_CR = 0x0D
_LF = 0x0A
# Chromium parses `retry` with ToUInt64Strict and ignores values that do not fit;
# doing the same keeps a huge digit string from costing a big-int conversion.
_MAX_RETRY = (1 << 64) - 1


@dataclass(frozen=True, slots=True)
class SSEEvent:
    """One dispatched event; see the module docstring for what ``None`` means."""

    event: str | None
    data: str
    id: str | None = None
    retry: int | None = None


class SSEParser:
    """An incremental event-stream parser: feed it bytes, get back completed events.

    Memory is bounded: a partial line is held only while it stays within
    ``max_line_bytes``, and one event's data buffer only while it stays within
    ``max_event_bytes`` (default: 4 * ``max_line_bytes``). Over either limit, the
    parser stops for good (``overflowed``) and drops what it buffered. It does
    this whatever the chunking, so the same stream always gives the same events.
    """

    __slots__ = (
        "_after_cr",
        "_at_start",
        "_closed",
        "_data",
        "_data_len",
        "_event",
        "_last_id",
        "_max_event",
        "_max_line",
        "_overflowed",
        "_partial_len",
        "_pending",
        "_pieces",
        "_retry",
    )

    def __init__(
        self, max_line_bytes: int = 1 << 20, *, max_event_bytes: int | None = None
    ) -> None:
        self._max_line = max_line_bytes
        self._max_event = 4 * max_line_bytes if max_event_bytes is None else max_event_bytes
        # A partial (unterminated) line is kept as a list of chunks and joined
        # once its end arrives: a long line fed in small pieces costs O(n), not O(n²).
        self._pieces: list[bytes] = []
        self._partial_len = 0
        self._at_start = True  # a BOM may still be coming
        self._after_cr = False  # the last line ended in CR, so an LF next is part of it
        self._data: list[bytes] = []  # data lines of the pending event, undecoded
        self._data_len = 0
        self._event = b""
        self._retry: int | None = None
        self._last_id: str | None = None
        self._pending = False  # a field line has arrived since the last blank line
        self._overflowed = False
        self._closed = False

    @property
    def at_event_boundary(self) -> bool:
        """No partial line is buffered, and no field has arrived since the last blank line.

        When this is true, bytes written next start a new event, so the relay can
        append its own event to the client stream without corrupting one.
        Comment lines do not count as fields. After overflow the position is
        unknown, so this is False.
        """
        return not (self._pieces or self._pending or self._overflowed)

    @property
    def overflowed(self) -> bool:
        """A line or an event went over its limit; the parser has stopped."""
        return self._overflowed

    @property
    def buffered_bytes(self) -> int:
        """Bytes held for a partial line and for the pending event's data."""
        return self._partial_len + self._data_len

    def feed(self, data: Bytes) -> list[SSEEvent]:
        """Add bytes from the stream; return the events they complete, in order."""
        if self._overflowed or self._closed or not data:
            return []
        if type(data) is not bytes:
            # Copy so that a buffered partial line can't change if the caller
            # reuses its buffer (and so memoryview gets `in` and `splitlines`).
            data = bytes(data)
        if self._at_start:
            data = self._strip_bom(data)
        if self._after_cr and data:
            # A CR was already taken as a line end: an LF right after it belongs
            # to the same CRLF, even when it arrives in the next chunk.
            self._after_cr = False
            if data[0] == _LF:
                data = data[1:]
        if not data:
            return []
        if b"\n" not in data and b"\r" not in data:
            self._pieces.append(data)
            self._partial_len += len(data)
            if self._partial_len > self._max_line:
                self._overflow()
            return []
        if self._pieces:
            self._pieces.append(data)
            data = b"".join(self._pieces)
            self._pieces = []
            self._partial_len = 0
        # bytes.splitlines splits on exactly the spec's three line ends (CRLF,
        # LF, CR), unlike str.splitlines, which also splits on \v, \f, \x1c, ...
        lines = data.splitlines()
        tail = None
        last = data[-1]
        if last == _CR:
            self._after_cr = True
        elif last != _LF:
            tail = lines.pop()
        events = self._process(lines)
        if tail is not None and not self._overflowed:
            if len(tail) > self._max_line:
                self._overflow()
            else:
                self._pieces.append(tail)
                self._partial_len = len(tail)
        return events

    def close(self) -> list[SSEEvent]:
        """End of stream. Per the spec, an unterminated event is discarded, not dispatched.

        The buffered state is left in place, so ``at_event_boundary`` still shows
        whether the stream ended cleanly. Later ``feed`` calls return nothing.
        """
        self._closed = True
        return []

    def _strip_bom(self, data: bytes) -> bytes:
        # While at the start, _pieces can only hold a strict prefix of the BOM.
        if self._pieces:
            data = b"".join(self._pieces) + data
            self._pieces = []
            self._partial_len = 0
        if len(data) < len(_BOM) and _BOM.startswith(data):
            self._pieces.append(data)
            self._partial_len = len(data)
            return b""
        self._at_start = False
        return data[len(_BOM) :] if data.startswith(_BOM) else data

    def _process(self, lines: list[bytes]) -> list[SSEEvent]:
        events: list[SSEEvent] = []
        max_line = self._max_line
        for line in lines:
            if not line:
                # A blank line dispatches. An event with an empty data buffer is
                # dropped, but its type and retry are reset all the same.
                if self._data:
                    events.append(
                        SSEEvent(
                            self._event.decode("utf-8", "replace") if self._event else None,
                            # UTF-8 never uses the LF byte inside a multi-byte
                            # sequence, so decoding the joined lines once is the
                            # same as decoding each line.
                            b"\n".join(self._data).decode("utf-8", "replace"),
                            self._last_id,
                            self._retry,
                        )
                    )
                    self._data = []
                    self._data_len = 0
                self._event = b""
                self._retry = None
                self._pending = False
                continue
            if len(line) > max_line:
                self._overflow()
                break
            colon = line.find(b":")
            if colon == 0:
                continue  # a comment
            self._pending = True
            if colon < 0:
                name, value = line, b""
            else:
                name = line[:colon]
                value = line[colon + 2 :] if line.startswith(b" ", colon + 1) else line[colon + 1 :]
            # Field names are compared as bytes: they are case-sensitive, and ':'
            # and the names are ASCII, which UTF-8 never uses inside a multi-byte
            # character.
            if name == b"data":
                self._data.append(value)
                self._data_len += len(value) + 1
                if self._data_len > self._max_event:
                    self._overflow()
                    break
            elif name == b"event":
                self._event = value
            elif name == b"id":
                if b"\x00" not in value:
                    self._last_id = value.decode("utf-8", "replace") or None
            # bytes.isdigit() is ASCII-only, as the spec requires, and it is False
            # for an empty value.
            elif name == b"retry" and value.isdigit() and len(value) <= 20:
                retry = int(value)
                if retry <= _MAX_RETRY:
                    self._retry = retry
            # Any other field name is ignored.
        return events

    def _overflow(self) -> None:
        self._overflowed = True
        self._pieces = []
        self._partial_len = 0
        self._data = []
        self._data_len = 0
