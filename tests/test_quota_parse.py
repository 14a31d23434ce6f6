"""Z.AI's quota endpoint (zaiproxy/upstream/quota.py): the request headers, the parser's
outcomes on real-looking payloads, and the metric-label sanitiser. Pure: no sockets."""

from __future__ import annotations

import math
import os
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zaiproxy.upstream.quota import (
    MAX_BODY,
    QUOTA_PATH,
    QuotaError,
    QuotaSample,
    QuotaWindow,
    label_value,
    parse_quota,
    request_headers,
)

# `make test` runs the suite twice (h11, then h11-mypyc); parsing a quota answer is
# independent of the HTTP implementation: run once.
pytestmark = pytest.mark.skipif(os.environ.get("ZAIPROXY_HTTP_IMPL") == "h11-mypyc",
                                reason="independent of the HTTP implementation")

RESET_5H_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z
RESET_WEEK_MS = 1_767_657_600_000  # 2026-01-06T00:00:00Z


def body(doc: Any) -> bytes:
    return orjson.dumps(doc)


def ok(limits: Any, level: Any = "pro", **top: Any) -> bytes:
    doc = {"code": 200, "msg": "Operation successful",
           "data": {"limits": limits, "level": level}, "success": True}
    doc.update(top)
    return body(doc)


def tokens(unit: int, percentage: Any, reset: Any = RESET_5H_MS, **extra: Any) -> dict[str, Any]:
    number = {3: 5, 6: 1}.get(unit, 1)
    entry = {"type": "TOKENS_LIMIT", "unit": unit, "number": number, "percentage": percentage,
             "nextResetTime": reset}
    entry.update(extra)
    return entry


TIME_LIMIT = {
    "type": "TIME_LIMIT", "unit": 5, "number": 1, "usage": 1000, "currentValue": 37,
    "remaining": 963, "percentage": 3, "nextResetTime": 1_769_904_000_000,
    "usageDetails": [{"modelCode": "search-prime", "usage": 30}, {"modelCode": "web-reader", "usage": 7}],
}


def error_of(status: int, raw: bytes) -> QuotaError:
    with pytest.raises(QuotaError) as info:
        parse_quota(status, raw)
    return info.value


# --- the request ------------------------------------------------------------------------------


def test_request_headers_send_the_raw_key() -> None:
    assert QUOTA_PATH == "/api/monitor/usage/quota/limit"
    assert request_headers("sk-abc.123") == [
        (b"authorization", b"sk-abc.123"),
        (b"accept", b"application/json"),
        (b"accept-language", b"en-US,en;q=0.9"),
    ]


# --- successes --------------------------------------------------------------------------------


def test_pro_plan_with_both_token_windows_and_a_time_limit() -> None:
    raw = ok([TIME_LIMIT, tokens(3, 12, RESET_5H_MS), tokens(6, 41, RESET_WEEK_MS)])
    sample = parse_quota(200, raw)
    assert sample == QuotaSample("pro", (
        QuotaWindow("five_hour", "TOKENS_LIMIT", 0.12, RESET_5H_MS / 1000),
        QuotaWindow("weekly", "TOKENS_LIMIT", 0.41, RESET_WEEK_MS / 1000),
    ))
    assert sample.window("five_hour") is sample.windows[0]
    assert sample.window("weekly") is sample.windows[1]
    assert sample.window("monthly") is None


def test_time_limit_alone_is_a_sample_without_windows() -> None:
    """Success with nothing we recognise is still a success (documented choice)."""
    assert parse_quota(200, ok([TIME_LIMIT], level="lite")) == QuotaSample("lite", ())
    assert parse_quota(200, ok([])) == QuotaSample("pro", ())


def test_window_is_chosen_by_unit_not_by_number_or_type() -> None:
    entries = [
        {**tokens(3, 10), "number": 1},  # unit 3 is five_hour whatever the number says
        tokens(5, 99),  # unit 5 is ignored even as TOKENS_LIMIT
        tokens(4, 99), tokens(7, 99), {**tokens(3, 99), "unit": 3.5},
        {**tokens(6, 20), "unit": "6"},  # a numeric string unit
    ]
    sample = parse_quota(200, ok(entries))
    assert [(w.window, w.used_fraction) for w in sample.windows] == [
        ("five_hour", 0.10), ("weekly", 0.20)]


