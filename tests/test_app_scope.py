"""Two apps on one broker keep to their own workers (key prefixes and app names separate them).

Real workers of two small apps (tests/apps/tenant_a.py, tenant_b.py) share one
broker; each app has a Stoker named ``shared``.  With different key prefixes,
each app's Stoker sees only its own workers (``members``, ``cluster_change``),
and ``status --json`` lists only the app's own workers.  With the same prefix,
the two Stokers share one lease: the worker that finds the other app holding
it says so, once.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

import pytest
import redis
from celery import Celery
from support.workers import Fleet, status_views

from celery_stoker import Stoker
from celery_stoker.activator import Activator
from celery_stoker.delivery import EventDelivery
from celery_stoker.lease import Holder
from celery_stoker.membership import Membership, Scope
from celery_stoker.pump import EventPump
from celery_stoker.registry import StokerSpec
from celery_stoker.settings import StokerSettings
from celery_stoker.testing import RedisServer, wait_for

A, B = "tests.apps.tenant_a", "tests.apps.tenant_b"


def events(record_redis: RedisServer, app: str) -> list[dict[str, Any]]:
    raw = record_redis.client().lrange(f"rec:{app}:event", 0, -1)
    return [json.loads(line) for line in raw]


@pytest.mark.workers
def test_apps_with_their_own_prefixes_see_only_their_own_workers(
    fleets: Callable[..., Fleet], record_redis: RedisServer
) -> None:
    fleet_a = fleets(app=A, STOKER_TEST_PREFIX="pa")
    fleet_b = fleets(app=B, STOKER_TEST_PREFIX="pb")
    a1 = fleet_a.start("a1@%h")
    wait_for(lambda: events(record_redis, "tenant_a"), 30, what="a1 leads app A")
    b1 = fleet_b.start("b1@%h")
    wait_for(lambda: events(record_redis, "tenant_b"), 30, what="b1 leads app B")
    b2 = fleet_b.start("b2@%h")

    def joined(app: str, node: str) -> bool:
        return any(
            e["event"] == "cluster_change" and e["reason"]["node"] == node
            for e in events(record_redis, app)
        )

    wait_for(lambda: joined("tenant_b", b2.node), 30, what="app B hears b2 join")
    a2 = fleet_a.start("a2@%h")
    # a1 hears the broker's worker events in order: b1's and b2's came before a2's, so
    # once app A heard a2 join, any cluster_change for b1 or b2 would be recorded already.
    wait_for(lambda: joined("tenant_a", a2.node), 30, what="app A hears a2 join")

    ours = {"tenant_a": {a1.node, a2.node}, "tenant_b": {b1.node, b2.node}}
    for app, nodes in ours.items():
        seen = events(record_redis, app)
        changed = {e["reason"]["node"] for e in seen if e["event"] == "cluster_change"}
        assert changed <= nodes, (app, changed)
        for e in seen:
            assert set(e["members"]) <= nodes, (app, e)
    last_a = events(record_redis, "tenant_a")[-1]
    assert set(last_a["members"]) == ours["tenant_a"]

    def both_a_answer() -> list[dict[str, Any]] | None:
        views = status_views(fleet_a.app, fleet_a.env)
        return views if views and len(views[0]["workers"]) >= 2 else None

    (view,) = wait_for(both_a_answer, 30, interval=0.5, what="a1 and a2 answer status")
    assert view["leader"] == a1.node
    assert set(view["workers"]) == ours["tenant_a"]
    assert view["workers"][a1.node]["state"] == "leader"
    assert view["workers"][a2.node]["key_prefix"] == "pa"
    assert set(view["followers"]) == {a2.node}


@pytest.mark.workers
def test_a_lease_held_by_another_app_is_reported_in_the_worker_log(
    fleets: Callable[..., Fleet],
) -> None:
    fleet_a = fleets(app=A)  # both apps under the default prefix, both Stokers "shared"
    fleet_b = fleets(app=B)
    a1 = fleet_a.start("a1@%h")
    wait_for(lambda: "became leader" in a1.log(), 30, what="a1 leads")
    b1 = fleet_b.start("b1@%h")
    warning = other_app(a1.node, holding="tenant_a", mine="tenant_b")
    wait_for(lambda: warning in b1.log(), 30, what="b1 warns that app A holds the lease")
    lines = [line for line in b1.log().splitlines() if "a worker of app" in line]
    assert len(lines) == 1, lines
    assert "WARNING" in lines[0] and "stoker_key_prefix" in lines[0]
    assert "stoker:{shared}:lease" in lines[0]
    assert "a worker of app" not in a1.log()


def test_the_warning_is_said_once_however_often_the_follower_looks(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Bare activators (no listener: the follower looks again at every expiry it saw)."""
    settings = StokerSettings(url=redis_server.url, lease_ttl=0.4, renew_interval=0.1)
    made = []
    for main, node in (("tenant_a", "a1@h"), ("tenant_b", "b1@h")):
        app = Celery(main, broker=redis_server.url, set_as_current=False)
        activator = Activator(
            app,
            StokerSpec("shared", Quiet),
            settings,
            hostname=node,
            delivery=EventDelivery(app, None, f"stoker.{node}"),
            listener=None,
            members=lambda node=node: frozenset({node}),
            holder_id=node,
            pump=EventPump(node),  # not started: this test is about the election alone
        )
        made.append(activator)
    leader, follower = made
    looks = []
    acquire = follower.lease.acquire
    follower.lease.acquire = lambda *a, **k: looks.append(1) or acquire(*a, **k)  # type: ignore[method-assign]
    caplog.set_level(logging.WARNING, logger="celery_stoker.election")
    leader.start()
    try:
        wait_for(lambda: leader.election.state == "leader", 10, what="a1 leads")
        follower.start()
        wait_for(lambda: len(looks) >= 5, 10, what="b1 looks at the lease five times")
        assert follower.election.state == "follower" and follower.election.leader == "a1@h"
    finally:
        follower.stop(5)
        leader.stop(5)
    said = [r.getMessage() for r in caplog.records if "a worker of app" in r.getMessage()]
    assert said == [
        "Stoker shared: its lease stoker:{shared}:lease is held by a1@h, a worker of app "
        "tenant_a, not of this app tenant_b: two apps whose Stokers share a name and "
        "stoker_key_prefix share one lease, so only one of them runs; give each app its own "
        "stoker_key_prefix (or its Stoker another name)"
    ]


