"""The proxy's own limits through the real request path (in-process worker, real mock upstream).

The multi-process exactness tests are in test_limits_procs.py; the ledger's
arithmetic on a virtual clock is in test_ledger.py. Here: what a client sees
(429 bodies in its API's shape, Retry-After, x-ratelimit-* headers on every
response), token reservations settled against real usage, the bounded wait
queue, local count_tokens and the admin reset.
"""

from __future__ import annotations

import time

import orjson
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from tests.harness import RawClient, make_config, request, start_mock, start_proxy, wait_until
from zaiproxy.core.logs import get_logger
from zaiproxy.limits.cells import SC_ADAPTIVE_MRPS, SC_ADAPTIVE_RESET
from zaiproxy.request.tokens import estimate_anthropic, estimate_openai

JSON = ("content-type", "application/json")
CHAT = {"model": "glm-4.6", "messages": [{"role": "user", "content": "hello there"}]}
MESSAGES = {"model": "glm-4.6", "max_tokens": 64,
            "messages": [{"role": "user", "content": "hello there"}]}


async def chat(proxy, payload=None, headers=()):
    return await request(proxy.port, "POST", "/v1/chat/completions", [JSON, *headers],
                         orjson.dumps(payload or CHAT))


async def messages(proxy, payload=None, headers=()):
    return await request(proxy.port, "POST", "/v1/messages", [JSON, *headers],
                         orjson.dumps(payload or MESSAGES))


async def mock_requests(upstream: str) -> int:
    resp = await request(upstream, "GET", "/mock/stats")
    return int(resp.json()["requests"])


@pytest.fixture
async def upstream(nursery):
    return await start_mock(nursery)


async def test_requests_per_minute_429_in_each_api_shape(nursery, upstream):
    proxy = await start_proxy(nursery, make_config(upstream, requests_per_minute=3))
    seen = []
    for _ in range(3):
        resp = await chat(proxy)
        assert resp.status == 200
        assert resp.header(b"x-ratelimit-limit-requests") == b"3"
        seen.append(int(resp.header(b"x-ratelimit-remaining-requests")))
    assert seen == [2, 1, 0]

    refused = await chat(proxy)
    assert refused.status == 429
    err = refused.json()["error"]
    assert err["type"] == "rate_limit_exceeded"
    assert err["code"] == "proxy_rate_limit"
    assert "proxy rate limit" in err["message"]
    assert "requests_per_minute=3" in err["message"]
    # GCRA: one request every 20 s; the 4th fits 20 s after the first (minus the elapsed ms).
    assert refused.header(b"retry-after") == b"20"
    assert refused.header(b"x-zaiproxy-limit") == b"global:requests_per_minute"
    assert refused.header(b"x-ratelimit-remaining-requests") == b"0"

    anthropic = await messages(proxy)
    assert anthropic.status == 429
    body = anthropic.json()
    assert body["type"] == "error"
    assert body["error"]["type"] == "rate_limit_error"
    # The refused requests never reached upstream.
    assert await mock_requests(upstream) == 3


async def test_streams_carry_ratelimit_headers(nursery, upstream):
    proxy = await start_proxy(nursery, make_config(upstream, requests_per_minute=10,
                                                   tokens_per_minute=100_000))
    resp = await chat(proxy, {**CHAT, "stream": True})
    assert resp.status == 200
    assert resp.header(b"content-type").startswith(b"text/event-stream")
    assert resp.header(b"x-ratelimit-limit-requests") == b"10"
    assert resp.header(b"x-ratelimit-remaining-requests") == b"9"
    assert resp.header(b"x-ratelimit-limit-tokens") == b"100000"
    remaining = int(resp.header(b"x-ratelimit-remaining-tokens"))
    # The reservation (prompt + the default output cap of 4096) is held while it runs.
    prompt = estimate_openai({**CHAT, "stream": True}).prompt_tokens
    assert remaining == 100_000 - prompt - 4096
    assert resp.header(b"x-ratelimit-reset-tokens").endswith(b"s")


async def test_no_limits_no_ratelimit_headers(nursery, upstream):
    proxy = await start_proxy(nursery, make_config(upstream))
    resp = await chat(proxy)
    assert resp.status == 200
    assert resp.header(b"x-ratelimit-limit-requests") is None


async def test_token_reservation_settles_to_real_usage(nursery, upstream, log_buffer):
    limit = 50_000
    proxy = await start_proxy(nursery, make_config(upstream, tokens_per_minute=limit))
    ctx = proxy.worker.ctx
    frozen = time.monotonic_ns()
    ctx.admitter.clock = lambda: frozen  # no refill while we look: exact counts
    payload = {**MESSAGES, "max_tokens": 20_000}
    body = orjson.dumps(payload)
    first = await messages(proxy, payload)
    assert first.status == 200
    prompt = estimate_anthropic(payload).prompt_tokens
    # While admitted, the whole reservation was held...
    assert int(first.header(b"x-ratelimit-remaining-tokens")) == limit - prompt - 20_000
    usage = first.json()["usage"]
    real = usage["input_tokens"] + usage["output_tokens"]
    assert usage["input_tokens"] == len(body) // 4  # the mock's count: input = body / 4
    assert real < 20_000
    # ...and after settling only the real usage is charged: the difference was refunded.
    plan = ctx.admitter.plan(None, None)
    requests_state, tokens_state = ctx.admitter.rate_states(plan)
    assert requests_state is None
    assert tokens_state is not None
    assert tokens_state.remaining == limit - real
    # The record charged with the same usage (Anthropic: input excludes cache, none here).
    get_logger().flush()
    line = next(orjson.loads(raw) for raw in log_buffer.getvalue().splitlines()
                if b'"event":"request"' in raw)
    assert (line["usage"]["input_tokens"], line["usage"]["output_tokens"]) == (
        usage["input_tokens"], usage["output_tokens"])


