"""The proxy's Prometheus metrics: totals of all workers, from the shared-memory ledger.

Every worker records into ledger cells (``zaiproxy.observe.shm_metrics``: the layout, the names
side file, the series budget) and any worker's ``/metrics`` reads all of them, so one
scrape shows the whole host and a restarted worker never makes a counter go backwards.
Family and label names are the original system's (``zai_proxy_*``); every series has
``variant``. Label values are bounded: route templates (never raw paths), a fixed set of
methods, HTTP statuses, the configured ``known_models`` (anything else is ``other``, no
model ``-``), the proxy's own error codes, key aliases only when ``auth.alias_metrics``
opts in, and the original's ``client`` on the rate-limit wait and rejection families:
``source-00`` … ``source-63``, the direct peer's address hashed
(``core.labels.client_bucket``; 64 buckets, so a wait histogram by client takes at most
64 x 3 rows of the series budget).

The hot path is :meth:`WorkerMetrics.observe`: one :class:`RequestRecord` per finished
request (vLLM's pattern), a dict lookup per series (cells are bound once per process),
one or two atomic adds per counter or histogram.

API traffic only, by the record's ``api`` (never by its route): ``zai_proxy_requests_total``,
``zai_proxy_request_duration_seconds`` and every other request family count the requests
whose ``api`` is set (``openai`` / ``anthropic``: the proxied routes, and a request refused
before routing, in the shape it was answered in). Control routes (``/health``, ``/ready``,
``/metrics``, ``/admin/*``: ``api`` None) have families of their own,
``zai_proxy_control_requests_total`` and ``zai_proxy_control_request_duration_seconds``
(same labels), so scrapes, probes and hour-long ``/admin/events`` streams never enter the
request rates, the latency quantiles or the status breakdown that ``snapshot.parse`` reads
from these families. Which usage counts cached tokens inside the input is the record's API
too (``record.input_includes_cache``).

Gauges, computed at scrape time:

- ``zai_proxy_concurrent_requests``: proxied requests in flight in all workers (control
  routes such as ``/metrics`` itself are not counted);
- ``zai_proxy_streams_in_flight``: those of them that asked for ``"stream": true``;
- ``zai_proxy_max_workers`` and ``zai_proxy_worker_utilization_ratio``: the original
  service's, in its meaning: the concurrency cap (its ``MAX_WORKERS``; here
  ``limits.concurrency`` when set, else ``limits.upstream_concurrency``, which
  ``MAX_WORKERS`` sets: core/original_env.py) and ``zai_proxy_concurrent_requests`` divided
  by it. Neither series without a cap (nothing to divide by). The ratio can pass 1: a
  request counts from its head's arrival (the original counted its own from arrival too),
  so those still being read, waiting in the admission queue (``queue_timeout``) or being
  refused count beside the admitted ones. With a pool file ``upstream_concurrency`` is a
  cap per key, and with ``limits_backend = "redis"`` a cap is the fleet's while the
  numerator is this host's;
- ``zai_proxy_worker_processes`` and ``zai_proxy_worker_processes_busy_ratio``: this
  host's worker processes, and the fraction of them with at least one request in flight at
  the scrape (an instantaneous sample: ``avg_over_time`` gives the busy fraction over a
  range). Not CPU: an async worker with one slow stream in flight counts as busy. (zaiproxy
  published these two under the original's names above before those took its meaning.);
- ``zai_proxy_upstream_pool_connections{state=active|idle}``: summed over workers, each
  as of its last finished request or its last scrape;
- ``zai_proxy_rate_limit_requests_per_second``: the adaptive upstream rate the supervisor
  publishes (``SC_ADAPTIVE_MRPS / 1000``; 0 = not limiting), its learned ceiling and the time
  of the last throttle (``zai_proxy_rate_limit_ceiling_requests_per_second``,
  ``zai_proxy_rate_limit_last_throttle_timestamp_seconds``), and
  ``zai_proxy_rate_limit_adjustments_total{direction}`` from its scalars;
- ``zai_proxy_concurrency_limit{scope=proxy|upstream}``: the configured global
  concurrency limits (config ``limits.concurrency`` and ``limits.upstream_concurrency``),
  one series per limit that is set and none when neither is, so a dashboard can show
  in-flight requests against the ceiling they run into;
- ``zai_proxy_quota_used_ratio{scope=global|upstream,limit}``: the share of each configured
  rolling-window limit used now (``used / limit``, 0..1), ``limit`` spelled as in the config
  and ``GET /admin/keys`` (``requests_per_5h`` … ``tokens_per_week``, upstream-key ones
  ``upstream_*``). Read from this host's ledger windows at the scrape exactly as
  ``/admin/keys`` reads them (``Limiter.quota_use``); no series for a limit not set, and
  none for client keys (their aliases are labels only with ``auth.alias_metrics``).

A worker's gauges are words of its own ledger row, zeroed when it starts; a dead worker's
values stay until its replacement starts (0.25 s with the supervisor's backoff).

Recorder hook (the DuckDB recorder is another module): a worker hands
:meth:`WorkerMetrics.set_recorder_stats` a callable returning ``(queue depth now, records
dropped since this worker started)`` (``RecordSink.stats``); it is read after each
finished request and at each scrape, the depth stored in the worker's own cell and the
growth of the dropped count added to a shared counter (so a restarted worker, counting
from 0 again, never makes it go back; drops after a worker's last request or scrape are
lost with it). :meth:`WorkerMetrics.set_recorder_queue_depth` and
:meth:`WorkerMetrics.recorder_dropped` do the same by hand, and a process that is not a
worker (the recorder itself) uses :class:`RecorderCells` on the same segment. They become
``zai_proxy_recorder_queue_depth`` (the sum over workers and the recorder),
``zai_proxy_recorder_dropped_records_total`` (dropped where it was counted: a full channel,
the recorder's memory full, refused by DuckDB, left at the recorder's exit) and
``zai_proxy_recorder_records_lost_total`` (sent and never written because a recorder died
holding them, counted by the next one from the sequence numbers:
docs/decisions/recorder-loss.md), exposed once any process has used them. Records never
written = dropped + lost; the two never count the same record.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Final

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.utils import floatToGoString

from zaiproxy import __version__
from zaiproxy.core.labels import client_bucket, model_label
from zaiproxy.core.pricing import DEFAULT_PRICES, DIRECTIONS, PriceTable, cost_nano, split_tokens
from zaiproxy.core.record import RequestRecord, input_includes_cache
from zaiproxy.limits.admission import QuotaUse
from zaiproxy.limits.cells import (
    SC_ADAPTIVE_CEILING_MRPS,
    SC_ADAPTIVE_MRPS,
    SC_ADAPTIVE_THROTTLED_AT_MS,
    SC_ADJUST_DOWN,
    SC_ADJUST_UP,
)
from zaiproxy.limits.fleet import degraded_workers, fleet_counters
from zaiproxy.limits.ledger import load as load_ledger
from zaiproxy.limits.segment import Segment
from zaiproxy.limits.zai_quota import PaceView, QuotaView
from zaiproxy.observe import quota_metrics
from zaiproxy.observe.shm_metrics import (
    COUNTER,
    HISTOGRAM,
    Cell,
    Family,
    NamesFile,
    SeriesReader,
    SeriesStore,
    claim_gauge_row,
    histogram_values,
)

NS: Final = 1_000_000_000  # seconds are stored as integer nanoseconds
NANO_USD: Final = 1_000_000_000  # dollars as integer nano-USD

_LATENCY = (.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_SIZE = (100, 1_000, 10_000, 100_000, 1_000_000, 10_000_000)
_TTFT = (.05, .1, .25, .5, 1, 2, 5, 10, 20, 30, 60)
_OVERHEAD = (.0001, .00025, .0005, .001, .0025, .005, .01, .025, .05, .1)
_WAIT = (.001, .005, .01, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60)
_TOKEN_COUNT = (.0001, .0005, .001, .005, .01, .05, .1, .5, 1)

# Codes are part of the keys in shared memory: never change or reuse one.
# The original service's label sets (its dashboards and alerts query them): the request
# families carry method, path and status_code as it did; zai_proxy_requests_total also keeps
# our "status" (the same value: no extra series), which everything of ours reads.
REQUESTS = Family("rq", "zai_proxy_requests", COUNTER,
                  "API requests answered, by all workers (control routes: "
                  "zai_proxy_control_requests).", ("method", "path", "status"))
DURATION = Family("rd", "zai_proxy_request_duration_seconds", HISTOGRAM,
                  "Time from the request head to the end of the response (API requests).",
                  ("method", "path", "status_code"), _LATENCY, NS)
REQUEST_SIZE = Family("qs", "zai_proxy_request_size_bytes", HISTOGRAM,
                      "Request body sizes.", ("method", "path"), _SIZE)
RESPONSE_SIZE = Family("ps", "zai_proxy_response_size_bytes", HISTOGRAM,
                       "Response body bytes relayed from upstream.",
                       ("method", "path", "status_code"), _SIZE)
UPSTREAM_ERRORS = Family("ue", "zai_proxy_upstream_errors", COUNTER,
                         "Upstream failures (connect, timeout, protocol, stream cut).",
                         ("error_type",))
# The rate-limit families by the original's ``client`` (source-00..63: core/labels.py). Their
# codes before that label, "qw" (wait, no labels) and "rj" (limit, scope), are retired.
WAIT = Family("wc", "zai_proxy_rate_limit_wait_seconds", HISTOGRAM,
              "Time admitted requests spent in the admission queue (0 = admitted at once), "
              "by client bucket (the peer address hashed).", ("client",), _WAIT, NS)
REJECTIONS = Family("jc", "zai_proxy_rate_limit_rejections", COUNTER,
                    "Requests refused by the proxy's own limits, by client bucket (the peer "
                    "address hashed).", ("limit", "scope", "client"))
RETRIES = Family("rt", "zai_proxy_retry_attempts", COUNTER,
                 "Upstream retries by reason (the Z.AI 429 class).", ("reason",))
TOKENS = Family("tk", "zai_proxy_tokens", COUNTER,
                "Tokens by direction (input = uncached prompt tokens; the four are disjoint).",
                ("direction", "model", "pricing_tier"))
COST = Family("co", "zai_proxy_estimated_cost_usd", COUNTER,
              "Estimated cost from the price table (zaiproxy.core.pricing; list prices by default).",
              ("model",), scale=NANO_USD)
TOKEN_COUNT = Family("tc", "zai_proxy_token_count_duration_seconds", HISTOGRAM,
                     "Time spent estimating a prompt's tokens.", (), _TOKEN_COUNT, NS)
TTFT = Family("ft", "zai_proxy_time_to_first_token_seconds", HISTOGRAM,
              "Time from the request head to the first response body byte relayed.",
              ("model",), _TTFT, NS)
OVERHEAD = Family("oh", "zai_proxy_overhead_seconds", HISTOGRAM,
                  "The proxy's own time per request: duration minus the upstream exchange.",
                  ("path",), _OVERHEAD, NS)
ZAI_ERRORS = Family("ze", "zai_proxy_zai_errors", COUNTER,
                    "Z.AI 429 answers by class and business code.", ("class", "code"))
KEY_REQUESTS = Family("kr", "zai_proxy_key_requests", COUNTER,
                      "Requests by client key alias and status (auth.alias_metrics).",
                      ("key", "status"))
# Token-count health (the canary check, zaiproxy/fleet/canary.py): a build that stops reading
# upstream's usage still answers 200, only its token counts turn into estimates.
USAGE_MISSING = Family("um", "zai_proxy_usage_missing", COUNTER,
                       "Successful proxied requests whose upstream sent no usage, so tokens "
                       "were estimated.", ())
# Requests to the proxy's own routes (a record without an API): probes, scrapes, the admin API.
CONTROL_REQUESTS = Family("cr", "zai_proxy_control_requests", COUNTER,
                          "Requests to the proxy's own routes (/health, /ready, /metrics, "
                          "/admin/*), not API traffic.", ("method", "path", "status"))
CONTROL_DURATION = Family("cd", "zai_proxy_control_request_duration_seconds", HISTOGRAM,
                          "Time from the request head to the end of the response of the "
                          "proxy's own routes (an /admin/events stream lasts as long as its "
                          "client).", ("method", "path"), _LATENCY, NS)
# Model fallback on 1312 (request/fallback.py): both labels are names of the configured
# upstream.model_fallback, never the client's spelling, so the series are bounded by it.
FALLBACKS = Family("mf", "zai_proxy_model_fallbacks", COUNTER,
                   "Requests sent on to another model after Z.AI answered 1312 (model "
                   "congestion), by the congested model and the next one.",
                   ("from_model", "to_model"))
# A pool of upstream keys (limits/upstream_pool.py): requests moved to another key when one
# answered with its account's limit; labels are the pool's aliases (bounded by the file).
SWITCHES = Family("us", "zai_proxy_upstream_switches", COUNTER,
                  "Requests moved to another upstream key of the pool (1302/1303 throttle or "
                  "1308/1310 quota on the first), by key alias and the Z.AI class.",
                  ("from_upstream", "to_upstream", "reason"))
# With a pool of upstream keys from a file: every answer by the key it went out with last.
UPSTREAM_REQUESTS = Family("ur", "zai_proxy_upstream_requests", COUNTER,
                           "API requests answered, by the upstream key (pool alias) their last "
                           "attempt went out with (only with a pool of upstream keys).",
                           ("upstream", "status_code"))
FAMILIES: Final = (REQUESTS, DURATION, REQUEST_SIZE, RESPONSE_SIZE, UPSTREAM_ERRORS, WAIT,
                   REJECTIONS, RETRIES, TOKENS, COST, TOKEN_COUNT, TTFT, OVERHEAD, ZAI_ERRORS,
                   KEY_REQUESTS, USAGE_MISSING, CONTROL_REQUESTS, CONTROL_DURATION, FALLBACKS,
                   SWITCHES, UPSTREAM_REQUESTS)

# Words of a worker's gauge row (shm_metrics.claim_gauge_row; only that worker writes them).
W_IN_FLIGHT = 1
W_STREAMS = 2
W_POOL_ACTIVE = 3
W_POOL_IDLE = 4
W_RECORDER_QUEUE = 5
GAUGE_SCOPE = "w"
# The recorder's row: dropped records (a counter), the recorder process's own queue depth,
# records lost in a recorder that died (a counter).
RECORDER_KEY = b"m\0#rec"
REC_DROPPED = 1
REC_QUEUE = 2
REC_LOST = 3

_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS", "-"})
# A peer's bucket is hashed once per address while it is among the most recent ones (the
# FNV-1a loop costs ~1 µs in Python; the cache is bounded, unlike the peers).
_client_label: Final = functools.lru_cache(maxsize=1024)(client_bucket)




class _ControlCells:
    """The cells of one (method, control route, status)."""

    __slots__ = ("duration", "requests")

    def __init__(self, requests: Cell, duration: Cell) -> None:
        self.requests = requests
        self.duration = duration


class _RouteCells:
    """The cells of one (method, route, status): looked up once per request."""

    __slots__ = ("duration", "overhead", "request_size", "requests", "response_size")

    def __init__(self, requests: Cell, duration: Cell, request_size: Cell) -> None:
        self.requests = requests
        self.duration = duration
        self.request_size = request_size
        self.response_size: Cell | None = None
        self.overhead: Cell | None = None


class RecorderCells:
    """The recorder families' cells, for a process that is not a worker."""

    def __init__(self, segment: Segment) -> None:
        self._segment = segment
        self._row = segment.row(RECORDER_KEY)

    def dropped(self, n: int = 1) -> None:
        self._segment.counter_add(self._row, REC_DROPPED, n)

    def lost(self, n: int = 1) -> None:
        self._segment.counter_add(self._row, REC_LOST, n)

    def set_queue_depth(self, depth: int) -> None:
        self._segment.counter_set(self._row, REC_QUEUE, depth)


