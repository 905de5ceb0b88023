"""Ordinary tasks: any worker runs them.  ``purge_expired_reports`` is sent by beat."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import redis

from .app import BROKER_URL, app

#: Finished reports: a sorted set of report ids scored by completion time.
REPORTS_KEY = "example:reports"
LAST_PURGE_KEY = "example:last-purge"
#: Reports older than this are purged.
KEEP_FOR = 3600.0


def client() -> redis.Redis:
    return redis.Redis.from_url(BROKER_URL, socket_timeout=5)


@app.task(name="example_project.tasks.build_report")
def build_report(customer: str) -> str:
    """Some real work (routed to the ``reports`` queue, whose backlog the leader watches)."""
    time.sleep(0.2)
    report_id = f"{customer}-{uuid.uuid4().hex[:8]}"
    client().zadd(REPORTS_KEY, {report_id: time.time()})
    return report_id


@app.task(name="example_project.tasks.purge_expired_reports", bind=True)
def purge_expired_reports(self: Any) -> int:
    """Periodic: drop reports older than an hour.  Sent by beat on the leader, run anywhere."""
    r = client()
    removed = int(r.zremrangebyscore(REPORTS_KEY, 0, time.time() - KEEP_FOR))
    r.set(
        LAST_PURGE_KEY,
        json.dumps({"at": time.time(), "removed": removed, "ran_on": self.request.hostname}),
    )
    return removed
