"""``manage.py heartbeat``: schedule the heartbeat, stop it, or show its last runs.

Every change goes through the ORM as an admin edit would, so the leader's
scheduler sees it at its next tick (django-celery-beat's ``PeriodicTasks``
change marker).
"""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandParser
from django_celery_beat.models import IntervalSchedule, PeriodicTask

from example_django.heartbeat.models import Run

ENTRY = "heartbeat"


class Command(BaseCommand):
    help = "Schedule the heartbeat every N seconds (--every), disable it (--off), list runs."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--every", type=int, help="send it every N seconds")
        parser.add_argument("--off", action="store_true", help="disable the entry")
        parser.add_argument("--runs", type=int, default=10, help="show the last N runs")

    def handle(self, *args: Any, every: int | None, off: bool, runs: int, **options: Any) -> None:
        if every is not None:
            interval, _ = IntervalSchedule.objects.get_or_create(
                every=every, period=IntervalSchedule.SECONDS
            )
            PeriodicTask.objects.update_or_create(
                name=ENTRY,
                defaults={
                    "task": "example_django.heartbeat",
                    "interval": interval,
                    "enabled": True,
                },
            )
            self.stdout.write(f"{ENTRY}: every {every} s")
        if off:
            task = PeriodicTask.objects.get(name=ENTRY)
            task.enabled = False
            task.save()
            self.stdout.write(f"{ENTRY}: disabled")
        for run in reversed(Run.objects.order_by("-at")[:runs]):
            self.stdout.write(str(run))
