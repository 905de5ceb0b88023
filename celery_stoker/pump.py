"""One event pump per worker: sends each Stoker's events to the pool, one at a time, in order.

Every Stoker this worker leads has a *lane* (``lanes.py``): the events waiting
to be sent, the one in flight, and its next timer.  One thread
(``stoker-pump``) serves every lane: it sends a lane's next event as the
dispatch task to the worker's pool (``delivery.py``) only once the previous
event of that lane is over, and keeps every lane's timer, and every backoff,
in one heap.  Its watch (``watch.py``) learns when an event is over -- from
the event's report, from Celery, or from its watchdog, which runs on this
thread between sends -- and hands it back here (:meth:`EventPump.finish`),
where the lane decides what comes next.

So no event of a Stoker starts while another of the same Stoker may still
run.  Different Stokers' events still run side by side in the pool.

The election stays one thread per Stoker (see ``activator.py``): user hooks
and ``shutdown`` run on it, and a shared election loop would let one slow hook
make another Stoker's renewal late.  The pump never waits on a user callback
(they run in the pool), so one thread serves every lane.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from .lanes import InFlight, Lane, LaneOwner, PendingEvent
from .outcome import Outcome
from .watch import WATCH_INTERVAL, EventWatch, event_fingerprint

logger = logging.getLogger("celery_stoker.pump")

#: Longest single wait of the pump: a timer further away than this is waited in parts,
#: so any ``next_timer_in`` value is safe.
MAX_WAIT = 3600.0
#: Pause before sending again an event the broker refused.
SEND_RETRY = 0.5
#: Backoff of the pump's loop after an unexpected error.
LOOP_BACKOFF_MAX = 5.0


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
        self._warm_up: Callable[[], None] | None = None
        #: Its watch over the events in flight (reports, Celery, the watchdog, the gate).
        self.watch = EventWatch(hostname, self._lanes, self._cond, self.finish)
        #: The pump's own fault, shown in status until it clears.
        self.error: str | None = None
        self.error_since: float | None = None

    # ------------------------------------------------------------ wiring

    def add_lane(self, owner: LaneOwner) -> None:
        """Serve ``owner``'s Stoker (before :meth:`start`)."""
        lane = Lane(owner)
        lane.idle.set()
        lane.started.set()
        self._lanes[owner.name] = lane

    def start(self, warm_up: Callable[[], None] | None = None) -> None:
        """Start the pump thread; it first runs ``warm_up`` (what a first send would pay)."""
        self.watch.start()
        self._warm_up = warm_up
        self._thread = threading.Thread(target=self._run, name="stoker-pump", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self.watch.stop()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
        self.watch.join(timeout)

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
            lane.reset_retries()
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
        self.finish(name, item.token, item.seq, outcome, task_id=inflight.task_id)
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

    def finish(
        self,
        name: str,
        token: int,
        seq: int,
        outcome: Outcome,
        *,
        task_id: str | None = None,
    ) -> None:
        """End the event in flight if it is this one (the first word on it wins).

        Called by the watch (a report, Celery, the watchdog) and by
        :meth:`withdraw_unreceived`; the lane then decides what comes next.
        """
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
        now = time.monotonic()
        after = lane.after(item, outcome, now)
        if after.again:
            self._send_again(lane, item, attempt=after.attempt, until=after.until)
        if after.timer_at is not None:
            self._arm_timer(lane, after.timer_at)

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
            self.watch.busy.clear()

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
        self.watch.look(time.monotonic())
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
            self.watch.busy.set()
            lane.timer_due = None  # re-armed from the event's own answer
            return item, task_id
        return None

    def _send(self, lane: Lane, item: PendingEvent, task_id: str) -> None:
        name = lane.owner.name
        try:
            args = lane.owner.event_args(item)
            restarts = self.watch.restarts()
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
