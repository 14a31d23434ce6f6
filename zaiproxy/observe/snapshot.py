"""What one ``/metrics`` scrape says, per variant, and the rates between two scrapes (pure).

``parse`` reads a Prometheus text exposition of the proxy (the ``zai_proxy_*``
families, ``variant`` on every series) into one ``VariantSnapshot`` per
variant: counter totals, gauges, the latency and time-to-first-token
histograms merged over their other labels, and the build versions. A family
that is missing reads as zeros (an older proxy, a family not yet observed),
never as an error; only text that is not an exposition raises ``ParseError``.

Only API traffic is counted in ``requests``, the ``responses_*``, the status
breakdown and the latency histogram, so scrapes, probes and dashboards (an
``/admin/events`` stream lasts as long as its viewer) never show up as request
rate or latency. The proxy decides what is API traffic from each request's
record (``RequestRecord.api``, in ``metrics.py``): its request families hold API
requests only, control routes have families of their own
(``zai_proxy_control_*``), and this module counts the request families whole.
An exposition without those control families comes from a build that counted
control routes in the request families (an older zaiproxy that a collector still
scrapes during a rollout): there, and only there, the series whose ``path`` is
one of the control routes of that time (:data:`LEGACY_CONTROL_PATHS`) are
skipped. ``breakdown`` keeps bounded label-keyed totals (by status, Z.AI code
and class, upstream error type, rejection, retry reason, adaptive adjustment)
for the views that need more than one number.

``delta`` turns two snapshots of one variant into ``Rates`` the way
Prometheus' ``rate`` and ``histogram_quantile`` would over that interval:
- a counter that went *down* means the process restarted, so the new value is
  the increase (Prometheus' counter-reset rule). Because the proxy's counters
  live in one shared-memory segment, a restart resets every family at once:
  when any counter, breakdown label or histogram count went down, every
  counter is taken as reset, so a counter that already grew past its old
  value is not under-counted.
- quantiles interpolate linearly inside the bucket that holds the rank, the
  ``+Inf`` bucket answers the highest finite bound, and an interval without
  observations has no quantile (``None``, Prometheus' NaN) — exactly
  ``promql/quantile.go``'s ``bucketQuantile``.

Used by the fleet collector (``collector.py``) and by the proxy's own
``/admin/status`` (``admin.py``). JSON has no infinity, so histograms are
written as their finite bounds plus one more cumulative count for ``+Inf``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

INF = math.inf
QUANTILES = (0.5, 0.95, 0.99)
# Series without a ``variant`` label (an exposition from an older build): they
# belong to the only variant present, else to this one.
UNKNOWN_VARIANT = "unknown"
# A current proxy counts its control routes in these families (metrics.CONTROL_REQUESTS):
# their presence says the request families hold API traffic only.
CONTROL_FAMILY = "zai_proxy_control_requests"
# The control routes (scrapes, probes, the admin API) of builds without CONTROL_FAMILY, whose
# request families mixed them in; also what tells them apart in history rows written before
# the record carried its API (recorder/schema.py). A fixed fact about old data: never extended.
LEGACY_CONTROL_PATHS = frozenset({"/metrics", "/health", "/ready"})
LEGACY_CONTROL_PREFIX = "/admin"
# The breakdown categories, always all present (a missing family reads as empty).
BREAKDOWNS = ("status", "zai_errors", "zai_error_classes", "upstream_errors", "rejections",
              "retries", "adjustments")
# The proxy's labels are bounded already (statuses, 13xx codes, its own error types); this
# bounds what a foreign or broken exposition can make every snapshot carry. Labels past the
# first ones in sorted order are summed into ``other``.
MAX_BREAKDOWN_LABELS = 64
OVERFLOW_LABEL = "other"

Breakdown = Mapping[str, Mapping[str, float]]


class ParseError(ValueError):
    """The text is not a Prometheus exposition."""


@dataclass(frozen=True, slots=True)
class Histogram:
    """Cumulative bucket counts by ascending upper bound; the last bound is ``+Inf``."""

    bounds: tuple[float, ...] = ()
    counts: tuple[float, ...] = ()
    sum: float = 0.0

    @property
    def count(self) -> float:
        return self.counts[-1] if self.counts else 0.0

    @classmethod
    def from_buckets(cls, buckets: Mapping[float, float], total: float = 0.0,
                     count: float | None = None) -> Histogram:
        """From ``{le: cumulative count}``; adds a missing ``+Inf`` bucket and, like
        Prometheus, forces the counts monotonic (series scraped mid-update)."""
        if not buckets and not count:
            return cls(sum=total)
        items = dict(buckets)
        if INF not in items:
            items[INF] = max([count or 0.0, *items.values()])
        bounds = tuple(sorted(items))
        counts: list[float] = []
        running = 0.0
        for bound in bounds:
            running = max(running, items[bound])
            counts.append(running)
        return cls(bounds, tuple(counts), total)

    def _at(self, bound: float) -> float:
        """Cumulative count at ``bound``: the count of the largest own bound <= it."""
        value = 0.0
        for own, count in zip(self.bounds, self.counts, strict=True):
            if own > bound:
                break
            value = count
        return value

    def plus(self, other: Histogram, scale: float = 1.0) -> Histogram:
        """This histogram plus ``scale`` times ``other``. Different bucket layouts
        (two builds) merge on the union of bounds, each series read as a step
        function, so no observation is placed above where it was counted."""
        if not other.counts:
            return self
        if not self.counts:
            return Histogram(other.bounds, tuple(c * scale for c in other.counts),
                             other.sum * scale)
        if self.bounds == other.bounds:
            counts = tuple(a + b * scale for a, b in zip(self.counts, other.counts, strict=True))
            return Histogram(self.bounds, counts, self.sum + other.sum * scale)
        bounds = tuple(sorted(set(self.bounds) | set(other.bounds)))
        counts = tuple(self._at(b) + other._at(b) * scale for b in bounds)
        return Histogram(bounds, counts, self.sum + other.sum * scale)

    def minus(self, prev: Histogram) -> Histogram:
        """The increase since ``prev`` (same series, no reset: the caller checks)."""
        if not prev.counts:
            return self
        counts = tuple(max(0.0, self._at(b) - prev._at(b)) for b in self.bounds)
        return Histogram(self.bounds, counts, max(0.0, self.sum - prev.sum))

    def went_down(self, prev: Histogram) -> bool:
        return self.count < prev.count or self.sum < prev.sum

    def quantile(self, q: float) -> float | None:
        """``histogram_quantile(q, ...)`` over these buckets; None when there is no data."""
        if len(self.bounds) < 2 or self.count <= 0 or not math.isinf(self.bounds[-1]):
            return None
        if q < 0:
            return -INF
        if q > 1:
            return INF
        rank = q * self.count
        last = len(self.bounds) - 1
        b = next((i for i in range(last) if self.counts[i] >= rank), last)
        if b == last:
            return self.bounds[-2]
        if b == 0 and self.bounds[0] <= 0:
            return self.bounds[0]
        start, end, count = 0.0, self.bounds[b], self.counts[b]
        if b > 0:
            start = self.bounds[b - 1]
            count -= self.counts[b - 1]
            rank -= self.counts[b - 1]
        return start + (end - start) * (rank / count)

    def to_json(self) -> dict[str, Any]:
        finite = [b for b in self.bounds if not math.isinf(b)]
        return {"bounds": finite, "counts": list(self.counts), "sum": self.sum}


@dataclass(frozen=True, slots=True)
class Counts:
    """The counters of one variant: totals in a snapshot, increases in ``Rates``."""

    requests: float = 0.0
    responses_2xx: float = 0.0
    responses_4xx: float = 0.0
    responses_5xx: float = 0.0
    responses_429: float = 0.0
    upstream_errors: float = 0.0
    rejections: float = 0.0
    # Z.AI's 429 answers received, each attempt counted, retried or relayed
    # (zai_proxy_zai_errors_total); ``retries``: the ones the proxy waited out and sent
    # again (zai_proxy_retry_attempts_total, every reason). The recorder's history counts
    # the same two from its rows (recorder/queries.py ZAI_ERRORS_SQL): one meaning for the
    # words "Z.AI errors" and "retries" on a proxy, its history and a collector.
    zai_errors: float = 0.0
    tokens_in: float = 0.0
    tokens_out: float = 0.0
    tokens_cache: float = 0.0
    cost_usd: float = 0.0
    # 2xx answers whose upstream sent no usage (tokens estimated): token-count health.
    usage_missing: float = 0.0
    retries: float = 0.0  # last: a collector's rows add columns in this order

    def to_json(self) -> dict[str, float]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


COUNT_NAMES = tuple(f.name for f in fields(Counts))

# What failed for the client, by kind: every API answer that was not a success falls in one
# (a 5xx, the proxy's own 429, Z.AI's 429 relayed, any other 4xx). One definition for the
# proxy's /admin/status, the collector and every screen that shows them.
FAILURE_KINDS = ("5xx", "proxy_429", "zai_429", "other_4xx")


def failures(c: Counts) -> dict[str, float]:
    """Failed answers of ``c`` by kind (counts, or increases, or rates: linear in ``c``).

    The proxy's 429s are its rejections (``zai_proxy_rate_limit_rejections_total``); Z.AI's
    are the other 429 answers (relayed after the retries); ``other_4xx`` excludes every 429.
    """
    return {"5xx": c.responses_5xx, "proxy_429": c.rejections,
            "zai_429": max(0.0, c.responses_429 - c.rejections),
            "other_4xx": max(0.0, c.responses_4xx - c.responses_429)}


def failure_shares(c: Counts) -> dict[str, float]:
    """:func:`failures` as shares of the requests (0 with no requests)."""
    return {k: (v / c.requests if c.requests > 0 else 0.0) for k, v in failures(c).items()}


def _add_counts(a: Counts, b: Counts, scale: float = 1.0) -> Counts:
    return Counts(*(getattr(a, n) + getattr(b, n) * scale for n in COUNT_NAMES))


def freeze_breakdown(raw: Mapping[str, Mapping[str, float]]) -> Breakdown:
    """Every category of ``BREAKDOWNS`` (unknown ones dropped), labels sorted and bounded."""
    out: dict[str, Mapping[str, float]] = {}
    for category in BREAKDOWNS:
        items = sorted(raw.get(category, {}).items())
        if len(items) > MAX_BREAKDOWN_LABELS:
            kept = dict(items[:MAX_BREAKDOWN_LABELS - 1])
            overflow = sum(v for _, v in items[MAX_BREAKDOWN_LABELS - 1:])
            kept[OVERFLOW_LABEL] = kept.get(OVERFLOW_LABEL, 0.0) + overflow
            items = sorted(kept.items())
        out[category] = MappingProxyType(dict(items))
    return MappingProxyType(out)


EMPTY_BREAKDOWN: Breakdown = freeze_breakdown({})


def _add_breakdowns(parts: Iterable[tuple[Breakdown, float]]) -> Breakdown:
    """The label-wise sum of ``scale`` times each breakdown."""
    total: dict[str, dict[str, float]] = {c: {} for c in BREAKDOWNS}
    for breakdown, scale in parts:
        for category, labels in breakdown.items():
            into = total.setdefault(category, {})
            for label, value in labels.items():
                into[label] = into.get(label, 0.0) + value * scale
    return freeze_breakdown(total)


def _breakdown_json(breakdown: Breakdown, divisor: float = 1.0) -> dict[str, dict[str, float]]:
    if divisor <= 0:
        return {c: dict.fromkeys(labels, 0.0) for c, labels in breakdown.items()}
    return {c: {k: v / divisor for k, v in labels.items()} for c, labels in breakdown.items()}


@dataclass(frozen=True, slots=True)
class VariantSnapshot:
    """One variant's state in one exposition (or several merged: ``merge``)."""

    variant: str
    counts: Counts = field(default_factory=Counts)
    in_flight: float = 0.0
    streams_in_flight: float = 0.0
    adaptive_rate: float = 0.0  # requests/s the adaptive limiter allows upstream; 0 = not limiting
    latency: Histogram = field(default_factory=Histogram)
    ttft: Histogram = field(default_factory=Histogram)
    versions: tuple[str, ...] = ()
    commits: tuple[str, ...] = ()
    concurrency_limit: float = 0.0  # the configured global limit (proxy, else upstream); 0 = none
    workers: float = 0.0  # worker processes (summed over targets by ``merge``)
    # category -> label -> total; read-only mappings, so left out of the hash.
    breakdown: Breakdown = field(default_factory=lambda: EMPTY_BREAKDOWN, hash=False)

    def to_json(self) -> dict[str, Any]:
        return {
            "variant": self.variant, **self.counts.to_json(),
            "in_flight": self.in_flight, "streams_in_flight": self.streams_in_flight,
            "adaptive_rate": self.adaptive_rate, "concurrency_limit": self.concurrency_limit,
            "workers": self.workers, "breakdown": _breakdown_json(self.breakdown),
            # Since the counters began: what failed for the clients, by kind (and shares).
            "failures": failures(self.counts), "failure_shares": failure_shares(self.counts),
            "latency_seconds": self.latency.to_json(), "ttft_seconds": self.ttft.to_json(),
            "versions": list(self.versions), "commits": list(self.commits),
        }


