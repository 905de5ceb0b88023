"""One activator per (worker, Stoker): the follower/leader state machine.

It is ``Stoker.Activator`` with a Redis lease in place of ``:global``:

* **follower**: try the lease; if someone holds it, note who and wait until
  that lease is released (woken at once) or would expire;
* **leader**: renew every ``renew_interval``; raise ``now_leader`` first, then
  ``cluster_change`` and ``timer`` events, sent one at a time to the pool;
* **step down**: on a failed or late renewal (``lease_lost``) or a stop
  (``worker_stopping``): stop sending events, run ``shutdown`` here, and
  release the lease (when it is still ours) so a follower takes over at once.

One named thread per activator, ``stoker-lease:<name>``, runs the election and
never waits on the broker or the pool, so renewals are never late because the
worker is busy.  Events travel through the worker's one event pump
(``pump.py``), which sends them, keeps the timers and learns when each is
over; the activator tells it when a term starts and stops acting, and hears
back after each event (:meth:`Activator.event_done`), which is where
``max_failures`` is counted.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

import redis

from .dispatch import DISPATCH_TASK, EVENT_MESSAGE_EXPIRES, Outcome, run_event
from .lease import Holder, LeaseListener, RedisLease, Term
from .pump import EventPump, PendingEvent
from .settings import StokerSettings
from .stoker import Stoker, StokerContext, StokerSpec
from .store import StokerStore

if TYPE_CHECKING:
    from celery import Celery

logger = logging.getLogger("celery_stoker.activator")

REDIS_DOWN = (redis.ConnectionError, redis.TimeoutError, OSError)
#: Backoff while Redis is unreachable: first try, and the most between tries.
BACKOFF_START = 0.05
BACKOFF_MAX = 0.5
#: A renewal may take a reconnect and the command, each up to the socket timeout:
#: a holder with less validity left than this many timeouts steps down instead.
RENEW_ATTEMPT = 2
#: After a ``too_many_failures`` step-down this worker leaves the Stoker to others
#: for one lease TTL, doubling on each repeat up to this (or one TTL, if longer).
FAILURE_COOLDOWN_MAX = 300.0


def _iso(ts: float | None) -> str | None:
    return datetime.fromtimestamp(ts, timezone.utc).isoformat() if ts else None


class Activator:
    """Elects, holds and hands over the lease of one Stoker on one worker."""

    def __init__(
        self,
        app: Celery,
        spec: StokerSpec,
        settings: StokerSettings,
        *,
        hostname: str,
        queue_name: str,
        listener: LeaseListener | None,
        members: Callable[[], frozenset[str]],
        holder_id: str,
        pump: EventPump,
        client: redis.Redis | None = None,
        eligible: bool = True,
        min_members: int = 1,
        emit: Callable[..., None] | None = None,
    ) -> None:
        self.app = app
        self.spec = spec
        self.name = spec.name
        self.settings = settings
        self.hostname = hostname
        self.queue_name = queue_name
        self._members = members
        self.eligible = eligible
        self.min_members = min_members
        self._emit = emit or (lambda *args, **kwargs: None)
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
        )
        self.store = StokerStore(
            self.client,
            spec.name,
            key_prefix=settings.key_prefix,
            serializer=settings.state_serializer,
        )

        # What dump() shows, as in the original's state map.
        self.state = "unk"
        self.created_at = time.time()
        self.active_from: float | None = None
        self.leader: str | None = None
        self.leader_token: int | None = None
        self.last_event: str | None = None
        self.last_event_at: float | None = None
        self.last_error: str | None = None
        self.highest_token = 0
        self.terms_won = 0
        self.draining = False
        #: True while this leader holds the lease but sees fewer than min_members.
        self.suspended = False
        #: After giving leadership away, do not take it straight back (monotonic).
        self._cooldown_until = 0.0
        #: A term that found Redis without history acts only from then (see _quarantine).
        self._act_not_before = 0.0
        #: Whether the current term has acted yet (resuming vs. starting).
        self._acted = False
        #: When Redis last answered an election command (monotonic).
        self._redis_ok_at = 0.0
        #: When the holder renews next (monotonic); moved earlier to retry after an error.
        self._renew_at = 0.0
        self._last_error_text: str | None = None
        self._record_error: str | None = None
        #: The last state our events committed (see Outcome.state) and its version.
        self._state_cache: tuple[str, str, str] | None = None
        self._state_version: int | None = None
        #: Consecutive failed events (max_failures), and step-downs they caused.
        self.failures = 0
        self._failure_step_downs = 0
        #: Set by the pump's thread when this worker should give the Stoker up.
        self._step_down_request: str | None = None
        #: The election loop's current fault, shown in status until it clears.
        self.election_error: str | None = None
        self.election_error_since: float | None = None
        #: This process's own instance, for the in-process leader hooks.
        self._local: Stoker | None = None

        self._term: Term | None = None
        #: False from the moment a leader starts stepping down: no new events.
        self._accepting = False
        self._stop = threading.Event()
        self._stop_reason = "worker_stopping"
        self._redis_down_since: float | None = None
        self._foreign_logged: bytes | None = None
        self._thread: threading.Thread | None = None

    # ----------------------------------------------------------------- control

    def start(self) -> None:
        """Start the election thread (events go through the worker's pump)."""
        self.pump.add_lane(self)
        self._thread = threading.Thread(
            target=self._run_election, name=f"stoker-lease:{self.name}", daemon=True
        )
        self._thread.start()

    def request_stop(self, reason: str = "worker_stopping") -> None:
        """Begin stepping down now, without waiting (safe from a signal handler)."""
        if not self._stop.is_set():
            self._stop_reason = reason
            self._stop.set()
            self.lease.wake()

    def stop(self, timeout: float = 10.0) -> bool:
        """Step down (release if leader) and stop the election thread.

        Returns False if it did not finish within ``timeout`` (a ``shutdown`` or
        ``leader_stopping`` that hangs): the caller goes on without it; the lease,
        no longer renewed, expires within one TTL.
        """
        self.request_stop(self._stop_reason)
        if self._thread is not None:
            self._thread.join(max(0.0, timeout))
            if self._thread.is_alive():
                return False
        self.lease.close()
        return True

    def request_step_down(self, reason: str) -> None:
        """Ask the election thread to step down and release now (from any thread)."""
        self._step_down_request = reason
        self.lease.poke_local()

    def on_cluster_change(self, node: str, change: str) -> None:
        """A worker joined, left or was lost: the leader's Stoker hears of it."""
        term = self._term
        if term is not None and self._accepting:
            self.pump.submit(
                self.name, term.token, "cluster_change", {"node": node, "change": change}
            )
        if self._term is not None and self.min_members > 1:
            self.lease.poke_local()  # the election thread re-checks the quorum now

    def snapshot(self) -> dict[str, Any]:
        """This activator's fields, as the original's ``dump/1`` shows them."""
        term = self._term
        return {
            "name": self.name,
            "state": self.state,
            "current_node": self.hostname,
            "created_at": _iso(self.created_at),
            "active_from": _iso(self.active_from),
            "leader": self.leader,
            "token": term.token if term else self.leader_token,
            "lease_time_left": round(term.time_left(), 3) if term else None,
            "last_event": self.last_event,
            "last_event_at": _iso(self.last_event_at),
            "last_error": self.last_error,
            "terms_won": self.terms_won,
            "eligible": self.eligible,
            "draining": self.draining,
            "suspended": self.suspended,
            "min_members": self.min_members,
            "lease_ttl": self.settings.lease_ttl,
            "renew_interval": self.settings.renew_interval,
            "running_event": self._running_event(),
            "failures": self.failures,
            "max_failures": self.spec.max_failures,
            "soft_time_limit": self.settings.soft_time_limit,
            "time_limit": self.settings.time_limit,
            "health": self.health(),
        }

    def health(self) -> dict[str, Any]:
        """``ok`` or the fault this activator (or the worker's pump) is in, since when."""
        error, since = self.election_error, self.election_error_since
        if error is None and self.pump.error is not None:
            error, since = f"event pump: {self.pump.error}", self.pump.error_since
        return {"status": "ok" if error is None else "error", "error": error, "since": _iso(since)}

    def _running_event(self) -> dict[str, Any] | None:
        running = self.pump.running(self.name)
        if running is None:
            return None
        started = running.pop("started_at")
        running["started_at"] = _iso(started)
        running["running_for"] = round(time.time() - started, 1) if started else None
        return running

    # ---------------------------------------------------------------- election

    def _run_election(self) -> None:
        if not self.eligible:
            self.state = "ineligible"
            logger.info("Stoker %s: %s may not lead it (eligible=...)", self.name, self.hostname)
            self._stop.wait()
            return
        backoff = BACKOFF_START
        while not self._stop.is_set():
            try:
                if self._term is None:
                    self._follow()
                else:
                    self._hold()
                backoff = BACKOFF_START
                self._last_error_text = None
                if self.election_error is not None:
                    logger.warning("Stoker %s: election working again", self.name)
                    self.election_error = self.election_error_since = None
                if self._redis_ok_at > (self._redis_down_since or float("inf")):
                    self._redis_back()
            except REDIS_DOWN as exc:
                self._redis_down(exc)
                self._note_election_error(exc)
                self._after_error(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX)
            except Exception as exc:
                # A refusal such as OOM, NOPERM or READONLY, or a bug: log it once, not
                # per retry; status shows it until it clears.
                text = f"{exc.__class__.__name__}: {exc}"
                if text != self._last_error_text:
                    logger.exception("Stoker %s: election error (%s); retrying", self.name, text)
                    self._last_error_text = text
                self._note_election_error(exc)
                self._after_error(BACKOFF_MAX)
        try:
            if self._term is not None:
                self._step_down(self._stop_reason, release=True)
        except Exception:
            logger.exception("Stoker %s: error while stepping down at stop", self.name)
        self.state = "unk"

    def _note_election_error(self, exc: BaseException) -> None:
        self.election_error = f"{exc.__class__.__name__}: {exc}"
        if self.election_error_since is None:
            self.election_error_since = time.time()

    def _after_error(self, backoff: float) -> None:
        """Wait before the next try; a leader retries its renewal, never past its lease."""
        term = self._term
        if term is None:
            self._stop.wait(backoff)
            return
        wait = min(backoff, term.time_left() - RENEW_ATTEMPT * self.settings.socket_timeout)
        self._stop.wait(max(0.0, wait))
        self._renew_at = time.monotonic()  # retry the renewal now; _hold steps down if too late

    def _follow(self) -> None:
        cooldown = self._cooldown_until - time.monotonic()
        if cooldown > 0:
            # We just gave leadership away: let another worker take it first (a release,
            # even our own, must not cut this short).
            self._stop.wait(cooldown)
            self._cooldown_until = 0.0
            return
        result = self.lease.acquire(min_token=self.highest_token)
        self._redis_ok_at = time.monotonic()
        if result.term is not None:
            self._become_leader(result.term)
            return
        holder = result.holder
        self._note_holder(holder)
        self.state = "follower"
        if result.draining != self.draining:
            self.draining = result.draining
            logger.warning(
                "Stoker %s: %s is %s",
                self.name,
                self.hostname,
                "draining: it will not lead" if self.draining else "no longer draining",
            )
        timeout = self.lease.wait_timeout(holder) if holder is not None else 0.0
        if self.draining:
            timeout = max(timeout, self.settings.lease_ttl)
        self.lease.wait(timeout)

    def _note_holder(self, holder: Holder | None) -> None:
        if holder is None:
            return
        if holder.foreign:
            if holder.raw != self._foreign_logged:
                logger.error(
                    "Stoker %s: the lease key %s holds a value celery-stoker did not write "
                    "(%r); no worker can lead until it expires or is deleted",
                    self.name,
                    self.lease.lease_key,
                    holder.raw[:80],
                )
                self._foreign_logged = holder.raw
            self.leader = None
            return
        self._foreign_logged = None
        if holder.reserved_for is not None:
            self.leader = None  # handed over, not yet taken by the worker it is kept for
            return
        if holder.hostname != self.leader:
            logger.info(
                "Stoker %s: following %s (token %s)", self.name, holder.hostname, holder.token
            )
        self.leader = holder.hostname
        self.leader_token = holder.token
        self.highest_token = max(self.highest_token, holder.token or 0)

    def _become_leader(self, term: Term) -> None:
        self.suspended = True  # not acting until _check_acting says so
        self._term = term
        self._accepting = False
        self._acted = False
        self._renew_at = time.monotonic() + self.settings.renew_interval
        self.highest_token = max(self.highest_token, term.token)
        self.state = "leader"
        self.leader = self.hostname
        self.leader_token = term.token
        self.active_from = time.time()
        self.terms_won += 1
        logger.warning(
            "Stoker %s: %s became leader (token %d)", self.name, self.hostname, term.token
        )
        members = sorted(self._members())
        self._record(
            {
                "leader": self.hostname,
                "token": term.token,
                "active_from": self.active_from,
                "followers": [m for m in members if m != self.hostname],
            },
            transition={
                "at": self.active_from,
                "event": "elected",
                "node": self.hostname,
                "token": term.token,
            },
        )
        try:
            self._state_cache, self._state_version = self.store.load_portable()
        except REDIS_DOWN:
            self._state_cache = self._state_version = None
        self.draining = False
        self._emit("stoker-elected", name=self.name, token=term.token)
        self._act_not_before = time.monotonic() + self._quarantine(term)
        if len(self._members()) < self.min_members:
            self._suspend(term)
        self._check_acting(term)

    def _quarantine(self, term: Term) -> float:
        """How long a term that found Redis without its history must wait before acting.

        The fencing counter never expires, so a missing one means Redis lost its
        data (a restart without persistence, a flush) or this is the first
        election ever.  Either way an earlier leader may still count its lease
        valid on its own clock: its last renewal came before Redis started, so
        its term is surely over ``ttl`` after that.  Waiting ``ttl - uptime``
        keeps two leaders from acting at once, and costs nothing on a Redis
        that has been up longer than one TTL.
        """
        if not term.fresh:
            return 0.0
        try:
            uptime = float(self.client.info("server").get("uptime_in_seconds", 0))
        except (redis.RedisError, OSError, ValueError):
            uptime = 0.0
        wait = max(0.0, self.settings.lease_ttl - uptime)
        if wait > 0:
            logger.warning(
                "Stoker %s: Redis holds no record of earlier terms (restarted empty?); %s "
                "holds the lease but acts in %.1f s, once any earlier leader's term is over",
                self.name,
                self.hostname,
                wait,
            )
        return wait

    def _start_acting(self, term: Term) -> None:
        """Begin the term's work: the hook, then now_leader as the term's first event."""
        self.suspended = False
        self._acted = True
        self._call_local(term, "leader_started")
        # Queued before events are accepted, so a cluster_change that arrives meanwhile
        # can never come first (now_leader carries the current members anyway).
        self.pump.begin_term(self.name, term.token)
        self._accepting = True

    def _suspend(self, term: Term) -> None:
        """Hold the lease but stop acting: too few workers are visible (min_members)."""
        self.suspended = True
        logger.warning(
            "Stoker %s: %s sees %d of the %d workers it needs; not acting until it sees more",
            self.name,
            self.hostname,
            len(self._members()),
            self.min_members,
        )
        self._emit("stoker-suspended", name=self.name, token=term.token)

    def _check_acting(self, term: Term) -> None:
        """Start or stop acting on the held term: quarantine over, enough workers seen."""
        enough = len(self._members()) >= self.min_members
        may_start = time.monotonic() >= self._act_not_before and (
            term.time_left() > RENEW_ATTEMPT * self.settings.socket_timeout
        )
        if self.suspended and enough and may_start:
            if self._acted:
                logger.warning("Stoker %s: enough workers again; acting", self.name)
                self._emit("stoker-resumed", name=self.name, token=term.token)
            self._start_acting(term)
        elif not self.suspended and not enough:
            self._accepting = False
            self.pump.end_term(self.name)
            self.pump.wait_idle(self.name, min(self._event_grace, term.time_left() / 2))
            self._suspend(term)
            self._call_local(term, "leader_stopping", "below_min_members")
            self._deliver_shutdown(term, "below_min_members", lost=False)

    def _hold(self) -> None:
        term = self._term
        assert term is not None
        while not self._stop.is_set():
            renew_at = self._renew_at
            self._check_acting(term)
            left = term.time_left()
            if left <= RENEW_ATTEMPT * self.settings.socket_timeout:
                # A renewal sent now might answer after our lease ends: stop acting first.
                self._step_down("lease_lost", release=False)
                return
            now = time.monotonic()
            if now >= renew_at:
                break
            wait = min(renew_at - now, left - self.settings.socket_timeout)
            if self.suspended and self._act_not_before > now:
                wait = min(wait, self._act_not_before - now)
            if self.lease.wait_poked(wait) and self.lease.poked_by_operator():
                break  # an operator asked: renew now and hear why
            if self._step_down_request is not None:
                break
        if self._stop.is_set():
            return
        if self._step_down_request is not None:
            reason, self._step_down_request = self._step_down_request, None
            self._step_down(reason, release=True)
            self._failure_step_downs += 1
            ttl = self.settings.lease_ttl
            cooldown = min(
                ttl * 2 ** (self._failure_step_downs - 1), max(ttl, FAILURE_COOLDOWN_MAX)
            )
            self._cooldown_until = time.monotonic() + cooldown
            logger.warning(
                "Stoker %s: %s leaves it to other workers for %.1f s",
                self.name,
                self.hostname,
                cooldown,
            )
            return
        renewed = self.lease.renew(term)
        self._redis_ok_at = time.monotonic()
        self._renew_at = self._redis_ok_at + self.settings.renew_interval
        if not renewed:
            self._step_down("lease_lost", release=False)
            return
        request = self.lease.step_down_request
        if request is not None:
            kind, to = request
            self._step_down(kind, release=True, reserve_for=to)
            self._cooldown_until = time.monotonic() + self.settings.lease_ttl

    def _step_down(self, reason: str, *, release: bool, reserve_for: str | None = None) -> None:
        """Stop acting on the current term: no more events, ``shutdown`` here, then release."""
        term = self._term
        if term is None:
            return
        self._accepting = False
        self.pump.end_term(self.name)
        self.failures = 0
        logger.warning("Stoker %s: %s steps down (%s)", self.name, self.hostname, reason)
        if release:
            self._finish_running_event(term)
            with contextlib.suppress(redis.RedisError):
                # From here no event of this term may start in the pool (one already
                # running was waited for above): shutdown is the term's last event.
                # (After a loss there is no time for this: the term ends in Redis soon.)
                ttl_ms = max(1, round(self.settings.lease_ttl * 1000))
                self.store.mark_closing(term.token, ttl_ms)
        self._term = None
        self.state = "follower"
        self.active_from = None
        was_suspended, self.suspended = self.suspended, False
        if not was_suspended:  # a suspended leader already said shutdown
            self._call_local(term, "leader_stopping", reason)
            self._deliver_shutdown(term, reason, lost=not release)
        if release:
            try:
                if self.lease.release(term, reserve_for=reserve_for):
                    logger.info("Stoker %s: lease released (token %d)", self.name, term.token)
            except REDIS_DOWN as exc:
                logger.warning(
                    "Stoker %s: could not release the lease (%s); it expires in %.1f s",
                    self.name,
                    exc.__class__.__name__,
                    self.settings.lease_ttl,
                )
        self._record(
            None,
            transition={
                "at": time.time(),
                "event": "stepped_down",
                "node": self.hostname,
                "token": term.token,
                "reason": reason,
                **({"to": reserve_for} if reserve_for else {}),
            },
        )
        self._emit(
            "stoker-stepped-down", name=self.name, token=term.token, reason=reason, to=reserve_for
        )

    def _finish_running_event(self, term: Term) -> None:
        """Let an event already in the pool finish before ``shutdown`` (one at a time).

        At most :attr:`_event_grace`; the lease is renewed meanwhile, so a long
        TTL is not needed for this.
        """
        deadline = time.monotonic() + self._event_grace
        while not self.pump.wait_idle(self.name, 0):
            margin = term.time_left() - RENEW_ATTEMPT * self.settings.socket_timeout
            wait = min(deadline - time.monotonic(), self.settings.renew_interval, margin)
            if wait <= 0 or self.pump.wait_idle(self.name, wait):
                break
            with contextlib.suppress(redis.RedisError):
                if not self.lease.renew(term):
                    return
        with contextlib.suppress(redis.RedisError):
            self.lease.renew(term)  # a full TTL for shutdown and the release

    @property
    def _event_grace(self) -> float:
        """Longest a stepping-down leader waits for its event in the pool: half the stop budget.

        Its ``shutdown`` comes after that event, so the two never overlap unless
        the event outlives this; then its late commit is refused (see ``store``).
        """
        return self.settings.stop_timeout / 2

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

    def _deliver_shutdown(self, term: Term, reason: str, *, lost: bool) -> None:
        """Run ``shutdown`` in this process: the pool may be draining, the broker gone."""
        self.last_event, self.last_event_at = "shutdown", time.time()
        try:
            outcome = run_event(
                self.app,
                self.spec,
                seq=self.pump.next_seq(),
                token=term.token,
                event="shutdown",
                reason=reason,
                hostname=self.hostname,
                members=self._members(),
                # Delivered even when the term just ran out: it tells the Stoker to
                # stop acting.  Its state write is still fenced by the token.
                check_current=False,
                cached_state=self._state_cache,
                cached_version=self._state_version,
                # A lost term must hear shutdown before Redis can hand the lease on:
                # start from our copy of the state, ask Redis nothing first.
                prefer_cached=lost,
                client=self.client,
            )
            self.last_error = outcome.error or self.last_error
        except Exception as exc:
            logger.warning(
                "Stoker %s: shutdown not delivered (%s)",
                self.name,
                exc.__class__.__name__,
            )

    def _record(self, info: dict[str, Any] | None, transition: dict[str, Any]) -> None:
        """Write the cluster record and a transition; a refusal never stops the election."""
        try:
            if info is not None and self._term is not None:
                self.store.commit(self._term.token, None, info)
            self.store.record_transition(transition)
        except REDIS_DOWN:
            pass
        except redis.RedisError as exc:
            text = str(exc)
            if text != self._record_error:
                logger.error(
                    "Stoker %s: could not write its record in Redis (%s); leadership is "
                    "unaffected, dump() and status may be stale",
                    self.name,
                    text,
                )
                self._record_error = text

    def _redis_down(self, exc: BaseException) -> None:
        if self._redis_down_since is None:
            self._redis_down_since = time.monotonic()
            logger.warning(
                "Stoker %s: Redis at %s unreachable (%s: %s); retrying with backoff",
                self.name,
                self.settings.masked_url,
                exc.__class__.__name__,
                exc,
            )

    def _redis_back(self) -> None:
        if self._redis_down_since is not None:
            logger.warning(
                "Stoker %s: Redis reachable again after %.1f s",
                self.name,
                time.monotonic() - self._redis_down_since,
            )
            self._redis_down_since = None

    # ------------------------------------------------------------------ events
    # Called by the worker's pump, on its thread.

    def acting_token(self) -> int | None:
        """The token of the term that may send events now, or None."""
        term = self._term
        if term is None or not self._accepting or not term.is_valid():
            return None
        return term.token

    def send_event(self, item: PendingEvent, task_id: str) -> None:
        """Send ``item`` to this worker's own queue as the dispatch task."""
        self.last_event, self.last_event_at = item.event, time.time()
        self.app.send_task(
            DISPATCH_TASK,
            args=[
                self.name,
                item.token,
                item.seq,
                item.event,
                item.reason,
                sorted(self._members()),
                self.hostname,
            ],
            task_id=task_id,
            queue=self.queue_name,
            expires=EVENT_MESSAGE_EXPIRES,
            ignore_result=True,
            soft_time_limit=self.settings.soft_time_limit,
            time_limit=self.settings.time_limit,
        )

    def event_done(self, item: PendingEvent, outcome: Outcome) -> None:
        """Note what an event did; too many failures in a row move the Stoker elsewhere."""
        if outcome.error:
            self.last_error = outcome.error
        if outcome.state is not None:
            self._state_cache, self._state_version = outcome.state, outcome.version
        if not outcome.ran and outcome.kind == "ok":
            return  # skipped (its term was ending): neither a success nor a failure
        if not outcome.failed:
            self.failures = 0
            self._failure_step_downs = 0
            return
        self.failures += 1
        limit = self.spec.max_failures
        if limit is not None and self.failures >= limit and self._term is not None:
            logger.error(
                "Stoker %s: %d events failed in a row on %s (max_failures=%d); stepping down",
                self.name,
                self.failures,
                self.hostname,
                limit,
            )
            self.request_step_down("too_many_failures")


def _client(settings: StokerSettings, socket_timeout: float) -> redis.Redis:
    from .connection import redis_client

    return redis_client(
        settings.url,
        transport_options=settings.transport_options,
        socket_timeout=socket_timeout,
    )
