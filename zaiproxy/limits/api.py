"""What the request path needs from a limits backend: one typed interface.

Every limit that applies to a request is taken in ONE step and given back in one step:
:meth:`Limiter.admit` takes every reservation of the caller's :class:`Plan` or none and
answers an :class:`Admission` (held until settled) or the first :class:`Refusal` (with an
exact retry time); :meth:`Limiter.settle` releases the concurrency lease and charges or
refunds the difference between the reservation and the real usage. The request path
(``request/gate.py``, ``request/exchange.py``) sees nothing else.

:class:`~zaiproxy.limits.admission.Admitter` is the host's backend: the shared-memory ledger
(native or its pure twin, both behind :class:`~zaiproxy.limits.segment.Segment`). A backend
shared by a fleet, :class:`~zaiproxy.limits.fleet.FleetLimiter` (Redis: one server-side
script call to admit, batched calls to settle), implements this same Protocol; its ``Plan``
carries what its script needs (``Plan.backend``) instead of the ledger's op buffer.
Reports (``/admin/keys``, the quota gauges) go through the same interface, so they show the
fleet's numbers when the backend is the fleet's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import trio

from zaiproxy.core.limitspec import Limits
from zaiproxy.core.record import Usage
from zaiproxy.limits.admission import (
    Admission,
    Admitter,
    LimitOp,
    Plan,
    QuotaUse,
    RateState,
    Refusal,
)
from zaiproxy.limits.fleet import FleetLimiter


class Limiter(Protocol):
    @property
    def fleet(self) -> bool:
        """True when the limits are the fleet's (shared through Redis), False for this host."""

    def plan(self, alias: str | None, key_limits: Limits | None, upstream: int = 0) -> Plan:
        """The limits of one caller (client key alias, or None in open mode) going out with
        upstream key ``upstream`` (its index in the pool), built once."""

    async def admit(self, plan: Plan, tokens: int) -> Admission | Refusal:
        """Take every limit of ``plan`` for a request reserving ``tokens``, or none.

        May raise :class:`~zaiproxy.core.errors.LimitsUnavailable` (fleet backend, Redis
        away, ``limits_fail = "closed"``)."""

    def settle(self, admission: Admission, used_tokens: int | None) -> None:
        """Release the lease; reconcile the reservation with ``used_tokens`` (None = keep)."""

    def rate_states(self, plan: Plan) -> tuple[RateState | None, RateState | None]:
        """The tightest per-minute request and token limits, for ``x-ratelimit-*``."""

    def note_upstream(self, throttle: str | None = None, counted_epoch: int = -1,
                      upstream: int = 0) -> int:
        """Count one upstream answer of upstream key ``upstream`` for its adaptive rate
        (``throttle``: its class)."""

    def forget_plans(self) -> None:
        """The client keys changed: plans are built again on first use."""

    def add_usage(self, alias: str, usage: Usage) -> None:
        """Add a settled request's usage to the client key's token totals."""

    def count_outcome(self, alias: str, outcome: int) -> None:
        """Count one ended request of the client key ``alias`` by its outcome (an index of
        ``key_usage.OUTCOMES``, from ``key_usage.outcome_of``). Called for every request of a
        known key, so it must not block or allocate: queued or added in place."""

    def quota_use(self) -> list[QuotaUse]:
        """The proxy-wide and upstream-key rolling windows, for ``/metrics`` (no waiting)."""

    async def limit_states(self, ops: Sequence[LimitOp]) -> list[dict[str, Any]]:
        """The state object of each op at one instant (``limits/report.py``: the shapes)."""

    async def usage_totals(self, aliases: Sequence[str]) -> list[dict[str, int]]:
        """Per client key alias its requests by outcome and token totals (the ``usage``
        object of ``/admin/keys``: ``key_usage.usage_report``)."""

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The backend's background work for the worker's lifetime (started before serving)."""

    async def aclose(self) -> None:
        """Send what is still queued before the worker exits."""


def _conforms(host: Admitter, fleet: FleetLimiter) -> tuple[Limiter, Limiter]:
    return host, fleet  # mypy checks here that both backends satisfy the Protocol
