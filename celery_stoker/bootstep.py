"""``StokerStep``: the one bootstep a user adds; it runs the activators inside ``celery worker``.

It reads like Celery's own steps: it checks the settings when the worker is
built (a bad value stops the worker at start with the setting's name), starts
one activator per registered Stoker after the pool, and stops them before the
pool drains.  Because it starts before the consumer, it also makes the worker
consume its own event queue, ``<stoker_key_prefix>.<hostname>``, from the
first message on.

It owns the worker's pieces: one event pump (``pump.py``) and its watch over
events in flight (``watch.py``) with one report reader per Redis
(``reports.py``), one pub/sub listener per key prefix, one Redis client per
URL shared by every activator, one election thread per Stoker, the balancer
that spreads leadership (``balancer.py``), and, with ``stoker_metrics_port``,
the Prometheus endpoint (``metrics.py``).  This worker's draining marks are
``drain_marks.py``'s, what its pool can do (limits, green threads) ``worker_pool.py``'s.

Shutdown: Celery sends ``worker_shutting_down`` from the signal handler of a
warm, soft or cold shutdown; the activators begin stepping down right there, so
a follower elsewhere takes over while this worker is still finishing tasks.
``stop`` waits for them at most ``stoker_stop_timeout`` in all: a ``shutdown``
callback or hook that hangs cannot keep the worker from exiting (its lease,
no longer renewed, expires within one TTL).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from functools import partial
from typing import Any

import redis
from celery import bootsteps, signals
from kombu import Exchange, Queue

from ._version import __version__
from .access import AccessCheck
from .activator import Activator
from .balancer import Balancer
from .connection import is_cluster, redis_client
from .copies import copies
from .delivery import EventDelivery
from .dispatch import register_dispatch_task, warm_process
from .drain_marks import leave_draining_set, sync_drain_marks
from .keys import lease_channel, reports_key, stoker_channel, worker_channel
from .listener import LeaseListener
from .membership import Membership, announce
from .metrics import NO_METRICS, MetricsHooks
from .pump import EventPump
from .reaping import reap_promptly
from .registry import WorkerInfo, app_name, is_eligible, registry_of
from .settings import (
    StokerConfigurationError,
    StokerSettings,
    check_balance,
    check_metrics_address,
    check_metrics_port,
    check_timing,
    load_settings,
    setting_name,
)
from .telemetry import EventEmitter
from .worker_pool import green_spawn, pool_name, warn_unenforced_limits

logger = logging.getLogger("celery_stoker.bootstep")

#: Connections the activators of one worker share per Redis URL (commands are short:
#: a renewal takes well under a millisecond, so a few serve hundreds of Stokers).
MAX_SHARED_CONNECTIONS = 4


#: Seconds the broker keeps a worker's event queue once nobody consumes it
#: (``x-expires``, as Celery's own control queues): a worker stopped for good, under a
#: name never used again (a pod), leaves nothing behind, and a live worker's short
#: broker reconnect keeps its queue and what waits in it.
EVENT_QUEUE_EXPIRES = 20.0


def event_queue_name(conf: Any, hostname: str) -> str:
    """The queue this worker's Stoker events travel on; only this worker consumes it."""
    _, _, prefix = check_timing(conf)
    return f"{prefix}.{hostname}"


def event_queue(conf: Any, hostname: str) -> Queue:
    """This worker's event queue: durable, gone :data:`EVENT_QUEUE_EXPIRES` after its last use.

    Bound to nothing: events are published through the nameless (default)
    exchange, as Celery publishes to a direct queue, so no binding is left in
    the broker either (on Redis, no ``_kombu.binding.*`` member per name).
    """
    name = event_queue_name(conf, hostname)
    return Queue(name, Exchange(""), routing_key=name, durable=True, expires=EVENT_QUEUE_EXPIRES)


