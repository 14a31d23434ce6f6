"""The fleet's ``/admin/keys``: the proxies' answers merged into one (pure).

The collector (``collector.py``) asks every fresh target's ``/admin/keys`` and answers
``{"mode": "fleet", "targets": [...], "keys": ..., "global": ...}`` with :func:`merge_keys`,
``zai_quota`` with :func:`merge_quota` and ``upstreams`` with :func:`merge_upstreams`. Its
``/admin/status`` carries ``zai_quota`` too, read from the ``zai_proxy_quota_*`` series of the
scrapes (:func:`quota_gauges`, :func:`quota_entries`).
"""

from __future__ import annotations

import math
from typing import Any

import orjson
from prometheus_client.parser import text_string_to_metric_families

from zaiproxy.limits.report import key_state


def _tightest(states: list[dict[str, Any]]) -> dict[str, Any]:
    """The state with the least ``remaining``; of equals, the one that resets last."""
    return min(states, key=lambda st: (_number(st.get("remaining")),
                                       -_number(st.get("reset_s"))))


def _number(value: Any) -> float:
    return float(value) if isinstance(value, int | float) else 0.0


def _merge_limits(reports: list[Any]) -> dict[str, dict[str, Any]]:
    by_name: dict[str, list[dict[str, Any]]] = {}
    for states in reports:
        for name, state in _dict(states).items():
            if isinstance(state, dict):
                by_name.setdefault(name, []).append(state)
    return {name: _tightest(states) for name, states in by_name.items()}


def merge_scope(reports: list[dict[str, Any]]) -> str:
    """``fleet`` when every answer is already fleet-wide (the Redis backend), ``host`` when
    none is, ``mixed`` in between (a rollout from one backend to the other)."""
    scopes = {r.get("scope", "host") for r in reports}
    return "fleet" if scopes == {"fleet"} else "host" if "fleet" not in scopes else "mixed"