class WorkerMetrics:
    """One worker's side of the metrics: records into the segment, renders everyone's."""

    def __init__(self, *, variant: str, ledger: str, workers: int, segment: Segment,
                 commit: str = "unknown", worker_index: int = 0, shared: bool = True,
                 pool_stats: Callable[[], tuple[int, int]] | None = None,
                 alias_metrics: bool = False, known_models: frozenset[str] = frozenset(),
                 prices: PriceTable = DEFAULT_PRICES, series_budget: int | None = None,
                 wall: Callable[[], float] = time.time,
                 concurrency_limit: int | None = None,
                 upstream_concurrency_limit: int | None = None,
                 quota: Callable[[], Iterable[QuotaUse]] | None = None,
                 limits_backend: str = "shm", relay: str = "python",
                 zai_quota: Callable[[], Sequence[tuple[QuotaView, PaceView | None]]]
                 | None = None, upstream_label: bool = False) -> None:
        """``ledger``: the implementation's name; ``segment``: the attached Ledger;
        ``shared``: False for a private segment (no other process reads it; its file is
        already unlinked), whose names table is then an anonymous mapping;
        ``concurrency_limit``/``upstream_concurrency_limit``: the configured global limits
        (None = not set), exposed as ``zai_proxy_concurrency_limit``;
        ``quota``: the configured rolling windows now, read at each scrape
        (``Limiter.quota_use``), exposed as ``zai_proxy_quota_used_ratio``;
        ``zai_quota``: Z.AI's own quota as the host's poller shares it, and the pacing
        decision (None: not polled), exposed by ``observe/quota_metrics.py``."""
        self.variant = variant
        self.zai_quota = zai_quota
        self.upstream_label = upstream_label  # a pool of upstream keys: series by its alias
        self.segment = segment
        self.workers = workers
        self._impl = ledger
        self._relay = relay  # the stream scanner's implementation (request/scanner.py)
        self._commit = commit
        self._alias_metrics = alias_metrics
        self._known_models = known_models
        self._prices = prices
        self._wall = wall
        self._pool_stats = pool_stats
        self.concurrency_limits: dict[str, int] = {
            scope: limit for scope, limit in (("proxy", concurrency_limit),
                                              ("upstream", upstream_concurrency_limit))
            if limit is not None}
        # The original's concurrency cap (MAX_WORKERS): what the in-flight count runs into
        # first, the proxy's own limit, else the upstream key's; None = neither is set.
        self.max_workers = self.concurrency_limits.get(
            "proxy", self.concurrency_limits.get("upstream"))
        self._quota = quota
        self.limits_backend = limits_backend
        module = load_ledger(segment.implementation)
        layout = module.segment_size(segment.rows, segment.windows, segment.workers)
        self.names = NamesFile(segment.path if shared else None, segment.rows, layout)
        budget = series_budget if series_budget is not None else segment.rows // 2
        self.store = SeriesStore(segment, self.names, budget, module.LedgerFull)
        self._reader = SeriesReader(segment, self.names, FAMILIES, module.stable_hash)
        self._cells: dict[Family, dict[tuple[object, ...], Cell]] = {f: {} for f in FAMILIES}
        self._by_route: dict[tuple[str, str, int], _RouteCells] = {}
        self._by_control: dict[tuple[str, str, int], _ControlCells] = {}
        self._add = segment.counter_add
        self._set = segment.counter_set
        self._row = claim_gauge_row(segment, GAUGE_SCOPE, worker_index)
        self._recorder_row: int | None = None
        self._recorder_stats: Callable[[], tuple[int, int]] | None = None
        self._recorder_seen = 0  # dropped records already added to the shared counter
        self.registry = CollectorRegistry()
        self.registry.register(_Collector(self))

    # ---- recording ---------------------------------------------------------------------

    def _cell(self, family: Family, labels: tuple[object, ...]) -> Cell:
        cells = self._cells[family]
        cell = cells.get(labels)
        if cell is None:
            cell = cells[labels] = self.store.bind(family, tuple(str(v) for v in labels))
        return cell

    def observe(self, record: RequestRecord) -> None:
        """Count one finished request (the record's route is a bounded template): API
        traffic in the request families, a control route's in its own (module docstring)."""
        r = record
        method = r.method if r.method in _METHODS else "other"
        route = r.route
        cell = self._cell
        if r.api is None:
            control = self._by_control.get((method, route, r.status))
            if control is None:
                control = self._by_control[(method, route, r.status)] = _ControlCells(
                    cell(CONTROL_REQUESTS, (method, route, r.status)),
                    cell(CONTROL_DURATION, (method, route)))
            control.requests.inc()
            control.duration.observe(r.duration_s)
            self._publish()
            return
        # One lookup for the series every request of this (method, route, status) touches;
        # the response size and overhead series are bound when first needed.
        cells = self._by_route.get((method, route, r.status))
        if cells is None:
            cells = self._by_route[(method, route, r.status)] = _RouteCells(
                cell(REQUESTS, (method, route, r.status)),
                cell(DURATION, (method, route, r.status)), cell(REQUEST_SIZE, (method, route)))
        cells.requests.inc()
        cells.duration.observe(r.duration_s)
        cells.request_size.observe(r.bytes_in)
        if r.bytes_out is not None:
            if cells.response_size is None:
                cells.response_size = cell(RESPONSE_SIZE, (method, route, r.status))
            cells.response_size.observe(r.bytes_out)
        if r.ttft_s is not None:
            cell(TTFT, (model_label(r.model, self._known_models),)).observe(r.ttft_s)
        if r.upstream_s is not None:
            if cells.overhead is None:
                cells.overhead = cell(OVERHEAD, (route,))
            cells.overhead.observe(r.duration_s - r.upstream_s)
        if r.queue_wait_s is not None:
            cell(WAIT, (_client_label(r.client),)).observe(r.queue_wait_s)
        if r.token_count_s is not None:
            cell(TOKEN_COUNT, ()).observe(r.token_count_s)
        if r.upstream is not None:
            cell(UPSTREAM_REQUESTS, (r.upstream, r.status)).inc()
        if r.usage is not None:
            self._usage(r)
        if r.tokens_estimated and 200 <= r.status < 300:
            cell(USAGE_MISSING, ()).inc()
        if self._alias_metrics and r.key_alias is not None:
            cell(KEY_REQUESTS, (r.key_alias, r.status)).inc()
        self._publish()

    def _usage(self, r: RequestRecord) -> None:
        assert r.usage is not None
        model = model_label(r.model, self._known_models)
        tier, prices = self._prices.quote(r.model, self._wall())
        tokens = split_tokens(r.usage, input_includes_cache(r.api))
        for direction, n in zip(DIRECTIONS, tokens, strict=True):
            if n > 0:
                self._cell(TOKENS, (direction, model, tier)).inc(n)
        if prices is not None:
            nano = cost_nano(prices, tokens)
            if nano > 0:
                self._cell(COST, (model,)).inc(nano)

    def upstream_error(self, error_type: str) -> None:
        self._cell(UPSTREAM_ERRORS, (error_type,)).inc()

    def rejection(self, limit: str, scope: str, peer: str) -> None:
        """A request refused by the limit ``limit`` of ``scope``; ``peer``: the direct peer's
        address (the ``client`` label is its bucket, never the address)."""
        self._cell(REJECTIONS, (limit, scope, _client_label(peer))).inc()

    def zai_error(self, cls: str, code: str | None) -> None:
        # Codes come from upstream bodies: only Z.AI's 13xx business codes become labels.
        label = (code if code is not None and len(code) == 4 and code.startswith("13")
                 and code.isdigit() else "other")
        self._cell(ZAI_ERRORS, (cls, label)).inc()

    def retry(self, reason: str) -> None:
        self._cell(RETRIES, (reason,)).inc()

    def upstream_switch(self, from_upstream: str, to_upstream: str, reason: str) -> None:
        """A request moved from one upstream key of the pool to another (aliases)."""
        self._cell(SWITCHES, (from_upstream, to_upstream, reason)).inc()

    def model_fallback(self, from_model: str, to_model: str) -> None:
        """A request sent on to ``to_model`` after a 1312 (both configured names)."""
        self._cell(FALLBACKS, (from_model, to_model)).inc()

    # ---- this worker's gauges ------------------------------------------------------------

    def request_started(self) -> None:
        """A proxied (non-control) request began: in flight until :meth:`request_ended`."""
        self._add(self._row, W_IN_FLIGHT, 1)

    def stream_started(self) -> None:
        """The request in flight asked for a stream (ends with ``request_ended(stream=True)``)."""
        self._add(self._row, W_STREAMS, 1)

    def request_ended(self, stream: bool = False) -> None:
        self._add(self._row, W_IN_FLIGHT, -1)
        if stream:
            self._add(self._row, W_STREAMS, -1)

    def _publish_pool(self) -> None:
        if self._pool_stats is not None:
            active, idle = self._pool_stats()
            self._set(self._row, W_POOL_ACTIVE, active)
            self._set(self._row, W_POOL_IDLE, idle)

    def set_recorder_stats(self, stats: Callable[[], tuple[int, int]]) -> None:
        """Where this worker's recorder channel reports (queue depth, dropped since start)."""
        self._recorder()
        self._recorder_stats = stats
        self._recorder_seen = 0

    def _publish_recorder(self) -> None:
        assert self._recorder_stats is not None
        depth, dropped = self._recorder_stats()
        self._set(self._row, W_RECORDER_QUEUE, depth)
        if dropped > self._recorder_seen:
            self.recorder_dropped(dropped - self._recorder_seen)
            self._recorder_seen = dropped

    def set_recorder_queue_depth(self, depth: int) -> None:
        """Records this worker has queued for the recorder (summed over workers)."""
        self._recorder()
        self._set(self._row, W_RECORDER_QUEUE, depth)

    def recorder_dropped(self, n: int = 1) -> None:
        """Records lost on the way to the recorder (queue full, recorder gone)."""
        self._add(self._recorder(), REC_DROPPED, n)

    def _recorder(self) -> int:
        if self._recorder_row is None:
            self._recorder_row = self.segment.row(RECORDER_KEY)
        return self._recorder_row

    # ---- scraping ------------------------------------------------------------------------

    def render(self) -> tuple[bytes, bytes]:
        """The exposition of every worker's series and this host's gauges."""
        self._publish()
        return generate_latest(self.registry), CONTENT_TYPE_LATEST.encode()

    def families(self) -> list[Metric]:
        """What ``render`` would write, as metric families (no text round trip)."""
        self._publish()
        return list(self.registry.collect())

    def _publish(self) -> None:
        self._publish_pool()
        if self._recorder_stats is not None:
            self._publish_recorder()


