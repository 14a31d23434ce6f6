"""Every request of a client key is counted by outcome (``/admin/keys`` ``usage``).

A key that sent 3,252 requests must not show 678 because only the charged ones were counted:
``requests`` is everything the key sent, split into ``ok``, ``proxy_429`` (refused by the
proxy's limits), ``zai_429`` (Z.AI's, relayed), ``other_4xx`` and ``5xx``. These tests make
every outcome happen for real (the mock upstream's controls, a tiny per-key limit, a client
that leaves) and check the counts against what the clients saw, request by request:

- the classification and the names (the failure kinds of ``/admin/status``);
- the host's ledger rows, added by two handles of one segment as two workers do;
- the fleet's Redis hash through :class:`~zaiproxy.limits.fleet.FleetLimiter` and its script
  (which refuses a counter field it does not know);
- an in-process proxy, both backends, one request of each kind, exact numbers;
- real ``zaiproxy serve`` processes (two workers; with Redis, two proxies of two workers) and
  the official openai and anthropic SDKs as clients.
"""

from __future__ import annotations

import functools
import os
import re
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anthropic
import coredis
import openai
import orjson
import pytest
import trio

from tests.harness import (
    UPSTREAM_KEY,
    ProcessServer,
    RawClient,
    Response,
    make_config,
    start_mock,
    start_process,
    start_proxy,
)
from tests.harness import request as http_request
from tests.redis_server import RedisServer
from zaiproxy.core.limitspec import Limits
from zaiproxy.core.record import Usage
from zaiproxy.fleet.fleet_keys import merge_keys
from zaiproxy.limits import ledger as ledger_choice
from zaiproxy.limits.admission import Admitter
from zaiproxy.limits.fleet import (
    _COUNTER_FIELDS,
    COUNTERS,
    SCRIPT,
    FleetKeys,
    FleetLimiter,
    _Entry,
    encode_settles,
)
from zaiproxy.limits.key_usage import (
    OK,
    OTHER_4XX,
    OUTCOMES,
    PROXY_429,
    SERVER_ERROR,
    TOKEN_FIELDS,
    ZAI_429,
    KeyUsage,
    outcome_of,
)
from zaiproxy.observe.snapshot import FAILURE_KINDS

JSON = ("content-type", "application/json")
STATE_TIMEOUT = 20.0
POLL_S = 0.02


def chat(model: str = "glm-4.6") -> bytes:
    return orjson.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}]})


def client_outcome(status: int, headers: Callable[[str], str | None]) -> str:
    """What a client saw, named as ``/admin/keys`` names it: the proxy's own 429 says which
    of its limits refused (``x-zaiproxy-limit``), a relayed Z.AI 429 does not."""
    if status < 400:
        return "ok"
    if status == 429:
        return "proxy_429" if headers("x-zaiproxy-limit") is not None else "zai_429"
    return "other_4xx" if status < 500 else "5xx"


def by_outcome(usage: dict[str, Any]) -> dict[str, int]:
    return {name: usage[name] for name in OUTCOMES if usage[name]}


# ---- the classification ------------------------------------------------------------------------

@pytest.mark.parametrize(("status", "upstream_status", "outcome"), [
    (200, 200, OK),
    (200, None, OK),  # count_tokens answered by the proxy itself
    (429, None, PROXY_429),  # refused by a limit: nothing relayed
    (429, 429, ZAI_429),  # Z.AI's, relayed after the retries
    (400, 400, OTHER_4XX),
    (401, 401, OTHER_4XX),  # upstream refused the proxy's key: relayed
    (499, None, OTHER_4XX),  # the client left first
    (499, 200, OTHER_4XX),  # ... in the middle of the body
    (413, None, OTHER_4XX),  # the proxy's own 4xx
    (500, 500, SERVER_ERROR),
    (502, None, SERVER_ERROR),  # upstream unreachable
    (503, None, SERVER_ERROR),  # the fleet's limits away, limits_fail = "closed"
    (0, None, SERVER_ERROR),  # no answer at all
])
def test_outcome_of_each_answer(status: int, upstream_status: int | None, outcome: int) -> None:
    assert outcome_of(status, upstream_status) == outcome


def test_the_outcomes_are_ok_and_the_failure_kinds_of_admin_status() -> None:
    assert OUTCOMES[0] == "ok"
    assert sorted(OUTCOMES[1:]) == sorted(FAILURE_KINDS)


