"""Z.AI 429 handling (zaiproxy.upstream.zai): a table of bodies -> ZaiError, waits and headers exactly.

Epoch values are written out as numbers (checked with ``date -u -d``), not computed
with the code under test: R = 2026-11-27T15:00:00Z = 23:00:00 in Beijing (UTC+8).
"""

from __future__ import annotations

import json
import math
from typing import Any

import h11
import pytest
from hypothesis import given
from hypothesis import strategies as st

from zaiproxy.mock.payloads import ZAI_MESSAGES, zai_error
from zaiproxy.upstream.zai import (
    MAX_BODY,
    ErrorClass,
    RetryPolicy,
    ZaiError,
    classify,
    feeds_adaptive,
    final_headers,
    parse_retry_after,
)

R = 1795791600  # 2026-11-27T15:00:00Z
R_1310 = 1796054400  # 2026-11-30T16:00:00Z = 2026-12-01 00:00:00 Beijing
NOW = R - 10800  # three hours before R

C, F, V, Q, G, U = (  # V: overload (O reads as zero)
    ErrorClass.CONCURRENCY,
    ErrorClass.FREQUENCY,
    ErrorClass.OVERLOAD,
    ErrorClass.QUOTA,
    ErrorClass.CONGESTION,
    ErrorClass.UNKNOWN,
)
CODE_CLASSES = {1302: C, 1303: F, 1305: V, 1308: Q, 1310: Q, 1312: G, 1301: U, 1399: U}
RESETS = {1308: R, 1310: R_1310}


def dumps(obj: Any) -> bytes:
    return json.dumps(obj).encode()


# --- classify: every code in every shape ------------------------------------------------


def openai_str(code: int, msg: str) -> bytes:
    return dumps({"error": {"code": str(code), "message": msg}})


def openai_int(code: int, msg: str) -> bytes:
    return dumps({"error": {"code": code, "message": msg}})


def native(code: int, msg: str) -> bytes:
    return dumps({"code": code, "msg": msg, "success": False})


def anthropic_bracket(code: int, msg: str) -> bytes:
    return dumps(
        {"type": "error", "error": {"type": "rate_limit_error", "message": f"[{code}] {msg}"}}
    )


def anthropic_code_word(code: int, msg: str) -> bytes:
    return dumps(
        {"type": "error", "error": {"type": "rate_limit_error", "message": f"{msg} (code {code})"}}
    )


def anthropic_quoted_json(code: int, msg: str) -> bytes:
    inner = json.dumps({"error": {"code": str(code), "message": msg}})
    return dumps({"type": "error", "error": {"type": "rate_limit_error", "message": inner}})


SHAPES = [openai_str, openai_int, native, anthropic_bracket, anthropic_code_word]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda f: f.__name__)
@pytest.mark.parametrize("code", sorted(CODE_CLASSES))
def test_every_code_in_every_shape(shape: Any, code: int) -> None:
    msg = ZAI_MESSAGES.get(code, "Something else")
    err = classify(shape(code, msg), now=NOW)
    expected_message = msg
    if shape is anthropic_bracket:
        expected_message = f"[{code}] {msg}"
    elif shape is anthropic_code_word:
        expected_message = f"{msg} (code {code})"
    assert err == ZaiError(CODE_CLASSES[code], str(code), expected_message, RESETS.get(code), None)


