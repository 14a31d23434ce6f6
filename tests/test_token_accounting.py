"""Token accounting through the real request path: upstream usage first, counted deltas second.

The mock's ``x-mock-usage`` control makes it behave like each kind of upstream:
``final`` (Z.AI: usage on the last chunk), ``separate`` (OpenAI with
``stream_options.include_usage``: one extra chunk with ``"choices":[]``), ``none``
(no usage at all). The ledger's token counters are read back per
(model, estimated) from the records the proxy emitted.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import orjson
import pytest

from tests.harness import make_config, request, start_mock, start_proxy
from zaiproxy.core.logs import get_logger
from zaiproxy.http import netstream
from zaiproxy.http.sse import SSEParser
from zaiproxy.mock.payloads import expected_text
from zaiproxy.request import scanner
from zaiproxy.request.tokens import count_text, estimate_anthropic, estimate_openai
from zaiproxy.request.usage_rewrite import add_include_usage

JSON = ("content-type", "application/json")
CHAT = {"model": "glm-4.6", "stream": True,
        "messages": [{"role": "user", "content": "tell me a story"}]}
MESSAGES = {"model": "glm-4.6", "stream": True, "max_tokens": 256,
            "messages": [{"role": "user", "content": "tell me a story"}]}
CHUNKS = 40
SIZE = 16


@pytest.fixture(scope="module", autouse=True, params=["python", "native"])
def relay_scanner(request: pytest.FixtureRequest) -> Iterator[str]:
    """Every test here runs with the native stream scanner and pump and with their pure-Python
    twins (zaiproxy/request/scanner.py chooses the scanner, netstream.PUMP says whether the
    relay uses the pump)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(scanner, "Tracker", scanner.load(request.param))
        if request.param == "python":
            patch.setattr(netstream, "PUMP", False)
        yield request.param


def counters(log_buffer, ctx, model: str, estimated: bool) -> tuple[int, int, int]:
    """(requests, input, output) the proxy recorded for one model label and estimated flag,
    read back from the records it emitted (the access log: one line per request)."""
    get_logger().flush()
    n = tokens_in = tokens_out = 0
    for raw in log_buffer.getvalue().splitlines():
        line = orjson.loads(raw)
        usage = line.get("usage")
        if line.get("event") != "request" or usage is None:
            continue
        if ctx.model_label(line.get("model")) != model or usage.get("estimated", False) != estimated:
            continue
        n, tokens_in, tokens_out = n + 1, tokens_in + usage["input_tokens"], \
            tokens_out + usage["output_tokens"]
    return n, tokens_in, tokens_out


def data_events(body: bytes) -> list[str]:
    parser = SSEParser()
    events = parser.feed(body) + parser.close()
    return [e.data for e in events]


@pytest.fixture
async def upstream(nursery):
    return await start_mock(nursery)


async def stream_chat(proxy, payload, usage_mode: str):
    return await request(proxy.port, "POST", "/v1/chat/completions",
                         [JSON, ("x-mock-usage", usage_mode), ("x-mock-chunks", str(CHUNKS)),
                          ("x-mock-chunk-size", str(SIZE))], orjson.dumps(payload))


async def test_upstream_usage_wins(nursery, upstream, log_buffer):
    proxy = await start_proxy(nursery, make_config(upstream))
    resp = await stream_chat(proxy, CHAT, "final")
    assert resp.status == 200
    last = orjson.loads(data_events(resp.body)[-2])
    usage = last["usage"]
    assert counters(log_buffer, proxy.worker.ctx, "glm-4.6", False) == (
        1, usage["prompt_tokens"], usage["completion_tokens"])
    assert counters(log_buffer, proxy.worker.ctx, "glm-4.6", True) == (0, 0, 0)


async def test_openai_stream_without_usage_is_counted(nursery, upstream, log_buffer):
    proxy = await start_proxy(nursery, make_config(upstream))
    resp = await stream_chat(proxy, CHAT, "none")
    assert resp.status == 200
    assert b'"usage"' not in resp.body
    prompt = estimate_openai(CHAT).prompt_tokens
    output = count_text(expected_text(CHUNKS, SIZE))
    assert output > 0
    assert counters(log_buffer, proxy.worker.ctx, "glm-4.6", True) == (1, prompt, output)
    assert counters(log_buffer, proxy.worker.ctx, "glm-4.6", False) == (0, 0, 0)
    get_logger().flush()
    lines = [orjson.loads(raw) for raw in log_buffer.getvalue().splitlines()]
    line = next(r for r in lines if r.get("event") == "request")
    assert line["usage"] == {"input_tokens": prompt, "output_tokens": output,
                             "cache_read_tokens": 0, "cache_write_tokens": 0, "estimated": True}
    assert line["prompt_estimate"] == prompt


