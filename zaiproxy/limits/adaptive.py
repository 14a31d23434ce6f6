"""The adaptive upstream rate: how many requests per second the proxy sends to Z.AI.

Pure logic on a clock passed in. One :class:`AdaptiveRate` per upstream key lives in the
supervisor; about once a second it is told what the workers counted since the last tick
(:class:`Tick`: upstream answers, account-throttle 429s by class, and the number of distinct
requests among them) and decides; when something changed the supervisor publishes it to shared
memory, where every worker's admission reads it. The reasoning, the alternatives and the
numbers are in docs/decisions/adaptive-rate.md.

Evidence (what lowers the rate)
-------------------------------
Only *account throttles* count: Z.AI 1302 (concurrency) and 1303 (frequency), and a 429
without a Z.AI code (``zai.feeds_adaptive``). 1305 (overloaded) and 1312 (congestion) are
Z.AI's capacity and back off only the retries of the request that got them; quota answers are
relayed (hours away). Over a sliding window of ``evidence_s`` (never reaching back past the
previous decrease, whose evidence is spent) the tick is *evidence* when

* at least ``min_throttled_requests`` distinct requests were throttled. A request counts once
  per evidence epoch (``evidence_count``: each evidence event starts one) however many of its
  attempts were throttled: its retries were scheduled by our own backoff and are not
  independent samples, so one client's four 429s cannot cap a host
  (the Go original capped on the 429 *share* of a 30 s window, which one slow request could
  reach); and
* throttled answers are at least ``min_throttle_share`` of all answers in the window (the
  original's 5 %): a few 429s among many successes are the edge of Z.AI's window, which its
  ``Retry-After`` already handles.

Down, from what was observed
----------------------------
The observed send rate is ``answers / span`` (the window's span, at least one tick). The
ceiling is an EWMA of observed send rates at which evidence arrived
(``ceiling = alpha*sent + (1-alpha)*ceiling``, the first sample as is) and
``rate = max(min_rps, min(min(rate, sent)*backoff, ceiling*hold_fraction))``. The old rule
multiplied the *nominal* rate: a throttle while unlimited (nominal 1000 rps) "learned" 1000 and
set 700, a cap nobody had sent at; the observed rate is what Z.AI actually refused. Each
decrease clears the window: the next one needs fresh evidence at the new rate (TCP reduces
once per round trip for the same reason, RFC 5681).

Up, by time (and by traffic)
----------------------------
A cap that nothing tests must decay. Counting from the last evidence, each ``recovery_step_s``
of quiet is one step, whether or not anything is sent:

- below the hold line (``ceiling*hold_fraction``), or with no ceiling: ``rate *= recovery_growth``
  (never past the hold line);
- at or above it: ``rate *= 1 + probe_step`` once every ``hold_steps`` steps; evidence while
  there (the probe failed) doubles ``hold_steps`` up to ``max_hold_steps``;
- traffic: a step whose observed clean send rate beat the ceiling proves the ceiling stale
  (Z.AI's limit was raised): it is forgotten and the rate grows freely;
- ``forget_after_s`` after the last evidence everything learned is forgotten: the rate is back
  to where it started (unlimited in the proxy). This is the stated bound: no cap outlives its
  last evidence by more than ``forget_after_s`` (default 300 s).

Persistence
-----------
:func:`save_state` writes ``{"version": 2, "saved_at", "keys": {key id: {"rate", "ceiling",
"throttled_at", "hold_steps", "reason"}}}`` atomically, ``throttled_at`` being the wall time of
the last evidence. :meth:`AdaptiveRate.load` restores a key's entry only while that evidence is
younger than ``forget_after_s`` (and the file younger than ``state_max_age_s``), and then owes
the recovery steps of the time it was down: a state file older than its evidence never caps a
fresh start. Version 1 files (no evidence time) are recognised and not restored as a cap.
Loading never raises and says why it chose what it chose, for the log.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, Final, TypeGuard

from zaiproxy.core.config import ADAPTIVE_RECOVERY_STEP_S

STATE_VERSION: Final = 2
# A state file is a few hundred bytes; anything much bigger is not ours.
_STATE_MAX_BYTES: Final = 64 * 1024
# Tolerance when asking "is the rate at the hold line?" (the line is recomputed from the ceiling).
_EPS: Final = 1e-9
# The shortest span a send rate is measured over: the supervisor's tick. A burst that arrived
# within one tick is averaged over that tick, not over the microseconds it took.
_MIN_SPAN_S: Final = 1.0
# The default recovery step (config.py checks adaptive_forget_after against it).
RECOVERY_STEP_S: Final = ADAPTIVE_RECOVERY_STEP_S
# The classes of account throttle, in the order a tie names the reason.
REASONS: Final = ("frequency", "concurrency", "unknown")


@dataclass(frozen=True, kw_only=True)
class AdaptiveSettings:
    initial_rps: float
    min_rps: float = 0.5
    max_rps: float
    backoff: float = 0.7  # multiplicative decrease of the observed send rate
    evidence_s: float = 10.0  # the window the send rate and the throttle share are measured over
    min_throttled_requests: int = 3  # distinct throttled requests in the window for a decrease
    min_throttle_share: float = 0.05  # throttled answers / all answers in the window
    ewma_alpha: float = 0.3  # weight of the newest observed rate in the ceiling
    hold_fraction: float = 0.9  # recover quickly up to this fraction of the ceiling, then probe
    recovery_step_s: float = RECOVERY_STEP_S  # one recovery step per this long without evidence
    recovery_growth: float = 2.0  # per step below the hold line (or with no ceiling)
    probe_step: float = 0.1  # per hold_steps steps at/above the hold line
    hold_steps: int = 1  # steps per probe at/above the hold line (doubles on a failed probe)
    max_hold_steps: int = 8
    forget_after_s: float = 300.0  # no evidence for this long: nothing learned is kept
    state_max_age_s: float = 6 * 3600  # a state file saved longer ago than this is not read

    def __post_init__(self) -> None:
        problems = [
            f"{f.name}: must be a finite number"
            for f in fields(self)
            if not math.isfinite(getattr(self, f.name))
        ]
        if problems:
            raise ValueError("; ".join(problems))
        checks = [
            (0 < self.min_rps <= self.initial_rps <= self.max_rps,
             "need 0 < min_rps <= initial_rps <= max_rps"),
            (0 < self.backoff < 1, "backoff: must be in (0, 1)"),
            (self.evidence_s > 0, "evidence_s: must be > 0"),
            (self.min_throttled_requests >= 1, "min_throttled_requests: must be >= 1"),
            (0 <= self.min_throttle_share <= 1, "min_throttle_share: must be in [0, 1]"),
            (0 < self.ewma_alpha <= 1, "ewma_alpha: must be in (0, 1]"),
            (0 < self.hold_fraction <= 1, "hold_fraction: must be in (0, 1]"),
            (self.recovery_step_s > 0, "recovery_step_s: must be > 0"),
            (self.recovery_growth > 1, "recovery_growth: must be > 1"),
            (self.probe_step > 0, "probe_step: must be > 0"),
            (1 <= self.hold_steps <= self.max_hold_steps,
             "need 1 <= hold_steps <= max_hold_steps"),
            (self.forget_after_s > self.recovery_step_s,
             "forget_after_s: must be greater than recovery_step_s"),
            (self.state_max_age_s > 0, "state_max_age_s: must be > 0"),
        ]
        problems = [reason for ok, reason in checks if not ok]
        if problems:
            raise ValueError("; ".join(problems))

    def clamp(self, rate: float) -> float:
        return min(self.max_rps, max(self.min_rps, rate))


@dataclass(frozen=True, slots=True)
class Tick:
    """What every worker counted since the previous tick, summed (the activity rows)."""

    answers: int = 0  # upstream answers: every attempt of every request
    concurrency: int = 0  # 1302 answers
    frequency: int = 0  # 1303 answers
    unknown: int = 0  # 429s without a Z.AI code
    throttled_requests: int = 0  # distinct requests among those (once per evidence epoch)

    def __post_init__(self) -> None:
        if min(self.answers, self.concurrency, self.frequency, self.unknown,
               self.throttled_requests) < 0:
            raise ValueError(f"counts must be >= 0: {self}")

    @property
    def throttled(self) -> int:
        return self.concurrency + self.frequency + self.unknown

    def __add__(self, other: Tick) -> Tick:
        return Tick(self.answers + other.answers, self.concurrency + other.concurrency,
                    self.frequency + other.frequency, self.unknown + other.unknown,
                    self.throttled_requests + other.throttled_requests)


@dataclass(frozen=True, slots=True)
class SavedRate:
    """What one upstream key's rate leaves in the state file."""

    rate: float
    ceiling: float | None
    throttled_at: float  # wall clock (unix s) of the last evidence
    hold_steps: int = 1
    reason: str | None = None


