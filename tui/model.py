"""What the TUI knows, as plain data: the admin API's answers, normalised (no Textual, no I/O).

A proxy and a fleet collector (``zaiproxy collect``) serve the same admin routes
but not quite the same shapes, so everything is parsed here into one vocabulary:

- :class:`Point`: what one variant did over one interval, as rates per second
  (live ``metrics`` events carry ``rates``; a collector's history points are
  rates already; a proxy's history points are counts per bucket of the
  recorder and are divided by the bucket length). ``None`` = not known (a gap
  in a plot, "–" in a table), never 0.
- :class:`History`: points per variant over a range, and what the answer said
  it could not fill (a recorder's rollups keep no p50/p99, no TTFT).
- :class:`Snapshot`: one live ``metrics`` event: per variant its totals, the
  rates since the previous event, the breakdowns by class.
- :class:`KeysReport`: ``/admin/keys``: per key and proxy-wide limit state.
- :class:`ZaiQuota`: Z.AI's own quota of one upstream key (its 5-hour and weekly windows, as
  the proxy's poller last read them, and the pacing decision), and :class:`UpstreamKey`: one
  key of the pool (resting or not, its headroom); in ``/admin/keys`` and ``/admin/status``.

Every parser tolerates missing fields (an older proxy, a family not yet
observed) and raises :class:`AnswerError` only for an answer that is not the
admin API's at all, so a version skew shows as blanks, never as a crash.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Final

RANGES: Final[dict[str, int]] = {"5m": 300, "15m": 900, "1h": 3600, "6h": 21600,
                                 "24h": 86400, "7d": 604800}
# What ``--variant`` and the ``v`` key choose: production, "canary" (the variant named
# canary, or else the only variant besides production the source reports), both (production
# overlaid with every other variant), or any variant by its name.
VARIANT_MODES: Final = ("production", "canary", "both")
PRODUCTION: Final = "production"
CANARY: Final = "canary"
BOTH: Final = "both"
# A variant's name is a label value of every metric (the proxy's DEPLOYMENT_VARIANT accepts
# exactly these: zaiproxy/core/config_values.py ``variant``; tests/tui/test_model.py keeps
# the two equal, since the UI may not import the proxy).
VARIANT_NAME: Final = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")


def variant_mode(text: str) -> str:
    """``--variant``: one of :data:`VARIANT_MODES` or a variant name; ValueError otherwise."""
    if text in VARIANT_MODES or VARIANT_NAME.fullmatch(text):
        return text
    raise ValueError(f"{text!r} is neither {', '.join(VARIANT_MODES)} nor a variant name "
                     "(lower case letters, digits, '_' or '-', at most 32 characters, as "
                     "DEPLOYMENT_VARIANT)")


class AnswerError(ValueError):
    """An answer that is not the admin API's (not JSON, not an object, ...)."""


# ---- points ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Point:
    """One variant over one interval ending near ``t`` (unix seconds); rates per second."""

    t: float
    seconds: float
    requests: float | None = None
    r2xx: float | None = None
    r4xx: float | None = None
    r429: float | None = None
    r5xx: float | None = None
    latency_p50: float | None = None  # seconds
    latency_p95: float | None = None
    latency_p99: float | None = None
    ttft_p50: float | None = None
    ttft_p95: float | None = None
    ttft_p99: float | None = None
    tokens_in: float | None = None
    tokens_out: float | None = None
    cost: float | None = None  # USD per second
    in_flight: float | None = None
    concurrency_limit: float | None = None
    retries: float | None = None
    zai_errors: float | None = None
    upstream_errors: float | None = None
    rejections: float | None = None
    # What failed for the clients, by kind, per second: the proxy's own 429s, Z.AI's 429s
    # relayed, other 4xx (the server's definition: its rates' ``failure_shares``).
    proxy_429: float | None = None
    zai_429: float | None = None
    other_4xx: float | None = None

    @property
    def error_rate(self) -> float | None:
        """5xx share of requests (what a canary rollback compares)."""
        if self.requests is None or self.r5xx is None:
            return None
        return self.r5xx / self.requests if self.requests > 0 else 0.0


