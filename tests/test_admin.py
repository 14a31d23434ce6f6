"""The proxy's admin API: auth, parameters, /admin/keys, /admin/status, /admin/events framing."""

from __future__ import annotations

import time
from typing import Any

import h11
import orjson
import pytest
import trio

from tests.harness import RawClient, make_config, request, start_mock, start_proxy
from zaiproxy.core.errors import BadRequest
from zaiproxy.core.logs import get_logger
from zaiproxy.http.sse import SSEParser
from zaiproxy.limits.ratecontrol import RateController
from zaiproxy.request import admin
from zaiproxy.request.context import EventsTiming

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
    assert {k: alice["now"]["requests_per_5h"][k] for k in ("limit", "used", "remaining")} \
        == {"limit": 100, "used": 3, "remaining": 97}
    assert alice["usage"]["requests"] == 3
    assert alice["usage"]["input_tokens"] > 0
    # Every request by outcome (the names of /admin/status's failure kinds), then the tokens.
    assert list(alice["usage"]) == ["requests", "ok", "proxy_429", "zai_429", "other_4xx", "5xx",
                                    "charged_requests", "input_tokens", "output_tokens",
                                    "cache_read_tokens", "cache_write_tokens"]
    assert (alice["usage"]["ok"], alice["usage"]["charged_requests"]) == (3, 3)
    assert bob["usage"]["requests"] == 0
    text = orjson.dumps(report).decode()
    assert "zp-alice-1" not in text and "zp-bob-1" not in text


def restarted(window: dict) -> dict:
    """A window of a proxy started moments ago: it says since when it counts (the wall time
    its ledger began), and otherwise the state the test computes on its virtual clock."""
    state = dict(window)
    since = state.pop("since")
    assert isinstance(since, float) and since > 1.7e9
    return state


class VirtualClock:
    """The admitter's clock, moved by the test: windows and rates counted exactly."""

    def __init__(self, ns: int) -> None:
        self.ns = ns

    def __call__(self) -> int:
        return self.ns

    def advance(self, seconds: float) -> None:
        self.ns += int(seconds * 1e9)


BUCKET_5H_S = 5 * 3600 // 60  # a 5 h window moves in 60 buckets of 5 minutes
BUCKET_WEEK_S = 7 * 24 * 3600 // 60  # and a week in buckets of 2.8 h
T0_S = 1000 * BUCKET_5H_S + 120  # 2 minutes into a 5 h bucket; 29.77 week buckets


async def chat(port: int, key: str | None = None) -> int:
    headers = [JSON] if key is None else [JSON, ("x-api-key", key)]
    return (await request(port, "POST", "/v1/chat/completions", headers, CHAT)).status


async def keys_report(port: int) -> dict:
    resp = await request(port, "GET", "/admin/keys")
    assert resp.status == 200
    return resp.json()


