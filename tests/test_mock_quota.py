"""The mock upstream's quota endpoint (zaiproxy/mock/quota.py): usage that moves with the
traffic the mock serves, per key, on an injected wall clock; every test shape through the
proxy's parser (zaiproxy/upstream/quota.py); one block shared by the workers of a
multi-process mock. Through real sockets on port 0 unless the test is about pure pieces."""

from __future__ import annotations

import functools
import hashlib
import os
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest
import trio
import trio.testing

from tests.harness import Response, request, start_process
from zaiproxy.mock.behaviour import MockOptions, MockRequest, plan_response
from zaiproxy.mock.controls import ControlError, QuotaShape, parse_headers
from zaiproxy.mock.payloads import prompt_tokens
from zaiproxy.mock.quota import (
    CONTROL_PATH,
    MAX_ACCOUNTS,
    QUOTA_PATH,
    QuotaBook,
    QuotaChange,
    Window,
    account_id,
    account_key,
    parse_change,
)
from zaiproxy.mock.server import serve_mock_tcp
from zaiproxy.upstream import quota as parser

# `make test` runs the suite twice (h11, then h11-mypyc); the mock and these clients use plain
# h11 whatever ZAIPROXY_HTTP_IMPL says, so the second run would repeat the first: run once.
pytestmark = pytest.mark.skipif(os.environ.get("ZAIPROXY_HTTP_IMPL") == "h11-mypyc",
                                reason="independent of the HTTP implementation")

T0 = 1_767_225_600.0  # 2026-01-01T00:00:00Z
HOUR = 3600.0
CHAT = "/v1/chat/completions"
MESSAGES = "/api/anthropic/v1/messages"
QUOTA = "/api/monitor/usage/quota/limit"
CHAT_BODY = b'{"model":"glm-4.6","messages":[{"role":"user","content":"hello there"}]}'
STREAM_BODY = b'{"model":"glm-4.6","stream":true,"messages":[{"role":"user","content":"hi"}]}'
MSG_BODY = b'{"model":"glm-4.6","max_tokens":64,"messages":[{"role":"user","content":"hi"}]}'


