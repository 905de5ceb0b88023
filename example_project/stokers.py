"""The leader-only job: watch the queues' backlog and publish one summary for the fleet.

Every worker could run LLEN itself, but then a dashboard or an autoscaler
would get N slightly different answers and N times the load; one leader
measures, and everyone reads its summary.  Two things to copy from here:

* the summary is written with the term's **fencing token**, and the write is
  refused if a newer term already wrote (a leader paused past its lease cannot
  overwrite its successor);
* ``cluster_change`` gives the leader the fleet's membership for free.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from celery_stoker import Stoker, stoker

from .app import CHECK_EVERY, app

logger = logging.getLogger("example_project.queue_watch")

SUMMARY_KEY = "example:queue-depth"  # a hash: the latest summary and its token
SUMMARY_CHANNEL = "example:queue-depth"  # pub/sub: every summary as it is made

# Write the summary only if no newer term wrote one; then announce it.
_FENCED_PUBLISH = """
local stored = redis.call('HGET', KEYS[1], 'token')
if stored and tonumber(stored) > tonumber(ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], 'token', ARGV[1], 'summary', ARGV[2])
redis.call('PUBLISH', KEYS[2], ARGV[2])
return 1
"""


def queue_depths() -> dict[str, int]:
    """Messages waiting in each of the app's queues.

    The Redis transport keeps one list per queue and priority step (``celery``,
    ``celery\\x06\\x163``, ...); a queue's backlog is the sum of their LLENs.
    """
    names = [queue.name for queue in app.conf.task_queues]
    with app.pool.acquire(block=True) as connection:
        channel = connection.default_channel
        steps = channel.priority_steps
        with channel.client.pipeline() as pipe:
            for name in names:
                for step in steps:
                    pipe.llen(name if step == 0 else f"{name}{channel.sep}{step}")
            lengths = pipe.execute()
    return {
        name: sum(lengths[i * len(steps) : (i + 1) * len(steps)]) for i, name in enumerate(names)
    }


def publish(summary: dict[str, Any], token: int) -> bool:
    """Store and announce ``summary`` unless a newer term already did (fenced by ``token``)."""
    with app.pool.acquire(block=True) as connection:
        client = connection.default_channel.client
        script = client.register_script(_FENCED_PUBLISH)
        return bool(script(keys=[SUMMARY_KEY, SUMMARY_CHANNEL], args=[token, json.dumps(summary)]))


@stoker(app, name="example.queue_watch")
class QueueWatch(Stoker):
    """Measures the queues every ``EXAMPLE_CHECK_EVERY`` seconds, on the leader only."""

    def init(self) -> dict[str, Any]:
        return {"checks": 0, "peak": 0}

    def event(self, state: dict[str, Any], event: str, reason: Any) -> dict[str, Any]:
        ctx = self.context
        if event == "cluster_change":
            logger.info(
                "fleet: %s %s; %d live: %s",
                reason["node"],
                reason["change"],
                len(ctx.members),
                ", ".join(sorted(ctx.members)),
            )
            return state
        if event not in ("now_leader", "timer"):
            return state  # shutdown: nothing to let go of
        depths = queue_depths()
        total = sum(depths.values())
        summary = {"at": time.time(), "by": ctx.hostname, "token": ctx.token, "depths": depths}
        if publish(summary, ctx.token):
            logger.info("queues: %s (total %d, token %d)", depths, total, ctx.token)
        else:
            logger.warning("a newer term already published; this term is over")
        return {"checks": state["checks"] + 1, "peak": max(state["peak"], total)}

    def next_timer_in(self, state: dict[str, Any]) -> float:
        return CHECK_EVERY
