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
pool.  What the term *does* is the handler's business (``activator.py``).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

import redis

from .access import AccessCheck
from .connection import is_cluster_client, tls_timeout_hint
from .lease import Holder, RedisLease, Term
from .settings import StokerSettings
from .store import StokerStore

logger = logging.getLogger("celery_stoker.activator")

REDIS_DOWN = (redis.ConnectionError, redis.TimeoutError, OSError)
#: Backoff while Redis is unreachable: first try, and the most between tries.
BACKOFF_START = 0.05
BACKOFF_MAX = 0.5
#: A renewal may take a reconnect and the command, each up to the socket timeout:
#: a holder with less validity left than this many timeouts steps down instead.
RENEW_ATTEMPT = 2
#: After a ``too_many_failures`` step-down this worker leaves the Stoker to others
#: for one lease TTL, doubling on each repeat up to this (or one TTL, if longer).
FAILURE_COOLDOWN_MAX = 300.0
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


class ElectionObserver(Protocol):
    """What an election reports as it runs, to whoever watches it (``metrics.py``).

    The election owns this protocol and imports nothing of its observers.
    The calls come on the election's thread: they must be quick and never raise.
    """

    def term_won(self, name: str) -> None:
        """This worker won a term of ``name``."""

    def stepped_down(self, name: str, reason: str) -> None:
        """This worker stepped down from ``name`` (``reason`` as the transition shows it)."""

    def lease_renewed(self, name: str, seconds: float) -> None:
        """A renewal of ``name``'s lease answered after ``seconds``."""


class _Unobserved:
    """No observer: the election reports to nobody."""

    def term_won(self, name: str) -> None:
        pass

    def stepped_down(self, name: str, reason: str) -> None:
        pass

    def lease_renewed(self, name: str, seconds: float) -> None:
        pass


#: The observer of an election nobody watches (metrics off).
UNOBSERVED: ElectionObserver = _Unobserved()


class Spread(Protocol):
    """Where leadership should go when this worker lets a lease go (``balancer.py``)."""

    def release_order(self, name: str) -> list[str] | None:
        """The live workers a release should name first, the least loaded first; None: no view."""

    def released(self, name: str, node: str | None, token: int) -> None:
        """A release of ``name``'s term ``token`` named ``node`` (None: nobody)."""

    def expiry_position(self, name: str) -> int | None:
        """At an expiry, the head starts this worker gives the others (None: its rank decides)."""


class TermHandler(Protocol):
    """What a term does, on the election's thread (the activator implements it)."""

    def term_won(self, term: Term) -> None:
        """This worker holds a new term (it may not act yet)."""

    def start_acting(self, term: Term) -> None:
        """Begin the term's work: the ``leader_started`` hook, then ``now_leader``."""

    def stop_events(self) -> None:
        """Send no new event of the current term."""

    def events_idle(self, timeout: float) -> bool:
        """Wait up to ``timeout`` until no event is in the pool; True if none is."""

    def event_started(self, timeout: float) -> bool:
        """Wait up to ``timeout`` until the event sent last has started; True if it has."""

    def withdraw_unreceived(self) -> bool:
        """Take back the event in flight if the worker has not received it; True if so."""

    def stop_acting(self, term: Term, reason: str, *, lost: bool, stale: bool = False) -> None:
        """End the term's work: ``leader_stopping``, then ``shutdown`` (``lost``: from a copy).

        ``stale``: Redis no longer holds this term (another took it, or the lease
        vanished): ``shutdown`` is told so, and its commit will be refused.
        """


