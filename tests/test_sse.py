"""Tests for zaiproxy.http.sse: the event-stream parser and the streamed usage tracker.

Parser cases are a table of bytes -> events. Each row is fed whole, one byte at
a time and split in two at every point, because the relay feeds whatever chunks
the upstream's TCP segments happen to make.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterator
from typing import Any, Literal

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zaiproxy.core.record import Usage
from zaiproxy.http.sse import SSEEvent, SSEParser
from zaiproxy.mock import payloads
from zaiproxy.request import tokens
from zaiproxy.request.scanner import load
from zaiproxy.request.tokens import count_text
from zaiproxy.request.usage import StreamUsage, UsageTracker, stream_usage, usage_from_body
from zaiproxy.request.usage_rewrite import UsageChunkStripper, add_include_usage

# `make test` runs the suite twice (h11, then h11-mypyc); SSE parsing and usage accounting are
# independent of the HTTP implementation: run once.
pytestmark = pytest.mark.skipif(os.environ.get("ZAIPROXY_HTTP_IMPL") == "h11-mypyc",
                                reason="independent of the HTTP implementation")

E = SSEEvent


@pytest.fixture(scope="module", params=["python", "native"])
def tracker_impl(request: pytest.FixtureRequest) -> Iterator[str]:
    """The tracker tests (``@both``) run on the pure-Python tracker and on the native scanner
    (zaiproxy/request/scanner.py): ``UsageTracker`` in this module is the one under test."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(globals(), "UsageTracker", load(request.param))
        yield request.param


both = pytest.mark.usefixtures("tracker_impl")


def parse(chunks: list[bytes], **kwargs: Any) -> list[SSEEvent]:
    parser = SSEParser(**kwargs)
    events: list[SSEEvent] = []
    for chunk in chunks:
        events += parser.feed(chunk)
    events += parser.close()
    return events


