"""Election, failover and dispatch with real ``celery worker`` processes and a real Redis.

The workers run ``tests/apps/recorder.py``, whose Stoker records every
callback (event, host, token, members, time) in Redis; the tests read those
records and check the promises README.md makes (Guarantees and limits) on them.  Nothing is mocked.
"""

from __future__ import annotations

import itertools
import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable

import pytest
from support.workers import ROOT, Fleet, Records, check_terms, heard_join, stoker_status

import celery_stoker
from celery_stoker.testing import RedisServer, wait_for

pytestmark = pytest.mark.workers

TTL = 1.5
RENEW = TTL / 3
APP = "tests.apps.recorder"


@pytest.fixture
def fleet(fleets: Callable[..., Fleet]) -> Fleet:
    """Prefork workers: the default pool (test_pools.py runs the core scenario on every pool)."""
    return fleets("prefork", STOKER_TEST_TIMER="0.25")


def leader_of(records: Records) -> str | None:
    now_leaders = records.of("now_leader")
    return now_leaders[-1].host if now_leaders else None


def whereis(redis_server: RedisServer) -> str | None:
    from celery import Celery

    from celery_stoker import whereis as _whereis

    app = Celery("client", broker=redis_server.url_for(0))
    app.conf.stoker_lease_ttl = TTL
    return _whereis(app, "recorder")


def test_one_leader_of_three_and_whereis_agrees(
    fleet: Fleet, records: Records, redis_server: RedisServer
) -> None:
    for i in (1, 2, 3):
        fleet.start(f"w{i}@%h")
    first = wait_for(lambda: records.of("now_leader"), 30, what="a now_leader callback")
    # Let the fleet settle for several renew periods, then look again: still one.
    wait_for(lambda: len(records.of("timer")) >= 8, 30, what="timer events")
    events = records.events()
    now_leaders = records.of("now_leader", events)
    assert len(now_leaders) == 1, now_leaders
    assert now_leaders[0] == first[0]
    assert whereis(redis_server) == now_leaders[0].host
    assert {r.host for r in records.of("timer", events)} == {now_leaders[0].host}
    check_terms(events)


def test_sigterm_hands_over_at_once_with_higher_token_and_state(
    fleets: Callable[..., Fleet], redis_server: RedisServer, records: Records
) -> None:
    # A long TTL: a handover that waited for expiry instead of the release wake-up
    # would take seconds, so "well under a second" tests the mechanism.
    fleet = fleets("solo", ttl=6, STOKER_TEST_TIMER="0.25")
    for i in (1, 2, 3):
        fleet.start(f"w{i}@%h")
    first = wait_for(lambda: records.of("now_leader"), 30, what="first leader")[0]
    wait_for(lambda: len(records.of("timer")) >= 3, 30, what="timers on the first leader")
    fleet.by_node(first.host).sigterm()
    killed_at = time.time()
    second = wait_for(
        lambda: [r for r in records.of("now_leader") if r.host != first.host],
        10,
        what="a second leader",
    )[0]
    fleet.by_node(first.host).wait_exit(30)
    events = records.events()
    shutdowns = [r for r in records.of("shutdown", events) if r.token == first.token]
    assert [s.reason for s in shutdowns] == ["worker_stopping"]
    assert second.token > first.token
    assert second.at - killed_at < 1.0, f"handover took {second.at - killed_at:.3f}s"
    assert second.at >= shutdowns[0].at
    # The old leader did nothing after the new one started.
    assert not [r for r in events if r.host == first.host and r.at > second.at]
    # State carried over: the new term continued the count instead of init() again.
    assert len(records.inits()) == 1
    before = [r for r in events if r.token == first.token]
    assert second.events == max(r.events for r in before) + 1
    check_terms(events)


