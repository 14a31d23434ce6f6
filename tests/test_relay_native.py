"""The native stream scanner against its pure-Python twin: the same bytes out, the same usage.

``zaiproxy.request.scanner.NativeUsageTracker`` (C, ``zaiproxy._native._relay``) and
``zaiproxy.request.usage.UsageTracker`` (``SSEParser`` + ``UsageChunkStripper``) are fed
the same upstream reads: real-looking OpenAI, Z.AI and Anthropic streams (content, reasoning,
tool calls, usage on the last chunk or a chunk of its own or none, errors, comments, ids,
multi-byte UTF-8), with LF, CRLF or CR line ends and with or without a BOM, cut at every
byte and split at random points, and random garbage. After every read both must return the
same bytes to forward and report the same state; at the end, the same usage and estimates.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, Literal

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zaiproxy.request import scanner
from zaiproxy.request.scanner import NativeUsageTracker, RelayUnavailable, TrackerClass, load
from zaiproxy.request.usage import UsageTracker

Api = Literal["openai", "anthropic"]

# Bytes in, bytes out: no HTTP here. `make test`'s second run (h11-mypyc) skips it.
pytestmark = pytest.mark.skipif(os.environ.get("ZAIPROXY_HTTP_IMPL") == "h11-mypyc",
                                reason="the scanner is independent of the HTTP "
                                       "implementation: run once, with h11")


def test_native_scanner_loaded_when_expected() -> None:
    # A broken build must not pass the suite on the twin unnoticed.
    if os.environ.get("ZAIPROXY_RELAY", "native") == "native":
        assert scanner.IMPLEMENTATION == "native"
        assert scanner.Tracker is NativeUsageTracker
        assert load("native") is NativeUsageTracker
    assert load("python") is UsageTracker
    with pytest.raises(RelayUnavailable, match="expected 'native' or 'python'"):
        load("rust")


# ---- fixtures: streams as upstreams send them -------------------------------------------


def sse(*events: dict[str, Any] | str, event: str | None = None) -> list[bytes]:
    """``data:`` events (JSON objects or raw strings), LF line ends."""
    out = []
    for item in events:
        data = item if isinstance(item, str) else orjson.dumps(item).decode()
        head = f"event: {event}\n" if event else ""
        out.append(f"{head}data: {data}\n\n".encode())
    return out


def chunk(delta: dict[str, Any] | None = None, *, finish: str | None = None,
          usage: dict[str, Any] | Literal["absent"] | None = "absent",
          choices: list[Any] | None = None) -> dict[str, Any]:
    obj: dict[str, Any] = {"id": "chatcmpl-7", "object": "chat.completion.chunk",
                           "created": 1733500000, "model": "glm-4.6"}
    obj["choices"] = choices if choices is not None else [
        {"index": 0, "delta": delta or {}, "finish_reason": finish}]
    if usage != "absent":
        obj["usage"] = usage
    return obj


TEXT = ["Hel", "lo, wor", "ld! Ça va ? ", "日本語の", "テキスト", " 🙂 emoji ", "naïve café"]
USAGE = {"prompt_tokens": 21, "completion_tokens": 17, "total_tokens": 38,
         "prompt_tokens_details": {"cached_tokens": 5}}


def openai_include_usage() -> list[bytes]:
    """OpenAI with stream_options.include_usage: "usage": null on every chunk, then a chunk
    of its own with "choices": [] (what the stripper takes out)."""
    events = [chunk({"role": "assistant", "content": ""}, usage=None)]
    events += [chunk({"content": t}, usage=None) for t in TEXT]
    events.append(chunk({}, finish="stop", usage=None))
    events.append(chunk(choices=[], usage=USAGE))
    return sse(*events, "[DONE]")


def zai_reasoning() -> list[bytes]:
    """Z.AI GLM: reasoning_content, then content, usage on the finishing chunk itself."""
    events = [chunk({"role": "assistant", "reasoning_content": "Let me think… "})]
    events += [chunk({"reasoning_content": t}) for t in TEXT[:3]]
    events += [chunk({"content": t}) for t in TEXT[3:]]
    events.append(chunk({"content": "."}, finish="stop", usage=USAGE))
    return sse(*events, "[DONE]")


def openai_tools_no_usage() -> list[bytes]:
    """Tool-call deltas and no usage at all: everything is counted here."""
    call = {"index": 0, "id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": ""}}
    events = [chunk({"role": "assistant", "tool_calls": [call]})]
    for part in ['{"loc', 'ation": "Zü', 'rich", "unit":', ' "celsius"}']:
        events.append(chunk({"tool_calls": [{"index": 0, "function": {"arguments": part}}]}))
    events.append(chunk({}, finish="tool_calls"))
    return sse(*events, "[DONE]")


def openai_legacy_and_error() -> list[bytes]:
    """Legacy completions text, a keep-alive comment, ids and retry, then an error event."""
    out = [b": keep-alive\n\n", b"id: 41\nretry: 1500\n"]
    out += sse(*({"id": "cmpl-1", "choices": [{"index": 0, "text": t}]} for t in TEXT[:4]))
    out.append(b": ping \xe2\x9c\x93\n")
    out += sse({"error": {"message": "overloaded", "type": "server_error"}}, event="error")
    return out


def openai_usage_not_final() -> list[bytes]:
    """A usage object without completion_tokens (not final), a later full one; "usage" as a
    string value, and the key split by blanks."""
    return sse(chunk({"content": "a"}, usage={"prompt_tokens": 3}),
               chunk({"content": "b \"usage\" c"}),
               '{"choices":[{"delta":{"content":"d"}}],"usage"  :   null}',
               chunk({"content": "e"}, usage={"prompt_tokens": 3, "completion_tokens": 2}),
               chunk({"content": "after final"}), "[DONE]")


def anthropic(final: bool = True, zai: bool = False) -> list[bytes]:
    start_usage = ({"input_tokens": 0, "output_tokens": 0} if zai else
                   {"input_tokens": 25, "output_tokens": 1, "cache_read_input_tokens": 4,
                    "cache_creation_input_tokens": 0})
    out = sse({"type": "message_start", "message": {
        "id": "msg_1", "type": "message", "role": "assistant", "model": "glm-4.6",
        "content": [], "stop_reason": None, "usage": start_usage}}, event="message_start")
    out += sse({"type": "content_block_start", "index": 0,
                "content_block": {"type": "thinking", "thinking": ""}}, event="content_block_start")
    out += sse(*({"type": "content_block_delta", "index": 0,
                  "delta": {"type": "thinking_delta", "thinking": t}} for t in TEXT[:3]),
               event="content_block_delta")
    out += sse({"type": "ping"}, event="ping")
    out += sse({"type": "content_block_start", "index": 1,
                "content_block": {"type": "text", "text": ""}}, event="content_block_start")
    out += sse(*({"type": "content_block_delta", "index": 1,
                  "delta": {"type": "text_delta", "text": t}} for t in TEXT[3:]),
               event="content_block_delta")
    out += sse({"type": "content_block_start", "index": 2, "content_block": {
        "type": "tool_use", "id": "toolu_1", "name": "lookup", "input": {}}},
        event="content_block_start")
    out += sse({"type": "content_block_delta", "index": 2,
                "delta": {"type": "input_json_delta", "partial_json": "{\"q\": \"Zürich\"}"}},
               event="content_block_delta")
    if not final:
        return out
    delta_usage: dict[str, Any] = {"output_tokens": 42}
    if zai:
        delta_usage |= {"input_tokens": 25, "cache_read_input_tokens": 0}
    out += sse({"type": "message_delta", "delta": {"stop_reason": "end_turn"},
                "usage": delta_usage}, event="message_delta")
    out += sse({"type": "message_stop"}, event="message_stop")
    return out


STREAMS: dict[str, tuple[Api, Callable[[], list[bytes]]]] = {
    "openai-include-usage": ("openai", openai_include_usage),
    "zai-reasoning": ("openai", zai_reasoning),
    "openai-tools-no-usage": ("openai", openai_tools_no_usage),
    "openai-legacy-error": ("openai", openai_legacy_and_error),
    "openai-usage-not-final": ("openai", openai_usage_not_final),
    "anthropic": ("anthropic", anthropic),
    "anthropic-cut": ("anthropic", lambda: anthropic(final=False)),
    "zai-anthropic": ("anthropic", lambda: anthropic(zai=True)),
}
ENDINGS = {"LF": b"\n", "CRLF": b"\r\n", "CR": b"\r"}


def stream_bytes(name: str, ending: bytes, bom: bool) -> bytes:
    body = b"".join(STREAMS[name][1]())
    return (b"\xef\xbb\xbf" if bom else b"") + body.replace(b"\n", ending)


# ---- the comparison ---------------------------------------------------------------------


def run(cls: TrackerClass, api: Api, reads: list[bytes], **kwargs: Any) -> dict[str, Any]:
    """Feed the reads; everything a caller can see, after every read and at the end."""
    tracker = cls(api, **kwargs)
    steps = []
    for data in reads:
        out = tracker.feed(data)
        steps.append((bytes(out), tracker.at_event_boundary, tracker.overflowed, tracker.events,
                      tracker.done, tracker.error, tracker.usage, tracker.pending_bytes))
    tail = tracker.close()
    return {"steps": steps, "tail": tail, "usage": tracker.usage, "pending": tracker.pending_bytes,
            "estimated": tracker.usage_estimated(), "output": tracker.output_estimate(),
            "events": tracker.events, "done": tracker.done, "error": tracker.error}


def assert_same(api: Api, reads: list[bytes], **kwargs: Any) -> dict[str, Any]:
    native = run(NativeUsageTracker, api, reads, **kwargs)
    python = run(UsageTracker, api, reads, **kwargs)
    assert native == python
    return native


def cut(data: bytes, points: list[int]) -> list[bytes]:
    points = sorted({p for p in points if 0 < p < len(data)})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


@pytest.mark.parametrize("strip", [False, True], ids=["plain", "strip"])
@pytest.mark.parametrize("ending", ENDINGS.values(), ids=ENDINGS.keys())
@pytest.mark.parametrize("name", STREAMS)
def test_every_cut_point(name: str, ending: bytes, strip: bool) -> None:
    """One read split in two at every byte (the BOM on the CR variants), and byte by byte."""
    api = STREAMS[name][0]
    data = stream_bytes(name, ending, bom=ending == b"\r")
    whole = assert_same(api, [data], strip_usage=strip)
    assert whole["events"] > 3  # the fixture parsed as SSE
    body = b"".join(step[0] for step in whole["steps"]) + whole["tail"]
    stripped = strip and name == "openai-include-usage"
    assert (body != data) == stripped
    if name == "openai-include-usage":
        assert (b'"choices":[]' in body) != stripped
        assert body.endswith(ending + b"data: [DONE]" + 2 * ending)
    for k in range(1, len(data)):
        assert_same(api, [data[:k], data[k:]], strip_usage=strip)
    assert_same(api, cut(data, list(range(len(data)))), strip_usage=strip)


def test_fixtures_report_what_upstream_sent() -> None:
    """The fixtures exercise each path: final usage, counted deltas, errors, no usage."""
    results = {name: assert_same(api, [b"".join(make())]) for name, (api, make) in
               STREAMS.items()}
    final = results["openai-include-usage"]["estimated"]
    assert final.estimated is False and final.usage.output_tokens == 17
    assert results["zai-reasoning"]["estimated"].usage.output_tokens == 17
    tools = results["openai-tools-no-usage"]["estimated"]
    assert tools.estimated and tools.usage.output_tokens > 5
    assert results["openai-legacy-error"]["error"] and not results["openai-legacy-error"]["done"]
    not_final = results["openai-usage-not-final"]
    assert not_final["usage"].output_tokens == 2 and not not_final["estimated"].estimated
    assert results["anthropic"]["estimated"].usage.output_tokens == 42
    cut_stream = results["anthropic-cut"]["estimated"]
    assert cut_stream.estimated and cut_stream.input_reported
    assert cut_stream.usage.input_tokens == 25 and cut_stream.usage.output_tokens > 10
    assert results["zai-anthropic"]["estimated"].usage.input_tokens == 25


_names = st.sampled_from(sorted(STREAMS))
_endings = st.sampled_from(sorted(ENDINGS.values()))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=_names, ending=_endings, bom=st.booleans(), strip=st.booleans(),
       count=st.booleans(), data=st.data())
def test_random_splits(name: str, ending: bytes, bom: bool, strip: bool, count: bool,
                       data: st.DataObject) -> None:
    stream = stream_bytes(name, ending, bom)
    points = data.draw(st.lists(st.integers(0, len(stream)), max_size=40))
    # A small cap flushes held deltas to counting in batches: at the same events in both.
    cap = data.draw(st.sampled_from([256 * 1024, 1, 40, 300]))
    assert_same(STREAMS[name][0], cut(stream, points), strip_usage=strip, count_deltas=count,
                max_pending_bytes=cap)


@settings(max_examples=300, deadline=None)
@given(names=st.lists(_names, min_size=2, max_size=4), ending=_endings, data=st.data())
def test_streams_glued_and_limits(names: list[str], ending: bytes, data: st.DataObject) -> None:
    """Several streams in one body (usage after usage, events after [DONE]), with line and
    event limits small enough to overflow somewhere."""
    stream = b"".join(stream_bytes(name, ending, False) for name in names)
    points = data.draw(st.lists(st.integers(0, len(stream)), max_size=30))
    limit = data.draw(st.sampled_from([1 << 20, 400, 150, 60]))
    api = STREAMS[names[0]][0]
    result = assert_same(api, cut(stream, points), strip_usage=data.draw(st.booleans()),
                         max_line_bytes=limit)
    # Each event has one data line, so only a line can pass a limit (events get 4x).
    assert result["steps"][-1][2] == any(len(line) > limit for line in stream.splitlines())


_alphabet = st.sampled_from([b"data:", b"data: ", b"event:", b"event: error", b"event: message_delta",
                             b"event: content_block_delta", b"event: message_start", b": c",
                             b"id: 1", b"retry: 10", b"\n", b"\r", b"\r\n", b"\xef\xbb\xbf",
                             b"{", b"}", b"[DONE]", b'"usage"', b'"usage":', b' null', b'"error"',
                             b'"choices":[]', b'"choices":[{', b'"completion_tokens":3',
                             b'{"usage":{"output_tokens":4}}', b"\xe2\x82", b"\xac", b"\xff",
                             b"\xf0\x9f\x99\x82", b"x", b" "])
_garbage = st.lists(_alphabet, max_size=60).map(b"".join)


@settings(max_examples=600, deadline=None)
@given(api=st.sampled_from(["openai", "anthropic"]), stream=_garbage, strip=st.booleans(),
       limit=st.sampled_from([1 << 20, 0, 3, 12, 40]), cap=st.sampled_from([256 * 1024, 0, 5]),
       data=st.data())
def test_garbage(api: Api, stream: bytes, strip: bool, limit: int, cap: int,
                 data: st.DataObject) -> None:
    points = data.draw(st.lists(st.integers(0, len(stream)), max_size=12))
    assert_same(api, cut(stream, points), strip_usage=strip, max_line_bytes=limit,
                max_pending_bytes=cap)


# The bytes where UTF-8's rules change: lead bytes with narrowed second-byte ranges (E0, ED,
# F0, F4), never-valid ones (C0, C1, F5-FF), and the edges of the continuation ranges.
_utf8_edges = st.sampled_from([0x41, 0x7F, 0x80, 0x8F, 0x90, 0x9F, 0xA0, 0xBF, 0xC0, 0xC1, 0xC2,
                               0xDF, 0xE0, 0xE1, 0xEC, 0xED, 0xEE, 0xEF, 0xF0, 0xF1, 0xF3, 0xF4,
                               0xF5, 0xFF])
_raw = st.lists(_utf8_edges | st.integers(0, 255), max_size=40).map(bytes)


@settings(max_examples=1000)
@given(raw=_raw.map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")))
def test_held_size_counts_characters_as_python_decodes(raw: bytes) -> None:
    """The flush threshold is in characters of the data decoded with errors="replace" (one
    U+FFFD per maximal ill-formed subpart), as the twin measures it."""
    tracker = NativeUsageTracker("anthropic")
    tracker.feed(b"event: content_block_delta\ndata: " + raw + b"\n\n")
    assert tracker.events == 1
    assert tracker.pending_bytes == len(raw.decode("utf-8", "replace"))


def test_forwarded_read_is_the_same_object_when_nothing_changes() -> None:
    """No copy per read: the scanner hands back the read itself, stripping or not, unless
    it holds or drops bytes of it."""
    tracker = NativeUsageTracker("openai", strip_usage=True)
    reads = openai_include_usage()
    outs = [tracker.feed(data) for data in reads]
    assert all(out is data for out, data in zip(outs[:-2], reads, strict=False))
    assert outs[-2] == b""  # the usage chunk
    assert outs[-1] is reads[-1]
    partial = b'data: {"id":"x","choices":[],'
    assert tracker.feed(partial) == b""  # may still be a usage chunk: held
    assert tracker.close() == partial


def test_usage_events_only_reach_python() -> None:
    """Ordinary deltas create no Python object: the accounting sees only the usage chunk."""
    seen: list[tuple[str, bytes]] = []
    tracker = NativeUsageTracker("openai")
    acct = tracker._acct

    class Spy:
        def openai_event(self, data: bytes, has_usage: bool, has_error: bool) -> int:
            seen.append(("openai", data))
            return acct.openai_event(data, has_usage, has_error)

        def flush_raw(self, raw: bytes) -> None:
            seen.append(("flush", raw))
            acct.flush_raw(raw)

    from zaiproxy._native import _relay

    tracker._scan = _relay.Scanner(_relay.OPENAI, Spy())  # type: ignore[arg-type]
    for data in openai_include_usage():
        tracker._scan.feed(data)
    assert [kind for kind, _ in seen] == ["openai"]
    assert orjson.loads(seen[0][1])["usage"] == USAGE
    assert tracker._scan.done and tracker._scan.held_events == 0  # dropped on the final usage
