"""The watch over a worker's events in flight: who may run one, and when it is over.

The pump (``pump.py``) sends a Stoker's next event only once the last one is
over.  This watch is how it learns that, in one of three ways:

* its **report**, pushed by the task to the worker's report list in Redis and
  read by one ``stoker-reports`` thread per Redis (``reports.py``: a single
  BLPOP for every Stoker of the worker);
* **what Celery saw**, told by the dispatch task's request class in this
  process (``gate.py``): the pool process running it was lost
  (``WorkerLostError``: a crash, an OOM kill, ``os._exit``) or a hard time
  limit ended it.  Noticed within milliseconds, not after a report timeout;
* the **watchdog**, on the pump's thread: a request the worker has finished
  or dropped (it left Celery's own table of requests) whose report never
  came, for instance because Redis refused the write, is over after a short
  grace; a pool process that died is seen at once; a message the worker never
  saw at all is given up after :data:`UNSEEN_TIMEOUT`, or, sent through the
  broker, as soon as the consumer is back from a lost broker connection (the
  broker may have deleted the worker's event queue with it meanwhile), and
  revoked in this worker, so it can never run later beside a newer event.

So no event of a Stoker starts while another of the same Stoker may still
run, and nothing waits on a report that cannot come.

It also judges who may run an event (:meth:`EventWatch.admit`): only the
message the pump sent for the event it has in flight, once.  The dispatch
request asks it in the worker's main process, before the pool gets the
request, so the verdict is made where the truth is kept.

The watch works on the pump's lanes (``lanes.py``) under the pump's lock, and
hands an event that is over back to the pump (its ``finish``), which decides
what comes next.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import redis

from .lanes import InFlight, Lane
from .outcome import DISPATCH_TASK, Outcome
from .pids import process_exists
from .reports import ReportReader

# The pump's logger: these lines were the pump's, and users filter by its name.
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
#: Longest the pump waits for a pool process that a hard time limit is killing.
KILL_WAIT = 5.0
#: A pool process still running an event this long past its hard limit is killed by the pump.
LIMIT_GRACE = 1.0
#: Why the watchdog ended an event that finished without a report.
REPORT_MISSING = (
    "finished, but its report never arrived (Redis refused or lost it; said once "
    "until a report arrives again)"
)
#: No process id on Linux is above this (``PID_MAX_LIMIT``); a green pool's "pid" is.
PID_MAX_LIMIT = 1 << 22

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

_watches: dict[str, EventWatch] = {}
_watches_lock = threading.Lock()


def watch_of(hostname: str) -> EventWatch | None:
    """The watch of the worker called ``hostname`` in this process, if its pump runs."""
    with _watches_lock:
        return _watches.get(hostname)


def event_fingerprint(args: Any) -> str:
    """The dispatch task's arguments in one canonical form, as sent and as received.

    Compared by :meth:`EventWatch.admit`: what the broker or the consumer decoded
    (lists for tuples, and so on) must match what the pump sent.
    """
    return json.dumps(args, sort_keys=True, separators=(",", ":"), default=str)


@dataclass(frozen=True)
class Refusal:
    """Why a dispatch message may not run its callback (see :meth:`EventWatch.admit`)."""

    #: One of :data:`REFUSALS`.
    why: str
    #: The same, in words, for the log.
    text: str


class Finish(Protocol):
    """The pump's end of an event in flight (the first word on it wins)."""

    def __call__(
        self, name: str, token: int, seq: int, outcome: Outcome, *, task_id: str | None = None
    ) -> None: ...


