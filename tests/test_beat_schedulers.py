"""Which scheduler beat on the leader runs (``beat_scheduler``), and what it adds to any of them.

Pure tests: Celery app objects and an in-memory broker; one real worker shows
that a bad ``beat_scheduler`` stops a worker at start, named.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from celery import Celery, beat
from redbeat import RedBeatScheduler
from support.workers import Fleet, Records

from celery_stoker.contrib.beat_schedulers import (
    LeaderScheduler,
    TermEnded,
    hint,
    leader_class,
    resolve,
)
from celery_stoker.settings import StokerConfigurationError


def make_app(namespace: str | None = None, **settings: Any) -> Celery:
    app = Celery("sched", broker="memory://", set_as_current=False)
    if namespace:
        config = type("Config", (), {f"{namespace}_{k.upper()}": v for k, v in settings.items()})
        app.config_from_object(config, namespace=namespace)
    else:
        app.conf.update(settings)
    return app


def refusal(app: Celery) -> str:
    with pytest.raises(StokerConfigurationError) as info:
        resolve(app)
    return str(info.value)


def test_unset_is_redbeat_though_celerys_default_names_persistent_scheduler() -> None:
    app = make_app()
    assert app.conf.beat_scheduler == "celery.beat:PersistentScheduler"
    assert resolve(app) is RedBeatScheduler


@pytest.mark.parametrize(
    "value",
    ["redbeat.RedBeatScheduler", "redbeat.schedulers:RedBeatScheduler", RedBeatScheduler],
)
def test_a_scheduler_is_named_as_celery_beat_dash_s_takes_it(value: Any) -> None:
    assert resolve(make_app(beat_scheduler=value)) is RedBeatScheduler


def test_a_scheduler_that_cannot_be_imported_is_named_with_the_choices() -> None:
    message = refusal(make_app(beat_scheduler="no_such_module.Scheduler"))
    assert message.startswith("beat_scheduler='no_such_module.Scheduler' cannot be imported")
    assert "ModuleNotFoundError" in message
    assert "'django_celery_beat.schedulers:DatabaseScheduler'" in message
    message = refusal(make_app(beat_scheduler="celery.beat:NoSuchScheduler"))
    assert "beat_scheduler='celery.beat:NoSuchScheduler' cannot be imported" in message


def test_the_django_alias_names_django_celery_beats_scheduler() -> None:
    """``-S django`` works for celery beat through an entry point; the setting does too."""
    pytest.importorskip("django_celery_beat", reason="pip install -e '.[test]' brings it")
    from support.postgres import use_orm

    use_orm()  # Django set up in this process (no database is touched)
    from django_celery_beat.schedulers import DatabaseScheduler

    assert resolve(make_app(beat_scheduler="django")) is DatabaseScheduler
    assert resolve(make_app(beat_scheduler="django_celery_beat.schedulers:DatabaseScheduler")) is (
        DatabaseScheduler
    )


def test_something_that_is_not_a_scheduler_is_refused() -> None:
    message = refusal(make_app(beat_scheduler="celery.beat:Service"))
    assert "beat_scheduler='celery.beat:Service' is <class 'celery.beat.Service'>" in message
    assert "not a subclass of celery.beat.Scheduler" in message


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ("celery.beat:PersistentScheduler", "keeps last_run_at in a file on the leader's disk"),
        ("celery.beat.Scheduler", "keeps last_run_at in the leader's memory only"),
    ],
)
def test_a_scheduler_with_local_state_is_refused_unless_allowed(value: str, why: str) -> None:
    message = refusal(make_app(beat_scheduler=value))
    assert message.startswith(f"beat_scheduler={value!r}: ")
    assert why in message
    assert "set stoker_beat_allow_local_scheduler = True" in message
    assert "leave it unset for RedBeat" in message
    allowed = make_app(beat_scheduler=value, stoker_beat_allow_local_scheduler=True)
    assert issubclass(resolve(allowed), beat.Scheduler)


def test_names_under_a_namespace_are_the_users() -> None:
    message = refusal(make_app("CELERY", beat_scheduler="celery.beat:PersistentScheduler"))
    assert message.startswith("CELERY_BEAT_SCHEDULER='celery.beat:PersistentScheduler'")
    assert "set CELERY_STOKER_BEAT_ALLOW_LOCAL_SCHEDULER = True" in message
    assert resolve(make_app("CELERY", beat_scheduler="redbeat.RedBeatScheduler")) is (
        RedBeatScheduler
    )


def test_the_opt_in_must_be_a_bool() -> None:
    message = refusal(make_app(stoker_beat_allow_local_scheduler="false"))
    assert "stoker_beat_allow_local_scheduler='false' must be True or False" in message


class Recording(beat.Scheduler):
    """A scheduler whose sync and sends are recorded in order (no store, no broker send)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.calls: list[str] = []
        super().__init__(*args, **kwargs)

    def sync(self) -> None:
        self.calls.append("sync")

    def send_task(self, *args: Any, **kwargs: Any) -> None:
        self.calls.append("send")


