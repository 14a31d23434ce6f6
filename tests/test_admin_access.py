"""The admin API without a token: warned about when exposed, and no admin actions off loopback.

The peer address decides. Off-loopback peers are simulated with a ClientConnection over a
memory stream given another ``client_ip`` (the tests' traffic stays on 127.0.0.1); the
start-up warning and ``/health`` are checked on a real supervisor bound to all interfaces.
"""

from __future__ import annotations

import functools
import signal
from pathlib import Path

import orjson
import pytest
import trio
import trio.testing

from tests.harness import (
    ProcessServer,
    make_config,
    request,
    start_mock,
    start_process,
    upstream_env,
)
from zaiproxy.request.admin_access import is_loopback, security_warnings
from zaiproxy.request.pipeline import Pipeline
from zaiproxy.run.worker import build_context

TOKEN = "admin-token-0123456789"


async def ask(ctx, client_ip: str, method: str, target: str, token: str | None = None) -> bytes:
    """One request through a ClientConnection whose peer is ``client_ip``; the raw answer."""
    client, server = trio.testing.memory_stream_pair()
    conn = Pipeline(ctx).connection(server, client_ip)
    auth = b"Authorization: Bearer %s\r\n" % token.encode() if token else b""
    out = bytearray()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(conn.run)
        await client.send_all(b"%s %s HTTP/1.1\r\nHost: x\r\n%sContent-Length: 0\r\n"
                              b"Connection: close\r\n\r\n" % (method.encode(), target.encode(),
                                                               auth))
        while chunk := await client.receive_some(65536):
            out += chunk
    return bytes(out)


def status_of(raw: bytes) -> int:
    return int(raw.split(b" ", 2)[1])


def body_of(raw: bytes) -> dict:
    return orjson.loads(raw.split(b"\r\n\r\n", 1)[1])


@pytest.mark.parametrize("host, loopback", [
    ("127.0.0.1", True), ("127.9.8.7", True), ("::1", True), ("::ffff:127.0.0.1", True),
    ("localhost", True), ("0.0.0.0", False), ("::", False), ("10.0.0.1", False),
    ("::ffff:10.0.0.1", False), ("fd00::2", False), ("example.com", False),
])
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_warnings_only_when_exposed_without_a_token() -> None:
    assert security_warnings("0.0.0.0", None) == ["admin_api_open"]
    assert security_warnings("0.0.0.0", TOKEN) == []
    assert security_warnings("127.0.0.1", None) == []


async def test_admin_actions_off_loopback_need_a_token(nursery) -> None:
    upstream = await start_mock(nursery)
    ctx = build_context(make_config(upstream, host="0.0.0.0"))
    refused = await ask(ctx, "10.1.2.3", "POST", "/admin/reset-rate-limit")
    assert status_of(refused) == 403
    assert body_of(refused)["error"]["code"] == "admin_token_required"
    assert "ZAIPROXY_ADMIN_TOKEN" in body_of(refused)["error"]["message"]
    # From loopback the operator may act; reading stays open (and says it is exposed).
    assert status_of(await ask(ctx, "127.0.0.1", "POST", "/admin/reset-rate-limit")) == 200
    assert status_of(await ask(ctx, "::1", "POST", "/admin/reset-rate-limit")) == 200
    status = await ask(ctx, "10.1.2.3", "GET", "/admin/status")
    assert status_of(status) == 200
    assert body_of(status)["warnings"] == ["admin_api_open"]
    health = await ask(ctx, "10.1.2.3", "GET", "/health")
    assert body_of(health)["warnings"] == ["admin_api_open"]


async def test_with_a_token_every_peer_needs_it(nursery) -> None:
    upstream = await start_mock(nursery)
    ctx = build_context(make_config(upstream, host="0.0.0.0", admin_token=TOKEN))
    for ip in ("10.1.2.3", "127.0.0.1"):
        assert status_of(await ask(ctx, ip, "POST", "/admin/reset-rate-limit")) == 401
        assert status_of(await ask(ctx, ip, "POST", "/admin/reset-rate-limit", "wrong")) == 401
        assert status_of(await ask(ctx, ip, "POST", "/admin/reset-rate-limit", TOKEN)) == 200
        assert status_of(await ask(ctx, ip, "GET", "/admin/keys")) == 401
    health = await ask(ctx, "10.1.2.3", "GET", "/health")
    assert body_of(health)["warnings"] == []


async def test_an_exposed_proxy_warns_at_start_and_in_health(mock: ProcessServer,
                                                            tmp_path: Path) -> None:
    proxy = await trio.to_thread.run_sync(functools.partial(
        start_process, ["serve", "--host", "0.0.0.0", "--port", "0", "--workers", "1"],
        env=upstream_env(mock, ZAIPROXY_HISTORY="false"), stderr_path=tmp_path / "proxy.log"))
    try:
        resp = await request(proxy.port, "GET", "/health")
        assert resp.json()["warnings"] == ["admin_api_open"]
    finally:
        assert await trio.to_thread.run_sync(proxy.stop, signal.SIGTERM) == 0
    lines = [orjson.loads(line) for line in proxy.logs().splitlines()
             if '"event":"admin_api_open"' in line]
    assert len(lines) == 1
    assert lines[0]["level"] == "warning" and lines[0]["host"] == "0.0.0.0"
