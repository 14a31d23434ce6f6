"""A pool of upstream keys (limits/upstream_keys.py, limits/upstream_pool.py): the file, the
choice of key, and real proxies moving traffic between two mock accounts.

The mock runs without a key of its own, so every key is its own account (its quota, its
``/mock/quota`` state); ``x-mock-quota-enforce: 1`` makes it answer 1308 once an account's
window is spent, as Z.AI does.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import orjson
import pytest
import trio

from tests.harness import ProcessServer, request, start_process
from zaiproxy.core.config import Config, ConfigError, load_config
from zaiproxy.core.limitspec import Limits
from zaiproxy.limits import ledger as ledger_mod
from zaiproxy.limits.upstream_keys import UpstreamKeysError, load_upstream_keys, pool_of
from zaiproxy.limits.upstream_pool import KeyPool
from zaiproxy.limits.zai_quota import QuotaBoard
from zaiproxy.run.worker import open_ledger
from zaiproxy.upstream.quota import QuotaSample, QuotaWindow

pytestmark = pytest.mark.skipif(os.environ.get("ZAIPROXY_HTTP_IMPL") == "h11-mypyc",
                                reason="the pool does not depend on the HTTP parser")

KEY_A = "zai-key-account-a-0123456789"
KEY_B = "zai-key-account-b-9876543210"
POOL = f'''
selection = "order"
cooldown = 5

[[upstream]]
alias = "acct-a"
key = "{KEY_A}"

[[upstream]]
alias = "acct-b"
key_env = "TEST_ZAI_KEY_B"
[upstream.limits]
requests_per_minute = 600

[pin]
ci = "acct-a"
'''


def write(tmp_path: Path, text: str, name: str = "upstream.toml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


# ---- the file ---------------------------------------------------------------------------------

def test_the_file_gives_each_key_its_alias_limits_and_pins(tmp_path: Path) -> None:
    spec = load_upstream_keys(write(tmp_path, POOL), {"TEST_ZAI_KEY_B": KEY_B})
    assert spec.aliases == ("acct-a", "acct-b")
    assert [k.key for k in spec.keys] == [KEY_A, KEY_B]
    assert spec.keys[1].limits.requests_per_minute == 600
    assert (spec.selection, spec.cooldown_s, dict(spec.pins)) == ("order", 5.0, {"ci": "acct-a"})
    assert KEY_A not in repr(spec) and KEY_B not in repr(spec)
    # limits.upstream_* are every key's defaults; a key's own limit wins.
    config = dataclasses.replace(Config(), upstream_keys_file=write(tmp_path, POOL),
                                 upstream_tokens_per_5h=1000, upstream_requests_per_minute=60)
    merged = pool_of(config, {"TEST_ZAI_KEY_B": KEY_B})
    assert merged.keys[0].limits == Limits(requests_per_minute=60, tokens_per_5h=1000)
    assert merged.keys[1].limits == Limits(requests_per_minute=600, tokens_per_5h=1000)


@pytest.mark.parametrize(("text", "expected"), [
    ('[[upstream]]\nalias = "a"\n', "needs exactly one of key, key_env, key_file"),
    (f'[[upstream]]\nalias = "a"\nkey = "{KEY_A}"\n[[upstream]]\nalias = "a"\nkey = "x-other"\n',
     "duplicate alias"),
    (f'[[upstream]]\nalias = "a"\nkey = "{KEY_A}"\n[[upstream]]\nalias = "b"\nkey = "{KEY_A}"\n',
     "same key as a"),
    (f'[[upstream]]\nalias = "a"\nkey = "{KEY_A}"\nkee = 1\n', "did you mean key?"),
    (f'selection = "random"\n[[upstream]]\nalias = "a"\nkey = "{KEY_A}"\n',
     "selection: must be one of headroom, order"),
    (f'[[upstream]]\nalias = "a"\nkey = "{KEY_A}"\n[pin]\nci = "nobody"\n',
     "pin.ci: must name an [[upstream]] alias"),
    ('[[upstream]]\nalias = "a"\nkey_env = "TEST_UNSET_VARIABLE"\n', "the variable is not set"),
    (f'[[upstream]]\nalias = "a"\nkey = "{KEY_A} x"\n', "printable ASCII without spaces"),
    ("upstream = []\n", "add one [[upstream]] table"),
])
def test_a_bad_file_is_refused_without_showing_a_key(tmp_path: Path, text: str,
                                                     expected: str) -> None:
    with pytest.raises(UpstreamKeysError) as refused:
        load_upstream_keys(write(tmp_path, text), {})
    message = str(refused.value)
    assert expected in message
    assert KEY_A not in message


def test_config_needs_no_zai_api_key_with_a_pool_but_refuses_redis(tmp_path: Path) -> None:
    path = write(tmp_path, POOL)
    config, _ = load_config(env={"ZAIPROXY_UPSTREAM_KEYS_FILE": path})
    assert config.api_key is None and config.upstream_keys_file == path
    with pytest.raises(ConfigError, match="works with limits_backend"):
        load_config(env={"ZAIPROXY_UPSTREAM_KEYS_FILE": path, "ZAIPROXY_LIMITS_BACKEND": "redis",
                         "ZAIPROXY_REDIS_URL": "redis://127.0.0.1:1/0"})


# ---- choosing a key ---------------------------------------------------------------------------

@pytest.fixture
def segment() -> Iterator[Any]:
    config = Config(api_key="k", workers=1)
    seg = open_ledger(ledger_mod.load(config.ledger), config, None)
    yield seg
    seg.close()


def three_keys(tmp_path: Path, selection: str) -> Any:
    keys = "".join(f'[[upstream]]\nalias = "k{i}"\nkey = "key-{i}-abcdef"\n' for i in range(3))
    return load_upstream_keys(write(tmp_path, f'selection = "{selection}"\n{keys}'
                                    '[pin]\nci = "k2"\n'), {})


def test_order_skips_resting_keys_and_pins_stay_pinned(segment: Any, tmp_path: Path) -> None:
    now = [1_800_000_000.0]
    pool = KeyPool(three_keys(tmp_path, "order"), segment, polled=False, wall=lambda: now[0])
    assert list(pool.candidates(None)) == [0, 1, 2]
    pool.rest(0, now[0] + 30, "throttled")
    pool.rest(1, now[0] + 10, "quota")
    # The free one first, then the resting ones, the soonest free first.
    assert list(pool.candidates(None)) == [2, 1, 0]
    assert list(pool.candidates("ci")) == [2]
    pool.rest(2, now[0] + 5, "quota")
    assert list(pool.candidates("ci")) == [2]  # pinned: never another account
    now[0] += 11
    assert list(pool.candidates(None)) == [1, 2, 0]
    report = {r["alias"]: r for r in pool.report()}
    assert report["k0"]["resting"] and report["k0"]["rest_reason"] == "throttled"
    assert not report["k1"]["resting"] and report["k2"]["pinned_clients"] == ["ci"]
    # A shorter rest never cuts a longer one short.
    pool.rest(0, now[0] + 1, "quota")
    assert pool.resting_until_ms(0) == round((now[0] - 11 + 30) * 1000)


def test_headroom_prefers_the_key_with_most_quota_left(segment: Any, tmp_path: Path) -> None:
    spec = three_keys(tmp_path, "headroom")
    t = 1_800_000_000.0
    for alias, used in (("k0", 0.8), ("k1", 0.1), ("k2", 0.5)):
        QuotaBoard(segment, alias).record("success", t, QuotaSample(
            "pro", (QuotaWindow("five_hour", "TOKENS_LIMIT", used, t + 3600),)))
    pool = KeyPool(spec, segment, polled=True, wall=lambda: t)
    assert list(pool.candidates(None)) == [1, 2, 0]
    # The key's own windows count too: k1's local window is at 90 %.
    local = KeyPool(spec, segment, polled=True, wall=lambda: t,
                    local_used=lambda i: 0.9 if i == 1 else 0.0)
    assert list(local.candidates(None)) == [2, 0, 1]


def test_equal_headroom_goes_round_robin(segment: Any, tmp_path: Path) -> None:
    pool = KeyPool(three_keys(tmp_path, "headroom"), segment, polled=False)
    firsts = [pool.candidates(None)[0] for _ in range(6)]
    assert sorted(firsts) == [0, 0, 1, 1, 2, 2]


# ---- real proxies, two mock accounts -------------------------------------------------------------

@pytest.fixture(scope="module")
def accounts_mock(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProcessServer]:
    """A mock with no key of its own: each key is an account; 5-hour windows of 2,000
    tokens, so tests can spend one."""
    server = start_process(["mock-upstream", "--port", "0", "--quota-five-hour", "2000"],
                           env=None, stderr_path=tmp_path_factory.mktemp("pmock") / "mock.log")
    yield server
    assert server.stop() == 0


async def account(mock: ProcessServer, key: str, **change: Any) -> dict[str, Any]:
    """One account's state (``change``: a ``POST /mock/quota`` for it first)."""
    r = await request(mock.url, "POST", "/mock/quota", [("authorization", key)],
                      orjson.dumps(change))
    assert r.status == 200, r.body
    doc: dict[str, Any] = r.json()
    return doc


