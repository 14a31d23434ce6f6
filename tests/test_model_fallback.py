"""Model fallback on Z.AI's 1312 (model congestion): ``upstream.model_fallback``.

The configuration (env and TOML forms, every refusal, ``config check``); the body sent to a
fallback model; then end to end against the real mock upstream, whose
``x-mock-congested-models`` header makes it answer 1312 for the models it names and normally
for the others: the in-process proxy with exact numbers (upstream calls counted at the mock,
retry waits by the harness's virtual sleep, the metrics, the access log), and real
``zaiproxy serve`` and ``zaiproxy mock-upstream`` processes with the official openai and
anthropic SDKs as clients.

Expected waits are the default policy's, written out: congestion backs off 2/4/8 s (the
mock's ``retry-after: 1`` is below them), and the exponent counts every retry of the
request, fallbacks included.
"""

from __future__ import annotations

import pickle
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import openai
import orjson
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from tests.harness import (
    UPSTREAM_KEY,
    InProcessProxy,
    ProcessServer,
    Response,
    make_config,
    request,
    start_mock,
    start_process,
    start_proxy,
    upstream_env,
    wait_until,
)
from zaiproxy.core import logs
from zaiproxy.core.config import ConfigError, load_config, render_check
from zaiproxy.core.config_values import ModelFallback, model_fallback
from zaiproxy.mock.controls import ControlError, parse_headers
from zaiproxy.mock.payloads import expected_text
from zaiproxy.request.fallback import body_for

ENV = "ZAIPROXY_MODEL_FALLBACK"
DEMO = {"ZAIPROXY_DEMO": "1"}
CONGESTED = "x-mock-congested-models"
MESSAGES = [{"role": "user", "content": "a prompt that must not reach any log line"}]


def chain(value: str) -> ModelFallback:
    return model_fallback(value, True)


# --- 1. configuration ------------------------------------------------------------------------


def test_the_default_is_no_fallback() -> None:
    config, sources = load_config(env=DEMO)
    assert config.model_fallback == ModelFallback() and not config.model_fallback.routes
    assert sources["upstream.model_fallback"] == "default"
    assert config.model_fallback.lookup("glm-4.6") is None


def test_the_env_form() -> None:
    config, sources = load_config(env={**DEMO, ENV: " glm-4.6=glm-4.5 , glm-4.7=glm-4.6|glm-4.5,"})
    assert config.model_fallback.routes == (("glm-4.6", ("glm-4.5",)),
                                            ("glm-4.7", ("glm-4.6", "glm-4.5")))
    assert sources["upstream.model_fallback"] == f"env:{ENV}"
    # Z.AI compares model names case-insensitively; the configured spelling is kept.
    assert config.model_fallback.lookup("GLM-4.7") == ("glm-4.7", ("glm-4.6", "glm-4.5"))
    # Lists may name each other: a request follows only its own model's list, never a loop.
    mutual, _ = load_config(env={**DEMO, ENV: "glm-4.6=glm-4.5,glm-4.5=glm-4.6"})
    assert mutual.model_fallback.lookup("glm-4.5") == ("glm-4.5", ("glm-4.6",))
    assert pickle.loads(pickle.dumps(config)) == config  # workers receive it pickled
    assert hash(config) == hash(pickle.loads(pickle.dumps(config)))  # still a frozen value


