"""Which beat scheduler runs on the leader, and the changes that make any of them safe to move.

``beat_scheduler`` names the scheduler as for ``celery beat -S``: a class, or
``"module:Class"`` / ``"module.Class"``, or an alias a package registers
(django-celery-beat's ``"django"``).  Unset (Celery's default,
``celery.beat:PersistentScheduler``, that nobody wrote) means RedBeat.

Why the store matters: beat on the leader moves with the lease, so the
schedule's ``last_run_at`` must live where the next leader reads it.
RedBeat keeps it in Redis, django-celery-beat's ``DatabaseScheduler`` in the
project's database.  Celery's ``PersistentScheduler`` keeps it in a file on
the leader's disk, and the bare ``celery.beat.Scheduler`` in its memory: a new
leader starts from its own copy and sends again what the old one sent (or
skips), so :func:`resolve` refuses both unless
``stoker_beat_allow_local_scheduler = True``.

What :class:`LeaderScheduler` adds to the chosen class (it is mixed in, so the
scheduler's own code runs unchanged):

* it stores an entry's new ``last_run_at`` *before* the task is sent
  (``sync()`` right after ``reserve()``; for ``DatabaseScheduler`` the
  entry's row is written there and a failed write is said and kept for the
  next sync): a leader killed between the two loses that run rather than
  have its successor send it again.  RedBeat stores it there already;
  ``DatabaseScheduler`` would otherwise write it every three minutes
  (``sync_every``), so a crash resent everything sent since;
* it sends nothing once the term ended and wakes from its wait at once, so a
  stepping-down leader stops in milliseconds; ``close()`` (a last ``sync()``)
  runs on the beat thread before ``leader_stopping`` returns, so before the
  lease is released;
* RedBeat's lock is off: the lease is the lock.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from celery import beat
from celery.utils.imports import load_extension_class_names, symbol_by_name

from ..connection import mask_url
from ..settings import (
    StokerConfigurationError,
    check_beat_allow_local_scheduler,
    is_set,
    setting_name,
)

if TYPE_CHECKING:
    from celery import Celery

logger = logging.getLogger("celery_stoker.beat")

#: The scheduler beat on the leader runs when ``beat_scheduler`` is not set.
DEFAULT_SCHEDULER = "redbeat.schedulers:RedBeatScheduler"
#: Where packages register scheduler aliases (``-S django``), as ``celery beat`` reads them.
ALIASES_NAMESPACE = "celery.beat_schedulers"
CHOICES = (
    "leave it unset for RedBeat (the schedule in Redis), set it to "
    "'django_celery_beat.schedulers:DatabaseScheduler' (or 'django') for django-celery-beat "
    "(the schedule in your database), or to any celery.beat.Scheduler subclass that keeps "
    "last_run_at outside the worker"
)


class TermEnded(SystemExit):
    """Raised inside the beat loop once the term is over.

    ``celery.beat.Service.start`` treats ``SystemExit`` as a clean stop (it
    closes the scheduler, which syncs, and returns), which is exactly what
    ending a term is.  Schedulers catch ``Exception`` around a send; this
    passes through them.
    """


def resolve(app: Celery) -> type[beat.Scheduler]:
    """The scheduler class ``beat_scheduler`` names, checked; RedBeat when it is not set.

    Raises :class:`StokerConfigurationError` naming the setting when the class
    cannot be imported, is not a ``celery.beat.Scheduler``, or keeps its state
    on the leader alone (unless ``stoker_beat_allow_local_scheduler``).  Imports
    the class and nothing else: no store is touched (followers call this too,
    at worker start).
    """
    conf = app.conf
    allow_local = check_beat_allow_local_scheduler(conf)
    value = conf.get("beat_scheduler")
    if not is_set(conf, "beat_scheduler") or value is None or value == "":
        return _import(DEFAULT_SCHEDULER)
    name = setting_name(conf, "beat_scheduler")
    aliases = dict(load_extension_class_names(ALIASES_NAMESPACE) or ())
    try:
        cls = symbol_by_name(value, aliases=aliases)
    except Exception as exc:
        raise StokerConfigurationError(
            f"{name}={value!r} cannot be imported ({exc.__class__.__name__}: {exc}): name a "
            f"scheduler class as 'module:Class' or 'module.Class'; {CHOICES}"
        ) from None
    if not (isinstance(cls, type) and issubclass(cls, beat.Scheduler)):
        raise StokerConfigurationError(
            f"{name}={value!r} is {cls!r}, not a subclass of celery.beat.Scheduler; {CHOICES}"
        )
    local = local_state(cls)
    if local is not None and not allow_local:
        allow_name = setting_name(conf, "stoker_beat_allow_local_scheduler")
        raise StokerConfigurationError(
            f"{name}={value!r}: {local}, so once leadership moves the new leader would send "
            f"again what the old one sent, or skip runs. Instead, {CHOICES}; or "
            f"set {allow_name} = True to run it anyway (each leader then keeps its own state)"
        )
    return cls


def _import(path: str) -> type[beat.Scheduler]:
    cls: type[beat.Scheduler] = symbol_by_name(path)
    return cls


def local_state(cls: type[beat.Scheduler]) -> str | None:
    """Why ``cls`` keeps its schedule on one machine; None if not (as far as we know)."""
    if issubclass(cls, beat.PersistentScheduler):
        return f"{_qualname(cls)} keeps last_run_at in a file on the leader's disk"
    if cls is beat.Scheduler:
        return "celery.beat.Scheduler keeps last_run_at in the leader's memory only"
    return None


def is_redbeat(cls: type[beat.Scheduler]) -> bool:
    return any(_qualname(c) == "redbeat.schedulers.RedBeatScheduler" for c in cls.__mro__)


def is_django_database(cls: type[beat.Scheduler]) -> bool:
    return any(
        _qualname(c) == "django_celery_beat.schedulers.DatabaseScheduler" for c in cls.__mro__
    )


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def store_of(app: Celery, cls: type[beat.Scheduler]) -> str:
    """Where ``cls`` keeps the schedule, for the log line of a term's start (no password)."""
    if is_redbeat(cls):
        return f"RedBeat, schedule in {mask_url(app.conf.get('redbeat_redis_url'))}"
    if is_django_database(cls) and "django.db" in sys.modules:
        from django.db import DEFAULT_DB_ALIAS, connections

        db = connections.settings[DEFAULT_DB_ALIAS]
        where = f"{db.get('HOST') or 'localhost'}:{db.get('PORT') or 'default port'}"
        return f"django-celery-beat, schedule in database {db.get('NAME')!r} on {where}"
    if local_state(cls) is not None:
        return f"{_qualname(cls)}, schedule on this machine only"
    return _qualname(cls)


