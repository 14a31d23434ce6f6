"""Per-worker state shared by every connection of one worker process."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from itertools import count
from typing import TYPE_CHECKING

from zaiproxy.routing import Upstream
from zaiproxy.upstream import Origin, UpstreamPool

if TYPE_CHECKING:
    from zaiproxy.config import Config
    from zaiproxy.metrics import WorkerMetrics


# Values of the supervisor's shared state cell (read by /ready in every worker).
STATE_STARTING = 0
STATE_RUNNING = 1
STATE_DRAINING = 2


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
    ledger_impl: str
    http_impl: str = "h11"
    worker_index: int = 0
    shared_state: SharedState = field(default_factory=lambda: SharedState(None))
    draining: bool = False
    api_key: bytes | None = None
    _ids: count[int] = field(default_factory=count)
    _prefix: str = field(default_factory=lambda: os.urandom(4).hex())

    def next_request_id(self) -> bytes:
        # Unique across workers and restarts without uuid4's cost per request.
        return f"{self._prefix}{next(self._ids):08x}".encode("ascii")

    @property
    def ready(self) -> bool:
        return not self.draining and self.shared_state.get() == STATE_RUNNING
