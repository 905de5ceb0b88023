"""``celery -A proj stoker ...``: the command-line view of every Stoker.

Registered as a Celery CLI plugin (entry point ``celery.commands``), so it
appears beside ``celery worker`` once the package is installed.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import click

from .control import StokerOperationError, StokerRedisError, draining, dump_all
from .control import drain as drain_nodes
from .control import handoff as handoff_leader
from .control import undrain as undrain_nodes
from .registry import registry_of
from .settings import StokerConfigurationError
from .text import printable


@contextmanager
def _one_line_errors() -> Iterator[None]:
    """An error the operator can act on ends the command with one line and exit status 1.

    Redis refused, wrong password, no answer, a bad TLS option, a bad setting,
    a request that cannot be carried out: each says what and where (the URL's
    password masked), never with a traceback.  A hostname read from Redis may be
    in the message, so it is escaped (:func:`~celery_stoker.text.printable`).
    """
    try:
        yield
    except (StokerRedisError, StokerOperationError, StokerConfigurationError) as exc:
        raise click.ClickException(printable(" ".join(str(exc).split()))) from None


def _ago(iso: str | None) -> str:
    if not iso:
        return "-"
    from datetime import datetime, timezone

    seconds = (datetime.now(timezone.utc) - datetime.fromisoformat(iso)).total_seconds()
    return f"{_duration(seconds)} ago"


#: An event running longer than this shows in the HEALTH column, with its age.
SLOW_EVENT = 60.0


def health(view: dict[str, Any]) -> str:
    """The HEALTH cell of one Stoker: a fault any worker reports, a slow event, or ok."""
    workers = view.get("workers") or {}
    for node, activator in sorted(workers.items()):
        fault = (activator.get("health") or {}).get("error")
        if fault:
            short = fault if len(fault) <= 60 else fault[:57] + "..."
            return f"error on {node}: {short}"
    for node, activator in sorted(workers.items()):
        running = activator.get("running_event") or {}
        age = running.get("running_for")
        if isinstance(age, (int, float)) and age > SLOW_EVENT:
            return f"{running.get('event')} running {_duration(age)} on {node}"
    lost = view.get("history_lost")
    if isinstance(lost, dict):
        return (
            f"history lost: Redis held token {lost.get('held')}, the fleet had seen "
            f"{lost.get('seen')}"
        )
    return "error" if view.get("last_error") else "ok"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def _draining_line(drained: list[str]) -> str:
    return f"draining: {', '.join(map(printable, drained)) if drained else '(none)'}"


def _table(rows: list[list[str]], headers: list[str]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows, strict=False)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join(out)


@click.group(name="stoker")
@click.pass_context
def stoker_command(ctx: click.Context) -> None:
    """Leader-elected Stokers: status, handoff, drain, undrain."""


HEADERS = ["STOKER", "LEADER", "TOKEN", "SINCE", "FOLLOWERS", "INELIGIBLE", "LAST EVENT", "HEALTH"]
#: How many transitions ``status --watch`` shows under its table (all Stokers, newest first).
WATCH_TRANSITIONS = 8
WATCH_INSTALL_HINT = "pip install rich (or pip install 'celery-stoker[demo]')"


@stoker_command.command()
@click.option("--json", "as_json", is_flag=True, help="Print the full dump as JSON.")
@click.option("--timeout", default=1.0, show_default=True, help="Seconds to wait for workers.")
@click.option(
    "--watch",
    is_flag=True,
    help="Redraw every second until Ctrl-C (needs rich); without a terminal, print once.",
)
@click.pass_context
def status(ctx: click.Context, as_json: bool, timeout: float, watch: bool) -> None:
    """A table of every Stoker: leader, token, since, followers, last event."""
    app = ctx.obj.app
    names = sorted(registry_of(app))
    if not names:
        raise click.ClickException(
            "this app registers no Stokers: decorate a class with @stoker(app) in a module "
            "the app imports"
        )
    if watch and not as_json and sys.stdout.isatty():
        _watch(app, names, timeout)
        return
    with _one_line_errors():
        views = dump_all(app, names, timeout=timeout)
        drained = sorted(draining(app))
    if as_json:
        click.echo(json.dumps(views, indent=2, default=str))
        return
    click.echo(_table(_rows(views), HEADERS))
    unasked = _workers_error(views)
    if unasked:
        click.echo(f"\n{unasked}: the table shows only what Redis holds")
    click.echo(f"\n{_draining_line(drained)}")
    if not unasked:
        click.echo(_leaders_line(views))
        click.echo(_versions_line(views))
    for v in views:
        transitions = v.get("transitions") or []
        if not transitions:
            continue
        click.echo(f"\nrecent transitions of {printable(v['name'])} (newest first):")
        for t in transitions:
            click.echo(f"  {_transition_line(t)}")


def leaderships(views: list[dict[str, Any]]) -> dict[str, tuple[int, int]]:
    """Each answering worker's (Stokers it leads, their summed weight), 0 for a follower."""
    counts: dict[str, tuple[int, int]] = {}
    for v in views:
        for node, activator in (v.get("workers") or {}).items():
            led, load = counts.get(node, (0, 0))
            if activator.get("state") == "leader":
                weight = activator.get("weight")
                led, load = led + 1, load + (weight if type(weight) is int else 1)
            counts[node] = (led, load)
    return counts


