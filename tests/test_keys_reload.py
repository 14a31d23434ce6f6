"""Client keys with real processes: authentication, per-key limits, reload on SIGHUP.

The supervisor (``python -m zaiproxy serve``) runs with ``ZAIPROXY_KEYS_FILE``
against the real mock upstream (a child process). What a client sees is
checked on the wire (401/403 in each API's shape, per-key 429s), what an
operator sees in the JSON log lines (the alias, never the key), and that
SIGHUP swaps the keys in every worker without closing a connection, while a
broken file is rejected and the old keys stay in force.
"""

from __future__ import annotations

import functools
import os
import secrets
import signal
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import orjson
import pytest
import trio

from tests.harness import (
    REPO,
    UPSTREAM_KEY,
    ProcessServer,
    RawClient,
    Response,
    request,
    start_process,
)

JSON = ("content-type", "application/json")
CHAT = {"model": "glm-4.6", "messages": [{"role": "user", "content": "hi"}]}
MESSAGES = {"model": "glm-4.6", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}
STATE_TIMEOUT = 15.0
POLL_S = 0.05

StartProxy = Callable[..., ProcessServer]


async def wait_until(condition: Callable[[], Awaitable[bool]]) -> None:
    """Poll another process's state until ``condition`` holds, within STATE_TIMEOUT."""
    with trio.fail_after(STATE_TIMEOUT):
        while not await condition():  # noqa: ASYNC110 - no event crosses the process boundary
            await trio.sleep(POLL_S)


def new_key(name: str) -> str:
    return f"zp-test-{name}-{secrets.token_hex(16)}"


def write_keys(path: Path, text: str) -> None:
    """Replace the keys file atomically, as an operator's deploy tool would (temp + rename)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


@pytest.fixture
def start_proxy(mock: ProcessServer, tmp_path: Path) -> Iterator[StartProxy]:
    """Start ``zaiproxy serve`` with a keys file; stopped (and checked to exit 0) after the test."""
    started: list[ProcessServer] = []

    def start(keys_file: Path, workers: int, **extra: str) -> ProcessServer:
        server = start_process(["serve", "--port", "0"], env={**extra,
            "ZAI_API_KEY": UPSTREAM_KEY,
            "ZAIPROXY_OPENAI_BASE_URL": f"{mock.url}/api/paas/v4",
            "ZAIPROXY_ANTHROPIC_BASE_URL": f"{mock.url}/api/anthropic",
            "ZAIPROXY_NATIVE_BASE_URL": mock.url,
            "ZAIPROXY_WORKERS": str(workers),
            "ZAIPROXY_KEYS_FILE": str(keys_file),
            "ZAIPROXY_ACCESS_LOG": "true",
            "ZAIPROXY_ADAPTIVE_RATE": "false",
            "ZAIPROXY_DRAIN_TIMEOUT": "5",
        }, stderr_path=tmp_path / f"proxy-{len(started)}.log")
        started.append(server)
        return server

    yield start
    codes = [server.stop() for server in started]
    assert codes == [0] * len(started), [s.logs()[-2000:] for s in started]


async def launch(start: StartProxy, keys_file: Path, workers: int) -> ProcessServer:
    # start_process blocks until the "listening on" line: keep it off the trio loop.
    return await trio.to_thread.run_sync(functools.partial(start, keys_file, workers))


def auth(key: str | None, how: str = "bearer") -> list[tuple[str, str]]:
    if key is None:
        return []
    if how == "bearer":
        return [("authorization", f"Bearer {key}")]
    return [("x-api-key", key)]


async def chat(port: int, key: str | None, how: str = "bearer", model: str = "glm-4.6",
               client: RawClient | None = None) -> Response:
    """A chat completion on a new connection, or on ``client`` (keep-alive)."""
    headers = [JSON, *auth(key, how)]
    body = orjson.dumps({**CHAT, "model": model})
    with trio.fail_after(STATE_TIMEOUT):
        if client is not None:
            return await client.request("POST", "/v1/chat/completions", headers, body)
        return await request(port, "POST", "/v1/chat/completions", headers, body)


async def messages(port: int, key: str | None, how: str = "x-api-key",
                   model: str = "glm-4.6") -> Response:
    with trio.fail_after(STATE_TIMEOUT):
        return await request(port, "POST", "/v1/messages", [JSON, *auth(key, how)],
                             orjson.dumps({**MESSAGES, "model": model}))


def log_lines(proxy: ProcessServer) -> list[dict[str, object]]:
    lines = []
    for line in proxy.logs().splitlines():
        if line.startswith("{"):
            lines.append(orjson.loads(line))
    return lines


async def wait_for_log(proxy: ProcessServer, event: str, count: int) -> list[dict[str, object]]:
    """Poll the log (a writer thread batches it) until ``count`` lines of ``event`` are in."""
    def found() -> list[dict[str, object]]:
        return [e for e in log_lines(proxy) if e["event"] == event]

    async def logged() -> bool:
        return len(found()) >= count

    await wait_until(logged)
    return found()


def assert_openai_error(resp: Response, status: int, code: str, text: str) -> None:
    assert resp.status == status, resp.body
    error = resp.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["code"] == code
    assert text in error["message"]


def assert_anthropic_error(resp: Response, status: int, type_: str, text: str) -> None:
    assert resp.status == status, resp.body
    body = resp.json()
    assert body["type"] == "error"
    assert body["error"]["type"] == type_
    assert text in body["error"]["message"]


# ---- authentication -----------------------------------------------------------------------

async def test_keys_authenticate_in_each_api_shape_and_only_aliases_are_logged(
        start_proxy: StartProxy, mock: ProcessServer, tmp_path: Path) -> None:
    alice, bob, wrong = new_key("alice"), new_key("bob"), new_key("wrong")
    keys_file = tmp_path / "keys.toml"
    write_keys(keys_file, f"""