def bytewise(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


def splits(data: bytes) -> Iterator[list[bytes]]:
    for i in range(len(data) + 1):
        yield [data[:i], data[i:]]


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    bounds = [0, *sorted(cuts), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


# --------------------------------------------------------------------------------------
# The table: every rule of WHATWG HTML 9.2.6 "Interpreting an event stream".

TABLE: list[tuple[str, bytes, list[SSEEvent]]] = [
    ("empty stream", b"", []),
    ("LF", b"data: a\n\n", [E(None, "a")]),
    ("CRLF", b"data: a\r\n\r\n", [E(None, "a")]),
    ("CR", b"data: a\r\r", [E(None, "a")]),
    ("mixed endings", b"data: a\r\ndata: b\rdata: c\n\r\n", [E(None, "a\nb\nc")]),
    # A CRLF counts once: if the LF were a second line end it would dispatch "a" alone.
    ("CRLF is one line end", b"data: a\r\ndata: b\r\n\r\n", [E(None, "a\nb")]),
    ("CR then CRLF is two line ends", b"data: a\r\r\n", [E(None, "a")]),
    ("LF then CR is two line ends", b"data: a\n\rdata: b\n\n", [E(None, "a"), E(None, "b")]),
    ("CR at end of stream ends a line", b"data: a\n\r", [E(None, "a")]),
    ("two events", b"data: a\n\ndata: b\n\n", [E(None, "a"), E(None, "b")]),
    ("BOM skipped", b"\xef\xbb\xbfdata: a\n\n", [E(None, "a")]),
    # Only one BOM is skipped; the second makes the field name "\ufeffdata", ignored.
    ("second BOM kept", b"\xef\xbb\xbf\xef\xbb\xbfdata: a\n\ndata: b\n\n", [E(None, "b")]),
    ("BOM after start is data", b"data: \xef\xbb\xbfa\n\n", [E(None, "\ufeffa")]),
    ("BOM prefix is not a BOM", b"\xef\xbb\n\ndata: a\n\n", [E(None, "a")]),
    ("comments", b": hello\ndata: a\n:\n\n", [E(None, "a")]),
    ("comment-only block", b": keep-alive\n\n", []),
    ("no colon: empty value", b"data\n\n", [E(None, "")]),
    ("no colon twice", b"data\ndata\n\n", [E(None, "\n")]),
    ("empty value", b"data:\n\n", [E(None, "")]),
    ("one leading space stripped", b"data:  a \n\n", [E(None, " a ")]),
    ("no leading space", b"data:a\n\n", [E(None, "a")]),
    ("colon in value", b'data: {"a": 1}\n\n', [E(None, '{"a": 1}')]),
    ("multi-line data", b"data: a\ndata:\ndata: b\n\n", [E(None, "a\n\nb")]),
    ("NUL in data kept", b"data: a\x00b\n\n", [E(None, "a\x00b")]),
    ("event type", b"event: add\ndata: 1\n\n", [E("add", "1")]),
    ("last event field wins", b"event: a\nevent: b\ndata: 1\n\n", [E("b", "1")]),
    ("empty event type is none", b"event: a\nevent\ndata: 1\n\n", [E(None, "1")]),
    ("event type reset", b"event: a\ndata: 1\n\ndata: 2\n\n", [E("a", "1"), E(None, "2")]),
    ("no data: not dispatched, type reset", b"event: a\n\ndata: 1\n\n", [E(None, "1")]),
    ("id", b"id: 7\ndata: a\n\n", [E(None, "a", "7")]),
    ("id persists", b"id: 7\ndata: a\n\ndata: b\n\n", [E(None, "a", "7"), E(None, "b", "7")]),
    ("id without data persists", b"id: 7\n\ndata: a\n\n", [E(None, "a", "7")]),
    ("empty id resets", b"id: 7\ndata: a\n\nid\ndata: b\n\n", [E(None, "a", "7"), E(None, "b")]),
    (
        "id with NUL ignored",
        b"id: 7\ndata: a\n\nid: 8\x009\ndata: b\n\n",
        [E(None, "a", "7"), E(None, "b", "7")],
    ),
    ("retry", b"retry: 1000\ndata: a\n\n", [E(None, "a", retry=1000)]),
    (
        "retry not all digits ignored",
        b"retry: 1000\nretry: 10a\nretry: -5\nretry:\nretry: 1.5\nretry:  5\nretry\ndata: a\n\n",
        [E(None, "a", retry=1000)],
    ),
    ("retry non-ASCII digits ignored", "retry: \u0661\u0662\ndata: a\n\n".encode(), [E(None, "a")]),
    (
        "retry max uint64",
        b"retry: 18446744073709551615\ndata: a\n\n",
        [E(None, "a", retry=2**64 - 1)],
    ),
    ("retry over uint64 ignored", b"retry: 18446744073709551616\ndata: a\n\n", [E(None, "a")]),
    (
        "retry is per event",
        b"retry: 5\ndata: a\n\ndata: b\n\n",
        [E(None, "a", retry=5), E(None, "b")],
    ),
    ("retry without data dropped", b"retry: 5\n\ndata: a\n\n", [E(None, "a")]),
    ("unknown field ignored", b"foo: bar\ndata: a\n\n", [E(None, "a")]),
    ("field names case-sensitive", b"Data: a\nDATA: b\n\n", []),
    ("space before colon", b"data : a\n\n", []),
    ("whitespace line is not blank", b"data: a\n \ndata: b\n\n", [E(None, "a\nb")]),
    ("unterminated event discarded", b"data: a\n\ndata: b\n", [E(None, "a")]),
    ("unterminated line discarded", b"data: a\n\ndata: b", [E(None, "a")]),
    (
        "multi-byte UTF-8",
        "data: h\u00e9llo \u20ac\U0001d11e\n\n".encode(),
        [E(None, "h\u00e9llo \u20ac\U0001d11e")],
    ),
    ("UTF-8 event type", "event: \u00fcn\u00ef\ndata: x\n\n".encode(), [E("\u00fcn\u00ef", "x")]),
    ("invalid UTF-8 replaced", b"data: \xff a \xe2\x82\n\n", [E(None, "\ufffd a \ufffd")]),
    (
        "truncated UTF-8 before LF",
        b"data: \xe2\x82\ndata: \x82\xac\n\n",
        [E(None, "\ufffd\n\ufffd\ufffd")],
    ),
]


@pytest.mark.parametrize(
    ("stream", "expected"), [row[1:] for row in TABLE], ids=[row[0] for row in TABLE]
)
def test_table(stream: bytes, expected: list[SSEEvent]) -> None:
    assert parse([stream]) == expected
    assert parse(bytewise(stream)) == expected
    for chunks in splits(stream):
        assert parse(chunks) == expected, chunks


def test_crlf_split_across_feeds_is_one_line_end() -> None:
    parser = SSEParser()
    assert parser.feed(b"data: a\r") == []
    # Were this LF a line end of its own it would be a blank line and dispatch "a".
    assert parser.feed(b"\n") == []
    assert parser.feed(b"data: b\r") == []
    assert parser.feed(b"\n\r") == [E(None, "a\nb")]  # the CR ends a blank line
    assert parser.feed(b"\n") == []  # and this LF is that CR's
    assert parser.feed(b"data: c\n\n") == [E(None, "c")]


def test_lone_lf_after_cr_in_a_later_chunk_still_swallowed_only_once() -> None:
    parser = SSEParser()
    assert parser.feed(b"data: a\r") == []
    assert parser.feed(b"\n\n") == [E(None, "a")]


def test_close_discards_and_stops() -> None:
    parser = SSEParser()
    assert parser.feed(b"data: a\n") == []
    assert parser.close() == []
    assert parser.feed(b"\n") == []


def test_feed_accepts_bytearray_and_memoryview_and_copies() -> None:
    # h11 hands the relay bytearray chunks; a buffered partial line must not
    # change if the caller reuses that buffer afterwards.
    parser = SSEParser()
    chunk = bytearray(b"data: ab")
    assert parser.feed(chunk) == []
    chunk[:] = b"XXXXXXXX"
    assert parser.feed(memoryview(b"c\n\n")) == [E(None, "abc")]


# --------------------------------------------------------------------------------------
# at_event_boundary and overflow


def test_at_event_boundary() -> None:
    parser = SSEParser()
    assert parser.at_event_boundary
    steps = [
        (b"\xef\xbb", False),  # maybe a BOM, held as a partial line
        (b"\xbf", True),
        (b"data: a", False),  # partial line
        (b"\n", False),  # a field of an undispatched event
        (b"\n", True),
        (b": ping\n", True),  # comments are not fields
        (b"event: x\n", False),
        (b"\n", True),  # not dispatched (no data) but reset all the same
        (b"id: 1\r", False),
        (b"\r", True),
        (b"\n", True),  # the LF of a CRLF split across feeds
    ]
    for chunk, expected in steps:
        parser.feed(chunk)
        assert parser.at_event_boundary is expected, chunk


def test_at_event_boundary_survives_close() -> None:
    parser = SSEParser()
    parser.feed(b"data: a\n")
    parser.close()
    assert not parser.at_event_boundary


def test_overflow_on_partial_line_stays_bounded() -> None:
    parser = SSEParser(max_line_bytes=16)
    assert parser.feed(b"data: 0123456789") == []  # 16 bytes: at the limit, fine
    assert not parser.overflowed
    assert parser.buffered_bytes == 16
    assert parser.feed(b"x") == []
    assert parser.overflowed
    assert not parser.at_event_boundary
    assert parser.buffered_bytes == 0
    for _ in range(1000):
        assert parser.feed(b"data: more\n\n" * 10) == []
    assert parser.buffered_bytes == 0


def test_overflow_does_not_depend_on_chunking() -> None:
    # A long line arriving in one chunk overflows just as it does byte by byte,
    # and the events before it are still returned.
    stream = b"data: a\n\ndata: " + b"x" * 40 + b"\n\ndata: b\n\n"
    for chunks in [[stream], bytewise(stream), *splits(stream)]:
        parser = SSEParser(max_line_bytes=32)
        events = [event for chunk in chunks for event in parser.feed(chunk)]
        assert events == [E(None, "a")]
        assert parser.overflowed


def test_overflow_on_unterminated_tail_of_a_chunk() -> None:
    parser = SSEParser(max_line_bytes=16)
    assert parser.feed(b"data: a\n\ndata: " + b"x" * 40) == [E(None, "a")]
    assert parser.overflowed
    assert parser.buffered_bytes == 0


def test_line_exactly_at_limit_is_fine() -> None:
    assert parse([b"data: 0123456789\n\n"], max_line_bytes=16) == [E(None, "0123456789")]


def test_event_data_is_bounded_too() -> None:
    # Short lines but no blank line: the data buffer must not grow without bound.
    parser = SSEParser(max_line_bytes=64, max_event_bytes=1000)
    for _ in range(200):
        parser.feed(b"data: 0123456789\n")
    assert parser.overflowed
    assert parser.buffered_bytes == 0


# --------------------------------------------------------------------------------------
# Property tests

_value = st.text(st.characters(exclude_characters="\r\n", exclude_categories=["Cs"]), max_size=12)
_block = st.fixed_dictionaries(
    {
        "comment": st.none() | _value,
        "event": st.none() | _value,
        "data": st.lists(_value, max_size=3),
        "id": st.none() | _value.filter(lambda v: "\x00" not in v),
        "retry": st.none() | st.integers(0, 10**12),
        "space": st.booleans(),
    }
)


def serialize(blocks: list[dict[str, Any]], endings: list[str], bom: bool) -> bytes:
    lines: list[str] = []
    for block in blocks:
        sep = ": " if block["space"] else ":"
        if block["comment"] is not None:
            lines.append(":" + block["comment"])
        if block["event"] is not None:
            lines.append("event: " + block["event"])
        if block["id"] is not None:
            lines.append("id: " + block["id"])
        if block["retry"] is not None:
            lines.append(f"retry{sep}{block['retry']}")
        # Without the separator's space, a value's own leading space would be the
        # one stripped; such values always get the space.
        lines += ["data" + (": " if v.startswith(" ") else sep) + v for v in block["data"]]
        lines.append("")
    out: list[str] = []
    previous = ""
    for i, line in enumerate(lines):
        ending = endings[i % len(endings)]
        if previous == "\r" and line == "" and ending == "\n":
            ending = "\r\n"  # CR + a blank line ended by LF would read as one CRLF
        out.append(line + ending)
        previous = ending
    return ("\ufeff" if bom else "").encode() + "".join(out).encode()


def expected_events(blocks: list[dict[str, Any]]) -> list[SSEEvent]:
    events = []
    last_id = None
    for block in blocks:
        if block["id"] is not None:
            last_id = block["id"] or None
        if block["data"]:
            events.append(
                E(block["event"] or None, "\n".join(block["data"]), last_id, block["retry"])
            )
    return events


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(
    blocks=st.lists(_block, max_size=6),
    endings=st.lists(st.sampled_from(["\n", "\r", "\r\n"]), min_size=1, max_size=5),
    bom=st.booleans(),
    data=st.data(),
)
def test_random_streams_any_split(
    blocks: list[dict[str, Any]], endings: list[str], bom: bool, data: st.DataObject
) -> None:
    stream = serialize(blocks, endings, bom)
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=12))
    expected = expected_events(blocks)
    assert parse([stream]) == expected
    assert parse(chunked(stream, cuts)) == expected


