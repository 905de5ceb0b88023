"""Shared fixtures: private Redis servers and fault-injecting TCP proxies.

The logic lives in :mod:`celery_stoker.testing` (Redis and worker processes, which users'
tests share) and, for what only this suite needs, in ``tests/support`` (importable as
``support`` because pytest puts this directory on ``sys.path``); this file only wires
lifetimes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from support.tcp_proxy import TcpProxy
from support.workers import Fleet, Records

from celery_stoker.testing import RedisServer

#: The app every worker test runs, and its default lease TTL (short, to keep tests fast).
RECORDER_APP = "tests.apps.recorder"
TEST_TTL = 1.5


@pytest.fixture
def redis_server(stoker_redis: RedisServer) -> RedisServer:
    """A server owned by one test, so it may kill/restart/pause it freely (the plugin's)."""
    return stoker_redis


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    return redis_server.url


@pytest.fixture
def make_redis_server() -> Iterator[Callable[..., RedisServer]]:
    """Factory for extra servers (password, replica, valkey...), all closed at teardown."""
    servers: list[RedisServer] = []

    def make(**kwargs: Any) -> RedisServer:
        server = RedisServer(**kwargs)
        servers.append(server)
        server.start()
        return server

    yield make
    for server in servers:
        server.close()


@pytest.fixture(scope="session")
def redis_session_server() -> Iterator[RedisServer]:
    """One server for the whole run, for tests that only need *a* Redis (cheaper to start)."""
    server = RedisServer()
    server.start()
    yield server
    server.close()


@pytest.fixture
def fresh_redis_url(redis_session_server: RedisServer) -> str:
    """URL of the session server, FLUSHALLed first so tests can't see each other's keys.

    Tests using this must not kill or restart the server; if one did anyway, it is restarted
    here rather than failing every later test.
    """
    if not redis_session_server.is_running:
        redis_session_server.start()
    redis_session_server.flushall()
    return redis_session_server.url


@pytest.fixture
def tcp_proxy() -> Iterator[Callable[[int], TcpProxy]]:
    """Factory ``make_proxy(port) -> TcpProxy`` (started, loopback target); stopped at teardown."""
    proxies: list[TcpProxy] = []

    def make_proxy(port: int, host: str = "127.0.0.1") -> TcpProxy:
        proxy = TcpProxy(host, port).start()
        proxies.append(proxy)
        return proxy

    yield make_proxy
    for proxy in proxies:
        proxy.stop()


@pytest.fixture
def record_redis(redis_server: RedisServer) -> RedisServer:
    """Where the recorder app writes its records: ``redis_server``, the broker's.

    A module whose tests fault the broker's Redis overrides this fixture with a server of
    its own (tests/test_reliability.py), so what the callbacks did stays readable.
    """
    return redis_server


@pytest.fixture
def records(record_redis: RedisServer) -> Records:
    """What the recorder app's callbacks wrote (``rec:*`` in ``record_redis``)."""
    return Records(record_redis.client())


@pytest.fixture
def fleets(
    redis_server: RedisServer, record_redis: RedisServer, request: pytest.FixtureRequest
) -> Iterator[Callable[..., Fleet]]:
    """Factory ``make(pool="solo", ttl=1.5, *, broker=None, app=RECORDER_APP, **env) -> Fleet``.

    The broker is ``redis_server`` unless ``broker`` names another; records go to
    ``record_redis``; ``env`` sets the app's STOKER_TEST_* knobs.  Every worker is killed
    at teardown, and the workers' logs are printed when the test failed.
    """
    made: list[Fleet] = []

    def make(
        pool: str = "solo",
        ttl: float = TEST_TTL,
        *,
        broker: str | None = None,
        app: str = RECORDER_APP,
        **env: str,
    ) -> Fleet:
        base = {
            "STOKER_TEST_BROKER": broker or redis_server.url_for(0),
            "STOKER_TEST_RECORD_URL": record_redis.url_for(0),
            "STOKER_TEST_TTL": str(ttl),
        }
        fleet = Fleet(app, env={**base, **env}, pool=pool)
        made.append(fleet)
        return fleet

    yield make
    failed = getattr(request.node, "rep_call", None)
    for fleet in made:
        fleet.cleanup()
        if failed is not None and failed.failed:
            print(fleet.logs())


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("chaos", "the chaos soak (tests/chaos, marker chaos)")
    group.addoption(
        "--chaos-minutes",
        type=float,
        default=None,
        help="how long the soak injects faults, in minutes (default: the short form CI runs, "
        "1 on a plain Redis, 0.6 on a cluster)",
    )
    group.addoption(
        "--chaos-store",
        choices=("plain", "cluster", "both"),
        default="both",
        help="the soak's lease store: one Redis, a six-node Redis Cluster, or both (default)",
    )
    group.addoption(
        "--chaos-seed",
        type=int,
        default=None,
        help="seed of the soak's fault schedule (default: a fresh one, printed; pass it to replay)",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """A longer soak gets a matching timeout (the suite's default is for short tests)."""
    minutes = float(config.getoption("--chaos-minutes") or 1.0)
    for item in items:
        if item.get_closest_marker("chaos") and not item.get_closest_marker("timeout"):
            item.add_marker(pytest.mark.timeout(int(minutes * 60 + 180)))
