"""The admin API over HTTP, and the live feed that keeps following it (asyncio, no Textual).

:class:`AdminApi` reads a proxy's or a collector's admin routes with httpx:
``/admin/events`` (server-sent events: ``connected``, then ``metrics``
snapshots and ``: heartbeat`` comments), ``/admin/history`` and
``/admin/keys``. Failures become one of a few :class:`SourceError` kinds the
screen can explain — unreachable, 401 (ask for the token), a route this
server does not serve (an older collector has no ``/admin/keys``), an answer that is
not the admin API's — and never a traceback. The token is sent only as
``Authorization: Bearer`` and appears in no message.

:func:`follow` keeps one events stream open: it reports ``Connecting``,
``Connected``, every :class:`~zaiproxy_tui.model.Snapshot`, and on a failure
``Reconnecting`` with the time of the next attempt (exponential backoff, reset
by a snapshot). A 401 stops it with ``AuthRequired`` until a token is given.
A stream that sends nothing, not even a heartbeat, for ``idle_timeout`` is
taken as dead.

Anything with ``events``/``history``/``keys`` of these shapes is a
:class:`Source` — the tests' fixture source is one, and so is
:class:`~zaiproxy_tui.prometheus_source.PrometheusSource` (a fleet's metrics in
Prometheus, which shares this module's error kinds and HTTP status reading).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import httpx
import orjson

from zaiproxy_tui.model import (
    AnswerError,
    History,
    KeysReport,
    Snapshot,
    parse_history,
    parse_keys,
    parse_snapshot,
)


class SourceError(Exception):
    """Something the screen shows instead of data."""


class Unreachable(SourceError):
    pass


class Unauthorized(SourceError):
    pass


class NotServed(SourceError):
    """A route this server does not have (404), or a feature it has turned off (503)."""


class BadAnswer(SourceError):
    pass


@dataclass(frozen=True, slots=True)
class Connecting:
    attempt: int


@dataclass(frozen=True, slots=True)
class Connected:
    interval: float | None
    variant: str | None


@dataclass(frozen=True, slots=True)
class Reconnecting:
    error: str
    retry_at: float  # the clock's time of the next attempt
    attempt: int


@dataclass(frozen=True, slots=True)
class AuthRequired:
    message: str


FeedEvent = Connecting | Connected | Reconnecting | AuthRequired | Snapshot


class Source(Protocol):
    def events(self) -> AsyncIterator[Connected | Snapshot]: ...

    async def history(self, range_: str, variant: str) -> History: ...

    async def keys(self) -> KeysReport: ...


EVENTS_IDLE_TIMEOUT = 45.0  # the proxy sends a heartbeat every 15 s


class AdminApi:
    """The admin API of one proxy or collector at ``url``."""

    def __init__(self, url: str, token: str | None = None, *, timeout: float = 10.0,
                 idle_timeout: float = EVENTS_IDLE_TIMEOUT,
                 clock: Callable[[], float] = time.time) -> None:
        self.url = url.rstrip("/")
        self.token = token or None
        self.clock = clock
        self._timeout = timeout
        self._idle = idle_timeout
        self._client = httpx.AsyncClient(base_url=self.url, timeout=timeout,
                                         headers={"user-agent": "zaiproxy-tui"})

    def __repr__(self) -> str:  # never the token
        return f"AdminApi({self.url!r}, token={'set' if self.token else 'unset'})"

    def set_token(self, token: str | None) -> None:
        self.token = token or None

    async def aclose(self) -> None:
        await self._client.aclose()

    def _headers(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.token}"} if self.token else {}

    async def _get(self, path: str, params: dict[str, str] | None = None) -> Any:
        try:
            resp = await self._client.get(path, params=params, headers=self._headers())
        except httpx.HTTPError as exc:
            raise Unreachable(transport_error(self.url, exc)) from None
        check_status(resp.status_code, resp.content, path)
        try:
            return orjson.loads(resp.content)
        except orjson.JSONDecodeError:
            raise BadAnswer(f"{path}: the answer is not JSON (is {self.url} a zaiproxy?)") from None

    async def history(self, range_: str, variant: str) -> History:
        doc = await self._get("/admin/history", {"range": range_, "variant": variant})
        try:
            return parse_history(doc, range_, self.clock())
        except AnswerError as exc:
            raise BadAnswer(f"/admin/history: {exc}") from None

    async def keys(self) -> KeysReport:
        doc = await self._get("/admin/keys")
        try:
            return parse_keys(doc)
        except AnswerError as exc:
            raise BadAnswer(f"/admin/keys: {exc}") from None

    async def events(self) -> AsyncIterator[Connected | Snapshot]:
        timeout = httpx.Timeout(self._timeout, read=self._idle)
        headers = {**self._headers(), "accept": "text/event-stream"}
        try:
            async with self._client.stream("GET", "/admin/events", headers=headers,
                                           timeout=timeout) as resp:
                if resp.status_code != 200:
                    body = await resp.aread()
                    check_status(resp.status_code, body, "/admin/events")
                    raise BadAnswer(f"/admin/events answered {resp.status_code}")
                async for name, data in _sse(resp.aiter_lines()):
                    event = _event(name, data)
                    if event is not None:
                        yield event
        except httpx.HTTPError as exc:
            raise Unreachable(transport_error(self.url, exc)) from None
        raise Unreachable(f"{self.url} closed the events stream")


def transport_error(url: str, exc: httpx.HTTPError) -> str:
    """What went wrong on the way, in words (every source)."""
    if isinstance(exc, httpx.ConnectError):
        return f"cannot connect to {url}"
    if isinstance(exc, httpx.TimeoutException):
        return f"{url} timed out"
    if isinstance(exc, httpx.RemoteProtocolError):
        return f"{url} broke the connection"
    return f"{url}: {type(exc).__name__}"


def _message(body: bytes) -> str:
    """The error message of the admin API's shapes or Prometheus' (``"error": "..."``),
    else a short excerpt."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return body[:120].decode("utf-8", "replace").strip()
    if isinstance(doc, dict):
        err = doc.get("error")
        if isinstance(err, dict) and isinstance(err.get("message"), str):
            return str(err["message"])
        if isinstance(err, str):
            return err
        if isinstance(doc.get("message"), str):
            return str(doc["message"])
    return ""


