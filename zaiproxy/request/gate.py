"""The gate in front of every proxied request: authenticate, estimate, admit, settle.

docs/architecture.md "One request", steps 4 and 11:
- the client key (when a keys file is configured) is checked in constant
  time; unknown or disabled -> 401, a model the key may not use -> 403;
- the prompt is estimated with tiktoken (in a thread above a size threshold)
  and the reservation is prompt + the request's output cap;
- ONE ledger admission takes every applicable limit or none; refused -> the
  proxy's 429 naming the limit, with an exact ``Retry-After``, or a bounded
  wait when ``queue_timeout`` is set;
- after the response, :func:`settle` reconciles tokens with real usage and
  releases the concurrency lease (called from a ``finally``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio

from zaiproxy.core.errors import Forbidden, RateLimited, RequestTooLargeForLimit, Unauthorized
from zaiproxy.core.record import Usage
from zaiproxy.limits.admission import (
    Admission,
    LimitKind,
    Plan,
    Refusal,
    format_reset,
    ratelimit_headers,
)
from zaiproxy.limits.keys import ClientKey, client_credential
from zaiproxy.request import tokens

if TYPE_CHECKING:
    from zaiproxy.http.http11 import h11
    from zaiproxy.request.context import WorkerContext
    from zaiproxy.request.proxy import Outcome
    from zaiproxy.request.routing import Route

# Upstream paths whose responses generate output tokens (the output cap is reserved).
_GENERATING = ("/chat/completions", "/completions", "/messages")
# A concurrency slot frees when some request finishes, on any worker: a
# waiting request re-checks this often (a local release wakes it at once).
_CONCURRENCY_POLL_S = 0.05


@dataclass(slots=True)
class Ticket:
    """What the gate decided for one request; settled once in a ``finally``."""

    admission: Admission | None
    alias: str | None
    prompt_tokens: int  # estimate (0 when not counted)
    reserved: int
    model_label: str
    counted: bool  # token counting applied to this request
    token_count_s: float | None = None  # time spent estimating the prompt
    queue_wait_s: float = 0.0  # time waited in the admission queue


def authenticate(ctx: WorkerContext, request: h11.Request, model: str | None) -> ClientKey | None:
    """The caller's client key, or None in open mode; raises Unauthorized / Forbidden."""
    table = ctx.keys
    if table is None:
        return None
    presented = client_credential(request.headers)
    if presented is None:
        raise Unauthorized("missing client key: send it as `Authorization: Bearer <key>` "
                           "or `x-api-key: <key>`")
    key = table.lookup(presented)
    if key is None:
        raise Unauthorized("invalid client key")
    if not key.enabled:
        raise Unauthorized(f"client key {key.alias!r} is disabled")
    if not key.allows_model(model):
        raise Forbidden(f"client key {key.alias!r} may not use model {model!r}")
    return key


def model_label(ctx: WorkerContext, model: str | None) -> str:
    """A bounded label: a configured model name, else ``other`` (``-`` when absent)."""
    if model is None:
        return "-"
    return model if model in ctx.known_models else "other"


async def estimate(ctx: WorkerContext, route: Route, payload: dict[str, object] | None,
                   body_len: int) -> tuple[int, int, bool]:
    """(prompt tokens, reservation, counted) for a request."""
    if not ctx.config.token_counting or payload is None:
        return 0, 0, False
    est = tokens.estimate_now(route.api.value, payload, body_len)
    if est is None:
        est = await tokens.estimate(route.api.value, payload, body_len)
    path = route.upstream_path.partition("?")[0]
    if path.endswith(_GENERATING):
        return est.prompt_tokens, tokens.reservation(est, ctx.config.default_max_output_tokens), True
    return est.prompt_tokens, est.prompt_tokens, True


async def admit(ctx: WorkerContext, route: Route, key: ClientKey | None,
                payload: dict[str, object] | None, body_len: int, model: str | None) -> Ticket:
    """Estimate and admit one request; raises RateLimited (429) when a limit refuses."""
    began = time.perf_counter()
    prompt, reserved, counted = await estimate(ctx, route, payload, body_len)
    counted_at = time.perf_counter()
    admitter = ctx.admitter
    alias = key.alias if key is not None else None
    plan = admitter.plan(alias, key.limits if key is not None else None)
    ticket = Ticket(None, alias, prompt, reserved, model_label(ctx, model), counted,
                    counted_at - began if counted else None)
    result = admitter.admit(plan, reserved)
    if isinstance(result, Refusal):
        waiting = trio.current_time()
        result = await _wait(ctx, plan, reserved, result)
        ticket.queue_wait_s = trio.current_time() - waiting
    ticket.admission = result
    return ticket


