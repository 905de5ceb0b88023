"""Two workers stopped at the same moment: the one that is stopping takes no lease.

Real ``celery worker`` processes (prefork), a real ``redis-server`` and real
SIGTERMs.  The race itself is sub-millisecond, so the first two tests hold it
open on purpose:

* a follower's acquire is kept in flight (a proxy holds its commands) while the
  leader releases to it and the follower gets its SIGTERM: a worker that has
  begun stopping never leads, even when Redis answers an acquire it sent before;
* a follower whose only pool process is busy takes the lease and is stopped
  before its ``now_leader`` can start: its Stoker hears no ``shutdown`` for that
  term.

The last test stops pairs of workers together, a few times, as an operator would:
the race there is too narrow to lose reliably, so it guards the common case only.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable

import pytest
from celery import Celery
from support.tcp_proxy import TcpProxy
from support.workers import Fleet, Records, check_terms

from celery_stoker.keys import lease_channel, token_key, transitions_key
from celery_stoker.testing import RedisServer, WorkerProcess, wait_for

pytestmark = pytest.mark.workers

ROUNDS = 4
#: When the named follower gets its SIGTERM: with the leader's (None), or this many
#: seconds after it took the lease (while it starts its term).
DELAYS = (None, 0.0, 0.001, 0.003)


def no_quarantine(redis_server: RedisServer) -> None:
    """Give Redis a fencing counter, so the first leader acts at once (no one-TTL wait)."""
    redis_server.client().set(token_key("stoker", "recorder"), 1)


def waiters_in_order(redis_server: RedisServer, among: list[str]) -> list[str]:
    """Wait until every one of ``among`` waits for the lease; their order (first tries first)."""
    client = redis_server.client()

    def look() -> list[str] | None:
        waiters = [w.decode() for w in client.zrange("stoker:{recorder}:waiters", 0, -1)]
        ours = [w for w in waiters if w in among]
        return ours if set(ours) == set(among) else None

    return wait_for(look, 30, what=f"{among} waiting")


def leads_after(records: Records, worker: WorkerProcess, since: float) -> None:
    """Until ``worker``'s Stoker hears ``now_leader`` (recorded at or after ``since``)."""
    wait_for(
        lambda: [r for r in records.of("now_leader") if r.host == worker.node and r.at >= since],
        30,
        what=f"{worker.node} leads",
    )


def heard_by(records: Records, node: str) -> list[tuple[str, object]]:
    """Every callback and in-process hook that ran on ``node``."""
    events = [(r.event, r.token) for r in records.events() if r.host == node]
    hooks = [(f"hook:{h['hook']}", h["token"]) for h in records.raw("hook") if h["host"] == node]
    return events + hooks


def elected(redis_server: RedisServer) -> list[str]:
    """The node of every ``elected`` transition Redis recorded, oldest first."""
    raw = redis_server.client().lrange(transitions_key("stoker", "recorder"), 0, -1)
    entries = [json.loads(item) for item in raw]
    return [e["node"] for e in sorted(entries, key=lambda e: e["at"]) if e["event"] == "elected"]


def test_a_stopping_worker_never_leads_on_an_acquire_sent_before_its_stop(
    fleets: Callable[..., Fleet], redis_server: RedisServer, records: Records
) -> None:
    """The follower's acquire is in flight when its SIGTERM lands; Redis grants it after.

    Its commands go through a proxy that holds them: the leader's release still
    reaches it (replies flow), it sends its acquire, and only once the worker has
    begun stopping does the acquire reach Redis, which grants it.  The stopping
    worker gives the lease back with no hook and no event; the next worker leads.
    """
    no_quarantine(redis_server)
    # TTL 10: a command may wait 1.3 s (the socket timeout) while the proxy holds it.
    fleet = fleets("prefork", ttl=10, STOKER_TEST_BALANCE="0")
    leader = fleet.start("ia0@%h")
    leads_after(records, leader, 0)
    with TcpProxy("127.0.0.1", redis_server.port) as proxy:
        stopping = fleet.start(
            "ia1@%h", env={"STOKER_TEST_URL": f"redis://127.0.0.1:{proxy.port}/0"}
        )
        stopping.wait_ready()
        waiters_in_order(redis_server, [stopping.node])
        pubsub = redis_server.client().pubsub(ignore_subscribe_messages=True)
        pubsub.subscribe(lease_channel("stoker"))
        proxy.hold_upstream()
        leader.signal(signal.SIGTERM)  # its release names the only waiter
        wait_for(
            lambda: b"{recorder}:waiters" in proxy.held_bytes(),
            10,
            what=f"{stopping.node}'s acquire held in the proxy",
        )
        stopping.signal(signal.SIGTERM)
        wait_for(
            lambda: "Warm shutdown" in stopping.log(current=True),
            5,
            what=f"{stopping.node} begins to stop",
        )
        time.sleep(0.2)  # the signal handler is over (not an assertion: a precondition)
        proxy.release_upstream()  # now Redis grants the acquire sent before the stop
        mark = f" recorder {stopping.node} ".encode()
        wait_for(  # the premise: Redis did grant it
            lambda: (
                (m := pubsub.get_message(timeout=0.01))
                and m["data"].startswith(b"acquired ")
                and mark in m["data"]
            ),
            10,
            what=f"Redis grants {stopping.node}'s held acquire",
        )
        pubsub.close()
        leader.wait_exit()
        stopping.wait_exit()
    since = time.time()
    third = fleet.start("ia2@%h")
    leads_after(records, third, since)
    assert heard_by(records, stopping.node) == [], (
        f"{stopping.node} acted on a lease it took while stopping"
    )
    assert stopping.node not in elected(redis_server)
    check_terms(records.events())


