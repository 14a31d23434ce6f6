"""``zaiproxy tui --prometheus``: Z.AI's own quota from the ``zai_proxy_quota_*`` gauges.

A scripted Prometheus (the HTTP API on port 0, in a thread) answers each of
``promql.zai_quota``'s queries as Prometheus would for a fleet with a pool file of two
upstream keys, production and canary pods: ``team-plan`` polled fine and paced, ``backup``
whose quota API fails (malformed answers, a stale transition, no success over the window)
with its 5-hour reserve reached on a production pod. The PromQL itself is evaluated by a real
Prometheus scraping real proxies in tests/tui/test_prometheus_source.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest

from tests.tui.scripted_prometheus import ScriptedPrometheus, serving
from zaiproxy.fleet import promql
from zaiproxy_tui.model import QuotaPacing, QuotaWindow
from zaiproxy_tui.prometheus_source import QUOTA_POLLS_WINDOW_S, PrometheusSource, zai_quota

NOW = 1795828000.0
RESET_5H, RESET_WEEK = NOW + 7980.0, NOW + 273600.0


def rows(*series: tuple[dict[str, str], float]) -> list[dict[str, Any]]:
    return [{"metric": labels, "value": [NOW, repr(value)]} for labels, value in series]


def key(variant: str, upstream: str, **labels: str) -> dict[str, str]:
    return {"variant": variant, "upstream": upstream, **labels}


# Each query's answer, by the family it reads (already aggregated by its ``by`` clause).
ANSWERS: dict[str, list[dict[str, Any]]] = {
    promql.ZAI_QUOTA_USAGE: rows(
        (key("production", "team-plan", window="five_hour", limit_type="tokens_limit"), 0.42),
        (key("canary", "team-plan", window="five_hour", limit_type="tokens_limit"), 0.41),
        (key("production", "team-plan", window="weekly", limit_type="tokens_limit"), 0.18),
        (key("production", "backup", window="weekly", limit_type="tokens_limit"), 0.75),
        (key("production", "backup", window="five_hour", limit_type="tokens_limit"), 0.96),
        (key("canary", "backup", window="five_hour", limit_type="tokens_limit"), 0.97)),
    promql.ZAI_QUOTA_RESET: rows(
        (key("production", "team-plan", window="five_hour"), RESET_5H),
        (key("production", "team-plan", window="weekly"), RESET_WEEK),
        (key("production", "backup", window="five_hour"), RESET_5H),
        (key("production", "backup", window="weekly"), RESET_WEEK)),
    promql.ZAI_QUOTA_SAMPLE_AGE: rows(
        (key("production", "team-plan"), 30.0), (key("canary", "team-plan"), 12.5),
        (key("production", "backup"), 1520.0)),
    promql.ZAI_QUOTA_POLLS: rows(
        (key("production", "team-plan", result="success"), 5.0),
        (key("canary", "team-plan", result="success"), 5.0),
        (key("production", "team-plan", result="error"), 0.0),
        (key("production", "backup", result="success"), 0.0),
        (key("production", "backup", result="malformed"), 5.0),
        (key("production", "backup", result="stale"), 1.0)),
    promql.ZAI_QUOTA_RATE_CAP: rows(
        (key("production", "team-plan"), 1.5), (key("canary", "team-plan"), 2.0)),
    promql.ZAI_QUOTA_GATE_OPEN: rows(
        (key("production", "team-plan", window="five_hour"), 1.0),
        (key("production", "backup", window="five_hour"), 0.0),
        (key("canary", "backup", window="five_hour"), 1.0),
        (key("production", "backup", window="weekly"), 1.0)),
}


class QuotaPrometheus(ScriptedPrometheus):
    def answer(self, path: str, params: dict[str, str]) -> dict[str, Any]:
        if path == promql.TARGETS_PATH:
            return {"status": "success", "data": {"activeTargets": []}}
        query = params["query"]
        result = next((answer for family, answer in ANSWERS.items() if family in query), [])
        return {"status": "success", "data": {"resultType": "vector", "result": result}}


@pytest.fixture
def prometheus() -> Iterator[tuple[str, type[QuotaPrometheus]]]:
    with serving(QuotaPrometheus) as served:
        yield served


def test_the_snapshot_carries_zai_quota_per_upstream_key(
        prometheus: tuple[str, type[QuotaPrometheus]]) -> None:
    url, handler = prometheus

    async def main() -> Any:
        source = PrometheusSource(url, clock=lambda: NOW)
        try:
            return await source.snapshot(NOW, 2.0)
        finally:
            await source.aclose()

    snap = asyncio.run(main())
    assert snap.zai_quota is not None
    backup, team = snap.zai_quota  # by alias
    # Busiest pod's share (canary's 41 % < production's 42 %), the freshest sample (the
    # canary pod's), every pod's polls, the lowest paced rate.
    assert team.upstream == "team-plan"
    assert team.windows == (
        QuotaWindow("five_hour", 0.42, "TOKENS_LIMIT", RESET_5H, 7980.0),
        QuotaWindow("weekly", 0.18, "TOKENS_LIMIT", RESET_WEEK, 273600.0))
    assert (team.sample_age_s, team.last_success_at) == (12.5, NOW - 12.5)
    assert (team.last_outcome, team.stale, team.is_stale) == ("success", None, False)
    assert team.polls == {"success": 10.0, "error": 0.0}
    assert team.pacing == QuotaPacing(True, 1.5, False, None, None)
    # backup: failing over the whole window, a stale transition, its reserve closed on a
    # production pod until the 5-hour reset.
    assert [w.used_share for w in backup.windows] == [0.97, 0.75]
    assert (backup.last_outcome, backup.failing, backup.stale) == ("malformed", True, True)
    assert backup.pacing == QuotaPacing(True, None, True, "five_hour", RESET_5H)
    quota_queries = [q for q in handler.queries if "zai_proxy_quota_" in q
                     and promql.QUOTA_USED not in q]
    assert len(quota_queries) == 6 and all('variant=~".+"' in q for q in quota_queries)
    assert any(f"[{promql.duration(QUOTA_POLLS_WINDOW_S)}]" in q for q in quota_queries)


def test_without_a_pool_the_one_key_is_default_and_nothing_is_not_polled() -> None:
    answers = {"usage": {"production": {"-:five_hour:credit_limit": 0.5}},
               "sample_age": {"production": {"-": 2.0}},
               "polls": {"production": {"-:success": 0.0, "-:error": 3.0}}}
    (entry,) = zai_quota(answers, NOW)
    assert entry.upstream == "default"
    assert entry.windows == (QuotaWindow("five_hour", 0.5, "CREDIT_LIMIT"),)  # no reset known
    assert (entry.last_outcome, entry.pacing) == ("error", None)  # not pacing: no gate series
    # Polls that succeeded and failed within the window: which came last is unknown.
    answers["polls"] = {"production": {"-:success": 2.0, "-:error": 1.0}}
    assert zai_quota(answers, NOW)[0].last_outcome is None
    assert zai_quota({}, NOW) == ()
