"""What a process pays before its first event: warm-ups of the pool and main processes.

A pool process is forked when the worker starts and, on a follower, runs
nothing until a failover.  Its first event then paid for code no call had run
yet, the term check and the state read, at the very moment of the failover.
The warm-up runs them once per Redis when the process starts: reads only, for
a token no term has.  Real Redis here; Redis's own command counters say what
was sent.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import redis
from celery import Celery
from support.redis_stats import command_calls

from celery_stoker import Stoker, stoker
from celery_stoker.delivery import WARM_UP_TASK_ID, EventDelivery
from celery_stoker.dispatch import warm_process
from celery_stoker.keys import reports_key, state_key
from celery_stoker.lease import RedisLease
from celery_stoker.reports import ReportReader
from celery_stoker.testing import RedisServer, wait_for


class _Kept(Stoker):
    def init(self) -> dict[str, int]:
        return {"n": 0}

    def event(self, state: Any, event: str, reason: Any) -> Any:
        return state


def test_the_warm_up_runs_the_term_check_once_per_redis_and_writes_nothing(
    redis_server: RedisServer,
) -> None:
    app = Celery("warm", set_as_current=False)
    app.conf.stoker_url = redis_server.url
    for name in ("alpha", "beta", "gamma"):
        stoker(app, name=name)(type(name.title(), (_Kept,), {}))
    client = redis_server.client()
    # A term and a state of one Stoker, which the warm-up must read and leave alone.
    term = RedisLease(client, "alpha", holder_id="h", hostname="w1", ttl=60.0).acquire().term
    assert term is not None
    client.hset(
        state_key("stoker", "alpha"),
        mapping={"body": b'{"n": 3}', "content_type": "application/json", "version": 4},
    )
    before = {key: client.dump(key) for key in client.keys("*")}
    client.config_resetstat()

    warm_process(app)

    # One Redis for three Stokers: the script once, one term check (two GETs and the
    # state in one round trip), and no write.
    assert command_calls(client) == {"script|load": 1, "get": 2, "hgetall": 1}
    assert {key: client.dump(key) for key in client.keys("*")} == before


def test_building_the_warm_up_message_sends_nothing(redis_server: RedisServer) -> None:
    """The delivery's warm-up builds a task message and drops it: no queue, no loop."""
    app = Celery("warm-delivery", broker=redis_server.url, set_as_current=False)
    broker = redis_server.client()
    broker.config_resetstat()
    delivery = EventDelivery(app, None, "stoker.w1")  # no worker: a send would publish

    delivery.warm_up()

    assert not delivery.withdraw(WARM_UP_TASK_ID)  # never handed to a loop
    assert command_calls(broker) == {}
    assert broker.keys("*") == []


def test_the_report_reader_connects_at_start_and_sends_nothing_while_idle(
    redis_server: RedisServer,
) -> None:
    """A follower's reader is connected before its first term, and idle it asks nothing."""
    server = redis_server.client()
    clients_before = len(server.client_list())
    server.config_resetstat()
    busy = threading.Event()  # never set: no event in flight
    reader = ReportReader(
        lambda: redis.Redis.from_url(redis_server.url),
        [reports_key("stoker", "w1")],
        lambda outcome: None,
        busy,
    )
    reader.start()
    try:
        wait_for(
            lambda: len(server.client_list()) > clients_before, 10, what="the reader's connection"
        )
        # Nothing to read, so nothing asked: not one BLPOP (a window, not a timing claim).
        time.sleep(ReportReader.BLOCK * 1.5)
        assert "blpop" not in command_calls(server)
    finally:
        reader.stop()
        reader.join(ReportReader.BLOCK + 2)
