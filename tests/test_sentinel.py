"""Electing through Redis Sentinel: the master dies, Sentinel promotes the replica, the fleet
elects again there with a higher token.

Real processes throughout: a master, a replica, one Sentinel and two ``celery worker``
processes running ``tests/apps/recorder.py`` with ``stoker_url = sentinel://...``.  The broker
(and the recorder's records) live in a separate plain Redis that is never touched.

Known limit, shown here only on its safe side: replication is asynchronous, so a lease (or a
token increment) written just before the master died can be missing on the promoted replica.
This test waits for the replica to hold the current lease before it kills the master; what
protects external writes in the unlucky case is the fencing token, not the lease.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import pytest
from support.workers import Fleet, Records, check_terms

from celery_stoker.testing import RedisSentinel, RedisServer, wait_for

pytestmark = pytest.mark.workers

APP = "tests.apps.recorder"
MASTER_NAME = "mymaster"
#: A short TTL and a Sentinel that waits 1 s before declaring the master down: the leader's
#: validity (at most TTL after its last renewal) always runs out before the replica is
#: promoted, so its renewals can never quietly land on the promoted replica, and the fleet
#: must elect again there.  (A longer TTL would make that a race; both outcomes are safe.)
TTL = 1.0
RENEW = TTL / 3
DOWN_AFTER_MS = 1000
LEASE_KEY = "stoker:{recorder}:lease"
TOKEN_KEY = "stoker:{recorder}:token"


@pytest.fixture
def sentinel_group(
    make_redis_server: Callable[..., RedisServer],
) -> Iterator[tuple[RedisServer, RedisServer, RedisSentinel]]:
    """A master, a replica in sync with it, and a Sentinel that knows both."""
    master = make_redis_server()
    replica = make_redis_server(replica_of=master.address)
    replica.wait_replica_synced()
    sentinel = RedisSentinel(master.port, master_name=MASTER_NAME, down_after_ms=DOWN_AFTER_MS)
    sentinel.start()
    try:
        probe = sentinel.client(socket_timeout=2.0)

        def replica_known() -> bool:
            for entry in probe.execute_command("SENTINEL", "REPLICAS", MASTER_NAME) or []:
                flags = entry.get(b"flags", b"")
                if (
                    int(entry.get(b"port", 0)) == replica.port
                    and b"disconnected" not in flags
                    and entry.get(b"master-link-status") == b"ok"
                ):
                    return True
            return False

        wait_for(replica_known, 15, interval=0.05, what="Sentinel to see the replica in sync")
        yield master, replica, sentinel
    finally:
        sentinel.close()


def test_fleet_elects_again_on_the_promoted_replica_with_a_higher_token(
    redis_server: RedisServer,
    sentinel_group: tuple[RedisServer, RedisServer, RedisSentinel],
) -> None:
    master, replica, sentinel = sentinel_group
    records = Records(redis_server.client())
    fleet = Fleet(
        APP,
        env={
            "STOKER_TEST_BROKER": redis_server.url_for(0),
            "STOKER_TEST_URL": f"sentinel://127.0.0.1:{sentinel.port}",
            "STOKER_TEST_MASTER_NAME": MASTER_NAME,
            "STOKER_TEST_TTL": str(TTL),
            "STOKER_TEST_TIMER": "0.2",
        },
    )
    try:
        fleet.start("w1@%h")
        fleet.start("w2@%h")
        first = wait_for(lambda: records.of("now_leader"), 30, what="a first leader")[0]
        wait_for(
            lambda: len([r for r in records.of("timer") if r.token == first.token]) >= 2,
            15,
            what="timers of the first term",
        )
        # The lease was taken on the master Sentinel named, and it reached the replica.
        master_lease = master.client().get(LEASE_KEY)
        assert master_lease is not None and f'"token":{first.token},'.encode() in master_lease
        replica_client = replica.client(socket_timeout=2.0)
        first_mark = f'"token":{first.token},'.encode()
        wait_for(
            lambda: first_mark in (replica_client.get(LEASE_KEY) or b""),
            10,
            what="the lease replicated to the replica",
        )
        assert int(replica_client.get(TOKEN_KEY) or 0) >= first.token

        master.kill()
        killed_at = time.time()
        sentinel.wait_master_addr(replica.address, timeout=20)
        promoted_at = time.time()

        second = wait_for(
            lambda: [r for r in records.of("now_leader") if r.token > first.token],
            20,
            what="a leader elected on the promoted replica",
        )[0]
        # The new term lives in the promoted replica, and it acts: timers run under it.
        wait_for(
            lambda: len([r for r in records.of("timer") if r.token == second.token]) >= 2,
            15,
            what="timers of the new term",
        )
        lease = replica_client.get(LEASE_KEY)
        assert lease is not None and f'"token":{second.token},'.encode() in lease
        assert f'"host":"{second.host}"'.encode() in lease
        assert second.token > first.token

        events = records.events()
        # The old leader could not renew once its master was gone: it told its Stoker to stop
        # (shutdown, lease_lost) itself, before the new term began (check_terms checks when).
        lost = [r for r in records.of("shutdown", events) if r.token == first.token]
        assert [(r.host, r.reason) for r in lost] == [(first.host, "lease_lost")], lost
        check_terms(events)
        assert all(w.alive() for w in fleet.workers), "a worker died during the failover"
        took = second.at - promoted_at
        print(
            f"master killed -> replica promoted: {promoted_at - killed_at:.2f} s; "
            f"promoted -> now_leader (token {first.token} -> {second.token}): {took:.2f} s"
        )
        # Redis "came back" when Sentinel named the replica: leader again within about a second
        # (promise 6), plus the trip of now_leader through the broker.
        assert took <= 1.0 + 0.5, f"no leader {took:.2f} s after the replica was promoted"
    except BaseException:
        print(fleet.logs())
        raise
    finally:
        fleet.cleanup()