def test_quoted_json_in_an_anthropic_message() -> None:
    body = anthropic_quoted_json(1308, ZAI_MESSAGES[1308])
    err = classify(body, now=NOW)
    assert (err.cls, err.code, err.reset_at) == (Q, "1308", R)


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        # The mock's bodies (the proxy's tests run against them).
        (zai_error(1302), ZaiError(C, "1302", ZAI_MESSAGES[1302])),
        (zai_error(1308, "native", 30), ZaiError(Q, "1308", ZAI_MESSAGES[1308], R, 30.0)),
        (
            zai_error(1303, "anthropic", 2.5),
            ZaiError(F, "1303", "[1303] " + ZAI_MESSAGES[1303], None, 2.5),
        ),
        # The code as an all-digits Anthropic error type.
        (dumps({"type": "error", "error": {"type": "1312", "message": "busy"}}), ZaiError(G, "1312", "busy")),
        # "error 1305:" and a bare known code in the text.
        (dumps({"error": {"message": "Error 1305: overloaded"}}), ZaiError(V, "1305", "Error 1305: overloaded")),
        (dumps({"error": {"message": "busy, 1302 again"}}), ZaiError(C, "1302", "busy, 1302 again")),
        # A bare unknown 13xx is not a code; with context it is (class unknown).
        (dumps({"error": {"message": "reduce to 1300 requests"}}), ZaiError(U, None, "reduce to 1300 requests")),
        (dumps({"error": {"message": "[1399] new thing"}}), ZaiError(U, "1399", "[1399] new thing")),
        # A structured non-13xx code yields to a 13xx code in the text, else stays.
        (dumps({"code": 429, "msg": "[1303] slow down"}), ZaiError(F, "1303", "[1303] slow down")),
        (dumps({"code": 429, "msg": "slow down"}), ZaiError(U, "429", "slow down")),
        (dumps({"error": {"code": 1302.0, "message": "m"}}), ZaiError(C, "1302", "m")),
        # Free-text codes are never codes (they would end up in a header).
        (dumps({"error": {"code": "rate_limit_exceeded", "message": "m"}}), ZaiError(U, None, "m")),
        (dumps({"error": {"code": "13\r\n02", "message": "m"}}), ZaiError(U, None, "m")),
        (dumps({"error": {"code": True, "message": "m"}}), ZaiError(U, None, "m")),
        (dumps({"error": "plain [1302] text"}), ZaiError(C, "1302", "plain [1302] text")),
        (dumps({"type": "error", "error": {"type": "rate_limit_error", "message": "slow"}}), ZaiError(U, None, "slow")),
        # Not an error document at all.
        (b"", ZaiError(U)),
        (b"   ", ZaiError(U)),
        (b"null", ZaiError(U)),
        (b"[1302]", ZaiError(U)),
        (b'"[1302]"', ZaiError(U)),
        (b"{}", ZaiError(U)),
        (b"<html><body>429 Too Many Requests</body></html>",
         ZaiError(U, None, "<html><body>429 Too Many Requests</body></html>")),
        (b"\xff\xfe garbage", ZaiError(U, None, "\ufffd\ufffd garbage")),
    ],
)  # fmt: skip
def test_classify_table(body: bytes, expected: ZaiError) -> None:
    assert classify(body, now=NOW) == expected


def test_only_account_throttles_feed_the_adaptive_rate() -> None:
    # 1302/1303 and a code-less 429 are about this account; 1305/1312 are Z.AI's capacity
    # and quotas are hours away: those shape the request's retries, never the host's rate.
    assert {cls: feeds_adaptive(cls) for cls in ErrorClass} == {
        C: True,
        F: True,
        V: False,
        Q: False,
        G: False,
        U: True,
    }


def test_class_names_are_the_documented_header_values() -> None:
    # X-Zai-Error-Class values and the class/reason metric labels: a closed, documented set.
    assert [cls.value for cls in ErrorClass] == [
        "concurrency", "frequency", "overload", "quota", "congestion", "unknown",
    ]  # fmt: skip


# --- truncated and oversized bodies ---------------------------------------------------


SAMPLES = [
    zai_error(1308),
    zai_error(1310, "native", 12),
    zai_error(1302, "anthropic", 0.5),
    dumps({"error": {"code": 1312, "message": "m", "reset_at": "2026-11-27T15:00:00Z"}}),
]


@pytest.mark.parametrize("body", SAMPLES, ids=["openai", "native", "anthropic", "reset-field"])
def test_every_truncation_is_unknown_and_does_not_raise(body: bytes) -> None:
    assert classify(body, now=NOW).cls is not U  # the whole body classifies
    for cut in range(len(body)):
        err = classify(body[:cut], now=NOW)
        assert (err.cls, err.code, err.reset_at, err.retry_after) == (U, None, None, None), cut


def test_only_max_body_bytes_are_looked_at() -> None:
    body = dumps({"error": {"code": "1302", "message": "x" * MAX_BODY}})
    assert len(body) > MAX_BODY
    assert classify(body, now=NOW).cls is U  # what the caller's bounded read would give
    assert classify(body[:MAX_BODY], now=NOW).cls is U


# --- reset times ------------------------------------------------------------------------


