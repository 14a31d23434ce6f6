"""What the mock upstream answers: request in, :class:`ResponsePlan` out. No I/O.

The trio shell (:mod:`zaiproxy.mock.server`) parses a request with h11, calls
:func:`plan_response`, turns the plan into timed writes with
:func:`zaiproxy.mock.wire.build_schedule` and executes them. Everything that
decides bytes lives here and in :mod:`~zaiproxy.mock.payloads`, so a test can
compute exactly what the mock sends for a request without a socket (the
h11 / hypercorn split: protocol decisions are pure, the shell only does I/O).

Order of decisions for one request:

1. ``x-mock-*`` headers parsed (malformed -> 400 in the route's API shape);
2. ``x-mock-echo`` -> 200 echo of what arrived (before routing and auth, so a
   proxy test sees exactly what was forwarded, credentials included);
3. route by path suffix (``/v1/...``, ``/api/paas/v4/...``,
   ``/api/coding/paas/v4/...``, ``/api/anthropic/v1/...`` all work), else 404;
4. authentication when ``MockOptions.api_key`` is set, mirroring Z.AI;
5. status / Z.AI-code controls from headers;
6. JSON body parsed (malformed -> 400), model-name controls merged under the
   headers, status / Z.AI-code controls from the model name (a model named by
   ``x-mock-congested-models`` gets Z.AI's 1312);
7. the route's normal answer.

``x-mock-fail-times: N`` with ``x-mock-fail-key: K`` makes steps 5-6 apply only
to the first N requests carrying K (Z.AI code 1302 when no status or code
control says which failure); later ones get the normal answer, so a proxy's
retry can be seen to succeed. Counting is state, so the server does it and
passes the count in (``seen``); the decision stays a function of its inputs.
The mock's own ``/mock/stats`` routes, Z.AI's quota endpoint and ``/mock/quota``
are answered by the server (:mod:`~zaiproxy.mock.stats`, :mod:`~zaiproxy.mock.quota`)
before any of this; a 200 generation without a fault reports its tokens in
``ResponsePlan.tokens`` for the server to charge to the sender's quota.

Delays, faults and the write split from the controls then apply to whatever
answer was chosen (so ``mock-slow-200`` also delays a 401).
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

from zaiproxy.mock import payloads
from zaiproxy.mock.controls import (
    MAX_CHUNK_SIZE,
    MAX_CHUNKS,
    MAX_DELAY,
    ControlError,
    Controls,
    Fault,
    Usage,
    WriteSplit,
    ZaiShape,
    check_text_size,
    parse_headers,
    parse_model,
)
from zaiproxy.mock.payloads import expected_text

__all__ = [
    "Fault",
    "MockOptions",
    "MockRequest",
    "ResponsePlan",
    "WriteSplit",
    "error_plan",
    "expected_text",
    "json_plan",
    "plan_response",
]

MAX_BODY_BYTES = 64 << 20
MAX_QUOTA = 1 << 62  # tokens; the quota state keeps signed 64-bit counters
QUOTA_LEVEL = re.compile(r"[A-Za-z0-9_.-]{1,24}")  # a plan tier fits the quota state's 24 bytes
# The failure of an x-mock-fail-times request that names none: 1302 (concurrency)
# is retried by the proxy and does not feed its adaptive rate limiter, so a retry
# test is not slowed down by the faults it injects.
DEFAULT_FAIL_CODE = 1302


@dataclass(frozen=True)
class MockOptions:
    """Process-wide defaults; ``x-mock-*`` headers and model names override per request."""

    chunks: int = 10
    chunk_size: int = 16  # bytes (= ASCII characters) of text per delta
    first_byte_delay: float = 0.0  # seconds before the response head
    chunk_delay: float = 0.0  # seconds between stream events
    api_key: str | None = None  # when set, requests must carry it (see module docstring)
    max_body_bytes: int = MAX_BODY_BYTES  # larger request bodies get 413
    # The quota endpoint (zaiproxy.mock.quota): each account's token allowance per
    # window and its plan tier, until POST /mock/quota changes them for one account.
    quota_five_hour: int = 4_000_000
    quota_weekly: int = 40_000_000
    quota_level: str = "pro"

    def __post_init__(self) -> None:
        # Checked here so a bad CLI flag fails at start with its name, not per request.
        if not 0 <= self.chunks <= MAX_CHUNKS:
            raise ValueError(f"chunks must be in [0, {MAX_CHUNKS}], got {self.chunks}")
        if not 1 <= self.chunk_size <= MAX_CHUNK_SIZE:
            raise ValueError(f"chunk_size must be in [1, {MAX_CHUNK_SIZE}], got {self.chunk_size}")
        check_text_size(self.chunks, self.chunk_size)
        for name in ("first_byte_delay", "chunk_delay"):
            value = getattr(self, name)
            if not 0.0 <= value <= MAX_DELAY:
                raise ValueError(f"{name} must be in [0, {MAX_DELAY:g}] seconds, got {value}")
        if self.max_body_bytes < 0:
            raise ValueError(f"max_body_bytes must be >= 0, got {self.max_body_bytes}")
        if self.api_key == "":
            raise ValueError("api_key must not be empty (use None for no authentication)")
        for name in ("quota_five_hour", "quota_weekly"):
            if not 1 <= getattr(self, name) <= MAX_QUOTA:
                raise ValueError(f"{name} must be in [1, {MAX_QUOTA}], got {getattr(self, name)}")
        if not QUOTA_LEVEL.fullmatch(self.quota_level):
            raise ValueError(
                f"quota_level must be 1 to 24 of [A-Za-z0-9_.-], got {self.quota_level!r}"
            )


@dataclass(frozen=True)
class MockRequest:
    method: bytes
    target: bytes
    http_version: bytes  # b"1.1" or b"1.0"
    headers: tuple[tuple[bytes, bytes], ...]  # lowercased names, in received order
    body: bytes = b""


@dataclass(frozen=True)
class ResponsePlan:
    """A response to send. Framing (content-length / chunked, connection) is added by
    :mod:`~zaiproxy.mock.wire`; ``events`` set means an SSE stream, one chunk per event."""

    status: int
    headers: tuple[tuple[bytes, bytes], ...] = ()
    body: bytes = b""
    events: tuple[bytes, ...] | None = None
    first_byte_delay: float = 0.0
    chunk_delay: float = 0.0
    fault: Fault | None = None
    write_split: WriteSplit | None = None
    seed: int = 0
    close: bool = False  # send `connection: close` and close after the response
    head_only: bool = False  # HEAD request: head with the body's framing, no body
    # Tokens this answer bills to the sender's quota (zaiproxy.mock.quota): prompt +
    # completion of a generation answered 200 with no fault; the server charges them.
    tokens: int = 0


_JSON = ((b"content-type", b"application/json"),)
_SSE = ((b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"))


def _json(status: int, body: bytes, extra: tuple[tuple[bytes, bytes], ...] = ()) -> ResponsePlan:
    return ResponsePlan(status, _JSON + extra, body)


def _api_error(status: int, anthropic: bool, message: str, code: str | None = None) -> ResponsePlan:
    if anthropic:
        return _json(status, payloads.anthropic_error(status, message))
    return _json(status, payloads.openai_error(status, message, code))


def json_plan(
    request: MockRequest, status: int, body: bytes, headers: tuple[tuple[bytes, bytes], ...] = ()
) -> ResponsePlan:
    """A JSON answer outside the API routes (the server's ``/mock/stats``)."""
    return ResponsePlan(
        status,
        _JSON + headers,
        body,
        close=_wants_close(request, dict(request.headers)),
        head_only=request.method == b"HEAD",
    )


def error_plan(status: int, message: str, *, close: bool = True) -> ResponsePlan:
    """An OpenAI-shaped error outside any route (bad HTTP, body over the cap)."""
    return dataclasses.replace(_api_error(status, False, message), close=close)


# --- routes -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Call:
    """What a route handler gets once the body is parsed."""

    payload: dict[str, Any]
    model: str
    rid: str
    chunks: int
    chunk_size: int
    prompt: int
    stream: bool
    usage: str  # a payloads.USAGE_MODES value


Handler = Callable[[_Call], ResponsePlan]


def _generation(
    whole: Callable[[str, str, int, int, int, str], bytes],
    events: Callable[[str, str, int, int, int, str], list[bytes]],
) -> Handler:
    def handle(c: _Call) -> ResponsePlan:
        args = (c.rid, c.model, c.chunks, c.chunk_size, c.prompt, c.usage)
        tokens = c.prompt + c.chunks  # what the usage reports (whatever x-mock-usage hides)
        if c.stream:
            return ResponsePlan(200, _SSE, events=tuple(events(*args)), tokens=tokens)
        return ResponsePlan(200, _JSON, whole(*args), tokens=tokens)

    return handle


def _embeddings(c: _Call) -> ResponsePlan:
    raw = c.payload.get("input")
    if isinstance(raw, str) or (isinstance(raw, list) and raw and isinstance(raw[0], int)):
        items: list[Any] = [raw]  # one string, or one pre-tokenized input
    elif isinstance(raw, list):
        items = raw
    else:
        return _api_error(400, False, "'input' must be a string or an array")
    base64_format = c.payload.get("encoding_format") == "base64"
    return _json(200, payloads.embeddings(c.model, items, c.prompt, base64_format))


def _count_tokens(c: _Call) -> ResponsePlan:
    return _json(200, payloads.count_tokens(c.prompt))


@dataclass(frozen=True)
class _Route:
    suffix: bytes
    method: bytes
    anthropic: bool
    handler: Handler | None  # None: no body to parse (GET)


# Longest suffix first: "/chat/completions" also ends with "/completions".
_ROUTES = (
    _Route(b"/messages/count_tokens", b"POST", True, _count_tokens),
    _Route(
        b"/messages",
        b"POST",
        True,
        _generation(payloads.anthropic_message, payloads.anthropic_events),
    ),
    _Route(
        b"/chat/completions",
        b"POST",
        False,
        _generation(payloads.chat_completion, payloads.chat_events),
    ),
    _Route(
        b"/completions",
        b"POST",
        False,
        _generation(payloads.text_completion, payloads.text_completion_events),
    ),
    _Route(b"/embeddings", b"POST", False, _embeddings),
    _Route(b"/models", b"GET", False, None),
)


def _match(method: bytes, path: bytes) -> _Route | None:
    path = path.rstrip(b"/")
    for route in _ROUTES:
        if path.endswith(route.suffix):
            return route if method == route.method else None
    return None


# --- authentication -----------------------------------------------------------------------


def _authenticate(route: _Route, headers: dict[bytes, bytes], key: str) -> ResponsePlan | None:
    """Z.AI's rules: Bearer on OpenAI paths, ``x-api-key`` on Anthropic paths, where a
    Bearer-only request got a bare 404 from the WAF (DESIGN: lessons of the old proxy)."""
    expected = key.encode()
    if route.anthropic:
        given = headers.get(b"x-api-key")
        if given is None and headers.get(b"authorization", b"")[:7].lower() == b"bearer ":
            return ResponsePlan(404)
        if given is None or not hmac.compare_digest(given, expected):
            return _api_error(401, True, "invalid x-api-key")
        return None
    auth = headers.get(b"authorization", b"")
    if auth[:7].lower() != b"bearer " or not hmac.compare_digest(auth[7:].strip(), expected):
        return _api_error(401, False, "Incorrect API key provided", "invalid_api_key")
    return None


# --- status controls ----------------------------------------------------------------------


def _status_reply(c: Controls, anthropic: bool, seen: int, *, final: bool) -> ResponsePlan | None:
    """The status / Z.AI-code answer the controls ask for, if any. ``final``: the
    model name is merged in, so a fail-times request without a named failure
    gets the default one now."""
    if c.fail_times is not None:
        if seen > c.fail_times:
            return None  # the failures are used up: answer normally
        if c.zai_code is None and c.status is None:
            if not final:
                return None
            c = dataclasses.replace(c, zai_code=DEFAULT_FAIL_CODE)
    retry = c.retry_after
    if c.zai_code is not None:
        retry = "1" if retry is None else retry  # default: Z.AI-like "try again in 1 s"
        shape = (c.zai_shape or ZaiShape.OPENAI).value
        plan = _json(429, payloads.zai_error(c.zai_code, shape, c.zai_retry_after_body))
    elif c.status is not None:
        plan = _api_error(c.status, anthropic, f"mock status {c.status}")
    else:
        return None
    if retry is not None and retry.lower() != "none":
        plan = dataclasses.replace(plan, headers=(*plan.headers, (b"retry-after", retry.encode())))
    return plan


# --- echo ---------------------------------------------------------------------------------


def _echo(request: MockRequest) -> ResponsePlan:
    return _json(
        200,
        orjson.dumps(
            {
                "method": request.method.decode("latin-1"),
                "target": request.target.decode("latin-1"),
                "http_version": request.http_version.decode("latin-1"),
                "headers": [[n.decode("latin-1"), v.decode("latin-1")] for n, v in request.headers],
                "body_len": len(request.body),
                "body_sha256": hashlib.sha256(request.body).hexdigest(),
            }
        ),
    )


# --- the decision -------------------------------------------------------------------------


def _wants_close(request: MockRequest, headers: dict[bytes, bytes]) -> bool:
    connection = headers.get(b"connection", b"").lower()
    if request.http_version == b"1.0":
        return b"keep-alive" not in connection
    return b"close" in connection


def _answer(
    request: MockRequest, headers: dict[bytes, bytes], options: MockOptions, rid: str, seen: int
) -> tuple[ResponsePlan, Controls]:
    path = request.target.split(b"?", 1)[0]
    route = _match(request.method, path)
    anthropic = (
        route.anthropic
        if route
        else path.rstrip(b"/").endswith((b"/messages", b"/messages/count_tokens"))
    )
    try:
        controls = parse_headers(headers)
    except ControlError as exc:
        return _api_error(400, anthropic, str(exc)), Controls()
    if controls.echo:
        return _echo(request), controls
    if route is None:
        method, target = request.method.decode("latin-1"), path.decode("latin-1")
        return _api_error(404, False, f"no route for {method} {target}"), controls
    if options.api_key is not None:
        denied = _authenticate(route, headers, options.api_key)
        if denied is not None:
            return denied, controls
    reply = _status_reply(controls, route.anthropic, seen, final=route.handler is None)
    if reply is not None:
        return reply, controls
    if route.handler is None:
        return _json(200, payloads.MODELS_BODY), controls
    try:
        payload = orjson.loads(request.body)
    except orjson.JSONDecodeError as exc:
        return _api_error(400, route.anthropic, f"request body is not valid JSON: {exc}"), controls
    if not isinstance(payload, dict):
        return _api_error(400, route.anthropic, "request body must be a JSON object"), controls
    model = payload.get("model")
    model = model if isinstance(model, str) else "glm-4.6"
    try:
        controls = controls.overlay(parse_model(model))
        chunks = options.chunks if controls.chunks is None else controls.chunks
        size = options.chunk_size if controls.chunk_size is None else controls.chunk_size
        check_text_size(chunks, size)
    except ControlError as exc:
        return _api_error(400, route.anthropic, str(exc)), controls
    if controls.congested_models is not None and model in controls.congested_models:
        controls = dataclasses.replace(controls, zai_code=1312)
    reply = _status_reply(controls, route.anthropic, seen, final=True)
    if reply is not None:
        return reply, controls
    call = _Call(
        payload,
        model,
        rid,
        chunks,
        size,
        payloads.prompt_tokens(request.body),
        payload.get("stream") is True,
        (controls.usage or Usage.FINAL).value,
    )
    return route.handler(call), controls


def plan_response(request: MockRequest, options: MockOptions, *, seen: int = 1) -> ResponsePlan:
    """The complete, deterministic answer to ``request``.

    ``seen``: how many requests carrying this request's ``x-mock-fail-key`` the
    server has received, this one included (it decides ``x-mock-fail-times``).
    """
    headers = dict(request.headers)
    rid = payloads.request_id(request.method, request.target, request.body)
    plan, c = _answer(request, headers, options, rid, seen)
    # Built directly rather than with dataclasses.replace: this runs per request.
    return ResponsePlan(
        status=plan.status,
        headers=(*plan.headers, (b"x-request-id", rid.encode())),
        body=plan.body,
        events=plan.events,
        first_byte_delay=(
            options.first_byte_delay if c.first_byte_delay is None else c.first_byte_delay
        ),
        chunk_delay=options.chunk_delay if c.chunk_delay is None else c.chunk_delay,
        fault=c.fault,
        write_split=c.write_split,
        seed=c.seed or 0,
        close=_wants_close(request, headers),
        head_only=request.method == b"HEAD",
        tokens=plan.tokens if c.fault is None else 0,
    )
