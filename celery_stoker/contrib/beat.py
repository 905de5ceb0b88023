"""Beat on the leader: Celery's beat service inside the leader worker only, with any scheduler.

``install(app)`` registers a ready Stoker (``celery_stoker.beat``).  Whichever
worker holds its lease runs ``celery.beat.Service`` with the scheduler
``beat_scheduler`` names (RedBeat when it is unset; django-celery-beat's
``DatabaseScheduler``; any scheduler whose state lives outside the worker:
``beat_schedulers.py`` chooses and checks it), so no separate ``celery beat``
process is needed and a crashed scheduler is replaced within one lease TTL
plus one renew interval.

Why the in-process hooks: Stoker callbacks (``init``/``event``) run as tasks in
the pool, which may be a prefork child that can be recycled at any time and
that a thread cannot outlive.  The beat service is a long-lived thread, so it
starts in :meth:`BeatStoker.leader_started` and stops in
:meth:`BeatStoker.leader_stopping`, both run in the worker's main process on
the activator's thread, the first before ``now_leader`` is sent and the second
before ``shutdown`` runs and the lease is released.  A follower builds no
scheduler and so never reads or writes the schedule's store.

Why the scheduler's store matters: the schedule's ``last_run_at`` must outlive
the leader.  The scheduler stores it before it sends a due task
(:class:`~celery_stoker.contrib.beat_schedulers.LeaderScheduler`), and the
term's beat thread closes the scheduler (a last sync) before the lease is
released, so a new leader carries on from where the old one stopped: across a
clean handover no run is sent twice or skipped, and after a crash at most the
runs due while nobody led are folded into one late run.

Why RedBeat's own lock is off: the lease already guarantees one scheduler at a
time.  RedBeat's lock would only add a second, slower election: after a crash
the new leader's beat would block on the dead leader's lock until its timeout
(five beat loop intervals, 25 minutes with the defaults).
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

from celery import beat

from ..connection import mask_url, url_scheme
from ..registry import StokerRegistrationError, stoker
from ..settings import StokerConfigurationError, load_settings
from ..stoker import Stoker
from .beat_schedulers import (
    LeaderScheduler,
    check_store,
    hint,
    is_redbeat,
    leader_class,
    release_thread_connections,
    resolve,
    store_of,
)

if TYPE_CHECKING:
    from celery import Celery

logger = logging.getLogger("celery_stoker.beat")

#: The name :func:`install` registers the Stoker under.
DEFAULT_NAME = "celery_stoker.beat"
#: Longest ``leader_stopping`` waits for the beat thread.  It normally stops at
#: once (its sleep is interruptible); only a store or broker call that hangs can
#: hold it, and then it can no longer send (see :meth:`LeaderScheduler.reserve`).
STOP_TIMEOUT = 5.0
#: Backoff between restarts of a beat service that raised (e.g. its store went away).
RESTART_BACKOFF_START = 0.5
RESTART_BACKOFF_MAX = 10.0


class _QuietRestarts(logging.Filter):
    """Drops Celery's "beat: Starting..." when a runner restarts a failed service.

    The runner says a failure and the recovery itself; Celery's line at each
    restart (every 10 s through an outage) would be noise.  Only on a beat
    thread whose runner marked it restarting.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        restarting = getattr(threading.current_thread(), "stoker_restarting", False)
        return not (restarting and record.msg == "beat: Starting...")


logging.getLogger("celery.beat").addFilter(_QuietRestarts())


class _LeaderService(beat.Service):
    """``celery.beat.Service`` built around the term's :class:`LeaderScheduler`."""

    def __init__(
        self,
        app: Celery,
        scheduler_cls: type[LeaderScheduler],
        stopped: threading.Event,
        on_tick: Any,
        max_interval: float | None,
    ) -> None:
        super().__init__(app, max_interval=max_interval, scheduler_cls=scheduler_cls)
        # The worker answers remote control itself (Celery's EmbeddedService does the same).
        self.remote_control = False
        self._term_stopped = stopped
        self._on_tick = on_tick

    def get_scheduler(self, lazy: bool = False, extension_namespace: str = "") -> LeaderScheduler:
        cls: type[LeaderScheduler] = self.scheduler_cls
        return cls(
            self.app,
            stopped=self._term_stopped,
            on_tick=self._on_tick,
            max_interval=self.max_interval,
            schedule_filename=self.schedule_filename,
            lazy=lazy,
        )


