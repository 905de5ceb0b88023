"""The callback contract: the :class:`Stoker` base class, its context and its events.

A Stoker is the user's code that must run on exactly one worker at a time.  As
in the Elixir original, it is a small state machine: ``init()`` gives the first
state, ``event(state, event, reason)`` returns the next one, and
``next_timer_in(state)`` says when the next ``timer`` event is due.  The state
is stored in Redis, so a new leader carries on where the old one stopped.
Registering one (``@stoker``) is ``registry.py``'s.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

#: The four events a Stoker receives, as in ``Stoker.Activator``.
EVENTS = ("now_leader", "cluster_change", "timer", "shutdown")


@dataclass(frozen=True)
class StokerContext:
    """What a callback knows about where and under which term it runs.

    ``token`` is the fencing token of the current leadership term: pass it to
    any external system that can refuse writes from an older term.
    """

    name: str
    hostname: str
    token: int
    members: frozenset[str] = field(default_factory=frozenset)
    #: True in a ``shutdown`` whose term Redis no longer holds (another term took the
    #: lease, or it vanished): the callback still runs, but its state is not stored.
    stale: bool = False
    #: True in every callback of a term that found Redis holding less history than the
    #: fleet had seen (restored from an older snapshot, a replica promoted without the
    #: last writes): the state it was given may be older than the last one committed,
    #: so work done since then may be done again.  The term waited a whole lease TTL
    #: before its first callback.
    history_lost: bool = False


class Stoker:
    """Base class of a leader-only job.

    Subclass it, implement :meth:`event`, and decorate the class with
    :func:`stoker`.  The callbacks run as Celery tasks on the leader worker, one
    at a time and in order; ``self.context`` is set before each call.  Keep
    anything that must survive a failover in the returned state (it is
    serialized with ``stoker_state_serializer``, JSON by default).
    """

    #: Set by the dispatcher before each callback.
    context: StokerContext

    def init(self) -> Any:
        """The first state, used when Redis holds no state for this Stoker yet."""
        return None

    def event(self, state: Any, event: str, reason: Any) -> Any:
        """Handle ``event`` (one of :data:`EVENTS`) and return the new state."""
        raise NotImplementedError

    def next_timer_in(self, state: Any) -> float | None:
        """Seconds until the next ``timer`` event, or None for no timer."""
        return None

    @classmethod
    def check_settings(cls, app: Any) -> None:
        """Check this Stoker's own settings when a worker starts, before any election.

        Raise ``StokerConfigurationError`` naming the setting and the fix: the
        worker then stops at start, as it does for a bad ``stoker_*`` value.
        Every worker runs it, followers too, in its main process: read the
        configuration here, touch no external store.
        """

    # In-process hooks: for work that must live in the worker's main process for
    # the whole term (a thread such as the beat service, a socket), where a pool
    # task cannot keep it.  They run on the activator's thread and must be quick.

    def leader_started(self) -> None:
        """Called in the leader worker's main process when a term begins, before ``now_leader``."""

    def leader_stopping(self, reason: str) -> None:
        """Called in the main process when the term ends, before ``shutdown`` and the release.

        Stop here whatever :meth:`leader_started` started; return only once it stopped.
        """