def with_reset(key: str, value: Any, *, level: str = "error") -> bytes:
    if level == "error":
        return dumps({"error": {"code": "1308", "message": "quota", key: value}})
    return dumps({"code": 1308, "msg": "quota", "success": False, key: value})


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("reset_at", R, R),  # epoch seconds
        ("reset_at", R * 1000, R),  # epoch milliseconds
        ("reset_at", R * 1000 + 250, R + 0.25),
        ("reset_at", R + 0.5, R + 0.5),
        ("reset_at", str(R), R),  # numeric strings
        ("reset_at", str(R * 1000), R),
        ("resets_at", "2026-11-27T15:00:00Z", R),  # RFC 3339
        ("reset_time", "2026-11-27T15:00:00z", R),
        ("reset_time", "2026-11-27T23:00:00+08:00", R),
        ("reset_time", "2026-11-27T10:00:00-05:00", R),
        ("reset_time", "2026-11-27T23:00:00+0800", R),
        ("reset_time", "2026-11-27T15:00:00.5Z", R + 0.5),
        ("reset_time", "2026-11-27T15:00:00.123456789Z", R + 0.123456),
        ("next_reset_time", "2026-11-27 23:00:00", R),  # naive: Beijing time
        ("next_reset_time", "2026-11-27T23:00:00", R),
        ("next_reset_time", "2026-11-27 23:00", R),
        ("next_reset_time", "2026-11-27 15:00:00 UTC", R),
        ("next_reset_time", "2026-11-27 23:00:00 UTC+8", R),
        ("nextResetTime", R * 1000, R),  # Z.AI's quota API spelling
        ("resetAt", R, R),
        ("reset_at", 3600, NOW + 3600),  # too small for an epoch: seconds from now
        ("reset_at", "90", NOW + 90),
        # Not a time: ignored.
        ("reset_at", 0, None),
        ("reset_at", -5, None),
        ("reset_at", True, None),
        ("reset_at", None, None),
        ("reset_at", "soon", None),
        ("reset_at", "2026-13-27 23:00:00", None),
        ("reset_at", "2026-11-27 25:00:00", None),
        ("reset_at", "2026-11-27T23:00:00+24:00", None),
        ("reset_at", 10**16, None),  # past the year 9999 even as milliseconds
        ("reset_at", [R], None),
        ("reset_window", R, None),  # not one of the reset fields
    ],
)
def test_reset_fields(key: str, value: Any, expected: float | None) -> None:
    for level in ("error", "top"):
        err = classify(with_reset(key, value, level=level), now=NOW)
        assert err.cls is Q
        assert err.reset_at == expected, level


def test_reset_in_the_past_is_kept() -> None:
    err = classify(with_reset("reset_at", NOW - 60), now=NOW)
    assert err.reset_at == NOW - 60


def test_error_level_reset_wins_over_top_level_and_text() -> None:
    body = dumps(
        {
            "reset_at": R + 1,
            "error": {"code": "1308", "message": "reset at 2026-11-27 23:00:09", "reset_at": R},
        }
    )
    assert classify(body, now=NOW).reset_at == R
    body = dumps(
        {"reset_at": R + 1, "error": {"code": "1308", "message": "reset at 2026-11-27 23:00:09"}}
    )
    assert classify(body, now=NOW).reset_at == R + 1


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        ("Usage limit reached for 5 hour. Your limit will reset at 2026-11-27 23:00:00", R),
        ("Weekly/Monthly Limit Exhausted. Your limit will reset at 2026-12-01 00:00:00", R_1310),
        ("limit resets at 2026-11-27T15:00:00Z, sorry", R),
        ("Limit reached. Reset: 2026-11-27T23:00:00+08:00.", R),
        (f"quota exhausted, reset_at={R}", R),
        (f'{{"code":1308,"reset_at":{R * 1000}}}', R),
        ("已达到 5 小时的使用上限。您的限额将在 2026-11-27 23:00:00 重置。", R),
        # A date-time anywhere is the fallback when none follows "reset".
        ("quota exhausted until 2026-11-27 23:00:00", R),
        (f"quota exhausted, number {R}", None),  # bare numbers only after "reset"
        ("Your limit will reset soon", None),
        ("reset at 2026-02-30 00:00:00", None),
    ],
)
def test_reset_in_message_text(message: str, expected: float | None) -> None:
    for body in (
        openai_str(1308, message),
        native(1308, message),
        anthropic_bracket(1308, message),
    ):
        assert classify(body, now=NOW).reset_at == expected