RATE_FIELDS: Final = ("requests", "r2xx", "r4xx", "r429", "r5xx", "tokens_in", "tokens_out",
                      "cost", "retries", "zai_errors", "upstream_errors", "rejections",
                      "proxy_429", "zai_429", "other_4xx")


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _ms(value: Any) -> float | None:
    v = _num(value)
    return None if v is None else v / 1000.0


def _list(value: Any) -> list[Any]:
    """A JSON array, else nothing (a string would otherwise iterate as characters)."""
    return value if isinstance(value, list) else []


def _sum_breakdown(doc: Mapping[str, Any], category: str) -> float | None:
    values = doc.get(category)
    if not isinstance(values, Mapping):
        return None
    return sum(v for v in (_num(x) for x in values.values()) if v is not None)


def point_from_rates(t: float, rates: Mapping[str, Any]) -> Point:
    """A live ``rates`` object (proxy or collector) or a collector history point."""
    requests = _num(rates.get("requests_per_s"))
    r4xx = _num(rates.get("client_errors_per_s"))
    r5xx = _num(rates.get("errors_per_s"))
    r429 = _num(rates.get("rate_limited_per_s"))
    breakdown = rates.get("breakdown_per_s")
    statuses = breakdown.get("status") if isinstance(breakdown, Mapping) else None
    r2xx: float | None
    if isinstance(statuses, Mapping):
        r2xx = sum(v for k, v in ((str(k), _num(v)) for k, v in statuses.items())
                   if v is not None and k.startswith("2"))
    elif requests is not None and r4xx is not None and r5xx is not None:
        # A collector's history has no 2xx column: what is neither 4xx nor 5xx (1xx/3xx are rare
        # on these routes).
        r2xx = max(0.0, requests - r4xx - r5xx)
    else:
        r2xx = None
    # One count on a proxy and a collector (snapshot.Counts.retries); an older source has only
    # the breakdown by reason (live), or neither (a collector's history before it stored them).
    retries = _num(rates.get("retries_per_s"))
    if retries is None and isinstance(breakdown, Mapping):
        retries = _sum_breakdown(breakdown, "retries")
    seconds = _num(rates.get("seconds")) or 0.0
    shares = rates.get("failure_shares")

    def failed(kind: str) -> float | None:
        share = _num(shares.get(kind)) if isinstance(shares, Mapping) else None
        return None if share is None or requests is None else share * requests

    return Point(
        t=t, seconds=seconds, requests=requests, r2xx=r2xx, r4xx=r4xx, r429=r429, r5xx=r5xx,
        latency_p50=_num(rates.get("latency_p50_s")),
        latency_p95=_num(rates.get("latency_p95_s")),
        latency_p99=_num(rates.get("latency_p99_s")),
        ttft_p50=_num(rates.get("ttft_p50_s")), ttft_p95=_num(rates.get("ttft_p95_s")),
        ttft_p99=_num(rates.get("ttft_p99_s")),
        tokens_in=_num(rates.get("tokens_in_per_s")),
        tokens_out=_num(rates.get("tokens_out_per_s")),
        cost=_num(rates.get("cost_usd_per_s")),
        in_flight=_num(rates.get("in_flight")),
        concurrency_limit=_num(rates.get("concurrency_limit")),
        retries=retries,
        zai_errors=_num(rates.get("zai_errors_per_s")),
        upstream_errors=_num(rates.get("upstream_errors_per_s")),
        rejections=_num(rates.get("rejections_per_s")),
        proxy_429=failed("proxy_429"), zai_429=failed("zai_429"), other_4xx=failed("other_4xx"),
    )