async def test_reservation_larger_than_the_limit_is_a_clear_400(nursery, upstream):
    proxy = await start_proxy(nursery, make_config(upstream, tokens_per_minute=1000))
    resp = await chat(proxy, {**CHAT, "max_tokens": 5000})
    assert resp.status == 400
    err = resp.json()["error"]
    assert err["code"] == "reservation_exceeds_limit"
    assert "tokens_per_minute=1000" in err["message"]
    assert "max_tokens" in err["message"]
    assert await mock_requests(upstream) == 0


async def test_failed_upstream_refunds_the_reservation(nursery, upstream):
    limit = 10_000
    proxy = await start_proxy(nursery, make_config(upstream, tokens_per_minute=limit))
    resp = await chat(proxy, {**CHAT, "max_tokens": 500}, [("x-mock-status", "500")])
    assert resp.status == 500
    plan = proxy.worker.ctx.admitter.plan(None, None)
    _, tokens_state = proxy.worker.ctx.admitter.rate_states(plan)
    assert tokens_state is not None and tokens_state.remaining == limit


async def test_concurrency_refused_at_once_without_queue(nursery, upstream):
    proxy = await start_proxy(nursery, make_config(upstream, concurrency=1))
    slow = [("x-mock-first-byte-delay", "0.5")]
    results: dict[str, int] = {}

    async def first() -> None:
        results["first"] = (await chat(proxy, headers=slow)).status

    nursery.start_soon(first)
    ctx = proxy.worker.ctx
    row = ctx.admitter.plan(None, None).ops[0].index
    await wait_until(lambda: ctx.ledger.in_use(row) != 0)
    second = await chat(proxy)
    assert second.status == 429
    assert second.header(b"x-zaiproxy-limit") == b"global:concurrency"
    assert second.header(b"retry-after") == b"1"
    await wait_until(lambda: not ("first" not in results))
    assert results["first"] == 200
    assert ctx.ledger.in_use(row) == 0


