"""A deterministic fleet for the TUI's tests: admin API documents and a fixture source.

Everything is a function of a fixed ``NOW`` so screenshots never change: a
production variant at ~20 req/s and a canary at ~2 req/s whose latency and
error rate are worse (what the canary comparison should make obvious). The
documents have the collector's shapes (``/admin/history`` as rates per step,
``metrics`` events with ``rates``); keys come in the proxy's ``/admin/keys``
shape.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Callable
from typing import Any

from zaiproxy_tui.model import (
    RANGES,
    History,
    KeysReport,
    Snapshot,
    parse_history,
    parse_keys,
    parse_snapshot,
)
from zaiproxy_tui.source import Connected, NotServed, SourceError, Unauthorized

NOW = 1795828000.0  # 2026-11-28 01:06:40 UTC
STEPS = {"5m": 5, "15m": 15, "1h": 60, "6h": 300, "24h": 900, "7d": 3600}


def _rates(variant: str, t: float, seconds: float) -> dict[str, Any]:
    canary = variant != "production"  # a canary by any name ("canary", "test" ...)
    wave = math.sin(t / 900.0)
    req = (2.0 + 0.5 * wave) if canary else (20.0 + 8.0 * wave)
    err = 0.06 if canary else 0.01
    p50 = (0.9 if canary else 0.6) + 0.1 * wave
    return {
        "variant": variant, "seconds": seconds, "reset": False,
        "requests": req * seconds, "requests_per_s": req,
        "errors_per_s": req * err, "error_rate": err,
        "client_errors_per_s": req * 0.04, "rate_limited_per_s": req * 0.02,
        "upstream_errors_per_s": req * err * 0.5, "rejections_per_s": req * 0.015,
        "zai_errors_per_s": req * 0.005,
        # The server's split of what failed for the clients (snapshot.failure_shares).
        "failure_shares": {"5xx": err, "proxy_429": 0.015, "zai_429": 0.005, "other_4xx": 0.02},
        "tokens_in_per_s": req * 1200.0, "tokens_out_per_s": req * 180.0,
        "tokens_cache_per_s": req * 300.0, "cost_usd_per_s": req * 0.0009,
        "latency_p50_s": p50, "latency_p95_s": p50 * (3.0 if canary else 2.0),
        "latency_p99_s": p50 * (5.0 if canary else 3.0),
        "ttft_p50_s": p50 * 0.4, "ttft_p95_s": p50 * 0.9, "ttft_p99_s": p50 * 1.4,
        "in_flight": req * 0.8, "streams_in_flight": req * 0.6, "adaptive_rate": 0.0,
        "concurrency_limit": 64.0 if not canary else 16.0, "workers": 2,
        "breakdown_per_s": {
            "status": {"200": req * (1 - err - 0.04), "400": req * 0.02, "429": req * 0.02,
                       "502": req * err * 0.5, "500": req * err * 0.5},
            "zai_errors": {"1302": req * 0.004, "1308": req * 0.001},
            "upstream_errors": {"connect": req * err * 0.3, "cut": req * err * 0.2},
            "rejections": {"key:requests_per_minute": req * 0.015},
            "retries": {"concurrency": req * 0.003},
            "adjustments": {"down": 0.0, "up": 0.0},
        },
    }


def history_doc(range_: str, variants: tuple[str, ...] = ("production", "canary"),
                now: float = NOW) -> dict[str, Any]:
    step = STEPS[range_]
    start = now - RANGES[range_]
    first = math.floor(start / step) * step
    series = {}
    for v in variants:
        points = []
        t = first
        while t < now:
            p = _rates(v, t, step)
            points.append({"t": t, "targets": 1, **{k: p[k] for k in p if k not in (
                "variant", "seconds", "requests", "breakdown_per_s", "concurrency_limit",
                "workers")}})
            t += step
        series[v] = points
    return {"source": "collector", "range": range_, "variant": "all", "step_s": step,
            "from": start, "to": now, "series": series}


def metrics_doc(now: float = NOW, variants: tuple[str, ...] = ("production", "canary"),
                interval: float = 2.0) -> dict[str, Any]:
    out = {}
    for v in variants:
        r = _rates(v, now, interval)
        out[v] = {
            "variant": v, "requests": 1_234_567.0 if v == "production" else 45_678.0,
            "in_flight": r["in_flight"], "streams_in_flight": r["streams_in_flight"],
            "adaptive_rate": 0.0, "concurrency_limit": r["concurrency_limit"], "workers": 2,
            "breakdown": {
                "status": {"200": 1_200_000.0, "429": 2_000.0, "500": 120.0, "502": 80.0},
                "zai_errors": {"1302": 900.0, "1308": 12.0},
                "upstream_errors": {"connect": 40.0, "cut": 20.0},
                "rejections": {"key:requests_per_minute": 1_100.0},
                "retries": {"concurrency": 300.0},
                "adjustments": {"down": 4.0, "up": 3.0},
            },
            "rates": r, "targets": 1, "stale_targets": 0, "stale": False,
            "versions": ["0.1.0"],
        }
    return {"time": now, "source": "collector", "interval_s": interval, "targets": [],
            "variants": out}


def keys_doc() -> dict[str, Any]:
    def gcra(limit: int, remaining: int, reset: float) -> dict[str, Any]:
        return {"limit": limit, "remaining": remaining, "reset_s": reset}

    def window(limit: int, used: int, reset: float) -> dict[str, Any]:
        return {"limit": limit, "used": used, "remaining": max(0, limit - used),
                "reset_s": reset, "releases": used // 10}

    def usage(req: int, refused: int = 0, zai_429: int = 0, other_4xx: int = 0,
              r5xx: int = 0) -> dict[str, Any]:
        ok = req - refused - zai_429 - other_4xx - r5xx
        return {"requests": req, "ok": ok, "proxy_429": refused, "zai_429": zai_429,
                "other_4xx": other_4xx, "5xx": r5xx, "charged_requests": ok,
                "input_tokens": ok * 1200, "output_tokens": ok * 180,
                "cache_read_tokens": 0, "cache_write_tokens": 0}

    return {
        "mode": "keys",
        "keys": [
            {"alias": "agent-fleet-a", "enabled": True, "models": None,
             "limits": {"requests_per_minute": 600, "tokens_per_5h": 5_000_000},
             "now": {"requests_per_minute": gcra(600, 412, 18.2),
                     "tokens_per_5h": window(5_000_000, 3_100_000, 7_980.0)},
             "usage": usage(48_211, 210, 12, 31, 8), "state": "ok", "limited_by": []},
            {"alias": "ci-bot", "enabled": True, "models": ["glm-4.6"],
             "limits": {"requests_per_minute": 60, "concurrency": 4},
             "now": {"requests_per_minute": gcra(60, 0, 42.0),
                     "concurrency": {"limit": 4, "in_use": 4, "remaining": 0}},
             "usage": usage(9_870, 4_120, 0, 2, 0), "state": "limited",
             "limited_by": ["requests_per_minute", "concurrency"]},
            {"alias": "alice", "enabled": True, "models": None,
             "limits": {"requests_per_week": 20_000},
             "now": {"requests_per_week": window(20_000, 2_400, 310_000.0)},
             "usage": usage(2_400, 0, 3, 0, 1), "state": "ok", "limited_by": []},
            {"alias": "old-laptop", "enabled": False, "models": None, "limits": {}, "now": {},
             "usage": usage(0), "state": "disabled", "limited_by": []},
        ],
        "global": {"requests_per_minute": gcra(3_000, 1_900, 22.0),
                   "concurrency": {"limit": 64, "in_use": 17, "remaining": 47},
                   "requests_per_5h": window(400_000, 161_000, 7_980.0),
                   "upstream_tokens_per_week": window(900_000_000, 830_000_000, 259_200.0)},
        "adaptive": {"enabled": True, "rate_rps": None, "min_rps": 0.5, "max_rps": 1000.0},
        # A current proxy that does not poll Z.AI's quota, without a pool file.
        "zai_quota": [],
        "upstreams": [upstream_doc("default", 0, headroom=0.078)],
    }


def upstream_doc(alias: str, index: int, *, headroom: float, resting_until: float | None = None,
                 reason: str | None = None, pinned: tuple[str, ...] = ()) -> dict[str, Any]:
    """One key of the pool as /admin/keys' ``upstreams`` has it (limits/upstream_pool.py)."""
    return {"alias": alias, "index": index, "resting": resting_until is not None,
            "resting_until": resting_until, "rest_reason": reason,
            "rests": 1 if resting_until is not None else 0, "switched_away": 0,
            "pinned_clients": list(pinned), "headroom": headroom}