@dataclass(frozen=True, slots=True)
class Rates:
    """What happened to one variant over ``seconds``: increases, gauges at the end, quantiles."""

    variant: str
    seconds: float
    increase: Counts = field(default_factory=Counts)
    latency: Histogram = field(default_factory=Histogram)  # bucket increases
    ttft: Histogram = field(default_factory=Histogram)
    in_flight: float = 0.0
    streams_in_flight: float = 0.0
    adaptive_rate: float = 0.0
    versions: tuple[str, ...] = ()
    reset: bool = False  # a counter reset (process restart) fell in this interval
    concurrency_limit: float = 0.0
    workers: float = 0.0
    # category -> label -> increase (as ``VariantSnapshot.breakdown``)
    breakdown: Breakdown = field(default_factory=lambda: EMPTY_BREAKDOWN, hash=False)

    def per_second(self, name: str) -> float:
        return getattr(self.increase, name) / self.seconds if self.seconds > 0 else 0.0

    @property
    def error_rate(self) -> float:
        """Share of answered requests that were 5xx (what canary rollbacks compare)."""
        inc = self.increase
        return inc.responses_5xx / inc.requests if inc.requests > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        ps = self.per_second
        out: dict[str, Any] = {
            "variant": self.variant, "seconds": self.seconds, "reset": self.reset,
            "requests": self.increase.requests,
            "requests_per_s": ps("requests"),
            "ok_per_s": ps("responses_2xx"),
            "errors_per_s": ps("responses_5xx"),
            "error_rate": self.error_rate,
            "client_errors_per_s": ps("responses_4xx"),
            "rate_limited_per_s": ps("responses_429"),
            "upstream_errors_per_s": ps("upstream_errors"),
            "rejections_per_s": ps("rejections"),
            "zai_errors_per_s": ps("zai_errors"),
            "retries_per_s": ps("retries"),
            "tokens_in_per_s": ps("tokens_in"),
            "tokens_out_per_s": ps("tokens_out"),
            "tokens_cache_per_s": ps("tokens_cache"),
            "cost_usd_per_s": ps("cost_usd"),
            "usage_missing_per_s": ps("usage_missing"),
            "failure_shares": failure_shares(self.increase),
            "breakdown_per_s": _breakdown_json(self.breakdown, self.seconds),
        }
        for q in QUANTILES:
            out[f"latency_p{round(q * 100)}_s"] = self.latency.quantile(q)
        for q in QUANTILES:
            out[f"ttft_p{round(q * 100)}_s"] = self.ttft.quantile(q)
        out.update(in_flight=self.in_flight, streams_in_flight=self.streams_in_flight,
                   adaptive_rate=self.adaptive_rate, concurrency_limit=self.concurrency_limit,
                   workers=self.workers, versions=list(self.versions))
        return out


