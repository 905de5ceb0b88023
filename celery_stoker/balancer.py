"""The worker's balancer: announces what it leads, and hands Stokers to lighter workers.

One thread per worker, ``stoker-balance``, owned by ``StokerStep`` (started
after the activators, stopped before them).  It sends no Redis command:

* **Announce.**  About twice a second it puts this worker's
  :class:`~celery_stoker.balance.Announcement` of each key prefix into the
  ``stoker_scope`` field Celery's heart sends (``membership.announce``), so the
  next heartbeat carries it.
* **Move.**  When leadership is spread (``stoker_balance``, the default) and
  gossip shows the others, it asks :func:`balance.next_move` for this worker's
  next move and makes it through the clean handoff every operator's handoff
  uses (reason ``rebalance``): one at a time, waiting until the fleet has
  looked the same for :data:`SETTLE_HEARTBEATS` heartbeats (a fleet starting
  up or rolling does not churn), then :data:`PACE` plus up to
  :data:`PACE_JITTER` between moves, and giving a worker nothing more until its
  own heartbeat shows what it got (so two busy workers do not both pile onto
  one light one before its load is known).
* **Spread.**  Each election asks it, as its :class:`~celery_stoker.election.Spread`,
  whom a release should name (the least loaded live worker that may lead the
  Stoker) and how long to give others at an expiry.

Why not one move per heartbeat (a cooldown longer than the interval): a cold
fleet's first worker holds every lease and must give most of them away; at
50 Stokers and 20 workers that is 47 moves, over 90 s at one per 2 s.  What a
cooldown would protect against, a load that is not known yet, is covered
instead: this worker knows what it gave (the ledger, announced as ``moving``
so the others count it too), and it waits for a target's heartbeat before
giving that target more.

Without gossip (``--without-gossip``) no worker hears the others: nothing is
moved, a release names the longest-waiting follower, and an expiry goes by the
queue's order, first come as before (said once at start).
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from .balance import Announcement, Ledger, Placement, expiry_position, next_move, release_order
from .balance import signature as fleet_signature
from .election import Election
from .membership import Membership, announce

logger = logging.getLogger("celery_stoker.balance")

#: How often the loop looks (and refreshes what the next heartbeat says).
TICK = 0.5
#: While a move is under way: how often it looks whether the term has moved.
MOVE_POLL = 0.02
#: The fleet must look the same (who is there, for what) for this many heartbeat
#: intervals, plus one second, before a move: workers starting one after another,
#: or a rolling deploy, are not chased one at a time.
SETTLE_HEARTBEATS = 2
#: Between two moves of this worker: this, plus a random part up to PACE_JITTER
#: (two workers that see the same need do not act in the same instant).
PACE = 0.1
PACE_JITTER = 0.2
#: A term younger than this many heartbeat intervals is not moved again (it may have
#: just arrived, and the others may not know it yet).
YOUNG_TERM_HEARTBEATS = 2


class Balanced(Protocol):
    """What the balancer needs of one Stoker on this worker (an ``Activator``)."""

    name: str

    @property
    def key_prefix(self) -> str: ...

    @property
    def weight(self) -> int: ...

    @property
    def election(self) -> Election: ...

    def busy(self) -> bool:
        """True while an event of the Stoker is in flight."""


class Balancer:
    """Announces this worker's leaderships and spreads them (one per worker)."""

    def __init__(
        self,
        hostname: str,
        membership: Membership,
        *,
        enabled: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.hostname = hostname
        self.membership = membership
        #: ``stoker_balance``: False announces, but moves nothing and names no one.
        self.enabled = enabled
        #: Whether gossip shows the others (set by the step once the consumer is known).
        self.gossip = False
        self.heartbeat_interval = 2.0
        self._clock = clock
        self._stokers: dict[str, Balanced] = {}
        self._ledgers: dict[str, Ledger] = {}
        self._signatures: dict[str, tuple[Any, ...]] = {}
        self._quiet_until: dict[str, float] = {}
        self._announced: dict[str, Any] | None = None
        self._moving: tuple[Balanced, int, str, float] | None = None
        #: Targets a move could not reach (the release named another: the target's
        #: listener was gone, or it drains), given nothing until then (monotonic).
        self._unreachable: dict[str, float] = {}
        self._next_move_at = 0.0
        self._stopping = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._error: str | None = None
        #: What status shows: moves made, the last one.
        self.moves = 0
        self.last_move: dict[str, Any] | None = None

    # ----------------------------------------------------------------- wiring

    def add(self, stoker: Balanced) -> None:
        self._stokers[stoker.name] = stoker
        self._ledgers.setdefault(stoker.key_prefix, Ledger(self._ledger_timeout()))

    def attach(self, gossip: bool, heartbeat_interval: float | None) -> None:
        """Gossip on or off, and the heartbeat interval (Celery's ``--heartbeat-interval``)."""
        self.gossip = gossip
        self.heartbeat_interval = float(heartbeat_interval or 2.0)
        for ledger in self._ledgers.values():
            ledger.timeout = self._ledger_timeout()
        if self.enabled and not gossip and self._stokers:
            logger.info(
                "celery-stoker: leadership is not spread: without gossip no worker hears the "
                "others' loads, so whoever asks first leads (a release names the "
                "longest-waiting follower), as with stoker_balance = False"
            )

    def _ledger_timeout(self) -> float:
        """How long a move counts at its target without the target's heartbeat saying so."""
        ttl = max((s.election.settings.lease_ttl for s in self._stokers.values()), default=10.0)
        return 3 * self.heartbeat_interval + ttl

    @property
    def spreading(self) -> bool:
        """True when this worker spreads leadership: the setting is on and gossip shows others."""
        return self.enabled and self.gossip

    # ----------------------------------------------------------------- thread

    def start(self) -> None:
        self.announce()  # before the consumer's first heartbeat
        self._thread = threading.Thread(target=self._run, name="stoker-balance", daemon=True)
        self._thread.start()

    def begin_stopping(self) -> None:
        """The worker begins to stop: move nothing more, take nothing (a plain flag)."""
        self._stopping = True

    def stop(self, timeout: float = 2.0) -> None:
        self._stopping = True
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            wait = TICK
            try:
                wait = self._tick()
                if self._error is not None:
                    logger.info("celery-stoker: balancer working again")
                    self._error = None
            except Exception as exc:
                text = f"{exc.__class__.__name__}: {exc}"
                if text != self._error:
                    logger.exception("celery-stoker: balancer error (%s); carrying on", text)
                    self._error = text
            self._stop.wait(wait)

    def _tick(self) -> float:
        """One look: announce, then finish or make a move; returns how long to sleep."""
        self.announce()
        if self._moving is not None and not self._move_done():
            return MOVE_POLL
        if not self.spreading or self._stopping:
            return TICK
        now = self._clock()
        if now < self._next_move_at:
            return min(TICK, self._next_move_at - now)
        for prefix in sorted(self._ledgers):
            if self._try_move(prefix, now):
                return MOVE_POLL
        return TICK

    # ------------------------------------------------------- what it announces

    def own(self, prefix: str) -> Announcement:
        """This worker's announcement for ``prefix``, as of now."""
        eligible: set[str] = set()
        weights: dict[str, int] = {}
        leads: dict[str, int] = {}
        resting: set[str] = set()
        stokers = [s for s in self._stokers.values() if s.key_prefix == prefix]
        # One Stoker that found this worker draining is enough: a drain marks every one.
        draining = any(s.election.draining for s in stokers)
        for stoker in stokers:
            election = stoker.election
            if not election.eligible:
                continue
            eligible.add(stoker.name)
            if stoker.weight != 1:
                weights[stoker.name] = stoker.weight
            term = election.term
            if term is not None:
                leads[stoker.name] = term.token
            elif (
                election.state not in ("follower", "leader")
                or election.draining
                or election.resting()
            ):
                resting.add(stoker.name)  # not waiting for the lease now: name it not
        ledger = self._ledgers.get(prefix)
        with self._lock:
            moving = ledger.announced() if ledger is not None else {}
        return Announcement(
            eligible=frozenset(eligible),
            weights=weights,
            leads=leads,
            moving=moving,
            available=not (self._stopping or draining),
            resting=frozenset(resting),
        )

    def announce(self) -> None:
        """Refresh what the next heartbeat says (a new dict only when it changed)."""
        mine = {prefix: self.own(prefix) for prefix in self._ledgers}
        fields = {prefix: a.fields() for prefix, a in mine.items()}
        if fields != self._announced:
            announce(self.membership.scope, mine)
            self._announced = fields

    # ------------------------------------------------------------ the placement

    def placement(self, prefix: str) -> Placement:
        """Who leads what under ``prefix``: the others' heartbeats and this worker, now."""
        nodes = dict(self.membership.heard(prefix))
        nodes[self.hostname] = self.own(prefix)
        ledger = self._ledgers.get(prefix)
        if ledger is not None:
            with self._lock:
                ledger.settle(nodes, self._clock())
        return Placement(nodes)

    # -------------------------------------------------------------- the moves

    def _try_move(self, prefix: str, now: float) -> bool:
        placement = self.placement(prefix)
        if self._changed(prefix, placement):
            # Someone else changed the fleet (a join, a crash, a drain, another's move):
            # wait until every heartbeat says what it is now.
            self._quiet_until[prefix] = now + SETTLE_HEARTBEATS * self.heartbeat_interval + 1.0
            return False
        if now < self._quiet_until.get(prefix, 0.0):
            return False
        with self._lock:
            held = self._ledgers[prefix].held()
        held |= {node for node, until in self._unreachable.items() if until > now}
        # An idle Stoker first; one whose events never pause moves too, after its event.
        move = next_move(placement, self.hostname, fixed=self._fixed(prefix), held=held)
        if move is None:
            fixed = self._fixed(prefix, busy_too=False)
            move = next_move(placement, self.hostname, fixed=fixed, held=held)
        if move is None:
            return False
        stoker = self._stokers[move.name]
        term = stoker.election.term
        if term is None:
            return False
        logger.info(
            "celery-stoker: spreading leadership: Stoker %s goes to %s (load here %d, there %d)",
            move.name,
            move.target,
            placement.loads[self.hostname],
            placement.loads[move.target],
        )
        stoker.election.request_handoff(term.token, move.target, "rebalance")
        self._moving = (stoker, term.token, move.target, now)
        return True

    def _changed(self, prefix: str, placement: Placement) -> bool:
        """Whether the fleet changed since the last look: who is there, for what, who leads what.

        The moves this worker made itself are no change: it knew them first
        (:meth:`_move_done` takes their result as the new normal).
        """
        signature = (fleet_signature(placement), frozenset(placement.leader.items()))
        if signature == self._signatures.get(prefix):
            return False
        self._signatures[prefix] = signature
        return True

    def _move_done(self) -> bool:
        """True once the move under way is over (stepped down and released, or too slow)."""
        assert self._moving is not None
        stoker, token, target, since = self._moving
        election = stoker.election
        now = self._clock()
        over = election.stepped_down == token
        limit = election.settings.stop_timeout + 1.0
        if not over and now - since < limit:
            return False
        if over:
            self.moves += 1
            named = election.lease.named
            self.last_move = {"stoker": stoker.name, "to": named, "at": time.time()}
            if named != target:
                # Its listener is gone (it died) or it drains: its heartbeat will say so
                # soon; meanwhile it gets nothing more from here.
                self._unreachable[target] = now + self._ledger_timeout()
                logger.info(
                    "celery-stoker: Stoker %s went to %s, not %s (no longer there, or draining)",
                    stoker.name,
                    named or "whoever takes it first",
                    target,
                )
            # What this worker just did is no news to it: no settling wait for it.
            self._changed(stoker.key_prefix, self.placement(stoker.key_prefix))
        else:
            logger.warning(
                "celery-stoker: Stoker %s did not hand over to %s within %.0f s; carrying on",
                stoker.name,
                target,
                limit,
            )
        self._moving = None
        self._next_move_at = now + PACE + random.uniform(0, PACE_JITTER)
        return True

    def _fixed(self, prefix: str, *, busy_too: bool = True) -> set[str]:
        """The Stokers this worker leads that must stay for now: not acting yet, young, busy.

        Only its own: the plan applies ``fixed`` by name, whoever leads it.
        ``busy_too=False`` lets a Stoker with an event in flight move (its
        step-down lets the event finish first, as any step-down does).
        """
        young = YOUNG_TERM_HEARTBEATS * self.heartbeat_interval
        fixed = set()
        for stoker in self._stokers.values():
            election = stoker.election
            if stoker.key_prefix != prefix or election.term is None:
                continue
            active_from = election.active_from
            if (
                not election.accepting
                or election.suspended
                or (busy_too and stoker.busy())
                or active_from is None
                or time.time() - active_from < young
            ):
                fixed.add(stoker.name)
        return fixed

    # ------------------------------------------------------- Spread (elections)

    def release_order(self, name: str) -> list[str] | None:
        """Whom a release of ``name`` names first: the least loaded workers that may take it."""
        stoker = self._stokers.get(name)
        if stoker is None or not self.spreading:
            return None
        return release_order(self.placement(stoker.key_prefix), name, self.hostname)

    def released(self, name: str, node: str | None, token: int) -> None:
        """A release named ``node``: count ``name`` there until its heartbeat says so."""
        stoker = self._stokers.get(name)
        if stoker is None or node is None or node == self.hostname:
            return
        with self._lock:
            self._ledgers[stoker.key_prefix].gave(name, node, token, self._clock())

    def expiry_position(self, name: str) -> int | None:
        """Head starts this worker gives at an expiry of ``name``'s lease (least loaded: 0)."""
        stoker = self._stokers.get(name)
        if stoker is None or not self.spreading or self._stopping:
            return None
        placement = self.placement(stoker.key_prefix)
        # The holder whose lease expires (dead, or cut off) goes last, whatever its load.
        gone = stoker.election.leader
        if gone is not None and gone != self.hostname and gone in placement.nodes:
            placement = Placement({n: a for n, a in placement.nodes.items() if n != gone})
        return expiry_position(placement, name, self.hostname)

    # ------------------------------------------------------------------ status

    def snapshot(self) -> dict[str, Any]:
        """What ``inspect stoker`` and ``status`` show: on or off, loads, moves."""
        prefixes = {}
        for prefix in sorted(self._ledgers):
            mine = self.own(prefix)
            prefixes[prefix] = {
                "leads": len(mine.leads),
                "load": sum(mine.weights.get(n, 1) for n in mine.leads),
            }
        return {
            "enabled": self.enabled,
            "spreading": self.spreading,
            "moves": self.moves,
            "last_move": self.last_move,
            "prefixes": prefixes,
        }
