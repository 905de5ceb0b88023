"""``celery -A proj stoker ...``: the command-line view of every Stoker.

Registered as a Celery CLI plugin (entry point ``celery.commands``), so it
appears beside ``celery worker`` once the package is installed.
"""

from __future__ import annotations

import json
from typing import Any

import click

from .control import cluster_view, dump
from .stoker import registry_of


def _ago(iso: str | None) -> str:
    if not iso:
        return "-"
    from datetime import datetime, timezone

    seconds = (datetime.now(timezone.utc) - datetime.fromisoformat(iso)).total_seconds()
    if seconds < 120:
        return f"{seconds:.0f}s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m ago"
    return f"{seconds / 3600:.1f}h ago"


def _table(rows: list[list[str]], headers: list[str]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows, strict=False)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join(out)


@click.group(name="stoker")
@click.pass_context
def stoker_command(ctx: click.Context) -> None:
    """Leader-elected Stokers: status, (more to come)."""


@stoker_command.command()
@click.option("--json", "as_json", is_flag=True, help="Print the full dump as JSON.")
@click.option("--timeout", default=1.0, show_default=True, help="Seconds to wait for workers.")
@click.pass_context
def status(ctx: click.Context, as_json: bool, timeout: float) -> None:
    """A table of every Stoker: leader, token, since, followers, last event."""
    app = ctx.obj.app
    names = sorted(registry_of(app))
    if not names:
        raise click.ClickException(
            "this app registers no Stokers: decorate a class with @stoker(app) in a module "
            "the app imports"
        )
    views: list[dict[str, Any]] = []
    for name in names:
        try:
            views.append(dump(app, name, timeout=timeout))
        except Exception as exc:  # a broker that does not answer still leaves Redis's view
            view = cluster_view(app, name)
            view["workers_error"] = f"{exc.__class__.__name__}: {exc}"
            views.append(view)
    if as_json:
        click.echo(json.dumps(views, indent=2, default=str))
        return
    rows = []
    for v in views:
        last = v.get("last_event") or "-"
        if v.get("last_event_at"):
            last = f"{last} ({_ago(v['last_event_at'])})"
        rows.append(
            [
                v["name"],
                v.get("leader") or "(none)",
                str(v.get("token") or "-"),
                _ago(v.get("active_from")),
                ", ".join(v.get("followers") or []) or "-",
                last,
                "error" if v.get("last_error") else "ok",
            ]
        )
    click.echo(
        _table(rows, ["STOKER", "LEADER", "TOKEN", "SINCE", "FOLLOWERS", "LAST EVENT", "HEALTH"])
    )