class Clock:
    """An injected wall clock: unix seconds, moved by the test."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def cost(body: bytes, chunks: int = 10) -> int:
    """What one generation bills: prompt + completion tokens as the mock reports them."""
    return prompt_tokens(body) + chunks


async def start(nursery: trio.Nursery, options: MockOptions | None = None,
                clock: Clock | None = None) -> tuple[int, QuotaBook]:
    options = options or MockOptions()
    book = QuotaBook.from_options(options, clock=clock or Clock())
    _, port = await nursery.start(functools.partial(serve_mock_tcp, options, quota=book))
    return port, book


async def poll(port: int, key: str | None = None, **headers: str) -> Response:
    sent = [(k.replace("_", "-"), v) for k, v in headers.items()]
    if key is not None:
        sent.append(("authorization", key))
    return await request(port, "GET", QUOTA, sent)


async def parsed(port: int, key: str | None = None, **headers: str) -> parser.QuotaSample:
    reply = await poll(port, key, **headers)
    return parser.parse_quota(reply.status, reply.body)


async def outcome(port: int, key: str | None = None, **headers: str) -> str:
    reply = await poll(port, key, **headers)
    try:
        parser.parse_quota(reply.status, reply.body)
    except parser.QuotaError as exc:
        return exc.outcome
    return "success"


async def quota_state(port: int) -> dict[str, Any]:
    reply = await request(port, "GET", "/mock/stats")
    assert reply.status == 200
    section: dict[str, Any] = reply.json()["quota"]
    return section


async def control(port: int, doc: Any, key: str | None = None) -> Response:
    headers = [] if key is None else [("authorization", key)]
    return await request(port, "POST", "/mock/quota", headers, orjson.dumps(doc))


async def generate(port: int, key: str | None = None, target: str = CHAT,
                   body: bytes = CHAT_BODY, *extra: tuple[str, str]) -> Response:
    headers = list(extra)
    if key is not None:
        headers.append(("x-api-key", key) if "anthropic" in target else
                       ("authorization", f"Bearer {key}"))
    reply = await request(port, "POST", target, headers, body)
    return reply


# --- pure pieces ------------------------------------------------------------------------------


def test_paths_agree_with_the_proxy_side() -> None:
    assert QUOTA_PATH.decode() == parser.QUOTA_PATH == QUOTA
    assert CONTROL_PATH == b"/mock/quota"


def test_account_key_and_id() -> None:
    assert account_key([(b"x-api-key", b"k1"), (b"authorization", b"Bearer k2")]) == b"k1"
    assert account_key([(b"authorization", b"Bearer  k2 ")]) == b"k2"
    assert account_key([(b"authorization", b"bearer k2")]) == b"k2"
    assert account_key([(b"authorization", b"k3")]) == b"k3"  # raw, as Z.AI's quota clients send
    assert account_key([(b"x-api-key", b"k1")], authorization_only=True) is None
    assert account_key([(b"authorization", b"")]) is None
    assert account_key([(b"authorization", b"Bearer ")]) is None
    assert account_key([]) is None
    assert account_id(None) == "shared"
    assert account_id("k1") == account_id(b"k1") == hashlib.sha256(b"k1").hexdigest()[:12]


@pytest.mark.parametrize(("used", "allowance", "percentage"), [
    (0, 100, 0), (4, 1000, 0), (5, 1000, 1), (15, 1000, 2), (25, 1000, 3),  # half up
    (994, 1000, 99), (995, 1000, 100), (1000, 1000, 100), (5000, 1000, 100),  # at most 100
    (1, 3, 33), (2, 3, 67),
])
def test_percentage_is_zai_integer_percent(used: int, allowance: int, percentage: int) -> None:
    assert Window(allowance, used, None).percentage == percentage


def test_generation_plans_carry_their_tokens() -> None:
    options = MockOptions()

    def tokens(target: bytes, body: bytes, *headers: tuple[bytes, bytes]) -> int:
        request = MockRequest(b"POST", target, b"1.1", headers, body)
        return plan_response(request, options).tokens

    assert tokens(b"/v1/chat/completions", CHAT_BODY) == cost(CHAT_BODY)
    assert tokens(b"/v1/chat/completions", STREAM_BODY) == cost(STREAM_BODY)
    assert tokens(b"/v1/messages", MSG_BODY, (b"x-mock-chunks", b"3")) == cost(MSG_BODY, 3)
    assert tokens(b"/v1/completions", b'{"prompt":"x"}') == cost(b'{"prompt":"x"}')
    # Hiding the usage report does not make the tokens free.
    assert tokens(b"/v1/chat/completions", STREAM_BODY, (b"x-mock-usage", b"none")) == cost(
        STREAM_BODY)
    # Not generations, not 200, or cut by a fault: nothing billed.
    assert tokens(b"/v1/embeddings", b'{"input":"hello"}') == 0
    assert tokens(b"/v1/messages/count_tokens", MSG_BODY) == 0
    assert tokens(b"/v1/chat/completions", CHAT_BODY, (b"x-mock-status", b"500")) == 0
    assert tokens(b"/v1/chat/completions", CHAT_BODY, (b"x-mock-zai-code", b"1302")) == 0
    assert tokens(b"/v1/chat/completions", STREAM_BODY, (b"x-mock-fault", b"reset-mid-stream")) == 0
    assert tokens(b"/v1/chat/completions", b"{bad") == 0
    denied = MockOptions(api_key="k")
    request = MockRequest(b"POST", b"/v1/chat/completions", b"1.1", (), CHAT_BODY)
    assert plan_response(request, denied).tokens == 0


def test_quota_shape_header_is_a_control() -> None:
    assert parse_headers({b"x-mock-quota-shape": b"Slow"}).quota_shape is QuotaShape.SLOW
    with pytest.raises(ControlError, match="x-mock-quota-shape must be one of ok, error"):
        parse_headers({b"x-mock-quota-shape": b"broken"})


def test_parse_change() -> None:
    assert parse_change(b"") == QuotaChange()
    assert parse_change(b"{}") == QuotaChange()
    full = parse_change(orjson.dumps({
        "reset": True, "shape": "oversized", "level": "max", "five_hour_allowance": 10,
        "weekly_allowance": 20, "used": {"five_hour": 3}, "reset_at_ms": {"weekly": None},
    }))
    assert full == QuotaChange(True, QuotaShape.OVERSIZED, "max", 10, 20, {"five_hour": 3},
                               {"weekly": None})
    for bad, message in [
        (b"[", "not JSON"), (b"[]", "must be a JSON object"), (b'{"sahpe":"ok"}', "sahpe"),
        (b'{"shape":"fast"}', "shape must be one of"), (b'{"level":""}', "level"),
        (b'{"level":"a b"}', "level"), (b'{"level":7}', "level"),
        (b'{"five_hour_allowance":0}', "five_hour_allowance"),
        (b'{"weekly_allowance":true}', "weekly_allowance"),
        (b'{"weekly_allowance":1.5}', "weekly_allowance"),
        (b'{"used":{"monthly":1}}', "used must be an object"), (b'{"used":5}', "used must be"),
        (b'{"used":{"five_hour":-1}}', "used.five_hour"),
        (b'{"used":{"five_hour":null}}', "used.five_hour"),
        (b'{"reset_at_ms":{"weekly":"soon"}}', "reset_at_ms.weekly"),
        (b'{"reset":1}', "reset must be"),
    ]:
        with pytest.raises(ControlError, match=message):
            parse_change(bad)


def test_options_and_cli_flags_are_validated() -> None:
    assert (MockOptions().quota_five_hour, MockOptions().quota_weekly) == (4_000_000, 40_000_000)
    assert MockOptions().quota_level == "pro"
    for bad in ({"quota_five_hour": 0}, {"quota_weekly": -1}, {"quota_level": ""},
                {"quota_level": "x" * 25}, {"quota_level": "pro plan"}):
        with pytest.raises(ValueError, match="quota_"):
            MockOptions(**bad)


# --- the book on its own clock -----------------------------------------------------------------


def test_windows_start_at_first_use_and_reset_after_their_period() -> None:
    clock = Clock()
    book = QuotaBook(five_hour_allowance=1000, weekly_allowance=10_000, clock=clock)
    assert book.accounts() == {}
    book.charge(b"k", 100)
    clock.now += HOUR
    book.charge(b"k", 50)
    account = book.poll(b"k")
    assert (account.five_hour, account.weekly) == (
        Window(1000, 150, T0 + 5 * HOUR), Window(10_000, 150, T0 + 7 * 24 * HOUR))
    assert (account.requests, account.tokens, account.polls) == (2, 150, 1)
    clock.now = T0 + 5 * HOUR - 0.001
    assert book.poll(b"k").five_hour.used == 150
    clock.now = T0 + 5 * HOUR  # the five-hour window is over: back at 0, not started
    account = book.poll(b"k")
    assert (account.five_hour, account.weekly.used) == (Window(1000, 0, None), 150)
    clock.now += 2 * HOUR  # the next use starts it anew, from then
    book.charge(b"k", 7)
    account = book.poll(b"k")
    assert account.five_hour == Window(1000, 7, T0 + 12 * HOUR)
    assert account.weekly == Window(10_000, 157, T0 + 7 * 24 * HOUR)
    clock.now = T0 + 7 * 24 * HOUR
    assert book.poll(b"k").weekly == Window(10_000, 0, None)
    assert book.accounts()[account_id(b"k")].tokens == 157  # lifetime, never reset


def test_accounts_are_bounded_least_recently_used_first_out() -> None:
    book = QuotaBook(clock=Clock(), slots=3)
    for key in (b"a", b"b", b"c"):
        book.charge(key, 1)
    book.charge(b"a", 1)  # b is now the least recently used
    book.charge(b"d", 5)
    assert list(book.accounts()) == [account_id(k) for k in (b"d", b"a", b"c")]
    book.charge(b"b", 1)  # b comes back as a new account; c goes
    state = book.accounts()
    assert list(state) == [account_id(k) for k in (b"b", b"d", b"a")]
    assert (state[account_id(b"b")].tokens, state[account_id(b"a")].tokens) == (1, 2)
    full = QuotaBook(clock=Clock())
    for i in range(MAX_ACCOUNTS * 2):
        full.charge(b"key-%d" % i, 1)
    assert len(full.accounts()) == MAX_ACCOUNTS
    assert len(full._index) <= MAX_ACCOUNTS


def test_two_mappings_of_one_block_agree() -> None:
    """Two writers simulated in one process (the real processes are tested below): each
    keeps its own slot memo, and an eviction by the other is noticed by the digest."""
    clock = Clock()
    one = QuotaBook(clock=clock, slots=2, shared=True)
    two = QuotaBook(clock=clock, slots=2, _fd=os.dup(one._fd))
    try:
        one.charge(b"a", 1)
        one.charge(b"b", 2)
        two.charge(b"b", 3)  # found by scanning, then remembered
        two.charge(b"c", 4)  # evicts a, which one still remembers
        one.charge(b"a", 5)  # not c's slot: a comes back as new and evicts b
        for book in (one, two):
            state = book.accounts()
            assert {ident: a.tokens for ident, a in state.items()} == {
                account_id(b"a"): 5, account_id(b"c"): 4}
        for i in range(100):
            (one if i % 2 else two).charge(b"k%d" % i, 1)
        assert len(one._index) <= 2 and len(two._index) <= 2
        assert len(one.accounts()) == 2
    finally:
        one.close()
        two.close()


def test_change_sets_usage_windows_shape_and_level() -> None:
    clock = Clock()
    book = QuotaBook(clock=clock)
    account = book.change(None, QuotaChange(used={"five_hour": 1_000_000}, level="max",
                                            shape=QuotaShape.ERROR, weekly_allowance=8_000_000))
    assert account.id == "shared"
    assert (account.level, account.shape) == ("max", QuotaShape.ERROR)
    assert account.five_hour == Window(4_000_000, 1_000_000, T0 + 5 * HOUR)  # used starts it
    assert account.weekly == Window(8_000_000, 0, None)
    account = book.change(None, QuotaChange(reset_at_ms={"five_hour": int(T0 * 1000) + 90_000,
                                                         "weekly": int(T0 * 1000) + 1}))
    assert (account.five_hour.reset_at, account.weekly.reset_at) == (T0 + 90, T0 + 0.001)
    clock.now += 1  # the weekly window set to end in a millisecond has ended
    assert book.poll(None).weekly == Window(8_000_000, 0, None)
    account = book.change(None, QuotaChange(used={"five_hour": 0}))
    assert account.five_hour == Window(4_000_000, 0, None)  # 0 ends the window
    account = book.change(None, QuotaChange(reset=True))
    assert (account.level, account.shape, account.weekly, account.polls) == (
        "pro", QuotaShape.OK, Window(40_000_000, 0, None), 0)


def test_a_book_pickles_only_while_spawning() -> None:
    """The fd travels to a spawned child (tested with real processes below), nowhere else."""
    with pytest.raises(RuntimeError, match="only be passed to a process being spawned"):
        pickle.dumps(QuotaBook(clock=Clock(), shared=True))


# --- on the wire -------------------------------------------------------------------------------


async def test_usage_fills_with_the_traffic_served(nursery: trio.Nursery) -> None:
    options = MockOptions(quota_five_hour=1000, quota_weekly=100_000)
    port, _ = await start(nursery, options)
    assert await quota_state(port) == {"polls": 0, "accounts": {}}
    sample = await parsed(port)  # nothing used: 0 %, windows not started (no reset time)
    assert sample == parser.QuotaSample("pro", (
        parser.QuotaWindow("five_hour", "TOKENS_LIMIT", 0.0, None),
        parser.QuotaWindow("weekly", "TOKENS_LIMIT", 0.0, None),
    ))
    assert await quota_state(port) == {"polls": 1, "accounts": {"shared": {
        "level": "pro", "shape": "ok", "polls": 1, "requests": 0, "tokens": 0,
        "five_hour": {"allowance": 1000, "used": 0, "percentage": 0, "reset_at_ms": None},
        "weekly": {"allowance": 100_000, "used": 0, "percentage": 0, "reset_at_ms": None},
    }}}

    assert (await generate(port)).status == 200
    assert (await generate(port, None, CHAT, STREAM_BODY)).status == 200
    assert (await generate(port, None, MESSAGES, MSG_BODY, ("x-mock-chunks", "4"))).status == 200
    stream_msg = MSG_BODY.replace(b'"max_tokens"', b'"stream":true,"max_tokens"')
    reply = await generate(port, None, MESSAGES, stream_msg, ("x-mock-usage", "none"))
    assert reply.status == 200
    total = cost(CHAT_BODY) + cost(STREAM_BODY) + cost(MSG_BODY, 4) + cost(stream_msg)
    # Not billed: failures, faults, other routes, the mock's own routes, polls.
    await generate(port, None, CHAT, CHAT_BODY, ("x-mock-status", "503"))
    await generate(port, None, CHAT, STREAM_BODY, ("x-mock-fault", "close-mid-body"))
    await request(port, "POST", "/v1/embeddings", [], b'{"input":"hi"}')
    await request(port, "GET", "/v1/models")
    await poll(port)

    account = (await quota_state(port))["accounts"]["shared"]
    assert (account["requests"], account["tokens"], account["polls"]) == (4, total, 2)
    ms = int(T0 * 1000)
    assert account["five_hour"] == {"allowance": 1000, "used": total,
                                    "percentage": (total * 200 + 1000) // 2000,
                                    "reset_at_ms": ms + 5 * 3600_000}
    assert account["weekly"]["used"] == total
    sample = await parsed(port)
    assert sample == parser.QuotaSample("pro", (
        parser.QuotaWindow("five_hour", "TOKENS_LIMIT", account["five_hour"]["percentage"] / 100,
                           T0 + 5 * HOUR),
        parser.QuotaWindow("weekly", "TOKENS_LIMIT", 0.0, T0 + 7 * 24 * HOUR),
    ))
    # Polls are not traffic: the request statistics never saw them.
    stats = (await request(port, "GET", "/mock/stats")).json()
    assert QUOTA not in stats["by_path"]
    assert stats["requests"] == 8


async def test_the_answer_looks_like_zai(nursery: trio.Nursery) -> None:
    port, _ = await start(nursery)
    await generate(port)
    for target in (QUOTA, "/api/anthropic" + QUOTA, QUOTA + "/", QUOTA + "?x=1"):
        reply = await request(port, "GET", target)
        assert (reply.status, reply.header(b"content-type")) == (200, b"application/json")
        doc = reply.json()
        assert list(doc) == ["code", "msg", "data", "success"]
        assert (doc["code"], doc["msg"], doc["success"]) == (200, "Operation successful", True)
        assert doc["data"]["level"] == "pro"
        five, week, time_limit = doc["data"]["limits"]
        assert five == {"type": "TOKENS_LIMIT", "unit": 3, "number": 5, "percentage": 0,
                        "nextResetTime": int(T0 * 1000) + 5 * 3600_000}
        assert (week["unit"], week["number"]) == (6, 1)
        assert (time_limit["type"], time_limit["unit"]) == ("TIME_LIMIT", 5)
        assert time_limit["nextResetTime"] == 1_769_904_000_000  # 2026-02-01, UTC
    head = await request(port, "HEAD", QUOTA)
    assert (head.status, head.body) == (200, b"")
    reply = await request(port, "POST", QUOTA)
    assert (reply.status, reply.header(b"allow")) == (405, b"GET, HEAD")
    assert reply.json()["success"] is False


async def test_five_hour_window_resets_on_the_injected_clock(nursery: trio.Nursery) -> None:
    clock = Clock()
    port, _ = await start(nursery, MockOptions(quota_five_hour=100), clock)
    await generate(port)
    first = cost(CHAT_BODY)
    clock.now += 4 * HOUR
    await generate(port)
    sample = await parsed(port)
    five = sample.window("five_hour")
    assert five is not None and (five.used_fraction, five.reset_at) == (
        min(1.0, round(2 * first) / 100), T0 + 5 * HOUR)
    clock.now = T0 + 5 * HOUR
    sample = await parsed(port)
    assert sample.window("five_hour") == parser.QuotaWindow(  # not started: 0 %, no reset time
        "five_hour", "TOKENS_LIMIT", 0.0, None)
    account = (await quota_state(port))["accounts"]["shared"]
    assert account["five_hour"] == {"allowance": 100, "used": 0, "percentage": 0,
                                    "reset_at_ms": None}
    assert account["weekly"]["used"] == 2 * first  # the week goes on
    clock.now += 0.5 * HOUR
    await generate(port)
    account = (await quota_state(port))["accounts"]["shared"]
    assert account["five_hour"]["used"] == first
    assert account["five_hour"]["reset_at_ms"] == int((T0 + 10.5 * HOUR) * 1000)
    assert account["weekly"]["used"] == 3 * first


async def test_accounts_are_per_key(nursery: trio.Nursery) -> None:
    port, _ = await start(nursery)
    await generate(port, "key-a")  # Bearer
    await generate(port, "key-a", MESSAGES, MSG_BODY)  # x-api-key: the same account
    await generate(port, "key-b")
    await generate(port)  # no key: the shared account
    await request(port, "POST", CHAT, [("authorization", "key-b")], CHAT_BODY)  # raw key
    accounts = (await quota_state(port))["accounts"]
    assert {ident: a["tokens"] for ident, a in accounts.items()} == {
        account_id("key-a"): cost(CHAT_BODY) + cost(MSG_BODY),
        account_id("key-b"): 2 * cost(CHAT_BODY),
        "shared": cost(CHAT_BODY),
    }
    assert not any("key-" in ident for ident in accounts)  # keys are never shown
    # Each key's poll sees its own account, raw or Bearer.
    await control(port, {"five_hour_allowance": 100}, "key-b")
    b = (await parsed(port, "Bearer key-b")).window("five_hour")
    assert b is not None and b.used_fraction == min(1.0, round(2 * cost(CHAT_BODY)) / 100)
    a = (await parsed(port, "key-a")).window("five_hour")
    assert a is not None and a.used_fraction == 0.0  # 4M allowance: rounds to 0 %


async def test_auth_when_the_mock_has_a_key(nursery: trio.Nursery) -> None:
    port, book = await start(nursery, MockOptions(api_key="sekret"))
    for good in ("sekret", "Bearer sekret", "bearer sekret"):
        assert (await poll(port, good)).status == 200
    for bad in (None, "wrong", "Bearer wrong", ""):
        reply = await poll(port, bad)
        assert reply.status == 401
        doc = reply.json()
        assert (doc["code"], doc["success"]) == (1001, False)
        assert isinstance(doc["msg"], str) and doc["msg"]
        with pytest.raises(parser.QuotaError) as info:
            parser.parse_quota(reply.status, reply.body)
        assert info.value.outcome == "error"
        assert "sekret" not in info.value.message
    # x-api-key is not how Z.AI's quota endpoint is called.
    assert (await request(port, "GET", QUOTA, [("x-api-key", "sekret")])).status == 401
    state = await quota_state(port)
    assert state["polls"] == 3 + 4 + 1
    assert list(state["accounts"]) == [account_id("sekret")]
    assert state["accounts"][account_id("sekret")]["polls"] == 3
    assert "sekret" not in repr(book)


@pytest.mark.parametrize(("shape", "expected"), [
    ("ok", "success"), ("error", "error"), ("malformed", "malformed"), ("http500", "error"),
    ("oversized", "malformed"),
])
async def test_every_shape_parses_to_its_outcome(
    nursery: trio.Nursery, shape: str, expected: str
) -> None:
    port, _ = await start(nursery, MockOptions(api_key="k"))
    await generate(port, "k")
    assert await outcome(port, "k", x_mock_quota_shape=shape) == expected  # per request
    assert await outcome(port, "k") == "success"
    reply = await control(port, {"shape": shape}, "k")  # the account's, for a poller
    assert (reply.status, reply.json()["shape"]) == (200, shape)
    assert await outcome(port, "k") == expected
    assert await outcome(port, "k") == expected
    assert await outcome(port, "k", x_mock_quota_shape="ok") == "success"  # the header wins
    await control(port, {"shape": "ok"}, "k")
    assert await outcome(port, "k") == "success"


async def test_shape_bodies(nursery: trio.Nursery) -> None:
    port, _ = await start(nursery)
    reply = await poll(port, x_mock_quota_shape="error")
    assert reply.status == 200
    assert reply.body == b'{"code":500,"msg":"internal error","success":false}'
    reply = await poll(port, x_mock_quota_shape="malformed")
    assert (reply.status, reply.body) == (200, b'{"code":200,"success":true,"data":{}}')
    reply = await poll(port, x_mock_quota_shape="http500")
    assert (reply.status, reply.header(b"content-type")) == (500, b"text/plain; charset=utf-8")
    reply = await poll(port, x_mock_quota_shape="oversized")
    assert reply.status == 200
    assert len(reply.body) > parser.MAX_BODY
    assert orjson.loads(reply.body)["data"]["level"] == "pro"  # valid JSON, just too long
    reply = await poll(port, x_mock_quota_shape="sideways")
    assert reply.status == 400
    assert reply.json()["success"] is False


async def test_slow_shape_answers_after_ten_seconds(
    nursery: trio.Nursery, mock_clock: trio.testing.MockClock
) -> None:
    port, _ = await start(nursery)
    await control(port, {"shape": "slow"})
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    received = bytearray()

    async def read() -> None:
        while data := await stream.receive_some(65536):
            received.extend(data)

    async with stream, trio.open_nursery() as inner:
        inner.start_soon(read)
        await stream.send_all(b"GET " + QUOTA.encode() + b" HTTP/1.1\r\nhost: m\r\n"
                              b"connection: close\r\n\r\n")
        await trio.testing.wait_all_tasks_blocked()
        mock_clock.jump(9.9)
        await trio.testing.wait_all_tasks_blocked()
        assert received == b""
        mock_clock.jump(0.2)
    head, body = bytes(received).split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 200 ")
    assert parser.parse_quota(200, body).plan_tier == "pro"


async def test_control_route(nursery: trio.Nursery) -> None:
    clock = Clock()
    port, _ = await start(nursery, clock=clock)
    reply = await control(port, {"level": "max", "five_hour_allowance": 1000,
                                 "used": {"five_hour": 250, "weekly": 40_000_000}}, "key-a")
    assert reply.status == 200
    assert reply.json() == {
        "account": account_id("key-a"), "level": "max", "shape": "ok", "polls": 0,
        "requests": 0, "tokens": 0,
        "five_hour": {"allowance": 1000, "used": 250, "percentage": 25,
                      "reset_at_ms": int((T0 + 5 * HOUR) * 1000)},
        "weekly": {"allowance": 40_000_000, "used": 40_000_000, "percentage": 100,
                   "reset_at_ms": int((T0 + 7 * 24 * HOUR) * 1000)},
    }
    sample = await parsed(port, "key-a")
    assert sample.plan_tier == "max"
    assert [(w.window, w.used_fraction) for w in sample.windows] == [
        ("five_hour", 0.25), ("weekly", 1.0)]
    reset = int(T0 * 1000) + 60_000
    await control(port, {"reset_at_ms": {"five_hour": reset}}, "Bearer key-a")
    five = (await parsed(port, "key-a")).window("five_hour")
    assert five is not None and five.reset_at == reset / 1000
    # GET shows every account, as the stats route's section does.
    shown = await request(port, "GET", "/mock/quota")
    assert shown.json() == await quota_state(port)
    for body, message in ((b'{"used":{"five_hour":-1}}', "used.five_hour"),
                          (b'{"nope":1}', "unknown field")):
        reply = await request(port, "POST", "/mock/quota", [], body)
        assert reply.status == 400
        assert message in reply.json()["error"]["message"]
    reply = await request(port, "DELETE", "/mock/quota")
    assert (reply.status, reply.header(b"allow")) == (405, b"GET, HEAD, POST")
    reply = await control(port, {"reset": True}, "key-a")
    assert (reply.json()["level"], reply.json()["five_hour"]["used"]) == ("pro", 0)
    # Resetting the request statistics leaves the quota alone.
    before = await quota_state(port)
    await request(port, "POST", "/mock/stats/reset")
    assert await quota_state(port) == before


# --- more than one worker process ---------------------------------------------------------------


async def test_usage_is_shared_by_the_worker_processes(tmp_path: Path) -> None:
    server = await trio.to_thread.run_sync(functools.partial(
        start_process,
        ["mock-upstream", "--port", "0", "--workers", "2", "--chunks", "3",
         "--quota-five-hour", "1000", "--quota-weekly", "5000", "--quota-level", "max"],
        env=None, stderr_path=tmp_path / "mock.log"))
    try:
        n = 24
        for _ in range(n):  # each on a new connection: the kernel spreads them over the workers
            assert (await generate(server.port)).status == 200
        per_worker, totals = set(), set()
        for _ in range(12):
            stats = (await request(server.port, "GET", "/mock/stats")).json()
            per_worker.add(stats["requests"])
            totals.add(stats["quota"]["accounts"]["shared"]["tokens"])
        assert totals == {n * cost(CHAT_BODY, 3)}  # every worker sees every token
        assert min(per_worker) < n  # ...though each served only part of them
        # A change sent to one worker is what every worker answers.
        await control(server.port, {"shape": "malformed"})
        assert [await outcome(server.port) for _ in range(8)] == ["malformed"] * 8
        await control(server.port, {"shape": "ok"})
        sample = await parsed(server.port)
        used = n * cost(CHAT_BODY, 3)
        assert sample.plan_tier == "max"
        assert [(w.window, w.used_fraction) for w in sample.windows] == [
            ("five_hour", ((used * 200 + 1000) // 2000) / 100),
            ("weekly", ((used * 200 + 5000) // 10_000) / 100)]
        state = (await request(server.port, "GET", "/mock/quota")).json()
        assert state["polls"] == 8 + 1
        assert state["accounts"]["shared"]["weekly"]["used"] == used
    finally:
        assert server.stop() == 0
    assert "Traceback" not in server.logs()


def test_bad_quota_flags_are_refused_by_name() -> None:
    for flag, value, message in (("--quota-five-hour", "0", "quota_five_hour must be in [1, "),
                                 ("--quota-level", "pro plan", "quota_level must be 1 to 24")):
        out = subprocess.run([sys.executable, "-m", "zaiproxy", "mock-upstream", "--port", "0",
                              flag, value], capture_output=True, text=True, timeout=60)
        assert out.returncode == 2
        assert out.stderr.startswith(f"zaiproxy mock-upstream: {message}"), out.stderr