def test_a_term_whose_now_leader_never_started_ends_without_shutdown(
    fleets: Callable[..., Fleet], redis_server: RedisServer, records: Records
) -> None:
    """The new leader's only pool process is busy: its ``now_leader`` waits, then it stops.

    It took the lease and started its term (``now_leader`` sent), but the event
    never started before the SIGTERM: its Stoker heard nothing of the term, so it
    must not hear ``shutdown`` for it.  The third worker leads next.
    """
    no_quarantine(redis_server)
    # A short stop budget: the step-down waits only 0.25 s for the unstarted now_leader,
    # so it is still in flight (sent, never started) when the term ends.
    fleet = fleets("prefork", ttl=3, STOKER_TEST_STOP_TIMEOUT="0.5", STOKER_TEST_BALANCE="0")
    leader = fleet.start("ib0@%h")
    leads_after(records, leader, 0)
    busy = fleet.start("ib1@%h", concurrency=1, extra_args=["-Q", "ib1-busy"])
    busy.wait_ready()
    waiters_in_order(redis_server, [busy.node])
    third = fleet.start("ib2@%h")
    third.wait_ready()
    assert waiters_in_order(redis_server, [busy.node, third.node])[0] == busy.node
    client = Celery("client", broker=redis_server.url_for(0))
    try:
        client.send_task("recorder.block", args=["rec:go", 60], queue="ib1-busy")
    finally:
        client.close()
    wait_for(
        lambda: [r for r in records.raw("blocking") if r["host"] == busy.node],
        30,
        what=f"{busy.node}'s only pool process busy",
    )
    since = time.time()
    leader.signal(signal.SIGTERM)  # its release names the busy worker
    term = wait_for(
        lambda: next(
            (
                h["token"]
                for h in records.raw("hook")
                if h["host"] == busy.node and h["hook"] == "started"
            ),
            None,
        ),
        30,
        what=f"{busy.node} starts its term",
    )
    busy.signal(signal.SIGTERM)  # its now_leader is sent, and cannot start
    leads_after(records, third, since)
    records.client.rpush("rec:go", 1)  # let the busy worker finish its task and exit
    leader.wait_exit()
    busy.wait_exit()
    heard = [r for r in records.events() if r.token == term]
    assert not [r for r in heard if r.event == "shutdown"], (
        f"{busy.node}'s Stoker heard shutdown for term {term}, whose now_leader it never "
        f"got: {[(r.event, r.host) for r in heard]}"
    )
    assert heard == [], f"term {term} ran events after it was over: {heard}"
    check_terms(records.events())


def first_waiter(redis_server: RedisServer, among: set[str]) -> str:
    """The follower a release names first (the longest-waiting one)."""
    client = redis_server.client()

    def look() -> str | None:
        waiters = [w.decode() for w in client.zrange("stoker:{recorder}:waiters", 0, -1)]
        ours = [w for w in waiters if w in among]  # a stopped worker's entry may linger
        return ours[0] if set(ours) == among else None

    return wait_for(look, 30, what=f"{sorted(among)} waiting")


def test_two_workers_stopped_together_never_hand_each_other_a_silent_term(
    fleets: Callable[..., Fleet], redis_server: RedisServer, records: Records
) -> None:
    no_quarantine(redis_server)
    fleet = fleets("prefork", ttl=3, STOKER_TEST_TIMER="0.2", STOKER_TEST_BALANCE="0")
    leader = fleet.start("r0a@%h")
    wait_for(lambda: records.of("now_leader"), 30, what="a first leader")
    for n in range(ROUNDS):
        a = fleet.start(f"r{n}b@%h")
        b = fleet.start(f"r{n}c@%h")
        a.wait_ready()
        b.wait_ready()
        named = first_waiter(redis_server, {a.node, b.node})
        doomed, survivor = (a, b) if named == a.node else (b, a)
        since = time.time()
        delay = DELAYS[n % len(DELAYS)]
        if delay is None:  # both at the same moment
            leader.signal(signal.SIGTERM)
            doomed.signal(signal.SIGTERM)
        else:  # the follower's signal lands `delay` after it took the lease
            pubsub = redis_server.client().pubsub(ignore_subscribe_messages=True)
            pubsub.subscribe("stoker:lease-events")
            leader.signal(signal.SIGTERM)
            mark = f" recorder {doomed.node} ".encode()
            wait_for(
                lambda p=pubsub, mark=mark: (
                    (m := p.get_message(timeout=0.01))
                    and m["data"].startswith(b"acquired ")
                    and mark in m["data"]
                ),
                30,
                what=f"round {n}: {doomed.node} takes the lease",
            )
            time.sleep(delay)
            doomed.signal(signal.SIGTERM)
            pubsub.close()
        leader.wait_exit()
        doomed.wait_exit()
        wait_for(
            lambda s=survivor, since=since: [
                r for r in records.of("now_leader") if r.host == s.node and r.at >= since
            ],
            30,
            what=f"round {n}: {survivor.node} leads",
        )
        leader = survivor
    terms = check_terms(records.events())
    silent = {
        token: [(r.event, r.host) for r in items]
        for token, items in terms.items()
        if all(r.event == "shutdown" for r in items)
    }
    assert not silent, f"terms whose Stoker heard shutdown and nothing else: {silent}"
