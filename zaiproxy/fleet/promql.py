"""The fleet's metrics in Prometheus: the PromQL over the proxy's metric names and the reading
of Prometheus' HTTP API answers, for every reader of them.

Two programs read the same series: ``zaiproxy canary-check --prometheus``
(:mod:`zaiproxy.fleet.canary_sources`: a CLI, blocking HTTP) and ``zaiproxy tui
--prometheus`` (the TUI's ``PrometheusSource``: asyncio and httpx). Their transports
differ, but what they ask and how they read the answer is one thing, kept here, so a
metric renamed in ``observe/metrics.py`` or a selector fixed (which paths are not API
traffic, how a target's variant is found) is fixed for both at once. Pure and stdlib only:
the TUI imports this module (its one exception to "the UI never imports the proxy",
pyproject.toml's import contracts), so nothing here may pull in trio, h11 or the proxy.

What a query is keyed by: every series carries ``variant`` (the proxy labels its own
series with ``DEPLOYMENT_VARIANT``; the ServiceMonitor keeps it, ``honorLabels``). ``up``
is the scrape's, not the proxy's: it has a ``variant`` only when the scrape config adds
one, so a target's variant is otherwise taken from its last ``zai_proxy_build_info``,
joined with ``up`` on (instance, job) (:func:`targets`, :func:`count_targets`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

# ---- the proxy's families (observe/metrics.py) --------------------------------------------

REQUESTS: Final = "zai_proxy_requests_total"
DURATION: Final = "zai_proxy_request_duration_seconds"
TTFT: Final = "zai_proxy_time_to_first_token_seconds"
TOKENS: Final = "zai_proxy_tokens_total"
COST: Final = "zai_proxy_estimated_cost_usd_total"
REJECTIONS: Final = "zai_proxy_rate_limit_rejections_total"
ZAI_ERRORS: Final = "zai_proxy_zai_errors_total"
UPSTREAM_ERRORS: Final = "zai_proxy_upstream_errors_total"
RETRIES: Final = "zai_proxy_retry_attempts_total"
ADJUSTMENTS: Final = "zai_proxy_rate_limit_adjustments_total"
USAGE_MISSING: Final = "zai_proxy_usage_missing_total"
IN_FLIGHT: Final = "zai_proxy_concurrent_requests"
STREAMS: Final = "zai_proxy_streams_in_flight"
CONCURRENCY_LIMIT: Final = "zai_proxy_concurrency_limit"
ADAPTIVE_RATE: Final = "zai_proxy_rate_limit_requests_per_second"
QUOTA_USED: Final = "zai_proxy_quota_used_ratio"
# Z.AI's own quota, as the proxy's poller read it (observe/quota_metrics.py); ``upstream``
# (the key's alias) only with a pool file.
ZAI_QUOTA_USAGE: Final = "zai_proxy_quota_usage_ratio"
ZAI_QUOTA_RESET: Final = "zai_proxy_quota_reset_time_seconds"
ZAI_QUOTA_SAMPLE_AGE: Final = "zai_proxy_quota_sample_age_seconds"
ZAI_QUOTA_POLLS: Final = "zai_proxy_quota_poll_total"
ZAI_QUOTA_RATE_CAP: Final = "zai_proxy_quota_rate_cap"
ZAI_QUOTA_GATE_OPEN: Final = "zai_proxy_quota_gate_open"
BUILD_INFO: Final = "zai_proxy_build_info"

# Not API traffic (as snapshot.CONTROL_PATHS / CONTROL_PREFIX): scrapes, probes, admin. A
# current proxy counts them in families of their own; an older one mixed them in.
API_PATHS: Final = 'path!~"/metrics|/health|/ready|/admin.*"'
# Every variant there is, whatever its name (a regex matcher, as :func:`variants` writes
# one): what a reader asks when it does not know the names (``production`` and a canary
# called ``canary``, ``test``, ``v2`` ...).
ALL_VARIANTS: Final = (".+",)
CANARY_QUANTILE: Final = 0.95
QUANTILES: Final = (0.5, 0.95, 0.99)

# Prometheus' HTTP API (https://prometheus.io/docs/prometheus/latest/querying/api/).
QUERY_PATH: Final = "/api/v1/query"
RANGE_PATH: Final = "/api/v1/query_range"
TARGETS_PATH: Final = "/api/v1/targets"


# ---- query text -----------------------------------------------------------------------------


def duration(seconds: float) -> str:
    """A range selector's duration, in whole milliseconds (PromQL takes no fractions)."""
    return f"{round(seconds * 1000)}ms"