def test_sigkill_fails_over_within_ttl_plus_renew(fleet: Fleet, records: Records) -> None:
    for i in (1, 2, 3):
        fleet.start(f"w{i}@%h")
    first = wait_for(lambda: records.of("now_leader"), 30, what="first leader")[0]
    wait_for(lambda: len(records.of("timer")) >= 2, 30, what="timers")
    fleet.by_node(first.host).sigkill()
    killed_at = time.time()
    second = wait_for(
        lambda: [r for r in records.of("now_leader") if r.host != first.host],
        15,
        what="a new leader after SIGKILL",
    )[0]
    took = second.at - killed_at
    # Bound: the lease expires at most one TTL after the last renewal; the waiter
    # wakes at expiry; the task then goes through the broker (a generous 0.5 s).
    assert took <= TTL + RENEW + 0.5, f"crash failover took {took:.3f}s"
    assert second.token > first.token
    check_terms(records.events())


def test_cluster_change_on_join_and_on_sigkill(fleet: Fleet, records: Records) -> None:
    w1 = fleet.start("w1@%h")
    wait_for(lambda: records.of("now_leader"), 30, what="w1 leads")
    w2 = fleet.start("w2@%h")
    joined = wait_for(
        lambda: [
            r
            for r in records.of("cluster_change")
            if r.reason == {"node": w2.node, "change": "joined"}
        ],
        30,
        what="cluster_change joined",
    )[0]
    assert joined.host == w1.node
    assert set(joined.members) == {w1.node, w2.node}
    w2.sigkill()
    lost = wait_for(
        lambda: [
            r
            for r in records.of("cluster_change")
            if r.reason == {"node": w2.node, "change": "lost"}
        ],
        40,
        what="cluster_change lost (heartbeats stopped)",
    )[0]
    assert lost.host == w1.node
    assert set(lost.members) == {w1.node}


def test_cluster_change_on_clean_leave(fleet: Fleet, records: Records) -> None:
    w1 = fleet.start("w1@%h")
    wait_for(lambda: records.of("now_leader"), 30, what="w1 leads")
    w2 = fleet.start("w2@%h")
    heard_join(records, w2.node)
    w2.sigterm()
    left = wait_for(
        lambda: [
            r
            for r in records.of("cluster_change")
            if r.reason == {"node": w2.node, "change": "left"}
        ],
        30,
        what="cluster_change left",
    )[0]
    assert left.host == w1.node


def test_raising_callback_keeps_worker_and_timer_alive(
    fleets: Callable[..., Fleet], redis_server: RedisServer, records: Records
) -> None:
    import socket

    node = f"w1@{socket.gethostname()}"
    fleet = fleets("solo", STOKER_TEST_TIMER="0.2", STOKER_TEST_RAISE_ON_TIMER=node)
    worker = fleet.start("w1@%h")
    wait_for(lambda: len(records.of("timer")) >= 5, 30, what="timers keep firing")
    assert worker.alive()
    assert "boom in timer" in worker.log()
    assert "RuntimeError" in worker.log()
    events = records.events()
    # Every timer raised, so the stored count never moved past now_leader's.
    assert {r.events for r in records.of("timer", events)} == {1}
    client = redis_server.client()
    info = client.hgetall("stoker:{recorder}:info")
    assert b"boom in timer" in info[b"last_error"]


def test_inspect_and_status_commands(
    fleets: Callable[..., Fleet], redis_server: RedisServer, records: Records
) -> None:
    fleet = fleets("solo")
    w1 = fleet.start("w1@%h")
    wait_for(lambda: records.of("now_leader"), 30, what="w1 leads")
    w2 = fleet.start("w2@%h")
    env = {**fleet.env, "PYTHONPATH": str(ROOT)}

    def inspect() -> dict | None:
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                APP,
                "inspect",
                "stoker",
                "--json",
                "--timeout",
                "2",
            ],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        try:
            replies = json.loads(out.stdout)
        except ValueError:
            return None
        return replies if len(replies) == 2 else None

    replies = wait_for(inspect, 40, interval=0.5, what="two workers answer inspect stoker")
    states = {node: r["activators"]["recorder"]["state"] for node, r in replies.items()}
    assert states == {w1.node: "leader", w2.node: "follower"}
    assert replies[w2.node]["activators"]["recorder"]["leader"] == w1.node
    # Each worker says which release it runs (the package's metadata, its one source).
    assert {r["version"] for r in replies.values()} == {celery_stoker.__version__}

    out = stoker_status(APP, env)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split()[:3] == ["STOKER", "LEADER", "TOKEN"]
    row = next(line for line in lines if line.startswith("recorder"))
    assert w1.node in row and w2.node in row
    versions = next(line for line in lines if line.startswith("workers: "))
    for worker in (w1, w2):
        assert f"{worker.node} {celery_stoker.__version__}" in versions, versions
    assert "old" not in versions, versions


