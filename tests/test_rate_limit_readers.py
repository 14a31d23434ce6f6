"""The readers of the rate-limit families sum over the original's ``client`` label.

``zai_proxy_rate_limit_rejections_total`` carries ``client`` (source-00..63) beside ``limit``
and ``scope``; every reader keys it by ``scope:limit`` and must add the buckets up: the
admin API's snapshot (tests/test_snapshot.py, and the collector: tests/test_collector.py),
and here the PromQL that ``zaiproxy tui --prometheus``, ``zaiproxy history --prometheus`` and
``canary-check`` send (evaluated by promtool over series a real ``WorkerMetrics`` exposed)
and the reading of Prometheus' answers (``promql.by_variant``, the TUI's points).
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.test_labels import expected_bucket
from zaiproxy.fleet import promql
from zaiproxy.limits.ledger import load
from zaiproxy.observe.metrics import WorkerMetrics
from zaiproxy_tui.prometheus_source import _breakdown, point

REJECTIONS = "zai_proxy_rate_limit_rejections_total"
# Three peers in two buckets: 127.0.0.1 and 127.0.0.1:port share one.
PEERS = {"127.0.0.1": 3, "127.0.0.1:50000": 1, "10.0.0.1": 2}


@pytest.fixture
def exposed(tmp_path: Path) -> Iterator[list[tuple[dict[str, str], float]]]:
    """The rejection samples of a real WorkerMetrics: (labels, value)."""
    mod = load()
    segment = mod.Ledger(str(tmp_path / "segment"), create=True, rows=128, windows=4, workers=1)
    try:
        metrics = WorkerMetrics(variant="canary", ledger=mod.IMPLEMENTATION, workers=1,
                                segment=segment, shared=False)
        for peer, n in PEERS.items():
            for _ in range(n):
                metrics.rejection("requests_per_minute", "key", peer)
        metrics.rejection("concurrency", "global", "10.0.0.1")
        text = metrics.render()[0].decode()
    finally:
        segment.close()
    yield [(s.labels, s.value) for f in text_string_to_metric_families(text)
           for s in f.samples if s.name == REJECTIONS]


def test_the_exposition_has_one_series_per_bucket(
        exposed: list[tuple[dict[str, str], float]]) -> None:
    by = {(ls["limit"], ls["client"]): v for ls, v in exposed}
    assert by == {("requests_per_minute", expected_bucket("127.0.0.1")): 4,
                  ("requests_per_minute", expected_bucket("10.0.0.1")): 2,
                  ("concurrency", expected_bucket("10.0.0.1")): 1}


def selector(labels: dict[str, str]) -> str:
    return REJECTIONS + "{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}"


def test_promtool_sums_the_queries_over_client(
        exposed: list[tuple[dict[str, str], float]], tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    assert promtool is not None, "promtool is not on PATH (make test installs prometheus)"
    # Each series grows by its scraped value every minute (rates), or stays at it (totals).
    rates = promql.dashboard_rates(promql.ALL_VARIANTS, 300)["rejections"]
    totals = promql.dashboard_totals(promql.ALL_VARIANTS)["rejections"]
    increase = promql.range_summary(promql.ALL_VARIANTS, 300)["rejections"]
    assert rates.labels == totals.labels == increase.labels == ("scope", "limit")

    def expect(by_limit: dict[str, float]) -> list[dict[str, Any]]:
        return [{"labels": f'{{variant="canary",scope="{scope}",limit="{limit}"}}',
                 "value": value} for (scope, limit), value in (
            (("key", "requests_per_minute"), by_limit["requests_per_minute"]),
            (("global", "concurrency"), by_limit["concurrency"]))]

    doc = {"rule_files": [], "evaluation_interval": "1m", "tests": [
        {"interval": "1m",
         "input_series": [{"series": selector(ls), "values": f"0+{v:g}x10"}
                          for ls, v in exposed],
         "promql_expr_test": [
             {"expr": rates.query, "eval_time": "10m",
              "exp_samples": expect({"requests_per_minute": 6 / 60, "concurrency": 1 / 60})},
             {"expr": increase.query, "eval_time": "10m",
              "exp_samples": expect({"requests_per_minute": 6 * 5, "concurrency": 1 * 5})}]},
        {"interval": "1m",
         "input_series": [{"series": selector(ls), "values": f"{v:g}x10"} for ls, v in exposed],
         "promql_expr_test": [
             {"expr": totals.query, "eval_time": "5m",
              "exp_samples": expect({"requests_per_minute": 6, "concurrency": 1})}]}]}
    path = tmp_path / "readers.yaml"
    path.write_text(yaml.safe_dump(doc))
    proc = subprocess.run([promtool, "test", "rules", str(path)], capture_output=True,
                          text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_answers_with_client_series_are_summed_by_scope_and_limit(
        exposed: list[tuple[dict[str, str], float]]) -> None:
    """Should a query ever keep ``client`` (an answer row per bucket), the reading still
    adds the buckets up: by_variant keys rows by the signal's labels only."""
    rows = [{"metric": ls, "value": [0, str(v)]} for ls, v in exposed]
    values = promql.by_variant(rows, ("scope", "limit"))
    assert values == {"canary": {"key:requests_per_minute": 6, "global:concurrency": 1}}
    signals = {"rejections": values["canary"],
               "status": {"200": 10.0, "429": 7.0}}
    p = point(0.0, 1.0, signals)
    assert (p.rejections, p.proxy_429, p.zai_429) == (7, 7, 0)
    assert _breakdown(signals)["rejections"] == {"key:requests_per_minute": 6,
                                                 "global:concurrency": 1}
