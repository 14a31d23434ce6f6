"""What failed for the clients, by kind, in ``/admin/status`` (and so in the collector and the
TUI, which read the same snapshot): one definition (``snapshot.failures``) of 5xx, the proxy's
own 429s, Z.AI's 429s and other 4xx."""

from __future__ import annotations

import orjson
import pytest

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
