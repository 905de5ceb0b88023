"""Events reach the pool straight from the worker's own event loop, or through the broker.

A worker whose consumer runs an event loop (prefork, solo, threads) hands each
event to it in-process: no publish, no broker round trip.  The gevent and
eventlet pools have no such loop, and their events go through the broker to
the worker's own queue.  The broker's Redis counts the task messages pushed to
it (``LPUSH``; records and reports go elsewhere or use other commands).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from support.redis_stats import command_calls
from support.workers import Fleet, Records

from celery_stoker.testing import RedisServer, wait_for

pytestmark = pytest.mark.workers


def _task_messages_pushed(broker: RedisServer) -> int:
    return command_calls(broker.client()).get("lpush", 0)


@pytest.mark.parametrize(("pool", "local"), [("prefork", True), ("gevent", False)])
def test_events_skip_the_broker_where_the_worker_has_an_event_loop(
    fleets: Callable[..., Fleet],
    make_redis_server: Callable[..., RedisServer],
    redis_server: RedisServer,
    records: Records,
    pool: str,
    local: bool,
) -> None:
    stoker = make_redis_server()
    fleet = fleets(pool, STOKER_TEST_URL=stoker.url_for(0), STOKER_TEST_TIMER="0.1")
    w1 = fleet.start("w1@%h")
    wait_for(lambda: len(records.of("timer")) >= 2, 30, what="w1 leads and its timer runs")
    before, timers = _task_messages_pushed(redis_server), len(records.of("timer"))
    wait_for(lambda: len(records.of("timer")) >= timers + 5, 10, what="five more timer events")
    pushed = _task_messages_pushed(redis_server) - before
    log = w1.log()
    if local:
        assert pushed == 0, f"{pushed} event messages went through the broker"
        assert "events go straight to this worker's consumer" in log
    else:
        assert pushed >= 5, "the gevent pool's events did not go through the broker"
        assert f"events go through the broker to queue stoker.{w1.node}" in log