def test_the_script_and_the_limiter_number_the_usage_fields_alike() -> None:
    """fleet.lua's COUNTER_FIELDS and fleet.py's _COUNTER_FIELDS: one list, field i of one is
    field i of the other (a shift would count 5xx as zai_429 on every pod)."""
    found = re.search(r"local COUNTER_FIELDS = \{([^}]*)\}", SCRIPT)
    assert found is not None
    assert tuple(re.findall(r"'([^']*)'", found[1])) == _COUNTER_FIELDS
    assert _COUNTER_FIELDS[len(TOKEN_FIELDS):] == OUTCOMES


# ---- the host's ledger ---------------------------------------------------------------------------

@contextmanager
def two_handles(impl_name: str) -> Iterator[tuple[Any, Any]]:
    """Two handles of one segment: what two worker processes map."""
    impl = ledger_choice.load(impl_name)
    path = f"/dev/shm/zaiproxy-test-outcomes-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    first = impl.Ledger(path, create=True, rows=64, windows=8, workers=2)
    try:
        yield first, impl.Ledger(path, create=False)
    finally:
        first.unlink()


@pytest.mark.parametrize("impl_name", ["native", "python"])
def test_ledger_rows_sum_every_worker_per_key(impl_name: str) -> None:
    with two_handles(impl_name) as segments:
        check_ledger_rows(*(KeyUsage(segment) for segment in segments))


def check_ledger_rows(a: KeyUsage, b: KeyUsage) -> None:
    for outcome, times in ((OK, 5), (PROXY_429, 4), (ZAI_429, 1), (OTHER_4XX, 2),
                           (SERVER_ERROR, 3)):
        for i in range(times):
            (a if i % 2 else b).count("alice", outcome)
    b.count("bob", OK)
    a.add("alice", Usage(100, 20, cache_read_tokens=7))
    b.add("alice", Usage(50, 10))
    for reader in (a, b):
        assert reader.totals("alice") == {
            "requests": 15, "ok": 5, "proxy_429": 4, "zai_429": 1, "other_4xx": 2, "5xx": 3,
            "charged_requests": 2, "input_tokens": 150, "output_tokens": 30,
            "cache_read_tokens": 7, "cache_write_tokens": 0}
        assert by_outcome(reader.totals("bob")) == {"ok": 1}
        assert reader.totals("carol")["requests"] == 0


# ---- the fleet's hash in Redis -------------------------------------------------------------------

def fleet_limiter(redis: RedisServer, prefix: str, segment: Any, impl: Any) -> FleetLimiter:
    local = Admitter(segment, impl, worker=0, global_limits=Limits(), upstream_limits=Limits(),
                     upstream_id=b"upstream\0x", adaptive=False)
    return FleetLimiter(client=coredis.Redis.from_url(redis.url, decode_responses=False),
                        local=local, keys=FleetKeys(prefix, "up0"), segment=segment,
                        global_limits=Limits(), upstream_limits=Limits(), adaptive=False,
                        worker=0, lease_ttl_s=15.0, command_timeout_s=2.0, fail="closed",
                        share=1.0)


async def test_fleet_counts_outcomes_beside_the_token_totals(redis_server: RedisServer) -> None:
    impl = ledger_choice.load("native")
    prefix = "t" + uuid.uuid4().hex[:12]
    with two_handles("native") as segments:
        first = fleet_limiter(redis_server, prefix, segments[0], impl)
        second = fleet_limiter(redis_server, prefix, segments[1], impl)  # another worker
        await check_fleet_counts(first, second)


async def check_fleet_counts(first: FleetLimiter, second: FleetLimiter) -> None:
    async with trio.open_nursery() as nursery:
        await nursery.start(first.run)
        await nursery.start(second.run)
        for i in range(7):
            (first if i % 2 else second).count_outcome("alice", OK)
        for outcome in (PROXY_429, PROXY_429, ZAI_429, OTHER_4XX, SERVER_ERROR):
            second.count_outcome("alice", outcome)
        first.count_outcome("bob", SERVER_ERROR)
        # Nothing is made per request: each count of one outcome queues the same entry.
        assert len(second._pending) == 9 and len({id(e) for e in second._pending}) == 5
        first.add_usage("alice", Usage(30, 5, cache_write_tokens=2))
        # Sent by each worker's flusher (or this flush), one call per batch.
        await first.flush()
        await second.flush()
        with trio.fail_after(STATE_TIMEOUT):
            while True:
                alice, bob, carol = await first.usage_totals(["alice", "bob", "carol"])
                if alice["requests"] >= 12 and alice["charged_requests"] and bob["requests"]:
                    break
                await trio.sleep(POLL_S)
        assert alice == {"requests": 12, "ok": 7, "proxy_429": 2, "zai_429": 1, "other_4xx": 1,
                         "5xx": 1, "charged_requests": 1, "input_tokens": 30,
                         "output_tokens": 5, "cache_read_tokens": 0, "cache_write_tokens": 2}
        assert by_outcome(bob) == {"5xx": 1} and bob["requests"] == 1
        assert carol["requests"] == 0
        assert await second.usage_totals(["alice"]) == [alice]  # fleet-wide: one hash
        nursery.cancel_scope.cancel()


