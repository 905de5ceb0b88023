"""A worker with ``BENCH_STOKERS`` idle Stokers, to count its connections and threads.

Environment: ``BENCH_BROKER``, ``BENCH_STOKER_URL`` (``stoker_url``, a Redis of
its own so that every client on it is celery-stoker's), ``BENCH_STOKERS``
(how many), ``BENCH_TTL`` (lease TTL, default 2 s).
"""

from __future__ import annotations

import os
from typing import Any

from celery import Celery

from celery_stoker import Stoker, StokerStep, stoker

BROKER = os.environ.get("BENCH_BROKER", "redis://127.0.0.1:6379/0")
COUNT = int(os.environ.get("BENCH_STOKERS", "1"))

app = Celery("manybench", broker=BROKER)
app.conf.update(
    stoker_url=os.environ.get("BENCH_STOKER_URL") or None,
    stoker_lease_ttl=float(os.environ.get("BENCH_TTL", "2")),
    worker_hijack_root_logger=False,
    broker_connection_retry_on_startup=True,
)
app.steps["worker"].add(StokerStep)


class Idle(Stoker):
    """Nothing to do: no timer, the state left as it is."""

    def init(self) -> dict[str, Any]:
        return {}

    def event(self, state: dict[str, Any], event: str, reason: Any) -> dict[str, Any]:
        return state

    def next_timer_in(self, state: dict[str, Any]) -> None:
        return None


for _i in range(COUNT):
    stoker(app, name=f"many-{_i}")(type(f"Idle{_i}", (Idle,), {}))
