"""The recorder with real processes: supervisor, workers, recorder, mock upstream.

What a client got is the reference: every 200 it received (its
``x-zaiproxy-request-id``) must be a row in the file after the proxy exits,
also when SIGTERM arrives under load. DuckDB failing must never cost a request.
"""

from __future__ import annotations

import functools
import os
import signal
from pathlib import Path
from typing import Any

import duckdb
import h11
import orjson
import trio

from tests.harness import (
    UPSTREAM_KEY,
    ProcessServer,
    RawClient,
    request,
    start_process,
    wait_until,
)
from zaiproxy.observe.recorder.endpoint import fetch
from zaiproxy.observe.recorder.process import endpoint_file

BODY = orjson.dumps({"model": "glm-4.6", "messages": [{"role": "user", "content": "hi"}]})
STREAM_BODY = orjson.dumps({"model": "glm-4.6", "stream": True,
                            "messages": [{"role": "user", "content": "hi"}]})


def proxy_env(mock: ProcessServer, history: Path, **extra: str) -> dict[str, str]:
    return {
        "ZAI_API_KEY": UPSTREAM_KEY,
        "ZAIPROXY_OPENAI_BASE_URL": f"{mock.url}/api/paas/v4",
        "ZAIPROXY_ANTHROPIC_BASE_URL": f"{mock.url}/api/anthropic",
        "ZAIPROXY_NATIVE_BASE_URL": mock.url,
        "ZAIPROXY_WORKERS": "2",
        "ZAIPROXY_DRAIN_TIMEOUT": "10",
        "ZAIPROXY_ADAPTIVE_RATE": "false",
        "ZAIPROXY_HISTORY_PATH": str(history),
        **extra,
    }


async def launch(mock: ProcessServer, tmp_path: Path, history: Path, **extra: str) -> ProcessServer:
    # start_process blocks until the "listening on" line: keep it off the trio loop.
    return await trio.to_thread.run_sync(functools.partial(
        start_process, ["serve", "--port", "0"], env=proxy_env(mock, history, **extra),
        stderr_path=tmp_path / "proxy.log"))


async def stop(proxy: ProcessServer, sig: int = signal.SIGTERM) -> int:
    return await trio.to_thread.run_sync(functools.partial(proxy.stop, sig))


def log_events(proxy: ProcessServer, name: str) -> list[dict[str, Any]]:
    out = []
    for line in proxy.logs().splitlines():
        if line.startswith("{") and f'"event":"{name}"' in line:
            out.append(orjson.loads(line))
    return out


