"""Running a Stoker callback on the leader: the internal task, fenced by its token.

Each event (``now_leader``, ``cluster_change``, ``timer``) is sent by the
leader's activator as the task :data:`DISPATCH_TASK` to a queue only that
worker consumes, so it runs in the worker's pool like any task.  The task
checks that its token is still the lease's, loads the stored state (or calls
``init()``), calls ``event``, writes the new state back under the same token,
asks ``next_timer_in`` and reports the outcome on a Redis list the activator
waits on.  That report is what keeps one Stoker's events one at a time and in
order: the activator sends the next event only when the last one reported.

``shutdown`` does not travel through the broker: a stepping-down leader runs
it itself (:func:`run_event` in the worker's main process) before it releases
the lease, because by then the pool may be draining or the broker unreachable.

Anyone who can publish to the broker can send a ``celery_stoker.dispatch``
message, with a term's real token (it is no secret: events and ``inspect``
show it).  So the token is not what lets a callback run: the dispatch
request (:class:`EventRequest`) asks the worker's pump, in the worker's main
process and before the pool gets the request, whether this is the very
message it has in flight (:meth:`~celery_stoker.watch.EventWatch.admit`), and the task in the pool
runs only a request that was admitted so (:data:`PERMIT_FIELD`).
"""

from __future__ import annotations

import logging
import math
import mmap
import os
import secrets
import threading
import time
import traceback
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import redis
from celery.exceptions import SoftTimeLimitExceeded, TimeLimitExceeded
from celery.worker import state as worker_state
from celery.worker.request import Request

from . import scripts
from .connection import redis_client
from .copies import StateCopy, copies
from .keys import reports_key
from .outcome import DISPATCH_TASK, Outcome
from .registry import StokerSpec, registry_of
from .settings import StokerSettings, load_settings
from .stoker import Stoker, StokerContext
from .store import Commit, StateError, StokerStore, StoredState, decode_state
from .watch import watch_of

if TYPE_CHECKING:
    from celery import Celery

logger = logging.getLogger("celery_stoker.dispatch")

#: How long an unconsumed event message may wait before Celery drops it; by then
#: its term is long over and it would only be skipped.
EVENT_MESSAGE_EXPIRES = 3600
#: The token a process's warm-up checks: no term ever has it (tokens are > 0).
WARM_UP_TOKEN = 0
#: How long a report stays in Redis if its pump never reads it.
REPORTS_KEY_TTL_MS = 3_600_000
#: Tries to push a report before leaving it to the pump to notice the finished task.
REPORT_ATTEMPTS = 3
#: The request field the pump's gate sets on an admitted event, and its value: a
#: secret of this worker's processes (pool processes are forked from the main one,
#: and requests reach them over the pool's pipe), never sent through the broker.
PERMIT_FIELD = "stoker_permit"
PERMIT = secrets.token_hex(16)


class _WorkerFlags:
    """Stoker names flagged across a worker's processes, for "said once per worker".

    A page shared (``MAP_SHARED``) with the pool processes forked after this
    module is imported (the worker's main process imports it before its pool
    starts): a flag a pool process sets is seen by its siblings and by the
    processes that replace it (``--max-tasks-per-child``).  Names share 4096
    slots: two Stokers that collide only share when they are said.
    """

    SIZE = 4096

    def __init__(self) -> None:
        self._page = mmap.mmap(-1, self.SIZE)

    def _slot(self, name: str) -> int:
        return zlib.crc32(name.encode("utf-8", "surrogatepass")) % self.SIZE

    def __contains__(self, name: str) -> bool:
        return self._page[self._slot(name)] != 0

    def add(self, name: str) -> None:
        self._page[self._slot(name)] = 1

    def discard(self, name: str) -> None:
        self._page[self._slot(name)] = 0


#: The Stokers whose last commit missed ``stoker_min_replicas`` on this worker (any of
#: its processes: with prefork each event may run in another one).
_UNREPLICATED = _WorkerFlags()
#: The Stokers whose last report this worker could not push (logged once per outage).
_REPORT_REFUSED = _WorkerFlags()
#: Said once per process: dispatch messages refused where no pump runs, or in the pool.
_SAID: set[str] = set()


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


