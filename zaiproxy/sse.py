"""Incremental Server-Sent Events parsing and token-usage tracking for streamed responses.

The relay forwards every upstream body chunk to the client unchanged and also hands
it to a :class:`UsageTracker`, which only *observes* the stream. That sets the design:

* Sans-I/O, like h11: :class:`SSEParser` turns bytes into :class:`SSEEvent` values and
  never touches a socket, so it is tested with plain byte strings.
* Chunk boundaries carry no meaning. An event, a line, a CRLF pair or a multi-byte
  UTF-8 character may be split anywhere; the result does not depend on where.
* It never raises on input. A malformed stream must not break the relay, so bad
  input is ignored the way the spec says, and an over-long line or event stops
  the parser (``overflowed``) instead of growing a buffer without bound.
* It is cheap per chunk. Lines are found with ``bytes.splitlines`` on the whole
  chunk (C speed, not a Python loop per byte), values are decoded once per event,
  and JSON is parsed only for the few events that can carry usage. Delta events
  are only held, unparsed, in case the stream ends without usage (then they are
  counted; see :class:`UsageTracker`).

The module also holds the ``stream_options.include_usage`` rewrite for OpenAI-style
upstreams: :func:`add_include_usage` for the request and
:class:`UsageChunkStripper`, which takes the usage chunk the client did not ask
for back out of the relayed bytes.

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

import re
import unicodedata
from dataclasses import dataclass, replace
from typing import Any, Literal, TypeAlias

import orjson

from zaiproxy.tokens import count_text

__all__ = [
    "SSEEvent",
    "SSEParser",
    "StreamUsage",
    "Usage",
    "UsageChunkStripper",
    "UsageTracker",
    "add_include_usage",
    "usage_from_body",
]

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


@dataclass(frozen=True, slots=True)
class Usage:
    """Token counts for one response, in the Anthropic vocabulary."""

    input_tokens: int
    output_tokens: int
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0


@dataclass(frozen=True, slots=True)
class StreamUsage:
    """The usage of one streamed response, and how much of it the upstream reported.

    ``estimated``: ``output_tokens`` were counted here from the streamed deltas,
    because no final count came from upstream (it sends none, or the stream was
    cut first). ``input_reported``: the input and cache counts come from the
    upstream (Anthropic's ``message_start``); when False they are 0 and the caller
    fills in its prompt estimate (:meth:`with_input`).
    """

    usage: Usage
    estimated: bool
    input_reported: bool

    def with_input(self, prompt_tokens: int) -> Usage:
        """The usage, with ``prompt_tokens`` as input when the upstream reported none."""
        if self.input_reported:
            return self.usage
        return replace(self.usage, input_tokens=prompt_tokens)


class UsageTracker:
    """Feeds an SSE response body of one API flavour and keeps its final usage.

    ``usage`` is only ever what the upstream reported (the latest report; counts
    are cumulative, never summed). For streams that end without a final report,
    the tracker also counts the output text itself (``count_deltas``): OpenAI
    ``choices[].delta`` content, reasoning content, refusals and tool-call
    names/arguments, and legacy ``choices[].text``; Anthropic ``text``,
    ``thinking`` and ``partial_json`` deltas and tool names. That costs one list
    append per event: the raw ``data`` of delta events is held, undecoded, and
    dropped unparsed as soon as the upstream's final usage arrives. Only when the
    held data passes ``max_pending_bytes`` is it parsed and counted on the spot,
    keeping only a running count. :meth:`output_estimate` and
    :meth:`usage_estimated` count whatever is still held; ``pending_bytes`` tells
    the caller whether that is big enough to do in a thread
    (:func:`zaiproxy.tokens.stream_usage` does exactly that).

    The text of all deltas is counted as one string, as the model produced it,
    not delta by delta: a word split over two deltas is one token, not two. The
    running count is exact too, because each flush stops at a point where the
    tokenizer's pre-split puts a boundary whatever follows (:func:`_safe_cut`).
    """

    __slots__ = (
        "_api",
        "_carry",
        "_carry_tokens",
        "_collect",
        "_counted",
        "_fields",
        "_final",
        "_max_pending",
        "_parser",
        "_pending",
        "_pending_bytes",
        "done",
        "error",
        "events",
        "usage",
    )

    def __init__(
        self,
        api: Literal["openai", "anthropic"],
        *,
        count_deltas: bool = True,
        max_pending_bytes: int = 256 * 1024,
    ) -> None:
        if api not in ("openai", "anthropic"):
            raise ValueError(f"api must be 'openai' or 'anthropic', not {api!r}")
        self._api = api
        self._parser = SSEParser()
        # The merged Anthropic counts (input, output, cache read, cache write).
        self._fields: list[int | None] = [None, None, None, None]
        self.usage: Usage | None = None
        self.events = 0
        self.done = False
        self.error = False
        self._final = False  # the upstream reported its output count
        self._collect = count_deltas
        self._max_pending = max_pending_bytes
        self._pending: list[str] = []  # raw data of delta events, not yet parsed
        self._pending_bytes = 0
        self._carry = ""  # delta text parsed but not yet counted (the tail after a cut)
        self._carry_tokens: int | None = 0
        self._counted = 0  # tokens of the delta text before the carry

    @property
    def at_event_boundary(self) -> bool:
        return self._parser.at_event_boundary

    @property
    def overflowed(self) -> bool:
        return self._parser.overflowed

    @property
    def pending_bytes(self) -> int:
        """Characters of delta data held but not yet counted (~bytes: SSE JSON is mostly ASCII)."""
        return self._pending_bytes + len(self._carry)

    def feed(self, data: Bytes) -> None:
        for event in self._parser.feed(data):
            self.events += 1
            if self._api == "openai":
                self._on_openai(event)
            else:
                self._on_anthropic(event)

    def close(self) -> None:
        self._parser.close()

    def output_estimate(self) -> int:
        """Output tokens counted from the deltas so far (counting what is still held).

        Collection stops once the upstream reports its final usage, so after that
        this is the count of the deltas before it. 0 with ``count_deltas=False``.
        """
        if self._pending:
            self._flush()
        if self._carry_tokens is None:
            self._carry_tokens = count_text(self._carry)
        return self._counted + self._carry_tokens

    def usage_estimated(self) -> StreamUsage | None:
        """The upstream's final usage if it came, else the output counted from the deltas.

        None when there is nothing to go on: no event and no usage at all (a
        stream cut before its first event, or not SSE of this API).
        """
        usage = self.usage
        if self._final and usage is not None:
            return StreamUsage(usage, estimated=False, input_reported=True)
        if usage is None and self.events == 0:
            return None
        output = self.output_estimate()
        # Anthropic reports input in message_start; Z.AI sends zeros there.
        if usage is not None and usage.input_tokens > 0:
            return StreamUsage(replace(usage, output_tokens=output), True, True)
        return StreamUsage(Usage(0, output), estimated=True, input_reported=False)

    def _hold(self, data: str) -> None:
        self._pending.append(data)
        self._pending_bytes += len(data)
        if self._pending_bytes > self._max_pending:
            self._flush()

    def _flush(self) -> None:
        """Parse the held events; count their text up to the last safe cut."""
        parts = [self._carry]
        extract = _openai_texts if self._api == "openai" else _anthropic_texts
        for data in self._pending:
            extract(_loads(data), parts)
        self._pending = []
        self._pending_bytes = 0
        text = "".join(parts)
        cut = _safe_cut(text)
        if cut:
            self._counted += count_text(text[:cut])
        self._carry = text[cut:]
        self._carry_tokens = None

    def _set_final(self) -> None:
        self._final = True
        self._collect = False
        self._pending = []
        self._pending_bytes = 0

    def _on_openai(self, event: SSEEvent) -> None:
        data = event.data
        if data == "[DONE]":
            self.done = True
            return
        if event.event == "error":
            self.error = True
        # With stream_options.include_usage, OpenAI puts `"usage":null` on every
        # chunk, so a bare substring test would parse every delta.
        has_usage = _has_non_null(data, '"usage"')
        has_error = '"error"' in data
        if not (has_usage or has_error):
            if self._collect:
                self._hold(data)
            return
        obj = _loads(data)
        if not isinstance(obj, dict):
            return
        if has_error and obj.get("error") is not None:
            self.error = True
        if has_usage:
            # Each usage chunk carries the totals so far: the latest replaces.
            raw = obj.get("usage")
            usage = _openai_usage(raw)
            if usage is not None:
                self.usage = usage
                if _count(raw, "completion_tokens") is not None:
                    self._set_final()
        if self._collect:
            self._hold(data)  # Z.AI puts usage on a chunk with a delta; rare enough to reparse

    def _on_anthropic(self, event: SSEEvent) -> None:
        kind = event.event
        if kind == "content_block_delta":
            if self._collect:
                self._hold(event.data)
        elif kind == "message_start":
            obj = _loads(event.data)
            message = obj.get("message") if isinstance(obj, dict) else None
            self._fields = [None, None, None, None]
            self._merge(message.get("usage") if isinstance(message, dict) else None)
        elif kind == "content_block_start":
            if self._collect:
                self._hold(event.data)  # a tool_use block's name is output too
        elif kind == "message_delta":
            if '"usage"' in event.data:
                obj = _loads(event.data)
                if self._merge(obj.get("usage") if isinstance(obj, dict) else None):
                    self._set_final()
        elif kind == "message_stop":
            self.done = True
        elif kind == "error":
            self.error = True

    def _merge(self, usage: object) -> bool:
        """Merge a usage object; return whether it carried an output count."""
        # output_tokens in message_delta is cumulative, and Z.AI also puts the
        # final input and cache counts there. A later non-null count overrides.
        fields = _anthropic_fields(usage)
        for i, value in enumerate(fields):
            if value is not None:
                self._fields[i] = value
        if any(value is not None for value in self._fields):
            inp, out, read, write = (value or 0 for value in self._fields)
            self.usage = Usage(inp, out, read, write)
        return fields[1] is not None


def _openai_texts(obj: object, out: list[str]) -> None:
    """Append the output text of an OpenAI chunk (chat or legacy completions) to ``out``."""
    choices = obj.get("choices") if isinstance(obj, dict) else None
    if not isinstance(choices, list):
        return
    for choice in choices:
        if not isinstance(choice, dict):
            continue
        text = choice.get("text")  # legacy /v1/completions
        if isinstance(text, str):
            out.append(text)
        delta = choice.get("delta")
        if not isinstance(delta, dict):
            continue
        # reasoning_content: Z.AI (GLM) and DeepSeek; billed as output tokens.
        for key in ("reasoning_content", "content", "refusal"):
            value = delta.get(key)
            if isinstance(value, str):
                out.append(value)
        calls = delta.get("tool_calls")
        if isinstance(calls, list):
            for call in calls:
                function = call.get("function") if isinstance(call, dict) else None
                if isinstance(function, dict):
                    for key in ("name", "arguments"):
                        value = function.get(key)
                        if isinstance(value, str):
                            out.append(value)


def _anthropic_texts(obj: object, out: list[str]) -> None:
    """Append the output text of a content_block_delta or content_block_start to ``out``."""
    if not isinstance(obj, dict):
        return
    block = obj.get("delta")
    if not isinstance(block, dict):
        block = obj.get("content_block")  # content_block_start
        if not isinstance(block, dict):
            return
    # text_delta.text, thinking_delta.thinking, input_json_delta.partial_json,
    # and a starting block's text, thinking or tool name. Signatures are not output.
    for key in ("text", "thinking", "partial_json", "name"):
        value = block.get(key)
        if isinstance(value, str):
            out.append(value)


# A flush may not count its text's tail if that tail could still merge with the
# text of later deltas; past this many characters without a safe cut (CJK text
# has no spaces), the tail is counted anyway, off by at most a token there.
_MAX_CARRY = 4096


def _safe_cut(text: str) -> int:
    """The end of the longest prefix whose tokens are the same whatever text follows.

    cl100k splits text into pieces with a regex before BPE, and tokens never
    cross pieces. The pieces that can hold a letter or a digit are possessive
    runs (letters with one optional leading non-letter, or 1-3 digits) or
    contractions, and none of them looks past its end except to stop. So a letter
    followed by a non-letter, or a digit followed by a non-digit, always ends a
    piece, in the full text as in the prefix, and the text after it splits the
    same on its own: count(text[:k]) + count(text[k:]) == count(text).
    """
    stop = max(0, len(text) - _MAX_CARRY)
    category = unicodedata.category
    for k in range(len(text) - 1, stop, -1):
        before = category(text[k - 1])[0]
        if before in "LN" and category(text[k])[0] != before:
            return k
    return len(text) if stop else 0


def usage_from_body(api: Literal["openai", "anthropic"], body: bytes) -> Usage | None:
    """Usage from a non-streaming JSON response body; None if absent or the body is not JSON."""
    obj = _loads(body)
    if not isinstance(obj, dict):
        return None
    if api == "openai":
        return _openai_usage(obj.get("usage"))
    usage = obj.get("usage")
    if usage is None and "input_tokens" in obj:
        usage = obj  # /v1/messages/count_tokens answers {"input_tokens": N}
    fields = _anthropic_fields(usage)
    if all(value is None for value in fields):
        return None
    inp, out, read, write = (value or 0 for value in fields)
    return Usage(inp, out, read, write)


def _loads(data: str | Bytes) -> Any:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return None


def _count(obj: object, key: str) -> int | None:
    """A token count: a non-negative int (bools, floats and strings don't count)."""
    if not isinstance(obj, dict):
        return None
    value = obj.get(key)
    return value if type(value) is int and value >= 0 else None


def _openai_usage(usage: object) -> Usage | None:
    if not isinstance(usage, dict):
        return None
    inp = _count(usage, "prompt_tokens")
    out = _count(usage, "completion_tokens")
    read = _count(usage.get("prompt_tokens_details"), "cached_tokens")
    if inp is None and out is None and read is None:
        return None
    return Usage(inp or 0, out or 0, read or 0)


def _anthropic_fields(usage: object) -> tuple[int | None, int | None, int | None, int | None]:
    return (
        _count(usage, "input_tokens"),
        _count(usage, "output_tokens"),
        _count(usage, "cache_read_input_tokens"),
        _count(usage, "cache_creation_input_tokens"),
    )


def _has_non_null(data: str, key: str) -> bool:
    """Whether `data` may hold `key` with a value other than null.

    Errs toward True: a false positive costs one JSON parse, a false negative
    would lose usage.
    """
    start = data.find(key)
    while start >= 0:
        end = start + len(key)
        # Look a short way ahead only; if whitespace fills the window, we can't
        # tell, so say True.
        rest = data[end : end + 24].lstrip(" \t\r\n")
        if rest.startswith(":"):
            if not rest[1:].lstrip(" \t\r\n").startswith("null"):
                return True
        elif not rest:
            return True
        # Otherwise `key` is a string value (e.g. "type":"usage"), not a key.
        start = data.find(key, end)
    return False


# --- stream_options.include_usage -----------------------------------------------------------


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
    if _LONG_DIGITS.search(body) and _has_big_float(obj, 0):
        return None  # orjson reads integers past 64 bits as floats: re-serialising would change them
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
        if self._mode == _HOLD and self._may_be_usage() and _is_usage_chunk(held):
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


def _is_usage_chunk(event: bytearray) -> bool:
    line = event.splitlines()[0]
    obj = _loads(line[6:] if line.startswith(b" ", 5) else line[5:])
    return isinstance(obj, dict) and obj.get("choices") == [] and obj.get("usage") is not None
