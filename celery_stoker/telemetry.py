"""Celery events for every election, step-down, handoff and drain.

Flower and ``celery events`` show worker events; these add ``stoker-elected``,
``stoker-stepped-down`` (with the reason: worker_stopping, lease_lost,
handoff, drain), ``stoker-suspended`` and ``stoker-resumed``.  Sending goes
through one named thread with a queue, so an activator never waits on the
broker: if the broker is down, the events are dropped (logged once).
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from celery import Celery

logger = logging.getLogger("celery_stoker.telemetry")

#: Events waiting beyond this are dropped: they describe the past anyway.
QUEUE_LIMIT = 1000


class EventEmitter:
    """Sends ``stoker-*`` Celery events from its own thread."""

    def __init__(self, app: Celery, hostname: str) -> None:
        self.app = app
        self.hostname = hostname
        self._queue: queue.Queue[tuple[str, dict[str, Any]] | None] = queue.Queue(QUEUE_LIMIT)
        self._thread: threading.Thread | None = None
        self._failing = False

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="stoker-celery-events", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        """Send what is queued (briefly), then stop."""
        if self._thread is None:
            return
        with contextlib.suppress(queue.Full):
            self._queue.put(None, timeout=timeout)
        self._thread.join(timeout)
        self._thread = None

    def emit(self, type_: str, **fields: Any) -> None:
        """Queue one event; never blocks."""
        with contextlib.suppress(queue.Full):
            self._queue.put_nowait((type_, fields))

    def _run(self) -> None:
        dispatcher = None
        connection = None
        while True:
            item = self._queue.get()
            if item is None:
                break
            type_, fields = item
            try:
                if dispatcher is None:
                    connection = self.app.connection_for_write()
                    dispatcher = self.app.events.Dispatcher(
                        connection, hostname=self.hostname, enabled=True
                    )
                dispatcher.send(type_, **fields)
                if self._failing:
                    logger.info("celery-stoker: sending %s events again", "stoker-*")
                self._failing = False
            except Exception as exc:
                if not self._failing:
                    logger.warning(
                        "celery-stoker: could not send the %s event (%s); dropping events "
                        "until the broker answers",
                        type_,
                        exc.__class__.__name__,
                    )
                self._failing = True
                dispatcher = None
                if connection is not None:
                    with contextlib.suppress(Exception):
                        connection.release()
                    connection = None
        if dispatcher is not None:
            try:
                dispatcher.close()
                if connection is not None:
                    connection.release()
            except Exception:
                pass
