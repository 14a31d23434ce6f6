"""Per-request controls of the mock: ``x-mock-*`` headers and ``mock-*`` model names.

Headers serve tests and benchmarks that build requests by hand; model names serve
people driving the mock through an SDK or an agent, which can set a model but
rarely a header. Both parse into the same :class:`Controls`, where ``None``
means "not given", so :meth:`Controls.overlay` can let a header win over the
model name and the :class:`~zaiproxy.mock.behaviour.MockOptions` defaults
fill what neither gave.

A malformed control is a :class:`ControlError` (the mock answers 400) rather
than being ignored: a benchmark that silently ran without its fault would
measure the wrong thing.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TypeVar

E = TypeVar("E", bound=enum.Enum)


class Fault(enum.Enum):
    RESET_BEFORE_HEADERS = "reset-before-headers"
    RESET_MID_STREAM = "reset-mid-stream"
    CLOSE_MID_BODY = "close-mid-body"
    STALL_HEADERS = "stall-headers"
    STALL = "stall"


class WriteSplit(enum.Enum):
    ONE = "one"  # head, then the body in one write
    BYTES = "bytes"  # head, then every body byte as its own write
    RANDOM = "random"  # head, then body writes of random sizes (x-mock-seed)
    LARGE = "large"  # head and the whole body in a single write, chunk delays ignored


class ZaiShape(enum.Enum):
    """The envelope of a Z.AI 429 body (``x-mock-zai-shape``); see ``payloads.zai_error``."""

    OPENAI = "openai"  # {"error": {"code": "1302", "message": ...}} (the default)
    NATIVE = "native"  # {"code": 1302, "msg": ..., "success": false}
    ANTHROPIC = "anthropic"  # {"type": "error", "error": {..., "message": "[1302] ..."}}


class QuotaShape(enum.Enum):
    """How the quota endpoint answers (``x-mock-quota-shape``, or per account through
    ``POST /mock/quota``); see :mod:`zaiproxy.mock.quota`."""

    OK = "ok"  # Z.AI's normal answer, the account's real usage
    ERROR = "error"  # HTTP 200, {"code": 500, "msg": "internal error", "success": false}
    MALFORMED = "malformed"  # HTTP 200, {"code": 200, "success": true, "data": {}}
    HTTP500 = "http500"  # HTTP 500 with a text body
    OVERSIZED = "oversized"  # valid JSON longer than 64 KiB
    SLOW = "slow"  # the normal answer after 10 s (poll timeouts)


class Usage(enum.Enum):
    """Where a stream reports token usage (``x-mock-usage``); see ``payloads``."""

    FINAL = "final"  # on the last event (finish_reason chunk / message_delta); the default
    SEPARATE = "separate"  # OpenAI streams: an extra ``"choices":[]`` chunk before [DONE]
    NONE = "none"  # no usage (Anthropic: zeros in message_start); whole bodies drop it


class ControlError(ValueError):
    """A control header or model name that cannot be honoured (answered with 400)."""


# Upper bounds keep one request from asking the mock for gigabytes or hours.
MAX_CHUNKS = 1_000_000
MAX_CHUNK_SIZE = 1 << 20
MAX_TEXT_BYTES = 64 << 20
MAX_DELAY = 3600.0
MAX_FAIL_TIMES = 1_000_000
MAX_FAIL_KEY = 200  # characters; a key is a test's token, not a document


@dataclass(frozen=True)
class Controls:
    chunks: int | None = None
    chunk_size: int | None = None
    first_byte_delay: float | None = None
    chunk_delay: float | None = None
    status: int | None = None
    zai_code: int | None = None
    zai_shape: ZaiShape | None = None  # envelope of the Z.AI body; None = openai
    zai_retry_after_body: float | None = None  # "retry_after" inside the Z.AI body
    retry_after: str | None = None  # raw header value; "none" = send no Retry-After
    fault: Fault | None = None
    write_split: WriteSplit | None = None
    usage: Usage | None = None  # None = final
    quota_shape: QuotaShape | None = None  # the quota endpoint's answer; None = the account's
    # x-mock-quota-enforce: 1: a spent account's request gets Z.AI's 1308 (the server checks)
    quota_enforce: bool | None = None
    seed: int | None = None
    echo: bool = False
    # Fail the first fail_times requests carrying fail_key, then answer normally.
    # fail_key alone only counts requests (GET /mock/stats "by_key").
    fail_key: str | None = None
    fail_times: int | None = None
    # Answer Z.AI's 1312 (model congestion) to requests for these models, and normally to
    # others (x-mock-congested-models: glm-4.6,glm-4.7): a model fallback can be seen to work.
    congested_models: frozenset[str] | None = None

    def overlay(self, under: Controls) -> Controls:
        """Fields given here win; the rest come from ``under``."""
        if under is NO_CONTROLS:  # the common case: a model name without controls
            return self
        merged = {
            f.name: getattr(self, f.name)
            if getattr(self, f.name) is not None
            else getattr(under, f.name)
            for f in dataclasses.fields(self)
        }
        merged["echo"] = self.echo or under.echo
        return Controls(**merged)


NO_CONTROLS = Controls()


def _int(name: str, raw: bytes, low: int, high: int) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise ControlError(f"{name} must be an integer, got {raw!r}") from None
    if not low <= value <= high:
        raise ControlError(f"{name} must be in [{low}, {high}], got {value}")
    return value


def _seconds(name: str, raw: bytes) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise ControlError(f"{name} must be a number of seconds, got {raw!r}") from None
    if not (math.isfinite(value) and 0.0 <= value <= MAX_DELAY):
        raise ControlError(f"{name} must be in [0, {MAX_DELAY:g}] seconds, got {raw!r}")
    return value


def _enum(kind: type[E], name: str, raw: bytes) -> E:
    try:
        return kind(raw.decode("ascii", "replace").strip().lower())
    except ValueError:
        allowed = ", ".join(str(m.value) for m in kind)
        raise ControlError(f"{name} must be one of {allowed}, got {raw!r}") from None


def _status(name: str, raw: bytes) -> int:
    status = _int(name, raw, 200, 599)
    if status in (204, 304):  # these must not carry the error body we send
        raise ControlError(f"{name} cannot be {status}")
    return status


def parse_headers(headers: Mapping[bytes, bytes]) -> Controls:
    """Controls from ``x-mock-*`` headers (names lowercased, as h11 gives them)."""
    fields: dict[str, object] = {}
    for name, raw in headers.items():
        if not name.startswith(b"x-mock-"):
            continue
        key = name.decode("ascii")
        if name == b"x-mock-chunks":
            fields["chunks"] = _int(key, raw, 0, MAX_CHUNKS)
        elif name == b"x-mock-chunk-size":
            fields["chunk_size"] = _int(key, raw, 1, MAX_CHUNK_SIZE)
        elif name == b"x-mock-first-byte-delay":
            fields["first_byte_delay"] = _seconds(key, raw)
        elif name == b"x-mock-chunk-delay":
            fields["chunk_delay"] = _seconds(key, raw)
        elif name == b"x-mock-status":
            fields["status"] = _status(key, raw)
        elif name == b"x-mock-zai-code":
            fields["zai_code"] = _int(key, raw, 1000, 9999)
        elif name == b"x-mock-zai-shape":
            fields["zai_shape"] = _enum(ZaiShape, key, raw)
        elif name == b"x-mock-zai-retry-after-body":
            fields["zai_retry_after_body"] = _seconds(key, raw)
        elif name == b"x-mock-fail-key":
            fields["fail_key"] = fail_key(raw)
        elif name == b"x-mock-fail-times":
            fields["fail_times"] = _int(key, raw, 0, MAX_FAIL_TIMES)
        elif name == b"x-mock-retry-after":
            fields["retry_after"] = raw.decode("latin-1").strip()
        elif name == b"x-mock-fault":
            fields["fault"] = _enum(Fault, key, raw)
        elif name == b"x-mock-write-split":
            fields["write_split"] = _enum(WriteSplit, key, raw)
        elif name == b"x-mock-usage":
            fields["usage"] = _enum(Usage, key, raw)
        elif name == b"x-mock-quota-shape":
            fields["quota_shape"] = _enum(QuotaShape, key, raw)
        elif name == b"x-mock-seed":
            fields["seed"] = _int(key, raw, 0, 2**63 - 1)
        elif name == b"x-mock-echo":
            fields["echo"] = raw.strip().lower() in (b"1", b"true", b"yes")
        elif name == b"x-mock-quota-enforce":
            if raw.strip() != b"1":
                raise ControlError("x-mock-quota-enforce takes 1")
            fields["quota_enforce"] = True
        elif name == b"x-mock-congested-models":
            fields["congested_models"] = congested_models(raw)
        else:
            raise ControlError(f"unknown control header {key}")
    if "fail_times" in fields and "fail_key" not in fields:
        # Without a key there is nothing to count the failures against.
        raise ControlError("x-mock-fail-times needs x-mock-fail-key")
    return Controls(**fields) if fields else NO_CONTROLS  # type: ignore[arg-type]


def fail_key(raw: bytes) -> str:
    """The ``x-mock-fail-key`` token (the server also reads it, to count per key)."""
    key = raw.decode("latin-1").strip()
    if not 1 <= len(key) <= MAX_FAIL_KEY:
        raise ControlError(f"x-mock-fail-key must be 1 to {MAX_FAIL_KEY} characters")
    return key


def congested_models(raw: bytes) -> frozenset[str]:
    """The ``x-mock-congested-models`` list: model names, comma-separated."""
    names = frozenset(n.strip() for n in raw.decode("latin-1").split(",") if n.strip())
    if not names:
        raise ControlError("x-mock-congested-models must name at least one model")
    return names


_MODEL = re.compile(
    r"mock-(?:status-(?P<status>\d{3})|zai-(?P<zai>\d{4})(?:-(?P<shape>openai|native|anthropic))?"
    r"|slow-(?P<slow>\d+)|usage-(?P<usage>final|separate|none)"
    r"|(?P<reset>reset)|(?P<stall>stall))"
)


def parse_model(model: str) -> Controls:
    """Controls encoded in a model name: ``mock-status-503``, ``mock-zai-1303``,
    ``mock-zai-1302-anthropic`` (code and body shape), ``mock-reset`` (reset-mid-stream), ``mock-stall`` (stall), ``mock-slow-250`` (ms),
    ``mock-usage-separate`` (``x-mock-usage``: final, separate or none)."""
    if not model.startswith("mock-"):
        return NO_CONTROLS
    match = _MODEL.fullmatch(model)
    if match is None:
        return NO_CONTROLS  # any other "mock-..." name is just a model name
    if match["status"]:
        return Controls(status=_status("model mock-status", match["status"].encode()))
    if match["zai"]:
        shape = ZaiShape(match["shape"]) if match["shape"] else None
        return Controls(zai_code=int(match["zai"]), zai_shape=shape)
    if match["slow"]:
        millis = _int("model mock-slow", match["slow"].encode(), 0, int(MAX_DELAY * 1000))
        return Controls(first_byte_delay=millis / 1000)
    if match["usage"]:
        return Controls(usage=Usage(match["usage"]))
    if match["reset"]:
        return Controls(fault=Fault.RESET_MID_STREAM)
    return Controls(fault=Fault.STALL)


def check_text_size(chunks: int, chunk_size: int) -> None:
    if chunks * chunk_size > MAX_TEXT_BYTES:
        raise ControlError(
            f"x-mock-chunks * x-mock-chunk-size must be <= {MAX_TEXT_BYTES}, "
            f"got {chunks} * {chunk_size}"
        )
