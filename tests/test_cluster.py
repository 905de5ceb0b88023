"""A Redis Cluster as the lease store: real six-node clusters, real workers, real failovers.

The broker stays on a plain Redis (``redis_server``); ``stoker_url`` names one node of a
cluster started by ``stoker_redis_cluster`` (``cluster-node-timeout`` 1 s) and
``stoker_transport_options = {"cluster": True}``.  What the callbacks did is read from
their own records, as ``check_terms`` and the chaos soak do.
"""

from __future__ import annotations

import json
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from celery import Celery
from support.workers import Fleet, Records, check_terms
from test_operations import cli

from celery_stoker import dump, whereis
from celery_stoker.connection import redis_client
from celery_stoker.keys import lease_key, stoker_channel, token_key
from celery_stoker.lease import Holder, RedisLease
from celery_stoker.listener import LeaseListener
from celery_stoker.testing import RedisServer, wait_for
from celery_stoker.testing.redis_cluster import RedisCluster, slot_of
from celery_stoker.testing.redis_server import make_tls_files

TTL = 1.5
RENEW = TTL / 3
NODE_TIMEOUT = 1.0
LEASE = lease_key("stoker", "recorder")
EXTRA = 3  # idle-0..2: with recorder, a Stoker on each of the three primaries


@pytest.fixture
def cluster(stoker_redis_cluster: RedisCluster) -> RedisCluster:
    return stoker_redis_cluster


@pytest.fixture
def cluster_fleet(fleets: Callable[..., Fleet], cluster: RedisCluster) -> Callable[..., Fleet]:
    def make(ttl: float = TTL, **env: str) -> Fleet:
        return fleets("solo", ttl=ttl, STOKER_TEST_URL=cluster.url, STOKER_TEST_CLUSTER="1", **env)

    return make


@pytest.fixture
def tls_cluster(tmp_path: Path) -> Iterator[RedisCluster]:
    """A six-node cluster that speaks TLS only (clients, bus, replication), its own CA."""
    cluster = RedisCluster(tls=make_tls_files(tmp_path / "tls"))
    cluster.start()
    yield cluster
    cluster.close()


def operator_app(broker: RedisServer, stoker_url: str) -> Celery:
    """An operator's process (a shell, a web app): same broker, the cluster as stoker_url."""
    app = Celery("operator", broker=broker.url_for(0))
    app.conf.update(
        stoker_url=stoker_url, stoker_transport_options={"cluster": True}, stoker_lease_ttl=TTL
    )
    return app


def holders(cluster: RedisCluster, names: list[str]) -> dict[str, str | None]:
    client = cluster.client()
    try:
        out: dict[str, str | None] = {}
        for name in names:
            raw = client.get(lease_key("stoker", name))
            out[name] = Holder.parse(raw, None).hostname if raw else None
        return out
    finally:
        client.close()