def point_from_recorder(doc: Mapping[str, Any], step: float, end: float) -> Point | None:
    """A proxy's history point (the recorder's counts for one bucket of ``step`` seconds)."""
    start = _num(doc.get("t"))
    if start is None or step <= 0:
        return None
    # The bucket ends at start + step, or now for the bucket still filling.
    seconds = max(1e-9, min(step, end - start)) if end > start else step

    def rate(name: str) -> float | None:
        v = _num(doc.get(name))
        return None if v is None else v / seconds

    requests = rate("requests")
    r5xx = rate("responses_5xx")
    if r5xx is None and "responses_5xx" not in doc:
        r5xx = rate("errors")  # an older recorder: errors = 5xx + broken relays
    return Point(
        t=start + seconds, seconds=seconds, requests=requests, r2xx=rate("responses_2xx"),
        r4xx=rate("responses_4xx"), r429=rate("responses_429"), r5xx=r5xx,
        latency_p50=_ms(doc.get("latency_ms_p50")), latency_p95=_ms(doc.get("latency_ms_p95")),
        latency_p99=_ms(doc.get("latency_ms_p99")),
        ttft_p50=_ms(doc.get("ttft_ms_p50")), ttft_p95=_ms(doc.get("ttft_ms_p95")),
        ttft_p99=_ms(doc.get("ttft_ms_p99")),
        tokens_in=rate("input_tokens"), tokens_out=rate("output_tokens"), cost=rate("cost_usd"),
        retries=rate("retries"), zai_errors=rate("zai_errors"),
        upstream_errors=rate("upstream_errors"), rejections=rate("rejections"),
    )


# ---- history -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class History:
    """``/admin/history`` for one range: points per variant, oldest first."""

    range: str
    start: float
    end: float
    step: float
    series: Mapping[str, tuple[Point, ...]]
    source: str = ""  # "collector", "raw" or "rollup" (a proxy's recorder)
    note: str = ""  # what this answer cannot show (rollups: no p50/p99/TTFT)


def parse_history(doc: Any, range_: str, fetched_at: float) -> History:
    """Either shape: a collector's (rates per ``step_s``) or a proxy's (recorder counts)."""
    if not isinstance(doc, Mapping):
        raise AnswerError("history answer is not a JSON object")
    seconds = RANGES.get(range_, 3600)
    if doc.get("source") == "collector":
        step = _num(doc.get("step_s")) or 1.0
        raw_series = doc.get("series")
        series: dict[str, tuple[Point, ...]] = {}
        if isinstance(raw_series, Mapping):
            for variant, points in raw_series.items():
                if not isinstance(points, list):
                    continue
                out = []
                for p in points:
                    t = _num(p.get("t")) if isinstance(p, Mapping) else None
                    if t is None:
                        continue
                    assert isinstance(p, Mapping)
                    # The time the rates were measured over (a partial bucket is shorter
                    # than the step); an older collector does not say: the step.
                    measured = _num(p.get("seconds")) or step
                    out.append(replace(point_from_rates(min(t + step, fetched_at), p),
                                       seconds=measured))
                series[str(variant)] = tuple(out)
        end = _num(doc.get("to")) or fetched_at
        start = _num(doc.get("from")) or end - seconds
        return History(range_, start, end, step, series, "collector")
    inner = doc.get("series")
    if not isinstance(inner, Mapping):
        raise AnswerError("history answer has no series")
    step = _num(inner.get("resolution_s")) or 60.0
    source = str(inner.get("source") or "")
    end = fetched_at
    series = {}
    raw_series = inner.get("series")
    if isinstance(raw_series, Mapping):
        for variant, points in raw_series.items():
            if not isinstance(points, list):
                continue
            parsed = (point_from_recorder(p, step, end) for p in points if isinstance(p, Mapping))
            series[str(variant)] = tuple(p for p in parsed if p is not None)
    note = ""
    if source == "rollup":
        note = "1-minute rollups: no p50/p99 or time to first token in this range"
    return History(range_, end - seconds, end, step, series, source, note)


