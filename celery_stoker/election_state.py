"""The term side of an election: what it knows and shows, and the protocols it owns.

``election.py`` runs the follow / hold / step-down loop; this is its
bookkeeping, apart from that loop: who leads and with which token, the terms
won, the fault status shows until it clears, the cluster record and the
transitions in Redis, and the messages said once (a foreign lease value,
another app's worker, a vanished lease, Redis down and back).  Also the
protocols through which the election reaches what lies outside it: the
handler that does the term's work (``activator.py``), where a release sends
leadership (``balancer.py``), and who observes it (``metrics.py``): the
election imports nothing of any of them.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

import redis

from .access import AccessCheck
from .connection import is_cluster_client, tls_timeout_hint
from .election_rules import fresh_quarantine
from .lease import Holder, RedisLease, Term
from .settings import StokerSettings
from .store import StokerStore

logger = logging.getLogger("celery_stoker.activator")

REDIS_DOWN = (redis.ConnectionError, redis.TimeoutError, OSError)
#: Backoff while Redis is unreachable: first try, and the most between tries.
BACKOFF_START = 0.05
BACKOFF_MAX = 0.5


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


class ElectionState:
    """One Stoker's election on one worker as it stands: leader, tokens, faults, records.

    The base of ``election.Election``, whose thread alone changes it; other
    threads (status, metrics, control) only read it.
    """

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
        wait = fresh_quarantine(self.settings.lease_ttl, uptime)
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

    def _live_nodes(self) -> frozenset[str]:
        """The workers a release may name as next: empty (trust all) when gossip sees no one."""
        members = self._members()
        return members if len(members) > 1 else frozenset()

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