def variants(names: Sequence[str]) -> str:
    """The matcher of the variants asked for (names are [a-z0-9_-]: nothing to escape;
    :data:`ALL_VARIANTS` matches all of them)."""
    return 'variant=~"' + "|".join(names) + '"'


def api(names: Sequence[str]) -> str:
    """The variants' API traffic (control routes left out)."""
    return f"{variants(names)},{API_PATHS}"


def _by(labels: Iterable[str]) -> str:
    return ", ".join(("variant", *labels))


def increase(metric: str, selector: str, window_s: float, by: Sequence[str] = ()) -> str:
    return f"sum by ({_by(by)}) (increase({metric}{{{selector}}}[{duration(window_s)}]))"


def rate(metric: str, selector: str, window_s: float, by: Sequence[str] = ()) -> str:
    return f"sum by ({_by(by)}) (rate({metric}{{{selector}}}[{duration(window_s)}]))"


def total(metric: str, selector: str, by: Sequence[str] = ()) -> str:
    """A counter's value summed over the pods: what they counted since each started."""
    return f"sum by ({_by(by)}) ({metric}{{{selector}}})"


def gauge_max(metric: str, selector: str, by: Sequence[str] = ()) -> str:
    """A gauge every pod repeats (the adaptive rate, a quota shared through Redis) or whose
    busiest pod is what matters: the largest, never a sum."""
    return f"max by ({_by(by)}) ({metric}{{{selector}}})"


def quantile(q: float, histogram: str, selector: str, window_s: float) -> str:
    """``histogram_quantile`` over every pod's buckets of the variant."""
    return (f"histogram_quantile({q}, sum by (variant, le) "
            f"(rate({histogram}_bucket{{{selector}}}[{duration(window_s)}])))")


def up(names: Sequence[str]) -> str:
    """Targets labelled with their variant by the scrape config (a relabelled pod label)."""
    return f"up{{{variants(names)}}}"


def targets(names: Sequence[str], lookback_s: float) -> str:
    """Each target's variant from its last build_info within ``lookback_s``, joined with
    ``up`` (0 = its last scrape failed); a target gone from discovery has no ``up``."""
    return (f"max by (variant, instance, job) (last_over_time({BUILD_INFO}"
            f"{{{variants(names)}}}[{duration(lookback_s)}])) * on (instance, job) "
            "group_left () max by (instance, job) (up)")


def present(window_s: float) -> str:
    """Every variant that had a target scraped within the window, whatever its name (each
    target's ``zai_proxy_build_info``): what ``canary-check`` finds the canary among."""
    return (f"count by (variant) (last_over_time({BUILD_INFO}{{{variants(ALL_VARIANTS)}}}"
            f"[{duration(window_s)}]))")


def canary_queries(window_s: float, names: Sequence[str]) -> dict[str, str]:
    """``canary-check``: one instant vector by ``variant`` per signal over the window."""
    v, a = variants(names), api(names)
    return {
        "requests": increase(REQUESTS, a, window_s),
        "ok": increase(REQUESTS, f'{a},status=~"2.."', window_s),
        "server_errors": increase(REQUESTS, f'{a},status=~"5.."', window_s),
        "rate_limited": increase(REQUESTS, f'{a},status="429"', window_s),
        "usage_missing": increase(USAGE_MISSING, v, window_s),
        "latency_p95": quantile(CANARY_QUANTILE, DURATION, a, window_s),
        "ttft_p95": quantile(CANARY_QUANTILE, TTFT, v, window_s),
        "up": up(names),
        "targets": targets(names, window_s),
    }


@dataclass(frozen=True, slots=True)
class Signal:
    """One query of a dashboard and the labels (besides ``variant``) its values are keyed
    by, joined with ``:`` in that order (as the admin API's breakdowns: ``scope:limit``)."""

    query: str
    labels: tuple[str, ...] = ()


