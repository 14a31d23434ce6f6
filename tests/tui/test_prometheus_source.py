"""``zaiproxy tui --prometheus``: PrometheusSource against a real Prometheus that scrapes two
real proxies (production and canary, child processes in front of the real mock upstream).

One fleet per module: Prometheus (1 s scrapes, TSDB in tmp) scrapes both proxies; every
series is warmed up (one request of each kind, then one scrape: ``rate`` and ``increase``
count from a series' first sample) before the counted traffic, so the snapshot's totals
are exact and its shares are the sent ratios (Prometheus extrapolates every series of a
target by the same factor: they are scraped at the same instants). Production has a keys
file with a key allowed one request per 5 h (its other requests are the proxy's own 429s),
a proxy-wide 5 h quota (a ``zai_proxy_quota_used_ratio`` series) and a concurrency limit,
and polls Z.AI's own quota (the mock's quota endpoint, every second: the
``zai_proxy_quota_*`` gauges); the mock answers 500, Z.AI's 429 (1308, never retried) and
404 when asked by model name.

The canary dies in the last tests (the source test and the app test each kill it if it
is alive): Prometheus marks its target down, and the snapshot and the status line say
DOWN. Sync tests, each with its own asyncio loop (pytest-trio's ``trio_mode`` would take an
``async def`` test).
"""

from __future__ import annotations

import asyncio
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from textual.geometry import Region
from textual.widget import Widget
from textual.widgets import Static

from tests.harness import REPO, UPSTREAM_KEY, ProcessServer, start_process, upstream_env
from tests.test_canary_procs import PROMETHEUS, free_port, poll
from zaiproxy.fleet import promql
from zaiproxy_tui.__main__ import parse_args
from zaiproxy_tui.app import ZaiproxyTui
from zaiproxy_tui.model import CANARY, PRODUCTION, History, Snapshot, total
from zaiproxy_tui.prometheus_source import NotInPrometheus, PrometheusSource
from zaiproxy_tui.source import Connected, NotServed, Unreachable
from zaiproxy_tui.widgets.panels import KeysPanel, LimiterPanel
from zaiproxy_tui.widgets.status import StatusLine

pytestmark = pytest.mark.slow

KEYS = """
[[keys]]
alias = "agent"
key = "zp-agent"

[[keys]]
alias = "tiny"
key = "zp-tiny"
[keys.limits]
requests_per_5h = 1
"""
# (client key, model, the status it gets): the mock answers what the model name asks for.
OK = ("zp-agent", "glm-4.6", 200)  # each upstream answer after 100 ms (send())
FAIL = ("zp-agent", "mock-status-500", 500)
ZAI_429 = ("zp-agent", "mock-zai-1308", 429)  # Z.AI's 5 h quota: relayed, never retried
NOT_FOUND = ("zp-agent", "mock-status-404", 404)
ALLOWED = ("zp-tiny", "glm-4.6", 200)  # the tiny key's one request per 5 h
REFUSED = ("zp-tiny", "glm-4.6", 429)  # past it: the proxy's own 429
Job = tuple[str, str, int]
# Warm-up: every series once (created between two scrapes, mostly: the shares are exact
# then, and off by a request when a scrape falls inside the warm-up).
WARM_UP: dict[str, list[Job]] = {PRODUCTION: [OK, FAIL, ZAI_429, NOT_FOUND, ALLOWED, REFUSED],
                                 CANARY: [OK, FAIL]}
TRAFFIC: dict[str, list[Job]] = {
    PRODUCTION: [OK] * 20 + [FAIL] * 4 + [ZAI_429] * 4 + [REFUSED] * 6 + [NOT_FOUND] * 2,
    CANARY: [OK] * 10 + [FAIL] * 2}
ROUNDS = 4


