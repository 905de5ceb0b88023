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