# ---- parsing ---------------------------------------------------------------------

_COUNTERS = {
    "zai_proxy_upstream_errors_total": "upstream_errors",
    "zai_proxy_rate_limit_rejections_total": "rejections",
    "zai_proxy_zai_errors_total": "zai_errors",
    "zai_proxy_estimated_cost_usd_total": "cost_usd",
    "zai_proxy_usage_missing_total": "usage_missing",
    "zai_proxy_retry_attempts_total": "retries",
}
_GAUGES_SUMMED = {"zai_proxy_concurrent_requests": "in_flight",
                  "zai_proxy_streams_in_flight": "streams_in_flight",
                  "zai_proxy_worker_processes": "workers"}
# zaiproxy builds before WORKERS_FAMILY published their worker processes as
# zai_proxy_max_workers, the name a current build gives the original's concurrency cap (the
# original service too). Such a build is told apart by LEDGER_FAMILY, which every zaiproxy
# build has and the original never had: a collector scraping one mid-rollout still counts
# its workers, and never takes a cap for them.
WORKERS_FAMILY = "zai_proxy_worker_processes"
LEDGER_FAMILY = "zai_proxy_ledger_info"
LEGACY_WORKERS = "zai_proxy_max_workers"
# family sample -> (category, the labels its key is made of, joined by ":")
_BREAKDOWN_SOURCES: dict[str, tuple[tuple[str, tuple[str, ...]], ...]] = {
    "zai_proxy_zai_errors_total": (("zai_errors", ("code",)), ("zai_error_classes", ("class",))),
    "zai_proxy_upstream_errors_total": (("upstream_errors", ("error_type",)),),
    "zai_proxy_rate_limit_rejections_total": (("rejections", ("scope", "limit")),),
    "zai_proxy_retry_attempts_total": (("retries", ("reason",)),),
    "zai_proxy_rate_limit_adjustments_total": (("adjustments", ("direction",)),),
}
_HISTOGRAMS = {"zai_proxy_request_duration_seconds": "latency",
               "zai_proxy_time_to_first_token_seconds": "ttft"}
