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
  still count its lease valid, so the caller should not act for one TTL.
* **Holder-side validity on a monotonic clock.**  The holder counts its lease
  from *before* it sent the command that set or renewed it, minus a drift
  allowance, so its own view always ends before Redis can hand the lease to
  anyone else.

Waiting is cheap: every release and every renewal is announced on one pub/sub
channel per key prefix.  A waiter blocks until the lease it saw would expire;
a release wakes it at once, and a renewal moves its wake-up to the new expiry
without it sending anything.  So a follower sends no command at all while the
leader keeps renewing, and one when the lease is released or expires.

What it does not promise (as client-go says of itself): a process paused longer
than its remaining validity (a GC or VM stall) may act after its lease ended;
the fencing token is what lets a downstream system refuse it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import redis

logger = logging.getLogger(__name__)

#: Fraction of the TTL (plus a fixed part) a holder gives up to cover clock-rate
#: drift between its machine and the Redis server, as in the Redlock analysis.
CLOCK_DRIFT_FACTOR = 0.01
CLOCK_DRIFT_FIXED = 0.002
#: How long past a lease's expiry a waiter wakes, so its attempt arrives after it.
WAKE_MARGIN = 0.005
#: Our lease values are ~150 bytes; anything far larger is someone else's.
MAX_LEASE_VALUE = 4096

# Return codes: 1 taken, 0 held by someone else, 2 this host is draining.
_ACQUIRE = """
local current = redis.call('GET', KEYS[1])
if redis.call('SISMEMBER', KEYS[3], ARGV[2]) == 1 then
  return {2, current or '', redis.call('PTTL', KEYS[1])}
end
if current then
  local ok, data = pcall(cjson.decode, current)
  if not (ok and type(data) == 'table' and data.reserved_for == ARGV[2]) then
    return {0, current, redis.call('PTTL', KEYS[1])}
  end
end
if redis.replicate_commands then pcall(redis.replicate_commands) end
local clock = redis.call('TIME')
local now_ms = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local now_us = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
local floor = tonumber(ARGV[4])
local fresh = 0
local counted = 0
if redis.call('EXISTS', KEYS[2]) == 0 then
  fresh = 1
else
  counted = redis.call('INCR', KEYS[2])
end
-- Above the counter, the caller's highest token and the clock: a lost
-- increment (an unreplicated write before a failover) cannot repeat a token.
local token = math.max(counted, floor + 1, now_us)
redis.call('SET', KEYS[2], string.format('%d', token))
local value = string.format('{"v":1,"token":%d,"since":%d,"holder":%s,"host":%s}',
  token, now_ms, cjson.encode(ARGV[1]), cjson.encode(ARGV[2]))
redis.call('SET', KEYS[1], value, 'PX', ARGV[3])
return {1, value, tonumber(ARGV[3]), fresh}
"""

# Return codes: 1 renewed, 0 not ours, 2 asked to drain, 3 asked to hand over
# (then the second element names the worker to hand to, or is empty for anyone).
# On 2 and 3 the lease is left as it was: the holder steps down and releases.
_RENEW = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return {0, ''}
end
if redis.call('SISMEMBER', KEYS[2], ARGV[5]) == 1 then
  return {2, ''}
end
local request = redis.call('GET', KEYS[3])
if request then
  local token, to = string.match(request, '^(%d+) ?(.*)$')
  if token == ARGV[6] then
    redis.call('DEL', KEYS[3])
    return {3, to}
  end
end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
redis.call('PUBLISH', ARGV[3], 'renewed ' .. ARGV[2] .. ' ' .. ARGV[4])
return {1, ''}
"""

# ARGV[4], when not empty, reserves the lease for that worker for one TTL (a handoff).
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  if ARGV[4] ~= '' then
    local clock = redis.call('TIME')
    redis.call('SET', KEYS[1], string.format('{"v":1,"reserved_for":%s,"since":%d}',
      cjson.encode(ARGV[4]), tonumber(clock[1]) * 1000), 'PX', ARGV[5])
  else
    redis.call('DEL', KEYS[1])
  end
  redis.call('PUBLISH', ARGV[2], 'released 0 ' .. ARGV[3])
  return 1
end
return 0
"""

