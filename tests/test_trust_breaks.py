"""Dispatch messages the gate of tests/test_trust.py must also stop, found by breaking it.

Each test runs real workers on a real Redis and sends copies of a real event's
message (its task id and arguments, recorded by the callback as it arrived)
the way someone who can publish to the broker could.
"""

from __future__ import annotations

import datetime
import itertools
from collections.abc import Callable
from typing import Any

import pytest
from celery import Celery
from support.metrics import refused
from support.workers import Fleet, Record, Records, check_terms, running_request

from celery_stoker.outcome import DISPATCH_TASK
from celery_stoker.testing import RedisServer, WorkerProcess, free_port, wait_for

pytestmark = pytest.mark.workers
prometheus_client = pytest.importorskip("prometheus_client")

#: A callback long enough to send a copy of its message while it runs.
EVENT_SECONDS = 1.0


def _no_overlap(events: list[Record]) -> None:
    """No two callbacks of the Stoker ran at the same time (one event at a time)."""
    ordered = sorted(events, key=lambda r: r.started)
    for before, after in itertools.pairwise(ordered):
        assert after.started >= before.at, (
            f"{after.event} (term {after.token}) started at {after.started:.3f} while "
            f"{before.event} (term {before.token}) ran until {before.at:.3f}"
        )


def _intruder(redis_server: RedisServer) -> Callable[..., None]:
    client = Celery("intruder", broker=redis_server.url_for(0))

    def send(request: dict[str, Any], to: WorkerProcess, **kw: Any) -> None:
        client.send_task(
            DISPATCH_TASK,
            args=kw.pop("args", request["args"]),
            task_id=kw.pop("task_id", request["id"]),
            queue=kw.pop("queue", f"stoker.{to.node}"),
            **kw,
        )

    return send


@pytest.mark.parametrize("pool", ["prefork", "threads"])
def test_an_expired_copy_of_the_running_event_does_not_end_it(
    fleets: Callable[..., Fleet], redis_server: RedisServer, records: Records, pool: str
) -> None:
    """Celery discards an expired message itself, before the gate: by its id.

    Its bookkeeping (``task_ready``) drops the entry of that id from the
    worker's table of requests, which is the running original's.  The pump's
    watchdog must not take the running event for finished (and send the next
    one beside it).
    """
    fleet = fleets(
        pool,
        ttl=3.0,
        STOKER_TEST_TIMER="0.2",
        STOKER_TEST_EVENT_SLEEP=str(EVENT_SECONDS),
        STOKER_TEST_RECORD_REQUESTS="1",
    )
    w1 = fleet.start("w1@%h")
    wait_for(lambda: records.of("now_leader"), 30, what="w1 leads")
    send = _intruder(redis_server)
    running = running_request(records)
    past = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(minutes=5)
    send(running, w1, expires=past)
    wait_for(
        lambda: "refused a dispatch message" in w1.log() or "Discarding revoked" in w1.log(),
        20,
        what="w1 discards the copy",
    )
    seen = len(records.raw("event"))
    wait_for(lambda: len(records.raw("event")) >= seen + 3, 20, what="three more events")
    events = records.events()
    _no_overlap(events)
    check_terms(events)
    ran = [r["task_id"] for r in records.raw("event")]
    assert len(ran) == len(set(ran)), "a dispatch message ran twice"
    assert "its report never arrived" not in w1.log(), w1.log()


#: Pools, serializers and worker options under which no event of the leader may be
#: refused: a legit event refused stalls its Stoker.
LEGIT_RUNS = {
    "solo": ("solo", {}, ()),
    "threads": ("threads", {}, ()),
    "eventlet": ("eventlet", {}, ()),
    "prefork-pickle": (
        "prefork",
        {"STOKER_TEST_TASK_SERIALIZER": "pickle", "C_FORCE_ROOT": "1"},
        (),
    ),
    "gevent-yaml": ("gevent", {"STOKER_TEST_TASK_SERIALIZER": "yaml"}, ()),
    "prefork-msgpack": ("prefork", {"STOKER_TEST_TASK_SERIALIZER": "msgpack"}, ()),
    "prefork-one-task-per-child": ("prefork", {}, ("--max-tasks-per-child", "1")),
    "threads-unicode-name": ("threads", {"STOKER_TEST_STOKER_NAME": "chaudière-☃"}, ()),
}


