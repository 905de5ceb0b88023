"""The live worker set, as Celery's gossip sees it.

Celery's ``Gossip`` consumer step already follows every worker's
``worker-online``, ``worker-heartbeat`` and ``worker-offline`` events (they are
sent whether or not the worker runs with ``-E``) and calls back on a node
joining, leaving cleanly or being lost (heartbeats stopped).  This module
listens to those callbacks, keeps the set of live node names, and tells the
activators about each change.

With ``--without-gossip`` there is nothing to listen to: the set holds only
this worker, and no ``cluster_change`` events are raised (logged once).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

logger = logging.getLogger("celery_stoker.membership")

GOSSIP_STEP = "celery.worker.consumer.gossip.Gossip"

#: Called with (node name, "joined" | "left" | "lost").
ChangeListener = Callable[[str, str], None]


class Membership:
    """The live node names of the fleet, this worker included."""

    def __init__(self, hostname: str) -> None:
        self.hostname = hostname
        self._live: set[str] = {hostname}
        self._lock = threading.Lock()
        self._listeners: list[ChangeListener] = []
        self.source = "self only"

    def members(self) -> frozenset[str]:
        """A snapshot of the live node names."""
        with self._lock:
            return frozenset(self._live)

    def subscribe(self, listener: ChangeListener) -> None:
        """Call ``listener(node, change)`` on every change."""
        self._listeners.append(listener)

    def change(self, node: str, change: str) -> None:
        """Record that ``node`` joined, left or was lost, and tell the listeners."""
        if node == self.hostname:
            return
        with self._lock:
            before = node in self._live
            if change == "joined":
                self._live.add(node)
            else:
                self._live.discard(node)
            after = node in self._live
        if before == after:
            return
        logger.info("fleet: %s %s (%d live)", node, change, len(self._live))
        for listener in list(self._listeners):
            try:
                listener(node, change)
            except Exception:
                logger.exception("cluster-change listener failed for %s %s", node, change)

    def attach_gossip(self, consumer: Any) -> bool:
        """Follow the worker consumer's Gossip step; False when gossip is off."""
        steps = getattr(getattr(consumer, "blueprint", None), "steps", {}) or {}
        gossip = steps.get(GOSSIP_STEP)
        if gossip is None or not getattr(gossip, "enabled", False):
            logger.warning(
                "celery-stoker: gossip is off (--without-gossip), so the leader sees no "
                "cluster_change events and context.members holds only this worker"
            )
            return False
        gossip.on.node_join.add(lambda worker: self.change(worker.hostname, "joined"))
        gossip.on.node_leave.add(lambda worker: self.change(worker.hostname, "left"))
        gossip.on.node_lost.add(lambda worker: self.change(worker.hostname, "lost"))
        for worker in list(getattr(gossip.state, "workers", {}).values()):
            if getattr(worker, "alive", False):
                self.change(worker.hostname, "joined")
        self.source = "gossip"
        return True