class AdaptiveRate:
    """The current upstream rate and what was learned about Z.AI's limit (see module docstring)."""

    def __init__(
        self,
        settings: AdaptiveSettings,
        *,
        rate: float | None = None,
        ceiling: float | None = None,
        evidence_age: float | None = None,
        hold_steps: int | None = None,
        reason: str | None = None,
    ) -> None:
        """``evidence_age``: seconds since the last evidence at the first tick (a restored
        state; None = no evidence, which is also what a fresh start is)."""
        self._settings = settings
        self._up = 0
        self._down = 0
        self._evidence_count = 0
        self._last_tick: float | None = None
        self._restore(rate, ceiling, evidence_age, hold_steps, reason)

    def _restore(self, rate: float | None, ceiling: float | None, evidence_age: float | None,
                 hold_steps: int | None, reason: str | None) -> None:
        s = self._settings
        self._rate = s.initial_rps if rate is None else s.clamp(rate)
        self._ceiling = None if ceiling is None else s.clamp(ceiling)
        self._hold_steps = (s.hold_steps if hold_steps is None
                            else min(s.max_hold_steps, max(s.hold_steps, hold_steps)))
        self._held = 0  # steps completed at/above the hold line since the last probe
        self._reason = reason if reason in REASONS else None
        self._pending_age = evidence_age  # applied at the first tick (the clock is unknown here)
        self._last_evidence: float | None = None
        self._steps = 0  # recovery steps taken since the last evidence
        self._step_start = 0.0
        self._step_answers = 0
        self._window: deque[tuple[float, Tick]] = deque()
        self._window_floor = 0.0  # the window never reaches back past this (last decrease)

    # --- what it knows ----------------------------------------------------------------------

    @property
    def settings(self) -> AdaptiveSettings:
        return self._settings

    @property
    def rate(self) -> float:
        """Requests per second the workers may send upstream (all workers together)."""
        return self._rate

    @property
    def ceiling(self) -> float | None:
        """EWMA of the observed send rates at which evidence arrived; None until the first
        (or once forgotten)."""
        return self._ceiling

    @property
    def hold_line(self) -> float | None:
        return None if self._ceiling is None else self._ceiling * self._settings.hold_fraction

    @property
    def hold_steps(self) -> int:
        """Recovery steps per probe at/above the hold line, currently."""
        return self._hold_steps

    @property
    def limiting(self) -> bool:
        """False while nothing is learned and the rate is at the maximum (published as 0)."""
        return self._ceiling is not None or self._rate < self._settings.max_rps

    @property
    def reason(self) -> str | None:
        """The class most of the last evidence was (``frequency``, ``concurrency``, ``unknown``)."""
        return self._reason

    @property
    def evidence_count(self) -> int:
        """Evidence events so far: the decrease *epoch* a worker counts a request once in."""
        return self._evidence_count

    @property
    def adjustments(self) -> dict[str, int]:
        """Rate changes so far by direction (``up``/``down``), for a counter metric."""
        return {"up": self._up, "down": self._down}

    def evidence_age(self, now: float) -> float | None:
        """Seconds since the last evidence (None: none, or forgotten)."""
        if self._last_evidence is None:
            return self._pending_age
        return max(0.0, now - self._last_evidence)

    def free_in(self, now: float) -> float | None:
        """Seconds until every cap learned is forgotten at the latest (None: nothing learned)."""
        age = self.evidence_age(now)
        return None if age is None else max(0.0, self._settings.forget_after_s - age)

    # --- ticks ------------------------------------------------------------------------------

    def on_tick(self, now: float, tick: Tick) -> bool:
        """Account one tick (counts since the previous tick); True if what is published changed
        (the rate, the ceiling or the evidence), i.e. publish and save."""
        last = self._last_tick
        self._last_tick = now
        if last is None or now < last:
            # The first tick (or a clock that went back) opens the window; earlier counts are
            # from an unknown interval, so they are not counted in it.
            if last is not None and self._last_evidence is not None:
                self._last_evidence -= last - now  # keep the quiet time already served
                self._step_start -= last - now
            self._open(now)
            return self._recover(now)
        s = self._settings
        self._window.append((now, tick))
        while self._window and self._window[0][0] <= now - s.evidence_s:
            self._window.popleft()
        self._step_answers += tick.answers
        total = sum((t for _, t in self._window), Tick())
        if (total.throttled_requests >= s.min_throttled_requests and total.throttled > 0
                and total.throttled >= s.min_throttle_share * total.answers):
            return self._on_evidence(now, total)
        return self._recover(now)

    def reset(self) -> None:
        """Back to ``initial_rps`` with nothing learned; the counters are kept. The next tick
        opens a new window, like the first one (what was counted before is not evidence)."""
        self._restore(None, None, None, None, None)
        self._last_tick = None

    def _open(self, now: float) -> None:
        self._window.clear()
        self._window_floor = now
        if self._pending_age is not None:
            self._last_evidence = now - self._pending_age
            self._pending_age = None
            self._step_start = now

    def _on_evidence(self, now: float, total: Tick) -> bool:
        s = self._settings
        span = max(_MIN_SPAN_S, now - max(self._window_floor, now - s.evidence_s))
        sent = total.answers / span
        rate = self._rate
        hold = self.hold_line
        if hold is not None and rate >= hold * (1 - _EPS):
            # Evidence while holding or probing beyond the hold line: probe less often.
            self._hold_steps = min(self._hold_steps * 2, s.max_hold_steps)
        self._held = 0
        observed = s.clamp(sent)
        if self._ceiling is None:
            self._ceiling = observed
        else:
            self._ceiling = s.ewma_alpha * observed + (1 - s.ewma_alpha) * self._ceiling
        counts = {"frequency": total.frequency, "concurrency": total.concurrency,
                  "unknown": total.unknown}
        self._reason = max(REASONS, key=lambda name: counts[name])  # first of REASONS on a tie
        self._evidence_count += 1
        self._last_evidence = now
        self._steps = 0
        self._step_start, self._step_answers = now, 0
        self._window.clear()
        self._window_floor = now
        new = max(s.min_rps, min(min(rate, sent) * s.backoff, self._ceiling * s.hold_fraction))
        self._set(new, "down")
        return True  # the evidence time changed even when the rate could not go lower

    def _recover(self, now: float) -> bool:
        s = self._settings
        if self._last_evidence is None:
            return False
        quiet = now - self._last_evidence
        if quiet >= s.forget_after_s:
            # Nothing has tested this cap for forget_after_s: forget it all (keep the counters).
            rate = self._rate
            self._restore(max(rate, s.initial_rps), None, None, None, None)
            self._window_floor = now
            if self._rate > rate:
                self._up += 1
            return True
        due = int(quiet // s.recovery_step_s)
        changed = False
        while self._steps < due:
            self._steps += 1
            changed = self._step(now) or changed
        return changed

    def _step(self, now: float) -> bool:
        s = self._settings
        elapsed = now - self._step_start
        observed = self._step_answers / elapsed if elapsed > 0 else 0.0
        self._step_start, self._step_answers = now, 0
        if self._ceiling is not None and observed > self._ceiling:
            # Sent faster than the rate evidence came at, without evidence: Z.AI's limit was
            # raised. Forget the stale ceiling instead of holding below it.
            self._ceiling = None
            self._hold_steps = s.hold_steps
            self._held = 0
            changed = True
        else:
            changed = False
        rate = self._rate
        hold = self.hold_line
        if hold is None:
            new = rate * s.recovery_growth
        elif rate < hold * (1 - _EPS):
            new = min(rate * s.recovery_growth, hold)
        else:
            self._held += 1
            if self._held < self._hold_steps:
                return changed
            self._held = 0
            new = rate * (1 + s.probe_step)
        return self._set(min(s.max_rps, new), "up") or changed

    def _set(self, new: float, direction: str) -> bool:
        if new == self._rate:
            return False
        self._rate = new
        if direction == "up":
            self._up += 1
        else:
            self._down += 1
        return True

    def __repr__(self) -> str:
        ceiling = "None" if self._ceiling is None else f"{self._ceiling:.3f}"
        return (
            f"AdaptiveRate(rate={self._rate:.3f}, ceiling={ceiling}, "
            f"hold_steps={self._hold_steps}, up={self._up}, down={self._down})"
        )

    # --- persistence ------------------------------------------------------------------------

    def saved(self, now: float, now_wall: float) -> SavedRate | None:
        """What to persist at ``now`` (monotonic) / ``now_wall``; None: nothing learned."""
        age = self.evidence_age(now)
        if age is None:
            return None
        return SavedRate(self._rate, self._ceiling, now_wall - age, self._hold_steps,
                         self._reason)

    @classmethod
    def load(
        cls, path: str | os.PathLike[str], settings: AdaptiveSettings, now_wall: float,
        key: str,
    ) -> tuple[AdaptiveRate, str]:
        """The saved state of upstream key ``key`` if its evidence is recent enough, else a
        fresh one; never raises. Also returns why (for the log)."""
        start = f"starting at {settings.initial_rps:g} rps"
        try:
            with open(path, "rb") as fh:
                raw = fh.read(_STATE_MAX_BYTES + 1)
        except FileNotFoundError:
            return cls(settings), f"no saved adaptive state; {start}"
        except OSError as exc:
            return cls(settings), f"saved adaptive state unreadable ({exc.strerror or exc}); {start}"
        return cls.from_document(raw, settings, now_wall, key)

    @classmethod
    def from_document(cls, raw: bytes, settings: AdaptiveSettings, now_wall: float,
                      key: str) -> tuple[AdaptiveRate, str]:
        """:meth:`load` from the document's bytes (the state file's format, also what the
        fleet's leader keeps in Redis: limits/fleet_rate.py); never raises."""
        start = f"starting at {settings.initial_rps:g} rps"
        problem, state = _parse_state(raw)
        if state is None:
            return cls(settings), f"saved adaptive state ignored ({problem}); {start}"
        saved_at, keys = state
        age = now_wall - saved_at
        if age < 0:
            return cls(settings), f"saved adaptive state ignored (saved in the future); {start}"
        if age >= settings.state_max_age_s:
            return cls(settings), (
                f"saved adaptive state ignored (too old: {age:.0f} s, max "
                f"{settings.state_max_age_s:g} s); {start}"
            )
        entry = keys.get(key)
        if entry is None:
            return cls(settings), f"no saved adaptive state for this upstream key; {start}"
        quiet = now_wall - entry.throttled_at
        if quiet < 0:
            return cls(settings), (
                f"saved adaptive state ignored (last throttle in the future); {start}")
        if quiet >= settings.forget_after_s:
            return cls(settings), (
                f"saved adaptive state not restored (last throttle {quiet:.0f} s ago, "
                f"forgotten after {settings.forget_after_s:g} s); {start}"
            )
        restored = cls(settings, rate=entry.rate, ceiling=entry.ceiling, evidence_age=quiet,
                       hold_steps=entry.hold_steps, reason=entry.reason)
        learned = "none" if restored.ceiling is None else f"{restored.ceiling:.3g} rps"
        return restored, (
            f"restored adaptive rate {restored.rate:.3g} rps (ceiling {learned}) from a "
            f"throttle {quiet:.0f} s ago; forgotten in {settings.forget_after_s - quiet:.0f} s "
            "at the latest"
        )


def state_document(rates: Mapping[str, SavedRate | None], now_wall: float) -> bytes:
    """The saved state of every upstream key as JSON (keys with nothing learned left out)."""
    keys = {
        key: {"rate": r.rate, "ceiling": r.ceiling, "throttled_at": r.throttled_at,
              "hold_steps": r.hold_steps, "reason": r.reason}
        for key, r in rates.items() if r is not None
    }
    return json.dumps({"version": STATE_VERSION, "saved_at": now_wall, "keys": keys},
                      allow_nan=False).encode()


def save_state(path: str | os.PathLike[str], rates: Mapping[str, SavedRate | None],
               now_wall: float) -> None:
    """Write the state of every upstream key atomically (temp file in the same dir, fsync,
    rename); keys with nothing learned are left out, so a forgotten cap is gone from disk too.

    Raises OSError; the caller logs it and carries on (a lost save costs a re-learn).
    """
    path = os.fspath(path)
    data = state_document(rates, now_wall)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    # Make the rename itself durable. Some filesystems refuse fsync on a directory; the file
    # is in place either way, so that is not worth failing the save for.
    with contextlib.suppress(OSError):
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _parse_state(raw: bytes) -> tuple[str, tuple[float, dict[str, SavedRate]] | None]:
    """(problem, None) or ("", (saved_at, entries by key)) from the state file's bytes.

    Version 1 (``{"version": 1, "rate", "ceiling", "saved_at"}``) is recognised and refused:
    it says when the file was written, not when Z.AI last throttled, and a cap of unknown age
    is exactly what must not come back.
    """
    if len(raw) > _STATE_MAX_BYTES:
        return "file too large", None
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return "not JSON", None
    if not isinstance(doc, dict):
        return "not a JSON object", None
    version = doc.get("version")
    if version == 1 and not isinstance(version, bool):
        return "format 1 has no throttle time: a cap of unknown age is not restored", None
    if isinstance(version, bool) or version != STATE_VERSION:
        return f"version is not {STATE_VERSION}", None
    saved_at, keys = doc.get("saved_at"), doc.get("keys")
    if not _positive(saved_at):
        return "saved_at is not a positive number", None
    if not isinstance(keys, dict):
        return "keys is not an object", None
    entries: dict[str, SavedRate] = {}
    for key, entry in keys.items():
        problem, saved = _parse_entry(entry)
        if saved is None:
            return f"key {key[:32]!r}: {problem}", None
        entries[key] = saved
    return "", (float(saved_at), entries)


def _parse_entry(entry: Any) -> tuple[str, SavedRate | None]:
    if not isinstance(entry, dict):
        return "not an object", None
    rate, ceiling, at = entry.get("rate"), entry.get("ceiling"), entry.get("throttled_at")
    hold, reason = entry.get("hold_steps", 1), entry.get("reason")
    if not _positive(rate):
        return "rate is not a positive number", None
    if ceiling is not None and not _positive(ceiling):
        return "ceiling is not a positive number or null", None
    if not _positive(at):
        return "throttled_at is not a positive number", None
    if isinstance(hold, bool) or not isinstance(hold, int) or hold < 1:
        return "hold_steps is not a positive integer", None
    return "", SavedRate(float(rate), None if ceiling is None else float(ceiling), float(at),
                         hold, reason if reason in REASONS else None)


def _positive(value: object) -> TypeGuard[int | float]:
    # bool is an int subclass, and `true` is not a rate.
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return math.isfinite(value) and value > 0