def test_the_toml_form_and_config_check(tmp_path: Path) -> None:
    path = tmp_path / "zaiproxy.toml"
    path.write_text('[upstream]\nmodel_fallback = {"glm-4.6" = ["glm-4.5"], '
                    '"glm-4.7" = ["glm-4.6", "glm-4.5"]}\n')
    config, sources = load_config(env=DEMO, path=str(path))
    assert config.model_fallback == chain("glm-4.6=glm-4.5,glm-4.7=glm-4.6|glm-4.5")
    assert sources["upstream.model_fallback"] == "file"
    text = render_check(config, sources)
    [line] = [line for line in text.splitlines() if line.startswith("model_fallback = ")]
    assert line.split("  # ")[0].rstrip() == (
        'model_fallback = {"glm-4.6" = ["glm-4.5"], "glm-4.7" = ["glm-4.6", "glm-4.5"]}')
    assert line.endswith("# file")
    # config check's output is a config file: the same value comes back.
    again_path = tmp_path / "again.toml"
    again_path.write_text(text)
    assert load_config(env=DEMO, path=str(again_path))[0] == config
    # The default renders as an empty table, which reads back as the default.
    default, default_sources = load_config(env=DEMO)
    assert "model_fallback = {}" in render_check(default, default_sources)
    again_path.write_text(render_check(default, default_sources))
    assert load_config(env=DEMO, path=str(again_path))[0] == default


