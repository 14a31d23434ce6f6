"""One upstream exchange: send the request, get the response head, retry Z.AI 429s per class.

docs/architecture.md "One request", steps 5-7. The request goes out with its headers
rewritten (:mod:`zaiproxy.upstream.forward`) on a pooled connection; a *reused* connection
that fails before any response byte is retried once on a fresh one (the upstream closed it
while idle and we raced its FIN). A Z.AI 429 has up to 32 KiB of its body read and
classified (:mod:`zaiproxy.upstream.zai`); retryable classes wait (inside the caller's
cancel scope, so a client that leaves ends the wait) and are admitted again through the
``readmit`` the caller passes, then sent again. What comes back is the response head the
client will get, with whatever body bytes were already read.

With a pool of upstream keys (``limits/upstream_keys.py``), an account's own limit answered
(1302/1303 throttles, 1308/1310 quota) puts that key to rest and sends the request at once
with the next key the pool offered, admitted again against that key's limits: no wait, no
client-visible error, and not a retry of ``MAX_RETRIES`` (the budget is for waiting on one
account). The last key's answer is handled as with one key. The answer says which key
answered (``x-zaiproxy-upstream``, when the pool comes from a file).

With a :class:`~zaiproxy.request.fallback.Fallback` (``upstream.model_fallback``), a 1312
(model congestion) sends the request to the next model of the list at once instead of
waiting, as one retry of the budget (``request/fallback.py`` has the rules); the answer then
carries ``x-zaiproxy-model``, and :attr:`Exchange.fallback_model` says where it went.

Every answer is one frozen :class:`Attempt` in :attr:`Exchange.attempts`, appended as it
arrives: the record reads them, also when the exchange ends in an error.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio

from zaiproxy.core.errors import Api, UpstreamError, UpstreamTimeout
from zaiproxy.core.logs import get_logger
from zaiproxy.http.http11 import h11
from zaiproxy.http.sink import ClientSink
from zaiproxy.request.fallback import Fallback
from zaiproxy.request.routing import Route
from zaiproxy.upstream import zai
from zaiproxy.upstream.forward import header_value, upstream_request_headers
from zaiproxy.upstream.pool import Origin, UpstreamBroken, UpstreamConnection, UpstreamPool

if TYPE_CHECKING:
    from zaiproxy.request.context import WorkerContext

Headers = list[tuple[bytes, bytes]]
# A pool moves a request to another key on these: the account's own limits.
_ACCOUNT_LIMITS = frozenset((zai.ErrorClass.CONCURRENCY, zai.ErrorClass.FREQUENCY,
                             zai.ErrorClass.QUOTA))
QUOTA_REST_S = 3600.0  # a quota hit without a reset time rests the key this long


@dataclass(frozen=True, slots=True)
class Attempt:
    """One answer from upstream: its status, and for a Z.AI 429 its class and code."""

    status: int
    zai_class: str | None = None
    zai_code: str | None = None
    retried: bool = False  # the proxy waited and sent the request again
    switched: bool = False  # ... with another upstream key of the pool, at once


@dataclass(frozen=True, slots=True)
class Exchanged:
    """The response the client gets: its head, on ``conn``, with the body bytes read so far."""

    conn: UpstreamConnection
    response: h11.Response
    prefix: bytes  # body bytes already read (a relayed Z.AI 429's, read to classify it)
    prefix_ended: bool
    # X-Zai-* (and a derived Retry-After) on a relayed Z.AI 429; x-zaiproxy-model after a
    # model fallback
    final_headers: Headers
    started: float  # trio time the (first) request went upstream
    ttfb: float  # seconds from then to this response head


def upstream_request(ctx: WorkerContext, route: Route, request: h11.Request, body: bytes,
                     client_ip: str, headers: list[tuple[bytes, bytes]] | None = None,
                     upstream: int = 0) -> tuple[Origin, h11.Request]:
    """The request as it goes upstream (headers rewritten, upstream key ``upstream`` of the
    pool injected); ``headers``: ``request.headers`` as a list, when the caller has it
    already."""
    assert route.upstream is not None
    origin = ctx.origins[route.upstream]
    out = upstream_request_headers(
        request.headers if headers is None else headers,
        host=origin.host_header,
        client_ip=client_ip,
        api_key=ctx.api_key if upstream == 0 or ctx.upstream_pool is None
        else ctx.upstream_pool.api_keys[upstream],
        anthropic_style=route.api is Api.ANTHROPIC,
        body_length=len(body) if body or request.method == b"POST" else None,
    )
    return origin, h11.Request(method=request.method,
                               target=(origin.base_path + route.upstream_path).encode(),
                               headers=out)


class Exchange:
    """Send one request upstream until a response head the client should get arrives."""

    def __init__(self, ctx: WorkerContext, origin: Origin, request: h11.Request, body: bytes,
                 readmit: Callable[[int | None], Awaitable[None]], client: ClientSink,
                 fallback: Fallback | None = None, *, upstream: int = 0,
                 candidates: Sequence[int] = (0,),
                 rebuild: Callable[[int, bytes], h11.Request] | None = None) -> None:
        """``readmit(upstream)``: admit the next attempt again (None: with the same key);
        ``upstream``/``candidates``: the key it was admitted for and the pool's other
        choices; ``rebuild(upstream, body)``: the request with another key injected."""
        self.ctx = ctx
        self.origin = origin
        self.request = request
        self.body = body
        self._readmit = readmit
        self._client = client  # read only: has it gone (then a 429 is relayed, not retried)
        self._fallback = fallback
        self._fallbacks_used = 0  # models of the fallback list already tried
        self.upstream = upstream
        self._candidates = candidates
        self._tried: set[int] | None = None  # keys left behind, made on the first move
        self._rebuild = rebuild
        self.attempts: list[Attempt] = []
        self.stale_retried = False  # a stale pooled connection was replaced once
        self.started = 0.0
        # The model the last attempt went to when a 1312 fallback changed it; None: the
        # client's own.
        self.fallback_model: str | None = None

    @property
    def zai_retries(self) -> int:
        return sum(a.retried for a in self.attempts)

    @property
    def waited_retries(self) -> int:
        """Retries of one account (the budget and the backoff's exponent): not the moves to
        another key."""
        return sum(a.retried and not a.switched for a in self.attempts)

    @property
    def last_zai(self) -> tuple[str | None, str | None]:
        """Class and code of the last Z.AI 429 seen (the relayed one if the last answer)."""
        for attempt in reversed(self.attempts):
            if attempt.zai_class is not None:
                return attempt.zai_class, attempt.zai_code
        return None, None

    async def run(self) -> Exchanged:
        """The final response head; raises ProxyError (502/504, or the proxy's 429 from a
        refused readmission) before any byte went to the client."""
        ctx = self.ctx
        pool = ctx.pool
        attempts = self.attempts
        self.started = start = trio.current_time()
        throttle_epoch = -1  # this request counts once per evidence epoch as a throttled request
        while True:
            conn, response = await self._send()
            if response.status_code != 429:
                ctx.admitter.note_upstream(upstream=self.upstream)
                attempts.append(Attempt(response.status_code))
                return Exchanged(conn, response, b"", False, self._model_header(), start,
                                 trio.current_time() - start)
            # Z.AI 429: read a bounded prefix of the body, classify, maybe retry.
            try:
                prefix, ended = await _read_prefix(conn, zai.MAX_BODY, ctx.config.body_idle_timeout)
            except (trio.TooSlowError, UpstreamBroken):
                await pool.discard(conn)
                raise UpstreamError("upstream connection failed while sending a 429 body") from None
            except BaseException:
                await pool.discard(conn)
                raise
            wall = ctx.wall()
            err = zai.classify(prefix, now=wall)
            ctx.metrics.zai_error(err.cls.value, err.code)
            # Only account throttles (1302, 1303, a 429 without a Z.AI code) are evidence for
            # the adaptive rate; 1305/1312 (Z.AI's capacity) and quotas only shape this request.
            throttle_epoch = ctx.admitter.note_upstream(
                err.cls.value if zai.feeds_adaptive(err.cls) else None, throttle_epoch,
                self.upstream)
            header_wait = zai.parse_retry_after(header_value(response.headers, b"retry-after"),
                                                now=wall)
            other = (self._next_key() if err.cls in _ACCOUNT_LIMITS and not self._client.gone
                     else None)
            if other is not None:
                # This account said no: it rests, the request goes out with the next one.
                self._rest(err, header_wait, wall)
                attempts.append(Attempt(429, err.cls.value, err.code, retried=True,
                                        switched=True))
                await _put_back(pool, conn, ended)
                await self._readmit(other)  # that key's limits (may raise the proxy's 429)
                self._use_key(other, err)
                continue
            step = (self._next_model() if err.cls is zai.ErrorClass.CONGESTION
                    and self._fallback is not None and not self._client.gone
                    and self.waited_retries < ctx.retry_policy.max_retries else None)
            if step is not None:
                # Sent to the next model at once: the backoff is for the congested one.
                attempts.append(Attempt(429, err.cls.value, err.code, retried=True))
                await _put_back(pool, conn, ended)
                ctx.metrics.retry(err.cls.value)
                await self._readmit(None)  # admitted again like any retry (may raise the 429)
                self._switch(*step, err)
                continue
            wait = ctx.retry_policy.next_wait(err, self.waited_retries, header_wait, now=wall,
                                              rand=ctx.jitter())
            if wait is None or self._client.gone:
                attempts.append(Attempt(429, err.cls.value, err.code))
                return Exchanged(conn, response, prefix, ended,
                                 [*zai.final_headers(err, list(response.headers), now=wall),
                                  *self._model_header()],
                                 start, trio.current_time() - start)
            attempts.append(Attempt(429, err.cls.value, err.code, retried=True))
            await _put_back(pool, conn, ended)
            ctx.metrics.retry(err.cls.value)
            # Inside the caller's cancel scope: a client that leaves ends the wait.
            await ctx.retry_sleep(wait)
            await self._readmit(None)  # each retry is admitted again (may raise the 429)

    def _next_model(self) -> tuple[str, h11.Request, bytes] | None:
        """The next model of the fallback list and the request for it; None when the list is
        used up (or the body cannot be rewritten): the usual 1312 handling applies."""
        fallback = self._fallback
        assert fallback is not None
        if self._fallbacks_used >= len(fallback.models):
            return None
        to_model = fallback.models[self._fallbacks_used]
        built = fallback.build(to_model)
        if built is None:
            self._fallbacks_used = len(fallback.models)  # the body, not the model: never
            return None
        self._fallbacks_used += 1
        return to_model, *built

    def _switch(self, to_model: str, request: h11.Request, body: bytes,
                err: zai.ZaiError) -> None:
        """The next attempt goes to ``to_model``: counted and logged (no key, no prompt)."""
        assert self._fallback is not None
        from_model = self.fallback_model or self._fallback.requested
        self.request, self.body = request, body
        if self.upstream != 0 and self._rebuild is not None:
            self.request = self._rebuild(self.upstream, body)  # the key it goes out with now
        self.fallback_model = to_model
        self.ctx.metrics.model_fallback(from_model, to_model)
        get_logger().info("model_fallback", request_id=self._client.request_id.decode(),
                          from_model=from_model, to_model=to_model, zai_code=err.code,
                          attempt=len(self.attempts))

    def _next_key(self) -> int | None:
        """The pool's next choice not tried yet (None: none left, or one key)."""
        if len(self._candidates) < 2:
            return None
        tried = self._tried or {self.upstream}
        return next((i for i in self._candidates if i not in tried and i != self.upstream), None)

    def _rest(self, err: zai.ZaiError, header_wait: float | None, wall: float) -> None:
        """Put the key that answered to rest: until the quota's reset, or for Z.AI's wait
        (else the pool's cooldown) after a throttle."""
        pool = self.ctx.upstream_pool
        assert pool is not None
        if err.cls is zai.ErrorClass.QUOTA:
            until = err.reset_at if err.reset_at is not None and err.reset_at > wall \
                else wall + QUOTA_REST_S
            pool.rest(self.upstream, until, "quota")
        else:
            wait = max(header_wait or 0.0, err.retry_after or 0.0) or pool.spec.cooldown_s
            pool.rest(self.upstream, wall + wait, "throttled")
        pool.switched_away(self.upstream)

    def _use_key(self, upstream: int, err: zai.ZaiError) -> None:
        """The next attempt goes out with upstream key ``upstream``: counted and logged."""
        pool = self.ctx.upstream_pool
        assert pool is not None and self._rebuild is not None
        before = pool.aliases[self.upstream]
        if self._tried is None:
            self._tried = {self.upstream}
        self._tried.add(upstream)
        self.upstream = upstream
        self.request = self._rebuild(upstream, self.body)
        self.ctx.metrics.upstream_switch(before, pool.aliases[upstream], err.cls.value)
        get_logger().info("upstream_key_switched", request_id=self._client.request_id.decode(),
                          from_upstream=before, to_upstream=pool.aliases[upstream],
                          zai_class=err.cls.value, zai_code=err.code)

    def _model_header(self) -> Headers:
        out: Headers = []
        pool = self.ctx.upstream_pool
        if pool is not None and pool.shown:
            out.append((b"x-zaiproxy-upstream", pool.aliases[self.upstream].encode()))
        if self.fallback_model is not None:
            out.append((b"x-zaiproxy-model", self.fallback_model.encode()))
        return out

    async def _send(self) -> tuple[UpstreamConnection, h11.Response]:
        """Send the request and wait for the response head (one retry on a stale connection)."""
        ctx = self.ctx
        cfg = ctx.config
        pool = ctx.pool
        for attempt in (0, 1):
            conn, reused = await pool.acquire(self.origin, fresh=attempt > 0)
            try:
                await conn.send_request(self.request, self.body)
                # A bare CancelScope: trio.fail_after wraps one in two generator-based context
                # managers, ~3% of a small request's CPU (py-spy).
                with trio.CancelScope(
                        deadline=trio.current_time() + cfg.response_header_timeout) as waiting:
                    event = await conn.next_event()
                    while type(event) is h11.InformationalResponse:
                        event = await conn.next_event()
                if waiting.cancelled_caught:
                    raise trio.TooSlowError
            except trio.TooSlowError:
                await pool.discard(conn)
                raise UpstreamTimeout(
                    f"upstream sent no response headers within {cfg.response_header_timeout:g} s"
                ) from None
            except UpstreamBroken as exc:
                await pool.discard(conn)
                if reused and conn.received_bytes == 0 and attempt == 0:
                    self.stale_retried = True
                    continue
                raise UpstreamError(f"upstream connection failed before the response: {exc}") from None
            except BaseException:
                await pool.discard(conn)
                raise
            if type(event) is not h11.Response:
                await pool.discard(conn)
                raise UpstreamError("upstream closed the connection without a response")
            return conn, event
        raise AssertionError("unreachable")


async def _put_back(pool: UpstreamPool, conn: UpstreamConnection, ended: bool) -> None:
    """A 429 the proxy does not relay: its connection is reused if its body was read whole."""
    if ended:
        await pool.release(conn)
    else:
        await pool.discard(conn)


async def _read_prefix(conn: UpstreamConnection, limit: int, idle: float) -> tuple[bytes, bool]:
    """Up to ``limit`` body bytes (more if one read brings more); True if the body ended."""
    parts: list[bytes] = []
    size = 0
    while size < limit:
        data, ended = conn.read_available()
        if not data and not ended:
            with trio.fail_after(idle):
                data, ended = await conn.read_more()
        if data:
            parts.append(data)
            size += len(data)
        if ended:
            return b"".join(parts), True
    return b"".join(parts), False