@dataclass
class Fleet:
    proxies: dict[str, ProcessServer]
    prometheus: str

    def kill_canary(self) -> None:
        """Stop the canary proxy (once); Prometheus' next scrape of it fails."""
        assert self.proxies[CANARY].stop() == 0

    @property
    def canary_alive(self) -> bool:
        return self.proxies[CANARY].proc.poll() is None


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def send(proxies: dict[str, ProcessServer], plan: dict[str, list[Job]]) -> None:
    """The plan's requests, 8 at a time; the tiny key's in order (its first is allowed)."""
    jobs = [(proxies[v].url, job) for v, jobs in plan.items() for job in jobs]

    def one(item: tuple[str, Job]) -> tuple[int, int]:
        url, (key, model, expected) = item
        body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
        headers = {"authorization": f"Bearer {key}", "x-mock-first-byte-delay": "0.1"}
        got = httpx.post(f"{url}/v1/chat/completions", json=body, headers=headers,
                         timeout=10).status_code
        return got, expected

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(one, [j for j in jobs if j[1][0] != "zp-tiny"]))
    answers += [one(j) for j in jobs if j[1][0] == "zp-tiny"]
    assert [got for got, _ in answers] == [expected for _, expected in answers]


def instant(prometheus: str, query: str) -> dict[str, float]:
    doc = httpx.get(f"{prometheus}/api/v1/query", params={"query": query}, timeout=5).json()
    return {r["metric"].get("variant", ""): float(r["value"][1]) for r in doc["data"]["result"]}


def requests_seen(prometheus: str) -> dict[str, float]:
    return instant(prometheus, "sum by (variant) (zai_proxy_requests_total)")


def wait_scrapes(prometheus: str, seconds: float) -> None:
    """Until every target has been scraped ``seconds`` from now: its samples spread the
    traffic over time, as a real fleet's would be (rates need samples on both sides)."""
    after = time.time() + seconds
    poll(f"Prometheus to scrape {seconds:g} s on", lambda: min(instant(
        prometheus, "min(timestamp(up))").values(), default=0) > after)