# Histograms of requests by path: where a legacy exposition mixed control routes in.
_API_HISTOGRAMS = frozenset({"latency"})
_TOKEN_DIRECTIONS = {"input": "tokens_in", "in": "tokens_in", "prompt": "tokens_in",
                     "output": "tokens_out", "out": "tokens_out", "completion": "tokens_out"}


class _Acc:
    """Mutable accumulator for one variant while parsing."""

    def __init__(self) -> None:
        self.counts: dict[str, float] = dict.fromkeys(COUNT_NAMES, 0.0)
        self.gauges: dict[str, float] = {"in_flight": 0.0, "streams_in_flight": 0.0,
                                         "adaptive_rate": 0.0, "workers": 0.0}
        self.breakdown: dict[str, dict[str, float]] = {c: {} for c in BREAKDOWNS}
        self.concurrency: dict[str, float] = {}  # configured limit by scope
        # histogram -> series (labels other than le) -> {le: count}, plus _sum per series
        self.buckets: dict[str, dict[tuple[tuple[str, str], ...], dict[float, float]]] = {
            "latency": {}, "ttft": {}}
        self.sums: dict[str, dict[tuple[tuple[str, str], ...], float]] = {"latency": {},
                                                                         "ttft": {}}
        self.versions: set[str] = set()
        self.commits: set[str] = set()

    def add(self, name: str, labels: dict[str, str], value: float, legacy: bool,
            legacy_workers: bool = False) -> None:
        """One sample; ``legacy``: the exposition mixes control routes into the request
        families (module docstring); ``legacy_workers``: its ``zai_proxy_max_workers`` counts
        worker processes (:data:`WORKERS_FAMILY`)."""
        if math.isnan(value):
            return
        c = self.counts
        for category, keys in _BREAKDOWN_SOURCES.get(name, ()):
            self._count(category, ":".join(labels.get(k) or "-" for k in keys), value)
        if name == "zai_proxy_requests_total":
            if legacy and _legacy_control(labels):
                return
            c["requests"] += value
            status = labels.get("status", "")
            if status:
                self._count("status", status, value)
            if status[:1] in ("2", "4", "5") and status.isdigit():
                c[f"responses_{status[0]}xx"] += value
            if status == "429":
                c["responses_429"] += value
        elif name in _COUNTERS:
            c[_COUNTERS[name]] += value
        elif name == "zai_proxy_tokens_total":
            direction = labels.get("direction", "").lower()
            target = "tokens_cache" if "cache" in direction else _TOKEN_DIRECTIONS.get(direction)
            if target is not None:
                c[target] += value
        elif name in _GAUGES_SUMMED:
            self.gauges[_GAUGES_SUMMED[name]] += value
        elif name == LEGACY_WORKERS and legacy_workers:
            self.gauges["workers"] += value
        elif name == "zai_proxy_rate_limit_requests_per_second":
            # One rate shared by all workers: several series repeat it, never add up.
            self.gauges["adaptive_rate"] = max(self.gauges["adaptive_rate"], value)
        elif name == "zai_proxy_concurrency_limit":
            scope = labels.get("scope", "")
            self.concurrency[scope] = max(self.concurrency.get(scope, 0.0), value)
        elif name == "zai_proxy_build_info":
            if labels.get("version"):
                self.versions.add(labels["version"])
            if labels.get("commit"):
                self.commits.add(labels["commit"])
        else:
            base, _, suffix = name.rpartition("_")
            hist = _HISTOGRAMS.get(base)
            if hist is None or (legacy and hist in _API_HISTOGRAMS and _legacy_control(labels)):
                return
            series = tuple(sorted((k, v) for k, v in labels.items() if k != "le"))
            if suffix == "bucket" and "le" in labels:
                try:
                    bound = float(labels["le"])
                except ValueError:
                    return
                self.buckets[hist].setdefault(series, {})[bound] = value
            elif suffix == "sum":
                self.sums[hist][series] = value

    def _count(self, category: str, label: str, value: float) -> None:
        into = self.breakdown[category]
        into[label] = into.get(label, 0.0) + value

    def merge_from(self, other: _Acc) -> None:
        for k, v in other.counts.items():
            self.counts[k] += v
        for category, labels in other.breakdown.items():
            for label, value in labels.items():
                self._count(category, label, value)
        for scope, limit in other.concurrency.items():
            self.concurrency[scope] = max(self.concurrency.get(scope, 0.0), limit)
        for k in ("in_flight", "streams_in_flight", "workers"):
            self.gauges[k] += other.gauges[k]
        self.gauges["adaptive_rate"] = max(self.gauges["adaptive_rate"],
                                           other.gauges["adaptive_rate"])
        for hist in ("latency", "ttft"):
            self.buckets[hist].update(other.buckets[hist])
            self.sums[hist].update(other.sums[hist])
        self.versions |= other.versions
        self.commits |= other.commits

    def histogram(self, hist: str) -> Histogram:
        out = Histogram()
        for series, buckets in sorted(self.buckets[hist].items()):
            out = out.plus(Histogram.from_buckets(buckets, self.sums[hist].get(series, 0.0)))
        return out

    def snapshot(self, variant: str) -> VariantSnapshot:
        return VariantSnapshot(
            variant=variant, counts=Counts(**self.counts),
            in_flight=self.gauges["in_flight"],
            streams_in_flight=self.gauges["streams_in_flight"],
            adaptive_rate=self.gauges["adaptive_rate"],
            latency=self.histogram("latency"), ttft=self.histogram("ttft"),
            versions=tuple(sorted(self.versions)), commits=tuple(sorted(self.commits)),
            # The proxy's own limit is what its in-flight count runs into first.
            concurrency_limit=self.concurrency.get("proxy", self.concurrency.get("upstream", 0.0)),
            workers=self.gauges["workers"], breakdown=freeze_breakdown(self.breakdown))