@pytest.mark.parametrize("run", list(LEGIT_RUNS))
def test_the_leaders_own_events_are_neverrefused(
    fleets: Callable[..., Fleet], records: Records, run: str
) -> None:
    """Elect, hear a worker join (a dict reason), run timers, hand over: nothing refused."""
    pool, env, extra = LEGIT_RUNS[run]
    if env.get("STOKER_TEST_TASK_SERIALIZER") == "msgpack":
        pytest.importorskip("msgpack")
    fleet = fleets(pool, STOKER_TEST_TIMER="0.2", **env)
    w1 = fleet.start("w1@%h", extra_args=extra)
    wait_for(lambda: records.of("now_leader"), 30, what="w1 leads")
    w2 = fleet.start("w2@%h", extra_args=extra)
    wait_for(
        lambda: [
            r
            for r in records.of("cluster_change")
            if r.reason == {"node": w2.node, "change": "joined"}
        ],
        30,
        what="w1 hears w2 join",
    )
    wait_for(lambda: len(records.of("timer")) >= 5, 20, what="timer events")
    w1.stop()
    wait_for(
        lambda: len([r for r in records.of("timer") if r.host == w2.node]) >= 5,
        30,
        what="w2 leads and runs timers",
    )
    for worker in (w1, w2):
        log = worker.log()
        assert "refused a dispatch message" not in log, log
        assert "not admitted by this worker's event pump" not in log, log
        assert "did not finish" not in log, log
    check_terms(records.events())


def _reserved_event(client: Celery, node: str, ran: set[str]) -> dict[str, Any] | None:
    """The dispatch request ``node`` holds for a busy pool, as ``inspect reserved`` shows it."""
    replies = client.control.inspect([node], timeout=2).reserved() or {}
    for request in replies.get(node) or []:
        if request.get("name") == DISPATCH_TASK and request["id"] not in ran:
            return request
    return None


@pytest.mark.parametrize("pool", ["prefork", "gevent"])
def test_copies_of_an_event_waiting_for_a_busy_pool_do_not_displace_it(
    fleets: Callable[..., Fleet], redis_server: RedisServer, records: Records, pool: str
) -> None:
    """The pool's one slot is busy; the event waits; copies of it arrive meanwhile.

    An identical copy, an altered one (same task id, another reason), one with a
    countdown and one already expired.  The waiting event still runs, once, as
    sent; the pump neither resends it nor takes it for dropped; every copy is
    refused.
    """
    port = free_port()
    fleet = fleets(pool, ttl=3.0, STOKER_TEST_TIMER="0.2", STOKER_TEST_RECORD_REQUESTS="1")
    w1 = fleet.start("w1@%h", concurrency=1, env={"STOKER_TEST_METRICS_PORT": str(port)})
    wait_for(lambda: len(records.of("timer")) >= 2, 30, what="w1 leads and runs timers")
    client = Celery("intruder", broker=redis_server.url_for(0))
    client.send_task("recorder.block", args=["unblock", 60], queue=f"stoker.{w1.node}")
    wait_for(lambda: records.raw("blocking"), 20, what="the pool's slot is taken")
    ran = {r["task_id"] for r in records.raw("event")}
    waiting = wait_for(
        lambda: _reserved_event(client, w1.node, ran), 20, what="an event waits for the pool"
    )
    send = _intruder(redis_server)
    args = list(waiting["args"])
    assert len(args) == 7, waiting
    send(waiting, w1, args=args)
    send(waiting, w1, args=[*args[:4], {"forged": True}, *args[5:]])
    send(waiting, w1, args=args, countdown=2)
    past = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(minutes=5)
    send(waiting, w1, args=args, expires=past)
    wait_for(lambda: sum(refused(port).values()) >= 3, 20, what="w1 refuses the copies")
    records.client.rpush("unblock", 1)
    wait_for(
        lambda: waiting["id"] in {r["task_id"] for r in records.raw("event")},
        20,
        what="the waiting event runs",
    )
    seen = len(records.raw("event"))
    wait_for(lambda: len(records.raw("event")) >= seen + 3, 20, what="three more events")
    wait_for(lambda: sum(refused(port).values()) >= 4, 20, what="the countdown copy refused")
    runs = [r for r in records.raw("event") if r["task_id"] == waiting["id"]]
    assert len(runs) == 1, runs
    assert runs[0]["reason"] is None
    ran_ids = [r["task_id"] for r in records.raw("event")]
    assert len(ran_ids) == len(set(ran_ids)), "a dispatch message ran twice"
    log = w1.log()
    assert "did not finish" not in log, log
    assert "report never arrived" not in log, log
    events = records.events()
    _no_overlap(events)
    check_terms(events)


