"""Z.AI's quota end to end: the poller against the real mock's quota endpoint, pacing on a
virtual clock, and real proxies (one poller per host, one per fleet, the reserve's 429 as the
official SDKs see it).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import openai
import orjson
import pytest
import trio

from tests.harness import UPSTREAM_KEY, ProcessServer, request, start_process
from tests.redis_server import RedisServer
from zaiproxy.core.config import Config
from zaiproxy.core.limitspec import Limits
from zaiproxy.limits import ledger as ledger_mod
from zaiproxy.limits.admission import Admission, Admitter
from zaiproxy.limits.ratecontrol import RateController
from zaiproxy.limits.zai_quota import PaceBoard, QuotaPoller
from zaiproxy.mock.behaviour import MockOptions
from zaiproxy.mock.controls import QuotaShape
from zaiproxy.mock.quota import QuotaBook, QuotaChange, account_id
from zaiproxy.mock.server import serve_mock_tcp
from zaiproxy.run.worker import open_ledger

# The quota and its pacing do not depend on the HTTP parser: run once, with h11.
pytestmark = pytest.mark.skipif(os.environ.get("ZAIPROXY_HTTP_IMPL") == "h11-mypyc",
                                reason="no HTTP parsing under test: run once, with h11")

T0 = 1_800_000_000.0
H = 3600.0
KEY = UPSTREAM_KEY.encode()


# ---- pacing on a virtual clock, against the mock's quota endpoint ------------------------------

@dataclasses.dataclass
class Run:
    used_at_reset: float  # Z.AI's share used when the window reset (exact: the mock's tokens)
    first_closed: float | None  # seconds before the reset the reserve gate first closed
    served: int
    refused_by_gate: int
    cap_before_reset: float | None
    cap_after_reset: float | None
    peak_share: float


async def overload(nursery: trio.Nursery, *, demand_rps: int = 10, start_share: float = 0.2,
                   left_s: float = 4 * H, after_s: float = 1200.0, reserve: float = 0.05,
                   api_down_after: float | None = None) -> Run:
    """A host whose clients want ``demand_rps`` forever (far more than the quota allows),
    through the real poller (HTTP to the mock), the real rate controller, the real admission
    over the ledger; every answer costs ~2,000 tokens of a 30 M-token 5-hour window."""
    now = [T0]  # the wall clock everyone reads (the mock's quota too)
    allowance = 30_000_000
    options = MockOptions(api_key=UPSTREAM_KEY)
    book = QuotaBook(five_hour_allowance=allowance, weekly_allowance=10**12, level="pro",
                     clock=lambda: now[0])
    _, port = await nursery.start(functools.partial(serve_mock_tcp, options, quota=book))
    reset_at = T0 + left_s
    book.change(KEY, QuotaChange(used={"five_hour": int(start_share * allowance)},
                                 reset_at_ms={"five_hour": int(reset_at * 1000)}))
    config = dataclasses.replace(
        Config(api_key=UPSTREAM_KEY, workers=1), native_base_url=f"http://127.0.0.1:{port}",
        quota_poll=True, quota_pacing=True, quota_interval=60.0, quota_reserve=reserve,
        adaptive_rate=False)
    impl = ledger_mod.load(config.ledger)
    segment = open_ledger(impl, config, None)
    poller = QuotaPoller(segment, config, wall=lambda: now[0])
    controller = RateController(segment, config, None, wall=lambda: now[0], quota=poller)
    mono = [0.0]
    admitter = Admitter(segment, impl, worker=0, global_limits=Limits(),
                        upstream_limits=Limits(), upstream_id=b"upstream", adaptive=True,
                        clock=lambda: int(mono[0] * 1e9))
    gate = PaceBoard(segment)
    plan = admitter.plan(None, None)
    rng = random.Random(7)
    served = refused = 0
    first_closed: float | None = None
    cap_before = cap_after = None
    peak = 0.0
    total = int(left_s + after_s)
    for second in range(total):
        if api_down_after is not None and second == api_down_after:
            book.change(KEY, QuotaChange(shape=QuotaShape.HTTP500))  # Z.AI's quota API fails
        if second % 60 == 0:
            outcome = await poller.poll_once()
            assert outcome == ("success" if api_down_after is None or second < api_down_after
                               else "error")
        controller.tick(mono[0])
        view = gate.view(True)
        if now[0] < reset_at:
            cap_before = view.rate_rps
        elif cap_after is None and second % 60 == 1:
            cap_after = view.rate_rps if view.rate_rps is not None else float("inf")
        for i in range(demand_rps):
            mono[0] = second + i / demand_rps
            now[0] = T0 + mono[0]
            until = gate.closed_until_ms()
            if until > now[0] * 1000:
                refused += 1
                if first_closed is None:
                    first_closed = reset_at - now[0]
                continue
            admitted = admitter.admit_now(plan, 0)
            if isinstance(admitted, Admission):
                admitter.settle(admitted, None)
                admitter.note_upstream()
                book.charge(KEY, 2000 + rng.randint(-500, 500))
                served += 1
        mono[0] = second + 1.0
        now[0] = T0 + mono[0]
        if now[0] < reset_at:  # use only grows until the reset: the last value is the peak
            peak = book.accounts()[account_id(KEY)].five_hour.used / allowance
    segment.close()
    return Run(peak, first_closed, served, refused, cap_before, cap_after, peak)


async def test_the_quota_lasts_until_the_reset_under_constant_overload(
        nursery: trio.Nursery) -> None:
    run = await overload(nursery)
    # Unpaced, 10 req/s x 2,000 tokens would spend the 80 % left in 20 minutes.
    # Paced, the reserve (5 %) is kept and the window is spent to within 2 % of it...
    assert 0.93 <= run.used_at_reset <= 0.955, run
    assert run.peak_share <= 0.955, run
    # ... and the gate never had to close more than 5 minutes before the reset.
    assert run.first_closed is None or run.first_closed <= 300, run
    # After the reset the pace relaxes: a fresh window allows far more than the last minute.
    assert run.cap_before_reset is not None and run.cap_after_reset is not None
    assert run.cap_after_reset > 5 * run.cap_before_reset, run


async def test_a_quota_api_that_goes_down_neither_tightens_nor_lets_the_quota_burn(
        nursery: trio.Nursery) -> None:
    run = await overload(nursery, api_down_after=3600.0)
    # Stale after 15 minutes: the last fresh cap is held, nothing is projected on old data
    # (which would have closed the gate), and the quota is not burnt either.
    assert run.refused_by_gate == 0, run
    assert 0.80 <= run.used_at_reset <= 0.955, run
    assert run.cap_before_reset is not None, run


async def test_near_the_reset_the_reserve_is_the_hard_stop(nursery: trio.Nursery) -> None:
    run = await overload(nursery, start_share=0.6, left_s=2 * H)
    assert run.used_at_reset <= 0.955, run
    # The first minute (before a cost is measured) runs unpaced; pacing then holds the rest
    # to the reserve, which closes only in the last minutes.
    assert run.first_closed is None or run.first_closed <= 300, run



# ---- real proxies against the real mock ---------------------------------------------------------

@pytest.fixture(scope="module")
def quota_mock(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProcessServer]:
    """A mock whose 5-hour window is 2,000 tokens: each request moves Z.AI's percentage."""
    server = start_process(["mock-upstream", "--port", "0", "--api-key", UPSTREAM_KEY,
                            "--quota-five-hour", "2000"], env=None,
                           stderr_path=tmp_path_factory.mktemp("qmock") / "mock.log")
    yield server
    assert server.stop() == 0


