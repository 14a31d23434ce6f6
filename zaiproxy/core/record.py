"""The one plain record the hot path emits per finished request.

Sinks consume it: the metrics, the history recorder and the access log (vLLM's v1
metrics pattern: the request path builds one record, it does not call each sink with
its own arguments). Frozen, slotted, plain
values only, so it can cross a process boundary to the recorder unchanged.
Never holds a key or a raw path: ``route`` is the route template.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final


@dataclass(frozen=True, slots=True)
class Usage:
    """Token counts for one response, in the Anthropic vocabulary."""

    input_tokens: int
    output_tokens: int
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0


class Ending(enum.Enum):
    """How a relayed response ended (``RequestRecord.result`` holds its value)."""

    OK = "ok"
    CLIENT_GONE = "client_disconnected"  # the client left first (its status is then 499)
    UPSTREAM_CUT = "upstream_cut"  # upstream's connection broke mid-body
    UPSTREAM_IDLE = "upstream_idle_timeout"  # upstream sent nothing for body_idle_timeout
    CANCELLED = "cancelled"  # the proxy cut it (the drain deadline)


# The one place that knows how each API reports input: Anthropic's input_tokens excludes
# cache reads and writes; OpenAI's prompt_tokens includes the cached part.
INPUT_INCLUDES_CACHE: Final = {"openai": True, "anthropic": False}


def billed_tokens(api: str | None, usage: Usage) -> int:
    """Tokens a usage counts against token limits: the whole prompt (cache included) plus
    the completion."""
    if input_includes_cache(api):
        return usage.input_tokens + usage.output_tokens
    return (usage.input_tokens + usage.cache_read_tokens + usage.cache_write_tokens
            + usage.output_tokens)


@dataclass(frozen=True, slots=True)
class RequestRecord:
    request_id: str
    method: str
    route: str  # the route template, never the raw path (bounded: safe for labels)
    status: int  # what the client got; 499 when it left before a response
    duration_s: float
    bytes_in: int
    client: str
    # "openai" | "anthropic" for a proxied API route; None for control routes (/health,
    # /metrics, /admin/*) and heads refused before routing: consumers count API traffic
    # by this, never by re-deriving it from the route.
    api: str | None = None
    # The model that answered, truncated to 128 characters: the client's, or after a 1312
    # fallback (upstream.model_fallback) the one the last attempt was sent to.
    model: str | None = None
    stream: bool | None = None
    upstream_status: int | None = None
    upstream_ttfb_s: float | None = None
    bytes_out: int | None = None
    result: str | None = None  # an Ending's value; None when the request was not proxied
    retried: bool = False  # a stale pooled connection was replaced once
    usage: Usage | None = None
    error: str | None = None  # the proxy's own error message, if it answered with one
    key_alias: str | None = None  # the client key's alias (never the key); None in open mode
    tokens_estimated: bool = False  # usage counted by the proxy (upstream sent none)
    prompt_estimate: int | None = None  # the proxy's tiktoken estimate of the prompt
    zai_retries: int = 0  # Z.AI 429s retried by the proxy
    zai_class: str | None = None  # class of the last Z.AI 429 seen
    zai_code: str | None = None
    # Timings for /metrics; None = not measured for this request (not in the access log yet).
    ttft_s: float | None = None  # request start -> first response body byte relayed
    upstream_s: float | None = None  # request sent upstream -> its response ended
    queue_wait_s: float | None = None  # waited in the admission queue (0.0: admitted at once)
    token_count_s: float | None = None  # spent estimating the prompt's tokens (tiktoken)
    # The model the client asked for, when a fallback sent the request to ``model`` instead.
    requested_model: str | None = None
    # The upstream key (its alias) the answer came with, when a pool of keys is configured.
    upstream: str | None = None

    def log_fields(self) -> dict[str, object]:
        """The access-log line's fields (absent values left out)."""
        fields: dict[str, object] = {
            "request_id": self.request_id,
            "method": self.method,
            "route": self.route,
            "status": self.status,
            "duration_ms": round(self.duration_s * 1000, 3),
            "bytes_in": self.bytes_in,
            "client": self.client,
        }
        if self.model is not None:
            fields["model"] = self.model
        if self.requested_model is not None:
            fields["requested_model"] = self.requested_model
        if self.upstream is not None:
            fields["upstream"] = self.upstream
        if self.stream is not None:
            fields["stream"] = self.stream
        if self.result is not None:
            fields["upstream_status"] = self.upstream_status
            fields["bytes_out"] = self.bytes_out
            fields["result"] = self.result
        if self.upstream_ttfb_s is not None:
            fields["upstream_ttfb_ms"] = round(self.upstream_ttfb_s * 1000, 3)
        if self.retried:
            fields["retried_stale_connection"] = True
        if self.usage is not None:
            u = self.usage
            fields["usage"] = {"input_tokens": u.input_tokens, "output_tokens": u.output_tokens,
                               "cache_read_tokens": u.cache_read_tokens,
                               "cache_write_tokens": u.cache_write_tokens}
            if self.tokens_estimated:
                fields["usage"]["estimated"] = True  # type: ignore[index]
        if self.prompt_estimate is not None:
            fields["prompt_estimate"] = self.prompt_estimate
        if self.key_alias is not None:
            fields["key"] = self.key_alias
        if self.zai_class is not None:
            fields["zai_class"] = self.zai_class
            fields["zai_code"] = self.zai_code
            fields["zai_retries"] = self.zai_retries
        if self.error is not None:
            fields["error"] = self.error
        return fields


def input_includes_cache(api: str | None) -> bool:
    """Whether ``api``'s input count already includes the cached tokens (the rule of
    :data:`INPUT_INCLUDES_CACHE`; an unknown API is read as OpenAI, as :func:`billed_tokens`
    does). For the metrics' token split and the history's cost."""
    return INPUT_INCLUDES_CACHE.get(api or "openai", True)
