"""Header rewriting between client and upstream: pure functions, no I/O.

Request side (RFC 9110 §7.6.1 for hop-by-hop fields):
- hop-by-hop fields, and any field named in ``Connection``, are dropped;
- the client's own credentials (``Authorization``, ``x-api-key``) never reach
  upstream; the upstream key is injected as ``Authorization: Bearer`` on
  OpenAI-style paths and as ``x-api-key`` on Anthropic paths (Z.AI's WAF
  answered Bearer on the Anthropic endpoint with a bare 404);
- ``Host`` is the upstream's, ``X-Forwarded-For`` gets the client appended,
  ``Accept-Encoding: identity`` because the proxy reads the bodies (usage),
  ``Content-Length`` is recomputed (the body was read whole), ``Expect`` is
  dropped (the proxy already answered 100-continue itself);
- everything else, ``anthropic-beta`` lists and unknown headers included,
  passes through unchanged and in order.
Response side: hop-by-hop fields are dropped (h11 re-frames the body for the
client), everything else passes through.
"""

from __future__ import annotations

from collections.abc import Iterable

HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer",
    b"transfer-encoding", b"upgrade", b"proxy-authorization", b"proxy-authenticate",
})
_REQUEST_REPLACED = frozenset({
    b"host", b"content-length", b"accept-encoding", b"authorization", b"x-api-key",
    b"expect", b"x-forwarded-for",
})
_REQUEST_DROP = HOP_BY_HOP | _REQUEST_REPLACED

Headers = list[tuple[bytes, bytes]]


def _connection_tokens(headers: Iterable[tuple[bytes, bytes]]) -> frozenset[bytes]:
    tokens: set[bytes] = set()
    for name, value in headers:
        if name == b"connection":
            tokens.update(t.strip().lower() for t in value.split(b",") if t.strip())
    return frozenset(tokens)


def upstream_request_headers(
    headers: Iterable[tuple[bytes, bytes]],
    *,
    host: bytes,
    client_ip: str,
    api_key: bytes | None,
    anthropic_style: bool,
    body_length: int | None,
) -> Headers:
    """Headers to send upstream for a client request (h11 gives lowercase names)."""
    headers = list(headers)
    drop = _REQUEST_DROP
    extra = _connection_tokens(headers)
    if extra:
        drop = drop | extra
    out: Headers = [(b"host", host)]
    forwarded: list[bytes] = []
    for name, value in headers:
        if name in drop:
            if name == b"x-forwarded-for":
                forwarded.append(value)
            continue
        out.append((name, value))
    forwarded.append(client_ip.encode("ascii"))
    out.append((b"x-forwarded-for", b", ".join(forwarded)))
    out.append((b"accept-encoding", b"identity"))
    if api_key is not None:
        if anthropic_style:
            out.append((b"x-api-key", api_key))
        else:
            out.append((b"authorization", b"Bearer " + api_key))
    if body_length is not None:
        out.append((b"content-length", str(body_length).encode("ascii")))
    return out


def client_response_headers(headers: Iterable[tuple[bytes, bytes]], request_id: bytes) -> Headers:
    """Upstream response headers as the client gets them."""
    headers = list(headers)
    drop: frozenset[bytes] = HOP_BY_HOP
    extra = _connection_tokens(headers)
    if extra:
        drop = drop | extra
    out = [(n, v) for n, v in headers if n not in drop]
    out.append((b"x-zaiproxy-request-id", request_id))
    return out


def header_value(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    for n, v in headers:
        if n == name:
            return v
    return None
