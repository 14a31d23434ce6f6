"""What token accounting costs: prompt estimates, the streamed-usage tracker, the stripper.

Run it from the repository root::

    .venv/bin/python -m bench.micro.token_cost [--repeat 5]

Every number is the best of ``--repeat`` timed runs (the least disturbed by other
work on a shared machine), in microseconds of one core:

1. loading the encoding (once per process, in this fresh process);
2. ``estimate_openai`` / ``estimate_anthropic`` on a 2 KB and a 200 KB request, and
   the same through ``await estimate(...)`` (inline below THRESHOLD, a worker
   thread above), plus a bare ``trio.to_thread`` round trip and the inline cost
   at 4-64 KB, the numbers behind ``tokens.THRESHOLD``;
3. ``UsageTracker`` per event, each event fed as its own chunk (as the relay gets
   them), with the delta fallback off and on, for streams with and without
   upstream usage; "without" includes the final count (``usage_estimated``);
4. ``UsageChunkStripper`` per event and ``add_include_usage`` per request.
"""

from __future__ import annotations

import argparse
import re
import time
from collections.abc import Callable
from typing import Any

import orjson
import trio

from zaiproxy.mock import payloads
from zaiproxy.request import tokens
from zaiproxy.request.usage import UsageTracker
from zaiproxy.request.usage_rewrite import UsageChunkStripper, add_include_usage

PARAGRAPH = (
    "The proxy counts tokens before it forwards a request, so that a client's budget is "
    "reserved up front. def reserve(key, n): return ledger.take(key, n) # 42 ms, 1.5x. "
)


def best_us(fn: Callable[[], object], number: int, repeat: int) -> float:
    """Best of ``repeat`` runs of ``number`` calls, in microseconds per call."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        for _ in range(number):
            fn()
        best = min(best, time.perf_counter() - start)
    return best / number * 1e6


def text_of(size: int) -> str:
    return (PARAGRAPH * (size // len(PARAGRAPH) + 1))[:size]


def openai_request(size: int) -> dict[str, Any]:
    # Half the body in the system prompt, half in the last user turn, a short
    # exchange in between: roughly what a coding agent sends.
    half = text_of(size // 2 - 200)
    return {
        "model": "glm-4.6",
        "stream": True,
        "max_tokens": 4096,
        "messages": [
            {"role": "system", "content": half},
            {"role": "user", "content": "Fix the failing test."},
            {"role": "assistant", "content": "Which test?"},
            {"role": "user", "content": [{"type": "text", "text": half}]},
        ],
    }


def anthropic_request(size: int) -> dict[str, Any]:
    half = text_of(size // 2 - 200)
    return {
        "model": "glm-4.6",
        "stream": True,
        "max_tokens": 4096,
        "system": [{"type": "text", "text": half, "cache_control": {"type": "ephemeral"}}],
        "messages": [
            {"role": "user", "content": "Fix the failing test."},
            {"role": "assistant", "content": [{"type": "text", "text": "Which test?"}]},
            {"role": "user", "content": [{"type": "text", "text": half}]},
        ],
    }


def bench_estimates(repeat: int) -> list[str]:
    lines = ["| request | body | tokens | inline µs | `await estimate` µs |", "|---|---:|---:|---:|---:|"]
    for api, build, count in [
        ("openai", openai_request, tokens.estimate_openai),
        ("anthropic", anthropic_request, tokens.estimate_anthropic),
    ]:
        for size in (2_000, 200_000):
            payload = build(size)
            body_len = len(orjson.dumps(payload))
            number = 2000 if size < 10_000 else 30
            inline = best_us(lambda p=payload, f=count: f(p), number, repeat)  # type: ignore[misc]

            async def many(
                a: Any = api, p: dict[str, Any] = payload, n: int = body_len, k: int = number
            ) -> None:
                for _ in range(k):
                    await tokens.estimate(a, p, n)

            through = best_us(lambda f=many: trio.run(f), 1, repeat) / number  # type: ignore[misc]
            est = count(payload)
            lines.append(
                f"| {api} | {body_len / 1000:.0f} KB | {est.prompt_tokens:,} | {inline:,.0f} | {through:,.0f} |"
            )
    return lines


def bench_threshold(repeat: int) -> list[str]:
    async def hops(k: int = 500) -> None:
        for _ in range(k):
            await trio.to_thread.run_sync(int, limiter=tokens._LIMITER)

    hop = best_us(lambda: trio.run(hops), 1, repeat) / 500
    lines = [f"`trio.to_thread.run_sync` round trip: {hop:,.0f} µs", "",
             "| body | inline estimate µs | thread hop as % of it |", "|---:|---:|---:|"]
    for kb in (4, 8, 16, 32, 64):
        payload = openai_request(kb * 1024)
        inline = best_us(lambda p=payload: tokens.estimate_openai(p), 100, repeat)  # type: ignore[misc]
        lines.append(f"| {kb} KB | {inline:,.0f} | {hop / inline * 100:.0f}% |")
    return lines


def openai_events(chunks: int, usage: bool) -> list[bytes]:
    """One chat.completion.chunk per ~1-token delta, like a real model; optionally no usage."""
    events = payloads.chat_events("bench", "glm-4.6", chunks, 4, 1000)
    if not usage:
        last = events[-2]
        events[-2] = last[: last.index(b',"usage":')] + b"}\n\n"
    return events


def include_usage_events(chunks: int) -> list[bytes]:
    """OpenAI's include_usage shape: `"usage":null` on every chunk, then a usage-only chunk."""
    events = openai_events(chunks, usage=False)
    events = [re.sub(rb"\}\n\n$", b',"usage":null}\n\n', e) if e.startswith(b"data: {") else e
              for e in events]
    final = (b'data: {"id":"x","object":"chat.completion.chunk","choices":[],"usage":'
             b'{"prompt_tokens":1000,"completion_tokens":%d,"total_tokens":%d}}\n\n'
             % (chunks, chunks + 1000))
    return [*events[:-1], final, events[-1]]