AUTH = [("authorization", UPSTREAM_KEY)]


async def mock_quota(mock: ProcessServer, **change: Any) -> dict[str, Any]:
    """The mock's quota state (``change``: a ``POST /mock/quota`` for the upstream key)."""
    if change:
        r = await request(mock.url, "POST", "/mock/quota", AUTH, orjson.dumps(change))
        assert r.status == 200, r.body
    doc: dict[str, Any] = (await request(mock.url, "GET", "/mock/quota")).json()
    return doc


def proxy_env(mock: ProcessServer, **extra: str) -> dict[str, str]:
    return {"ZAI_API_KEY": UPSTREAM_KEY,
            "ZAIPROXY_OPENAI_BASE_URL": f"{mock.url}/api/paas/v4",
            "ZAIPROXY_ANTHROPIC_BASE_URL": f"{mock.url}/api/anthropic",
            "ZAIPROXY_NATIVE_BASE_URL": mock.url, "ZAIPROXY_WORKERS": "2",
            "ZAIPROXY_QUOTA_POLL": "true", "ZAIPROXY_QUOTA_INTERVAL": "0.2",
            "ZAIPROXY_TOKEN_COUNTING": "false", "ZAIPROXY_DRAIN_TIMEOUT": "5", **extra}


async def start(env: dict[str, str], log: Path) -> ProcessServer:
    return await trio.to_thread.run_sync(functools.partial(
        start_process, ["serve", "--port", "0"], env=env, stderr_path=log))