@pytest.mark.parametrize(("value", "reason"), [
    ("glm-4.6", "write MODEL=FALLBACK[|FALLBACK...], entries separated by ','"),
    ("glm-4.6=", "glm-4.6: no fallback model (leave the model out instead)"),
    ("=glm-4.5", "a model name must match ^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$"),
    ("glm 4.6=glm-4.5", "a model name must match ^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$"),
    ("glm-4.6=glm-4.5|", "glm-4.6: a model name must match ^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$"),
    ("glm-4.6=GLM-4.6", "glm-4.6: falls back to itself"),
    ("glm-4.6=glm-4.5|glm-4.5", "glm-4.6: names a fallback model twice"),
    ("glm-4.6=glm-4.5,GLM-4.6=glm-4.7", "GLM-4.6: has two fallback lists"),
])
def test_env_values_refused(value: str, reason: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(env={**DEMO, ENV: value})
    assert info.value.problems == [f"upstream.model_fallback (env:{ENV}): {value!r}: {reason}"]


@pytest.mark.parametrize(("toml", "reason"), [
    ('"glm-4.6=glm-4.5"', 'not a table (got string): write {"glm-4.6" = ["glm-4.5"]}'),
    ('{"glm-4.6" = "glm-4.5"}', "glm-4.6: not an array of model names (got string)"),
    ('{"glm-4.6" = []}', "glm-4.6: no fallback model (leave the model out instead)"),
    ('{"glm-4.6" = [45]}',
     "glm-4.6: a model name must match ^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$"),
])
def test_toml_values_refused(tmp_path: Path, toml: str, reason: str) -> None:
    path = tmp_path / "zaiproxy.toml"
    path.write_text(f"[upstream]\nmodel_fallback = {toml}\n")
    with pytest.raises(ConfigError) as info:
        load_config(env=DEMO, path=str(path))
    [problem] = info.value.problems
    assert problem.startswith(f"upstream.model_fallback (file {path}): ")
    assert problem.endswith(f": {reason}")


@pytest.mark.parametrize(("retries", "value", "problem"), [
    ("1", "glm-4.7=glm-4.6|glm-4.5",
     "upstream.model_fallback: glm-4.7 lists 2 fallback models but upstream.max_retries is 1 "
     "(each fallback is one retry): shorten the list or raise max_retries"),
    ("0", "glm-4.6=glm-4.5",
     "upstream.model_fallback: glm-4.6 lists 1 fallback model but upstream.max_retries is 0 "
     "(each fallback is one retry): shorten the list or raise max_retries"),
])
def test_a_list_longer_than_the_retry_budget_is_refused(retries: str, value: str,
                                                        problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(env={**DEMO, ENV: value, "MAX_RETRIES": retries})
    assert info.value.problems == [problem]
    config, _ = load_config(env={**DEMO, ENV: value, "MAX_RETRIES": str(len(value.split("|")))})
    assert config.max_retries == len(value.split("|"))


# --- 2. the body a fallback model gets; the mock's control ----------------------------------


def test_the_fallback_body_changes_only_the_model() -> None:
    body = b'{"messages": [{"role": "user", "content": "caf\\u00e9"}], "model": "glm-4.6", "n": 1}'
    payload = orjson.loads(body)
    out = body_for(payload, body, "glm-4.5", include_usage=False)
    assert out == '{"messages":[{"role":"user","content":"café"}],"model":"glm-4.5","n":1}'.encode()
    assert payload["model"] == "glm-4.6"  # the parsed request is not changed
    # The include_usage rewrite the first attempt had is made again.
    stream = b'{"model": "glm-4.6", "stream": true, "messages": []}'
    assert body_for(orjson.loads(stream), stream, "glm-4.5", include_usage=True) == (
        b'{"model":"glm-4.5","stream":true,"messages":[],'
        b'"stream_options":{"include_usage":true}}')
    # An integer past 64 bits would come back as a float: no fallback for such a body.
    big = b'{"model": "glm-4.6", "seed": 123456789012345678901234}'
    assert body_for(orjson.loads(big), big, "glm-4.5", include_usage=False) is None


def test_the_mock_congested_models_control() -> None:
    controls = parse_headers({CONGESTED.encode(): b" glm-4.6 ,glm-4.7,"})
    assert controls.congested_models == frozenset({"glm-4.6", "glm-4.7"})
    with pytest.raises(ControlError, match="must name at least one model"):
        parse_headers({CONGESTED.encode(): b" , "})


# --- 3. end to end, in process, exact numbers --------------------------------------------------


class Api:
    def __init__(self, target: str, body: dict[str, Any]) -> None:
        self.target, self.body = target, body

    def __repr__(self) -> str:
        return self.target

    def payload(self, model: str, *, stream: bool = False) -> bytes:
        doc = {"model": model, **self.body}
        if stream:
            doc["stream"] = True
        return orjson.dumps(doc)


CHAT = Api("/v1/chat/completions", {"messages": MESSAGES})
MESSAGES_API = Api("/v1/messages", {"max_tokens": 64, "messages": MESSAGES})
APIS = [pytest.param(CHAT, id="chat"), pytest.param(MESSAGES_API, id="messages")]


@pytest.fixture
async def mock(nursery: trio.Nursery) -> str:
    return await start_mock(nursery)


async def open_proxy(nursery: trio.Nursery, mock: str, fallback: str | None,
                     **overrides: Any) -> InProcessProxy:
    if fallback is not None:
        overrides["model_fallback"] = chain(fallback)
    return await start_proxy(nursery, make_config(mock, **overrides))


async def send(proxy: InProcessProxy, api: Api, model: str, congested: str, *,
               stream: bool = False, headers: list[tuple[str, str]] | None = None) -> Response:
    return await request(proxy.port, "POST", api.target,
                         [("content-type", "application/json"), (CONGESTED, congested),
                          *(headers or [])],
                         api.payload(model, stream=stream))


async def upstream_calls(mock: str) -> int:
    return int((await request(mock, "GET", "/mock/stats")).json()["requests"])


async def metric(proxy: InProcessProxy, family: str) -> dict[tuple[tuple[str, str], ...], float]:
    """The samples of one counter family, by their labels (variant left out)."""
    text = (await request(proxy.port, "GET", "/metrics")).body.decode()
    return {tuple(sorted((k, v) for k, v in s.labels.items() if k != "variant")): s.value
            for fam in text_string_to_metric_families(text) if fam.name == family
            for s in fam.samples if s.name == family + "_total"}


def fallbacks(*pairs: tuple[str, str, float]) -> dict[tuple[tuple[str, str], ...], float]:
    return {(("from_model", a), ("to_model", b)): n for a, b, n in pairs}


def answered_model(api: Api, resp: Response, stream: bool) -> set[str]:
    """Every model name the answer states (each stream event that names one)."""
    if not stream:
        return {resp.json()["model"]}
    models = set()
    for line in resp.body.split(b"\n"):
        if line.startswith(b"data: {"):
            event = orjson.loads(line[6:])
            models.add(event["model"] if api is CHAT else event.get("message", {}).get("model"))
    return models - {None}


async def log_entries(buffer: Any, event: str, count: int) -> list[dict[str, Any]]:
    """The ``count`` log lines of ``event`` (the record is emitted just after the answer);
    of the access log, the API requests' (not the scrapes of /metrics)."""
    def found() -> list[dict[str, Any]]:
        logs.get_logger().flush()
        return [e for e in map(orjson.loads, buffer.getvalue().splitlines())
                if e["event"] == event and e.get("route") != "/metrics"]

    await wait_until(lambda: len(found()) >= count)
    return found()


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("api", APIS)
async def test_a_1312_falls_back_to_the_next_model(
    nursery: trio.Nursery, mock: str, log_buffer: Any, api: Api, stream: bool
) -> None:
    proxy = await open_proxy(nursery, mock, "glm-4.6=glm-4.5")

    resp = await send(proxy, api, "glm-4.6", "glm-4.6", stream=stream)

    assert resp.status == 200
    assert resp.header(b"x-zaiproxy-model") == b"glm-4.5"
    assert resp.header(b"x-zai-error-class") is None  # a success carries no 429 headers
    assert answered_model(api, resp, stream) == {"glm-4.5"}
    if stream:
        last = b"data: [DONE]\n\n" if api is CHAT else b'data: {"type":"message_stop"}\n\n'
        assert resp.body.endswith(last)
    else:
        text = (resp.json()["choices"][0]["message"]["content"] if api is CHAT
                else resp.json()["content"][0]["text"])
        assert text == expected_text(10, 16)
    assert await upstream_calls(mock) == 2  # glm-4.6 (1312), then glm-4.5
    assert proxy.waits == []  # sent at once: the backoff is the congested model's
    assert await metric(proxy, "zai_proxy_model_fallbacks") == fallbacks(
        ("glm-4.6", "glm-4.5", 1.0))
    assert await metric(proxy, "zai_proxy_retry_attempts") == {(("reason", "congestion"),): 1.0}
    assert await metric(proxy, "zai_proxy_zai_errors") == {
        (("class", "congestion"), ("code", "1312")): 1.0}
    # The tokens are the answering model's.
    assert {dict(labels)["model"] for labels in await metric(proxy, "zai_proxy_tokens")} == {
        "glm-4.5"}
    [record] = await log_entries(log_buffer, "request", 1)
    assert (record["model"], record["requested_model"], record["status"]) == (
        "glm-4.5", "glm-4.6", 200)
    assert (record["zai_class"], record["zai_code"], record["zai_retries"]) == (
        "congestion", "1312", 1)
    [line] = await log_entries(log_buffer, "model_fallback", 1)
    assert {k: line[k] for k in ("request_id", "from_model", "to_model", "zai_code", "attempt")} \
        == {"request_id": resp.header(b"x-zaiproxy-request-id").decode(),
            "from_model": "glm-4.6", "to_model": "glm-4.5", "zai_code": "1312", "attempt": 1}
    raw = log_buffer.getvalue()
    assert b"a prompt that must not" not in raw and UPSTREAM_KEY.encode() not in raw


async def test_the_second_fallback_model_answers(nursery: trio.Nursery, mock: str,
                                                 log_buffer: Any) -> None:
    proxy = await open_proxy(nursery, mock, "glm-4.7=glm-4.6|glm-4.5")

    resp = await send(proxy, CHAT, "glm-4.7", "glm-4.7,glm-4.6")

    assert resp.status == 200
    assert resp.header(b"x-zaiproxy-model") == b"glm-4.5"
    assert resp.json()["model"] == "glm-4.5"
    assert await upstream_calls(mock) == 3
    assert proxy.waits == []
    assert await metric(proxy, "zai_proxy_model_fallbacks") == fallbacks(
        ("glm-4.7", "glm-4.6", 1.0), ("glm-4.6", "glm-4.5", 1.0))
    [record] = await log_entries(log_buffer, "request", 1)
    assert (record["model"], record["requested_model"], record["zai_retries"]) == (
        "glm-4.5", "glm-4.7", 2)


@pytest.mark.parametrize("fallback", [None, "glm-4.7=glm-4.5"], ids=["none", "other-model"])
@pytest.mark.parametrize("api", APIS)
async def test_a_1312_is_retried_and_relayed_as_before_without_a_list_for_its_model(
    nursery: trio.Nursery, mock: str, log_buffer: Any, api: Api, fallback: str | None
) -> None:
    proxy = await open_proxy(nursery, mock, fallback)

    resp = await send(proxy, api, "glm-4.6", "glm-4.6")

    assert resp.status == 429
    assert resp.header(b"x-zai-error-class") == b"congestion"
    assert resp.header(b"x-zai-error-code") == b"1312"
    assert resp.header(b"retry-after") == b"1"  # upstream's, relayed
    assert resp.header(b"x-zaiproxy-model") is None
    assert await upstream_calls(mock) == 4
    assert proxy.waits == [2.0, 4.0, 8.0]
    assert await metric(proxy, "zai_proxy_model_fallbacks") == {}
    [record] = await log_entries(log_buffer, "request", 1)
    assert record["model"] == "glm-4.6" and "requested_model" not in record


async def test_no_header_when_the_requested_model_answers(nursery: trio.Nursery,
                                                          mock: str) -> None:
    proxy = await open_proxy(nursery, mock, "glm-4.6=glm-4.5")
    resp = await send(proxy, CHAT, "glm-4.6", "glm-4.7")
    assert resp.status == 200
    assert resp.header(b"x-zaiproxy-model") is None
    assert resp.json()["model"] == "glm-4.6"
    assert await upstream_calls(mock) == 1
    assert await metric(proxy, "zai_proxy_model_fallbacks") == {}


@pytest.mark.parametrize("api", APIS)
async def test_a_list_used_up_ends_in_the_usual_1312_answer(
    nursery: trio.Nursery, mock: str, log_buffer: Any, api: Api
) -> None:
    """Two fallbacks take two of the three retries; the third waits the 1312 backoff of
    the third retry (8 s) and goes to the last model again; its 1312 is relayed."""
    proxy = await open_proxy(nursery, mock, "glm-4.7=glm-4.6|glm-4.5")

    resp = await send(proxy, api, "glm-4.7", "glm-4.7,glm-4.6,glm-4.5", stream=True)

    assert resp.status == 429
    assert resp.header(b"x-zai-error-class") == b"congestion"
    assert resp.header(b"x-zai-error-code") == b"1312"
    assert resp.header(b"x-zaiproxy-model") == b"glm-4.5"  # whose 1312 the client got
    assert await upstream_calls(mock) == 4  # 4.7, 4.6, 4.5, 4.5: 1 + max_retries
    assert proxy.waits == [8.0]
    assert await metric(proxy, "zai_proxy_model_fallbacks") == fallbacks(
        ("glm-4.7", "glm-4.6", 1.0), ("glm-4.6", "glm-4.5", 1.0))
    assert await metric(proxy, "zai_proxy_retry_attempts") == {(("reason", "congestion"),): 3.0}
    [record] = await log_entries(log_buffer, "request", 1)
    assert (record["model"], record["requested_model"], record["status"],
            record["zai_retries"]) == ("glm-4.5", "glm-4.7", 429, 3)


async def test_a_fallback_is_one_retry_of_the_budget(nursery: trio.Nursery, mock: str) -> None:
    proxy = await open_proxy(nursery, mock, "glm-4.6=glm-4.5", max_retries=1)
    resp = await send(proxy, CHAT, "glm-4.6", "glm-4.6,glm-4.5")
    assert resp.status == 429
    assert resp.header(b"x-zaiproxy-model") == b"glm-4.5"
    assert await upstream_calls(mock) == 2
    assert proxy.waits == []


async def test_a_fallback_is_admitted_again(nursery: trio.Nursery, mock: str,
                                            log_buffer: Any) -> None:
    """The first attempt took the only request slot of the minute: the fallback is refused
    by the proxy's own limit, before it is counted or sent."""
    proxy = await open_proxy(nursery, mock, "glm-4.6=glm-4.5", requests_per_minute=1)
    resp = await send(proxy, CHAT, "glm-4.6", "glm-4.6")
    assert resp.status == 429
    assert resp.header(b"x-zaiproxy-limit") == b"global:requests_per_minute"
    assert resp.header(b"x-zaiproxy-model") is None
    assert await upstream_calls(mock) == 1
    assert await metric(proxy, "zai_proxy_model_fallbacks") == {}
    [record] = await log_entries(log_buffer, "request", 1)
    assert record["model"] == "glm-4.6" and "requested_model" not in record


async def test_other_429s_are_not_a_reason_to_fall_back(nursery: trio.Nursery,
                                                        mock: str) -> None:
    """1302 is this account's concurrency: another model does not change it."""
    proxy = await open_proxy(nursery, mock, "glm-4.6=glm-4.5")
    resp = await request(proxy.port, "POST", CHAT.target,
                         [("content-type", "application/json"), ("x-mock-zai-code", "1302")],
                         CHAT.payload("glm-4.6"))
    assert resp.status == 429 and resp.header(b"x-zai-error-code") == b"1302"
    assert resp.header(b"x-zaiproxy-model") is None
    assert proxy.waits == [1.0, 1.0, 2.0]
    assert await metric(proxy, "zai_proxy_model_fallbacks") == {}


async def test_embeddings_do_not_fall_back(nursery: trio.Nursery, mock: str) -> None:
    """Another model's vectors are not interchangeable: only generating routes fall back."""
    proxy = await open_proxy(nursery, mock, "glm-4.6=glm-4.5")
    resp = await request(proxy.port, "POST", "/v1/embeddings",
                         [("content-type", "application/json"), (CONGESTED, "glm-4.6")],
                         orjson.dumps({"model": "glm-4.6", "input": "hello"}))
    assert resp.status == 429 and resp.header(b"x-zaiproxy-model") is None
    assert proxy.waits == [2.0, 4.0, 8.0]


KEYS = """
[[keys]]
alias = "only-46"
key = "client-only-46"
models = ["glm-4.6"]

[[keys]]
alias = "both"
key = "client-both"
models = ["glm-4.6", "GLM-4.5"]
"""


@pytest.mark.parametrize(("key", "status", "calls", "waits"), [
    ("client-only-46", 429, 4, [2.0, 4.0, 8.0]),  # glm-4.5 is not this key's to use
    ("client-both", 200, 2, []),
])
async def test_a_key_falls_back_only_to_models_it_may_use(
    nursery: trio.Nursery, mock: str, tmp_path: Path, key: str, status: int, calls: int,
    waits: list[float],
) -> None:
    keys = tmp_path / "keys.toml"
    keys.write_text(KEYS)
    proxy = await open_proxy(nursery, mock, "glm-4.6=glm-4.5", keys_file=str(keys))
    resp = await send(proxy, CHAT, "glm-4.6", "glm-4.6",
                      headers=[("authorization", f"Bearer {key}")])
    assert resp.status == status
    assert await upstream_calls(mock) == calls
    assert proxy.waits == waits


# --- 4. real processes, the official SDKs -----------------------------------------------------

CHUNKS, CHUNK_SIZE = 8, 16
TEXT = expected_text(CHUNKS, CHUNK_SIZE)
FALLS_BACK = {CONGESTED: "glm-4.6"}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProcessServer]:
    """The mock and ``zaiproxy serve`` configured by the environment, as an operator would:
    glm-4.6 falls back to glm-4.5, one retry (the fallback) per request."""
    tmp = tmp_path_factory.mktemp("fallback")
    mock = start_process(["mock-upstream", "--port", "0", "--api-key", UPSTREAM_KEY,
                          "--chunks", str(CHUNKS), "--chunk-size", str(CHUNK_SIZE)],
                         env=None, stderr_path=tmp / "mock.log")
    proxy = start_process(["serve", "--port", "0", "--workers", "1"],
                          env=upstream_env(mock, ZAIPROXY_MODEL_FALLBACK="glm-4.6=glm-4.5",
                                           MAX_RETRIES="1"),
                          stderr_path=tmp / "proxy.log")
    yield proxy
    assert proxy.stop() == 0, proxy.logs()
    mock.stop()
    logs_text = proxy.logs()
    assert '"event":"model_fallback"' in logs_text
    assert UPSTREAM_KEY not in logs_text and "a prompt that must not" not in logs_text


def fallback_count(stack: ProcessServer) -> float:
    with urllib.request.urlopen(f"{stack.url}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return sum(s.value for fam in text_string_to_metric_families(text)
               if fam.name == "zai_proxy_model_fallbacks" for s in fam.samples
               if s.name.endswith("_total") and s.labels["from_model"] == "glm-4.6"
               and s.labels["to_model"] == "glm-4.5")


def openai_client(stack: ProcessServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.url}/v1", api_key="client", max_retries=0)


def anthropic_client(stack: ProcessServer) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=stack.url, api_key="client", max_retries=0)


