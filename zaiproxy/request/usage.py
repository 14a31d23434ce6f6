"""Token usage of one response: what the upstream reported, else what was streamed.

:class:`UsageTracker` observes a relayed SSE body through
:class:`~zaiproxy.http.sse.SSEParser` and keeps the upstream's latest usage report
(cumulative counts: the latest replaces, never summed). For streams that end
without one, it holds the delta events' raw data (unparsed: one list append per
event) and counts their text with tiktoken at the end, or in bounded batches
when they pile up. :func:`usage_from_body` reads a non-streaming JSON body.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass, replace
from typing import Any, Literal, Protocol

import orjson

from zaiproxy.core.record import Usage
from zaiproxy.http.sse import Bytes, SSEEvent, SSEParser
from zaiproxy.request import tokens
from zaiproxy.request.tokens import count_text
from zaiproxy.request.usage_rewrite import UsageChunkStripper

__all__ = [
    "Accounting",
    "StreamTracker",
    "StreamUsage",
    "UsageTracker",
    "stream_usage",
    "usage_from_body",
]


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


class StreamTracker(Protocol):
    """What the relay and :func:`stream_usage` use of a tracker; :class:`UsageTracker` (pure
    Python) and ``zaiproxy.request.scanner.NativeUsageTracker`` (the native scanner) both are
    one, and zaiproxy/request/scanner.py chooses which the relay uses."""

    @property
    def usage(self) -> Usage | None: ...
    @property
    def events(self) -> int: ...
    @property
    def done(self) -> bool: ...
    @property
    def error(self) -> bool: ...
    @property
    def at_event_boundary(self) -> bool: ...
    @property
    def overflowed(self) -> bool: ...
    @property
    def pending_bytes(self) -> int: ...
    def feed(self, data: Bytes) -> bytes: ...
    def close(self) -> bytes: ...
    def output_estimate(self) -> int: ...
    def usage_estimated(self) -> StreamUsage | None: ...


# What Accounting.openai_event answers, or-ed (the native scanner has the same constants).
HOLD = 1  # hold the event's data for counting, if still collecting
FINAL = 2  # the upstream's final usage: stop collecting, drop what is held
ERROR = 4  # the event reports an error


class Accounting:
    """The part of a tracker that parses JSON: usage reports and the counting of held deltas.

    Both trackers find events and decide which ones matter themselves (the pure one with
    :class:`~zaiproxy.http.sse.SSEParser`, the native one in C) and hand only those here,
    so the two report the same usage and the same estimates by construction.
    """

    __slots__ = ("_api", "_carry", "_carry_tokens", "_counted", "_fields", "final", "usage")

    def __init__(self, api: Literal["openai", "anthropic"]) -> None:
        self._api = api
        # The merged Anthropic counts (input, output, cache read, cache write).
        self._fields: list[int | None] = [None, None, None, None]
        self.usage: Usage | None = None
        self.final = False  # the upstream reported its output count
        self._carry = ""  # delta text parsed but not yet counted (the tail after a cut)
        self._carry_tokens: int | None = 0
        self._counted = 0  # tokens of the delta text before the carry

    @property
    def carry_chars(self) -> int:
        return len(self._carry)

    def openai_event(self, data: str | bytes, has_usage: bool, has_error: bool) -> int:
        """An OpenAI event with a non-null ``"usage"`` or an ``"error"`` key: HOLD, FINAL, ERROR."""
        obj = _loads(_text(data))
        if not isinstance(obj, dict):
            return 0
        flags = HOLD  # Z.AI puts usage on a chunk with a delta; rare enough to reparse
        if has_error and obj.get("error") is not None:
            flags |= ERROR
        if has_usage:
            # Each usage chunk carries the totals so far: the latest replaces.
            raw = obj.get("usage")
            usage = _openai_usage(raw)
            if usage is not None:
                self.usage = usage
                if _count(raw, "completion_tokens") is not None:
                    self.final = True
                    flags |= FINAL
        return flags

    def anthropic_start(self, data: str | bytes) -> None:
        obj = _loads(_text(data))
        message = obj.get("message") if isinstance(obj, dict) else None
        self._fields = [None, None, None, None]
        self._merge(message.get("usage") if isinstance(message, dict) else None)

    def anthropic_delta(self, data: str | bytes) -> bool:
        """A message_delta with ``"usage"``; True when it is the final count."""
        obj = _loads(_text(data))
        if not self._merge(obj.get("usage") if isinstance(obj, dict) else None):
            return False
        self.final = True
        return True

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

    def flush(self, held: list[str]) -> None:
        """Parse held events' data; count their text up to the last safe cut."""
        parts = [self._carry]
        extract = _openai_texts if self._api == "openai" else _anthropic_texts
        for data in held:
            extract(_loads(data), parts)
        text = "".join(parts)
        cut = _safe_cut(text)
        if cut:
            self._counted += count_text(text[:cut])
        self._carry = text[cut:]
        self._carry_tokens = None

    def flush_raw(self, raw: bytes) -> None:
        """:meth:`flush` for the native scanner's held data: events separated by CR (SSE data
        never contains one), decoded as :class:`~zaiproxy.http.sse.SSEParser` decodes them
        (one decode of the whole is the same: CR ends any broken UTF-8 sequence)."""
        self.flush(raw.decode("utf-8", "replace").split("\r"))

    def output_estimate(self) -> int:
        """Tokens of everything flushed so far (the caller flushes what it holds first)."""
        if self._carry_tokens is None:
            self._carry_tokens = count_text(self._carry)
        return self._counted + self._carry_tokens

    def usage_estimated(self, events: int) -> StreamUsage | None:
        """See :meth:`UsageTracker.usage_estimated` (the caller flushes what it holds first)."""
        usage = self.usage
        if self.final and usage is not None:
            return StreamUsage(usage, estimated=False, input_reported=True)
        if usage is None and events == 0:
            return None
        output = self.output_estimate()
        # Anthropic reports input in message_start; Z.AI sends zeros there.
        if usage is not None and usage.input_tokens > 0:
            return StreamUsage(replace(usage, output_tokens=output), True, True)
        return StreamUsage(Usage(0, output), estimated=True, input_reported=False)