def anthropic_stream(chunks: int, usage: bool) -> list[bytes]:
    events = payloads.anthropic_events("bench", "glm-4.6", chunks, 4, 1000)
    if not usage:
        events = [e for e in events if not e.startswith(b"event: message_delta")]
    return events


def bench_tracker(repeat: int, lengths: list[int]) -> list[str]:
    lines = ["Deltas of 4 characters (~1 token each), one event per chunk. The fallback holds up",
             "to 256 KB of raw events; longer streams are parsed and counted as they pass it.",
             "", "| stream | deltas | upstream usage | fallback off µs/event | fallback on µs/event"
             " | final count µs |", "|---|---:|---|---:|---:|---:|"]
    for chunks in lengths:
        cases = [
            ("openai (Z.AI shape)", "openai", openai_events(chunks, usage=True), "yes"),
            ("openai include_usage", "openai", include_usage_events(chunks), "yes"),
            ("openai", "openai", openai_events(chunks, usage=False), "no"),
            ("anthropic", "anthropic", anthropic_stream(chunks, usage=True), "yes"),
            ("anthropic", "anthropic", anthropic_stream(chunks, usage=False), "input only"),
        ]
        for name, api, events, has_usage in cases:
            results = []
            for count_deltas in (False, True):
                def run(e: list[bytes] = events, a: Any = api, c: bool = count_deltas) -> object:
                    tracker = UsageTracker(a, count_deltas=c)
                    for event in e:
                        tracker.feed(event)
                    tracker.close()
                    return tracker.usage_estimated()

                results.append(best_us(run, 1, repeat) / len(events))

            def fed(e: list[bytes] = events, a: Any = api) -> UsageTracker:
                tracker = UsageTracker(a)
                for event in e:
                    tracker.feed(event)
                return tracker

            final_cost = min(_time(fed().usage_estimated) for _ in range(repeat))
            lines.append(f"| {name} | {chunks:,} | {has_usage} | {results[0]:.2f} | "
                         f"{results[1]:.2f} | {final_cost:,.0f} |")
    return lines


def _time(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e6


def bench_stripper(repeat: int, chunks: int) -> list[str]:
    events = include_usage_events(chunks)

    def run() -> None:
        stripper = UsageChunkStripper()
        for event in events:
            stripper.feed(event)
        stripper.close()

    per_event = best_us(run, 1, repeat) / len(events)
    body = orjson.dumps(openai_request(2_000) | {"stream_options": None})
    body = body.replace(b',"stream_options":null', b"")
    rewrite = best_us(lambda: add_include_usage(body), 2000, repeat)
    return [f"`UsageChunkStripper.feed`: {per_event:.2f} µs per event (include_usage stream, "
            f"one event per chunk); `add_include_usage` on a {len(body):,}-byte body: "
            f"{rewrite:.1f} µs"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per number (best kept)")
    parser.add_argument("--chunks", type=int, nargs="+", default=[500, 2000],
                        help="deltas per benchmark stream (several: one row each)")
    args = parser.parse_args()

    start = time.perf_counter()
    tokens.encoding()
    load_ms = (time.perf_counter() - start) * 1e3
    sections = [
        f"Loading the encoding: {load_ms:,.0f} ms (once per process)",
        "",
        "## Prompt estimates",
        "",
        *bench_estimates(args.repeat),
        "",
        "## THRESHOLD (inline vs worker thread)",
        "",
        *bench_threshold(args.repeat),
        "",
        "## UsageTracker",
        "",
        *bench_tracker(args.repeat, args.chunks),
        "",
        "## include_usage rewrite",
        "",
        *bench_stripper(args.repeat, max(args.chunks)),
    ]
    print("\n".join(sections))


if __name__ == "__main__":
    main()