async def start_pool(mock: ProcessServer, tmp_path: Path, pool: str,
                     **extra: str) -> ProcessServer:
    env = {"ZAIPROXY_UPSTREAM_KEYS_FILE": write(tmp_path, pool), "TEST_ZAI_KEY_B": KEY_B,
           "ZAIPROXY_OPENAI_BASE_URL": f"{mock.url}/api/paas/v4",
           "ZAIPROXY_ANTHROPIC_BASE_URL": f"{mock.url}/api/anthropic",
           "ZAIPROXY_NATIVE_BASE_URL": mock.url, "ZAIPROXY_WORKERS": "2",
           "ZAIPROXY_TOKEN_COUNTING": "false", "ZAIPROXY_DRAIN_TIMEOUT": "5", **extra}
    return await trio.to_thread.run_sync(functools.partial(
        start_process, ["serve", "--port", "0"], env=env, stderr_path=tmp_path / "proxy.log"))


def client(proxy: ProcessServer, key: str = "client", **headers: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{proxy.url}/v1", api_key=key, max_retries=0,
                         default_headers={"x-mock-quota-enforce": "1", **headers})


def chat(c: openai.OpenAI) -> Any:
    return c.chat.completions.with_raw_response.create(
        model="glm-4.6", messages=[{"role": "user", "content": "which account?"}])


