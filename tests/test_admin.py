"""The proxy's admin API: auth, parameters, /admin/keys, /admin/status, /admin/events framing."""

from __future__ import annotations

import orjson
import pytest
import trio

from tests.harness import RawClient, make_config, request, start_mock, start_proxy
from zaiproxy import admin
from zaiproxy.errors import BadRequest
from zaiproxy.sse import SSEParser

TOKEN = "adm-secret-xyz"
AUTH = [("authorization", f"Bearer {TOKEN}")]
JSON = ("content-type", "application/json")
CHAT = orjson.dumps({"model": "glm-4.6", "messages": [{"role": "user", "content": "hi"}]})


@pytest.mark.parametrize(("query", "expected"), [
    ("", ("1h", "all")),
    ("range=5m", ("5m", "all")),
    ("range=7d&variant=canary", ("7d", "canary")),
    ("variant=production", ("1h", "production")),
])
def test_history_params(query: str, expected: tuple[str, str]) -> None:
    assert admin.parse_history_params(query) == expected


@pytest.mark.parametrize(("query", "message"), [
    ("range=2h", "range must be one of 5m, 15m, 1h, 6h, 24h, 7d"),
    ("range=5m&range=1h", "range given more than once"),
    ("variant=Prod!", "variant must be a variant name"),
    ("since=yesterday", "unknown parameter(s) since"),
])
def test_history_params_rejected(query: str, message: str) -> None:
    with pytest.raises(BadRequest) as info:
        admin.parse_history_params(query)
    assert message in info.value.message


@pytest.fixture
async def upstream(nursery):
    return await start_mock(nursery)


async def test_admin_routes_need_the_token(nursery, upstream):
    proxy = await start_proxy(nursery, make_config(upstream, admin_token=TOKEN))
    for path in ("/admin/status", "/admin/keys", "/admin/history", "/admin/events"):
        resp = await request(proxy.port, "GET", path)
        assert resp.status == 401, path
        assert resp.json()["error"]["code"] == "invalid_api_key"
        wrong = await request(proxy.port, "GET", path, [("authorization", "Bearer nope")])
        assert wrong.status == 401
    bad = await request(proxy.port, "GET", "/admin/history?range=3d", AUTH)
    assert bad.status == 400
    assert "range must be one of" in bad.json()["error"]["message"]


async def test_keys_report_shows_aliases_limits_and_usage(nursery, upstream, tmp_path):
    keys = tmp_path / "keys.toml"
    keys.write_text('[[keys]]\nalias = "alice"\nkey = "zp-alice-1"\nmodels = ["glm-4.6"]\n'
                    '[keys.limits]\nrequests_per_minute = 10\nconcurrency = 2\n'
                    'requests_per_5h = 100\n\n'
                    '[[keys]]\nalias = "bob"\nkey = "zp-bob-1"\nenabled = false\n')
    proxy = await start_proxy(nursery, make_config(upstream, keys_file=str(keys)))
    for _ in range(3):
        resp = await request(proxy.port, "POST", "/v1/chat/completions",
                             [JSON, ("x-api-key", "zp-alice-1")], CHAT)
        assert resp.status == 200
    report = (await request(proxy.port, "GET", "/admin/keys")).json()
    assert report["mode"] == "keys"
    alice, bob = report["keys"]
    assert (alice["alias"], bob["alias"], bob["enabled"]) == ("alice", "bob", False)
    assert alice["models"] == ["glm-4.6"]
    assert alice["limits"] == {"requests_per_minute": 10, "concurrency": 2,
                               "requests_per_5h": 100}
    assert alice["now"]["requests_per_minute"]["remaining"] == 7
    assert alice["now"]["concurrency"] == {"limit": 2, "in_use": 0, "remaining": 2}
    assert alice["now"]["requests_per_5h"] == {"limit": 100, "used": 3, "remaining": 97}
    assert alice["usage"]["requests"] == 3
    assert alice["usage"]["input_tokens"] > 0
    text = orjson.dumps(report).decode()
    assert "zp-alice-1" not in text and "zp-bob-1" not in text