def test_sdk_openai_chat(stack: ProcessServer) -> None:
    before = fallback_count(stack)
    raw = openai_client(stack).chat.completions.with_raw_response.create(
        model="glm-4.6", messages=MESSAGES, extra_headers=FALLS_BACK)
    assert raw.headers["x-zaiproxy-model"] == "glm-4.5"
    completion = raw.parse()
    assert completion.model == "glm-4.5"
    assert completion.choices[0].message.content == TEXT
    assert fallback_count(stack) == before + 1


def test_sdk_openai_chat_stream(stack: ProcessServer) -> None:
    before = fallback_count(stack)
    raw = openai_client(stack).chat.completions.with_raw_response.create(
        model="glm-4.6", messages=MESSAGES, stream=True,
        stream_options={"include_usage": True}, extra_headers=FALLS_BACK)
    assert raw.headers["x-zaiproxy-model"] == "glm-4.5"
    parts, models = [], set()
    for chunk in raw.parse():
        models.add(chunk.model)
        if chunk.choices and chunk.choices[0].delta.content:
            parts.append(chunk.choices[0].delta.content)
    assert "".join(parts) == TEXT
    assert models == {"glm-4.5"}
    assert fallback_count(stack) == before + 1


def test_sdk_anthropic_messages(stack: ProcessServer) -> None:
    before = fallback_count(stack)
    raw = anthropic_client(stack).messages.with_raw_response.create(
        model="glm-4.6", max_tokens=64, messages=MESSAGES,
        extra_headers=FALLS_BACK)
    assert raw.headers["x-zaiproxy-model"] == "glm-4.5"
    message = raw.parse()
    assert message.model == "glm-4.5"
    assert message.content[0].type == "text" and message.content[0].text == TEXT
    assert fallback_count(stack) == before + 1