async def eventually(check: Any, limit: float = 10.0) -> Any:
    """Await ``check()`` until it returns something truthy (bounded)."""
    with trio.fail_after(limit):
        while not (value := await check()):  # noqa: ASYNC110 (another process: no event)
            await trio.sleep(0.05)
    return value


async def health_quota(proxy: ProcessServer) -> dict[str, Any]:
    doc: dict[str, Any] = (await request(proxy.url, "GET", "/health")).json()["quota"]
    return doc


def metric(text: str, name: str, **labels: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return None


def chat(proxy: ProcessServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{proxy.url}/v1", api_key="client", max_retries=0)


async def test_one_poller_per_host_and_every_report_shows_zais_numbers(
        quota_mock: ProcessServer, tmp_path: Path) -> None:
    await mock_quota(quota_mock, reset=True)
    proxy = await start(proxy_env(quota_mock), tmp_path / "proxy.log")
    try:
        client = chat(proxy)
        for _ in range(3):
            await trio.to_thread.run_sync(lambda: client.chat.completions.create(
                model="glm-4.6", messages=[{"role": "user", "content": "count my quota"}]))
        account = next(iter((await mock_quota(quota_mock))["accounts"].values()))
        pct = account["five_hour"]["percentage"]
        assert 0 < pct < 100, account

        async def shown() -> dict[str, Any] | None:
            q = await health_quota(proxy)
            five = [w for w in q.get("windows", ()) if w["window"] == "five_hour"]
            return q if five and five[0]["used_fraction"] == pct / 100 else None

        q = await eventually(shown)
        assert q["enabled"] and q["fresh"] and q["last_outcome"] == "success"
        assert q["plan_tier"] == "pro" and q["interval"] == "0.2s"
        five = next(w for w in q["windows"] if w["window"] == "five_hour")
        assert five["limit_type"] == "TOKENS_LIMIT" and five["reset_at"].endswith("Z")
        text = (await request(proxy.url, "GET", "/metrics")).body.decode()
        labels = {"window": "five_hour", "limit_type": "tokens_limit", "variant": "production"}
        assert metric(text, "zai_proxy_quota_usage_ratio", **labels) == pct / 100
        assert metric(text, "zai_proxy_quota_remaining_ratio", **labels) == pytest.approx(
            1 - pct / 100)
        assert (metric(text, "zai_proxy_quota_reset_time_seconds", **labels) or 0) > time.time()
        assert (metric(text, "zai_proxy_quota_poll_total", result="success") or 0) >= 1
        assert metric(text, "zai_proxy_quota_sample_age_seconds") is not None
        keys = (await request(proxy.url, "GET", "/admin/keys")).json()
        (entry,) = keys["zai_quota"]
        assert entry["fresh"] and entry["windows"][0]["used_pct"] == pct
        assert UPSTREAM_KEY not in text and UPSTREAM_KEY not in orjson.dumps(keys).decode()
        # One poller for the host, not one per worker: ~5 polls a second, whatever the
        # number of workers (2 here).
        before = (await mock_quota(quota_mock))["polls"]
        await trio.sleep(2.0)
        polls = (await mock_quota(quota_mock))["polls"] - before
        assert 5 <= polls <= 14, polls
    finally:
        assert proxy.stop() == 0, proxy.logs()[-3000:]
    assert UPSTREAM_KEY not in proxy.logs()


async def test_a_failing_quota_api_keeps_the_last_sample_and_says_so(
        quota_mock: ProcessServer, tmp_path: Path) -> None:
    await mock_quota(quota_mock, reset=True, used={"five_hour": 500})
    proxy = await start(proxy_env(quota_mock, ZAIPROXY_QUOTA_STALE_AFTER="1"),
                        tmp_path / "proxy.log")
    try:
        async def at_25() -> bool:
            q = await health_quota(proxy)
            return bool(q.get("windows")) and q["windows"][0]["used_fraction"] == 0.25

        await eventually(at_25)
        await mock_quota(quota_mock, shape="malformed")

        async def stale() -> dict[str, Any] | None:
            q = await health_quota(proxy)
            return q if not q["fresh"] else None

        q = await eventually(stale)
        assert q["last_outcome"] == "malformed" and q["windows"][0]["used_fraction"] == 0.25
        async def counted_stale() -> str | None:  # at the poller's next failure
            text = (await request(proxy.url, "GET", "/metrics")).body.decode()
            return text if metric(text, "zai_proxy_quota_poll_total", result="stale") else None

        text = await eventually(counted_stale)
        assert (metric(text, "zai_proxy_quota_poll_total", result="malformed") or 0) >= 1
        await trio.sleep(0.5)  # more failures: still one transition into staleness
        text = (await request(proxy.url, "GET", "/metrics")).body.decode()
        assert metric(text, "zai_proxy_quota_poll_total", result="stale") == 1
        assert (await request(proxy.url, "GET", "/admin/keys")).json()["zai_quota"][0]["stale"]
    finally:
        await mock_quota(quota_mock, shape="ok")
        assert proxy.stop() == 0, proxy.logs()[-3000:]
    assert '"event":"zai_quota_poll_failed"' in proxy.logs()


async def test_the_reserve_answers_429_in_each_apis_shape_until_the_quota_has_room(
        quota_mock: ProcessServer, tmp_path: Path) -> None:
    reset_at = time.time() + 3000
    await mock_quota(quota_mock, reset=True, used={"five_hour": 1940},
                     reset_at_ms={"five_hour": int(reset_at * 1000)})  # 97 %
    proxy = await start(proxy_env(quota_mock, ZAIPROXY_QUOTA_PACING="true"),
                        tmp_path / "proxy.log")
    try:
        async def closed() -> bool:
            keys = (await request(proxy.url, "GET", "/admin/keys")).json()
            return bool(keys["zai_quota"][0]["pacing"]["reserve_reached"])

        await eventually(closed)
        with pytest.raises(openai.RateLimitError) as refused:
            await trio.to_thread.run_sync(lambda: chat(proxy).chat.completions.create(
                model="glm-4.6", messages=[{"role": "user", "content": "hi"}]))
        err = refused.value
        assert "quota reserve reached" in err.message
        retry_after = int(err.response.headers["retry-after"])
        assert abs(retry_after - (reset_at - time.time())) <= 5
        assert err.response.headers["x-zaiproxy-limit"] == "upstream:zai_quota_five_hour"
        with pytest.raises(anthropic.RateLimitError) as refused_a:
            await trio.to_thread.run_sync(lambda: anthropic.Anthropic(
                base_url=proxy.url, api_key="client", max_retries=0).messages.create(
                model="glm-4.6", max_tokens=16, messages=[{"role": "user", "content": "hi"}]))
        body = refused_a.value.body
        assert isinstance(body, dict) and body["type"] == "error"
        assert "quota reserve reached" in body["error"]["message"]
        text = (await request(proxy.url, "GET", "/metrics")).body.decode()
        assert metric(text, "zai_proxy_quota_gate_open", window="five_hour") == 0.0
        assert (metric(text, "zai_proxy_rate_limit_rejections_total",
                       limit="zai_quota_five_hour") or 0) >= 2
        requests_before = (await request(quota_mock.url, "GET", "/mock/stats")).json()
        # Z.AI's window has room again: the next sample opens the gate.
        await mock_quota(quota_mock, used={"five_hour": 200})

        async def open_again() -> bool:
            keys = (await request(proxy.url, "GET", "/admin/keys")).json()
            return not keys["zai_quota"][0]["pacing"]["reserve_reached"]

        await eventually(open_again)
        answer = await trio.to_thread.run_sync(lambda: chat(proxy).chat.completions.create(
            model="glm-4.6", messages=[{"role": "user", "content": "hi"}]))
        assert answer.choices[0].message.content
        requests_after = (await request(quota_mock.url, "GET", "/mock/stats")).json()
        assert requests_after["requests"] == requests_before["requests"] + 1
    finally:
        assert proxy.stop() == 0, proxy.logs()[-3000:]
    assert '"event":"zai_quota_reserve_reached"' in proxy.logs()


@pytest.mark.slow
async def test_one_poller_for_the_fleet_and_every_pod_paces_on_it(
        quota_mock: ProcessServer, redis_server: RedisServer, tmp_path: Path) -> None:
    reset_at = time.time() + 3000
    await mock_quota(quota_mock, reset=True, used={"five_hour": 600},
                     reset_at_ms={"five_hour": int(reset_at * 1000)})  # 30 %
    prefix = f"q{os.getpid()}x{int(time.time())}"
    env = proxy_env(quota_mock, ZAIPROXY_LIMITS_BACKEND="redis",
                    ZAIPROXY_REDIS_URL=redis_server.url, ZAIPROXY_REDIS_KEY_PREFIX=prefix,
                    ZAIPROXY_REDIS_COMMAND_TIMEOUT="2", ZAIPROXY_REDIS_CONNECT_TIMEOUT="2",
                    ZAIPROXY_QUOTA_PACING="true", ZAIPROXY_ADAPTIVE_RATE="false")
    pods = [await start(env, tmp_path / f"pod{i}.log") for i in range(2)]
    try:
        for pod in pods:
            async def at_30(pod: ProcessServer = pod) -> bool:
                q = await health_quota(pod)
                return bool(q.get("windows")) and q["windows"][0]["used_fraction"] == 0.3

            await eventually(at_30)
        # One poller for the fleet: ~5 polls a second for two pods of two workers.
        before = (await mock_quota(quota_mock))["polls"]
        await trio.sleep(2.0)
        polls = (await mock_quota(quota_mock))["polls"] - before
        assert 5 <= polls <= 14, polls
        # The reserve reached, as the leader sees it, closes every pod's gate.
        await mock_quota(quota_mock, used={"five_hour": 1960})
        for pod in pods:
            async def closed(pod: ProcessServer = pod) -> bool:
                r = await request(pod.url, "POST", "/v1/chat/completions",
                                  [("content-type", "application/json")],
                                  b'{"model":"glm-4.6","messages":[{"role":"user","content":"x"}]}')
                return r.status == 429 and b"quota reserve reached" in r.body

            await eventually(closed)
    finally:
        for pod in pods:
            assert pod.stop() == 0, pod.logs()[-3000:]
