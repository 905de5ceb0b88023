"""example_django's Celery app under test: its sends, schedule SQL and a second Stoker recorded.

Workers under test run ``celery -A tests.apps.django_beat worker`` with the
example's settings (``EXAMPLE_DB_NAME`` names the test's database,
``EXAMPLE_BROKER_URL`` the test's Redis, ``EXAMPLE_LEASE_TTL`` the TTL).  On
top of the example, unchanged, this records:

* ``rec:sent``: every send of ``example_django.heartbeat``, by the process and
  thread that published it, with its django-celery-beat entry;
* ``rec:sql``: every SQL statement a worker runs, with the thread that ran it,
  the task it ran in (if any) and whether it touched django-celery-beat's
  tables: outside a task, only the leader's beat thread may run any;
* ``rec:other``: the events of a second Stoker, ``tests.other``, so a test can
  see the worker carry on with its other Stokers while beat cannot run.

The runs themselves are rows of the example's ``heartbeat_run`` table.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from celery import current_task
from django.db.backends.signals import connection_created

from celery_stoker import Stoker, stoker
from example_django.celery_app import app
from tests.apps.beat_records import Records

TASK = "example_django.heartbeat"

app.conf.update(
    worker_hijack_root_logger=False,
    worker_prefetch_multiplier=1,
    # Ticks at least every second, so an admin edit is seen within one.
    beat_max_loop_interval=1,
)
records = Records(app.conf.broker_url)
records.record_sends(lambda name: name == TASK)


def _record_sql(
    execute: Callable[..., Any], sql: str, params: Any, many: bool, context: Any
) -> Any:
    task = current_task.name if current_task else None
    records.record(
        "sql",
        host=records.hostname,
        thread=threading.current_thread().name,
        task=task,
        schedule="django_celery_beat" in sql,
        sql=sql[:60],
    )
    return execute(sql, params, many, context)


def _watch(sender: Any, connection: Any, **kwargs: Any) -> None:
    if _record_sql not in connection.execute_wrappers:
        connection.execute_wrappers.append(_record_sql)


connection_created.connect(_watch, weak=False)


@stoker(app, name="tests.other")
class Other(Stoker):
    """Another Stoker of the same worker: a timer every half second, recorded."""

    def event(self, state: Any, event: str, reason: Any) -> Any:
        records.record("other", event=event, host=self.context.hostname)
        return state

    def next_timer_in(self, state: Any) -> float:
        return 0.5
