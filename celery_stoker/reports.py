"""The worker's report list: how the end of each event comes back to the leader's pump.

The dispatch task, wherever it ran, pushes its :class:`~celery_stoker.outcome.Outcome`
to the report list of the worker that sent the event (``keys.reports_key``):
:func:`push_report`, briefly retried, said once per worker while Redis refuses.
In that worker's main process one ``stoker-reports`` thread per Redis
(:class:`ReportReader`) reads every Stoker's reports with a single BLPOP and
hands each to the pump's watch (``watch.py``); it asks Redis only while an
event is in flight.  A report that never comes is noticed by the watchdog.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable

import redis

from .flags import WorkerFlags
from .outcome import Outcome

# The loggers these lines had: the reader's were the pump's, the push the dispatch
# task's, and users filter by those names.
logger = logging.getLogger("celery_stoker.pump")
push_logger = logging.getLogger("celery_stoker.dispatch")

#: How long a report stays in Redis if its pump never reads it.
REPORTS_KEY_TTL_MS = 3_600_000
#: Tries to push a report before leaving it to the pump to notice the finished task.
REPORT_ATTEMPTS = 3
#: The Stokers whose last report this worker could not push (logged once per outage).
_REPORT_REFUSED = WorkerFlags()


def report(client: redis.Redis, key: str, outcome: Outcome) -> None:
    """Tell the leader's pump this event is finished (it waits on ``key`` with BLPOP)."""
    pipe = client.pipeline(transaction=False)
    pipe.lpush(key, outcome.to_json())
    pipe.pexpire(key, REPORTS_KEY_TTL_MS)
    pipe.execute()


def push_report(client: redis.Redis, key: str, outcome: Outcome, event: str) -> None:
    """Report ``outcome`` (of ``event``) on ``key``, so the pump sends the next event.

    Briefly retried; if Redis keeps refusing (full, down), the pump notices the
    finished request without a report and carries on, so no pool slot is held
    for long here.  Said once per outage on this worker: every event of it
    fails so.  Never raises for Redis.
    """
    name = outcome.name
    for attempt in range(REPORT_ATTEMPTS):
        try:
            report(client, key, outcome)
            _REPORT_REFUSED.discard(name)
            return
        except redis.RedisError as exc:
            if attempt + 1 < REPORT_ATTEMPTS:
                time.sleep(0.05)
                continue
            log = push_logger.debug if name in _REPORT_REFUSED else push_logger.warning
            _REPORT_REFUSED.add(name)
            log(
                "Stoker %s: could not report the end of %s: Redis refused (%s); "
                "said once until a report goes through",
                name,
                event,
                exc,
            )


class ReportReader:
    """One thread that BLPOPs the report lists of one Redis and hands each report on."""

    #: Seconds one BLPOP blocks; the thread notices a stop within this.
    BLOCK = 1
    #: Longest pause after an error (Redis down, a refused command), doubling up to it.
    BACKOFF_MAX = 5.0

    def __init__(
        self,
        client_factory: Callable[[], redis.Redis],
        keys: list[str],
        sink: Callable[[Outcome], None],
        busy: threading.Event,
    ) -> None:
        self._client_factory = client_factory
        self.keys = keys
        self._sink = sink
        #: Set while an event is in flight; otherwise nothing can report, and the
        #: reader waits here instead of asking Redis.
        self._busy = busy
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stoker-reports", daemon=True)
        self.error: str | None = None

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()

    def join(self, timeout: float) -> None:
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def _connect_early(self) -> redis.Redis | None:
        """Connect before any event: a new leader's main process has better things to do.

        Otherwise the first event of the worker's first term makes this thread
        connect (and greet Redis) while that event is on its way to the pool.
        One connection per worker and Redis, idle until then: no command is
        sent while nothing is in flight.
        """
        try:
            client = self._client_factory()
            pool = getattr(client, "connection_pool", None)  # (a cluster client has one per node)
            if pool is not None:
                pool.release(pool.get_connection())  # connected and greeted; BLPOP reuses it
        except Exception:
            return None  # Redis is not up yet: connected on the first event
        return client

    def _run(self) -> None:
        backoff = 0.05
        client: redis.Redis | None = self._connect_early()
        while not self._stopping.is_set():
            if not self._busy.wait(self.BLOCK):
                continue
            try:
                if client is None:
                    client = self._client_factory()
                popped = client.blpop(self.keys, timeout=self.BLOCK)
                if self.error is not None:
                    logger.info("celery-stoker: reading reports again")
                    self.error = None
                backoff = 0.05
                if popped is None:
                    continue
                outcome = Outcome.from_json(popped[1])
                if outcome is not None:
                    self._sink(outcome)
            except Exception as exc:
                text = f"{exc.__class__.__name__}: {exc}"
                if text != self.error:
                    logger.warning(
                        "celery-stoker: cannot read event reports (%s); the pump still "
                        "notices finished events from Celery",
                        text,
                    )
                    self.error = text
                self._stopping.wait(backoff)
                backoff = min(backoff * 2, self.BACKOFF_MAX)
        if client is not None:
            with contextlib.suppress(Exception):
                client.close()