# ---- live snapshots -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class VariantLive:
    """One variant in one live snapshot."""

    variant: str
    totals: Mapping[str, float]
    in_flight: float
    streams_in_flight: float
    concurrency_limit: float
    adaptive_rate: float
    breakdown: Mapping[str, Mapping[str, float]]  # totals since the proxy started
    rates: Point | None  # since the previous snapshot (None: the first of a stream)
    breakdown_per_s: Mapping[str, Mapping[str, float]]
    versions: tuple[str, ...] = ()
    targets: int | None = None  # a collector: fresh targets of this variant
    stale_targets: int = 0


@dataclass(frozen=True, slots=True)
class Snapshot:
    time: float
    source: str  # "proxy" or "collector"
    variants: Mapping[str, VariantLive]
    interval: float | None = None  # a collector says its scrape interval
    stale_targets: tuple[str, ...] = ()  # a collector's targets that stopped answering
    warnings: tuple[str, ...] = ()  # the proxy's security warnings, e.g. "admin_api_open"
    # Z.AI's own quota per upstream key; () when not polled, None when the answer has no
    # word on it (an older proxy or collector).
    zai_quota: tuple[ZaiQuota, ...] | None = None


def _breakdown(value: Any) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    if isinstance(value, Mapping):
        for cat, labels in value.items():
            if isinstance(labels, Mapping):
                out[str(cat)] = {str(k): v for k, v in ((k, _num(x)) for k, x in labels.items())
                                 if v is not None}
    return out


def parse_snapshot(doc: Any) -> Snapshot:
    """A ``metrics`` event (or ``/admin/status``) of a proxy or a collector."""
    if not isinstance(doc, Mapping):
        raise AnswerError("metrics event is not a JSON object")
    t = _num(doc.get("time"))
    if t is None:
        raise AnswerError("metrics event has no time")
    variants: dict[str, VariantLive] = {}
    raw = doc.get("variants")
    if isinstance(raw, Mapping):
        for name, v in raw.items():
            if not isinstance(v, Mapping):
                continue
            rates_doc = v.get("rates")
            rates = point_from_rates(t, rates_doc) if isinstance(rates_doc, Mapping) else None
            totals = {k: n for k, n in ((k, _num(x)) for k, x in v.items()) if n is not None}
            per_s = rates_doc.get("breakdown_per_s") if isinstance(rates_doc, Mapping) else None
            variants[str(name)] = VariantLive(
                variant=str(name), totals=totals,
                in_flight=_num(v.get("in_flight")) or 0.0,
                streams_in_flight=_num(v.get("streams_in_flight")) or 0.0,
                concurrency_limit=_num(v.get("concurrency_limit")) or 0.0,
                adaptive_rate=_num(v.get("adaptive_rate")) or 0.0,
                breakdown=_breakdown(v.get("breakdown")),
                rates=rates, breakdown_per_s=_breakdown(per_s),
                versions=tuple(str(x) for x in _list(v.get("versions")) if isinstance(x, str)),
                targets=int(v["targets"]) if isinstance(v.get("targets"), int) else None,
                stale_targets=int(v.get("stale_targets") or 0)
                if isinstance(v.get("stale_targets"), int) else 0,
            )
    stale = tuple(str(tg.get("target")) for tg in _list(doc.get("targets"))
                  if isinstance(tg, Mapping) and tg.get("stale"))
    warnings = tuple(w for w in _list(doc.get("warnings")) if isinstance(w, str))
    return Snapshot(time=t, source=str(doc.get("source") or "proxy"), variants=variants,
                    interval=_num(doc.get("interval_s")), stale_targets=stale,
                    warnings=warnings, zai_quota=parse_zai_quota(doc.get("zai_quota")))