async def test_the_script_refuses_a_counter_field_it_does_not_know(
        redis_server: RedisServer) -> None:
    """A field number past the list is a caller's bug: the call fails (naming it) instead of
    writing a field nobody reads or an error deep in HINCRBY."""
    client = coredis.Redis.from_url(redis_server.url, decode_responses=False)
    async with client:
        script = client.register_script(SCRIPT)
        key = "{t" + uuid.uuid4().hex[:12] + "}:usage:alice"
        for field, ok in ((len(_COUNTER_FIELDS), True), (len(_COUNTER_FIELDS) + 1, False),
                          (0, False)):
            keys: list[str] = []
            args = ["settle", "", *encode_settles([_Entry("", [(key, COUNTERS, field, 0, 1, 0)])],
                                                  keys)]
            if ok:
                assert await script(keys=keys, args=args) == 1
            else:
                with pytest.raises(Exception, match=f"no counter field {field}"):
                    await script(keys=keys, args=args)
        assert await client.hgetall(key) == {b"5xx": b"1"}


# ---- an in-process proxy: one request of each kind -----------------------------------------------

KEYS_FILE = ('[[keys]]\nalias = "alice"\nkey = "zp-alice-0001"\n[keys.limits]\n'
             'requests_per_minute = 6\n\n'
             '[[keys]]\nalias = "bob"\nkey = "zp-bob-0002"\nmodels = ["glm-4.6"]\n\n'
             '[[keys]]\nalias = "carol"\nkey = "zp-carol-0003"\nenabled = false\n')


async def keys_usage(port: int) -> dict[str, dict[str, Any]]:
    report = (await http_request(port, "GET", "/admin/keys")).json()
    return {k["alias"]: k["usage"] for k in report["keys"]}


async def wait_for_requests(port: int, expected: dict[str, int]) -> dict[str, dict[str, Any]]:
    """``/admin/keys`` once every alias shows ``expected`` requests (the last record is emitted
    after the answer's last byte; the fleet's counts are flushed just after)."""
    with trio.fail_after(STATE_TIMEOUT):
        while True:
            usage = await keys_usage(port)
            if all(usage[alias]["requests"] >= n for alias, n in expected.items()):
                return usage
            await trio.sleep(POLL_S)


def outcome_of_response(resp: Response) -> str:
    def header(name: str) -> str | None:
        value = resp.header(name.encode())
        return value.decode() if value is not None else None

    return client_outcome(resp.status, header)