def hint(exc: BaseException) -> str:
    """What to do about a failure the scheduler raised, when we can tell (else '')."""
    text = str(exc)
    module = type(exc).__module__
    if module.startswith(("django.db", "psycopg")) and (
        "does not exist" in text or "no such table" in text or "doesn't exist" in text
    ):
        if "django_celery_beat" in text:
            return (
                "; the django-celery-beat tables are not in this database: run "
                "`python manage.py migrate django_celery_beat`"
            )
        return "; a table is missing: run `python manage.py migrate`"
    return ""


class StoreNotReady(RuntimeError):
    """The scheduler's store cannot hold a schedule yet (e.g. its tables were never created)."""


def check_store(cls: type[beat.Scheduler]) -> None:
    """Before a term's scheduler is built: is its store ready?  Else a clear error.

    For django-celery-beat, whether its tables exist (one query, on the
    leader only): without them ``DatabaseScheduler`` would log a traceback per
    entry at every restart and then fail anyway.  Other schedulers say for
    themselves when they start.
    """
    if not is_django_database(cls):
        return
    from django.apps import apps
    from django.db import connections, router

    models = list(apps.get_app_config("django_celery_beat").get_models())
    alias = router.db_for_write(models[0])
    connection = connections[alias]
    tables = set(connection.introspection.table_names())
    missing = sorted(m._meta.db_table for m in models if m._meta.db_table not in tables)
    if missing:
        raise StoreNotReady(
            f"the django-celery-beat tables are not in database "
            f"{connection.settings_dict.get('NAME')!r} (missing: {', '.join(missing)}): run "
            "`python manage.py migrate django_celery_beat`"
        )


def release_thread_connections() -> None:
    """Close the Django database connections this thread opened, if Django is in use.

    A term's beat thread ends with the term; its connection would stay open
    (Django keeps one per thread) on a worker that is now a follower, which
    must hold nothing of the schedule's store.
    """
    if "django.db" not in sys.modules:
        return
    from django.db import connections

    try:
        connections.close_all()
    except Exception as exc:  # a connection already broken: nothing left to close
        logger.debug("closing the beat thread's database connections: %r", exc)


class _OncePerMinute(logging.Filter):
    """A django-celery-beat warning or error said at most once a minute per beat thread.

    ``DatabaseScheduler`` logs a traceback at every tick and every sync while
    its database is unreachable (each second or few); on a beat thread of
    ours the first of each kind passes, and the same kind again a minute
    later, and :meth:`LeaderScheduler._say_store` says what it means.
    """

    QUIET_FOR = 60.0

    def filter(self, record: logging.LogRecord) -> bool:
        thread = threading.current_thread()
        if record.levelno < logging.WARNING or not thread.name.startswith("stoker-beat:"):
            return True
        said: dict[str, float] = thread.__dict__.setdefault("stoker_said", {})
        now = time.monotonic()
        key = str(record.msg)
        if now - said.get(key, -self.QUIET_FOR) < self.QUIET_FOR:
            return False
        said[key] = now
        return True


logging.getLogger("django_celery_beat.schedulers").addFilter(_OncePerMinute())