# ---- keys and limits ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LimitState:
    """One limit right now: a per-minute rate (GCRA), a concurrency cap or a rolling window."""

    name: str  # "requests_per_minute", "tokens_per_5h", "upstream_concurrency", ...
    limit: float
    remaining: float
    used: float | None = None
    reset_s: float | None = None  # GCRA: until full again; window: until its oldest use leaves
    # A window younger than its length (the proxy's host restarted inside it, unix s): it
    # counts nothing from before then, so "0 % used" would be a guess.
    since: float | None = None

    @property
    def used_share(self) -> float:
        if self.limit <= 0:
            return 0.0
        used = self.used if self.used is not None else self.limit - self.remaining
        return min(1.0, max(0.0, used / self.limit))


@dataclass(frozen=True, slots=True)
class KeyRow:
    alias: str
    enabled: bool
    state: str  # ok | limited | disabled
    limited_by: tuple[str, ...]
    # Every request the key sent (a proxy older than the outcomes counted only the charged
    # ones: its outcomes below are None, unknown, and this is that count).
    requests: int
    input_tokens: int
    output_tokens: int
    limits: tuple[LimitState, ...]
    # ``requests`` by outcome (/admin/keys ``usage``): answered, refused by the proxy's
    # limits (its 429), Z.AI's 429 relayed, any other 4xx (499: the client left), 5xx.
    ok: int | None = None
    refused: int | None = None
    zai_429: int | None = None
    other_4xx: int | None = None
    r5xx: int | None = None

    @property
    def r4xx(self) -> int | None:
        """The 4xx a client got other than the proxy's refusals (Z.AI's 429s included)."""
        if self.zai_429 is None or self.other_4xx is None:
            return None
        return self.zai_429 + self.other_4xx

    @property
    def tightest(self) -> LimitState | None:
        """The limit with the least share left (what "remaining quota" shows)."""
        return max(self.limits, key=lambda s: (s.used_share, s.name), default=None)


@dataclass(frozen=True, slots=True)
class Adaptive:
    enabled: bool
    rate_rps: float | None
    min_rps: float | None
    max_rps: float | None
    adjustments: Mapping[str, float] = field(default_factory=dict)
    reason: str | None = None  # the Z.AI throttle class behind a cap (concurrency, frequency...)
    free_in_s: float | None = None  # when the keys report was made: seconds until the cap is gone


@dataclass(frozen=True, slots=True)
class KeysReport:
    mode: str  # "keys", "open" or "fleet" (a collector: the rows merged across its targets)
    keys: tuple[KeyRow, ...]
    limits: tuple[LimitState, ...]  # proxy-wide and upstream-key limits
    adaptive: Adaptive | None
    targets: int = 0  # a fleet's targets, asked or not
    targets_failed: tuple[str, ...] = ()  # a fleet's targets that did not answer: "url: error"
    # "host": one host's ledger; "fleet": every proxy's shared budget in Redis (fleet-wide
    # numbers); "mixed": a collector whose targets disagree (a rollout between backends).
    scope: str = "host"
    # Z.AI's own quota per upstream key and the pool of upstream keys: () when not polled /
    # no pool reported, None when the answer has no word on them (an older proxy).
    zai_quota: tuple[ZaiQuota, ...] | None = None
    upstreams: tuple[UpstreamKey, ...] | None = None


def _limits(doc: Any) -> tuple[LimitState, ...]:
    out = []
    if isinstance(doc, Mapping):
        for name, st in doc.items():
            if not isinstance(st, Mapping):
                continue
            limit = _num(st.get("limit"))
            if limit is None:
                continue
            used = _num(st.get("used"))
            if used is None:
                used = _num(st.get("in_use"))
            remaining = _num(st.get("remaining"))
            if remaining is None:
                remaining = max(0.0, limit - (used or 0.0))
            out.append(LimitState(str(name), limit, remaining, used, _num(st.get("reset_s")),
                                  _num(st.get("since"))))
    return tuple(out)