async def readmit(ctx: WorkerContext, ticket: Ticket) -> None:
    """Admit a Z.AI retry again.

    The refused attempt is settled like a finished request, not cancelled: it
    did reach upstream, so its request-rate, quota and adaptive-rate slots stay
    taken (cancelling would let every retry go out outside those limits); its
    lease goes back and its token reservation is refunded (a 429 generated
    nothing). Then the retry takes every limit anew.
    """
    old = ticket.admission
    if old is None:
        return
    ctx.admitter.settle(old, 0 if ticket.counted else None)
    ticket.admission = None
    result = ctx.admitter.admit(old.plan, old.tokens)
    if isinstance(result, Refusal):
        result = await _wait(ctx, old.plan, old.tokens, result)
    ticket.admission = result


async def _wait(ctx: WorkerContext, plan: Plan, reserved: int, refusal: Refusal) -> Admission:
    """Wait for a slot within ``queue_timeout`` (bounded queue), or raise the 429."""
    if refusal.retry_ns < 0:
        raise RequestTooLargeForLimit(
            f"this request reserves {refusal.cost} tokens (prompt + max_tokens), more than the "
            f"{refusal.op.scope} limit {refusal.op.name}={refusal.op.limit} can ever admit; "
            "lower max_tokens or shorten the prompt")
    timeout = ctx.config.queue_timeout
    queue = ctx.wait_queue
    if timeout <= 0 or not queue.try_enter():
        raise _refused(ctx, refusal, plan)
    admitter = ctx.admitter
    deadline = trio.current_time() + timeout
    try:
        while True:
            wait_s = (_CONCURRENCY_POLL_S if refusal.op.what is LimitKind.CONCURRENCY
                      else refusal.retry_ns / 1e9)
            if trio.current_time() + wait_s > deadline:
                raise _refused(ctx, refusal, plan)
            # A client that disconnects cancels the exchange scope around us: it leaves the queue.
            with trio.move_on_after(wait_s):
                await ctx.released.wait()
            result = admitter.admit(plan, reserved)
            if not isinstance(result, Refusal):
                return result
            refusal = result
    finally:
        queue.leave()


def _refused(ctx: WorkerContext, refusal: Refusal, plan: Plan) -> RateLimited:
    op = refusal.op
    ctx.metrics.rejection(op.what.value, "key" if op.scope == "key" else "global")
    retry_s = refusal.retry_after_s if op.what is not LimitKind.CONCURRENCY else 1
    reset = (format_reset(refusal.retry_ns) if op.what is not LimitKind.CONCURRENCY
             else "when a request in flight finishes")
    if op.adaptive:
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


def response_headers(ctx: WorkerContext, ticket: Ticket | None) -> list[tuple[bytes, bytes]]:
    """The ``x-ratelimit-*`` headers for the tightest limits of the caller's plan."""
    if ticket is None or ticket.admission is None:
        return []
    out: list[tuple[bytes, bytes]] = []
    requests, toks = ctx.admitter.rate_states(ticket.admission.plan)
    ratelimit_headers(requests, toks, out)
    return out


def billed_tokens(api: str, usage: Usage) -> int:
    """Tokens a usage counts against token limits (prompt incl. cache + completion)."""
    if api == "anthropic":
        # Anthropic's input_tokens excludes cache reads and writes.
        return (usage.input_tokens + usage.cache_read_tokens + usage.cache_write_tokens
                + usage.output_tokens)
    return usage.input_tokens + usage.output_tokens  # OpenAI's prompt_tokens includes cached


def settle(ctx: WorkerContext, ticket: Ticket, api: str, outcome: Outcome | None) -> None:
    """Reconcile the reservation with real usage, release the lease, count tokens."""
    admission = ticket.admission
    usage: Usage | None = None
    estimated = False
    if outcome is not None and outcome.usage is not None:
        usage = outcome.usage
        estimated = outcome.usage_estimated
        if estimated and usage.input_tokens == 0:
            usage = Usage(ticket.prompt_tokens, usage.output_tokens)
            outcome.usage = usage  # the record shows what was counted
    elif (outcome is not None and outcome.upstream_status is not None
          and outcome.upstream_status < 400 and ticket.counted):
        usage = Usage(ticket.prompt_tokens, outcome.output_estimate)
        estimated = True
        outcome.usage, outcome.usage_estimated = usage, True
    used = billed_tokens(api, usage) if usage is not None else 0
    if admission is not None:
        ctx.admitter.settle(admission, used if ticket.counted else None)
        if ctx.wait_queue.waiting:
            ctx.released.set()  # wake the queued: a slot may be free
            ctx.released = trio.Event()
    if usage is not None and ticket.counted:
        ctx.count_tokens(ticket.alias, ticket.model_label, usage, estimated)
