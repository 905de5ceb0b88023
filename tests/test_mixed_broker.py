"""A RabbitMQ broker with the lease in Redis: election, failover, callbacks and gossip.

The workers' broker is RabbitMQ (``amqp://guest:guest@127.0.0.1:5672//``, or
``$STOKER_TEST_AMQP_URL``) while ``stoker_url`` names a private Redis, which also holds what
the recorder app records.  Events travel to the leader's own queue over amqp, and membership
comes from Celery's gossip over amqp.

The RabbitMQ vhost is shared with every other run on the machine, so node names carry a
random suffix, only our own nodes are looked for in ``members``, and our event queues are
deleted at the end.
"""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from collections.abc import Callable, Iterator

import pytest
from support.workers import Fleet, Records, check_terms

from celery_stoker.testing import RedisServer, wait_for

pytestmark = pytest.mark.workers

APP = "tests.apps.recorder"
AMQP_URL = os.environ.get("STOKER_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")
TTL = 1.5


@pytest.fixture(scope="module")
def amqp_url() -> str:
    """The RabbitMQ URL, or a skip saying why it cannot be used."""
    from kombu import Connection

    try:
        with Connection(AMQP_URL, connect_timeout=3) as conn:
            conn.ensure_connection(max_retries=1, timeout=3)
    except Exception as exc:
        pytest.skip(f"RabbitMQ is not reachable at {AMQP_URL} ({exc.__class__.__name__}: {exc})")
    return AMQP_URL


@pytest.fixture
def amqp_fleet(
    amqp_url: str, redis_server: RedisServer, fleets: Callable[..., Fleet]
) -> Iterator[Fleet]:
    """RabbitMQ as the broker; the lease and the records in ``redis_server``."""
    fleet = fleets(
        broker=amqp_url, STOKER_TEST_URL=redis_server.url_for(0), STOKER_TEST_TIMER="0.25"
    )
    yield fleet
    fleet.cleanup()
    _delete_event_queues(amqp_url, [f"stoker.{w.node}" for w in fleet.workers])


def _delete_event_queues(url: str, names: list[str]) -> None:
    """Our per-worker event queues are durable: leave nothing behind in the shared vhost."""
    from kombu import Connection

    with contextlib.suppress(Exception), Connection(url, connect_timeout=3) as conn:
        channel = conn.default_channel
        for name in names:
            with contextlib.suppress(Exception):
                channel.queue_delete(name)
            with contextlib.suppress(Exception):
                channel.exchange_delete(name)


def test_rabbitmq_broker_with_redis_lease_elects_fails_over_and_gossips(
    amqp_fleet: Fleet, redis_server: RedisServer
) -> None:
    fleet = amqp_fleet
    records = Records(redis_server.client())
    run = uuid.uuid4().hex[:8]
    try:
        w1 = fleet.start(f"w1-{run}@%h")
        first = wait_for(lambda: records.of("now_leader"), 40, what="w1 leads")[0]
        assert first.host == w1.node
        w2 = fleet.start(f"w2-{run}@%h")
        # Membership: w2's worker-online reached w1 through RabbitMQ's celeryev exchange.
        joined = wait_for(
            lambda: [
                r
                for r in records.of("cluster_change")
                if r.reason == {"node": w2.node, "change": "joined"}
            ],
            40,
            what="cluster_change joined for w2, via gossip over amqp",
        )[0]
        assert joined.host == w1.node and joined.token == first.token
        assert {w1.node, w2.node} <= set(joined.members)
        wait_for(lambda: "following" in w2.log(), 20, what="w2 follows w1")
        wait_for(
            lambda: len([r for r in records.of("timer") if r.token == first.token]) >= 3,
            20,
            what="timers on w1, sent to its own queue over amqp",
        )

        w1.sigterm()
        stopped_at = time.time()
        second = wait_for(
            lambda: [r for r in records.of("now_leader") if r.host == w2.node],
            15,
            what="w2 leads after w1's SIGTERM",
        )[0]
        w1.wait_exit(30)
        wait_for(
            lambda: len([r for r in records.of("timer") if r.token == second.token]) >= 3,
            20,
            what="timers on w2",
        )
        events = records.events()
        assert second.token > first.token
        handover = second.at - stopped_at
        assert handover < 1.0, f"handover over amqp took {handover:.3f}s"
        shutdowns = [r for r in records.of("shutdown", events) if r.token == first.token]
        assert [(s.host, s.reason) for s in shutdowns] == [(w1.node, "worker_stopping")]
        # One state, carried across the handover: no second init(), the count went on.
        assert len(records.inits()) == 1
        before = [r for r in events if r.token == first.token]
        assert second.events == max(r.events for r in before) + 1
        assert not [r for r in events if r.host == w1.node and r.at > second.at]
        check_terms(events)
        print(f"handover over amqp: {handover:.3f} s (token {first.token} -> {second.token})")
    except BaseException:
        print(fleet.logs())
        raise
