"""One activator per (worker, Stoker): wires the Stoker's election to the worker's event pump.

The election (``election.py``) decides whether this worker leads; the pump
(``pump.py``) carries the leader's events to the pool and back.  The
activator stands between them: when a term starts acting it runs the
``leader_started`` hook and queues ``now_leader``; when it ends it runs
``leader_stopping`` and delivers ``shutdown`` itself, in this process (by then
the pool may be draining or the broker gone); after each event it counts
failures toward ``max_failures``.  ``snapshot()`` is what ``dump`` and
``celery inspect stoker`` show of it, as the original's ``dump/1``
(``activator_status.py``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import redis

from . import activator_status
from .access import AccessCheck
from .callbacks import EventCall
from .copies import StateCopy, copies
from .delivery import EventDelivery
from .dispatch import run_event
from .election import Election
from .election_state import REDIS_DOWN, Spread
from .lanes import PendingEvent
from .lease import RedisLease, Term
from .listener import LeaseListener
from .metrics import NO_METRICS, MetricsHooks
from .outcome import Outcome
from .pump import EventPump
from .registry import StokerSpec, app_name
from .settings import StokerSettings
from .stoker import Stoker, StokerContext
from .store import StokerStore

if TYPE_CHECKING:
    from celery import Celery

logger = logging.getLogger("celery_stoker.activator")


class Activator:
    """One Stoker on one worker: its election, its lane in the pump, its hooks."""

    def __init__(
        self,
        app: Celery,
        spec: StokerSpec,
        settings: StokerSettings,
        *,
        hostname: str,
        delivery: EventDelivery,
        listener: LeaseListener | None,
        members: Callable[[], frozenset[str]],
        holder_id: str,
        pump: EventPump,
        client: redis.Redis | None = None,
        eligible: bool = True,
        min_members: int = 1,
        emit: Callable[..., None] | None = None,
        metrics: MetricsHooks = NO_METRICS,
        access: AccessCheck | None = None,
        spread: Spread | None = None,
    ) -> None:
        self.app = app
        self.spec = spec
        self.name = spec.name
        self.settings = settings
        self.hostname = hostname
        self.delivery = delivery
        self._members = members
        self.pump = pump
        self.client = client or _client(settings, settings.socket_timeout)
        self.lease = RedisLease(
            self.client,
            spec.name,
            holder_id=holder_id,
            hostname=hostname,
            ttl=settings.lease_ttl,
            key_prefix=settings.key_prefix,
            listener=listener,
            app=app_name(app),
        )
        self.store = StokerStore(
            self.client,
            spec.name,
            key_prefix=settings.key_prefix,
            serializer=settings.state_serializer,
        )
        self.election = Election(
            spec.name,
            settings,
            lease=self.lease,
            store=self.store,
            hostname=hostname,
            handler=self,
            members=members,
            eligible=eligible,
            min_members=min_members,
            emit=emit,
            metrics=metrics,
            access=access
            or AccessCheck(self.client, settings.key_prefix, masked_url=settings.masked_url),
            spread=spread,
        )
        if self.election.access is not None:
            self.election.access.require_replicas(settings.min_replicas)
        self.metrics = metrics
        self.last_event: str | None = None
        self.last_event_at: float | None = None
        self.last_error: str | None = None
        #: The stored state cannot be read (see Outcome.unreadable): why, since when, how
        #: many events found it so; shown in ``health`` until an event reads it again.
        self.state_error: str | None = None
        self.state_error_since: float | None = None
        self.state_retries = 0
        #: The last unreadable-state error logged: said once per cause, not per retry.
        self._state_error_said: str | None = None
        #: Consecutive failed events (max_failures).
        self.failures = 0
        #: The token of the last term whose events reached the pool (sent), and of the
        #: last one whose Stoker heard one (ran): ``shutdown`` goes only to a Stoker
        #: that heard of its term.
        self._sent_token: int | None = None
        self._heard_token: int | None = None
        #: The token of the last term whose ``leader_started`` hook ran.
        self._started_token: int | None = None
        #: This process's own instance, for the in-process leader hooks.
        self._local: Stoker | None = None

    # ----------------------------------------------------------------- control

    def start(self) -> None:
        """Take a lane in the pump and start the election thread."""
        self.pump.add_lane(self)
        self.election.start()

    def begin_stopping(self) -> None:
        """The worker begins to stop: take no lease from now on (signal-safe)."""
        self.election.begin_stopping()

    def request_stop(self, reason: str = "worker_stopping") -> None:
        """Begin stepping down now, without waiting (safe from a signal handler)."""
        self.election.request_stop(reason)

    def stop(self, timeout: float = 10.0) -> bool:
        """Step down (release if leader) and stop the election thread.

        Returns False if it did not finish within ``timeout`` (a ``shutdown`` or
        ``leader_stopping`` that hangs): the caller goes on without it; the lease,
        no longer renewed, expires within one TTL.
        """
        return self.election.stop(timeout)

    @property
    def key_prefix(self) -> str:
        return self.settings.key_prefix

    @property
    def weight(self) -> int:
        """How much this Stoker counts when leadership is spread (``@stoker(weight=...)``)."""
        return self.spec.weight

    def busy(self) -> bool:
        """True while one of the Stoker's events is in flight (it is not moved then)."""
        return self.pump.running(self.name) is not None

    def on_cluster_change(self, node: str, change: str) -> None:
        """A worker joined, left or was lost: the leader's Stoker hears of it."""
        term = self.election.term
        if term is not None and self.election.accepting:
            self.pump.submit(
                self.name, term.token, "cluster_change", {"node": node, "change": change}
            )
        self.election.recheck()  # min_members: the election re-checks the quorum now

    def snapshot(self) -> dict[str, Any]:
        """This activator's fields, as the original's ``dump/1`` shows them."""
        return activator_status.snapshot(self)

    def health(self) -> dict[str, Any]:
        """``ok`` or the fault this activator (or the worker's pump) is in, since when."""
        return activator_status.health(self)

    # ------------------------------------------------------ the term (TermHandler)
    # Called by the election, on its thread.

    def term_won(self, term: Term) -> None:
        """Keep a copy of the stored state: ``shutdown`` gets it even if Redis goes.

        The term's events keep theirs as they commit (``copies.py``); this one is
        what a term that loses its lease before any event commits starts from.
        """
        seq = self.pump.next_seq()
        try:
            encoded, version = self.store.load_encoded()
        except REDIS_DOWN:
            encoded, version = None, 0
        copy = StateCopy(*encoded, version, seq) if encoded is not None else None
        copies.begin_term(self.hostname, self.name, seq, copy)

    def start_acting(self, term: Term) -> None:
        self._started_token = term.token
        self._call_local(term, "leader_started")
        self.pump.begin_term(self.name, term.token)

    def stop_events(self) -> None:
        self.pump.end_term(self.name)
        self.failures = 0
        # Only the leader retries the state: a follower's health says nothing of it.  The
        # cause stays remembered, so leading again onto the same bytes is not said twice.
        self.state_error = self.state_error_since = None
        self.state_retries = 0

    def events_idle(self, timeout: float) -> bool:
        return self.pump.wait_idle(self.name, timeout)

    def event_started(self, timeout: float) -> bool:
        return self.pump.wait_started(self.name, timeout)

    def withdraw_unreceived(self) -> bool:
        return self.pump.withdraw_unreceived(self.name)

    def withdraw(self, task_id: str) -> bool:
        """Take back a sent event Celery has not received yet (``delivery.py``)."""
        return self.delivery.withdraw(task_id)

    def stop_acting(self, term: Term, reason: str, *, lost: bool, stale: bool = False) -> None:
        if self._started_token == term.token:
            self._call_local(term, "leader_stopping", reason)
        if not self._heard_of(term):
            logger.info(
                "Stoker %s: term %d ends before any of its events ran; no shutdown to send",
                self.name,
                term.token,
            )
            return
        self._deliver_shutdown(term, reason, lost=lost, stale=stale)

    def _heard_of(self, term: Term) -> bool:
        """Whether the Stoker heard an event of ``term`` (or one is running in the pool now).

        An event sent but never started (the worker stopped consuming) does not
        count: it can no longer start, the term is closing or over in Redis.
        """
        if self._heard_token == term.token:
            return True
        running = self.pump.running(self.name) if self._sent_token == term.token else None
        return running is not None and running.get("started_at") is not None

    def _call_local(self, term: Term, hook: str, *args: Any) -> None:
        """Run an in-process leader hook of the Stoker; log, never raise."""
        if self._local is None:
            self._local = self.spec.instantiate()
        self._local.context = StokerContext(self.name, self.hostname, term.token, self._members())
        try:
            getattr(self._local, hook, lambda *a: None)(*args)
        except Exception:
            logger.exception("Stoker %s: %s() raised; carrying on", self.name, hook)
            self.last_error = f"{hook}() raised"

    def _deliver_shutdown(self, term: Term, reason: str, *, lost: bool, stale: bool) -> None:
        """Run ``shutdown`` in this process: the pool may be draining, the broker gone."""
        self.last_event, self.last_event_at = "shutdown", time.time()
        try:
            call = EventCall(
                seq=self.pump.next_seq(),
                token=term.token,
                event="shutdown",
                reason=reason,
                hostname=self.hostname,
                members=self._members(),
                # Delivered even when the term just ran out: it tells the Stoker to
                # stop acting.  Its state write is still fenced by the token.
                check_current=False,
                cached=copies.last(self.hostname, self.name),
                # A lost term must hear shutdown before Redis can hand the lease on:
                # start from our copy of the state, ask Redis nothing first.
                prefer_cached=lost,
                stale=stale,
                history_lost=term.history_lost is not None,
            )
            outcome = run_event(self.app, self.spec, call, client=self.client)
            self.metrics.event_done(self.name, "shutdown", outcome)
            if outcome.unreadable:
                self._say_unreadable(outcome.error)
            self.last_error = outcome.error or self.last_error
        except Exception as exc:
            logger.warning(
                "Stoker %s: shutdown not delivered (%s)",
                self.name,
                exc.__class__.__name__,
            )

    # ------------------------------------------------------------------ events
    # Called by the worker's pump, on its thread.

    @property
    def time_limit(self) -> float | None:
        """The hard time limit of this Stoker's events (the pump enforces it if Celery cannot)."""
        return self.settings.time_limit

    def acting_token(self) -> int | None:
        """The token of the term that may send events now, or None."""
        term = self.election.term
        if term is None or not self.election.accepting or not term.is_valid():
            return None
        return term.token

    def event_args(self, item: PendingEvent) -> list[Any]:
        """The dispatch task's arguments for ``item``: what ``dispatch`` is called with."""
        return [
            self.name,
            item.token,
            item.seq,
            item.event,
            item.reason,
            sorted(self._members()),
            self.hostname,
        ]

    def send_event(self, item: PendingEvent, task_id: str, args: list[Any]) -> bool:
        """Send ``item`` to this worker's pool as the dispatch task (``delivery.py``).

        True when it went through the broker.
        """
        self.last_event, self.last_event_at = item.event, time.time()
        self._sent_token = item.token
        return self.delivery.send(
            task_id,
            args,
            soft_time_limit=self.settings.soft_time_limit,
            time_limit=self.settings.time_limit,
        )

    def event_done(self, item: PendingEvent, outcome: Outcome) -> None:
        """Note what an event did; too many failures in a row move the Stoker elsewhere."""
        self.metrics.event_done(self.name, item.event, outcome)
        if outcome.ran:
            self._heard_token = item.token
        if outcome.error:
            self.last_error = outcome.error
        self._note_state(outcome)
        if not outcome.ran:
            return  # skipped, or never started: neither a success nor a failure
        if not outcome.failed:
            self.failures = 0
            self.election.failure_step_downs = 0
            return
        self.failures += 1
        if (
            item.event == "now_leader"
            and item.attempt > 1
            and outcome.kind in ("lost", "timeout")
            and self.election.term is not None
        ):
            # Dropped after its second loss: no event of this term ever ran and no timer
            # is armed, so the term would do nothing at all.  Let it start afresh.
            logger.error(
                "Stoker %s: now_leader was lost twice on %s; stepping down",
                self.name,
                self.hostname,
            )
            self.election.request_step_down("now_leader_lost")
            return
        limit = self.spec.max_failures
        if limit is not None and self.failures >= limit and self.election.term is not None:
            logger.error(
                "Stoker %s: %d events failed in a row on %s (max_failures=%d); stepping down",
                self.name,
                self.failures,
                self.hostname,
                limit,
            )
            self.election.request_step_down("too_many_failures")

    def _note_state(self, outcome: Outcome) -> None:
        """Track an unreadable stored state: said once per cause, shown until it reads again."""
        if outcome.unreadable:
            if self.state_error is None:
                self.state_error_since = time.time()
            self.state_error = outcome.error
            self.state_retries += 1
            self._say_unreadable(outcome.error)
        elif outcome.ran and self._state_error_said is not None:
            since = self.state_error_since
            logger.info(
                "Stoker %s: its stored state can be read again%s; events resume",
                self.name,
                f" (unreadable for {time.time() - since:.0f} s)" if since else "",
            )
            self.state_error = self.state_error_since = self._state_error_said = None
            self.state_retries = 0

    def _say_unreadable(self, error: str | None) -> None:
        """One ERROR per cause: the pump retries the event with backoff, quietly."""
        if error is not None and error != self._state_error_said:
            logger.error("%s", error)
            self._state_error_said = error


def _client(settings: StokerSettings, socket_timeout: float) -> redis.Redis:
    from .connection import redis_client

    return redis_client(
        settings.url,
        transport_options=settings.transport_options,
        socket_timeout=socket_timeout,
    )
