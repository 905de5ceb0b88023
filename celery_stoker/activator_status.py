"""What ``dump``, ``status`` and ``celery inspect stoker`` show of one activator, and its health.

Read from the activator's election (who leads, the term, the election's
fault), its lane in the pump (the event running) and its own counters, as
the original's ``dump/1`` shows them.  Only reads: the activator's
``snapshot()`` and ``health()`` are these, so the fields have one author.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from typing import Any, Protocol

from .election_state import ElectionState
from .pump import EventPump
from .registry import StokerSpec
from .settings import StokerSettings


class Reported(Protocol):
    """What the status reads of an activator (``activator.Activator`` has it)."""

    name: str
    hostname: str
    spec: StokerSpec
    settings: StokerSettings
    pump: EventPump
    last_event: str | None
    last_event_at: float | None
    last_error: str | None
    state_error: str | None
    state_error_since: float | None
    state_retries: int
    failures: int

    @property
    def election(self) -> ElectionState: ...


def iso(ts: float | None) -> str | None:
    """A wall-clock time as status shows it (ISO 8601, UTC), or None."""
    return datetime.fromtimestamp(ts, timezone.utc).isoformat() if ts else None


def snapshot(activator: Reported) -> dict[str, Any]:
    """The activator's fields, as the original's ``dump/1`` shows them."""
    election = activator.election
    settings = activator.settings
    term = election.term
    return {
        "name": activator.name,
        "state": election.state,
        "current_node": activator.hostname,
        "key_prefix": settings.key_prefix,
        "created_at": iso(election.created_at),
        "active_from": iso(election.active_from),
        "leader": election.leader,
        "token": term.token if term else election.leader_token,
        "lease_time_left": round(term.time_left(), 3) if term else None,
        # The held term found Redis behind the fleet: {"seen": token, "held": counter}.
        "history_lost": lost_view(term.history_lost) if term else None,
        "last_event": activator.last_event,
        "last_event_at": iso(activator.last_event_at),
        # The election's fault first: it is why nothing else happens.
        "last_error": election.error or activator.last_error,
        "election_error": election.error,
        "election_error_since": iso(election.error_since),
        "state_error": activator.state_error,
        "state_error_since": iso(activator.state_error_since),
        "state_retries": activator.state_retries,
        "terms_won": election.terms_won,
        "eligible": election.eligible,
        "draining": election.draining,
        "suspended": election.suspended,
        "min_members": election.min_members,
        "weight": activator.spec.weight,
        "lease_ttl": settings.lease_ttl,
        "renew_interval": settings.renew_interval,
        "running_event": _running_event(activator),
        "failures": activator.failures,
        "max_failures": activator.spec.max_failures,
        "soft_time_limit": settings.soft_time_limit,
        "time_limit": settings.time_limit,
        "health": health(activator),
    }


def health(activator: Reported) -> dict[str, Any]:
    """``ok`` or the fault this activator (or the worker's pump) is in, since when."""
    error, since = activator.election.error, activator.election.error_since
    pump = activator.pump
    if error is None and pump.error is not None:
        error, since = f"event pump: {pump.error}", pump.error_since
    if error is None and activator.state_error is not None:
        error, since = f"state unreadable: {activator.state_error}", activator.state_error_since
    return {"status": "ok" if error is None else "error", "error": error, "since": iso(since)}


def lost_view(lost: tuple[int, int] | None) -> dict[str, int] | None:
    """A term's ``history_lost`` as dump() and status show it."""
    return None if lost is None else {"seen": lost[0], "held": lost[1]}


def _running_event(activator: Reported) -> dict[str, Any] | None:
    running = activator.pump.running(activator.name)
    if running is None:
        return None
    started = running.pop("started_at")
    running["started_at"] = iso(started)
    running["running_for"] = round(time.time() - started, 1) if started else None
    return running