def _legacy_control(labels: Mapping[str, str]) -> bool:
    path = labels.get("path", "")
    return path in LEGACY_CONTROL_PATHS or path.startswith(LEGACY_CONTROL_PREFIX)


def parse(text: str) -> dict[str, VariantSnapshot]:
    """One snapshot per variant named in the exposition (sorted by variant)."""
    try:
        return parse_families(text_string_to_metric_families(text))
    except (ValueError, TypeError, IndexError, KeyError) as exc:
        raise ParseError(f"not a Prometheus exposition: {exc}") from exc


def parse_families(families: Iterable[Any]) -> dict[str, VariantSnapshot]:
    """``parse`` over metric families (a registry's ``collect()``) instead of text.

    A proxy's own ``/admin/status`` and ``/admin/events`` use this: the text round trip
    (render, then prometheus-client's parser) cost ~10 ms per snapshot on the worker's
    loop, the families ~1 ms.
    """
    families = list(families)
    names = {family.name for family in families}
    legacy = CONTROL_FAMILY not in names
    legacy_workers = LEDGER_FAMILY in names and WORKERS_FAMILY not in names
    by_variant: dict[str, _Acc] = {}
    unlabelled = _Acc()
    seen_unlabelled = False
    for family in families:
        for sample in family.samples:
            if not sample.name.startswith("zai_proxy_"):
                continue
            variant = sample.labels.get("variant")
            if variant:
                acc = by_variant.get(variant)
                if acc is None:
                    acc = by_variant[variant] = _Acc()
            else:
                acc, seen_unlabelled = unlabelled, True
            acc.add(sample.name, sample.labels, float(sample.value), legacy, legacy_workers)
    if seen_unlabelled:
        if len(by_variant) == 1:
            next(iter(by_variant.values())).merge_from(unlabelled)
        else:
            by_variant.setdefault(UNKNOWN_VARIANT, _Acc()).merge_from(unlabelled)
    return {name: by_variant[name].snapshot(name) for name in sorted(by_variant)}


