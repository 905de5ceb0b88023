"""One Stoker's lane in the worker's pump, and what comes after one of its events ends.

A lane holds a Stoker's events on this worker: those waiting to be sent, the
one in flight, and its next timer.  The pump (``pump.py``) sends them one at
a time and its watch (``watch.py``) learns how each ended; both work on the
lanes under the pump's one lock.

What comes after an event is decided here, from the lane and the outcome
alone (:meth:`Lane.after`): sent again at once (it never ran), again with
backoff (``init()`` raised, the state is unreadable, Redis was out of reach),
once more (its pool process was lost), or its timer armed from the interval
the Stoker asked for.  So no term is left without events, and a fault is
retried with backoff, never in a loop.
"""

from __future__ import annotations

import collections
import logging
import threading
from dataclasses import dataclass, field
from typing import Any, Protocol

from .outcome import Outcome

# The pump's logger: these lines were the pump's, and users filter by its name.
logger = logging.getLogger("celery_stoker.pump")

#: ``init()`` raised: the event is sent again after this long, doubling up to the cap.
INIT_RETRY_START = 1.0
INIT_RETRY_MAX = 60.0
#: The stored state could not be read: the event is sent again after this long, doubling
#: up to the cap, so a key that is fixed or deleted resumes the Stoker within one interval.
STATE_RETRY_START = 1.0
STATE_RETRY_MAX = 60.0
#: The pool process could not reach Redis before the callbacks ran: the event is sent
#: again after this long, doubling up to the cap (a longer outage ends the term anyway).
REDIS_RETRY_START = 0.5
REDIS_RETRY_MAX = 5.0
#: Events that are delivered once more when the pool process running them was lost.
REDELIVERED = ("now_leader", "cluster_change")


@dataclass
class PendingEvent:
    """An event waiting to be sent: it belongs to the term whose token it carries."""

    seq: int
    token: int
    event: str
    reason: Any
    #: 2 when it is delivered again after the pool process running it was lost.
    attempt: int = 1


@dataclass
class InFlight:
    """An event sent to the pool and not over yet."""

    item: PendingEvent
    task_id: str
    sent_at: float
    #: When the pool started running it (Celery's ``on_accepted``), on time.time().
    started_at: float | None = None
    #: The pool process running it, when that is not this process (prefork).
    pid: int | None = None
    #: The worker received the message (it is, or was, in Celery's table of requests).
    seen: bool = False
    #: When the watchdog first found the request gone without a report (monotonic).
    gone_at: float | None = None
    #: A hard time limit fired: the pool process being killed, and the outcome to
    #: give once it is gone (Celery tells us just *before* it kills it).
    killing_pid: int | None = None
    killed_outcome: Outcome | None = None
    killing_since: float = 0.0
    #: The dispatch task's arguments as sent, in canonical form (``watch.event_fingerprint``):
    #: the one message that may run this event (see ``EventWatch.admit``).
    fingerprint: str | None = None
    #: The Celery request admitted to run it; any other request is refused.
    admitted: Any = None
    #: How often the worker's consumer had restarted (lost the broker) when it was sent.
    restarts: int | None = None
    #: Sent through the broker to the worker's event queue (gevent, eventlet), not
    #: handed to the consumer's event loop.
    via_broker: bool = False
    #: The watchdog gave it up (it never started; it is sent again): no request of it
    #: may be admitted any more, even one that asked just before.
    given_up: bool = False


class LaneOwner(Protocol):
    """What the pump needs from a Stoker's activator."""

    name: str

    @property
    def time_limit(self) -> float | None:
        """The hard time limit of an event, which the pump enforces if Celery cannot."""

    def acting_token(self) -> int | None:
        """The token of the term that may send events now, or None."""

    def event_args(self, item: PendingEvent) -> list[Any]:
        """The dispatch task's arguments for ``item`` (name, token, seq, event, reason, ...)."""

    def send_event(self, item: PendingEvent, task_id: str, args: list[Any]) -> bool:
        """Send ``args`` as the dispatch task with ``task_id``; raise if the broker refuses.

        True when it went through the broker (to the worker's event queue).
        """

    def withdraw(self, task_id: str) -> bool:
        """Take back a sent event that Celery has not received; True if it never will."""

    def event_done(self, item: PendingEvent, outcome: Outcome) -> None:
        """Bookkeeping after an event is over (last error, failures, the state copy)."""