def test_dump_from_a_client_process(
    fleets: Callable[..., Fleet], redis_server: RedisServer, records: Records
) -> None:
    from celery import Celery

    from celery_stoker import dump

    fleet = fleets("solo", STOKER_TEST_TIMER="0.3")
    w1 = fleet.start("w1@%h")
    wait_for(lambda: records.of("timer"), 30, what="w1 leads and ticks")
    app = Celery("client", broker=redis_server.url_for(0))
    app.conf.stoker_lease_ttl = TTL
    view = wait_for(
        lambda: (d := dump(app, "recorder", timeout=2.0))["workers"] and d,
        30,
        interval=0.3,
        what="a dump with workers",
    )
    assert view["leader"] == w1.node
    assert view["token"] == records.of("now_leader")[0].token
    assert view["last_event"] in ("timer", "now_leader")
    assert 0 < view["lease_time_left"] <= TTL
    worker_view = view["workers"][w1.node]
    assert worker_view["state"] == "leader"
    assert worker_view["current_node"] == w1.node
    assert worker_view["active_from"] and worker_view["created_at"]


def test_a_message_for_an_earlier_term_is_refused_with_one_log_line(
    fleets: Callable[..., Fleet], redis_server: RedisServer, records: Records
) -> None:
    """A dispatch message the pump did not send (here: an earlier term's) never runs."""
    fleet = fleets("solo")
    w1 = fleet.start("w1@%h")
    leader = wait_for(lambda: records.of("now_leader"), 30, what="w1 leads")[0]
    from celery import Celery

    app = Celery("client", broker=redis_server.url_for(0))
    stale = leader.token - 1
    for seq in (998, 999):
        app.send_task(
            "celery_stoker.dispatch",
            args=["recorder", stale, seq, "timer", None, [w1.node], w1.node],
            queue=f"stoker.{w1.node}",
        )
    wait_for(lambda: "refused a dispatch message" in w1.log(), 20, what="the refusal's log line")
    assert not [r for r in records.events() if r.token == stale]
    assert w1.log().count("refused a dispatch message") == 1


def test_fenced_commit_rejects_stale_token(redis_server: RedisServer) -> None:
    """The state write checks the lease's token in the same script (no workers needed)."""
    from celery_stoker.lease import RedisLease
    from celery_stoker.store import StateError, StokerStore

    client = redis_server.client()
    lease = RedisLease(client, "fenced", holder_id="a", hostname="a@h", ttl=5)
    term = lease.acquire().term
    assert term is not None
    store = StokerStore(client, "fenced", key_prefix="stoker")
    assert store.commit(term.token, store.encode({"n": 1}), {"last_event": "timer"})
    assert store.load().value == {"n": 1}
    assert lease.release(term)
    newer = RedisLease(client, "fenced", holder_id="b", hostname="b@h", ttl=5).acquire().term
    assert newer is not None and newer.token > term.token
    assert not store.commit(term.token, store.encode({"n": 99}), {"last_event": "late"})
    assert store.load().value == {"n": 1}
    # A foreign value under the state key is reported by name, never used.
    client.delete("stoker:{fenced}:state")
    client.set("stoker:{fenced}:state", "x")
    with pytest.raises(StateError, match="fenced"):
        store.load()


