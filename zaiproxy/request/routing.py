"""Request routing: a pure function from (method, target) to a Route.

Paths are normalised before matching and no path may escape its upstream
base: ``..`` segments (raw or percent-encoded), encoded slashes and
backslashes, NUL/control bytes, and any target that is not origin-form
(``http://host/...``, ``host:port``, ``*``) are rejected with 400. Duplicate
slashes and ``.`` segments are removed (nginx's ``merge_slashes`` does the
same), and the *normalised* path is what goes upstream, so the upstream can
never see a path the proxy did not match. The query string is kept as sent
(Claude Code sends ``/v1/messages?beta=true``).
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

from zaiproxy.core.errors import Api, BadRequest, MethodNotAllowed, NotFound


class Upstream(enum.Enum):
    OPENAI = "openai"        # base default https://api.z.ai/api/paas/v4
    ANTHROPIC = "anthropic"  # base default https://api.z.ai/api/anthropic
    NATIVE = "native"        # origin default https://api.z.ai (Z.AI's own paths)


class Control(enum.Enum):
    HEALTH = "health"
    READY = "ready"
    METRICS = "metrics"
    RESET_RATE_LIMIT = "reset-rate-limit"
    STATUS = "status"
    HISTORY = "history"
    KEYS = "keys"
    EVENTS = "events"


@dataclass(frozen=True, slots=True)
class Route:
    """Where a request goes and what it is: every fact about a route is decided here, once.

    ``template`` is the bounded name used in logs and metrics.
    """

    template: str
    api: Api
    upstream: Upstream | None = None
    upstream_path: str = ""  # appended to the upstream base, query string included
    reads_json: bool = False  # the proxy parses the body (and rejects invalid JSON)
    control: Control | None = None
    generates_output: bool = False  # a completion: its output cap is reserved as tokens
    count_tokens: bool = False  # /messages/count_tokens (may be answered locally)


# Upstream endpoints that generate output tokens, and the token-counting one.
_GENERATING = ("/chat/completions", "/completions", "/messages")
_COUNT_TOKENS = "/messages/count_tokens"


def _route(template: str, api: Api, upstream: Upstream, upstream_path: str, reads_json: bool,
           query: str = "") -> Route:
    return Route(template, api, upstream, upstream_path + query, reads_json,
                 generates_output=upstream_path.endswith(_GENERATING),
                 count_tokens=upstream_path.endswith(_COUNT_TOKENS))


# (method, path) -> (template, api, upstream, path-on-upstream-base, reads_json)
_EXACT: dict[tuple[str, str], Route] = {}


def _add(method: str, path: str, api: Api, upstream: Upstream, up_path: str, reads_json: bool) -> None:
    _EXACT[(method, path)] = _route(path, api, upstream, up_path, reads_json)


_add("POST", "/v1/chat/completions", Api.OPENAI, Upstream.OPENAI, "/chat/completions", True)
_add("POST", "/v1/completions", Api.OPENAI, Upstream.OPENAI, "/completions", True)
_add("POST", "/v1/embeddings", Api.OPENAI, Upstream.OPENAI, "/embeddings", True)
_add("GET", "/v1/models", Api.OPENAI, Upstream.OPENAI, "/models", False)
_add("POST", "/v1/messages", Api.ANTHROPIC, Upstream.ANTHROPIC, "/v1/messages", True)
_add("POST", "/v1/messages/count_tokens", Api.ANTHROPIC, Upstream.ANTHROPIC,
     "/v1/messages/count_tokens", True)

_CONTROL = {
    "/health": Route("/health", Api.OPENAI, control=Control.HEALTH),
    "/ready": Route("/ready", Api.OPENAI, control=Control.READY),
    "/metrics": Route("/metrics", Api.OPENAI, control=Control.METRICS),
    "/admin/status": Route("/admin/status", Api.OPENAI, control=Control.STATUS),
    "/admin/history": Route("/admin/history", Api.OPENAI, control=Control.HISTORY),
    "/admin/keys": Route("/admin/keys", Api.OPENAI, control=Control.KEYS),
    "/admin/events": Route("/admin/events", Api.OPENAI, control=Control.EVENTS),
}

# Admin actions (POST; token-protected when an admin token is configured).
_ADMIN = {
    "/admin/reset-rate-limit": Route("/admin/reset-rate-limit", Api.OPENAI,
                                     control=Control.RESET_RATE_LIMIT),
}

_ALLOWED: dict[str, list[str]] = {}
for _method, _path in _EXACT:
    _ALLOWED.setdefault(_path, []).append(_method)
for _path in _CONTROL:
    _ALLOWED[_path] = ["GET", "HEAD"]
for _path in _ADMIN:
    _ALLOWED[_path] = ["POST"]

# Z.AI's own prefixes pass through unchanged to the native origin.
_NATIVE_PREFIXES: tuple[tuple[str, Api], ...] = (
    ("/api/paas/v4/", Api.OPENAI),
    ("/api/coding/paas/v4/", Api.OPENAI),
    ("/api/anthropic/", Api.ANTHROPIC),
)
# Endpoints under the native prefixes whose JSON bodies the proxy reads
# (the same ones it reads on the /v1 routes).
_JSON_SUFFIXES = ("/chat/completions", "/completions", "/embeddings", "/messages",
                  "/messages/count_tokens")

_HEX = "0123456789abcdefABCDEF"


_FORBIDDEN = re.compile(r'[\x00-\x20\x7f\\"<>`{|}^#]')
_ESCAPE = re.compile(r"%(..)?", re.S)


def normalise_path(raw: str) -> str:
    """Normalise an origin-form path or raise BadRequest if it could escape its base."""
    if not raw.startswith("/"):
        raise BadRequest("request target must be an absolute path (origin-form)")
    if _FORBIDDEN.search(raw):
        raise BadRequest("request path contains a forbidden character")
    if "%" in raw:
        for match in _ESCAPE.finditer(raw):
            pair = match.group(1)
            if pair is None or pair[0] not in _HEX or pair[1] not in _HEX:
                raise BadRequest("request path has a malformed percent-escape")
            byte = int(pair, 16)
            # Encoded separators or dots let a path change shape after the
            # proxy matched it (CVE-2021-41773 style); nothing legitimate needs them.
            if byte in (0x2F, 0x5C, 0x2E) or byte < 0x20 or byte == 0x7F:
                raise BadRequest("request path contains an encoded separator, dot or control byte")
    if "//" not in raw and "/." not in raw:
        return raw  # already canonical: the common case costs two scans
    segments: list[str] = []
    for seg in raw.split("/")[1:]:
        if seg in ("", "."):
            continue
        if seg == "..":
            raise BadRequest("request path may not contain '..' segments")
        segments.append(seg)
    return "/" + "/".join(segments)


def split_target(target: str) -> tuple[str, str]:
    """(path, query-with-leading-?) of an origin-form target."""
    if target.startswith("/"):
        path, sep, query = target.partition("?")
        query, _, _ = query.partition("#")
        return path, (sep + query) if query or sep else ""
    if target == "*":
        raise BadRequest("asterisk-form request targets are not supported")
    raise BadRequest("absolute-form and authority-form request targets are not accepted by this proxy")


def resolve(method: str, target: str) -> Route:
    """Route a request or raise BadRequest / NotFound / MethodNotAllowed."""
    raw_path, query = split_target(target)
    path = normalise_path(raw_path)
    route = _EXACT.get((method, path))
    if route is not None:
        if query:
            return Route(route.template, route.api, route.upstream, route.upstream_path + query,
                         route.reads_json, generates_output=route.generates_output,
                         count_tokens=route.count_tokens)
        return route
    control = _CONTROL.get(path)
    if control is not None and method in ("GET", "HEAD"):
        return control
    admin = _ADMIN.get(path)
    if admin is not None and method == "POST":
        return admin
    if path.startswith("/v1/models/") and method == "GET" and path.count("/") == 3:
        return _route("/v1/models/{model}", Api.OPENAI, Upstream.OPENAI, path[3:], False, query)
    for prefix, api in _NATIVE_PREFIXES:
        if path.startswith(prefix) or path + "/" == prefix:
            reads = method == "POST" and path.endswith(_JSON_SUFFIXES)
            return _route(prefix + "*", api, Upstream.NATIVE, path, reads, query)
    allowed = _ALLOWED.get(path)
    if allowed:
        raise MethodNotAllowed(
            f"method {safe_method(method)} is not allowed on {path}",
            headers=((b"allow", ", ".join(allowed).encode()),),
        )
    raise NotFound(f"no route for {safe_method(method)} {redact_path(path)}")


# Path segments a 404 may name: the words of the proxy's own routes. Anything else a
# client put in a path (an API key pasted into a URL, a 60 KiB segment) is shown as `*`,
# so a 404's message — in its body, the access log and the history's `error` column —
# never carries client text and stays short.
_KNOWN_SEGMENTS: frozenset[str] = frozenset(
    seg
    for path in (*(p for _, p in _EXACT), *_CONTROL, *_ADMIN, *(p for p, _ in _NATIVE_PREFIXES))
    for seg in path.split("/")
    if seg
) | {"v1", "v2", "v3", "v4", "api", "models"}
_MAX_SEGMENTS = 8
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE",
                      "CONNECT"})


def redact_path(path: str) -> str:
    """A bounded form of a request path that holds no client text (for errors and logs).

    >>> redact_path("/v1/chat/completion/sk-live-0123456789abcdef")
    '/v1/chat/*/*'
    """
    segments = path.split("?", 1)[0].split("/")[1:]
    shown = [seg if not seg or seg in _KNOWN_SEGMENTS else "*" for seg in segments[:_MAX_SEGMENTS]]
    if len(segments) > _MAX_SEGMENTS:
        shown.append("…")
    return "/" + "/".join(shown)


def safe_method(method: str) -> str:
    """The method as logged: a standard one as sent, any other client token as `other`."""
    return method if method in _METHODS else "other"