def zai_quota_doc(alias: str, five_hour: float, weekly: float, *, age: float,
                  outcome: str = "success", stale_after: float = 900.0,
                  pacing: dict[str, Any] | None = None, now: float = NOW) -> dict[str, Any]:
    """One upstream key's entry of ``zai_quota`` (limits/zai_quota.py ``QuotaView.report``):
    the 5-hour window resets in 2h 13m, the weekly one in 3d 4h."""
    def window(name: str, used: float, reset_in: float) -> dict[str, Any]:
        return {"window": name, "limit_type": "TOKENS_LIMIT", "used_fraction": used,
                "used_pct": round(used * 100, 2), "reset_at": now + reset_in,
                "reset_in_s": reset_in}

    fresh = age <= stale_after
    return {"upstream": alias, "enabled": True, "fresh": fresh, "stale": not fresh,
            "plan_tier": "pro", "last_outcome": outcome, "last_success_at": now - age,
            "sample_age_s": age, "interval_s": 60.0, "stale_after_s": stale_after,
            "polls": {"success": 120, "error": 0 if outcome == "success" else 26,
                      "malformed": 0, "stale": 0 if fresh else 1},
            "windows": [window("five_hour", five_hour, 7_980.0),
                        window("weekly", weekly, 3 * 86400 + 4 * 3600)],
            "pacing": pacing}


