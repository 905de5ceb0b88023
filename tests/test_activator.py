"""The activator's election loop against a real Redis, without a worker around it.

Worker tests cover the whole path; this one needs exact timing around one
renewal, which only a bare activator and a TCP proxy in front of Redis give.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from celery import Celery
from support.tcp_proxy import TcpProxy

from celery_stoker import Stoker
from celery_stoker.activator import Activator
from celery_stoker.delivery import EventDelivery
from celery_stoker.keys import lease_channel
from celery_stoker.pump import EventPump
from celery_stoker.registry import StokerSpec
from celery_stoker.settings import StokerSettings
from celery_stoker.testing import RedisServer, wait_for


class Quiet(Stoker):
    def event(self, state: Any, event: str, reason: Any) -> Any:
        return state


def test_one_slow_renewal_is_retried_not_a_lost_lease(
    redis_server: RedisServer, tcp_proxy: Callable[[int], TcpProxy]
) -> None:
    proxy = tcp_proxy(redis_server.port)
    settings = StokerSettings(
        url=f"redis://127.0.0.1:{proxy.port}/0", lease_ttl=3.0, renew_interval=1.0
    )
    assert abs(settings.socket_timeout - 0.4) < 1e-9
    app = Celery("bare", broker=redis_server.url_for(0))
    activator = Activator(
        app,
        StokerSpec("slow", Quiet),
        settings,
        hostname="a@h",
        delivery=EventDelivery(app, None, "stoker.a@h"),
        listener=None,
        members=lambda: frozenset({"a@h"}),
        holder_id="a",
        pump=EventPump("a@h"),  # not started: this test is about the election alone
    )
    pubsub = redis_server.client().pubsub()
    pubsub.subscribe(lease_channel("stoker"))
    renewals: list[float] = []

    def next_renewal(after: float) -> float | None:
        message = pubsub.get_message(timeout=0.05)
        if message and message["type"] == "message" and message["data"].startswith(b"renewed"):
            renewals.append(time.monotonic())
        return next((t for t in renewals if t > after), None)

    activator.start()
    try:
        wait_for(lambda: activator.election.state == "leader", 10, what="leader")
        token = activator.snapshot()["token"]
        first = wait_for(lambda: next_renewal(0.0), 5, what="a first renewal")
        # Cut Redis off from just before the next renewal until after its reply is late.
        wait_for(lambda: time.monotonic() >= first + 0.85, 2, interval=0.005)
        proxy.blackhole()
        wait_for(lambda: time.monotonic() >= first + 1.5, 2, interval=0.005)
        proxy.heal()
        # (The held command itself runs at the heal; what matters is what follows.)
        # Without a retry the holder would step down at first + 2.2 s (too little
        # validity left for its next scheduled try) and retake the lease later.
        late = first + 2.7
        wait_for(lambda: time.monotonic() >= late, 3, interval=0.005)
        wait_for(lambda: next_renewal(late), 3, what="a renewal on schedule after the cut")
        assert activator.election.state == "leader"
        assert activator.snapshot()["token"] == token, "the term was lost and retaken"
        assert activator.election.terms_won == 1
    finally:
        activator.stop(5)
        pubsub.close()


def test_an_event_the_worker_never_took_does_not_hold_the_step_down(
    redis_server: RedisServer,
) -> None:
    """A stopping worker's consumer loop stops before its Stokers step down: an event
    handed to it meanwhile is never taken.  The stepping-down leader takes it back
    instead of waiting half the stop budget for it, and it never reaches Celery.

    The loop here is a real kombu ``Hub`` that nobody runs.
    """
    from types import SimpleNamespace

    from kombu.asynchronous import Hub

    settings = StokerSettings(
        url=redis_server.url_for(0), lease_ttl=3.0, renew_interval=1.0, stop_timeout=30.0
    )
    app = Celery("bare", broker=redis_server.url_for(0))
    hub = Hub()
    worker = SimpleNamespace(hub=hub, consumer=None)
    pump = EventPump("a@h")
    activator = Activator(
        app,
        StokerSpec("never", Quiet),
        settings,
        hostname="a@h",
        delivery=EventDelivery(app, worker, "stoker.a@h"),
        listener=None,
        members=lambda: frozenset({"a@h"}),
        holder_id="a",
        pump=pump,
    )
    activator.start()
    pump.start()
    try:
        wait_for(lambda: activator.election.state == "leader", 10, what="leader")
        wait_for(lambda: pump.running("never"), 5, what="now_leader handed to the loop")
        # Half the stop budget is 15 s: a step-down that waited for the event would not
        # be done within 5.
        assert activator.stop(5), "the step-down waited for an event the worker never took"
        assert activator.lease.holder() is None, "the lease was released"
        assert pump.running("never") is None
        for callback in hub._pop_ready():  # the loop runs at last: nothing is handed over
            callback()
        assert redis_server.client().llen("stoker.a@h") == 0, "the withdrawn event was sent"
    finally:
        activator.stop(1)
        pump.stop()
