"""One pub/sub listener per worker and key prefix: releases and new terms wake waiters at once.

Every release, renewal and new term of every lease under a prefix is
announced on one channel (``keys.lease_channel``); a worker subscribes once,
whatever its number of Stokers, and hands each message to the waiters of that
lease.  A renewal or a new term moves a waiter's wake-up to the announced
expiry, so followers send nothing while a leader keeps renewing.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from typing import Protocol

import redis

from .keys import parse_message

logger = logging.getLogger("celery_stoker.lease")


class LeaseWaiter(Protocol):
    """What the listener tells: a message's kind (see ``keys``), or ``reconnected``."""

    def notify(self, kind: str, ttl_ms: int, extra: str = "") -> None: ...


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
        parsed = parse_message(data)
        if parsed is None:
            return
        kind, ttl_ms, name, extra = parsed
        with self._lock:
            waiters = list(self._waiters.get(name, ()))
        for waiter in waiters:
            waiter.notify(kind, ttl_ms, extra)

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
            except Exception as exc:  # Redis gone, or anything else: never a dead thread
                self._subscribed.clear()
                if not logged_down:
                    logger.warning(
                        "lease listener lost Redis (%s: %s); waiters fall back to lease "
                        "expiry until it is back",
                        exc.__class__.__name__,
                        exc,
                        exc_info=not isinstance(exc, (redis.RedisError, OSError)),
                    )
                    logged_down = True
                self._stopping.wait(backoff)
                backoff = min(backoff * 2, 2.0)
            finally:
                if pubsub is not None:
                    with contextlib.suppress(Exception):  # closing a broken socket
                        pubsub.close()
        self._subscribed.clear()
