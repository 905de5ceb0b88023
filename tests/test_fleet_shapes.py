"""Production fleet shapes (issue 24): gossip off, fresh names, nothing left in the broker.

Real ``celery worker`` processes.  With ``--without-gossip --without-heartbeat
--without-mingle`` (the usual advice for large fleets) nothing tells a worker
that another stopped: stopped followers must still leave the waiters, and a
clean handover must still take milliseconds.  Every worker's event queue must
be gone from the broker soon after the worker stopped for good, on Redis and
on RabbitMQ (a vhost of this test's own, deleted after).
"""

from __future__ import annotations

import contextlib
import itertools
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator

import pytest
from support.workers import Fleet, Records, check_terms

from celery_stoker.keys import waiters_key
from celery_stoker.testing import RedisServer, wait_for

pytestmark = pytest.mark.workers

GOSSIP_OFF = ["--without-gossip", "--without-heartbeat"]  # --without-mingle: the default
WAITERS = waiters_key("stoker", "recorder")


def _waiters(server: RedisServer) -> list[str]:
    return [n.decode() for n in server.client().zrange(WAITERS, 0, -1)]


def test_gossip_off_stopped_followers_leave_the_waiters_and_a_handover_takes_ms(
    fleets: Callable[..., Fleet], redis_server: RedisServer, records: Records
) -> None:
    """Behind 10 followers that stopped (5 SIGTERM, 5 SIGKILL) the live one leads at once."""
    fleet = fleets("solo", ttl=5.0)
    leader = fleet.start("lead@%h", extra_args=GOSSIP_OFF)
    wait_for(lambda: records.of("now_leader"), 60, what="the leader")
    doomed = [fleet.start(f"gone{i}@%h", extra_args=GOSSIP_OFF) for i in range(10)]
    for worker in doomed:
        worker.wait_ready(90)
    wait_for(lambda: len(_waiters(redis_server)) == 10, 60, what="10 waiters")
    live = fleet.start("live@%h", extra_args=GOSSIP_OFF).wait_ready(60)
    wait_for(lambda: live.node in _waiters(redis_server), 30, what="the live waiter, last")
    for worker in doomed[:5]:
        worker.stop()
    for worker in doomed[5:]:
        worker.sigkill()
        worker.wait_exit()
    stopped = {w.node for w in doomed[:5]}
    wait_for(lambda: not stopped & set(_waiters(redis_server)), 10, what="the stopped ones left")
    leader.stop()
    shutdown = wait_for(
        lambda: [r for r in records.of("shutdown") if r.host == leader.node], 30, what="shutdown"
    )[0]
    new = wait_for(
        lambda: [r for r in records.of("now_leader") if r.host == live.node],
        30,
        what="the live follower leads",
    )[0]
    handover = new.started - shutdown.at
    print(f"\nclean handover behind 10 stopped followers: {handover * 1000:.0f} ms")
    assert handover < 0.5, f"{handover:.2f} s"
    assert not {w.node for w in doomed} & set(_waiters(redis_server)), _waiters(redis_server)


def test_gossip_off_churn_of_fresh_names_keeps_the_waiters_bounded(
    fleets: Callable[..., Fleet], redis_server: RedisServer, records: Records
) -> None:
    """Fresh names, a few at a time, killed without a clean stop: the set stays small."""
    fleet = fleets("solo", ttl=5.0)
    fleet.start("lead@%h", extra_args=GOSSIP_OFF)
    wait_for(lambda: records.of("now_leader"), 60, what="the leader")
    sizes = []
    for batch in range(5):
        pods = [fleet.start(f"pod-{batch}-{i}@%h", extra_args=GOSSIP_OFF) for i in range(3)]
        for pod in pods:
            pod.wait_ready(90)
        wait_for(lambda pods=pods: {p.node for p in pods} <= set(_waiters(redis_server)), 30)
        sizes.append(len(_waiters(redis_server)))
        for pod in pods:
            pod.sigkill()
            pod.wait_exit()
    # Each join looks at the newest waiters: only the last batch may still be there.
    print(f"\nwaiters after each batch joined: {sizes}")
    assert max(sizes) <= 6, sizes