# ---- arithmetic --------------------------------------------------------------------


def delta(prev: VariantSnapshot, cur: VariantSnapshot, seconds: float) -> Rates:
    """The rates of one variant between two scrapes ``seconds`` apart."""
    p, c = prev.counts, cur.counts
    reset = (any(getattr(c, n) < getattr(p, n) for n in COUNT_NAMES)
             or _breakdown_went_down(prev.breakdown, cur.breakdown)
             or cur.latency.went_down(prev.latency) or cur.ttft.went_down(prev.ttft))
    if reset:
        increase, latency, ttft, breakdown = c, cur.latency, cur.ttft, cur.breakdown
    else:
        increase = Counts(*(getattr(c, n) - getattr(p, n) for n in COUNT_NAMES))
        latency, ttft = cur.latency.minus(prev.latency), cur.ttft.minus(prev.ttft)
        breakdown = freeze_breakdown({
            category: {label: value - prev.breakdown.get(category, {}).get(label, 0.0)
                       for label, value in labels.items()}
            for category, labels in cur.breakdown.items()})
    return Rates(variant=cur.variant, seconds=max(0.0, seconds), increase=increase,
                 latency=latency, ttft=ttft, in_flight=cur.in_flight,
                 streams_in_flight=cur.streams_in_flight, adaptive_rate=cur.adaptive_rate,
                 versions=cur.versions, reset=reset, concurrency_limit=cur.concurrency_limit,
                 workers=cur.workers, breakdown=breakdown)