@pytest.mark.parametrize(
    ("sig", "soft"),
    [(signal.SIGINT, "0"), (signal.SIGQUIT, "0"), (signal.SIGTERM, "2")],
    ids=["SIGINT-warm", "SIGQUIT-cold", "SIGTERM-soft-shutdown"],
)
def test_every_shutdown_kind_releases_first(
    fleets: Callable[..., Fleet], redis_server: RedisServer, records: Records, sig: int, soft: str
) -> None:
    fleet = fleets("solo", ttl=6, STOKER_TEST_SOFT_SHUTDOWN=soft)
    fleet.start("w1@%h")
    first = wait_for(lambda: records.of("now_leader"), 30, what="first leader")[0]
    fleet.start("w2@%h")
    wait_for(lambda: [r for r in records.of("cluster_change")], 30, what="w2 seen")
    fleet.by_node(first.host).signal(sig)
    sent_at = time.time()
    second = wait_for(
        lambda: [r for r in records.of("now_leader") if r.host != first.host],
        10,
        what="a second leader",
    )[0]
    assert second.at - sent_at < 1.0, f"handover took {second.at - sent_at:.3f}s"
    shutdowns = [r for r in records.of("shutdown") if r.token == first.token]
    assert [s.reason for s in shutdowns] == ["worker_stopping"]
    fleet.by_node(first.host).wait_exit(30)
    check_terms(records.events())


def test_busy_pool_never_delays_a_renewal(
    fleets: Callable[..., Fleet], redis_server: RedisServer, records: Records
) -> None:
    """A solo pool stuck in a long task for 3 TTLs keeps its leadership."""
    fleet = fleets("solo", STOKER_TEST_TIMER="0.2")
    w1 = fleet.start("w1@%h")
    leader = wait_for(lambda: records.of("now_leader"), 30, what="w1 leads")[0]
    fleet.start("w2@%h")
    wait_for(lambda: records.of("cluster_change"), 30, what="w2 seen")
    from celery import Celery

    app = Celery("client", broker=redis_server.url_for(0))
    app.send_task("recorder.sleep", args=[3 * TTL], queue=f"stoker.{w1.node}")
    wait_for(lambda: records.raw("slept"), 30, what="the long task to finish")
    # Timers resume on the same term once the pool is free again.
    after = wait_for(
        lambda: [r for r in records.of("timer") if r.at > records.raw("slept")[0]["at"]],
        10,
        what="timers after the long task",
    )
    assert after[0].token == leader.token
    events = records.events()
    assert len(records.of("now_leader", events)) == 1
    assert not records.of("shutdown", events)


def test_events_run_one_at_a_time_and_in_order_in_prefork(
    fleets: Callable[..., Fleet], redis_server: RedisServer, records: Records
) -> None:
    fleet = fleets("prefork", STOKER_TEST_TIMER="0.01", STOKER_TEST_EVENT_SLEEP="0.05")
    fleet.start("w1@%h", concurrency=4)
    wait_for(lambda: records.of("now_leader"), 30, what="w1 leads")
    fleet.start("w2@%h")  # a cluster_change among the timers
    wait_for(lambda: records.of("cluster_change"), 30, what="a cluster change")
    wait_for(lambda: len(records.events()) >= 25, 30, what="25 events")
    events = [r for r in records.events() if r.event != "shutdown"]
    for before, after in itertools.pairwise(events):
        assert after.started >= before.at, f"{after} started before {before} ended"
        assert after.events == before.events + 1, "events ran out of order"


def test_leader_that_cannot_renew_steps_down_and_leads_again(
    fleets: Callable[..., Fleet],
    redis_server: RedisServer,
    make_redis_server: Callable[..., RedisServer],
    records: Records,
) -> None:
    """Redis for the lease stops answering: the leader says shutdown(lease_lost) itself."""
    lease_redis = make_redis_server()
    fleet = fleets("solo", STOKER_TEST_URL=lease_redis.url_for(0), STOKER_TEST_TIMER="0.2")
    w1 = fleet.start("w1@%h")
    first = wait_for(lambda: records.of("now_leader"), 30, what="w1 leads")[0]
    lease_redis.pause()
    paused_at = time.time()
    lost = wait_for(
        lambda: [r for r in records.of("shutdown") if r.reason == "lease_lost"],
        10,
        what="shutdown(lease_lost)",
    )[0]
    assert lost.token == first.token and lost.host == w1.node
    # No timer of that term ran once the term was over (TTL after the pause at most).
    assert not [r for r in records.of("timer") if r.at > paused_at + TTL]
    lease_redis.resume()
    again = wait_for(
        lambda: [r for r in records.of("now_leader") if r.token > first.token],
        15,
        what="leader again after Redis answers",
    )[0]
    assert again.host == w1.node
    assert w1.alive()
    assert "Traceback" not in w1.log()


