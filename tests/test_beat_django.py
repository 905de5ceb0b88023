"""Beat on the leader with django-celery-beat's DatabaseScheduler, on the machine's PostgreSQL.

Each test gets a database of its own (a unique name, migrated as
example_django's README says, dropped at the end; the tests skip, saying why,
where no PostgreSQL answers) and a Redis of its own, and runs real workers of
``tests.apps.django_beat``: example_django's app with every send recorded where
it is published (``rec:sent``) and every SQL statement recorded with the
thread and task that ran it (``rec:sql``).  The entries are
rows the test writes through the ORM, as the admin would.

With one entry every ``PERIOD`` seconds, the gaps between consecutive sends
say what happened: under half a period, a period was sent twice; over one and
a half periods outside a crash, one was skipped.

The same handover test runs with RedBeat (``tests.apps.beat_app``).
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import redis
from support.beat import Stop, classify, fail_over, sends
from support.postgres import PostgresDatabase, postgres_or_skip, release_orm, use_orm
from support.workers import Fleet

from celery_stoker.testing import RedisServer, wait_for

pytestmark = pytest.mark.workers

DJANGO_APP = "tests.apps.django_beat"
REDBEAT_APP = "tests.apps.beat_app"
TTL = 1.5
RENEW = TTL / 3
PERIOD = 1.0
TASK = "example_django.heartbeat"
BEAT_THREAD = "stoker-beat:celery_stoker.beat"


@pytest.fixture
def database() -> Iterator[PostgresDatabase]:
    """A migrated database of this test's own, the test process's ORM pointed at it."""
    postgres_or_skip()
    db = PostgresDatabase()
    try:
        db.migrate()
        use_orm(db)
        yield db
    finally:
        release_orm()
        db.close()


def every(seconds: int) -> Any:
    from django_celery_beat.models import IntervalSchedule

    interval, _ = IntervalSchedule.objects.get_or_create(
        every=seconds, period=IntervalSchedule.SECONDS
    )
    return interval


def add_entry(name: str, seconds: int = int(PERIOD), **fields: Any) -> Any:
    """A django-celery-beat entry, saved through the ORM as the admin saves it."""
    from django_celery_beat.models import PeriodicTask

    return PeriodicTask.objects.create(name=name, task=TASK, interval=every(seconds), **fields)


def ran_ids() -> set[str]:
    """The task ids example_django's heartbeat wrote to its table when it ran."""
    from example_django.heartbeat.models import Run

    return set(Run.objects.values_list("task_id", flat=True))


@dataclass(frozen=True)
class SQL:
    at: float
    host: str
    thread: str
    task: str | None
    schedule: bool


def statements(client: redis.Redis) -> list[SQL]:
    """Every SQL statement the workers ran (``tests/apps/django_beat.py`` records them)."""
    return [
        SQL(d["at"], d["host"], d["thread"], d["task"], d["schedule"])
        for d in map(json.loads, client.lrange("rec:sql", 0, -1))
    ]


def django_fleet(
    fleets: Callable[..., Fleet], redis_server: RedisServer, db: PostgresDatabase, pool: str
) -> Fleet:
    return fleets(
        pool,
        ttl=TTL,
        app=DJANGO_APP,
        EXAMPLE_BROKER_URL=redis_server.url_for(0),
        EXAMPLE_LEASE_TTL=str(TTL),
        **db.env(),
    )


def check_touched_only_while_leading(
    client: redis.Redis, terms: dict[str, tuple[float, float]]
) -> None:
    """Outside the tasks it runs, a worker queries the database only from its beat thread, in a
    term of its own; the schedule tables only so.

    ``terms`` maps each worker to the span it may have led in (from the stop of
    the leader before it to its own stop); a follower runs no statement, at
    start or later, but in the tasks it is given (here the heartbeat's insert).
    """
    ran = statements(client)
    assert any(s.schedule for s in ran), "no statement on the schedule tables was recorded"
    assert not [s for s in ran if s.schedule and s.task], "a task touched the schedule tables"
    for s in ran:
        if s.task:
            continue
        assert s.thread == BEAT_THREAD, f"{s.host} ran SQL on {s.thread}, outside beat and tasks"
        assert s.host in terms, f"{s.host} queried the database and never led"
        start, end = terms[s.host]
        assert start <= s.at <= end, (
            f"{s.host} queried the database at {s.at:.3f}, outside its term {start:.3f}-{end:.3f}"
        )