def test_types_are_case_insensitive_and_kept_upper_case() -> None:
    sample = parse_quota(200, ok([{**tokens(3, 50), "type": " tokens_limit "},
                                  {"type": "Credit_Limit", "unit": 6, "usage": 10,
                                   "currentValue": 5}]))
    assert [w.limit_type for w in sample.windows] == ["TOKENS_LIMIT", "CREDIT_LIMIT"]


def test_tokens_limit_uses_percentage_only() -> None:
    entry = tokens(3, 25, usage=100, currentValue=90, remaining=10)
    window = parse_quota(200, ok([entry])).windows[0]
    assert window == QuotaWindow("five_hour", "TOKENS_LIMIT", 0.25, RESET_5H_MS / 1000)


def test_tokens_limit_without_a_numeric_percentage_is_skipped() -> None:
    missing: tuple[Any, ...] = (None, "n/a", True, [], {}, "nan")
    for percentage in missing:
        entries = [tokens(3, percentage), tokens(6, 7)]
        sample = parse_quota(200, ok(entries))
        assert [w.window for w in sample.windows] == ["weekly"], percentage
    entry = tokens(3, 1)
    del entry["percentage"]
    assert parse_quota(200, ok([entry])).windows == ()


def test_credit_limit_fraction_from_current_value_over_usage() -> None:
    entry = {"type": "CREDIT_LIMIT", "unit": 3, "number": 5, "usage": 200, "currentValue": 50,
             "remaining": 150, "percentage": 99, "nextResetTime": RESET_5H_MS}
    window = parse_quota(200, ok([entry])).windows[0]
    assert window == QuotaWindow("five_hour", "CREDIT_LIMIT", 0.25, RESET_5H_MS / 1000,
                                 used=50.0, allowance=200.0, remaining=150.0)


def test_credit_limit_with_usage_zero_falls_back_to_percentage() -> None:
    entry = {"type": "CREDIT_LIMIT", "unit": 6, "usage": 0, "currentValue": 0, "percentage": 30}
    window = parse_quota(200, ok([entry])).windows[0]
    assert (window.used_fraction, window.allowance, window.used) == (0.30, 0.0, 0.0)
    assert window.remaining == 0.0  # derived: usage - currentValue
    assert window.reset_at is None
    # No usage at all, or usage without currentValue: percentage too.
    for extra in ({}, {"usage": 80}):
        entry = {"type": "CREDIT_LIMIT", "unit": 6, "percentage": "45", **extra}
        assert parse_quota(200, ok([entry])).windows[0].used_fraction == 0.45
    # Neither a usable ratio nor a percentage: skipped.
    assert parse_quota(200, ok([{"type": "CREDIT_LIMIT", "unit": 6, "usage": 0}])).windows == ()


def test_credit_limit_remaining_is_derived_when_absent() -> None:
    entry = {"type": "CREDIT_LIMIT", "unit": 3, "usage": "1000", "currentValue": "250.5"}
    window = parse_quota(200, ok([entry])).windows[0]
    assert (window.used, window.allowance, window.remaining) == (250.5, 1000.0, 749.5)
    over = {"type": "CREDIT_LIMIT", "unit": 3, "usage": 100, "currentValue": 130}
    window = parse_quota(200, ok([over])).windows[0]
    assert (window.used_fraction, window.remaining) == (1.0, 0.0)


def test_fractions_are_clamped() -> None:
    entries = [tokens(3, 140), tokens(6, -5)]
    sample = parse_quota(200, ok(entries))
    assert [w.used_fraction for w in sample.windows] == [1.0, 0.0]
    credit = {"type": "CREDIT_LIMIT", "unit": 3, "usage": 10, "currentValue": -3}
    assert parse_quota(200, ok([credit])).windows[0].used_fraction == 0.0


def test_first_usable_entry_per_window_wins() -> None:
    entries = [tokens(3, 10), tokens(3, 90), tokens(6, None), tokens(6, 30), tokens(6, 60)]
    sample = parse_quota(200, ok(entries))
    assert [(w.window, w.used_fraction) for w in sample.windows] == [
        ("five_hour", 0.10), ("weekly", 0.30)]
    # A CREDIT_LIMIT first holds the window against a later TOKENS_LIMIT.
    credit = {"type": "CREDIT_LIMIT", "unit": 3, "usage": 4, "currentValue": 1}
    sample = parse_quota(200, ok([credit, tokens(3, 90)]))
    assert [(w.limit_type, w.used_fraction) for w in sample.windows] == [("CREDIT_LIMIT", 0.25)]