# --- retry_after in the body ------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [(5, 5.0), (2.5, 2.5), ("7", 7.0), (" 1.5 ", 1.5), (0, 0.0),
     (-1, None), ("soon", None), (True, None), (None, None), ("nan", None), ([1], None)],
)  # fmt: skip
def test_body_retry_after(value: Any, expected: float | None) -> None:
    for body in (
        dumps({"error": {"code": "1303", "message": "m", "retry_after": value}}),
        dumps({"code": 1303, "msg": "m", "retryAfter": value}),
    ):
        err = classify(body, now=NOW)
        assert (err.cls, err.retry_after) == (F, expected)


# --- RetryPolicy ------------------------------------------------------------------------


def waits(
    policy: RetryPolicy, err: ZaiError, header: float | None = None, **kw: Any
) -> list[float | None]:
    return [policy.next_wait(err, attempt, header, now=NOW, **kw) for attempt in range(5)]


@pytest.mark.parametrize(
    ("cls", "expected"),
    [
        (C, [0.5, 1.0, 2.0, None, None]),
        (F, [1.0, 2.0, 4.0, None, None]),
        (V, [2.0, 4.0, 8.0, None, None]),
        (G, [2.0, 4.0, 8.0, None, None]),
        (U, [1.0, 2.0, 4.0, None, None]),
        (Q, [None] * 5),
    ],
)
def test_backoff_per_class(cls: ErrorClass, expected: list[float | None]) -> None:
    assert waits(RetryPolicy(), ZaiError(cls)) == expected


def test_quota_is_never_retried_whatever_the_hints() -> None:
    err = ZaiError(Q, "1308", reset_at=NOW + 1, retry_after=0.0)
    assert waits(RetryPolicy(max_retries=100), err, header=0.0) == [None] * 5


def test_cap_and_more_retries() -> None:
    policy = RetryPolicy(max_retries=10)
    assert [policy.next_wait(ZaiError(G), a, None, now=NOW) for a in range(7)] == [
        2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0,
    ]  # fmt: skip
    assert RetryPolicy(max_retries=0).next_wait(ZaiError(C), 0, None, now=NOW) is None
    assert RetryPolicy(max_retries=2000).next_wait(ZaiError(C), 1999, None, now=NOW) == 30.0


def test_jitter_without_a_floor_scales_the_curve() -> None:
    policy = RetryPolicy()
    assert waits(policy, ZaiError(F), rand=0.5)[:3] == [0.5, 1.0, 2.0]  # the worker's lowest
    assert waits(policy, ZaiError(F), rand=0.75)[:3] == [0.75, 1.5, 3.0]
    assert waits(policy, ZaiError(F), rand=0.0)[:3] == [0.0, 0.0, 0.0]
    assert waits(policy, ZaiError(F), rand=7.0)[:3] == [1.0, 2.0, 4.0]  # clamped to [0, 1]
    assert waits(policy, ZaiError(F), rand=math.nan)[:3] == [1.0, 2.0, 4.0]


def test_jitter_spreads_a_shared_floor_instead_of_vanishing_under_it() -> None:
    # Z.AI answers every request of a burst "Retry-After: 1". Jitter under that floor was
    # erased by it (every wait exactly 1 s: the burst came back in one instant); now the
    # spread lies above it: F .. F + curve/2 for the worker's jitter range [0.5, 1].
    policy = RetryPolicy()
    spread = [policy.next_wait(ZaiError(F), 0, 1.0, now=NOW, rand=j)
              for j in (1.0, 0.875, 0.75, 0.625, 0.5)]
    assert spread == [1.0, 1.125, 1.25, 1.375, 1.5]
    # One random amount d = curve*(1 - j) is taken off the curve or added to the floor,
    # whichever is later: curve 2 s, floor 1 s -> 2.0, 1.5 (both), 2.0 (the floor's side).
    assert [policy.next_wait(ZaiError(F), 1, 1.0, now=NOW, rand=j) for j in (1.0, 0.75, 0.5)] \
        == [2.0, 1.5, 2.0]
    assert [policy.next_wait(ZaiError(F), 2, 1.0, now=NOW, rand=j)
            for j in (1.0, 0.75, 0.625, 0.5)] == [4.0, 3.0, 2.5, 3.0]
    # Never before the floor, whatever the jitter; overload spreads over its 2 s curve.
    assert waits(policy, ZaiError(F), header=3.0, rand=0.0)[:3] == [4.0, 5.0, 7.0]
    assert waits(policy, ZaiError(V), header=1.0, rand=0.5)[:3] == [2.0, 3.0, 5.0]


