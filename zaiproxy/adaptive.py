"""The adaptive upstream rate: how many requests per second the proxy sends to Z.AI.

Pure logic on a clock passed in. One :class:`AdaptiveRate` lives in the supervisor; about once a
second it is told how many upstream requests and how many frequency-class or unclassified 429s
happened since the last tick (:meth:`AdaptiveRate.on_tick`), and when the rate changes the
supervisor publishes it to shared memory, where every worker's admission reads it.

Design (AIMD, like TCP congestion control, plus a memory of where throttling starts)
-------------------------------------------------------------------------------------
* Down, fast. A tick with throttling records the current rate in the *ceiling*, an EWMA of the
  rates at which Z.AI throttled us (``ceiling = alpha*rate + (1-alpha)*ceiling``; the first
  sample is taken as is), and sets ``rate = max(min_rps, min(rate*backoff, ceiling*hold_fraction))``.
  At most one decrease per ``decrease_interval_s``: the 429s that arrive just after a decrease
  answer requests admitted at the old rate, and counting them again would punish one overload
  twice (TCP reduces its window once per round trip for the same reason, RFC 5681).
* Up, slowly, and only on evidence. A *clean window* is ``clean_window_s`` without throttling in
  which the proxy actually sent at least ``min_utilization`` of the current rate: a window with no
  or little traffic says nothing about whether a higher rate would pass, so it never raises the
  rate (RFC 7661 does not grow an application-limited TCP window either). Each clean window:

  - no ceiling learned yet: ``rate *= 1 + probe_step``;
  - below the *hold line* (``ceiling*hold_fraction``): the same step, but never past the line,
    so after a backoff the rate climbs back to just below where throttling started and stops;
  - at or above the hold line: one step per ``hold_windows`` clean windows (1 to begin with).
    A throttle there means the probe failed: the next probes wait twice as long (up to
    ``max_hold_windows``), so a steady Z.AI limit costs a 429 burst ever more rarely;
  - a window that ran cleanly *faster* (observed requests per second) than the ceiling proves
    the ceiling stale (the limit was raised): it is forgotten and the hold resets, so probing
    continues at full speed until the next throttle teaches a new ceiling.

* ``reset()`` forgets everything but the adjustment counters (Prometheus counters never go down).
* Persistence: :meth:`AdaptiveRate.save` writes ``{"version", "rate", "ceiling", "saved_at"}``
  atomically; :meth:`AdaptiveRate.load` restores it when it is well-formed and younger than
  ``state_max_age_s`` (clamped to ``[min_rps, max_rps]``), otherwise starts fresh. Loading never
  raises and says why it chose what it chose, for the log.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from dataclasses import dataclass, fields
from typing import Final, TypeGuard

STATE_VERSION: Final = 1
# A state file is a few dozen bytes; anything much bigger is not ours.
_STATE_MAX_BYTES: Final = 64 * 1024
# Tolerance when asking "is the rate at the hold line?" (the line is recomputed from the ceiling).
_EPS: Final = 1e-9


@dataclass(frozen=True, kw_only=True)
class AdaptiveSettings:
    initial_rps: float
    min_rps: float = 0.5
    max_rps: float
    backoff: float = 0.7  # multiplicative decrease on throttling
    probe_step: float = 0.05  # fractional increase per clean window
    clean_window_s: float = 30.0
    ewma_alpha: float = 0.3  # weight of the newest throttling rate in the ceiling
    hold_fraction: float = 0.9  # hold this fraction of the learned ceiling
    state_max_age_s: float = 6 * 3600
    decrease_interval_s: float = 1.0  # at most one decrease per interval
    min_utilization: float = 0.5  # a window counts as clean only if this much of the rate was used
    hold_windows: int = 1  # clean windows per step at/above the hold line (doubles on failure)
    max_hold_windows: int = 16

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
            (self.probe_step > 0, "probe_step: must be > 0"),
            (self.clean_window_s > 0, "clean_window_s: must be > 0"),
            (0 < self.ewma_alpha <= 1, "ewma_alpha: must be in (0, 1]"),
            (0 < self.hold_fraction <= 1, "hold_fraction: must be in (0, 1]"),
            (self.state_max_age_s > 0, "state_max_age_s: must be > 0"),
            (self.decrease_interval_s >= 0, "decrease_interval_s: must be >= 0"),
            (0 <= self.min_utilization <= 1, "min_utilization: must be in [0, 1]"),
            (1 <= self.hold_windows <= self.max_hold_windows,
             "need 1 <= hold_windows <= max_hold_windows"),
        ]
        problems = [reason for ok, reason in checks if not ok]
        if problems:
            raise ValueError("; ".join(problems))

    def clamp(self, rate: float) -> float:
        return min(self.max_rps, max(self.min_rps, rate))


class AdaptiveRate:
    """The current upstream rate and what was learned about Z.AI's limit (see module docstring)."""

    def __init__(
        self,
        settings: AdaptiveSettings,
        *,
        rate: float | None = None,
        ceiling: float | None = None,
    ) -> None:
        self._settings = settings
        self._up = 0
        self._down = 0
        self._restore(rate, ceiling)

    def _restore(self, rate: float | None, ceiling: float | None) -> None:
        s = self._settings
        self._rate = s.initial_rps if rate is None else s.clamp(rate)
        self._ceiling = None if ceiling is None else s.clamp(ceiling)
        self._hold_windows = s.hold_windows
        self._held = 0  # clean windows completed at/above the hold line since the last step
        self._window_start: float | None = None
        self._window_requests = 0
        self._last_decrease: float | None = None

    @property
    def settings(self) -> AdaptiveSettings:
        return self._settings

    @property
    def rate(self) -> float:
        """Requests per second the workers may send upstream (all workers together)."""
        return self._rate

    @property
    def ceiling(self) -> float | None:
        """EWMA of the rates at which throttling happened; None until the first (or forgotten)."""
        return self._ceiling

    @property
    def hold_line(self) -> float | None:
        return None if self._ceiling is None else self._ceiling * self._settings.hold_fraction

    @property
    def hold_windows(self) -> int:
        """Clean windows per probe step at/above the hold line, currently."""
        return self._hold_windows

    @property
    def adjustments(self) -> dict[str, int]:
        """Rate changes so far by direction (``up``/``down``), for a counter metric."""
        return {"up": self._up, "down": self._down}

    def on_tick(self, now: float, requests: int, throttled: int) -> bool:
        """Account one tick (counts since the previous tick); True if the rate changed."""
        if requests < 0 or throttled < 0:
            raise ValueError("requests and throttled must be >= 0")
        if throttled:
            return self._on_throttled(now)
        if self._window_start is None or now < self._window_start:
            # The first tick (or a clock that went back) opens a window; earlier counts are
            # from an unknown interval, so they are not counted in it.
            self._open_window(now)
            return False
        self._window_requests += requests
        elapsed = now - self._window_start
        if elapsed < self._settings.clean_window_s:
            return False
        return self._on_clean_window(now, elapsed)

    def reset(self) -> None:
        """Back to ``initial_rps`` with no ceiling; the adjustment counters are kept."""
        self._restore(None, None)

    def _open_window(self, now: float) -> None:
        self._window_start = now
        self._window_requests = 0

    def _on_throttled(self, now: float) -> bool:
        s = self._settings
        self._open_window(now)  # this window was not clean
        self._held = 0
        last = self._last_decrease
        if last is not None and 0 <= now - last < s.decrease_interval_s:
            return False
        self._last_decrease = now
        rate = self._rate
        hold = self.hold_line
        if hold is not None and rate >= hold * (1 - _EPS):
            # Throttled while holding or probing beyond the hold line: probe less often.
            self._hold_windows = min(self._hold_windows * 2, s.max_hold_windows)
        if self._ceiling is None:
            self._ceiling = rate
        else:
            self._ceiling = s.ewma_alpha * rate + (1 - s.ewma_alpha) * self._ceiling
        return self._set(
            max(s.min_rps, min(rate * s.backoff, self._ceiling * s.hold_fraction)), "down"
        )

    def _on_clean_window(self, now: float, elapsed: float) -> bool:
        s = self._settings
        sent = self._window_requests
        observed = sent / elapsed
        self._open_window(now)
        rate = self._rate
        if sent == 0 or observed < s.min_utilization * rate:
            return False  # application-limited: no evidence that more would pass
        if self._ceiling is not None and observed > self._ceiling:
            # Sent faster than the rate that used to be throttled, without a 429: the limit
            # was raised. Forget the stale ceiling instead of holding below it.
            self._ceiling = None
            self._hold_windows = s.hold_windows
            self._held = 0
        hold = self.hold_line
        stepped = rate * (1 + s.probe_step)
        if hold is None:
            new = stepped
        elif rate < hold * (1 - _EPS):
            new = min(stepped, hold)
        else:
            self._held += 1
            if self._held < self._hold_windows:
                return False
            self._held = 0
            new = stepped
        return self._set(min(s.max_rps, new), "up")

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
            f"hold_windows={self._hold_windows}, up={self._up}, down={self._down})"
        )

    # --- persistence ------------------------------------------------------------------------

    def save(self, path: str | os.PathLike[str], now_wall: float) -> None:
        """Write the state atomically (temp file in the same dir, fsync, rename).

        Raises OSError; the caller logs it and carries on (a lost save costs a re-learn).
        """
        path = os.fspath(path)
        data = json.dumps(
            {"version": STATE_VERSION, "rate": self._rate, "ceiling": self._ceiling,
             "saved_at": now_wall},
            allow_nan=False,
        ).encode()
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

    @classmethod
    def load(
        cls, path: str | os.PathLike[str], settings: AdaptiveSettings, now_wall: float
    ) -> tuple[AdaptiveRate, str]:
        """The saved state if usable, else a fresh one; never raises. Also returns why (for the log)."""
        start = f"starting at {settings.initial_rps:g} rps"
        try:
            with open(path, "rb") as fh:
                raw = fh.read(_STATE_MAX_BYTES + 1)
        except FileNotFoundError:
            return cls(settings), f"no saved adaptive state; {start}"
        except OSError as exc:
            return cls(settings), f"saved adaptive state unreadable ({exc.strerror or exc}); {start}"
        problem, state = _parse_state(raw)
        if state is None:
            return cls(settings), f"saved adaptive state ignored ({problem}); {start}"
        rate, ceiling, saved_at = state
        age = now_wall - saved_at
        if age < 0:
            return cls(settings), f"saved adaptive state ignored (saved in the future); {start}"
        if age >= settings.state_max_age_s:
            return cls(settings), (
                f"saved adaptive state ignored (too old: {age:.0f} s, max "
                f"{settings.state_max_age_s:g} s); {start}"
            )
        restored = cls(settings, rate=rate, ceiling=ceiling)
        learned = "none" if restored.ceiling is None else f"{restored.ceiling:.3g} rps"
        return restored, (
            f"restored adaptive rate {restored.rate:.3g} rps (ceiling {learned}) "
            f"saved {age:.0f} s ago"
        )


def _parse_state(raw: bytes) -> tuple[str, tuple[float, float | None, float] | None]:
    """(problem, None) or ("", (rate, ceiling, saved_at)) from the state file's bytes."""
    if len(raw) > _STATE_MAX_BYTES:
        return "file too large", None
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return "not JSON", None
    if not isinstance(doc, dict):
        return "not a JSON object", None
    version = doc.get("version")
    if isinstance(version, bool) or version != STATE_VERSION:
        return f"version is not {STATE_VERSION}", None
    rate, ceiling, saved_at = doc.get("rate"), doc.get("ceiling"), doc.get("saved_at")
    if not _positive(rate):
        return "rate is not a positive number", None
    if ceiling is not None and not _positive(ceiling):
        return "ceiling is not a positive number or null", None
    if not _positive(saved_at):
        return "saved_at is not a positive number", None
    return "", (float(rate), None if ceiling is None else float(ceiling), float(saved_at))


def _positive(value: object) -> TypeGuard[int | float]:
    # bool is an int subclass, and `true` is not a rate.
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return math.isfinite(value) and value > 0
