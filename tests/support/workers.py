"""Workers for the tests, and readers for what their Stokers recorded.

The process helpers are :mod:`celery_stoker.testing`'s (one copy for tests, benchmarks and
the demo), and tests import them from there; what stays here is the tests' own: workers run
from the repository root (so ``tests.apps.*`` import), and the readers of the recorder app's
``rec:*`` lists with the safety check every worker test ends with.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

from celery_stoker import testing
from celery_stoker.testing import wait_for

__all__ = [
    "ROOT",
    "Fleet",
    "Record",
    "Records",
    "check_terms",
    "check_terms_of_each",
    "heard_join",
    "running_request",
    "shutdown_after_cut",
    "status_views",
    "stoker_status",
]

ROOT = Path(__file__).resolve().parents[2]


class Fleet(testing.Fleet):
    """A :class:`celery_stoker.testing.Fleet` whose workers run from the repository root."""

    def __init__(self, app: str, env: dict[str, str], pool: str = "solo") -> None:
        super().__init__(app, env, pool, cwd=ROOT, pythonpath=[ROOT])


@dataclass(frozen=True)
class Record:
    """One callback as the recorder app logged it."""

    event: str
    host: str
    token: int
    at: float
    reason: Any = None
    members: tuple[str, ...] = ()
    events: int = 0
    started: float = 0.0
    #: The Stoker (the recorder app runs one, or ``rec-0`` ... with STOKER_TEST_STOKERS).
    name: str = "recorder"


class Records:
    """Reads the ``rec:*`` lists the recorder app writes."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client

    def events(self) -> list[Record]:
        out = []
        for raw in self.client.lrange("rec:event", 0, -1):
            d = json.loads(raw)
            out.append(
                Record(
                    event=d["event"],
                    host=d["host"],
                    token=int(d["token"]),
                    at=float(d["at"]),
                    reason=d.get("reason"),
                    members=tuple(d.get("members") or ()),
                    events=int(d.get("events") or 0),
                    started=float(d.get("started") or d["at"]),
                    name=str(d.get("name") or "recorder"),
                )
            )
        return out

    def of(self, event: str, records: Iterable[Record] | None = None) -> list[Record]:
        return [r for r in (records if records is not None else self.events()) if r.event == event]

    def inits(self) -> list[dict[str, Any]]:
        return self.raw("init")

    def raw(self, kind: str) -> list[dict[str, Any]]:
        return [json.loads(raw) for raw in self.client.lrange(f"rec:{kind}", 0, -1)]


def check_terms(records: list[Record]) -> dict[int, list[Record]]:
    """Assert the safety invariants on recorded callbacks; return them grouped by token.

    Every term (token) ran on one host only; terms do not overlap in time
    (a term's first callback comes after the previous term's last one); tokens
    grow from term to term.
    """
    terms: dict[int, list[Record]] = {}
    for record in records:
        terms.setdefault(record.token, []).append(record)
    ordered = sorted(terms.items(), key=lambda kv: min(r.at for r in kv[1]))
    previous: tuple[int, float] | None = None
    for token, items in ordered:
        hosts = {r.host for r in items}
        assert len(hosts) == 1, f"term {token} ran on several hosts: {hosts}"
        by_start = sorted(items, key=lambda r: r.started)
        firsts = [r for r in by_start if r.event == "now_leader"]
        if firsts:
            early = [
                r.event
                for r in by_start
                if r.started < firsts[0].started and not r.event.startswith("hook:")
            ]
            assert not early, f"term {token} ran {early} before now_leader"
        first, last = min(r.at for r in items), max(r.at for r in items)
        if previous is not None:
            prev_token, prev_last = previous
            assert token > prev_token, f"token went backwards: {prev_token} then {token}"
            assert first >= prev_last, (
                f"term {token} began at {first:.3f} before term {prev_token} ended "
                f"at {prev_last:.3f}"
            )
        previous = (token, last)
    return terms


def heard_join(records: Records, node: str, timeout: float = 30) -> Record:
    """Wait until the leader's ``cluster_change`` says ``node`` joined; return that record."""
    return wait_for(
        lambda: [r for r in records.of("cluster_change") if r.reason["node"] == node],
        timeout,
        what=f"the leader hears {node} join",
    )[0]


def stoker_status(app: str, env: Mapping[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """``celery -A <app> stoker status <args>`` as a user runs it, with the workers' environment.

    From the repository root, so ``tests.apps.*`` import as they do in the workers.
    """
    return subprocess.run(
        [sys.executable, "-m", "celery", "-A", app, "stoker", "status", *args],
        cwd=ROOT,
        env={**os.environ, **env, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
    )


def status_views(app: str, env: Mapping[str, str], *args: str) -> list[dict[str, Any]]:
    """Every Stoker's view, from ``stoker status --json <args>`` (which must succeed)."""
    out = stoker_status(app, env, "--json", *args)
    assert out.returncode == 0, out.stderr
    views: list[dict[str, Any]] = json.loads(out.stdout)
    return views


def check_terms_of_each(records: list[Record]) -> dict[str, dict[int, list[Record]]]:
    """:func:`check_terms` for each Stoker of the records (a fleet that runs several)."""
    names = sorted({r.name for r in records})
    return {name: check_terms([r for r in records if r.name == name]) for name in names}


def running_request(records: Records, after: int = 0) -> dict[str, Any]:
    """A timer event's message (``rec:request``) whose callback has started and not yet ended."""

    def find() -> dict[str, Any] | None:
        ended = {r["task_id"] for r in records.raw("event")}
        for request in records.raw("request")[after:]:
            if request["event"] == "timer" and request["id"] not in ended:
                return request
        return None

    found = wait_for(find, 20, 0.01, what="a timer event that is running")
    assert found is not None
    return found


def shutdown_after_cut(records: Records, node: str, *, least: int, timeout: float) -> None:
    """Assert the cut-off leader ``node`` ran ``shutdown`` from its last committed state.

    Not from ``init()``, nor from the copy taken when the term began: from the
    state its last event committed (or the one before, if the cut caught that
    event's commit).  The caller has cut the leader off (a blackholed proxy).
    """
    lost = wait_for(
        lambda: [r for r in records.of("shutdown") if r.reason == "lease_lost"],
        timeout,
        what="shutdown(lease_lost) on the cut-off leader",
    )[0]
    ran = [r for r in records.events() if r.host == node and r.event != "shutdown"]
    last = max(ran, key=lambda r: r.started)
    assert last.events >= least
    assert last.events <= lost.events <= last.events + 1, (lost.events, last.events)