def check_status(status: int, body: bytes, path: str, *,
                 needs_token: str = "the admin API needs a token") -> None:
    """An HTTP error status as the :class:`SourceError` the screen explains (every source)."""
    if status < 400:
        return
    message = _message(body)
    if status in (401, 403):
        raise Unauthorized(message or needs_token)
    if status in (404, 405, 501):
        raise NotServed(f"{path} is not served here" + (f" ({message})" if message else ""))
    if status == 503:
        raise NotServed(message or f"{path} is unavailable")
    raise BadAnswer(f"{path} answered {status}" + (f": {message}" if message else ""))


async def _sse(lines: AsyncIterator[str]) -> AsyncIterator[tuple[str, str]]:
    """(event name, data) per server-sent event; comments (heartbeats) skipped."""
    name, data = "message", list[str]()
    async for line in lines:
        if not line:
            if data:
                yield name, "\n".join(data)
            name, data = "message", []
        elif line.startswith(":"):
            continue
        else:
            field, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if field == "event":
                name = value
            elif field == "data":
                data.append(value)


def _event(name: str, data: str) -> Connected | Snapshot | None:
    if name not in ("connected", "metrics"):
        return None  # an event kind this version does not know, whatever its data
    try:
        doc = orjson.loads(data)
    except orjson.JSONDecodeError:
        raise BadAnswer(f"/admin/events sent an event that is not JSON ({name})") from None
    if name == "connected":
        if not isinstance(doc, dict):
            return Connected(None, None)
        interval = doc.get("interval_s")
        variant = doc.get("variant")
        return Connected(float(interval) if isinstance(interval, int | float) else None,
                         variant if isinstance(variant, str) else None)
    if name == "metrics":
        try:
            return parse_snapshot(doc)
        except AnswerError as exc:
            raise BadAnswer(f"/admin/events: {exc}") from None
    return None  # an event kind this version does not know


# ---- following the feed ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Backoff:
    """1, 2, 4, 8, 16, 30, 30 ... seconds, each scaled by ``jitter()`` (0.8-1.2 by default)."""

    base: float = 1.0
    cap: float = 30.0
    jitter: Callable[[], float] = field(default=lambda: random.uniform(0.8, 1.2))

    def delay(self, attempt: int) -> float:
        scale: float = self.jitter()
        return min(self.cap, self.base * 2.0 ** min(attempt, 16)) * scale


async def follow(source: Source, emit: Callable[[FeedEvent], None], *,
                 backoff: Backoff | None = None, clock: Callable[[], float] = time.time,
                 sleep: Callable[[float], Any] = asyncio.sleep) -> None:
    """Follow ``source.events()`` until cancelled, or until it answers 401 (``AuthRequired``)."""
    backoff = backoff or Backoff()
    attempt = 0
    while True:
        emit(Connecting(attempt))
        try:
            async for event in source.events():
                if isinstance(event, Snapshot):
                    attempt = 0
                emit(event)
            error = "the events stream ended"
        except Unauthorized as exc:
            emit(AuthRequired(str(exc)))
            return
        except SourceError as exc:
            error = str(exc)
        delay = backoff.delay(attempt)
        emit(Reconnecting(error, clock() + delay, attempt + 1))
        attempt += 1
        await sleep(delay)