# Counter families by what the dashboard splits them by: answered as rates over a window
# (live, plots) or as totals since each pod started (the "since start" tables).
COUNTERS: Final[dict[str, tuple[str, tuple[str, ...]]]] = {
    "status": (REQUESTS, ("status",)),
    "rejections": (REJECTIONS, ("scope", "limit")),
    "zai_errors": (ZAI_ERRORS, ("class", "code")),
    "upstream_errors": (UPSTREAM_ERRORS, ("error_type",)),
    "retries": (RETRIES, ("reason",)),
    "adjustments": (ADJUSTMENTS, ("direction",)),
    "tokens": (TOKENS, ("direction",)),
    "cost": (COST, ()),
    "usage_missing": (USAGE_MISSING, ()),
}


def dashboard_rates(names: Sequence[str], window_s: float) -> dict[str, Signal]:
    """What a dashboard plots per variant at one instant (or each step of a range): the
    counters' rates over ``window_s``, the gauges, the latency and TTFT quantiles."""
    v = variants(names)
    out = {name: Signal(rate(metric, api(names) if metric == REQUESTS else v, window_s,
                             labels), labels)
           for name, (metric, labels) in COUNTERS.items()}
    out |= {
        "in_flight": Signal(total(IN_FLIGHT, v)),
        "streams_in_flight": Signal(total(STREAMS, v)),
        # Each pod enforces its own: the fleet's limit is their sum.
        "concurrency_limit": Signal(total(CONCURRENCY_LIMIT, v, ("scope",)), ("scope",)),
        "adaptive_rate": Signal(gauge_max(ADAPTIVE_RATE, v)),
    }
    for q in QUANTILES:
        out[f"latency_p{round(q * 100)}"] = Signal(quantile(q, DURATION, api(names), window_s))
        out[f"ttft_p{round(q * 100)}"] = Signal(quantile(q, TTFT, v, window_s))
    return out


def range_summary(names: Sequence[str], window_s: float) -> dict[str, Signal]:
    """A summary of the last ``window_s`` (``zaiproxy history --prometheus``): each counter's
    increase over the window and the latency and TTFT quantiles over all of it, keyed as
    :func:`dashboard_rates`."""
    v = variants(names)
    out = {name: Signal(increase(metric, api(names) if metric == REQUESTS else v, window_s,
                                 labels), labels)
           for name, (metric, labels) in COUNTERS.items()}
    for q in QUANTILES:
        out[f"latency_p{round(q * 100)}"] = Signal(quantile(q, DURATION, api(names), window_s))
        out[f"ttft_p{round(q * 100)}"] = Signal(quantile(q, TTFT, v, window_s))
    return out


