"""Routing and header rewriting are pure: table tests, no sockets."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from zaiproxy.core.errors import Api, BadRequest, MethodNotAllowed, NotFound
from zaiproxy.request.routing import Control, Upstream, normalise_path, resolve
from zaiproxy.upstream.forward import client_response_headers, upstream_request_headers

ROUTES = [
    ("POST", "/v1/chat/completions", "/v1/chat/completions", Upstream.OPENAI, "/chat/completions", True),
    ("POST", "/v1/completions", "/v1/completions", Upstream.OPENAI, "/completions", True),
    ("POST", "/v1/embeddings", "/v1/embeddings", Upstream.OPENAI, "/embeddings", True),
    ("GET", "/v1/models", "/v1/models", Upstream.OPENAI, "/models", False),
    ("GET", "/v1/models/glm-4.6", "/v1/models/{model}", Upstream.OPENAI, "/models/glm-4.6", False),
    ("POST", "/v1/messages", "/v1/messages", Upstream.ANTHROPIC, "/v1/messages", True),
    ("POST", "/v1/messages?beta=true", "/v1/messages", Upstream.ANTHROPIC,
     "/v1/messages?beta=true", True),
    ("POST", "/v1/messages/count_tokens", "/v1/messages/count_tokens", Upstream.ANTHROPIC,
     "/v1/messages/count_tokens", True),
    ("POST", "/api/paas/v4/chat/completions", "/api/paas/v4/*", Upstream.NATIVE,
     "/api/paas/v4/chat/completions", True),
    ("GET", "/api/paas/v4/async-result/123", "/api/paas/v4/*", Upstream.NATIVE,
     "/api/paas/v4/async-result/123", False),
    ("POST", "/api/coding/paas/v4/chat/completions", "/api/coding/paas/v4/*", Upstream.NATIVE,
     "/api/coding/paas/v4/chat/completions", True),
    ("POST", "/api/anthropic/v1/messages?beta=true", "/api/anthropic/*", Upstream.NATIVE,
     "/api/anthropic/v1/messages?beta=true", True),
    ("POST", "/v1//chat/completions", "/v1/chat/completions", Upstream.OPENAI, "/chat/completions", True),
    ("POST", "/v1/./messages", "/v1/messages", Upstream.ANTHROPIC, "/v1/messages", True),
]


@pytest.mark.parametrize("method, target, template, upstream, path, reads", ROUTES)
def test_route_table(method, target, template, upstream, path, reads):
    route = resolve(method, target)
    assert (route.template, route.upstream, route.upstream_path, route.reads_json) == (
        template, upstream, path, reads)


def test_api_shape_per_route() -> None:
    assert resolve("POST", "/v1/messages").api is Api.ANTHROPIC
    assert resolve("POST", "/api/anthropic/v1/messages").api is Api.ANTHROPIC
    assert resolve("POST", "/v1/chat/completions").api is Api.OPENAI


@pytest.mark.parametrize("target", ["/health", "/ready", "/metrics"])
def test_control_routes(target: str) -> None:
    route = resolve("GET", target)
    assert route.control is Control(target[1:])
    assert route.upstream is None


@pytest.mark.parametrize("target", [
    "/v1/../x", "/v1/chat/../../x", "/%2e%2e/x", "/v1/%2E%2e/x", "/v1/a%2Fb", "/v1/a%5cb",
    "/v1/a%00", "/v1/a%zz", "/v1/a%2", "/v1/a\\b", "/v1/a b", "/v1/a#frag", "*",
    "http://evil/v1/models", "evil.example:443", "v1/models",
])
def test_escapes_rejected(target: str) -> None:
    with pytest.raises(BadRequest):
        resolve("GET", target)


def test_unknown_and_wrong_method() -> None:
    with pytest.raises(NotFound):
        resolve("GET", "/v2/models")
    with pytest.raises(MethodNotAllowed) as info:
        resolve("DELETE", "/v1/messages")
    assert info.value.headers == ((b"allow", b"POST"),)


@given(st.lists(st.sampled_from(["a", "b", ".", "..", "", "%2e", "x%20y"]), max_size=8))
def test_normalised_paths_never_contain_dot_segments(segments: list[str]) -> None:
    raw = "/" + "/".join(segments)
    try:
        path = normalise_path(raw)
    except BadRequest:
        return
    parts = path.split("/")[1:]
    assert ".." not in parts and "." not in parts
    assert "//" not in path
    assert path.startswith("/")


def test_upstream_headers_openai() -> None:
    out = upstream_request_headers(
        [(b"host", b"proxy"), (b"authorization", b"Bearer client"), (b"x-api-key", b"client"),
         (b"connection", b"x-drop"), (b"x-drop", b"1"), (b"x-keep", b"2"),
         (b"accept-encoding", b"gzip, br, zstd"), (b"content-length", b"99")],
        host=b"api.z.ai", client_ip="10.0.0.9", api_key=b"K", anthropic_style=False,
        body_length=5)
    assert out == [(b"host", b"api.z.ai"), (b"x-keep", b"2"), (b"x-forwarded-for", b"10.0.0.9"),
                   (b"accept-encoding", b"identity"), (b"authorization", b"Bearer K"),
                   (b"content-length", b"5")]


def test_upstream_headers_anthropic_without_body() -> None:
    out = upstream_request_headers(
        [(b"anthropic-version", b"2023-06-01"), (b"x-forwarded-for", b"1.1.1.1")],
        host=b"h", client_ip="::1", api_key=b"K", anthropic_style=True, body_length=None)
    assert out == [(b"host", b"h"), (b"anthropic-version", b"2023-06-01"),
                   (b"x-forwarded-for", b"1.1.1.1, ::1"), (b"accept-encoding", b"identity"),
                   (b"x-api-key", b"K")]


def test_response_headers_drop_hop_by_hop() -> None:
    out = client_response_headers(
        [(b"content-type", b"text/event-stream"), (b"transfer-encoding", b"chunked"),
         (b"connection", b"close, x-internal"), (b"x-internal", b"1"), (b"retry-after", b"3"),
         (b"content-encoding", b"gzip")], b"rid")
    assert out == [(b"content-type", b"text/event-stream"), (b"retry-after", b"3"),
                   (b"content-encoding", b"gzip"), (b"x-zaiproxy-request-id", b"rid")]
