"""Fleet limits in process: two proxies (in-process workers) sharing one real redis-server.

What a client sees when the budget is the fleet's: the ``x-ratelimit-*`` values and the 429
of one proxy count what the other admitted; the Anthropic shape of the 503 under
``limits_fail = "closed"``; ``/admin/keys`` and the quota gauge read Redis.
"""

from __future__ import annotations

import uuid

import orjson
import pytest
import trio

from tests.harness import make_config, request, start_mock, start_proxy
from tests.redis_server import RedisServer

JSON = ("content-type", "application/json")
CHAT = orjson.dumps({"model": "glm-4.6", "messages": [{"role": "user", "content": "hi"}]})
MESSAGES = orjson.dumps({"model": "glm-4.6", "max_tokens": 16,
                         "messages": [{"role": "user", "content": "hi"}]})


@pytest.fixture
async def upstream(nursery):
    return await start_mock(nursery)


def fleet_config(upstream: str, redis: RedisServer, prefix: str, **overrides):
    settings = {"limits_backend": "redis", "redis_url": redis.url, "redis_key_prefix": prefix,
                "redis_command_timeout": 2.0, "redis_connect_timeout": 2.0,
                "adaptive_rate": False, **overrides}
    return make_config(upstream, **settings)


def header(resp, name: str) -> str:
    value = resp.header(name.encode())
    assert value is not None, name
    return value.decode()


async def test_ratelimit_headers_and_429_count_every_proxy(nursery, upstream, redis_server):
    prefix = "t" + uuid.uuid4().hex[:12]
    config = fleet_config(upstream, redis_server, prefix, requests_per_minute=4,
                          tokens_per_minute=1_000_000, requests_per_5h=100,
                          tokens_per_5h=1_000_000)
    a = await start_proxy(nursery, config)
    b = await start_proxy(nursery, config)
    remaining = []
    for proxy in (a, b, a, b):
        resp = await request(proxy.port, "POST", "/v1/chat/completions", [JSON], CHAT)
        assert resp.status == 200
        assert header(resp, "x-ratelimit-limit-requests") == "4"
        remaining.append(int(header(resp, "x-ratelimit-remaining-requests")))
    assert remaining == [3, 2, 1, 0]  # one budget, whichever proxy answered
    refused = await request(b.port, "POST", "/v1/chat/completions", [JSON], CHAT)
    assert refused.status == 429
    assert header(refused, "x-zaiproxy-limit") == "global:requests_per_minute"
    assert header(refused, "x-ratelimit-remaining-requests") == "0"
    assert 1 <= int(header(refused, "retry-after")) <= 15  # 60 s / 4 per request
    # Settled with the real usage (the reservation of prompt + max_tokens refunded), fleet-wide;
    # settles are sent by each worker's flusher just after the answer: wait for the last.
    with trio.fail_after(5):
        while True:
            report = (await request(a.port, "GET", "/admin/keys")).json()
            if report["global"]["tokens_per_5h"]["used"] < 4 * 100:
                break
            await trio.sleep(0.01)
    assert report["scope"] == "fleet"
    assert report["global"]["requests_per_5h"]["used"] == 4
    assert report["global"]["tokens_per_5h"]["used"] > 0
    # The quota gauge reads the fleet's window (refreshed by the worker's maintenance task).
    await a.worker.ctx.admitter._refresh_quota()
    uses = {u.name: u for u in a.worker.ctx.admitter.quota_use()}
    assert uses["requests_per_5h"].used == 4


async def test_closed_answers_503_in_the_callers_api_shape(nursery, upstream, tmp_path):
    redis = RedisServer(tmp_path / "redis")
    config = fleet_config(upstream, redis, "closed", requests_per_minute=100,
                          limits_fail="closed", redis_command_timeout=0.2)
    proxy = await start_proxy(nursery, config)
    assert (await request(proxy.port, "POST", "/v1/messages", [JSON], MESSAGES)).status == 200
    redis.kill()
    try:
        resp = await request(proxy.port, "POST", "/v1/messages", [JSON], MESSAGES)
        assert resp.status == 503
        body = resp.json()
        assert body["type"] == "error"
        assert body["error"]["type"] == "overloaded_error"
        assert "Redis" in body["error"]["message"]
        openai = await request(proxy.port, "POST", "/v1/chat/completions", [JSON], CHAT)
        assert openai.status == 503
        assert openai.json()["error"]["code"] == "rate_limiter_unavailable"
        keys = await request(proxy.port, "GET", "/admin/keys")
        assert keys.status == 503  # the fleet's numbers are in Redis: no guess from this host
    finally:
        redis.stop()


def test_the_redis_password_comes_from_its_variable_its_file_or_the_url(tmp_path):
    from zaiproxy.core.config import load_config, render_check
    from zaiproxy.limits.fleet import resolve_password

    secret_file = tmp_path / "redis-password"
    secret_file.write_text("from-the-file\n")  # a mounted Secret ends with a newline
    base = {"ZAIPROXY_LIMITS_BACKEND": "redis",
            "ZAIPROXY_REDIS_URL": "redis://:in-the-url-pw@127.0.0.1:6379/0"}
    config, sources = load_config(env=base, require_api_key=False)
    assert resolve_password(config) is None  # coredis takes the URL's
    config, _ = load_config(env={**base, "ZAIPROXY_REDIS_PASSWORD_FILE": str(secret_file)},
                            require_api_key=False)
    assert resolve_password(config) == "from-the-file"
    config, _ = load_config(env={**base, "ZAIPROXY_REDIS_PASSWORD_FILE": str(secret_file),
                                 "ZAIPROXY_REDIS_PASSWORD": "from-the-variable"},
                            require_api_key=False)
    assert resolve_password(config) == "from-the-variable"
    shown = render_check(config, sources) + repr(config) + orjson.dumps(config.masked()).decode()
    for secret in ("in-the-url-pw", "from-the-variable"):
        assert secret not in shown
    with pytest.raises(Exception) as refused:
        load_config(env={"ZAIPROXY_LIMITS_BACKEND": "redis"}, require_api_key=False)
    assert "limits.redis_url: missing" in str(refused.value)
    with pytest.raises(Exception) as bad:
        load_config(env={"ZAIPROXY_REDIS_URL": "http://:leak-me@host/0"}, require_api_key=False)
    assert "scheme must be redis, rediss or unix" in str(bad.value)
    assert "leak-me" not in str(bad.value)