def test_wait_is_the_max_of_backoff_header_body_and_reset() -> None:
    policy = RetryPolicy()
    assert waits(policy, ZaiError(C), header=1.5)[:3] == [1.5, 1.5, 2.0]
    assert waits(policy, ZaiError(C, retry_after=3.0))[:3] == [3.0, 3.0, 3.0]
    assert waits(policy, ZaiError(C, retry_after=3.0), header=5.0)[:3] == [5.0, 5.0, 5.0]
    assert waits(policy, ZaiError(C, retry_after=6.0), header=5.0)[:3] == [6.0, 6.0, 6.0]
    assert waits(policy, ZaiError(F, reset_at=NOW + 20))[:3] == [20.0, 20.0, 20.0]
    assert waits(policy, ZaiError(F, reset_at=NOW - 20))[:3] == [1.0, 2.0, 4.0]  # past: no effect
    assert waits(policy, ZaiError(G), header=0.0)[:3] == [2.0, 4.0, 8.0]


def test_a_wait_over_max_wait_is_not_taken() -> None:
    policy = RetryPolicy()
    assert policy.next_wait(ZaiError(C), 0, 60.0, now=NOW) == 60.0
    assert policy.next_wait(ZaiError(C), 0, 60.5, now=NOW) is None
    assert policy.next_wait(ZaiError(C), 0, math.inf, now=NOW) is None
    assert policy.next_wait(ZaiError(C), 0, math.nan, now=NOW) == 0.5  # unusable: ignored
    assert policy.next_wait(ZaiError(F, retry_after=61.0), 0, None, now=NOW) is None
    assert policy.next_wait(ZaiError(F, reset_at=NOW + 61), 0, None, now=NOW) is None
    assert (
        RetryPolicy(max_wait=120).next_wait(ZaiError(F, reset_at=NOW + 61), 0, None, now=NOW) == 61
    )


def test_policy_validation() -> None:
    with pytest.raises(ValueError, match="attempt"):
        RetryPolicy().next_wait(ZaiError(C), -1, None, now=NOW)
    for bad in (
        {"max_retries": -1},
        {"cap": -1.0},
        {"concurrency_delay": math.nan},
        {"max_wait": math.inf},
    ):
        with pytest.raises(ValueError, match=next(iter(bad))):
            RetryPolicy(**bad)


def test_policy_is_frozen() -> None:
    policy = RetryPolicy()
    with pytest.raises(AttributeError):
        policy.max_retries = 5  # type: ignore[misc]


# --- Retry-After header -----------------------------------------------------------------

DATE_NOW = 1445412480  # Wed, 21 Oct 2015 07:28:00 GMT


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (b"120", 120.0),
        (b" 3 ", 3.0),
        (b"0", 0.0),
        (b"1.5", 1.5),
        (b"Wed, 21 Oct 2015 07:28:30 GMT", 30.0),  # IMF-fixdate
        (b"Wednesday, 21-Oct-15 07:28:30 GMT", 30.0),  # RFC 850
        (b"Wed Oct 21 07:28:30 2015", 30.0),  # asctime
        (b"Wed, 21 Oct 2015 07:27:00 GMT", 0.0),  # in the past
        (None, None),
        (b"", None),
        (b"-1", None),
        (b"soon", None),
        (b"1e3", None),
        (b"Wed, 99 Oct 2015 07:28:30 GMT", None),
        (b"\xff\xfe", None),
        (b"9" * 100, None),
    ],
)
def test_parse_retry_after(value: bytes | None, expected: float | None) -> None:
    assert parse_retry_after(value, now=DATE_NOW) == expected


# --- final headers ----------------------------------------------------------------------


def test_final_headers_when_upstream_sent_retry_after() -> None:
    err = classify(zai_error(1308), now=NOW)
    for name in (b"retry-after", b"Retry-After"):
        upstream = [(b"content-type", b"application/json"), (name, b"1")]
        assert final_headers(err, upstream, now=NOW) == [
            (b"x-zai-error-class", b"quota"),
            (b"x-zai-error-code", b"1308"),
            (b"x-zai-rate-limit-reset", b"2026-11-27T15:00:00Z"),
        ]