def test_lease_on_a_cluster_wakes_by_shard_channel_follows_a_moved_slot_and_fences(
    cluster: RedisCluster,
) -> None:
    """Lease level: every script runs in one slot; SPUBLISH in the Stoker's slot wakes a
    waiter at once, also after the slot moved; a lost counter still gives a higher token."""
    client = redis_client(cluster.url, transport_options={"cluster": True}, socket_timeout=1.0)
    listener = LeaseListener(
        lambda: redis_client(cluster.url, transport_options={"cluster": True}),
        "stoker:lease-events",
        thread_name="test-shard-listener",
        health_interval=1.0,
        shard_channel=lambda name: stoker_channel("stoker", name),
    )
    listener.start()
    one = RedisLease(client, "tl", holder_id="a", hostname="a@h", ttl=5.0, listener=listener)
    two = RedisLease(client, "tl", holder_id="b", hostname="b@h", ttl=5.0, listener=listener)
    try:
        assert one.publish_command == "SPUBLISH" and one.channel == "stoker:{tl}:lease-events"
        wait_for(lambda: listener.subscribed, 5, what="shard subscription")

        def release_wakes(term: Any) -> float:
            result = two.acquire()
            assert result.term is None and result.holder is not None
            woke: list[float] = []
            waiter = threading.Thread(
                target=lambda: woke.append(two.wait(5.0) and time.monotonic())
            )
            waiter.start()
            time.sleep(0.1)
            released_at = time.monotonic()
            assert one.release(term)
            waiter.join(5)
            assert woke and woke[0], "the release did not wake the waiter"
            return woke[0] - released_at

        first = one.acquire()
        assert first.term is not None
        assert release_wakes(first.term) < 0.5  # not the 5 s expiry: the shard message woke it
        taken = two.acquire().term
        assert taken is not None and taken.token > first.term.token
        assert two.release(taken)

        # Move the Stoker's slot to another primary: the server withdraws the shard
        # channel; the listener subscribes again where the slot now is.
        owner = cluster.slot_owner(slot_of(LEASE.replace("recorder", "tl")))
        cluster.move_slot(slot_of("{tl}"), next(p for p in cluster.primaries() if p is not owner))
        wait_for(lambda: listener.subscribed, 10, what="shard subscription after the move")
        again = wait_for(lambda: one.acquire().term, 10, what="a term after the move")
        assert again.token > taken.token
        assert wait_for(lambda: listener.subscribed, 10)
        assert release_wakes(again) < 1.0

        # The counter and the lease lost (what a promoted replica that missed the last
        # writes sees): the next token is still above every earlier one, and fresh.
        client.delete(token_key("stoker", "tl"), lease_key("stoker", "tl"))
        lost = one.acquire(min_token=again.token)
        assert lost.term is not None and lost.term.fresh and lost.term.token > again.token
    finally:
        one.close()
        two.close()
        listener.stop()
        client.close()


def test_three_workers_elect_one_leader_per_stoker_and_fail_over(
    cluster_fleet: Callable[..., Fleet],
    cluster: RedisCluster,
    records: Records,
    redis_server: RedisServer,
) -> None:
    # Who leads what must stay put while the test looks: spreading would move Stokers
    # of the first worker up to the others (test_spread.py is about that; the other
    # tests here release through the same ordered RELEASE, on the cluster).
    fleet = cluster_fleet(
        STOKER_TEST_TIMER="0.2", STOKER_TEST_EXTRA_STOKERS=str(EXTRA), STOKER_TEST_BALANCE="0"
    )
    workers = [fleet.start(f"w{i}@%h") for i in (1, 2, 3)]
    nodes = {w.node for w in workers}
    names = ["recorder"] + [f"idle-{n}" for n in range(EXTRA)]
    assert len({cluster.slot_owner(slot_of(f"{{{n}}}")).port for n in names}) == 3
    led = wait_for(
        lambda: (h := holders(cluster, names)) and all(h.values()) and h,
        30,
        what="a leader for every Stoker",
    )
    assert set(led.values()) <= nodes
    first = wait_for(lambda: records.of("now_leader"), 30, what="first leader")[0]
    wait_for(lambda: len(records.of("timer")) >= 2, 30, what="timers")

    # The operator's looks against the cluster-backed stoker_url: the Python API from
    # another process's app, and the command line's JSON, name the leader.
    app = operator_app(redis_server, cluster.url)
    assert whereis(app, "recorder") == first.host
    assert whereis(app, "idle-0") == led["idle-0"]
    view = wait_for(
        lambda: (d := dump(app, "recorder", timeout=2.0))["workers"].keys() == nodes and d,
        30,
        interval=0.3,
        what="a dump with every worker",
    )
    assert (view["leader"], view["token"]) == (first.host, first.token)
    assert view["workers"][first.host]["state"] == "leader"
    assert sorted(view["followers"]) == sorted(nodes - {first.host})
    out = cli(fleet, "status", "--json")
    assert out.returncode == 0, out.stderr
    by_name = {v["name"]: v for v in json.loads(out.stdout)}
    assert set(by_name) == set(names)
    assert by_name["recorder"]["leader"] == first.host
    assert by_name["recorder"]["token"] == first.token
    assert {n: by_name[n]["leader"] for n in names} == holders(cluster, names)

    fleet.by_node(first.host).sigterm()
    stopped_at = time.time()
    second = wait_for(
        lambda: [r for r in records.of("now_leader") if r.host != first.host], 10, what="handover"
    )[0]
    assert second.at - stopped_at < 1.0, f"clean handover took {second.at - stopped_at:.3f}s"
    wait_for(lambda: [r for r in records.of("timer") if r.token == second.token], 10)

    fleet.by_node(second.host).sigkill()
    killed_at = time.time()
    third = wait_for(
        lambda: [r for r in records.of("now_leader") if r.token > second.token],
        15,
        what="a leader after SIGKILL",
    )[0]
    assert third.at - killed_at <= TTL + RENEW + 0.5, f"took {third.at - killed_at:.3f}s"
    assert third.host not in (first.host, second.host)
    check_terms(records.events())