class Election:
    """Elects, holds and hands over the lease of one Stoker on one worker."""

    def __init__(
        self,
        name: str,
        settings: StokerSettings,
        *,
        lease: RedisLease,
        store: StokerStore,
        hostname: str,
        handler: TermHandler,
        members: Callable[[], frozenset[str]],
        eligible: bool = True,
        min_members: int = 1,
        emit: Callable[..., None] | None = None,
        metrics: ElectionObserver = UNOBSERVED,
        access: AccessCheck | None = None,
        spread: Spread | None = None,
    ) -> None:
        self.name = name
        #: Who a release names, and when a waiter tries at an expiry (None: first come).
        self.spread = spread
        if spread is not None:
            lease.expiry_position = lambda: spread.expiry_position(name)
        #: Whether this worker's Redis user may run what the election needs (ACLs).
        self.access = access
        self.settings = settings
        self.lease = lease
        self.store = store
        self.client = store.client
        self.hostname = hostname
        self.handler = handler
        self._members = members
        self.eligible = eligible
        self.min_members = min_members
        self._emit = emit or (lambda *args, **kwargs: None)
        self.metrics = metrics

        # What dump() shows, as in the original's state map.
        self.state = "unk"
        self.created_at = time.time()
        self.active_from: float | None = None
        self.leader: str | None = None
        self.leader_token: int | None = None
        self.highest_token = 0
        self.terms_won = 0
        self.draining = False
        #: True while this leader holds the lease but sees fewer than min_members.
        self.suspended = False
        #: The term this worker holds, or None.
        self.term: Term | None = None
        #: False from the moment a leader starts stepping down: no new events.
        self.accepting = False
        #: Step-downs for too many failures since the last successful event.
        self.failure_step_downs = 0
        #: The election loop's current fault, shown in status until it clears.
        self.error: str | None = None
        self.error_since: float | None = None
        #: After giving leadership away, do not take it straight back (monotonic).
        self._cooldown_until = 0.0
        #: A term that found Redis without history acts only from then (see _quarantine).
        self._act_not_before = 0.0
        #: Whether the current term has acted yet (resuming vs. starting).
        self._acted = False
        #: When Redis last answered an election command (monotonic).
        self._redis_ok_at = 0.0
        #: When the holder renews next (monotonic); moved earlier to retry after an error.
        self._renew_at = 0.0
        self._last_error_text: str | None = None
        self._record_error: str | None = None
        #: Set from another thread when this worker should give the Stoker up.
        self._step_down_request: str | None = None
        #: Set from another thread to hand the term over: (token, reason, worker).
        self._handoff_request: tuple[int, str, str] | None = None
        #: The token of the last term whose step-down is over (shutdown run, lease released).
        self.stepped_down: int | None = None
        self._stop = threading.Event()
        self._stop_reason = "worker_stopping"
        #: Set (a plain assignment: safe in a signal handler) once the worker begins to
        #: stop: from then on this election never takes the lease.
        self._stopping = False
        self._vanished_logged = False
        self._redis_down_since: float | None = None
        self._foreign_logged: bytes | None = None
        self._other_app_logged: str | None = None
        self._thread: threading.Thread | None = None
        self._left = False  # out of the waiters for good (the worker stops)

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

    def resting(self) -> bool:
        """True while this worker leaves the Stoker to others (after giving it away)."""
        return self._cooldown_until > time.monotonic()

    def recheck(self) -> None:
        """Make a holder look at its state now (a member came or went: min_members)."""
        if self.term is not None and self.min_members > 1:
            self.lease.poke_local()

    @property
    def _event_grace(self) -> float:
        """Longest a stepping-down leader waits for its event in the pool: half the stop budget.

        Its ``shutdown`` comes after that event, so the two never overlap unless
        the event outlives this; then its late commit is refused (see ``store``).
        """
        return self.settings.stop_timeout / 2

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

    def _leave_waiters(self) -> None:
        """Once, as the worker stops: out of the waiters, so no release names it again.

        Without this a stopped follower stayed a waiter for good (with gossip off
        nothing else knew it was gone): every release named it first and the
        live ones behind waited 50 ms per dead one ahead.  A worker killed
        without it is dropped by the scripts (its listener is gone, ``scripts.py``).
        """
        if self._left or not self.eligible:
            return
        self._left = True
        try:
            self.lease.leave()
        except Exception as exc:  # Redis down: the next script that looks drops it
            logger.debug("Stoker %s: could not leave the waiters (%s)", self.name, exc)

    def _permitted(self) -> bool:
        """True when this worker's Redis user may run what the election needs.

        While it may not, the election does not run at all (no flapping): the
        fault shows in ``health`` and the check is repeated quietly.
        """
        if self.access is None:
            return True
        refused = self.access.refused()
        if not refused:
            return True
        self.state = "unk"
        self.error = self.access.describe()
        if self.error_since is None:
            self.error_since = time.time()
        self._stop.wait(max(BACKOFF_MAX, self.access.retry_in()))
        return False

    def _answered(self) -> None:
        """A lease command was answered: the election works, so clear its fault now.

        Cleared here, not at the end of a loop turn: a follower's turn lasts as long
        as the leader keeps renewing (its wait moves with each renewal), so a fault
        that ended would show in ``health`` until the leader changed; and a turn
        that only stepped down (no command answered) is no sign of recovery.
        """
        self._redis_ok_at = time.monotonic()
        self._last_error_text = None
        if self.error is not None:
            logger.info("Stoker %s: election working again", self.name)
            self.error = self.error_since = None
        if self._redis_down_since is not None:
            self._redis_back()

    def _note_election_error(self, exc: BaseException) -> None:
        self.error = f"{exc.__class__.__name__}: {exc}"
        if self.error_since is None:
            self.error_since = time.time()

    def _after_error(self, backoff: float) -> None:
        """Wait before the next try; a leader retries its renewal, never past its lease."""
        term = self.term
        if term is None:
            self._stop.wait(backoff)
            return
        wait = min(backoff, term.time_left() - RENEW_ATTEMPT * self.settings.socket_timeout)
        self._stop.wait(max(0.0, wait))
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

    def _note_holder(self, holder: Holder | None) -> None:
        if holder is None:
            return
        if holder.foreign:
            if holder.raw != self._foreign_logged:
                logger.error(
                    "Stoker %s: the lease key %s holds a value celery-stoker did not write "
                    "(%r); no worker can lead until it expires or is deleted",
                    self.name,
                    self.lease.lease_key,
                    holder.raw[:80],
                )
                self._foreign_logged = holder.raw
            self.leader = None
            return
        self._foreign_logged = None
        if holder.reserved_for is not None:
            self.leader = None  # handed over, not yet taken by the worker it is kept for
            return
        if holder.hostname != self.leader:
            logger.info(
                "Stoker %s: following %s (token %s)", self.name, holder.hostname, holder.token
            )
        self._note_other_app(holder)
        self.leader = holder.hostname
        self.leader_token = holder.token
        self.highest_token = max(self.highest_token, holder.token or 0)

    def _note_other_app(self, holder: Holder) -> None:
        """Warn once per holding app when a worker of another app holds this Stoker's lease.

        Two apps whose Stokers share a name and a key prefix share one lease:
        only one of them ever runs.  Said again only when the holding app changes.
        """
        mine = self.lease.app
        if not holder.app or not mine or holder.app == mine:
            return
        if self._other_app_logged == holder.app:
            return
        self._other_app_logged = holder.app
        logger.warning(
            "Stoker %s: its lease %s is held by %s, a worker of app %s, not of this app %s: "
            "two apps whose Stokers share a name and stoker_key_prefix share one lease, so "
            "only one of them runs; give each app its own stoker_key_prefix (or its Stoker "
            "another name)",
            self.name,
            self.lease.lease_key,
            holder.hostname,
            holder.app,
            mine,
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

    def _quarantine(self, term: Term) -> float:
        """How long a term that found Redis without its history must wait before acting.

        The fencing counter never expires, so a missing one means Redis lost its
        data (a restart without persistence, a flush) or this is the first
        election ever.  Either way an earlier leader may still count its lease
        valid on its own clock: its last renewal came before Redis started, so
        its term is surely over ``ttl`` after that.  Waiting ``ttl - uptime``
        keeps two leaders from acting at once, and costs nothing on a Redis
        that has been up longer than one TTL.
        """
        if term.history_lost is not None:
            return self._history_lost_wait(term, term.history_lost)
        if not term.fresh:
            return 0.0
        try:
            # On a Redis Cluster the node that lost the counter may be a replica promoted
            # a moment ago (its uptime says nothing of when it began to serve the slot):
            # wait the whole TTL.
            uptime = (
                0.0
                if is_cluster_client(self.client)
                else float(self.client.info("server").get("uptime_in_seconds", 0))
            )
        except (redis.RedisError, OSError, ValueError):
            uptime = 0.0
        wait = max(0.0, self.settings.lease_ttl - uptime)
        if wait > 0:
            # INFO: this is every fleet's first start on a new Redis.  A Redis that lost
            # what a worker had seen is the lost-history path above, at WARNING.
            logger.info(
                "Stoker %s: Redis holds no record of earlier terms (restarted empty?); %s "
                "holds the lease but acts in %.1f s, once any earlier leader's term is over",
                self.name,
                self.hostname,
                wait,
            )
        return wait

    def _history_lost_wait(self, term: Term, lost: tuple[int, int]) -> float:
        """A term that found Redis behind the fleet: say so once, and wait a whole TTL.

        The counter was below a token this worker saw: Redis was restored from
        an older snapshot, or a replica was promoted without the last writes.
        An earlier leader may still count its lease valid, and neither Redis's
        uptime (a promoted replica's says nothing) nor the restored lease tells
        when its term ends, so the term acts only after a whole TTL.  The
        callbacks of the term hear it as ``context.history_lost``.
        """
        seen, held = lost
        wait = self.settings.lease_ttl
        logger.warning(
            "Stoker %s: Redis holds less history than the fleet has seen: its token "
            "counter was at %s, but token %d was seen (restored from an older snapshot, or "
            "a replica promoted without the last writes?); the stored state may be older "
            "than the last one committed. %s holds the lease (token %d) but acts in %.1f s, "
            "once any earlier leader's term is over; its callbacks see "
            "context.history_lost",
            self.name,
            held if not term.fresh else "none (missing)",
            seen,
            self.hostname,
            term.token,
            wait,
        )
        return wait

    def _start_acting(self, term: Term) -> None:
        """Begin the term's work: the hook, then now_leader as the term's first event."""
        self.suspended = False
        self._acted = True
        # Accepting first, so the pump never finds the new lane's now_leader unwanted; a
        # cluster_change cannot come before it (the lane takes none until it begins,
        # and now_leader carries the members anyway).
        self.accepting = True
        self.handler.start_acting(term)

    def _suspend(self, term: Term) -> None:
        """Hold the lease but stop acting: too few workers are visible (min_members)."""
        self.suspended = True
        logger.warning(
            "Stoker %s: %s sees %d of the %d workers it needs; not acting until it sees more",
            self.name,
            self.hostname,
            len(self._members()),
            self.min_members,
        )
        self._emit("stoker-suspended", name=self.name, token=term.token)

    def _check_acting(self, term: Term) -> None:
        """Start or stop acting on the held term: quarantine over, enough workers seen."""
        enough = len(self._members()) >= self.min_members
        may_start = (
            not self._stopping  # a stopping worker starts no term (it releases it next)
            and time.monotonic() >= self._act_not_before
            and term.time_left() > RENEW_ATTEMPT * self.settings.socket_timeout
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
            if left <= RENEW_ATTEMPT * self.settings.socket_timeout:
                # A renewal sent now might answer after our lease ends: stop acting first.
                self._step_down("lease_lost", release=False)
                return
            now = time.monotonic()
            if now >= renew_at:
                break
            wait = min(renew_at - now, left - self.settings.socket_timeout)
            if self.suspended and self._act_not_before > now:
                wait = min(wait, self._act_not_before - now)
            if self.lease.wait_poked(wait) and self.lease.poked_by_operator():
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
            ttl = self.settings.lease_ttl
            cooldown = min(ttl * 2 ** (self.failure_step_downs - 1), max(ttl, FAILURE_COOLDOWN_MAX))
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

    def _log_vanished(self, term: Term) -> None:
        """Our lease is gone from Redis while our own validity still runs: say so, once."""
        if self._vanished_logged:
            return
        self._vanished_logged = True
        policy = self.access.policy if self.access is not None else None
        logger.warning(
            "Stoker %s: the lease (token %d) vanished from Redis %.2f s before its expiry: "
            "possible eviction (maxmemory-policy %s; celery-stoker needs noeviction), or "
            "Redis lost its data (a restart, a flush); said once",
            self.name,
            term.token,
            max(0.0, term.time_left()),
            policy or "unknown",
        )

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
            margin = term.time_left() - RENEW_ATTEMPT * self.settings.socket_timeout
            wait = min(deadline - time.monotonic(), self.settings.renew_interval, margin)
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

    def _live_nodes(self) -> frozenset[str]:
        """The workers a release may name as next: empty (trust all) when gossip sees no one."""
        members = self._members()
        return members if len(members) > 1 else frozenset()

    def _record(self, info: dict[str, Any] | None, transition: dict[str, Any]) -> None:
        """Write the cluster record and a transition; a refusal never stops the election."""
        try:
            if info is not None and self.term is not None:
                self.store.commit(self.term.token, None, info)
            self.store.record_transition(transition)
        except REDIS_DOWN:
            pass
        except redis.RedisError as exc:
            text = str(exc)
            if text != self._record_error:
                logger.error(
                    "Stoker %s: could not write its record in Redis (%s); leadership is "
                    "unaffected, dump() and status may be stale",
                    self.name,
                    text,
                )
                self._record_error = text

    def _redis_down(self, exc: BaseException) -> None:
        if self._redis_down_since is None:
            self._redis_down_since = time.monotonic()
            logger.warning(
                "Stoker %s: Redis at %s unreachable (%s: %s%s); retrying with backoff",
                self.name,
                self.settings.masked_url,
                exc.__class__.__name__,
                exc,
                tls_timeout_hint(self.settings.url, exc),
            )

    def _redis_back(self) -> None:
        if self._redis_down_since is not None:
            logger.info(
                "Stoker %s: Redis reachable again after %.1f s",
                self.name,
                time.monotonic() - self._redis_down_since,
            )
            self._redis_down_since = None
