"""Z.AI 429 handling end to end: the real mock upstream, the in-process proxy, exact numbers.

Every expectation is written out, not computed with the code under test: the
waits come from the default policy (concurrency 0.5/1/2 s, frequency and unknown
1/2/4 s, congestion 2/4/8 s, quota never) raised to the mock's ``retry-after: 1``;
the reset times of the mock's 1308/1310 texts were converted by hand
(``2026-11-27 23:00:00`` Beijing = 2026-11-27T15:00:00Z = 1795791600). Upstream
calls are counted at the mock (``GET /mock/stats``), waits by the harness's
virtual sleep (``proxy.waits``), and the proxy's wall clock is pinned so the
derived ``Retry-After`` of a quota 429 is exact.
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest
import trio
import trio.testing
from prometheus_client.parser import text_string_to_metric_families

from tests.harness import (
    UPSTREAM_KEY,
    InProcessProxy,
    Response,
    make_config,
    request,
    start_mock,
    start_proxy,
    wait_until,
)
from zaiproxy.limits.admission import LimitKind
from zaiproxy.limits.cells import (
    SC_ADAPTIVE_EPOCH,
    W_THROTTLED_CONCURRENCY,
    W_THROTTLED_FREQUENCY,
    W_THROTTLED_REQUESTS,
    W_THROTTLED_UNKNOWN,
    W_UPSTREAM_REQUESTS,
    W_UPSTREAM_THROTTLED,
)

NOW = 1795791600 - 10800  # 2026-11-27T12:00:00Z: three hours before the 1308 reset
RESET_1308 = b"2026-11-27T15:00:00Z"  # "2026-11-27 23:00:00" in Beijing (UTC+8)
RESET_1310 = b"2026-11-30T16:00:00Z"  # "2026-12-01 00:00:00" in Beijing

CHAT_BODY = orjson.dumps({"model": "glm-4.6", "messages": [{"role": "user", "content": "hi"}]})
MESSAGES_BODY = orjson.dumps({"model": "glm-4.6", "max_tokens": 64,
                              "messages": [{"role": "user", "content": "hi"}]})


class Endpoint:
    """One client route, where the proxy sends it and how the mock wants the upstream key."""

    def __init__(self, target: str, upstream: str, auth: tuple[str, str], body: bytes) -> None:
        self.target, self.upstream, self.auth, self.body = target, upstream, auth, body

    def __repr__(self) -> str:
        return self.target


OPENAI = Endpoint("/v1/chat/completions", "/api/paas/v4/chat/completions",
             ("authorization", f"Bearer {UPSTREAM_KEY}"), CHAT_BODY)
ANTHROPIC = Endpoint("/v1/messages", "/api/anthropic/v1/messages", ("x-api-key", UPSTREAM_KEY),
                MESSAGES_BODY)
APIS = [pytest.param(OPENAI, id="chat"), pytest.param(ANTHROPIC, id="messages")]
SHAPES = ["openai", "native", "anthropic"]

# code, class, waits with the mock's default `retry-after: 1` (max(backoff, 1)).
CLASSES = [
    (1302, "concurrency", [1.0, 1.0, 2.0]),
    (1303, "frequency", [1.0, 2.0, 4.0]),
    (1305, "overload", [2.0, 4.0, 8.0]),
    (1308, "quota", []),
    (1310, "quota", []),
    (1312, "congestion", [2.0, 4.0, 8.0]),
]
RESETS = {1308: RESET_1308, 1310: RESET_1310}
ADDED_BY_PROXY = frozenset({b"x-zaiproxy-request-id", b"x-zai-error-class", b"x-zai-error-code",
                            b"x-zai-rate-limit-reset"})


# --- fixtures and helpers -------------------------------------------------------------------


@pytest.fixture
async def mock(nursery: trio.Nursery) -> str:
    return await start_mock(nursery)


async def open_proxy(nursery: trio.Nursery, mock: str, **overrides: Any) -> InProcessProxy:
    proxy = await start_proxy(nursery, make_config(mock, **overrides))
    proxy.worker.ctx.wall = lambda: float(NOW)
    return proxy


@pytest.fixture
async def proxy(nursery: trio.Nursery, mock: str) -> InProcessProxy:
    return await open_proxy(nursery, mock)


def hdrs(*pairs: tuple[str, str]) -> list[tuple[str, str]]:
    return [("content-type", "application/json"), *pairs]


async def via_proxy(proxy: InProcessProxy, api: Endpoint, headers: list[tuple[str, str]],
                    body: bytes | None = None) -> Response:
    return await request(proxy.port, "POST", api.target, headers,
                         api.body if body is None else body)


async def direct(mock: str, api: Endpoint, headers: list[tuple[str, str]],
                 body: bytes | None = None) -> Response:
    """What the mock answers the proxy's request (same path, body and controls); then the
    mock's statistics are zeroed, so they count only what the proxy sends afterwards."""
    resp = await request(mock, "POST", api.upstream, [*headers, api.auth],
                         api.body if body is None else body)
    assert (await request(mock, "POST", "/mock/stats/reset")).status == 200
    return resp


