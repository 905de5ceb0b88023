"""The Celery app: a Redis broker, ``StokerStep``, and beat on the leader.

Configuration comes from the environment so the same code runs on a laptop
and in a test: ``EXAMPLE_BROKER_URL`` (default ``redis://localhost:6379/0``).
"""

from __future__ import annotations

import os

from celery import Celery
from kombu import Queue

from celery_stoker import StokerStep
from celery_stoker.contrib.beat import install

BROKER_URL = os.environ.get("EXAMPLE_BROKER_URL", "redis://localhost:6379/0")
#: How often the leader measures the queues, and how often beat sends the purge.
CHECK_EVERY = float(os.environ.get("EXAMPLE_CHECK_EVERY", "5"))
PURGE_EVERY = float(os.environ.get("EXAMPLE_PURGE_EVERY", "30"))

app = Celery("example_project", broker=BROKER_URL)
app.conf.update(
    task_queues=[Queue("celery"), Queue("reports")],
    task_routes={"example_project.tasks.build_report": {"queue": "reports"}},
    # Periodic tasks as usual; install() below runs them from the leader only.
    beat_schedule={
        "purge-expired-reports": {
            "task": "example_project.tasks.purge_expired_reports",
            "schedule": PURGE_EVERY,
        },
    },
    # celery-stoker's own settings all have defaults; the lease TTL is the one
    # worth knowing: a crashed leader is replaced within TTL + TTL/3 seconds.
    stoker_lease_ttl=10,
    broker_connection_retry_on_startup=True,
)

app.steps["worker"].add(StokerStep)  # the only wiring celery-stoker needs
install(app)  # beat on the leader: no separate `celery beat` process
# The Stoker (stokers.py) and the tasks (tasks.py) register on this app; the
# package's __init__.py imports them, so every worker and client knows them.
