"""``zaiproxy collect``: scrape a fleet of proxies into one DuckDB file and serve the admin API.

The fleet collector: the TUI watches a fleet (production and canary
replicas) through the same admin API a single proxy serves. Every
``interval`` seconds each target's ``/metrics`` is fetched (``http/client.py``:
one connection per scrape so ``SO_REUSEPORT`` spreads them, bounded
by a timeout), parsed per variant (``snapshot.parse``) and turned into rates
against the previous scrape (``snapshot.delta``: counter resets = restarts).

- A target that fails is marked *stale* — its last error and last success
  stay in ``/admin/status`` — and is retried every interval; nothing a target
  does is fatal. Stale targets are left out of the per-variant aggregate.
- Storage (the original dashboard's lesson: monitoring storage that exits on
  error took the dashboard down for weeks) degrades: rows go to a bounded
  channel (full = dropped + counted), the writer's errors are logged and
  counted, the connection is reopened on the next write, and history answers
  503 while the file cannot be read. DuckDB calls never run on the trio loop:
  one ``CapacityLimiter(1)`` serialises them in a worker thread, and only that
  path touches the single connection (a DuckDB file has one owner process).
- ``/admin/events``: each consumer has a bounded queue; a consumer whose queue
  is full, or whose socket takes longer than ``send_timeout`` for one write,
  is dropped instead of slowing the others (its socket gets a small send
  buffer so lag shows up as a blocked write, not as megabytes in the kernel).

Admin API (the proxy's shapes, ``admin.py``; ``Authorization: Bearer`` when a
token is set, errors as ``{"error": {"message", "type", "code"}}``; HTTP by
``http/responder.py``):
``GET /health``; ``GET /admin/status`` (per target: stale flag, last error and
success, latest rates per variant; per variant: the fresh targets' summed
totals, gauges and ``breakdown`` (``snapshot.merge``) + ``rates`` (``snapshot.combine``:
per-second rates incl. ``breakdown_per_s``) + ``targets``/``stale_targets``/``stale``:
the shape of a proxy's ``metrics`` event, so one client reads both; ``zai_quota``: Z.AI's
own quota per upstream key, read from the ``zai_proxy_quota_*`` series of the fresh
targets' scrapes, the freshest sample per key, ``fleet_keys.quota_entries``);
``GET /admin/history?range=5m|15m|1h|6h|24h|7d&variant=NAME|all`` (``series``:
per variant, one point per ``step_s`` bucket, rates summed over targets);
``GET /admin/events`` (``connected``, then ``metrics`` = the status, every
interval; ``: heartbeat`` comments); ``GET /admin/keys`` (the fleet's keys: every fresh
target's ``/admin/keys`` asked at once, bounded by the scrape timeout, with
``Authorization: Bearer`` = ``--target-token`` / ``ZAIPROXY_TARGET_ADMIN_TOKEN``, never
logged or echoed; ``mode: "fleet"``, ``targets`` [{target, ok, error}], per alias the
summed usage and per limit the tightest state across targets (``merge_keys``); per
upstream key the freshest ``zai_quota`` sample (``merge_quota``) and the pool's
``upstreams``, resting if any target rests the key (``merge_upstreams``), both absent when
no target reports them; a failing or stale target is listed with its error and left out of
the merge).

Table ``snapshots``: one row per (scrape, target, variant) with the interval's
``seconds``, the counters' *increases* (rates = increase / seconds; increases
add up across targets and time buckets, rates do not), gauges, p50/p95/p99,
the latency/TTFT bucket increases as ``DOUBLE[]`` (bounds incl. +Inf) and
``reset`` (a restart fell in the interval). ``ts`` is unix seconds.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from itertools import count
from typing import Any, TextIO, TypeVar
from urllib.parse import urlsplit

import orjson
import trio

from zaiproxy import __version__
from zaiproxy.core.config import TARGET_ADMIN_TOKEN_ENV
from zaiproxy.core.durations import parse_duration
from zaiproxy.core.errors import MethodNotAllowed, NotFound, ServiceUnavailable
from zaiproxy.core.logs import get_logger
from zaiproxy.fleet.collector_store import Store, row_of
from zaiproxy.fleet.fleet_keys import (
    keys_error,
    merge_keys,
    merge_quota,
    merge_scope,
    merge_upstreams,
    quota_at,
    quota_entries,
    quota_gauges,
)
from zaiproxy.http import client
from zaiproxy.http.responder import Answer, Request, Responder, Streamed
from zaiproxy.observe import snapshot
from zaiproxy.observe.snapshot import Rates, VariantSnapshot
from zaiproxy.request.admin import RANGES, parse_history_params, sse_event
from zaiproxy.request.admin_access import check_admin, is_loopback
from zaiproxy.request.routing import redact_path

T = TypeVar("T")
# History resolution per range (~60-170 points); never finer than the scrape interval.
STEPS: dict[str, float] = {"5m": 5, "15m": 15, "1h": 60, "6h": 300, "24h": 900, "7d": 3600}
MAX_EXPOSITION = 16 << 20
_HEARTBEAT = b": heartbeat\n\n"
_SSE_SNDBUF = 64 << 10
_SSE_HEADERS = ((b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache"),
                (b"x-accel-buffering", b"no"))


@dataclass(frozen=True, slots=True)
class Target:
    url: str  # as shown in status and stored in the database
    host: str
    port: int
    path: str
    authority: str  # the Host header: host[:port] as written (IPv6 in brackets)

    @classmethod
    def parse(cls, url: str) -> Target:
        """``http://host:port`` (metrics at ``/metrics``) or ``http://host:port/some/path``."""
        parts = urlsplit(url if "://" in url else f"http://{url}")
        if parts.scheme != "http":
            raise ValueError(f"target {url!r}: only http:// targets are supported")
        if not parts.hostname:
            raise ValueError(f"target {url!r}: no host")
        try:
            port = parts.port or 80
        except ValueError:
            raise ValueError(f"target {url!r}: bad port") from None
        path = parts.path if parts.path not in ("", "/") else "/metrics"
        return cls(f"http://{parts.netloc}{'' if path == '/metrics' else path}",
                   parts.hostname, port, path + (f"?{parts.query}" if parts.query else ""),
                   parts.netloc)