def test_non_finite_and_non_numeric_values_are_dropped() -> None:
    raw = (b'{"success":true,"data":{"limits":[{"type":"TOKENS_LIMIT","unit":3,'
           b'"percentage":"1e999"},{"type":"TOKENS_LIMIT","unit":6,"percentage":"Infinity"},'
           b'{"type":"CREDIT_LIMIT","unit":6,"usage":10,"currentValue":2,"remaining":"-1e400"}]}}')
    sample = parse_quota(200, raw)
    assert sample.plan_tier is None
    # The five-hour entry and the first weekly one had no finite percentage; the
    # CREDIT_LIMIT's infinite remaining is dropped and derived instead.
    assert sample.windows == (
        QuotaWindow("weekly", "CREDIT_LIMIT", 0.2, None, used=2.0, allowance=10.0, remaining=8.0),
    )
    # An infinite JSON number literal is not JSON to orjson (nor to Go's encoding/json).
    exc = error_of(200, b'{"success":true,"data":{"limits":[{"unit":3,"percentage":1e999}]}}')
    assert exc.outcome == "malformed"


def test_numbers_as_strings_are_tolerated() -> None:
    entry = {"type": "TOKENS_LIMIT", "unit": "3", "percentage": " 12.5 ",
             "nextResetTime": str(RESET_5H_MS)}
    window = parse_quota(200, ok([entry])).windows[0]
    assert (window.window, window.used_fraction, window.reset_at) == (
        "five_hour", 0.125, RESET_5H_MS / 1000)
    for bad in ("12%", "0x10", "1_000", "", "twelve"):
        assert parse_quota(200, ok([{**entry, "percentage": bad}])).windows == (), bad


@pytest.mark.parametrize(("sent", "expected"), [
    (RESET_5H_MS, RESET_5H_MS / 1000),  # epoch milliseconds, as Z.AI sends them
    (RESET_5H_MS + 250, (RESET_5H_MS + 250) / 1000),
    (1_767_225_600, 1_767_225_600.0),  # epoch seconds: tolerated (below 1e11)
    (str(RESET_5H_MS), RESET_5H_MS / 1000),
    (None, None), ("soon", None), (0, None), (-1, None), (True, None),
    (123_456, None),  # 1970: not a reset time
    (99_999_999_999_999, None),  # the year 5138 in ms: garbage
    ("2026-01-01T00:00:00Z", None),  # not an epoch number
])
def test_reset_times(sent: Any, expected: float | None) -> None:
    window = parse_quota(200, ok([tokens(3, 1, sent)])).windows[0]
    assert window.reset_at == expected


def test_reset_time_absent() -> None:
    entry = tokens(6, 1)
    del entry["nextResetTime"]
    assert parse_quota(200, ok([entry])).windows[0].reset_at is None


@pytest.mark.parametrize(("level", "tier"), [
    ("pro", "pro"), ("LITE", "lite"), (" Max ", "max"), ("enterprise plan+", "enterprise_plan_"),
    ("x" * 40, "x" * 32), ("", None), ("   ", None), (None, None), (3, None), (["pro"], None),
])
def test_plan_tier(level: Any, tier: str | None) -> None:
    assert parse_quota(200, ok([], level=level)).plan_tier == tier


def test_success_true_wins_over_a_strange_code_and_code_without_success_is_accepted() -> None:
    assert parse_quota(200, ok([tokens(3, 1)], code=1001)).windows  # success: true says yes
    for code in (0, 200, "200", None):
        doc = {"code": code, "data": {"limits": [tokens(3, 1)]}}
        assert parse_quota(200, body(doc)).windows, code
    # Neither success nor code: judged by the data alone.
    assert parse_quota(201, body({"data": {"limits": []}})) == QuotaSample(None, ())


# --- errors: the provider said no -------------------------------------------------------------


def test_success_false_is_an_error_with_zai_msg() -> None:
    exc = error_of(200, body({"code": 500, "msg": "internal error", "success": False}))
    assert (exc.outcome, exc.message, str(exc)) == (
        "error", "success false, code 500: internal error", "success false, code 500: internal error")
    assert repr(exc) == "QuotaError('error', 'success false, code 500: internal error')"
    # Even with good data, success false is a no.
    assert error_of(200, ok([tokens(3, 1)], success=False)).outcome == "error"