def test_in_process_hooks_run_in_the_worker_main_process(
    fleets: Callable[..., Fleet], redis_server: RedisServer, records: Records
) -> None:
    fleet = fleets("prefork")
    w1 = fleet.start("w1@%h", concurrency=2)
    now_leader = wait_for(lambda: records.of("now_leader"), 30, what="w1 leads")[0]
    started = records.raw("hook")[0]
    assert (started["hook"], started["pid"], started["token"]) == (
        "started",
        w1.pid,
        now_leader.token,
    )
    assert started["at"] <= now_leader.started
    assert records.raw("event")[0]["pid"] != w1.pid, "now_leader should run in the pool"
    w1.sigterm()
    w1.wait_exit(30)
    stopping = records.raw("hook")[-1]
    shutdown = records.of("shutdown")[-1]
    assert (stopping["hook"], stopping["reason"], stopping["pid"]) == (
        "stopping",
        "worker_stopping",
        w1.pid,
    )
    assert stopping["at"] <= shutdown.started


def test_cluster_change_with_task_events_enabled(
    fleets: Callable[..., Fleet], redis_server: RedisServer, records: Records
) -> None:
    """``-E`` (task events on) changes nothing for membership."""
    fleet = fleets("solo")
    w1 = fleet.start("w1@%h", extra_args=["-E"])
    wait_for(lambda: records.of("now_leader"), 30, what="w1 leads")
    w2 = fleet.start("w2@%h", extra_args=["-E"])
    joined = heard_join(records, w2.node)
    assert (joined.host, joined.reason["change"]) == (w1.node, "joined")


def test_without_gossip_members_is_only_this_worker(
    fleets: Callable[..., Fleet], redis_server: RedisServer, records: Records
) -> None:
    fleet = fleets("solo", STOKER_TEST_TIMER="0.3")
    w1 = fleet.start("w1@%h", extra_args=["--without-gossip"])
    wait_for(lambda: records.of("now_leader"), 30, what="w1 leads")
    w2 = fleet.start("w2@%h")
    # w2 is up (its activator follows w1) and several timers passed on w1.
    wait_for(lambda: "following" in w2.log(), 30, what="w2 follows")
    seen = len(records.events())
    wait_for(lambda: len(records.events()) >= seen + 5, 30, what="more timers")
    events = records.events()
    assert {r.host for r in events} == {w1.node}
    assert {r.members for r in events} == {(w1.node,)}
    assert not records.of("cluster_change", events)
    assert w1.log().count("gossip is off") == 1
    # A deliberate setting, said at INFO: a WARNING would page at every deploy.
    assert "INFO/MainProcess] celery-stoker: gossip is off" in w1.log()
    # Nor is leadership spread: said once, whatever the number of Stokers.
    assert w1.log().count("leadership is not spread: without gossip") == 1


def test_stopping_leader_lets_the_running_event_finish_before_shutdown(
    fleets: Callable[..., Fleet], redis_server: RedisServer, records: Records
) -> None:
    fleet = fleets("threads", STOKER_TEST_TIMER="0.05", STOKER_TEST_EVENT_SLEEP="0.8")
    w1 = fleet.start("w1@%h")
    wait_for(
        lambda: [r for r in records.raw("started") if r["event"] == "timer"],
        30,
        what="a slow timer callback running",
    )
    w1.sigterm()
    w1.wait_exit(30)
    events = records.events()
    shutdown = records.of("shutdown", events)[0]
    running = [r for r in events if r.event == "timer"][-1]
    assert shutdown.started >= running.at, "shutdown ran while an event was in the pool"
