"""Operations with real workers: handoff, drain, eligibility, cluster limits, visibility."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from typing import Any

import pytest
from celery import Celery
from support.workers import ROOT, Fleet, Records, check_terms

from celery_stoker import StokerOperationError, drain, handoff
from celery_stoker.testing import RedisServer, wait_for

pytestmark = pytest.mark.workers

APP = "tests.apps.recorder"
#: Longer than the suite's default: handoffs and drains must not race an expiry.
TTL = 4.0


def client_app(redis_server: RedisServer) -> Celery:
    """An operator's process: any app on the same broker (the Stoker need not be imported)."""
    return Celery("operator", broker=redis_server.url_for(0))


def cli(fleet: Fleet, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**fleet.env, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "celery", "-A", APP, "stoker", *args],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def wait_followers(fleet: Fleet, *nodes: str) -> None:
    for node in nodes:
        wait_for(lambda n=node: "following" in fleet.by_node(n).log(), 30, what=f"{node} follows")


def test_handoff_to_a_named_worker(fleets: Any, records: Records) -> None:
    fleet = fleets(ttl=TTL)
    w1 = fleet.start("w1@%h")
    first = wait_for(lambda: records.of("now_leader"), 30, what="w1 leads")[0]
    w2, w3 = fleet.start("w2@%h"), fleet.start("w3@%h")
    wait_followers(fleet, w2.node, w3.node)

    out = cli(fleet, "handoff", "recorder", "--to", w3.node)
    assert out.returncode == 0, out.stderr
    assert f"{w1.node} -> {w3.node}" in out.stdout
    second = wait_for(
        lambda: [r for r in records.of("now_leader") if r.host == w3.node], 10, what="w3 leads"
    )[0]
    shutdown = [r for r in records.of("shutdown") if r.token == first.token]
    assert [s.reason for s in shutdown] == ["handoff"]
    assert second.token > first.token
    # A reserved handover, not an expiry: well under the 4 s TTL.
    assert second.started - shutdown[0].at < 1.0
    assert not [r for r in records.of("now_leader") if r.host == w2.node]
    check_terms(records.events())


def test_handoff_to_anyone_moves_away_from_the_leader(
    fleets: Any, records: Records, redis_server: RedisServer
) -> None:
    fleet = fleets(ttl=TTL)
    w1 = fleet.start("w1@%h")
    wait_for(lambda: records.of("now_leader"), 30, what="w1 leads")
    w2 = fleet.start("w2@%h")
    wait_followers(fleet, w2.node)
    result = handoff(client_app(redis_server), "recorder")
    assert (result["from"], result["to"]) == (w1.node, w2.node)
    assert result["seconds"] < 1.0
    wait_for(
        lambda: [r for r in records.of("now_leader") if r.host == w2.node],
        10,
        what="w2's now_leader",
    )


def test_handoff_to_a_worker_that_is_not_alive_changes_nothing(
    fleets: Any, records: Records, redis_server: RedisServer
) -> None:
    fleet = fleets(ttl=TTL)
    w1 = fleet.start("w1@%h")
    first = wait_for(lambda: records.of("now_leader"), 30, what="w1 leads")[0]
    out = cli(fleet, "handoff", "recorder", "--to", "ghost@nowhere")
    assert out.returncode != 0
    assert "ghost@nowhere did not answer as a worker running Stoker 'recorder'" in out.stderr
    with pytest.raises(StokerOperationError, match="already leads"):
        handoff(client_app(redis_server), "recorder", to=w1.node)
    assert redis_server.client().get("stoker:{recorder}:handoff") is None
    assert [r.token for r in records.of("now_leader")] == [first.token]
    assert not records.of("shutdown")


