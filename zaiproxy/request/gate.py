"""The gate in front of every proxied request: authenticate, estimate, admit, settle.

docs/architecture.md "One request", steps 4 and 11:
- the client key (when a keys file is configured) is checked in constant time; unknown or
  disabled -> 401, a model the key may not use -> 403;
- the prompt is estimated with tiktoken (in a thread above a size threshold) and the
  reservation is prompt + the request's output cap;
- ONE ledger admission takes every applicable limit or none; refused -> the proxy's 429
  naming the limit, with an exact ``Retry-After``, or a bounded wait when ``queue_timeout``
  is set;
- after the response, :func:`settle` reconciles tokens with real usage and releases the
  concurrency lease (called from a ``finally``).

Each step returns a frozen value (:class:`Admitted`, :class:`Settled`): the pipeline holds
them, nothing is filled in afterwards.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

import trio

from zaiproxy.core.errors import Forbidden, RateLimited, RequestTooLargeForLimit, Unauthorized
from zaiproxy.core.limitspec import Limits
from zaiproxy.core.record import Usage, billed_tokens
from zaiproxy.limits.admission import (
    Admission,
    LimitKind,
    Plan,
    Refusal,
    format_reset,
    ratelimit_headers,
)
from zaiproxy.limits.api import Limiter
from zaiproxy.limits.cells import SC_ADAPTIVE_MRPS, W_KEY_MRPS, upstream_state_key
from zaiproxy.limits.keys import ClientKey, KeyTable, client_credential
from zaiproxy.limits.upstream_pool import ONLY_KEY
from zaiproxy.request import tokens
from zaiproxy.request.routing import Route
from zaiproxy.request.usage import StreamUsage

if TYPE_CHECKING:
    from zaiproxy.limits.zai_quota import PaceBoard
    from zaiproxy.request.context import WorkerContext

# A concurrency slot frees when some request finishes, on any worker: a waiting request
# re-checks this often (a local release wakes it at once).
_CONCURRENCY_POLL_S = 0.05


@dataclass(frozen=True, slots=True)
class Admitted:
    """What the gate decided for one request (a retry gets a new one); settled once."""

    admission: Admission
    alias: str | None
    prompt_tokens: int  # estimate (0 when not counted)
    reserved: int
    model_label: str
    counted: bool  # token counting applied to this request
    token_count_s: float | None  # time spent estimating the prompt
    queue_wait_s: float  # time waited in the admission queue
    upstream: int = 0  # the upstream key it is admitted for (pool index)
    candidates: Sequence[int] = ONLY_KEY  # the keys it may go out with, best first


@dataclass(frozen=True, slots=True)
class Settled:
    """The usage the request was charged with, and whether the proxy counted it itself."""

    usage: Usage | None
    estimated: bool


def identify(keys: KeyTable | None, headers: Iterable[tuple[bytes, bytes]]) -> ClientKey | None:
    """The client key the caller presented, known to the table (disabled ones too), or None
    (open mode, none presented, unknown). Never raises: it runs as soon as the head is in, so
    every request of a known key is counted for it, whatever fails next (a body too large,
    bad JSON, the key disabled, a model it may not use)."""
    if keys is None:
        return None
    presented = client_credential(headers)
    return keys.lookup(presented) if presented is not None else None


def authenticate(keys: KeyTable | None, key: ClientKey | None,
                 headers: Iterable[tuple[bytes, bytes]], model: str | None) -> ClientKey | None:
    """The caller's client key (``key``: what :func:`identify` found), or None in open mode;
    raises Unauthorized / Forbidden."""
    if keys is None:
        return None
    if key is None:
        if client_credential(headers) is None:
            raise Unauthorized("missing client key: send it as `Authorization: Bearer <key>` "
                               "or `x-api-key: <key>`")
        raise Unauthorized("invalid client key")
    if not key.enabled:
        raise Unauthorized(f"client key {key.alias!r} is disabled")
    if not key.allows_model(model):
        raise Forbidden(f"client key {key.alias!r} may not use model {model!r}")
    return key


def estimate_now(ctx: WorkerContext, route: Route, payload: dict[str, object] | None,
                 body_len: int) -> tuple[int, int, bool] | None:
    """:func:`estimate` when it needs no thread (nothing to count, or a small body with the
    encoding loaded), else None: the common request is estimated without a coroutine."""
    if not ctx.config.token_counting or payload is None:
        return 0, 0, False
    est = tokens.estimate_now(route.api.value, payload, body_len)
    return None if est is None else _counts(ctx, route, est)


async def estimate(ctx: WorkerContext, route: Route, payload: dict[str, object] | None,
                   body_len: int) -> tuple[int, int, bool]:
    """(prompt tokens, reservation, counted) for a request."""
    counts = estimate_now(ctx, route, payload, body_len)
    if counts is not None:
        return counts
    assert payload is not None
    return _counts(ctx, route, await tokens.estimate(route.api.value, payload, body_len))


def _counts(ctx: WorkerContext, route: Route,
            est: tokens.PromptEstimate) -> tuple[int, int, bool]:
    if route.generates_output:
        return est.prompt_tokens, tokens.reservation(est, ctx.config.default_max_output_tokens), True
    return est.prompt_tokens, est.prompt_tokens, True


async def admit(ctx: WorkerContext, route: Route, key: ClientKey | None,
                payload: dict[str, object] | None, body_len: int, model_label: str,
                peer: str) -> Admitted:
    """Estimate and admit one request; raises RateLimited (429) when a limit refuses.
    ``peer``: the direct peer's address (a refusal's metric is labelled with its bucket)."""
    began = time.perf_counter()
    counts = estimate_now(ctx, route, payload, body_len)
    if counts is None:
        counts = await estimate(ctx, route, payload, body_len)
    prompt, reserved, counted = counts
    counted_s = time.perf_counter() - began if counted else None
    admitter: Limiter = ctx.admitter
    alias = key.alias if key is not None else None
    limits = key.limits if key is not None else None
    pool = ctx.upstream_pool
    candidates = pool.candidates(alias) if pool is not None else ONLY_KEY
    gates = ctx.quota_gates
    first: tuple[int, Plan, Refusal] | None = None
    closed: tuple[int, int] | None = None  # the first candidate whose quota reserve is reached
    for upstream in candidates:
        if gates is not None:
            until_ms = gates[upstream].closed_until_ms()  # one ledger word: open is 0
            if until_ms > 0 and until_ms > ctx.wall() * 1000:
                if closed is None:
                    closed = (upstream, until_ms)
                continue
        plan = admitter.plan(alias, limits, upstream)
        result = await admitter.admit(plan, reserved)
        if not isinstance(result, Refusal):
            return Admitted(result, alias, prompt, reserved, model_label, counted, counted_s,
                            0.0, upstream, candidates)
        if first is None:
            first = (upstream, plan, result)
    if first is None:  # every candidate's quota is at its reserve
        assert closed is not None and gates is not None
        raise _reserve_reached(ctx, gates[closed[0]], closed[1], peer)
    upstream, plan, refusal = first
    waiting = trio.current_time()
    admission = await _wait(ctx, plan, reserved, refusal, peer)
    return Admitted(admission, alias, prompt, reserved, model_label, counted, counted_s,
                    trio.current_time() - waiting, upstream, candidates)


async def readmit(ctx: WorkerContext, admitted: Admitted, peer: str,
                  upstream: int | None = None) -> Admitted:
    """Admit a Z.AI retry again.

    The refused attempt is settled like a finished request, not cancelled: it did reach
    upstream, so its request-rate, quota and adaptive-rate slots stay taken (cancelling
    would let every retry go out outside those limits); its lease goes back and its token
    reservation is refunded (a 429 generated nothing). Then the retry takes every limit
    anew. If the retry is refused (the proxy's own 429 is raised), the caller's final
    :func:`settle` of the old value changes nothing: ``Admitter.settle`` is idempotent.
    """
    old = admitted.admission
    ctx.admitter.settle(old, 0 if admitted.counted else None)
    plan = old.plan
    if upstream is not None and upstream != admitted.upstream:
        # Another upstream key (the pool moved the request): its own limits and rate.
        plan = ctx.admitter.plan(plan.alias, _client_limits(ctx, plan.alias), upstream)
    else:
        upstream = admitted.upstream
    result = await ctx.admitter.admit(plan, old.tokens)
    if isinstance(result, Refusal):
        result = await _wait(ctx, plan, old.tokens, result, peer)
    return dataclasses.replace(admitted, admission=result, upstream=upstream)


def _client_limits(ctx: WorkerContext, alias: str | None) -> Limits | None:
    if alias is None or ctx.keys is None:
        return None
    return next((k.limits for k in ctx.keys if k.alias == alias), None)


async def _wait(ctx: WorkerContext, plan: Plan, reserved: int, refusal: Refusal,
                peer: str) -> Admission:
    """Wait for a slot within ``queue_timeout`` (bounded queue), or raise the 429."""
    if refusal.retry_ns < 0:
        raise RequestTooLargeForLimit(
            f"this request reserves {refusal.cost} tokens (prompt + max_tokens), more than the "
            f"{refusal.op.scope} limit {refusal.op.name}={refusal.op.limit} can ever admit; "
            "lower max_tokens or shorten the prompt")
    timeout = ctx.config.queue_timeout
    queue = ctx.wait_queue
    if timeout <= 0 or not queue.try_enter():
        raise _refused(ctx, refusal, plan, peer)
    admitter: Limiter = ctx.admitter
    deadline = trio.current_time() + timeout
    try:
        while True:
            wait_s = (_CONCURRENCY_POLL_S if refusal.op.what is LimitKind.CONCURRENCY
                      else refusal.retry_ns / 1e9)
            if trio.current_time() + wait_s > deadline:
                raise _refused(ctx, refusal, plan, peer)
            # A client that disconnects cancels the scope around us: it leaves the queue.
            with trio.move_on_after(wait_s):
                await ctx.released.wait()
            result = await admitter.admit(plan, reserved)
            if not isinstance(result, Refusal):
                return result
            refusal = result
    finally:
        queue.leave()


_WINDOW_NAMES: Final = {"five_hour": "5-hour", "weekly": "weekly"}


def _reserve_reached(ctx: WorkerContext, gate: PaceBoard, until_ms: int,
                     peer: str) -> RateLimited:
    """Quota pacing's reserve (limits/zai_quota.py): 429 at once until the window resets."""
    window = gate.gate_window() or "five_hour"
    ctx.metrics.rejection(f"zai_quota_{window}", "upstream", peer)
    left_s = max(0.0, until_ms / 1000 - ctx.wall())
    reset = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(until_ms / 1000))
    return RateLimited(
        f"quota reserve reached: Z.AI's {_WINDOW_NAMES.get(window, window)} quota is down to "
        f"the reserve this proxy keeps (quota_reserve={ctx.config.quota_reserve:g} of the "
        f"window); it resets at {reset}, retry in {format_reset(round(left_s * 1e9))}",
        headers=((b"retry-after", b"%d" % max(1, math.ceil(left_s))),
                 (b"x-zaiproxy-limit", f"upstream:zai_quota_{window}".encode()),
                 (b"x-zai-rate-limit-reset", reset.encode())))


