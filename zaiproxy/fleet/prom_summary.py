"""``zaiproxy history --prometheus URL``: a fleet's summary over a range, from the Prometheus
that scrapes it, in the shape of a collector's (``collector_store.read_summary``) so one
renderer prints both.

In Kubernetes the fleet's counters already live in Prometheus; its history is as long as
Prometheus keeps it. Per variant: the counters' ``increase`` over the range (Prometheus
extrapolates to the range's ends, so counts are estimates, not the recorder's exact rows),
the failures by kind (``snapshot.failures``: the same kinds as ``/admin/status``), latency
and TTFT quantiles over the whole range (``histogram_quantile`` of the summed buckets) and
the targets scraped now. The queries are :mod:`promql`'s, shared with ``canary-check`` and
``zaiproxy tui --prometheus``.
"""

from __future__ import annotations

import datetime as dt
import math
import urllib.parse
from typing import Any

from zaiproxy.fleet import promql
from zaiproxy.fleet.canary_sources import SourceError, get_json
from zaiproxy.observe import snapshot
from zaiproxy.observe.snapshot import COUNT_NAMES, Counts

# Every variant the fleet has (a regex matcher; names themselves are [a-z0-9_-]).
ALL_VARIANTS = promql.ALL_VARIANTS


def read_summary(url: str, range_s: float, variant: str | None, now: float, *,
                 token: str | None = None, timeout: float = 10.0) -> dict[str, Any]:
    """The last ``range_s`` seconds up to ``now`` per variant and in total; raises
    SourceError (Unreachable when nothing answered) with what went wrong."""
    url = url.rstrip("/")
    names = (variant,) if variant else ALL_VARIANTS
    signals = promql.range_summary(names, range_s)
    values: dict[str, dict[str, dict[str, float]]] = {}  # variant -> signal -> key -> value
    for name, signal in signals.items():
        for v, by_key in _vector(url, name, signal, now, token, timeout).items():
            values.setdefault(v, {})[name] = by_key
    state = promql.dashboard_state(names, range_s)
    up = _rows(url, "up", state["up"].query, now, token, timeout)
    joined = _rows(url, "targets", state["targets"].query, now, token, timeout)
    try:
        targets = promql.count_targets(up, joined)
    except (promql.AnswerError, KeyError, TypeError, ValueError) as exc:
        raise SourceError(f"{url}: unexpected answer to the targets query: {exc}") from None
    rows = []
    total = Counts()
    for v in sorted(set(values) | set(targets)):
        counts = Counts(**{k: c for k, c in promql.counts(values.get(v, {})).items()
                           if k in COUNT_NAMES})
        total = Counts(*(getattr(total, n) + getattr(counts, n) for n in COUNT_NAMES))
        row = _row(counts, range_s, targets.get(v, promql.Targets()))
        for q in promql.QUANTILES:
            for hist in ("latency", "ttft"):
                value = values.get(v, {}).get(f"{hist}_p{round(q * 100)}", {}).get("")
                row[f"{hist}_ms_p{round(q * 100)}"] = (
                    None if value is None or not math.isfinite(value) else round(value * 1000, 3))
        rows.append({"variant": v, **row})
    everyone = promql.Targets(sum(t.total for t in targets.values()),
                              tuple(d for t in targets.values() for d in t.down))
    return {
        "source": "prometheus", "prometheus": url,
        "range": {"start": _iso(now - range_s), "end": _iso(now), "seconds": range_s},
        "variant": variant,
        "variants": rows,
        # Quantiles of the whole fleet would need queries of their own: per variant only.
        "total": {**_row(total, range_s, everyone),
                  **{f"{h}_ms_p{round(q * 100)}": None
                     for h in ("latency", "ttft") for q in promql.QUANTILES}},
    }


def _row(counts: Counts, range_s: float, targets: promql.Targets) -> dict[str, Any]:
    return {
        "targets": targets.total, "targets_down": list(targets.down), "seconds": range_s,
        **counts.to_json(),
        "requests_per_s": counts.requests / range_s if range_s > 0 else 0.0,
        "error_rate": counts.responses_5xx / counts.requests if counts.requests > 0 else 0.0,
        "failures": snapshot.failures(counts), "failure_shares": snapshot.failure_shares(counts),
    }


def _rows(url: str, name: str, query: str, now: float, token: str | None,
          timeout: float) -> list[Any]:
    doc = get_json(f"{url}{promql.QUERY_PATH}?"
                   + urllib.parse.urlencode(promql.instant_params(query, now)),
                   token=token, timeout=timeout)
    try:
        return promql.result(doc, "vector")
    except promql.AnswerError as exc:
        raise SourceError(f"{url}: Prometheus did not answer the {name} query: {exc}") from None


def _vector(url: str, name: str, signal: promql.Signal, now: float, token: str | None,
            timeout: float) -> dict[str, dict[str, float]]:
    rows = _rows(url, name, signal.query, now, token, timeout)
    try:
        return promql.by_variant(rows, signal.labels)
    except (promql.AnswerError, KeyError, TypeError, ValueError) as exc:
        raise SourceError(f"{url}: unexpected answer to the {name} query: {exc}") from None


def _iso(epoch: float) -> str:
    return dt.datetime.fromtimestamp(epoch, dt.UTC).isoformat().replace("+00:00", "Z")