@pytest.mark.parametrize("backend", ["host", "redis"])
async def test_an_in_process_proxy_counts_each_outcome_once(
        nursery: trio.Nursery, tmp_path: Path, backend: str,
        request: pytest.FixtureRequest) -> None:
    upstream = await start_mock(nursery)
    keys = tmp_path / "keys.toml"
    keys.write_text(KEYS_FILE)
    settings: dict[str, Any] = {"keys_file": str(keys), "adaptive_rate": False}
    if backend == "redis":
        redis: RedisServer = request.getfixturevalue("redis_server")
        settings.update(limits_backend="redis", redis_url=redis.url,
                        redis_key_prefix="t" + uuid.uuid4().hex[:12],
                        redis_command_timeout=2.0, redis_connect_timeout=2.0)
    proxy = await start_proxy(nursery, make_config(upstream, **settings))
    seen: dict[str, Counter[str]] = {"alice": Counter(), "bob": Counter()}
    messages = orjson.dumps({"model": "glm-4.6", "max_tokens": 16,
                             "messages": [{"role": "user", "content": "hi"}]})

    async def send(alias: str, body: bytes, *extra: tuple[str, str]) -> str:
        if alias == "alice":
            target = "/v1/chat/completions"
            headers = [JSON, ("authorization", "Bearer zp-alice-0001")]
        else:
            target, headers = "/v1/messages", [JSON, ("x-api-key", "zp-bob-0002")]
        outcome = outcome_of_response(await http_request(proxy.port, "POST", target,
                                                    [*headers, *extra], body))
        seen[alias][outcome] += 1
        return outcome

    # alice may send 6 a minute: four answers of every kind ...
    assert await send("alice", chat()) == "ok"
    assert await send("alice", chat(), ("x-mock-status", "503")) == "5xx"
    assert await send("alice", chat(), ("x-mock-status", "400")) == "other_4xx"
    assert await send("alice", chat("mock-zai-1308")) == "zai_429"  # quota: never retried
    # ... a client that leaves while upstream thinks (499) ...
    gone = await RawClient.connect("127.0.0.1", proxy.port)
    body = chat()
    await gone.stream.send_all(
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: proxy.test\r\n"
        b"content-type: application/json\r\nauthorization: Bearer zp-alice-0001\r\n"
        b"x-mock-first-byte-delay: 30\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))

    async def upstream_in_flight() -> int:
        return int((await http_request(upstream, "GET", "/mock/stats")).json()["in_flight"])

    with trio.fail_after(STATE_TIMEOUT):  # upstream holds it: the proxy is waiting
        while await upstream_in_flight() < 1:  # noqa: ASYNC110 - another server's state
            await trio.sleep(POLL_S)
    await gone.aclose()
    seen["alice"]["other_4xx"] += 1
    # ... the sixth is throttled by Z.AI and its retry refused by alice's limit: the proxy's
    # 429, though upstream was asked; then the limit refuses at once.
    assert await send("alice", chat("mock-zai-1302")) == "proxy_429"
    assert await send("alice", chat()) == "proxy_429"
    # bob: no limits, the Anthropic route.
    assert await send("bob", messages) == "ok"
    assert await send("bob", messages, ("x-mock-status", "529")) == "5xx"
    # Refused before any limit, the key known: a model it may not use (403), a body that is
    # not JSON (400). Counted for bob all the same: every request a key sends is in its row.
    assert await send("bob", messages.replace(b"glm-4.6", b"glm-4.5")) == "other_4xx"
    assert await send("bob", b"{not json") == "other_4xx"
    # A disabled key's requests are its own too (401).
    carol = await http_request(proxy.port, "POST", "/v1/chat/completions",
                               [JSON, ("authorization", "Bearer zp-carol-0003")], chat())
    assert carol.status == 401
    # Nobody's: no key known, nothing counted.
    nobody = await http_request(proxy.port, "POST", "/v1/chat/completions",
                           [JSON, ("authorization", "Bearer zp-nobody")], chat())
    assert nobody.status == 401

    usage = await wait_for_requests(proxy.port, {"alice": 7, "bob": 4, "carol": 1})
    assert by_outcome(usage["alice"]) == {"ok": 1, "proxy_429": 2, "zai_429": 1,
                                          "other_4xx": 2, "5xx": 1} == dict(seen["alice"])
    assert by_outcome(usage["bob"]) == {"ok": 1, "5xx": 1, "other_4xx": 2} == dict(seen["bob"])
    assert by_outcome(usage["carol"]) == {"other_4xx": 1}
    assert (usage["alice"]["requests"], usage["bob"]["requests"]) == (7, 4)
    # The token totals are what they were: the one answered request of each key was charged.
    assert usage["alice"]["charged_requests"] == 1 and usage["alice"]["input_tokens"] > 0
    assert usage["bob"]["charged_requests"] == 1
    await trio.sleep(0.1)  # and nothing is counted late or twice (the fleet flushes in ms)
    assert await keys_usage(proxy.port) == usage


# ---- real processes and the official SDKs --------------------------------------------------------

ALICE_KEY, BOB_KEY = "zp-alice-sdk-0001", "zp-bob-sdk-0002"
PROCESS_KEYS = (f'[[keys]]\nalias = "alice"\nkey = "{ALICE_KEY}"\n[keys.limits]\n'
                'requests_per_minute = 10\n\n'
                f'[[keys]]\nalias = "bob"\nkey = "{BOB_KEY}"\n')
# What each request asks the mock for: an answer, a 503, a 400, Z.AI's spent quota (a 429
# that is relayed, never retried).
MODELS = ("glm-4.6", "mock-status-503", "mock-status-400", "mock-zai-1308")


def sdk_call(base_url: str, key: str, api: str, model: str) -> str:
    """One request by a fresh SDK client (its own connection: the kernel picks the worker);
    what it saw."""
    try:
        if api == "openai":
            with openai.OpenAI(base_url=f"{base_url}/v1", api_key=key, max_retries=0) as oai:
                oai.chat.completions.create(model=model,
                                            messages=[{"role": "user", "content": "hi"}])
        else:
            with anthropic.Anthropic(base_url=base_url, api_key=key, max_retries=0) as claude:
                claude.messages.create(model=model, max_tokens=16,
                                       messages=[{"role": "user", "content": "hi"}])
    except (openai.APIStatusError, anthropic.APIStatusError) as exc:
        return client_outcome(exc.status_code, exc.response.headers.get)
    return "ok"


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("ZAIPROXY_HTTP_IMPL") == "h11-mypyc",
                    reason="counting does not depend on the HTTP parser: run once, with h11")
