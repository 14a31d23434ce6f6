"""The admin API of a proxy: what the TUI and scripts read (DESIGN.md "Contracts").

- ``GET /admin/status``: the current snapshot per variant (from the shared
  metrics: totals of every worker, whichever worker answers);
- ``GET /admin/history?range=5m|15m|1h|6h|24h|7d&variant=production|canary|all``:
  JSON series from the recorder (the only process that may open the DuckDB file);
- ``GET /admin/keys``: per client key (aliases only) its limits, what is used and
  what remains, and its token totals;
- ``GET /admin/events``: server-sent events: one ``connected`` event, then a
  ``metrics`` snapshot every interval and ``: heartbeat`` comments; a consumer
  too slow to take an event within the send timeout is dropped, never waited for;
- ``POST /admin/reset-rate-limit``: see ``server.py``.

Every route needs ``Authorization: Bearer <admin token>`` when one is configured.
Parameters are validated here (pure), with 400s that say what is allowed.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

import orjson
import trio

from zaiproxy.errors import BadRequest, ServiceUnavailable
from zaiproxy.limits import LIMIT_NAMES
from zaiproxy.snapshot import parse as parse_exposition

if TYPE_CHECKING:
    from zaiproxy.context import WorkerContext

RANGES: dict[str, int] = {"5m": 300, "15m": 900, "1h": 3600, "6h": 21600, "24h": 86400,
                          "7d": 604800}
EVENTS_INTERVAL_S = 2.0
HEARTBEAT_S = 15.0
SEND_TIMEOUT_S = 5.0  # a consumer that cannot take one event in this long is dropped


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


def keys_report(ctx: WorkerContext) -> dict[str, Any]:
    """Per client key: limits, used and remaining now, token totals. Aliases only, never keys."""
    table = ctx.keys
    if table is None:
        return {"mode": "open", "keys": []}
    admitter = ctx.admitter
    out = []
    now = admitter.clock()
    ledger = ctx.ledger
    for key in table:
        plan = admitter.plan(key.alias, key.limits)
        limits: dict[str, Any] = {}
        for op in plan.ops:
            if op.scope != "key":
                continue
            if op.kind == admitter.impl.KIND_GCRA:
                remaining, reset_ns = ledger.gcra_state(op.index, op.limit, op.period_ns, now)
                limits[op.name] = {"limit": op.limit, "remaining": remaining,
                                   "reset_s": round(reset_ns / 1e9, 3)}
            elif op.kind == admitter.impl.KIND_CONCURRENCY:
                used = ledger.in_use(op.index)
                limits[op.name] = {"limit": op.limit, "in_use": used,
                                   "remaining": max(0, op.limit - used)}
            else:
                used = ledger.window_used(op.index, op.period_ns, now)
                limits[op.name] = {"limit": op.limit, "used": used,
                                   "remaining": max(0, op.limit - used)}
        configured = {name: getattr(key.limits, name) for name in LIMIT_NAMES
                      if getattr(key.limits, name) is not None}
        out.append({
            "alias": key.alias, "enabled": key.enabled,
            "models": sorted(key.models) if key.models else None,
            "limits": configured, "now": limits, "usage": ctx.key_usage(key.alias),
        })
    return {"mode": "keys", "keys": out}


def status_report(ctx: WorkerContext) -> dict[str, Any]:
    """The current snapshot per variant, from this host's shared metrics (all workers)."""
    payload, _ = ctx.metrics.render()
    # The same exposition parser as the fleet collector's: one notion of a snapshot.
    variants = parse_exposition(payload.decode())
    return {
        "time": time.time(),
        "source": "proxy",
        "worker": ctx.worker_index,
        "ledger": ctx.ledger_impl,
        "variants": {name: snap.to_json() for name, snap in variants.items()},
    }


def sse_event(name: str, data: dict[str, Any]) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


async def stream_events(ctx: WorkerContext, client: Any, *, interval: float = EVENTS_INTERVAL_S,
                        heartbeat: float = HEARTBEAT_S, send_timeout: float = SEND_TIMEOUT_S) -> None:
    """Serve ``/admin/events`` on ``client`` until it leaves, is too slow, or the proxy drains."""
    client.queue_response(200, [(b"content-type", b"text/event-stream"),
                                (b"cache-control", b"no-cache"),
                                (b"x-zaiproxy-request-id", client.request_id)])
    client.queue_data(sse_event("connected", {"worker": ctx.worker_index,
                                              "variant": ctx.config.deployment_variant,
                                              "interval_s": interval}))
    next_beat = trio.current_time() + heartbeat
    while not ctx.draining:
        client.queue_data(sse_event("metrics", status_report(ctx)))
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
