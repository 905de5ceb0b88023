"""Two small apps on one broker, ``tenant_a`` and ``tenant_b`` (tests/test_app_scope.py).

Each registers one Stoker named ``shared`` (the same name in both apps, on
purpose) that records every event, with the members it saw, to
``rec:<app>:event`` in the record Redis.  Environment: ``STOKER_TEST_BROKER``,
``STOKER_TEST_RECORD_URL``, ``STOKER_TEST_URL``, ``STOKER_TEST_TTL`` as for the
recorder app; ``STOKER_TEST_PREFIX`` (``stoker_key_prefix``) and
``STOKER_TEST_SOCKET_TIMEOUT`` (``socket_timeout`` in ``stoker_transport_options``).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import redis
from celery import Celery

from celery_stoker import Stoker, StokerStep, stoker

BROKER = os.environ.get("STOKER_TEST_BROKER", "redis://127.0.0.1:6379/15")
RECORD_URL = os.environ.get("STOKER_TEST_RECORD_URL", BROKER)


def make_app(main: str) -> Celery:
    """The app ``main``: its settings from the environment and its ``shared`` Stoker."""
    app = Celery(main, broker=BROKER)
    app.conf.update(
        stoker_url=os.environ.get("STOKER_TEST_URL") or None,
        stoker_lease_ttl=float(os.environ.get("STOKER_TEST_TTL", "1.5")),
        stoker_key_prefix=os.environ.get("STOKER_TEST_PREFIX", "stoker"),
        worker_hijack_root_logger=False,
        broker_connection_retry_on_startup=True,
    )
    if os.environ.get("STOKER_TEST_SOCKET_TIMEOUT"):
        timeout = float(os.environ["STOKER_TEST_SOCKET_TIMEOUT"])
        app.conf.stoker_transport_options = {"socket_timeout": timeout}
    app.steps["worker"].add(StokerStep)
    client: list[redis.Redis] = []

    @stoker(app, name="shared")
    class Shared(Stoker):
        def init(self) -> dict[str, Any]:
            return {}

        def event(self, state: dict[str, Any], event: str, reason: Any) -> dict[str, Any]:
            if not client:
                client.append(redis.Redis.from_url(RECORD_URL))
            line = {
                "event": event,
                "reason": reason,
                "host": self.context.hostname,
                "token": self.context.token,
                "members": sorted(self.context.members),
                "at": time.time(),
            }
            client[0].rpush(f"rec:{main}:event", json.dumps(line))
            return state

    return app
