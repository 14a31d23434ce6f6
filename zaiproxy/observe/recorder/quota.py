"""Z.AI's own quota into the history (schema v6, table ``zai_quota``), beside the proxy's count.

The supervisor's poller (limits/zai_quota.py) writes each upstream key's latest sample into
ledger rows and bumps that key's sequence. The recorder's snapshot loop (every 5 s) asks
:meth:`QuotaFeed.new` for the samples whose sequence moved since the last one recorded: one
row per key and window of each new sample, never one per snapshot. The recorder writes them
in its DuckDB thread (:meth:`HistoryStore.write_zai_quota`) and only then calls
:meth:`QuotaFeed.recorded`: a write that failed (DuckDB unavailable) is tried again at the
next snapshot, with the key's sample as it is then (the rows keep only the latest sample, as
the ledger does). Reading is a few shared-memory words per key, done on the recorder's trio
loop: nothing here waits.

``local_used_fraction``: the proxy's own rolling windows of the same key, read from the same
ledger through an :class:`~zaiproxy.limits.admission.Admitter` built as a worker builds its
own (run/worker.py ``build_limiter``, which this wing may not import; tests/test_recorder_quota.py
checks that both read the same cells): ``upstream_requests_per_5h`` / ``upstream_tokens_per_5h``
for ``five_hour``, ``*_per_week`` for ``weekly`` (a pool file's per-key limits where set), the
higher share when both are set, capped at 1 like ``zai_proxy_quota_used_ratio``. None when no
such limit is configured for the key, and with ``limits_backend = "redis"``: the fleet counts
in Redis, this host's ledger holds only its fallback's share.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from zaiproxy.core import logs
from zaiproxy.core.limitspec import FIVE_HOURS_NS, WEEK_NS, Limits
from zaiproxy.limits.admission import Admitter, LimitOp
from zaiproxy.limits.upstream_keys import PoolSpec, UpstreamKeysError, pool_of
from zaiproxy.limits.zai_quota import QuotaBoard, QuotaView

if TYPE_CHECKING:
    from zaiproxy.core.config import Config
    from zaiproxy.limits.segment import LedgerImpl, Segment

# The proxy's rolling windows (limits/admission.py LIMIT_SPECS) by Z.AI's names for them.
WINDOW_OF_PERIOD: Final = {FIVE_HOURS_NS: "five_hour", WEEK_NS: "weekly"}
_WINDOW_LIMITS: Final = ("requests_per_5h", "tokens_per_5h", "requests_per_week",
                         "tokens_per_week")


@dataclass(frozen=True, slots=True)
class QuotaRow:
    """One ``zai_quota`` row but its variant (schema.ZAI_QUOTA_COLUMNS; times in epoch s)."""

    ts: float  # the sample's time
    upstream: str
    window: str
    limit_type: str
    used_fraction: float
    reset_at: float | None
    plan_tier: str | None
    local_used_fraction: float | None


@dataclass(frozen=True, slots=True)
class QuotaBatch:
    """The rows of the samples new since the last batch recorded, and which they are."""

    rows: tuple[QuotaRow, ...]
    sequences: tuple[tuple[str, int], ...]  # (upstream alias, its sample's sequence)


def rows_of(view: QuotaView, local: Mapping[str, float]) -> tuple[QuotaRow, ...]:
    """A key's sample as rows, one per window it has (none before a first sample);
    ``local``: the proxy's own share per window name, where it counts one."""
    if view.last_success_at is None:
        return ()
    return tuple(QuotaRow(view.last_success_at, view.alias, w.window, w.limit_type,
                          w.used_fraction, w.reset_at, view.plan_tier, local.get(w.window))
                 for w in view.windows)


def upstream_scope_id(impl: LedgerImpl, key: bytes | None) -> bytes:
    """The scope a worker's admission gives upstream key ``key`` (run/worker.py
    ``build_limiter``): named by a hash of the key, never the key itself."""
    return b"upstream\0%x" % impl.stable_hash(key or b"")