class Term:
    """Stands in for the term's event: ends when told, and records the waits between ticks."""

    def __init__(self) -> None:
        self.ended = False
        self.waits: list[float] = []

    def is_set(self) -> bool:
        return self.ended

    def wait(self, timeout: float) -> bool:
        self.waits.append(timeout)
        return self.ended


def leader(term: Term) -> Any:
    """A leader's :class:`Recording` with one entry every minute, due now."""
    app = make_app(beat_schedule={"e": {"task": "unregistered.task", "schedule": 60.0}})
    scheduler = leader_class(Recording)(app, stopped=term, max_interval=60)
    entry = scheduler.schedule["e"]
    entry.last_run_at = entry.default_now() - entry.schedule.run_every
    scheduler.__dict__["producer"] = object()  # no broker: send_task is recorded instead
    return scheduler


def test_the_next_last_run_at_is_stored_before_the_task_is_sent() -> None:
    term = Term()
    scheduler = leader(term)
    assert scheduler.tick() == 0.0
    assert scheduler.calls[:2] == ["sync", "send"]
    assert term.waits == []  # Celery's tick returns 0 after a send: tick again at once
    scheduler.tick()  # nothing due: it waits for the next run on the term's event
    assert len(term.waits) == 1 and 59 < term.waits[0] <= 60


def test_nothing_is_sent_or_advanced_once_the_term_ended() -> None:
    term = Term()
    scheduler = leader(term)
    entry = scheduler.schedule["e"]
    before = entry.last_run_at
    term.ended = True
    with pytest.raises(TermEnded):
        scheduler.reserve(entry)
    with pytest.raises(TermEnded):
        scheduler.tick()
    assert scheduler.calls == [] and entry.last_run_at == before
    assert issubclass(TermEnded, SystemExit)  # Service.start's clean stop


def test_a_term_that_ends_while_the_write_waits_sends_nothing() -> None:
    """A handoff while the store is slow: the worker lives on, the next leader sends."""
    term = Term()
    scheduler = leader(term)

    def slow_sync() -> None:
        scheduler.calls.append("sync")
        term.ended = True  # the term ends while the write is under way

    scheduler.sync = slow_sync
    with pytest.raises(TermEnded):
        scheduler.tick()
    assert scheduler.calls == ["sync"]


def test_leader_classes_put_the_leader_first_once_per_scheduler() -> None:
    cls = leader_class(RedBeatScheduler)
    assert cls.__mro__[1:3] == (LeaderScheduler, RedBeatScheduler)
    assert leader_class(RedBeatScheduler) is cls
    assert leader_class(cls) is cls
    assert cls.lock_key is None  # RedBeat's beat_init handler then takes no lock


def test_close_cancels_an_exit_time_sync() -> None:
    """django-celery-beat registers ``sync`` for interpreter exit; a closed term's must not run."""
    cancelled: list[bool] = []
    scheduler = leader(Term())
    scheduler.__dict__["_finalize"] = type("F", (), {"cancel": lambda s: cancelled.append(True)})()
    scheduler.close()
    assert cancelled == [True]
    assert "sync" in scheduler.calls


def test_a_missing_table_gets_the_migrate_hint() -> None:
    error = type("ProgrammingError", (Exception,), {"__module__": "django.db.utils"})
    text = 'relation "django_celery_beat_periodictask" does not exist'
    assert "manage.py migrate django_celery_beat" in hint(error(text))
    assert hint(RuntimeError(text)) == ""


@pytest.mark.workers
@pytest.mark.parametrize(
    ("value", "shown"),
    [
        ("nope.Missing", "beat_scheduler='nope.Missing' cannot be imported"),
        ("celery.beat:PersistentScheduler", "keeps last_run_at in a file on the leader's disk"),
    ],
)
def test_a_bad_beat_scheduler_stops_the_worker_at_start(
    fleets: Callable[..., Fleet], records: Records, value: str, shown: str
) -> None:
    fleet = fleets("solo", app="tests.apps.beat_app", STOKER_TEST_BEAT_SCHEDULER=value)
    worker = fleet.start("w1@%h")
    assert worker.wait_exit(60) != 0
    log = worker.log()
    assert "Stoker 'celery_stoker.beat': " in log and shown in log
    assert records.raw("sent") == []
