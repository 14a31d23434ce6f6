"""The dashboard's state: everything received so far and the operator's choices (no Textual).

The app feeds it what the source reports (:meth:`Dashboard.apply`,
:meth:`set_history`, :meth:`set_keys`, ...) and the widgets read views of it
(:mod:`zaiproxy_tui.views`). Live points are kept per variant in a bounded deque (at
the proxy's 2 s interval, 4096 points are 2 h 16 min; older ones come from
history, which is re-queried every :meth:`history_refresh_s`).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from zaiproxy_tui.model import (
    BOTH,
    CANARY,
    PRODUCTION,
    RANGES,
    History,
    KeysReport,
    Point,
    Snapshot,
)
from zaiproxy_tui.source import AuthRequired, Connected, Connecting, FeedEvent, Reconnecting

LIVE_POINTS = 4096
DEFAULT_INTERVAL = 2.0
STALE_INTERVALS = 3


@dataclass(frozen=True, slots=True)
class Connection:
    kind: str  # connecting | connected | reconnecting | auth
    error: str = ""
    retry_at: float = 0.0
    attempt: int = 0


class Dashboard:
    def __init__(self, url: str, *, range_: str = "15m", mode: str = PRODUCTION) -> None:
        self.url = url
        self.range = range_
        self.mode = mode
        self.paused = False
        self.connection = Connection("connecting")
        self.source_kind: str | None = None  # proxy | collector | prometheus
        self.interval = DEFAULT_INTERVAL
        self.latest: Snapshot | None = None
        self.received_at: float | None = None  # local clock: stale is judged on it, not on
        self.first: Snapshot | None = None     # the server's (possibly skewed) clock
        self.live: dict[str, deque[Point]] = {}
        self.history: History | None = None
        self.history_error: str | None = None
        self.keys: KeysReport | None = None
        self.keys_error: str | None = None

    # ---- what the source reports ----------------------------------------------------

    def apply(self, event: FeedEvent, now: float) -> None:
        if isinstance(event, Snapshot):
            self._snapshot(event, now)
        elif isinstance(event, Connected):
            self.connection = Connection("connected")
            if event.interval:
                self.interval = event.interval
        elif isinstance(event, Connecting):
            if self.connection.kind != "reconnecting":
                self.connection = Connection("connecting", attempt=event.attempt)
        elif isinstance(event, Reconnecting):
            self.connection = Connection("reconnecting", event.error, event.retry_at,
                                         event.attempt)
        elif isinstance(event, AuthRequired):
            self.connection = Connection("auth", event.message)

    def _snapshot(self, snap: Snapshot, now: float) -> None:
        self.connection = Connection("connected")
        self.source_kind = snap.source
        if snap.interval:
            self.interval = snap.interval
        if self.first is None:
            self.first = snap
        self.latest, self.received_at = snap, now
        for name, v in snap.variants.items():
            if v.rates is not None:
                self.live.setdefault(name, deque(maxlen=LIVE_POINTS)).append(v.rates)

    def set_history(self, history: History) -> None:
        if history.range != self.range:
            return  # an answer for a range the operator has since left
        self.history, self.history_error = history, None
        # What the history covers needs no live points any more.
        for points in self.live.values():
            while points and points[0].t <= history.end - RANGES[self.range]:
                points.popleft()

    def set_history_error(self, message: str) -> None:
        self.history_error = message

    def set_keys(self, report: KeysReport) -> None:
        self.keys, self.keys_error = report, None

    def set_keys_error(self, message: str) -> None:
        self.keys_error = message

    # ---- the operator's choices ----------------------------------------------------------

    def cycle_mode(self) -> str:
        """The next view: production, then each other variant the source reports, then
        both (from a view that is none of these: production)."""
        order = self.mode_cycle()
        current = self.variants()[0] if self.mode == CANARY else self.mode
        self.mode = (order[(order.index(current) + 1) % len(order)] if current in order
                     else PRODUCTION)
        return self.mode

    def mode_cycle(self) -> tuple[str, ...]:
        """What ``v`` steps through, in order."""
        named = () if self.mode in (PRODUCTION, CANARY, BOTH) else (self.mode,)
        others = sorted(set(self.canaries()) | set(named))
        return (PRODUCTION, *others, BOTH)

    def set_range(self, range_: str) -> bool:
        """True when it changed (history must be re-queried)."""
        if range_ not in RANGES or range_ == self.range:
            return False
        self.range, self.history, self.history_error = range_, None, None
        return True

    def step_range(self, step: int) -> bool:
        names = list(RANGES)
        i = max(0, min(len(names) - 1, names.index(self.range) + step))
        return self.set_range(names[i])

    # ---- derived ----------------------------------------------------------------------------

    def variants(self) -> tuple[str, ...]:
        """The variants the screen shows: one, or production and the others overlaid."""
        if self.mode == BOTH:
            return (PRODUCTION, *self.canaries())
        if self.mode == CANARY:
            others = self.canaries()
            # The variant named canary; a canary deployed under another name (the original
            # service's runbook calls it "test") when it is the only other one.
            return (others[0] if len(others) == 1 else CANARY,)
        return (self.mode,)

    def canaries(self) -> tuple[str, ...]:
        """The variants besides production that the source reports, by name; ("canary",)
        while it reports none (its panels then say there is no data for it)."""
        return tuple(sorted(self.known_variants() - {PRODUCTION})) or (CANARY,)

    def stale(self, now: float) -> bool:
        """The newest snapshot is older than three intervals (the proxy stopped updating)."""
        return (self.received_at is not None
                and now - self.received_at > STALE_INTERVALS * self.interval)

    def known_variants(self) -> set[str]:
        names = set(self.live)
        if self.latest is not None:
            names |= set(self.latest.variants)
        if self.history is not None:
            names |= {n for n, pts in self.history.series.items() if pts}
        return names

    def history_refresh_s(self) -> float:
        """How often history is re-queried: its step, at least every 10 s, at most every 5 min."""
        step = self.history.step if self.history is not None else 10.0
        return max(10.0, min(300.0, step))