def merge_keys(reports: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The proxies' ``/admin/keys`` answers as one (``keys``, ``global``), pure.

    Per alias: usage summed over the targets that count their own traffic (``scope``
    ``host``); targets answering with fleet-wide totals (``scope`` ``fleet``: they share one
    budget in Redis, each reports the same counters) count once, the largest (latest) of
    their answers. Every number of ``usage`` is merged so, field by field, whatever its name
    (``requests`` and its outcomes ``ok`` … ``5xx``, the token totals): a sum of sums stays
    the sum of its parts, and one Redis answer reads all its fields at one instant, so the
    latest is the largest in each. (A proxy older than the outcomes sends none of them and
    counts only its charged requests in ``requests``.) Enabled if enabled on any target,
    limited_by the union and the state from it (``limits_report.key_state``); per limit,
    here and in ``global``, the tightest state: the target a client is most likely to be
    refused on decides what the fleet shows (with the fleet backend every target reads the
    same budget, so they agree up to the instant).
    """
    rows: dict[str, list[dict[str, Any]]] = {}
    for report in reports:
        scope = report.get("scope", "host")
        for key in report.get("keys") or ():
            if isinstance(key, dict) and isinstance(key.get("alias"), str):
                rows.setdefault(key["alias"], []).append({**key, "_scope": scope})
    keys = []
    for alias, seen in rows.items():
        enabled = any(k.get("enabled", True) for k in seen)
        limited = list(dict.fromkeys(str(n) for k in seen if isinstance(k.get("limited_by"), list)
                                     for n in k["limited_by"]))
        usage: dict[str, Any] = {}
        shared: dict[str, Any] = {}  # fleet-wide totals: the same counters, read once
        for k, fleet in ((k, k.get("_scope") == "fleet") for k in seen):
            for name, value in _dict(k.get("usage")).items():
                if isinstance(value, int | float):
                    if fleet:
                        shared[name] = max(shared.get(name, 0), value)
                    else:
                        usage[name] = usage.get(name, 0) + value
        for name, value in shared.items():
            usage[name] = usage.get(name, 0) + value
        limits: dict[str, Any] = {}
        for k in seen:
            for name, value in _dict(k.get("limits")).items():
                limits.setdefault(name, value)
        models = [k.get("models") if isinstance(k.get("models"), list) else None
                  for k in seen]
        keys.append({
            "alias": alias, "enabled": enabled, "state": key_state(enabled, limited),
            "limited_by": limited,
            "models": None if None in models else sorted({str(m) for ms in models if ms for m in ms}),
            "limits": limits, "now": _merge_limits([k.get("now") for k in seen]),
            "usage": usage})
    return keys, _merge_limits([r.get("global") for r in reports])


def _dict(value: Any) -> dict[str, Any]:
    """A proxy of another version may send anything: what is not an object counts as none."""
    return value if isinstance(value, dict) else {}


def keys_error(status: int, body: bytes) -> str:
    """``HTTP 401: <the target's message>`` (the admin API's error shape) or ``HTTP 404``."""
    try:
        message = orjson.loads(body)["error"]["message"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return f"HTTP {status}"
    return f"HTTP {status}: {str(message)[:200]}"


# ---- Z.AI's own quota and the pool of upstream keys ------------------------------------------

FAILED_POLLS = ("error", "malformed")


def _freshest(entries: list[dict[str, Any]]) -> dict[str, Any]:
    """The entry with the newest good sample (none: the first)."""
    return max(entries, key=lambda e: (isinstance(e.get("last_success_at"), int | float),
                                       _number(e.get("last_success_at"))))


def _merge_pacing(pacings: list[Any]) -> dict[str, Any] | None:
    """The tightest decision: a reserve reached anywhere (the latest reopening), else the
    lowest paced rate (each host paces its own admission; with Redis they agree)."""
    found = [p for p in pacings if isinstance(p, dict)]
    closed = [p for p in found if p.get("reserve_reached") is True]
    if closed:
        return max(closed, key=lambda p: _number(p.get("closed_until")))
    rated = [p for p in found if isinstance(p.get("rate_rps"), int | float)]
    if rated:
        return min(rated, key=lambda p: _number(p.get("rate_rps")))
    return found[0] if found else None


def merge_quota(lists: list[Any]) -> list[dict[str, Any]] | None:
    """The targets' ``zai_quota`` lists as one, per upstream key (alias): the freshest sample
    across targets (they poll the same account: the newest reading is the truest) with its
    poll state, polled if polled anywhere, and the tightest pacing decision. None when no
    target says anything (older proxies): the field stays absent, not "not polled"."""
    by_alias = _by_name(lists, "upstream")
    if by_alias is None:
        return None
    out = []
    for seen in by_alias.values():
        merged = dict(_freshest(seen))
        merged["enabled"] = any(e.get("enabled", True) is not False for e in seen)
        merged["pacing"] = _merge_pacing([e.get("pacing") for e in seen])
        out.append(merged)
    return out


def merge_upstreams(lists: list[Any]) -> list[dict[str, Any]] | None:
    """The targets' ``upstreams`` (the pool) as one, per alias: resting if any target rests
    the key (the latest ``resting_until`` and its reason), the rests and switches summed
    (each host counts its own), the pins of all, the least headroom. None when no target
    says anything."""
    by_alias = _by_name(lists, "alias")
    if by_alias is None:
        return None
    out = []
    for alias, seen in by_alias.items():
        resting = [e for e in seen if e.get("resting") is True]
        latest = max(resting, key=lambda e: _number(e.get("resting_until")), default=None)
        headrooms = [e["headroom"] for e in seen if isinstance(e.get("headroom"), int | float)]
        out.append({
            "alias": alias, "index": seen[0].get("index"), "resting": latest is not None,
            "resting_until": latest.get("resting_until") if latest else None,
            "rest_reason": latest.get("rest_reason") if latest else None,
            "rests": sum(int(_number(e.get("rests"))) for e in seen),
            "switched_away": sum(int(_number(e.get("switched_away"))) for e in seen),
            "pinned_clients": sorted({str(c) for e in seen
                                      if isinstance(e.get("pinned_clients"), list)
                                      for c in e["pinned_clients"]}),
            "headroom": min(headrooms, default=None)})
    return out


# Z.AI's quota on a proxy's /metrics (observe/quota_metrics.py): what the collector's
# /admin/status shows, read from the scrapes it makes anyway (no admin token needed).
_QUOTA_FAMILIES = ("zai_proxy_quota_usage_ratio", "zai_proxy_quota_reset_time_seconds",
                   "zai_proxy_quota_sample_age_seconds", "zai_proxy_quota_poll_total",
                   "zai_proxy_quota_rate_cap", "zai_proxy_quota_gate_open")
_WINDOWS = ("five_hour", "weekly")


def quota_gauges(text: str) -> dict[str, dict[str, Any]]:
    """The ``zai_proxy_quota_*`` series of one exposition, per upstream key (``default``
    without a pool file): ``usage``/``reset`` by (window, limit type), ``age``, ``polls`` by
    result, ``cap``, ``gates`` by window. Only those lines are parsed; {} when the proxy does
    not poll. ValueError when the lines are not an exposition."""
    lines = [line for line in text.splitlines()
             if line.startswith(_QUOTA_FAMILIES) or (
                 line.startswith("# ") and any(f" {name} " in line or line.endswith(name)
                                               for name in _QUOTA_FAMILIES))]
    out: dict[str, dict[str, Any]] = {}
    for family in text_string_to_metric_families("\n".join(lines) + "\n"):
        for sample in family.samples:
            labels, value = sample.labels, float(sample.value)
            if not math.isfinite(value):
                continue
            key = out.setdefault(labels.get("upstream") or "default", {
                "usage": {}, "reset": {}, "age": None, "polls": {}, "cap": None, "gates": {}})
            window = labels.get("window", "")
            if sample.name == "zai_proxy_quota_usage_ratio":
                key["usage"][window] = (labels.get("limit_type", "").upper() or None, value)
            elif sample.name == "zai_proxy_quota_reset_time_seconds":
                key["reset"][window] = value
            elif sample.name == "zai_proxy_quota_sample_age_seconds":
                key["age"] = value
            elif sample.name == "zai_proxy_quota_poll_total":
                key["polls"][labels.get("result", "")] = value
            elif sample.name == "zai_proxy_quota_rate_cap":
                key["cap"] = value
            elif sample.name == "zai_proxy_quota_gate_open":
                key["gates"][window] = value
    return out


def quota_entries(gauges: dict[str, dict[str, Any]], scraped_at: float,
                  previous: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """``zai_quota`` entries (the proxy's /admin/keys shape) from one scrape's
    :func:`quota_gauges` at ``scraped_at`` (unix s), beside the target's ``previous`` ones.

    The gauges carry no staleness and no last outcome: both are read from the poll counters
    between two scrapes (one kind moved: that was the last poll's outcome; a success ends a
    staleness, the ``stale`` counter starts one) and kept until the counters say otherwise;
    None while unknown (the TUI then judges a sample by its age). No plan tier, interval or
    stale-after: null."""
    before = {e["upstream"]: e for e in previous or ()}
    out = []
    for alias, g in gauges.items():  # the proxy's order: the pool file's
        prev = before.get(alias)
        polls: dict[str, float] = g["polls"]
        prev_polls = prev["polls"] if prev else {}
        if any(polls.get(r, 0.0) < n for r, n in prev_polls.items()):
            prev, prev_polls = None, {}  # the counters went down: the proxy restarted
        moved = {r for r, n in polls.items() if prev is not None and n > prev_polls.get(r, 0.0)}
        outcomes = moved & {"success", *FAILED_POLLS}
        outcome = (next(iter(outcomes)) if len(outcomes) == 1
                   else prev["last_outcome"] if prev else None)
        age = g["age"]
        stale = (False if "success" in moved else True if "stale" in moved
                 else prev["stale"] if prev else True if age is None and polls else None)
        windows = []
        for window in sorted(g["usage"], key=lambda w: (w not in _WINDOWS, _WINDOWS.index(w)
                                                        if w in _WINDOWS else 0, w)):
            limit_type, used = g["usage"][window]
            reset_at = g["reset"].get(window)
            windows.append({"window": window, "limit_type": limit_type,
                            "used_fraction": used, "used_pct": round(used * 100, 2),
                            "reset_at": reset_at,
                            "reset_in_s": None if reset_at is None
                            else round(max(0.0, reset_at - scraped_at), 3)})
        gates = g["gates"]
        closed = next((w for w in _WINDOWS if gates.get(w, 1.0) < 1.0), None)
        pacing = None
        if gates or g["cap"] is not None:
            pacing = {"enabled": True, "rate_rps": g["cap"], "reserve_reached": closed is not None,
                      "window": closed, "closed_until": g["reset"].get(closed) if closed else None}
        out.append({
            "upstream": alias, "enabled": True,
            "fresh": None if stale is None else not stale, "stale": stale, "plan_tier": None,
            "last_outcome": outcome,
            "last_success_at": None if age is None else round(scraped_at - age, 3),
            "sample_age_s": None if age is None else round(age, 3), "interval_s": None,
            "stale_after_s": None, "polls": polls, "windows": windows, "pacing": pacing})
    return out


def quota_at(entries: list[dict[str, Any]], now: float) -> list[dict[str, Any]]:
    """The entries' ages and countdowns as of ``now`` (they were computed at a scrape)."""
    out = []
    for e in entries:
        at = e.get("last_success_at")
        windows = [w | {"reset_in_s": None if w.get("reset_at") is None
                        else round(max(0.0, w["reset_at"] - now), 3)} for w in e["windows"]]
        out.append(e | {"windows": windows,
                        "sample_age_s": None if at is None else round(max(0.0, now - at), 3)})
    return out


def _by_name(lists: list[Any], field: str) -> dict[str, list[dict[str, Any]]] | None:
    """The targets' entries grouped by ``field`` (an alias); None when no target sent a list."""
    given = [entries for entries in lists if isinstance(entries, list)]
    if not given:
        return None
    by_name: dict[str, list[dict[str, Any]]] = {}
    for entries in given:
        for entry in entries:
            if isinstance(entry, dict) and isinstance(entry.get(field), str):
                by_name.setdefault(entry[field], []).append(entry)
    return by_name