@pytest.mark.parametrize("scheduler", ["redbeat", "django"])
def test_no_period_twice_across_a_handover_and_a_crash(
    scheduler: str,
    fleets: Callable[..., Fleet],
    redis_server: RedisServer,
    request: pytest.FixtureRequest,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Three workers, a 1 s entry; SIGTERM the leader, then SIGKILL the next one.

    Clean handover: the old leader stores what it sent before it releases the
    lease, so the gap is one period.  Crash: the next send comes within TTL +
    renew + one period, and is never a period sent already (each send's
    ``last_run_at`` is stored before it goes out).
    """
    client = redis_server.client()
    if scheduler == "django":
        db = request.getfixturevalue("database")
        add_entry("heartbeat")
        fleet = django_fleet(fleets, redis_server, db, "prefork")
        entry: str | None = "heartbeat"
    else:
        fleet = fleets("prefork", ttl=TTL, app=REDBEAT_APP, STOKER_TEST_BEAT_PERIOD=str(PERIOD))
        entry = None
    began = time.time()
    for i in (1, 2, 3):
        fleet.start(f"w{i}@%h", concurrency=1)
    wait_for(lambda: len(sends(client, entry)) >= 3, 40, what="three sends from the first leader")
    first = sends(client, entry)[0].host

    wait = TTL + RENEW + 10
    stops = [
        fail_over(fleet, client, signal.SIGTERM, entry=entry, wait=wait, restart=False),
        fail_over(fleet, client, signal.SIGKILL, entry=entry, wait=wait, restart=False),
    ]
    all_sends = sends(client, entry)
    gaps = classify(all_sends, stops)
    with capsys.disabled():
        print(f"\n{scheduler}: {len(all_sends)} sends every {PERIOD} s; {gaps.report()}")

    assert len(gaps.graceful) == 1 and len(gaps.crash) == 1
    assert not gaps.twice(PERIOD), f"a period sent twice: {gaps.report()}"
    assert not gaps.skipped(PERIOD), f"a period skipped: {gaps.report()}"
    assert gaps.crash[0] <= TTL + RENEW + PERIOD, gaps.report()
    assert {s.thread for s in all_sends} == {BEAT_THREAD}

    # What ran was sent, and what was sent ran, but for what the killed worker held.
    sent = {s.id for s in all_sends}
    if scheduler == "django":
        ran = wait_for(
            lambda: r if len(r := ran_ids()) >= len(sent) - 2 else None,
            15,
            what="the sent runs to execute (but the killed worker's prefetch)",
        )
        assert ran <= sent, "a run that beat did not send"
        second = stops[1].host
        third = next(s.host for s in all_sends if s.at > stops[1].at)
        check_touched_only_while_leading(
            client,
            {
                first: (began, stops[0].at + 1.0),  # its last sync may follow the SIGTERM
                second: (stops[0].at, stops[1].at),
                third: (stops[1].at, time.time()),
            },
        )


def terminate_other_connections() -> int:
    """End every connection to the test's database but the ORM's own, as the server would."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
        return len(cursor.fetchall())


def backend_waiting_on_a_lock(db: PostgresDatabase) -> bool:
    """A connection of a worker waits for a row lock on the schedule table (its sync)."""
    rows = db.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
        "AND wait_event_type = 'Lock' AND query LIKE 'UPDATE \"django_celery_beat_periodictask\"%%'"
    )
    return bool(rows[0][0])