class BeatRunner:
    """The beat service of one leadership term, on a named thread of the worker's main process.

    A service that raises is started again with backoff (0.5 s doubling to
    10 s) for as long as the term lasts.  A new cause of failure is said at
    once (WARNING, with what to do when it is known, e.g. a database that was
    never migrated), the same one again at 2, 4, 8... failed starts (INFO,
    so an hour-long outage costs a handful of lines), and the first tick that
    works again at INFO.
    """

    def __init__(
        self, app: Celery, name: str, token: int, scheduler_cls: type[LeaderScheduler]
    ) -> None:
        self.app = app
        self.scheduler_cls = scheduler_cls
        self.stopped = threading.Event()
        self.service: _LeaderService | None = None
        self.thread = threading.Thread(target=self._run, name=f"stoker-beat:{name}", daemon=True)
        self.token = token
        self._failures = 0
        self._cause: tuple[str, str] | None = None

    def start(self) -> None:
        self.thread.start()

    def _run(self) -> None:
        self.app.set_current()
        try:
            self._serve()
        finally:
            release_thread_connections()

    def _serve(self) -> None:
        backoff = RESTART_BACKOFF_START
        while not self.stopped.is_set():
            service = _LeaderService(
                self.app,
                self.scheduler_cls,
                self.stopped,
                self._ticked,
                self.app.conf.get("beat_max_loop_interval"),
            )
            self.service = service
            started = time.monotonic()
            try:
                check_store(self.scheduler_cls)
                self.thread.stoker_restarting = self._failures > 0  # type: ignore[attr-defined]
                service.start()
                return  # a clean stop: the term ended
            except Exception as exc:
                if self.stopped.is_set():
                    return
                if time.monotonic() - started > 60:
                    backoff = RESTART_BACKOFF_START
                self._failed(exc, backoff)
                self.stopped.wait(backoff)
                backoff = min(backoff * 2, RESTART_BACKOFF_MAX)

    def _failed(self, exc: Exception, backoff: float) -> None:
        """Say a failed start: a new cause at once, a repeat at 2, 4, 8... failed starts.

        Two failures are the same cause when they differ only in numbers (a
        timestamp, a port, a pid in the message).
        """
        self._failures += 1
        cause = (exc.__class__.__name__, re.sub(r"\d+", "#", str(exc)))
        if cause != self._cause:
            self._cause = cause
            logger.warning(
                "beat (token %d) stopped on %s: %s%s; restarting in %.1f s, with backoff "
                "while it fails",
                self.token,
                cause[0],
                exc,
                hint(exc),
                backoff,
            )
            return
        failures = self._failures
        log = logger.info if failures & (failures - 1) == 0 else logger.debug
        log(
            "beat (token %d) still failing after %d starts (%s); next start in %.1f s",
            self.token,
            failures,
            cause[0],
            backoff,
        )

    def _ticked(self) -> None:
        """A tick went through: say so once if the service had been failing."""
        if self._failures:
            logger.info(
                "beat (token %d) running again after %d failed start(s)",
                self.token,
                self._failures,
            )
            self._failures = 0
            self._cause = None

    def stop(self, timeout: float = STOP_TIMEOUT) -> bool:
        """End the term's beat and wait for its thread; False if it did not stop in time."""
        self.stopped.set()
        service = self.service
        if service is not None:
            service.stop()
        self.thread.join(timeout)
        return not self.thread.is_alive()


def default_redbeat_url(app: Celery, options: Mapping[str, Any] | None = None) -> None:
    """Point RedBeat at the Stoker's Redis unless the user set ``redbeat_redis_url``.

    One Redis then holds the lease and the schedule, and RedBeat's deprecated
    fallback to ``broker_url`` is never used.  A ``sentinel://`` stoker URL is
    left alone: RedBeat spells Sentinel differently (``redis-sentinel://`` and
    ``redbeat_redis_options``), so the user must set it.
    """
    if app.conf.get("redbeat_redis_url"):
        return
    try:
        url = load_settings(app.conf, options).url
    except StokerConfigurationError:
        return  # StokerStep reports it with the setting's name when the worker starts
    if url_scheme(url) == "sentinel":
        logger.warning(
            "celery-stoker beat: stoker_url %s is a Sentinel group; set redbeat_redis_url "
            "and redbeat_redis_options for RedBeat (it spells Sentinel differently)",
            mask_url(url),
        )
        return
    app.conf.redbeat_redis_url = url


