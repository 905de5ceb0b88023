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
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
import traceback
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import redis

from .connection import redis_client
from .settings import StokerSettings, load_settings
from .stoker import Stoker, StokerContext, StokerSpec
from .store import StateError, StokerStore, done_key, from_portable, portable

if TYPE_CHECKING:
    from celery import Celery

logger = logging.getLogger("celery_stoker.dispatch")

DISPATCH_TASK = "celery_stoker.dispatch"
#: How long an unconsumed event message may wait before Celery drops it; by then
#: its term is long over and it would only be skipped.
EVENT_MESSAGE_EXPIRES = 3600
#: How long a report stays in Redis if its activator never reads it.
DONE_KEY_TTL_MS = 3_600_000


@dataclass
class Outcome:
    """What running one event did; sent back to the activator as JSON."""

    seq: int
    token: int
    ran: bool
    committed: bool = False
    next_timer: float | None = None
    timer_error: bool = False
    error: str | None = None
    #: The committed state, serialized (base64 of the body) with its content type
    #: and encoding, so the activator can hand ``shutdown`` the last state even
    #: when Redis is the thing that is gone.
    state: tuple[str, str, str] | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, raw: bytes | str) -> Outcome | None:
        """Parse a report; None for anything that is not one."""
        try:
            data = json.loads(raw)
            fields = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
            if fields.get("state") is not None:
                fields["state"] = tuple(fields["state"])
            return cls(**fields)
        except (ValueError, TypeError, KeyError):
            return None


