"""A fleet's metrics in Prometheus as the TUI's source (``zaiproxy tui --prometheus URL``).

In Kubernetes a ServiceMonitor already has Prometheus scrape every pod of both variants, so
the numbers the TUI shows are all there: reading them directly shows the whole fleet
without running a collector (``zaiproxy collect``) beside it, and says which pods
Prometheus cannot scrape. :class:`PrometheusSource` is a :class:`~zaiproxy_tui.source.Source`
like :class:`~zaiproxy_tui.source.AdminApi`, and answers with the same model objects, so
the screen cannot tell them apart except where it should (the status line names the
source, the targets' badges come from ``up``):

- ``events()``: ``Connected``, then a :class:`~zaiproxy_tui.model.Snapshot` every
  ``interval`` (2 s, as the admin API's stream): per variant the counters' rates over the
  live window, their totals since each pod started (the "since start" tables), the gauges
  (in flight, the concurrency limit, the adaptive rate), the latency and TTFT quantiles
  (``histogram_quantile``), the builds, and the targets with those that are down; and
  Z.AI's own quota per upstream key (the ``zai_proxy_quota_*`` gauges: :func:`zai_quota`);
- ``history(range)``: the same rates from ``query_range`` at the collector's steps
  (``zaiproxy/fleet/collector.py``'s ``STEPS``), never finer than a scrape;
- ``keys()``: Prometheus has no per-key report (alias labels only with
  ``auth.alias_metrics``), so it raises :class:`NotInPrometheus`, whose message the
  keys and limiter panels show, with the quota windows' used shares that Prometheus has.

The PromQL and the reading of Prometheus' answers are :mod:`zaiproxy.fleet.promql`'s,
shared with ``zaiproxy canary-check --prometheus``; only the transport (httpx, asyncio)
is this module's. Failures are the source module's kinds (unreachable, 401 asks for the
token, an answer that is not Prometheus').

Rate windows: a rate needs at least two samples in its window, so windows follow the
targets' scrape interval, read once per stream from ``/api/v1/targets`` (15 s, the
ServiceMonitor's, when the API does not say: a Thanos or Mimir query front end has no
targets API). The live window is four scrapes and at least a minute (the smoothing of a
Grafana panel; Prometheus only learns something new once per scrape anyway); a history
point covers its step plus one scrape, at least four scrapes (Grafana's
``$__rate_interval``).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncGenerator, Callable, Coroutine, Mapping, Sequence
from typing import Any

import httpx
import orjson

from zaiproxy.fleet import promql
from zaiproxy_tui.model import (
    FAILED_POLLS,
    RANGES,
    ZAI_WINDOWS,
    History,
    KeysReport,
    Point,
    QuotaPacing,
    QuotaWindow,
    Snapshot,
    VariantLive,
    ZaiQuota,
)
from zaiproxy_tui.source import (
    BadAnswer,
    Connected,
    NotServed,
    SourceError,
    Unreachable,
    check_status,
    transport_error,
)

REFRESH_S = 2.0  # as the admin API's events
DEFAULT_SCRAPE_S = 15.0  # k8s/base/servicemonitor.yaml
LIVE_WINDOW_MIN_S = 60.0
# How long a target that stopped answering keeps its variant (from its last build_info):
# a pod that stops answering its scrapes stays DOWN on the screen, not gone after a minute.
TARGETS_LOOKBACK_S = 3600.0
# History steps by range: the collector's (fleet/collector.py STEPS), ~60-300 points.
STEPS: dict[str, float] = {"5m": 5, "15m": 15, "1h": 60, "6h": 300, "24h": 900, "7d": 3600}
MAX_QUERIES_IN_FLIGHT = 8  # ~30 small queries per refresh, a few at a time
NEEDS_TOKEN = "Prometheus needs a bearer token: pass --token or press a"
GAUGES = ("in_flight", "streams_in_flight", "concurrency_limit", "adaptive_rate")
# What Z.AI's quota pollers did last is read from their polls over this window: five polls
# at the proxy's default quota_interval (60 s).
QUOTA_POLLS_WINDOW_S = 300.0


class NotInPrometheus(SourceError):
    """What Prometheus cannot answer (per-key usage and limits): the panels show why."""


class PrometheusSource:
    """The variants of a fleet, read from the Prometheus at ``url``: every variant it has
    series of (production and a canary by whatever name: ``canary``, ``test`` ...), or
    only ``names``."""

    def __init__(self, url: str, token: str | None = None, *,
                 names: Sequence[str] = promql.ALL_VARIANTS, interval: float = REFRESH_S,
                 timeout: float = 10.0, clock: Callable[[], float] = time.time) -> None:
        self.url = url.rstrip("/")
        self.token = token or None
        self.names = tuple(names)
        self.interval = interval
        self.clock = clock
        self.scrape_s: float | None = None  # the targets' scrape interval, once read
        self._client = httpx.AsyncClient(base_url=self.url, timeout=timeout,
                                         headers={"user-agent": "zaiproxy-tui"})
        self._slots = asyncio.Semaphore(MAX_QUERIES_IN_FLIGHT)

    def _found(self, *answers: Mapping[str, Any]) -> list[str]:
        """The variants to report: the names asked for, or (every variant asked for) those
        any of the answers has."""
        if self.names != promql.ALL_VARIANTS:
            return list(self.names)
        return sorted({name for answer in answers for name in answer})

    def __repr__(self) -> str:  # never the token
        return f"PrometheusSource({self.url!r}, token={'set' if self.token else 'unset'})"

    def set_token(self, token: str | None) -> None:
        self.token = token or None

    async def aclose(self) -> None:
        await self._client.aclose()

    # ---- HTTP --------------------------------------------------------------------------

    async def _get(self, path: str, params: dict[str, str] | None = None) -> Any:
        async with self._slots:
            try:
                resp = await self._client.get(path, params=params,
                                              headers=promql.auth_headers(self.token))
            except httpx.HTTPError as exc:
                raise Unreachable(transport_error(self.url, exc)) from None
        check_status(resp.status_code, resp.content, path, needs_token=NEEDS_TOKEN)
        try:
            return orjson.loads(resp.content)
        except orjson.JSONDecodeError:
            raise BadAnswer(f"{path}: the answer is not JSON (is {self.url} a "
                            "Prometheus?)") from None

    async def _rows(self, name: str, query: str) -> list[Mapping[str, Any]]:
        """An instant query's series as Prometheus answered them (evaluated now)."""
        doc = await self._get(promql.QUERY_PATH, promql.instant_params(query))
        try:
            return promql.result(doc, "vector")
        except promql.AnswerError as exc:
            raise BadAnswer(f"Prometheus did not answer the {name} query: {exc}") from None

    async def _vector(self, name: str, signal: promql.Signal) \
            -> dict[str, dict[str, float]]:
        rows = await self._rows(name, signal.query)
        try:
            return promql.by_variant(rows, signal.labels)
        except (promql.AnswerError, KeyError, TypeError, ValueError) as exc:
            raise BadAnswer(f"Prometheus did not answer the {name} query: {exc}") from None

    async def _matrix(self, name: str, signal: promql.Signal, start: float, end: float,
                      step: float) -> dict[str, dict[str, dict[float, float]]]:
        doc = await self._get(promql.RANGE_PATH,
                              promql.range_params(signal.query, start, end, step))
        try:
            return promql.series_by_variant(promql.result(doc, "matrix"), signal.labels)
        except (promql.AnswerError, KeyError, TypeError, ValueError) as exc:
            raise BadAnswer(f"Prometheus did not answer the {name} query: {exc}") from None

    async def _vectors(self, signals: Mapping[str, promql.Signal]) \
            -> dict[str, dict[str, dict[str, float]]]:
        answers = await _all(*(self._vector(n, s) for n, s in signals.items()))
        return dict(zip(signals, answers, strict=True))

    async def _targets(self) -> dict[str, promql.Targets]:
        state = promql.dashboard_state(self.names, TARGETS_LOOKBACK_S)
        up, joined = await _all(self._rows("up", state["up"].query),
                                self._rows("targets", state["targets"].query))
        try:
            return promql.count_targets(up, joined)
        except (promql.AnswerError, KeyError, TypeError, ValueError) as exc:
            raise BadAnswer(f"Prometheus did not answer the targets query: {exc}") from None

    async def scrape_interval(self) -> float:
        """The zaiproxy targets' scrape interval (the longest), read once they exist."""
        if self.scrape_s is None:
            state = promql.dashboard_state(self.names, TARGETS_LOOKBACK_S)
            rows = await self._rows("targets", state["targets"].query)
            ours = {(str(r["metric"].get("job")), str(r["metric"].get("instance")))
                    for r in rows}
            if not ours:
                return DEFAULT_SCRAPE_S  # nothing of ours scraped yet: ask again next time
            try:
                found = promql.scrape_interval(
                    await self._get(promql.TARGETS_PATH, {"state": "active"}), ours)
            except (NotServed, BadAnswer):
                found = None  # a query front end without the targets API
            self.scrape_s = found or DEFAULT_SCRAPE_S
        return self.scrape_s

    # ---- the Source protocol ------------------------------------------------------------

    async def events(self) -> AsyncGenerator[Connected | Snapshot, None]:
        await self.scrape_interval()
        yield Connected(self.interval, None)
        previous: float | None = None
        while True:
            at = self.clock()
            yield await self.snapshot(at, self.interval if previous is None else at - previous)
            previous = at
            await asyncio.sleep(max(0.0, self.interval - (self.clock() - at)))

    async def snapshot(self, at: float, seconds: float) -> Snapshot:
        """Every variant now: the live rates stand for the ``seconds`` before ``at``."""
        window = max(LIVE_WINDOW_MIN_S, 4 * await self.scrape_interval())
        versions = promql.dashboard_state(self.names, TARGETS_LOOKBACK_S)["versions"]
        rates, totals, builds, targets, quota = await _all(
            self._vectors(promql.dashboard_rates(self.names, window)),
            self._vectors(promql.dashboard_totals(self.names)),
            self._vector("versions", versions), self._targets(),
            self._vectors(promql.zai_quota(self.names, QUOTA_POLLS_WINDOW_S)))
        variants: dict[str, VariantLive] = {}
        names = self._found(*rates.values(), *totals.values(), targets)
        for name in names:
            r, n = _of(rates, name), _of(totals, name)
            found = targets.get(name)
            if not (r or n or found):
                continue  # nothing of this variant in Prometheus: "no data", not zeros
            gauges = _counts(r)  # the gauges are asked with the rates: their values now
            variants[name] = VariantLive(
                variant=name, totals=_counts(n) | {k: gauges[k] for k in GAUGES},
                in_flight=gauges["in_flight"], streams_in_flight=gauges["streams_in_flight"],
                concurrency_limit=gauges["concurrency_limit"],
                adaptive_rate=gauges["adaptive_rate"], breakdown=_breakdown(n),
                rates=point(at, seconds, r), breakdown_per_s=_breakdown(r),
                versions=tuple(sorted(builds.get(name, {}))),
                targets=found.total if found else None,
                stale_targets=len(found.down) if found else 0)
        down = tuple(d for name in names if name in targets for d in targets[name].down)
        return Snapshot(time=at, source="prometheus", variants=variants,
                        interval=self.interval, stale_targets=down,
                        zai_quota=zai_quota(quota, at))

    async def history(self, range_: str, variant: str) -> History:
        seconds = RANGES.get(range_, 3600)
        scrape = await self.scrape_interval()
        step = max(STEPS.get(range_, 60.0), scrape)
        window = max(step + scrape, 4 * scrape)
        now = self.clock()
        # Aligned to the step: each refresh asks for the same instants, so a plot's old
        # points do not move between refreshes.
        end = math.floor(now / step) * step
        start = end - math.ceil(seconds / step) * step
        asked = self.names if variant == "all" else (variant,)
        signals = promql.dashboard_rates(asked, window)
        answers = dict(zip(signals, await _all(
            *(self._matrix(n, s, start, end, step) for n, s in signals.items())), strict=True))
        series: dict[str, tuple[Point, ...]] = {}
        names = (self._found(*answers.values()) if asked == promql.ALL_VARIANTS
                 else list(asked))
        for name in names:
            by_signal = {k: a.get(name, {}) for k, a in answers.items()}
            instants = sorted({t for keys in by_signal.values() for ts in keys.values()
                               for t in ts})
            series[name] = tuple(
                point(t, step, {k: {key: ts[t] for key, ts in keys.items() if t in ts}
                                for k, keys in by_signal.items()})
                for t in instants)
        return History(range_, start, end, step, series, "prometheus",
                       f"Prometheus, {step:g} s steps, rates over {window:g} s")

    async def keys(self) -> KeysReport:
        quota = await self._vector("quota", promql.quota_used(self.names))
        used = [f"{name} {limit.partition(':')[2]} {share:.0%}"
                for name in self._found(quota)
                for limit, share in sorted(quota.get(name, {}).items())]
        raise NotInPrometheus(
            "per-key usage and limits are not in Prometheus (zaiproxy tui --url a proxy shows "
            "them); " + ("quota windows used, busiest pod: " + ", ".join(used) if used
                         else "no rolling-window quota is configured"))