async def test_queue_waits_for_a_slot(nursery, upstream):
    proxy = await start_proxy(nursery, make_config(upstream, concurrency=1, queue_timeout=10.0))
    statuses: list[int] = []

    async def one() -> None:
        statuses.append((await chat(proxy, headers=[("x-mock-first-byte-delay", "0.2")])).status)

    async with trio.open_nursery() as inner:
        for _ in range(3):
            inner.start_soon(one)
    assert statuses == [200, 200, 200]
    stats = (await request(upstream, "GET", "/mock/stats")).json()
    assert stats["peak_in_flight"] == 1
    assert proxy.worker.ctx.wait_queue.waiting == 0
    # Every request's queue wait, time to first byte, overhead and token count are observed.
    text = (await request(proxy.port, "GET", "/metrics")).body.decode()
    samples = {(s.name, s.labels.get("le")): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    for name in ("zai_proxy_rate_limit_wait_seconds", "zai_proxy_time_to_first_token_seconds",
                 "zai_proxy_overhead_seconds", "zai_proxy_token_count_duration_seconds"):
        assert samples[(name + "_count", None)] == 3, name
    # Two of the three waited at least one 0.2 s upstream delay; one was admitted at once.
    assert samples[("zai_proxy_rate_limit_wait_seconds_bucket", "0.1")] == 1


async def test_queue_timeout_then_429(nursery, upstream):
    proxy = await start_proxy(nursery, make_config(upstream, requests_per_minute=1,
                                                   queue_timeout=0.5))
    assert (await chat(proxy)).status == 200
    # The next slot is 60 s away: longer than the queue timeout, so no waiting at all.
    with trio.fail_after(2):
        refused = await chat(proxy)
    assert refused.status == 429
    assert refused.header(b"retry-after") == b"60"


async def test_client_leaving_the_queue(nursery, upstream):
    proxy = await start_proxy(nursery, make_config(upstream, concurrency=1, queue_timeout=30.0))
    ctx = proxy.worker.ctx
    holder = await RawClient.connect("127.0.0.1", proxy.port)
    body = orjson.dumps(CHAT)

    async def hold() -> None:
        await holder.request("POST", "/v1/chat/completions",
                             [JSON, ("x-mock-first-byte-delay", "2")], body)

    nursery.start_soon(hold)
    row = ctx.admitter.plan(None, None).ops[0].index
    await wait_until(lambda: ctx.ledger.in_use(row) != 0)
    waiter = await trio.open_tcp_stream("127.0.0.1", proxy.port)
    await waiter.send_all(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n"
                          b"content-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                          % (len(body), body))
    await wait_until(lambda: ctx.wait_queue.waiting != 0)
    await waiter.aclose()
    await wait_until(lambda: ctx.wait_queue.waiting == 0)
    # Only the holder ever reached upstream.
    assert await mock_requests(upstream) == 1


async def test_count_tokens_answered_locally(nursery, upstream):
    proxy = await start_proxy(nursery, make_config(upstream, count_tokens_locally=True))
    payload = {"model": "glm-4.6", "system": "be brief",
               "messages": [{"role": "user", "content": "count me please"}]}
    resp = await request(proxy.port, "POST", "/v1/messages/count_tokens", [JSON],
                         orjson.dumps(payload))
    assert resp.status == 200
    assert resp.json() == {"input_tokens": estimate_anthropic(payload).prompt_tokens}
    assert await mock_requests(upstream) == 0
    # Without the setting, it is forwarded (the mock answers with its own count).
    forwarded = await start_proxy(nursery, make_config(upstream))
    resp = await request(forwarded.port, "POST", "/v1/messages/count_tokens", [JSON],
                         orjson.dumps(payload))
    assert resp.status == 200
    assert await mock_requests(upstream) == 1


async def test_admin_reset_needs_the_token(nursery, upstream):
    proxy = await start_proxy(nursery, make_config(upstream, admin_token="adm-token-1"))
    ledger = proxy.worker.ctx.ledger
    ledger.scalar_set(SC_ADAPTIVE_MRPS, 2500)  # as if the supervisor had backed off
    for headers in ([], [("authorization", "Bearer wrong")]):
        resp = await request(proxy.port, "POST", "/admin/reset-rate-limit", headers)
        assert resp.status == 401
        assert "admin token" in resp.json()["error"]["message"]
        assert b"adm-token-1" not in resp.body
    assert ledger.scalar_get(SC_ADAPTIVE_MRPS) == 2500
    resp = await request(proxy.port, "POST", "/admin/reset-rate-limit",
                         [("authorization", "Bearer adm-token-1")])
    assert resp.status == 200
    assert resp.json() == {"reset": True, "generation": 1}
    assert ledger.scalar_get(SC_ADAPTIVE_MRPS) == 0
    assert ledger.scalar_get(SC_ADAPTIVE_RESET) == 1
    get = await request(proxy.port, "GET", "/admin/reset-rate-limit")
    assert get.status == 405


async def test_adaptive_rate_limits_admission(nursery, upstream):
    proxy = await start_proxy(nursery, make_config(upstream))
    proxy.worker.ctx.ledger.scalar_set(SC_ADAPTIVE_MRPS, 2000)  # 2 requests/s, burst 2
    statuses = [(await chat(proxy)).status for _ in range(3)]
    assert statuses == [200, 200, 429]
    # Counted as what it is (no global requests limit is configured here), in the client
    # bucket of 127.0.0.1 (the original's source-NN: tests/test_labels.py).
    metrics = (await request(proxy.port, "GET", "/metrics")).body.decode()
    assert ('zai_proxy_rate_limit_rejections_total{client="source-30",limit="adaptive_rate",'
            'scope="global",variant="production"} 1.0') in metrics
    refused = await chat(proxy)
    assert "adaptive upstream rate" in refused.json()["error"]["message"]
    assert refused.header(b"x-zaiproxy-limit") == b"global:adaptive_rate"


async def test_health_says_which_ledger(nursery, upstream):
    proxy = await start_proxy(nursery, make_config(upstream))
    health = (await request(proxy.port, "GET", "/health")).json()
    assert health["ledger"] == proxy.worker.ctx.ledger_impl
    assert health["ledger"] == proxy.worker.ctx.ledger.implementation
    metrics = (await request(proxy.port, "GET", "/metrics")).body.decode()
    assert f'zai_proxy_ledger_info{{implementation="{health["ledger"]}"' in metrics


@pytest.mark.parametrize("opt_in", [True, False])
async def test_key_alias_metrics_are_opt_in(nursery, upstream, tmp_path, opt_in):
    keys = tmp_path / "keys.toml"
    keys.write_text('[[keys]]\nalias = "alice"\nkey = "zp-alice-secret-1"\n')
    proxy = await start_proxy(nursery, make_config(upstream, keys_file=str(keys),
                                                   alias_metrics=opt_in))
    assert (await chat(proxy, headers=[("x-api-key", "zp-alice-secret-1")])).status == 200
    assert (await chat(proxy, headers=[("x-api-key", "zp-wrong")])).status == 401
    text = (await request(proxy.port, "GET", "/metrics")).body.decode()
    assert "zp-alice-secret-1" not in text
    line = 'zai_proxy_key_requests_total{key="alice",status="200",variant="production"} 1.0'
    assert (line in text) is opt_in
    assert "zp-wrong" not in text
