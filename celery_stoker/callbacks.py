"""One event's callbacks, run as a worker runs them: load the state, call, commit under the token.

:func:`run_callbacks` is the one implementation of an event, for a worker's
pool (the dispatch task, ``dispatch.py``), its main process (``shutdown``)
and :class:`celery_stoker.testing.StokerHarness`.  It works on a
:class:`StateStore` (Redis, or a test's memory) and knows nothing of Celery:
the term check and the state read are one round trip, the commit names the
token and the state version the event started from, and a user's mistake
(a raising callback, garbage returned, a state that cannot be stored) is
logged with the Stoker's name and kept out of the stored state.
"""

from __future__ import annotations

import logging
import math
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import redis

from .copies import StateCopy
from .flags import WorkerFlags
from .outcome import Outcome
from .registry import StokerSpec
from .stoker import Stoker, StokerContext
from .store import Commit, StateError, StoredState, decode_state

# The dispatch task's logger: these lines were its own, and users filter by its name.
logger = logging.getLogger("celery_stoker.dispatch")

#: The Stokers whose last commit missed ``stoker_min_replicas`` on this worker (any of
#: its processes: with prefork each event may run in another one).
_UNREPLICATED = WorkerFlags()


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
        try:
            if call.prefer_cached:
                # A lost term: ask Redis nothing (it may be the thing that is gone).  With
                # no copy (the term's first report never came back) the Stoker starts from
                # init(); the commit is fenced like any other.
                if cached is not None:
                    version = cached.version
                    state, have_state = _decode_copy(store, spec, cached), True
            else:
                stored = store.load()
                version = stored.version
                if stored.found:
                    state, have_state = stored.value, True
        except redis.RedisError:
            if cached is None:
                raise
            version = cached.version  # Redis is out of reach: the worker's copy, if any
            state, have_state = _decode_copy(store, spec, cached), True
    except StateError as exc:  # the stored state, or the worker's copy of it
        if reraise:
            raise
        # Said once, by the leader's main process (Activator), not here: every retry
        # of the event comes back to this line, in whichever pool process runs it.
        logger.debug("%s", exc)
        errors.append(str(exc))
        outcome.ran, outcome.unreadable = False, True
        have_state = True  # nothing to start from, and init() must not replace it
        state = _UNREADABLE
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