_tokens = st.sampled_from(
    [
        *[b"data", b"event", b"id", b"retry", b":", b" ", b"\r", b"\n", b"\r\n", b"\xef\xbb\xbf"],
        *[b"\x00", b"1", b"x", b"\xe2\x82\xac", b"\xe2", b"\xff", b"[DONE]", b'{"usage":{'],
    ]
)
_garbage = st.binary(max_size=200) | st.lists(_tokens, max_size=60).map(b"".join)


@settings(max_examples=500)
@given(stream=_garbage, limit=st.integers(0, 40), data=st.data())
def test_garbage_never_raises_and_chunking_never_matters(
    stream: bytes, limit: int, data: st.DataObject
) -> None:
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=10))
    whole = SSEParser(max_line_bytes=limit)
    events = whole.feed(stream)
    for chunks in (chunked(stream, cuts), bytewise(stream)):
        split = SSEParser(max_line_bytes=limit)
        assert [e for chunk in chunks for e in split.feed(chunk)] == events
        assert split.overflowed == whole.overflowed
        assert split.at_event_boundary == whole.at_event_boundary
        assert split.close() == []
    assert whole.close() == []


_json = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 2**63 - 1) | st.floats() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.sampled_from(
                ["usage", "message", "error", "input_tokens", "prompt_tokens", "output_tokens"]
            )
            | st.text(max_size=6),
            inner,
            max_size=4,
        )
    ),
    max_leaves=12,
)
_event_names = st.sampled_from(
    ["message_start", "message_delta", "message_stop", "error", "ping", ""]
)


@both
@settings(max_examples=300)
@given(
    api=st.sampled_from(["openai", "anthropic"]),
    items=st.lists(st.tuples(_event_names, _json | st.binary(max_size=20)), max_size=8),
)
def test_tracker_never_raises(
    api: Literal["openai", "anthropic"], items: list[tuple[str, Any]]
) -> None:
    stream = b""
    for name, payload in items:
        body = (
            payload
            if isinstance(payload, bytes)
            else orjson.dumps(payload, option=orjson.OPT_NON_STR_KEYS)
        )
        stream += b"event: " + name.encode() + b"\ndata: " + body.replace(b"\n", b"") + b"\n\n"
    tracker = UsageTracker(api)
    tracker.feed(stream)
    tracker.close()
    usage_from_body(api, stream)
    for _, payload in items:
        if not isinstance(payload, bytes):
            usage_from_body(api, orjson.dumps(payload, option=orjson.OPT_NON_STR_KEYS))


@both
@given(api=st.sampled_from(["openai", "anthropic"]), stream=_garbage)
def test_tracker_garbage_never_raises(api: Literal["openai", "anthropic"], stream: bytes) -> None:
    tracker = UsageTracker(api)
    for chunk in bytewise(stream):
        tracker.feed(chunk)
    tracker.close()
    # Token soup is never a JSON object with usage in it.
    assert usage_from_body(api, stream) is None


# --------------------------------------------------------------------------------------
# UsageTracker on realistic streams

OPENAI_STREAM = b"".join(
    b"data: " + line + b"\n\n"
    for line in [
        b'{"id":"chatcmpl-B9MBs8CjcvOU2jLn4n570S5qMJKcT","object":"chat.completion.chunk","created":1741569952,"model":"gpt-4o-2024-08-06","service_tier":"default","system_fingerprint":"fp_f9f4fb6dbf","choices":[{"index":0,"delta":{"role":"assistant","content":"","refusal":null},"logprobs":null,"finish_reason":null}],"usage":null}',
        b'{"id":"chatcmpl-B9MBs8CjcvOU2jLn4n570S5qMJKcT","object":"chat.completion.chunk","created":1741569952,"model":"gpt-4o-2024-08-06","service_tier":"default","system_fingerprint":"fp_f9f4fb6dbf","choices":[{"index":0,"delta":{"content":"Hello"},"logprobs":null,"finish_reason":null}],"usage":null}',
        # Text that mentions the keys is escaped inside a JSON string: not usage, not an error.
        b'{"id":"chatcmpl-B9MBs8CjcvOU2jLn4n570S5qMJKcT","object":"chat.completion.chunk","created":1741569952,"model":"gpt-4o-2024-08-06","service_tier":"default","system_fingerprint":"fp_f9f4fb6dbf","choices":[{"index":0,"delta":{"content":"! See \\"usage\\": {} and \\"error\\" \xe2\x82\xac"},"logprobs":null,"finish_reason":null}],"usage":null}',
        b'{"id":"chatcmpl-B9MBs8CjcvOU2jLn4n570S5qMJKcT","object":"chat.completion.chunk","created":1741569952,"model":"gpt-4o-2024-08-06","service_tier":"default","system_fingerprint":"fp_f9f4fb6dbf","choices":[{"index":0,"delta":{},"logprobs":null,"finish_reason":"stop"}],"usage":null}',
        b'{"id":"chatcmpl-B9MBs8CjcvOU2jLn4n570S5qMJKcT","object":"chat.completion.chunk","created":1741569952,"model":"gpt-4o-2024-08-06","service_tier":"default","system_fingerprint":"fp_f9f4fb6dbf","choices":[],"usage":{"prompt_tokens":1117,"completion_tokens":46,"total_tokens":1163,"prompt_tokens_details":{"cached_tokens":1024,"audio_tokens":0},"completion_tokens_details":{"reasoning_tokens":0,"audio_tokens":0,"accepted_prediction_tokens":0,"rejected_prediction_tokens":0}}}',
        b"[DONE]",
    ]
)

# Z.AI (GLM) sends reasoning_content deltas, no usage key until the last chunk,
# and puts usage on the chunk with finish_reason; CRLF line ends.
ZAI_STREAM = b"".join(
    b"data: " + line + b"\r\n\r\n"
    for line in [
        b'{"id":"20250915113012a1b2c3d4e5f64789","created":1757907012,"object":"chat.completion.chunk","model":"glm-4.6","choices":[{"index":0,"delta":{"role":"assistant","reasoning_content":"\\nThe user"}}]}',
        b'{"id":"20250915113012a1b2c3d4e5f64789","created":1757907012,"object":"chat.completion.chunk","model":"glm-4.6","choices":[{"index":0,"delta":{"role":"assistant","reasoning_content":" says hi."}}]}',
        b'{"id":"20250915113012a1b2c3d4e5f64789","created":1757907012,"object":"chat.completion.chunk","model":"glm-4.6","choices":[{"index":0,"delta":{"role":"assistant","content":"\xe4\xbd\xa0\xe5\xa5\xbd"}}]}',
        b'{"id":"20250915113012a1b2c3d4e5f64789","created":1757907012,"object":"chat.completion.chunk","model":"glm-4.6","choices":[{"index":0,"finish_reason":"stop","delta":{"role":"assistant","content":""}}],"usage":{"prompt_tokens":18,"completion_tokens":96,"total_tokens":114,"prompt_tokens_details":{"cached_tokens":4}}}',
        b"[DONE]",
    ]
)

ANTHROPIC_STREAM = b"""\
event: message_start
data: {"type":"message_start","message":{"id":"msg_01XFDUDYJgAACzvnptvVoYEL","type":"message","role":"assistant","content":[],"model":"claude-sonnet-4-5-20250929","stop_reason":null,"stop_sequence":null,"usage":{"input_tokens":472,"cache_creation_input_tokens":128,"cache_read_input_tokens":2048,"output_tokens":2}}}

event: content_block_start
data: {"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}

event: ping
data: {"type": "ping"}

event: content_block_delta
data: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Hello"}}

event: content_block_delta
data: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"! The \\"usage\\" field \xe2\x80\x94 here."}}

event: content_block_stop
data: {"type":"content_block_stop","index":0}

event: message_delta
data: {"type":"message_delta","delta":{"stop_reason":"end_turn","stop_sequence":null},"usage":{"output_tokens":15}}

event: message_stop
data: {"type":"message_stop"}

"""