async def test_a_spent_account_moves_traffic_to_the_other_with_no_error(
        accounts_mock: ProcessServer, tmp_path: Path) -> None:
    reset_at = time.time() + 4000
    a = await account(accounts_mock, KEY_A, reset=True, used={"five_hour": 2000},
                      reset_at_ms={"five_hour": int(reset_at * 1000)})
    b = await account(accounts_mock, KEY_B, reset=True)
    proxy = await start_pool(accounts_mock, tmp_path, POOL)
    try:
        c = client(proxy)
        for _ in range(4):
            raw = await trio.to_thread.run_sync(chat, c)
            assert raw.http_response.status_code == 200
            assert raw.headers["x-zaiproxy-upstream"] == "acct-b"
            assert raw.parse().choices[0].message.content
        a2 = await account(accounts_mock, KEY_A)
        b2 = await account(accounts_mock, KEY_B)
        # acct-a was asked once (its 1308 put it to rest), acct-b served all four.
        assert a2["requests"] - a["requests"] == 0  # a refused request bills nothing
        assert b2["requests"] - b["requests"] == 4
        stats = (await request(accounts_mock.url, "GET", "/mock/stats")).json()
        assert stats["requests"] >= 5
        keys = (await request(proxy.url, "GET", "/admin/keys")).json()
        up = {u["alias"]: u for u in keys["upstreams"]}
        assert up["acct-a"]["resting"] and up["acct-a"]["rest_reason"] == "quota"
        assert abs(up["acct-a"]["resting_until"] - reset_at) < 2
        assert up["acct-a"]["switched_away"] == 1 and not up["acct-b"]["resting"]
        metrics = (await request(proxy.url, "GET", "/metrics")).body.decode()
        assert ('zai_proxy_upstream_switches_total{from_upstream="acct-a",reason="quota",'
                'to_upstream="acct-b",variant="production"} 1.0') in metrics
        served = [line for line in metrics.splitlines()
                  if line.startswith("zai_proxy_upstream_requests_total{")]
        assert any('upstream="acct-b"' in line and 'status_code="200"' in line
                   and line.endswith(" 4.0") for line in served), served
        assert not any('upstream="acct-a"' in line for line in served)
        assert KEY_A not in metrics and KEY_B not in orjson.dumps(keys).decode()
    finally:
        assert proxy.stop() == 0, proxy.logs()[-3000:]
    logs = proxy.logs()
    assert '"event":"upstream_key_switched"' in logs
    assert KEY_A not in logs and KEY_B not in logs


async def test_a_throttled_account_rests_for_the_cooldown(
        accounts_mock: ProcessServer, tmp_path: Path) -> None:
    await account(accounts_mock, KEY_A, reset=True)
    await account(accounts_mock, KEY_B, reset=True)
    proxy = await start_pool(accounts_mock, tmp_path, POOL)
    try:
        # acct-a answers 1302 once (its account's concurrency): the request goes to acct-b.
        c = client(proxy, **{"x-mock-fail-times": "1", "x-mock-zai-code": "1302",
                             "x-mock-fail-key": f"t{time.monotonic_ns()}",
                             "x-mock-retry-after": "none"})
        raw = await trio.to_thread.run_sync(chat, c)
        assert raw.http_response.status_code == 200
        assert raw.headers["x-zaiproxy-upstream"] == "acct-b"
        up = {u["alias"]: u for u in
              (await request(proxy.url, "GET", "/admin/keys")).json()["upstreams"]}
        assert up["acct-a"]["rest_reason"] == "throttled"
        assert 3 < up["acct-a"]["resting_until"] - time.time() <= 5  # the pool's cooldown
    finally:
        assert proxy.stop() == 0, proxy.logs()[-3000:]


