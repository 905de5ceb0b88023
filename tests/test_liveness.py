"""Liveness: no callback can stall a Stoker, on every Celery pool.

Real ``celery worker`` processes and a real Redis: a pool process that dies or
is killed mid-callback, time limits, a Stoker that keeps failing, ``init()``
that raises, a timer too far away to wait for, a Redis that refuses writes, a
``shutdown`` that hangs.  Each checks the bound the README promises, measured
from the fault to the next callback's own record.
"""

from __future__ import annotations

import itertools
import os
import signal
import socket
import time
from collections.abc import Callable

import pytest
from support.workers import Fleet, Record, Records, check_terms, heard_join

from celery_stoker.testing import RedisServer, wait_for

pytestmark = pytest.mark.workers

TTL = 1.5
RENEW = TTL / 3
TIMER = 0.5

Fleets = Callable[..., Fleet]


def node(name: str) -> str:
    return f"{name}@{socket.gethostname()}"


def timers_after(records: Records, at: float) -> list[Record]:
    return [r for r in records.of("timer") if r.started > at]


def assert_one_at_a_time(records: Records) -> None:
    """No event started before the one before it ended (each callback's own records)."""
    events = sorted((r for r in records.events() if r.event != "shutdown"), key=lambda r: r.started)
    for before, after in itertools.pairwise(events):
        assert after.started >= before.at, f"{after} started before {before} ended"


@pytest.mark.parametrize("how", ["os._exit", "SIGKILL from outside"])
def test_pool_process_lost_mid_callback_is_noticed_at_once(
    fleets: Fleets, records: Records, how: str
) -> None:
    fault = "exit" if how == "os._exit" else "sleep:60"
    fleet = fleets("prefork", STOKER_TEST_TIMER=str(TIMER), STOKER_TEST_TIMER_FAULT=fault)
    w1 = fleet.start("w1@%h")
    leader = wait_for(lambda: records.of("now_leader"), 30, what="w1 leads")[0]
    faulted = wait_for(lambda: records.raw("fault"), 30, what="the faulty timer")[0]
    lost_at = faulted["at"]
    if how == "SIGKILL from outside":
        os.kill(faulted["pid"], signal.SIGKILL)
        lost_at = time.time()
    after = wait_for(lambda: timers_after(records, lost_at), 10, what="the next timer")[0]
    assert after.started - lost_at <= TIMER + 1.0, f"next timer {after.started - lost_at:.2f} s"
    assert after.token == leader.token, "the leader carried on in the same term"
    wait_for(lambda: "Stoker recorder: the timer event" in w1.log(), 5, what="one log line")
    assert w1.log().count("did not finish") == 1
    assert_one_at_a_time(records)


@pytest.mark.parametrize("limit", ["soft", "hard"])
def test_time_limits_bound_a_hanging_callback(fleets: Fleets, records: Records, limit: str) -> None:
    env = {"STOKER_TEST_SOFT_LIMIT" if limit == "soft" else "STOKER_TEST_HARD_LIMIT": "1"}
    fleet = fleets(
        "prefork", STOKER_TEST_TIMER=str(TIMER), STOKER_TEST_TIMER_FAULT="sleep:60", **env
    )
    w1 = fleet.start("w1@%h")
    leader = wait_for(lambda: records.of("now_leader"), 30, what="w1 leads")[0]
    faulted = wait_for(lambda: records.raw("fault"), 30, what="the hanging timer")[0]
    after = wait_for(lambda: timers_after(records, faulted["at"]), 10, what="the next timer")[0]
    assert after.started - faulted["at"] <= 1 + TIMER + 1.0
    assert after.token == leader.token
    if limit == "soft":
        assert records.raw("soft_limit"), "the callback heard SoftTimeLimitExceeded"
        assert "SoftTimeLimitExceeded" in w1.log()
    else:
        wait_for(lambda: "Hard time limit (1.0s) exceeded" in w1.log(), 5, what="Celery's line")
        assert w1.log().count("Stoker recorder: the timer event") == 1
    # The state is kept: the hung event committed nothing, the next one counts on.
    before = max(r.events for r in records.events() if r.at < faulted["at"])
    assert after.events == before + 1
    assert_one_at_a_time(records)


def test_max_failures_moves_the_work_to_a_healthy_worker(
    fleets: Fleets, records: Records, redis_server: RedisServer
) -> None:
    fleet = fleets(
        "solo", STOKER_TEST_TIMER="0.3", STOKER_TEST_MAX_FAILURES="3", STOKER_TEST_FAIL_FLAG="1"
    )
    fleet.start("w1@%h")
    fleet.start("w2@%h")
    first = wait_for(lambda: records.of("now_leader"), 30, what="a leader")[0]
    other = next(w for w in fleet.workers if w.node != first.host)
    wait_for(lambda: "following" in other.log(), 30, what="the other worker follows")
    failing_since = time.time()
    redis_server.client().set("rec:fail-on", first.host)
    moved = wait_for(
        lambda: [r for r in records.of("now_leader") if r.host == other.node],
        15,
        what="the healthy worker leads",
    )[0]
    failed = [r for r in records.events() if r.host == first.host and r.started > failing_since]
    third_failure = sorted(failed, key=lambda r: r.at)[2]
    assert moved.started - third_failure.at <= TTL + 1.0
    stepped = [r for r in records.of("shutdown") if r.host == first.host]
    assert stepped and stepped[-1].reason == "too_many_failures"
    # The healthy worker keeps leading: several timers later, no new term anywhere.
    wait_for(
        lambda: (
            len([r for r in timers_after(records, moved.started) if r.host == other.node]) >= 10
        ),
        15,
        what="timers on the healthy worker",
    )
    assert [r.host for r in records.of("now_leader")][-1] == other.node
    assert len({r.token for r in records.events() if r.started >= moved.started}) == 1
    check_terms(records.events())


