"""Response bodies of the mock upstream, one builder per API shape.

Pure and deterministic: no clock, no counters, no randomness. ``created`` is
the constant :data:`CREATED` and every id is derived from a hash of the
request (``rid``), so the same request always yields the same bytes and a test
can compute what the mock sends by calling these functions.

The generated assistant text is ASCII only, so "chunk_size bytes of text per
delta" is also "chunk_size characters": no delta ever splits a UTF-8 sequence.
Token accounting (documented contract, asserted by tests):

- prompt/input tokens = ``max(1, len(request body) // 4)``;
- completion/output tokens = the number of text deltas (``chunks``), i.e. one
  token per streamed delta, the same number a proxy gets by counting deltas.

Where the usage goes is the ``usage`` argument (``x-mock-usage``), one of
:data:`USAGE_MODES`: ``final`` (the default) puts it on the last event, as
Z.AI does; ``separate`` moves it, for OpenAI streams, to an extra chunk with
``"choices":[]`` before ``[DONE]`` (how OpenAI answers
``stream_options.include_usage``); ``none`` sends none. Whole (non-stream)
bodies drop their ``usage`` key for ``none`` only.

Stream events are built from byte templates around ``orjson.dumps(piece)``
instead of dumping one dict per delta: the bytes are identical to dumping the
dict (orjson keeps insertion order and writes no spaces) and it keeps large
``x-mock-chunks`` values cheap.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import struct
import time
from collections.abc import Sequence
from typing import Any

import orjson

# 2025-11-27T00:00:00Z. Fixed so that identical requests give identical bytes.
CREATED = 1764201600

GLM_MODELS = ("glm-4.6", "glm-4.5", "glm-4.5-air", "glm-4.5-flash", "glm-4.5v")

_FILLER = (
    "GLM mock upstream reply. The quick brown fox jumps over the lazy dog; "
    "pack my box with five dozen liquor jugs. "
)


@functools.lru_cache(maxsize=32)
def expected_text(chunks: int, chunk_size: int) -> str:
    """The full assistant text the mock generates for ``chunks`` deltas of ``chunk_size``."""
    size = chunks * chunk_size
    return (_FILLER * (size // len(_FILLER) + 1))[:size]


@functools.lru_cache(maxsize=32)
def text_deltas(chunks: int, chunk_size: int) -> tuple[str, ...]:
    """The text pieces, one per streamed delta; they concatenate to :func:`expected_text`."""
    text = expected_text(chunks, chunk_size)
    return tuple(text[i * chunk_size : (i + 1) * chunk_size] for i in range(chunks))


def prompt_tokens(body: bytes) -> int:
    return max(1, len(body) // 4)


def request_id(method: bytes, target: bytes, body: bytes) -> str:
    """A stable id for a request: same method, target and body -> same id."""
    digest = hashlib.sha256(method + b" " + target + b"\n" + body).hexdigest()
    return digest[:24]


def _dumps(obj: Any) -> bytes:
    return orjson.dumps(obj)


def _sse(data: bytes) -> bytes:
    return b"data: " + data + b"\n\n"


def _event(name: bytes, data: bytes) -> bytes:
    return b"event: " + name + b"\ndata: " + data + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"

USAGE_MODES = ("final", "separate", "none")


def _check_usage(usage: str) -> None:
    if usage not in USAGE_MODES:
        raise ValueError(f"unknown usage mode {usage!r}")


def _without_usage(body: dict[str, Any], usage: str) -> dict[str, Any]:
    _check_usage(usage)
    if usage == "none":
        del body["usage"]
    return body


def _openai_stream_end(head: bytes, finish: bytes, usage_json: bytes, usage: str) -> list[bytes]:
    """The last events of an OpenAI stream. ``head`` is the chunk's JSON up to its
    ``"choices":[`` (inclusive), ``finish`` the rest of the finish_reason choice."""
    _check_usage(usage)
    if usage == "final":
        return [_sse(head + finish + b'],"usage":' + usage_json + b"}"), SSE_DONE]
    events = [_sse(head + finish + b"]}")]
    if usage == "separate":
        events.append(_sse(head + b'],"usage":' + usage_json + b"}"))
    events.append(SSE_DONE)
    return events


def _openai_usage(prompt: int, completion: int) -> dict[str, Any]:
    # The details objects are what OpenAI and Z.AI send; they also bring the
    # default non-stream chat body into the 600-700 byte range of real replies.
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0},
    }


# --- OpenAI chat ---------------------------------------------------------------------------


def chat_completion(
    rid: str, model: str, chunks: int, chunk_size: int, prompt: int, usage: str = "final"
) -> bytes:
    return _dumps(
        _without_usage(
            {
                "id": f"chatcmpl-{rid}",
                "object": "chat.completion",
                "created": CREATED,
                "model": model,
                "system_fingerprint": "fp_zaiproxy_mock",
                "choices": [
                    {
                        "index": 0,
                        "message": {
                            "role": "assistant",
                            "content": expected_text(chunks, chunk_size),
                            "refusal": None,
                            "annotations": [],
                        },
                        "logprobs": None,
                        "finish_reason": "stop",
                    }
                ],
                "usage": _openai_usage(prompt, chunks),
                "request_id": rid,
            },
            usage,
        )
    )


def chat_events(
    rid: str, model: str, chunks: int, chunk_size: int, prompt: int, usage: str = "final"
) -> list[bytes]:
    """``chat.completion.chunk`` events: one per delta (the first carries the role), a final
    chunk with ``finish_reason`` and ``usage`` (Z.AI always sends it), then ``[DONE]``.
    ``usage`` moves or drops the usage (see the module docstring)."""
    choices = (
        b'{"id":"chatcmpl-'
        + rid.encode()
        + b'","object":"chat.completion.chunk","created":'
        + str(CREATED).encode()
        + b',"model":'
        + _dumps(model)
        + b',"system_fingerprint":"fp_zaiproxy_mock","choices":['
    )
    head = choices + b'{"index":0,"delta":'
    tail = b',"logprobs":null,"finish_reason":null}]}'
    pieces = text_deltas(chunks, chunk_size) or ("",)
    events = [_sse(head + b'{"role":"assistant","content":' + _dumps(pieces[0]) + b"}" + tail)]
    events.extend(_sse(head + b'{"content":' + _dumps(p) + b"}" + tail) for p in pieces[1:])
    finish = b'{"index":0,"delta":{},"logprobs":null,"finish_reason":"stop"}'
    usage_json = _dumps(_openai_usage(prompt, chunks))
    events.extend(_openai_stream_end(choices, finish, usage_json, usage))
    return events


# --- OpenAI legacy completions -------------------------------------------------------------


def text_completion(
    rid: str, model: str, chunks: int, chunk_size: int, prompt: int, usage: str = "final"
) -> bytes:
    return _dumps(
        _without_usage(
            {
                "id": f"cmpl-{rid}",
                "object": "text_completion",
                "created": CREATED,
                "model": model,
                "choices": [
                    {
                        "text": expected_text(chunks, chunk_size),
                        "index": 0,
                        "logprobs": None,
                        "finish_reason": "stop",
                    }
                ],
                "usage": _openai_usage(prompt, chunks),
            },
            usage,
        )
    )


def text_completion_events(
    rid: str, model: str, chunks: int, chunk_size: int, prompt: int, usage: str = "final"
) -> list[bytes]:
    choices = (
        b'{"id":"cmpl-'
        + rid.encode()
        + b'","object":"text_completion","created":'
        + str(CREATED).encode()
        + b',"model":'
        + _dumps(model)
        + b',"choices":['
    )
    head = choices + b'{"text":'
    events = [
        _sse(head + _dumps(p) + b',"index":0,"logprobs":null,"finish_reason":null}]}')
        for p in text_deltas(chunks, chunk_size)
    ]
    finish = b'{"text":"","index":0,"logprobs":null,"finish_reason":"stop"}'
    usage_json = _dumps(_openai_usage(prompt, chunks))
    events.extend(_openai_stream_end(choices, finish, usage_json, usage))
    return events


# --- OpenAI embeddings and models ----------------------------------------------------------


def embedding_vector(item: Any) -> list[float]:
    """8 floats in [-1, 1) from a hash of the input item. Each is k/128, exactly
    representable in float32, so the float and base64 encodings decode to equal values."""
    digest = hashlib.sha256(_dumps(item)).digest()
    return [(b - 128) / 128 for b in digest[:8]]


def embeddings(model: str, items: Sequence[Any], prompt: int, base64_format: bool) -> bytes:
    data = []
    for index, item in enumerate(items):
        vector = embedding_vector(item)
        encoded: Any = vector
        if base64_format:  # what the OpenAI SDK asks for: little-endian float32, base64
            encoded = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
        data.append({"object": "embedding", "index": index, "embedding": encoded})
    return _dumps(
        {
            "object": "list",
            "data": data,
            "model": model,
            "usage": {"prompt_tokens": prompt, "total_tokens": prompt},
        }
    )


MODELS_BODY = _dumps(
    {
        "object": "list",
        "data": [
            {"id": m, "object": "model", "created": CREATED, "owned_by": "z-ai"} for m in GLM_MODELS
        ],
    }
)


# --- Anthropic messages --------------------------------------------------------------------


def anthropic_message(
    rid: str, model: str, chunks: int, chunk_size: int, prompt: int, usage: str = "final"
) -> bytes:
    return _dumps(
        _without_usage(
            {
                "id": f"msg_{rid}",
                "type": "message",
                "role": "assistant",
                "model": model,
                "content": [{"type": "text", "text": expected_text(chunks, chunk_size)}],
                "stop_reason": "end_turn",
                "stop_sequence": None,
                "usage": {"input_tokens": prompt, "output_tokens": chunks},
            },
            usage,
        )
    )


def anthropic_events(
    rid: str, model: str, chunks: int, chunk_size: int, prompt: int, usage: str = "final"
) -> list[bytes]:
    """The event sequence of Anthropic's streaming Messages API, in its order. ``usage``
    ``none``: zeros in ``message_start`` (as Z.AI sometimes sends) and no ``usage`` in
    ``message_delta``; ``separate`` is the same as ``final`` (Anthropic has no such form)."""
    _check_usage(usage)
    none = usage == "none"
    start = {
        "type": "message_start",
        "message": {
            "id": f"msg_{rid}",
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            # Anthropic reports output_tokens 1 at the start and the total at message_delta.
            "usage": {"input_tokens": 0, "output_tokens": 0}
            if none
            else {"input_tokens": prompt, "output_tokens": 1},
        },
    }
    events = [
        _event(b"message_start", _dumps(start)),
        _event(
            b"content_block_start",
            b'{"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}',
        ),
        _event(b"ping", b'{"type":"ping"}'),
    ]
    head = b'{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":'
    events.extend(
        _event(b"content_block_delta", head + _dumps(p) + b"}}")
        for p in text_deltas(chunks, chunk_size)
    )
    events.append(_event(b"content_block_stop", b'{"type":"content_block_stop","index":0}'))
    delta = b'{"type":"message_delta","delta":{"stop_reason":"end_turn","stop_sequence":null}'
    if not none:
        delta += b',"usage":{"output_tokens":' + str(chunks).encode() + b"}"
    events.append(_event(b"message_delta", delta + b"}"))
    events.append(_event(b"message_stop", b'{"type":"message_stop"}'))
    return events


def count_tokens(prompt: int) -> bytes:
    return _dumps({"input_tokens": prompt})


# --- errors --------------------------------------------------------------------------------

_OPENAI_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
}
_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    529: "overloaded_error",
}


def openai_error(status: int, message: str, code: str | None = None) -> bytes:
    kind = _OPENAI_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return _dumps({"error": {"message": message, "type": kind, "code": code}})


def anthropic_error(status: int, message: str) -> bytes:
    kind = _ANTHROPIC_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
    return _dumps({"type": "error", "error": {"type": kind, "message": message}})


# Z.AI's business codes, worded like its 429 bodies. The reset times are fixed
# strings (not the clock): Z.AI puts the local reset time in the 1308/1310 text.
ZAI_MESSAGES = {
    1302: "High concurrency usage of this API, please reduce concurrency or contact "
    "customer service to increase limits",
    1303: "High frequency usage of this API, please reduce frequency or contact "
    "customer service to increase limits",
    1305: "The service may be temporarily overloaded, please try again later",
    1308: "Usage limit reached for 5 hour. Your limit will reset at 2026-11-27 23:00:00",
    1310: "Weekly/Monthly Limit Exhausted. Your limit will reset at 2026-12-01 00:00:00",
    1312: "The model is currently experiencing high traffic, please try again later",
}


def quota_spent(reset_at: float) -> bytes:
    """Z.AI's 1308: the account's quota window is spent until ``reset_at`` (unix seconds),
    said as Z.AI says it (its message with a UTC+8 time) and as a ``reset_time`` in ms."""
    beijing = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(reset_at + 8 * 3600))
    return _dumps({"error": {"code": "1308", "reset_time": int(reset_at * 1000),
                             "message": f"Usage limit reached for 5 hour. Your limit will "
                                        f"reset at {beijing}"}})


def zai_error(code: int, shape: str = "openai", retry_after: float | None = None) -> bytes:
    """A Z.AI 429 body in one of the envelopes seen in front of Z.AI.

    - ``openai`` (the default): ``{"error": {"code": "1302", "message": ...}}``;
    - ``native``: ``{"code": 1302, "msg": ..., "success": false}`` (code as a number);
    - ``anthropic``: ``{"type": "error", "error": {"type": "rate_limit_error",
      "message": "[1302] ..."}}``, the code only inside the message text.

    ``retry_after`` (seconds) goes next to the code: inside ``error``, or at the
    top level of the native shape; whole numbers are written as integers.
    """
    message = ZAI_MESSAGES.get(code, f"Z.AI business error {code}")
    extra: dict[str, Any] = {}
    if retry_after is not None:
        extra["retry_after"] = int(retry_after) if float(retry_after).is_integer() else retry_after
    if shape == "native":
        return _dumps({"code": code, "msg": message, "success": False, **extra})
    if shape == "anthropic":
        error = {"type": "rate_limit_error", "message": f"[{code}] {message}", **extra}
        return _dumps({"type": "error", "error": error})
    if shape != "openai":
        raise ValueError(f"unknown Z.AI body shape {shape!r}")
    return _dumps({"error": {"code": str(code), "message": message, **extra}})
