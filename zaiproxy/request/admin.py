"""The admin API of a proxy: what the TUI and scripts read (docs/architecture.md).

- ``GET /admin/status``: the current snapshot per variant (from the shared
  metrics: totals of every worker, whichever worker answers);
- ``GET /admin/history?range=5m|15m|1h|6h|24h|7d&variant=production|canary|all``:
  JSON series from the recorder (the only process that may open the DuckDB file);
- ``GET /admin/keys``: per client key (aliases only) its limits, what is used and
  what remains, its requests by outcome and its token totals;
- ``GET /admin/events``: server-sent events: one ``connected`` event, then a
  ``metrics`` snapshot every interval and ``: heartbeat`` comments; a consumer
  too slow to take an event within the send timeout is dropped, never waited for;
- ``POST /admin/reset-rate-limit``: see ``control.py``.

Every route needs ``Authorization: Bearer <admin token>`` when one is configured; without
one, ``POST`` routes answer only loopback clients (``admin_access.py``).
Parameters are validated here (pure), with 400s that say what is allowed.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

import orjson
import trio

from zaiproxy.core.errors import BadRequest, ServiceUnavailable
from zaiproxy.core.limitspec import LIMIT_NAMES
from zaiproxy.limits import report as limits_report
from zaiproxy.observe.snapshot import VariantSnapshot, delta, parse_families
from zaiproxy.request.admin_access import security_warnings

if TYPE_CHECKING:
    from zaiproxy.request.context import WorkerContext

RANGES: dict[str, int] = {"5m": 300, "15m": 900, "1h": 3600, "6h": 21600, "24h": 86400,
                          "7d": 604800}


def parse_history_params(query: str) -> tuple[str, str]:
    """(range, variant) from a query string; BadRequest naming what is allowed."""
    try:
        params = parse_qs(query, keep_blank_values=True, strict_parsing=False)
    except ValueError:
        raise BadRequest("malformed query string") from None
    unknown = sorted(set(params) - {"range", "variant"})
    if unknown:
        raise BadRequest(f"unknown parameter(s) {', '.join(unknown)}: use range and variant")
    range_ = _one(params, "range", "1h")
    if range_ not in RANGES:
        raise BadRequest(f"range must be one of {', '.join(RANGES)} (got {range_[:32]!r})")
    variant = _one(params, "variant", "all")
    if variant != "all" and not _is_variant(variant):
        raise BadRequest("variant must be a variant name (e.g. production, canary) or all")
    return range_, variant


def _one(params: dict[str, list[str]], name: str, default: str) -> str:
    values = params.get(name)
    if not values:
        return default
    if len(values) > 1:
        raise BadRequest(f"{name} given more than once")
    return values[0]


def _is_variant(value: str) -> bool:
    return (0 < len(value) <= 32 and value[0].isalnum()
            and all(c.islower() or c.isdigit() or c in "_-" for c in value))


async def keys_report(ctx: WorkerContext) -> dict[str, Any]:
    """Limits now: proxy-wide (``global``), the adaptive rate, and per client key its limits,
    used and remaining, state and ``usage``. Aliases only, never keys.

    ``usage`` (``key_usage.usage_report``): ``requests``, every request the key sent, and
    that number by outcome: ``ok``, then ``/admin/status``'s failure kinds ``proxy_429``
    (refused by the proxy's limits), ``zai_429`` (Z.AI's, relayed), ``other_4xx`` (with 499,
    the client gone) and ``5xx``; then the token totals: ``charged_requests`` (the requests
    whose usage was charged), ``input_tokens``, ``output_tokens``, ``cache_read_tokens``,
    ``cache_write_tokens``.

    Every state object is read at one instant (one call to the limits backend: with the fleet
    backend, one script call reading Redis on its clock); their shapes are in
    ``limits_report.py``. ``scope`` says whose numbers they are: ``host`` (this host's ledger)
    or ``fleet`` (every proxy sharing the Redis budget).
    """
    limiter = ctx.admitter
    keys = list(ctx.keys or ())
    shared = [op for op in limiter.plan(None, None).ops
              if op.scope in limits_report.SHARED_SCOPES and not op.adaptive]
    own = [[op for op in limiter.plan(key.alias, key.limits).ops
            if op.scope in limits_report.KEY_SCOPES and not op.adaptive] for key in keys]
    states = await limiter.limit_states(shared + [op for ops in own for op in ops])
    totals = await limiter.usage_totals([key.alias for key in keys])
    by_op = iter(states)
    report: dict[str, Any] = {
        "mode": "open" if ctx.keys is None else "keys", "keys": [],
        "scope": "fleet" if limiter.fleet else "host",
        "global": {limits_report.report_name(op): next(by_op) for op in shared},
        "adaptive": limits_report.adaptive_state(ctx.config, ctx.ledger),
    }
    for key, ops, usage in zip(keys, own, totals, strict=True):
        key_states = {limits_report.report_name(op): next(by_op) for op in ops}
        limited = limits_report.limited_by(key_states)
        configured = {name: getattr(key.limits, name) for name in LIMIT_NAMES
                      if getattr(key.limits, name) is not None}
        report["keys"].append({
            "alias": key.alias, "enabled": key.enabled,
            "state": limits_report.key_state(key.enabled, limited), "limited_by": limited,
            "models": sorted(key.models) if key.models else None,
            "limits": configured, "now": key_states, "usage": usage,
        })
    report["zai_quota"] = zai_quota(ctx)
    # The pool of upstream keys: per key whether it rests and why, its headroom, its pins
    # (limits/upstream_pool.py); one entry ("default") without a pool file.
    report["upstreams"] = ctx.upstream_pool.report() if ctx.upstream_pool is not None else []
    return report


def zai_quota(ctx: WorkerContext) -> list[dict[str, Any]]:
    """Z.AI's own quota per upstream key, as the host's poller last read it, with the pacing
    decision (``limits/zai_quota.py``; ``QuotaView.report`` has the shape); [] when not
    polled. Beside it, ``global`` holds the proxy's own counts of its rolling windows."""
    reader = ctx.metrics.zai_quota
    if reader is None:
        return []
    now = time.time()
    return [view.report(now, pace) for view, pace in reader()]


def zai_quota_health(ctx: WorkerContext) -> dict[str, Any]:
    """``/health``'s ``quota`` object, in the original service's shape."""
    reader = ctx.metrics.zai_quota
    if reader is None:
        return {"enabled": False, "fresh": False}
    return reader()[0][0].health(time.time())  # the first upstream key, as the original


def warnings(ctx: WorkerContext) -> list[str]:
    """What an operator must see: ``admin_api_open`` (admin_access.py) and
    ``limits_redis_unavailable`` (a worker of this host decides by the fail policy)."""
    out = security_warnings(ctx.config.host, ctx.config.admin_token)
    if limits_report.backend_state(ctx.config, ctx.ledger)["state"] == "degraded":
        out = [*out, "limits_redis_unavailable"]
    return out


def status_report(ctx: WorkerContext) -> dict[str, Any]:
    """The current snapshot per variant, from this host's shared metrics (all workers)."""
    return status_snapshots(ctx)[0]


def status_snapshots(ctx: WorkerContext) -> tuple[dict[str, Any], dict[str, VariantSnapshot]]:
    """``status_report``'s body and the parsed snapshots it was made from (for rates)."""
    # The collector's parser, fed the families instead of their text: one notion of a
    # snapshot, without ~10 ms of text parsing on this worker's loop per event.
    variants = parse_families(ctx.metrics.families())
    return {
        "time": time.time(),
        "source": "proxy",
        "worker": ctx.worker_index,
        "ledger": ctx.ledger_impl,
        # e.g. "admin_api_open" (admin_access.py): the TUI shows it on its status line.
        "warnings": warnings(ctx),
        "limits": limits_report.backend_state(ctx.config, ctx.ledger),
        "zai_quota": zai_quota(ctx),
        "variants": {name: snap.to_json() for name, snap in variants.items()},
    }, variants


def sse_event(name: str, data: dict[str, Any]) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


async def stream_events(ctx: WorkerContext, client: Any) -> None:
    """Serve ``/admin/events`` on ``client`` until it leaves, is too slow, or the proxy drains.

    Each ``metrics`` event is ``/admin/status`` whose variants also carry ``rates``:
    ``snapshot.delta`` against this stream's previous event (``null`` on the first event
    and for a variant not seen before), the same shape as the collector's per-variant rates.
    """
    interval, heartbeat, send_timeout = (ctx.events.interval, ctx.events.heartbeat,
                                         ctx.events.send_timeout)
    client.queue_response(200, [(b"content-type", b"text/event-stream"),
                                (b"cache-control", b"no-cache"),
                                (b"x-zaiproxy-request-id", client.request_id)])
    client.queue_data(sse_event("connected", {"worker": ctx.worker_index,
                                              "variant": ctx.config.deployment_variant,
                                              "interval_s": interval}))
    next_beat = trio.current_time() + heartbeat
    previous: dict[str, VariantSnapshot] = {}
    previous_at = 0.0
    while not ctx.draining:
        # The trio clock, not the wall clock: a wall-clock step must not distort a rate.
        now = trio.current_time()
        report, snaps = status_snapshots(ctx)
        for name, snap in snaps.items():
            prev = previous.get(name)
            report["variants"][name]["rates"] = (
                None if prev is None else delta(prev, snap, now - previous_at).to_json())
        previous, previous_at = snaps, now
        client.queue_data(sse_event("metrics", report))
        with trio.move_on_after(send_timeout) as scope:
            await client.flush()
        if scope.cancelled_caught:
            # The consumer does not read: drop it rather than hold a snapshot per interval.
            await client.abort()
            return
        deadline = trio.current_time() + interval
        while trio.current_time() < deadline and not ctx.draining:
            await trio.sleep(min(deadline, next_beat) - trio.current_time())
            if trio.current_time() >= next_beat:
                client.queue_data(b": heartbeat\n\n")
                next_beat = trio.current_time() + heartbeat
                with trio.move_on_after(send_timeout) as scope:
                    await client.flush()
                if scope.cancelled_caught:
                    await client.abort()
                    return
    client.queue_end()
    await client.flush()


async def history_report(ctx: WorkerContext, range_: str, variant: str) -> dict[str, Any]:
    """History series from the recorder process (the DuckDB file's only owner)."""
    query = getattr(ctx, "history_query", None)
    if query is None:
        raise ServiceUnavailable("history is not recorded by this proxy (history recording is off)")
    result: dict[str, Any] = await query(range_, variant)
    return result