# Z.AI's Anthropic endpoint reports zeros in message_start and the real counts,
# input included, in message_delta; nulls there must not wipe anything out.
ZAI_ANTHROPIC_STREAM = b"""\
event: message_start
data: {"type":"message_start","message":{"id":"msg_20250915113012a1b2","type":"message","role":"assistant","model":"glm-4.6","content":[],"stop_reason":null,"stop_sequence":null,"usage":{"input_tokens":0,"output_tokens":0}}}

event: content_block_start
data: {"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}

event: content_block_delta
data: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Hi"}}

event: content_block_stop
data: {"type":"content_block_stop","index":0}

event: message_delta
data: {"type":"message_delta","delta":{"stop_reason":"end_turn","stop_sequence":null},"usage":{"input_tokens":1234,"output_tokens":56,"cache_read_input_tokens":1024,"cache_creation_input_tokens":null,"server_tool_use":{"web_search_requests":0}}}

event: message_stop
data: {"type":"message_stop"}

"""

FEEDS: dict[str, Callable[[bytes], list[bytes]]] = {
    "whole": lambda s: [s],
    "bytewise": bytewise,
    "by 7": lambda s: [s[i : i + 7] for i in range(0, len(s), 7)],
}


@both
@pytest.mark.parametrize("feed", FEEDS.values(), ids=FEEDS.keys())
@pytest.mark.parametrize(
    ("api", "stream", "usage", "events"),
    [
        ("openai", OPENAI_STREAM, Usage(1117, 46, 1024, 0), 6),
        ("openai", ZAI_STREAM, Usage(18, 96, 4, 0), 5),
        ("anthropic", ANTHROPIC_STREAM, Usage(472, 15, 2048, 128), 8),
        ("anthropic", ZAI_ANTHROPIC_STREAM, Usage(1234, 56, 1024, 0), 6),
    ],
    ids=["openai", "zai-glm", "anthropic", "zai-anthropic"],
)
def test_tracker_streams(
    feed: Callable[[bytes], list[bytes]],
    api: Literal["openai", "anthropic"],
    stream: bytes,
    usage: Usage,
    events: int,
) -> None:
    tracker = UsageTracker(api)
    for chunk in feed(stream):
        tracker.feed(chunk)
    tracker.close()
    assert tracker.usage == usage
    assert tracker.events == events
    assert tracker.done
    assert not tracker.error
    assert tracker.at_event_boundary


@both
def test_tracker_before_usage_and_mid_event() -> None:
    tracker = UsageTracker("anthropic")
    assert tracker.usage is None
    cut = ANTHROPIC_STREAM.index(b"event: content_block_start") + 5
    tracker.feed(ANTHROPIC_STREAM[:cut])
    assert tracker.usage == Usage(472, 2, 2048, 128)  # message_start's counts so far
    assert not tracker.at_event_boundary
    assert not tracker.done


def openai_stream(deltas: int) -> list[bytes]:
    """A stream with include_usage: `"usage":null` on every chunk, one event per chunk."""
    head = b'{"id":"chatcmpl-1","object":"chat.completion.chunk","created":1741569952,"model":"gpt-4o-mini","system_fingerprint":"fp_1","choices":'
    chunks = [
        b"data: "
        + head
        + b'[{"index":0,"delta":{"content":"token %d "},"logprobs":null,"finish_reason":null}],"usage":null}\n\n'
        % i
        for i in range(deltas)
    ]
    chunks.append(
        b"data: "
        + head
        + b'[],"usage":{"prompt_tokens":12,"completion_tokens":%d,"total_tokens":%d}}\n\n'
        % (deltas, deltas + 12)
    )
    chunks.append(b"data: [DONE]\n\n")
    return chunks


@both
def test_ordinary_deltas_cost_no_json_parse(monkeypatch: pytest.MonkeyPatch) -> None:
    parsed: list[object] = []
    real_loads = orjson.loads

    def counting_loads(data: Any) -> Any:
        parsed.append(data)
        return real_loads(data)

    monkeypatch.setattr(orjson, "loads", counting_loads)
    tracker = UsageTracker("openai")
    for chunk in openai_stream(48):
        tracker.feed(chunk)
    assert tracker.usage == Usage(12, 48)
    assert tracker.events == 50
    assert len(parsed) == 1

    parsed.clear()
    tracker = UsageTracker("anthropic")
    tracker.feed(ANTHROPIC_STREAM)
    assert len(parsed) == 2  # message_start and message_delta only


@both
def test_openai_latest_usage_wins() -> None:
    # vLLM's continuous_usage_stats puts running totals on every chunk.
    tracker = UsageTracker("openai")
    tracker.feed(b'data: {"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":1}}\n\n')
    tracker.feed(b'data: {"choices":[],"usage" : {"prompt_tokens":5,"completion_tokens":9}}\n\n')
    tracker.feed(b'data: {"choices":[],"usage":null}\n\n')
    assert tracker.usage == Usage(5, 9)
    assert not tracker.done


@both
def test_openai_usage_bad_values_ignored() -> None:
    tracker = UsageTracker("openai")
    tracker.feed(b'data: {"usage":{"prompt_tokens":true,"completion_tokens":"5"}}\n\n')
    assert tracker.usage is None
    tracker.feed(
        b'data: {"usage":{"prompt_tokens":7,"completion_tokens":-1,"prompt_tokens_details":null}}\n\n'
    )
    assert tracker.usage == Usage(7, 0)


@both
@pytest.mark.parametrize(
    "stream",
    [
        b'data: {"error":{"message":"Rate limit reached for gpt-4o","type":"rate_limit_error","code":"rate_limit_exceeded"}}\n\n',
        b'data: {"error":{"code":"1302","message":"High concurrency usage of this API, please reduce concurrency"}}\n\n',
        b'event: error\ndata: {"message":"upstream failed"}\n\n',
    ],
    ids=["openai", "zai", "event-type"],
)
def test_openai_error(stream: bytes) -> None:
    tracker = UsageTracker("openai")
    for chunk in bytewise(stream):
        tracker.feed(chunk)
    assert tracker.error
    assert not tracker.done
    assert tracker.usage is None


@both
def test_anthropic_error_mid_stream() -> None:
    start = ANTHROPIC_STREAM[: ANTHROPIC_STREAM.index(b"event: content_block_start")]
    tracker = UsageTracker("anthropic")
    tracker.feed(start)
    tracker.feed(
        b'event: error\ndata: {"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}\n\n'
    )
    assert tracker.error
    assert not tracker.done
    assert tracker.usage == Usage(472, 2, 2048, 128)
    assert tracker.events == 2


@both
def test_anthropic_merge_ignores_nulls_and_bad_values() -> None:
    tracker = UsageTracker("anthropic")
    tracker.feed(
        b'event: message_start\ndata: {"type":"message_start","message":{"usage":{"input_tokens":10,"output_tokens":1,"cache_read_input_tokens":null}}}\n\n'
        b'event: message_delta\ndata: {"type":"message_delta","usage":{"input_tokens":null,"output_tokens":"40","cache_read_input_tokens":3}}\n\n'
        b'event: message_delta\ndata: {"type":"message_delta","usage":{"output_tokens":41,"input_tokens":false}}\n\n'
    )
    assert tracker.usage == Usage(10, 41, 3, 0)


