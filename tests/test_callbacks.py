"""Bad callbacks and bad registrations: clear errors naming the Stoker, nothing lost.

These call ``run_event`` (what the dispatch task runs in the pool) directly
against a real Redis and a real Celery app object; the worker-level behaviour
(the worker lives on, the timer carries on) is in test_workers.py.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from celery import Celery

from celery_stoker import Stoker, StokerRegistrationError, stoker
from celery_stoker.callbacks import EventCall, check_timer
from celery_stoker.dispatch import run_event
from celery_stoker.lease import RedisLease, Term
from celery_stoker.registry import registry_of
from celery_stoker.store import StokerStore


class Fixture:
    def __init__(self, url: str) -> None:
        self.app = Celery(f"callbacks-{id(self)}", broker=url)
        self.client = redis.Redis.from_url(url)
        self.terms: dict[str, Term] = {}

    def term(self, name: str) -> Term:
        """The current term of ``name`` (taken once, held for the test)."""
        if name not in self.terms:
            lease = RedisLease(self.client, name, holder_id="h", hostname="w@h", ttl=30)
            term = lease.acquire().term
            assert term is not None
            self.terms[name] = term
        return self.terms[name]

    def run(self, name: str, event: str = "timer", token: int | None = None) -> Any:
        spec = registry_of(self.app)[name]
        call = EventCall(
            seq=1,
            token=token if token is not None else self.term(name).token,
            event=event,
            reason=None,
            hostname="w@h",
            members=frozenset({"w@h"}),
        )
        return run_event(self.app, spec, call)

    def store(self, name: str, serializer: str = "json") -> StokerStore:
        return StokerStore(self.client, name, key_prefix="stoker", serializer=serializer)


@pytest.fixture
def fx(fresh_redis_url: str) -> Iterator[Fixture]:
    yield Fixture(fresh_redis_url)


def test_event_raising_keeps_state_and_names_the_stoker(
    fx: Fixture, caplog: pytest.LogCaptureFixture
) -> None:
    @stoker(fx.app, name="raiser")
    class Raiser(Stoker):
        def init(self) -> dict[str, int]:
            return {"n": 1}

        def event(self, state: Any, event: str, reason: Any) -> Any:
            raise KeyError("no such thing")

        def next_timer_in(self, state: Any) -> float:
            return 5.0

    with caplog.at_level(logging.ERROR, logger="celery_stoker.dispatch"):
        outcome = fx.run("raiser")
    assert outcome.ran and outcome.committed
    assert "event() raised KeyError" in outcome.error
    assert outcome.next_timer == 5.0, "the timer carries on after a raising event"
    assert fx.store("raiser").load().value == {"n": 1}, "init's state is kept"
    record = next(r for r in caplog.records if "raiser" in r.getMessage())
    assert record.exc_info is not None, "logged with its traceback"


def test_init_raising_is_reported_and_nothing_is_stored(fx: Fixture) -> None:
    @stoker(fx.app, name="bad-init")
    class BadInit(Stoker):
        def init(self) -> Any:
            raise RuntimeError("cannot start")

        def event(self, state: Any, event: str, reason: Any) -> Any:
            return state

    outcome = fx.run("bad-init", "now_leader")
    assert "init() raised RuntimeError: cannot start" in outcome.error
    assert not fx.store("bad-init").load().found


@pytest.mark.parametrize("value", [-1, "30", math.nan, math.inf, True, [1]])
def test_garbage_timer_is_an_error_naming_the_stoker(fx: Fixture, value: Any) -> None:
    with pytest.raises(ValueError, match="Stoker 'x': next_timer_in returned"):
        check_timer("x", value)

    @stoker(fx.app, name="bad-timer")
    class BadTimer(Stoker):
        def init(self) -> dict[str, int]:
            return {"n": 0}

        def event(self, state: Any, event: str, reason: Any) -> Any:
            return {"n": state["n"] + 1}

        def next_timer_in(self, state: Any) -> Any:
            return value

    outcome = fx.run("bad-timer")
    assert outcome.timer_error and "next_timer_in returned" in outcome.error
    assert fx.store("bad-timer").load().value == {"n": 1}, "the event's state still counts"


def test_timer_none_and_zero_are_fine() -> None:
    assert check_timer("x", None) is None
    assert check_timer("x", 0) == 0.0
    assert check_timer("x", 2.5) == 2.5


@pytest.mark.parametrize("serializer", ["json", "pickle"])
def test_unserializable_state_keeps_the_previous_one(fx: Fixture, serializer: str) -> None:
    fx.app.conf.stoker_state_serializer = serializer
    fx.app.conf.stoker_state_allow_unsafe_serializer = serializer == "pickle"

    @stoker(fx.app, name=f"unserializable-{serializer}")
    class Unserializable(Stoker):
        def init(self) -> dict[str, int]:
            return {"n": 0}

        def event(self, state: Any, event: str, reason: Any) -> Any:
            if event == "timer":
                return {"n": 1, "lock": __import__("threading").Lock()}
            return {"n": state["n"] + 1}

    name = f"unserializable-{serializer}"
    fx.run(name, "now_leader")
    assert fx.store(name, serializer).load().value == {"n": 1}
    outcome = fx.run(name, "timer")
    assert f"Stoker {name!r} cannot be serialized with {serializer!r}" in outcome.error
    assert fx.store(name, serializer).load().value == {"n": 1}


def test_foreign_state_key_is_reported_and_left_alone(fx: Fixture) -> None:
    @stoker(fx.app, name="foreign")
    class Foreign(Stoker):
        def event(self, state: Any, event: str, reason: Any) -> Any:
            return "new"

    fx.client.set("stoker:{foreign}:state", b"somebody's")
    outcome = fx.run("foreign")
    assert "holds a value celery-stoker did not write" in outcome.error
    assert fx.client.get("stoker:{foreign}:state") == b"somebody's"


def test_stale_token_does_nothing(fx: Fixture) -> None:
    calls: list[str] = []

    @stoker(fx.app, name="stale")
    class Stale(Stoker):
        def event(self, state: Any, event: str, reason: Any) -> Any:
            calls.append(event)
            return state

    term = fx.term("stale")
    outcome = fx.run("stale", token=term.token - 1)
    assert not outcome.ran and not calls


def test_registration_errors() -> None:
    app = Celery("registration")

    with pytest.raises(StokerRegistrationError, match="has no event"):

        @stoker(app)
        class NoEvent(Stoker):
            pass

    @stoker(app, name="same")
    class First(Stoker):
        def event(self, state: Any, event: str, reason: Any) -> Any:
            return state

    with pytest.raises(StokerRegistrationError, match="two Stokers are named 'same'"):

        @stoker(app, name="same")
        class Second(Stoker):
            def event(self, state: Any, event: str, reason: Any) -> Any:
                return state

    with pytest.raises(StokerRegistrationError, match="unknown option"):
        stoker(app, lease_tll=5)
    with pytest.raises(StokerRegistrationError, match="lease_ttl=0 is out of range"):

        @stoker(app, name="zero", lease_ttl=0)
        class Zero(Stoker):
            def event(self, state: Any, event: str, reason: Any) -> Any:
                return state

    with pytest.raises(StokerRegistrationError, match="white space"):

        @stoker(app, name="has space")
        class Spaced(Stoker):
            def event(self, state: Any, event: str, reason: Any) -> Any:
                return state

    assert First.stoker_name == "same"  # type: ignore[attr-defined]
    assert set(registry_of(app)) == {"same"}


def test_default_name_is_module_and_qualname() -> None:
    app = Celery("naming")

    @stoker(app)
    class Poller(Stoker):
        def event(self, state: Any, event: str, reason: Any) -> Any:
            return state

    assert list(registry_of(app)) == [
        "test_callbacks.test_default_name_is_module_and_qualname.<locals>.Poller"
    ]


def test_state_of_another_content_type_is_refused_not_decoded(fx: Fixture) -> None:
    """A pickle planted under the state key is never unpickled when JSON is configured."""
    import pickle

    @stoker(fx.app, name="planted")
    class Planted(Stoker):
        def event(self, state: Any, event: str, reason: Any) -> Any:
            return state

    body = pickle.dumps({"n": 1})
    fx.client.hset(
        "stoker:{planted}:state",
        mapping={
            "body": body,
            "content_type": "application/x-python-serialize",
            "content_encoding": "binary",
        },
    )
    outcome = fx.run("planted")
    assert "cannot be read" in outcome.error and "'pickle'" in outcome.error
    assert outcome.unreadable and not outcome.ran  # no callback ran; the pump sends it again
    assert fx.client.hget("stoker:{planted}:state", "body") == body


def test_a_late_commit_never_overwrites_a_newer_state(
    fx: Fixture, caplog: pytest.LogCaptureFixture
) -> None:
    """An event that returns after another event of the same term committed is refused.

    The slow event reads the state, then (while it "runs") a second event of the
    same term runs to its end and commits; the slow one's commit must fail, and
    the second one's state stays.
    """
    late: list[Any] = []

    @stoker(fx.app, name="late")
    class Late(Stoker):
        def init(self) -> dict[str, int]:
            return {"n": 0}

        def event(self, state: Any, event: str, reason: Any) -> Any:
            if event == "timer" and not late:
                late.append(fx.run("late", "cluster_change"))  # a newer event, to its end
                return {"n": state["n"] + 100}
            return {"n": state["n"] + 1}

    fx.run("late", "now_leader")
    with caplog.at_level(logging.WARNING, logger="celery_stoker.dispatch"):
        slow = fx.run("late", "timer")
    assert late[0].committed and fx.store("late").load().value == {"n": 2}
    assert slow.stale and not slow.committed
    assert "a newer state was stored while it ran" in caplog.text
    assert fx.store("late").load().version == 2
