"""zaiproxy_tui.source: AdminApi against a real tiny HTTP server on port 0, and follow() on a fake clock.

Tests are sync and wrap ``asyncio.run``: the repo runs pytest-trio in trio_mode, which
would take over an ``async def`` test, and this code is asyncio. The server is
``asyncio.start_server`` writing raw HTTP/1.1 answers scripted per path; every answer
closes its connection, so a stream "ends" when its script does.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest

from tests.tui.fixtures import metrics_doc
from zaiproxy_tui.model import History, KeysReport, Snapshot
from zaiproxy_tui.source import (
    AdminApi,
    AuthRequired,
    Backoff,
    BadAnswer,
    Connected,
    Connecting,
    FeedEvent,
    NotServed,
    Reconnecting,
    SourceError,
    Unauthorized,
    Unreachable,
    follow,
)

DATA = Path(__file__).parent / "data"
TOKEN = "s3cret-admin-token"
T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def answer(status: int, body: bytes | str, content_type: str = "application/json") -> bytes:
    data = body.encode() if isinstance(body, str) else body
    return (f"HTTP/1.1 {status} X\r\ncontent-type: {content_type}\r\n"
            f"content-length: {len(data)}\r\nconnection: close\r\n\r\n").encode() + data


def stream(body: str) -> bytes:
    """An event stream: no length, the body ends when the connection closes."""
    return (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
            b"cache-control: no-cache\r\nconnection: close\r\n\r\n") + body.encode()


def error_body(message: str) -> str:
    return json.dumps({"error": {"message": message, "type": "invalid_request_error"}})


Script = bytes | Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class TinyServer:
    """Answers each path with its script; records every request head."""

    def __init__(self, routes: dict[str, Script]) -> None:
        self.routes = routes
        self.heads: list[str] = []
        self.url = ""

    async def __aenter__(self) -> TinyServer:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._server.close()
        await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = (await reader.readuntil(b"\r\n\r\n")).decode()
            self.heads.append(head)
            path = head.split(" ", 2)[1].split("?")[0]
            script = self.routes.get(path, answer(404, error_body("no such route")))
            if isinstance(script, bytes):
                writer.write(script)
                await writer.drain()
            else:
                await script(reader, writer)
        finally:
            writer.close()

    def header(self, index: int, name: str) -> str | None:
        for line in self.heads[index].split("\r\n")[1:]:
            key, _, value = line.partition(":")
            if key.strip().lower() == name:
                return value.strip()
        return None


async def call(routes: dict[str, Script], fn: Callable[[AdminApi], Awaitable[T]],
               token: str | None = TOKEN, **kw: Any) -> tuple[T | SourceError, TinyServer,
                                                              AdminApi]:
    async with TinyServer(routes) as server:
        api = AdminApi(server.url, token, clock=lambda: 1795828592.234757, **kw)
        try:
            result: T | SourceError = await fn(api)
        except SourceError as exc:
            result = exc
        finally:
            await api.aclose()
    return result, server, api


def keys(api: AdminApi) -> Awaitable[KeysReport]:
    return api.keys()


async def drain(api: AdminApi) -> tuple[list[Connected | Snapshot], SourceError | None]:
    """Every event of one events() stream, and the error that ended it."""
    got: list[Connected | Snapshot] = []
    try:
        async for event in api.events():
            got.append(event)
    except SourceError as exc:
        return got, exc
    return got, None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---- AdminApi: answers and their errors -------------------------------------------------


def test_keys_200_json_and_the_token_as_bearer() -> None:
    body = (DATA / "proxy_keys.json").read_text()
    report, server, _ = run(call({"/admin/keys": answer(200, body)}, keys))
    assert isinstance(report, KeysReport)
    assert [k.alias for k in report.keys] == ["alice", "bob"]
    assert server.heads[0].startswith("GET /admin/keys HTTP/1.1\r\n")
    assert server.header(0, "authorization") == f"Bearer {TOKEN}"


def test_history_200_sends_range_and_variant() -> None:
    body = (DATA / "proxy_history_5m.json").read_text()

    async def history(api: AdminApi) -> History:
        return await api.history("5m", "production")

    h, server, _ = run(call({"/admin/history": answer(200, body)}, history))
    assert isinstance(h, History)
    assert h.end == 1795828592.234757  # the api's clock
    assert len(h.series["production"]) == 3
    request_line = server.heads[0].split("\r\n")[0]
    assert request_line in ("GET /admin/history?range=5m&variant=production HTTP/1.1",
                            "GET /admin/history?variant=production&range=5m HTTP/1.1")


def test_no_token_sends_no_authorization() -> None:
    _, server, api = run(call({"/admin/keys": answer(200, "{}")}, keys, token=None))
    assert server.header(0, "authorization") is None
    assert repr(api).endswith("token=unset)")


def test_401_is_unauthorized_with_the_servers_message() -> None:
    msg = "admin endpoint: missing or wrong admin token"
    err, _, _ = run(call({"/admin/keys": answer(401, error_body(msg))}, keys))
    assert isinstance(err, Unauthorized)
    assert str(err) == msg


def test_401_without_a_message() -> None:
    err, _, _ = run(call({"/admin/keys": answer(401, "")}, keys))
    assert isinstance(err, Unauthorized)
    assert str(err) == "the admin API needs a token"


def test_404_is_not_served() -> None:
    err, _, _ = run(call({}, keys))
    assert isinstance(err, NotServed)
    assert str(err) == "/admin/keys is not served here (no such route)"


def test_503_is_not_served_with_the_message() -> None:
    body = error_body("history is off (ZAIPROXY_HISTORY_PATH is empty)")

    async def history(api: AdminApi) -> History:
        return await api.history("1h", "production")

    err, _, _ = run(call({"/admin/history": answer(503, body)}, history))
    assert isinstance(err, NotServed)
    assert str(err) == "history is off (ZAIPROXY_HISTORY_PATH is empty)"


def test_500_is_a_bad_answer() -> None:
    err, _, _ = run(call({"/admin/keys": answer(500, '{"message": "boom"}')}, keys))
    assert isinstance(err, BadAnswer)
    assert str(err) == "/admin/keys answered 500: boom"


def test_non_json_200_is_a_bad_answer() -> None:
    html = "<html><body>a router login page</body></html>"
    err, server, _ = run(call({"/admin/keys": answer(200, html, "text/html")}, keys))
    assert isinstance(err, BadAnswer)
    assert "not JSON" in str(err) and server.url in str(err)


def test_json_that_is_not_an_object_is_a_bad_answer() -> None:
    err, _, _ = run(call({"/admin/keys": answer(200, "[1, 2]")}, keys))
    assert isinstance(err, BadAnswer)
    assert str(err) == "/admin/keys: keys answer is not a JSON object"


def test_a_closed_port_is_unreachable() -> None:
    async def go() -> tuple[SourceError, AdminApi]:
        api = AdminApi(f"http://127.0.0.1:{free_port()}", TOKEN)
        try:
            with pytest.raises(Unreachable) as info:
                await api.keys()
            with pytest.raises(Unreachable):
                await drain_raise(api)
        finally:
            await api.aclose()
        return info.value, api

    err, api = run(go())
    assert str(err) == f"cannot connect to {api.url}"


async def drain_raise(api: AdminApi) -> None:
    async for _ in api.events():
        pass


def test_the_token_is_in_no_repr_and_no_message() -> None:
    routes: dict[str, Script] = {
        "/admin/keys": answer(401, error_body("wrong admin token")),
        "/admin/history": answer(500, "internal error"),
        "/admin/events": answer(503, error_body("events are off")),
    }

    async def everything(api: AdminApi) -> list[str]:
        out = [repr(api)]
        for fn in (api.keys, lambda: api.history("5m", "production"), lambda: drain_raise(api)):
            try:
                await fn()
            except SourceError as exc:
                out.append(str(exc))
                out.append(repr(exc))
        return out

    texts, _, api = run(call(routes, everything))
    assert not isinstance(texts, SourceError)
    assert len(texts) == 7
    assert texts[0] == f"AdminApi({api.url!r}, token=set)"
    assert all(TOKEN not in t for t in texts)
    # And nothing to find through a closed port either.
    api2 = AdminApi(f"http://127.0.0.1:{free_port()}", TOKEN)
    with pytest.raises(Unreachable) as info:
        run(_keys_then_close(api2))
    assert TOKEN not in str(info.value) and TOKEN not in repr(api2)


async def _keys_then_close(api: AdminApi) -> KeysReport:
    try:
        return await api.keys()
    finally:
        await api.aclose()


# ---- AdminApi.events(): the SSE parser ----------------------------------------------------


def sse(kind: str, doc: Any) -> str:
    return f"event: {kind}\ndata: {json.dumps(doc)}\n\n"


CONNECTED = sse("connected", {"worker": 0, "variant": "production", "interval_s": 2.0})


def events_of(body: str | Script, **kw: Any) -> tuple[list[Connected | Snapshot],
                                                      SourceError | None, TinyServer]:
    script = stream(body) if isinstance(body, str) else body
    result, server, _ = run(call({"/admin/events": script}, drain, **kw))
    assert not isinstance(result, SourceError)
    got, err = result
    return got, err, server


def test_events_connected_then_metrics_then_the_end_is_unreachable() -> None:
    first = json.loads((DATA / "proxy_metrics_first.json").read_text())
    second = json.loads((DATA / "proxy_metrics.json").read_text())
    got, err, server = events_of(CONNECTED + sse("metrics", first) + sse("metrics", second))
    assert got[0] == Connected(2.0, "production")
    assert [type(e) for e in got] == [Connected, Snapshot, Snapshot]
    assert isinstance(got[1], Snapshot) and isinstance(got[2], Snapshot)
    assert got[1].variants["production"].rates is None
    rates = got[2].variants["production"].rates
    assert rates is not None and rates.requests == pytest.approx(4.486540794883013)
    assert isinstance(err, Unreachable)
    assert str(err) == f"{server.url} closed the events stream"
    assert server.header(0, "accept") == "text/event-stream"
    assert server.header(0, "authorization") == f"Bearer {TOKEN}"


def test_events_heartbeat_comments_are_ignored() -> None:
    body = (": heartbeat\n\n" + CONNECTED + ": heartbeat\n\n: another comment\n"
            + sse("metrics", metrics_doc()) + ": heartbeat\n\n")
    got, err, _ = events_of(body)
    assert [type(e) for e in got] == [Connected, Snapshot]
    assert isinstance(err, Unreachable)


def test_events_multi_line_data_is_joined() -> None:
    doc = metrics_doc(now=1234.5)
    lines = json.dumps(doc, indent=1).split("\n")
    assert len(lines) > 50
    body = "event: metrics\n" + "".join(f"data: {line}\n" for line in lines) + "\n"
    got, _, _ = events_of(CONNECTED + body)
    snap = got[1]
    assert isinstance(snap, Snapshot)
    assert snap.time == 1234.5
    assert set(snap.variants) == {"production", "canary"}


def test_events_crlf_lines_and_no_space_after_colon() -> None:
    body = ('event:connected\r\ndata:{"interval_s":5}\r\n\r\n'
            "event: metrics\r\n" + f"data: {json.dumps(metrics_doc())}\r\n\r\n")
    got, _, _ = events_of(body)
    assert got[0] == Connected(5.0, None)
    assert isinstance(got[1], Snapshot)


def test_events_unknown_kinds_are_skipped() -> None:
    body = (CONNECTED + sse("hello", {"new": "thing"}) + "event: ping\ndata: not json\n\n"
            + sse("metrics", metrics_doc()))
    got, err, _ = events_of(body)
    assert [type(e) for e in got] == [Connected, Snapshot]
    assert isinstance(err, Unreachable)


def test_events_an_event_without_a_blank_line_at_the_end_is_not_dispatched() -> None:
    got, _, _ = events_of(CONNECTED + f"event: metrics\ndata: {json.dumps(metrics_doc())}\n")
    assert got == [Connected(2.0, "production")]


def test_events_metrics_that_are_not_json_is_a_bad_answer() -> None:
    got, err, _ = events_of(CONNECTED + "event: metrics\ndata: {oops\n\n")
    assert got == [Connected(2.0, "production")]
    assert isinstance(err, BadAnswer)
    assert "not JSON" in str(err)


def test_events_401_is_unauthorized() -> None:
    got, err, _ = events_of(answer(401, error_body("wrong admin token")))
    assert got == []
    assert isinstance(err, Unauthorized)
    assert str(err) == "wrong admin token"


def test_events_404_is_not_served() -> None:
    got, err, _ = events_of(answer(404, "not found", "text/plain"))
    assert got == []
    assert isinstance(err, NotServed)


def test_events_silent_stream_times_out_as_unreachable() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(stream(CONNECTED))
        await writer.drain()
        await reader.read()  # until the client gives up and closes

    got, err, server = events_of(silent, idle_timeout=0.2)
    assert got == [Connected(2.0, "production")]
    assert isinstance(err, Unreachable)
    assert str(err) == f"{server.url} timed out"


# ---- follow(): backoff on a fake clock ------------------------------------------------------

SNAP = Snapshot(time=1.0, source="proxy", variants={})
CLOCK = 1000.0


class ScriptedSource:
    """events() plays one script per call: its events, then its error (None: it just ends)."""

    def __init__(self, scripts: list[tuple[list[Connected | Snapshot], SourceError | None]]) \
            -> None:
        self.scripts = scripts
        self.calls = 0

    async def events(self) -> AsyncIterator[Connected | Snapshot]:
        events, error = self.scripts[self.calls]
        self.calls += 1
        for event in events:
            yield event
        if error is not None:
            raise error

    async def history(self, range_: str, variant: str) -> History:
        raise NotImplementedError

    async def keys(self) -> KeysReport:
        raise NotImplementedError


def follow_script(scripts: list[tuple[list[Connected | Snapshot], SourceError | None]]) \
        -> tuple[list[FeedEvent], list[float]]:
    emitted: list[FeedEvent] = []
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    source = ScriptedSource(scripts)
    run(follow(source, emitted.append, backoff=Backoff(jitter=lambda: 1.0),
               clock=lambda: CLOCK, sleep=sleep))
    assert source.calls == len(scripts)
    return emitted, slept


Attempt = tuple[list[Connected | Snapshot], SourceError | None]
STOP: Attempt = ([], Unauthorized("wrong admin token"))


def test_follow_emits_connecting_connected_snapshots_then_reconnecting() -> None:
    emitted, slept = follow_script([
        ([Connected(2.0, "production"), SNAP, SNAP], Unreachable("x closed the events stream")),
        STOP])
    assert emitted == [
        Connecting(0), Connected(2.0, "production"), SNAP, SNAP,
        Reconnecting("x closed the events stream", CLOCK + 1.0, 1),
        Connecting(1), AuthRequired("wrong admin token")]
    assert slept == [1.0]


def test_follow_backoff_doubles_to_a_cap_of_30() -> None:
    failures: list[Attempt] = [([], Unreachable(f"cannot connect ({i})")) for i in range(8)]
    emitted, slept = follow_script([*failures, STOP])
    assert slept == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]
    reconnecting = [e for e in emitted if isinstance(e, Reconnecting)]
    assert [e.retry_at for e in reconnecting] == [CLOCK + d for d in slept]
    assert [e.attempt for e in reconnecting] == list(range(1, 9))
    assert reconnecting[3].error == "cannot connect (3)"
    assert [e.attempt for e in emitted if isinstance(e, Connecting)] == list(range(9))


def test_follow_a_snapshot_resets_the_attempts() -> None:
    emitted, slept = follow_script([
        ([], Unreachable("a")), ([], Unreachable("b")), ([], Unreachable("c")),
        ([Connected(2.0, None), SNAP], BadAnswer("d")),
        ([Connected(2.0, None)], Unreachable("e")),  # connected, but no snapshot: no reset
        STOP])
    assert slept == [1.0, 2.0, 4.0, 1.0, 2.0]
    assert [e.attempt for e in emitted if isinstance(e, Reconnecting)] == [1, 2, 3, 1, 2]


def test_follow_a_stream_that_just_ends_reconnects() -> None:
    emitted, slept = follow_script([([SNAP], None), STOP])
    assert Reconnecting("the events stream ended", CLOCK + 1.0, 1) in emitted
    assert slept == [1.0]


def test_follow_stops_at_once_on_unauthorized() -> None:
    emitted, slept = follow_script([STOP])
    assert emitted == [Connecting(0), AuthRequired("wrong admin token")]
    assert slept == []


def test_backoff_jitter_scales_the_delay() -> None:
    assert Backoff(jitter=lambda: 0.8).delay(0) == pytest.approx(0.8)
    assert Backoff(jitter=lambda: 1.2).delay(10) == pytest.approx(36.0)
    assert Backoff(jitter=lambda: 1.0).delay(1000) == 30.0
    delays = [Backoff().delay(3) for _ in range(50)]
    assert all(6.4 <= d <= 9.6 for d in delays)