def test_drain_moves_leadership_once_and_never_back(
    fleets: Any, records: Records, redis_server: RedisServer
) -> None:
    """A rolling deploy: old w1, w2; new w3, w4; drain the old ones, then stop them.

    A clean stop takes the drained worker out of the draining set: kept, the mark
    made a pod drained in its ``preStop`` hook come back under the same name (a
    StatefulSet) unable to lead, and grew the set by one name per fresh pod name.
    """
    fleet = fleets(ttl=TTL, STOKER_TEST_TIMER="0.3")
    w1 = fleet.start("w1@%h")
    wait_for(lambda: records.of("now_leader"), 30, what="w1 leads")
    w2, w3, w4 = (fleet.start(f"w{i}@%h") for i in (2, 3, 4))
    wait_followers(fleet, w2.node, w3.node, w4.node)

    out = cli(fleet, "drain", w1.node, w2.node)
    assert out.returncode == 0, out.stderr
    second = wait_for(lambda: records.of("now_leader")[1:], 10, what="the move")[0]
    assert second.host in (w3.node, w4.node)
    assert [r.reason for r in records.of("shutdown")] == ["drain"]
    status = cli(fleet, "status")
    assert f"draining: {w1.node}, {w2.node}" in status.stdout
    assert "stepped_down" in status.stdout and "drain" in status.stdout

    for old in (w1, w2):
        old.sigterm()
        old.wait_exit(30)
    client = redis_server.client()
    assert not client.smembers("stoker:draining")
    assert not client.smembers("stoker:{recorder}:draining")  # the Stoker's own copy
    assert f"{w1.node} leaves the draining set as it stops" in w1.log()
    # Several timers later on the same term: nobody else ever led.
    seen = len(records.of("timer"))
    wait_for(lambda: len(records.of("timer")) >= seen + 5, 30, what="more timers")
    assert [r.host for r in records.of("now_leader")] == [w1.node, second.host]
    check_terms(records.events())

    out = cli(fleet, "undrain", w1.node, w2.node)
    assert out.returncode == 0 and "draining: (none)" in out.stdout


def test_drain_from_an_operators_bare_app_moves_and_says_so(
    fleets: Any, records: Records, redis_server: RedisServer
) -> None:
    """An app that registers no Stokers finds them in Redis to mark; it moves them too.

    It marked every Stoker it found by its token key but poked and waited only for
    the app's own (none): it said ``moved: {}`` while the leader moved at its next
    renewal.
    """
    fleet = fleets(ttl=TTL, STOKER_TEST_TIMER="0.3")
    w1 = fleet.start("w1@%h")
    wait_for(lambda: records.of("now_leader"), 30, what="w1 leads")
    w2 = fleet.start("w2@%h")
    wait_followers(fleet, w2.node)
    result = drain(client_app(redis_server), [w1.node])
    assert result["moved"] == {"recorder": {"from": w1.node, "to": w2.node}}, result
    wait_for(lambda: records.of("now_leader")[-1].host == w2.node, 10, what="w2 leads")
    check_terms(records.events())


def test_worker_started_draining_never_leads_until_undrained(fleets: Any, records: Records) -> None:
    fleet = fleets(ttl=1.5)
    w1 = fleet.start("w1@%h", extra_args=["--stoker-drain"])
    wait_for(lambda: "is draining: it will not lead" in w1.log(), 30, what="w1 draining")
    assert not records.of("now_leader")
    out = cli(fleet, "undrain", w1.node)
    assert out.returncode == 0, out.stderr
    wait_for(lambda: records.of("now_leader"), 10, what="w1 leads once undrained")


def test_ineligible_worker_never_leads_even_when_alone(
    fleets: Any, records: Records, redis_server: RedisServer
) -> None:
    fleet = fleets(ttl=1.5, STOKER_TEST_ELIGIBLE="w2@*")
    w1 = fleet.start("w1@%h")
    wait_for(lambda: "may not lead it" in w1.log(), 30, what="w1 knows it is ineligible")
    w2 = fleet.start("w2@%h")
    wait_for(lambda: records.of("now_leader"), 30, what="w2 leads")
    assert records.of("now_leader")[0].host == w2.node
    w2.sigkill()
    client = redis_server.client()
    wait_for(lambda: client.get("stoker:{recorder}:lease") is None, 10, what="the lease ends")
    free_since = time.monotonic()
    # The lease stays free for three TTLs with only the ineligible worker left.
    wait_for(
        lambda: (
            client.get("stoker:{recorder}:lease") is not None or time.monotonic() - free_since > 4.5
        ),
        10,
        what="three TTLs to pass",
    )
    assert client.get("stoker:{recorder}:lease") is None
    assert [r.host for r in records.of("now_leader")] == [w2.node]
    out = cli(fleet, "status")
    assert w1.node in out.stdout.splitlines()[2]  # the INELIGIBLE column of the recorder row


