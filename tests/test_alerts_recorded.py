"""The original service's canary queries and alert expressions, and our shipped rules, run by
``promtool test rules`` on series RECORDED FROM OUR PROXY, the canary labelled ``variant="test"``
as in the original's runbook.

The recording (once per module): the real mock upstream and two real in-process proxies,
``DEPLOYMENT_VARIANT=production`` and ``DEPLOYMENT_VARIANT=test``, serve real requests (the
mock answers 500 for the model ``mock-status-500`` and waits 150 ms for ``mock-slow-150``);
after a warm-up (every series born) and after each of 16 batches, both ``/metrics`` are
scraped. Scrape k becomes sample k of promtool's ``input_series`` at k minutes (each series
with the target labels a ServiceMonitor adds: job, namespace, pod, instance; ``_`` where a
scrape did not have it).

- production, every batch: 40 answered, 1 answered 500 (2.4 %), no upstream delay;
- test, batches 1-10: 18 answered after 150 ms, 3 answered 500 (14.3 %); batches 11-16:
  21 answered after 150 ms (its 5xx share falls back under 5 %).

Batch sizes 41 and 21 keep 0.95 and 0.9 of any window's count off whole numbers, so no
quantile's rank lands on a bucket's edge (where float noise would pick the bucket).

The expectations come from the same scrapes: this module evaluates each expression itself
(``rate`` with Prometheus' extrapolation, ``sum``, ``histogram_quantile``, ``round``; range
selectors closed on the left as in Prometheus 2, open from 3) and writes what promtool must
answer, and which alerts must be firing at every minute (an alert fires when its condition
held at every evaluation of its ``for``). Values are compared after ``round(…, 1e-9)``: the
two sides may add the same series in another order. A condition within 1e-9 of its
threshold stops the test (the traffic, not the rule, would decide).

What no recording here reaches: a p95 above 10 s (HighLatency) and a token count p95 above
100 ms (TokenCountingSlow) would take real 10 s requests and megabyte prompts; their
expressions are evaluated (the values must match) and the alerts must stay quiet. If a
metric or label the expressions read were missing or renamed, promtool's answers would not
match: ``test_a_renamed_label_or_a_missing_family_fails`` checks that it notices.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import shutil
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.harness import make_config, request, start_mock, start_proxy
from tests.test_alerts import groups as shipped_groups
from tests.test_alerts import run_promtool
from zaiproxy.core import logs

# The recording does not depend on the HTTP implementation (`make test` runs the suite twice).
pytestmark = pytest.mark.skipif(os.environ.get("ZAIPROXY_HTTP_IMPL") == "h11-mypyc",
                                reason="independent of the HTTP implementation")

STEP_S = 60.0  # one scrape per minute of promtool's time
BATCHES = 16
CANARY = "test"  # the original's runbook: variant="test"
VARIANTS = ("production", CANARY)
# What Prometheus adds to each scraped series (the ServiceMonitor's target labels).
TARGETS = {
    "production": {"job": "zaiproxy", "namespace": "zaiproxy", "instance": "10.0.0.21:8080",
                   "pod": "zaiproxy-production-5c4b9d7f8-q7w2e"},
    CANARY: {"job": "zaiproxy", "namespace": "zaiproxy", "instance": "10.0.0.11:8080",
             "pod": "zaiproxy-canary-7d9f8b6c4-x2k9p"},  # the overlay's Deployment name
}
OK, SLOW, FAIL = "glm-4.6", "mock-slow-150", "mock-status-500"
ROUND = 1e-9


def plan(batch: int) -> dict[str, list[str]]:
    """The models each variant is sent in batch ``batch`` (0 = the warm-up)."""
    if batch == 0:
        return {"production": [OK, FAIL], CANARY: [SLOW, FAIL]}
    failing = batch <= 10
    return {"production": [OK] * 40 + [FAIL],
            CANARY: [SLOW] * (18 if failing else 21) + [FAIL] * (3 if failing else 0)}


# ---- the original's expressions (its runbook and alert table), with variant="test" -----

REQUESTS = "zai_proxy_requests_total"
DURATION_BUCKET = "zai_proxy_request_duration_seconds_bucket"
TOKEN_COUNT_BUCKET = "zai_proxy_token_count_duration_seconds_bucket"
# The canary runbook's query, character for character.
RUNBOOK_QUERY = ('sum(rate(zai_proxy_requests_total{variant="test",status_code=~"5.."}[5m])) / '
                 'sum(rate(zai_proxy_requests_total{variant="test"}[5m]))')
# The runbook's latency check for LatencyDegraded.
P90_QUERY = ('histogram_quantile(0.90, sum(rate(zai_proxy_request_duration_seconds_bucket'
             '{variant="test"}[5m])) by (le))')


def ratio_query(variant: str, window: str) -> str:
    return (f'sum(rate({REQUESTS}{{variant="{variant}",status_code=~"5.."}}[{window}])) / '
            f'sum(rate({REQUESTS}{{variant="{variant}"}}[{window}]))')


def p95_query(variant: str) -> str:
    return (f"histogram_quantile(0.95, sum(rate({DURATION_BUCKET}{{variant=\"{variant}\"}}"
            f"[5m])) by (le))")


TOKEN_P95_QUERY = f"histogram_quantile(0.95, rate({TOKEN_COUNT_BUCKET}[5m]))"

# Name, expression, for (minutes): the original's table (severity warning for all five).
ORIGINAL_ALERTS: tuple[tuple[str, str, int], ...] = (
    ("ZaiProxyCanaryHighErrorRate", f"{ratio_query(CANARY, '5m')} > 0.05", 5),
    ("ZaiProxyCanaryDegradedVsProduction",
     f"{ratio_query(CANARY, '10m')} > 2 * ({ratio_query('production', '10m')} + 0.01)", 10),
    ("ZaiProxyCanarySlowerThanProduction",
     f"{p95_query(CANARY)} > 1.5 * {p95_query('production')}", 10),
    ("ZaiProxyCanaryHighLatency", f"{p95_query(CANARY)} > 10", 5),
    ("ZaiProxyCanaryTokenCountingSlow", f"{TOKEN_P95_QUERY} > 0.1", 5),
)


# ---- the recording ----------------------------------------------------------------------

Labels = tuple[tuple[str, str], ...]  # sorted


@dataclass(frozen=True, slots=True)
class Recording:
    """Every sample of every scrape: (name, labels with the target's) -> value per scrape."""

    series: dict[tuple[str, Labels], list[float | None]]
    scrapes: int
    texts: dict[str, str]  # the last scrape of each variant, as exposed


async def _record() -> Recording:
    series: dict[tuple[str, Labels], list[float | None]] = {}
    texts: dict[str, str] = {}
    async with trio.open_nursery() as nursery:
        upstream = await start_mock(nursery)
        proxies = {v: await start_proxy(nursery, make_config(upstream, deployment_variant=v))
                   for v in VARIANTS}
        limit = trio.CapacityLimiter(16)

        async def send(port: int, model: str) -> None:
            async with limit:
                body = json.dumps({"model": model,
                                   "messages": [{"role": "user", "content": "hi"}]}).encode()
                resp = await request(port, "POST", "/v1/chat/completions",
                                     [("content-type", "application/json")], body)
            assert resp.status == (500 if model == FAIL else 200), (model, resp.body[:200])

        for batch in range(BATCHES + 1):
            async with trio.open_nursery() as senders:
                for variant, models in plan(batch).items():
                    for model in models:
                        senders.start_soon(send, proxies[variant].port, model)
            for variant, proxy in proxies.items():
                scrape = await request(proxy.port, "GET", "/metrics")
                assert scrape.status == 200
                texts[variant] = scrape.body.decode()
                for family in text_string_to_metric_families(texts[variant]):
                    for s in family.samples:
                        labels = tuple(sorted({**s.labels, **TARGETS[variant]}.items()))
                        values = series.setdefault((s.name, labels), [None] * batch)
                        values.append(float(s.value))
            for values in series.values():  # a series this scrape did not have
                if len(values) == batch:
                    values.append(None)
        nursery.cancel_scope.cancel()
    return Recording(series, BATCHES + 1, texts)


@pytest.fixture(scope="session")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool is not on PATH (`make test` installs it: apt-get install "
                    "prometheus); these tests never skip")
    return path


@pytest.fixture(scope="module")
def recording() -> Recording:
    logs.configure("info", proc="test", stream=io.BytesIO())  # the proxies' logs, unread
    return trio.run(_record)


# ---- PromQL, evaluated here on the recording (what promtool must answer) ------------------

Matcher = str | re.Pattern[str]
# The shipped rules' path!~"/metrics|/health|/ready|/admin/.*|other" (anchored, as PromQL's).
API_ONLY: dict[str, Matcher] = {
    "path": re.compile(r"(?!(?:/metrics|/health|/ready|/admin/.*|other)$).*")}


def promtool_major(promtool: str) -> int:
    out = subprocess.run([promtool, "--version"], capture_output=True, text=True,
                         check=False).stdout
    found = re.search(r"version (\d+)\.", out)
    return int(found.group(1)) if found else 2


class Borderline(AssertionError):
    """A condition the recorded traffic put exactly on its threshold."""


@dataclass(frozen=True, slots=True)
class Evaluator:
    rec: Recording
    left_open: bool  # Prometheus 3: a range selector leaves out the sample at its start

    def select(self, name: str, match: Mapping[str, Matcher]) \
            -> list[tuple[dict[str, str], list[float | None]]]:
        out = []
        for (n, labels), values in self.rec.series.items():
            d = dict(labels)
            if n == name and all(
                    (m.fullmatch(d.get(k, "")) is not None) if isinstance(m, re.Pattern)
                    else d.get(k, "") == m for k, m in match.items()):
                out.append((d, values))
        return out

    def rate(self, values: list[float | None], t: int, range_s: float) -> float | None:
        """Prometheus' ``rate`` of one counter at minute ``t`` (promql/functions.go,
        extrapolatedRate)."""
        end = t * STEP_S
        start = end - range_s
        pts = [(i * STEP_S, v) for i, v in enumerate(values[:t + 1]) if v is not None
               and (i * STEP_S > start if self.left_open else i * STEP_S >= start)]
        if len(pts) < 2:
            return None
        result = pts[-1][1] - pts[0][1]
        last = 0.0
        for _, v in pts:  # counter resets
            if v < last:
                result += last
            last = v
        to_start, to_end = pts[0][0] - start, end - pts[-1][0]
        sampled = pts[-1][0] - pts[0][0]
        average = sampled / (len(pts) - 1)
        if result > 0 and pts[0][1] >= 0:
            to_start = min(to_start, sampled * (pts[0][1] / result))
        threshold = average * 1.1
        interval = sampled
        interval += to_start if to_start < threshold else average / 2
        interval += to_end if to_end < threshold else average / 2
        return result * (interval / sampled) / range_s

    def sum_rate(self, name: str, t: int, range_s: float, **match: Matcher) -> float | None:
        rates = [r for _, v in self.select(name, match)
                 if (r := self.rate(v, t, range_s)) is not None]
        return sum(rates) if rates else None

    def ratio(self, variant: str, t: int, range_s: float, status: str = "status_code",
              api_only: bool = False) -> float | None:
        """5xx share of ``variant``'s requests (the runbook's ratio; ``status`` names the
        label, ``api_only`` leaves out what the shipped rules leave out)."""
        extra = API_ONLY if api_only else {}
        errors = self.sum_rate(REQUESTS, t, range_s, variant=variant,
                               **{status: re.compile("5..")}, **extra)
        total = self.sum_rate(REQUESTS, t, range_s, variant=variant, **extra)
        if errors is None or total is None:
            return None
        return errors / total if total else math.nan

    def quantile(self, q: float, name: str, t: int, **match: Matcher) -> float | None:
        """``histogram_quantile(q, sum(rate(name{match}[5m])) by (le))``."""
        by_le: dict[str, float] = {}
        for labels, values in self.select(name, match):
            r = self.rate(values, t, 300)
            if r is not None:
                by_le[labels["le"]] = by_le.get(labels["le"], 0.0) + r
        return bucket_quantile(q, by_le) if by_le else None

    def quantiles_by_series(self, q: float, name: str, t: int) -> dict[Labels, float]:
        """``histogram_quantile(q, rate(name[5m]))``: one value per series but ``le``."""
        groups: dict[Labels, dict[str, float]] = {}
        for labels, values in self.select(name, {}):
            r = self.rate(values, t, 300)
            if r is not None:
                key = tuple(sorted((k, v) for k, v in labels.items() if k != "le"))
                groups.setdefault(key, {})[labels["le"]] = r
        return {k: bucket_quantile(q, b) for k, b in groups.items()}


def bucket_quantile(q: float, by_le: Mapping[str, float]) -> float:
    """Prometheus' bucketQuantile (promql/quantile.go)."""
    buckets = sorted((float(le), c) for le, c in by_le.items())
    if not buckets or not math.isinf(buckets[-1][0]) or len(buckets) < 2:
        return math.nan
    for i in range(1, len(buckets)):  # ensureMonotonic
        if buckets[i][1] < buckets[i - 1][1]:
            buckets[i] = (buckets[i][0], buckets[i - 1][1])
    observations = buckets[-1][1]
    if observations == 0:
        return math.nan
    rank = q * observations
    b = next((i for i in range(len(buckets) - 1) if buckets[i][1] >= rank), len(buckets) - 1)
    if b == len(buckets) - 1:
        return buckets[-2][0]
    if b == 0 and buckets[0][0] <= 0:
        return buckets[0][0]
    start, end, count = 0.0, buckets[b][0], buckets[b][1]
    if b > 0:
        start, count, rank = buckets[b - 1][0], count - buckets[b - 1][1], rank - buckets[b - 1][1]
    return start + (end - start) * (rank / count)


def rounded(x: float) -> float:
    """PromQL's ``round(x, 1e-9)`` (promql/functions.go funcRound), digit for digit."""
    inverse = 1.0 / ROUND
    return math.floor(x * inverse + 0.5) / inverse


def above(lhs: float | None, rhs: float | None) -> bool:
    """``lhs > rhs`` of two PromQL samples (absent or NaN: no sample, so false)."""
    if lhs is None or rhs is None or math.isnan(lhs) or math.isnan(rhs):
        return False
    if abs(lhs - rhs) <= 1e-9 * max(1.0, abs(lhs), abs(rhs)):
        raise Borderline(f"{lhs!r} against {rhs!r}: the traffic put a condition on its edge")
    return lhs > rhs


def firing_at(condition: Callable[[int], bool], t: int, for_minutes: int) -> bool:
    """Firing at minute ``t``: the condition held at every evaluation of the last ``for``."""
    return t >= for_minutes and all(condition(u) for u in range(t - for_minutes, t + 1))


# ---- promtool's unit test files ------------------------------------------------------------


def series_notation(name: str, labels: Labels) -> str:
    def quoted(v: str) -> str:
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    return name + "{" + ",".join(f"{k}={quoted(v)}" for k, v in labels) + "}"


def input_series(rec: Recording) -> list[dict[str, str]]:
    return [{"series": series_notation(name, labels),
             "values": " ".join("_" if v is None else repr(v) for v in values)}
            for (name, labels), values in sorted(rec.series.items())]


def value_test(expr: str, t: int, samples: Mapping[Labels, float | None]) -> dict[str, Any]:
    """A promql_expr_test of ``round(expr, 1e-9)`` at minute ``t``."""
    exp = []
    for labels, x in sorted(samples.items()):
        if x is None:
            continue
        assert math.isfinite(x), (expr, t, labels, x)
        exp.append({"labels": "{" + ",".join(f'{k}="{v}"' for k, v in labels) + "}",
                    "value": rounded(x)})
    return {"expr": f"round({expr}, {ROUND})", "eval_time": f"{t}m", "exp_samples": exp}


def alert_tests(name: str, labels: Mapping[str, str], condition: Callable[[int], bool],
                for_minutes: int, last: int) -> tuple[list[dict[str, Any]], list[int]]:
    """One alert_rule_test per minute; and the minutes it fires at."""
    tests, fired = [], []
    for t in range(1, last + 1):
        on = firing_at(condition, t, for_minutes)
        fired += [t] if on else []
        tests.append({"eval_time": f"{t}m", "alertname": name,
                      "exp_alerts": [{"exp_labels": dict(labels)}] if on else []})
    return tests, fired


def write_unit_test(path: Path, rules: Path, rec: Recording, name: str,
                    exprs: list[dict[str, Any]], alerts: list[dict[str, Any]],
                    order: list[str] | None = None) -> Path:
    doc: dict[str, Any] = {"rule_files": [str(rules)], "evaluation_interval": "1m"}
    if order:
        doc["group_eval_order"] = order
    doc["tests"] = [{"name": name, "interval": "1m", "input_series": input_series(rec),
                     "promql_expr_test": exprs, "alert_rule_test": alerts}]
    path.write_text(yaml.safe_dump(doc, sort_keys=False, width=1 << 16))
    return path


# ---- the original's expressions ------------------------------------------------------------

LAST = BATCHES  # the last minute with a sample
VALUE_TIMES = (1, 3, 5, 8, 10, 12, 14, LAST)


def original_unit_test(rec: Recording, tmp_path: Path, ev: Evaluator) \
        -> tuple[Path, dict[str, list[int]]]:
    rules = tmp_path / "original.rules.yaml"
    rules.write_text(yaml.safe_dump({"groups": [{"name": "zai_proxy_canary_alerts", "rules": [
        {"alert": name, "expr": expr, "for": f"{minutes}m", "labels": {"severity": "warning"}}
        for name, expr, minutes in ORIGINAL_ALERTS]}]}, sort_keys=False))

    def p95(variant: str, t: int) -> float | None:
        return ev.quantile(0.95, DURATION_BUCKET, t, variant=variant)

    exprs: list[dict[str, Any]] = []
    for t in VALUE_TIMES:
        exprs += [
            value_test(RUNBOOK_QUERY, t, {(): ev.ratio(CANARY, t, 300)}),
            value_test(P90_QUERY, t, {(): ev.quantile(0.90, DURATION_BUCKET, t,
                                                     variant=CANARY)}),
            *(value_test(ratio_query(v, "10m"), t, {(): ev.ratio(v, t, 600)})
              for v in VARIANTS),
            *(value_test(p95_query(v), t, {(): p95(v, t)}) for v in VARIANTS),
            value_test(TOKEN_P95_QUERY, t,
                       dict(ev.quantiles_by_series(0.95, TOKEN_COUNT_BUCKET, t))),
        ]
    # Every expression has its value at every time asked (none passes by answering nothing).
    assert all(e["exp_samples"] for e in exprs), [e for e in exprs if not e["exp_samples"]]
    conditions: dict[str, Callable[[int], bool]] = {
        "ZaiProxyCanaryHighErrorRate": lambda t: above(ev.ratio(CANARY, t, 300), 0.05),
        "ZaiProxyCanaryDegradedVsProduction": lambda t: above(
            ev.ratio(CANARY, t, 600), _twice_plus(ev.ratio("production", t, 600))),
        "ZaiProxyCanarySlowerThanProduction": lambda t: above(
            p95(CANARY, t), _times(1.5, p95("production", t))),
        "ZaiProxyCanaryHighLatency": lambda t: above(p95(CANARY, t), 10.0),
        "ZaiProxyCanaryTokenCountingSlow": lambda t: any(
            above(x, 0.1) for x in ev.quantiles_by_series(0.95, TOKEN_COUNT_BUCKET, t).values()),
    }
    alerts: list[dict[str, Any]] = []
    fired: dict[str, list[int]] = {}
    for name, _, minutes in ORIGINAL_ALERTS:
        tests, fired[name] = alert_tests(name, {"severity": "warning"}, conditions[name],
                                         minutes, LAST)
        alerts += tests
    path = write_unit_test(tmp_path / "original.test.yaml", rules, rec,
                           "the original's expressions on a recorded scrape", exprs, alerts)
    return path, fired


def _twice_plus(x: float | None) -> float | None:
    return None if x is None else 2 * (x + 0.01)


def _times(k: float, x: float | None) -> float | None:
    return None if x is None else k * x


@pytest.fixture
def evaluator(recording: Recording, promtool: str) -> Evaluator:
    return Evaluator(recording, left_open=promtool_major(promtool) >= 3)


def test_the_recording_has_what_the_originals_expressions_read(recording: Recording) -> None:
    """Read straight from the last scrape (promtool's failure would say less)."""
    families = {v: {(s.name, frozenset(s.labels)) for f in
                    text_string_to_metric_families(recording.texts[v]) for s in f.samples}
                for v in VARIANTS}
    for variant, found in families.items():
        names = {n for n, _ in found}
        assert {REQUESTS, DURATION_BUCKET, TOKEN_COUNT_BUCKET} <= names, variant
        assert (REQUESTS, frozenset({"method", "path", "status", "status_code", "variant"})) \
            in found
        assert (DURATION_BUCKET, frozenset({"method", "path", "status_code", "variant", "le"})) \
            in found
        assert (TOKEN_COUNT_BUCKET, frozenset({"variant", "le"})) in found
    canary = [dict(labels) for (name, labels) in recording.series
              if name == REQUESTS and dict(labels)["variant"] == CANARY]
    assert {c["status_code"] for c in canary} == {"200", "500"}


def test_the_runbooks_queries_and_the_originals_alerts(recording: Recording, tmp_path: Path,
                                                      evaluator: Evaluator,
                                                      promtool: str) -> None:
    assert ratio_query(CANARY, "5m") == RUNBOOK_QUERY  # HighErrorRate is the runbook's query
    path, fired = original_unit_test(recording, tmp_path, evaluator)
    # The traffic makes the three comparisons fire (and HighErrorRate resolve once the
    # canary's 5xx stop); 10 s latencies and 100 ms token counts are out of its reach.
    # Pending from minute 1 (the first rate), firing after `for`; HighErrorRate's 5m share
    # falls under 5 % at minute 14, DegradedVsProduction's 10m share under 2 x (2.4 % + 1 %)
    # at minute 16.
    assert fired["ZaiProxyCanaryHighErrorRate"] == list(range(6, 14)), fired
    assert fired["ZaiProxyCanaryDegradedVsProduction"] == list(range(11, 16)), fired
    assert fired["ZaiProxyCanarySlowerThanProduction"] == list(range(11, LAST + 1)), fired
    assert fired["ZaiProxyCanaryHighLatency"] == fired["ZaiProxyCanaryTokenCountingSlow"] == []
    assert "SUCCESS" in run_promtool(promtool, "test", "rules", str(path))


# ---- the shipped rules ---------------------------------------------------------------------


def shipped_unit_test(rec: Recording, tmp_path: Path, ev: Evaluator) \
        -> tuple[Path, dict[str, list[int]]]:
    """k8s/base/prometheusrule.yaml without annotations (tests/alerts/*.yaml checks those)."""
    found = shipped_groups()
    for group in found:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    rules = tmp_path / "zaiproxy.rules.yaml"
    rules.write_text(yaml.safe_dump({"groups": found}, sort_keys=False))

    def ratio(v: str, t: int) -> float | None:
        return ev.ratio(v, t, 300, status="status", api_only=True)

    def rate(v: str, t: int) -> float | None:
        return ev.sum_rate(REQUESTS, t, 300, variant=v, **API_ONLY)

    def p95(v: str, t: int) -> float | None:
        return ev.quantile(0.95, DURATION_BUCKET, t, variant=v)

    def busy(v: str, t: int) -> bool:
        return above(rate(v, t), 0.1)

    conditions: dict[str, tuple[Callable[[int], bool], int, str]] = {
        "ZaiProxyCanaryHighErrorRate": (
            lambda t: above(ratio(CANARY, t), 0.05) and busy(CANARY, t), 5, "critical"),
        "ZaiProxyCanaryDegraded": (
            lambda t: above(ratio(CANARY, t), _twice_plus(ratio("production", t)))
            and busy(CANARY, t), 10, "warning"),
        "ZaiProxyCanaryLatencyDegraded": (
            lambda t: above(_over(p95(CANARY, t), p95("production", t)), 1.5)
            and busy(CANARY, t) and busy("production", t), 10, "warning"),
    }
    alerts: list[dict[str, Any]] = []
    fired: dict[str, list[int]] = {}
    for name, (condition, minutes, severity) in conditions.items():
        tests, fired[name] = alert_tests(
            name, {"severity": severity, "namespace": "zaiproxy", "variant": CANARY},
            condition, minutes, LAST)
        alerts += tests
    for quiet in ("ZaiProxyTokenCountingSlow", "ZaiProxyCanaryNotReady",
                  "ZaiProxyUpstream429RateHigh"):
        alerts += [{"eval_time": f"{t}m", "alertname": quiet, "exp_alerts": []}
                   for t in VALUE_TIMES]
    recorded = "namespace_variant:zai_proxy_requests_5xx:ratio_rate5m"
    exprs = [value_test(recorded, t, {(("namespace", "zaiproxy"), ("variant", v)): ratio(v, t)
                                      for v in VARIANTS})
             for t in VALUE_TIMES]
    assert all(len(e["exp_samples"]) == 2 for e in exprs)
    order = [g["name"] for g in found if any("record" in r for r in g["rules"])]
    order += [g["name"] for g in found if g["name"] not in order]
    path = write_unit_test(tmp_path / "shipped.test.yaml", rules, rec,
                           "the shipped rules on a recorded scrape, canary named test",
                           exprs, alerts, order)
    return path, fired


def _over(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def test_the_shipped_rules_alert_on_a_canary_named_test(recording: Recording, tmp_path: Path,
                                                        evaluator: Evaluator,
                                                        promtool: str) -> None:
    path, fired = shipped_unit_test(recording, tmp_path, evaluator)
    # Pending from minute 2: at minute 1 the canary's rate (one batch, extrapolated from a
    # series a minute old) is under the rules' floor of 0.1 request/s. Degraded compares 5m
    # shares: the canary's falls under 2 x (2.4 % + 1 %) at minute 13.
    assert fired == {"ZaiProxyCanaryHighErrorRate": list(range(7, 14)),
                     "ZaiProxyCanaryDegraded": [12],
                     "ZaiProxyCanaryLatencyDegraded": list(range(12, LAST + 1))}
    assert "SUCCESS" in run_promtool(promtool, "test", "rules", str(path))


# ---- the check itself -----------------------------------------------------------------------


@pytest.mark.parametrize(("what", "edit"), [
    ("status_code renamed", lambda name, labels: (name, tuple(
        ("code" if k == "status_code" else k, v) for k, v in labels))),
    ("token count family missing", lambda name, labels: None
     if name.startswith("zai_proxy_token_count_duration_seconds") else (name, labels)),
    ("variant renamed", lambda name, labels: (name, tuple(
        ("deployment_variant" if k == "variant" else k, v) for k, v in labels))),
])
def test_a_renamed_label_or_a_missing_family_fails(
        recording: Recording, tmp_path: Path, evaluator: Evaluator, promtool: str,
        what: str, edit: Callable[[str, Labels], tuple[str, Labels] | None]) -> None:
    """The expectations of the real recording, checked against series one edit away from
    it: promtool must fail."""
    changed: dict[tuple[str, Labels], list[float | None]] = {}
    for (name, labels), values in recording.series.items():
        key = edit(name, labels)
        if key is not None:
            changed[key] = values
    path, _ = original_unit_test(recording, tmp_path, evaluator)  # expectations: the real one
    doc = yaml.safe_load(path.read_text())
    doc["tests"][0]["input_series"] = input_series(Recording(changed, recording.scrapes, {}))
    path.write_text(yaml.safe_dump(doc, sort_keys=False, width=1 << 16))
    with pytest.raises(AssertionError, match="exited 1") as failed:
        run_promtool(promtool, "test", "rules", str(path))
    assert "FAILED" in str(failed.value), what


def test_the_evaluator_matches_prometheus_on_a_counter_born_late(
        tmp_path: Path, evaluator: Evaluator, promtool: str) -> None:
    """The extrapolation this module computes expectations with, against promtool's, where
    it matters most: a series born mid-window (zero-point limit), a reset, gaps."""
    rec = Recording({("c_total", (("k", "a"),)): [None, None, 3.0, 9.0, 2.0, 8.0, None, 20.0],
                     ("c_total", (("k", "b"),)): [0.0, 1.0, 2.0, 3.0, 5.0, 8.0, 13.0, 21.0]},
                    8, {})
    ev = Evaluator(rec, evaluator.left_open)
    exprs = [value_test(f"rate(c_total{{k=\"{k}\"}}[{r}m])", t,
                        {(("k", k),): ev.rate(rec.series[("c_total", (("k", k),))], t, r * 60)})
             for k in "ab" for t in range(1, 8) for r in (2, 5)]
    rules = tmp_path / "none.rules.yaml"
    rules.write_text("groups: []\n")
    path = write_unit_test(tmp_path / "rate.test.yaml", rules, rec, "rate", exprs, [])
    assert "SUCCESS" in run_promtool(promtool, "test", "rules", str(path))