def endpoint_doc(history: Path) -> dict[str, Any] | None:
    """What the running recorder wrote to ``<history>.endpoint`` (None: no such file)."""
    try:
        doc: dict[str, Any] = orjson.loads(Path(endpoint_file(str(history))).read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return None
    return doc


def recorder_url(history: Path) -> str | None:
    doc = endpoint_doc(history)
    return doc["url"] if doc is not None else None


async def recorder_status(history: Path) -> dict[str, Any]:
    url = recorder_url(history)
    assert url is not None
    body = await trio.to_thread.run_sync(fetch, url, "/history/status", {})
    status: dict[str, Any] = orjson.loads(body)
    return status


def ids_in_file(history: Path) -> list[str]:
    con = duckdb.connect(str(history), read_only=True)
    try:
        return [r[0] for r in con.execute("SELECT request_id FROM requests").fetchall()]
    finally:
        con.close()


async def send(port: int, n: int, clients: int = 4, *, stream: bool = False) -> list[str]:
    """``n`` chat completions over ``clients`` keep-alive connections; the 200s' request ids."""
    ok: list[str] = []
    headers = [("content-type", "application/json")]

    async def client(share: int) -> None:
        c = await RawClient.connect("127.0.0.1", port)
        try:
            for _ in range(share):
                resp = await c.request("POST", "/v1/chat/completions", headers,
                                       STREAM_BODY if stream else BODY)
                assert resp.status == 200, resp.body
                rid = resp.header(b"x-zaiproxy-request-id")
                assert rid is not None
                ok.append(rid.decode())
        finally:
            await c.aclose()

    async with trio.open_nursery() as nursery:
        for i in range(clients):
            nursery.start_soon(client, n // clients + (1 if i < n % clients else 0))
    return ok


async def test_every_request_is_a_row_and_the_cli_asks_the_running_recorder(
        mock: ProcessServer, tmp_path: Path) -> None:
    history = tmp_path / "h.duckdb"
    proxy = await launch(mock, tmp_path, history)
    try:
        ids = await send(proxy.port, 400)
        assert len(ids) == 400
        await wait_until(lambda: recorder_url(history) is not None, 10)

        async def written() -> bool:
            return (await recorder_status(history))["rows_written"] == 400

        with trio.fail_after(10):
            while not await written():  # noqa: ASYNC110  (another process's state)
                await trio.sleep(0.05)
        # The CLI while the proxy runs: it cannot open the file, so it asks the recorder.
        from zaiproxy.cli import build_parser
        from zaiproxy.observe.recorder import cli

        out, err = _Text(), _Text()
        ns = build_parser().parse_args(["history", "--path", str(history), "--json",
                                        "--by", "status", "--range", "1h"])
        assert await trio.to_thread.run_sync(cli.run, ns, out, err) == 0, err.text
        doc = orjson.loads(out.text)[0]
        assert [(r["status"], r["requests"]) for r in doc["rows"]] == [(200, 400)]
        assert doc["total"]["input_tokens"] > 0
        assert doc["total"]["cost_usd"] > 0  # glm-4.6 at the built-in list prices
        # The admin API (what the TUI reads) asks the recorder too.
        resp = await request(proxy.port, "GET", "/admin/history?range=1h&variant=production")
        assert resp.status == 200, resp.body
        admin = resp.json()
        assert admin["summary"]["total"]["requests"] == 400
        assert sum(p["requests"] for p in admin["series"]["series"]["production"]) == 400
        metrics = (await request(proxy.port, "GET", "/metrics")).body.decode()
        assert 'zai_proxy_recorder_dropped_records_total{variant="production"} 0.0' in metrics
    finally:
        assert await stop(proxy) == 0, proxy.logs()[-3000:]
    in_file = ids_in_file(history)
    assert set(ids) <= set(in_file) and len(in_file) == len(set(in_file)) == 400  # API requests only: /admin/history and /metrics are not history
    assert endpoint_doc(history) is None  # removed on a clean exit
    assert log_events(proxy, "history_error") == []


class _Text:
    def __init__(self) -> None:
        self.text = ""

    def write(self, s: str) -> int:
        self.text += s
        return len(s)


async def test_sigterm_under_load_loses_no_completed_request(
        mock: ProcessServer, tmp_path: Path) -> None:
    history = tmp_path / "h.duckdb"
    proxy = await launch(mock, tmp_path, history)
    completed: list[str] = []
    started = trio.Event()
    # Streams of 10 events 20 ms apart: at any moment several are in flight.
    headers = [("content-type", "application/json"), ("x-mock-chunks", "10"),
               ("x-mock-chunk-delay", "0.02")]

    async def client() -> None:
        while True:
            try:
                c = await RawClient.connect("127.0.0.1", proxy.port)
            except OSError:
                return  # the proxy stopped listening
            try:
                while True:
                    resp = await c.request("POST", "/v1/chat/completions", headers, STREAM_BODY)
                    if resp.status != 200 or not resp.complete:
                        break
                    assert resp.body.rstrip().endswith(b"data: [DONE]")
                    completed.append(resp.header(b"x-zaiproxy-request-id").decode())  # type: ignore[union-attr]
                    if len(completed) >= 40:
                        started.set()
                    if c.conn.our_state is not h11.IDLE:
                        break  # "connection: close" (the drain began): open a new one
            except (OSError, trio.BrokenResourceError, h11.RemoteProtocolError):
                pass  # the drain closed the connection
            finally:
                await c.aclose()

    async with trio.open_nursery() as nursery:
        for _ in range(8):
            nursery.start_soon(client)
        with trio.fail_after(20):
            await started.wait()
        code = await stop(proxy)  # while streams are in flight
        assert code == 0, proxy.logs()[-3000:]
    drained = log_events(proxy, "drain_started")
    assert any(e.get("connections", 0) > 0 for e in drained)  # it really was under load
    in_file = set(ids_in_file(history))
    missing = [rid for rid in completed if rid not in in_file]
    assert missing == [], f"{len(missing)} of {len(completed)} completed requests not recorded"
    stopped = log_events(proxy, "recorder_stopped")
    assert stopped[0]["lost"] == 0 and stopped[0]["worker_dropped"] == 0


async def test_an_unwritable_history_path_costs_no_request(
        mock: ProcessServer, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    proxy = await launch(mock, tmp_path, blocker / "h.duckdb")
    try:
        assert len(await send(proxy.port, 20)) == 20
        await wait_until(lambda: log_events(proxy, "history_error"), 10)
    finally:
        assert await stop(proxy) == 0, proxy.logs()[-3000:]
    error = log_events(proxy, "history_error")[0]
    assert error["proc"] == "recorder" and error["op"] == "open"
    assert "IOException" in error["error"]
    assert log_events(proxy, "history_rows_lost_at_exit")[0]["rows"] == 20


async def test_a_locked_file_is_retried_until_released(
        mock: ProcessServer, tmp_path: Path) -> None:
    history = tmp_path / "h.duckdb"
    holder = duckdb.connect(str(history))  # this test's process holds the lock
    try:
        proxy = await launch(mock, tmp_path, history)
        ids = await send(proxy.port, 30)
        assert len(ids) == 30
        await wait_until(lambda: any("Could not set lock" in e["error"]
                                     for e in log_events(proxy, "history_error")), 10)
    finally:
        holder.close()
    try:
        await wait_until(lambda: log_events(proxy, "history_recovered"), 15)
    finally:
        assert await stop(proxy) == 0, proxy.logs()[-3000:]
    assert sorted(ids_in_file(history)) == sorted(ids)


async def test_a_killed_recorder_is_replaced_and_the_channel_kept_what_was_sent(
        mock: ProcessServer, tmp_path: Path) -> None:
    history = tmp_path / "h.duckdb"
    proxy = await launch(mock, tmp_path, history)
    try:
        await wait_until(lambda: recorder_url(history) is not None, 10)
        first = endpoint_doc(history)["pid"]  # type: ignore[index]
        os.kill(first, signal.SIGKILL)
        await wait_until(lambda: log_events(proxy, "recorder_died"), 10)
        # Sent while no recorder runs: the channel holds them for the next one.
        ids = await send(proxy.port, 50)
        assert len(ids) == 50

        await wait_until(lambda: (endpoint_doc(history) or {}).get("pid") not in (None, first), 10)
    finally:
        assert await stop(proxy) == 0, proxy.logs()[-3000:]
    assert sorted(ids_in_file(history)) == sorted(ids)
    assert log_events(proxy, "recorder_died")[0]["signal"] == signal.SIGKILL


async def test_history_off_spawns_no_recorder(mock: ProcessServer, tmp_path: Path) -> None:
    history = tmp_path / "h.duckdb"
    proxy = await launch(mock, tmp_path, history, ZAIPROXY_HISTORY="false")
    try:
        assert len(await send(proxy.port, 5)) == 5
    finally:
        assert await stop(proxy) == 0
    assert not history.exists()
    assert log_events(proxy, "recorder_started") == []