def test_init_raising_is_retried_with_backoff(fleets: Fleets, records: Records) -> None:
    fleet = fleets("solo", STOKER_TEST_TIMER=str(TIMER), STOKER_TEST_INIT_FAILS="2")
    w1 = fleet.start("w1@%h")
    leader = wait_for(lambda: records.of("now_leader"), 30, what="now_leader after init works")[0]
    inits = records.inits()
    assert len(inits) == 3, inits
    assert inits[1]["at"] - inits[0]["at"] >= 0.9 and inits[2]["at"] - inits[1]["at"] >= 1.9
    wait_for(lambda: timers_after(records, leader.at), 10, what="timers after init worked")
    assert w1.log().count("init() failed; now_leader is sent again") == 2


def test_a_timer_too_far_away_to_wait_for_is_harmless(fleets: Fleets, records: Records) -> None:
    fleet = fleets("solo", STOKER_TEST_TIMER="1e10")
    w1 = fleet.start("w1@%h")
    wait_for(lambda: records.of("now_leader"), 30, what="w1 leads")
    w2 = fleet.start("w2@%h")
    joined = heard_join(records, w2.node)
    assert joined.host == w1.node
    assert not records.of("timer")
    assert "Traceback" not in w1.log()


def test_redis_refusing_writes_never_stalls_the_stoker(
    fleets: Fleets, records: Records, make_redis_server: Callable[..., RedisServer]
) -> None:
    """``stoker_url`` full (noeviction) for 10 s: events go on, the next lands in time."""
    lease_redis = make_redis_server()
    fleet = fleets("prefork", STOKER_TEST_URL=lease_redis.url_for(0), STOKER_TEST_TIMER=str(TIMER))
    w1 = fleet.start("w1@%h")
    leader = wait_for(lambda: records.of("now_leader"), 30, what="w1 leads")[0]
    wait_for(lambda: len(timers_after(records, leader.at)) >= 2, 10, what="timers")
    admin = lease_redis.client()
    admin.config_set("maxmemory-policy", "noeviction")
    admin.config_set("maxmemory", "1")
    full_at = time.time()
    wait_for(lambda: "Redis refused the write" in w1.log(), 10, what="a refused commit logged")
    wait_for(lambda: len(timers_after(records, full_at)) >= 4, 15, what="timers while full")
    remaining = 10 - (time.time() - full_at)
    if remaining > 0:
        wait_for(lambda: time.time() - full_at >= 10, remaining + 1, what="10 s of a full Redis")
    admin.config_set("maxmemory", "0")
    writable_at = time.time()
    after = wait_for(lambda: timers_after(records, writable_at), 10, what="the next timer")[0]
    assert after.started - writable_at <= TIMER + 1.0
    counted = wait_for(
        lambda: [r for r in timers_after(records, after.at) if r.events > after.events],
        10,
        what="commits accepted again",
    )
    assert counted[0].token == leader.token, "the leader kept its lease through the refusals"
    log = w1.log()
    assert "ended while the callback ran" not in log


@pytest.mark.parametrize("what", ["shutdown", "leader_stopping"])
def test_a_hanging_shutdown_cannot_hold_the_worker_hostage(
    fleets: Fleets, records: Records, what: str
) -> None:
    hang = "STOKER_TEST_SHUTDOWN_HANG" if what == "shutdown" else "STOKER_TEST_HOOK_HANG"
    fleet = fleets("solo", STOKER_TEST_STOP_TIMEOUT="2", **{hang: node("w1")})
    w1 = fleet.start("w1@%h")
    wait_for(lambda: records.of("now_leader"), 30, what="w1 leads")
    w2 = fleet.start("w2@%h")
    wait_for(lambda: "following" in w2.log(), 30, what="w2 follows")
    # w2's arrival sends w1 a cluster_change: let it run first.  An event still queued
    # at the signal is waited for (up to half the stop budget, the lease renewed
    # meanwhile), which is not what this test measures.
    heard_join(records, w2.node)
    stopped_at = time.time()
    w1.sigterm()
    taken = wait_for(
        lambda: [r for r in records.of("now_leader") if r.host == w2.node],
        TTL + RENEW + 5,
        what="w2 leads",
    )[0]
    assert records.raw("hanging"), f"{what} was hanging"
    assert taken.started - stopped_at <= TTL + RENEW
    w1.wait_exit(15)  # raises if the worker is still held
    assert "still stepping down after 2 s" in w1.log()
