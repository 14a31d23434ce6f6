"""Fleet-wide limits through Redis: several real proxies (each a supervisor with its worker
processes) sharing one real ``redis-server``, against the real mock upstream.

The counts are exact for the same reasons as in ``test_limits_procs.py`` (whose helpers these
tests use): every connection is opened first and every request sent at once, GCRA admits its
burst and then one more per ``period / limit``, a 5-hour window cannot refill, and the mock's
``peak_in_flight`` is what the whole fleet let through at once.
"""

from __future__ import annotations

import functools
import math
import os
import signal
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
import trio

from tests.harness import UPSTREAM_KEY, ProcessServer, RawClient, request, start_process
from tests.redis_server import RedisServer
from tests.test_limits_procs import (
    CHAT,
    CLIENTS,
    JSON,
    LIMIT,
    REQUEST_LIMITS,
    assert_proxy_429,
    burst,
    close_clients,
    mock_stats,
    open_clients,
    open_stream,
    reset_mock,
    wait_until,
)

# Limits in Redis do not depend on the HTTP parser: `make test`'s second run (h11-mypyc,
# every HTTP test again) skips these real-process minutes.
pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    os.environ.get("ZAIPROXY_HTTP_IMPL") == "h11-mypyc",
    reason="the fleet backend is independent of the HTTP implementation: run once, with h11")]


class Fleet:
    """Proxies started with the fleet backend on one Redis and one key prefix."""

    def __init__(self, mock: ProcessServer, redis: RedisServer, tmp_path: Path) -> None:
        self.mock = mock
        self.redis = redis
        self.tmp_path = tmp_path
        self.prefix = "t" + uuid.uuid4().hex[:12]
        self.started: list[ProcessServer] = []

    def env(self, workers: int, **extra: str) -> dict[str, str]:
        return {
            "ZAI_API_KEY": UPSTREAM_KEY,
            "ZAIPROXY_OPENAI_BASE_URL": f"{self.mock.url}/api/paas/v4",
            "ZAIPROXY_ANTHROPIC_BASE_URL": f"{self.mock.url}/api/anthropic",
            "ZAIPROXY_NATIVE_BASE_URL": self.mock.url,
            "ZAIPROXY_WORKERS": str(workers),
            "ZAIPROXY_ADAPTIVE_RATE": "false",
            "ZAIPROXY_TOKEN_COUNTING": "false",
            "ZAIPROXY_DRAIN_TIMEOUT": "5",
            "ZAIPROXY_LIMITS_BACKEND": "redis",
            "ZAIPROXY_REDIS_URL": self.redis.url,
            "ZAIPROXY_REDIS_KEY_PREFIX": self.prefix,
            # Exactness tests must not fall back because a loaded 2-core machine answered in
            # 60 ms: the fail-policy tests set their own timeouts.
            "ZAIPROXY_REDIS_COMMAND_TIMEOUT": "2",
            "ZAIPROXY_REDIS_CONNECT_TIMEOUT": "2",
            **extra,
        }

    async def start(self, workers: int = 2, **extra: str) -> ProcessServer:
        index = len(self.started)
        server = await trio.to_thread.run_sync(functools.partial(
            start_process, ["serve", "--port", "0"], env=self.env(workers, **extra),
            stderr_path=self.tmp_path / f"proxy-{index}.log"))
        self.started.append(server)
        return server

    def stop_all(self) -> list[int]:
        return [s.stop() for s in self.started]


@pytest.fixture
def fleet(mock: ProcessServer, redis_server: RedisServer, tmp_path: Path) -> Iterator[Fleet]:
    f = Fleet(mock, redis_server, tmp_path)
    yield f
    codes = f.stop_all()
    assert all(c in (0, -signal.SIGKILL) for c in codes), [s.logs()[-2000:] for s in f.started]


def kill_pod(proxy: ProcessServer) -> None:
    """SIGKILL a proxy's supervisor and every worker at once: a pod that dies, no drain."""
    children = subprocess.run(["pgrep", "-P", str(proxy.proc.pid)], capture_output=True,
                              text=True).stdout.split()
    for pid in [proxy.proc.pid, *map(int, children)]:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass
    proxy.proc.wait(10)