async def test_anthropic_stream_without_final_usage_is_counted(nursery, upstream, log_buffer):
    proxy = await start_proxy(nursery, make_config(upstream))
    resp = await request(proxy.port, "POST", "/v1/messages",
                         [JSON, ("x-mock-usage", "none"), ("x-mock-chunks", str(CHUNKS)),
                          ("x-mock-chunk-size", str(SIZE))], orjson.dumps(MESSAGES))
    assert resp.status == 200
    prompt = estimate_anthropic(MESSAGES).prompt_tokens
    output = count_text(expected_text(CHUNKS, SIZE))
    assert counters(log_buffer, proxy.worker.ctx, "glm-4.6", True) == (1, prompt, output)


async def test_unknown_models_count_as_other(nursery, upstream, log_buffer):
    proxy = await start_proxy(nursery, make_config(upstream))
    for i in range(3):
        resp = await stream_chat(proxy, {**CHAT, "model": f"client-chosen-{i}"}, "final")
        assert resp.status == 200
    assert counters(log_buffer, proxy.worker.ctx, "other", False)[0] == 3
    assert counters(log_buffer, proxy.worker.ctx, "client-chosen-0", False) == (0, 0, 0)


async def test_counting_off_counts_nothing(nursery, upstream, log_buffer):
    proxy = await start_proxy(nursery, make_config(upstream, token_counting=False))
    resp = await stream_chat(proxy, CHAT, "none")
    assert resp.status == 200
    assert counters(log_buffer, proxy.worker.ctx, "glm-4.6", True) == (0, 0, 0)
    assert counters(log_buffer, proxy.worker.ctx, "glm-4.6", False) == (0, 0, 0)


async def test_include_usage_asked_and_stripped(nursery, upstream, log_buffer):
    proxy = await start_proxy(nursery, make_config(upstream, openai_include_usage=True))
    # Upstream got the rewritten body (stream_options.include_usage added, nothing else).
    echoed = await request(proxy.port, "POST", "/v1/chat/completions",
                           [JSON, ("x-mock-echo", "1")], orjson.dumps(CHAT))
    rewritten = add_include_usage(orjson.dumps(CHAT))
    assert rewritten is not None
    assert orjson.loads(rewritten)["stream_options"] == {"include_usage": True}
    assert echoed.json()["body_sha256"] == hashlib.sha256(rewritten).hexdigest()

    resp = await stream_chat(proxy, CHAT, "separate")
    assert resp.status == 200
    datas = data_events(resp.body)
    assert datas[-1] == "[DONE]"
    # The client did not ask for usage: the extra chunk is gone, every other event is intact.
    assert all('"usage"' not in d for d in datas)
    direct = await request(upstream, "POST", "/api/paas/v4/chat/completions",
                           [JSON, ("authorization", "Bearer upstream-secret-key-0123456789"),
                            ("x-mock-usage", "separate"), ("x-mock-chunks", str(CHUNKS)),
                            ("x-mock-chunk-size", str(SIZE))], rewritten)
    upstream_datas = data_events(direct.body)
    assert len(upstream_datas) == len(datas) + 1
    usage = orjson.loads(upstream_datas[-2])["usage"]
    # ...and the proxy still read it: counted from upstream, not estimated.
    assert counters(log_buffer, proxy.worker.ctx, "glm-4.6", False) == (
        1, usage["prompt_tokens"], usage["completion_tokens"])


async def test_client_that_asked_for_usage_keeps_it(nursery, upstream):
    proxy = await start_proxy(nursery, make_config(upstream, openai_include_usage=True))
    payload = {**CHAT, "stream_options": {"include_usage": True}}
    resp = await stream_chat(proxy, payload, "separate")
    datas = data_events(resp.body)
    extra = orjson.loads(datas[-2])
    assert extra["choices"] == []
    assert extra["usage"]["completion_tokens"] == CHUNKS
