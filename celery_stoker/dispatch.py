"""Running a Stoker callback on the leader: the internal task, fenced by its token.

Each event (``now_leader``, ``cluster_change``, ``timer``) is sent by the
leader's pump as the task :data:`~celery_stoker.outcome.DISPATCH_TASK` to a
queue only that worker consumes, so it runs in the worker's pool like any
task.  Its request class (``gate.py``) lets it reach the pool only if it is
the event the pump has in flight.  The task runs the event's callbacks
(:func:`run_event`, ``callbacks.py``: the term check with the state read,
``init()`` or ``event``, the commit under the same token, ``next_timer_in``)
and reports the outcome on the worker's report list (``reports.py``).  That
report is what keeps one Stoker's events one at a time and in order: the pump
sends the next event only when the last one is over.

``shutdown`` does not travel through the broker: a stepping-down leader runs
it itself (:func:`run_event` in the worker's main process) before it releases
the lease, because by then the pool may be draining or the broker unreachable.

Every process keeps its own Redis clients, Stoker instances and settings
(:data:`resources`), and pays at start what a term's first event would
(:func:`warm_process`).
"""

from __future__ import annotations

import logging
import os
import threading
from typing import TYPE_CHECKING, Any

import redis
from celery.exceptions import SoftTimeLimitExceeded

from . import scripts
from .callbacks import EventCall, run_callbacks
from .connection import redis_client
from .copies import StateCopy, copies
from .gate import PERMIT, PERMIT_FIELD, EventRequest, say_once
from .keys import reports_key
from .outcome import DISPATCH_TASK, Outcome
from .registry import StokerSpec, registry_of
from .reports import push_report
from .settings import StokerSettings, load_settings
from .stoker import Stoker
from .store import StokerStore

if TYPE_CHECKING:
    from celery import Celery

logger = logging.getLogger("celery_stoker.dispatch")

#: How long an unconsumed event message may wait before Celery drops it; by then
#: its term is long over and it would only be skipped.
EVENT_MESSAGE_EXPIRES = 3600
#: The token a process's warm-up checks: no term ever has it (tokens are > 0).
WARM_UP_TOKEN = 0


class _ProcessResources:
    """Per-process Redis clients and Stoker instances (a pool child makes its own)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._clients: dict[str, redis.Redis] = {}
        self._instances: dict[tuple[int, str], Stoker] = {}
        self._settings: dict[tuple[int, str], StokerSettings] = {}
        # A pool process is forked while the main process's threads run (the pump
        # warms this very object up): a lock held at that moment would be held for
        # ever in the child, whose worker_process_init then never returns and whose
        # exit the worker's warm shutdown waits for.  The child starts afresh.
        os.register_at_fork(after_in_child=self._after_fork)

    def _after_fork(self) -> None:
        self._lock = threading.Lock()
        self._check_fork()

    def _check_fork(self) -> None:
        if os.getpid() != self._pid:
            self._pid = os.getpid()
            self._clients.clear()
            self._instances.clear()

    def client(self, settings: StokerSettings) -> redis.Redis:
        """This process's one client for ``settings.url`` (every Stoker on it shares it)."""
        key = settings.url
        with self._lock:
            self._check_fork()
            client = self._clients.get(key)
            if client is None:
                client = redis_client(
                    settings.url,
                    transport_options=settings.transport_options,
                    socket_timeout=max(2.0, settings.socket_timeout),
                )
                self._clients[key] = client
            return client

    def instance(self, app: Celery, spec: StokerSpec) -> Stoker:
        key = (id(app), spec.name)
        with self._lock:
            self._check_fork()
            instance = self._instances.get(key)
            if instance is None:
                instance = spec.instantiate()
                self._instances[key] = instance
            return instance

    def settings(self, app: Celery, spec: StokerSpec) -> StokerSettings:
        key = (id(app), spec.name)
        with self._lock:
            found = self._settings.get(key)
            if found is None:
                found = self._settings[key] = load_settings(app.conf, spec.options)
            return found


resources = _ProcessResources()