@pytest.fixture(scope="module")
def fleet(mock: ProcessServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    if not Path(PROMETHEUS).exists():
        pytest.fail("Prometheus is not installed at /usr/bin/prometheus: `make test` installs "
                    "Debian's prometheus package")
    tmp = tmp_path_factory.mktemp("tui-prometheus")
    (tmp / "keys.toml").write_text(KEYS)
    envs = {PRODUCTION: upstream_env(mock, DEPLOYMENT_VARIANT=PRODUCTION,
                                     ZAIPROXY_KEYS_FILE=str(tmp / "keys.toml"),
                                     ZAIPROXY_REQUESTS_PER_5H="1000",
                                     ZAIPROXY_CONCURRENCY="16",
                                     ZAIPROXY_QUOTA_POLL="true",
                                     ZAIPROXY_QUOTA_INTERVAL="1"),
            CANARY: upstream_env(mock, DEPLOYMENT_VARIANT=CANARY)}
    proxies: dict[str, ProcessServer] = {}
    prometheus: subprocess.Popen[bytes] | None = None
    try:
        with ThreadPoolExecutor(2) as pool:
            proxies.update(zip(envs, pool.map(lambda v: start_process(
                ["serve", "--port", "0", "--workers", "1"], env=envs[v],
                stderr_path=tmp / f"{v}.log"), envs), strict=True))
        targets = ", ".join(f'"{p.url.removeprefix("http://")}"' for p in proxies.values())
        config = tmp / "prometheus.yml"
        config.write_text(
            "global: {scrape_interval: 1s, scrape_timeout: 1s, evaluation_interval: 1s}\n"
            "scrape_configs:\n"
            "  - job_name: zaiproxy\n"
            f"    static_configs: [{{targets: [{targets}]}}]\n")
        port = free_port()
        with (tmp / "prometheus.log").open("wb") as log:
            prometheus = subprocess.Popen(
                [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={tmp / 'tsdb'}",
                 f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
                stdout=log, stderr=log, cwd=tmp)
        url = f"http://127.0.0.1:{port}"

        def scraped() -> bool:
            try:
                return instant(url, "sum(up)") == {"": 2.0}
            except (httpx.HTTPError, ValueError, KeyError):
                return False  # not listening yet

        poll("Prometheus to scrape both proxies", scraped)

        def sent(plan: dict[str, list[Job]], what: str) -> None:
            """Send, then wait until Prometheus has every request and two more scrapes."""
            send(proxies, plan)
            for v, jobs in plan.items():
                seen[v] += len(jobs)
            poll(f"Prometheus to see the {what}", lambda: requests_seen(url) == seen)
            wait_scrapes(url, 2)

        seen = {PRODUCTION: 0.0, CANARY: 0.0}
        sent(WARM_UP, "warm-up")
        # The counted traffic in rounds two scrapes apart: ~10 s, two 5 s history steps.
        for i in range(ROUNDS):
            sent({v: jobs[i::ROUNDS] for v, jobs in TRAFFIC.items()}, "traffic")
        yield Fleet(proxies, url)
    finally:
        if prometheus is not None:
            prometheus.send_signal(signal.SIGTERM)
            try:
                prometheus.wait(15)
            except subprocess.TimeoutExpired:
                prometheus.kill()
                prometheus.wait()
        for proxy in proxies.values():
            proxy.stop(timeout=15)


async def first_snapshot(source: PrometheusSource) -> tuple[Connected, Snapshot]:
    events = source.events()
    connected, snap = await anext(events), await anext(events)
    await events.aclose()
    assert isinstance(connected, Connected) and isinstance(snap, Snapshot)
    return connected, snap


async def with_source(url: str, use: Callable[[PrometheusSource], Any]) -> Any:
    source = PrometheusSource(url)
    try:
        return await use(source)
    finally:
        await source.aclose()


def test_snapshot_counts_and_shares_match_the_traffic(fleet: Fleet) -> None:
    connected, snap = run(with_source(fleet.prometheus, first_snapshot))
    assert connected == Connected(2.0, None) and snap.source == "prometheus"
    assert snap.interval == 2.0
    prod, canary = snap.variants[PRODUCTION], snap.variants[CANARY]
    # Totals since the proxies started: the counters Prometheus scraped last, exact.
    assert {k: prod.totals[k] for k in ("requests", "responses_2xx", "responses_5xx",
                                        "responses_429", "responses_4xx", "rejections",
                                        "zai_errors")} == {
        "requests": 42, "responses_2xx": 22, "responses_5xx": 5, "responses_429": 12,
        "responses_4xx": 15, "rejections": 7, "zai_errors": 5}
    assert (canary.totals["requests"], canary.totals["responses_5xx"]) == (14, 3)
    assert prod.breakdown["rejections"] == {"key:requests_per_5h": 7}
    assert prod.breakdown["zai_errors"] == {"1308": 5}
    assert prod.breakdown["zai_error_classes"] == {"quota": 5}
    assert prod.totals["tokens_in"] > 0 and prod.totals["cost_usd"] > 0
    # The counted traffic's shares by kind, from the rates over the live window.
    p = prod.rates
    assert p is not None and p.requests is not None and p.requests > 0
    assert p.t == snap.time and p.seconds == 2.0
    shares = {k: getattr(p, k) / p.requests for k in ("r5xx", "proxy_429", "zai_429",
                                                       "other_4xx", "r2xx")}
    # Prometheus' rate() extrapolates each series over its own first and last samples in the
    # window, so with 36 requests a share can be off by about one request (0.028); the
    # kinds' shares differ by at least two requests, so a kind counted as another fails.
    assert shares == pytest.approx({"r5xx": 4 / 36, "proxy_429": 6 / 36, "zai_429": 4 / 36,
                                    "other_4xx": 2 / 36, "r2xx": 20 / 36}, abs=0.03)
    c = canary.rates
    assert c is not None and c.requests and c.r5xx is not None
    assert c.r5xx / c.requests == pytest.approx(2 / 12, rel=0.1)
    assert c.proxy_429 == 0 and c.zai_429 == 0
    # Latency: every upstream answer waited 100 ms (x-mock-first-byte-delay), only the
    # proxy's own refusals did not: p95 is one of the former, in the (0.1, 0.25] bucket.
    assert p.latency_p50 is not None and p.latency_p95 is not None
    assert p.latency_p99 is not None and p.ttft_p95 is not None
    assert p.latency_p50 <= p.latency_p95 <= p.latency_p99
    assert 0.1 <= p.latency_p95 <= 0.25
    assert p.tokens_in and p.tokens_out and p.cost
    # Gauges and targets.
    assert prod.concurrency_limit == 16 and canary.concurrency_limit == 0
    assert p.concurrency_limit == 16 and prod.in_flight == 0
    assert prod.versions and prod.versions == canary.versions
    if fleet.canary_alive:
        assert (prod.targets, prod.stale_targets, canary.targets) == (1, 0, 1)


def test_history_has_points_that_add_up_to_the_traffic(fleet: Fleet) -> None:
    async def use(source: PrometheusSource) -> History:
        return await source.history("5m", "all")

    history = run(with_source(fleet.prometheus, use))
    assert history.source == "prometheus" and history.range == "5m"
    # 1 s scrapes: 5 s steps (the collector's for 5m), each rate over 6 s.
    assert history.step == 5 and history.end - history.start == 300
    assert "6 s" in history.note
    prod = history.series[PRODUCTION]
    assert len(prod) >= 3 and all(p.seconds == 5 for p in prod)
    assert [p.t for p in prod] == sorted(p.t for p in prod)
    assert all(history.start <= p.t <= history.end for p in prod)
    # Counted traffic (the warm-up is in the series' first samples): 36 and 12.
    assert total(prod, "requests") == pytest.approx(36, rel=0.35)
    assert total(prod, "proxy_429") == pytest.approx(6, rel=0.35)
    assert total(history.series[CANARY], "requests") == pytest.approx(12, rel=0.35)
    assert any(p.latency_p95 for p in prod)


def test_keys_are_not_in_prometheus_but_the_quota_windows_are(fleet: Fleet) -> None:
    async def use(source: PrometheusSource) -> None:
        await source.keys()

    with pytest.raises(NotInPrometheus) as caught:
        run(with_source(fleet.prometheus, use))
    message = str(caught.value)
    assert message.startswith("per-key usage and limits are not in Prometheus")
    # The 5 h window counts the admitted requests of 1000: a few percent.
    assert re.search(r"production requests_per_5h [1-9]\d?%", message), message
    assert "canary" not in message  # no quota configured there


def test_zai_quota_is_the_mocks_own_number_through_prometheus(fleet: Fleet,
                                                              mock: ProcessServer) -> None:
    """Production polls the mock's quota API; Prometheus scrapes the gauges; the source's
    snapshot has Z.AI's 5-hour share as the mock counts it (42 % once the account's window
    is set to 1.68M of its 4M tokens), a fresh sample, and the app's limits panel shows it."""
    answer = httpx.post(f"{mock.url}/mock/quota", headers={"authorization": UPSTREAM_KEY},
                        json={"used": {"five_hour": 1_680_000}}, timeout=5)
    assert answer.status_code == 200, answer.text
    expected = answer.json()["five_hour"]["percentage"] / 100

    async def five_hour(source: PrometheusSource) -> Snapshot:
        deadline = time.monotonic() + 30
        while True:
            _, snap = await first_snapshot(source)
            (entry,) = snap.zai_quota or (None,)
            window = entry.window("five_hour") if entry else None
            if (window and window.used_share == expected) or time.monotonic() > deadline:
                return snap
            await asyncio.sleep(0.5)

    snap = run(with_source(fleet.prometheus, five_hour))
    assert snap.zai_quota is not None
    (entry,) = snap.zai_quota  # production's one key; the canary does not poll
    assert entry.upstream == "default" and not entry.is_stale
    assert [(w.window, w.used_share, w.limit_type) for w in entry.windows] == [
        ("five_hour", expected, "TOKENS_LIMIT"), ("weekly", 0.0, "TOKENS_LIMIT")]
    five = entry.windows[0]
    assert five.reset_in_s is not None and 0 < five.reset_in_s <= 5 * 3600
    assert entry.sample_age_s is not None and entry.sample_age_s < 10
    assert entry.last_outcome == "success" and entry.polls["success"] > 0
    assert entry.pacing is None  # quota_pacing is off

    async def panel() -> str:
        source = PrometheusSource(fleet.prometheus)
        app = ZaiproxyTui(source, url=source.url)
        async with app.run_test(size=(160, 48)) as pilot:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and f"Z.AI {expected:.0%}" not in text(
                    app.query_one(LimiterPanel)):
                await pilot.pause(0.2)
            shown = text(app.query_one(LimiterPanel))
        await source.aclose()
        return " ".join(shown.split())

    shown = run(panel())
    assert "Z.AI quota sampled" in shown and f"Z.AI {expected:.0%}" in shown, shown


def test_the_scrape_interval_comes_from_the_targets_api(fleet: Fleet) -> None:
    async def use(source: PrometheusSource) -> float:
        return await source.scrape_interval()

    assert run(with_source(fleet.prometheus, use)) == 1.0


def test_history_summarises_the_fleet_from_prometheus(fleet: Fleet, capsys: Any) -> None:
    """``zaiproxy history --prometheus``: per variant, the range's counts (increase():
    estimates, extrapolated to the range's ends), the failures by kind as the admin API
    splits them, quantiles and the targets, through the same PromQL as the TUI."""
    import orjson

    from zaiproxy.cli import main

    assert main(["history", "--prometheus", fleet.prometheus, "--range", "5m", "--json"]) == 0
    doc = orjson.loads(capsys.readouterr().out)
    assert doc["source"] == "prometheus" and doc["range"]["seconds"] == 300
    rows = {r["variant"]: r for r in doc["variants"]}
    prod, canary = rows[PRODUCTION], rows[CANARY]
    # Counted traffic 36 and 12 (the warm-up is mostly in the series' first samples).
    assert prod["requests"] == pytest.approx(36, rel=0.35)
    assert canary["requests"] == pytest.approx(12, rel=0.35)
    # Every series of a target is extrapolated by the same factor: the shares hold.
    assert prod["failure_shares"] == pytest.approx(
        {"5xx": 4 / 36, "proxy_429": 6 / 36, "zai_429": 4 / 36, "other_4xx": 2 / 36}, rel=0.25)
    assert canary["failure_shares"]["5xx"] == pytest.approx(2 / 12, rel=0.25)
    assert 100 <= prod["latency_ms_p95"] <= 250  # every upstream answer waited 100 ms
    assert prod["tokens_in"] > 0 and prod["cost_usd"] > 0
    if fleet.canary_alive:
        assert (prod["targets"], canary["targets"]) == (1, 1)
    assert doc["total"]["requests"] == pytest.approx(prod["requests"] + canary["requests"])

    assert main(["history", "--prometheus", fleet.prometheus, "--range", "5m",
                 "--variant", CANARY]) == 0
    printed = capsys.readouterr().out
    assert "source: prometheus" in printed and CANARY in printed
    assert PRODUCTION not in printed  # only the variant asked for
    # Options of a proxy's history make no sense here: refused, not ignored.
    assert main(["history", "--prometheus", fleet.prometheus, "--by", "key"]) == 2
    assert "--prometheus summarises a fleet" in capsys.readouterr().err


def text(widget: Widget) -> str:
    width, height = widget.outer_size
    return "\n".join(s.text for s in widget.render_lines(Region(0, 0, width, height)))


def status_text(app: ZaiproxyTui) -> str:
    return text(app.screen_stack[0].query_one(StatusLine))


def test_the_app_says_prometheus_and_shows_a_dead_canary_down(fleet: Fleet) -> None:
    async def main() -> list[str]:
        source = PrometheusSource(fleet.prometheus)
        app = ZaiproxyTui(source, url=source.url, mode="both")
        seen: list[str] = []
        async with app.run_test(size=(160, 48)) as pilot:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and "via Prometheus" not in status_text(app):
                await pilot.pause(0.2)
            seen.append(status_text(app))
            keys = app.query_one(KeysPanel).query_one(".message", Static)
            while time.monotonic() < deadline and "not in Prometheus" not in text(keys):
                await pilot.pause(0.2)
            seen.append(text(keys))
            if fleet.canary_alive:
                fleet.kill_canary()
            while time.monotonic() < deadline and "canary DOWN" not in status_text(app):
                await pilot.pause(0.2)
            seen.append(status_text(app))
        await source.aclose()
        return seen

    before, keys, after = run(main())
    assert "● connected via Prometheus" in before and "prod+canary" in before, before
    # The keys panel says why it has no rows (and lives on), it does not fail.
    assert "per-key usage and limits are not in Prometheus" in " ".join(keys.split()), keys
    assert "prod DOWN" not in before, before
    assert "canary DOWN" in after and "prod DOWN" not in after, after


def test_a_dead_canary_is_down_in_the_snapshot(fleet: Fleet) -> None:
    if fleet.canary_alive:
        fleet.kill_canary()
    instance = fleet.proxies[CANARY].url.removeprefix("http://")

    async def use(source: PrometheusSource) -> Snapshot:
        deadline = time.monotonic() + 20
        while True:
            _, snap = await first_snapshot(source)
            canary = snap.variants.get(CANARY)
            if (canary is not None and canary.stale_targets) or time.monotonic() > deadline:
                return snap
            await asyncio.sleep(0.5)

    snap = run(with_source(fleet.prometheus, use))
    canary, prod = snap.variants[CANARY], snap.variants[PRODUCTION]
    assert (canary.targets, canary.stale_targets) == (1, 1)
    assert (prod.targets, prod.stale_targets) == (1, 0)
    assert snap.stale_targets == (f"zaiproxy/{instance}",)


# ---- without Prometheus: what the source says when it is not one -----------------------------


def test_an_unreachable_prometheus_is_unreachable() -> None:
    unused_port = free_port()  # bound and closed again: nothing listens there

    async def events(source: PrometheusSource) -> None:
        await anext(source.events())

    async def history(source: PrometheusSource) -> None:
        source.scrape_s = 1.0  # straight to the ~15 range queries at once
        await source.history("5m", "all")

    for use in (events, history):  # one reason, not a group of fifteen
        with pytest.raises(Unreachable, match=f"cannot connect to http://127.0.0.1:{unused_port}"):
            run(with_source(f"http://127.0.0.1:{unused_port}", use))


def test_a_proxy_is_not_a_prometheus(fleet: Fleet) -> None:
    async def use(source: PrometheusSource) -> None:
        await source.history("5m", "all")

    with pytest.raises(NotServed, match=r"/api/v1/query\S* is not served here"):
        run(with_source(fleet.proxies[PRODUCTION].url, use))


def test_the_command_line_takes_one_source() -> None:
    ns = parse_args(["--prometheus", "http://prom:9090", "--variant", "both", "--token", "t"])
    assert (ns.prometheus, ns.variant, ns.token) == ("http://prom:9090", "both", "t")
    both = subprocess.run([sys.executable, "-m", "zaiproxy", "tui", "--url", "http://a",
                           "--prometheus", "http://b"], capture_output=True, text=True,
                          timeout=60, cwd=REPO)
    assert both.returncode == 2
    assert "argument --prometheus: not allowed with argument --url" in both.stderr




@pytest.mark.parametrize(("text", "seconds"), [
    ("15s", 15.0), ("1m30s", 90.0), ("500ms", 0.5), ("1h", 3600.0), ("2d", 172800.0),
    ("", None), ("15", None), ("1m 30s", None), ("s15", None)])
def test_scrape_intervals_read_as_prometheus_writes_them(text: str, seconds: float | None) -> None:
    assert promql.parse_duration(text) == seconds
