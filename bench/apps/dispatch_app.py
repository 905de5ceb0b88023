"""Dispatch latency: a Stoker on a short timer that records when each event starts.

The leader's activator raises each event by publishing the task
``celery_stoker.dispatch`` to its own queue.  A ``before_task_publish``
handler in the worker's main process notes that moment for every dispatch
message (keyed by the event's sequence number, the task's third argument) and
``after_task_publish`` appends it to ``disp:pub`` -- after the publish, so
recording never delays the message.  The callback notes its own start time
with the same sequence number (from the running task's arguments) in
``disp:start``.  The dispatch latency of an event is start - publish.

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
import threading
import time
from typing import Any

import redis
from celery import Celery, current_task
from celery.signals import after_task_publish, before_task_publish

from celery_stoker import Stoker, StokerStep, stoker

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
_published = threading.local()


def _client() -> redis.Redis:
    """One client per process (a prefork child must not share its parent's socket)."""
    client = _clients.get(os.getpid())
    if client is None:
        client = _clients[os.getpid()] = redis.Redis.from_url(RECORD_URL)
    return client


def _seq_of(body: Any) -> int | None:
    try:
        args = body[0] if isinstance(body, (list, tuple)) else body["args"]
        return int(args[2])
    except (LookupError, TypeError, ValueError):
        return None


@before_task_publish.connect
def _note_publish(sender: Any = None, body: Any = None, **kwargs: Any) -> None:
    if sender == DISPATCH_TASK:
        _published.item = (_seq_of(body), time.time())


@after_task_publish.connect
def _record_publish(sender: Any = None, **kwargs: Any) -> None:
    item = getattr(_published, "item", None)
    if sender == DISPATCH_TASK and item is not None and item[0] is not None:
        _published.item = None
        _client().rpush("disp:pub", json.dumps({"seq": item[0], "at": item[1]}))


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
