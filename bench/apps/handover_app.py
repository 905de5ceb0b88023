"""Handover bench: Stokers that record every phase of a clean failover.

Two Stokers: ``handover`` has no timer (only its term's events: the failover
is measured on it, as on any Stoker with nothing in flight), ``ticker`` runs a
timer every ``BENCH_TIMER`` seconds (the steady-state events of the same run,
and a failover with an event possibly in flight).  Every record carries the
Stoker's name.

What it records (lists in ``BENCH_RECORD_URL``, one JSON object per line):

* ``ho:hook``: the in-process hooks ``leader_started`` / ``leader_stopping``
  (main process, on the Stoker's election thread);
* ``ho:shutdown``: ``shutdown`` starting and ending (main process: the
  stepping-down leader delivers it itself, before it releases the lease);
* ``ho:pub``: every event as the pump hands it over (``EventDelivery.send``,
  main process: the event is *sent*), keyed by task id, with its event and token;
* ``ho:recv``: Celery's ``task_received`` in the main process (the worker got
  the message and hands it to the pool);
* ``ho:start``: the callback starting in the pool, keyed by task id, with the
  moment Celery's ``task_prerun`` ran there (before any code of the package).

The main process never writes to Redis on the measured path: its records go
to a queue that a thread of this app flushes (a pool process writes its own
record after taking its start time).  Environment: ``BENCH_BROKER``,
``BENCH_STOKER_URL`` (``stoker_url``; defaults to the broker), ``BENCH_RECORD_URL``,
``BENCH_TTL`` (lease TTL), ``BENCH_TIMER`` (seconds between the ticker's
timer events, 0 for no ticker).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import queue
import threading
import time
from typing import Any

import redis
from celery import Celery, current_task
from celery.signals import task_prerun, task_received

from celery_stoker import Stoker, StokerStep, stoker
from celery_stoker.delivery import EventDelivery

BROKER = os.environ.get("BENCH_BROKER", "redis://127.0.0.1:6379/0")
RECORD_URL = os.environ.get("BENCH_RECORD_URL") or BROKER
TIMER = float(os.environ.get("BENCH_TIMER", "0.2"))
DISPATCH_TASK = "celery_stoker.dispatch"
NAME = "handover"
TICKER = "ticker"

app = Celery("handoverbench", broker=BROKER)
app.conf.update(
    stoker_url=os.environ.get("BENCH_STOKER_URL") or None,
    stoker_lease_ttl=float(os.environ.get("BENCH_TTL", "2")),
    worker_hijack_root_logger=False,
    broker_connection_retry_on_startup=True,
    worker_prefetch_multiplier=1,
)
app.steps["worker"].add(StokerStep)

_clients: dict[int, redis.Redis] = {}
_outbox: queue.SimpleQueue[tuple[str, dict[str, Any]]] = queue.SimpleQueue()
_flusher: threading.Thread | None = None
_flusher_lock = threading.Lock()


def _client() -> redis.Redis:
    """One client per process (a prefork child must not share its parent's socket)."""
    client = _clients.get(os.getpid())
    if client is None:
        client = _clients[os.getpid()] = redis.Redis.from_url(RECORD_URL)
    return client


def _flush_forever() -> None:
    while True:
        key, fields = _outbox.get()
        with contextlib.suppress(redis.RedisError):
            _client().rpush(key, json.dumps(fields, default=str))


@atexit.register
def _drain() -> None:
    """A stopping worker writes what its thread had not yet written."""
    while True:
        try:
            key, fields = _outbox.get_nowait()
        except queue.Empty:
            return
        try:
            _client().rpush(key, json.dumps(fields, default=str))
        except redis.RedisError:
            return


def note(kind: str, **fields: Any) -> None:
    """Record off the measured path: a background thread writes it."""
    global _flusher
    fields.setdefault("at", time.time())
    fields.setdefault("pid", os.getpid())
    if _flusher is None or not _flusher.is_alive():
        with _flusher_lock:
            if _flusher is None or not _flusher.is_alive():
                _flusher = threading.Thread(target=_flush_forever, name="bench-rec", daemon=True)
                _flusher.start()
    _outbox.put((f"ho:{kind}", fields))


def _record_sends() -> None:
    """Note every event as the pump hands it to the worker's pool (``EventDelivery.send``)."""
    original = EventDelivery.send

    def send(self: EventDelivery, task_id: str, args: list[Any], **kw: Any) -> None:
        note(
            "pub", at=time.time(), id=task_id, stoker=args[0], token=args[1], event=args[3],
            node=args[6],
        )  # fmt: skip
        original(self, task_id, args, **kw)

    EventDelivery.send = send  # type: ignore[method-assign]
    on_loop = EventDelivery._on_loop

    def _on_loop(self: EventDelivery, message: Any, event: Any) -> None:
        note("loop", at=time.time(), id=event.task_id)
        on_loop(self, message, event)

    EventDelivery._on_loop = _on_loop  # type: ignore[method-assign]


_record_sends()


@task_received.connect
def _on_received(sender: Any = None, request: Any = None, **kw: Any) -> None:
    if getattr(request, "name", None) != DISPATCH_TASK:
        return
    note("recv", at=time.time(), id=getattr(request, "id", None))


_prerun_at: dict[str, float] = {}


@task_prerun.connect
def _on_prerun(task_id: str | None = None, sender: Any = None, **kw: Any) -> None:
    """In the pool process: Celery is about to run the task (before any code of ours)."""
    if getattr(sender, "name", None) == DISPATCH_TASK and task_id:
        _prerun_at.clear()
        _prerun_at[task_id] = time.time()


class Handover(Stoker):
    """Records its callbacks' starts, its shutdown and its hooks; no timer."""

    timer: float | None = None

    def init(self) -> dict[str, int]:
        return {"n": 0}

    def event(self, state: dict[str, int], event: str, reason: Any) -> dict[str, int]:
        started = time.time()
        ctx = self.context
        if event == "shutdown":
            note("shutdown", phase="start", at=started, stoker=ctx.name, token=ctx.token)
            note("shutdown", phase="end", stoker=ctx.name, node=ctx.hostname, token=ctx.token)
            return {"n": state["n"] + 1}
        request = getattr(current_task, "request", None)
        _client().rpush(
            "ho:start",
            json.dumps(
                {
                    "id": getattr(request, "id", None),
                    "at": started,
                    "prerun": _prerun_at.get(getattr(request, "id", None) or ""),
                    "event": event,
                    "stoker": ctx.name,
                    "token": ctx.token,
                    "node": ctx.hostname,
                    "pid": os.getpid(),
                }
            ),
        )
        return {"n": state["n"] + 1}

    def next_timer_in(self, state: dict[str, int]) -> float | None:
        return self.timer

    def leader_started(self) -> None:
        ctx = self.context
        note("hook", hook="started", stoker=ctx.name, node=ctx.hostname, token=ctx.token)

    def leader_stopping(self, reason: str) -> None:
        ctx = self.context
        note(
            "hook",
            hook="stopping",
            stoker=ctx.name,
            node=ctx.hostname,
            token=ctx.token,
            reason=reason,
        )


stoker(app, name=NAME)(Handover)
if TIMER:
    stoker(app, name=TICKER)(type("Ticker", (Handover,), {"timer": TIMER}))