@both
def test_tracker_reports_overflow() -> None:
    tracker = UsageTracker("openai")
    tracker.feed(b"data: " + b"x" * (1 << 20))
    assert tracker.overflowed
    tracker.feed(OPENAI_STREAM)
    assert tracker.usage is None
    assert tracker.events == 0


@both
def test_tracker_rejects_unknown_api() -> None:
    with pytest.raises(ValueError):
        UsageTracker("gemini")  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------
# usage_from_body


@pytest.mark.parametrize(
    ("api", "body", "expected"),
    [
        (
            "openai",
            b'{"id":"chatcmpl-1","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"Hi"},"finish_reason":"stop"}],"usage":{"prompt_tokens":19,"completion_tokens":10,"total_tokens":29,"prompt_tokens_details":{"cached_tokens":0}}}',
            Usage(19, 10),
        ),
        (
            "openai",
            b'{"usage":{"prompt_tokens":19,"completion_tokens":10,"prompt_tokens_details":{"cached_tokens":8}}}',
            Usage(19, 10, 8),
        ),
        ("openai", b'{"usage":{"prompt_tokens":5,"completion_tokens":-1}}', Usage(5, 0)),
        ("openai", b'{"choices":[]}', None),
        ("openai", b'{"usage":null}', None),
        ("openai", b'{"usage":{"total_tokens":29}}', None),
        ("openai", b'{"usage":{"input_tokens":5,"output_tokens":3}}', None),  # Anthropic keys
        (
            "anthropic",
            b'{"id":"msg_1","type":"message","role":"assistant","content":[{"type":"text","text":"Hi"}],"stop_reason":"end_turn","usage":{"input_tokens":2095,"output_tokens":503,"cache_creation_input_tokens":2051,"cache_read_input_tokens":0}}',
            Usage(2095, 503, 0, 2051),
        ),
        ("anthropic", b'{"input_tokens":2095}', Usage(2095, 0)),  # count_tokens
        (
            "anthropic",
            b'{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}',
            None,
        ),
        ("anthropic", b'{"usage":{"input_tokens":1.5,"output_tokens":true}}', None),
        ("anthropic", b'{"usage":{"input_tokens":123456789012345678901234567890}}', None),
    ],
)
def test_usage_from_body(
    api: Literal["openai", "anthropic"], body: bytes, expected: Usage | None
) -> None:
    assert usage_from_body(api, body) == expected


@pytest.mark.parametrize("api", ["openai", "anthropic"])
@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"not json",
        b"\xff\xfe",
        b"[1, 2]",
        b"null",
        b'"usage"',
        b'{"usage": "lots"}',
        b'{"usage": [1]}',
        b"[" * 100_000,
        b"1e400",
        b"data: [DONE]\n\n",
    ],
)
def test_usage_from_body_garbage(api: Literal["openai", "anthropic"], body: bytes) -> None:
    assert usage_from_body(api, body) is None


# --------------------------------------------------------------------------------------
# Output counted from the deltas, for streams without (final) upstream usage


def feed_all(tracker: UsageTracker, chunks: list[bytes]) -> UsageTracker:
    for chunk in chunks:
        tracker.feed(chunk)
    tracker.close()
    return tracker


def all_feeds(stream: bytes) -> Iterator[list[bytes]]:
    """Whole, byte by byte, and split in two at every byte boundary."""
    yield [stream]
    yield bytewise(stream)
    yield from splits(stream)


def without_usage(events: list[bytes]) -> list[bytes]:
    """The mock's OpenAI events with the usage object taken off the final chunk."""
    last = events[-2]
    cut = last.index(b',"usage":')
    return [*events[:-2], last[:cut] + b"}\n\n", events[-1]]


MOCK_DELTAS = (7, 5)  # 7 deltas of 5 characters: words split across deltas


def mock_text() -> str:
    return payloads.expected_text(*MOCK_DELTAS)


def test_mock_text_is_split_mid_word() -> None:
    # Counting the joined text, not each delta, is what makes these equal.
    deltas = payloads.text_deltas(*MOCK_DELTAS)
    assert sum(count_text(d) for d in deltas) > count_text(mock_text())


@both
@pytest.mark.parametrize(
    "builder", [payloads.chat_events, payloads.text_completion_events], ids=["chat", "completions"]
)
def test_openai_stream_without_usage_counts_deltas(builder: Any) -> None:
    stream = b"".join(without_usage(builder("r1", "glm-4.6", *MOCK_DELTAS, 10)))
    expected = StreamUsage(Usage(0, count_text(mock_text())), estimated=True, input_reported=False)
    for chunks in all_feeds(stream):
        tracker = feed_all(UsageTracker("openai"), chunks)
        assert tracker.usage is None  # `usage` stays upstream-only
        assert tracker.usage_estimated() == expected
        assert tracker.done
    assert expected.with_input(42) == Usage(42, count_text(mock_text()))


@both
@pytest.mark.parametrize(
    "builder", [payloads.chat_events, payloads.text_completion_events], ids=["chat", "completions"]
)
def test_openai_stream_with_usage_reports_upstream(builder: Any) -> None:
    stream = b"".join(builder("r1", "glm-4.6", *MOCK_DELTAS, 10))
    for chunks in all_feeds(stream):
        tracker = feed_all(UsageTracker("openai"), chunks)
        result = tracker.usage_estimated()
        assert result == StreamUsage(Usage(10, 7), estimated=False, input_reported=True)
        assert result.with_input(999) == Usage(10, 7)
        assert tracker.pending_bytes == 0


def anthropic_without_final(events: list[bytes]) -> bytes:
    return b"".join(e for e in events if not e.startswith(b"event: message_delta"))


@both
def test_anthropic_stream_without_final_usage() -> None:
    # message_start reports input (kept) and output_tokens 1 (replaced by the count).
    stream = anthropic_without_final(payloads.anthropic_events("r1", "glm-4.6", *MOCK_DELTAS, 33))
    expected = StreamUsage(Usage(33, count_text(mock_text())), estimated=True, input_reported=True)
    for chunks in all_feeds(stream):
        tracker = feed_all(UsageTracker("anthropic"), chunks)
        assert tracker.usage == Usage(33, 1)
        assert tracker.usage_estimated() == expected
    assert expected.with_input(5) == expected.usage


@both
def test_anthropic_stream_with_usage_reports_upstream() -> None:
    stream = b"".join(payloads.anthropic_events("r1", "glm-4.6", *MOCK_DELTAS, 33))
    for chunks in all_feeds(stream):
        tracker = feed_all(UsageTracker("anthropic"), chunks)
        assert tracker.usage_estimated() == StreamUsage(Usage(33, 7), False, True)


@both
def test_realistic_streams_report_upstream_usage() -> None:
    for api, stream, usage in [
        ("openai", OPENAI_STREAM, Usage(1117, 46, 1024, 0)),
        ("openai", ZAI_STREAM, Usage(18, 96, 4, 0)),
        ("anthropic", ANTHROPIC_STREAM, Usage(472, 15, 2048, 128)),
        ("anthropic", ZAI_ANTHROPIC_STREAM, Usage(1234, 56, 1024, 0)),
    ]:
        tracker = feed_all(UsageTracker(api), [stream])  # type: ignore[arg-type]
        assert tracker.usage_estimated() == StreamUsage(usage, False, True)