async def test_keys_report_in_open_mode(nursery, upstream):
    proxy = await start_proxy(nursery, make_config(upstream))
    assert (await request(proxy.port, "GET", "/admin/keys")).json() == {"mode": "open",
                                                                        "keys": []}


async def test_history_without_a_recorder_is_a_clear_503(nursery, upstream):
    proxy = await start_proxy(nursery, make_config(upstream))
    resp = await request(proxy.port, "GET", "/admin/history?range=5m")
    assert resp.status == 503
    assert "history" in resp.json()["error"]["message"]


async def test_status_has_the_variant_snapshot(nursery, upstream):
    proxy = await start_proxy(nursery, make_config(upstream, deployment_variant="canary"))
    for _ in range(4):
        assert (await request(proxy.port, "POST", "/v1/chat/completions", [JSON], CHAT)).status \
            == 200
    status = (await request(proxy.port, "GET", "/admin/status")).json()
    assert list(status["variants"]) == ["canary"]
    assert status["ledger"] == proxy.worker.ctx.ledger_impl


async def read_events(client: RawClient, count: int) -> list[tuple[str | None, str]]:
    """Read from an SSE response until ``count`` events or comments arrived."""
    parser = SSEParser()
    got: list[tuple[str | None, str]] = []
    raw = b""
    while len(got) < count:
        data = await client.stream.receive_some(65536)
        assert data, "stream closed early"
        raw += data
        if b"\r\n\r\n" in raw and not got and b"HTTP/1.1 200" in raw:
            body = raw.split(b"\r\n\r\n", 1)[1]
            raw = b""
        else:
            body, raw = raw, b""
        # Chunked framing: keep only the event bytes (lines that are not chunk sizes).
        for line in body.split(b"\r\n"):
            if line and all(c in b"0123456789abcdef" for c in line):
                continue
            for event in parser.feed(line):
                got.append((event.event, event.data))
            if line.startswith(b": heartbeat"):
                got.append(("heartbeat", ""))
    return got


async def test_events_stream_connected_metrics_heartbeat(nursery, upstream, monkeypatch):
    monkeypatch.setattr(admin, "EVENTS_INTERVAL_S", 0.1)
    monkeypatch.setattr(admin, "HEARTBEAT_S", 0.15)
    orig = admin.stream_events

    async def fast(ctx, client, **kw):
        await orig(ctx, client, interval=0.1, heartbeat=0.15, send_timeout=1.0)

    monkeypatch.setattr(admin, "stream_events", fast)
    proxy = await start_proxy(nursery, make_config(upstream))
    client = await RawClient.connect("127.0.0.1", proxy.port)
    await client.stream.send_all(b"GET /admin/events HTTP/1.1\r\nhost: x\r\n\r\n")
    with trio.fail_after(10):
        events = await read_events(client, 5)
    kinds = [kind for kind, _ in events]
    assert kinds[0] == "connected"
    assert "metrics" in kinds[1:]
    assert "heartbeat" in kinds
    metrics = next(orjson.loads(data) for kind, data in events if kind == "metrics")
    assert "variants" in metrics
    await client.aclose()


async def test_events_drops_a_consumer_that_does_not_read(nursery, upstream):
    # A lockstep stream: every write waits until the peer reads it. The consumer reads
    # nothing, so the first event's flush blocks and the stream must be dropped, not waited on.
    from trio.testing import lockstep_stream_pair

    from zaiproxy.http11 import h11 as proxy_h11
    from zaiproxy.server import ClientConnection

    proxy = await start_proxy(nursery, make_config(upstream))
    ctx = proxy.worker.ctx
    ours, theirs = lockstep_stream_pair()
    conn = ClientConnection(ours, ctx, "127.0.0.1")
    conn.conn.receive_data(b"GET /admin/events HTTP/1.1\r\nhost: x\r\n\r\n")
    assert type(conn.conn.next_event()) is proxy_h11.Request
    conn.request_id = b"test"
    with trio.fail_after(5):
        await admin.stream_events(ctx, conn, interval=0.01, heartbeat=0.02, send_timeout=0.2)
    assert conn.gone  # aborted: the connection is closed instead of held open
    await theirs.aclose()
