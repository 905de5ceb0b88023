"""Recovery bench: a Stoker whose timer callback, when asked, loses its pool process.

Each timer event records its start (``rec:start``).  When the key ``rec:fault``
holds ``exit``, the next timer callback deletes it, records ``rec:lost`` and
calls ``os._exit(9)`` (a crash inside the callback); when it holds ``hang``,
the callback records its pid in ``rec:lost`` and sleeps, for the bench to
SIGKILL it from outside (the OOM killer's way).

Environment: ``BENCH_BROKER`` (broker and Stoker Redis), ``BENCH_TIMER``
(seconds between timer events, default 0.1), ``BENCH_TTL`` (default 2 s).
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
TIMER = float(os.environ.get("BENCH_TIMER", "0.1"))

app = Celery("recoverybench", broker=BROKER)
app.conf.update(
    stoker_lease_ttl=float(os.environ.get("BENCH_TTL", "2")),
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


@stoker(app, name="recovery")
class Fragile(Stoker):
    def init(self) -> dict[str, int]:
        return {"n": 0}

    def event(self, state: dict[str, int], event: str, reason: Any) -> dict[str, int]:
        client = _client()
        started = time.time()
        if event == "timer":
            client.rpush("rec:start", json.dumps({"at": started}))
            fault = client.getdel("rec:fault")
            if fault is not None:
                client.rpush("rec:lost", json.dumps({"at": time.time(), "pid": os.getpid()}))
                if fault == b"exit":
                    os._exit(9)
                time.sleep(60)
        return {"n": state["n"] + 1}

    def next_timer_in(self, state: dict[str, int]) -> float:
        return TIMER