def test_a_tls_cluster_in_celerys_url_forms_elects_and_hands_over(
    fleets: Callable[..., Fleet],
    tls_cluster: RedisCluster,
    records: Records,
    redis_server: RedisServer,
) -> None:
    """``rediss://<node>?ssl_cert_reqs=required&ssl_ca_certs=...`` and Celery's
    ``ssl_cert_reqs=CERT_NONE``: every node the cluster client discovers speaks TLS only,
    so the lease, the token and the shard announcement of a release all go over TLS."""
    assert tls_cluster.url.startswith("rediss://")
    host, port = tls_cluster.running[0].address
    ca = quote(str(tls_cluster.tls.ca_cert), safe="") if tls_cluster.tls else ""
    required = f"rediss://{host}:{port}/0?ssl_cert_reqs=required&ssl_ca_certs={ca}"
    cert_none = f"rediss://{host}:{port}/0?ssl_cert_reqs=CERT_NONE"
    verified = fleets(STOKER_TEST_URL=required, STOKER_TEST_CLUSTER="1", STOKER_TEST_TIMER="0.2")
    unverified = fleets(STOKER_TEST_URL=cert_none, STOKER_TEST_CLUSTER="1")
    w1 = verified.start("w1@%h").wait_ready()
    first = wait_for(lambda: records.of("now_leader"), 30, what="w1 leads")[0]
    assert first.host == w1.node
    wait_for(lambda: records.of("timer"), 30, what="w1's timer")
    assert holders(tls_cluster, ["recorder"]) == {"recorder": w1.node}
    client = tls_cluster.client()
    try:
        assert int(client.get(token_key("stoker", "recorder")) or 0) == first.token
    finally:
        client.close()
    for url in (required, cert_none):
        assert whereis(operator_app(redis_server, url), "recorder") == w1.node

    w2 = unverified.start("w2@%h").wait_ready()
    wait_for(lambda: "following" in w2.log(), 30, what="w2 follows")
    w1.sigterm()
    stopped_at = time.time()
    second = wait_for(
        lambda: [r for r in records.of("now_leader") if r.host == w2.node], 10, what="w2 leads"
    )[0]
    # Heard the release on its shard channel (over TLS), not the lease expiry.
    assert second.at - stopped_at < 1.0, f"handover took {second.at - stopped_at:.3f}s"
    assert second.token > first.token
    assert holders(tls_cluster, ["recorder"]) == {"recorder": w2.node}
    check_terms(records.events())


def test_killing_the_primary_of_a_stokers_slot_keeps_one_leader_and_growing_tokens(
    cluster_fleet: Callable[..., Fleet], cluster: RedisCluster, records: Records
) -> None:
    fleet = cluster_fleet(STOKER_TEST_TIMER="0.15")
    for i in (1, 2, 3):
        fleet.start(f"w{i}@%h")
    wait_for(lambda: records.of("now_leader"), 30, what="first leader")
    wait_for(lambda: len(records.of("timer")) >= 3, 30, what="timers")
    before = max(r.token for r in records.events())

    killed_at = time.time()
    dead, promoted = cluster.kill_primary_of(LEASE)
    ok_at = time.time()
    bound = NODE_TIMEOUT + TTL + RENEW + 1.0
    acted = wait_for(
        lambda: [r for r in records.events() if r.at >= ok_at], bound + 5, what="a leader acts"
    )[0]
    # Acted within the bound of the kill (not only of the promotion).
    gap = acted.at - killed_at
    assert gap <= bound, f"a leader acted {gap:.3f}s after the kill (bound {bound:.1f}s)"
    wait_for(lambda: len([r for r in records.events() if r.at >= ok_at]) >= 5, 10, what="more")
    events = records.events()
    check_terms(events)  # one host per term, no overlap, tokens grow
    assert all(r.token >= before for r in events if r.at >= killed_at)
    client = cluster.client()
    try:
        counter = int(client.get(token_key("stoker", "recorder")) or 0)
    finally:
        client.close()
    assert counter >= max(r.token for r in events)  # the promoted replica's counter
    assert cluster.slot_owner(slot_of(LEASE)) is promoted and not dead.is_running


