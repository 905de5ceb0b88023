"""Dispatch latency: a Stoker on a short timer that records when each event starts.

The leader's pump raises each event by handing the task
``celery_stoker.dispatch`` to the worker's own consumer (``EventDelivery.send``).
A wrapper of that call in the worker's main process notes the moment for every
event (keyed by its sequence number, the task's third argument) and appends it
to ``disp:pub`` after the hand-over, so recording never delays the event.
The callback notes its own start time with the same sequence number (from the
running task's arguments) in ``disp:start``.  The dispatch latency of an event is start - publish.

It also records when ``next_timer_in`` returned (``end``), so the bench can
show the whole loop: end of event n -> report -> timer -> publish of n+1.
Each record is pushed at the *next* callback's start, after its start time
was taken, so no measured interval contains a Redis write of ours.

Environment: ``BENCH_BROKER`` (broker and Stoker Redis), ``BENCH_RECORD_URL``,
``BENCH_TIMER`` (seconds between timer events, default 0.05), ``BENCH_TTL``
(lease TTL, default 2 s).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import redis
from celery import Celery, current_task

from celery_stoker import Stoker, StokerStep, stoker
from celery_stoker.delivery import EventDelivery

BROKER = os.environ.get("BENCH_BROKER", "redis://127.0.0.1:6379/0")
RECORD_URL = os.environ.get("BENCH_RECORD_URL") or BROKER
TIMER = float(os.environ.get("BENCH_TIMER", "0.05"))
DISPATCH_TASK = "celery_stoker.dispatch"

app = Celery("dispatchbench", broker=BROKER)
app.conf.update(
    # Short, so that the first term on the bench's fresh Redis (which waits out one
    # TTL before acting) starts soon; the TTL plays no part in dispatch itself.
    stoker_lease_ttl=float(os.environ.get("BENCH_TTL", "2")),
    worker_hijack_root_logger=False,
    broker_connection_retry_on_startup=True,
    worker_prefetch_multiplier=1,
)
app.steps["worker"].add(StokerStep)

_clients: dict[int, redis.Redis] = {}


def _client() -> redis.Redis:
    """One client per process (a prefork child must not share its parent's socket)."""
    client = _clients.get(os.getpid())
    if client is None:
        client = _clients[os.getpid()] = redis.Redis.from_url(RECORD_URL)
    return client


def _record_sends() -> None:
    """Note when the pump hands each event over (``EventDelivery.send``), written after."""
    original = EventDelivery.send

    def send(self: EventDelivery, task_id: str, args: list[Any], **kw: Any) -> None:
        at = time.time()
        original(self, task_id, args, **kw)
        _client().rpush("disp:pub", json.dumps({"seq": int(args[2]), "at": at}))

    EventDelivery.send = send  # type: ignore[method-assign]


_record_sends()


def _current_seq() -> int | None:
    request = getattr(current_task, "request", None)
    args = getattr(request, "args", None)
    try:
        return int(args[2]) if args else None
    except (LookupError, TypeError, ValueError):
        return None


@stoker(app, name="dispatch")
class Ticker(Stoker):
    """Does nothing but note when it starts and when it asks for the next timer."""

    _last_end: tuple[int | None, float] | None = None

    def init(self) -> dict[str, int]:
        return {"n": 0}

    def event(self, state: dict[str, int], event: str, reason: Any) -> dict[str, int]:
        started = time.time()
        fields: dict[str, Any] = {
            "seq": _current_seq(),
            "at": started,
            "event": event,
            "pid": os.getpid(),
        }
        if self._last_end is not None:
            fields["prev_seq"], fields["prev_end"] = self._last_end
        _client().rpush("disp:start", json.dumps(fields))
        return {"n": state["n"] + 1}

    def next_timer_in(self, state: dict[str, int]) -> float:
        self._last_end = (_current_seq(), time.time())
        return TIMER