class _ProcessResources:
    """Per-process Redis clients and Stoker instances (a pool child makes its own)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._clients: dict[tuple[str, float], redis.Redis] = {}
        self._instances: dict[tuple[int, str], Stoker] = {}
        self._settings: dict[tuple[int, str], StokerSettings] = {}

    def _check_fork(self) -> None:
        if os.getpid() != self._pid:
            self._pid = os.getpid()
            self._clients.clear()
            self._instances.clear()

    def client(self, settings: StokerSettings) -> redis.Redis:
        key = (settings.url, settings.socket_timeout)
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


def run_event(
    app: Celery,
    spec: StokerSpec,
    *,
    seq: int,
    token: int,
    event: str,
    reason: Any,
    hostname: str,
    members: frozenset[str],
    check_current: bool = True,
    cached_state: tuple[str, str, str] | None = None,
    prefer_cached: bool = False,
    client: redis.Redis | None = None,
) -> Outcome:
    """Run one callback under ``token`` and commit its state if the token is still current.

    Never raises for the user's mistakes: a raising callback, garbage returned, or
    a state that cannot be stored is logged with the Stoker's name and
    traceback, the stored state is kept, and the outcome carries the error.

    ``cached_state`` (an earlier :attr:`Outcome.state`) is used when Redis cannot
    be read, or first of all with ``prefer_cached``: a leader that lost its lease
    must tell its Stoker to stop before the lease can expire, without waiting
    on a Redis it may not reach (with no copy, it starts from ``init()``).
    ``client`` replaces the process's shared client (the activator's own has a
    short timeout).
    """
    settings = resources.settings(app, spec)
    client = client or resources.client(settings)
    store = StokerStore(
        client, spec.name, key_prefix=settings.key_prefix, serializer=settings.state_serializer
    )
    outcome = Outcome(seq=seq, token=token, ran=False)
    if check_current and not store.term_accepts_events(token):
        logger.info(
            "Stoker %s: skipped %s event of term %d: that term is over or ending",
            spec.name,
            event,
            token,
        )
        return outcome

    instance = resources.instance(app, spec)
    instance.context = StokerContext(spec.name, hostname, token, frozenset(members))
    outcome.ran = True
    errors: list[str] = []
    state: Any = None
    have_state = from_init = False
    try:
        if prefer_cached:
            if cached_state is not None:
                state, have_state = from_portable(cached_state, settings.state_serializer), True
            else:
                state, have_state = _call(spec, "init", errors, instance.init)
            stored = None
        else:
            stored = store.load()
        if stored is None:
            pass
        elif stored.found:
            state, have_state = stored.value, True
        else:
            state, have_state = _call(spec, "init", errors, instance.init)
            from_init = have_state
    except StateError as exc:
        logger.error("%s; the stored state is left as it is", exc)
        errors.append(str(exc))
    except redis.RedisError:
        if cached_state is None:
            raise
        state, have_state = from_portable(cached_state, settings.state_serializer), True

    new_state = state
    encoded = None
    if have_state:
        new_state, ok = _call(spec, "event", errors, instance.event, state, event, reason)
        if not ok:
            new_state = state
        else:
            try:
                encoded = store.encode(new_state)
            except StateError as exc:
                logger.error("%s; the previous state is kept", exc)
                errors.append(str(exc))
                new_state = state
        if encoded is None and from_init:
            # event() failed, but init() gave a state worth keeping.
            try:
                encoded = store.encode(state)
            except StateError as exc:
                logger.error("%s", exc)
                errors.append(str(exc))

    if have_state:
        timer, ok = _call(
            spec, "next_timer_in", errors, _next_timer, instance, spec.name, new_state
        )
        outcome.next_timer = timer if ok else None
        outcome.timer_error = not ok
    else:
        outcome.timer_error = True

    outcome.error = errors[-1] if errors else None
    info = {"last_event": event, "last_event_at": time.time(), "last_event_token": token}
    info["last_error"] = outcome.error
    try:
        outcome.committed = store.commit(token, encoded, info)
        if outcome.committed and encoded is not None:
            outcome.state = portable(*encoded)
    except redis.RedisError as exc:
        logger.warning("Stoker %s: could not store the state after %s (%s)", spec.name, event, exc)
    if not outcome.committed and check_current:
        logger.warning(
            "Stoker %s: the state after %s was not stored: term %d ended while the callback ran",
            spec.name,
            event,
            token,
        )
    return outcome


def _next_timer(instance: Stoker, name: str, state: Any) -> float | None:
    method = getattr(instance, "next_timer_in", None)
    return check_timer(name, method(state) if method is not None else None)


def _call(spec: StokerSpec, what: str, errors: list[str], fn: Any, *args: Any) -> tuple[Any, bool]:
    """Call one user callback; log and record instead of raising."""
    try:
        return fn(*args), True
    except Exception as exc:
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
    """Tell the activator this event is finished (it waits on ``key`` with BLPOP)."""
    pipe = client.pipeline(transaction=False)
    pipe.lpush(key, outcome.to_json())
    pipe.pexpire(key, DONE_KEY_TTL_MS)
    pipe.execute()


def register_dispatch_task(app: Celery) -> None:
    """Register :data:`DISPATCH_TASK` on ``app`` (once; the registry calls this)."""
    if DISPATCH_TASK in app.tasks:
        return

    @app.task(name=DISPATCH_TASK, bind=True, ignore_result=True, acks_late=False)
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
        from .stoker import registry_of

        spec = registry_of(task.app).get(name)
        if spec is None:
            logger.error(
                "Stoker %r is not registered in this worker process: is the module that "
                "defines it imported by the app?",
                name,
            )
            return
        settings = resources.settings(task.app, spec)
        outcome = Outcome(seq=seq, token=token, ran=False, timer_error=True)
        try:
            outcome = run_event(
                task.app,
                spec,
                seq=seq,
                token=token,
                event=event,
                reason=reason,
                hostname=hostname,
                members=frozenset(members),
            )
        except redis.RedisError as exc:
            outcome.error = f"Redis unreachable while running {event}: {exc}"
            logger.warning("Stoker %s: %s", name, outcome.error)
        finally:
            # Always report, so the activator sends the next event: retry briefly
            # through a Redis blip (this holds one pool slot for at most that long).
            key = done_key(settings.key_prefix, name, hostname)
            deadline = time.monotonic() + 2 * settings.lease_ttl
            while True:
                try:
                    report(resources.client(settings), key, outcome)
                    break
                except redis.RedisError as exc:
                    if time.monotonic() > deadline:
                        logger.warning(
                            "Stoker %s: could not report the end of %s (%s)", name, event, exc
                        )
                        break
                    time.sleep(0.1)