@pytest.mark.parametrize("backend", ["host", "redis"])
async def test_sdk_clients_and_the_keys_report_agree_on_every_outcome(
        mock: ProcessServer, tmp_path: Path, backend: str,
        request: pytest.FixtureRequest) -> None:
    keys = tmp_path / "keys.toml"
    keys.write_text(PROCESS_KEYS)
    env = {"ZAI_API_KEY": UPSTREAM_KEY,
           "ZAIPROXY_OPENAI_BASE_URL": f"{mock.url}/api/paas/v4",
           "ZAIPROXY_ANTHROPIC_BASE_URL": f"{mock.url}/api/anthropic",
           "ZAIPROXY_NATIVE_BASE_URL": mock.url, "ZAIPROXY_WORKERS": "2",
           "ZAIPROXY_KEYS_FILE": str(keys), "ZAIPROXY_ADAPTIVE_RATE": "false",
           "ZAIPROXY_DRAIN_TIMEOUT": "5"}
    proxies = 1
    if backend == "redis":
        redis: RedisServer = request.getfixturevalue("redis_server")
        env.update(ZAIPROXY_LIMITS_BACKEND="redis", ZAIPROXY_REDIS_URL=redis.url,
                   ZAIPROXY_REDIS_KEY_PREFIX="t" + uuid.uuid4().hex[:12],
                   ZAIPROXY_REDIS_COMMAND_TIMEOUT="2", ZAIPROXY_REDIS_CONNECT_TIMEOUT="2")
        proxies = 2  # two pods of two workers: one budget, one count
    started: list[ProcessServer] = []
    try:
        for i in range(proxies):
            started.append(await trio.to_thread.run_sync(functools.partial(
                start_process, ["serve", "--port", "0"], env=env,
                stderr_path=tmp_path / f"proxy-{i}.log")))
        # Round one asks for every kind of answer, one at a time: 8 of alice's 10 a minute,
        # so each kind is answered whatever the order of the burst after it; the burst (six
        # rounds for alice, two for bob, 8 at once) is mostly refused for alice.
        one_round = [(api, model) for model in MODELS for api in ("openai", "anthropic")]
        seen: dict[str, Counter[str]] = {ALICE_KEY: Counter(), BOB_KEY: Counter()}
        sent: Counter[str] = Counter()
        gate = trio.CapacityLimiter(8)

        async def one(key: str, api: str, model: str) -> None:
            url = started[sent[key] % proxies].url  # alternate the pods
            sent[key] += 1
            outcome = await trio.to_thread.run_sync(sdk_call, url, key, api, model,
                                                    limiter=gate)
            seen[key][outcome] += 1

        for api, model in one_round:
            await one(ALICE_KEY, api, model)
        async with trio.open_nursery() as nursery:
            for key, rounds in ((ALICE_KEY, 6), (BOB_KEY, 2)):
                for _ in range(rounds):
                    for api, model in one_round:
                        nursery.start_soon(one, key, api, model)
        expected = {"alice": sent[ALICE_KEY], "bob": sent[BOB_KEY]}
        reports = []
        for proxy in started:
            usage = await wait_for_requests(proxy.port, expected)
            for alias, key in (("alice", ALICE_KEY), ("bob", BOB_KEY)):
                assert by_outcome(usage[alias]) == dict(seen[key]), (alias, usage[alias])
                assert usage[alias]["requests"] == sent[key]
            reports.append((await http_request(proxy.port, "GET", "/admin/keys")).json())
        # Every kind happened to alice (round one is built for it), none refused bob.
        assert set(seen[ALICE_KEY]) == set(OUTCOMES)
        assert seen[BOB_KEY]["proxy_429"] == 0
        # A collector over these proxies shows the same numbers (counted once for a fleet).
        merged = {k["alias"]: k["usage"] for k in merge_keys(reports)[0]}
        assert by_outcome(merged["alice"]) == dict(seen[ALICE_KEY])
    finally:
        codes = [p.stop() for p in started]
    assert codes == [0] * len(started), [p.logs()[-2000:] for p in started]