def test_sdk_anthropic_messages_stream(stack: ProcessServer) -> None:
    before = fallback_count(stack)
    with anthropic_client(stack).messages.stream(
            model="glm-4.6", max_tokens=64, messages=MESSAGES,
            extra_headers=FALLS_BACK) as stream:
        assert stream.response.headers["x-zaiproxy-model"] == "glm-4.5"
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == TEXT
    assert final.model == "glm-4.5"
    assert final.usage.output_tokens == CHUNKS
    assert fallback_count(stack) == before + 1


def test_sdk_a_model_without_a_list_gets_the_1312(stack: ProcessServer) -> None:
    """glm-4.5 has no list: its 1312 is retried once (a real backoff of 1-2 s with the
    worker's jitter; the mock is told to send no Retry-After) and relayed."""
    before = fallback_count(stack)
    with pytest.raises(openai.RateLimitError) as info:
        openai_client(stack).chat.completions.create(
            model="glm-4.5", messages=MESSAGES,
            extra_headers={CONGESTED: "glm-4.5", "x-mock-retry-after": "none"})
    headers = info.value.response.headers
    assert (headers["x-zai-error-class"], headers["x-zai-error-code"]) == ("congestion", "1312")
    assert "x-zaiproxy-model" not in headers
    assert fallback_count(stack) == before