@pytest.mark.parametrize("flag", ["--without-gossip", "--without-heartbeat"])
def test_min_members_with_gossip_off_is_refused_at_start(
    fleets: Callable[..., Fleet], flag: str
) -> None:
    """Heartbeats off alone (gossip on) is refused too: no other worker would count this one.

    A fleet run so saw one member on each worker, and its leader held the lease
    without ever acting.
    """
    fleet = fleets("solo", STOKER_TEST_MIN_MEMBERS="2")
    worker = fleet.start("w1@%h", extra_args=[flag])
    assert worker.wait_exit(60) != 0
    log = worker.log()
    assert "min_members=2 needs Celery's gossip and heartbeats" in log, log[-3000:]
    assert f"runs with {flag}" in log, log[-3000:]


def test_an_idle_follower_sends_nothing_with_gossip_off(
    fleets: Callable[..., Fleet], make_redis_server: Callable[..., RedisServer]
) -> None:
    """MONITOR on the lease Redis, each command's client mapped to its process: 0 a minute."""
    from bench.common import CommandCounter, by_owner, local_ports_to, process_tree

    lease_redis = make_redis_server()
    fleet = fleets("solo", ttl=2.0, STOKER_TEST_URL=lease_redis.url_for(0))
    leader = fleet.start("w1@%h", extra_args=GOSSIP_OFF).wait_ready(60)
    client = lease_redis.client()
    wait_for(lambda: client.exists("stoker:{recorder}:lease"), 30, what="a lease")
    follower = fleet.start("w2@%h", extra_args=GOSSIP_OFF).wait_ready(60)
    wait_for(lambda: follower.node in [n.decode() for n in client.zrange(WAITERS, 0, -1)], 30)
    counter = CommandCounter(lease_redis.port).start()
    try:
        time.sleep(1.0)  # what was in flight at the join
        counter.take()
        window = 20.0
        time.sleep(window)  # an observation window, not a timing assertion
        owners = {
            "leader": local_ports_to(process_tree(leader.pid), lease_redis.port),
            "follower": local_ports_to(process_tree(follower.pid), lease_redis.port),
        }
        counts = by_owner(counter.take(), owners)
    finally:
        counter.stop()
    print(
        f"\nin {window:.0f} s: leader {dict(counts['leader'])}, follower {dict(counts['follower'])}"
    )
    assert sum(counts["leader"].values()) > 0, "the window saw the leader's renewals"
    assert sum(counts["follower"].values()) == 0, counts["follower"]


# ------------------------------------------------------------------ nothing left in the broker

EXPIRY_BOUND = 30.0  # the promise: gone within 30 s of the worker stopping


def _rabbitmqctl(*args: str) -> str:
    done = subprocess.run(
        ["rabbitmqctl", "-q", *args], capture_output=True, text=True, timeout=60, check=True
    )
    return done.stdout


@pytest.fixture
def vhost() -> Iterator[str]:
    """A RabbitMQ vhost of this test's own (guest may use it), deleted after."""
    if shutil.which("rabbitmqctl") is None:
        pytest.skip("rabbitmqctl not on PATH: no RabbitMQ to test the broker side against")
    name = f"stoker-test-{uuid.uuid4().hex[:8]}"
    try:
        _rabbitmqctl("add_vhost", name)
    except (subprocess.CalledProcessError, OSError) as exc:
        pytest.skip(f"RabbitMQ refused a vhost of our own ({exc})")
    try:
        _rabbitmqctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
        yield name
    finally:
        with contextlib.suppress(Exception):
            _rabbitmqctl("delete_vhost", name)


