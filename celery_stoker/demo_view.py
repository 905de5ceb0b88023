"""What the zero-setup demo shows: its live view and its summary, drawn with rich.

The demo (``demo.py``) runs the fleet and reads Redis; this draws what it read
(a :class:`Snapshot`), the workers and the failovers counted so far.  Kept apart
so the loop reads as a loop, and the view can change without touching it.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from .connection import mask_url

if TYPE_CHECKING:
    from rich.console import RenderableType

KIND_LABEL = {"SIGTERM": "SIGTERM (clean stop)", "SIGKILL": "SIGKILL (crash)"}


@dataclass
class Failover:
    kind: str
    old: str
    new: str | None
    seconds: float | None
    token: int | None = None


@dataclass
class Snapshot:
    """What Redis says at one moment."""

    views: dict[str, dict[str, Any]] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None

    def leader(self, name: str) -> str | None:
        """The node that leads ``name``, as the cluster view says, or None."""
        leader = (self.views.get(name) or {}).get("leader")
        return str(leader) if leader else None


class WorkerRow(Protocol):
    """A worker as the view shows it."""

    name: str
    status: str

    @property
    def node(self) -> str: ...

    @property
    def pid(self) -> int | None: ...


def short(node: str | None) -> str:
    """``w1@host`` -> ``w1`` (every demo worker runs on this host)."""
    return node.split("@", 1)[0] if node else "-"


def _ago(ts: float | None, now: float) -> str:
    return "-" if not ts else f"{max(0.0, now - ts):.1f}s ago"


def render(
    snapshot: Snapshot,
    names: Sequence[str],
    workers: Sequence[WorkerRow],
    *,
    failovers: int,
    status: str,
    url: str,
    now: float,
) -> RenderableType:
    """The live view: a header, the workers, the Stokers ``names``, the last events."""
    from rich.console import Group
    from rich.panel import Panel
    from rich.table import Table

    leads: dict[str, list[str]] = {}
    for name in names:
        leader = snapshot.leader(name)
        if leader:
            leads.setdefault(leader, []).append(name)

    worker_table = Table(title="workers", expand=True)
    for column in ("worker", "pid", "process", "role"):
        worker_table.add_column(column)
    for worker in workers:
        role = ", ".join(leads.get(worker.node, [])) or (
            "follower" if worker.status == "up" else "-"
        )
        style = "bold green" if worker.node in leads else ""
        worker_table.add_row(worker.name, str(worker.pid or "-"), worker.status, role, style=style)

    stokers = Table(title="stokers", expand=True)
    for column in ("stoker", "leader", "token", "since", "lease left", "last event"):
        stokers.add_column(column)
    for name in names:
        view = snapshot.views.get(name) or {}
        left = view.get("lease_time_left")
        stokers.add_row(
            name,
            short(view.get("leader")) if view.get("leader") else "[red](none)[/red]",
            str(view.get("token") or "-"),
            (view.get("active_from") or "-")[11:19],
            f"{left:.2f} s" if isinstance(left, (int, float)) else "-",
            str(view.get("last_event") or "-"),
        )

    events = Table(title="last events (newest first)", expand=True)
    for column in ("when", "worker", "event", "token", "detail"):
        events.add_column(column)
    for event in snapshot.events[:8]:
        detail = event.get("reason") or ""
        if isinstance(detail, dict):
            detail = f"{short(detail.get('node'))} {detail.get('change')}"
        if event.get("event") == "timer":
            detail = f"ticks={event.get('ticks')}"
        events.add_row(
            _ago(event.get("at"), now),
            short(event.get("host")),
            f"{event.get('event')} ({event.get('stoker')})",
            str(event.get("token") or "-"),
            str(detail),
        )

    if snapshot.error:
        status += f"  [red]{snapshot.error}[/red]"
    header = Panel(
        f"celery-stoker demo: {failovers} failover(s) so far; {status}",
        subtitle=mask_url(url),
    )
    return Group(header, worker_table, stokers, events)


def summary_table(failovers: Sequence[Failover]) -> Any:
    """Failovers by kind: how many, the median and the longest time to a new leader."""
    from rich.table import Table

    table = Table(title="failover: signal sent -> new leader's now_leader runs")
    for column, justify in (
        ("kind", "left"),
        ("failovers", "right"),
        ("median", "right"),
        ("max", "right"),
    ):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    for kind in ("SIGTERM", "SIGKILL"):
        times = [f.seconds for f in failovers if f.kind == kind and f.seconds is not None]
        failed = sum(1 for f in failovers if f.kind == kind and f.seconds is None)
        count = f"{len(times)}" + (f" ({failed} failed)" if failed else "")
        median = f"{statistics.median(times):.3f} s" if times else "-"
        worst = f"{max(times):.3f} s" if times else "-"
        table.add_row(KIND_LABEL[kind], count, median, worst)
    table.add_row("all", str(len(failovers)), "", "")
    return table