def test_code_outside_0_and_200_without_success_is_an_error() -> None:
    exc = error_of(200, body({"code": 1001, "msg": "Authorization Token Missing"}))
    assert (exc.outcome, exc.message) == ("error", "code 1001: Authorization Token Missing")
    exc = error_of(200, body({"code": "1002", "msg": "", "data": {"limits": []}}))
    assert (exc.outcome, exc.message) == ("error", "code 1002")
    exc = error_of(200, body({"code": "oops", "success": "yes"}))
    assert (exc.outcome, exc.message) == ("error", "code (not a number)")


@pytest.mark.parametrize(("status", "raw", "message"), [
    (401, b'{"code":1001,"msg":"Invalid API key","success":false}', "HTTP 401: Invalid API key"),
    (500, b"Internal Server Error", "HTTP 500"),
    (503, b"", "HTTP 503"),
    (302, b"<html>moved</html>", "HTTP 302"),
    (429, b'{"error":{"code":"1302"}}', "HTTP 429"),
])
def test_http_status_outside_2xx_is_an_error(status: int, raw: bytes, message: str) -> None:
    exc = error_of(status, raw)
    assert (exc.outcome, exc.message) == ("error", message)
    # ...whatever the body says.
    assert error_of(status, ok([tokens(3, 1)])).outcome == "error"


def test_error_messages_quote_a_bounded_msg_and_never_the_body() -> None:
    secret = "sk-secret-key-123"
    long_msg = "bad key " + "x" * 500 + secret
    exc = error_of(401, body({"msg": long_msg, "key": secret, "success": False}))
    assert exc.message.startswith("HTTP 401: bad key xxx")
    assert exc.message.endswith("...")
    assert len(exc.message) == len("HTTP 401: ") + 200
    assert secret not in exc.message
    exc = error_of(200, body({"success": False, "msg": "line1\r\nline2\x00", "data": secret}))
    assert exc.message == "success false: line1  line2"
    assert secret not in error_of(200, secret.encode()).message  # not JSON: no excerpt at all
    assert secret not in error_of(500, secret.encode()).message


# --- malformed: the provider said yes but we cannot read it -----------------------------------


@pytest.mark.parametrize(("raw", "message"), [
    (b"<html>gateway</html>", "body is not JSON"),
    (b"", "body is not JSON"),
    (b'{"success":true,"data":', "body is not JSON"),
    (b"\xff\xfe{}", "body is not JSON"),
    (b"[1, 2]", "body is a JSON array, not an object"),
    (b'"ok"', "body is a JSON string, not an object"),
    (b"null", "body is a JSON null, not an object"),
    (b"42", "body is a JSON number, not an object"),
    (b"true", "body is a JSON boolean, not an object"),
    (b'{"code":200,"msg":"ok","success":true}', "no data object"),
    (b'{"code":200,"success":true,"data":null}', "no data object"),
    (b'{"code":200,"success":true,"data":[]}', "no data object"),
    (b'{"code":200,"success":true,"data":{}}', "no data.limits list"),
    (b'{"code":200,"success":true,"data":{"limits":{"type":"TOKENS_LIMIT"}}}',
     "no data.limits list"),
    (b'{"success":true,"data":{"limits":"[]"}}', "no data.limits list"),
])
def test_malformed_bodies(raw: bytes, message: str) -> None:
    exc = error_of(200, raw)
    assert (exc.outcome, exc.message) == ("malformed", message)


def test_oversized_body_is_malformed_even_when_valid() -> None:
    limits = [tokens(3, 1)] + [dict(TIME_LIMIT) for _ in range(400)]
    raw = ok(limits)
    assert len(raw) > MAX_BODY
    exc = error_of(200, raw)
    assert (exc.outcome, exc.message) == ("malformed", "body exceeds 65536 bytes")
    padded = ok([tokens(3, 1)])[:-1] + b"," + b'"pad":"' + b"x" * MAX_BODY + b'"}'
    assert error_of(200, padded).outcome == "malformed"
    # Exactly MAX_BODY bytes is still read.
    fit = ok([tokens(3, 1)])
    fit = fit[:-1] + b',"pad":"' + b"x" * (MAX_BODY - len(fit) - 9) + b'"}'
    assert len(fit) == MAX_BODY
    assert parse_quota(200, fit).windows


