"""The live worker set, as Celery's gossip sees it, kept to this app's workers.

Celery's ``Gossip`` consumer step already follows every worker's
``worker-online``, ``worker-heartbeat`` and ``worker-offline`` events (they are
sent whether or not the worker runs with ``-E``) and calls back on a node
joining, leaving cleanly or being lost (heartbeats stopped).  This module
listens to those callbacks, keeps the set of live node names, and tells the
activators about each change.

Every worker on a broker sends those events, whatever its app.  So each worker
running Stokers adds one field, :data:`SCOPE_FIELD`, to the events its heart
sends: its app's name and the key prefixes of its Stokers (no extra message,
nothing sent to Redis), and its release (``version``, from 0.2.0 on).  A
worker counts as a member of a Stoker's fleet only when it announces the same
app and that Stoker's key prefix; a worker of another app, of another key
prefix, or one without Stokers is not counted (logged once at DEBUG).  Nor is
a worker of 0.1.0, which announced nothing: from its heartbeats it cannot be
told from a worker without Stokers, and counting every such worker would make
other apps' workers members again.  ``celery stoker status`` names it as old
(its ``inspect stoker`` reply carries no version), and README's upgrade note
says what a mixed fleet does.

The same field carries, per key prefix, what this worker leads and may lead
(``balance``: a :class:`~celery_stoker.balance.Announcement`), read again at
every heartbeat Celery sends; :meth:`Membership.heard` reads the others' latest
from the gossip state, where Celery keeps every field of a worker's last
heartbeat.  That is how leadership is spread without a Redis command.

With ``--without-gossip`` there is nothing to listen to: the set holds only
this worker, and no ``cluster_change`` events are raised (logged once).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ._version import __version__
from .balance import BALANCE_FIELD, Announcement

logger = logging.getLogger("celery_stoker.membership")

GOSSIP_STEP = "celery.worker.consumer.gossip.Gossip"
HEART_STEP = "celery.worker.consumer.heart.Heart"
#: The field of ``worker-online``/``-heartbeat``/``-offline`` events that says which
#: app and key prefixes a worker runs Stokers for, and its release:
#: ``{"app": ..., "prefixes": [...], "version": "0.2.0"}`` (0.1.0 sent no such field),
#: and, from the release that spreads leadership on, ``"balance": {prefix: announcement}``
#: (``balance.py``; a worker without it is neither counted nor named by the others).
SCOPE_FIELD = "stoker_scope"

#: Called with (node name, "joined" | "left" | "lost").
ChangeListener = Callable[[str, str], None]


@dataclass(frozen=True)
class Scope:
    """The app a worker runs and the key prefixes of its Stokers."""

    app: str
    prefixes: frozenset[str]
    #: The release the worker runs; None when it did not say (not part of equality:
    #: a worker is a member whatever its release).
    version: str | None = field(default=None, compare=False)

    @classmethod
    def of_event_fields(cls, raw: Any) -> Scope | None:
        """The scope a worker announced (None: it announced none, or not in our form)."""
        if not isinstance(raw, dict) or not isinstance(raw.get("app"), str):
            return None
        prefixes = raw.get("prefixes")
        if not isinstance(prefixes, list):
            return None
        version = raw.get("version")
        return cls(
            raw["app"],
            frozenset(p for p in prefixes if isinstance(p, str)),
            version if isinstance(version, str) else None,
        )


def announce(scope: Scope, balance: Mapping[str, Announcement] | None = None) -> None:
    """Make this worker's heartbeats (and ``worker-online``/``-offline``) carry ``scope``.

    Celery's heart sends ``celery.worker.state.SOFTWARE_INFO`` with every such
    event (and reads it at each send), so adding our field there costs no
    message of its own.  It must run before the consumer starts its heart;
    running it again (a new dict, assigned at once) changes what the next
    heartbeat says: ``balance`` is what this worker leads and may lead, per prefix.
    """
    from celery.worker.state import SOFTWARE_INFO

    fields: dict[str, Any] = {
        "app": scope.app,
        "prefixes": sorted(scope.prefixes),
        "version": scope.version or __version__,
    }
    if balance is not None:
        fields[BALANCE_FIELD] = {prefix: a.fields() for prefix, a in sorted(balance.items())}
    SOFTWARE_INFO[SCOPE_FIELD] = fields


class Membership:
    """The live node names of the fleet, this worker included, by scope."""

    def __init__(self, hostname: str, app: str = "", prefixes: Iterable[str] = ()) -> None:
        self.hostname = hostname
        self.scope = Scope(app, frozenset(prefixes), __version__)
        #: Live nodes and what they announced (None: no scope, e.g. another release).
        self._live: dict[str, Scope | None] = {hostname: self.scope}
        #: Gossip's record of each live node, which Celery updates with every heartbeat.
        self._heartbeats: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._listeners: list[tuple[ChangeListener, str | None]] = []
        self._strangers_logged: set[tuple[str, Scope | None]] = set()
        self.source = "self only"
        #: Seconds between this worker's heartbeats (Celery's ``--heartbeat-interval``).
        self.heartbeat_interval = 2.0

    def members(self, prefix: str | None = None) -> frozenset[str]:
        """A snapshot of the live nodes that run this app's Stokers under ``prefix``.

        With no ``prefix``: under any of this worker's prefixes.
        """
        with self._lock:
            return frozenset(
                node
                for node, scope in self._live.items()
                if node == self.hostname or self._ours(scope, prefix)
            )

    def heard(self, prefix: str) -> dict[str, Announcement]:
        """The others' latest balance announcements for ``prefix``, by node.

        Only members of ``prefix`` whose heartbeats are current (Celery's
        ``alive``: one within twice their interval) and that announce one;
        read from the heartbeat Celery keeps, so always the newest.
        """
        with self._lock:
            nodes = [
                (node, self._heartbeats.get(node))
                for node, scope in self._live.items()
                if node != self.hostname and self._ours(scope, prefix)
            ]
        heard = {}
        for node, worker in nodes:
            if worker is None or not getattr(worker, "alive", False):
                continue
            raw = getattr(worker, SCOPE_FIELD, None)
            balance = raw.get(BALANCE_FIELD) if isinstance(raw, dict) else None
            announced = (
                Announcement.parse(balance.get(prefix)) if isinstance(balance, dict) else None
            )
            if announced is not None:
                heard[node] = announced
        return heard

    def subscribe(self, listener: ChangeListener, prefix: str | None = None) -> None:
        """Call ``listener(node, change)`` on every change among the members of ``prefix``."""
        self._listeners.append((listener, prefix))

    def _ours(self, scope: Scope | None, prefix: str | None) -> bool:
        if scope is None or scope.app != self.scope.app:
            return False
        if prefix is None:
            return bool(scope.prefixes & self.scope.prefixes)
        return prefix in scope.prefixes

    def change(
        self, node: str, change: str, scope: Scope | None = None, heartbeat: Any = None
    ) -> None:
        """Record that ``node`` (announcing ``scope``) joined, left or was lost; tell listeners.

        ``heartbeat`` is gossip's record of the node (its newest heartbeat's
        fields).  A listener hears only of nodes entering or leaving its own members.
        """
        if node == self.hostname:
            return
        with self._lock:
            was_live, before = node in self._live, self._live.get(node)
            if change == "joined":
                self._live[node] = scope
                if heartbeat is not None:
                    self._heartbeats[node] = heartbeat
            else:
                self._live.pop(node, None)
                self._heartbeats.pop(node, None)
            is_live, after = node in self._live, self._live.get(node)
            live = sum(
                1 for n, s in self._live.items() if n == self.hostname or self._ours(s, None)
            )

        def moved(prefix: str | None) -> str | None:
            was = was_live and self._ours(before, prefix)
            now = is_live and self._ours(after, prefix)
            if was == now:
                return None
            return change if now or change != "joined" else "left"

        for listener, prefix in list(self._listeners):
            told = moved(prefix)
            if told is None:
                continue
            try:
                listener(node, told)
            except Exception:
                logger.exception("cluster-change listener failed for %s %s", node, told)
        told = moved(None)
        if told is not None:
            logger.info("fleet: %s %s (%d live)", node, told, live)
        elif change == "joined" and (node, scope) not in self._strangers_logged:
            self._strangers_logged.add((node, scope))
            logger.debug(
                "fleet: %s is no member of app %s (prefixes %s): it runs %s",
                node,
                self.scope.app,
                ", ".join(sorted(self.scope.prefixes)),
                f"app {scope.app}, prefixes {', '.join(sorted(scope.prefixes))}"
                if scope
                else "no Stokers (or a release that does not say)",
            )

    def attach_gossip(self, consumer: Any) -> bool:
        """Follow the worker consumer's Gossip step; False when gossip is off."""
        steps = getattr(getattr(consumer, "blueprint", None), "steps", {}) or {}
        gossip = steps.get(GOSSIP_STEP)
        if gossip is None or not getattr(gossip, "enabled", False):
            # INFO: a deliberate setting (the usual advice for large fleets), said once at
            # start; a WARNING here would page an operator at every deploy.
            logger.info(
                "celery-stoker: gossip is off (--without-gossip), so the leader sees no "
                "cluster_change events and context.members holds only this worker"
            )
            return False
        self.heartbeat_interval = float(getattr(gossip, "heartbeat_interval", None) or 2.0)
        gossip.on.node_join.add(
            lambda worker: self.change(worker.hostname, "joined", _scope(worker), worker)
        )
        gossip.on.node_leave.add(lambda worker: self.change(worker.hostname, "left"))
        gossip.on.node_lost.add(lambda worker: self.change(worker.hostname, "lost"))
        for worker in list(getattr(gossip.state, "workers", {}).values()):
            if getattr(worker, "alive", False):
                self.change(worker.hostname, "joined", _scope(worker), worker)
        self.source = "gossip"
        return True

    def heartbeats_on(self, consumer: Any) -> bool:
        """True when this worker's heart sends heartbeats; said once at start when not.

        Gossip counts a worker from its ``worker-online`` and heartbeat events:
        a worker without them (``--without-heartbeat``) is a member of no one
        else's fleet, whatever its own gossip sees.
        """
        steps = getattr(getattr(consumer, "blueprint", None), "steps", {}) or {}
        heart = steps.get(HEART_STEP)
        if heart is not None and getattr(heart, "enabled", True):
            return True
        logger.info(
            "celery-stoker: heartbeats are off (--without-heartbeat): the other workers do "
            "not count this one in their context.members and cluster_change events"
        )
        return False


def _scope(worker: Any) -> Scope | None:
    """What a gossip ``Worker`` announced (Celery keeps every event field as an attribute)."""
    return Scope.of_event_fields(getattr(worker, SCOPE_FIELD, None))
