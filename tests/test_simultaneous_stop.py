"""Two workers stopped at the same moment: the one that is stopping takes no lease.

Real ``celery worker`` processes (prefork) and real SIGTERMs.  The leader and
the follower its release names first are signalled together, or the follower
a few milliseconds after it took the lease (while it starts its term, its
consumer stopping before ``now_leader`` arrives).  A stopping follower takes
no lease, and no Stoker hears ``shutdown`` for a term in which it heard
nothing else.  The third worker leads after each round.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable

import pytest
from support.redis_server import RedisServer
from support.workers import Fleet, Records, check_terms, wait_for

pytestmark = pytest.mark.workers

ROUNDS = 10
#: When the named follower gets its SIGTERM: with the leader's (None), or this many
#: seconds after it took the lease (while it starts its term).
DELAYS = (None, 0.0, 0.0005, 0.001, 0.0015, 0.002, 0.0025, 0.003, 0.004, 0.005)


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
    fleet = fleets("prefork", ttl=3, STOKER_TEST_TIMER="0.2")
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
