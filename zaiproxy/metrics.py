"""Minimal Prometheus metrics for one worker process.

Scope of this module (issue 2): build/ledger info and this worker's request
and upstream-error counters, with ``variant`` on every series and bounded
label values (route templates, never raw paths). Totals across all workers,
read from shared memory, replace the per-worker registry with the
observability issue; the family and label names here are already the
original system's (``zai_proxy_*``), so dashboards need no change then.
Label children are bound once and cached: the hot path does a dict lookup
and an ``inc()``.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from zaiproxy import __version__
from zaiproxy.record import RequestRecord

# ``*_created`` series double the exposition and no alert rule uses them.
disable_created_metrics()  # type: ignore[no-untyped-call]


class WorkerMetrics:
    def __init__(self, *, variant: str, ledger: str, workers: int, commit: str = "unknown",
                 pool_stats: Callable[[], tuple[int, int]] | None = None,
                 adaptive_rate: Callable[[], float] | None = None,
                 alias_metrics: bool = False) -> None:
        self.variant = variant
        self.registry = CollectorRegistry(auto_describe=True)
        Gauge("zai_proxy_build_info", "Build information.", ["version", "variant", "commit"],
              registry=self.registry).labels(__version__, variant, commit).set(1)
        Gauge("zai_proxy_ledger_info", "Which ledger implementation is loaded (native or python).",
              ["implementation", "variant"], registry=self.registry).labels(ledger, variant).set(1)
        Gauge("zai_proxy_max_workers", "Configured worker processes.", ["variant"],
              registry=self.registry).labels(variant).set(workers)
        self._requests = Counter(
            "zai_proxy_requests", "Requests answered by this worker process.",
            ["method", "path", "status", "variant"], registry=self.registry)
        self._upstream_errors = Counter(
            "zai_proxy_upstream_errors", "Upstream failures seen by this worker process.",
            ["error_type", "variant"], registry=self.registry)
        if pool_stats is not None:
            pool = Gauge("zai_proxy_upstream_pool_connections",
                         "Upstream connections of this worker by state.", ["state", "variant"],
                         registry=self.registry)
            pool.labels("active", variant).set_function(lambda: pool_stats()[0])
            pool.labels("idle", variant).set_function(lambda: pool_stats()[1])
        self._request_children: dict[tuple[str, str, int], Counter] = {}
        self._rejections = Counter(
            "zai_proxy_rate_limit_rejections", "Requests refused by the proxy's own limits.",
            ["limit", "scope", "variant"], registry=self.registry)
        self._zai_errors = Counter(
            "zai_proxy_zai_errors", "Z.AI 429 answers by class and business code.",
            ["class", "code", "variant"], registry=self.registry)
        self._retries = Counter(
            "zai_proxy_retry_attempts", "Upstream retries by reason (the Z.AI 429 class).",
            ["reason", "variant"], registry=self.registry)
        # Opt-in: one series per client key alias (aliases come from the keys file only).
        self._key_requests = Counter(
            "zai_proxy_key_requests", "Requests by client key alias and status.",
            ["key", "status", "variant"], registry=self.registry) if alias_metrics else None
        if adaptive_rate is not None:
            Gauge("zai_proxy_rate_limit_requests_per_second",
                  "The adaptive upstream rate shared by all workers (0 = not limiting).",
                  ["variant"], registry=self.registry).labels(variant).set_function(adaptive_rate)

    def observe(self, record: RequestRecord) -> None:
        """Count one finished request (the record's route is a bounded template)."""
        self.request(record.method, record.route, record.status)
        if self._key_requests is not None and record.key_alias is not None:
            self._key_requests.labels(record.key_alias, str(record.status), self.variant).inc()

    def request(self, method: str, template: str, status: int) -> None:
        if method not in _METHODS:
            method = "other"  # client-chosen tokens must not create series
        key = (method, template, status)
        child = self._request_children.get(key)
        if child is None:
            child = self._requests.labels(method, template, str(status), self.variant)
            self._request_children[key] = child
        child.inc()

    def upstream_error(self, error_type: str) -> None:
        self._upstream_errors.labels(error_type, self.variant).inc()

    def rejection(self, limit: str, scope: str) -> None:
        self._rejections.labels(limit, scope, self.variant).inc()

    def zai_error(self, cls: str, code: str | None) -> None:
        # Codes come from upstream bodies: only Z.AI's 13xx business codes become labels.
        label = code if code is not None and len(code) == 4 and code.startswith("13") else "other"
        self._zai_errors.labels(cls, label, self.variant).inc()

    def retry(self, reason: str) -> None:
        self._retries.labels(reason, self.variant).inc()

    def render(self) -> tuple[bytes, bytes]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST.encode()


_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS", "-"})