def counts(values: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """The admin API's counters (``observe/snapshot.py`` ``Counts``, by name) from one
    variant's :data:`COUNTERS` signals, whether rates, increases or totals: a family
    Prometheus has no series of reads as 0."""
    def summed(name: str, keep: Callable[[str], bool] = lambda _: True) -> float:
        return sum(v for k, v in values.get(name, {}).items() if keep(k))

    status = values.get("status", {})
    tokens = values.get("tokens", {})
    return {
        "requests": sum(status.values()),
        "responses_2xx": summed("status", lambda k: k.startswith("2")),
        "responses_4xx": summed("status", lambda k: k.startswith("4")),
        "responses_5xx": summed("status", lambda k: k.startswith("5")),
        "responses_429": status.get("429", 0.0),
        "upstream_errors": summed("upstream_errors"),
        "rejections": summed("rejections"),
        "zai_errors": summed("zai_errors"),
        "retries": summed("retries"),
        "tokens_in": tokens.get("input", 0.0),
        "tokens_out": tokens.get("output", 0.0),
        "tokens_cache": summed("tokens", lambda k: k.startswith("cache")),
        "cost_usd": summed("cost"),
        "usage_missing": summed("usage_missing"),
    }


def dashboard_totals(names: Sequence[str]) -> dict[str, Signal]:
    """The counters' totals since each pod started, keyed as :func:`dashboard_rates`."""
    v = variants(names)
    return {name: Signal(total(metric, api(names) if metric == REQUESTS else v, labels), labels)
            for name, (metric, labels) in COUNTERS.items()}


def dashboard_state(names: Sequence[str], lookback_s: float) -> dict[str, Signal]:
    """What is true of a variant now: its targets (``lookback_s``: :func:`targets`) and
    the builds its pods run."""
    return {
        "up": Signal(up(names), ("instance", "job")),
        "targets": Signal(targets(names, lookback_s), ("instance", "job")),
        "versions": Signal(f"count by (variant, version) ({BUILD_INFO}{{{variants(names)}}})",
                           ("version",)),
    }


def quota_used(names: Sequence[str]) -> Signal:
    """Each rolling-window quota's used share, of the busiest pod (with the Redis limits
    backend every pod reports the fleet's one budget)."""
    labels = ("scope", "limit")
    return Signal(gauge_max(QUOTA_USED, variants(names), labels), labels)


def zai_quota(names: Sequence[str], polls_window_s: float) -> dict[str, Signal]:
    """Z.AI's own quota per upstream key (``upstream`` is "-" without a pool file): each
    window's used share and reset of the busiest pod (every pod polls, or copies, the same
    account), the freshest sample's age now (the gauge's value plus the time since it was
    scraped), the polls by result over ``polls_window_s`` (what the pollers did last), the
    lowest paced rate, and each window's reserve gate (0: closed on some pod)."""
    v = variants(names)
    age = f"{ZAI_QUOTA_SAMPLE_AGE}{{{v}}}"
    return {
        "usage": Signal(gauge_max(ZAI_QUOTA_USAGE, v, ("upstream", "window", "limit_type")),
                        ("upstream", "window", "limit_type")),
        "reset": Signal(gauge_max(ZAI_QUOTA_RESET, v, ("upstream", "window")),
                        ("upstream", "window")),
        "sample_age": Signal(f"min by (variant, upstream) ({age} + time() - timestamp({age}))",
                             ("upstream",)),
        "polls": Signal(increase(ZAI_QUOTA_POLLS, v, polls_window_s, ("upstream", "result")),
                        ("upstream", "result")),
        "rate_cap": Signal(f"min by (variant, upstream) ({ZAI_QUOTA_RATE_CAP}{{{v}}})",
                           ("upstream",)),
        "gate_open": Signal(f"min by (variant, upstream, window) ({ZAI_QUOTA_GATE_OPEN}{{{v}}})",
                            ("upstream", "window")),
    }


# ---- HTTP API: requests ----------------------------------------------------------------------


def instant_params(query: str, at: float | None = None) -> dict[str, str]:
    """``GET /api/v1/query``'s parameters (``at``: the evaluation time, unix seconds)."""
    return {"query": query} | ({} if at is None else {"time": f"{at:.3f}"})


def range_params(query: str, start: float, end: float, step: float) -> dict[str, str]:
    """``GET /api/v1/query_range``'s parameters."""
    return {"query": query, "start": f"{start:.3f}", "end": f"{end:.3f}", "step": f"{step:g}"}


def auth_headers(token: str | None) -> dict[str, str]:
    """A bearer token for a Prometheus behind an authenticating proxy (never logged)."""
    return {"authorization": f"Bearer {token}"} if token else {}


# ---- HTTP API: answers -----------------------------------------------------------------------


class AnswerError(ValueError):
    """Prometheus refused the query, or answered something that is not its API's."""


def error_message(doc: Any) -> str:
    """What an error answer says: ``{"status": "error", "error": "..."}``."""
    if isinstance(doc, Mapping) and isinstance(doc.get("error"), str):
        return str(doc["error"])
    return f"{doc!r:.80}"


def result(doc: Any, kind: str) -> list[Mapping[str, Any]]:
    """``data.result`` of a successful answer of ``kind`` (``vector`` or ``matrix``)."""
    if not isinstance(doc, Mapping) or doc.get("status") != "success":
        raise AnswerError(error_message(doc))
    data = doc.get("data")
    if not isinstance(data, Mapping) or data.get("resultType") != kind:
        got = data.get("resultType") if isinstance(data, Mapping) else None
        raise AnswerError(f"expected a {kind}, got {got!r}")
    rows = data.get("result")
    if not isinstance(rows, list) or not all(
            isinstance(r, Mapping) and isinstance(r.get("metric"), Mapping) for r in rows):
        raise AnswerError(f"a {kind} whose result is not a list of series")
    return rows


def _value(pair: Any) -> float:
    """A sample ``[t, "value"]``'s value (NaN for "NaN": a quantile with no observation)."""
    if not isinstance(pair, list | tuple) or len(pair) != 2:
        raise AnswerError(f"not a sample: {pair!r:.60}")
    return float(pair[1])


def key_of(metric: Mapping[str, Any], labels: Sequence[str]) -> str:
    return ":".join(str(metric.get(k) or "-") for k in labels)


def by_variant(rows: Iterable[Mapping[str, Any]], labels: Sequence[str] = ()) \
        -> dict[str, dict[str, float]]:
    """An instant vector as variant -> key (:func:`key_of` its ``labels``) -> value; series
    without a variant, and NaN (nothing observed), left out."""
    out: dict[str, dict[str, float]] = {}
    for row in rows:
        variant, value = row["metric"].get("variant"), _value(row.get("value"))
        if isinstance(variant, str) and math.isfinite(value):
            into = out.setdefault(variant, {})
            key = key_of(row["metric"], labels)
            into[key] = into.get(key, 0.0) + value
    return out


def series_by_variant(rows: Iterable[Mapping[str, Any]], labels: Sequence[str] = ()) \
        -> dict[str, dict[str, dict[float, float]]]:
    """A range query's matrix as variant -> key -> {t: value} (NaN samples left out)."""
    out: dict[str, dict[str, dict[float, float]]] = {}
    for row in rows:
        variant, values = row["metric"].get("variant"), row.get("values")
        if not isinstance(variant, str) or not isinstance(values, list):
            continue
        into = out.setdefault(variant, {}).setdefault(key_of(row["metric"], labels), {})
        for pair in values:
            value = _value(pair)
            if math.isfinite(value):
                t = float(pair[0])
                into[t] = into.get(t, 0.0) + value
    return out


@dataclass(frozen=True, slots=True)
class Targets:
    """One variant's scrape targets (pods) and those whose last scrape failed."""

    total: int = 0
    down: tuple[str, ...] = ()  # "job/instance"


def count_targets(up_rows: Sequence[Mapping[str, Any]],
                  joined_rows: Sequence[Mapping[str, Any]]) -> dict[str, Targets]:
    """The answers of :func:`up` and :func:`targets` by variant: ``up`` when the scrape
    config labels targets with their variant, else the join."""
    rows = [r for r in up_rows if r["metric"].get("variant")] or list(joined_rows)
    found: dict[str, tuple[int, list[str]]] = {}
    for row in rows:
        metric = row["metric"]
        variant = metric.get("variant")
        if not isinstance(variant, str):
            continue
        n, down = found.get(variant, (0, []))
        if _value(row.get("value")) < 1:
            down.append(f"{metric.get('job', '-')}/{metric.get('instance', '-')}")
        found[variant] = (n + 1, down)
    return {v: Targets(n, tuple(down)) for v, (n, down) in found.items()}


_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|us|µs|ns|y|w|d|h|m|s)")
_UNITS = {"y": 31_536_000.0, "w": 604_800.0, "d": 86_400.0, "h": 3600.0, "m": 60.0, "s": 1.0,
          "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}


def parse_duration(text: str) -> float | None:
    """A Prometheus or Go duration ("15s", "1m30s", "500ms") in seconds; None if it is not."""
    parts = _DURATION_PART.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        return None
    return sum(float(n) * _UNITS[u] for n, u in parts)


def scrape_interval(doc: Any, instances: Iterable[tuple[str, str]]) -> float | None:
    """The longest ``scrapeInterval`` of the active targets named by (job, instance) in a
    ``GET /api/v1/targets`` answer; None when it names none of them (or is not one)."""
    wanted = set(instances)
    data = doc.get("data") if isinstance(doc, Mapping) else None
    active = data.get("activeTargets") if isinstance(data, Mapping) else None
    found: list[float] = []
    for target in active if isinstance(active, list) else ():
        labels = target.get("labels") if isinstance(target, Mapping) else None
        if not isinstance(labels, Mapping) or (labels.get("job"), labels.get("instance")) \
                not in wanted:
            continue
        seconds = parse_duration(str(target.get("scrapeInterval") or ""))
        if seconds:
            found.append(seconds)
    return max(found, default=None)
