"""What became of one event: the words the leader's pump and the pool share.

An event travels from the pump (``pump.py``) to the pool as the task
:data:`DISPATCH_TASK` (``dispatch.py``), and its :class:`Outcome` comes back
as a report (``reports.py``), or is told by Celery or the watchdog
(``watch.py``).  Both sides need these two names, so they live here, below
both: neither side imports the other for them.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

#: The internal task that runs one event of a Stoker in the worker's pool.
DISPATCH_TASK = "celery_stoker.dispatch"

#: What became of an event: ``ok`` (ran, no error), ``error`` (a callback raised,
#: or its state could not be stored), ``lost`` (the pool process running it died)
#: and ``timeout`` (a hard time limit killed it).
OUTCOMES = ("ok", "error", "lost", "timeout")


@dataclass
class Outcome:
    """What running one event did; sent back to the leader's pump as JSON."""

    seq: int
    token: int
    ran: bool
    name: str = ""
    committed: bool = False
    #: The commit was refused because another commit came after this event read
    #: the state (a late event): nothing was written.
    stale: bool = False
    next_timer: float | None = None
    timer_error: bool = False
    error: str | None = None
    #: ``init()`` raised: the event never reached the Stoker and is sent again later.
    init_failed: bool = False
    #: The stored state could not be read (another serializer wrote it, or foreign
    #: bytes): no callback ran, nothing was written, and the same event is sent again
    #: with backoff (``error`` says why and what to do).
    unreadable: bool = False
    #: One of :data:`OUTCOMES`.
    kind: str = "ok"
    #: Seconds the callbacks took, measured where they ran.
    runtime: float | None = None
    # No copy of the state: the worker keeps its own (``copies.py``), so a state costs
    # one read and one write in Redis per event, not two of each.

    @property
    def failed(self) -> bool:
        """True for an event that counts toward ``max_failures``."""
        return self.kind != "ok"

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, raw: bytes | str) -> Outcome | None:
        """Parse a report; None for anything that is not one."""
        try:
            data = json.loads(raw)
            fields = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
            return cls(**fields)
        except (ValueError, TypeError, KeyError):
            return None
