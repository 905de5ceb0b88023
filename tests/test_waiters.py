"""Stopped followers leave the waiters, without gossip (issue 24, point 2).

Each "worker" here is a lease with a listener of its own, as in a real worker:
the listener's presence channel is its sign of life, and stopping the listener
(its connection closes, as when a worker is killed) is how a worker dies
without a clean stop.  Real ``celery worker`` processes with gossip off are in
``test_fleet_shapes.py``.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import pytest
import redis

from celery_stoker.connection import redis_client
from celery_stoker.keys import lease_channel, waiters_key, worker_channel
from celery_stoker.lease import RedisLease
from celery_stoker.listener import LeaseListener
from celery_stoker.testing.workers import wait_for

PREFIX = "stoker-waiters"
NAME = "job"


class Worker:
    """A lease and its own listener: one worker's election of ``NAME``."""

    def __init__(self, url: str, host: str, ttl: float) -> None:
        self.host = host
        self.client = redis_client(url, socket_timeout=5)
        self.listener = LeaseListener(
            lambda: redis_client(url, socket_timeout=5),
            lease_channel(PREFIX),
            presence=(worker_channel(PREFIX, host),),
        )
        self.listener.start(wait_subscribed=5)
        assert self.listener.subscribed
        self.lease = RedisLease(
            self.client,
            NAME,
            holder_id=f"{host}/1",
            hostname=host,
            ttl=ttl,
            key_prefix=PREFIX,
            listener=self.listener,
        )

    def die(self) -> None:
        """As SIGKILL: the listener's connection closes, nothing else is sent."""
        self.lease.wake()
        self.listener.stop()

    def close(self) -> None:
        self.die()
        self.lease.close()
        with contextlib.suppress(Exception):
            self.client.close()


@pytest.fixture
def workers(fresh_redis_url: str) -> Iterator[list[Worker]]:
    made: list[Worker] = []
    yield made
    for worker in made:
        worker.close()


def start(workers: list[Worker], url: str, host: str, ttl: float = 120.0) -> Worker:
    worker = Worker(url, host, ttl)
    workers.append(worker)
    return worker


def waiters(client: redis.Redis) -> list[str]:
    return [n.decode() for n in client.zrange(waiters_key(PREFIX, NAME), 0, -1)]


def test_a_release_skips_and_forgets_dead_waiters(
    workers: list[Worker], fresh_redis_url: str
) -> None:
    """Behind 10 dead waiters, the live one is named: it leads in milliseconds, not a TTL."""
    leader = start(workers, fresh_redis_url, "leader@h")
    term = leader.lease.acquire().term
    assert term is not None
    dead = [start(workers, fresh_redis_url, f"dead{i}@h") for i in range(10)]
    for worker in dead:
        assert worker.lease.acquire().term is None
    live = start(workers, fresh_redis_url, "live@h")
    result = live.lease.acquire()
    assert result.term is None
    assert live.lease.rank == 10
    for worker in dead:
        worker.die()
    # Redis drops a closed connection's subscriptions: no subscriber is left.
    wait_for(
        lambda: all(
            n == 0
            for _, n in leader.client.pubsub_numsub(*(worker_channel(PREFIX, w.host) for w in dead))
        ),
        5,
        what="the dead listeners' subscriptions gone",
    )
    assert leader.lease.release(term)
    released_at = time.monotonic()
    assert live.lease.wait(leader.lease.wait_timeout(result.holder), max_wait=2.0)
    taken = live.lease.acquire().term
    elapsed = time.monotonic() - released_at
    assert taken is not None
    print(f"\nhandover behind 10 dead waiters: {elapsed * 1000:.1f} ms")
    assert elapsed < 0.25, f"{elapsed:.3f} s"
    assert waiters(leader.client) == []