class LocalWindows:
    """The proxy's own count of each upstream key's 5-hour and weekly windows."""

    def __init__(self, admitter: Admitter, keys: int) -> None:
        self.admitter = admitter
        window_kind = admitter.impl.KIND_WINDOW
        # Built here, not at the first read: a plan takes ledger rows (it may fail when the
        # ledger is full), reading them afterwards cannot.
        self.windows: tuple[tuple[tuple[str, LimitOp], ...], ...] = tuple(
            tuple((WINDOW_OF_PERIOD[op.period_ns], op)
                  for op in admitter.plan(None, None, index).ops
                  if op.kind == window_kind and op.scope == "upstream"
                  and op.period_ns in WINDOW_OF_PERIOD)
            for index in range(keys))

    def used(self, index: int) -> dict[str, float]:
        """Window name -> used share now of upstream key ``index`` (absent: no limit)."""
        admitter = self.admitter
        now = admitter.clock()
        used_of = admitter.ledger.window_used
        shares: dict[str, float] = {}
        for window, op in self.windows[index]:
            share = min(1.0, used_of(op.index, op.period_ns, now) / op.limit)
            shares[window] = max(shares.get(window, 0.0), share)
        return shares


def local_windows(config: Config, segment: Segment, impl: LedgerImpl,
                  spec: PoolSpec) -> LocalWindows | None:
    """The pool's own windows on this host's ledger; None when it has none to read."""
    if config.limits_backend == "redis":
        return None  # counted in Redis: the ledger's windows are the fallback's only
    if not any(getattr(k.limits, name) is not None for k in spec.keys
               for name in _WINDOW_LIMITS):
        return None
    # No global limits and no adaptive op: the plans hold the upstream scopes alone.
    admitter = Admitter(
        segment, impl, worker=0, global_limits=Limits(),
        upstream_limits=spec.keys[0].limits,
        upstream_id=upstream_scope_id(impl, spec.api_key_bytes(0)),
        adaptive=False,
        more_upstreams=[(upstream_scope_id(impl, k.key.encode()), k.limits)
                        for k in spec.keys[1:]])
    return LocalWindows(admitter, len(spec.keys))


class QuotaFeed:
    """Each upstream key's sample, once per new sample (the module docstring)."""

    def __init__(self, config: Config, boards: Sequence[QuotaBoard],
                 local: LocalWindows | None = None) -> None:
        """``boards``: one per upstream key, in the pool's order (``local``'s indices)."""
        self.config = config
        self.boards = tuple(boards)
        self.local = local
        self._recorded: dict[str, int] = {}

    def new(self) -> QuotaBatch:
        rows: list[QuotaRow] = []
        sequences: list[tuple[str, int]] = []
        for index, board in enumerate(self.boards):
            sequence = board.sequence()
            if sequence == 0 or self._recorded.get(board.alias) == sequence:
                continue  # no sample yet, or recorded
            # Read after the sequence (the poller writes the sequence last): a sample newer
            # than it may be read here, and is read again under its own sequence next time,
            # when the store skips it as known.
            view = board.view(self.config)
            local = self.local.used(index) if self.local is not None else {}
            rows.extend(rows_of(view, local))
            sequences.append((board.alias, sequence))
        return QuotaBatch(tuple(rows), tuple(sequences))

    def recorded(self, batch: QuotaBatch) -> None:
        """The batch is in the file (or can never be): its samples are not new any more."""
        self._recorded.update(batch.sequences)


def quota_feed(config: Config, segment: Segment, impl: LedgerImpl) -> QuotaFeed | None:
    """The recorder's feed on the supervisor's segment; None when Z.AI's quota is not polled
    (``quota_poll``, ``quota_pacing``) or the pool cannot be read."""
    if not (config.quota_poll or config.quota_pacing):
        return None
    log = logs.get_logger()
    try:
        spec = pool_of(config)  # read by the supervisor at start: a failure here is a race
    except UpstreamKeysError as exc:
        log.error("recorder_zai_quota_unavailable", error=str(exc).splitlines()[0][:300])
        return None
    boards = [QuotaBoard(segment, alias) for alias in spec.aliases]
    try:
        local = local_windows(config, segment, impl, spec)
    except impl.LedgerError as exc:  # a full ledger: Z.AI's numbers without ours
        log.error("recorder_local_quota_unavailable", error=str(exc)[:300])
        local = None
    return QuotaFeed(config, boards, local)