def _leaders_line(views: list[dict[str, Any]]) -> str:
    """How leadership is spread: ``leads: w1@h 3, w2@h 3, w3@h 0`` (and each load, if weighted)."""
    counts = leaderships(views)
    if not counts:
        return "leads: (no worker answered)"
    cells = [
        f"{node} {led}" + (f" (weight {load})" if load != led else "")
        for node, (led, load) in sorted(counts.items())
    ]
    return printable("leads: " + ", ".join(cells))


def _versions_line(views: list[dict[str, Any]]) -> str:
    """Each answering worker's release; one of 0.1.0 (which did not say) is named as old.

    During an upgrade that is how an operator sees the fleet is mixed: newer
    workers do not count an old one as a member (README, "Upgrading").
    """
    releases: dict[str, str] = {}
    for v in views:
        for node, activator in (v.get("workers") or {}).items():
            version = str(activator.get("version") or "?")
            if activator.get("old_release"):
                version += " (old: not counted as a member by newer workers; upgrade it)"
            releases[node] = version
    if not releases:
        return "workers: (none answered)"
    return printable("workers: " + ", ".join(f"{n} {r}" for n, r in sorted(releases.items())))


def _workers_error(views: list[dict[str, Any]]) -> str | None:
    """Why the workers could not be asked (the broker), or None when they were."""
    error = next((v["workers_error"] for v in views if v.get("workers_error")), None)
    return None if error is None else printable(error)


def _rows(views: list[dict[str, Any]]) -> list[list[str]]:
    """The table's cells, each escaped: names, hostnames and errors come from Redis,
    where anyone with write access could put an escape sequence."""
    rows = []
    for v in views:
        last = v.get("last_event") or "-"
        if v.get("last_event_at"):
            last = f"{last} ({_ago(v['last_event_at'])})"
        workers = v.get("workers") or {}
        ineligible = sorted(n for n, a in workers.items() if not a.get("eligible", True))
        cells = [
            v["name"],
            v.get("leader") or "(none)",
            str(v.get("token") or "-"),
            _ago(v.get("active_from")),
            ", ".join(v.get("followers") or []) or "-",
            ", ".join(ineligible) or "-",
            last,
            health(v),
        ]
        rows.append([printable(cell) for cell in cells])
    return rows


def _transition_line(t: dict[str, Any], name: str | None = None) -> str:
    detail = t.get("reason") or ""
    if t.get("to"):
        detail = f"{detail} to {t['to']}"
    stoker = f"{name}  " if name else ""
    return printable(
        f"{_ago(_iso(t.get('at')))}  {stoker}{t.get('event', '?')!s:<13} {t.get('node', '?')}"
        f"  token {t.get('token', '-')}  {detail}".rstrip()
    )


