"""A prefork pool process that exits is replaced at once, not at the next pool maintenance.

Celery's prefork pool (``AsynPool``) learns that a pool process exited when
the process's sentinel (a pipe only the child holds open) becomes readable on
the worker's event loop.  It then stops watching that sentinel and runs its
pool maintenance once: reap the exited processes (``waitpid`` without
waiting), start their replacements, and give the jobs written to a dead one
to another.  But the kernel closes a process's files, the sentinel among
them, *before* it makes the process reapable; the maintenance that runs in
between finds the process still running and does nothing, and no one looks
again until Celery's maintenance timer, every 5 seconds.

A pool that recycles its processes (``--max-tasks-per-child``,
``worker_max_memory_per_child``) loses that race often: a process that ran
its last task exits a moment after its result, while the worker's loop is
idle and answers the sentinel at once.  Meanwhile the dead process's input
pipe still counts as a free slot (its last result marked it so), so the
next job -- a Stoker's event, or the user's own task -- is written to it and
waits there for the timer: a 0.5 s timer ran 8 to 10 times in 20 s instead
of 40, plain Celery tasks kept the same poor pace, and a leader stepping down
while its event waited so logged a broker loss that never happened.

:func:`reap_promptly` wraps that sentinel handler of one pool: when the
maintenance it ran left the exited process unreaped, it runs the maintenance
again a few milliseconds later (doubling, up to :data:`REAP_RETRY_MAX`),
until the process is reaped.  Reaping it is what Celery's timer would have
done, only seconds sooner: the replacement starts, and a job written to the
dead process goes to another one.
"""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger("celery_stoker.reaping")

#: First pause before looking again at an exited process that was not reapable yet.
REAP_RETRY_START = 0.002
#: Longest pause between looks; Celery's own maintenance (every 5 s) remains the backstop.
REAP_RETRY_MAX = 0.25
#: Looks at one exited process before leaving it to Celery's maintenance.
REAP_ATTEMPTS = 12


def reap_promptly(pool: Any) -> bool:
    """Make ``pool`` (Celery's prefork ``TaskPool``) reap its exited processes at once.

    Call it once the pool has started and before the worker's consumer
    registers the pool with its event loop (a worker bootstep that requires
    the Pool step).  True if installed; False for any other pool, which has
    no such sentinel (solo, threads, gevent, eventlet).
    """
    asynpool: Any = getattr(pool, "_pool", None)
    original = getattr(asynpool, "_event_process_exit", None)
    if original is None or not callable(getattr(asynpool, "maintain_pool", None)):
        return False
    if getattr(original, "stoker_reaps", False):
        return True

    def on_process_exit(hub: Any, proc: Any) -> None:
        original(hub, proc)
        if _unreaped(asynpool, proc):
            hub.call_later(REAP_RETRY_START, _look_again, asynpool, hub, proc, 1)

    on_process_exit.stoker_reaps = True  # type: ignore[attr-defined]
    # An attribute of this pool object: Celery looks the handler up on the pool each
    # time it watches a new process (``_track_child_process``).
    asynpool._event_process_exit = on_process_exit
    return True


def _unreaped(asynpool: Any, proc: Any) -> bool:
    """True while ``proc`` is still one of the pool's processes (exited, not reaped)."""
    return any(p is proc for p in getattr(asynpool, "_pool", ()))


def _look_again(asynpool: Any, hub: Any, proc: Any, attempt: int) -> None:
    """Run the pool's maintenance again; once more later if ``proc`` is still not reaped."""
    if not _unreaped(asynpool, proc):
        return
    try:
        asynpool.maintain_pool()
    except Exception as exc:  # Celery's own maintenance timer meets it too, and handles it
        logger.debug("celery-stoker: pool maintenance for pid %s failed: %r", proc.pid, exc)
        return
    if _unreaped(asynpool, proc) and attempt < REAP_ATTEMPTS:
        delay = min(REAP_RETRY_START * 2**attempt, REAP_RETRY_MAX)
        hub.call_later(delay, _look_again, asynpool, hub, proc, attempt + 1)