@dataclass(frozen=True, slots=True)
class CollectorOptions:
    targets: tuple[Target, ...]
    db: str
    interval: float = 5.0
    host: str = "127.0.0.1"
    port: int = 0
    admin_token: str | None = None
    # Sent to the targets' /admin/keys; repr=False: never echoed with the options.
    target_token: str | None = field(default=None, repr=False)
    retention_s: float = 7 * 86400
    scrape_timeout: float = 5.0  # capped at the interval
    heartbeat_s: float = 15.0
    send_timeout_s: float = 5.0
    max_queued_events: int = 8


class ScrapeError(Exception):
    pass


async def scrape(target: Target, max_bytes: int = MAX_EXPOSITION) -> str:
    """GET the target's exposition: status 200, else ScrapeError; a failure to get an
    answer is a ``client.ClientError``; the caller sets the timeout."""
    status, body = await fetch(target, target.path, "text/plain", max_bytes=max_bytes)
    if status != 200:
        raise ScrapeError(f"HTTP {status} from {target.path}")
    return body.decode("utf-8", errors="replace")


async def fetch(target: Target, path: str, accept: str, *, token: str | None = None,
                max_bytes: int = MAX_EXPOSITION) -> tuple[int, bytes]:
    """GET ``path`` from the target: (status, body), or ``client.ClientError``; the caller
    sets the timeout. ``token`` goes into ``Authorization: Bearer`` and nowhere else."""
    headers = [("accept", accept), ("user-agent", f"zaiproxy-collect/{__version__}")]
    if token is not None:
        headers.append(("authorization", f"Bearer {token}"))
    url = client.Url("http", target.host, target.port, path, target.authority)
    response = await client.get(url, headers=headers, max_body=max_bytes)
    return response.status, response.body


@dataclass(eq=False)
class TargetState:
    target: Target
    snapshots: dict[str, VariantSnapshot] | None = None  # the last successful scrape
    rates: dict[str, Rates] = field(default_factory=dict)  # against the scrape before it
    scraped_at: float | None = None  # trio clock of the last successful scrape
    last_success: float | None = None  # wall clock
    last_error: str | None = None
    last_error_at: float | None = None
    consecutive_failures: int = 0
    scrapes: int = 0
    failures: int = 0
    # Z.AI's quota per upstream key from the last successful scrape's zai_proxy_quota_*
    # series ([]: the target does not poll), in /admin/keys' zai_quota shape.
    quota: list[dict[str, Any]] | None = None

    @property
    def stale(self) -> bool:
        return self.snapshots is None or self.consecutive_failures > 0

    def to_json(self) -> dict[str, Any]:
        return {"target": self.target.url, "stale": self.stale, "last_success": self.last_success,
                "last_error": self.last_error, "last_error_at": self.last_error_at,
                "consecutive_failures": self.consecutive_failures, "scrapes": self.scrapes,
                "failures": self.failures,
                "variants": {v: r.to_json() for v, r in sorted(self.rates.items())}}


