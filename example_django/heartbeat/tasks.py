"""The periodic task: any worker runs it; the leader's beat sends it."""

from __future__ import annotations

from typing import Any

from celery import shared_task

from .models import Run


@shared_task(bind=True, name="example_django.heartbeat")
def heartbeat(self: Any) -> str:
    """Record this run (once per message, whatever redelivers it)."""
    entry = self.request.get("periodic_task_name") or "(sent by hand)"
    Run.objects.get_or_create(
        task_id=self.request.id, defaults={"entry": entry, "worker": self.request.hostname}
    )
    return entry