def warm_process(app: Celery) -> None:
    """Pay now what the first event of a term would: settings, instances, a Redis client, the path.

    Called in every pool process as it starts (``worker_process_init``) and in
    the worker's main process, so a follower that becomes leader runs its
    first event as fast as any other.  Beyond the client and the script, the
    warm-up runs an event's first steps once per Redis: the term check (for a
    token no term has, so it answers "no") and the state read.  Until a
    process has run them, that code is cold: a pool process forked at start
    and idle since then pays for it on its first event, about 1.5 ms on a
    busy 2-CPU machine, at the very moment of a failover.  Read-only; never
    raises: a Redis that is not up yet is simply connected to later.
    """
    warmed: set[str] = set()
    for spec in list(registry_of(app).values()):
        try:
            settings = resources.settings(app, spec)
            resources.instance(app, spec)
            if settings.url in warmed:
                continue  # one Redis, one warm-up: the path is the same for every Stoker
            warmed.add(settings.url)
            client = resources.client(settings)
            client.script_load(scripts.COMMIT)
            store = StokerStore(
                client,
                spec.name,
                key_prefix=settings.key_prefix,
                serializer=settings.state_serializer,
            )
            store.term_accepts_events(WARM_UP_TOKEN)
            store.load()
        except Exception as exc:
            logger.debug("Stoker %s: not warmed up (%s)", spec.name, exc)


def run_event(
    app: Celery, spec: StokerSpec, call: EventCall, *, client: redis.Redis | None = None
) -> Outcome:
    """Run one callback of ``spec`` as a worker does: this process's instance, Redis, settings.

    See :func:`run_callbacks` for what happens; ``client`` replaces the
    process's shared client.  The state it commits is kept as this worker's
    copy (``copies.py``) before this returns, so before the event's report.
    """
    settings = resources.settings(app, spec)
    store = StokerStore(
        client or resources.client(settings),
        spec.name,
        key_prefix=settings.key_prefix,
        serializer=settings.state_serializer,
        min_replicas=settings.min_replicas,
        replica_timeout=settings.replica_timeout,
    )

    def keep(copy: StateCopy) -> None:
        copies.keep(call.hostname, spec.name, copy)

    return run_callbacks(store, resources.instance(app, spec), spec, call, keep=keep)


def register_dispatch_task(app: Celery) -> None:
    """Register :data:`DISPATCH_TASK` on ``app`` (once; the registry calls this)."""
    if DISPATCH_TASK in app.tasks:
        return

    @app.task(
        name=DISPATCH_TASK,
        bind=True,
        ignore_result=True,
        acks_late=False,
        Request=EventRequest,
    )
    def dispatch(
        task: Any,
        name: str,
        token: int,
        seq: int,
        event: str,
        reason: Any,
        members: list[str],
        hostname: str,
    ) -> None:
        if getattr(task.request, PERMIT_FIELD, None) != PERMIT:
            # Not a request this worker's gate admitted: a direct call, or a pool process
            # that was not forked from the worker's main process.  Nothing runs.
            say_once(
                "no-permit",
                "Stoker %s: refused to run %s (term %s) in the pool: it was not admitted "
                "by this worker's event pump; a callback runs only for the event the "
                "leader's pump has in flight",
                name,
                event,
                token,
            )
            return
        spec = registry_of(task.app).get(name)
        if spec is None:
            logger.error(
                "Stoker %r is not registered in this worker process: is the module that "
                "defines it imported by the app?",
                name,
            )
            return
        settings = resources.settings(task.app, spec)
        outcome = Outcome(seq=seq, token=token, ran=False, name=name, timer_error=True)
        try:
            outcome = run_event(
                task.app,
                spec,
                EventCall(seq, token, event, reason, hostname, frozenset(members)),
            )
        except redis.RedisError as exc:
            outcome.error = f"Redis unreachable while running {event}: {exc}"
            outcome.kind = "error"
            logger.warning("Stoker %s: %s", name, outcome.error)
        except SoftTimeLimitExceeded:
            # Raised outside the user's callbacks (while loading or storing): the state is
            # kept as it was; the pump hears of it like any other error.
            outcome.error = f"soft time limit exceeded while running {event}"
            outcome.kind = "error"
            logger.warning("Stoker %s: %s", name, outcome.error)
        except BaseException as exc:  # the pool is stopping this process (SIGTERM, exit)
            outcome.error = f"{event} interrupted: {exc.__class__.__name__}"
            outcome.kind = "error"
            outcome.ran = True
            raise
        finally:
            # Report, so the pump sends the next event (or its watchdog notices the end).
            key = reports_key(settings.key_prefix, hostname)
            push_report(resources.client(settings), key, outcome, event)
