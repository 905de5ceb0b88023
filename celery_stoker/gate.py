"""The dispatch task's request class: the gate before the pool, and what Celery saw of an event.

Anyone who can publish to the broker can send a ``celery_stoker.dispatch``
message, with a term's real token (it is no secret: events and ``inspect``
show it).  So the token is not what lets a callback run: the dispatch
request (:class:`EventRequest`) asks the worker's pump, through its watch
(:meth:`~celery_stoker.watch.EventWatch.admit`), in the worker's main process
and before the pool gets the request, whether this is the very message it has
in flight; the task in the pool (``dispatch.py``) runs only a request that
was admitted so (:data:`PERMIT_FIELD`).

The same request tells the watch what Celery saw of the event: accepted by a
pool process, the process lost, a hard time limit.
"""

from __future__ import annotations

import logging
import secrets
from typing import Any

from celery.exceptions import TimeLimitExceeded
from celery.worker import state as worker_state
from celery.worker.request import Request

from .watch import watch_of

# The dispatch task's logger: these lines were its own, and users filter by its name.
logger = logging.getLogger("celery_stoker.dispatch")

#: The request field the gate sets on an admitted event, and its value: a secret of
#: this worker's processes (pool processes are forked from the main one, and requests
#: reach them over the pool's pipe), never sent through the broker.
PERMIT_FIELD = "stoker_permit"
PERMIT = secrets.token_hex(16)
#: Said once per process: dispatch messages refused where no pump runs, or in the pool.
_SAID: set[str] = set()


class EventRequest(Request):
    """The dispatch task's request: the gate before the pool, and what Celery saw of an event.

    Before a request goes to the pool, Celery asks it :meth:`revoked`; that
    is where this request asks the pump's watch whether it is the event the
    pump has in flight (see the module docstring).  A refused request never
    reaches the pool: it is acknowledged (so the broker does not deliver it
    again), leaves Celery's tables, and the event in flight, if one runs
    under the same id, keeps its place in them.

    Celery calls the hooks below in the worker's main process (for every
    pool), so the pump's watch hears at once when the pool process running a
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
        _tell_watch(self, "accepted", None)

    def on_timeout(self, soft: bool, timeout: float) -> None:
        super().on_timeout(soft, timeout)
        if not soft:
            _tell_watch(self, "timeout", f"hard time limit ({timeout:g} s) exceeded")

    def on_failure(
        self, exc_info: Any, send_failed_event: bool = True, return_ok: bool = False
    ) -> Any:
        try:
            return super().on_failure(exc_info, send_failed_event, return_ok)
        finally:
            exc = getattr(exc_info, "exception", None)
            exc = getattr(exc, "exc", exc)  # ExceptionWithTraceback
            what = "timeout" if isinstance(exc, TimeLimitExceeded) else "lost"
            _tell_watch(self, what, f"{exc.__class__.__name__}: {exc}")


def _admitted(request: Request) -> bool:
    """True if this worker's pump admits ``request`` as its event in flight; never raises."""
    try:
        source = _Source(request)
        watch = watch_of(request.hostname)
        if watch is None:
            say_once(
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


def say_once(key: str, message: str, *args: Any) -> None:
    """Log ``message`` at WARNING the first time ``key`` is said in this process, then at DEBUG."""
    log = logger.debug if key in _SAID else logger.warning
    _SAID.add(key)
    log(message, *args)


def _tell_watch(request: Request, what: str, cause: str | None) -> None:
    """Pass what Celery saw of a dispatch request to this worker's watch; never raises."""
    try:
        watch = watch_of(request.hostname)
        if watch is None:
            return
        name, token, seq = request.args[0], int(request.args[1]), int(request.args[2])
        watch.celery_saw(name, token, seq, what, cause, request.id, request.worker_pid)
    except Exception:  # a hook of Celery's must not fail the worker
        logger.exception("celery-stoker: could not pass %s of %s to the pump", what, request.id)