async def _all(*aws: Coroutine[Any, Any, Any]) -> list[Any]:
    """Every answer, or the first failure with the others' queries cancelled (a dead
    Prometheus fails ~30 queries at once: one of them is the reason)."""
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(a) for a in aws]
    except BaseExceptionGroup as failed:
        raise _first(failed) from None
    return [t.result() for t in tasks]


def _first(group: BaseExceptionGroup[BaseException]) -> BaseException:
    first = group.exceptions[0]
    return _first(first) if isinstance(first, BaseExceptionGroup) else first


# ---- answers -> the model -----------------------------------------------------------------


def _of(answers: Mapping[str, Mapping[str, Mapping[str, float]]], variant: str) \
        -> dict[str, Mapping[str, float]]:
    """One variant's values of every signal that has any."""
    return {k: a[variant] for k, a in answers.items() if a.get(variant)}


def _one(values: Mapping[str, Mapping[str, float]], name: str) -> float | None:
    return values.get(name, {}).get("")


def _counts(values: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """The admin API's counters (``promql.counts``) and gauges, from either the rates or
    the totals: a family Prometheus has no series of reads as 0."""
    limits = values.get("concurrency_limit", {})
    return {
        **promql.counts(values),
        "in_flight": _one(values, "in_flight") or 0.0,
        "streams_in_flight": _one(values, "streams_in_flight") or 0.0,
        # The proxy's own limit is what its in-flight count runs into first (as snapshot.py).
        "concurrency_limit": limits.get("proxy") or limits.get("upstream") or 0.0,
        "adaptive_rate": _one(values, "adaptive_rate") or 0.0,
    }


def point(t: float, seconds: float, values: Mapping[str, Mapping[str, float]]) -> Point:
    """One variant's rates (``promql.dashboard_rates`` by signal and key) as a Point; the
    failures by kind as the admin API defines them (``snapshot.failures``)."""
    c = _counts(values)
    r429, rejections = c["responses_429"], c["rejections"]
    return Point(
        t=t, seconds=seconds, requests=c["requests"], r2xx=c["responses_2xx"],
        r4xx=c["responses_4xx"], r429=r429, r5xx=c["responses_5xx"],
        latency_p50=_one(values, "latency_p50"), latency_p95=_one(values, "latency_p95"),
        latency_p99=_one(values, "latency_p99"), ttft_p50=_one(values, "ttft_p50"),
        ttft_p95=_one(values, "ttft_p95"), ttft_p99=_one(values, "ttft_p99"),
        tokens_in=c["tokens_in"], tokens_out=c["tokens_out"], cost=c["cost_usd"],
        in_flight=c["in_flight"], concurrency_limit=c["concurrency_limit"],
        retries=c["retries"], zai_errors=c["zai_errors"],
        upstream_errors=c["upstream_errors"], rejections=rejections,
        proxy_429=rejections, zai_429=max(0.0, r429 - rejections),
        other_4xx=max(0.0, c["responses_4xx"] - r429))


def _breakdown(values: Mapping[str, Mapping[str, float]]) -> dict[str, dict[str, float]]:
    """The admin API's breakdown categories (``snapshot.BREAKDOWNS``): Z.AI's errors by
    code and by class (the query keys them ``class:code``), the rest as queried."""
    zai = values.get("zai_errors", {})
    by_code: dict[str, float] = {}
    by_class: dict[str, float] = {}
    for key, n in zai.items():
        cls, _, code = key.partition(":")
        by_code[code] = by_code.get(code, 0.0) + n
        by_class[cls] = by_class.get(cls, 0.0) + n
    out = {k: dict(values.get(k, {})) for k in ("status", "upstream_errors", "rejections",
                                                "retries", "adjustments")}
    return out | {"zai_errors": by_code, "zai_error_classes": by_class}


# ---- Z.AI's quota -----------------------------------------------------------------------------

# How the gauges of several pods (and variants) of one upstream key combine: the busiest
# pod's used share and latest reset, the freshest sample, the polls of all, the lowest paced
# rate, a gate closed anywhere.
_COMBINE: dict[str, Callable[[float, float], float]] = {
    "usage": max, "reset": max, "sample_age": min, "polls": lambda a, b: a + b,
    "rate_cap": min, "gate_open": min}


def zai_quota(answers: Mapping[str, Mapping[str, Mapping[str, float]]], at: float) \
        -> tuple[ZaiQuota, ...]:
    """Z.AI's quota per upstream key from :func:`promql.zai_quota`'s answers (signal ->
    variant -> key -> value) evaluated at ``at``, every variant's pods together (they poll the same accounts).
    Staleness is not in the gauges: a poller whose polls over the window were all failures
    is ``failing``, one that counted a stale transition and no success is stale, and
    otherwise :attr:`ZaiQuota.is_stale` judges the sample's age. () when Prometheus has no
    quota series (no pod polls)."""
    merged: dict[str, dict[str, float]] = {}
    for name, by_variant in answers.items():
        into = merged.setdefault(name, {})
        for values in by_variant.values():
            for key, value in values.items():
                into[key] = _COMBINE[name](into[key], value) if key in into else value
    by_alias: dict[str, dict[str, dict[str, float]]] = {}
    for name, values in merged.items():
        for key, value in values.items():
            alias, _, rest = key.partition(":")
            by_alias.setdefault(alias, {}).setdefault(name, {})[rest] = value
    return tuple(_entry("default" if alias == "-" else alias, signals, at)
                 for alias, signals in sorted(by_alias.items()))


def _entry(alias: str, signals: Mapping[str, Mapping[str, float]], at: float) -> ZaiQuota:
    resets = signals.get("reset", {})
    order = {w: i for i, w in enumerate(ZAI_WINDOWS)}
    windows = []
    for key, used in signals.get("usage", {}).items():
        window, _, limit_type = key.partition(":")
        reset_at = resets.get(window)
        windows.append(QuotaWindow(window, min(1.0, max(0.0, used)),
                                   limit_type.upper() if limit_type not in ("", "-") else None,
                                   reset_at, None if reset_at is None
                                   else max(0.0, reset_at - at)))
    windows.sort(key=lambda w: (order.get(w.window, len(order)), w.window))
    polls = dict(signals.get("polls", {}))
    ok = polls.get("success", 0.0)
    failed = {k: polls.get(k, 0.0) for k in FAILED_POLLS}
    worst = max(failed, key=lambda k: failed[k])
    outcome = ("success" if ok > 0 and not any(failed.values())
               else worst if ok == 0 and failed[worst] > 0 else None)  # both: order unknown
    age = signals.get("sample_age", {}).get("")
    gates = signals.get("gate_open", {})
    closed = next((w for w in ZAI_WINDOWS if gates.get(w, 1.0) < 1.0), None)
    pacing = None
    if gates or "rate_cap" in signals:
        pacing = QuotaPacing(enabled=True, rate_rps=signals.get("rate_cap", {}).get(""),
                             reserve_reached=closed is not None, window=closed,
                             closed_until=resets.get(closed) if closed else None)
    return ZaiQuota(
        upstream=alias, stale=True if polls.get("stale", 0.0) > 0 and ok == 0 else None,
        last_outcome=outcome, sample_age_s=age,
        last_success_at=None if age is None else at - age, polls=polls,
        windows=tuple(windows), pacing=pacing)