def _count(value: Any) -> int | None:
    """A count of the keys report; None when the answer has none (an older proxy)."""
    v = _num(value)
    return None if v is None else int(v)


def parse_keys(doc: Any) -> KeysReport:
    if not isinstance(doc, Mapping):
        raise AnswerError("keys answer is not a JSON object")
    rows = []
    for k in _list(doc.get("keys")):
        if not isinstance(k, Mapping) or not isinstance(k.get("alias"), str):
            continue
        usage = k.get("usage") if isinstance(k.get("usage"), Mapping) else {}
        assert isinstance(usage, Mapping)
        limits = _limits(k.get("now"))
        enabled = bool(k.get("enabled", True))
        limited_by = tuple(str(x) for x in _list(k.get("limited_by")))
        if not limited_by:
            limited_by = tuple(s.name for s in limits if s.remaining <= 0 and s.limit > 0)
        state = str(k.get("state") or ("disabled" if not enabled
                                       else "limited" if limited_by else "ok"))
        rows.append(KeyRow(
            alias=k["alias"], enabled=enabled, state=state, limited_by=limited_by,
            requests=int(_num(usage.get("requests")) or 0),
            input_tokens=int(_num(usage.get("input_tokens")) or 0),
            output_tokens=int(_num(usage.get("output_tokens")) or 0), limits=limits,
            ok=_count(usage.get("ok")), refused=_count(usage.get("proxy_429")),
            zai_429=_count(usage.get("zai_429")), other_4xx=_count(usage.get("other_4xx")),
            r5xx=_count(usage.get("5xx"))))
    adaptive = None
    a = doc.get("adaptive")
    if isinstance(a, Mapping):
        adj = a.get("adjustments")
        adaptive = Adaptive(
            enabled=bool(a.get("enabled")), rate_rps=_num(a.get("rate_rps")),
            min_rps=_num(a.get("min_rps")), max_rps=_num(a.get("max_rps")),
            adjustments={str(k): v for k, v in ((k, _num(x)) for k, x in adj.items())
                         if v is not None} if isinstance(adj, Mapping) else {},
            reason=str(a["reason"]) if isinstance(a.get("reason"), str) else None,
            free_in_s=_num(a.get("free_in_s")))
    targets = [t for t in _list(doc.get("targets")) if isinstance(t, Mapping)]
    failed = tuple(f"{t.get('target')}: {t.get('error') or 'failed'}" for t in targets
                   if not t.get("ok"))
    return KeysReport(mode=str(doc.get("mode") or "open"), keys=tuple(rows),
                      limits=_limits(doc.get("global")), adaptive=adaptive,
                      targets=len(targets), targets_failed=failed,
                      scope=str(doc.get("scope") or "host"),
                      zai_quota=parse_zai_quota(doc.get("zai_quota")),
                      upstreams=parse_upstreams(doc.get("upstreams")))


# ---- Z.AI's own quota and the pool of upstream keys --------------------------------------

# Z.AI's windows (limits/zai_quota.py WINDOWS) and the proxy's own rolling windows that count
# the same span (the ``global`` limits of /admin/keys): "local counting" beside Z.AI's number.
ZAI_WINDOWS: Final = ("five_hour", "weekly")
LOCAL_WINDOWS: Final[dict[str, tuple[str, ...]]] = {
    "five_hour": ("upstream_tokens_per_5h", "upstream_requests_per_5h"),
    "weekly": ("upstream_tokens_per_week", "upstream_requests_per_week"),
}
# The proxy's default ``quota_stale_after``: what a sample's age is judged by when the
# answer does not say (Prometheus, a collector's /admin/status: neither carries the setting).
DEFAULT_STALE_AFTER_S: Final = 900.0
FAILED_POLLS: Final = ("error", "malformed")


