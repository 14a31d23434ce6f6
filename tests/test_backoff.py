"""core/backoff.py: when a dead worker (or recorder) is restarted, on explicit times."""

from __future__ import annotations

import pytest

from zaiproxy.core.backoff import Backoff, Restart, RestartPolicy


def crash_loop(backoff: Backoff, start: float, exits: int, lives: float = 0.1) -> list[Restart]:
    """``exits`` processes in a row that each live ``lives`` seconds and are restarted on time."""
    restarts, now = [], start
    for _ in range(exits):
        backoff.started(now)
        restart = backoff.exited(now + lives)
        restarts.append(restart)
        now = restart.at
    return restarts


def test_the_documented_numbers() -> None:
    """Workers and the recorder: 0.25 s doubling to 30 s, reset after a minute of health."""
    assert RestartPolicy() == RestartPolicy(initial=0.25, maximum=30.0, healthy_after=60.0)


def test_the_delay_doubles_up_to_the_maximum() -> None:
    restarts = crash_loop(Backoff(), start=1000.0, exits=10)
    assert [r.delay for r in restarts] == [0.25, 0.5, 1, 2, 4, 8, 16, 30, 30, 30]
    first = restarts[0]
    assert (first.at, first.lived) == (1000.1 + 0.25, pytest.approx(0.1))


def test_a_healthy_life_starts_the_sequence_again() -> None:
    backoff = Backoff()
    crash_loop(backoff, start=0.0, exits=6)  # next delay: 16 s
    backoff.started(500.0)
    restart = backoff.exited(560.5)  # lived 60.5 s: healthy
    assert restart == Restart(at=560.75, delay=0.25, lived=60.5)
    backoff.started(restart.at)
    assert backoff.exited(restart.at + 1).delay == 0.5  # and doubles from there


def test_exactly_the_healthy_period_is_not_yet_healthy() -> None:
    backoff = Backoff()
    crash_loop(backoff, start=0.0, exits=3)  # next delay: 2 s
    backoff.started(100.0)
    assert backoff.exited(160.0).delay == 2


def test_an_exit_without_a_start_lived_zero() -> None:
    assert Backoff().exited(7.0) == Restart(at=7.25, delay=0.25, lived=0.0)


def test_a_policy_of_its_own() -> None:
    backoff = Backoff(RestartPolicy(initial=1.0, maximum=3.0, healthy_after=10.0))
    assert [r.delay for r in crash_loop(backoff, 0.0, 4)] == [1, 2, 3, 3]
    backoff.started(100.0)
    assert backoff.exited(111.0).delay == 1


@pytest.mark.parametrize("kwargs", [{"initial": 0}, {"initial": 31.0}, {"maximum": 0.1},
                                    {"healthy_after": -1}])
def test_a_policy_that_cannot_work_is_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match=r"must|need"):
        RestartPolicy(**kwargs)
