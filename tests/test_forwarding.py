"""What goes upstream: key injection per route, credentials, hop-by-hop headers, paths."""

from __future__ import annotations

import hashlib

import orjson
import pytest

from tests.harness import UPSTREAM_KEY, make_config, request, start_mock, start_proxy

BODY = orjson.dumps({"model": "glm-4.6", "messages": [{"role": "user", "content": "hi"}],
                     "thinking": {"type": "enabled"}, "unknown_field": [1, {"x": None}]})


@pytest.fixture
async def proxy(nursery):
    upstream = await start_mock(nursery)
    return await start_proxy(nursery, make_config(upstream))


async def echo(proxy, method, target, headers=(), body=b""):
    resp = await request(proxy.port, method, target, [("x-mock-echo", "1"), *headers], body)
    assert resp.status == 200, resp.body
    seen = resp.json()
    seen["headers_dict"] = {}
    for name, value in seen["headers"]:
        seen["headers_dict"].setdefault(name, []).append(value)
    return seen


@pytest.mark.parametrize("target, upstream_target, style", [
    ("/v1/chat/completions", "/api/paas/v4/chat/completions", "bearer"),
    ("/v1/completions", "/api/paas/v4/completions", "bearer"),
    ("/v1/embeddings", "/api/paas/v4/embeddings", "bearer"),
    ("/v1/messages", "/api/anthropic/v1/messages", "x-api-key"),
    ("/v1/messages?beta=true", "/api/anthropic/v1/messages?beta=true", "x-api-key"),
    ("/v1/messages/count_tokens", "/api/anthropic/v1/messages/count_tokens", "x-api-key"),
    ("/api/paas/v4/chat/completions", "/api/paas/v4/chat/completions", "bearer"),
    ("/api/coding/paas/v4/chat/completions", "/api/coding/paas/v4/chat/completions", "bearer"),
    ("/api/anthropic/v1/messages?beta=true", "/api/anthropic/v1/messages?beta=true", "x-api-key"),
])
@pytest.mark.parametrize("client_cred", [("authorization", "Bearer client-secret-AAA"),
                                         ("x-api-key", "client-secret-AAA")])
async def test_key_injection_per_route(proxy, target, upstream_target, style, client_cred):
    seen = await echo(proxy, "POST", target, [client_cred, ("content-type", "application/json")],
                      BODY)
    hdrs = seen["headers_dict"]
    assert seen["target"] == upstream_target
    if style == "bearer":
        assert hdrs["authorization"] == [f"Bearer {UPSTREAM_KEY}"]
        assert "x-api-key" not in hdrs
    else:
        assert hdrs["x-api-key"] == [UPSTREAM_KEY]
        assert "authorization" not in hdrs
    # The client's own credential never reaches upstream, under any name.
    assert "client-secret-AAA" not in orjson.dumps(seen["headers"]).decode()
    # The body is forwarded byte for byte, unknown fields included.
    assert seen["body_len"] == len(BODY)
    assert seen["body_sha256"] == hashlib.sha256(BODY).hexdigest()


async def test_get_models_goes_to_openai_base(proxy):
    seen = await echo(proxy, "GET", "/v1/models")
    assert seen["method"] == "GET"
    assert seen["target"] == "/api/paas/v4/models"
    assert "content-length" not in seen["headers_dict"]


async def test_headers_rewritten(proxy):
    beta = ",".join(f"feature-{i}-2025-01-01" for i in range(30))
    seen = await echo(proxy, "POST", "/v1/messages", [
        ("content-type", "application/json"),
        ("anthropic-version", "2023-06-01"),
        ("anthropic-beta", beta),
        ("accept-encoding", "gzip, br, zstd"),
        ("connection", "keep-alive, x-hop"),
        ("x-hop", "must-not-pass"),
        ("keep-alive", "timeout=5"),
        ("te", "trailers"),
        ("proxy-authorization", "Basic c2VjcmV0"),
        ("x-forwarded-for", "10.1.2.3"),
        ("x-custom", "kept"),
        ("user-agent", "claude-cli/2.0"),
    ], BODY)
    hdrs = seen["headers_dict"]
    host = proxy.worker.ctx.origins
    assert hdrs["host"] == [next(iter(host.values())).host_header.decode()]
    assert hdrs["anthropic-beta"] == [beta]
    assert hdrs["anthropic-version"] == ["2023-06-01"]
    assert hdrs["accept-encoding"] == ["identity"]
    assert hdrs["x-forwarded-for"] == ["10.1.2.3, 127.0.0.1"]
    assert hdrs["x-custom"] == ["kept"]
    assert hdrs["user-agent"] == ["claude-cli/2.0"]
    assert hdrs["content-length"] == [str(len(BODY))]
    for hop in ("connection", "x-hop", "keep-alive", "te", "proxy-authorization",
                "transfer-encoding"):
        assert hop not in hdrs, hop


async def test_chunked_request_body_forwarded_with_length(proxy):
    from tests.harness import send_raw

    raw = (b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nx-mock-echo: 1\r\n"
           b"transfer-encoding: chunked\r\n\r\n"
           + b"%x\r\n" % len(BODY) + BODY + b"\r\n0\r\n\r\n")
    out = await send_raw(proxy.port, raw + b"", read_timeout=1)
    _, body = out.split(b"\r\n\r\n", 1)
    seen = orjson.loads(body)
    names = [n for n, _ in seen["headers"]]
    assert "transfer-encoding" not in names
    assert ["content-length", str(len(BODY))] in seen["headers"]
    assert seen["body_sha256"] == hashlib.sha256(BODY).hexdigest()


async def test_response_headers_pass_through(proxy):
    resp = await request(proxy.port, "POST", "/v1/chat/completions",
                         [("content-type", "application/json")], BODY)
    assert resp.status == 200
    assert resp.header(b"x-request-id") is not None  # upstream's own header kept
    assert resp.header(b"x-zaiproxy-request-id") is not None
    assert resp.header(b"content-length") == str(len(resp.body)).encode()


async def test_upstream_error_status_passed_through_verbatim(proxy):
    resp = await request(proxy.port, "POST", "/v1/chat/completions",
                         [("content-type", "application/json"), ("x-mock-zai-code", "1308")], BODY)
    assert resp.status == 429
    assert resp.json()["error"]["code"] == "1308"
    resp2 = await request(proxy.port, "POST", "/v1/messages",
                          [("content-type", "application/json"), ("x-mock-status", "529")], BODY)
    assert resp2.status == 529
    assert resp2.json()["type"] == "error"


async def test_retry_after_passed_through(proxy):
    resp = await request(proxy.port, "POST", "/v1/chat/completions",
                         [("content-type", "application/json"), ("x-mock-zai-code", "1303"),
                          ("x-mock-retry-after", "7")], BODY)
    assert resp.status == 429
    assert resp.header(b"retry-after") == b"7"