@dataclass(frozen=True)
class After:
    """What comes next on a lane after an event ended (see :meth:`Lane.after`)."""

    #: Put the event back first on the lane, under a new sequence number.
    again: bool = False
    #: ... as this attempt (None: the same as before).
    attempt: int | None = None
    #: ... and send it not before this (monotonic; None: as soon as the lane is free).
    until: float | None = None
    #: Arm the lane's timer for this moment (monotonic).
    timer_at: float | None = None


@dataclass
class Lane:
    """One Stoker's events on this worker."""

    owner: LaneOwner
    #: The term this lane serves, or None between terms.
    token: int | None = None
    pending: collections.deque[PendingEvent] = field(default_factory=collections.deque)
    inflight: InFlight | None = None
    timer_due: float | None = None
    last_interval: float | None = None
    #: The next pending event is not sent before this (monotonic): a send or init retry.
    not_before: float | None = None
    init_retry: float = INIT_RETRY_START
    state_retry: float = STATE_RETRY_START
    redis_retry: float = REDIS_RETRY_START
    idle: threading.Event = field(default_factory=threading.Event)
    #: Clear from sending an event until the pool starts it (or it ends): see
    #: ``EventPump.wait_started``.
    started: threading.Event = field(default_factory=threading.Event)
    send_error: str | None = None
    #: An event ended without its report (Redis refused the pool's LPUSH): said once,
    #: then quiet until a report arrives again.
    report_missing: bool = False
    #: A refused dispatch message was logged for this lane's term (said once a term).
    refusal_said: bool = False

    def reset_retries(self) -> None:
        """Every backoff starts again from its first step (a new term, an event that ran)."""
        self.init_retry = INIT_RETRY_START
        self.state_retry = STATE_RETRY_START
        self.redis_retry = REDIS_RETRY_START

    def after(self, item: PendingEvent, outcome: Outcome, now: float) -> After:
        """What comes next after ``item`` ended with ``outcome`` (the pump's lock held)."""
        name = self.owner.name
        if self.token != item.token:
            return After()  # the term ended meanwhile
        if outcome.kind == "lost" and not outcome.ran:
            # It never started (dropped or expired before the pool took it): send it again.
            return After(again=True)
        if outcome.kind in ("lost", "timeout"):
            again = item.event in REDELIVERED and item.attempt == 1
            if item.event in REDELIVERED and not again:
                logger.error(
                    "Stoker %s: %s was lost twice; it is dropped (reason was %r)",
                    name,
                    item.event,
                    item.reason,
                )
            timer_at = None if self.last_interval is None else now + self.last_interval
            return After(again=again, attempt=2 if again else None, timer_at=timer_at)
        if outcome.init_failed:
            # init() raised: send the same event again after a backoff, never idle.
            after = After(again=True, until=now + self.init_retry)
            logger.warning(
                "Stoker %s: init() failed; %s is sent again in %.0f s",
                name,
                item.event,
                self.init_retry,
            )
            self.init_retry = min(self.init_retry * 2, INIT_RETRY_MAX)
            return after
        if outcome.unreadable:
            # The stored state cannot be decoded (written with another serializer, or
            # foreign bytes): no callback ran.  Dropping the event would idle the term --
            # a term's first event has no interval to fall back on -- so the same event
            # is sent again after a backoff, and a key that is fixed or deleted resumes
            # the Stoker within one interval.  The activator says why, once.
            after = After(again=True, until=now + self.state_retry)
            logger.debug(
                "Stoker %s: its state is unreadable; %s is sent again in %.0f s",
                name,
                item.event,
                self.state_retry,
            )
            self.state_retry = min(self.state_retry * 2, STATE_RETRY_MAX)
            return after
        if not outcome.ran and outcome.kind == "error":
            # The pool process could not reach Redis (or hit its soft limit) before the
            # callbacks ran: the event never happened.  Dropping it would leave the term
            # without events -- no timer is armed after a now_leader that never ran, and a
            # timer that never ran arms no next one -- until something else sends one.
            after = After(again=True, until=now + self.redis_retry)
            log = logger.warning if self.redis_retry == REDIS_RETRY_START else logger.debug
            log(
                "Stoker %s: %s did not run (%s); it is sent again in %.1f s",
                name,
                item.event,
                outcome.error,
                self.redis_retry,
            )
            self.redis_retry = min(self.redis_retry * 2, REDIS_RETRY_MAX)
            return after
        if not outcome.ran:
            return After()  # skipped: the term is over or ending
        self.reset_retries()
        interval = self.last_interval if outcome.timer_error else outcome.next_timer
        self.last_interval = interval
        if interval is None:
            self.timer_due = None
            return After()
        return After(timer_at=now + interval)
