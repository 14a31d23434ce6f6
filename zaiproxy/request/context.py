"""Per-worker state shared by every connection of one worker process."""

from __future__ import annotations

import os
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from itertools import count
from typing import TYPE_CHECKING, Any

import trio

from zaiproxy.limits.admission import Admitter, WaitQueue
from zaiproxy.request.routing import Upstream
from zaiproxy.upstream.pool import Origin, UpstreamPool
from zaiproxy.upstream.zai import RetryPolicy

if TYPE_CHECKING:
    from zaiproxy.core.config import Config
    from zaiproxy.core.record import Usage
    from zaiproxy.limits.keys import KeyTable
    from zaiproxy.observe.metrics import WorkerMetrics
    from zaiproxy.observe.recorder.sink import RecordSink


# Values of the supervisor's shared state cell (read by /ready in every worker).
STATE_STARTING = 0
STATE_RUNNING = 1
STATE_DRAINING = 2

# Words of a token-counter row: b"tokens\0<alias|->\0<model>\0<variant>\0<estimated 0|1>".
TOK_REQUESTS = 1
TOK_INPUT = 2
TOK_OUTPUT = 3
TOK_CACHE_READ = 4
TOK_CACHE_WRITE = 5


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
    ledger: Any = None  # the attached shared-memory Ledger
    admitter: Admitter = None  # type: ignore[assignment]  # set by build_context
    keys: KeyTable | None = None  # None = open mode (no keys file)
    wait_queue: WaitQueue = field(default_factory=lambda: WaitQueue(1024))
    # Set (and replaced) whenever this worker settles a request: wakes queued requests.
    released: trio.Event = field(default_factory=trio.Event)
    known_models: frozenset[str] = frozenset()
    retry_policy: RetryPolicy = field(default_factory=RetryPolicy)
    record_sink: RecordSink | None = None  # the history recorder's channel; None: history off
    # GET /admin/history asks the recorder through this (zaiproxy/observe/recorder/client.py).
    history_query: Callable[[str, str], Awaitable[dict[str, Any]]] | None = None
    # Seams for tests (a virtual clock): the Z.AI retry wait, wall time, the jitter factor.
    retry_sleep: Callable[[float], Awaitable[None]] = trio.sleep
    wall: Callable[[], float] = time.time
    jitter: Callable[[], float] = field(default=lambda: 0.5 + random.random() / 2)
    _token_rows: dict[tuple[str | None, str, bool], int] = field(default_factory=dict)
    _key_rows: dict[str, int] = field(default_factory=dict)
    _ids: count[int] = field(default_factory=count)
    _prefix: str = field(default_factory=lambda: os.urandom(4).hex())

    def next_request_id(self) -> bytes:
        # Unique across workers and restarts without uuid4's cost per request.
        return f"{self._prefix}{next(self._ids):08x}".encode("ascii")

    def count_tokens(self, alias: str | None, model: str, usage: Usage, estimated: bool) -> None:
        """Add one request's tokens to the ledger counters of (key, model, variant, estimated)."""
        key = (alias, model, estimated)
        row = self._token_rows.get(key)
        if row is None:
            name = b"\0".join((b"tokens", (alias or "-").encode(), model.encode(),
                               self.config.deployment_variant.encode(), b"%d" % estimated))
            row = self.ledger.row(name)
            self._token_rows[key] = row
        self._add_usage(row, usage)
        if alias is not None:
            self._add_usage(self._key_row(alias), usage)  # the key's totals, all models

    def _key_row(self, alias: str) -> int:
        row = self._key_rows.get(alias)
        if row is None:
            row = self.ledger.row(b"keyusage\0" + alias.encode())
            self._key_rows[alias] = row
        return row

    def _add_usage(self, row: int, usage: Usage) -> None:
        add = self.ledger.counter_add
        add(row, TOK_REQUESTS, 1)
        add(row, TOK_INPUT, usage.input_tokens)
        add(row, TOK_OUTPUT, usage.output_tokens)
        if usage.cache_read_tokens:
            add(row, TOK_CACHE_READ, usage.cache_read_tokens)
        if usage.cache_write_tokens:
            add(row, TOK_CACHE_WRITE, usage.cache_write_tokens)

    def key_usage(self, alias: str) -> dict[str, int]:
        """Token totals of one client key across all workers (since the segment was made)."""
        row = self._key_row(alias)
        get = self.ledger.counter_get
        return {"requests": get(row, TOK_REQUESTS), "input_tokens": get(row, TOK_INPUT),
                "output_tokens": get(row, TOK_OUTPUT),
                "cache_read_tokens": get(row, TOK_CACHE_READ),
                "cache_write_tokens": get(row, TOK_CACHE_WRITE)}

    @property
    def ready(self) -> bool:
        return not self.draining and self.shared_state.get() == STATE_RUNNING
