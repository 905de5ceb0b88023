"""Lost history is noticed and said; commits wait for replicas on request (issue 23, 2 and 3).

Real ``redis-server`` processes and real ``celery worker`` processes running
``tests/apps/recorder.py``.  The Stoker Redis is the one the test restores,
pauses or fails over; the broker and the recorder's records live in a Redis of
their own that is never touched, so what the callbacks did stays readable.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from support.workers import Fleet, Records, check_terms, status_views

from celery_stoker.testing import RedisServer, wait_for

pytestmark = pytest.mark.workers

TTL = 1.5
LOST_LINE = "Redis holds less history than the fleet has seen"


@pytest.fixture
def record_redis(make_redis_server: Callable[..., RedisServer]) -> RedisServer:
    """Broker and records on a server of their own (conftest's ``records`` and ``fleets``)."""
    return make_redis_server()


def events(records: Records) -> list[dict[str, Any]]:
    """Every callback the recorder logged, with its context fields."""
    return records.raw("event")


def status_json(fleet: Fleet) -> list[dict[str, Any]]:
    return status_views(fleet.app, fleet.env)


def test_a_redis_restored_from_an_older_snapshot_is_noticed_said_and_waited_out(
    redis_server: RedisServer,
    record_redis: RedisServer,
    records: Records,
    fleets: Callable[..., Fleet],
    tmp_path: Path,
) -> None:
    fleet = fleets(
        ttl=TTL,
        broker=record_redis.url_for(0),
        STOKER_TEST_URL=redis_server.url,
        STOKER_TEST_TIMER="0.1",
    )
    w1 = fleet.start("w1@%h")
    w2 = fleet.start("w2@%h")
    first = wait_for(lambda: records.of("now_leader"), 30, what="a first leader")[0]
    wait_for(
        lambda: len([r for r in records.of("timer") if r.token == first.token]) >= 3,
        15,
        what="timers of the first term",
    )
    old_rdb = redis_server.snapshot(tmp_path / "old.rdb")
    saved_at = time.monotonic()
    counter_at_save = int(redis_server.client().get("stoker:{recorder}:token"))
    assert counter_at_save == first.token

    # The leader stops cleanly; the other worker's term commits more events.
    leader, other = (w1, w2) if first.host == w1.node else (w2, w1)
    leader.stop()
    second = wait_for(
        lambda: [r for r in records.of("now_leader") if r.token > first.token],
        30,
        what="the second term",
    )[0]
    assert second.host == other.node
    wait_for(
        lambda: (
            len([r for r in records.of("timer") if r.token == second.token]) >= 5
            and time.monotonic() - saved_at > TTL + 0.3  # the restored lease has expired
        ),
        15,
        what="timers of the second term",
    )
    before = max(r.events for r in records.events() if r.token == second.token)

    redis_server.restart_from(old_rdb)
    restored_at = time.time()
    third = wait_for(
        lambda: [r for r in records.of("now_leader") if r.token > second.token],
        30,
        what="a term on the restored Redis",
    )[0]
    wait_for(
        lambda: len([r for r in records.of("timer") if r.token == third.token]) >= 2,
        15,
        what="timers of the restored term",
    )

    # The state did go back (the loss is real), and the new term was told so.
    assert third.events < before
    by_term: dict[int, list[dict[str, Any]]] = {}
    for raw in events(records):
        by_term.setdefault(int(raw["token"]), []).append(raw)
    assert by_term[third.token] and all(e["history_lost"] is True for e in by_term[third.token])
    for token in (first.token, second.token):
        assert all(e["history_lost"] is False for e in by_term[token]), by_term[token]
    # It waited a whole TTL before its first callback (started = when event() began).
    assert third.started - restored_at >= TTL, (
        f"now_leader began {third.started - restored_at:.2f} s after the restore"
    )
    # One WARNING, naming the Stoker, the newest token seen and what Redis held.
    lines = [line for line in other.log().splitlines() if LOST_LINE in line]
    assert len(lines) == 1, lines
    assert "WARNING" in lines[0] and "Stoker recorder" in lines[0]
    assert f"counter was at {counter_at_save}," in lines[0]
    assert f"token {second.token} was seen" in lines[0]
    # status (Redis's view and the leader's own) shows it for that term.
    view = status_json(fleet)[0]
    assert view["token"] == third.token
    assert view["history_lost"] == {"seen": second.token, "held": counter_at_save}
    assert view["workers"][other.node]["history_lost"] == view["history_lost"]
    check_terms(records.events())
    print(
        f"tokens {first.token} -> {second.token} -> {third.token}; state events "
        f"{before} before the restore, {third.events} after; now_leader "
        f"{third.started - restored_at:.2f} s after the restore"
    )


UNREPLICATED_LINE = "does not count as stored"


def commits(records: Records) -> list[dict[str, Any]]:
    """What each pool event's outcome said of its commit (STOKER_TEST_RECORD_COMMITS)."""
    return records.raw("commit")


def test_with_min_replicas_a_paused_replica_fails_commits_until_it_is_back(
    redis_server: RedisServer,
    record_redis: RedisServer,
    records: Records,
    fleets: Callable[..., Fleet],
    make_redis_server: Callable[..., RedisServer],
) -> None:
    replica = make_redis_server(replica_of=redis_server.address)
    replica.wait_replica_synced()
    fleet = fleets(
        ttl=TTL,
        broker=record_redis.url_for(0),
        STOKER_TEST_URL=redis_server.url,
        STOKER_TEST_TIMER="0.1",
        STOKER_TEST_MIN_REPLICAS="1",
        STOKER_TEST_RECORD_COMMITS="1",
    )
    w1 = fleet.start("w1@%h")
    wait_for(
        lambda: len([c for c in commits(records) if c["committed"]]) >= 3,
        30,
        what="commits replicated to the replica",
    )
    assert all(c["committed"] for c in commits(records)), commits(records)
    # A worker asking for more replicas than the primary has says so once, at start.
    w2 = fleet.start("w2@%h", env={"STOKER_TEST_MIN_REPLICAS": "2"})
    wait_for(
        lambda: "stoker_min_replicas is 2, but the Redis" in w2.log(),
        30,
        what="w2's warning about too few replicas",
    )
    line = next(x for x in w2.log().splitlines() if "stoker_min_replicas is 2" in x)
    assert "WARNING" in line and "has 1 replica(s) connected" in line
    assert "stoker_min_replicas is" not in w1.log()

    replica.pause()
    paused_at = time.time()
    try:
        failed = wait_for(
            lambda: (
                [c for c in commits(records) if not c["committed"] and c["outcome"] == "error"]
                if len([c for c in commits(records) if not c["committed"]]) >= 3
                else None
            ),
            15,
            what="commits failing while the replica is paused",
        )
        assert all("stoker_min_replicas" in (c["error"] or "") for c in failed), failed
        view = status_json(fleet)[0]
        leader = view["workers"][w1.node]
        assert leader["failures"] >= 2, leader
        assert "state not counted as stored" in (leader["last_error"] or "")
    finally:
        replica.resume()
    resumed_at = time.time()
    # Once the replica is back, commits count again and the failures end.
    wait_for(
        lambda: (
            len([c for c in commits(records)[len(failed) :] if c["committed"]]) >= 3
            and commits(records)[-1]["committed"]
        ),
        15,
        what="commits counted again after the replica came back",
    )
    wait_for(
        lambda: status_json(fleet)[0]["workers"][w1.node]["failures"] == 0,
        15,
        what="the failure count to reset",
    )
    log = w1.log()
    lines = [x for x in log.splitlines() if UNREPLICATED_LINE in x]
    assert len(lines) == 1, lines  # once per outage, not once per event
    assert "commits are replicated again" in log
    # Every event that ran while the replica was paused failed: none was reported stored.
    stored_while_paused = [
        c for c in commits(records) if c["committed"] and paused_at + 0.5 < c["at"] < resumed_at
    ]
    assert not stored_while_paused, stored_while_paused
    print(f"{len(failed)} commits failed during a {resumed_at - paused_at:.1f} s pause")


SENTINEL_TTL = 1.0
MASTER_NAME = "mymaster"


def test_with_min_replicas_sentinel_failovers_lose_no_commit_reported_stored(
    record_redis: RedisServer,
    records: Records,
    fleets: Callable[..., Fleet],
    make_redis_server: Callable[..., RedisServer],
) -> None:
    """Five failovers (the primary SIGKILLed), the replica made to lag before some of them.

    A commit the pool reported stored (``rec:commit``, committed, with the state's
    ``events`` count n) must be in every state read after it: no event that
    starts later may start from fewer than n events.  In the odd rounds the
    replica is paused and cut from the primary for a moment before the kill
    (commits meanwhile must fail, not count) and resumed right after it, so
    Sentinel promotes a replica without the last writes.
    """
    from celery_stoker.testing import RedisSentinel

    servers = [make_redis_server()]
    servers.append(make_redis_server(replica_of=servers[0].address))
    servers[1].wait_replica_synced()
    sentinel = RedisSentinel(servers[0].port, master_name=MASTER_NAME, down_after_ms=500)
    sentinel.start()
    started = time.monotonic()
    try:
        fleet = fleets(
            ttl=SENTINEL_TTL,
            broker=record_redis.url_for(0),
            STOKER_TEST_URL=f"sentinel://127.0.0.1:{sentinel.port}",
            STOKER_TEST_MASTER_NAME=MASTER_NAME,
            STOKER_TEST_TIMER="0.05",
            STOKER_TEST_MIN_REPLICAS="1",
            STOKER_TEST_RECORD_COMMITS="1",
        )
        fleet.start("w1@%h")
        fleet.start("w2@%h")
        primary, replica = servers
        for round_ in range(5):
            seen = len(commits(records))
            wait_for(
                lambda seen=seen: len([c for c in commits(records)[seen:] if c["committed"]]) >= 3,
                30,
                what=f"commits counted before failover {round_ + 1}",
            )
            lagging = round_ % 2 == 1
            if lagging:
                # The replica stops taking the stream: what the primary acknowledges from
                # now on is not on the replica Sentinel will promote.
                replica.pause()
                primary.client().client_kill_filter(_type="replica")
                time.sleep(0.3)  # paces the fault: commits go on without the replica
            primary.kill()
            if lagging:
                replica.resume()
            sentinel.wait_master_addr(replica.address, timeout=20)
            # The old primary comes back empty, as a replica of the new one.
            primary.replica_of = replica.address
            primary.start(port=primary.port)
            primary.wait_replica_synced()
            primary, replica = replica, primary
        seen = len(commits(records))
        wait_for(
            lambda: len([c for c in commits(records)[seen:] if c["committed"]]) >= 3,
            30,
            what="commits counted after the last failover",
        )
    finally:
        sentinel.close()
    took = time.monotonic() - started

    stored = [c for c in commits(records) if c["committed"]]
    unstored = [c for c in commits(records) if not c["committed"]]
    later = sorted(records.raw("event"), key=lambda e: e["started"])
    lost = []
    for commit in stored:
        after = [e for e in later if e["started"] > commit["at"]]
        if after and min(e["events"] for e in after) < commit["events"]:
            lost.append((commit, min(after, key=lambda e: e["events"])))
    assert not lost, f"commits reported stored were lost: {lost[:3]}"
    check_terms(records.events())
    print(
        f"5 failovers in {took:.1f} s: {len(stored)} commits counted, {len(unstored)} not "
        f"counted (replica lagging, or primary gone)"
    )
