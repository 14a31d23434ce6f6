"""zaiproxy.core.logs: JSON lines, level filtering, redaction, bounded queue, flush.

The writer is a real thread; tests synchronise with it through flush() and threading.Event,
never with sleeps.
"""

from __future__ import annotations

import io
import os
import re
import threading
import time
from collections.abc import Iterator
from typing import Any

import h11
import orjson
import pytest

from zaiproxy.core import logs
from zaiproxy.core.logs import Logger, configure, get_logger

TS = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


class BlockingStream(io.BytesIO):
    """A stream whose write() waits until the test releases it."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = threading.Event()
        self.release = threading.Event()

    def write(self, data: Any) -> int:
        self.entered.set()
        assert self.release.wait(10), "test never released the stream"
        return super().write(data)


class BrokenStream(io.BytesIO):
    def write(self, data: Any) -> int:
        raise BrokenPipeError(32, "Broken pipe")


def lines(stream: io.BytesIO) -> list[dict[str, Any]]:
    raw = stream.getvalue()
    assert raw.endswith(b"\n") or raw == b""
    return [orjson.loads(line) for line in raw.splitlines()]


@pytest.fixture
def stream() -> io.BytesIO:
    return io.BytesIO()


@pytest.fixture
def logger(stream: io.BytesIO) -> Iterator[Logger]:
    log = Logger("debug", proc="worker-1", stream=stream)
    yield log
    log.close()


def test_lines_are_json_with_the_envelope(logger: Logger, stream: io.BytesIO) -> None:
    logger.info("request", status=200, route="/v1/messages", latency_ms=12.5, ok=True, model=None)
    logger.flush()
    [line] = lines(stream)
    assert list(line)[:5] == ["ts", "level", "event", "proc", "pid"]
    assert TS.fullmatch(line["ts"])
    assert line == {
        "ts": line["ts"],
        "level": "info",
        "event": "request",
        "proc": "worker-1",
        "pid": os.getpid(),
        "status": 200,
        "route": "/v1/messages",
        "latency_ms": 12.5,
        "ok": True,
        "model": None,
    }


def test_timestamp_is_utc_with_milliseconds() -> None:
    assert logs._timestamp(0.5) == "1970-01-01T00:00:00.500Z"
    assert logs._timestamp(1_800_000_000.0) == "2027-01-15T08:00:00.000Z"
    assert logs._timestamp(1_800_000_000.999) == "2027-01-15T08:00:00.999Z"


def test_each_level_and_its_name(logger: Logger, stream: io.BytesIO) -> None:
    logger.debug("a")
    logger.info("b")
    logger.warning("c")
    logger.error("d")
    logger.flush()
    assert [(x["level"], x["event"]) for x in lines(stream)] == [
        ("debug", "a"),
        ("info", "b"),
        ("warning", "c"),
        ("error", "d"),
    ]


def test_level_filtering(stream: io.BytesIO) -> None:
    log = Logger("WARNING", stream=stream)
    try:
        log.debug("no")
        log.info("no")
        log.warning("yes")
        log.error("yes")
        log.flush()
        assert [x["level"] for x in lines(stream)] == ["warning", "error"]
        assert [log.enabled(level) for level in ("debug", "info", "warning", "error")] == [
            False,
            False,
            True,
            True,
        ]
    finally:
        log.close()


def test_unknown_level_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown log level 'verbose'"):
        Logger("verbose", stream=io.BytesIO())


@pytest.mark.parametrize(
    "name",
    [
        "authorization",
        "Authorization",
        "x-api-key",
        "X-Api-Key",
        "api_key",
        "apikey",
        "APIKEY",
        "token",
        "password",
        "secret",
        "upstream_key",
        "ZAI_API_KEY",
        "refresh_token",
        "admin_token",
    ],
)
def test_secret_fields_are_redacted(logger: Logger, stream: io.BytesIO, name: str) -> None:
    logger.info("x", **{name: "sk-secret-value"})
    logger.flush()
    assert b"sk-secret-value" not in stream.getvalue()
    assert lines(stream)[0][name] == "[redacted]"


@pytest.mark.parametrize("name", ["max_tokens", "tokens", "key_alias", "keys", "status"])
def test_ordinary_fields_are_kept(logger: Logger, stream: io.BytesIO, name: str) -> None:
    logger.info("x", **{name: 7})
    logger.flush()
    assert lines(stream)[0][name] == 7


def test_secrets_inside_dicts_and_header_lists_are_redacted(
    logger: Logger, stream: io.BytesIO
) -> None:
    request = h11.Request(
        method="POST",
        target="/v1/messages",
        headers=[("Host", "x"), ("X-Api-Key", "sk-one"), ("Authorization", "Bearer sk-two")],
    )
    logger.info(
        "x",
        headers=request.headers,
        upstream={"url": "https://u", "auth": {"api_key": "sk-three"}},
        pairs=[("token", "sk-four"), ("model", "glm-4.6")],
    )
    logger.flush()
    raw = stream.getvalue()
    for secret in (b"sk-one", b"sk-two", b"sk-three", b"sk-four"):
        assert secret not in raw
    [line] = lines(stream)
    assert line["headers"] == [["host", "x"], ["x-api-key", "[redacted]"],
                               ["authorization", "[redacted]"]]  # fmt: skip
    assert line["upstream"] == {"url": "https://u", "auth": {"api_key": "[redacted]"}}
    assert line["pairs"] == [["token", "[redacted]"], ["model", "glm-4.6"]]


def test_unserializable_values_become_strings(logger: Logger, stream: io.BytesIO) -> None:
    class Thing:
        def __str__(self) -> str:
            return "thing!"

    logger.info("x", thing=Thing(), raw=b"ab\xff", counts={1: 2}, ok=1)
    logger.info("y", big=2**70, small=3)  # orjson rejects >64-bit ints without calling default
    logger.flush()
    first, second = lines(stream)
    assert (first["thing"], first["raw"], first["counts"], first["ok"]) == (
        "thing!",
        "ab\\xff",
        {"1": 2},
        1,
    )
    assert (second["big"], second["small"]) == (str(2**70), 3)


def test_fields_cannot_overwrite_the_envelope(logger: Logger, stream: io.BytesIO) -> None:
    logger.info("x", level="fake", pid=1, ts="then", proc="other")
    logger.flush()
    [line] = lines(stream)
    assert (line["level"], line["pid"], line["proc"]) == ("info", os.getpid(), "worker-1")
    assert (line["_level"], line["_pid"], line["_ts"], line["_proc"]) == ("fake", 1, "then", "other")


def test_full_queue_drops_and_counts() -> None:
    stream = BlockingStream()
    log = Logger("info", stream=stream, queue_size=3)
    try:
        log.info("first")
        assert stream.entered.wait(10)  # the writer now holds "first" inside write()
        for i in range(3):
            log.info("queued", i=i)  # fills the queue: 3 slots
        for i in range(5):
            log.info("dropped", i=i)  # returns at once, counted
        log.debug("filtered")  # below the level: neither queued nor dropped
        assert log.dropped == 5
        stream.release.set()
        log.flush()
        assert [(x["event"], x.get("i")) for x in lines(stream)] == [
            ("first", None),
            ("queued", 0),
            ("queued", 1),
            ("queued", 2),
        ]
        assert log.dropped == 5
    finally:
        stream.release.set()
        log.close()


def test_flush_gives_up_on_a_stuck_stream() -> None:
    stream = BlockingStream()
    log = Logger("info", stream=stream, queue_size=1)
    try:
        log.info("first")
        assert stream.entered.wait(10)
        log.info("second")  # the queue is now full
        log.flush(timeout=0.01)  # returns instead of hanging process exit
        assert stream.getvalue() == b""
    finally:
        stream.release.set()
        log.close()
    assert [x["event"] for x in lines(stream)] == ["first", "second"]


def test_write_errors_are_counted_not_raised() -> None:
    log = Logger("info", stream=BrokenStream())
    try:
        log.info("a")
        log.info("b")
        log.flush()
        assert log.dropped == 2
    finally:
        log.close()


def test_flush_writes_everything_queued(logger: Logger, stream: io.BytesIO) -> None:
    for i in range(500):
        logger.info("n", i=i)
    logger.flush()
    assert [x["i"] for x in lines(stream)] == list(range(500))


def test_queue_size_must_be_positive() -> None:
    with pytest.raises(ValueError, match="queue_size"):
        Logger(stream=io.BytesIO(), queue_size=0)


def test_configure_updates_the_process_logger_in_place() -> None:
    held = get_logger()  # as a module would at import time
    first, second = io.BytesIO(), io.BytesIO()
    try:
        configure("warning", proc="worker-3", stream=first)
        assert get_logger() is held
        held.info("filtered")
        held.warning("kept")
        configure("debug", proc="recorder", stream=second)
        held.debug("moved")
        held.flush()
        assert [(x["event"], x["proc"]) for x in lines(first)] == [("kept", "worker-3")]
        assert [(x["event"], x["proc"]) for x in lines(second)] == [("moved", "recorder")]
    finally:
        configure()  # back to info on stderr for the rest of the session


def _record_fields() -> list[dict[str, object]]:
    from zaiproxy.core.record import RequestRecord, Usage

    full = RequestRecord(
        request_id="ab12cd3400000007", method="POST", route="/v1/chat/completions",
        api="openai", status=429, duration_s=0.0123456, bytes_in=97, client="10.0.0.7",
        model="glm-4.6", stream=True, upstream_status=429, upstream_ttfb_s=0.004, bytes_out=120,
        result="ok", retried=True, usage=Usage(12, 0, 3, 1), error="proxy rate limit: …",
        key_alias="team-a", tokens_estimated=True, prompt_estimate=14, zai_retries=2,
        zai_class="frequency", zai_code="1303")
    bare = RequestRecord(request_id="x", method="-", route="other", status=400,
                         duration_s=0.0, bytes_in=0, client="::1", error="invalid Host header")
    return [full.log_fields(), bare.log_fields()]


@pytest.mark.parametrize("fields", [
    *_record_fields(),
    {"authorization": "Bearer sk-secret", "status": 200},  # a credential's name
    {"headers": [(b"x-api-key", b"sk-secret"), (b"accept", b"*/*")]},  # scrubbed inside
    {"usage": {"api_key": "sk-secret", "input_tokens": 1}},  # a secret name one level down
    {"usage": {"deep": {"token": "sk-secret"}}},  # two levels down
    {"ts": "spoofed", "level": "error", "pid": 1},  # envelope names are renamed
    {"big": 1 << 70},  # orjson refuses it: the fallback stringifies just that field
    {"raw": b"\xffbytes", "n": 3},  # orjson's default
], ids=["record", "bare-record", "secret-name", "header-list", "nested-secret",
        "deep-secret", "reserved", "big-int", "bytes"])
def test_info_fields_writes_what_info_writes(fields: dict[str, object],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The access log's cheaper path is byte for byte ``info(**fields)``: the same line for
    a request record's fields, and the same redaction and fallbacks for anything else."""
    monkeypatch.setattr(time, "time", lambda: 1764201600.25)  # one timestamp for both
    via_kwargs, via_dict = io.BytesIO(), io.BytesIO()
    for out in (via_kwargs, via_dict):
        log = Logger("info", proc="worker-3", stream=out)
        for _ in range(2):  # the second time the names are known safe (the cached path)
            if out is via_kwargs:
                log.info("request", **fields)
            else:
                log.info_fields("request", dict(fields))
        log.close()
    assert via_dict.getvalue() == via_kwargs.getvalue()
    assert via_dict.getvalue().count(b"\n") == 2
    assert b"sk-secret" not in via_dict.getvalue()


def test_info_fields_respects_the_level(stream: io.BytesIO) -> None:
    log = Logger("warning", proc="w", stream=stream)
    log.info_fields("request", {"status": 200})
    log.close()
    assert stream.getvalue() == b""
