"""One row per run of a periodic task, written where the task ran."""

from __future__ import annotations

from django.db import models


class Run(models.Model):
    """A run of ``heartbeat``: which schedule entry sent it, which worker ran it, when."""

    #: The Celery task id: a message delivered twice is still one row.
    task_id = models.CharField(max_length=64, unique=True)
    #: The django-celery-beat entry that sent it (its ``periodic_task_name`` header).
    entry = models.CharField(max_length=200)
    worker = models.CharField(max_length=200)
    at = models.DateTimeField(auto_now_add=True, db_index=True)

    def __str__(self) -> str:
        return f"{self.at:%H:%M:%S.%f} {self.entry} on {self.worker}"