def test_eligibility_by_queue(fleets: Any, records: Records) -> None:
    fleet = fleets(ttl=TTL, STOKER_TEST_ELIGIBLE="queue:critical")
    w1 = fleet.start("w1@%h")
    wait_for(lambda: "may not lead it" in w1.log(), 30, what="w1 (default queue) is ineligible")
    w2 = fleet.start("w2@%h", extra_args=["-Q", "celery,critical"])
    leader = wait_for(lambda: records.of("now_leader"), 30, what="w2 leads")[0]
    assert leader.host == w2.node


def test_min_members_steps_down_and_back(fleets: Any, records: Records) -> None:
    fleet = fleets(ttl=2.0, STOKER_TEST_MIN_MEMBERS="2", STOKER_TEST_TIMER="0.3")
    w1 = fleet.start("w1@%h")
    wait_for(lambda: "sees 1 of the 2 workers it needs" in w1.log(), 30, what="suspended")
    assert not records.of("now_leader")
    w2 = fleet.start("w2@%h")
    first = wait_for(lambda: records.of("now_leader"), 30, what="acting with 2 members")[0]
    assert first.host == w1.node and set(first.members) == {w1.node, w2.node}
    w2.sigkill()
    down = wait_for(
        lambda: [r for r in records.of("shutdown") if r.reason == "below_min_members"],
        40,
        what="shutdown(below_min_members) when w2 is lost",
    )[0]
    assert down.token == first.token
    fleet.workers.remove(w2)
    fleet.start("w2@%h")
    again = wait_for(lambda: records.of("now_leader")[1:], 40, what="now_leader again")[0]
    assert again.host == w1.node and again.token == first.token, "the same term resumes"
    assert not [r for r in records.of("timer") if down.at < r.at < again.started]


def test_transitions_are_sent_as_celery_events(
    fleets: Any, records: Records, redis_server: RedisServer
) -> None:
    received: list[dict[str, Any]] = []
    app = Celery("watcher", broker=redis_server.url_for(0))
    ready = threading.Event()

    receivers: list[Any] = []

    def capture() -> None:
        with app.connection_for_read() as conn:
            receiver = app.events.Receiver(conn, handlers={"*": received.append})
            receivers.append(receiver)
            ready.set()
            receiver.capture(limit=None, timeout=None, wakeup=False)

    thread = threading.Thread(target=capture, name="test-event-capture", daemon=True)
    thread.start()
    try:
        assert ready.wait(10)
        fleet = fleets(ttl=TTL)
        w1 = fleet.start("w1@%h")
        wait_for(lambda: records.of("now_leader"), 30, what="w1 leads")
        w2 = fleet.start("w2@%h")
        wait_followers(fleet, w2.node)
        w1.sigterm()
        wait_for(
            lambda: [r for r in records.of("now_leader") if r.host == w2.node], 10, what="w2 leads"
        )

        def stoker_events() -> list[tuple[str, str]]:
            return [
                (e["type"], e["hostname"])
                for e in received
                if e.get("type", "").startswith("stoker-")
            ]

        wait_for(
            lambda: ("stoker-elected", w2.node) in stoker_events(),
            10,
            what="w2's stoker-elected event",
        )
        events = stoker_events()
        assert ("stoker-elected", w1.node) in events
        assert ("stoker-stepped-down", w1.node) in events
        down = next(e for e in received if e.get("type") == "stoker-stepped-down")
        assert (down["name"], down["reason"]) == ("recorder", "worker_stopping")
    finally:
        for receiver in receivers:
            receiver.should_stop = True
        thread.join(5)