def test_admin_edits_a_cut_connection_and_a_kill_during_a_sync(
    database: PostgresDatabase,
    fleets: Callable[..., Fleet],
    redis_server: RedisServer,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Two workers.  On the leader: an entry added, changed and disabled through the ORM is
    picked up at its next tick; the server terminating its connections costs no period,
    nor does a database that refuses connections for a while (said once, not per tick).
    Then the leader is SIGKILLed while its sync waits for a row lock (the test holds it):
    the period it was about to send goes out once, from the next leader, and the
    follower ran no statement on the schedule tables before it led.
    """
    client = redis_server.client()
    heartbeat = add_entry("heartbeat")
    fleet = django_fleet(fleets, redis_server, database, "solo")
    began = time.time()
    w1 = fleet.start("w1@%h")
    wait_for(lambda: len(sends(client, "heartbeat")) >= 2, 40, what="w1 sending")
    w2 = fleet.start("w2@%h").wait_ready()
    assert {s.host for s in sends(client)} == {w1.node}

    # Added: sent by the leader within its next ticks.
    added = add_entry("added", headers=json.dumps({"edit": 1}))
    first_added = wait_for(lambda: sends(client, "added"), 10, what="the added entry's send")
    assert first_added[0].host == w1.node
    # Changed: its next sends carry the new headers.
    added.headers = json.dumps({"edit": 2})
    added.save()
    changed_at = time.time()
    wait_for(
        lambda: [d for d in records(client, "added") if d.get("edit") == 2],
        10,
        what="a send of the changed entry",
    )
    stale = [d for d in records(client, "added") if d["at"] > changed_at and d.get("edit") != 2]
    assert len(stale) <= 1, f"the old version was sent {len(stale)} times after the change"
    # Disabled: at most the send already under way when the change landed.
    added.enabled = False
    added.save()
    disabled_at = time.time()
    wait_for(
        lambda: len([s for s in sends(client, "heartbeat") if s.at > disabled_at]) >= 3,
        10,
        what="three more heartbeats",
    )
    late = [s for s in sends(client, "added") if s.at > disabled_at]
    assert len(late) <= 1, f"the disabled entry was sent {len(late)} times after it was disabled"

    # The server drops the leader's connections: the next tick reconnects.
    cut_at = time.time()
    assert terminate_other_connections(), "no worker connection to terminate"
    wait_for(
        lambda: len([s for s in sends(client, "heartbeat") if s.at > cut_at]) >= 3,
        10,
        what="three heartbeats after the connections were cut",
    )

    # The database refuses connections for a while: beat sends on from memory, and says
    # so once (django-celery-beat's tracebacks at every tick: once a minute).
    outage_at = time.time()
    database.refuse_connections()
    wait_for(
        lambda: len([s for s in sends(client, "heartbeat") if s.at > outage_at]) >= 3,
        10,
        what="three heartbeats while the database refuses connections",
    )
    database.refuse_connections(False)
    release_orm()  # the test's own connection was ended too
    wait_for(lambda: "last_run_at stored again" in w1.log(), 10, what="the store back")
    log = w1.log()
    assert log.count("could not store last_run_at of heartbeat") == 1, log[-4000:]
    assert log.count("Database error while sync") <= 1, log[-4000:]
    assert log.count("Database gave error") <= 1, log[-4000:]

    # SIGKILL while the sync before a send waits for a row lock the test holds.
    lock = database.connect()
    lock.execute("BEGIN")
    lock.execute(
        "SELECT id FROM django_celery_beat_periodictask WHERE id = %s FOR UPDATE", (heartbeat.id,)
    )
    wait_for(lambda: backend_waiting_on_a_lock(database), 10, what="the leader's sync to block")
    blocked_at = time.time()
    w1.sigkill()
    killed = Stop(time.time(), w1.node, signal.SIGKILL)
    lock.execute("ROLLBACK")
    lock.close()
    wait_for(
        lambda: len([s for s in sends(client, "heartbeat") if s.host == w2.node]) >= 3,
        TTL + RENEW + 10,
        what="three heartbeats from w2",
    )

    beats = sends(client, "heartbeat")
    gaps = classify(beats, [killed])
    with capsys.disabled():
        print(f"\ndjango edits, cut and kill in a sync: {len(beats)} heartbeats; {gaps.report()}")
    assert not [s for s in beats if s.host == w1.node and s.at > blocked_at], (
        "the blocked leader sent the period whose sync never finished"
    )
    assert not gaps.twice(PERIOD), f"a period sent twice: {gaps.report()}"
    assert not gaps.skipped(PERIOD), f"a period skipped: {gaps.report()}"
    first_by_w2 = next(s for s in beats if s.host == w2.node)
    assert first_by_w2.at - killed.at <= TTL + RENEW + PERIOD, gaps.report()
    assert ran_ids() <= {s.id for s in sends(client)}, "a run that beat did not send"
    check_touched_only_while_leading(
        client, {w1.node: (began, killed.at), w2.node: (killed.at, time.time())}
    )
    assert w2.alive()


def records(client: redis.Redis, entry: str) -> list[dict[str, Any]]:
    """The raw send records of ``entry`` (with the headers the tests app keeps)."""
    return [d for d in map(json.loads, client.lrange("rec:sent", 0, -1)) if d.get("entry") == entry]


def test_an_unmigrated_database_is_said_once_and_the_other_stokers_run_on(
    fleets: Callable[..., Fleet], redis_server: RedisServer
) -> None:
    """Beat cannot start on a database without django-celery-beat's tables: one WARNING
    that says to migrate (no traceback per entry, no line per retry), the worker's other
    Stoker keeps its timer, and once the database is migrated beat starts by itself."""
    postgres_or_skip()
    client = redis_server.client()
    db = PostgresDatabase()  # never migrated
    try:
        worker = django_fleet(fleets, redis_server, db, "solo").start("w1@%h")
        wait_for(
            lambda: "still failing after 2 starts (StoreNotReady)" in worker.log(),
            30,
            what="beat retrying on the unmigrated database",
        )
        log = worker.log()
        assert log.count("run `python manage.py migrate django_celery_beat`") == 1, log[-3000:]
        assert "django_celery_beat_periodictask" in log
        assert "Cannot add entry" not in log and "Traceback" not in log
        timers = client.llen("rec:other")
        wait_for(
            lambda: client.llen("rec:other") >= timers + 2,
            10,
            what="the other Stoker's timer going on",
        )
        db.migrate()
        wait_for(
            lambda: "running again after" in worker.log(),
            30,
            what="beat starting once the database is migrated",
        )
        assert worker.alive()
    finally:
        db.close()
