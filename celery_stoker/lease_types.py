"""What a lease holds, as values: who holds it (``Holder``), a term (``Term``), an acquire's answer.

Plain data read from the lease value Redis keeps (``Holder.parse`` never
raises: a value of someone else's making is flagged ``foreign``) and the
holder's own view of its term on a monotonic clock.  The commands that
produce them are ``lease.py``'s; the seam another store could implement is
:class:`Lease`.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Protocol

#: Our lease values are ~150 bytes; anything far larger is someone else's.
MAX_LEASE_VALUE = 4096


@dataclass(frozen=True)
class Holder:
    """Who holds a lease, as Redis says at one moment.

    ``foreign`` is true when the key holds a value this package did not write;
    then only ``raw`` and ``ttl_left`` mean anything.
    """

    hostname: str | None
    holder_id: str | None
    token: int | None
    since: float | None
    ttl_left: float | None
    raw: bytes
    foreign: bool = False
    #: Set while a handoff keeps the lease for this worker (nobody holds it yet).
    reserved_for: str | None = None
    #: The holder's Celery app (None in a value written before the lease named it).
    app: str | None = None
    #: Set when this term found Redis behind the fleet: (the newest token the taker
    #: had seen, the counter Redis held then); see :class:`Term`.
    history_lost: tuple[int, int] | None = None

    @classmethod
    def parse(cls, raw: bytes, pttl_ms: int | None) -> Holder:
        """Read a lease value; never raises, a foreign value is flagged instead."""
        ttl_left = pttl_ms / 1000.0 if pttl_ms is not None and pttl_ms >= 0 else None
        if len(raw) > MAX_LEASE_VALUE:
            return cls(None, None, None, None, ttl_left, raw[:MAX_LEASE_VALUE], foreign=True)
        try:
            data = json.loads(raw)
            if not isinstance(data, dict) or data.get("v") != 1:
                raise ValueError("not a celery-stoker lease")
            if isinstance(data.get("reserved_for"), str):
                since = data.get("since")
                return cls(
                    None,
                    None,
                    None,
                    int(since) / 1000.0 if since else None,
                    ttl_left,
                    raw,
                    reserved_for=data["reserved_for"],
                )
            return cls(
                hostname=str(data["host"]),
                holder_id=str(data["holder"]),
                token=int(data["token"]),
                since=int(data["since"]) / 1000.0,
                ttl_left=ttl_left,
                raw=raw,
                app=str(data["app"]) if data.get("app") else None,
                history_lost=_lost(data.get("lost")),
            )
        except (ValueError, KeyError, TypeError, OverflowError, RecursionError):
            return cls(None, None, None, None, ttl_left, raw, foreign=True)

    @classmethod
    def foreign_error(cls, exc: Exception) -> Holder:
        """A holder standing for a key Redis could not even read as ours (wrong type)."""
        return cls(None, None, None, None, None, f"<{exc}>".encode(), foreign=True)


def _lost(value: object) -> tuple[int, int] | None:
    """The ``lost`` field of a lease value as (seen, held), or None (absent or not ours)."""
    if not isinstance(value, dict):
        return None
    seen, held = value.get("seen"), value.get("held")
    # type() is int, not isinstance: JSON true/false are bools, and bools are ints.
    if type(seen) is int and type(held) is int:
        return (seen, held)
    return None


@dataclass
class Term:
    """One holder's tenure: the token, the exact value written, and how long it is valid.

    ``valid_until`` is on :func:`time.monotonic`; the holder may act only while
    ``time.monotonic() < valid_until``.
    """

    token: int
    value: str
    valid_until: float
    #: True when Redis had no fencing counter: it lost its data, or this is the
    #: first term ever; an earlier holder may still believe it leads.
    fresh: bool = False
    #: (newest token the taker had seen, the counter Redis held) when Redis held
    #: less history than that (a restored snapshot, a replica promoted without the
    #: last writes): the state may be older than what was committed, and an earlier
    #: holder may still believe it leads.  None in a term that found nothing amiss.
    history_lost: tuple[int, int] | None = None

    def time_left(self) -> float:
        """Seconds of validity left on this holder's own clock (negative once over)."""
        return self.valid_until - time.monotonic()

    def is_valid(self) -> bool:
        """True while the holder may still act on this term."""
        return self.time_left() > 0


@dataclass(frozen=True)
class AcquireResult:
    """What an acquire attempt found: our new term, or the current holder.

    ``draining`` is true when this worker was not allowed to try: it is in
    the draining set.
    """

    term: Term | None
    holder: Holder | None
    draining: bool = False


class Lease(Protocol):
    """The seam a different store (RabbitMQ, Postgres) could implement later."""

    name: str

    def acquire(self, min_token: int = 0) -> AcquireResult: ...
    def renew(self, term: Term) -> bool: ...
    def release(self, term: Term) -> bool: ...
    def holder(self) -> Holder | None: ...
    def wait(self, timeout: float, *, max_wait: float | None = None) -> bool: ...