_OBSERVE = """
return {redis.call('GET', KEYS[1]), redis.call('PTTL', KEYS[1])}
"""


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
            )
        except (ValueError, KeyError, TypeError, OverflowError, RecursionError):
            return cls(None, None, None, None, ttl_left, raw, foreign=True)

    @classmethod
    def foreign_error(cls, exc: Exception) -> Holder:
        """A holder standing for a key Redis could not even read as ours (wrong type)."""
        return cls(None, None, None, None, None, f"<{exc}>".encode(), foreign=True)


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


def lease_key(prefix: str, name: str) -> str:
    """The key of ``name``'s lease; braces keep one Stoker's keys in one Cluster slot."""
    return f"{prefix}:{{{name}}}:lease"


def draining_key(prefix: str) -> str:
    """The set of worker node names that must not lead any lease under ``prefix``."""
    return f"{prefix}:draining"


def handoff_key(prefix: str, name: str) -> str:
    """Where a handoff request for ``name`` waits for the holder's next renewal."""
    return f"{prefix}:{{{name}}}:handoff"


def token_key(prefix: str, name: str) -> str:
    """The key of ``name``'s fencing-token counter (never expires)."""
    return f"{prefix}:{{{name}}}:token"


def lease_channel(prefix: str) -> str:
    """The pub/sub channel every release and renewal under ``prefix`` is announced on.

    Messages read ``released 0 <name>``, ``renewed <ttl ms> <name>`` and
    ``poke 0 <name>`` (an operator's request: the holder renews at once and
    learns whether it is asked to drain or hand over).
    """
    return f"{prefix}:lease-events"


class LeaseWaiter(Protocol):
    """What the listener tells: ``kind`` is released, renewed or reconnected."""

    def notify(self, kind: str, ttl_ms: int) -> None: ...


class LeaseListener:
    """One pub/sub connection that tells every local waiter about releases and renewals.

    A worker runs one of these per key prefix, whatever the number of leases:
    one shared channel carrying the lease name costs less than a subscription
    per lease.  If the connection drops, waiters still wake at the expiry they
    observed; the listener reconnects with backoff and then wakes every waiter
    so it looks again.
    """

    def __init__(
        self,
        client_factory: Callable[[], redis.Redis],
        channel: str,
        *,
        thread_name: str = "stoker-lease-listener",
        health_interval: float = 5.0,
    ) -> None:
        self._client_factory = client_factory
        self.channel = channel
        #: A PING goes out after this long without a message; no answer within
        #: twice this means the connection died silently (a partition, a
        #: failover behind a proxy), and the listener reconnects.
        self.health_interval = health_interval
        self._thread_name = thread_name
        self._waiters: dict[str, set[LeaseWaiter]] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._subscribed = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, wait_subscribed: float = 1.0) -> None:
        """Start listening; wait up to ``wait_subscribed`` for the subscription to be live."""
        if self._thread is not None:
            return
        self._stopping.clear()
        self._thread = threading.Thread(target=self._run, name=self._thread_name, daemon=True)
        self._thread.start()
        self._subscribed.wait(wait_subscribed)

    def stop(self, timeout: float = 2.0) -> None:
        """Stop the thread and close its connection."""
        self._stopping.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    @property
    def subscribed(self) -> bool:
        """True while the subscription is live (a release now wakes waiters at once)."""
        return self._subscribed.is_set()

    def register(self, name: str, waiter: LeaseWaiter) -> None:
        """Tell ``waiter`` about every release and renewal of the lease called ``name``."""
        with self._lock:
            self._waiters.setdefault(name, set()).add(waiter)

    def unregister(self, name: str, waiter: LeaseWaiter) -> None:
        """Stop telling ``waiter`` about ``name``."""
        with self._lock:
            self._waiters.get(name, set()).discard(waiter)

    def _dispatch(self, data: bytes | str) -> None:
        text = data.decode(errors="replace") if isinstance(data, bytes) else str(data)
        parts = text.split(" ", 2)
        if len(parts) != 3 or not parts[1].isdigit():
            return
        kind, ttl_ms, name = parts[0], int(parts[1]), parts[2]
        with self._lock:
            waiters = list(self._waiters.get(name, ()))
        for waiter in waiters:
            waiter.notify(kind, ttl_ms)

    def _wake_all(self) -> None:
        with self._lock:
            waiters = [w for group in self._waiters.values() for w in group]
        for waiter in waiters:
            waiter.notify("reconnected", 0)

    def _run(self) -> None:
        backoff = 0.05
        logged_down = False
        while not self._stopping.is_set():
            pubsub = None
            try:
                pubsub = self._client_factory().pubsub(ignore_subscribe_messages=False)
                pubsub.subscribe(self.channel)
                last_heard = time.monotonic()
                pinged = False
                while not self._stopping.is_set():
                    message = pubsub.get_message(timeout=0.25)
                    quiet = time.monotonic() - last_heard
                    if message is None:
                        if quiet > 2 * self.health_interval:
                            raise redis.ConnectionError("no answer to PING on the lease channel")
                        if quiet > self.health_interval and not pinged:
                            pubsub.ping()
                            pinged = True
                        continue
                    last_heard, pinged = time.monotonic(), False
                    if message["type"] == "subscribe":
                        self._subscribed.set()
                        if logged_down:
                            logger.info("lease listener on %s is back", self.channel)
                            logged_down = False
                        backoff = 0.05
                        # Anything released while we were away: let waiters look again.
                        self._wake_all()
                    elif message["type"] == "message":
                        self._dispatch(message["data"])
            except (redis.RedisError, OSError) as exc:
                self._subscribed.clear()
                if not logged_down:
                    logger.warning(
                        "lease listener lost Redis (%s: %s); waiters fall back to lease "
                        "expiry until it is back",
                        exc.__class__.__name__,
                        exc,
                    )
                    logged_down = True
                self._stopping.wait(backoff)
                backoff = min(backoff * 2, 2.0)
            finally:
                if pubsub is not None:
                    with contextlib.suppress(Exception):  # closing a broken socket
                        pubsub.close()
        self._subscribed.clear()


