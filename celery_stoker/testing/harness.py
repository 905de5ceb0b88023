"""``StokerHarness``: drive one Stoker in the test's own process, with no Redis and no worker.

It runs each event through the very function a worker's pool runs
(``callbacks.run_callbacks``), against a state store kept in memory instead of
Redis, so a test sees what production does: ``init()`` only when nothing is
stored, the state round-tripped through the serializer after every event,
``next_timer_in`` checked the same way, fenced commits, and a new term that
carries the stored state on.  Unlike a worker it does not swallow the
Stoker's mistakes: an exception raised by a callback, or a state the
serializer cannot store, reaches the test, and the stored state stays as it was.

    harness = StokerHarness(Poller, members=("w1@test", "w2@test"))
    harness.elect()                      # init(), then now_leader
    harness.timer()
    assert harness.state == {"seen": 1}
    assert harness.next_timer == 30.0
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from typing import Any

from ..callbacks import EventCall, run_callbacks
from ..outcome import Outcome
from ..registry import StokerSpec
from ..stoker import Stoker, StokerContext
from ..store import Commit, StoredState, decode_state, encode_state

#: The changes a ``cluster_change`` reason may name, as gossip reports them.
CHANGES = ("joined", "left", "lost")


class MemoryStore:
    """One Stoker's state and terms in memory, with the Redis store's fencing rules."""

    def __init__(self, name: str, serializer: str) -> None:
        self.name = name
        self.serializer = serializer
        #: The current term's token, and whether it still takes events.
        self.token: int | None = None
        self.open = False
        self.encoded: tuple[str, str, bytes | str] | None = None
        self.version = 0
        self.info: dict[str, Any] = {}
        #: Never set here: a memory store loses no history.
        self.history_lost: tuple[int, int] | None = None

    def term_accepts_events(self, token: int) -> bool:
        return self.open and token == self.token

    def load(self) -> StoredState:
        if self.encoded is None:
            return StoredState(found=False)
        value = decode_state(self.name, self.serializer, self.encoded, where="memory")
        return StoredState(True, value, self.token, self.version)

    def encode(self, value: Any) -> tuple[str, str, bytes | str]:
        return encode_state(self.name, self.serializer, value)

    def commit(
        self,
        token: int,
        encoded: tuple[str, str, bytes | str] | None,
        info: dict[str, Any],
        *,
        version: int | None = None,
    ) -> Commit:
        if token != self.token:
            return Commit.STALE_TERM
        if encoded is not None and version is not None and version != self.version:
            return Commit.STALE_STATE
        if encoded is not None:
            self.encoded, self.version = encoded, self.version + 1
        self.info.update(info)
        return Commit.STORED


class StokerHarness:
    """One Stoker, driven event by event as a leader worker would (see the module docstring).

    ``cls`` is a :class:`~celery_stoker.Stoker` subclass, registered with
    ``@stoker`` or not.  ``members`` is what ``self.context.members`` holds (it
    follows the cluster changes you send); ``hostname`` is this "worker";
    ``serializer`` is ``stoker_state_serializer``.
    """

    def __init__(
        self,
        cls: type[Stoker],
        *,
        members: Iterable[str] = ("w1@test",),
        serializer: str = "json",
        hostname: str = "w1@test",
    ) -> None:
        name = getattr(cls, "stoker_name", None) or f"{cls.__module__}.{cls.__qualname__}"
        self.spec = StokerSpec(name, cls)
        self.hostname = hostname
        self.members = set(members) | {hostname}
        self.store = MemoryStore(name, serializer)
        #: The one instance, as a pool process keeps one for every event.
        self.instance = cls()
        #: Every ``(event, reason)`` the Stoker received, in order.
        self.events: list[tuple[str, Any]] = []
        received = self.instance.event

        def event(state: Any, event: str, reason: Any) -> Any:
            self.events.append((event, reason))
            return received(state, event, reason)

        self.instance.event = event  # type: ignore[method-assign]
        #: What ``next_timer_in`` answered last (seconds, or None).
        self.next_timer: float | None = None
        #: The outcome of the last event (as a worker's pump would see it).
        self.outcome: Outcome | None = None
        self._tokens = itertools.count(1)
        self._seq = itertools.count(1)

    # ----------------------------------------------------------------- what a test reads

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def token(self) -> int | None:
        """The current (or last) term's fencing token."""
        return self.store.token

    @property
    def state(self) -> Any:
        """The stored state, decoded from what the serializer stored (None before any)."""
        return self.store.load().value

    @property
    def context(self) -> StokerContext | None:
        """The :class:`StokerContext` of the last call."""
        return getattr(self.instance, "context", None)

    @property
    def leading(self) -> bool:
        """True between :meth:`elect` and :meth:`shutdown`."""
        return self.store.open

    # --------------------------------------------------------------------- driving

    def elect(self) -> Outcome:
        """A new term, its token above every earlier one: ``init()`` if needed, ``now_leader``."""
        if self.store.open:
            raise RuntimeError(
                f"Stoker {self.name!r} already leads (token {self.store.token}); call "
                "shutdown() before electing it again"
            )
        self.store.token = next(self._tokens) + (self.store.token or 0)
        self.store.open = True
        return self._run("now_leader", None)

    def timer(self) -> Outcome:
        """A ``timer`` event (a worker sends it ``next_timer`` seconds after the last event)."""
        return self._run("timer", None)

    def cluster_change(self, node: str, change: str) -> Outcome:
        """``node`` ``"joined"``, ``"left"`` or was ``"lost"``; ``members`` follows."""
        if change not in CHANGES:
            raise ValueError(f"change must be one of {CHANGES}, got {change!r}")
        if change == "joined":
            self.members.add(node)
        else:
            self.members.discard(node)
        return self._run("cluster_change", {"node": node, "change": change})

    def shutdown(self, reason: str = "worker_stopping") -> Outcome:
        """The term ends: ``shutdown`` with ``reason``, as the stepping-down worker delivers it."""
        outcome = self._run("shutdown", reason, check_current=False)
        self.store.open = False
        return outcome

    def _run(self, event: str, reason: Any, *, check_current: bool = True) -> Outcome:
        if not self.store.open:
            raise RuntimeError(
                f"Stoker {self.name!r} does not lead: call elect() before sending {event}"
            )
        call = EventCall(
            seq=next(self._seq),
            token=self.store.token or 0,
            event=event,
            reason=reason,
            hostname=self.hostname,
            members=frozenset(self.members),
            check_current=check_current,
        )
        outcome = run_callbacks(self.store, self.instance, self.spec, call, reraise=True)
        self.outcome = outcome
        self.next_timer = outcome.next_timer
        return outcome