class EventWatch:
    """Watches the events in flight of one worker's pump; see the module docstring."""

    def __init__(
        self,
        hostname: str,
        lanes: dict[str, Lane],
        cond: threading.Condition,
        finish: Finish,
    ) -> None:
        self.hostname = hostname
        #: The pump's lanes and the lock that guards them.
        self._lanes = lanes
        self._cond = cond
        self._finish = finish
        self._readers: list[ReportReader] = []
        #: Set while any event is in flight (the pump sets and clears it): only then
        #: do the report readers ask Redis (an idle worker, follower or leader, sends
        #: no BLPOP).
        self.busy = threading.Event()
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

    def add_reports(self, client_factory: Callable[[], redis.Redis], keys: Iterable[str]) -> None:
        """Read reports from ``keys`` (one Redis) with one BLPOP thread."""
        self._readers.append(
            ReportReader(client_factory, sorted(set(keys)), self.reported, self.busy)
        )

    def start(self) -> None:
        """Be this worker's watch: Celery's requests and signals reach it; read reports."""
        with _watches_lock:
            _watches[self.hostname] = self
        self._watch_celery_signals(connect=True)
        for reader in self._readers:
            reader.start()

    def stop(self) -> None:
        """Tell the report readers to stop (and wake them); :meth:`join` waits for them."""
        for reader in self._readers:
            reader.stop()
        self.busy.set()  # wake the readers so they see the stop

    def join(self, timeout: float) -> None:
        """Wait for the readers, and let go of Celery's signals and this worker's name."""
        for reader in self._readers:
            reader.join(timeout)
        self._watch_celery_signals(connect=False)
        with _watches_lock:
            if _watches.get(self.hostname) is self:
                del _watches[self.hostname]

    def restarts(self) -> int | None:
        """How often the worker's consumer has restarted, if it is known; never raises."""
        try:
            return self.consumer_restarts() if self.consumer_restarts is not None else None
        except Exception:
            return None

    # ------------------------------------------- who may run the event in flight

    def admit(self, task_id: str, args: Any, request: Any, source: object) -> Refusal | None:
        """May the dispatch message ``task_id`` run its callback now?  None if it may.

        Only the event the pump has in flight for a Stoker may run, only the
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
            if pid and pid != os.getpid() and process_exists(pid):
                # A hard time limit: Celery tells us just before it kills the pool
                # process.  The next event waits until it is gone, so two never run at
                # once (the watchdog ends this one then).
                inflight.killing_pid, inflight.killed_outcome = pid, outcome
                inflight.killing_since = time.monotonic()
                self._cond.notify_all()
                return
        self._finish(name, token, seq, outcome, task_id=task_id)

    # ------------------------------------------------------- the watchdog

    def look(self, now: float) -> None:
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
            if outcome.kind == "error":  # (lost ones are logged by the pump's finish)
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
            gone = not process_exists(inflight.killing_pid or 0)
            if gone or now - inflight.killing_since > KILL_WAIT:
                return inflight.killed_outcome
            return None
        limit = lane.owner.time_limit
        if (
            limit is not None
            and inflight.pid is not None
            and inflight.started_at is not None
            and time.time() - inflight.started_at > limit + LIMIT_GRACE
            and process_exists(inflight.pid)
        ):
            # Past its hard limit and Celery has not killed it: its timers run on the
            # event loop, which stops during a warm shutdown.  Kill it here.
            with contextlib.suppress(OSError):
                os.kill(inflight.pid, signal.SIGKILL)
            inflight.killing_pid, inflight.killing_since = inflight.pid, now
            inflight.killed_outcome = ended("timeout", f"hard time limit ({limit:g} s) exceeded")
            return None
        if inflight.pid is not None and not process_exists(inflight.pid):
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

    def _reconnected_since(self, inflight: InFlight) -> bool:
        """The consumer lost the broker after ``inflight`` was sent, and is connected again."""
        then = inflight.restarts
        if then is None or self.consumer_connected is None:
            return False
        now = self.restarts()
        try:
            connected = self.consumer_connected()
        except Exception:
            return False
        return connected and now is not None and now > then

    def _why_dropped(self, lane: Lane, inflight: InFlight) -> str:
        """Why an event left the worker before a pool process started it: only what is known.

        A broker loss is said only when the consumer did restart since the event
        was sent; the old text said so of every drop, and a stepping-down leader
        whose event waited for a recycled pool process logged a broker loss that
        never happened.
        """
        if lane.token != inflight.item.token:
            return "was not started: its term ended first (the stopping worker dropped it)"
        now, then = self.restarts(), inflight.restarts
        if now is not None and then is not None and now > then:
            return (
                "dropped by the worker before it started (the broker connection was lost); "
                "sent again"
            )
        return "dropped by the worker before a pool process started it; sent again"

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


def _pool_process(pid: int | None) -> int | None:
    """``pid`` if it is a pool process other than this one, else None.

    The gevent and eventlet pools report the id of a greenlet where prefork
    reports a process: taken for a pid, it looks like a process that died the
    moment the watchdog looks, and every callback longer than a watch interval
    would be counted as lost.
    """
    if not pid or pid == os.getpid() or pid > PID_MAX_LIMIT or not process_exists(pid):
        return None
    return pid


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