class _Collector:
    """A prometheus-client custom collector over the shared segment (not multiprocess mode)."""

    def __init__(self, metrics: WorkerMetrics) -> None:
        self.m = metrics

    def describe(self) -> list[Metric]:
        return []  # registering must not scrape the segment

    def collect(self) -> Iterator[Metric]:
        m = self.m
        variant = m.variant
        seg = m.segment
        series = m._reader.read()
        for family in FAMILIES:
            if family is KEY_REQUESTS and not m._alias_metrics:
                continue
            labels = [*family.labels, "variant"]
            found = series.get(family, {})
            if family is REQUESTS:  # status_code beside status: the original's name
                counter = CounterMetricFamily(family.name, family.doc,
                                              labels=[*family.labels, "status_code", "variant"])
                for values, cells in sorted(found.items()):
                    counter.add_metric([*values, values[2], variant], cells[0])
                yield counter
            elif family.kind == COUNTER:
                counter = CounterMetricFamily(family.name, family.doc, labels=labels)
                for values, cells in sorted(found.items()):
                    counter.add_metric([*values, variant], cells[0] / family.scale)
                yield counter
            else:
                hist = HistogramMetricFamily(family.name, family.doc, labels=labels)
                les = _LES[family]
                for values, cells in sorted(found.items()):
                    cumulative, _, total = histogram_values(family, cells)
                    hist.add_metric([*values, variant], list(zip(les, cumulative, strict=True)),
                                    total)
                yield hist
        rows = m._reader.gauge_rows(GAUGE_SCOPE, m.workers)
        in_flight = [max(0, r[W_IN_FLIGHT - 1]) for r in rows]
        yield _gauge("zai_proxy_concurrent_requests",
                     "Proxied requests in flight in all workers.", variant, sum(in_flight))
        yield _gauge("zai_proxy_streams_in_flight",
                     "Requests in flight that asked for a stream.", variant,
                     sum(max(0, r[W_STREAMS - 1]) for r in rows))
        cap = m.max_workers
        if cap is not None:  # the original's pair (module docstring); no cap, no ratio
            yield _gauge("zai_proxy_max_workers",
                         "The concurrency cap (the original's MAX_WORKERS: limits.concurrency, "
                         "else limits.upstream_concurrency).", variant, cap)
            yield _gauge("zai_proxy_worker_utilization_ratio",
                         "Proxied requests in flight in all workers divided by "
                         "zai_proxy_max_workers.", variant, sum(in_flight) / cap)
        yield _gauge("zai_proxy_worker_processes", "Configured worker processes.", variant,
                     m.workers)
        yield _gauge("zai_proxy_worker_processes_busy_ratio",
                     "Fraction of worker processes with a request in flight (sampled at the "
                     "scrape).", variant, sum(1 for n in in_flight if n > 0) / max(1, m.workers))
        pool = GaugeMetricFamily("zai_proxy_upstream_pool_connections",
                                 "Upstream connections of all workers by state.",
                                 labels=["state", "variant"])
        pool.add_metric(["active", variant], sum(r[W_POOL_ACTIVE - 1] for r in rows))
        pool.add_metric(["idle", variant], sum(r[W_POOL_IDLE - 1] for r in rows))
        yield pool
        yield _gauge("zai_proxy_rate_limit_requests_per_second",
                     "The adaptive upstream rate shared by all workers (0 = not limiting).",
                     variant, seg.scalar_get(SC_ADAPTIVE_MRPS) / 1000)
        yield _gauge("zai_proxy_rate_limit_ceiling_requests_per_second",
                     "Send rate at which Z.AI last throttled this account (0 = none learned).",
                     variant, seg.scalar_get(SC_ADAPTIVE_CEILING_MRPS) / 1000)
        yield _gauge("zai_proxy_rate_limit_last_throttle_timestamp_seconds",
                     "When Z.AI last throttled this account (1302/1303), unix time (0 = never "
                     "or forgotten).", variant, seg.scalar_get(SC_ADAPTIVE_THROTTLED_AT_MS) / 1000)
        adjust = CounterMetricFamily("zai_proxy_rate_limit_adjustments",
                                     "Changes of the adaptive upstream rate.",
                                     labels=["direction", "variant"])
        adjust.add_metric(["up", variant], seg.scalar_get(SC_ADJUST_UP))
        adjust.add_metric(["down", variant], seg.scalar_get(SC_ADJUST_DOWN))
        yield adjust
        if m.concurrency_limits:
            limits = GaugeMetricFamily("zai_proxy_concurrency_limit",
                                       "Configured global concurrency limits by scope.",
                                       labels=["scope", "variant"])
            for scope, limit in m.concurrency_limits.items():
                limits.add_metric([scope, variant], limit)
            yield limits
        uses = list(m._quota()) if m._quota is not None else []
        if uses:
            quota = GaugeMetricFamily("zai_proxy_quota_used_ratio",
                                      "Share of each configured rolling-window limit used now.",
                                      labels=["scope", "limit", "variant"])
            for use in uses:
                quota.add_metric([use.scope, use.name, variant], use.ratio)
            yield quota
        if m.zai_quota is not None:  # Z.AI's own quota, polled (observe/quota_metrics.py)
            yield from quota_metrics.families(m.zai_quota(), variant, time.time(),
                                              upstream_label=m.upstream_label)
        if m.limits_backend == "redis":
            yield from _fleet_families(seg, variant, m.workers)
        dropped = CounterMetricFamily("zai_proxy_metrics_series_dropped",
                                      "Series refused (over the series budget or too long); "
                                      "counted once per worker that refused each.",
                                      labels=["variant"])
        dropped.add_metric([variant], m.store.dropped())
        yield dropped
        rec = seg.row_find(RECORDER_KEY)
        if rec >= 0:
            words = seg.row_counters(rec)
            yield _gauge("zai_proxy_recorder_queue_depth",
                         "Records waiting to be written by the recorder.", variant,
                         words[REC_QUEUE - 1] + sum(r[W_RECORDER_QUEUE - 1] for r in rows))
            lost = CounterMetricFamily("zai_proxy_recorder_dropped_records",
                                       "Request records the recorder never wrote.",
                                       labels=["variant"])
            lost.add_metric([variant], words[REC_DROPPED - 1])
            yield lost
            died = CounterMetricFamily(
                "zai_proxy_recorder_records_lost",
                "Request records sent to the recorder and never written: a recorder died "
                "holding them (counted by the next one from the sequence numbers).",
                labels=["variant"])
            died.add_metric([variant], words[REC_LOST - 1])
            yield died
        info = GaugeMetricFamily("zai_proxy_build_info", "Build information.",
                                 labels=["version", "variant", "commit"])
        info.add_metric([__version__, variant, m._commit], 1)
        yield info
        ledger = GaugeMetricFamily("zai_proxy_ledger_info",
                                   "Which ledger implementation is loaded (native or python).",
                                   labels=["implementation", "variant"])
        ledger.add_metric([m._impl, variant], 1)
        yield ledger
        relay = GaugeMetricFamily("zai_proxy_relay_info",
                                  "Which stream scanner is loaded (native or python).",
                                  labels=["implementation", "variant"])
        relay.add_metric([m._relay, variant], 1)
        yield relay