async def test_keys_report_windows_say_when_they_next_release(nursery, upstream, tmp_path):
    keys = tmp_path / "keys.toml"
    keys.write_text('[[keys]]\nalias = "alice"\nkey = "zp-alice-1"\n'
                    '[keys.limits]\nrequests_per_5h = 100\nrequests_per_week = 50\n\n'
                    '[[keys]]\nalias = "bob"\nkey = "zp-bob-1"\n'
                    '[keys.limits]\nrequests_per_5h = 10\n')
    proxy = await start_proxy(nursery, make_config(upstream, keys_file=str(keys)))
    clock = proxy.worker.ctx.admitter.clock = VirtualClock(T0_S * 10**9)
    for _ in range(3):
        assert await chat(proxy.port, "zp-alice-1") == 200
    alice, bob = (await keys_report(proxy.port))["keys"]
    # Bucket 1000 of the 5 h window leaves it at the end of bucket 1059.
    assert restarted(alice["now"]["requests_per_5h"]) == {"limit": 100, "used": 3, "remaining": 97,
                                               "reset_s": 5 * 3600 - 120.0, "releases": 3}
    week_end_s = (T0_S // BUCKET_WEEK_S + 60) * BUCKET_WEEK_S
    assert restarted(alice["now"]["requests_per_week"]) == {"limit": 50, "used": 3, "remaining": 47,
                                                 "reset_s": float(week_end_s - T0_S),
                                                 "releases": 3}
    assert restarted(bob["now"]["requests_per_5h"]) == {"limit": 10, "used": 0, "remaining": 10,
                                             "reset_s": 0.0, "releases": 0}
    clock.advance(600.25)  # two buckets later: the oldest release is still the first bucket
    for _ in range(2):
        assert await chat(proxy.port, "zp-alice-1") == 200
    window = (await keys_report(proxy.port))["keys"][0]["now"]["requests_per_5h"]
    assert (window["used"], window["reset_s"], window["releases"]) == (5, 17_279.75, 3)
    clock.advance(17_279.75)  # the first bucket left: the next release is the later one
    window = (await keys_report(proxy.port))["keys"][0]["now"]["requests_per_5h"]
    assert (window["used"], window["reset_s"], window["releases"]) == (2, 600.0, 2)
    clock.advance(600)
    window = (await keys_report(proxy.port))["keys"][0]["now"]["requests_per_5h"]
    assert (window["used"], window["reset_s"], window["releases"]) == (0, 0.0, 0)


GLOBAL_LIMITS = {"requests_per_minute": 100, "concurrency": 8, "requests_per_5h": 1000,
                 "upstream_requests_per_minute": 50, "upstream_requests_per_week": 500}


async def test_keys_report_global_has_proxy_and_upstream_limits(nursery, upstream, tmp_path):
    keys = tmp_path / "keys.toml"
    keys.write_text('[[keys]]\nalias = "alice"\nkey = "zp-alice-1"\n'
                    '[keys.limits]\nrequests_per_minute = 10\n')
    proxy = await start_proxy(nursery, make_config(upstream, keys_file=str(keys),
                                                   **GLOBAL_LIMITS))
    proxy.worker.ctx.admitter.clock = VirtualClock(T0_S * 10**9)
    for _ in range(2):
        assert await chat(proxy.port, "zp-alice-1") == 200
    report = await keys_report(proxy.port)
    shared = report["global"]
    assert sorted(shared) == sorted(GLOBAL_LIMITS)  # no adaptive op, no key limits
    assert shared["requests_per_minute"] == {"limit": 100, "remaining": 98, "reset_s": 1.2}
    assert shared["concurrency"] == {"limit": 8, "in_use": 0, "remaining": 8}
    assert restarted(shared["requests_per_5h"]) == {"limit": 1000, "used": 2, "remaining": 998,
                                         "reset_s": 5 * 3600 - 120.0, "releases": 2}
    assert shared["upstream_requests_per_minute"] == {"limit": 50, "remaining": 48,
                                                      "reset_s": 2.4}
    assert {k: shared["upstream_requests_per_week"][k] for k in ("used", "remaining",
                                                                 "releases")} \
        == {"used": 2, "remaining": 498, "releases": 2}
    # The key's own limits stay in its entry, the shared ones only in "global".
    assert list(report["keys"][0]["now"]) == ["requests_per_minute"]


async def test_keys_report_in_open_mode_still_has_global_and_adaptive(nursery, upstream):
    proxy = await start_proxy(nursery, make_config(upstream, requests_per_5h=10,
                                                   upstream_concurrency=4))
    assert await chat(proxy.port) == 200
    report = await keys_report(proxy.port)
    assert (report["mode"], report["keys"]) == ("open", [])
    assert {k: report["global"]["requests_per_5h"][k] for k in ("used", "remaining",
                                                                "releases")} \
        == {"used": 1, "remaining": 9, "releases": 1}
    assert 0 < report["global"]["requests_per_5h"]["reset_s"] <= 5 * 3600
    assert report["global"]["upstream_concurrency"] == {"limit": 4, "in_use": 0, "remaining": 4}
    assert report["adaptive"]["enabled"] is True


async def test_keys_report_adaptive_rate_as_the_supervisor_publishes_it(nursery, upstream,
                                                                       tmp_path):
    config = make_config(upstream, adaptive_min_rps=0.5, adaptive_max_rps=20.0)
    proxy = await start_proxy(nursery, config)
    assert (await keys_report(proxy.port))["adaptive"] == {
        "enabled": True, "rate_rps": None, "min_rps": 0.5, "max_rps": 20.0,
        "ceiling_rps": None, "adjustments": {"up": 0, "down": 0},
        "throttled_at": None, "reason": None, "forget_after_s": 300.0, "free_in_s": None}
    # Three throttled requests (1303) in the decider's first second: 0.7 x the 3 rps observed.
    ctx = proxy.worker.ctx
    wall = float(int(time.time()))
    controller = RateController(ctx.ledger, config, str(tmp_path / "adaptive.json"),
                                wall=lambda: wall)
    controller.tick(100.0)
    for _ in range(3):
        ctx.admitter.note_upstream("frequency")
    controller.tick(101.0)
    report = (await keys_report(proxy.port))["adaptive"]
    free_in = report.pop("free_in_s")
    assert report == {
        "enabled": True, "rate_rps": 2.1, "min_rps": 0.5, "max_rps": 20.0,
        "ceiling_rps": 3.0, "adjustments": {"up": 0, "down": 1},
        "throttled_at": wall, "reason": "frequency", "forget_after_s": 300.0}
    assert 290.0 <= free_in <= 300.0


async def test_keys_report_adaptive_disabled(nursery, upstream):
    proxy = await start_proxy(nursery, make_config(upstream, adaptive_rate=False))
    adaptive = (await keys_report(proxy.port))["adaptive"]
    assert (adaptive["enabled"], adaptive["rate_rps"]) == (False, None)


async def test_keys_report_state_limited_when_a_limit_is_exhausted(nursery, upstream, tmp_path):
    keys = tmp_path / "keys.toml"
    keys.write_text('[[keys]]\nalias = "alice"\nkey = "zp-alice-1"\n'
                    '[keys.limits]\nrequests_per_minute = 2\nrequests_per_5h = 100\n\n'
                    '[[keys]]\nalias = "bob"\nkey = "zp-bob-1"\nenabled = false\n')
    proxy = await start_proxy(nursery, make_config(upstream, keys_file=str(keys)))
    clock = proxy.worker.ctx.admitter.clock = VirtualClock(T0_S * 10**9)
    alice, bob = (await keys_report(proxy.port))["keys"]
    assert (alice["state"], alice["limited_by"]) == ("ok", [])
    assert (bob["state"], bob["limited_by"]) == ("disabled", [])
    for _ in range(2):
        assert await chat(proxy.port, "zp-alice-1") == 200
    alice = (await keys_report(proxy.port))["keys"][0]
    assert (alice["state"], alice["limited_by"]) == ("limited", ["requests_per_minute"])
    assert await chat(proxy.port, "zp-alice-1") == 429  # the report agrees with admission
    clock.advance(30)  # one request's worth of the rate came back
    alice = (await keys_report(proxy.port))["keys"][0]
    assert (alice["state"], alice["limited_by"]) == ("ok", [])


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


async def test_events_stream_connected_metrics_heartbeat(nursery, upstream):
    proxy = await start_proxy(nursery, make_config(upstream))
    proxy.worker.ctx.events = EventsTiming(interval=0.1, heartbeat=0.15, send_timeout=1.0)
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


class MetricsEvents:
    """The ``metrics`` events of one ``/admin/events`` response, de-chunked by h11 and
    parsed by the proxy's incremental SSE parser (frames may span reads)."""

    def __init__(self, client: RawClient) -> None:
        self.client = client
        self.parser = SSEParser()
        self.pending: list[dict[str, Any]] = []

    async def start(self) -> None:
        conn = self.client.conn
        await self.client.stream.send_all(
            conn.send(h11.Request(method="GET", target="/admin/events", headers=[("host", "x")]))
            + conn.send(h11.EndOfMessage()))

    async def next(self) -> dict[str, Any]:
        conn = self.client.conn
        while not self.pending:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await self.client.stream.receive_some(65536))
            elif type(event) is h11.Response:
                assert event.status_code == 200
            elif type(event) is h11.Data:
                self.pending += [orjson.loads(e.data) for e in self.parser.feed(event.data)
                                 if e.event == "metrics"]
            else:
                raise AssertionError(f"stream ended: {event!r}")
        return self.pending.pop(0)