class LeaderScheduler(beat.Scheduler):
    """Mixed in before the chosen scheduler class by :func:`leader_class`; see the module docstring.

    ``stopped`` is set when the term ends.  From then on nothing more is sent
    (checked before an entry's ``last_run_at`` is advanced), the wait between
    ticks returns at once and the next tick ends the service.  ``on_tick`` is
    called after every tick that did not raise (the runner says a scheduler
    that failed is running again).
    """

    #: RedBeat's lock is off; RedBeat's ``beat_init`` handler also reads this.
    lock_key: str | None = None

    def __init__(
        self,
        app: Any,
        *args: Any,
        stopped: threading.Event,
        on_tick: Callable[[], None] | None = None,
        **kwargs: Any,
    ) -> None:
        self._term_stopped = stopped
        self._on_tick = on_tick
        super().__init__(app, *args, **kwargs)
        # The lease is the lock; RedBeat's would block a new leader after a crash.
        self.lock_key = None

    def tick(self, *args: Any, **kwargs: Any) -> float:
        """One pass over the due entries, then wait for the next one (or for the term's end).

        ``Service.start`` sleeps with ``time.sleep``, which nothing can
        interrupt; waiting here on the term's event instead lets a stepping-down
        leader stop beat in milliseconds, so the next leader starts at once.
        """
        if self._term_stopped.is_set():
            raise TermEnded()
        interval = float(super().tick(*args, **kwargs) or 0.0)
        if self._on_tick is not None:
            self._on_tick()
        if interval > 0:
            self._term_stopped.wait(interval)
        return 0.0

    def reserve(self, entry: Any) -> Any:
        """Advance ``entry``'s ``last_run_at`` and store it, before its task is sent.

        Both Celery's ``tick`` and RedBeat's ``maybe_due`` (through
        ``apply_async``) reserve an entry right before they send it, so this is
        where the term's end is checked too.
        """
        if self._term_stopped.is_set():
            raise TermEnded()
        new_entry = super().reserve(entry)
        self._store(new_entry)
        if self._term_stopped.is_set():
            # The term ended while the write waited (a lock, a slow store): the worker
            # may live on (a handoff, a drain) and the next leader may already send.
            # The run was stored as sent and is skipped; it is never sent twice.
            raise TermEnded()
        return new_entry

    def _store(self, entry: Any) -> None:
        """Store what :meth:`reserve` advanced: the scheduler's own ``sync``."""
        self.sync()

    _store_down = False

    def _say_store(self, unstored: str | None, exc: BaseException | None = None) -> None:
        """Say once when ``last_run_at`` could not be stored, and once when it is again.

        The send goes ahead from memory, as under ``celery beat``; what that
        costs is ours to say: a crash before the store answers may send the
        runs sent meanwhile again.
        """
        if unstored is not None and not self._store_down:
            self._store_down = True
            logger.warning(
                "beat: could not store last_run_at of %s (%s: %s); sending from memory until "
                "the schedule's store answers (a crash before then may send these runs again)",
                unstored,
                exc.__class__.__name__,
                exc,
            )
        elif unstored is None and self._store_down:
            self._store_down = False
            logger.info("beat: last_run_at stored again; the schedule's store answers")

    def close(self) -> None:
        """Sync and close as the scheduler does; then drop django-celery-beat's exit hook.

        ``DatabaseScheduler`` registers a ``sync`` for interpreter exit: it
        would keep every term's scheduler alive until then, and a worker
        exiting long after its term could write an old ``last_run_at``.
        """
        try:
            super().close()
        finally:
            finalize = self.__dict__.get("_finalize")
            if finalize is not None:
                finalize.cancel()


class _LeaderDatabaseScheduler(LeaderScheduler):
    """What django-celery-beat's ``DatabaseScheduler`` needs on top of :class:`LeaderScheduler`.

    Its ``sync`` logs a database error and forgets the entry whose write
    failed (popped from ``_dirty``, never put back), so the store could not
    tell a failed write from a done one: the reserved entry is written here,
    the error caught, and the entry kept dirty for the next ``sync``.
    """

    _dirty: set[str]

    def _store(self, entry: Any) -> None:
        from django.core.exceptions import ObjectDoesNotExist
        from django.db import DatabaseError, InterfaceError, close_old_connections

        try:
            close_old_connections()  # as sync() does: drop a connection the server ended
            entry.save()
        except (DatabaseError, InterfaceError) as exc:
            self._say_store(entry.name, exc)  # kept in _dirty: the next sync retries it
            return
        except ObjectDoesNotExist:
            pass  # deleted since the schedule was read: nothing to store, the reload drops it
        self._dirty.discard(entry.name)
        self.sync()  # what an earlier failure left
        self._say_store(None)


_leader_classes: dict[type[beat.Scheduler], type[LeaderScheduler]] = {}
_leader_classes_lock = threading.Lock()


def leader_class(cls: type[beat.Scheduler]) -> type[LeaderScheduler]:
    """``cls`` with :class:`LeaderScheduler` mixed in before it (one class per scheduler)."""
    if issubclass(cls, LeaderScheduler):
        return cls
    leader: type[LeaderScheduler] = (
        _LeaderDatabaseScheduler if is_django_database(cls) else LeaderScheduler
    )
    with _leader_classes_lock:
        made = _leader_classes.get(cls)
        if made is None:
            made = type(
                f"Leader{cls.__name__}",
                (leader, cls),
                {"__module__": __name__, "__doc__": f"{_qualname(cls)} on the leader."},
            )
            _leader_classes[cls] = made
        return made
