"""``StokerStep``: the one bootstep a user adds; it runs the activators inside ``celery worker``.

It reads like Celery's own steps: it checks the settings when the worker is
built (a bad value stops the worker at start with the setting's name), starts
one activator per registered Stoker after the pool, and stops them before the
pool drains.  Because it starts before the consumer, it also makes the worker
consume its own event queue, ``<stoker_key_prefix>.<hostname>``, from the
first message on.

Shutdown: Celery sends ``worker_shutting_down`` from the signal handler of a
warm, soft or cold shutdown; the activators begin stepping down right there, so
a follower elsewhere takes over while this worker is still finishing tasks.
"""

from __future__ import annotations

import logging
import threading
import uuid
from typing import Any

from celery import bootsteps, signals

from .activator import Activator
from .connection import redis_client
from .lease import LeaseListener, draining_key, lease_channel
from .membership import Membership
from .settings import StokerSettings, check_timing, load_settings
from .stoker import WorkerInfo, is_eligible, registry_of
from .telemetry import EventEmitter

logger = logging.getLogger("celery_stoker.bootstep")

#: Longest a stopping worker waits for all its activators to step down.
STOP_TIMEOUT = 15.0


def event_queue_name(conf: Any, hostname: str) -> str:
    """The queue this worker's Stoker events travel on; only this worker consumes it."""
    _, _, prefix = check_timing(conf)
    return f"{prefix}.{hostname}"


class StokerStep(bootsteps.StartStopStep):
    """Run one activator per registered Stoker in this worker (the only wiring needed)."""

    label = "Stoker"
    requires = ("celery.worker.components:Pool",)

    def __init__(self, worker: Any, stoker_drain: bool = False, **kwargs: Any) -> None:
        super().__init__(worker, **kwargs)
        self.drain_at_start = bool(stoker_drain or worker.app.conf.get("stoker_drain"))
        self.worker = worker
        self.app = worker.app
        self.hostname: str = worker.hostname
        self.registry = registry_of(self.app)
        self.activators: dict[str, Activator] = {}
        self.listeners: dict[tuple[str, str], LeaseListener] = {}
        self.membership = Membership(self.hostname)
        self.emitter = EventEmitter(worker.app, self.hostname)
        self._stopped = threading.Event()
        # Check every setting now: a bad value stops the worker before it starts.
        self.settings: dict[str, StokerSettings] = {
            name: load_settings(self.app.conf, spec.options) for name, spec in self.registry.items()
        }
        self.queue_name = event_queue_name(self.app.conf, self.hostname)
        if self.registry:
            self.app.amqp.queues.select_add(self.queue_name)
        worker.stoker = self

    def start(self, worker: Any) -> None:
        if not self.registry:
            logger.info("celery-stoker: no Stokers registered in this app; nothing to run")
            return
        self.membership.attach_gossip(worker.consumer)
        self.emitter.start()
        if self.drain_at_start:
            self._drain_self()
        holder_prefix = f"{self.hostname}/{uuid.uuid4().hex[:12]}"
        info = WorkerInfo(self.hostname, self._consumed_queues(), self.app)
        for name, spec in self.registry.items():
            settings = self.settings[name]
            activator = Activator(
                self.app,
                spec,
                settings,
                hostname=self.hostname,
                queue_name=self.queue_name,
                listener=self._listener(settings),
                members=self.membership.members,
                holder_id=f"{holder_prefix}/{name}",
                eligible=self._eligible(spec, info),
                min_members=spec.min_members,
                emit=self.emitter.emit,
            )
            self.membership.subscribe(activator.on_cluster_change)
            self.activators[name] = activator
        for activator in self.activators.values():
            activator.start()
        signals.worker_shutting_down.connect(self._on_shutting_down, weak=False)
        logger.info(
            "celery-stoker: %d activator(s) on %s: %s",
            len(self.activators),
            self.hostname,
            ", ".join(sorted(self.activators)),
        )

    def _consumed_queues(self) -> frozenset[str]:
        try:
            return frozenset(self.app.amqp.queues.consume_from)
        except Exception:
            return frozenset()

    def _eligible(self, spec: Any, info: WorkerInfo) -> bool:
        try:
            return is_eligible(spec.eligible, info)
        except Exception:
            logger.exception(
                "Stoker %s: its eligible= check raised; this worker will not lead it", spec.name
            )
            return False

    def _drain_self(self) -> None:
        """``--stoker-drain`` / ``stoker_drain``: join the draining set before any election."""
        for settings in {s.key_prefix: s for s in self.settings.values()}.values():
            client = redis_client(
                settings.url,
                transport_options=settings.transport_options,
                socket_timeout=settings.socket_timeout,
            )
            try:
                client.sadd(draining_key(settings.key_prefix), self.hostname)
                logger.warning("celery-stoker: %s starts draining: it will not lead", self.hostname)
            except Exception as exc:
                logger.error(
                    "celery-stoker: could not mark %s as draining in %s (%s)",
                    self.hostname,
                    settings.masked_url,
                    exc,
                )
            finally:
                client.close()

    def _listener(self, settings: StokerSettings) -> LeaseListener:
        key = (settings.url, settings.key_prefix)
        listener = self.listeners.get(key)
        if listener is None:

            def client_factory() -> Any:
                return redis_client(
                    settings.url,
                    transport_options=settings.transport_options,
                    socket_timeout=None,
                    socket_connect_timeout=settings.socket_timeout,
                )

            listener = LeaseListener(
                client_factory,
                lease_channel(settings.key_prefix),
                thread_name=f"stoker-lease-listener:{settings.key_prefix}",
                health_interval=max(1.0, settings.lease_ttl),
            )
            listener.start()
            self.listeners[key] = listener
        return listener

    def _on_shutting_down(self, sender: Any = None, **kwargs: Any) -> None:
        """Runs inside Celery's signal handler: hand the work to a thread, take no lock here."""
        if sender is not None and str(sender) != self.hostname:
            return
        threading.Thread(
            target=self._request_stops, name="stoker-stop-request", daemon=True
        ).start()

    def _request_stops(self) -> None:
        for activator in self.activators.values():
            activator.request_stop("worker_stopping")

    def stop(self, worker: Any) -> None:
        """Step every activator down (releasing held leases), then stop the listeners."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        signals.worker_shutting_down.disconnect(self._on_shutting_down)
        for activator in self.activators.values():
            activator.request_stop("worker_stopping")
        for activator in self.activators.values():
            activator.stop(STOP_TIMEOUT)
        for listener in self.listeners.values():
            listener.stop()
        self.emitter.stop()

    def shutdown(self, worker: Any) -> None:
        self.stop(worker)

    def terminate(self, worker: Any) -> None:
        self.stop(worker)

    def snapshot(self) -> dict[str, Any]:
        """Every activator's fields, for ``celery inspect stoker``."""
        return {
            "hostname": self.hostname,
            "members": sorted(self.membership.members()),
            "membership_source": self.membership.source,
            "activators": {name: a.snapshot() for name, a in self.activators.items()},
        }


from . import control as _control  # noqa: E402,F401  (registers `celery inspect stoker`)
