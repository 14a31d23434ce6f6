"""When to restart a child process that exited: exponential backoff, forgiven by health.

The supervisor restarts its workers and the recorder with the same rule
(docs/architecture.md, "Restarts"): the first restart comes 0.25 s after the exit, each
further one waits twice as long as the one before, up to 30 s; a process that ran longer
than a minute was healthy, and its exit starts the sequence again at 0.25 s. A crash
loop therefore costs a few restarts per minute instead of a spinning CPU, while a
process that dies once a day is back at once.

Pure: the caller says what happened and when (its clock, e.g. ``time.monotonic()``),
and gets the decision back; nothing here reads a clock or sleeps.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class RestartPolicy:
    initial: float = 0.25  # seconds from the first exit to its restart
    maximum: float = 30.0  # the delay doubles up to this
    healthy_after: float = 60.0  # a process that lived longer than this resets the delay

    def __post_init__(self) -> None:
        if not 0 < self.initial <= self.maximum:
            raise ValueError(f"need 0 < initial <= maximum (got {self.initial}, {self.maximum})")
        if self.healthy_after < 0:
            raise ValueError(f"healthy_after must be >= 0 (got {self.healthy_after})")


@dataclass(frozen=True, slots=True)
class Restart:
    """The decision for one exit: restart at ``at`` (the caller's clock), ``delay`` after it."""

    at: float
    delay: float
    lived: float  # how long the process ran, from started() to exited()


class Backoff:
    """One restartable process's backoff: ``started(now)`` when it is (re)spawned,
    ``exited(now)`` when it is found dead, which says when to spawn it again."""

    def __init__(self, policy: RestartPolicy | None = None) -> None:
        self.policy = policy or RestartPolicy()
        self._delay = self.policy.initial  # the delay the next exit gets
        self._started_at: float | None = None

    def __repr__(self) -> str:
        return f"<Backoff next={self._delay:g}s started_at={self._started_at}>"

    def started(self, now: float) -> None:
        self._started_at = now

    def exited(self, now: float) -> Restart:
        """The process exited at ``now``: when to restart it. Doubles the next delay."""
        lived = now - self._started_at if self._started_at is not None else 0.0
        self._started_at = None
        if lived > self.policy.healthy_after:
            self._delay = self.policy.initial
        delay = self._delay
        self._delay = min(delay * 2, self.policy.maximum)
        return Restart(at=now + delay, delay=delay, lived=lived)
