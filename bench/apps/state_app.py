"""State bytes: a Stoker whose state is ``BENCH_STATE_BYTES`` bytes, on a short timer.

The Stoker's Redis (``BENCH_STOKER_URL``) is not the broker's (``BENCH_BROKER``),
so the bench reads what one event costs in Redis traffic from the Stoker
Redis's own counters, with no broker traffic mixed in.  Each event appends one
line to ``state:events`` in the broker's Redis (the records are not counted).

Environment: ``BENCH_BROKER``, ``BENCH_STOKER_URL``, ``BENCH_STATE_BYTES``
(default 1024), ``BENCH_TIMER`` (seconds between timer events, default 0.2).
"""

from __future__ import annotations

import os
from typing import Any

import redis
from celery import Celery

from celery_stoker import Stoker, StokerStep, stoker

BROKER = os.environ.get("BENCH_BROKER", "redis://127.0.0.1:6379/0")
SIZE = int(os.environ.get("BENCH_STATE_BYTES", "1024"))
TIMER = float(os.environ.get("BENCH_TIMER", "0.2"))

app = Celery("statebench", broker=BROKER)
app.conf.update(
    stoker_url=os.environ["BENCH_STOKER_URL"],
    stoker_lease_ttl=2.0,
    worker_hijack_root_logger=False,
    broker_connection_retry_on_startup=True,
    worker_prefetch_multiplier=1,
)
app.steps["worker"].add(StokerStep)

_clients: dict[int, redis.Redis] = {}


def _client() -> redis.Redis:
    client = _clients.get(os.getpid())
    if client is None:
        client = _clients[os.getpid()] = redis.Redis.from_url(BROKER)
    return client


@stoker(app, name="state")
class Heavy(Stoker):
    """Keeps a blob of ``SIZE`` bytes (as JSON text) and counts its events."""

    def init(self) -> dict[str, Any]:
        return {"n": 0, "blob": "x" * SIZE}

    def event(self, state: dict[str, Any], event: str, reason: Any) -> dict[str, Any]:
        _client().rpush("state:events", event)
        return {"n": state["n"] + 1, "blob": state["blob"]}

    def next_timer_in(self, state: dict[str, Any]) -> float:
        return TIMER