def test_a_clean_stop_right_after_a_primary_failover_hands_over_at_once(
    cluster_fleet: Callable[..., Fleet], cluster: RedisCluster, records: Records
) -> None:
    """Once the primary of the Stoker's slot died and a leader acts again, the followers hear
    the next release: a SIGTERM of the leader hands over within 1 s, not at the lease
    expiry.  (Their listeners used to stay down for the rest of their own backoff, up to
    2 s, after the election had reached the promoted replica.)  Five rounds: whether a stop
    lands in that window depends on how the failover falls in the backoff's steps."""
    fleet = cluster_fleet(STOKER_TEST_TIMER="0.15")
    names = {fleet.start(f"w{i}@%h").wait_ready().node: f"w{i}@%h" for i in (1, 2, 3)}
    wait_for(lambda: records.of("now_leader"), 30, what="first leader")
    client = cluster.client(socket_timeout=0.5, socket_connect_timeout=0.5)

    def holder() -> Holder | None:
        try:
            raw = client.get(LEASE)
        except Exception:  # mid-failover: nobody known yet
            return None
        return Holder.parse(raw, None) if raw else None

    def acting(since: float) -> Holder | None:
        """The holder, once a timer of its term started after ``since``."""
        now = holder()
        if now is None or now.token is None:
            return None
        timers = records.of("timer")
        return now if any(r.token == now.token and r.started >= since for r in timers) else None

    try:
        gaps: list[float] = []
        for _round in range(5):
            settled = time.time()
            wait_for(lambda s=settled: acting(s), 30, what="a leader acts")
            dead, _promoted = cluster.kill_primary_of(LEASE)
            served_at = time.time()
            # The stop comes as soon as a leader acts again: the window a listener's own
            # backoff would leave it deaf in.  The dead node is revived after the handover.
            leader = wait_for(lambda s=served_at: acting(s), 20, what="a leader after the failover")
            assert leader.hostname is not None and leader.token is not None
            worker = fleet.by_node(leader.hostname)
            stopped_at = time.time()
            worker.sigterm()
            new = wait_for(
                lambda t=leader.token: [r for r in records.of("now_leader") if r.token > t],
                10,
                what="a leader after the clean stop",
            )[0]
            gaps.append(new.started - stopped_at)
            cluster.revive(dead)  # back as the promoted replica's replica, as in the bench
            worker.stop(20, sig=None)
            fleet.start(names[leader.hostname]).wait_ready()
        shown = ", ".join(f"{g:.3f}" for g in gaps)
        # Every stop within the bound, and typically the time to hear the release
        # (HERD_DELAY and a task), not a deaf follower's wait for its expiry (0.5 - 1.5 s).
        assert max(gaps) < 1.0, f"clean stops after a primary failover took {shown} s (bound 1 s)"
        assert statistics.median(gaps) < 0.5, f"clean stops waited for an expiry: {shown} s"
        check_terms(records.events())
    finally:
        client.close()


