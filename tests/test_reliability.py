"""The faults production brings, with real workers: partitions, Redis loss, bad input.

Records go to a Redis that is never faulted, so what the callbacks did is
known even while the lease's Redis is cut off, restarted or down.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable

import pytest
from support.tcp_proxy import TcpProxy
from support.workers import Fleet, Records, check_terms, heard_join

from celery_stoker.testing import RedisServer, free_port, wait_for

pytestmark = pytest.mark.workers

TTL = 1.5
RENEW = TTL / 3
APP = "tests.apps.recorder"


@pytest.fixture
def record_redis(make_redis_server: Callable[..., RedisServer]) -> RedisServer:
    """Records on a server of their own (conftest's ``records`` and ``fleets`` use this)."""
    return make_redis_server()


def lease_holder(server: RedisServer) -> bytes | None:
    try:
        value = server.client().get("stoker:{recorder}:lease")
    except Exception:
        return None
    return value if isinstance(value, bytes) else None


def test_partitioned_leader_steps_down_before_expiry_and_rejoins(
    redis_server: RedisServer,
    records: Records,
    fleets: Callable[..., Fleet],
    tcp_proxy: Callable[[int], TcpProxy],
) -> None:
    proxy = tcp_proxy(redis_server.port)
    through_proxy = f"redis://127.0.0.1:{proxy.port}/0"
    fleet = fleets(STOKER_TEST_TIMER="0.2")
    w1 = fleet.start("w1@%h", env={"STOKER_TEST_BROKER": through_proxy})
    first = wait_for(lambda: records.of("now_leader"), 30, what="w1 leads")[0]
    w2 = fleet.start("w2@%h")
    wait_for(lambda: "following" in w2.log(), 30, what="w2 follows")
    # w1 heard w2 join before the cut: no event of w1's term is in flight across it
    # (a callback running across a partition is not interrupted, only fenced; that
    # limit has its own test below).
    heard_join(records, w2.node)

    proxy.blackhole()
    cut_at = time.time()
    lost = wait_for(
        lambda: [r for r in records.of("shutdown") if r.reason == "lease_lost"],
        10,
        what="shutdown(lease_lost) on the cut-off leader",
    )[0]
    second = wait_for(
        lambda: [r for r in records.of("now_leader") if r.host == w2.node],
        10,
        what="w2 leads",
    )[0]
    assert lost.host == w1.node and lost.token == first.token
    # w1 said shutdown before its lease could expire: no later than one TTL after
    # the cut (its last renewal came before the cut), and before w2 acted.
    assert lost.at <= cut_at + TTL
    assert lost.at < second.started
    assert second.token > first.token
    assert not [r for r in records.of("timer") if r.host == w1.node and r.at > lost.at]

    proxy.heal()
    pattern = re.compile(r"following w2@\S+ \(token " + str(second.token))
    wait_for(lambda: pattern.search(w1.log()), 20, what="w1 rejoins as a follower")
    assert w1.alive()
    check_terms(records.events())


def test_a_callback_running_across_a_partition_cannot_commit(
    redis_server: RedisServer,
    records: Records,
    fleets: Callable[..., Fleet],
    tcp_proxy: Callable[[int], TcpProxy],
) -> None:
    """The old leader's slow now_leader finishes after the new term began: its write is refused."""
    proxy = tcp_proxy(redis_server.port)
    through_proxy = f"redis://127.0.0.1:{proxy.port}/0"
    fleet = fleets(pool="threads", STOKER_TEST_EVENT_SLEEP="3")
    w1 = fleet.start("w1@%h", env={"STOKER_TEST_BROKER": through_proxy})
    wait_for(lambda: records.raw("started"), 30, what="w1's now_leader running")
    w2 = fleet.start("w2@%h", env={"STOKER_TEST_EVENT_SLEEP": "0"})
    proxy.blackhole()
    second = wait_for(
        lambda: [r for r in records.of("now_leader") if r.host == w2.node], 15, what="w2 leads"
    )[0]
    proxy.heal()
    old = wait_for(
        lambda: [r for r in records.of("now_leader") if r.host == w1.node],
        15,
        what="w1's slow now_leader to finish",
    )[0]
    assert old.token < second.token
    wait_for(
        lambda: f"was not stored: term {old.token} ended" in w1.log(),
        15,
        what="the refused write logged",
    )
    state = redis_server.client().hgetall("stoker:{recorder}:state")
    assert int(state[b"token"]) == second.token


def test_redis_restart_that_loses_everything(
    redis_server: RedisServer, records: Records, fleets: Callable[..., Fleet]
) -> None:
    fleet = fleets(STOKER_TEST_TIMER="0.2")
    workers = [fleet.start(f"w{i}@%h") for i in (1, 2, 3)]
    first = wait_for(lambda: records.of("now_leader"), 30, what="a leader")[0]
    wait_for(lambda: len(records.of("timer")) >= 3, 30, what="timers")

    redis_server.restart(empty=True)
    answering_at = time.monotonic()
    wait_for(lambda: lease_holder(redis_server), 5, interval=0.01, what="a new lease")
    elected_after = time.monotonic() - answering_at
    assert elected_after < 1.0, f"no leader {elected_after:.2f}s after Redis answered"
    again = wait_for(
        lambda: [r for r in records.of("now_leader") if r.token > first.token],
        30,
        what="now_leader after the restart",
    )[0]
    assert again.token > first.token
    wait_for(
        lambda: [r for r in records.of("timer") if r.token == again.token],
        30,
        what="timers in the new term",
    )
    for worker in workers:
        assert worker.alive()
        log = worker.log()
        # Bounded logging: one line when Redis went away, none per retry, and no
        # traceback from our code (Celery's consumer logs its own reconnection).
        assert "celery_stoker/" not in log, log[-3000:]
        assert log.count("unreachable (") <= 1
        assert log.count("lease listener lost Redis") <= 1
    check_terms(records.events())


def test_redis_unavailable_at_worker_start(
    redis_server: RedisServer, records: Records, fleets: Callable[..., Fleet]
) -> None:
    port = free_port()
    lease_url = f"redis://127.0.0.1:{port}/0"
    fleet = fleets(STOKER_TEST_URL=lease_url)
    w1 = fleet.start("w1@%h")
    wait_for(lambda: "ready." in w1.log(), 30, what="the worker starts without its lease Redis")
    wait_for(lambda: "unreachable" in w1.log(), 10, what="one warning")
    assert not records.of("now_leader")
    lease_redis = RedisServer()
    try:
        lease_redis.start(port=port)
        up_at = time.monotonic()
        wait_for(lambda: lease_holder(lease_redis), 5, interval=0.01, what="elected")
        assert time.monotonic() - up_at < 1.5
        wait_for(lambda: records.of("now_leader"), 15, what="now_leader once Redis is up")
        assert w1.log().count("unreachable (") == 1
        assert "reachable again" in w1.log()
    finally:
        lease_redis.close()


@pytest.mark.parametrize(
    ("conf", "expected"),
    [
        ({"STOKER_TEST_TTL": "0"}, r"stoker_lease_ttl=0\.0 is out of range"),
        (
            {"STOKER_TEST_URL": "redis://:hunter2@127.0.0.1:notaport/0"},
            r"stoker_url: 'redis://:\*\*\*@127\.0\.0\.1:notaport/0' is malformed",
        ),
    ],
    ids=["ttl-out-of-range", "malformed-url"],
)
def test_bad_setting_stops_the_worker_at_start(
    redis_server: RedisServer, fleets: Callable[..., Fleet], conf: dict[str, str], expected: str
) -> None:
    fleet = fleets(**conf)
    worker = fleet.start("w1@%h")
    code = worker.wait_exit(60)
    assert code != 0
    assert re.search(expected, worker.log()), worker.log()[-3000:]
    assert "hunter2" not in worker.log()


def test_non_redis_broker_without_stoker_url_stops_the_worker(
    fleets: Callable[..., Fleet],
) -> None:
    fleet = fleets(broker="amqp://guest:secret-pw@127.0.0.1:1//")
    worker = fleet.start("w1@%h")
    assert worker.wait_exit(60) != 0
    log = worker.log()
    assert "set stoker_url" in log
    assert "secret-pw" not in log


def test_foreign_lease_value_is_reported_once_and_survived(
    redis_server: RedisServer, records: Records, fleets: Callable[..., Fleet]
) -> None:
    client = redis_server.client()
    client.set("stoker:{recorder}:lease", b"someone else's", px=60_000)
    fleet = fleets()
    w1 = fleet.start("w1@%h")
    wait_for(lambda: "did not write" in w1.log(), 30, what="the foreign value reported")
    assert not records.of("now_leader")
    client.delete("stoker:{recorder}:lease")
    wait_for(lambda: records.of("now_leader"), 2 * TTL + 5, what="elected once it is gone")
    assert w1.log().count("did not write") == 1
    assert w1.alive()


def test_foreign_record_keys_never_stop_the_leader(
    redis_server: RedisServer, records: Records, fleets: Callable[..., Fleet]
) -> None:
    """dump()'s record is a convenience: a foreign value there must not block acting."""
    client = redis_server.client()
    client.set("stoker:{recorder}:info", b"not a hash")
    client.set("stoker:{recorder}:transitions", b"not a list")
    fleet = fleets(STOKER_TEST_TIMER="0.2")
    w1 = fleet.start("w1@%h")
    wait_for(lambda: len(records.of("timer")) >= 2, 30, what="the leader acts")
    assert w1.log().count("could not write its record") == 1