def _parse(text: str) -> tuple[dict[str, VariantSnapshot], dict[str, dict[str, Any]]]:
    """A scrape's snapshots per variant and its Z.AI quota series (``ParseError`` for what
    is not an exposition)."""
    snaps = snapshot.parse(text)
    try:
        gauges = quota_gauges(text)
    except (ValueError, TypeError, IndexError, KeyError) as exc:
        raise snapshot.ParseError(f"zai_proxy_quota_* series: {exc}") from exc
    return snaps, gauges


# ---- server-sent events ------------------------------------------------------------


@dataclass(eq=False)
class _Subscriber:
    sid: int
    send: trio.MemorySendChannel[bytes]
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    evicted: str | None = None


class EventHub:
    """Fans each ``metrics`` event out to every ``/admin/events`` consumer, never waiting."""

    def __init__(self, *, max_queued: int, send_timeout: float, heartbeat: float) -> None:
        self.max_queued = max_queued
        self.send_timeout = send_timeout
        self.heartbeat = heartbeat
        self.dropped = 0
        self._subs: dict[int, _Subscriber] = {}
        self._ids = count()

    @property
    def subscribers(self) -> int:
        return len(self._subs)

    def publish(self, data: bytes) -> None:
        for sub in list(self._subs.values()):
            try:
                sub.send.send_nowait(data)
            except trio.WouldBlock:
                self._evict(sub, "queue_full")

    def _evict(self, sub: _Subscriber, why: str) -> None:
        if sub.evicted is None:
            sub.evicted = why
            self.dropped += 1
            self._subs.pop(sub.sid, None)  # gone at once, not at the task's next checkpoint
            sub.scope.cancel()
            get_logger().warning("events_consumer_dropped", reason=why)

    async def serve(self, write: Callable[[bytes], Awaitable[None]], first: bytes) -> str:
        """Write ``first``, then queued events and heartbeats, until the consumer is
        dropped (``queue_full`` / ``send_timeout``) or ``write`` raises (it left)."""
        send, recv = trio.open_memory_channel[bytes](self.max_queued)
        sub = _Subscriber(next(self._ids), send)
        self._subs[sub.sid] = sub
        try:
            with sub.scope:
                data: bytes | None = first
                next_beat = trio.current_time() + self.heartbeat
                while True:
                    if data is None:
                        with trio.move_on_at(next_beat):
                            data = await recv.receive()
                    if data is None:
                        data, next_beat = _HEARTBEAT, trio.current_time() + self.heartbeat
                    with trio.move_on_after(self.send_timeout) as timer:
                        await write(data)
                    if timer.cancelled_caught:
                        self._evict(sub, "send_timeout")
                    data = None
        finally:
            self._subs.pop(sub.sid, None)
            send.close()
            recv.close()
        return sub.evicted or "closed"


# ---- the collector ------------------------------------------------------------------


@dataclass
class StorageHealth:
    ok: bool = True
    errors: int = 0
    last_error: str | None = None
    dropped_batches: int = 0  # row batches dropped because the writer fell behind


