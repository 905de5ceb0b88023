"""A worker's cost does not grow with its Stokers: Redis connections and threads.

A real prefork worker (-c 2) with 1 Stoker, then with 101, each on its own
``stoker_url``; the connections are counted on that Redis (``CLIENT LIST``)
once every Stoker leads, and the threads in the worker's main process.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest
from support.redis_stats import command_calls
from support.workers import Fleet

from celery_stoker.keys import reports_key
from celery_stoker.testing import RedisServer, wait_for

pytestmark = pytest.mark.workers


def _measure(
    fleets: Callable[..., Fleet], lease_redis: RedisServer, stokers: int
) -> tuple[int, int]:
    fleet = fleets(
        "prefork",
        ttl=2.0,
        STOKER_TEST_URL=lease_redis.url_for(0),
        STOKER_TEST_EXTRA_STOKERS=str(stokers - 1),
    )
    worker = fleet.start("w1@%h", concurrency=2)
    client = lease_redis.client()
    wait_for(
        lambda: len(client.keys("stoker:{*}:lease")) == stokers,
        60,
        what=f"{stokers} leases held",
    )
    wait_for(lambda: " ready." in worker.log(), 30, what="the worker ready")

    # Every Stoker ran its now_leader (both pool processes connected) and the pump
    # read every report: nothing is still starting when the count is taken.
    def settled() -> bool:
        ran = sum(
            client.hget(key, "last_event") is not None for key in client.keys("stoker:{*}:info")
        )
        return ran == stokers and client.llen(reports_key("stoker", worker.node)) == 0

    wait_for(settled, 60, what="every Stoker's now_leader ran and reported")
    own = client.client_id()
    connections = [c for c in client.client_list() if int(c["id"]) != own]
    threads = len(list(Path(f"/proc/{worker.pid}/task").iterdir()))
    client.close()  # else the next measure counts this test's own connection
    worker.sigterm()
    worker.wait_exit(30)
    lease_redis.flushall()
    return len(connections), threads


def test_connections_and_threads_do_not_grow_with_stokers(
    fleets: Callable[..., Fleet], make_redis_server: Callable[..., RedisServer]
) -> None:
    lease_redis = make_redis_server()
    one = _measure(fleets, lease_redis, 1)
    many = _measure(fleets, lease_redis, 101)
    print(f"\n1 Stoker: {one[0]} connections, {one[1]} threads; 101: {many[0]}, {many[1]}")
    assert many[0] - one[0] <= 4, f"connections grew from {one[0]} to {many[0]}"
    assert many[1] - one[1] <= 100, f"threads grew from {one[1]} to {many[1]}"


def test_an_idle_fleet_sends_no_blpop(
    fleets: Callable[..., Fleet], make_redis_server: Callable[..., RedisServer]
) -> None:
    """With no event in flight (no timer), neither leader nor follower asks for reports."""
    lease_redis = make_redis_server()
    fleet = fleets("prefork", ttl=2.0, STOKER_TEST_URL=lease_redis.url_for(0))
    client = lease_redis.client()
    fleet.start("w1@%h")
    wait_for(
        lambda: b"now_leader" in (client.hget("stoker:{recorder}:info", "last_event") or b""),
        30,
        what="w1 leads",
    )
    follower = fleet.start("w2@%h")
    wait_for(lambda: "following" in follower.log(), 30, what="w2 follows")
    # The leader's events are over: now_leader, then the cluster_change of w2 joining.
    wait_for(
        lambda: b"cluster_change" in (client.hget("stoker:{recorder}:info", "last_event") or b""),
        30,
        what="the leader heard w2 join",
    )

    def blpops() -> int:
        return command_calls(client).get("blpop", 0)

    # The last event's report may still be read: wait until the count stands still.
    counts = [blpops()]

    def settled() -> bool:
        time.sleep(0.5)
        counts.append(blpops())
        return counts[-1] == counts[-2]

    wait_for(settled, 30, interval=0, what="the last report read")
    before = counts[-1]
    # An observation window, not a timing assertion: a reader polling once a second
    # would show up several times in it.
    time.sleep(3.0)
    assert blpops() == before
