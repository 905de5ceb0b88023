"""The fenced lease in Redis: acquire, renew, release, observe, and wait for a release.

This module knows nothing of Celery.  One lease exists per name; its holder is
the leader.  The design follows client-go's ``leaderelection`` and the usual
Redis lock recipe, with two additions that make it safe to act on:

* **Fencing tokens.**  Every term gets a token greater than every earlier one:
  the larger of the counter kept next to the lease plus one, the highest
  token the caller has seen plus one, and the server's clock in
  microseconds.  So a term after Redis lost its data (a restart without
  persistence), or after a failover lost the last increment, still outranks
  every term before it, unless the server's clock went backwards.  A term
  that finds the counter missing is marked ``fresh``: an earlier holder may
  still count its lease valid, so the caller should not act for one TTL.  A
  term that finds the counter below a token its taker saw carries
  ``history_lost`` in its lease value: Redis lost acknowledged writes (a
  restored snapshot, a replica promoted without them), so the state may be
  older than the last one committed.
* **Holder-side validity on a monotonic clock.**  The holder counts its lease
  from *before* it sent the command that set or renewed it, minus a drift
  allowance, so its own view always ends before Redis can hand the lease to
  anyone else.

Waiting is cheap: every release, renewal and new term is announced on one
pub/sub channel per key prefix (``listener.py``).  A waiter blocks until the
lease it saw would expire; a renewal moves its wake-up to the new expiry
without it sending anything, so a follower sends no command at all while the
leader keeps renewing.  A release or an expiry wakes only one follower at once
(the longest-waiting, or, when leadership is spread, the least loaded: the
caller's order, ``balance.py``); the others try only if it does not announce
a new term within :data:`HERD_DELAY` (see :class:`RedisLease`).  A message wakes a waiter's
thread only when it must act sooner than it planned (see :meth:`RedisLease.notify`).
The Lua scripts are in ``scripts.py``, the key names in ``keys.py``.

What it does not promise (as client-go says of itself): a process paused longer
than its remaining validity (a GC or VM stall) may act after its lease ended;
the fencing token is what lets a downstream system refuse it.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

import redis

from . import scripts
from .connection import is_cluster_client
from .keys import (
    ACQUIRED,
    POKE,
    RELEASED,
    RENEWED,
    WAKE,
    channel_for,
    closing_key,
    handoff_key,
    lease_key,
    stoker_draining_key,
    token_key,
    waiters_key,
    worker_channel,
)
from .keys import (
    lease_channel as lease_channel,  # re-exported: bench and tests import it from here
)
from .listener import LeaseListener

logger = logging.getLogger(__name__)

#: Fraction of the TTL (plus a fixed part) a holder gives up to cover clock-rate
#: drift between its machine and the Redis server, as in the Redlock analysis.
CLOCK_DRIFT_FACTOR = 0.01
CLOCK_DRIFT_FIXED = 0.002
#: How long past a lease's expiry a waiter wakes, so its attempt arrives after it.
WAKE_MARGIN = 0.005
#: Our lease values are ~150 bytes; anything far larger is someone else's.
MAX_LEASE_VALUE = 4096
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


def _is_foreign_data_error(exc: redis.ResponseError) -> bool:
    """True when Redis refused because a key holds a value of someone else's making."""
    text = str(exc)
    return any(mark in text for mark in ("WRONGTYPE", "not an integer", "would overflow"))


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


def validity(ttl: float) -> float:
    """How long a holder may act after sending a set/renew command with this TTL."""
    return ttl - ttl * CLOCK_DRIFT_FACTOR - CLOCK_DRIFT_FIXED


