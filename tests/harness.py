"""Test harness: the real proxy worker and the real mock upstream on port 0.

In-process helpers run the proxy's ``Worker`` inside the test's trio loop
(fast, and the test can look at the pool); ``ProcessServer`` starts real
``zaiproxy`` child processes for the multi-process and SDK tests. Readiness
is a value (the printed address, ``nursery.start``), never a sleep.
"""

from __future__ import annotations

import dataclasses
import os
import select
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h11
import trio

from zaiproxy.core.config import Config
from zaiproxy.mock.behaviour import MockOptions
from zaiproxy.mock.server import serve_mock_tcp
from zaiproxy.run.sockets import bind_reuseport, trio_listener
from zaiproxy.run.worker import Worker, build_context

UPSTREAM_KEY = "upstream-secret-key-0123456789"
REPO = Path(__file__).resolve().parent.parent


def make_config(upstream: str, **overrides: Any) -> Config:
    """A config pointing every upstream base at ``upstream`` (the mock's origin)."""
    base = Config(
        openai_base_url=f"{upstream}/api/paas/v4",
        anthropic_base_url=f"{upstream}/api/anthropic",
        native_base_url=upstream,
        api_key=UPSTREAM_KEY,
        workers=1,
        access_log=True,
        ledger=os.environ.get("ZAIPROXY_LEDGER", "native"),
        http_impl=os.environ.get("ZAIPROXY_HTTP_IMPL", "h11"),
    )
    return dataclasses.replace(base, **overrides)


@dataclass
class InProcessProxy:
    host: str
    port: int
    worker: Worker
    # Z.AI retry waits asked for, in order (the virtual clock: no real sleeping).
    waits: list[float] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def pool(self) -> Any:
        return self.worker.ctx.pool


async def start_mock(nursery: trio.Nursery, options: MockOptions | None = None,
                     ssl_context: Any = None) -> str:
    opts = options or MockOptions(api_key=UPSTREAM_KEY)
    host, port = await nursery.start(serve_mock_tcp, opts, "127.0.0.1", 0, ssl_context)
    scheme = "https" if ssl_context is not None else "http"
    return f"{scheme}://{host}:{port}"


async def start_proxy(nursery: trio.Nursery, config: Config, *,
                      real_sleep: bool = False) -> InProcessProxy:
    """An in-process worker. Z.AI retry waits are recorded in ``.waits`` and skipped
    (no jitter) unless ``real_sleep``."""
    ctx = build_context(config)
    sock = bind_reuseport("127.0.0.1", 0, 1)[0]
    host, port = sock.getsockname()[:2]
    worker = Worker(ctx, [trio_listener(sock)])
    proxy = InProcessProxy(host, port, worker)
    if not real_sleep:
        async def virtual_sleep(seconds: float) -> None:
            proxy.waits.append(seconds)
            await trio.lowlevel.checkpoint()

        ctx.retry_sleep = virtual_sleep
        ctx.jitter = lambda: 1.0
    await nursery.start(ctx.admitter.run)
    await nursery.start(worker.run)
    return proxy


@dataclass
class Response:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes
    chunks: list[bytes] = field(default_factory=list)  # body as the reads delivered it
    complete: bool = True  # False when the connection closed before the body ended

    def header(self, name: bytes) -> bytes | None:
        for n, v in self.headers:
            if n == name:
                return v
        return None

    def json(self) -> Any:
        import orjson

        return orjson.loads(self.body)