class StokerStep(bootsteps.StartStopStep):
    """Run one activator per registered Stoker in this worker (the only wiring needed)."""

    label = "Stoker"
    requires = ("celery.worker.components:Pool",)

    def __init__(
        self,
        worker: Any,
        stoker_drain: bool = False,
        without_gossip: bool = False,
        without_heartbeat: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(worker, **kwargs)
        self.drain_at_start = bool(stoker_drain or worker.app.conf.get("stoker_drain"))
        self.worker = worker
        self.app = worker.app
        self.hostname: str = worker.hostname
        self.registry = registry_of(self.app)
        register_dispatch_task(self.app)
        if self.registry:
            signals.worker_process_init.connect(self._warm_pool_process, weak=False)
            # Before the pool forks: its processes keep their state copies in files.
            copies.claim()
        self.activators: dict[str, Activator] = {}
        self.listeners: dict[tuple[str, str], LeaseListener] = {}
        self.emitter = EventEmitter(worker.app, self.hostname)
        self.pump = EventPump(self.hostname)
        self.clients: dict[tuple[str, float], redis.Redis] = {}
        #: One permission check (ACLs) per Redis URL and key prefix, shared by its elections.
        self.access_checks: dict[tuple[str, str], AccessCheck] = {}
        self._stopped = threading.Event()
        # Check every setting now: a bad value stops the worker before it starts.
        self.settings: dict[str, StokerSettings] = {}
        for name, spec in self.registry.items():
            try:
                self.settings[name] = load_settings(self.app.conf, spec.options)
                spec.cls.check_settings(self.app)
            except StokerConfigurationError as exc:
                raise StokerConfigurationError(f"Stoker {name!r}: {exc}") from None
        if without_gossip:
            self._refuse_min_members("--without-gossip")
        if without_heartbeat:
            self._refuse_min_members("--without-heartbeat")
        self.queue_name = event_queue_name(self.app.conf, self.hostname)
        self.delivery = EventDelivery(self.app, worker, self.queue_name)
        # Members are the workers of this app under the same key prefix (membership.py).
        prefixes = {settings.key_prefix for settings in self.settings.values()}
        self.membership = Membership(self.hostname, app_name(self.app), prefixes)
        # Announces what this worker leads, and spreads leadership (stoker_balance).
        self.balancer = Balancer(
            self.hostname, self.membership, enabled=check_balance(self.app.conf)
        )
        if self.registry:
            queue = event_queue(self.app.conf, self.hostname)
            # Celery gives a queue without an exchange name its default exchange (a binding
            # per worker name that outlives it): set the nameless one after it is added.
            self.app.amqp.queues.select_add(queue).exchange = Exchange("")
        self.metrics = self._metrics()
        self.pump.watch.on_refused = self.metrics.event_refused
        worker.stoker = self

    def _declare_event_queue(self) -> None:
        """Declare the event queue now; replace one an older release declared without expiry.

        RabbitMQ refuses to declare a queue again with other arguments
        (``PRECONDITION_FAILED``): a fleet upgraded under the same host names
        finds its queues from before, durable and without ``x-expires``, and the
        consumer could not start.  Such a queue holds only events of terms that
        are over (the pump admits only the event it has in flight), so an unused
        one is deleted and declared anew, said once.
        """
        queue = self.app.amqp.queues[self.queue_name]
        try:
            with self.app.connection_for_read() as conn:
                # One try: a broker down at start is the consumer's to wait for and say.
                conn.ensure_connection(max_retries=1, interval_start=0, timeout=5)
                try:
                    queue.bind(conn.default_channel).declare()
                except conn.channel_errors as exc:
                    if getattr(exc, "code", None) != 406:  # PRECONDITION_FAILED
                        raise
                    channel = conn.channel()
                    try:
                        channel.queue_delete(self.queue_name, if_unused=True)
                        queue.bind(channel).declare()
                    finally:
                        channel.close()
                    logger.warning(
                        "celery-stoker: replaced event queue %s, declared by an older release "
                        "without an expiry (%s); its old events were for terms that are over",
                        self.queue_name,
                        exc,
                    )
        except Exception as exc:
            # The consumer declares it too and says why if it cannot: no stop here.
            logger.warning(
                "celery-stoker: could not declare event queue %s (%s: %s)",
                self.queue_name,
                exc.__class__.__name__,
                exc,
            )

    def _refuse_min_members(self, why: str) -> None:
        """Stop the worker at start: a ``min_members`` > 1 Stoker would never act.

        Workers count each other by gossip, from the heartbeats each sends.
        Without gossip the live set holds only this worker; without heartbeats
        (``--without-heartbeat``, gossip on) no other worker ever counts this
        one, so a fleet that runs so sees one member each.  Its leader would
        hold the lease and never act, for good, and keep every other worker
        from leading.
        """
        needing = sorted(name for name, spec in self.registry.items() if spec.min_members > 1)
        if needing:
            raise StokerConfigurationError(
                f"Stoker {needing[0]!r}: min_members={self.registry[needing[0]].min_members} "
                "needs Celery's gossip and heartbeats to count the workers, and this worker "
                f"runs with {why}: its leader would hold the lease and never act.  Run it "
                "with gossip and heartbeats (no --without-gossip, no --without-heartbeat) or "
                "drop min_members= from @stoker"
                + (f" (also: {', '.join(needing[1:])})" if len(needing) > 1 else "")
            )

    def _metrics(self) -> MetricsHooks:
        """Prometheus metrics when ``stoker_metrics_port`` is set (on ``stoker_metrics_address``);
        only then is prometheus_client imported (a missing one stops the worker here, with
        the fix)."""
        port = check_metrics_port(self.app.conf)
        if port is None:
            return NO_METRICS
        from .metrics import PrometheusMetrics

        return PrometheusMetrics(
            self.hostname,
            port,
            members=self.membership.members,
            setting=setting_name(self.app.conf, "stoker_metrics_port"),
            address=check_metrics_address(self.app.conf),
            address_setting=setting_name(self.app.conf, "stoker_metrics_address"),
        )

    def start(self, worker: Any) -> None:
        self.metrics.start()  # first: a port in use stops the worker before any election
        if not self.registry:
            logger.info("celery-stoker: no Stokers registered in this app; nothing to run")
            return
        self._declare_event_queue()  # before the consumer does, so a refusal is explained
        announce(self.membership.scope)  # before the consumer's heart sends worker-online
        gossip = self.membership.attach_gossip(worker.consumer)
        if not gossip:
            self._refuse_min_members("gossip is off (a broker without it)")
        if not self.membership.heartbeats_on(worker.consumer):
            self._refuse_min_members("heartbeats off")
        self.emitter.start()
        sync_drain_marks(self.hostname, self.settings, draining=self.drain_at_start)
        holder_prefix = f"{self.hostname}/{uuid.uuid4().hex[:12]}"
        info = WorkerInfo(self.hostname, self._consumed_queues(), self.app)
        warn_unenforced_limits(worker, self.settings)
        # A recycled pool process is replaced at once, so no event (nor the user's task)
        # waits seconds for Celery's pool maintenance (reaping.py).
        reap_promptly(getattr(worker, "pool", None))
        for name, spec in self.registry.items():
            settings = self.settings[name]
            client = self._client(settings.url, settings.socket_timeout, settings)
            key = (settings.url, settings.key_prefix)
            if key not in self.access_checks:
                self.access_checks[key] = AccessCheck(
                    client, settings.key_prefix, masked_url=settings.masked_url
                )
            access = self.access_checks[key]
            activator = Activator(
                self.app,
                spec,
                settings,
                hostname=self.hostname,
                delivery=self.delivery,
                listener=self._listener(settings),
                members=partial(self.membership.members, settings.key_prefix),
                holder_id=f"{holder_prefix}/{name}",
                pump=self.pump,
                client=client,
                eligible=self._eligible(spec, info),
                min_members=spec.min_members,
                emit=self.emitter.emit,
                metrics=self.metrics,
                access=access,
                spread=self.balancer if self.balancer.enabled else None,
            )
            self.balancer.add(activator)
            self.metrics.watch(name, activator.election)
            self.membership.subscribe(activator.on_cluster_change, settings.key_prefix)
            self.activators[name] = activator
        self.balancer.attach(gossip, self.membership.heartbeat_interval)
        for activator in self.activators.values():
            activator.start()
        self.balancer.start()
        self._add_report_readers()
        # Each restart of the consumer is a lost broker connection (it drops what the pool
        # has not started): the pump says a broker loss only when there was one.
        self.pump.watch.consumer_restarts = lambda: getattr(worker.consumer, "restart_count", None)
        self.pump.watch.consumer_connected = lambda: worker.consumer.connection is not None
        self.pump.start(warm_up=self._warm_main_process)
        signals.worker_shutting_down.connect(self._on_shutting_down, weak=False)
        logger.info(
            "celery-stoker: %d activator(s) on %s: %s",
            len(self.activators),
            self.hostname,
            ", ".join(sorted(self.activators)),
        )
        if self.delivery.local:
            logger.info("celery-stoker: events go straight to this worker's consumer")
        else:
            logger.info(
                "celery-stoker: events go through the broker to queue %s (the %s pool has "
                "no event loop to hand them to)",
                self.queue_name,
                pool_name(worker),
            )

    def _client(self, url: str, socket_timeout: float, settings: StokerSettings) -> redis.Redis:
        """One client per URL and timeout, shared by every activator, its pool capped."""
        key = (url, socket_timeout)
        client = self.clients.get(key)
        if client is None:
            client = self.clients[key] = redis_client(
                url,
                transport_options=settings.transport_options,
                socket_timeout=socket_timeout,
                max_connections=MAX_SHARED_CONNECTIONS,
            )
        return client

    def _add_report_readers(self) -> None:
        """One BLPOP reader per Redis, over the report list of each key prefix."""
        by_url: dict[str, tuple[StokerSettings, set[str]]] = {}
        for settings in self.settings.values():
            _, keys = by_url.setdefault(settings.url, (settings, set()))
            keys.add(reports_key(settings.key_prefix, self.hostname))
        for url, (settings, keys) in by_url.items():

            def factory(url: str = url, settings: StokerSettings = settings) -> redis.Redis:
                # BLPOP blocks a second; its socket must wait longer than that.
                return redis_client(
                    url,
                    transport_options=settings.transport_options,
                    socket_timeout=settings.socket_timeout + 2.0,
                )

            self.pump.watch.add_reports(factory, keys)

    def _warm_pool_process(self, **kwargs: Any) -> None:
        """``worker_process_init``: a new pool process gets ready for its first event."""
        self.metrics.close_in_child()
        warm_process(self.app)

    def _warm_main_process(self) -> None:
        """On the pump's thread at start: what the first event of a term would pay.

        A producer connection from the app's pool and the declaration of this
        worker's event queue (the broker path), one task message built and
        thrown away (the local path), and, for pools that run tasks in this
        process, what a pool process pays in ``worker_process_init``.
        """
        try:
            with self.app.producer_or_acquire() as producer:
                producer.maybe_declare(self.app.amqp.queues[self.queue_name])
        except Exception as exc:
            logger.debug("celery-stoker: producer not warmed up (%s)", exc)
        try:
            self.delivery.warm_up()
        except Exception as exc:
            logger.debug("celery-stoker: event delivery not warmed up (%s)", exc)
        warm_process(self.app)

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

            prefix = settings.key_prefix
            listener = LeaseListener(
                client_factory,
                lease_channel(prefix),
                thread_name=f"stoker-lease-listener:{prefix}",
                health_interval=max(1.0, settings.lease_ttl),
                # Its subscription says this worker is alive: dead waiters are dropped.
                presence=(worker_channel(prefix, self.hostname),),
                # A Redis Cluster: sharded pub/sub, one channel per Stoker, in its slot.
                shard_channel=(
                    (lambda name: stoker_channel(prefix, name))
                    if is_cluster(settings.transport_options)
                    else None
                ),
            )
            listener.start()
            self.listeners[key] = listener
        return listener

    def _on_shutting_down(self, sender: Any = None, **kwargs: Any) -> None:
        """Runs inside Celery's signal handler: start stepping down, block on nothing here.

        With OS threads, a thread does it (a lock taken inside a signal handler may be
        held by the very code it interrupted).  Under gevent or eventlet, threads are
        green and the handler runs in the event loop, where neither starting a thread
        nor switching is allowed: the loop is asked to run it next instead.
        """
        if sender is not None and str(sender) != self.hostname:
            return
        # First, right here: no election takes a lease from now on (a plain flag), so
        # a release by another stopping worker cannot hand this one a term.
        for activator in list(self.activators.values()):
            activator.begin_stopping()
        self.balancer.begin_stopping()
        if green_spawn(self._request_stops):
            return
        threading.Thread(
            target=self._request_stops, name="stoker-stop-request", daemon=True
        ).start()

    def _request_stops(self) -> None:
        for activator in self.activators.values():
            activator.request_stop("worker_stopping")

    def stop(self, worker: Any) -> None:
        """Step every activator down (releasing held leases), then stop the rest.

        Waits ``stoker_stop_timeout`` at most, for all activators together.
        """
        if self._stopped.is_set():
            return
        self._stopped.set()
        signals.worker_shutting_down.disconnect(self._on_shutting_down)
        self.balancer.stop()  # first: no move starts while the Stokers step down
        self._request_stops()
        timeout = max((s.stop_timeout for s in self.settings.values()), default=0.0)
        deadline = time.monotonic() + timeout
        stuck = [
            name
            for name, activator in self.activators.items()
            if not activator.stop(deadline - time.monotonic())
        ]
        if stuck:
            logger.error(
                "celery-stoker: %s still stepping down after %.0f s (stoker_stop_timeout): a "
                "shutdown() or leader_stopping() that does not return; the worker exits "
                "without waiting, and its lease expires within one TTL",
                ", ".join(sorted(stuck)),
                timeout,
            )
        if self.activators:
            leave_draining_set(self.hostname, self.settings)
        self.pump.stop()
        copies.close()
        for listener in self.listeners.values():
            listener.stop()
        self.emitter.stop()
        self.metrics.stop()  # last: a scrape during shutdown still sees the step-down

    def shutdown(self, worker: Any) -> None:
        self.stop(worker)

    def terminate(self, worker: Any) -> None:
        self.stop(worker)

    def snapshot(self) -> dict[str, Any]:
        """Every activator's fields, for ``celery inspect stoker``."""
        return {
            "hostname": self.hostname,
            "version": __version__,
            "app": self.membership.scope.app,
            "members": sorted(self.membership.members()),
            "membership_source": self.membership.source,
            "activators": {name: a.snapshot() for name, a in self.activators.items()},
            "balance": self.balancer.snapshot(),
        }


from . import control as _control  # noqa: E402,F401  (registers `celery inspect stoker`)
