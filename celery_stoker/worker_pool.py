"""What the worker's pool can do: its name as ``-P`` says it, the limits it enforces, green threads.

``StokerStep`` asks these once at start (and, for green threads, at a stop):
a Stoker's ``time_limit`` the pool cannot enforce is said once, and under
gevent or eventlet a stop request runs on the event loop, not a thread.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping
from typing import Any

from .settings import StokerSettings

logger = logging.getLogger("celery_stoker.bootstep")

#: What each Celery pool enforces of a task's (soft, hard) time limit.
POOL_LIMITS = {
    "prefork": (True, True),
    "gevent": (False, True),
    "eventlet": (False, False),
    "threads": (False, False),
    "solo": (False, False),
}


def pool_name(worker: Any) -> str:
    """The worker's pool as ``-P`` names it: prefork, solo, threads, gevent or eventlet."""
    module = type(getattr(worker, "pool", None)).__module__ or ""
    if module.endswith(".prefork") or module.endswith(".asynpool"):
        return "prefork"
    if module.endswith(".thread"):
        return "threads"
    return module.rsplit(".", 1)[-1] or "prefork"


def warn_unenforced_limits(worker: Any, settings: Mapping[str, StokerSettings]) -> None:
    """Say once at start which Stoker's time limit this worker's pool cannot enforce."""
    pool = pool_name(worker)
    soft_ok, hard_ok = POOL_LIMITS.get(pool, (True, True))
    for name, stoker_settings in sorted(settings.items()):
        missing = []
        if stoker_settings.soft_time_limit is not None and not soft_ok:
            missing.append(f"soft_time_limit={stoker_settings.soft_time_limit:g}")
        if stoker_settings.time_limit is not None and not hard_ok:
            missing.append(f"time_limit={stoker_settings.time_limit:g}")
        if missing:
            logger.warning(
                "Stoker %s: the %s pool cannot enforce %s; use the prefork pool (or "
                "gevent for a hard limit) to bound its callbacks",
                name,
                pool,
                " and ".join(missing),
            )


def green_spawn(fn: Any) -> bool:
    """Run ``fn`` soon on the event loop if threads are green (gevent, eventlet); False if not."""
    if "gevent" in sys.modules:
        from gevent import monkey

        if monkey.is_module_patched("threading"):
            import gevent

            gevent.get_hub().loop.run_callback(lambda: gevent.spawn(fn))
            return True
    if "eventlet" in sys.modules:
        from eventlet import patcher

        if patcher.is_monkey_patched("thread"):
            import eventlet

            eventlet.spawn_after(0, fn)
            return True
    return False
