"""Recycled pools: a Stoker on a timer and a task of the user's own, on one worker.

``bench/pools.py`` runs this app with and without pool-process recycling
(``--max-tasks-per-child 1``, or ``worker_max_memory_per_child`` set so low
that every process is replaced after its first task) and with and without
the plugin, and reads what it recorded:

* ``pools:events``: every callback of the Stoker ``pools`` (event, when it
  started, the worker's node, the pool process, the term's token);
* ``pools:work``: every run of the task ``pools.work`` (when it ended).

Environment: ``BENCH_BROKER`` (broker and Stoker Redis), ``BENCH_TIMER``
(seconds between timer events, default 0.5), ``BENCH_TTL`` (lease TTL,
default 2 s), ``BENCH_NO_STOKER`` (a worker of the same app without the
plugin), ``BENCH_MAX_MEMORY_KB`` (``worker_max_memory_per_child``).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import redis
from celery import Celery

from celery_stoker import Stoker, StokerStep, stoker

BROKER = os.environ.get("BENCH_BROKER", "redis://127.0.0.1:6379/0")
TIMER = float(os.environ.get("BENCH_TIMER", "0.5"))

app = Celery("poolsbench", broker=BROKER)
app.conf.update(
    stoker_lease_ttl=float(os.environ.get("BENCH_TTL", "2")),
    worker_hijack_root_logger=False,
    broker_connection_retry_on_startup=True,
    worker_prefetch_multiplier=1,
)
if os.environ.get("BENCH_MAX_MEMORY_KB"):
    app.conf.worker_max_memory_per_child = int(os.environ["BENCH_MAX_MEMORY_KB"])

_clients: dict[int, redis.Redis] = {}


def _client() -> redis.Redis:
    """One client per process (a prefork child must not share its parent's socket)."""
    client = _clients.get(os.getpid())
    if client is None:
        client = _clients[os.getpid()] = redis.Redis.from_url(BROKER)
    return client


@app.task(name="pools.work")
def work(seconds: float) -> None:
    """The user's own task: busy for ``seconds``, then noted."""
    time.sleep(seconds)
    _client().rpush("pools:work", json.dumps({"at": time.time(), "pid": os.getpid()}))


if not os.environ.get("BENCH_NO_STOKER"):
    app.steps["worker"].add(StokerStep)

    @stoker(app, name="pools")
    class Ticker(Stoker):
        """Notes each event's start; asks for the next timer after ``BENCH_TIMER``."""

        def init(self) -> dict[str, int]:
            return {"n": 0}

        def event(self, state: dict[str, int], event: str, reason: Any) -> dict[str, int]:
            fields = {
                "event": event,
                "at": time.time(),
                "host": self.context.hostname,
                "pid": os.getpid(),
                "token": self.context.token,
            }
            _client().rpush("pools:events", json.dumps(fields))
            return {"n": state["n"] + 1}

        def next_timer_in(self, state: dict[str, int]) -> float:
            return TIMER
