"""The official openai and anthropic SDKs through real proxy processes to the real mock.

Sync and async clients, streaming and not: content and usage must arrive
intact. The proxy runs as ``zaiproxy serve --workers 2`` and the mock as
``zaiproxy mock-upstream`` (two real child processes), and the mock requires
the upstream key exactly as Z.AI does (Bearer on OpenAI paths, x-api-key on
Anthropic paths), so a wrong injection fails these tests.
"""

from __future__ import annotations

from collections.abc import Iterator

import anthropic
import openai
import pytest

from tests.harness import UPSTREAM_KEY, ProcessServer, start_process
from zaiproxy.mock.payloads import expected_text

CHUNKS, CHUNK_SIZE = 12, 16
TEXT = expected_text(CHUNKS, CHUNK_SIZE)
CLIENT_KEY = "client-key-not-forwarded"
MESSAGES = [{"role": "user", "content": "Say something."}]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProcessServer]:
    tmp = tmp_path_factory.mktemp("sdk")
    mock = start_process(["mock-upstream", "--port", "0", "--api-key", UPSTREAM_KEY,
                          "--chunks", str(CHUNKS), "--chunk-size", str(CHUNK_SIZE)],
                         env=None, stderr_path=tmp / "mock.log")
    proxy = start_process(["serve", "--port", "0", "--workers", "2"], env={
        "ZAI_API_KEY": UPSTREAM_KEY,
        "ZAIPROXY_OPENAI_BASE_URL": f"{mock.url}/api/paas/v4",
        "ZAIPROXY_ANTHROPIC_BASE_URL": f"{mock.url}/api/anthropic",
        "ZAIPROXY_NATIVE_BASE_URL": mock.url,
    }, stderr_path=tmp / "proxy.log")
    yield proxy
    assert proxy.stop() == 0, proxy.logs()
    mock.stop()
    # Keys never reach the logs, whichever side they came from.
    logs = proxy.logs()
    assert UPSTREAM_KEY not in logs and CLIENT_KEY not in logs
    assert '"event":"request"' in logs


def openai_client(stack: ProcessServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.url}/v1", api_key=CLIENT_KEY, max_retries=0)


def anthropic_client(stack: ProcessServer) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=stack.url, api_key=CLIENT_KEY, max_retries=0)


def test_openai_chat_sync(stack: ProcessServer) -> None:
    resp = openai_client(stack).chat.completions.create(model="glm-4.6", messages=MESSAGES)
    assert resp.choices[0].message.content == TEXT
    assert resp.usage is not None
    assert resp.usage.completion_tokens == CHUNKS
    assert resp.usage.prompt_tokens > 0


def test_openai_chat_stream_sync(stack: ProcessServer) -> None:
    stream = openai_client(stack).chat.completions.create(
        model="glm-4.6", messages=MESSAGES, stream=True, stream_options={"include_usage": True})
    parts, usage = [], None
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            parts.append(chunk.choices[0].delta.content)
        if chunk.usage is not None:
            usage = chunk.usage
    assert "".join(parts) == TEXT
    assert len(parts) == CHUNKS
    assert usage is not None and usage.completion_tokens == CHUNKS


def test_openai_completions_embeddings_models(stack: ProcessServer) -> None:
    client = openai_client(stack)
    comp = client.completions.create(model="glm-4.6", prompt="hello")
    assert comp.choices[0].text == TEXT
    emb = client.embeddings.create(model="embedding-3", input=["a", "b"])
    assert len(emb.data) == 2 and len(emb.data[0].embedding) > 0
    models = [m.id for m in client.models.list()]
    assert "glm-4.6" in models


def test_openai_error_status_maps_to_sdk_exception(stack: ProcessServer) -> None:
    with pytest.raises(openai.RateLimitError) as info:
        openai_client(stack).chat.completions.create(model="mock-zai-1303", messages=MESSAGES)
    assert info.value.status_code == 429


def test_openai_cut_stream_raises(stack: ProcessServer) -> None:
    stream = openai_client(stack).chat.completions.create(
        model="mock-reset", messages=MESSAGES, stream=True)
    with pytest.raises(openai.APIError) as info:
        for _ in stream:
            pass
    assert "upstream" in str(info.value.message)


def test_anthropic_messages_sync(stack: ProcessServer) -> None:
    msg = anthropic_client(stack).messages.create(model="glm-4.6", max_tokens=256,
                                                  messages=MESSAGES)
    assert msg.content[0].type == "text"
    assert msg.content[0].text == TEXT
    assert msg.usage.output_tokens == CHUNKS


def test_anthropic_stream_sync(stack: ProcessServer) -> None:
    client = anthropic_client(stack)
    with client.messages.stream(model="glm-4.6", max_tokens=256, messages=MESSAGES) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == TEXT
    assert final.usage.output_tokens == CHUNKS
    assert final.usage.input_tokens > 0


def test_anthropic_beta_query_and_count_tokens(stack: ProcessServer) -> None:
    client = anthropic_client(stack)
    # Claude Code's shape: /v1/messages?beta=true with an anthropic-beta list.
    msg = client.beta.messages.create(model="glm-4.6", max_tokens=64, messages=MESSAGES,
                                      betas=["interleaved-thinking-2025-05-14",
                                             "fine-grained-tool-streaming-2025-05-14"])
    assert msg.content[0].text == TEXT
    count = client.messages.count_tokens(model="glm-4.6", messages=MESSAGES)
    assert count.input_tokens > 0


def test_anthropic_cut_stream_raises(stack: ProcessServer) -> None:
    client = anthropic_client(stack)
    with pytest.raises(anthropic.APIStatusError) as info, client.messages.stream(
            model="mock-reset", max_tokens=64, messages=MESSAGES) as s:
        for _ in s:
            pass
    assert "upstream" in str(info.value)


def test_anthropic_overloaded_maps_to_sdk_exception(stack: ProcessServer) -> None:
    with pytest.raises(anthropic.InternalServerError) as info:
        anthropic_client(stack).messages.create(model="mock-status-529", max_tokens=16,
                                                messages=MESSAGES)
    assert info.value.status_code == 529


async def test_openai_async_stream(stack: ProcessServer) -> None:
    client = openai.AsyncOpenAI(base_url=f"{stack.url}/v1", api_key=CLIENT_KEY, max_retries=0)
    stream = await client.chat.completions.create(model="glm-4.6", messages=MESSAGES,
                                                  stream=True)
    parts = [c.choices[0].delta.content async for c in stream
             if c.choices and c.choices[0].delta.content]
    assert "".join(parts) == TEXT
    resp = await client.chat.completions.create(model="glm-4.6", messages=MESSAGES)
    assert resp.choices[0].message.content == TEXT
    await client.close()


async def test_anthropic_async_stream(stack: ProcessServer) -> None:
    client = anthropic.AsyncAnthropic(base_url=stack.url, api_key=CLIENT_KEY, max_retries=0)
    async with client.messages.stream(model="glm-4.6", max_tokens=256,
                                      messages=MESSAGES) as stream:
        text = "".join([t async for t in stream.text_stream])
        final = await stream.get_final_message()
    assert text == TEXT
    assert final.usage.output_tokens == CHUNKS
    msg = await client.messages.create(model="glm-4.6", max_tokens=64, messages=MESSAGES)
    assert msg.content[0].text == TEXT
    await client.close()
