"""One pub/sub listener per worker and key prefix: releases and new terms wake waiters at once.

Every release, renewal and new term of every lease under a prefix is
announced on one channel (``keys.lease_channel``); a worker subscribes once,
whatever its number of Stokers, and hands each message to the waiters of that
lease.  A renewal or a new term moves a waiter's wake-up to the announced
expiry, so followers send nothing while a leader keeps renewing.

**On a Redis Cluster** the scripts announce with ``SPUBLISH`` on each Stoker's
own shard channel (``keys.stoker_channel``, in the Stoker's slot: a script
may only touch its own slot, and a plain ``PUBLISH`` would be broadcast to
every node of the cluster), and the listener ``SSUBSCRIBE``s to one channel
per registered Stoker; redis-py keeps one connection per node that holds any
of them.  We kept the prefix-wide channel on a single Redis rather than using
one code path for both: it costs one subscription per worker instead of one
per Stoker, and works on servers older than Redis 7 (no sharded pub/sub).
A slot that moves (a reshard) or a node that fails sends the listener a
``sunsubscribe`` or breaks its connection: either way the listener drops
every subscription, wakes every waiter (which falls back on its own deadline
and looks at the lease once), and subscribes afresh to wherever the slots
now are, with backoff.

**Presence.**  On a single Redis the listener also subscribes to one channel per
worker it serves (``keys.worker_channel``), on which nothing is ever sent: the
subscription itself is the worker's sign of life.  Redis drops it with the
connection, so a waiter whose worker died (SIGKILL, a lost pod) has no
subscriber, and ACQUIRE and RELEASE forget it (``scripts.py``) without gossip,
heartbeats or any command while nothing changes.  On a Redis Cluster a plain
subscription lives on one node only and the scripts could not count it, so
there a clean stop's own ZREM is what keeps the waiters set clean.

**Back as soon as Redis is.**  A release announced while the listener is down
is heard by nobody: followers take the lease only at the expiry they saw, up
to a TTL later.  The listener used to back off up to 2 s between attempts,
four times the election's most, so after a cluster failover the election
reached the promoted replica well before the listener did and a clean stop
in between took 0.5 - 1.2 s to hand over.  Now it backs off at most
:data:`RECONNECT_MAX` (the election's 0.5 s), and a lease that just got an
answer from Redis calls :meth:`LeaseListener.retry_now`: a listener that is
down tries again at once.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

import redis

from .keys import parse_message

#: Message types of a subscription confirmation, and of one withdrawn by the server.
_SUBSCRIBED = ("subscribe", "ssubscribe")
_DATA = ("message", "smessage")

logger = logging.getLogger("celery_stoker.lease")

#: Backoff between the listener's own reconnection attempts: first, and the most
#: (as the election's: every moment the listener is down, a release goes unheard).
RECONNECT_START = 0.05
RECONNECT_MAX = 0.5
#: After the Redis user was refused the channel (an ACL without ``&<prefix>:*``), how
#: long the listener waits before it tries again: no reconnect twice a second.
PERMISSION_RETRY = 30.0


class LeaseWaiter(Protocol):
    """What the listener tells: a message's kind (see ``keys``), or ``reconnected``."""

    def notify(self, kind: str, ttl_ms: int, extra: str = "") -> None: ...