async def test_a_pinned_client_stays_pinned_and_gets_its_accounts_answer(
        accounts_mock: ProcessServer, tmp_path: Path) -> None:
    await account(accounts_mock, KEY_A, reset=True, used={"five_hour": 2000},
                  reset_at_ms={"five_hour": int((time.time() + 4000) * 1000)})
    await account(accounts_mock, KEY_B, reset=True)
    keys_file = write(tmp_path, '[[keys]]\nalias = "ci"\nkey = "client-ci"\n'
                                '[[keys]]\nalias = "dev"\nkey = "client-dev"\n', "keys.toml")
    proxy = await start_pool(accounts_mock, tmp_path, POOL, ZAIPROXY_KEYS_FILE=keys_file)
    try:
        with pytest.raises(openai.RateLimitError) as refused:
            await trio.to_thread.run_sync(chat, client(proxy, "client-ci"))
        response = refused.value.response
        assert response.headers["x-zaiproxy-upstream"] == "acct-a"
        assert response.headers["x-zai-error-code"] == "1308"
        raw = await trio.to_thread.run_sync(chat, client(proxy, "client-dev"))
        assert raw.headers["x-zaiproxy-upstream"] == "acct-b"
    finally:
        assert proxy.stop() == 0, proxy.logs()[-3000:]


async def test_headroom_follows_zais_own_numbers(accounts_mock: ProcessServer,
                                                 tmp_path: Path) -> None:
    await account(accounts_mock, KEY_A, reset=True, used={"five_hour": 1600})  # 80 %
    await account(accounts_mock, KEY_B, reset=True, used={"five_hour": 200})  # 10 %
    pool = POOL.replace('selection = "order"', 'selection = "headroom"')
    proxy = await start_pool(accounts_mock, tmp_path, pool, ZAIPROXY_QUOTA_POLL="true",
                             ZAIPROXY_QUOTA_INTERVAL="0.2")
    try:
        async def polled() -> bool:
            q = (await request(proxy.url, "GET", "/admin/keys")).json()["zai_quota"]
            return len(q) == 2 and all(e["windows"] for e in q)

        with trio.fail_after(10):
            while not await polled():  # noqa: ASYNC110 (another process: no event)
                await trio.sleep(0.05)
        seen = set()
        for _ in range(4):
            raw = await trio.to_thread.run_sync(chat, client(proxy))
            seen.add(raw.headers["x-zaiproxy-upstream"])
        assert seen == {"acct-b"}
        metrics = (await request(proxy.url, "GET", "/metrics")).body.decode()
        usage = [line for line in metrics.splitlines()
                 if line.startswith("zai_proxy_quota_usage_ratio{")]
        assert any('upstream="acct-a"' in line and 'window="five_hour"' in line
                   and line.endswith(" 0.8") for line in usage), usage
    finally:
        assert proxy.stop() == 0, proxy.logs()[-3000:]


async def test_a_key_at_its_quota_reserve_is_skipped_and_all_at_it_get_the_429(
        accounts_mock: ProcessServer, tmp_path: Path) -> None:
    reset_ms = int((time.time() + 3000) * 1000)
    await account(accounts_mock, KEY_A, reset=True, used={"five_hour": 1960},
                  reset_at_ms={"five_hour": reset_ms})  # 98 %: past the 5 % reserve
    await account(accounts_mock, KEY_B, reset=True, used={"five_hour": 200},
                  reset_at_ms={"five_hour": reset_ms})
    proxy = await start_pool(accounts_mock, tmp_path, POOL, ZAIPROXY_QUOTA_PACING="true",
                             ZAIPROXY_QUOTA_INTERVAL="0.2")

    async def gates() -> dict[str, bool]:
        q = (await request(proxy.url, "GET", "/admin/keys")).json()["zai_quota"]
        return {e["upstream"]: bool(e["pacing"] and e["pacing"]["reserve_reached"]) for e in q}

    try:
        with trio.fail_after(10):
            while await gates() != {"acct-a": True, "acct-b": False}:  # noqa: ASYNC110
                await trio.sleep(0.05)
        # acct-a is first in order, but its reserve is reached: acct-b serves, no error.
        raw = await trio.to_thread.run_sync(chat, client(proxy))
        assert raw.headers["x-zaiproxy-upstream"] == "acct-b"
        await account(accounts_mock, KEY_B, used={"five_hour": 1990})
        with trio.fail_after(10):
            while await gates() != {"acct-a": True, "acct-b": True}:  # noqa: ASYNC110
                await trio.sleep(0.05)
        with pytest.raises(openai.RateLimitError) as refused:
            await trio.to_thread.run_sync(chat, client(proxy))
        assert "quota reserve reached" in refused.value.message
        assert refused.value.response.headers["x-zaiproxy-limit"] == "upstream:zai_quota_five_hour"
    finally:
        assert proxy.stop() == 0, proxy.logs()[-3000:]
