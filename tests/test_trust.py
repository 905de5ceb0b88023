"""Only the leader's own pump makes a callback run (DESIGN's trust promise 11).

Anyone who can publish to the broker can send a ``celery_stoker.dispatch``
message, and a term's token is no secret (events and ``inspect`` show it).  The
tests copy a real event's message (its task id and arguments, recorded by the
callback as it arrived) and send it through the broker to a follower, to the
leader while that very event runs, and to the leader again after it ended; they
also send an event name the pump never sends.  None of them may run a callback;
each is counted in ``stoker_events_refused_total``, and the leader's own events
go on.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import pytest
from celery import Celery
from support.metrics import refused
from support.workers import Fleet, Records, check_terms, running_request

from celery_stoker import Stoker, stoker
from celery_stoker.dispatch import register_dispatch_task
from celery_stoker.outcome import DISPATCH_TASK
from celery_stoker.testing import RedisServer, free_port, wait_for

pytestmark = pytest.mark.workers
prometheus_client = pytest.importorskip("prometheus_client")

#: A callback long enough to send a copy of its message while it runs.
EVENT_SECONDS = 1.5


@pytest.mark.parametrize("pool", ["prefork", "gevent"])
def test_only_the_event_in_flight_runs_a_callback(
    fleets: Callable[..., Fleet], redis_server: RedisServer, records: Records, pool: str
) -> None:
    ports = {"w1": free_port(), "w2": free_port()}
    fleet = fleets(
        pool,
        ttl=5.0,  # no term change on a loaded machine: the test counts one WARNING per term
        STOKER_TEST_TIMER="0.2",
        STOKER_TEST_EVENT_SLEEP=str(EVENT_SECONDS),
        STOKER_TEST_RECORD_REQUESTS="1",
    )
    w1 = fleet.start("w1@%h", env={"STOKER_TEST_METRICS_PORT": str(ports["w1"])})
    wait_for(lambda: records.of("now_leader"), 30, what="w1 leads")
    w2 = fleet.start("w2@%h", env={"STOKER_TEST_METRICS_PORT": str(ports["w2"])})
    wait_for(
        lambda: any(w2.node in r.members for r in records.of("cluster_change")),
        30,
        what="w1 sees w2 join",
    )
    client = Celery("intruder", broker=redis_server.url_for(0))

    def send(request: dict[str, Any], to: str, *, task_id: str | None = None, **kw: Any) -> None:
        client.send_task(
            DISPATCH_TASK,
            args=request["args"],
            task_id=task_id or request["id"],
            queue=f"stoker.{to}",
            **kw,
        )

    # 1. A copy of the running event, to the leader while it runs (no expiry: the
    # gate runs when the pool would get it), and to the follower (with an expiry:
    # the gate runs as the worker receives it).
    running = running_request(records, 0)
    send(running, w1.node)
    send(running, w2.node, expires=3600)
    wait_for(lambda: refused(ports["w1"]).get("copy", 0) >= 1, 20, what="w1 refuses the copy")
    wait_for(
        lambda: refused(ports["w2"]).get("not_in_flight", 0) >= 1,
        20,
        what="w2 refuses the message",
    )
    # 2. The same message once its event is over, and an event name the pump never sends.
    wait_for(
        lambda: running["id"] in {r["task_id"] for r in records.raw("event")},
        20,
        what="the copied event ends",
    )
    send(running, w1.node)
    forged = dict(running, args=[*running["args"][:3], "forged", *running["args"][4:]])
    send(forged, w1.node, task_id="forged-event")
    wait_for(
        lambda: (
            refused(ports["w1"]).get("unknown_event", 0) >= 1
            and refused(ports["w1"]).get("not_in_flight", 0)
            + refused(ports["w1"]).get("not_sent_here", 0)
            >= 1
        ),
        20,
        what="w1 refuses the replay and the forged name",
    )
    # 3. The leader's own events go on, each message ran once, and only on w1.
    seen = len(records.raw("event"))
    wait_for(lambda: len(records.raw("event")) >= seen + 2, 20, what="two more events")
    ran = [r["task_id"] for r in records.raw("event")]
    assert len(ran) == len(set(ran)), "a dispatch message ran twice"
    assert "forged-event" not in ran
    assert {r.host for r in records.events()} == {w1.node}
    check_terms(records.events())
    # One WARNING per term and Stoker on each worker, naming where the message came from.
    assert w1.log().count("refused a dispatch message") == 1, w1.log()
    assert w2.log().count("refused a dispatch message") == 1, w2.log()
    assert "through routing key" in w1.log()


def test_a_dispatch_task_the_gate_never_admitted_runs_nothing(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Called directly (no worker's request), the task refuses before any callback."""
    app = Celery("direct", broker="memory://")
    app.conf.stoker_url = redis_server.url
    calls: list[str] = []

    @stoker(app, name="direct")
    class Direct(Stoker):
        def init(self) -> dict[str, int]:
            calls.append("init")
            return {}

        def event(self, state: Any, event: str, reason: Any) -> Any:
            calls.append(event)
            return state

    register_dispatch_task(app)  # as StokerStep does in a worker
    with caplog.at_level(logging.WARNING, logger="celery_stoker.dispatch"):
        app.tasks[DISPATCH_TASK].apply(args=["direct", 1, 1, "timer", None, [], "w@h"])
    assert calls == []
    assert "not admitted by this worker's event pump" in caplog.text
