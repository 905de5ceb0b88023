"""Kill, at interpreter exit, every process the helpers started and nobody stopped.

A crashed test run, a Ctrl-C in a benchmark or a demo that raised must never leave a
``redis-server`` holding a port or a worker electing itself leader on a developer's
machine.  Servers and workers register here when they start and unregister when they are
stopped; whatever is still registered at exit gets ``kill()``.
"""

from __future__ import annotations

import atexit
import contextlib
import weakref
from typing import Protocol


class Killable(Protocol):
    def kill(self) -> None: ...


# Weak: a helper that was garbage-collected has no process left to kill (or lost its handle).
_LIVE: weakref.WeakSet[Killable] = weakref.WeakSet()


def track(process: Killable) -> None:
    """``process`` has a live child now: kill it at exit unless :func:`forget` comes first."""
    _LIVE.add(process)


def forget(process: Killable) -> None:
    """``process`` was stopped by its owner: nothing to do at exit."""
    _LIVE.discard(process)


@atexit.register
def _kill_leftovers() -> None:
    for process in list(_LIVE):
        with contextlib.suppress(Exception):
            process.kill()
