"""One event pump per worker: sends each Stoker's events to the pool, one at a time, in order.

Every Stoker this worker leads has a *lane*: the events waiting to be sent,
the one in flight, and its next timer.  One thread (``stoker-pump``) serves
every lane: it sends a lane's next event as the dispatch task to the worker's
pool (``delivery.py``) only once the previous event of that lane is over, keeps every
lane's timer in one heap, and learns that an event is over in one of three
ways:

* its **report**, pushed by the task to the worker's report list in Redis and
  read by one ``stoker-reports`` thread per Redis (a single BLPOP for every
  Stoker of the worker);
* **what Celery saw**, told by the dispatch task's request class in this
  process: the pool process running it was lost (``WorkerLostError``: a
  crash, an OOM kill, ``os._exit``) or a hard time limit ended it.  Noticed
  within milliseconds, not after a report timeout;
* the **watchdog**: a request the worker has finished or dropped (it left
  Celery's own table of requests) whose report never came, for instance
  because Redis refused the write, is over after a short grace; a message
  the worker never saw at all is given up after :data:`UNSEEN_TIMEOUT`, or,
  sent through the broker, as soon as the consumer is back from a lost
  broker connection (the broker may have deleted the worker's event queue
  with it meanwhile), and revoked in this worker, so it can never run later
  beside a newer event.

So no event of a Stoker starts while another of the same Stoker may still
run, and nothing waits on a report that cannot come.  Different Stokers'
events still run side by side in the pool.

The election stays one thread per Stoker (see ``activator.py``): user hooks
and ``shutdown`` run on it, and a shared election loop would let one slow hook
make another Stoker's renewal late.  The pump never waits on a user callback
(they run in the pool), so one thread serves every lane.
"""

from __future__ import annotations

import collections
import contextlib
import heapq
import itertools
import json
import logging
import os
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

import redis

from .dispatch import DISPATCH_TASK, Outcome

logger = logging.getLogger("celery_stoker.pump")

#: How long a request that left Celery's table may take to report before the pump
#: counts it as finished without a report.
REPORT_GRACE = 0.5
#: How often the pump looks at events in flight (Celery's table of requests).
WATCH_INTERVAL = 0.1
#: How long a request that left Celery's table before a pool process started it must
#: stay gone to count as dropped: it cannot report, so only a move between Celery's
#: tables is waited out, not a report's way back.  A stepping-down leader whose event
#: was dropped releases its lease this much sooner than after :data:`REPORT_GRACE`.
DROP_GRACE = 0.1
#: An event whose message the worker never received is given up after this long,
#: and revoked in this worker: should the message come later (it expires only after
#: ``dispatch.EVENT_MESSAGE_EXPIRES``), it is skipped.
UNSEEN_TIMEOUT = 300.0
#: Longest single wait of the pump: a timer further away than this is waited in parts,
#: so any ``next_timer_in`` value is safe.
MAX_WAIT = 3600.0
#: Pause before sending again an event the broker refused.
SEND_RETRY = 0.5
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
#: Longest the pump waits for a pool process that a hard time limit is killing.
KILL_WAIT = 5.0
#: A pool process still running an event this long past its hard limit is killed by the pump.
LIMIT_GRACE = 1.0
#: Events that are delivered once more when the pool process running them was lost.
REDELIVERED = ("now_leader", "cluster_change")
#: Backoff of a pump or report loop that hit an unexpected error.
LOOP_BACKOFF_MAX = 5.0
#: Why the watchdog ended an event that finished without a report.
REPORT_MISSING = (
    "finished, but its report never arrived (Redis refused or lost it; said once "
    "until a report arrives again)"
)

#: The events a pump sends to the pool (``shutdown`` runs in the main process).
DISPATCHED_EVENTS = ("now_leader", "cluster_change", "timer")
#: Why a dispatch message was refused (the ``why`` label of the refusal metric).
REFUSALS = (
    "malformed",
    "unknown_event",
    "unknown_stoker",
    "not_in_flight",
    "not_sent_here",
    "copy",
)

_pumps: dict[str, EventPump] = {}
_pumps_lock = threading.Lock()


def pump_of(hostname: str) -> EventPump | None:
    """The pump of the worker called ``hostname`` in this process, if it runs."""
    with _pumps_lock:
        return _pumps.get(hostname)


def event_fingerprint(args: Any) -> str:
    """The dispatch task's arguments in one canonical form, as sent and as received.

    Compared by :meth:`EventPump.admit`: what the broker or the consumer decoded
    (lists for tuples, and so on) must match what the pump sent.
    """
    return json.dumps(args, sort_keys=True, separators=(",", ":"), default=str)