async def health(proxy: ProcessServer) -> dict:
    return (await request(proxy.url, "GET", "/health")).json()


# ---- exact across proxies -------------------------------------------------------------------

@REQUEST_LIMITS
async def test_a_request_limit_is_exact_across_two_proxies(
        fleet: Fleet, mock: ProcessServer, setting: str, limit_name: str,
        refill_s: float) -> None:
    a = await fleet.start(2, **{setting: str(LIMIT)})
    b = await fleet.start(2, **{setting: str(LIMIT)})
    await reset_mock(mock)
    clients = (await open_clients(a.port, CLIENTS // 2)) + (await open_clients(b.port,
                                                                              CLIENTS // 2))
    try:
        responses, elapsed = await burst(clients, [])
    finally:
        await close_clients(clients)
    statuses = Counter(r.status for r in responses)
    admitted = statuses[200]
    per_proxy = [Counter(r.status for r in responses[:CLIENTS // 2]),
                 Counter(r.status for r in responses[CLIENTS // 2:])]
    refill = 0 if math.isinf(refill_s) else math.floor(elapsed / refill_s)
    print(f"\n{limit_name}: E={elapsed:.3f}s admitted={admitted} per proxy="
          f"{[c[200] for c in per_proxy]}")
    assert statuses[200] + statuses[429] == CLIENTS, statuses
    # One budget: each proxy alone got 500 requests, five times the limit (per-pod limits
    # would have admitted 2 x LIMIT); which proxy's requests came first is the scheduler's.
    assert LIMIT <= admitted <= LIMIT + refill, (admitted, elapsed)
    for resp in responses:
        if resp.status == 429:
            assert_proxy_429(resp, limit_name)
    assert (await mock_stats(mock))["requests"] == admitted
    for proxy in (a, b):
        assert (await health(proxy))["limits"]["state"] == "ok"


async def test_concurrency_is_exact_across_two_proxies(fleet: Fleet, mock: ProcessServer) -> None:
    env = {"ZAIPROXY_CONCURRENCY": "8", "ZAIPROXY_QUEUE_TIMEOUT": "30"}
    a = await fleet.start(2, **env)
    b = await fleet.start(2, **env)
    await reset_mock(mock)
    clients = (await open_clients(a.port, 32)) + (await open_clients(b.port, 32))
    try:
        responses, elapsed = await burst(clients, [("x-mock-first-byte-delay", "0.2")])
    finally:
        await close_clients(clients)
    assert [r.status for r in responses] == [200] * 64
    stats = await mock_stats(mock)
    assert stats["requests"] == 64
    # Never more than 8 upstream at once across both proxies (4 workers); exactly 8 reached.
    assert stats["peak_in_flight"] == 8
    assert elapsed >= 64 / 8 * 0.2


async def test_the_5h_window_survives_restarts_of_every_proxy(
        fleet: Fleet, mock: ProcessServer) -> None:
    env = {"ZAIPROXY_REQUESTS_PER_5H": "10"}
    a = await fleet.start(2, **env)
    b = await fleet.start(2, **env)
    for proxy in (a, a, a, b, b, b):
        assert (await request(proxy.port, "POST", "/v1/chat/completions", [JSON], CHAT)).status \
            == 200
    assert fleet.stop_all() == [0, 0]
    fleet.started.clear()
    a = await fleet.start(2, **env)
    b = await fleet.start(2, **env)
    report = (await request(b.port, "GET", "/admin/keys")).json()
    assert report["scope"] == "fleet"
    window = report["global"]["requests_per_5h"]
    assert (window["used"], window["remaining"]) == (6, 4)
    statuses = Counter()
    for i in range(8):
        statuses[(await request((a, b)[i % 2].port, "POST", "/v1/chat/completions", [JSON],
                                CHAT)).status] += 1
    assert statuses == {200: 4, 429: 4}


async def test_a_killed_pods_leases_come_back_within_the_lease_ttl(
        fleet: Fleet, mock: ProcessServer) -> None:
    ttl = 2.0
    env = {"ZAIPROXY_CONCURRENCY": "2", "ZAIPROXY_REDIS_LEASE_TTL": str(ttl)}
    a = await fleet.start(2, **env)
    b = await fleet.start(1, **env)
    streams = [await open_stream(a.port) for _ in range(2)]
    refused = await request(b.port, "POST", "/v1/chat/completions", [JSON], CHAT)
    assert_proxy_429(refused, "global:concurrency")
    # Held for longer than the TTL: the leases are renewed while the requests last.
    await trio.sleep(ttl * 1.5)
    assert (await request(b.port, "POST", "/v1/chat/completions", [JSON], CHAT)).status == 429
    kill_pod(a)
    killed_at = time.monotonic()
    for client, _ in streams:
        await client.aclose()

    async def whole_again() -> bool:
        # Both of A's leases (held by its two workers, each renewing on its own schedule).
        report = (await request(b.port, "GET", "/admin/keys")).json()
        return report["global"]["concurrency"]["in_use"] == 0

    await wait_until(whole_again)
    returned_after = time.monotonic() - killed_at
    print(f"\nleases of the killed pod returned after {returned_after:.2f} s (ttl {ttl} s)")
    assert returned_after <= ttl + 0.5
    # Whole: both slots, not one.
    await reset_mock(mock)
    clients = await open_clients(b.port, 3)
    try:
        responses, _ = await burst(clients, [("x-mock-first-byte-delay", "0.5")])
    finally:
        await close_clients(clients)
    assert Counter(r.status for r in responses) == {200: 2, 429: 1}


# ---- the adaptive rate: one for the fleet --------------------------------------------------

async def test_one_pods_throttles_cap_every_pod_and_a_reset_anywhere_frees_all(
        fleet: Fleet) -> None:
    env = {"ZAIPROXY_ADAPTIVE_RATE": "true", "ZAIPROXY_ADAPTIVE_MAX_RPS": "50",
           "MAX_RETRIES": "0"}
    a = await fleet.start(2, **env)
    b = await fleet.start(2, **env)
    assert (await health(b))["adaptive_rate_rps"] is None
    throttled = [JSON, ("x-mock-zai-code", "1303")]

    async def b_capped() -> bool:
        # Only A ever sees Z.AI's 429s; B learns the fleet's rate from Redis.
        resp = await request(a.port, "POST", "/v1/chat/completions", throttled, CHAT)
        assert resp.status == 429
        return (await health(b))["adaptive_rate_rps"] is not None

    await wait_until(b_capped)
    rate_b = (await health(b))["adaptive_rate_rps"]
    assert rate_b < 50
    assert (await health(b))["adaptive_reason"] == "frequency"

    # B admits against the fleet's GCRA: after a pause that lets the bucket refill, a burst
    # far above the learned rate passes in part and is refused there for the rest.
    await trio.sleep(max(1.0, 2 / rate_b))
    statuses: Counter[int] = Counter()
    refused_by = set()
    for _ in range(40):
        resp = await request(b.port, "POST", "/v1/chat/completions", [JSON], CHAT)
        statuses[resp.status] += 1
        if resp.status == 429:
            refused_by.add(resp.header(b"x-zaiproxy-limit"))
    print(f"\nfleet rate {rate_b} rps: B's burst {dict(statuses)}")
    assert statuses[429] > 0 and statuses[200] > 0, statuses
    assert refused_by == {b"global:adaptive_rate"}

    # The leader (A, started first) goes away: B takes over from the published state.
    assert a.stop() == 0

    async def b_leads() -> bool:
        return "fleet_rate_leader" in b.logs()

    await wait_until(b_leads)
    assert "restored adaptive rate" in b.logs()

    # A reset asked on any pod frees every pod at once.
    assert (await request(b.port, "POST", "/admin/reset-rate-limit")).status == 200

    async def free() -> bool:
        return (await health(b))["adaptive_rate_rps"] is None

    await wait_until(free)


# ---- Redis killed mid-load: each fail policy ---------------------------------------------------

@pytest.mark.parametrize("policy", ["local", "closed", "open"])
async def test_redis_killed_mid_load_and_restarted_under_each_fail_policy(
        mock: ProcessServer, tmp_path: Path, policy: str) -> None:
    redis = RedisServer(tmp_path / "redis")
    keys = tmp_path / "keys.toml"
    keys.write_text('[[keys]]\nalias = "alice"\nkey = "zp-alice-0001"\n[keys.limits]\n'
                    'requests_per_minute = 10\nrequests_per_5h = 1000\n\n'
                    '[[keys]]\nalias = "bob"\nkey = "zp-bob-0002"\n')
    alice = [JSON, ("authorization", "Bearer zp-alice-0001")]
    bob = [JSON, ("authorization", "Bearer zp-bob-0002")]
    fleet = Fleet(mock, redis, tmp_path)
    allowed = {"local": {200}, "closed": {200, 503}, "open": {200}}[policy]
    try:
        proxy = await fleet.start(
            2, ZAIPROXY_KEYS_FILE=str(keys), ZAIPROXY_LIMITS_FAIL=policy,
            ZAIPROXY_LIMITS_LOCAL_SHARE="1/2",
            # Global limits that never refuse: every request (bob's too) goes to Redis.
            ZAIPROXY_REQUESTS_PER_MINUTE="100000", ZAIPROXY_CONCURRENCY="64",
            ZAIPROXY_REDIS_COMMAND_TIMEOUT="0.1", ZAIPROXY_REDIS_CONNECT_TIMEOUT="0.1")
        for _ in range(3):
            assert (await request(proxy.port, "POST", "/v1/chat/completions", alice,
                                  CHAT)).status == 200

        # Load (bob: only the global limits) from four clients; Redis is SIGKILLed under it.
        seen: Counter[int] = Counter()
        slowest = 0.0

        async def load(stop_at: float) -> None:
            nonlocal slowest
            while trio.current_time() < stop_at:
                began = time.monotonic()
                with trio.fail_after(5):  # never a hang
                    resp = await request(proxy.port, "POST", "/v1/chat/completions", bob, CHAT)
                slowest = max(slowest, time.monotonic() - began)
                seen[resp.status] += 1

        async with trio.open_nursery() as nursery:
            stop_at = trio.current_time() + 1.5
            for _ in range(4):
                nursery.start_soon(load, stop_at)
            await trio.sleep(0.4)
            redis.kill()  # SIGKILL, no persistence: everything in it is gone
        print(f"\n{policy}: load {dict(seen)}, slowest {slowest * 1000:.0f} ms")
        assert set(seen) <= allowed and seen[200] > 0, seen
        assert slowest < 1.0
        if policy == "closed":
            assert seen[503] > 0

        # Exact, request by request: alice's key limit (10/min) under each policy.
        statuses: Counter[int] = Counter()
        bodies = []
        for _ in range(12):
            resp = await request(proxy.port, "POST", "/v1/chat/completions", alice, CHAT)
            statuses[resp.status] += 1
            bodies.append(resp)
        state = (await health(proxy))["limits"]
        assert state["backend"] == "redis" and state["state"] == "degraded"
        assert state["switches"] >= 1 and state["fail"] == policy
        assert "limits_redis_unavailable" in (await health(proxy))["warnings"]
        if policy == "local":
            # This host's ledger with every limit halved: alice's 10/min -> 5, both workers.
            assert statuses == {200: 5, 429: 7}
            assert state["local"] >= 12
        elif policy == "closed":
            assert statuses == {503: 12}
            err = bodies[0].json()["error"]
            assert err["code"] == "rate_limiter_unavailable"
            assert "limits_fail" in err["message"]
            assert state["closed"] >= 12
        else:
            assert statuses == {200: 12}
            assert state["open"] >= 12
        metrics = (await request(proxy.port, "GET", "/metrics")).body.decode()
        assert 'zai_proxy_limits_backend_up{variant="production"} 0.0' in metrics
        assert f'zai_proxy_limits_fail_policy_decisions_total{{policy="{policy}"' in metrics

        redis.start()

        async def recovered() -> bool:
            return (await health(proxy))["limits"]["state"] == "ok"

        await wait_until(recovered)

        # Reconciled: the requests admitted without Redis are charged to the fleet, in alice's
        # 5-hour window (Redis lost the 3 from before the kill) and in her minute. Each worker
        # sends its own share once it sees Redis again: waited for on the window, so the next
        # request meets every worker's share.
        async def window_used() -> int:
            report = (await request(proxy.port, "GET", "/admin/keys")).json()
            return int(report["keys"][0]["now"]["requests_per_5h"]["used"])

        async def reconciled(extra: int = 0) -> bool:
            return await window_used() == statuses[200] + extra

        await wait_until(reconciled)
        # After "open" let 12 through, alice's 10 per minute are spent.
        after = await request(proxy.port, "POST", "/v1/chat/completions", alice, CHAT)
        assert after.status == (429 if statuses[200] >= 10 else 200)
        logs = proxy.logs()
        assert logs.count('"limits_redis_unavailable"') == 1
        assert logs.count('"limits_redis_recovered"') == 1
        await wait_until(functools.partial(reconciled, int(after.status == 200)))
    finally:
        codes = fleet.stop_all()
        redis.stop()
    assert codes == [0]


async def test_a_stalled_redis_is_a_timeout_then_a_recovery(mock: ProcessServer,
                                                             tmp_path: Path) -> None:
    """SIGSTOP: connections stay open and nothing answers (a Redis stuck in a fork or swap).
    Each admission waits at most the command timeout's bound and the policy decides it; a
    PING unanswered for a second confirms the outage and the worker switches (no more
    waiting). When Redis answers again, the answers it owed are not mistaken for newer ones."""
    redis = RedisServer(tmp_path / "redis")
    fleet = Fleet(mock, redis, tmp_path)
    try:
        proxy = await fleet.start(1, ZAIPROXY_REQUESTS_PER_5H="1000",
                                  ZAIPROXY_LIMITS_LOCAL_SHARE="1/2",
                                  ZAIPROXY_REDIS_COMMAND_TIMEOUT="0.05")
        assert (await request(proxy.port, "POST", "/v1/chat/completions", [JSON],
                              CHAT)).status == 200
        redis.kill(signal.SIGSTOP)
        stalled_at = time.monotonic()
        waits = []
        while (await health(proxy))["limits"]["state"] == "ok":
            began = time.monotonic()
            resp = await request(proxy.port, "POST", "/v1/chat/completions", [JSON], CHAT)
            waits.append(time.monotonic() - began)
            assert resp.status == 200  # decided by this host's ledger (500 per 5 h)
            assert time.monotonic() - stalled_at < 5
        switched_after = time.monotonic() - stalled_at
        fast = []
        for _ in range(3):
            began = time.monotonic()
            assert (await request(proxy.port, "POST", "/v1/chat/completions", [JSON],
                                  CHAT)).status == 200
            fast.append(time.monotonic() - began)
        print(f"\nstalled: {len(waits)} requests waited {[round(w * 1000) for w in waits]} ms, "
              f"switched after {switched_after:.2f} s, then {[round(f * 1000) for f in fast]} ms")
        # Each wait is bounded by the 0.05 s timeout (plus a loaded machine's slack); the
        # switch comes when the confirming PING got nothing for 0.25 s.
        assert waits and max(waits) < 0.5
        assert switched_after < 3
        assert max(fast) < 0.1
        local = len(waits) + len(fast)
        redis.kill(signal.SIGCONT)

        async def recovered() -> bool:
            return (await health(proxy))["limits"]["state"] == "ok"

        await wait_until(recovered)

        # The fleet's window: 1 before + the requests decided locally after the switch
        # (queued, reconciled) + at most once each call that timed out if Redis ran it when
        # it woke up (an admission and the settles it carried: never resent, never twice).
        async def used() -> int:
            report = (await request(proxy.port, "GET", "/admin/keys")).json()
            return int(report["global"]["requests_per_5h"]["used"])

        async def reconciled() -> bool:
            return await used() >= 1 + len(fast)

        await wait_until(reconciled)
        assert 1 + len(fast) <= await used() <= 1 + local + len(waits)
    finally:
        redis.kill(signal.SIGCONT)
        codes = fleet.stop_all()
        redis.stop()
    assert codes == [0]


# ---- nothing secret in Redis, no Redis password anywhere -------------------------------------

async def test_no_key_or_password_reaches_redis_or_the_logs(mock: ProcessServer,
                                                             tmp_path: Path) -> None:
    password = "redis-pass-" + uuid.uuid4().hex
    redis = RedisServer(tmp_path / "redis", password=password)
    keys = tmp_path / "keys.toml"
    client_keys = ("zp-alice-secret-0001", "zp-bob-secret-0002")
    keys.write_text(
        f'[[keys]]\nalias = "alice"\nkey = "{client_keys[0]}"\n[keys.limits]\n'
        'requests_per_minute = 100\nconcurrency = 4\ntokens_per_5h = 100000\n\n'
        f'[[keys]]\nalias = "bob"\nkey = "{client_keys[1]}"\n')
    fleet = Fleet(mock, redis, tmp_path)
    try:
        # The password from its own variable, the URL without it.
        proxy = await fleet.start(
            2, ZAIPROXY_KEYS_FILE=str(keys), ZAIPROXY_TOKEN_COUNTING="true",
            ZAIPROXY_REQUESTS_PER_5H="1000", ZAIPROXY_UPSTREAM_CONCURRENCY="10",
            ZAIPROXY_ADAPTIVE_RATE="true",
            ZAIPROXY_REDIS_URL=f"redis://127.0.0.1:{redis.port}/0",
            ZAIPROXY_REDIS_PASSWORD=password)
        for key in client_keys * 3:
            resp = await request(proxy.port, "POST", "/v1/chat/completions",
                                 [JSON, ("authorization", f"Bearer {key}")], CHAT)
            assert resp.status == 200, resp.body
        report = (await request(proxy.port, "GET", "/admin/keys")).json()
        alice = report["keys"][0]
        assert alice["usage"]["requests"] == 3 and alice["usage"]["input_tokens"] > 0
        assert alice["now"]["tokens_per_5h"]["used"] > 0
        await trio.sleep(1.5)  # a tick of the fleet's adaptive rate: its keys are written too
        names = redis.cli("--scan").split()
        assert names, "the run wrote nothing to Redis"
        dump = []
        for name in names:
            kind = redis.cli("TYPE", name).strip()
            command = {"string": ["GET"], "hash": ["HGETALL"], "zset": ["ZRANGE", name, "0", "-1",
                                                                          "WITHSCORES"]}[kind]
            dump.append(name + " " + redis.cli(*command, *([name] if len(command) == 1 else [])))
        text = "\n".join(dump)
        for secret in (*client_keys, UPSTREAM_KEY, password):
            assert secret not in text
        assert all(n.startswith("{" + fleet.prefix + "}:") for n in names)
        surfaces = [proxy.logs(), orjson.dumps(await health(proxy)).decode(),
                    (await request(proxy.port, "GET", "/metrics")).body.decode(),
                    orjson.dumps(report).decode()]
        for surface in surfaces:
            assert password not in surface
    finally:
        codes = fleet.stop_all()
        redis.stop()
    assert codes == [0]


async def test_a_unix_socket_url_works(mock: ProcessServer, redis_server: RedisServer,
                                       tmp_path: Path) -> None:
    fleet = Fleet(mock, redis_server, tmp_path)
    try:
        proxy = await fleet.start(1, ZAIPROXY_REDIS_URL=redis_server.unix_url,
                                  ZAIPROXY_REQUESTS_PER_MINUTE="2")
        got = [(await request(proxy.port, "POST", "/v1/chat/completions", [JSON], CHAT)).status
               for _ in range(3)]
        assert got == [200, 200, 429]
        assert (await health(proxy))["limits"]["state"] == "ok"
    finally:
        assert fleet.stop_all() == [0]


_ = RawClient  # the helpers above use it through test_limits_procs