class UsageTracker:
    """Feeds an SSE response body of one API flavour and keeps its final usage (pure Python).

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
    (:func:`stream_usage` does exactly that).

    The text of all deltas is counted as one string, as the model produced it,
    not delta by delta: a word split over two deltas is one token, not two. The
    running count is exact too, because each flush stops at a point where the
    tokenizer's pre-split puts a boundary whatever follows (:func:`_safe_cut`).

    With ``strip_usage``, :meth:`feed` also takes the usage chunk that
    ``include_usage`` added back out of the bytes it returns
    (:class:`~zaiproxy.request.usage_rewrite.UsageChunkStripper`), and :meth:`close`
    returns what that still held. This is the twin of the native scanner
    (``zaiproxy.request.scanner``): the same results, byte for byte.
    """

    __slots__ = (
        "_acct",
        "_collect",
        "_max_pending",
        "_parser",
        "_pending",
        "_pending_bytes",
        "_stripper",
        "done",
        "error",
        "events",
    )

    def __init__(
        self,
        api: Literal["openai", "anthropic"],
        *,
        count_deltas: bool = True,
        max_pending_bytes: int = 256 * 1024,
        strip_usage: bool = False,
        max_line_bytes: int = 1 << 20,
    ) -> None:
        if api not in ("openai", "anthropic"):
            raise ValueError(f"api must be 'openai' or 'anthropic', not {api!r}")
        self._acct = Accounting(api)
        self._parser = SSEParser(max_line_bytes)
        self._stripper = UsageChunkStripper() if strip_usage else None
        self.events = 0
        self.done = False
        self.error = False
        self._collect = count_deltas
        self._max_pending = max_pending_bytes
        self._pending: list[str] = []  # raw data of delta events, not yet parsed
        self._pending_bytes = 0

    @property
    def usage(self) -> Usage | None:
        return self._acct.usage

    @property
    def at_event_boundary(self) -> bool:
        return self._parser.at_event_boundary

    @property
    def overflowed(self) -> bool:
        return self._parser.overflowed

    @property
    def pending_bytes(self) -> int:
        """Characters of delta data held but not yet counted (~bytes: SSE JSON is mostly ASCII)."""
        return self._pending_bytes + self._acct.carry_chars

    def feed(self, data: Bytes) -> bytes:
        """Watch one read of the body; return the bytes to send on (``data`` unless stripping)."""
        on_event = self._on_openai if self._acct._api == "openai" else self._on_anthropic
        for event in self._parser.feed(data):
            self.events += 1
            on_event(event)
        if self._stripper is not None:
            return self._stripper.feed(data)
        return data if type(data) is bytes else bytes(data)

    def close(self) -> bytes:
        """End of stream; returns what the stripper still held (an unterminated event)."""
        self._parser.close()
        return self._stripper.close() if self._stripper is not None else b""

    def output_estimate(self) -> int:
        """Output tokens counted from the deltas so far (counting what is still held).

        Collection stops once the upstream reports its final usage, so after that
        this is the count of the deltas before it. 0 with ``count_deltas=False``.
        """
        if self._pending:
            self._flush()
        return self._acct.output_estimate()

    def usage_estimated(self) -> StreamUsage | None:
        """The upstream's final usage if it came, else the output counted from the deltas.

        None when there is nothing to go on: no event and no usage at all (a
        stream cut before its first event, or not SSE of this API).
        """
        if self._pending:
            self._flush()
        return self._acct.usage_estimated(self.events)

    def _hold(self, data: str) -> None:
        self._pending.append(data)
        self._pending_bytes += len(data)
        if self._pending_bytes > self._max_pending:
            self._flush()

    def _flush(self) -> None:
        pending, self._pending = self._pending, []
        self._pending_bytes = 0
        self._acct.flush(pending)

    def _set_final(self) -> None:
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
        flags = self._acct.openai_event(data, has_usage, has_error)
        if flags & ERROR:
            self.error = True
        if flags & FINAL:
            self._set_final()
        if flags & HOLD and self._collect:
            self._hold(data)

    def _on_anthropic(self, event: SSEEvent) -> None:
        kind = event.event
        if kind == "content_block_delta":
            if self._collect:
                self._hold(event.data)
        elif kind == "message_start":
            self._acct.anthropic_start(event.data)
        elif kind == "content_block_start":
            if self._collect:
                self._hold(event.data)  # a tool_use block's name is output too
        elif kind == "message_delta":
            if '"usage"' in event.data and self._acct.anthropic_delta(event.data):
                self._set_final()
        elif kind == "message_stop":
            self.done = True
        elif kind == "error":
            self.error = True


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


def _text(data: str | bytes) -> str:
    """As the pure tracker sees event data: decoded with ``errors="replace"``."""
    return data if isinstance(data, str) else data.decode("utf-8", "replace")


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


async def stream_usage(tracker: StreamTracker) -> StreamUsage | None:
    """``tracker.usage_estimated()``, in a worker thread when a big count is still pending.

    The caller must not feed the tracker while this runs (it is done with the
    stream by then). Not abandoned on cancel: the thread works on the tracker.
    """
    return await tokens.run_count(tracker.usage_estimated,
                                  big=tracker.pending_bytes >= tokens.THRESHOLD)