class RedisLease:
    """A fenced lease for one ``name`` in one Redis, held by one ``holder_id``.

    Thread-safe for one caller at a time per method; an activator drives it from
    its own thread.  ``listener`` makes :meth:`wait` wake on releases; without
    one, :meth:`wait` simply sleeps its timeout.

    **No herd.**  Followers queue in a sorted set that Redis keeps (oldest
    first).  A release names the longest-waiting live follower (or the first
    live waiter of the caller's order: the least loaded); only that one
    tries at once, and every other waits :data:`HERD_DELAY` times its rank for
    the new term to be announced, which it then waits out without a command.
    An expiry (the holder crashed) wakes the first waiter at once and the others
    after the same staggered delay (their place in :attr:`expiry_position`'s
    order, when one is given, else their rank).  So a failover costs a couple of commands
    whatever the number of followers, a dead first waiter costs the others one
    delay, and a late one lets the next in line try, not the whole queue.
    """

    def __init__(
        self,
        client: redis.Redis,
        name: str,
        *,
        holder_id: str,
        hostname: str,
        ttl: float,
        key_prefix: str = "stoker",
        listener: LeaseListener | None = None,
        app: str = "",
    ) -> None:
        self.client = client
        #: The Celery app this holder runs, written into the lease value it takes.
        self.app = app
        self.name = name
        self.holder_id = holder_id
        self.hostname = hostname
        self.ttl = ttl
        self.key_prefix = key_prefix
        self.lease_key = lease_key(key_prefix, name)
        self.token_key = token_key(key_prefix, name)
        self.draining_key = stoker_draining_key(key_prefix, name)
        self.handoff_key = handoff_key(key_prefix, name)
        self.waiters_key = waiters_key(key_prefix, name)
        self.closing_key = closing_key(key_prefix, name)
        #: On a Redis Cluster the Stoker's own shard channel (SPUBLISH), else the prefix's.
        self.channel, self.publish_command = channel_for(
            key_prefix, name, sharded=is_cluster_client(client)
        )
        #: Set by :meth:`renew` when the holder was asked to step down instead:
        #: ("drain", None) or ("handoff", worker or None).
        self.step_down_request: tuple[str, str | None] | None = None
        #: Set by :meth:`renew` when the lease was not there at all (evicted, flushed).
        self.vanished = False
        #: This worker's place among the waiters (0: first to try), as of its last look.
        self.rank: int | None = None
        #: The node the last :meth:`release` named to try first (None: nobody).
        self.named: str | None = None
        #: At an expiry, how many head starts this waiter gives the others (None: its
        #: rank decides).  Set by the election when leadership is spread (``balance.py``).
        self.expiry_position: Callable[[], int | None] | None = None
        self._poked = threading.Event()
        self._operator_poke = False
        self._ttl_ms = max(1, round(ttl * 1000))
        self._listener = listener
        self._woken = threading.Event()  # our turn: released to us (or the listener reconnected)
        self._nudged = threading.Event()  # anything happened: look at the deadline again
        self._renewed_until: float | None = None
        self._acquired_until: float | None = None
        self._released_to_other_at: float | None = None
        #: The presence channels' prefix the scripts check waiters with ('': trust all).
        self.presence_prefix = ""
        if listener is not None:
            listener.register(name, self)
            if listener.tells_presence(worker_channel(key_prefix, hostname)):
                self.presence_prefix = worker_channel(key_prefix, "")
        self._acquire = client.register_script(scripts.ACQUIRE)
        self._renew = client.register_script(scripts.RENEW)
        self._release = client.register_script(scripts.RELEASE)
        self._close = client.register_script(scripts.CLOSE)
        self._observe = client.register_script(scripts.OBSERVE)

    def _redis_answered(self) -> None:
        """A script got its answer: Redis serves this lease (again); a listener down retries now.

        After a failover the listener's own backoff may still have seconds to
        run while the election already reached the new primary; a release
        announced meanwhile would be heard by nobody (see ``listener``).
        """
        if self._listener is not None:
            self._listener.retry_now()

    def close(self) -> None:
        """Stop being woken by the listener (the client is the caller's to close)."""
        if self._listener is not None:
            self._listener.unregister(self.name, self)

    def acquire(self, min_token: int = 0) -> AcquireResult:
        """Take the lease if nobody holds it; otherwise join the waiters.

        ``min_token`` is the highest token the caller has seen; a new term's
        token is above it even when Redis lost its counter.  Arms :meth:`wait`
        before asking, so a release that lands between this call and the wait
        is not missed.
        """
        self._woken.clear()
        self._renewed_until = None
        self._acquired_until = None
        self._released_to_other_at = None
        started = time.monotonic()
        try:
            ok, raw, pttl, *rest = self._acquire(
                keys=[self.lease_key, self.token_key, self.draining_key, self.waiters_key],
                args=[
                    self.holder_id,
                    self.hostname,
                    self._ttl_ms,
                    int(min_token),
                    self.channel,
                    self.name,
                    self.publish_command,
                    self.app,
                    self.presence_prefix,
                ],
            )
        except redis.ResponseError as exc:
            if not _is_foreign_data_error(exc):
                raise
            return AcquireResult(None, Holder.foreign_error(exc))
        self._redis_answered()
        raw_bytes = raw if isinstance(raw, bytes) else str(raw).encode()
        if int(ok) == 2:
            holder = Holder.parse(raw_bytes, int(pttl)) if raw_bytes else None
            return AcquireResult(None, holder, draining=True)
        holder = Holder.parse(raw_bytes, int(pttl))
        if int(ok) == 1 and holder.token is not None:
            self.rank = None
            value = raw_bytes.decode()
            fresh = bool(rest and int(rest[0]) == 1)
            term = Term(
                holder.token,
                value,
                started + validity(self.ttl),
                fresh=fresh,
                history_lost=holder.history_lost,
            )
            return AcquireResult(term, holder)
        rank = int(rest[0]) if rest else -1
        self.rank = rank if rank >= 0 else None
        return AcquireResult(None, holder)

    def renew(self, term: Term) -> bool:
        """Extend ``term``; False if the lease is no longer ours (then stop acting).

        True with :attr:`step_down_request` set means the lease is still ours
        but was not extended: this worker is draining, or a handoff was asked
        for; the holder should step down and release.
        """
        self._poked.clear()
        self.step_down_request = None
        self.vanished = False
        started = time.monotonic()
        try:
            code, detail = self._renew(
                keys=[self.lease_key, self.draining_key, self.handoff_key],
                args=[
                    term.value,
                    self._ttl_ms,
                    self.channel,
                    self.name,
                    self.hostname,
                    str(term.token),
                    self.publish_command,
                ],
            )
        except redis.ResponseError as exc:
            if not _is_foreign_data_error(exc):
                raise
            return False  # someone replaced our lease with a value of another type
        self._redis_answered()
        code = int(code)
        if code == 1:
            term.valid_until = started + validity(self.ttl)
            return True
        if code == 2:
            self.step_down_request = ("drain", None)
            return True
        if code == 3:
            to = detail.decode() if isinstance(detail, bytes) else str(detail)
            self.step_down_request = ("handoff", to or None)
            return True
        self.vanished = detail in (b"gone", "gone")
        return False

    def close_term(self, term: Term) -> bool:
        """Stepping down: extend ``term`` a whole TTL and mark it closing; False if not ours.

        One round trip for what ``shutdown`` and the release need: the time, and
        the mark that keeps any queued event of the term from starting.
        """
        started = time.monotonic()
        try:
            code, detail = self._close(
                keys=[self.lease_key, self.closing_key],
                args=[
                    term.value,
                    self._ttl_ms,
                    str(term.token),
                    self.channel,
                    self.name,
                    self.publish_command,
                ],
            )
        except redis.ResponseError as exc:
            if not _is_foreign_data_error(exc):
                raise
            return False
        self._redis_answered()
        if int(code) == 1:
            term.valid_until = started + validity(self.ttl)
            return True
        self.vanished = detail in (b"gone", "gone")
        return False

    def release(
        self,
        term: Term,
        *,
        reserve_for: str | None = None,
        live: Iterable[str] = (),
        ordered: bool = False,
    ) -> bool:
        """Give the lease up and announce who tries first; False if it was not ours any more.

        ``reserve_for`` (a handoff) keeps the lease for that worker for one TTL:
        only it may take it meanwhile, and if it never does, the reservation
        expires like any lease; a worker whose listener is gone (it died) gets
        no reservation, the release names another.  ``live`` are the node names
        this worker sees alive: waiters not among them are skipped and forgotten
        (empty: trust every waiter).  ``ordered``: ``live`` is in order of
        preference (the least loaded first), and the first of them that waits
        is named; otherwise the longest-waiting live waiter is.  :attr:`named`
        says whom the release named (None: nobody).
        """
        term.valid_until = min(term.valid_until, time.monotonic())
        self.named = None
        live = list(live) if ordered else sorted(live)
        try:
            released, named = self._release(
                keys=[self.lease_key, self.waiters_key, self.draining_key],
                args=[
                    term.value,
                    self.channel,
                    self.name,
                    reserve_for or "",
                    self._ttl_ms,
                    self.publish_command,
                    self.presence_prefix,
                    "ordered" if ordered and live else "",
                    *live,
                ],
            )
        except redis.ResponseError as exc:
            if not _is_foreign_data_error(exc):
                raise
            return False
        if int(released) != 1:
            return False
        text = named.decode() if isinstance(named, bytes) else str(named or "")
        self.named = text or None
        return True

    def leave(self) -> None:
        """Leave the waiters (a follower that stops): no release may name it any more.

        One ZREM, sent once when the worker stops; a worker killed without
        it is dropped by the next script that finds its listener gone.
        """
        self.rank = None
        self.client.zrem(self.waiters_key, self.hostname)

    def holder(self) -> Holder | None:
        """The current holder, or None when the lease is free."""
        try:
            raw, pttl = self._observe(keys=[self.lease_key])
        except redis.ResponseError as exc:
            if not _is_foreign_data_error(exc):
                raise
            return Holder.foreign_error(exc)
        self._redis_answered()
        if raw is None:
            return None
        raw_bytes = raw if isinstance(raw, bytes) else str(raw).encode()
        return Holder.parse(raw_bytes, int(pttl))

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
