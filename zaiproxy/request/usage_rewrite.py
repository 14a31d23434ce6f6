"""``stream_options.include_usage`` for OpenAI-style upstreams that send stream usage only
when asked: :func:`add_include_usage` rewrites the request, and
:class:`UsageChunkStripper` takes the extra usage chunk back out of the bytes
relayed to a client that did not ask for it (every other byte unchanged).
"""

from __future__ import annotations

import re
from typing import Any

import orjson

from zaiproxy.http.sse import Bytes

__all__ = ["UsageChunkStripper", "add_include_usage", "is_usage_chunk", "reserialisable"]

_LF = 0x0A


def _loads(data: Bytes) -> Any:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return None


def add_include_usage(body: bytes) -> bytes | None:
    """The request body with ``"stream_options":{"include_usage":true}``, or None if unchanged.

    For OpenAI-style upstreams that send usage in a stream only when asked.
    Changed only for a JSON object with ``"stream": true`` and ``messages`` (chat)
    or ``prompt`` (legacy completions) whose ``stream_options`` lacks
    ``include_usage: true``. A non-null ``stream_options`` that is not an object
    is left for the upstream to reject. Other fields keep their values and order
    (orjson keeps insertion order; a new ``stream_options`` goes last, an
    existing one keeps its place and its other keys). When this returns a body,
    the client did not ask for the usage chunk: relay the response through a
    :class:`UsageChunkStripper`.
    """
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(obj, dict) or obj.get("stream") is not True:
        return None
    if "messages" not in obj and "prompt" not in obj:
        return None  # not chat/completions (the Responses API rejects stream_options)
    if not reserialisable(body, obj):
        return None
    options = obj.get("stream_options")
    if options is None:
        obj["stream_options"] = {"include_usage": True}
    elif isinstance(options, dict):
        if options.get("include_usage") is True:
            return None
        options["include_usage"] = True
    else:
        return None
    return orjson.dumps(obj)


_LONG_DIGITS = re.compile(rb"\d{19}")


def reserialisable(body: bytes, obj: object) -> bool:
    """Whether ``orjson.dumps(obj)`` keeps every number of ``body``, which ``obj`` was parsed
    from: orjson reads integers past 64 bits as floats, and re-serialising would change them."""
    return not (_LONG_DIGITS.search(body) and _has_big_float(obj, 0))


def _has_big_float(value: object, depth: int) -> bool:
    if isinstance(value, float):
        return abs(value) >= 2.0**63
    if depth > 1100:  # deeper than orjson parses
        return True
    if isinstance(value, dict):
        return any(_has_big_float(v, depth + 1) for v in value.values())
    if isinstance(value, list):
        return any(_has_big_float(v, depth + 1) for v in value)
    return False


# The chunk has a non-empty (or non-array) "choices": it is not the usage chunk.
_CHOICES_NOT_EMPTY = re.compile(rb'"choices"\s*:\s*(?:[^\s\[]|\[\s*[^\s\]])')
_START, _HOLD, _PASS = 0, 1, 2
_LBRACE = ord("{")


class UsageChunkStripper:
    """Removes the usage chunk that ``include_usage`` adds from a relayed OpenAI SSE stream.

    That chunk is an event made of one ``data:`` line whose JSON object has
    ``"choices": []`` and a non-null ``usage``; it goes, with its blank line. Every
    other byte passes through unchanged and at once: ``feed`` returns all it was
    given except the start of an event that may still turn out to be that chunk
    (a ``data: {`` line in which no non-empty ``choices`` has shown yet, at most
    ``max_event_bytes``). Works on bytes, so chunk boundaries, line ends (LF,
    CRLF, CR, even a CRLF split over two feeds) and UTF-8 are never disturbed;
    the result does not depend on how the stream was split. The
    :class:`UsageTracker` is fed the upstream's bytes, before this filter.
    """

    __slots__ = ("_after_cr", "_drop_lf", "_held", "_line_start", "_max", "_mode", "stripped")

    def __init__(self, max_event_bytes: int = 8192) -> None:
        # OpenAI's usage chunk is ~0.5 KB; anything much bigger is something else.
        self._max = max_event_bytes
        self._held = bytearray()
        self._mode = _START
        self._line_start = True
        self._after_cr = False  # the last byte was a CR: an LF next belongs to it
        self._drop_lf = False  # ... and that CR ended a dropped event
        self.stripped = 0

    def feed(self, data: Bytes) -> bytes:
        """Bytes to send on for this chunk of the upstream stream."""
        if not data:
            return b""  # nothing to see, and the CR/LF state must carry over unchanged
        data = bytes(data)
        out = bytearray()
        i, n = 0, len(data)
        if self._after_cr and n:
            self._after_cr = False
            if data[0] == _LF:
                i = 1
                if self._mode == _HOLD:
                    self._held += b"\n"
                elif not self._drop_lf:
                    out += b"\n"
        self._drop_lf = False
        while i < n:
            lf = data.find(b"\n", i)
            cr = data.find(b"\r", i, lf if lf >= 0 else n)
            j = cr if cr >= 0 else lf
            if j < 0:
                self._take(data[i:], out)
                self._line_start = False
                break
            end = j + 1
            if cr >= 0:
                if end == n:
                    self._after_cr = True
                elif data[end] == _LF:
                    end += 1
            blank = self._line_start and j == i
            self._line_start = True
            if not blank:
                self._take(data[i:end], out)
            elif self._mode == _START:
                out += data[i:end]  # a blank line outside any event
            else:
                self._end_event(data[i:end], out)
            i = end
        return bytes(out)

    def close(self) -> bytes:
        """End of stream: an unterminated event is not an event; its bytes go out as they are."""
        held = bytes(self._held)
        self._held.clear()
        self._mode = _START
        return held

    def _take(self, piece: bytes, out: bytearray) -> None:
        if self._mode == _START:
            self._mode = _HOLD
        if self._mode == _PASS:
            out += piece
            return
        held = self._held
        held += piece
        if not self._may_be_usage():
            out += held
            held.clear()
            self._mode = _PASS

    def _end_event(self, blank: bytes, out: bytearray) -> None:
        held = self._held
        held += blank
        if self._mode == _HOLD and self._may_be_usage() and is_usage_chunk(held):
            self.stripped += 1
            self._drop_lf = self._after_cr
        else:
            out += held
        held.clear()
        self._mode = _START

    def _may_be_usage(self) -> bool:
        """Whether the held event could still be the usage chunk.

        Every test here only ever turns False as bytes are added, so deciding on a
        prefix gives the same answer as deciding on the whole event.
        """
        held = self._held
        if len(held) > self._max:
            return False
        if not held.startswith(b"data:"):
            return b"data:".startswith(held)
        start = 6 if held.startswith(b" ", 5) else 5
        if len(held) > start and held[start] != _LBRACE:
            return False
        lines = held.splitlines()
        if any(lines[1:]):
            return False  # more than one line: not OpenAI's chunk
        return _CHOICES_NOT_EMPTY.search(held) is None


def is_usage_chunk(event: bytes | bytearray) -> bool:
    """Whether a held event (one ``data:`` line and its blank line, which
    ``_may_be_usage`` let through) is the usage chunk: ``"choices": []`` and a usage.
    The native scanner asks this too, for the same few events."""
    line = event.splitlines()[0]
    obj = _loads(line[6:] if line.startswith(b" ", 5) else line[5:])
    return isinstance(obj, dict) and obj.get("choices") == [] and obj.get("usage") is not None
