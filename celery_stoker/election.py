"""The election of one Stoker on one worker: follow, take the lease, hold it, step down.

It is ``Stoker.Activator``'s loop with a Redis lease in place of ``:global``:

* **follower**: try the lease; if someone holds it, note who and wait until
  that lease is released to us, or would expire (``lease.RedisLease.wait``);
* **leader**: renew every ``renew_interval``; start acting (the handler's
  ``start_acting``: the in-process hook, then ``now_leader`` first) once any
  earlier term must be over and enough workers are seen (``min_members``);
* **step down**: on a failed or late renewal (``lease_lost``), a stop
  (``worker_stopping``), an operator's handoff or drain, or too many failed
  events: stop events, let the handler say ``shutdown``, then release the
  lease (when it is still ours) so the next follower takes over at once.

One named thread per Stoker, ``stoker-lease:<name>``, runs it, so one Stoker's
slow hook or ``shutdown`` never makes another Stoker's renewal late (a single
loop for every Stoker would); the thread never waits on the broker or the
pool.  What the term *does* is the handler's business (``activator.py``); what the
election knows and shows is ``ElectionState`` (``election_state.py``); its
decisions about time are pure functions (``election_rules.py``).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time

import redis

from .election_rules import (
    FAILURE_COOLDOWN_MAX,
    RENEW_ATTEMPT,
    failure_cooldown,
    finish_wait,
    may_start_acting,
    next_hold_step,
    retry_wait,
)
from .election_state import (
    BACKOFF_MAX,
    BACKOFF_START,
    REDIS_DOWN,
    UNOBSERVED,
    ElectionObserver,
    ElectionState,
    Spread,
    TermHandler,
)
from .lease import Term

__all__ = [
    "BACKOFF_MAX",
    "BACKOFF_START",
    "FAILURE_COOLDOWN_MAX",
    "FIRST_EVENT_WAIT",
    "REDIS_DOWN",
    "RENEW_ATTEMPT",
    "ROUTINE_STEP_DOWNS",
    "UNOBSERVED",
    "Election",
    "ElectionObserver",
    "Spread",
    "TermHandler",
]

logger = logging.getLogger("celery_stoker.activator")

#: A new leader's bookkeeping (its record, the log line, the state copy) waits this
#: long at most for ``now_leader`` to start in the pool, so that it does not compete
#: with it for the interpreter: the failover ends when the callback starts.
FIRST_EVENT_WAIT = 0.05
#: Step-downs someone asked for (a stop, a handoff, a drain) or that min_members explains
#: (its suspension is the WARNING): logged at INFO.  Any other reason (a lost lease,
#: failures) is a WARNING, something a person should look at.
ROUTINE_STEP_DOWNS = frozenset(
    {"worker_stopping", "handoff", "drain", "below_min_members", "rebalance"}
)


class Election(ElectionState):
    """Elects, holds and hands over the lease of one Stoker on one worker.

    The loop on its own thread; what it knows and shows is its base, ``ElectionState``.
    """

    # ----------------------------------------------------------------- control

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._run_election, name=f"stoker-lease:{self.name}", daemon=True
        )
        self._thread.start()

    def begin_stopping(self) -> None:
        """The worker begins to stop: never acquire again (a plain flag; signal-safe)."""
        self._stopping = True

    def request_stop(self, reason: str = "worker_stopping") -> None:
        """Begin stepping down now, without waiting (safe from a signal handler)."""
        self._stopping = True
        if not self._stop.is_set():
            self._stop_reason = reason
            self._stop.set()
            self.lease.wake()

    def stop(self, timeout: float) -> bool:
        """Step down (release if leader) and end the thread; False if busy past ``timeout``."""
        self.request_stop(self._stop_reason)
        if self._thread is not None:
            self._thread.join(max(0.0, timeout))
            if self._thread.is_alive():
                return False
        self.lease.close()
        return True

    def request_step_down(self, reason: str) -> None:
        """Ask the election thread to step down and release now (from any thread)."""
        self._step_down_request = reason
        self.lease.poke_local()

    def request_handoff(self, token: int, to: str, reason: str = "rebalance") -> None:
        """Ask the election thread to hand term ``token`` to ``to`` (from any thread).

        A clean handoff, as an operator's: ``shutdown`` here once a running
        event is over, then the lease is reserved for ``to``.  Ignored when the
        term has ended meanwhile.
        """
        self._handoff_request = (token, reason, to)
        self.lease.poke_local()

    # ---------------------------------------------------------------- the loop

    def _run_election(self) -> None:
        if not self.eligible:
            self.state = "ineligible"
            logger.info("Stoker %s: %s may not lead it (eligible=...)", self.name, self.hostname)
            self._stop.wait()
            return
        backoff = BACKOFF_START
        while not self._stop.is_set():
            try:
                if self.term is None:
                    if not self._permitted():
                        continue
                    self._follow()
                else:
                    self._hold()
                backoff = BACKOFF_START
            except REDIS_DOWN as exc:
                self._redis_down(exc)
                self._note_election_error(exc)
                self._after_error(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX)
            except Exception as exc:
                # A refusal such as OOM, NOPERM or READONLY, or a bug: log it once, not
                # per retry; status shows it until it clears.
                text = f"{exc.__class__.__name__}: {exc}"
                if isinstance(exc, redis.exceptions.NoPermissionError) and self.access:
                    self.access.invalidate()  # the ACL changed: check it before electing again
                if text != self._last_error_text:
                    logger.exception("Stoker %s: election error (%s); retrying", self.name, text)
                    self._last_error_text = text
                self._note_election_error(exc)
                self._after_error(BACKOFF_MAX)
        try:
            if self.term is not None:
                self._step_down(self._stop_reason, release=True)
        except Exception:
            logger.exception("Stoker %s: error while stepping down at stop", self.name)
        self._leave_waiters()
        self.state = "unk"

    def _after_error(self, backoff: float) -> None:
        """Wait before the next try; a leader retries its renewal, never past its lease."""
        term = self.term
        left = None if term is None else term.time_left()
        self._stop.wait(retry_wait(backoff, left, self.settings.socket_timeout))
        if term is None:
            return
        self._renew_at = time.monotonic()  # retry the renewal now; _hold steps down if too late

    def _follow(self) -> None:
        cooldown = self._cooldown_until - time.monotonic()
        if cooldown > 0:
            # We just gave leadership away: let another worker take it first (a release,
            # even our own, must not cut this short).
            self._stop.wait(cooldown)
            self._cooldown_until = 0.0
            return
        if self._stopping:
            self._leave_waiters()
            self._stop.wait(1.0)  # the worker is stopping: never take the lease again
            return
        result = self.lease.acquire(min_token=self.highest_token)
        self._answered()
        if result.term is not None:
            if self._stopping:
                self._give_back(result.term)
                return
            self._become_leader(result.term)
            return
        holder = result.holder
        self._note_holder(holder)
        self.state = "follower"
        if result.draining != self.draining:
            self.draining = result.draining
            logger.info(  # an operator's doing (drain / undrain), not a fault
                "Stoker %s: %s is %s",
                self.name,
                self.hostname,
                "draining: it will not lead" if self.draining else "no longer draining",
            )
        timeout = self.lease.wait_timeout(holder) if holder is not None else 0.0
        if self.draining:
            timeout = max(timeout, self.settings.lease_ttl)
        self.lease.wait(timeout)

    def _give_back(self, term: Term) -> None:
        """Release a lease taken while the worker began to stop: no hook, no event.

        The acquire was in flight when the stop began; the next waiter tries at once.
        """
        self.highest_token = max(self.highest_token, term.token)
        released = self._release(term)
        logger.info(
            "Stoker %s: %s took the lease (token %d) as it began to stop; %s at once",
            self.name,
            self.hostname,
            term.token,
            "released it" if released else "it was no longer held",
        )

    def _become_leader(self, term: Term) -> None:
        self.suspended = True  # not acting until _check_acting says so
        self.term = term
        self.accepting = False
        self._acted = False
        self._renew_at = time.monotonic() + self.settings.renew_interval
        self.highest_token = max(self.highest_token, term.token)
        self.state = "leader"
        self.leader = self.hostname
        self.leader_token = term.token
        self.active_from = time.time()
        self.terms_won += 1
        self.metrics.term_won(self.name)
        self.draining = False
        self._handoff_request = None  # asked of an earlier term
        self._act_not_before = time.monotonic() + self._quarantine(term)
        if len(self._members()) < self.min_members:
            self._suspend(term)
        # Act first (now_leader is on its way), then the bookkeeping: a failover is
        # not slowed by the record, the log line or the state copy.
        self._check_acting(term)
        if self.accepting:
            self.handler.event_started(FIRST_EVENT_WAIT)
        logger.info("Stoker %s: %s became leader (token %d)", self.name, self.hostname, term.token)
        members = sorted(self._members())
        self._record(
            {
                "leader": self.hostname,
                "token": term.token,
                "active_from": self.active_from,
                "followers": [m for m in members if m != self.hostname],
            },
            transition={
                "at": self.active_from,
                "event": "elected",
                "node": self.hostname,
                "token": term.token,
            },
        )
        self.handler.term_won(term)
        self._emit("stoker-elected", name=self.name, token=term.token)

    def _start_acting(self, term: Term) -> None:
        """Begin the term's work: the hook, then now_leader as the term's first event."""
        self.suspended = False
        self._acted = True
        # Accepting first, so the pump never finds the new lane's now_leader unwanted; a
        # cluster_change cannot come before it (the lane takes none until it begins,
        # and now_leader carries the members anyway).
        self.accepting = True
        self.handler.start_acting(term)

    def _check_acting(self, term: Term) -> None:
        """Start or stop acting on the held term: quarantine over, enough workers seen."""
        enough = len(self._members()) >= self.min_members
        may_start = may_start_acting(
            now=time.monotonic(),
            act_not_before=self._act_not_before,
            left=term.time_left(),
            socket_timeout=self.settings.socket_timeout,
            stopping=self._stopping,  # a stopping worker starts no term (it releases it next)
        )
        if self.suspended and enough and may_start:
            if self._acted:
                logger.info("Stoker %s: enough workers again; acting", self.name)
                self._emit("stoker-resumed", name=self.name, token=term.token)
            self._start_acting(term)
        elif not self.suspended and not enough:
            self.accepting = False
            self.handler.stop_events()
            self.handler.events_idle(min(self._event_grace, term.time_left() / 2))
            self._suspend(term)
            self.handler.stop_acting(term, "below_min_members", lost=False)

    def _hold(self) -> None:
        term = self.term
        assert term is not None
        while not self._stop.is_set():
            renew_at = self._renew_at
            self._check_acting(term)
            left = term.time_left()
            step = next_hold_step(
                now=time.monotonic(),
                renew_at=renew_at,
                left=left,
                socket_timeout=self.settings.socket_timeout,
                suspended=self.suspended,
                act_not_before=self._act_not_before,
            )
            if step.action == "step_down":
                # A renewal sent now might answer after our lease ends: stop acting first.
                self._step_down("lease_lost", release=False)
                return
            if step.action == "renew":
                break
            if self.lease.wait_poked(step.wait) and self.lease.poked_by_operator():
                break  # an operator asked: renew now and hear why
            if self._step_down_request is not None or self._handoff_request is not None:
                break
        if self._stop.is_set():
            return
        handoff, self._handoff_request = self._handoff_request, None
        if handoff is not None and handoff[0] == term.token and self.accepting:
            _, reason, target = handoff
            self._step_down(reason, release=True, reserve_for=target)
            self._cooldown_until = time.monotonic() + self.settings.lease_ttl
            return
        if self._step_down_request is not None:
            reason, self._step_down_request = self._step_down_request, None
            self._step_down(reason, release=True)
            self.failure_step_downs += 1
            cooldown = failure_cooldown(self.settings.lease_ttl, self.failure_step_downs)
            self._cooldown_until = time.monotonic() + cooldown
            logger.warning(
                "Stoker %s: %s leaves it to other workers for %.1f s",
                self.name,
                self.hostname,
                cooldown,
            )
            return
        sent_at = time.monotonic()
        renewed = self.lease.renew(term)
        self._answered()
        self.metrics.lease_renewed(self.name, self._redis_ok_at - sent_at)
        self._renew_at = self._redis_ok_at + self.settings.renew_interval
        if not renewed:
            if self.lease.vanished:
                self._log_vanished(term)
            # Redis no longer holds this term: its shutdown is stale (commit refused).
            self._step_down("lease_lost", release=False, stale=True)
            return
        request = self.lease.step_down_request
        if request is not None:
            kind, to = request
            self._step_down(kind, release=True, reserve_for=to)
            self._cooldown_until = time.monotonic() + self.settings.lease_ttl

    def _step_down(
        self, reason: str, *, release: bool, reserve_for: str | None = None, stale: bool = False
    ) -> None:
        """Stop acting on the current term: no more events, ``shutdown`` here, then release."""
        term = self.term
        if term is None:
            return
        self.accepting = False
        self._step_down_request = None  # asked of this term: the next one starts clean
        self.handler.stop_events()
        log = logger.info if reason in ROUTINE_STEP_DOWNS else logger.warning
        log("Stoker %s: %s steps down (%s)", self.name, self.hostname, reason)
        self.metrics.stepped_down(self.name, reason)
        if release:
            self._finish_running_event(term)
            with contextlib.suppress(redis.RedisError):
                # A whole TTL for shutdown and the release, and from here no event of this
                # term may start in the pool (one already running was waited for above):
                # shutdown is the term's last event.  One round trip.  (After a loss
                # there is no time for this: the term ends in Redis soon.)
                self.lease.close_term(term)
        self.term = None
        self.state = "follower"
        self.active_from = None
        was_suspended, self.suspended = self.suspended, False
        if not was_suspended:  # a suspended leader already said shutdown
            self.handler.stop_acting(term, reason, lost=not release, stale=stale)
        if release:
            try:
                if self._release(term, reserve_for=reserve_for):
                    logger.info(
                        "Stoker %s: lease released (token %d)%s",
                        self.name,
                        term.token,
                        f" to {self.lease.named}" if self.lease.named else "",
                    )
            except (redis.RedisError, OSError) as exc:
                # Unreachable, or refused (an ACL, OOM): never the end of this thread.
                logger.warning(
                    "Stoker %s: could not release the lease (%s: %s); it expires in %.1f s",
                    self.name,
                    exc.__class__.__name__,
                    exc,
                    self.settings.lease_ttl,
                )
        self._record(
            None,
            transition={
                "at": time.time(),
                "event": "stepped_down",
                "node": self.hostname,
                "token": term.token,
                "reason": reason,
                **({"to": reserve_for} if reserve_for else {}),
            },
        )
        self._emit(
            "stoker-stepped-down", name=self.name, token=term.token, reason=reason, to=reserve_for
        )
        self.stepped_down = term.token

    def _finish_running_event(self, term: Term) -> None:
        """Let an event already in the pool finish before ``shutdown`` (one at a time).

        At most :attr:`_event_grace`; the lease is renewed meanwhile, so a long
        TTL is not needed for this.
        """
        # One the worker has not even received will not start: no waiting for it.
        self.handler.withdraw_unreceived()
        deadline = time.monotonic() + self._event_grace
        while not self.handler.events_idle(0):
            wait = finish_wait(
                deadline=deadline,
                now=time.monotonic(),
                renew_interval=self.settings.renew_interval,
                left=term.time_left(),
                socket_timeout=self.settings.socket_timeout,
            )
            if wait <= 0 or self.handler.events_idle(wait):
                break
            with contextlib.suppress(redis.RedisError):
                if not self.lease.renew(term):
                    return

    def _release(self, term: Term, *, reserve_for: str | None = None) -> bool:
        """Release ``term``, naming the least loaded live waiter when leadership is spread."""
        order = self.spread.release_order(self.name) if self.spread is not None else None
        if order:
            # The ordered candidates first, then every other live worker (the filter).
            live = order + sorted(self._live_nodes() - set(order))
            released = self.lease.release(term, reserve_for=reserve_for, live=live, ordered=True)
        else:
            released = self.lease.release(term, reserve_for=reserve_for, live=self._live_nodes())
        if released and self.spread is not None:
            self.spread.released(self.name, self.lease.named, term.token)
        return released
