"""What the request path needs from a limits backend: one typed interface.

Every limit that applies to a request is taken in ONE step and given back in one step:
:meth:`Limiter.admit` takes every reservation of the caller's :class:`Plan` or none and
answers an :class:`Admission` (held until settled) or the first :class:`Refusal` (with an
exact retry time); :meth:`Limiter.settle` releases the concurrency lease and charges or
refunds the difference between the reservation and the real usage. The request path
(``request/gate.py``, ``request/exchange.py``) sees nothing else.

:class:`~zaiproxy.limits.admission.Admitter` is the host's backend: the shared-memory ledger
(native or its pure twin, both behind :class:`~zaiproxy.limits.segment.Segment`). A backend
shared by a fleet (Redis: one server-side script to admit, one to settle) implements this
same Protocol; its ``Plan`` carries what its script needs instead of the ledger's op buffer.
The ``/admin/keys`` report still reads the shared-memory backend's rows directly
(``limits/report.py``).
"""

from __future__ import annotations

from typing import Protocol

from zaiproxy.core.limitspec import Limits
from zaiproxy.limits.admission import Admission, Admitter, Plan, RateState, Refusal


class Limiter(Protocol):
    def plan(self, alias: str | None, key_limits: Limits | None) -> Plan:
        """The limits of one caller (client key alias, or None in open mode), built once."""

    def admit(self, plan: Plan, tokens: int) -> Admission | Refusal:
        """Take every limit of ``plan`` for a request reserving ``tokens``, or none."""

    def settle(self, admission: Admission, used_tokens: int | None) -> None:
        """Release the lease; reconcile the reservation with ``used_tokens`` (None = keep)."""

    def rate_states(self, plan: Plan) -> tuple[RateState | None, RateState | None]:
        """The tightest per-minute request and token limits, for ``x-ratelimit-*``."""

    def note_upstream(self, throttle: str | None = None, counted_epoch: int = -1) -> int:
        """Count one upstream answer for the adaptive rate (``throttle``: its class)."""

    def forget_plans(self) -> None:
        """The client keys changed: plans are built again on first use."""


def _conforms(backend: Admitter) -> Limiter:
    return backend  # mypy checks here that the shared-memory backend satisfies the Protocol