[[keys]]
alias = "alice"
key = "{alice}"
models = ["glm-4.6"]
[keys.limits]
requests_per_minute = 1000

[[keys]]
alias = "bob"
key = "{bob}"
enabled = false
""")
    proxy = await launch(start_proxy, keys_file, 1)
    port = proxy.port

    assert_openai_error(await chat(port, None), 401, "invalid_api_key", "missing client key")
    assert_anthropic_error(await messages(port, None), 401, "authentication_error",
                           "missing client key")
    assert_openai_error(await chat(port, wrong), 401, "invalid_api_key", "invalid client key")
    assert_anthropic_error(await messages(port, wrong), 401, "authentication_error",
                           "invalid client key")

    ok = await chat(port, alice, "bearer")
    assert ok.status == 200, ok.body
    assert ok.json()["object"] == "chat.completion"
    assert (await chat(port, alice, "x-api-key")).status == 200
    ok = await messages(port, alice, "x-api-key")
    assert ok.status == 200, ok.body
    assert ok.json()["type"] == "message"

    assert_openai_error(await chat(port, bob), 401, "invalid_api_key", "'bob' is disabled")
    assert_anthropic_error(await messages(port, bob), 401, "authentication_error", "disabled")
    assert_openai_error(await chat(port, alice, model="glm-4.5"), 403, "model_not_allowed",
                        "'alice' may not use model 'glm-4.5'")
    assert_anthropic_error(await messages(port, alice, model="glm-4.5"), 403,
                           "permission_error", "may not use model")

    sent = 11
    access = await wait_for_log(proxy, "request", sent)
    assert len(access) == sent
    assert sorted(e["status"] for e in access) == [200] * 3 + [401] * 6 + [403] * 2
    # The alias is on the line of every request of a known key (a disabled key's 401 and a
    # forbidden model's 403 too: /admin/keys counts them for it); a missing or unknown key
    # is attributed to nobody.
    assert [e.get("key") for e in access if e["status"] == 200] == ["alice"] * 3
    assert sorted(e.get("key") or "-" for e in access if e["status"] == 401) == (
        ["-"] * 4 + ["bob"] * 2)
    assert [e.get("key") for e in access if e["status"] == 403] == ["alice"] * 2
    logs = proxy.logs() + mock.logs()
    for secret in (alice, bob, wrong):
        assert secret not in logs
        assert secret.encode().hex() not in logs


# ---- reload ------------------------------------------------------------------------------

async def test_sighup_reloads_keys_in_every_worker_without_dropping_connections(
        start_proxy: StartProxy, tmp_path: Path) -> None:
    a, b = new_key("a"), new_key("b")
    keys_file = tmp_path / "keys.toml"
    write_keys(keys_file, f'[[keys]]\nalias = "alice"\nkey = "{a}"\n')
    proxy = await launch(start_proxy, keys_file, 2)
    port = proxy.port

    old = await RawClient.connect("127.0.0.1", port)
    try:
        assert (await chat(port, a, client=old)).status == 200

        write_keys(keys_file, f'[[keys]]\nalias = "bob"\nkey = "{b}"\n'
                              f'[[keys]]\nalias = "carol"\nkey = "{new_key("c")}"\n')
        proxy.proc.send_signal(signal.SIGHUP)
        # Both workers have swapped tables (each logs it once the new one is in force).
        reloaded = await wait_for_log(proxy, "keys_reloaded", 2)
        assert sorted(e["proc"] for e in reloaded) == ["worker-0", "worker-1"]
        assert all(e["keys"] == 2 for e in reloaded)
        for _ in range(8):  # new connections, spread over both workers
            assert (await chat(port, a)).status == 401
            assert (await chat(port, b)).status == 200

        # The keep-alive connection opened before the reload is still the same one, and
        # now follows the new keys.
        assert (await chat(port, b, client=old)).status == 200
        assert (await chat(port, a, client=old)).status == 401

        # A broken file is refused by the supervisor; the workers keep the keys they have.
        write_keys(keys_file, f'[[keys]]\nalias = "bob"\nkey = "{b}"\n[[keys\n')
        proxy.proc.send_signal(signal.SIGHUP)
        rejected = await wait_for_log(proxy, "keys_reload_rejected", 1)
        assert rejected[0]["proc"] == "supervisor"
        assert "invalid TOML" in str(rejected[0]["problems"])
        assert (await chat(port, b, client=old)).status == 200
        assert (await chat(port, b)).status == 200

        # So is valid TOML with a bad entry (a limit that does not exist).
        write_keys(keys_file, f'[[keys]]\nalias = "bob"\nkey = "{b}"\n'
                              '[keys.limits]\nrequests_per_fortnight = 3\n')
        proxy.proc.send_signal(signal.SIGHUP)
        rejected = await wait_for_log(proxy, "keys_reload_rejected", 2)
        assert "requests_per_fortnight" in str(rejected[1]["problems"])
        assert (await chat(port, b, client=old)).status == 200
        assert (await chat(port, a)).status == 401
    finally:
        await old.aclose()

    assert len([e for e in log_lines(proxy) if e["event"] == "keys_reloaded"]) == 2
    logs = proxy.logs()
    assert a not in logs and b not in logs


# ---- per-key limits ----------------------------------------------------------------------

async def test_a_key_limit_binds_only_that_key(start_proxy: StartProxy, tmp_path: Path) -> None:
    a, b = new_key("a"), new_key("b")
    keys_file = tmp_path / "keys.toml"
    write_keys(keys_file, f"""