def _effective_mrps(ctx: WorkerContext, plan: Plan) -> int:
    if plan.upstream == 0:
        return ctx.ledger.scalar_get(SC_ADAPTIVE_MRPS)
    return ctx.ledger.counter_get(ctx.ledger.row(upstream_state_key(plan.upstream)), W_KEY_MRPS)


def _refused(ctx: WorkerContext, refusal: Refusal, plan: Plan, peer: str) -> RateLimited:
    op = refusal.op
    # The limit that refused, by its name (``requests_per_minute`` … ``adaptive_rate``) and
    # scope (``key``, ``upstream``, ``global``): bounded label values, and what an operator
    # needs to read, not "requests" when the adaptive rate refused. The peer becomes the
    # original's ``client`` bucket (source-00..63), never a label of its own.
    ctx.metrics.rejection(op.name, op.scope, peer)
    retry_s = refusal.retry_after_s if op.what is not LimitKind.CONCURRENCY else 1
    reset = (format_reset(refusal.retry_ns) if op.what is not LimitKind.CONCURRENCY
             else "when a request in flight finishes")
    gates = ctx.quota_gates
    paced = gates[plan.upstream].view(True).rate_rps if gates is not None else None
    if op.adaptive and paced is not None and round(paced * 1000) >= _effective_mrps(ctx, plan):
        what = ("the upstream rate paced so Z.AI's quota lasts until it resets "
                f"({paced:.3g} requests/s)")
    elif op.adaptive:
        what = "the adaptive upstream rate (backed off after Z.AI throttling)"
    else:
        what = f"the {op.scope} limit {op.name}={op.limit}"
    headers: list[tuple[bytes, bytes]] = [
        (b"retry-after", b"%d" % retry_s),
        (b"x-zaiproxy-limit", f"{op.scope}:{op.name}".encode()),
    ]
    requests, toks = ctx.admitter.rate_states(plan)
    ratelimit_headers(requests, toks, headers)
    return RateLimited(
        f"proxy rate limit: {what} ({op.what.value}) is exhausted; retry in {reset}",
        headers=tuple(headers))


