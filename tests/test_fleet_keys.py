"""What the operator reads about fleet-wide limits: the collector's merge of /admin/keys
answers that already hold fleet-wide numbers, and the TUI's words for them (pure)."""

from __future__ import annotations

from typing import Any

from tests.tui.fixtures import NOW, keys_doc, metrics_doc
from zaiproxy.fleet.fleet_keys import merge_keys, merge_scope
from zaiproxy_tui.model import parse_keys, parse_snapshot
from zaiproxy_tui.state import Dashboard
from zaiproxy_tui.views import keys_message, status_view


def answer(scope: str, requests: int, remaining: int) -> dict[str, Any]:
    return {"mode": "keys", "scope": scope, "global": {
        "requests_per_minute": {"limit": 100, "remaining": remaining, "reset_s": 3.0}},
        "keys": [{"alias": "alice", "enabled": True, "limited_by": [], "limits": {},
                  "now": {}, "usage": {"requests": requests, "input_tokens": 10 * requests}}]}


def test_fleet_wide_usage_counts_once_and_host_usage_adds_up() -> None:
    # Three proxies sharing one Redis budget each report the fleet's totals (read at
    # slightly different instants): counted once, the latest (largest).
    keys, global_ = merge_keys([answer("fleet", 300, 40), answer("fleet", 302, 38),
                                answer("fleet", 301, 39)])
    assert keys[0]["usage"] == {"requests": 302, "input_tokens": 3020}
    assert global_["requests_per_minute"]["remaining"] == 38
    assert merge_scope([answer("fleet", 1, 1)] * 3) == "fleet"
    # Hosts with their own ledgers count their own traffic: summed.
    keys, _ = merge_keys([answer("host", 300, 40), answer("host", 200, 60)])
    assert keys[0]["usage"]["requests"] == 500
    assert merge_scope([answer("host", 1, 1), {"keys": []}]) == "host"
    # A rollout between backends: the fleet's total once plus each host's own.
    keys, _ = merge_keys([answer("fleet", 300, 40), answer("fleet", 301, 40),
                          answer("host", 50, 90)])
    assert keys[0]["usage"]["requests"] == 351
    assert merge_scope([answer("fleet", 1, 1), answer("host", 1, 1)]) == "mixed"


def test_every_outcome_is_merged_like_the_request_count() -> None:
    """The collector sums (host) or takes the latest (fleet) of each outcome as of
    ``requests``: the fleet's rows still add up, and its TUI row shows them."""
    def outcomes(scope: str, ok: int, refused: int, r5xx: int) -> dict[str, Any]:
        doc = answer(scope, ok + refused + r5xx, 50)
        doc["keys"][0]["usage"].update({"ok": ok, "proxy_429": refused, "zai_429": 0,
                                        "other_4xx": 0, "5xx": r5xx, "charged_requests": ok})
        return doc

    keys, _ = merge_keys([outcomes("host", 90, 30, 1), outcomes("host", 10, 5, 0)])
    usage = keys[0]["usage"]
    assert (usage["requests"], usage["ok"], usage["proxy_429"], usage["5xx"]) == (136, 100, 35, 1)
    keys, _ = merge_keys([outcomes("fleet", 90, 30, 1), outcomes("fleet", 91, 30, 1),
                          outcomes("host", 4, 0, 2)])
    usage = keys[0]["usage"]
    assert (usage["requests"], usage["ok"], usage["proxy_429"], usage["5xx"]) == (128, 95, 30, 3)
    assert usage["requests"] == sum(usage[k] for k in ("ok", "proxy_429", "zai_429",
                                                       "other_4xx", "5xx"))
    (row,) = parse_keys({"mode": "fleet", "keys": keys}).keys
    assert (row.requests, row.refused, row.r4xx, row.r5xx) == (128, 30, 0, 3)


def dashboard() -> Dashboard:
    d = Dashboard("http://proxy:8080")
    return d


def test_the_keys_panel_says_whose_numbers_it_shows() -> None:
    d = dashboard()
    d.set_keys(parse_keys({**keys_doc(), "mode": "keys", "scope": "fleet"}))
    assert keys_message(d) == "limits shared by the fleet (Redis): every number is fleet-wide"
    d.set_keys(parse_keys({**keys_doc(), "mode": "keys"}))
    assert keys_message(d) is None
    d.set_keys(parse_keys({**keys_doc(), "mode": "fleet", "scope": "fleet", "targets": [
        {"target": "http://a:8080", "ok": True}, {"target": "http://b:8080", "ok": True}]}))
    assert keys_message(d) == "fleet: 2 targets sharing one budget (Redis): fleet-wide"
    d.set_keys(parse_keys({**keys_doc(), "mode": "fleet", "scope": "host", "targets": [
        {"target": "http://a:8080", "ok": True}]}))
    assert keys_message(d) == "fleet: 1 targets, usage summed, tightest limit shown"


def test_the_status_line_warns_while_redis_is_unreachable() -> None:
    d = dashboard()
    doc = {**metrics_doc(NOW), "warnings": ["limits_redis_unavailable"]}
    d.apply(parse_snapshot(doc), NOW)
    text = "".join(seg for seg, _ in status_view(d, NOW))
    assert "⚠ LIMITS: REDIS UNREACHABLE (fail policy in force)" in text