@both
def test_zai_stream_cut_before_usage_counts_reasoning_and_content() -> None:
    cut = ZAI_STREAM.index(b'data: {"id":"20250915113012a1b2c3d4e5f64789","created":1757907012,"object":"chat.completion.chunk","model":"glm-4.6","choices":[{"index":0,"finish_reason"')
    for chunks in all_feeds(ZAI_STREAM[:cut]):
        tracker = feed_all(UsageTracker("openai"), chunks)
        text = "\nThe user says hi.\u4f60\u597d"
        assert tracker.usage_estimated() == StreamUsage(Usage(0, count_text(text)), True, False)


@both
def test_zai_anthropic_zero_input_is_not_reported_input() -> None:
    cut = ZAI_ANTHROPIC_STREAM.index(b"event: message_delta")
    tracker = feed_all(UsageTracker("anthropic"), [ZAI_ANTHROPIC_STREAM[:cut]])
    assert tracker.usage == Usage(0, 0)
    assert tracker.usage_estimated() == StreamUsage(Usage(0, count_text("Hi")), True, False)


ANTHROPIC_MIXED = b"".join(
    b"event: %s\ndata: %s\n\n" % (name.encode(), orjson.dumps(data))
    for name, data in [
        ("message_start", {"type": "message_start", "message": {"usage": {"input_tokens": 50, "output_tokens": 1}}}),
        ("content_block_start", {"type": "content_block_start", "index": 0, "content_block": {"type": "thinking", "thinking": ""}}),
        ("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {"type": "thinking_delta", "thinking": "Let me think"}}),
        ("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {"type": "thinking_delta", "thinking": " about it."}}),
        ("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {"type": "signature_delta", "signature": "EqQBCgIYAhIM1gbcDa9GJwZA2b3h"}}),
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        ("content_block_start", {"type": "content_block_start", "index": 1, "content_block": {"type": "text", "text": ""}}),
        ("content_block_delta", {"type": "content_block_delta", "index": 1, "delta": {"type": "text_delta", "text": " I'll check."}}),
        ("content_block_start", {"type": "content_block_start", "index": 2, "content_block": {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {}}}),
        ("content_block_delta", {"type": "content_block_delta", "index": 2, "delta": {"type": "input_json_delta", "partial_json": '{"city": "Pa'}}),
        ("content_block_delta", {"type": "content_block_delta", "index": 2, "delta": {"type": "input_json_delta", "partial_json": 'ris"}'}}),
        ("ping", {"type": "ping"}),
    ]
)


@both
def test_anthropic_thinking_text_and_tool_json_all_count() -> None:
    text = "Let me think about it. I'll checkget_weather" + '{"city": "Paris"}'
    for chunks in all_feeds(ANTHROPIC_MIXED):
        tracker = feed_all(UsageTracker("anthropic"), chunks)
        assert tracker.usage_estimated() == StreamUsage(Usage(50, count_text(text)), True, True)


@both
def test_openai_tool_call_deltas_count() -> None:
    def chunk(delta: dict[str, Any]) -> bytes:
        return b"data: " + orjson.dumps({"choices": [{"index": 0, "delta": delta}]}) + b"\n\n"

    stream = (
        chunk({"role": "assistant", "content": None, "tool_calls": [{"index": 0, "id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": ""}}]})
        + chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"city":'}}]})
        + chunk({"tool_calls": [{"index": 0, "function": {"arguments": ' "Paris"}'}}]})
        + chunk({"refusal": None, "content": None})
        + b"data: [DONE]\n\n"
    )
    tracker = feed_all(UsageTracker("openai"), [stream])
    assert tracker.output_estimate() == count_text('get_weather{"city": "Paris"}')


@both
def test_cumulative_usage_latest_wins_and_stops_counting() -> None:
    # vLLM's continuous_usage_stats: running totals on every chunk. They are
    # final counts as far as they go: nothing to count, never summed.
    def chunk(text: str, completion: int) -> bytes:
        body = {"choices": [{"index": 0, "delta": {"content": text}}], "usage": {"prompt_tokens": 9, "completion_tokens": completion}}
        return b"data: " + orjson.dumps(body) + b"\n\n"

    stream = chunk("Hello", 1) + chunk(" there", 2) + chunk(" friend", 3)
    for chunks in all_feeds(stream):
        tracker = feed_all(UsageTracker("openai"), chunks)
        assert tracker.usage_estimated() == StreamUsage(Usage(9, 3), False, True)
        assert tracker.pending_bytes == 0
    # Cut after the second chunk: the latest total so far.
    cut = len(chunk("Hello", 1) + chunk(" there", 2))
    tracker = feed_all(UsageTracker("openai"), [stream[:cut]])
    assert tracker.usage_estimated() == StreamUsage(Usage(9, 2), False, True)


@both
def test_usage_without_completion_count_is_not_final() -> None:
    tracker = UsageTracker("openai")
    tracker.feed(b'data: {"choices":[{"delta":{"content":"Hello world"}}],"usage":{"prompt_tokens":4}}\n\n')
    assert tracker.usage == Usage(4, 0)
    assert tracker.usage_estimated() == StreamUsage(Usage(4, 2), True, True)


@both
@pytest.mark.parametrize("api", ["openai", "anthropic"])
def test_cancelled_stream_counts_what_came(api: Literal["openai", "anthropic"]) -> None:
    # Closed mid-way: the complete delta events so far count; a partial one doesn't.
    if api == "openai":
        events = without_usage(payloads.chat_events("r1", "m", *MOCK_DELTAS, 10))
        first = 0
    else:
        events = payloads.anthropic_events("r1", "m", *MOCK_DELTAS, 10)
        first = 3  # message_start, content_block_start, ping
    deltas = payloads.text_deltas(*MOCK_DELTAS)
    for n in range(len(deltas) + 1):
        complete = b"".join(events[: first + n])
        partial = events[first + n][:-3] if first + n < len(events) else b""
        tracker = feed_all(UsageTracker(api), [complete + partial])
        result = tracker.usage_estimated()
        if complete == b"":
            assert result is None  # no event at all: nothing to go on
            continue
        assert result is not None
        assert result.estimated
        assert result.usage.output_tokens == count_text("".join(deltas[:n]))


@both
def test_nothing_to_go_on() -> None:
    tracker = feed_all(UsageTracker("openai"), [b'data: {"choices":[{"delta":{"content":"x"'])
    assert tracker.usage_estimated() is None
    tracker = feed_all(UsageTracker("anthropic"), [b": keep-alive\n\n"])
    assert tracker.usage_estimated() is None


@both
def test_delta_counting_can_be_turned_off() -> None:
    stream = b"".join(without_usage(payloads.chat_events("r1", "m", *MOCK_DELTAS, 10)))
    tracker = feed_all(UsageTracker("openai", count_deltas=False), [stream])
    assert tracker.output_estimate() == 0
    assert tracker.pending_bytes == 0
    assert tracker.usage_estimated() == StreamUsage(Usage(0, 0), True, False)


@both
def test_deltas_are_parsed_only_at_the_end(monkeypatch: pytest.MonkeyPatch) -> None:
    parsed: list[object] = []
    real_loads = orjson.loads

    def counting_loads(data: Any) -> Any:
        parsed.append(data)
        return real_loads(data)

    monkeypatch.setattr(orjson, "loads", counting_loads)
    stream = without_usage(payloads.chat_events("r1", "m", 48, 4, 10))
    tracker = UsageTracker("openai")
    for chunk in stream:
        tracker.feed(chunk)
    assert parsed == []  # the hot path only holds the raw data
    assert tracker.pending_bytes == sum(len(e) - len(b"data: \n\n") for e in stream[:-1])
    assert tracker.output_estimate() == count_text(payloads.expected_text(48, 4))
    assert len(parsed) == 49  # 48 deltas + the finish chunk, once each
    assert tracker.pending_bytes < 16  # only the last word's tail, parsed but not counted
    assert tracker.output_estimate() == count_text(payloads.expected_text(48, 4))
    assert len(parsed) == 49


@both
def test_bounded_buffer_gives_the_same_count() -> None:
    chunks, size = 2000, 7
    stream = b"".join(without_usage(payloads.chat_events("r1", "m", chunks, size, 10)))
    expected = count_text(payloads.expected_text(chunks, size))
    unbounded = feed_all(UsageTracker("openai", max_pending_bytes=1 << 30), [stream])
    assert unbounded.pending_bytes > 400_000
    assert unbounded.output_estimate() == expected
    small = UsageTracker("openai", max_pending_bytes=4096)
    peak = 0
    for i in range(0, len(stream), 1000):
        small.feed(stream[i : i + 1000])
        peak = max(peak, small.pending_bytes)
    assert peak < 4096 + 1000  # one chunk's events over the cap, at most
    assert small.output_estimate() == expected
    # The default cap (256 KB) is passed too.
    assert feed_all(UsageTracker("openai"), [stream]).output_estimate() == expected


_piece = st.sampled_from(
    ["Hello", " world", ",", " ", "  ", "\n", "\n\n", "123", "4", " 56", "'s", "'ll", "don", "'t",
     "\u4f60\u597d", "\u3002", "caf\u00e9", "e\u0301", "\U0001f642", "<|endoftext|>", "\t", "-",
     "x" * 50, "\u4e16\u754c" * 30]
)


@both
@settings(max_examples=150, deadline=None)
@given(deltas=st.lists(st.lists(_piece, max_size=4).map("".join), max_size=60), cap=st.integers(1, 400))
def test_random_deltas_any_cap_same_count(deltas: list[str], cap: int) -> None:
    head = b'{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":'
    stream = b"".join(
        b"event: content_block_delta\ndata: " + head + orjson.dumps(d) + b"}}\n\n" for d in deltas
    )
    tracker = feed_all(UsageTracker("anthropic", max_pending_bytes=cap), [stream])
    assert tracker.output_estimate() == count_text("".join(deltas))


_delta_json = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 5) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3)
    | st.dictionaries(
        st.sampled_from(
            ["choices", "delta", "content", "text", "thinking", "partial_json", "tool_calls",
             "function", "name", "arguments", "content_block", "reasoning_content", "usage"]
        ),
        inner,
        max_size=4,
    ),
    max_leaves=12,
)


