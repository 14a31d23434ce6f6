"""The control routes: ``/health``, ``/ready``, ``/metrics`` and the admin API.

They answer from this worker's view of the host (the shared segment and metrics) and
never go upstream. Admin routes are token-checked first (:mod:`.admin_access`); their
bodies are built in :mod:`.admin`.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import orjson

from zaiproxy import __version__
from zaiproxy.core.logs import get_logger
from zaiproxy.http.connection import ClientConnection
from zaiproxy.http.http11 import h11
from zaiproxy.limits import report as limits_report
from zaiproxy.limits.cells import SC_ADAPTIVE_MRPS, SC_ADAPTIVE_RESET
from zaiproxy.request import admin, scanner
from zaiproxy.request.admin_access import check_admin
from zaiproxy.request.routing import Control

if TYPE_CHECKING:
    from zaiproxy.request.context import WorkerContext


async def serve(ctx: WorkerContext, conn: ClientConnection, control: Control,
                request: h11.Request) -> None:
    """Answer one control request on ``conn``; raises ProxyError (401/403/400/503)."""
    head = request.method == b"HEAD"
    if control is Control.HEALTH:
        adaptive = limits_report.adaptive_state(ctx.config, ctx.ledger)
        body = orjson.dumps({
            "status": "ok", "version": __version__, "variant": ctx.config.deployment_variant,
            "ledger": ctx.ledger_impl, "http": ctx.http_impl, "relay": scanner.IMPLEMENTATION,
            "worker": ctx.worker_index,
            "pid": os.getpid(), "keys": len(ctx.keys) if ctx.keys is not None else None,
            "adaptive_rate_rps": adaptive["rate_rps"],
            # Why the rate is capped (a Z.AI throttle class) and when the cap is gone.
            "adaptive_reason": adaptive["reason"],
            "adaptive_free_in_s": adaptive["free_in_s"],
            "warnings": admin.warnings(ctx),
            # Where the limits live; with Redis, whether this host reaches it now.
            "limits": limits_report.backend_state(ctx.config, ctx.ledger),
            # Z.AI's own quota, as the original's /health showed it (limits/zai_quota.py).
            "quota": admin.zai_quota_health(ctx),
        })
        await conn.send_simple(200, body, head=head)
    elif control is Control.READY:
        ready = ctx.ready
        body = orjson.dumps({"ready": ready, "draining": ctx.draining or ctx.shutting_down,
                             "worker": ctx.worker_index})
        await conn.send_simple(200 if ready else 503, body, head=head)
    elif control is Control.METRICS:
        payload, content_type = ctx.metrics.render()
        await conn.send_simple(200, payload, content_type=content_type, head=head)
    elif control is Control.RESET_RATE_LIMIT:
        check_admin(ctx.config.admin_token, request.headers, conn.client_ip, mutating=True)
        ctx.ledger.scalar_set(SC_ADAPTIVE_MRPS, 0)  # effective at once, in every worker
        generation = ctx.ledger.scalar_add(SC_ADAPTIVE_RESET, 1)  # the supervisor forgets
        get_logger().warning("adaptive_rate_reset_requested", client=conn.client_ip,
                             generation=generation)
        await conn.send_simple(200, orjson.dumps({"reset": True, "generation": generation}))
    else:
        check_admin(ctx.config.admin_token, request.headers, conn.client_ip, mutating=False)
        if control is Control.STATUS:
            await conn.send_simple(200, orjson.dumps(admin.status_report(ctx)))
        elif control is Control.KEYS:
            await conn.send_simple(200, orjson.dumps(await admin.keys_report(ctx)))
        elif control is Control.HISTORY:
            query = request.target.partition(b"?")[2].decode("ascii", "replace")
            range_, variant = admin.parse_history_params(query)
            await conn.send_simple(200, orjson.dumps(await admin.history_report(ctx, range_,
                                                                                variant)))
        else:
            await admin.stream_events(ctx, conn)