def check_timer(name: str, value: Any) -> float | None:
    """Validate what ``next_timer_in`` returned; raises ValueError naming the Stoker."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(
            f"Stoker {name!r}: next_timer_in returned {value!r} ({type(value).__name__}); "
            "return a number of seconds >= 0, or None for no timer"
        )
    seconds = float(value)
    if math.isnan(seconds) or math.isinf(seconds) or seconds < 0:
        raise ValueError(
            f"Stoker {name!r}: next_timer_in returned {value!r}; return a finite number of "
            "seconds >= 0, or None for no timer"
        )
    return seconds


@dataclass(frozen=True)
class EventCall:
    """One event to run: which term, which callback, and what to start from.

    ``cached`` (the worker's copy of the last committed state, ``copies.py``)
    is used when Redis cannot be read, or first of all with ``prefer_cached``: a
    leader that lost its lease must tell its Stoker to stop before the lease can
    expire, without waiting on a Redis it may not reach (with no copy, it starts
    from ``init()``).  ``check_current=False`` runs it even when the term is
    over (``shutdown``); its commit is still fenced.  ``stale`` tells the Stoker
    (``context.stale``) that a newer term has replaced this one.  ``history_lost``
    tells it (``context.history_lost``) that its term found Redis behind the
    fleet; an event checked against the lease also learns it from the lease.
    """

    seq: int
    token: int
    event: str
    reason: Any
    hostname: str
    members: frozenset[str]
    check_current: bool = True
    cached: StateCopy | None = None
    prefer_cached: bool = False
    stale: bool = False
    history_lost: bool = False


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


class StateStore(Protocol):
    """Where :func:`run_callbacks` reads and commits a state (Redis, or a test's memory)."""

    serializer: str
    #: Set by ``term_accepts_events``: the term found Redis behind the fleet (or None).
    history_lost: tuple[int, int] | None

    def term_accepts_events(self, token: int) -> bool: ...
    def load(self) -> StoredState: ...
    def encode(self, value: Any) -> tuple[str, str, bytes | str]: ...
    def commit(
        self,
        token: int,
        encoded: tuple[str, str, bytes | str] | None,
        info: dict[str, Any],
        *,
        version: int | None = None,
    ) -> Commit: ...


def run_callbacks(
    store: StateStore,
    instance: Stoker,
    spec: StokerSpec,
    call: EventCall,
    *,
    reraise: bool = False,
    keep: Callable[[StateCopy], None] | None = None,
) -> Outcome:
    """Run one callback under ``token`` and commit its state if the token is still current.

    The one implementation of an event, for a worker's pool, its main process
    (``shutdown``) and :class:`celery_stoker.testing.StokerHarness`.  Never
    raises for the user's mistakes (unless ``reraise``, as the harness asks): a
    raising callback, garbage returned, or a state that cannot be stored is
    logged with the Stoker's name and traceback, the stored state is kept, and
    the outcome carries the error.  The commit names the state version the
    event started from, so an event that returns after a newer one committed
    cannot overwrite it.  ``call`` says which event, of which term, from what;
    ``keep`` is given the committed state.
    """
    seq, token, event, reason = call.seq, call.token, call.event, call.reason
    cached = call.cached
    started = time.monotonic()
    outcome = Outcome(seq=seq, token=token, ran=False, name=spec.name)
    if call.check_current and not store.term_accepts_events(token):
        logger.info(
            "Stoker %s: skipped %s event of term %d: that term is over or ending",
            spec.name,
            event,
            token,
        )
        return outcome

    instance.context = StokerContext(
        spec.name,
        call.hostname,
        token,
        frozenset(call.members),
        stale=call.stale,
        history_lost=call.history_lost or (call.check_current and bool(store.history_lost)),
    )
    outcome.ran = True
    errors: list[str] = []
    state: Any = None
    version: int | None = None
    have_state = from_init = False
    try:
        if call.prefer_cached:
            # A lost term: ask Redis nothing (it may be the thing that is gone).  With no
            # copy (the term's first report never came back) the Stoker starts from
            # init(); the commit is fenced like any other.
            if cached is not None:
                version = cached.version
                state, have_state = _decode_copy(store, spec, cached), True
        else:
            stored = store.load()
            version = stored.version
            if stored.found:
                state, have_state = stored.value, True
    except StateError as exc:
        if reraise:
            raise
        # Said once, by the leader's main process (Activator), not here: every retry
        # of the event comes back to this line, in whichever pool process runs it.
        logger.debug("%s", exc)
        errors.append(str(exc))
        outcome.ran, outcome.unreadable = False, True
        have_state = True  # nothing to start from, and init() must not replace it
        state = _UNREADABLE
    except redis.RedisError:
        if cached is None:
            raise
        version = cached.version
        try:
            state, have_state = _decode_copy(store, spec, cached), True
        except StateError as exc:
            if reraise:
                raise
            logger.debug("%s", exc)
            errors.append(str(exc))
            outcome.ran, outcome.unreadable = False, True
            have_state, state = True, _UNREADABLE
    if not have_state:
        state, have_state = _call(spec, "init", errors, reraise, instance.init)
        from_init = have_state
        outcome.init_failed = not have_state
    if state is _UNREADABLE:
        have_state = False

    new_state = state
    encoded = None
    if have_state:
        new_state, ok = _call(spec, "event", errors, reraise, instance.event, state, event, reason)
        if not ok:
            new_state = state
        else:
            try:
                encoded = store.encode(new_state)
            except StateError as exc:
                if reraise:
                    raise
                logger.error("%s; the previous state is kept", exc)
                errors.append(str(exc))
                new_state = state
        if encoded is None and from_init:
            # event() failed, but init() gave a state worth keeping.
            try:
                encoded = store.encode(state)
            except StateError as exc:
                if reraise:
                    raise
                logger.error("%s", exc)
                errors.append(str(exc))

        timer, ok = _call(
            spec, "next_timer_in", errors, reraise, _next_timer, instance, spec.name, new_state
        )
        outcome.next_timer = timer if ok else None
        outcome.timer_error = not ok
    else:
        outcome.timer_error = True

    outcome.error = errors[-1] if errors else None
    outcome.kind = "error" if errors else "ok"
    info = {"last_event": event, "last_event_at": time.time(), "last_event_token": token}
    info["last_error"] = outcome.error
    try:
        result = store.commit(token, encoded, info, version=version)
    except redis.RedisError as exc:
        result = None
        outcome.kind = "error"
        outcome.error = outcome.error or f"state not stored: Redis refused the write ({exc})"
        logger.warning(
            "Stoker %s: the state after %s was not stored: Redis refused the write (%s: %s)",
            spec.name,
            event,
            exc.__class__.__name__,
            exc,
        )
    if result is Commit.STORED:
        if spec.name in _UNREPLICATED:
            _UNREPLICATED.discard(spec.name)
            logger.info("Stoker %s: commits are replicated again", spec.name)
        outcome.committed = True
        if encoded is not None and keep is not None:
            content_type, encoding, body = encoded
            raw = body.encode() if isinstance(body, str) else body
            keep(StateCopy(content_type, encoding, raw, (version or 0) + 1, seq))
    elif result is Commit.UNREPLICATED:
        short = (
            f"only {getattr(store, 'replicas_acked', 0)} of the "
            f"{getattr(store, 'min_replicas', '?')} replicas stoker_min_replicas asks for "
            "confirmed it in time"
        )
        outcome.kind = "error"
        outcome.error = outcome.error or f"state not counted as stored: {short}"
        # Once per outage on this worker (every event fails so until replicas catch up).
        log = logger.debug if spec.name in _UNREPLICATED else logger.warning
        _UNREPLICATED.add(spec.name)
        log(
            "Stoker %s: the state after %s (term %d) does not count as stored: %s (the "
            "primary has it; a failover could lose it); the event counts as failed. Said "
            "once until a commit is replicated again; check INFO replication, or lower "
            "stoker_min_replicas",
            spec.name,
            event,
            token,
            short,
        )
    elif result is Commit.STALE_STATE:
        outcome.stale = True
        logger.warning(
            "Stoker %s: the state after %s (term %d) was not stored: a newer state was "
            "stored while it ran",
            spec.name,
            event,
            token,
        )
    elif result is Commit.STALE_TERM and call.check_current:
        logger.warning(
            "Stoker %s: the state after %s was not stored: term %d ended while the callback ran",
            spec.name,
            event,
            token,
        )
    outcome.runtime = time.monotonic() - started
    return outcome


#: Stands for a stored state that could not be decoded: no callback runs on it.
_UNREADABLE = object()


def _decode_copy(store: StateStore, spec: StokerSpec, cached: StateCopy) -> Any:
    """The worker's copy of the state, decoded as the stored one would be."""
    where = f"{getattr(store, 'state_key', 'its state key')}, as this worker copied it"
    return decode_state(spec.name, store.serializer, cached.encoded, where=where)


def _next_timer(instance: Stoker, name: str, state: Any) -> float | None:
    method = getattr(instance, "next_timer_in", None)
    return check_timer(name, method(state) if method is not None else None)


def _call(
    spec: StokerSpec, what: str, errors: list[str], reraise: bool, fn: Any, *args: Any
) -> tuple[Any, bool]:
    """Call one user callback; log and record instead of raising (unless ``reraise``)."""
    try:
        return fn(*args), True
    except Exception as exc:
        if reraise:
            raise
        logger.error(
            "Stoker %s: %s() raised %s: %s; the stored state is kept",
            spec.name,
            what,
            exc.__class__.__name__,
            exc,
            exc_info=True,
        )
        errors.append(
            f"{what}() raised {exc.__class__.__name__}: {exc}\n"
            + "".join(traceback.format_exception(exc)[-3:])
        )
        return None, False


def report(client: redis.Redis, key: str, outcome: Outcome) -> None:
    """Tell the leader's pump this event is finished (it waits on ``key`` with BLPOP)."""
    pipe = client.pipeline(transaction=False)
    pipe.lpush(key, outcome.to_json())
    pipe.pexpire(key, REPORTS_KEY_TTL_MS)
    pipe.execute()


class EventRequest(Request):
    """The dispatch task's request: the gate before the pool, and what Celery saw of an event.

    Before a request goes to the pool, Celery asks it :meth:`revoked`; that
    is where this request asks the worker's pump whether it is the event the
    pump has in flight (see the module docstring).  A refused request never
    reaches the pool: it is acknowledged (so the broker does not deliver it
    again), leaves Celery's tables, and the event in flight, if one runs
    under the same id, keeps its place in them.

    Celery calls the hooks below in the worker's main process (for every
    pool), so the pump hears at once when the pool process running a
    callback was lost (``WorkerLostError``: a crash, an OOM kill,
    ``os._exit``) or a hard time limit ended it, instead of waiting for a
    report that will never come.
    """

    _stoker_refused = False

    def revoked(self) -> bool:
        """The pump's check, then Celery's own (revoked, expired): may this event run now?

        The pump judges first: Celery's bookkeeping of a message it discards
        (expired, say) goes by task id, and would take the entry of the running
        event out of its table of requests if the message is a copy of it; the
        pump's watchdog would then count that event as over while it runs, and
        send the next one beside it.  A message whose id Celery has revoked (the
        pump's own :func:`~celery_stoker.watch._revoke_locally`, or ``revoke``) is
        Celery's to discard, quietly: a broker's redelivery of a dropped event.
        """
        if self._stoker_refused:
            return True
        if self._already_revoked or self.id in worker_state.revoked:
            return bool(super().revoked())
        if not _admitted(self):
            self._stoker_refused = True
            _forget(self)
            return True
        if super().revoked():
            return True
        self._request_dict[PERMIT_FIELD] = PERMIT
        return False

    def on_accepted(self, pid: int, time_accepted: float) -> None:
        super().on_accepted(pid, time_accepted)
        _tell_pump(self, "accepted", None)

    def on_timeout(self, soft: bool, timeout: float) -> None:
        super().on_timeout(soft, timeout)
        if not soft:
            _tell_pump(self, "timeout", f"hard time limit ({timeout:g} s) exceeded")

    def on_failure(
        self, exc_info: Any, send_failed_event: bool = True, return_ok: bool = False
    ) -> Any:
        try:
            return super().on_failure(exc_info, send_failed_event, return_ok)
        finally:
            exc = getattr(exc_info, "exception", None)
            exc = getattr(exc, "exc", exc)  # ExceptionWithTraceback
            what = "timeout" if isinstance(exc, TimeLimitExceeded) else "lost"
            _tell_pump(self, what, f"{exc.__class__.__name__}: {exc}")


def _admitted(request: Request) -> bool:
    """True if this worker's pump admits ``request`` as its event in flight; never raises."""
    try:
        source = _Source(request)
        watch = watch_of(request.hostname)
        if watch is None:
            _say_once(
                "no-pump",
                "celery-stoker: refused a dispatch message (task %s) that came %s: this "
                "worker runs no Stoker pump (is StokerStep added to app.steps['worker']?), "
                "so no event of it may run here",
                request.id,
                source,
            )
            return False
        return watch.admit(request.id, request.args, request, source) is None
    except Exception:  # a hook of Celery's must not fail the worker; refuse
        logger.exception("celery-stoker: could not judge dispatch message %s", request.id)
        return False


class _Source:
    """Where a dispatch message says it came from, for a refusal's log line.

    Formatted only when a line is written (``%s``): the admitted events, nearly
    all of them, pay nothing for it.  Both values are what the message says of
    itself: information for a person, never a reason to trust it.
    """

    def __init__(self, request: Request) -> None:
        self._request = request

    def __str__(self) -> str:
        info = self._request.delivery_info or {}
        origin = self._request._request_dict.get("origin")
        return (
            f"through routing key {str(info.get('routing_key'))[:100]!r}, "
            f"sent by {str(origin)[:100]!r} (as the message says)"
        )


def _forget(request: Request) -> None:
    """Take a refused request out of Celery's tables and acknowledge its message.

    A copy of the event in flight has its id: the request that runs the event
    keeps the table's entry, which the pump's watchdog reads.
    """
    from celery.worker import state

    if state.requests.get(request.id) is request:
        del state.requests[request.id]
        for other in (*state.active_requests, *state.reserved_requests):
            if other is not request and other.id == request.id:
                state.requests[request.id] = other
                break
    for table in (state.active_requests, state.reserved_requests, state.scheduled_requests):
        table.discard(request)
    request.acknowledge()


def _say_once(key: str, message: str, *args: Any) -> None:
    """Log ``message`` at WARNING the first time ``key`` is said in this process, then at DEBUG."""
    log = logger.debug if key in _SAID else logger.warning
    _SAID.add(key)
    log(message, *args)


def _tell_pump(request: Request, what: str, cause: str | None) -> None:
    """Pass what Celery saw of a dispatch request to this worker's pump; never raises."""
    try:
        watch = watch_of(request.hostname)
        if watch is None:
            return
        name, token, seq = request.args[0], int(request.args[1]), int(request.args[2])
        watch.celery_saw(name, token, seq, what, cause, request.id, request.worker_pid)
    except Exception:  # a hook of Celery's must not fail the worker
        logger.exception("celery-stoker: could not pass %s of %s to the pump", what, request.id)


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
            _say_once(
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
            # Report, so the pump sends the next event.  Briefly retried; if Redis keeps
            # refusing (full, down), the pump notices the finished request without a
            # report and carries on, so no pool slot is held for long here.
            key = reports_key(settings.key_prefix, hostname)
            for attempt in range(REPORT_ATTEMPTS):
                try:
                    report(resources.client(settings), key, outcome)
                    _REPORT_REFUSED.discard(name)
                    break
                except redis.RedisError as exc:
                    if attempt + 1 == REPORT_ATTEMPTS:
                        # Once per outage on this worker: every event of it fails so.
                        log = logger.debug if name in _REPORT_REFUSED else logger.warning
                        _REPORT_REFUSED.add(name)
                        log(
                            "Stoker %s: could not report the end of %s: Redis refused (%s); "
                            "said once until a report goes through",
                            name,
                            event,
                            exc,
                        )
                    else:
                        time.sleep(0.05)