@both
@settings(max_examples=300)
@given(
    api=st.sampled_from(["openai", "anthropic"]),
    items=st.lists(
        st.tuples(st.sampled_from(["content_block_delta", "content_block_start", ""]), _delta_json),
        max_size=8,
    ),
    cap=st.integers(0, 300),
)
def test_delta_fallback_never_raises(
    api: Literal["openai", "anthropic"], items: list[tuple[str, Any]], cap: int
) -> None:
    stream = b"".join(
        (b"event: " + name.encode() + b"\n" if name else b"")
        + b"data: " + orjson.dumps(payload) + b"\n\n"
        for name, payload in items
    )
    tracker = feed_all(UsageTracker(api, max_pending_bytes=cap), [stream])
    result = tracker.usage_estimated()
    assert result is None or result.usage.output_tokens >= 0


@both
def test_cjk_without_cut_points_stays_bounded() -> None:
    # No safe cut in a run of CJK letters: the carry is counted once it grows
    # past its own bound (off by at most a token at that seam), not kept forever.
    head = b'{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":'
    delta = "\u4f60\u597d\u4e16\u754c" * 16
    event = b"event: content_block_delta\ndata: " + head + orjson.dumps(delta) + b"}}\n\n"
    tracker = UsageTracker("anthropic", max_pending_bytes=2048)
    for _ in range(2000):
        tracker.feed(event)
        assert tracker.pending_bytes < 2048 + 8192
    assert abs(tracker.output_estimate() - count_text(delta * 2000)) <= 2000 * 64 // 4096 + 1


@both
async def test_stream_usage_in_a_thread_equals_inline() -> None:
    stream = b"".join(without_usage(payloads.chat_events("r1", "m", 400, 9, 10)))
    big = feed_all(UsageTracker("openai"), [stream])
    assert big.pending_bytes >= tokens.THRESHOLD
    threaded = await stream_usage(big)
    assert threaded == feed_all(UsageTracker("openai"), [stream]).usage_estimated()
    assert threaded is not None
    assert threaded.usage.output_tokens == count_text(payloads.expected_text(400, 9))
    small = feed_all(UsageTracker("openai"), [b"".join(without_usage(payloads.chat_events("r", "m", 3, 4, 1)))])
    assert small.pending_bytes < tokens.THRESHOLD
    assert await stream_usage(small) == StreamUsage(Usage(0, count_text(payloads.expected_text(3, 4))), True, False)


# --------------------------------------------------------------------------------------
# stream_options.include_usage: the request rewrite


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (
            b'{"model":"glm-4.6","stream":true,"messages":[{"role":"user","content":"hi"}]}',
            b'{"model":"glm-4.6","stream":true,"messages":[{"role":"user","content":"hi"}],"stream_options":{"include_usage":true}}',
        ),
        (
            b'{"stream": true, "prompt": "x", "max_tokens": 5}',
            b'{"stream":true,"prompt":"x","max_tokens":5,"stream_options":{"include_usage":true}}',
        ),
        (
            b'{"stream_options":{"continuous_usage_stats":true},"stream":true,"messages":[]}',
            b'{"stream_options":{"continuous_usage_stats":true,"include_usage":true},"stream":true,"messages":[]}',
        ),
        (
            b'{"stream":true,"stream_options":{"include_usage":false},"messages":[],"z":1}',
            b'{"stream":true,"stream_options":{"include_usage":true},"messages":[],"z":1}',
        ),
        (
            b'{"stream":true,"stream_options":null,"messages":[]}',
            b'{"stream":true,"stream_options":{"include_usage":true},"messages":[]}',
        ),
        # Values survive the round trip, non-ASCII and escapes included.
        (
            '{"messages":[{"content":"caf\\u00e9 \u2713 \\"q\\""}],"temperature":0.7,"stream":true,"seed":-3}'.encode(),
            '{"messages":[{"content":"caf\u00e9 \u2713 \\"q\\""}],"temperature":0.7,"stream":true,"seed":-3,"stream_options":{"include_usage":true}}'.encode(),
        ),
        (b'{"stream":true,"stream_options":{"include_usage":true},"messages":[]}', None),
        (b'{"stream":false,"messages":[]}', None),
        (b'{"messages":[]}', None),
        (b'{"stream":"true","messages":[]}', None),
        (b'{"stream":true,"input":"x"}', None),  # the Responses API rejects stream_options
        (b'{"stream":true,"stream_options":"x","messages":[]}', None),
        (b"not json", None),
        (b"[1,2]", None),
        (b"", None),
        # orjson would turn these into floats: left alone rather than changed.
        (b'{"stream":true,"messages":[],"n":123456789012345678901234567890}', None),
        (b'{"stream":true,"messages":[{"x":[-99999999999999999999]}]}', None),
        # 64-bit integers survive, and so do long digit strings and float literals.
        (
            b'{"stream":true,"messages":[],"seed":18446744073709551615,"id":"12345678901234567890"}',
            b'{"stream":true,"messages":[],"seed":18446744073709551615,"id":"12345678901234567890","stream_options":{"include_usage":true}}',
        ),
        (  # the same values, orjson's spelling
            b'{"stream":true,"messages":[],"t":1e300,"p":0.1,"q":1E2}',
            b'{"stream":true,"messages":[],"t":1e+300,"p":0.1,"q":100.0,"stream_options":{"include_usage":true}}',
        ),
        # ... but a huge float next to 19 digits can't be told from a big integer.
        (b'{"stream":true,"messages":[],"t":1e300,"id":"12345678901234567890"}', None),
    ],
)
def test_add_include_usage(body: bytes, expected: bytes | None) -> None:
    result = add_include_usage(body)
    assert result == expected
    if result is not None:
        original, rewritten = orjson.loads(body), orjson.loads(result)
        options = rewritten.pop("stream_options")
        assert options["include_usage"] is True
        original.pop("stream_options", None)
        assert rewritten == original