@dataclass(frozen=True, slots=True)
class QuotaWindow:
    """One of Z.AI's windows for one upstream key, as its last good sample said."""

    window: str  # "five_hour" | "weekly"
    used_share: float | None  # 0..1, Z.AI's own number; None: the answer had none
    limit_type: str | None = None  # "TOKENS_LIMIT" | "CREDIT_LIMIT"
    reset_at: float | None = None  # unix seconds
    reset_in_s: float | None = None  # when the report was made


@dataclass(frozen=True, slots=True)
class QuotaPacing:
    """The pacing decision for one upstream key (``quota_pacing``)."""

    enabled: bool
    rate_rps: float | None = None  # the paced rate; None: the quota does not limit now
    reserve_reached: bool = False  # every request is answered 429 until ``closed_until``
    window: str | None = None  # the window that sets the rate or closed the gate
    closed_until: float | None = None  # unix seconds


@dataclass(frozen=True, slots=True)
class ZaiQuota:
    """Z.AI's own quota of one upstream key (``zai_quota`` of /admin/keys and /admin/status).

    ``stale``/``fresh``/``last_outcome`` are None when the source cannot say (Prometheus and
    a collector's /admin/status read the ``zai_proxy_quota_*`` gauges, which carry no
    staleness): :attr:`is_stale` then judges the sample's age.
    """

    upstream: str  # the key's alias ("default" without a pool file)
    enabled: bool = True
    fresh: bool | None = None
    stale: bool | None = None
    plan_tier: str | None = None
    last_outcome: str | None = None  # "success" | "error" | "malformed"
    last_success_at: float | None = None
    sample_age_s: float | None = None  # None: no good sample yet
    interval_s: float | None = None
    stale_after_s: float | None = None
    polls: Mapping[str, float] = field(default_factory=dict)
    windows: tuple[QuotaWindow, ...] = ()
    pacing: QuotaPacing | None = None

    @property
    def is_stale(self) -> bool:
        """The sample is too old to trust (or there is none): what the proxy says, else its
        age against ``stale_after_s`` (the proxy's default when not told)."""
        if self.stale is not None:
            return self.stale
        if self.fresh is not None:
            return not self.fresh
        if self.sample_age_s is None:
            return True
        return self.sample_age_s > (self.stale_after_s or DEFAULT_STALE_AFTER_S)

    @property
    def failing(self) -> bool:
        """The last poll of Z.AI's quota API failed (the sample shown is an older one)."""
        return self.last_outcome in FAILED_POLLS

    def window(self, name: str) -> QuotaWindow | None:
        return next((w for w in self.windows if w.window == name), None)


@dataclass(frozen=True, slots=True)
class UpstreamKey:
    """One upstream key (Z.AI account) of the proxy's pool (``upstreams`` of /admin/keys)."""

    alias: str
    index: int | None = None  # its place in the pool file (0: the first)
    resting: bool = False  # left out of the choice of key until ``resting_until``
    resting_until: float | None = None  # unix seconds
    rest_reason: str | None = None  # "throttled" | "quota"
    rests: int | None = None
    switched_away: int | None = None
    pinned_clients: tuple[str, ...] = ()
    headroom: float | None = None  # 1 - the highest used share known for the key


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _share(value: Any) -> float | None:
    v = _num(value)
    return None if v is None else min(1.0, max(0.0, v))


def _quota_window(doc: Any) -> QuotaWindow | None:
    if not isinstance(doc, Mapping) or not isinstance(doc.get("window"), str):
        return None
    share = _share(doc.get("used_fraction"))
    if share is None:
        pct = _num(doc.get("used_pct"))
        share = None if pct is None else _share(pct / 100)
    return QuotaWindow(doc["window"], share, _str(doc.get("limit_type")),
                       _num(doc.get("reset_at")), _num(doc.get("reset_in_s")))


