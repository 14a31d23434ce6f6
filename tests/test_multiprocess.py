"""The supervisor with real worker processes: spreading, restarts, drain, signals."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest

from tests.harness import UPSTREAM_KEY, ProcessServer, start_process

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def mock(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProcessServer]:
    tmp = tmp_path_factory.mktemp("mp")
    server = start_process(["mock-upstream", "--port", "0", "--api-key", UPSTREAM_KEY,
                            "--workers", "2"], env=None, stderr_path=tmp / "mock.log")
    yield server
    assert server.stop() == 0


def start_proxy(mock: ProcessServer, tmp: Path, *args: str) -> ProcessServer:
    return start_process(["serve", "--port", "0", *args], env={
        "ZAI_API_KEY": UPSTREAM_KEY,
        "ZAIPROXY_OPENAI_BASE_URL": f"{mock.url}/api/paas/v4",
        "ZAIPROXY_ANTHROPIC_BASE_URL": f"{mock.url}/api/anthropic",
        "ZAIPROXY_NATIVE_BASE_URL": mock.url,
    }, stderr_path=tmp / "proxy.log")


STREAM_BODY = orjson.dumps({"model": "glm-4.6", "stream": True,
                            "messages": [{"role": "user", "content": "hi"}]})


@contextlib.contextmanager
def open_stream(url: str, chunks: int, delay: float = 0.05) -> Iterator[httpx.Response]:
    """A streaming chat completion of ``chunks`` events paced ``delay`` apart by the mock."""
    headers = {"content-type": "application/json", "x-mock-chunks": str(chunks),
               "x-mock-chunk-delay": str(delay)}
    with httpx.Client(timeout=30) as client, client.stream(
            "POST", f"{url}/v1/chat/completions", content=STREAM_BODY, headers=headers) as resp:
        yield resp


def health(url: str) -> dict[str, object]:
    # A new connection each time: SO_REUSEPORT hashes each to some worker.
    with httpx.Client(timeout=10) as client:
        resp = client.get(f"{url}/health")
    assert resp.status_code == 200
    body: dict[str, object] = resp.json()
    return body


def chat(url: str, **extra: object) -> httpx.Response:
    body = {"model": "glm-4.6", "messages": [{"role": "user", "content": "hi"}], **extra}
    with httpx.Client(timeout=30) as client:
        return client.post(f"{url}/v1/chat/completions", json=body)


def wait_for(predicate, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.05)


def test_all_workers_serve(mock: ProcessServer, tmp_path: Path) -> None:
    proxy = start_proxy(mock, tmp_path, "--workers", "3")
    try:
        seen: set[object] = set()
        impls: set[object] = set()
        for _ in range(300):
            body = health(proxy.url)
            seen.add(body["pid"])
            impls.add(body["http"])
            if len(seen) == 3:
                break
        assert len(seen) == 3, seen
        # Spawned workers inherit the HTTP implementation chosen for the run.
        assert impls == {os.environ.get("ZAIPROXY_HTTP_IMPL", "h11")}
        ready = httpx.get(f"{proxy.url}/ready")
        assert ready.status_code == 200
    finally:
        assert proxy.stop() == 0


def test_killed_worker_is_replaced_and_requests_keep_succeeding(mock: ProcessServer,
                                                                tmp_path: Path) -> None:
    proxy = start_proxy(mock, tmp_path, "--workers", "2")
    try:
        pids: set[int] = set()
        for _ in range(300):
            pids.add(int(health(proxy.url)["pid"]))  # type: ignore[arg-type]
            if len(pids) == 2:
                break
        assert len(pids) == 2
        victim = min(pids)
        os.kill(victim, signal.SIGKILL)
        # Every request succeeds, before and after the replacement is up: the
        # supervisor keeps the dead worker's socket, so its connections queue.
        for _ in range(40):
            resp = chat(proxy.url)
            assert resp.status_code == 200
        new_pids: set[int] = set()

        def replaced() -> bool:
            new_pids.add(int(health(proxy.url)["pid"]))  # type: ignore[arg-type]
            return len(new_pids - {victim}) == 2

        wait_for(replaced)
        assert victim not in new_pids
        assert '"event":"worker_died"' in proxy.logs()
        assert '"signal":9' in proxy.logs()
    finally:
        assert proxy.stop() == 0


def test_sigterm_lets_a_running_stream_finish_then_exits_0(mock: ProcessServer,
                                                           tmp_path: Path) -> None:
    proxy = start_proxy(mock, tmp_path, "--workers", "2", "--drain-timeout", "20")
    with open_stream(proxy.url, chunks=30) as resp:
        assert resp.status_code == 200
        chunks = resp.iter_bytes()
        received = next(chunks)
        proxy.proc.send_signal(signal.SIGTERM)
        # New connections are refused once the listeners close...
        wait_for(lambda: _refused(proxy.url))
        # ...while the stream in flight runs to its end.
        for chunk in chunks:
            received += chunk
    assert received.endswith(b"data: [DONE]\n\n")
    assert received.count(b"data: ") == 30 + 1 + 1  # deltas, final usage chunk, [DONE]
    assert proxy.proc.wait(30) == 0
    assert '"event":"drained"' in proxy.logs()


def _refused(url: str) -> bool:
    try:
        httpx.get(f"{url}/health", timeout=2)
    except httpx.ConnectError:
        return True
    return False


def test_drain_deadline_cuts_streams_with_an_error_event(mock: ProcessServer,
                                                         tmp_path: Path) -> None:
    proxy = start_proxy(mock, tmp_path, "--workers", "1", "--drain-timeout", "0.5")
    received = b""
    with open_stream(proxy.url, chunks=200) as resp:
        chunks = resp.iter_bytes()
        received = next(chunks)
        proxy.proc.send_signal(signal.SIGTERM)
        with pytest.raises(httpx.RemoteProtocolError):
            for chunk in chunks:
                received += chunk
    assert b"proxy_shutdown" in received
    assert b"[DONE]" not in received
    assert proxy.proc.wait(30) == 0


def test_second_signal_exits_at_once(mock: ProcessServer, tmp_path: Path) -> None:
    proxy = start_proxy(mock, tmp_path, "--workers", "2", "--drain-timeout", "60")
    with open_stream(proxy.url, chunks=2000) as resp:
        chunks = resp.iter_bytes()  # keep a reference: a dropped generator closes the stream
        next(chunks)
        proxy.proc.send_signal(signal.SIGTERM)
        wait_for(lambda: '"event":"drain_started","proc":"supervisor"' in proxy.logs())
        assert proxy.proc.poll() is None  # still draining: the stream holds it open
        started = time.monotonic()
        proxy.proc.send_signal(signal.SIGINT)
        code = proxy.proc.wait(10)
    assert time.monotonic() - started < 5
    assert code == 128 + signal.SIGINT


def test_demo_mode_serves_through_the_mock(tmp_path: Path) -> None:
    proxy = start_process(["serve", "--demo", "--port", "0", "--workers", "1"], env=None,
                          stderr_path=tmp_path / "demo.log")
    try:
        resp = chat(proxy.url)
        assert resp.status_code == 200
        assert resp.json()["object"] == "chat.completion"
        assert "DEMO MODE" in proxy.logs()
        assert f"curl -N {proxy.url}/v1/chat/completions" in proxy.logs()  # the "try it" hint
    finally:
        assert proxy.stop() == 0


def test_serve_without_key_refuses_to_start(tmp_path: Path) -> None:
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "ZAI_API_KEY"}
    out = subprocess.run([sys.executable, "-m", "zaiproxy", "serve", "--port", "0"], env=env,
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 2
    assert "upstream.api_key" in out.stderr and "--demo" in out.stderr


def test_workers_exit_when_the_supervisor_is_killed(mock: ProcessServer, tmp_path: Path) -> None:
    proxy = start_proxy(mock, tmp_path, "--workers", "2")
    pids: set[int] = set()
    for _ in range(300):
        pids.add(int(health(proxy.url)["pid"]))  # type: ignore[arg-type]
        if len(pids) == 2:
            break
    proxy.proc.kill()
    proxy.proc.wait()

    def gone(pid: int) -> bool:
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().split()[2] == "Z"  # exited, awaiting reaping by init
        except FileNotFoundError:
            return True

    # Orphaned workers notice within a second or so, drain and exit: no
    # process keeps serving (or holding the port) without its supervisor.
    wait_for(lambda: all(gone(pid) for pid in pids), timeout=10)
    wait_for(lambda: _refused(proxy.url), timeout=10)
    # ...and the orphans removed the shared-memory segment the supervisor could not.
    assert not os.path.exists(f"/dev/shm/zaiproxy-{proxy.port}")