# --------------------------------------------------------------------------------------
# UsageChunkStripper: the usage chunk goes, every other byte stays


def with_usage_chunk(ending: bytes) -> tuple[bytes, bytes]:
    """A stream with include_usage and the same stream without its usage chunk."""
    events = [e.replace(b"\n", ending) for e in openai_stream(4)]
    return b"".join(events), b"".join(events[:-2] + events[-1:])


def strip(chunks: list[bytes], **kwargs: Any) -> tuple[bytes, UsageChunkStripper]:
    stripper = UsageChunkStripper(**kwargs)
    out = b"".join(stripper.feed(chunk) for chunk in chunks) + stripper.close()
    return out, stripper


@pytest.mark.parametrize("ending", [b"\n", b"\r\n", b"\r"], ids=["LF", "CRLF", "CR"])
def test_stripper_removes_exactly_the_usage_event(ending: bytes) -> None:
    stream, expected = with_usage_chunk(ending)
    for chunks in all_feeds(stream):
        out, stripper = strip(chunks)
        assert out == expected
        assert stripper.stripped == 1


def test_stripper_realistic_openai_stream() -> None:
    usage_start = OPENAI_STREAM.index(b'data: {"id":"chatcmpl-B9MBs8CjcvOU2jLn4n570S5qMJKcT","object":"chat.completion.chunk","created":1741569952,"model":"gpt-4o-2024-08-06","service_tier":"default","system_fingerprint":"fp_f9f4fb6dbf","choices":[],')
    usage_end = OPENAI_STREAM.index(b"data: [DONE]")
    expected = OPENAI_STREAM[:usage_start] + OPENAI_STREAM[usage_end:]
    for chunks in all_feeds(OPENAI_STREAM):
        assert strip(chunks)[0] == expected


def test_stripper_sends_everything_but_a_possible_usage_event_at_once() -> None:
    stream, expected = with_usage_chunk(b"\n")
    usage_end = stream.index(b"data: [DONE]")
    usage_start = stream.rindex(b"\n\n", 0, usage_end - 2) + 2
    assert stream[usage_start:usage_end].startswith(b'data: {"id"')
    assert b'"choices":[],"usage":{' in stream[usage_start:usage_end]
    for i in range(len(stream) + 1):
        stripper = UsageChunkStripper()
        first = stripper.feed(stream[:i])
        if i <= usage_start:
            kept = stream[:i]
        elif i < usage_end:
            kept = stream[:usage_start]
            assert first == kept  # the usage event so far is held, all before it is out
        else:
            kept = stream[:usage_start] + stream[usage_end:i]
        # Held back: at most the start of the event in progress, and only while
        # it may still be the usage chunk (no non-empty "choices" in it yet).
        assert kept.startswith(first)
        held = kept[len(first) :]
        assert held == b"" or first == b"" or first.endswith(b"\n\n")
        assert b'"choices":[{' not in held
        assert b"\n\n" not in held
        second = stripper.feed(stream[i:]) + stripper.close()
        assert first + second == expected


@pytest.mark.parametrize(
    "stream",
    [
        ZAI_STREAM,  # usage rides on a chunk with choices: that chunk stays
        ANTHROPIC_STREAM,
        b'data: {"choices":[],"usage":null}\n\n',
        b'data: {"choices":[]}\n\n',
        b'data: {"usage":{"prompt_tokens":1}}\n\n',
        b'event: usage\ndata: {"choices":[],"usage":{"prompt_tokens":1}}\n\n',
        b'data: {"choices":[],\ndata: "usage":{"prompt_tokens":1}}\n\n',  # two data lines
        b': comment\ndata: {"choices":[],"usage":{"prompt_tokens":1}}\n\n',
        b'data:  {"choices":[],"usage":{"prompt_tokens":1}}\n\n',  # not OpenAI's bytes
        b'data: {"choices":[],"usage":{"prompt_tokens":1}}',  # unterminated: not an event
        b'data: {"choices":[],"usage":{"prompt_tokens":1}}\n',
        b"\xef\xbb\xbf: bom\n\n\n\r\n\rdata: [DONE]\n\n",
        b"data: " + b"{" * 20_000 + b"\n\n",
        b"",
    ],
)
def test_stripper_keeps_everything_else(stream: bytes) -> None:
    for chunks in all_feeds(stream) if len(stream) < 5000 else [[stream], bytewise(stream)]:
        out, stripper = strip(chunks)
        assert out == stream
        assert stripper.stripped == 0


def test_stripper_bounds_what_it_holds() -> None:
    stripper = UsageChunkStripper(max_event_bytes=100)
    head = b'data: {"id":"' + b"x" * 80
    assert stripper.feed(head) == b""
    assert stripper.feed(b"y" * 20) == head + b"y" * 20  # over the bound: not the usage chunk
    assert stripper.feed(b'","choices":[],"usage":{}}\n\n') == b'","choices":[],"usage":{}}\n\n'


_EVENTS = [
    b'data: {"id":"1","choices":[{"index":0,"delta":{"content":"hi"}}],"usage":null}',
    b'data: {"id":"1","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":1}}',  # stripped
    b'data: {"id":"1","choices": [ ],"usage" :{"prompt_tokens":3}}',  # stripped
    b'data: {"id":"1","choices":[],"usage":null}',
    b"data: [DONE]",
    b": ping",
    b"event: x\ndata: 1",
    b'data: {"choices":[],"usage":{"a":1}}\ndata: more',
    b"data:{\"choices\":[],\"usage\":{\"x\":0}}",  # stripped (no space after the colon)
]


@settings(max_examples=300)
@given(
    picks=st.lists(st.tuples(st.integers(0, len(_EVENTS) - 1), st.sampled_from([b"\n", b"\r\n", b"\r"]), st.integers(0, 2)), max_size=8),
    data=st.data(),
)
def test_stripper_random_streams_any_split(picks: list[tuple[int, bytes, int]], data: st.DataObject) -> None:
    stream = b""
    expected = b""
    stripped = 0
    previous_cr = False
    for index, ending, extra_blank in picks:
        if previous_cr and ending == b"\n":
            ending = b"\r\n"  # a lone LF right after a CR would join it
        event = _EVENTS[index].replace(b"\n", ending) + ending + ending
        blanks = ending * extra_blank
        stream += event + blanks
        if index in (1, 2, 8):
            stripped += 1
            expected += blanks
        else:
            expected += event + blanks
        previous_cr = ending == b"\r"
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=10))
    for chunks in ([stream], chunked(stream, cuts), bytewise(stream)):
        out, stripper = strip(chunks)
        assert out == expected
        assert stripper.stripped == stripped


def test_stripper_empty_feed_between_cr_and_lf() -> None:
    # Regression (found by hypothesis): an empty chunk between the CR and the LF of the
    # blank line ending a stripped event let the LF through.
    event = b'data:{"choices":[],"usage":{"x":0}}\r\n\r\n'
    out, stripper = strip([event[:-1], b"", event[-1:]])
    assert out == b""
    assert stripper.stripped == 1
