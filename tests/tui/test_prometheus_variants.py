"""``zaiproxy tui --prometheus`` with a canary by another name: PrometheusSource asks for every
variant and reports the ones Prometheus has, whatever they are called (the original service's
canary runbook calls its canary ``test``).

A scripted Prometheus (the HTTP API on port 0, in a thread) answers every instant query with
one series per variant it holds and every range query with two samples of each; the real
Prometheus case (production and ``canary`` proxies) is tests/tui/test_prometheus_source.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest

from tests.tui.scripted_prometheus import ScriptedPrometheus, serving
from zaiproxy.fleet import promql
from zaiproxy_tui.prometheus_source import PrometheusSource

NOW = 1795828000.0
VARIANTS = ("production", "test")


class FakePrometheus(ScriptedPrometheus):
    held: tuple[str, ...] = VARIANTS

    def answer(self, path: str, params: dict[str, str]) -> dict[str, Any]:
        if path == promql.TARGETS_PATH:
            return {"status": "success", "data": {"activeTargets": [
                {"labels": {"job": "zaiproxy", "instance": f"{v}:8080"}, "scrapeInterval": "15s"}
                for v in self.held]}}
        ranged = path == promql.RANGE_PATH
        rows = [{"metric": {"variant": v, "job": "zaiproxy", "instance": f"{v}:8080"},
                 **({"values": [[NOW - 60, "1"], [NOW, "1"]]} if ranged
                    else {"value": [NOW, "1"]})}
                for v in self.held]
        return {"status": "success",
                "data": {"resultType": "matrix" if ranged else "vector", "result": rows}}


@pytest.fixture
def prometheus() -> Iterator[tuple[str, type[FakePrometheus]]]:
    with serving(FakePrometheus) as served:
        yield served


def test_every_variant_prometheus_has_is_reported(
        prometheus: tuple[str, type[FakePrometheus]]) -> None:
    url, handler = prometheus

    async def main() -> None:
        source = PrometheusSource(url, clock=lambda: NOW)
        try:
            snap = await source.snapshot(NOW, 2.0)
            history = await source.history("15m", "all")
        finally:
            await source.aclose()
        assert sorted(snap.variants) == list(VARIANTS)
        assert snap.variants["test"].targets == 1 and snap.variants["test"].rates is not None
        assert sorted(history.series) == list(VARIANTS)
        assert all(history.series[v] for v in VARIANTS)

    asyncio.run(main())
    # No name is assumed: every query selects the variants by a matcher of them all.
    assert handler.queries and all('variant=~".+"' in q for q in handler.queries)
    assert not [q for q in handler.queries if "canary" in q]


def test_names_given_are_the_only_ones_asked_for(
        prometheus: tuple[str, type[FakePrometheus]]) -> None:
    url, handler = prometheus
    handler.held = ("production", "test", "v2")

    async def main() -> list[str]:
        source = PrometheusSource(url, names=("production", "test"), clock=lambda: NOW)
        try:
            snap = await source.snapshot(NOW, 2.0)
        finally:
            await source.aclose()
        return sorted(snap.variants)

    assert asyncio.run(main()) == ["production", "test"]
    assert all('variant=~"production|test"' in q for q in handler.queries)
