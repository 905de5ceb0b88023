"""What comes after an event on a lane (``Lane.after``): pure logic, a clock passed in.

The worker tests show these paths end to end (a lost pool process, an init()
that raises, an unreadable state, Redis out of reach); here each rule is
checked alone, without threads or processes.
"""

from __future__ import annotations

from typing import Any

import pytest

from celery_stoker.lanes import (
    INIT_RETRY_MAX,
    INIT_RETRY_START,
    REDIS_RETRY_MAX,
    REDIS_RETRY_START,
    STATE_RETRY_START,
    After,
    Lane,
    PendingEvent,
)
from celery_stoker.outcome import Outcome

NOW = 1000.0
TOKEN = 7


class Owner:
    name = "lane-test"
    time_limit = None

    def acting_token(self) -> int | None:
        return TOKEN

    def event_args(self, item: PendingEvent) -> list[Any]:
        return []

    def send_event(self, item: PendingEvent, task_id: str, args: list[Any]) -> None:
        pass

    def withdraw(self, task_id: str) -> bool:
        return False

    def event_done(self, item: PendingEvent, outcome: Outcome) -> None:
        pass


def lane(**fields: Any) -> Lane:
    return Lane(Owner(), **{"token": TOKEN, **fields})


def item(event: str = "timer", attempt: int = 1) -> PendingEvent:
    return PendingEvent(seq=3, token=TOKEN, event=event, reason=None, attempt=attempt)


def outcome(**fields: Any) -> Outcome:
    return Outcome(seq=3, token=TOKEN, name="lane-test", **fields)


def test_an_event_that_ran_arms_the_timer_it_asked_for_and_resets_every_backoff() -> None:
    done = lane(init_retry=8.0, state_retry=4.0, redis_retry=2.0)
    after = done.after(item(), outcome(ran=True, next_timer=30.0), NOW)
    assert after == After(timer_at=NOW + 30.0)
    assert (done.init_retry, done.state_retry, done.redis_retry) == (
        INIT_RETRY_START,
        STATE_RETRY_START,
        REDIS_RETRY_START,
    )
    assert done.last_interval == 30.0


def test_no_timer_asked_for_clears_the_lane_s_timer() -> None:
    done = lane(timer_due=NOW + 5, last_interval=5.0)
    assert done.after(item(), outcome(ran=True, next_timer=None), NOW) == After()
    assert done.timer_due is None and done.last_interval is None


def test_a_raising_next_timer_in_keeps_the_last_interval() -> None:
    done = lane(last_interval=5.0)
    after = done.after(item(), outcome(ran=True, kind="error", timer_error=True), NOW)
    assert after == After(timer_at=NOW + 5.0)


def test_an_event_that_never_started_is_sent_again_at_once() -> None:
    assert lane().after(item(), outcome(ran=False, kind="lost"), NOW) == After(again=True)


@pytest.mark.parametrize("event", ["now_leader", "cluster_change"])
def test_a_lost_pool_process_redelivers_once_then_drops(event: str) -> None:
    lost = outcome(ran=True, kind="lost")
    once = lane(last_interval=2.0)
    assert once.after(item(event), lost, NOW) == After(again=True, attempt=2, timer_at=NOW + 2.0)
    assert once.after(item(event, attempt=2), lost, NOW) == After(timer_at=NOW + 2.0)


def test_a_timer_lost_or_timed_out_is_not_redelivered_its_interval_goes_on() -> None:
    for kind in ("lost", "timeout"):
        after = lane(last_interval=3.0).after(item("timer"), outcome(ran=True, kind=kind), NOW)
        assert after == After(timer_at=NOW + 3.0)


def test_init_failing_backs_off_doubling_up_to_its_cap() -> None:
    failing = lane()
    waits = []
    for _ in range(10):
        after = failing.after(item("now_leader"), outcome(ran=True, init_failed=True), NOW)
        assert after.again and after.until is not None
        waits.append(after.until - NOW)
    assert waits[:3] == [INIT_RETRY_START, INIT_RETRY_START * 2, INIT_RETRY_START * 4]
    assert max(waits) == INIT_RETRY_MAX


def test_an_unreadable_state_is_retried_with_backoff() -> None:
    unreadable = lane()
    first = unreadable.after(item(), outcome(ran=False, kind="error", unreadable=True), NOW)
    second = unreadable.after(item(), outcome(ran=False, kind="error", unreadable=True), NOW)
    assert (first.again, first.until, second.until) == (
        True,
        NOW + STATE_RETRY_START,
        NOW + 2 * STATE_RETRY_START,
    )


def test_redis_out_of_reach_before_the_callbacks_is_retried_up_to_its_cap() -> None:
    cut_off = lane()
    waits = [cut_off.after(item(), outcome(ran=False, kind="error"), NOW).until for _ in range(6)]
    assert waits[0] == NOW + REDIS_RETRY_START
    assert waits[-1] == NOW + REDIS_RETRY_MAX


def test_nothing_follows_an_event_whose_term_ended_or_that_was_skipped() -> None:
    assert lane(token=TOKEN + 1).after(item(), outcome(ran=True, next_timer=1.0), NOW) == After()
    assert lane().after(item(), outcome(ran=False), NOW) == After()