def _pacing(doc: Any) -> QuotaPacing | None:
    if not isinstance(doc, Mapping):
        return None
    return QuotaPacing(enabled=doc.get("enabled") is True, rate_rps=_num(doc.get("rate_rps")),
                       reserve_reached=doc.get("reserve_reached") is True,
                       window=_str(doc.get("window")),
                       closed_until=_num(doc.get("closed_until")))


def _flag(value: Any) -> bool | None:
    return value if isinstance(value, bool) else None


def parse_zai_quota(value: Any) -> tuple[ZaiQuota, ...] | None:
    """``zai_quota`` (a list, one entry per upstream key); None when it is not one (absent:
    an older proxy or collector). Entries that are not objects, or name no key, are left out;
    a field of the wrong type is unknown."""
    if not isinstance(value, list):
        return None
    out = []
    for doc in value:
        if not isinstance(doc, Mapping):
            continue
        alias = doc.get("upstream", "default")
        if not isinstance(alias, str):
            continue
        polls = doc.get("polls")
        windows = (_quota_window(w) for w in _list(doc.get("windows")))
        out.append(ZaiQuota(
            upstream=alias, enabled=doc.get("enabled", True) is not False,
            fresh=_flag(doc.get("fresh")), stale=_flag(doc.get("stale")),
            plan_tier=_str(doc.get("plan_tier")), last_outcome=_str(doc.get("last_outcome")),
            last_success_at=_num(doc.get("last_success_at")),
            sample_age_s=_num(doc.get("sample_age_s")), interval_s=_num(doc.get("interval_s")),
            stale_after_s=_num(doc.get("stale_after_s")),
            polls={str(k): n for k, n in ((k, _num(x)) for k, x in polls.items())
                   if n is not None} if isinstance(polls, Mapping) else {},
            windows=tuple(w for w in windows if w is not None),
            pacing=_pacing(doc.get("pacing"))))
    return tuple(out)


def parse_upstreams(value: Any) -> tuple[UpstreamKey, ...] | None:
    """``upstreams`` (the pool, one entry per key); None when it is not a list."""
    if not isinstance(value, list):
        return None
    out = []
    for doc in value:
        if not isinstance(doc, Mapping) or not isinstance(doc.get("alias"), str):
            continue
        until = _num(doc.get("resting_until"))
        out.append(UpstreamKey(
            alias=doc["alias"], index=_count(doc.get("index")),
            resting=doc.get("resting") is True, resting_until=until,
            rest_reason=_str(doc.get("rest_reason")), rests=_count(doc.get("rests")),
            switched_away=_count(doc.get("switched_away")),
            pinned_clients=tuple(c for c in _list(doc.get("pinned_clients"))
                                 if isinstance(c, str)),
            headroom=_share(doc.get("headroom"))))
    return tuple(out)


# ---- time series arithmetic --------------------------------------------------------------


def timeline(history: History | None, variant: str, live: Sequence[Point], start: float,
             end: float) -> list[Point]:
    """One variant's history points, then its live points after what the history covers,
    within ``[start, end]``."""
    points: list[Point] = []
    covered = -math.inf
    if history is not None:
        points.extend(p for p in history.series.get(variant, ()) if start <= p.t <= end)
        covered = history.end
    points.extend(p for p in live if p.t > covered and start <= p.t <= end)
    return points


def total(points: Iterable[Point], name: str) -> float | None:
    """The increase over the points (rate × interval), None when no point knows it."""
    out: float | None = None
    for p in points:
        v = getattr(p, name)
        if v is not None:
            out = (out or 0.0) + v * p.seconds
    return out


def weighted(points: Iterable[Point], name: str) -> float | None:
    """A request-weighted mean of a per-interval value (a percentile over the range, roughly)."""
    num = den = 0.0
    for p in points:
        v = getattr(p, name)
        if v is not None and p.requests:
            num += v * p.requests * p.seconds
            den += p.requests * p.seconds
    return num / den if den > 0 else None
