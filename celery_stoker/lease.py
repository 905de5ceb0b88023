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
a new term within ``HERD_DELAY`` (see :class:`RedisLease`).  A message wakes a
waiter's thread only when it must act sooner than it planned.  That waiting half
is ``lease_wait.py`` (``RedisLease``'s base), the values a lease holds are
``lease_types.py``, the Lua scripts ``scripts.py``, the key names ``keys.py``.

What it does not promise (as client-go says of itself): a process paused longer
than its remaining validity (a GC or VM stall) may act after its lease ended;
the fencing token is what lets a downstream system refuse it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

import redis

from . import scripts
from .connection import is_cluster_client
from .keys import (
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
from .lease_types import (  # re-exported: the rest of the package imports them from here
    MAX_LEASE_VALUE as MAX_LEASE_VALUE,
)
from .lease_types import AcquireResult as AcquireResult
from .lease_types import Holder as Holder
from .lease_types import Lease as Lease
from .lease_types import Term as Term
from .lease_wait import LeaseWaiting
from .listener import LeaseListener

logger = logging.getLogger(__name__)

#: Fraction of the TTL (plus a fixed part) a holder gives up to cover clock-rate
#: drift between its machine and the Redis server, as in the Redlock analysis.
CLOCK_DRIFT_FACTOR = 0.01
CLOCK_DRIFT_FIXED = 0.002


def _is_foreign_data_error(exc: redis.ResponseError) -> bool:
    """True when Redis refused because a key holds a value of someone else's making."""
    text = str(exc)
    return any(mark in text for mark in ("WRONGTYPE", "not an integer", "would overflow"))


def validity(ttl: float) -> float:
    """How long a holder may act after sending a set/renew command with this TTL."""
    return ttl - ttl * CLOCK_DRIFT_FACTOR - CLOCK_DRIFT_FIXED


class RedisLease(LeaseWaiting):
    """A fenced lease for one ``name`` in one Redis, held by one ``holder_id``.

    Thread-safe for one caller at a time per method; an activator drives it from
    its own thread.  ``listener`` makes :meth:`wait` wake on releases; without
    one, :meth:`wait` simply sleeps its timeout.

    **No herd.**  Followers queue in a sorted set that Redis keeps (oldest
    first).  A release names the longest-waiting live follower (or the first
    live waiter of the caller's order: the least loaded); only that one
    tries at once, and every other waits ``HERD_DELAY`` times its rank for
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
        super().__init__(name, hostname=hostname, ttl=ttl)
        self.client = client
        #: The Celery app this holder runs, written into the lease value it takes.
        self.app = app
        self.holder_id = holder_id
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
        #: The node the last :meth:`release` named to try first (None: nobody).
        self.named: str | None = None
        self._ttl_ms = max(1, round(ttl * 1000))
        self._listener = listener
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
