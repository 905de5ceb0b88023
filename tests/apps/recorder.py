"""A test app: Stokers that record every callback to Redis, configured by environment.

Workers under test run ``celery -A tests.apps.recorder worker``; the tests read
what the callbacks recorded under ``rec:*`` keys in the same Redis.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import redis
from celery import Celery

from celery_stoker import Stoker, StokerStep, consuming, stoker

BROKER = os.environ.get("STOKER_TEST_BROKER", "redis://127.0.0.1:6379/15")
RECORD_URL = os.environ.get("STOKER_TEST_RECORD_URL", BROKER)

app = Celery("recorder", broker=BROKER)
app.conf.update(
    stoker_url=os.environ.get("STOKER_TEST_URL") or None,
    stoker_lease_ttl=float(os.environ.get("STOKER_TEST_TTL", "1.5")),
    worker_hijack_root_logger=False,
    broker_connection_retry_on_startup=True,
    worker_prefetch_multiplier=1,
    worker_soft_shutdown_timeout=float(os.environ.get("STOKER_TEST_SOFT_SHUTDOWN", "0")),
)
if os.environ.get("STOKER_TEST_MASTER_NAME"):  # stoker_url is a sentinel:// group
    app.conf.stoker_transport_options = {"master_name": os.environ["STOKER_TEST_MASTER_NAME"]}
app.steps["worker"].add(StokerStep)

_record_client: redis.Redis | None = None
_record_pid = 0


def record(kind: str, **fields: Any) -> None:
    """Append one line to ``rec:<kind>`` (a list the test reads)."""
    global _record_client, _record_pid
    if _record_client is None or _record_pid != os.getpid():
        _record_client = redis.Redis.from_url(RECORD_URL)
        _record_pid = os.getpid()
    fields.setdefault("at", time.time())
    fields.setdefault("pid", os.getpid())
    _record_client.rpush(f"rec:{kind}", json.dumps(fields, default=str))


def _eligible() -> Any:
    """STOKER_TEST_ELIGIBLE: comma-separated node-name patterns, or queue:<name>."""
    raw = os.environ.get("STOKER_TEST_ELIGIBLE")
    if not raw:
        return None
    if raw.startswith("queue:"):
        return consuming(raw.split(":", 1)[1])
    return raw.split(",")


@stoker(
    app,
    name="recorder",
    eligible=_eligible(),
    min_members=int(os.environ.get("STOKER_TEST_MIN_MEMBERS", "1")),
)
class Recorder(Stoker):
    """Counts events and records each one with its context."""

    def init(self) -> dict[str, Any]:
        record("init", host=self.context.hostname, token=self.context.token)
        return {"events": 0, "timers": 0}

    def event(self, state: dict[str, Any], event: str, reason: Any) -> dict[str, Any]:
        ctx = self.context
        started = time.time()
        busy = float(os.environ.get("STOKER_TEST_EVENT_SLEEP", "0"))
        if busy and event != "shutdown":
            record("started", event=event, host=ctx.hostname, token=ctx.token)
            time.sleep(busy)  # a slow callback, to show events never overlap
        record(
            "event",
            event=event,
            reason=reason,
            host=ctx.hostname,
            token=ctx.token,
            members=sorted(ctx.members),
            events=state["events"],
            started=started,
        )
        if event == "timer" and os.environ.get("STOKER_TEST_RAISE_ON_TIMER") == ctx.hostname:
            raise RuntimeError("boom in timer")
        state = dict(state)
        state["events"] += 1
        if event == "timer":
            state["timers"] += 1
        return state

    def leader_started(self) -> None:
        record("hook", hook="started", host=self.context.hostname, token=self.context.token)

    def leader_stopping(self, reason: str) -> None:
        record(
            "hook",
            hook="stopping",
            reason=reason,
            host=self.context.hostname,
            token=self.context.token,
        )

    def next_timer_in(self, state: dict[str, Any]) -> float | None:
        raw = os.environ.get("STOKER_TEST_TIMER")
        return float(raw) if raw else None


@app.task(name="recorder.sleep")
def sleep(seconds: float) -> None:
    """Keep a pool slot busy, then say so (to show a busy pool never delays renewals)."""
    time.sleep(seconds)
    record("slept", seconds=seconds)