@dataclass(frozen=True)
class Refusal:
    """Why a dispatch message may not run its callback (see :meth:`EventPump.admit`)."""

    #: One of :data:`REFUSALS`.
    why: str
    #: The same, in words, for the log.
    text: str


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
    #: The dispatch task's arguments as sent, in canonical form (:func:`event_fingerprint`):
    #: the one message that may run this event (see :meth:`EventPump.admit`).
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
    #: :meth:`EventPump.wait_started`.
    started: threading.Event = field(default_factory=threading.Event)
    send_error: str | None = None
    #: An event ended without its report (Redis refused the pool's LPUSH): said once,
    #: then quiet until a report arrives again.
    report_missing: bool = False
    #: A refused dispatch message was logged for this lane's term (said once a term).
    refusal_said: bool = False


class EventPump:
    """Sends every Stoker's events of one worker; see the module docstring."""

    def __init__(self, hostname: str) -> None:
        self.hostname = hostname
        self._lanes: dict[str, Lane] = {}
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, str]] = []
        self._order = itertools.count()
        self._seq = itertools.count(1)
        self._ready: set[str] = set()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._readers: list[ReportReader] = []
        self._warm_up: Callable[[], None] | None = None
        #: Set while any event is in flight: only then do the report readers ask Redis
        #: (an idle worker, follower or leader, sends no BLPOP).
        self._busy = threading.Event()
        #: The pump's own fault, shown in status until it clears.
        self.error: str | None = None
        self.error_since: float | None = None
        #: Called with (Stoker name or "", why) for every refused dispatch message.
        self.on_refused: Callable[[str, str], None] | None = None
        #: Refused dispatch messages, by Stoker name ("" when it named no Stoker of ours).
        self.refused: collections.Counter[str] = collections.Counter()
        self._refusal_said_unknown = False
        #: How often the worker's consumer has restarted (each restart is a lost broker
        #: connection, and drops the requests the pool had not started); None if unknown.
        self.consumer_restarts: Callable[[], int | None] | None = None
        #: True while the worker's consumer holds a broker connection; None if unknown.
        self.consumer_connected: Callable[[], bool] | None = None

    # ------------------------------------------------------------ wiring

    def add_lane(self, owner: LaneOwner) -> None:
        """Serve ``owner``'s Stoker (before :meth:`start`)."""
        lane = Lane(owner)
        lane.idle.set()
        lane.started.set()
        self._lanes[owner.name] = lane

    def add_reports(self, client_factory: Callable[[], redis.Redis], keys: Iterable[str]) -> None:
        """Read reports from ``keys`` (one Redis) with one BLPOP thread."""
        self._readers.append(
            ReportReader(client_factory, sorted(set(keys)), self.reported, self._busy)
        )

    def start(self, warm_up: Callable[[], None] | None = None) -> None:
        """Start the pump thread; it first runs ``warm_up`` (what a first send would pay)."""
        with _pumps_lock:
            _pumps[self.hostname] = self
        self._watch_celery_signals(connect=True)
        for reader in self._readers:
            reader.start()
        self._warm_up = warm_up
        self._thread = threading.Thread(target=self._run, name="stoker-pump", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        for reader in self._readers:
            reader.stop()
        self._busy.set()  # wake the readers so they see the stop
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
        for reader in self._readers:
            reader.join(timeout)
        self._watch_celery_signals(connect=False)
        with _pumps_lock:
            if _pumps.get(self.hostname) is self:
                del _pumps[self.hostname]

    # ------------------------------------------------ called by activators

    def next_seq(self) -> int:
        return next(self._seq)

    def begin_term(self, name: str, token: int) -> None:
        """A term starts acting: ``now_leader`` is its first event, before anything else.

        It is sent at once on the caller's thread (the election's) when the lane is
        free: handing it to the pump's thread would cost a thread switch, made late by
        whatever the calling thread does next.
        """
        with self._cond:
            lane = self._lanes[name]
            lane.token = token
            lane.refusal_said = False
            lane.pending.clear()
            lane.pending.append(PendingEvent(self.next_seq(), token, "now_leader", None))
            lane.timer_due = lane.not_before = None
            lane.init_retry = INIT_RETRY_START
            lane.state_retry = STATE_RETRY_START
            lane.redis_retry = REDIS_RETRY_START
            taken = self._take(lane, time.monotonic())
            if taken is None:
                self._ready.add(name)  # an event of the last term still runs: after it
            # Either way the pump's thread must look: to send it, or to watch it in flight.
            self._cond.notify_all()
        if taken is not None:
            self._send(lane, *taken)

    def end_term(self, name: str) -> None:
        """The term stops acting: nothing more is sent (an event in flight runs to its end)."""
        with self._cond:
            lane = self._lanes[name]
            lane.token = None
            lane.pending.clear()
            lane.timer_due = lane.not_before = None
            self._ready.discard(name)

    def submit(self, name: str, token: int, event: str, reason: Any) -> None:
        """Queue ``event`` for the term ``token`` (dropped if that term is not the lane's)."""
        with self._cond:
            lane = self._lanes[name]
            if lane.token != token:
                return
            lane.pending.append(PendingEvent(self.next_seq(), token, event, reason))
            self._ready.add(name)
            self._cond.notify_all()

    def wait_idle(self, name: str, timeout: float) -> bool:
        """Wait until no event of ``name`` is in flight; True if none is."""
        return self._lanes[name].idle.wait(max(0.0, timeout))

    def withdraw_unreceived(self, name: str) -> bool:
        """End the event of ``name`` in flight if Celery has not received it yet.

        Called when the term ends (its lane is closed): an event the worker has
        not even received would only be skipped when it ran, and a stopping
        worker may never receive it.  True if one was withdrawn (it never runs).
        """
        with self._cond:
            lane = self._lanes[name]
            inflight = lane.inflight
            if inflight is None or inflight.seen:
                return False
            if not lane.owner.withdraw(inflight.task_id):
                return False
            item = inflight.item
        outcome = Outcome(seq=item.seq, token=item.token, ran=False, name=name)
        self._finish(name, item.token, item.seq, outcome, task_id=inflight.task_id)
        return True

    def wait_started(self, name: str, timeout: float) -> bool:
        """Wait until the event of ``name`` in flight has started in the pool (or ended).

        True if it has, or none is in flight.  The election waits here for a new
        term's ``now_leader`` before its own bookkeeping, which would otherwise
        compete with it for this process's interpreter.
        """
        return self._lanes[name].started.wait(max(0.0, timeout))

    def running(self, name: str) -> dict[str, Any] | None:
        """The event of ``name`` in flight: what, since when (for status), or None."""
        with self._cond:
            inflight = self._lanes[name].inflight
            if inflight is None:
                return None
            return {
                "event": inflight.item.event,
                "seq": inflight.item.seq,
                "started_at": inflight.started_at,
            }

    # ------------------------------------------- who may run the event in flight

    def admit(self, task_id: str, args: Any, request: Any, source: object) -> Refusal | None:
        """May the dispatch message ``task_id`` run its callback now?  None if it may.

        Only the event this pump has in flight for a Stoker may run, only the
        message it sent for it (same task id, same arguments) and only one
        request of it: anyone who can publish to the broker can send a
        ``celery_stoker.dispatch`` message with a term's real token, and
        Celery would run it.  Called on the worker's main process by the
        dispatch task's request, before the pool gets it, so the verdict is
        made where the truth is kept, for every pool, at no cost in Redis.  A
        refusal is logged once per term and Stoker (``source`` says where the
        message came from) and counted (:attr:`refused`, :attr:`on_refused`).
        """
        refusal, name, lane = self._judge(task_id, args, request)
        if refusal is None:
            return None
        with self._cond:
            self.refused[name] += 1
            if lane is not None:
                say, lane.refusal_said = not lane.refusal_said, True
            else:
                say, self._refusal_said_unknown = not self._refusal_said_unknown, True
        log = logger.warning if say else logger.debug
        log(
            "Stoker %s: refused a dispatch message (task %s, arguments %.200r): %s; it came %s "
            "and its callback did not run (said once per term; every refusal is counted)",
            name or "?",
            task_id,
            args,
            refusal.text,
            source,
        )
        if self.on_refused is not None:
            try:
                self.on_refused(name, refusal.why)
            except Exception:
                logger.debug("celery-stoker: counting a refusal failed", exc_info=True)
        return refusal

    def _judge(
        self, task_id: str, args: Any, request: Any
    ) -> tuple[Refusal | None, str, Lane | None]:
        """The verdict of :meth:`admit`, the Stoker's name ("" if none of ours) and its lane."""
        if not (isinstance(args, (list, tuple)) and len(args) == 7 and isinstance(args[0], str)):
            return Refusal("malformed", "its arguments are not those of an event"), "", None
        name, event = args[0], args[3]
        with self._cond:
            lane = self._lanes.get(name)
            if lane is None:
                return Refusal("unknown_stoker", "no Stoker of that name runs here"), "", None
            if event not in DISPATCHED_EVENTS:
                return (
                    Refusal("unknown_event", f"{event!r} is not an event the pump sends"),
                    name,
                    lane,
                )
            inflight = lane.inflight
            if inflight is None:
                why = (
                    "this worker has no event of it in flight (it follows, or that event "
                    "is over): a replay, or a message from elsewhere"
                )
                return Refusal("not_in_flight", why), name, lane
            if inflight.given_up:
                why = "the pump gave that event up a moment ago (it never started); sent again"
                return Refusal("not_in_flight", why), name, lane
            if inflight.task_id != task_id or inflight.fingerprint != event_fingerprint(args):
                why = (
                    "it is not the event this worker's pump has in flight (a replay of an "
                    "earlier event, another term's, or an altered copy)"
                )
                return Refusal("not_sent_here", why), name, lane
            if inflight.admitted is not None and inflight.admitted is not request:
                why = "a second copy of the event in flight, which another request runs"
                return Refusal("copy", why), name, lane
            inflight.admitted = request
            return None, name, lane

    # --------------------------------------------- what Celery and Redis say

    def reported(self, outcome: Outcome) -> None:
        """A report arrived from the pool (any thread)."""
        with self._cond:
            lane = self._lanes.get(outcome.name)
            was_missing = lane is not None and lane.report_missing
            if lane is not None:
                lane.report_missing = False
        if was_missing:
            logger.info("Stoker %s: events report their end again", outcome.name)
        self._finish(outcome.name, outcome.token, outcome.seq, outcome)

    def celery_saw(
        self,
        name: str,
        token: int,
        seq: int,
        what: str,
        cause: str | None,
        task_id: str,
        pid: int | None = None,
    ) -> None:
        """Called in the main process by the dispatch request: accepted, lost or timeout."""
        kind = "timeout" if what == "timeout" else "lost"
        outcome = Outcome(seq=seq, token=token, ran=True, name=name, kind=kind, error=cause)
        with self._cond:
            lane = self._lanes.get(name)
            inflight = lane.inflight if lane is not None else None
            if lane is None or inflight is None or inflight.task_id != task_id:
                return
            if what == "accepted":
                inflight.seen = True
                inflight.started_at = time.time()
                inflight.pid = _pool_process(pid)
                lane.started.set()
                return
            pid = pid or inflight.pid
            if pid and pid != os.getpid() and _process_exists(pid):
                # A hard time limit: Celery tells us just before it kills the pool
                # process.  The next event waits until it is gone, so two never run at
                # once (the watchdog ends this one then).
                inflight.killing_pid, inflight.killed_outcome = pid, outcome
                inflight.killing_since = time.monotonic()
                self._cond.notify_all()
                return
        self._finish(name, token, seq, outcome, task_id=task_id)

    def _finish(
        self,
        name: str,
        token: int,
        seq: int,
        outcome: Outcome,
        *,
        task_id: str | None = None,
    ) -> None:
        """End the event in flight if it is this one (the first word on it wins)."""
        with self._cond:
            lane = self._lanes.get(name)
            inflight = lane.inflight if lane is not None else None
            if lane is None or inflight is None:
                return
            if inflight.item.seq != seq or inflight.item.token != token:
                return
            if task_id is not None and inflight.task_id != task_id:
                return
            if inflight.killed_outcome is not None:
                # Its report came as the time limit unwound it: it is the timeout's.
                outcome = inflight.killed_outcome
            lane.inflight = None
            lane.idle.set()
            lane.started.set()
            self._note_busy()
            item = inflight.item
            term_over = lane.token != item.token
        if outcome.kind == "lost" and not outcome.ran and term_over:
            # Never started, and its term is over (the worker stopping): routine.
            logger.info(
                "Stoker %s: the %s event (seq %d, term %d) %s",
                name,
                item.event,
                item.seq,
                item.token,
                outcome.error,
            )
        elif outcome.kind in ("lost", "timeout"):
            # Never started: no failure, but sent again after something a person may want
            # to know of (a lost broker); a callback cut short is an error.
            log = logger.warning if not outcome.ran else logger.error
            log(
                "Stoker %s: the %s event (seq %d, term %d) did not finish: %s; the stored "
                "state is kept and the Stoker carries on",
                name,
                item.event,
                item.seq,
                item.token,
                outcome.error or outcome.kind,
            )
        try:
            lane.owner.event_done(item, outcome)
        except Exception:
            logger.exception("Stoker %s: bookkeeping after %s failed", name, item.event)
        with self._cond:
            self._schedule_after(lane, item, outcome)
            if lane.pending and lane.not_before is None:
                self._ready.add(name)
            self._cond.notify_all()

    def _schedule_after(self, lane: Lane, item: PendingEvent, outcome: Outcome) -> None:
        """What comes next on ``lane`` after ``item`` ended with ``outcome`` (lock held)."""
        if lane.token != item.token:
            return  # the term ended meanwhile
        now = time.monotonic()
        if outcome.kind == "lost" and not outcome.ran:
            # It never started (dropped or expired before the pool took it): send it again.
            self._send_again(lane, item)
            return
        if outcome.kind in ("lost", "timeout"):
            if item.event in REDELIVERED and item.attempt == 1:
                self._send_again(lane, item, attempt=2)
            elif item.event in REDELIVERED:
                logger.error(
                    "Stoker %s: %s was lost twice; it is dropped (reason was %r)",
                    lane.owner.name,
                    item.event,
                    item.reason,
                )
            if lane.last_interval is not None:
                self._arm_timer(lane, now + lane.last_interval)
            return
        if outcome.init_failed:
            # init() raised: send the same event again after a backoff, never idle.
            self._send_again(lane, item, until=now + lane.init_retry)
            logger.warning(
                "Stoker %s: init() failed; %s is sent again in %.0f s",
                lane.owner.name,
                item.event,
                lane.init_retry,
            )
            lane.init_retry = min(lane.init_retry * 2, INIT_RETRY_MAX)
            return
        if outcome.unreadable:
            # The stored state cannot be decoded (written with another serializer, or
            # foreign bytes): no callback ran.  Dropping the event would idle the term --
            # a term's first event has no interval to fall back on -- so the same event
            # is sent again after a backoff, and a key that is fixed or deleted resumes
            # the Stoker within one interval.  The activator says why, once.
            self._send_again(lane, item, until=now + lane.state_retry)
            logger.debug(
                "Stoker %s: its state is unreadable; %s is sent again in %.0f s",
                lane.owner.name,
                item.event,
                lane.state_retry,
            )
            lane.state_retry = min(lane.state_retry * 2, STATE_RETRY_MAX)
            return
        if not outcome.ran and outcome.kind == "error":
            # The pool process could not reach Redis (or hit its soft limit) before the
            # callbacks ran: the event never happened.  Dropping it would leave the term
            # without events -- no timer is armed after a now_leader that never ran, and a
            # timer that never ran arms no next one -- until something else sends one.
            self._send_again(lane, item, until=now + lane.redis_retry)
            log = logger.warning if lane.redis_retry == REDIS_RETRY_START else logger.debug
            log(
                "Stoker %s: %s did not run (%s); it is sent again in %.1f s",
                lane.owner.name,
                item.event,
                outcome.error,
                lane.redis_retry,
            )
            lane.redis_retry = min(lane.redis_retry * 2, REDIS_RETRY_MAX)
            return
        if not outcome.ran:
            return  # skipped: the term is over or ending
        lane.init_retry = INIT_RETRY_START
        lane.state_retry = STATE_RETRY_START
        lane.redis_retry = REDIS_RETRY_START
        interval = lane.last_interval if outcome.timer_error else outcome.next_timer
        lane.last_interval = interval
        if interval is None:
            lane.timer_due = None
        else:
            self._arm_timer(lane, now + interval)

    def _send_again(
        self,
        lane: Lane,
        item: PendingEvent,
        *,
        attempt: int | None = None,
        until: float | None = None,
    ) -> None:
        """Put ``item`` back first on ``lane`` under a new sequence number (lock held).

        Sent as soon as the lane is free, or not before ``until`` (a backoff).
        """
        again = PendingEvent(
            self.next_seq(), item.token, item.event, item.reason, attempt or item.attempt
        )
        lane.pending.appendleft(again)
        if until is None:
            self._ready.add(lane.owner.name)
        else:
            self._hold_lane(lane, until)

    def _note_busy(self) -> None:
        """Clear the busy flag once no lane has an event in flight (lock held)."""
        if not any(lane.inflight is not None for lane in self._lanes.values()):
            self._busy.clear()

    def _arm_timer(self, lane: Lane, due: float) -> None:
        lane.timer_due = due
        heapq.heappush(self._heap, (due, next(self._order), lane.owner.name))

    def _hold_lane(self, lane: Lane, until: float) -> None:
        lane.not_before = until
        heapq.heappush(self._heap, (until, next(self._order), lane.owner.name))

    # ---------------------------------------------------------- the loop

    def _run(self) -> None:
        if self._warm_up is not None:
            try:
                self._warm_up()
            except Exception:
                logger.exception("celery-stoker: warming up the event pump failed; carrying on")
        backoff = 0.1
        while True:
            try:
                if not self._step():
                    return
                backoff = 0.1
                if self.error is not None:
                    logger.info("celery-stoker: the event pump is working again")
                    self.error = self.error_since = None
            except Exception as exc:
                text = f"{exc.__class__.__name__}: {exc}"
                if text != self.error:
                    logger.exception("celery-stoker: event pump error (%s); retrying", text)
                    self.error, self.error_since = text, time.time()
                with self._cond:
                    if self._stopping:
                        return
                    self._cond.wait(backoff)
                backoff = min(backoff * 2, LOOP_BACKOFF_MAX)

    def _step(self) -> bool:
        """One round: wait, fire due timers, watch events in flight, send what is ready."""
        with self._cond:
            if self._stopping:
                return False
            if not self._ready:
                self._cond.wait(self._next_wait())
            if self._stopping:
                return False
            now = time.monotonic()
            self._fire_due(now)
            to_send = self._take_ready(now)
        self._watch(time.monotonic())
        for lane, item, task_id in to_send:
            self._send(lane, item, task_id)
        return True

    def _next_wait(self) -> float:
        now = time.monotonic()
        wait = MAX_WAIT
        if self._heap:
            wait = min(wait, self._heap[0][0] - now)
        if any(lane.inflight is not None for lane in self._lanes.values()):
            wait = min(wait, WATCH_INTERVAL)
        return max(0.0, wait)

    def _fire_due(self, now: float) -> None:
        while self._heap and self._heap[0][0] <= now:
            _, _, name = heapq.heappop(self._heap)
            lane = self._lanes[name]
            if lane.not_before is not None and lane.not_before <= now:
                lane.not_before = None
                self._ready.add(name)
            if lane.timer_due is not None and lane.timer_due <= now and lane.token is not None:
                lane.timer_due = None
                lane.pending.append(PendingEvent(self.next_seq(), lane.token, "timer", None))
                self._ready.add(name)

    def _take_ready(self, now: float) -> list[tuple[Lane, PendingEvent, str]]:
        """The next event of every lane that may send one now, marked in flight."""
        out = []
        for name in list(self._ready):
            lane = self._lanes[name]
            self._ready.discard(name)
            taken = self._take(lane, now)
            if taken is not None:
                out.append((lane, *taken))
        return out

    def _take(self, lane: Lane, now: float) -> tuple[PendingEvent, str] | None:
        """``lane``'s next event if it may be sent now, marked in flight (lock held)."""
        if lane.inflight is not None:
            return None  # it is ready again when the event in flight ends
        if lane.not_before is not None and lane.not_before > now:
            return None  # the heap wakes it
        while lane.pending:
            item = lane.pending.popleft()
            if item.token != lane.token or lane.owner.acting_token() != item.token:
                continue  # that term is over
            task_id = str(uuid.uuid4())
            lane.inflight = InFlight(item, task_id, now)
            lane.idle.clear()
            lane.started.clear()
            self._busy.set()
            lane.timer_due = None  # re-armed from the event's own answer
            return item, task_id
        return None

    def _send(self, lane: Lane, item: PendingEvent, task_id: str) -> None:
        name = lane.owner.name
        try:
            args = lane.owner.event_args(item)
            restarts = self._consumer_restarts()
            with self._cond:
                # Before the message leaves: the consumer may receive it at once.
                if lane.inflight is not None and lane.inflight.task_id == task_id:
                    lane.inflight.fingerprint = event_fingerprint(args)
                    lane.inflight.restarts = restarts
            via_broker = lane.owner.send_event(item, task_id, args)
        except Exception as exc:
            text = f"{exc.__class__.__name__}: {exc}"
            if text != lane.send_error:
                logger.warning(
                    "Stoker %s: could not send its %s event (%s); retrying", name, item.event, text
                )
                lane.send_error = text
            with self._cond:
                if lane.inflight is not None and lane.inflight.task_id == task_id:
                    lane.inflight = None
                    lane.idle.set()
                    lane.started.set()
                    self._note_busy()
                    if lane.token == item.token:
                        lane.pending.appendleft(item)
                        self._hold_lane(lane, time.monotonic() + SEND_RETRY)
            return
        if via_broker:
            with self._cond:
                if lane.inflight is not None and lane.inflight.task_id == task_id:
                    lane.inflight.via_broker = True
        if lane.send_error is not None:
            logger.info("Stoker %s: sending events again", name)
            lane.send_error = None

    def _watch(self, now: float) -> None:
        """End events the worker is done with but that never reported (see module doc)."""
        known = _celery_requests()
        overdue: list[tuple[str, InFlight, Outcome]] = []
        with self._cond:
            for name, lane in self._lanes.items():
                inflight = lane.inflight
                if inflight is None or now - inflight.sent_at < WATCH_INTERVAL:
                    continue
                outcome = self._verdict(name, lane, inflight, known, now)
                if outcome is not None:
                    if not outcome.ran and outcome.kind == "lost":
                        inflight.given_up = True  # decided here, under the gate's lock
                    overdue.append((name, inflight, outcome))
        for name, inflight, outcome in overdue:
            if outcome.kind == "error":  # (lost ones are logged by _finish)
                log = logger.warning
                if outcome.error == REPORT_MISSING:
                    # Every event of the outage ends so (an ACL without LPUSH, OOM):
                    # say it once, not per event.
                    with self._cond:
                        missing_lane = self._lanes.get(name)
                        if missing_lane is not None:
                            if missing_lane.report_missing:
                                log = logger.debug
                            missing_lane.report_missing = True
                log(
                    "Stoker %s: the %s event %s; carrying on",
                    name,
                    inflight.item.event,
                    outcome.error,
                )
            self._finish(name, inflight.item.token, inflight.item.seq, outcome)

    def _verdict(
        self,
        name: str,
        lane: Lane,
        inflight: InFlight,
        known: dict[str, Any] | None,
        now: float,
    ) -> Outcome | None:
        """How the event in flight ended, if the watchdog can tell; None while it may run."""
        item = inflight.item

        def ended(kind: str, error: str, *, ran: bool = True, timer_error: bool = False) -> Outcome:
            return Outcome(
                seq=item.seq,
                token=item.token,
                ran=ran,
                name=name,
                kind=kind,
                error=error,
                timer_error=timer_error,
            )

        if inflight.killed_outcome is not None:
            gone = not _process_exists(inflight.killing_pid or 0)
            if gone or now - inflight.killing_since > KILL_WAIT:
                return inflight.killed_outcome
            return None
        limit = lane.owner.time_limit
        if (
            limit is not None
            and inflight.pid is not None
            and inflight.started_at is not None
            and time.time() - inflight.started_at > limit + LIMIT_GRACE
            and _process_exists(inflight.pid)
        ):
            # Past its hard limit and Celery has not killed it: its timers run on the
            # event loop, which stops during a warm shutdown.  Kill it here.
            with contextlib.suppress(OSError):
                os.kill(inflight.pid, signal.SIGKILL)
            inflight.killing_pid, inflight.killing_since = inflight.pid, now
            inflight.killed_outcome = ended("timeout", f"hard time limit ({limit:g} s) exceeded")
            return None
        if inflight.pid is not None and not _process_exists(inflight.pid):
            # Killed from outside (SIGKILL, the OOM killer): Celery's own WorkerLostError
            # may come seconds later; the process is gone now.
            return ended("lost", f"its pool process (pid {inflight.pid}) died")
        if known is not None and inflight.task_id in known:
            # Seen only once the gate admitted it: a copy under the same id (anyone on
            # the broker can send one) is not the event, and must not make its absence
            # later look like a drop.
            inflight.seen = inflight.seen or inflight.admitted is not None
            inflight.gone_at = None
            return None
        if inflight.seen and known is not None:
            if inflight.gone_at is None:
                inflight.gone_at = now
                return None
            grace = DROP_GRACE if inflight.started_at is None else REPORT_GRACE
            if now - inflight.gone_at < grace:
                return None
            if inflight.started_at is None:
                # It left the table before the pool ever started it: Celery's consumer
                # forgets the requests its pool has not started when it closes (a lost
                # broker connection, or the worker stopping).  It never ran: revoke it
                # here (a redelivered copy is skipped); it is sent again if its term goes on.
                _revoke_locally(inflight.task_id)
                return ended("lost", self._why_dropped(lane, inflight), ran=False)
            # The timer keeps its last interval.
            return ended(
                "error",
                REPORT_MISSING,
                timer_error=True,
            )
        if inflight.via_broker and self._reconnected_since(inflight):
            # Not received, and the consumer lost the broker since it was sent: the
            # message may have gone with the event queue, which the broker deletes
            # 20 s after its consumer left (bootstep.EVENT_QUEUE_EXPIRES),
            # and nothing else would notice before UNSEEN_TIMEOUT.  Sent again once
            # the consumer is back; a copy the queue still held is discarded.
            _revoke_locally(inflight.task_id)
            return ended(
                "lost",
                "was waiting in this worker's event queue when the worker lost the broker "
                "(the broker deletes the queue, and what waits in it, once the worker has "
                "been away longer than its expiry); sent again",
                ran=False,
            )
        if now - inflight.sent_at >= UNSEEN_TIMEOUT:
            _revoke_locally(inflight.task_id)  # should it come after all, it is skipped
            return ended(
                "lost",
                f"its message never reached the pool in {UNSEEN_TIMEOUT:.0f} s (it has "
                "expired); sent again",
                ran=False,
            )
        return None

    def _why_dropped(self, lane: Lane, inflight: InFlight) -> str:
        """Why an event left the worker before a pool process started it: only what is known.

        A broker loss is said only when the consumer did restart since the event
        was sent; the old text said so of every drop, and a stepping-down leader
        whose event waited for a recycled pool process logged a broker loss that
        never happened.
        """
        if lane.token != inflight.item.token:
            return "was not started: its term ended first (the stopping worker dropped it)"
        now, then = self._consumer_restarts(), inflight.restarts
        if now is not None and then is not None and now > then:
            return (
                "dropped by the worker before it started (the broker connection was lost); "
                "sent again"
            )
        return "dropped by the worker before a pool process started it; sent again"

    def _reconnected_since(self, inflight: InFlight) -> bool:
        """The consumer lost the broker after ``inflight`` was sent, and is connected again."""
        then = inflight.restarts
        if then is None or self.consumer_connected is None:
            return False
        now = self._consumer_restarts()
        try:
            connected = self.consumer_connected()
        except Exception:
            return False
        return connected and now is not None and now > then

    def _consumer_restarts(self) -> int | None:
        try:
            return self.consumer_restarts() if self.consumer_restarts is not None else None
        except Exception:
            return None

    # ------------------------------------------------ Celery's own signals

    def _watch_celery_signals(self, *, connect: bool) -> None:
        from celery import signals

        if connect:
            signals.task_received.connect(self._on_received, weak=False)
            signals.task_revoked.connect(self._on_revoked, weak=False)
        else:
            signals.task_received.disconnect(self._on_received)
            signals.task_revoked.disconnect(self._on_revoked)

    def _on_received(self, sender: Any = None, request: Any = None, **_: Any) -> None:
        """The worker received a message: an event in flight has been seen."""
        if getattr(request, "name", None) != DISPATCH_TASK:
            return
        with self._cond:
            for lane in self._lanes.values():
                inflight = lane.inflight
                if inflight is not None and inflight.admitted is request:
                    inflight.seen = True  # (a copy under the same id is not the event)

    def _on_revoked(self, sender: Any = None, request: Any = None, **kwargs: Any) -> None:
        """An event's message expired or was revoked: it will not run."""
        if getattr(request, "name", None) != DISPATCH_TASK:
            return
        with contextlib.suppress(Exception):
            name, token, seq = request.args[0], int(request.args[1]), int(request.args[2])
            why = "expired" if kwargs.get("expired") else "revoked"
            outcome = Outcome(
                seq=seq, token=token, ran=False, name=name, kind="lost", error=f"message {why}"
            )
            self._finish(name, token, seq, outcome, task_id=request.id)


#: No process id on Linux is above this (``PID_MAX_LIMIT``); a green pool's "pid" is.
PID_MAX_LIMIT = 1 << 22


def _pool_process(pid: int | None) -> int | None:
    """``pid`` if it is a pool process other than this one, else None.

    The gevent and eventlet pools report the id of a greenlet where prefork
    reports a process: taken for a pid, it looks like a process that died the
    moment the watchdog looks, and every callback longer than a watch interval
    would be counted as lost.
    """
    if not pid or pid == os.getpid() or pid > PID_MAX_LIMIT or not _process_exists(pid):
        return None
    return pid


def _process_exists(pid: int) -> bool:
    """True while ``pid`` is a live process (a zombie, killed but not reaped, is not)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return stat.read().rsplit(b")", 1)[-1].split()[0] != b"Z"
    except FileNotFoundError:
        return False
    except OSError:  # no /proc (macOS): ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


def _revoke_locally(task_id: str) -> None:
    """Mark ``task_id`` revoked in this worker only: a copy the broker redelivers is skipped."""
    with contextlib.suppress(Exception):
        from celery.worker import state

        state.revoked.add(task_id)


def _celery_requests() -> dict[str, Any] | None:
    """Celery's table of this worker's requests (received and not yet finished)."""
    try:
        from celery.worker import state
    except ImportError:  # pragma: no cover - Celery is a dependency
        return None
    return state.requests


class ReportReader:
    """One thread that BLPOPs the report lists of one Redis and hands each report on."""

    #: Seconds one BLPOP blocks; the thread notices a stop within this.
    BLOCK = 1

    def __init__(
        self,
        client_factory: Callable[[], redis.Redis],
        keys: list[str],
        sink: Callable[[Outcome], None],
        busy: threading.Event,
    ) -> None:
        self._client_factory = client_factory
        self.keys = keys
        self._sink = sink
        #: Set while an event is in flight; otherwise nothing can report, and the
        #: reader waits here instead of asking Redis.
        self._busy = busy
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stoker-reports", daemon=True)
        self.error: str | None = None

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()

    def join(self, timeout: float) -> None:
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def _connect_early(self) -> redis.Redis | None:
        """Connect before any event: a new leader's main process has better things to do.

        Otherwise the first event of the worker's first term makes this thread
        connect (and greet Redis) while that event is on its way to the pool.
        One connection per worker and Redis, idle until then: no command is
        sent while nothing is in flight.
        """
        try:
            client = self._client_factory()
            pool = getattr(client, "connection_pool", None)  # (a cluster client has one per node)
            if pool is not None:
                pool.release(pool.get_connection())  # connected and greeted; BLPOP reuses it
        except Exception:
            return None  # Redis is not up yet: connected on the first event
        return client

    def _run(self) -> None:
        backoff = 0.05
        client: redis.Redis | None = self._connect_early()
        while not self._stopping.is_set():
            if not self._busy.wait(self.BLOCK):
                continue
            try:
                if client is None:
                    client = self._client_factory()
                popped = client.blpop(self.keys, timeout=self.BLOCK)
                if self.error is not None:
                    logger.info("celery-stoker: reading reports again")
                    self.error = None
                backoff = 0.05
                if popped is None:
                    continue
                outcome = Outcome.from_json(popped[1])
                if outcome is not None:
                    self._sink(outcome)
            except Exception as exc:
                text = f"{exc.__class__.__name__}: {exc}"
                if text != self.error:
                    logger.warning(
                        "celery-stoker: cannot read event reports (%s); the pump still "
                        "notices finished events from Celery",
                        text,
                    )
                    self.error = text
                self._stopping.wait(backoff)
                backoff = min(backoff * 2, LOOP_BACKOFF_MAX)
        if client is not None:
            with contextlib.suppress(Exception):
                client.close()