def _fleet_families(seg: Segment, variant: str, workers: int) -> Iterator[Metric]:
    """The fleet backend's health on this host (limits_backend = "redis": limits/fleet.py)."""
    degraded = degraded_workers(seg, workers)
    counts = fleet_counters(seg)
    yield _gauge("zai_proxy_limits_backend_up",
                 "1 while every worker of this host reaches the fleet's Redis, else 0.",
                 variant, 0 if degraded else 1)
    yield _gauge("zai_proxy_limits_backend_degraded_workers",
                 "Workers of this host deciding by the fail policy (Redis unreachable).",
                 variant, degraded)
    for name, doc, key in (
            ("zai_proxy_limits_backend_switches",
             "Times a worker lost Redis and switched to the fail policy.", "switches"),
            ("zai_proxy_limits_backend_errors",
             "Redis calls of the limits backend that failed or timed out.", "errors"),
            ("zai_proxy_limits_backend_dropped",
             "Settles and reconcile charges dropped: the bounded queue was full, or their call "
             "timed out.", "dropped")):
        counter = CounterMetricFamily(name, doc, labels=["variant"])
        counter.add_metric([variant], counts[key])
        yield counter
    decided = CounterMetricFamily("zai_proxy_limits_fail_policy_decisions",
                                  "Requests decided without Redis, by fail policy.",
                                  labels=["policy", "variant"])
    for policy in ("local", "open", "closed"):
        decided.add_metric([policy, variant], counts[policy])
    yield decided


def _bounds(family: Family) -> list[str]:
    """The ``le`` label values, formatted as prometheus-client formats its own."""
    return [*(floatToGoString(b) for b in family.buckets), "+Inf"]  # type: ignore[no-untyped-call]


def _gauge(name: str, doc: str, variant: str, value: float) -> GaugeMetricFamily:
    g = GaugeMetricFamily(name, doc, labels=["variant"])
    g.add_metric([variant], value)
    return g


_LES: Final = {f: _bounds(f) for f in FAMILIES if f.kind == HISTOGRAM}
