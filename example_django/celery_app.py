"""The Celery app: configured from Django's settings, ``StokerStep``, and beat on the leader.

Start workers with ``celery -A example_django.celery_app worker``.  With
``CELERY_BEAT_SCHEDULER`` naming django-celery-beat's ``DatabaseScheduler``,
``install(app)`` runs that scheduler in whichever worker leads, so the
schedule edited in the admin is sent by exactly one worker of the fleet, with
no ``celery beat`` process.
"""

from __future__ import annotations

import os

from celery import Celery

from celery_stoker import StokerStep
from celery_stoker.contrib.beat import install

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "example_django.settings")

app = Celery("example_django")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.steps["worker"].add(StokerStep)  # the only wiring celery-stoker needs
install(app)  # beat on the leader, with the scheduler CELERY_BEAT_SCHEDULER names
app.autodiscover_tasks()
