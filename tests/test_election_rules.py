"""The election's decisions about time (``election_rules``), on a fake clock: no thread, no Redis.

A holder's life is replayed step by step: the clock only moves when the test
moves it, so each assertion names the exact moment a renewal, a wake-up or a
step-down is due.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from celery_stoker.election_rules import (
    FAILURE_COOLDOWN_MAX,
    RENEW_ATTEMPT,
    HoldStep,
    failure_cooldown,
    finish_wait,
    fresh_quarantine,
    may_start_acting,
    next_hold_step,
    retry_wait,
)

TTL = 10.0
RENEW = 3.0
SOCKET = 1.0


@dataclass
class FakeClock:
    """A monotonic clock that moves only when told (as trio's MockClock)."""

    now: float = 100.0

    def advance(self, seconds: float) -> None:
        assert seconds >= 0
        self.now += seconds


@dataclass
class FakeTerm:
    """A term valid until ``expires`` on the fake clock; a renewal moves it one TTL on."""

    clock: FakeClock
    expires: float

    def left(self) -> float:
        return self.expires - self.clock.now

    def renew(self) -> None:
        self.expires = self.clock.now + TTL


def hold(
    clock: FakeClock,
    term: FakeTerm,
    renew_at: float,
    *,
    suspended: bool = False,
    act_not_before: float = 0.0,
) -> HoldStep:
    return next_hold_step(
        now=clock.now,
        renew_at=renew_at,
        left=term.left(),
        socket_timeout=SOCKET,
        suspended=suspended,
        act_not_before=act_not_before,
    )


def test_a_holder_waits_renews_on_time_and_keeps_its_term() -> None:
    clock = FakeClock()
    term = FakeTerm(clock, clock.now + TTL)
    renew_at = clock.now + RENEW
    renewals = []
    for _ in range(50):
        step = hold(clock, term, renew_at)
        assert step.action != "step_down", f"stepped down at {clock.now} with {term.left()} left"
        if step.action == "renew":
            renewals.append(clock.now)
            term.renew()
            renew_at = clock.now + RENEW
        else:
            assert 0 < step.wait <= RENEW
            clock.advance(step.wait)
    assert renewals[:3] == [103.0, 106.0, 109.0]


def test_a_holder_whose_renewals_fail_steps_down_while_a_renewal_could_still_answer() -> None:
    clock = FakeClock()
    term = FakeTerm(clock, clock.now + TTL)
    renew_at = clock.now + RENEW
    while (step := hold(clock, term, renew_at)).action != "step_down":
        if step.action == "renew":
            renew_at = clock.now + 0.5  # the renewal failed: retry soon, the term is not renewed
        else:
            clock.advance(step.wait)
    # It never waits past TTL - socket timeout, and steps down with RENEW_ATTEMPT timeouts left.
    assert term.left() <= RENEW_ATTEMPT * SOCKET
    assert term.left() > 0, "it must stop acting before its lease ends"


def test_a_wait_never_runs_past_the_last_moment_a_renewal_answers_in_time() -> None:
    clock = FakeClock()
    term = FakeTerm(clock, clock.now + 3.5)
    step = hold(clock, term, renew_at=clock.now + RENEW)
    assert step == HoldStep("wait", 3.5 - SOCKET)


def test_a_suspended_term_wakes_when_its_quarantine_ends() -> None:
    clock = FakeClock()
    term = FakeTerm(clock, clock.now + TTL)
    step = hold(clock, term, clock.now + RENEW, suspended=True, act_not_before=clock.now + 1.25)
    assert step == HoldStep("wait", 1.25)
    # An acting term does not care about the quarantine's end.
    assert hold(clock, term, clock.now + RENEW, act_not_before=clock.now + 1.25).wait == RENEW


def test_a_term_acts_only_after_its_quarantine_with_time_to_renew_and_not_while_stopping() -> None:
    clock = FakeClock()
    until = clock.now + 2.0

    def may(left: float = TTL, stopping: bool = False) -> bool:
        return may_start_acting(
            now=clock.now, act_not_before=until, left=left, socket_timeout=SOCKET, stopping=stopping
        )

    assert not may()
    clock.advance(2.0)
    assert may()
    assert not may(stopping=True)
    assert not may(left=RENEW_ATTEMPT * SOCKET)


def test_retry_wait_of_a_follower_is_the_backoff_and_a_leader_never_waits_past_its_lease() -> None:
    assert retry_wait(0.4, None, SOCKET) == 0.4
    assert retry_wait(0.4, TTL, SOCKET) == 0.4
    assert retry_wait(0.4, RENEW_ATTEMPT * SOCKET + 0.1, SOCKET) == pytest.approx(0.1)
    assert retry_wait(0.4, 0.5, SOCKET) == 0.0


@pytest.mark.parametrize(
    ("ttl", "step_downs", "rest"),
    [(10, 1, 10), (10, 2, 20), (10, 3, 40), (10, 10, FAILURE_COOLDOWN_MAX), (600, 3, 600)],
)
def test_failure_cooldown_doubles_up_to_its_cap_or_one_ttl(
    ttl: float, step_downs: int, rest: float
) -> None:
    assert failure_cooldown(ttl, step_downs) == rest


def test_fresh_quarantine_waits_out_the_ttl_since_redis_started() -> None:
    assert fresh_quarantine(TTL, 0.0) == TTL
    assert fresh_quarantine(TTL, 4.0) == 6.0
    assert fresh_quarantine(TTL, 3600.0) == 0.0


def test_finish_wait_stops_at_the_grace_the_interval_or_the_last_safe_renewal() -> None:
    clock = FakeClock()
    deadline = clock.now + 5.0

    def wait(left: float) -> float:
        return finish_wait(
            deadline=deadline, now=clock.now, renew_interval=RENEW, left=left, socket_timeout=SOCKET
        )

    assert wait(TTL) == RENEW
    assert wait(RENEW_ATTEMPT * SOCKET + 1.0) == 1.0
    clock.advance(4.5)
    assert wait(TTL) == 0.5
    clock.advance(1.0)
    assert wait(TTL) <= 0  # the grace is over: stop waiting