class BeatStoker(Stoker):
    """Runs Celery's beat on the leader worker, with ``beat_scheduler``'s scheduler; see above.

    The stored state says which worker ran beat in which term, so
    ``celery stoker status`` and ``dump()`` show it.
    """

    #: The app whose ``beat_schedule`` runs; set by :func:`install`.
    app: ClassVar[Celery]
    #: The Stoker's own setting overrides (``lease_ttl`` ...), set by :func:`install`.
    options: ClassVar[Mapping[str, Any]] = {}

    _runner: BeatRunner | None = None

    @classmethod
    def check_settings(cls, app: Any) -> None:
        """At worker start: ``beat_scheduler`` names a scheduler that can move with the lease."""
        resolve(app)

    def init(self) -> dict[str, Any]:
        return {"terms": 0, "host": None, "token": None, "since": None}

    def event(self, state: Any, event: str, reason: Any) -> Any:
        if event == "now_leader":
            return {
                "terms": int((state or {}).get("terms") or 0) + 1,
                "host": self.context.hostname,
                "token": self.context.token,
                "since": time.time(),
            }
        return state

    def leader_started(self) -> None:
        """Start this term's beat thread (quick: the scheduler is built on that thread)."""
        self._stop_runner("a new term began")
        scheduler = resolve(self.app)
        if is_redbeat(scheduler):
            default_redbeat_url(self.app, self.options)
        runner = BeatRunner(
            self.app, self.context.name, self.context.token, leader_class(scheduler)
        )
        self._runner = runner
        runner.start()
        logger.info(
            "beat started on %s (token %d) with %s",
            self.context.hostname,
            self.context.token,
            store_of(self.app, scheduler),
        )

    def leader_stopping(self, reason: str) -> None:
        """Stop this term's beat and return only once it can send nothing more.

        The beat thread closes its scheduler on the way out, which stores the
        last ``last_run_at`` (a sync): this returns before ``shutdown`` and the
        release of the lease, so the next leader reads it.
        """
        self._stop_runner(reason)

    def _stop_runner(self, reason: str) -> None:
        runner, self._runner = self._runner, None
        if runner is None:
            return
        if runner.stop(STOP_TIMEOUT):
            logger.info("beat stopped (token %d, %s)", runner.token, reason)
        else:
            logger.error(
                "beat thread of token %d still busy after %.0f s (a store or broker call "
                "hangs); it sends nothing more",
                runner.token,
                STOP_TIMEOUT,
            )


def install(app: Celery, name: str = DEFAULT_NAME, **options: Any) -> type[BeatStoker]:
    """Run ``app``'s beat schedule on the leader of the fleet; returns the registered Stoker.

    ``options`` may override ``lease_ttl``, ``renew_interval`` and
    ``key_prefix`` for this Stoker, as with ``@stoker``.  The scheduler is the
    one ``beat_scheduler`` names (RedBeat when unset), checked when a worker
    starts; the schedule is ``app.conf.beat_schedule`` plus the scheduler's
    own entries (RedBeat's dynamic ones, django-celery-beat's rows), and the
    scheduler's settings apply as usual, except RedBeat's lock, which the
    lease replaces.  Do not also run ``celery beat`` or ``worker -B`` for this
    app: they would send every entry a second time.
    """
    if not hasattr(app, "conf"):
        raise StokerRegistrationError(f"install() takes a Celery app, got {app!r}")
    cls = type(
        "BeatStoker",
        (BeatStoker,),
        {
            "__module__": __name__,
            "__qualname__": "BeatStoker",
            "__doc__": BeatStoker.__doc__,
            "app": app,
            "options": dict(options),
        },
    )
    registered = stoker(app, name=name, **options)(cls)

    def on_finalize(sender: Any = None, **kwargs: Any) -> None:
        default_redbeat_url(app, options)

    # Client processes (that add RedBeat entries) should find the same Redis as
    # the workers: set the default once the app is configured and finalized (a
    # RedBeat setting only: harmless with another scheduler, and reading
    # beat_scheduler here could import a Django model before Django is set up).
    if app.finalized:
        default_redbeat_url(app, options)
    else:
        app.on_after_finalize.connect(on_finalize, weak=False)
    return registered