def _amqp_fleet(
    fleets: Callable[..., Fleet], redis_server: RedisServer, vhost: str, **env: str
) -> Fleet:
    """gevent workers (events through the broker) on the vhost; the lease in Redis."""
    return fleets(
        "gevent",
        broker=_amqp_url(vhost),
        STOKER_TEST_URL=redis_server.url_for(0),
        STOKER_TEST_TIMER="0.25",
        **env,
    )


def _amqp_url(vhost: str) -> str:
    return f"amqp://guest:guest@127.0.0.1:5672/{vhost}"


def _rabbit_queues(vhost: str) -> set[str]:
    out = _rabbitmqctl("list_queues", "-p", vhost, "name", "--no-table-headers")
    return {line.strip() for line in out.splitlines() if line.strip().startswith("stoker.")}


@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
def test_rabbitmq_a_stopped_workers_event_queue_is_gone_within_30_s(
    fleets: Callable[..., Fleet],
    redis_server: RedisServer,
    records: Records,
    vhost: str,
    how: str,
) -> None:
    fleet = _amqp_fleet(fleets, redis_server, vhost)
    workers = [fleet.start(f"w{i}-{uuid.uuid4().hex[:6]}@%h") for i in range(2)]
    for worker in workers:
        worker.wait_ready(90)
    wait_for(lambda: records.of("timer"), 60, what="events through the broker")
    assert {f"stoker.{w.node}" for w in workers} <= _rabbit_queues(vhost)
    for worker in workers:
        worker.stop() if how == "SIGTERM" else worker.sigkill()
        worker.wait_exit()
    stopped = time.monotonic()
    wait_for(lambda: not _rabbit_queues(vhost), EXPIRY_BOUND + 5, interval=1.0, what="no queue")
    print(f"\nevent queues gone {time.monotonic() - stopped:.1f} s after the stop ({how})")
    assert time.monotonic() - stopped <= EXPIRY_BOUND + 5


def test_rabbitmq_a_queue_from_an_older_release_is_replaced(
    fleets: Callable[..., Fleet], redis_server: RedisServer, records: Records, vhost: str
) -> None:
    """Same host name, its queue declared durable without x-expires: the worker still runs."""
    from kombu import Connection

    url = f"amqp://guest:guest@127.0.0.1:5672/{vhost}"
    node = f"w1-{uuid.uuid4().hex[:6]}@localhost"
    with Connection(url) as conn:
        conn.default_channel.queue_declare(f"stoker.{node}", durable=True, auto_delete=False)
    fleet = _amqp_fleet(fleets, redis_server, vhost)
    worker = fleet.start(node).wait_ready(90)
    wait_for(lambda: records.of("timer"), 60, what="events through the replaced queue")
    assert "replaced event queue" in worker.log()
    worker.stop()


def test_rabbitmq_a_gevent_worker_loses_no_event_across_a_reconnect(
    fleets: Callable[..., Fleet], redis_server: RedisServer, records: Records, vhost: str
) -> None:
    """The broker drops every connection of the vhost: the queue stays, the timer goes on."""
    fleet = _amqp_fleet(fleets, redis_server, vhost)
    worker = fleet.start(f"w1-{uuid.uuid4().hex[:6]}@%h").wait_ready(90)
    wait_for(lambda: len(records.of("timer")) >= 4, 60, what="timer events")
    _rabbitmqctl("close_all_connections", "-p", vhost, "stoker test: a broker reconnect")
    cut = time.time()
    after = wait_for(
        lambda: [r for r in records.of("timer") if r.started > cut + 2.0], 60, what="timers after"
    )
    assert after, "the timer stopped after the reconnect"
    timers = [r for r in records.of("timer") if r.host == worker.node]
    gaps = [b.started - a.started for a, b in itertools.pairwise(timers)]
    print(f"\nlongest gap between timer events across the reconnect: {max(gaps):.2f} s")
    assert f"stoker.{worker.node}" in _rabbit_queues(vhost)
    # A lost event would stall the timer until the watchdog gave up on it.
    assert max(gaps) < 5.0, f"a gap of {max(gaps):.1f} s: an event was lost"


