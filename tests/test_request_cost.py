"""The cheaper per-request paths of issue 17 give exactly what the paths they replaced gave.

- ``upstream_request`` takes the request's headers as the list the pipeline made once: the
  bytes that go upstream are those made from the request head itself, and a key h11
  refuses is refused as before;
- the ledger's settle releases the leases of a plan's concurrency ops, found once per plan,
  and admission reads the window epochs in one slice.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from tests.harness import make_config
from zaiproxy.core.limitspec import Limits
from zaiproxy.http.http11 import h11
from zaiproxy.limits.admission import Admission, Admitter
from zaiproxy.request.exchange import upstream_request
from zaiproxy.request.routing import resolve
from zaiproxy.run.worker import build_context

BODY = b'{"model":"glm-4.6","messages":[{"role":"user","content":"hi"}]}'
CLIENT_HEADERS = [
    (b"host", b"proxy.example:8080"), (b"user-agent", b"sdk/1.0"),
    (b"content-type", b"application/json"), (b"authorization", b"Bearer client-key"),
    (b"x-forwarded-for", b"203.0.113.9"), (b"connection", b"keep-alive, x-hop"),
    (b"x-hop", b"dropped"), (b"anthropic-beta", b"a,b"),
    (b"content-length", b"%d" % len(BODY)),
]


def wire(request: Any) -> bytes:
    """The head as h11 writes it for upstream."""
    conn = h11.Connection(h11.CLIENT)
    return conn.send(request) or b""


@pytest.mark.parametrize("target", ["/v1/chat/completions", "/v1/messages"])
def test_upstream_request_bytes_are_the_validating_paths(target: str) -> None:
    ctx = build_context(make_config("http://127.0.0.1:9"))
    route = resolve("POST", target)
    client = h11.Request(method=b"POST", target=target.encode(), headers=CLIENT_HEADERS)
    origin, fast = upstream_request(ctx, route, client, BODY, "198.51.100.4",
                                    list(client.headers))
    _, from_head = upstream_request(ctx, route, client, BODY, "198.51.100.4")
    validated = h11.Request(method=fast.method, target=fast.target, headers=list(fast.headers))
    assert wire(fast) == wire(validated) == wire(from_head)
    head = wire(fast)
    assert head.startswith(b"POST " + origin.base_path.encode())
    assert b"x-forwarded-for: 203.0.113.9, 198.51.100.4\r\n" in head
    assert b"client-key" not in head and b"x-hop" not in head


def test_a_key_h11_refuses_is_refused_as_before() -> None:
    """A key that is not a valid header value is h11's error, never sent."""
    ctx = build_context(make_config("http://127.0.0.1:9"))
    ctx = dataclasses.replace(ctx, api_key=b"bad\nkey")
    route = resolve("POST", "/v1/chat/completions")
    client = h11.Request(method=b"POST", target=b"/v1/chat/completions", headers=CLIENT_HEADERS)
    with pytest.raises(h11.LocalProtocolError):
        upstream_request(ctx, route, client, BODY, "198.51.100.4")


def test_settle_releases_every_concurrency_lease_of_the_plan() -> None:
    """Key, global and upstream concurrency: each lease is taken by admit and given back by
    settle (the leases are found on the first settle of the plan and reused)."""
    ctx = build_context(make_config("http://127.0.0.1:9", concurrency=2,
                                    upstream_concurrency=2, tokens_per_5h=10_000))
    admitter = ctx.admitter
    assert isinstance(admitter, Admitter)  # the ledger backend (the default)
    plan = admitter.plan("team", Limits(concurrency=1, tokens_per_minute=10_000))
    rows = [op.index for op in plan.ops if op.what.value == "concurrency"]
    assert len(rows) == 3
    for _ in range(3):  # the same plan, settled again and again
        held = admitter.admit_now(plan, 100)
        assert isinstance(held, Admission)
        assert len(held.epochs) == len(plan.ops)
        assert [ctx.ledger.in_use(row) for row in rows] == [1, 1, 1]
        assert not isinstance(admitter.admit_now(plan, 100), Admission)  # key's limit is 1
        admitter.settle(held, 40)
        assert [ctx.ledger.in_use(row) for row in rows] == [0, 0, 0]
    assert plan.leases == tuple(rows)