@pytest.mark.parametrize("at_a_time", [1, 5])
def test_churn_of_fresh_names_keeps_the_waiters_bounded(
    workers: list[Worker], fresh_redis_url: str, at_a_time: int
) -> None:
    """50 fresh names join and die (no clean stop): the set never holds more than a window."""
    leader = start(workers, fresh_redis_url, "leader@h")
    assert leader.lease.acquire().term is not None
    steady = start(workers, fresh_redis_url, "steady@h")
    assert steady.lease.acquire().term is None
    most = 0
    for batch in range(50 // at_a_time):
        group = [start(workers, fresh_redis_url, f"pod-{batch}-{i}@h") for i in range(at_a_time)]
        for worker in group:
            assert worker.lease.acquire().term is None
        most = max(most, len(waiters(leader.client)))
        for worker in group:
            worker.die()
        wait_for(
            lambda group=group: (
                not any(
                    n
                    for _, n in leader.client.pubsub_numsub(
                        *(worker_channel(PREFIX, w.host) for w in group)
                    )
                )
            ),
            5,
            what="their subscriptions gone",
        )
    # Every join looked at the newest PRUNE_WINDOW others: at most one batch is dead.
    assert most <= 1 + 2 * at_a_time, f"the waiters set grew to {most}"
    assert "steady@h" in waiters(leader.client)
    assert len(waiters(leader.client)) <= 1 + at_a_time


def test_a_follower_that_stops_cleanly_leaves(workers: list[Worker], fresh_redis_url: str) -> None:
    leader = start(workers, fresh_redis_url, "leader@h")
    assert leader.lease.acquire().term is not None
    follower = start(workers, fresh_redis_url, "follower@h")
    assert follower.lease.acquire().term is None
    assert waiters(leader.client) == ["follower@h"]
    follower.lease.leave()
    assert waiters(leader.client) == []


def test_without_a_listener_every_waiter_is_trusted(fresh_redis_url: str) -> None:
    """A caller that cannot tell liveness (no listener, a cluster) prunes nobody."""
    client = redis_client(fresh_redis_url, socket_timeout=5)
    try:
        holder, a, b = (
            RedisLease(client, NAME, holder_id=h, hostname=h, ttl=10.0, key_prefix=PREFIX)
            for h in ("holder@h", "a@h", "b@h")
        )
        term = holder.acquire().term
        assert term is not None
        assert a.acquire().term is None and b.acquire().term is None
        assert waiters(client) == ["a@h", "b@h"]
        assert holder.presence_prefix == ""
        assert holder.release(term)
        assert waiters(client) == ["a@h", "b@h"]  # named a, dropped nobody
    finally:
        client.close()


# ------------------------------------------------ spread: whom a release names (issue 25)


def follow(workers: list[Worker], url: str, *hosts: str) -> list[Worker]:
    """Followers of ``NAME`` (queued in this order: the first waits longest)."""
    made = [start(workers, url, host) for host in hosts]
    for worker in made:
        assert worker.lease.acquire().term is None
    return made


def test_an_ordered_release_names_the_first_candidate_that_waits_and_lives(
    workers: list[Worker], fresh_redis_url: str
) -> None:
    """The least loaded first: a candidate that does not wait, or died, is passed over."""
    leader = start(workers, fresh_redis_url, "leader@h")
    term = leader.lease.acquire().term
    assert term is not None
    oldest, dead, light = follow(workers, fresh_redis_url, "oldest@h", "dead@h", "light@h")
    dead.die()
    wait_for(
        lambda: leader.client.pubsub_numsub(worker_channel(PREFIX, dead.host))[0][1] == 0,
        5,
        what="the dead listener gone",
    )
    order = ["nowaiter@h", dead.host, light.host, oldest.host]
    assert leader.lease.release(term, live=order, ordered=True)
    assert leader.lease.named == light.host
    assert dead.host not in waiters(leader.client)  # looked at, found dead, dropped
    assert light.lease.wait(60.0, max_wait=2.0)  # named: its turn at once
    # Unordered (balance off, or gossip off): the longest-waiting, as before.
    again = light.lease.acquire().term
    assert again is not None
    assert light.lease.release(again, live=order)
    assert light.lease.named == oldest.host


@pytest.mark.parametrize("why", ["died", "drains", "lives"])
def test_a_handoff_to_a_worker_that_died_or_drains_is_a_plain_release(
    workers: list[Worker], fresh_redis_url: str, why: str
) -> None:
    """No lease kept for one TTL for a worker that will never take it: the next one takes it."""
    leader = start(workers, fresh_redis_url, "leader@h")
    term = leader.lease.acquire().term
    assert term is not None
    target, other = follow(workers, fresh_redis_url, "target@h", "other@h")
    if why == "died":
        target.die()
        wait_for(
            lambda: leader.client.pubsub_numsub(worker_channel(PREFIX, target.host))[0][1] == 0,
            5,
            what="the target's listener gone",
        )
    elif why == "drains":
        leader.client.sadd(leader.lease.draining_key, target.host)
    assert leader.lease.release(term, reserve_for=target.host, live=[other.host], ordered=True)
    if why == "lives":  # a live, non-draining target keeps its reservation
        assert leader.lease.named == target.host
        held = leader.lease.holder()
        assert held is not None and held.reserved_for == target.host
        assert other.lease.acquire().term is None
        assert target.lease.acquire().term is not None
        return
    assert leader.lease.named == other.host
    assert leader.client.get(leader.lease.lease_key) is None  # not reserved
    assert other.lease.acquire().term is not None


def test_a_draining_waiter_is_never_named(workers: list[Worker], fresh_redis_url: str) -> None:
    leader = start(workers, fresh_redis_url, "leader@h")
    term = leader.lease.acquire().term
    assert term is not None
    drained, live = follow(workers, fresh_redis_url, "drained@h", "live@h")
    leader.client.sadd(leader.lease.draining_key, drained.host)
    assert leader.lease.release(term)  # unordered: the longest-waiting would be drained@h
    assert leader.lease.named == live.host
    assert waiters(leader.client) == [live.host]


def test_a_drains_wake_reaches_only_that_workers_waiters(
    workers: list[Worker], fresh_redis_url: str
) -> None:
    from celery_stoker.control import announce
    from celery_stoker.keys import WAKE

    leader = start(workers, fresh_redis_url, "leader@h")
    assert leader.lease.acquire().term is not None
    drained, spared = follow(workers, fresh_redis_url, "drained@h", "spared@h")
    announce(leader.client, PREFIX, NAME, WAKE, extra=drained.host)
    assert drained.lease.wait(60.0, max_wait=2.0)  # woken: it looks, and learns it drains
    assert not spared.lease.wait(60.0, max_wait=0.5)
