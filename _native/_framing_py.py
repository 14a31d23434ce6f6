"""The pure-Python twin of ``zaiproxy._native._framing``: the same decoder, byte for byte.

The upstream side (``zaiproxy.upstream.pool``) lets h11 parse a response head and then
decodes a chunked body here instead of through h11's reader on every read (de-chunking in
h11 was ~7.4 µs of a paced SSE event's CPU). It accepts exactly the chunk framing h11
accepts and rejects what h11 rejects:

- a chunk-size line is ``1*20 HEXDIG``, then either ``;`` and anything but a bare LF (the
  extension, discarded) or ``[ \\t]*``, ended by the first CRLF (h11's ``chunk_header``);
- chunk data is followed by exactly CRLF (h11's "malformed chunk footer");
- a chunk-size line still incomplete when a read has been decoded may not exceed
  ``max_line`` bytes (h11's ``max_incomplete_event_size``: "Receive buffer too long").

A bad line is refused as soon as a byte proves it bad; h11 waits for its CRLF. The verdict is
the same (a line that can never become valid is refused either way, by h11 at the latest
when the body is cut short).

The last chunk (size 0) is not decoded here: :attr:`Dechunker.tail` is then the raw bytes
from the start of its size line to the end of the read, and the caller hands them to h11,
whose chunked reader is still at the start of the body. h11 reads that last chunk and the
trailers itself (its own header rules and limits), returns ``EndOfMessage`` and moves the
connection to ``DONE``; whatever followed the message stays in h11's buffer, as it always
did. Sizes of more than 64 bits (h11 takes 20 hex digits) saturate: such a chunk never ends.
"""

from __future__ import annotations

IMPLEMENTATION = "python"

_LINE, _WS, _EXT, _LF, _DATA, _FOOT_CR, _FOOT_LF, _END = range(8)
_HEX = {c: int(chr(c), 16) for c in b"0123456789abcdefABCDEF"}
_SATURATED = (1 << 64) - 1


class FramingError(ValueError):
    """The chunked framing is one that h11 refuses; ``str()`` says how."""


class Dechunker:
    """Decodes one chunked body, read by read, until its last chunk."""

    __slots__ = ("_digits", "_line", "_max_line", "_remaining", "_state", "_value", "tail")

    def __init__(self, max_line: int = 65536) -> None:
        self._max_line = max_line
        self._state = _LINE
        self._digits = 0
        self._value = 0
        self._remaining = 0
        self._line = b""  # the raw bytes of a size line begun in an earlier read
        self.tail = b""

    @property
    def ended(self) -> bool:
        """The last chunk's size line was read: :attr:`tail` goes to h11."""
        return self._state == _END

    def feed(self, data: bytes) -> bytes:
        """The body bytes in ``data`` (``data`` itself when it is all chunk data)."""
        if self._state == _END:
            raise FramingError("the last chunk was already read")
        n = len(data)
        parts: list[bytes] = []
        i = 0
        line_start = 0
        state = self._state
        while i < n:
            if state == _DATA:
                take = min(self._remaining, n - i)
                if take == n:
                    self._remaining -= take
                    if self._remaining == 0:
                        self._state = _FOOT_CR
                    return data
                parts.append(data[i:i + take])
                i += take
                self._remaining -= take
                if self._remaining == 0:
                    state = _FOOT_CR
                continue
            c = data[i]
            i += 1
            if state == _FOOT_CR:
                if c != 13:
                    raise FramingError(f"malformed chunk footer: {bytes([c])!r} (expected b'\\r\\n')")
                state = _FOOT_LF
            elif state == _FOOT_LF:
                if c != 10:
                    raise FramingError(f"malformed chunk footer: {bytes([c])!r} (expected b'\\n')")
                state = _LINE
                line_start = i
                self._line = b""
            elif state == _LINE:
                digit = _HEX.get(c)
                if digit is not None:
                    self._digits += 1
                    if self._digits > 20:
                        raise FramingError("illegal chunk header: more than 20 hex digits")
                    self._value = min(self._value * 16 + digit, _SATURATED)
                    continue
                if self._digits == 0:
                    raise FramingError(f"illegal chunk header: {bytes([c])!r} is not a hex digit")
                if c == 59:  # ;
                    state = _EXT
                elif c in (32, 9):
                    state = _WS
                elif c == 13:
                    state = _LF
                else:
                    raise FramingError(f"illegal chunk header: unexpected {bytes([c])!r}")
            elif state == _WS:
                if c == 13:
                    state = _LF
                elif c not in (32, 9):
                    raise FramingError(f"illegal chunk header: unexpected {bytes([c])!r}")
            elif state == _EXT:
                if c == 10:
                    prev = data[i - 2] if i >= 2 else (self._line[-1] if self._line else -1)
                    if prev != 13:
                        raise FramingError("illegal chunk header: a bare LF in its extension")
                    state = self._line_done(data, line_start, i)
                    if state == _END:
                        return b"".join(parts)
                # any other byte, CR included, belongs to the extension
            else:  # _LF: a CR outside an extension must end the line
                if c != 10:
                    raise FramingError("illegal chunk header: a CR not followed by LF")
                state = self._line_done(data, line_start, i)
                if state == _END:
                    return b"".join(parts)
        self._state = state
        if state in (_LINE, _WS, _EXT, _LF):
            self._line += data[line_start:]
            if len(self._line) > self._max_line:
                raise FramingError("chunk size line too long (Receive buffer too long)")
        return b"".join(parts)

    def _line_done(self, data: bytes, line_start: int, end: int) -> int:
        """A size line ended at ``data[end]``; the next state."""
        value = self._value
        self._digits = 0
        self._value = 0
        if value == 0:
            self.tail = self._line + data[line_start:]
            self._line = b""
            self._state = _END
            return _END
        self._line = b""
        self._remaining = value
        return _DATA


def frame_chunk(data: bytes | bytearray | memoryview) -> bytes:
    """``data`` (any bytes-like) as one chunk: hex size, CRLF, data, CRLF (h11's
    ChunkedWriter); b"" for b""."""
    return b"%x\r\n%b\r\n" % (len(data), bytes(data)) if data else b""
