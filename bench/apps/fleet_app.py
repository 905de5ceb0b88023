"""``BENCH_STOKERS`` Stokers on a ``BENCH_TIMER`` s timer (0: none), for ``bench/fleet.py``.

Environment: ``BENCH_BROKER``, ``BENCH_STOKER_URL`` (``stoker_url``: a Redis of its
own, so every command on it is celery-stoker's), ``BENCH_STOKERS``, ``BENCH_TIMER``,
``BENCH_TTL`` (lease TTL, default 10 s, the package's), ``BENCH_BALANCE`` (``0``:
``stoker_balance = False``, first come; for ``bench/balance.py``).
"""

from __future__ import annotations

import os
from typing import Any

from celery import Celery

from celery_stoker import Stoker, StokerStep, stoker

BROKER = os.environ.get("BENCH_BROKER", "redis://127.0.0.1:6379/0")
COUNT = int(os.environ.get("BENCH_STOKERS", "1"))
TIMER = float(os.environ.get("BENCH_TIMER", "0"))

app = Celery("fleetbench", broker=BROKER)
app.conf.update(
    stoker_url=os.environ.get("BENCH_STOKER_URL") or None,
    stoker_lease_ttl=float(os.environ.get("BENCH_TTL", "10")),
    worker_hijack_root_logger=False,
    broker_connection_retry_on_startup=True,
    stoker_balance=os.environ.get("BENCH_BALANCE", "1") != "0",
)
app.steps["worker"].add(StokerStep)


class Ticker(Stoker):
    """Counts its timer events in its state (one commit per event)."""

    def init(self) -> dict[str, Any]:
        return {"n": 0}

    def event(self, state: dict[str, Any], event: str, reason: Any) -> dict[str, Any]:
        return {"n": state.get("n", 0) + (event == "timer")}

    def next_timer_in(self, state: dict[str, Any]) -> float | None:
        return TIMER or None


for _i in range(COUNT):
    stoker(app, name=f"fleet-{_i}")(type(f"Ticker{_i}", (Ticker,), {}))