class Collector:
    def __init__(self, options: CollectorOptions) -> None:
        if not options.targets:
            raise ValueError("at least one target is needed")
        self.options = options
        self.states = [TargetState(t) for t in options.targets]
        self.store = Store(options.db)
        self.hub = EventHub(max_queued=options.max_queued_events,
                            send_timeout=options.send_timeout_s, heartbeat=options.heartbeat_s)
        self.storage = StorageHealth()
        self._limiter = trio.CapacityLimiter(1)
        self._rows_send, self._rows_recv = trio.open_memory_channel[list[tuple[Any, ...]]](64)
        self.responder = Responder(self._handle, name="collector")
        self.log = get_logger()

    async def storage_call(self, fn: Callable[..., T], *args: Any) -> T | None:
        """Run one Store call in the DuckDB thread; errors degrade (logged, counted, None)."""
        try:
            result = await trio.to_thread.run_sync(fn, *args, limiter=self._limiter)
        except Exception as exc:  # storage degrades, whatever it raises (monitoring never takes itself down)
            health, message = self.storage, str(exc)[:500]
            if health.ok or health.last_error != message:  # a change, not every retry
                self.log.error("storage_error", error=message, db=self.options.db)
            health.ok, health.last_error = False, message
            health.errors += 1
            return None
        self.storage.ok = True
        return result

    async def run(self, *, task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """Serve the admin API and scrape until cancelled; reports the bound (host, port)."""
        listeners = await trio.open_tcp_listeners(self.options.port, host=self.options.host)
        addr = listeners[0].socket.getsockname()
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(self.responder.serve, listeners)
                nursery.start_soon(self._writer)
                nursery.start_soon(self._scrape_loop)
                task_status.started((addr[0], addr[1]))
                if self.options.admin_token is None and not is_loopback(addr[0]):
                    self.log.warning("admin_api_open", host=addr[0], hint="set --admin-token or "
                                     "ZAIPROXY_ADMIN_TOKEN: status and history are readable "
                                     "by anyone who can reach this port")
                self.log.info("started", host=addr[0], port=addr[1], db=self.options.db,
                              interval=self.options.interval,
                              targets=[t.url for t in self.options.targets])
        finally:
            with trio.CancelScope(shield=True):
                await self._flush_and_close()

    async def _flush_and_close(self) -> None:
        rows: list[tuple[Any, ...]] = []
        while True:
            try:
                rows += self._rows_recv.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                break
        if rows:
            await self.storage_call(self.store.insert, rows)
        await self.storage_call(self.store.close)

    async def _writer(self) -> None:
        """The only task that writes: rows as they come, retention at start and every 10 min."""
        last_prune = time.time()
        await self.storage_call(self.store.prune, last_prune - self.options.retention_s)
        async for rows in self._rows_recv:
            await self.storage_call(self.store.insert, rows)
            if time.time() - last_prune > 600:
                last_prune = time.time()
                await self.storage_call(self.store.prune, last_prune - self.options.retention_s)

    async def _scrape_loop(self) -> None:
        interval = self.options.interval
        tick = trio.current_time()
        while True:
            await self.scrape_all()
            tick += interval
            now = trio.current_time()
            if tick < now:  # a slow round: skip the ticks it overran, keep the phase
                tick += math.ceil((now - tick) / interval) * interval
            await trio.sleep_until(tick)

    async def scrape_all(self) -> None:
        """One round: every target at once, then store the rows and publish the status."""
        wall = time.time()
        async with trio.open_nursery() as nursery:
            for state in self.states:
                nursery.start_soon(self._scrape_target, state)
        rows = [row_of(wall, s.target.url, r) for s in self.states if not s.stale
                for r in s.rates.values()]
        if rows:
            try:
                self._rows_send.send_nowait(rows)
            except trio.WouldBlock:
                self.storage.dropped_batches += 1
                self.log.warning("storage_backlog_dropped", rows=len(rows))
        if self.hub.subscribers:
            self.hub.publish(sse_event("metrics", self.status()))

    async def _scrape_target(self, state: TargetState) -> None:
        started = trio.current_time()
        timeout = min(self.options.scrape_timeout, self.options.interval)
        error: str | None = None
        try:
            with trio.fail_after(timeout):
                text = await scrape(state.target)
            # Pure Python over ~10^4 lines per big proxy: off the loop that serves the API.
            snaps, gauges = await trio.to_thread.run_sync(_parse, text)
        except trio.TooSlowError:
            error = f"timed out after {timeout:g}s"
        except (client.ClientError, ScrapeError, snapshot.ParseError) as exc:
            error = f"{type(exc).__name__}: {exc}"[:500]
        except Exception as exc:  # a target must never stop the collector
            self.log.error("scrape_failed", target=state.target.url, error=repr(exc)[:500])
            error = f"internal error: {exc!r}"[:500]
        if error is not None:
            if not state.consecutive_failures:  # log the change, not every failed round
                self.log.warning("target_stale", target=state.target.url, error=error)
            state.failures += 1
            state.consecutive_failures += 1
            state.last_error, state.last_error_at = error, time.time()
            return
        if state.consecutive_failures:
            self.log.info("target_recovered", target=state.target.url,
                          failures=state.consecutive_failures)
        rates: dict[str, Rates] = {}
        if state.snapshots is not None and state.scraped_at is not None:
            seconds = started - state.scraped_at
            for variant, cur in snaps.items():
                prev = state.snapshots.get(variant)
                if prev is not None:  # a variant seen for the first time has no rate yet
                    rates[variant] = snapshot.delta(prev, cur, seconds)
        state.snapshots, state.rates, state.scraped_at = snaps, rates, started
        state.last_success = time.time()
        state.quota = quota_entries(gauges, state.last_success, state.quota)
        state.consecutive_failures = 0
        state.scrapes += 1

    def status(self) -> dict[str, Any]:
        """Per target and per variant (fresh targets aggregated): latest rates + stale flags."""
        names = sorted({v for s in self.states for v in (s.snapshots or {})})
        variants: dict[str, Any] = {}
        for name in names:
            having = [s for s in self.states if s.snapshots and name in s.snapshots]
            fresh = [s for s in having if not s.stale]
            entry = snapshot.merge(name, [s.snapshots[name] for s in fresh
                                          if s.snapshots is not None]).to_json()
            rates = [s.rates[name] for s in fresh if name in s.rates]
            entry["rates"] = snapshot.combine(name, rates).to_json() if rates else None
            entry.update(targets=len(having), stale_targets=len(having) - len(fresh),
                         stale=not fresh)
            variants[name] = entry
        now = time.time()
        # Z.AI's quota per upstream key: the freshest sample among the fresh targets' scrapes.
        quota = merge_quota([s.quota for s in self.states if not s.stale]) or []
        return {"time": now, "source": "collector", "version": __version__,
                "interval_s": self.options.interval,
                "targets": [s.to_json() for s in self.states], "variants": variants,
                "zai_quota": quota_at(quota, now),
                "storage": asdict(self.storage),
                "events": {"subscribers": self.hub.subscribers, "dropped": self.hub.dropped}}

    async def history(self, range_: str, variant: str) -> dict[str, Any]:
        now = time.time()
        step = max(STEPS[range_], self.options.interval)
        series = await self.storage_call(self.store.history, now - RANGES[range_], step, variant)
        if series is None:
            raise ServiceUnavailable(f"history is unavailable: {self.storage.last_error}")
        return {"source": "collector", "range": range_, "variant": variant, "step_s": step,
                "from": now - RANGES[range_], "to": now, "series": series}

    async def keys(self) -> dict[str, Any]:
        """``GET /admin/keys`` for the fleet: every fresh target asked at once (see above)."""
        results: list[dict[str, Any] | str] = [
            f"stale: {s.last_error or 'not scraped yet'}" for s in self.states]
        async with trio.open_nursery() as nursery:
            for i, state in enumerate(self.states):
                if not state.stale:
                    nursery.start_soon(self._target_keys, state.target, results, i)
        reports = [r for r in results if isinstance(r, dict)]
        keys, global_ = merge_keys(reports)
        answer = {"mode": "fleet", "source": "collector", "scope": merge_scope(reports),
                  "targets": [{"target": s.target.url, "ok": isinstance(r, dict),
                               "error": None if isinstance(r, dict) else r}
                              for s, r in zip(self.states, results, strict=True)],
                  "keys": keys, "global": global_, "adaptive": None}
        # Absent (not []) when no answering target says anything: older proxies.
        quota = merge_quota([r.get("zai_quota") for r in reports])
        if quota is not None:
            answer["zai_quota"] = quota
        upstreams = merge_upstreams([r.get("upstreams") for r in reports])
        if upstreams is not None:
            answer["upstreams"] = upstreams
        return answer

    async def _target_keys(self, target: Target, results: list[dict[str, Any] | str],
                           i: int) -> None:
        timeout = min(self.options.scrape_timeout, self.options.interval)
        try:
            with trio.fail_after(timeout):
                status, body = await fetch(target, "/admin/keys", "application/json",
                                           token=self.options.target_token)
            if status != 200:
                results[i] = keys_error(status, body)
                return
            report = orjson.loads(body)
            if not isinstance(report, dict) or not isinstance(report.get("keys"), list):
                results[i] = "not a keys report"
            else:
                results[i] = report
        except trio.TooSlowError:
            results[i] = f"timed out after {timeout:g}s"
        except (client.ClientError, orjson.JSONDecodeError) as exc:
            results[i] = f"{type(exc).__name__}: {exc}"[:500]

    # ---- admin HTTP (the HTTP itself: http/responder.py) ---------------------------

    async def serve_connection(self, stream: trio.abc.Stream) -> None:
        """Serve the admin API on one connection (``run`` serves every one it accepts)."""
        await self.responder.serve_connection(stream)

    async def _handle(self, request: Request) -> Answer | Streamed:
        """Answer one admin API request (a ProxyError raised here is answered as such)."""
        method, path = request.method, request.path
        if method not in ("GET", "HEAD"):
            raise MethodNotAllowed(f"{method} is not allowed: use GET",
                                   headers=((b"allow", b"GET, HEAD"),))
        if path == "/health":
            return Answer.json(200, {"status": "ok", "source": "collector",
                                     "version": __version__, "targets": len(self.states),
                                     "fresh": sum(not s.stale for s in self.states)})
        if path not in ("/admin/status", "/admin/history", "/admin/events", "/admin/keys"):
            raise NotFound(f"no route for {redact_path(path)}")
        # Read-only routes: the token when one is set (collector routes never mutate).
        check_admin(self.options.admin_token, request.headers, "", mutating=False)
        if path == "/admin/status":
            return Answer.json(200, self.status())
        if path == "/admin/keys":
            return Answer.json(200, await self.keys())
        if path == "/admin/history":
            range_, variant = parse_history_params(request.query)
            return Answer.json(200, await self.history(range_, variant))
        if method == "HEAD":
            raise MethodNotAllowed("an event stream has no HEAD: use GET",
                                   headers=((b"allow", b"GET"),))
        first = sse_event("connected", {"source": "collector", "interval_s": self.options.interval,
                                        "heartbeat_s": self.options.heartbeat_s,
                                        "targets": [s.target.url for s in self.states]})
        first += sse_event("metrics", self.status())
        return Streamed(200, _SSE_HEADERS, lambda write: self.hub.serve(write, first),
                        send_buffer=_SSE_SNDBUF)


# ---- command line -------------------------------------------------------------------


def main(ns: argparse.Namespace, out: TextIO | None = None) -> int:
    """``zaiproxy collect`` (arguments declared in cli.py); runs until SIGTERM/SIGINT."""
    out = sys.stdout if out is None else out  # per call: a redirected stdout is obeyed
    from zaiproxy.core import logs

    try:
        options = CollectorOptions(
            targets=tuple(Target.parse(t) for t in ns.target), db=ns.db,
            interval=parse_duration(ns.interval, "--interval"), host=ns.host, port=ns.port,
            admin_token=ns.admin_token or os.environ.get("ZAIPROXY_ADMIN_TOKEN") or None,
            # getattr: an argparse namespace from a cli.py without --target-token still runs.
            target_token=getattr(ns, "target_token", None)
            or os.environ.get(TARGET_ADMIN_TOKEN_ENV) or None,
            retention_s=parse_duration(ns.retention, "--retention"),
            scrape_timeout=parse_duration(ns.scrape_timeout, "--scrape-timeout"),
            heartbeat_s=parse_duration(ns.heartbeat, "--heartbeat"))
        urls = [t.url for t in options.targets]
        if len(set(urls)) != len(urls):
            raise ValueError("a target is given twice: " + ", ".join(
                sorted({u for u in urls if urls.count(u) > 1})))
        logs.configure(ns.log_level, proc="collector")
    except ValueError as exc:
        sys.stderr.write(f"zaiproxy collect: {exc}\n")
        return 2
    failed: list[OSError] = []
    try:
        trio.run(_main, options, out)
    except* OSError as group:  # only binding the admin API raises this far
        failed += [e for e in group.exceptions if isinstance(e, OSError)]
    if failed:
        sys.stderr.write(f"zaiproxy collect: cannot listen on {options.host}:{options.port}: "
                         f"{failed[0]}\n")
        return 1
    return 0


async def _main(options: CollectorOptions, out: TextIO) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            host, port = await nursery.start(Collector(options).run)
            shown = f"[{host}]" if ":" in host else host
            out.write(f"zaiproxy collect listening on http://{shown}:{port} "
                      f"({len(options.targets)} targets, every {options.interval:g}s, "
                      f"db {options.db})\n")
            out.flush()
            async for signum in signals:
                get_logger().info("stopping", signal=signum)
                break
            nursery.cancel_scope.cancel()

