"""Liveness at the edges: a broker outage before an event starts, a twice-lost now_leader, a stop.

Real ``celery worker`` processes, real Redis servers (the broker, and the
Redis the leases and records live in), no mocks.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
from celery import Celery
from support.workers import Fleet, Records

from celery_stoker.keys import token_key
from celery_stoker.lease import RedisLease
from celery_stoker.testing import RedisServer, WorkerProcess, wait_for

pytestmark = pytest.mark.workers

Fleets = Callable[..., Fleet]


def test_an_event_dropped_by_a_broker_outage_before_it_started_is_not_lost(
    fleets: Fleets, records: Records, redis_server: RedisServer, make_redis_server: Callable
) -> None:
    """The broker goes away while ``now_leader`` waits for a busy pool slot.

    Celery's consumer forgets its reserved (not yet started) requests when it loses
    the broker, so the request leaves Celery's table without ever running.  The pump's
    watchdog takes that for "finished, but its report never arrived": the event
    counts as run, ``now_leader`` is never sent again, and since no event of the term
    ever ran, no timer is armed either -- the leader holds its term and does nothing.
    """
    broker = make_redis_server()  # its own server: restarting it loses no lease or record
    lease = make_redis_server()  # fresh: the first term waits about one TTL before acting
    fleet = fleets(
        "prefork",
        ttl=3.0,
        STOKER_TEST_BROKER=broker.url_for(0),
        STOKER_TEST_RECORD_URL=redis_server.url_for(0),
        STOKER_TEST_URL=lease.url_for(0),
        STOKER_TEST_TIMER="0.5",
    )
    w1 = fleet.start("w1@%h", concurrency=1)
    # Occupy the only pool process across the moment the term starts acting.
    Celery("client", broker=broker.url_for(0)).send_task(
        "recorder.sleep", args=[4], queue=f"stoker.{w1.node}"
    )
    wait_for(lambda: "Task celery_stoker.dispatch[" in w1.log(), 30, what="now_leader reserved")
    assert not records.of("now_leader"), "now_leader must still wait behind the busy pool"
    broker.restart(empty=True)  # a broker outage: the reserved message is gone with it
    slept = wait_for(lambda: records.raw("slept"), 30, what="the pool slot to free up")[0]
    first = wait_for(lambda: records.of("now_leader"), 8, what="now_leader sent again")[0]
    assert first.started >= slept["at"]
    wait_for(lambda: records.of("timer"), 5, what="the term's timers")


def test_a_now_leader_lost_twice_does_not_leave_an_idle_term(
    fleets: Fleets, records: Records
) -> None:
    """``now_leader`` dies with its pool process twice (say, OOM at the start of a term).

    The pump drops it after the second loss; no event of the term ever ran, so no
    timer is ever armed: the leader keeps renewing its lease for a term that does
    nothing, forever (without ``max_failures``, the default, nothing ends it).  The
    Stoker itself is healthy: a third ``now_leader`` would work.
    """
    fleet = fleets("prefork", STOKER_TEST_TIMER="0.3", STOKER_TEST_NOW_LEADER_EXITS="2")
    fleet.start("w1@%h")
    fleet.start("w2@%h")
    faults = wait_for(lambda: len(records.raw("fault")) >= 2 and records.raw("fault"), 30)
    dropped_at = faults[1]["at"]
    # Any worker, any term: the Stoker must get going again (here it never does).
    wait_for(
        lambda: [r for r in records.of("now_leader") if r.started > dropped_at],
        10,
        what="a now_leader that works",
    )
    wait_for(lambda: [r for r in records.of("timer") if r.started > dropped_at], 5, what="timers")


def test_a_hard_time_limit_still_holds_while_the_leader_worker_stops(
    fleets: Fleets, records: Records
) -> None:
    """SIGTERM reaches the leader while its callback hangs past ``time_limit``.

    During a warm shutdown Celery's event loop no longer runs, and with it the
    prefork pool's time-limit timers: the hung callback is not killed at its limit.
    The stepping-down leader waits out its whole grace (``stoker_stop_timeout / 2``,
    renewing the lease meanwhile), then runs ``shutdown`` beside the still-running
    callback; the follower takes over only after that.
    """
    hard_limit, grace = 3.0, 8.0
    fleet = fleets(
        "prefork",
        STOKER_TEST_TIMER="0.3",
        STOKER_TEST_TIMER_FAULT="sleep:60",
        STOKER_TEST_HARD_LIMIT=str(hard_limit),
        STOKER_TEST_STOP_TIMEOUT=str(2 * grace),
    )
    fleet.start("w1@%h")
    fleet.start("w2@%h")
    fault = wait_for(lambda: records.raw("fault"), 30, what="the hanging timer")[0]
    leader = fleet.by_node(fault["host"])
    other = next(w for w in fleet.workers if w is not leader)
    wait_for(lambda: "following" in other.log(), 30, what="the other worker follows")
    assert time.time() - fault["at"] < hard_limit - 0.5, "SIGTERM comes before the limit"
    leader.sigterm()
    taken = wait_for(
        lambda: [r for r in records.of("now_leader") if r.host == other.node],
        2 * grace,
        what="the other worker leads",
    )[0]
    shutdown = [r for r in records.of("shutdown") if r.host == leader.node]
    # The limit ends the hung callback: shutdown and the handover follow it at once.
    assert shutdown and shutdown[0].started - fault["at"] <= hard_limit + 2.0, (
        f"shutdown began {shutdown[0].started - fault['at']:.1f} s after the hung callback, "
        f"while it still ran (time_limit={hard_limit:g})"
    )
    assert taken.started - fault["at"] <= hard_limit + 2.5


def _paused_until_logged(server: RedisServer, worker: WorkerProcess, *lines: str) -> float:
    """Pause ``server`` until ``worker`` logs one of ``lines`` anew; resume it and say when."""
    before = worker.log()
    counts = {line: before.count(line) for line in lines}
    server.pause()
    try:
        wait_for(
            lambda: any(worker.log().count(line) > counts[line] for line in lines),
            10,
            what=f"one of {lines!r} on the paused Redis",
        )
    finally:
        server.resume()
    return time.time()


def test_a_now_leader_that_cannot_reach_redis_is_sent_again(
    fleets: Fleets, records: Records, redis_server: RedisServer, make_redis_server: Callable
) -> None:
    """The pool process cannot reach the lease Redis when a term's ``now_leader`` starts.

    The dispatch task catches the error ("Redis unreachable while running now_leader")
    and reports an event that never ran.  The pump took "never ran" for "skipped: the
    term is over" and did nothing more: no ``now_leader`` again, and since no event of
    the term ran, no timer either -- the leader renewed a term that did nothing until
    something else (a membership change) sent an event; a timer that failed so ended
    the timers of the term.  Redis is back within a second here; the term's events
    must resume soon after.
    """
    lease = make_redis_server()
    # A counter exists: the first term is not fresh, so it acts at once (no TTL wait).
    lease.client().set(token_key("stoker", "recorder"), 1)
    broker = make_redis_server()
    ttl = 9.0  # renewals every 3 s: the main process rides out the pause with its term
    fleet = fleets(
        "prefork",
        ttl=ttl,
        STOKER_TEST_BROKER=broker.url_for(0),
        STOKER_TEST_RECORD_URL=redis_server.url_for(0),
        STOKER_TEST_URL=lease.url_for(0),
        STOKER_TEST_TIMER="0.5",
    )
    # The test holds the lease until the pool is busy: a worker's events skip the broker,
    # so a term that started at boot would run now_leader before the sleep task arrived.
    gate = RedisLease(lease.client(), "recorder", holder_id="gate", hostname="gate@test", ttl=30.0)
    gate_term = gate.acquire().term
    assert gate_term is not None
    w1 = fleet.start("w1@%h", concurrency=1)
    wait_for(lambda: "following gate@test" in w1.log(), 30, what="w1 waits for the lease")
    busy = 6.0
    # Occupy the only pool process across the moment the term starts.
    Celery("client", broker=broker.url_for(0)).send_task(
        "recorder.sleep", args=[busy], queue=f"stoker.{w1.node}"
    )
    wait_for(lambda: "Task recorder.sleep[" in w1.log(), 30, what="the sleep task received")
    slept_from = time.monotonic()
    assert gate.release(gate_term)  # w1, the only waiter, takes it at once
    wait_for(lambda: "Task celery_stoker.dispatch[" in w1.log(), 30, what="now_leader reserved")
    assert not records.of("now_leader"), "now_leader must still wait behind the busy pool"
    free_at = slept_from + busy
    assert time.monotonic() < free_at - 1.0, "the term started too late for this test"
    # Redis hangs from just before the pool slot frees until well after the pool
    # process's read of the lease gave up (its socket timeout is 2 s).
    time.sleep(free_at - 0.5 - time.monotonic())
    resumed = _paused_until_logged(lease, w1, "Redis unreachable while running now_leader")
    first = wait_for(lambda: records.of("now_leader"), 8, what="now_leader sent again")[0]
    assert first.started >= resumed - 0.5
    wait_for(lambda: records.of("timer"), 5, what="the term's timers")
    # The same mid-term: a timer that cannot reach Redis armed no next one.
    # The pause lands between two timer events, or (rarely) inside one, after its read:
    # then its commit is what cannot reach Redis.  Either way no next timer may be lost.
    resumed = _paused_until_logged(
        lease,
        w1,
        "Redis unreachable while running timer",
        "the state after timer was not stored: Redis refused the write",
    )
    wait_for(
        lambda: [r for r in records.of("timer") if r.started >= resumed - 0.5],
        5,
        what="timers again",
    )
    assert {r.token for r in records.events()} == {first.token}, "one term throughout"