def _ready_messages(vhost: str, queue: str) -> int:
    out = _rabbitmqctl("list_queues", "-p", vhost, "name", "messages_ready", "--no-table-headers")
    for line in out.splitlines():
        name, _, count = line.strip().rpartition("\t")
        if name == queue:
            return int(count)
    return 0


def test_rabbitmq_an_event_lost_with_an_expired_queue_is_sent_again(
    fleets: Callable[..., Fleet], redis_server: RedisServer, records: Records, vhost: str
) -> None:
    """A live worker away from the broker longer than its queue's expiry loses what waited in it.

    One gevent slot, busy with the user's own tasks: the next timer event waits
    in the worker's queue when the broker drops the worker, which then cannot
    reconnect for longer than the queue's expiry (3 s here, 20 s in
    production).  The broker deletes the queue and the event with it; the pump
    waited for that event ``UNSEEN_TIMEOUT`` (300 s), the Stoker standing still.
    Now the event is given up and sent again once the consumer is back.
    """
    from celery import Celery

    fleet = _amqp_fleet(fleets, redis_server, vhost, STOKER_TEST_QUEUE_EXPIRES="3")
    worker = fleet.start(f"w1-{uuid.uuid4().hex[:6]}@%h", concurrency=1).wait_ready(90)
    queue = f"stoker.{worker.node}"
    wait_for(lambda: len(records.of("timer")) >= 2, 60, what="timer events")
    user = Celery("user", broker=_amqp_url(vhost))
    for _ in range(4):  # one runs, one waits in the worker: the rest wait in the broker
        user.send_task("recorder.block", args=["never-pushed", 1.5])
    user.close()
    wait_for(lambda: _ready_messages(vhost, queue) >= 1, 20, 0.2, what="an event in the queue")
    _rabbitmqctl("set_vhost_limits", "-p", vhost, '{"max-connections": 0}')
    _rabbitmqctl("close_all_connections", "-p", vhost, "stoker test: a long broker outage")
    wait_for(lambda: queue not in _rabbit_queues(vhost), 30, 0.5, what="the queue expired")
    _rabbitmqctl("clear_vhost_limits", "-p", vhost)
    back = time.time()
    # A generous bound: the user's tasks run first (about 5 s); the bug waited 300 s.
    wait_for(lambda: [r for r in records.of("timer") if r.started > back], 60, what="a timer after")
    assert "was waiting in this worker's event queue when the worker lost the broker" in (
        worker.log()
    )
    assert queue in _rabbit_queues(vhost)  # declared again
    check_terms(records.events())


@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
def test_redis_broker_leaves_no_binding_or_queue_of_a_stopped_worker(
    fleets: Callable[..., Fleet], redis_server: RedisServer, records: Records, how: str
) -> None:
    fleet = fleets("gevent", STOKER_TEST_TIMER="0.25")
    broker = redis_server.client()
    worker = fleet.start(f"w1-{uuid.uuid4().hex[:6]}@%h").wait_ready(90)
    wait_for(lambda: records.of("timer"), 60, what="events through the broker")
    queue = f"stoker.{worker.node}"

    def leftovers() -> list[str]:
        found = []
        for key in broker.scan_iter("_kombu.binding*"):
            members = broker.smembers(key) if broker.type(key) == b"set" else set()
            found += [f"{key.decode()}: {m!r}" for m in members if queue.encode() in m]
            if queue.encode() in key:
                found.append(key.decode())
        found += [k.decode() for k in broker.scan_iter(f"{queue}*")]
        return found

    assert not [x for x in leftovers() if "binding" in x], "a binding per worker name"
    worker.stop() if how == "SIGTERM" else worker.sigkill()
    worker.wait_exit()
    wait_for(lambda: not leftovers(), EXPIRY_BOUND, interval=1.0, what="nothing of the worker")