def test_final_headers_derive_retry_after() -> None:
    upstream = [(b"content-type", b"application/json")]
    err = classify(zai_error(1308), now=NOW)
    assert final_headers(err, upstream, now=NOW) == [
        (b"x-zai-error-class", b"quota"),
        (b"x-zai-error-code", b"1308"),
        (b"x-zai-rate-limit-reset", b"2026-11-27T15:00:00Z"),
        (b"retry-after", b"10800"),
    ]

    def retry_after(err: ZaiError) -> bytes | None:
        return dict(final_headers(err, [], now=NOW)).get(b"retry-after")

    assert retry_after(ZaiError(F, "1303", retry_after=2.5)) == b"3"
    assert retry_after(ZaiError(F, "1303", retry_after=0.0)) == b"1"  # at least 1
    assert retry_after(ZaiError(F, reset_at=NOW - 100)) == b"1"  # reset passed: 1
    assert retry_after(ZaiError(F, reset_at=NOW + 9.2, retry_after=4.0)) == b"10"  # the later
    assert retry_after(ZaiError(F, reset_at=NOW + 2, retry_after=4.0)) == b"4"
    assert retry_after(ZaiError(C, "1302")) is None  # nothing to derive it from


def test_final_headers_minimal_and_unsafe() -> None:
    assert final_headers(ZaiError(U), [], now=NOW) == [(b"x-zai-error-class", b"unknown")]
    assert final_headers(ZaiError(C, "13\r\n02"), [], now=NOW) == [
        (b"x-zai-error-class", b"concurrency")
    ]
    reset = dict(final_headers(ZaiError(Q, reset_at=R + 0.2), [], now=NOW))
    assert reset[b"x-zai-rate-limit-reset"] == b"2026-11-27T15:00:01Z"  # rounded up
    odd = final_headers(ZaiError(Q, reset_at=1e300, retry_after=math.inf), [], now=NOW)
    assert odd == [(b"x-zai-error-class", b"quota")]
    assert final_headers(ZaiError(F, retry_after=2.0**31), [], now=NOW) == [
        (b"x-zai-error-class", b"frequency")
    ]
    assert dict(final_headers(ZaiError(F, retry_after=2.0**31 - 1), [], now=NOW))[
        b"retry-after"
    ] == b"%d" % (2**31 - 1)


# --- property: arbitrary input never raises ---------------------------------------------

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=12,
)
KEYS = st.sampled_from(
    ["code", "msg", "message", "type", "error", "reset_at", "resets_at", "reset_time",
     "next_reset_time", "nextResetTime", "retry_after", "retryAfter"]
)  # fmt: skip
ZAI_LIKE = st.recursive(JSON, lambda inner: st.dictionaries(KEYS, inner, max_size=6), max_leaves=16)


def check_headers(err: ZaiError) -> None:
    headers = final_headers(err, [], now=NOW)
    h11.Response(status_code=429, headers=headers)  # h11 validates names and values


@given(st.binary(max_size=512), st.floats(0, 4e9))
def test_arbitrary_bytes_never_raise(body: bytes, now: float) -> None:
    err = classify(body, now=now)
    assert isinstance(err.cls, ErrorClass)
    check_headers(err)
    parse_retry_after(body[:80], now=now)
    RetryPolicy().next_wait(err, 0, None, now=now)


@given(ZAI_LIKE, st.floats(0, 4e9))
def test_arbitrary_json_never_raises(doc: Any, now: float) -> None:
    err = classify(json.dumps(doc).encode(), now=now)
    assert err.code is None or err.code.isdigit()
    check_headers(err)
    wait = RetryPolicy().next_wait(err, 0, None, now=now)
    assert wait is None or 0 <= wait <= 60


@given(st.text(max_size=300))
def test_arbitrary_messages_never_raise(text: str) -> None:
    for body in (openai_str(1308, text), native(1308, text), anthropic_bracket(1399, text)):
        check_headers(classify(body, now=NOW))


@pytest.mark.parametrize("shape", ["openai", "native", "anthropic"])
@pytest.mark.parametrize("code", sorted(ZAI_MESSAGES))
def test_every_mock_body_classifies(shape: str, code: int) -> None:
    err = classify(zai_error(code, shape, 4), now=NOW)
    assert (err.cls, err.code, err.reset_at, err.retry_after) == (
        CODE_CLASSES[code],
        str(code),
        RESETS.get(code),
        4.0,
    )
