"""What one worker process serves with: built once by ``run/worker.py``, shared by its
connections.

Every field is set when the context is built (nothing is filled in later but the worker's
own state: ``draining``, the reloaded ``keys`` and the history seams of a recorder-backed
worker), and every field is typed: the ledger as the :class:`~zaiproxy.limits.segment.Segment`
Protocol both implementations satisfy.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from itertools import count
from typing import TYPE_CHECKING, Any

import trio

from zaiproxy.core.config import Config
from zaiproxy.core.labels import model_label
from zaiproxy.limits.admission import WaitQueue
from zaiproxy.limits.api import Limiter
from zaiproxy.limits.keys import KeyTable
from zaiproxy.limits.segment import Segment
from zaiproxy.request.routing import Upstream
from zaiproxy.upstream.pool import Origin, UpstreamPool
from zaiproxy.upstream.zai import RetryPolicy

if TYPE_CHECKING:
    from zaiproxy.http.pumphub import PumpHub
    from zaiproxy.limits.upstream_pool import KeyPool
    from zaiproxy.limits.zai_quota import PaceBoard
    from zaiproxy.observe.metrics import WorkerMetrics
    from zaiproxy.observe.recorder.sink import RecordSink


# Values of the supervisor's shared state cell (read by /ready in every worker).
STATE_STARTING = 0
STATE_RUNNING = 1
STATE_DRAINING = 2


@dataclass(frozen=True, slots=True)
class EventsTiming:
    """The pace of ``/admin/events``: a snapshot per ``interval``, a heartbeat comment per
    ``heartbeat``, and a consumer that cannot take one event in ``send_timeout`` is dropped."""

    interval: float = 2.0
    heartbeat: float = 15.0
    send_timeout: float = 5.0


class SharedState:
    """Read access to the supervisor's state cell (a multiprocessing shared ctypes int)."""

    def __init__(self, cell: object | None) -> None:
        self._cell = cell

    def get(self) -> int:
        if self._cell is None:
            return STATE_RUNNING
        return int(self._cell.value)  # type: ignore[attr-defined]


@dataclass(eq=False)
class WorkerContext:
    config: Config
    pool: UpstreamPool
    origins: dict[Upstream, Origin]
    metrics: WorkerMetrics
    ledger: Segment  # the attached shared-memory segment
    ledger_impl: str
    admitter: Limiter  # the limits backend: this host's ledger or the fleet's (Redis)
    keys: KeyTable | None  # None = open mode (no keys file); replaced on SIGHUP
    api_key: bytes | None
    wait_queue: WaitQueue
    retry_policy: RetryPolicy
    http_impl: str = "h11"
    worker_index: int = 0
    shared_state: SharedState = field(default_factory=lambda: SharedState(None))
    draining: bool = False
    # Set (and replaced) whenever this worker settles a request: wakes queued requests.
    released: trio.Event = field(default_factory=trio.Event)
    known_models: frozenset[str] = frozenset()
    record_sink: RecordSink | None = None  # the history recorder's channel; None: history off
    # GET /admin/history asks the recorder through this (observe/recorder/client.py).
    history_query: Callable[[str, str], Awaitable[dict[str, Any]]] | None = None
    events: EventsTiming = EventsTiming()
    # The native stream pump's hub (zaiproxy/http/pumphub.py), run by Worker.run; None with
    # ZAIPROXY_RELAY=python (no pump) or before it runs: pumped streams then wait alone.
    pump_hub: PumpHub | None = None
    # The pool of upstream keys: which key a request goes out with (limits/upstream_pool.py);
    # None only in tests that build a context by hand (then key 0 = ``api_key``).
    upstream_pool: KeyPool | None = None
    # Per upstream key, the pacing decision every request checks (quota_pacing): None = not
    # paced.
    quota_gates: tuple[PaceBoard, ...] | None = None
    # Seams for tests (a virtual clock): the Z.AI retry wait, wall time, the jitter factor.
    retry_sleep: Callable[[float], Awaitable[None]] = trio.sleep
    wall: Callable[[], float] = time.time
    jitter: Callable[[], float] = field(default=lambda: 0.5 + random.random() / 2)
    _ids: count[int] = field(default_factory=count)
    _prefix: str = field(default_factory=lambda: os.urandom(4).hex())

    def next_request_id(self) -> bytes:
        # Unique across workers and restarts without uuid4's cost per request.
        return f"{self._prefix}{next(self._ids):08x}".encode("ascii")

    def model_label(self, model: str | None) -> str:
        """The bounded label of ``model`` (core/labels.py: the metrics use the same)."""
        return model_label(model, self.known_models)

    @property
    def shutting_down(self) -> bool:
        """The supervisor is draining the host (every worker's /ready says so)."""
        return self.shared_state.get() == STATE_DRAINING

    @property
    def ready(self) -> bool:
        return not self.draining and self.shared_state.get() == STATE_RUNNING
