"""Z.AI's own quota on ``/metrics``, under the original service's names and labels.

Read at each scrape from the rows the host's poller writes (``limits/zai_quota.py``), so every
worker answers the same:

- ``zai_proxy_quota_usage_ratio{window,limit_type,variant}`` and
  ``zai_proxy_quota_remaining_ratio`` (1 - usage), per window (``five_hour``, ``weekly``);
- ``zai_proxy_quota_reset_time_seconds{window,limit_type,variant}``: unix seconds, no series
  while Z.AI gives no reset time;
- ``zai_proxy_quota_sample_age_seconds{variant}``: absent until a first successful poll;
- ``zai_proxy_quota_poll_total{result,variant}``: ``success | error | malformed | stale``;
- with a pool of upstream keys from a file, every series also by ``upstream`` (the alias);
- with ``quota_pacing``: ``zai_proxy_quota_rate_cap{variant}`` (the paced rate in requests/s;
  absent while the quota does not limit) and ``zai_proxy_quota_gate_open{window,variant}``
  (0 while the window's reserve is reached). The original registered these two and never
  set them.

``limit_type`` is sanitised as the original did (lower case, ``[a-z0-9_-]``, at most 32
characters: ``tokens_limit``, ``credit_limit``); ``/health`` keeps Z.AI's upper case.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from zaiproxy.limits.zai_quota import OUTCOMES, WINDOWS, PaceView, QuotaView
from zaiproxy.upstream.quota import label_value


def families(views: Sequence[tuple[QuotaView, PaceView | None]], variant: str, now: float, *,
             upstream_label: bool = False) -> Iterator[Metric]:
    """``views``: per upstream key its quota and pacing. ``upstream_label``: a pool of keys
    from a file, each series then also by ``upstream`` (the key's alias); one key keeps the
    original's exact label sets."""
    extra = ["upstream"] if upstream_label else []
    labels = ["window", "limit_type", "variant", *extra]
    usage = GaugeMetricFamily("zai_proxy_quota_usage_ratio",
                              "Share of Z.AI's quota window used (Z.AI's own number).",
                              labels=labels)
    remaining = GaugeMetricFamily("zai_proxy_quota_remaining_ratio",
                                  "Share of Z.AI's quota window left (1 - usage).", labels=labels)
    reset = GaugeMetricFamily("zai_proxy_quota_reset_time_seconds",
                              "When Z.AI's quota window resets (unix seconds).", labels=labels)
    sample_age = GaugeMetricFamily("zai_proxy_quota_sample_age_seconds",
                                   "Seconds since Z.AI's quota was last read successfully.",
                                   labels=["variant", *extra])
    polls = CounterMetricFamily("zai_proxy_quota_poll", "Polls of Z.AI's quota API by result.",
                                labels=["result", "variant", *extra])
    cap = GaugeMetricFamily("zai_proxy_quota_rate_cap",
                            "The request rate quota pacing allows now (requests/s).",
                            labels=["variant", *extra])
    gate = GaugeMetricFamily("zai_proxy_quota_gate_open",
                             "0 while the window's quota reserve is reached (requests get 429).",
                             labels=["window", "variant", *extra])
    paced = False
    for view, pace in views:
        alias = [view.alias] if upstream_label else []
        for w in view.windows:
            values = [w.window, label_value(w.limit_type), variant, *alias]
            usage.add_metric(values, w.used_fraction)
            remaining.add_metric(values, 1.0 - w.used_fraction)
            if w.reset_at is not None:
                reset.add_metric(values, w.reset_at)
        age = view.age(now)
        if age is not None:
            sample_age.add_metric([variant, *alias], age)
        for result in OUTCOMES:
            polls.add_metric([result, variant, *alias], view.counts.get(result, 0))
        if pace is None:
            continue
        paced = True
        if pace.rate_rps is not None:
            cap.add_metric([variant, *alias], pace.rate_rps)
        closed = pace.closed(now)
        for window in WINDOWS:
            gate.add_metric([window, variant, *alias],
                            0.0 if closed and pace.window == window else 1.0)
    yield from (usage, remaining, reset)
    if sample_age.samples:
        yield sample_age
    yield polls
    if paced:
        if cap.samples:
            yield cap
        yield gate