class LeaseListener:
    """One pub/sub connection that tells every local waiter about releases and renewals.

    A worker runs one of these per key prefix, whatever the number of leases:
    one shared channel carrying the lease name costs less than a subscription
    per lease.  If the connection drops, waiters still wake at the expiry they
    observed; the listener reconnects with backoff and then wakes every waiter
    so it looks again.  ``client_factory`` must make a new client at each call:
    the listener closes it with the attempt it served.
    """

    def __init__(
        self,
        client_factory: Callable[[], redis.Redis],
        channel: str,
        *,
        thread_name: str = "stoker-lease-listener",
        health_interval: float = 5.0,
        shard_channel: Callable[[str], str] | None = None,
        presence: tuple[str, ...] = (),
    ) -> None:
        self._client_factory = client_factory
        self.channel = channel
        #: On a Redis Cluster: the shard channel of each Stoker (``SSUBSCRIBE``);
        #: ``channel`` is then only the name in log lines.
        self.shard_channel = shard_channel
        #: A PING goes out after this long without a message; no answer within
        #: twice this means the connection died silently (a partition, a
        #: failover behind a proxy), and the listener reconnects.
        self.health_interval = health_interval
        self._thread_name = thread_name
        #: Channels whose subscription says a worker is alive (single Redis only):
        #: subscribed with the lease channel, before :meth:`start` returns.
        self._presence: tuple[str, ...] = () if shard_channel is not None else tuple(presence)
        self._waiters: dict[str, set[LeaseWaiter]] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        #: Set to cut a reconnection backoff short: Redis answered someone else (or stop).
        self._retry = threading.Event()
        self._subscribed = threading.Event()
        self._thread: threading.Thread | None = None
        self._changed = False  # a Stoker registered: subscribe to its shard channel
        #: On a Redis Cluster: the Stoker each shard channel asked for belongs to, so a
        #: subscription confirmation wakes its waiters without a pass over every Stoker.
        self._shard_names: dict[str, str] = {}

    def start(self, wait_subscribed: float = 1.0) -> None:
        """Start listening; wait up to ``wait_subscribed`` for the subscription to be live."""
        if self._thread is not None:
            return
        self._stopping.clear()
        self._retry.clear()
        self._thread = threading.Thread(target=self._run, name=self._thread_name, daemon=True)
        self._thread.start()
        self._subscribed.wait(wait_subscribed)

    def stop(self, timeout: float = 2.0) -> None:
        """Stop the thread and close its connection."""
        self._stopping.set()
        self._retry.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    @property
    def subscribed(self) -> bool:
        """True while the subscription is live (a release now wakes waiters at once)."""
        return self._subscribed.is_set()

    def retry_now(self) -> None:
        """Redis just answered a lease command: if the listener is down, reconnect now.

        Without this a listener could stay deaf for the rest of its backoff after
        a failover that the election had already got over.  The backoff itself
        keeps growing, so a subscription that fails for its own reasons costs one
        more attempt per lease command at most.  No-op while subscribed.
        """
        if not self._subscribed.is_set():
            self._retry.set()

    def register(self, name: str, waiter: LeaseWaiter) -> None:
        """Tell ``waiter`` about every release and renewal of the lease called ``name``."""
        with self._lock:
            self._waiters.setdefault(name, set()).add(waiter)
            self._changed = True

    def tells_presence(self, channel: str) -> bool:
        """True when this listener's subscription to ``channel`` says its worker is alive.

        Presence channels are given at construction and subscribed with the lease
        channel, before :meth:`start` returns: a lease that joined the waiters
        before its sign of life was up could be dropped as dead by another.
        """
        return self.shard_channel is None and channel in self._presence

    def unregister(self, name: str, waiter: LeaseWaiter) -> None:
        """Stop telling ``waiter`` about ``name``."""
        with self._lock:
            self._waiters.get(name, set()).discard(waiter)

    def _dispatch(self, data: bytes | str) -> None:
        parsed = parse_message(data)
        if parsed is None:
            return
        kind, ttl_ms, name, extra = parsed
        with self._lock:
            waiters = list(self._waiters.get(name, ()))
        for waiter in waiters:
            waiter.notify(kind, ttl_ms, extra)

    def _wake_all(self, shard_channel: bytes | str | None = None) -> None:
        """Tell waiters to look again: all of them, or those of one Stoker's shard channel."""
        if isinstance(shard_channel, bytes):
            shard_channel = shard_channel.decode(errors="replace")
        with self._lock:
            if shard_channel is None:
                waiters = [w for group in self._waiters.values() for w in group]
            else:
                name = self._shard_names.get(shard_channel)
                waiters = list(self._waiters.get(name, ())) if name is not None else []
        for waiter in waiters:
            waiter.notify("reconnected", 0)

    def _run(self) -> None:
        backoff = RECONNECT_START
        logged_down: bool | str = False  # "noperm": refused by the ACL, said as such
        while not self._stopping.is_set():
            client = pubsub = None
            # A nudge before this attempt is answered by it; one during it (Redis answered
            # meanwhile) makes a failed attempt try again at once.
            self._retry.clear()
            try:
                client = self._client_factory()
                pubsub = client.pubsub(ignore_subscribe_messages=False)
                sharded: set[str] = set()
                if self.shard_channel is None:
                    pubsub.subscribe(self.channel, *self._presence)
                last_heard = time.monotonic()
                pinged = False
                while not self._stopping.is_set():
                    if self.shard_channel is not None:
                        self._subscribe_shards(pubsub, sharded)
                        message = self._sharded_message(pubsub, sharded)
                    else:
                        message = pubsub.get_message(timeout=0.25)
                    quiet = time.monotonic() - last_heard
                    if message is None:
                        if quiet > 2 * self.health_interval:
                            raise redis.ConnectionError("no answer to PING on the lease channel")
                        if quiet > self.health_interval and not pinged:
                            self._ping(pubsub)
                            pinged = True
                        continue
                    last_heard, pinged = time.monotonic(), False
                    if message["type"] == "sunsubscribe":
                        # The server withdrew a shard channel: its slot moved or its node
                        # stopped serving it.  Start over where the slots are now.
                        raise redis.ConnectionError(
                            f"shard channel {message['channel']!r} withdrawn by the server "
                            "(slot moved or failed over)"
                        )
                    if message["type"] in _SUBSCRIBED and not self._is_lease_channel(
                        message["channel"]
                    ):
                        continue  # a presence channel: nothing to look at again
                    if message["type"] in _SUBSCRIBED:
                        self._subscribed.set()
                        if logged_down:
                            logger.info("lease listener on %s is back", self.channel)
                            logged_down = False
                        backoff = RECONNECT_START
                        # Anything released while we were away: let waiters look again
                        # (on a cluster, those of the Stoker whose channel this is).
                        self._wake_all(message["channel"] if self.shard_channel else None)
                    elif message["type"] in _DATA:
                        self._dispatch(message["data"])
            except Exception as exc:  # Redis gone, or anything else: never a dead thread
                self._subscribed.clear()
                if isinstance(exc, redis.exceptions.NoPermissionError) or "NOPERM" in str(exc):
                    # Refused by the ACL, not lost: say so once, and do not reconnect
                    # at every lease command meanwhile.
                    if logged_down != "noperm":
                        logger.error(
                            "lease listener: the Redis user may not subscribe to %s (%s: %s); "
                            "waiters fall back to lease expiry (handovers take up to one TTL) "
                            "until it may: grant the channel pattern &<prefix>:* (README, "
                            "Redis requirements); asked again every %.0f s",
                            self.channel,
                            exc.__class__.__name__,
                            exc,
                            PERMISSION_RETRY,
                        )
                        logged_down = "noperm"
                    self._stopping.wait(PERMISSION_RETRY)
                    continue
                if not logged_down:
                    logger.warning(
                        "lease listener lost Redis (%s: %s); waiters fall back to lease "
                        "expiry until it is back",
                        exc.__class__.__name__,
                        exc,
                        exc_info=not isinstance(exc, (redis.RedisError, OSError)),
                    )
                    logged_down = True
                # Until the backoff is over, or until a lease command reaches Redis.
                self._retry.wait(backoff)
                backoff = min(backoff * 2, RECONNECT_MAX)
            finally:
                # Each attempt's client goes with it: on a cluster it holds a pool per node.
                for closable in (pubsub, client):
                    if closable is not None:
                        with contextlib.suppress(Exception):  # closing a broken socket
                            closable.close()
        self._subscribed.clear()

    def _is_lease_channel(self, channel: bytes | str) -> bool:
        """True unless ``channel`` is one of the presence channels (single Redis)."""
        if self.shard_channel is not None:
            return True
        text = channel.decode(errors="replace") if isinstance(channel, bytes) else channel
        return text == self.channel

    def _subscribe_shards(self, pubsub: Any, subscribed: set[str]) -> None:
        """SSUBSCRIBE to the shard channel of every Stoker registered since the last look."""
        if not self._changed and subscribed:
            return
        assert self.shard_channel is not None
        with self._lock:
            self._changed = False
            channels = {
                self.shard_channel(name): name for name, group in self._waiters.items() if group
            }
            self._shard_names.update(channels)
        wanted = set(channels)
        new = sorted(wanted - subscribed)
        if new:
            pubsub.ssubscribe(*new)
            subscribed.update(new)
        elif not wanted:
            self._subscribed.set()  # nothing to listen to yet: nothing is missed

    def _sharded_message(self, pubsub: Any, subscribed: set[str]) -> dict[str, Any] | None:
        """The next message of any node's connection; waits 0.25 s in all when none has one."""
        if not subscribed:
            self._stopping.wait(0.25)  # a stop is not kept waiting
            return None
        nodes = max(1, len(getattr(pubsub, "node_pubsub_mapping", {}) or {}))
        message: dict[str, Any] | None = pubsub.get_sharded_message(timeout=0.25 / nodes)
        return message

    def _ping(self, pubsub: Any) -> None:
        """A PING on every connection of the subscription (each node's, on a cluster)."""
        if self.shard_channel is None:
            pubsub.ping()
            return
        for node_pubsub in list((getattr(pubsub, "node_pubsub_mapping", {}) or {}).values()):
            node_pubsub.ping()
