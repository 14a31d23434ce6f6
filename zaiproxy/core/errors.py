"""One error hierarchy; each error knows its HTTP status and its body in the caller's API shape.

OpenAI routes answer ``{"error": {"message", "type", "code"}}``; Anthropic routes
answer ``{"type": "error", "error": {"type", "message"}}`` (the error contract in docs/architecture.md).
The Anthropic ``type`` values are the ones Anthropic documents per status
(invalid_request_error, not_found_error, request_too_large, api_error,
timeout_error, overloaded_error, ...), so SDKs map them to the right exception.
"""

from __future__ import annotations

import enum

import orjson


class Api(enum.Enum):
    OPENAI = "openai"
    ANTHROPIC = "anthropic"


def api_for_path(path: str | bytes) -> Api:
    """The error shape for a request whose route is unknown (a best guess from its path)."""
    text = path.decode("ascii", "replace") if isinstance(path, bytes) else path
    return Api.ANTHROPIC if text.startswith(("/v1/messages", "/api/anthropic")) else Api.OPENAI


class ProxyError(Exception):
    """An error the proxy itself answers (never one relayed from upstream)."""

    status: int = 500
    openai_type: str = "server_error"
    anthropic_type: str = "api_error"
    code: str = "internal_error"
    # Extra response headers (e.g. ``Allow`` on 405).
    headers: tuple[tuple[bytes, bytes], ...] = ()

    def __init__(self, message: str, *, headers: tuple[tuple[bytes, bytes], ...] = ()) -> None:
        super().__init__(message)
        self.message = message
        if headers:
            self.headers = headers

    def body(self, api: Api) -> bytes:
        return error_body(api, self.anthropic_type if api is Api.ANTHROPIC else self.openai_type,
                          self.message, self.code)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.status}, {self.message!r})"


def error_body(api: Api, type_: str, message: str, code: str) -> bytes:
    if api is Api.ANTHROPIC:
        return orjson.dumps({"type": "error", "error": {"type": type_, "message": message}})
    return orjson.dumps({"error": {"message": message, "type": type_, "code": code}})


def sse_error_event(api: Api, type_: str, message: str, code: str) -> bytes:
    """The final event sent when a stream is cut, so clients can tell it from a short answer.

    OpenAI SDKs raise on a ``data:`` object with a top-level ``error``; Anthropic
    SDKs raise on ``event: error`` (both as of their 2024+ stream decoders).
    """
    payload = error_body(api, type_, message, code)
    if api is Api.ANTHROPIC:
        return b"event: error\ndata: " + payload + b"\n\n"
    return b"data: " + payload + b"\n\n"


class BadRequest(ProxyError):
    status = 400
    openai_type = "invalid_request_error"
    anthropic_type = "invalid_request_error"
    code = "bad_request"


class InvalidJSON(BadRequest):
    code = "invalid_json"


class NotFound(ProxyError):
    status = 404
    openai_type = "invalid_request_error"
    anthropic_type = "not_found_error"
    code = "not_found"


class MethodNotAllowed(ProxyError):
    status = 405
    openai_type = "invalid_request_error"
    anthropic_type = "invalid_request_error"
    code = "method_not_allowed"


class PayloadTooLarge(ProxyError):
    status = 413
    openai_type = "invalid_request_error"
    anthropic_type = "request_too_large"
    code = "request_too_large"


class HeadersTooLarge(ProxyError):
    status = 431
    openai_type = "invalid_request_error"
    anthropic_type = "invalid_request_error"
    code = "request_headers_too_large"


class VersionNotSupported(ProxyError):
    status = 505
    openai_type = "invalid_request_error"
    anthropic_type = "invalid_request_error"
    code = "http_version_not_supported"


class RequestTimeout(ProxyError):
    status = 408
    openai_type = "invalid_request_error"
    anthropic_type = "invalid_request_error"
    code = "request_timeout"


class ServiceUnavailable(ProxyError):
    status = 503
    openai_type = "server_error"
    anthropic_type = "overloaded_error"
    code = "service_unavailable"


class UpstreamError(ProxyError):
    """The upstream could not be reached or broke the exchange."""

    status = 502
    openai_type = "upstream_error"
    anthropic_type = "api_error"
    code = "upstream_unavailable"


class UpstreamTimeout(UpstreamError):
    status = 504
    anthropic_type = "timeout_error"
    code = "upstream_timeout"


class PoolExhausted(ServiceUnavailable):
    code = "upstream_pool_exhausted"


class LimitsUnavailable(ServiceUnavailable):
    """The fleet's limits (Redis) cannot be reached and ``limits_fail`` is ``closed``."""

    code = "rate_limiter_unavailable"


class Unauthorized(ProxyError):
    status = 401
    openai_type = "invalid_request_error"
    anthropic_type = "authentication_error"
    code = "invalid_api_key"


class Forbidden(ProxyError):
    status = 403
    openai_type = "invalid_request_error"
    anthropic_type = "permission_error"
    code = "model_not_allowed"


class RateLimited(ProxyError):
    """The proxy's own limit (never upstream's): says which limit and when it resets."""

    status = 429
    openai_type = "rate_limit_exceeded"
    anthropic_type = "rate_limit_error"
    code = "proxy_rate_limit"


class RequestTooLargeForLimit(BadRequest):
    """The request's token reservation exceeds a limit it can never fit under."""

    code = "reservation_exceeds_limit"