def pool_keys_doc(now: float = NOW) -> dict[str, Any]:
    """A proxy with a pool of two upstream keys, polling Z.AI's quota and pacing: team-plan
    fresh at 42 % of its 5 hours (the proxy's own count: 38 %), paced to 1.5 req/s; backup
    at 97 %, its sample 25 min old (stale: its quota API fails), its reserve reached and
    resting after Z.AI's 1308 until 04:05."""
    doc = keys_doc()
    doc["global"]["upstream_tokens_per_5h"] = {
        "limit": 1_000_000_000, "used": 380_000_000, "remaining": 620_000_000,
        "reset_s": 7_980.0, "releases": 1000}
    doc["global"]["upstream_tokens_per_week"]["used"] = 150_000_000
    doc["global"]["upstream_tokens_per_week"]["remaining"] = 750_000_000
    doc["zai_quota"] = [
        zai_quota_doc("team-plan", 0.42, 0.18, age=12.3, now=now, pacing={
            "enabled": True, "rate_rps": 1.5, "reserve_reached": False, "window": "five_hour",
            "closed_until": None, "cost_per_request": {"five_hour": 1e-5}}),
        zai_quota_doc("backup", 0.97, 0.75, age=1520.0, outcome="error", now=now, pacing={
            "enabled": True, "rate_rps": None, "reserve_reached": True, "window": "five_hour",
            "closed_until": now + 3 * 3600, "cost_per_request": {}}),
    ]
    doc["upstreams"] = [
        upstream_doc("team-plan", 0, headroom=0.58),
        upstream_doc("backup", 1, headroom=0.03, resting_until=now + 2 * 3600 + 58 * 60 + 20,
                     reason="quota", pinned=("ci-bot",)),
    ]
    return doc


class FixtureSource:
    """The admin API of a fixed fleet; errors on demand. Records what it was asked."""

    def __init__(self, *, events: list[dict[str, Any]] | None = None,
                 history: Callable[[str, str], dict[str, Any]] | None = None,
                 keys: dict[str, Any] | None = None,
                 events_error: SourceError | None = None,
                 history_error: SourceError | None = None,
                 keys_error: SourceError | None = None, token: str | None = None,
                 now: float = NOW) -> None:
        self.event_docs = [metrics_doc(now)] if events is None else events
        self.history_fn = history or (lambda range_, variant: history_doc(range_, now=now))
        self.keys_doc = keys_doc() if keys is None else keys
        self.events_error, self.history_error, self.keys_error = (events_error, history_error,
                                                                  keys_error)
        self.required_token = token
        self.token: str | None = None
        self.history_calls: list[tuple[str, str]] = []
        self.events_calls = 0
        self.now = now

    def set_token(self, token: str | None) -> None:
        self.token = token

    def _auth(self) -> None:
        if self.required_token is not None and self.token != self.required_token:
            raise Unauthorized("invalid or missing admin token")

    async def events(self) -> AsyncIterator[Connected | Snapshot]:
        self.events_calls += 1
        self._auth()
        if self.events_error is not None:
            raise self.events_error
        yield Connected(2.0, None)
        for doc in self.event_docs:
            yield parse_snapshot(doc)
        await asyncio.Event().wait()  # a live stream: nothing more for now

    async def history(self, range_: str, variant: str) -> History:
        self.history_calls.append((range_, variant))
        self._auth()
        if self.history_error is not None:
            raise self.history_error
        return parse_history(self.history_fn(range_, variant), range_, self.now)

    async def keys(self) -> KeysReport:
        self._auth()
        if self.keys_error is not None:
            raise self.keys_error
        return parse_keys(self.keys_doc)


__all__ = ["NOW", "FixtureSource", "NotServed", "history_doc", "keys_doc", "metrics_doc",
           "pool_keys_doc", "upstream_doc", "zai_quota_doc"]
