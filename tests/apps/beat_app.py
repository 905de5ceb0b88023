"""A test app with beat on the leader: one schedule entry, every send and every run recorded.

Workers under test run ``celery -A tests.apps.beat_app worker``.  Each send of
the entry is recorded by the process that published it (``rec:sent``: the
beat thread in the leader's main process), each run by the task
(``rec:ran``), so the test can count sends across failovers even when a
killed worker loses the message it was running.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import redis
from celery import Celery
from celery.signals import after_task_publish, celeryd_after_setup

from celery_stoker import StokerStep
from celery_stoker.contrib.beat import install

BROKER = os.environ.get("STOKER_TEST_BROKER", "redis://127.0.0.1:6379/15")
PERIOD = float(os.environ.get("STOKER_TEST_BEAT_PERIOD", "0.5"))
TASK = "beat_app.tick"

app = Celery("beat_app", broker=BROKER)
app.conf.update(
    stoker_lease_ttl=float(os.environ.get("STOKER_TEST_TTL", "1.5")),
    worker_hijack_root_logger=False,
    broker_connection_retry_on_startup=True,
    worker_prefetch_multiplier=1,
    beat_schedule={"tick": {"task": TASK, "schedule": PERIOD}},
)
app.steps["worker"].add(StokerStep)
install(app)

_client: redis.Redis | None = None
_client_pid = 0
_hostname = ""


def record(kind: str, **fields: Any) -> None:
    """Append one line to ``rec:<kind>``."""
    global _client, _client_pid
    if _client is None or _client_pid != os.getpid():
        _client = redis.Redis.from_url(BROKER)
        _client_pid = os.getpid()
    fields.setdefault("at", time.time())
    fields.setdefault("pid", os.getpid())
    _client.rpush(f"rec:{kind}", json.dumps(fields))


@celeryd_after_setup.connect
def _remember_hostname(sender: str, **kwargs: Any) -> None:
    global _hostname
    _hostname = sender


@after_task_publish.connect
def _record_send(sender: str | None = None, headers: Any = None, **kwargs: Any) -> None:
    if sender == TASK:
        record("sent", id=(headers or {}).get("id"), host=_hostname)


@app.task(name=TASK, bind=True)
def tick(self: Any) -> None:
    record("ran", id=self.request.id, host=self.request.hostname)