def test_moving_the_slot_while_it_leads_then_operate_it_from_the_cli(
    cluster_fleet: Callable[..., Fleet], cluster: RedisCluster, records: Records
) -> None:
    fleet = cluster_fleet(ttl=3.0, STOKER_TEST_TIMER="0.15")
    workers = [fleet.start(f"w{i}@%h") for i in (1, 2, 3)]
    first = wait_for(lambda: records.of("now_leader"), 30, what="first leader")[0]
    for w in workers:
        if w.node != first.host:
            wait_for(lambda w=w: "following" in w.log(), 30, what=f"{w.node} follows")
    wait_for(lambda: len(records.of("timer")) >= 3, 30, what="timers")

    owner = cluster.slot_owner(slot_of(LEASE))
    moved_at = time.time()
    cluster.move_slot(slot_of(LEASE), next(p for p in cluster.primaries() if p is not owner))
    wait_for(
        lambda: len([r for r in records.of("timer") if r.at > moved_at + 3.0]) >= 3,
        20,
        what="timers well after the move",
    )
    leaders = records.of("now_leader")
    assert len(leaders) <= 2, f"leadership moved more than once: {leaders}"  # kept, or once
    check_terms(records.events())

    # The operator's commands, through the real CLI, against the cluster.
    status = cli(fleet, "status")
    assert status.returncode == 0, status.stderr
    leader = leaders[-1].host
    assert leader in status.stdout
    target = next(w.node for w in workers if w.node != leader)
    out = cli(fleet, "handoff", "recorder", "--to", target)
    assert out.returncode == 0, out.stderr + out.stdout
    wait_for(lambda: records.of("now_leader")[-1].host == target, 10, what="handoff")

    out = cli(fleet, "drain", target)
    assert out.returncode == 0, out.stderr + out.stdout
    after = wait_for(
        lambda: (last := records.of("now_leader")[-1]).host != target and last,
        10,
        what="drained off the target",
    )
    assert f"draining: {target}" in cli(fleet, "status").stdout
    # The drained worker never leads again, and nobody else moves it: one more term only.
    wait_for(lambda: len([r for r in records.of("timer") if r.token == after.token]) >= 5, 10)
    assert records.of("now_leader")[-1].token == after.token
    out = cli(fleet, "undrain", target)
    assert out.returncode == 0 and "draining: (none)" in out.stdout
    check_terms(records.events())


def test_the_documented_cluster_acl_is_enough_and_a_missing_spublish_is_named(
    cluster: RedisCluster,
) -> None:
    """The docs' ACL line plus its cluster commands, on every node, runs leases, shard
    announcements and the CLI's token scan; without SPUBLISH the start-up probe names it
    (announcements are best effort, so nothing else would ever say so)."""
    from test_redis_requirements import docs_acl_line

    from celery_stoker import access

    line = docs_acl_line().replace("PASSWORD", "pw").split()
    for node in cluster.running:
        node.client().execute_command(*line, *(f"+{c}" for c in access.CLUSTER_COMMANDS))
    host, port = cluster.running[0].address
    url = f"redis://stoker:pw@{host}:{port}/0"
    client = redis_client(url, transport_options={"cluster": True}, socket_timeout=2.0)
    try:
        assert access.AccessCheck(client, "stoker").refused() == ()
        lease = RedisLease(client, "acl", holder_id="a", hostname="a@h", ttl=2.0)
        term = lease.acquire().term
        assert term is not None and lease.renew(term) and lease.release(term)
        assert [k for k in client.scan_iter(match=token_key("stoker", "*"))] == [
            token_key("stoker", "acl").encode()
        ]
        pubsub = client.pubsub()
        pubsub.ssubscribe(stoker_channel("stoker", "acl"))
        assert wait_for(lambda: pubsub.get_sharded_message(timeout=0.2), 5)["data"] == 1
        pubsub.close()

        for node in cluster.running:
            node.client().execute_command("ACL", "SETUSER", "stoker", "-spublish")
        assert access.AccessCheck(client, "stoker").refused() == ("spublish",)
    finally:
        client.close()


def test_a_cluster_node_without_the_cluster_option_is_refused_saying_the_fix(
    fleets: Callable[..., Fleet], cluster: RedisCluster, records: Records
) -> None:
    """``stoker_url`` names a cluster node but ``cluster`` is not set: the worker elects
    nothing and says what to set (instead of Stokers whose slot lives elsewhere failing
    with MOVED), and ``celery stoker status`` exits with the same fix on one line."""
    owner = cluster.slot_owner(slot_of(LEASE))
    elsewhere = next(p for p in cluster.primaries() if p is not owner)
    fleet = fleets("solo", STOKER_TEST_URL=f"redis://127.0.0.1:{elsewhere.port}/0")
    worker = fleet.start("plain@%h").wait_ready()
    wait_for(
        lambda: "names a node of a Redis Cluster" in worker.log(), 30, what="the start-up error"
    )
    out = cli(fleet, "status")
    assert out.returncode == 1, out.stdout
    assert 'set stoker_transport_options = {"cluster": True}' in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr
    assert not records.of("now_leader"), "nothing is elected on a misconfigured worker"
    assert worker.log().count("names a node of a Redis Cluster") == 1, "said once"
