"""An idle worker, with or without ``StokerStep`` and three Stokers, for overhead and cost.

The same module serves both variants so that the only difference between the
two workers is celery-stoker: ``BENCH_WITH_STOKER=1`` adds the step and
registers three Stokers that never set a timer (idle: once elected, the leader
only renews its leases).

Environment: ``BENCH_BROKER`` (the broker), ``BENCH_STOKER_URL`` (a separate
Redis for ``stoker_url``, so MONITOR on it sees only celery-stoker's commands),
``BENCH_WITH_STOKER`` (``1`` or ``0``).
"""

from __future__ import annotations

import os
from typing import Any

from celery import Celery

from celery_stoker import Stoker, StokerStep, stoker

BROKER = os.environ.get("BENCH_BROKER", "redis://127.0.0.1:6379/0")
WITH_STOKER = os.environ.get("BENCH_WITH_STOKER", "1") == "1"
NAMES = ("idle-a", "idle-b", "idle-c")

app = Celery("idlebench", broker=BROKER)
app.conf.update(
    worker_hijack_root_logger=False,
    broker_connection_retry_on_startup=True,
    # One worker leads all three, the other follows all three: the roles the bench
    # measures (spread, the follower would lead one; bench/balance.py measures that).
    stoker_balance=False,
)


class Idle(Stoker):
    """A Stoker with nothing to do: no timer, state left as it is."""

    def init(self) -> dict[str, Any]:
        return {}

    def event(self, state: dict[str, Any], event: str, reason: Any) -> dict[str, Any]:
        return state

    def next_timer_in(self, state: dict[str, Any]) -> None:
        return None


if WITH_STOKER:
    app.conf.stoker_url = os.environ.get("BENCH_STOKER_URL") or None
    app.steps["worker"].add(StokerStep)
    for _name in NAMES:
        stoker(app, name=_name)(type(f"Idle_{_name.replace('-', '_')}", (Idle,), {}))