async def upstream_calls(mock: str, key: str | None = None) -> int:
    stats = (await request(mock, "GET", "/mock/stats")).json()
    return stats["requests"] if key is None else stats["by_key"].get(key, 0)


def without_framing(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    return [(n, v) for n, v in headers if n != b"connection"]


def assert_relayed(resp: Response, upstream: Response,
                   zai_headers: list[tuple[bytes, bytes]]) -> None:
    """The final 429 is upstream's: status, body byte for byte, every header in order; then
    the proxy's request id and exactly ``zai_headers``."""
    assert resp.status == upstream.status == 429
    assert resp.body == upstream.body
    kept = without_framing(upstream.headers)
    assert resp.headers[: len(kept)] == kept
    assert resp.headers[len(kept)][0] == b"x-zaiproxy-request-id"
    assert resp.headers[len(kept) + 1 :] == zai_headers


def counters(proxy: InProcessProxy) -> tuple[int, int, int, tuple[int, int, int]]:
    """The worker's activity row: (answers, account throttles, throttled requests,
    (concurrency, frequency, unknown))."""
    ctx = proxy.worker.ctx
    row = ctx.admitter.activity_row
    get = ctx.ledger.counter_get
    return (get(row, W_UPSTREAM_REQUESTS), get(row, W_UPSTREAM_THROTTLED),
            get(row, W_THROTTLED_REQUESTS),
            (get(row, W_THROTTLED_CONCURRENCY), get(row, W_THROTTLED_FREQUENCY),
             get(row, W_THROTTLED_UNKNOWN)))


# --- 1. every class, both APIs, every envelope ------------------------------------------------


@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(("code", "cls", "waits"), CLASSES)
async def test_each_class_is_retried_per_policy_then_relayed(
    proxy: InProcessProxy, mock: str, api: Endpoint, shape: str, code: int, cls: str,
    waits: list[float],
) -> None:
    controls = hdrs(("x-mock-zai-code", str(code)), ("x-mock-zai-shape", shape))
    upstream = await direct(mock, api, controls)
    assert upstream.header(b"retry-after") == b"1"

    resp = await via_proxy(proxy, api, controls)

    assert proxy.waits == waits
    assert await upstream_calls(mock) == len(waits) + 1  # quota: exactly one, never retried
    expected = [(b"x-zai-error-class", cls.encode()), (b"x-zai-error-code", str(code).encode())]
    if code in RESETS:
        expected.append((b"x-zai-rate-limit-reset", RESETS[code]))
    # Upstream sent `retry-after: 1`: kept as is, none derived (a second one would be a bug).
    assert_relayed(resp, upstream, expected)
    assert [v for n, v in resp.headers if n == b"retry-after"] == [b"1"]


@pytest.mark.parametrize("api", APIS)
async def test_unknown_429_is_retried_like_frequency(
    proxy: InProcessProxy, mock: str, api: Endpoint
) -> None:
    # x-mock-status: 429 is a plain API error body (no business code) and no Retry-After.
    controls = hdrs(("x-mock-status", "429"))
    upstream = await direct(mock, api, controls)
    assert upstream.header(b"retry-after") is None

    resp = await via_proxy(proxy, api, controls)

    assert proxy.waits == [1.0, 2.0, 4.0]
    assert await upstream_calls(mock) == 4
    # No code, no reset, no hint: only the class is added, and no Retry-After is invented.
    assert_relayed(resp, upstream, [(b"x-zai-error-class", b"unknown")])


@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize(("code", "body_retry", "waits", "expected"), [
    # Quota: the derived Retry-After is the later of the body's retry_after and the reset.
    (1308, None, [], [(b"x-zai-error-class", b"quota"), (b"x-zai-error-code", b"1308"),
                      (b"x-zai-rate-limit-reset", RESET_1308), (b"retry-after", b"10800")]),
    (1308, "30", [], [(b"x-zai-error-class", b"quota"), (b"x-zai-error-code", b"1308"),
                      (b"x-zai-rate-limit-reset", RESET_1308), (b"retry-after", b"10800")]),
    (1310, None, [], [(b"x-zai-error-class", b"quota"), (b"x-zai-error-code", b"1310"),
                      (b"x-zai-rate-limit-reset", RESET_1310), (b"retry-after", b"273600")]),
    # Retryable: without a header the body's retry_after raises every wait, and is derived.
    (1302, "5", [5.0, 5.0, 5.0], [(b"x-zai-error-class", b"concurrency"),
                                  (b"x-zai-error-code", b"1302"), (b"retry-after", b"5")]),
    (1312, "3", [3.0, 4.0, 8.0], [(b"x-zai-error-class", b"congestion"),
                                  (b"x-zai-error-code", b"1312"), (b"retry-after", b"3")]),
    # No header and no hint at all: the bare backoff, and no Retry-After is made up.
    (1302, None, [0.5, 1.0, 2.0], [(b"x-zai-error-class", b"concurrency"),
                                   (b"x-zai-error-code", b"1302")]),
])
async def test_retry_after_is_derived_only_when_upstream_sent_none(
    proxy: InProcessProxy, mock: str, api: Endpoint, code: int, body_retry: str | None,
    waits: list[float], expected: list[tuple[bytes, bytes]],
) -> None:
    controls = hdrs(("x-mock-zai-code", str(code)), ("x-mock-retry-after", "none"))
    if body_retry is not None:
        controls.append(("x-mock-zai-retry-after-body", body_retry))
    upstream = await direct(mock, api, controls)
    assert upstream.header(b"retry-after") is None

    resp = await via_proxy(proxy, api, controls)

    assert proxy.waits == waits
    assert await upstream_calls(mock) == len(waits) + 1
    assert_relayed(resp, upstream, expected)


@pytest.mark.parametrize(("code", "header", "body_retry", "waits", "expected"), [
    # A header larger than the backoff raises the waits; upstream's value is relayed as sent.
    (1303, "3", None, [3.0, 3.0, 4.0], [(b"x-zai-error-class", b"frequency"),
                                        (b"x-zai-error-code", b"1303")]),
    # The body's retry_after is a hint too: the larger one wins.
    (1303, "3", "6", [6.0, 6.0, 6.0], [(b"x-zai-error-class", b"frequency"),
                                       (b"x-zai-error-code", b"1303")]),
    # Upstream's header is relayed even though the body and the reset say later
    # (never a second Retry-After).
    (1308, "7", "30", [], [(b"x-zai-error-class", b"quota"), (b"x-zai-error-code", b"1308"),
                           (b"x-zai-rate-limit-reset", RESET_1308)]),
    # A wait over max_wait (60 s) is not taken: relayed at once for the client to retry.
    (1303, "61", None, [], [(b"x-zai-error-class", b"frequency"),
                            (b"x-zai-error-code", b"1303")]),
])
async def test_upstream_retry_after_is_kept(
    proxy: InProcessProxy, mock: str, code: int, header: str, body_retry: str | None,
    waits: list[float], expected: list[tuple[bytes, bytes]],
) -> None:
    controls = hdrs(("x-mock-zai-code", str(code)), ("x-mock-retry-after", header))
    if body_retry is not None:
        controls.append(("x-mock-zai-retry-after-body", body_retry))
    upstream = await direct(mock, OPENAI, controls)

    resp = await via_proxy(proxy, OPENAI, controls)

    assert proxy.waits == waits
    assert await upstream_calls(mock) == len(waits) + 1
    assert_relayed(resp, upstream, expected)
    assert [v for n, v in resp.headers if n == b"retry-after"] == [header.encode()]


# --- 2-3. a retry that succeeds; MAX_RETRIES --------------------------------------------------


@pytest.mark.parametrize("api", APIS)
async def test_retry_succeeds_after_two_failures(
    proxy: InProcessProxy, mock: str, api: Endpoint
) -> None:
    resp = await via_proxy(proxy, api, hdrs(("x-mock-zai-code", "1303"),
                                            ("x-mock-fail-key", "twice"),
                                            ("x-mock-fail-times", "2")))
    assert resp.status == 200
    assert resp.header(b"x-zai-error-class") is None  # a success carries no 429 headers
    assert await upstream_calls(mock, "twice") == 3
    assert proxy.waits == [1.0, 2.0]
    answer = resp.json()
    if api is OPENAI:
        assert answer["object"] == "chat.completion"
    else:
        assert answer["type"] == "message"


@pytest.mark.parametrize(("max_retries", "calls", "waits"), [
    (0, 1, []),
    (1, 2, [1.0]),
    (2, 3, [1.0, 2.0]),
])
async def test_max_retries_is_respected(
    nursery: trio.Nursery, mock: str, max_retries: int, calls: int, waits: list[float]
) -> None:
    proxy = await open_proxy(nursery, mock, max_retries=max_retries)
    resp = await via_proxy(proxy, OPENAI, hdrs(("x-mock-zai-code", "1303"),
                                               ("x-mock-fail-key", "k")))
    assert resp.status == 429
    assert resp.header(b"x-zai-error-code") == b"1303"
    assert await upstream_calls(mock, "k") == calls
    assert proxy.waits == waits


# --- 4. the client leaves during a wait -------------------------------------------------------


async def test_client_leaving_during_a_wait_ends_the_retry_and_frees_the_lease(
    nursery: trio.Nursery, mock: str
) -> None:
    proxy = await open_proxy(nursery, mock, concurrency=1)
    ctx = proxy.worker.ctx
    waiting = trio.Event()

    async def sleep_forever(seconds: float) -> None:
        proxy.waits.append(seconds)
        waiting.set()
        await trio.sleep_forever()

    ctx.retry_sleep = sleep_forever
    plan = ctx.admitter.plan(None, None)
    (lease_row,) = [op.index for op in plan.ops if op.what is LimitKind.CONCURRENCY]

    stream = await trio.open_tcp_stream(proxy.host, proxy.port)
    await stream.send_all(
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: proxy.test\r\n"
        b"content-type: application/json\r\nx-mock-zai-code: 1303\r\nx-mock-fail-key: gone\r\n"
        b"content-length: %d\r\n\r\n" % len(CHAT_BODY) + CHAT_BODY)
    with trio.fail_after(5):
        await waiting.wait()
    assert proxy.waits == [1.0]
    assert ctx.ledger.in_use(lease_row) == 1
    # The lease is really held: a second request meets the proxy's concurrency limit.
    busy = await via_proxy(proxy, OPENAI, hdrs())
    assert busy.status == 429
    assert busy.header(b"x-zaiproxy-limit") == b"global:concurrency"

    await stream.aclose()
    # The reader sees EOF and cancels the exchange; the gate's settle frees the lease.
    await wait_until(lambda: ctx.ledger.in_use(lease_row) == 0)
    await trio.testing.wait_all_tasks_blocked()
    assert await upstream_calls(mock, "gone") == 1  # no retry after the client left
    assert proxy.waits == [1.0]

    after = await via_proxy(proxy, OPENAI, hdrs(("x-mock-fail-key", "after")))
    assert after.status == 200
    assert await upstream_calls(mock, "after") == 1
    assert await upstream_calls(mock) == 2  # the busy request never went upstream


# --- 5. the adaptive feed ---------------------------------------------------------------------


@pytest.mark.parametrize(("controls", "answers", "throttled", "by_class"), [
    pytest.param([("x-mock-zai-code", "1303")], 4, 4, (0, 4, 0), id="1303-frequency"),
    pytest.param([("x-mock-status", "429")], 4, 4, (0, 0, 4), id="unknown"),
    pytest.param([("x-mock-zai-code", "1302")], 4, 4, (4, 0, 0), id="1302-concurrency"),
    pytest.param([("x-mock-zai-code", "1305")], 4, 0, (0, 0, 0), id="1305-overload"),
    pytest.param([("x-mock-zai-code", "1308")], 1, 0, (0, 0, 0), id="1308-quota"),
    pytest.param([("x-mock-zai-code", "1310")], 1, 0, (0, 0, 0), id="1310-quota"),
    pytest.param([("x-mock-zai-code", "1312")], 4, 0, (0, 0, 0), id="1312-congestion"),
    pytest.param([("x-mock-zai-code", "1303"), ("x-mock-fail-key", "f"),
                  ("x-mock-fail-times", "2")], 3, 2, (0, 2, 0), id="1303-then-200"),
    pytest.param([("x-mock-status", "503")], 1, 0, (0, 0, 0), id="503"),
    pytest.param([], 1, 0, (0, 0, 0), id="200"),
])
@pytest.mark.parametrize("api", APIS)
async def test_upstream_answers_feed_the_activity_row(
    proxy: InProcessProxy, mock: str, api: Endpoint, controls: list[tuple[str, str]], answers: int,
    throttled: int, by_class: tuple[int, int, int],
) -> None:
    """Every upstream answer counts; only account throttles (1302, 1303, a 429 without a
    code) count as throttled, by class, and the request once however many attempts."""
    assert counters(proxy) == (0, 0, 0, (0, 0, 0))
    await via_proxy(proxy, api, hdrs(*controls))
    assert await upstream_calls(mock) == answers
    assert counters(proxy) == (answers, throttled, min(1, throttled), by_class)


async def test_a_request_counts_again_after_a_decrease(
    proxy: InProcessProxy, mock: str
) -> None:
    """A request's retries are one piece of evidence, until the supervisor acts on it: after
    a decrease (a new epoch) its next throttle is evidence about the new rate."""
    ctx = proxy.worker.ctx

    async def decrease_during_the_second_wait(seconds: float) -> None:
        proxy.waits.append(seconds)
        if len(proxy.waits) == 2:
            ctx.ledger.scalar_add(SC_ADAPTIVE_EPOCH, 1)  # what RateController.publish does
        await trio.lowlevel.checkpoint()

    ctx.retry_sleep = decrease_during_the_second_wait
    await via_proxy(proxy, OPENAI, hdrs(("x-mock-zai-code", "1303")))
    # Attempts 1-2 before the epoch changed, 3-4 after it: counted in two epochs.
    assert counters(proxy) == (4, 4, 2, (0, 4, 0))
    await via_proxy(proxy, OPENAI, hdrs(("x-mock-zai-code", "1302")))
    assert counters(proxy) == (8, 8, 3, (4, 4, 0))


# --- 6. metrics ------------------------------------------------------------------------------


def samples(exposition: bytes, family: str) -> dict[tuple[tuple[str, str], ...], float]:
    out: dict[tuple[tuple[str, str], ...], float] = {}
    for fam in text_string_to_metric_families(exposition.decode()):
        if fam.name == family:
            for s in fam.samples:
                assert s.name == family + "_total"
                out[tuple(sorted(s.labels.items()))] = s.value
    return out


async def test_metrics_count_zai_errors_and_retries(proxy: InProcessProxy) -> None:
    for controls in ([("x-mock-zai-code", "1303")],  # 4 answers, 3 retries
                     [("x-mock-zai-code", "1303"), ("x-mock-fail-key", "m"),
                      ("x-mock-fail-times", "1")],  # 1 answer, 1 retry, then 200
                     [("x-mock-zai-code", "1308")],  # 1 answer, never retried
                     [("x-mock-status", "429")]):  # unknown: 4 answers, 3 retries
        await via_proxy(proxy, OPENAI, hdrs(*controls))
    text = (await request(proxy.port, "GET", "/metrics")).body

    def labels(**kv: str) -> tuple[tuple[str, str], ...]:
        return tuple(sorted({**kv, "variant": "production"}.items()))

    assert samples(text, "zai_proxy_zai_errors") == {
        labels(**{"class": "frequency", "code": "1303"}): 5.0,
        labels(**{"class": "quota", "code": "1308"}): 1.0,
        labels(**{"class": "unknown", "code": "other"}): 4.0,
    }
    assert samples(text, "zai_proxy_retry_attempts") == {
        labels(reason="frequency"): 4.0,
        labels(reason="unknown"): 3.0,
    }


# --- 7. each retry is admitted again ----------------------------------------------------------


@pytest.mark.parametrize("api", APIS)
async def test_each_retry_takes_a_request_slot(
    nursery: trio.Nursery, mock: str, api: Endpoint
) -> None:
    proxy = await open_proxy(nursery, mock, requests_per_minute=2)
    resp = await via_proxy(proxy, api, hdrs(("x-mock-zai-code", "1303"), ("x-mock-fail-key", "r"),
                                            ("x-mock-fail-times", "5")))
    # Attempt 1 took the first slot, retry 1 the second; retry 2 is refused by the proxy
    # itself: the client gets the proxy's 429, not Z.AI's.
    assert await upstream_calls(mock, "r") == 2
    assert proxy.waits == [1.0, 2.0]
    assert resp.status == 429
    assert resp.header(b"x-zaiproxy-limit") == b"global:requests_per_minute"
    assert resp.header(b"x-zai-error-class") is None
    assert resp.header(b"retry-after") == b"30"  # a 2/min GCRA frees a slot 30 s after
    error = resp.json()["error"]
    if api is OPENAI:
        assert error["code"] == "proxy_rate_limit"
        assert error["type"] == "rate_limit_exceeded"
    else:
        assert error["type"] == "rate_limit_error"
        assert "requests_per_minute=2" in error["message"]


# --- 8. streaming requests --------------------------------------------------------------------

# With include_usage already asked for, the proxy forwards the body unchanged (same upstream
# request id as the direct request).
STREAM_CHAT = orjson.dumps({"model": "glm-4.6", "stream": True,
                            "stream_options": {"include_usage": True},
                            "messages": [{"role": "user", "content": "hi"}]})
STREAM_MESSAGES = orjson.dumps({"model": "glm-4.6", "max_tokens": 64, "stream": True,
                                "messages": [{"role": "user", "content": "hi"}]})


def stream_body(api: Endpoint) -> bytes:
    return STREAM_CHAT if api is OPENAI else STREAM_MESSAGES


@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize(("code", "cls", "waits"), [CLASSES[1], CLASSES[3], CLASSES[5]])
async def test_streaming_request_gets_a_json_429_classified_and_retried(
    proxy: InProcessProxy, mock: str, api: Endpoint, code: int, cls: str, waits: list[float]
) -> None:
    controls = hdrs(("x-mock-zai-code", str(code)))
    upstream = await direct(mock, api, controls, stream_body(api))
    assert upstream.header(b"content-type") == b"application/json"

    resp = await via_proxy(proxy, api, controls, stream_body(api))

    assert proxy.waits == waits
    assert await upstream_calls(mock) == len(waits) + 1
    expected = [(b"x-zai-error-class", cls.encode()), (b"x-zai-error-code", str(code).encode())]
    if code in RESETS:
        expected.append((b"x-zai-rate-limit-reset", RESETS[code]))
    assert_relayed(resp, upstream, expected)


@pytest.mark.parametrize("api", APIS)
async def test_streaming_retry_succeeds_with_the_stream(
    proxy: InProcessProxy, mock: str, api: Endpoint
) -> None:
    resp = await via_proxy(proxy, api, hdrs(("x-mock-zai-code", "1312"), ("x-mock-fail-key", "s"),
                                            ("x-mock-fail-times", "2")), stream_body(api))
    assert resp.status == 200
    assert resp.header(b"content-type") == b"text/event-stream; charset=utf-8"
    assert await upstream_calls(mock, "s") == 3
    assert proxy.waits == [2.0, 4.0]
    last = b"data: [DONE]\n\n" if api is OPENAI else b'data: {"type":"message_stop"}\n\n'
    assert resp.body.endswith(last)