def _watch(app: Any, names: list[str], timeout: float, interval: float = 1.0) -> None:
    """Redraw the table and the latest transitions every ``interval`` until Ctrl-C.

    One broadcast per redraw for every Stoker (it waits ``timeout``), so a redraw
    comes about every ``max(interval, timeout)`` seconds.
    """
    try:
        from rich.console import Console, Group
        from rich.live import Live
        from rich.table import Table
        from rich.text import Text
    except ImportError:
        raise click.ClickException(
            f"status --watch needs the rich package: {WATCH_INSTALL_HINT}; without --watch, "
            "status prints the table once"
        ) from None

    def render() -> Group:
        stamp = time.strftime("%H:%M:%S")
        title = Text(f"celery-stoker status, updated {stamp} (Ctrl-C to stop)", style="bold")
        try:
            views = dump_all(app, names, timeout=timeout)
            drained = sorted(draining(app))
        except StokerRedisError as exc:  # keep watching: Redis may come back
            return Group(title, Text(printable(exc), style="red"))
        table = Table(expand=True)
        for header in HEADERS:
            table.add_column(header, overflow="fold")
        for row in _rows(views):
            table.add_row(*row)
        latest = sorted(
            ((t, v["name"]) for v in views for t in v.get("transitions") or []),
            key=lambda item: item[0].get("at") or 0,
            reverse=True,
        )[:WATCH_TRANSITIONS]
        lines = [Text(_draining_line(drained))]
        lines.append(Text("\nlast transitions (newest first):", style="bold"))
        lines += [Text(f"  {_transition_line(t, name)}") for t, name in latest] or [
            Text("  (none yet)")
        ]
        unasked = _workers_error(views)
        if unasked:
            lines.insert(0, Text(unasked, style="yellow"))
        return Group(title, table, *lines)

    console = Console()
    try:
        with Live(console=console, auto_refresh=False, transient=False) as live:
            while True:
                started = time.monotonic()
                live.update(render(), refresh=True)
                time.sleep(max(0.0, interval - (time.monotonic() - started)))
    except KeyboardInterrupt:
        pass


def _iso(ts: Any) -> str | None:
    from datetime import datetime, timezone

    if not isinstance(ts, (int, float)):
        return None
    return datetime.fromtimestamp(ts, timezone.utc).isoformat()


@stoker_command.command()
@click.argument("name")
@click.option("--to", "to", default=None, help="The worker node name to hand over to.")
@click.option("--timeout", default=5.0, show_default=True, help="Seconds to wait for it.")
@click.pass_context
def handoff(ctx: click.Context, name: str, to: str | None, timeout: float) -> None:
    """Make the leader of NAME step down, to --to NODE or to any other worker."""
    with _one_line_errors():
        result = handoff_leader(ctx.obj.app, name, to, timeout=timeout)
    click.echo(
        printable(
            f"{name}: {result['from']} -> {result['to']} (token {result['token']}) "
            f"in {result['seconds'] * 1000:.0f} ms"
        )
    )


@stoker_command.command()
@click.argument("nodes", nargs=-1, required=True)
@click.option("--timeout", default=10.0, show_default=True, help="Seconds to wait for moves.")
@click.pass_context
def drain(ctx: click.Context, nodes: tuple[str, ...], timeout: float) -> None:
    """Make NODES give up every leadership and take none (until undrain, or a clean stop)."""
    with _one_line_errors():
        result = drain_nodes(ctx.obj.app, list(nodes), timeout=timeout)
    for name, move in sorted(result["moved"].items()):
        line = f"{name}: {move['from']} -> {move['to'] or '(no eligible worker yet)'}"
        click.echo(printable(line))
    click.echo(_draining_line(result["draining"]))


@stoker_command.command()
@click.argument("nodes", nargs=-1, required=True)
@click.pass_context
def undrain(ctx: click.Context, nodes: tuple[str, ...]) -> None:
    """Let NODES lead again."""
    with _one_line_errors():
        result = undrain_nodes(ctx.obj.app, list(nodes))
    click.echo(_draining_line(result["draining"]))