def response_headers(ctx: WorkerContext, admitted: Admitted) -> list[tuple[bytes, bytes]]:
    """The ``x-ratelimit-*`` headers for the tightest limits of the caller's plan."""
    out: list[tuple[bytes, bytes]] = []
    requests, toks = ctx.admitter.rate_states(admitted.admission.plan)
    ratelimit_headers(requests, toks, out)
    return out


def settle(ctx: WorkerContext, admitted: Admitted, api: str, usage: StreamUsage | Usage | None,
           succeeded: bool) -> Settled:
    """Reconcile the reservation with real usage, release the lease, count the key's tokens.

    ``usage``: what the response reported (a stream's :class:`StreamUsage` says whether its
    output was counted here from the deltas); none for a successful answer -> the prompt
    estimate is charged, as an estimate; a failed answer generated nothing.
    """
    estimated = False
    charged: Usage | None
    if isinstance(usage, StreamUsage):
        estimated = usage.estimated
        charged = usage.usage
        if estimated and charged.input_tokens == 0:
            charged = Usage(admitted.prompt_tokens, charged.output_tokens)
    elif usage is not None:
        charged = usage
    elif succeeded and admitted.counted:
        charged, estimated = Usage(admitted.prompt_tokens, 0), True
    else:
        charged = None
    used = billed_tokens(api, charged) if charged is not None else 0
    ctx.admitter.settle(admitted.admission, used if admitted.counted else None)
    if ctx.wait_queue.waiting:
        ctx.released.set()  # wake the queued: a slot may be free
        ctx.released = trio.Event()
    if charged is not None and admitted.counted and admitted.alias is not None:
        ctx.admitter.add_usage(admitted.alias, charged)
    return Settled(charged, estimated)