class RawClient:
    """A minimal h11 client over one trio connection (keep-alive aware)."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.conn = h11.Connection(h11.CLIENT)

    @classmethod
    async def connect(cls, host: str, port: int) -> RawClient:
        return cls(await trio.open_tcp_stream(host, port))

    async def request(self, method: str, target: str, headers: list[tuple[str, str]] | None = None,
                      body: bytes = b"") -> Response:
        hdrs = [("host", "proxy.test"), *(headers or [])]
        if body or method == "POST":
            hdrs.append(("content-length", str(len(body))))
        data = self.conn.send(h11.Request(method=method, target=target, headers=hdrs))
        if body:
            data += self.conn.send(h11.Data(data=body))
        data += self.conn.send(h11.EndOfMessage())
        await self.stream.send_all(data)
        return await self.read_response()

    async def read_response(self) -> Response:
        status = 0
        headers: list[tuple[bytes, bytes]] = []
        chunks: list[bytes] = []
        while True:
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                try:
                    data = await self.stream.receive_some(65536)
                except trio.BrokenResourceError:
                    data = b""
                try:
                    self.conn.receive_data(data)
                except h11.RemoteProtocolError:
                    return Response(status, headers, b"".join(chunks), chunks, complete=False)
                if not data and status:
                    try:
                        event = self.conn.next_event()
                    except h11.RemoteProtocolError:
                        return Response(status, headers, b"".join(chunks), chunks, complete=False)
                    if type(event) is h11.Data:
                        chunks.append(event.data)
                        continue
                    if type(event) is h11.EndOfMessage:
                        break
                    return Response(status, headers, b"".join(chunks), chunks, complete=False)
                continue
            if type(event) is h11.Response:
                status = event.status_code
                headers = list(event.headers)
            elif type(event) is h11.Data:
                chunks.append(event.data)
            elif type(event) is h11.EndOfMessage:
                break
            elif type(event) is h11.ConnectionClosed:
                return Response(status, headers, b"".join(chunks), chunks, complete=False)
        if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
            self.conn.start_next_cycle()
        return Response(status, headers, b"".join(chunks), chunks)

    async def aclose(self) -> None:
        await self.stream.aclose()


async def request(url_or_port: Any, method: str, target: str,
                  headers: list[tuple[str, str]] | None = None, body: bytes = b"") -> Response:
    port = url_or_port if isinstance(url_or_port, int) else int(str(url_or_port).rsplit(":", 1)[1])
    client = await RawClient.connect("127.0.0.1", port)
    try:
        return await client.request(method, target, headers, body)
    finally:
        await client.aclose()


async def send_raw(port: int, data: bytes, *, read_timeout: float = 5.0) -> bytes:
    """Send raw bytes, read until the server closes (or the timeout), return all bytes."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    out = bytearray()
    try:
        await stream.send_all(data)
        with trio.move_on_after(read_timeout):
            while True:
                try:
                    chunk = await stream.receive_some(65536)
                except trio.BrokenResourceError:
                    break
                if not chunk:
                    break
                out += chunk
    finally:
        await stream.aclose()
    return bytes(out)


# ---- real child processes ---------------------------------------------------------


@dataclass
class ProcessServer:
    proc: subprocess.Popen[bytes]
    url: str
    stderr_path: Path

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def logs(self) -> str:
        return self.stderr_path.read_text(errors="replace")


def upstream_env(mock: ProcessServer, **extra: str) -> dict[str, str]:
    """The environment of a proxy child process whose upstream is ``mock``."""
    return {"ZAI_API_KEY": UPSTREAM_KEY,
            "ZAIPROXY_OPENAI_BASE_URL": f"{mock.url}/api/paas/v4",
            "ZAIPROXY_ANTHROPIC_BASE_URL": f"{mock.url}/api/anthropic",
            "ZAIPROXY_NATIVE_BASE_URL": mock.url, **extra}


def start_process(args: list[str], *, env: dict[str, str] | None, stderr_path: Path,
                  timeout: float = 30) -> ProcessServer:
    """Run ``python -m zaiproxy ARGS`` and wait for its 'listening on URL' line."""
    # The implementation switches under test are inherited; nothing else is.
    keep = ("ZAIPROXY_HTTP_IMPL", "ZAIPROXY_LEDGER")
    full_env = {k: v for k, v in os.environ.items()
                if (not k.startswith("ZAIPROXY_") or k in keep)
                and k not in ("ZAI_API_KEY", "PORT", "HOST")}
    # The history file next to the log, never in the repository (the default is ./).
    full_env["ZAIPROXY_HISTORY_PATH"] = str(stderr_path.with_suffix(".history.duckdb"))
    full_env.update(env or {})
    stderr = stderr_path.open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "zaiproxy", *args], stdout=subprocess.PIPE,
                            stderr=stderr, env=full_env, cwd=REPO)
    stderr.close()
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    line = b""
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            break
        line = proc.stdout.readline()
        if b"listening on" in line or not line:
            break
    if b"listening on" not in line:
        proc.kill()
        proc.wait()
        raise RuntimeError(f"{args[0]} did not start: {line!r}\n{stderr_path.read_text()}")
    url = line.decode().split("listening on ", 1)[1].split()[0]
    return ProcessServer(proc, url, stderr_path)


async def wait_until(predicate: Any, limit: float = 5.0, step: float = 0.005) -> None:
    """Bounded polling of state that offers no event to wait on (another process, the
    ledger, a queue in the server); fails the test after ``limit`` seconds."""
    with trio.fail_after(limit):
        while not predicate():  # noqa: ASYNC110
            await trio.sleep(step)