class RedisLease:
    """A fenced lease for one ``name`` in one Redis, held by one ``holder_id``.

    Thread-safe for one caller at a time per method; an activator drives it from
    its own thread.  ``listener`` makes :meth:`wait` wake on releases; without
    one, :meth:`wait` simply sleeps its timeout.
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
    ) -> None:
        self.client = client
        self.name = name
        self.holder_id = holder_id
        self.hostname = hostname
        self.ttl = ttl
        self.key_prefix = key_prefix
        self.lease_key = lease_key(key_prefix, name)
        self.token_key = token_key(key_prefix, name)
        self.draining_key = draining_key(key_prefix)
        self.handoff_key = handoff_key(key_prefix, name)
        self.channel = lease_channel(key_prefix)
        #: Set by :meth:`renew` when the holder was asked to step down instead:
        #: ("drain", None) or ("handoff", worker or None).
        self.step_down_request: tuple[str, str | None] | None = None
        self._poked = threading.Event()
        self._operator_poke = False
        self._ttl_ms = max(1, round(ttl * 1000))
        self._listener = listener
        self._woken = threading.Event()  # released (or the listener reconnected)
        self._nudged = threading.Event()  # anything happened: look at the deadline again
        self._renewed_until: float | None = None
        if listener is not None:
            listener.register(name, self)
        self._acquire = client.register_script(_ACQUIRE)
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)
        self._observe = client.register_script(_OBSERVE)

    def close(self) -> None:
        """Stop being woken by the listener (the client is the caller's to close)."""
        if self._listener is not None:
            self._listener.unregister(self.name, self)

    def acquire(self, min_token: int = 0) -> AcquireResult:
        """Take the lease if nobody holds it.

        ``min_token`` is the highest token the caller has seen; a new term's
        token is above it even when Redis lost its counter.  Arms :meth:`wait`
        before asking, so a release that lands between this call and the wait
        is not missed.
        """
        self._woken.clear()
        self._renewed_until = None
        started = time.monotonic()
        try:
            ok, raw, pttl, *rest = self._acquire(
                keys=[self.lease_key, self.token_key, self.draining_key],
                args=[self.holder_id, self.hostname, self._ttl_ms, int(min_token)],
            )
        except redis.ResponseError as exc:
            if not _is_foreign_data_error(exc):
                raise
            return AcquireResult(None, Holder.foreign_error(exc))
        raw_bytes = raw if isinstance(raw, bytes) else str(raw).encode()
        if int(ok) == 2:
            holder = Holder.parse(raw_bytes, int(pttl)) if raw_bytes else None
            return AcquireResult(None, holder, draining=True)
        holder = Holder.parse(raw_bytes, int(pttl))
        if int(ok) == 1 and holder.token is not None:
            value = raw_bytes.decode()
            fresh = bool(rest and int(rest[0]) == 1)
            term = Term(holder.token, value, started + validity(self.ttl), fresh=fresh)
            return AcquireResult(term, holder)
        return AcquireResult(None, holder)

    def renew(self, term: Term) -> bool:
        """Extend ``term``; False if the lease is no longer ours (then stop acting).

        True with :attr:`step_down_request` set means the lease is still ours
        but was not extended: this worker is draining, or a handoff was asked
        for; the holder should step down and release.
        """
        self._poked.clear()
        self.step_down_request = None
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
                ],
            )
        except redis.ResponseError as exc:
            if not _is_foreign_data_error(exc):
                raise
            return False  # someone replaced our lease with a value of another type
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
        return False

    def release(self, term: Term, *, reserve_for: str | None = None) -> bool:
        """Give the lease up and wake every waiter; False if it was not ours any more.

        ``reserve_for`` (a handoff) keeps the lease for that worker for one TTL:
        only it may take it meanwhile, and if it never does, the reservation
        expires like any lease.
        """
        term.valid_until = min(term.valid_until, time.monotonic())
        try:
            released = self._release(
                keys=[self.lease_key],
                args=[term.value, self.channel, self.name, reserve_for or "", self._ttl_ms],
            )
        except redis.ResponseError as exc:
            if not _is_foreign_data_error(exc):
                raise
            return False
        return int(released) == 1

    def holder(self) -> Holder | None:
        """The current holder, or None when the lease is free."""
        try:
            raw, pttl = self._observe(keys=[self.lease_key])
        except redis.ResponseError as exc:
            if not _is_foreign_data_error(exc):
                raise
            return Holder.foreign_error(exc)
        if raw is None:
            return None
        raw_bytes = raw if isinstance(raw, bytes) else str(raw).encode()
        return Holder.parse(raw_bytes, int(pttl))

    def notify(self, kind: str, ttl_ms: int) -> None:
        """Called by the listener's thread: a release wakes :meth:`wait`, a renewal defers it."""
        if kind == "renewed":
            self._renewed_until = time.monotonic() + ttl_ms / 1000.0
        elif kind == "poke":
            self._operator_poke = True  # an operator asked: the holder renews now
            self._poked.set()
        else:
            self._woken.set()
        self._nudged.set()

    def wait(self, timeout: float, *, max_wait: float | None = None) -> bool:
        """Block until a release of this lease is announced or the lease would expire.

        ``timeout`` is the expiry the caller observed; each renewal announced
        meanwhile moves it to the renewed expiry, so a waiter sends nothing while
        the holder keeps renewing.  Returns True when woken by a release (or a
        listener reconnect), False when the (possibly moved) deadline passed or
        ``max_wait`` seconds went by, whichever is first.
        """
        started = time.monotonic()
        deadline = started + timeout
        cap = started + max_wait if max_wait is not None else float("inf")
        while not self._woken.is_set():
            left = min(deadline, cap) - time.monotonic()
            if left <= 0:
                return False
            self._nudged.wait(left)
            self._nudged.clear()
            renewed_until, self._renewed_until = self._renewed_until, None
            if renewed_until is not None:
                deadline = max(deadline, renewed_until + WAKE_MARGIN)
        return True

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

    def poke(self) -> None:
        """Ask this lease's holder, wherever it runs, to renew now (see step_down_request)."""
        self.client.publish(self.channel, f"poke 0 {self.name}")

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


def describe_holder(holder: Holder | None) -> dict[str, Any]:
    """A JSON-friendly view of ``holder`` for dumps and logs."""
    if holder is None:
        return {"leader": None, "token": None, "since": None, "lease_time_left": None}
    if holder.foreign:
        return {
            "leader": None,
            "token": None,
            "since": None,
            "lease_time_left": holder.ttl_left,
            "foreign_value": holder.raw[:80].decode(errors="replace"),
        }
    return {
        "leader": holder.hostname,
        "token": holder.token,
        "since": holder.since,
        "lease_time_left": holder.ttl_left,
    }
