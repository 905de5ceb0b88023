"""A test app with beat on the leader: one schedule entry, every send and every run recorded.

Workers under test run ``celery -A tests.apps.beat_app worker``.  Each send of
the entry is recorded by the process that published it (``rec:sent``: the
beat thread in the leader's main process), each run by the task
(``rec:ran``), so the test can count sends across failovers even when a
killed worker loses the message it was running.  No ``beat_scheduler``: RedBeat,
the default.
"""

from __future__ import annotations

import os
from typing import Any

from celery import Celery

from celery_stoker import StokerStep
from celery_stoker.contrib.beat import install
from tests.apps.beat_records import Records

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
if os.environ.get("STOKER_TEST_BEAT_SCHEDULER"):  # tests/test_beat_schedulers.py
    app.conf.beat_scheduler = os.environ["STOKER_TEST_BEAT_SCHEDULER"]
app.steps["worker"].add(StokerStep)
install(app)

records = Records(BROKER)
records.record_sends(lambda name: name == TASK)


@app.task(name=TASK, bind=True)
def tick(self: Any) -> None:
    records.record("ran", id=self.request.id, host=self.request.hostname)
