"""Tests for the test infrastructure itself.

Every fault-injection test in the suite trusts these helpers: if ``blackhole()`` silently
forwarded bytes, or ``restart(empty=True)`` kept data, partition and data-loss tests would pass
for the wrong reason.  So each behaviour the other tests rely on is pinned down here.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from support.tcp_proxy import TcpProxy

from celery_stoker.testing import RedisProcessError, RedisSentinel, RedisServer, resolve_binary
from celery_stoker.testing import redis_server as redis_server_module

MakeServer = Callable[..., RedisServer]
MakeProxy = Callable[[int], TcpProxy]


def _fast_client(port: int, timeout: float = 0.3) -> redis.Redis:
    """A client that surfaces the first timeout instead of retrying it (redis-py retries 10x)."""
    return redis.Redis(
        host="127.0.0.1",
        port=port,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 0),
    )


def _wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(0.02)


def _port_refuses(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
    except ConnectionRefusedError:
        return True
    return False


# -- RedisServer --------------------------------------------------------------------------------


def test_server_starts_private_and_serves(redis_server: RedisServer) -> None:
    client = redis_server.client()
    client.set(b"k", b"v")
    assert client.get(b"k") == b"v"
    assert redis_server.url == f"redis://127.0.0.1:{redis_server.port}/0"
    assert redis_server.is_running
    info = client.info("server")
    assert info["process_id"] == redis_server.pid
    assert client.config_get("save")["save"] == ""
    assert client.config_get("appendonly")["appendonly"] == "no"


def test_url_for_selects_db(redis_server: RedisServer) -> None:
    db3 = redis.Redis.from_url(redis_server.url_for(3))
    db3.set("only-in-3", 1)
    assert db3.connection_pool.connection_kwargs["db"] == 3
    assert redis_server.client().exists("only-in-3") == 0
    assert db3.exists("only-in-3") == 1
    db3.close()


def test_restart_empty_loses_data_and_keeps_port(redis_server: RedisServer) -> None:
    port, old_pid = redis_server.port, redis_server.pid
    redis_server.client().set("lease", "me")
    redis_server.restart(empty=True)
    assert redis_server.port == port
    assert redis_server.pid != old_pid
    fresh = redis.Redis.from_url(redis_server.url)
    assert fresh.dbsize() == 0
    fresh.close()


def test_restart_not_empty_keeps_data(redis_server: RedisServer) -> None:
    redis_server.client().set("lease", "me")
    redis_server.restart(empty=False)
    fresh = redis.Redis.from_url(redis_server.url)
    assert fresh.get("lease") == b"me"
    fresh.close()


def test_kill_makes_clients_fail_and_stop_is_idempotent(redis_server: RedisServer) -> None:
    client = _fast_client(redis_server.port)
    assert client.ping()
    redis_server.kill()
    assert not redis_server.is_running
    with pytest.raises(redis.exceptions.ConnectionError):
        client.ping()
    redis_server.stop()  # already dead: must not raise
    assert _port_refuses(redis_server.port)


def test_pause_times_out_and_resume_recovers(redis_server: RedisServer) -> None:
    client = _fast_client(redis_server.port)
    assert client.ping()
    redis_server.pause()
    try:
        with pytest.raises(redis.exceptions.TimeoutError):
            client.ping()
    finally:
        redis_server.resume()
    assert client.ping()


def test_password_server_requires_auth(make_redis_server: MakeServer) -> None:
    server = make_redis_server(password="s3cret")
    assert server.url == f"redis://:s3cret@127.0.0.1:{server.port}/0"
    anonymous = _fast_client(server.port)
    with pytest.raises(redis.exceptions.AuthenticationError):
        anonymous.ping()
    authed = redis.Redis.from_url(server.url)
    assert authed.ping()
    authed.close()


def test_password_url_survives_special_characters(make_redis_server: MakeServer) -> None:
    server = make_redis_server(password="p@ss:w/rd;%")
    client = redis.Redis.from_url(server.url_for(2))
    assert client.ping()
    assert client.connection_pool.connection_kwargs["password"] == "p@ss:w/rd;%"
    client.close()


def test_valkey_binary_starts(make_redis_server: MakeServer) -> None:
    server = make_redis_server(binary="valkey")
    assert Path(server.binary).name == "valkey-server"
    info = server.client().info("server")
    assert info.get("server_name") == "valkey"


def test_valkey_selected_by_env_or_missing_redis(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("STOKER_TEST_REDIS", "valkey")
    assert Path(resolve_binary()).name == "valkey-server"
    monkeypatch.delenv("STOKER_TEST_REDIS")
    monkeypatch.setenv("PATH", str(tmp_path))  # no redis-server anywhere on PATH
    assert Path(resolve_binary()).name == "valkey-server"
    with pytest.raises(RedisProcessError):
        resolve_binary("redis")


def test_start_failure_reports_log_tail() -> None:
    server = RedisServer(extra_args=["--definitely-not-an-option", "1"])
    try:
        with pytest.raises(RedisProcessError) as excinfo:
            server.start(timeout=5)
        assert "definitely-not-an-option" in str(excinfo.value)
        assert not server.is_running
    finally:
        server.close()
    assert not server.tmpdir.exists()


def test_port_race_retries_on_another_port(monkeypatch: pytest.MonkeyPatch) -> None:
    squatter = socket.create_server(("127.0.0.1", 0))
    busy = squatter.getsockname()[1]
    real_free_port = redis_server_module.free_port
    offered: list[int] = []

    def racy_free_port() -> int:
        port = busy if not offered else real_free_port()
        offered.append(port)
        return port

    monkeypatch.setattr(redis_server_module, "free_port", racy_free_port)
    server = RedisServer()
    try:
        server.start()
        assert offered[0] == busy
        assert len(offered) == 2
        assert server.port == offered[1] != busy
        assert server.client().ping()
    finally:
        server.close()
        squatter.close()


def test_replica_follows_master(make_redis_server: MakeServer) -> None:
    master = make_redis_server()
    master.client().set("k", "v")
    replica = make_redis_server(replica_of=master.address)
    replica.wait_replica_synced(timeout=10)
    assert replica.client().get("k") == b"v"
    assert replica.client().info("replication")["role"] == "slave"


# -- RedisSentinel ------------------------------------------------------------------------------


@pytest.fixture
def sentinel_factory() -> Iterator[Callable[..., RedisSentinel]]:
    sentinels: list[RedisSentinel] = []

    def make(master_port: int, **kwargs: Any) -> RedisSentinel:
        sentinel = RedisSentinel(master_port, **kwargs)
        sentinels.append(sentinel)
        sentinel.start()
        return sentinel

    yield make
    for sentinel in sentinels:
        sentinel.close()


def test_sentinel_reports_master(
    redis_server: RedisServer, sentinel_factory: Callable[..., RedisSentinel]
) -> None:
    sentinel = sentinel_factory(redis_server.port)
    assert sentinel.port != redis_server.port
    assert sentinel.master_addr() == ("127.0.0.1", redis_server.port)
    assert sentinel.master_addr("no-such-master") is None


def test_sentinel_fails_over_to_replica(
    make_redis_server: MakeServer, sentinel_factory: Callable[..., RedisSentinel]
) -> None:
    master = make_redis_server()
    replica = make_redis_server(replica_of=master.address)
    replica.wait_replica_synced()
    sentinel = sentinel_factory(master.port)
    # Sentinel learns about replicas from the master's INFO; wait until it has.
    probe = sentinel.client()
    _wait_until(lambda: len(probe.execute_command("SENTINEL", "REPLICAS", "mymaster")) == 1)
    master.kill()
    sentinel.wait_master_addr(replica.address, timeout=15)
    assert replica.client().info("replication")["role"] == "master"


# -- TcpProxy -----------------------------------------------------------------------------------


def test_proxy_forwards(redis_server: RedisServer, tcp_proxy: MakeProxy) -> None:
    proxy = tcp_proxy(redis_server.port)
    assert proxy.port != redis_server.port
    client = _fast_client(proxy.port, timeout=2)
    client.set("via-proxy", b"x" * 200_000)  # larger than one recv chunk
    assert redis_server.client().get("via-proxy") == b"x" * 200_000
    assert proxy.connection_count == 1


def test_blackhole_times_out_and_heal_restores(
    redis_server: RedisServer, tcp_proxy: MakeProxy
) -> None:
    proxy = tcp_proxy(redis_server.port)
    client = _fast_client(proxy.port)
    assert client.ping()
    proxy.blackhole()
    started = time.monotonic()
    with pytest.raises(redis.exceptions.TimeoutError):
        client.ping()
    assert time.monotonic() - started < 2.0
    with pytest.raises(redis.exceptions.TimeoutError):  # new connections are dead too
        _fast_client(proxy.port).ping()
    proxy.heal()
    assert _fast_client(proxy.port).ping()
    assert client.ping()  # redis-py dropped the timed-out connection and reconnects


def test_blackhole_holds_bytes_until_heal(redis_server: RedisServer, tcp_proxy: MakeProxy) -> None:
    proxy = tcp_proxy(redis_server.port)
    with socket.create_connection(proxy.address, timeout=0.3) as raw:
        proxy.blackhole()
        raw.sendall(b"PING\r\n")
        with pytest.raises(TimeoutError):
            raw.recv(100)
        proxy.heal()
        raw.settimeout(5)
        assert raw.recv(100) == b"+PONG\r\n"  # the same connection resumes


def test_blackhole_drop_discards_bytes(redis_server: RedisServer, tcp_proxy: MakeProxy) -> None:
    proxy = tcp_proxy(redis_server.port)
    with socket.create_connection(proxy.address, timeout=5) as raw:
        _wait_until(lambda: proxy.connection_count == 1)
        proxy.blackhole(drop=True)
        command = b"SET dropped 1\r\n"
        raw.sendall(command)
        # Heal only once the proxy has read (and thrown away) the whole SET: waiting on
        # the keyspace alone was true before the proxy read it, and a heal that came
        # first let the SET through.
        _wait_until(lambda: proxy.dropped_bytes >= len(command))
        proxy.heal()
        raw.sendall(b"ECHO after\r\n")
        assert raw.recv(100) == b"$5\r\nafter\r\n"  # first reply is ECHO's, not the SET's
    assert redis_server.client().exists("dropped") == 0


def test_reset_all_breaks_existing_connections(
    redis_server: RedisServer, tcp_proxy: MakeProxy
) -> None:
    proxy = tcp_proxy(redis_server.port)
    client = _fast_client(proxy.port, timeout=2)
    assert client.ping()
    with socket.create_connection(proxy.address, timeout=5) as raw:
        _wait_until(lambda: proxy.connection_count == 2)
        proxy.reset_all()
        assert proxy.connection_count == 0
        with pytest.raises(ConnectionResetError):  # RST, not an orderly FIN
            raw.recv(100)
    # The client's pooled socket was reset too: a first command may still meet it (or
    # redis-py may notice first); either way a new connection works.
    with contextlib.suppress(redis.ConnectionError):
        client.ping()
    assert client.ping()


def test_proxy_threads_named_and_stopped(redis_server: RedisServer) -> None:
    proxy = TcpProxy("127.0.0.1", redis_server.port).start()
    prefix = f"tcp-proxy-{proxy.port}-"
    assert any(t.name.startswith(prefix) for t in threading.enumerate())
    assert _fast_client(proxy.port).ping()
    proxy.stop()
    assert not any(t.name.startswith(prefix) for t in threading.enumerate())
    assert _port_refuses(proxy.port)


def test_fresh_redis_url_is_flushed(
    fresh_redis_url: str, redis_session_server: RedisServer
) -> None:
    client = redis.Redis.from_url(fresh_redis_url)
    assert client.dbsize() == 0
    client.set("left-behind", 1)  # the next user of the fixture must not see this
    client.close()
    redis_session_server.flushall()
    assert redis_session_server.client().dbsize() == 0
