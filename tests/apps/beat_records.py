"""What the beat test apps share: records in Redis lists, and a record of every send.

A send is recorded by the process that published it (``rec:sent``), from
Celery's ``after_task_publish``: with beat on the leader that is the beat
thread of the leader's main process, so the tests count what the scheduler
published, whatever happened to the message afterwards.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import redis
from celery.signals import after_task_publish, celeryd_after_setup


class Records:
    """Appends JSON lines to ``rec:<kind>`` lists in one Redis (a client per process)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._client: redis.Redis | None = None
        self._pid = 0
        self.hostname = ""

    def record(self, kind: str, **fields: Any) -> None:
        if self._client is None or self._pid != os.getpid():
            self._client = redis.Redis.from_url(self.url)
            self._pid = os.getpid()
        fields.setdefault("at", time.time())
        fields.setdefault("pid", os.getpid())
        self._client.rpush(f"rec:{kind}", json.dumps(fields, default=str))

    def record_sends(self, wanted: Callable[[str], bool]) -> None:
        """Record every publish of a task ``wanted`` accepts (by name), with its beat entry."""

        def remember_hostname(sender: str, **kwargs: Any) -> None:
            self.hostname = sender

        def sent(sender: str | None = None, headers: Any = None, **kwargs: Any) -> None:
            if sender is not None and wanted(sender):
                headers = headers or {}
                self.record(
                    "sent",
                    id=headers.get("id"),
                    host=self.hostname,
                    entry=headers.get("periodic_task_name"),
                    edit=headers.get("edit"),  # a header a test's entry sets (an edit's mark)
                    thread=threading.current_thread().name,
                )

        celeryd_after_setup.connect(remember_hostname, weak=False)
        after_task_publish.connect(sent, weak=False)