def test_copies_queued_across_a_change_of_term_run_nothing(
    fleets: Callable[..., Fleet], redis_server: RedisServer, records: Records
) -> None:
    """Copies of the leader's running event, held back by a countdown past a handover.

    Sent to the leader (which stops: its unacknowledged copy goes back to its queue
    and comes again when it restarts, a follower now), to the follower (the leader
    by the time the copy's countdown ends) and to a worker of the app that runs no
    StokerStep.  None runs a callback; each worker with a pump says so once.
    """
    ports = {"w1": free_port(), "w2": free_port()}
    fleet = fleets(
        "prefork",
        ttl=3.0,
        STOKER_TEST_TIMER="0.2",
        STOKER_TEST_EVENT_SLEEP="0.5",
        STOKER_TEST_RECORD_REQUESTS="1",
    )
    w1 = fleet.start("w1@%h", env={"STOKER_TEST_METRICS_PORT": str(ports["w1"])})
    wait_for(lambda: records.of("now_leader"), 30, what="w1 leads")
    w2 = fleet.start("w2@%h", env={"STOKER_TEST_METRICS_PORT": str(ports["w2"])})
    bare = fleet.start("bare@%h", env={"STOKER_TEST_NO_STEP": "1"}, extra_args=("-Q", "bare"))
    bare.wait_ready(30)
    wait_for(lambda: "following" in w2.log(), 30, what="w2 follows")
    send = _intruder(redis_server)
    running = running_request(records)
    send(running, w1, countdown=4)
    send(running, w2, countdown=4)
    for n in range(3):
        send(running, bare, task_id=f"bare-{n}", queue="bare")
    w1.stop()
    wait_for(
        lambda: [r for r in records.of("now_leader") if r.host == w2.node], 30, what="w2 leads"
    )
    wait_for(lambda: sum(refused(ports["w2"]).values()) >= 1, 20, what="w2 refuses its copy")
    w1 = fleet.start("w1@%h", env={"STOKER_TEST_METRICS_PORT": str(ports["w1"])})
    wait_for(lambda: "following" in w1.log(current=True), 30, what="w1 follows")
    wait_for(
        lambda: refused(ports["w1"]).get("not_in_flight", 0) >= 1,
        20,
        what="the restarted w1 refuses the copy it had held",
    )
    wait_for(
        lambda: all(f"bare-{n}" in bare.log() for n in range(3)),
        20,
        what="the worker without StokerStep receives its copies",
    )
    seen = len(records.raw("event"))
    wait_for(lambda: len(records.raw("event")) >= seen + 3, 20, what="w2's events go on")
    runs = [r["task_id"] for r in records.raw("event")]
    assert runs.count(running["id"]) == 1
    assert not [r for r in runs if r and r.startswith("bare-")]
    # (Without StokerStep the app has no dispatch task: Celery discards the messages.)
    assert bare.log().count("this worker runs no Stoker pump") <= 1, bare.log()
    assert w2.log().count("refused a dispatch message") == 1, w2.log()
    events = records.events()
    _no_overlap(events)
    check_terms(events)