async def test_events_carry_rates_since_the_previous_event(nursery, upstream):
    proxy = await start_proxy(nursery, make_config(upstream, deployment_variant="canary",
                                                   concurrency=5))
    proxy.worker.ctx.events = EventsTiming(interval=0.05, heartbeat=60, send_timeout=1.0)
    client = await RawClient.connect("127.0.0.1", proxy.port)
    events = MetricsEvents(client)
    with trio.fail_after(10):
        await events.start()
        got = [(await events.next())["variants"]["canary"]]
        for _ in range(3):
            assert (await request(proxy.port, "POST", "/v1/chat/completions", [JSON], CHAT)
                    ).status == 200
        assert (await request(proxy.port, "GET", "/health")).status == 200  # not API traffic
        while got[-1]["requests"] < 3:
            got.append((await events.next())["variants"]["canary"])
        got.append((await events.next())["variants"]["canary"])  # one more: nothing new
    await client.aclose()
    first, *rest = got
    assert first["rates"] is None  # nothing to compare with yet
    assert first["requests"] == 0
    assert all(v["rates"] is not None and v["rates"]["seconds"] > 0 for v in rest)
    # The first event whose totals grew: its rates are the growth over its interval.
    grew = next(i for i in range(1, len(got)) if got[i]["requests"] > got[i - 1]["requests"])
    rates = got[grew]["rates"]
    increase = got[grew]["requests"] - got[grew - 1]["requests"]
    assert rates["requests"] == increase
    assert rates["requests_per_s"] == pytest.approx(increase / rates["seconds"])
    assert rates["requests_per_s"] > 0
    assert rates["breakdown_per_s"]["status"]["200"] == rates["requests_per_s"]
    assert (rates["workers"], rates["concurrency_limit"]) == (1, 5)
    last = got[-1]
    assert last["requests"] == 3 and last["rates"]["requests_per_s"] == 0
    assert last["rates"]["breakdown_per_s"]["status"] == {"200": 0}  # increases, not totals
    assert last["breakdown"]["status"] == {"200": 3}
    assert set(last["breakdown"]) == {"status", "zai_errors", "zai_error_classes",
                                      "upstream_errors", "rejections", "retries", "adjustments"}
    assert (last["workers"], last["concurrency_limit"]) == (1, 5)


