"""The fleet's ``/admin/keys``: the proxies' answers merged into one (pure).

The collector (``collector.py``) asks every fresh target's ``/admin/keys`` and answers
``{"mode": "fleet", "targets": [...], "keys": ..., "global": ...}`` with :func:`merge_keys`.
"""

from __future__ import annotations

from typing import Any

import orjson

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
