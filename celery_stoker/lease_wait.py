"""A follower's wait for its turn at a lease: the listener's messages in, a wake-up out.

The waiting half of ``lease.RedisLease`` (its base): the deadlines a waiter
keeps (the expiry it saw, moved by each renewal or new term announced), its
place in the queue, the head starts it gives those ahead of it, and the
holder's sleep between renewals.  The listener's thread calls :meth:`notify`;
the election's thread blocks in :meth:`wait` or :meth:`wait_poked`.  No Redis
command is sent from here: taking, renewing and releasing the lease are
``lease.py``'s.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from .keys import ACQUIRED, POKE, RELEASED, RENEWED, WAKE
from .lease_types import Holder

logger = logging.getLogger("celery_stoker.lease")

#: How long past a lease's expiry a waiter wakes, so its attempt arrives after it.
WAKE_MARGIN = 0.005
#: After a release that names another waiter to try first, or an expiry that finds
#: this waiter behind others, it tries itself only if no new term is announced
#: within this long times its rank: one command per failover instead of one per
#: waiter, and when the first waiter is late (a paused or overloaded process) the
#: others try one after another rather than all at once.
HERD_DELAY = 0.05
#: A release that names another waiter wakes only the waiters this close to the
#: front: the rest could not try within ``NUDGE_RANKS * HERD_DELAY`` anyway, so they
#: sleep on to the deadline they had and read what was announced then.  Waking
#: every waiter's thread at every release is what made a large fleet slow to elect.
NUDGE_RANKS = 8


class LeaseWaiting:
    """The waiting side of one lease on one worker (``RedisLease`` is the rest).

    **No herd.**  A release names one waiter; only that one tries at once, and
    every other waits :data:`HERD_DELAY` times its rank for the new term to be
    announced, which it then waits out without a command.  An expiry wakes the
    first waiter at once and the others after the same staggered delay (their
    place in :attr:`expiry_position`'s order, when one is given, else their rank).
    """

    def __init__(self, name: str, *, hostname: str, ttl: float) -> None:
        self.name = name
        self.hostname = hostname
        self.ttl = ttl
        #: This worker's place among the waiters (0: first to try), as of its last look.
        self.rank: int | None = None
        #: At an expiry, how many head starts this waiter gives the others (None: its
        #: rank decides).  Set by the election when leadership is spread (``balance.py``).
        self.expiry_position: Callable[[], int | None] | None = None
        self._poked = threading.Event()
        self._operator_poke = False
        self._woken = threading.Event()  # our turn: released to us (or the listener reconnected)
        self._nudged = threading.Event()  # anything happened: look at the deadline again
        self._renewed_until: float | None = None
        self._acquired_until: float | None = None
        self._released_to_other_at: float | None = None

    def notify(self, kind: str, ttl_ms: int, extra: str = "") -> None:
        """Called by the listener's thread with each message about this lease."""
        now = time.monotonic()
        if kind == RENEWED:
            # Only moves the deadline later: read when the waiter wakes, no wake-up now.
            self._renewed_until = now + ttl_ms / 1000.0
            return
        if kind == ACQUIRED:
            # A new term: a waiter giving another its head start waits for the term's
            # expiry instead; everyone behind its winner moves up.
            self._acquired_until = now + ttl_ms / 1000.0
            winner_rank = extra.rpartition(" ")[2]
            if self.rank is not None and winner_rank.isdigit() and self.rank > int(winner_rank):
                self.rank -= 1
            return  # only moves a deadline later (or ends a head start): read at the next wake
        if kind == POKE:
            self._operator_poke = True  # an operator asked: the holder renews now
            self._poked.set()
        elif kind == WAKE and extra and extra != self.hostname:
            return  # a drain asks that worker's waiters to look (and learn it drains)
        elif kind == RELEASED and extra and extra != self.hostname:
            self._released_to_other_at = now  # another waiter tries first
            self._acquired_until = None  # any earlier new-term message is about the old term
            if self.rank is not None and self.rank > NUDGE_RANKS:
                return  # too far back to try soon: it reads this at its deadline
        else:  # released to us (or to anyone), reconnected, wake
            self._woken.set()
        self._nudged.set()

    def wait(self, timeout: float, *, max_wait: float | None = None) -> bool:
        """Block until it is this waiter's turn to try the lease; False if nothing happened.

        ``timeout`` is the expiry the caller observed; each renewal or new term
        announced meanwhile moves it to the announced expiry, so a waiter sends
        nothing while a holder keeps renewing.  Returns True when its turn came
        (a release named it, or named another who did not take the lease within
        :data:`HERD_DELAY` times this waiter's rank; or the listener reconnected),
        False when the (possibly moved) deadline passed or ``max_wait`` seconds
        went by.  At an expiry, a waiter behind others first gives those ahead
        the same staggered head start to announce a new term.
        """
        started = time.monotonic()
        deadline = started + timeout
        cap = started + max_wait if max_wait is not None else float("inf")
        turn_at: float | None = None  # another waiter's head start ends
        expiry_deferred = False
        while not self._woken.is_set():
            released_at, self._released_to_other_at = self._released_to_other_at, None
            if released_at is not None:
                turn_at = released_at + self._head_start()
            renewed_until, self._renewed_until = self._renewed_until, None
            if renewed_until is not None:
                deadline = max(deadline, renewed_until + WAKE_MARGIN)
            acquired_until = self._acquired_until  # kept until used: it may come first
            if acquired_until is not None and (turn_at is not None or expiry_deferred):
                self._acquired_until = None
                # The new term this waiter gave a head start to: wait for its expiry.
                # (Otherwise the term is the one it saw when it looked, or a newer one
                # that it will see at its next look: its deadline stays.)
                deadline = max(deadline, acquired_until + WAKE_MARGIN)
                turn_at = None
                expiry_deferred = False
            now = time.monotonic()
            if turn_at is not None and now >= turn_at:
                return True
            if now >= cap:
                return False
            if now >= deadline:
                position = self._expiry_turn() if not expiry_deferred else 0
                if position and not expiry_deferred:
                    expiry_deferred = True  # a new term announced meanwhile counts too
                    deadline = now + HERD_DELAY * position
                    continue
                return False
            wake_at = min(deadline, cap, turn_at if turn_at is not None else float("inf"))
            self._nudged.wait(max(0.0, wake_at - now))
            self._nudged.clear()
        return True

    def _expiry_turn(self) -> int:
        """How many head starts this waiter gives the others at an expiry (0: it tries now).

        Its place in the spread (the least loaded first) when the election
        gives one, else its rank in the queue.
        """
        position = None
        if self.expiry_position is not None:
            try:
                position = self.expiry_position()
            except Exception:  # a bug there must not keep a waiter from the lease
                logger.exception("lease %s: expiry position failed; using the rank", self.name)
        if position is None:
            position = self.rank or 0
        return max(0, position)

    def _head_start(self) -> float:
        """How long this waiter leaves those ahead of it to take the lease and say so."""
        return HERD_DELAY * max(1, self.rank or 0)

    def wake(self) -> None:
        """Interrupt a :meth:`wait` or :meth:`wait_poked` from another thread (to stop)."""
        self._woken.set()
        self._nudged.set()
        self._poked.set()

    def wait_poked(self, timeout: float) -> bool:
        """A holder's sleep between renewals; True if poked (renew now) or woken."""
        poked = self._poked.wait(max(0.0, timeout))
        self._poked.clear()
        return poked

    def poke_local(self) -> None:
        """Wake this process's holder without asking it to renew (it re-checks its state)."""
        self._poked.set()

    def poked_by_operator(self) -> bool:
        """True (once) if the last poke came over the channel, from an operator."""
        came, self._operator_poke = self._operator_poke, False
        return came

    def wait_timeout(self, holder: Holder | None) -> float:
        """How long a waiter that saw ``holder`` may sleep before trying again.

        Until the observed lease would expire (plus a small margin); a foreign
        value is looked at again after one TTL at most.
        """
        if holder is None:
            return 0.0
        if holder.foreign or holder.ttl_left is None:
            # Not ours: look again each TTL, so its removal is noticed soon.
            return self.ttl if holder.ttl_left is None else min(self.ttl, holder.ttl_left)
        return holder.ttl_left + WAKE_MARGIN
