"""Client text never reaches the access log, the history or an error body.

Real processes: supervisor, workers, recorder and the mock upstream. A client that pastes
its key into a URL (or a header line the parser refuses) gets its error, and the key is in
none of the proxy's output surfaces afterwards: stderr's JSON lines, every row of the
DuckDB history, the bodies it answered with. One 60 KiB path must not write a 60 KiB line.
"""

from __future__ import annotations

import functools
import signal
from pathlib import Path

import duckdb
import trio

from tests.harness import ProcessServer, request, send_raw, start_process, upstream_env

SECRET = "zp-live-SECRETSECRET0123456789abcdef"


async def test_key_looking_paths_and_header_lines_leave_no_trace(mock: ProcessServer,
                                                                 tmp_path: Path) -> None:
    history = tmp_path / "history.duckdb"
    env = upstream_env(mock, ZAIPROXY_WORKERS="1", ZAIPROXY_HISTORY_PATH=str(history),
                       ZAIPROXY_ADAPTIVE_RATE="false")
    proxy = await trio.to_thread.run_sync(functools.partial(
        start_process, ["serve", "--port", "0"], env=env, stderr_path=tmp_path / "proxy.log"))
    bodies: list[bytes] = []
    try:
        for target in (f"/v1/{SECRET}", f"/v1/chat/completions/{SECRET}",
                       f"/v1/messages/{SECRET}?key={SECRET}", f"/{SECRET}/v1/models",
                       "/v1/" + "a" * 60 * 1024):
            resp = await request(proxy.port, "GET", target)
            assert resp.status == 404
            bodies.append(resp.body)
        resp = await request(proxy.port, "PATCH" + SECRET[:8].upper().replace("-", ""),
                             "/v1/chat/completions")
        assert resp.status == 404 or resp.status == 405
        bodies.append(resp.body)
        # h11 quotes the refused line in its message; the proxy must not repeat it.
        raw = await send_raw(proxy.port, b"GET /health HTTP/1.1\r\nHost: x\r\n"
                             b"Authorization: Bearer " + SECRET.encode() + b"\x00\r\n\r\n")
        assert raw.startswith(b"HTTP/1.1 400 ")
        bodies.append(raw)
        for line in (b"GET /" + SECRET.encode() + b"\x01 HTTP/1.1\r\nHost: x\r\n\r\n",
                     b"GET /health HTTP/1.1\r\nHost: x\r\nX-Key: " + SECRET.encode()
                     + b"\x01\r\n\r\n"):  # the second one refused by the framing guard
            raw = await send_raw(proxy.port, line)
            assert raw.startswith(b"HTTP/1.1 400 ")
            bodies.append(raw)
    finally:
        assert await trio.to_thread.run_sync(proxy.stop, signal.SIGTERM) == 0

    for body in bodies:
        assert SECRET.encode() not in body and b"SECRETSECRET" not in body
    assert b"no route for GET /v1/*" in bodies[0]

    log = proxy.logs()
    request_lines = [line for line in log.splitlines() if '"event":"request"' in line]
    assert len(request_lines) == 9
    assert "SECRETSECRET" not in log
    assert max(len(line) for line in log.splitlines()) < 2048  # the 60 KiB path is not in it

    con = duckdb.connect(str(history), read_only=True)
    try:
        rows = con.execute("SELECT * FROM requests").fetchall()
        errors = sorted(r[0] for r in con.execute(
            "SELECT error FROM requests WHERE status = 404").fetchall())
    finally:
        con.close()
    assert len(rows) == 9
    assert not any("SECRETSECRET" in str(value) for row in rows for value in row)
    assert all(len(str(value)) < 512 for row in rows for value in row)
    assert errors[:2] == ["no route for GET /*/v1/models", "no route for GET /v1/*"]
