"""What failed for the clients, by kind, in ``/admin/status`` (and so in the collector and the
TUI, which read the same snapshot): one definition (``snapshot.failures``) of 5xx, the proxy's
own 429s, Z.AI's 429s and other 4xx; and one meaning of "Z.AI errors" and "retries" on a
proxy, in its history and from a collector."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
import trio

from tests.harness import make_config, request, start_mock, start_proxy

JSON = ("content-type", "application/json")
CHAT = orjson.dumps({"model": "glm-4.6", "messages": [{"role": "user", "content": "hi"}]})


@pytest.fixture
async def upstream(nursery):
    return await start_mock(nursery)


async def test_admin_status_splits_failures_by_kind(nursery, upstream):
    proxy = await start_proxy(nursery, make_config(upstream, requests_per_minute=3,
                                                   max_retries=0, adaptive_rate=False))
    statuses = []
    for _ in range(5):  # 3 admitted, then 2 refused by the proxy
        statuses.append((await request(proxy.port, "POST", "/v1/chat/completions", [JSON],
                                       CHAT)).status)
    assert statuses == [200, 200, 200, 429, 429]
    bad = await request(proxy.port, "POST", "/v1/chat/completions", [JSON], b"{not json")
    assert bad.status == 400
    status = (await request(proxy.port, "GET", "/admin/status")).json()
    production = status["variants"]["production"]
    assert production["failures"] == {"5xx": 0.0, "proxy_429": 2.0, "zai_429": 0.0,
                                      "other_4xx": 1.0}
    assert production["failure_shares"]["proxy_429"] == pytest.approx(2 / 6)


async def test_a_relayed_zai_429_is_not_a_proxy_refusal(nursery, upstream):
    proxy = await start_proxy(nursery, make_config(upstream, max_retries=0, adaptive_rate=False))
    resp = await request(proxy.port, "POST", "/v1/chat/completions",
                         [JSON, ("x-mock-zai-code", "1303")], CHAT)
    assert resp.status == 429 and resp.header(b"x-zai-error-code") == b"1303"
    production = (await request(proxy.port, "GET", "/admin/status")).json()["variants"][
        "production"]
    assert production["failures"]["zai_429"] == 1.0
    assert production["failures"]["proxy_429"] == 0.0


async def test_a_window_younger_than_its_length_says_since_when(nursery, upstream):
    """The host's ledger began at the proxy's start: its 5-hour window counts nothing from
    before, and says so instead of a confident "0 % used"."""
    import time

    started = time.time()
    proxy = await start_proxy(nursery, make_config(upstream, requests_per_5h=100,
                                                   requests_per_minute=100))
    report = (await request(proxy.port, "GET", "/admin/keys")).json()
    window = report["global"]["requests_per_5h"]
    assert started - 1 <= window["since"] <= time.time()
    assert "since" not in report["global"]["requests_per_minute"]  # a rate, not a window


def test_the_tui_shows_a_restarted_window_as_since_when() -> None:
    import datetime as dt

    from zaiproxy_tui.model import LimitState
    from zaiproxy_tui.views import limit_rows

    since = dt.datetime(2026, 12, 6, 14, 5, tzinfo=dt.UTC).timestamp()
    restarted, whole = limit_rows([
        LimitState("requests_per_5h", 100, 100, 0, 0.0, since),
        LimitState("tokens_per_week", 1000, 900, 100, 3600.0)], dt.UTC)
    assert restarted.resets == "since 14:05 (restart)"
    assert whole.resets == "1h"  # a window older than the restart: when it next releases


# ---- one meaning of "Z.AI errors" and "retries": proxy, its history, a collector ----------


class _Records:
    """The proxy's record sink, kept in memory (written to a history file by the test)."""

    def __init__(self) -> None:
        self.records: list[Any] = []

    def submit(self, record: Any) -> None:
        self.records.append(record)


async def test_zai_errors_and_retries_mean_the_same_on_proxy_history_and_collector(
        nursery, upstream, tmp_path):
    """Z.AI errors = every Z.AI 429 answer (retried or relayed), retries = the retried ones:
    the proxy's /admin/status, its history (the recorder's SQL over the rows) and a
    collector's history (scraped counters), each as the TUI reads it, count the same."""
    import time

    from tests.test_collector import options
    from zaiproxy.fleet.collector import Collector
    from zaiproxy.observe.recorder import wire
    from zaiproxy.observe.recorder.queries import history_series
    from zaiproxy.observe.recorder.store import HistoryStore, db_row
    from zaiproxy_tui.model import parse_history, total

    proxy = await start_proxy(nursery, make_config(upstream, max_retries=3, adaptive_rate=False))
    sink = _Records()
    proxy.worker.ctx.record_sink = sink
    collector = Collector(options(tmp_path, proxy.url))
    await nursery.start(collector.run)
    await collector.scrape_all()  # the baseline: history holds what changed after it

    # Two Z.AI 429s waited out, then a 200; four 429s (three retries, the last relayed);
    # a plain 200.
    sent = [(200, [("x-mock-zai-code", "1302"), ("x-mock-fail-key", "twice"),
                   ("x-mock-fail-times", "2")]),
            (429, [("x-mock-zai-code", "1303")]),
            (200, [])]
    for expected, headers in sent:
        resp = await request(proxy.port, "POST", "/v1/chat/completions", [JSON, *headers], CHAT)
        assert resp.status == expected
    zai_errors, retries = 2 + 4, 2 + 3

    production = (await request(proxy.port, "GET", "/admin/status")).json()["variants"][
        "production"]
    assert (production["zai_errors"], production["retries"]) == (zai_errors, retries)

    # The proxy's history: its rows, queried by the recorder's SQL, parsed by the TUI.
    now = time.time()
    store = HistoryStore.open(str(tmp_path / "h.duckdb"))
    try:
        store.write([db_row("production", 0, list(wire.row_of(r, now - 1)))
                     for r in sink.records])
        series = history_series(store, 900, resolution_s=10, now=now + 1)
    finally:
        store.close()
    assert [r.zai_retries for r in sink.records if r.api] == [2, 3, 0]
    recorded = parse_history({"series": series}, "15m", now + 1).series["production"]
    assert total(recorded, "zai_errors") == pytest.approx(zai_errors)
    assert total(recorded, "retries") == pytest.approx(retries)

    # A collector scraping the same proxy: its stored increases, parsed by the TUI.
    await collector.scrape_all()

    async def collected() -> Any:
        doc = await collector.history("15m", "production")
        return parse_history(doc, "15m", time.time()).series.get("production", ())

    # The writer task stores the scrape's rows on its own thread: bounded polling.
    with trio.fail_after(10):
        while not (points := await collected()) or total(points, "requests") < 2.5:  # noqa: ASYNC110
            await trio.sleep(0.05)
    assert total(points, "requests") == pytest.approx(len(sent))
    assert total(points, "zai_errors") == pytest.approx(zai_errors)
    assert total(points, "retries") == pytest.approx(retries)