class Quiet(Stoker):
    def event(self, state: Any, event: str, reason: Any) -> Any:
        return state


def other_app(holder: str, *, holding: str, mine: str) -> str:
    return f"held by {holder}, a worker of app {holding}, not of this app {mine}"


def test_a_lease_value_names_its_app_and_older_values_still_read() -> None:
    new = b'{"v":1,"token":42,"since":1700000000123,"holder":"id-1","host":"w1@h","app":"proj"}'
    old = b'{"v":1,"token":42,"since":1700000000123,"holder":"id-1","host":"w1@h"}'
    assert Holder.parse(new, 1000).app == "proj"
    before = Holder.parse(old, 1000)
    assert (before.hostname, before.token, before.app, before.foreign) == ("w1@h", 42, None, False)


def test_the_lease_a_worker_takes_names_its_app(fresh_redis_url: str) -> None:
    from celery_stoker.lease import RedisLease

    client = redis.Redis.from_url(fresh_redis_url)
    lease = RedisLease(client, "x", holder_id="h", hostname="w1@h", ttl=5, app="proj")
    taken = lease.acquire()
    assert taken.term is not None and taken.holder is not None
    assert taken.holder.app == "proj"
    other = RedisLease(client, "x", holder_id="h2", hostname="w2@h", ttl=5, app="other")
    seen = other.acquire()
    assert seen.term is None and seen.holder is not None and seen.holder.app == "proj"


def test_membership_counts_only_this_apps_workers_under_the_same_prefix() -> None:
    heard: dict[str, list[tuple[str, str]]] = {"pa": [], "pb": []}
    m = Membership("w1@h", "proj", {"pa", "pb"})
    for prefix, calls in heard.items():
        m.subscribe(lambda node, change, calls=calls: calls.append((node, change)), prefix)
    m.change("w2@h", "joined", Scope("proj", frozenset({"pa"})))
    m.change("x1@h", "joined", Scope("other", frozenset({"pa", "pb"})))
    m.change("old@h", "joined", None)  # a worker that announces nothing
    assert m.members("pa") == {"w1@h", "w2@h"}
    assert m.members("pb") == {"w1@h"}
    assert m.members() == {"w1@h", "w2@h"}
    m.change("x1@h", "lost")
    m.change("w2@h", "left")
    assert heard == {"pa": [("w2@h", "joined"), ("w2@h", "left")], "pb": []}