def test_entries_of_other_shapes_are_skipped() -> None:
    entries: list[Any] = [None, 3, "TOKENS_LIMIT", [], {"unit": 3, "percentage": 5},
               {"type": 7, "unit": 3, "percentage": 5}, {"type": "TOKENS_LIMIT", "percentage": 5},
               {"type": "TOKENS_LIMIT", "unit": True, "percentage": 5}, tokens(6, 9)]
    sample = parse_quota(200, ok(entries))
    assert [w.window for w in sample.windows] == ["weekly"]


# --- never anything but QuotaError -----------------------------------------------------------


def _check_total(status: int, raw: bytes) -> None:
    try:
        sample = parse_quota(status, raw)
    except QuotaError as exc:
        assert exc.outcome in ("error", "malformed")
        assert len(exc.message) <= 300
        return
    assert 200 <= status <= 299
    assert len({w.window for w in sample.windows}) == len(sample.windows) <= 2
    for window in sample.windows:
        assert window.window in ("five_hour", "weekly")
        assert window.limit_type in ("TOKENS_LIMIT", "CREDIT_LIMIT")
        assert 0.0 <= window.used_fraction <= 1.0
        for value in (window.reset_at, window.used, window.allowance, window.remaining):
            assert value is None or math.isfinite(value)
    assert sample.plan_tier is None or sample.plan_tier == label_value(sample.plan_tier)


@settings(max_examples=300, deadline=None)
@given(st.integers(min_value=0, max_value=999), st.binary(max_size=512))
def test_arbitrary_bytes_raise_only_quota_error(status: int, raw: bytes) -> None:
    _check_total(status, raw)


_SCALARS = (st.none() | st.booleans() | st.integers(min_value=-(2**63), max_value=2**64 - 1)
            | st.floats(allow_nan=False) | st.text(max_size=20)
            | st.sampled_from(["3", "6", "TOKENS_LIMIT", "credit_limit", "1e999", "-0", " 42 "]))
_JSON = st.recursive(
    _SCALARS,
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)
_FIELDS = ["type", "unit", "number", "usage", "currentValue", "remaining", "percentage",
           "nextResetTime"]
_ENTRY = st.dictionaries(st.sampled_from(_FIELDS), _JSON | st.sampled_from([3, 5, 6, "TOKENS_LIMIT",
                         "CREDIT_LIMIT", "TIME_LIMIT", RESET_5H_MS])) | _JSON
_DOC = st.fixed_dictionaries(
    {},
    optional={
        "code": _JSON | st.sampled_from([0, 200, 1001]),
        "msg": _JSON,
        "success": _JSON,
        "data": st.fixed_dictionaries({}, optional={"level": _JSON,
                                                    "limits": st.lists(_ENTRY, max_size=6) | _JSON})
        | _JSON,
    },
)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from([200, 204, 401, 500]), _JSON)
def test_arbitrary_json_raises_only_quota_error(status: int, doc: Any) -> None:
    _check_total(status, orjson.dumps(doc))


@settings(max_examples=500, deadline=None)
@given(st.sampled_from([200, 200, 200, 401]), _DOC)
def test_arbitrary_quota_shaped_json_raises_only_quota_error(status: int, doc: Any) -> None:
    _check_total(status, orjson.dumps(doc))


# --- the label sanitiser ---------------------------------------------------------------------


@pytest.mark.parametrize(("value", "label"), [
    ("TOKENS_LIMIT", "tokens_limit"),
    ("CREDIT_LIMIT", "credit_limit"),
    ("five_hour", "five_hour"),
    ("Pro-Plan 2", "pro-plan_2"),
    ("a.b/c:d{e}\"f\n", "a_b_c_d_e__f_"),
    ("", "unknown"),
    ("x" * 33, "x" * 32),
    ("ÄÖ", "__"),
    ("a" * 31 + "é", "a" * 31 + "_"),
    ('max",le="+Inf', "max__le___inf"),
])
def test_label_value(value: str, label: str) -> None:
    assert label_value(value) == label


@given(st.text(max_size=80))
def test_label_value_is_always_a_safe_label(value: str) -> None:
    label = label_value(value)
    assert 1 <= len(label) <= 32
    assert all(c in "abcdefghijklmnopqrstuvwxyz0123456789_-" for c in label)
    assert label_value(label) == label