def _breakdown_went_down(prev: Breakdown, cur: Breakdown) -> bool:
    """A label whose total went down. A label gone from ``cur`` is a series that vanished
    (Prometheus ignores those), not a reset: a restart shows in the labels that remain."""
    return any(value < prev.get(category, {}).get(label, 0.0)
               for category, labels in cur.items() for label, value in labels.items())


def merge(variant: str, snapshots: Iterable[VariantSnapshot]) -> VariantSnapshot:
    """Several targets' snapshots of one variant as one (totals and gauges summed)."""
    items = list(snapshots)
    counts, latency, ttft = Counts(), Histogram(), Histogram()
    in_flight = streams = rate = workers = 0.0
    versions: set[str] = set()
    commits: set[str] = set()
    for s in items:
        counts = _add_counts(counts, s.counts)
        latency, ttft = latency.plus(s.latency), ttft.plus(s.ttft)
        in_flight += s.in_flight
        streams += s.streams_in_flight
        rate += s.adaptive_rate  # each replica's limiter admits its own rate
        workers += s.workers
        versions.update(s.versions)
        commits.update(s.commits)
    return VariantSnapshot(
        variant, counts, in_flight, streams, rate, latency, ttft, tuple(sorted(versions)),
        tuple(sorted(commits)), concurrency_limit=_fleet_limit(s.concurrency_limit for s in items),
        workers=workers, breakdown=_add_breakdowns((s.breakdown, 1.0) for s in items))


def _fleet_limit(limits: Iterable[float]) -> float:
    """Each replica enforces its own global limit, so the fleet's is their sum; one replica
    without a limit (0) leaves the fleet without one."""
    values = list(limits)
    return sum(values) if values and all(v > 0 for v in values) else 0.0


def combine(variant: str, rates: Iterable[Rates]) -> Rates:
    """Several targets' rates of one variant as one, like ``sum(rate(...))``.

    Each target's increase is scaled to the longest interval among them, so the
    per-second rates add up and the bucket increases are weighted by rate.
    """
    items = [r for r in rates if r.seconds > 0]
    if not items:
        return Rates(variant=variant, seconds=0.0)
    window = max(r.seconds for r in items)
    increase, latency, ttft = Counts(), Histogram(), Histogram()
    in_flight = streams = adaptive = workers = 0.0
    versions: set[str] = set()
    for r in items:
        scale = window / r.seconds
        increase = _add_counts(increase, r.increase, scale)
        latency, ttft = latency.plus(r.latency, scale), ttft.plus(r.ttft, scale)
        in_flight += r.in_flight
        streams += r.streams_in_flight
        adaptive += r.adaptive_rate
        workers += r.workers
        versions.update(r.versions)
    return Rates(variant=variant, seconds=window, increase=increase, latency=latency, ttft=ttft,
                 in_flight=in_flight, streams_in_flight=streams, adaptive_rate=adaptive,
                 versions=tuple(sorted(versions)), reset=any(r.reset for r in items),
                 concurrency_limit=_fleet_limit(r.concurrency_limit for r in items),
                 workers=workers,
                 breakdown=_add_breakdowns((r.breakdown, window / r.seconds) for r in items))
