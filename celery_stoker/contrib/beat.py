"""Beat on the leader: Celery's beat service, with RedBeat, inside the leader worker only.

``install(app)`` registers a ready Stoker (``celery_stoker.beat``).  Whichever
worker holds its lease runs ``celery.beat.Service`` with
:class:`redbeat.RedBeatScheduler`, so no separate ``celery beat`` process is
needed and a crashed scheduler is replaced within one lease TTL plus one renew
interval instead of RedBeat's lock timeout.

Why the in-process hooks: Stoker callbacks (``init``/``event``) run as tasks in
the pool, which may be a prefork child that can be recycled at any time and
that a thread cannot outlive.  The beat service is a long-lived thread, so it
starts in :meth:`BeatStoker.leader_started` and stops in
:meth:`BeatStoker.leader_stopping`, both run in the worker's main process on
the activator's thread, the first before ``now_leader`` is sent and the second
before ``shutdown`` runs and the lease is released.

Why RedBeat: the schedule's ``last_run_at`` must outlive the leader.  RedBeat
keeps it in Redis and advances it *before* it sends a due task, so a new
leader carries on from where the old one stopped: across a clean handover no
run is sent twice or skipped, and after a crash at most the runs due while
nobody led are folded into one late run.

Why RedBeat's own lock is off: the lease already guarantees one scheduler at a
time.  RedBeat's lock would only add a second, slower election: after a crash
the new leader's beat would block on the dead leader's lock until its timeout
(five beat loop intervals, 25 minutes with the defaults).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

from celery import beat
from redbeat import RedBeatScheduler

from ..connection import mask_url, url_scheme
from ..registry import StokerRegistrationError, stoker
from ..settings import StokerConfigurationError, load_settings
from ..stoker import Stoker

if TYPE_CHECKING:
    from celery import Celery

logger = logging.getLogger("celery_stoker.beat")

#: The name :func:`install` registers the Stoker under.
DEFAULT_NAME = "celery_stoker.beat"
#: Longest ``leader_stopping`` waits for the beat thread.  It normally stops at
#: once (its sleep is interruptible); only a Redis or broker call that hangs can
#: hold it, and then it can no longer send (see :meth:`LeaderScheduler.maybe_due`).
STOP_TIMEOUT = 5.0
#: Backoff between restarts of a beat service that raised (e.g. Redis went away).
RESTART_BACKOFF_START = 0.5
RESTART_BACKOFF_MAX = 10.0


class _TermEnded(SystemExit):
    """Raised inside the beat loop once the term is over.

    ``celery.beat.Service.start`` treats ``SystemExit`` as a clean stop (it
    closes the scheduler and returns), which is exactly what ending a term is.
    """


class LeaderScheduler(RedBeatScheduler):
    """RedBeat without its lock, that sends only during its term and sleeps interruptibly.

    ``stopped`` is set when the term ends.  From then on nothing more is sent
    (checked before each due entry, before RedBeat advances ``last_run_at``),
    the wait between ticks returns at once and the next tick ends the service.
    """

    def __init__(self, app: Any, *, stopped: threading.Event, **kwargs: Any) -> None:
        self._stopped = stopped
        super().__init__(app, **kwargs)
        # The lease is the lock; RedBeat's would block a new leader after a crash.
        self.lock_key = None

    def tick(self, *args: Any, **kwargs: Any) -> float:
        """One pass over the due entries, then wait for the next one (or for the term's end).

        ``Service.start`` sleeps with ``time.sleep``, which nothing can
        interrupt; waiting here on the term's event instead lets a stepping-down
        leader stop beat in milliseconds, so the next leader starts at once.
        """
        if self._stopped.is_set():
            raise _TermEnded()
        interval = float(super().tick(*args, **kwargs) or 0.0)
        if interval > 0:
            self._stopped.wait(interval)
        return 0.0

    def maybe_due(self, entry: Any, **kwargs: Any) -> Any:
        """Send ``entry`` if due, unless the term ended meanwhile."""
        if self._stopped.is_set():
            return None
        return super().maybe_due(entry, **kwargs)


class _LeaderService(beat.Service):
    """``celery.beat.Service`` built around a :class:`LeaderScheduler` for one term."""

    def __init__(self, app: Celery, stopped: threading.Event, max_interval: float | None) -> None:
        super().__init__(app, max_interval=max_interval)
        # The worker answers remote control itself (Celery's EmbeddedService does the same).
        self.remote_control = False
        self._term_stopped = stopped

    def get_scheduler(self, lazy: bool = False, extension_namespace: str = "") -> LeaderScheduler:
        return LeaderScheduler(
            self.app, stopped=self._term_stopped, max_interval=self.max_interval, lazy=lazy
        )


class BeatRunner:
    """The beat service of one leadership term, on a named thread of the worker's main process."""

    def __init__(self, app: Celery, name: str, token: int) -> None:
        self.app = app
        self.stopped = threading.Event()
        self.service: _LeaderService | None = None
        self.thread = threading.Thread(target=self._run, name=f"stoker-beat:{name}", daemon=True)
        self.token = token

    def start(self) -> None:
        self.thread.start()

    def _run(self) -> None:
        self.app.set_current()
        backoff = RESTART_BACKOFF_START
        while not self.stopped.is_set():
            service = _LeaderService(
                self.app, self.stopped, self.app.conf.get("beat_max_loop_interval")
            )
            self.service = service
            started = time.monotonic()
            try:
                service.start()
                return  # a clean stop: the term ended
            except Exception as exc:
                if self.stopped.is_set():
                    return
                if time.monotonic() - started > 60:
                    backoff = RESTART_BACKOFF_START
                logger.warning(
                    "beat (token %d) stopped on %s: %s; restarting in %.1f s",
                    self.token,
                    exc.__class__.__name__,
                    exc,
                    backoff,
                )
                self.stopped.wait(backoff)
                backoff = min(backoff * 2, RESTART_BACKOFF_MAX)

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
    """Runs Celery's beat (with RedBeat) on the leader worker; see the module docstring.

    The stored state says which worker ran beat in which term, so
    ``celery stoker status`` and ``dump()`` show it.
    """

    #: The app whose ``beat_schedule`` runs; set by :func:`install`.
    app: ClassVar[Celery]
    #: The Stoker's own setting overrides (``lease_ttl`` ...), set by :func:`install`.
    options: ClassVar[Mapping[str, Any]] = {}

    _runner: BeatRunner | None = None

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
        default_redbeat_url(self.app, self.options)
        runner = BeatRunner(self.app, self.context.name, self.context.token)
        self._runner = runner
        runner.start()
        logger.info(
            "beat started on %s (token %d), schedule in %s",
            self.context.hostname,
            self.context.token,
            mask_url(self.app.conf.get("redbeat_redis_url")),
        )

    def leader_stopping(self, reason: str) -> None:
        """Stop this term's beat and return only once it can send nothing more."""
        self._stop_runner(reason)

    def _stop_runner(self, reason: str) -> None:
        runner, self._runner = self._runner, None
        if runner is None:
            return
        if runner.stop(STOP_TIMEOUT):
            logger.info("beat stopped (token %d, %s)", runner.token, reason)
        else:
            logger.error(
                "beat thread of token %d still busy after %.0f s (a Redis or broker call "
                "hangs); it sends nothing more",
                runner.token,
                STOP_TIMEOUT,
            )


def install(app: Celery, name: str = DEFAULT_NAME, **options: Any) -> type[BeatStoker]:
    """Run ``app``'s beat schedule on the leader of the fleet; returns the registered Stoker.

    ``options`` may override ``lease_ttl``, ``renew_interval`` and
    ``key_prefix`` for this Stoker, as with ``@stoker``.  The schedule comes
    from ``app.conf.beat_schedule`` and RedBeat's dynamic entries; RedBeat
    settings (``redbeat_key_prefix`` ...) apply as usual, except its lock,
    which the lease replaces.  Do not also run ``celery beat`` or ``worker -B``
    for this app: they would send every entry a second time.
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
    # the workers: set the default once the app is configured and finalized.
    if app.finalized:
        default_redbeat_url(app, options)
    else:
        app.on_after_finalize.connect(on_finalize, weak=False)
    return registered