async def test_events_drops_a_consumer_that_does_not_read(nursery, upstream):
    # A lockstep stream: every write waits until the peer reads it. The consumer reads
    # nothing, so the first event's flush blocks and the stream must be dropped, not waited on.
    from trio.testing import lockstep_stream_pair

    from zaiproxy.http.http11 import h11 as proxy_h11
    from zaiproxy.request.pipeline import Pipeline

    proxy = await start_proxy(nursery, make_config(upstream))
    ctx = proxy.worker.ctx
    ours, theirs = lockstep_stream_pair()
    conn = Pipeline(ctx).connection(ours, "127.0.0.1")
    conn.conn.receive_data(b"GET /admin/events HTTP/1.1\r\nhost: x\r\n\r\n")
    assert type(conn.conn.next_event()) is proxy_h11.Request
    conn.request_id = b"test"
    with trio.fail_after(5):
        ctx.events = EventsTiming(interval=0.01, heartbeat=0.02, send_timeout=0.2)
        await admin.stream_events(ctx, conn)
    assert conn.gone  # aborted: the connection is closed instead of held open
    await theirs.aclose()


async def test_a_client_leaving_the_events_stream_is_not_an_error(nursery, upstream, log_buffer):
    # Quitting the TUI or cutting a curl mid-stream is normal: no connection_crashed, no
    # error-level line (it was logged as an ExceptionGroup([ClientGone()]) error).
    proxy = await start_proxy(nursery, make_config(upstream))
    proxy.worker.ctx.events = EventsTiming(interval=0.02, heartbeat=60, send_timeout=1.0)
    for _ in range(3):
        client = await RawClient.connect("127.0.0.1", proxy.port)
        events = MetricsEvents(client)
        with trio.fail_after(10):
            await events.start()
            await events.next()
        await client.aclose()  # leaves between two events
    # The server sees the close at its next write (one interval later) and ends quietly.
    with trio.fail_after(10):
        while len(proxy.worker.connections) > 0:  # noqa: ASYNC110 - no event to wait on
            await trio.sleep(0.01)
    get_logger().flush()
    lines = [orjson.loads(raw) for raw in log_buffer.getvalue().splitlines()]
    assert not [line for line in lines if line.get("level") == "error"], lines
    assert not [line for line in lines if line.get("event") == "connection_crashed"]
