"""The request path, top to bottom: the order of this file is the order of a request.

docs/architecture.md "One request". The shell (:mod:`zaiproxy.http.connection`) hands
each parsed request to :meth:`Pipeline.handle`, which

1. routes it (:mod:`.routing`): 404/405 read the body first, so the connection stays usable;
2. reads its body (bounded) and hands control routes to :mod:`.control`;
3. parses the JSON of API routes (model, stream flag);
4. authenticates the client key (:mod:`.gate`);
5. answers ``count_tokens`` locally when configured;
6. estimates and admits it: every limit or none (:mod:`.gate`);
7. exchanges it with upstream, retrying Z.AI 429s per class, a 1312 on the next model of
   ``upstream.model_fallback`` when it has one (:mod:`.exchange`, :mod:`.fallback`);
8. relays the response as it arrives (:mod:`.relay`);
9. settles: real usage against the reservation, the lease released (:mod:`.gate`);
10. emits ONE :class:`~zaiproxy.core.record.RequestRecord`, built from the frozen values
    the steps returned, to its sinks (metrics, history, access log).

Nothing below this module imports it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import orjson
import trio

from zaiproxy.core.errors import (
    Api,
    BadRequest,
    InvalidJSON,
    PayloadTooLarge,
    PoolExhausted,
    ProxyError,
    RequestTimeout,
    ServiceUnavailable,
    UpstreamError,
    api_for_path,
)
from zaiproxy.core.logs import get_logger
from zaiproxy.core.record import Ending, RequestRecord
from zaiproxy.http.connection import ClientConnection
from zaiproxy.http.http11 import h11
from zaiproxy.limits.key_usage import outcome_of
from zaiproxy.request import control, gate, tokens
from zaiproxy.request.exchange import Exchange, Exchanged, upstream_request
from zaiproxy.request.fallback import Fallback, body_for, fallback_models
from zaiproxy.request.relay import Relay, RelayOutcome, with_ratelimit
from zaiproxy.request.routing import Route, resolve, safe_method
from zaiproxy.request.usage_rewrite import add_include_usage

if TYPE_CHECKING:
    from zaiproxy.limits.keys import ClientKey
    from zaiproxy.request.context import WorkerContext


def parse_json_body(body: bytes) -> dict[str, object]:
    """The request JSON object (for model/stream and the token estimate)."""
    value = orjson.loads(body)
    if not isinstance(value, dict):
        raise ValueError("the request body must be a JSON object")
    return value


class Pipeline:
    """The request path of one worker (a :class:`~zaiproxy.http.connection.RequestHandler`)."""

    def __init__(self, ctx: WorkerContext) -> None:
        self.ctx = ctx

    def connection(self, stream: trio.abc.Stream, client_ip: str) -> ClientConnection:
        """A client connection whose requests this pipeline answers."""
        ctx = self.ctx
        return ClientConnection(stream, self, ctx.config, ctx, client_ip, ctx.next_request_id)

    async def handle(self, conn: ClientConnection, request: h11.Request) -> None:
        ctx = self.ctx
        started = trio.current_time()
        method = request.method.decode("ascii", "replace")
        target = request.target.decode("ascii", "replace")
        api = Api.OPENAI
        route: Route | None = None
        body = b""
        model: str | None = None
        stream: bool | None = None
        error: str | None = None
        key_alias: str | None = None
        admitted: gate.Admitted | None = None
        settled: gate.Settled | None = None
        exchange: Exchange | None = None
        exchanged: Exchanged | None = None
        relayed: RelayOutcome | None = None
        proxied = False  # reached the upstream steps (6-8): the record says how they ended
        scope: trio.CancelScope | None = None
        extra: list[tuple[bytes, bytes]] = []  # x-ratelimit-*, on every answer once admitted
        in_flight = False  # counted in zai_proxy_concurrent_requests
        try:
            # 1. Route.
            # The head's (name, value) pairs, listed once: h11's Headers is a Sequence whose
            # iteration goes through __getitem__, and the gate and the forwarding read them too.
            headers = list(request.headers)
            try:
                for name, value in headers:
                    if name == b"host" and (b"@" in value or b"/" in value):
                        raise BadRequest("invalid Host header")
                route = resolve(method, target)
            except ProxyError as exc:
                api = api_for_path(target)
                if not isinstance(exc, BadRequest):
                    # 404/405: read (bounded) what the client sent, so the connection can
                    # serve its next request instead of being closed for an unread body.
                    body = await conn.read_body(request)
                raise
            api = route.api
            known: ClientKey | None = None
            if route.control is None:
                ctx.metrics.request_started()
                in_flight = True
                known = gate.identify(ctx.keys, headers)
                key_alias = known.alias if known is not None else None
            # 2. Body; control routes are answered here.
            body = await conn.read_body(request)
            if route.control is not None:
                await control.serve(ctx, conn, route.control, request)
                return
            # 3. JSON.
            payload: dict[str, object] | None = None
            if route.reads_json:
                try:
                    payload = parse_json_body(body)
                except ValueError as exc:  # orjson.JSONDecodeError is a ValueError
                    raise InvalidJSON(f"the request body is not valid JSON: {exc}") from None
                raw_model = payload.get("model")
                model = raw_model if isinstance(raw_model, str) else None
                stream = payload.get("stream") is True
                if stream:
                    ctx.metrics.stream_started()
            if ctx.draining:
                raise ServiceUnavailable("the proxy is shutting down")
            # 4. Authenticate.
            key = gate.authenticate(ctx.keys, known, headers, model)
            # 5. count_tokens, locally.
            if payload is not None and route.count_tokens and ctx.config.count_tokens_locally:
                est = await tokens.estimate(route.api.value, payload, len(body))
                await conn.send_simple(200, orjson.dumps({"input_tokens": est.prompt_tokens}),
                                       headers=((b"x-zaiproxy-estimate", b"cl100k_base"),))
                return
            scope = conn.watch_disconnect()  # the client leaving cancels 6-8 at once
            proxied = True
            try:
                with scope:
                    # 6. Admit.
                    admitted = await gate.admit(ctx, route, key, payload, len(body),
                                                ctx.model_label(model), conn.client_ip)
                    extra = gate.response_headers(ctx, admitted)

                    async def readmit(upstream: int | None = None) -> None:
                        nonlocal admitted
                        assert admitted is not None
                        admitted = await gate.readmit(ctx, admitted, conn.client_ip, upstream)

                    # 7. Exchange.
                    # With openai_include_usage, streams ask upstream for usage; the extra
                    # chunk is stripped for the client (strip_usage).
                    rewritten = (add_include_usage(body) if ctx.config.openai_include_usage
                                 and route.api is Api.OPENAI and route.reads_json else None)
                    strip_usage = rewritten is not None
                    body_up = rewritten if rewritten is not None else body
                    origin, up_request = upstream_request(ctx, route, request, body_up,
                                                          conn.client_ip, headers,
                                                          admitted.upstream)
                    fallback = None
                    if ctx.config.model_fallback.routes and payload is not None:
                        requested, models = fallback_models(ctx.config.model_fallback, route,
                                                            model, key)
                        if requested is not None:
                            fallback = self._fallback(conn, route, request, headers, payload,
                                                      body, strip_usage, requested, models)
                    exchange = Exchange(
                        ctx, origin, up_request, body_up, readmit, conn, fallback,
                        upstream=admitted.upstream, candidates=admitted.candidates,
                        rebuild=self._rebuild(conn, route, request, headers)
                        if ctx.upstream_pool is not None and len(ctx.upstream_pool) > 1
                        else None)
                    exchanged = await exchange.run()
                    # 8. Relay.
                    relay = Relay(ctx, conn, route, exchanged, extra, strip_usage=strip_usage,
                                  keep_json=route.reads_json and request.method != b"HEAD")
                    try:
                        await relay.run()
                    finally:
                        relayed = relay.outcome()
            finally:
                conn.unwatch()
                # 9. Settle (also when cancelled: the lease must come back).
                if admitted is not None:
                    succeeded = relayed is not None and relayed.status < 400
                    settled = gate.settle(ctx, admitted, api.value,
                                          relayed.usage if relayed is not None else None,
                                          succeeded)
        except ProxyError as exc:
            # Settled already (the lease is back before the client sees the error).
            error = exc.message
            await self._fail(conn, exc, api, extra)
        finally:
            if in_flight:
                ctx.metrics.request_ended(stream is True)
            # 10. One record.
            ending = relayed.ending if relayed is not None else Ending.OK
            if scope is not None and scope.cancelled_caught and ending is Ending.OK:
                ending = Ending.CLIENT_GONE  # the reader cancelled: the client left first
            zai_class, zai_code = exchange.last_zai if exchange is not None else (None, None)
            # After a fallback the model that answered is the record's (metrics, tokens, cost,
            # history), the client's beside it.
            answered = exchange.fallback_model if exchange is not None else None
            self.emit(RequestRecord(
                request_id=conn.request_id.decode(),
                method=safe_method(method),
                # The template, never the raw path: raw paths may carry anything.
                route=route.template if route is not None else "other",
                # Control routes are not API traffic; an unrouted request keeps its guess.
                api=None if route is not None and route.control is not None else api.value,
                # 499: the client closed the connection before a response (nginx's way).
                status=conn.response_status or (499 if conn.gone else 0),
                duration_s=trio.current_time() - started,
                bytes_in=len(body),
                client=conn.client_ip,
                model=answered or (model[:128] if model is not None else None),
                stream=stream,
                upstream_status=relayed.status if relayed is not None else None,
                upstream_ttfb_s=exchanged.ttfb if exchanged is not None else None,
                bytes_out=(relayed.bytes_out if relayed is not None else 0) if proxied else None,
                result=ending.value if proxied else None,
                retried=exchange.stale_retried if exchange is not None else False,
                usage=settled.usage if settled is not None else None,
                error=error,
                key_alias=key_alias,
                tokens_estimated=settled.estimated if settled is not None else False,
                prompt_estimate=(admitted.prompt_tokens if admitted is not None
                                 and admitted.counted else None),
                zai_retries=exchange.zai_retries if exchange is not None else 0,
                zai_class=zai_class,
                zai_code=zai_code,
                ttft_s=(relayed.first_byte - started
                        if relayed is not None and relayed.first_byte is not None else None),
                upstream_s=relayed.upstream_s if relayed is not None else None,
                queue_wait_s=admitted.queue_wait_s if admitted is not None else None,
                token_count_s=admitted.token_count_s if admitted is not None else None,
                requested_model=model[:128] if answered is not None and model is not None
                else None,
                upstream=(ctx.upstream_pool.aliases[exchange.upstream]
                          if exchange is not None and ctx.upstream_pool is not None
                          and ctx.upstream_pool.shown else None),
            ))

    def _rebuild(self, conn: ClientConnection, route: Route, request: h11.Request,
                 headers: list[tuple[bytes, bytes]]) -> Callable[[int, bytes], h11.Request]:
        """The exchange's way to another upstream key of the pool: the same request (or the
        body a model fallback made) with that key injected."""
        ctx = self.ctx

        def rebuild(upstream: int, body: bytes) -> h11.Request:
            return upstream_request(ctx, route, request, body, conn.client_ip, headers,
                                    upstream)[1]

        return rebuild

    def _fallback(self, conn: ClientConnection, route: Route, request: h11.Request,
                  headers: list[tuple[bytes, bytes]], payload: dict[str, object], body: bytes,
                  include_usage: bool, requested: str, models: tuple[str, ...]) -> Fallback:
        """The exchange's way to another model: the body rewritten only when it is used."""
        ctx = self.ctx

        def build(to_model: str) -> tuple[h11.Request, bytes] | None:
            new_body = body_for(payload, body, to_model, include_usage=include_usage)
            if new_body is None:
                return None
            return upstream_request(ctx, route, request, new_body, conn.client_ip,
                                    headers)[1], new_body

        return Fallback(requested, models, build)

    async def _fail(self, conn: ClientConnection, exc: ProxyError, api: Api,
                    extra: list[tuple[bytes, bytes]]) -> None:
        """Answer the proxy's own error in the caller's API shape (if nothing was sent yet)."""
        if isinstance(exc, PayloadTooLarge | RequestTimeout | BadRequest):
            conn.close_after = True  # unread body bytes may follow
        if isinstance(exc, UpstreamError | PoolExhausted):
            self.ctx.metrics.upstream_error(exc.code)
        if not conn.gone:
            await conn.send_error(exc, api, with_ratelimit(list(exc.headers), extra))

    def refused(self, conn: ClientConnection, error: ProxyError, api: Api, method: str) -> None:
        self.emit(RequestRecord(
            request_id=conn.request_id.decode(),
            method="-" if method == "-" else safe_method(method), route="other", api=api.value,
            status=error.status, duration_s=0.0, bytes_in=0, client=conn.client_ip,
            error=error.message))

    def emit(self, record: RequestRecord) -> None:
        """Hand the finished request's record to its sinks (metrics, history, access log) and
        count it for its client key: every request of a known key ends here, whatever became
        of it, so ``/admin/keys`` counts all of them by outcome (``limits/key_usage.py``)."""
        ctx = self.ctx
        ctx.metrics.observe(record)
        if record.key_alias is not None:
            ctx.admitter.count_outcome(record.key_alias,
                                       outcome_of(record.status, record.upstream_status))
        if ctx.record_sink is not None:
            ctx.record_sink.submit(record)  # never blocks: drops and counts when full
        if ctx.config.access_log:
            log = get_logger()
            if log.enabled("info"):
                log.info_fields("request", record.log_fields())