[[keys]]
alias = "alice"
key = "{a}"
[keys.limits]
requests_per_minute = 2

[[keys]]
alias = "bob"
key = "{b}"
""")
    proxy = await launch(start_proxy, keys_file, 2)
    port = proxy.port
    # New connections: the requests spread over both workers, the key's row is shared.
    assert (await chat(port, a)).status == 200
    assert (await chat(port, a)).status == 200
    refused = await chat(port, a)
    assert refused.status == 429, refused.body
    assert refused.header(b"x-zaiproxy-limit") == b"key:requests_per_minute"
    assert refused.json()["error"]["code"] == "proxy_rate_limit"
    assert int(refused.header(b"retry-after") or b"0") >= 1
    for _ in range(5):
        assert (await chat(port, b)).status == 200
    assert (await chat(port, a)).status == 429


async def health_pid(port: int) -> int:
    with trio.fail_after(STATE_TIMEOUT):
        resp = await request(port, "GET", "/health")
    assert resp.status == 200
    return int(resp.json()["pid"])


async def test_a_worker_restarted_after_a_rejected_reload_serves_the_keys_in_force(
        start_proxy: StartProxy, tmp_path: Path) -> None:
    # The supervisor said "rejected, the old keys stay in force": that must also hold for a
    # worker that starts later (a crash, an OOM kill), not only for the ones already running.
    a = new_key("a")
    keys_file = tmp_path / "keys.toml"
    write_keys(keys_file, f'[[keys]]\nalias = "alice"\nkey = "{a}"\n')
    proxy = await launch(start_proxy, keys_file, 1)
    port = proxy.port
    assert (await chat(port, a)).status == 200

    write_keys(keys_file, "[[keys\n")
    proxy.proc.send_signal(signal.SIGHUP)
    await wait_for_log(proxy, "keys_reload_rejected", 1)

    victim = await health_pid(port)
    os.kill(victim, signal.SIGKILL)
    async def replaced() -> bool:
        return await health_pid(port) != victim

    await wait_until(replaced)
    assert (await chat(port, a)).status == 200


def test_a_broken_keys_file_stops_start_up_with_the_problems_and_no_key(tmp_path: Path) -> None:
    secret = new_key("a")
    keys_file = tmp_path / "keys.toml"
    write_keys(keys_file, f'[[keys]]\nalias = "bad alias"\nkey = "{secret}"\n')
    # The same environment start_process gives a server: only the implementation switches.
    env = {k: v for k, v in os.environ.items()
           if (not k.startswith("ZAIPROXY_") or k in ("ZAIPROXY_LEDGER", "ZAIPROXY_HTTP_IMPL"))
           and k not in ("PORT", "HOST")}
    env.update(ZAI_API_KEY=UPSTREAM_KEY, ZAIPROXY_KEYS_FILE=str(keys_file), ZAIPROXY_WORKERS="1")
    out = subprocess.run([sys.executable, "-m", "zaiproxy", "serve", "--port", "0"], env=env,
                         capture_output=True, text=True, timeout=30, cwd=REPO)
    assert out.returncode == 1
    assert "invalid keys file" in out.stderr
    assert "keys[0].alias: must be 1-64 characters" in out.stderr
    assert "listening on" not in out.stdout
    assert secret not in out.stderr + out.stdout


async def test_key_token_limits_without_token_counting_are_reported(
        start_proxy: StartProxy, tmp_path: Path) -> None:
    keys = tmp_path / "keys.toml"
    write_keys(keys, f"""
[[keys]]
alias = "tok"
key = "{new_key('tok')}"
[keys.limits]
tokens_per_minute = 1000

[[keys]]
alias = "req"
key = "{new_key('req')}"
[keys.limits]
requests_per_minute = 5
""")
    proxy = await trio.to_thread.run_sync(
        functools.partial(start_proxy, keys, 1, TOKEN_COUNTING_ENABLED="false"))
    [warning] = await wait_for_log(proxy, "key_token_limits_not_enforced", 1)
    assert warning["keys"] == ["tok"]
