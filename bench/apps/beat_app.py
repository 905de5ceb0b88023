"""The peer: a RedBeat-scheduled app whose ``celery beat`` records every task it sends.

Two ``celery -A bench.apps.beat_app beat -S redbeat.RedBeatScheduler``
processes compete for RedBeat's lock, the usual way to run a singleton
scheduler today.  The beat sends ``beatbench.tick`` every
``BENCH_BEAT_PERIOD`` seconds; a ``before_task_publish`` handler notes the
send time in the beat process itself and ``after_task_publish`` appends it to
the Redis list ``beat:sent`` (after the publish, so recording never delays the
send).  No worker is needed: the failover gap is the time between the last
send of the old beat and the first send of the new one.

Environment:

* ``BENCH_BROKER``: broker URL (may go through a TCP proxy, to partition).
* ``BENCH_REDBEAT_URL``: ``redbeat_redis_url`` (same; defaults to the broker).
* ``BENCH_RECORD_URL``: where sends are recorded (direct, so records of a
  partitioned beat still arrive).
* ``BENCH_BEAT_MAX_LOOP``: ``beat_max_loop_interval``; empty for RedBeat's
  defaults (300 s loop, so a 25 min lock).
* ``BENCH_BEAT_PERIOD``: seconds between ticks (default 0.5).
"""

from __future__ import annotations

import json
import os
import threading
import time
from typing import Any

import redis
from celery import Celery
from celery.signals import after_task_publish, before_task_publish

BROKER = os.environ.get("BENCH_BROKER", "redis://127.0.0.1:6379/0")
REDBEAT_URL = os.environ.get("BENCH_REDBEAT_URL") or BROKER
RECORD_URL = os.environ.get("BENCH_RECORD_URL") or BROKER
PERIOD = float(os.environ.get("BENCH_BEAT_PERIOD", "0.5"))
MAX_LOOP = os.environ.get("BENCH_BEAT_MAX_LOOP", "")

app = Celery("beatbench", broker=BROKER)
app.conf.update(
    redbeat_redis_url=REDBEAT_URL,
    beat_schedule={"tick": {"task": "beatbench.tick", "schedule": PERIOD}},
    broker_connection_retry_on_startup=True,
)
if MAX_LOOP:
    app.conf.beat_max_loop_interval = float(MAX_LOOP)

_pending = threading.local()
_client: redis.Redis | None = None


@app.task(name="beatbench.tick", ignore_result=True)
def tick() -> None:
    """The periodic task; only its sending is measured."""


@before_task_publish.connect
def _note_send(sender: Any = None, **kwargs: Any) -> None:
    _pending.at = time.time()


@after_task_publish.connect
def _record_send(sender: Any = None, **kwargs: Any) -> None:
    global _client
    at = getattr(_pending, "at", None)
    if sender != "beatbench.tick" or at is None:
        return
    if _client is None:
        _client = redis.Redis.from_url(RECORD_URL)
    _client.rpush("beat:sent", json.dumps({"pid": os.getpid(), "at": at}))
